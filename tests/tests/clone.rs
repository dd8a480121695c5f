//! The clone engine on real KVM: isolation between clones, unique identities, reset, live fork,
//! layered templates and partial failure.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use cowvm_tests::{
    guest_read as read, guest_write as write, kvm, pagemap, private_pages, template_with_data, DEADLINE,
};
use cowvm_vmm::memory::PAGE_SIZE;
use cowvm_vmm::{CloneEngine, CloneError, EngineConfig, GuestCommand, Template, Vm, VmConfig};
use vm_memory::GuestAddress;

const MIB: u64 = 1 << 20;

fn engine() -> CloneEngine {
    CloneEngine::new(Arc::new(kvm()), EngineConfig::default()).expect("engine")
}

fn page(gpa: u64) -> usize {
    (gpa / PAGE_SIZE) as usize
}

#[test]
fn test_clones_read_the_template_and_a_write_in_one_is_invisible_to_the_template_and_the_others() {
    let engine = engine();
    let x = 8 * MIB;
    let template = Arc::new(template_with_data(engine.kvm(), 64, &[x]));
    let mut batch = engine.spawn(&template, 3).expect("spawn");
    assert!(batch.failed.is_empty(), "{:?}", batch.failed);
    for clone in &mut batch.clones {
        assert_eq!(read(clone.vm_mut(), x), x | 0xfeed, "clone reads the template's data");
    }
    write(batch.clones[0].vm_mut(), x, 7);
    assert_eq!(read(batch.clones[0].vm_mut(), x), 7);
    for clone in &mut batch.clones[1..] {
        assert_eq!(read(clone.vm_mut(), x), x | 0xfeed, "other clones do not see the write");
        let entry = pagemap(clone.vm().ram())[page(x)];
        assert!(
            entry.file_or_shared(),
            "other clones still map the template page: {entry:?}"
        );
        assert!(private_pages(clone.vm().ram()).is_empty());
    }
    let view = template.memory().base().map_read_only().expect("view");
    assert_eq!(
        view.read_u64(x),
        Some(x | 0xfeed),
        "the template does not see the write"
    );
    assert_eq!(private_pages(batch.clones[0].vm().ram()), vec![x / PAGE_SIZE]);
    assert!(batch.clones.iter().all(|c| c.spawn_us() > 0.0));
}

#[test]
fn test_100_clones_report_100_distinct_seeds_and_generation_ids() {
    let engine = engine();
    let template = Arc::new(template_with_data(engine.kvm(), 64, &[]));
    engine.keep_warm(&template, 50);
    let mut batch = engine.spawn(&template, 100).expect("spawn");
    assert!(batch.failed.is_empty(), "{:?}", batch.failed);
    let mut generations = HashSet::new();
    let mut seeds = HashSet::new();
    for clone in &mut batch.clones {
        let (generation, seed) = (clone.generation(), clone.seed());
        let out = clone
            .vm_mut()
            .execute(GuestCommand::Identity, DEADLINE)
            .expect("identity");
        assert_eq!(
            (out.result, out.extra),
            (generation, seed),
            "the guest reports what it was given"
        );
        generations.insert(out.result);
        seeds.insert(out.extra);
    }
    assert_eq!(generations.len(), 100);
    assert_eq!(seeds.len(), 100);
    for clone in batch.clones {
        engine.destroy(clone);
    }
}

#[test]
fn test_reset_drops_private_pages_and_restores_registers() {
    let engine = engine();
    let data = [8 * MIB, 8 * MIB + PAGE_SIZE, 20 * MIB];
    let template = Arc::new(template_with_data(engine.kvm(), 64, &data));
    let mut clone = engine
        .spawn(&template, 1)
        .expect("spawn")
        .clones
        .pop()
        .expect("one clone");
    let before = (clone.generation(), clone.seed());
    for (i, &gpa) in data.iter().chain(&[30 * MIB, 31 * MIB]).enumerate() {
        write(clone.vm_mut(), gpa, i as u64);
    }
    assert_eq!(private_pages(clone.vm().ram()).len(), 5);

    let report = engine.reset(&mut clone).expect("reset");
    assert_eq!(report.pages_dropped, 5);
    assert!(
        private_pages(clone.vm().ram()).is_empty(),
        "pagemap shows no private page after reset"
    );
    let regs = clone.vm_mut().vcpu_mut().regs().expect("regs");
    let saved = &template.state().vcpus[0].regs;
    assert_eq!(
        (regs.rip, regs.rax, regs.rbx, regs.rcx, regs.rdi, regs.rsi),
        (saved.rip, saved.rax, saved.rbx, saved.rcx, saved.rdi, saved.rsi)
    );
    assert_eq!(
        (regs.r14, regs.r15),
        (report.generation, report.seed),
        "new identity staged"
    );
    assert_ne!((report.generation, report.seed), before);

    for &gpa in &data {
        assert_eq!(
            read(clone.vm_mut(), gpa),
            gpa | 0xfeed,
            "reset clone sees the template's data"
        );
    }
    assert_eq!(read(clone.vm_mut(), 30 * MIB), 0);
    let out = clone
        .vm_mut()
        .execute(GuestCommand::Identity, DEADLINE)
        .expect("identity");
    assert_eq!((out.result, out.extra), (report.generation, report.seed));
}

