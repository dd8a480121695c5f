//! `cowvm`: the command-line entry point.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use cowvm::cli::{self, Connection, ProbeTargetsArgs, ServeArgs, TemplateCommand, VmCommand};
use cowvm::{call_cli, demo, run};
use cowvm_bench as bench;

/// cowvm clones running KVM guests copy-on-write and shows exactly which memory they share.
#[derive(Parser)]
#[command(name = "cowvm", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start an embedded server and show the whole product: boot, snapshot, 100 clones, a
    /// write probe, sharing statistics; then clean up.
    Demo(demo::DemoArgs),
    /// Serve the HTTP API.
    Serve(ServeArgs),
    /// Boot a guest directly (no server), run a self-check command and report how it went.
    Run(run::RunArgs),
    /// Run a benchmark (or, with --out DIR, all of them); prints medians and percentiles,
    /// writes JSON and SVG plots.
    Bench(bench::BenchArgs),
    /// Manage VMs on a server.
    Vm {
        #[command(flatten)]
        conn: Connection,
        #[command(subcommand)]
        command: VmCommand,
    },
    /// Freeze a VM into a template.
    Snapshot {
        #[command(flatten)]
        conn: Connection,
        /// VM id.
        vm: String,
    },
    /// Make clones of a template (or, with --live, of a running VM).
    Clone {
        #[command(flatten)]
        conn: Connection,
        /// Template id (or VM id with --live).
        source: String,
        /// How many.
        #[arg(long, default_value_t = 1)]
        count: u64,
        /// Live fork: freeze the running VM `source` briefly and clone it.
        #[arg(long)]
        live: bool,
    },
    /// Write-probe pages of a VM and show what the host kernel saw.
    Probe {
        #[command(flatten)]
        conn: Connection,
        /// VM id.
        vm: String,
        #[command(flatten)]
        targets: ProbeTargetsArgs,
    },
    /// Sharing statistics of a VM or (with --template) of a template.
    Stats {
        #[command(flatten)]
        conn: Connection,
        /// VM id.
        vm: Option<String>,
        /// Template id.
        #[arg(long)]
        template: Option<String>,
    },
    /// Run one call into a user's guest (guest ABI v1) in a fresh clone of a template.
    Call(call_cli::CallArgs),
    /// Manage templates on a server.
    Template {
        #[command(flatten)]
        conn: Connection,
        #[command(subcommand)]
        command: TemplateCommand,
    },
    /// Serve as a cell on fd 3 (started by the supervisor; not for direct use).
    #[command(hide = true)]
    Cell,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Cell = cli.command {
        return cowvm_cell::worker::main();
    }
    let result: Result<ExitCode, String> = match cli.command {
        Command::Demo(args) => demo::run(&args).map(|()| ExitCode::SUCCESS).map_err(|e| e.to_string()),
        Command::Serve(args) => cli::serve(&args).map(|()| ExitCode::SUCCESS).map_err(|e| e.to_string()),
        Command::Run(args) => run::run(&args).map_err(|e| e.to_string()),
        Command::Bench(bench) => bench::run(&bench)
            .map(|()| ExitCode::SUCCESS)
            .map_err(|e| e.to_string()),
        Command::Vm { conn, command } => cli::vm(&conn, &command)
            .map(|()| ExitCode::SUCCESS)
            .map_err(|e| e.to_string()),
        Command::Snapshot { conn, vm } => cli::snapshot(&conn, &vm)
            .map(|()| ExitCode::SUCCESS)
            .map_err(|e| e.to_string()),
        Command::Clone {
            conn,
            source,
            count,
            live,
        } => cli::clone(&conn, &source, count, live)
            .map(|()| ExitCode::SUCCESS)
            .map_err(|e| e.to_string()),
        Command::Probe { conn, vm, targets } => cli::probe(&conn, &vm, &targets)
            .map(|()| ExitCode::SUCCESS)
            .map_err(|e| e.to_string()),
        Command::Stats { conn, vm, template } => cli::stats(&conn, vm.as_deref(), template.as_deref())
            .map(|()| ExitCode::SUCCESS)
            .map_err(|e| e.to_string()),
        Command::Call(args) => call_cli::call(&args).map_err(|e| e.to_string()),
        Command::Template { conn, command } => cli::template(&conn, &command)
            .map(|()| ExitCode::SUCCESS)
            .map_err(|e| e.to_string()),
        Command::Cell => Ok(cowvm_cell::worker::main()),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("cowvm: {e}");
            ExitCode::FAILURE
        }
    }
}
