//! The supervisor's handle on one cell: starts the process with its end of a socketpair on
//! [`crate::worker::CELL_FD`], sends typed requests and waits for their answers with a timeout,
//! and notices the cell's death at once (a reader thread sees the socket close, then reaps the
//! process through its pidfd and fails every pending request with [`CellError::Died`]).

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use cowvm_vmm::clone::CloneFailure;
use cowvm_vmm::kvm_stats::{KvmStats, StatsFile};
use cowvm_vmm::probe::{ProbeTargets, WRITE_DEADLINE};
use cowvm_vmm::translate::GuestTranslation;
use cowvm_vmm::{CommandOutput, FrozenMemory, GuestCommand, ResetReport, Template};

pub use crate::error::{CellError, ExitStatus};
use crate::protocol::ProbeWritten;
pub use crate::protocol::{BootFailure, BootVm, BootedVm, CallDone, CallFailure, FrozenBooted};
use crate::protocol::{
    CellCounts, CellVmId, Envelope, Frozen, Init, LoadTemplate, Request, Response, SandboxConfig, SpawnedVm,
    TemplateId, WarmCount, WireCommand,
};
use crate::sandbox::{self, Confinement};
use crate::wire::{self, WireError};
use crate::worker::CELL_FD;

/// KVM's statistics files of one VM in a cell and of each of its vCPUs, readable by the
/// supervisor.
pub struct VmStatsFiles {
    vm: StatsFile,
    vcpus: Vec<StatsFile>,
}

impl VmStatsFiles {
    /// Reads every statistic now (the same shape as an in-process VM's: one entry per vCPU).
    pub fn read(&self) -> std::io::Result<KvmStats> {
        Ok(KvmStats {
            vm: self.vm.read()?,
            vcpus: self.vcpus.iter().map(StatsFile::read).collect::<Result<_, _>>()?,
        })
    }

    /// vCPUs whose statistics [`VmStatsFiles::read`] returns.
    pub fn vcpus(&self) -> usize {
        self.vcpus.len()
    }
}

/// What a cell answered to a spawn.
#[derive(Debug, Clone)]
pub struct Spawned {
    /// Clones made, in request order.
    pub clones: Vec<SpawnedVm>,
    /// Positions not made.
    pub failed: Vec<CloneFailure>,
    /// The warm-shell targets the cell keeps afterwards.
    pub warm: Vec<WarmCount>,
}

/// How to start cells and talk to them.
#[derive(Debug, Clone)]
pub struct CellConfig {
    /// The program (e.g. the `cowvm` binary).
    pub program: PathBuf,
    /// Its arguments (e.g. `["cell"]`).
    pub args: Vec<OsString>,
    /// The sandbox each cell enters.
    pub sandbox: SandboxConfig,
    /// Most VMs (clones plus warm shells) one cell holds.
    pub vms_per_cell: u32,
    /// Most memory mappings one cell's VMs may cost (`None`: the cell's own
    /// `vm.max_map_count` less what the process keeps for itself).
    pub mapping_budget: Option<u64>,
    /// Timeout of requests that do not scale with a count.
    pub request_timeout: Duration,
    /// Extra time a spawn or warm-up may take per VM.
    pub per_vm_timeout: Duration,
    /// Where each new cell's block of generation ids comes from.
    pub generations: GenerationBlocks,
}

/// Hands out the first generation id of each new cell's block (`block << 32`), so that the
/// ids of different cells never collide. By default the blocks come from a counter in this
/// process; a server with a state directory takes them from its persisted counters, so that they
/// never repeat across restarts either.
#[derive(Clone)]
pub struct GenerationBlocks(Arc<dyn Fn() -> Result<u64, String> + Send + Sync>);

/// Blocks handed out by [`GenerationBlocks::in_process`] (block 0 stays with the process itself).
static NEXT_BLOCK: AtomicU64 = AtomicU64::new(1);

impl GenerationBlocks {
    /// Blocks 1, 2, 3, ... of this process.
    pub fn in_process() -> Self {
        GenerationBlocks(Arc::new(|| {
            Ok(NEXT_BLOCK.fetch_add(1, Ordering::Relaxed) << cowvm_vmm::persist::counters::GENERATION_BLOCK_SHIFT)
        }))
    }

    /// Blocks from `next`, which returns the first generation id of a new block or why not.
    pub fn from_fn(next: impl Fn() -> Result<u64, String> + Send + Sync + 'static) -> Self {
        GenerationBlocks(Arc::new(next))
    }

