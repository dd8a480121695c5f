//! The commands cowvm's built-in guest executes, loaded into registers before `KVM_RUN` so that
//! the host never writes a guest page to give an order.

use cowvm_guest::protocol::*;
use kvm_bindings::kvm_regs;
use serde::{Deserialize, Serialize};
use vm_memory::GuestAddress;

use crate::layout::APIC_PAGE;
use crate::layout::PAGE_SIZE;

/// Most elements (qwords) one write or checksum command may touch; each costs a few emulated
/// instructions, so this bounds a command to well under a second.
pub const MAX_ELEMENTS: u64 = 1 << 20;

/// A command for the built-in guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestCommand {
    /// Report done at once.
    Exit,
    /// Store `value` at `start + i * stride` for `i in 0..count`.
    Write {
        /// First guest physical address (8-byte aligned).
        start: GuestAddress,
        /// Number of qwords.
        count: u64,
        /// Distance between them in bytes (a multiple of 8).
        stride: u64,
        /// The qword stored.
        value: u64,
    },
    /// Checksum the qwords at `start + i * stride` for `i in 0..count`.
    Checksum {
        /// First guest physical address (8-byte aligned).
        start: GuestAddress,
        /// Number of qwords.
        count: u64,
        /// Distance between them in bytes (a multiple of 8).
        stride: u64,
    },
    /// Report the identity registers (generation id and seed).
    Identity,
    /// Raise an exception with an empty IDT: a triple fault.
    TripleFault,
    /// Loop forever.
    Spin,
    /// `hlt` with interrupts disabled.
    Halt,
}

/// Why a command was refused before it reached the guest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// Addresses or stride are not 8-byte aligned.
    #[error("address {start:#x} and stride {stride} must be multiples of 8")]
    Misaligned {
        /// First address.
        start: u64,
        /// Stride.
        stride: u64,
    },
    /// Too many elements.
    #[error("count {count} exceeds the limit of {MAX_ELEMENTS} qwords per command")]
    TooMany {
        /// Requested count.
        count: u64,
    },
    /// The range leaves guest RAM.
    #[error("range {start:#x}..{end:#x} is outside guest RAM (0..{memory_size:#x})")]
    OutsideRam {
        /// First address.
        start: u64,
        /// One past the last byte touched (saturated).
        end: u64,
        /// RAM size.
        memory_size: u64,
    },
    /// The range touches the xAPIC page, which KVM always treats as MMIO.
    #[error("range {start:#x}..{end:#x} touches the xAPIC page at {:#x}, which KVM treats as MMIO, not RAM", APIC_PAGE.0)]
    ApicPage {
        /// First address.
        start: u64,
        /// One past the last byte.
        end: u64,
    },
    /// A write would overwrite the VMM's boot structures or the kernel image.
    #[error("write range {start:#x}..{end:#x} overlaps the guest's page tables, descriptor tables or kernel (below {protected_end:#x})")]
    Protected {
        /// First address.
        start: u64,
        /// One past the last byte.
        end: u64,
        /// End of the protected low memory.
        protected_end: u64,
    },
}

/// What the guest returned for a command. It crosses the cell protocol (postcard, which is
/// not self-describing): no field may be skipped when serialising.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandOutput {
    /// Status from the done port (0 = ok).
    pub status: u32,
    /// rbx: the checksum, or the generation id for [`GuestCommand::Identity`].
    pub result: u64,
    /// rcx: the seed for [`GuestCommand::Identity`].
    pub extra: u64,
    /// rdx for [`GuestCommand::Identity`]: the index of the vCPU that ran it, as the guest read
    /// it from its own GS base; `None` for other commands.
    pub vcpu: Option<u64>,
}

