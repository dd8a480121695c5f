//! VMs with several vCPUs on real /dev/kvm: every vCPU runs the built-in guest's command loop on
//! its own host thread, knows its own index (read from its GS base), and keeps its own state
//! through freeze, clone, reset, live fork and persistence; a fault on one vCPU stops the others
//! and marks the VM failed.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cowvm_tests::kvm;
use cowvm_vmm::command::expected_checksum;
use cowvm_vmm::persist::{self, PersistError};
use cowvm_vmm::{CloneEngine, CommandOutput, EngineConfig, GuestCommand, GuestExit, Template, Vm, VmConfig, VmError};
use serde_json::Value;
use vm_memory::GuestAddress;

const MIB: u64 = 1 << 20;
const VCPUS: usize = 4;
/// Pages each vCPU writes in its own region.
const PAGES: u64 = 32;
/// A guard against a hang, not a verdict: every run here finishes in milliseconds.
const HANG_GUARD: Option<Duration> = Some(Duration::from_secs(60));
const CRC: crc::Crc<u64> = crc::Crc::<u64>::new(&crc::CRC_64_XZ);

/// First byte of vCPU `vcpu`'s own region.
fn region(vcpu: usize) -> u64 {
    16 * MIB + vcpu as u64 * MIB
}

/// The value vCPU `vcpu` writes in round `tag`.
fn value(tag: u64, vcpu: usize) -> u64 {
    (tag << 8) | vcpu as u64
}

fn booted(vcpus: usize) -> Vm {
    let config = VmConfig {
        vcpus,
        ..VmConfig::builtin(64)
    };
    let (vm, report) = Vm::boot(&kvm(), &config).expect("boot");
    assert_eq!(report.first_exit, GuestExit::Done { status: 0 }, "every vCPU booted");
    assert_eq!(vm.vcpu_count(), vcpus);
    vm
}

/// Runs `command(vcpu)` on every vCPU at once and returns the answers in vCPU order.
fn on_every_vcpu(vm: &mut Vm, command: impl Fn(usize) -> GuestCommand) -> Vec<CommandOutput> {
    let commands: Vec<(usize, GuestCommand)> = (0..vm.vcpu_count()).map(|i| (i, command(i))).collect();
    vm.execute_concurrently(&commands, HANG_GUARD)
        .expect("accepted")
        .into_iter()
        .enumerate()
        .map(|(i, out)| {
            let out = out.unwrap_or_else(|e| panic!("vCPU {i}: {e}"));
            assert_eq!(out.status, 0, "vCPU {i}");
            out
        })
        .collect()
}

/// Every vCPU writes `value(tag, vcpu)` into the first qword of each page of its own region.
fn write_own_pages(vm: &mut Vm, tag: u64) {
    on_every_vcpu(vm, |i| GuestCommand::Write {
        start: GuestAddress(region(i)),
        count: PAGES,
        stride: 4096,
        value: value(tag, i),
    });
}

/// Every vCPU checksums its own region; the checksums, in vCPU order.
fn checksum_own_pages(vm: &mut Vm) -> Vec<u64> {
    on_every_vcpu(vm, |i| GuestCommand::Checksum {
        start: GuestAddress(region(i)),
        count: PAGES,
        stride: 4096,
    })
    .iter()
    .map(|out| out.result)
    .collect()
}

fn expected_own(tag: u64, vcpu: usize) -> u64 {
    expected_checksum(std::iter::repeat_n(value(tag, vcpu), PAGES as usize))
}

/// Asserts that every vCPU reports its own index and `generation`.
fn assert_identities(vm: &mut Vm, generation: u64) {
    for (i, out) in on_every_vcpu(vm, |_| GuestCommand::Identity).iter().enumerate() {
        assert_eq!(out.vcpu, Some(i as u64), "vCPU {i} reads its own index");
        assert_eq!(out.result, generation, "vCPU {i} got the clone's generation id");
    }
}

