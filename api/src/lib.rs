//! cowvm's service: the HTTP API server, its client, the CLI commands, the demo and the
//! benchmarks. The VMM itself is the `cowvm-vmm` crate.

pub mod archive;
pub mod bench;
pub mod call_cli;
pub mod cli;
pub mod client;
pub mod demo;
pub mod portable_cli;
pub mod run;
pub mod server;
