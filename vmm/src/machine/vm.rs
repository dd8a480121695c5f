//! A VM: KVM VM fd, its vCPUs and its RAM. Boots the guest in long mode (every vCPU enters it
//! directly), runs guest commands on one vCPU or several at once, captures the state of every
//! vCPU and restores it into a fresh VM on a private view of frozen RAM.

use std::ops::Range;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kvm_bindings::kvm_clock_data;
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress};

use crate::boot::{self, BootError, IdentityPageSize};
use crate::command::{CommandError, CommandOutput, GuestCommand};
use crate::exit::GuestExit;
use crate::kvm::IoctlError;
use crate::kvm::{Kvm, KvmError};
use crate::kvm_stats::{KvmStats, StatsFile};
use crate::layout::{self, bytes_to_mib, KERNEL_START, MAX_MEMORY, MAX_VCPUS, MIN_MEMORY};
use crate::loader::{self, LoadError, LoadedKernel};
use crate::memory::{GuestRam, MemoryError, TemplateMemory, PAGE_SIZE};
use crate::pagemap::PageMap;
use crate::percentile::micros_since;
use crate::runner::{lock_slots, Guest};
use crate::slots::{SlotError, SlotMap, SlotPolicy, SlotStats};
use crate::translate::{self, GuestTranslation, TranslateError};
use crate::vcpu::{Vcpu, VcpuError, VcpuState};

/// Errors from building, running, capturing or restoring a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The KVM device refused something.
    #[error(transparent)]
    Kvm(#[from] KvmError),
    /// Guest RAM could not be created, mapped or frozen.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Boot structures could not be written.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// The kernel could not be loaded.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// A vCPU ioctl failed.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// A VM ioctl failed.
    #[error(transparent)]
    Ioctl(#[from] IoctlError),
    /// The memory size is not a whole number of MiB in the supported range.
    #[error(
        "memory of {memory_mib} MiB is outside the supported {}..={} MiB",
        bytes_to_mib(MIN_MEMORY),
        bytes_to_mib(MAX_MEMORY)
    )]
    MemorySize {
        /// Size asked for.
        memory_mib: u64,
    },
    /// The command was refused before it reached the guest.
    #[error("invalid guest command: {0}")]
    Command(#[from] CommandError),
    /// The guest stopped for a reason other than finishing its command.
    #[error("guest stopped: {0}")]
    GuestStopped(GuestExit),
    /// A guest virtual address did not translate.
    #[error(transparent)]
    Translate(#[from] TranslateError),
    /// KVM's binary statistics could not be read.
    #[error("reading KVM binary statistics (KVM_GET_STATS_FD) failed: {0}")]
    Stats(std::io::Error),
    /// The OS random number generator failed.
    #[error("cannot read a seed from the OS random number generator: {0}")]
    Entropy(String),
    /// Only a VM on a private view of a template can be reset to it.
    #[error("this VM owns its RAM; only a clone of a template can be reset")]
    NotAClone,
    /// A failed remap lost the VM's RAM (see [`GuestRam::is_lost`]); it can only be destroyed.
    #[error("this VM's RAM was lost when remapping it failed; the VM can only be destroyed")]
    RamLost,
    /// A memory slot could not be registered.
    #[error(transparent)]
    Slots(#[from] SlotError),
    /// The template's populated runs could not be listed (`SEEK_DATA`/`SEEK_HOLE`).
    #[error("listing the template's populated runs (SEEK_DATA/SEEK_HOLE) failed: {0}")]
    PopulatedRuns(std::io::Error),
    /// The VMM could not complete a guest access to RAM that had no memory slot yet.
    #[error("completing the guest's {len}-byte access at {gpa:#x} from the host mapping failed: {reason}")]
    LazyAccess {
        /// Guest physical address.
        gpa: u64,
        /// Bytes.
        len: usize,
        /// What vm-memory said.
        reason: String,
    },
    /// A VM must have 1 to [`MAX_VCPUS`] vCPUs.
    #[error("a VM has 1 to {MAX_VCPUS} vCPUs (asked for {count})")]
    VcpuCount {
        /// The number asked for.
        count: usize,
    },
    /// A command named a vCPU the VM does not have.
    #[error("vCPU {vcpu} does not exist; this VM has {count} (0..{count})")]
    NoSuchVcpu {
        /// The index asked for.
        vcpu: usize,
        /// How many vCPUs the VM has.
        count: usize,
    },
    /// Two commands of one concurrent run named the same vCPU.
    #[error("vCPU {vcpu} was given more than one command in one run")]
    DuplicateVcpu {
        /// The index named twice.
        vcpu: usize,
    },
    /// A host thread for a vCPU could not be started.
    #[error("cannot run a vCPU thread: {0}")]
    VcpuThread(std::io::Error),
    /// A vCPU of this multi-vCPU VM faulted, and its other vCPUs were stopped wherever they
    /// were; the VM runs nothing more until it is reset.
    #[error("vCPU {} faulted ({}); the VM's other vCPUs were stopped and it runs nothing until it is reset", .0.vcpu, .0.exit)]
    Failed(VcpuFailure),
    /// A state does not fit the memory it is restored onto.
    #[error("state is for {state} bytes of RAM, the frozen memory has {memory}")]
    StateMismatch {
        /// RAM size the state was captured with.
        state: u64,
        /// Size of the frozen memory.
        memory: u64,
    },
}

impl VmError {
    /// The OS error number behind the failure, when the host refused something (what the API
    /// answers 503 for when it means exhaustion).
    pub fn host_errno(&self) -> Option<i32> {
        match self {
            VmError::Kvm(kvm) => kvm.host_errno(),
            VmError::Vcpu(vcpu) => vcpu.host_errno(),
            VmError::Memory(memory) => memory.host_errno(),
            VmError::Ioctl(ioctl) => Some(ioctl.errno()),
            VmError::VcpuThread(io) => io.raw_os_error(),
            _ => None,
        }
    }
}

/// Which kernel to boot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kernel {
    /// cowvm's built-in guest (the command loop).
    #[default]
    Builtin,
    /// A 64-bit ELF from a file, entered the same way.
    Elf(PathBuf),
    /// A 64-bit ELF held in memory (what a cell boots), entered the same way. Never serialized.
    #[serde(skip)]
    Image(loader::KernelImage),
}

/// How to build a VM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// The kernel.
    pub kernel: Kernel,
    /// Leaf size of the identity map; `None` picks 1 GiB where the CPU supports it.
    pub page_size: Option<IdentityPageSize>,
    /// Number of vCPUs (1 to [`MAX_VCPUS`]); each enters the kernel with its own stack and its
    /// index in its GS base.
    pub vcpus: usize,
}

