//! Sharing statistics, read from the host kernel: per VM, which pages of its RAM are present,
//! still the template's, copied, or never touched (pagemap), how often each frame is mapped
//! (kpagecount), cross-checked against smaps; per template, how many live clones still share
//! each page.

use std::collections::{BTreeMap, HashMap};

use std::time::Instant;

use serde::Serialize;

use crate::host::{smaps_for_range, SmapsFigures};
use crate::kpage::{KPageError, KPages};
use crate::kvm_stats::KvmStats;
use crate::memory::PAGE_SIZE;
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

/// Page counts of one VM's RAM.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PageCounts {
    /// Pages of guest RAM.
    pub total: u64,
    /// Pages mapped in the host (present).
    pub present: u64,
    /// Present pages that are still the template's (a file/shmem page of its memfd).
    pub shared: u64,
    /// Present pages the VM copied on write (anonymous).
    pub private: u64,
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
    /// Present pages by the kpagecount of their frame (how many mappings the frame has).
    pub kpagecount_histogram: BTreeMap<u64, u64>,
    /// Present pages on huge pages or the zero page.
    pub special_pages: SpecialPages,
    /// smaps of the RAM mapping, for cross-checking: private = Anonymous, shared = Rss − private.
    pub smaps: SmapsFigures,
    /// KVM's binary statistics of the VM and its vCPU.
    pub kvm: KvmStats,
    /// Time for the pagemap + kpagecount/kpageflags scan, in microseconds.
    pub scan_us: f64,
}

/// Present pages of special kinds (from `PAGEMAP_SCAN`'s categories).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct SpecialPages {
    /// Mapped by a huge page.
    pub thp: u64,
    /// The shared zero page.
    pub zero_page: u64,
}

fn scale(pages: PageCounts) -> PageCounts {
    PageCounts {
        total: pages.total * PAGE_SIZE,
        present: pages.present * PAGE_SIZE,
        shared: pages.shared * PAGE_SIZE,
        private: pages.private * PAGE_SIZE,
        untouched: pages.untouched * PAGE_SIZE,
    }
}

/// Below this many present pages, a scan runs on one thread.
const PARALLEL_FROM: u64 = 2048;

