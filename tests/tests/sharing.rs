//! Sharing statistics against an independent reader (`cowvm_tests::kernel`: its own pagemap,
//! kpagecount, kpageflags and `SEEK_DATA` code) after clones, probes, a reset, a live fork and
//! reads of template holes; and templates whose populated pages never change after freezing.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::AsFd;
use std::sync::Arc;

use cowvm_tests::kernel::{data_pages, Kernel};
use cowvm_tests::{kvm, template_with_data, DEADLINE};
use cowvm_vmm::probe::{write_probe, ProbeTargets};
use cowvm_vmm::stats::{template_sharing, vm_sharing, HostView, TemplateSharing};
use cowvm_vmm::{CloneEngine, EngineConfig, GuestCommand, Template, Vm, VmConfig};
use vm_memory::GuestAddress;

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;
const RAM_MIB: u64 = 64;
/// Template data: ten pages 64 KiB apart from 8 MiB (written by the guest before freezing).
const DATA: [u64; 10] = [
    8 * MIB,
    8 * MIB + 0x10000,
    8 * MIB + 0x20000,
    8 * MIB + 0x30000,
    8 * MIB + 0x40000,
    8 * MIB + 0x50000,
    8 * MIB + 0x60000,
    8 * MIB + 0x70000,
    8 * MIB + 0x80000,
    8 * MIB + 0x90000,
];
/// Where the hole reads start: far above every page the template holds.
const HOLES_FROM: u64 = 24 * MIB;
const HOLE_PAGES: u64 = 1000;

fn engine() -> CloneEngine {
    CloneEngine::new(Arc::new(kvm()), EngineConfig::default()).expect("engine")
}

fn host() -> HostView {
    HostView::open().expect("these tests run as root, with access to /proc/kpagecount")
}

/// Populated pages of every layer of `template`, by `SEEK_DATA`.
fn populated(template: &Template) -> u64 {
    template.memory().layers().iter().map(|l| data_pages(l.as_fd())).sum()
}

/// Checks every field of cowvm's template statistics against the independent reader.
fn check_template(template: &Template, vms: &[&Vm], kernel: &Kernel, host: &HostView) -> TemplateSharing {
    let got = template_sharing(template, vms, 3, &host.pagemap).expect("template stats");
    let mut frames: HashMap<u64, (u64, usize)> = HashMap::new();
    let mut copies: BTreeMap<u64, usize> = BTreeMap::new();
    let (mut mapped, mut private, mut zero) = (0u64, 0u64, 0u64);
    for vm in vms {
        for page in kernel.present_pages(vm.ram().host_address(), vm.ram().size()) {
            if page.zero() {
                zero += 1;
            } else if page.file {
                mapped += 1;
                frames.entry(page.pfn).or_insert((page.index, 0)).1 += 1;
            } else {
                private += 1;
                *copies.entry(page.index).or_insert(0) += 1;
            }
        }
    }
    let populated = populated(template);
    let mut histogram: BTreeMap<usize, u64> = BTreeMap::new();
    for &(_, n) in frames.values() {
        *histogram.entry(n).or_insert(0) += 1;
    }
    let unmapped = populated - frames.len() as u64;
    if unmapped > 0 {
        histogram.insert(0, unmapped);
    }
    let n = vms.len();
    let by_page: HashMap<u64, usize> = frames.values().copied().collect();
    assert_eq!(got.clones, n, "clones");
    assert_eq!(got.warm_shells, 3, "warm_shells as given");
    assert_eq!(got.pages, RAM_MIB * MIB / PAGE, "pages");
    assert_eq!(got.layers, template.memory().layers().len(), "layers");
    assert_eq!(got.populated_pages, populated, "populated_pages");
    assert_eq!(got.histogram, histogram, "histogram");
    let all = if n > 0 {
        histogram.get(&n).copied().unwrap_or(0)
    } else {
        0
    };
    assert_eq!(got.pages_shared_by_all, all, "pages_shared_by_all");
    assert_eq!(got.mapped_bytes, mapped * PAGE, "mapped_bytes");
    assert_eq!(got.private_bytes, private * PAGE, "private_bytes");
    assert_eq!(got.zero_bytes, zero * PAGE, "zero_bytes");
    assert_eq!(got.saved_bytes, (mapped - frames.len() as u64) * PAGE, "saved_bytes");
    assert_eq!(got.full_copy_bytes, n as u64 * RAM_MIB * MIB, "full_copy_bytes");
    let own = data_pages(template.memory().own_layer().as_fd()) * PAGE;
    assert_eq!(got.own_bytes, own, "own_bytes");
    let listed: Vec<(u64, usize, usize)> = got
        .copied_pages
        .iter()
        .map(|c| (c.gpa, c.clones_copied, c.clones_mapping))
        .collect();
    let want: Vec<(u64, usize, usize)> = copies
        .iter()
        .map(|(&page, &c)| (page * PAGE, c, by_page.get(&page).copied().unwrap_or(0)))
        .collect();
    assert_eq!(listed, want, "copied_pages");
    assert!(!got.copied_pages_truncated);
    assert!(
        got.saved_bytes <= populated * PAGE * n as u64,
        "saved is bounded by populated pages × clones"
    );
    got
}

