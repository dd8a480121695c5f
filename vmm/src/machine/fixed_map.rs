//! What a failed `mmap(MAP_FIXED)` over one of our mappings leaves behind.
//!
//! Before Linux 6.12, `mmap_region` unmaps the old range first and does not put it back when
//! building the new mapping then fails (for example `ENOMEM` while allocating the VMA or in the
//! file's `mmap` hook). The range is then a hole: any later `mmap` of the process, in any thread,
//! may be placed there. Guest RAM whose range became a hole has lost its data, a memslot over it
//! points at nothing (or at someone else's memory), and unmapping the range later could unmap
//! whatever was placed there since. From 6.12 on the kernel restores the old mapping, and a
//! failure before the unmap (`EINVAL`, the map-count limit) leaves it intact on every version.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU8, Ordering};

/// What a failed `MAP_FIXED` left in the range it was meant to replace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Aftermath {
    /// The range is fully mapped, as before the call: nothing was lost.
    Intact = 0,
    /// The range was a hole. It is ours again, as zero-filled anonymous memory mapped with
    /// `MAP_FIXED_NOREPLACE` (which never replaces anything), but the data it held is gone.
    Refilled = 1,
    /// The range was a hole and something else now maps (part of) it. It is not ours any more
    /// and must never be unmapped by us.
    Lost = 2,
}

impl Aftermath {
    fn from_u8(value: u8) -> Aftermath {
        match value {
            0 => Aftermath::Intact,
            1 => Aftermath::Refilled,
            _ => Aftermath::Lost,
        }
    }

    /// Whether the data that was mapped in the range is gone.
    pub(crate) fn data_lost(self) -> bool {
        self != Aftermath::Intact
    }

    /// Whether the owner may still unmap its whole range.
    pub(crate) fn may_unmap(self) -> bool {
        self != Aftermath::Lost
    }
}

/// The worst aftermath a mapping has suffered so far (shared by `&self` methods).
#[derive(Debug, Default)]
pub(crate) struct Fate(AtomicU8);

impl Fate {
    /// Records `aftermath`, keeping the worst seen.
    pub(crate) fn record(&self, aftermath: Aftermath) {
        self.0.fetch_max(aftermath as u8, Ordering::AcqRel);
    }

    /// The worst aftermath recorded.
    pub(crate) fn get(&self) -> Aftermath {
        Aftermath::from_u8(self.0.load(Ordering::Acquire))
    }
}

/// Whether every page of `addr..addr+len` is mapped: `msync` fails with `ENOMEM` when part of
/// the range is not, and with `MS_ASYNC` it does nothing else (a no-op since Linux 2.6.19).
pub(crate) fn range_is_mapped(addr: NonNull<libc::c_void>, len: usize) -> bool {
    // SAFETY: msync only inspects the process's mappings of the range; it touches no memory.
    unsafe { libc::msync(addr.as_ptr(), len, libc::MS_ASYNC) == 0 }
}

