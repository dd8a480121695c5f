//! The service's state: the clone engine, the VMs and templates it serves, limits, metrics.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use cowvm_vmm::layout::bytes_to_mib;
use cowvm_vmm::stats::HostView;
use cowvm_vmm::{AdmitError, Clone, CloneEngine, Reservation, Template, Vm};

use super::error::ServiceError;
use super::model::{TemplateInfo, VmInfo};

/// Limits the server enforces.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest guest RAM per VM, MiB.
    pub max_memory_mib: u64,
    /// Most vCPUs per VM (1 up to the VMM's `MAX_VCPUS`).
    pub max_vcpus: usize,
    /// Most VMs at once: booted VMs, clones and warm shells together (shells give way first).
    pub max_vms: usize,
    /// Most clones one call may make.
    pub max_clones_per_call: usize,
    /// Largest request body, bytes.
    pub max_body_bytes: usize,
    /// Longest a request may take.
    pub request_timeout: Duration,
    /// Longest a guest may run for one command before it is stopped and marked failed.
    pub guest_deadline: Duration,
    /// Warm shells kept per template.
    pub warm_shells: usize,
    /// Largest template archive `POST /v1/templates/import` takes, bytes.
    pub max_import_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_memory_mib: 4096,
            max_vcpus: 8,
            max_vms: 2000,
            max_clones_per_call: 1000,
            max_body_bytes: 64 * 1024,
            request_timeout: Duration::from_secs(60),
            guest_deadline: Duration::from_secs(5),
            warm_shells: 8,
            max_import_bytes: 8 << 30,
        }
    }
}

/// A VM's machine: booted here, or a clone.
pub enum Machine {
    /// A VM booted by `POST /v1/vms`.
    Booted(Vm),
    /// A clone of a template.
    Clone(Clone),
}

impl Machine {
    /// The VM.
    pub fn vm(&self) -> &Vm {
        match self {
            Machine::Booted(vm) => vm,
            Machine::Clone(clone) => clone.vm(),
        }
    }
    /// The VM, mutably.
    pub fn vm_mut(&mut self) -> &mut Vm {
        match self {
            Machine::Booted(vm) => vm,
            Machine::Clone(clone) => clone.vm_mut(),
        }
    }
}

/// What the API shows of a VM; kept apart from the machine so that reading it never waits for a
/// running guest.
#[derive(Debug, Clone)]
pub struct VmStatus {
    /// Why it failed, if it did.
    pub failure: Option<String>,
    /// Generation id of a clone.
    pub generation: Option<u64>,
    /// Spawn time of a clone.
    pub spawn_us: Option<f64>,
}

/// A VM the service holds.
pub struct VmEntry {
    /// Id.
    pub id: String,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// vCPUs of the VM.
    pub vcpus: u32,
    /// The template a clone came from.
    pub template_id: Option<String>,
    /// What the API shows.
    pub status: Mutex<VmStatus>,
    /// The machine; locked only on blocking threads, for as long as an operation runs.
    pub machine: Mutex<Option<Machine>>,
    /// The room this VM holds under the VM limit and mapping budget, given back once the machine
    /// has been torn down.
    slot: Mutex<Option<Reservation>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl VmEntry {
    /// The API view.
    pub fn info(&self) -> VmInfo {
        let status = lock(&self.status).clone();
        VmInfo {
            id: self.id.clone(),
            memory_mib: self.memory_mib,
            vcpus: self.vcpus,
            state: if status.failure.is_some() { "failed" } else { "running" }.into(),
            kind: if self.template_id.is_some() { "clone" } else { "vm" }.into(),
            template_id: self.template_id.clone(),
            failure: status.failure,
            generation: status.generation,
            spawn_us: status.spawn_us,
        }
    }

    /// The failure, if the VM failed.
    pub fn failure(&self) -> Option<String> {
        lock(&self.status).failure.clone()
    }

    /// Marks the VM failed.
    pub fn fail(&self, reason: String) {
        lock(&self.status).failure = Some(reason);
    }

    /// Records a clone's new generation id.
    pub fn set_generation(&self, generation: u64) {
        lock(&self.status).generation = Some(generation);
    }

    /// Locks the machine (blocking threads only).
    pub fn lock_machine(&self) -> MutexGuard<'_, Option<Machine>> {
        lock(&self.machine)
    }

