//! The VM service: what `/v1/vms` does, on typed requests and answers. Each operation checks
//! its request, runs on a blocking thread under the request timeout and answers a typed result
//! or a [`ServiceError`]; the HTTP handlers only parse and call these.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use cowvm_vmm::call::ready::boot_to_ready;
use cowvm_vmm::layout::{bytes_to_mib, DATA_START};
use cowvm_vmm::probe::{write_probe, ProbeTargets};
use cowvm_vmm::stats::vm_sharing;
use cowvm_vmm::{Kernel, Template, VmConfig};

use crate::server::app::{App, Machine, TemplateEntry, VmStatus};
// Under the handlers' old name, so that the moved bodies stay line for line as they were.
use crate::server::error::ServiceError;
use crate::server::model::*;
use crate::server::ops::{blocking, destroy, on_vm, timeout_error, transaction};
use crate::server::templates::{fd_budget, fd_shortfall, register_clones, save_template};

fn resolve_kernel(app: &App, name: &str) -> Result<PathBuf, ServiceError> {
    let dir = app.kernel_dir.as_ref().ok_or_else(|| {
        ServiceError::out_of_range(
            "kernels_disabled",
            "this server boots only the built-in guest (start it with --kernel-dir to allow kernels)",
        )
    })?;
    let plain = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if !plain {
        return Err(ServiceError::out_of_range(
            "bad_kernel",
            "kernel must be a plain file name inside the kernel directory",
        ));
    }
    let path = dir.join(name);
    let canonical = path
        .canonicalize()
        .map_err(|_| ServiceError::out_of_range("bad_kernel", format!("no kernel named {name:?}")))?;
    let root = dir
        .canonicalize()
        .map_err(|e| ServiceError::internal(format!("kernel directory: {e}")))?;
    if !canonical.starts_with(&root) || !canonical.is_file() {
        return Err(ServiceError::out_of_range(
            "bad_kernel",
            format!("{name:?} is not a file inside the kernel directory"),
        ));
    }
    Ok(canonical)
}

/// Checks a `POST /v1/vms` request against the server's limits; answers the kernel to boot.
pub(crate) fn check_create(app: &App, req: &CreateVm) -> Result<Kernel, ServiceError> {
    let limits = &app.limits;
    if !(1..=limits.max_vcpus).contains(&(req.vcpus as usize)) {
        return Err(ServiceError::out_of_range(
            "vcpus_out_of_range",
            format!("vcpus must be 1..={} (got {})", limits.max_vcpus, req.vcpus),
        ));
    }
    if !(4..=limits.max_memory_mib).contains(&req.memory_mib) {
        return Err(ServiceError::out_of_range(
            "memory_out_of_range",
            format!(
                "memory_mib must be 4..={} (got {})",
                limits.max_memory_mib, req.memory_mib
            ),
        ));
    }
    let room = req.memory_mib.saturating_sub(bytes_to_mib(DATA_START.0));
    if req.warmup_mib > room {
        return Err(ServiceError::out_of_range(
            "warmup_out_of_range",
            format!("warmup_mib must be at most {room} for {} MiB", req.memory_mib),
        ));
    }
    let kernel = match &req.kernel {
        None => Kernel::Builtin,
        Some(_) if req.warmup_mib > 0 => {
            return Err(ServiceError::out_of_range(
                "warmup_out_of_range",
                "warm-up needs the built-in guest",
            ));
        }
        Some(name) => Kernel::Elf(resolve_kernel(app, name)?),
    };
    Ok(kernel)
}

/// Boots a VM (with its warm-up written) and registers it; with cells on, in a cell.
pub async fn create_vm(app: &Arc<App>, req: CreateVm) -> Result<VmInfo, ServiceError> {
    let kernel = check_create(app, &req)?;
    if app.cells.enabled() {
        return crate::server::cells::boot::create_vm(app, req, kernel).await;
    }
    let slot = app.admit(1, None)?;
    let service = Arc::clone(app);
    transaction(app, move |commit| {
        fd_budget(&service, 1)?;
        let config = VmConfig {
            memory_mib: req.memory_mib,
            kernel,
            page_size: None,
            vcpus: req.vcpus as usize,
        };
        let deadline = service.limits.guest_deadline;
        let (vm, _) = boot_to_ready(service.engine.kvm(), &config, req.warmup_mib, deadline)?;
        if !commit.commit() {
            service.engine.destroy_vm(vm);
            return Err(timeout_error(&service));
        }
        let status = VmStatus {
            failure: None,
            generation: None,
            spawn_us: None,
        };
        Ok(service
            .add_vm(req.memory_mib, None, Machine::Booted(vm), status, Some(slot))
            .info())
    })
    .await
}

