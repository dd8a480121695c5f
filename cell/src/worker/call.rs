//! Calls (guest ABI v1) in a cell: in one of its VMs, which keeps its state
//! ([`Request::Call`](crate::protocol::Request::Call)), or in a fresh clone of a template that is
//! torn down once the answer is out
//! ([`Request::CallTemplate`](crate::protocol::Request::CallTemplate)): the supervisor's one-shot
//! `POST /v1/templates/{id}/call` in one round trip.

use std::sync::Arc;
use std::time::Duration;

use cowvm_vmm::call::{self, CallError, CallReport};

use super::{admit_error, Worker};
use crate::protocol::{CallDone, CallFailure, CellVmId, RemoteError, Response, TemplateCalled, TemplateId};
use crate::wire;

/// Bytes an answer needs besides a call's output and log.
const CALL_OVERHEAD: usize = 1024;

/// A call's outcome as it crosses the process boundary: the answer, or how it failed (also
/// when the answer would not fit one message).
fn outcome(result: Result<CallReport, CallError>) -> Result<CallDone, CallFailure> {
    match result {
        Ok(report) => {
            let done = CallDone::from(report);
            if done.output.len() + done.log.len() + CALL_OVERHEAD > wire::MAX_MESSAGE {
                return Err(CallFailure {
                    code: Some("output_too_large".into()),
                    message: format!(
                        "{} bytes of output and {} of log do not fit one answer of a cell ({} bytes)",
                        done.output.len(),
                        done.log.len(),
                        wire::MAX_MESSAGE
                    ),
                    usable: true,
                });
            }
            Ok(done)
        }
        Err(e) => Err(CallFailure {
            code: e.code().map(str::to_owned),
            message: e.to_string(),
            usable: e.guest_usable(),
        }),
    }
}

impl Worker {
    /// `Call`: one call in VM `vm`, which keeps whatever the call changes.
    pub(super) fn call_vm(&mut self, vm: CellVmId, input: &[u8], deadline_ms: u64) -> Result<Response, RemoteError> {
        let clone = self.vm(vm)?;
        let (generation, seed) = (clone.generation(), clone.seed());
        let deadline = Duration::from_millis(deadline_ms);
        Ok(
            match outcome(call::call_vm(clone.vm_mut(), input, generation, seed, deadline)) {
                Ok(done) => Response::Called(done),
                Err(failure) => Response::CallFailed(failure),
            },
        )
    }

    /// `CallTemplate`: one call in a fresh clone of `template`, admitted like one clone of
    /// `Spawn` (a warm shell of the template first, other shells giving way; the shell taken is
    /// not rebuilt: the target drops by one). The clone is not run before the call, as in
    /// process ([`call::call_template_reserved`]); it is torn down on the engine's background
    /// thread and its room given back after it, and the cell serves its next request only once
    /// both are done, so the supervisor's count of the cell stays exact.
    pub(super) fn call_template(
        &mut self,
        template: TemplateId,
        input: &[u8],
        deadline_ms: u64,
    ) -> Result<Response, RemoteError> {
        let source = Arc::clone(self.template(template)?);
        let engine = self.engine()?;
        let mut room = engine.reserve(1, Some(&source)).map_err(admit_error)?;
        let deadline = Duration::from_millis(deadline_ms);
        let result = call::call_template_reserved(engine, &source, &mut room, input, deadline);
        engine.drop_later(room);
        self.settle_after_answer = true;
        let target = self.targets.get(&template).copied().unwrap_or(0);
        self.apply_target(template, target.saturating_sub(1));
        self.fit_targets();
        Ok(Response::CalledTemplate(Box::new(TemplateCalled {
            call: outcome(result),
            warm: self.warm_counts(),
        })))
    }
}
