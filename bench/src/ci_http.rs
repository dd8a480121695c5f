//! The CI-like loop of `cowvm bench ci-loop` over the API: an embedded server on loopback, and
//! workers that each clone one VM from a warm template, run a checksum, write 16 pages, read the
//! VM's sharing statistics and delete it, all as HTTP requests through [`Client`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::load::{api_err, make_template, start_server_with, wait_for_full_pool};
use super::stats::Percentiles;
use super::BenchError;
use cowvm::client::Client;
use cowvm::server::model::RunCommand;
use cowvm::server::CellsConfig;

/// Warm shells the server keeps for the loop's template.
const WARM_SHELLS: usize = 64;

/// A guest command over `count` pages from `start_gpa` (one qword per page).
pub(super) fn over_pages(command: &str, start_gpa: u64, count: u64, value: u64) -> RunCommand {
    RunCommand {
        command: command.into(),
        start_gpa,
        count,
        stride: 4096,
        value,
        vcpu: 0,
    }
}

/// The steps of one iteration, in order; each row reports their latencies under these names.
const STEPS: [&str; 5] = ["clone", "checksum", "write", "stats", "delete"];

/// Latencies of each step in µs, one list per entry of [`STEPS`].
type StepTimes = [Vec<f64>; STEPS.len()];

/// One iteration over the API: clone → checksum → write 16 pages → stats → delete, adding each
/// step's latency to `times`.
fn iteration(client: &Client, template: &str, times: &mut StepTimes) -> Result<(), BenchError> {
    let mut last = Instant::now();
    let mut lap = |step: usize| {
        let now = Instant::now();
        times[step].push((now - last).as_secs_f64() * 1e6);
        last = now;
    };
    let made = client.clone_template(template, 1).map_err(api_err("clone"))?;
    lap(0);
    let id = &made
        .clones
        .first()
        .ok_or_else(|| BenchError::Setup(format!("no clone made: {:?}", made.failed)))?
        .id;
    client
        .run(id, &over_pages("checksum", 8 << 20, 64, 0))
        .map_err(api_err("checksum"))?;
    lap(1);
    client
        .run(id, &over_pages("write", 16 << 20, 16, 1))
        .map_err(api_err("write"))?;
    lap(2);
    let private = client.vm_stats(id).map_err(api_err("stats"))?.pages.private;
    lap(3);
    if private != 16 {
        return Err(BenchError::Setup(format!(
            "expected 16 private pages, the kernel says {private}"
        )));
    }
    client.delete_vm(id).map_err(api_err("delete the clone"))?;
    lap(4);
    Ok(())
}

/// Runs the loop for `seconds` with 1 and 2 workers against an embedded server, first with its
/// VMs in its own process, then in cells (as `cowvm serve` runs them by default); one row per
/// worker count and mode, marked `"via": "http"` and `"cells"`.
pub fn ci_loop_http(memory_mib: u64, seconds: f64) -> Result<Vec<Value>, BenchError> {
    let mut rows = ci_loop_http_on(memory_mib, seconds, None)?;
    let cells = CellsConfig::current_exe(cowvm_cell::DEFAULT_VMS_PER_CELL, 400)
        .map_err(|e| BenchError::Setup(format!("find this executable for the cells: {e}")))?;
    rows.extend(ci_loop_http_on(memory_mib, seconds, Some(cells))?);
    Ok(rows)
}

fn ci_loop_http_on(memory_mib: u64, seconds: f64, cells: Option<CellsConfig>) -> Result<Vec<Value>, BenchError> {
    let in_cells = cells.is_some();
    let (server, client) = start_server_with(WARM_SHELLS, cells)?;
    let template = make_template(&client, memory_mib)?;
    let url = format!("http://{}", server.addr);
    let mut rows = Vec::new();
    for workers in [1usize, 2] {
        eprintln!("[bench] CI loop over HTTP (cells: {in_cells}) with {workers} worker(s) for {seconds} s");
        wait_for_full_pool(&client, &template, WARM_SHELLS)?;
        let iterations = Arc::new(AtomicU64::new(0));
        let deadline = Instant::now() + Duration::from_secs_f64(seconds);
        let started = Instant::now();
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                let (url, template, iterations) = (url.clone(), template.clone(), Arc::clone(&iterations));
                std::thread::spawn(move || -> Result<StepTimes, BenchError> {
                    let client = Client::new(&url, None);
                    let mut times = StepTimes::default();
                    while Instant::now() < deadline {
                        iteration(&client, &template, &mut times)?;
                        iterations.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(times)
                })
            })
            .collect();
        let mut times = StepTimes::default();
        for handle in handles {
            let worker = handle
                .join()
                .map_err(|_| BenchError::Setup("an HTTP CI worker panicked".into()))??;
            for (all, mine) in times.iter_mut().zip(worker) {
                all.extend(mine);
            }
        }
        let elapsed = started.elapsed().as_secs_f64();
        let done = iterations.load(Ordering::Relaxed);
        let step_us: serde_json::Map<String, Value> = STEPS
            .iter()
            .zip(&times)
            .map(|(step, samples)| (step.to_string(), json!(Percentiles::of(samples))))
            .collect();
        rows.push(json!({"via": "http", "cells": in_cells, "workers": workers, "iterations": done, "seconds": elapsed, "iterations_per_s": done as f64 / elapsed, "step_us": step_us}));
        server.wait_for_teardowns();
    }
    client
        .delete_template(&template)
        .map_err(api_err("delete the template"))?;
    server.stop().map_err(|e| BenchError::Setup(e.to_string()))?;
    Ok(rows)
}