#[test]
fn test_reset_clone_runs_like_a_new_clone() {
    let engine = engine();
    let template = Arc::new(template_with_data(engine.kvm(), 64, &[8 * MIB, 9 * MIB]));
    let mut batch = engine.spawn(&template, 2).expect("spawn");
    let (used, fresh) = batch.clones.split_at_mut(1);
    let (used, fresh) = (&mut used[0], &mut fresh[0]);
    write(used.vm_mut(), 8 * MIB, 1);
    write(used.vm_mut(), 12 * MIB, 1);
    engine.reset(used).expect("reset");
    let all = GuestCommand::Checksum {
        start: GuestAddress(0),
        count: 64 * MIB / PAGE_SIZE,
        stride: PAGE_SIZE,
    };
    let a = used.vm_mut().execute(all, DEADLINE).expect("used");
    let b = fresh.vm_mut().execute(all, DEADLINE).expect("fresh");
    assert_eq!(a, b);
    assert!(private_pages(used.vm().ram()).is_empty());
}

#[test]
fn test_live_fork_parent_and_child_continue_independently_from_the_same_state() {
    let engine = engine();
    let (mut parent, _) = Vm::boot(engine.kvm(), &VmConfig::builtin(64)).expect("boot");
    let x = 8 * MIB;
    write(&mut parent, x, 11);
    parent.set_identity(5, 55).expect("identity");
    let fork = engine.live_fork(&mut parent, 2).expect("live fork");
    assert!(fork.batch.failed.is_empty(), "{:?}", fork.batch.failed);
    assert!(fork.pause_us > 0.0);
    let mut children = fork.batch.clones;

    assert_eq!(read(&mut parent, x), 11);
    assert_eq!(
        read(children[0].vm_mut(), x),
        11,
        "child starts from the parent's memory"
    );
    write(&mut parent, x, 12);
    write(children[0].vm_mut(), x, 13);
    assert_eq!(read(&mut parent, x), 12);
    assert_eq!(read(children[0].vm_mut(), x), 13);
    assert_eq!(read(children[1].vm_mut(), x), 11, "a sibling sees neither write");
    let parent_id = parent.execute(GuestCommand::Identity, DEADLINE).expect("identity");
    assert_eq!(
        (parent_id.result, parent_id.extra),
        (5, 55),
        "the parent keeps its identity"
    );

    // The parent now runs on a private view: forking it again makes a layered template.
    let again = engine.live_fork(&mut parent, 1).expect("second live fork");
    assert_eq!(again.template.memory().depth(), 2);
    assert_eq!(
        again.template.memory().overlay_runs(),
        1,
        "only the parent's one private page was copied"
    );
    let mut grandchild = again.batch.clones.into_iter().next().expect("child");
    assert_eq!(
        read(grandchild.vm_mut(), x),
        12,
        "the second fork sees the parent's later write"
    );
    assert!(
        pagemap(grandchild.vm().ram())[page(x)].file_or_shared(),
        "served from the overlay memfd"
    );
    assert!(private_pages(grandchild.vm().ram()).is_empty());
}

#[test]
fn test_freezing_a_clone_makes_a_layered_template_that_copies_only_its_private_pages() {
    let engine = engine();
    let base = Arc::new(template_with_data(engine.kvm(), 64, &[8 * MIB]));
    let mut clone = engine.spawn(&base, 1).expect("spawn").clones.pop().expect("clone");
    write(clone.vm_mut(), 9 * MIB, 99);
    write(clone.vm_mut(), 9 * MIB + PAGE_SIZE, 98);
    let layered = Arc::new(Template::freeze(engine.kvm(), clone.vm_mut()).expect("freeze clone"));
    assert_eq!(layered.memory().depth(), 2);
    assert_eq!(
        layered.memory().overlay_runs(),
        1,
        "two adjacent private pages make one run"
    );
    let mut child = engine.spawn(&layered, 1).expect("spawn").clones.pop().expect("child");
    assert_eq!(read(child.vm_mut(), 8 * MIB), (8 * MIB) | 0xfeed, "base layer");
    assert_eq!(read(child.vm_mut(), 9 * MIB), 99, "overlay layer");
    assert_eq!(read(child.vm_mut(), 9 * MIB + PAGE_SIZE), 98);
    write(child.vm_mut(), 9 * MIB, 1);
    engine.reset(&mut child).expect("reset layered clone");
    assert_eq!(read(child.vm_mut(), 9 * MIB), 99, "reset refills from the overlay");
    assert_eq!(read(clone.vm_mut(), 9 * MIB), 99, "the frozen clone keeps running");
}