/// A frozen 4-vCPU template in which each vCPU wrote its own pages (round 1) and then
/// checksummed them, so each vCPU's rbx holds its own checksum.
fn four_vcpu_template() -> Template {
    let mut vm = booted(VCPUS);
    write_own_pages(&mut vm, 1);
    let sums = checksum_own_pages(&mut vm);
    for (i, sum) in sums.iter().enumerate() {
        assert_eq!(*sum, expected_own(1, i), "vCPU {i} wrote its own pages");
    }
    Template::freeze(&kvm(), &mut vm).expect("freeze")
}

/// Asserts that every vCPU of `vm` holds the registers `template` captured for it.
fn assert_vcpus_as_captured(vm: &mut Vm, template: &Template) {
    for (i, state) in template.state().vcpus.iter().enumerate() {
        let vcpu = vm.vcpu_at_mut(i).expect("vCPU");
        let regs = vcpu.regs().expect("regs");
        assert_eq!(regs.rip, state.regs.rip, "vCPU {i} rip");
        assert_eq!(regs.rsp, state.regs.rsp, "vCPU {i} has its own stack");
        assert_eq!(regs.rbx, state.regs.rbx, "vCPU {i} rbx (its own checksum)");
        assert_eq!(vcpu.sregs().expect("sregs").gs.base, i as u64, "vCPU {i} GS base");
    }
}

#[test]
fn test_four_vcpus_write_their_own_pages_and_each_of_ten_clones_resumes_every_vcpu_with_its_id_and_data() {
    let template = Arc::new(four_vcpu_template());
    let state = template.state();
    assert_eq!(state.vcpus.len(), VCPUS, "freeze captured every vCPU");
    for (i, vcpu) in state.vcpus.iter().enumerate() {
        assert_eq!(vcpu.regs.rbx, expected_own(1, i), "vCPU {i}'s own state was captured");
    }
    let stacks: std::collections::HashSet<u64> = state.vcpus.iter().map(|v| v.regs.rsp).collect();
    assert_eq!(stacks.len(), VCPUS, "each vCPU has its own stack");

    let engine = CloneEngine::new(Arc::new(kvm()), EngineConfig::default()).expect("engine");
    let batch = engine.spawn(&template, 10).expect("spawn");
    assert!(batch.failed.is_empty(), "{:?}", batch.failed);
    let mut clones = batch.clones;
    assert_eq!(clones.len(), 10);
    for (k, clone) in clones.iter_mut().enumerate() {
        let generation = clone.generation();
        let vm = clone.vm_mut();
        assert_eq!(vm.vcpu_count(), VCPUS);
        assert_vcpus_as_captured(vm, &template);
        assert_identities(vm, generation);
        let sums = checksum_own_pages(vm);
        for (i, sum) in sums.iter().enumerate() {
            assert_eq!(*sum, expected_own(1, i), "clone {k} vCPU {i} sees the template's data");
        }
        write_own_pages(vm, 100 + k as u64);
        let sums = checksum_own_pages(vm);
        for (i, sum) in sums.iter().enumerate() {
            assert_eq!(
                *sum,
                expected_own(100 + k as u64, i),
                "clone {k} vCPU {i} sees its own writes"
            );
        }
        let stats = vm.kvm_stats().expect("KVM stats");
        assert_eq!(stats.vcpus.len(), VCPUS, "KVM statistics of every vCPU");
        assert!(stats
            .vcpus
            .iter()
            .all(|v| v.get("exits").and_then(|s| s.value.scalar()).is_some_and(|n| n > 0)));
    }
    // No clone's writes reached another clone or the template.
    let mut fresh = engine.spawn(&template, 1).expect("spawn").clones.remove(0);
    let sums = checksum_own_pages(fresh.vm_mut());
    for (i, sum) in sums.iter().enumerate() {
        assert_eq!(*sum, expected_own(1, i), "the template is untouched (vCPU {i})");
    }
}

