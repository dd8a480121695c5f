//! The typed protocol between the supervisor and a cell: one request and one response per
//! `SOCK_SEQPACKET` message, each carrying a request id, encoded with postcard. File descriptors
//! (the KVM device, a template's sealed memfds) travel beside the message with `SCM_RIGHTS`.

use std::ops::Range;

mod boot;

pub use boot::{BootFailure, BootVm, BootedVm, FrozenBooted};

use cowvm_vmm::{CommandOutput, GuestCommand, VmState};
use serde::{Deserialize, Serialize};
use vm_memory::GuestAddress;

/// A template id chosen by the supervisor (the same in every cell that holds the template).
pub type TemplateId = u64;
/// A VM id chosen by the cell (unique within the cell, stable across resets).
pub type CellVmId = u64;

/// A message with the id that pairs a response with its request.
#[derive(Debug, Serialize, Deserialize)]
pub struct Envelope<T> {
    /// Request id (the response repeats it).
    pub id: u64,
    /// The request or response.
    pub body: T,
}

/// How a cell locks itself down after it has received the KVM device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxConfig {
    /// Switch to this uid and gid (when the cell starts as root).
    pub drop_to: Option<(u32, u32)>,
    /// Install the seccomp-bpf allowlist.
    pub seccomp: bool,
}

/// Sent with one file descriptor: the opened `/dev/kvm`. The first request of every cell.
#[derive(Debug, Serialize, Deserialize)]
pub struct Init {
    /// The sandbox to enter before serving anything else.
    pub sandbox: SandboxConfig,
    /// Most VMs (clones plus warm shells) the cell may hold.
    pub max_vms: u32,
    /// Most memory mappings its VMs may cost (`None`: `vm.max_map_count` less what the process
    /// keeps for itself). Each cell is a process of its own with a budget of its own.
    pub mapping_budget: Option<u64>,
}

/// Sent with the template's memfds: the base first, then each overlay in order.
#[derive(Serialize, Deserialize)]
pub struct LoadTemplate {
    /// The supervisor's id for the template.
    pub template: TemplateId,
    /// For each overlay memfd, the byte ranges of it mapped over the layers below.
    pub overlay_runs: Vec<Vec<Range<u64>>>,
    /// The state clones resume from.
    pub state: VmState,
}

impl std::fmt::Debug for LoadTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadTemplate")
            .field("template", &self.template)
            .field("overlay_runs", &self.overlay_runs)
            .field("memory_size", &self.state.memory_size)
            .finish_non_exhaustive()
    }
}

/// A guest command, as it crosses the process boundary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WireCommand {
    /// See [`GuestCommand::Exit`].
    Exit,
    /// See [`GuestCommand::Write`].
    Write {
        /// First guest physical address.
        start: u64,
        /// Qwords.
        count: u64,
        /// Bytes between them.
        stride: u64,
        /// The value.
        value: u64,
    },
    /// See [`GuestCommand::Checksum`].
    Checksum {
        /// First guest physical address.
        start: u64,
        /// Qwords.
        count: u64,
        /// Bytes between them.
        stride: u64,
    },
    /// See [`GuestCommand::Identity`].
    Identity,
    /// See [`GuestCommand::TripleFault`].
    TripleFault,
    /// See [`GuestCommand::Spin`].
    Spin,
    /// See [`GuestCommand::Halt`].
    Halt,
}

impl From<GuestCommand> for WireCommand {
    fn from(command: GuestCommand) -> Self {
        match command {
            GuestCommand::Exit => WireCommand::Exit,
            GuestCommand::Write {
                start,
                count,
                stride,
                value,
            } => WireCommand::Write {
                start: start.0,
                count,
                stride,
                value,
            },
            GuestCommand::Checksum { start, count, stride } => WireCommand::Checksum {
                start: start.0,
                count,
                stride,
            },
            GuestCommand::Identity => WireCommand::Identity,
            GuestCommand::TripleFault => WireCommand::TripleFault,
            GuestCommand::Spin => WireCommand::Spin,
            GuestCommand::Halt => WireCommand::Halt,
        }
    }
}

impl From<WireCommand> for GuestCommand {
    fn from(command: WireCommand) -> Self {
        match command {
            WireCommand::Exit => GuestCommand::Exit,
            WireCommand::Write {
                start,
                count,
                stride,
                value,
            } => GuestCommand::Write {
                start: GuestAddress(start),
                count,
                stride,
                value,
            },
            WireCommand::Checksum { start, count, stride } => GuestCommand::Checksum {
                start: GuestAddress(start),
                count,
                stride,
            },
            WireCommand::Identity => GuestCommand::Identity,
            WireCommand::TripleFault => GuestCommand::TripleFault,
            WireCommand::Spin => GuestCommand::Spin,
            WireCommand::Halt => GuestCommand::Halt,
        }
    }
}

