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
                    errno: None,
                });
            }
            Ok(done)
        }
        Err(e) => Err(CallFailure {
            code: e.code().map(str::to_owned),
            message: e.to_string(),
            usable: e.guest_usable(),
            errno: e.host_errno(),
        }),
    }
}

impl Worker {
    /// `Call`: one call in VM `vm`, which keeps whatever the call changes.
    pub(super) fn call_vm(&mut self, vm: CellVmId, input: &[u8], deadline_ms: u64) -> Result<Response, RemoteError> {
        let machine = self.vm(vm)?;
        // A booted VM has no generation or seed (0, as in the server's own process).
        let (generation, seed) = machine.as_clone().map_or((0, 0), |c| (c.generation(), c.seed()));
        let deadline = Duration::from_millis(deadline_ms);
        Ok(
            match outcome(call::call_vm(machine.vm_mut(), input, generation, seed, deadline)) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Envelope, WarmCount};

    fn report(output: usize) -> CallReport {
        CallReport {
            status: 0,
            output: vec![7; output],
            log: Default::default(),
            spawn_us: 1.0,
            run_us: 2.0,
            total_us: 3.0,
            generation: 4,
            seed: 5,
        }
    }

    #[test]
    fn test_an_answer_that_fits_one_message_is_sent_whole() {
        let done = outcome(Ok(report(16))).expect("answered");
        assert_eq!(
            (done.output.len(), done.spawn_us, done.run_us, done.total_us),
            (16, 1.0, 2.0, 3.0)
        );
    }

    #[test]
    fn test_a_vmm_failure_carries_the_hosts_errno_and_a_guest_failure_its_code() {
        let host = CallError::Vm(cowvm_vmm::VmError::VcpuThread(std::io::Error::from_raw_os_error(
            libc::ENOMEM,
        )));
        let failure = outcome(Err(host)).expect_err("failed");
        assert_eq!((failure.code, failure.errno), (None, Some(libc::ENOMEM)));
        let guest = outcome(Err(CallError::InputTooLarge { len: 9 })).expect_err("failed");
        assert_eq!((guest.code.as_deref(), guest.errno), (Some("input_too_large"), None));
    }

    #[test]
    fn test_an_answer_too_large_for_one_message_is_output_too_large_and_leaves_the_guest_usable() {
        let failure = outcome(Ok(report(wire::MAX_MESSAGE))).expect_err("does not fit");
        assert_eq!(failure.code.as_deref(), Some("output_too_large"));
        assert!(failure.usable);
    }

    #[test]
    fn test_a_template_call_and_its_answers_round_trip_through_postcard() {
        let request = crate::protocol::Request::CallTemplate {
            template: 3,
            input: b"world".to_vec(),
            deadline_ms: 250,
        };
        let bytes = postcard::to_allocvec(&request).expect("encode");
        match postcard::from_bytes(&bytes).expect("decode") {
            crate::protocol::Request::CallTemplate {
                template: 3,
                input,
                deadline_ms: 250,
            } => assert_eq!(input, b"world"),
            other => panic!("{other:?}"),
        }
        let warm = vec![WarmCount {
            template: 3,
            target: 1,
            ready: 0,
        }];
        let failed = outcome(Err(CallError::InputTooLarge { len: 9 }));
        for call in [outcome(Ok(report(5))), failed] {
            let sent = TemplateCalled {
                call,
                warm: warm.clone(),
            };
            let envelope = Envelope {
                id: 9,
                body: Response::CalledTemplate(Box::new(sent.clone())),
            };
            let bytes = postcard::to_allocvec(&envelope).expect("encode");
            match postcard::from_bytes::<Envelope<Response>>(&bytes).expect("decode").body {
                Response::CalledTemplate(back) => assert_eq!(*back, sent),
                other => panic!("{other:?}"),
            }
        }
    }
}
