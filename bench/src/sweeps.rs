//! The sweeps of `cowvm bench`: spawn against guest RAM size; spawn, memory and copy-on-write
//! cost against the number of live clones; template sharing after clones write part of their
//! RAM; and a CI-like clone → test → stats → destroy loop with 1 and 2 workers.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cowvm_vmm::host::MemorySnapshot;
use cowvm_vmm::memory::PAGE_SIZE;
use cowvm_vmm::probe::{host_cow_times, write_probe, ProbeTargets};
use cowvm_vmm::stats::{template_sharing, vm_sharing, HostView, TemplateSharing};
use cowvm_vmm::{Clone, CloneEngine, GuestCommand, Template, Vm};
use serde_json::{json, Value};
use vm_memory::GuestAddress;

use super::plot::{bars, lines, Series};
use super::spawn::{destroy_all, fill_pool, spawn_all};
use super::stats::Percentiles;
use super::{make_template, BenchError, DEADLINE};

const MIB: u64 = 1 << 20;

/// A value for the full run, or a smaller one for `--quick`.
pub fn choose<T>(quick: bool, full: T, small: T) -> T {
    if quick {
        small
    } else {
        full
    }
}

/// One of the sweeps.
#[derive(Debug, Clone, Copy)]
pub enum Sweep {
    /// Spawn vs guest RAM size.
    Sizes,
    /// Spawn, memory and COW cost vs live clones.
    LiveClones,
    /// Template sharing after clones write part of their RAM.
    Sharing,
    /// The CI-like loop.
    CiLoop,
}

impl Sweep {
    /// Its name, also the stem of its JSON file.
    pub fn name(self) -> &'static str {
        match self {
            Sweep::Sizes => "sizes",
            Sweep::LiveClones => "live-clones",
            Sweep::Sharing => "sharing",
            Sweep::CiLoop => "ci-loop",
        }
    }
}

/// What the sweeps share: a clone engine, the kernel's page views, the fd limit, and whether
/// the run is the quick one. Each sweep runs with the same counts alone or in the suite.
pub struct Lab {
    engine: Arc<CloneEngine>,
    host: Arc<HostView>,
    fd_limit: u64,
    quick: bool,
}

impl Lab {
    /// Opens KVM, an engine and the page views.
    pub fn new(fd_limit: u64, quick: bool) -> Result<Self, BenchError> {
        let kvm = Arc::new(cowvm_vmm::Kvm::open()?);
        let config = cowvm_vmm::EngineConfig {
            max_clones_per_call: 5000,
            ..Default::default()
        };
        let engine = Arc::new(CloneEngine::new(kvm, config)?);
        Ok(Lab {
            engine,
            host: Arc::new(HostView::open()?),
            fd_limit,
            quick,
        })
    }

    /// Runs `sweep`, writing its plots into `out`; returns its JSON result.
    pub fn run(&self, sweep: Sweep, out: &Path) -> Result<Value, BenchError> {
        let quick = self.quick;
        match sweep {
            Sweep::Sizes => sizes(
                &self.engine,
                choose(quick, &[64, 256, 1024, 4096][..], &[64, 256][..]),
                choose(quick, 100, 5),
                out,
            ),
            Sweep::LiveClones => {
                let max_live = (self.fd_limit.saturating_sub(1000) / 2) as usize;
                let counts: Vec<usize> = choose(quick, &[1usize, 10, 100, 1000, 2000][..], &[1usize, 10][..])
                    .iter()
                    .copied()
                    .filter(|&n| n <= max_live)
                    .collect();
                live_clones(&self.engine, &self.host, &counts, choose(quick, 50, 5), out)
            }
            Sweep::Sharing => sharing(&self.engine, choose(quick, 100, 10), out),
            Sweep::CiLoop => ci_loop(&self.engine, &self.host, choose(quick, 10.0, 1.0), out),
        }
    }
}