/// Which vCPU of a multi-vCPU VM faulted, and how.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VcpuFailure {
    /// The vCPU that faulted first.
    pub vcpu: usize,
    /// Its exit.
    pub exit: GuestExit,
}

impl VmConfig {
    /// The built-in guest with `memory_mib` MiB of RAM.
    pub fn builtin(memory_mib: u64) -> Self {
        VmConfig {
            memory_mib,
            kernel: Kernel::Builtin,
            page_size: None,
            vcpus: 1,
        }
    }
}

/// Where the time went while booting, in microseconds.
#[derive(Debug, Clone, Serialize)]
pub struct BootTimings {
    /// `KVM_CREATE_VM`.
    pub create_vm_us: f64,
    /// memfd, size and mapping.
    pub memory_us: f64,
    /// `KVM_SET_USER_MEMORY_REGION`.
    pub memslot_us: f64,
    /// ELF load.
    pub load_kernel_us: f64,
    /// GDT, IDT and page tables.
    pub boot_structures_us: f64,
    /// `KVM_CREATE_VCPU`, CPUID, registers.
    pub vcpu_us: f64,
    /// First `KVM_RUN` to the first exit.
    pub first_run_us: f64,
}

/// What happened when a VM booted.
#[derive(Debug, Clone, Serialize)]
pub struct BootReport {
    /// The first exit the guest made.
    pub first_exit: GuestExit,
    /// From just before `KVM_CREATE_VM` to the return of the first `KVM_RUN`.
    pub first_exit_us: f64,
    /// The steps.
    pub timings: BootTimings,
    /// Leaf size of the identity map.
    pub page_size: IdentityPageSize,
    /// Where the kernel was entered.
    pub entry: u64,
}

/// Everything needed, besides RAM, to resume a VM elsewhere.
#[derive(Serialize, Deserialize)]
pub struct VmState {
    /// RAM size in bytes.
    pub memory_size: u64,
    /// End of the memory the guest must not overwrite with commands (kernel image and below).
    pub protected_end: u64,
    /// The KVM clock.
    pub clock: kvm_clock_data,
    /// Each vCPU's state.
    pub vcpus: Vec<VcpuState>,
}

/// A KVM VM with one or more vCPUs.
pub struct Vm {
    // Drop order: the vCPUs, then the VM fd (which removes the memslot), then the RAM.
    vcpus: Vec<Vcpu>,
    vm_fd: VmFd,
    ram: GuestRam,
    slots: Mutex<SlotMap>,
    protected_end: u64,
    /// When the guest clocks were last set from a state (restore, reset, rehearsal, take).
    clocks_started: Instant,
    /// The first fault of a vCPU of a multi-vCPU VM, until a reset.
    failure: Option<VcpuFailure>,
    /// TSCs captured for vCPUs 1 and up that [`Vm::start_clocks`] left to be written just
    /// before each of them next runs (see there), by vCPU index.
    pending_tsc: Vec<Option<u64>>,
    /// The guest TSC frequency, once read.
    tsc_khz: Option<u32>,
}

fn vm_ioctl(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Ioctl(IoctlError { op, source })
}

/// A VM fd and the RAM registered in it as a memslot, while the VM is being built. Fields drop
/// in declaration order, so on every error path after registration the VM fd (and with it the
/// memslot) goes before the RAM the slot points into, as in [`Vm`] afterwards. (Locals would
/// drop the other way round: the RAM, created after the VM fd, first.)
struct Slotted<F, R> {
    vm_fd: F,
    ram: R,
}

impl Slotted<VmFd, GuestRam> {
    /// Registers `ram` in `vm_fd` as memory slots by `policy` (see [`SlotMap::register`] for
    /// `needed` and `data`). If registration fails part way, the slots made so far go with the
    /// VM fd, which is dropped before `ram` on that path too.
    fn register(
        vm_fd: VmFd,
        ram: GuestRam,
        policy: SlotPolicy,
        needed: &[Range<u64>],
        data: &[Range<u64>],
    ) -> Result<(Self, SlotMap), VmError> {
        let slotted = Slotted { vm_fd, ram };
        // SAFETY: the slots point into `slotted.ram`'s live mapping, which outlives the VM fd:
        // `Slotted` and then `Vm` drop the fd first, and so does this function's error path
        // (`slotted` drops as one value, fields in declaration order).
        let slots = unsafe {
            SlotMap::register(
                &slotted.vm_fd,
                slotted.ram.host_address(),
                slotted.ram.size(),
                policy,
                needed,
                data,
            )
        }?;
        Ok((slotted, slots))
    }
}

