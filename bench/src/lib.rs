//! `cowvm bench`: reproducible benchmarks that print medians and percentiles and write JSON.

#![deny(clippy::undocumented_unsafe_blocks)]

mod call;
mod cells;
mod cells_api;
mod ci_http;
mod fork;
mod load;
mod plot;
mod portable;
mod probe;
mod recycle;
mod spawn;
mod spawn_vcpus;
mod stats;
mod sweeps;

use sweeps::{choose, Sweep};

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Subcommand};
use cowvm_vmm::memory::PAGE_SIZE;
use cowvm_vmm::{GuestCommand, Kvm, Template, Vm, VmConfig};
use vm_memory::GuestAddress;

pub use probe::ProbeArgs;
pub use spawn::SpawnArgs;

/// Deadline for the guest commands benchmarks run.
pub(crate) const DEADLINE: Option<Duration> = Some(Duration::from_secs(10));

/// MiB of data a benchmark template's guest writes after boot, as a pre-warmed VM would.
const WARM_MIB: u64 = 16;

/// A frozen template of `memory_mib` MiB whose guest wrote one qword into every page of the
/// [`WARM_MIB`] MiB from 4 MiB on (so the template holds data pages, as a pre-warmed VM would,
/// in one run: the layout `cowvm demo` uses). A template whose data is spread thinly over its RAM
/// costs each clone two VMAs per hole it keeps (docs/architecture.md, *Holes never grow a
/// template*).
pub(crate) fn make_template(kvm: &Kvm, memory_mib: u64) -> Result<Arc<Template>, BenchError> {
    make_template_with_vcpus(kvm, memory_mib, 1)
}

