//! The typed protocol between the supervisor and a cell: one request and one response per
//! `SOCK_SEQPACKET` message, each carrying a request id, encoded with postcard. File descriptors
//! (the KVM device, a template's sealed memfds) travel beside the message with `SCM_RIGHTS`.
//!
//! Where the VMM has a type for an answer (a command's output, a reset's report, a clone not
//! made) the protocol carries that type itself, so nothing is copied field by field. postcard is
//! not self-describing: a type that crosses here must serialise every field, always, in order
//! (no `skip_serializing_if`, `untagged` or `flatten`); the tests below round-trip each one.

use std::ops::Range;
use std::time::Duration;

mod boot;

pub use boot::{BootFailure, BootVm, BootedVm, FrozenBooted};

use cowvm_vmm::clone::CloneFailure;
use cowvm_vmm::probe::{GuestWrites, Micros, ProbeTargets};
use cowvm_vmm::translate::GuestTranslation;
use cowvm_vmm::{CommandOutput, GuestCommand, ResetReport, VmState};
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
    /// The lowest generation id the cell hands out: each cell gets a block of 2^32 ids of its
    /// own, so clones in different cells (and in different runs of a server with a state
    /// directory) never share one.
    pub generation_floor: u64,
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

/// What a freeze made: the new template is the parent's layers plus, when the VM had private
/// pages, one new sealed overlay (its memfd travels beside the answer) mapped over them.
#[derive(Serialize, Deserialize)]
pub struct Frozen {
    /// The runs of the new overlay mapped over the parent's layers (`None`: no new layer; the
    /// VM had no private page, and the template's memory is its parent's).
    pub overlay_runs: Option<Vec<Range<u64>>>,
    /// The state clones resume from.
    pub state: VmState,
    /// Microseconds the VM was paused in the cell.
    pub pause_us: f64,
}

impl std::fmt::Debug for Frozen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Frozen")
            .field("overlay_runs", &self.overlay_runs)
            .field("memory_size", &self.state.memory_size)
            .field("pause_us", &self.pause_us)
            .finish_non_exhaustive()
    }
}

