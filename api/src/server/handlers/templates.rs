//! `/v1/templates` handlers: parse, call [`service::templates`](crate::server::service::templates),
//! answer.

use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;

use crate::server::app::App;
use crate::server::error::{ErrorBody, ServiceError};
use crate::server::model::*;
use crate::server::service::templates as service;

type Body<T> = Result<Json<T>, JsonRejection>;
type Id = Result<Path<String>, PathRejection>;

/// Make clones of a template.
#[utoipa::path(post, path = "/v1/templates/{id}/clones", tag = "templates", params(("id" = String, Path, description = "template id")),
    request_body = CloneRequest,
    responses((status = 201, body = ClonesCreated), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody), (status = 429, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn clone_template(
    State(app): State<Arc<App>>,
    id: Id,
    body: Body<CloneRequest>,
) -> Result<(StatusCode, Json<ClonesCreated>), ServiceError> {
    let Path(id) = id?;
    let Json(req) = body?;
    Ok((
        StatusCode::CREATED,
        Json(service::clone_template(&app, &id, req).await?),
    ))
}

/// List templates.
#[utoipa::path(get, path = "/v1/templates", tag = "templates", responses((status = 200, body = Vec<TemplateInfo>)))]
pub async fn list_templates(State(app): State<Arc<App>>) -> Json<Vec<TemplateInfo>> {
    Json(service::list_templates(&app))
}

/// One template.
#[utoipa::path(get, path = "/v1/templates/{id}", tag = "templates", params(("id" = String, Path, description = "template id")),
    responses((status = 200, body = TemplateInfo), (status = 404, body = ErrorBody)))]
pub async fn get_template(State(app): State<Arc<App>>, id: Id) -> Result<Json<TemplateInfo>, ServiceError> {
    let Path(id) = id?;
    Ok(Json(service::get_template(&app, &id)?))
}

/// Sharing statistics of a template over its live clones, from the host kernel.
#[utoipa::path(get, path = "/v1/templates/{id}/stats", tag = "templates", params(("id" = String, Path, description = "template id")),
    responses((status = 200, description = "populated_pages, histogram, pages_shared_by_all, mapped/private/saved/full_copy/own bytes, warm_shells", body = TemplateStats), (status = 404, body = ErrorBody)))]
pub async fn template_stats(State(app): State<Arc<App>>, id: Id) -> Result<Json<TemplateStats>, ServiceError> {
    let Path(id) = id?;
    Ok(Json(service::template_stats(&app, &id).await?))
}

/// Delete a template (409 while clones of it are alive).
#[utoipa::path(delete, path = "/v1/templates/{id}", tag = "templates", params(("id" = String, Path, description = "template id")),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn delete_template(State(app): State<Arc<App>>, id: Id) -> Result<StatusCode, ServiceError> {
    let Path(id) = id?;
    service::delete_template(&app, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Set how many warm shells the server keeps ready for a template (built in the background).
#[utoipa::path(post, path = "/v1/templates/{id}/warm", tag = "templates", params(("id" = String, Path, description = "template id")),
    request_body = WarmRequest,
    responses((status = 200, body = WarmStatus), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn warm_template(
    State(app): State<Arc<App>>,
    id: Id,
    body: Body<WarmRequest>,
) -> Result<Json<WarmStatus>, ServiceError> {
    let Path(id) = id?;
    let Json(req) = body?;
    Ok(Json(service::warm_template(&app, &id, req)?))
}
