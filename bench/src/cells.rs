//! `cowvm bench cells`: the copy-on-write cost of a guest write to a page it had read, at 1 and
//! many live clones, with every VM in this process (in-process) and with the clones placed over
//! cells as the server places them (`--vms-per-cell`); host memory per clone including the cells'
//! own; and the MMU-notifier sweep (the same write cost, and warm spawn, against VMs per cell)
//! that the default `--vms-per-cell` is chosen from.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use cowvm_cell::{CellConfig, CellPool, VmRef, DEFAULT_VMS_PER_CELL};
use cowvm_vmm::host::MemorySnapshot;
use cowvm_vmm::memory::PAGE_SIZE;
use cowvm_vmm::{CloneEngine, GuestCommand, Template};
use serde_json::{json, Value};
use vm_memory::GuestAddress;

use super::plot::{lines, Series};
use super::spawn::{destroy_all, fill_pool, spawn_all};
use super::stats::Percentiles;
use super::{make_template, write_json, BenchError};

const MIB: u64 = 1 << 20;
/// The template id the bench registers with its cell pools.
const TEMPLATE: u64 = 1;
/// Guest deadline of each probe command.
const DEADLINE: Duration = Duration::from_secs(10);

/// Arguments of `cowvm bench cells`.
#[derive(Args, Clone)]
pub struct CellsArgs {
    /// Directory for the JSON result and the SVG plots.
    #[arg(long, default_value = ".")]
    pub out: PathBuf,
    /// Smaller counts (a few seconds).
    #[arg(long)]
    pub quick: bool,
    /// VMs per cell for the placement rows (as `cowvm serve --vms-per-cell`).
    #[arg(long, default_value_t = DEFAULT_VMS_PER_CELL)]
    pub vms_per_cell: u32,
    /// Live clones of the large placement row.
    #[arg(long, default_value_t = 1000)]
    pub live: usize,
    /// VMs per cell of the MMU-notifier sweep.
    #[arg(long, value_delimiter = ',', default_values_t = [1u32, 10, 50, 100, 200])]
    pub sweep: Vec<u32>,
    /// Pages each probe writes.
    #[arg(long, default_value_t = 100)]
    pub pages: u64,
    /// Single-clone calls of the API rows (`"cells": true`).
    #[arg(long, default_value_t = 200)]
    pub api_samples: usize,
    /// Clones of the large call of the API rows.
    #[arg(long, default_value_t = 1000)]
    pub api_batch: usize,
    /// Only the API rows (a server with `--cells`, warm shells in cells).
    #[arg(long)]
    pub api_only: bool,
}

/// Copy-on-write costs of one clone, from `KVM_RUN` times of single-qword guest writes: each
/// page is written twice, and the first write's extra time over the second is its fault.
struct CowCosts {
    untouched: Percentiles,
    read_then_write: Percentiles,
}

fn err(e: impl std::fmt::Display) -> BenchError {
    BenchError::Setup(e.to_string())
}

/// Measures [`CowCosts`] with `run`, which runs a guest command and returns its `KVM_RUN` time
/// in microseconds.
fn cow_costs(pages: u64, mut run: impl FnMut(GuestCommand) -> Result<f64, BenchError>) -> Result<CowCosts, BenchError> {
    let untouched = write_faults(16 * MIB, pages, &mut run)?;
    run(GuestCommand::Checksum {
        start: GuestAddress(32 * MIB + 64),
        count: pages,
        stride: PAGE_SIZE,
    })?;
    let read_then_write = write_faults(32 * MIB, pages, &mut run)?;
    Ok(CowCosts {
        untouched,
        read_then_write,
    })
}

