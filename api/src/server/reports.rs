//! Typed answers built from the VMM's reports: the write probe, a reset's steps, smaps figures and
//! KVM's binary statistics. Each mirrors its VMM type key for key (the JSON clients see is
//! unchanged) and adds what the VMM types lack: `Deserialize` for the client and CLI, and a
//! schema for `/openapi.json`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// One page as the host kernel sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PageState {
    /// Mapped in the host.
    pub present: bool,
    /// Page frame number (0 when not present).
    pub pfn: u64,
    /// Mappings of the frame (`/proc/kpagecount`).
    pub kpagecount: u64,
    /// Anonymous (copied on write).
    pub anon: bool,
    /// Mapped only by this process (pagemap bit 56).
    pub exclusive: bool,
    /// The template memfd's page (file/shmem).
    pub file_or_shmem: bool,
    /// On a transparent huge page.
    pub thp: bool,
    /// The zero page.
    pub zero_page: bool,
    /// KSM-merged.
    pub ksm: bool,
}

impl From<cowvm_vmm::probe::PageState> for PageState {
    fn from(s: cowvm_vmm::probe::PageState) -> Self {
        PageState {
            present: s.present,
            pfn: s.pfn,
            kpagecount: s.kpagecount,
            anon: s.anon,
            exclusive: s.exclusive,
            file_or_shmem: s.file_or_shmem,
            thp: s.thp,
            zero_page: s.zero_page,
            ksm: s.ksm,
        }
    }
}

/// What one page went through in a write probe.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PageProbe {
    /// Guest virtual address written.
    pub gva: u64,
    /// Guest physical address it translates to.
    pub gpa: u64,
    /// Host virtual address of that guest page.
    pub hva: u64,
    /// Before the write.
    pub before: PageState,
    /// After it.
    pub after: PageState,
    /// Before the write: `template` (mapped to the template's frame), `zero` (a read hole: the
    /// shared zero page), `untouched` (not mapped yet) or `private` (already a copy).
    pub before_kind: String,
    /// Before the write the page mapped the template's frame.
    pub shared_before: bool,
    /// After it the page is a private anonymous copy mapped only here.
    pub private_after: bool,
    /// `KVM_RUN` time of the first write (with the copy-on-write fault), microseconds.
    pub first_write_us: f64,
    /// `KVM_RUN` time of the same write again, now to a private page, microseconds.
    pub private_write_us: f64,
    /// The difference: this page's own write-fault cost.
    pub write_fault_us: f64,
}

impl From<cowvm_vmm::probe::PageProbe> for PageProbe {
    fn from(p: cowvm_vmm::probe::PageProbe) -> Self {
        PageProbe {
            gva: p.gva,
            gpa: p.gpa,
            hva: p.hva,
            before: p.before.into(),
            after: p.after.into(),
            before_kind: p.before_kind.to_owned(),
            shared_before: p.shared_before,
            private_after: p.private_after,
            first_write_us: p.first_write_us,
            private_write_us: p.private_write_us,
            write_fault_us: p.write_fault_us,
        }
    }
}

/// Median and 99th percentile, microseconds.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
pub struct Micros {
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
}

impl From<cowvm_vmm::probe::Micros> for Micros {
    fn from(m: cowvm_vmm::probe::Micros) -> Self {
        Micros { p50: m.p50, p99: m.p99 }
    }
}

/// Changes of KVM's own counters over a probe (null where KVM does not publish one).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
pub struct KvmDeltas {
    /// vCPU page faults taken.
    pub pf_taken: Option<i64>,
    /// vCPU page faults fixed.
    pub pf_fixed: Option<i64>,
    /// vCPU exits.
    pub exits: Option<i64>,
    /// Instructions emulated.
    pub insn_emulation: Option<i64>,
    /// 4 KiB second-level (shadow or EPT/NPT) mappings of the VM.
    pub pages_4k: Option<i64>,
    /// 2 MiB second-level mappings.
    pub pages_2m: Option<i64>,
}

impl From<cowvm_vmm::probe::KvmDeltas> for KvmDeltas {
    fn from(k: cowvm_vmm::probe::KvmDeltas) -> Self {
        KvmDeltas {
            pf_taken: k.pf_taken,
            pf_fixed: k.pf_fixed,
            exits: k.exits,
            insn_emulation: k.insn_emulation,
            pages_4k: k.pages_4k,
            pages_2m: k.pages_2m,
        }
    }
}

