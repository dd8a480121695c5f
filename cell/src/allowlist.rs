//! What a cell may do once sandboxed: the system calls, and for `ioctl` the request numbers.
//! Found by running the cell tests under `strace -f` and keeping what the cell called after
//! installing its filter (plus the signal return a `KVM_RUN` deadline needs, and allocator calls
//! glibc makes when it grows an arena); see docs/security.md.

use std::mem::size_of;

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid2, kvm_debugregs, kvm_fpu, kvm_mp_state, kvm_msrs, kvm_regs, kvm_sregs,
    kvm_userspace_memory_region, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};

/// System calls allowed without conditions.
pub const SYSCALLS: &[i64] = &[
    // The socket to the supervisor.
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    // Guest RAM mappings (clones map template memfds; reset drops private pages) and the heap.
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_mremap,
    libc::SYS_brk,
    // Template memfds arriving: seals (fcntl F_GET_SEALS) and size (statx).
    libc::SYS_fcntl,
    // SEEK_DATA/SEEK_HOLE: a template memfd's data runs, found when it is received.
    libc::SYS_lseek,
    // After a failed MAP_FIXED: is the range still mapped (fixed_map.rs)?
    libc::SYS_msync,
    // The pagemap fallback of kernels without PAGEMAP_SCAN (reset, layered freeze).
    libc::SYS_pread64,
    libc::SYS_statx,
    libc::SYS_close,
    // Error messages on stderr.
    libc::SYS_write,
    // The engine's threads (shell builder, reaper) and their queues.
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_exit,
    libc::SYS_exit_group,
    // A thread created before the filter may first run after it (TSYNC covers it): glibc's and
    // std's thread start-up (found when a loaded host delayed the reaper thread: SIGSYS on rseq).
    libc::SYS_rseq,
    libc::SYS_set_robust_list,
    // ... and sched_getaffinity, which the reaper thread calls as it starts (audit log of the
    // cell tests under load: SIGSYS, syscall 204, comm "cowvm-reaper").
    libc::SYS_sched_getaffinity,
    // The shell builder sleeps before retrying a failed build.
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    // A wait interrupted by SIGSTOP/SIGCONT resumes through restart_syscall (found by the
    // stopped-cell test: SIGSYS on the first request after SIGCONT).
    libc::SYS_restart_syscall,
    // Deadlines of KVM_RUN: a per-thread POSIX timer and a real-time signal.
    libc::SYS_timer_create,
    libc::SYS_timer_settime,
    libc::SYS_timer_delete,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_gettid,
    libc::SYS_getpid,
    // Clocks (vDSO fallback) and fresh seeds for clones.
    libc::SYS_clock_gettime,
    libc::SYS_getrandom,
    // Freezing a VM into a template (worker/freeze.rs): its private pages are copied into a
    // new memfd, which is sized, written and then sealed with fcntl (above) before anything
    // maps it (audit log of the freeze tests: SIGSYS on syscalls 319, 77, 18 in turn).
    libc::SYS_memfd_create,
    libc::SYS_ftruncate,
    libc::SYS_pwrite64,
];

const IOC_NONE: u64 = 0;
const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;
const KVMIO: u64 = 0xAE;

const fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (KVMIO << 8) | nr
}
const fn io(nr: u64) -> u64 {
    ioc(IOC_NONE, nr, 0)
}
const fn ior(nr: u64, size: usize) -> u64 {
    ioc(IOC_READ, nr, size)
}
const fn iow(nr: u64, size: usize) -> u64 {
    ioc(IOC_WRITE, nr, size)
}
const fn iowr(nr: u64, size: usize) -> u64 {
    ioc(IOC_READ | IOC_WRITE, nr, size)
}

/// `prctl` options allowed: naming a thread (std does it as a thread starts).
pub const PRCTLS: &[u64] = &[libc::PR_SET_NAME as u64];

/// `PAGEMAP_SCAN` on `/proc/self/pagemap` (finding the pages a reset drops).
pub const PAGEMAP_SCAN: u64 = 0xc060_6610;