/// Writes one qword into each of `pages` pages from `start`, twice; the first write's extra
/// `KVM_RUN` time over the second is that page's fault.
fn write_faults(
    start: u64,
    pages: u64,
    run: &mut impl FnMut(GuestCommand) -> Result<f64, BenchError>,
) -> Result<Percentiles, BenchError> {
    let mut samples = Vec::with_capacity(pages as usize);
    for i in 0..pages {
        let write = GuestCommand::Write {
            start: GuestAddress(start + i * PAGE_SIZE + 64),
            count: 1,
            stride: 8,
            value: i + 1,
        };
        let first = run(write)?;
        let again = run(write)?;
        samples.push(first - again);
    }
    Ok(Percentiles::of(&samples))
}

fn snapshot() -> Result<MemorySnapshot, BenchError> {
    MemorySnapshot::take().map_err(|source| BenchError::Io {
        what: "read memory figures",
        source,
    })
}

/// Private memory (KiB) of process `pid` (`/proc/<pid>/smaps_rollup`).
fn private_kib(pid: u32) -> Result<i64, BenchError> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).map_err(|source| BenchError::Io {
        what: "read a cell's smaps_rollup",
        source,
    })?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with("Private_Clean:") || l.starts_with("Private_Dirty:"))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<i64>().ok())
        .sum())
}

/// A row with every VM in this process.
fn in_process(engine: &CloneEngine, template: &Arc<Template>, live: usize, pages: u64) -> Result<Value, BenchError> {
    progress(&format!("in-process: {live} live clones"));
    engine.flush();
    let baseline = snapshot()?;
    fill_pool(engine, template, live.min(1000))?;
    let started = Instant::now();
    let mut clones = Vec::with_capacity(live);
    while clones.len() < live {
        let n = (live - clones.len()).min(1000);
        fill_pool(engine, template, n)?;
        clones.extend(spawn_all(engine, template, n)?);
    }
    let spawn_ms = started.elapsed().as_secs_f64() * 1e3;
    engine.flush();
    let delta = snapshot()?.since(&baseline);
    let spawn = Percentiles::of(&clones.iter().map(|c| c.spawn_us()).collect::<Vec<_>>());
    let vm = clones[0].vm_mut();
    let costs = cow_costs(pages, |command| {
        let (_, took) = vm.execute_timed(command, Some(DEADLINE))?;
        Ok(took.as_secs_f64() * 1e6)
    })?;
    destroy_all(engine, clones);
    let per = |kib: i64| kib as f64 / live as f64;
    Ok(json!({
        "placement": "in-process",
        "live_clones": live,
        "vms_per_process": live,
        "guest_read_then_write_us_p50": costs.read_then_write.p50,
        "guest_read_then_write_us": costs.read_then_write,
        "guest_cow_us_p50": costs.untouched.p50,
        "spawn_us": spawn,
        "spawn_all_ms": spawn_ms,
        "memory_per_clone_kib": {"user": per(delta.private_kib), "cells_user": 0.0, "kernel": per(delta.kernel_kib),
            "total": per(delta.private_kib + delta.kernel_kib)},
    }))
}

fn cell_config(vms_per_cell: u32) -> Result<CellConfig, BenchError> {
    let mut config = CellConfig::current_exe().map_err(|source| BenchError::Io {
        what: "find this executable to start cells",
        source,
    })?;
    config.vms_per_cell = vms_per_cell;
    Ok(config)
}

fn cell_costs(pool: &CellPool, at: VmRef, pages: u64) -> Result<CowCosts, BenchError> {
    cow_costs(pages, |command| {
        let (_, took) = pool.run_on(at, 0, command, DEADLINE).map_err(err)?;
        Ok(took.as_secs_f64() * 1e6)
    })
}