impl Vm {
    /// Creates a VM, loads the kernel, writes the boot structures, enters long mode and runs the
    /// guest to its first exit. The built-in guest's first exit is `done` with status 0.
    pub fn boot(kvm: &Kvm, config: &VmConfig) -> Result<(Vm, BootReport), VmError> {
        Self::boot_with_deadline(kvm, config, FIRST_EXIT_DEADLINE)
    }

    /// [`Vm::boot`], stopping the guest if it has not reached its first exit within `deadline`
    /// (a kernel that spins then fails with the deadline, instead of holding the caller).
    pub fn boot_with_deadline(kvm: &Kvm, config: &VmConfig, deadline: Duration) -> Result<(Vm, BootReport), VmError> {
        let memory_size = layout::mib(config.memory_mib);
        if boot::check_memory_size(memory_size).is_err() {
            return Err(VmError::MemorySize {
                memory_mib: config.memory_mib,
            });
        }
        check_vcpu_count(config.vcpus)?;
        let page_size = config.page_size.unwrap_or(if kvm.supports_1gib_pages() {
            IdentityPageSize::OneGib
        } else {
            IdentityPageSize::TwoMib
        });

        let start = Instant::now();
        let vm_fd = kvm.create_vm()?;
        let create_vm_us = micros_since(start);

        let step = Instant::now();
        let ram = GuestRam::new_owned(memory_size)?;
        let memory_us = micros_since(step);

        let step = Instant::now();
        // A booted VM owns RAM that starts empty and is written by the VMM and the guest at will:
        // it gets one eager slot (lazy slots are for clones and warm shells, where RAM size is
        // multiplied by the number of VMs).
        let (slotted, slots) = Slotted::register(vm_fd, ram, SlotPolicy::Eager, &[], &[])?;
        let memslot_us = micros_since(step);

        let step = Instant::now();
        let kernel = match &config.kernel {
            Kernel::Builtin => loader::load_builtin(slotted.ram.guest_memory())?,
            Kernel::Elf(path) => loader::load_file(slotted.ram.guest_memory(), path)?,
            Kernel::Image(image) => loader::load_bytes(slotted.ram.guest_memory(), image)?,
        };
        let load_kernel_us = micros_since(step);

        let step = Instant::now();
        boot::write_boot_structures(slotted.ram.guest_memory(), memory_size, page_size)?;
        let boot_structures_us = micros_since(step);

        let step = Instant::now();
        let mut vcpus = Vec::with_capacity(config.vcpus);
        for index in 0..config.vcpus {
            let mut vcpu = Vcpu::new(kvm, &slotted.vm_fd, index as u8)?;
            let mut sregs = vcpu.sregs()?;
            boot::long_mode_sregs(&mut sregs);
            boot::set_vcpu_id(&mut sregs, index);
            vcpu.set_sregs(&sregs)?;
            vcpu.set_regs(&boot::entry_regs(kernel.entry, index))?;
            vcpu.set_fpu(&boot::initial_fpu())?;
            vcpus.push(vcpu);
        }
        let vcpu_us = micros_since(step);

        let mut vm = Vm {
            vcpus,
            vm_fd: slotted.vm_fd,
            ram: slotted.ram,
            slots: Mutex::new(slots),
            protected_end: protected_end(&kernel),
            clocks_started: Instant::now(),
            failure: None,
            pending_tsc: vec![None; config.vcpus],
            tsc_khz: None,
        };
        let step = Instant::now();
        // Every vCPU runs to its first exit; the report names vCPU 0's, or the first fault.
        let all: Vec<usize> = (0..config.vcpus).collect();
        let mut first_exit = None;
        for exit in vm.run_vcpus(&all, Some(deadline)) {
            let exit = exit?;
            if first_exit.is_none() || (exit.is_fault() && !first_exit.as_ref().is_some_and(GuestExit::is_fault)) {
                first_exit = Some(exit);
            }
        }
        let first_exit = first_exit.unwrap_or(GuestExit::Other {
            description: "no vCPU ran".into(),
        });
        let first_run_us = micros_since(step);
        let first_exit_us = micros_since(start);
        let report = BootReport {
            first_exit,
            first_exit_us,
            timings: BootTimings {
                create_vm_us,
                memory_us,
                memslot_us,
                load_kernel_us,
                boot_structures_us,
                vcpu_us,
                first_run_us,
            },
            page_size,
            entry: kernel.entry.0,
        };
        Ok((vm, report))
    }

    /// Builds a new VM on a private (copy-on-write) mapping of `template` and restores `state`
    /// into it, with lazy memory slots. The VM has not run yet; its next run continues where the
    /// captured VM stopped.
    pub fn restore(kvm: &Kvm, template: &TemplateMemory, state: &VmState) -> Result<Vm, VmError> {
        Self::restore_with(kvm, template, state, SlotPolicy::Lazy)
    }

