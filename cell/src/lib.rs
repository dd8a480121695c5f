//! cowvm cells: worker processes that each hold a bounded number of VMs, and the typed protocol
//! the supervisor speaks to them.
//!
//! Why: every KVM VM registers an MMU notifier on its process's mm, and every PTE replacement
//! (a guest write to a page it had read, `MADV_DONTNEED`, a remap) calls all of them, so the
//! cost of a write grows by ~0.27 µs per VM in the process. Cells bound that to
//! `vms_per_cell`, and make a crash or an exploit of a guest-exit path lose one cell, not every VM.
//!
//! Module map: [`protocol`] (requests and answers), [`wire`] (`SOCK_SEQPACKET` + `SCM_RIGHTS`,
//! postcard), [`worker`] (the cell process), [`sandbox`] (no_new_privs, uid drop, seccomp),
//! [`cell`] (the supervisor's handle on one cell), [`error`] (its errors), [`pool`] (placement over cells).

#![deny(clippy::undocumented_unsafe_blocks)]
#![warn(missing_docs)]

pub mod allowlist;
pub mod cell;
pub mod error;
pub mod inspect;
pub mod pool;
pub mod protocol;
pub mod sandbox;
pub mod wire;
pub mod worker;

pub use cell::{Cell, CellConfig, CellError, ExitStatus, GenerationBlocks, Liveness, VmStatsFiles};
pub use pool::{CellId, CellInfo, CellPool, LostCell, PlacedVm, PoolBatch, PoolError, VmRef};

/// VMs per cell unless configured otherwise (see docs/architecture.md, "Cells", for the
/// measurement behind it).
pub const DEFAULT_VMS_PER_CELL: u32 = 10;
