//! Why a vCPU stopped running guest code, in owned form.

use std::fmt;
use std::time::Duration;

use serde::Serialize;

/// What made the guest return to the VMM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum GuestExit {
    /// The guest finished a command and wrote its status to the done port.
    Done {
        /// Status the guest reported (0 = ok).
        status: u32,
    },
    /// The guest took a CPU exception; the VMM's stub reported it.
    Exception {
        /// Exception vector (14 = page fault, 13 = general protection…).
        vector: u8,
        /// Faulting instruction pointer, from the exception frame.
        rip: u64,
        /// Error code, for vectors that push one.
        error_code: Option<u64>,
        /// CR2 (the faulting address of a page fault).
        cr2: u64,
    },
    /// `out` to a port the VMM does not serve.
    IoOut {
        /// Port number.
        port: u16,
        /// Access size in bytes.
        size: u8,
        /// Value written.
        value: u32,
    },
    /// `in` from a port the VMM does not serve.
    IoIn {
        /// Port number.
        port: u16,
        /// Access size in bytes.
        size: u8,
    },
    /// An access to guest physical memory that is not RAM.
    Mmio {
        /// Guest physical address.
        gpa: u64,
        /// Whether it was a write.
        write: bool,
    },
    /// `hlt` with no interrupt source to wake the vCPU.
    Halt,
    /// The vCPU shut down: a triple fault.
    Shutdown,
    /// KVM could not enter the guest.
    FailEntry {
        /// Hardware entry failure reason.
        reason: u64,
    },
    /// KVM hit an internal error (often an instruction it could not emulate).
    InternalError {
        /// KVM's suberror code.
        suberror: u32,
    },
    /// The guest ran past its deadline and was stopped.
    DeadlineExceeded {
        /// How long it had been running.
        after_ms: u64,
    },
    /// The VMM stopped this vCPU because another vCPU of the same VM faulted.
    Stopped {
        /// The vCPU whose fault stopped this one.
        by_vcpu: usize,
    },
    /// Any other exit reason.
    Other {
        /// KVM's description.
        description: String,
    },
}

impl GuestExit {
    /// A short machine-readable name (`done`, `shutdown`, `deadline_exceeded`…).
    pub fn name(&self) -> &'static str {
        match self {
            GuestExit::Done { .. } => "done",
            GuestExit::Exception { .. } => "exception",
            GuestExit::IoOut { .. } => "io_out",
            GuestExit::IoIn { .. } => "io_in",
            GuestExit::Mmio { .. } => "mmio",
            GuestExit::Halt => "hlt",
            GuestExit::Shutdown => "shutdown",
            GuestExit::FailEntry { .. } => "fail_entry",
            GuestExit::InternalError { .. } => "internal_error",
            GuestExit::DeadlineExceeded { .. } => "deadline_exceeded",
            GuestExit::Stopped { .. } => "stopped",
            GuestExit::Other { .. } => "other",
        }
    }

    /// Whether the guest is broken or stuck (as opposed to exiting to ask for something).
    pub fn is_fault(&self) -> bool {
        !matches!(
            self,
            GuestExit::Done { .. } | GuestExit::IoOut { .. } | GuestExit::IoIn { .. } | GuestExit::Halt
        )
    }

    pub(crate) fn deadline_exceeded(after: Duration) -> Self {
        GuestExit::DeadlineExceeded {
            after_ms: after.as_millis() as u64,
        }
    }
}

impl fmt::Display for GuestExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GuestExit::Done { status } => write!(f, "command done (status {status})"),
            GuestExit::Exception {
                vector,
                rip,
                error_code,
                cr2,
            } => {
                write!(f, "guest exception vector {vector} at rip {rip:#x}")?;
                if let Some(code) = error_code {
                    write!(f, ", error code {code:#x}")?;
                }
                if *vector == 14 {
                    write!(f, ", faulting address {cr2:#x}")?;
                }
                Ok(())
            }
            GuestExit::IoOut { port, size, value } => {
                write!(f, "out to unserved port {port:#x} ({size} bytes, value {value:#x})")
            }
            GuestExit::IoIn { port, size } => write!(f, "in from unserved port {port:#x} ({size} bytes)"),
            GuestExit::Mmio { gpa, write } => {
                let op = if *write { "write" } else { "read" };
                write!(f, "{op} at guest physical {gpa:#x}, outside guest RAM")
            }
            GuestExit::Halt => write!(f, "hlt with no way to wake"),
            GuestExit::Shutdown => write!(f, "triple fault (vCPU shutdown)"),
            GuestExit::FailEntry { reason } => write!(f, "KVM could not enter the guest (reason {reason:#x})"),
            GuestExit::InternalError { suberror } => write!(f, "KVM internal error (suberror {suberror})"),
            GuestExit::DeadlineExceeded { after_ms } => write!(f, "guest still running after {after_ms} ms; stopped"),
            GuestExit::Stopped { by_vcpu } => write!(f, "stopped because vCPU {by_vcpu} faulted"),
            GuestExit::Other { description } => write!(f, "unexpected exit: {description}"),
        }
    }
}