    /// The first generation id of a new block.
    pub fn next(&self) -> Result<u64, String> {
        (self.0)()
    }
}

impl std::fmt::Debug for GenerationBlocks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GenerationBlocks")
    }
}

impl CellConfig {
    /// Cells started as `<this executable> cell`, sandboxed (nobody when root), [`crate::DEFAULT_VMS_PER_CELL`] VMs each.
    pub fn current_exe() -> std::io::Result<Self> {
        Ok(CellConfig {
            program: std::env::current_exe()?,
            args: vec!["cell".into()],
            sandbox: SandboxConfig {
                drop_to: Some(sandbox::NOBODY),
                seccomp: true,
            },
            vms_per_cell: crate::DEFAULT_VMS_PER_CELL,
            mapping_budget: None,
            request_timeout: Duration::from_secs(30),
            per_vm_timeout: Duration::from_millis(50),
            generations: GenerationBlocks::in_process(),
        })
    }
}

/// Whether a cell is serving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// Serving.
    Alive,
    /// Gone.
    Dead(ExitStatus),
}

/// An answer and the descriptors that came with it.
type Answer = (Response, Vec<OwnedFd>);

struct Shared {
    pid: u32,
    pidfd: OwnedFd,
    pending: Mutex<HashMap<u64, Sender<Answer>>>,
    state: Mutex<Liveness>,
    died: Condvar,
}

impl Shared {
    fn lock_pending(&self) -> MutexGuard<'_, HashMap<u64, Sender<Answer>>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn liveness(&self) -> Liveness {
        *self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running cell.
pub struct Cell {
    shared: Arc<Shared>,
    socket: Arc<OwnedFd>,
    send_lock: Mutex<()>,
    next_id: AtomicU64,
    config: CellConfig,
    uid: u32,
    reader: Option<JoinHandle<()>>,
}

fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the descriptor was just created and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Waits for the process behind `pidfd` to end and collects its status (reaps it).
fn reap(pidfd: BorrowedFd<'_>) -> ExitStatus {
    // SAFETY: an all-zero siginfo_t is valid output storage for waitid.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: waitid writes into `info`; P_PIDFD with a pidfd we own.
        let rc = unsafe { libc::waitid(libc::P_PIDFD, pidfd.as_raw_fd() as libc::id_t, &mut info, libc::WEXITED) };
        if rc == 0 {
            break;
        }
        if std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return ExitStatus::Unknown;
        }
    }
    // SAFETY: waitid succeeded, so `si_status` of the child's siginfo is filled.
    let status = unsafe { info.si_status() };
    match info.si_code {
        libc::CLD_EXITED => ExitStatus::Exited(status),
        libc::CLD_KILLED | libc::CLD_DUMPED => ExitStatus::Killed(status),
        _ => ExitStatus::Unknown,
    }
}

