//! Warm VM shells: for each template that asks for them, a background thread keeps VMs that are
//! fully built for that template — VM fd, private mapping of its memory, memslot, vCPU with CPUID
//! and the whole captured state restored — and have never run. Taking one is a mutex pop, so a
//! clone costs only staging its identity registers and its first `KVM_RUN`; neither grows with
//! guest RAM nor with the number of live VMs. `KVM_CREATE_VM` (slower as the process gains VMAs)
//! and memslot registration (~0.6 ms per GiB) stay off the request path.
//!
//! Each shell has also entered the guest once and been put back (pending I/O completed, copied
//! pages dropped, state restored), because the first entry into a new VM costs time that grows
//! with RAM size on shadow-paging hosts.
//!
//! The builder pauses while a spawn or reset is in progress, so that its `KVM_CREATE_VM` (which
//! takes the process's mm locks to register an MMU notifier) does not stall the guests' page
//! faults on the request path.
//!
//! Admission: shells are KVM VMs too, so they share one budget with the VMs callers hold. Under
//! the same lock as the pools, [`Pools::reserve`] admits VMs against the VM limit and the
//! process-wide mapping budget, evicting shells first when the room is needed; the builder builds
//! only into room nobody has reserved, and only while enough file descriptors stay free.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::kvm::Kvm;
use crate::pagemap::PageMap;
use crate::reaper::Reaper;
use crate::slots::SlotPolicy;
use crate::template::Template;
use crate::vm::{Vm, VmError};

/// How long the builder waits before retrying after a failed build (doubling per failure).
const RETRY_AFTER: Duration = Duration::from_millis(100);
/// Longest wait between retries of a pool whose builds keep failing.
const RETRY_MAX: Duration = Duration::from_secs(5);
/// How often an idle builder looks again (it is also woken explicitly).
const IDLE_POLL: Duration = Duration::from_millis(20);
/// Recycle timings kept for [`Pools::recycle_stats`].
const RECYCLE_SAMPLES: usize = 1024;
/// The window over which a pool's demand (shells taken) is counted.
const DEMAND_WINDOW: Duration = Duration::from_secs(1);
/// Mappings a VM costs besides its overlay runs (guest RAM, the vCPU's run area, slack).
pub const MAPPINGS_PER_VM: usize = 4;
/// Mappings kept out of the VM budget for the rest of the process (heap, stacks, libraries).
pub const MAPPINGS_KEPT_FREE: usize = 16 * 1024;

/// Mappings (VMAs) one VM of `template` costs: each data piece mapped from a memfd (base data
/// runs and overlay runs alike) splits the anonymous private range into up to two more pieces.
pub fn mappings_per_clone(template: &Template) -> usize {
    MAPPINGS_PER_VM + 2 * template.memory().mapped_pieces()
}

/// The process-wide mapping budget: `vm.max_map_count` less [`MAPPINGS_KEPT_FREE`].
pub fn default_mapping_budget() -> usize {
    let max = std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .ok()
        .and_then(|s| s.trim().parse::<usize>().ok())
        .unwrap_or(65_530);
    max.saturating_sub(MAPPINGS_KEPT_FREE)
}

/// Why VMs could not be admitted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdmitError {
    /// The VM limit is reached by VMs that are not warm shells.
    #[error("{requested} more VMs would exceed the limit of {limit} VMs ({held} live or being made)")]
    TooManyVms {
        /// VMs asked for.
        requested: usize,
        /// VMs held now (live and reserved).
        held: usize,
        /// The limit.
        limit: usize,
    },
    /// The mapping budget is used up by VMs that are not warm shells.
    #[error("{requested} more VMs need {needed} memory mappings; {free} of the process budget of {budget} are free (delete VMs, or flatten fragmented templates)")]
    MappingsExhausted {
        /// VMs asked for.
        requested: usize,
        /// Mappings they need.
        needed: usize,
        /// Mappings free.
        free: usize,
        /// The budget.
        budget: usize,
    },
    /// One VM of this template costs more mappings than the whole budget.
    #[error("one VM of this template needs {each} memory mappings, more than the process budget of {budget}; the template is too fragmented to clone")]
    TooFragmented {
        /// Mappings one VM needs.
        each: usize,
        /// The budget.
        budget: usize,
    },
}

