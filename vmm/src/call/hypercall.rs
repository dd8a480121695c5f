//! Guest ABI v1 (docs/guest-abi.md): the hypercalls a user's guest makes by port I/O, the layout
//! of the mailbox header, and the checks the VMM applies to every hypercall before it acts on it.
//!
//! A hypercall is `out PORT_HYPERCALL, eax` with eax = the number and rdi / rsi = the arguments;
//! it exits to the VMM as a port write, and the VMM reads the arguments from the registers that
//! KVM synchronised at the exit. The VMM never writes a register to answer.

use kvm_bindings::kvm_regs;

use crate::exit::GuestExit;

/// The ABI version the VMM writes into the mailbox header.
pub const ABI_VERSION: u64 = 1;
/// The port a hypercall writes its number to.
pub const PORT_HYPERCALL: u16 = 0xf2;
/// `log(ptr, len)`: append `len` bytes at guest address `ptr` to the VM's log.
pub const HC_LOG: u32 = 1;
/// `ready()`: initialisation finished; the VM stops here and this is the template point.
pub const HC_READY: u32 = 2;
/// `done(status)`: the call finished; `output_len` bytes of output are in the mailbox.
pub const HC_DONE: u32 = 3;
/// `abort(code)`: the guest gives up; the call (or boot) fails with `code`.
pub const HC_ABORT: u32 = 4;
/// Most bytes one `log` may pass.
pub const LOG_MAX: u64 = 4096;

/// Byte offsets of the mailbox header's fields (little-endian u64 each) from
/// [`crate::layout::MAILBOX_START`].
pub mod header {
    /// [`super::ABI_VERSION`], written by the VMM.
    pub const ABI_VERSION: u64 = 0x00;
    /// Bytes of input, written by the VMM.
    pub const INPUT_LEN: u64 = 0x08;
    /// Bytes of output, written by the guest before `done`.
    pub const OUTPUT_LEN: u64 = 0x10;
    /// The clone's generation id, written by the VMM.
    pub const GENERATION: u64 = 0x18;
    /// The clone's random seed, written by the VMM.
    pub const SEED: u64 = 0x20;
}

/// A decoded, checked hypercall.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hypercall {
    /// `log(ptr, len)`, with the range already checked to lie in guest RAM.
    Log {
        /// Guest address (identity mapped: virtual = physical).
        ptr: u64,
        /// Bytes.
        len: u64,
    },
    /// `ready()`.
    Ready,
    /// `done(status)`.
    Done {
        /// The call's status.
        status: u32,
    },
    /// `abort(code)`.
    Abort {
        /// The guest's code.
        code: u32,
    },
}

impl Hypercall {
    /// Its name in the ABI.
    pub fn name(&self) -> &'static str {
        match self {
            Hypercall::Log { .. } => "log",
            Hypercall::Ready => "ready",
            Hypercall::Done { .. } => "done",
            Hypercall::Abort { .. } => "abort",
        }
    }
}

/// A hypercall the VMM refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HypercallError {
    /// Not one of the ABI's numbers.
    #[error("unknown hypercall number {0}")]
    UnknownNumber(u32),
    /// The port write was not 4 bytes wide (`out PORT, eax`).
    #[error("hypercall port written with {0} bytes; the ABI uses `out {PORT_HYPERCALL:#x}, eax`")]
    AccessSize(u8),
    /// A pointer argument leaves guest RAM.
    #[error("log range {ptr:#x}+{len} is outside guest RAM (0..{memory_size:#x})")]
    OutsideRam {
        /// The pointer.
        ptr: u64,
        /// The length.
        len: u64,
        /// RAM size.
        memory_size: u64,
    },
    /// A length beyond what the ABI allows.
    #[error("log of {len} bytes exceeds the limit of {LOG_MAX} bytes per log")]
    TooLong {
        /// The length.
        len: u64,
    },
}

/// Whether `exit` is a hypercall (a write to [`PORT_HYPERCALL`]).
pub fn is_hypercall(exit: &GuestExit) -> bool {
    matches!(exit, GuestExit::IoOut { port, .. } if *port == PORT_HYPERCALL)
}

/// Decodes and checks the hypercall behind `exit`, with its arguments read from `regs`; `None`
/// when the exit is not a hypercall.
pub fn decode(exit: &GuestExit, regs: &kvm_regs, memory_size: u64) -> Option<Result<Hypercall, HypercallError>> {
    let GuestExit::IoOut { port, size, value } = *exit else {
        return None;
    };
    if port != PORT_HYPERCALL {
        return None;
    }
    if size != 4 {
        return Some(Err(HypercallError::AccessSize(size)));
    }
    Some(match value {
        HC_LOG => check_log(regs.rdi, regs.rsi, memory_size),
        HC_READY => Ok(Hypercall::Ready),
        HC_DONE => Ok(Hypercall::Done {
            status: regs.rdi as u32,
        }),
        HC_ABORT => Ok(Hypercall::Abort { code: regs.rdi as u32 }),
        other => Err(HypercallError::UnknownNumber(other)),
    })
}

