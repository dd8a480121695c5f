//! The template service: what `/v1/templates` does on typed requests and answers, and clone
//! registration shared with live forks. The HTTP handlers only parse and call these.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use cowvm_vmm::clone::CloneFailure;
use cowvm_vmm::layout::bytes_to_mib;
use cowvm_vmm::stats::{template_sharing_of, CloneRam, StatsError};
use cowvm_vmm::{CloneBatch, Reservation, Template};

use crate::server::app::{App, Machine, TemplateEntry, VmStatus};
// Under the handlers' old name, so that the moved bodies stay line for line as they were.
use crate::server::error::ServiceError;
use crate::server::model::*;
use crate::server::ops::{blocking, timeout_error, transaction};

/// File descriptors kept free for accepting connections, state files and stats reads.
pub const FD_RESERVE: u64 = 64;
/// File descriptors the warm-shell builder leaves free: more than requests keep, so that a
/// request can still make VMs (and shells give way to it) when the builder has stopped.
pub const SHELL_FD_RESERVE: u64 = 2 * FD_RESERVE;
/// File descriptors one VM holds (its VM fd and its vCPU fd).
pub const FDS_PER_VM: u64 = 2;

fn fd_headroom() -> Result<u64, ServiceError> {
    // Failing to count (the read of /proc/self/fd needs a descriptor itself) means none are left.
    cowvm_vmm::host::fd_headroom()
        .map_err(|e| ServiceError::exhausted(format!("no file descriptor left to count open files: {e}")))
}

