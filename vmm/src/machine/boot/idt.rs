//! The IDT and the exception stubs it points at. Each stub reports its vector to the VMM on
//! [`PORT_EXCEPTION`] and halts, so a guest fault becomes a clear error instead of a silent triple
//! fault. The stubs are VMM code in VMM-owned low memory; guests may install their own IDT.

use cowvm_guest::protocol::PORT_EXCEPTION;

use crate::layout::{CODE_SELECTOR, EXCEPTION_STUBS_START, EXCEPTION_STUB_SIZE, IDT_ENTRIES};

// The stubs use the immediate form of `out`, which takes an 8-bit port.
const _: () = assert!(PORT_EXCEPTION <= 0xff);

/// Present, DPL 0, 64-bit interrupt gate.
const INTERRUPT_GATE: u64 = 0x8e;

/// Exception vectors for which the CPU pushes an error code.
pub const fn has_error_code(vector: u8) -> bool {
    matches!(vector, 8 | 10 | 11 | 12 | 13 | 14 | 17 | 21 | 29 | 30)
}

/// A 16-byte IDT gate for a handler at `offset` in the code segment, as two little-endian qwords.
pub const fn gate(offset: u64) -> [u64; 2] {
    let low =
        (offset & 0xffff) | ((CODE_SELECTOR as u64) << 16) | (INTERRUPT_GATE << 40) | (((offset >> 16) & 0xffff) << 48);
    [low, offset >> 32]
}

/// The IDT: one gate per vector, each pointing at its stub.
pub fn table() -> Vec<u64> {
    (0..IDT_ENTRIES as u64)
        .flat_map(|vector| gate(EXCEPTION_STUBS_START.0 + vector * EXCEPTION_STUB_SIZE))
        .collect()
}

/// Machine code of the stub for `vector`: `mov al, vector; out PORT_EXCEPTION, al; 1: hlt; jmp 1b`.
pub const fn stub(vector: u8) -> [u8; EXCEPTION_STUB_SIZE as usize] {
    [0xb0, vector, 0xe6, PORT_EXCEPTION as u8, 0xf4, 0xeb, 0xfd, 0x90]
}

/// All stubs, back to back.
pub fn stubs() -> Vec<u8> {
    (0..IDT_ENTRIES as u8).flat_map(stub).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_gate_splits_the_handler_offset_across_the_descriptor() {
        let [low, high] = gate(0x1234_5678_9abc_def0);
        assert_eq!(low & 0xffff, 0xdef0);
        assert_eq!((low >> 48) & 0xffff, 0x9abc);
        assert_eq!(high, 0x1234_5678);
        assert_eq!((low >> 16) & 0xffff, u64::from(CODE_SELECTOR));
    }
}
