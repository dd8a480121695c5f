//! Capture a running guest's complete state, restore it into a fresh VM, and continue there.

use cowvm_tests::{kvm, tiny_elf, write_temp_kernel, DEADLINE};
use cowvm_vmm::memory::PAGE_SIZE;
use cowvm_vmm::pagemap::PageMap;
use cowvm_vmm::{GuestCommand, GuestExit, Kernel, Vm, VmConfig, VmState};
use vm_memory::GuestAddress;

fn data_pages() -> GuestCommand {
    GuestCommand::Checksum {
        start: GuestAddress(4 << 20),
        count: 64,
        stride: PAGE_SIZE,
    }
}

#[test]
fn test_restored_vm_continues_and_returns_the_same_result() {
    let kvm = kvm();
    let (mut original, _) = Vm::boot(&kvm, &VmConfig::builtin(64)).expect("boot");
    original
        .execute(
            GuestCommand::Write {
                start: GuestAddress(4 << 20),
                count: 64,
                stride: PAGE_SIZE,
                value: 0xabcd,
            },
            DEADLINE,
        )
        .expect("write");
    original.set_identity(7, 0x1111).expect("identity");
    let (memory, state) = original.freeze(&kvm).expect("freeze");

    let mut restored = Vm::restore(&kvm, &memory, &state).expect("restore");
    let expected = original.execute(data_pages(), DEADLINE).expect("checksum in original");
    let got = restored.execute(data_pages(), DEADLINE).expect("checksum in restored");
    assert_eq!(got, expected);
    let identity = restored.execute(GuestCommand::Identity, DEADLINE).expect("identity");
    assert_eq!((identity.result, identity.extra), (7, 0x1111), "registers carried over");
}

#[test]
fn test_restored_vcpu_state_equals_the_captured_state() {
    let kvm = kvm();
    let (mut original, _) = Vm::boot(&kvm, &VmConfig::builtin(64)).expect("boot");
    original.execute(data_pages(), DEADLINE).expect("run a command");
    let (memory, captured) = original.freeze(&kvm).expect("freeze");
    let mut restored = Vm::restore(&kvm, &memory, &captured).expect("restore");
    let recaptured = restored.capture_state(&kvm).expect("capture restored");
    let (a, b) = (&captured.vcpus[0], &recaptured.vcpus[0]);
    let json = |v: &dyn erased::Json| v.json();
    assert_eq!(json(&a.regs), json(&b.regs));
    assert_eq!(json(&a.sregs), json(&b.sregs));
    assert_eq!(json(&a.xcrs), json(&b.xcrs));
    assert_eq!(json(&a.debugregs), json(&b.debugregs));
    assert_eq!(json(&a.xsave), json(&b.xsave));
    assert_eq!(json(&a.cpuid), json(&b.cpuid));
    assert_eq!(a.fpu, b.fpu);
    assert_eq!(a.mp_state.mp_state, b.mp_state.mp_state);
    assert!(
        a.msrs.as_slice().len() > 10,
        "MSRs captured: {}",
        a.msrs.as_slice().len()
    );
    assert_eq!(a.msrs.as_slice().len(), b.msrs.as_slice().len());
}

#[test]
fn test_state_survives_a_json_round_trip_and_still_restores() {
    let kvm = kvm();
    let (mut original, _) = Vm::boot(&kvm, &VmConfig::builtin(64)).expect("boot");
    let (memory, state) = original.freeze(&kvm).expect("freeze");
    let text = serde_json::to_string(&state).expect("serialise");
    let parsed: VmState = serde_json::from_str(&text).expect("deserialise");
    let mut restored = Vm::restore(&kvm, &memory, &parsed).expect("restore from parsed state");
    let expected = original.execute(data_pages(), DEADLINE).expect("original");
    assert_eq!(restored.execute(data_pages(), DEADLINE).expect("restored"), expected);
}

#[test]
fn test_original_keeps_running_after_freeze_and_its_writes_stay_private() {
    let kvm = kvm();
    let (mut original, _) = Vm::boot(&kvm, &VmConfig::builtin(64)).expect("boot");
    let (memory, state) = original.freeze(&kvm).expect("freeze");
    original
        .execute(
            GuestCommand::Write {
                start: GuestAddress(8 << 20),
                count: 1,
                stride: 8,
                value: 99,
            },
            DEADLINE,
        )
        .expect("write after freeze");
    assert_eq!(original.read_u64(GuestAddress(8 << 20)).expect("read"), 99);
    let restored = Vm::restore(&kvm, &memory, &state).expect("restore");
    assert_eq!(
        restored.read_u64(GuestAddress(8 << 20)).expect("read"),
        0,
        "template unchanged"
    );
}

