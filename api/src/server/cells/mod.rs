//! `cowvm serve` (cells are its default): VMs live in sandboxed cell processes ([`cowvm_cell::CellPool`])
//! instead of the server's own process.
//!
//! What it covers today: templates (snapshots, live forks, templates loaded from the state
//! directory) are handed to the pool as they are added; `POST /v1/templates/{id}/clones` places
//! its clones in cells, taking the warm shells a keeper thread keeps there (counted against
//! `--max-vms`); `GET`/`DELETE /v1/vms/{id}`, `GET /v1/vms`, `POST /v1/vms/{id}/run`, `reset`,
//! `call`, `GET /v1/vms/{id}/stats` (read by the supervisor from the cell's pagemap) and
//! `POST /v1/vms/{id}/probes/write` (split between cell and supervisor, `probe.rs`) serve them;
//! `POST /v1/vms/{id}/snapshot` and live forks (`POST /v1/vms/{id}/clones`) freeze an in-cell VM
//! in its cell (`snapshot.rs`); `POST /v1/templates/{id}/call` runs its one-shot clone in a cell
//! from a warm shell there (`call.rs`). A watcher notices dead cells and marks their VMs `lost`
//! (409 `vm_lost` on every operation but GET and DELETE) and stops cells idle beyond a small
//! pool; the pool starts new cells on demand. `POST /v1/vms` boots its VM in a cell too
//! ([`boot`]): the server checks the request as without cells, sends a user kernel as a sealed
//! memfd, and the VM answers as a booted VM (`reset` 409 `not_a_clone`; deleting it destroys
//! it; `snapshot` and live forks freeze it in its cell).
//!
//! The requests on in-cell VMs are answered by [`intercept`], a middleware in front of the
//! in-process handlers, so that those handlers stay as they are when cells are off.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, RwLock, Weak};
use std::time::{Duration, Instant};

use axum::extract::{FromRequest, Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use cowvm_cell::protocol::{RemoteErrorKind, TemplateId};
use cowvm_cell::{CellConfig, CellError, CellPool, GenerationBlocks, PoolBatch, PoolError, VmRef, VmStatsFiles};
use cowvm_vmm::layout::bytes_to_mib;
use cowvm_vmm::pagemap::PageMap;
use cowvm_vmm::stats::{region_sharing, CloneRam, RamRegion};
use cowvm_vmm::{AdmitError, GuestCommand, Reservation, Template};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use vm_memory::GuestAddress;

use super::app::{App, TemplateEntry};
use super::call::{CallRequest, CallResult};
use super::error::ServiceError;
use super::model::ProbeRequest;
use super::model::{CloneMade, CloneRequest, ClonesCreated, ResetDone, RunCommand, RunResult, VmInfo, VmStats};
use super::ops::{blocking, timeout_error, transaction, Commit};
use super::service::vms::probe_targets;

mod call;
mod probe;
mod recycle;
mod snapshot;

pub mod boot;

/// How often the watcher looks for dead cells.
const WATCH_INTERVAL: Duration = Duration::from_millis(20);
/// How often the warm keeper looks at the cells' warm shells (it is also woken after clone
/// calls, deletes and target changes).
const WARM_INTERVAL: Duration = Duration::from_millis(50);

/// How the server runs cells (`--cells`).
#[derive(Debug, Clone)]
pub struct CellsConfig {
    /// The program a cell runs (the `cowvm` binary).
    pub program: PathBuf,
    /// Its arguments (`["cell"]`).
    pub args: Vec<OsString>,
    /// Most VMs one cell holds (`--vms-per-cell`).
    pub vms_per_cell: u32,
    /// Most cells at once (`--max-cells`).
    pub max_cells: usize,
    /// Idle cells (no VM, no warm shell) kept started for the next clones; more are stopped.
    pub idle_cells: usize,
    /// How long a cell must stay idle before it is stopped.
    pub idle_after: Duration,
}

/// Idle cells kept by default.
pub const IDLE_CELLS: usize = 1;
/// How long a cell stays idle by default before it is stopped.
pub const IDLE_AFTER: Duration = Duration::from_secs(30);

impl CellsConfig {
    /// Cells started as `<this executable> cell`.
    pub fn current_exe(vms_per_cell: u32, max_cells: usize) -> std::io::Result<Self> {
        Ok(CellsConfig {
            program: std::env::current_exe()?,
            args: vec!["cell".into()],
            vms_per_cell,
            max_cells,
            idle_cells: IDLE_CELLS,
            idle_after: IDLE_AFTER,
        })
    }
}

/// A cell as `GET /v1/cells` lists it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CellView {
    /// The cell's id in the server (never reused).
    pub id: u64,
    /// Its process id.
    pub pid: u32,
    /// The uid it runs as (65534 when the server runs as root).
    pub uid: u32,
    /// Live VMs placed in it.
    pub vms: u32,
    /// Warm shells it keeps.
    pub warm_shells: u32,
    /// `Seccomp:` of `/proc/<pid>/status`: 0 none, 1 strict, 2 filter (null if unreadable).
    pub seccomp: Option<u32>,
    /// Deleted clones it reset into warm shells of their template instead of tearing them
    /// down (recycling happens while the template's warm shells are short of what is wanted).
    pub recycled: u64,
}

/// What the API shows of an in-cell VM beyond its identity.
#[derive(Debug, Clone, Default)]
struct CellVmStatus {
    generation: u64,
    spawn_us: f64,
    failure: Option<String>,
    lost: Option<String>,
    /// A booted VM's RAM is a private view of a template it was frozen into (as a clone's is).
    frozen: bool,
}

