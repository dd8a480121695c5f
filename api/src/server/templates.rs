//! `/v1/templates` handlers, and clone registration shared with live forks.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use cowvm_vmm::stats::template_sharing;
use cowvm_vmm::{CloneBatch, Reservation, Template};

use super::app::{App, Machine, TemplateEntry, VmStatus};
use super::error::{ApiError, ErrorBody};
use super::model::*;
use super::ops::{blocking, timeout_error, transaction};

/// File descriptors kept free for accepting connections, state files and stats reads.
pub const FD_RESERVE: u64 = 64;
/// File descriptors the warm-shell builder leaves free: more than requests keep, so that a
/// request can still make VMs (and shells give way to it) when the builder has stopped.
pub const SHELL_FD_RESERVE: u64 = 2 * FD_RESERVE;
/// File descriptors one VM holds (its VM fd and its vCPU fd).
pub const FDS_PER_VM: u64 = 2;

fn fd_headroom() -> Result<u64, ApiError> {
    // Failing to count (the read of /proc/self/fd needs a descriptor itself) means none are left.
    cowvm_vmm::host::fd_headroom()
        .map_err(|e| ApiError::exhausted(format!("no file descriptor left to count open files: {e}")))
}

/// How many of `count` new VMs the remaining file descriptors allow (keeping [`FD_RESERVE`] free),
/// or a 503 when not even one fits. Warm shells give way first: as many are torn down as the
/// request is short of.
pub fn fd_budget(app: &App, count: usize) -> Result<usize, ApiError> {
    let mut headroom = fd_headroom()?;
    let short = (count as u64 * FDS_PER_VM + FD_RESERVE).saturating_sub(headroom);
    if short > 0 && app.engine.shed_shells(short.div_ceil(FDS_PER_VM) as usize) > 0 {
        headroom = fd_headroom()?;
    }
    let fits = (headroom.saturating_sub(FD_RESERVE) / FDS_PER_VM) as usize;
    if fits == 0 {
        return Err(ApiError::exhausted(format!(
            "no file descriptors left for another VM ({headroom} free, {FD_RESERVE} kept in reserve); delete VMs or raise RLIMIT_NOFILE"
        )));
    }
    Ok(count.min(fits))
}

/// Clones asked for but not attempted because file descriptors ran short.
pub fn fd_shortfall(made_or_tried: usize, count: usize) -> Vec<CloneFailed> {
    (made_or_tried..count)
        .map(|index| CloneFailed {
            index,
            reason: format!("not attempted: too few file descriptors left (each VM needs {FDS_PER_VM}; {FD_RESERVE} are kept in reserve)"),
        })
        .collect()
}

/// Checks a clone count against the per-call limit (the total is admitted by [`App::admit`]).
pub fn check_count(app: &App, count: u64) -> Result<usize, ApiError> {
    let limit = app.limits.max_clones_per_call;
    if count == 0 || count > limit as u64 {
        return Err(ApiError::out_of_range(
            "count_out_of_range",
            format!("count must be 1..={limit} (got {count})"),
        ));
    }
    Ok(count as usize)
}

/// Saves a template under the state directory, if there is one.
pub fn save_template(app: &App, id: &str, template: &Template) -> Result<bool, ApiError> {
    super::state_dir::save(app, id, template)
}

/// Adds the clones of `batch` as VMs, each holding room for one VM from `room`, and describes
/// the result.
pub fn register_clones(
    app: &App,
    template: &TemplateEntry,
    batch: CloneBatch,
    room: &mut Reservation,
) -> Result<ClonesCreated, ApiError> {
    let metrics = &app.metrics;
    metrics
        .clone_failures
        .fetch_add(batch.failed.len() as u64, Ordering::Relaxed);
    if batch.clones.is_empty() {
        let first = batch.failed.first();
        let reason = first.map_or_else(|| "no clone was made".to_owned(), |f| f.reason.clone());
        // A template whose guest stops on a clone's first run is the template's fault (422);
        // anything else is the host's (503).
        let status = if first.is_some_and(|f| f.guest_stopped) {
            StatusCode::UNPROCESSABLE_ENTITY
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        return Err(ApiError::new(
            status,
            "clones_failed",
            format!("no clone could be made: {reason}"),
        ));
    }
    let memory_mib = template.template.size() >> 20;
    let clones = batch
        .clones
        .into_iter()
        .map(|clone| {
            metrics.clones_spawned.fetch_add(1, Ordering::Relaxed);
            metrics
                .spawn_us_sum
                .fetch_add(clone.spawn_us() as u64, Ordering::Relaxed);
            let made = CloneMade {
                id: String::new(),
                spawn_us: clone.spawn_us(),
                generation: clone.generation(),
                seed: clone.seed(),
                pooled: clone.pooled(),
            };
            let status = VmStatus {
                failure: None,
                generation: Some(made.generation),
                spawn_us: Some(made.spawn_us),
            };
            let slot = room.split_one();
            let entry = app.add_vm(
                memory_mib,
                Some(template.id.clone()),
                Machine::Clone(clone),
                status,
                slot,
            );
            CloneMade {
                id: entry.id.clone(),
                ..made
            }
        })
        .collect();
    Ok(ClonesCreated {
        template_id: template.id.clone(),
        clones,
        failed: batch
            .failed
            .into_iter()
            .map(|f| CloneFailed {
                index: f.index,
                reason: f.reason,
            })
            .collect(),
        total_us: batch.total_us,
        pause_us: None,
    })
}

/// Make clones of a template.
#[utoipa::path(post, path = "/v1/templates/{id}/clones", tag = "templates", params(("id" = String, Path, description = "template id")),
    request_body = CloneRequest,
    responses((status = 201, body = ClonesCreated), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody), (status = 429, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn clone_template(
    State(app): State<Arc<App>>,
    id: Result<Path<String>, PathRejection>,
    body: Result<Json<CloneRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<ClonesCreated>), ApiError> {
    let Path(id) = id?;
    let Json(req) = body?;
    let count = check_count(&app, req.count)?;
    let (template, cloning) = app.begin_cloning(&id)?;
    let admitted = app.admit(count, Some(&template.template))?;
    let service = Arc::clone(&app);
    let created = transaction(&app, move |commit| {
        let _cloning = cloning;
        let mut admitted = admitted;
        let fits = fd_budget(&service, count)?;
        let mut room = admitted.split_off(fits);
        drop(admitted);
        let batch = {
            let stop = || commit.abandoned();
            service.engine.spawn_reserved(&template.template, &mut room, &stop)?
        };
        if !commit.commit() {
            for clone in batch.clones {
                service.engine.destroy(clone);
            }
            return Err(timeout_error(&service));
        }
        let mut created = register_clones(&service, &template, batch, &mut room)?;
        created.failed.extend(fd_shortfall(fits, count));
        Ok(created)
    })
    .await?;
    Ok((StatusCode::CREATED, Json(created)))
}

/// List templates.
#[utoipa::path(get, path = "/v1/templates", tag = "templates", responses((status = 200, body = Vec<TemplateInfo>)))]
pub async fn list_templates(State(app): State<Arc<App>>) -> Json<Vec<TemplateInfo>> {
    Json(app.templates().iter().map(|t| app.template_info(t)).collect())
}

/// One template.
#[utoipa::path(get, path = "/v1/templates/{id}", tag = "templates", params(("id" = String, Path, description = "template id")),
    responses((status = 200, body = TemplateInfo), (status = 404, body = ErrorBody)))]
