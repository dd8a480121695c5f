//! The `api` rows of `cowvm bench cells` (`"cells": true`): clone calls through the API of a
//! server started in this process with `--cells`, from a loopback client, with warm shells kept
//! in cells: `api_clone_us` (one clone per call, a shell ready each time; each clone deleted
//! afterwards) and `api_clones_1000_ms` (one call of `batch` clones with that many shells warm
//! in cells of `vms_per_cell`).

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::ci_http::over_pages;
use super::load::{api_err, make_template};
use super::stats::Percentiles;
use super::BenchError;
use cowvm::client::Client;
use cowvm::server::model::ClonesCreated;
use cowvm::server::{self, CellsConfig, Limits, ServerConfig};

/// How long the shells may take to be built.
const WAIT: Duration = Duration::from_secs(300);

/// Warm shells ready over all cells (`GET /v1/cells`).
fn cell_shells(client: &Client) -> Result<u64, BenchError> {
    let listed = client.cells().map_err(api_err("list the cells"))?;
    Ok(listed.iter().map(|c| u64::from(c.warm_shells)).sum())
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

fn pooled(made: &ClonesCreated) -> usize {
    made.clones.iter().filter(|c| c.pooled).count()
}

fn delete_clones(client: &Client, made: &ClonesCreated) -> Result<(), BenchError> {
    for clone in &made.clones {
        client.delete_vm(&clone.id).map_err(api_err("delete a clone"))?;
    }
    Ok(())
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
    let mut single = Vec::with_capacity(samples);
    let mut single_pooled = 0;
    for _ in 0..samples {
        wait_for_cell_shells(&client, 1)?;
        let started = Instant::now();
        let made = client.clone_template(&template, 1).map_err(api_err("clone"))?;
        single.push(started.elapsed().as_secs_f64() * 1e6);
        single_pooled += pooled(&made);
        delete_clones(&client, &made)?;
    }
    let resets = resets(&client, &template, samples)?;
    client
        .set_warm(&template, batch as u64)
        .map_err(api_err("set the warm shells"))?;
    let warm_started = Instant::now();
    wait_for_cell_shells(&client, batch as u64)?;
    let warm_s = warm_started.elapsed().as_secs_f64();
    let cells_before = client.cells().map_err(api_err("list the cells"))?.len();
    let started = Instant::now();
    let made = client
        .clone_template(&template, batch as u64)
        .map_err(api_err("clone"))?;
    let batch_ms = started.elapsed().as_secs_f64() * 1e3;
    let inside_ms = made.total_us / 1e3;
    if made.clones.len() != batch {
        return Err(BenchError::Setup(format!(
            "{} of {batch} clones made",
            made.clones.len()
        )));
    }
    let batch_pooled = pooled(&made);
    client.set_warm(&template, 0).map_err(api_err("stop the warm shells"))?;
    delete_clones(&client, &made)?;
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
        "api_reset": resets,
    }))
}

/// Pages the dirty resets find written.
const DIRTY_PAGES: u64 = 1000;

/// `POST /v1/vms/{id}/reset` of one in-cell clone, `samples` times clean and `samples` times
/// after the guest wrote [`DIRTY_PAGES`] pages, each with a warm shell ready in the cells: the
/// reset's own time in its cell (`reset_us` of the answer, by swap when the cell had a shell),
/// the HTTP round trip, and how many resets were swaps.
fn resets(client: &Client, template: &str, samples: usize) -> Result<Value, BenchError> {
    let made = client.clone_template(template, 1).map_err(api_err("clone"))?;
    let id = made
        .clones
        .first()
        .map(|c| c.id.clone())
        .ok_or_else(|| BenchError::Setup("no clone made for the resets".into()))?;
    let write = over_pages("write", 16 << 20, DIRTY_PAGES, 1);
    let mut rows = serde_json::Map::new();
    for dirty in [false, true] {
        let (mut in_cell, mut http, mut swapped) = (Vec::new(), Vec::new(), 0);
        for _ in 0..samples {
            wait_for_cell_shells(client, 1)?;
            if dirty {
                client.run(&id, &write).map_err(api_err("write"))?;
            }
            let started = Instant::now();
            let done = client.reset(&id).map_err(api_err("reset"))?;
            http.push(started.elapsed().as_secs_f64() * 1e6);
            in_cell.push(done.reset_us);
            swapped += usize::from(done.swapped);
        }
        let name = if dirty { "dirty_1000" } else { "clean" };
        rows.insert(
            name.into(),
            json!({"reset_us": Percentiles::of(&in_cell), "http_us": Percentiles::of(&http), "swapped": swapped, "samples": samples}),
        );
    }
    client.delete_vm(&id).map_err(api_err("delete the clone"))?;
    Ok(Value::Object(rows))
}
