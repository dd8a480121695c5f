//! Measures what starting a clone's clocks at take time costs (`Vm::start_clocks`:
//! `KVM_SET_CLOCK`, plus `KVM_SET_MSRS` of the TSC for clocks set at least 1 s before) and the
//! spawn latency from warm shells that includes it; also the immediate-exit `KVM_RUN` that reset
//! now issues before restoring registers.
//! `cargo run --release -p cowvm-vmm --example clock_cost`
use std::sync::Arc;
use std::time::{Duration, Instant};

use cowvm_vmm::{CloneEngine, EngineConfig, Kvm, Template, Vm, VmConfig};

fn p50_p99(mut us: Vec<f64>) -> (f64, f64) {
    us.sort_by(f64::total_cmp);
    (us[us.len() / 2], us[us.len() * 99 / 100])
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let kvm = Arc::new(Kvm::open()?);
    let (mut vm, _) = Vm::boot(&kvm, &VmConfig::builtin(256))?;
    let template = Arc::new(Template::freeze(&kvm, &mut vm)?);
    let mut clone = Vm::restore(&kvm, template.memory(), template.state())?;
    let samples: Vec<f64> = (0..2000)
        .map(|_| {
            let t = Instant::now();
            clone
                .start_clocks(template.state())
                .map(|_| t.elapsed().as_secs_f64() * 1e6)
        })
        .collect::<Result<_, _>>()?;
    let (p50, p99) = p50_p99(samples);
    println!("start_clocks, clocks set < 1 s ago (KVM_SET_CLOCK only): p50 {p50:.2} us, p99 {p99:.2} us");
    if let Some(tsc) = template.state().vcpus[0].tsc() {
        let samples: Vec<f64> = (0..2000)
            .map(|_| {
                let t = Instant::now();
                clone.vcpu().set_tsc(tsc).map(|_| t.elapsed().as_secs_f64() * 1e6)
            })
            .collect::<Result<_, _>>()?;
        let (p50, p99) = p50_p99(samples);
        println!("TSC rewrite, added when the clocks are >= 1 s old (KVM_SET_MSRS): p50 {p50:.2} us, p99 {p99:.2} us");
    }

    let samples: Vec<f64> = (0..2000)
        .map(|_| {
            let t = Instant::now();
            clone
                .vcpu_mut()
                .complete_pending_io()
                .map(|_| t.elapsed().as_secs_f64() * 1e6)
        })
        .collect::<Result<_, _>>()?;
    let (p50, p99) = p50_p99(samples);
    println!("complete_pending_io, added to every reset (KVM_RUN, immediate_exit): p50 {p50:.2} us, p99 {p99:.2} us");

    let engine = CloneEngine::new(Arc::clone(&kvm), EngineConfig::default())?;
    engine.keep_warm(&template, 200);
    if !engine.wait_for_shells(&template, 200, Duration::from_secs(120)) {
        return Err(format!("pool did not fill: {:?}", engine.pool_error(&template)).into());
    }
    let batch = engine.spawn(&template, 200)?;
    let spawn: Vec<f64> = batch
        .clones
        .iter()
        .filter(|c| c.pooled())
        .map(|c| c.spawn_us())
        .collect();
    let pooled = spawn.len();
    let (p50, p99) = p50_p99(spawn);
    println!("spawn from warm shells ({pooled} of 200 pooled, 256 MiB): p50 {p50:.1} us, p99 {p99:.1} us");
    engine.retire(&template);
    for clone in batch.clones {
        engine.destroy(clone);
    }
    Ok(())
}
