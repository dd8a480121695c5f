//! Helpers of the cell tests: a template frozen from a real guest, and cell pools started from
//! the `cowvm-cell` binary of this package.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use cowvm_cell::protocol::SandboxConfig;
use cowvm_cell::{sandbox, CellConfig, CellPool};
use cowvm_vmm::memory::PAGE_SIZE;
use cowvm_vmm::{GuestCommand, Kvm, Template, Vm, VmConfig};
use vm_memory::GuestAddress;

/// Guest deadline of test commands.
pub const DEADLINE: Duration = Duration::from_secs(10);
/// Guest address of the qword the template's guest wrote (a data page of the template memfd).
pub const MARKED: u64 = (16 << 20) + 2 * PAGE_SIZE;
/// The value there.
pub const MARK: u64 = 0x5eed_cafe;

/// Opens `/dev/kvm`; the tests need it and fail loudly without it.
pub fn kvm() -> Kvm {
    Kvm::open().unwrap_or_else(|e| panic!("these tests boot real guests and need a working /dev/kvm: {e}"))
}

/// A frozen 64 MiB template whose guest wrote [`MARK`] at [`MARKED`].
pub fn template() -> Arc<Template> {
    let kvm = kvm();
    let (mut vm, _) = Vm::boot(&kvm, &VmConfig::builtin(64)).expect("boot the built-in guest");
    vm.execute(
        GuestCommand::Write {
            start: GuestAddress(MARKED),
            count: 1,
            stride: 8,
            value: MARK,
        },
        Some(DEADLINE),
    )
    .expect("guest write");
    Arc::new(Template::freeze(&kvm, &mut vm).expect("freeze"))
}

/// Cells from this package's `cowvm-cell` binary, sandboxed, `vms_per_cell` VMs each.
pub fn config(vms_per_cell: u32) -> CellConfig {
    CellConfig {
        program: env!("CARGO_BIN_EXE_cowvm-cell").into(),
        args: Vec::new(),
        sandbox: SandboxConfig {
            drop_to: Some(sandbox::NOBODY),
            seccomp: true,
        },
        vms_per_cell,
        mapping_budget: None,
        request_timeout: Duration::from_secs(30),
        per_vm_timeout: Duration::from_millis(50),
        generations: cowvm_cell::GenerationBlocks::in_process(),
    }
}

/// A pool of at most `max_cells` cells of `vms_per_cell` VMs, with `template` as template 1.
pub fn pool(vms_per_cell: u32, max_cells: usize, template: &Arc<Template>) -> CellPool {
    let pool = CellPool::new(config(vms_per_cell), max_cells).expect("cell pool");
    pool.add_template(1, Arc::clone(template));
    pool
}

/// Descriptors open in this process.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").expect("list /proc/self/fd").count()
}

/// Whether this process runs as root (the uid drop and PFNs need it).
pub fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Mappings of memfds (guest RAM, templates) in this process. (Other mappings come and go with
/// glibc's cached thread stacks and arenas.)
pub fn memfd_mappings() -> usize {
    std::fs::read_to_string("/proc/self/maps")
        .expect("read /proc/self/maps")
        .lines()
        .filter(|l| l.contains("/memfd:"))
        .count()
}
