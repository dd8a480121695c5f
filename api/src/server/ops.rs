//! Running service operations off the async workers: every VM operation takes the VM's machine
//! lock on a blocking thread, under the request timeout, and a guest that stops for a reason
//! other than finishing (fault, deadline) marks the VM failed.
//!
//! An operation that creates something commits through a [`Commit`]: once the client has been
//! answered 503 `timeout`, the commit is refused and the operation tears down what it made, so a
//! timed-out request leaves nothing behind; once committed, the answer waits for the result.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use super::app::{App, Machine, VmEntry};
use super::error::ServiceError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Running,
    Committed,
    Abandoned,
}

/// Whether an operation's result may still be kept, shared by the operation and its request.
#[derive(Clone)]
pub struct Commit {
    phase: Arc<Mutex<Phase>>,
    abandoned: Arc<AtomicBool>,
}

impl Commit {
    fn new() -> Self {
        Commit {
            phase: Arc::new(Mutex::new(Phase::Running)),
            abandoned: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Keeps the result: true unless the request already answered 503 `timeout` (then the
    /// caller must tear down whatever it made).
    pub fn commit(&self) -> bool {
        let mut phase = self.phase.lock().unwrap_or_else(|e| e.into_inner());
        if *phase == Phase::Running {
            *phase = Phase::Committed;
        }
        *phase == Phase::Committed
    }

    /// Whether the request has given up (work not yet done can be skipped).
    pub fn abandoned(&self) -> bool {
        self.abandoned.load(Ordering::Acquire)
    }

    /// Gives up unless the operation has committed; true if it gave up.
    fn abandon(&self) -> bool {
        let mut phase = self.phase.lock().unwrap_or_else(|e| e.into_inner());
        if *phase == Phase::Running {
            *phase = Phase::Abandoned;
            self.abandoned.store(true, Ordering::Release);
        }
        *phase == Phase::Abandoned
    }
}

/// The 503 a timed-out request answers.
pub fn timeout_error(app: &App) -> ServiceError {
    ServiceError::Timeout(format!(
        "the request did not finish within {} ms; nothing was created",
        app.limits.request_timeout.as_millis()
    ))
}

/// Runs `f` on a blocking thread; past the request timeout the caller gets a 503 (the operation
/// itself is bounded by the guest deadline and finishes on its own). For operations that create
/// nothing; see [`transaction`] for those that do.
pub async fn blocking<T: Send + 'static>(
    app: &Arc<App>,
    f: impl FnOnce() -> Result<T, ServiceError> + Send + 'static,
) -> Result<T, ServiceError> {
    transaction(app, move |_| f()).await
}

/// Runs `f` on a blocking thread with a [`Commit`]. Past the request timeout, an operation that
/// has not committed is abandoned and the caller gets a 503 `timeout` (the operation sees the
/// refused commit and undoes its work); one that has committed is waited for.
pub async fn transaction<T: Send + 'static>(
    app: &Arc<App>,
    f: impl FnOnce(&Commit) -> Result<T, ServiceError> + Send + 'static,
) -> Result<T, ServiceError> {
    let limit = app.limits.request_timeout;
    let commit = Commit::new();
    let theirs = commit.clone();
    let mut task = tokio::task::spawn_blocking(move || f(&theirs));
    let joined = match tokio::time::timeout(limit, &mut task).await {
        Ok(joined) => joined,
        Err(_) if commit.abandon() => return Err(timeout_error(app)),
        Err(_) => task.await,
    };
    match joined {
        Err(join) => Err(ServiceError::internal(format!("the operation panicked: {join}"))),
        Ok(result) => result,
    }
}

/// Runs `op` on VM `id`'s machine (404 if unknown, 409 if it has failed).
pub async fn on_vm<T: Send + 'static>(
    app: &Arc<App>,
    id: &str,
    op: impl FnOnce(&App, &VmEntry, &mut Machine, &Commit) -> Result<T, ServiceError> + Send + 'static,
) -> Result<T, ServiceError> {
    let entry = app.vm(id)?;
    if let Some(reason) = entry.failure() {
        return Err(ServiceError::VmFailed(format!("VM {id} has failed: {reason}")));
    }
    let service = Arc::clone(app);
    transaction(app, move |commit| {
        let mut guard = entry.lock_machine();
        let machine = guard.as_mut().ok_or_else(|| ServiceError::not_found("VM", &entry.id))?;
        let result = op(&service, &entry, machine, commit);
        if let Err(ServiceError::VmFailed(message)) = &result {
            entry.fail(message.clone());
            service
                .metrics
                .vms_failed
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        result
    })
    .await
}

/// Tears a VM's machine down in the background and gives back the room it held at once (a
/// client that deleted a VM may create another straight away). A clone that has not failed is
/// recycled instead when its template's pool wants it: reset in the background and kept as a
/// warm shell, its room moving to the pool.
pub fn destroy(app: &App, entry: &VmEntry) {
    if let Some((machine, room)) = entry.take_machine() {
        match machine {
            Machine::Booted(vm) => app.engine.destroy_vm(vm),
            Machine::Clone(clone) if entry.failure().is_none() => {
                app.engine.recycle(clone, room);
                return;
            }
            Machine::Clone(clone) => app.engine.destroy(clone),
        }
        drop(room);
    }
}