fn progress(step: &str) {
    eprintln!("[bench] {step}");
}

/// Spawn p50/p99 of `samples` clones (one batch, warm shells) at each RAM size.
pub fn sizes(engine: &CloneEngine, sizes_mib: &[u64], samples: usize, out: &Path) -> Result<Value, BenchError> {
    let mut rows = Vec::new();
    for &mib in sizes_mib {
        progress(&format!("spawn at {mib} MiB"));
        let template = make_template(engine.kvm(), mib)?;
        engine.flush();
        let before = MemorySnapshot::take().map_err(|source| BenchError::Io {
            what: "read memory figures",
            source,
        })?;
        let fill = fill_pool(engine, &template, samples)?;
        let clones = spawn_all(engine, &template, samples)?;
        let after = MemorySnapshot::take().map_err(|source| BenchError::Io {
            what: "read memory figures",
            source,
        })?;
        let p = Percentiles::of(&clones.iter().map(Clone::spawn_us).collect::<Vec<_>>());
        destroy_all(engine, clones);
        let delta = after.since(&before);
        let per = |kib: i64| kib as f64 / samples.max(1) as f64;
        let restore = |policy| -> Result<f64, BenchError> {
            let mut times = Vec::new();
            for _ in 0..samples.clamp(1, 20) {
                let started = Instant::now();
                let vm = Vm::restore_with(engine.kvm(), template.memory(), template.state(), policy)?;
                times.push(started.elapsed().as_secs_f64() * 1e6);
                drop(vm);
            }
            Ok(Percentiles::of(&times).p50)
        };
        let restore_lazy = restore(cowvm_vmm::slots::SlotPolicy::Lazy)?;
        let restore_eager = restore(cowvm_vmm::slots::SlotPolicy::Eager)?;
        engine.retire(&template);
        rows.push(json!({
            "memory_mib": mib,
            "spawn_us": p,
            "shell_build_us_mean": fill.as_secs_f64() * 1e6 / samples.max(1) as f64,
            "restore_us_p50": {"lazy": restore_lazy, "eager": restore_eager},
            "memory_per_clone_kib": {"user": per(delta.private_kib), "kernel": per(delta.kernel_kib), "total": per(delta.private_kib + delta.kernel_kib)},
        }));
    }
    let series = |key: &str| {
        Series::new(
            format!("spawn {key}"),
            rows.iter()
                .map(|r| {
                    (
                        r["memory_mib"].as_f64().unwrap_or(0.0),
                        r["spawn_us"][key].as_f64().unwrap_or(0.0),
                    )
                })
                .collect(),
        )
    };
    lines(
        &out.join("spawn-vs-size.svg"),
        "Clone spawn vs guest RAM size",
        "guest RAM (MiB)",
        "spawn (µs)",
        true,
        false,
        &[series("p50"), series("p99")],
    )?;
    Ok(json!({"samples": samples, "sizes": rows}))
}

