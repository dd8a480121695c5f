//! Helpers for cowvm's end-to-end tests. Every test runs real guests on `/dev/kvm`.

use std::time::Duration;

pub mod kernel;

use cowvm_vmm::memory::PAGE_SIZE;
use cowvm_vmm::pagemap::{PageMap, PageMapEntry};
use cowvm_vmm::{GuestCommand, GuestRam, Kvm, Vm};
use vm_memory::GuestAddress;

/// How long a test lets the guest run one command.
pub const DEADLINE: Option<Duration> = Some(Duration::from_secs(10));

/// Has the guest store `value` at `gpa`.
pub fn guest_write(vm: &mut Vm, gpa: u64, value: u64) {
    let write = GuestCommand::Write {
        start: GuestAddress(gpa),
        count: 1,
        stride: 8,
        value,
    };
    vm.execute(write, DEADLINE).expect("guest write");
}

/// Has the guest read the qword at `gpa` (its checksum of a single qword is the qword).
pub fn guest_read(vm: &mut Vm, gpa: u64) -> u64 {
    let read = GuestCommand::Checksum {
        start: GuestAddress(gpa),
        count: 1,
        stride: 8,
    };
    vm.execute(read, DEADLINE).expect("guest read").result
}

/// Opens `/dev/kvm`. cowvm cannot work without it, so its absence fails the test loudly.
pub fn kvm() -> Kvm {
    match Kvm::open() {
        Ok(kvm) => kvm,
        Err(e) => panic!("these tests boot real guests and need a working /dev/kvm: {e}"),
    }
}

/// The pagemap entries of every page of `ram`'s host mapping.
pub fn pagemap(ram: &GuestRam) -> Vec<PageMapEntry> {
    let map = PageMap::open().expect("open /proc/self/pagemap");
    map.read(ram.host_address(), (ram.size() / PAGE_SIZE) as usize)
        .expect("read pagemap")
}

/// Pages of `ram` that are private anonymous copies (written since the mapping was made; a read
/// of a template hole maps the shared zero page, which is not a copy).
pub fn private_pages(ram: &GuestRam) -> Vec<u64> {
    kernel::Kernel::open()
        .present_pages(ram.host_address(), ram.size())
        .iter()
        .filter(|p| !p.file && !p.zero())
        .map(|p| p.index)
        .collect()
}

/// Address where [`tiny_elf`] code starts.
pub const TINY_ELF_BASE: u64 = 0x10_0000;
const EHDR_SIZE: usize = 64;
const PHDR_SIZE: usize = 56;

/// A minimal static x86-64 ELF that loads at 1 MiB and enters `code` (placed right after the
/// headers). Returns the image and the entry address.
pub fn tiny_elf(code: &[u8]) -> (Vec<u8>, u64) {
    let entry = TINY_ELF_BASE + (EHDR_SIZE + PHDR_SIZE) as u64;
    let size = (EHDR_SIZE + PHDR_SIZE + code.len()) as u64;
    let mut elf = Vec::new();
    elf.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&0x3eu16.to_le_bytes()); // EM_X86_64
    elf.extend_from_slice(&1u32.to_le_bytes()); // EV_CURRENT
    elf.extend_from_slice(&entry.to_le_bytes());
    elf.extend_from_slice(&(EHDR_SIZE as u64).to_le_bytes()); // e_phoff
    elf.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    elf.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    for half in [EHDR_SIZE as u16, PHDR_SIZE as u16, 1, 0, 0, 0] {
        elf.extend_from_slice(&half.to_le_bytes()); // ehsize, phentsize, phnum, shentsize, shnum, shstrndx
    }
    elf.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    elf.extend_from_slice(&5u32.to_le_bytes()); // R|X
    for quad in [0, TINY_ELF_BASE, TINY_ELF_BASE, size, size, 0x1000] {
        elf.extend_from_slice(&quad.to_le_bytes()); // offset, vaddr, paddr, filesz, memsz, align
    }
    elf.extend_from_slice(code);
    (elf, entry)
}

/// Writes `image` to a fresh file under the system temp dir and returns its path.
pub fn write_temp_kernel(name: &str, image: &[u8]) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("cowvm-test-{}-{name}.elf", std::process::id()));
    std::fs::write(&path, image).expect("write test kernel");
    path
}

/// Open file descriptors of this process.
pub fn fd_count() -> usize {
    cowvm_vmm::host::open_fds().expect("list /proc/self/fd") as usize
}

/// Lines of `/proc/self/maps` (one per mapping).
pub fn maps_count() -> usize {
    cowvm_vmm::host::mappings().expect("read /proc/self/maps") as usize
}

/// A frozen template of the built-in guest with `memory_mib` MiB whose pages at `data_pages`
/// (guest physical addresses) each hold `gpa | 0xfeed` in their first qword.
pub fn template_with_data(kvm: &Kvm, memory_mib: u64, data_pages: &[u64]) -> cowvm_vmm::Template {
    let (mut vm, _) = Vm::boot(kvm, &cowvm_vmm::VmConfig::builtin(memory_mib)).expect("boot");
    for &gpa in data_pages {
        guest_write(&mut vm, gpa, gpa | 0xfeed);
    }
    cowvm_vmm::Template::freeze(kvm, &mut vm).expect("freeze")
}

/// A guest-ABI-v1 test guest built by `build.rs` with the C SDK: `misbehave.elf` or
/// `inflate.elf`.
pub fn abi_guest(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("OUT_DIR")).join(name)
}

/// Boots the guest-ABI-v1 ELF at `path` with `memory_mib` MiB and runs it to `ready()`.
pub fn abi_vm(kvm: &Kvm, path: &std::path::Path, memory_mib: u64) -> (Vm, cowvm_vmm::call::ReadyReport) {
    let config = cowvm_vmm::VmConfig {
        kernel: cowvm_vmm::Kernel::Elf(path.to_owned()),
        ..cowvm_vmm::VmConfig::builtin(memory_mib)
    };
    let (mut vm, report) = Vm::boot(kvm, &config).expect("boot the ABI guest");
    let ready = cowvm_vmm::call::run_to_ready(&mut vm, report.first_exit, Duration::from_secs(10))
        .expect("the ABI guest reaches ready()");
    (vm, ready)
}

/// A child process (e.g. a `cowvm serve` a test started) that is killed and reaped if the test
/// ends, or panics, before taking it back with [`ChildGuard::take`]: an orphaned server would
/// keep the test harness's output open.
pub struct ChildGuard(Option<std::process::Child>);

impl ChildGuard {
    /// Guards `child`.
    pub fn new(child: std::process::Child) -> Self {
        ChildGuard(Some(child))
    }

    /// The child's process id (0 once taken back).
    pub fn id(&self) -> u32 {
        self.0.as_ref().map_or(0, std::process::Child::id)
    }

    /// The child, no longer guarded (`None` if already taken).
    pub fn take(&mut self) -> Option<std::process::Child> {
        self.0.take()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
