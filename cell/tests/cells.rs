//! Cells on the real /dev/kvm: the protocol end to end, cross-process sharing of template frames,
//! and the sandbox as `/proc/<pid>/status` shows it.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use cowvm_cell::inspect::ProcessPageMap;
use cowvm_cell::protocol::RemoteErrorKind;
use cowvm_cell::PoolError;
use cowvm_vmm::kpage::KPages;
use cowvm_vmm::memory::PAGE_SIZE;
use cowvm_vmm::pagemap::PageMap;
use cowvm_vmm::GuestCommand;
use vm_memory::GuestAddress;

fn spin_kind(e: &PoolError) -> Option<RemoteErrorKind> {
    match e {
        PoolError::Cell(e) => e.remote_kind(),
        _ => None,
    }
}

#[test]
fn test_clone_in_a_cell_runs_resets_and_is_destroyed_over_the_protocol() {
    let template = template();
    let pool = pool(4, 2, &template);
    let batch = pool.spawn(1, 3).expect("spawn");
    assert!(batch.failed.is_empty(), "{:?}", batch.failed);
    assert_eq!(batch.clones.len(), 3);
    let cells: BTreeSet<_> = batch.clones.iter().map(|c| c.at.cell).collect();
    assert_eq!(cells.len(), 1, "3 clones fit one cell of 4");
    let clone = batch.clones[0];
    assert_eq!(clone.spawned.memory_size, template.size());

    let identity = pool.run(clone.at, GuestCommand::Identity, DEADLINE).expect("identity");
    assert_eq!(
        (identity.result, identity.extra),
        (clone.spawned.generation, clone.spawned.seed)
    );
    let read = GuestCommand::Checksum {
        start: GuestAddress(MARKED),
        count: 1,
        stride: 8,
    };
    assert_eq!(pool.run(clone.at, read, DEADLINE).expect("read").result, MARK);
    let write = GuestCommand::Write {
        start: GuestAddress(MARKED),
        count: 1,
        stride: 8,
        value: 7,
    };
    pool.run(clone.at, write, DEADLINE).expect("write");
    assert_eq!(pool.run(clone.at, read, DEADLINE).expect("read").result, 7);

    let (reset, _) = pool.reset(clone.at).expect("reset");
    assert_eq!(reset.pages_dropped, 1);
    assert_ne!(reset.generation, clone.spawned.generation);
    assert_eq!(pool.run(clone.at, read, DEADLINE).expect("read").result, MARK);

    // A guest past its deadline: the timer signal and its return happen under the filter.
    let spin = pool
        .run(clone.at, GuestCommand::Spin, std::time::Duration::from_millis(50))
        .expect_err("a spinning guest misses its deadline");
    assert_eq!(spin_kind(&spin), Some(RemoteErrorKind::Guest), "{spin}");
    pool.reset(clone.at).expect("reset after the deadline");
    assert_eq!(pool.run(clone.at, read, DEADLINE).expect("read").result, MARK);

    let cell = pool.cell(clone.at.cell).expect("cell");
    assert_eq!(
        cell.keep_warm(1, 1, std::time::Duration::from_secs(10))
            .expect("warm")
            .ready,
        1
    );
    assert_eq!(cell.stats().expect("stats").vms, 3);
    assert_eq!(cell.stats().expect("stats").warm_shells, 1);
    pool.destroy(clone.at).expect("destroy");
    assert_eq!(cell.stats().expect("stats").vms, 2);
    match pool.run(clone.at, read, DEADLINE) {
        Err(PoolError::UnknownVm(at)) => assert_eq!(at, clone.at),
        other => panic!("a destroyed VM answered {other:?}"),
    }
    let refused = cell
        .run(clone.at.vm, read, DEADLINE)
        .expect_err("the cell no longer has it");
    assert_eq!(refused.remote_kind(), Some(RemoteErrorKind::UnknownVm));
    // Tearing its VMs down and leaving happen under the seccomp filter too.
    assert_eq!(
        cell.close(std::time::Duration::from_secs(10)),
        Some(cowvm_cell::ExitStatus::Exited(0))
    );
    match pool.run(batch.clones[1].at, read, DEADLINE) {
        Err(PoolError::Lost { .. }) => {}
        other => panic!("a VM of a closed cell answered {other:?}"),
    }
}

#[test]
fn test_clones_of_one_call_are_spread_over_cells_of_the_configured_size() {
    let template = template();
    let pool = pool(3, 4, &template);
    let batch = pool.spawn(1, 8).expect("spawn");
    assert!(batch.failed.is_empty(), "{:?}", batch.failed);
    let cells = pool.cells();
    assert_eq!(cells.len(), 3, "8 clones at 3 per cell need 3 cells");
    let mut per_cell: Vec<u32> = cells.iter().map(|c| c.vms).collect();
    per_cell.sort();
    assert_eq!(per_cell, vec![2, 3, 3]);
    let pids: BTreeSet<u32> = batch.clones.iter().map(|c| c.pid).collect();
    assert_eq!(pids.len(), 3);
    match pool.spawn(1, 5) {
        Err(PoolError::Full { max_cells: 4, .. }) => {}
        other => panic!("5 more clones in a pool of 4 x 3 with 8 live must not fit: {other:?}"),
    }
}

