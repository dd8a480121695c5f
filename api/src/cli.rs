//! The CLI commands that call the API: `vm`, `snapshot`, `clone`, `probe`, `stats`, `template`,
//! and `serve` itself.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use cowvm_vmm::layout::as_mib_f64;
use serde::Serialize;

use crate::client::{Client, ClientError, DEFAULT_URL};
use crate::server::model::{
    CloneMade, CloneRequest, ClonesCreated, CreateVm, ProbeList, ProbeRange, ProbeReport, ProbeRequest, ResetDone,
    RunCommand, RunResult, SnapshotCreated, TemplateImported, TemplateInfo, TemplateStats, VmInfo, VmStats,
    WarmRequest, WarmStatus,
};
use crate::server::{self, Limits, ServerConfig};

/// Where the server is and how to print.
#[derive(Args, Clone)]
pub struct Connection {
    /// Server URL.
    #[arg(long, env = "COWVM_URL", default_value = DEFAULT_URL, global = true)]
    pub url: String,
    /// File holding the bearer token.
    #[arg(long, global = true)]
    pub token_file: Option<PathBuf>,
    /// Print the server's JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
}

/// Errors of CLI commands.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The API call failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The server failed.
    #[error(transparent)]
    Serve(#[from] server::ServeError),
    /// Bad arguments or files.
    #[error("{0}")]
    Usage(String),
}

/// Reads a bearer token file. It must be a regular file (a FIFO or device would block or never
/// end) readable by its owner only (mode 0600 or stricter): a token others can read is no secret.
fn read_token(path: &Option<PathBuf>) -> Result<Option<String>, CliError> {
    use std::io::Read;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let Some(path) = path else { return Ok(None) };
    let shown = path.display();
    let refuse = |why: String| CliError::Usage(format!("token file {shown}: {why}"));
    // O_NONBLOCK: opening a FIFO with no writer would otherwise wait forever.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| refuse(format!("cannot open it: {e}")))?;
    let meta = file.metadata().map_err(|e| refuse(format!("cannot stat it: {e}")))?;
    if !meta.is_file() {
        return Err(refuse(
            "not a regular file (a FIFO, socket, device or directory); give a file holding the token".into(),
        ));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(refuse(format!(
            "mode {mode:04o} lets group or others read or change it; run chmod 600 on it"
        )));
    }
    let mut text = String::new();
    file.take(64 * 1024)
        .read_to_string(&mut text)
        .map_err(|e| refuse(format!("cannot read it: {e}")))?;
    let token = text.trim().to_owned();
    if token.is_empty() {
        return Err(refuse("it is empty".into()));
    }
    Ok(Some(token))
}

impl Connection {
    /// A client of the server, with the token read from `--token-file`.
    pub fn client(&self) -> Result<Client, CliError> {
        Ok(Client::new(&self.url, read_token(&self.token_file)?))
    }
}

/// Parses `0x…` or decimal.
pub fn parse_address(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let parsed = match t.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => t.parse(),
    };
    parsed.map_err(|e| format!("{t:?} is not an address: {e}"))
}

fn spinner(message: &str) -> Option<indicatif::ProgressBar> {
    if !std::io::stdout().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_message(message.to_owned());
    bar.enable_steady_tick(Duration::from_millis(100));
    Some(bar)
}

fn with_spinner<T>(message: &str, f: impl FnOnce() -> T) -> T {
    let bar = spinner(message);
    let result = f();
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    result
}

fn print_json(value: &impl Serialize) {
    println!("{}", serde_json::to_string_pretty(value).unwrap_or_default());
}

/// An optional text as a table cell (`-` for none).
fn text(v: &Option<String>) -> &str {
    v.as_deref().unwrap_or("-")
}

/// A map as one line of JSON (`{"1":3,"2":5}`).
fn json_line(v: &impl Serialize) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