    /// Like [`Vm::restore`], with the memory slots registered by `policy`. Lazy slots start with
    /// the chunks the vCPU must reach without an exit (everything below `protected_end`, every
    /// page table reachable from CR3, the pages at rip and rsp, the GDT, IDT and TSS) and the
    /// chunks the template's populated runs fill densely.
    pub fn restore_with(
        kvm: &Kvm,
        template: &TemplateMemory,
        state: &VmState,
        policy: SlotPolicy,
    ) -> Result<Vm, VmError> {
        if state.memory_size != template.size() {
            return Err(VmError::StateMismatch {
                state: state.memory_size,
                memory: template.size(),
            });
        }
        let vm_fd = kvm.create_vm()?;
        let ram = GuestRam::new_private(template)?;
        let (needed, data) = match policy {
            SlotPolicy::Eager => (Vec::new(), Default::default()),
            SlotPolicy::Lazy => (
                needed_at_start(&ram, state),
                template.data_runs().map_err(VmError::PopulatedRuns)?,
            ),
        };
        check_vcpu_count(state.vcpus.len().max(1))?;
        let (slotted, slots) = Slotted::register(vm_fd, ram, policy, &needed, &data)?;
        let mut vcpus = Vec::with_capacity(state.vcpus.len().max(1));
        for index in 0..state.vcpus.len().max(1) {
            let mut vcpu = Vcpu::new(kvm, &slotted.vm_fd, index as u8)?;
            if let Some(vcpu_state) = state.vcpus.get(index) {
                vcpu.restore(vcpu_state)?;
            }
            vcpus.push(vcpu);
        }
        set_clock(&slotted.vm_fd, state)?;
        Ok(Vm {
            vcpus,
            vm_fd: slotted.vm_fd,
            ram: slotted.ram,
            slots: Mutex::new(slots),
            protected_end: state.protected_end,
            clocks_started: Instant::now(),
            failure: None,
            pending_tsc: vec![None; state.vcpus.len().max(1)],
            tsc_khz: None,
        })
    }

    /// Returns the VM to `state` in place: drops the pages it has copied since it was mapped
    /// (found in the host's page tables, so writes by anyone count), completes any pending I/O
    /// and restores the vCPU and clock.
    pub fn reset(&mut self, state: &VmState, pagemap: &PageMap) -> Result<ResetSteps, VmError> {
        self.check_ram()?;
        if self.ram.template().is_none() {
            return Err(VmError::NotAClone);
        }
        // An I/O exit left pending (an `in` above all) would be completed at the next entry,
        // after the restore, and overwrite the restored rip and rax: complete it first, and
        // before the scan, since completing it may write guest memory (string I/O, MMIO).
        for vcpu in &mut self.vcpus {
            vcpu.complete_pending_io()?;
        }
        let step = Instant::now();
        let runs = self.ram.private_runs(pagemap)?;
        let scan_us = micros_since(step);
        let step = Instant::now();
        self.ram.discard(&runs)?;
        let discard_us = micros_since(step);
        let step = Instant::now();
        self.restore_vcpus(state)?;
        set_clock(&self.vm_fd, state)?;
        self.clocks_started = Instant::now();
        self.failure = None;
        let restore_us = micros_since(step);
        let pages_dropped = runs.iter().map(|r| (r.end - r.start) / PAGE_SIZE).sum();
        Ok(ResetSteps {
            pages_dropped,
            runs: runs.len(),
            scan_us,
            discard_us,
            restore_us,
        })
    }

    /// Enters the guest once from its restored state and then puts everything back: pending
    /// I/O completed, any page the run copied dropped, vCPU and clock restored. On hosts with
    /// shadow paging the first entry into a new VM costs time that grows with RAM size (about
    /// 110 µs at 64 MiB and 450 µs at 4 GiB measured here, against 14 µs for later entries);
    /// warm shells pay it in the background so that a clone's first run does not.
    pub fn rehearse_first_run(&mut self, state: &VmState, pagemap: &PageMap) -> Result<(), VmError> {
        self.check_ram()?;
        // One vCPU after the other: this runs off the request path, and a fault of one must not
        // stop the others' rehearsal.
        let (vcpus, guest) = self.parts();
        for vcpu in vcpus {
            guest.run(vcpu, Some(REHEARSAL_DEADLINE), None)?;
            vcpu.complete_pending_io()?;
        }
        let runs = self.ram.private_runs(pagemap)?;
        self.ram.discard(&runs)?;
        self.restore_vcpus(state)?;
        self.failure = None;
        set_clock(&self.vm_fd, state)?;
        self.clocks_started = Instant::now();
        Ok(())
    }

