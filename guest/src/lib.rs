//! cowvm's default guest kernel and the register protocol the VMM speaks with it.
//!
//! The guest is x86-64 assembly (`asm/guest.S`) assembled and linked by `build.rs` with the
//! system binutils; [`GUEST_ELF`] is the resulting static ELF, loaded by the VMM at 1 MiB.
//! [`HELLO_ELF`] is the C SDK's example guest (guest ABI v1, docs/guest-abi.md).

#![no_std]

/// The register protocol: ports, command codes, status codes.
pub mod protocol {
    include!("protocol.rs");

    /// One step of the guest's checksum, for the host to compute the expected value.
    pub const fn checksum_step(sum: u64, value: u64) -> u64 {
        sum.rotate_left(CHECKSUM_ROTATE).wrapping_add(value)
    }
}

/// The guest kernel as a static x86-64 ELF image.
pub static GUEST_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/guest.elf"));

/// The C SDK's hello example (`sdk/examples/hello.c`), a guest-ABI-v1 program: it answers every
/// call with "hello, " and its input.
pub static HELLO_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/hello.elf"));

/// The C SDK's empty example (`sdk/examples/empty.c`): every call returns status 0 and no
/// output; `cowvm bench call` measures the cost of a call with it.
pub static EMPTY_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/empty.elf"));
