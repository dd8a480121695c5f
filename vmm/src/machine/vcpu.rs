//! One vCPU: creating it, running it to its next exit (with an optional deadline), and capturing
//! and restoring its complete architectural state.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use cowvm_guest::protocol::{PORT_DONE, PORT_EXCEPTION};
use kvm_bindings::{
    kvm_debugregs, kvm_fpu, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Cap, SyncReg, VcpuExit, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

use crate::exit::GuestExit;
use crate::kvm::IoctlError;
use crate::kvm::{Kvm, KvmError};
use crate::watchdog::Deadline;

/// The value of a stop flag (see [`Vcpu::run_until`]) while no vCPU has faulted.
pub const NOT_STOPPED: usize = usize::MAX;

/// A failed vCPU ioctl.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// An ioctl failed.
    #[error(transparent)]
    Ioctl(#[from] IoctlError),
    /// KVM accepted only part of the MSRs.
    #[error("KVM_SET_MSRS set {set} of {total} MSRs (first refused: {refused:#x})")]
    PartialMsrs {
        /// How many were set.
        set: usize,
        /// How many were given.
        total: usize,
        /// Index of the first MSR KVM refused.
        refused: u32,
    },
    /// Reading MSRs or the device's facts failed.
    #[error(transparent)]
    Kvm(#[from] KvmError),
    /// Setting up the deadline timer failed.
    #[error("cannot arm the vCPU deadline timer: {0}")]
    Timer(std::io::Error),
}

impl VcpuError {
    /// The OS error number behind the failure, when the host refused something.
    pub fn host_errno(&self) -> Option<i32> {
        match self {
            VcpuError::Ioctl(ioctl) => Some(ioctl.errno()),
            VcpuError::Kvm(kvm) => kvm.host_errno(),
            _ => None,
        }
    }
}

fn ioctl(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
    move |source| VcpuError::Ioctl(IoctlError { op, source })
}

/// The x87/SSE state from `KVM_GET_FPU`, in a serialisable form.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct FpuState {
    pub fpr: [[u8; 16]; 8],
    pub fcw: u16,
    pub fsw: u16,
    pub ftwx: u8,
    pub last_opcode: u16,
    pub last_ip: u64,
    pub last_dp: u64,
    pub xmm: [[u8; 16]; 16],
    pub mxcsr: u32,
}

impl From<&kvm_fpu> for FpuState {
    fn from(f: &kvm_fpu) -> Self {
        FpuState {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
        }
    }
}

impl From<&FpuState> for kvm_fpu {
    fn from(f: &FpuState) -> Self {
        kvm_fpu {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
            ..Default::default()
        }
    }
}

/// The complete state of one vCPU. There is no in-kernel irqchip, so no LAPIC state.
/// Shared between clones behind an `Arc`; `kvm_xsave` is not `Clone`.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    /// CPUID as the vCPU sees it (`KVM_GET_CPUID2`).
    pub cpuid: CpuId,
    /// Multiprocessing state.
    pub mp_state: kvm_mp_state,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// x87/SSE state (also inside `xsave`; kept for hosts and tools that read it alone).
    pub fpu: FpuState,
    /// The xsave area (FPU, SSE, AVX…).
    pub xsave: kvm_xsave,
    /// Extended control registers (XCR0).
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// Every MSR this host can save and restore.
    pub msrs: Msrs,
    /// Pending exceptions, interrupts, NMIs.
    pub vcpu_events: kvm_vcpu_events,
}

/// `IA32_TIME_STAMP_COUNTER`: the guest's TSC, among the saved MSRs where the host can save it.
pub const MSR_IA32_TSC: u32 = 0x10;

impl VcpuState {
    /// The guest TSC when the state was captured, if this host saves it.
    pub fn tsc(&self) -> Option<u64> {
        self.msrs
            .as_slice()
            .iter()
            .find(|entry| entry.index == MSR_IA32_TSC)
            .map(|entry| entry.data)
    }
}

