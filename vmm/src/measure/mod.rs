//! Measurements built on the [`crate::readers`]: page sharing per VM and template ([`stats`]) and
//! write probes that time copy-on-write faults ([`probe`]).

pub mod probe;
pub mod stats;
