//! Running a VM's vCPUs: one on the calling thread, or several at once, each on a scoped host
//! thread of its own. When one of several vCPUs faults, the others are stopped: a stop flag is
//! set and their threads are kicked with the watchdog's signal (repeatedly, since a signal that
//! lands just before `KVM_RUN` is lost) until each has left the guest.

use std::ops::Range;
use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};
use std::sync::{mpsc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use kvm_ioctls::VmFd;
use vm_memory::{Bytes, GuestAddress};

use crate::boot;
use crate::exit::GuestExit;
use crate::memory::GuestRam;
use crate::slots::SlotMap;
use crate::translate;
use crate::vcpu::{Vcpu, NOT_STOPPED};
use crate::vm::VmError;
use crate::watchdog;

/// How often a vCPU that must stop is kicked again until its thread returns.
const KICK_INTERVAL: Duration = Duration::from_millis(1);

/// What every vCPU of a VM shares while it runs: the VM fd, the RAM and the memory slots (lazy
/// slots are filled by whichever vCPU first touches a chunk, under the lock).
pub(crate) struct Guest<'a> {
    pub(crate) vm_fd: &'a VmFd,
    pub(crate) ram: &'a GuestRam,
    pub(crate) slots: &'a Mutex<SlotMap>,
}

/// Locks the slot map; a panic elsewhere while it was held leaves it usable (every change to it
/// is a completed ioctl plus bookkeeping).
pub(crate) fn lock_slots(slots: &Mutex<SlotMap>) -> MutexGuard<'_, SlotMap> {
    slots.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Guest<'_> {
    /// Runs `vcpu` until an exit the VMM does not handle itself, `deadline`, or `stop` (see
    /// [`Vcpu::run_until`]), and fills in an exception report. A guest access to RAM that has no
    /// memory slot yet (lazy slots) exits as MMIO: it is completed here from the host mapping,
    /// the chunk gets a slot, and the guest goes on.
    pub(crate) fn run(
        &self,
        vcpu: &mut Vcpu,
        deadline: Option<Duration>,
        stop: Option<&AtomicUsize>,
    ) -> Result<GuestExit, VmError> {
        let started = Instant::now();
        loop {
            let left = deadline.map(|limit| limit.saturating_sub(started.elapsed()));
            let exit = vcpu.run_until(left, stop)?;
            let handled = match exit {
                GuestExit::Mmio { .. } => self.complete_ram_access(vcpu)?,
                GuestExit::InternalError { .. } => self.slot_for_code(vcpu)?,
                _ => false,
            };
            if !handled {
                return self.describe(vcpu, exit);
            }
            if deadline.is_some_and(|limit| started.elapsed() >= limit) {
                // The access is completed (KVM finishes the instruction at the next entry).
                return Ok(GuestExit::deadline_exceeded(started.elapsed()));
            }
        }
    }

    /// Runs the vCPUs `indices` of `vcpus` at once, each on its own scoped thread, and returns
    /// their exits in the order of `indices` (which the caller has checked to be distinct and in
    /// range). The first vCPU that faults stops all the others.
    pub(crate) fn run_concurrently(
        &self,
        vcpus: &mut [Vcpu],
        indices: &[usize],
        deadline: Option<Duration>,
    ) -> Vec<Result<GuestExit, VmError>> {
        let mut by_index: Vec<Option<&mut Vcpu>> = vcpus.iter_mut().map(Some).collect();
        let chosen: Vec<(usize, Option<&mut Vcpu>)> = indices
            .iter()
            .map(|&index| (index, by_index.get_mut(index).and_then(Option::take)))
            .collect();
        let stop = AtomicUsize::new(NOT_STOPPED);
        let tids: Vec<AtomicI32> = indices.iter().map(|_| AtomicI32::new(0)).collect();
        let mut results: Vec<Option<Result<GuestExit, VmError>>> = indices.iter().map(|_| None).collect();
        thread::scope(|scope| {
            let (tx, rx) = mpsc::channel();
            let mut kicking = false;
            for (slot, (index, vcpu)) in chosen.into_iter().enumerate() {
                let Some(vcpu) = vcpu else {
                    results[slot] = Some(Err(VmError::NoSuchVcpu {
                        vcpu: index,
                        count: by_index.len(),
                    }));
                    continue;
                };
                let (tx, stop, tid) = (tx.clone(), &stop, &tids[slot]);
                let spawned = thread::Builder::new()
                    .name(format!("vcpu{index}"))
                    .spawn_scoped(scope, move || {
                        tid.store(watchdog::thread_id(), Ordering::Release);
                        let _ = tx.send((slot, index, self.run(vcpu, deadline, Some(stop))));
                    });
                if let Err(e) = spawned {
                    results[slot] = Some(Err(VmError::VcpuThread(e)));
                    kicking |= stop
                        .compare_exchange(NOT_STOPPED, index, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok();
                }
            }
            drop(tx);
            loop {
                let received = if kicking {
                    rx.recv_timeout(KICK_INTERVAL)
                } else {
                    rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected)
                };
                match received {
                    Ok((slot, index, result)) => {
                        let faulted = match &result {
                            Ok(exit) => exit.is_fault() && !matches!(exit, GuestExit::Stopped { .. }),
                            Err(_) => true,
                        };
                        if faulted
                            && stop
                                .compare_exchange(NOT_STOPPED, index, Ordering::AcqRel, Ordering::Acquire)
                                .is_ok()
                        {
                            kicking = true;
                        }
                        results[slot] = Some(result);
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
                if kicking {
                    for (slot, tid) in tids.iter().enumerate() {
                        let tid = tid.load(Ordering::Acquire);
                        if results[slot].is_none() && tid != 0 {
                            // A thread that has just returned makes this fail (ESRCH): harmless.
                            let _ = watchdog::kick(tid);
                        }
                    }
                }
            }
        });
        results
            .into_iter()
            .map(|result| {
                result.unwrap_or_else(|| Err(VmError::VcpuThread(std::io::Error::other("vCPU thread panicked"))))
            })
            .collect()
    }

    /// Completes the MMIO exit `vcpu` just made if it is an access to RAM without a slot: a read
    /// gets the bytes from the host mapping, a write stores them there (so the host copies the
    /// page on write, as it would for a write through a slot), and the chunk gets a slot.
    /// Returns false (leaving the exit to the caller) for addresses that are not RAM.
    fn complete_ram_access(&self, vcpu: &mut Vcpu) -> Result<bool, VmError> {
        let (gpa, write, data) = vcpu.mmio_access();
        let len = data.len();
        let mut slots = lock_slots(self.slots);
        if !slots.serves(gpa, len as u64) {
            return Ok(false);
        }
        let memory = self.ram.guest_memory();
        let done = if write {
            memory.write_slice(data, GuestAddress(gpa))
        } else {
            memory.read_slice(data, GuestAddress(gpa))
        };
        done.map_err(|e| VmError::LazyAccess {
            gpa,
            len,
            reason: e.to_string(),
        })?;
        // SAFETY: the slot points into the VM's RAM, whose live mapping `Vm`'s field order keeps
        // alive until after the VM fd (and with it every slot) is gone.
        unsafe { slots.fill(self.vm_fd, gpa, len as u64) }?;
        Ok(true)
    }

    /// After an emulation failure: if the instruction lies in a chunk of RAM without a slot (a
    /// fetch KVM cannot send to the VMM as MMIO), gives that chunk a slot so the guest can retry
    /// the instruction. Returns false if there was nothing to add.
    fn slot_for_code(&self, vcpu: &mut Vcpu) -> Result<bool, VmError> {
        let regs = vcpu.regs()?;
        let sregs = vcpu.sregs()?;
        let mem = self.ram.guest_memory();
        let Ok(t) = translate::walk(mem, sregs.cr0, sregs.cr3, sregs.efer, regs.rip) else {
            return Ok(false);
        };
        // An instruction is at most 15 bytes and may run into the next chunk.
        let code: Range<u64> = t.gpa..t.gpa.saturating_add(14);
        let mut slots = lock_slots(self.slots);
        let mut added = false;
        for gpa in [code.start, code.end] {
            if slots.serves(gpa, 1) && !slots.has_slot(gpa) {
                // SAFETY: as in `complete_ram_access`.
                unsafe { slots.fill(self.vm_fd, gpa, 1) }?;
                added = true;
            }
        }
        Ok(added)
    }

    /// Fills in an exception report from the exception frame on `vcpu`'s stack.
    fn describe(&self, vcpu: &mut Vcpu, exit: GuestExit) -> Result<GuestExit, VmError> {
        let GuestExit::Exception { vector, .. } = exit else {
            return Ok(exit);
        };
        let regs = vcpu.regs()?;
        let sregs = vcpu.sregs()?;
        let read = |addr: u64| self.ram.guest_memory().read_obj::<u64>(GuestAddress(addr)).ok();
        let (error_code, rip) = if boot::idt::has_error_code(vector) {
            (read(regs.rsp), read(regs.rsp.wrapping_add(8)))
        } else {
            (None, read(regs.rsp))
        };
        Ok(GuestExit::Exception {
            vector,
            rip: rip.unwrap_or(0),
            error_code,
            cr2: sregs.cr2,
        })
    }
}