    /// Takes the machine and the room it holds, for teardown (blocking threads only).
    pub fn take_machine(&self) -> Option<(Machine, Option<Reservation>)> {
        let machine = self.lock_machine().take()?;
        Some((machine, lock(&self.slot).take()))
    }
}

/// A template the service holds.
pub struct TemplateEntry {
    /// Id.
    pub id: String,
    /// The template.
    pub template: Arc<Template>,
    /// The VM it was frozen from.
    pub source_vm: Option<String>,
    /// Whether it is saved under the state directory.
    pub persisted: bool,
}

/// Counters for `/metrics`.
#[derive(Default)]
pub struct Metrics {
    /// Clones made.
    pub clones_spawned: AtomicU64,
    /// Clones that failed.
    pub clone_failures: AtomicU64,
    /// Sum of spawn times, microseconds.
    pub spawn_us_sum: AtomicU64,
    /// Responses by status class (1xx..5xx at index 1..5).
    pub responses: [AtomicU64; 6],
    /// VMs marked failed.
    pub vms_failed: AtomicU64,
}

/// The service.
pub struct App {
    /// The clone engine (owns the KVM device).
    pub engine: CloneEngine,
    /// The kernel files statistics come from, or why they cannot be read.
    pub host: Result<HostView, String>,
    /// Limits.
    pub limits: Limits,
    /// Where templates are saved.
    pub state_dir: Option<PathBuf>,
    /// Where `kernel` names of `POST /v1/vms` are looked up.
    pub kernel_dir: Option<PathBuf>,
    /// Counters.
    pub metrics: Metrics,
    vms: RwLock<HashMap<String, Arc<VmEntry>>>,
    templates: RwLock<HashMap<String, Arc<TemplateEntry>>>,
    /// Clone calls in progress per template id (a template being cloned cannot be deleted).
    cloning: Mutex<HashMap<String, usize>>,
    next_vm: AtomicU64,
    next_template: AtomicU64,
    /// Cells (`cowvm serve` enables them unless `--in-process`): off unless enabled at start.
    pub cells: super::cells::Cells,
}

impl App {
    /// A service over `engine`.
    pub fn new(engine: CloneEngine, limits: Limits, state_dir: Option<PathBuf>, kernel_dir: Option<PathBuf>) -> Self {
        engine.set_limits(
            limits.max_vms,
            cowvm_vmm::pool::default_mapping_budget(),
            super::templates::SHELL_FD_RESERVE,
        );
        App {
            engine,
            host: HostView::open().map_err(|e| e.to_string()),
            limits,
            state_dir,
            kernel_dir,
            metrics: Metrics::default(),
            vms: RwLock::new(HashMap::new()),
            templates: RwLock::new(HashMap::new()),
            cloning: Mutex::new(HashMap::new()),
            next_vm: AtomicU64::new(1),
            next_template: AtomicU64::new(1),
            cells: Default::default(),
        }
    }

    /// The kernel files statistics come from, or a 503 naming why they cannot be read.
    pub fn host_view(&self) -> Result<&HostView, ServiceError> {
        self.host
            .as_ref()
            .map_err(|why| ServiceError::unavailable("stats_unavailable", why.clone()))
    }

    /// The VM `id`, or 404.
    pub fn vm(&self, id: &str) -> Result<Arc<VmEntry>, ServiceError> {
        self.vms
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
            .ok_or_else(|| ServiceError::not_found("VM", id))
    }

    /// All VMs, by id.
    pub fn vms(&self) -> Vec<Arc<VmEntry>> {
        let mut all: Vec<_> = self
            .vms
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        all.sort_by_key(|v| id_number(&v.id));
        all
    }