/// `cowvm serve`.
#[derive(Args)]
pub struct ServeArgs {
    /// Address to listen on (off loopback, a token is required).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Directory where templates are saved and reloaded from.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// File holding the bearer token every request must carry.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Directory of kernels that `POST /v1/vms` may name (none: only the built-in guest).
    #[arg(long)]
    kernel_dir: Option<PathBuf>,
    /// Largest guest RAM per VM, MiB.
    #[arg(long, default_value_t = Limits::default().max_memory_mib)]
    max_memory_mib: u64,
    /// Most vCPUs per VM (1 up to 32).
    #[arg(long, default_value_t = Limits::default().max_vcpus)]
    max_vcpus: usize,
    /// Most live VMs at once.
    #[arg(long, default_value_t = Limits::default().max_vms)]
    max_vms: usize,
    /// Most clones per call.
    #[arg(long, default_value_t = Limits::default().max_clones_per_call)]
    max_clones_per_call: usize,
    /// Largest request body, bytes.
    #[arg(long, default_value_t = Limits::default().max_body_bytes)]
    max_body_bytes: usize,
    /// Longest a request may take, ms.
    #[arg(long, default_value_t = 60_000)]
    request_timeout_ms: u64,
    /// Longest a guest may run for one command before it is stopped and marked failed, ms.
    #[arg(long, default_value_t = 5_000)]
    guest_deadline_ms: u64,
    /// Warm shells kept per template.
    #[arg(long, default_value_t = Limits::default().warm_shells)]
    warm_shells: usize,
    /// Largest template archive `POST /v1/templates/import` takes, bytes.
    #[arg(long, default_value_t = Limits::default().max_import_bytes)]
    max_import_bytes: u64,
    /// Longest a client may take to send a request's head (line and headers), ms; slower
    /// connections are closed.
    #[arg(long, default_value_t = server::DEFAULT_HEADER_TIMEOUT.as_millis() as u64)]
    header_timeout_ms: u64,
    /// Run VMs in sandboxed cell processes (`cowvm cell`): the default, kept for scripts that
    /// name it.
    #[arg(long, conflicts_with = "in_process")]
    cells: bool,
    /// Run every VM in this process instead of in cells.
    #[arg(long)]
    in_process: bool,
    /// With cells: most VMs one cell holds.
    #[arg(long, default_value_t = cowvm_cell::DEFAULT_VMS_PER_CELL, value_parser = clap::value_parser!(u32).range(1..))]
    vms_per_cell: u32,
    /// With cells: most cells at once (default: enough for --max-vms).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    max_cells: Option<u64>,
    /// With --cells: idle cells (no VM, no warm shell) kept started for the next clones; more
    /// are stopped (at most --max-cells).
    #[arg(long, default_value_t = server::IDLE_CELLS as u64)]
    idle_cells: u64,
    /// With --cells: how long a cell stays idle before it is stopped, ms (at most one day).
    #[arg(long, default_value_t = server::IDLE_AFTER.as_millis() as u64,
          value_parser = clap::value_parser!(u64).range(..=MAX_CELL_IDLE_MS))]
    cell_idle_ms: u64,
}

/// Longest `--cell-idle-ms`: one day.
const MAX_CELL_IDLE_MS: u64 = 24 * 3600 * 1000;

/// The cells configuration of `--cells`, `--vms-per-cell`, `--max-cells`, `--idle-cells` and
/// `--cell-idle-ms`.
fn cells_config(args: &ServeArgs) -> Result<Option<server::CellsConfig>, CliError> {
    if args.in_process {
        return Ok(None);
    }
    let max_cells = args
        .max_cells
        .map_or_else(|| args.max_vms.div_ceil(args.vms_per_cell as usize), |n| n as usize)
        .max(1);
    let idle_cells = usize::try_from(args.idle_cells)
        .ok()
        .filter(|&n| n <= max_cells)
        .ok_or_else(|| {
            CliError::Usage(format!(
                "--idle-cells must be 0..={max_cells} (at most --max-cells; got {})",
                args.idle_cells
            ))
        })?;
    let mut config = server::CellsConfig::current_exe(args.vms_per_cell, max_cells).map_err(|source| {
        CliError::Serve(server::ServeError::Io {
            what: "find this executable to run cells".into(),
            source,
        })
    })?;
    config.idle_cells = idle_cells;
    config.idle_after = Duration::from_millis(args.cell_idle_ms);
    Ok(Some(config))
}

