//! The guest boots in 64-bit long mode from memfd-backed RAM of various sizes, and runs commands.

use std::time::{Duration, Instant};

use cowvm_tests::{kvm, tiny_elf, write_temp_kernel, DEADLINE};
use cowvm_vmm::boot::IdentityPageSize;
use cowvm_vmm::command::expected_checksum;
use cowvm_vmm::memory::PAGE_SIZE;
use cowvm_vmm::{GuestCommand, GuestExit, Kernel, Vm, VmConfig, VmError};
use vm_memory::GuestAddress;

const EFER_LMA: u64 = 0x400;

fn boot_and_check_last_page(memory_mib: u64, page_size: Option<IdentityPageSize>) {
    let kvm = kvm();
    let config = VmConfig {
        page_size,
        ..VmConfig::builtin(memory_mib)
    };
    let (mut vm, report) = Vm::boot(&kvm, &config).expect("boot");
    assert_eq!(report.first_exit, GuestExit::Done { status: 0 });
    if let Some(size) = page_size {
        assert_eq!(report.page_size, size);
    }

    let sregs = vm.vcpu().sregs().expect("sregs");
    assert_ne!(sregs.efer & EFER_LMA, 0, "long mode active");
    assert_eq!(sregs.cs.l, 1, "64-bit code segment");

    let last_page = GuestAddress((memory_mib << 20) - PAGE_SIZE);
    let qwords = PAGE_SIZE / 8;
    let value = 0x5eed_0000_0000_0000 | memory_mib;
    let out = vm
        .execute(
            GuestCommand::Write {
                start: last_page,
                count: qwords,
                stride: 8,
                value,
            },
            DEADLINE,
        )
        .expect("write last page");
    assert_eq!(out.status, 0);
    for i in 0..qwords {
        assert_eq!(
            vm.read_u64(GuestAddress(last_page.0 + i * 8)).expect("host read"),
            value
        );
    }
    let sum = vm
        .execute(
            GuestCommand::Checksum {
                start: last_page,
                count: qwords,
                stride: 8,
            },
            DEADLINE,
        )
        .expect("checksum last page");
    assert_eq!(
        sum.result,
        expected_checksum(std::iter::repeat_n(value, qwords as usize))
    );
    assert_ne!(sum.result, 0);
}

#[test]
fn test_guest_with_64_mib_boots_in_long_mode_and_reads_back_its_last_page() {
    boot_and_check_last_page(64, None);
}

#[test]
fn test_guest_with_1_gib_boots_in_long_mode_and_reads_back_its_last_page() {
    boot_and_check_last_page(1024, None);
}

#[test]
fn test_guest_with_4_gib_boots_in_long_mode_and_reads_back_its_last_page() {
    boot_and_check_last_page(4096, None);
}

#[test]
fn test_guest_on_two_mib_identity_pages_reads_back_its_last_page_at_4_gib() {
    boot_and_check_last_page(4096, Some(IdentityPageSize::TwoMib));
}

#[test]
fn test_guest_on_one_gib_identity_pages_reads_back_its_last_page() {
    if !kvm().supports_1gib_pages() {
        println!("SKIP: this KVM does not offer CPUID pdpe1gb to guests, so 1 GiB pages cannot be used here");
        return;
    }
    boot_and_check_last_page(2048, Some(IdentityPageSize::OneGib));
}

#[test]
fn test_identity_command_reports_the_registers_given_at_resume() {
    let kvm = kvm();
    let (mut vm, _) = Vm::boot(&kvm, &VmConfig::builtin(64)).expect("boot");
    vm.set_identity(41, 0xdead_beef_cafe_f00d).expect("identity");
    let out = vm.execute(GuestCommand::Identity, DEADLINE).expect("identity command");
    assert_eq!((out.result, out.extra), (41, 0xdead_beef_cafe_f00d));
}

#[test]
fn test_triple_fault_command_shuts_the_vcpu_down() {
    let kvm = kvm();
    let (mut vm, _) = Vm::boot(&kvm, &VmConfig::builtin(64)).expect("boot");
    let err = vm
        .execute(GuestCommand::TripleFault, DEADLINE)
        .expect_err("triple fault");
    assert!(matches!(err, VmError::GuestStopped(GuestExit::Shutdown)), "{err}");
}