/// [`make_template`] with `vcpus` vCPUs (vCPU 0 writes the data).
pub(crate) fn make_template_with_vcpus(kvm: &Kvm, memory_mib: u64, vcpus: usize) -> Result<Arc<Template>, BenchError> {
    let config = VmConfig {
        vcpus,
        ..VmConfig::builtin(memory_mib)
    };
    let (mut vm, _) = Vm::boot(kvm, &config)?;
    let start = GuestAddress(4 << 20);
    let count = (memory_mib.saturating_sub(4).min(WARM_MIB) << 20) / PAGE_SIZE;
    vm.execute(
        GuestCommand::Write {
            start,
            count,
            stride: PAGE_SIZE,
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

/// `cowvm bench`: one benchmark by name, or (with `--out`) the whole suite.
#[derive(Args)]
pub struct BenchArgs {
    /// A single benchmark; without one, the whole suite runs (needs `--out`).
    #[command(subcommand)]
    pub which: Option<Bench>,
    /// Directory for every result (JSON) and plot (SVG) of the whole suite.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Smaller counts everywhere (a smoke run of the suite, a few seconds).
    #[arg(long)]
    pub quick: bool,
}

/// The benchmarks.
#[derive(Subcommand)]
pub enum Bench {
    /// Clone spawn latency, throughput, memory per clone, reset and live-fork pause, with baselines.
    Spawn(SpawnArgs),
    /// Copy-on-write fault costs (guest, host-only, read-then-write), sharing-scan time, and a
    /// self-check of what a 10-page probe does to the host's page frames.
    Probe(ProbeArgs),
    /// Drive an embedded server with concurrent clients and mixed requests; count 5xx answers,
    /// latency, and whether fds, mappings and RSS return to their baseline.
    Load(load::LoadArgs),
    /// Create and destroy clones in a loop; report the slope of fds, mappings, RSS and kernel memory.
    Soak(load::SoakArgs),
    /// Spawn p50/p99 at 64 MiB, 256 MiB, 1 GiB and 4 GiB (JSON and plot into --out).
    Sizes(SweepArgs),
    /// Spawn, host memory and copy-on-write cost at 1, 10, 100, 1000 and 2000 live clones.
    LiveClones(SweepArgs),
    /// Template sharing after 100 clones read a template's 16 MiB of data and write 0 %, 1 % and 10 % of it.
    Sharing(SweepArgs),
    /// A CI-like clone → test → stats → destroy loop with 1 and 2 workers.
    CiLoop(SweepArgs),
    /// Guest write cost at 1 and 1000 live clones in-process vs placed over cells, memory per
    /// clone with the cells' own, and the write cost against VMs per cell.
    Cells(cells::CellsArgs),
    /// One call into a user guest (guest ABI v1): empty-call latency in-process, and calls per
    /// second in-process and over HTTP with concurrent clients.
    Call(call::CallArgs),
    /// Portable templates: export and import time and archive size for a 256 MiB template with
    /// 16 MiB written and a 1 GiB one with 64 MiB written (guest-written and random data).
    Portable(SweepArgs),
}

/// Arguments of the sweeps run on their own.
#[derive(Args, Clone)]
pub struct SweepArgs {
    /// Directory for the JSON result and the SVG plots.
    #[arg(long, default_value = ".")]
    pub out: PathBuf,
    /// Smaller counts (a few seconds).
    #[arg(long)]
    pub quick: bool,
}

/// Creates the output directory and raises the fd limit (every VM holds two fds); returns the limit.
pub(crate) fn prepare(out: &Path) -> Result<u64, BenchError> {
    std::fs::create_dir_all(out).map_err(|source| BenchError::Io {
        what: "create the output directory",
        source,
    })?;
    cowvm_vmm::host::raise_fd_limit().map_err(|source| BenchError::Io {
        what: "raise RLIMIT_NOFILE",
        source,
    })
}

/// Runs one sweep on its own, with the counts the suite uses.
fn sweep(which: Sweep, args: &SweepArgs) -> Result<(), BenchError> {
    let out = args.out.as_path();
    let lab = sweeps::Lab::new(prepare(out)?, args.quick)?;
    let result = lab.run(which, out)?;
    let path = out.join(format!("{}.json", which.name()));
    write_json(&path, &result)?;
    println!("{}", serde_json::to_string_pretty(&result).unwrap_or_default());
    eprintln!(
        "[bench] {}: results in {} and its plots beside it",
        which.name(),
        path.display()
    );
    Ok(())
}

/// Wraps an I/O error as [`BenchError::Io`] saying `what` was being done, for `map_err`.
pub(crate) fn io_err(what: &'static str) -> impl FnOnce(std::io::Error) -> BenchError {
    move |source| BenchError::Io { what, source }
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

/// Runs one benchmark, or the suite.
pub fn run(args: &BenchArgs) -> Result<(), BenchError> {
    match (&args.which, &args.out) {
        (Some(Bench::Spawn(a)), _) => spawn::run(a),
        (Some(Bench::Probe(a)), _) => probe::run(a),
        (Some(Bench::Load(a)), _) => load::load(a),
        (Some(Bench::Soak(a)), _) => load::soak(a),
        (Some(Bench::Sizes(a)), _) => sweep(Sweep::Sizes, a),
        (Some(Bench::LiveClones(a)), _) => sweep(Sweep::LiveClones, a),
        (Some(Bench::Sharing(a)), _) => sweep(Sweep::Sharing, a),
        (Some(Bench::CiLoop(a)), _) => sweep(Sweep::CiLoop, a),
        (Some(Bench::Cells(a)), _) => cells::run(a),
        (Some(Bench::Call(a)), _) => call::run(a),
        (Some(Bench::Portable(a)), _) => portable::run(a),
        (None, Some(out)) => suite(out, args.quick),
        (None, None) => Err(BenchError::Setup(
            "name a benchmark (spawn, probe, load, soak, sizes, live-clones, sharing, ci-loop, call, portable) or give --out DIR to run them all"
                .into(),
        )),
    }
}

/// Runs every benchmark and sweep, writing JSON and SVG plots into `out`.
fn suite(out: &Path, quick: bool) -> Result<(), BenchError> {
    let started = std::time::Instant::now();
    let fd_limit = prepare(out)?;
    macro_rules! pick {
        ($full:expr, $small:expr) => {
            choose(quick, $full, $small)
        };
    }
    let steps = 6;
    let step = |n: usize, what: &str| {
        eprintln!(
            "[bench {n}/{steps}] {what} ({:.0} s so far)",
            started.elapsed().as_secs_f64()
        )
    };

    step(1, "spawn: latency, throughput, memory, reset, live fork, baselines");
    let spawn_args = spawn::SpawnArgs {
        memory_mib: 256,
        clones: pick!(1000, 50),
        samples: pick!(100, 5),
        json: None,
        eager_slots: false,
        vcpus: 1,
    };
    let (spawn_results, samples) = spawn::measure(&spawn_args)?;
    spawn::print_summary(&spawn_results);
    write_json(&out.join("spawn.json"), &spawn_results)?;
    plot::cdf(
        &out.join("spawn-cdf.svg"),
        "Spawn latency CDF (256 MiB guest)",
        "request → first guest exit (µs, log)",
        &[
            ("cowvm clone", &samples.clones),
            ("fresh VM", &samples.fresh),
            ("memcpy clone", &samples.memcpy),
            ("fork()", &samples.fork),
        ],
    )?;

    step(2, "probe: copy-on-write fault costs and sharing scans");
    let probe_args = probe::ProbeArgs {
        memory_mib: 256,
        pages: pick!(1000, 50),
        present_pages: pick!(16384, 1024),
        scans: pick!(20, 3),
        json: None,
    };
    let probe_results = probe::measure(&probe_args)?;
    probe::print_summary(&probe_results);
    write_json(&out.join("probe.json"), &probe_results)?;
    let p50 = |v: &serde_json::Value| v["p50"].as_f64().unwrap_or(0.0);
    plot::bars(
        &out.join("cow-fault.svg"),
        "Copy-on-write fault, p50 (µs)",
        "µs per page",
        &[
            ("guest write".into(), p50(&probe_results["guest_cow_us"])),
            ("host-only write".into(), p50(&probe_results["host_cow_us"])),
            (
                "guest read then write".into(),
                p50(&probe_results["read_then_write_us"]),
            ),
        ],
    )?;

    let lab = sweeps::Lab::new(fd_limit, quick)?;
    let mut results = serde_json::Map::new();
    let sweeps = [
        (3, Sweep::Sizes, "spawn vs guest RAM size"),
        (4, Sweep::LiveClones, "spawn, memory and COW cost vs live clones"),
        (
            5,
            Sweep::Sharing,
            "template sharing after clones write 0 %, 1 % and 10 %",
        ),
        (6, Sweep::CiLoop, "CI-like loop with 1 and 2 workers"),
    ];
    for (n, sweep, what) in sweeps {
        step(n, what);
        let result = lab.run(sweep, out)?;
        write_json(&out.join(format!("{}.json", sweep.name())), &result)?;
        results.insert(sweep.name().to_owned(), result);
    }
    let (sizes, live, sharing, ci) = (
        &results["sizes"],
        &results["live-clones"],
        &results["sharing"],
        &results["ci-loop"],
    );

    let summary = serde_json::json!({
        "spawn": spawn_results, "probe": probe_results, "sizes": sizes, "live_clones": live, "sharing": sharing, "ci_loop": ci,
        "seconds": started.elapsed().as_secs_f64(), "quick": quick,
    });
    write_json(&out.join("summary.json"), &summary)?;
    eprintln!(
        "[bench] done in {:.0} s; results and plots in {}",
        started.elapsed().as_secs_f64(),
        out.display()
    );
    Ok(())
}