/// Runs `cowvm serve` until SIGINT or SIGTERM.
pub fn serve(args: &ServeArgs) -> Result<(), CliError> {
    init_logging();
    let most = cowvm_vmm::layout::MAX_VCPUS;
    if !(1..=most).contains(&args.max_vcpus) {
        return Err(CliError::Usage(format!(
            "--max-vcpus must be 1..={most} (got {})",
            args.max_vcpus
        )));
    }
    let config = ServerConfig {
        listen: args.listen,
        state_dir: args.state_dir.clone(),
        token: read_token(&args.token_file)?,
        kernel_dir: args.kernel_dir.clone(),
        limits: Limits {
            max_memory_mib: args.max_memory_mib,
            max_vcpus: args.max_vcpus,
            max_vms: args.max_vms,
            max_clones_per_call: args.max_clones_per_call,
            max_body_bytes: args.max_body_bytes,
            request_timeout: Duration::from_millis(args.request_timeout_ms),
            guest_deadline: Duration::from_millis(args.guest_deadline_ms),
            warm_shells: args.warm_shells,
            max_import_bytes: args.max_import_bytes,
        },
        handle_signals: true,
        header_timeout: Duration::from_millis(args.header_timeout_ms.max(1)),
        cells: cells_config(args)?,
    };
    let running = server::start(config)?;
    for refused in &running.refused_templates {
        eprintln!("cowvm serve: refused a saved template: {refused}");
    }
    // Whoever started the server may close its stdout after reading the address: a server must
    // not die of that, so these lines ignore write errors.
    use std::io::Write;
    let mut out = std::io::stdout();
    let _ = writeln!(out, "cowvm serve: listening on http://{}", running.addr).and_then(|()| out.flush());
    running.wait()?;
    let _ = writeln!(out, "cowvm serve: stopped; every VM was torn down").and_then(|()| out.flush());
    Ok(())
}