/// Finds out what a failed `MAP_FIXED` of `addr..addr+len` (page aligned) left behind, and
/// takes a hole back where it can. Call it right after the failure; a mapping that another
/// thread places in the hole in between and covers all of it cannot be told from the old one.
pub(crate) fn after_failed_fixed_map(addr: NonNull<libc::c_void>, len: usize) -> Aftermath {
    if range_is_mapped(addr, len) {
        return Aftermath::Intact;
    }
    let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED_NOREPLACE;
    // SAFETY: MAP_FIXED_NOREPLACE maps the range only if no part of it is mapped (else EEXIST),
    // so this cannot replace anything; the new anonymous mapping is ours.
    let got = unsafe { libc::mmap(addr.as_ptr(), len, libc::PROT_READ | libc::PROT_WRITE, flags, -1, 0) };
    if got == addr.as_ptr() {
        return Aftermath::Refilled;
    }
    if got != libc::MAP_FAILED {
        // A kernel without MAP_FIXED_NOREPLACE (before 4.17) took it as a hint and mapped
        // elsewhere: that mapping is ours and of no use.
        // SAFETY: `got..got+len` was just mapped by this call and nothing else refers to it.
        unsafe { libc::munmap(got, len) };
    }
    Aftermath::Lost
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEN: usize = 4 * 4096;

    fn anonymous(len: usize) -> NonNull<libc::c_void> {
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
        // SAFETY: a fresh anonymous mapping at an address the kernel picks.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                -1,
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED);
        NonNull::new(addr).expect("mmap returned NULL")
    }

    fn unmap(addr: NonNull<libc::c_void>, len: usize) {
        // SAFETY: the tests unmap only ranges they mapped themselves.
        assert_eq!(unsafe { libc::munmap(addr.as_ptr(), len) }, 0);
    }

    fn at(addr: NonNull<libc::c_void>, offset: usize) -> NonNull<libc::c_void> {
        // SAFETY: the offsets stay inside the test's own ranges.
        NonNull::new(unsafe { addr.as_ptr().cast::<u8>().add(offset) }.cast()).expect("non-null")
    }

    #[test]
    fn test_a_failure_that_left_the_mapping_in_place_is_intact() {
        let addr = anonymous(LEN);
        assert_eq!(after_failed_fixed_map(addr, LEN), Aftermath::Intact);
        unmap(addr, LEN);
    }

    /// Runs `case` in a forked child, which has no other threads: other tests of this binary map
    /// memory on their threads, and the kernel may place such a mapping in a hole a test made.
    fn in_a_child_process(case: fn()) {
        // SAFETY: the child only runs `case` (mmap, munmap, msync and assertions) and leaves
        // with _exit; the parent waits for it.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork");
        if pid == 0 {
            let passed = std::panic::catch_unwind(case).is_ok();
            // SAFETY: ends the child without running the parent's atexit handlers.
            unsafe { libc::_exit(if passed { 0 } else { 1 }) };
        }
        let mut status = 0;
        // SAFETY: waits for the child forked above.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "the case failed in the child (status {status:#x}; its panic message is above)"
        );
    }

    #[test]
    fn test_a_hole_left_by_a_failed_map_fixed_is_taken_back_and_reported_as_data_lost() {
        in_a_child_process(hole_is_refilled);
    }

    #[test]
    fn test_a_hole_someone_else_mapped_into_is_lost_and_left_alone() {
        in_a_child_process(hole_taken_by_another_mapping_is_lost);
    }

    fn hole_is_refilled() {
        // What a failed MAP_FIXED leaves on kernels before 6.12: the old range unmapped. If
        // another thread's mapping lands in the hole first, the aftermath is rightly `Lost` or
        // `Intact` and that mapping is not ours to unmap: try a fresh hole.
        for _ in 0..20 {
            let addr = anonymous(LEN);
            unmap(addr, LEN);
            let aftermath = after_failed_fixed_map(addr, LEN);
            if aftermath != Aftermath::Refilled {
                // Another thread's mapping filled the hole (`Intact`) or part of it (`Lost`).
                continue;
            }
            assert!(aftermath.data_lost() && aftermath.may_unmap());
            assert!(range_is_mapped(addr, LEN), "the hole is ours again");
            unmap(addr, LEN);
            return;
        }
        panic!("no hole was taken back as Refilled in 20 tries");
    }

    fn hole_taken_by_another_mapping_is_lost() {
        // Another thread's mmap lands in part of the hole before we look. (Other tests of this
        // binary map memory too and may take a fresh hole first: then try another one.)
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE;
        let (addr, foreign) = (0..20)
            .find_map(|_| {
                let addr = anonymous(LEN);
                unmap(addr, LEN);
                let foreign = at(addr, 4096);
                // SAFETY: NOREPLACE into the hole this test just made; it never replaces anything.
                let got =
                    unsafe { libc::mmap(foreign.as_ptr(), 4096, libc::PROT_READ | libc::PROT_WRITE, flags, -1, 0) };
                (got == foreign.as_ptr()).then_some((addr, foreign))
            })
            .expect("a fresh hole in 20 tries");
        // SAFETY: the page was just mapped read/write by this test.
        unsafe { foreign.as_ptr().cast::<u64>().write_volatile(0xf0f0) };

        let aftermath = after_failed_fixed_map(addr, LEN);
        assert_eq!(aftermath, Aftermath::Lost);
        assert!(
            !aftermath.may_unmap(),
            "unmapping the range would unmap the other mapping"
        );
        assert!(range_is_mapped(foreign, 4096));
        // SAFETY: still the test's own page, untouched by the check.
        assert_eq!(unsafe { foreign.as_ptr().cast::<u64>().read_volatile() }, 0xf0f0);
        assert!(
            !range_is_mapped(addr, 4096),
            "the rest of the hole was not taken either"
        );
        unmap(foreign, 4096);
    }

    #[test]
    fn test_fate_keeps_the_worst_aftermath() {
        let fate = Fate::default();
        assert_eq!(fate.get(), Aftermath::Intact);
        fate.record(Aftermath::Lost);
        fate.record(Aftermath::Refilled);
        fate.record(Aftermath::Intact);
        assert_eq!(fate.get(), Aftermath::Lost);
    }
}
