//! Write probes and sharing statistics, read from the host kernel (pagemap, kpagecount,
//! kpageflags, smaps, KVM binary stats).

use std::sync::Arc;

use cowvm_tests::{kvm, pagemap, template_with_data, DEADLINE};
use cowvm_vmm::memory::PAGE_SIZE;
use cowvm_vmm::probe::{write_probe, ProbeError, ProbeTargets};
use cowvm_vmm::stats::{template_sharing, vm_sharing, HostView};
use cowvm_vmm::{Clone, CloneEngine, EngineConfig, GuestCommand, Vm};
use vm_memory::GuestAddress;

const MIB: u64 = 1 << 20;

fn engine() -> CloneEngine {
    CloneEngine::new(Arc::new(kvm()), EngineConfig::default()).expect("engine")
}

fn host() -> HostView {
    HostView::open().expect("these tests run as root, with access to /proc/kpagecount")
}

/// Ten data pages, 64 KiB apart from 8 MiB.
fn ten_pages() -> Vec<u64> {
    (0..10).map(|i| 8 * MIB + i * 64 * 1024).collect()
}

fn read_pages(vm: &mut Vm, gpas: &[u64]) {
    for &gpa in gpas {
        vm.execute(
            GuestCommand::Checksum {
                start: GuestAddress(gpa),
                count: 1,
                stride: 8,
            },
            DEADLINE,
        )
        .expect("read");
    }
}

fn three_clones_that_read(engine: &CloneEngine, pages: &[u64]) -> (Arc<cowvm_vmm::Template>, Vec<Clone>) {
    let template = Arc::new(template_with_data(engine.kvm(), 64, pages));
    let mut clones = engine.spawn(&template, 3).expect("spawn").clones;
    assert_eq!(clones.len(), 3);
    for clone in &mut clones {
        read_pages(clone.vm_mut(), pages);
    }
    (template, clones)
}

#[test]
fn test_probing_10_pages_in_one_of_3_clones_changes_exactly_those_frames() {
    let engine = engine();
    let host = host();
    let pages = ten_pages();
    let (template, mut clones) = three_clones_that_read(&engine, &pages);
    let others_before: Vec<_> = clones[1..].iter().map(|c| pagemap(c.vm().ram())).collect();
    let a_before = pagemap(clones[0].vm().ram());

    let report = write_probe(clones[0].vm_mut(), &ProbeTargets::Addresses(pages.clone()), &host, None).expect("probe");
    assert_eq!(report.written, 10);
    assert_eq!(report.became_private, 10);

    let template_frames: Vec<u64> = report.pages.iter().map(|p| p.before.pfn).collect();
    let counts_after = host.kpages.read(&template_frames).expect("kpagecount");
    for page in &report.pages {
        assert!(
            page.shared_before && page.before.file_or_shmem && !page.before.anon,
            "{page:?}"
        );
        assert!(
            page.private_after && page.after.anon && page.after.exclusive,
            "{page:?}"
        );
        assert_ne!(page.after.pfn, page.before.pfn, "a new frame");
        assert_eq!(page.after.kpagecount, 1);
        assert_eq!(
            counts_after[&page.before.pfn].kpagecount,
            page.before.kpagecount - 1,
            "the template frame lost exactly clone A's mapping"
        );
    }

    let a_after = pagemap(clones[0].vm().ram());
    let changed: Vec<u64> = (0..a_before.len())
        .filter(|&i| a_before[i].pfn() != a_after[i].pfn())
        .map(|i| i as u64 * PAGE_SIZE)
        .collect();
    assert_eq!(changed, pages, "exactly the 10 probed frames of clone A changed");
    for (clone, before) in clones[1..].iter().zip(&others_before) {
        assert_eq!(&pagemap(clone.vm().ram()), before, "clones B and C are unchanged");
    }

    let vms: Vec<&Vm> = clones.iter().map(|c| c.vm()).collect();
    let sharing = template_sharing(&template, &vms, 0, &host.pagemap).expect("template stats");
    assert_eq!(
        sharing.histogram.get(&2),
        Some(&10),
        "the 10 probed pages' frames are mapped by N-1 clones"
    );
    assert_eq!(sharing.pages_shared_by_all, sharing.histogram[&3]);
    let copied: Vec<(u64, usize, usize)> = sharing
        .copied_pages
        .iter()
        .map(|c| (c.gpa, c.clones_copied, c.clones_mapping))
        .collect();
    assert_eq!(copied, pages.iter().map(|&gpa| (gpa, 1, 2)).collect::<Vec<_>>());
    assert_eq!(sharing.private_bytes, 10 * PAGE_SIZE);
    let distinct: u64 = sharing.histogram.iter().filter(|(&k, _)| k > 0).map(|(_, v)| v).sum();
    assert_eq!(sharing.saved_bytes, sharing.mapped_bytes - distinct * PAGE_SIZE);
    assert_eq!(sharing.full_copy_bytes, 3 * template.size());
}

