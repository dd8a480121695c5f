//! Readers of what the host kernel knows about our memory and VMs, sharing no code with our own
//! bookkeeping: `/proc/self/pagemap` ([`pagemap`]), `/proc/kpagecount` and `/proc/kpageflags`
//! ([`kpage`]) and KVM's binary statistics ([`kvm_stats`]).

pub mod kpage;
pub mod kvm_stats;
pub mod pagemap;