/// A VM that lives in a cell: a clone, or a VM booted there.
pub struct CellVm {
    id: String,
    at: VmRef,
    /// Its cell's process id, and where its RAM is mapped there (for `/proc/<pid>/pagemap`).
    pid: u32,
    /// Where its RAM is mapped in the cell (a reset by swap moves it).
    host_address: AtomicU64,
    memory_size: u64,
    /// KVM's statistics fds of the VM, handed over by its cell on the first stats request.
    kvm_stats: Mutex<Option<VmStatsFiles>>,
    memory_mib: u64,
    /// vCPUs.
    vcpus: usize,
    /// The template of a clone (`None`: a booted VM).
    template_id: Option<String>,
    status: Mutex<CellVmStatus>,
    /// Held while an operation runs on the VM (one at a time, as for in-process VMs).
    busy: Mutex<()>,
    /// Its room under `--max-vms`: held until the VM is deleted or lost with its cell.
    slot: Mutex<Option<Reservation>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl CellVm {
    fn info(&self) -> VmInfo {
        let status = lock(&self.status).clone();
        let state = if status.lost.is_some() {
            "lost"
        } else if status.failure.is_some() {
            "failed"
        } else {
            "running"
        };
        VmInfo {
            id: self.id.clone(),
            memory_mib: self.memory_mib,
            vcpus: u32::try_from(self.vcpus).unwrap_or(u32::MAX),
            state: state.into(),
            kind: if self.template_id.is_some() { "clone" } else { "vm" }.into(),
            template_id: self.template_id.clone(),
            failure: status.lost.or(status.failure),
            generation: self.template_id.as_ref().map(|_| status.generation),
            spawn_us: self.template_id.as_ref().map(|_| status.spawn_us),
        }
    }

    /// Where the VM's RAM is mapped in its cell now.
    fn host_address(&self) -> u64 {
        self.host_address.load(Ordering::Acquire)
    }

    /// 409 `vm_lost` or `vm_failed` if the VM cannot take operations.
    fn usable(&self) -> Result<(), ServiceError> {
        let status = lock(&self.status);
        if let Some(reason) = &status.lost {
            return Err(ServiceError::conflict(
                "vm_lost",
                format!("VM {} was lost: {reason}", self.id),
            ));
        }
        if let Some(reason) = &status.failure {
            return Err(ServiceError::conflict(
                "vm_failed",
                format!("VM {} has failed: {reason}", self.id),
            ));
        }
        Ok(())
    }

    /// Marks the VM lost (its cell is gone) and gives its room under `--max-vms` back.
    fn mark_lost(&self, reason: String) {
        lock(&self.status).lost.get_or_insert(reason);
        lock(&self.slot).take();
    }
}

/// The server's cells, when `--cells` is on.
pub struct CellService {
    pool: CellPool,
    vms: RwLock<HashMap<String, Arc<CellVm>>>,
    stop: AtomicBool,
    /// Clone calls hold it shared from taking shell room until their cells have lowered their
    /// targets; the warm keeper holds it alone while it matches room to targets.
    warm_gate: RwLock<()>,
    warm: Mutex<WarmState>,
    warm_wake: Condvar,
}

/// Warm shells kept in cells, and their room under `--max-vms`.
#[derive(Default)]
struct WarmState {
    /// Shells wanted per template (`--warm-shells`, `POST /v1/templates/{id}/warm`).
    wanted: HashMap<TemplateId, u32>,
    /// Room held for the shells the cells keep (their targets), per template.
    room: HashMap<TemplateId, Vec<Reservation>>,
    /// Something changed: the keeper should look now.
    poked: bool,
    /// The wanted shells changed: the keeper grows targets at once, without waiting for
    /// deleted clones to be recycled.
    urgent: bool,
    /// Per template, the least shortfall (shells wanted less the cells' targets) seen since the
    /// keeper last grew targets: only a shortfall that recycled clones did not fill for a whole
    /// [`WARM_INTERVAL`] is filled by building shells.
    floor: HashMap<TemplateId, u32>,
    /// When the keeper last grew targets.
    grown_at: Option<Instant>,
}

fn room_of(parts: &[Reservation]) -> usize {
    parts.iter().map(Reservation::vms).sum()
}

/// Moves room for up to `vms` VMs out of `parts`.
fn take_room(parts: &mut Vec<Reservation>, vms: usize) -> Vec<Reservation> {
    let mut taken = Vec::new();
    let mut left = vms;
    while left > 0 {
        let Some(last) = parts.last_mut() else { break };
        let part = last.split_off(left);
        left -= part.vms();
        if last.vms() == 0 {
            parts.pop();
        }
        if part.vms() > 0 {
            taken.push(part);
        }
    }
    taken
}

/// The cells part of the service: off unless enabled at start.
#[derive(Default)]
pub struct Cells {
    service: OnceLock<Arc<CellService>>,
}

/// The number in an id like `tpl-3` (for a template: the pool's template id).
fn id_number(id: &str) -> u64 {
    id.rsplit('-').next().and_then(|n| n.parse().ok()).unwrap_or(0)
}

impl Cells {
    /// The cell service, if cells are on.
    pub fn service(&self) -> Option<&Arc<CellService>> {
        self.service.get()
    }

