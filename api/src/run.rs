//! `cowvm run`: boot one guest, run a self-check, print what happened.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use cowvm_vmm::boot::IdentityPageSize;
use cowvm_vmm::command::expected_checksum;
use cowvm_vmm::layout::mib;
use cowvm_vmm::memory::PAGE_SIZE;
use cowvm_vmm::{GuestCommand, Kernel, Kvm, Vm, VmConfig, VmError};
use serde::Serialize;
use vm_memory::GuestAddress;

/// Arguments of `cowvm run`.
#[derive(Args)]
pub struct RunArgs {
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 256)]
    memory_mib: u64,
    /// Boot this 64-bit ELF instead of the built-in guest (entered in long mode the same way).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Map guest RAM with 2 MiB pages even where 1 GiB pages are available.
    #[arg(long)]
    two_mib_pages: bool,
    /// Stop a guest that has not exited after this many milliseconds.
    #[arg(long, default_value_t = 10_000)]
    timeout_ms: u64,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// The self-check: fill the last page of RAM from inside the guest, then have the guest checksum
/// it and compare with the checksum of what the host reads back.
#[derive(Serialize)]
struct SelfCheck {
    passed: bool,
    page_gpa: String,
    guest_checksum: String,
    host_checksum: String,
}

#[derive(Serialize)]
struct RunReport {
    memory_mib: u64,
    kernel: String,
    exit_reason: &'static str,
    exit_detail: String,
    first_exit_us: f64,
    page_size: IdentityPageSize,
    entry: String,
    timings_us: cowvm_vmm::vm::BootTimings,
    self_check: Option<SelfCheck>,
}

const PATTERN: u64 = 0xc0ff_ee00_0000_0001;

fn self_check(vm: &mut Vm, memory_size: u64, deadline: Duration) -> Result<SelfCheck, VmError> {
    let page = GuestAddress(memory_size - PAGE_SIZE);
    let qwords = PAGE_SIZE / 8;
    vm.execute(
        GuestCommand::Write {
            start: page,
            count: qwords,
            stride: 8,
            value: PATTERN,
        },
        Some(deadline),
    )?;
    let guest = vm.execute(
        GuestCommand::Checksum {
            start: page,
            count: qwords,
            stride: 8,
        },
        Some(deadline),
    )?;
    let host_values = (0..qwords).map(|i| vm.read_u64(GuestAddress(page.0 + i * 8)));
    let host_values: Vec<u64> = host_values.collect::<Result<_, VmError>>()?;
    let host = expected_checksum(host_values.iter().copied());
    Ok(SelfCheck {
        passed: guest.status == 0 && guest.result == host && host_values.iter().all(|v| *v == PATTERN),
        page_gpa: format!("{:#x}", page.0),
        guest_checksum: format!("{:#018x}", guest.result),
        host_checksum: format!("{host:#018x}"),
    })
}

/// Runs `cowvm run`.
pub fn run(args: &RunArgs) -> Result<ExitCode, VmError> {
    let kvm = Kvm::open()?;
    let kernel = args.kernel.clone().map_or(Kernel::Builtin, Kernel::Elf);
    let config = VmConfig {
        memory_mib: args.memory_mib,
        kernel: kernel.clone(),
        page_size: args.two_mib_pages.then_some(IdentityPageSize::TwoMib),
        vcpus: 1,
    };
    let deadline = Duration::from_millis(args.timeout_ms);
    let (mut vm, boot) = Vm::boot(&kvm, &config)?;
    let check = match kernel {
        Kernel::Builtin => Some(self_check(&mut vm, mib(args.memory_mib), deadline)?),
        Kernel::Elf(_) | Kernel::Image(_) => None,
    };
    let report = RunReport {
        memory_mib: args.memory_mib,
        kernel: match &args.kernel {
            Some(path) => path.display().to_string(),
            None => "built-in".into(),
        },
        exit_reason: boot.first_exit.name(),
        exit_detail: boot.first_exit.to_string(),
        first_exit_us: boot.first_exit_us,
        page_size: boot.page_size,
        entry: format!("{:#x}", boot.entry),
        timings_us: boot.timings,
        self_check: check,
    };
    let passed = report.self_check.as_ref().is_none_or(|c| c.passed);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report).unwrap_or_default());
    } else {
        print_human(&report);
    }
    Ok(if passed { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

fn print_human(r: &RunReport) {
    let t = &r.timings_us;
    println!(
        "cowvm run: {} MiB guest, kernel {}, entered in 64-bit long mode at {} ({:?} identity pages)",
        r.memory_mib, r.kernel, r.entry, r.page_size
    );
    println!(
        "first guest exit: {} ({}) {:.0} µs after KVM_CREATE_VM",
        r.exit_reason, r.exit_detail, r.first_exit_us
    );
    println!(
        "  create_vm {:.0} · memory {:.0} · memslot {:.0} · load kernel {:.0} · boot structures {:.0} · vcpu {:.0} · first run {:.0} µs",
        t.create_vm_us, t.memory_us, t.memslot_us, t.load_kernel_us, t.boot_structures_us, t.vcpu_us, t.first_run_us
    );
    match &r.self_check {
        Some(c) => println!(
            "self-check {}: guest wrote the last page ({}) and checksummed it: guest {} host {}",
            if c.passed { "passed" } else { "FAILED" },
            c.page_gpa,
            c.guest_checksum,
            c.host_checksum
        ),
        None => println!("self-check skipped: a custom kernel does not speak cowvm's command protocol"),
    }
}