    /// Starts the guest's clocks from `state`, now: the KVM clock reads the captured value from
    /// this moment on, and so does the TSC where the state saved it. This is what defines a
    /// clone's clock (see docs/architecture.md, "Guest clocks of clones"); the clone engine calls
    /// it when a clone is taken, whether from a warm shell or built on the spot.
    ///
    /// `KVM_SET_CLOCK` costs about 0.6 µs. The TSC is rewritten (`KVM_SET_MSRS`, about 6 µs here)
    /// only if the clocks were last set at least [`TSC_RESYNC_WINDOW`] ago: KVM takes a host
    /// write within that window of the TSC it expects as a resynchronisation and keeps the
    /// running offset, so an earlier write would change nothing.
    ///
    /// Only vCPU 0's TSC is written here; the write of each other vCPU's waits until that vCPU
    /// next runs (or is captured), and then writes the captured value plus the ticks since the
    /// clocks started. KVM takes such a write, within its window of what it expects from vCPU
    /// 0's, as a synchronisation and gives the vCPU vCPU 0's offset, so the TSCs agree as if all
    /// were written now, and a clone's spawn costs one TSC write whatever its vCPU count.
    pub fn start_clocks(&mut self, state: &VmState) -> Result<(), VmError> {
        if self.clocks_started.elapsed() >= TSC_RESYNC_WINDOW {
            for (index, (vcpu, vcpu_state)) in self.vcpus.iter().zip(&state.vcpus).enumerate() {
                match (index, vcpu_state.tsc()) {
                    (0, Some(tsc)) => vcpu.set_tsc(tsc)?,
                    (_, tsc) => self.pending_tsc[index] = tsc,
                }
            }
        }
        set_clock(&self.vm_fd, state)?;
        self.clocks_started = Instant::now();
        Ok(())
    }

    /// The KVM clock now, in nanoseconds (`KVM_GET_CLOCK`).
    pub fn kvm_clock_ns(&self) -> Result<u64, VmError> {
        Ok(self.vm_fd.get_clock().map_err(vm_ioctl("KVM_GET_CLOCK"))?.clock)
    }

    /// Captures the VM's state (the VM must be stopped at an exit, as it is between calls).
    pub fn capture_state(&mut self, kvm: &Kvm) -> Result<VmState, VmError> {
        for index in 0..self.vcpus.len() {
            self.write_pending_tsc(index)?;
        }
        let vcpus = self
            .vcpus
            .iter_mut()
            .map(|vcpu| vcpu.capture(kvm))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(VmState {
            memory_size: self.ram.size(),
            protected_end: self.protected_end,
            clock: self.vm_fd.get_clock().map_err(vm_ioctl("KVM_GET_CLOCK"))?,
            vcpus,
        })
    }

    /// Freezes the VM: captures its state and turns its RAM into template memory. RAM the VM
    /// owns is sealed in place without a copy; a clone's RAM becomes a layered template holding
    /// only its private pages. The VM itself goes on running on a private view of that memory.
    pub fn freeze(&mut self, kvm: &Kvm) -> Result<(TemplateMemory, VmState), VmError> {
        let pagemap = PageMap::open().map_err(MemoryError::PageMap)?;
        self.freeze_with(kvm, &pagemap)
    }

    /// [`Vm::freeze`] reading the host's page tables through `pagemap` (this process's, already
    /// open: a sandboxed cell may no longer open files).
    pub fn freeze_with(&mut self, kvm: &Kvm, pagemap: &PageMap) -> Result<(TemplateMemory, VmState), VmError> {
        self.check_ram()?;
        let state = self.capture_state(kvm)?;
        let memory = self.ram.freeze(pagemap)?;
        Ok((memory, state))
    }

    /// Validates `command`, loads it into vCPU 0's registers, runs it and returns its answer.
    /// Any exit other than the guest finishing is an error that names the exit.
    pub fn execute(&mut self, command: GuestCommand, deadline: Option<Duration>) -> Result<CommandOutput, VmError> {
        self.execute_on(0, command, deadline)
    }

    /// [`Vm::execute`] on vCPU `vcpu`, on the calling thread; the other vCPUs stay where they
    /// stopped.
    pub fn execute_on(
        &mut self,
        vcpu: usize,
        command: GuestCommand,
        deadline: Option<Duration>,
    ) -> Result<CommandOutput, VmError> {
        self.execute_on_timed(vcpu, command, deadline).map(|(output, _)| output)
    }

    /// Like [`Vm::execute`], and also returns how long the `KVM_RUN` itself took (host-timed
    /// around the ioctl; registers are staged through sync regs, so no other ioctl is inside).
    pub fn execute_timed(
        &mut self,
        command: GuestCommand,
        deadline: Option<Duration>,
    ) -> Result<(CommandOutput, Duration), VmError> {
        self.execute_on_timed(0, command, deadline)
    }

    /// [`Vm::execute_timed`] on vCPU `vcpu`.
    pub fn execute_on_timed(
        &mut self,
        vcpu: usize,
        command: GuestCommand,
        deadline: Option<Duration>,
    ) -> Result<(CommandOutput, Duration), VmError> {
        self.stage(vcpu, command)?;
        let started = Instant::now();
        let exit = self
            .run_vcpus(&[vcpu], deadline)
            .pop()
            .unwrap_or(Err(VmError::NoSuchVcpu {
                vcpu,
                count: self.vcpus.len(),
            }))?;
        let took = started.elapsed();
        Ok((self.answer(vcpu, command, exit)?, took))
    }

    /// Runs one command on each of several vCPUs at once, each vCPU on its own host thread, and
    /// returns their answers in the order given. The first vCPU that faults (or misses
    /// `deadline`) stops the others and marks the VM failed (see [`Vm::failure`]). Refused as a
    /// whole, before anything runs, if a vCPU is named twice or does not exist, or a command is
    /// invalid.
    pub fn execute_concurrently(
        &mut self,
        commands: &[(usize, GuestCommand)],
        deadline: Option<Duration>,
    ) -> Result<Vec<Result<CommandOutput, VmError>>, VmError> {
        for (i, (vcpu, _)) in commands.iter().enumerate() {
            if commands[..i].iter().any(|(other, _)| other == vcpu) {
                return Err(VmError::DuplicateVcpu { vcpu: *vcpu });
            }
            self.check_ready(*vcpu)?;
        }
        for &(vcpu, command) in commands {
            self.stage(vcpu, command)?;
        }
        let indices: Vec<usize> = commands.iter().map(|(vcpu, _)| *vcpu).collect();
        let exits = self.run_vcpus(&indices, deadline);
        Ok(commands
            .iter()
            .zip(exits)
            .map(|(&(vcpu, command), exit)| exit.and_then(|exit| self.answer(vcpu, command, exit)))
            .collect())
    }