/// At each number of live clones: host memory per clone, spawn p50/p99 of more clones, and the
/// copy-on-write cost of a guest write to an untouched page, of a guest write to a page it has
/// read (the fault replaces a present PTE, so every VM's MMU notifier in the process is called),
/// and of a host write.
pub fn live_clones(
    engine: &CloneEngine,
    host: &HostView,
    counts: &[usize],
    samples: usize,
    out: &Path,
) -> Result<Value, BenchError> {
    let template = make_template(engine.kvm(), 256)?;
    engine.flush();
    let baseline = MemorySnapshot::take().map_err(|source| BenchError::Io {
        what: "read memory figures",
        source,
    })?;
    let mut alive: Vec<Clone> = Vec::new();
    let mut rows = Vec::new();
    for &target in counts {
        let need = target.saturating_sub(alive.len());
        progress(&format!("{target} live clones"));
        if need > 0 {
            fill_pool(engine, &template, need)?;
            alive.extend(spawn_all(engine, &template, need)?);
        }
        engine.flush();
        let now = MemorySnapshot::take().map_err(|source| BenchError::Io {
            what: "read memory figures",
            source,
        })?;
        let delta = now.since(&baseline);
        let per = |kib: i64| kib as f64 / alive.len().max(1) as f64;

        fill_pool(engine, &template, samples)?;
        let mut times = Vec::with_capacity(samples);
        for _ in 0..samples {
            let clones = spawn_all(engine, &template, 1)?;
            times.extend(clones.iter().map(Clone::spawn_us));
            destroy_all(engine, clones);
        }
        let spawn = Percentiles::of(&times);

        let mut pair = spawn_all(engine, &template, 2)?;
        let targets = ProbeTargets::Stride {
            start: 16 * MIB,
            pages: 100,
            stride: PAGE_SIZE,
        };
        let guest = write_probe(pair[0].vm_mut(), &targets, host, None)?;
        let read_first = ProbeTargets::Stride {
            start: 32 * MIB,
            pages: 100,
            stride: PAGE_SIZE,
        };
        let read = GuestCommand::Checksum {
            start: GuestAddress(32 * MIB),
            count: 100,
            stride: PAGE_SIZE,
        };
        pair[0].vm_mut().execute(read, DEADLINE)?;
        let read_then_write = write_probe(pair[0].vm_mut(), &read_first, host, None)?;
        let gpas: Vec<u64> = (0..100).map(|i| 16 * MIB + i * PAGE_SIZE).collect();
        let host_cow = Percentiles::of(&host_cow_times(pair[1].vm(), &gpas)?);
        destroy_all(engine, pair);
        rows.push(json!({
            "live_clones": alive.len(),
            "spawn_us": spawn,
            "memory_per_clone_kib": {"user": per(delta.private_kib), "kernel": per(delta.kernel_kib), "total": per(delta.private_kib + delta.kernel_kib)},
            "guest_cow_us_p50": guest.guest_cow_us.p50,
            "guest_read_then_write_us_p50": read_then_write.guest_cow_us.p50,
            "host_cow_us_p50": host_cow.p50,
        }));
    }
    destroy_all(engine, alive);
    engine.retire(&template);
    let x = |r: &Value| r["live_clones"].as_f64().unwrap_or(0.0);
    let pick = |label: &str, f: &dyn Fn(&Value) -> f64| Series::new(label, rows.iter().map(|r| (x(r), f(r))).collect());
    lines(
        &out.join("spawn-vs-live-clones.svg"),
        "Clone spawn vs live clones (256 MiB)",
        "live clones",
        "spawn (µs)",
        true,
        false,
        &[
            pick("p50", &|r| r["spawn_us"]["p50"].as_f64().unwrap_or(0.0)),
            pick("p99", &|r| r["spawn_us"]["p99"].as_f64().unwrap_or(0.0)),
        ],
    )?;
    lines(
        &out.join("memory-vs-live-clones.svg"),
        "Host memory per live clone (256 MiB)",
        "live clones",
        "KiB per clone",
        true,
        false,
        &[
            pick("user", &|r| r["memory_per_clone_kib"]["user"].as_f64().unwrap_or(0.0)),
            pick("kernel", &|r| {
                r["memory_per_clone_kib"]["kernel"].as_f64().unwrap_or(0.0)
            }),
            pick("total", &|r| r["memory_per_clone_kib"]["total"].as_f64().unwrap_or(0.0)),
        ],
    )?;
    lines(
        &out.join("cow-vs-live-clones.svg"),
        "Copy-on-write fault vs live VMs in the process",
        "live clones",
        "µs per fault (p50)",
        true,
        true,
        &[
            pick("guest write, untouched page", &|r| {
                r["guest_cow_us_p50"].as_f64().unwrap_or(0.0)
            }),
            pick("guest write after a read", &|r| {
                r["guest_read_then_write_us_p50"].as_f64().unwrap_or(0.0)
            }),
            pick("host-only write, untouched page", &|r| {
                r["host_cow_us_p50"].as_f64().unwrap_or(0.0)
            }),
        ],
    )?;
    Ok(json!({"samples": samples, "rows": rows}))
}

