//! What the host kernel maps behind a range of our address space, from `/proc/self/pagemap`
//! (see the kernel's `Documentation/admin-guide/mm/pagemap.rst`).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use crate::memory::PAGE_SIZE;

/// Entries read per `pread` (512 KiB of pagemap).
const CHUNK_ENTRIES: usize = 64 * 1024;

const PFN_MASK: u64 = (1 << 55) - 1;
const EXCLUSIVE: u64 = 1 << 56;
const FILE_OR_SHARED_ANON: u64 = 1 << 61;
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
    /// A private anonymous page: present and not the file's page. In a `MAP_PRIVATE` mapping of
    /// a memfd this is a page the process copied on write.
    pub fn private_anonymous(self) -> bool {
        self.present() && !self.file_or_shared()
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
const PAGE_IS_PFNZERO: u64 = 1 << 5;
const PAGE_IS_HUGE: u64 = 1 << 6;
/// Regions returned per `PAGEMAP_SCAN` call.
const SCAN_REGIONS: usize = 512;

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
    /// The runs of private anonymous pages (present, not the file's page, not the shared zero
    /// page that a read of an anonymous hole maps) in `hva..hva + len`, as sorted, merged host
    /// address ranges: the pages a VM wrote. Uses `PAGEMAP_SCAN`, whose cost
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
        let regions = self.scan(
            hva,
            len,
            PAGE_IS_FILE | PAGE_IS_PFNZERO,
            PAGE_IS_PRESENT | PAGE_IS_FILE | PAGE_IS_PFNZERO,
            PAGE_IS_PRESENT | PAGE_IS_FILE | PAGE_IS_PFNZERO,
        )?;
        Ok(merge_runs(regions.into_iter().map(|r| r.start..r.end).collect()))
    }

    /// Runs `PAGEMAP_SCAN` over `hva..hva + len` until the whole range is walked.
    fn scan(&self, hva: u64, len: u64, inverted: u64, mask: u64, returned: u64) -> io::Result<Vec<PageRegion>> {
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
                category_inverted: inverted,
                category_mask: mask,
                return_mask: returned,
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
        let mut regions = self.scan(
            hva,
            len,
            0,
            PAGE_IS_PRESENT,
            PAGE_IS_FILE | PAGE_IS_HUGE | PAGE_IS_PFNZERO,
        )?;
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
            .filter(|(_, e)| e.private_anonymous())
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

    #[test]
    fn test_duplicate_and_adjacent_runs_are_merged() {
        let runs = merge_runs(vec![8192..12288, 0..4096, 4096..8192, 8192..12288, 20480..24576]);
        assert_eq!(runs, vec![0..12288, 20480..24576]);
    }
}
