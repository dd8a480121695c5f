//! The supervisor's cells: starts them on demand, places the clones of one call over cells with
//! room (at most `vms_per_cell` VMs each) and makes them in parallel, addresses VMs by
//! [`VmRef`], and reports cells that died with the VMs they took with them.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use cowvm_vmm::{GuestCommand, Template};

use crate::cell::{Cell, CellConfig, CellError, ExitStatus, Liveness};
use crate::protocol::{CellVmId, ResetDone, RunOutput, SpawnFailure, SpawnedVm, TemplateId};
use crate::sandbox::Confinement;

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
    pub failed: Vec<SpawnFailure>,
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
    /// Warm shells it keeps.
    pub warm_shells: u32,
    /// Its confinement from `/proc/<pid>/status` (`None` if it could not be read).
    pub confinement: Option<Confinement>,
}

struct Slot {
    cell: Arc<Cell>,
    vms: BTreeSet<CellVmId>,
    /// Room promised to spawns in flight (so that concurrent calls do not over-fill a cell).
    reserved: u32,
    templates: BTreeSet<TemplateId>,
    warm: u32,
}

struct State {
    next_cell: CellId,
    cells: HashMap<CellId, Slot>,
    templates: HashMap<TemplateId, Arc<Template>>,
}

/// The supervisor's set of cells.
pub struct CellPool {
    config: CellConfig,
    kvm: File,
    max_cells: usize,
    state: Mutex<State>,
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
    /// More VMs than the cells may hold.
    #[error("{wanted} more VMs do not fit: {max_cells} cells of {vms_per_cell} VMs")]
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
        Ok(CellPool {
            config,
            kvm,
            max_cells,
            state: Mutex::new(State {
                next_cell: 1,
                cells: HashMap::new(),
                templates: HashMap::new(),
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
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
        self.start_reserved(0)
    }

    /// Starts a cell with `reserved` of its room promised to the caller.
    fn start_reserved(&self, reserved: u32) -> Result<CellId, PoolError> {
        let cell = Arc::new(Cell::start(&self.config, &self.kvm)?);
        let mut state = self.lock();
        let id = state.next_cell;
        state.next_cell += 1;
        state.cells.insert(
            id,
            Slot {
                cell,
                vms: BTreeSet::new(),
                reserved,
                templates: BTreeSet::new(),
                warm: 0,
            },
        );
        Ok(id)
    }

    /// The cell `id`, if the pool holds it.
    pub fn cell(&self, id: CellId) -> Option<Arc<Cell>> {
        self.lock().cells.get(&id).map(|s| Arc::clone(&s.cell))
    }

    /// Every cell, as `GET /v1/cells` lists them.
    pub fn cells(&self) -> Vec<CellInfo> {
        let state = self.lock();
        let mut list: Vec<CellInfo> = state
            .cells
            .iter()
            .map(|(&id, slot)| CellInfo {
                id,
                pid: slot.cell.pid(),
                uid: slot.cell.uid(),
                vms: slot.vms.len() as u32,
                warm_shells: slot.warm,
                confinement: slot.cell.confinement().ok(),
            })
            .collect();
        list.sort_by_key(|c| c.id);
        list
    }

    /// Plans where `count` clones go: (cell, how many), filling cells with room first, then new
    /// cells, which it starts. The room is reserved until [`CellPool::release`].
    fn place(&self, count: usize) -> Result<Vec<(CellId, Arc<Cell>, u32)>, PoolError> {
        let per_cell = self.config.vms_per_cell.max(1);
        let mut plan = Vec::new();
        let mut left = count;
        let new_cells = {
            let mut state = self.lock();
            let alive = state
                .cells
                .values()
                .filter(|s| s.cell.liveness() == Liveness::Alive)
                .count();
            let free: usize = state
                .cells
                .values()
                .filter(|s| s.cell.liveness() == Liveness::Alive)
                .map(|s| per_cell.saturating_sub(s.vms.len() as u32 + s.reserved) as usize)
                .sum();
            let needed = count.saturating_sub(free).div_ceil(per_cell as usize);
            if alive + needed > self.max_cells {
                return Err(PoolError::Full {
                    wanted: count,
                    max_cells: self.max_cells,
                    vms_per_cell: per_cell,
                });
            }
            let mut ids: Vec<CellId> = state.cells.keys().copied().collect();
            ids.sort();
            for id in ids {
                let Some(slot) = state.cells.get_mut(&id) else { continue };
                if left == 0 || slot.cell.liveness() != Liveness::Alive {
                    continue;
                }
                // Warm shells turn into the clones a spawn makes, so only live VMs (and spawns
                // in flight) take room; a cell refuses to keep more shells than fit.
                let room = per_cell.saturating_sub(slot.vms.len() as u32 + slot.reserved) as usize;
                let take = room.min(left);
                if take > 0 {
                    slot.reserved += take as u32;
                    plan.push((id, Arc::clone(&slot.cell), take as u32));
                    left -= take;
                }
            }
            needed
        };
        let shares: Vec<u32> = (0..new_cells)
            .map(|i| (left - i * per_cell as usize).min(per_cell as usize) as u32)
            .collect();
        let started: Vec<Result<CellId, PoolError>> = std::thread::scope(|scope| {
            let handles: Vec<_> = shares
                .iter()
                .map(|&n| scope.spawn(move || self.start_reserved(n)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(CellError::Local("a cell start panicked".into()).into()))
                })
                .collect()
        });
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
                self.release(*id, *n);
            }
            return Err(e);
        }
        Ok(plan)
    }

