//! Write probes: the guest writes to chosen pages, one at a time, and for each page the host
//! kernel reports what changed (frame, kpagecount, flags) and the VMM times that page's own
//! copy-on-write fault. Around the probe: KVM's own counters; beside it, a host-only COW baseline.
//!
//! The probe is made of parts that may run in different processes: [`check_targets`] and
//! [`guest_writes`] where the VM lives, [`page_states`] wherever the VM's pagemap can be read with
//! `/proc/kpagecount` (a sandboxed cell cannot), and one [`assemble`] of the report.

use std::borrow::Cow;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress};

use crate::command::GuestCommand;
use crate::kpage::{FrameInfo, KPageError};
use crate::memory::PAGE_SIZE;
use crate::pagemap::PageMapEntry;
use crate::percentile;
use crate::percentile::micros;
use crate::stats::{HostView, StatsError};
use crate::translate::GuestTranslation;
use crate::vm::{Vm, VmError};

/// Most pages one probe may write.
pub const MAX_PROBE_PAGES: u64 = 4096;
/// Deadline for each guest write.
pub const WRITE_DEADLINE: Duration = Duration::from_secs(5);
/// Pages timed for the host-only baseline.
const HOST_BASELINE_PAGES: usize = 16;

/// Which pages to write, as guest virtual addresses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProbeTargets {
    /// These addresses (each on its own page).
    Addresses(Vec<u64>),
    /// `pages` addresses from `start`, `stride` bytes apart.
    Stride {
        /// First address.
        start: u64,
        /// How many.
        pages: u64,
        /// Distance (at least one page, so that each lands on its own page).
        stride: u64,
    },
}

/// Why a probe was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// Nothing to probe, or too much.
    #[error("a probe writes 1 to {MAX_PROBE_PAGES} pages; {0} were asked for")]
    Count(u64),
    /// Two targets share a page (each page's fault is timed on its own).
    #[error("targets {0:#x} and {1:#x} are on the same page; probe targets must be distinct pages")]
    SamePage(u64, u64),
    /// The stride is smaller than a page.
    #[error("stride {0} is smaller than a page (4096 bytes)")]
    Stride(u64),
    /// A VM operation failed (translation, an address outside RAM, the guest stopping…).
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Reading the kernel's view failed.
    #[error(transparent)]
    Stats(#[from] StatsError),
}

impl ProbeTargets {
    /// The addresses, validated: 1..=MAX_PROBE_PAGES of them, each on its own page.
    pub fn addresses(&self) -> Result<Vec<u64>, ProbeError> {
        let addresses = match self {
            ProbeTargets::Addresses(list) => list.clone(),
            ProbeTargets::Stride { start, pages, stride } => {
                if *pages == 0 || *pages > MAX_PROBE_PAGES {
                    return Err(ProbeError::Count(*pages));
                }
                if *stride < PAGE_SIZE {
                    return Err(ProbeError::Stride(*stride));
                }
                (0..*pages)
                    .map(|i| start.saturating_add(i.saturating_mul(*stride)))
                    .collect()
            }
        };
        if addresses.is_empty() || addresses.len() as u64 > MAX_PROBE_PAGES {
            return Err(ProbeError::Count(addresses.len() as u64));
        }
        let mut seen = std::collections::HashMap::new();
        for &a in &addresses {
            if let Some(&other) = seen.get(&(a / PAGE_SIZE)) {
                return Err(ProbeError::SamePage(other, a));
            }
            seen.insert(a / PAGE_SIZE, a);
        }
        Ok(addresses)
    }
}

/// One page as the kernel sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
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

impl PageState {
    fn of(entry: PageMapEntry, frame: Option<&FrameInfo>) -> Self {
        let flags = frame.map(|f| f.flags);
        PageState {
            present: entry.present(),
            pfn: entry.pfn().unwrap_or(0),
            kpagecount: frame.map_or(0, |f| f.kpagecount),
            anon: flags.is_some_and(|f| f.anon),
            exclusive: entry.exclusive(),
            file_or_shmem: entry.present() && entry.file_or_shared(),
            thp: flags.is_some_and(|f| f.thp),
            zero_page: flags.is_some_and(|f| f.zero_page),
            ksm: flags.is_some_and(|f| f.ksm),
        }
    }
}

