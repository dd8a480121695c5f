//! The cell process: receives the KVM device, enters the sandbox, and serves requests one at a
//! time with a clone engine of its own until the supervisor closes the socket.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cowvm_vmm::{
    AdmitError, Clone, CloneEngine, EngineConfig, FrozenMemory, GuestCommand, Kvm, Reservation, Template,
    TemplateMemory, Vm,
};

use crate::protocol::{
    CellCounts, CellVmId, Envelope, Init, LoadTemplate, RemoteError, RemoteErrorKind, Request, Response, SpawnedVm,
    TemplateId, WarmCount,
};
use crate::sandbox;
use crate::wire::{self, WireError};

mod call;
mod freeze;
mod probe;
mod recycle;

/// The descriptor a cell finds its socket on (the supervisor puts it there before `exec`).
pub const CELL_FD: RawFd = 3;

/// How long `Init` waits for the engine's threads to open what they need before the filter
/// closes `open` for good.
const THREADS_READY: Duration = Duration::from_secs(10);

use RemoteErrorKind as Kind;

mod boot;

/// A VM the cell holds: a clone of a template, or a VM it booted (`Request::Boot`).
enum Machine {
    /// A clone.
    Clone(Clone),
    /// A booted VM (never recycled into a warm pool).
    Booted(Vm),
}

impl Machine {
    /// The VM.
    fn vm(&self) -> &Vm {
        match self {
            Machine::Clone(clone) => clone.vm(),
            Machine::Booted(vm) => vm,
        }
    }

    /// The VM, mutably.
    fn vm_mut(&mut self) -> &mut Vm {
        match self {
            Machine::Clone(clone) => clone.vm_mut(),
            Machine::Booted(vm) => vm,
        }
    }

    /// The clone, if it is one.
    fn as_clone(&self) -> Option<&Clone> {
        match self {
            Machine::Clone(clone) => Some(clone),
            Machine::Booted(_) => None,
        }
    }
}

/// A live VM and its room under the cell's limits (VMs and mappings), held until it goes.
struct Held {
    machine: Machine,
    room: Reservation,
}

/// The state of a serving cell.
#[derive(Default)]
struct Worker {
    engine: Option<CloneEngine>,
    max_vms: u32,
    templates: HashMap<TemplateId, Arc<Template>>,
    vms: HashMap<CellVmId, Held>,
    /// Warm-shell targets per template (their sum and the live VMs stay within `max_vms`).
    targets: HashMap<TemplateId, u32>,
    /// Descriptors to send with the current answer.
    outgoing: Vec<OwnedFd>,
    /// Wait for the engine's background teardowns once the current answer is sent (before the
    /// next request), so that VMs torn down off the request path are gone when it is served.
    settle_after_answer: bool,
}

fn admit_error(e: AdmitError) -> RemoteError {
    RemoteError::new(Kind::Full, format!("the cell cannot take these VMs: {e}"))
}

fn vmm_error(e: impl std::fmt::Display) -> RemoteError {
    RemoteError::new(Kind::Vmm, e.to_string())
}

impl Worker {
    fn engine(&self) -> Result<&CloneEngine, RemoteError> {
        self.engine
            .as_ref()
            .ok_or_else(|| RemoteError::new(Kind::Protocol, "the cell has no KVM device yet (Init first)"))
    }

    fn template(&self, id: TemplateId) -> Result<&Arc<Template>, RemoteError> {
        self.templates.get(&id).ok_or_else(|| {
            RemoteError::new(
                Kind::UnknownTemplate,
                format!("template {id} is not loaded in this cell"),
            )
        })
    }

    fn vm(&mut self, id: CellVmId) -> Result<&mut Machine, RemoteError> {
        self.vms
            .get_mut(&id)
            .map(|held| &mut held.machine)
            .ok_or_else(|| RemoteError::new(Kind::UnknownVm, format!("no VM {id} in this cell")))
    }

