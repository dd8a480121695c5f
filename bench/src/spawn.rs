//! `cowvm bench spawn`: how fast clones start, what they cost in host memory, and how that
//! compares with a fresh VM, a memcpy of the RAM and `fork()`, measured in one run.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use cowvm_vmm::host::{MemoryDelta, MemorySnapshot};
use cowvm_vmm::memory::PAGE_SIZE;
use cowvm_vmm::percentile::micros;
use cowvm_vmm::slots::{SlotPolicy, DEFAULT_CHUNK};
use cowvm_vmm::{Clone, CloneEngine, EngineConfig, GuestCommand, Kvm, Template, Vm, VmConfig};
use serde::Serialize;
use serde_json::json;
use vm_memory::GuestAddress;

use super::fork::time_fork_to_child_exit;
use super::io_err;
use super::stats::Percentiles;
use super::{make_template, write_json, BenchError, DEADLINE};

/// Arguments of `cowvm bench spawn`.
#[derive(Args, Clone)]
pub struct SpawnArgs {
    /// Guest RAM of the main template, in MiB.
    #[arg(long, default_value_t = 256)]
    pub memory_mib: u64,
    /// Clones made in the main batch (and kept alive for the "with N live" figure).
    #[arg(long, default_value_t = 1000)]
    pub clones: usize,
    /// Samples for each secondary figure (baselines, other sizes, reset, spawn with N live).
    #[arg(long, default_value_t = 100)]
    pub samples: usize,
    /// Write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Register all of each clone's RAM as one memory slot up front (the old behaviour), instead
    /// of the host's default (lazy slots where KVM allocates reverse maps up front), for
    /// comparison.
    #[arg(long)]
    pub eager_slots: bool,
    /// vCPUs per clone. Above 1, only the comparison of 1-vCPU and N-vCPU clones runs (spawn
    /// percentiles and host memory per clone of each, in one run; see [`measure_vcpus`]).
    #[arg(long, default_value_t = 1)]
    pub vcpus: usize,
}

const POOL_FILL_TIMEOUT: Duration = Duration::from_secs(600);

pub(super) fn fill_pool(engine: &CloneEngine, template: &Arc<Template>, shells: usize) -> Result<Duration, BenchError> {
    let started = Instant::now();
    engine.keep_warm(template, shells);
    let filled = engine.wait_for_shells(template, shells, POOL_FILL_TIMEOUT);
    engine.keep_warm(template, 0);
    if !filled {
        let why = engine.pool_error(template).unwrap_or_else(|| "timed out".into());
        return Err(BenchError::Setup(format!(
            "could not build {shells} warm shells: {why}"
        )));
    }
    Ok(started.elapsed())
}

pub(super) fn spawn_all(
    engine: &CloneEngine,
    template: &Arc<Template>,
    count: usize,
) -> Result<Vec<Clone>, BenchError> {
    let batch = engine.spawn(template, count)?;
    if let Some(failure) = batch.failed.first() {
        return Err(BenchError::Setup(format!(
            "clone {} failed: {}",
            failure.index, failure.reason
        )));
    }
    Ok(batch.clones)
}

pub(super) fn destroy_all(engine: &CloneEngine, clones: Vec<Clone>) {
    for clone in clones {
        engine.destroy(clone);
    }
    engine.flush();
}

/// Spawn p50 of `samples` clones made one call at a time from warm shells, each destroyed before
/// the next (so about one clone is alive besides whatever the caller keeps).
fn spawn_one_at_a_time(
    engine: &CloneEngine,
    template: &Arc<Template>,
    samples: usize,
) -> Result<Percentiles, BenchError> {
    fill_pool(engine, template, samples)?;
    let mut times = Vec::with_capacity(samples);
    for _ in 0..samples {
        let clones = spawn_all(engine, template, 1)?;
        times.extend(clones.iter().map(Clone::spawn_us));
        destroy_all(engine, clones);
    }
    Ok(Percentiles::of(&times))
}

/// Spawn percentiles of a batch of `samples` clones of a new template of `memory_mib` MiB.
fn spawn_at_size(engine: &CloneEngine, memory_mib: u64, samples: usize) -> Result<Percentiles, BenchError> {
    let template = make_template(engine.kvm(), memory_mib)?;
    fill_pool(engine, &template, samples)?;
    let clones = spawn_all(engine, &template, samples)?;
    let times: Vec<f64> = clones.iter().map(Clone::spawn_us).collect();
    destroy_all(engine, clones);
    engine.retire(&template);
    Ok(Percentiles::of(&times))
}