    /// Gives back `n` reserved places in cell `id`.
    fn release(&self, id: CellId, n: u32) {
        if let Some(slot) = self.lock().cells.get_mut(&id) {
            slot.reserved = slot.reserved.saturating_sub(n);
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

    /// Keeps `shells_per_cell` warm shells of `template` in every live cell, waiting up to
    /// `wait` for them; returns the shells ready over all cells.
    pub fn keep_warm(&self, template: TemplateId, shells_per_cell: u32, wait: Duration) -> Result<u32, PoolError> {
        let cells: Vec<(CellId, Arc<Cell>)> = self
            .lock()
            .cells
            .iter()
            .map(|(&id, s)| (id, Arc::clone(&s.cell)))
            .collect();
        let results: Vec<Result<u32, PoolError>> = std::thread::scope(|scope| {
            let handles: Vec<_> = cells
                .iter()
                .map(|(id, cell)| {
                    scope.spawn(move || {
                        self.ensure_template(*id, cell, template)?;
                        let ready = cell.keep_warm(template, shells_per_cell, wait)?;
                        if let Some(slot) = self.lock().cells.get_mut(id) {
                            slot.warm = shells_per_cell;
                        }
                        Ok(ready)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(CellError::Local("a warm-up panicked".into()).into()))
                })
                .collect()
        });
        results.into_iter().sum()
    }

    /// Makes `count` clones of `template`, spread over cells with room (new cells started as
    /// needed), every cell's share made in parallel. Clones a cell could not make (or lost when
    /// it died) are reported in [`PoolBatch::failed`] with their positions in the call.
    pub fn spawn(&self, template: TemplateId, count: usize) -> Result<PoolBatch, PoolError> {
        if !self.lock().templates.contains_key(&template) {
            return Err(PoolError::UnknownTemplate(template));
        }
        let plan = self.place(count)?;
        let mut first = 0u32;
        let shares: Vec<(CellId, Arc<Cell>, u32, u32)> = plan
            .into_iter()
            .map(|(id, cell, n)| {
                let share = (id, cell, n, first);
                first += n;
                share
            })
            .collect();
        let results: Vec<_> = std::thread::scope(|scope| {
            let handles: Vec<_> = shares
                .iter()
                .map(|(id, cell, n, _)| {
                    scope.spawn(move || -> Result<(Vec<SpawnedVm>, Vec<SpawnFailure>), PoolError> {
                        self.ensure_template(*id, cell, template)?;
                        Ok(cell.spawn(template, *n)?)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(CellError::Local("a spawn panicked".into()).into()))
                })
                .collect()
        });
        let mut batch = PoolBatch::default();
        let mut state = self.lock();
        for ((id, cell, n, first), result) in shares.iter().zip(results) {
            if let Some(slot) = state.cells.get_mut(id) {
                slot.reserved = slot.reserved.saturating_sub(*n);
            }
            match result {
                Ok((clones, failed)) => {
                    if let Some(slot) = state.cells.get_mut(id) {
                        slot.vms.extend(clones.iter().map(|c| c.vm));
                    }
                    batch.clones.extend(clones.into_iter().map(|spawned| PlacedVm {
                        at: VmRef {
                            cell: *id,
                            vm: spawned.vm,
                        },
                        pid: cell.pid(),
                        spawned,
                    }));
                    batch.failed.extend(failed.into_iter().map(|f| SpawnFailure {
                        index: first + f.index,
                        reason: f.reason,
                    }));
                }
                Err(e) => {
                    let reason = e.to_string();
                    batch.failed.extend((*first..first + n).map(|index| SpawnFailure {
                        index,
                        reason: reason.clone(),
                    }));
                }
            }
        }
        Ok(batch)
    }

    fn cell_of(&self, at: VmRef) -> Result<Arc<Cell>, PoolError> {
        let state = self.lock();
        let slot = state
            .cells
            .get(&at.cell)
            .filter(|s| s.vms.contains(&at.vm))
            .ok_or(PoolError::UnknownVm(at))?;
        if let Liveness::Dead(status) = slot.cell.liveness() {
            return Err(PoolError::Lost { at, status });
        }
        Ok(Arc::clone(&slot.cell))
    }

    /// Runs `command` in VM `at`.
    pub fn run(&self, at: VmRef, command: GuestCommand, deadline: Duration) -> Result<RunOutput, PoolError> {
        Ok(self.cell_of(at)?.run(at.vm, command, deadline)?)
    }

    /// Resets VM `at` in place.
    pub fn reset(&self, at: VmRef) -> Result<ResetDone, PoolError> {
        Ok(self.cell_of(at)?.reset(at.vm)?)
    }

    /// KVM's statistics files of VM `at` (see [`Cell::kvm_stats_files`]).
    pub fn kvm_stats_files(&self, at: VmRef) -> Result<crate::cell::VmStatsFiles, PoolError> {
        Ok(self.cell_of(at)?.kvm_stats_files(at.vm)?)
    }

    /// Destroys VM `at`.
    pub fn destroy(&self, at: VmRef) -> Result<(), PoolError> {
        self.cell_of(at)?.destroy(at.vm)?;
        if let Some(slot) = self.lock().cells.get_mut(&at.cell) {
            slot.vms.remove(&at.vm);
        }
        Ok(())
    }

    /// Removes every dead cell from the pool and reports each with the VMs it took with it.
    /// Returns once their processes are reaped (the kernel tears a dead cell's VMs down first).
    pub fn reap_dead(&self) -> Vec<LostCell> {
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
                    vms: slot.vms.iter().map(|&vm| VmRef { cell: id, vm }).collect(),
                };
                removed.push(slot);
                Some(lost)
            })
            .collect();
        lost.sort_by_key(|l| l.cell);
        lost
    }

    /// Stops every cell that holds no VM (idle), keeping `keep` of them.
    pub fn reap_idle(&self, keep: usize) -> usize {
        let mut state = self.lock();
        let mut idle: Vec<CellId> = state
            .cells
            .iter()
            .filter(|(_, s)| s.vms.is_empty())
            .map(|(&id, _)| id)
            .collect();
        idle.sort();
        let stop: Vec<Slot> = idle
            .into_iter()
            .skip(keep)
            .filter_map(|id| state.cells.remove(&id))
            .collect();
        drop(state);
        stop.len()
    }
}
