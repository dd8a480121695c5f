//! What the host kernel maps behind a range of our address space, from `/proc/self/pagemap`
//! (see the kernel's `Documentation/admin-guide/mm/pagemap.rst`).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use crate::memory::PAGE_SIZE;

/// Entries read per `pread` (512 KiB of pagemap).
const CHUNK_ENTRIES: usize = 64 * 1024;

const PFN_MASK: u64 = (1 << 55) - 1;
const SOFT_DIRTY: u64 = 1 << 55;
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
    /// The page is swapped out.
    pub fn swapped(self) -> bool {
        self.0 & SWAPPED != 0
    }
    /// The page is file-backed or shared anonymous (a memfd's page cache page, for our RAM).
    pub fn file_or_shared(self) -> bool {
        self.0 & FILE_OR_SHARED_ANON != 0
    }
    /// The page is mapped only by this process.
    pub fn exclusive(self) -> bool {
        self.0 & EXCLUSIVE != 0
    }
    /// The soft-dirty bit.
    pub fn soft_dirty(self) -> bool {
        self.0 & SOFT_DIRTY != 0
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
