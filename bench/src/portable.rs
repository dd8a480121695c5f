//! `cowvm bench portable`: export and import time and archive size of portable templates (see
//! [`cowvm::archive`]), for the demo's template (256 MiB, 16 MiB written) and a 1 GiB template
//! with 64 MiB written. The guest writes one qword per page, which zstd compresses to almost
//! nothing, so each size is also measured with its written pages filled with pseudo-random bytes
//! host-side (incompressible: the archive is then about the populated size).

use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::Instant;

use cowvm_vmm::memory::{FrozenMemory, TemplateMemory, PAGE_SIZE};
use cowvm_vmm::{GuestCommand, Kvm, Template, Vm, VmConfig, VmState};
use serde_json::{json, Value};
use vm_memory::GuestAddress;

use super::io_err;
use super::stats::median;
use super::{prepare, write_json, BenchError, SweepArgs, DEADLINE};
use cowvm::archive;

/// Where the written data starts (as in the other benchmarks' templates).
const DATA_START: u64 = 4 << 20;

/// A template of `memory_mib` MiB whose guest wrote one qword into each page of `written_mib` MiB.
fn guest_template(kvm: &Kvm, memory_mib: u64, written_mib: u64) -> Result<Template, BenchError> {
    let (mut vm, _) = Vm::boot(kvm, &VmConfig::builtin(memory_mib))?;
    vm.execute(
        GuestCommand::Write {
            start: GuestAddress(DATA_START),
            count: (written_mib << 20) / PAGE_SIZE,
            stride: PAGE_SIZE,
            value: 0x5eed,
        },
        DEADLINE,
    )?;
    Ok(Template::freeze(kvm, &mut vm)?)
}

/// `template` with its written range overwritten by pseudo-random bytes (xorshift64).
fn incompressible(template: &Template, written_mib: u64) -> Result<Template, BenchError> {
    let sources = template.memory().data_sources().map_err(io_err("list template data"))?;
    let memory = FrozenMemory::new_sealed_with(template.size(), |memfd| {
        let mut buf = vec![0u8; 1 << 20];
        for (range, source) in &sources {
            let mut at = range.start;
            while at < range.end {
                let n = ((range.end - at) as usize).min(buf.len());
                source.read_at(&mut buf[..n], at)?;
                memfd.write_all_at(&buf[..n], at)?;
                at += n as u64;
            }
        }
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for mib in 0..written_mib {
            for word in buf.chunks_exact_mut(8) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                word.copy_from_slice(&state.to_le_bytes());
            }
            memfd.write_all_at(&buf, DATA_START + (mib << 20))?;
        }
        Ok(())
    })
    .map_err(|e| BenchError::Setup(format!("build the incompressible template: {e}")))?;
    let state: VmState = serde_json::from_value(serde_json::to_value(template.state()).unwrap_or_default())
        .map_err(|e| BenchError::Setup(format!("copy the VM state: {e}")))?;
    Ok(Template::new(TemplateMemory::single(memory), state))
}

/// Exports and imports `template` `runs` times through a file in `dir`.
fn measure(template: &Template, dir: &std::path::Path, runs: usize) -> Result<Value, BenchError> {
    let path: PathBuf = dir.join(format!("cowvm-bench-portable-{}.oci.tar", std::process::id()));
    let (mut export_ms, mut import_ms) = (Vec::new(), Vec::new());
    let mut summary = archive::ExportSummary::default();
    let mut archive_bytes = 0;
    for _ in 0..runs {
        let file = std::fs::File::create(&path).map_err(io_err("create the archive"))?;
        let started = Instant::now();
        let mut out = BufWriter::with_capacity(1 << 20, &file);
        summary = archive::export(template, &mut out).map_err(|e| BenchError::Setup(e.to_string()))?;
        out.flush().map_err(io_err("write the archive"))?;
        drop(out);
        export_ms.push(started.elapsed().as_secs_f64() * 1e3);
        archive_bytes = file.metadata().map_err(io_err("stat the archive"))?.len();
        let file = std::fs::File::open(&path).map_err(io_err("open the archive"))?;
        let started = Instant::now();
        let imported = archive::import(&file, u64::MAX).map_err(|e| BenchError::Setup(e.to_string()))?;
        import_ms.push(started.elapsed().as_secs_f64() * 1e3);
        drop(imported);
    }
    let _ = std::fs::remove_file(&path);
    Ok(json!({
        "ram_bytes": template.size(),
        "populated_bytes": summary.populated_bytes,
        "archive_bytes": archive_bytes,
        "chunks": summary.chunks,
        "export_ms_p50": median(export_ms),
        "import_ms_p50": median(import_ms),
        "runs": runs,
    }))
}

/// Runs the benchmark and writes `portable.json` into `--out`.
pub fn run(args: &SweepArgs) -> Result<(), BenchError> {
    let out = args.out.as_path();
    prepare(out)?;
    let kvm = Kvm::open()?;
    let runs = if args.quick { 1 } else { 5 };
    let dir = std::env::temp_dir();
    let mut results = serde_json::Map::new();
    for (name, memory_mib, written_mib) in [("demo_256mib_16mib", 256, 16), ("1gib_64mib", 1024, 64)] {
        let template = guest_template(&kvm, memory_mib, written_mib)?;
        let guest = measure(&template, &dir, runs)?;
        let random = measure(&incompressible(&template, written_mib)?, &dir, runs)?;
        eprintln!(
            "[bench] portable {name}: guest-written {} bytes -> archive {} bytes, export {:.1} ms, import {:.1} ms; random data {} -> {} bytes, export {:.1} ms, import {:.1} ms",
            guest["populated_bytes"], guest["archive_bytes"], guest["export_ms_p50"].as_f64().unwrap_or(0.0), guest["import_ms_p50"].as_f64().unwrap_or(0.0),
            random["populated_bytes"], random["archive_bytes"], random["export_ms_p50"].as_f64().unwrap_or(0.0), random["import_ms_p50"].as_f64().unwrap_or(0.0),
        );
        results.insert(name.to_owned(), json!({"guest_written": guest, "random_data": random}));
    }
    let result = Value::Object(results);
    let path = out.join("portable.json");
    write_json(&path, &result)?;
    println!("{}", serde_json::to_string_pretty(&result).unwrap_or_default());
    Ok(())
}
