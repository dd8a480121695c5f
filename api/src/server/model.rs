//! Request and response bodies of the API (their schemas go into `/openapi.json`).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

pub use super::call::{CallRequest, CallResult};
pub use super::export::TemplateImported;
pub use super::reports::{
    CopiedPage, KvmDeltas, KvmStats, Micros, PageCounts, PageProbe, PageState, ProbeReport, ResetSteps, SmapsFigures,
    SpecialPages, Stat, StatValue,
};
use whole::{whole_u32, whole_u64, whole_u64_list};

/// `POST /v1/vms`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateVm {
    /// Guest RAM in MiB (4 up to the server's limit).
    #[serde(default = "default_memory_mib")]
    #[schema(default = 256)]
    #[serde(deserialize_with = "whole_u64")]
    pub memory_mib: u64,
    /// vCPUs, 1 up to the server's `--max-vcpus` (default 8). Every vCPU runs the built-in
    /// guest's command loop; commands name one with `vcpu`.
    #[serde(default = "one")]
    #[schema(default = 1)]
    #[serde(deserialize_with = "whole_u32")]
    pub vcpus: u32,
    /// MiB of RAM the guest fills with data before the call returns (a pre-warmed VM).
    #[serde(default)]
    #[serde(deserialize_with = "whole_u64")]
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
    /// vCPUs of the VM (commands name one of them with `vcpu`).
    pub vcpus: u32,
    /// `running`, `failed`, or `lost` (its cell died; VMs in cells only).
    pub state: String,
    /// `vm` (booted) or `clone`.
    pub kind: String,
    /// The template a clone came from.
    pub template_id: Option<String>,
    /// Why the VM failed, or how it was lost.
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
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CloneRequest {
    /// How many clones (1 up to the server's per-call limit).
    #[serde(deserialize_with = "whole_u64")]
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
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum ProbeRequest {
    /// Guest addresses to write, one per page.
    List(ProbeList),
    /// `pages` addresses from `start_gpa`, `stride` bytes apart.
    Range(ProbeRange),
}

/// Probe targets as a list.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProbeList {
    /// Guest addresses (the built-in guest maps virtual = physical).
    #[serde(deserialize_with = "whole_u64_list")]
    pub gpas: Vec<u64>,
}

/// Probe targets as a range.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProbeRange {
    /// First guest address.
    #[serde(deserialize_with = "whole_u64")]
    pub start_gpa: u64,
    /// Pages to write.
    #[serde(deserialize_with = "whole_u64")]
    pub pages: u64,
    /// Bytes between them (default 4096).
    #[serde(default = "page")]
    #[serde(deserialize_with = "whole_u64")]
    pub stride: u64,
}

fn page() -> u64 {
    4096
}

/// `POST /v1/vms/{id}/run`: a command for the built-in guest.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RunCommand {
    /// `exit`, `write`, `checksum`, `identity`, `triple_fault`, `spin` or `halt`.
    pub command: String,
    /// First guest address (`write`, `checksum`).
    #[serde(default)]
    #[serde(deserialize_with = "whole_u64")]
    pub start_gpa: u64,
    /// Qwords to touch (`write`, `checksum`).
    #[serde(default)]
    #[serde(deserialize_with = "whole_u64")]
    pub count: u64,
    /// Bytes between them (default 8).
    #[serde(default = "eight")]
    #[serde(deserialize_with = "whole_u64")]
    pub stride: u64,
    /// Value stored (`write`).
    #[serde(default)]
    #[serde(deserialize_with = "whole_u64")]
    pub value: u64,
    /// The vCPU that runs the command (0 up to the VM's `vcpus` - 1; default 0).
    #[serde(default)]
    #[serde(deserialize_with = "whole_u32")]
    pub vcpu: u32,
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
    /// For `identity`: the index of the vCPU that ran it, as the guest read it from its own
    /// state (its GS base).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpu: Option<u64>,
    /// Microseconds of the `KVM_RUN`.
    pub run_us: f64,
}