    /// Checks that vCPU `vcpu` may run a command, validates `command` and loads it into the
    /// vCPU's registers.
    fn stage(&mut self, vcpu: usize, command: GuestCommand) -> Result<(), VmError> {
        self.check_ready(vcpu)?;
        self.write_pending_tsc(vcpu)?;
        command.validate(self.ram.size(), self.protected_end)?;
        let target = &mut self.vcpus[vcpu];
        let mut regs = target.regs()?;
        command.load(&mut regs);
        target.set_regs(&regs)?;
        Ok(())
    }

    /// The answer of vCPU `vcpu` to `command`, after it exited with `exit`.
    fn answer(&mut self, vcpu: usize, command: GuestCommand, exit: GuestExit) -> Result<CommandOutput, VmError> {
        match exit {
            GuestExit::Done { status } => {
                let regs = self.vcpus[vcpu].regs()?;
                Ok(CommandOutput {
                    status,
                    result: regs.rbx,
                    extra: regs.rcx,
                    vcpu: (command == GuestCommand::Identity).then_some(regs.rdx),
                })
            }
            other => Err(VmError::GuestStopped(other)),
        }
    }

    /// Runs the vCPUs `indices` (checked by the caller) from their current state: one on the
    /// calling thread, several at once on threads of their own (see [`crate::runner`]). In a VM
    /// with more than one vCPU, the first fault is recorded as the VM's failure.
    fn run_vcpus(&mut self, indices: &[usize], deadline: Option<Duration>) -> Vec<Result<GuestExit, VmError>> {
        let smp = self.vcpus.len() > 1;
        let (vcpus, guest) = self.parts();
        let results = match indices {
            [only] => match vcpus.get_mut(*only) {
                Some(vcpu) => vec![guest.run(vcpu, deadline, None)],
                None => vec![Err(VmError::NoSuchVcpu {
                    vcpu: *only,
                    count: vcpus.len(),
                })],
            },
            _ => guest.run_concurrently(vcpus, indices, deadline),
        };
        if smp && self.failure.is_none() {
            let first_fault = indices.iter().zip(&results).find_map(|(&vcpu, result)| match result {
                Ok(exit) if exit.is_fault() && !matches!(exit, GuestExit::Stopped { .. }) => Some(VcpuFailure {
                    vcpu,
                    exit: exit.clone(),
                }),
                _ => None,
            });
            self.failure = first_fault;
        }
        results
    }

    /// The vCPUs, and what they share while they run.
    fn parts(&mut self) -> (&mut [Vcpu], Guest<'_>) {
        (
            &mut self.vcpus,
            Guest {
                vm_fd: &self.vm_fd,
                ram: &self.ram,
                slots: &self.slots,
            },
        )
    }

    /// Restores every vCPU from `state` (which sets each TSC: nothing is left pending).
    fn restore_vcpus(&mut self, state: &VmState) -> Result<(), VmError> {
        self.pending_tsc.iter_mut().for_each(|pending| *pending = None);
        for (vcpu, vcpu_state) in self.vcpus.iter_mut().zip(&state.vcpus) {
            vcpu.restore(vcpu_state)?;
        }
        Ok(())
    }

    /// Writes the TSC [`Vm::start_clocks`] left pending for vCPU `index`, if any: the captured
    /// value plus the guest ticks since the clocks started.
    fn write_pending_tsc(&mut self, index: usize) -> Result<(), VmError> {
        let Some(captured) = self.pending_tsc.get_mut(index).and_then(Option::take) else {
            return Ok(());
        };
        let khz = match self.tsc_khz {
            Some(khz) => khz,
            None => *self.tsc_khz.insert(self.vcpus[0].tsc_khz()?),
        };
        let ticks = self.clocks_started.elapsed().as_nanos() * u128::from(khz) / 1_000_000;
        self.vcpus[index].set_tsc(captured.wrapping_add(ticks as u64))?;
        Ok(())
    }

    /// The first fault of a vCPU of this multi-vCPU VM since it was built or last reset; while
    /// there is one, the VM runs no command. (A VM with one vCPU keeps no such mark: its next
    /// command simply reloads its only vCPU.)
    pub fn failure(&self) -> Option<&VcpuFailure> {
        self.failure.as_ref()
    }

    /// Translates a guest virtual address with the guest's own page tables (read from guest
    /// memory, starting at vCPU 0's CR3, which every vCPU of the built-in guest shares).
    pub fn translate(&mut self, gva: u64) -> Result<GuestTranslation, VmError> {
        self.check_ram()?;
        let sregs = self.vcpus[0].sregs()?;
        Ok(translate::walk(
            self.ram.guest_memory(),
            sregs.cr0,
            sregs.cr3,
            sregs.efer,
            gva,
        )?)
    }

