//! The `fork()` baseline the spawn benchmark compares clones with.

use std::io;
use std::time::{Duration, Instant};

/// Times `fork()` of this process until the child, which exits at once, has been reaped.
pub fn time_fork_to_child_exit() -> io::Result<Duration> {
    let started = Instant::now();
    // SAFETY: the child calls only the async-signal-safe `_exit`, so forking a multi-threaded
    // process is sound; the parent reaps it below.
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => Err(io::Error::last_os_error()),
        // SAFETY: `_exit` never returns and touches no state of the (copied) parent.
        0 => unsafe { libc::_exit(0) },
        child => {
            let mut status = 0;
            // SAFETY: waits for our own child; `status` is a valid out-pointer.
            if unsafe { libc::waitpid(child, &mut status, 0) } != child {
                return Err(io::Error::last_os_error());
            }
            Ok(started.elapsed())
        }
    }
}
