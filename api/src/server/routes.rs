//! The router: endpoints, OpenAPI document, bearer-token check, response counting, and JSON
//! answers for unknown routes and wrong methods.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderMap};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use subtle::ConstantTimeEq;
use utoipa::OpenApi;

use super::app::App;
use super::error::{ErrorBody, ErrorDetail, ServiceError};
use super::handlers::{templates, vms};
use super::model::*;
use super::spec::{self, SpecOptions};
use super::{call, cells, export};

/// The OpenAPI document, generated from the handlers and their types.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "cowvm",
        description = "Clone running KVM guests copy-on-write and see exactly which memory they share."
    ),
    paths(
        vms::create_vm,
        vms::list_vms,
        vms::get_vm,
        vms::delete_vm,
        vms::snapshot_vm,
        vms::live_fork,
        vms::reset_vm,
        vms::probe_write,
        vms::vm_stats,
        vms::run_command,
        templates::clone_template,
        templates::list_templates,
        templates::get_template,
        templates::template_stats,
        templates::delete_template,
        templates::warm_template,
        export::export_template,
        export::import_template,
        call::call_template,
        call::call_vm,
        cells::list_cells,
        openapi,
        metrics,
        healthz
    ),
    components(schemas(
        CreateVm,
        VmInfo,
        SnapshotCreated,
        TemplateInfo,
        CloneRequest,
        CloneMade,
        CloneFailed,
        ClonesCreated,
        ProbeRequest,
        ProbeList,
        ProbeRange,
        RunCommand,
        RunResult,
        ResetDone,
        Health,
        WarmRequest,
        WarmStatus,
        export::TemplateImported,
        call::CallRequest,
        call::CallResult,
        cells::CellView,
        ErrorBody,
        ErrorDetail
    ))
)]
pub struct ApiDoc;

/// The OpenAPI 3 document of this API, as this server was started (limits, token).
#[utoipa::path(get, path = "/openapi.json", tag = "system", responses((status = 200, description = "OpenAPI 3 document", body = Object)))]
pub async fn openapi(Extension(doc): Extension<Arc<serde_json::Value>>) -> Json<serde_json::Value> {
    Json(doc.as_ref().clone())
}

/// Liveness.
#[utoipa::path(get, path = "/healthz", tag = "system", responses((status = 200, body = Health)))]
pub async fn healthz(State(app): State<Arc<App>>) -> Json<Health> {
    Json(Health {
        status: "ok".into(),
        vms: app.vm_count() + app.cells.vm_count(),
        templates: app.templates().len(),
    })
}

/// Prometheus metrics (text exposition format).
#[utoipa::path(get, path = "/metrics", tag = "system", responses((status = 200, description = "Prometheus text", content_type = "text/plain")))]
pub async fn metrics(State(app): State<Arc<App>>) -> impl IntoResponse {
    let m = &app.metrics;
    let vms = app.vms();
    let in_cells = app.cells.vm_count();
    let clones = vms.iter().filter(|v| v.template_id.is_some()).count() + in_cells;
    let failed = vms.iter().filter(|v| v.failure().is_some()).count();
    let templates = app.templates();
    let warm: usize = templates.iter().map(|t| app.warm_shells(t)).sum();
    let mut text = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, u64)]| {
        text.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
        for (labels, value) in samples {
            text.push_str(&format!("{name}{labels} {value}\n"));
        }
    };
    metric(
        "cowvm_vms",
        "gauge",
        "Live VMs by kind.",
        &[
            ("{kind=\"vm\"}", (vms.len() + in_cells - clones) as u64),
            ("{kind=\"clone\"}", clones as u64),
        ],
    );
    metric(
        "cowvm_vms_failed",
        "gauge",
        "Live VMs marked failed.",
        &[("", failed as u64)],
    );
    metric(
        "cowvm_templates",
        "gauge",
        "Templates.",
        &[("", templates.len() as u64)],
    );
    metric(
        "cowvm_warm_shells",
        "gauge",
        "Warm VM shells ready for clones.",
        &[("", warm as u64)],
    );
    let recycle = app.engine.recycle_stats();
    metric(
        "cowvm_vms_recycled_total",
        "counter",
        "Used clones reset in the background and returned to a warm pool.",
        &[("", recycle.recycled)],
    );
    metric(
        "cowvm_vms_not_recycled_total",
        "counter",
        "Used clones torn down instead of recycled.",
        &[("", recycle.destroyed)],
    );
    metric(
        "cowvm_clones_spawned_total",
        "counter",
        "Clones made.",
        &[("", m.clones_spawned.load(Ordering::Relaxed))],
    );
    metric(
        "cowvm_clone_failures_total",
        "counter",
        "Clones that could not be made.",
        &[("", m.clone_failures.load(Ordering::Relaxed))],
    );
    metric(
        "cowvm_spawn_microseconds_sum",
        "counter",
        "Sum of clone spawn times.",
        &[("", m.spawn_us_sum.load(Ordering::Relaxed))],
    );
    let classes: Vec<(String, u64)> = (1..6)
        .map(|c| (format!("{{class=\"{c}xx\"}}"), m.responses[c].load(Ordering::Relaxed)))
        .collect();
    let classes: Vec<(&str, u64)> = classes.iter().map(|(l, v)| (l.as_str(), *v)).collect();
    metric(
        "cowvm_http_responses_total",
        "counter",
        "HTTP responses by status class.",
        &classes,
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text)
}

