//! Calls into a user's guest under guest ABI v1 (docs/guest-abi.md): running a freshly booted
//! guest to `ready()` (the template point), and running one call — input copied into the
//! mailbox by a host write, the guest run until `done()`, output read back — either in a fresh
//! clone of a template or in an existing VM that keeps its state.
//!
//! Every hypercall is checked by [`crate::hypercall`]; anything but the next expected hypercall
//! (a fault, a spin past the deadline, a bad argument, an oversized output) ends the call with
//! a typed [`CallError`], never a panic.

pub mod hypercall;
pub mod ready;

use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::{Address, Bytes, GuestAddress};

use crate::clone::CloneEngine;
use crate::exit::GuestExit;
use crate::layout::{MAILBOX_INPUT_SIZE, MAILBOX_OUTPUT, MAILBOX_OUTPUT_SIZE, MAILBOX_START};
use crate::percentile::micros;
use crate::pool::Reservation;
use crate::template::Template;
use crate::vm::{Vm, VmError};
use hypercall::{header, Hypercall, HypercallError, ABI_VERSION};

/// Most log bytes kept per boot or per call; later logs are dropped and the log marked truncated.
pub const LOG_CAPACITY: usize = 64 * 1024;
/// How many bytes of the guest's log an abort error quotes.
const ABORT_LOG_TAIL: usize = 512;

/// Why a call (or the run to `ready()`) failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The input does not fit the mailbox.
    #[error("input of {len} bytes exceeds the mailbox's {MAILBOX_INPUT_SIZE} bytes")]
    InputTooLarge {
        /// Bytes given.
        len: usize,
    },
    /// The guest reported more output than the mailbox holds.
    #[error("the guest reported {len} bytes of output; the mailbox holds {MAILBOX_OUTPUT_SIZE}")]
    OutputTooLarge {
        /// The guest's `output_len`.
        len: u64,
    },
    /// A hypercall with arguments the VMM refuses.
    #[error("bad hypercall: {0}")]
    BadHypercall(#[from] HypercallError),
    /// A valid hypercall at the wrong time (`done` before `ready`, `ready` during a call).
    #[error("hypercall {name}() is not allowed {phase}")]
    UnexpectedHypercall {
        /// The hypercall.
        name: &'static str,
        /// When it came.
        phase: &'static str,
    },
    /// The guest called `abort(code)`.
    #[error("the guest aborted with code {code}{}", tail_note(log_tail))]
    Aborted {
        /// The guest's code.
        code: u32,
        /// The end of its log.
        log_tail: String,
    },
    /// The guest faulted (exception, triple fault, instruction KVM cannot run…).
    #[error("the guest faulted: {0}")]
    Fault(GuestExit),
    /// The guest was still running at its deadline and was stopped.
    #[error("the guest was still running after {after_ms} ms and was stopped")]
    Deadline {
        /// How long it ran.
        after_ms: u64,
    },
    /// The guest exited in a way the ABI does not define (another port, `hlt`…).
    #[error("the guest does not follow guest ABI v1: {0}")]
    NotAbi(GuestExit),
    /// Reading or writing the mailbox failed.
    #[error("mailbox access failed: {0}")]
    Mailbox(vm_memory::GuestMemoryError),
    /// A VM operation failed.
    #[error(transparent)]
    Vm(#[from] VmError),
}

fn tail_note(tail: &str) -> String {
    if tail.is_empty() {
        String::new()
    } else {
        format!("; its log ends: {tail:?}")
    }
}

/// Every code [`CallError::code`] gives.
pub const CALL_ERROR_CODES: [&str; 7] = [
    "input_too_large",
    "output_too_large",
    "bad_hypercall",
    "guest_aborted",
    "guest_fault",
    "deadline_exceeded",
    "not_abi_guest",
];

impl CallError {
    /// The error code an API answers this error with (`None`: a VMM failure, not the guest's).
    pub fn code(&self) -> Option<&'static str> {
        match self {
            CallError::Vm(_) | CallError::Mailbox(_) => None,
            CallError::InputTooLarge { .. } => Some("input_too_large"),
            CallError::OutputTooLarge { .. } => Some("output_too_large"),
            CallError::BadHypercall(_) | CallError::UnexpectedHypercall { .. } => Some("bad_hypercall"),
            CallError::Aborted { .. } => Some("guest_aborted"),
            CallError::Fault(_) => Some("guest_fault"),
            CallError::Deadline { .. } => Some("deadline_exceeded"),
            CallError::NotAbi(_) => Some("not_abi_guest"),
        }
    }

    /// The OS error number behind a VMM failure, when the host refused something.
    pub fn host_errno(&self) -> Option<i32> {
        match self {
            CallError::Vm(vm) => vm.host_errno(),
            _ => None,
        }
    }

    /// Whether the guest can take another call afterwards (it stopped at a hypercall boundary
    /// in a consistent state). A VM whose call failed otherwise should be marked failed.
    pub fn guest_usable(&self) -> bool {
        // A guest that is not an ABI guest answered with its own exit and is where it was
        // (a built-in guest back in its command loop): the VM is not broken by the attempt.
        matches!(
            self,
            CallError::InputTooLarge { .. } | CallError::OutputTooLarge { .. } | CallError::NotAbi(_)
        )
    }
}

