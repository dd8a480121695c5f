//! Booting a VM in the cell (`Request::Boot`): the supervisor checked the request and sends a
//! user kernel as a sealed memfd (the cell opens no files); the cell boots it with the same
//! sequence as the server's own process ([`boot_to_ready`]), under its VM limit and mapping
//! budget, and holds it beside its clones until it is destroyed.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use cowvm_vmm::call::ready::boot_to_ready;
use cowvm_vmm::loader::KernelImage;
use cowvm_vmm::{FrozenMemory, Kernel, VmConfig};

use super::{admit_error, vmm_error, Held, Kind, Machine, Worker};
use crate::protocol::{BootFailure, BootVm, BootedVm, RemoteError, Response};

impl Worker {
    /// Boots `boot`, its kernel image in the one fd of `fds` unless it is the built-in guest.
    pub(super) fn boot(&mut self, boot: BootVm, mut fds: Vec<OwnedFd>) -> Result<Response, RemoteError> {
        let started = Instant::now();
        self.engine()?;
        let kernel = match (boot.kernel, fds.pop()) {
            (None, None) => Kernel::Builtin,
            (Some(name), Some(fd)) if fds.is_empty() => Kernel::Image(read_image(name, fd)?),
            _ => {
                return Err(RemoteError::new(
                    Kind::Protocol,
                    "Boot carries one fd (the kernel's sealed memfd) when it names a kernel, else none",
                ))
            }
        };
        let engine = self.engine()?;
        // Admitted against the cell's VM limit and mapping budget; warm shells give way.
        let room = engine.reserve(1, None).map_err(admit_error)?;
        let config = VmConfig {
            memory_mib: boot.memory_mib,
            kernel,
            page_size: None,
            vcpus: boot.vcpus as usize,
        };
        let deadline = Duration::from_millis(boot.deadline_ms);
        let vm = match boot_to_ready(engine.kvm(), &config, boot.warmup_mib, deadline) {
            Ok((vm, _)) => vm,
            Err(e) => return Ok(Response::BootFailed(BootFailure::from(&e))),
        };
        let id = engine.new_vm_id();
        let (host_address, memory_size) = (vm.ram().host_address(), vm.ram().size());
        self.vms.insert(
            id,
            Held {
                machine: Machine::Booted(vm),
                room,
            },
        );
        self.fit_targets();
        Ok(Response::Booted(BootedVm {
            vm: id,
            host_address,
            memory_size,
            boot_us: started.elapsed().as_secs_f64() * 1e6,
            warm: self.warm_counts(),
        }))
    }
}

/// The kernel image in `fd`, which must be a sealed memfd (what the supervisor sends): read
/// with `pread`, so the cell needs neither `open` nor `read`.
fn read_image(name: String, fd: OwnedFd) -> Result<KernelImage, RemoteError> {
    let memory = FrozenMemory::from_sealed(File::from(fd)).map_err(vmm_error)?;
    let len = usize::try_from(memory.size()).map_err(vmm_error)?;
    let mut bytes = vec![0u8; len];
    memory
        .read_at(&mut bytes, 0)
        .map_err(|e| RemoteError::new(Kind::Vmm, format!("reading the kernel's memfd: {e}")))?;
    Ok(KernelImage::new(name, bytes))
}
