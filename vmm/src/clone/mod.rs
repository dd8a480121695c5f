//! The clone engine: N clones of a template in one call, each its own KVM VM on a private
//! mapping of the template, with a unique identity; reset in place; live fork; teardown off the
//! hot path.

pub mod pool;
pub(crate) mod reaper;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::kvm::Kvm;
use crate::memory::MemoryError;
use crate::pagemap::PageMap;
use crate::percentile::micros_since;
use crate::pool::{AdmitError, Pools, RecycleStats, Reservation};
use crate::reaper::Reaper;
use crate::slots::SlotPolicy;
use crate::template::Template;
use crate::vm::{ResetSteps, Vm, VmError};

/// File descriptors the shell builder leaves free by default (twice what the API keeps for
/// requests, so that requests can still make VMs when shells have taken what they may).
pub const DEFAULT_SHELL_FD_RESERVE: u64 = 128;

/// Generation ids are unique in the process: every clone start and every reset takes a new one.
static NEXT_GENERATION: AtomicU64 = AtomicU64::new(1);

/// Makes every later generation id at least `floor`. The server seeds it from its state
/// directory, so generation ids stay unique across restarts.
pub fn reserve_generations(floor: u64) {
    NEXT_GENERATION.fetch_max(floor, Ordering::Relaxed);
}

/// Limits and deadlines of a [`CloneEngine`].
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// How long a clone's first run may take before the clone counts as failed.
    pub first_run_deadline: Duration,
    /// Most clones one call may ask for.
    pub max_clones_per_call: usize,
    /// How clones and warm shells register their RAM with KVM (by default lazy where KVM
    /// allocates reverse maps up front, see [`SlotPolicy::for_host`]; eager for comparison).
    pub slot_policy: SlotPolicy,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            first_run_deadline: Duration::from_secs(5),
            max_clones_per_call: 10_000,
            slot_policy: SlotPolicy::for_host(),
        }
    }
}

/// Errors of the engine itself (per-clone failures are reported in [`CloneBatch::failed`]).
#[derive(Debug, thiserror::Error)]
pub enum CloneError {
    /// More clones than one call may make.
    #[error("{requested} clones requested; one call may make at most {limit}")]
    TooMany {
        /// Clones asked for.
        requested: usize,
        /// The limit.
        limit: usize,
    },
    /// Starting a background thread failed.
    #[error("cannot start the engine's background threads: {0}")]
    Thread(std::io::Error),
    /// A VM operation failed.
    #[error(transparent)]
    Vm(#[from] VmError),
}

/// A running clone of a template.
pub struct Clone {
    id: u64,
    generation: u64,
    seed: u64,
    spawn_us: f64,
    pooled: bool,
    template: Arc<Template>,
    vm: Vm,
}

impl Clone {
    /// Engine-unique id, stable across resets.
    pub fn id(&self) -> u64 {
        self.id
    }
    /// Generation id handed to the guest (in r14) at its last start or reset.
    pub fn generation(&self) -> u64 {
        self.generation
    }
    /// Random seed handed to the guest (in r15) at its last start or reset.
    pub fn seed(&self) -> u64 {
        self.seed
    }
    /// Microseconds from the start of this clone's spawn to its first guest exit.
    pub fn spawn_us(&self) -> f64 {
        self.spawn_us
    }
    /// Whether the clone came from a warm shell (else it was built on the request path).
    pub fn pooled(&self) -> bool {
        self.pooled
    }
    /// The template it was cloned from.
    pub fn template(&self) -> &Arc<Template> {
        &self.template
    }
    /// The VM.
    pub fn vm(&self) -> &Vm {
        &self.vm
    }
    /// The VM, mutably (to run commands).
    pub fn vm_mut(&mut self) -> &mut Vm {
        &mut self.vm
    }
}

/// One clone that could not be made (it crosses the cell protocol as it is).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloneFailure {
    /// Its position in the request (0-based).
    pub index: usize,
    /// Why.
    pub reason: String,
    /// The template's guest stopped (faulted, halted, or ran past the deadline) on the clone's
    /// first run: a fault of the template, which a retry would meet again.
    pub guest_stopped: bool,
}