/// Scans before [`stable_sharing`] gives up waiting for two that agree.
const SHARING_SCANS: usize = 10;

/// The template's sharing over `vms`, scanned until two scans in a row agree (and how many
/// scans that took). The kernel may move a page cache page to another frame between the reads
/// of two clones (compaction, DAMON), which splits one page's clones over two frames in that
/// scan; nothing in the guests changes meanwhile, so a scan equal to the one before saw no move.
fn stable_sharing(
    template: &Template,
    vms: &[&Vm],
    engine: &CloneEngine,
) -> Result<(TemplateSharing, usize), BenchError> {
    let scan = || template_sharing(template, vms, engine.warm_shells(template), engine.pagemap());
    let mut last = scan()?;
    for scans in 2..=SHARING_SCANS {
        let next = scan()?;
        if next.histogram == last.histogram && next.private_bytes == last.private_bytes {
            return Ok((next, scans));
        }
        last = next;
    }
    Ok((last, SHARING_SCANS))
}

/// Template sharing after 100 clones each read the template's 16 MiB of data and write 0 %, 1 %
/// or 10 % of those pages (every 100th / 10th page at a clone-specific offset, so that at 1 %
/// each data page is copied by one clone and at 10 % by ten). Only pages clones actually map
/// count as shared.
pub fn sharing(engine: &CloneEngine, clones: usize, out: &Path) -> Result<Value, BenchError> {
    let template = sharing_template(engine)?;
    let data = SHARING_DATA_PAGES;
    let first = SHARING_DATA_START / PAGE_SIZE;
    let mut rows = Vec::new();
    let mut series = Vec::new();
    for pct in [0u64, 1, 10] {
        progress(&format!(
            "{clones} clones each read the template's {data} data pages and write {pct} % of them"
        ));
        fill_pool(engine, &template, clones)?;
        let mut made = spawn_all(engine, &template, clones)?;
        for (i, clone) in made.iter_mut().enumerate() {
            let read = GuestCommand::Checksum {
                start: GuestAddress(SHARING_DATA_START),
                count: data,
                stride: PAGE_SIZE,
            };
            clone.vm_mut().execute(read, Some(Duration::from_secs(60)))?;
            if let Some(stride) = 100u64.checked_div(pct) {
                let start = first + (i as u64 * 37) % stride;
                let write = GuestCommand::Write {
                    start: GuestAddress(start * PAGE_SIZE),
                    count: (first + data - start).div_ceil(stride),
                    stride: stride * PAGE_SIZE,
                    value: i as u64,
                };
                clone.vm_mut().execute(write, Some(Duration::from_secs(60)))?;
            }
        }
        let vms: Vec<&Vm> = made.iter().map(Clone::vm).collect();
        let (stats, scans) = stable_sharing(&template, &vms, engine)?;
        series.push(Series::new(
            format!("{pct} % written"),
            stats.histogram.iter().map(|(k, v)| (*k as f64, *v as f64)).collect(),
        ));
        let used = stats.mapped_bytes + stats.private_bytes;
        rows.push(json!({
            "percent_written": pct,
            "scans": scans,
            "populated_pages": stats.populated_pages,
            "histogram": stats.histogram,
            "pages_shared_by_all": stats.pages_shared_by_all,
            "mapped_bytes": stats.mapped_bytes,
            "private_bytes": stats.private_bytes,
            "saved_bytes": stats.saved_bytes,
            "full_copy_bytes": stats.full_copy_bytes,
            "saved_percent": 100.0 * stats.saved_bytes as f64 / used.max(1) as f64,
        }));
        destroy_all(engine, made);
    }
    engine.retire(&template);
    lines(
        &out.join("sharing-histogram.svg"),
        &format!("Template pages by clones mapping their frame ({clones} clones)"),
        "clones mapping the page's frame",
        "pages",
        false,
        true,
        &series,
    )?;
    let saved: Vec<(String, f64)> = rows
        .iter()
        .map(|r| {
            (
                format!("{} % written", r["percent_written"]),
                r["saved_percent"].as_f64().unwrap_or(0.0),
            )
        })
        .collect();
    bars(
        &out.join("memory-saved.svg"),
        "Saved: bytes clones map from shared frames, % of what they map and copied",
        "% saved",
        &saved,
    )?;
    Ok(json!({"clones": clones, "template_mib": template.size() >> 20, "data_pages": data, "rows": rows}))
}