/// What one page went through.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
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
    pub before_kind: Cow<'static, str>,
    /// Before the write the page mapped the template's frame (present file page, not the zero
    /// page).
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

/// Changes of KVM's own counters over the probe (`None`, null in JSON, where KVM does not publish one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
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

/// Median and 99th percentile, microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
pub struct Micros {
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
}

impl Micros {
    /// Nearest-rank percentiles of `samples`.
    pub fn of(samples: &[f64]) -> Self {
        let sorted = percentile::sorted(samples.iter().copied());
        Micros {
            p50: percentile::nearest_rank(&sorted, 0.5),
            p99: percentile::nearest_rank(&sorted, 0.99),
        }
    }
}

/// The result of a write probe.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
pub struct ProbeReport {
    /// Each page, in the order written.
    pub pages: Vec<PageProbe>,
    /// Pages written.
    pub written: usize,
    /// Pages that were not yet copies before (shared or untouched) and are private copies after.
    pub became_private: usize,
    /// Per-page guest write-fault cost.
    pub guest_cow_us: Micros,
    /// Host-only copy-on-write of fresh pages of another clone of the same template (the VMM
    /// writes them), if a baseline clone was given.
    pub host_cow_us: Option<Micros>,
    /// KVM counters over the probe.
    pub kvm: KvmDeltas,
    /// The whole probe, microseconds.
    pub total_us: f64,
}

/// What the guest's writes measured: each page's two `KVM_RUN` times and KVM's counters over
/// them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuestWrites {
    /// Per page, in the order written: (first write, the same write again), microseconds.
    pub times: Vec<(f64, f64)>,
    /// KVM's counters over the writes.
    pub kvm: KvmDeltas,
}

/// The states of the pages at `gpas` of guest RAM that starts at `host_address` in the process
/// whose pagemap `host` reads (this one, or a cell read by its supervisor).
pub fn page_states(host: &HostView, host_address: u64, gpas: &[u64]) -> Result<Vec<PageState>, ProbeError> {
    let io = |source| StatsError::Io {
        what: "the pagemap of the VM's process",
        source,
    };
    let entries: Vec<PageMapEntry> = gpas
        .iter()
        .map(|gpa| {
            host.pagemap
                .read(host_address + gpa / PAGE_SIZE * PAGE_SIZE, 1)
                .map(|e| e[0])
        })
        .collect::<Result<_, _>>()
        .map_err(io)?;
    let pfns: Vec<u64> = entries.iter().filter_map(|e| e.pfn()).collect();
    if pfns.contains(&0) {
        return Err(StatsError::KPage(KPageError::PfnHidden).into());
    }
    let frames = host.kpages.read(&pfns).map_err(StatsError::from)?;
    Ok(entries
        .iter()
        .map(|e| PageState::of(*e, e.pfn().and_then(|p| frames.get(&p))))
        .collect())
}

/// Times host-only copy-on-write: the VMM writes one qword to each of up to 16 of `gpas` in
/// `baseline` (another clone of the same template, whose pages there are still untouched).
pub fn host_cow_baseline(baseline: &Vm, gpas: &[u64]) -> Result<Micros, ProbeError> {
    let take = gpas.len().min(HOST_BASELINE_PAGES);
    Ok(Micros::of(&host_cow_times(baseline, &gpas[..take])?))
}

/// The time of each host-only copy-on-write: the VMM writes one qword to each page in `gpas`
/// of `vm`, in microseconds per page.
pub fn host_cow_times(vm: &Vm, gpas: &[u64]) -> Result<Vec<f64>, ProbeError> {
    let mem = vm.ram().guest_memory();
    let mut times = Vec::with_capacity(gpas.len());
    for &gpa in gpas {
        let started = Instant::now();
        mem.write_obj(0x0b5e_55ed_u64, GuestAddress(gpa)).map_err(|e| {
            VmError::Memory(crate::memory::MemoryError::Region(format!(
                "host write at {gpa:#x}: {e}"
            )))
        })?;
        times.push(micros(started.elapsed()));
    }
    Ok(times)
}

