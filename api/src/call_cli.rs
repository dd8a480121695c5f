//! `cowvm call TEMPLATE --input FILE [--output FILE]`: one call into a user's guest on a server
//! (guest ABI v1): the input file goes in, the guest's output comes out (to a file or stdout),
//! and status, timings and the guest's logs are printed to stderr.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use clap::Args;

use crate::cli::{CliError, Connection};
use crate::server::model::{CallRequest, CallResult};

/// Arguments of `cowvm call`.
#[derive(Args)]
pub struct CallArgs {
    #[command(flatten)]
    conn: Connection,
    /// Template id (or, with --vm, the id of a VM that keeps its state between calls).
    target: String,
    /// File holding the call's input (`-`: standard input).
    #[arg(long)]
    input: PathBuf,
    /// Where the guest's output goes (default: standard output).
    #[arg(long)]
    output: Option<PathBuf>,
    /// Call an existing VM instead of a fresh clone of a template.
    #[arg(long)]
    vm: bool,
    /// How long the guest may run, in milliseconds (default: the server's guest deadline).
    #[arg(long)]
    timeout_ms: Option<u64>,
}

fn read_input(path: &PathBuf) -> Result<Vec<u8>, CliError> {
    let mut input = Vec::new();
    let result = if path.as_os_str() == "-" {
        std::io::stdin().read_to_end(&mut input).map(|_| ())
    } else {
        std::fs::File::open(path).and_then(|mut f| f.read_to_end(&mut input).map(|_| ()))
    };
    result.map_err(|e| CliError::Usage(format!("cannot read input {}: {e}", path.display())))?;
    Ok(input)
}

/// Runs `cowvm call`; the exit code is the guest's status (capped at 255).
pub fn call(args: &CallArgs) -> Result<ExitCode, CliError> {
    let input = read_input(&args.input)?;
    let client = args.conn.client()?;
    let path = if args.vm {
        format!("/v1/vms/{}/call", args.target)
    } else {
        format!("/v1/templates/{}/call", args.target)
    };
    let body = CallRequest {
        input: BASE64.encode(&input),
        timeout_ms: args.timeout_ms,
    };
    let result: CallResult = client.post(&path, &body)?;
    let output = BASE64
        .decode(result.output.as_bytes())
        .map_err(|e| CliError::Usage(format!("the server's output is not base64: {e}")))?;
    let written = match &args.output {
        Some(file) => std::fs::write(file, &output),
        None if args.conn.json => Ok(()),
        None => std::io::stdout().write_all(&output),
    };
    written.map_err(|e| CliError::Usage(format!("cannot write the output: {e}")))?;
    if args.conn.json {
        println!("{}", serde_json::to_string_pretty(&result).unwrap_or_default());
    } else {
        if !result.logs.is_empty() {
            eprint!("{}", result.logs);
            if !result.logs.ends_with('\n') {
                eprintln!();
            }
        }
        eprintln!(
            "status {}, {} bytes out; spawn {:.0} µs, run {:.0} µs, total {:.0} µs",
            result.status,
            output.len(),
            result.spawn_us,
            result.run_us,
            result.total_us
        );
    }
    Ok(ExitCode::from(result.status.min(255) as u8))
}
