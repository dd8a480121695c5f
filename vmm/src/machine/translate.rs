//! From a guest virtual address to a host page frame: the guest's own page tables (walked in
//! guest memory from CR3), the memslot, and `/proc/self/pagemap`.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Present.
const P: u64 = 1;
/// Page size (a leaf at PDPT or PD level).
const PS: u64 = 1 << 7;
/// Address bits of a table entry.
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
const CR0_PG: u64 = 1 << 31;
const EFER_LMA: u64 = 1 << 10;

/// Why a guest virtual address does not translate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TranslateError {
    /// The guest is not in 4-level long-mode paging.
    #[error("the guest is not using 64-bit long-mode paging (cr0 {cr0:#x}, efer {efer:#x})")]
    NotLongMode {
        /// CR0.
        cr0: u64,
        /// EFER.
        efer: u64,
    },
    /// The address is not canonical.
    #[error("guest virtual address {0:#x} is not canonical")]
    NonCanonical(u64),
    /// A level of the walk is not present.
    #[error("guest virtual address {gva:#x} is not mapped (level {level} entry {entry:#x} not present)")]
    NotMapped {
        /// The address.
        gva: u64,
        /// Page-table level (4 = PML4 … 1 = PT).
        level: u8,
        /// The entry found.
        entry: u64,
    },
    /// A page table lies outside guest RAM.
    #[error("page table at guest physical {0:#x} is outside guest RAM")]
    TableOutsideRam(u64),
}

/// A guest virtual address resolved by the guest's page tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GuestTranslation {
    /// Guest virtual address.
    pub gva: u64,
    /// Guest physical address.
    pub gpa: u64,
    /// Size of the guest page that maps it (4 KiB, 2 MiB or 1 GiB).
    pub guest_page_size: u64,
}

/// Walks the 4-level page tables rooted at `cr3` in `mem` for `gva`.
pub fn walk(
    mem: &GuestMemoryMmap,
    cr0: u64,
    cr3: u64,
    efer: u64,
    gva: u64,
) -> Result<GuestTranslation, TranslateError> {
    if cr0 & CR0_PG == 0 || efer & EFER_LMA == 0 {
        return Err(TranslateError::NotLongMode { cr0, efer });
    }
    let sign = gva >> 47;
    if sign != 0 && sign != 0x1ffff {
        return Err(TranslateError::NonCanonical(gva));
    }
    let mut table = cr3 & ADDR_MASK;
    for level in (1..=4u8).rev() {
        let shift = 12 + 9 * u32::from(level - 1);
        let index = (gva >> shift) & 0x1ff;
        let entry_addr = table + index * 8;
        let entry: u64 = mem
            .read_obj(GuestAddress(entry_addr))
            .map_err(|_| TranslateError::TableOutsideRam(entry_addr))?;
        if entry & P == 0 {
            return Err(TranslateError::NotMapped { gva, level, entry });
        }
        let leaf = level == 1 || ((level == 2 || level == 3) && entry & PS != 0);
        if leaf {
            let page_size = 1u64 << shift;
            let base = entry & ADDR_MASK & !(page_size - 1);
            return Ok(GuestTranslation {
                gva,
                gpa: base | (gva & (page_size - 1)),
                guest_page_size: page_size,
            });
        }
        table = entry & ADDR_MASK;
    }
    Err(TranslateError::NotMapped {
        gva,
        level: 1,
        entry: 0,
    })
}
