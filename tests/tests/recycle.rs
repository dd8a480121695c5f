//! Recycling and reset by swap on real guests: a used clone handed back to the engine is reset
//! off the request path and comes back as a warm shell that cannot be told apart from a fresh
//! one (no private page by pagemap, the template's registers, the template's data), and the VM
//! limit holds throughout.

use std::sync::Arc;
use std::time::Duration;

use cowvm_tests::{guest_read as read, guest_write as write, kvm, private_pages, template_with_data};
use cowvm_vmm::memory::PAGE_SIZE;
use cowvm_vmm::{Clone, CloneEngine, EngineConfig, Template};

const MIB: u64 = 1 << 20;
const DATA: u64 = 8 * MIB;
const WAIT: Duration = Duration::from_secs(30);

fn engine() -> CloneEngine {
    CloneEngine::new(Arc::new(kvm()), EngineConfig::default()).expect("engine")
}

/// A template of 64 MiB with one data page, and `shells` warm shells of it ready.
fn warm_template(engine: &CloneEngine, shells: usize) -> Arc<Template> {
    let template = Arc::new(template_with_data(engine.kvm(), 64, &[DATA]));
    engine.keep_warm(&template, shells);
    assert!(
        engine.wait_for_shells(&template, shells, WAIT),
        "{:?}",
        engine.pool_error(&template)
    );
    template
}

/// Dirties `pages` pages of `clone` (plus the data page) through the guest.
fn dirty(clone: &mut Clone, pages: u64) {
    write(clone.vm_mut(), DATA, 0xdead);
    for i in 0..pages {
        write(clone.vm_mut(), 16 * MIB + i * PAGE_SIZE, i + 1);
    }
    assert_eq!(private_pages(clone.vm().ram()).len() as u64, pages + 1);
}

/// Asserts that `clone` (taken but not yet run) is indistinguishable from a fresh shell of
/// `template`: no private page, the template's registers with its own identity, the template's
/// data.
fn assert_clean(clone: &mut Clone, template: &Template) {
    assert!(
        private_pages(clone.vm().ram()).is_empty(),
        "pagemap shows no private page in a recycled VM"
    );
    let regs = clone.vm_mut().vcpu_mut().regs().expect("regs");
    let saved = &template.state().vcpus[0].regs;
    assert_eq!(
        (regs.rip, regs.rsp, regs.rflags, regs.rax, regs.rbx, regs.rcx, regs.rdx),
        (
            saved.rip,
            saved.rsp,
            saved.rflags,
            saved.rax,
            saved.rbx,
            saved.rcx,
            saved.rdx
        ),
        "registers equal the template's"
    );
    assert_eq!(
        (regs.rsi, regs.rdi, regs.r8, regs.r9, regs.r10, regs.r11, regs.r12, regs.r13),
        (saved.rsi, saved.rdi, saved.r8, saved.r9, saved.r10, saved.r11, saved.r12, saved.r13)
    );
    assert_eq!(
        (regs.r14, regs.r15),
        (clone.generation(), clone.seed()),
        "its own identity"
    );
    let sregs = clone.vm().vcpu().sregs().expect("sregs");
    let saved = &template.state().vcpus[0].sregs;
    assert_eq!(
        (sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer),
        (saved.cr0, saved.cr3, saved.cr4, saved.efer)
    );
    assert_eq!(
        read(clone.vm_mut(), DATA),
        DATA | 0xfeed,
        "the template's data, not the old write"
    );
    assert_eq!(read(clone.vm_mut(), 16 * MIB), 0, "the old clone's page is gone");
}

#[test]
fn test_a_deleted_clone_is_recycled_into_a_clean_warm_shell() {
    let engine = engine();
    let template = warm_template(&engine, 1);
    // The builder builds no shell from here on, so the only shell can be the recycled VM.
    let _hold = engine.pause_building();
    let mut room = engine.reserve(1, Some(&template)).expect("room");
    let mut clone = engine
        .spawn_reserved(&template, &mut room, &|| false)
        .expect("spawn")
        .clones
        .pop()
        .expect("one clone");
    assert_eq!(engine.warm_shells(&template), 0);
    let address = clone.vm().ram().host_address();
    dirty(&mut clone, 100);
    let held = engine.held_vms();

    assert!(engine.recycle(clone, Some(room)), "the pool (target 1, empty) wants it");
    assert_eq!(engine.held_vms(), held, "the VM moved from its reservation to the pool");
    assert!(engine.wait_recycled(WAIT));
    let stats = engine.recycle_stats();
    assert_eq!((stats.recycled, stats.destroyed, stats.pending), (1, 0, 0));
    assert_eq!(stats.recent_us.len(), 1);
    assert_eq!(engine.warm_shells(&template), 1, "back in the pool as a shell");
    assert_eq!(engine.held_vms(), held);

    let mut next = engine.spawn_idle(&template).expect("take the shell");
    assert!(next.pooled());
    assert_eq!(
        next.vm().ram().host_address(),
        address,
        "the next clone is the recycled VM"
    );
    assert_clean(&mut next, &template);
}