#[test]
fn test_a_fault_on_one_vcpu_marks_the_vm_failed_and_stops_its_other_vcpus() {
    let mut vm = booted(VCPUS);
    let commands = [
        (0, GuestCommand::Spin),
        (1, GuestCommand::Spin),
        (2, GuestCommand::TripleFault),
        (3, GuestCommand::Spin),
    ];
    let answers = vm.execute_concurrently(&commands, HANG_GUARD).expect("accepted");
    for (i, answer) in answers.iter().enumerate() {
        let expected = if i == 2 {
            GuestExit::Shutdown
        } else {
            GuestExit::Stopped { by_vcpu: 2 }
        };
        assert!(
            matches!(answer, Err(VmError::GuestStopped(exit)) if *exit == expected),
            "vCPU {i}: {answer:?}"
        );
    }
    let failure = vm.failure().expect("the VM is marked failed");
    assert_eq!((failure.vcpu, &failure.exit), (2, &GuestExit::Shutdown));
    for vcpu in 0..VCPUS {
        let refused = vm.execute_on(vcpu, GuestCommand::Identity, HANG_GUARD);
        assert!(matches!(refused, Err(VmError::Failed(_))), "vCPU {vcpu}: {refused:?}");
    }
}

#[test]
fn test_reset_in_place_and_by_swap_restore_every_vcpu_and_clear_a_failure() {
    let template = Arc::new(four_vcpu_template());
    let engine = CloneEngine::new(Arc::new(kvm()), EngineConfig::default()).expect("engine");
    let mut clone = engine.spawn(&template, 1).expect("spawn").clones.remove(0);

    write_own_pages(clone.vm_mut(), 7);
    checksum_own_pages(clone.vm_mut());
    let commands = [
        (0, GuestCommand::TripleFault),
        (1, GuestCommand::Spin),
        (3, GuestCommand::Spin),
    ];
    clone
        .vm_mut()
        .execute_concurrently(&commands, HANG_GUARD)
        .expect("accepted");
    assert!(clone.vm().failure().is_some(), "the clone failed");

    let report = engine.reset(&mut clone).expect("reset");
    assert!(report.pages_dropped >= VCPUS as u64 * PAGES, "{report:?}");
    assert!(clone.vm().failure().is_none(), "a reset clears the failure");
    assert_vcpus_as_captured(clone.vm_mut(), &template);
    let generation = clone.generation();
    assert_identities(clone.vm_mut(), generation);
    let sums = checksum_own_pages(clone.vm_mut());
    for (i, sum) in sums.iter().enumerate() {
        assert_eq!(*sum, expected_own(1, i), "vCPU {i}'s pages are the template's again");
    }

    engine.keep_warm(&template, 1);
    assert!(
        engine.wait_for_shells(&template, 1, Duration::from_secs(60)),
        "a warm shell of the 4-vCPU template"
    );
    write_own_pages(clone.vm_mut(), 8);
    let swapped = engine.reset_by_swap(&mut clone).expect("reset by swap");
    assert!(swapped.swapped, "{swapped:?}");
    assert_vcpus_as_captured(clone.vm_mut(), &template);
    let generation = clone.generation();
    assert_identities(clone.vm_mut(), generation);
    let sums = checksum_own_pages(clone.vm_mut());
    for (i, sum) in sums.iter().enumerate() {
        assert_eq!(*sum, expected_own(1, i), "vCPU {i} after the swap");
    }
    engine.retire(&template);
}

