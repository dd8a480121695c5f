//! `cowvm bench load` and `cowvm bench soak`: an embedded server driven over real HTTP on
//! loopback. Load: concurrent clients, mixed requests (clone, probe, stats, reset, delete); counts
//! 5xx answers, latency percentiles, and whether fds, mappings and RSS return to their baseline.
//! Soak: create and destroy clones in a loop and fit the slope of fds, mappings, RSS and kernel
//! memory over time (a leak shows as a slope).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use cowvm_vmm::host::{self, MemorySnapshot};
use serde_json::{json, Value};

use super::io_err;
use super::stats::{median, Percentiles};
use super::{write_json, BenchError};
use cowvm::client::{Client, ClientError};
use cowvm::server::model::CreateVm;
use cowvm::server::{self, Limits, RunningServer, ServerConfig};

/// Arguments of `cowvm bench load`.
#[derive(Args, Clone)]
pub struct LoadArgs {
    /// Concurrent clients.
    #[arg(long, default_value_t = 32)]
    pub clients: usize,
    /// Requests in all.
    #[arg(long, default_value_t = 10_000)]
    pub requests: u64,
    /// Stop after this many seconds even if requests remain.
    #[arg(long, default_value_t = 300)]
    pub max_seconds: u64,
    /// Guest RAM of the template, MiB.
    #[arg(long, default_value_t = 64)]
    pub memory_mib: u64,
    /// Repeat the measured run this many times, reporting fds, mappings and RSS after each (a
    /// leak keeps growing round after round; an allocator's high-water mark levels off).
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
    /// Write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// Arguments of `cowvm bench soak`.
#[derive(Args, Clone)]
pub struct SoakArgs {
    /// How long to run.
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
    /// Clones made and destroyed per cycle.
    #[arg(long, default_value_t = 10)]
    pub batch: u64,
    /// Write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// One request of a load run: its kind, its HTTP status (0: no answer) and its latency in ms.
type Sample = (&'static str, u16, f64);

/// Warm shells the load run keeps for its template.
const WARM_SHELLS: usize = 64;

/// Open fds, mappings, RSS (KiB) and kernel memory (KiB) of this process and host, now.
fn resources() -> Result<[f64; 4], BenchError> {
    let fds = host::open_fds().map_err(io_err("list /proc/self/fd"))?;
    let maps = host::mappings().map_err(io_err("read /proc/self/maps"))?;
    let memory = MemorySnapshot::take().map_err(io_err("read memory figures"))?;
    Ok([
        fds as f64,
        maps as f64,
        memory.rss_kib() as f64,
        memory.kernel_kib() as f64,
    ])
}

pub(super) fn start_server(warm_shells: usize) -> Result<(RunningServer, Client), BenchError> {
    start_server_with(warm_shells, None)
}

/// [`start_server`] with its VMs in cells when `cells` is given (as `cowvm serve` runs them by
/// default).
pub(super) fn start_server_with(
    warm_shells: usize,
    cells: Option<cowvm::server::CellsConfig>,
) -> Result<(RunningServer, Client), BenchError> {
    let limits = Limits {
        max_vms: 4000,
        max_clones_per_call: 1000,
        warm_shells,
        ..Limits::default()
    };
    let server = server::start(ServerConfig {
        limits,
        cells,
        ..ServerConfig::local(0)
    })
    .map_err(|e| BenchError::Setup(e.to_string()))?;
    let client = Client::new(&format!("http://{}", server.addr), None);
    Ok((server, client))
}

pub(super) fn call(client: &Client, method: &str, path: &str, body: Option<Value>) -> Result<Value, BenchError> {
    client
        .call(method, path, body.as_ref())
        .map_err(|e| BenchError::Setup(format!("{method} {path}: {e}")))
}

/// The benchmark error for a typed client call that failed while doing `what`.
pub(super) fn api_err(what: &str) -> impl Fn(ClientError) -> BenchError + '_ {
    move |e| BenchError::Setup(format!("{what}: {e}"))
}

pub(super) fn make_template(client: &Client, memory_mib: u64) -> Result<String, BenchError> {
    let vm = client
        .create_vm(&CreateVm {
            memory_mib,
            vcpus: 1,
            warmup_mib: 4,
            kernel: None,
        })
        .map_err(api_err("boot the template's VM"))?;
    let template = client.snapshot(&vm.id).map_err(api_err("snapshot"))?.template_id;
    client.delete_vm(&vm.id).map_err(api_err("delete the template's VM"))?;
    Ok(template)
}

/// Resources once fds and mappings have stopped changing (background teardown has finished).
fn quiet(limit: Duration) -> Result<[f64; 4], BenchError> {
    let started = Instant::now();
    let mut last = resources()?;
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let now = resources()?;
        if (now[0] == last[0] && now[1] == last[1]) || started.elapsed() > limit {
            return Ok(now);
        }
        last = now;
    }
}

/// Waits until fds and mappings are back at or below `baseline` (teardown is asynchronous).
fn settle(baseline: [f64; 4], limit: Duration) -> Result<[f64; 4], BenchError> {
    let started = Instant::now();
    loop {
        let now = resources()?;
        if (now[0] <= baseline[0] && now[1] <= baseline[1]) || started.elapsed() > limit {
            return Ok(now);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs `cowvm bench load`.
pub fn load(args: &LoadArgs) -> Result<(), BenchError> {
    let results = measure_load(args)?;
    println!(
        "cowvm bench load: {} requests from {} clients in {:.1} s: {} answered 5xx, {} 4xx; latency p50 {:.2} ms, p99 {:.2} ms; after: fds {:+}, mappings {:+}, RSS {:+.0} KiB against the baseline",
        results["requests"], results["clients"], results["seconds"].as_f64().unwrap_or(0.0), results["status_5xx"], results["status_4xx"],
        results["latency_ms"]["p50"].as_f64().unwrap_or(0.0), results["latency_ms"]["p99"].as_f64().unwrap_or(0.0),
        results["after"]["fds_delta"], results["after"]["mappings_delta"], results["after"]["rss_kib_delta"].as_f64().unwrap_or(0.0)
    );
    if let Some(path) = &args.json {
        write_json(path, &results)?;
    }
    Ok(())
}

/// Waits (up to 60 s) until `template` has `shells` warm shells, as the server reports them.
pub(crate) fn wait_for_full_pool(client: &Client, template: &str, shells: usize) -> Result<(), BenchError> {
    let started = Instant::now();
    while client
        .template(template)
        .map_err(api_err("read the template"))?
        .warm_shells
        < shells
    {
        if started.elapsed() > Duration::from_secs(60) {
            return Err(BenchError::Setup(
                "the warm-shell pool did not refill within 60 s".into(),
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Measures the load run.
pub fn measure_load(args: &LoadArgs) -> Result<Value, BenchError> {
    cowvm_vmm::host::raise_fd_limit().map_err(io_err("raise RLIMIT_NOFILE"))?;
    let (server, client) = start_server(WARM_SHELLS)?;
    let template = make_template(&client, args.memory_mib)?;
    let full_pool = |client: &Client| wait_for_full_pool(client, &template, WARM_SHELLS);
    full_pool(&client)?;
    let url = format!("http://{}", server.addr);
    // Warm up with the same traffic, so that thread pools and allocator arenas exist before the
    // baseline is taken; then the measured run.
    drive(
        &url,
        &template,
        args.clients,
        (args.requests / 10).clamp(5, 1000),
        Duration::from_secs(args.max_seconds),
    )?;
    full_pool(&client)?;
    let baseline = quiet(Duration::from_secs(10))?;
    let started = Instant::now();
    let mut samples = Vec::new();
    let mut rounds = Vec::new();
    for _ in 0..args.rounds.max(1) {
        samples.extend(drive(
            &url,
            &template,
            args.clients,
            args.requests,
            Duration::from_secs(args.max_seconds),
        )?);
        full_pool(&client)?;
        let now = settle(baseline, Duration::from_secs(30))?;
        rounds.push(json!({"fds_delta": now[0] - baseline[0], "mappings_delta": now[1] - baseline[1], "rss_kib_delta": now[2] - baseline[2]}));
    }
    let seconds = started.elapsed().as_secs_f64();
    let after = resources()?;
    let latencies: Vec<f64> = samples.iter().map(|s| s.2).collect();
    let by_kind: serde_json::Map<String, Value> = ["clone", "probe", "stats", "reset", "delete"]
        .iter()
        .map(|k| {
            let l: Vec<f64> = samples.iter().filter(|s| s.0 == *k).map(|s| s.2).collect();
            ((*k).to_owned(), json!(Percentiles::of(&l)))
        })
        .collect();
    let count = |f: &dyn Fn(u16) -> bool| samples.iter().filter(|s| f(s.1)).count();
    call(&client, "DELETE", &format!("/v1/templates/{template}"), None)?;
    server.stop().map_err(|e| BenchError::Setup(e.to_string()))?;
    Ok(json!({
        "clients": args.clients,
        "requests": samples.len(),
        "seconds": seconds,
        "requests_per_s": samples.len() as f64 / seconds,
        "status_2xx": count(&|s| (200..300).contains(&s)),
        "status_4xx": count(&|s| (400..500).contains(&s)),
        "status_5xx": count(&|s| s >= 500),
        "no_answer": count(&|s| s == 0),
        "latency_ms": Percentiles::of(&latencies),
        "latency_ms_by_request": by_kind,
        "baseline": {"fds": baseline[0], "mappings": baseline[1], "rss_kib": baseline[2]},
        "after_each_round": rounds,
        "after": {
            "fds_delta": after[0] - baseline[0],
            "mappings_delta": after[1] - baseline[1],
            "rss_kib_delta": after[2] - baseline[2],
            "kernel_kib_delta": after[3] - baseline[3],
        },
    }))
}

/// `clients` threads send `requests` requests in cycles of clone, probe, stats, reset, delete;
/// returns (kind, status, milliseconds) of each (status 0: no answer).
fn drive(url: &str, template: &str, clients: usize, requests: u64, max: Duration) -> Result<Vec<Sample>, BenchError> {
    let budget = Arc::new(AtomicU64::new(requests));
    let samples: Arc<Mutex<Vec<Sample>>> = Arc::new(Mutex::new(Vec::new()));
    let deadline = Instant::now() + max;
    let workers: Vec<_> = (0..clients.max(1))
        .map(|_| {
            let (budget, samples, url, template) = (
                Arc::clone(&budget),
                Arc::clone(&samples),
                url.to_owned(),
                template.to_owned(),
            );
            std::thread::spawn(move || {
                let client = Client::new(&url, None);
                let mut local = Vec::new();
                let take = |n: u64| {
                    budget
                        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| b.checked_sub(n))
                        .is_ok()
                };
                while Instant::now() < deadline && take(5) {
                    let mut timed = |kind: &'static str, method: &str, path: String, body: Option<Value>| {
                        let t = Instant::now();
                        let answer = client.request(method, &path, body.as_ref());
                        let status = answer.as_ref().map_or(0, |a| a.status);
                        local.push((kind, status, t.elapsed().as_secs_f64() * 1e3));
                        answer.ok()
                    };
                    let made = timed(
                        "clone",
                        "POST",
                        format!("/v1/templates/{template}/clones"),
                        Some(json!({"count": 1})),
                    );
                    let Some(id) = made.and_then(|a| a.body["clones"][0]["id"].as_str().map(str::to_owned)) else {
                        continue;
                    };
                    timed(
                        "probe",
                        "POST",
                        format!("/v1/vms/{id}/probes/write"),
                        Some(json!({"start_gpa": 8 << 20, "pages": 2})),
                    );
                    timed("stats", "GET", format!("/v1/vms/{id}/stats"), None);
                    timed("reset", "POST", format!("/v1/vms/{id}/reset"), None);
                    timed("delete", "DELETE", format!("/v1/vms/{id}"), None);
                }
                if let Ok(mut all) = samples.lock() {
                    all.extend(local);
                }
            })
        })
        .collect();
    for worker in workers {
        worker
            .join()
            .map_err(|_| BenchError::Setup("a load client panicked".into()))?;
    }
    let samples = samples.lock().map(|s| s.clone()).unwrap_or_default();
    Ok(samples)
}

/// Least-squares slope of `points` (x = seconds).
fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let (sx, sy) = points.iter().fold((0.0, 0.0), |(a, b), p| (a + p.0, b + p.1));
    let (mx, my) = (sx / n, sy / n);
    let (num, den) = points.iter().fold((0.0, 0.0), |(a, b), p| {
        (a + (p.0 - mx) * (p.1 - my), b + (p.0 - mx) * (p.0 - mx))
    });
    if den == 0.0 {
        0.0
    } else {
        num / den
    }
}

/// Runs `cowvm bench soak`.
pub fn soak(args: &SoakArgs) -> Result<(), BenchError> {
    let results = measure_soak(args)?;
    let s = &results["slope_per_minute"];
    println!(
        "cowvm bench soak: {} cycles of {} clones in {:.0} s ({}); slope per minute over the second half: fds {:+.2}, mappings {:+.2}, RSS {:+.1} KiB, kernel {:+.1} KiB",
        results["cycles"], args.batch, results["seconds"].as_f64().unwrap_or(0.0),
        if results["flat"] == true { "flat" } else { "NOT FLAT: a leak?" },
        s["fds"].as_f64().unwrap_or(0.0), s["mappings"].as_f64().unwrap_or(0.0), s["rss_kib"].as_f64().unwrap_or(0.0), s["kernel_kib"].as_f64().unwrap_or(0.0)
    );
    if let Some(path) = &args.json {
        write_json(path, &results)?;
    }
    Ok(())
}

/// Measures the soak run.
pub fn measure_soak(args: &SoakArgs) -> Result<Value, BenchError> {
    cowvm_vmm::host::raise_fd_limit().map_err(io_err("raise RLIMIT_NOFILE"))?;
    let (server, client) = start_server(0)?;
    let template = make_template(&client, 64)?;
    let started = Instant::now();
    let duration = Duration::from_secs(args.seconds.max(2));
    let mut samples: Vec<(f64, [f64; 4])> = Vec::new();
    // Per cycle: what each counter gained from just before the clones were made to just after
    // they were torn down.
    let mut cycle_growth: Vec<(f64, [f64; 4])> = Vec::new();
    let mut cycles = 0u64;
    server.wait_for_teardowns();
    let mut before = resources()?;
    while started.elapsed() < duration {
        let made = client.clone_template(&template, args.batch).map_err(api_err("clone"))?;
        for clone in &made.clones {
            client.delete_vm(&clone.id).map_err(api_err("delete a clone"))?;
        }
        cycles += 1;
        // Sample at a quiescent point: DELETE answers before the reaper has torn the clone down,
        // and on a busy machine the reaper lags, which would read as growth.
        server.wait_for_teardowns();
        let after = resources()?;
        let now = started.elapsed().as_secs_f64();
        cycle_growth.push((now, std::array::from_fn(|i| after[i] - before[i])));
        samples.push((now, after));
        before = after;
    }
    client
        .delete_template(&template)
        .map_err(api_err("delete the template"))?;
    server.stop().map_err(|e| BenchError::Setup(e.to_string()))?;
    let second_half: Vec<&(f64, [f64; 4])> = samples.iter().filter(|s| s.0 >= duration.as_secs_f64() / 2.0).collect();
    let per_minute = |i: usize| slope(&second_half.iter().map(|s| (s.0, s.1[i])).collect::<Vec<_>>()) * 60.0;
    let first = samples.first().map(|s| s.1).unwrap_or_default();
    let last = samples.last().map(|s| s.1).unwrap_or_default();
    // Flat: less than one fd or mapping per hundred clones and 1 KiB of RSS per clone made (a
    // leaked clone holds 2 fds, 2 mappings and ~900 KiB of kernel memory).
    let clones_per_minute = (cycles * args.batch) as f64 / started.elapsed().as_secs_f64() * 60.0;
    // Fds are this process's own and exact at a quiescent point: their slope is judged. Mappings
    // (thread stacks of tokio's blocking pool come and go) and RSS (the allocator) move in bursts
    // for reasons other than clones; a leak shows in every cycle, so their median growth per
    // cycle over the second half is judged. Kernel memory is host-wide (other processes allocate and free it too, and
    // freed slab and vmalloc memory returns in batches): it is reported as a slope, not judged;
    // a clone that leaks its VM keeps its fds, which are judged exactly.
    let per_clone = |i: usize| match i {
        0 | 3 => per_minute(i) / clones_per_minute.max(1.0),
        _ => {
            let half = duration.as_secs_f64() / 2.0;
            let growth = cycle_growth.iter().filter(|g| g.0 >= half).map(|g| g.1[i]);
            median(growth.collect()) / args.batch.max(1) as f64
        }
    };
    let flat = per_clone(0) < 0.01 && per_clone(1) < 0.01 && per_clone(2) < 1.0;
    Ok(json!({
        "flat": flat,
        "per_clone_growth": {"fds": per_clone(0), "mappings": per_clone(1), "rss_kib": per_clone(2), "kernel_kib": per_clone(3)},
        "seconds": started.elapsed().as_secs_f64(),
        "cycles": cycles,
        "clones_made": cycles * args.batch,
        "slope_per_minute": {"fds": per_minute(0), "mappings": per_minute(1), "rss_kib": per_minute(2), "kernel_kib": per_minute(3)},
        "first": {"fds": first[0], "mappings": first[1], "rss_kib": first[2], "kernel_kib": first[3]},
        "last": {"fds": last[0], "mappings": last[1], "rss_kib": last[2], "kernel_kib": last[3]},
        "samples": samples.len(),
    }))
}
