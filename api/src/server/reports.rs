//! The VMM's reports as API answers: the write probe, page counts, smaps figures and KVM's binary
//! statistics are the VMM's own types (with the `schema` feature they derive `ToSchema` and
//! `Deserialize`), so the server, the client, the CLI and `/openapi.json` share one definition.
//! Only a reset's steps need a type of their own here: a reset in a cell reports only its time.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

pub use cowvm_vmm::host::SmapsFigures;
pub use cowvm_vmm::kvm_stats::{KvmStats, Stat, StatValue};
pub use cowvm_vmm::probe::{KvmDeltas, Micros, PageProbe, PageState, ProbeReport};
pub use cowvm_vmm::stats::{CopiedPage, PageCounts, SpecialPages};

/// Where the time of a reset went: the steps of a reset in place, or the time a cell took.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum ResetSteps {
    // The doc comment sits on the field: on the variant it would wrap the inlined schema in a
    // one-item `oneOf` in `/openapi.json`.
    Local(
        /// A reset in this process (in place or by swap).
        #[schema(inline)]
        cowvm_vmm::vm::ResetSteps,
    ),
    /// A reset done by the VM's cell (`--cells`).
    InCell {
        /// Microseconds the cell took.
        in_cell_us: f64,
    },
}

impl From<cowvm_vmm::vm::ResetSteps> for ResetSteps {
    fn from(steps: cowvm_vmm::vm::ResetSteps) -> Self {
        ResetSteps::Local(steps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reset's steps keep the VMM's keys, and the client tells a local reset from a cell's.
    #[test]
    fn test_reset_steps_keep_the_vmm_json_and_read_back_either_kind() {
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
        assert!(matches!(back, ResetSteps::Local(s) if s.runs == 2 && s.pages_dropped == 3));
        let cell: ResetSteps = serde_json::from_str(r#"{"in_cell_us": 4.0}"#).expect("cell");
        assert!(matches!(cell, ResetSteps::InCell { in_cell_us } if in_cell_us == 4.0));
    }

    /// KVM statistics and smaps figures read back from their JSON unchanged (the client's view).
    #[test]
    fn test_kvm_stats_and_smaps_round_trip_through_json() {
        let smaps = SmapsFigures {
            vmas: 1,
            rss_kib: 2,
            anonymous_kib: 3,
            private_dirty_kib: 4,
            private_clean_kib: 5,
            shared_dirty_kib: 6,
            shared_clean_kib: 7,
        };
        let json = serde_json::to_value(smaps).expect("json");
        assert_eq!(json["shared_clean_kib"], 7);
        assert_eq!(serde_json::from_value::<SmapsFigures>(json).expect("round trip"), smaps);

        let stat = Stat {
            kind: "cumulative".into(),
            unit: "none".into(),
            exponent: 0,
            value: StatValue::Histogram(vec![1, 2]),
        };
        let kvm = KvmStats {
            vm: [(
                "pages_4k".to_owned(),
                Stat {
                    value: StatValue::Scalar(9),
                    ..stat.clone()
                },
            )]
            .into(),
            vcpus: vec![[("exits".to_owned(), stat)].into()],
        };
        let json = serde_json::to_value(&kvm).expect("json");
        assert_eq!(json["vm"]["pages_4k"]["value"], 9, "a scalar is a bare number");
        assert_eq!(json["vcpus"][0]["exits"]["kind"], "cumulative");
        let back: KvmStats = serde_json::from_value(json).expect("round trip");
        assert_eq!((back.vm, back.vcpus), (kvm.vm, kvm.vcpus));
    }

    /// A write probe's report reads back from its JSON key for key.
    #[test]
    fn test_probe_report_round_trips_through_json() {
        let state = |present, pfn| PageState {
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
        let report = ProbeReport {
            pages: vec![PageProbe {
                gva: 0x80_0000,
                gpa: 0x80_0000,
                hva: 0x7f00_0000_0000,
                before: state(true, 7),
                after: state(false, 9),
                before_kind: "template".into(),
                shared_before: true,
                private_after: true,
                first_write_us: 3.25,
                private_write_us: 1.5,
                write_fault_us: 1.75,
            }],
            written: 1,
            became_private: 1,
            guest_cow_us: Micros { p50: 1.0, p99: 2.0 },
            host_cow_us: None,
            kvm: KvmDeltas {
                pf_taken: Some(-1),
                pf_fixed: None,
                exits: Some(4),
                insn_emulation: Some(0),
                pages_4k: None,
                pages_2m: None,
            },
            total_us: 10.5,
        };
        let json = serde_json::to_value(&report).expect("json");
        assert_eq!(json["pages"][0]["before_kind"], "template");
        assert!(json["host_cow_us"].is_null() && json["kvm"]["pf_fixed"].is_null());
        let back: ProbeReport = serde_json::from_value(json.clone()).expect("round trip");
        assert_eq!((back.pages[0].before.pfn, back.kvm.pf_taken), (7, Some(-1)));
        assert_eq!(serde_json::to_value(&back).expect("json"), json);
    }
}