/// Every VM.
pub fn list_vms(app: &App) -> Vec<VmInfo> {
    app.vms().iter().map(|v| v.info()).collect()
}

/// One VM.
pub fn get_vm(app: &App, id: &str) -> Result<VmInfo, ServiceError> {
    Ok(app.vm(id)?.info())
}

/// Destroys a VM: waits for an operation in progress on it, then tears it down in the
/// background.
pub async fn delete_vm(app: &Arc<App>, id: &str) -> Result<(), ServiceError> {
    let entry = app.remove_vm(id)?;
    let service = Arc::clone(app);
    blocking(app, move || {
        destroy(&service, &entry);
        Ok(())
    })
    .await
}

/// Freezes a VM into a template (the VM keeps running).
pub async fn snapshot_vm(app: &Arc<App>, id: &str) -> Result<SnapshotCreated, ServiceError> {
    on_vm(app, id, move |app, entry, machine, commit| {
        fd_budget(app, 1)?;
        let started = Instant::now();
        let template = Template::freeze(app.engine.kvm(), machine.vm_mut())?;
        let pause_us = started.elapsed().as_secs_f64() * 1e6;
        if !commit.commit() {
            return Err(timeout_error(app));
        }
        keep_snapshot(app, app.new_template_id(), Arc::new(template), &entry.id, pause_us)
    })
    .await
}

/// Keeps a template frozen from VM `source_vm`: saves it under the state directory (if there
/// is one) and registers it as `id` (with cells on, the cell pool gets it too).
pub fn keep_frozen(
    app: &App,
    id: String,
    template: Arc<Template>,
    source_vm: &str,
) -> Result<Arc<TemplateEntry>, ServiceError> {
    let persisted = save_template(app, &id, &template)?;
    Ok(app.add_template(TemplateEntry {
        id,
        template,
        source_vm: Some(source_vm.to_owned()),
        persisted,
    }))
}

/// Keeps a snapshot (see [`keep_frozen`]) and answers it: the VM was paused `pause_us`.
/// In-process and in-cell VMs alike.
pub fn keep_snapshot(
    app: &App,
    id: String,
    template: Arc<Template>,
    source_vm: &str,
    pause_us: f64,
) -> Result<SnapshotCreated, ServiceError> {
    let entry = keep_frozen(app, id, template, source_vm)?;
    Ok(SnapshotCreated {
        template_id: entry.id.clone(),
        memory_mib: bytes_to_mib(entry.template.size()),
        layers: entry.template.memory().depth(),
        persisted: entry.persisted,
        pause_us,
    })
}

/// Live fork: freezes a running VM into a new template (a short pause) and clones it.
pub async fn live_fork(app: &Arc<App>, id: &str, req: CloneRequest) -> Result<ClonesCreated, ServiceError> {
    let count = crate::server::templates::check_count(app, req.count)?;
    let admitted = app.admit(count, None)?;
    on_vm(app, id, move |app, entry, machine, commit| {
        let mut admitted = admitted;
        let fits = fd_budget(app, count)?;
        let mut room = admitted.split_off(fits);
        drop(admitted);
        let started = Instant::now();
        let template = Arc::new(Template::freeze(app.engine.kvm(), machine.vm_mut())?);
        let pause_us = started.elapsed().as_secs_f64() * 1e6;
        app.engine
            .retarget(&mut room, &template)
            .map_err(|e| app.admit_error(e))?;
        let batch = {
            let stop = || commit.abandoned();
            app.engine.spawn_reserved(&template, &mut room, &stop)?
        };
        if !commit.commit() {
            for clone in batch.clones {
                app.engine.destroy(clone);
            }
            return Err(timeout_error(app));
        }
        let fork = cowvm_vmm::LiveFork {
            template,
            pause_us,
            batch,
        };
        let template = keep_frozen(app, app.new_template_id(), fork.template, &entry.id)?;
        let mut created = register_clones(app, &template, fork.batch, &mut room)?;
        created.failed.extend(fd_shortfall(fits, count));
        created.pause_us = Some(fork.pause_us);
        Ok(created)
    })
    .await
}

