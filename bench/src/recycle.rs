//! Figures of `cowvm bench spawn` for recycling: reset by swap (clean and after 1000 dirty pages)
//! with the background recycle it leaves, and clone calls through the HTTP API from a loopback
//! client with warm shells (one clone per call, and one call of 1000 clones).

use std::sync::Arc;
use std::time::{Duration, Instant};

use cowvm_vmm::memory::PAGE_SIZE;
use cowvm_vmm::{CloneEngine, GuestCommand, Template};
use serde_json::{json, Value};
use vm_memory::GuestAddress;

use super::load::{api_err, make_template, start_server};
use super::stats::Percentiles;
use super::{BenchError, DEADLINE};
use cowvm::client::Client;
use cowvm::server::model::ClonesCreated;

const WAIT: Duration = Duration::from_secs(600);
/// Warm shells kept while resets by swap are measured.
const SWAP_POOL: usize = 4;

/// Reset by swap, measured on one clone: `clean` resets, then resets after its guest wrote
/// `dirty` pages. Each waits until the previous used VM has been recycled and a shell is ready,
/// so that the swap is measured on its own; the recycles are timed by the engine.
pub struct SwapFigures {
    /// Reset by swap of a clean clone, µs.
    pub clean: Percentiles,
    /// Reset by swap after `dirty` pages were written, µs.
    pub dirty: Percentiles,
    /// Background recycle of the used VM after a clean swap, µs.
    pub recycle_clean: Percentiles,
    /// Background recycle of the used VM after a dirty swap, µs.
    pub recycle_dirty: Percentiles,
}

fn ready(engine: &CloneEngine, template: &Template) -> Result<(), BenchError> {
    if engine.wait_recycled(WAIT) && engine.wait_for_shells(template, 1, WAIT) {
        Ok(())
    } else {
        Err(BenchError::Setup(format!(
            "no warm shell for a reset by swap: {}",
            engine.pool_error(template).unwrap_or_else(|| "timed out".into())
        )))
    }
}

/// One reset by swap; returns its time and the recycle time of the used VM.
fn swap_once(engine: &CloneEngine, clone: &mut cowvm_vmm::Clone) -> Result<(f64, f64), BenchError> {
    ready(engine, clone.template())?;
    let before = engine.recycle_stats().recycled;
    let report = engine.reset_by_swap(clone)?;
    if !report.swapped {
        return Err(BenchError::Setup("a reset by swap found no shell".into()));
    }
    if !engine.wait_recycled(WAIT) {
        return Err(BenchError::Setup("the used VM was not recycled".into()));
    }
    let stats = engine.recycle_stats();
    if stats.recycled != before + 1 {
        return Err(BenchError::Setup("the used VM was torn down, not recycled".into()));
    }
    let recycle_us = stats.recent_us.last().copied().unwrap_or(f64::NAN);
    Ok((report.reset_us, recycle_us))
}

/// Measures resets by swap of a clone of `template` (see [`SwapFigures`]).
pub fn swap_resets(
    engine: &CloneEngine,
    template: &Arc<Template>,
    samples: usize,
    dirty: u64,
) -> Result<SwapFigures, BenchError> {
    engine.keep_warm(template, SWAP_POOL);
    let mut clone = engine
        .spawn(template, 1)?
        .clones
        .pop()
        .ok_or_else(|| BenchError::Setup("no clone".into()))?;
    let (mut clean, mut recycle_clean) = (Vec::new(), Vec::new());
    for _ in 0..samples {
        let (swap, recycle) = swap_once(engine, &mut clone)?;
        clean.push(swap);
        recycle_clean.push(recycle);
    }
    let (mut dirtied, mut recycle_dirty) = (Vec::new(), Vec::new());
    for _ in 0..samples.clamp(1, 20) {
        let write = GuestCommand::Write {
            start: GuestAddress(8 << 20),
            count: dirty,
            stride: PAGE_SIZE,
            value: 1,
        };
        clone.vm_mut().execute(write, DEADLINE)?;
        let (swap, recycle) = swap_once(engine, &mut clone)?;
        dirtied.push(swap);
        recycle_dirty.push(recycle);
    }
    engine.destroy(clone);
    engine.keep_warm(template, 0);
    Ok(SwapFigures {
        clean: Percentiles::of(&clean),
        dirty: Percentiles::of(&dirtied),
        recycle_clean: Percentiles::of(&recycle_clean),
        recycle_dirty: Percentiles::of(&recycle_dirty),
    })
}