/// How many of `count` new VMs the remaining file descriptors allow (keeping [`FD_RESERVE`] free),
/// or a 503 when not even one fits. Warm shells give way first: as many are torn down as the
/// request is short of.
pub fn fd_budget(app: &App, count: usize) -> Result<usize, ServiceError> {
    let mut headroom = fd_headroom()?;
    let short = (count as u64 * FDS_PER_VM + FD_RESERVE).saturating_sub(headroom);
    if short > 0 && app.engine.shed_shells(short.div_ceil(FDS_PER_VM) as usize) > 0 {
        headroom = fd_headroom()?;
    }
    let fits = (headroom.saturating_sub(FD_RESERVE) / FDS_PER_VM) as usize;
    if fits == 0 {
        return Err(ServiceError::exhausted(format!(
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
pub fn check_count(app: &App, count: u64) -> Result<usize, ServiceError> {
    let limit = app.limits.max_clones_per_call;
    if count == 0 || count > limit as u64 {
        return Err(ServiceError::out_of_range(
            "count_out_of_range",
            format!("count must be 1..={limit} (got {count})"),
        ));
    }
    Ok(count as usize)
}

/// Saves a template under the state directory, if there is one.
pub fn save_template(app: &App, id: &str, template: &Template) -> Result<bool, ServiceError> {
    crate::server::state_dir::save(app, id, template)
}

/// The error of a clone call that made no clone: 422 when the template's guest stopped (every
/// clone would), 503 otherwise; both `clones_failed` with the first reason.
pub fn none_made(failed: &[CloneFailure]) -> ServiceError {
    let first = failed.first();
    let reason = first.map_or_else(|| "no clone was made".to_owned(), |f| f.reason.clone());
    let message = format!("no clone could be made: {reason}");
    if first.is_some_and(|f| f.guest_stopped) {
        ServiceError::out_of_range("clones_failed", message)
    } else {
        ServiceError::unavailable("clones_failed", message)
    }
}

/// The answer of a clone call of template `template_id`, in this process or in cells alike:
/// counts the clones made and not made in the metrics, and refuses a call that made none (422
/// when the template's guest stopped on a clone's first run, the template's fault; 503 for
/// anything else, the host's).
pub fn clones_created(
    app: &App,
    template_id: &str,
    clones: Vec<CloneMade>,
    failed: Vec<CloneFailure>,
    total_us: f64,
) -> Result<ClonesCreated, ServiceError> {
    let metrics = &app.metrics;
    metrics.clone_failures.fetch_add(failed.len() as u64, Ordering::Relaxed);
    if clones.is_empty() {
        return Err(none_made(&failed));
    }
    for made in &clones {
        metrics.clones_spawned.fetch_add(1, Ordering::Relaxed);
        metrics.spawn_us_sum.fetch_add(made.spawn_us as u64, Ordering::Relaxed);
    }
    Ok(ClonesCreated {
        template_id: template_id.to_owned(),
        clones,
        failed: failed
            .into_iter()
            .map(|f| CloneFailed {
                index: f.index,
                reason: f.reason,
            })
            .collect(),
        total_us,
        pause_us: None,
    })
}

/// Adds the clones of `batch` as VMs, each holding room for one VM from `room`, and describes
/// the result ([`clones_created`]).
pub fn register_clones(
    app: &App,
    template: &TemplateEntry,
    batch: CloneBatch,
    room: &mut Reservation,
) -> Result<ClonesCreated, ServiceError> {
    let memory_mib = bytes_to_mib(template.template.size());
    let clones = batch
        .clones
        .into_iter()
        .map(|clone| {
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
    clones_created(app, &template.id, clones, batch.failed, batch.total_us)
}

/// Makes clones of a template.
pub async fn clone_template(app: &Arc<App>, id: &str, req: CloneRequest) -> Result<ClonesCreated, ServiceError> {
    let count = check_count(app, req.count)?;
    let (template, cloning) = app.begin_cloning(id)?;
    let admitted = app.admit(count, Some(&template.template))?;
    let service = Arc::clone(app);
    transaction(app, move |commit| {
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
    .await
}

/// Every template.
pub fn list_templates(app: &App) -> Vec<TemplateInfo> {
    app.templates().iter().map(|t| app.template_info(t)).collect()
}

/// One template.
pub fn get_template(app: &App, id: &str) -> Result<TemplateInfo, ServiceError> {
    let entry = app.template(id)?;
    Ok(app.template_info(&entry))
}

/// Sharing statistics of a template over its live clones, from the host kernel.
pub async fn template_stats(app: &Arc<App>, id: &str) -> Result<TemplateStats, ServiceError> {
    let entry = app.template(id)?;
    let service = Arc::clone(app);
    blocking(app, move || {
        let clones = service.clones_of(&entry.id);
        let guards: Vec<_> = clones.iter().map(|c| c.lock_machine()).collect();
        let vms: Vec<&cowvm_vmm::Vm> = guards.iter().filter_map(|g| g.as_ref().map(Machine::vm)).collect();
        let pagemap = service.engine.pagemap();
        let mut rams: Vec<CloneRam<'_>> = Vec::with_capacity(vms.len());
        for (index, vm) in vms.iter().enumerate() {
            if vm.ram().template().is_none() {
                return Err(StatsError::NotAClone { index }.into());
            }
            rams.push(CloneRam {
                host_address: vm.ram().host_address(),
                size: vm.ram().size(),
                pagemap,
            });
        }
        // With cells on, clones and warm shells of the template live in cells too.
        let shells = service.engine.warm_shells(&entry.template) + service.cells.warm_ready(&entry.id);
        let sharing = service.cells.scan_clones(&entry.id, |in_cells| {
            let all: Vec<CloneRam<'_>> = rams.iter().chain(in_cells).copied().collect();
            Ok(template_sharing_of(&entry.template, &all, shells)?)
        })?;
        Ok(TemplateStats::new(entry.id.clone(), sharing))
    })
    .await
}

/// Deletes a template (409 while clones of it are alive).
pub async fn delete_template(app: &Arc<App>, id: &str) -> Result<(), ServiceError> {
    let check = (Arc::clone(app), id.to_owned());
    blocking(app, move || {
        crate::server::state_dir::refuse_if_parent(&check.0, &check.1)
    })
    .await?;
    let entry = app.remove_template(id)?;
    if entry.persisted {
        if let Some(dir) = app.state_dir.clone() {
            let id = entry.id.clone();
            blocking(app, move || crate::server::state_dir::remove(&dir, &id)).await?;
        }
    }
    Ok(())
}

/// Sets how many warm shells the server keeps ready for a template (built in the background).
pub fn warm_template(app: &App, id: &str, req: WarmRequest) -> Result<WarmStatus, ServiceError> {
    let limit = app.limits.max_vms as u64;
    if req.shells > limit {
        return Err(ServiceError::out_of_range(
            "count_out_of_range",
            format!("shells must be 0..={limit} (got {})", req.shells),
        ));
    }
    // The target is kept; the builder builds only into room under --max-vms and the budgets.
    let entry = app.warm(id, req.shells as usize)?;
    Ok(WarmStatus {
        template_id: entry.id.clone(),
        target: req.shells,
        warm_shells: app.warm_shells(&entry),
    })
}