impl GuestCommand {
    /// Checks that the command touches only RAM below `memory_size`, and writes nothing below
    /// `protected_end`.
    pub fn validate(&self, memory_size: u64, protected_end: u64) -> Result<(), CommandError> {
        let (start, count, stride, writes) = match *self {
            GuestCommand::Write {
                start, count, stride, ..
            } => (start.0, count, stride, true),
            GuestCommand::Checksum { start, count, stride } => (start.0, count, stride, false),
            _ => return Ok(()),
        };
        if start % 8 != 0 || stride % 8 != 0 {
            return Err(CommandError::Misaligned { start, stride });
        }
        if count > MAX_ELEMENTS {
            return Err(CommandError::TooMany { count });
        }
        if count == 0 {
            return Ok(());
        }
        let end = (count - 1)
            .checked_mul(stride)
            .and_then(|span| span.checked_add(start))
            .and_then(|last| last.checked_add(8))
            .unwrap_or(u64::MAX);
        if end > memory_size {
            return Err(CommandError::OutsideRam {
                start,
                end,
                memory_size,
            });
        }
        let apic = APIC_PAGE.0..APIC_PAGE.0 + PAGE_SIZE;
        let hits_apic = if stride == 0 {
            apic.contains(&start)
        } else {
            // The first element at or after the APIC page, if it is still in range.
            let first = apic.start.saturating_sub(start).div_ceil(stride);
            first < count && apic.contains(&(start + first * stride))
        };
        if hits_apic {
            return Err(CommandError::ApicPage { start, end });
        }
        if writes && start < protected_end {
            return Err(CommandError::Protected {
                start,
                end,
                protected_end,
            });
        }
        Ok(())
    }

    /// Loads the command into the registers the guest reads it from.
    pub fn load(&self, regs: &mut kvm_regs) {
        let (code, rdi, rsi, rdx, rcx) = match *self {
            GuestCommand::Exit => (CMD_EXIT, 0, 0, 0, 0),
            GuestCommand::Write {
                start,
                count,
                stride,
                value,
            } => (CMD_WRITE, start.0, count, stride, value),
            GuestCommand::Checksum { start, count, stride } => (CMD_CHECKSUM, start.0, count, stride, 0),
            GuestCommand::Identity => (CMD_IDENTITY, 0, 0, 0, 0),
            GuestCommand::TripleFault => (CMD_TRIPLE_FAULT, 0, 0, 0, 0),
            GuestCommand::Spin => (CMD_SPIN, 0, 0, 0, 0),
            GuestCommand::Halt => (CMD_HALT, 0, 0, 0, 0),
        };
        regs.rax = code;
        regs.rdi = rdi;
        regs.rsi = rsi;
        regs.rdx = rdx;
        regs.rcx = rcx;
    }
}

/// The checksum the guest computes over `values`, for checking its answer on the host.
pub fn expected_checksum(values: impl IntoIterator<Item = u64>) -> u64 {
    values.into_iter().fold(0, checksum_step)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_range_past_ram_is_refused() {
        let cmd = GuestCommand::Checksum {
            start: GuestAddress(0xff8),
            count: 2,
            stride: 8,
        };
        assert!(matches!(
            cmd.validate(0x1000, 0),
            Err(CommandError::OutsideRam { end: 0x1008, .. })
        ));
        assert_eq!(cmd.validate(0x1008, 0), Ok(()));
    }

    #[test]
    fn test_overflowing_stride_is_outside_ram_not_a_panic() {
        let cmd = GuestCommand::Write {
            start: GuestAddress(0x20_0000),
            count: 3,
            stride: u64::MAX - 7,
            value: 0,
        };
        assert!(matches!(cmd.validate(1 << 30, 0), Err(CommandError::OutsideRam { .. })));
    }

    #[test]
    fn test_ranges_that_touch_the_apic_page_are_refused() {
        let four_gib = 4 << 30;
        let hit = GuestCommand::Checksum {
            start: GuestAddress(4 << 20),
            count: 4092,
            stride: 1 << 20,
        };
        assert!(matches!(hit.validate(four_gib, 0), Err(CommandError::ApicPage { .. })));
        let miss = GuestCommand::Checksum {
            start: GuestAddress((4 << 20) + 8192),
            count: 4092,
            stride: 1 << 20,
        };
        assert_eq!(miss.validate(four_gib, 0), Ok(()));
        let single = GuestCommand::Write {
            start: GuestAddress(0xfee0_0ff8),
            count: 1,
            stride: 0,
            value: 0,
        };
        assert!(matches!(
            single.validate(four_gib, 0),
            Err(CommandError::ApicPage { .. })
        ));
    }

    #[test]
    fn test_write_into_protected_low_memory_is_refused() {
        let cmd = GuestCommand::Write {
            start: GuestAddress(0x9000),
            count: 1,
            stride: 8,
            value: 0,
        };
        assert!(matches!(
            cmd.validate(1 << 30, 0x10_1000),
            Err(CommandError::Protected { .. })
        ));
        let read = GuestCommand::Checksum {
            start: GuestAddress(0x9000),
            count: 1,
            stride: 8,
        };
        assert_eq!(read.validate(1 << 30, 0x10_1000), Ok(()));
    }
}
