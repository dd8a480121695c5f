//! 4-level identity page tables covering guest RAM. Every entry has Accessed (and, on leaves,
//! Dirty) preset, so the CPU — or KVM's shadow MMU emulating it — never writes them back.

use crate::layout::{GIB, MAX_MEMORY, MIB, PDPT_START, PD_START};

/// Present.
const P: u64 = 1 << 0;
/// Writable.
const RW: u64 = 1 << 1;
/// Accessed.
const A: u64 = 1 << 5;
/// Dirty (leaf entries).
const D: u64 = 1 << 6;
/// Page size: this entry maps a large page.
const PS: u64 = 1 << 7;

/// Flags of a table (non-leaf) entry.
pub const TABLE_FLAGS: u64 = P | RW | A;
/// Flags of a large-page leaf entry.
pub const LEAF_FLAGS: u64 = P | RW | A | D | PS;

const TWO_MIB: u64 = 2 * MIB;
const ENTRIES_PER_TABLE: u64 = 512;

/// The leaf page size of the identity map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdentityPageSize {
    /// 2 MiB pages through one page directory per GiB.
    TwoMib,
    /// 1 GiB pages straight from the PDPT (needs CPUID pdpe1gb).
    OneGib,
}

/// The tables to write: each as (guest address, entries).
pub struct IdentityMap {
    /// The PML4 (one entry).
    pub pml4: Vec<u64>,
    /// The PDPT.
    pub pdpt: Vec<u64>,
    /// The page directories, contiguous from [`PD_START`] (empty with 1 GiB pages).
    pub page_directories: Vec<u64>,
}

/// Builds identity tables that cover `memory_size` bytes, rounded up to whole leaf pages.
/// Panics never; callers bound `memory_size` by [`MAX_MEMORY`].
pub fn identity_map(memory_size: u64, page_size: IdentityPageSize) -> IdentityMap {
    let memory_size = memory_size.min(MAX_MEMORY);
    let pml4 = vec![PDPT_START.0 | TABLE_FLAGS];
    let gibs = memory_size.div_ceil(GIB);
    match page_size {
        IdentityPageSize::OneGib => IdentityMap {
            pml4,
            pdpt: (0..gibs).map(|i| (i * GIB) | LEAF_FLAGS).collect(),
            page_directories: Vec::new(),
        },
        IdentityPageSize::TwoMib => {
            let pages = memory_size.div_ceil(TWO_MIB);
            let mut page_directories = vec![0; (gibs * ENTRIES_PER_TABLE) as usize];
            for (i, entry) in page_directories.iter_mut().take(pages as usize).enumerate() {
                *entry = (i as u64 * TWO_MIB) | LEAF_FLAGS;
            }
            IdentityMap {
                pml4,
                pdpt: (0..gibs).map(|i| (PD_START.0 + i * 4096) | TABLE_FLAGS).collect(),
                page_directories,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_two_mib_map_covers_ram_with_accessed_dirty_leaves() {
        let map = identity_map(3 * GIB + TWO_MIB, IdentityPageSize::TwoMib);
        assert_eq!(map.pdpt.len(), 4);
        let leaves: Vec<_> = map.page_directories.iter().filter(|e| **e & P != 0).collect();
        assert_eq!(leaves.len(), 3 * 512 + 1);
        assert!(leaves.iter().all(|e| **e & (A | D | PS) == A | D | PS));
        assert_eq!(*leaves[1536] & !0xfff, 3 * GIB);
        assert!(map.pdpt.iter().chain(&map.pml4).all(|e| e & A != 0));
    }

    #[test]
    fn test_one_gib_map_needs_no_page_directories() {
        let map = identity_map(4 * GIB, IdentityPageSize::OneGib);
        assert_eq!(
            map.pdpt,
            vec![
                LEAF_FLAGS,
                GIB | LEAF_FLAGS,
                (2 * GIB) | LEAF_FLAGS,
                (3 * GIB) | LEAF_FLAGS
            ]
        );
        assert!(map.page_directories.is_empty());
    }
}