/// What the supervisor asks of a cell.
#[derive(Debug, Serialize, Deserialize)]
pub enum Request {
    /// Take the KVM device (one fd) and enter the sandbox.
    Init(Init),
    /// Take a template (its memfds).
    LoadTemplate(Box<LoadTemplate>),
    /// Keep `shells` warm shells of a template; wait up to `wait_ms` for them to be ready. The
    /// cell lowers the target to the room it has (live VMs and other templates' targets within
    /// its VM limit) and answers the target it keeps.
    KeepWarm {
        /// Template.
        template: TemplateId,
        /// Shells to keep.
        shells: u32,
        /// How long to wait for them (0: return at once).
        wait_ms: u64,
    },
    /// Make `count` clones of a template. They take the template's warm shells first, and the
    /// shells taken (up to `count` of the target) are not rebuilt: the call lowers the target by
    /// them, and other templates' targets give way to the clones' room. The answer carries the
    /// targets the cell keeps afterwards.
    Spawn {
        /// Template.
        template: TemplateId,
        /// How many.
        count: u32,
    },
    /// Run a guest command on a VM.
    Run {
        /// The VM.
        vm: CellVmId,
        /// The vCPU that runs it (0-based).
        vcpu: u32,
        /// The command.
        command: WireCommand,
        /// Deadline for the guest, milliseconds.
        deadline_ms: u64,
    },
    /// Reset a VM to its template's state (new generation and seed).
    Reset {
        /// The VM.
        vm: CellVmId,
    },
    /// Destroy a VM.
    Destroy {
        /// The VM.
        vm: CellVmId,
    },
    /// Drop a template and its warm shells (refused while clones of it live in the cell).
    DropTemplate {
        /// Template.
        template: TemplateId,
    },
    /// Counts.
    Stats,
    /// One call (guest ABI v1) in a VM, which keeps its state.
    Call {
        /// The VM.
        vm: CellVmId,
        /// The input bytes.
        input: Vec<u8>,
        /// Deadline for the guest, milliseconds.
        deadline_ms: u64,
    },
    /// Binary-stats fds of a VM and its vCPU (`KVM_GET_STATS_FD`), so that the supervisor reads
    /// KVM's statistics itself.
    StatsFds {
        /// The VM.
        vm: CellVmId,
    },
    /// Boot a VM (with no fd, or the sealed memfd of its kernel).
    Boot(BootVm),
    /// Freeze a VM the cell booted into a template, which the cell keeps under `template`;
    /// answered [`Response::FrozenBooted`] with the template's memfds.
    FreezeBooted {
        /// The VM.
        vm: CellVmId,
        /// The supervisor's id for the new template.
        template: TemplateId,
    },
}

impl Request {
    /// A short name for errors and timeouts.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Init(_) => "init",
            Request::LoadTemplate(_) => "load_template",
            Request::KeepWarm { .. } => "keep_warm",
            Request::Spawn { .. } => "spawn",
            Request::Run { .. } => "run",
            Request::Reset { .. } => "reset",
            Request::Destroy { .. } => "destroy",
            Request::DropTemplate { .. } => "drop_template",
            Request::Stats => "stats",
            Request::StatsFds { .. } => "stats_fds",
            Request::Call { .. } => "call",
            Request::Boot(_) => "boot",
            Request::FreezeBooted { .. } => "freeze_booted",
        }
    }
}

/// One clone a cell made.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SpawnedVm {
    /// Its id in the cell.
    pub vm: CellVmId,
    /// Generation id handed to the guest.
    pub generation: u64,
    /// Seed handed to the guest.
    pub seed: u64,
    /// Microseconds from the start of its spawn to its first guest exit (in the cell).
    pub spawn_us: f64,
    /// Whether it came from a warm shell.
    pub pooled: bool,
    /// Host virtual address of guest RAM byte 0 in the cell (for `/proc/<pid>/pagemap`).
    pub host_address: u64,
    /// Guest RAM size in bytes.
    pub memory_size: u64,
}

/// One clone a cell could not make.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpawnFailure {
    /// Position in the request (0-based).
    pub index: u32,
    /// Why.
    pub reason: String,
}

/// A guest command's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunOutput {
    /// Status from the done port (0 = ok).
    pub status: u32,
    /// rbx.
    pub result: u64,
    /// rcx.
    pub extra: u64,
    /// `KVM_RUN` time, nanoseconds.
    pub run_ns: u64,
    /// The vCPU index the guest reported (identity only). Always encoded: postcard is not
    /// self-describing, so a skipped field would shift every field after it.
    pub vcpu: Option<u64>,
}

impl From<RunOutput> for CommandOutput {
    fn from(out: RunOutput) -> Self {
        CommandOutput {
            status: out.status,
            result: out.result,
            extra: out.extra,
            vcpu: out.vcpu,
        }
    }
}

