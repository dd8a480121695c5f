//! Errors of requests to a cell, and how a cell ended.

use std::time::Duration;

use crate::protocol::{RemoteError, RemoteErrorKind};
use crate::wire::WireError;

/// How a cell ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// It exited with this code.
    Exited(i32),
    /// A signal killed it.
    Killed(i32),
    /// Its socket closed and it is still exiting (tearing its VMs down); not reaped yet.
    Exiting,
    /// Its status could not be collected.
    Unknown,
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitStatus::Exited(code) => write!(f, "exited with status {code}"),
            ExitStatus::Killed(libc::SIGSYS) => {
                write!(f, "killed by SIGSYS (a system call outside its seccomp allowlist)")
            }
            ExitStatus::Killed(signal) => write!(f, "killed by signal {signal}"),
            ExitStatus::Exiting => write!(f, "closed its socket and is exiting"),
            ExitStatus::Unknown => write!(f, "ended (status unknown)"),
        }
    }
}

/// Errors of requests to a cell.
#[derive(Debug, thiserror::Error)]
pub enum CellError {
    /// The cell process could not be started.
    #[error("cannot start a cell ({program}): {source}")]
    Start {
        /// The program.
        program: String,
        /// The error.
        source: std::io::Error,
    },
    /// The cell died (before or during the request).
    #[error("cell {pid} died during {op}: {status}")]
    Died {
        /// Its process id.
        pid: u32,
        /// How it ended.
        status: ExitStatus,
        /// The request that was lost.
        op: &'static str,
    },
    /// The cell did not answer in time.
    #[error("cell {pid} did not answer {op} within {timeout:?}")]
    Timeout {
        /// Its process id.
        pid: u32,
        /// The request.
        op: &'static str,
        /// The timeout.
        timeout: Duration,
    },
    /// The cell refused or failed the request.
    #[error("cell {pid}: {op}: {error}")]
    Remote {
        /// Its process id.
        pid: u32,
        /// The request.
        op: &'static str,
        /// What the cell said.
        error: RemoteError,
    },
    /// The cell answered with a response that does not belong to the request.
    #[error("cell {pid} answered {op} with an unexpected {got}")]
    Unexpected {
        /// Its process id.
        pid: u32,
        /// The request.
        op: &'static str,
        /// What came back.
        got: &'static str,
    },
    /// The transport failed.
    #[error("cell {pid}: {source}")]
    Wire {
        /// Its process id.
        pid: u32,
        /// The error.
        source: WireError,
    },
    /// Something on the supervisor's side failed (encoding state, reading /proc).
    #[error("{0}")]
    Local(String),
}

impl CellError {
    /// The kind of the cell's own error, if it was one.
    pub fn remote_kind(&self) -> Option<RemoteErrorKind> {
        match self {
            CellError::Remote { error, .. } => Some(error.kind),
            _ => None,
        }
    }
}