/// `POST /v1/vms/{id}/probes/write`: what each written page went through, from the host kernel.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ProbeReport {
    /// Each page, in the order written.
    pub pages: Vec<PageProbe>,
    /// Pages written.
    pub written: usize,
    /// Pages that were not yet copies before (shared or untouched) and are private copies after.
    pub became_private: usize,
    /// Per-page guest write-fault cost.
    pub guest_cow_us: Micros,
    /// Host-only copy-on-write of fresh pages of another clone of the same template (null for a
    /// booted VM, which has no template).
    pub host_cow_us: Option<Micros>,
    /// KVM counters over the probe.
    pub kvm: KvmDeltas,
    /// The whole probe, microseconds.
    pub total_us: f64,
}

impl From<cowvm_vmm::probe::ProbeReport> for ProbeReport {
    fn from(r: cowvm_vmm::probe::ProbeReport) -> Self {
        ProbeReport {
            pages: r.pages.into_iter().map(PageProbe::from).collect(),
            written: r.written,
            became_private: r.became_private,
            guest_cow_us: r.guest_cow_us.into(),
            host_cow_us: r.host_cow_us.map(Micros::from),
            kvm: r.kvm.into(),
            total_us: r.total_us,
        }
    }
}

/// Where the time of a reset went: the steps of a reset in place, or the time a cell took.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum ResetSteps {
    /// A reset in this process (in place or by swap).
    Local {
        /// Private pages dropped.
        pages_dropped: u64,
        /// Runs (contiguous ranges) they formed.
        runs: usize,
        /// Finding them with `PAGEMAP_SCAN`, microseconds.
        scan_us: f64,
        /// `MADV_DONTNEED` on the runs, microseconds.
        discard_us: f64,
        /// vCPU state and clock restore, microseconds.
        restore_us: f64,
    },
    /// A reset done by the VM's cell (`--cells`).
    InCell {
        /// Microseconds the cell took.
        in_cell_us: f64,
    },
}

impl From<cowvm_vmm::vm::ResetSteps> for ResetSteps {
    fn from(s: cowvm_vmm::vm::ResetSteps) -> Self {
        ResetSteps::Local {
            pages_dropped: s.pages_dropped,
            runs: s.runs,
            scan_us: s.scan_us,
            discard_us: s.discard_us,
            restore_us: s.restore_us,
        }
    }
}

/// smaps figures summed over the mappings of a VM's RAM, in KiB.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SmapsFigures {
    /// Mappings (VMAs) in the range.
    pub vmas: u64,
    /// Resident.
    pub rss_kib: u64,
    /// Anonymous (pages copied on write).
    pub anonymous_kib: u64,
    /// Mapped once and dirty.
    pub private_dirty_kib: u64,
    /// Mapped once and clean.
    pub private_clean_kib: u64,
    /// Mapped more than once and dirty.
    pub shared_dirty_kib: u64,
    /// Mapped more than once and clean.
    pub shared_clean_kib: u64,
}

impl From<cowvm_vmm::host::SmapsFigures> for SmapsFigures {
    fn from(s: cowvm_vmm::host::SmapsFigures) -> Self {
        SmapsFigures {
            vmas: s.vmas,
            rss_kib: s.rss_kib,
            anonymous_kib: s.anonymous_kib,
            private_dirty_kib: s.private_dirty_kib,
            private_clean_kib: s.private_clean_kib,
            shared_dirty_kib: s.shared_dirty_kib,
            shared_clean_kib: s.shared_clean_kib,
        }
    }
}

/// One KVM statistic's value: a counter, or the buckets of a histogram.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum StatValue {
    /// A single number.
    Scalar(u64),
    /// Histogram buckets.
    Histogram(Vec<u64>),
}

/// A KVM statistic as KVM publishes it: its value plus how KVM describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Stat {
    /// `cumulative`, `instant`, `peak`, `linear_hist` or `log_hist`.
    pub kind: String,
    /// `none`, `bytes`, `seconds`, `cycles` or `boolean`.
    pub unit: String,
    /// Power-of-ten or power-of-two exponent of the unit.
    pub exponent: i16,
    /// The value.
    pub value: StatValue,
}

impl From<cowvm_vmm::kvm_stats::Stat> for Stat {
    fn from(s: cowvm_vmm::kvm_stats::Stat) -> Self {
        Stat {
            kind: s.kind.to_owned(),
            unit: s.unit.to_owned(),
            exponent: s.exponent,
            value: match s.value {
                cowvm_vmm::kvm_stats::StatValue::Scalar(v) => StatValue::Scalar(v),
                cowvm_vmm::kvm_stats::StatValue::Histogram(v) => StatValue::Histogram(v),
            },
        }
    }
}