#[test]
fn test_two_cells_map_the_same_template_frame() {
    if !is_root() {
        eprintln!("skipped: PFNs in pagemap and /proc/kpagecount need root");
        return;
    }
    let template = template();
    let view = template.memory().base().map_read_only().expect("read-only view");
    assert_eq!(
        view.read_u64(MARKED),
        Some(MARK),
        "the supervisor's view maps the template page"
    );
    let own = PageMap::open().expect("pagemap");
    let page = MARKED / PAGE_SIZE * PAGE_SIZE;
    let frame = own.read(view.host_address() + page, 1).expect("read pagemap")[0]
        .pfn()
        .filter(|&pfn| pfn != 0)
        .expect("the template page is present with a PFN");
    let kpages = KPages::open().expect("kpagecount");
    let before = kpages.counts(&[frame]).expect("kpagecount")[0];

    let pool = pool(1, 2, &template);
    let batch = pool.spawn(1, 2).expect("spawn");
    assert_eq!(batch.clones.len(), 2);
    let read = GuestCommand::Checksum {
        start: GuestAddress(MARKED),
        count: 1,
        stride: 8,
    };
    let mut pids = BTreeSet::new();
    for clone in &batch.clones {
        assert_eq!(pool.run(clone.at, read, DEADLINE).expect("read").result, MARK);
        let entry = ProcessPageMap::open(clone.pid)
            .expect("the cell's pagemap")
            .read(clone.spawned.host_address + page, 1)
            .expect("read")[0];
        assert!(
            entry.present() && entry.file_or_shared(),
            "the clone maps the template's page"
        );
        assert_eq!(entry.pfn(), Some(frame), "cell {} maps the template's frame", clone.pid);
        pids.insert(clone.pid);
    }
    assert_eq!(pids.len(), 2, "two cells");
    let after = kpages.counts(&[frame]).expect("kpagecount")[0];
    assert_eq!(after, before + 2, "each cell adds one mapping of the same frame");
}

#[test]
fn test_cells_run_under_seccomp_with_no_new_privs_as_an_unprivileged_user() {
    let template = template();
    let pool = pool(2, 1, &template);
    pool.spawn(1, 1).expect("spawn");
    let cells = pool.cells();
    assert_eq!(cells.len(), 1);
    let confinement = cells[0].confinement.expect("/proc/<pid>/status");
    assert_eq!(confinement.seccomp, 2, "seccomp filter mode");
    assert!(confinement.no_new_privs);
    if is_root() {
        assert_eq!((confinement.uid, confinement.gid), cowvm_cell::sandbox::NOBODY);
        assert_eq!(cells[0].uid, cowvm_cell::sandbox::NOBODY.0);
    }
}

#[test]
fn test_a_stopped_cell_times_out_and_answers_again_once_continued() {
    let template = template();
    let mut config = config(2);
    config.request_timeout = std::time::Duration::from_millis(300);
    let kvm = std::fs::File::options()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .expect("/dev/kvm");
    let cell = cowvm_cell::Cell::start(&config, &kvm).expect("start a cell");
    cell.load_template(1, &template).expect("load");
    cell.signal(libc::SIGSTOP).expect("SIGSTOP");
    match cell.stats() {
        Err(cowvm_cell::CellError::Timeout { op: "stats", .. }) => {}
        other => panic!("a stopped cell answered {other:?}"),
    }
    cell.signal(libc::SIGCONT).expect("SIGCONT");
    // The late answer to the timed-out request is dropped; the next request gets its own.
    let counts = cell.stats().expect("stats after SIGCONT");
    assert_eq!((counts.templates, counts.vms), (1, 0));
    assert_eq!(cell.liveness(), cowvm_cell::Liveness::Alive);
}

#[test]
fn test_idle_cells_beyond_the_pool_are_stopped() {
    let template = template();
    let pool = pool(1, 3, &template);
    let batch = pool.spawn(1, 3).expect("spawn");
    assert_eq!(pool.cells().len(), 3);
    pool.destroy(batch.clones[0].at).expect("destroy");
    pool.destroy(batch.clones[1].at).expect("destroy");
    assert_eq!(pool.reap_idle(1, Duration::ZERO), 1, "two idle cells, one kept");
    let left: BTreeSet<_> = pool.cells().iter().map(|c| c.id).collect();
    assert!(left.contains(&batch.clones[2].at.cell), "the busy cell stays");
    assert_eq!(left.len(), 2);
}