/// Reads the sharing statistics of `vm` from the kernel: `PAGEMAP_SCAN` for which pages are
/// present and of what kind, then pagemap for the frames of the present runs only and
/// kpagecount for those frames (sorted, coalesced), split over two threads when there are many.
pub fn vm_sharing(vm: &Vm, host: &HostView) -> Result<VmSharing, StatsError> {
    let started = Instant::now();
    let ram = vm.ram();
    let runs = host
        .pagemap
        .present_runs(ram.host_address(), ram.size())
        .map_err(pagemap_err)?;
    let total = ram.size() / PAGE_SIZE;
    let mut pages = PageCounts {
        total,
        ..PageCounts::default()
    };
    let mut special = SpecialPages::default();
    for run in &runs {
        let n = (run.range.end - run.range.start) / PAGE_SIZE;
        pages.present += n;
        if run.file {
            pages.shared += n;
        } else {
            pages.private += n;
        }
        special.thp += if run.huge { n } else { 0 };
        special.zero_page += if run.zero_page { n } else { 0 };
    }
    pages.untouched = total - pages.present;
    let ranges: Vec<std::ops::Range<u64>> = runs.iter().map(|r| r.range.clone()).collect();
    let histogram = if pages.present < PARALLEL_FROM {
        count_histogram(host, &ranges)?
    } else {
        let (low, high) = split_by_pages(&ranges, pages.present / 2);
        let (a, b) = std::thread::scope(|scope| {
            let helper = scope.spawn(|| count_histogram(host, &high));
            (count_histogram(host, &low), helper.join())
        });
        let mut histogram = a?;
        let other = b.map_err(|_| StatsError::Io {
            what: "/proc/kpagecount",
            source: std::io::Error::other("reader thread panicked"),
        })??;
        for (count, n) in other {
            *histogram.entry(count).or_insert(0) += n;
        }
        histogram
    };
    let scan_us = started.elapsed().as_secs_f64() * 1e6;
    let smaps =
        smaps_for_range(ram.host_address(), ram.host_address() + ram.size()).map_err(|source| StatsError::Io {
            what: "/proc/self/smaps",
            source,
        })?;
    Ok(VmSharing {
        pages,
        bytes: scale(pages),
        kpagecount_histogram: histogram,
        special_pages: special,
        smaps,
        kvm: vm.kvm_stats()?,
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

/// The kpagecount histogram of the frames behind `ranges` (present host pages).
fn count_histogram(host: &HostView, ranges: &[std::ops::Range<u64>]) -> Result<BTreeMap<u64, u64>, StatsError> {
    let mut pfns = Vec::new();
    for range in ranges {
        let entries = host
            .pagemap
            .read(range.start, ((range.end - range.start) / PAGE_SIZE) as usize)
            .map_err(pagemap_err)?;
        pfns.extend(entries.iter().filter_map(|e| e.pfn()));
    }
    if pfns.contains(&0) {
        return Err(KPageError::PfnHidden.into());
    }
    pfns.sort_unstable();
    let mut histogram = BTreeMap::new();
    for count in host.kpages.counts(&pfns)? {
        *histogram.entry(count).or_insert(0) += 1;
    }
    Ok(histogram)
}

/// A template page that some clones have copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct CopiedPage {
    /// Guest physical address of the page.
    pub gpa: u64,
    /// Live clones that still share it (have not copied it).
    pub clones_sharing: usize,
}

/// Sharing statistics of a template over its live clones.
#[derive(Debug, Clone, Serialize)]
pub struct TemplateSharing {
    /// Live clones examined.
    pub clones: usize,
    /// Pages of the template.
    pub pages: u64,
    /// Pages by the number of clones that still share them (have not copied them).
    pub histogram: BTreeMap<usize, u64>,
    /// Pages no clone has copied.
    pub pages_shared_by_all: u64,
    /// Bytes the clones copied, all together.
    pub private_bytes: u64,
    /// Bytes saved against every clone holding a full copy of the template's RAM.
    pub saved_bytes: u64,
    /// Copied pages, by address (up to [`MAX_LISTED_PAGES`]); every other page is shared by all.
    pub copied_pages: Vec<CopiedPage>,
    /// Whether `copied_pages` was cut short.
    pub copied_pages_truncated: bool,
    /// Time for the scan, in microseconds.
    pub scan_us: f64,
}

/// For each page of `template`, counts how many of `clones` still share it, from each clone's
/// private pages as the kernel reports them (`PAGEMAP_SCAN`).
pub fn template_sharing(template: &Template, clones: &[&Vm], pagemap: &PageMap) -> Result<TemplateSharing, StatsError> {
    let started = Instant::now();
    let pages = template.size() / PAGE_SIZE;
    let mut copies: HashMap<u64, usize> = HashMap::new();
    let mut private_pages = 0u64;
    for (index, vm) in clones.iter().enumerate() {
        if vm.ram().size() != template.size() || vm.ram().template().is_none() {
            return Err(StatsError::NotAClone { index });
        }
        for run in vm.ram().private_runs(pagemap).map_err(VmError::from)? {
            for page in run.start / PAGE_SIZE..run.end / PAGE_SIZE {
                *copies.entry(page).or_insert(0) += 1;
                private_pages += 1;
            }
        }
    }
    let n = clones.len();
    let mut histogram = BTreeMap::new();
    for &count in copies.values() {
        *histogram.entry(n - count.min(n)).or_insert(0u64) += 1;
    }
    let shared_by_all = pages - copies.len() as u64;
    if n > 0 || shared_by_all > 0 {
        *histogram.entry(n).or_insert(0) += shared_by_all;
    }
    let mut copied: Vec<CopiedPage> = copies
        .iter()
        .map(|(&page, &count)| CopiedPage {
            gpa: page * PAGE_SIZE,
            clones_sharing: n - count.min(n),
        })
        .collect();
    copied.sort_by_key(|c| c.gpa);
    let truncated = copied.len() > MAX_LISTED_PAGES;
    copied.truncate(MAX_LISTED_PAGES);
    let private_bytes = private_pages * PAGE_SIZE;
    Ok(TemplateSharing {
        clones: n,
        pages,
        histogram,
        pages_shared_by_all: shared_by_all,
        private_bytes,
        saved_bytes: (n as u64 * template.size()).saturating_sub(private_bytes),
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