/// A guest's log for one boot or call, bounded by [`LOG_CAPACITY`].
#[derive(Debug, Default, Clone)]
pub struct GuestLog {
    bytes: Vec<u8>,
    truncated: bool,
}

impl GuestLog {
    fn push(&mut self, data: &[u8]) {
        let room = LOG_CAPACITY - self.bytes.len();
        if data.len() > room {
            self.truncated = true;
        }
        self.bytes.extend_from_slice(&data[..data.len().min(room)]);
    }

    /// The log as text (invalid UTF-8 replaced).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }

    /// Whether logs were dropped because the log was full.
    pub fn truncated(&self) -> bool {
        self.truncated
    }

    fn tail(&self) -> String {
        let text = self.text();
        let start = text
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| text.len() - i <= ABORT_LOG_TAIL)
            .unwrap_or(text.len());
        text[start..].to_owned()
    }
}

/// What the run to `ready()` produced.
#[derive(Debug, Clone)]
pub struct ReadyReport {
    /// What the guest logged during initialisation.
    pub log: GuestLog,
    /// Microseconds from the first exit to `ready()`.
    pub init_us: f64,
}

/// The answer of one call.
#[derive(Debug, Clone)]
pub struct CallReport {
    /// The status the guest passed to `done`.
    pub status: u32,
    /// The output bytes.
    pub output: Vec<u8>,
    /// What the guest logged during the call.
    pub log: GuestLog,
    /// Microseconds to get a VM ready for the call (clone from a warm shell, mailbox written).
    pub spawn_us: f64,
    /// Microseconds the guest ran (all its `KVM_RUN`s and hypercalls) until `done`.
    pub run_us: f64,
    /// Microseconds for the whole call, output read back included.
    pub total_us: f64,
    /// The generation id the guest saw.
    pub generation: u64,
    /// The seed the guest saw.
    pub seed: u64,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Init,
    Call,
}

impl Phase {
    fn describe(self) -> &'static str {
        match self {
            Phase::Init => "before ready()",
            Phase::Call => "during a call",
        }
    }
}

/// Serves hypercalls until the one that ends `phase` (`ready` for init, `done` for a call);
/// returns the status of `done` (0 for `ready`).
fn serve(
    vm: &mut Vm,
    mut pending: Option<GuestExit>,
    deadline: Duration,
    phase: Phase,
    log: &mut GuestLog,
) -> Result<u32, CallError> {
    let started = Instant::now();
    loop {
        let exit = match pending.take() {
            Some(exit) => exit,
            None => {
                let left = deadline.saturating_sub(started.elapsed());
                if left.is_zero() {
                    return Err(CallError::Deadline {
                        after_ms: started.elapsed().as_millis() as u64,
                    });
                }
                vm.run(Some(left))?
            }
        };
        let memory_size = vm.ram().size();
        let regs = vm.vcpu_mut().regs().map_err(VmError::from)?;
        let call = match hypercall::decode(&exit, &regs, memory_size) {
            Some(call) => call?,
            None => return Err(stopped(exit, started)),
        };
        match (call, phase) {
            (Hypercall::Log { ptr, len }, _) => {
                let mut data = vec![0u8; len as usize];
                vm.ram()
                    .guest_memory()
                    .read_slice(&mut data, GuestAddress(ptr))
                    .map_err(CallError::Mailbox)?;
                log.push(&data);
            }
            (Hypercall::Ready, Phase::Init) => return Ok(0),
            (Hypercall::Done { status }, Phase::Call) => return Ok(status),
            (Hypercall::Abort { code }, _) => {
                return Err(CallError::Aborted {
                    code,
                    log_tail: log.tail(),
                })
            }
            (other, phase) => {
                return Err(CallError::UnexpectedHypercall {
                    name: other.name(),
                    phase: phase.describe(),
                })
            }
        }
    }
}

/// The error for an exit that is not a hypercall.
fn stopped(exit: GuestExit, started: Instant) -> CallError {
    match exit {
        GuestExit::DeadlineExceeded { .. } => CallError::Deadline {
            after_ms: started.elapsed().as_millis() as u64,
        },
        GuestExit::Done { .. } | GuestExit::IoOut { .. } | GuestExit::IoIn { .. } | GuestExit::Halt => {
            CallError::NotAbi(exit)
        }
        fault => CallError::Fault(fault),
    }
}

/// Runs a freshly booted guest whose first exit was `first_exit` until it calls `ready()`.
/// Afterwards the VM is stopped at the template point: snapshot it, or call it.
pub fn run_to_ready(vm: &mut Vm, first_exit: GuestExit, deadline: Duration) -> Result<ReadyReport, CallError> {
    let started = Instant::now();
    let mut log = GuestLog::default();
    serve(vm, Some(first_exit), deadline, Phase::Init, &mut log)?;
    Ok(ReadyReport {
        log,
        init_us: micros(started.elapsed()),
    })
}

