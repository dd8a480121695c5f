//! The slot map: which parts of a VM's RAM are registered with KVM as memory slots.
//!
//! On a host where KVM shadows the guest's page tables, `KVM_SET_USER_MEMORY_REGION` allocates a
//! reverse map of 8 bytes per 4 KiB page of the slot, for every VM, whether the guest ever touches
//! the memory or not (about 2 MiB per GiB). A clone of a 4 GiB template that touches 1 MiB would
//! hold 8 MiB of kernel memory for nothing. With *lazy* slots a VM starts with slots only for the
//! chunks of RAM that hold data (the template's populated runs, which include the boot structures,
//! the guest's page tables, its code and its stack). The guest's first access to any other chunk
//! finds no slot and exits to the VMM as `KVM_EXIT_MMIO`; the VMM completes that access from the
//! VM's own host mapping of RAM (so a write still copies the page on write, exactly as a write
//! through a slot would) and registers a slot for the chunk, so later accesses run at full speed.
//!
//! Slots are chunk-aligned and never overlap: the map keeps one bit per chunk, and a slot covers
//! a run of chunks (the initial runs are merged into as few slots as possible; a chunk added
//! later gets a slot of its own, since KVM cannot grow a slot in place). So a VM never has more
//! slots than chunks, and the chunk size is raised where needed to keep that below
//! `KVM_CAP_NR_MEMSLOTS`. If the host offers too few slots for that, the map falls back to one
//! eager slot over all of RAM and says so in [`SlotMap::fallback`].
//!
//! The whole of RAM stays one contiguous host mapping whatever the slots are, so everything that
//! reads guest memory from the host (translation, probes, stats, reset, freeze) does not care.

use std::ops::Range;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Cap, VmFd};
use serde::Serialize;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::APIC_PAGE;
use crate::layout::{MIB, PAGE_SIZE};

/// Default chunk: the smallest slot a lazy fill registers. 2 MiB costs 4 KiB of reverse map and
/// lets a guest that walks memory sequentially exit once per 512 pages.
pub const DEFAULT_CHUNK: u64 = 2 * MIB;

/// Fewest memory slots KVM must offer for lazy slots to be worth it.
pub const MIN_LAZY_SLOTS: u64 = 64;

/// A chunk of which at least 1/`DENSE_FRACTION` holds template data gets a slot at start (the
/// guest will most likely touch it); sparser chunks wait for the guest's first access.
pub const DENSE_FRACTION: u64 = 8;

/// Most page-table pages [`page_table_pages`] collects (a bound against looping tables).
const MAX_TABLE_PAGES: usize = 1 << 16;

/// How a VM's RAM is registered with KVM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SlotPolicy {
    /// Slots for the populated chunks at start, the rest added on the guest's first access.
    #[default]
    Lazy,
    /// One slot over all of RAM from the start.
    Eager,
}

impl SlotPolicy {
    /// The policy for this host: lazy where KVM allocates a memory slot's reverse map when the
    /// slot is registered (shadow paging, as on kvm_pvm, or the legacy MMU), eager where it
    /// does not. With the TDP MMU on hardware two-dimensional paging (`kvm.tdp_mmu=Y` and
    /// `kvm_intel.ept=Y` or `kvm_amd.npt=1`), KVM allocates rmaps only once a shadow root is
    /// needed (`kvm_memslots_have_rmaps`), so a slot costs little up front and lazy slots would
    /// only add first-touch exits.
    pub fn for_host() -> Self {
        if rmaps_allocated_lazily_by_kvm() {
            SlotPolicy::Eager
        } else {
            SlotPolicy::Lazy
        }
    }
}

/// Whether this host's KVM defers reverse-map allocation (TDP MMU on EPT or NPT), from the module
/// parameters in sysfs. Missing files mean no: kvm_pvm has neither EPT nor NPT.
pub fn rmaps_allocated_lazily_by_kvm() -> bool {
    let param = |path: &str| {
        std::fs::read_to_string(path)
            .map(|v| matches!(v.trim(), "Y" | "y" | "1"))
            .unwrap_or(false)
    };
    param("/sys/module/kvm/parameters/tdp_mmu")
        && (param("/sys/module/kvm_intel/parameters/ept") || param("/sys/module/kvm_amd/parameters/npt"))
}

/// Errors from registering slots.
#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    /// `KVM_SET_USER_MEMORY_REGION` failed.
    #[error("KVM_SET_USER_MEMORY_REGION for slot {slot} ({start:#x}..{end:#x}) failed: {source}")]
    Register {
        /// Slot id.
        slot: u32,
        /// First guest physical address of the slot.
        start: u64,
        /// One past its last byte.
        end: u64,
        /// The error KVM returned.
        source: kvm_ioctls::Error,
    },
    /// All slot ids are used (cannot happen with the chunk size chosen at start).
    #[error("no free KVM memory slot id is left ({0} in use)")]
    Exhausted(u32),
}

