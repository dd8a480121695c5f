//! Lazy memory slots: a clone starts with slots only for the chunks of RAM that hold data, and its
//! first access anywhere else exits to the VMM, which completes it from the host mapping and adds
//! a slot. Whatever the guest does, the results, the memory and the host's copy-on-write must be
//! the same as with one eager slot over all of RAM; and a clone's kernel memory must not grow
//! with the RAM it never touches.

use std::sync::Arc;

use cowvm_tests::{private_pages, tiny_elf, write_temp_kernel, DEADLINE};
use cowvm_vmm::host::MemorySnapshot;
use cowvm_vmm::memory::PAGE_SIZE;
use cowvm_vmm::slots::{SlotPolicy, DEFAULT_CHUNK};
use cowvm_vmm::{CloneEngine, EngineConfig, GuestCommand, GuestExit, Kernel, Kvm, Template, Vm, VmConfig};
use vm_memory::{Bytes, GuestAddress};

const MIB: u64 = 1 << 20;
const CHUNK: u64 = DEFAULT_CHUNK;

fn kvm() -> Kvm {
    cowvm_tests::kvm()
}

/// Both kinds of clone of one template.
fn clone_pair(kvm: &Kvm, template: &Template) -> (Vm, Vm) {
    let restore = |policy| Vm::restore_with(kvm, template.memory(), template.state(), policy).expect("restore");
    let lazy = restore(SlotPolicy::Lazy);
    let eager = restore(SlotPolicy::Eager);
    assert_eq!(lazy.slot_stats().policy, SlotPolicy::Lazy, "{:?}", lazy.slot_fallback());
    assert_eq!(eager.slot_stats().slots, 1);
    (lazy, eager)
}

fn write(start: u64, count: u64, stride: u64, value: u64) -> GuestCommand {
    GuestCommand::Write {
        start: GuestAddress(start),
        count,
        stride,
        value,
    }
}

fn checksum(start: u64, count: u64, stride: u64) -> GuestCommand {
    GuestCommand::Checksum {
        start: GuestAddress(start),
        count,
        stride,
    }
}

fn host_bytes(vm: &Vm, range: std::ops::Range<u64>) -> Vec<u8> {
    let mut bytes = vec![0u8; (range.end - range.start) as usize];
    vm.ram()
        .guest_memory()
        .read_slice(&mut bytes, GuestAddress(range.start))
        .expect("host read");
    bytes
}

#[test]
fn test_reads_and_writes_to_untouched_ram_across_chunks_and_at_the_last_page_match_eager_slots() {
    let kvm = kvm();
    let size = 64 * MIB;
    let template = cowvm_tests::template_with_data(&kvm, 64, &[8 * MIB, 8 * MIB + PAGE_SIZE]);
    let (mut lazy, mut eager) = clone_pair(&kvm, &template);
    let slots_at_start = lazy.slot_stats().slots;
    let last = size - 8;
    let commands = [
        // Reads of never-touched chunks (zeros), one spanning the boundary of chunks 5 and 6.
        checksum(6 * CHUNK - 64, 16, 8),
        checksum(20 * CHUNK, 4, PAGE_SIZE),
        // Writes first into untouched chunks, across the 9/10 boundary, then read back.
        write(10 * CHUNK - 16, 4, 8, 0x1111_2222_3333_4444),
        checksum(10 * CHUNK - 16, 4, 8),
        // A chunk that was only read, now written (it has a slot by now).
        write(6 * CHUNK - 64, 16, 8, 7),
        checksum(6 * CHUNK - 128, 32, 8),
        // The template's data next to untouched memory.
        checksum(8 * MIB, 2, PAGE_SIZE),
        write(8 * MIB, 3, PAGE_SIZE, 9),
        // The last qword of RAM: read, write, read.
        checksum(last, 1, 8),
        write(last, 1, 8, 0xabcd_ef01),
        checksum(last, 1, 8),
        // A stride that walks through many chunks at once.
        write(12 * MIB, 16, 3 * MIB - 8 * 37, 5),
        checksum(12 * MIB, 16, 3 * MIB - 8 * 37),
    ];
    for command in commands {
        let a = lazy.execute(command, DEADLINE).expect("lazy clone");
        let b = eager.execute(command, DEADLINE).expect("eager clone");
        assert_eq!(a, b, "{command:?}");
    }
    let stats = lazy.slot_stats();
    assert!(
        stats.lazy_fills > 0 && stats.slots > slots_at_start,
        "the lazy clone added slots on the way: {stats:?}"
    );
    assert!(stats.slotted_bytes < size, "{stats:?}");
    for range in [
        6 * CHUNK - 128..6 * CHUNK + 128,
        10 * CHUNK - 64..10 * CHUNK + 64,
        8 * MIB..8 * MIB + 3 * PAGE_SIZE,
        size - PAGE_SIZE..size,
    ] {
        assert_eq!(
            host_bytes(&lazy, range.clone()),
            host_bytes(&eager, range.clone()),
            "{range:x?}"
        );
    }
    assert_eq!(
        private_pages(lazy.ram()),
        private_pages(eager.ram()),
        "the host copied the same pages on write"
    );
    assert!(private_pages(lazy.ram()).contains(&(last / PAGE_SIZE)));
    assert!(
        !private_pages(lazy.ram()).contains(&(20 * CHUNK / PAGE_SIZE)),
        "a read copies nothing"
    );
}