#[test]
fn test_spinning_guest_is_stopped_at_its_deadline() {
    let kvm = kvm();
    let (mut vm, _) = Vm::boot(&kvm, &VmConfig::builtin(64)).expect("boot");
    let started = Instant::now();
    let err = vm
        .execute(GuestCommand::Spin, Some(Duration::from_millis(200)))
        .expect_err("spin");
    let elapsed = started.elapsed();
    assert!(
        matches!(err, VmError::GuestStopped(GuestExit::DeadlineExceeded { after_ms }) if after_ms >= 200),
        "{err}"
    );
    assert!(elapsed < Duration::from_secs(5), "stopped after {elapsed:?}");
}

#[test]
fn test_halting_guest_reports_hlt() {
    let kvm = kvm();
    let (mut vm, _) = Vm::boot(&kvm, &VmConfig::builtin(64)).expect("boot");
    let err = vm.execute(GuestCommand::Halt, DEADLINE).expect_err("halt");
    assert!(matches!(err, VmError::GuestStopped(GuestExit::Halt)), "{err}");
}

#[test]
fn test_custom_elf_kernel_is_entered_in_long_mode() {
    // mov eax, 0x1234abcd; out 0x80, eax; hlt
    let (image, entry) = tiny_elf(&[0xb8, 0xcd, 0xab, 0x34, 0x12, 0xe7, 0x80, 0xf4]);
    let path = write_temp_kernel("out", &image);
    let config = VmConfig {
        kernel: Kernel::Elf(path.clone()),
        ..VmConfig::builtin(16)
    };
    let (mut vm, report) = Vm::boot(&kvm(), &config).expect("boot custom kernel");
    std::fs::remove_file(path).ok();
    assert_eq!(report.entry, entry);
    assert_eq!(
        report.first_exit,
        GuestExit::IoOut {
            port: 0x80,
            size: 4,
            value: 0x1234_abcd
        }
    );
    assert_eq!(vm.run(DEADLINE).expect("resume"), GuestExit::Halt);
}

#[test]
fn test_guest_exception_is_reported_with_vector_and_rip() {
    // ud2
    let (image, entry) = tiny_elf(&[0x0f, 0x0b]);
    let path = write_temp_kernel("ud2", &image);
    let config = VmConfig {
        kernel: Kernel::Elf(path.clone()),
        ..VmConfig::builtin(16)
    };
    let (_vm, report) = Vm::boot(&kvm(), &config).expect("boot custom kernel");
    std::fs::remove_file(path).ok();
    assert_eq!(
        report.first_exit,
        GuestExit::Exception {
            vector: 6,
            rip: entry,
            error_code: None,
            cr2: 0
        }
    );
}

/// `mov rax, addr; mov qword [rax], rax`
fn store_to(addr: u32) -> Vec<u8> {
    let mut code = vec![0x48, 0xc7, 0xc0];
    code.extend_from_slice(&addr.to_le_bytes());
    code.extend_from_slice(&[0x48, 0x89, 0x00]);
    code
}

fn boot_tiny(name: &str, code: &[u8], memory_mib: u64) -> cowvm_vmm::BootReport {
    let (image, _) = tiny_elf(code);
    let path = write_temp_kernel(name, &image);
    let config = VmConfig {
        kernel: Kernel::Elf(path.clone()),
        page_size: Some(IdentityPageSize::TwoMib),
        ..VmConfig::builtin(memory_mib)
    };
    let result = Vm::boot(&kvm(), &config);
    std::fs::remove_file(path).ok();
    result.expect("boot custom kernel").1
}

#[test]
fn test_guest_write_past_ram_inside_the_identity_map_exits_as_mmio() {
    // 15 MiB of RAM; the 2 MiB identity map covers 16 MiB, so 15.5 MiB is mapped but not RAM.
    let report = boot_tiny("mmio", &store_to(0xf8_0000), 15);
    assert_eq!(
        report.first_exit,
        GuestExit::Mmio {
            gpa: 0xf8_0000,
            write: true
        }
    );
}

#[test]
fn test_guest_write_past_the_identity_map_is_a_reported_page_fault() {
    let report = boot_tiny("pf", &store_to(0x200_0000), 16);
    match report.first_exit {
        GuestExit::Exception {
            vector: 14,
            cr2: 0x200_0000,
            error_code: Some(code),
            ..
        } => {
            assert_eq!(code & 0b11, 0b10, "write to a not-present page");
        }
        other => panic!("expected a page fault, got {other}"),
    }
}