/// `ioctl` requests allowed: the KVM calls of making, running, resetting and measuring VMs.
pub const IOCTLS: &[(&str, u64)] = &[
    ("KVM_CHECK_EXTENSION", io(0x03)),
    ("KVM_GET_VCPU_MMAP_SIZE", io(0x04)),
    ("KVM_CREATE_VM", io(0x01)),
    ("KVM_CREATE_VCPU", io(0x41)),
    ("KVM_RUN", io(0x80)),
    ("KVM_GET_STATS_FD", io(0xce)),
    (
        "KVM_SET_USER_MEMORY_REGION",
        iow(0x46, size_of::<kvm_userspace_memory_region>()),
    ),
    ("KVM_GET_REGS", ior(0x81, size_of::<kvm_regs>())),
    ("KVM_SET_REGS", iow(0x82, size_of::<kvm_regs>())),
    ("KVM_GET_SREGS", ior(0x83, size_of::<kvm_sregs>())),
    ("KVM_SET_SREGS", iow(0x84, size_of::<kvm_sregs>())),
    ("KVM_GET_MSRS", iowr(0x88, size_of::<kvm_msrs>())),
    ("KVM_SET_MSRS", iow(0x89, size_of::<kvm_msrs>())),
    ("KVM_GET_FPU", ior(0x8c, size_of::<kvm_fpu>())),
    ("KVM_SET_FPU", iow(0x8d, size_of::<kvm_fpu>())),
    ("KVM_SET_CPUID2", iow(0x90, size_of::<kvm_cpuid2>())),
    ("KVM_GET_CPUID2", iowr(0x91, size_of::<kvm_cpuid2>())),
    ("KVM_GET_MP_STATE", ior(0x98, size_of::<kvm_mp_state>())),
    ("KVM_SET_MP_STATE", iow(0x99, size_of::<kvm_mp_state>())),
    ("KVM_SET_CLOCK", iow(0x7b, size_of::<kvm_clock_data>())),
    ("KVM_GET_CLOCK", ior(0x7c, size_of::<kvm_clock_data>())),
    ("KVM_GET_VCPU_EVENTS", ior(0x9f, size_of::<kvm_vcpu_events>())),
    ("KVM_SET_VCPU_EVENTS", iow(0xa0, size_of::<kvm_vcpu_events>())),
    ("KVM_GET_DEBUGREGS", ior(0xa1, size_of::<kvm_debugregs>())),
    ("KVM_SET_DEBUGREGS", iow(0xa2, size_of::<kvm_debugregs>())),
    ("KVM_GET_XSAVE", ior(0xa4, size_of::<kvm_xsave>())),
    ("KVM_SET_XSAVE", iow(0xa5, size_of::<kvm_xsave>())),
    ("KVM_GET_XCRS", ior(0xa6, size_of::<kvm_xcrs>())),
    ("KVM_SET_XCRS", iow(0xa7, size_of::<kvm_xcrs>())),
    ("PAGEMAP_SCAN", PAGEMAP_SCAN),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_system_calls_the_vmm_makes_after_the_filter_are_allowed() {
        // Each of these is made by vmm code a cell runs under the filter: SEEK_DATA on a template
        // received (memory.rs), msync after a failed MAP_FIXED (fixed_map.rs), pread64 of the
        // pagemap fallback (pagemap.rs), memfd_create/ftruncate/pwrite64 of a layered freeze
        // (memory.rs). A missing one kills the cell with SIGSYS.
        for call in [
            libc::SYS_lseek,
            libc::SYS_msync,
            libc::SYS_pread64,
            libc::SYS_memfd_create,
            libc::SYS_ftruncate,
            libc::SYS_pwrite64,
        ] {
            assert!(SYSCALLS.contains(&call), "system call {call} is not allowed");
        }
    }

    #[test]
    fn test_computed_kvm_request_numbers_match_the_kernel_headers() {
        // Values from <linux/kvm.h> as compiled on x86-64 (cf. strace's decoding).
        let find = |name: &str| IOCTLS.iter().find(|(n, _)| *n == name).map(|(_, v)| *v);
        assert_eq!(find("KVM_RUN"), Some(0xae80));
        assert_eq!(find("KVM_CREATE_VM"), Some(0xae01));
        assert_eq!(find("KVM_SET_USER_MEMORY_REGION"), Some(0x4020_ae46));
        assert_eq!(find("KVM_SET_REGS"), Some(0x4090_ae82));
        assert_eq!(find("KVM_SET_SREGS"), Some(0x4138_ae84));
        assert_eq!(find("KVM_SET_MSRS"), Some(0x4008_ae89));
        assert_eq!(find("KVM_SET_CPUID2"), Some(0x4008_ae90));
        assert_eq!(find("KVM_SET_XSAVE"), Some(0x5000_aea5));
    }
}
