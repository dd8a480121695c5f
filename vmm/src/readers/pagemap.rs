//! What the host kernel maps behind a range of our address space, from `/proc/self/pagemap`
//! (see the kernel's `Documentation/admin-guide/mm/pagemap.rst`).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use crate::layout::PAGE_SIZE;

/// Entries read per `pread` (512 KiB of pagemap).
const CHUNK_ENTRIES: usize = 64 * 1024;

const PFN_MASK: u64 = (1 << 55) - 1;
const EXCLUSIVE: u64 = 1 << 56;
const FILE_OR_SHARED_ANON: u64 = 1 << 61;
const SWAPPED: u64 = 1 << 62;
const PRESENT: u64 = 1 << 63;

/// One page's pagemap entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageMapEntry(pub u64);

impl PageMapEntry {
    /// A page is mapped here.
    pub fn present(self) -> bool {
        self.0 & PRESENT != 0
    }
    /// The page is file-backed or shared anonymous (a memfd's page cache page, for our RAM).
    pub fn file_or_shared(self) -> bool {
        self.0 & FILE_OR_SHARED_ANON != 0
    }
    /// The page is mapped only by this process.
    pub fn exclusive(self) -> bool {
        self.0 & EXCLUSIVE != 0
    }
    /// The page frame number: `None` when not present, 0 without CAP_SYS_ADMIN.
    pub fn pfn(self) -> Option<u64> {
        self.present().then_some(self.0 & PFN_MASK)
    }
    /// The page is swapped out, or its entry is a migration entry (the kernel reports both as
    /// swap entries; a file page's migration entry also has the file bit).
    pub fn swapped(self) -> bool {
        self.0 & SWAPPED != 0
    }
    /// A private anonymous page that is present and not the file's page. In a `MAP_PRIVATE`
    /// mapping of a memfd this is a page the process copied on write and still has in RAM.
    pub fn private_anonymous(self) -> bool {
        self.present() && !self.file_or_shared()
    }
    /// A page the process copied on write, wherever it is now: present or swapped out (or being
    /// migrated), and not the file's page. Reset and layered freeze must select these; a copy
    /// that is swapped out still holds the clone's data.
    pub fn private_copy(self) -> bool {
        (self.present() || self.swapped()) && !self.file_or_shared()
    }
}

/// `/proc/self/pagemap`, open.
pub struct PageMap {
    file: File,
}

impl PageMap {
    /// Opens this process's pagemap.
    pub fn open() -> io::Result<Self> {
        Ok(PageMap {
            file: File::open("/proc/self/pagemap")?,
        })
    }

    /// Opens the pagemap of process `pid` (needs ptrace-read access to it, e.g. root): a
    /// supervisor reads the memory of the VMs its cells hold this way.
    pub fn open_process(pid: u32) -> io::Result<Self> {
        Ok(PageMap {
            file: File::open(format!("/proc/{pid}/pagemap"))?,
        })
    }

    /// Entries for `pages` pages from host virtual address `hva` (page aligned), read in chunks of
    /// up to 64k entries per `pread`.
    pub fn read(&self, hva: u64, pages: usize) -> io::Result<Vec<PageMapEntry>> {
        let mut entries = Vec::with_capacity(pages);
        let mut buffer = vec![0u8; CHUNK_ENTRIES.min(pages) * 8];
        let first = hva / PAGE_SIZE;
        while entries.len() < pages {
            let n = CHUNK_ENTRIES.min(pages - entries.len());
            let bytes = &mut buffer[..n * 8];
            self.file.read_exact_at(bytes, (first + entries.len() as u64) * 8)?;
            entries.extend(
                bytes
                    .chunks_exact(8)
                    .map(|b| PageMapEntry(u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))),
            );
        }
        Ok(entries)
    }
}

/// `PAGEMAP_SCAN` (Linux 6.7+): `_IOWR('f', 16, struct pm_scan_arg)`.
const PAGEMAP_SCAN: libc::c_ulong = 0xc060_6610;
const PAGE_IS_FILE: u64 = 1 << 2;
const PAGE_IS_PRESENT: u64 = 1 << 3;
const PAGE_IS_SWAPPED: u64 = 1 << 4;
const PAGE_IS_PFNZERO: u64 = 1 << 5;
const PAGE_IS_HUGE: u64 = 1 << 6;
/// Regions returned per `PAGEMAP_SCAN` call.
const SCAN_REGIONS: usize = 512;

/// Which pages a `PAGEMAP_SCAN` selects, in the kernel's terms: a page's categories are XORed
/// with `inverted`, then must contain every bit of `mask` and, if `anyof` is not zero, at least
/// one bit of `anyof` (`pagemap_scan_is_interesting_page` in `fs/proc/task_mmu.c`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ScanFilter {
    inverted: u64,
    mask: u64,
    anyof: u64,
    returned: u64,
}

