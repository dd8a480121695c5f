//! The cell's sandbox: `no_new_privs`, an unprivileged uid/gid when started as root, and a
//! seccomp-bpf allowlist (built with `seccompiler`, as Firecracker does) that kills the process
//! on any other system call. Entered once the cell holds the KVM device and before it runs a guest.

use std::collections::BTreeMap;
use std::io;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule, TargetArch,
};

use crate::allowlist;

/// The unprivileged user cells switch to when the supervisor runs as root (`nobody`).
pub const NOBODY: (u32, u32) = (65534, 65534);

/// Errors entering the sandbox.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// A privilege call failed.
    #[error("{op} failed: {source}")]
    Privileges {
        /// The call.
        op: &'static str,
        /// The error.
        source: io::Error,
    },
    /// The filter could not be built or installed.
    #[error("seccomp filter: {0}")]
    Seccomp(#[from] seccompiler::Error),
    /// The filter could not be compiled.
    #[error("seccomp filter: {0}")]
    Backend(#[from] seccompiler::BackendError),
}

fn check(op: &'static str, rc: libc::c_int) -> Result<(), SandboxError> {
    if rc == 0 {
        Ok(())
    } else {
        Err(SandboxError::Privileges {
            op,
            source: io::Error::last_os_error(),
        })
    }
}

/// Sets `no_new_privs`: no exec can gain privileges again, and seccomp may be installed unprivileged.
pub fn set_no_new_privs() -> Result<(), SandboxError> {
    // SAFETY: prctl with integer arguments; no memory is passed.
    check("prctl(PR_SET_NO_NEW_PRIVS)", unsafe {
        libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    })
}

/// When running as root: drops supplementary groups and switches real, effective and saved
/// ids to `uid`/`gid` (glibc applies it to every thread). Keeps the process dumpable so that it
/// can still open its own `/proc/self` files. Returns the uid the process runs as afterwards.
pub fn drop_privileges(uid: u32, gid: u32) -> Result<u32, SandboxError> {
    // SAFETY: geteuid has no arguments and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        // SAFETY: as above.
        return Ok(unsafe { libc::getuid() });
    }
    // SAFETY: an empty group list (null pointer with length 0) is valid.
    check("setgroups", unsafe { libc::setgroups(0, std::ptr::null()) })?;
    // SAFETY: integer arguments only.
    check("setresgid", unsafe { libc::setresgid(gid, gid, gid) })?;
    // SAFETY: integer arguments only.
    check("setresuid", unsafe { libc::setresuid(uid, uid, uid) })?;
    // SAFETY: integer arguments only.
    check("prctl(PR_SET_DUMPABLE)", unsafe {
        libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0)
    })?;
    // SAFETY: getuid has no arguments and cannot fail.
    Ok(unsafe { libc::getuid() })
}