/// Baseline (a): a fresh VM per clone, built on the request path (no warm shells).
fn fresh_vm_baseline(engine: &CloneEngine, template: &Arc<Template>, samples: usize) -> Result<Vec<f64>, BenchError> {
    engine.retire(template);
    let mut times = Vec::with_capacity(samples);
    for _ in 0..samples {
        let clones = spawn_all(engine, template, 1)?;
        times.extend(clones.iter().filter(|c| !c.pooled()).map(Clone::spawn_us));
        destroy_all(engine, clones);
    }
    Ok(times)
}

/// Baseline (b): copy the whole template RAM into fresh anonymous memory.
fn memcpy_baseline(template: &Template, samples: usize) -> Result<Vec<f64>, BenchError> {
    use std::os::fd::AsFd;
    let fd = template
        .memory()
        .base()
        .as_fd()
        .try_clone_to_owned()
        .map_err(io_err("dup template fd"))?;
    let file = File::from(fd);
    let mut times = Vec::with_capacity(samples);
    for _ in 0..samples {
        let started = Instant::now();
        let mut copy = vec![0u8; template.size() as usize];
        file.read_exact_at(&mut copy, 0).map_err(io_err("copy template RAM"))?;
        times.push(micros(started.elapsed()));
        drop(copy);
    }
    Ok(times)
}

/// Baseline (c): `fork()` of a process holding the same amount of RAM, present and private.
fn fork_baseline(memory_mib: u64, samples: usize) -> Result<Vec<f64>, BenchError> {
    let ram = vec![1u8; (memory_mib << 20) as usize];
    let mut times = Vec::with_capacity(samples);
    for _ in 0..samples {
        let took = time_fork_to_child_exit().map_err(io_err("fork"))?;
        times.push(micros(took));
    }
    drop(std::hint::black_box(ram));
    Ok(times)
}

/// Reset times of one clone: clean, and after its guest wrote `dirty` pages (contiguous), with
/// the median of each step of the dirty resets.
fn reset_times(
    engine: &CloneEngine,
    template: &Arc<Template>,
    samples: usize,
    dirty: u64,
) -> Result<(Percentiles, Percentiles, serde_json::Value), BenchError> {
    let mut clone = spawn_all(engine, template, 1)?
        .pop()
        .ok_or_else(|| BenchError::Setup("no clone".into()))?;
    let mut clean = Vec::with_capacity(samples);
    for _ in 0..samples {
        clean.push(engine.reset(&mut clone)?.reset_us);
    }
    let mut dirtied = Vec::new();
    let (mut scan, mut discard, mut restore) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..samples.clamp(1, 20) {
        let write = GuestCommand::Write {
            start: GuestAddress(8 << 20),
            count: dirty,
            stride: PAGE_SIZE,
            value: 1,
        };
        clone.vm_mut().execute(write, DEADLINE)?;
        let report = engine.reset(&mut clone)?;
        if report.pages_dropped != dirty {
            return Err(BenchError::Setup(format!(
                "reset dropped {} pages, expected {dirty}",
                report.pages_dropped
            )));
        }
        dirtied.push(report.reset_us);
        scan.push(report.steps.scan_us);
        discard.push(report.steps.discard_us);
        restore.push(report.steps.restore_us);
    }
    engine.destroy(clone);
    let steps = json!({
        "scan_us": Percentiles::of(&scan).p50,
        "discard_us": Percentiles::of(&discard).p50,
        "restore_us": Percentiles::of(&restore).p50,
    });
    Ok((Percentiles::of(&clean), Percentiles::of(&dirtied), steps))
}

/// Live-fork pauses: of a VM that owns its RAM, then of the same VM again (a layered template)
/// after its guest dirtied `dirty` pages.
fn live_fork_pauses(engine: &CloneEngine, memory_mib: u64, dirty: u64) -> Result<(f64, f64), BenchError> {
    let (mut vm, _) = Vm::boot(engine.kvm(), &VmConfig::builtin(memory_mib))?;
    let write = GuestCommand::Write {
        start: GuestAddress(8 << 20),
        count: dirty,
        stride: PAGE_SIZE,
        value: 2,
    };
    vm.execute(write, DEADLINE)?;
    let first = engine.live_fork(&mut vm, 1)?;
    vm.execute(write, DEADLINE)?;
    let second = engine.live_fork(&mut vm, 1)?;
    for batch in [first.batch, second.batch] {
        destroy_all(engine, batch.clones);
    }
    engine.destroy_vm(vm);
    Ok((first.pause_us, second.pause_us))
}

