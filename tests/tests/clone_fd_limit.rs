//! With too few file descriptors, a 100-clone request reports partial failure cleanly, leaks
//! nothing, and works again once the limit is raised. (A test binary of its own: it lowers the
//! process-wide RLIMIT_NOFILE.)

use std::sync::Arc;

use cowvm_tests::{fd_count, kvm, maps_count, template_with_data};
use cowvm_vmm::{CloneEngine, EngineConfig};

fn set_nofile(soft: u64) -> libc::rlimit {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with valid pointers to rlimit structs.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut old), 0);
        let new = libc::rlimit {
            rlim_cur: soft,
            rlim_max: old.rlim_max,
        };
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &new), 0);
    }
    old
}

#[test]
fn test_100_clones_with_too_few_fds_fail_partially_and_leak_nothing() {
    let engine = CloneEngine::new(Arc::new(kvm()), EngineConfig::default()).expect("engine");
    let template = Arc::new(template_with_data(engine.kvm(), 64, &[]));
    let warmup = engine.spawn(&template, 1).expect("warm-up");
    for clone in warmup.clones {
        engine.destroy(clone);
    }
    engine.flush();
    let baseline = (fd_count(), maps_count());

    // Room for about 20 clones (each holds a VM fd and a vCPU fd).
    let old = set_nofile((baseline.0 + 40) as u64);
    let batch = engine.spawn(&template, 100).expect("spawn returns a batch");
    set_nofile(old.rlim_cur);

    assert!(
        !batch.clones.is_empty() && batch.clones.len() < 100,
        "{} clones made",
        batch.clones.len()
    );
    assert_eq!(batch.clones.len() + batch.failed.len(), 100);
    assert_eq!(batch.failed[0].index, batch.clones.len());
    assert!(
        batch.failed[0].reason.contains("Too many open files"),
        "{}",
        batch.failed[0].reason
    );
    for clone in batch.clones {
        engine.destroy(clone);
    }
    engine.flush();
    assert_eq!((fd_count(), maps_count()), baseline, "nothing half-built remains");

    let again = engine.spawn(&template, 100).expect("spawn after the limit is back");
    assert!(again.failed.is_empty(), "{:?}", again.failed.first());
    assert_eq!(again.clones.len(), 100);
}