/// The result of a clone call: every clone that exists, and why the others do not.
pub struct CloneBatch {
    /// Clones made, in request order.
    pub clones: Vec<Clone>,
    /// Clones not made.
    pub failed: Vec<CloneFailure>,
    /// Microseconds for the whole call.
    pub total_us: f64,
}

/// What a reset did (it crosses the cell protocol as it is).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResetReport {
    /// Microseconds for the reset.
    pub reset_us: f64,
    /// Private pages dropped.
    pub pages_dropped: u64,
    /// Where the time went.
    pub steps: ResetSteps,
    /// The clone's new generation id.
    pub generation: u64,
    /// The clone's new seed.
    pub seed: u64,
    /// Whether the clone was given a warm shell of its template (its used VM is recycled in the
    /// background; `pages_dropped` is then 0 and `steps` covers only the swap) rather than
    /// reset in place.
    pub swapped: bool,
}

/// The result of a live fork.
pub struct LiveFork {
    /// The template the running VM was frozen into.
    pub template: Arc<Template>,
    /// How long the VM was paused (capture and freeze).
    pub pause_us: f64,
    /// The clones made from it.
    pub batch: CloneBatch,
}

/// Makes, resets and destroys clones; keeps warm shells; tears down in the background.
pub struct CloneEngine {
    kvm: Arc<Kvm>,
    config: EngineConfig,
    pools: Arc<Pools>,
    reaper: Arc<Reaper>,
    builder: Option<JoinHandle<()>>,
    pagemap: PageMap,
    next_clone: AtomicU64,
}

fn fresh_seed() -> Result<u64, VmError> {
    getrandom::u64().map_err(|e| VmError::Entropy(e.to_string()))
}

impl CloneEngine {
    /// Starts an engine (a shell builder thread and a reaper thread).
    pub fn new(kvm: Arc<Kvm>, config: EngineConfig) -> Result<Self, CloneError> {
        crate::host::tune_allocator_for_many_vms();
        let pagemap = PageMap::open().map_err(|e| CloneError::Vm(MemoryError::PageMap(e).into()))?;
        let reaper = Arc::new(Reaper::start().map_err(CloneError::Thread)?);
        let pools = Arc::new(Pools::new(Arc::clone(&reaper), DEFAULT_SHELL_FD_RESERVE));
        let slot_policy = config.slot_policy;
        let builder = {
            let (kvm, pools) = (Arc::clone(&kvm), Arc::clone(&pools));
            std::thread::Builder::new()
                .name("cowvm-shell-builder".into())
                .spawn(move || match PageMap::open() {
                    Ok(pagemap) => pools.build_forever(&kvm, &pagemap, slot_policy),
                    Err(e) => eprintln!("cowvm: shell builder cannot open /proc/self/pagemap: {e}"),
                })
                .map_err(CloneError::Thread)?
        };
        Ok(CloneEngine {
            kvm,
            config,
            pools,
            reaper,
            builder: Some(builder),
            pagemap,
            next_clone: AtomicU64::new(1),
        })
    }

    /// The KVM device.
    pub fn kvm(&self) -> &Arc<Kvm> {
        &self.kvm
    }

    /// The engine's limits.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Sets the limits shells and reservations share: at most `max_vms` VMs (reserved, live and
    /// warm shells together), at most `mapping_budget` memory mappings for them, and the builder
    /// builds only while more than `shell_fd_reserve` file descriptors are free. Shells beyond the
    /// new limits are torn down.
    pub fn set_limits(&self, max_vms: usize, mapping_budget: usize, shell_fd_reserve: u64) {
        self.pools.set_limits(max_vms, mapping_budget, shell_fd_reserve);
    }