struct Pool {
    /// Tells this pool apart from a later pool of the same template id.
    instance: u64,
    template: Arc<Template>,
    shells: Vec<Vm>,
    target: usize,
    building: usize,
    mappings_each: usize,
    last_error: Option<String>,
    failures: u32,
    retry_at: Option<Instant>,
    /// Used VMs of this pool being reset by the builder (counted as the pool's VMs).
    recycling: usize,
    /// Builds and recycles in flight that gave their room away (evicted while they could not be
    /// stopped): no longer counted, torn down when they finish.
    doomed_builds: usize,
    doomed_recycles: usize,
    /// Shells taken in the current demand window, and in the one before.
    taken_now: usize,
    taken_before: usize,
    window_start: Instant,
}

impl Pool {
    fn new(instance: u64, template: &Arc<Template>) -> Self {
        Pool {
            instance,
            template: Arc::clone(template),
            shells: Vec::new(),
            target: 0,
            building: 0,
            mappings_each: mappings_per_clone(template),
            last_error: None,
            failures: 0,
            retry_at: None,
            recycling: 0,
            doomed_builds: 0,
            doomed_recycles: 0,
            taken_now: 0,
            taken_before: 0,
            window_start: Instant::now(),
        }
    }

    fn vms(&self) -> usize {
        self.shells.len() + self.building + self.recycling
    }

    /// Counts `n` shells (or shell-sized demands) taken now.
    fn note_taken(&mut self, n: usize) {
        self.roll_window();
        self.taken_now += n;
    }

    fn roll_window(&mut self) {
        let age = self.window_start.elapsed();
        if age >= DEMAND_WINDOW {
            self.taken_before = if age >= 2 * DEMAND_WINDOW { 0 } else { self.taken_now };
            self.taken_now = 0;
            self.window_start = Instant::now();
        }
    }

    /// How many VMs this pool may hold when used VMs come back: its configured target, or, when
    /// `beyond_target`, more when clones were taken faster than that over the last demand window.
    fn recycle_target(&mut self, beyond_target: bool) -> usize {
        self.roll_window();
        if self.target == 0 || !beyond_target {
            return self.target;
        }
        self.target.max(self.taken_now.max(self.taken_before))
    }
}

/// A used VM waiting for the builder to reset it into a shell of its pool.
struct Recycle {
    template: Arc<Template>,
    instance: u64,
    vm: Vm,
}

/// What became of used VMs handed back to the pools.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RecycleStats {
    /// Used VMs reset and returned to a warm pool as shells.
    pub recycled: u64,
    /// Used VMs torn down instead (pool full or gone, reset failed, no room).
    pub destroyed: u64,
    /// Used VMs waiting to be reset or being reset now.
    pub pending: usize,
    /// Microseconds of the most recent recycles (reset of a used VM off the request path),
    /// oldest first.
    pub recent_us: Vec<f64>,
}

struct State {
    pools: HashMap<u64, Pool>,
    /// VMs held outside the pools: live VMs and reservations for VMs being made.
    admitted: usize,
    /// Mappings those VMs cost.
    admitted_mappings: usize,
    max_vms: usize,
    mapping_budget: usize,
    /// File descriptors the builder leaves free.
    fd_reserve: u64,
    /// Used VMs waiting for the builder to reset them.
    recycle_queue: VecDeque<Recycle>,
    recycled: u64,
    recycle_destroyed: u64,
    recycle_us: VecDeque<f64>,
}

impl State {
    fn pooled_vms(&self) -> usize {
        self.pools.values().map(Pool::vms).sum()
    }

    fn pooled_mappings(&self) -> usize {
        self.pools.values().map(|p| p.vms() * p.mappings_each).sum()
    }

    fn vms(&self) -> usize {
        self.admitted + self.pooled_vms()
    }

    fn mappings(&self) -> usize {
        self.admitted_mappings + self.pooled_mappings()
    }

    /// Whether one more shell costing `mappings` fits beside everything else.
    fn shell_fits(&self, mappings: usize) -> bool {
        self.vms() < self.max_vms && self.mappings() + mappings <= self.mapping_budget
    }

    /// The template of a pool that wants one more shell, with room for it.
    fn wanted_shell(&self) -> Option<u64> {
        let now = Instant::now();
        self.pools
            .values()
            .filter(|p| p.vms() < p.target && p.retry_at.is_none_or(|at| at <= now))
            .find(|p| self.shell_fits(p.mappings_each))
            .map(|p| p.template.id())
    }

    /// Pops a warm shell from the pool holding the most (shells give way first).
    fn evict_shell(&mut self) -> Option<Vm> {
        self.pools
            .values_mut()
            .filter(|p| !p.shells.is_empty())
            .max_by_key(|p| p.shells.len() * p.mappings_each)
            .and_then(|p| p.shells.pop())
    }

