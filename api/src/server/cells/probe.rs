//! `POST /v1/vms/{id}/probes/write` of an in-cell VM, split between the cell and the supervisor.
//! A sandboxed cell cannot read `/proc/kpagecount`, so: the cell translates and checks the targets
//! (`ProbePrepare`); the supervisor reads the pages' states from the cell's pagemap; the cell has
//! the guest write them and times host-only copy-on-write on a scratch clone (`ProbeWrite`); the
//! supervisor reads the states again and assembles the same [`ProbeReport`] an in-process probe
//! gives ([`cowvm_vmm::probe::assemble`]).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use cowvm_cell::protocol::ProbeWritten;
use cowvm_vmm::kpage::KPages;
use cowvm_vmm::pagemap::PageMap;
use cowvm_vmm::probe::{assemble, page_states, ProbeParts, ProbeReport, ProbeTargets};
use cowvm_vmm::stats::HostView;
use cowvm_vmm::translate::GuestTranslation;
use cowvm_vmm::Reservation;

use super::{lock, CellService, CellVm};
use crate::server::app::App;
use crate::server::error::ServiceError;
use crate::server::ops::blocking;

impl CellVm {
    /// The kernel's view of the VM's RAM from the supervisor: its cell's `/proc/<pid>/pagemap`,
    /// `/proc/kpagecount` and `/proc/kpageflags`.
    pub(super) fn host_view(&self) -> Result<HostView, ServiceError> {
        let unavailable = |message: String| ServiceError::Unavailable {
            code: "stats_unavailable",
            message,
        };
        Ok(HostView {
            pagemap: PageMap::open_process(self.pid)
                .map_err(|e| unavailable(format!("cannot open /proc/{}/pagemap: {e}", self.pid)))?,
            kpages: KPages::open().map_err(|e| unavailable(e.to_string()))?,
        })
    }

    /// Checks what the cell answered against what was asked: one translation per address, in
    /// order, each landing in the VM's RAM (the supervisor reads the cell's pagemap there).
    fn check_translations(&self, addresses: &[u64], translations: &[GuestTranslation]) -> Result<(), ServiceError> {
        let fits = |t: &GuestTranslation| t.gpa.checked_add(8).is_some_and(|end| end <= self.memory_size);
        if translations.len() != addresses.len()
            || !translations
                .iter()
                .zip(addresses)
                .all(|(t, &gva)| t.gva == gva && fits(t))
        {
            return Err(ServiceError::internal(format!(
                "the cell of VM {} answered {} translations that do not match the {} probe targets",
                self.id,
                translations.len(),
                addresses.len()
            )));
        }
        Ok(())
    }

    /// Checks the cell's measurements: one pair of finite times per page.
    fn check_written(&self, pages: usize, written: &ProbeWritten) -> Result<(), ServiceError> {
        let finite = written.writes.times.iter().all(|(a, b)| a.is_finite() && b.is_finite())
            && written
                .host_cow_us
                .is_none_or(|m| m.p50.is_finite() && m.p99.is_finite());
        if written.writes.times.len() != pages || !finite {
            return Err(ServiceError::internal(format!(
                "the cell of VM {} answered {} write times for {pages} pages",
                self.id,
                written.writes.times.len()
            )));
        }
        Ok(())
    }
}

impl CellService {
    /// Room under `--max-vms` for the probe's scratch clone while it lives, as the in-process
    /// probe admits its own: warm shells in cells give way when the limit is reached.
    fn admit_scratch(&self, app: &App) -> Result<Reservation, ServiceError> {
        self.admit_one(app).map_err(|e| match app.admit_error(e) {
            ServiceError::TooManyVms(message) => ServiceError::TooManyVms(format!(
                "the probe's scratch clone (the host-only copy-on-write baseline) needs room for one more VM: {message}"
            )),
            other => other,
        })
    }

    /// The probe, on a blocking thread with the VM held still: prepare in the cell, read
    /// `before`, write in the cell (the scratch clone within room under `--max-vms` and in the
    /// cell), read `after`, assemble.
    fn probe(
        &self,
        app: &App,
        vm: &CellVm,
        targets: ProbeTargets,
        addresses: Vec<u64>,
    ) -> Result<ProbeReport, ServiceError> {
        let _busy = lock(&vm.busy);
        // Timed from here, as in process (where the probe starts with the VM in hand).
        let started = Instant::now();
        vm.usable()?;
        let translations = self
            .pool
            .probe_prepare(vm.at, targets)
            .map_err(|e| self.vm_error(vm, e))?;
        vm.check_translations(&addresses, &translations)?;
        let host = vm.host_view()?;
        let gpas: Vec<u64> = translations.iter().map(|t| t.gpa).collect();
        let before = page_states(&host, vm.host_address(), &gpas)?;
        // A clone's probe times the host-only baseline too, on a scratch clone of its template
        // that holds this room until the cell has torn it down (a booted VM has none, as in
        // process).
        let baseline = vm.template_id.is_some();
        let room = if baseline { Some(self.admit_scratch(app)?) } else { None };
        let written = self.pool.probe_write(vm.at, addresses, baseline);
        drop(room);
        let written = written.map_err(|e| self.vm_error(vm, e))?;
        vm.check_written(gpas.len(), &written)?;
        let after = page_states(&host, vm.host_address(), &gpas)?;
        let parts = ProbeParts {
            translations,
            host_address: vm.host_address(),
            before,
            after,
            writes: written.writes,
            host_cow_us: written.host_cow_us,
        };
        Ok(assemble(parts, started))
    }
}

/// `POST /v1/vms/{id}/probes/write` of an in-cell VM: the same answer and errors as in process
/// (a failed or lost VM 409, targets refused 422 before anything runs).
pub(super) async fn probe_write(
    app: Arc<App>,
    cells: Arc<CellService>,
    vm: Arc<CellVm>,
    targets: ProbeTargets,
) -> Result<ProbeReport, ServiceError> {
    vm.usable()?;
    // Count, stride and distinct pages are checked here as in process; the cell checks that each
    // target translates to writable guest RAM.
    let addresses = targets.addresses()?;
    let service = Arc::clone(&app);
    blocking(&app, move || {
        let report = cells.probe(&service, &vm, targets, addresses);
        if let Err(ServiceError::VmFailed(_)) = &report {
            service.metrics.vms_failed.fetch_add(1, Ordering::Relaxed);
        }
        report
    })
    .await
}
