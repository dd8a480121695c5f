//! Memory-file checksums.
//!
//! Version 2 (written now) hashes the logical content, page by page: CRC-64/XZ over, for every
//! 4 KiB page that is not all zeros and in page order, the page index (u64, little-endian)
//! followed by the page's 4096 bytes. An all-zero page adds nothing, whether the file stores it
//! as a hole or as data, so copies that change sparseness (`cp --sparse=never|always`, rsync,
//! backups, hole punching) keep the checksum.
//!
//! Version 1 hashed the data extents as the file system reported them (each extent's offset,
//! then its bytes), which depends on sparseness; it is kept to verify version-1 files.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;

use crate::memory::{data_extents, PAGE_SIZE};

const CRC: crc::Crc<u64> = crc::Crc::<u64>::new(&crc::CRC_64_XZ);
/// Bytes read per call.
const CHUNK: u64 = 1 << 20;

/// CRC-64/XZ of `bytes` (the state-file payload checksum).
pub fn bytes_crc(bytes: &[u8]) -> u64 {
    CRC.checksum(bytes)
}

/// The data extents of `file`, widened to whole pages and merged.
fn page_extents(file: &File, size: u64) -> io::Result<Vec<Range<u64>>> {
    let mut merged: Vec<Range<u64>> = Vec::new();
    for range in data_extents(file, size)? {
        let start = range.start / PAGE_SIZE * PAGE_SIZE;
        let end = range.end.div_ceil(PAGE_SIZE).saturating_mul(PAGE_SIZE).min(size);
        match merged.last_mut() {
            Some(last) if start <= last.end => last.end = last.end.max(end),
            _ => merged.push(start..end),
        }
    }
    Ok(merged)
}

/// Reads every page of `file` that may hold data, calls `each(offset, page)` for each page that
/// is not all zeros, and returns the version-2 checksum of the content.
pub fn scan_content(file: &File, size: u64, mut each: impl FnMut(u64, &[u8]) -> io::Result<()>) -> io::Result<u64> {
    let mut digest = CRC.digest();
    let mut buffer = vec![0u8; CHUNK as usize];
    for range in page_extents(file, size)? {
        let mut offset = range.start;
        while offset < range.end {
            let n = CHUNK.min(range.end - offset) as usize;
            file.read_exact_at(&mut buffer[..n], offset)?;
            for (i, page) in buffer[..n].chunks(PAGE_SIZE as usize).enumerate() {
                if page.iter().all(|b| *b == 0) {
                    continue;
                }
                let at = offset + i as u64 * PAGE_SIZE;
                digest.update(&(at / PAGE_SIZE).to_le_bytes());
                digest.update(page);
                each(at, page)?;
            }
            offset += n as u64;
        }
    }
    Ok(digest.finalize())
}

/// The version-2 (content) checksum of `file`.
pub fn content_crc(file: &File, size: u64) -> io::Result<u64> {
    scan_content(file, size, |_, _| Ok(()))
}

/// The version-1 checksum: each data extent's offset, then its bytes, as the file system
/// reports the extents.
pub fn extent_crc(file: &File, size: u64) -> io::Result<u64> {
    let mut digest = CRC.digest();
    let mut buffer = vec![0u8; CHUNK as usize];
    for range in data_extents(file, size)? {
        digest.update(&range.start.to_le_bytes());
        let mut offset = range.start;
        while offset < range.end {
            let n = CHUNK.min(range.end - offset) as usize;
            file.read_exact_at(&mut buffer[..n], offset)?;
            digest.update(&buffer[..n]);
            offset += n as u64;
        }
    }
    Ok(digest.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_file(name: &str) -> (std::path::PathBuf, File) {
        let path = std::env::temp_dir().join(format!("cowvm-crc-{}-{name}", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("create");
        (path, file)
    }

    #[test]
    fn test_content_crc_is_the_same_for_zero_data_and_holes() {
        let size = 64 * PAGE_SIZE;
        let (sparse_path, sparse) = temp_file("sparse");
        sparse.set_len(size).expect("size");
        sparse.write_all_at(&[7u8; 4096], 5 * PAGE_SIZE).expect("write");
        let (dense_path, dense) = temp_file("dense");
        let mut all = vec![0u8; size as usize];
        all[5 * 4096..6 * 4096].fill(7);
        dense.write_all_at(&all, 0).expect("write");
        assert_eq!(
            content_crc(&sparse, size).expect("crc"),
            content_crc(&dense, size).expect("crc")
        );
        // The version-1 rule differed for exactly this pair wherever the file system keeps holes.
        if data_extents(&sparse, size).expect("extents").len() == 1 {
            assert_ne!(
                extent_crc(&sparse, size).expect("crc"),
                extent_crc(&dense, size).expect("crc")
            );
        }
        dense.write_all_at(&[8u8], 5 * PAGE_SIZE).expect("change a byte");
        assert_ne!(
            content_crc(&sparse, size).expect("crc"),
            content_crc(&dense, size).expect("crc")
        );
        std::fs::remove_file(sparse_path).ok();
        std::fs::remove_file(dense_path).ok();
    }
}