/// A row with `live` clones placed over cells of `vms_per_cell` (as the server places them).
fn over_cells(template: &Arc<Template>, live: usize, vms_per_cell: u32, pages: u64) -> Result<Value, BenchError> {
    progress(&format!("cells: {live} live clones, {vms_per_cell} per cell"));
    let baseline = snapshot()?;
    let cells_needed = live.div_ceil(vms_per_cell as usize);
    let pool = CellPool::new(cell_config(vms_per_cell)?, cells_needed).map_err(err)?;
    pool.add_template(TEMPLATE, Arc::clone(template));
    let started = Instant::now();
    let batch = pool.spawn(TEMPLATE, live).map_err(err)?;
    let spawn_ms = started.elapsed().as_secs_f64() * 1e3;
    if let Some(failure) = batch.failed.first() {
        return Err(BenchError::Setup(format!(
            "clone {} failed: {}",
            failure.index, failure.reason
        )));
    }
    let cells = pool.cells();
    let cells_private: i64 = cells.iter().map(|c| private_kib(c.pid)).sum::<Result<i64, _>>()?;
    let delta = snapshot()?.since(&baseline);
    // Probe a clone in the fullest cell: its mm holds the most VMs.
    let fullest = cells.iter().max_by_key(|c| c.vms).map(|c| c.id).unwrap_or(0);
    let at = batch
        .clones
        .iter()
        .map(|c| c.at)
        .find(|at| at.cell == fullest)
        .ok_or_else(|| BenchError::Setup("no clone in the fullest cell".into()))?;
    let costs = cell_costs(&pool, at, pages)?;
    let spawn = Percentiles::of(&batch.clones.iter().map(|c| c.spawned.spawn_us).collect::<Vec<_>>());
    let per = |kib: i64| kib as f64 / live as f64;
    let row = json!({
        "placement": "cells",
        "live_clones": live,
        "vms_per_cell": vms_per_cell,
        "cells": cells.len(),
        "vms_per_process": cells.iter().map(|c| c.vms).max().unwrap_or(0),
        "guest_read_then_write_us_p50": costs.read_then_write.p50,
        "guest_read_then_write_us": costs.read_then_write,
        "guest_cow_us_p50": costs.untouched.p50,
        "spawn_us": spawn,
        "spawn_all_ms": spawn_ms,
        "memory_per_clone_kib": {"user": per(delta.private_kib), "cells_user": per(cells_private),
            "kernel": per(delta.kernel_kib), "total": per(delta.private_kib + cells_private + delta.kernel_kib)},
    });
    drop(pool);
    Ok(row)
}

/// One cell holding `vms` clones made from warm shells: the write cost and cell-side spawn.
fn sweep_point(template: &Arc<Template>, vms: u32, pages: u64) -> Result<Value, BenchError> {
    progress(&format!("MMU-notifier sweep: {vms} VMs in one cell"));
    let pool = CellPool::new(cell_config(vms)?, 1).map_err(err)?;
    pool.add_template(TEMPLATE, Arc::clone(template));
    pool.start_cell().map_err(err)?;
    let wait = Duration::from_secs(60) + Duration::from_millis(20) * vms;
    let ready = pool.keep_warm(TEMPLATE, vms, wait).map_err(err)?;
    let batch = pool.spawn(TEMPLATE, vms as usize).map_err(err)?;
    pool.keep_warm(TEMPLATE, 0, Duration::ZERO).map_err(err)?;
    if let Some(failure) = batch.failed.first() {
        return Err(BenchError::Setup(format!(
            "clone {} failed: {}",
            failure.index, failure.reason
        )));
    }
    let costs = cell_costs(&pool, batch.clones[0].at, pages)?;
    let pooled: Vec<f64> = batch
        .clones
        .iter()
        .filter(|c| c.spawned.pooled)
        .map(|c| c.spawned.spawn_us)
        .collect();
    Ok(json!({
        "vms_per_cell": vms,
        "warm_shells_ready": ready,
        "guest_read_then_write_us_p50": costs.read_then_write.p50,
        "guest_read_then_write_us": costs.read_then_write,
        "guest_cow_us_p50": costs.untouched.p50,
        "spawn_us_warm": Percentiles::of(&pooled),
    }))
}

fn progress(step: &str) {
    eprintln!("[bench cells] {step}");
}