#[test]
fn test_absurd_clone_counts_are_refused() {
    let engine = engine();
    let template = Arc::new(template_with_data(engine.kvm(), 16, &[]));
    let limit = engine.config().max_clones_per_call;
    assert!(matches!(
        engine.spawn(&template, limit + 1),
        Err(CloneError::TooMany { .. })
    ));
    assert!(matches!(
        engine.spawn(&template, usize::MAX),
        Err(CloneError::TooMany { .. })
    ));
}

#[test]
fn test_clones_of_a_spinning_template_fail_with_the_reason_and_leave_nothing() {
    let config = EngineConfig {
        first_run_deadline: Duration::from_millis(100),
        ..EngineConfig::default()
    };
    let engine = CloneEngine::new(Arc::new(kvm()), config).expect("engine");
    let (mut vm, _) = Vm::boot(engine.kvm(), &VmConfig::builtin(16)).expect("boot");
    let spin = vm.execute(GuestCommand::Spin, Some(Duration::from_millis(50)));
    assert!(spin.is_err(), "the guest spins");
    let template = Arc::new(Template::freeze(engine.kvm(), &mut vm).expect("freeze spinning guest"));
    let batch = engine.spawn(&template, 3).expect("spawn");
    assert!(batch.clones.is_empty());
    assert_eq!(batch.failed.len(), 3);
    assert!(
        batch.failed[0].reason.contains("still running"),
        "{}",
        batch.failed[0].reason
    );
    assert!(
        batch.failed[2].reason.contains("not attempted"),
        "{}",
        batch.failed[2].reason
    );
}

#[test]
fn test_clones_from_warm_shells_start_with_no_private_pages() {
    let engine = engine();
    let template = Arc::new(template_with_data(engine.kvm(), 64, &[8 * MIB]));
    engine.keep_warm(&template, 5);
    assert!(
        engine.wait_for_shells(&template, 5, Duration::from_secs(30)),
        "{:?}",
        engine.pool_error(&template)
    );
    engine.keep_warm(&template, 0);
    let mut batch = engine.spawn(&template, 5).expect("spawn");
    for clone in &mut batch.clones {
        assert!(clone.pooled(), "came from a warm shell");
        assert!(
            private_pages(clone.vm().ram()).is_empty(),
            "the rehearsal left no copied page"
        );
        assert_eq!(read(clone.vm_mut(), 8 * MIB), (8 * MIB) | 0xfeed);
    }
}

#[test]
fn test_warm_shell_rehearsal_leaves_no_trace_in_memory_or_registers() {
    use cowvm_tests::{tiny_elf, write_temp_kernel};
    // start: mov rax, [0x300000]; inc rax; mov [0x300000], rax; out 0x80, al; jmp start
    let code = [
        0x48, 0x8b, 0x04, 0x25, 0x00, 0x00, 0x30, 0x00, 0x48, 0xff, 0xc0, 0x48, 0x89, 0x04, 0x25, 0x00, 0x00, 0x30,
        0x00, 0xe6, 0x80, 0xeb, 0xe9,
    ];
    let (image, _) = tiny_elf(&code);
    let path = write_temp_kernel("counter", &image);
    let engine = engine();
    let config = VmConfig {
        kernel: cowvm_vmm::Kernel::Elf(path.clone()),
        ..VmConfig::builtin(16)
    };
    let (mut vm, report) = Vm::boot(engine.kvm(), &config).expect("boot counter kernel");
    std::fs::remove_file(path).ok();
    assert_eq!(
        report.first_exit,
        cowvm_vmm::GuestExit::IoOut {
            port: 0x80,
            size: 1,
            value: 1
        }
    );
    let template = Arc::new(Template::freeze(engine.kvm(), &mut vm).expect("freeze"));
    engine.keep_warm(&template, 1);
    assert!(
        engine.wait_for_shells(&template, 1, Duration::from_secs(30)),
        "{:?}",
        engine.pool_error(&template)
    );
    let clone = engine.spawn(&template, 1).expect("spawn").clones.pop().expect("clone");
    assert!(clone.pooled());
    // The template holds 1; the rehearsal's increment was dropped, the clone's own run made it 2.
    assert_eq!(clone.vm().read_u64(GuestAddress(0x30_0000)).expect("read"), 2);
    assert_eq!(private_pages(clone.vm().ram()), vec![0x300]);
}
