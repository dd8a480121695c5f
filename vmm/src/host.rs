//! Facts about this process and host that benchmarks and stats read from the kernel:
//! `/proc/self/smaps_rollup`, `/proc/meminfo`, `/proc/self/smaps`, open fds and the fd limit.

use std::collections::HashMap;
use std::io;

fn parse_kib_fields(text: &str) -> HashMap<String, u64> {
    text.lines()
        .filter_map(|line| {
            let (key, rest) = line.split_once(':')?;
            let value = rest.split_whitespace().next()?.parse().ok()?;
            Some((key.trim().to_owned(), value))
        })
        .collect()
}

/// A snapshot of the process's memory (`/proc/self/smaps_rollup`) and the host's
/// (`/proc/meminfo`), in KiB.
#[derive(Debug, Clone)]
pub struct MemorySnapshot {
    smaps: HashMap<String, u64>,
    meminfo: HashMap<String, u64>,
}

/// Differences between two snapshots, in KiB (positive: the later one has more).
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct MemoryDelta {
    /// Resident set size.
    pub rss_kib: i64,
    /// Pages only this process maps (Private_Clean + Private_Dirty): what the process really added.
    pub private_kib: i64,
    /// Kernel memory: Slab + VmallocUsed + PageTables + SecPageTables + KernelStack.
    pub kernel_kib: i64,
    /// The drop in MemAvailable (a cross-check of the two above).
    pub mem_available_drop_kib: i64,
}

impl MemorySnapshot {
    /// Reads both files now.
    pub fn take() -> io::Result<Self> {
        Ok(MemorySnapshot {
            smaps: parse_kib_fields(&std::fs::read_to_string("/proc/self/smaps_rollup")?),
            meminfo: parse_kib_fields(&std::fs::read_to_string("/proc/meminfo")?),
        })
    }

    fn smaps(&self, key: &str) -> i64 {
        self.smaps.get(key).copied().unwrap_or(0) as i64
    }

    fn meminfo(&self, key: &str) -> i64 {
        self.meminfo.get(key).copied().unwrap_or(0) as i64
    }

    /// Resident set size of this process, KiB.
    pub fn rss_kib(&self) -> i64 {
        self.smaps("Rss")
    }

    /// Kernel memory of the host (Slab + VmallocUsed + PageTables + SecPageTables + KernelStack), KiB.
    pub fn kernel_kib(&self) -> i64 {
        self.kernel()
    }

    fn kernel(&self) -> i64 {
        ["Slab", "VmallocUsed", "PageTables", "SecPageTables", "KernelStack"]
            .iter()
            .map(|k| self.meminfo(k))
            .sum()
    }

    /// What changed from `earlier` to `self`.
    pub fn since(&self, earlier: &MemorySnapshot) -> MemoryDelta {
        let private = |s: &MemorySnapshot| s.smaps("Private_Clean") + s.smaps("Private_Dirty");
        MemoryDelta {
            rss_kib: self.smaps("Rss") - earlier.smaps("Rss"),
            private_kib: private(self) - private(earlier),
            kernel_kib: self.kernel() - earlier.kernel(),
            mem_available_drop_kib: earlier.meminfo("MemAvailable") - self.meminfo("MemAvailable"),
        }
    }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (every VM holds two fds) and returns it.
pub fn raise_fd_limit() -> io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the valid rlimit struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    limit.rlim_cur = limit.rlim_max;
    // SAFETY: setrlimit reads the valid rlimit struct we pass.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(limit.rlim_cur)
}

/// smaps figures summed over the mappings inside one address range, in KiB.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
pub struct SmapsFigures {
    /// Mappings (VMAs) in the range.
    pub vmas: u64,
    /// Resident.
    pub rss_kib: u64,
    /// Anonymous (pages copied on write, for guest RAM).
    pub anonymous_kib: u64,
    /// Mapped once and dirty.
    pub private_dirty_kib: u64,
    /// Mapped once and clean.
    pub private_clean_kib: u64,
    /// Mapped more than once and dirty.
    pub shared_dirty_kib: u64,
    /// Mapped more than once and clean.
    pub shared_clean_kib: u64,
}

/// Sums `/proc/self/smaps` over the mappings that lie inside `start..end`.
///
/// The kernel lists mappings in address order and formats each one (walking its page tables)
/// only when the reader gets that far, so reading stops at the first mapping that starts at or
/// after `end`: the mappings above the range, often most of a process holding many VMs, are
/// never formatted.
pub fn smaps_for_range(start: u64, end: u64) -> io::Result<SmapsFigures> {
    smaps_of("/proc/self/smaps", start, end)
}

