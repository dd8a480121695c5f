//! Freezing a VM that lives in a cell, on the real /dev/kvm: the cell seals the VM's private
//! pages into a new layer and sends its memfd back; the supervisor builds the same template over
//! the parent's layers, clones of it in any cell map the same frames, and no memfd is left behind.

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use common::*;
use cowvm_cell::inspect::ProcessPageMap;
use cowvm_cell::protocol::RemoteErrorKind;
use cowvm_cell::{CellError, PoolError};
use cowvm_vmm::kpage::KPages;
use cowvm_vmm::memory::PAGE_SIZE;
use cowvm_vmm::GuestCommand;
use vm_memory::GuestAddress;

/// The tests of this file count this process's memfds: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// Where the tests write: a page the template's guest never wrote (a hole of the base memfd).
const WRITTEN: u64 = MARKED + (8 << 20);

fn read(at: u64) -> GuestCommand {
    GuestCommand::Checksum {
        start: GuestAddress(at),
        count: 1,
        stride: 8,
    }
}

fn write(at: u64, value: u64) -> GuestCommand {
    GuestCommand::Write {
        start: GuestAddress(at),
        count: 1,
        stride: 8,
        value,
    }
}

/// Memfds `pid` holds open (`/proc/<pid>/fd`).
fn memfd_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("list fds")
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|target| target.to_string_lossy().contains("memfd:"))
        .count()
}

#[test]
fn test_a_vm_frozen_in_its_cell_becomes_a_sealed_layer_over_its_parent_that_clones_in_other_cells_share() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let template = template();
    let pool = pool(2, 3, &template);
    let source = pool.spawn(1, 1).expect("spawn").clones[0];
    pool.run(source.at, write(WRITTEN, 0xfeed), DEADLINE).expect("write");
    let ours_before = memfd_fds(std::process::id());
    let cell_before = memfd_fds(source.pid);

    let (frozen, pause_us) = pool.freeze(source.at, 1, 2).expect("freeze");
    assert!(pause_us > 0.0);
    assert_eq!(
        frozen.memory().depth(),
        2,
        "the parent's base plus the VM's private pages"
    );
    assert!(
        frozen.memory().is_layered_on(template.memory()),
        "built over the supervisor's own copy of the parent"
    );
    assert_eq!(memfd_fds(std::process::id()), ours_before + 1, "one memfd came back");
    let layer = frozen.memory().own_layer();
    let seals = layer.seals().expect("seals");
    let needed = libc::F_SEAL_WRITE | libc::F_SEAL_GROW | libc::F_SEAL_SHRINK;
    assert_eq!(seals & needed, needed, "the new layer is sealed (seals {seals:#x})");
    let byte = [1u8];
    // SAFETY: pwrite from a live one-byte buffer to a descriptor the layer owns; the seal
    // must refuse it.
    let wrote = unsafe {
        libc::pwrite(
            std::os::fd::AsRawFd::as_raw_fd(&std::os::fd::AsFd::as_fd(layer)),
            byte.as_ptr().cast(),
            1,
            0,
        )
    };
    assert_eq!(wrote, -1, "a sealed layer refuses writes");
    assert_eq!(std::io::Error::last_os_error().raw_os_error(), Some(libc::EPERM));

    // The VM goes on, on its private view: its later writes do not reach the template.
    assert_eq!(
        pool.run(source.at, read(WRITTEN), DEADLINE).expect("read").result,
        0xfeed
    );
    pool.run(source.at, write(WRITTEN, 0xbad), DEADLINE)
        .expect("write after the freeze");

    // Two clones of the new template: one in the freezing cell (which kept the template), one
    // in a new cell (which receives it with its memfds).
    let frozen = Arc::new(frozen);
    pool.add_template(2, Arc::clone(&frozen));
    let batch = pool.spawn(2, 2).expect("spawn the frozen template");
    assert!(batch.failed.is_empty(), "{:?}", batch.failed);
    let pids: BTreeSet<u32> = batch.clones.iter().map(|c| c.pid).collect();
    assert_eq!(pids.len(), 2, "one clone per cell");
    assert!(pids.contains(&source.pid), "the freezing cell had room for one");
    let page = WRITTEN / PAGE_SIZE * PAGE_SIZE;
    let mut frames = BTreeSet::new();
    for clone in &batch.clones {
        assert_eq!(
            pool.run(clone.at, read(WRITTEN), DEADLINE).expect("read").result,
            0xfeed
        );
        assert_eq!(pool.run(clone.at, read(MARKED), DEADLINE).expect("read").result, MARK);
        if is_root() {
            let entry = ProcessPageMap::open(clone.pid)
                .expect("the cell's pagemap")
                .read(clone.spawned.host_address + page, 1)
                .expect("read")[0];
            assert!(
                entry.present() && entry.file_or_shared(),
                "a template frame, not a copy"
            );
            frames.insert(entry.pfn().expect("pfn"));
        }
    }
    if is_root() {
        assert_eq!(frames.len(), 1, "both cells map the same frame of the new layer");
        let frame = frames.into_iter().next().expect("frame");
        let count = KPages::open().expect("kpagecount").counts(&[frame]).expect("counts")[0];
        assert!(count >= 2, "kpagecount {count}");
    }

    // Nothing is left behind: clones gone and template dropped, the memfds are closed.
    for clone in &batch.clones {
        pool.destroy(clone.at).expect("destroy");
    }
    pool.remove_template(2).expect("drop the template from the cells");
    drop(frozen);
    assert_eq!(
        memfd_fds(std::process::id()),
        ours_before,
        "the supervisor closed the layer's memfd"
    );
    assert_eq!(memfd_fds(source.pid), cell_before, "the freezing cell closed its copy");
}

#[test]
fn test_a_vm_without_private_pages_freezes_into_its_parents_memory_and_bad_requests_are_refused() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let template = template();
    let pool = pool(2, 1, &template);
    let source = pool.spawn(1, 1).expect("spawn").clones[0];
    let ours_before = memfd_fds(std::process::id());
    let (frozen, _) = pool.freeze(source.at, 1, 2).expect("freeze");
    assert!(frozen.memory().same_as(template.memory()), "no new layer");
    assert_eq!(memfd_fds(std::process::id()), ours_before, "no memfd came back");

    // The id is taken in the cell now; a wrong parent and an unknown VM are refused.
    match pool.freeze(source.at, 1, 2) {
        Err(PoolError::Cell(e)) => assert_eq!(e.remote_kind(), Some(RemoteErrorKind::Protocol), "{e}"),
        other => panic!("a second freeze into template 2 answered {:?}", other.map(|(_, us)| us)),
    }
    let other = common::template();
    let cell = pool.cell(source.at.cell).expect("cell");
    cell.load_template(3, &other).expect("load");
    match cell.freeze(source.at.vm, 3, &other, 4) {
        Err(CellError::Remote { error, .. }) => assert_eq!(error.kind, RemoteErrorKind::Protocol, "{error}"),
        other => panic!("a freeze with the wrong parent answered {:?}", other.map(|(_, us)| us)),
    }
    let unknown = cowvm_cell::VmRef {
        cell: source.at.cell,
        vm: source.at.vm + 100,
    };
    assert!(matches!(pool.freeze(unknown, 1, 5), Err(PoolError::UnknownVm(_))));
    // The VM still runs.
    assert_eq!(pool.run(source.at, read(MARKED), DEADLINE).expect("read").result, MARK);
}
