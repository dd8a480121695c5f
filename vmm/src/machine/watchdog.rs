//! Deadlines for `KVM_RUN`: a POSIX timer aimed at the running thread sends a real-time signal
//! whose no-op handler makes `KVM_RUN` return `EINTR`. The timer repeats until disarmed, so a
//! signal that lands just before the thread enters the guest is followed by another. There is one
//! timer per thread, created on first use, so arming a deadline costs two `timer_settime` calls.

use std::cell::RefCell;
use std::io;
use std::sync::Once;
use std::time::Duration;

use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

/// How often the timer fires again after the deadline until the run loop notices.
const REPEAT: Duration = Duration::from_millis(5);

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

fn install_handler() -> io::Result<()> {
    static INSTALL: Once = Once::new();
    let mut result = Ok(());
    INSTALL.call_once(|| {
        result = register_signal_handler(kick_signal(), on_kick).map_err(|e| io::Error::from_raw_os_error(e.errno()));
    });
    result
}

/// The calling thread's id, for [`kick`].
pub(crate) fn thread_id() -> libc::pid_t {
    // SAFETY: gettid has no arguments and cannot fail.
    unsafe { libc::gettid() }
}

/// Sends the kick signal to thread `tid` of this process, so that a `KVM_RUN` it is in returns
/// `EINTR`. A signal that lands just before the thread enters the guest is lost: callers repeat
/// the kick until the thread has stopped.
pub(crate) fn kick(tid: libc::pid_t) -> io::Result<()> {
    install_handler()?;
    // SAFETY: tgkill takes plain integers; a thread that has already exited makes it fail with
    // ESRCH, which is harmless here.
    let sent = unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, kick_signal()) };
    if sent != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A timer that signals the thread that created it.
struct ThreadTimer(libc::timer_t);

impl ThreadTimer {
    fn new() -> io::Result<Self> {
        install_handler()?;
        // SAFETY: gettid has no arguments and cannot fail.
        let tid = unsafe { libc::gettid() };
        // SAFETY: an all-zero sigevent is valid; the fields we need are set below.
        let mut event: libc::sigevent = unsafe { std::mem::zeroed() };
        event.sigev_notify = libc::SIGEV_THREAD_ID;
        event.sigev_signo = kick_signal();
        event.sigev_notify_thread_id = tid;
        let mut timer: libc::timer_t = std::ptr::null_mut();
        // SAFETY: `event` and `timer` are valid for the call; the kernel writes the new id to `timer`.
        if unsafe { libc::timer_create(libc::CLOCK_MONOTONIC, &mut event, &mut timer) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(ThreadTimer(timer))
    }

    fn set(&self, value: Duration, interval: Duration) -> io::Result<()> {
        let spec = |d: Duration| libc::timespec {
            tv_sec: d.as_secs() as libc::time_t,
            tv_nsec: d.subsec_nanos() as libc::c_long,
        };
        let new = libc::itimerspec {
            it_interval: spec(interval),
            it_value: spec(value),
        };
        // SAFETY: `self.0` is a live timer id; `new` is valid for the call.
        if unsafe { libc::timer_settime(self.0, 0, &new, std::ptr::null_mut()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for ThreadTimer {
    fn drop(&mut self) {
        // SAFETY: the timer id is live and deleted only here, once (at thread exit).
        unsafe { libc::timer_delete(self.0) };
    }
}

thread_local! {
    static TIMER: RefCell<Option<ThreadTimer>> = const { RefCell::new(None) };
}

/// While alive, the calling thread gets a signal once `limit` has passed (and every few
/// milliseconds after). Disarms on drop.
pub(crate) struct Deadline(());

impl Deadline {
    /// Arms the calling thread's timer.
    pub(crate) fn arm(limit: Duration) -> io::Result<Self> {
        TIMER.with(|cell| {
            let mut timer = cell.borrow_mut();
            if timer.is_none() {
                *timer = Some(ThreadTimer::new()?);
            }
            match timer.as_ref() {
                Some(t) => t.set(limit.max(Duration::from_nanos(1)), REPEAT),
                None => Err(io::Error::other("thread timer missing")),
            }
        })?;
        Ok(Deadline(()))
    }
}

impl Drop for Deadline {
    fn drop(&mut self) {
        TIMER.with(|cell| {
            if let Some(timer) = cell.borrow().as_ref() {
                let _ = timer.set(Duration::ZERO, Duration::ZERO);
            }
        });
    }
}
