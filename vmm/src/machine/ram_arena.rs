//! Where clone RAM goes in the host address space: low, below the executable, its heap and the
//! kernel's top-down mmap area.
//!
//! `/proc/<pid>/smaps` is generated in address order, and reading it up to a VM's RAM walks the
//! page tables of every mapping below that RAM. With RAM placed by the kernel (top-down, under
//! thread stacks and libraries, above the executable and a heap of tens of MiB) every statistics
//! read walked the executable and the heap: ~150 µs of a ~250 µs `GET /v1/vms/{id}/stats` in the
//! CI loop. RAM taken first-fit from this arena lies below all of them, lowest first, so a read
//! walks only the RAM of VMs at lower addresses (and warm shells are handed out lowest first).
//!
//! The arena only chooses addresses: the mapping is made with `MAP_FIXED_NOREPLACE`, so nothing
//! already mapped is ever replaced; when that fails the caller maps where the kernel chooses.
//! Its base is random (2 MiB-aligned over 16 TiB: 23 bits; the kernel randomises its mmap area
//! by 28 bits of pages, and places large anonymous mappings 2 MiB-aligned, which keeps 19 of
//! them), so guest RAM is no easier to find than where the kernel would put it; within the arena
//! VMs lie next to each other, as the kernel's own mmap area places them. Ranges stay 2 MiB
//! aligned, so guest RAM can still be backed by huge pages.

use std::collections::BTreeMap;
use std::sync::Mutex;

/// Lowest base of the arena (1 TiB): above anything a 32-bit or low hint would use.
const START: u64 = 1 << 40;
/// The base is `START` plus a random [`ALIGN`]-aligned offset below this (16 TiB).
const SPREAD: u64 = 1 << 44;
/// Bytes of the arena (16 TiB): even from the highest base it ends at 33 TiB, far below a PIE
/// executable (from ~85 TiB) and the mmap area (~128 TiB, top-down).
const LENGTH: u64 = 1 << 44;
/// Ranges start on 2 MiB boundaries (and so does the base).
const ALIGN: u64 = 2 << 20;
/// Unmapped bytes after each range, so that the anonymous VMAs of two VMs' RAM never merge
/// (statistics count only the VMAs inside one VM's range).
const GAP: u64 = 4096;

struct Arena {
    /// Where the arena begins (0 until the first mapping draws it).
    base: u64,
    /// Free ranges below `top`: start → length.
    free: BTreeMap<u64, u64>,
    /// Start of the never-used rest of the arena.
    top: u64,
    /// Ranges handed out: start → length.
    taken: BTreeMap<u64, u64>,
}

static ARENA: Mutex<Arena> = Mutex::new(Arena::new());

/// The arena's length for a mapping of `len` bytes (with its gap, aligned).
fn span(len: u64) -> u64 {
    (len + GAP).div_ceil(ALIGN) * ALIGN
}

impl Arena {
    /// An arena not yet placed: its base is drawn on first use.
    const fn new() -> Self {
        Arena {
            base: 0,
            free: BTreeMap::new(),
            top: 0,
            taken: BTreeMap::new(),
        }
    }

    /// An arena at `base`.
    fn at(base: u64) -> Self {
        Arena {
            base,
            top: base,
            ..Arena::new()
        }
    }

    fn take(&mut self, len: u64) -> Option<u64> {
        if self.base == 0 {
            // Without entropy the arena is not used: RAM goes where the kernel puts it.
            let offset = getrandom::u64().ok()? % (SPREAD / ALIGN) * ALIGN;
            *self = Arena::at(START + offset);
        }
        let need = span(len);
        let fit = self
            .free
            .iter()
            .find(|(_, &free)| free >= need)
            .map(|(&at, &free)| (at, free));
        let at = match fit {
            Some((at, free)) => {
                self.free.remove(&at);
                if free > need {
                    self.free.insert(at + need, free - need);
                }
                at
            }
            None if self.top + need <= self.base + LENGTH => {
                let at = self.top;
                self.top += need;
                at
            }
            None => return None,
        };
        self.taken.insert(at, need);
        Some(at)
    }

    fn release(&mut self, addr: u64) {
        let Some(len) = self.taken.remove(&addr) else {
            return;
        };
        let (mut start, mut end) = (addr, addr + len);
        // Merge with the free neighbours on both sides.
        if let Some((&before, &before_len)) = self.free.range(..addr).next_back() {
            if before + before_len == addr {
                self.free.remove(&before);
                start = before;
            }
        }
        if let Some(after_len) = self.free.remove(&end) {
            end += after_len;
        }
        if end == self.top {
            self.top = start;
        } else {
            self.free.insert(start, end - start);
        }
    }
}

/// The lowest free address for a mapping of `len` bytes, now reserved for it (`None` when the
/// arena is full). Give it back with [`release`] when unmapped, or when mapping there failed.
pub(crate) fn take(len: u64) -> Option<u64> {
    ARENA.lock().unwrap_or_else(|e| e.into_inner()).take(len)
}

/// Gives back the range at `addr` if the arena handed it out (other addresses are ignored).
pub(crate) fn release(addr: u64) {
    ARENA.lock().unwrap_or_else(|e| e.into_inner()).release(addr);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_the_base_is_drawn_at_random_2_mib_aligned_below_the_executable() {
        let bases: Vec<u64> = (0..4)
            .map(|_| {
                let mut arena = Arena::new();
                arena.take(4096).expect("entropy");
                arena.base
            })
            .collect();
        for &base in &bases {
            assert!(
                (START..START + SPREAD).contains(&base) && base % ALIGN == 0,
                "{base:#x}"
            );
            assert!(base + LENGTH < 0x5555_5555_4000, "below a PIE executable");
        }
        assert!(bases.windows(2).any(|w| w[0] != w[1]), "random: {bases:x?}");
    }

    #[test]
    fn test_ranges_are_lowest_first_apart_and_reused_after_release() {
        let mut arena = Arena::at(START);
        let a = arena.take(64 << 20).expect("a");
        let b = arena.take(64 << 20).expect("b");
        assert!(b >= a + (64 << 20) + GAP, "a gap between {a:#x} and {b:#x}");
        assert_eq!(a % ALIGN, 0);
        arena.release(a);
        let c = arena.take(32 << 20).expect("c");
        assert_eq!(c, a, "the lowest free range first");
        let e = arena.take(16 << 20).expect("e");
        assert!(e > c && e < b, "the rest of a's range: {e:#x}");
        arena.release(b);
        arena.release(c);
        arena.release(c); // A second release of the same address is ignored.
        arena.release(e);
        assert_eq!(arena.top, START, "everything given back");
        assert!(arena.free.is_empty(), "{:?}", arena.free);
        let d = arena.take(128 << 20).expect("d");
        assert_eq!(d, a, "freed neighbours merge");
        assert!(arena.take(LENGTH).is_none(), "larger than the arena");
        arena.release(0x1234); // Not from the arena: ignored.
    }
}