    /// KVM's binary statistics of the VM and of each of its vCPUs, now.
    pub fn kvm_stats(&self) -> Result<KvmStats, VmError> {
        let read = |fd: &dyn AsRawFd| {
            struct Fd(i32);
            impl AsRawFd for Fd {
                fn as_raw_fd(&self) -> i32 {
                    self.0
                }
            }
            StatsFile::open(&Fd(fd.as_raw_fd()))?.read()
        };
        let vm = read(&self.vm_fd).map_err(VmError::Stats)?;
        let vcpus = self
            .vcpus
            .iter()
            .map(|vcpu| read(vcpu.fd()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(VmError::Stats)?;
        Ok(KvmStats { vm, vcpus })
    }

    /// New binary-stats fds of the VM and of each of its vCPUs in vCPU order
    /// (`KVM_GET_STATS_FD`), e.g. to hand to another process that reads the statistics with
    /// [`StatsFile::from_file`] (the same shape as [`Vm::kvm_stats`]).
    pub fn stats_fds(&self) -> Result<(std::fs::File, Vec<std::fs::File>), VmError> {
        let vm = crate::kvm_stats::stats_fd(&self.vm_fd).map_err(VmError::Stats)?;
        Ok((vm, self.vcpu_stats_fds()?))
    }

    /// New binary-stats fds of every vCPU, in vCPU order.
    pub fn vcpu_stats_fds(&self) -> Result<Vec<std::fs::File>, VmError> {
        self.vcpus
            .iter()
            .map(|vcpu| crate::kvm_stats::stats_fd(vcpu.fd()).map_err(VmError::Stats))
            .collect()
    }

    /// The end of low memory that guest commands may not write (VMM structures and kernel).
    pub fn protected_end(&self) -> u64 {
        self.protected_end
    }

    /// Resumes vCPU 0 until its next exit (or `deadline`).
    pub fn run(&mut self, deadline: Option<Duration>) -> Result<GuestExit, VmError> {
        self.run_on(0, deadline)
    }

    /// Resumes vCPU `vcpu` until its next exit (or `deadline`).
    pub fn run_on(&mut self, vcpu: usize, deadline: Option<Duration>) -> Result<GuestExit, VmError> {
        self.check_ready(vcpu)?;
        self.write_pending_tsc(vcpu)?;
        self.run_vcpus(&[vcpu], deadline)
            .pop()
            .unwrap_or(Err(VmError::NoSuchVcpu {
                vcpu,
                count: self.vcpus.len(),
            }))
    }

    /// Hands the guest its identity for the next resume of every vCPU: generation id in r14,
    /// seed in r15.
    pub fn set_identity(&mut self, generation: u64, seed: u64) -> Result<(), VmError> {
        for vcpu in &mut self.vcpus {
            let mut regs = vcpu.regs()?;
            regs.r14 = generation;
            regs.r15 = seed;
            vcpu.set_regs(&regs)?;
        }
        Ok(())
    }

    /// The VM's RAM.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// The VM's memory slots now: how many, what they cover, how many accesses the VMM completed.
    pub fn slot_stats(&self) -> SlotStats {
        lock_slots(&self.slots).stats()
    }

    /// Why this VM's lazy slots fell back to one eager slot, if they did.
    pub fn slot_fallback(&self) -> Option<&'static str> {
        lock_slots(&self.slots).fallback()
    }

    /// Number of vCPUs.
    pub fn vcpu_count(&self) -> usize {
        self.vcpus.len()
    }

    /// vCPU 0.
    pub fn vcpu(&self) -> &Vcpu {
        &self.vcpus[0]
    }

    /// vCPU 0, mutably (its register cache changes on reads).
    pub fn vcpu_mut(&mut self) -> &mut Vcpu {
        &mut self.vcpus[0]
    }

    /// vCPU `index`, if the VM has it.
    pub fn vcpu_at(&self, index: usize) -> Option<&Vcpu> {
        self.vcpus.get(index)
    }

    /// vCPU `index`, mutably, if the VM has it.
    pub fn vcpu_at_mut(&mut self, index: usize) -> Option<&mut Vcpu> {
        self.vcpus.get_mut(index)
    }

    /// Reads a qword of guest RAM from the host side.
    pub fn read_u64(&self, gpa: GuestAddress) -> Result<u64, VmError> {
        self.check_ram()?;
        self.ram.guest_memory().read_obj(gpa).map_err(|source| {
            VmError::Boot(BootError::Write {
                what: "read",
                addr: gpa.0,
                source,
            })
        })
    }

    /// Refuses to go on with a VM whose RAM a failed remap lost: running it would let the guest
    /// reach whatever the host maps there now, and reading it could fault.
    fn check_ram(&self) -> Result<(), VmError> {
        if self.ram.is_lost() {
            return Err(VmError::RamLost);
        }
        Ok(())
    }

    /// Checks that vCPU `vcpu` exists and may run: RAM intact, and no vCPU of this multi-vCPU
    /// VM has faulted since the last reset.
    fn check_ready(&self, vcpu: usize) -> Result<(), VmError> {
        self.check_ram()?;
        if vcpu >= self.vcpus.len() {
            return Err(VmError::NoSuchVcpu {
                vcpu,
                count: self.vcpus.len(),
            });
        }
        match &self.failure {
            Some(failure) => Err(VmError::Failed(failure.clone())),
            None => Ok(()),
        }
    }
}

/// Checks a vCPU count against [`MAX_VCPUS`].
fn check_vcpu_count(count: usize) -> Result<(), VmError> {
    if (1..=MAX_VCPUS).contains(&count) {
        Ok(())
    } else {
        Err(VmError::VcpuCount { count })
    }
}

/// KVM treats a host write of the TSC within one second (of guest TSC) of the value it expects
/// as a resynchronisation and keeps the running offset (`kvm_synchronize_tsc` in
/// `arch/x86/kvm/x86.c`).
pub const TSC_RESYNC_WINDOW: Duration = Duration::from_secs(1);

/// How long a warm shell's rehearsal run may take; a guest still running then is stopped.
const REHEARSAL_DEADLINE: Duration = Duration::from_millis(100);

/// Where the time of a reset went.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
pub struct ResetSteps {
    /// Private pages dropped.
    pub pages_dropped: u64,
    /// Runs (contiguous ranges) they formed.
    pub runs: usize,
    /// Microseconds finding them with `PAGEMAP_SCAN`.
    pub scan_us: f64,
    /// Microseconds of `MADV_DONTNEED` on the runs (the host frees the pages; KVM drops its
    /// mappings).
    pub discard_us: f64,
    /// Microseconds restoring every vCPU's state and the clocks.
    pub restore_us: f64,
}

/// How long the first run of a freshly booted guest may take before it counts as hung.
pub const FIRST_EXIT_DEADLINE: Duration = Duration::from_secs(10);

fn set_clock(vm_fd: &VmFd, state: &VmState) -> Result<(), VmError> {
    let mut clock = state.clock;
    clock.flags = 0;
    vm_fd.set_clock(&clock).map_err(vm_ioctl("KVM_SET_CLOCK"))
}

/// What the vCPU of a VM restored from `state` must reach without an exit: instruction fetches,
/// page-table walks, descriptor-table reads and exception frames do not go through the VMM's
/// completion of MMIO exits. All low memory up to the end of the kernel image, every page table
/// reachable from CR3, and the pages at rip, rsp, the GDT, the IDT and the TSS.
fn needed_at_start(ram: &GuestRam, state: &VmState) -> Vec<Range<u64>> {
    let mem = ram.guest_memory();
    let low_memory = 0..state.protected_end.max(KERNEL_START.0);
    let mut needed = Vec::from([low_memory]);
    for vcpu in &state.vcpus {
        let sregs = &vcpu.sregs;
        let pages = crate::slots::page_table_pages(mem, sregs.cr3);
        needed.extend(pages.into_iter().map(|page| page..page + PAGE_SIZE));
        let regions = [
            (vcpu.regs.rip, PAGE_SIZE),
            (vcpu.regs.rsp.saturating_sub(PAGE_SIZE), 2 * PAGE_SIZE),
            (sregs.gdt.base, u64::from(sregs.gdt.limit) + 1),
            (sregs.idt.base, u64::from(sregs.idt.limit) + 1),
            (sregs.tr.base, u64::from(sregs.tr.limit) + 1),
        ];
        for (gva, len) in regions {
            for at in [gva, gva.saturating_add(len.saturating_sub(1))] {
                if let Ok(t) = translate::walk(mem, sregs.cr0, sregs.cr3, sregs.efer, at) {
                    let page = t.gpa & !(PAGE_SIZE - 1);
                    needed.push(page..page + PAGE_SIZE);
                }
            }
        }
    }
    needed
}

fn protected_end(kernel: &LoadedKernel) -> u64 {
    kernel.end.0.max(KERNEL_START.0).div_ceil(PAGE_SIZE) * PAGE_SIZE
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;

    /// Records its name in a shared log when dropped.
    struct Noisy<'a>(&'static str, &'a RefCell<Vec<&'static str>>);

