//! `POST /v1/templates/{id}/call` with cells on: the one-shot call runs in a fresh clone of the
//! template in a cell, in one round trip ([`cowvm_cell::CellPool::call_template`]). The clone
//! takes a warm shell of the template there when one is ready and counts against `--max-vms`
//! while it lives, admitted as `POST /v1/templates/{id}/clones` admits its clones (the shell's
//! room first); the cell answers, then tears the clone down before it serves anything else. The
//! answer and the errors are those of the in-process call; the pieces shared with
//! `POST /v1/vms/{id}/call` of an in-cell VM (input checks, failure codes) live here too.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use cowvm_cell::protocol::{CallDone, CallFailure, TemplateId};
use cowvm_vmm::call::{CallError, CALL_ERROR_CODES};
use cowvm_vmm::layout::MAILBOX_INPUT_SIZE;

use super::{id_number, pool_error, CellService};
use crate::server::app::App;
use crate::server::call::{CallRequest, CallResult};
use crate::server::error::ServiceError;
use crate::server::ops::blocking;
use crate::server::service::calls::parse;

/// Bytes of a cell message that are not a call's input.
const CALL_MESSAGE_OVERHEAD: usize = 1024;

/// 422 `input_too_large` for input a call in a cell cannot carry: beyond the mailbox (the
/// in-process error), or beyond what one message to a cell holds (more than the mailbox, unless
/// the host's `net.core.wmem_max` keeps the cell sockets' send buffers small).
pub(super) fn check_input(input: &[u8]) -> Result<(), ServiceError> {
    if input.len() as u64 > MAILBOX_INPUT_SIZE {
        return Err(CallError::InputTooLarge { len: input.len() }.into());
    }
    let fits = cowvm_cell::wire::MAX_MESSAGE - CALL_MESSAGE_OVERHEAD;
    if input.len() > fits {
        return Err(ServiceError::out_of_range(
            "input_too_large",
            format!(
                "input of {} bytes exceeds the {fits} bytes a call to a VM in a cell carries",
                input.len()
            ),
        ));
    }
    Ok(())
}

/// The error for a call that failed in a cell: the in-process code (422) when the guest's,
/// else a VMM failure: 503 when the host ran out of something, 500 otherwise (as in process).
pub(super) fn failure_error(failure: CallFailure) -> ServiceError {
    let code = failure
        .code
        .and_then(|code| CALL_ERROR_CODES.iter().copied().find(|&known| known == code));
    match code {
        Some(code) => ServiceError::out_of_range(code, failure.message),
        None => ServiceError::host(failure.errno, failure.message),
    }
}

/// `POST /v1/templates/{id}/call` with cells on: the in-process checks in the in-process order
/// (body, template, input), then the call in a cell.
pub(super) async fn call_template(
    app: Arc<App>,
    cells: Arc<CellService>,
    id: String,
    req: CallRequest,
) -> Result<Json<CallResult>, ServiceError> {
    let (input, deadline) = parse(&app, &req)?;
    // The call's clone keeps the template from being deleted while it lives, like any clone.
    let (template, cloning) = app.begin_cloning(&id)?;
    check_input(&input)?;
    let number = id_number(&template.id);
    let service = Arc::clone(&app);
    let done = blocking(&app, move || {
        let _cloning = cloning;
        cells.call_template(&service, number, input, deadline)
    })
    .await?;
    Ok(Json(done.into()))
}

impl CellService {
    /// One call in a fresh clone of template `number` in a cell, on room admitted under
    /// `--max-vms` as for one clone (its warm shells' room first) and held until the cell has
    /// answered, which it does before tearing the clone down and serving anything else.
    fn call_template(
        &self,
        app: &App,
        number: TemplateId,
        input: Vec<u8>,
        deadline: Duration,
    ) -> Result<CallDone, ServiceError> {
        // As for clone calls: the warm keeper waits from taking the shell's room until the pool
        // records the cell's lowered target (not while the guest runs).
        let gate = self.warm_gate.read().unwrap_or_else(|e| e.into_inner());
        let admitted = self.admit_clones(app, number, 1)?;
        let called = self.pool.call_template(number, input, deadline, move || drop(gate));
        self.poke();
        match called {
            Ok(outcome) => {
                drop(admitted);
                let done = outcome.map_err(failure_error)?;
                app.metrics.clones_spawned.fetch_add(1, Ordering::Relaxed);
                Ok(done)
            }
            Err(e) => {
                // The room goes back to the shells (the keeper gives back what their targets do
                // not use).
                self.lock_warm().room.entry(number).or_default().extend(admitted);
                Err(pool_error(e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;

    fn vmm_failure(errno: Option<i32>) -> CallFailure {
        CallFailure {
            code: None,
            message: "spawning the call's clone failed".into(),
            usable: true,
            errno,
        }
    }

    #[test]
    fn test_a_vmm_failure_in_a_cell_answers_as_in_process_503_for_exhaustion_else_500() {
        let in_process = |errno: Option<i32>| {
            let io = errno.map_or_else(|| std::io::Error::other("x"), std::io::Error::from_raw_os_error);
            ServiceError::from(CallError::Vm(cowvm_vmm::VmError::VcpuThread(io))).status()
        };
        for errno in [Some(libc::ENOMEM), Some(libc::EMFILE), Some(libc::EINVAL), None] {
            let in_cell = failure_error(vmm_failure(errno)).status();
            assert_eq!(in_cell, in_process(errno), "{errno:?}");
        }
        assert_eq!(
            failure_error(vmm_failure(Some(libc::ENOMEM))).status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        let guest = CallFailure {
            code: Some("guest_fault".into()),
            ..vmm_failure(None)
        };
        assert_eq!(failure_error(guest).status(), StatusCode::UNPROCESSABLE_ENTITY);
    }
}
