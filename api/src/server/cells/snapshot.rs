//! Snapshots and live forks of in-cell VMs (`POST /v1/vms/{id}/snapshot`, `POST
//! /v1/vms/{id}/clones`). The VM's cell freezes it (the VM keeps running on a private view) and
//! keeps the new template for clones placed there; the supervisor gets the same template, built
//! over the parent it holds ([`cowvm_cell::CellPool::freeze`]), and persists, registers and
//! answers it through the code in-process VMs use. A live fork then makes its clones as
//! `POST /v1/templates/{id}/clones` does in cells.

use std::sync::Arc;

use axum::http::StatusCode;
use axum::Json;
use cowvm_cell::protocol::TemplateId;
use cowvm_vmm::Template;

use super::{id_number, lock, CellService, CellVm};
use crate::server::app::App;
use crate::server::error::ServiceError;
use crate::server::model::{CloneRequest, ClonesCreated, SnapshotCreated};
use crate::server::ops::{timeout_error, transaction};
use crate::server::service::templates::{check_count, fd_budget};
use crate::server::service::vms::{keep_frozen, keep_snapshot};

/// A template frozen in a cell that the service has not taken yet: unless [`Unkept::keep`] is
/// called, it is dropped from the pool and from the cells that hold it (the freezing cell holds
/// it even when the freeze answered an error late), so a failed or timed-out request leaves
/// nothing behind.
struct Unkept<'a> {
    cells: &'a CellService,
    number: TemplateId,
    kept: bool,
}

impl Unkept<'_> {
    fn keep(mut self) {
        self.kept = true;
    }
}

impl Drop for Unkept<'_> {
    fn drop(&mut self) {
        if !self.kept {
            if let Err(e) = self.cells.pool.remove_template(self.number) {
                eprintln!("cowvm: dropping template {} from the cells: {e}", self.number);
            }
        }
    }
}

/// A VM frozen in its cell.
struct Frozen<'a> {
    id: String,
    template: Arc<Template>,
    pause_us: f64,
    unkept: Unkept<'a>,
}

/// Freezes `vm` in its cell into template `id` (the caller holds the VM busy): a clone into a
/// new layer over its template, a booted VM into a template of its own.
fn freeze<'a>(cells: &'a CellService, vm: &CellVm, id: String) -> Result<Frozen<'a>, ServiceError> {
    let number = id_number(&id);
    let unkept = Unkept {
        cells,
        number,
        kept: false,
    };
    let frozen = match &vm.template_id {
        Some(parent) => cells.pool.freeze(vm.at, id_number(parent), number),
        // A booted VM's RAM becomes the template's base: its memfds come to the supervisor.
        None => cells.pool.freeze_booted(vm.at, number),
    };
    let (template, pause_us) = frozen.map_err(|e| cells.vm_error(vm, e))?;
    // Its RAM is a private view of the template now, as after a snapshot in process.
    lock(&vm.status).frozen = true;
    Ok(Frozen {
        id,
        template: Arc::new(template),
        pause_us,
        unkept,
    })
}

/// `POST /v1/vms/{id}/snapshot` of an in-cell VM.
pub(super) async fn snapshot(
    app: Arc<App>,
    cells: Arc<CellService>,
    vm: Arc<CellVm>,
) -> Result<(StatusCode, Json<SnapshotCreated>), ServiceError> {
    vm.usable()?;
    let service = Arc::clone(&app);
    let created = transaction(&app, move |commit| {
        let _busy = lock(&vm.busy);
        vm.usable()?;
        // The new layer's memfd comes to the supervisor.
        fd_budget(&service, 1)?;
        let frozen = freeze(&cells, &vm, service.new_template_id())?;
        if !commit.commit() {
            return Err(timeout_error(&service));
        }
        let created = keep_snapshot(&service, frozen.id, frozen.template, &vm.id, frozen.pause_us)?;
        frozen.unkept.keep();
        Ok(created)
    })
    .await?;
    Ok((StatusCode::CREATED, Json(created)))
}

/// `POST /v1/vms/{id}/clones` (live fork) of an in-cell VM: a snapshot in its cell, then clones
/// of it placed as for any template in cells.
pub(super) async fn live_fork(
    app: Arc<App>,
    cells: Arc<CellService>,
    vm: Arc<CellVm>,
    req: CloneRequest,
) -> Result<(StatusCode, Json<ClonesCreated>), ServiceError> {
    let count = check_count(&app, req.count)?;
    vm.usable()?;
    let service = Arc::clone(&app);
    let created = transaction(&app, move |commit| {
        let _busy = lock(&vm.busy);
        vm.usable()?;
        fd_budget(&service, 1)?;
        let id = service.new_template_id();
        let number = id_number(&id);
        // Admitted before the VM is paused, as in process: a refused call freezes nothing.
        let admitted = cells.admit_clones(&service, number, count)?;
        let frozen = freeze(&cells, &vm, id)?;
        // The pool places clones of the templates it knows (the freezing cell has it already);
        // the service takes it once its clones are made.
        cells.pool.add_template(number, Arc::clone(&frozen.template));
        let spawned = cells.spawn_clones(&service, number, count, Some(admitted), commit)?;
        let entry = match keep_frozen(&service, frozen.id, frozen.template, &vm.id) {
            Ok(entry) => entry,
            Err(e) => {
                cells.destroy_clones(&spawned);
                return Err(e);
            }
        };
        frozen.unkept.keep();
        let mut created = cells.add_clones(&service, &entry, spawned)?;
        created.pause_us = Some(frozen.pause_us);
        Ok(created)
    })
    .await?;
    Ok((StatusCode::CREATED, Json(created)))
}