    /// Turns cells on: a pool of cells run as `config` says, a watcher for dead cells and a
    /// keeper of the warm shells in cells (which admits them under `app`'s `--max-vms`).
    pub fn enable(&self, config: &CellsConfig, app: Weak<App>) -> Result<(), PoolError> {
        let mut cell_config = CellConfig::current_exe().map_err(PoolError::Kvm)?;
        cell_config.program = config.program.clone();
        cell_config.args = config.args.clone();
        cell_config.vms_per_cell = config.vms_per_cell.max(1);
        // With a state directory each cell's generation ids come from a persisted block, so they
        // repeat neither across cells nor across restarts.
        if let Some(dir) = app.upgrade().and_then(|app| app.state_dir.clone()) {
            cell_config.generations = GenerationBlocks::from_fn(move || {
                cowvm_vmm::persist::counters::take_block(&dir)
                    .map_err(|e| format!("cannot take a block of generation ids: {e}"))
            });
        }
        let service = Arc::new(CellService {
            pool: CellPool::new(cell_config, config.max_cells.max(1))?,
            vms: RwLock::new(HashMap::new()),
            stop: AtomicBool::new(false),
            warm_gate: RwLock::new(()),
            warm: Mutex::new(WarmState::default()),
            warm_wake: Condvar::new(),
        });
        let watched = Arc::downgrade(&service);
        let idle = (config.idle_cells, config.idle_after);
        std::thread::Builder::new()
            .name("cowvm-cell-watch".into())
            .spawn(move || watch(&watched, idle))
            .map_err(|e| PoolError::Cell(CellError::Local(format!("cannot start the cell watcher: {e}"))))?;
        let kept = Arc::downgrade(&service);
        std::thread::Builder::new()
            .name("cowvm-cell-warm".into())
            .spawn(move || keep_warm(&kept, &app))
            .map_err(|e| PoolError::Cell(CellError::Local(format!("cannot start the warm keeper: {e}"))))?;
        let _ = self.service.set(service);
        Ok(())
    }

    /// Hands a new template to the pool (cells load it when a clone or a warm shell of it is
    /// first placed there) and keeps `warm_shells` shells of it in cells.
    pub fn add_template(&self, id: &str, template: &Arc<Template>, warm_shells: usize) {
        if let Some(cells) = self.service() {
            cells.pool.add_template(id_number(id), Arc::clone(template));
            cells.set_wanted(id_number(id), warm_shells);
        }
    }

    /// Whether cells are on (then warm shells of templates are kept in cells, not in the server).
    pub fn enabled(&self) -> bool {
        self.service().is_some()
    }

    /// Keeps `shells` warm shells of template `id` in cells (built in the background, within
    /// `--max-vms`).
    pub fn set_warm(&self, id: &str, shells: usize) {
        if let Some(cells) = self.service() {
            cells.set_wanted(id_number(id), shells);
        }
    }

    /// Warm shells of template `id` ready in cells (as the cells last said).
    pub fn warm_ready(&self, id: &str) -> usize {
        self.service()
            .map_or(0, |cells| cells.pool.warm_ready(id_number(id)) as usize)
    }

    /// Tears down up to `count` warm shells in cells and gives their room under `--max-vms`
    /// back (shells give way to VMs); returns how many went.
    pub fn shed_shells(&self, count: usize) -> usize {
        self.service().map_or(0, |cells| cells.shed(None, count))
    }

    /// Drops a deleted template from the pool and its cells (on a thread of its own: the cells
    /// answer over their sockets, and the caller may be an async worker).
    pub fn remove_template(&self, id: &str) {
        if let Some(cells) = self.service().cloned() {
            let number = id_number(id);
            cells.lock_warm().wanted.remove(&number);
            let spawned = std::thread::Builder::new()
                .name("cowvm-cell-drop".into())
                .spawn(move || {
                    if let Err(e) = cells.pool.remove_template(number) {
                        eprintln!("cowvm: dropping template {number} from the cells: {e}");
                    }
                });
            if let Err(e) = spawned {
                eprintln!("cowvm: cannot start a thread to drop template {number} from the cells: {e}");
            }
        }
    }

    /// In-cell VMs the server holds (lost ones included until deleted).
    pub fn vm_count(&self) -> usize {
        self.service().map_or(0, |cells| cells.read().len())
    }