    /// Every template's target and ready shells.
    fn warm_counts(&self) -> Vec<WarmCount> {
        let mut counts: Vec<WarmCount> = self
            .targets
            .iter()
            .map(|(&template, &target)| WarmCount {
                template,
                target,
                ready: match (&self.engine, self.templates.get(&template)) {
                    (Some(engine), Some(t)) => engine.warm_shells(t) as u32,
                    _ => 0,
                },
            })
            .collect();
        counts.sort_by_key(|c| c.template);
        counts
    }

    /// Sets `template`'s target in the engine and tears down ready shells beyond it.
    fn apply_target(&mut self, template: TemplateId, target: u32) {
        if target == 0 {
            self.targets.remove(&template);
        } else {
            self.targets.insert(template, target);
        }
        if let (Some(engine), Some(t)) = (&self.engine, self.templates.get(&template)) {
            engine.keep_warm(t, target as usize);
            engine.trim_shells(t, target as usize);
        }
    }

    /// Lowers targets (the largest first) until they fit beside the live VMs.
    fn fit_targets(&mut self) {
        let room = self.max_vms.saturating_sub(self.vms.len() as u32);
        let mut total: u32 = self.targets.values().sum();
        while total > room {
            let Some((&template, &target)) = self.targets.iter().max_by_key(|(&id, &t)| (t, id)) else {
                break;
            };
            let lower = (total - room).min(target);
            self.apply_target(template, target - lower);
            total -= lower;
        }
    }

    fn warm_shells(&self) -> u32 {
        self.engine.as_ref().map_or(0, |engine| {
            self.templates.values().map(|t| engine.warm_shells(t) as u32).sum()
        })
    }

