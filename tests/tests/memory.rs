//! Guest RAM as the host kernel sees it: a private mapping of a sealed memfd shares every page
//! until the guest writes one, the seals refuse every way to write the template, and a guest that
//! only reads leaves no private page (Accessed/Dirty bits are preset in its page tables).

use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::FileExt;

use cowvm_tests::{guest_read as read, guest_write as write, kvm, pagemap, private_pages, DEADLINE};
use cowvm_vmm::memory::PAGE_SIZE;
use cowvm_vmm::pagemap::PageMap;
use cowvm_vmm::{FrozenMemory, GuestCommand, TemplateMemory, Vm, VmConfig};
use vm_memory::GuestAddress;

const MIB: u64 = 1 << 20;

/// A frozen 64 MiB template whose pages at `pages` hold data, and its state.
fn template(pages: &[u64]) -> (TemplateMemory, cowvm_vmm::VmState) {
    let kvm = kvm();
    let (mut vm, _) = Vm::boot(&kvm, &VmConfig::builtin(64)).expect("boot");
    for &gpa in pages {
        write(&mut vm, gpa, gpa | 0xfeed);
    }
    vm.freeze(&kvm).expect("freeze")
}

/// The template's own PFN for the page at `gpa`, through a read-only view of the memfd.
fn template_pfn(frozen: &FrozenMemory, gpa: u64) -> u64 {
    let view = frozen.map_read_only().expect("read-only view");
    view.read_u64(gpa).expect("touch page");
    let entry = PageMap::open()
        .expect("pagemap")
        .read(view.host_address() + gpa, 1)
        .expect("read")[0];
    entry.pfn().expect("template page present")
}

#[test]
fn test_guest_write_turns_exactly_that_page_private_while_others_keep_the_memfd_page() {
    let (x, y) = (8 * MIB, 9 * MIB);
    let (memory, state) = template(&[x, y]);
    let kvm = kvm();
    let mut clone = Vm::restore(&kvm, &memory, &state).expect("restore");
    assert_eq!(read(&mut clone, x), x | 0xfeed);
    assert_eq!(read(&mut clone, y), y | 0xfeed);

    let (px, py) = (template_pfn(memory.base(), x), template_pfn(memory.base(), y));
    let before = pagemap(clone.ram());
    let (bx, by) = (before[(x / PAGE_SIZE) as usize], before[(y / PAGE_SIZE) as usize]);
    assert!(
        bx.present() && bx.file_or_shared() && by.file_or_shared(),
        "read pages map the memfd: {bx:?} {by:?}"
    );
    assert_eq!(
        (bx.pfn(), by.pfn()),
        (Some(px), Some(py)),
        "clone maps the template's own frames"
    );

    write(&mut clone, x, 1);
    let after = pagemap(clone.ram());
    let (ax, ay) = (after[(x / PAGE_SIZE) as usize], after[(y / PAGE_SIZE) as usize]);
    assert!(
        ax.private_anonymous() && ax.exclusive(),
        "written page is anonymous and exclusive: {ax:?}"
    );
    assert_ne!(ax.pfn(), Some(px), "written page got a new frame");
    assert!(ay.file_or_shared(), "untouched page still maps the memfd");
    assert_eq!(ay.pfn(), Some(py), "untouched page still maps the template's frame");
    assert_eq!(read(&mut clone, x), 1);
    assert_eq!(
        memory.base().map_read_only().expect("view").read_u64(x),
        Some(x | 0xfeed),
        "template unchanged"
    );
    assert_eq!(
        private_pages(clone.ram()),
        vec![x / PAGE_SIZE],
        "exactly one private page"
    );
}

#[test]
fn test_write_in_one_clone_is_invisible_to_another() {
    let x = 8 * MIB;
    let (memory, state) = template(&[x]);
    let kvm = kvm();
    let mut a = Vm::restore(&kvm, &memory, &state).expect("restore a");
    let mut b = Vm::restore(&kvm, &memory, &state).expect("restore b");
    write(&mut a, x, 42);
    assert_eq!(read(&mut a, x), 42);
    assert_eq!(read(&mut b, x), x | 0xfeed);
    assert!(private_pages(b.ram()).is_empty());
}

fn errno(result: io::Result<impl Sized>) -> Option<i32> {
    result.err().and_then(|e| e.raw_os_error())
}