    /// Admits `count` VMs of `template` (booted VMs when `None`) before they are made: the room
    /// is taken under one lock with the warm pools, so concurrent callers can never exceed the
    /// limits together. Warm shells give way first: up to `count` shells of `template` are claimed
    /// for the reservation, other shells are torn down as needed. Refuses when VMs that are not
    /// shells already fill the VM limit or the mapping budget.
    pub fn reserve(&self, count: usize, template: Option<&Template>) -> Result<Reservation, AdmitError> {
        let each = template.map_or(crate::pool::MAPPINGS_PER_VM, crate::pool::mappings_per_clone);
        self.pools.reserve(count, template, each)
    }

    /// Admits `count` VMs that live outside this process (e.g. in cell processes): they count
    /// against the VM limit like local VMs but cost no mappings here. Warm shells give way.
    pub fn reserve_remote(&self, count: usize) -> Result<Reservation, AdmitError> {
        self.pools.reserve(count, None, 0)
    }

    /// Makes `reservation` hold room for clones of `template` (e.g. one just frozen by a live
    /// fork): re-checks the mapping budget for what one clone of it costs.
    pub fn retarget(&self, reservation: &mut Reservation, template: &Template) -> Result<(), AdmitError> {
        self.pools
            .retarget(reservation, template, crate::pool::mappings_per_clone(template))
    }

    /// Tears down up to `count` warm shells to free the fds and mappings they hold (waits until
    /// they are gone); returns how many went.
    pub fn shed_shells(&self, count: usize) -> usize {
        let shed = self.pools.shed(count);
        if shed > 0 {
            self.reaper.flush();
        }
        shed
    }

    /// Every VM counted against the VM limit now: reserved, live, warm shells, shells being built
    /// and used VMs being recycled.
    pub fn held_vms(&self) -> usize {
        self.pools.held_vms()
    }

