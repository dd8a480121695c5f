//! The `api` rows of `cowvm bench cells` (`"cells": true`): clone calls through the API of a
//! server started in this process with `--cells`, from a loopback client, with warm shells kept
//! in cells: `api_clone_us` (one clone per call, a shell ready each time; each clone deleted
//! afterwards) and `api_clones_1000_ms` (one call of `batch` clones with that many shells warm
//! in cells of `vms_per_cell`).

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::load::{call, make_template};
use super::stats::Percentiles;
use super::BenchError;
use cowvm::client::Client;
use cowvm::server::{self, CellsConfig, Limits, ServerConfig};

/// How long the shells may take to be built.
const WAIT: Duration = Duration::from_secs(300);

/// Warm shells ready over all cells (`GET /v1/cells`).
fn cell_shells(client: &Client) -> Result<u64, BenchError> {
    let listed = call(client, "GET", "/v1/cells", None)?;
    Ok(listed
        .as_array()
        .map(|all| all.iter().filter_map(|c| c["warm_shells"].as_u64()).sum())
        .unwrap_or(0))
}

fn wait_for_cell_shells(client: &Client, shells: u64) -> Result<(), BenchError> {
    let until = Instant::now() + WAIT;
    while cell_shells(client)? < shells {
        if Instant::now() > until {
            return Err(BenchError::Setup(format!(
                "the cells did not reach {shells} warm shells"
            )));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

fn ids(made: &Value) -> Vec<String> {
    made["clones"]
        .as_array()
        .map(|all| all.iter().filter_map(|c| c["id"].as_str().map(str::to_owned)).collect())
        .unwrap_or_default()
}

fn pooled(made: &Value) -> usize {
    made["clones"]
        .as_array()
        .map_or(0, |all| all.iter().filter(|c| c["pooled"] == true).count())
}

/// The rows (see the module comment).
pub fn api_rows(memory_mib: u64, samples: usize, batch: usize, vms_per_cell: u32) -> Result<Value, BenchError> {
    let batch = batch.max(1);
    let max_cells = batch.div_ceil(vms_per_cell.max(1) as usize) + 2;
    let cells = CellsConfig::current_exe(vms_per_cell, max_cells)
        .map_err(|e| BenchError::Setup(format!("cannot find this executable for the cells: {e}")))?;
    let limits = Limits {
        max_vms: 4000,
        max_clones_per_call: batch,
        warm_shells: 8,
        ..Limits::default()
    };
    let server = server::start(ServerConfig {
        limits,
        cells: Some(cells),
        ..ServerConfig::local(0)
    })
    .map_err(|e| BenchError::Setup(e.to_string()))?;
    let client = Client::new(&format!("http://{}", server.addr), None);
    let template = make_template(&client, memory_mib)?;
    let clones_path = format!("/v1/templates/{template}/clones");
    let mut single = Vec::with_capacity(samples);
    let mut single_pooled = 0;
    for _ in 0..samples {
        wait_for_cell_shells(&client, 1)?;
        let started = Instant::now();
        let made = call(&client, "POST", &clones_path, Some(json!({"count": 1})))?;
        single.push(started.elapsed().as_secs_f64() * 1e6);
        single_pooled += pooled(&made);
        for id in ids(&made) {
            call(&client, "DELETE", &format!("/v1/vms/{id}"), None)?;
        }
    }
    let warm_path = format!("/v1/templates/{template}/warm");
    call(&client, "POST", &warm_path, Some(json!({"shells": batch})))?;
    let warm_started = Instant::now();
    wait_for_cell_shells(&client, batch as u64)?;
    let warm_s = warm_started.elapsed().as_secs_f64();
    let cells_before = call(&client, "GET", "/v1/cells", None)?.as_array().map_or(0, Vec::len);
    let started = Instant::now();
    let made = call(&client, "POST", &clones_path, Some(json!({"count": batch})))?;
    let batch_ms = started.elapsed().as_secs_f64() * 1e3;
    let inside_ms = made["total_us"].as_f64().unwrap_or(f64::NAN) / 1e3;
    let made_ids = ids(&made);
    if made_ids.len() != batch {
        return Err(BenchError::Setup(format!("{} of {batch} clones made", made_ids.len())));
    }
    let batch_pooled = pooled(&made);
    call(&client, "POST", &warm_path, Some(json!({"shells": 0})))?;
    for id in made_ids {
        call(&client, "DELETE", &format!("/v1/vms/{id}"), None)?;
    }
    server.stop().map_err(|e| BenchError::Setup(e.to_string()))?;
    Ok(json!({
        "cells": true,
        "template_mib": memory_mib,
        "vms_per_cell": vms_per_cell,
        "api_clone_us": Percentiles::of(&single),
        "api_clone_samples": samples,
        "api_clone_pooled": single_pooled,
        "api_clones_1000_ms": batch_ms,
        "api_clones_1000_server_ms": inside_ms,
        "api_clones_1000_pooled": batch_pooled,
        "api_clones_batch": batch,
        "cells_holding_shells": cells_before,
        "warm_up_s": warm_s,
    }))
}