#[test]
fn test_idle_cells_are_stopped_only_after_the_idle_time() {
    let template = template();
    let pool = pool(1, 2, &template);
    let batch = pool.spawn(1, 2).expect("spawn");
    let hour = Duration::from_secs(3600);
    assert_eq!(pool.reap_idle(0, Duration::ZERO), 0, "cells with VMs are not idle");
    pool.destroy(batch.clones[0].at).expect("destroy");
    assert_eq!(pool.reap_idle(0, hour), 0, "idle for less than an hour");
    assert_eq!(pool.cells().len(), 2);
    // A cell that is busy again starts its idle time anew.
    let again = pool.spawn(1, 1).expect("spawn again");
    assert_eq!(pool.reap_idle(0, Duration::ZERO), 0);
    pool.destroy(again.clones[0].at).expect("destroy");
    pool.destroy(batch.clones[1].at).expect("destroy");
    assert_eq!(pool.reap_idle(0, hour), 0);
    assert_eq!(pool.reap_idle(0, Duration::ZERO), 2, "both idle now");
    assert!(pool.cells().is_empty());
}

#[test]
fn test_supervisor_reads_kvm_statistics_of_a_vm_in_a_cell_through_passed_fds() {
    let template = template();
    let pool = pool(2, 1, &template);
    let clone = pool.spawn(1, 1).expect("spawn").clones[0];
    let files = pool.kvm_stats_files(clone.at).expect("stats fds");
    let before = files.read().expect("read stats");
    for _ in 0..5 {
        pool.run(clone.at, GuestCommand::Exit, DEADLINE).expect("run");
    }
    let after = files.read().expect("read stats");
    let exits = after.delta(&before, "exits", true).expect("KVM publishes vCPU exits");
    assert!(exits >= 5, "5 guest commands, {exits} exits counted");
    assert!(after.vm.contains_key("pages_4k") || after.vm.contains_key("mmu_shadow_zapped"));
}

#[test]
fn test_a_layered_template_reaches_a_cell_with_all_its_memfds() {
    let kvm = kvm();
    let base = template();
    let mut vm = cowvm_vmm::Vm::restore(&kvm, base.memory(), base.state()).expect("restore");
    let written = MARKED + (8 << 20);
    vm.execute(
        GuestCommand::Write {
            start: GuestAddress(written),
            count: 1,
            stride: 8,
            value: 0xab,
        },
        Some(DEADLINE),
    )
    .expect("write");
    let layered = std::sync::Arc::new(cowvm_vmm::Template::freeze(&kvm, &mut vm).expect("freeze"));
    assert_eq!(layered.memory().depth(), 2, "frozen from a clone: base + one overlay");

    let pool = pool(2, 1, &layered);
    let clone = pool.spawn(1, 1).expect("spawn").clones[0];
    let read = |gpa: u64| {
        let command = GuestCommand::Checksum {
            start: GuestAddress(gpa),
            count: 1,
            stride: 8,
        };
        pool.run(clone.at, command, DEADLINE).expect("read").result
    };
    assert_eq!(read(MARKED), MARK, "the base layer");
    assert_eq!(read(written), 0xab, "the overlay");
}

#[test]
fn test_concurrent_spawns_never_overfill_a_cell() {
    let template = template();
    let pool = pool(5, 2, &template);
    pool.start_cell().expect("a cell with room for 5");
    let batches: Vec<_> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..2).map(|_| scope.spawn(|| pool.spawn(1, 5))).collect();
        handles.into_iter().map(|h| h.join().expect("spawner")).collect()
    });
    for batch in batches {
        let batch = batch.expect("both calls fit: the second one gets a new cell");
        assert!(batch.failed.is_empty(), "{:?}", batch.failed);
        assert_eq!(batch.clones.len(), 5);
    }
    let mut per_cell: Vec<u32> = pool.cells().iter().map(|c| c.vms).collect();
    per_cell.sort();
    assert_eq!(per_cell, vec![5, 5]);
}

#[test]
fn test_a_cell_holds_only_its_socket_kvm_and_pagemap_until_given_a_template() {
    let template = template();
    // An fd without close-on-exec: only the cell's close_range keeps it out of the cell.
    // SAFETY: opening a path with a NUL-terminated literal; the fd is closed below.
    let opened = unsafe { libc::open(c"/proc/self/status".as_ptr(), libc::O_RDONLY) };
    // Above the cell's socket (fd 3), which a low number would be overwritten by.
    // SAFETY: F_DUPFD (no close-on-exec) on the fd just opened; both are closed below.
    let inheritable = unsafe { libc::fcntl(opened, libc::F_DUPFD, 100) };
    assert!(opened >= 0 && inheritable >= 100);
    let pool = pool(1, 1, &template);
    let id = pool.start_cell().expect("cell");
    let pid = pool.cell(id).expect("cell").pid();
    let targets: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("the cell's fds")
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .map(|t| t.to_string_lossy().into_owned())
        .collect();
    for target in &targets {
        assert!(
            !target.contains("memfd:") && !target.contains("/status") && !target.contains("kvm-vm"),
            "the cell holds {target} (all: {targets:?})"
        );
    }
    assert!(targets.iter().any(|t| t == "/dev/kvm"), "{targets:?}");
    assert_eq!(
        targets.iter().filter(|t| t.ends_with("/pagemap")).count(),
        2,
        "{targets:?}"
    );
    // SAFETY: closes the fd opened above, owned by nothing else.
    unsafe { libc::close(inheritable) };
    // SAFETY: as above.
    unsafe { libc::close(opened) };
}