    /// Keeps the shell builder from building shells until the guard drops (used VMs are still
    /// recycled): what every request does while it runs; tests use it to hold the pools still.
    pub fn pause_building(&self) -> crate::pool::BusyGuard<'_> {
        self.pools.busy()
    }

    /// Warm shells of every template, plus the one being built (they count as VMs).
    pub fn pooled_vms(&self) -> usize {
        self.pools.pooled_vms()
    }

    /// Keeps `shells` warm shells of `template` ready (built in the background).
    pub fn keep_warm(&self, template: &Arc<Template>, shells: usize) {
        self.pools.set_target(template, shells);
    }

    /// Tears down the ready warm shells of `template` beyond `keep` (e.g. after lowering its
    /// target); returns how many went.
    pub fn trim_shells(&self, template: &Template, keep: usize) -> usize {
        self.pools.trim(template.id(), keep)
    }

    /// Warm shells of `template` ready now.
    pub fn warm_shells(&self, template: &Template) -> usize {
        self.pools.len(template.id())
    }

    /// Waits until `template` has `shells` warm shells; false on timeout (see
    /// [`CloneEngine::pool_error`] for why).
    pub fn wait_for_shells(&self, template: &Template, shells: usize, timeout: Duration) -> bool {
        self.pools.wait_for(template.id(), shells, timeout)
    }

    /// Why the last shell build for `template` failed, if it did.
    pub fn pool_error(&self, template: &Template) -> Option<String> {
        self.pools.last_error(template.id())
    }

    /// Stops keeping shells for `template` and tears down the ones it has.
    pub fn retire(&self, template: &Template) {
        for shell in self.pools.remove(template.id()) {
            self.reaper.drop_later(shell);
        }
    }

    /// Makes `count` clones of `template`. Each takes a warm shell if one is ready (else builds a
    /// VM on the spot), gets a fresh generation id and OS-random seed in r14/r15, and runs to its
    /// first exit. If a clone fails, the ones made so far are returned and the rest are reported
    /// with the reason; nothing half-built remains.
    pub fn spawn(&self, template: &Arc<Template>, count: usize) -> Result<CloneBatch, CloneError> {
        self.spawn_batch(template, count, &mut || None, &|| false)
    }

    /// Makes up to `reservation.vms()` clones of `template` within the room `reservation` holds
    /// (see [`CloneEngine::reserve`]), taking the shells it claimed first. Stops early, reporting
    /// the rest as not attempted, once `stop` answers true (the caller gave up).
    pub fn spawn_reserved(
        &self,
        template: &Arc<Template>,
        reservation: &mut Reservation,
        stop: &dyn Fn() -> bool,
    ) -> Result<CloneBatch, CloneError> {
        let count = reservation.vms();
        self.spawn_batch(template, count, &mut || reservation.take_shell(), stop)
    }

    /// The clone loop of [`CloneEngine::spawn`] and [`CloneEngine::spawn_reserved`]: each clone
    /// starts from `take_shell()` (else a pooled or new VM); after the first failure, or once
    /// `stop` answers true, the rest are reported as not attempted.
    fn spawn_batch(
        &self,
        template: &Arc<Template>,
        count: usize,
        take_shell: &mut dyn FnMut() -> Option<Vm>,
        stop: &dyn Fn() -> bool,
    ) -> Result<CloneBatch, CloneError> {
        if count > self.config.max_clones_per_call {
            return Err(CloneError::TooMany {
                requested: count,
                limit: self.config.max_clones_per_call,
            });
        }
        let started = Instant::now();
        let _busy = self.pools.busy();
        let mut clones = Vec::with_capacity(count);
        let mut failed = Vec::new();
        for index in 0..count {
            let made = if stop() {
                Err(("not attempted: the request was abandoned".to_owned(), false))
            } else {
                self.spawn_one_from(template, take_shell())
                    .map_err(|e| (e.to_string(), matches!(e, VmError::GuestStopped(_))))
            };
            match made {
                Ok(clone) => clones.push(clone),
                Err((reason, guest_stopped)) => {
                    failed.extend((index..count).map(|i| CloneFailure {
                        index: i,
                        reason: if i == index {
                            reason.clone()
                        } else {
                            format!("not attempted after clone {index} failed: {reason}")
                        },
                        guest_stopped,
                    }));
                    break;
                }
            }
        }
        Ok(CloneBatch {
            clones,
            failed,
            total_us: micros_since(started),
        })
    }

    fn spawn_one_from(&self, template: &Arc<Template>, shell: Option<Vm>) -> Result<Clone, VmError> {
        let started = Instant::now();
        let mut clone = self.spawn_idle_from(template, shell)?;
        match clone.vm.run(Some(self.config.first_run_deadline)) {
            Ok(exit) if !exit.is_fault() => {
                clone.spawn_us = micros_since(started);
                Ok(clone)
            }
            Ok(exit) => {
                self.reaper.drop_later(clone.vm);
                Err(VmError::GuestStopped(exit))
            }
            Err(e) => {
                self.reaper.drop_later(clone.vm);
                Err(e)
            }
        }
    }

    /// Takes a warm shell of `template` (or builds a VM on the spot) and gives it a fresh
    /// generation id, seed and clock, like [`CloneEngine::spawn`], but does not run it: the
    /// caller stages the clone's work first (see [`crate::call`]). `spawn_us` covers only this.
    pub fn spawn_idle(&self, template: &Arc<Template>) -> Result<Clone, VmError> {
        self.spawn_idle_from(template, None)
    }

    /// Like [`CloneEngine::spawn_idle`], within the room `reservation` holds (see
    /// [`CloneEngine::reserve`]): takes the shell it claimed first.
    pub fn spawn_idle_reserved(
        &self,
        template: &Arc<Template>,
        reservation: &mut Reservation,
    ) -> Result<Clone, VmError> {
        let shell = reservation.take_shell();
        self.spawn_idle_from(template, shell)
    }

    fn spawn_idle_from(&self, template: &Arc<Template>, shell: Option<Vm>) -> Result<Clone, VmError> {
        let started = Instant::now();
        let (mut vm, pooled) = match shell.or_else(|| self.pools.take(template.id())) {
            Some(shell) => (shell, true),
            None => (
                Vm::restore_with(&self.kvm, template.memory(), template.state(), self.config.slot_policy)?,
                false,
            ),
        };
        let generation = NEXT_GENERATION.fetch_add(1, Ordering::Relaxed);
        let staged = fresh_seed().and_then(|seed| {
            // The clock starts when the clone is taken, not when its shell was built.
            vm.start_clocks(template.state())?;
            vm.set_identity(generation, seed)?;
            Ok(seed)
        });
        let seed = match staged {
            Ok(seed) => seed,
            Err(e) => {
                self.reaper.drop_later(vm);
                return Err(e);
            }
        };
        Ok(Clone {
            id: self.next_clone.fetch_add(1, Ordering::Relaxed),
            generation,
            seed,
            spawn_us: micros_since(started),
            pooled,
            template: Arc::clone(template),
            vm,
        })
    }

    /// Keeps the shell builder idle until the guard drops (a request is being served).
    pub(crate) fn busy(&self) -> crate::pool::BusyGuard<'_> {
        self.pools.busy()
    }

    /// Returns `clone` to its template's state in place: drops its private pages, restores the
    /// vCPU and clock, and hands it a new generation id and seed for its next resume.
    pub fn reset(&self, clone: &mut Clone) -> Result<ResetReport, VmError> {
        let started = Instant::now();
        let _busy = self.pools.busy();
        let steps = clone.vm.reset(clone.template.state(), &self.pagemap)?;
        let generation = NEXT_GENERATION.fetch_add(1, Ordering::Relaxed);
        let seed = fresh_seed()?;
        clone.vm.set_identity(generation, seed)?;
        clone.generation = generation;
        clone.seed = seed;
        Ok(ResetReport {
            reset_us: micros_since(started),
            pages_dropped: steps.pages_dropped,
            steps,
            generation,
            seed,
            swapped: false,
        })
    }

    /// Whether `clone`'s VM can go back to its template's pool: its RAM still maps exactly the
    /// template's memory (a snapshot of a clone remaps it onto the new layer).
    fn recyclable(clone: &Clone) -> bool {
        clone
            .vm
            .ram()
            .template()
            .is_some_and(|memory| memory.same_as(clone.template.memory()))
    }

    /// Returns `clone` to its template's state by swap: it gets a warm shell of its template
    /// (same id, new generation id, seed and clock) and its used VM is reset into a shell in the
    /// background. Resets in place (see [`CloneEngine::reset`]) when no shell is ready.
    pub fn reset_by_swap(&self, clone: &mut Clone) -> Result<ResetReport, VmError> {
        if !Self::recyclable(clone) {
            return self.reset(clone);
        }
        let started = Instant::now();
        let _busy = self.pools.busy();
        let template = Arc::clone(&clone.template);
        let generation = NEXT_GENERATION.fetch_add(1, Ordering::Relaxed);
        let seed = fresh_seed()?;
        if !self.pools.swap(&template, &mut clone.vm) {
            return self.reset(clone);
        }
        // The clock starts when the shell is taken, as for a new clone.
        clone.vm.start_clocks(template.state())?;
        clone.vm.set_identity(generation, seed)?;
        clone.generation = generation;
        clone.seed = seed;
        let reset_us = micros_since(started);
        Ok(ResetReport {
            reset_us,
            pages_dropped: 0,
            steps: ResetSteps {
                pages_dropped: 0,
                runs: 0,
                scan_us: 0.0,
                discard_us: 0.0,
                restore_us: reset_us,
            },
            generation,
            seed,
            swapped: true,
        })
    }

    /// Hands a clone that is done with back to the engine: its VM is reset in the background
    /// and returns to its template's warm pool as a shell when the pool wants it (up to its
    /// target, or the recent clone rate if higher); otherwise it is torn down. `room` is the
    /// reservation the clone held; the room moves to the pool with the VM (or is given back).
    /// Returns whether the VM is being recycled.
    pub fn recycle(&self, clone: Clone, room: Option<Reservation>) -> bool {
        match room {
            Some(mut room) if Self::recyclable(&clone) => {
                let Clone { template, vm, .. } = clone;
                match self.pools.recycle(&template, vm, &mut room) {
                    None => true,
                    Some(vm) => {
                        self.pools.note_not_recycled();
                        self.reaper.drop_later(vm);
                        false
                    }
                }
            }
            room => {
                self.pools.note_not_recycled();
                self.reaper.drop_later(clone);
                drop(room);
                false
            }
        }
    }

    /// Recycles used VMs only up to each pool's target, never beyond it on recent demand: for
    /// an engine whose every shell someone else accounts for by its targets (a cell: its
    /// supervisor holds room under `--max-vms` for exactly the targets).
    pub fn recycle_within_targets(&self) {
        self.pools.recycle_within_targets();
    }

    /// What became of used VMs handed back ([`CloneEngine::recycle`], reset by swap).
    pub fn recycle_stats(&self) -> RecycleStats {
        self.pools.recycle_stats()
    }

    /// Waits until every used VM handed back so far has been recycled or torn down; false on
    /// timeout.
    pub fn wait_recycled(&self, timeout: Duration) -> bool {
        self.pools.wait_recycled(timeout)
    }

    /// Clones a running VM: pauses it just long enough to capture its state and freeze its RAM
    /// (no copy for RAM it owns; only its private pages for a clone), then makes `count` clones
    /// of the resulting template. The VM continues afterwards, independent of its clones.
    pub fn live_fork(&self, vm: &mut Vm, count: usize) -> Result<LiveFork, CloneError> {
        if count > self.config.max_clones_per_call {
            return Err(CloneError::TooMany {
                requested: count,
                limit: self.config.max_clones_per_call,
            });
        }
        let started = Instant::now();
        let template = Arc::new(Template::freeze(&self.kvm, vm)?);
        let pause_us = micros_since(started);
        let batch = self.spawn(&template, count)?;
        Ok(LiveFork {
            template,
            pause_us,
            batch,
        })
    }

    /// Tears `clone` down on the background thread.
    pub fn destroy(&self, clone: Clone) {
        self.reaper.drop_later(clone);
    }

    /// A fresh id from the sequence clone ids come from, for a VM the engine did not make (e.g.
    /// one a cell booted), so that it never equals a clone's id.
    pub fn new_vm_id(&self) -> u64 {
        self.next_clone.fetch_add(1, Ordering::Relaxed)
    }

    /// Tears `vm` down on the background thread.
    pub fn destroy_vm(&self, vm: Vm) {
        self.reaper.drop_later(vm);
    }

    /// Drops `item` on the background thread, after everything sent before it (e.g. a VM together
    /// with its [`Reservation`], in that order, so the room is given back once the VM is gone).
    pub fn drop_later<T: Send + 'static>(&self, item: T) {
        self.reaper.drop_later(item);
    }

    /// Returns once every teardown requested so far has finished.
    pub fn flush(&self) {
        self.reaper.flush();
    }

    /// The process's `/proc/self/pagemap`, shared by resets (and probes).
    pub fn pagemap(&self) -> &PageMap {
        &self.pagemap
    }
}

impl Drop for CloneEngine {
    fn drop(&mut self) {
        let shells = self.pools.shut_down();
        if let Some(builder) = self.builder.take() {
            let _ = builder.join();
        }
        for shell in shells.into_iter().chain(self.pools.shut_down()) {
            self.reaper.drop_later(shell);
        }
        self.reaper.flush();
    }
}
