//! `cowvm`: the command-line entry point.

mod bench;
mod run;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// cowvm clones running KVM guests copy-on-write and shows exactly which memory they share.
#[derive(Parser)]
#[command(name = "cowvm", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a guest, run a self-check command and report how it went.
    Run(run::RunArgs),
    /// Run a benchmark; prints medians and percentiles and writes JSON.
    #[command(subcommand)]
    Bench(bench::Bench),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run::run(&args).map_err(|e| e.to_string()),
        Command::Bench(bench) => bench::run(&bench)
            .map(|()| ExitCode::SUCCESS)
            .map_err(|e| e.to_string()),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("cowvm: {e}");
            ExitCode::FAILURE
        }
    }
}
