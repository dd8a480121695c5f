//! An independent reader of what the host kernel maps, for checking cowvm's statistics. It has
//! its own `/proc/self/pagemap`, `/proc/kpagecount`, `/proc/kpageflags` and `SEEK_DATA` code and
//! shares nothing with cowvm's readers (kernel `Documentation/admin-guide/mm/pagemap.rst`).

use std::fs::File;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::fs::FileExt;

const PAGE: u64 = 4096;
const PRESENT: u64 = 1 << 63;
const FILE_PAGE: u64 = 1 << 61;
const PFN_BITS: u64 = (1 << 55) - 1;
/// kpageflags bit 12: anonymous.
pub const KPF_ANON: u64 = 1 << 12;
/// kpageflags bit 24: the shared zero page.
pub const KPF_ZERO_PAGE: u64 = 1 << 24;

/// One page of our address space as pagemap reports it, with its frame's kpage entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Page {
    /// Guest page index (offset from the range's start / 4096).
    pub index: u64,
    /// A page-cache (file/shmem) page: the template memfd's frame.
    pub file: bool,
    /// Page frame number.
    pub pfn: u64,
    /// `/proc/kpagecount` of the frame.
    pub count: u64,
    /// `/proc/kpageflags` of the frame.
    pub flags: u64,
}

impl Page {
    /// The frame is the shared zero page.
    pub fn zero(&self) -> bool {
        self.flags & KPF_ZERO_PAGE != 0
    }
}

/// The three kernel files, open.
pub struct Kernel {
    pagemap: File,
    count: File,
    flags: File,
}

impl Kernel {
    /// Opens them (the tests run as root).
    pub fn open() -> Self {
        let open = |path: &str| File::open(path).unwrap_or_else(|e| panic!("open {path} (needs root): {e}"));
        Kernel {
            pagemap: open("/proc/self/pagemap"),
            count: open("/proc/kpagecount"),
            flags: open("/proc/kpageflags"),
        }
    }

    fn entry(file: &File, index: u64) -> u64 {
        let mut bytes = [0u8; 8];
        file.read_exact_at(&mut bytes, index * 8)
            .expect("read a kernel page file");
        u64::from_le_bytes(bytes)
    }

    /// The present pages of `start..start + len` (host addresses), one pagemap entry at a time
    /// read in 2 MiB windows, with each frame's kpagecount and kpageflags.
    pub fn present_pages(&self, start: u64, len: u64) -> Vec<Page> {
        let pages = len / PAGE;
        let mut out = Vec::new();
        let mut buffer = vec![0u8; 512 * 8];
        let mut done = 0;
        while done < pages {
            let n = 512.min(pages - done) as usize;
            self.pagemap
                .read_exact_at(&mut buffer[..n * 8], (start / PAGE + done) * 8)
                .expect("read pagemap");
            for (i, raw) in buffer[..n * 8].chunks(8).enumerate() {
                let raw = u64::from_le_bytes(raw.try_into().expect("8 bytes"));
                if raw & PRESENT == 0 {
                    continue;
                }
                let pfn = raw & PFN_BITS;
                assert_ne!(pfn, 0, "pagemap hides PFNs: the tests must run as root");
                out.push(Page {
                    index: done + i as u64,
                    file: raw & FILE_PAGE != 0,
                    pfn,
                    count: Self::entry(&self.count, pfn),
                    flags: Self::entry(&self.flags, pfn),
                });
            }
            done += n as u64;
        }
        out
    }
}

/// Pages of data `fd` holds (its size from `fstat`, walked with `SEEK_DATA`/`SEEK_HOLE`).
pub fn data_pages(fd: BorrowedFd<'_>) -> u64 {
    // SAFETY: fstat writes into the zeroed stat struct we pass; the fd is open.
    let size = unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        assert_eq!(libc::fstat(fd.as_raw_fd(), &mut st), 0, "fstat");
        st.st_size
    };
    let mut at: libc::off_t = 0;
    let mut bytes = 0;
    while at < size {
        // SAFETY: lseek on an open fd; no memory is passed.
        let data = unsafe { libc::lseek(fd.as_raw_fd(), at, libc::SEEK_DATA) };
        if data < 0 {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd.as_raw_fd(), data, libc::SEEK_HOLE) };
        let hole = if hole < 0 { size } else { hole.min(size) };
        bytes += (hole - data) as u64;
        at = hole;
    }
    bytes / PAGE
}