/// Per-VM counts as the independent reader sees them:
/// (total, present, template_backed, shared, private, zero, untouched).
type Counts = (u64, u64, u64, u64, u64, u64, u64);

/// Checks every page count of cowvm's per-VM statistics against the independent reader.
fn check_vm(vm: &Vm, kernel: &Kernel, host: &HostView) -> Counts {
    let got = vm_sharing(vm, host).expect("VM stats");
    let from_template = vm.ram().template().is_some();
    let pages = kernel.present_pages(vm.ram().host_address(), vm.ram().size());
    let total = vm.ram().size() / PAGE;
    let (mut backed, mut shared, mut private, mut zero) = (0, 0, 0, 0);
    let mut histogram: BTreeMap<u64, u64> = BTreeMap::new();
    for page in &pages {
        *histogram.entry(page.count).or_insert(0) += 1;
        if page.zero() {
            zero += 1;
            continue;
        }
        shared += u64::from(page.count >= 2);
        if page.file && from_template {
            backed += 1;
        } else {
            private += 1;
        }
    }
    let present = pages.len() as u64;
    let want = (total, present, backed, shared, private, zero, total - present);
    let p = got.pages;
    assert_eq!(
        (
            p.total,
            p.present,
            p.template_backed,
            p.shared,
            p.private,
            p.zero,
            p.untouched
        ),
        want,
        "pages (total, present, template_backed, shared, private, zero, untouched)"
    );
    let b = got.bytes;
    assert_eq!(
        (
            b.total,
            b.present,
            b.template_backed,
            b.shared,
            b.private,
            b.zero,
            b.untouched
        ),
        (
            want.0 * PAGE,
            want.1 * PAGE,
            want.2 * PAGE,
            want.3 * PAGE,
            want.4 * PAGE,
            want.5 * PAGE,
            want.6 * PAGE
        ),
        "bytes"
    );
    assert_eq!(got.kpagecount_histogram, histogram, "kpagecount_histogram");
    assert_eq!(got.special_pages.zero_page, zero, "special_pages.zero_page");
    want
}

fn read_pages(vm: &mut Vm, start: u64, count: u64) {
    let read = GuestCommand::Checksum {
        start: GuestAddress(start),
        count,
        stride: PAGE,
    };
    vm.execute(read, DEADLINE).expect("guest read");
}

#[test]
fn test_sharing_stats_match_an_independent_reader_through_clones_probes_reset_and_live_fork() {
    let engine = engine();
    let host = host();
    let kernel = Kernel::open();
    let template = Arc::new(template_with_data(engine.kvm(), RAM_MIB, &DATA));
    let populated_at_freeze = populated(&template);
    let mut clones = engine.spawn(&template, 10).expect("spawn").clones;
    assert_eq!(clones.len(), 10);

    // 10 clones, each having read the template's data pages.
    for clone in &mut clones {
        for &gpa in &DATA {
            read_pages(clone.vm_mut(), gpa, 1);
        }
    }
    let vms: Vec<&Vm> = clones.iter().map(|c| c.vm()).collect();
    let stats = check_template(&template, &vms, &kernel, &host);
    assert!(
        stats.pages_shared_by_all >= DATA.len() as u64,
        "every clone maps the data frames"
    );
    assert_eq!(
        stats.histogram.values().sum::<u64>(),
        stats.populated_pages,
        "{stats:?}"
    );
    assert!(stats.saved_bytes <= 9 * stats.populated_pages * PAGE, "{stats:?}");
    for clone in &clones {
        let (.., private, _, _) = check_vm(clone.vm(), &kernel, &host);
        assert_eq!(private, 0, "a clone that only read has no private pages");
    }

    // Probes on two clones: 3 and 5 data pages.
    for (clone, n) in clones.iter_mut().zip([3usize, 5]) {
        let targets = ProbeTargets::Addresses(DATA[..n].to_vec());
        let report = write_probe(clone.vm_mut(), &targets, &host, None).expect("probe");
        assert_eq!(report.became_private, n);
    }
    let vms: Vec<&Vm> = clones.iter().map(|c| c.vm()).collect();
    let stats = check_template(&template, &vms, &kernel, &host);
    let copied: Vec<(u64, usize, usize)> = stats
        .copied_pages
        .iter()
        .filter(|c| DATA.contains(&c.gpa))
        .map(|c| (c.gpa, c.clones_copied, c.clones_mapping))
        .collect();
    assert_eq!(&copied[..3], &[(DATA[0], 2, 8), (DATA[1], 2, 8), (DATA[2], 2, 8)]);
    assert_eq!(&copied[3..], &[(DATA[3], 1, 9), (DATA[4], 1, 9)]);
    for clone in &clones {
        check_vm(clone.vm(), &kernel, &host);
    }

    // A reset drops clone 0's copies.
    engine.reset(&mut clones[0]).expect("reset");
    let vms: Vec<&Vm> = clones.iter().map(|c| c.vm()).collect();
    check_template(&template, &vms, &kernel, &host);
    let (.., private, _, _) = check_vm(clones[0].vm(), &kernel, &host);
    assert_eq!(private, 0, "reset leaves no private page");

    // A live fork of clone 1: a layered template holding only clone 1's private pages.
    let fork = engine.live_fork(clones[1].vm_mut(), 2).expect("live fork");
    let fork_vms: Vec<&Vm> = fork.batch.clones.iter().map(|c| c.vm()).collect();
    let forked = check_template(&fork.template, &fork_vms, &kernel, &host);
    assert_eq!(forked.layers, 2);
    assert!(forked.own_bytes >= 5 * PAGE, "the overlay holds clone 1's copies");
    assert_eq!(forked.populated_pages, populated_at_freeze + forked.own_bytes / PAGE);
    for clone in &fork.batch.clones {
        check_vm(clone.vm(), &kernel, &host);
    }
    let vms: Vec<&Vm> = clones.iter().map(|c| c.vm()).collect();
    check_template(&template, &vms, &kernel, &host);
    assert_eq!(populated(&template), populated_at_freeze, "the template never grows");
}

