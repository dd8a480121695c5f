//! Booting a VM in the cell (`Request::Boot`): the supervisor checked the request and sends a
//! user kernel as a sealed memfd (the cell opens no files); the cell boots it with the same
//! sequence as the server's own process ([`boot_to_ready`]), under its VM limit and mapping
//! budget, and holds it beside its clones until it is destroyed. Its RAM is a memfd of its own
//! (memfd_create and ftruncate are in the allowlist). `Request::FreezeBooted` freezes it into a
//! template (its RAM memfd sealed in place, or a layer on the template it was frozen into
//! before), which the cell keeps and whose memfds go back to the supervisor.

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cowvm_vmm::call::ready::boot_to_ready;
use cowvm_vmm::loader::KernelImage;
use cowvm_vmm::{FrozenMemory, Kernel, Template, VmConfig};

use super::{admit_error, vmm_error, Held, Kind, Machine, Worker};
use crate::protocol::{BootFailure, BootVm, BootedVm, CellVmId, FrozenBooted, RemoteError, Response, TemplateId};

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

impl Worker {
    /// Freezes VM `vm`, which this cell booted, into template `template` (kept here for clones
    /// placed in this cell); the template's memfds go with the answer.
    pub(super) fn freeze_booted(&mut self, vm: CellVmId, template: TemplateId) -> Result<Response, RemoteError> {
        if self.templates.contains_key(&template) {
            return Err(RemoteError::new(
                Kind::Protocol,
                format!("template {template} is already loaded in this cell"),
            ));
        }
        let engine = self
            .engine
            .as_ref()
            .ok_or_else(|| RemoteError::new(Kind::Protocol, "the cell has no KVM device yet (Init first)"))?;
        let held = self
            .vms
            .get_mut(&vm)
            .ok_or_else(|| RemoteError::new(Kind::UnknownVm, format!("no VM {vm} in this cell")))?;
        let Machine::Booted(booted) = &mut held.machine else {
            return Err(RemoteError::new(
                Kind::Protocol,
                format!("VM {vm} is a clone, not a booted VM"),
            ));
        };
        let started = Instant::now();
        // The pagemap the engine opened before the sandbox: the cell cannot open files now.
        let frozen = Template::freeze_with(engine.kvm(), booted, engine.pagemap()).map_err(vmm_error)?;
        let pause_us = started.elapsed().as_secs_f64() * 1e6;
        let memory = frozen.memory();
        let mut fds = vec![memory.base().as_fd()];
        let mut overlay_runs = Vec::new();
        for (overlay, runs) in memory.overlays() {
            fds.push(overlay.as_fd());
            overlay_runs.push(runs.to_vec());
        }
        let fds = fds
            .into_iter()
            .map(|fd| fd.try_clone_to_owned())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| RemoteError::new(Kind::Vmm, format!("cannot duplicate the template's memfds: {e}")))?;
        let state = postcard::to_allocvec(frozen.state())
            .and_then(|bytes| postcard::from_bytes(&bytes))
            .map_err(|e| RemoteError::new(Kind::Vmm, format!("cannot encode the frozen state: {e}")))?;
        self.templates.insert(template, Arc::new(frozen));
        self.outgoing = fds;
        Ok(Response::FrozenBooted(Box::new(FrozenBooted {
            overlay_runs,
            state,
            pause_us,
        })))
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
