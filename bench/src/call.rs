//! `cowvm bench call`: the cost of one call into a user guest (guest ABI v1). The guest is the C
//! SDK's empty example (no input, no output), so the figures are the VMM's and the SDK's: take a warm shell,
//! write the mailbox, run the guest from `ready()` to `done()`, read the answer, hand the clone
//! to the reaper. Throughput runs with concurrent clients in-process and over HTTP, where the
//! warm shells run out and the shell builder's pace shows.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use cowvm_vmm::call::call_template;
use cowvm_vmm::{CloneEngine, EngineConfig, Kernel, Kvm, Template, Vm, VmConfig};
use serde_json::{json, Value};

use super::spawn::fill_pool;
use super::stats::Percentiles;
use super::{write_json, BenchError};
use cowvm::client::Client;
use cowvm::server::model::{CallRequest, CallResult, CreateVm};
use cowvm::server::{self, CellsConfig, Limits, ServerConfig};

/// How long one benchmark call may run.
const CALL_DEADLINE: Duration = Duration::from_secs(5);

/// Arguments of `cowvm bench call`.
#[derive(Args)]
pub struct CallArgs {
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 64)]
    pub memory_mib: u64,
    /// Timed calls for the latency figure (each from a warm shell).
    #[arg(long, default_value_t = 500)]
    pub samples: usize,
    /// Calls for each throughput figure.
    #[arg(long, default_value_t = 1000)]
    pub calls: usize,
    /// Concurrent clients for the throughput figures.
    #[arg(long, default_value_t = 2)]
    pub clients: usize,
    /// Timed sequential calls over HTTP for the HTTP latency figure (warm shells refilled
    /// between calls).
    #[arg(long, default_value_t = 200)]
    pub http_samples: usize,
    /// Run the HTTP figures against a server with `--cells`: the calls run in cell processes
    /// (this executable as `cowvm cell`).
    #[arg(long)]
    pub cells: bool,
    /// Write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

fn setup(what: &str) -> impl Fn(String) -> BenchError + '_ {
    move |e| BenchError::Setup(format!("{what}: {e}"))
}

/// The empty guest as a kernel file in a fresh directory (the server boots kernels from files).
fn guest_dir() -> Result<PathBuf, BenchError> {
    let dir = std::env::temp_dir().join(format!("cowvm-bench-call-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|source| BenchError::Io {
        what: "create the kernel directory",
        source,
    })?;
    std::fs::write(dir.join("empty.elf"), cowvm_guest::EMPTY_ELF).map_err(|source| BenchError::Io {
        what: "write the empty guest",
        source,
    })?;
    Ok(dir)
}

fn empty_template(kvm: &Kvm, dir: &std::path::Path, memory_mib: u64) -> Result<Arc<Template>, BenchError> {
    let config = VmConfig {
        kernel: Kernel::Elf(dir.join("empty.elf")),
        ..VmConfig::builtin(memory_mib)
    };
    let (mut vm, report) = Vm::boot(kvm, &config)?;
    cowvm_vmm::call::run_to_ready(&mut vm, report.first_exit, CALL_DEADLINE)
        .map_err(|e| setup("run the empty guest to ready()")(e.to_string()))?;
    Ok(Arc::new(Template::freeze(kvm, &mut vm)?))
}

/// `clients` threads run `calls` calls in all through `one`; calls per second.
fn throughput(clients: usize, calls: usize, one: impl Fn() -> Result<(), String> + Sync) -> Result<f64, BenchError> {
    let started = Instant::now();
    let per_client = calls.div_ceil(clients.max(1));
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..clients.max(1))
            .map(|_| scope.spawn(|| (0..per_client).try_for_each(|_| one())))
            .collect();
        workers
            .into_iter()
            .try_for_each(|w| w.join().unwrap_or_else(|_| Err("a client thread panicked".into())))
    })
    .map_err(setup("a throughput call failed"))?;
    Ok((per_client * clients.max(1)) as f64 / started.elapsed().as_secs_f64())
}

/// Measures everything; the JSON result.
pub fn measure(args: &CallArgs) -> Result<Value, BenchError> {
    let dir = guest_dir()?;
    let kvm = Arc::new(Kvm::open()?);
    let engine = CloneEngine::new(Arc::clone(&kvm), EngineConfig::default())?;
    let template = empty_template(&kvm, &dir, args.memory_mib)?;

    // Latency: each call from a warm shell, shells refilled between batches of 8 (the server's
    // default pool; every live VM adds an MMU notifier that slows each copy-on-write fault).
    let batch = 8.min(args.samples.max(1));
    let (mut call_us, mut spawn_us, mut run_us) = (Vec::new(), Vec::new(), Vec::new());
    while call_us.len() < args.samples {
        fill_pool(&engine, &template, batch)?;
        for _ in 0..batch.min(args.samples - call_us.len()) {
            let started = Instant::now();
            let report = call_template(&engine, &template, b"", CALL_DEADLINE)
                .map_err(|e| setup("an empty call failed")(e.to_string()))?;
            call_us.push(started.elapsed().as_secs_f64() * 1e6);
            spawn_us.push(report.spawn_us);
            run_us.push(report.run_us);
            if report.status != 0 || !report.output.is_empty() {
                return Err(setup("the empty guest")(format!(
                    "answered status {} with {} bytes",
                    report.status,
                    report.output.len()
                )));
            }
        }
    }
    engine.flush();

    // Throughput in-process: the warm shells start full and the builder refills them as it can.
    fill_pool(&engine, &template, 8)?;
    engine.keep_warm(&template, 8);
    let in_process = throughput(args.clients, args.calls, || {
        call_template(&engine, &template, b"", CALL_DEADLINE)
            .map(drop)
            .map_err(|e| e.to_string())
    })?;
    engine.keep_warm(&template, 0);
    engine.retire(&template);
    engine.flush();
    drop(engine);

    let http = over_http(args, &dir)?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(json!({
        "memory_mib": args.memory_mib,
        "guest": "guest/sdk/examples/empty.c, empty input",
        "call_us": Percentiles::of(&call_us),
        "spawn_us": Percentiles::of(&spawn_us),
        "run_us": Percentiles::of(&run_us),
        "calls_per_s": {"in_process": in_process, "http": http.calls_per_s},
        "http_call_us": Percentiles::of(&http.call_us),
        "http_spawn_us": Percentiles::of(&http.spawn_us),
        "cells": args.cells,
        "clients": args.clients,
        "throughput_calls": args.calls,
    }))
}