/// The cell's filter: [`allowlist::SYSCALLS`], `ioctl` only with a request number in
/// [`allowlist::IOCTLS`] and `prctl` only with an option in [`allowlist::PRCTLS`]; anything else kills the whole process (`SIGSYS`).
pub fn cell_filter() -> Result<BpfProgram, SandboxError> {
    let ioctl = allowlist::IOCTLS
        .iter()
        .map(|&(_, request)| {
            SeccompRule::new(vec![SeccompCondition::new(
                1,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::Eq,
                request,
            )?])
        })
        .collect::<Result<Vec<_>, _>>()?;
    let prctl = allowlist::PRCTLS
        .iter()
        .map(|&option| {
            SeccompRule::new(vec![SeccompCondition::new(
                0,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::Eq,
                option,
            )?])
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut rules = unconditional(allowlist::SYSCALLS);
    rules.insert(libc::SYS_ioctl, ioctl);
    rules.insert(libc::SYS_prctl, prctl);
    // Threads (the vCPUs of a VM booted in the cell run to their first exit at once), never
    // processes: `clone` only with CLONE_THREAD. `clone3` passes its flags in memory, out of
    // seccomp's sight: this filter lets it through to [`clone3_fallback_filter`], which answers
    // ENOSYS, and glibc then creates the thread with `clone`.
    let thread = SeccompCondition::new(
        0,
        SeccompCmpArgLen::Qword,
        SeccompCmpOp::MaskedEq(libc::CLONE_THREAD as u64),
        libc::CLONE_THREAD as u64,
    )?;
    rules.insert(libc::SYS_clone, vec![SeccompRule::new(vec![thread])?]);
    rules.insert(libc::SYS_clone3, Vec::new());
    // Opening files is answered EACCES by [`no_files_filter`] rather than killing the cell:
    // glibc opens files lazily on paths the cell cannot avoid (found by schemathesis: booting an
    // 8-vCPU VM killed its cell with SIGSYS on `openat` from a vCPU thread) and copes with the
    // error; the cell itself opens nothing once sandboxed.
    for nr in FILE_OPENS {
        rules.insert(*nr, Vec::new());
    }
    compile(rules)
}

/// The system calls that open files.
const FILE_OPENS: &[i64] = &[libc::SYS_open, libc::SYS_openat, libc::SYS_openat2];

/// The filter installed before [`cell_filter`]: every file open fails with EACCES (the cell
/// filter lets them through to this one). (Of two filters the kernel takes the stricter answer:
/// ERRNO over ALLOW.)
pub fn no_files_filter() -> Result<BpfProgram, SandboxError> {
    let filter = SeccompFilter::new(
        unconditional(FILE_OPENS),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EACCES as u32),
        TargetArch::x86_64,
    )?;
    Ok(filter.try_into()?)
}

/// The filter installed before [`cell_filter`]: `clone3` fails with ENOSYS (so that glibc
/// falls back to `clone`, whose flags the cell filter checks); everything else is left to the
/// cell filter. (Of two filters the kernel takes the stricter answer: ERRNO over ALLOW.)
pub fn clone3_fallback_filter() -> Result<BpfProgram, SandboxError> {
    let filter = SeccompFilter::new(
        BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        TargetArch::x86_64,
    )?;
    Ok(filter.try_into()?)
}

/// A filter allowing exactly `syscalls`; any other call kills the whole process (`SIGSYS`).
pub fn filter(syscalls: &[i64]) -> Result<BpfProgram, SandboxError> {
    compile(unconditional(syscalls))
}

fn unconditional(syscalls: &[i64]) -> BTreeMap<i64, Vec<SeccompRule>> {
    syscalls.iter().map(|&nr| (nr, Vec::new())).collect()
}

fn compile(rules: BTreeMap<i64, Vec<SeccompRule>>) -> Result<BpfProgram, SandboxError> {
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )?;
    Ok(filter.try_into()?)
}

/// Installs `program` on every thread of the process (`SECCOMP_FILTER_FLAG_TSYNC`); sets
/// `no_new_privs` first.
pub fn install(program: &BpfProgram) -> Result<(), SandboxError> {
    set_no_new_privs()?;
    seccompiler::apply_filter_all_threads(program)?;
    Ok(())
}

/// What `/proc/<pid>/status` says about a process's confinement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Confinement {
    /// `Seccomp:` 0 none, 1 strict, 2 filter.
    pub seccomp: u32,
    /// `NoNewPrivs:`.
    pub no_new_privs: bool,
    /// Real uid (first field of `Uid:`).
    pub uid: u32,
    /// Real gid (first field of `Gid:`).
    pub gid: u32,
}