/// The probe's addresses and their translations, each checked to land on writable guest RAM:
/// the checks [`write_probe`] makes before the guest runs, for callers that want to refuse bad
/// targets before they spend anything (a scratch clone) on the probe.
pub fn check_targets(vm: &mut Vm, targets: &ProbeTargets) -> Result<(Vec<u64>, Vec<GuestTranslation>), ProbeError> {
    let addresses = targets.addresses()?;
    let mut translations = Vec::with_capacity(addresses.len());
    for &gva in &addresses {
        let translation = vm.translate(gva)?;
        // The guest writes through `gva` (validated when it runs); the page it lands on must be
        // writable RAM too.
        GuestCommand::Write {
            start: GuestAddress(translation.gpa & !7),
            count: 1,
            stride: 8,
            value: 0,
        }
        .validate(vm.ram().size(), vm.protected_end())
        .map_err(VmError::from)?;
        translations.push(translation);
    }
    Ok((addresses, translations))
}

/// Has the guest write each of `addresses` (checked by [`check_targets`]) twice, in turn, timing
/// each `KVM_RUN`: the first write takes the page's copy-on-write fault, the second does not.
/// KVM's counters are read around the writes.
pub fn guest_writes(vm: &mut Vm, addresses: &[u64]) -> Result<GuestWrites, ProbeError> {
    let stats_before = vm.kvm_stats()?;
    let mut times = Vec::with_capacity(addresses.len());
    for (i, &gva) in addresses.iter().enumerate() {
        let value = 0x9b0b_e000_0000_0000 | i as u64;
        let write = |value| GuestCommand::Write {
            start: GuestAddress(gva & !7),
            count: 1,
            stride: 8,
            value,
        };
        let (_, first) = vm.execute_timed(write(value), Some(WRITE_DEADLINE))?;
        let (_, again) = vm.execute_timed(write(!value), Some(WRITE_DEADLINE))?;
        times.push((micros(first), micros(again)));
    }
    let stats_after = vm.kvm_stats()?;
    let delta = |name, vcpu| stats_after.delta(&stats_before, name, vcpu);
    Ok(GuestWrites {
        times,
        kvm: KvmDeltas {
            pf_taken: delta("pf_taken", true),
            pf_fixed: delta("pf_fixed", true),
            exits: delta("exits", true),
            insn_emulation: delta("insn_emulation", true),
            pages_4k: delta("pages_4k", false),
            pages_2m: delta("pages_2m", false),
        },
    })
}

/// Everything a probe measured, wherever each part was measured.
#[derive(Debug, Clone)]
pub struct ProbeParts {
    /// The targets' translations (from [`check_targets`]), in the order written.
    pub translations: Vec<GuestTranslation>,
    /// Host virtual address of guest RAM byte 0 in the VM's process.
    pub host_address: u64,
    /// Each page's state before the writes.
    pub before: Vec<PageState>,
    /// And after them.
    pub after: Vec<PageState>,
    /// The writes.
    pub writes: GuestWrites,
    /// The host-only copy-on-write baseline, if one was timed.
    pub host_cow_us: Option<Micros>,
}