/// Sums `/proc/<pid>/smaps` of process `pid` over the mappings that lie inside `start..end`
/// (stopping early the same way).
pub fn process_smaps_for_range(pid: u32, start: u64, end: u64) -> io::Result<SmapsFigures> {
    smaps_of(&format!("/proc/{pid}/smaps"), start, end)
}

/// Bytes asked of the kernel per smaps `read`: about one mapping's record. The kernel formats
/// records (walking each mapping's page tables) until it has as many bytes as asked for, so a
/// large read past the range formats dozens of other VMs' mappings for nothing (a 64 KiB
/// buffer cost ~70 µs per statistics read with warm shells above the VM).
const SMAPS_READ: usize = 1024;

fn smaps_of(path: &str, start: u64, end: u64) -> io::Result<SmapsFigures> {
    use std::io::BufRead;
    let file = std::fs::File::open(path)?;
    let mut reader = io::BufReader::with_capacity(SMAPS_READ, file);
    let mut figures = SmapsFigures::default();
    let mut inside = false;
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(figures);
        }
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((lo, hi)) = first.split_once('-').filter(|_| !first.ends_with(':')) {
            let lo = u64::from_str_radix(lo, 16).unwrap_or(u64::MAX);
            let hi = u64::from_str_radix(hi, 16).unwrap_or(0);
            if lo >= end {
                return Ok(figures);
            }
            inside = lo >= start && hi <= end;
            figures.vmas += u64::from(inside);
            continue;
        }
        if !inside {
            continue;
        }
        let value = || {
            line.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        match first {
            "Rss:" => figures.rss_kib += value(),
            "Anonymous:" => figures.anonymous_kib += value(),
            "Private_Dirty:" => figures.private_dirty_kib += value(),
            "Private_Clean:" => figures.private_clean_kib += value(),
            "Shared_Dirty:" => figures.shared_dirty_kib += value(),
            "Shared_Clean:" => figures.shared_clean_kib += value(),
            _ => {}
        }
    }
}

/// How far the allocator grows its heaps beyond a request, and how much free memory it keeps
/// at a heap's top before returning it (see [`tune_allocator_for_many_vms`]).
const ALLOCATOR_STEP: usize = 32 << 20;

/// Makes glibc's allocator grow and give back memory in large steps. In a process holding many
/// KVM VMs, every change to its page tables — the `mprotect` with which malloc grows a thread's
/// heap, the `munmap` of a large block, the `madvise` of a trimmed heap — calls the MMU notifier
/// of every VM (≈0.3 µs per VM and call, docs/benchmarks.md), so with 1000 VMs each of the
/// ~170 heap growths of one 1000-clone call cost about a millisecond. Memory is reserved, not
/// touched: RSS grows only with what is used. Idempotent; the first call sets the options.
pub fn tune_allocator_for_many_vms() {
    static TUNE: std::sync::Once = std::sync::Once::new();
    TUNE.call_once(|| {
        let step = ALLOCATOR_STEP as libc::c_int;
        for (option, value) in [
            (libc::M_TOP_PAD, step),
            (libc::M_TRIM_THRESHOLD, 2 * step),
            (libc::M_MMAP_THRESHOLD, step),
        ] {
            // SAFETY: mallopt only changes malloc's tuning parameters (under its own locks); an
            // unknown option or value is refused with 0 and leaves the defaults.
            unsafe { libc::mallopt(option, value) };
        }
    });
}

/// File descriptors this process has open. Since Linux 6.2 the kernel reports the count as the
/// size of `/proc/self/fd` (one `stat`, a bitmap count); listing the directory instead builds a
/// dentry per descriptor, which takes milliseconds in a process holding thousands of VM fds. On
/// older kernels (size 0) the entries are counted.
pub fn open_fds() -> io::Result<u64> {
    match std::fs::metadata("/proc/self/fd")?.len() {
        0 => Ok(std::fs::read_dir("/proc/self/fd")?.count() as u64),
        open => Ok(open),
    }
}

/// Mappings of this process (lines of `/proc/self/maps`).
pub fn mappings() -> io::Result<u64> {
    Ok(std::fs::read_to_string("/proc/self/maps")?.lines().count() as u64)
}

