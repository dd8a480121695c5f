//! cowvm's VMM library: KVM guests whose RAM is a memfd that can be frozen (sealed) and mapped
//! copy-on-write by clones, a long-mode boot path written by the VMM, and complete vCPU/VM state
//! capture and restore.
//!
//! Folders by concern: [`machine`] (KVM, guest RAM, boot, vCPUs, the VM), [`template`] (freezing
//! and persisting templates), [`clone`] (the clone engine, warm pools, recycling), [`call`] (guest
//! ABI v1), [`readers`] (pagemap, kpagecount/kpageflags, KVM binary stats), [`measure`] (sharing
//! statistics and write probes); [`layout`] is the one leaf holding every guest address and unit.
//! The modules are also re-exported under their short names (`cowvm_vmm::vm`, `cowvm_vmm::pagemap`).

#![deny(clippy::undocumented_unsafe_blocks)]
#![warn(missing_docs)]

pub mod call;
pub mod clone;
pub mod host;
pub mod layout;
pub mod machine;
pub mod measure;
pub mod percentile;
pub mod readers;
pub mod template;

pub use call::hypercall;
pub use clone::pool;
pub(crate) use clone::reaper;
pub use machine::{boot, command, exit, kvm, loader, memory, slots, translate, vcpu, vm};
pub(crate) use machine::{fixed_map, runner, watchdog};
pub use measure::{probe, stats};
pub use readers::{kpage, kvm_stats, pagemap};
pub use template::persist;

pub use clone::{Clone, CloneBatch, CloneEngine, CloneError, EngineConfig, LiveFork, ResetReport};
pub use command::{CommandError, CommandOutput, GuestCommand};
pub use exit::GuestExit;
pub use kvm::{Kvm, KvmError};
pub use memory::{FrozenMemory, GuestRam, MemoryError, TemplateMemory};
pub use pool::{AdmitError, RecycleStats, Reservation};
pub use template::Template;
pub use vm::{BootReport, Kernel, VcpuFailure, Vm, VmConfig, VmError, VmState};