pub(super) fn slot_policy(eager: bool) -> SlotPolicy {
    if eager {
        SlotPolicy::Eager
    } else {
        SlotPolicy::for_host()
    }
}

fn write_one(gpa: u64) -> GuestCommand {
    GuestCommand::Write {
        start: GuestAddress(gpa),
        count: 1,
        stride: 8,
        value: 0x70c4,
    }
}

/// `KVM_RUN` time of a guest write of one qword into a chunk of RAM no one touched (with lazy
/// slots: an MMIO exit, the write done by the VMM, a new slot, the guest resumed), and of a
/// second write to another page of the same chunk (a plain copy-on-write fault), in one clone.
fn first_touch_times(
    engine: &CloneEngine,
    template: &Arc<Template>,
    samples: usize,
) -> Result<(Percentiles, Percentiles), BenchError> {
    let mut clone = spawn_all(engine, template, 1)?
        .pop()
        .ok_or_else(|| BenchError::Setup("no clone".into()))?;
    let size = template.size();
    let first_chunk = (size / 2).div_ceil(DEFAULT_CHUNK);
    let chunks = (size / DEFAULT_CHUNK).saturating_sub(first_chunk).min(samples as u64);
    let (mut first, mut second) = (Vec::new(), Vec::new());
    for i in 0..chunks {
        let chunk = (first_chunk + i) * DEFAULT_CHUNK;
        if chunk + DEFAULT_CHUNK > cowvm_vmm::boot::layout::APIC_PAGE.0 && chunk <= cowvm_vmm::boot::layout::APIC_PAGE.0
        {
            continue;
        }
        let (_, took) = clone
            .vm_mut()
            .execute_timed(write_one(chunk + 16 * PAGE_SIZE), DEADLINE)?;
        first.push(micros(took));
        let (_, took) = clone
            .vm_mut()
            .execute_timed(write_one(chunk + 32 * PAGE_SIZE), DEADLINE)?;
        second.push(micros(took));
    }
    engine.destroy(clone);
    Ok((Percentiles::of(&first), Percentiles::of(&second)))
}

/// Wall time of a guest command writing one qword in each page of 64 MiB of a fresh clone of a
/// 4 GiB template, with lazy and with eager slots (clones built without warm shells, `runs`
/// each, p50 and best in ms; on this shared host single runs vary by ±50 %, while the lazy
/// clone's only extra work is one MMIO exit and one slot per 2 MiB chunk).
fn touch_64mib_of_4gib(kvm: &Kvm, runs: usize) -> Result<serde_json::Value, BenchError> {
    let template = super::make_template(kvm, 4096)?;
    let pages = (64 << 20) / PAGE_SIZE;
    let work = GuestCommand::Write {
        start: GuestAddress(1 << 30),
        count: pages,
        stride: PAGE_SIZE,
        value: 0x64,
    };
    // Lazy and eager runs alternate, so that neither gets a warmer host than the other.
    let (mut lazy, mut eager, mut lazy_slots) = (Vec::new(), Vec::new(), 0);
    for _ in 0..runs.max(1) {
        for policy in [SlotPolicy::Lazy, SlotPolicy::Eager] {
            let mut vm = Vm::restore_with(kvm, template.memory(), template.state(), policy)?;
            let started = Instant::now();
            vm.execute(work, DEADLINE)?;
            let ms = started.elapsed().as_secs_f64() * 1e3;
            match policy {
                SlotPolicy::Lazy => {
                    lazy.push(ms);
                    lazy_slots = vm.slot_stats().slots;
                }
                SlotPolicy::Eager => eager.push(ms),
            }
        }
    }
    let best = |times: &[f64]| times.iter().copied().fold(f64::INFINITY, f64::min);
    let (lazy_best, eager_best) = (best(&lazy), best(&eager));
    let (lazy, eager) = (Percentiles::of(&lazy).p50, Percentiles::of(&eager).p50);
    Ok(
        json!({ "lazy": lazy, "eager": eager, "lazy_over_eager": lazy / eager, "lazy_best": lazy_best, "eager_best": eager_best, "lazy_slots_after": lazy_slots, "runs": runs.max(1) }),
    )
}