#[test]
fn test_clones_of_a_retired_template_or_a_pool_without_target_are_torn_down() {
    let engine = engine();
    let template = warm_template(&engine, 1);
    let _hold = engine.pause_building();
    let mut room = engine.reserve(2, Some(&template)).expect("room");
    let mut batch = engine.spawn_reserved(&template, &mut room, &|| false).expect("spawn");
    let mut rooms: Vec<_> = (0..2).map(|_| room.split_one().expect("room for one")).collect();
    let second = batch.clones.pop().expect("clone");
    let first = batch.clones.pop().expect("clone");
    engine.keep_warm(&template, 0);
    assert!(
        !engine.recycle(first, rooms.pop()),
        "a pool that keeps no shells wants none"
    );
    engine.retire(&template);
    assert!(!engine.recycle(second, rooms.pop()), "the template is being deleted");
    engine.flush();
    let stats = engine.recycle_stats();
    assert_eq!((stats.recycled, stats.destroyed, stats.pending), (0, 2, 0));
    assert_eq!(engine.held_vms(), 0, "their room is given back");
}

#[test]
fn test_reset_by_swap_keeps_the_clone_and_recycles_its_used_vm() {
    let engine = engine();
    let template = warm_template(&engine, 2);
    let _hold = engine.pause_building();
    let mut clone = engine
        .spawn(&template, 1)
        .expect("spawn")
        .clones
        .pop()
        .expect("one clone");
    let (id, generation) = (clone.id(), clone.generation());
    let used = clone.vm().ram().host_address();
    dirty(&mut clone, 1000);

    let report = engine.reset_by_swap(&mut clone).expect("reset by swap");
    assert!(report.swapped, "a warm shell was ready");
    assert_eq!(clone.id(), id, "same clone");
    assert_ne!(report.generation, generation, "new generation");
    assert_eq!((clone.generation(), clone.seed()), (report.generation, report.seed));
    assert_ne!(clone.vm().ram().host_address(), used, "it runs on the shell now");
    assert_clean(&mut clone, &template);

    assert!(engine.wait_recycled(WAIT));
    assert_eq!(engine.recycle_stats().recycled, 1);
    let mut recycled = engine.spawn_idle(&template).expect("take the recycled VM");
    assert_eq!(
        recycled.vm().ram().host_address(),
        used,
        "the only shell left is the used VM, recycled"
    );
    assert_clean(&mut recycled, &template);

    // No shell left (the builder is held): the reset happens in place.
    write(clone.vm_mut(), 16 * MIB, 7);
    let report = engine.reset_by_swap(&mut clone).expect("reset in place");
    assert!(!report.swapped);
    assert_eq!(report.pages_dropped, 1);
    assert!(private_pages(clone.vm().ram()).is_empty());
}

#[test]
fn test_recycling_never_exceeds_the_vm_limit() {
    const MAX: usize = 6;
    let engine = engine();
    engine.set_limits(MAX, usize::MAX / 2, 0);
    let template = warm_template(&engine, 3);
    let mut live: Vec<(Clone, cowvm_vmm::Reservation)> = Vec::new();
    for round in 0..40usize {
        assert!(
            engine.held_vms() <= MAX,
            "round {round}: {} VMs held",
            engine.held_vms()
        );
        let want = 1 + round % 3;
        match engine.reserve(want, Some(&template)) {
            Ok(mut room) => {
                let batch = engine.spawn_reserved(&template, &mut room, &|| false).expect("spawn");
                assert!(batch.failed.is_empty(), "{:?}", batch.failed);
                for mut clone in batch.clones {
                    write(clone.vm_mut(), 16 * MIB, round as u64);
                    live.push((clone, room.split_one().expect("room")));
                }
            }
            Err(e) => assert!(live.len() + want > MAX, "refused with {} live: {e}", live.len()),
        }
        assert!(
            engine.held_vms() <= MAX,
            "round {round}: {} VMs held",
            engine.held_vms()
        );
        if round % 4 == 1 {
            if let Some((clone, _)) = live.last_mut() {
                engine.reset_by_swap(clone).expect("reset");
            }
            assert!(
                engine.held_vms() <= MAX,
                "round {round}: {} VMs held",
                engine.held_vms()
            );
        }
        let drop_n = if live.len() >= MAX - 1 { live.len() } else { round % 2 };
        for _ in 0..drop_n {
            if let Some((clone, room)) = live.pop() {
                engine.recycle(clone, Some(room));
            }
        }
        assert!(
            engine.held_vms() <= MAX,
            "round {round}: {} VMs held",
            engine.held_vms()
        );
    }
    assert!(engine.wait_recycled(WAIT));
    assert!(engine.recycle_stats().recycled > 0, "some VMs were recycled");
    assert!(engine.held_vms() <= MAX);
}