impl RunResult {
    /// The answer for what the VMM's guest command returned after `took` of `KVM_RUN` (in
    /// this process or in a cell alike).
    pub fn new(output: cowvm_vmm::CommandOutput, took: std::time::Duration) -> Self {
        RunResult {
            status: output.status,
            result: output.result,
            extra: output.extra,
            vcpu: output.vcpu,
            run_us: took.as_secs_f64() * 1e6,
        }
    }
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
    pub steps: ResetSteps,
    /// Whether the VM got a warm shell of its template (its used VM is recycled in the
    /// background; `pages_dropped` is then 0) rather than being reset in place.
    pub swapped: bool,
}

impl ResetDone {
    /// The answer for the VMM's report of a reset in this process, with its steps.
    pub fn local(report: &cowvm_vmm::ResetReport) -> Self {
        Self::with_steps(report, report.steps.into())
    }

    /// The answer for the VMM's report of a reset in a cell (its steps are the cell's time).
    pub fn in_cell(report: &cowvm_vmm::ResetReport) -> Self {
        Self::with_steps(
            report,
            ResetSteps::InCell {
                in_cell_us: report.reset_us,
            },
        )
    }

    fn with_steps(report: &cowvm_vmm::ResetReport, steps: ResetSteps) -> Self {
        ResetDone {
            reset_us: report.reset_us,
            pages_dropped: report.pages_dropped,
            generation: report.generation,
            steps,
            swapped: report.swapped,
        }
    }
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
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WarmRequest {
    /// Warm shells to keep ready for this template (0 stops building more).
    #[serde(deserialize_with = "whole_u64")]
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

/// `GET /v1/vms/{id}/stats`: a VM's sharing, read from the host kernel.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct VmStats {
    /// VM id.
    pub id: String,
    /// Page counts.
    pub pages: PageCounts,
    /// The same in bytes.
    pub bytes: PageCounts,
    /// Present pages by the kpagecount of their frame.
    pub kpagecount_histogram: std::collections::BTreeMap<u64, u64>,
    /// Huge and zero pages.
    pub special_pages: SpecialPages,
    /// smaps of the RAM mapping.
    pub smaps: SmapsFigures,
    /// KVM's binary statistics: `vm` and `vcpus`, each by KVM's descriptor names.
    pub kvm: KvmStats,
    /// Time for the scan, microseconds.
    pub scan_us: f64,
}

impl VmStats {
    /// The API view of `sharing` for VM `id`.
    pub fn new(id: String, sharing: cowvm_vmm::stats::VmSharing) -> Self {
        VmStats {
            id,
            pages: sharing.pages,
            bytes: sharing.bytes,
            kpagecount_histogram: sharing.kpagecount_histogram,
            special_pages: sharing.special_pages,
            smaps: sharing.smaps,
            kvm: sharing.kvm,
            scan_us: sharing.scan_us,
        }
    }
}

/// `GET /v1/templates/{id}/stats`: sharing over a template's live clones, read from the host
/// kernel. Only pages clones map count as shared (see docs/api.md).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TemplateStats {
    /// Template id.
    pub id: String,
    /// Live clones (warm shells are not clones).
    pub clones: usize,
    /// Warm shells ready, never counted in `clones` or `histogram`.
    pub warm_shells: usize,
    /// Pages of guest RAM.
    pub pages: u64,
    /// Layers of template memory.
    pub layers: usize,
    /// Pages the template's memory files hold over all layers (`SEEK_DATA`).
    pub populated_pages: u64,
    /// Populated pages by how many live clones map their frame (0 = none); empty keys left out.
    pub histogram: std::collections::BTreeMap<usize, u64>,
    /// Populated pages whose frame every live clone maps (0 without clones).
    pub pages_shared_by_all: u64,
    /// Summed over clones: bytes mapped from template frames.
    pub mapped_bytes: u64,
    /// Summed over clones: private (copied or newly written) bytes.
    pub private_bytes: u64,
    /// Summed over clones: bytes mapping the zero page (read holes).
    pub zero_bytes: u64,
    /// `mapped_bytes` minus the bytes of the distinct template frames mapped.
    pub saved_bytes: u64,
    /// Clones × RAM size: the naive baseline, not a saving.
    pub full_copy_bytes: u64,
    /// Bytes the template's own layer holds (its overlay, or its base).
    pub own_bytes: u64,
    /// Copied pages (up to 4096).
    pub copied_pages: Vec<CopiedPage>,
    /// Whether `copied_pages` was cut short.
    pub copied_pages_truncated: bool,
    /// Time for the scan, microseconds.
    pub scan_us: f64,
}