/// Runs the benchmark and writes `cells.json` and its plots into `args.out`.
pub fn run(args: &CellsArgs) -> Result<(), BenchError> {
    let out = args.out.as_path();
    super::prepare(out)?;
    let result = measure(args, out)?;
    let path = out.join(if args.api_only { "cells-api.json" } else { "cells.json" });
    write_json(&path, &result)?;
    println!("{}", serde_json::to_string_pretty(&result).unwrap_or_default());
    eprintln!("[bench cells] results in {}", path.display());
    Ok(())
}

/// The measurements (see the module comment); plots into `out`.
pub fn measure(args: &CellsArgs, out: &Path) -> Result<Value, BenchError> {
    let started = Instant::now();
    let (live, sweep, pages) = if args.quick {
        (args.live.min(100), vec![1, 10], args.pages.min(20))
    } else {
        (args.live, args.sweep.clone(), args.pages)
    };
    let (api_samples, api_batch) = if args.quick {
        (args.api_samples.min(20), args.api_batch.min(100))
    } else {
        (args.api_samples, args.api_batch)
    };
    progress(&format!(
        "cells: API clone calls with --cells ({api_samples} single, one of {api_batch})"
    ));
    let api = super::cells_api::api_rows(256, api_samples, api_batch, args.vms_per_cell)?;
    if args.api_only {
        return Ok(json!({
            "api": api,
            "loadavg_at_end": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
            "seconds": started.elapsed().as_secs_f64(),
            "quick": args.quick,
        }));
    }
    let kvm = Arc::new(cowvm_vmm::Kvm::open()?);
    let template = make_template(&kvm, 256)?;
    // Cells first, so that their memory baseline does not see the in-process engine's
    // teardown returning memory.
    let mut placement = Vec::new();
    for n in [1, live] {
        placement.push(over_cells(&template, n, args.vms_per_cell, pages)?);
    }
    {
        let config = cowvm_vmm::EngineConfig {
            max_clones_per_call: 5000,
            ..Default::default()
        };
        let engine = CloneEngine::new(Arc::clone(&kvm), config)?;
        for n in [1, live] {
            placement.push(in_process(&engine, &template, n, pages)?);
        }
        engine.retire(&template);
    }
    let mut notifier = Vec::new();
    for &vms in &sweep {
        notifier.push(sweep_point(&template, vms, pages)?);
    }
    plot(out, &notifier)?;
    Ok(json!({
        "template_mib": 256,
        "pages_per_probe": pages,
        "vms_per_cell": args.vms_per_cell,
        "placement": placement,
        "notifier_sweep": notifier,
        "api": api,
        "seconds": started.elapsed().as_secs_f64(),
        "quick": args.quick,
    }))
}

fn plot(out: &Path, rows: &[Value]) -> Result<(), BenchError> {
    let pick = |key: &str| {
        rows.iter()
            .map(|r| {
                (
                    r["vms_per_cell"].as_f64().unwrap_or(0.0),
                    r[key].as_f64().unwrap_or(0.0),
                )
            })
            .collect::<Vec<_>>()
    };
    let spawn: Vec<(f64, f64)> = rows
        .iter()
        .map(|r| {
            (
                r["vms_per_cell"].as_f64().unwrap_or(0.0),
                r["spawn_us_warm"]["p50"].as_f64().unwrap_or(0.0),
            )
        })
        .collect();
    lines(
        &out.join("cells-notifier-sweep.svg"),
        "Guest write cost vs VMs per cell (256 MiB clones)",
        "VMs in the cell",
        "µs (p50)",
        true,
        true,
        &[
            Series::new(
                "guest write after a read (COW fault)",
                pick("guest_read_then_write_us_p50"),
            ),
            Series::new("guest write, untouched page", pick("guest_cow_us_p50")),
            Series::new("spawn from a warm shell", spawn),
        ],
    )
}
