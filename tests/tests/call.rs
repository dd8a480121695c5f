//! Guest ABI v1 in the VMM: user guests built with the C SDK boot to `ready()`, are frozen into
//! templates, and answer calls in fresh clones or in place; every way a guest can misbehave ends
//! its call with a typed error and leaves the template and other VMs working.

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Duration;

use cowvm_tests::{abi_guest, abi_vm, kvm, write_temp_kernel};
use cowvm_vmm::call::{call_template, call_vm, CallError};
use cowvm_vmm::hypercall::HypercallError;
use cowvm_vmm::{CloneEngine, EngineConfig, GuestExit, Template};

const DEADLINE: Duration = Duration::from_secs(10);

fn engine() -> CloneEngine {
    CloneEngine::new(Arc::new(kvm()), EngineConfig::default()).expect("engine")
}

fn template_of(engine: &CloneEngine, path: &std::path::Path) -> Arc<Template> {
    let (mut vm, _) = abi_vm(engine.kvm(), path, 64);
    let template = Arc::new(Template::freeze(engine.kvm(), &mut vm).expect("freeze at ready()"));
    engine.destroy_vm(vm);
    template
}

#[test]
fn test_hello_guest_logs_at_init_and_answers_calls_in_fresh_clones() {
    let engine = engine();
    let path = write_temp_kernel("hello", cowvm_guest::HELLO_ELF);
    let (mut vm, ready) = abi_vm(engine.kvm(), &path, 64);
    assert_eq!(ready.log.text(), "hello guest initialised");
    let template = Arc::new(Template::freeze(engine.kvm(), &mut vm).expect("freeze"));
    for input in [&b"world"[..], b"", b"cowvm"] {
        let answer = call_template(&engine, &template, input, DEADLINE).expect("call");
        assert_eq!(answer.status, 0);
        assert_eq!(answer.output, [b"hello, ", input].concat());
        assert_eq!(answer.log.text(), "", "init logs are not repeated by clones");
        assert!(answer.spawn_us > 0.0 && answer.run_us > 0.0 && answer.total_us >= answer.run_us);
    }
    // The VM the template came from answers too, on its own memory.
    let answer = call_vm(&mut vm, b"vm", 0, 0, DEADLINE).expect("call the VM");
    assert_eq!(answer.output, b"hello, vm");
    engine.destroy_vm(vm);
}