impl ScanFilter {
    /// Copies made on write: neither the file's page nor the shared zero page, and present or
    /// swapped out (a swapped-out copy, or one under migration, still holds the VM's data).
    const PRIVATE_COPIES: ScanFilter = ScanFilter {
        inverted: PAGE_IS_FILE | PAGE_IS_PFNZERO,
        mask: PAGE_IS_FILE | PAGE_IS_PFNZERO,
        anyof: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
        returned: PAGE_IS_FILE | PAGE_IS_PFNZERO,
    };

    /// Present pages, reported with what the kernel says of them.
    const PRESENT: ScanFilter = ScanFilter {
        inverted: 0,
        mask: PAGE_IS_PRESENT,
        anyof: 0,
        returned: PAGE_IS_FILE | PAGE_IS_HUGE | PAGE_IS_PFNZERO,
    };

    /// Whether the kernel selects a page with `categories` under this filter.
    #[cfg(test)]
    fn selects(self, categories: u64) -> bool {
        let categories = categories ^ self.inverted;
        categories & self.mask == self.mask && (self.anyof == 0 || categories & self.anyof != 0)
    }
}

/// `struct pm_scan_arg` from `<linux/fs.h>`.
#[repr(C)]
#[derive(Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// `struct page_region` from `<linux/fs.h>`.
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

impl PageMap {
    /// The runs of pages the VM wrote: copies made on write, present or swapped out (see
    /// [`PageMapEntry::private_copy`]), neither the file's page nor the shared zero page that a
    /// read of an anonymous hole maps, in `hva..hva + len`, as sorted, merged host address
    /// ranges. Uses `PAGEMAP_SCAN`, whose cost
    /// follows the populated page tables rather than the range's size; falls back to reading
    /// pagemap entries on kernels without it. Overlapping or duplicate regions (which the kernel
    /// can return) are merged.
    pub fn private_runs(&self, hva: u64, len: u64) -> io::Result<Vec<std::ops::Range<u64>>> {
        match self.scan_private(hva, len) {
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTTY) | Some(libc::EINVAL)) => {
                self.read_private(hva, len)
            }
            other => other,
        }
    }

    fn scan_private(&self, hva: u64, len: u64) -> io::Result<Vec<std::ops::Range<u64>>> {
        let regions = self.scan(hva, len, ScanFilter::PRIVATE_COPIES)?;
        Ok(merge_runs(regions.into_iter().map(|r| r.start..r.end).collect()))
    }

    /// Runs `PAGEMAP_SCAN` over `hva..hva + len` until the whole range is walked.
    fn scan(&self, hva: u64, len: u64, filter: ScanFilter) -> io::Result<Vec<PageRegion>> {
        use std::os::fd::AsRawFd;
        let end = hva + len;
        let mut regions = vec![PageRegion::default(); SCAN_REGIONS];
        let mut found = Vec::new();
        let mut start = hva;
        while start < end {
            let mut arg = PmScanArg {
                size: std::mem::size_of::<PmScanArg>() as u64,
                start,
                end,
                vec: regions.as_mut_ptr() as u64,
                vec_len: SCAN_REGIONS as u64,
                category_inverted: filter.inverted,
                category_mask: filter.mask,
                category_anyof_mask: filter.anyof,
                return_mask: filter.returned,
                ..Default::default()
            };
            // SAFETY: `arg` is a valid pm_scan_arg whose `vec` points at `SCAN_REGIONS` writable
            // page_region entries that outlive the call; the kernel writes at most `vec_len`.
            let n = unsafe { libc::ioctl(self.file.as_raw_fd(), PAGEMAP_SCAN as _, &mut arg) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            found.extend_from_slice(&regions[..n as usize]);
            if arg.walk_end <= start {
                break;
            }
            start = arg.walk_end;
        }
        Ok(found)
    }

    /// The present pages of `hva..hva + len` as runs with what the kernel says of them, from
    /// `PAGEMAP_SCAN` (sorted, duplicates removed, overlaps clipped).
    pub fn present_runs(&self, hva: u64, len: u64) -> io::Result<Vec<PresentRun>> {
        let mut regions = self.scan(hva, len, ScanFilter::PRESENT)?;
        regions.sort_by_key(|r| (r.start, r.end));
        let mut runs: Vec<PresentRun> = Vec::with_capacity(regions.len());
        for r in regions {
            let start = runs.last().map_or(r.start, |last| r.start.max(last.range.end));
            if start >= r.end {
                continue;
            }
            runs.push(PresentRun {
                range: start..r.end,
                file: r.categories & PAGE_IS_FILE != 0,
                huge: r.categories & PAGE_IS_HUGE != 0,
                zero_page: r.categories & PAGE_IS_PFNZERO != 0,
            });
        }
        Ok(runs)
    }

    fn read_private(&self, hva: u64, len: u64) -> io::Result<Vec<std::ops::Range<u64>>> {
        let entries = self.read(hva, (len / PAGE_SIZE) as usize)?;
        let runs = entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.private_copy())
            .map(|(i, _)| {
                let page = hva + i as u64 * PAGE_SIZE;
                page..page + PAGE_SIZE
            })
            .collect();
        Ok(merge_runs(runs))
    }
}

