//! The supervisor's read-only view of a cell's memory: `/proc/<pid>/pagemap` of the cell, read
//! with the supervisor's privileges (the cell itself needs none for statistics).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use cowvm_vmm::memory::PAGE_SIZE;
use cowvm_vmm::pagemap::PageMapEntry;

/// Another process's pagemap, open.
pub struct ProcessPageMap {
    file: File,
}

impl ProcessPageMap {
    /// Opens `/proc/<pid>/pagemap` (needs ptrace-read access to the process, e.g. root).
    pub fn open(pid: u32) -> io::Result<Self> {
        Ok(ProcessPageMap {
            file: File::open(format!("/proc/{pid}/pagemap"))?,
        })
    }

    /// Entries of `pages` pages from host virtual address `hva` in that process.
    pub fn read(&self, hva: u64, pages: usize) -> io::Result<Vec<PageMapEntry>> {
        let mut bytes = vec![0u8; pages * 8];
        self.file.read_exact_at(&mut bytes, hva / PAGE_SIZE * 8)?;
        Ok(bytes
            .chunks_exact(8)
            .map(|b| PageMapEntry(u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])))
            .collect())
    }
}