/// Boots `code` as a tiny ELF kernel in 16 MiB; returns the VM, its first exit and the entry.
fn boot_tiny(name: &str, code: &[u8]) -> (Vm, GuestExit, u64) {
    let (image, entry) = tiny_elf(code);
    let path = write_temp_kernel(name, &image);
    let config = VmConfig {
        kernel: Kernel::Elf(path.clone()),
        ..VmConfig::builtin(16)
    };
    let booted = Vm::boot(&kvm(), &config);
    std::fs::remove_file(path).ok();
    let (vm, report) = booted.expect("boot tiny kernel");
    (vm, report.first_exit, entry)
}

#[test]
fn test_captured_rip_after_an_out_exit_is_the_next_instruction() {
    // mov eax, 0x11; out 0x80, al; hlt
    let (mut vm, exit, entry) = boot_tiny("capture-out", &[0xb8, 0x11, 0, 0, 0, 0xe6, 0x80, 0xf4]);
    assert_eq!(
        exit,
        GuestExit::IoOut {
            port: 0x80,
            size: 1,
            value: 0x11
        }
    );
    let state = vm.capture_state(&kvm()).expect("capture");
    assert_eq!(state.vcpus[0].regs.rip, entry + 7, "rip is the hlt after the out");
    assert_eq!(
        vm.run(DEADLINE).expect("resume"),
        GuestExit::Halt,
        "the out is not replayed"
    );
}

#[test]
fn test_captured_rip_and_rax_after_an_in_exit_include_the_completed_in() {
    // mov eax, 0x1100; in al, 0x60; hlt
    let (mut vm, exit, entry) = boot_tiny("capture-in", &[0xb8, 0x00, 0x11, 0, 0, 0xe4, 0x60, 0xf4]);
    assert_eq!(exit, GuestExit::IoIn { port: 0x60, size: 1 });
    let state = vm.capture_state(&kvm()).expect("capture");
    let regs = &state.vcpus[0].regs;
    assert_eq!(regs.rip, entry + 7, "rip is the hlt after the in");
    assert_eq!(
        regs.rax, 0x11ff,
        "al holds the byte read (floating bus), the rest of eax is kept"
    );
    assert_eq!(
        vm.run(DEADLINE).expect("resume"),
        GuestExit::Halt,
        "the in is not replayed"
    );
}

#[test]
fn test_reset_after_an_in_exit_restores_exactly_the_template_registers() {
    let kvm = kvm();
    // mov eax, 0x11; out 0x80, al (template taken here); in al, 0x60; out 0x81, al; hlt
    let code = [0xb8, 0x11, 0, 0, 0, 0xe6, 0x80, 0xe4, 0x60, 0xe6, 0x81, 0xf4];
    let (mut original, exit, entry) = boot_tiny("reset-in", &code);
    assert!(matches!(exit, GuestExit::IoOut { port: 0x80, .. }), "{exit:?}");
    let (memory, state) = original.freeze(&kvm).expect("freeze");
    assert_eq!(state.vcpus[0].regs.rip, entry + 7, "template resumes at the in");

    let mut clone = Vm::restore(&kvm, &memory, &state).expect("restore");
    assert_eq!(
        clone.run(DEADLINE).expect("run"),
        GuestExit::IoIn { port: 0x60, size: 1 }
    );
    let pagemap = PageMap::open().expect("pagemap");
    clone.reset(&state, &pagemap).expect("reset");

    let after = clone.capture_state(&kvm).expect("capture after reset");
    let json = |v: &dyn erased::Json| v.json();
    assert_eq!(json(&after.vcpus[0].regs), json(&state.vcpus[0].regs));
    assert_eq!(
        clone.run(DEADLINE).expect("run after reset"),
        GuestExit::IoIn { port: 0x60, size: 1 },
        "the clone starts again at the template's in, not past it"
    );
}

mod erased {
    /// Serialises any state part to JSON, so parts without `PartialEq` can be compared.
    pub trait Json {
        fn json(&self) -> String;
    }
    impl<T: serde::Serialize> Json for T {
        fn json(&self) -> String {
            serde_json::to_string(self).expect("serialise")
        }
    }
}