#[test]
fn test_reading_1000_hole_pages_in_10_clones_maps_the_zero_page_and_never_grows_the_template() {
    let engine = engine();
    let host = host();
    let kernel = Kernel::open();
    let template = Arc::new(template_with_data(engine.kvm(), RAM_MIB, &DATA));
    let mut clones = engine.spawn(&template, 10).expect("spawn").clones;
    let vms: Vec<&Vm> = clones.iter().map(|c| c.vm()).collect();
    let before = check_template(&template, &vms, &kernel, &host);
    let backed_before: Vec<u64> = clones.iter().map(|c| check_vm(c.vm(), &kernel, &host).2).collect();

    for (i, clone) in clones.iter_mut().enumerate() {
        read_pages(clone.vm_mut(), HOLES_FROM + i as u64 * HOLE_PAGES * PAGE, HOLE_PAGES);
    }

    let vms: Vec<&Vm> = clones.iter().map(|c| c.vm()).collect();
    let after = check_template(&template, &vms, &kernel, &host);
    assert_eq!(
        after.populated_pages, before.populated_pages,
        "populated pages unchanged"
    );
    assert_eq!(populated(&template), before.populated_pages, "SEEK_DATA agrees");
    assert_eq!(after.mapped_bytes, before.mapped_bytes, "no new template frames mapped");
    assert_eq!(after.zero_bytes, before.zero_bytes + 10 * HOLE_PAGES * PAGE);
    for (i, clone) in clones.iter().enumerate() {
        let (.., backed, _, private, zero, _) = check_vm(clone.vm(), &kernel, &host);
        assert_eq!(backed, backed_before[i], "reads of holes are not template_backed");
        assert_eq!(private, 0, "reads allocate nothing private");
        assert!(zero >= HOLE_PAGES, "clone {i}: {zero} zero pages");
        let start = clone.vm().ram().host_address() + HOLES_FROM + i as u64 * HOLE_PAGES * PAGE;
        let read = kernel.present_pages(start, HOLE_PAGES * PAGE);
        assert_eq!(read.len() as u64, HOLE_PAGES, "every read page is mapped");
        assert!(
            read.iter().all(|p| p.zero() && !p.file),
            "kpageflags reports the zero page"
        );
    }
}

#[test]
fn test_a_vm_that_owns_its_ram_reports_nothing_shared_or_template_backed() {
    let kernel = Kernel::open();
    let host = host();
    let (mut vm, _) = Vm::boot(&kvm(), &VmConfig::builtin(RAM_MIB)).expect("boot");
    read_pages(&mut vm, 8 * MIB, 16);
    let (total, present, backed, shared, private, zero, untouched) = check_vm(&vm, &kernel, &host);
    assert_eq!((backed, shared), (0, 0));
    assert_eq!(private + zero, present);
    assert_eq!(present + untouched, total);
}
