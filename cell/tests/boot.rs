//! VMs booted in a cell on the real /dev/kvm (`CellPool::boot`): a kernel image handed over as a
//! sealed memfd boots under the sandbox with every vCPU, a bad image or descriptor is refused
//! while the cell keeps serving, and a booted VM frozen in its cell is a template whose clones
//! are made in that cell without loading it again.

mod common;

use std::io::Write;
use std::os::fd::AsFd;

use common::*;
use cowvm_cell::protocol::{BootVm, RemoteErrorKind};
use cowvm_cell::{CellPool, PoolError};
use cowvm_vmm::{FrozenMemory, GuestCommand};
use vm_memory::GuestAddress;

fn boot_vm(kernel: Option<&str>, vcpus: u32) -> BootVm {
    BootVm {
        memory_mib: 32,
        vcpus,
        kernel: kernel.map(str::to_owned),
        warmup_mib: 0,
        deadline_ms: DEADLINE.as_millis() as u64,
    }
}

fn sealed(bytes: &[u8]) -> FrozenMemory {
    FrozenMemory::new_sealed_with(bytes.len() as u64, |file| {
        let mut file = file;
        file.write_all(bytes)
    })
    .expect("sealed memfd")
}

#[test]
fn test_a_kernel_image_in_a_sealed_memfd_boots_in_a_cell_with_every_vcpu_and_freezes_there() {
    let template = template();
    let pool: CellPool = pool(4, 1, &template);
    let image = sealed(cowvm_guest::GUEST_ELF);
    let placed = pool
        .boot(boot_vm(Some("/kernels/guest.elf"), 2), Some(image.as_fd()))
        .expect("the pool places the boot")
        .expect("the guest boots");
    assert_eq!(placed.booted.memory_size, 32 << 20);
    let cell = pool.cells();
    assert_eq!((cell.len(), cell[0].vms), (1, 1), "{cell:?}");
    assert_eq!(cell[0].confinement.map(|c| c.seccomp), Some(2), "booted under seccomp");
    for vcpu in 0..2 {
        let who = pool
            .run_on(placed.at, vcpu, GuestCommand::Identity, DEADLINE)
            .expect("identity");
        assert_eq!(who.0.vcpu, Some(u64::from(vcpu)));
    }
    let mark = GuestCommand::Write {
        start: GuestAddress(16 << 20),
        count: 1,
        stride: 8,
        value: 0xb007,
    };
    pool.run(placed.at, mark, DEADLINE).expect("write");

    // Frozen in its cell: the template comes back over the same memfds, and its clones are made
    // in that cell (the cell keeps it) and read the booted VM's write.
    let (frozen, _pause_us) = pool.freeze_booted(placed.at, 2).expect("freeze");
    assert_eq!(frozen.size(), 32 << 20);
    pool.add_template(2, std::sync::Arc::new(frozen));
    let batch = pool.spawn(2, 1).expect("spawn");
    assert!(batch.failed.is_empty(), "{:?}", batch.failed);
    assert_eq!(batch.clones[0].at.cell, placed.at.cell);
    let read = GuestCommand::Checksum {
        start: GuestAddress(16 << 20),
        count: 1,
        stride: 8,
    };
    assert_eq!(
        pool.run(batch.clones[0].at, read, DEADLINE).expect("read").result,
        0xb007
    );
    // A booted VM cannot be reset; destroying it frees its place.
    let refused = pool.reset(placed.at).expect_err("a booted VM is not a clone");
    assert!(
        matches!(refused, PoolError::Cell(ref e) if e.remote_kind() == Some(RemoteErrorKind::Protocol)),
        "{refused}"
    );
    pool.destroy(placed.at).expect("destroy");
    assert_eq!(pool.cells()[0].vms, 1, "the clone is left");
}

#[test]
fn test_a_bad_kernel_image_or_descriptor_is_refused_and_the_cell_keeps_serving() {
    let template = template();
    let pool = pool(4, 1, &template);
    // Not an ELF: the boot fails as in process (bad_kernel, named by its file name).
    let junk = sealed(b"not an ELF image");
    let failure = pool
        .boot(boot_vm(Some("/srv/kernels/junk.elf"), 1), Some(junk.as_fd()))
        .expect("the pool places the boot")
        .expect_err("a junk image does not boot");
    assert_eq!(failure.code.as_deref(), Some("bad_kernel"), "{failure:?}");
    assert!(failure.message.contains("\"junk.elf\""), "{failure:?}");
    assert!(!failure.message.contains("/srv"), "no host path: {failure:?}");
    // A descriptor that is not a sealed memfd is refused before anything is read.
    let file = std::fs::File::open("/proc/self/status").expect("a plain file");
    let refused = pool
        .boot(boot_vm(Some("/kernels/plain"), 1), Some(file.as_fd()))
        .expect_err("an unsealed descriptor");
    assert!(
        matches!(refused, PoolError::Cell(ref e) if e.remote_kind() == Some(RemoteErrorKind::Vmm)),
        "{refused}"
    );
    // A kernel name without its descriptor is a protocol error.
    let refused = pool.boot(boot_vm(Some("/kernels/none"), 1), None).expect_err("no fd");
    assert!(
        matches!(refused, PoolError::Cell(ref e) if e.remote_kind() == Some(RemoteErrorKind::Protocol)),
        "{refused}"
    );
    // The cell still boots the built-in guest, and holds no VM from the refusals.
    let placed = pool.boot(boot_vm(None, 1), None).expect("placed").expect("booted");
    assert_eq!(pool.cells()[0].vms, 1);
    pool.run(placed.at, GuestCommand::Identity, DEADLINE).expect("identity");
}
