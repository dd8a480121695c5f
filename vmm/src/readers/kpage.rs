//! Per-frame facts from the host kernel: `/proc/kpagecount` (how many mappings a physical page
//! has) and `/proc/kpageflags` (what kind of page it is), read only for the frames asked about,
//! sorted and coalesced into few `pread`s. Reading them needs CAP_SYS_ADMIN.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use serde::Serialize;

/// Frames closer than this are read with one `pread`. Each entry costs the kernel ~0.16 µs and a
/// `pread` ~0.6 µs on the hosts we measured, so a few entries between are worth reading and
/// more are not.
const MERGE_GAP: u64 = 4;

/// Why page-frame facts are unavailable.
#[derive(Debug, thiserror::Error)]
pub enum KPageError {
    /// A kpage file cannot be opened (usually: not root / no CAP_SYS_ADMIN).
    #[error("cannot open {path}: {source} (reading page-frame facts needs root or CAP_SYS_ADMIN)")]
    Open {
        /// The file.
        path: &'static str,
        /// The error.
        source: io::Error,
    },
    /// `/proc/self/pagemap` hides page frame numbers (they read as 0 without CAP_SYS_ADMIN).
    #[error("/proc/self/pagemap shows page frame numbers as 0: this process lacks CAP_SYS_ADMIN, so sharing cannot be measured")]
    PfnHidden,
    /// Reading failed.
    #[error("reading {path} failed: {source}")]
    Read {
        /// The file.
        path: &'static str,
        /// The error.
        source: io::Error,
    },
}

const KPF_DIRTY: u64 = 1 << 4;
const KPF_LRU: u64 = 1 << 5;
const KPF_MMAP: u64 = 1 << 11;
const KPF_ANON: u64 = 1 << 12;
const KPF_SWAPBACKED: u64 = 1 << 14;
const KPF_HUGE: u64 = 1 << 17;
const KPF_KSM: u64 = 1 << 21;
const KPF_THP: u64 = 1 << 22;
const KPF_ZERO_PAGE: u64 = 1 << 24;

/// Decoded `/proc/kpageflags` bits of one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct FrameFlags {
    /// Raw flags.
    pub raw: u64,
    /// Anonymous page (a copy made on write, for our RAM).
    pub anon: bool,
    /// Page-cache page of a file or shmem (the template memfd's page, for our RAM).
    pub file_or_shmem: bool,
    /// Part of a transparent huge page.
    pub thp: bool,
    /// The shared zero page.
    pub zero_page: bool,
    /// Merged by KSM.
    pub ksm: bool,
    /// Dirty.
    pub dirty: bool,
}

impl FrameFlags {
    /// Decodes raw kpageflags bits.
    pub fn from_raw(raw: u64) -> Self {
        let anon = raw & KPF_ANON != 0;
        let zero_page = raw & KPF_ZERO_PAGE != 0;
        FrameFlags {
            raw,
            anon,
            file_or_shmem: !anon && !zero_page && raw & (KPF_MMAP | KPF_LRU | KPF_SWAPBACKED) != 0,
            thp: raw & (KPF_THP | KPF_HUGE) != 0,
            zero_page,
            ksm: raw & KPF_KSM != 0,
            dirty: raw & KPF_DIRTY != 0,
        }
    }
}

/// What the kernel says about one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct FrameInfo {
    /// Page frame number.
    pub pfn: u64,
    /// `/proc/kpagecount`: how many times the frame is mapped.
    pub kpagecount: u64,
    /// `/proc/kpageflags`, decoded.
    pub flags: FrameFlags,
}

/// `/proc/kpagecount` and `/proc/kpageflags`, open.
pub struct KPages {
    count: File,
    flags: File,
}

impl KPages {
    /// Opens both files; a clear error names the one that cannot be read.
    pub fn open() -> Result<Self, KPageError> {
        let open = |path: &'static str| File::open(path).map_err(|source| KPageError::Open { path, source });
        Ok(KPages {
            count: open("/proc/kpagecount")?,
            flags: open("/proc/kpageflags")?,
        })
    }

    /// Facts about each frame in `pfns` (any order, duplicates allowed), keyed by PFN.
    pub fn read(&self, pfns: &[u64]) -> Result<HashMap<u64, FrameInfo>, KPageError> {
        let mut sorted: Vec<u64> = pfns.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        let counts = self.counts(&sorted)?;
        let flags = read_entries(&self.flags, "/proc/kpageflags", &sorted)?;
        Ok(sorted
            .iter()
            .zip(counts.iter().zip(flags))
            .map(|(&pfn, (&kpagecount, raw))| {
                (
                    pfn,
                    FrameInfo {
                        pfn,
                        kpagecount,
                        flags: FrameFlags::from_raw(raw),
                    },
                )
            })
            .collect())
    }

    /// `/proc/kpagecount` of each frame in `sorted` (ascending, no duplicates), in the same order.
    pub fn counts(&self, sorted: &[u64]) -> Result<Vec<u64>, KPageError> {
        read_entries(&self.count, "/proc/kpagecount", sorted)
    }
}

/// The 8-byte entries of a `/proc/kpage*` file for each frame of `sorted` (ascending, no
/// duplicates), in the same order, read window by window.
fn read_entries(file: &File, path: &'static str, sorted: &[u64]) -> Result<Vec<u64>, KPageError> {
    let mut out = Vec::with_capacity(sorted.len());
    let mut buffer = Vec::new();
    let mut next = 0;
    for window in coalesce(sorted) {
        let n = (window.end - window.start) as usize;
        buffer.resize(n * 8, 0);
        file.read_exact_at(&mut buffer, window.start * 8)
            .map_err(|source| KPageError::Read { path, source })?;
        while next < sorted.len() && window.contains(&sorted[next]) {
            let i = (sorted[next] - window.start) as usize * 8;
            out.push(buffer[i..i + 8].try_into().map_or(0, u64::from_le_bytes));
            next += 1;
        }
    }
    Ok(out)
}

/// Groups sorted PFNs into ranges to read, merging neighbours closer than [`MERGE_GAP`].
pub fn coalesce(sorted: &[u64]) -> Vec<std::ops::Range<u64>> {
    let mut windows: Vec<std::ops::Range<u64>> = Vec::new();
    for &pfn in sorted {
        match windows.last_mut() {
            Some(w) if pfn < w.end + MERGE_GAP => w.end = w.end.max(pfn + 1),
            _ => windows.push(pfn..pfn + 1),
        }
    }
    windows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_close_frames_share_a_read_and_far_ones_do_not() {
        assert_eq!(coalesce(&[10, 11, 12, 15, 40, 1000]), vec![10..16, 40..41, 1000..1001]);
        assert!(coalesce(&[]).is_empty());
    }

    #[test]
    fn test_anonymous_and_shmem_flags_decode() {
        let anon = FrameFlags::from_raw(KPF_ANON | KPF_SWAPBACKED | KPF_DIRTY);
        assert!(anon.anon && !anon.file_or_shmem && anon.dirty);
        let shmem = FrameFlags::from_raw(KPF_SWAPBACKED | (1 << 5));
        assert!(!shmem.anon && shmem.file_or_shmem);
    }
}
