//! The cell's half of a write probe. A sandboxed cell cannot read `/proc/kpagecount`, so the
//! supervisor reads the pages' states from the cell's pagemap before and after; the cell checks
//! the targets ([`Request::ProbePrepare`](crate::protocol::Request::ProbePrepare)), has the guest
//! write them and times host-only copy-on-write on a scratch clone
//! ([`Request::ProbeWrite`](crate::protocol::Request::ProbeWrite)).

use std::sync::Arc;

use cowvm_vmm::probe::{check_targets, guest_writes, host_cow_baseline, Micros, ProbeError, ProbeTargets};
use cowvm_vmm::{Template, VmError};

use super::{vmm_error, Kind, Worker};
use crate::protocol::{CellVmId, ProbeWritten, RemoteError, Response};

/// The kind of a probe's failure: targets refused before the guest ran, the guest stopping
/// (the VM has failed, as for a command), or anything else the VMM reported.
fn probe_error(e: ProbeError) -> RemoteError {
    let kind = match &e {
        ProbeError::Count(_) | ProbeError::SamePage(..) | ProbeError::Stride(_) => Kind::Command,
        ProbeError::Vm(VmError::Command(_) | VmError::Translate(_)) => Kind::Command,
        ProbeError::Vm(VmError::GuestStopped(_) | VmError::Failed(_)) => Kind::Guest,
        _ => Kind::Vmm,
    };
    RemoteError::new(kind, e.to_string())
}

impl Worker {
    /// `ProbePrepare`: the targets' translations, each checked to land on writable guest RAM.
    pub(super) fn probe_prepare(&mut self, vm: CellVmId, targets: ProbeTargets) -> Result<Response, RemoteError> {
        let clone = self.vm(vm)?;
        let (_, translations) = check_targets(clone.vm_mut(), &targets).map_err(probe_error)?;
        Ok(Response::ProbePrepared(translations))
    }

    /// `ProbeWrite`: checks `gvas` again, makes the scratch clone (if `baseline`) before the
    /// guest writes anything, has the guest write each page twice, times host-only
    /// copy-on-write on the scratch clone and tears it down before answering.
    pub(super) fn probe_write(
        &mut self,
        vm: CellVmId,
        gvas: Vec<u64>,
        baseline: bool,
    ) -> Result<Response, RemoteError> {
        let clone = self.vm(vm)?;
        let (addresses, translations) =
            check_targets(clone.vm_mut(), &ProbeTargets::Addresses(gvas)).map_err(probe_error)?;
        let source = clone.as_clone().map(|c| Arc::clone(c.template()));
        // Without room for the scratch clone the probe stops here, with nothing written.
        let scratch = match (baseline, source) {
            (true, Some(source)) => Some(self.scratch_clone(&source)?),
            (true, None) => {
                return Err(RemoteError::new(
                    Kind::Protocol,
                    format!("VM {vm} was booted, not cloned: it has no template for a baseline"),
                ))
            }
            (false, _) => None,
        };
        let writes = self
            .vm(vm)
            .and_then(|clone| guest_writes(clone.vm_mut(), &addresses).map_err(probe_error));
        let host_cow_us: Option<Result<Micros, ProbeError>> = scratch.map(|(scratch, room)| {
            let gpas: Vec<u64> = translations.iter().map(|t| t.gpa).collect();
            let timed = host_cow_baseline(scratch.vm(), &gpas);
            // Torn down here, the VM first, then its room (as a destroyed VM): when the answer
            // goes out the cell holds what it held before, so the supervisor's count of it stays
            // exact. (Recycling would keep a shell the supervisor holds no room for.)
            drop(scratch);
            drop(room);
            timed
        });
        // A failed guest write says more than the baseline.
        let writes = writes?;
        Ok(Response::ProbeWritten(ProbeWritten {
            writes,
            host_cow_us: host_cow_us.transpose().map_err(probe_error)?,
        }))
    }

    /// A clone of `source` for the host-only baseline, with its room under the cell's VM limit
    /// and mapping budget (the template's warm shells first; other shells give way).
    fn scratch_clone(&self, source: &Arc<Template>) -> Result<(cowvm_vmm::Clone, cowvm_vmm::Reservation), RemoteError> {
        let engine = self.engine()?;
        let mut room = engine.reserve(1, Some(source)).map_err(|e| {
            RemoteError::new(
                Kind::Full,
                format!(
                    "no room in the cell for the probe's scratch clone (the host-only copy-on-write baseline): {e}"
                ),
            )
        })?;
        let mut batch = engine.spawn_reserved(source, &mut room, &|| false).map_err(vmm_error)?;
        match batch.clones.pop() {
            Some(scratch) => Ok((scratch, room)),
            None => Err(RemoteError::new(
                Kind::Vmm,
                format!(
                    "the probe's scratch clone could not be made: {}",
                    batch.failed.first().map_or("no reason given", |f| f.reason.as_str())
                ),
            )),
        }
    }
}
