//! One running machine: KVM itself ([`kvm`]), guest RAM and frozen memory ([`memory`], with
//! lazily registered memslots in [`slots`] and fixed-address mappings in `fixed_map`), the
//! long-mode boot path ([`boot`]), the guest ELF loader ([`loader`]), vCPUs ([`vcpu`]) and the VM
//! that ties them together ([`vm`]), plus what a run of the guest can end in ([`exit`]), the
//! built-in guest's register protocol ([`command`]) and guest page-table walks ([`translate`]).

pub mod boot;
pub mod command;
pub mod exit;
pub(crate) mod fixed_map;
pub mod kvm;
pub mod loader;
pub mod memory;
pub(crate) mod ram_arena;
pub(crate) mod runner;
pub mod slots;
pub mod translate;
pub mod vcpu;
pub mod vm;
pub(crate) mod watchdog;