/// A vCPU of a VM.
///
/// The general registers are cached. With `KVM_CAP_SYNC_REGS`, KVM copies them into the shared
/// `kvm_run` page at every exit, and registers staged by [`Vcpu::set_regs`] are copied in at the
/// next entry, so a command round trip needs no `KVM_GET_REGS`/`KVM_SET_REGS` ioctl.
pub struct Vcpu {
    fd: VcpuFd,
    sync_regs: bool,
    regs: Option<kvm_regs>,
    regs_staged: bool,
    has_run: bool,
}

impl Vcpu {
    /// Creates vCPU `index` on `vm` with the host's supported CPUID.
    pub fn new(kvm: &Kvm, vm: &VmFd, index: u8) -> Result<Self, VcpuError> {
        let mut fd = vm.create_vcpu(u64::from(index)).map_err(ioctl("KVM_CREATE_VCPU"))?;
        fd.set_cpuid2(kvm.supported_cpuid()).map_err(ioctl("KVM_SET_CPUID2"))?;
        let sync_regs = kvm.has(Cap::SyncRegs);
        if sync_regs {
            fd.set_sync_valid_reg(SyncReg::Register);
        }
        Ok(Vcpu {
            fd,
            sync_regs,
            regs: None,
            regs_staged: false,
            has_run: false,
        })
    }

    /// The general registers (from the cache when it is current).
    pub fn regs(&mut self) -> Result<kvm_regs, VcpuError> {
        if let Some(regs) = self.regs {
            return Ok(regs);
        }
        let regs = self.fd.get_regs().map_err(ioctl("KVM_GET_REGS"))?;
        self.regs = Some(regs);
        Ok(regs)
    }

    /// Sets the general registers: staged for the next entry with sync regs, else `KVM_SET_REGS`.
    pub fn set_regs(&mut self, regs: &kvm_regs) -> Result<(), VcpuError> {
        if self.sync_regs {
            self.regs_staged = true;
        } else {
            self.fd.set_regs(regs).map_err(ioctl("KVM_SET_REGS"))?;
        }
        self.regs = Some(*regs);
        Ok(())
    }

    /// KVM's own translation of a guest virtual address (`KVM_TRANSLATE`), for cross-checking
    /// [`crate::translate::walk`]: the guest physical address, or `None` if KVM says unmapped.
    pub fn kvm_translate(&self, gva: u64) -> Result<Option<u64>, VcpuError> {
        let t = self.fd.translate_gva(gva).map_err(ioctl("KVM_TRANSLATE"))?;
        Ok((t.valid != 0).then_some(t.physical_address))
    }

    /// The vCPU fd (for its binary statistics).
    pub(crate) fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// Whether the vCPU has entered the guest since it was created.
    pub fn has_run(&self) -> bool {
        self.has_run
    }

    /// Runs `KVM_RUN` once, with staged registers copied in and the register cache refreshed.
    fn enter(&mut self) -> Result<GuestExit, kvm_ioctls::Error> {
        self.push_staged_regs();
        self.has_run = true;
        let result = self.fd.run().map(owned_exit);
        self.refresh_regs_after_run(result.as_ref().err());
        result
    }

    /// Hands registers staged by [`Vcpu::set_regs`] to KVM through the sync-regs area.
    fn push_staged_regs(&mut self) {
        if self.regs_staged {
            if let Some(regs) = self.regs {
                self.fd.sync_regs_mut().regs = regs;
                self.fd.set_sync_dirty_reg(SyncReg::Register);
            }
            self.regs_staged = false;
        }
    }

    /// After any `KVM_RUN` (including an immediate exit, which can complete pending I/O and so
    /// move rip and rax): takes the registers KVM stored in the sync-regs area on return, or
    /// drops the cache so that the next read asks KVM.
    fn refresh_regs_after_run(&mut self, error: Option<&kvm_ioctls::Error>) {
        self.regs = match error {
            None if self.sync_regs => Some(self.fd.sync_regs().regs),
            Some(e) if self.sync_regs && e.errno() == libc::EINTR => Some(self.fd.sync_regs().regs),
            _ => None,
        };
    }

