//! Every guest physical address the VMM uses and the units they are counted in, in one leaf
//! module that imports nothing from the crate (low memory after Firecracker's long-mode layout).
//! Everything below [`KERNEL_START`] belongs to the VMM.

use vm_memory::GuestAddress;

/// Host page size: the granularity of guest RAM, sharing and copy-on-write.
pub const PAGE_SIZE: u64 = 4096;
/// One KiB in bytes.
pub const KIB: u64 = 1 << 10;
/// One MiB in bytes.
pub const MIB: u64 = 1 << 20;
/// One GiB in bytes.
pub const GIB: u64 = 1 << 30;

/// `mib` MiB in bytes, saturating instead of overflowing.
pub const fn mib(mib: u64) -> u64 {
    mib.saturating_mul(MIB)
}

/// Whole MiB in `bytes` (rounded down).
pub const fn bytes_to_mib(bytes: u64) -> u64 {
    bytes / MIB
}

/// Bytes as fractional MiB, for reports.
pub fn as_mib_f64(bytes: u64) -> f64 {
    bytes as f64 / MIB as f64
}

/// The GDT: null, 64-bit code, data, and a 16-byte TSS descriptor.
pub const GDT_START: GuestAddress = GuestAddress(0x500);
/// Number of 8-byte GDT slots (the TSS descriptor takes two).
pub const GDT_SLOTS: usize = 5;
/// The IDT, right after the GDT (16-byte aligned).
pub const IDT_START: GuestAddress = GuestAddress(0x530);
/// IDT gates: one per architectural exception vector.
pub const IDT_ENTRIES: usize = 32;
/// The exception stubs the IDT points at, one per vector.
pub const EXCEPTION_STUBS_START: GuestAddress = GuestAddress(0x800);
/// Bytes per exception stub.
pub const EXCEPTION_STUB_SIZE: u64 = 8;
/// The 64-bit TSS that TR points at (104 bytes, all zero).
pub const TSS_START: GuestAddress = GuestAddress(0x900);
/// Size of the 64-bit TSS.
pub const TSS_SIZE: u64 = 104;
/// Initial stack pointer; the stack grows down into the page below the page tables. The built-in
/// guest never uses it: only an exception frame lands there.
pub const STACK_TOP: GuestAddress = GuestAddress(0x8ff0);
/// Stack pages of vCPUs 1 and up, one page each (vCPU 0 keeps [`STACK_TOP`]); vCPU `i` gets
/// the page at `VCPU_STACKS_START + (i - 1) * 4096`. Like vCPU 0's, they only ever hold exception
/// frames of the built-in guest.
pub const VCPU_STACKS_START: GuestAddress = GuestAddress(0x6_0000);
/// Most vCPUs a VM may have: one stack page each fits below the mailbox.
pub const MAX_VCPUS: usize = 32;

/// The initial stack pointer of vCPU `index` (`index < MAX_VCPUS`).
pub const fn stack_top(index: usize) -> GuestAddress {
    if index == 0 {
        STACK_TOP
    } else {
        GuestAddress(VCPU_STACKS_START.0 + index as u64 * 4096 - 0x10)
    }
}

/// Page-map level 4 table.
pub const PML4_START: GuestAddress = GuestAddress(0x9000);
/// Page-directory-pointer table (the first 512 GiB).
pub const PDPT_START: GuestAddress = GuestAddress(0xa000);
/// First page directory (2 MiB pages); one 4 KiB directory per GiB of RAM follows.
pub const PD_START: GuestAddress = GuestAddress(0xb000);
/// Page directories reserved for 2 MiB mappings, which bounds RAM to [`MAX_MEMORY`].
pub const MAX_PAGE_DIRECTORIES: u64 = 64;
/// Where guest kernels are loaded; ELF segments below it are refused.
pub const KERNEL_START: GuestAddress = GuestAddress(0x10_0000);

/// Guest ABI v1 mailbox (docs/guest-abi.md): a header, then the input buffer, in one 256 KiB
/// range; the output buffer in the next. The VMM writes the header and input before each call,
/// the guest writes the output and the header's `output_len`.
pub const MAILBOX_START: GuestAddress = GuestAddress(0x8_0000);
/// Size of the mailbox header (see [`crate::hypercall::header`]).
pub const MAILBOX_HEADER_SIZE: u64 = 0x40;
/// The call's input, right after the header.
pub const MAILBOX_INPUT: GuestAddress = GuestAddress(MAILBOX_START.0 + MAILBOX_HEADER_SIZE);
/// Largest input a call may pass.
pub const MAILBOX_INPUT_SIZE: u64 = 0x4_0000 - MAILBOX_HEADER_SIZE;
/// The call's output.
pub const MAILBOX_OUTPUT: GuestAddress = GuestAddress(0xc_0000);
/// Largest output a call may return.
pub const MAILBOX_OUTPUT_SIZE: u64 = 0x4_0000;

/// The built-in guest's data area: the first address its commands, probes and warm-up touch by
/// convention (the guest image and its own stack lie below).
pub const DATA_START: GuestAddress = GuestAddress(8 * MIB);

/// The xAPIC MMIO page. KVM's instruction emulator treats every access to this page as MMIO,
/// whatever memslot covers it (`vcpu_is_mmio_gpa` in arch/x86/kvm/x86.c), and on hosts without
/// hardware virtualisation every guest instruction is emulated: in guests larger than 4078 MiB
/// this one page of RAM cannot be used.
pub const APIC_PAGE: GuestAddress = GuestAddress(0xfee0_0000);

/// Largest guest RAM the identity map covers (64 page directories × 1 GiB).
pub const MAX_MEMORY: u64 = MAX_PAGE_DIRECTORIES * GIB;
/// Smallest guest RAM: the VMM's low memory, the kernel and room for it to work.
pub const MIN_MEMORY: u64 = 4 * MIB;

/// GDT selectors (byte offsets into the GDT).
pub const CODE_SELECTOR: u16 = 0x08;
/// Data and stack segment selector.
pub const DATA_SELECTOR: u16 = 0x10;
/// Task register selector.
pub const TSS_SELECTOR: u16 = 0x18;

// The structures above must not overlap; checked at compile time.
const _: () = {
    assert!(GDT_START.0 + GDT_SLOTS as u64 * 8 <= IDT_START.0);
    assert!(IDT_START.0 + IDT_ENTRIES as u64 * 16 <= EXCEPTION_STUBS_START.0);
    assert!(EXCEPTION_STUBS_START.0 + IDT_ENTRIES as u64 * EXCEPTION_STUB_SIZE <= TSS_START.0);
    assert!(TSS_START.0 + TSS_SIZE <= STACK_TOP.0 - 4096);
    assert!(STACK_TOP.0 < PML4_START.0);
    assert!(PML4_START.0 + 4096 <= PDPT_START.0 && PDPT_START.0 + 4096 <= PD_START.0);
    assert!(PD_START.0 + MAX_PAGE_DIRECTORIES * 4096 <= VCPU_STACKS_START.0);
    assert!(VCPU_STACKS_START.0 + (MAX_VCPUS as u64 - 1) * 4096 <= MAILBOX_START.0);
    assert!(MAILBOX_INPUT.0 + MAILBOX_INPUT_SIZE <= MAILBOX_OUTPUT.0);
    assert!(MAILBOX_OUTPUT.0 + MAILBOX_OUTPUT_SIZE <= KERNEL_START.0);
    assert!(KERNEL_START.0 < DATA_START.0);
};