    fn handle(&mut self, request: Request, fds: Vec<OwnedFd>) -> Result<Response, RemoteError> {
        match request {
            Request::Init(init) => self.init(init, fds),
            Request::LoadTemplate(load) => self.load(*load, fds),
            Request::KeepWarm {
                template,
                shells,
                wait_ms,
            } => {
                let source = Arc::clone(self.template(template)?);
                self.engine()?;
                let others: u32 = self
                    .targets
                    .iter()
                    .filter(|(&id, _)| id != template)
                    .map(|(_, &t)| t)
                    .sum();
                let room = self.max_vms.saturating_sub(self.vms.len() as u32 + others);
                let target = shells.min(room);
                self.apply_target(template, target);
                let engine = self.engine()?;
                if wait_ms > 0
                    && target > 0
                    && !engine.wait_for_shells(&source, target as usize, Duration::from_millis(wait_ms))
                {
                    if let Some(e) = engine.pool_error(&source) {
                        return Err(RemoteError::new(Kind::Vmm, e));
                    }
                }
                Ok(Response::Warm {
                    shells: engine.warm_shells(&source) as u32,
                    target,
                })
            }
            Request::Spawn { template, count } => self.spawn(template, count),
            Request::Run {
                vm,
                vcpu,
                command,
                deadline_ms,
            } => {
                let vm = self.vm(vm)?.vm_mut();
                let deadline = Some(Duration::from_millis(deadline_ms));
                let (output, took) = vm
                    .execute_on_timed(vcpu as usize, GuestCommand::from(command), deadline)
                    .map_err(|e| {
                        let kind = match e {
                            cowvm_vmm::VmError::Command(_)
                            | cowvm_vmm::VmError::Translate(_)
                            | cowvm_vmm::VmError::NoSuchVcpu { .. } => Kind::Command,
                            _ => Kind::Guest,
                        };
                        RemoteError::new(kind, e.to_string())
                    })?;
                Ok(Response::Ran { output, took })
            }
            Request::Reset { vm } => {
                let mut held = self
                    .vms
                    .remove(&vm)
                    .ok_or_else(|| RemoteError::new(Kind::UnknownVm, format!("no VM {vm} in this cell")))?;
                // By swap when the template has a warm shell here (the used VM is recycled in
                // the background), else in place.
                let report = match &mut held.machine {
                    Machine::Clone(clone) => self.engine()?.reset_by_swap(clone).map_err(vmm_error),
                    Machine::Booted(_) => Err(RemoteError::new(
                        Kind::Protocol,
                        format!("VM {vm} was booted, not cloned; only clones can be reset"),
                    )),
                };
                let host_address = held.machine.vm().ram().host_address();
                self.vms.insert(vm, held);
                Ok(Response::Reset {
                    report: report?,
                    host_address,
                })
            }
            Request::Recycle { vm } => self.recycle(vm),
            Request::Destroy { vm } => {
                let held = self
                    .vms
                    .remove(&vm)
                    .ok_or_else(|| RemoteError::new(Kind::UnknownVm, format!("no VM {vm} in this cell")))?;
                // Torn down here, the VM first, then its room: the room is free when the answer
                // goes out, so the supervisor's count of the cell is exact for the next spawn.
                let Held { machine, room } = held;
                drop(machine);
                drop(room);
                Ok(Response::Done)
            }
            Request::DropTemplate { template } => {
                if self
                    .vms
                    .values()
                    .filter_map(|h| h.machine.as_clone())
                    .any(|c| c.template().id() == self.template(template).map_or(0, |t| t.id()))
                {
                    return Err(RemoteError::new(
                        Kind::Protocol,
                        format!("template {template} still has clones in this cell"),
                    ));
                }
                self.targets.remove(&template);
                if let Some(t) = self.templates.remove(&template) {
                    self.engine()?.retire(&t);
                }
                Ok(Response::Done)
            }
            Request::StatsFds { vm } => {
                let (vm_stats, vcpu_stats) = self.vm(vm)?.vm().stats_fds().map_err(vmm_error)?;
                let vcpus = vcpu_stats.len() as u32;
                self.outgoing = std::iter::once(vm_stats).chain(vcpu_stats).map(OwnedFd::from).collect();
                Ok(Response::StatsFds { vcpus })
            }
            Request::Call { vm, input, deadline_ms } => self.call_vm(vm, &input, deadline_ms),
            Request::CallTemplate {
                template,
                input,
                deadline_ms,
            } => self.call_template(template, &input, deadline_ms),
            Request::Freeze { vm, parent, template } => self.freeze(vm, parent, template),
            Request::ProbePrepare { vm, targets } => self.probe_prepare(vm, targets),
            Request::ProbeWrite { vm, gvas, baseline } => self.probe_write(vm, gvas, baseline),
            Request::Boot(boot) => self.boot(boot, fds),
            Request::FreezeBooted { vm, template } => self.freeze_booted(vm, template),
            Request::Stats => Ok(Response::Stats(CellCounts {
                vms: self.vms.len() as u32,
                warm_shells: self.warm_shells(),
                templates: self.templates.len() as u32,
                warm: self.warm_counts(),
                recycled: self.engine.as_ref().map_or(0, |e| e.recycle_stats().recycled),
            })),
        }
    }