/// Host memory per live clone, KiB.
#[derive(Serialize)]
pub(super) struct MemoryPerClone {
    user: f64,
    kernel: f64,
    total: f64,
    rss: f64,
    mem_available_drop: f64,
}

impl MemoryPerClone {
    pub(super) fn of(delta: MemoryDelta, clones: usize) -> Self {
        let per = |kib: i64| kib as f64 / clones.max(1) as f64;
        MemoryPerClone {
            user: per(delta.private_kib),
            kernel: per(delta.kernel_kib),
            total: per(delta.private_kib + delta.kernel_kib),
            rss: per(delta.rss_kib),
            mem_available_drop: per(delta.mem_available_drop_kib),
        }
    }
}

/// Raw spawn times of one run, for plots.
pub struct SpawnSamples {
    /// cowvm clones (the main batch).
    pub clones: Vec<f64>,
    /// Fresh VMs built on the request path.
    pub fresh: Vec<f64>,
    /// memcpy of the RAM.
    pub memcpy: Vec<f64>,
    /// fork() of a process holding the RAM.
    pub fork: Vec<f64>,
}

/// Runs the benchmark: prints the summary and writes `--json`.
pub fn run(args: &SpawnArgs) -> Result<(), BenchError> {
    if args.vcpus > 1 {
        let results = super::spawn_vcpus::measure_vcpus(args)?;
        super::spawn_vcpus::print_summary(&results);
        if let Some(path) = &args.json {
            write_json(path, &results)?;
        }
        return Ok(());
    }
    let (results, _) = measure(args)?;
    print_summary(&results);
    if let Some(path) = &args.json {
        write_json(path, &results)?;
    }
    Ok(())
}

/// The engine the spawn benchmarks measure, with `args`' batch size and slot policy, after
/// raising the fd limit (returned: the JSON reports it).
pub(crate) fn spawn_engine(args: &SpawnArgs) -> Result<(CloneEngine, u64), BenchError> {
    let fd_limit = cowvm_vmm::host::raise_fd_limit().map_err(io_err("raise RLIMIT_NOFILE"))?;
    let engine = CloneEngine::new(
        Arc::new(Kvm::open()?),
        EngineConfig {
            max_clones_per_call: args.clones.max(1),
            slot_policy: slot_policy(args.eager_slots),
            ..EngineConfig::default()
        },
    )?;
    Ok((engine, fd_limit))
}