fn check_log(ptr: u64, len: u64, memory_size: u64) -> Result<Hypercall, HypercallError> {
    if len > LOG_MAX {
        return Err(HypercallError::TooLong { len });
    }
    match ptr.checked_add(len) {
        Some(end) if end <= memory_size => Ok(Hypercall::Log { ptr, len }),
        _ => Err(HypercallError::OutsideRam { ptr, len, memory_size }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::*;

    fn out(value: u32) -> GuestExit {
        GuestExit::IoOut {
            port: PORT_HYPERCALL,
            size: 4,
            value,
        }
    }

    fn regs(rdi: u64, rsi: u64) -> kvm_regs {
        kvm_regs {
            rdi,
            rsi,
            ..Default::default()
        }
    }

    #[test]
    fn test_log_pointer_outside_ram_is_refused() {
        let mib = 1 << 20;
        assert_eq!(
            decode(&out(HC_LOG), &regs(mib - 4, 4), mib),
            Some(Ok(Hypercall::Log { ptr: mib - 4, len: 4 }))
        );
        assert!(matches!(
            decode(&out(HC_LOG), &regs(mib - 4, 5), mib),
            Some(Err(HypercallError::OutsideRam { .. }))
        ));
        assert!(matches!(
            decode(&out(HC_LOG), &regs(u64::MAX - 1, 8), mib),
            Some(Err(HypercallError::OutsideRam { .. }))
        ));
        assert_eq!(
            decode(&out(HC_LOG), &regs(0, LOG_MAX + 1), mib),
            Some(Err(HypercallError::TooLong { len: LOG_MAX + 1 }))
        );
    }

    #[test]
    fn test_unknown_numbers_and_other_ports_are_told_apart() {
        assert_eq!(
            decode(&out(99), &regs(0, 0), 1 << 20),
            Some(Err(HypercallError::UnknownNumber(99)))
        );
        let other = GuestExit::IoOut {
            port: 0x3f8,
            size: 1,
            value: 0,
        };
        assert_eq!(decode(&other, &regs(0, 0), 1 << 20), None);
        let byte = GuestExit::IoOut {
            port: PORT_HYPERCALL,
            size: 1,
            value: HC_DONE,
        };
        assert_eq!(
            decode(&byte, &regs(0, 0), 1 << 20),
            Some(Err(HypercallError::AccessSize(1)))
        );
    }

    /// The C SDK's header spells the same numbers; a drift would break every guest.
    #[test]
    fn test_sdk_header_matches_the_vmm() {
        let text = include_str!("../../../guest/sdk/include/cowvm.h");
        let define = |name: &str| -> u64 {
            let line = text
                .lines()
                .find(|l| l.split_whitespace().nth(1) == Some(name) && l.starts_with("#define"))
                .unwrap_or_else(|| panic!("cowvm.h lacks {name}"));
            let value = line.split_whitespace().nth(2).expect("value").trim_end_matches("UL");
            match value.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16).expect("hex"),
                None => value.parse().expect("decimal"),
            }
        };
        assert_eq!(define("COWVM_ABI_VERSION"), ABI_VERSION);
        assert_eq!(define("COWVM_PORT_HYPERCALL"), u64::from(PORT_HYPERCALL));
        assert_eq!(define("COWVM_HC_LOG"), u64::from(HC_LOG));
        assert_eq!(define("COWVM_HC_READY"), u64::from(HC_READY));
        assert_eq!(define("COWVM_HC_DONE"), u64::from(HC_DONE));
        assert_eq!(define("COWVM_HC_ABORT"), u64::from(HC_ABORT));
        assert_eq!(define("COWVM_LOG_MAX"), LOG_MAX);
        assert_eq!(define("COWVM_MAILBOX"), MAILBOX_START.0);
        assert_eq!(define("COWVM_MAILBOX_INPUT"), MAILBOX_INPUT.0);
        assert_eq!(define("COWVM_MAILBOX_INPUT_SIZE"), MAILBOX_INPUT_SIZE);
        assert_eq!(define("COWVM_MAILBOX_OUTPUT"), MAILBOX_OUTPUT.0);
        assert_eq!(define("COWVM_MAILBOX_OUTPUT_SIZE"), MAILBOX_OUTPUT_SIZE);
        let crt0 = include_str!("../../../guest/sdk/src/crt0.S");
        for (name, value) in [
            ("PORT_HYPERCALL", u64::from(PORT_HYPERCALL)),
            ("HC_LOG", u64::from(HC_LOG)),
            ("HC_READY", u64::from(HC_READY)),
            ("HC_DONE", u64::from(HC_DONE)),
            ("HC_ABORT", u64::from(HC_ABORT)),
        ] {
            let expected = if value > 9 {
                format!(".set {name}, {value:#x}")
            } else {
                format!(".set {name}, {value}")
            };
            assert!(crt0.contains(&expected), "crt0.S lacks `{expected}`");
        }
    }
}