/// `rep movsq` (with rsi, rdi, rcx from the VMM), then `out 0x80, al`, then back to the start.
const REP_MOVS_KERNEL: [u8; 7] = [0xf3, 0x48, 0xa5, 0xe6, 0x80, 0xeb, 0xf9];

fn run_rep_movs(vm: &mut Vm, from: u64, to: u64, qwords: u64) -> (u64, u64, u64) {
    let vcpu = vm.vcpu_mut();
    let mut regs = vcpu.regs().expect("regs");
    (regs.rsi, regs.rdi, regs.rcx) = (from, to, qwords);
    vcpu.set_regs(&regs).expect("set regs");
    let exit = vm.run(DEADLINE).expect("run");
    assert_eq!(
        exit,
        GuestExit::IoOut {
            port: 0x80,
            size: 1,
            value: exit_value(&exit)
        }
    );
    let regs = vm.vcpu_mut().regs().expect("regs");
    (regs.rsi, regs.rdi, regs.rcx)
}

fn exit_value(exit: &GuestExit) -> u32 {
    match exit {
        GuestExit::IoOut { value, .. } => *value,
        other => panic!("guest stopped: {other}"),
    }
}

#[test]
fn test_rep_movs_spanning_two_chunks_copies_the_same_bytes_as_with_eager_slots() {
    let kvm = kvm();
    let (image, _) = tiny_elf(&REP_MOVS_KERNEL);
    let path = write_temp_kernel("rep-movs", &image);
    let config = VmConfig {
        kernel: Kernel::Elf(path.clone()),
        ..VmConfig::builtin(32)
    };
    let (mut vm, report) = Vm::boot(&kvm, &config).expect("boot rep movs kernel");
    std::fs::remove_file(path).ok();
    assert!(matches!(report.first_exit, GuestExit::IoOut { port: 0x80, .. }));
    // The source's first half is template data at the end of chunk 2; its second half lies in
    // chunk 3, which the template never touched.
    let source = 3 * CHUNK - 2048;
    let pattern: Vec<u8> = (0..2048u32).map(|i| (i * 7 + 3) as u8).collect();
    vm.ram()
        .guest_memory()
        .write_slice(&pattern, GuestAddress(source))
        .expect("host write");
    let template = Template::freeze(&kvm, &mut vm).expect("freeze");
    let (mut lazy, mut eager) = clone_pair(&kvm, &template);
    assert!(lazy.slot_stats().slots > 0);

    // Into chunks 5 and 6, neither of which has a slot.
    let dest = 6 * CHUNK - 2048;
    let a = run_rep_movs(&mut lazy, source, dest, 512);
    let b = run_rep_movs(&mut eager, source, dest, 512);
    assert_eq!(a, b, "rsi, rdi, rcx after the copy");
    assert_eq!(a, (source + 4096, dest + 4096, 0));
    let copied = host_bytes(&lazy, dest..dest + 4096);
    assert_eq!(copied, host_bytes(&eager, dest..dest + 4096));
    assert_eq!(&copied[..2048], &pattern[..]);
    assert!(copied[2048..].iter().all(|&b| b == 0));
    // And back over the end of RAM's last chunk, whose last page is the destination's end.
    let end = 32 * MIB;
    let a = run_rep_movs(&mut lazy, dest, end - 4096, 512);
    let b = run_rep_movs(&mut eager, dest, end - 4096, 512);
    assert_eq!(a, b);
    assert_eq!(host_bytes(&lazy, end - 4096..end), copied);
    assert_eq!(host_bytes(&eager, end - 4096..end), copied);
    assert_eq!(private_pages(lazy.ram()), private_pages(eager.ram()));
    assert!(lazy.slot_stats().lazy_fills > 0, "{:?}", lazy.slot_stats());
}

