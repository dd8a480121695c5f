//! `cowvm demo`: the whole product in one command, with nothing running beforehand. It starts an
//! embedded server on a free loopback port and drives it over HTTP like any client: boot a guest,
//! snapshot it, make clones from warm shells, write-probe pages in one clone, and read the
//! sharing back from the host kernel; then it cleans up.

use std::time::{Duration, Instant};

use clap::Args;
use cowvm_vmm::host::MemorySnapshot;
use cowvm_vmm::layout::{as_mib_f64, DATA_START, PAGE_SIZE};

use crate::cli::{print_template_stats, spawn_percentile, CliError};
use crate::client::Client;
use crate::server::model::{
    CloneRequest, ClonesCreated, CreateVm, ProbeRange, ProbeReport, ProbeRequest, RunCommand, RunResult,
    SnapshotCreated, TemplateInfo, TemplateStats, VmInfo, VmStats, WarmRequest, WarmStatus,
};
use crate::server::{self, ServerConfig};

/// Arguments of `cowvm demo`.
#[derive(Args)]
pub struct DemoArgs {
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 256)]
    memory_mib: u64,
    /// MiB of RAM the guest fills with data before it is snapshotted.
    #[arg(long, default_value_t = 16)]
    warmup_mib: u64,
    /// Clones to make.
    #[arg(long, default_value_t = 100)]
    clones: u64,
}

fn step(text: &str) {
    println!("• {text}");
}

/// Runs the demo.
pub fn run(args: &DemoArgs) -> Result<(), CliError> {
    let mut config = ServerConfig::local(0);
    config.limits.warm_shells = 0;
    config.limits.max_clones_per_call = config.limits.max_clones_per_call.max(args.clones as usize);
    let server = server::start(config)?;
    let client = Client::new(&format!("http://{}", server.addr), None);
    println!("cowvm demo: embedded server on http://{}", server.addr);

    let started = Instant::now();
    let create = CreateVm {
        memory_mib: args.memory_mib,
        vcpus: 1,
        warmup_mib: args.warmup_mib,
        kernel: None,
    };
    let vm: VmInfo = client.post("/v1/vms", &create)?;
    let vm_id = vm.id;
    step(&format!(
        "booted {vm_id}: {} MiB guest in long mode, filled {} MiB with data ({:.0} ms)",
        args.memory_mib,
        args.warmup_mib,
        started.elapsed().as_secs_f64() * 1e3
    ));

    let snap: SnapshotCreated = client.post_empty(&format!("/v1/vms/{vm_id}/snapshot"))?;
    let template = snap.template_id;
    step(&format!(
        "snapshotted {vm_id} into {template}: RAM sealed in place, paused {:.0} µs",
        snap.pause_us
    ));

    let before = MemorySnapshot::take().map_err(|e| CliError::Usage(format!("reading /proc: {e}")))?;
    let warm_started = Instant::now();
    let warm = |shells: u64| -> Result<WarmStatus, CliError> {
        Ok(client.post(&format!("/v1/templates/{template}/warm"), &WarmRequest { shells })?)
    };
    warm(args.clones)?;
    loop {
        let info: TemplateInfo = client.get(&format!("/v1/templates/{template}"))?;
        if info.warm_shells as u64 >= args.clones {
            break;
        }
        if warm_started.elapsed() > Duration::from_secs(300) {
            return Err(CliError::Usage("warm shells were not ready after 300 s".into()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    warm(0)?;
    step(&format!(
        "built {} warm VM shells in the background in {:.0} ms",
        args.clones,
        warm_started.elapsed().as_secs_f64() * 1e3
    ));

    let made: ClonesCreated = client.post(
        &format!("/v1/templates/{template}/clones"),
        &CloneRequest { count: args.clones },
    )?;
    let after = MemorySnapshot::take().map_err(|e| CliError::Usage(format!("reading /proc: {e}")))?;
    let clones = &made.clones;
    let delta = after.since(&before);
    let per = |kib: i64| kib as f64 / clones.len().max(1) as f64;
    step(&format!(
        "made {} clones in {:.1} ms: spawn p50 {:.0} µs, p99 {:.0} µs (request → first guest exit)",
        clones.len(),
        made.total_us / 1000.0,
        spawn_percentile(clones, 0.5),
        spawn_percentile(clones, 0.99)
    ));
    step(&format!(
        "host memory per clone: {:.1} KiB user + {:.1} KiB kernel = {:.1} KiB (smaps_rollup and /proc/meminfo deltas)",
        per(delta.private_kib),
        per(delta.kernel_kib),
        per(delta.private_kib + delta.kernel_kib)
    ));

    let first = clones.first().map(|c| c.id.clone()).unwrap_or_default();
    let read = RunCommand {
        command: "checksum".into(),
        start_gpa: DATA_START.0,
        count: 10,
        stride: PAGE_SIZE,
        value: 0,
        vcpu: 0,
    };
    let _: RunResult = client.post(&format!("/v1/vms/{first}/run"), &read)?;
    let targets = ProbeRequest::Range(ProbeRange {
        start_gpa: DATA_START.0,
        pages: 10,
        stride: 4096,
    });
    let probe: ProbeReport = client.post(&format!("/v1/vms/{first}/probes/write"), &targets)?;
    step(&format!(
        "{first}'s guest read 10 pages, then wrote them (write probe): {} of {} went from the template's frame to a private copy (pagemap PFN changed, kpagecount of the template frame fell by one); guest COW fault p50 {:.2} µs vs host-only {:.2} µs",
        probe.became_private,
        probe.pages.iter().filter(|p| p.shared_before && p.before.pfn != p.after.pfn).count(),
        probe.guest_cow_us.p50,
        probe.host_cow_us.map_or(0.0, |m| m.p50)
    ));
    let stats: TemplateStats = client.get(&format!("/v1/templates/{template}/stats"))?;
    print_template_stats(&stats);
    let vm_stats: VmStats = client.get(&format!("/v1/vms/{first}/stats"))?;
    let p = &vm_stats.pages;
    println!(
        "{first}: {} pages present: {} template frames ({} also mapped by others), {} private, {} zero page; {} host mappings (VMAs) behind its RAM; smaps Anonymous {} KiB",
        p.present,
        p.template_backed,
        p.shared,
        p.private,
        p.zero,
        vm_stats.smaps.vmas,
        vm_stats.smaps.anonymous_kib
    );
    let mib = as_mib_f64;
    let closing = format!(
        "{} clones share the template's frames: {:.1} MiB saved (bytes they map beyond one copy of each frame; the template holds {:.1} MiB). The naive baseline of {} full {} MiB copies would be {:.1} MiB; that is not a saving we claim.",
        stats.clones,
        mib(stats.saved_bytes),
        mib(stats.populated_pages * 4096),
        stats.clones,
        args.memory_mib,
        mib(stats.full_copy_bytes),
    );

    for clone in clones {
        client.delete(&format!("/v1/vms/{}", clone.id))?;
    }
    client.delete(&format!("/v1/vms/{vm_id}"))?;
    client.delete(&format!("/v1/templates/{template}"))?;
    server.stop()?;
    step(&format!(
        "cleaned up: every VM and the template are gone ({:.1} s in all)",
        started.elapsed().as_secs_f64()
    ));
    step(&closing);
    Ok(())
}
