//! `call`: run a user's guest (guest ABI v1, docs/guest-abi.md) on one input. `POST
//! /v1/templates/{id}/call` runs it in a fresh clone that is torn down afterwards; `POST
//! /v1/vms/{id}/call` runs it in an existing VM, which keeps its state. The request and answer
//! types and the handlers; the work is in [`super::service::calls`].

use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Path, State};
use axum::Json;
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use cowvm_cell::protocol::CallDone;
use cowvm_vmm::call::CallReport;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::app::App;
use super::error::{ErrorBody, ServiceError};
use super::service::calls as service;

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
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CallRequest {
    /// The call's input, base64 (standard alphabet, padded); at most 262080 bytes once decoded.
    #[schema(format = Byte)]
    pub input: String,
    /// How long the guest may run before the call fails with `deadline_exceeded` (1 up to the
    /// server's request timeout; default: the server's guest deadline).
    #[serde(default, deserialize_with = "whole_opt_u64", skip_serializing_if = "Option::is_none")]
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
        CallDone::from(report).into()
    }
}

/// The one place a call's answer is assembled: in process from a [`CallReport`] (through the
/// cell protocol's [`CallDone`]), in a cell from the [`CallDone`] it sends.
impl From<CallDone> for CallResult {
    fn from(done: CallDone) -> Self {
        CallResult {
            output: BASE64.encode(&done.output),
            status: done.status,
            logs: done.log,
            logs_truncated: done.log_truncated,
            spawn_us: done.spawn_us,
            run_us: done.run_us,
            total_us: done.total_us,
        }
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
) -> Result<Json<CallResult>, ServiceError> {
    let Path(id) = id?;
    let Json(req) = body?;
    Ok(Json(service::call_template(&app, &id, req).await?))
}

/// Run one call in an existing VM, which keeps its state (a failed call marks it failed).
#[utoipa::path(post, path = "/v1/vms/{id}/call", tag = "vms", params(("id" = String, Path, description = "VM id")),
    request_body = CallRequest,
    responses((status = 200, body = CallResult), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 413, body = ErrorBody), (status = 415, body = ErrorBody), (status = 422, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn call_vm(
    State(app): State<Arc<App>>,
    id: Id,
    body: Body<CallRequest>,
) -> Result<Json<CallResult>, ServiceError> {
    let Path(id) = id?;
    let Json(req) = body?;
    Ok(Json(service::call_vm(&app, &id, req).await?))
}