#[test]
fn test_a_clone_that_only_reads_has_no_private_pages() {
    let engine = engine();
    let host = host();
    let template = Arc::new(template_with_data(engine.kvm(), 64, &ten_pages()));
    let mut clone = engine.spawn(&template, 1).expect("spawn").clones.pop().expect("clone");
    let all = GuestCommand::Checksum {
        start: GuestAddress(0),
        count: 64 * MIB / PAGE_SIZE,
        stride: PAGE_SIZE,
    };
    clone.vm_mut().execute(all, DEADLINE).expect("read all RAM");
    let stats = vm_sharing(clone.vm(), &host).expect("stats");
    assert_eq!(stats.pages.private, 0);
    assert_eq!(stats.pages.present, stats.pages.total, "every page was read");
    assert_eq!(
        stats.pages.template_backed + stats.pages.zero,
        stats.pages.present,
        "data pages map template frames, holes the zero page"
    );
    assert!(stats.pages.zero > 0 && stats.pages.template_backed > 0);
    assert_eq!(stats.pages.shared, 0, "no other clone maps the frames");
    assert_eq!(stats.pages.untouched, 0);
    assert_eq!(stats.smaps.anonymous_kib, 0);
}

#[test]
fn test_private_and_shared_counts_agree_with_smaps() {
    let engine = engine();
    let host = host();
    let pages = ten_pages();
    let template = Arc::new(template_with_data(engine.kvm(), 64, &pages));
    let mut clones = engine.spawn(&template, 2).expect("spawn").clones;
    for clone in &mut clones {
        // Both clones read the same pages, so every template frame present in one is mapped at
        // least twice (smaps counts it as shared); each writes 7 pages of its own.
        read_pages(clone.vm_mut(), &pages);
        let write = GuestCommand::Write {
            start: GuestAddress(20 * MIB),
            count: 7,
            stride: PAGE_SIZE,
            value: 3,
        };
        clone.vm_mut().execute(write, DEADLINE).expect("write");
    }
    for clone in &clones {
        let stats = vm_sharing(clone.vm(), &host).expect("stats");
        assert_eq!(stats.pages.private, 7);
        assert_eq!(
            stats.pages.private * 4,
            stats.smaps.anonymous_kib,
            "private = smaps Anonymous"
        );
        assert_eq!(
            stats.pages.private * 4,
            stats.smaps.private_dirty_kib,
            "private = smaps Private_Dirty"
        );
        assert_eq!(
            stats.pages.template_backed * 4,
            stats.smaps.rss_kib - stats.pages.private * 4,
            "template_backed = Rss - private"
        );
        assert_eq!(
            stats.pages.shared, stats.pages.template_backed,
            "both clones map the same frames"
        );
        assert_eq!(stats.pages.present * 4, stats.smaps.rss_kib);
        assert_eq!(
            stats.kpagecount_histogram.get(&1),
            Some(&7),
            "the copies are mapped once"
        );
        assert!(
            stats.kpagecount_histogram.keys().any(|&k| k >= 2),
            "template frames are mapped by both clones"
        );
        assert_eq!(stats.bytes.private, 7 * PAGE_SIZE);
    }
}