    impl Drop for Noisy<'_> {
        fn drop(&mut self) {
            self.1.borrow_mut().push(self.0);
        }
    }

    #[test]
    fn test_a_vm_being_built_drops_its_vm_fd_before_the_ram_its_memslot_points_into() {
        let log = RefCell::new(Vec::new());
        let build = || -> Result<(), &'static str> {
            let ram = Noisy("ram", &log);
            let vm_fd = Noisy("vm fd", &log);
            let _slotted = Slotted { vm_fd, ram };
            let _vcpu = Noisy("vcpu", &log);
            Err("a later step failed")
        };
        assert!(build().is_err());
        assert_eq!(*log.borrow(), ["vcpu", "vm fd", "ram"]);
    }

    #[test]
    fn test_a_vm_whose_remap_left_a_hole_is_failed_and_refuses_to_run() {
        let kvm = Kvm::open().expect("this test needs /dev/kvm");
        let (mut vm, _) = Vm::boot(&kvm, &VmConfig::builtin(16)).expect("boot");
        let error = vm.ram.fail_remap_as_before_6_12();
        assert!(matches!(error, MemoryError::RamLost { .. }), "{error}");
        assert!(vm.ram().is_lost());
        assert!(matches!(vm.run(None), Err(VmError::RamLost)));
        assert!(matches!(vm.execute(GuestCommand::Exit, None), Err(VmError::RamLost)));
        assert!(matches!(vm.freeze(&kvm), Err(VmError::RamLost)));
        assert!(matches!(vm.read_u64(GuestAddress(0)), Err(VmError::RamLost)));
        drop(vm);
    }
}