/// A run of present pages that the kernel reports alike.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresentRun {
    /// Host virtual addresses.
    pub range: std::ops::Range<u64>,
    /// The file's (template memfd's) pages, not anonymous copies.
    pub file: bool,
    /// Mapped by a huge page.
    pub huge: bool,
    /// The zero page.
    pub zero_page: bool,
}

/// Sorts ranges and merges the ones that overlap or touch.
pub fn merge_runs(mut runs: Vec<std::ops::Range<u64>>) -> Vec<std::ops::Range<u64>> {
    runs.sort_by_key(|r| r.start);
    let mut merged: Vec<std::ops::Range<u64>> = Vec::with_capacity(runs.len());
    for run in runs {
        match merged.last_mut() {
            Some(last) if run.start <= last.end => last.end = last.end.max(run.end),
            _ => merged.push(run),
        }
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE_IS_WRITTEN: u64 = 1 << 1;
    const PAGE_IS_SOFT_DIRTY: u64 = 1 << 7;

    /// A swap entry as pagemap shows it: swap type in bits 0–4, offset in bits 5–54.
    fn swap_entry(kind: u64, offset: u64) -> PageMapEntry {
        PageMapEntry(SWAPPED | EXCLUSIVE | (offset << 5) | kind)
    }

    #[test]
    fn test_private_copy_includes_swapped_out_copies_and_excludes_file_pages() {
        let present_copy = PageMapEntry(PRESENT | EXCLUSIVE | 0x1234);
        let swapped_copy = swap_entry(1, 0x42);
        let migrating_file_page = PageMapEntry(SWAPPED | FILE_OR_SHARED_ANON | (0x7 << 5) | 30);
        let template_page = PageMapEntry(PRESENT | FILE_OR_SHARED_ANON | 0x99);
        let not_mapped = PageMapEntry(0);
        assert!(present_copy.private_copy());
        assert!(
            swapped_copy.private_copy(),
            "a swapped-out copy still holds the VM's data"
        );
        assert!(!swapped_copy.present() && swapped_copy.swapped());
        assert!(!migrating_file_page.private_copy());
        assert!(!template_page.private_copy());
        assert!(!not_mapped.private_copy());
    }

    #[test]
    fn test_private_copies_scan_selects_swapped_anonymous_pages_but_no_file_page() {
        let filter = ScanFilter::PRIVATE_COPIES;
        assert!(filter.selects(PAGE_IS_PRESENT | PAGE_IS_WRITTEN));
        assert!(filter.selects(PAGE_IS_SWAPPED | PAGE_IS_WRITTEN));
        assert!(filter.selects(PAGE_IS_SWAPPED | PAGE_IS_SOFT_DIRTY));
        assert!(!filter.selects(PAGE_IS_PRESENT | PAGE_IS_FILE));
        assert!(
            !filter.selects(PAGE_IS_SWAPPED | PAGE_IS_FILE),
            "a file page under migration"
        );
        assert!(!filter.selects(0), "nothing mapped");
        assert!(!filter.selects(PAGE_IS_WRITTEN), "neither present nor swapped");
        assert!(
            !filter.selects(PAGE_IS_PRESENT | PAGE_IS_PFNZERO),
            "the zero page a read of an anonymous hole maps"
        );
    }

    #[test]
    fn test_present_scan_selects_only_present_pages() {
        let filter = ScanFilter::PRESENT;
        assert!(filter.selects(PAGE_IS_PRESENT | PAGE_IS_FILE));
        assert!(filter.selects(PAGE_IS_PRESENT));
        assert!(!filter.selects(PAGE_IS_SWAPPED));
    }

    #[test]
    fn test_duplicate_and_adjacent_runs_are_merged() {
        let runs = merge_runs(vec![8192..12288, 0..4096, 4096..8192, 8192..12288, 20480..24576]);
        assert_eq!(runs, vec![0..12288, 20480..24576]);
    }
}