#[test]
fn test_kvm_stats_move_in_the_expected_direction_during_a_probe() {
    let engine = engine();
    let host = host();
    let pages = ten_pages();
    let (_template, mut clones) = three_clones_that_read(&engine, &pages);
    let (a, rest) = clones.split_at_mut(1);
    let report = write_probe(
        a[0].vm_mut(),
        &ProbeTargets::Addresses(pages),
        &host,
        Some(rest[0].vm()),
    )
    .expect("probe");
    let k = report.kvm;
    let exits = k.exits.expect("KVM publishes vCPU exits");
    assert!(exits >= 20, "two guest runs per page exit at least 20 times: {k:?}");
    let (pf_taken, pf_fixed) = (k.pf_taken.expect("pf_taken"), k.pf_fixed.expect("pf_fixed"));
    let emulated = k.insn_emulation.expect("insn_emulation");
    assert!(
        pf_taken >= 0 && pf_fixed >= 0 && emulated >= 0,
        "cumulative counters never go down: {k:?}"
    );
    // Each guest store reached memory either through a second-level fault KVM fixed (hardware
    // virtualisation) or through KVM's instruction emulator (kvm_pvm, where every instruction is
    // emulated and the store is a copy_to_user into the memslot's host mapping).
    assert!(
        pf_fixed >= 10 || emulated >= 10 * 2 * 5,
        "the writes went through KVM: {k:?}"
    );
    assert!(k.pages_4k.is_some() && k.pages_2m.is_some(), "VM stats are published");
    assert!(report.guest_cow_us.p50 > 0.0, "{:?}", report.guest_cow_us);
    assert!(report.host_cow_us.expect("baseline given").p50 > 0.0);
    let stats = vm_sharing(clones[0].vm(), &host).expect("stats");
    assert!(stats.kvm.vm.contains_key("pages_4k") && stats.kvm.vcpus[0].contains_key("exits"));
}

#[test]
fn test_guest_page_walk_agrees_with_kvm_translate() {
    let engine = engine();
    let template = Arc::new(template_with_data(engine.kvm(), 64, &[]));
    let mut clone = engine.spawn(&template, 1).expect("spawn").clones.pop().expect("clone");
    for gva in [0x1000, 0x10_0000, 8 * MIB + 0x123, 63 * MIB + 0xff8] {
        let ours = clone.vm_mut().translate(gva).expect("translate").gpa;
        let kvms = clone.vm().vcpu().kvm_translate(gva).expect("KVM_TRANSLATE");
        assert_eq!(Some(ours), kvms, "gva {gva:#x}");
    }
    assert!(clone.vm_mut().translate(1 << 40).is_err(), "beyond the identity map");
    assert!(clone.vm_mut().translate(0x8000_0000_0000).is_err(), "non-canonical");
}

#[test]
fn test_bad_probe_targets_are_refused_and_the_clone_still_works() {
    let engine = engine();
    let host = host();
    let template = Arc::new(template_with_data(engine.kvm(), 64, &[]));
    let mut clone = engine.spawn(&template, 1).expect("spawn").clones.pop().expect("clone");
    let vm = clone.vm_mut();
    let cases = [
        ProbeTargets::Addresses(vec![]),
        ProbeTargets::Addresses(vec![8 * MIB, 8 * MIB + 8]),
        ProbeTargets::Stride {
            start: 8 * MIB,
            pages: 5000,
            stride: PAGE_SIZE,
        },
        ProbeTargets::Stride {
            start: 8 * MIB,
            pages: 2,
            stride: 8,
        },
        ProbeTargets::Addresses(vec![64 * MIB]),
        ProbeTargets::Addresses(vec![0x9000]),
        ProbeTargets::Addresses(vec![0x8000_0000_0000]),
    ];
    for targets in cases {
        let err = write_probe(vm, &targets, &host, None)
            .err()
            .unwrap_or_else(|| panic!("{targets:?} accepted"));
        assert!(!matches!(err, ProbeError::Stats(_)), "{targets:?}: {err}");
    }
    assert!(
        vm_sharing(vm, &host).expect("stats").pages.private == 0,
        "refused probes wrote nothing"
    );
    let ok = write_probe(
        vm,
        &ProbeTargets::Stride {
            start: 8 * MIB,
            pages: 2,
            stride: PAGE_SIZE,
        },
        &host,
        None,
    )
    .expect("valid probe");
    assert_eq!(ok.written, 2);
}

#[test]
fn test_without_the_rights_to_read_frames_the_error_names_what_is_missing() {
    let exe = std::env::current_exe().expect("test binary");
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"])
        .arg(exe)
        .args(["--exact", "unprivileged_helper", "--ignored", "--nocapture"])
        .output()
        .expect("run setpriv");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        text.contains("unprivileged error: cannot open /proc/kpagecount"),
        "{text}"
    );
    assert!(text.contains("CAP_SYS_ADMIN"), "{text}");
}

/// Run by the test above as an unprivileged user.
#[test]
#[ignore = "runs only as an unprivileged helper"]
fn unprivileged_helper() {
    match HostView::open() {
        Ok(_) => panic!("opened /proc/kpagecount without privileges"),
        Err(e) => println!("unprivileged error: {e}"),
    }
}