/// KVM's binary statistics of a VM and of each of its vCPUs, by KVM's descriptor names.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct KvmStats {
    /// VM-wide statistics.
    pub vm: BTreeMap<String, Stat>,
    /// Per-vCPU statistics.
    pub vcpus: Vec<BTreeMap<String, Stat>>,
}

fn stats(s: cowvm_vmm::kvm_stats::Stats) -> BTreeMap<String, Stat> {
    s.into_iter().map(|(name, stat)| (name, stat.into())).collect()
}

impl From<cowvm_vmm::kvm_stats::KvmStats> for KvmStats {
    fn from(k: cowvm_vmm::kvm_stats::KvmStats) -> Self {
        KvmStats {
            vm: stats(k.vm),
            vcpus: k.vcpus.into_iter().map(stats).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The typed answers serialise exactly as the VMM's reports did (the JSON clients rely on).
    #[test]
    fn test_typed_reports_keep_the_vmm_json_key_for_key() {
        let steps = cowvm_vmm::vm::ResetSteps {
            pages_dropped: 3,
            runs: 2,
            scan_us: 1.5,
            discard_us: 2.5,
            restore_us: 3.5,
        };
        let ours = serde_json::to_value(ResetSteps::from(steps)).expect("json");
        assert_eq!(ours, serde_json::to_value(steps).expect("json"));
        let back: ResetSteps = serde_json::from_value(ours).expect("round trip");
        assert!(matches!(back, ResetSteps::Local { runs: 2, .. }));
        let cell: ResetSteps = serde_json::from_str(r#"{"in_cell_us": 4.0}"#).expect("cell");
        assert!(matches!(cell, ResetSteps::InCell { in_cell_us } if in_cell_us == 4.0));

        let smaps = cowvm_vmm::host::SmapsFigures {
            vmas: 1,
            rss_kib: 2,
            anonymous_kib: 3,
            private_dirty_kib: 4,
            private_clean_kib: 5,
            shared_dirty_kib: 6,
            shared_clean_kib: 7,
        };
        assert_eq!(
            serde_json::to_value(SmapsFigures::from(smaps)).expect("json"),
            serde_json::to_value(smaps).expect("json")
        );

        let stat = cowvm_vmm::kvm_stats::Stat {
            kind: "cumulative",
            unit: "none",
            exponent: 0,
            value: cowvm_vmm::kvm_stats::StatValue::Histogram(vec![1, 2]),
        };
        let kvm = cowvm_vmm::kvm_stats::KvmStats {
            vm: [("pages_4k".to_owned(), stat.clone())].into(),
            vcpus: vec![[("exits".to_owned(), stat)].into()],
        };
        let ours = serde_json::to_value(KvmStats::from(kvm.clone())).expect("json");
        assert_eq!(ours, serde_json::to_value(&kvm).expect("json"));
        let back: KvmStats = serde_json::from_value(ours).expect("round trip");
        assert_eq!(back.vcpus[0]["exits"].value, StatValue::Histogram(vec![1, 2]));
    }

    #[test]
    fn test_probe_report_keeps_the_vmm_json_key_for_key() {
        use cowvm_vmm::probe as vmm;
        let state = |present, pfn| vmm::PageState {
            present,
            pfn,
            kpagecount: 2,
            anon: !present,
            exclusive: true,
            file_or_shmem: present,
            thp: false,
            zero_page: false,
            ksm: false,
        };
        let report = vmm::ProbeReport {
            pages: vec![vmm::PageProbe {
                gva: 0x80_0000,
                gpa: 0x80_0000,
                hva: 0x7f00_0000_0000,
                before: state(true, 7),
                after: state(false, 9),
                before_kind: "template",
                shared_before: true,
                private_after: true,
                first_write_us: 3.25,
                private_write_us: 1.5,
                write_fault_us: 1.75,
            }],
            written: 1,
            became_private: 1,
            guest_cow_us: vmm::Micros { p50: 1.0, p99: 2.0 },
            host_cow_us: None,
            kvm: vmm::KvmDeltas {
                pf_taken: Some(-1),
                pf_fixed: None,
                exits: Some(4),
                insn_emulation: Some(0),
                pages_4k: None,
                pages_2m: None,
            },
            total_us: 10.5,
        };
        let theirs = serde_json::to_value(&report).expect("json");
        let ours = serde_json::to_value(ProbeReport::from(report)).expect("json");
        assert_eq!(ours, theirs);
        let back: ProbeReport = serde_json::from_value(ours).expect("round trip");
        assert_eq!((back.pages[0].before.pfn, back.kvm.pf_taken), (7, Some(-1)));
    }
}