/// A snapshot of a VM's slot map, for stats and benchmarks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct SlotStats {
    /// The policy in effect (lazy may have fallen back to eager).
    pub policy: SlotPolicy,
    /// Slots registered with KVM.
    pub slots: u32,
    /// Bytes of RAM covered by slots.
    pub slotted_bytes: u64,
    /// Chunk size in bytes.
    pub chunk_bytes: u64,
    /// Accesses the VMM completed because the guest touched RAM without a slot.
    pub lazy_fills: u64,
}

/// The memory slots of one VM.
pub struct SlotMap {
    policy: SlotPolicy,
    fallback: Option<&'static str>,
    ram_size: u64,
    host_base: u64,
    chunk: u64,
    present: Vec<u64>,
    next_slot: u32,
    max_slots: u32,
    slotted_bytes: u64,
    lazy_fills: u64,
}

impl SlotMap {
    /// Registers the slots of a VM whose RAM of `ram_size` bytes is mapped at `host_base`. With
    /// [`SlotPolicy::Lazy`] the chunks overlapping `needed` (guest physical ranges the vCPU
    /// must reach without an exit: code, page tables, descriptor tables, stack) get slots, and so
    /// do the chunks that `data` (the template's populated runs) fills densely (see
    /// [`DENSE_FRACTION`]); with [`SlotPolicy::Eager`], or if the host has too few slots, all of
    /// RAM does.
    ///
    /// # Safety
    /// `host_base..host_base + ram_size` must be a mapping that outlives `vm_fd`'s slots (the VM
    /// fd must be dropped before the mapping is unmapped).
    pub unsafe fn register(
        vm_fd: &VmFd,
        host_base: u64,
        ram_size: u64,
        policy: SlotPolicy,
        needed: &[Range<u64>],
        data: &[Range<u64>],
    ) -> Result<Self, SlotError> {
        let max_slots = u64::try_from(vm_fd.check_extension_int(Cap::NrMemslots)).unwrap_or(0);
        let (policy, fallback, chunk) = match policy {
            SlotPolicy::Eager => (SlotPolicy::Eager, None, ram_size),
            SlotPolicy::Lazy if max_slots < MIN_LAZY_SLOTS => (
                SlotPolicy::Eager,
                Some("KVM offers fewer than 64 memory slots (KVM_CAP_NR_MEMSLOTS); using one eager slot"),
                ram_size,
            ),
            SlotPolicy::Lazy => (SlotPolicy::Lazy, None, chunk_size(ram_size, max_slots)),
        };
        let chunks = ram_size.div_ceil(chunk);
        let mut map = SlotMap {
            policy,
            fallback,
            ram_size,
            host_base,
            chunk,
            present: vec![0; chunks.div_ceil(64) as usize],
            next_slot: 0,
            max_slots: u32::try_from(max_slots).unwrap_or(u32::MAX).max(1),
            slotted_bytes: 0,
            lazy_fills: 0,
        };
        let wanted: Vec<u64> = match policy {
            SlotPolicy::Eager => (0..chunks).collect(),
            SlotPolicy::Lazy => {
                let mut wanted = map.chunks_of(needed);
                wanted.extend(map.dense_chunks(data));
                wanted.sort_unstable();
                wanted.dedup();
                wanted
            }
        };
        for run in runs_of(&wanted) {
            // SAFETY: forwarded from the caller.
            unsafe { map.add_slot(vm_fd, run) }?;
        }
        Ok(map)
    }