/// Writes the mailbox header (ABI version, input length, output length 0, identity) and the
/// input with one host write.
fn write_mailbox(vm: &Vm, input: &[u8], generation: u64, seed: u64) -> Result<(), CallError> {
    let mut image = vec![0u8; header::SEED as usize + 8];
    let mut put = |offset: u64, value: u64| {
        image[offset as usize..offset as usize + 8].copy_from_slice(&value.to_le_bytes());
    };
    put(header::ABI_VERSION, ABI_VERSION);
    put(header::INPUT_LEN, input.len() as u64);
    put(header::OUTPUT_LEN, 0);
    put(header::GENERATION, generation);
    put(header::SEED, seed);
    image.resize(crate::layout::MAILBOX_HEADER_SIZE as usize, 0);
    image.extend_from_slice(input);
    vm.ram()
        .guest_memory()
        .write_slice(&image, MAILBOX_START)
        .map_err(CallError::Mailbox)
}

fn read_output(vm: &Vm) -> Result<Vec<u8>, CallError> {
    let mem = vm.ram().guest_memory();
    let len: u64 = mem
        .read_obj(MAILBOX_START.unchecked_add(header::OUTPUT_LEN))
        .map_err(CallError::Mailbox)?;
    if len > MAILBOX_OUTPUT_SIZE {
        return Err(CallError::OutputTooLarge { len });
    }
    let mut output = vec![0u8; len as usize];
    mem.read_slice(&mut output, MAILBOX_OUTPUT)
        .map_err(CallError::Mailbox)?;
    Ok(output)
}

fn check_input(input: &[u8]) -> Result<(), CallError> {
    if input.len() as u64 > MAILBOX_INPUT_SIZE {
        return Err(CallError::InputTooLarge { len: input.len() });
    }
    Ok(())
}

/// Runs one call in `vm`, which must be stopped at `ready()` or at the `done()` of its previous
/// call; the VM keeps whatever the call changes. `generation` and `seed` are what the guest
/// reads as its identity.
pub fn call_vm(
    vm: &mut Vm,
    input: &[u8],
    generation: u64,
    seed: u64,
    deadline: Duration,
) -> Result<CallReport, CallError> {
    check_input(input)?;
    let started = Instant::now();
    write_mailbox(vm, input, generation, seed)?;
    let spawn_us = micros(started.elapsed());
    finish_call(vm, started, spawn_us, generation, seed, deadline)
}

fn finish_call(
    vm: &mut Vm,
    started: Instant,
    spawn_us: f64,
    generation: u64,
    seed: u64,
    deadline: Duration,
) -> Result<CallReport, CallError> {
    let run_started = Instant::now();
    let mut log = GuestLog::default();
    let status = serve(vm, None, deadline, Phase::Call, &mut log)?;
    let run_us = micros(run_started.elapsed());
    let output = read_output(vm)?;
    Ok(CallReport {
        status,
        output,
        log,
        spawn_us,
        run_us,
        total_us: micros(started.elapsed()),
        generation,
        seed,
    })
}

/// Runs one call in a fresh clone of `template` (from a warm shell when one is ready), then
/// tears the clone down in the background.
pub fn call_template(
    engine: &CloneEngine,
    template: &Arc<Template>,
    input: &[u8],
    deadline: Duration,
) -> Result<CallReport, CallError> {
    call_in_clone(engine, template, None, input, deadline)
}

/// Like [`call_template`], in the room `reservation` holds (see [`CloneEngine::reserve`]): the
/// clone takes the warm shell the reservation claimed and counts against its limits.
pub fn call_template_reserved(
    engine: &CloneEngine,
    template: &Arc<Template>,
    reservation: &mut Reservation,
    input: &[u8],
    deadline: Duration,
) -> Result<CallReport, CallError> {
    call_in_clone(engine, template, Some(reservation), input, deadline)
}

fn call_in_clone(
    engine: &CloneEngine,
    template: &Arc<Template>,
    reservation: Option<&mut Reservation>,
    input: &[u8],
    deadline: Duration,
) -> Result<CallReport, CallError> {
    check_input(input)?;
    let started = Instant::now();
    let _busy = engine.busy();
    let mut clone = match reservation {
        Some(room) => engine.spawn_idle_reserved(template, room)?,
        None => engine.spawn_idle(template)?,
    };
    let (generation, seed) = (clone.generation(), clone.seed());
    let result = write_mailbox(clone.vm(), input, generation, seed).and_then(|()| {
        let spawn_us = micros(started.elapsed());
        finish_call(clone.vm_mut(), started, spawn_us, generation, seed, deadline)
    });
    engine.destroy(clone);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_log_is_bounded_and_marked_truncated() {
        let mut log = GuestLog::default();
        log.push(&vec![b'a'; LOG_CAPACITY - 1]);
        assert!(!log.truncated());
        log.push(b"bc");
        assert!(log.truncated());
        assert_eq!(log.text().len(), LOG_CAPACITY);
        assert!(log.tail().len() <= ABORT_LOG_TAIL);
    }
}
