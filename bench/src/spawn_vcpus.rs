//! `cowvm bench spawn --vcpus N`: spawn percentiles and host memory per clone of N-vCPU clones
//! against 1-vCPU clones of the same size, in one run. Each round builds a template per vCPU
//! count, fills its warm pool, then spawns `--clones` clones in one call (host memory per clone
//! over pool fill and spawn, as in the main benchmark) and `--samples` clones one call at a time
//! from shells older than the TSC resynchronisation window (so every vCPU's TSC is rewritten);
//! the rounds alternate 1, N, 1, N so that neither count gets a warmer host.

use std::sync::Arc;
use std::time::Duration;

use cowvm_vmm::host::MemorySnapshot;
use cowvm_vmm::{Clone, CloneEngine, Kvm};
use serde_json::json;

use super::io_err;
use super::spawn::{destroy_all, fill_pool, slot_policy, spawn_all, spawn_engine, MemoryPerClone, SpawnArgs};
use super::stats::Percentiles;
use super::{make_template_with_vcpus, BenchError};

/// Rounds per vCPU count.
const ROUNDS: usize = 2;

/// Spawn times and memory of clones with `vcpus` vCPUs, from one round.
struct Round {
    batch: Vec<f64>,
    one_at_a_time: Vec<f64>,
    memory: serde_json::Value,
}

fn round(engine: &CloneEngine, kvm: &Kvm, args: &SpawnArgs, vcpus: usize) -> Result<Round, BenchError> {
    let template = make_template_with_vcpus(kvm, args.memory_mib, vcpus)?;
    engine.flush();
    // The kernel frees a destroyed VM's memory a little after its fds close: let the last
    // round's teardown settle before the baseline.
    std::thread::sleep(Duration::from_millis(500));
    let before = MemorySnapshot::take().map_err(io_err("read memory figures"))?;
    fill_pool(engine, &template, args.clones)?;
    let clones = spawn_all(engine, &template, args.clones)?;
    let after = MemorySnapshot::take().map_err(io_err("read memory figures"))?;
    if let Some(clone) = clones.iter().find(|c| c.vm().vcpu_count() != vcpus) {
        return Err(BenchError::Setup(format!(
            "a clone has {} vCPUs, expected {vcpus}",
            clone.vm().vcpu_count()
        )));
    }
    let batch: Vec<f64> = clones.iter().map(Clone::spawn_us).collect();
    let memory = serde_json::to_value(MemoryPerClone::of(after.since(&before), clones.len()))
        .map_err(|e| BenchError::Setup(format!("memory figures: {e}")))?;
    destroy_all(engine, clones);
    let samples = args.samples.max(1);
    fill_pool(engine, &template, samples)?;
    // Shells that waited longer than KVM's TSC resynchronisation window, as in a server whose
    // pool was filled a while ago: taking one then rewrites the TSC of every vCPU.
    std::thread::sleep(cowvm_vmm::vm::TSC_RESYNC_WINDOW + Duration::from_millis(100));
    let mut one_at_a_time = Vec::with_capacity(samples);
    for _ in 0..samples {
        let clones = spawn_all(engine, &template, 1)?;
        one_at_a_time.extend(clones.iter().map(Clone::spawn_us));
        destroy_all(engine, clones);
    }
    engine.retire(&template);
    engine.flush();
    Ok(Round {
        batch,
        one_at_a_time,
        memory,
    })
}

/// Measures 1-vCPU and `args.vcpus`-vCPU clones; returns the JSON results.
pub fn measure_vcpus(args: &SpawnArgs) -> Result<serde_json::Value, BenchError> {
    let (engine, _) = spawn_engine(args)?;
    let kvm = Arc::clone(engine.kvm());
    let counts = [1, args.vcpus];
    let mut rounds: Vec<Vec<Round>> = counts.iter().map(|_| Vec::new()).collect();
    for r in 0..ROUNDS {
        for (i, &vcpus) in counts.iter().enumerate() {
            eprintln!("[bench spawn --vcpus] round {} of {ROUNDS}: {vcpus}-vCPU clones", r + 1);
            rounds[i].push(round(&engine, &kvm, args, vcpus)?);
        }
    }
    let summary = |rounds: &[Round], vcpus: usize| {
        let batch: Vec<f64> = rounds.iter().flat_map(|r| r.batch.iter().copied()).collect();
        let single: Vec<f64> = rounds.iter().flat_map(|r| r.one_at_a_time.iter().copied()).collect();
        json!({
            "vcpus": vcpus,
            "spawn_us": Percentiles::of(&batch),
            "spawn_one_at_a_time_us": Percentiles::of(&single),
            "host_memory_per_clone_kib": rounds.iter().map(|r| r.memory.clone()).collect::<Vec<_>>(),
        })
    };
    let one = summary(&rounds[0], 1);
    let many = summary(&rounds[1], args.vcpus);
    let ratio =
        |key: &str| many[key]["p50"].as_f64().unwrap_or(f64::NAN) / one[key]["p50"].as_f64().unwrap_or(f64::NAN);
    Ok(json!({
        "memory_mib": args.memory_mib,
        "clones_per_batch": args.clones,
        "samples_one_at_a_time": args.samples.max(1),
        "rounds": ROUNDS,
        "slot_policy": slot_policy(args.eager_slots),
        "one_vcpu": one,
        "many_vcpus": many,
        "spawn_p50_ratio": ratio("spawn_us"),
        "spawn_one_at_a_time_p50_ratio": ratio("spawn_one_at_a_time_us"),
    }))
}

/// Prints the human summary.
pub fn print_summary(r: &serde_json::Value) {
    let f = |v: &serde_json::Value| v.as_f64().unwrap_or(f64::NAN);
    println!(
        "cowvm bench spawn --vcpus {}: {} MiB templates, {} clones per batch, {} rounds",
        r["many_vcpus"]["vcpus"], r["memory_mib"], r["clones_per_batch"], r["rounds"]
    );
    for key in ["one_vcpu", "many_vcpus"] {
        let v = &r[key];
        let memory = v["host_memory_per_clone_kib"]
            .as_array()
            .map(|rounds| {
                rounds
                    .iter()
                    .map(|m| format!("{:.0}", f(&m["total"])))
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default();
        println!(
            "  {} vCPU(s): spawn p50 {:.1} µs p99 {:.1} (batch), one at a time p50 {:.1} µs; host memory per clone {memory} KiB (per round)",
            v["vcpus"],
            f(&v["spawn_us"]["p50"]),
            f(&v["spawn_us"]["p99"]),
            f(&v["spawn_one_at_a_time_us"]["p50"]),
        );
    }
    println!(
        "  spawn p50 ratio N/1: {:.2} (batch), {:.2} (one at a time)",
        f(&r["spawn_p50_ratio"]),
        f(&r["spawn_one_at_a_time_p50_ratio"])
    );
}