/// Measures everything; returns the JSON results and the raw samples.
pub fn measure(args: &SpawnArgs) -> Result<(serde_json::Value, SpawnSamples), BenchError> {
    let (engine, fd_limit) = spawn_engine(args)?;
    let kvm = Arc::clone(engine.kvm());
    let samples = args.samples.max(1);
    let progress = |step: &str| eprintln!("[bench spawn] {step}");

    progress("baselines: memcpy of the RAM and fork() of a process holding it");
    let template = make_template(&kvm, args.memory_mib)?;
    let memcpy_samples = memcpy_baseline(&template, samples.min(10))?;
    let memcpy = Percentiles::of(&memcpy_samples);
    let fork_samples = fork_baseline(args.memory_mib, samples.min(50))?;
    let fork = Percentiles::of(&fork_samples);
    progress("baseline: fresh VM per clone, built on the request path");
    let fresh_samples = fresh_vm_baseline(&engine, &template, samples)?;
    let fresh = Percentiles::of(&fresh_samples);

    progress("spawn with about one clone alive");
    let one_alive = spawn_one_at_a_time(&engine, &template, samples)?;

    progress(&format!("building {} warm shells in the background", args.clones));
    engine.flush();
    let before = MemorySnapshot::take().map_err(io_err("read memory figures"))?;
    let pool_fill = fill_pool(&engine, &template, args.clones)?;
    progress(&format!("spawning {} clones in one call", args.clones));
    let batch = engine.spawn(&template, args.clones)?;
    if let Some(failure) = batch.failed.first() {
        return Err(BenchError::Setup(format!(
            "clone {} failed: {}",
            failure.index, failure.reason
        )));
    }
    let after = MemorySnapshot::take().map_err(io_err("read memory figures"))?;
    let spawn_times: Vec<f64> = batch.clones.iter().map(Clone::spawn_us).collect();
    let pooled = batch.clones.iter().filter(|c| c.pooled()).count();
    let spawn = Percentiles::of(&spawn_times);
    let memory = MemoryPerClone::of(after.since(&before), batch.clones.len());

    progress(&format!("spawn with {} clones alive", batch.clones.len()));
    let many_alive = spawn_one_at_a_time(&engine, &template, samples)?;
    destroy_all(&engine, batch.clones);

    progress("first touch of a chunk without a memory slot");
    let (first_touch, slotted_touch) = first_touch_times(&engine, &template, samples)?;

    progress("reset in place: clean and with 1000 dirty pages");
    let (reset_clean, reset_dirty, reset_steps) = reset_times(&engine, &template, samples, 1000)?;
    progress("reset by swap: clean and with 1000 dirty pages, and the recycles they leave");
    let swap = super::recycle::swap_resets(&engine, &template, samples, 1000)?;
    progress("live fork pause");
    let (live_fork_pause, layered_fork_pause) = live_fork_pauses(&engine, args.memory_mib, 1000)?;
    engine.retire(&template);

    progress("spawn at 64 MiB and at 4 GiB");
    let at_64 = spawn_at_size(&engine, 64, samples)?;
    let at_4g = spawn_at_size(&engine, 4096, samples)?;
    progress("a workload touching 64 MiB of a 4 GiB clone, lazy and eager slots");
    let touch_64 = touch_64mib_of_4gib(&kvm, samples.min(5))?;
    progress("clone calls through the API (loopback client, warm shells)");
    let api = super::recycle::api_clones(args.memory_mib, samples, args.clones.clamp(1, 1000))?;

    let total_ms = batch.total_us / 1000.0;
    let results = json!({
        "memory_mib": args.memory_mib,
        "clones": args.clones,
        "spawn_us": spawn,
        "pooled_clones": pooled,
        "total_ms": total_ms,
        "clones_per_s": args.clones as f64 / (batch.total_us / 1e6),
        "pool_fill_ms": pool_fill.as_secs_f64() * 1e3,
        "shell_build_us_mean": micros(pool_fill) / args.clones.max(1) as f64,
        "host_memory_per_clone_kib": memory,
        "slot_policy": slot_policy(args.eager_slots),
        "first_touch_chunk_us": first_touch,
        "touch_slotted_chunk_us": slotted_touch,
        "touch_64mib_of_4gib_ms": touch_64,
        "baselines": {
            "fresh_vm_us": fresh,
            "memcpy_clone_us": memcpy,
            "fork_us": fork,
        },
        "spawn_p50_us_with_1_live": one_alive.p50,
        "spawn_p50_us_with_1000_live": many_alive.p50,
        "live_clones_for_that_figure": args.clones,
        "spawn_p50_us_64mib": at_64.p50,
        "spawn_p50_us_4gib": at_4g.p50,
        "spawn_us_64mib": at_64,
        "spawn_us_4gib": at_4g,
        "reset_us": {
            "clean": swap.clean.p50,
            "dirty_1000": swap.dirty.p50,
            "clean_percentiles": swap.clean,
            "dirty_1000_percentiles": swap.dirty,
            "by": "swap",
            "in_place": { "clean": reset_clean.p50, "dirty_1000": reset_dirty.p50, "clean_percentiles": reset_clean, "dirty_1000_percentiles": reset_dirty, "dirty_1000_steps_p50": reset_steps },
        },
        "recycle_us": { "p50": swap.recycle_dirty.p50, "dirty_1000": swap.recycle_dirty, "clean": swap.recycle_clean },
        "api_clone_us": api["api_clone_us"],
        "api_clones_1000_ms": api["api_clones_1000_ms"],
        "api_clones_1000_recycled_ms": api["api_clones_1000_recycled_ms"],
        "api_clones_1000_engine_ms": api["api_clones_1000_engine_ms"],
        "api_vms_recycled": api["api_vms_recycled"],
        "live_fork_pause_us": live_fork_pause,
        "live_fork_layered_pause_us": layered_fork_pause,
        "samples": samples,
        "fd_limit": fd_limit,
    });
    Ok((
        results,
        SpawnSamples {
            clones: spawn_times,
            fresh: fresh_samples,
            memcpy: memcpy_samples,
            fork: fork_samples,
        },
    ))
}