    /// Runs `scan` over the RAM of the live in-cell clones of template `id` as the supervisor sees
    /// it through each cell's `/proc/<pid>/pagemap`; each clone is held still (no operation runs
    /// on it) meanwhile. Without cells, `scan` sees none.
    pub fn scan_clones<R>(
        &self,
        id: &str,
        scan: impl FnOnce(&[CloneRam<'_>]) -> Result<R, ServiceError>,
    ) -> Result<R, ServiceError> {
        let Some(cells) = self.service() else { return scan(&[]) };
        let mut vms: Vec<Arc<CellVm>> = cells
            .read()
            .values()
            .filter(|v| v.template_id.as_deref() == Some(id))
            .cloned()
            .collect();
        // One order for every caller, so that two scans never wait on each other.
        vms.sort_by_key(|v| id_number(&v.id));
        let _busy: Vec<MutexGuard<'_, ()>> = vms.iter().map(|v| lock(&v.busy)).collect();
        let live: Vec<&Arc<CellVm>> = vms.iter().filter(|v| lock(&v.status).lost.is_none()).collect();
        let mut pagemaps: HashMap<u32, PageMap> = HashMap::new();
        for vm in &live {
            if let std::collections::hash_map::Entry::Vacant(entry) = pagemaps.entry(vm.pid) {
                let pagemap = PageMap::open_process(vm.pid).map_err(|e| ServiceError::Unavailable {
                    code: "stats_unavailable",
                    message: format!("cannot open /proc/{}/pagemap: {e}", vm.pid),
                })?;
                entry.insert(pagemap);
            }
        }
        let rams: Vec<CloneRam<'_>> = live
            .iter()
            .filter_map(|vm| {
                Some(CloneRam {
                    host_address: vm.host_address(),
                    size: vm.memory_size,
                    pagemap: pagemaps.get(&vm.pid)?,
                })
            })
            .collect();
        scan(&rams)
    }

    /// Live in-cell clones of template `id` (a template with clones cannot be deleted).
    pub fn clones_of(&self, id: &str) -> usize {
        self.service().map_or(0, |cells| {
            cells
                .read()
                .values()
                .filter(|v| v.template_id.as_deref() == Some(id) && lock(&v.status).lost.is_none())
                .count()
        })
    }
}

impl Drop for Cells {
    fn drop(&mut self) {
        if let Some(cells) = self.service.get() {
            cells.stop.store(true, Ordering::Release);
            cells.warm_wake.notify_all();
        }
    }
}

/// Marks the VMs of every dead cell lost and stops the cells idle for `idle.1` beyond the
/// `idle.0` kept, until the service is gone.
fn watch(service: &Weak<CellService>, idle: (usize, Duration)) {
    loop {
        std::thread::sleep(WATCH_INTERVAL);
        let Some(cells) = service.upgrade() else { return };
        if cells.stop.load(Ordering::Acquire) {
            return;
        }
        for lost in cells.pool.reap_dead() {
            let reason = format!("its cell {} (pid {}) {}", lost.cell, lost.pid, lost.status);
            for vm in cells.read().values().filter(|v| lost.vms.contains(&v.at)) {
                vm.mark_lost(reason.clone());
            }
        }
        cells.pool.reap_idle(idle.0, idle.1);
    }
}

/// Keeps the warm shells in cells at what is wanted, until the service is gone: grows the
/// cells' targets into room admitted under `--max-vms` first, lowers them when less is wanted,
/// and matches the room held to the targets the cells keep (clones take shells, cells die).
fn keep_warm(service: &Weak<CellService>, app: &Weak<App>) {
    loop {
        let Some(cells) = service.upgrade() else { return };
        {
            let state = cells.lock_warm();
            let (mut state, _) = cells
                .warm_wake
                .wait_timeout_while(state, WARM_INTERVAL, |s| !s.poked)
                .unwrap_or_else(|e| e.into_inner());
            state.poked = false;
        }
        if cells.stop.load(Ordering::Acquire) {
            return;
        }
        let Some(app) = app.upgrade() else { return };
        cells.keep_warm_once(&app);
    }
}

impl CellService {
    fn lock_warm(&self) -> MutexGuard<'_, WarmState> {
        lock(&self.warm)
    }

    fn poke(&self) {
        self.lock_warm().poked = true;
        self.warm_wake.notify_all();
    }

    fn set_wanted(&self, template: TemplateId, shells: usize) {
        let shells = shells.min(u32::MAX as usize) as u32;
        {
            let mut state = self.lock_warm();
            if shells == 0 {
                state.wanted.remove(&template);
            } else {
                state.wanted.insert(template, shells);
            }
            state.urgent = true;
        }
        self.poke();
    }

    /// One round of the warm keeper.
    fn keep_warm_once(&self, app: &App) {
        let wanted = self.lock_warm().wanted.clone();
        // Lower targets above what is wanted (a template no longer wanted: all of them).
        for (template, target) in self.pool.warm_targets() {
            let want = wanted.get(&template).copied().unwrap_or(0);
            if target > want {
                self.pool.shrink_warm(Some(template), target - want);
            }
        }
        self.match_room(app);
        // Shells taken by clones come back as deleted clones are recycled; only the shortfall
        // that lasted a whole round (or one the wanted count just made) is built.
        let (urgent, floor) = {
            let mut state = self.lock_warm();
            let due = state.grown_at.is_none_or(|at| at.elapsed() >= WARM_INTERVAL);
            if state.urgent || due {
                state.grown_at = Some(Instant::now());
                (
                    std::mem::take(&mut state.urgent),
                    Some(std::mem::take(&mut state.floor)),
                )
            } else {
                (false, None)
            }
        };
        let growth: Vec<(TemplateId, u32, u32)> = floor.map_or_else(Vec::new, |floor| {
            wanted
                .iter()
                .map(|(&template, &want)| {
                    let short = want.saturating_sub(self.pool.warm_target(template));
                    let lasting = floor.get(&template).copied().unwrap_or(short).min(short);
                    (template, if urgent { short } else { lasting }, short)
                })
                .collect()
        });
        // Grow into room admitted first: the shells are counted before they exist.
        for (template, grow, short) in growth {
            let free = app.limits.max_vms.saturating_sub(app.engine.held_vms());
            let add = (grow as usize).min(free);
            self.lock_warm().floor.insert(template, short - add as u32);
            if add == 0 {
                continue;
            }
            let Ok(room) = app.engine.reserve_remote(add) else {
                continue;
            };
            // The room is the template's shell room at once: a clone call meanwhile may use it
            // (and then finds fewer shells); room the cells do not use is given back below.
            self.lock_warm().room.entry(template).or_default().push(room);
            if let Err(e) = self.pool.grow_warm(template, add as u32, true) {
                eprintln!("cowvm: keeping warm shells of template {template} in cells: {e}");
            }
        }
        self.match_room(app);
        // While cells build shells, keep the ready counts the API shows current.
        if !self.pool.warm_settled() {
            self.pool.refresh_warm();
        }
    }

    /// Makes the room held for shells equal to the targets the cells keep: drops room the
    /// cells no longer use, admits room for targets without it (lowering them if refused).
    fn match_room(&self, app: &App) {
        let mut short: Vec<(TemplateId, usize)> = Vec::new();
        {
            // No clone call is between taking shell room and its cells lowering their targets.
            let _alone = self.warm_gate.write().unwrap_or_else(|e| e.into_inner());
            let targets = self.pool.warm_targets();
            let mut state = self.lock_warm();
            let templates: Vec<TemplateId> = state.room.keys().chain(targets.keys()).copied().collect();
            for template in templates {
                let target = targets.get(&template).copied().unwrap_or(0) as usize;
                let parts = state.room.entry(template).or_default();
                let held = room_of(parts);
                if held > target {
                    drop(take_room(parts, held - target));
                } else if held < target {
                    match app.engine.reserve_remote(target - held) {
                        Ok(room) => parts.push(room),
                        Err(_) => short.push((template, target - held)),
                    }
                }
                if room_of(parts) == 0 {
                    state.room.remove(&template);
                }
            }
        }
        for (template, missing) in short {
            self.pool.shrink_warm(Some(template), missing as u32);
        }
    }

    /// Lowers warm-shell targets by up to `count` (of `template`, else of any template, the
    /// most held first) and gives their room back; returns the targets removed.
    fn shed(&self, template: Option<TemplateId>, count: usize) -> usize {
        let mut order: Vec<(usize, TemplateId)> = self
            .lock_warm()
            .room
            .iter()
            .filter(|(&t, _)| template.is_none_or(|want| want == t))
            .map(|(&t, parts)| (room_of(parts), t))
            .collect();
        order.sort_by_key(|&(held, t)| (std::cmp::Reverse(held), t));
        let mut shed = 0;
        for (held, t) in order {
            if shed >= count {
                break;
            }
            let removed = self.pool.shrink_warm(Some(t), (count - shed).min(held) as u32) as usize;
            let mut state = self.lock_warm();
            if let Some(parts) = state.room.get_mut(&t) {
                drop(take_room(parts, removed));
            }
            shed += removed;
        }
        shed
    }

    /// Room for one VM under `--max-vms`, counted with every other VM (in cells or not); warm
    /// shells in cells give way, as they do for the server's own VMs.
    fn admit_one(&self, app: &App) -> Result<Reservation, AdmitError> {
        app.engine.reserve_remote(1).or_else(|e| match e {
            AdmitError::TooManyVms { .. } if self.shed(None, 1) > 0 => app.engine.reserve_remote(1),
            e => Err(e),
        })
    }

    /// Room under `--max-vms` for `count` clones of `template`: the room of its warm shells in
    /// cells first (the clones take those shells), the rest admitted now; other templates'
    /// shells give way when the limit is reached. On refusal the shell room is kept.
    fn admit_clones(&self, app: &App, template: TemplateId, count: usize) -> Result<Vec<Reservation>, ServiceError> {
        let mut parts = {
            let mut state = self.lock_warm();
            let mine = state.room.entry(template).or_default();
            let taken = take_room(mine, count);
            if mine.is_empty() {
                state.room.remove(&template);
            }
            taken
        };
        let missing = count - room_of(&parts);
        if missing > 0 {
            let admitted = app.engine.reserve_remote(missing).or_else(|e| match e {
                AdmitError::TooManyVms { .. } if self.shed_others(template, missing) > 0 => {
                    app.engine.reserve_remote(missing)
                }
                e => Err(e),
            });
            match admitted {
                Ok(room) => parts.push(room),
                Err(e) => {
                    self.lock_warm().room.entry(template).or_default().extend(parts);
                    return Err(app.admit_error(e));
                }
            }
        }
        Ok(parts)
    }

    /// Sheds up to `count` shells of templates other than `template`.
    fn shed_others(&self, template: TemplateId, count: usize) -> usize {
        let others: Vec<TemplateId> = self
            .lock_warm()
            .room
            .keys()
            .filter(|&&t| t != template)
            .copied()
            .collect();
        let mut shed = 0;
        for t in others {
            if shed >= count {
                break;
            }
            shed += self.shed(Some(t), count - shed);
        }
        shed
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Arc<CellVm>>> {
        self.vms.read().unwrap_or_else(|e| e.into_inner())
    }

    fn vm(&self, id: &str) -> Option<Arc<CellVm>> {
        self.read().get(id).cloned()
    }

    fn list(&self) -> Vec<Arc<CellVm>> {
        self.read().values().cloned().collect()
    }

    /// The answer for a pool error on VM `vm` (marking it lost or failed when that is what
    /// happened).
    fn vm_error(&self, vm: &CellVm, e: PoolError) -> ServiceError {
        match e {
            PoolError::Lost { status, .. } => {
                vm.mark_lost(format!("its cell {} {status}", vm.at.cell));
                self.lost_error(vm)
            }
            PoolError::Cell(CellError::Died { pid, status, .. }) => {
                vm.mark_lost(format!("its cell {} (pid {pid}) {status}", vm.at.cell));
                self.lost_error(vm)
            }
            // The server knows the VM and the pool no longer does: its cell died and was reaped
            // before the watcher got to mark it.
            PoolError::UnknownVm(_) => {
                vm.mark_lost(format!("its cell {} died", vm.at.cell));
                self.lost_error(vm)
            }
            PoolError::Cell(CellError::Remote { error, .. }) if error.kind == RemoteErrorKind::Guest => {
                lock(&vm.status).failure.get_or_insert(error.message.clone());
                ServiceError::VmFailed(error.message)
            }
            other => pool_error(other),
        }
    }

    fn lost_error(&self, vm: &CellVm) -> ServiceError {
        vm.usable()
            .err()
            .unwrap_or_else(|| ServiceError::conflict("vm_lost", format!("VM {} was lost", vm.id)))
    }
}

/// The answer for a pool error that concerns no VM in particular.
fn pool_error(e: PoolError) -> ServiceError {
    let message = e.to_string();
    match e {
        PoolError::UnknownVm(_) => ServiceError::NotFound {
            code: "not_found",
            message,
        },
        PoolError::UnknownTemplate(_) => ServiceError::NotFound {
            code: "not_found",
            message,
        },
        PoolError::TooFragmented { .. } => ServiceError::out_of_range("template_too_fragmented", message),
        PoolError::Full { .. } => ServiceError::TooManyVms(message),
        PoolError::Lost { .. } => ServiceError::conflict("vm_lost", message),
        PoolError::Kvm(_) => ServiceError::exhausted(message),
        PoolError::Cell(cell) => match cell {
            CellError::Start { .. } | CellError::Died { .. } => ServiceError::exhausted(message),
            CellError::Timeout { .. } => ServiceError::Timeout(message),
            CellError::Remote { error, .. } => match error.kind {
                RemoteErrorKind::Command => ServiceError::out_of_range("address_out_of_range", message),
                RemoteErrorKind::UnknownVm | RemoteErrorKind::UnknownTemplate => ServiceError::NotFound {
                    code: "not_found",
                    message,
                },
                RemoteErrorKind::Full => ServiceError::TooManyVms(message),
                RemoteErrorKind::TooFragmented => ServiceError::conflict("template_too_fragmented", message),
                _ => ServiceError::internal(message),
            },
            _ => ServiceError::internal(message),
        },
    }
}

/// List the cells (empty when the server runs `--in-process`).
#[utoipa::path(get, path = "/v1/cells", tag = "cells", responses((status = 200, body = Vec<CellView>)))]
pub async fn list_cells(State(app): State<Arc<App>>) -> Json<Vec<CellView>> {
    let Some(cells) = app.cells.service().cloned() else {
        return Json(Vec::new());
    };
    // Reading /proc/<pid>/status of every cell is file I/O: off the async workers.
    let list = tokio::task::spawn_blocking(move || cells.pool.cells())
        .await
        .unwrap_or_default();
    Json(
        list.into_iter()
            .map(|c| CellView {
                id: c.id,
                pid: c.pid,
                uid: c.uid,
                vms: c.vms,
                warm_shells: c.warm_shells,
                seccomp: c.confinement.map(|c| c.seccomp),
                recycled: c.recycled,
            })
            .collect(),
    )
}

/// Answers the requests that concern in-cell VMs (and, with cells on, clone calls, one-shot
/// template calls and the VM list); passes every other request on to the in-process handlers.
pub async fn intercept(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    let Some(cells) = app.cells.service().cloned() else {
        return next.run(request).await;
    };
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    match (&method, segments.as_slice()) {
        (&Method::GET, ["v1", "vms"]) => return list_vms(&app, &cells).into_response(),
        (&Method::POST, ["v1", "templates", id, "clones"]) => {
            let body = Json::<CloneRequest>::from_request(request, &()).await;
            return match body {
                Ok(Json(req)) => clone_template(app, cells, id.to_string(), req).await.into_response(),
                Err(rejection) => ServiceError::from(rejection).into_response(),
            };
        }
        (&Method::POST, ["v1", "templates", id, "call"]) => {
            let body = Json::<CallRequest>::from_request(request, &()).await;
            return match body {
                Ok(Json(req)) => call::call_template(app, cells, id.to_string(), req)
                    .await
                    .into_response(),
                Err(rejection) => ServiceError::from(rejection).into_response(),
            };
        }
        _ => {}
    }
    let vm = match segments.as_slice() {
        ["v1", "vms", id, ..] => cells.vm(id),
        _ => None,
    };
    let Some(vm) = vm else {
        return next.run(request).await;
    };
    let rest = &segments[3..];
    let answer = match (&method, rest) {
        (&Method::GET, []) => Ok(Json(vm.info()).into_response()),
        (&Method::DELETE, []) => delete_vm(app, cells, vm).await.map(IntoResponse::into_response),
        (&Method::POST, ["run"]) => match Json::<RunCommand>::from_request(request, &()).await {
            Ok(Json(req)) => run(app, cells, vm, req).await.map(IntoResponse::into_response),
            Err(rejection) => Err(rejection.into()),
        },
        (&Method::POST, ["reset"]) => reset(app, cells, vm).await.map(IntoResponse::into_response),
        (&Method::GET, ["stats"]) => vm_stats(app, cells, vm).await.map(IntoResponse::into_response),
        (&Method::POST, ["call"]) => match Json::<CallRequest>::from_request(request, &()).await {
            Ok(Json(req)) => call(app, cells, vm, req).await.map(IntoResponse::into_response),
            Err(rejection) => Err(rejection.into()),
        },
        (&Method::POST, ["snapshot"]) => snapshot::snapshot(app, cells, vm)
            .await
            .map(IntoResponse::into_response),
        (&Method::POST, ["clones"]) => match Json::<CloneRequest>::from_request(request, &()).await {
            Ok(Json(req)) => snapshot::live_fork(app, cells, vm, req)
                .await
                .map(IntoResponse::into_response),
            Err(rejection) => Err(rejection.into()),
        },
        (&Method::POST, ["probes", "write"]) => match Json::<ProbeRequest>::from_request(request, &()).await {
            Ok(Json(req)) => probe::probe_write(app, cells, vm, probe_targets(req))
                .await
                .map(|report| Json(report).into_response()),
            Err(rejection) => Err(rejection.into()),
        },
        _ => return next.run(request).await,
    };
    answer.unwrap_or_else(IntoResponse::into_response)
}

fn list_vms(app: &App, cells: &CellService) -> Json<Vec<VmInfo>> {
    let mut all: Vec<VmInfo> = app.vms().iter().map(|v| v.info()).collect();
    all.extend(cells.list().iter().map(|v| v.info()));
    all.sort_by_key(|v| id_number(&v.id));
    Json(all)
}

async fn clone_template(
    app: Arc<App>,
    cells: Arc<CellService>,
    id: String,
    req: CloneRequest,
) -> Result<(StatusCode, Json<ClonesCreated>), ServiceError> {
    let count = super::templates::check_count(&app, req.count)?;
    let (template, cloning) = app.begin_cloning(&id)?;
    let service = Arc::clone(&app);
    let created = transaction(&app, move |commit| {
        let _cloning = cloning;
        let spawned = cells.spawn_clones(&service, id_number(&template.id), count, None, commit)?;
        cells.add_clones(&service, &template, spawned)
    })
    .await?;
    Ok((StatusCode::CREATED, Json(created)))
}

/// Clones made in cells, not yet registered as VMs.
struct SpawnedClones {
    batch: PoolBatch,
    /// Their room under `--max-vms`.
    admitted: Vec<Reservation>,
    total_us: f64,
}

impl CellService {
    /// Makes `count` clones of template `number` in cells and commits: on room `admitted`
    /// beforehand when given, else on room admitted now (its warm shells' room first). Torn
    /// down again if the request has timed out; none made is 503 `clones_failed`.
    fn spawn_clones(
        &self,
        service: &App,
        number: TemplateId,
        count: usize,
        admitted: Option<Vec<Reservation>>,
        commit: &Commit,
    ) -> Result<SpawnedClones, ServiceError> {
        let started = Instant::now();
        // In-cell VMs count against --max-vms with the in-process ones, each VM holding its room
        // until it is deleted. The room of the template's warm shells in cells moves to the
        // clones that take them; the rest is admitted now, atomically with the engine's count.
        let gate = self.warm_gate.read().unwrap_or_else(|e| e.into_inner());
        let admitted = match admitted {
            Some(admitted) => admitted,
            None => self.admit_clones(service, number, count)?,
        };
        let spawned = self.pool.spawn(number, count);
        drop(gate);
        self.poke();
        let batch = match spawned {
            Ok(batch) => batch,
            Err(e) => {
                // Nothing was placed: the room goes back to the shells (the keeper gives back
                // what their targets do not use).
                self.lock_warm().room.entry(number).or_default().extend(admitted);
                return Err(pool_error(e));
            }
        };
        let total_us = started.elapsed().as_secs_f64() * 1e6;
        let spawned = SpawnedClones {
            batch,
            admitted,
            total_us,
        };
        if !commit.commit() {
            self.destroy_clones(&spawned);
            return Err(timeout_error(service));
        }
        if spawned.batch.clones.is_empty() {
            service
                .metrics
                .clone_failures
                .fetch_add(spawned.batch.failed.len() as u64, Ordering::Relaxed);
            return Err(super::templates::none_made(&spawned.batch.failed));
        }
        Ok(spawned)
    }

    /// Tears down clones that will not be registered.
    fn destroy_clones(&self, spawned: &SpawnedClones) {
        for clone in &spawned.batch.clones {
            let _ = self.pool.destroy(clone.at);
        }
    }

    /// Registers the clones of `template` that [`CellService::spawn_clones`] made as VMs and
    /// describes them.
    fn add_clones(
        &self,
        service: &App,
        template: &TemplateEntry,
        spawned: SpawnedClones,
    ) -> Result<ClonesCreated, ServiceError> {
        let SpawnedClones {
            batch,
            mut admitted,
            total_us,
        } = spawned;
        let memory_mib = bytes_to_mib(template.template.size());
        let mut vms = self.vms.write().unwrap_or_else(|e| e.into_inner());
        let clones = batch
            .clones
            .iter()
            .map(|placed| {
                let spawned = placed.spawned;
                let vm = Arc::new(CellVm {
                    id: service.new_vm_id(),
                    at: placed.at,
                    pid: placed.pid,
                    host_address: AtomicU64::new(spawned.host_address),
                    memory_size: spawned.memory_size,
                    kvm_stats: Mutex::new(None),
                    memory_mib,
                    vcpus: template.template.state().vcpus.len(),
                    template_id: Some(template.id.clone()),
                    status: Mutex::new(CellVmStatus {
                        generation: spawned.generation,
                        spawn_us: spawned.spawn_us,
                        ..CellVmStatus::default()
                    }),
                    busy: Mutex::new(()),
                    slot: Mutex::new(next_room(&mut admitted)),
                });
                vms.insert(vm.id.clone(), Arc::clone(&vm));
                CloneMade {
                    id: vm.id.clone(),
                    spawn_us: spawned.spawn_us,
                    generation: spawned.generation,
                    seed: spawned.seed,
                    pooled: spawned.pooled,
                }
            })
            .collect();
        drop(vms);
        super::templates::clones_created(service, &template.id, clones, batch.failed, total_us)
    }
}

/// Room for one VM out of `parts`.
fn next_room(parts: &mut Vec<Reservation>) -> Option<Reservation> {
    take_room(parts, 1).pop()
}

async fn delete_vm(app: Arc<App>, cells: Arc<CellService>, vm: Arc<CellVm>) -> Result<StatusCode, ServiceError> {
    let removed = cells.vms.write().unwrap_or_else(|e| e.into_inner()).remove(&vm.id);
    if removed.is_none() {
        return Err(ServiceError::not_found("VM", &vm.id));
    }
    blocking(&app, move || {
        let _busy = lock(&vm.busy);
        // A lost VM went with its cell; there is nothing left to destroy.
        if lock(&vm.status).lost.is_none() {
            let template = vm.template_id.as_deref().map(id_number);
            let deleted = match template.filter(|&t| cells.short_of(t)) {
                Some(t) => cells.recycle(&vm, t).map(drop),
                None => cells.pool.destroy(vm.at),
            };
            match deleted {
                Ok(()) | Err(PoolError::Lost { .. }) | Err(PoolError::Cell(CellError::Died { .. })) => {}
                Err(e) => return Err(pool_error(e)),
            }
        }
        cells.poke();
        Ok(())
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The guest command a `POST /v1/vms/{id}/run` body asks for (in-process and in-cell VMs alike).
pub(super) fn guest_command(req: &RunCommand) -> Result<GuestCommand, ServiceError> {
    let start = GuestAddress(req.start_gpa);
    Ok(match req.command.as_str() {
        "exit" => GuestCommand::Exit,
        "write" => GuestCommand::Write {
            start,
            count: req.count,
            stride: req.stride,
            value: req.value,
        },
        "checksum" => GuestCommand::Checksum {
            start,
            count: req.count,
            stride: req.stride,
        },
        "identity" => GuestCommand::Identity,
        "triple_fault" => GuestCommand::TripleFault,
        "spin" => GuestCommand::Spin,
        "halt" => GuestCommand::Halt,
        other => {
            let shown: String = other.chars().take(32).collect();
            return Err(ServiceError::bad_request(
                "invalid_field",
                format!("unknown command {shown:?}"),
            ));
        }
    })
}

async fn run(
    app: Arc<App>,
    cells: Arc<CellService>,
    vm: Arc<CellVm>,
    req: RunCommand,
) -> Result<Json<RunResult>, ServiceError> {
    let command = guest_command(&req)?;
    if req.vcpu as usize >= vm.vcpus {
        return Err(ServiceError::out_of_range(
            "vcpu_out_of_range",
            format!("vcpu must be 0..{} for this VM (got {})", vm.vcpus, req.vcpu),
        ));
    }
    let vcpu = req.vcpu;
    vm.usable()?;
    let deadline = app.limits.guest_deadline;
    let (out, took) = blocking(&app, move || {
        let _busy = lock(&vm.busy);
        vm.usable()?;
        cells
            .pool
            .run_on(vm.at, vcpu, command, deadline)
            .map_err(|e| cells.vm_error(&vm, e))
    })
    .await?;
    Ok(Json(RunResult::new(out, took)))
}

async fn reset(app: Arc<App>, cells: Arc<CellService>, vm: Arc<CellVm>) -> Result<Json<ResetDone>, ServiceError> {
    vm.usable()?;
    if vm.template_id.is_none() {
        return Err(ServiceError::not_a_clone(&vm.id));
    }
    let report = blocking(&app, move || {
        let _busy = lock(&vm.busy);
        vm.usable()?;
        let (report, host_address) = cells.pool.reset(vm.at).map_err(|e| {
            if let PoolError::Cell(CellError::Remote { error, .. }) = &e {
                // A reset that failed in its cell may have swapped the VM already: where its RAM
                // is and which KVM fds are its own is no longer known, so it takes no more work.
                lock(&vm.status)
                    .failure
                    .get_or_insert(format!("its reset failed: {}", error.message));
                lock(&vm.kvm_stats).take();
            }
            cells.vm_error(&vm, e)
        })?;
        if report.swapped {
            // Another VM of the cell now: its RAM and its KVM statistics fds are its own.
            vm.host_address.store(host_address, Ordering::Release);
            lock(&vm.kvm_stats).take();
        }
        lock(&vm.status).generation = report.generation;
        Ok(report)
    })
    .await?;
    Ok(Json(ResetDone::in_cell(&report)))
}

/// `GET /v1/vms/{id}/stats` of an in-cell VM: the supervisor reads the cell's
/// `/proc/<pid>/pagemap` and smaps over the VM's RAM, `/proc/kpagecount` and `/proc/kpageflags`
/// itself, and KVM's statistics from the fds the cell handed over; the cell needs no privilege.
async fn vm_stats(app: Arc<App>, cells: Arc<CellService>, vm: Arc<CellVm>) -> Result<Json<VmStats>, ServiceError> {
    vm.usable()?;
    let stats = blocking(&app, move || {
        // One operation at a time: the VM's RAM stays where it is while it is read.
        let _busy = lock(&vm.busy);
        vm.usable()?;
        let kvm = {
            let mut files = lock(&vm.kvm_stats);
            if files.is_none() {
                *files = Some(cells.pool.kvm_stats_files(vm.at).map_err(|e| cells.vm_error(&vm, e))?);
            }
            let files = files
                .as_ref()
                .ok_or_else(|| ServiceError::internal("no KVM stats fds"))?;
            files
                .read()
                .map_err(|e| ServiceError::internal(format!("reading KVM statistics of {}: {e}", vm.id)))?
        };
        let host = vm.host_view()?;
        let region = RamRegion {
            host_address: vm.host_address(),
            size: vm.memory_size,
            from_template: vm.template_id.is_some() || lock(&vm.status).frozen,
            pid: Some(vm.pid),
        };
        let sharing = region_sharing(&region, &host, kvm)?;
        Ok(VmStats::new(vm.id.clone(), sharing))
    })
    .await?;
    Ok(Json(stats))
}

/// `POST /v1/vms/{id}/call` of an in-cell VM: the cell runs the call and keeps the VM's state.
async fn call(
    app: Arc<App>,
    cells: Arc<CellService>,
    vm: Arc<CellVm>,
    req: CallRequest,
) -> Result<Json<CallResult>, ServiceError> {
    let (input, deadline) = super::service::calls::parse(&app, &req)?;
    call::check_input(&input)?;
    vm.usable()?;
    let service = Arc::clone(&app);
    let done = blocking(&app, move || {
        let _busy = lock(&vm.busy);
        vm.usable()?;
        match cells
            .pool
            .call(vm.at, input, deadline)
            .map_err(|e| cells.vm_error(&vm, e))?
        {
            Ok(done) => Ok(done),
            Err(failure) => {
                if !failure.usable {
                    lock(&vm.status)
                        .failure
                        .get_or_insert(format!("a call failed: {}", failure.message));
                    service.metrics.vms_failed.fetch_add(1, Ordering::Relaxed);
                }
                Err(call::failure_error(failure))
            }
        }
    })
    .await?;
    Ok(Json(done.into()))
}
