//! Sharing statistics, read from the host kernel: per VM, which pages of its RAM map a template
//! frame, a private copy or the zero page, or are untouched (pagemap, kpageflags), how often each
//! frame is mapped (kpagecount), cross-checked against smaps; per template, how many live clones
//! map each page the template's memfds hold (pagemap + `SEEK_DATA`). A page nobody touched is
//! never counted as shared.

use std::collections::{BTreeMap, HashMap};

use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::host::{smaps_for_range, SmapsFigures};
use crate::kpage::{KPageError, KPages};
use crate::kvm_stats::KvmStats;
use crate::layout::PAGE_SIZE;
use crate::pagemap::PageMap;
use crate::template::Template;
use crate::vm::{Vm, VmError};

/// Most copied pages a template report lists one by one.
pub const MAX_LISTED_PAGES: usize = 4096;

/// Errors while gathering statistics.
#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    /// Page-frame facts are not readable.
    #[error(transparent)]
    KPage(#[from] KPageError),
    /// `/proc/self/pagemap` or smaps could not be read.
    #[error("reading {what} failed: {source}")]
    Io {
        /// Which file.
        what: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// A VM operation failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// A clone is not of this template.
    #[error("VM {index} in the list is not a clone of this template (different RAM size)")]
    NotAClone {
        /// Its position in the list.
        index: usize,
    },
}

/// The kernel files statistics come from, open.
pub struct HostView {
    /// `/proc/self/pagemap`.
    pub pagemap: PageMap,
    /// `/proc/kpagecount` and `/proc/kpageflags`.
    pub kpages: KPages,
}

impl HostView {
    /// Opens the files; fails clearly without the rights to read page frames.
    pub fn open() -> Result<Self, StatsError> {
        let pagemap = PageMap::open().map_err(|source| StatsError::Io {
            what: "/proc/self/pagemap",
            source,
        })?;
        Ok(HostView {
            pagemap,
            kpages: KPages::open()?,
        })
    }
}

/// Page counts of one VM's RAM. `template_backed`, `private`, `zero` and `untouched` split
/// `total`; `shared` counts the present pages whose frame has other mappings too.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
pub struct PageCounts {
    /// Pages of guest RAM.
    pub total: u64,
    /// Pages mapped in the host (present): `template_backed + private + zero`.
    pub present: u64,
    /// Present pages that map a frame of the VM's template memory (pagemap: a file page; the VM
    /// is a clone or a snapshotted VM).
    pub template_backed: u64,
    /// Present pages (not the zero page) whose frame is mapped by at least one other mapping
    /// (kpagecount ≥ 2): another clone, a warm shell, the template's source VM…
    pub shared: u64,
    /// Present pages that are the VM's own: anonymous copies made on write (kpageflags anon), or
    /// for a VM that owns its RAM (never snapshotted), its own memfd's pages.
    pub private: u64,
    /// Present pages that map the host's shared zero page (kpageflags `ZERO_PAGE`): reads of
    /// template holes, which allocate nothing.
    pub zero: u64,
    /// Pages never touched (not present).
    pub untouched: u64,
}

/// Sharing statistics of one VM.
#[derive(Debug, Clone, Serialize)]
pub struct VmSharing {
    /// Page counts.
    pub pages: PageCounts,
    /// The same in bytes.
    pub bytes: PageCounts,
    /// Present pages by the kpagecount of their frame (how many mappings the frame has; the zero
    /// page counts as 0).
    pub kpagecount_histogram: BTreeMap<u64, u64>,
    /// Present pages on huge pages or the zero page.
    pub special_pages: SpecialPages,
    /// smaps of the RAM mapping, for cross-checking: `vmas` is the number of host mappings
    /// behind the RAM, `anonymous_kib` the private copies.
    pub smaps: SmapsFigures,
    /// KVM's binary statistics of the VM and its vCPU.
    pub kvm: KvmStats,
    /// Time for the pagemap + kpagecount/kpageflags scan, in microseconds.
    pub scan_us: f64,
}

/// Present pages of special kinds (from kpageflags).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
pub struct SpecialPages {
    /// Mapped by a huge page.
    pub thp: u64,
    /// The shared zero page (the same as `pages.zero`).
    pub zero_page: u64,
}

fn scale(pages: PageCounts) -> PageCounts {
    PageCounts {
        total: pages.total * PAGE_SIZE,
        present: pages.present * PAGE_SIZE,
        template_backed: pages.template_backed * PAGE_SIZE,
        shared: pages.shared * PAGE_SIZE,
        private: pages.private * PAGE_SIZE,
        zero: pages.zero * PAGE_SIZE,
        untouched: pages.untouched * PAGE_SIZE,
    }
}

/// Below this many present pages, a scan runs on one thread.
const PARALLEL_FROM: u64 = 2048;

/// What the kernel says about the present pages of some ranges.
#[derive(Default)]
struct Tally {
    pages: PageCounts,
    histogram: BTreeMap<u64, u64>,
    thp: u64,
}

impl Tally {
    fn add(&mut self, other: Tally) {
        let (a, b) = (&mut self.pages, other.pages);
        a.present += b.present;
        a.template_backed += b.template_backed;
        a.shared += b.shared;
        a.private += b.private;
        a.zero += b.zero;
        for (count, n) in other.histogram {
            *self.histogram.entry(count).or_insert(0) += n;
        }
        self.thp += other.thp;
    }
}

/// Reads the sharing statistics of `vm` from the kernel: `PAGEMAP_SCAN` for which pages are
/// present, then pagemap for the frames of the present runs only and kpagecount + kpageflags
/// for those frames (sorted, coalesced), split over two threads when there are many.
pub fn vm_sharing(vm: &Vm, host: &HostView) -> Result<VmSharing, StatsError> {
    let ram = vm.ram();
    let region = RamRegion {
        host_address: ram.host_address(),
        size: ram.size(),
        from_template: ram.template().is_some(),
        pid: None,
    };
    region_sharing(&region, host, vm.kvm_stats()?)
}

/// Guest RAM of a VM as the host sees it: where it is mapped, in which process.
#[derive(Debug, Clone, Copy)]
pub struct RamRegion {
    /// Host virtual address of guest RAM byte 0.
    pub host_address: u64,
    /// Bytes.
    pub size: u64,
    /// Whether it maps a template (a clone) rather than memory of its own.
    pub from_template: bool,
    /// The process that maps it (`None`: this one); `host.pagemap` must be that process's.
    pub pid: Option<u32>,
}

/// Like [`vm_sharing`] for RAM described by `region` (e.g. a VM in another process, with
/// `host.pagemap` opened by [`PageMap::open_process`] and `kvm` read from its stats fds).
pub fn region_sharing(region: &RamRegion, host: &HostView, kvm: KvmStats) -> Result<VmSharing, StatsError> {
    let started = Instant::now();
    let (hva, size, from_template) = (region.host_address, region.size, region.from_template);
    let runs = host.pagemap.present_runs(hva, size).map_err(pagemap_err)?;
    let present: u64 = runs.iter().map(|r| (r.range.end - r.range.start) / PAGE_SIZE).sum();
    let ranges: Vec<std::ops::Range<u64>> = runs.iter().map(|r| r.range.clone()).collect();
    let tally = if present < PARALLEL_FROM {
        tally(host, &ranges, from_template)?
    } else {
        let (low, high) = split_by_pages(&ranges, present / 2);
        let (a, b) = std::thread::scope(|scope| {
            let helper = scope.spawn(|| tally(host, &high, from_template));
            (tally(host, &low, from_template), helper.join())
        });
        let mut tally = a?;
        tally.add(b.map_err(|_| StatsError::Io {
            what: "/proc/kpagecount",
            source: std::io::Error::other("reader thread panicked"),
        })??);
        tally
    };
    let total = size / PAGE_SIZE;
    let pages = PageCounts {
        total,
        untouched: total - tally.pages.present.min(total),
        ..tally.pages
    };
    let scan_us = started.elapsed().as_secs_f64() * 1e6;
    let smaps = match region.pid {
        None => smaps_for_range(hva, hva + size),
        Some(pid) => crate::host::process_smaps_for_range(pid, hva, hva + size),
    }
    .map_err(|source| StatsError::Io { what: "smaps", source })?;
    Ok(VmSharing {
        pages,
        bytes: scale(pages),
        kpagecount_histogram: tally.histogram,
        special_pages: SpecialPages {
            thp: tally.thp,
            zero_page: pages.zero,
        },
        smaps,
        kvm,
        scan_us,
    })
}

fn pagemap_err(source: std::io::Error) -> StatsError {
    StatsError::Io {
        what: "/proc/self/pagemap",
        source,
    }
}

/// Splits host address ranges into two lists, the first holding about `pages` pages.
fn split_by_pages(
    ranges: &[std::ops::Range<u64>],
    pages: u64,
) -> (Vec<std::ops::Range<u64>>, Vec<std::ops::Range<u64>>) {
    let mut low = Vec::new();
    let mut high = Vec::new();
    let mut left = pages * PAGE_SIZE;
    for range in ranges {
        let len = range.end - range.start;
        if left >= len {
            low.push(range.clone());
            left -= len;
        } else if left > 0 {
            low.push(range.start..range.start + left);
            high.push(range.start + left..range.end);
            left = 0;
        } else {
            high.push(range.clone());
        }
    }
    (low, high)
}

/// Classifies the present pages behind `ranges` (host addresses) by pagemap, kpagecount and
/// kpageflags. `from_template`: the RAM's file pages are template frames (else the VM's own).
fn tally(host: &HostView, ranges: &[std::ops::Range<u64>], from_template: bool) -> Result<Tally, StatsError> {
    let mut pages = Vec::new();
    for range in ranges {
        let entries = host
            .pagemap
            .read(range.start, ((range.end - range.start) / PAGE_SIZE) as usize)
            .map_err(pagemap_err)?;
        pages.extend(
            entries
                .iter()
                .filter_map(|e| e.pfn().map(|pfn| (pfn, e.file_or_shared()))),
        );
    }
    if pages.iter().any(|&(pfn, _)| pfn == 0) {
        return Err(KPageError::PfnHidden.into());
    }
    let pfns: Vec<u64> = pages.iter().map(|&(pfn, _)| pfn).collect();
    let frames = host.kpages.read(&pfns)?;
    let mut tally = Tally::default();
    for (pfn, file) in pages {
        let Some(frame) = frames.get(&pfn) else { continue };
        let counts = &mut tally.pages;
        counts.present += 1;
        *tally.histogram.entry(frame.kpagecount).or_insert(0) += 1;
        tally.thp += u64::from(frame.flags.thp);
        if frame.flags.zero_page {
            counts.zero += 1;
            continue;
        }
        counts.shared += u64::from(frame.kpagecount >= 2);
        if file && from_template {
            counts.template_backed += 1;
        } else {
            counts.private += 1;
        }
    }
    Ok(tally)
}

/// A template page that some clones have copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
pub struct CopiedPage {
    /// Guest physical address of the page.
    pub gpa: u64,
    /// Live clones holding a private copy of it.
    pub clones_copied: usize,
    /// Live clones that map the template's frame at this address right now.
    pub clones_mapping: usize,
}

/// Sharing statistics of a template over its live clones, read from the kernel. Only pages
/// somebody actually maps count as shared; see docs/api.md for how each figure is read.
#[derive(Debug, Clone, Serialize)]
pub struct TemplateSharing {
    /// Live clones examined (warm shells are not clones).
    pub clones: usize,
    /// Warm shells ready for the template (never counted in `clones` or `histogram`).
    pub warm_shells: usize,
    /// Pages of guest RAM (the template's size in pages).
    pub pages: u64,
    /// Layers of template memory (1, or more for a template frozen from a clone).
    pub layers: usize,
    /// Pages the template's memory files hold, over all layers (`SEEK_DATA`/`SEEK_HOLE` now).
    pub populated_pages: u64,
    /// For each populated page, how many live clones map its frame now: key = clones (0 =
    /// populated but mapped by no clone), value = pages. Keys with no pages are left out.
    pub histogram: BTreeMap<usize, u64>,
    /// Populated pages whose frame every live clone maps (0 without clones).
    pub pages_shared_by_all: u64,
    /// Summed over live clones: bytes they map from template frames.
    pub mapped_bytes: u64,
    /// Summed over live clones: their private bytes (pages copied on write or newly written).
    pub private_bytes: u64,
    /// Summed over live clones: bytes of their RAM that map the zero page (read holes).
    pub zero_bytes: u64,
    /// `mapped_bytes` minus the bytes of the distinct template frames they map: what the clones
    /// would hold in addition if each had its own copy of what it maps.
    pub saved_bytes: u64,
    /// Clones × RAM size: the naive baseline of full copies (not a saving).
    pub full_copy_bytes: u64,
    /// Bytes the template's own layer holds (its overlay for a layered template, else its base).
    pub own_bytes: u64,
    /// Copied pages, by address (up to [`MAX_LISTED_PAGES`]).
    pub copied_pages: Vec<CopiedPage>,
    /// Whether `copied_pages` was cut short.
    pub copied_pages_truncated: bool,
    /// Time for the scan, in microseconds.
    pub scan_us: f64,
}

/// What the clones of a template map, page by page.
#[derive(Default)]
struct CloneScan {
    /// Template frame → (its page index, clones mapping it).
    frames: HashMap<u64, (u64, usize)>,
    /// Page index → clones holding a private copy.
    copies: HashMap<u64, usize>,
    mapped_pages: u64,
    private_pages: u64,
    zero_pages: u64,
}

impl CloneScan {
    /// Adds one clone's present pages (`PAGEMAP_SCAN`, then pagemap for the template frames).
    fn add(&mut self, clone: &CloneRam<'_>) -> Result<(), StatsError> {
        let (base, pagemap) = (clone.host_address, clone.pagemap);
        for run in pagemap.present_runs(base, clone.size).map_err(pagemap_err)? {
            let first = (run.range.start - base) / PAGE_SIZE;
            let n = (run.range.end - run.range.start) / PAGE_SIZE;
            if run.zero_page {
                self.zero_pages += n;
            } else if !run.file {
                self.private_pages += n;
                for page in first..first + n {
                    *self.copies.entry(page).or_insert(0) += 1;
                }
            } else {
                let entries = pagemap.read(run.range.start, n as usize).map_err(pagemap_err)?;
                for (page, entry) in (first..).zip(entries) {
                    let Some(pfn) = entry.pfn() else { continue };
                    if pfn == 0 {
                        return Err(KPageError::PfnHidden.into());
                    }
                    self.mapped_pages += 1;
                    self.frames.entry(pfn).or_insert((page, 0)).1 += 1;
                }
            }
        }
        Ok(())
    }
}

/// For each populated page of `template`, counts how many of `clones` map its frame, from each
/// clone's page tables (`PAGEMAP_SCAN` + pagemap) and the template's memfds (`SEEK_DATA`).
pub fn template_sharing(
    template: &Template,
    clones: &[&Vm],
    warm_shells: usize,
    pagemap: &PageMap,
) -> Result<TemplateSharing, StatsError> {
    let mut rams = Vec::with_capacity(clones.len());
    for (index, vm) in clones.iter().enumerate() {
        if vm.ram().size() != template.size() || vm.ram().template().is_none() {
            return Err(StatsError::NotAClone { index });
        }
        rams.push(CloneRam {
            host_address: vm.ram().host_address(),
            size: vm.ram().size(),
            pagemap,
        });
    }
    template_sharing_of(template, &rams, warm_shells)
}

/// The RAM of one clone of a template as the host sees it: where it is mapped, and the pagemap
/// of the process that maps it (this one, or a cell's).
#[derive(Clone, Copy)]
pub struct CloneRam<'a> {
    /// Host virtual address of guest RAM byte 0 in that process.
    pub host_address: u64,
    /// Bytes (the template's size).
    pub size: u64,
    /// That process's pagemap.
    pub pagemap: &'a PageMap,
}

