//! The supervisor's cells: starts them on demand, places the clones of one call over cells with
//! room (at most `vms_per_cell` VMs each) and makes them in parallel, addresses VMs by
//! [`VmRef`], and reports cells that died with the VMs they took with them.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use cowvm_vmm::clone::CloneFailure;
use cowvm_vmm::{CommandOutput, GuestCommand, ResetReport, Template};

use crate::cell::{Cell, CellConfig, CellError, ExitStatus, Liveness, Spawned};
use crate::protocol::{CellVmId, SpawnedVm, TemplateId, WarmCount};
use crate::sandbox::Confinement;

mod boot;

pub use boot::PlacedBoot;

/// A cell's id in the pool (never reused).
pub type CellId = u64;

/// A VM in the pool: its cell and its id there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VmRef {
    /// The cell.
    pub cell: CellId,
    /// The VM's id in the cell.
    pub vm: CellVmId,
}

/// A clone the pool made.
#[derive(Debug, Clone, Copy)]
pub struct PlacedVm {
    /// Where it lives.
    pub at: VmRef,
    /// The cell's process id (for `/proc/<pid>/pagemap`).
    pub pid: u32,
    /// What the cell reported.
    pub spawned: SpawnedVm,
}

/// The result of a pool spawn: clones made and the positions not made, with reasons.
#[derive(Debug, Default)]
pub struct PoolBatch {
    /// Made.
    pub clones: Vec<PlacedVm>,
    /// Not made (index in the call, reason).
    pub failed: Vec<CloneFailure>,
}

/// A cell that died, with the VMs that were in it.
#[derive(Debug, Clone)]
pub struct LostCell {
    /// The cell.
    pub cell: CellId,
    /// Its process id.
    pub pid: u32,
    /// How it ended.
    pub status: ExitStatus,
    /// Its VMs, now lost.
    pub vms: Vec<VmRef>,
}

/// What the pool knows about one cell (as `GET /v1/cells` will list it).
#[derive(Debug, Clone, Copy)]
pub struct CellInfo {
    /// Pool id.
    pub id: CellId,
    /// Process id.
    pub pid: u32,
    /// Uid the cell runs as.
    pub uid: u32,
    /// Live VMs placed there.
    pub vms: u32,
    /// Warm shells ready in it (as it last said).
    pub warm_shells: u32,
    /// Warm shells it keeps (targets over all templates; its builder builds up to these).
    pub warm_target: u32,
    /// Memory mappings its live VMs cost (within its own budget, [`CellPool::mapping_budget`]).
    pub mappings: usize,
    /// Its confinement from `/proc/<pid>/status` (`None` if it could not be read).
    pub confinement: Option<Confinement>,
    /// Deleted clones it reset into warm shells (as it last said).
    pub recycled: u64,
}

struct Slot {
    cell: Arc<Cell>,
    /// Live VMs and the mappings each costs.
    vms: BTreeMap<CellVmId, usize>,
    /// Room promised to spawns in flight (so that concurrent calls do not over-fill a cell).
    reserved: u32,
    /// Mappings promised to spawns in flight.
    reserved_mappings: usize,
    templates: BTreeSet<TemplateId>,
    /// Warm-shell targets and ready shells per template, as the cell last said.
    warm: BTreeMap<TemplateId, WarmCount>,
    /// Since when [`CellPool::reap_idle`] has seen the cell idle (no VM, spawn or warm target).
    idle_since: Option<Instant>,
    /// Deleted clones it reset into warm shells, as it last said.
    recycled: u64,
}

impl Slot {
    fn mappings(&self) -> usize {
        self.vms.values().sum::<usize>() + self.reserved_mappings
    }

    fn warm_target(&self) -> u32 {
        self.warm.values().map(|w| w.target).sum()
    }

    fn idle(&self) -> bool {
        self.vms.is_empty() && self.reserved == 0 && self.warm_target() == 0
    }

    /// Shells of `template` ready, as the cell last said.
    fn ready_of(&self, template: TemplateId) -> u32 {
        self.warm.get(&template).map_or(0, |w| w.ready)
    }

    fn target_of(&self, template: TemplateId) -> u32 {
        self.warm.get(&template).map_or(0, |w| w.target)
    }

    /// Records what the cell said it keeps.
    fn set_warm(&mut self, counts: &[WarmCount]) {
        self.warm = counts
            .iter()
            .filter(|w| w.target > 0 || w.ready > 0)
            .map(|w| (w.template, *w))
            .collect();
    }

    fn set_warm_one(&mut self, count: WarmCount) {
        if count.target == 0 && count.ready == 0 {
            self.warm.remove(&count.template);
        } else {
            self.warm.insert(count.template, count);
        }
    }
}

struct State {
    next_cell: CellId,
    cells: HashMap<CellId, Slot>,
    templates: HashMap<TemplateId, Arc<Template>>,
    /// Cells being started (they count against the cell limit already).
    starting: usize,
}

