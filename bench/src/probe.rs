//! `cowvm bench probe`: what a copy-on-write fault costs when the guest writes, when the host
//! writes, and when the guest reads first; how long a sharing scan takes; and a self-check of a
//! 10-page probe in one of 3 clones, all read from the host kernel.

use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;
use cowvm_vmm::memory::PAGE_SIZE;
use cowvm_vmm::probe::{host_cow_times, write_probe, ProbeTargets};
use cowvm_vmm::stats::{vm_sharing, HostView};
use cowvm_vmm::{CloneEngine, EngineConfig, GuestCommand, Kvm};
use serde_json::json;
use vm_memory::GuestAddress;

use super::stats::Percentiles;
use super::{make_template, write_json, BenchError, DEADLINE};

/// Arguments of `cowvm bench probe`.
#[derive(Args, Clone)]
pub struct ProbeArgs {
    /// Guest RAM of the template, in MiB.
    #[arg(long, default_value_t = 256)]
    pub memory_mib: u64,
    /// Pages written for each fault-cost figure.
    #[arg(long, default_value_t = 1000)]
    pub pages: u64,
    /// Pages the guest reads before the sharing scans are timed.
    #[arg(long, default_value_t = 16384)]
    pub present_pages: u64,
    /// Sharing scans timed.
    #[arg(long, default_value_t = 20)]
    pub scans: usize,
    /// Write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

const MIB: u64 = 1 << 20;

/// Runs the benchmark: prints the summary and writes `--json`.
pub fn run(args: &ProbeArgs) -> Result<(), BenchError> {
    let results = measure(args)?;
    print_summary(&results);
    if let Some(path) = &args.json {
        write_json(path, &results)?;
    }
    Ok(())
}

/// Measures everything; returns the JSON results.
pub fn measure(args: &ProbeArgs) -> Result<serde_json::Value, BenchError> {
    let kvm = Arc::new(Kvm::open()?);
    let engine = CloneEngine::new(Arc::clone(&kvm), EngineConfig::default())?;
    let host = HostView::open()?;
    let progress = |step: &str| eprintln!("[bench probe] {step}");
    let template = make_template(&kvm, args.memory_mib)?;
    let usable = args.memory_mib.saturating_sub(16) * MIB / PAGE_SIZE;
    let pages = args.pages.clamp(1, usable.min(cowvm_vmm::probe::MAX_PROBE_PAGES));
    let first = 16 * MIB;
    let fresh = ProbeTargets::Stride {
        start: first,
        pages,
        stride: PAGE_SIZE,
    };

    progress("self-check: probe 10 pages in one of 3 clones");
    let check = self_check(&engine, &template, &host)?;

    progress(&format!("guest write faults on {pages} untouched pages"));
    let mut batch = engine.spawn(&template, 3)?.clones;
    let guest = write_probe(batch[0].vm_mut(), &fresh, &host, None)?;
    let guest_faults: Vec<f64> = guest.pages.iter().map(|p| p.write_fault_us).collect();

    progress(&format!("host-only writes to {pages} untouched pages"));
    let gpas: Vec<u64> = (0..pages).map(|i| first + i * PAGE_SIZE).collect();
    let host_faults = host_cow_times(batch[1].vm(), &gpas)?;

    progress(&format!("guest reads then writes {pages} pages"));
    let read = GuestCommand::Checksum {
        start: GuestAddress(first),
        count: pages,
        stride: PAGE_SIZE,
    };
    batch[2].vm_mut().execute(read, DEADLINE)?;
    let read_then_write = write_probe(batch[2].vm_mut(), &fresh, &host, None)?;
    let rtw: Vec<f64> = read_then_write.pages.iter().map(|p| p.write_fault_us).collect();
    for clone in batch.drain(..) {
        engine.destroy(clone);
    }

    let present = args.present_pages.clamp(1, args.memory_mib * MIB / PAGE_SIZE);
    progress(&format!("sharing scans of a clone with {present} present pages"));
    let mut clone = engine
        .spawn(&template, 1)?
        .clones
        .pop()
        .ok_or_else(|| BenchError::Setup("no clone".into()))?;
    let touch = GuestCommand::Checksum {
        start: GuestAddress(0),
        count: present,
        stride: PAGE_SIZE,
    };
    clone.vm_mut().execute(touch, DEADLINE)?;
    let mut scans = Vec::with_capacity(args.scans);
    let mut present_pages = 0;
    for _ in 0..args.scans.max(1) {
        let stats = vm_sharing(clone.vm(), &host)?;
        present_pages = stats.pages.present;
        scans.push(stats.scan_us / 1000.0);
    }
    engine.destroy(clone);

    let guest_cow = Percentiles::of(&guest_faults);
    let host_cow = Percentiles::of(&host_faults);
    let results = json!({
        "memory_mib": args.memory_mib,
        "pages": pages,
        "guest_cow_us": guest_cow,
        "host_cow_us": host_cow,
        "read_then_write_us": Percentiles::of(&rtw),
        "guest_over_host_cow": guest_cow.p50 / host_cow.p50,
        "guest_write_run_us": Percentiles::of(&guest.pages.iter().map(|p| p.first_write_us).collect::<Vec<_>>()),
        "guest_private_write_run_us": Percentiles::of(&guest.pages.iter().map(|p| p.private_write_us).collect::<Vec<_>>()),
        "kvm_deltas_during_guest_probe": guest.kvm,
        "scan_ms": { "p50": Percentiles::of(&scans).p50, "p99": Percentiles::of(&scans).p99, "present_pages": present_pages },
        "check": check,
    });
    Ok(results)
}

/// Three clones read 10 pages; the guest of the first writes them. Counts, from the kernel,
/// what changed.
fn self_check(
    engine: &CloneEngine,
    template: &Arc<cowvm_vmm::Template>,
    host: &HostView,
) -> Result<serde_json::Value, BenchError> {
    let pages: Vec<u64> = (0..10).map(|i| 8 * MIB + i * 64 * 1024).collect();
    let mut clones = engine.spawn(template, 3)?.clones;
    for clone in &mut clones {
        for &gpa in &pages {
            clone.vm_mut().execute(
                GuestCommand::Checksum {
                    start: GuestAddress(gpa),
                    count: 1,
                    stride: 8,
                },
                DEADLINE,
            )?;
        }
    }
    let report = write_probe(clones[0].vm_mut(), &ProbeTargets::Addresses(pages), host, None)?;
    let frames: Vec<u64> = report.pages.iter().map(|p| p.before.pfn).collect();
    let after = host.kpages.read(&frames).map_err(cowvm_vmm::stats::StatsError::from)?;
    let dropped = report
        .pages
        .iter()
        .filter(|p| {
            after
                .get(&p.before.pfn)
                .is_some_and(|f| f.kpagecount + 1 == p.before.kpagecount)
        })
        .count();
    let mut other_private = 0;
    for clone in &clones[1..] {
        other_private += vm_sharing(clone.vm(), host)?.pages.private;
    }
    for clone in clones {
        engine.destroy(clone);
    }
    Ok(json!({
        "written": report.written,
        "became_private": report.became_private,
        "other_clone_private": other_private,
        "template_page_count_dropped": dropped,
    }))
}

/// Prints the human summary.
pub fn print_summary(r: &serde_json::Value) {
    let f = |v: &serde_json::Value| v.as_f64().unwrap_or(f64::NAN);
    println!(
        "cowvm bench probe: {} MiB template, {} pages per figure",
        r["memory_mib"], r["pages"]
    );
    println!(
        "  COW fault p50: guest write {:.2} µs (p99 {:.2}), host-only write {:.2} µs, guest read-then-write {:.2} µs; guest/host {:.2}×",
        f(&r["guest_cow_us"]["p50"]),
        f(&r["guest_cow_us"]["p99"]),
        f(&r["host_cow_us"]["p50"]),
        f(&r["read_then_write_us"]["p50"]),
        f(&r["guest_over_host_cow"])
    );
    println!(
        "  sharing scan of {} present pages: p50 {:.2} ms",
        r["scan_ms"]["present_pages"],
        f(&r["scan_ms"]["p50"])
    );
    let c = &r["check"];
    println!(
        "  self-check (10 pages probed in one of 3 clones): written {}, became private {}, private pages in the other clones {}, template frames whose kpagecount dropped by one {}",
        c["written"], c["became_private"], c["other_clone_private"], c["template_page_count_dropped"]
    );
}
