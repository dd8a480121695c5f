//! `call`: run a user's guest (guest ABI v1, docs/guest-abi.md) on one input. `POST
//! /v1/templates/{id}/call` runs it in a fresh clone that is torn down afterwards; `POST
//! /v1/vms/{id}/call` runs it in an existing VM, which keeps its state. Also the run of a booted
//! user guest to `ready()`, used by `POST /v1/vms`.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Path, State};
use axum::Json;
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use cowvm_vmm::call::{self, CallError, CallReport};
use cowvm_vmm::{BootReport, Vm};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::app::{App, Machine};
use super::error::{ApiError, ErrorBody};
use super::ops::{blocking, on_vm};
use super::templates::fd_budget;

type Body<T> = Result<Json<T>, JsonRejection>;
type Id = Result<Path<String>, PathRejection>;

/// An optional whole number (`16.0` is 16, as JSON Schema's `integer` says).
fn whole_opt_u64<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let Some(n) = Option::<serde_json::Number>::deserialize(d)? else {
        return Ok(None);
    };
    n.as_u64()
        .or_else(|| {
            n.as_f64()
                .filter(|f| f.fract() == 0.0 && (0.0..18_446_744_073_709_551_616.0).contains(f))
                .map(|f| f as u64)
        })
        .map(Some)
        .ok_or_else(|| serde::de::Error::custom(format!("timeout_ms: {n} is not a whole number of milliseconds")))
}

/// `POST /v1/templates/{id}/call` and `POST /v1/vms/{id}/call`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CallRequest {
    /// The call's input, base64 (standard alphabet, padded); at most 262080 bytes once decoded.
    #[schema(format = Byte)]
    pub input: String,
    /// How long the guest may run before the call fails with `deadline_exceeded` (1 up to the
    /// server's request timeout; default: the server's guest deadline).
    #[serde(default, deserialize_with = "whole_opt_u64")]
    pub timeout_ms: Option<u64>,
}

/// The answer of a call.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CallResult {
    /// The guest's output, base64.
    pub output: String,
    /// The status the guest passed to `done()`.
    pub status: u32,
    /// What the guest logged during the call (at most 64 KiB; invalid UTF-8 replaced).
    pub logs: String,
    /// Whether logs were dropped because the call logged more than 64 KiB.
    pub logs_truncated: bool,
    /// Microseconds to get the VM ready for the call (a clone from a warm shell, the mailbox
    /// written).
    pub spawn_us: f64,
    /// Microseconds the guest ran until `done()`.
    pub run_us: f64,
    /// Microseconds for the whole call.
    pub total_us: f64,
}

impl From<CallReport> for CallResult {
    fn from(report: CallReport) -> Self {
        CallResult {
            output: BASE64.encode(&report.output),
            status: report.status,
            logs: report.log.text(),
            logs_truncated: report.log.truncated(),
            spawn_us: report.spawn_us,
            run_us: report.run_us,
            total_us: report.total_us,
        }
    }
}

impl From<CallError> for ApiError {
    fn from(e: CallError) -> Self {
        match (e.code(), e) {
            (Some(code), e) => Self::out_of_range(code, e.to_string()),
            (None, CallError::Vm(vm)) => vm.into(),
            (None, e) => Self::internal(e.to_string()),
        }
    }
}

/// Decodes the input and checks the timeout.
pub(super) fn parse(app: &App, req: &CallRequest) -> Result<(Vec<u8>, Duration), ApiError> {
    let input = BASE64
        .decode(req.input.as_bytes())
        .map_err(|e| ApiError::bad_request("invalid_field", format!("input is not valid base64: {e}")))?;
    let limit = app.limits.request_timeout.as_millis() as u64;
    let deadline = match req.timeout_ms {
        None => app.limits.guest_deadline,
        Some(ms) if (1..=limit).contains(&ms) => Duration::from_millis(ms),
        Some(ms) => {
            return Err(ApiError::out_of_range(
                "timeout_out_of_range",
                format!("timeout_ms must be 1..={limit} (got {ms})"),
            ))
        }
    };
    Ok((input, deadline))
}

