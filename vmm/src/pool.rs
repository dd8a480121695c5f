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

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::kvm::Kvm;
use crate::pagemap::PageMap;
use crate::reaper::Reaper;
use crate::slots::SlotPolicy;
use crate::template::Template;
use crate::vm::Vm;

/// How long the builder waits before retrying after a failed build (e.g. out of fds).
const RETRY_AFTER: Duration = Duration::from_millis(100);
/// How often an idle builder looks again (it is also woken explicitly).
const IDLE_POLL: Duration = Duration::from_millis(20);

struct Pool {
    template: Arc<Template>,
    shells: Vec<Vm>,
    target: usize,
    building: usize,
    last_error: Option<String>,
}

/// The pools of all templates, shared by the engine and its builder thread.
pub(crate) struct Pools {
    pools: Mutex<HashMap<u64, Pool>>,
    changed: Condvar,
    busy: AtomicUsize,
    stop: AtomicBool,
}

/// While alive, the builder stays idle (a request is being served).
pub(crate) struct BusyGuard<'a>(&'a Pools);

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        if self.0.busy.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.changed.notify_all();
        }
    }
}

impl Pools {
    pub(crate) fn new() -> Self {
        Pools {
            pools: Mutex::new(HashMap::new()),
            changed: Condvar::new(),
            busy: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Pool>> {
        self.pools.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks a request in progress until the guard drops.
    pub(crate) fn busy(&self) -> BusyGuard<'_> {
        self.busy.fetch_add(1, Ordering::AcqRel);
        BusyGuard(self)
    }

    /// Takes a warm shell for `template_id`, if one is ready.
    pub(crate) fn take(&self, template_id: u64) -> Option<Vm> {
        let shell = self.lock().get_mut(&template_id).and_then(|p| p.shells.pop());
        if shell.is_some() {
            self.changed.notify_all();
        }
        shell
    }

    /// Keeps `target` shells of `template` warm (0 stops building; shells beyond it are kept).
    pub(crate) fn set_target(&self, template: &Arc<Template>, target: usize) {
        let mut pools = self.lock();
        let pool = pools.entry(template.id()).or_insert_with(|| Pool {
            template: Arc::clone(template),
            shells: Vec::new(),
            target: 0,
            building: 0,
            last_error: None,
        });
        pool.target = target;
        drop(pools);
        self.changed.notify_all();
    }

    /// Forgets `template_id`'s pool and returns its shells.
    pub(crate) fn remove(&self, template_id: u64) -> Vec<Vm> {
        let shells = self.lock().remove(&template_id).map(|p| p.shells).unwrap_or_default();
        self.changed.notify_all();
        shells
    }

    /// Warm shells of `template_id`.
    pub(crate) fn len(&self, template_id: u64) -> usize {
        self.lock().get(&template_id).map_or(0, |p| p.shells.len())
    }

    /// The builder's last error for `template_id`, if its last build failed.
    pub(crate) fn last_error(&self, template_id: u64) -> Option<String> {
        self.lock().get(&template_id).and_then(|p| p.last_error.clone())
    }

    /// Waits until `template_id` has `shells` warm shells or `timeout` passes.
    pub(crate) fn wait_for(&self, template_id: u64, shells: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut pools = self.lock();
        loop {
            if pools.get(&template_id).is_some_and(|p| p.shells.len() >= shells) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            pools = self
                .changed
                .wait_timeout(pools, left.min(IDLE_POLL))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Stops the builder and returns every shell.
    pub(crate) fn shut_down(&self) -> Vec<Vm> {
        self.stop.store(true, Ordering::Release);
        self.changed.notify_all();
        self.lock().drain().flat_map(|(_, p)| p.shells).collect()
    }

    /// The next template that wants a shell, once no request is in progress.
    fn next_job(&self) -> Option<Arc<Template>> {
        let mut pools = self.lock();
        loop {
            if self.stop.load(Ordering::Acquire) {
                return None;
            }
            if self.busy.load(Ordering::Acquire) == 0 {
                let wanted = pools.values_mut().find(|p| p.shells.len() + p.building < p.target);
                if let Some(pool) = wanted {
                    pool.building += 1;
                    return Some(Arc::clone(&pool.template));
                }
            }
            pools = self
                .changed
                .wait_timeout(pools, IDLE_POLL)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// The builder thread's body: builds shells until [`Pools::shut_down`]. Each shell is
    /// restored from the template and has rehearsed its first run (see
    /// [`Vm::rehearse_first_run`]).
    pub(crate) fn build_forever(&self, kvm: &Kvm, reaper: &Reaper, pagemap: &PageMap, slots: SlotPolicy) {
        while let Some(template) = self.next_job() {
            let built = Vm::restore_with(kvm, template.memory(), template.state(), slots).and_then(|mut vm| {
                vm.rehearse_first_run(template.state(), pagemap)?;
                Ok(vm)
            });
            let mut pools = self.lock();
            let failed = built.is_err();
            match (pools.get_mut(&template.id()), built) {
                (Some(pool), Ok(vm)) => {
                    pool.building -= 1;
                    pool.last_error = None;
                    pool.shells.push(vm);
                }
                (Some(pool), Err(e)) => {
                    pool.building -= 1;
                    pool.last_error = Some(e.to_string());
                }
                (None, Ok(vm)) => reaper.drop_later(vm),
                (None, Err(_)) => {}
            }
            drop(pools);
            self.changed.notify_all();
            if failed {
                std::thread::sleep(RETRY_AFTER);
            }
        }
    }
}
