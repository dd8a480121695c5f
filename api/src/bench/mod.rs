//! `cowvm bench`: reproducible benchmarks that print medians and percentiles and write JSON.

mod probe;
mod spawn;
mod stats;

use std::sync::Arc;
use std::time::Duration;

use clap::Subcommand;
use cowvm_vmm::memory::PAGE_SIZE;
use cowvm_vmm::{GuestCommand, Kvm, Template, Vm, VmConfig};
use vm_memory::GuestAddress;

pub use probe::ProbeArgs;
pub use spawn::SpawnArgs;

/// Deadline for the guest commands benchmarks run.
pub(crate) const DEADLINE: Option<Duration> = Some(Duration::from_secs(10));

/// A frozen template of `memory_mib` MiB whose guest wrote one qword per MiB (so the template
/// holds data pages, as a pre-warmed VM would), 8 KiB into each MiB (clear of the xAPIC page).
pub(crate) fn make_template(kvm: &Kvm, memory_mib: u64) -> Result<Arc<Template>, BenchError> {
    let (mut vm, _) = Vm::boot(kvm, &VmConfig::builtin(memory_mib))?;
    let start = GuestAddress((4 << 20) + 2 * PAGE_SIZE);
    let count = memory_mib.saturating_sub(4);
    vm.execute(
        GuestCommand::Write {
            start,
            count,
            stride: 1 << 20,
            value: 0x5eed,
        },
        DEADLINE,
    )?;
    Ok(Arc::new(Template::freeze(kvm, &mut vm)?))
}

/// Writes `value` as pretty JSON to `path`.
pub(crate) fn write_json(path: &std::path::Path, value: &serde_json::Value) -> Result<(), BenchError> {
    let text = serde_json::to_string_pretty(value).map_err(|e| BenchError::Setup(e.to_string()))?;
    std::fs::write(path, text + "\n").map_err(|source| BenchError::Io {
        what: "write JSON results",
        source,
    })
}

/// The benchmarks.
#[derive(Subcommand)]
pub enum Bench {
    /// Clone spawn latency, throughput, memory per clone, reset and live-fork pause, with baselines.
    Spawn(SpawnArgs),
    /// Copy-on-write fault costs (guest, host-only, read-then-write), sharing-scan time, and a
    /// self-check of what a 10-page probe does to the host's page frames.
    Probe(ProbeArgs),
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
    /// A probe or statistics read failed.
    #[error(transparent)]
    Probe(#[from] cowvm_vmm::probe::ProbeError),
    /// Statistics could not be read.
    #[error(transparent)]
    Stats(#[from] cowvm_vmm::stats::StatsError),
    /// The benchmark could not get what it needed.
    #[error("{0}")]
    Setup(String),
}

/// Runs one benchmark.
pub fn run(bench: &Bench) -> Result<(), BenchError> {
    match bench {
        Bench::Spawn(args) => spawn::run(args),
        Bench::Probe(args) => probe::run(args),
    }
}