    /// Live VMs.
    pub fn vm_count(&self) -> usize {
        self.vms.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Admits `count` VMs (clones of `template`, or booted VMs) before they are made: 429 when
    /// the VM limit is held by VMs that are not warm shells, 503 when the mapping budget is, 422
    /// when one clone of the template alone would not fit the budget. Warm shells give way.
    pub fn admit(&self, count: usize, template: Option<&Template>) -> Result<Reservation, ServiceError> {
        match self.engine.reserve(count, template) {
            // Warm shells in cells give way too.
            Err(AdmitError::TooManyVms { .. }) if self.cells.shed_shells(count) > 0 => {
                self.engine.reserve(count, template).map_err(|e| self.admit_error(e))
            }
            admitted => admitted.map_err(|e| self.admit_error(e)),
        }
    }

    /// The answer for VMs that could not be admitted.
    pub fn admit_error(&self, e: AdmitError) -> ServiceError {
        let message = e.to_string();
        match e {
            AdmitError::TooManyVms { .. } => ServiceError::TooManyVms(message),
            AdmitError::MappingsExhausted { .. } => ServiceError::exhausted(message),
            AdmitError::TooFragmented { .. } => ServiceError::out_of_range("template_too_fragmented", message),
        }
    }

    /// A fresh VM id (for VMs held elsewhere, e.g. in cells).
    pub fn new_vm_id(&self) -> String {
        format!("vm-{}", self.next_vm.fetch_add(1, Ordering::Relaxed))
    }

    /// Adds a VM under a new id; it holds `slot` (room for one VM) until it is torn down.
    pub fn add_vm(
        &self,
        memory_mib: u64,
        template_id: Option<String>,
        machine: Machine,
        status: VmStatus,
        slot: Option<Reservation>,
    ) -> Arc<VmEntry> {
        let id = format!("vm-{}", self.next_vm.fetch_add(1, Ordering::Relaxed));
        let vcpus = u32::try_from(machine.vm().vcpu_count()).unwrap_or(u32::MAX);
        let entry = Arc::new(VmEntry {
            id: id.clone(),
            memory_mib,
            vcpus,
            template_id,
            status: Mutex::new(status),
            machine: Mutex::new(Some(machine)),
            slot: Mutex::new(slot),
        });
        self.vms
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, Arc::clone(&entry));
        entry
    }

