// The register protocol between the VMM and cowvm's guest. This file is the single source of the
// numbers: `build.rs` includes it and turns it into `protocol.inc` for the assembler.
//
// Before `KVM_RUN` the VMM loads a command into the guest's registers:
//   rax = command, rdi / rsi / rdx / rcx = arguments.
// The guest executes it and reports completion with `out PORT_DONE, eax` (eax = status), leaving
// results in rbx and rcx. Identity values live in r14 / r15, which the guest never clobbers, so the
// VMM can hand them to a clone on resume without writing a guest page.
//
// Every vCPU runs the command loop. The VMM sets each vCPU's GS base (MSR `MSR_VCPU_ID`) to the
// vCPU's index; `identity` reads it back with `rdmsr` and reports it in rdx.

/// Port the guest writes a command's status to when the command is finished.
pub const PORT_DONE: u16 = 0xf0;
/// Port the VMM's exception stubs write the exception vector to.
pub const PORT_EXCEPTION: u16 = 0xf1;

/// Return at once: the cheapest possible round trip (spawn timing).
pub const CMD_EXIT: u64 = 0;
/// Write the qword `rcx` at `rdi + i * rdx` for `i in 0..rsi`.
pub const CMD_WRITE: u64 = 1;
/// Read the qword at `rdi + i * rdx` for `i in 0..rsi` and fold it into a checksum in rbx:
/// `sum = sum.rotate_left(CHECKSUM_ROTATE).wrapping_add(value)`.
pub const CMD_CHECKSUM: u64 = 2;
/// Report the identity registers: rbx = r14 (generation id), rcx = r15 (seed), and rdx = the
/// index of the vCPU that ran it, as the guest read it from its GS base ([`MSR_VCPU_ID`]).
pub const CMD_IDENTITY: u64 = 3;
/// Load an empty IDT and raise #UD: the CPU escalates to a triple fault (`KVM_EXIT_SHUTDOWN`).
pub const CMD_TRIPLE_FAULT: u64 = 4;
/// Loop forever without exiting; the VMM must stop it.
pub const CMD_SPIN: u64 = 5;
/// Execute `hlt` with interrupts off; then report done if the VMM resumes the guest.
pub const CMD_HALT: u64 = 6;

/// `IA32_GS_BASE`: the VMM sets it to each vCPU's index; the guest reads it with `rdmsr`.
pub const MSR_VCPU_ID: u32 = 0xc000_0101;

/// The command completed.
pub const STATUS_OK: u32 = 0;
/// The guest did not recognise the command in rax.
pub const STATUS_UNKNOWN_COMMAND: u32 = 1;

/// Left-rotation applied to the running checksum before each qword is added (addition, unlike
/// xor, does not cancel when a value repeats).
pub const CHECKSUM_ROTATE: u32 = 7;