/// Like [`template_sharing`] over clones given by where their RAM is mapped, in any process
/// (frames are the host's, so clones in several processes count together).
pub fn template_sharing_of(
    template: &Template,
    clones: &[CloneRam<'_>],
    warm_shells: usize,
) -> Result<TemplateSharing, StatsError> {
    let started = Instant::now();
    let memory = template.memory();
    let mut scan = CloneScan::default();
    for (index, clone) in clones.iter().enumerate() {
        if clone.size != template.size() {
            return Err(StatsError::NotAClone { index });
        }
        scan.add(clone)?;
    }
    let extents_err = |source| StatsError::Io {
        what: "the template memfd (SEEK_DATA)",
        source,
    };
    let mut populated_bytes = 0;
    for layer in memory.layers() {
        populated_bytes += layer.populated_bytes().map_err(extents_err)?;
    }
    let populated_pages = populated_bytes / PAGE_SIZE;
    let n = clones.len();
    let mut histogram: BTreeMap<usize, u64> = BTreeMap::new();
    for &(_, count) in scan.frames.values() {
        *histogram.entry(count).or_insert(0) += 1;
    }
    let unmapped = populated_pages.saturating_sub(scan.frames.len() as u64);
    if unmapped > 0 {
        histogram.insert(0, unmapped);
    }
    let mapping_at: HashMap<u64, usize> = scan.frames.values().copied().collect();
    let mut copied: Vec<CopiedPage> = scan
        .copies
        .iter()
        .map(|(&page, &count)| CopiedPage {
            gpa: page * PAGE_SIZE,
            clones_copied: count,
            clones_mapping: mapping_at.get(&page).copied().unwrap_or(0),
        })
        .collect();
    copied.sort_by_key(|c| c.gpa);
    let truncated = copied.len() > MAX_LISTED_PAGES;
    copied.truncate(MAX_LISTED_PAGES);
    Ok(TemplateSharing {
        clones: n,
        warm_shells,
        pages: template.size() / PAGE_SIZE,
        layers: memory.depth(),
        populated_pages,
        pages_shared_by_all: if n > 0 {
            histogram.get(&n).copied().unwrap_or(0)
        } else {
            0
        },
        histogram,
        mapped_bytes: scan.mapped_pages * PAGE_SIZE,
        private_bytes: scan.private_pages * PAGE_SIZE,
        zero_bytes: scan.zero_pages * PAGE_SIZE,
        saved_bytes: (scan.mapped_pages - scan.frames.len() as u64) * PAGE_SIZE,
        full_copy_bytes: n as u64 * template.size(),
        own_bytes: memory.own_layer().populated_bytes().map_err(extents_err)?,
        copied_pages: copied,
        copied_pages_truncated: truncated,
        scan_us: started.elapsed().as_secs_f64() * 1e6,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_split_by_pages_cuts_a_range_where_the_count_falls() {
        let ranges = vec![0..4 * PAGE_SIZE, 10 * PAGE_SIZE..14 * PAGE_SIZE];
        let (low, high) = split_by_pages(&ranges, 5);
        assert_eq!(low, vec![0..4 * PAGE_SIZE, 10 * PAGE_SIZE..11 * PAGE_SIZE]);
        assert_eq!(high, vec![11 * PAGE_SIZE..14 * PAGE_SIZE]);
    }
}