impl State {
    fn alive(&self) -> usize {
        self.cells
            .values()
            .filter(|s| s.cell.liveness() == Liveness::Alive)
            .count()
    }
}

/// The supervisor's set of cells.
pub struct CellPool {
    config: CellConfig,
    kvm: File,
    max_cells: usize,
    /// Memory mappings one cell's VMs may cost.
    mapping_budget: usize,
    state: Mutex<State>,
    /// Signalled when a cell start finishes.
    started: Condvar,
}

/// Errors of the pool.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// A cell failed.
    #[error(transparent)]
    Cell(#[from] CellError),
    /// No such VM.
    #[error("no VM {0:?} in the pool")]
    UnknownVm(VmRef),
    /// No such template.
    #[error("template {0} is not registered with the pool")]
    UnknownTemplate(TemplateId),
    /// The VM was in a cell that died.
    #[error("VM {at:?} was lost with its cell: {status}")]
    Lost {
        /// The VM.
        at: VmRef,
        /// How the cell ended.
        status: ExitStatus,
    },
    /// One VM of the template costs more mappings than a cell's whole budget.
    #[error("one VM of template {template} needs {each} memory mappings, more than a cell's budget of {budget}")]
    TooFragmented {
        /// Template.
        template: TemplateId,
        /// Mappings one VM needs.
        each: usize,
        /// A cell's budget.
        budget: usize,
    },
    /// More VMs than the cells may hold.
    #[error("{wanted} more VMs do not fit: {max_cells} cells of {vms_per_cell} VMs (and each cell's mapping budget)")]
    Full {
        /// Asked for.
        wanted: usize,
        /// Cell limit.
        max_cells: usize,
        /// VMs per cell.
        vms_per_cell: u32,
    },
    /// Opening the KVM device failed.
    #[error("cannot open /dev/kvm for the cells: {0}")]
    Kvm(std::io::Error),
}