#[test]
fn test_live_fork_of_a_four_vcpu_vm_clones_every_vcpu() {
    let mut vm = booted(VCPUS);
    write_own_pages(&mut vm, 3);
    let engine = CloneEngine::new(Arc::new(kvm()), EngineConfig::default()).expect("engine");
    let mut fork = engine.live_fork(&mut vm, 2).expect("live fork");
    assert!(fork.batch.failed.is_empty(), "{:?}", fork.batch.failed);
    for clone in &mut fork.batch.clones {
        let generation = clone.generation();
        assert_identities(clone.vm_mut(), generation);
        let sums = checksum_own_pages(clone.vm_mut());
        for (i, sum) in sums.iter().enumerate() {
            assert_eq!(*sum, expected_own(3, i), "vCPU {i} of the fork");
        }
    }
    // The parent goes on with all its vCPUs.
    let sums = checksum_own_pages(&mut vm);
    assert_eq!(sums, (0..VCPUS).map(|i| expected_own(3, i)).collect::<Vec<_>>());
}

fn state_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cowvm-smp-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create state dir");
    dir
}

/// Rewrites a state file's header version and payload, with a correct payload checksum.
fn rewrite(path: &std::path::Path, version: u32, edit: impl FnOnce(&mut Value)) {
    let bytes = std::fs::read(path).expect("read");
    let mut payload: Value = serde_json::from_slice(&bytes[28..]).expect("payload");
    edit(&mut payload);
    let body = serde_json::to_vec(&payload).expect("encode");
    let mut out = bytes[..8].to_vec();
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&CRC.checksum(&body).to_le_bytes());
    out.extend_from_slice(&body);
    std::fs::write(path, out).expect("write");
}

