//! The call service: one call into a user's guest (guest ABI v1) in a fresh clone of a template
//! or in an existing VM (booting a user guest to `ready()` is [`cowvm_vmm::call::ready`]).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use cowvm_vmm::call;

use crate::server::app::{App, Machine};
use crate::server::error::ServiceError;
use crate::server::model::{CallRequest, CallResult};
use crate::server::ops::{blocking, on_vm};
use crate::server::templates::fd_budget;

/// Decodes the input and checks the timeout.
pub(in crate::server) fn parse(app: &App, req: &CallRequest) -> Result<(Vec<u8>, Duration), ServiceError> {
    let input = BASE64
        .decode(req.input.as_bytes())
        .map_err(|e| ServiceError::bad_request("invalid_field", format!("input is not valid base64: {e}")))?;
    let limit = app.limits.request_timeout.as_millis() as u64;
    let deadline = match req.timeout_ms {
        None => app.limits.guest_deadline,
        Some(ms) if (1..=limit).contains(&ms) => Duration::from_millis(ms),
        Some(ms) => {
            return Err(ServiceError::out_of_range(
                "timeout_out_of_range",
                format!("timeout_ms must be 1..={limit} (got {ms})"),
            ))
        }
    };
    Ok((input, deadline))
}

/// Runs one call in a fresh clone of template `id` (torn down afterwards).
pub async fn call_template(app: &Arc<App>, id: &str, req: CallRequest) -> Result<CallResult, ServiceError> {
    let (input, deadline) = parse(app, &req)?;
    // The call's clone counts against --max-vms and keeps the template from being deleted while
    // it lives, like any clone.
    let (template, cloning) = app.begin_cloning(id)?;
    let admitted = app.admit(1, Some(&template.template))?;
    let service = Arc::clone(app);
    let report = blocking(app, move || {
        let _cloning = cloning;
        let mut admitted = admitted;
        fd_budget(&service, 1)?;
        let report =
            call::call_template_reserved(&service.engine, &template.template, &mut admitted, &input, deadline)?;
        service.metrics.clones_spawned.fetch_add(1, Ordering::Relaxed);
        Ok(report)
    })
    .await?;
    Ok(report.into())
}

/// Runs one call in VM `id`, which keeps its state (a call that leaves the guest unusable marks
/// the VM failed).
pub async fn call_vm(app: &Arc<App>, id: &str, req: CallRequest) -> Result<CallResult, ServiceError> {
    let (input, deadline) = parse(app, &req)?;
    let report = on_vm(app, id, move |app, entry, machine, _commit| {
        let (generation, seed) = match &*machine {
            Machine::Clone(clone) => (clone.generation(), clone.seed()),
            Machine::Booted(_) => (0, 0),
        };
        call::call_vm(machine.vm_mut(), &input, generation, seed, deadline).map_err(|e| {
            if !e.guest_usable() {
                entry.fail(format!("a call failed: {e}"));
                app.metrics.vms_failed.fetch_add(1, Ordering::Relaxed);
            }
            ServiceError::from(e)
        })
    })
    .await?;
    Ok(report.into())
}