    /// Removes VM `id` from the service (its machine is torn down by the caller).
    pub fn remove_vm(&self, id: &str) -> Result<Arc<VmEntry>, ServiceError> {
        self.vms
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id)
            .ok_or_else(|| ServiceError::not_found("VM", id))
    }

    /// The template `id`, or 404.
    pub fn template(&self, id: &str) -> Result<Arc<TemplateEntry>, ServiceError> {
        self.templates
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
            .ok_or_else(|| ServiceError::not_found("template", id))
    }

    /// All templates, by id.
    pub fn templates(&self) -> Vec<Arc<TemplateEntry>> {
        let mut all: Vec<_> = self
            .templates
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        all.sort_by_key(|t| id_number(&t.id));
        all
    }

    /// A fresh template id.
    pub fn new_template_id(&self) -> String {
        format!("tpl-{}", self.next_template.fetch_add(1, Ordering::Relaxed))
    }

    /// Keeps template numbers below `next` out of use (seen in the state directory).
    pub fn reserve_template_ids(&self, next: u64) {
        self.next_template.fetch_max(next, Ordering::Relaxed);
    }

    /// Adds a template (id from [`App::new_template_id`] or from disk) and keeps shells warm.
    pub fn add_template(&self, entry: TemplateEntry) -> Arc<TemplateEntry> {
        let number = id_number(&entry.id);
        self.next_template.fetch_max(number + 1, Ordering::Relaxed);
        // With cells on, the template's warm shells are kept in cells instead.
        let warm_here = if self.cells.enabled() {
            0
        } else {
            self.limits.warm_shells
        };
        self.engine.keep_warm(&entry.template, warm_here);
        self.cells
            .add_template(&entry.id, &entry.template, self.limits.warm_shells);
        let entry = Arc::new(entry);
        self.templates
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(entry.id.clone(), Arc::clone(&entry));
        entry
    }

    /// Removes template `id` unless clones of it are alive or being made (409). Checked and done
    /// under the templates lock, which clone calls and warm-ups take to start (see
    /// [`App::begin_cloning`], [`App::warm`]), so neither can slip in between.
    pub fn remove_template(&self, id: &str) -> Result<Arc<TemplateEntry>, ServiceError> {
        let mut templates = self.templates.write().unwrap_or_else(|e| e.into_inner());
        if !templates.contains_key(id) {
            return Err(ServiceError::not_found("template", id));
        }
        let in_flight = lock(&self.cloning).get(id).copied().unwrap_or(0);
        if in_flight > 0 {
            return Err(ServiceError::conflict(
                "template_in_use",
                format!("template {id} is being cloned ({in_flight} calls in progress); try again when they finish"),
            ));
        }
        let clones = self.clones_of(id).len() + self.cells.clones_of(id);
        if clones > 0 {
            return Err(ServiceError::conflict(
                "template_in_use",
                format!("template {id} has {clones} live clones; delete them first"),
            ));
        }
        let entry = templates
            .remove(id)
            .ok_or_else(|| ServiceError::not_found("template", id))?;
        self.engine.retire(&entry.template);
        self.cells.remove_template(id);
        Ok(entry)
    }

    /// Template `id` for a clone call: while the guard lives, the template cannot be deleted.
    pub fn begin_cloning(self: &Arc<Self>, id: &str) -> Result<(Arc<TemplateEntry>, CloningGuard), ServiceError> {
        let templates = self.templates.read().unwrap_or_else(|e| e.into_inner());
        let entry = templates
            .get(id)
            .cloned()
            .ok_or_else(|| ServiceError::not_found("template", id))?;
        *lock(&self.cloning).entry(id.to_owned()).or_insert(0) += 1;
        drop(templates);
        Ok((
            entry,
            CloningGuard {
                app: Arc::clone(self),
                id: id.to_owned(),
            },
        ))
    }

    /// Sets template `id`'s warm-shell target, atomically with its existence (a template being
    /// deleted never gets a new pool).
    pub fn warm(&self, id: &str, shells: usize) -> Result<Arc<TemplateEntry>, ServiceError> {
        let templates = self.templates.read().unwrap_or_else(|e| e.into_inner());
        let entry = templates
            .get(id)
            .cloned()
            .ok_or_else(|| ServiceError::not_found("template", id))?;
        if self.cells.enabled() {
            self.cells.set_warm(id, shells);
        } else {
            self.engine.keep_warm(&entry.template, shells);
        }
        Ok(entry)
    }

    /// Warm shells of a template ready now (in the server, or in cells when cells are on).
    pub fn warm_shells(&self, entry: &TemplateEntry) -> usize {
        self.engine.warm_shells(&entry.template) + self.cells.warm_ready(&entry.id)
    }

    /// Live clones of template `id`.
    pub fn clones_of(&self, id: &str) -> Vec<Arc<VmEntry>> {
        self.vms()
            .into_iter()
            .filter(|v| v.template_id.as_deref() == Some(id))
            .collect()
    }

    /// The API view of a template.
    pub fn template_info(&self, entry: &TemplateEntry) -> TemplateInfo {
        TemplateInfo {
            id: entry.id.clone(),
            memory_mib: bytes_to_mib(entry.template.size()),
            clones: self.clones_of(&entry.id).len() + self.cells.clones_of(&entry.id),
            warm_shells: self.warm_shells(entry),
            layers: entry.template.memory().depth(),
            source_vm: entry.source_vm.clone(),
            persisted: entry.persisted,
        }
    }

    /// Tears every VM down and stops keeping shells (graceful shutdown).
    pub fn shut_down(&self) {
        let vms: Vec<_> = self
            .vms
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .map(|(_, v)| v)
            .collect();
        for vm in vms {
            if let Some(taken) = vm.take_machine() {
                self.engine.drop_later(taken);
            }
        }
        for template in self
            .templates
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .map(|(_, t)| t)
        {
            self.engine.retire(&template.template);
        }
        self.engine.flush();
    }
}

/// A clone call in progress on a template (see [`App::begin_cloning`]).
pub struct CloningGuard {
    app: Arc<App>,
    id: String,
}

impl Drop for CloningGuard {
    fn drop(&mut self) {
        let mut cloning = lock(&self.app.cloning);
        if let Some(n) = cloning.get_mut(&self.id) {
            *n -= 1;
            if *n == 0 {
                cloning.remove(&self.id);
            }
        }
    }
}

/// The number in an id like `vm-12` (for ordering; 0 if none).
fn id_number(id: &str) -> u64 {
    id.rsplit('-').next().and_then(|n| n.parse().ok()).unwrap_or(0)
}