pub async fn get_template(
    State(app): State<Arc<App>>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<TemplateInfo>, ApiError> {
    let Path(id) = id?;
    let entry = app.template(&id)?;
    Ok(Json(app.template_info(&entry)))
}

/// Sharing statistics of a template over its live clones, from the host kernel.
#[utoipa::path(get, path = "/v1/templates/{id}/stats", tag = "templates", params(("id" = String, Path, description = "template id")),
    responses((status = 200, description = "populated_pages, histogram, pages_shared_by_all, mapped/private/saved/full_copy/own bytes, warm_shells", body = TemplateStats), (status = 404, body = ErrorBody)))]
pub async fn template_stats(
    State(app): State<Arc<App>>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<TemplateStats>, ApiError> {
    let Path(id) = id?;
    let entry = app.template(&id)?;
    let service = Arc::clone(&app);
    let stats = blocking(&app, move || {
        let clones = service.clones_of(&entry.id);
        let guards: Vec<_> = clones.iter().map(|c| c.lock_machine()).collect();
        let vms: Vec<&cowvm_vmm::Vm> = guards.iter().filter_map(|g| g.as_ref().map(Machine::vm)).collect();
        let shells = service.engine.warm_shells(&entry.template);
        let sharing = template_sharing(&entry.template, &vms, shells, service.engine.pagemap())?;
        Ok(TemplateStats::new(entry.id.clone(), sharing))
    })
    .await?;
    Ok(Json(stats))
}

/// Delete a template (409 while clones of it are alive).
#[utoipa::path(delete, path = "/v1/templates/{id}", tag = "templates", params(("id" = String, Path, description = "template id")),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn delete_template(
    State(app): State<Arc<App>>,
    id: Result<Path<String>, PathRejection>,
) -> Result<StatusCode, ApiError> {
    let Path(id) = id?;
    let check = (Arc::clone(&app), id.clone());
    blocking(&app, move || super::state_dir::refuse_if_parent(&check.0, &check.1)).await?;
    let entry = app.remove_template(&id)?;
    if entry.persisted {
        if let Some(dir) = app.state_dir.clone() {
            let id = entry.id.clone();
            blocking(&app, move || super::state_dir::remove(&dir, &id)).await?;
        }
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Set how many warm shells the server keeps ready for a template (built in the background).
#[utoipa::path(post, path = "/v1/templates/{id}/warm", tag = "templates", params(("id" = String, Path, description = "template id")),
    request_body = WarmRequest,
    responses((status = 200, body = WarmStatus), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn warm_template(
    State(app): State<Arc<App>>,
    id: Result<Path<String>, PathRejection>,
    body: Result<Json<WarmRequest>, JsonRejection>,
) -> Result<Json<WarmStatus>, ApiError> {
    let Path(id) = id?;
    let Json(req) = body?;
    let limit = app.limits.max_vms as u64;
    if req.shells > limit {
        return Err(ApiError::out_of_range(
            "count_out_of_range",
            format!("shells must be 0..={limit} (got {})", req.shells),
        ));
    }
    // The target is kept; the builder builds only into room under --max-vms and the budgets.
    let entry = app.warm(&id, req.shells as usize)?;
    Ok(Json(WarmStatus {
        template_id: entry.id.clone(),
        target: req.shells,
        warm_shells: app.warm_shells(&entry),
    }))
}