    /// Why a lazy map was made eager, if it was.
    pub fn fallback(&self) -> Option<&'static str> {
        self.fallback
    }

    /// The current figures.
    pub fn stats(&self) -> SlotStats {
        SlotStats {
            policy: self.policy,
            slots: self.next_slot,
            slotted_bytes: self.slotted_bytes,
            chunk_bytes: self.chunk,
            lazy_fills: self.lazy_fills,
        }
    }

    /// Whether the VMM completes an MMIO exit at `gpa..gpa+len` itself: only with lazy slots, and
    /// only inside RAM and off the xAPIC page, which KVM treats as MMIO whatever slot covers it
    /// (so an access there stays an error, as with eager slots).
    pub fn serves(&self, gpa: u64, len: u64) -> bool {
        let Some(end) = gpa.checked_add(len) else {
            return false;
        };
        let apic = APIC_PAGE.0..APIC_PAGE.0 + PAGE_SIZE;
        self.policy == SlotPolicy::Lazy && len > 0 && end <= self.ram_size && (end <= apic.start || gpa >= apic.end)
    }

    /// Whether the chunk holding `gpa` has a slot.
    pub fn has_slot(&self, gpa: u64) -> bool {
        self.is_present(gpa / self.chunk)
    }

    /// After the VMM completed an access to `gpa..gpa+len` (see [`SlotMap::serves`]), gives
    /// each chunk it touched that has no slot yet a slot of its own.
    ///
    /// # Safety
    /// As for [`SlotMap::register`].
    pub unsafe fn fill(&mut self, vm_fd: &VmFd, gpa: u64, len: u64) -> Result<(), SlotError> {
        self.lazy_fills += 1;
        let last = (gpa + len.max(1) - 1) / self.chunk;
        for chunk in gpa / self.chunk..=last {
            if !self.is_present(chunk) {
                // SAFETY: forwarded from the caller.
                unsafe { self.add_slot(vm_fd, chunk..chunk + 1) }?;
            }
        }
        Ok(())
    }

    /// The chunks that overlap `ranges`, sorted and without repeats.
    fn chunks_of(&self, ranges: &[Range<u64>]) -> Vec<u64> {
        let mut chunks: Vec<u64> = ranges
            .iter()
            .filter(|r| r.start < r.end && r.start < self.ram_size)
            .flat_map(|r| r.start / self.chunk..=(r.end.min(self.ram_size) - 1) / self.chunk)
            .collect();
        chunks.sort_unstable();
        chunks.dedup();
        chunks
    }

    /// The chunks that at least 1/[`DENSE_FRACTION`] of `data` fills.
    fn dense_chunks(&self, data: &[Range<u64>]) -> Vec<u64> {
        let mut filled = vec![0u64; self.ram_size.div_ceil(self.chunk) as usize];
        for run in data {
            let (mut at, end) = (run.start, run.end.min(self.ram_size));
            while at < end {
                let chunk = at / self.chunk;
                let upto = ((chunk + 1) * self.chunk).min(end);
                if let Some(bytes) = filled.get_mut(chunk as usize) {
                    *bytes += upto - at;
                }
                at = upto;
            }
        }
        let threshold = (self.chunk / DENSE_FRACTION).max(1);
        (0..filled.len() as u64)
            .filter(|&chunk| filled[chunk as usize] >= threshold)
            .collect()
    }

    fn is_present(&self, chunk: u64) -> bool {
        self.present
            .get((chunk / 64) as usize)
            .is_some_and(|word| word & (1 << (chunk % 64)) != 0)
    }

    /// Registers one slot over the chunks `chunks` and marks them present.
    ///
    /// # Safety
    /// As for [`SlotMap::register`].
    unsafe fn add_slot(&mut self, vm_fd: &VmFd, chunks: Range<u64>) -> Result<(), SlotError> {
        if self.next_slot >= self.max_slots {
            return Err(SlotError::Exhausted(self.next_slot));
        }
        let start = chunks.start * self.chunk;
        let end = (chunks.end * self.chunk).min(self.ram_size);
        let slot = self.next_slot;
        let region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: start,
            memory_size: end - start,
            userspace_addr: self.host_base + start,
        };
        // SAFETY: the region lies inside the caller's live RAM mapping, which outlives the VM's
        // slots (caller's contract); the slot id is new and its range overlaps no other slot,
        // since only chunks without a slot are ever registered.
        unsafe { vm_fd.set_user_memory_region(region) }.map_err(|source| SlotError::Register {
            slot,
            start,
            end,
            source,
        })?;
        self.next_slot += 1;
        self.slotted_bytes += end - start;
        for chunk in chunks {
            if let Some(word) = self.present.get_mut((chunk / 64) as usize) {
                *word |= 1 << (chunk % 64);
            }
        }
        Ok(())
    }
}

/// The guest physical addresses of every page-table page reachable from `cr3` (4-level long-mode
/// paging; leaves are not tables and are not listed). A guest's page-table walk must never land
/// in a chunk without a slot, so lazy slots start with these.
pub fn page_table_pages(mem: &GuestMemoryMmap, cr3: u64) -> Vec<u64> {
    const PRESENT: u64 = 1;
    const LEAF: u64 = 1 << 7;
    const ADDR: u64 = 0x000f_ffff_ffff_f000;
    let mut tables = vec![cr3 & ADDR];
    let mut level_start = 0;
    for level in (2..=4u8).rev() {
        let level_end = tables.len();
        for i in level_start..level_end {
            let table = tables[i];

            let mut bytes = [0u8; 4096];
            if mem.read_slice(&mut bytes, GuestAddress(table)).is_err() {
                continue;
            }
            let entries = bytes
                .chunks_exact(8)
                .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()));
            for entry in entries {
                let is_leaf = level < 4 && entry & LEAF != 0;
                if entry & PRESENT != 0 && !is_leaf && tables.len() < MAX_TABLE_PAGES {
                    tables.push(entry & ADDR);
                }
            }
        }
        level_start = level_end;
    }
    tables.sort_unstable();
    tables.dedup();
    tables
}

