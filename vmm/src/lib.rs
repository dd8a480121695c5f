//! cowvm's VMM library: KVM guests whose RAM is a memfd that can be frozen (sealed) and mapped
//! copy-on-write by clones, a long-mode boot path written by the VMM, and complete vCPU/VM state
//! capture and restore.
//!
//! Module map: [`kvm`] opens `/dev/kvm` and checks capabilities; [`memory`] owns guest RAM and its
//! mappings; [`boot`] writes the GDT, IDT and identity page tables and sets the long-mode
//! registers; [`loader`] loads the guest ELF; [`vcpu`] runs a vCPU and captures its state; [`vm`]
//! ties them into a bootable, freezable, restorable VM; [`command`] speaks the guest's register
//! protocol; [`pagemap`] reads what the host kernel maps behind guest RAM; [`template`] freezes
//! VMs into templates and [`clone`] makes, resets and destroys their clones; [`hypercall`] and
//! [`call`] run a user's guest under guest ABI v1.

#![deny(clippy::undocumented_unsafe_blocks)]
#![warn(missing_docs)]

pub mod boot;
pub mod call;
pub mod clone;
pub mod command;
pub mod exit;
mod fixed_map;
pub mod host;
pub mod hypercall;
pub mod kpage;
pub mod kvm;
pub mod kvm_stats;
pub mod loader;
pub mod memory;
pub mod pagemap;
pub mod percentile;
pub mod persist;
pub mod pool;
pub mod probe;
mod reaper;
mod runner;
pub mod slots;
pub mod stats;
pub mod template;
pub mod translate;
pub mod vcpu;
pub mod vm;
mod watchdog;

pub use clone::{Clone, CloneBatch, CloneEngine, CloneError, EngineConfig, LiveFork, ResetReport};
pub use command::{CommandError, CommandOutput, GuestCommand};
pub use exit::GuestExit;
pub use kvm::{Kvm, KvmError};
pub use memory::{FrozenMemory, GuestRam, MemoryError, TemplateMemory};
pub use pool::{AdmitError, RecycleStats, Reservation};
pub use template::Template;
pub use vm::{BootReport, Kernel, VcpuFailure, Vm, VmConfig, VmError, VmState};