    /// Makes room for one VM: pops a warm shell (`Some(Some(shell))`, for the caller to tear
    /// down) or, with none left, takes the room of a shell being built or a used VM being
    /// recycled (`Some(None)`), which is then torn down when it finishes. `None` when the pools
    /// hold nothing.
    fn evict_one(&mut self) -> Option<Option<Vm>> {
        if let Some(shell) = self.evict_shell() {
            return Some(Some(shell));
        }
        let pool = self.pools.values_mut().find(|p| p.recycling > 0 || p.building > 0)?;
        if pool.recycling > 0 {
            pool.recycling -= 1;
            pool.doomed_recycles += 1;
        } else {
            pool.building -= 1;
            pool.doomed_builds += 1;
        }
        Some(None)
    }
}

/// Work for the builder thread.
enum Job {
    /// Build a shell for the template's pool instance.
    Build(Arc<Template>, u64),
    /// Reset a used VM into a shell.
    Recycle(Box<Recycle>),
}

/// The pools of all templates, shared by the engine and its builder thread.
pub(crate) struct Pools {
    state: Mutex<State>,
    changed: Condvar,
    busy: AtomicUsize,
    stop: AtomicBool,
    /// Whether recycled VMs may keep a pool above its target while demand is high (off where
    /// someone else accounts for every shell, as a cell's supervisor does for its targets).
    recycle_beyond_target: AtomicBool,
    next_instance: AtomicU64,
    reaper: Arc<Reaper>,
}

/// While alive, the builder builds no shell (a request is being served); it still recycles used
/// VMs.
pub struct BusyGuard<'a>(&'a Pools);

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        if self.0.busy.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.changed.notify_all();
        }
    }
}

/// Room for VMs admitted by [`crate::CloneEngine::reserve`]: held while they are being made and,
/// split into one-VM reservations, for as long as each lives. Dropping it gives the room back.
pub struct Reservation {
    pools: Arc<Pools>,
    vms: usize,
    mappings_each: usize,
    /// Warm shells of the template claimed for this reservation (already counted in `vms`).
    shells: Vec<Vm>,
    template_id: Option<u64>,
}

impl Reservation {
    /// VMs this reservation holds room for.
    pub fn vms(&self) -> usize {
        self.vms
    }

    /// Moves room for one VM into a reservation of its own (`None` if none is left).
    pub fn split_one(&mut self) -> Option<Reservation> {
        if self.vms == 0 {
            return None;
        }
        self.vms -= 1;
        Some(Reservation {
            pools: Arc::clone(&self.pools),
            vms: 1,
            mappings_each: self.mappings_each,
            shells: Vec::new(),
            template_id: self.template_id,
        })
    }

    /// Moves room for up to `vms` VMs (and as many of the claimed shells) into a reservation of
    /// its own.
    pub fn split_off(&mut self, vms: usize) -> Reservation {
        let vms = vms.min(self.vms);
        self.vms -= vms;
        let keep = self.shells.len().saturating_sub(vms);
        Reservation {
            pools: Arc::clone(&self.pools),
            vms,
            mappings_each: self.mappings_each,
            shells: self.shells.split_off(keep),
            template_id: self.template_id,
        }
    }

    /// A claimed warm shell, if one is left.
    pub(crate) fn take_shell(&mut self) -> Option<Vm> {
        self.shells.pop()
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let shells = std::mem::take(&mut self.shells);
        let mut state = self.pools.lock();
        state.admitted -= self.vms;
        state.admitted_mappings -= self.vms * self.mappings_each;
        // Unused claimed shells go back to their pool (they were counted as admitted; as shells
        // they count the same), or are torn down if the pool is gone.
        let mut orphans = Vec::new();
        match self.template_id.and_then(|id| state.pools.get_mut(&id)) {
            Some(pool) => pool.shells.extend(shells),
            None => orphans = shells,
        }
        drop(state);
        for shell in orphans {
            self.pools.reaper.drop_later(shell);
        }
        self.pools.changed.notify_all();
    }
}

