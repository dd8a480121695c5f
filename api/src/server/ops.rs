//! Running service operations off the async workers: every VM operation takes the VM's machine
//! lock on a blocking thread, under the request timeout, and a guest that stops for a reason
//! other than finishing (fault, deadline) marks the VM failed.

use std::sync::Arc;

use axum::http::StatusCode;

use super::app::{App, Machine, VmEntry};
use super::error::ApiError;

/// Runs `f` on a blocking thread; past the request timeout the caller gets a 503 (the operation
/// itself is bounded by the guest deadline and finishes on its own).
pub async fn blocking<T: Send + 'static>(
    app: &Arc<App>,
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let limit = app.limits.request_timeout;
    match tokio::time::timeout(limit, tokio::task::spawn_blocking(f)).await {
        Err(_) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "timeout",
            format!("the request did not finish within {} ms", limit.as_millis()),
        )),
        Ok(Err(join)) => Err(ApiError::internal(format!("the operation panicked: {join}"))),
        Ok(Ok(result)) => result,
    }
}

/// Runs `op` on VM `id`'s machine (404 if unknown, 409 if it has failed).
pub async fn on_vm<T: Send + 'static>(
    app: &Arc<App>,
    id: &str,
    op: impl FnOnce(&App, &VmEntry, &mut Machine) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let entry = app.vm(id)?;
    if let Some(reason) = entry.failure() {
        return Err(ApiError::conflict("vm_failed", format!("VM {id} has failed: {reason}")));
    }
    let service = Arc::clone(app);
    blocking(app, move || {
        let mut guard = entry.lock_machine();
        let machine = guard.as_mut().ok_or_else(|| ApiError::not_found("VM", &entry.id))?;
        let result = op(&service, &entry, machine);
        if let Err(e) = &result {
            if e.code == "vm_failed" {
                entry.fail(e.message.clone());
                service
                    .metrics
                    .vms_failed
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
        result
    })
    .await
}

/// Tears a machine down in the background.
pub fn destroy(app: &App, machine: Machine) {
    match machine {
        Machine::Booted(vm) => app.engine.destroy_vm(vm),
        Machine::Clone(clone) => app.engine.destroy(clone),
    }
}
