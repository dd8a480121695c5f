//! The long-mode boot path: the VMM writes the GDT, IDT, exception stubs and identity page tables
//! into guest RAM and sets the vCPU's registers so that it starts directly in 64-bit mode.

pub mod gdt;
pub mod idt;
pub use crate::layout;
pub mod page_tables;

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub use page_tables::IdentityPageSize;

use crate::layout::*;

/// CR0: protected mode, monitor coprocessor, extension type, numeric error, write protect, paging.
const CR0_LONG_MODE: u64 = 0x1 | 0x2 | 0x10 | 0x20 | 0x1_0000 | 0x8000_0000;
/// CR4: PAE, OSFXSR, OSXMMEXCPT.
const CR4_LONG_MODE: u64 = 0x20 | 0x200 | 0x400;
/// EFER: long mode enable and active.
const EFER_LONG_MODE: u64 = 0x100 | 0x400;
/// RFLAGS with only the always-one bit.
const RFLAGS_RESERVED: u64 = 0x2;

/// Errors from writing boot structures.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// Guest RAM is smaller or larger than the boot layout supports.
    #[error("guest RAM of {size} bytes is outside the supported {MIN_MEMORY}..={MAX_MEMORY} bytes")]
    MemorySize {
        /// The size asked for.
        size: u64,
    },
    /// Writing a structure into guest RAM failed.
    #[error("writing the {what} at {addr:#x} into guest RAM failed: {source}")]
    Write {
        /// Which structure.
        what: &'static str,
        /// Where.
        addr: u64,
        /// vm-memory's error.
        source: vm_memory::GuestMemoryError,
    },
}

/// The GDT image: null, code, data, TSS (two slots).
pub fn gdt() -> [u64; GDT_SLOTS] {
    [
        0,
        gdt::descriptor(gdt::CODE64_FLAGS, 0, 0xfffff),
        gdt::descriptor(gdt::DATA_FLAGS, 0, 0xfffff),
        gdt::descriptor(gdt::TSS_FLAGS, TSS_START.0 as u32, (TSS_SIZE - 1) as u32),
        0, // upper half of the 16-byte TSS descriptor: base bits 63..32 = 0
    ]
}

fn write_qwords(
    mem: &GuestMemoryMmap,
    what: &'static str,
    addr: GuestAddress,
    qwords: &[u64],
) -> Result<(), BootError> {
    let bytes: Vec<u8> = qwords.iter().flat_map(|q| q.to_le_bytes()).collect();
    write_bytes(mem, what, addr, &bytes)
}

fn write_bytes(mem: &GuestMemoryMmap, what: &'static str, addr: GuestAddress, bytes: &[u8]) -> Result<(), BootError> {
    mem.write_slice(bytes, addr).map_err(|source| BootError::Write {
        what,
        addr: addr.0,
        source,
    })
}

/// Checks that `size` bytes of RAM fit the boot layout.
pub fn check_memory_size(size: u64) -> Result<(), BootError> {
    if (MIN_MEMORY..=MAX_MEMORY).contains(&size) {
        Ok(())
    } else {
        Err(BootError::MemorySize { size })
    }
}

/// Writes the GDT, IDT, exception stubs and identity page tables for `memory_size` bytes of RAM.
pub fn write_boot_structures(
    mem: &GuestMemoryMmap,
    memory_size: u64,
    page_size: IdentityPageSize,
) -> Result<(), BootError> {
    check_memory_size(memory_size)?;
    write_qwords(mem, "GDT", GDT_START, &gdt())?;
    write_qwords(mem, "IDT", IDT_START, &idt::table())?;
    write_bytes(mem, "exception stubs", EXCEPTION_STUBS_START, &idt::stubs())?;
    let map = page_tables::identity_map(memory_size, page_size);
    write_qwords(mem, "PML4", PML4_START, &map.pml4)?;
    write_qwords(mem, "PDPT", PDPT_START, &map.pdpt)?;
    if !map.page_directories.is_empty() {
        write_qwords(mem, "page directories", PD_START, &map.page_directories)?;
    }
    Ok(())
}

/// Sets `sregs` for 64-bit long mode on the VMM's GDT, IDT and page tables.
pub fn long_mode_sregs(sregs: &mut kvm_sregs) {
    let gdt = gdt();
    let code = gdt::segment(gdt[1], CODE_SELECTOR);
    let data = gdt::segment(gdt[2], DATA_SELECTOR);
    sregs.gdt.base = GDT_START.0;
    sregs.gdt.limit = (GDT_SLOTS * 8 - 1) as u16;
    sregs.idt.base = IDT_START.0;
    sregs.idt.limit = (IDT_ENTRIES * 16 - 1) as u16;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = gdt::segment(gdt[3], TSS_SELECTOR);
    sregs.cr0 = CR0_LONG_MODE;
    sregs.cr3 = PML4_START.0;
    sregs.cr4 = CR4_LONG_MODE;
    sregs.efer = EFER_LONG_MODE;
}

/// Gives vCPU `index` its identity in `sregs`: GS base = `index`, which the guest reads with
/// `rdmsr` of `IA32_GS_BASE` (see the guest protocol's `MSR_VCPU_ID`).
pub fn set_vcpu_id(sregs: &mut kvm_sregs, index: usize) {
    sregs.gs.base = index as u64;
}

/// General registers at entry of vCPU `index`: `rip = entry`, its own stack, interrupts off.
pub fn entry_regs(entry: GuestAddress, index: usize) -> kvm_regs {
    let stack = stack_top(index).0;
    kvm_regs {
        rip: entry.0,
        rsp: stack,
        rbp: stack,
        rflags: RFLAGS_RESERVED,
        ..Default::default()
    }
}

/// x87 and SSE control words at reset values (masked exceptions).
pub fn initial_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_every_gdt_descriptor_is_accessed_or_busy() {
        for entry in &gdt()[1..4] {
            assert_eq!(
                (entry >> 40) & 1,
                1,
                "descriptor {entry:#x} lacks the Accessed/busy bit"
            );
        }
    }
}
