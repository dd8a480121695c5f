//! `cowvm bench`: reproducible benchmarks that print medians and percentiles and write JSON.

mod spawn;
mod stats;

use clap::Subcommand;

pub use spawn::SpawnArgs;

/// The benchmarks.
#[derive(Subcommand)]
pub enum Bench {
    /// Clone spawn latency, throughput, memory per clone, reset and live-fork pause, with baselines.
    Spawn(SpawnArgs),
}

/// Errors of a benchmark run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The VMM failed.
    #[error(transparent)]
    Vm(#[from] cowvm_vmm::VmError),
    /// The clone engine failed.
    #[error(transparent)]
    Clone(#[from] cowvm_vmm::CloneError),
    /// KVM could not be opened.
    #[error(transparent)]
    Kvm(#[from] cowvm_vmm::KvmError),
    /// Reading host figures or writing results failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// The benchmark could not get what it needed.
    #[error("{0}")]
    Setup(String),
}

/// Runs one benchmark.
pub fn run(bench: &Bench) -> Result<(), BenchError> {
    match bench {
        Bench::Spawn(args) => spawn::run(args),
    }
}
