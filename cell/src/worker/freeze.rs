//! Freezing an in-cell VM into a template (`Request::Freeze`): the cell pauses the VM, captures
//! its state and copies its private pages into a new overlay memfd, sealed before anything maps
//! it (the VM keeps running on its private view). The cell keeps the new template for the clones
//! of it placed here, and hands the supervisor the new layer's memfd with `SCM_RIGHTS`; the
//! layers below are the parent template's, which the supervisor holds already.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::Instant;

use cowvm_vmm::memory::MemoryError;
use cowvm_vmm::{Template, VmError};

use super::{Kind, Worker};
use crate::protocol::{copy_state, CellVmId, Frozen, RemoteError, Response, TemplateId};

/// The kind a failed freeze reports (too many layers is the template's limit, not a fault).
fn freeze_error(e: VmError) -> RemoteError {
    let kind = match e {
        VmError::Memory(MemoryError::TooFragmented { .. }) => Kind::TooFragmented,
        _ => Kind::Vmm,
    };
    RemoteError::new(kind, e.to_string())
}

impl Worker {
    /// Freezes VM `vm`, a clone of `parent`, into template `template`.
    pub(super) fn freeze(
        &mut self,
        vm: CellVmId,
        parent: TemplateId,
        template: TemplateId,
    ) -> Result<Response, RemoteError> {
        if self.templates.contains_key(&template) {
            return Err(RemoteError::new(
                Kind::Protocol,
                format!("template {template} is already loaded in this cell"),
            ));
        }
        let parent_template = Arc::clone(self.template(parent)?);
        if !self
            .vm(vm)?
            .as_clone()
            .is_some_and(|c| Arc::ptr_eq(c.template(), &parent_template))
        {
            return Err(RemoteError::new(
                Kind::Protocol,
                format!("VM {vm} is not a clone of template {parent}"),
            ));
        }
        // The engine holds the KVM device and this process's pagemap, which the sandbox no
        // longer lets the cell open again: it is taken out for the call so that the VM can be
        // borrowed beside it, and put back whatever the outcome.
        let engine = self
            .engine
            .take()
            .ok_or_else(|| RemoteError::new(Kind::Protocol, "the cell has no KVM device yet (Init first)"))?;
        let started = Instant::now();
        let frozen = self.vm(vm).and_then(|clone| {
            Template::freeze_with(engine.kvm(), clone.vm_mut(), engine.pagemap()).map_err(freeze_error)
        });
        let pause_us = started.elapsed().as_secs_f64() * 1e6;
        self.engine = Some(engine);
        let frozen = frozen?;

        let memory = frozen.memory();
        let (overlay_runs, fds) = if memory.same_as(parent_template.memory()) {
            // No private page: the template's memory is its parent's.
            (None, Vec::new())
        } else {
            let top = memory
                .top_overlay()
                .filter(|_| memory.is_layered_on(parent_template.memory()));
            let Some((overlay, runs)) = top else {
                return Err(RemoteError::new(
                    Kind::Vmm,
                    format!("the template frozen from VM {vm} is not template {parent} with one layer on top"),
                ));
            };
            let fd: OwnedFd = overlay
                .as_fd()
                .try_clone_to_owned()
                .map_err(|e| RemoteError::new(Kind::Vmm, format!("cannot duplicate the new layer's memfd: {e}")))?;
            (Some(runs.to_vec()), vec![fd])
        };
        let state = copy_state(frozen.state())
            .map_err(|e| RemoteError::new(Kind::Vmm, format!("cannot encode the frozen state: {e}")))?;
        self.templates.insert(template, Arc::new(frozen));
        self.outgoing = fds;
        Ok(Response::Frozen(Box::new(Frozen {
            overlay_runs,
            state,
            pause_us,
        })))
    }
}