impl TemplateStats {
    /// The API view of `sharing` for template `id`.
    pub fn new(id: String, s: cowvm_vmm::stats::TemplateSharing) -> Self {
        TemplateStats {
            id,
            clones: s.clones,
            warm_shells: s.warm_shells,
            pages: s.pages,
            layers: s.layers,
            populated_pages: s.populated_pages,
            histogram: s.histogram,
            pages_shared_by_all: s.pages_shared_by_all,
            mapped_bytes: s.mapped_bytes,
            private_bytes: s.private_bytes,
            zero_bytes: s.zero_bytes,
            saved_bytes: s.saved_bytes,
            full_copy_bytes: s.full_copy_bytes,
            own_bytes: s.own_bytes,
            copied_pages: s.copied_pages,
            copied_pages_truncated: s.copied_pages_truncated,
            scan_us: s.scan_us,
        }
    }
}

/// Request integers: JSON has one number type, so `16.0` is the whole number 16 (as JSON Schema's
/// `integer` says); fractions, negatives and values past the type's range are refused.
pub(super) mod whole {
    use serde::de::{Deserializer, Error, Unexpected, Visitor};
    use serde::Deserialize;

    struct WholeVisitor;

    impl Visitor<'_> for WholeVisitor {
        type Value = u64;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a whole number 0..=18446744073709551615")
        }
        fn visit_u64<E: Error>(self, v: u64) -> Result<u64, E> {
            Ok(v)
        }
        fn visit_i64<E: Error>(self, v: i64) -> Result<u64, E> {
            u64::try_from(v).map_err(|_| E::invalid_value(Unexpected::Signed(v), &self))
        }
        fn visit_f64<E: Error>(self, v: f64) -> Result<u64, E> {
            // 2^64 is the first f64 past u64::MAX.
            if v.fract() == 0.0 && (0.0..18_446_744_073_709_551_616.0).contains(&v) {
                Ok(v as u64)
            } else {
                Err(E::invalid_value(Unexpected::Float(v), &self))
            }
        }
    }

    struct Whole(u64);

    impl<'de> Deserialize<'de> for Whole {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_any(WholeVisitor).map(Whole)
        }
    }

    /// A whole number as `u64`.
    pub fn whole_u64<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        d.deserialize_any(WholeVisitor)
    }

    /// A whole number as `u32`.
    pub fn whole_u32<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
        let v = whole_u64(d)?;
        u32::try_from(v).map_err(|_| D::Error::invalid_value(Unexpected::Unsigned(v), &"a whole number 0..=4294967295"))
    }

    /// A list of whole numbers as `u64`s.
    pub fn whole_u64_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u64>, D::Error> {
        Ok(Vec::<Whole>::deserialize(d)?.into_iter().map(|w| w.0).collect())
    }

    #[cfg(test)]
    mod tests {
        use crate::server::model::CreateVm;

        #[test]
        fn test_integral_floats_are_whole_numbers_and_fractions_are_refused() {
            let vm: CreateVm = serde_json::from_str(r#"{"memory_mib": 16.0, "vcpus": 1.0}"#).expect("whole");
            assert_eq!((vm.memory_mib, vm.vcpus), (16, 1));
            for bad in [
                r#"{"memory_mib": 16.5}"#,
                r#"{"memory_mib": -1}"#,
                r#"{"vcpus": 4294967296}"#,
                r#"{"memory_mib": 1e20}"#,
            ] {
                assert!(serde_json::from_str::<CreateVm>(bad).is_err(), "{bad}");
            }
        }
    }
}
