//! `cowvm`: the command-line entry point.

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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run::run(&args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("cowvm: {e}");
            ExitCode::FAILURE
        }
    }
}