impl CellPool {
    /// A pool with no cells yet; cells are started on demand, at most `max_cells`.
    pub fn new(config: CellConfig, max_cells: usize) -> Result<Self, PoolError> {
        let kvm = File::options()
            .read(true)
            .write(true)
            .open(cowvm_vmm::kvm::KVM_PATH)
            .map_err(PoolError::Kvm)?;
        let mapping_budget = config
            .mapping_budget
            .map_or_else(cowvm_vmm::pool::default_mapping_budget, |b| b as usize);
        Ok(CellPool {
            config,
            kvm,
            max_cells,
            mapping_budget,
            state: Mutex::new(State {
                next_cell: 1,
                cells: HashMap::new(),
                templates: HashMap::new(),
                starting: 0,
            }),
            started: Condvar::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Memory mappings the VMs of one cell may cost (each cell is a process with its own
    /// `vm.max_map_count`); placement never promises a cell more.
    pub fn mapping_budget(&self) -> usize {
        self.mapping_budget
    }

    /// The configuration cells are started with.
    pub fn config(&self) -> &CellConfig {
        &self.config
    }

    /// Registers `template` under `id`; cells get it when a clone of it is first placed there.
    pub fn add_template(&self, id: TemplateId, template: Arc<Template>) {
        self.lock().templates.insert(id, template);
    }

    /// Forgets template `id` and drops it from every live cell that loaded it (a cell refuses
    /// while it still holds clones of it). The first refusal is returned; the others are tried.
    pub fn remove_template(&self, id: TemplateId) -> Result<(), PoolError> {
        let holders: Vec<Arc<Cell>> = {
            let mut state = self.lock();
            state.templates.remove(&id);
            state
                .cells
                .values_mut()
                .filter_map(|s| s.templates.remove(&id).then(|| Arc::clone(&s.cell)))
                .collect()
        };
        let mut first = None;
        for cell in holders {
            match cell.drop_template(id) {
                Ok(()) | Err(CellError::Died { .. }) => {}
                Err(e) => {
                    first.get_or_insert(e);
                }
            }
        }
        first.map_or(Ok(()), |e| Err(e.into()))
    }

    /// Starts a new cell now (e.g. to replace one that died); returns its id.
    pub fn start_cell(&self) -> Result<CellId, PoolError> {
        self.lock().starting += 1;
        self.start_reserved(0, 0)
    }

    /// Starts a cell with `reserved` of its room promised to the caller (VMs, mappings). The
    /// caller counted it in `starting` (under the lock, with the cell limit).
    fn start_reserved(&self, reserved: u32, reserved_mappings: usize) -> Result<CellId, PoolError> {
        let started = Cell::start(&self.config, &self.kvm);
        let mut state = self.lock();
        state.starting = state.starting.saturating_sub(1);
        self.started.notify_all();
        let cell = Arc::new(started?);
        let id = state.next_cell;
        state.next_cell += 1;
        state.cells.insert(
            id,
            Slot {
                cell,
                vms: BTreeMap::new(),
                reserved,
                reserved_mappings,
                templates: BTreeSet::new(),
                warm: BTreeMap::new(),
                idle_since: None,
                recycled: 0,
            },
        );
        Ok(id)
    }

    /// The cell `id`, if the pool holds it.
    pub fn cell(&self, id: CellId) -> Option<Arc<Cell>> {
        self.lock().cells.get(&id).map(|s| Arc::clone(&s.cell))
    }

    /// Every cell, as `GET /v1/cells` lists them (asks each live cell for its warm shells).
    pub fn cells(&self) -> Vec<CellInfo> {
        self.refresh_warm();
        let state = self.lock();
        let mut list: Vec<CellInfo> = state
            .cells
            .iter()
            .map(|(&id, slot)| CellInfo {
                id,
                pid: slot.cell.pid(),
                uid: slot.cell.uid(),
                vms: slot.vms.len() as u32,
                warm_shells: slot.warm.values().map(|w| w.ready).sum(),
                warm_target: slot.warm_target(),
                mappings: slot.vms.values().sum(),
                confinement: slot.cell.confinement().ok(),
                recycled: slot.recycled,
            })
            .collect();
        list.sort_by_key(|c| c.id);
        list
    }

    /// Mappings one VM of `template` costs, and the error when one alone exceeds a cell's budget.
    fn mappings_each(&self, template: TemplateId) -> Result<usize, PoolError> {
        let source = self
            .lock()
            .templates
            .get(&template)
            .cloned()
            .ok_or(PoolError::UnknownTemplate(template))?;
        let each = cowvm_vmm::pool::mappings_per_clone(&source);
        if each > self.mapping_budget {
            return Err(PoolError::TooFragmented {
                template,
                each,
                budget: self.mapping_budget,
            });
        }
        Ok(each)
    }

    /// VMs costing `each` mappings that still fit in `slot`: its VM limit and its own mapping
    /// budget, less live VMs and spawns in flight. (Warm shells give way to clones.)
    fn room(&self, slot: &Slot, each: usize) -> u32 {
        let per_cell = self.config.vms_per_cell.max(1);
        let by_count = per_cell.saturating_sub(slot.vms.len() as u32 + slot.reserved);
        let by_mappings = self.mapping_budget.saturating_sub(slot.mappings()) / each.max(1);
        by_count.min(by_mappings.min(u32::MAX as usize) as u32)
    }

    /// VMs costing `each` mappings that an empty cell takes.
    fn empty_room(&self, each: usize) -> u32 {
        let per_cell = self.config.vms_per_cell.max(1);
        per_cell.min((self.mapping_budget / each.max(1)).min(u32::MAX as usize) as u32)
    }

    /// Plans where `count` VMs (clones of `template`, or booted VMs with `None`) costing `each`
    /// mappings go: (cell, how many), cells with warm shells of the template first (most first),
    /// then cells with room, then new cells, which it starts.
    /// The room is reserved until [`CellPool::release`].
    fn place(
        &self,
        count: usize,
        template: Option<TemplateId>,
        each: usize,
    ) -> Result<Vec<(CellId, Arc<Cell>, u32)>, PoolError> {
        let per_new = self.empty_room(each).max(1);
        let mut plan = Vec::new();
        let mut left = count;
        let new_cells = {
            let mut state = self.lock();
            let wait_until = std::time::Instant::now() + self.config.request_timeout;
            let (alive, needed) = loop {
                let alive: Vec<CellId> = state
                    .cells
                    .iter()
                    .filter(|(_, s)| s.cell.liveness() == Liveness::Alive)
                    .map(|(&id, _)| id)
                    .collect();
                let free: usize = alive
                    .iter()
                    .filter_map(|id| state.cells.get(id))
                    .map(|s| self.room(s, each) as usize)
                    .sum();
                let needed = count.saturating_sub(free).div_ceil(per_new as usize);
                if alive.len() + state.starting + needed <= self.max_cells {
                    break (alive, needed);
                }
                // Cells being started (e.g. for warm shells) may bring the room: wait for them.
                let left = wait_until.saturating_duration_since(std::time::Instant::now());
                if state.starting == 0 || left.is_zero() {
                    return Err(PoolError::Full {
                        wanted: count,
                        max_cells: self.max_cells,
                        vms_per_cell: self.config.vms_per_cell.max(1),
                    });
                }
                state = self
                    .started
                    .wait_timeout(state, left)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            };
            state.starting += needed;
            // The cells with the most shells of the template ready first (as they last said: a
            // shell being built or recycled is not ready), then the most kept; among equals, the
            // one with the fewest VMs (a cell serves one request at a time: single clones of
            // concurrent clients then land in different cells).
            let mut order: Vec<(u32, CellId)> = alive
                .iter()
                .filter_map(|&id| {
                    let slot = state.cells.get(&id)?;
                    Some((template.map_or(0, |t| slot.target_of(t)), id))
                })
                .collect();
            order.sort_by_key(|&(warm, id)| {
                let slot = state.cells.get(&id);
                let vms = slot.map_or(0, |s| s.vms.len());
                let ready = slot.zip(template).map_or(0, |(s, t)| s.ready_of(t));
                (std::cmp::Reverse(ready), std::cmp::Reverse(warm), vms, id)
            });
            // First the cells' warm shells of the template (a template's shells are spread over
            // cells), then any room.
            for shells_only in [true, false] {
                for &(warm, id) in &order {
                    if left == 0 {
                        break;
                    }
                    let room = match state.cells.get(&id) {
                        Some(slot) => self.room(slot, each) as usize,
                        None => continue,
                    };
                    let planned = plan.iter().position(|(p, _, _)| *p == id);
                    let given = planned.map_or(0, |i| plan[i].2 as usize);
                    let take = if shells_only {
                        room.min(left).min(warm as usize)
                    } else {
                        room.min(left)
                    };
                    if take == 0 {
                        continue;
                    }
                    if let Some(slot) = state.cells.get_mut(&id) {
                        slot.reserved += take as u32;
                        slot.reserved_mappings += take * each;
                        match planned {
                            Some(i) => plan[i].2 = (given + take) as u32,
                            None => plan.push((id, Arc::clone(&slot.cell), take as u32)),
                        }
                        left -= take;
                    }
                }
            }
            needed
        };
        let shares: Vec<u32> = (0..new_cells)
            .map(|i| (left - i * per_new as usize).min(per_new as usize) as u32)
            .collect();
        let started = self.start_cells(shares.iter().map(|&n| (n, n as usize * each)).collect());
        let mut first_error = None;
        for (id, n) in started.into_iter().zip(shares) {
            match id {
                Ok(id) => {
                    if let Some(cell) = self.cell(id) {
                        plan.push((id, cell, n));
                    }
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_error {
            // A cell did not start: give back what was reserved.
            for (id, _, n) in &plan {
                self.release(*id, *n, *n as usize * each);
            }
            return Err(e);
        }
        Ok(plan)
    }

    /// Starts one cell per entry, in parallel, each with (VMs, mappings) of its room reserved.
    fn start_cells(&self, reserved: Vec<(u32, usize)>) -> Vec<Result<CellId, PoolError>> {
        if reserved.len() == 1 {
            return vec![self.start_reserved(reserved[0].0, reserved[0].1)];
        }
        std::thread::scope(|scope| {
            let handles: Vec<_> = reserved
                .iter()
                .map(|&(n, m)| scope.spawn(move || self.start_reserved(n, m)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(CellError::Local("a cell start panicked".into()).into()))
                })
                .collect()
        })
    }

    /// Gives back `n` reserved places (and `mappings`) in cell `id`.
    fn release(&self, id: CellId, n: u32, mappings: usize) {
        if let Some(slot) = self.lock().cells.get_mut(&id) {
            slot.reserved = slot.reserved.saturating_sub(n);
            slot.reserved_mappings = slot.reserved_mappings.saturating_sub(mappings);
        }
    }

    /// Gives cell `id` the template if it lacks it.
    fn ensure_template(&self, id: CellId, cell: &Cell, template: TemplateId) -> Result<(), PoolError> {
        let (has, source) = {
            let state = self.lock();
            let has = state.cells.get(&id).is_some_and(|s| s.templates.contains(&template));
            (has, state.templates.get(&template).cloned())
        };
        if has {
            return Ok(());
        }
        let source = source.ok_or(PoolError::UnknownTemplate(template))?;
        cell.load_template(template, &source)?;
        if let Some(slot) = self.lock().cells.get_mut(&id) {
            slot.templates.insert(template);
        }
        Ok(())
    }

    /// Runs `work` for every entry of `items` in parallel (inline when there is one).
    fn each_parallel<I: Sync, T: Send>(
        items: &[I],
        what: &str,
        work: impl Fn(&I) -> Result<T, PoolError> + Sync,
    ) -> Vec<Result<T, PoolError>> {
        if items.len() == 1 {
            return vec![work(&items[0])];
        }
        std::thread::scope(|scope| {
            let work = &work;
            let handles: Vec<_> = items.iter().map(|item| scope.spawn(move || work(item))).collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(CellError::Local(format!("a {what} panicked")).into()))
                })
                .collect()
        })
    }

    /// Keeps `shells_per_cell` warm shells of `template` in every live cell, waiting up to
    /// `wait` for them; returns the shells ready over all cells.
    pub fn keep_warm(&self, template: TemplateId, shells_per_cell: u32, wait: Duration) -> Result<u32, PoolError> {
        let cells: Vec<(CellId, Arc<Cell>, u32)> = self
            .lock()
            .cells
            .iter()
            .map(|(&id, s)| (id, Arc::clone(&s.cell), shells_per_cell))
            .collect();
        self.set_targets(template, &cells, wait)
            .into_iter()
            .map(|r| r.map(|w| w.ready))
            .sum()
    }

    /// Asks each (cell, target) of `targets` to keep that many shells of `template`, in
    /// parallel, and records what each cell keeps.
    fn set_targets(
        &self,
        template: TemplateId,
        targets: &[(CellId, Arc<Cell>, u32)],
        wait: Duration,
    ) -> Vec<Result<WarmCount, PoolError>> {
        Self::each_parallel(targets, "warm-up", |(id, cell, target)| {
            self.ensure_template(*id, cell, template)?;
            let kept = cell.keep_warm(template, *target, wait)?;
            if let Some(slot) = self.lock().cells.get_mut(id) {
                slot.set_warm_one(kept);
            }
            Ok(kept)
        })
    }

    /// Warm shells of `template` the cells keep (targets: ready or being built).
    pub fn warm_target(&self, template: TemplateId) -> u32 {
        self.lock().cells.values().map(|s| s.target_of(template)).sum()
    }

    /// Warm shells of `template` ready in the cells, as they last said.
    pub fn warm_ready(&self, template: TemplateId) -> u32 {
        self.lock()
            .cells
            .values()
            .filter_map(|s| s.warm.get(&template))
            .map(|w| w.ready)
            .sum()
    }

    /// Warm shells the cells keep over all templates, per template.
    pub fn warm_targets(&self) -> HashMap<TemplateId, u32> {
        let mut all = HashMap::new();
        for slot in self.lock().cells.values() {
            for w in slot.warm.values() {
                *all.entry(w.template).or_insert(0) += w.target;
            }
        }
        all
    }

    /// Whether every cell last said it had all the warm shells it keeps ready.
    pub fn warm_settled(&self) -> bool {
        self.lock()
            .cells
            .values()
            .all(|s| s.warm.values().all(|w| w.ready >= w.target))
    }

    /// Asks every live cell for its counts and records its warm shells.
    pub fn refresh_warm(&self) {
        let cells: Vec<(CellId, Arc<Cell>)> = self
            .lock()
            .cells
            .iter()
            .filter(|(_, s)| s.cell.liveness() == Liveness::Alive)
            .map(|(&id, s)| (id, Arc::clone(&s.cell)))
            .collect();
        for (id, cell) in cells {
            if let Ok(counts) = cell.stats() {
                if let Some(slot) = self.lock().cells.get_mut(&id) {
                    slot.set_warm(&counts.warm);
                    slot.recycled = counts.recycled;
                }
            }
        }
    }

    /// Adds up to `add` warm-shell targets of `template` over the cells: into room nobody holds
    /// (live VMs, spawns in flight and other targets count), starting new cells up to the cell
    /// limit when `start_cells` allows. The cells build the shells in the background. Returns the
    /// targets added (what the cells agreed to keep).
    pub fn grow_warm(&self, template: TemplateId, add: u32, start_cells: bool) -> Result<u32, PoolError> {
        let each = self.mappings_each(template)?;
        let per_cell = self.config.vms_per_cell.max(1);
        let per_new = self.empty_room(each).max(1);
        // A cell serves one request at a time: a template's shells are spread over as many cells
        // as the host runs requests at once, so that clones taken one by one by concurrent
        // clients land in different cells (a clone call takes the cell with the most shells).
        let spread = host_parallelism().min(self.max_cells).max(1) as u32;
        let cap = (self.warm_target(template) + add).div_ceil(spread);
        let mut plan: Vec<(CellId, Arc<Cell>, u32)> = Vec::new();
        let mut before = 0;
        let mut left = add;
        // Room in cell `slot` for more shells of the template, less what the plan gives it.
        let room_in = |slot: &Slot| {
            let held = slot.vms.len() as u32 + slot.reserved + slot.warm_target();
            per_cell
                .saturating_sub(held)
                .min(self.room(slot, each).saturating_sub(slot.warm_target()))
        };
        let new_cells = {
            let mut state = self.lock();
            let mut ids: Vec<CellId> = state.cells.keys().copied().collect();
            ids.sort();
            let alive: Vec<CellId> = ids
                .into_iter()
                .filter(|id| {
                    state
                        .cells
                        .get(id)
                        .is_some_and(|s| s.cell.liveness() == Liveness::Alive)
                })
                .collect();
            for &id in &alive {
                let Some(slot) = state.cells.get(&id) else { continue };
                let target = slot.target_of(template);
                let take = room_in(slot).min(left).min(cap.saturating_sub(target));
                if take > 0 {
                    before += target;
                    plan.push((id, Arc::clone(&slot.cell), target + take));
                    left -= take;
                }
            }
            let free = if start_cells {
                self.max_cells.saturating_sub(state.alive() + state.starting)
            } else {
                0
            };
            let new_cells = (left.div_ceil(per_new.min(cap).max(1)) as usize).min(free);
            // What new cells cannot take goes to the cells there are, beyond the spread.
            let mut beyond = left.saturating_sub(new_cells as u32 * per_new.min(cap).max(1));
            for &id in &alive {
                if beyond == 0 {
                    break;
                }
                let Some(slot) = state.cells.get(&id) else { continue };
                let planned = plan.iter().position(|(p, _, _)| *p == id);
                let given = planned.map_or(0, |i| plan[i].2 - slot.target_of(template));
                let take = room_in(slot).saturating_sub(given).min(beyond);
                if take == 0 {
                    continue;
                }
                match planned {
                    Some(i) => plan[i].2 += take,
                    None => {
                        before += slot.target_of(template);
                        plan.push((id, Arc::clone(&slot.cell), slot.target_of(template) + take));
                    }
                }
                beyond -= take;
                left -= take;
            }
            state.starting += new_cells;
            new_cells
        };
        let started = self.start_cells(vec![(0, 0); new_cells]);
        for id in started.into_iter().flatten() {
            if left == 0 {
                break;
            }
            if let Some(cell) = self.cell(id) {
                let take = left.min(per_new).min(cap.max(1));
                plan.push((id, cell, take));
                left -= take;
            }
        }
        let kept: u32 = self
            .set_targets(template, &plan, Duration::ZERO)
            .into_iter()
            .filter_map(Result::ok)
            .map(|w| w.target)
            .sum();
        Ok(kept.saturating_sub(before))
    }

    /// Lowers warm-shell targets by up to `count` (of `template`, or of any template when
    /// `None`, the largest first); the cells tear the shells down. Returns the targets removed.
    pub fn shrink_warm(&self, template: Option<TemplateId>, count: u32) -> u32 {
        let mut plan: Vec<(TemplateId, CellId, Arc<Cell>, u32, u32)> = Vec::new();
        {
            let state = self.lock();
            let mut all: Vec<(u32, CellId, TemplateId)> = state
                .cells
                .iter()
                .flat_map(|(&id, s)| s.warm.values().map(move |w| (w.target, id, w.template)))
                .filter(|&(target, _, t)| target > 0 && template.is_none_or(|want| want == t))
                .collect();
            all.sort_by_key(|&(target, id, _)| (std::cmp::Reverse(target), id));
            let mut left = count;
            for (target, id, t) in all {
                if left == 0 {
                    break;
                }
                let Some(slot) = state.cells.get(&id) else { continue };
                let lower = target.min(left);
                plan.push((t, id, Arc::clone(&slot.cell), target, target - lower));
                left -= lower;
            }
        }
        let mut removed = 0;
        for (t, id, cell, before, target) in plan {
            // A dead cell keeps nothing; it leaves the pool with its targets.
            if let Ok(kept) = cell.keep_warm(t, target, Duration::ZERO) {
                removed += before.saturating_sub(kept.target);
                if let Some(slot) = self.lock().cells.get_mut(&id) {
                    slot.set_warm_one(kept);
                }
            }
        }
        removed
    }

    /// Makes `count` clones of `template`, spread over cells with room (cells with its warm
    /// shells first, new cells started as needed), every cell's share made in parallel. Clones a
    /// cell could not make (or lost when it died) are reported in [`PoolBatch::failed`] with
    /// their positions in the call. The cells' warm-shell targets drop by the shells taken.
    pub fn spawn(&self, template: TemplateId, count: usize) -> Result<PoolBatch, PoolError> {
        let each = self.mappings_each(template)?;
        let plan = self.place(count, Some(template), each)?;
        let mut first = 0u32;
        let shares: Vec<(CellId, Arc<Cell>, u32, u32)> = plan
            .into_iter()
            .map(|(id, cell, n)| {
                let share = (id, cell, n, first);
                first += n;
                share
            })
            .collect();
        let results = Self::each_parallel(&shares, "spawn", |(id, cell, n, _)| {
            self.ensure_template(*id, cell, template)?;
            Ok(cell.spawn(template, *n)?)
        });
        let mut batch = PoolBatch::default();
        let mut state = self.lock();
        for ((id, cell, n, first), result) in shares.iter().zip(results) {
            if let Some(slot) = state.cells.get_mut(id) {
                slot.reserved = slot.reserved.saturating_sub(*n);
                slot.reserved_mappings = slot.reserved_mappings.saturating_sub(*n as usize * each);
            }
            match result {
                Ok(Spawned { clones, failed, warm }) => {
                    if let Some(slot) = state.cells.get_mut(id) {
                        slot.vms.extend(clones.iter().map(|c| (c.vm, each)));
                        slot.set_warm(&warm);
                    }
                    batch.clones.extend(clones.into_iter().map(|spawned| PlacedVm {
                        at: VmRef {
                            cell: *id,
                            vm: spawned.vm,
                        },
                        pid: cell.pid(),
                        spawned,
                    }));
                    batch.failed.extend(failed.into_iter().map(|f| CloneFailure {
                        index: *first as usize + f.index,
                        ..f
                    }));
                }
                Err(e) => {
                    let reason = e.to_string();
                    batch.failed.extend((*first..first + n).map(|index| CloneFailure {
                        index: index as usize,
                        reason: reason.clone(),
                        guest_stopped: false,
                    }));
                }
            }
        }
        batch.failed.sort_by_key(|f| f.index);
        Ok(batch)
    }

    fn cell_of(&self, at: VmRef) -> Result<Arc<Cell>, PoolError> {
        let state = self.lock();
        let slot = state
            .cells
            .get(&at.cell)
            .filter(|s| s.vms.contains_key(&at.vm))
            .ok_or(PoolError::UnknownVm(at))?;
        if let Liveness::Dead(status) = slot.cell.liveness() {
            return Err(PoolError::Lost { at, status });
        }
        Ok(Arc::clone(&slot.cell))
    }

    /// Runs `command` in VM `at` on vCPU 0: what the guest returned.
    pub fn run(&self, at: VmRef, command: GuestCommand, deadline: Duration) -> Result<CommandOutput, PoolError> {
        Ok(self.run_on(at, 0, command, deadline)?.0)
    }

    /// Runs `command` in VM `at` on vCPU `vcpu`: what the guest returned and how long
    /// `KVM_RUN` took.
    pub fn run_on(
        &self,
        at: VmRef,
        vcpu: u32,
        command: GuestCommand,
        deadline: Duration,
    ) -> Result<(CommandOutput, Duration), PoolError> {
        Ok(self.cell_of(at)?.run_on(at.vm, vcpu, command, deadline)?)
    }

    /// Runs one call (guest ABI v1) in VM `at`: its answer, or how the call failed.
    pub fn call(
        &self,
        at: VmRef,
        input: Vec<u8>,
        deadline: Duration,
    ) -> Result<Result<crate::protocol::CallDone, crate::protocol::CallFailure>, PoolError> {
        Ok(self.cell_of(at)?.call_guest(at.vm, input, deadline)?)
    }

    /// Runs one call in a fresh clone of `template` in a cell (one keeping warm shells of it
    /// first, else one with room, else a new one) that tears the clone down once its answer is
    /// out ([`Cell::call_template`]): the answer, or how the call failed. `placed` runs once the
    /// call has its cell and the pool records the shell it takes (that cell's target one lower,
    /// as the cell will answer), before the guest runs; on an error before that it is dropped
    /// unrun.
    pub fn call_template(
        &self,
        template: TemplateId,
        input: Vec<u8>,
        deadline: Duration,
        placed: impl FnOnce(),
    ) -> Result<Result<crate::protocol::CallDone, crate::protocol::CallFailure>, PoolError> {
        let each = self.mappings_each(template)?;
        // One VM in one cell: the plan has one entry.
        let (id, cell, _) = self.place(1, Some(template), each)?.pop().ok_or(PoolError::Full {
            wanted: 1,
            max_cells: self.max_cells,
            vms_per_cell: self.config.vms_per_cell.max(1),
        })?;
        if let Some(slot) = self.lock().cells.get_mut(&id) {
            if let Some(&warm) = slot.warm.get(&template) {
                slot.set_warm_one(WarmCount {
                    target: warm.target.saturating_sub(1),
                    ready: warm.ready.saturating_sub(1),
                    ..warm
                });
            }
        }
        placed();
        let called = self
            .ensure_template(id, &cell, template)
            .and_then(|()| Ok(cell.call_template(template, input, deadline)?));
        if let Some(slot) = self.lock().cells.get_mut(&id) {
            slot.reserved = slot.reserved.saturating_sub(1);
            slot.reserved_mappings = slot.reserved_mappings.saturating_sub(each);
            if let Ok(called) = &called {
                slot.set_warm(&called.warm);
            }
        }
        Ok(called?.call)
    }

    /// Resets VM `at` (by swap when its cell has a warm shell of its template); the report and
    /// where its RAM is mapped in the cell afterwards.
    pub fn reset(&self, at: VmRef) -> Result<(ResetReport, u64), PoolError> {
        Ok(self.cell_of(at)?.reset(at.vm)?)
    }

    /// KVM's statistics files of VM `at` (see [`Cell::kvm_stats_files`]).
    pub fn kvm_stats_files(&self, at: VmRef) -> Result<crate::cell::VmStatsFiles, PoolError> {
        Ok(self.cell_of(at)?.kvm_stats_files(at.vm)?)
    }

    /// Freezes VM `at`, a clone of template `parent`, into template `id` (see [`Cell::freeze`]):
    /// the new template and the microseconds the VM was paused. Its cell keeps the template for
    /// clones placed there, so the pool records it there, also when the outcome is uncertain
    /// (a timeout, a template the supervisor could not build): a caller that does not register
    /// `id` afterwards drops it with [`CellPool::remove_template`].
    pub fn freeze(&self, at: VmRef, parent: TemplateId, id: TemplateId) -> Result<(Template, f64), PoolError> {
        let cell = self.cell_of(at)?;
        let source = self
            .lock()
            .templates
            .get(&parent)
            .cloned()
            .ok_or(PoolError::UnknownTemplate(parent))?;
        let frozen = cell.freeze(at.vm, parent, &source, id);
        if !matches!(frozen, Err(CellError::Remote { .. } | CellError::Died { .. })) {
            if let Some(slot) = self.lock().cells.get_mut(&at.cell) {
                slot.templates.insert(id);
            }
        }
        Ok(frozen?)
    }

    /// Translates and checks the targets of a write probe in VM `at` (see [`Cell::probe_prepare`]).
    pub fn probe_prepare(
        &self,
        at: VmRef,
        targets: cowvm_vmm::probe::ProbeTargets,
    ) -> Result<Vec<cowvm_vmm::translate::GuestTranslation>, PoolError> {
        Ok(self.cell_of(at)?.probe_prepare(at.vm, targets)?)
    }

    /// The guest writes of a write probe in VM `at` (see [`Cell::probe_write`]). The scratch
    /// clone of a baseline lives only within the request, which its cell serves alone: it takes
    /// room the cell has free and gives it back before any other request there.
    pub fn probe_write(
        &self,
        at: VmRef,
        gvas: Vec<u64>,
        baseline: bool,
    ) -> Result<crate::protocol::ProbeWritten, PoolError> {
        Ok(self.cell_of(at)?.probe_write(at.vm, gvas, baseline)?)
    }

    /// Destroys VM `at`.
    pub fn destroy(&self, at: VmRef) -> Result<(), PoolError> {
        self.cell_of(at)?.destroy(at.vm)?;
        if let Some(slot) = self.lock().cells.get_mut(&at.cell) {
            slot.vms.remove(&at.vm);
        }
        Ok(())
    }

    /// Deletes the clone at `at` by recycling it into a warm shell of its template in its cell
    /// (the cell's target for the template rises by one); true if it was recycled, false if the
    /// cell destroyed it instead.
    pub fn recycle(&self, at: VmRef) -> Result<bool, PoolError> {
        let (recycled, warm) = self.cell_of(at)?.recycle(at.vm)?;
        if let Some(slot) = self.lock().cells.get_mut(&at.cell) {
            slot.vms.remove(&at.vm);
            slot.set_warm(&warm);
        }
        Ok(recycled)
    }

    /// Removes every dead cell from the pool and reports each with the VMs it took with it.
    /// Returns once their processes are reaped (the kernel tears a dead cell's VMs down first).
    pub fn reap_dead(&self) -> Vec<LostCell> {
        // A cell's socket closes before the kernel has torn its VMs down and it is reaped: wait
        // for that, so that each report says how the cell ended.
        let dying: Vec<Arc<Cell>> = self
            .lock()
            .cells
            .values()
            .filter(|s| s.cell.liveness() != Liveness::Alive)
            .map(|s| Arc::clone(&s.cell))
            .collect();
        for cell in dying {
            cell.wait_exit(Duration::from_secs(30));
        }
        let mut removed = Vec::new();
        let lost = self.take_dead(&mut removed);
        drop(removed);
        lost
    }

    fn take_dead(&self, removed: &mut Vec<Slot>) -> Vec<LostCell> {
        let mut state = self.lock();
        let dead: Vec<CellId> = state
            .cells
            .iter()
            .filter(|(_, s)| s.cell.liveness() != Liveness::Alive)
            .map(|(&id, _)| id)
            .collect();
        let mut lost: Vec<LostCell> = dead
            .into_iter()
            .filter_map(|id| {
                let slot = state.cells.remove(&id)?;
                let status = match slot.cell.liveness() {
                    Liveness::Dead(status) => status,
                    Liveness::Alive => ExitStatus::Unknown,
                };
                let lost = LostCell {
                    cell: id,
                    pid: slot.cell.pid(),
                    status,
                    vms: slot.vms.keys().map(|&vm| VmRef { cell: id, vm }).collect(),
                };
                removed.push(slot);
                Some(lost)
            })
            .collect();
        lost.sort_by_key(|l| l.cell);
        lost
    }

    /// Stops the cells that have held no VM and kept no warm shell (idle) for at least `after`
    /// (as seen by the calls of this method), keeping the `keep` lowest of the idle ones; returns
    /// how many were stopped. A cell counts as idle from the first call that sees it so.
    pub fn reap_idle(&self, keep: usize, after: Duration) -> usize {
        let now = Instant::now();
        let mut state = self.lock();
        let mut idle: Vec<(CellId, bool)> = state
            .cells
            .iter_mut()
            .filter_map(|(&id, s)| {
                if !s.idle() {
                    s.idle_since = None;
                    return None;
                }
                let since = *s.idle_since.get_or_insert(now);
                Some((id, now.duration_since(since) >= after))
            })
            .collect();
        idle.sort();
        let stop: Vec<Slot> = idle
            .into_iter()
            .skip(keep)
            .filter(|&(_, expired)| expired)
            .filter_map(|(id, _)| state.cells.remove(&id))
            .collect();
        drop(state);
        // Dropping a slot closes its cell (it ends its loop and exits).
        stop.len()
    }
}

/// How many requests the host runs at once: its CPUs (1 if unknown).
fn host_parallelism() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
}