/// The CI loop (`cowvm bench ci-loop`, and the API's create/run/stats/delete) deletes by
/// recycling, so each iteration runs on a VM that earlier iterations used: the kernel must say
/// that it holds exactly the pages this iteration wrote, never pages left from before.
#[test]
fn test_a_vm_recycled_again_and_again_holds_only_the_pages_of_its_current_clone() {
    let engine = engine();
    let host = cowvm_vmm::stats::HostView::open().expect("these tests run as root, with access to /proc/kpagecount");
    let template = warm_template(&engine, 1);
    let _hold = engine.pause_building();
    let mut address = None;
    for round in 0..5u64 {
        let mut room = engine.reserve(1, Some(&template)).expect("room");
        let mut clone = engine
            .spawn_reserved(&template, &mut room, &|| false)
            .expect("spawn")
            .clones
            .pop()
            .expect("one clone");
        let here = clone.vm().ram().host_address();
        assert_eq!(*address.get_or_insert(here), here, "round {round} runs on the same VM");
        // A different set of 16 pages each round: a page left from an earlier round would show.
        for i in 0..16 {
            write(clone.vm_mut(), 16 * MIB + (round * 16 + i) * PAGE_SIZE, i + 1);
        }
        let stats = cowvm_vmm::stats::vm_sharing(clone.vm(), &host).expect("stats");
        assert_eq!(
            stats.pages.private, 16,
            "round {round}: only this round's pages are private"
        );
        assert_eq!(
            stats.smaps.anonymous_kib,
            16 * PAGE_SIZE / 1024,
            "round {round}: smaps agrees"
        );
        assert!(
            engine.recycle(clone, Some(room)),
            "round {round}: the pool wants it back"
        );
        assert!(engine.wait_recycled(WAIT));
    }
    assert_eq!(engine.recycle_stats().recycled, 5);
}

/// The pool hands out its shell whose RAM lies lowest in the address space (smaps, which stats
/// cross-check against, formats every mapping below the one asked about), whatever order the
/// shells came back in.
#[test]
fn test_the_pool_hands_out_the_shell_with_the_lowest_ram_first() {
    let engine = engine();
    let template = warm_template(&engine, 2);
    let _hold = engine.pause_building();
    let mut room = engine.reserve(2, Some(&template)).expect("room");
    let mut batch = engine.spawn_reserved(&template, &mut room, &|| false).expect("spawn");
    let mut rooms: Vec<_> = (0..2).map(|_| room.split_one().expect("room for one")).collect();
    batch.clones.sort_by_key(|c| c.vm().ram().host_address());
    let high = batch.clones.pop().expect("clone");
    let low = batch.clones.pop().expect("clone");
    let lowest = low.vm().ram().host_address();
    assert!(lowest < high.vm().ram().host_address());
    // The lower one goes back first, so it ends up below the other in the pool's list.
    assert!(engine.recycle(low, rooms.pop()));
    assert!(engine.wait_recycled(WAIT));
    assert!(engine.recycle(high, rooms.pop()));
    assert!(engine.wait_recycled(WAIT));
    assert_eq!(engine.warm_shells(&template), 2);
    let next = engine.spawn_idle(&template).expect("take a shell");
    assert_eq!(next.vm().ram().host_address(), lowest, "the lowest shell comes first");
    let mut room = engine.reserve(1, Some(&template)).expect("room");
    let taken = engine.spawn_reserved(&template, &mut room, &|| false).expect("spawn");
    assert!(taken.clones[0].vm().ram().host_address() > lowest, "then the other one");
}