    fn init(&mut self, init: Init, mut fds: Vec<OwnedFd>) -> Result<Response, RemoteError> {
        if self.engine.is_some() {
            return Err(RemoteError::new(Kind::Protocol, "Init was already done"));
        }
        let kvm_fd = fds
            .pop()
            .filter(|_| fds.is_empty())
            .ok_or_else(|| RemoteError::new(Kind::Protocol, "Init carries exactly one fd: /dev/kvm"))?;
        let sandbox_error = |e: sandbox::SandboxError| RemoteError::new(Kind::Sandbox, e.to_string());
        let uid = match init.sandbox.drop_to {
            Some((uid, gid)) => sandbox::drop_privileges(uid, gid).map_err(sandbox_error)?,
            // SAFETY: getuid has no arguments and cannot fail.
            None => unsafe { libc::getuid() },
        };
        cowvm_vmm::clone::reserve_generations(init.generation_floor);
        let kvm = Kvm::from_file(File::from(kvm_fd), Path::new("/dev/kvm (from the supervisor)")).map_err(vmm_error)?;
        // Probe the saveable MSRs now (a throw-away VM), not on the first request.
        kvm.saveable_msrs().map_err(vmm_error)?;
        let config = EngineConfig {
            max_clones_per_call: init.max_vms as usize,
            ..Default::default()
        };
        let engine = CloneEngine::new(Arc::new(kvm), config).map_err(vmm_error)?;
        // The supervisor holds room under --max-vms for this cell's targets, and no more.
        engine.recycle_within_targets();
        // The cell holds at most `max_vms` VMs (two fds each), far below its fd limit, and under
        // seccomp it cannot list /proc/self/fd: no fd check in its shell builder.
        let budget = init
            .mapping_budget
            .map_or_else(cowvm_vmm::pool::default_mapping_budget, |b| b as usize);
        engine.set_limits(init.max_vms as usize, budget, 0);
        if init.sandbox.seccomp {
            // The engine and its shell builder each open /proc/self/pagemap; the builder does it
            // on its own thread, which must happen before `open` is forbidden.
            wait_for_open_files("pagemap", 2, THREADS_READY).map_err(|e| RemoteError::new(Kind::Sandbox, e))?;
            let program = sandbox::cell_filter().map_err(sandbox_error)?;
            // First the filter that turns clone3 into ENOSYS (installing it later would need the
            // seccomp call the cell filter forbids), then the cell filter.
            let fallback = sandbox::clone3_fallback_filter().map_err(sandbox_error)?;
            sandbox::install(&fallback).map_err(sandbox_error)?;
            let no_files = sandbox::no_files_filter().map_err(sandbox_error)?;
            sandbox::install(&no_files).map_err(sandbox_error)?;
            sandbox::install(&program).map_err(sandbox_error)?;
        } else {
            sandbox::set_no_new_privs().map_err(sandbox_error)?;
        }
        self.engine = Some(engine);
        self.max_vms = init.max_vms;
        Ok(Response::Ready {
            pid: std::process::id(),
            uid,
        })
    }

