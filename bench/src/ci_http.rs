//! The CI-like loop of `cowvm bench ci-loop` over the API: an embedded server on loopback, and
//! workers that each clone one VM from a warm template, run a checksum, write 16 pages, read the
//! VM's sharing statistics and delete it, all as HTTP requests through [`Client`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::load::{call, make_template, start_server, wait_for_full_pool};
use super::BenchError;
use cowvm::client::Client;

/// Warm shells the server keeps for the loop's template.
const WARM_SHELLS: usize = 64;

/// One iteration over the API: clone → checksum → write 16 pages → stats → delete.
fn iteration(client: &Client, template: &str) -> Result<(), BenchError> {
    let made = call(
        client,
        "POST",
        &format!("/v1/templates/{template}/clones"),
        Some(json!({"count": 1})),
    )?;
    let id = made["clones"][0]["id"]
        .as_str()
        .ok_or_else(|| BenchError::Setup(format!("no clone id in {made}")))?
        .to_owned();
    let run = format!("/v1/vms/{id}/run");
    call(
        client,
        "POST",
        &run,
        Some(json!({"command": "checksum", "start_gpa": 8 << 20, "count": 64, "stride": 4096})),
    )?;
    call(
        client,
        "POST",
        &run,
        Some(json!({"command": "write", "start_gpa": 16 << 20, "count": 16, "stride": 4096, "value": 1})),
    )?;
    let stats = call(client, "GET", &format!("/v1/vms/{id}/stats"), None)?;
    let private = stats["pages"]["private"].as_u64().unwrap_or(0);
    if private != 16 {
        return Err(BenchError::Setup(format!(
            "expected 16 private pages, the kernel says {private}"
        )));
    }
    call(client, "DELETE", &format!("/v1/vms/{id}"), None)?;
    Ok(())
}

/// Runs the loop for `seconds` with 1 and 2 workers against an embedded server; one row per
/// worker count, marked `"via": "http"`.
pub fn ci_loop_http(memory_mib: u64, seconds: f64) -> Result<Vec<Value>, BenchError> {
    let (server, client) = start_server(WARM_SHELLS)?;
    let template = make_template(&client, memory_mib)?;
    let url = format!("http://{}", server.addr);
    let mut rows = Vec::new();
    for workers in [1usize, 2] {
        eprintln!("[bench] CI loop over HTTP with {workers} worker(s) for {seconds} s");
        wait_for_full_pool(&client, &template, WARM_SHELLS)?;
        let iterations = Arc::new(AtomicU64::new(0));
        let deadline = Instant::now() + Duration::from_secs_f64(seconds);
        let started = Instant::now();
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                let (url, template, iterations) = (url.clone(), template.clone(), Arc::clone(&iterations));
                std::thread::spawn(move || -> Result<(), BenchError> {
                    let client = Client::new(&url, None);
                    while Instant::now() < deadline {
                        iteration(&client, &template)?;
                        iterations.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(())
                })
            })
            .collect();
        for handle in handles {
            handle
                .join()
                .map_err(|_| BenchError::Setup("an HTTP CI worker panicked".into()))??;
        }
        let elapsed = started.elapsed().as_secs_f64();
        let done = iterations.load(Ordering::Relaxed);
        rows.push(json!({"via": "http", "workers": workers, "iterations": done, "seconds": elapsed, "iterations_per_s": done as f64 / elapsed}));
        server.wait_for_teardowns();
    }
    call(&client, "DELETE", &format!("/v1/templates/{template}"), None)?;
    server.stop().map_err(|e| BenchError::Setup(e.to_string()))?;
    Ok(rows)
}