#[test]
fn test_a_four_vcpu_template_is_saved_as_version_3_and_loads_back_with_every_vcpu() {
    let dir = state_dir("v3");
    let template = four_vcpu_template();
    persist::save(&dir, "smp-1", &template).expect("save");
    let state = persist::state_path(&dir, "smp-1");
    let bytes = std::fs::read(&state).expect("read");
    assert_eq!(u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes")), 3);

    let loaded = Arc::new(persist::load(&state).expect("load").template);
    let engine = CloneEngine::new(Arc::new(kvm()), EngineConfig::default()).expect("engine");
    let mut clone = engine.spawn(&loaded, 1).expect("spawn").clones.remove(0);
    assert_vcpus_as_captured(clone.vm_mut(), &loaded);
    let generation = clone.generation();
    assert_identities(clone.vm_mut(), generation);
    let sums = checksum_own_pages(clone.vm_mut());
    assert_eq!(sums, (0..VCPUS).map(|i| expected_own(1, i)).collect::<Vec<_>>());

    // An older version cannot hold more than one vCPU: such a file is refused, not half-loaded.
    rewrite(&state, 2, |_| {});
    let err = persist::load(&state).err().expect("refused");
    assert!(matches!(err, PersistError::Malformed { .. }), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn test_a_version_1_template_still_loads_and_its_clone_runs_on_one_vcpu() {
    let dir = state_dir("v1");
    let kvm = kvm();
    let (mut vm, _) = Vm::boot(&kvm, &VmConfig::builtin(16)).expect("boot");
    cowvm_tests::guest_write(&mut vm, 8 * MIB, 0xfeed);
    let template = Template::freeze(&kvm, &mut vm).expect("freeze");
    persist::save(&dir, "one-1", &template).expect("save");
    let memory = std::fs::read_dir(&dir)
        .expect("list")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "mem"))
        .expect("memory file");
    let file = std::fs::File::open(&memory).expect("open");
    let size = file.metadata().expect("stat").len();
    // Version 1's memory checksum: over the data extents, each prefixed by its offset.
    let mut digest = CRC.digest();
    for range in cowvm_vmm::memory::data_extents(&file, size).expect("extents") {
        digest.update(&range.start.to_le_bytes());
        let mut bytes = vec![0u8; (range.end - range.start) as usize];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut bytes, range.start).expect("read");
        digest.update(&bytes);
    }
    let v1_crc = digest.finalize();
    let state = persist::state_path(&dir, "one-1");
    rewrite(&state, 1, |p| p["memory_crc64"] = v1_crc.into());

    let loaded = Arc::new(persist::load(&state).expect("a version-1 file loads").template);
    assert_eq!(loaded.state().vcpus.len(), 1);
    let engine = CloneEngine::new(Arc::new(kvm), EngineConfig::default()).expect("engine");
    let mut clone = engine.spawn(&loaded, 1).expect("spawn").clones.remove(0);
    let generation = clone.generation();
    let vm = clone.vm_mut();
    assert_eq!(vm.vcpu_count(), 1);
    let identity = vm.execute(GuestCommand::Identity, HANG_GUARD).expect("identity");
    assert_eq!((identity.vcpu, identity.result), (Some(0), generation));
    assert_eq!(cowvm_tests::guest_read(vm, 8 * MIB), 0xfeed);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn test_commands_for_a_missing_or_repeated_vcpu_are_refused_before_anything_runs() {
    let mut vm = booted(2);
    assert!(matches!(
        vm.execute_on(2, GuestCommand::Exit, HANG_GUARD),
        Err(VmError::NoSuchVcpu { vcpu: 2, count: 2 })
    ));
    let twice = [(1, GuestCommand::Exit), (1, GuestCommand::Identity)];
    assert!(matches!(
        vm.execute_concurrently(&twice, HANG_GUARD),
        Err(VmError::DuplicateVcpu { vcpu: 1 })
    ));
    let too_many = VmConfig {
        vcpus: cowvm_vmm::boot::layout::MAX_VCPUS + 1,
        ..VmConfig::builtin(16)
    };
    assert!(matches!(Vm::boot(&kvm(), &too_many), Err(VmError::VcpuCount { .. })));
    assert!(vm.failure().is_none(), "nothing ran, nothing failed");
    assert_eq!(
        vm.execute_on(1, GuestCommand::Identity, HANG_GUARD)
            .expect("identity")
            .vcpu,
        Some(1)
    );
}

#[test]
fn test_a_clone_from_an_old_shell_starts_every_vcpu_tsc_together() {
    let template = Arc::new(four_vcpu_template());
    if template.state().vcpus[0].tsc().is_none() {
        eprintln!("skipped: this host does not save the guest TSC");
        return;
    }
    let engine = CloneEngine::new(Arc::new(kvm()), EngineConfig::default()).expect("engine");
    engine.keep_warm(&template, 1);
    assert!(
        engine.wait_for_shells(&template, 1, Duration::from_secs(60)),
        "a warm shell"
    );
    // Older than KVM's TSC resynchronisation window, so taking it rewrites the TSCs.
    std::thread::sleep(cowvm_vmm::vm::TSC_RESYNC_WINDOW + Duration::from_millis(200));
    let mut clone = engine.spawn(&template, 1).expect("spawn").clones.remove(0);
    assert!(clone.pooled(), "the clone came from the old shell");
    let vm = clone.vm_mut();
    on_every_vcpu(vm, |_| GuestCommand::Exit);
    let hz = u64::from(vm.vcpu().tsc_khz().expect("KVM_GET_TSC_KHZ")) * 1000;
    let tsc0 = vm.vcpu().tsc().expect("TSC of vCPU 0");
    let captured = template.state().vcpus[0].tsc().unwrap_or_default();
    if tsc0.abs_diff(captured) > hz / 2 {
        eprintln!("skipped: this host's KVM does not keep a TSC written by the VMM (vCPU 0 reads {tsc0}, {captured} was written)");
        return;
    }
    for i in 1..VCPUS {
        let tsc = vm.vcpu_at(i).expect("vCPU").tsc().expect("TSC");
        // Left at the shell's value, a vCPU's TSC would be ahead by the shell's age (over a
        // second); started with vCPU 0's they differ by the few ioctls between the reads.
        let apart = tsc.abs_diff(tsc0);
        assert!(
            apart < hz / 2,
            "vCPU {i}'s TSC is {apart} ticks from vCPU 0's ({hz} Hz)"
        );
    }
    engine.retire(&template);
}