#[test]
fn test_each_calls_clone_has_its_own_identity() {
    let engine = engine();
    let template = template_of(&engine, &abi_guest("misbehave.elf"));
    let identity = |engine: &CloneEngine| {
        let answer = call_template(engine, &template, b"identity", DEADLINE).expect("call");
        let word = |i: usize| u64::from_le_bytes(answer.output[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        assert_eq!(
            (word(0), word(1)),
            (answer.generation, answer.seed),
            "the guest reads what the VMM wrote"
        );
        (word(0), word(1))
    };
    let (first, second) = (identity(&engine), identity(&engine));
    assert_ne!(first.0, second.0, "generation ids differ");
    assert_ne!(first.1, second.1, "seeds differ");
}

#[test]
fn test_a_vm_keeps_its_state_between_calls_and_clones_start_from_the_template() {
    let engine = engine();
    let (mut vm, _) = abi_vm(engine.kvm(), &abi_guest("misbehave.elf"), 64);
    let count = |output: &[u8]| u64::from_le_bytes(output.try_into().expect("8 bytes"));
    for expected in 1..=3 {
        let answer = call_vm(&mut vm, b"count", 0, 0, DEADLINE).expect("call");
        assert_eq!(count(&answer.output), expected);
    }
    let template = Arc::new(Template::freeze(engine.kvm(), &mut vm).expect("freeze after 3 calls"));
    for _ in 0..2 {
        let answer = call_template(&engine, &template, b"count", DEADLINE).expect("call a clone");
        assert_eq!(count(&answer.output), 4, "every clone starts from the frozen state");
    }
    engine.destroy_vm(vm);
}

#[test]
fn test_logs_of_a_call_are_returned_with_it() {
    let engine = engine();
    let template = template_of(&engine, &abi_guest("misbehave.elf"));
    let answer = call_template(&engine, &template, b"log", DEADLINE).expect("call");
    assert_eq!(answer.log.text(), "one\ntwo\nthree\n");
    assert_eq!(answer.output, b"logged");
}

fn assert_call_fails(
    engine: &CloneEngine,
    template: &Arc<Template>,
    input: &[u8],
    deadline: Duration,
    expected: impl Fn(&CallError) -> bool,
) {
    match call_template(engine, template, input, deadline) {
        Err(e) => assert!(
            expected(&e),
            "{:?}: unexpected error {e:?}",
            String::from_utf8_lossy(input)
        ),
        Ok(answer) => panic!("{:?} succeeded: {answer:?}", String::from_utf8_lossy(input)),
    }
    // The template, and a VM made from it, still work.
    let echo = call_template(engine, template, b"still here", DEADLINE).expect("a good call after a bad one");
    assert_eq!(echo.output, b"still here");
}

#[test]
fn test_misbehaving_guests_end_their_call_with_a_typed_error() {
    let engine = engine();
    let template = template_of(&engine, &abi_guest("misbehave.elf"));
    let (mut bystander, _) = abi_vm(engine.kvm(), &abi_guest("misbehave.elf"), 64);

    assert_call_fails(&engine, &template, b"fault", DEADLINE, |e| {
        matches!(e, CallError::Fault(GuestExit::Exception { vector: 6, .. }))
    });
    assert_call_fails(
        &engine,
        &template,
        b"spin",
        Duration::from_millis(200),
        |e| matches!(e, CallError::Deadline { after_ms } if *after_ms >= 200),
    );
    assert_call_fails(&engine, &template, b"badptr", DEADLINE, |e| {
        matches!(
            e,
            CallError::BadHypercall(HypercallError::OutsideRam {
                ptr: 0x7fff_ffff_0000,
                ..
            })
        )
    });
    assert_call_fails(
        &engine,
        &template,
        b"big",
        DEADLINE,
        |e| matches!(e, CallError::OutputTooLarge { len } if *len == cowvm_vmm::layout::MAILBOX_OUTPUT_SIZE + 1),
    );
    assert_call_fails(
        &engine,
        &template,
        b"abort",
        DEADLINE,
        |e| matches!(e, CallError::Aborted { code: 7, log_tail } if log_tail == "giving up"),
    );
    assert_call_fails(&engine, &template, b"badcall", DEADLINE, |e| {
        matches!(e, CallError::BadHypercall(HypercallError::UnknownNumber(99)))
    });
    let too_big = vec![0u8; cowvm_vmm::layout::MAILBOX_INPUT_SIZE as usize + 1];
    assert_call_fails(&engine, &template, &too_big, DEADLINE, |e| {
        matches!(e, CallError::InputTooLarge { .. })
    });

    let answer = call_vm(&mut bystander, b"count", 0, 0, DEADLINE).expect("an unrelated VM still answers");
    assert_eq!(answer.output, 1u64.to_le_bytes());
    engine.destroy_vm(bystander);
}

#[test]
fn test_zlib_inflate_in_the_guest_matches_flate2_on_100_inputs() {
    let engine = engine();
    let (mut vm, ready) = abi_vm(engine.kvm(), &abi_guest("inflate.elf"), 64);
    assert!(
        ready.log.text().starts_with("zlib 1."),
        "init log: {:?}",
        ready.log.text()
    );
    let template = Arc::new(Template::freeze(engine.kvm(), &mut vm).expect("freeze"));
    engine.destroy_vm(vm);
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for i in 0..100 {
        // A few hundred bytes from a small alphabet, so some compress well and some do not.
        let len = 16 + (next() % 400) as usize;
        let alphabet = 2 + (i % 60) as u64;
        let plain: Vec<u8> = (0..len).map(|_| b'!' + (next() % alphabet) as u8).collect();
        let mut encoder = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::new((i % 10) as u32));
        encoder.write_all(&plain).expect("compress");
        let compressed = encoder.finish().expect("compress");
        let mut host = Vec::new();
        flate2::read::ZlibDecoder::new(&compressed[..])
            .read_to_end(&mut host)
            .expect("host inflate");
        let answer = call_template(&engine, &template, &compressed, DEADLINE).expect("inflate call");
        assert_eq!(answer.status, 0, "call {i}: zlib status");
        assert_eq!(answer.output, host, "call {i}: guest zlib and host flate2 disagree");
        assert_eq!(answer.output, plain, "call {i}");
    }
    // A corrupt stream is the guest's answer (a zlib error status), not a VMM error.
    let answer = call_template(&engine, &template, b"\x78\x9cnot deflate", DEADLINE).expect("call");
    assert_ne!(answer.status, 0);
}

/// An empty call in a clone copies exactly two pages: the mailbox page the VMM writes and the
/// stack page. (The SDK once reset its heap pointer with an unconditional store, which copied
/// the heap page in every clone too.)
#[test]
fn test_an_empty_call_copies_only_the_mailbox_and_stack_pages() {
    let engine = engine();
    let path = write_temp_kernel("empty", cowvm_guest::EMPTY_ELF);
    let template = template_of(&engine, &path);
    let mut clone = engine.spawn_idle(&template).expect("clone");
    let (generation, seed) = (clone.generation(), clone.seed());
    let answer = call_vm(clone.vm_mut(), b"", generation, seed, DEADLINE).expect("call");
    assert_eq!((answer.status, answer.output.len()), (0, 0));
    let pages = cowvm_tests::private_pages(clone.vm().ram());
    let mailbox = cowvm_vmm::layout::MAILBOX_START.0 / cowvm_vmm::memory::PAGE_SIZE;
    assert_eq!(pages.len(), 2, "private pages {pages:x?}");
    assert!(pages.contains(&mailbox), "private pages {pages:x?}");
    engine.destroy(clone);
}