/// Where the sharing sweep's template holds its data, and how many pages.
const SHARING_DATA_START: u64 = 8 * MIB;
const SHARING_DATA_PAGES: u64 = 16 * MIB / PAGE_SIZE;

/// A 256 MiB template whose guest filled 16 MiB from 8 MiB (like `cowvm demo`).
fn sharing_template(engine: &CloneEngine) -> Result<Arc<cowvm_vmm::Template>, BenchError> {
    let kvm = engine.kvm();
    let (mut vm, _) = Vm::boot(kvm, &cowvm_vmm::VmConfig::builtin(256))?;
    let fill = GuestCommand::Write {
        start: GuestAddress(SHARING_DATA_START),
        count: SHARING_DATA_PAGES,
        stride: PAGE_SIZE,
        value: 0x5eed,
    };
    vm.execute(fill, Some(Duration::from_secs(60)))?;
    Ok(Arc::new(cowvm_vmm::Template::freeze(kvm, &mut vm)?))
}

/// The steps of one CI-loop iteration, as the rows' `worker_cpu_us_per_iteration` names them
/// (`delete` includes the loop's own bookkeeping).
const CI_STEPS: [&str; 5] = ["clone", "checksum_64", "write_16", "stats", "delete"];

/// CPU time the calling thread has used, in microseconds.
fn thread_cpu_us() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec into `ts`, which lives for the call.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 * 1e6 + ts.tv_nsec as f64 / 1e3
}