fn mmap(frozen: &FrozenMemory, prot: libc::c_int, flags: libc::c_int) -> io::Result<*mut libc::c_void> {
    // SAFETY: a fresh mapping at a kernel-chosen address; the test unmaps it if it succeeds.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            PAGE_SIZE as usize,
            prot,
            flags,
            frozen.as_fd().as_raw_fd(),
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        Err(io::Error::last_os_error())
    } else {
        Ok(addr)
    }
}

#[test]
fn test_frozen_memfd_refuses_every_way_to_write_it() {
    let (memory, _) = template(&[8 * MIB]);
    let frozen = memory.base();
    let seals = frozen.seals().expect("seals");
    for seal in [
        libc::F_SEAL_WRITE,
        libc::F_SEAL_GROW,
        libc::F_SEAL_SHRINK,
        libc::F_SEAL_SEAL,
    ] {
        assert_ne!(seals & seal, 0, "seal {seal:#x} missing from {seals:#x}");
    }
    let file = std::fs::File::from(frozen.as_fd().try_clone_to_owned().expect("dup"));
    assert_eq!(
        errno(file.write_at(b"x", 8 * MIB)),
        Some(libc::EPERM),
        "write(2) refused"
    );
    assert_eq!(
        errno(file.set_len(frozen.size() * 2)),
        Some(libc::EPERM),
        "grow refused"
    );
    assert_eq!(errno(file.set_len(PAGE_SIZE)), Some(libc::EPERM), "shrink refused");
    assert_eq!(
        errno(mmap(frozen, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED)),
        Some(libc::EPERM),
        "writable shared mapping refused"
    );
    let read_only = mmap(frozen, libc::PROT_READ, libc::MAP_SHARED).expect("read-only shared mapping is allowed");
    // SAFETY: `read_only` is the one-page mapping made just above.
    let upgrade = unsafe { libc::mprotect(read_only, PAGE_SIZE as usize, libc::PROT_READ | libc::PROT_WRITE) };
    assert_eq!(upgrade, -1, "a read-only shared mapping cannot be made writable");
    // SAFETY: unmapping the mapping made above, once.
    unsafe { libc::munmap(read_only, PAGE_SIZE as usize) };
    assert_eq!(
        frozen.map_read_only().expect("view").read_u64(8 * MIB),
        Some((8 * MIB) | 0xfeed)
    );
}

#[test]
fn test_unsealed_memfd_is_refused_as_frozen_memory() {
    // SAFETY: a valid NUL-terminated name; the returned fd is owned by the File below.
    let fd = unsafe { libc::memfd_create(c"unsealed".as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    assert!(fd >= 0);
    // SAFETY: `fd` is fresh and owned by nothing else.
    let file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let err = FrozenMemory::from_sealed(file).err().expect("unsealed memfd refused");
    assert!(err.to_string().contains("not sealed"), "{err}");
}

#[test]
fn test_guest_that_only_reads_leaves_no_private_pages() {
    let (memory, state) = template(&[8 * MIB]);
    let kvm = kvm();
    let mut clone = Vm::restore(&kvm, &memory, &state).expect("restore");
    let pages = memory.size() / PAGE_SIZE;
    // Read one qword of every page of RAM: the guest walks its page tables, GDT and code too.
    clone
        .execute(
            GuestCommand::Checksum {
                start: GuestAddress(0),
                count: pages,
                stride: PAGE_SIZE,
            },
            DEADLINE,
        )
        .expect("read all RAM");
    clone.execute(GuestCommand::Identity, DEADLINE).expect("identity");
    clone.execute(GuestCommand::Exit, DEADLINE).expect("exit");
    let map = pagemap(clone.ram());
    assert_eq!(
        map.iter().filter(|e| e.present()).count() as u64,
        pages,
        "every page was read"
    );
    assert_eq!(private_pages(clone.ram()), Vec::<u64>::new(), "reading copied no page");

    // Control: writes are counted exactly.
    for gpa in [10 * MIB, 11 * MIB, 12 * MIB] {
        write(&mut clone, gpa, 5);
    }
    assert_eq!(
        private_pages(clone.ram()),
        vec![10 * MIB / PAGE_SIZE, 11 * MIB / PAGE_SIZE, 12 * MIB / PAGE_SIZE]
    );
}
