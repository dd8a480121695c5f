//! Request and response bodies of the API (their schemas go into `/openapi.json`).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

pub use super::call::{CallRequest, CallResult};

/// `POST /v1/vms`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateVm {
    /// Guest RAM in MiB (4 up to the server's limit).
    #[serde(default = "default_memory_mib")]
    #[schema(default = 256)]
    pub memory_mib: u64,
    /// vCPUs; cowvm runs one per VM today, so only 1 is accepted.
    #[serde(default = "one")]
    #[schema(default = 1)]
    pub vcpus: u32,
    /// MiB of RAM the guest fills with data before the call returns (a pre-warmed VM).
    #[serde(default)]
    pub warmup_mib: u64,
    /// A kernel file name inside the server's `--kernel-dir`, or null for the built-in guest.
    #[serde(default)]
    pub kernel: Option<String>,
}

fn default_memory_mib() -> u64 {
    256
}

fn one() -> u32 {
    1
}

/// A VM as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct VmInfo {
    /// Id (`vm-N`).
    pub id: String,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// `running` or `failed`.
    pub state: String,
    /// `vm` (booted) or `clone`.
    pub kind: String,
    /// The template a clone came from.
    pub template_id: Option<String>,
    /// Why the VM failed.
    pub failure: Option<String>,
    /// Generation id handed to a clone at its start or last reset.
    pub generation: Option<u64>,
    /// Microseconds from the start of a clone's spawn to its first guest exit.
    pub spawn_us: Option<f64>,
}

/// `POST /v1/vms/{id}/snapshot` answer.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SnapshotCreated {
    /// The new template.
    pub template_id: String,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// Layers of the template (1 for a VM that owned its RAM; more when frozen from a clone).
    pub layers: usize,
    /// Whether it was saved under `--state-dir`.
    pub persisted: bool,
    /// Microseconds the VM was paused.
    pub pause_us: f64,
}

/// A template as the API shows it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TemplateInfo {
    /// Id (`tpl-N`).
    pub id: String,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// Live clones of it.
    pub clones: usize,
    /// Warm VM shells ready for fast clones.
    pub warm_shells: usize,
    /// Layers.
    pub layers: usize,
    /// The VM it was frozen from, if that was in this server's lifetime.
    pub source_vm: Option<String>,
    /// Whether it is saved under `--state-dir`.
    pub persisted: bool,
}

/// `POST /v1/templates/{id}/clones` and `POST /v1/vms/{id}/clones`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CloneRequest {
    /// How many clones (1 up to the server's per-call limit).
    pub count: u64,
}

/// One clone made.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CloneMade {
    /// Its VM id.
    pub id: String,
    /// Microseconds from the start of its spawn to its first guest exit.
    pub spawn_us: f64,
    /// Generation id handed to the guest (r14).
    pub generation: u64,
    /// Random seed handed to the guest (r15).
    pub seed: u64,
    /// Whether it came from a warm shell.
    pub pooled: bool,
}

/// One clone not made.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CloneFailed {
    /// Its position in the request.
    pub index: usize,
    /// Why.
    pub reason: String,
}

/// Answer of a clone call.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ClonesCreated {
    /// The template the clones came from (new, for a live fork).
    pub template_id: String,
    /// Clones made.
    pub clones: Vec<CloneMade>,
    /// Clones not made, with the reason.
    pub failed: Vec<CloneFailed>,
    /// Microseconds for the whole call.
    pub total_us: f64,
    /// For a live fork: microseconds the running VM was paused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pause_us: Option<f64>,
}

/// `POST /v1/vms/{id}/probes/write`: either a list of addresses or a start, count and stride.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum ProbeRequest {
    /// Guest addresses to write, one per page.
    List(ProbeList),
    /// `pages` addresses from `start_gpa`, `stride` bytes apart.
    Range(ProbeRange),
}

/// Probe targets as a list.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProbeList {
    /// Guest addresses (the built-in guest maps virtual = physical).
    pub gpas: Vec<u64>,
}

/// Probe targets as a range.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProbeRange {
    /// First guest address.
    pub start_gpa: u64,
    /// Pages to write.
    pub pages: u64,
    /// Bytes between them (default 4096).
    #[serde(default = "page")]
    pub stride: u64,
}

fn page() -> u64 {
    4096
}

/// `POST /v1/vms/{id}/run`: a command for the built-in guest.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RunCommand {
    /// `exit`, `write`, `checksum`, `identity`, `triple_fault`, `spin` or `halt`.
    pub command: String,
    /// First guest address (`write`, `checksum`).
    #[serde(default)]
    pub start_gpa: u64,
    /// Qwords to touch (`write`, `checksum`).
    #[serde(default)]
    pub count: u64,
    /// Bytes between them (default 8).
    #[serde(default = "eight")]
    pub stride: u64,
    /// Value stored (`write`).
    #[serde(default)]
    pub value: u64,
}

fn eight() -> u64 {
    8
}

/// Answer of a guest command.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RunResult {
    /// Status the guest reported (0 = ok).
    pub status: u32,
    /// rbx: the checksum, or the generation id for `identity`.
    pub result: u64,
    /// rcx: the seed for `identity`.
    pub extra: u64,
    /// Microseconds of the `KVM_RUN`.
    pub run_us: f64,
}

/// Answer of a reset.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ResetDone {
    /// Microseconds for the reset.
    pub reset_us: f64,
    /// Private pages dropped.
    pub pages_dropped: u64,
    /// The clone's new generation id.
    pub generation: u64,
    /// Where the time went.
    #[schema(value_type = Object)]
    pub steps: serde_json::Value,
}

/// `GET /healthz`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Health {
    /// `ok`.
    pub status: String,
    /// Live VMs.
    pub vms: usize,
    /// Templates.
    pub templates: usize,
}

/// `POST /v1/templates/{id}/warm`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WarmRequest {
    /// Warm shells to keep ready for this template (0 stops building more).
    pub shells: u64,
}

/// Answer of `POST /v1/templates/{id}/warm`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct WarmStatus {
    /// The template.
    pub template_id: String,
    /// Shells the server keeps ready from now on.
    pub target: u64,
    /// Shells ready now (the rest are built in the background).
    pub warm_shells: usize,
}
