//! Recycling a deleted clone (`Request::Recycle`): instead of tearing the VM down on the request
//! path, the cell raises its template's warm-shell target by one and hands the VM to its engine,
//! whose builder thread resets it (`PAGEMAP_SCAN` + `MADV_DONTNEED` + state restore) into a warm
//! shell after the answer has gone out. A VM that cannot be recycled (a booted VM, a clone whose
//! RAM is no longer a view of its template, a full pool) is torn down as by `Request::Destroy`.

use std::sync::Arc;

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
        let held = self
            .vms
            .remove(&vm)
            .ok_or_else(|| RemoteError::new(Kind::UnknownVm, format!("no VM {vm} in this cell")))?;
        let Held { machine, room } = held;
        let clone = match machine {
            Machine::Clone(clone) => clone,
            Machine::Booted(vm) => {
                // Torn down here, then its room, as `Destroy` does.
                drop(vm);
                drop(room);
                return Ok(Response::Recycled {
                    recycled: false,
                    warm: self.warm_counts(),
                });
            }
        };
        self.engine()?;
        let Some(template) = self.template_of(&clone) else {
            drop(clone);
            drop(room);
            return Ok(Response::Recycled {
                recycled: false,
                warm: self.warm_counts(),
            });
        };
        // The VM's own place becomes the shell's: the target rises by one only within the
        // cell's limit (live VMs and every template's targets).
        let held = self.targets.values().sum::<u32>() + self.vms.len() as u32;
        if held >= self.max_vms {
            drop(clone);
            drop(room);
            return Ok(Response::Recycled {
                recycled: false,
                warm: self.warm_counts(),
            });
        }
        let before = self.targets.get(&template).copied().unwrap_or(0);
        let (Some(engine), Some(source)) = (self.engine.as_ref(), self.templates.get(&template)) else {
            return Err(RemoteError::new(
                Kind::Protocol,
                "the cell has no KVM device yet (Init first)",
            ));
        };
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
        Ok(Response::Recycled {
            recycled,
            warm: self.warm_counts(),
        })
    }
}
