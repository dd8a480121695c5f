//! `/v1/vms` handlers: parse, call [`service::vms`](crate::server::service::vms), answer.

use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;

use crate::server::app::App;
use crate::server::error::{ErrorBody, ServiceError};
use crate::server::model::*;
use crate::server::service::vms as service;

type Body<T> = Result<Json<T>, JsonRejection>;
type Id = Result<Path<String>, PathRejection>;

/// Boot a VM.
#[utoipa::path(post, path = "/v1/vms", tag = "vms", request_body = CreateVm,
    responses((status = 201, body = VmInfo), (status = 400, body = ErrorBody), (status = 422, body = ErrorBody), (status = 429, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn create_vm(
    State(app): State<Arc<App>>,
    body: Body<CreateVm>,
) -> Result<(StatusCode, Json<VmInfo>), ServiceError> {
    let Json(req) = body?;
    Ok((StatusCode::CREATED, Json(service::create_vm(&app, req).await?)))
}

/// List VMs.
#[utoipa::path(get, path = "/v1/vms", tag = "vms", responses((status = 200, body = Vec<VmInfo>)))]
pub async fn list_vms(State(app): State<Arc<App>>) -> Json<Vec<VmInfo>> {
    Json(service::list_vms(&app))
}

/// One VM.
#[utoipa::path(get, path = "/v1/vms/{id}", tag = "vms", params(("id" = String, Path, description = "VM id")),
    responses((status = 200, body = VmInfo), (status = 404, body = ErrorBody)))]
pub async fn get_vm(State(app): State<Arc<App>>, id: Id) -> Result<Json<VmInfo>, ServiceError> {
    let Path(id) = id?;
    Ok(Json(service::get_vm(&app, &id)?))
}

/// Destroy a VM (waits for an operation in progress on it, then tears it down in the background).
#[utoipa::path(delete, path = "/v1/vms/{id}", tag = "vms", params(("id" = String, Path, description = "VM id")),
    responses((status = 204), (status = 404, body = ErrorBody)))]
pub async fn delete_vm(State(app): State<Arc<App>>, id: Id) -> Result<StatusCode, ServiceError> {
    let Path(id) = id?;
    service::delete_vm(&app, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Freeze a VM into a template (the VM keeps running).
#[utoipa::path(post, path = "/v1/vms/{id}/snapshot", tag = "vms", params(("id" = String, Path, description = "VM id")),
    responses((status = 201, body = SnapshotCreated), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn snapshot_vm(
    State(app): State<Arc<App>>,
    id: Id,
) -> Result<(StatusCode, Json<SnapshotCreated>), ServiceError> {
    let Path(id) = id?;
    Ok((StatusCode::CREATED, Json(service::snapshot_vm(&app, &id).await?)))
}

/// Live fork: freeze a running VM into a new template (a short pause) and clone it.
#[utoipa::path(post, path = "/v1/vms/{id}/clones", tag = "vms", params(("id" = String, Path, description = "VM id")),
    request_body = CloneRequest,
    responses((status = 201, body = ClonesCreated), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn live_fork(
    State(app): State<Arc<App>>,
    id: Id,
    body: Body<CloneRequest>,
) -> Result<(StatusCode, Json<ClonesCreated>), ServiceError> {
    let Path(id) = id?;
    let Json(req) = body?;
    Ok((StatusCode::CREATED, Json(service::live_fork(&app, &id, req).await?)))
}

/// Return a clone to its template's state: by swap (the VM id gets a warm shell of its template,
/// `swapped: true`, and its used VM is recycled in the background) or, with no shell ready, in
/// place.
#[utoipa::path(post, path = "/v1/vms/{id}/reset", tag = "vms", params(("id" = String, Path, description = "VM id")),
    responses((status = 200, body = ResetDone), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn reset_vm(State(app): State<Arc<App>>, id: Id) -> Result<Json<ResetDone>, ServiceError> {
    let Path(id) = id?;
    Ok(Json(service::reset_vm(&app, &id).await?))
}

/// Write probe: the guest writes the pages, the host kernel reports what each went through.
#[utoipa::path(post, path = "/v1/vms/{id}/probes/write", tag = "vms", params(("id" = String, Path, description = "VM id")),
    request_body = ProbeRequest,
    responses((status = 200, description = "per-page report", body = ProbeReport), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn probe_write(
    State(app): State<Arc<App>>,
    id: Id,
    body: Body<ProbeRequest>,
) -> Result<Json<ProbeReport>, ServiceError> {
    let Path(id) = id?;
    let Json(req) = body?;
    Ok(Json(service::probe_write(&app, &id, req).await?))
}

/// Sharing statistics of a VM, from the host kernel.
#[utoipa::path(get, path = "/v1/vms/{id}/stats", tag = "vms", params(("id" = String, Path, description = "VM id")),
    responses((status = 200, description = "pages (template_backed, shared, private, zero, untouched, total), kpagecount histogram, smaps, KVM stats", body = VmStats), (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn vm_stats(State(app): State<Arc<App>>, id: Id) -> Result<Json<VmStats>, ServiceError> {
    let Path(id) = id?;
    Ok(Json(service::vm_stats(&app, &id).await?))
}

/// Run a command in the built-in guest.
#[utoipa::path(post, path = "/v1/vms/{id}/run", tag = "vms", params(("id" = String, Path, description = "VM id")),
    request_body = RunCommand,
    responses((status = 200, body = RunResult), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn run_command(
    State(app): State<Arc<App>>,
    id: Id,
    body: Body<RunCommand>,
) -> Result<Json<RunResult>, ServiceError> {
    let Path(id) = id?;
    let Json(req) = body?;
    Ok(Json(service::run_command(&app, &id, req).await?))
}