    /// The guest's TSC now (`KVM_GET_MSRS` of `IA32_TSC`).
    pub fn tsc(&self) -> Result<u64, VcpuError> {
        let mut msrs = tsc_msrs(0)?;
        let read = self.fd.get_msrs(&mut msrs).map_err(ioctl("KVM_GET_MSRS"))?;
        match msrs.as_slice().first() {
            Some(entry) if read == 1 => Ok(entry.data),
            _ => Err(VcpuError::PartialMsrs {
                set: read,
                total: 1,
                refused: MSR_IA32_TSC,
            }),
        }
    }

    /// Sets the guest's TSC to `value` from now on (`KVM_SET_MSRS` of `IA32_TSC`). KVM treats a
    /// write within one second of the TSC it expects as a resynchronisation and keeps the running
    /// offset (`kvm_synchronize_tsc`), so the result is exact only to within that second.
    pub fn set_tsc(&self, value: u64) -> Result<(), VcpuError> {
        let set = self.fd.set_msrs(&tsc_msrs(value)?).map_err(ioctl("KVM_SET_MSRS"))?;
        if set != 1 {
            return Err(VcpuError::PartialMsrs {
                set,
                total: 1,
                refused: MSR_IA32_TSC,
            });
        }
        Ok(())
    }

    /// The guest TSC frequency in kHz (`KVM_GET_TSC_KHZ`).
    pub fn tsc_khz(&self) -> Result<u32, VcpuError> {
        self.fd.get_tsc_khz().map_err(ioctl("KVM_GET_TSC_KHZ"))
    }

    /// The special registers.
    pub fn sregs(&self) -> Result<kvm_sregs, VcpuError> {
        self.fd.get_sregs().map_err(ioctl("KVM_GET_SREGS"))
    }

    /// Sets the special registers.
    pub fn set_sregs(&self, sregs: &kvm_sregs) -> Result<(), VcpuError> {
        self.fd.set_sregs(sregs).map_err(ioctl("KVM_SET_SREGS"))
    }

    /// Sets the x87/SSE state.
    pub fn set_fpu(&self, fpu: &kvm_fpu) -> Result<(), VcpuError> {
        self.fd.set_fpu(fpu).map_err(ioctl("KVM_SET_FPU"))
    }

    /// Runs the guest until it exits to the VMM, or until `deadline` has passed.
    pub fn run(&mut self, deadline: Option<Duration>) -> Result<GuestExit, VcpuError> {
        self.run_until(deadline, None)
    }

