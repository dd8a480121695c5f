//! Capture a running guest's complete state, restore it into a fresh VM, and continue there.

use cowvm_tests::{kvm, DEADLINE};
use cowvm_vmm::memory::PAGE_SIZE;
use cowvm_vmm::{GuestCommand, Vm, VmConfig, VmState};
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
