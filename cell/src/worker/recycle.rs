//! Recycling a deleted clone (`Request::Recycle`): instead of tearing the VM down on the request
//! path, the cell raises its template's warm-shell target by one and hands the VM to its engine,
//! whose builder thread resets it (`PAGEMAP_SCAN` + `MADV_DONTNEED` + state restore) into a warm
//! shell after the answer has gone out. A VM that cannot be recycled (a booted VM, a clone whose
//! RAM is no longer a view of its template, a full pool) is torn down as by `Request::Destroy`.

use std::sync::Arc;

use cowvm_vmm::Reservation;

use super::{Held, Kind, Machine, Worker};
use crate::protocol::{CellVmId, RemoteError, Response, TemplateId};

impl Worker {
    /// The protocol id of the template `clone` was made from, if it is loaded here.
    fn template_of(&self, clone: &cowvm_vmm::Clone) -> Option<TemplateId> {
        self.templates
            .iter()
            .find(|(_, t)| Arc::ptr_eq(t, clone.template()))
            .map(|(&id, _)| id)
    }

    /// Recycles VM `vm` into a warm shell of its template (see the module docs).
    pub(super) fn recycle(&mut self, vm: CellVmId) -> Result<Response, RemoteError> {
        self.engine()?;
        let Held { machine, room } = self
            .vms
            .remove(&vm)
            .ok_or_else(|| RemoteError::new(Kind::UnknownVm, format!("no VM {vm} in this cell")))?;
        let recycled = match machine {
            Machine::Clone(clone) => self.recycle_clone(clone, room),
            Machine::Booted(vm) => {
                // Torn down here, then its room, as `Destroy` does.
                drop(vm);
                drop(room);
                false
            }
        };
        Ok(Response::Recycled {
            recycled,
            warm: self.warm_counts(),
        })
    }

    /// Hands `clone` to the engine to become a shell of its template, whose target rises by one
    /// for it; false when it cannot be (torn down here, or by the engine when it refuses).
    fn recycle_clone(&mut self, clone: cowvm_vmm::Clone, room: Reservation) -> bool {
        let template = self.template_of(&clone);
        // The VM's own place becomes the shell's: the target rises by one only within the
        // cell's limit (live VMs and every template's targets).
        let fits = self.targets.values().sum::<u32>() + (self.vms.len() as u32) < self.max_vms;
        let source = template.and_then(|t| Some((t, self.templates.get(&t)?)));
        let (Some(engine), Some((template, source)), true) = (self.engine.as_ref(), source, fits) else {
            // Torn down here, the VM first, then its room.
            drop(clone);
            drop(room);
            return false;
        };
        let before = self.targets.get(&template).copied().unwrap_or(0);
        // No shell build starts for the raised target before the VM is queued in its place.
        let busy = engine.pause_building();
        engine.keep_warm(source, before as usize + 1);
        let recycled = engine.recycle(clone, Some(room));
        if recycled {
            self.targets.insert(template, before + 1);
        } else {
            // Refused (the pool is full): the VM is torn down in the background, and gone
            // before the next request is served.
            engine.keep_warm(source, before as usize);
            self.settle_after_answer = true;
        }
        drop(busy);
        recycled
    }
}
