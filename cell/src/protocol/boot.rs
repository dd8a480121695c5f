//! The protocol's part for VMs booted in a cell (`POST /v1/vms` with `--cells`): the request,
//! its answer and how a boot failed.

use std::ops::Range;

use cowvm_vmm::VmState;
use serde::{Deserialize, Serialize};

use super::{CellVmId, WarmCount};

/// A VM to boot, as the supervisor checked it (sizes, vCPUs, kernel). Sent with no fd for the
/// built-in guest, or with one: a sealed memfd holding the kernel's ELF image (a cell opens no
/// files).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootVm {
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// `None`: the built-in guest. `Some(name)`: the ELF in the memfd, named so in errors.
    pub kernel: Option<String>,
    /// MiB of the built-in guest's data pages written at boot.
    pub warmup_mib: u64,
    /// Deadline of every guest run of the boot, milliseconds.
    pub deadline_ms: u64,
}

/// A VM a cell booted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BootedVm {
    /// Its id in the cell.
    pub vm: CellVmId,
    /// Host virtual address of guest RAM byte 0 in the cell (for `/proc/<pid>/pagemap`).
    pub host_address: u64,
    /// Guest RAM size in bytes.
    pub memory_size: u64,
    /// Microseconds from the start of the boot to its answer (in the cell).
    pub boot_us: f64,
    /// The warm-shell targets the cell keeps afterwards (shells give way to the VM).
    pub warm: Vec<WarmCount>,
}

/// A boot that failed in the VMM or the guest (the cell keeps serving), classified as the
/// server answers the same failure in its own process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootFailure {
    /// The API's error code (one of `cowvm_vmm::call::ready::BOOT_ERROR_CODES`); `None`: the
    /// host failed.
    pub code: Option<String>,
    /// A sentence for people.
    pub message: String,
    /// The errno of a host failure, if one caused it.
    pub errno: Option<i32>,
}

/// A booted VM frozen into a template (`POST /v1/vms/{id}/snapshot` of a VM booted in a cell).
/// Sent with the template's sealed memfds: the base first, then each overlay in order (as
/// `LoadTemplate` sends them the other way).
#[derive(Serialize, Deserialize)]
pub struct FrozenBooted {
    /// For each overlay memfd, the byte ranges of it mapped over the layers below.
    pub overlay_runs: Vec<Vec<Range<u64>>>,
    /// The state clones resume from.
    pub state: VmState,
    /// Microseconds the VM was paused (in the cell).
    pub pause_us: f64,
}

impl std::fmt::Debug for FrozenBooted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrozenBooted")
            .field("overlay_runs", &self.overlay_runs)
            .field("memory_size", &self.state.memory_size)
            .field("pause_us", &self.pause_us)
            .finish_non_exhaustive()
    }
}

impl From<&cowvm_vmm::call::ready::BootToReadyError> for BootFailure {
    fn from(e: &cowvm_vmm::call::ready::BootToReadyError) -> Self {
        BootFailure {
            code: e.code().map(str::to_owned),
            message: e.client_message(),
            errno: e.errno(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_boot_messages_with_and_without_optional_fields_round_trip_through_postcard() {
        for kernel in [None, Some("hello.elf".to_owned())] {
            let boot = BootVm {
                memory_mib: 64,
                vcpus: 2,
                kernel,
                warmup_mib: 8,
                deadline_ms: 2000,
            };
            let bytes = postcard::to_allocvec(&boot).expect("encode");
            assert_eq!(postcard::from_bytes::<BootVm>(&bytes).expect("decode"), boot);
        }
        for (code, errno) in [(None, Some(12)), (Some("bad_kernel".to_owned()), None)] {
            let failure = BootFailure {
                code,
                message: "m".into(),
                errno,
            };
            let bytes = postcard::to_allocvec(&failure).expect("encode");
            assert_eq!(postcard::from_bytes::<BootFailure>(&bytes).expect("decode"), failure);
        }
    }
}