/// The report of a probe from its parts; `started` is when the probe began. The per-page parts
/// hold one entry per translation (a caller given parts by another process checks that first).
pub fn assemble(parts: ProbeParts, started: Instant) -> ProbeReport {
    let ProbeParts {
        translations,
        host_address,
        before,
        after,
        writes,
        host_cow_us,
    } = parts;
    let pages: Vec<PageProbe> = translations
        .iter()
        .zip(before.iter().zip(&after))
        .zip(&writes.times)
        .map(|((t, (b, a)), &(first, again))| PageProbe {
            gva: t.gva,
            gpa: t.gpa,
            hva: host_address + t.gpa,
            before: *b,
            after: *a,
            before_kind: Cow::Borrowed(match (b.present, b.zero_page, b.file_or_shmem) {
                (false, _, _) => "untouched",
                (true, true, _) => "zero",
                (true, false, true) => "template",
                (true, false, false) => "private",
            }),
            shared_before: b.present && b.file_or_shmem && !b.zero_page,
            private_after: a.present && a.anon && a.exclusive,
            first_write_us: first,
            private_write_us: again,
            // Two timed runs on a shared, noisy host: a second run slower than the first says
            // nothing about the fault, so the difference is never reported below zero.
            write_fault_us: (first - again).max(0.0),
        })
        .collect();
    let faults: Vec<f64> = pages.iter().map(|p| p.write_fault_us).collect();
    ProbeReport {
        written: pages.len(),
        became_private: pages.iter().filter(|p| !p.before.anon && p.private_after).count(),
        guest_cow_us: Micros::of(&faults),
        host_cow_us,
        kvm: writes.kvm,
        pages,
        total_us: micros(started.elapsed()),
    }
}

/// Runs a write probe on `vm` (which must run cowvm's built-in guest), in this process: check
/// the targets, read the pages' states from the kernel, have the guest write each page twice
/// ([`guest_writes`]), and read the states again. `baseline`, another clone of the same
/// template, gets the host-only COW comparison.
pub fn write_probe(
    vm: &mut Vm,
    targets: &ProbeTargets,
    host: &HostView,
    baseline: Option<&Vm>,
) -> Result<ProbeReport, ProbeError> {
    let started = Instant::now();
    let (addresses, translations) = check_targets(vm, targets)?;
    let gpas: Vec<u64> = translations.iter().map(|t| t.gpa).collect();
    let host_address = vm.ram().host_address();
    let before = page_states(host, host_address, &gpas)?;
    let writes = guest_writes(vm, &addresses)?;
    let after = page_states(host, host_address, &gpas)?;
    let host_cow_us = match baseline {
        Some(other) => Some(host_cow_baseline(other, &gpas)?),
        None => None,
    };
    let parts = ProbeParts {
        translations,
        host_address,
        before,
        after,
        writes,
        host_cow_us,
    };
    Ok(assemble(parts, started))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(present: bool, file: bool, anon: bool, pfn: u64) -> PageState {
        PageState {
            present,
            pfn,
            kpagecount: u64::from(present),
            anon,
            exclusive: anon,
            file_or_shmem: file,
            thp: false,
            zero_page: false,
            ksm: false,
        }
    }

    #[test]
    fn test_assemble_builds_each_page_from_its_parts_and_counts_only_pages_that_became_private() {
        let translations = [0x80_0000u64, 0x80_1000]
            .map(|gpa| GuestTranslation {
                gva: gpa,
                gpa,
                guest_page_size: 2 << 20,
            })
            .to_vec();
        let parts = ProbeParts {
            translations,
            host_address: 0x7f00_0000_0000,
            // A template page that gets copied; a page already private before.
            before: vec![state(true, true, false, 10), state(true, false, true, 20)],
            after: vec![state(true, false, true, 11), state(true, false, true, 20)],
            writes: GuestWrites {
                times: vec![(5.0, 2.0), (1.0, 3.0)],
                kvm: KvmDeltas {
                    pf_taken: Some(1),
                    pf_fixed: Some(1),
                    exits: Some(4),
                    insn_emulation: None,
                    pages_4k: Some(1),
                    pages_2m: Some(0),
                },
            },
            host_cow_us: None,
        };
        let report = assemble(parts, Instant::now());
        assert_eq!((report.written, report.became_private), (2, 1));
        let (first, second) = (&report.pages[0], &report.pages[1]);
        assert_eq!(first.hva, 0x7f00_0080_0000);
        assert_eq!(
            (first.before_kind.as_ref(), second.before_kind.as_ref()),
            ("template", "private")
        );
        assert!(first.shared_before && first.private_after && !second.shared_before);
        assert_eq!(
            (first.write_fault_us, second.write_fault_us),
            (3.0, 0.0),
            "never below zero"
        );
        assert_eq!(report.kvm.exits, Some(4));
        assert!(report.host_cow_us.is_none());
    }
}
