//! Facts about this process and host that benchmarks and stats read from the kernel:
//! `/proc/self/smaps_rollup`, `/proc/meminfo`, the fd limit, and a `fork()` baseline.

use std::collections::HashMap;
use std::io;
use std::time::{Duration, Instant};

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

/// Times `fork()` of this process until the child, which exits at once, has been reaped.
pub fn time_fork_to_child_exit() -> io::Result<Duration> {
    let started = Instant::now();
    // SAFETY: the child calls only the async-signal-safe `_exit`, so forking a multi-threaded
    // process is sound; the parent reaps it below.
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => Err(io::Error::last_os_error()),
        // SAFETY: `_exit` never returns and touches no state of the (copied) parent.
        0 => unsafe { libc::_exit(0) },
        child => {
            let mut status = 0;
            // SAFETY: waits for our own child; `status` is a valid out-pointer.
            if unsafe { libc::waitpid(child, &mut status, 0) } != child {
                return Err(io::Error::last_os_error());
            }
            Ok(started.elapsed())
        }
    }
}

/// smaps figures summed over the mappings inside one address range, in KiB.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
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
pub fn smaps_for_range(start: u64, end: u64) -> io::Result<SmapsFigures> {
    smaps_of("/proc/self/smaps", start, end)
}

/// Sums `/proc/<pid>/smaps` of process `pid` over the mappings that lie inside `start..end`.
pub fn process_smaps_for_range(pid: u32, start: u64, end: u64) -> io::Result<SmapsFigures> {
    smaps_of(&format!("/proc/{pid}/smaps"), start, end)
}

fn smaps_of(path: &str, start: u64, end: u64) -> io::Result<SmapsFigures> {
    let text = std::fs::read_to_string(path)?;
    let mut figures = SmapsFigures::default();
    let mut inside = false;
    for line in text.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((lo, hi)) = first.split_once('-').filter(|_| !first.ends_with(':')) {
            let lo = u64::from_str_radix(lo, 16).unwrap_or(u64::MAX);
            let hi = u64::from_str_radix(hi, 16).unwrap_or(0);
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
    Ok(figures)
}

/// File descriptors this process has open (entries of `/proc/self/fd`).
pub fn open_fds() -> io::Result<u64> {
    Ok(std::fs::read_dir("/proc/self/fd")?.count() as u64)
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