/// Sends the server's `tracing` events (accept failures, connection errors) to stderr, filtered by
/// `RUST_LOG` (default `info`); without a subscriber they would be dropped.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // A second initialisation (an embedding process that installed its own) is not an error.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// `cowvm vm …`.
#[derive(Subcommand)]
pub enum VmCommand {
    /// Boot a VM.
    Create {
        /// Guest RAM in MiB.
        #[arg(long, default_value_t = 256)]
        memory_mib: u64,
        /// vCPUs (1 up to the server's --max-vcpus).
        #[arg(long, default_value_t = 1)]
        vcpus: u32,
        /// MiB the guest fills with data first.
        #[arg(long, default_value_t = 0)]
        warmup_mib: u64,
        /// A kernel name from the server's kernel directory.
        #[arg(long)]
        kernel: Option<String>,
    },
    /// List VMs.
    Ls,
    /// Destroy VMs.
    Rm {
        /// VM ids.
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Reset a clone to its template's state.
    Reset {
        /// VM id.
        id: String,
    },
    /// Run a command in the built-in guest.
    Run {
        /// VM id.
        id: String,
        /// exit, write, checksum, identity, triple_fault, spin or halt.
        #[arg(long, default_value = "exit")]
        command: String,
        /// First guest address (write, checksum).
        #[arg(long, value_parser = parse_address, default_value = "0")]
        start_gpa: u64,
        /// Qwords to touch.
        #[arg(long, default_value_t = 0)]
        count: u64,
        /// Bytes between them.
        #[arg(long, default_value_t = 8)]
        stride: u64,
        /// Value stored (write).
        #[arg(long, default_value_t = 0)]
        value: u64,
        /// The vCPU that runs it.
        #[arg(long, default_value_t = 0)]
        vcpu: u32,
    },
}

fn vm_table(vms: &[VmInfo]) {
    println!(
        "{:<10} {:<6} {:>8} {:<8} {:<10} {:>10}",
        "ID", "KIND", "MEMORY", "STATE", "TEMPLATE", "SPAWN_US"
    );
    for vm in vms {
        println!(
            "{:<10} {:<6} {:>5}MiB {:<8} {:<10} {:>10}",
            vm.id,
            vm.kind,
            vm.memory_mib,
            vm.state,
            text(&vm.template_id),
            vm.spawn_us.map_or("-".into(), |v| format!("{v:.0}"))
        );
        if let Some(failure) = &vm.failure {
            println!("           failed: {failure}");
        }
    }
}

/// Runs `cowvm vm …`.
pub fn vm(conn: &Connection, command: &VmCommand) -> Result<(), CliError> {
    let client = conn.client()?;
    match command {
        VmCommand::Create {
            memory_mib,
            vcpus,
            warmup_mib,
            kernel,
        } => {
            let body = CreateVm {
                memory_mib: *memory_mib,
                vcpus: *vcpus,
                warmup_mib: *warmup_mib,
                kernel: kernel.clone(),
            };
            let vm: VmInfo = with_spinner("booting", || client.post("/v1/vms", &body))?;
            if conn.json {
                print_json(&vm)
            } else {
                vm_table(&[vm])
            }
        }
        VmCommand::Ls => {
            let vms: Vec<VmInfo> = client.get("/v1/vms")?;
            if conn.json {
                print_json(&vms)
            } else {
                vm_table(&vms)
            }
        }
        VmCommand::Rm { ids } => {
            for id in ids {
                client.delete(&format!("/v1/vms/{id}"))?;
                if !conn.json {
                    println!("removed {id}");
                }
            }
        }
        VmCommand::Run {
            id,
            command,
            start_gpa,
            count,
            stride,
            value,
            vcpu,
        } => {
            let body = RunCommand {
                command: command.clone(),
                start_gpa: *start_gpa,
                count: *count,
                stride: *stride,
                value: *value,
                vcpu: *vcpu,
            };
            let out: RunResult = client.post(&format!("/v1/vms/{id}/run"), &body)?;
            if conn.json {
                print_json(&out)
            } else {
                println!(
                    "{id}: {command} → status {}, result {:#x}, extra {:#x} ({:.1} µs)",
                    out.status, out.result, out.extra, out.run_us
                );
            }
        }
        VmCommand::Reset { id } => {
            let done: ResetDone = client.post_empty(&format!("/v1/vms/{id}/reset"))?;
            if conn.json {
                print_json(&done)
            } else {
                let how = if done.swapped {
                    "by swap (the used VM is recycled in the background)"
                } else {
                    "in place"
                };
                println!(
                    "reset {id} {how} in {:.0} µs, {} private pages dropped",
                    done.reset_us, done.pages_dropped
                );
            }
        }
    }
    Ok(())
}

/// Runs `cowvm snapshot VM`.
pub fn snapshot(conn: &Connection, vm: &str) -> Result<(), CliError> {
    let client = conn.client()?;
    let made: SnapshotCreated = with_spinner("freezing", || client.post_empty(&format!("/v1/vms/{vm}/snapshot")))?;
    if conn.json {
        print_json(&made);
    } else {
        println!(
            "{vm} frozen into {} ({} MiB, {} layer(s), paused {:.0} µs{})",
            made.template_id,
            made.memory_mib,
            made.layers,
            made.pause_us,
            if made.persisted { ", saved" } else { "" }
        );
    }
    Ok(())
}

/// Percentile of the `spawn_us` of clones (nearest rank).
pub fn spawn_percentile(clones: &[CloneMade], q: f64) -> f64 {
    let times = cowvm_vmm::percentile::sorted(clones.iter().map(|c| c.spawn_us));
    cowvm_vmm::percentile::nearest_rank(&times, q)
}

/// Runs `cowvm clone`.
pub fn clone(conn: &Connection, source: &str, count: u64, live: bool) -> Result<(), CliError> {
    let client = conn.client()?;
    let path = if live {
        format!("/v1/vms/{source}/clones")
    } else {
        format!("/v1/templates/{source}/clones")
    };
    let made: ClonesCreated = with_spinner(&format!("making {count} clones"), || {
        client.post(&path, &CloneRequest { count })
    })?;
    if conn.json {
        print_json(&made);
        return Ok(());
    }
    let clones = &made.clones;
    println!(
        "{} clones of {} in {:.1} ms (spawn p50 {:.0} µs, p99 {:.0} µs){}",
        clones.len(),
        made.template_id,
        made.total_us / 1000.0,
        spawn_percentile(clones, 0.5),
        spawn_percentile(clones, 0.99),
        made.pause_us
            .map_or(String::new(), |p| format!("; source paused {p:.0} µs"))
    );
    for c in clones.iter().take(20) {
        println!(
            "  {:<10} spawn {:>6.0} µs  generation {:<6} seed {:#018x}",
            c.id, c.spawn_us, c.generation, c.seed
        );
    }
    if clones.len() > 20 {
        println!("  … {} more", clones.len() - 20);
    }
    if let Some(first) = made.failed.first() {
        println!("{} not made: {}", made.failed.len(), first.reason);
    }
    Ok(())
}

/// What `cowvm probe` writes.
#[derive(Args)]
pub struct ProbeTargetsArgs {
    /// Comma-separated guest addresses (0x… or decimal).
    #[arg(long, value_delimiter = ',', value_parser = parse_address, conflicts_with = "start_gpa")]
    gpas: Vec<u64>,
    /// First guest address of a range.
    #[arg(long, value_parser = parse_address)]
    start_gpa: Option<u64>,
    /// Pages in the range.
    #[arg(long, default_value_t = 10)]
    pages: u64,
    /// Bytes between them.
    #[arg(long, default_value_t = 4096)]
    stride: u64,
}

/// Runs `cowvm probe VM`.
pub fn probe(conn: &Connection, vm: &str, targets: &ProbeTargetsArgs) -> Result<(), CliError> {
    let body = match targets.start_gpa {
        Some(start) => ProbeRequest::Range(ProbeRange {
            start_gpa: start,
            pages: targets.pages,
            stride: targets.stride,
        }),
        None if !targets.gpas.is_empty() => ProbeRequest::List(ProbeList {
            gpas: targets.gpas.clone(),
        }),
        None => return Err(CliError::Usage("give --gpas or --start-gpa".into())),
    };
    let client = conn.client()?;
    let report: ProbeReport = with_spinner("probing", || client.post(&format!("/v1/vms/{vm}/probes/write"), &body))?;
    if conn.json {
        print_json(&report);
        return Ok(());
    }
    println!(
        "{:<12} {:>10} {:>10} {:>7} {:>7} {:<14} {:>9}",
        "GVA", "PFN BEFORE", "PFN AFTER", "COUNT<", "COUNT>", "SHARED→PRIVATE", "FAULT_US"
    );
    for page in &report.pages {
        println!(
            "{:<12} {:>10} {:>10} {:>7} {:>7} {:<14} {:>9.2}",
            format!("{:#x}", page.gva),
            page.before.pfn,
            page.after.pfn,
            page.before.kpagecount,
            page.after.kpagecount,
            format!("{} → {}", page.shared_before, page.private_after),
            page.write_fault_us
        );
    }
    println!(
        "{} written, {} became private; guest COW p50 {:.2} µs, host-only COW p50 {}; KVM exits +{}",
        report.written,
        report.became_private,
        report.guest_cow_us.p50,
        report.host_cow_us.map_or("-".into(), |m| format!("{:.2} µs", m.p50)),
        report.kvm.exits.map_or("-".into(), |n| n.to_string())
    );
    Ok(())
}

/// Runs `cowvm stats`.
pub fn stats(conn: &Connection, vm: Option<&str>, template: Option<&str>) -> Result<(), CliError> {
    let client = conn.client()?;
    let (path, is_template) = match (vm, template) {
        (Some(vm), None) => (format!("/v1/vms/{vm}/stats"), false),
        (None, Some(t)) => (format!("/v1/templates/{t}/stats"), true),
        _ => return Err(CliError::Usage("give a VM id, or --template ID".into())),
    };
    if is_template {
        let stats: TemplateStats = client.get(&path)?;
        if conn.json {
            print_json(&stats);
        } else {
            print_template_stats(&stats);
        }
        return Ok(());
    }
    let stats: VmStats = client.get(&path)?;
    if conn.json {
        print_json(&stats);
    } else {
        let p = &stats.pages;
        println!(
            "{}: {} pages: {} present ({} template frames, {} private, {} zero page; {} also mapped elsewhere), {} untouched; scan {:.2} ms",
            stats.id,
            p.total,
            p.present,
            p.template_backed,
            p.private,
            p.zero,
            p.shared,
            p.untouched,
            stats.scan_us / 1000.0
        );
        println!(
            "  kpagecount histogram (mappings: pages): {}",
            json_line(&stats.kpagecount_histogram)
        );
        let s = &stats.smaps;
        println!(
            "  smaps: Rss {} KiB, Anonymous {} KiB, Private_Dirty {} KiB",
            s.rss_kib, s.anonymous_kib, s.private_dirty_kib
        );
    }
    Ok(())
}

/// Prints a template's sharing summary.
pub fn print_template_stats(stats: &TemplateStats) {
    let mib = as_mib_f64;
    println!(
        "{}: {} clones (+{} warm shells); the template holds {} populated pages of {}; {} mapped by every clone",
        stats.id, stats.clones, stats.warm_shells, stats.populated_pages, stats.pages, stats.pages_shared_by_all,
    );
    println!(
        "  clones map {:.1} MiB of template frames and hold {:.1} KiB private; saved {:.1} MiB (what they map beyond one copy of each frame)",
        mib(stats.mapped_bytes),
        stats.private_bytes as f64 / 1024.0,
        mib(stats.saved_bytes),
    );
    println!(
        "  naive baseline, not a saving: {:.1} MiB for full copies of RAM per clone",
        mib(stats.full_copy_bytes)
    );
    println!(
        "  populated pages by clones mapping their frame: {}",
        json_line(&stats.histogram)
    );
}

/// `cowvm template …`.
#[derive(Subcommand)]
pub enum TemplateCommand {
    /// List templates.
    Ls,
    /// Delete templates.
    Rm {
        /// Template ids.
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Keep warm shells ready for a template (built in the background).
    Warm {
        /// Template id.
        id: String,
        /// Shells to keep ready (0 stops building).
        #[arg(long)]
        shells: u64,
        /// Wait until they are all ready.
        #[arg(long)]
        wait: bool,
    },
    /// Write a template to a file as an OCI image layout tar (flattened).
    Export {
        /// Template id.
        id: String,
        /// The archive to write.
        #[arg(short = 'o', long = "output")]
        output: PathBuf,
    },
    /// Import a template from an OCI image layout tar made by `template export`.
    Import {
        /// The archive.
        file: PathBuf,
    },
    /// Export a template and copy it to an OCI registry (runs `skopeo copy`).
    Push {
        /// Template id.
        id: String,
        /// Registry reference, e.g. `registry.example:5000/cowvm/base:1`.
        reference: String,
        /// Talk to the registry over plain HTTP / without verifying TLS.
        #[arg(long)]
        insecure: bool,
    },
    /// Copy a template from an OCI registry (runs `skopeo copy`) and import it.
    Pull {
        /// Registry reference, e.g. `registry.example:5000/cowvm/base:1`.
        reference: String,
        /// Talk to the registry over plain HTTP / without verifying TLS.
        #[arg(long)]
        insecure: bool,
    },
}

/// Runs `cowvm template …`.
pub fn template(conn: &Connection, command: &TemplateCommand) -> Result<(), CliError> {
    let client = conn.client()?;
    match command {
        TemplateCommand::Ls => {
            let list: Vec<TemplateInfo> = client.get("/v1/templates")?;
            if conn.json {
                print_json(&list);
                return Ok(());
            }
            println!(
                "{:<10} {:>8} {:>7} {:>6} {:>7} {:<10} {:<9}",
                "ID", "MEMORY", "CLONES", "WARM", "LAYERS", "SOURCE", "PERSISTED"
            );
            for t in &list {
                println!(
                    "{:<10} {:>5}MiB {:>7} {:>6} {:>7} {:<10} {:<9}",
                    t.id,
                    t.memory_mib,
                    t.clones,
                    t.warm_shells,
                    t.layers,
                    text(&t.source_vm),
                    t.persisted
                );
            }
        }
        TemplateCommand::Warm { id, shells, wait } => {
            let status: WarmStatus =
                client.post(&format!("/v1/templates/{id}/warm"), &WarmRequest { shells: *shells })?;
            let started = std::time::Instant::now();
            let mut ready = status.warm_shells as u64;
            while *wait && ready < *shells {
                if started.elapsed() > Duration::from_secs(600) {
                    return Err(CliError::Usage(format!(
                        "only {ready} of {shells} shells were ready after 600 s"
                    )));
                }
                std::thread::sleep(Duration::from_millis(20));
                ready = client.get::<TemplateInfo>(&format!("/v1/templates/{id}"))?.warm_shells as u64;
            }
            if conn.json {
                print_json(&WarmStatus {
                    template_id: id.clone(),
                    target: *shells,
                    warm_shells: ready as usize,
                });
            } else {
                println!("{id}: {ready} of {shells} warm shells ready");
            }
        }
        TemplateCommand::Push {
            id,
            reference,
            insecure,
        } => crate::portable_cli::push(conn, &client, id, reference, *insecure)?,
        TemplateCommand::Pull { reference, insecure } => {
            crate::portable_cli::pull(conn, &client, reference, *insecure)?
        }
        TemplateCommand::Export { id, output } => export_template(conn, &client, id, output)?,
        TemplateCommand::Import { file } => {
            let mut archive = std::fs::File::open(file)
                .map_err(|e| CliError::Usage(format!("cannot open {}: {e}", file.display())))?;
            let imported: TemplateImported =
                client.upload("/v1/templates/import", "application/x-tar", &mut archive)?;
            if conn.json {
                print_json(&imported);
            } else {
                println!(
                    "imported {} as {} ({} MiB RAM, {:.1} MiB populated)",
                    file.display(),
                    imported.template_id,
                    imported.memory_mib,
                    as_mib_f64(imported.populated_bytes)
                );
            }
        }
        TemplateCommand::Rm { ids } => {
            for id in ids {
                client.delete(&format!("/v1/templates/{id}"))?;
                if !conn.json {
                    println!("removed {id}");
                }
            }
        }
    }
    Ok(())
}

/// What `template export --json` prints.
#[derive(Serialize)]
struct Exported<'a> {
    template_id: &'a str,
    file: &'a std::path::Path,
    bytes: u64,
    seconds: f64,
}

/// `cowvm template export ID -o FILE`: the archive is written beside FILE and renamed into place
/// once complete, so FILE is never a partial archive.
fn export_template(conn: &Connection, client: &Client, id: &str, output: &std::path::Path) -> Result<(), CliError> {
    let name = output
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let partial = output.with_file_name(format!(".{name}.part"));
    let fail = |what: &str, e: std::io::Error| CliError::Usage(format!("{what} {}: {e}", partial.display()));
    let mut file = std::fs::File::create(&partial).map_err(|e| fail("cannot create", e))?;
    let started = std::time::Instant::now();
    let written = client.download(&format!("/v1/templates/{id}/export"), &mut file);
    let written = match written.map(|n| (n, file.sync_all())) {
        Ok((n, Ok(()))) => n,
        Ok((_, Err(e))) => {
            std::fs::remove_file(&partial).ok();
            return Err(fail("cannot write", e));
        }
        Err(e) => {
            std::fs::remove_file(&partial).ok();
            return Err(e.into());
        }
    };
    std::fs::rename(&partial, output).map_err(|e| fail("cannot rename", e))?;
    let seconds = started.elapsed().as_secs_f64();
    if conn.json {
        print_json(&Exported {
            template_id: id,
            file: output,
            bytes: written,
            seconds,
        });
    } else {
        println!(
            "exported {id} to {} ({:.1} MiB in {seconds:.2} s)",
            output.display(),
            as_mib_f64(written)
        );
    }
    Ok(())
}
