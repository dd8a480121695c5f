//! A clone's guest clocks start from the template's captured values when the clone is taken:
//! a warm shell that waited for seconds gives the same clock as a VM built on the spot or a
//! reset clone. Correctness, not timing: the bounds are a second wide against a shell 3 s old.

use std::sync::Arc;
use std::time::Duration;

use cowvm_tests::{kvm, template_with_data};
use cowvm_vmm::{Clone, CloneEngine, EngineConfig};

/// How long the warm shell waits in its pool before it is taken.
const SHELL_AGE: Duration = Duration::from_secs(3);
/// How far apart clones' clocks may be and still count as "the same start".
const SLACK: Duration = Duration::from_secs(1);

/// How far the clone's KVM clock (ns) and TSC (cycles) are past the template's captured values.
fn clocks_past_template(clone: &Clone) -> (u64, u64) {
    let captured = clone.template().state();
    let kvm_clock = clone.vm().kvm_clock_ns().expect("KVM_GET_CLOCK");
    let kvm_ahead = kvm_clock
        .checked_sub(captured.clock.clock)
        .expect("a clone's KVM clock never runs behind the template's");
    let tsc_ahead = match captured.vcpus[0].tsc() {
        Some(tsc) => clone.vm().vcpu().tsc().expect("read TSC").wrapping_sub(tsc),
        None => 0,
    };
    (kvm_ahead, tsc_ahead)
}

fn spawn_one(engine: &CloneEngine, template: &Arc<cowvm_vmm::Template>) -> Clone {
    let mut batch = engine.spawn(template, 1).expect("spawn");
    assert!(batch.failed.is_empty(), "{:?}", batch.failed);
    batch.clones.pop().expect("one clone")
}

#[test]
fn test_pooled_on_demand_and_reset_clones_start_their_clocks_alike_from_the_template() {
    let engine = CloneEngine::new(Arc::new(kvm()), EngineConfig::default()).expect("engine");
    let template = Arc::new(template_with_data(engine.kvm(), 16, &[]));
    let mut to_reset = spawn_one(&engine, &template);
    engine.keep_warm(&template, 1);
    assert!(
        engine.wait_for_shells(&template, 1, Duration::from_secs(30)),
        "no warm shell: {:?}",
        engine.pool_error(&template)
    );
    std::thread::sleep(SHELL_AGE);

    let pooled = spawn_one(&engine, &template);
    assert!(pooled.pooled(), "taken from the warm shell");
    let pooled_ahead = clocks_past_template(&pooled);
    engine.retire(&template);
    let on_demand = spawn_one(&engine, &template);
    assert!(!on_demand.pooled(), "built on the spot");
    let on_demand_ahead = clocks_past_template(&on_demand);
    engine.reset(&mut to_reset).expect("reset");
    let reset_ahead = clocks_past_template(&to_reset);

    println!(
        "past the template: pooled {pooled_ahead:?}, on demand {on_demand_ahead:?}, reset {reset_ahead:?} \
         (KVM clock ns, TSC cycles)"
    );
    let tsc_hz = u64::from(pooled.vm().vcpu().tsc_khz().expect("KVM_GET_TSC_KHZ")) * 1000;
    let slack_ns = SLACK.as_nanos() as u64;
    let slack_cycles = tsc_hz * SLACK.as_secs();
    // Where KVM cannot offset the guest TSC (kvm_pvm: the guest reads the host's), even a VM
    // restored just now is seconds past the captured TSC; then there is no TSC to compare.
    let tsc_settable = template.state().vcpus[0].tsc().is_some() && on_demand_ahead.1 < slack_cycles;
    if !tsc_settable {
        println!("note: TSC not compared: this host does not save the guest TSC or ignores writes to it");
    }
    for (what, (kvm_ahead, tsc_ahead)) in [("pooled", pooled_ahead), ("reset", reset_ahead)] {
        assert!(
            kvm_ahead <= on_demand_ahead.0 + slack_ns,
            "{what} clone's KVM clock is {kvm_ahead} ns past the template's, an on-demand clone's \
             {} ns (shell age {SHELL_AGE:?})",
            on_demand_ahead.0
        );
        assert!(
            !tsc_settable || tsc_ahead <= on_demand_ahead.1 + slack_cycles,
            "{what} clone's TSC is {tsc_ahead} cycles past the template's, an on-demand clone's {} \
             ({tsc_hz} Hz, shell age {SHELL_AGE:?})",
            on_demand_ahead.1
        );
    }
    assert!(
        on_demand_ahead.0 < slack_ns,
        "an on-demand clone starts at the template's clock: {} ns past it",
        on_demand_ahead.0
    );
    for clone in [pooled, on_demand, to_reset] {
        engine.destroy(clone);
    }
}
