//! Freezing a clone into a layered template: the copy of its private pages goes through a
//! bounded buffer, and the layer limit is checked before anything is copied. Both are observed
//! in the process's peak resident memory (`VmHWM`, reset through `/proc/self/clear_refs`).

use std::sync::{Mutex, MutexGuard};

use cowvm_tests::{guest_read as read, kvm, DEADLINE};
use cowvm_vmm::memory::{MAX_TEMPLATE_LAYERS, PAGE_SIZE};
use cowvm_vmm::{GuestCommand, MemoryError, Template, Vm, VmConfig, VmError};
use vm_memory::GuestAddress;

const MIB: u64 = 1 << 20;
/// The contiguous run each test writes: 32 MiB from 16 MiB.
const RUN_START: u64 = 16 * MIB;
const RUN_MIB: u64 = 32;
/// Peak memory a freeze may add; a buffer the size of the run would add 32 MiB.
const PEAK_ALLOWANCE_KIB: u64 = 16 * 1024;

/// The tests measure this process's peak memory, so they run one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.trim().strip_suffix("kB")?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status"))
}

/// Runs `f` and returns its result with how far it raised the peak resident memory above the
/// resident memory at the start.
fn peak_growth_kib<T>(f: impl FnOnce() -> T) -> (T, u64) {
    std::fs::write("/proc/self/clear_refs", "5").expect("reset VmHWM through /proc/self/clear_refs");
    let before = status_kib("VmRSS:");
    let out = f();
    (out, status_kib("VmHWM:").saturating_sub(before))
}

/// Has the guest write `value_of(mib)` into every page of each MiB of the run: the run becomes
/// one contiguous range of private copies.
fn write_run(vm: &mut Vm, value_of: impl Fn(u64) -> u64) {
    for mib in 0..RUN_MIB {
        let write = GuestCommand::Write {
            start: GuestAddress(RUN_START + mib * MIB),
            count: MIB / PAGE_SIZE,
            stride: PAGE_SIZE,
            value: value_of(mib),
        };
        vm.execute(write, DEADLINE).expect("guest write");
    }
}

#[test]
fn test_freezing_a_run_larger_than_the_copy_chunk_copies_it_whole_with_a_bounded_buffer() {
    let _serial = serial();
    let kvm = kvm();
    let (mut vm, _) = Vm::boot(&kvm, &VmConfig::builtin(64)).expect("boot");
    let base = Template::freeze(&kvm, &mut vm).expect("freeze base");
    let mut clone = Vm::restore(&kvm, base.memory(), base.state()).expect("restore");
    write_run(&mut clone, |mib| 0x5000 + mib);

    let (layered, growth) = peak_growth_kib(|| Template::freeze(&kvm, &mut clone));
    let layered = layered.expect("freeze the clone");
    assert_eq!(
        layered.memory().overlay_runs(),
        1,
        "one contiguous run of {RUN_MIB} MiB"
    );
    assert!(
        growth < PEAK_ALLOWANCE_KIB,
        "freezing a {RUN_MIB} MiB run raised peak memory by {growth} KiB"
    );
    let mut child = Vm::restore(&kvm, layered.memory(), layered.state()).expect("restore child");
    for mib in 0..RUN_MIB {
        let first = RUN_START + mib * MIB;
        let last = first + MIB - PAGE_SIZE;
        assert_eq!(read(&mut child, first), 0x5000 + mib, "first page of MiB {mib}");
        assert_eq!(read(&mut child, last), 0x5000 + mib, "last page of MiB {mib}");
    }
}

#[test]
fn test_a_freeze_past_the_layer_limit_fails_before_copying_anything() {
    let _serial = serial();
    let kvm = kvm();
    let (mut vm, _) = Vm::boot(&kvm, &VmConfig::builtin(64)).expect("boot");
    let mut template = Template::freeze(&kvm, &mut vm).expect("freeze base");
    for layer in 1..MAX_TEMPLATE_LAYERS as u64 {
        let mut clone = Vm::restore(&kvm, template.memory(), template.state()).expect("restore");
        cowvm_tests::guest_write(&mut clone, 8 * MIB + layer * PAGE_SIZE, layer);
        template = Template::freeze(&kvm, &mut clone).expect("freeze a layer");
    }
    assert_eq!(template.memory().depth(), MAX_TEMPLATE_LAYERS);

    let mut clone = Vm::restore(&kvm, template.memory(), template.state()).expect("restore");
    write_run(&mut clone, |_| 1);
    let (refused, growth) = peak_growth_kib(|| Template::freeze(&kvm, &mut clone));
    assert!(
        matches!(refused, Err(VmError::Memory(MemoryError::TooFragmented { layers, .. })) if layers == MAX_TEMPLATE_LAYERS + 1),
        "{:?}",
        refused.err()
    );
    assert!(
        growth < PEAK_ALLOWANCE_KIB,
        "a refused freeze raised peak memory by {growth} KiB: it copied before checking the limit"
    );
}