async fn route_not_found() -> ServiceError {
    ServiceError::NotFound {
        code: "route_not_found",
        message: "no such endpoint; see /openapi.json".into(),
    }
}

async fn method_not_allowed() -> ServiceError {
    ServiceError::MethodNotAllowed("this endpoint does not take that method; see /openapi.json".into())
}

/// The token of an `Authorization` header whose scheme is `Bearer`, in any case (RFC 9110 §11.1).
fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim_start().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Requires `Authorization: Bearer <token>`, compared in constant time; a 401 says
/// `WWW-Authenticate: Bearer`.
async fn require_token(State(token): State<Arc<String>>, request: Request, next: Next) -> Response {
    let given = bearer_token(request.headers());
    let ok = given.is_some_and(|g| g.as_bytes().ct_eq(token.as_bytes()).into());
    if ok {
        next.run(request).await
    } else {
        let mut response =
            ServiceError::Unauthorized("this server needs Authorization: Bearer <token>".into()).into_response();
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer realm=\"cowvm\""),
        );
        response
    }
}

fn is_json(headers: &HeaderMap) -> bool {
    let Some(kind) = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let essence = kind.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    essence == "application/json" || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// Every JSON request body must be an object: serde would otherwise read `[]` or `[16]` as a
/// struct with its fields in order. Bodies that do not parse are left to the handler's extractor,
/// which names the syntax error.
async fn require_object_body(State(limit): State<usize>, request: Request, next: Next) -> Response {
    if !is_json(request.headers()) {
        return next.run(request).await;
    }
    let (parts, body) = request.into_parts();
    let bytes = match axum::body::to_bytes(body, limit).await {
        Ok(bytes) => bytes,
        Err(e) => {
            let too_large = std::error::Error::source(&e).is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            return if too_large {
                ServiceError::PayloadTooLarge {
                    code: "body_too_large",
                    message: format!("the request body is larger than {limit} bytes"),
                }
            } else {
                ServiceError::bad_request("bad_body", "the request body could not be read")
            }
            .into_response();
        }
    };
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    let valid_json = || serde_json::from_slice::<serde::de::IgnoredAny>(&bytes).is_ok();
    if first.is_some_and(|&b| b != b'{') && valid_json() {
        return ServiceError::bad_request("body_not_an_object", "the request body must be a JSON object")
            .into_response();
    }
    next.run(Request::from_parts(parts, Body::from(bytes))).await
}

async fn count_responses(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    let class = (response.status().as_u16() / 100).clamp(1, 5) as usize;
    app.metrics.responses[class].fetch_add(1, Ordering::Relaxed);
    response
}

/// The whole API.
pub fn router(app: Arc<App>, token: Option<String>) -> Router {
    let doc = spec::document(&SpecOptions {
        limits: app.limits.clone(),
        token: token.is_some(),
        kernels: app.kernel_dir.is_some(),
    });
    let max_body = app.limits.max_body_bytes;
    let mut router = Router::new()
        .route("/v1/vms", post(vms::create_vm).get(vms::list_vms))
        .route("/v1/vms/{id}", get(vms::get_vm).delete(vms::delete_vm))
        .route("/v1/vms/{id}/snapshot", post(vms::snapshot_vm))
        .route("/v1/vms/{id}/clones", post(vms::live_fork))
        .route("/v1/vms/{id}/reset", post(vms::reset_vm))
        .route("/v1/vms/{id}/probes/write", post(vms::probe_write))
        .route("/v1/vms/{id}/stats", get(vms::vm_stats))
        .route("/v1/vms/{id}/run", post(vms::run_command))
        .route("/v1/vms/{id}/call", post(call::call_vm))
        .route("/v1/templates/{id}/call", post(call::call_template))
        .route("/v1/templates", get(templates::list_templates))
        .route(
            "/v1/templates/{id}",
            get(templates::get_template).delete(templates::delete_template),
        )
        .route("/v1/templates/{id}/clones", post(templates::clone_template))
        .route("/v1/templates/{id}/stats", get(templates::template_stats))
        .route("/v1/templates/{id}/warm", post(templates::warm_template))
        .route("/v1/templates/{id}/export", get(export::export_template))
        .route("/v1/templates/import", post(export::import_template))
        .route("/v1/cells", get(cells::list_cells))
        .route("/openapi.json", get(openapi))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .fallback(route_not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(Arc::clone(&app), cells::intercept))
        .layer(middleware::from_fn_with_state(max_body, require_object_body))
        .layer(DefaultBodyLimit::max(max_body))
        .layer(Extension(Arc::new(doc)));
    if let Some(token) = token {
        router = router.layer(middleware::from_fn_with_state(Arc::new(token), require_token));
    }
    router
        .layer(middleware::from_fn_with_state(Arc::clone(&app), count_responses))
        .with_state(app)
}