impl Cell {
    /// Starts a cell, hands it `kvm` (an open `/dev/kvm`) and waits until it has entered its
    /// sandbox.
    pub fn start(config: &CellConfig, kvm: &File) -> Result<Cell, CellError> {
        let (ours, theirs) = wire::socketpair().map_err(|source| CellError::Start {
            program: config.program.display().to_string(),
            source,
        })?;
        let child_fd = theirs.as_raw_fd();
        let mut command = Command::new(&config.program);
        command.args(&config.args).stdin(Stdio::null());
        // SAFETY: the closure runs in the child between fork and exec and only calls
        // async-signal-safe functions (prctl, dup2, fcntl, close_range) on descriptors that exist in the child.
        unsafe {
            command.pre_exec(move || {
                // A cell never outlives its supervisor.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if child_fd == CELL_FD {
                    let flags = libc::fcntl(CELL_FD, libc::F_GETFD);
                    if flags < 0 || libc::fcntl(CELL_FD, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                } else if libc::dup2(child_fd, CELL_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // Nothing else of the supervisor's reaches the cell, whatever its fd flags.
                if libc::syscall(libc::SYS_close_range, CELL_FD as u32 + 1, u32::MAX, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().map_err(|source| CellError::Start {
            program: config.program.display().to_string(),
            source,
        })?;
        drop(theirs);
        let pid = child.id();
        // The child is reaped only through its pidfd, by the reader thread.
        drop(child);
        let pidfd = pidfd_open(pid).map_err(|source| CellError::Start {
            program: config.program.display().to_string(),
            source,
        })?;
        let shared = Arc::new(Shared {
            pid,
            pidfd,
            pending: Mutex::new(HashMap::new()),
            state: Mutex::new(Liveness::Alive),
            died: Condvar::new(),
        });
        let socket = Arc::new(ours);
        let reader = {
            let (shared, socket) = (Arc::clone(&shared), Arc::clone(&socket));
            std::thread::Builder::new()
                .name(format!("cowvm-cell-{pid}"))
                .spawn(move || read_answers(&shared, &socket))
                .map_err(|source| CellError::Start {
                    program: config.program.display().to_string(),
                    source,
                })?
        };
        let mut cell = Cell {
            shared,
            socket,
            send_lock: Mutex::new(()),
            next_id: AtomicU64::new(1),
            config: config.clone(),
            uid: 0,
            reader: Some(reader),
        };
        let init = Request::Init(Init {
            sandbox: config.sandbox,
            max_vms: config.vms_per_cell,
            mapping_budget: config.mapping_budget,
            generation_floor: config.generations.next().map_err(CellError::Local)?,
        });
        match cell.call(init, &[kvm.as_fd()], config.request_timeout)? {
            Response::Ready { uid, .. } => cell.uid = uid,
            other => return Err(cell.unexpected("init", &other)),
        }
        Ok(cell)
    }

    /// The cell's process id.
    pub fn pid(&self) -> u32 {
        self.shared.pid
    }

    /// The uid the cell runs as (it said so after entering the sandbox).
    pub fn uid(&self) -> u32 {
        self.uid
    }

    /// Whether the cell is serving.
    pub fn liveness(&self) -> Liveness {
        self.shared.liveness()
    }

    /// Waits up to `timeout` for the cell to die (its socket closes at once on death); how it
    /// ended if it did ([`ExitStatus::Exiting`] until the process is reaped).
    pub fn wait_dead(&self, timeout: Duration) -> Option<ExitStatus> {
        self.wait_while(timeout, |s| *s == Liveness::Alive)
    }

    /// Waits up to `timeout` for the cell's process to be reaped; its exit status if it was.
    /// (A cell killed with many VMs takes a while: the kernel tears every VM down first.)
    pub fn wait_exit(&self, timeout: Duration) -> Option<ExitStatus> {
        self.wait_while(timeout, |s| {
            matches!(s, Liveness::Alive | Liveness::Dead(ExitStatus::Exiting))
        })
        .filter(|status| *status != ExitStatus::Exiting)
    }

    fn wait_while(&self, timeout: Duration, waiting: impl FnMut(&mut Liveness) -> bool) -> Option<ExitStatus> {
        let state = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        let (state, _) = self
            .shared
            .died
            .wait_timeout_while(state, timeout, waiting)
            .unwrap_or_else(|e| e.into_inner());
        match *state {
            Liveness::Dead(status) => Some(status),
            Liveness::Alive => None,
        }
    }

    /// Stops the cell gracefully (it tears its VMs down and exits) and returns how it ended;
    /// `None` if it did not end within `timeout` (then it is killed when the handle drops).
    pub fn close(&self, timeout: Duration) -> Option<ExitStatus> {
        // SAFETY: shutdown on a socket we own; the cell sees end-of-file and leaves its loop.
        unsafe { libc::shutdown(self.socket.as_raw_fd(), libc::SHUT_RDWR) };
        self.wait_exit(timeout)
    }

    /// Sends `signal` to the cell (through its pidfd, so never to a recycled pid).
    pub fn signal(&self, signal: i32) -> std::io::Result<()> {
        // SAFETY: pidfd_send_signal with a pidfd we own, no siginfo, no flags.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.shared.pidfd.as_raw_fd(),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    /// What `/proc/<pid>/status` says about the cell's sandbox.
    pub fn confinement(&self) -> Result<Confinement, CellError> {
        sandbox::confinement(self.pid()).map_err(|e| CellError::Local(format!("/proc/{}/status: {e}", self.pid())))
    }

    /// Hands the cell `template` (its sealed memfds and state) under the supervisor's id `id`.
    pub fn load_template(&self, id: TemplateId, template: &Template) -> Result<(), CellError> {
        let memory = template.memory();
        let mut fds: Vec<BorrowedFd<'_>> = vec![memory.base().as_fd()];
        let mut overlay_runs = Vec::new();
        for (overlay, runs) in memory.overlays() {
            fds.push(overlay.as_fd());
            overlay_runs.push(runs.to_vec());
        }
        let state = crate::protocol::copy_state(template.state())
            .map_err(|e| CellError::Local(format!("cannot encode the template's state: {e}")))?;
        let request = Request::LoadTemplate(Box::new(LoadTemplate {
            template: id,
            overlay_runs,
            state,
        }));
        match self.call(request, &fds, self.config.request_timeout)? {
            Response::Loaded => Ok(()),
            other => Err(self.unexpected("load_template", &other)),
        }
    }

    /// Keeps `shells` warm shells of template `id` (lowered by the cell to the room it has),
    /// waiting up to `wait` for them; returns the target kept and the shells ready.
    pub fn keep_warm(&self, id: TemplateId, shells: u32, wait: Duration) -> Result<WarmCount, CellError> {
        let request = Request::KeepWarm {
            template: id,
            shells,
            wait_ms: wait.as_millis() as u64,
        };
        match self.call(request, &[], self.config.request_timeout + wait)? {
            Response::Warm { shells, target } => Ok(WarmCount {
                template: id,
                target,
                ready: shells,
            }),
            other => Err(self.unexpected("keep_warm", &other)),
        }
    }

    /// Makes `count` clones of template `id` in this cell (its warm shells first).
    pub fn spawn(&self, id: TemplateId, count: u32) -> Result<Spawned, CellError> {
        let timeout = self.config.request_timeout + self.config.per_vm_timeout * count;
        match self.call(Request::Spawn { template: id, count }, &[], timeout)? {
            Response::Spawned { clones, failed, warm } => Ok(Spawned { clones, failed, warm }),
            other => Err(self.unexpected("spawn", &other)),
        }
    }

    /// Boots `boot` (its kernel image in `kernel`, a sealed memfd, unless it is the built-in
    /// guest): the VM, or how the boot failed in the VMM or the guest.
    pub fn boot(
        &self,
        boot: BootVm,
        kernel: Option<BorrowedFd<'_>>,
    ) -> Result<Result<BootedVm, BootFailure>, CellError> {
        // The boot, the run to ready() and the warm-up each run the guest up to its deadline.
        let timeout =
            self.config.request_timeout + self.config.per_vm_timeout + Duration::from_millis(boot.deadline_ms) * 3;
        let fds: Vec<BorrowedFd<'_>> = kernel.into_iter().collect();
        match self.call(Request::Boot(boot), &fds, timeout)? {
            Response::Booted(booted) => Ok(Ok(booted)),
            Response::BootFailed(failure) => Ok(Err(failure)),
            other => Err(self.unexpected("boot", &other)),
        }
    }

    /// Freezes VM `vm`, which the cell booted, into a template the cell keeps under `template`:
    /// what it answered and the template's memfds (base first, then the overlays).
    pub fn freeze_booted(&self, vm: CellVmId, template: TemplateId) -> Result<(FrozenBooted, Vec<OwnedFd>), CellError> {
        let (response, fds) =
            self.exchange(Request::FreezeBooted { vm, template }, &[], self.config.request_timeout)?;
        match response {
            Response::FrozenBooted(frozen) => Ok((*frozen, fds)),
            other => Err(self.unexpected("freeze_booted", &other)),
        }
    }

    /// Runs `command` in VM `vm` on vCPU 0 with a guest deadline: what the guest returned (as
    /// [`cowvm_vmm::Vm::execute`]).
    pub fn run(&self, vm: CellVmId, command: GuestCommand, deadline: Duration) -> Result<CommandOutput, CellError> {
        Ok(self.run_on(vm, 0, command, deadline)?.0)
    }

    /// Runs `command` in VM `vm` on vCPU `vcpu` with a guest deadline (the other vCPUs stay
    /// where they stopped): what the guest returned and how long `KVM_RUN` took (as
    /// [`cowvm_vmm::Vm::execute_on_timed`]).
    pub fn run_on(
        &self,
        vm: CellVmId,
        vcpu: u32,
        command: GuestCommand,
        deadline: Duration,
    ) -> Result<(CommandOutput, Duration), CellError> {
        let request = Request::Run {
            vm,
            vcpu,
            command: WireCommand::from(command),
            deadline_ms: deadline.as_millis() as u64,
        };
        match self.call(request, &[], self.config.request_timeout + deadline)? {
            Response::Ran { output, took } => Ok((output, took)),
            other => Err(self.unexpected("run", &other)),
        }
    }

    /// Runs one call in VM `vm` with a guest deadline: its answer, or how the call failed.
    pub fn call_guest(
        &self,
        vm: CellVmId,
        input: Vec<u8>,
        deadline: Duration,
    ) -> Result<Result<CallDone, CallFailure>, CellError> {
        let request = Request::Call {
            vm,
            input,
            deadline_ms: deadline.as_millis() as u64,
        };
        match self.call(request, &[], self.config.request_timeout + deadline)? {
            Response::Called(done) => Ok(Ok(done)),
            Response::CallFailed(failure) => Ok(Err(failure)),
            other => Err(self.unexpected("call", &other)),
        }
    }

    /// Runs one call in a fresh clone of `template` with a guest deadline (see
    /// [`Request::CallTemplate`]): its answer or failure, and the targets the cell keeps.
    pub fn call_template(
        &self,
        template: TemplateId,
        input: Vec<u8>,
        deadline: Duration,
    ) -> Result<crate::protocol::TemplateCalled, CellError> {
        let request = Request::CallTemplate {
            template,
            input,
            deadline_ms: deadline.as_millis() as u64,
        };
        match self.call(request, &[], self.config.request_timeout + deadline)? {
            Response::CalledTemplate(called) => Ok(*called),
            other => Err(self.unexpected("call_template", &other)),
        }
    }

    /// Resets VM `vm` to its template's state (by swap when the cell has a warm shell of it);
    /// the report and where the VM's RAM is mapped in the cell afterwards.
    pub fn reset(&self, vm: CellVmId) -> Result<(ResetReport, u64), CellError> {
        match self.call(Request::Reset { vm }, &[], self.config.request_timeout)? {
            Response::Reset { report, host_address } => Ok((report, host_address)),
            other => Err(self.unexpected("reset", &other)),
        }
    }

    /// Destroys VM `vm`.
    pub fn destroy(&self, vm: CellVmId) -> Result<(), CellError> {
        match self.call(Request::Destroy { vm }, &[], self.config.request_timeout)? {
            Response::Done => Ok(()),
            other => Err(self.unexpected("destroy", &other)),
        }
    }

    /// Deletes VM `vm` by recycling it into a warm shell of its template (see
    /// [`Request::Recycle`]); returns whether it was recycled and the targets the cell keeps.
    pub fn recycle(&self, vm: CellVmId) -> Result<(bool, Vec<WarmCount>), CellError> {
        match self.call(Request::Recycle { vm }, &[], self.config.request_timeout)? {
            Response::Recycled { recycled, warm } => Ok((recycled, warm)),
            other => Err(self.unexpected("recycle", &other)),
        }
    }

    /// Drops template `id` and its warm shells from the cell.
    pub fn drop_template(&self, id: TemplateId) -> Result<(), CellError> {
        match self.call(Request::DropTemplate { template: id }, &[], self.config.request_timeout)? {
            Response::Done => Ok(()),
            other => Err(self.unexpected("drop_template", &other)),
        }
    }

    /// The cell's counts.
    pub fn stats(&self) -> Result<CellCounts, CellError> {
        match self.call(Request::Stats, &[], self.config.request_timeout)? {
            Response::Stats(counts) => Ok(counts),
            other => Err(self.unexpected("stats", &other)),
        }
    }

    /// KVM's binary statistics of VM `vm`, as files the supervisor reads whenever it likes
    /// (the cell hands over `KVM_GET_STATS_FD` fds of the VM and of each of its vCPUs).
    pub fn kvm_stats_files(&self, vm: CellVmId) -> Result<VmStatsFiles, CellError> {
        let (response, fds) = self.exchange(Request::StatsFds { vm }, &[], self.config.request_timeout)?;
        let Response::StatsFds { vcpus } = response else {
            return Err(self.unexpected("stats_fds", &response));
        };
        if vcpus == 0 || fds.len() != 1 + vcpus as usize {
            return Err(CellError::Local(format!(
                "stats_fds: the cell sent {} fds for a VM of {vcpus} vCPUs (expected {})",
                fds.len(),
                1 + vcpus as usize
            )));
        }
        let mut files = fds.into_iter().map(|fd| StatsFile::from_file(File::from(fd)));
        let vm = files
            .next()
            .ok_or_else(|| CellError::Local("stats_fds: no VM stats fd".into()))?
            .map_err(|e| CellError::Local(format!("VM stats fd: {e}")))?;
        let vcpus = files
            .enumerate()
            .map(|(i, file)| file.map_err(|e| CellError::Local(format!("stats fd of vCPU {i}: {e}"))))
            .collect::<Result<_, _>>()?;
        Ok(VmStatsFiles { vm, vcpus })
    }

    /// Freezes VM `vm`, a clone of template `parent_id` (which is `parent`), into template `id`,
    /// which the cell keeps for clones placed there. Returns the same template built here (the
    /// parent's memory plus the new layer's sealed memfd the cell sends, if it made one) and the
    /// microseconds the VM was paused.
    pub fn freeze(
        &self,
        vm: CellVmId,
        parent_id: TemplateId,
        parent: &Template,
        id: TemplateId,
    ) -> Result<(Template, f64), CellError> {
        let request = Request::Freeze {
            vm,
            parent: parent_id,
            template: id,
        };
        let (response, fds) = self.exchange(request, &[], self.config.request_timeout)?;
        let Response::Frozen(frozen) = response else {
            return Err(self.unexpected("freeze", &response));
        };
        let Frozen {
            overlay_runs,
            state,
            pause_us,
        } = *frozen;
        let local = |e: cowvm_vmm::MemoryError| CellError::Local(format!("freeze: the new layer: {e}"));
        let sent = fds.len();
        let mut fds = fds.into_iter();
        let memory = match (overlay_runs, fds.next(), fds.next()) {
            (None, None, None) => parent.memory().clone(),
            (Some(runs), Some(fd), None) => {
                let layer = FrozenMemory::from_sealed(File::from(fd)).map_err(local)?;
                parent.memory().with_layer(layer, runs).map_err(local)?
            }
            (runs, _, _) => {
                return Err(CellError::Local(format!(
                    "freeze: the cell sent {sent} fds for {} new layers",
                    usize::from(runs.is_some())
                )))
            }
        };
        if memory.size() != state.memory_size {
            return Err(CellError::Local(format!(
                "freeze: memory of {} bytes for a state of {} bytes",
                memory.size(),
                state.memory_size
            )));
        }
        Ok((Template::new(memory, state), pause_us))
    }

    /// Translates and checks the targets of a write probe in VM `vm` (nothing is written).
    pub fn probe_prepare(&self, vm: CellVmId, targets: ProbeTargets) -> Result<Vec<GuestTranslation>, CellError> {
        match self.call(Request::ProbePrepare { vm, targets }, &[], self.config.request_timeout)? {
            Response::ProbePrepared(translations) => Ok(translations),
            other => Err(self.unexpected("probe_prepare", &other)),
        }
    }

    /// Has the guest of VM `vm` write each of `gvas` twice, timed; with `baseline`, also times
    /// host-only copy-on-write on a scratch clone the cell makes within its room.
    pub fn probe_write(&self, vm: CellVmId, gvas: Vec<u64>, baseline: bool) -> Result<ProbeWritten, CellError> {
        // One write may run to its deadline (the probe stops there); the scratch clone is one VM.
        let timeout = self.config.request_timeout + WRITE_DEADLINE * 2 + self.config.per_vm_timeout;
        match self.call(Request::ProbeWrite { vm, gvas, baseline }, &[], timeout)? {
            Response::ProbeWritten(written) => Ok(written),
            other => Err(self.unexpected("probe_write", &other)),
        }
    }

    fn unexpected(&self, op: &'static str, got: &Response) -> CellError {
        if let Response::Error(error) = got {
            return CellError::Remote {
                pid: self.pid(),
                op,
                error: error.clone(),
            };
        }
        CellError::Unexpected {
            pid: self.pid(),
            op,
            got: match got {
                Response::Ready { .. } => "Ready",
                Response::Loaded => "Loaded",
                Response::Warm { .. } => "Warm",
                Response::Spawned { .. } => "Spawned",
                Response::Ran { .. } => "Ran",
                Response::Reset { .. } => "Reset",
                Response::Done => "Done",
                Response::Recycled { .. } => "Recycled",
                Response::Stats(_) => "Stats",
                Response::StatsFds { .. } => "StatsFds",
                Response::Called(_) => "Called",
                Response::CallFailed(_) => "CallFailed",
                Response::Frozen(_) => "Frozen",
                Response::ProbePrepared(_) => "ProbePrepared",
                Response::ProbeWritten(_) => "ProbeWritten",
                Response::CalledTemplate(_) => "CalledTemplate",
                Response::Error(_) => "Error",
                Response::Booted(_) => "Booted",
                Response::BootFailed(_) => "BootFailed",
                Response::FrozenBooted(_) => "FrozenBooted",
            },
        }
    }

    fn died(&self, op: &'static str) -> CellError {
        let status = self.wait_dead(Duration::from_secs(5)).unwrap_or(ExitStatus::Unknown);
        let status = match status {
            // Give a cell that is being killed a moment to be reaped, for a precise report.
            ExitStatus::Exiting => self.wait_exit(Duration::from_millis(100)).unwrap_or(status),
            other => other,
        };
        CellError::Died {
            pid: self.pid(),
            status,
            op,
        }
    }

    /// Sends `request` and waits up to `timeout` for its answer.
    fn call(&self, request: Request, fds: &[BorrowedFd<'_>], timeout: Duration) -> Result<Response, CellError> {
        self.exchange(request, fds, timeout).map(|(response, _)| response)
    }

    /// Like [`Cell::call`], also returning the descriptors that came with the answer.
    fn exchange(&self, request: Request, fds: &[BorrowedFd<'_>], timeout: Duration) -> Result<Answer, CellError> {
        let op = request.name();
        if let Liveness::Dead(status) = self.liveness() {
            return Err(CellError::Died {
                pid: self.pid(),
                status,
                op,
            });
        }
        let (tx, rx) = mpsc::channel();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.shared.lock_pending().insert(id, tx);
        let sent = {
            let _order = self.send_lock.lock().unwrap_or_else(|e| e.into_inner());
            wire::send(self.socket.as_fd(), &Envelope { id, body: request }, fds)
        };
        match sent {
            Ok(()) => {}
            Err(WireError::Closed) => {
                self.shared.lock_pending().remove(&id);
                return Err(self.died(op));
            }
            Err(source) => {
                self.shared.lock_pending().remove(&id);
                return Err(CellError::Wire {
                    pid: self.pid(),
                    source,
                });
            }
        }
        match rx.recv_timeout(timeout) {
            Ok((Response::Error(error), _)) => Err(CellError::Remote {
                pid: self.pid(),
                op,
                error,
            }),
            Ok(answer) => Ok(answer),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(self.died(op)),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                self.shared.lock_pending().remove(&id);
                Err(CellError::Timeout {
                    pid: self.pid(),
                    op,
                    timeout,
                })
            }
        }
    }
}

/// The reader thread: hands each answer to its waiting request; when the socket closes (the
/// cell died or exited), reaps the cell, records how it ended and fails every pending request.
fn read_answers(shared: &Shared, socket: &OwnedFd) {
    let mut buf = Vec::new();
    loop {
        match wire::recv::<Response>(socket.as_fd(), &mut buf) {
            Ok((Envelope { id, body }, fds)) => {
                if let Some(tx) = shared.lock_pending().remove(&id) {
                    let _ = tx.send((body, fds));
                }
            }
            Err(WireError::Codec(e)) => {
                eprintln!("cowvm: cell {} sent a malformed answer: {e}", shared.pid);
            }
            Err(_) => break,
        }
    }
    // The socket closes as soon as the cell dies, well before the kernel has torn its VMs
    // down and made it a zombie: report the death now, the exit status once reaped.
    *shared.state.lock().unwrap_or_else(|e| e.into_inner()) = Liveness::Dead(ExitStatus::Exiting);
    // Dropping the senders wakes every waiting request with `Disconnected`.
    shared.lock_pending().clear();
    shared.died.notify_all();
    let status = reap(shared.pidfd.as_fd());
    *shared.state.lock().unwrap_or_else(|e| e.into_inner()) = Liveness::Dead(status);
    shared.died.notify_all();
}

impl Drop for Cell {
    fn drop(&mut self) {
        // Closing our end ends the cell's loop; SIGKILL covers a cell stuck in a guest. The
        // reader thread returns once the process is reaped (after the kernel's VM teardown).
        if self.close(Duration::from_secs(2)).is_none() {
            let _ = self.signal(libc::SIGKILL);
        }
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}