/// Returns a clone to its template's state: by swap (the VM id gets a warm shell of its
/// template, `swapped: true`, and its used VM is recycled in the background) or, with no shell
/// ready, in place.
pub async fn reset_vm(app: &Arc<App>, id: &str) -> Result<ResetDone, ServiceError> {
    on_vm(app, id, |app, entry, machine, _| match machine {
        Machine::Booted(_) => Err(ServiceError::not_a_clone(&entry.id)),
        Machine::Clone(clone) => {
            let report = app.engine.reset_by_swap(clone)?;
            entry.set_generation(report.generation);
            Ok(ResetDone::local(&report))
        }
    })
    .await
}

/// The pages a probe request names (in-process and in-cell VMs alike).
pub(crate) fn probe_targets(req: ProbeRequest) -> ProbeTargets {
    match req {
        ProbeRequest::List(list) => ProbeTargets::Addresses(list.gpas),
        ProbeRequest::Range(r) => ProbeTargets::Stride {
            start: r.start_gpa,
            pages: r.pages,
            stride: r.stride,
        },
    }
}

/// Write probe: the guest writes the pages and the host kernel reports what each went through.
/// A clone's probe also times host-only copy-on-write on a scratch clone of its template.
pub async fn probe_write(app: &Arc<App>, id: &str, req: ProbeRequest) -> Result<ProbeReport, ServiceError> {
    let targets = probe_targets(req);
    on_vm(app, id, move |app, _, machine, _| {
        let host = app.host_view()?;
        // Bad targets are refused before the scratch clone takes any room.
        cowvm_vmm::probe::check_targets(machine.vm_mut(), &targets)?;
        // The scratch clone is a VM too: it holds room under --max-vms while it lives.
        let scratch = match &*machine {
            Machine::Clone(clone) => {
                let mut room = app.admit(1, Some(clone.template()))?;
                let made = app.engine.spawn_reserved(clone.template(), &mut room, &|| false)?;
                made.clones.into_iter().next().map(|scratch| (scratch, room))
            }
            Machine::Booted(_) => None,
        };
        let report = write_probe(machine.vm_mut(), &targets, host, scratch.as_ref().map(|(c, _)| c.vm()));
        if let Some(scratch) = scratch {
            app.engine.drop_later(scratch);
        }
        report.map_err(ServiceError::from)
    })
    .await
}

/// A VM's sharing statistics, from the host kernel.
pub async fn vm_stats(app: &Arc<App>, id: &str) -> Result<VmStats, ServiceError> {
    on_vm(app, id, |app, entry, machine, _| {
        let host = app.host_view()?;
        Ok(VmStats::new(entry.id.clone(), vm_sharing(machine.vm(), host)?))
    })
    .await
}

/// Runs a command in the built-in guest, on the vCPU the request names.
pub async fn run_command(app: &Arc<App>, id: &str, req: RunCommand) -> Result<RunResult, ServiceError> {
    let command = crate::server::cells::guest_command(&req)?;
    let vcpu = req.vcpu as usize;
    on_vm(app, id, move |app, _, machine, _| {
        let vm = machine.vm_mut();
        if vcpu >= vm.vcpu_count() {
            return Err(ServiceError::out_of_range(
                "vcpu_out_of_range",
                format!("vcpu must be 0..{} for this VM (got {vcpu})", vm.vcpu_count()),
            ));
        }
        let (out, took) = vm.execute_on_timed(vcpu, command, Some(app.limits.guest_deadline))?;
        Ok(RunResult::new(out, took))
    })
    .await
}