/// Runs a booted user guest from its first exit to `ready()`, if it speaks guest ABI v1 (its
/// first exit is a hypercall); other guests are left as they are.
pub fn run_to_ready(app: &App, vm: &mut Vm, report: &BootReport) -> Result<(), ApiError> {
    if !cowvm_vmm::hypercall::is_hypercall(&report.first_exit) {
        return Ok(());
    }
    match call::run_to_ready(vm, report.first_exit.clone(), app.limits.guest_deadline) {
        Ok(_) => Ok(()),
        Err(CallError::Vm(e)) => Err(e.into()),
        Err(e) => Err(ApiError::out_of_range(
            "boot_failed",
            format!("the guest failed before ready(): {e}"),
        )),
    }
}

/// Run one call in a fresh clone of a template (torn down afterwards).
#[utoipa::path(post, path = "/v1/templates/{id}/call", tag = "templates", params(("id" = String, Path, description = "template id")),
    request_body = CallRequest,
    responses((status = 200, body = CallResult), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 413, body = ErrorBody), (status = 415, body = ErrorBody), (status = 422, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn call_template(
    State(app): State<Arc<App>>,
    id: Id,
    body: Body<CallRequest>,
) -> Result<Json<CallResult>, ApiError> {
    let Path(id) = id?;
    let Json(req) = body?;
    let (input, deadline) = parse(&app, &req)?;
    // The call's clone counts against --max-vms and keeps the template from being deleted while
    // it lives, like any clone.
    let (template, cloning) = app.begin_cloning(&id)?;
    let admitted = app.admit(1, Some(&template.template))?;
    let service = Arc::clone(&app);
    let report = blocking(&app, move || {
        let _cloning = cloning;
        let mut admitted = admitted;
        fd_budget(&service, 1)?;
        let report =
            call::call_template_reserved(&service.engine, &template.template, &mut admitted, &input, deadline)?;
        service.metrics.clones_spawned.fetch_add(1, Ordering::Relaxed);
        Ok(report)
    })
    .await?;
    Ok(Json(report.into()))
}

/// Run one call in an existing VM, which keeps its state (a failed call marks it failed).
#[utoipa::path(post, path = "/v1/vms/{id}/call", tag = "vms", params(("id" = String, Path, description = "VM id")),
    request_body = CallRequest,
    responses((status = 200, body = CallResult), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 413, body = ErrorBody), (status = 415, body = ErrorBody), (status = 422, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn call_vm(
    State(app): State<Arc<App>>,
    id: Id,
    body: Body<CallRequest>,
) -> Result<Json<CallResult>, ApiError> {
    let Path(id) = id?;
    let Json(req) = body?;
    let (input, deadline) = parse(&app, &req)?;
    let report = on_vm(&app, &id, move |app, entry, machine, _commit| {
        let (generation, seed) = match &*machine {
            Machine::Clone(clone) => (clone.generation(), clone.seed()),
            Machine::Booted(_) => (0, 0),
        };
        call::call_vm(machine.vm_mut(), &input, generation, seed, deadline).map_err(|e| {
            if !e.guest_usable() {
                entry.fail(format!("a call failed: {e}"));
                app.metrics.vms_failed.fetch_add(1, Ordering::Relaxed);
            }
            ApiError::from(e)
        })
    })
    .await?;
    Ok(Json(report.into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;

    #[test]
    fn test_every_guest_misbehaviour_is_a_4xx() {
        let errors = [
            CallError::InputTooLarge { len: 1 },
            CallError::OutputTooLarge { len: 1 },
            CallError::Deadline { after_ms: 1 },
            CallError::Fault(cowvm_vmm::GuestExit::Shutdown),
            CallError::NotAbi(cowvm_vmm::GuestExit::Halt),
            CallError::Aborted {
                code: 1,
                log_tail: String::new(),
            },
        ];
        for e in errors {
            let api = ApiError::from(e);
            assert_eq!(api.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", api.code);
        }
    }
}