/// The chunk size for `ram_size` bytes of RAM when KVM offers `max_slots` slots: the default,
/// doubled until every chunk could have a slot of its own with room to spare.
fn chunk_size(ram_size: u64, max_slots: u64) -> u64 {
    let usable = max_slots.saturating_sub(1).max(1);
    let mut chunk = DEFAULT_CHUNK;
    while ram_size.div_ceil(chunk) > usable {
        chunk *= 2;
    }
    chunk
}

/// Sorted chunk numbers grouped into runs of consecutive chunks.
fn runs_of(chunks: &[u64]) -> Vec<Range<u64>> {
    let mut runs: Vec<Range<u64>> = Vec::new();
    for &chunk in chunks {
        match runs.last_mut() {
            Some(run) if run.end == chunk => run.end += 1,
            _ => runs.push(chunk..chunk + 1),
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_consecutive_chunks_merge_into_one_run() {
        assert_eq!(runs_of(&[0, 1, 2, 5, 7, 8]), vec![0..3, 5..6, 7..9]);
        assert!(runs_of(&[]).is_empty());
    }

    #[test]
    fn test_only_chunks_that_data_fills_to_an_eighth_count_as_dense() {
        let map = SlotMap {
            policy: SlotPolicy::Lazy,
            fallback: None,
            ram_size: 64 << 20,
            host_base: 0,
            chunk: DEFAULT_CHUNK,
            present: vec![0],
            next_slot: 0,
            max_slots: 100,
            slotted_bytes: 0,
            lazy_fills: 0,
        };
        let eighth = DEFAULT_CHUNK / DENSE_FRACTION;
        let data = [
            // One page per MiB: sparse everywhere.
            (4 << 20)..(4 << 20) + 4096,
            (5 << 20)..(5 << 20) + 4096,
            // Exactly an eighth of chunk 5, in two runs.
            (10 << 20)..(10 << 20) + eighth / 2,
            (11 << 20)..(11 << 20) + eighth / 2,
            // Crosses from chunk 7 into chunk 8 (each gets an eighth minus a page).
            (16 << 20) - eighth + 4096..(16 << 20) + eighth - 4096,
        ];
        assert_eq!(map.dense_chunks(&data), vec![5]);
        assert_eq!(map.chunks_of(&[0..1, (2 << 20) - 1..(2 << 20) + 1]), vec![0, 1]);
    }

    #[test]
    fn test_only_lazy_maps_serve_mmio_and_only_inside_ram_off_the_apic_page() {
        let lazy = |ram_size| SlotMap {
            policy: SlotPolicy::Lazy,
            fallback: None,
            ram_size,
            host_base: 0,
            chunk: DEFAULT_CHUNK,
            present: vec![0; 64],
            next_slot: 0,
            max_slots: 100,
            slotted_bytes: 0,
            lazy_fills: 0,
        };
        let map = lazy(32 << 20);
        assert!(map.serves(0, 8) && map.serves((32 << 20) - 8, 8));
        assert!(!map.serves((32 << 20) - 4, 8), "crosses the end of RAM");
        assert!(!map.serves(32 << 20, 1) && !map.serves(u64::MAX - 2, 8) && !map.serves(0, 0));
        let big = lazy(8 << 30);
        assert!(!big.serves(APIC_PAGE.0, 4) && !big.serves(APIC_PAGE.0 + 4092, 4));
        assert!(big.serves(APIC_PAGE.0 - 8, 8) && big.serves(APIC_PAGE.0 + PAGE_SIZE, 8));
        let eager = SlotMap {
            policy: SlotPolicy::Eager,
            ..lazy(32 << 20)
        };
        assert!(!eager.serves(0, 8));
    }

    #[test]
    fn test_chunk_grows_until_every_chunk_fits_in_the_slots_kvm_offers() {
        assert_eq!(chunk_size(4 << 30, 32764), DEFAULT_CHUNK);
        assert_eq!(chunk_size(64 << 30, 32764), 2 * DEFAULT_CHUNK);
        assert_eq!(chunk_size(4 << 30, 509), 16 << 20);
        assert!((4u64 << 30).div_ceil(chunk_size(4 << 30, 100)) < 100);
    }
}
