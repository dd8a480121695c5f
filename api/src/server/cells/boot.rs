//! `POST /v1/vms` with cells on: the VM boots in a cell. The server checks the request as it
//! does without cells (`check_create` in the VM service), admits the VM under `--max-vms` with
//! the other VMs, copies a user kernel into a sealed memfd that goes to the cell with the
//! request (the cell opens no files), and registers the VM the cell booted as a [`CellVm`]
//! without a template: a booted VM, which answers like one in the server's own process.
//! `POST /v1/vms/{id}/snapshot` and live forks of such a VM freeze it in its cell
//! (`snapshot.rs`), its RAM becoming the new template's base.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::{Arc, Mutex};

use cowvm_cell::protocol::{BootFailure, BootVm, RemoteErrorKind};
use cowvm_cell::{CellError, PoolError};
use cowvm_vmm::call::ready::BOOT_ERROR_CODES;
use cowvm_vmm::loader::LoadError;
use cowvm_vmm::{FrozenMemory, Kernel, VmError};

use super::{CellVm, CellVmStatus};
use crate::server::app::App;
use crate::server::error::ServiceError;
use crate::server::model::{CreateVm, VmInfo};
use crate::server::ops::{timeout_error, transaction};

/// Boots the VM `req` asks for (its kernel resolved and checked to `kernel`) in a cell and
/// registers it.
pub async fn create_vm(app: &Arc<App>, req: CreateVm, kernel: Kernel) -> Result<VmInfo, ServiceError> {
    let cells = app
        .cells
        .service()
        .cloned()
        .ok_or_else(|| ServiceError::internal("cells are not enabled"))?;
    let slot = cells.admit_one(app).map_err(|e| app.admit_error(e))?;
    let service = Arc::clone(app);
    transaction(app, move |commit| {
        let (name, image) = match &kernel {
            Kernel::Builtin => (None, None),
            Kernel::Elf(path) => (Some(path.display().to_string()), Some(sealed_image(path)?)),
            Kernel::Image(_) => return Err(ServiceError::internal("a kernel image cannot be named by a request")),
        };
        let boot = BootVm {
            memory_mib: req.memory_mib,
            vcpus: req.vcpus,
            kernel: name,
            warmup_mib: req.warmup_mib,
            deadline_ms: service.limits.guest_deadline.as_millis() as u64,
        };
        let placed = cells.pool.boot(boot, image.as_ref().map(AsFd::as_fd));
        cells.poke();
        let placed = placed.map_err(pool_error)?.map_err(failure_error)?;
        if !commit.commit() {
            let _ = cells.pool.destroy(placed.at);
            return Err(timeout_error(&service));
        }
        let vm = Arc::new(CellVm {
            id: service.new_vm_id(),
            at: placed.at,
            pid: placed.pid,
            host_address: std::sync::atomic::AtomicU64::new(placed.booted.host_address),
            memory_size: placed.booted.memory_size,
            kvm_stats: Mutex::new(None),
            memory_mib: req.memory_mib,
            vcpus: req.vcpus as usize,
            template_id: None,
            status: Mutex::new(CellVmStatus::default()),
            busy: Mutex::new(()),
            slot: Mutex::new(Some(slot)),
        });
        cells
            .vms
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(vm.id.clone(), Arc::clone(&vm));
        Ok(vm.info())
    })
    .await
}

/// The kernel at `path` copied into a sealed memfd (the kernel copies it; the server holds no
/// copy of its own). A kernel that cannot be opened answers as in the server's own process.
fn sealed_image(path: &Path) -> Result<FrozenMemory, ServiceError> {
    let mut file = File::open(path).map_err(|source| {
        ServiceError::from(VmError::Load(LoadError::Open {
            path: path.to_owned(),
            source,
        }))
    })?;
    let size = file
        .metadata()
        .map_err(|e| ServiceError::internal(format!("kernel {}: {e}", path.display())))?
        .len();
    FrozenMemory::new_sealed_with(size, |memfd| std::io::copy(&mut file, &mut &*memfd).map(drop))
        .map_err(ServiceError::from)
}

/// The answer for a boot the pool could not place or run: no room in the cells (at most
/// `--max-cells` of `--vms-per-cell`, each within its mapping budget) is 503, as running out of
/// mappings is in the server's own process.
fn pool_error(e: PoolError) -> ServiceError {
    match e {
        PoolError::Full { .. }
        | PoolError::Cell(CellError::Remote {
            error:
                cowvm_cell::protocol::RemoteError {
                    kind: RemoteErrorKind::Full,
                    ..
                },
            ..
        }) => ServiceError::exhausted(e.to_string()),
        other => super::pool_error(other),
    }
}

/// The answer for a boot that failed in the cell: what the same failure answers in the server's
/// own process (the cell classified it with [`BootFailure::from`]).
fn failure_error(failure: BootFailure) -> ServiceError {
    let code = failure
        .code
        .as_deref()
        .and_then(|code| BOOT_ERROR_CODES.iter().copied().find(|&known| known == code));
    match code {
        Some("vm_failed") => ServiceError::VmFailed(failure.message),
        Some(code) => ServiceError::out_of_range(code, failure.message),
        None => ServiceError::host(failure.errno, failure.message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cowvm_vmm::call::ready::BootToReadyError;
    use cowvm_vmm::call::CallError;
    use cowvm_vmm::memory::MemoryError;
    use cowvm_vmm::GuestExit;

    #[test]
    fn test_a_boot_failure_from_a_cell_answers_as_the_same_failure_in_process() {
        let errors = || {
            vec![
                BootToReadyError::Fault(GuestExit::Shutdown),
                BootToReadyError::NotReady(CallError::Deadline { after_ms: 5 }),
                BootToReadyError::Vm(VmError::GuestStopped(GuestExit::Shutdown)),
                BootToReadyError::Vm(VmError::MemorySize { memory_mib: 3 }),
                BootToReadyError::Vm(VmError::VcpuCount { count: 0 }),
                BootToReadyError::Vm(VmError::Load(LoadError::Open {
                    path: "/srv/kernels/gone.elf".into(),
                    source: std::io::Error::from(std::io::ErrorKind::NotFound),
                })),
                BootToReadyError::Vm(VmError::Memory(MemoryError::CreateMemfd(
                    std::io::Error::from_raw_os_error(libc::EMFILE),
                ))),
                BootToReadyError::Vm(VmError::Memory(MemoryError::CreateMemfd(
                    std::io::Error::from_raw_os_error(libc::EPERM),
                ))),
            ]
        };
        for (local, remote) in errors().into_iter().zip(errors()) {
            let (local, remote) = (ServiceError::from(local), failure_error(BootFailure::from(&remote)));
            assert_eq!(
                (local.status(), local.code(), local.to_string()),
                (remote.status(), remote.code(), remote.to_string())
            );
        }
    }
}