    fn load(&mut self, load: LoadTemplate, fds: Vec<OwnedFd>) -> Result<Response, RemoteError> {
        self.engine()?;
        if fds.len() != 1 + load.overlay_runs.len() {
            return Err(RemoteError::new(
                Kind::Protocol,
                format!(
                    "{} fds for a template of {} layers",
                    fds.len(),
                    1 + load.overlay_runs.len()
                ),
            ));
        }
        let mut frozen = fds.into_iter().map(|fd| FrozenMemory::from_sealed(File::from(fd)));
        let base = frozen
            .next()
            .ok_or_else(|| RemoteError::new(Kind::Protocol, "no base memfd"))?
            .map_err(vmm_error)?;
        let overlays = frozen
            .zip(load.overlay_runs)
            .map(|(memory, runs)| memory.map(|m| (m, runs)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(vmm_error)?;
        let memory = TemplateMemory::layered(base, overlays).map_err(vmm_error)?;
        if memory.size() != load.state.memory_size {
            return Err(RemoteError::new(
                Kind::Protocol,
                format!(
                    "memfd of {} bytes for a state of {} bytes",
                    memory.size(),
                    load.state.memory_size
                ),
            ));
        }
        self.templates
            .insert(load.template, Arc::new(Template::new(memory, load.state)));
        Ok(Response::Loaded)
    }

    fn spawn(&mut self, template: TemplateId, count: u32) -> Result<Response, RemoteError> {
        let source = Arc::clone(self.template(template)?);
        let engine = self.engine()?;
        // Admitted against the cell's VM limit and mapping budget; the template's warm shells
        // are claimed first and other shells give way.
        let mut room = engine.reserve(count as usize, Some(&source)).map_err(admit_error)?;
        let batch = engine
            .spawn_reserved(&source, &mut room, &|| false)
            .map_err(vmm_error)?;
        let mut clones = Vec::with_capacity(batch.clones.len());
        for clone in batch.clones {
            let made = SpawnedVm {
                vm: clone.id(),
                generation: clone.generation(),
                seed: clone.seed(),
                spawn_us: clone.spawn_us(),
                pooled: clone.pooled(),
                host_address: clone.vm().ram().host_address(),
                memory_size: clone.vm().ram().size(),
            };
            let Some(one) = room.split_one() else {
                // Cannot happen (one room per clone made); never hold a VM without room.
                self.engine()?.destroy(clone);
                continue;
            };
            self.vms.insert(
                made.vm,
                Held {
                    machine: Machine::Clone(clone),
                    room: one,
                },
            );
            clones.push(made);
        }
        drop(room);
        // The shells this call took (ready or not) are not rebuilt; other targets give way.
        let target = self.targets.get(&template).copied().unwrap_or(0);
        self.apply_target(template, target.saturating_sub(count));
        self.fit_targets();
        Ok(Response::Spawned {
            clones,
            failed: batch.failed,
            warm: self.warm_counts(),
        })
    }
}

/// Waits until at least `count` open descriptors of this process point at a file whose path
/// ends in `suffix`.
fn wait_for_open_files(suffix: &str, count: usize, timeout: Duration) -> Result<(), String> {
    let started = Instant::now();
    loop {
        let open = std::fs::read_dir("/proc/self/fd")
            .map_err(|e| format!("cannot list /proc/self/fd: {e}"))?
            .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
            .filter(|target| target.to_string_lossy().ends_with(suffix))
            .count();
        if open >= count {
            return Ok(());
        }
        if started.elapsed() > timeout {
            return Err(format!(
                "the engine's threads did not open {suffix} within {timeout:?} ({open} of {count} open)"
            ));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Errors that end a cell.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The socket failed (other than the supervisor closing it).
    #[error(transparent)]
    Wire(#[from] WireError),
}

/// Serves requests on `socket` until the supervisor closes it.
pub fn serve(socket: OwnedFd) -> Result<(), WorkerError> {
    let mut worker = Worker::default();
    let mut buf = Vec::new();
    loop {
        let (request, fds) = match wire::recv::<Request>(socket.as_fd(), &mut buf) {
            Ok(received) => received,
            Err(WireError::Closed) => break,
            Err(e) => return Err(e.into()),
        };
        let Envelope { id, body } = request;
        let body = worker.handle(body, fds).unwrap_or_else(Response::Error);
        let outgoing = std::mem::take(&mut worker.outgoing);
        let borrowed: Vec<_> = outgoing.iter().map(|fd| fd.as_fd()).collect();
        let sent = match wire::send(socket.as_fd(), &Envelope { id, body }, &borrowed) {
            // An answer the socket would not take (too large for its buffer, or no memory for
            // it) fails that request only: a short error goes in its place.
            Err(e @ (WireError::Truncated | WireError::Io { .. })) => {
                let error = RemoteError::new(Kind::Vmm, format!("the cell's answer could not be sent: {e}"));
                wire::send(
                    socket.as_fd(),
                    &Envelope {
                        id,
                        body: Response::Error(error),
                    },
                    &[],
                )
            }
            sent => sent,
        };
        if std::mem::take(&mut worker.settle_after_answer) {
            if let Some(engine) = &worker.engine {
                engine.flush();
            }
        }
        match sent {
            Ok(()) => {}
            Err(WireError::Closed) => break,
            Err(e) => return Err(e.into()),
        }
    }
    // Tear every VM down before leaving (the engine's drop joins its threads).
    worker.vms.clear();
    worker.targets.clear();
    Ok(())
}

/// Entry point of the cell process: serves on [`CELL_FD`], which the supervisor set up.
pub fn main() -> std::process::ExitCode {
    // SAFETY: the supervisor starts cells with their socket on CELL_FD and nothing else in this
    // process owns that descriptor.
    let socket = unsafe { OwnedFd::from_raw_fd(CELL_FD) };
    match serve(socket) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cowvm cell: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