/// What a reset did.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ResetDone {
    /// Microseconds in the cell.
    pub reset_us: f64,
    /// Private pages dropped.
    pub pages_dropped: u64,
    /// New generation id.
    pub generation: u64,
    /// New seed.
    pub seed: u64,
}

/// Counts of a cell.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct CellCounts {
    /// Live clones.
    pub vms: u32,
    /// Warm shells ready now.
    pub warm_shells: u32,
    /// Templates loaded.
    pub templates: u32,
    /// Warm-shell targets and ready shells per template.
    pub warm: Vec<WarmCount>,
}

/// One template's warm shells in a cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WarmCount {
    /// Template.
    pub template: TemplateId,
    /// Shells the cell keeps (its builder builds up to this many off the request path).
    pub target: u32,
    /// Shells ready now.
    pub ready: u32,
}

/// Kinds of failure a cell reports (the message says the rest).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RemoteErrorKind {
    /// The request does not fit the cell's state (e.g. `Init` twice, no KVM yet).
    Protocol,
    /// No such template in the cell.
    UnknownTemplate,
    /// No such VM in the cell.
    UnknownVm,
    /// The cell would exceed its VM limit.
    Full,
    /// The guest stopped (fault, deadline) or failed while running the command.
    Guest,
    /// The command was refused before the guest ran (an address or count outside the guest).
    Command,
    /// Anything the VMM reported.
    Vmm,
    /// The sandbox could not be entered.
    Sandbox,
}

/// An error the cell reported for one request (the cell keeps serving).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct RemoteError {
    /// The kind.
    pub kind: RemoteErrorKind,
    /// A sentence for people.
    pub message: String,
}

impl RemoteError {
    /// An error of `kind` saying `message`.
    pub fn new(kind: RemoteErrorKind, message: impl Into<String>) -> Self {
        RemoteError {
            kind,
            message: message.into(),
        }
    }
}

/// A call's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallDone {
    /// The status the guest passed to `done`.
    pub status: u32,
    /// The output bytes.
    pub output: Vec<u8>,
    /// What the guest logged during the call.
    pub log: String,
    /// Whether logs were dropped.
    pub log_truncated: bool,
    /// Microseconds to get the VM ready for the call.
    pub spawn_us: f64,
    /// Microseconds the guest ran.
    pub run_us: f64,
    /// Microseconds for the whole call.
    pub total_us: f64,
}

/// A call that failed in the guest or the VMM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallFailure {
    /// The API's error code (`None`: a VMM failure).
    pub code: Option<String>,
    /// A sentence for people.
    pub message: String,
    /// Whether the VM can take another call.
    pub usable: bool,
}

/// What a cell answers.
#[derive(Debug, Serialize, Deserialize)]
pub enum Response {
    /// `Init` done: the cell's pid and the uid it now runs as.
    Ready {
        /// Process id.
        pid: u32,
        /// Real uid after the sandbox.
        uid: u32,
    },
    /// Template loaded.
    Loaded,
    /// Warm shells ready now.
    Warm {
        /// Count.
        shells: u32,
        /// The target the cell keeps (the one asked for, lowered to the room it has).
        target: u32,
    },
    /// Clones made (and the ones not made).
    Spawned {
        /// Made, in request order.
        clones: Vec<SpawnedVm>,
        /// Not made.
        failed: Vec<SpawnFailure>,
        /// The warm-shell targets the cell keeps afterwards, per template.
        warm: Vec<WarmCount>,
    },
    /// A guest command's answer.
    Ran(RunOutput),
    /// A reset's report.
    Reset(ResetDone),
    /// Done (destroy, drop template).
    Done,
    /// Counts.
    Stats(CellCounts),
    /// Sent with two fds: the VM's and its vCPU's binary statistics.
    StatsFds,
    /// A call's answer.
    Called(CallDone),
    /// A call that failed (the cell keeps serving).
    CallFailed(CallFailure),
    /// The request failed.
    Error(RemoteError),
    /// A VM booted.
    Booted(BootedVm),
    /// A boot that failed (the cell keeps serving).
    BootFailed(BootFailure),
    /// A booted VM frozen (sent with the template's memfds).
    FrozenBooted(Box<FrozenBooted>),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_a_run_output_with_and_without_a_vcpu_index_round_trips_through_postcard() {
        for vcpu in [None, Some(3)] {
            let out = RunOutput {
                status: 0,
                result: 7,
                extra: 9,
                run_ns: 11,
                vcpu,
            };
            let bytes = postcard::to_allocvec(&out).expect("encode");
            let back: RunOutput = postcard::from_bytes(&bytes).expect("decode");
            assert_eq!(back, out);
        }
    }
}
