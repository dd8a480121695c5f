//! Booting a VM in a cell (`POST /v1/vms` with `--cells`): placed like one clone, in a cell with
//! room under its VM limit and mapping budget (a new cell if none has), and counted there
//! until it is destroyed. Frozen into a template, it leaves the template loaded in its cell.

use std::fs::File;
use std::os::fd::BorrowedFd;

use cowvm_vmm::{FrozenMemory, Template, TemplateMemory};

use super::{CellId, CellPool, PoolError, VmRef};
use crate::cell::CellError;
use crate::protocol::{BootFailure, BootVm, BootedVm, TemplateId};

/// A VM the pool booted.
#[derive(Debug, Clone)]
pub struct PlacedBoot {
    /// Where it lives.
    pub at: VmRef,
    /// The cell's process id (for `/proc/<pid>/pagemap`).
    pub pid: u32,
    /// What the cell reported.
    pub booted: BootedVm,
}

impl CellPool {
    /// Boots `boot` in a cell with room, its kernel image in `kernel` (a sealed memfd) unless it
    /// is the built-in guest: the VM, or how the boot failed in the VMM or the guest.
    pub fn boot(
        &self,
        boot: BootVm,
        kernel: Option<BorrowedFd<'_>>,
    ) -> Result<Result<PlacedBoot, BootFailure>, PoolError> {
        // A booted VM maps its own RAM: the mappings of a VM without template pieces.
        let each = cowvm_vmm::pool::MAPPINGS_PER_VM;
        let mut plan = self.place(1, None, each)?;
        let (id, cell, n): (CellId, _, u32) = match plan.pop() {
            Some(share) => share,
            None => {
                return Err(PoolError::Full {
                    wanted: 1,
                    max_cells: self.max_cells,
                    vms_per_cell: self.config.vms_per_cell.max(1),
                })
            }
        };
        for (other, _, n) in plan {
            self.release(other, n, n as usize * each);
        }
        let result = cell.boot(boot, kernel);
        let mut state = self.lock();
        if let Some(slot) = state.cells.get_mut(&id) {
            slot.reserved = slot.reserved.saturating_sub(n);
            slot.reserved_mappings = slot.reserved_mappings.saturating_sub(n as usize * each);
            if let Ok(Ok(booted)) = &result {
                slot.vms.insert(booted.vm, each);
                slot.set_warm(&booted.warm);
            }
        }
        Ok(result?.map(|booted| PlacedBoot {
            at: VmRef {
                cell: id,
                vm: booted.vm,
            },
            pid: cell.pid(),
            booted,
        }))
    }
}

impl CellPool {
    /// Freezes VM `at`, which its cell booted, into a template: the cell keeps it as template
    /// `template` (clones of it placed in that cell need no load); the supervisor's copy is built
    /// over the same sealed memfds. Returns it with the microseconds the VM was paused.
    pub fn freeze_booted(&self, at: VmRef, template: TemplateId) -> Result<(Template, f64), PoolError> {
        let cell = self.cell_of(at)?;
        let (frozen, fds) = cell.freeze_booted(at.vm, template)?;
        let local = |what: String| PoolError::Cell(CellError::Local(what));
        if fds.len() != 1 + frozen.overlay_runs.len() {
            return Err(local(format!(
                "freeze_booted: {} fds for a template of {} layers",
                fds.len(),
                1 + frozen.overlay_runs.len()
            )));
        }
        let sealed = |fd| FrozenMemory::from_sealed(File::from(fd)).map_err(|e| local(format!("freeze_booted: {e}")));
        let mut fds = fds.into_iter();
        let base = sealed(fds.next().ok_or_else(|| local("freeze_booted: no base memfd".into()))?)?;
        let overlays = fds
            .zip(frozen.overlay_runs)
            .map(|(fd, runs)| sealed(fd).map(|memory| (memory, runs)))
            .collect::<Result<Vec<_>, _>>()?;
        let memory = TemplateMemory::layered(base, overlays).map_err(|e| local(format!("freeze_booted: {e}")))?;
        if memory.size() != frozen.state.memory_size {
            return Err(local(format!(
                "freeze_booted: memfds of {} bytes for a state of {} bytes",
                memory.size(),
                frozen.state.memory_size
            )));
        }
        if let Some(slot) = self.lock().cells.get_mut(&at.cell) {
            slot.templates.insert(template);
        }
        Ok((Template::new(memory, frozen.state), frozen.pause_us))
    }
}