/// A CI-like loop for `seconds`: clone from warm shells, run a test command in the guest (read
/// 64 pages, write 16), collect sharing statistics, delete as the server does (the used VM is
/// recycled into the warm pool); iterations per second with 1 and 2
/// worker threads, in process and then over the API of an embedded server (`"via"` says which).
pub fn ci_loop(engine: &Arc<CloneEngine>, host: &Arc<HostView>, seconds: f64, out: &Path) -> Result<Value, BenchError> {
    let template = make_template(engine.kvm(), 256)?;
    let mut rows = Vec::new();
    for workers in [1usize, 2] {
        progress(&format!("CI loop with {workers} worker(s) for {seconds} s"));
        fill_pool(engine, &template, 64)?;
        engine.keep_warm(&template, 64);
        let recycled_before = engine.recycle_stats();
        let iterations = Arc::new(AtomicU64::new(0));
        let deadline = Instant::now() + Duration::from_secs_f64(seconds);
        let started = Instant::now();
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                let (engine, host, template, iterations) = (
                    Arc::clone(engine),
                    Arc::clone(host),
                    Arc::clone(&template),
                    Arc::clone(&iterations),
                );
                std::thread::spawn(move || -> Result<[f64; CI_STEPS.len()], String> {
                    // CPU time of this thread per step (load on the host does not inflate it).
                    let mut cpu = [0.0; CI_STEPS.len()];
                    let mut mark = thread_cpu_us();
                    let mut lap = |step: usize| {
                        let now = thread_cpu_us();
                        cpu[step] += now - mark;
                        mark = now;
                    };
                    while Instant::now() < deadline {
                        lap(CI_STEPS.len() - 1);
                        // As the server does: room for one clone, the clone, and DELETE hands
                        // the VM back to be recycled into the warm pool (with its room).
                        let mut room = engine.reserve(1, Some(&template)).map_err(|e| e.to_string())?;
                        let mut clone = engine
                            .spawn_reserved(&template, &mut room, &|| false)
                            .map_err(|e| e.to_string())?
                            .clones
                            .pop()
                            .ok_or("no clone")?;
                        lap(0);
                        let vm = clone.vm_mut();
                        vm.execute(
                            GuestCommand::Checksum {
                                start: GuestAddress(8 * MIB),
                                count: 64,
                                stride: PAGE_SIZE,
                            },
                            DEADLINE,
                        )
                        .map_err(|e| e.to_string())?;
                        lap(1);
                        vm.execute(
                            GuestCommand::Write {
                                start: GuestAddress(16 * MIB),
                                count: 16,
                                stride: PAGE_SIZE,
                                value: 1,
                            },
                            DEADLINE,
                        )
                        .map_err(|e| e.to_string())?;
                        lap(2);
                        let stats = vm_sharing(clone.vm(), &host).map_err(|e| e.to_string())?;
                        if stats.pages.private != 16 {
                            return Err(format!(
                                "expected 16 private pages, the kernel says {}",
                                stats.pages.private
                            ));
                        }
                        lap(3);
                        engine.recycle(clone, Some(room));
                        iterations.fetch_add(1, Ordering::Relaxed);
                    }
                    lap(CI_STEPS.len() - 1);
                    Ok(cpu)
                })
            })
            .collect();
        let mut cpu = [0.0; CI_STEPS.len()];
        for handle in handles {
            let worker = handle
                .join()
                .map_err(|_| BenchError::Setup("a CI worker panicked".into()))?
                .map_err(BenchError::Setup)?;
            cpu.iter_mut().zip(worker).for_each(|(sum, us)| *sum += us);
        }
        let elapsed = started.elapsed().as_secs_f64();
        engine.wait_recycled(Duration::from_secs(60));
        let recycled = engine.recycle_stats();
        engine.keep_warm(&template, 0);
        engine.flush();
        let done = iterations.load(Ordering::Relaxed);
        let per_step: serde_json::Map<String, Value> = CI_STEPS
            .iter()
            .zip(cpu)
            .map(|(step, us)| (step.to_string(), json!(us / done.max(1) as f64)))
            .collect();
        let mut recycle_us = recycled.recent_us.clone();
        recycle_us.sort_by(f64::total_cmp);
        rows.push(json!({
            "via": "in_process", "workers": workers, "iterations": done, "seconds": elapsed,
            "iterations_per_s": done as f64 / elapsed,
            "worker_cpu_us_per_iteration": per_step,
            "recycle_us_p50": recycle_us.get(recycle_us.len() / 2),
            "recycled": recycled.recycled - recycled_before.recycled,
            "not_recycled": recycled.destroyed - recycled_before.destroyed,
        }));
    }
    engine.retire(&template);
    rows.extend(super::ci_http::ci_loop_http(256, seconds)?);
    let values: Vec<(String, f64)> = rows
        .iter()
        .map(|r| {
            let via = match (r["via"] == "http", r["cells"] == true) {
                (true, true) => "HTTP, cells",
                (true, false) => "HTTP",
                _ => "in-process",
            };
            (
                format!("{via}, {} worker(s)", r["workers"]),
                r["iterations_per_s"].as_f64().unwrap_or(0.0),
            )
        })
        .collect();
    bars(
        &out.join("ci-loop.svg"),
        "CI loop: clone → test → stats → destroy, in process and over HTTP (iterations/s)",
        "iterations per second",
        &values,
    )?;
    Ok(json!({"rows": rows}))
}