/// Kernel memory per clone (`/proc/meminfo`: slab, vmalloc, page tables, kernel stacks) of
/// `clones` clones of `template` that each write 1 MiB (256 pages) of RAM no one touched before.
fn kernel_kib_per_clone(engine: &CloneEngine, template: &Arc<Template>, clones: usize) -> (f64, Vec<cowvm_vmm::Clone>) {
    engine.flush();
    let before = MemorySnapshot::take().expect("meminfo");
    let mut batch = engine.spawn(template, clones).expect("spawn");
    assert!(batch.failed.is_empty(), "{:?}", batch.failed.first().map(|f| &f.reason));
    for (i, clone) in batch.clones.iter_mut().enumerate() {
        let start = (1 << 30) + i as u64 * 3 * MIB;
        clone
            .vm_mut()
            .execute(write(start, 256, PAGE_SIZE, 1), DEADLINE)
            .expect("touch 1 MiB");
    }
    let after = MemorySnapshot::take().expect("meminfo");
    let delta = after.since(&before);
    (delta.kernel_kib as f64 / clones as f64, batch.clones)
}

#[test]
fn test_a_clone_of_a_4_gib_template_that_touches_1_mib_holds_at_most_1_mib_of_kernel_memory() {
    let engine = CloneEngine::new(Arc::new(kvm()), EngineConfig::default()).expect("engine");
    let template = Arc::new(cowvm_tests::template_with_data(engine.kvm(), 4096, &[8 * MIB]));
    // /proc/meminfo is the whole host's: take the median of three rounds of 32 clones each, and
    // keep every clone alive until the end so no round sees another's memory freed.
    let mut rounds = Vec::new();
    let mut alive = Vec::new();
    for _ in 0..3 {
        let (per_clone, clones) = kernel_kib_per_clone(&engine, &template, 32);
        rounds.push(per_clone);
        alive.extend(clones);
    }
    rounds.sort_by(f64::total_cmp);
    let median = rounds[1];
    let slots = alive[0].vm().slot_stats();
    for clone in alive {
        engine.destroy(clone);
    }
    engine.flush();
    eprintln!("kernel memory per clone: median {median:.0} KiB of rounds {rounds:?}; slots {slots:?}");
    assert!(
        median <= 1024.0,
        "kernel memory per clone {median:.0} KiB (rounds {rounds:?}), slots {slots:?}"
    );
    assert!(slots.slotted_bytes <= 8 * CHUNK, "{slots:?}");
}

/// Code in a chunk that has data but too little for a slot at start: KVM cannot hand an
/// instruction fetch to the VMM as MMIO (it fails emulation), so the VMM gives the chunk at rip a
/// slot and the guest retries the instruction.
#[test]
fn test_code_in_a_sparse_chunk_without_a_slot_still_runs() {
    let kvm = kvm();
    // out 0x80, al; mov rax, 0x1200000; jmp rax   (the code there: mov al, 0x42; out 0x80, al)
    let code = [0xe6, 0x80, 0x48, 0xc7, 0xc0, 0x00, 0x00, 0x20, 0x01, 0xff, 0xe0];
    let (image, _) = tiny_elf(&code);
    let path = write_temp_kernel("far-code", &image);
    let config = VmConfig {
        kernel: Kernel::Elf(path.clone()),
        ..VmConfig::builtin(32)
    };
    let (mut vm, report) = Vm::boot(&kvm, &config).expect("boot");
    std::fs::remove_file(path).ok();
    assert!(matches!(report.first_exit, GuestExit::IoOut { port: 0x80, .. }));
    let far = 0x120_0000;
    vm.ram()
        .guest_memory()
        .write_slice(&[0xb0, 0x42, 0xe6, 0x80], GuestAddress(far))
        .expect("host write");
    let template = Template::freeze(&kvm, &mut vm).expect("freeze");
    let (mut lazy, mut eager) = clone_pair(&kvm, &template);
    assert!(lazy.slot_stats().slotted_bytes < 32 * MIB, "{:?}", lazy.slot_stats());
    let expected = GuestExit::IoOut {
        port: 0x80,
        size: 1,
        value: 0x42,
    };
    assert_eq!(eager.run(DEADLINE).expect("eager run"), expected);
    assert_eq!(
        lazy.run(DEADLINE).expect("lazy run"),
        expected,
        "{:?}",
        lazy.slot_stats()
    );
}