/// The figures over HTTP.
struct OverHttp {
    /// `POST /v1/templates/{id}/call` from a loopback client, one at a time, microseconds.
    call_us: Vec<f64>,
    /// The `spawn_us` those calls answered (small when a warm shell was taken).
    spawn_us: Vec<f64>,
    calls_per_s: f64,
}

/// Empty calls over HTTP to a server in this process (with `--cells` if asked): latency of
/// sequential calls with warm shells, then throughput with concurrent clients.
fn over_http(args: &CallArgs, dir: &std::path::Path) -> Result<OverHttp, BenchError> {
    let cells = if args.cells {
        let cells = CellsConfig::current_exe(cowvm_cell::DEFAULT_VMS_PER_CELL, 4)
            .map_err(|e| setup("find this executable for the cells")(e.to_string()))?;
        Some(cells)
    } else {
        None
    };
    let server = server::start(ServerConfig {
        kernel_dir: Some(dir.to_owned()),
        limits: Limits {
            warm_shells: 8,
            ..Limits::default()
        },
        cells,
        ..ServerConfig::local(0)
    })
    .map_err(|e| setup("start the server")(e.to_string()))?;
    let url = format!("http://{}", server.addr);
    let client = Client::new(&url, None);
    let vm = client
        .create_vm(&CreateVm {
            memory_mib: args.memory_mib,
            vcpus: 1,
            warmup_mib: 0,
            kernel: Some("empty.elf".into()),
        })
        .map_err(|e| setup("boot the empty guest")(e.to_string()))?;
    let made = client.snapshot(&vm.id).map_err(|e| setup("snapshot")(e.to_string()))?;
    let path = format!("/v1/templates/{}/call", made.template_id);
    let empty = CallRequest {
        input: String::new(),
        timeout_ms: None,
    };
    let template = made.template_id.clone();
    let warm = || {
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(10) {
            if client.template(&template).is_ok_and(|info| info.warm_shells >= 8) {
                return;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    };
    // Latency: each call with the template's warm shells ready (the builders refill them
    // between calls, off the clock).
    let (mut call_us, mut spawn_us) = (Vec::new(), Vec::new());
    for _ in 0..args.http_samples {
        warm();
        let started = Instant::now();
        let answer: CallResult = client
            .post(&path, &empty)
            .map_err(|e| setup("an empty call over HTTP")(e.to_string()))?;
        call_us.push(started.elapsed().as_secs_f64() * 1e6);
        spawn_us.push(answer.spawn_us);
    }
    warm();
    let clients: Vec<Client> = (0..args.clients.max(1)).map(|_| Client::new(&url, None)).collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let rate = throughput(args.clients, args.calls, || {
        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        clients[i % clients.len()]
            .post::<CallResult>(&path, &empty)
            .map(drop)
            .map_err(|e| format!("POST {path}: {e}"))
    })?;
    server.stop().map_err(|e| setup("stop the server")(e.to_string()))?;
    Ok(OverHttp {
        call_us,
        spawn_us,
        calls_per_s: rate,
    })
}

/// Prints the figures.
pub fn print_summary(result: &Value) {
    let p = |key: &str, q: &str| result[key][q].as_f64().unwrap_or(0.0);
    println!(
        "empty call, in-process: p50 {:.1} µs, p99 {:.1} µs (spawn p50 {:.1} µs, guest run p50 {:.1} µs)",
        p("call_us", "p50"),
        p("call_us", "p99"),
        p("spawn_us", "p50"),
        p("run_us", "p50")
    );
    println!(
        "empty call over HTTP{}: p50 {:.1} µs, p99 {:.1} µs (spawn p50 {:.1} µs)",
        if result["cells"] == true { " with --cells" } else { "" },
        p("http_call_us", "p50"),
        p("http_call_us", "p99"),
        p("http_spawn_us", "p50")
    );
    println!(
        "calls per second with {} clients: {:.0} in-process, {:.0} over HTTP",
        result["clients"],
        result["calls_per_s"]["in_process"].as_f64().unwrap_or(0.0),
        result["calls_per_s"]["http"].as_f64().unwrap_or(0.0)
    );
}

/// Runs `cowvm bench call`.
pub fn run(args: &CallArgs) -> Result<(), BenchError> {
    cowvm_vmm::host::raise_fd_limit().map_err(|source| BenchError::Io {
        what: "raise RLIMIT_NOFILE",
        source,
    })?;
    let result = measure(args)?;
    print_summary(&result);
    if let Some(path) = &args.json {
        write_json(path, &result)?;
    }
    Ok(())
}
