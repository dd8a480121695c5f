//! The crash domain: kill -9 of a cell during a clone workload loses only that cell's VMs. (Its
//! own test binary, so that counting this process's descriptors sees no other test.)

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::*;
use cowvm_cell::{CellError, ExitStatus, Liveness, PoolError, VmRef};
use cowvm_vmm::GuestCommand;
use vm_memory::GuestAddress;

const CHECK: GuestCommand = GuestCommand::Checksum {
    start: GuestAddress(MARKED),
    count: 1,
    stride: 8,
};

fn waited_for_work() -> bool {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START.get_or_init(std::time::Instant::now).elapsed() < Duration::from_secs(120)
}

#[test]
fn test_kill_9_of_a_cell_loses_only_its_vms_and_a_replacement_starts_without_leaks() {
    let template = template();
    let fds_before = open_fds();
    let maps_before = memfd_mappings();
    let pool = pool(50, 8, &template);
    let batch = pool.spawn(1, 200).expect("spawn 200");
    assert!(batch.failed.is_empty(), "{:?}", batch.failed);
    let cells = pool.cells();
    assert_eq!(cells.len(), 4, "200 clones at 50 per cell");
    let victim = cells[1].id;
    let victim_cell = pool.cell(victim).expect("victim");
    let victim_vms: Vec<VmRef> = batch
        .clones
        .iter()
        .map(|c| c.at)
        .filter(|at| at.cell == victim)
        .collect();
    let survivors: Vec<VmRef> = batch
        .clones
        .iter()
        .map(|c| c.at)
        .filter(|at| at.cell != victim)
        .collect();
    assert_eq!(victim_vms.len(), 50);
    let fds_with_cells = open_fds();

    // The workload: every clone of every cell runs commands in a loop, one thread per cell.
    let stop = AtomicBool::new(false);
    let answered = AtomicU64::new(0);
    let (victim_errors, survivor_errors) = std::thread::scope(|scope| {
        let workers: Vec<_> = cells
            .iter()
            .map(|cell| {
                let (pool, stop, answered) = (&pool, &stop, &answered);
                let vms: Vec<VmRef> = batch
                    .clones
                    .iter()
                    .map(|c| c.at)
                    .filter(|at| at.cell == cell.id)
                    .collect();
                scope.spawn(move || {
                    let mut errors = Vec::new();
                    'outer: while !stop.load(Ordering::Relaxed) {
                        for &at in &vms {
                            match pool.run(at, CHECK, DEADLINE) {
                                Ok(out) => {
                                    assert_eq!(out.result, MARK);
                                    answered.fetch_add(1, Ordering::Relaxed);
                                }
                                Err(e) => {
                                    errors.push(e);
                                    break 'outer;
                                }
                            }
                        }
                    }
                    (cell.id, errors)
                })
            })
            .collect();
        // Whatever happens below, the workers stop (a failed assertion must not hang the scope).
        struct StopOnDrop<'a>(&'a AtomicBool);
        impl Drop for StopOnDrop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        let _stop = StopOnDrop(&stop);
        while answered.load(Ordering::Relaxed) < 400 {
            assert!(waited_for_work(), "the workload did not start");
            std::thread::sleep(Duration::from_millis(1));
        }
        let killed = std::time::Instant::now();
        victim_cell.signal(libc::SIGKILL).expect("kill -9");
        let noticed = victim_cell.wait_dead(Duration::from_secs(60));
        eprintln!("death noticed after {:?}: {noticed:?}", killed.elapsed());
        assert!(
            noticed.is_some(),
            "the supervisor notices the death (the socket closes)"
        );
        let at_death = answered.load(Ordering::Relaxed);
        let waited = std::time::Instant::now();
        while answered.load(Ordering::Relaxed) < at_death + 400 {
            assert!(
                waited.elapsed() < Duration::from_secs(120),
                "the other cells stopped answering"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        stop.store(true, Ordering::Relaxed);
        let mut victim_errors = Vec::new();
        let mut survivor_errors = Vec::new();
        for worker in workers {
            let (id, errors) = worker.join().expect("worker");
            if id == victim {
                victim_errors = errors;
            } else {
                survivor_errors.extend(errors);
            }
        }
        (victim_errors, survivor_errors)
    });
    assert!(survivor_errors.is_empty(), "other cells failed: {survivor_errors:?}");
    assert_eq!(
        victim_cell.wait_exit(Duration::from_secs(300)),
        Some(ExitStatus::Killed(libc::SIGKILL)),
        "the dead cell is reaped with its status"
    );
    assert_eq!(victim_errors.len(), 1, "the victim's worker saw its cell die");
    match &victim_errors[0] {
        PoolError::Cell(CellError::Died { status, .. }) | PoolError::Lost { status, .. } => assert!(
            matches!(status, ExitStatus::Killed(libc::SIGKILL) | ExitStatus::Exiting),
            "{status}"
        ),
        other => panic!("expected a Died or Lost error, got {other}"),
    }
    assert_eq!(
        victim_cell.liveness(),
        Liveness::Dead(ExitStatus::Killed(libc::SIGKILL))
    );
    match pool.run(victim_vms[0], CHECK, DEADLINE) {
        Err(PoolError::Lost { at, .. }) => assert_eq!(at, victim_vms[0]),
        other => panic!("a VM of the dead cell answered {other:?}"),
    }

    drop(victim_cell);
    let lost = pool.reap_dead();
    assert_eq!(lost.len(), 1);
    assert_eq!(lost[0].cell, victim);
    assert_eq!(lost[0].status, ExitStatus::Killed(libc::SIGKILL));
    assert_eq!(lost[0].vms, victim_vms, "the dead cell is reported with its VMs");
    assert_eq!(pool.cells().len(), 3);
    for &at in &survivors {
        assert_eq!(pool.run(at, CHECK, DEADLINE).expect("survivor").result, MARK);
    }

    let replacement = pool.start_cell().expect("a replacement cell");
    let more = pool.spawn(1, 50).expect("spawn into the replacement");
    assert!(more.failed.is_empty(), "{:?}", more.failed);
    assert!(more.clones.iter().all(|c| c.at.cell == replacement));
    assert_eq!(
        open_fds(),
        fds_with_cells,
        "the dead cell's socket and pidfd are closed; the replacement holds the same number"
    );

    drop(pool);
    assert_eq!(open_fds(), fds_before, "no descriptor outlives the pool");
    assert_eq!(memfd_mappings(), maps_before, "no memfd mapping outlives the pool");
}