/// A copy of `state` (a VM state is not `Clone`: it goes through its own encoding).
pub fn copy_state(state: &VmState) -> Result<VmState, postcard::Error> {
    postcard::from_bytes(&postcard::to_allocvec(state)?)
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
    /// Delete a clone by recycling it into a warm shell of its template (its target rises by
    /// one); a VM that cannot be recycled is destroyed instead.
    Recycle {
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
    /// Binary-stats fds of a VM and of each of its vCPUs (`KVM_GET_STATS_FD`), so that the
    /// supervisor reads KVM's statistics itself.
    StatsFds {
        /// The VM.
        vm: CellVmId,
    },
    /// Freeze a VM into a new template (the VM keeps running on a private view of it); the cell
    /// keeps the template under `template` and answers [`Response::Frozen`].
    Freeze {
        /// The VM.
        vm: CellVmId,
        /// The template the VM was cloned from (the cell checks that it is).
        parent: TemplateId,
        /// The supervisor's id for the new template.
        template: TemplateId,
    },
    /// First half of a write probe: translate and check its targets (nothing is written).
    ProbePrepare {
        /// The VM.
        vm: CellVmId,
        /// The pages to write.
        targets: ProbeTargets,
    },
    /// Second half of a write probe (after the supervisor has read the pages' states): the guest
    /// writes each page twice, timed; with `baseline`, host-only copy-on-write is timed on a
    /// scratch clone of the VM's template, made first (within the cell's room) and gone before
    /// the answer.
    ProbeWrite {
        /// The VM.
        vm: CellVmId,
        /// Guest virtual addresses, one per page (checked again).
        gvas: Vec<u64>,
        /// Time the host-only baseline.
        baseline: bool,
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
    /// One call (guest ABI v1) in a fresh clone of a template, made like one clone of `Spawn`
    /// (a warm shell first; the template's target drops by one) but not run before the call;
    /// torn down once the answer is sent, before the next request ([`Response::CalledTemplate`]).
    CallTemplate {
        /// Template.
        template: TemplateId,
        /// The input bytes.
        input: Vec<u8>,
        /// Deadline for the guest, milliseconds.
        deadline_ms: u64,
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
            Request::Recycle { .. } => "recycle",
            Request::DropTemplate { .. } => "drop_template",
            Request::Stats => "stats",
            Request::StatsFds { .. } => "stats_fds",
            Request::Call { .. } => "call",
            Request::Freeze { .. } => "freeze",
            Request::ProbePrepare { .. } => "probe_prepare",
            Request::ProbeWrite { .. } => "probe_write",
            Request::Boot(_) => "boot",
            Request::FreezeBooted { .. } => "freeze_booted",
            Request::CallTemplate { .. } => "call_template",
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
    /// Deleted clones reset into warm shells since the cell started (`Request::Recycle`).
    pub recycled: u64,
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
    /// A freeze would stack more layers or overlay runs than a template may have.
    TooFragmented,
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

impl From<cowvm_vmm::call::CallReport> for CallDone {
    fn from(report: cowvm_vmm::call::CallReport) -> Self {
        CallDone {
            status: report.status,
            log: report.log.text(),
            log_truncated: report.log.truncated(),
            output: report.output,
            spawn_us: report.spawn_us,
            run_us: report.run_us,
            total_us: report.total_us,
        }
    }
}

/// What a call in a fresh clone of a template did, and the warm-shell targets the cell keeps
/// afterwards.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TemplateCalled {
    /// The call's answer, or how it failed.
    pub call: Result<CallDone, CallFailure>,
    /// The warm-shell targets the cell keeps afterwards, per template.
    pub warm: Vec<WarmCount>,
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
    /// The OS error number behind a VMM failure, when the host refused something (the API
    /// answers 503 for exhaustion, as in process).
    pub errno: Option<i32>,
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
        /// Not made (positions in this request).
        failed: Vec<CloneFailure>,
        /// The warm-shell targets the cell keeps afterwards, per template.
        warm: Vec<WarmCount>,
    },
    /// A guest command's answer, as [`cowvm_vmm::Vm::execute_on_timed`] returns it.
    Ran {
        /// What the guest returned.
        output: CommandOutput,
        /// How long `KVM_RUN` took.
        took: Duration,
    },
    /// A reset's report; after a swap (`report.swapped`) the VM is another VM of the cell, whose
    /// RAM is at `host_address` (its KVM statistics fds are new too).
    Reset {
        /// The report.
        report: ResetReport,
        /// Where the VM's RAM is mapped in the cell now.
        host_address: u64,
    },
    /// Done (destroy, drop template).
    Done,
    /// A VM deleted by `Recycle`.
    Recycled {
        /// Whether it became a warm shell (false: it was destroyed).
        recycled: bool,
        /// The warm-shell targets the cell keeps afterwards, per template.
        warm: Vec<WarmCount>,
    },
    /// Counts.
    Stats(CellCounts),
    /// Sent with `1 + vcpus` fds: the VM's binary statistics, then each vCPU's in vCPU order.
    StatsFds {
        /// vCPUs whose fds follow the VM's.
        vcpus: u32,
    },
    /// A call's answer.
    Called(CallDone),
    /// A call that failed (the cell keeps serving).
    CallFailed(CallFailure),
    /// A VM frozen; sent with the new layer's sealed memfd when it made one.
    Frozen(Box<Frozen>),
    /// The targets of a probe, translated and checked, in order.
    ProbePrepared(Vec<GuestTranslation>),
    /// What a probe's writes measured in the cell.
    ProbeWritten(ProbeWritten),
    /// A call in a fresh clone of a template (answered or failed) and the targets kept.
    CalledTemplate(Box<TemplateCalled>),
    /// The request failed.
    Error(RemoteError),
    /// A VM booted.
    Booted(BootedVm),
    /// A boot that failed (the cell keeps serving).
    BootFailed(BootFailure),
    /// A booted VM frozen (sent with the template's memfds).
    FrozenBooted(Box<FrozenBooted>),
}

/// The cell's half of a write probe's measurements.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeWritten {
    /// The guest writes' times and KVM's counters over them.
    pub writes: GuestWrites,
    /// Host-only copy-on-write on the scratch clone (when a baseline was asked for).
    pub host_cow_us: Option<Micros>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Encodes `response` in an envelope and decodes it back, as the wire does.
    fn round_trip(response: Response) -> Response {
        let bytes = postcard::to_allocvec(&Envelope { id: 5, body: response }).expect("encode");
        let back: Envelope<Response> = postcard::from_bytes(&bytes).expect("decode");
        assert_eq!(back.id, 5);
        back.body
    }

    #[test]
    fn test_the_largest_probe_fits_one_message_each_way() {
        let pages = cowvm_vmm::probe::MAX_PROBE_PAGES as usize;
        // Worst-case varints: addresses at the top of the address space, 1 GiB guest pages.
        let gvas = vec![u64::MAX; pages];
        let prepare = Request::ProbePrepare {
            vm: u64::MAX,
            targets: ProbeTargets::Addresses(gvas.clone()),
        };
        let translation = GuestTranslation {
            gva: u64::MAX,
            gpa: u64::MAX,
            guest_page_size: 1 << 30,
        };
        let written = ProbeWritten {
            writes: GuestWrites {
                times: vec![(f64::MAX, f64::MAX); pages],
                kvm: cowvm_vmm::probe::KvmDeltas {
                    pf_taken: Some(i64::MIN),
                    pf_fixed: Some(i64::MIN),
                    exits: Some(i64::MIN),
                    insn_emulation: Some(i64::MIN),
                    pages_4k: Some(i64::MIN),
                    pages_2m: Some(i64::MIN),
                },
            },
            host_cow_us: Some(Micros { p50: 1.0, p99: 1.0 }),
        };
        let sizes = [
            postcard::to_allocvec(&Envelope {
                id: u64::MAX,
                body: prepare,
            })
            .map(|b| b.len()),
            postcard::to_allocvec(&Envelope {
                id: u64::MAX,
                body: Request::ProbeWrite {
                    vm: u64::MAX,
                    gvas,
                    baseline: true,
                },
            })
            .map(|b| b.len()),
            postcard::to_allocvec(&Envelope {
                id: u64::MAX,
                body: Response::ProbePrepared(vec![translation; pages]),
            })
            .map(|b| b.len()),
            postcard::to_allocvec(&Envelope {
                id: u64::MAX,
                body: Response::ProbeWritten(written),
            })
            .map(|b| b.len()),
        ];
        for size in sizes {
            let size = size.expect("encode");
            assert!(size <= crate::wire::MAX_MESSAGE, "{size} bytes");
        }
    }

    #[test]
    fn test_probe_requests_and_answers_round_trip_through_postcard() {
        for targets in [
            ProbeTargets::Addresses(vec![8 << 20, (8 << 20) + 4096]),
            ProbeTargets::Stride {
                start: 8 << 20,
                pages: 3,
                stride: 8192,
            },
        ] {
            let bytes = postcard::to_allocvec(&Request::ProbePrepare {
                vm: 4,
                targets: targets.clone(),
            })
            .expect("encode");
            match postcard::from_bytes(&bytes).expect("decode") {
                Request::ProbePrepare { vm: 4, targets: back } => assert_eq!(back, targets),
                other => panic!("{other:?}"),
            }
        }
        let written = ProbeWritten {
            writes: GuestWrites {
                times: vec![(3.5, 1.25), (2.0, 1.0)],
                kvm: cowvm_vmm::probe::KvmDeltas {
                    pf_taken: Some(4),
                    pf_fixed: None,
                    exits: Some(-1),
                    insn_emulation: Some(40),
                    pages_4k: None,
                    pages_2m: Some(0),
                },
            },
            host_cow_us: Some(Micros { p50: 1.5, p99: 2.5 }),
        };
        for host_cow_us in [None, written.host_cow_us] {
            let sent = ProbeWritten {
                host_cow_us,
                ..written.clone()
            };
            let bytes = postcard::to_allocvec(&Response::ProbeWritten(sent.clone())).expect("encode");
            match postcard::from_bytes(&bytes).expect("decode") {
                Response::ProbeWritten(back) => assert_eq!(back, sent),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn test_a_command_output_with_and_without_a_vcpu_index_round_trips_through_postcard() {
        for vcpu in [None, Some(3)] {
            let output = CommandOutput {
                status: 1,
                result: 7,
                extra: 9,
                vcpu,
            };
            let took = Duration::from_nanos(11_017);
            match round_trip(Response::Ran { output, took }) {
                Response::Ran { output: o, took: t } => assert_eq!((o, t), (output, took)),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn test_a_reset_report_with_its_steps_round_trips_through_postcard() {
        let report = ResetReport {
            reset_us: 12.5,
            pages_dropped: 1000,
            steps: cowvm_vmm::vm::ResetSteps {
                pages_dropped: 1000,
                runs: 3,
                scan_us: 1.5,
                discard_us: 8.25,
                restore_us: 2.75,
            },
            generation: u64::MAX,
            seed: 0x1234_5678_9abc_def0,
            swapped: true,
        };
        let sent = Response::Reset {
            report: report.clone(),
            host_address: 0x7f00_0000_0000,
        };
        match round_trip(sent) {
            Response::Reset {
                report: back,
                host_address,
            } => assert_eq!((back, host_address), (report, 0x7f00_0000_0000)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn test_a_spawn_answer_with_failures_round_trips_through_postcard() {
        let clones = vec![SpawnedVm {
            vm: 4,
            generation: 2,
            seed: 3,
            spawn_us: 17.5,
            pooled: true,
            host_address: 0x7f00_0000_0000,
            memory_size: 64 << 20,
        }];
        let failed = vec![
            CloneFailure {
                index: 1,
                reason: "guest stopped".into(),
                guest_stopped: true,
            },
            CloneFailure {
                index: usize::MAX,
                reason: String::new(),
                guest_stopped: false,
            },
        ];
        let warm = vec![WarmCount {
            template: 9,
            target: 2,
            ready: 1,
        }];
        let answer = Response::Spawned {
            clones: clones.clone(),
            failed: failed.clone(),
            warm: warm.clone(),
        };
        match round_trip(answer) {
            Response::Spawned {
                clones: c,
                failed: f,
                warm: w,
            } => assert_eq!((c, f, w), (clones, failed, warm)),
            other => panic!("{other:?}"),
        }
    }
}