/// Reads the confinement of process `pid` from `/proc/<pid>/status`.
pub fn confinement(pid: u32) -> io::Result<Confinement> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse::<u32>().ok())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("/proc/{pid}/status lacks {name}")))
    };
    Ok(Confinement {
        seccomp: field("Seccomp:")?,
        no_new_privs: field("NoNewPrivs:")? == 1,
        uid: field("Uid:")?,
        gid: field("Gid:")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Forks a child that installs `program` and then makes `getppid` (or not); returns how it
    /// ended as (signal, exit code).
    fn child_status(program: &BpfProgram, call_getppid: bool) -> (Option<i32>, Option<i32>) {
        // SAFETY: the child only makes raw system calls (no allocation, no locks) and leaves with
        // _exit, so forking a multi-threaded test process is sound.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed: {}", io::Error::last_os_error());
        if pid == 0 {
            // SAFETY: prctl with integer arguments.
            if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
                // SAFETY: _exit never returns.
                unsafe { libc::_exit(90) };
            }
            if seccompiler::apply_filter(program).is_err() {
                // SAFETY: _exit never returns.
                unsafe { libc::_exit(91) };
            }
            if call_getppid {
                // SAFETY: getppid has no arguments.
                unsafe { libc::syscall(libc::SYS_getppid) };
            }
            // SAFETY: _exit never returns.
            unsafe { libc::_exit(0) };
        }
        let mut status = 0;
        // SAFETY: waits for our own child; `status` is valid output storage.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        (
            libc::WIFSIGNALED(status).then(|| libc::WTERMSIG(status)),
            libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status)),
        )
    }

    #[test]
    fn test_syscall_outside_the_allowlist_kills_the_process_with_sigsys() {
        assert!(!allowlist::SYSCALLS.contains(&libc::SYS_getppid));
        let program = filter(allowlist::SYSCALLS).expect("build the filter");
        assert_eq!(child_status(&program, true), (Some(libc::SIGSYS), None));
    }

    #[test]
    fn test_process_making_only_allowed_syscalls_exits_normally_under_the_filter() {
        let program = cell_filter().expect("build the filter");
        assert_eq!(child_status(&program, false), (None, Some(0)));
    }

    #[test]
    fn test_cell_filter_kills_a_syscall_outside_its_list() {
        let program = cell_filter().expect("build the filter");
        assert_eq!(child_status(&program, true), (Some(libc::SIGSYS), None));
    }

    #[test]
    fn test_cell_filters_allow_threads_but_no_process_turn_clone3_into_enosys_and_file_opens_into_eacces() {
        let fallback = clone3_fallback_filter().expect("build the clone3 filter");
        let no_files = no_files_filter().expect("build the no-files filter");
        let cell = cell_filter().expect("build the filter");
        // (signal, exit code) of a child that installs both filters, as a cell does, then makes
        // clone3 (must fail with ENOSYS, exit 0) and, if `fork`, a fork-like clone.
        let run = |fork: bool| {
            // SAFETY: the child only makes raw system calls and leaves with _exit.
            let pid = unsafe { libc::fork() };
            assert!(pid >= 0, "fork failed: {}", io::Error::last_os_error());
            if pid == 0 {
                // SAFETY: prctl with integer arguments; _exit never returns.
                unsafe {
                    if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                        libc::_exit(90);
                    }
                }
                if seccompiler::apply_filter(&fallback).is_err()
                    || seccompiler::apply_filter(&no_files).is_err()
                    || seccompiler::apply_filter(&cell).is_err()
                {
                    // SAFETY: _exit never returns.
                    unsafe { libc::_exit(91) };
                }
                // SAFETY: clone3 with a null argument: refused before it is read.
                let rc = unsafe { libc::syscall(libc::SYS_clone3, std::ptr::null::<u8>(), 0usize) };
                let errno = io::Error::last_os_error().raw_os_error();
                if rc != -1 || errno != Some(libc::ENOSYS) {
                    // SAFETY: _exit never returns.
                    unsafe { libc::_exit(92) };
                }
                // Opening a file fails with EACCES, and the process lives on.
                // SAFETY: openat with a NUL-terminated path literal.
                let fd = unsafe { libc::openat(libc::AT_FDCWD, c"/etc/hostname".as_ptr(), libc::O_RDONLY) };
                let errno = io::Error::last_os_error().raw_os_error();
                if fd != -1 || errno != Some(libc::EACCES) {
                    // SAFETY: _exit never returns.
                    unsafe { libc::_exit(93) };
                }
                if fork {
                    // SAFETY: a fork-like clone (no CLONE_VM); the filter kills before it runs.
                    unsafe {
                        libc::syscall(
                            libc::SYS_clone,
                            libc::SIGCHLD as libc::c_ulong,
                            0usize,
                            0usize,
                            0usize,
                            0usize,
                        )
                    };
                }
                // SAFETY: _exit never returns.
                unsafe { libc::_exit(0) };
            }
            let mut status = 0;
            // SAFETY: waits for our own child; `status` is valid output storage.
            assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
            (
                libc::WIFSIGNALED(status).then(|| libc::WTERMSIG(status)),
                libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status)),
            )
        };
        assert_eq!(
            run(false),
            (None, Some(0)),
            "clone3 must fail with ENOSYS and openat with EACCES under the filters"
        );
        assert_eq!(
            run(true),
            (Some(libc::SIGSYS), None),
            "a clone without CLONE_THREAD must be killed"
        );
    }

    #[test]
    fn test_confinement_of_this_process_reads_its_uid() {
        let me = confinement(std::process::id()).expect("read /proc/self/status");
        // SAFETY: getuid cannot fail.
        assert_eq!(me.uid, unsafe { libc::getuid() });
    }
}