fn warm_shells(client: &Client, template: &str) -> Result<u64, BenchError> {
    Ok(client
        .template(template)
        .map_err(api_err("read the template"))?
        .warm_shells as u64)
}

fn wait_for_shells(client: &Client, template: &str, shells: u64) -> Result<(), BenchError> {
    let until = Instant::now() + WAIT;
    while warm_shells(client, template)? < shells {
        if Instant::now() > until {
            return Err(BenchError::Setup(format!(
                "{template} did not reach {shells} warm shells"
            )));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

fn delete_clones(client: &Client, made: &ClonesCreated) -> Result<(), BenchError> {
    for clone in &made.clones {
        client.delete_vm(&clone.id).map_err(api_err("delete a clone"))?;
    }
    Ok(())
}

/// Clone calls through the API of a server started in this process, from a loopback client:
/// `api_clone_us` (one clone per call, a warm shell ready each time; each clone is deleted
/// afterwards, which recycles it), and one call of `batch` clones with that many shells warm,
/// first built by the builder (`api_clones_1000_ms`), then again with the pool refilled by
/// recycling the deleted clones (`api_clones_1000_recycled_ms`).
pub fn api_clones(memory_mib: u64, samples: usize, batch: usize) -> Result<Value, BenchError> {
    let (server, client) = start_server(8)?;
    let template = make_template(&client, memory_mib)?;
    let mut single = Vec::with_capacity(samples);
    for _ in 0..samples {
        wait_for_shells(&client, &template, 1)?;
        let started = Instant::now();
        let made = client.clone_template(&template, 1).map_err(api_err("clone"))?;
        single.push(started.elapsed().as_secs_f64() * 1e6);
        delete_clones(&client, &made)?;
    }
    let batch = batch.max(1);
    client
        .set_warm(&template, batch as u64)
        .map_err(api_err("set the warm shells"))?;
    let (mut calls, mut inside) = (Vec::new(), Vec::new());
    for _ in 0..2 {
        wait_for_shells(&client, &template, batch as u64)?;
        let started = Instant::now();
        let made = client
            .clone_template(&template, batch as u64)
            .map_err(api_err("clone"))?;
        calls.push(started.elapsed().as_secs_f64() * 1e3);
        inside.push(made.total_us / 1e3);
        if made.clones.len() != batch {
            return Err(BenchError::Setup(format!(
                "{} of {batch} clones made",
                made.clones.len()
            )));
        }
        delete_clones(&client, &made)?;
    }
    let metrics = client.metrics().unwrap_or_default();
    let recycled = metrics.lines().find_map(|l| {
        l.strip_prefix("cowvm_vms_recycled_total ")
            .and_then(|v| v.trim().parse::<u64>().ok())
    });
    client.set_warm(&template, 0).map_err(api_err("stop the warm shells"))?;
    server.stop().map_err(|e| BenchError::Setup(e.to_string()))?;
    Ok(json!({
        "api_clone_us": Percentiles::of(&single),
        "api_clones_1000_ms": calls[0],
        "api_clones_1000_recycled_ms": calls[1],
        "api_clones_1000_engine_ms": inside[0],
        "api_clones_1000_recycled_engine_ms": inside[1],
        "api_clones_batch": batch,
        "api_vms_recycled": recycled,
    }))
}