/// File descriptors this process may still open: the soft `RLIMIT_NOFILE` minus those open now.
pub fn fd_headroom() -> io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the valid rlimit struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(limit.rlim_cur.saturating_sub(open_fds()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The whole of `/proc/self/smaps` summed over `start..end`, read to its end: what
    /// [`smaps_for_range`] must agree with although it stops early.
    fn whole_file(start: u64, end: u64) -> SmapsFigures {
        let text = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut figures = SmapsFigures::default();
        let mut inside = false;
        for line in text.lines() {
            let mut words = line.split_whitespace();
            let first = words.next().unwrap_or("");
            if let Some((lo, hi)) = first.split_once('-').filter(|_| !first.ends_with(':')) {
                let (lo, hi) = (
                    u64::from_str_radix(lo, 16).unwrap(),
                    u64::from_str_radix(hi, 16).unwrap(),
                );
                inside = lo >= start && hi <= end;
                figures.vmas += u64::from(inside);
                continue;
            }
            let value = words.next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            match first {
                "Rss:" if inside => figures.rss_kib += value,
                "Anonymous:" if inside => figures.anonymous_kib += value,
                "Private_Dirty:" if inside => figures.private_dirty_kib += value,
                _ => {}
            }
        }
        figures
    }

    #[test]
    fn test_after_tuning_a_16_mib_block_comes_from_the_heap_not_from_its_own_mmap() {
        // In a forked child (no other threads allocating meanwhile): with glibc's defaults a
        // block this large gets its own mmap, whose munmap would run every VM's MMU notifier.
        // SAFETY: the child only allocates, reads malloc's counters and leaves with _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork");
        if pid == 0 {
            tune_allocator_for_many_vms();
            // SAFETY: mallinfo2 only reads malloc's counters.
            let before = unsafe { libc::mallinfo2() };
            let block = vec![1u8; 16 << 20];
            // SAFETY: as above.
            let after = unsafe { libc::mallinfo2() };
            let from_heap = after.hblks == before.hblks && std::hint::black_box(&block)[0] == 1;
            // SAFETY: ends the child without running the parent's atexit handlers.
            unsafe { libc::_exit(if from_heap { 0 } else { 1 }) };
        }
        let mut status = 0;
        // SAFETY: waits for the child forked above.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "status {status:#x}"
        );
    }

    #[test]
    fn test_open_fds_counts_descriptors_as_they_open_and_close() {
        let listed = || std::fs::read_dir("/proc/self/fd").unwrap().count() as u64 - 1;
        // Other test threads may open files meanwhile: compare with a listing on both sides.
        let files: Vec<std::fs::File> = (0..40)
            .map(|_| std::fs::File::open("/proc/self/stat").unwrap())
            .collect();
        let (before, counted, after) = (listed(), open_fds().unwrap(), listed());
        assert!(
            before.min(after) <= counted && counted <= before.max(after) + 1,
            "{before} {counted} {after}"
        );
        let with_files = counted;
        drop(files);
        let without = open_fds().unwrap();
        assert!(with_files >= without + 40 - 8, "{with_files} then {without}");
    }

    #[test]
    fn test_smaps_for_range_stopping_early_agrees_with_the_whole_file() {
        const PAGE: usize = 4096;
        // Three mappings with different protections, so that they stay three VMAs; the middle
        // one is measured and has mappings above and below it.
        // SAFETY: a fresh anonymous mapping, checked below and unmapped at the end.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                48 * PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED);
        let base = base as u64;
        // SAFETY: the first and last 16 pages of our own mapping become read-only.
        unsafe {
            assert_eq!(libc::mprotect(base as *mut libc::c_void, 16 * PAGE, libc::PROT_READ), 0);
            let top = (base + 32 * PAGE as u64) as *mut libc::c_void;
            assert_eq!(libc::mprotect(top, 16 * PAGE, libc::PROT_READ), 0);
        }
        let (start, end) = (base + 16 * PAGE as u64, base + 32 * PAGE as u64);
        for page in 0..5u64 {
            // SAFETY: inside the writable middle third of our mapping.
            unsafe { std::ptr::write_volatile((start + page * PAGE as u64) as *mut u8, 1) };
        }
        let early = smaps_for_range(start, end).unwrap();
        let whole = whole_file(start, end);
        // SAFETY: unmaps the mapping made above; nothing refers to it any more.
        unsafe { libc::munmap(base as *mut libc::c_void, 48 * PAGE) };
        assert_eq!(early.vmas, 1);
        assert_eq!(early.rss_kib, 20);
        assert_eq!(early.anonymous_kib, 20);
        assert_eq!(early.private_dirty_kib, 20);
        assert_eq!(
            (early.vmas, early.rss_kib, early.anonymous_kib, early.private_dirty_kib),
            (whole.vmas, whole.rss_kib, whole.anonymous_kib, whole.private_dirty_kib)
        );
    }
}
