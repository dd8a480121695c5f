//! Creating and destroying clones leaks nothing: fds and mappings return to their baseline.
//! (A test binary of its own: it counts process-wide resources.)

use std::sync::Arc;

use cowvm_tests::{fd_count, kvm, maps_count, template_with_data};
use cowvm_vmm::{CloneEngine, EngineConfig};

#[test]
fn test_500_create_destroy_cycles_leave_fds_and_mappings_at_baseline() {
    let engine = CloneEngine::new(Arc::new(kvm()), EngineConfig::default()).expect("engine");
    let template = Arc::new(template_with_data(engine.kvm(), 64, &[8 << 20]));
    engine.keep_warm(&template, 4);
    assert!(engine.wait_for_shells(&template, 4, std::time::Duration::from_secs(10)));
    let warm = |engine: &CloneEngine| {
        engine.flush();
        assert!(engine.wait_for_shells(&template, 4, std::time::Duration::from_secs(10)));
        (fd_count(), maps_count())
    };
    let baseline = warm(&engine);
    for _ in 0..500 {
        let batch = engine.spawn(&template, 1).expect("spawn");
        assert!(batch.failed.is_empty(), "{:?}", batch.failed);
        for clone in batch.clones {
            engine.destroy(clone);
        }
    }
    assert_eq!(warm(&engine), baseline, "(fds, mappings) after 500 cycles");
    engine.retire(&template);
    drop(engine);
    assert!(
        fd_count() < baseline.0,
        "retiring the pool and dropping the engine closes its shells"
    );
}
