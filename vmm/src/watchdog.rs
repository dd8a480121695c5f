//! Deadlines for `KVM_RUN`: a POSIX timer aimed at the vCPU's thread sends a real-time signal
//! whose no-op handler makes `KVM_RUN` return `EINTR`. The timer repeats until disarmed, so a
//! signal that lands just before the thread enters the guest is followed by another.

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

fn current_tid() -> libc::pid_t {
    // SAFETY: gettid has no arguments and cannot fail.
    unsafe { libc::gettid() }
}

/// A timer that interrupts `KVM_RUN` on the thread that created it.
pub(crate) struct RunTimer {
    timer: libc::timer_t,
    tid: libc::pid_t,
}

// SAFETY: a timer id is a plain kernel handle; it may be armed or deleted from any thread.
unsafe impl Send for RunTimer {}

impl RunTimer {
    /// A timer aimed at the calling thread.
    pub(crate) fn for_current_thread() -> io::Result<Self> {
        install_handler()?;
        let tid = current_tid();
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
        Ok(RunTimer { timer, tid })
    }

    /// Whether the timer signals the calling thread.
    pub(crate) fn is_for_current_thread(&self) -> bool {
        self.tid == current_tid()
    }

    /// Fires after `after`, then every few milliseconds until [`RunTimer::disarm`].
    pub(crate) fn arm(&self, after: Duration) -> io::Result<()> {
        self.set(after.max(Duration::from_nanos(1)), REPEAT)
    }

    /// Stops the timer.
    pub(crate) fn disarm(&self) -> io::Result<()> {
        self.set(Duration::ZERO, Duration::ZERO)
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
        // SAFETY: `self.timer` is a live timer id; `new` is valid for the call.
        if unsafe { libc::timer_settime(self.timer, 0, &new, std::ptr::null_mut()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for RunTimer {
    fn drop(&mut self) {
        // SAFETY: the timer id is live and deleted only here, once.
        unsafe { libc::timer_delete(self.timer) };
    }
}