/// Prints the human summary.
pub fn print_summary(r: &serde_json::Value) {
    let f = |v: &serde_json::Value| v.as_f64().unwrap_or(f64::NAN);
    let s = &r["spawn_us"];
    println!(
        "cowvm bench spawn: {} MiB template, {} clones in one call",
        r["memory_mib"], r["clones"]
    );
    println!(
        "  spawn (request → first guest exit): p50 {:.0} µs  p90 {:.0}  p99 {:.0}  max {:.0}  ({} of them from warm shells)",
        f(&s["p50"]), f(&s["p90"]), f(&s["p99"]), f(&s["max"]), r["pooled_clones"]
    );
    println!(
        "  all clones: {:.1} ms, {:.0} clones/s; warm shells built in the background in {:.0} ms",
        f(&r["total_ms"]),
        f(&r["clones_per_s"]),
        f(&r["pool_fill_ms"])
    );
    let m = &r["host_memory_per_clone_kib"];
    println!(
        "  host memory per live clone: user {:.1} KiB, kernel {:.1} KiB, total {:.1} KiB (MemAvailable drop {:.1} KiB)",
        f(&m["user"]),
        f(&m["kernel"]),
        f(&m["total"]),
        f(&m["mem_available_drop"])
    );
    let b = &r["baselines"];
    println!(
        "  baselines p50: fresh VM {:.0} µs (p99 {:.0}), memcpy of the RAM {:.0} µs, fork() {:.0} µs",
        f(&b["fresh_vm_us"]["p50"]),
        f(&b["fresh_vm_us"]["p99"]),
        f(&b["memcpy_clone_us"]["p50"]),
        f(&b["fork_us"]["p50"])
    );
    println!(
        "  spawn p50 with 1 live clone {:.0} µs, with {} live {:.0} µs",
        f(&r["spawn_p50_us_with_1_live"]),
        r["live_clones_for_that_figure"],
        f(&r["spawn_p50_us_with_1000_live"])
    );
    println!(
        "  spawn p50 at 64 MiB {:.0} µs, at 4 GiB {:.0} µs",
        f(&r["spawn_p50_us_64mib"]),
        f(&r["spawn_p50_us_4gib"])
    );
    let in_place = &r["reset_us"]["in_place"];
    let steps = &in_place["dirty_1000_steps_p50"];
    println!(
        "  reset by swap p50: clean {:.1} µs, 1000 dirty pages {:.1} µs; background recycle p50 {:.0} µs (clean {:.0} µs)",
        f(&r["reset_us"]["clean"]),
        f(&r["reset_us"]["dirty_1000"]),
        f(&r["recycle_us"]["p50"]),
        f(&r["recycle_us"]["clean"]["p50"])
    );
    println!(
        "  reset in place p50: clean {:.0} µs, 1000 dirty pages {:.0} µs (scan {:.0}, MADV_DONTNEED {:.0}, state {:.0})",
        f(&in_place["clean"]),
        f(&in_place["dirty_1000"]),
        f(&steps["scan_us"]),
        f(&steps["discard_us"]),
        f(&steps["restore_us"])
    );
    println!(
        "  API clone (loopback, warm shell) p50 {:.0} µs p99 {:.0} µs; one call of 1000 clones {:.1} ms (pool refilled by recycling: {:.1} ms)",
        f(&r["api_clone_us"]["p50"]),
        f(&r["api_clone_us"]["p99"]),
        f(&r["api_clones_1000_ms"]),
        f(&r["api_clones_1000_recycled_ms"])
    );
    println!(
        "  live-fork pause: {:.0} µs (owned RAM), {:.0} µs (layered, 1000 private pages)",
        f(&r["live_fork_pause_us"]),
        f(&r["live_fork_layered_pause_us"])
    );
    let t = &r["touch_64mib_of_4gib_ms"];
    println!(
        "  memory slots {}: first touch of a chunk p50 {:.1} µs (a slotted chunk {:.1} µs); 64 MiB touched in a 4 GiB clone: lazy {:.1} ms, eager {:.1} ms",
        r["slot_policy"],
        f(&r["first_touch_chunk_us"]["p50"]),
        f(&r["touch_slotted_chunk_us"]["p50"]),
        f(&t["lazy"]),
        f(&t["eager"])
    );
}
