//! cowvm's service: the HTTP API server, its client, the CLI commands and the demo. The VMM
//! itself is the `cowvm-vmm` crate, the benchmarks `cowvm-bench`, the binary the `cowvm` crate.

pub mod archive;
pub mod call_cli;
pub mod cli;
pub mod client;
pub mod demo;
pub mod portable_cli;
pub mod run;
pub mod server;