impl Pools {
    pub(crate) fn new(reaper: Arc<Reaper>, fd_reserve: u64) -> Self {
        Pools {
            state: Mutex::new(State {
                pools: HashMap::new(),
                admitted: 0,
                admitted_mappings: 0,
                max_vms: usize::MAX,
                mapping_budget: default_mapping_budget(),
                fd_reserve,
                recycle_queue: VecDeque::new(),
                recycled: 0,
                recycle_destroyed: 0,
                recycle_us: VecDeque::new(),
            }),
            changed: Condvar::new(),
            busy: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            recycle_beyond_target: AtomicBool::new(true),
            next_instance: AtomicU64::new(1),
            reaper,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets the VM limit, the mapping budget and the fds the builder leaves free; shells beyond
    /// the new limits are torn down.
    pub(crate) fn set_limits(&self, max_vms: usize, mapping_budget: usize, fd_reserve: u64) {
        let mut state = self.lock();
        state.max_vms = max_vms;
        state.mapping_budget = mapping_budget;
        state.fd_reserve = fd_reserve;
        let mut evicted = Vec::new();
        while state.vms() > state.max_vms || state.mappings() > state.mapping_budget {
            match state.evict_one() {
                Some(shell) => evicted.extend(shell),
                None => break,
            }
        }
        drop(state);
        for shell in evicted {
            self.reaper.drop_later(shell);
        }
    }

    /// Marks a request in progress until the guard drops.
    pub(crate) fn busy(&self) -> BusyGuard<'_> {
        self.busy.fetch_add(1, Ordering::AcqRel);
        BusyGuard(self)
    }

    /// Admits `vms` VMs of `template` (or booted VMs costing `mappings_each` when `None`). Claims
    /// up to `vms` warm shells of the template for them and evicts other shells when the room is
    /// needed; refuses when VMs that are not shells already fill the limit or the budget.
    pub(crate) fn reserve(
        self: &Arc<Self>,
        vms: usize,
        template: Option<&Template>,
        mappings_each: usize,
    ) -> Result<Reservation, AdmitError> {
        let mut state = self.lock();
        if vms > state.max_vms.saturating_sub(state.admitted) {
            return Err(AdmitError::TooManyVms {
                requested: vms,
                held: state.admitted,
                limit: state.max_vms,
            });
        }
        if mappings_each > state.mapping_budget {
            return Err(AdmitError::TooFragmented {
                each: mappings_each,
                budget: state.mapping_budget,
            });
        }
        let needed = vms.saturating_mul(mappings_each);
        let free = state.mapping_budget.saturating_sub(state.admitted_mappings);
        if needed > free {
            return Err(AdmitError::MappingsExhausted {
                requested: vms,
                needed,
                free,
                budget: state.mapping_budget,
            });
        }
        let template_id = template.map(Template::id);
        let shells = match template_id.and_then(|id| state.pools.get_mut(&id)) {
            Some(pool) => {
                pool.note_taken(vms);
                lowest_last(&mut pool.shells, vms);
                let keep = pool.shells.len().saturating_sub(vms);
                pool.shells.split_off(keep)
            }
            None => Vec::new(),
        };
        state.admitted += vms;
        state.admitted_mappings += needed;
        // Shells of other templates (and any left of this one) give way. A shell still being
        // built or a used VM being recycled cannot be stopped; it gives its room away now and
        // is torn down when it finishes.
        let mut evicted = Vec::new();
        while state.vms() > state.max_vms || state.mappings() > state.mapping_budget {
            match state.evict_one() {
                Some(shell) => evicted.extend(shell),
                None => break,
            }
        }
        drop(state);
        for shell in evicted {
            self.reaper.drop_later(shell);
        }
        Ok(Reservation {
            pools: Arc::clone(self),
            vms,
            mappings_each,
            shells,
            template_id,
        })
    }

    /// Points `reservation` at `template`, whose VMs cost `mappings_each`: the difference is
    /// admitted against the mapping budget (shells give way) or refused.
    pub(crate) fn retarget(
        &self,
        reservation: &mut Reservation,
        template: &Template,
        mappings_each: usize,
    ) -> Result<(), AdmitError> {
        let mut state = self.lock();
        if mappings_each > state.mapping_budget {
            return Err(AdmitError::TooFragmented {
                each: mappings_each,
                budget: state.mapping_budget,
            });
        }
        let old = reservation.vms * reservation.mappings_each;
        let new = reservation.vms.saturating_mul(mappings_each);
        let free = state.mapping_budget.saturating_sub(state.admitted_mappings - old);
        if new > free {
            return Err(AdmitError::MappingsExhausted {
                requested: reservation.vms,
                needed: new,
                free,
                budget: state.mapping_budget,
            });
        }
        state.admitted_mappings = state.admitted_mappings - old + new;
        let mut evicted = Vec::new();
        while state.mappings() > state.mapping_budget {
            match state.evict_one() {
                Some(shell) => evicted.extend(shell),
                None => break,
            }
        }
        drop(state);
        for shell in evicted {
            self.reaper.drop_later(shell);
        }
        // Shells claimed for another template cannot serve this one.
        for shell in reservation.shells.drain(..) {
            self.reaper.drop_later(shell);
        }
        reservation.mappings_each = mappings_each;
        reservation.template_id = Some(template.id());
        Ok(())
    }

    /// Tears down up to `count` warm shells (of any template) to free what they hold; returns how
    /// many went.
    pub(crate) fn shed(&self, count: usize) -> usize {
        let mut state = self.lock();
        let mut evicted = Vec::new();
        while evicted.len() < count {
            match state.evict_shell() {
                Some(shell) => evicted.push(shell),
                None => break,
            }
        }
        drop(state);
        let shed = evicted.len();
        for shell in evicted {
            self.reaper.drop_later(shell);
        }
        shed
    }

    /// Tears down the warm shells of `template_id` beyond `keep`; returns how many went.
    pub(crate) fn trim(&self, template_id: u64, keep: usize) -> usize {
        let extra = {
            let mut state = self.lock();
            match state.pools.get_mut(&template_id) {
                Some(pool) if pool.shells.len() > keep => pool.shells.split_off(keep),
                _ => Vec::new(),
            }
        };
        let trimmed = extra.len();
        for shell in extra {
            self.reaper.drop_later(shell);
        }
        trimmed
    }

    /// Takes a warm shell for `template_id`, if one is ready.
    pub(crate) fn take(&self, template_id: u64) -> Option<Vm> {
        let shell = self.lock().pools.get_mut(&template_id).and_then(|p| {
            p.note_taken(1);
            lowest_last(&mut p.shells, 1);
            p.shells.pop()
        });
        if shell.is_some() {
            self.changed.notify_all();
        }
        shell
    }

    /// Keeps `target` shells of `template` warm (0 stops building; shells beyond it are kept).
    pub(crate) fn set_target(&self, template: &Arc<Template>, target: usize) {
        let mut state = self.lock();
        let instance = self.next_instance.fetch_add(1, Ordering::Relaxed);
        let pool = state
            .pools
            .entry(template.id())
            .or_insert_with(|| Pool::new(instance, template));
        pool.target = target;
        pool.failures = 0;
        pool.retry_at = None;
        drop(state);
        self.changed.notify_all();
    }

    /// Forgets `template_id`'s pool and returns its shells.
    pub(crate) fn remove(&self, template_id: u64) -> Vec<Vm> {
        let shells = self
            .lock()
            .pools
            .remove(&template_id)
            .map(|p| p.shells)
            .unwrap_or_default();
        self.changed.notify_all();
        shells
    }

    /// Warm shells of `template_id`.
    pub(crate) fn len(&self, template_id: u64) -> usize {
        self.lock().pools.get(&template_id).map_or(0, |p| p.shells.len())
    }

    /// Every VM counted against the VM limit: admitted (live or being made) and pooled.
    pub(crate) fn held_vms(&self) -> usize {
        self.lock().vms()
    }

    /// Warm shells of all templates, plus shells being built.
    pub(crate) fn pooled_vms(&self) -> usize {
        self.lock().pooled_vms()
    }

    /// The builder's last error for `template_id`, if its last build failed.
    pub(crate) fn last_error(&self, template_id: u64) -> Option<String> {
        self.lock().pools.get(&template_id).and_then(|p| p.last_error.clone())
    }

    /// Waits until `template_id` has `shells` warm shells or `timeout` passes.
    pub(crate) fn wait_for(&self, template_id: u64, shells: usize, timeout: Duration) -> bool {
        self.wait_until(timeout, |state| {
            state.pools.get(&template_id).is_some_and(|p| p.shells.len() >= shells)
        })
    }

    /// Keeps every pool at most at its target when used VMs come back (see
    /// [`crate::clone::CloneEngine::recycle_within_targets`]).
    pub(crate) fn recycle_within_targets(&self) {
        self.recycle_beyond_target.store(false, Ordering::Relaxed);
    }

    /// Stops the builder and returns every shell (and every used VM not yet recycled).
    pub(crate) fn shut_down(&self) -> Vec<Vm> {
        self.stop.store(true, Ordering::Release);
        self.changed.notify_all();
        let mut state = self.lock();
        let queued: Vec<Vm> = state.recycle_queue.drain(..).map(|r| r.vm).collect();
        state.pools.drain().flat_map(|(_, p)| p.shells).chain(queued).collect()
    }

    /// Hands a used VM of `template` back to its pool, to be reset into a shell by the builder.
    /// The room it held moves from `room` (one VM's reservation) to the pool under one lock, so
    /// it is counted exactly once throughout. Refused (the VM comes back as `Some`) when the
    /// template has no pool or its pool already holds as many VMs as it wants.
    pub(crate) fn recycle(&self, template: &Arc<Template>, vm: Vm, room: &mut Reservation) -> Option<Vm> {
        if room.vms == 0 || room.template_id != Some(template.id()) {
            return Some(vm);
        }
        let mut state = self.lock();
        let Some(pool) = state.pools.get_mut(&template.id()) else {
            return Some(vm);
        };
        let beyond = self.recycle_beyond_target.load(Ordering::Relaxed);
        if pool.vms() >= pool.recycle_target(beyond) || room.mappings_each != pool.mappings_each {
            return Some(vm);
        }
        pool.recycling += 1;
        let instance = pool.instance;
        room.vms -= 1;
        state.admitted -= 1;
        state.admitted_mappings -= room.mappings_each;
        state.recycle_queue.push_back(Recycle {
            template: Arc::clone(template),
            instance,
            vm,
        });
        drop(state);
        self.changed.notify_all();
        None
    }

    /// Reset by swap, under one lock: if `template` has a warm shell, it takes the place of the
    /// used VM in `vm` and the used VM takes the shell's place in the pool, to be reset by the
    /// builder (the pool's count never changes). False, with `vm` untouched, when no shell is
    /// ready.
    pub(crate) fn swap(&self, template: &Arc<Template>, vm: &mut Vm) -> bool {
        let mut state = self.lock();
        let Some(pool) = state.pools.get_mut(&template.id()) else {
            return false;
        };
        lowest_last(&mut pool.shells, 1);
        let Some(shell) = pool.shells.pop() else {
            return false;
        };
        pool.note_taken(1);
        pool.recycling += 1;
        let instance = pool.instance;
        let used = std::mem::replace(vm, shell);
        state.recycle_queue.push_back(Recycle {
            template: Arc::clone(template),
            instance,
            vm: used,
        });
        // The builder is not woken here: the caller holds a busy guard, whose drop wakes it
        // once the request is done, so the recycle never preempts the request it came from.
        drop(state);
        true
    }

    /// What became of used VMs handed back so far.
    pub(crate) fn recycle_stats(&self) -> RecycleStats {
        let state = self.lock();
        RecycleStats {
            recycled: state.recycled,
            destroyed: state.recycle_destroyed,
            pending: state.pools.values().map(|p| p.recycling + p.doomed_recycles).sum(),
            recent_us: state.recycle_us.iter().copied().collect(),
        }
    }

    /// Counts a used VM torn down instead of recycled.
    pub(crate) fn note_not_recycled(&self) {
        self.lock().recycle_destroyed += 1;
    }

    /// Waits until no used VM is waiting to be recycled, or `timeout` passes.
    pub(crate) fn wait_recycled(&self, timeout: Duration) -> bool {
        self.wait_until(timeout, |state| {
            state.recycle_queue.is_empty() && state.pools.values().all(|p| p.recycling + p.doomed_recycles == 0)
        })
    }

    /// Waits until `done` holds for the pools' state (checked whenever it changes, and every
    /// [`IDLE_POLL`]) or `timeout` passes; answers whether it held.
    fn wait_until(&self, timeout: Duration, mut done: impl FnMut(&State) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        loop {
            if done(&state) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            state = self
                .changed
                .wait_timeout(state, left.min(IDLE_POLL))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Whether the builder may open another VM's fds and keep `fd_reserve` free. A reserve of 0
    /// turns the check off (a sandboxed cell, bounded by its VM limit, cannot read
    /// `/proc/self/fd`).
    fn fds_allow_a_shell(fd_reserve: u64) -> bool {
        fd_reserve == 0 || crate::host::fd_headroom().is_ok_and(|free| free >= fd_reserve + 2)
    }

    /// The next used VM to recycle (at once, even while requests are in progress: a reset takes
    /// no mm-wide locks), else the next template that wants a shell (and the pool instance it is
    /// for), once no request is in progress and the limits leave room for one more VM.
    fn next_job(&self) -> Option<Job> {
        let mut state = self.lock();
        loop {
            if self.stop.load(Ordering::Acquire) {
                return None;
            }
            if let Some(recycle) = state.recycle_queue.pop_front() {
                return Some(Job::Recycle(Box::new(recycle)));
            }
            if self.busy.load(Ordering::Acquire) == 0 && state.wanted_shell().is_some() {
                // Listing /proc/self/fd takes long with many VMs open: never under the lock,
                // which every clone, reset and delete takes.
                let reserve = state.fd_reserve;
                drop(state);
                let fds_allow = Self::fds_allow_a_shell(reserve);
                state = self.lock();
                let wanted = state.wanted_shell().filter(|_| fds_allow);
                if let Some(pool) = wanted.and_then(|id| state.pools.get_mut(&id)) {
                    if self.busy.load(Ordering::Acquire) == 0 {
                        pool.building += 1;
                        return Some(Job::Build(Arc::clone(&pool.template), pool.instance));
                    }
                }
            }
            state = self
                .changed
                .wait_timeout(state, IDLE_POLL)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// The builder thread's body: builds shells until [`Pools::shut_down`]. Each shell is
    /// restored from the template and has rehearsed its first run (see
    /// [`Vm::rehearse_first_run`]). A build counts against the pool instance it was started for;
    /// a shell whose pool is gone, or for which there is no room any more, is torn down.
    pub(crate) fn build_forever(&self, kvm: &Kvm, pagemap: &PageMap, slots: SlotPolicy) {
        while let Some(job) = self.next_job() {
            let (template, instance) = match job {
                Job::Build(template, instance) => (template, instance),
                Job::Recycle(recycle) => {
                    self.finish_recycle(*recycle, pagemap);
                    continue;
                }
            };
            let built = Vm::restore_with(kvm, template.memory(), template.state(), slots).and_then(|mut vm| {
                vm.rehearse_first_run(template.state(), pagemap)?;
                Ok(vm)
            });
            self.finish_build(&template, instance, built);
        }
    }

    /// Resets a used VM (private pages found by `PAGEMAP_SCAN` dropped, vCPU and clock restored)
    /// and returns it to its pool as a shell; torn down if the reset fails, the pool is gone or
    /// no room is left.
    fn finish_recycle(&self, recycle: Recycle, pagemap: &PageMap) {
        let Recycle {
            template,
            instance,
            mut vm,
        } = recycle;
        let started = Instant::now();
        let reset = vm.reset(template.state(), pagemap);
        let took_us = started.elapsed().as_secs_f64() * 1e6;
        let mut state = self.lock();
        let mut unwanted = None;
        let pool = state.pools.get_mut(&template.id()).filter(|p| p.instance == instance);
        match pool {
            Some(pool) if pool.doomed_recycles > 0 => {
                pool.doomed_recycles -= 1;
                unwanted = Some(vm);
            }
            Some(pool) => {
                pool.recycling -= 1;
                let mappings = pool.mappings_each;
                // The target may have dropped while the VM was being reset: no shell beyond it.
                let beyond = self.recycle_beyond_target.load(Ordering::Relaxed);
                let wanted = pool.shells.len() + pool.building < pool.recycle_target(beyond);
                if reset.is_ok() && wanted && state.shell_fits(mappings) {
                    if let Some(pool) = state.pools.get_mut(&template.id()) {
                        pool.shells.push(vm);
                    }
                } else {
                    unwanted = Some(vm);
                }
            }
            None => unwanted = Some(vm),
        }
        if unwanted.is_some() {
            state.recycle_destroyed += 1;
        } else {
            state.recycled += 1;
            if state.recycle_us.len() == RECYCLE_SAMPLES {
                state.recycle_us.pop_front();
            }
            state.recycle_us.push_back(took_us);
        }
        drop(state);
        if let Some(vm) = unwanted {
            self.reaper.drop_later(vm);
        }
        self.changed.notify_all();
    }

    /// Accounts a finished build to the pool instance it was started for: a shell joins that
    /// pool if it still exists, still wants it (below its target) and there is room; otherwise it
    /// is torn down. A failure backs the
    /// pool off (doubling up to [`RETRY_MAX`]) instead of retrying at once.
    fn finish_build(&self, template: &Template, instance: u64, built: Result<Vm, VmError>) {
        let mut state = self.lock();
        let mut unwanted = None;
        let own = state.pools.get_mut(&template.id()).filter(|p| p.instance == instance);
        match (own, built) {
            (Some(pool), built) if pool.doomed_builds > 0 => {
                pool.doomed_builds -= 1;
                unwanted = built.ok();
            }
            (Some(pool), Ok(vm)) => {
                pool.building -= 1;
                pool.last_error = None;
                pool.failures = 0;
                let mappings = pool.mappings_each;
                // A shell built for a target lowered meanwhile is not wanted any more.
                let wanted = pool.shells.len() < pool.target;
                if wanted && state.shell_fits(mappings) {
                    if let Some(pool) = state.pools.get_mut(&template.id()) {
                        pool.shells.push(vm);
                    }
                } else {
                    unwanted = Some(vm);
                }
            }
            (Some(pool), Err(e)) => {
                pool.building -= 1;
                pool.last_error = Some(e.to_string());
                pool.failures = pool.failures.saturating_add(1);
                let backoff = RETRY_AFTER.saturating_mul(1 << pool.failures.min(6)).min(RETRY_MAX);
                pool.retry_at = Some(Instant::now() + backoff);
            }
            (None, Ok(vm)) => unwanted = Some(vm),
            (None, Err(_)) => {}
        }
        drop(state);
        if let Some(vm) = unwanted {
            self.reaper.drop_later(vm);
        }
        self.changed.notify_all();
    }
}

/// Moves the `n` shells whose RAM lies lowest in the address space to the end of `shells`, where
/// callers take them from. The kernel lists a process's mappings in address order, and smaps
/// (which sharing statistics cross-check against) formats every mapping below the one asked
/// about: a clone taken from the bottom of the address space answers its stats request in
/// ~0.1 ms instead of 1–4 ms with 64 warm shells (docs/benchmarks.md, "CI-like loop"). The
/// addresses themselves stay where mmap put them (ASLR is unchanged). O(len).
fn lowest_last(shells: &mut [Vm], n: usize) {
    let len = shells.len();
    if n == 0 || n >= len {
        return;
    }
    if n == 1 {
        let lowest = (0..len)
            .min_by_key(|&i| shells[i].ram().host_address())
            .unwrap_or(len - 1);
        shells.swap(lowest, len - 1);
    } else {
        shells.select_nth_unstable_by_key(len - n, |vm| std::cmp::Reverse(vm.ram().host_address()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{FrozenMemory, TemplateMemory};
    use crate::vm::VmState;

    /// A template that is never restored: only its id and memory size matter here.
    fn template() -> Arc<Template> {
        let memory = FrozenMemory::new_sealed_with(1 << 20, |_| Ok(())).expect("memfd");
        let state = VmState {
            memory_size: 1 << 20,
            protected_end: 0,
            clock: Default::default(),
            vcpus: Vec::new(),
        };
        Arc::new(Template::new(TemplateMemory::single(memory), state))
    }

    fn pools() -> Arc<Pools> {
        Arc::new(Pools::new(Arc::new(Reaper::start().expect("reaper")), 0))
    }

    #[test]
    fn test_a_build_for_a_removed_pool_never_touches_its_successor() {
        let pools = pools();
        let t = template();
        pools.set_target(&t, 1);
        let Some(Job::Build(job, first)) = pools.next_job() else {
            panic!("the pool wants a shell")
        };
        // The template is retired and warmed again while the build runs: a new pool instance.
        drop(pools.remove(t.id()));
        pools.set_target(&t, 1);
        pools.finish_build(&job, first, Err(VmError::NotAClone));
        let state = pools.lock();
        let pool = state.pools.get(&t.id()).expect("new pool");
        assert_eq!(pool.building, 0, "the old build is not counted against the new pool");
        assert!(pool.last_error.is_none(), "nor is its failure");
        drop(state);
        let Some(Job::Build(_, second)) = pools.next_job() else {
            panic!("the new pool builds its own shell")
        };
        assert_ne!(first, second);
    }

    #[test]
    fn test_reservations_never_exceed_the_vm_limit_and_give_room_back() {
        let pools = pools();
        pools.set_limits(5, usize::MAX, 0);
        let mut first = pools.reserve(3, None, MAPPINGS_PER_VM).expect("3 of 5");
        assert!(matches!(
            pools.reserve(3, None, MAPPINGS_PER_VM),
            Err(AdmitError::TooManyVms { held: 3, limit: 5, .. })
        ));
        let one = first.split_one().expect("one VM's room");
        drop(first);
        let two_more = pools.reserve(4, None, MAPPINGS_PER_VM).expect("1 held, 4 free");
        assert!(pools.reserve(1, None, MAPPINGS_PER_VM).is_err());
        drop((one, two_more));
        pools.reserve(5, None, MAPPINGS_PER_VM).expect("all room is back");
    }

    #[test]
    fn test_a_full_budget_stops_the_builder_and_refuses_clones() {
        let pools = pools();
        let t = template();
        pools.set_limits(100, 10, 0);
        let held = pools.reserve(2, None, MAPPINGS_PER_VM).expect("8 of 10 mappings");
        assert!(matches!(
            pools.reserve(1, Some(&t), MAPPINGS_PER_VM),
            Err(AdmitError::MappingsExhausted { .. })
        ));
        assert!(matches!(
            pools.reserve(1, Some(&t), 11),
            Err(AdmitError::TooFragmented { each: 11, budget: 10 })
        ));
        pools.set_target(&t, 4);
        assert!(
            !pools.lock().shell_fits(MAPPINGS_PER_VM),
            "no shell is built past the budget"
        );
        drop(held);
        assert!(pools.lock().shell_fits(MAPPINGS_PER_VM));
    }
}
