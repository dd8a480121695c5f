//! Recycling in a cell on the real /dev/kvm: a deleted clone becomes a warm shell of its
//! template, and the clone made from that shell starts clean (the cell's own pagemap, read by
//! the test, shows none of the old clone's private pages; its memory and identity are the
//! template's and its own).

mod common;

use std::time::{Duration, Instant};

use common::*;
use cowvm_cell::inspect::ProcessPageMap;
use cowvm_cell::protocol::BootVm;
use cowvm_cell::{PlacedVm, PoolError};
use cowvm_vmm::memory::PAGE_SIZE;
use cowvm_vmm::GuestCommand;
use vm_memory::GuestAddress;

/// Where the used clone writes: 8 pages the template never wrote.
const WRITTEN: u64 = 32 << 20;
const PAGES: u64 = 8;

/// Pages of `clone`'s RAM that its cell has copied on write (private copies), by address.
fn private_pages(clone: &PlacedVm) -> Vec<u64> {
    let pages = (clone.spawned.memory_size / PAGE_SIZE) as usize;
    ProcessPageMap::open(clone.pid)
        .expect("the cell's pagemap")
        .read(clone.spawned.host_address, pages)
        .expect("read the cell's pagemap")
        .iter()
        .enumerate()
        .filter(|(_, e)| e.private_copy())
        .map(|(i, _)| i as u64 * PAGE_SIZE)
        .collect()
}

fn checksum(at: u64, count: u64) -> GuestCommand {
    GuestCommand::Checksum {
        start: GuestAddress(at),
        count,
        stride: PAGE_SIZE,
    }
}

#[test]
fn test_a_recycled_clone_becomes_a_warm_shell_whose_next_clone_starts_clean() {
    let template = template();
    let pool = pool(4, 1, &template);
    let used = pool.spawn(1, 1).expect("spawn").clones[0];
    let fresh = private_pages(&used);
    let pristine = pool
        .run(used.at, checksum(WRITTEN, PAGES), DEADLINE)
        .expect("read")
        .result;
    let marked = pool.run(used.at, checksum(MARKED, 1), DEADLINE).expect("read").result;
    let write = GuestCommand::Write {
        start: GuestAddress(WRITTEN),
        count: PAGES,
        stride: PAGE_SIZE,
        value: 0xdead,
    };
    pool.run(used.at, write, DEADLINE).expect("write");
    let dirty = private_pages(&used);
    assert!(
        (0..PAGES).all(|i| dirty.contains(&(WRITTEN + i * PAGE_SIZE))),
        "the cell copied the written pages: {dirty:x?}"
    );

    assert!(
        pool.recycle(used.at).expect("recycle"),
        "the cell has room for one shell"
    );
    match pool.run(used.at, checksum(MARKED, 1), DEADLINE) {
        Err(PoolError::UnknownVm(at)) => assert_eq!(at, used.at),
        other => panic!("a recycled VM answered {other:?}"),
    }
    let cell = pool.cell(used.at.cell).expect("cell");
    let started = Instant::now();
    let counts = loop {
        let counts = cell.stats().expect("stats");
        if counts.warm_shells == 1 || started.elapsed() > Duration::from_secs(20) {
            break counts;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    assert_eq!(
        (counts.vms, counts.warm_shells, counts.recycled),
        (0, 1, 1),
        "the used VM is the cell's one warm shell"
    );
    assert_eq!(pool.warm_target(1), 1, "the template's target rose by one");

    let next = pool.spawn(1, 1).expect("spawn").clones[0];
    assert!(next.spawned.pooled, "the next clone takes the recycled shell");
    assert_eq!(next.at.cell, used.at.cell);
    assert_ne!(next.spawned.generation, used.spawned.generation);
    assert_eq!(
        private_pages(&next),
        fresh,
        "the next clone holds exactly the private pages of a fresh clone after its spawn"
    );
    let identity = pool.run(next.at, GuestCommand::Identity, DEADLINE).expect("identity");
    assert_eq!(
        (identity.result, identity.extra),
        (next.spawned.generation, next.spawned.seed)
    );
    assert_eq!(
        pool.run(next.at, checksum(WRITTEN, PAGES), DEADLINE)
            .expect("read")
            .result,
        pristine
    );
    assert_eq!(
        pool.run(next.at, checksum(MARKED, 1), DEADLINE).expect("read").result,
        marked
    );
}

#[test]
fn test_a_booted_vm_is_destroyed_not_recycled_and_the_template_target_stays() {
    let template = template();
    let pool = pool(4, 1, &template);
    let boot = BootVm {
        memory_mib: 32,
        vcpus: 1,
        kernel: None,
        warmup_mib: 0,
        deadline_ms: DEADLINE.as_millis() as u64,
    };
    let booted = pool.boot(boot, None).expect("place").expect("boot");
    assert!(
        !pool.recycle(booted.at).expect("recycle"),
        "a booted VM has no template pool"
    );
    assert_eq!(pool.warm_target(1), 0);
    let cells = pool.cells();
    assert_eq!((cells[0].vms, cells[0].warm_target, cells[0].recycled), (0, 0, 0));
    match pool.run(booted.at, GuestCommand::Identity, DEADLINE) {
        Err(PoolError::UnknownVm(at)) => assert_eq!(at, booted.at),
        other => panic!("a deleted VM answered {other:?}"),
    }
}
