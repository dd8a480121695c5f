//! Missing devices, missing capabilities and bad requests give clear, typed errors.

use std::path::{Path, PathBuf};

use cowvm_tests::{kvm, write_temp_kernel};
use cowvm_vmm::command::CommandError;
use cowvm_vmm::kvm::SMM_CAPABILITY;
use cowvm_vmm::vm::VmError;
use cowvm_vmm::{GuestCommand, Kernel, Kvm, KvmError, Vm, VmConfig};
use vm_memory::GuestAddress;

#[test]
fn test_unopenable_kvm_device_is_a_typed_error_naming_the_path() {
    let err = Kvm::open_path(Path::new("/nonexistent/kvm")).err().expect("open fails");
    assert!(matches!(&err, KvmError::Open { path, .. } if path == Path::new("/nonexistent/kvm")));
    assert!(err.to_string().contains("/nonexistent/kvm"), "{err}");
}

#[test]
fn test_file_that_is_not_kvm_is_refused_by_api_version() {
    let err = Kvm::open_path(Path::new("/dev/null")).err().expect("not kvm");
    assert!(matches!(err, KvmError::ApiVersion { .. }), "{err}");
}

#[test]
fn test_missing_capability_is_a_typed_error_naming_it() {
    let kvm = kvm();
    match kvm.require(SMM_CAPABILITY) {
        Err(KvmError::MissingCapability { name, .. }) => {
            assert_eq!(name, "X86_SMM");
            assert!(!kvm.has(SMM_CAPABILITY.cap));
        }
        Err(other) => panic!("wrong error {other}"),
        Ok(()) => assert!(kvm.has(SMM_CAPABILITY.cap), "require agrees with the capability check"),
    }
}

#[test]
fn test_memory_outside_the_supported_range_is_refused() {
    let kvm = kvm();
    for memory_mib in [0, 1, 3, 65 * 1024, u64::MAX] {
        let err = Vm::boot(&kvm, &VmConfig::builtin(memory_mib)).err().expect("refused");
        assert!(matches!(err, VmError::MemorySize { .. }), "{memory_mib} MiB: {err}");
    }
}

#[test]
fn test_missing_and_malformed_kernels_are_refused_clearly() {
    let kvm = kvm();
    let missing = VmConfig {
        kernel: Kernel::Elf(PathBuf::from("/nonexistent/kernel.elf")),
        ..VmConfig::builtin(16)
    };
    let err = Vm::boot(&kvm, &missing).err().expect("missing kernel");
    assert!(err.to_string().contains("/nonexistent/kernel.elf"), "{err}");

    let path = write_temp_kernel("garbage", b"this is not an ELF file at all, just text");
    let garbage = VmConfig {
        kernel: Kernel::Elf(path.clone()),
        ..VmConfig::builtin(16)
    };
    let err = Vm::boot(&kvm, &garbage).err().expect("garbage kernel");
    std::fs::remove_file(path).ok();
    assert!(err.to_string().contains("64-bit ELF"), "{err}");
}

#[test]
fn test_commands_outside_ram_or_over_the_page_tables_are_refused_before_running() {
    let kvm = kvm();
    let (mut vm, _) = Vm::boot(&kvm, &VmConfig::builtin(16)).expect("boot");
    let outside = GuestCommand::Checksum {
        start: GuestAddress(16 << 20),
        count: 1,
        stride: 8,
    };
    assert!(matches!(
        vm.execute(outside, None),
        Err(VmError::Command(CommandError::OutsideRam { .. }))
    ));
    let over_tables = GuestCommand::Write {
        start: GuestAddress(0x9000),
        count: 1,
        stride: 8,
        value: 0,
    };
    assert!(matches!(
        vm.execute(over_tables, None),
        Err(VmError::Command(CommandError::Protected { .. }))
    ));
    let misaligned = GuestCommand::Checksum {
        start: GuestAddress(0x20_0001),
        count: 1,
        stride: 8,
    };
    assert!(matches!(
        vm.execute(misaligned, None),
        Err(VmError::Command(CommandError::Misaligned { .. }))
    ));
    // The VM is unharmed and still answers.
    assert_eq!(vm.execute(GuestCommand::Exit, None).expect("still alive").status, 0);
}
