//! Booting a VM to where the API serves it: boot, refuse a guest that faulted on its way to its
//! first exit, run a guest ABI v1 guest to `ready()`, write the built-in guest's warm-up data.
//! One sequence for the server's own process and for cells, so that both boot the same VM and
//! fail the same way; [`BootToReadyError::code`] and [`BootToReadyError::errno`] carry the
//! failure across the process boundary of a cell.

use std::time::Duration;

use crate::call::{self, CallError};
use crate::command::{CommandError, GuestCommand};
use crate::exit::GuestExit;
use crate::kvm::{Kvm, KvmError};
use crate::layout::{mib, DATA_START};
use crate::memory::{MemoryError, PAGE_SIZE};
use crate::vcpu::VcpuError;
use crate::vm::{BootReport, Vm, VmConfig, VmError};

/// The value every warm-up qword gets.
pub const WARMUP_VALUE: u64 = 0x3a3a_0000_0000_0001;

/// Why a VM could not be booted to where the API serves it.
#[derive(Debug, thiserror::Error)]
pub enum BootToReadyError {
    /// Building or running the VM failed (the kernel did not load, the host ran out…).
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The guest faulted before its first exit.
    #[error("the guest failed at boot: {0}")]
    Fault(GuestExit),
    /// A guest ABI v1 guest failed on its way to `ready()`.
    #[error("the guest failed before ready(): {0}")]
    NotReady(CallError),
}

/// Every code [`BootToReadyError::code`] gives.
pub const BOOT_ERROR_CODES: [&str; 9] = [
    "boot_failed",
    "bad_kernel",
    "vm_failed",
    "memory_out_of_range",
    "vcpus_out_of_range",
    "vcpu_out_of_range",
    "count_out_of_range",
    "misaligned",
    "address_out_of_range",
];

impl BootToReadyError {
    /// The API's error code when the request or the guest is at fault (one of
    /// [`BOOT_ERROR_CODES`], as the server answers the same error of its own process); `None`
    /// for a failure of the host (see [`BootToReadyError::errno`]).
    pub fn code(&self) -> Option<&'static str> {
        match self {
            BootToReadyError::Fault(_) | BootToReadyError::NotReady(_) => Some("boot_failed"),
            BootToReadyError::Vm(e) => match e {
                VmError::Load(_) => Some("bad_kernel"),
                VmError::GuestStopped(_) | VmError::Failed(_) => Some("vm_failed"),
                VmError::MemorySize { .. } => Some("memory_out_of_range"),
                VmError::VcpuCount { .. } => Some("vcpus_out_of_range"),
                VmError::NoSuchVcpu { .. } | VmError::DuplicateVcpu { .. } => Some("vcpu_out_of_range"),
                VmError::Command(CommandError::TooMany { .. }) => Some("count_out_of_range"),
                VmError::Command(CommandError::Misaligned { .. }) => Some("misaligned"),
                VmError::Command(_) | VmError::Translate(_) => Some("address_out_of_range"),
                _ => None,
            },
        }
    }

    /// The errno of a host failure, if one caused it (an API answers ENOMEM, EMFILE… with 503).
    pub fn errno(&self) -> Option<i32> {
        let kvm = |e: &KvmError| match e {
            KvmError::Ioctl(ioctl) => Some(ioctl.errno()),
            _ => None,
        };
        match self {
            BootToReadyError::Vm(e) => match e {
                VmError::Kvm(k) => kvm(k),
                VmError::Vcpu(VcpuError::Kvm(k)) => kvm(k),
                VmError::Vcpu(VcpuError::Ioctl(ioctl)) | VmError::Ioctl(ioctl) => Some(ioctl.errno()),
                VmError::Memory(
                    MemoryError::CreateMemfd(io)
                    | MemoryError::WriteMemfd(io)
                    | MemoryError::Map { source: io, .. }
                    | MemoryError::Resize { source: io, .. },
                ) => io.raw_os_error(),
                VmError::VcpuThread(io) => io.raw_os_error(),
                _ => None,
            },
            _ => None,
        }
    }

    /// The message for clients: a kernel that did not load is named by its file name only.
    pub fn client_message(&self) -> String {
        match self {
            BootToReadyError::Vm(VmError::Load(load)) => load.client_message(),
            other => other.to_string(),
        }
    }
}

/// Boots `config` with `deadline` for every guest run; runs a guest ABI v1 guest (its first
/// exit is a hypercall) to `ready()`, and writes `warmup_mib` MiB of the built-in guest's data
/// pages from inside the guest (one qword per page). A VM that fails on the way is dropped.
pub fn boot_to_ready(
    kvm: &Kvm,
    config: &VmConfig,
    warmup_mib: u64,
    deadline: Duration,
) -> Result<(Vm, BootReport), BootToReadyError> {
    let (mut vm, report) = Vm::boot_with_deadline(kvm, config, deadline)?;
    if report.first_exit.is_fault() {
        return Err(BootToReadyError::Fault(report.first_exit));
    }
    if crate::hypercall::is_hypercall(&report.first_exit) {
        match call::run_to_ready(&mut vm, report.first_exit.clone(), deadline) {
            Ok(_) => {}
            Err(CallError::Vm(e)) => return Err(e.into()),
            Err(e) => return Err(BootToReadyError::NotReady(e)),
        }
    }
    if warmup_mib > 0 {
        let write = GuestCommand::Write {
            start: DATA_START,
            count: mib(warmup_mib) / PAGE_SIZE,
            stride: PAGE_SIZE,
            value: WARMUP_VALUE,
        };
        vm.execute(write, Some(deadline))?;
    }
    Ok((vm, report))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_every_code_a_boot_error_gives_is_listed() {
        let errors = [
            BootToReadyError::Fault(GuestExit::Shutdown),
            BootToReadyError::NotReady(CallError::Deadline { after_ms: 1 }),
            BootToReadyError::Vm(VmError::GuestStopped(GuestExit::Shutdown)),
            BootToReadyError::Vm(VmError::MemorySize { memory_mib: 1 }),
            BootToReadyError::Vm(VmError::VcpuCount { count: 0 }),
            BootToReadyError::Vm(VmError::NoSuchVcpu { vcpu: 3, count: 1 }),
        ];
        for e in &errors {
            let code = e.code().expect("a request or guest failure has a code");
            assert!(BOOT_ERROR_CODES.contains(&code), "{code}");
            assert_eq!(e.errno(), None);
        }
        let host = BootToReadyError::Vm(VmError::Memory(MemoryError::CreateMemfd(
            std::io::Error::from_raw_os_error(libc::EMFILE),
        )));
        assert_eq!((host.code(), host.errno()), (None, Some(libc::EMFILE)));
    }
}