    /// Like [`Vcpu::run`], and also returns [`GuestExit::Stopped`] once `stop` holds a vCPU
    /// index (the vCPU that faulted): it is checked before every entry and whenever `KVM_RUN`
    /// returns `EINTR`, so whoever sets it must also kick this thread until it has returned
    /// (see [`crate::watchdog`]).
    pub fn run_until(
        &mut self,
        deadline: Option<Duration>,
        stop: Option<&AtomicUsize>,
    ) -> Result<GuestExit, VcpuError> {
        let started = Instant::now();
        let stopped = || {
            stop.map(|s| s.load(Ordering::Acquire))
                .filter(|&by| by != NOT_STOPPED)
                .map(|by_vcpu| GuestExit::Stopped { by_vcpu })
        };
        if let Some(exit) = stopped() {
            return Ok(exit);
        }
        let _armed = match deadline {
            Some(limit) => Some(Deadline::arm(limit).map_err(VcpuError::Timer)?),
            None => None,
        };
        let exit = loop {
            match self.enter() {
                Ok(exit) => break exit,
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    let elapsed = started.elapsed();
                    if deadline.is_some_and(|limit| elapsed >= limit) {
                        break GuestExit::deadline_exceeded(elapsed);
                    }
                    if let Some(exit) = stopped() {
                        break exit;
                    }
                }
                Err(source) => return Err(VcpuError::Ioctl(IoctlError { op: "KVM_RUN", source })),
            }
        };
        Ok(match exit {
            GuestExit::InternalError { .. } => GuestExit::InternalError {
                suberror: self.internal_suberror(),
            },
            other => other,
        })
    }

    /// The access of the `KVM_EXIT_MMIO` the vCPU just made: guest physical address, whether it
    /// is a write, and its data (the bytes written, or the buffer KVM hands the guest as the
    /// value read when the vCPU next enters). Call only right after [`Vcpu::run`] returned
    /// [`GuestExit::Mmio`], before the next entry.
    pub(crate) fn mmio_access(&mut self) -> (u64, bool, &mut [u8]) {
        let run = self.fd.get_kvm_run();
        // SAFETY: called only right after KVM_RUN returned KVM_EXIT_MMIO (the caller's contract:
        // the last exit was converted to `GuestExit::Mmio`), for which KVM fills the `mmio`
        // member of the exit union.
        let mmio = unsafe { &mut run.__bindgen_anon_1.mmio };
        let len = (mmio.len as usize).min(mmio.data.len());
        (mmio.phys_addr, mmio.is_write != 0, &mut mmio.data[..len])
    }

    fn internal_suberror(&mut self) -> u32 {
        let run = self.fd.get_kvm_run();
        // SAFETY: called only right after KVM_RUN returned KVM_EXIT_INTERNAL_ERROR, for which KVM
        // fills the `internal` member of the exit union.
        unsafe { run.__bindgen_anon_1.internal.suberror }
    }

    /// Lets KVM finish an I/O exit the guest is in the middle of (the `out` or `in` it just
    /// executed), so that rip points past it: `KVM_RUN` with `immediate_exit` set completes the
    /// pending operation and returns `EINTR` without entering the guest (KVM API doc,
    /// `immediate_exit`). Completing an `in` writes rax and rip, so the register cache is
    /// refreshed from what KVM stored on return. Registers staged before the call go to KVM
    /// first (KVM applies them before it completes the I/O). Does not count as a run: CPUID can
    /// still be set afterwards on a vCPU that never entered the guest.
    pub fn complete_pending_io(&mut self) -> Result<(), VcpuError> {
        self.push_staged_regs();
        self.fd.set_kvm_immediate_exit(1);
        let result = self.fd.run().map(|_| ());
        self.fd.set_kvm_immediate_exit(0);
        self.refresh_regs_after_run(result.as_ref().err());
        match result {
            Err(e) if e.errno() == libc::EINTR => Ok(()),
            Ok(()) => Ok(()),
            Err(source) => Err(VcpuError::Ioctl(IoctlError {
                op: "KVM_RUN (immediate_exit)",
                source,
            })),
        }
    }

    /// Captures the complete state. Finishes any pending I/O first (see
    /// [`Vcpu::complete_pending_io`]); the vCPU must not be running.
    pub fn capture(&mut self, kvm: &Kvm) -> Result<VcpuState, VcpuError> {
        self.complete_pending_io()?;
        let regs = self.regs()?;
        let fd = &self.fd;
        let entries: Vec<kvm_msr_entry> = kvm
            .saveable_msrs()?
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| VcpuError::PartialMsrs {
            set: 0,
            total: entries.len(),
            refused: 0,
        })?;
        let read = fd.get_msrs(&mut msrs).map_err(ioctl("KVM_GET_MSRS"))?;
        if read != entries.len() {
            return Err(VcpuError::PartialMsrs {
                set: read,
                total: entries.len(),
                refused: entries[read].index,
            });
        }
        Ok(VcpuState {
            cpuid: fd.get_cpuid2(KVM_MAX_CPUID_ENTRIES).map_err(ioctl("KVM_GET_CPUID2"))?,
            mp_state: fd.get_mp_state().map_err(ioctl("KVM_GET_MP_STATE"))?,
            regs,
            sregs: self.sregs()?,
            fpu: FpuState::from(&fd.get_fpu().map_err(ioctl("KVM_GET_FPU"))?),
            xsave: fd.get_xsave().map_err(ioctl("KVM_GET_XSAVE"))?,
            xcrs: fd.get_xcrs().map_err(ioctl("KVM_GET_XCRS"))?,
            debugregs: fd.get_debug_regs().map_err(ioctl("KVM_GET_DEBUGREGS"))?,
            msrs,
            vcpu_events: fd.get_vcpu_events().map_err(ioctl("KVM_GET_VCPU_EVENTS"))?,
        })
    }

    /// Restores a captured state, in the order KVM needs (CPUID first, MSRs and events last,
    /// as Firecracker does). CPUID is fixed once a vCPU has run, so it is set only before that.
    pub fn restore(&mut self, state: &VcpuState) -> Result<(), VcpuError> {
        if !self.has_run {
            self.fd.set_cpuid2(&state.cpuid).map_err(ioctl("KVM_SET_CPUID2"))?;
        }
        self.fd.set_regs(&state.regs).map_err(ioctl("KVM_SET_REGS"))?;
        self.regs = Some(state.regs);
        self.regs_staged = false;
        let fd = &self.fd;
        fd.set_mp_state(state.mp_state).map_err(ioctl("KVM_SET_MP_STATE"))?;
        self.set_sregs(&state.sregs)?;
        self.set_fpu(&kvm_fpu::from(&state.fpu))?;
        // SAFETY: the area came from KVM_GET_XSAVE on a host whose xsave size Kvm::open checked
        // to be at most the 4096 bytes of `kvm_xsave`, so KVM reads only inside the struct.
        unsafe { fd.set_xsave(&state.xsave) }.map_err(ioctl("KVM_SET_XSAVE"))?;
        fd.set_xcrs(&state.xcrs).map_err(ioctl("KVM_SET_XCRS"))?;
        fd.set_debug_regs(&state.debugregs)
            .map_err(ioctl("KVM_SET_DEBUGREGS"))?;
        let set = fd.set_msrs(&state.msrs).map_err(ioctl("KVM_SET_MSRS"))?;
        let total = state.msrs.as_slice().len();
        if set != total {
            return Err(VcpuError::PartialMsrs {
                set,
                total,
                refused: state.msrs.as_slice()[set].index,
            });
        }
        fd.set_vcpu_events(&state.vcpu_events)
            .map_err(ioctl("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }
}

/// An MSR list holding only `IA32_TSC` with `value`.
fn tsc_msrs(value: u64) -> Result<Msrs, VcpuError> {
    Msrs::from_entries(&[kvm_msr_entry {
        index: MSR_IA32_TSC,
        data: value,
        ..Default::default()
    }])
    .map_err(|_| VcpuError::PartialMsrs {
        set: 0,
        total: 1,
        refused: MSR_IA32_TSC,
    })
}

fn little_endian(data: &[u8]) -> u32 {
    let mut bytes = [0u8; 4];
    let n = data.len().min(4);
    bytes[..n].copy_from_slice(&data[..n]);
    u32::from_le_bytes(bytes)
}

/// Converts KVM's borrowed exit into an owned one. Reads from unserved ports and non-RAM addresses
/// return all ones, as on a floating bus. An exception stub's report comes back as
/// `Exception { rip: 0, .. }`; the VM fills in the frame.
fn owned_exit(exit: VcpuExit<'_>) -> GuestExit {
    match exit {
        VcpuExit::IoOut(PORT_DONE, data) => GuestExit::Done {
            status: little_endian(data),
        },
        VcpuExit::IoOut(PORT_EXCEPTION, data) => GuestExit::Exception {
            vector: data.first().copied().unwrap_or(0),
            rip: 0,
            error_code: None,
            cr2: 0,
        },
        VcpuExit::IoOut(port, data) => GuestExit::IoOut {
            port,
            size: data.len() as u8,
            value: little_endian(data),
        },
        VcpuExit::IoIn(port, data) => {
            data.fill(0xff);
            GuestExit::IoIn {
                port,
                size: data.len() as u8,
            }
        }
        VcpuExit::MmioRead(gpa, data) => {
            data.fill(0xff);
            GuestExit::Mmio { gpa, write: false }
        }
        VcpuExit::MmioWrite(gpa, _) => GuestExit::Mmio { gpa, write: true },
        VcpuExit::Hlt => GuestExit::Halt,
        VcpuExit::Shutdown => GuestExit::Shutdown,
        VcpuExit::FailEntry(reason, _) => GuestExit::FailEntry { reason },
        VcpuExit::InternalError => GuestExit::InternalError { suberror: 0 },
        other => GuestExit::Other {
            description: format!("{other:?}"),
        },
    }
}
