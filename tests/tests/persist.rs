//! Templates saved to a state directory load back and share pages across clones; layered
//! templates are saved as their own overlay plus a reference to their parent; the memory checksum
//! follows content, not sparseness; and the start-up pass moves whatever it refuses into
//! `quarantine/` unchanged, removes only cowvm's own leftovers, never opens non-regular files and
//! never hands out an id twice.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cowvm_tests::{guest_read as read, kvm, pagemap, template_with_data, DEADLINE};
use cowvm_vmm::memory::PAGE_SIZE;
use cowvm_vmm::persist::{self, PersistError};
use cowvm_vmm::{CloneEngine, EngineConfig, GuestCommand, Template};
use serde_json::Value;
use vm_memory::GuestAddress;

const MIB: u64 = 1 << 20;
const CRC: crc::Crc<u64> = crc::Crc::<u64>::new(&crc::CRC_64_XZ);

fn state_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cowvm-persist-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create state dir");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    dir
}

/// Names in `dir`, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut all: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
                .collect()
        })
        .unwrap_or_default();
    all.sort();
    all
}

/// The memory file a template's state file names (the only `<id>.*.mem` after one save).
fn memory_file(dir: &Path, id: &str) -> PathBuf {
    let name = names(dir)
        .into_iter()
        .find(|n| n.starts_with(&format!("{id}.")) && n.ends_with(".mem"))
        .expect("memory file");
    dir.join(name)
}

/// Rewrites a state file's header version and payload, with a correct payload checksum.
fn rewrite(path: &Path, version: u32, edit: impl FnOnce(&mut Value)) {
    let bytes = std::fs::read(path).expect("read");
    let mut payload: Value = serde_json::from_slice(&bytes[28..]).expect("payload");
    edit(&mut payload);
    let body = serde_json::to_vec(&payload).expect("encode");
    let mut out = bytes[..8].to_vec();
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&CRC.checksum(&body).to_le_bytes());
    out.extend_from_slice(&body);
    std::fs::write(path, out).expect("write");
}

fn ids(startup: &persist::Startup) -> Vec<String> {
    startup.loaded.iter().map(|t| t.id.clone()).collect()
}

fn write_77_at_12_mib(vm: &mut cowvm_vmm::Vm) {
    vm.execute(
        GuestCommand::Write {
            start: GuestAddress(12 * MIB),
            count: 1,
            stride: 8,
            value: 77,
        },
        DEADLINE,
    )
    .expect("write");
}

#[test]
fn test_saved_template_loads_back_and_its_clones_share_pages() {
    let dir = state_dir("roundtrip");
    let engine = CloneEngine::new(Arc::new(kvm()), EngineConfig::default()).expect("engine");
    let pages = [8 * MIB, 9 * MIB, 40 * MIB];
    let template = template_with_data(engine.kvm(), 64, &pages);
    persist::save(&dir, "tpl-7", &template).expect("save");

    for entry in std::fs::read_dir(&dir).expect("list") {
        let meta = entry.expect("entry").metadata().expect("stat");
        assert_eq!(meta.permissions().mode() & 0o777, 0o600, "state files are private");
    }
    let meta = std::fs::metadata(memory_file(&dir, "tpl-7")).expect("stat");
    assert!(
        meta.blocks() * 512 < meta.len() / 4,
        "the memory file is sparse: {} blocks for {} bytes",
        meta.blocks(),
        meta.len()
    );

    let startup = persist::load_all(&dir).expect("load");
    assert!(startup.refused.is_empty(), "{:?}", startup.refused);
    assert_eq!(ids(&startup), ["tpl-7"]);
    let reloaded = Arc::new(startup.loaded.into_iter().next().expect("one").template);
    let mut clones = engine.spawn(&reloaded, 2).expect("spawn").clones;
    for clone in &mut clones {
        for &gpa in &pages {
            assert_eq!(read(clone.vm_mut(), gpa), gpa | 0xfeed, "the data came back");
        }
    }
    let a = pagemap(clones[0].vm().ram())[(8 * MIB / PAGE_SIZE) as usize];
    let b = pagemap(clones[1].vm().ram())[(8 * MIB / PAGE_SIZE) as usize];
    assert!(
        a.file_or_shared() && a.pfn() == b.pfn(),
        "both clones map the same reloaded frame"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn test_layered_template_saved_whole_loads_flat() {
    let dir = state_dir("flat");
    let engine = CloneEngine::new(Arc::new(kvm()), EngineConfig::default()).expect("engine");
    let base = Arc::new(template_with_data(engine.kvm(), 64, &[8 * MIB]));
    let mut clone = engine.spawn(&base, 1).expect("spawn").clones.pop().expect("clone");
    write_77_at_12_mib(clone.vm_mut());
    let layered = Template::freeze(engine.kvm(), clone.vm_mut()).expect("freeze clone");
    persist::save(&dir, "tpl-layered", &layered).expect("save");
    let loaded = persist::load(&persist::state_path(&dir, "tpl-layered")).expect("load");
    assert_eq!(loaded.template.memory().depth(), 1, "saved whole, it loads flat");
    let mut child = engine
        .spawn(&Arc::new(loaded.template), 1)
        .expect("spawn")
        .clones
        .pop()
        .expect("child");
    assert_eq!(read(child.vm_mut(), 8 * MIB), (8 * MIB) | 0xfeed);
    assert_eq!(read(child.vm_mut(), 12 * MIB), 77);
    std::fs::remove_dir_all(&dir).ok();
}

/// Issue 12 item 4.
#[test]
fn test_layered_template_is_saved_as_its_overlay_plus_its_parent_and_loads_after_it() {
    let dir = state_dir("layered");
    let engine = CloneEngine::new(Arc::new(kvm()), EngineConfig::default()).expect("engine");
    let data: Vec<u64> = (0..64).map(|i| 16 * MIB + i * PAGE_SIZE).collect();
    let base = Arc::new(template_with_data(engine.kvm(), 64, &data));
    let mut clone = engine.spawn(&base, 1).expect("spawn").clones.pop().expect("clone");
    write_77_at_12_mib(clone.vm_mut());
    let layered = Template::freeze(engine.kvm(), clone.vm_mut()).expect("freeze clone");
    assert_eq!(layered.memory().depth(), 2);
    persist::save(&dir, "tpl-1", &base).expect("save parent");
    persist::save_layered(&dir, "tpl-2", &layered, "tpl-1", &base).expect("save layered");

    let allocated = |id: &str| std::fs::metadata(memory_file(&dir, id)).expect("stat").blocks() * 512;
    let (parent_bytes, own_bytes) = (allocated("tpl-1"), allocated("tpl-2"));
    assert!(
        own_bytes <= 16 * PAGE_SIZE && own_bytes < parent_bytes / 4,
        "the layered template stores only its overlay: {own_bytes} bytes on disk, its parent {parent_bytes}"
    );

    // Saved in the other order of names too: a child named before its parent loads after it.
    let startup = persist::load_all(&dir).expect("load");
    assert!(startup.refused.is_empty(), "{:?}", startup.refused);
    assert_eq!(ids(&startup), ["tpl-1", "tpl-2"]);
    let (parent, child) = (&startup.loaded[0], &startup.loaded[1]);
    assert_eq!(child.parent.as_deref(), Some("tpl-1"));
    assert!(child.template.memory().is_layered_on(parent.template.memory()));
    let template = Arc::new(startup.loaded.into_iter().nth(1).expect("child").template);
    let mut grandchild = engine.spawn(&template, 1).expect("spawn").clones.pop().expect("clone");
    assert_eq!(read(grandchild.vm_mut(), 12 * MIB), 77, "the overlay's data");
    assert_eq!(
        read(grandchild.vm_mut(), 16 * MIB),
        (16 * MIB) | 0xfeed,
        "the parent's data"
    );

    // A clone frozen before it wrote anything is its parent's memory: saved as an empty overlay,
    // it loads as the parent's memory again.
    let mut idle = engine.spawn(&base, 1).expect("spawn").clones.pop().expect("clone");
    let same = Template::freeze(engine.kvm(), idle.vm_mut()).expect("freeze idle clone");
    assert!(same.memory().same_as(base.memory()));
    persist::save_layered(&dir, "tpl-3", &same, "tpl-1", &base).expect("save");
    let startup = persist::load_all(&dir).expect("load");
    assert_eq!(ids(&startup), ["tpl-1", "tpl-2", "tpl-3"]);
    assert!(startup.loaded[2]
        .template
        .memory()
        .same_as(startup.loaded[0].template.memory()));
    std::fs::remove_file(persist::state_path(&dir, "tpl-3")).expect("drop tpl-3");

    // Without its parent, the layered template is refused and moved aside, not deleted.
    let aside = state_dir("layered-aside");
    for name in names(&dir).into_iter().filter(|n| n.starts_with("tpl-1.")) {
        std::fs::rename(dir.join(&name), aside.join(&name)).expect("move parent away");
    }
    let startup = persist::load_all(&dir).expect("load");
    assert!(startup.loaded.is_empty());
    assert!(
        startup
            .refused
            .iter()
            .any(|l| l.contains("tpl-2.state") && l.contains("parent template tpl-1")),
        "{:?}",
        startup.refused
    );
    let quarantined = names(&dir.join("quarantine"));
    assert!(quarantined.contains(&"tpl-2.state".to_owned()), "{quarantined:?}");
    assert_eq!(
        quarantined.iter().filter(|n| n.ends_with(".mem")).count(),
        1,
        "{quarantined:?}"
    );
    std::fs::remove_dir_all(&dir).ok();
    std::fs::remove_dir_all(&aside).ok();
}

/// Issue 18 item 3.
#[test]
fn test_a_template_survives_cp_sparse_never_and_sparse_always_of_its_memory_file() {
    let dir = state_dir("sparse");
    let template = template_with_data(&kvm(), 16, &[8 * MIB, 12 * MIB]);
    persist::save(&dir, "tpl-1", &template).expect("save");
    let memory = memory_file(&dir, "tpl-1");
    let sparse_blocks = std::fs::metadata(&memory).expect("stat").blocks();
    for mode in ["never", "always"] {
        let copy = dir.join("copy");
        let ok = std::process::Command::new("cp")
            .arg(format!("--sparse={mode}"))
            .arg(&memory)
            .arg(&copy)
            .status()
            .expect("run cp")
            .success();
        assert!(ok, "cp --sparse={mode}");
        std::fs::rename(&copy, &memory).expect("replace");
        let blocks = std::fs::metadata(&memory).expect("stat").blocks();
        if mode == "never" {
            assert!(
                blocks > 2 * sparse_blocks,
                "the copy is dense: {blocks} blocks, {sparse_blocks} before"
            );
        }
        let startup = persist::load_all(&dir).expect("load");
        assert!(startup.refused.is_empty(), "--sparse={mode}: {:?}", startup.refused);
        assert_eq!(ids(&startup), ["tpl-1"], "--sparse={mode}");
        let loaded = startup.loaded.into_iter().next().expect("one");
        let view = loaded.template.memory().base().map_read_only().expect("view");
        assert_eq!(view.read_u64(8 * MIB), Some((8 * MIB) | 0xfeed), "--sparse={mode}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// Version-1 files (memory checksum over data extents) still load, verified by their own rule.
#[test]
fn test_version_1_files_still_load_and_are_checked_by_their_own_rule() {
    let dir = state_dir("v1");
    let template = template_with_data(&kvm(), 16, &[8 * MIB]);
    persist::save(&dir, "tpl-1", &template).expect("save");
    let memory = memory_file(&dir, "tpl-1");
    let file = std::fs::File::open(&memory).expect("open");
    let size = file.metadata().expect("stat").len();
    let mut digest = CRC.digest();
    for range in cowvm_vmm::memory::data_extents(&file, size).expect("extents") {
        digest.update(&range.start.to_le_bytes());
        let mut bytes = vec![0u8; (range.end - range.start) as usize];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut bytes, range.start).expect("read");
        digest.update(&bytes);
    }
    let v1_crc = digest.finalize();
    let state = persist::state_path(&dir, "tpl-1");
    rewrite(&state, 1, |p| p["memory_crc64"] = v1_crc.into());
    let loaded = persist::load(&state).expect("a version-1 file loads");
    let view = loaded.template.memory().base().map_read_only().expect("view");
    assert_eq!(view.read_u64(8 * MIB), Some((8 * MIB) | 0xfeed));

    let mut bytes = std::fs::read(&memory).expect("read");
    bytes[(8 * MIB) as usize] ^= 1;
    std::fs::write(&memory, bytes).expect("damage");
    let err = persist::load(&state).err().expect("refused");
    assert!(matches!(err, PersistError::BadChecksum { what: "memory", .. }), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn test_bad_checksum_and_unknown_version_are_refused_by_load_and_the_file_is_untouched() {
    let dir = state_dir("damaged");
    let template = template_with_data(&kvm(), 16, &[8 * MIB]);
    persist::save(&dir, "tpl-1", &template).expect("save");
    let path = persist::state_path(&dir, "tpl-1");
    let good = std::fs::read(&path).expect("read");

    let mut flipped = good.clone();
    let last = flipped.len() - 2;
    flipped[last] ^= 0x55;
    std::fs::write(&path, &flipped).expect("damage");
    let err = persist::load(&path).err().expect("refused");
    assert!(matches!(err, PersistError::BadChecksum { what: "state", .. }), "{err}");
    assert_eq!(std::fs::read(&path).expect("read"), flipped, "the file is untouched");

    let mut future = good.clone();
    let next = persist::FORMAT_VERSION + 1;
    future[8..12].copy_from_slice(&next.to_le_bytes());
    std::fs::write(&path, &future).expect("write");
    let err = persist::load(&path).err().expect("refused");
    assert!(
        matches!(err, PersistError::UnknownVersion { found, .. } if found == next),
        "{err}"
    );

    std::fs::write(&path, b"not a template").expect("write");
    assert!(matches!(persist::load(&path), Err(PersistError::BadMagic(_))));

    std::fs::write(&path, &good).expect("restore");
    let startup = persist::load_all(&dir).expect("load");
    assert_eq!((startup.loaded.len(), startup.refused.len()), (1, 0));
    std::fs::remove_dir_all(&dir).ok();
}

/// A state file's id, how its payload is spoilt, and what the refusal says.
type Case = (&'static str, fn(&mut Value), &'static str);

/// Issue 18 item 8: the payload is checked against its file name, its state and the limits.
#[test]
fn test_payloads_that_fail_validation_are_refused_and_quarantined() {
    let dir = state_dir("validate");
    let template = template_with_data(&kvm(), 16, &[8 * MIB]);
    let cases: [Case; 5] = [
        ("tpl-1", |p| p["id"] = "tpl-9".into(), "claims template id"),
        (
            "tpl-2",
            |p| p["memory_size"] = (17 * MIB).into(),
            "differs from the VM state",
        ),
        (
            "tpl-3",
            |p| {
                p["memory_size"] = (16 * MIB + 100).into();
                p["state"]["memory_size"] = (16 * MIB + 100).into();
            },
            "not a page multiple",
        ),
        (
            "tpl-4",
            |p| p["memory_file"] = "../elsewhere.mem".into(),
            "memory file name",
        ),
        ("tpl-5", |p| p["id"] = "tpl-5/..".into(), "claims template id"),
    ];
    for (id, edit, _) in &cases {
        persist::save(&dir, id, &template).expect("save");
        rewrite(&persist::state_path(&dir, id), 2, edit);
        let err = persist::load(&persist::state_path(&dir, id)).err().expect("refused");
        assert!(matches!(err, PersistError::Malformed { .. }), "{id}: {err}");
    }
    persist::save(&dir, "tpl-6", &template).expect("save a good one");
    let startup = persist::load_all(&dir).expect("load");
    assert_eq!(ids(&startup), ["tpl-6"]);
    for (id, _, why) in &cases {
        assert!(
            startup
                .refused
                .iter()
                .any(|l| l.contains(&format!("{id}.state")) && l.contains(why)),
            "{id}: {:?}",
            startup.refused
        );
    }
    let quarantined = names(&dir.join("quarantine"));
    assert_eq!(
        quarantined.len(),
        10,
        "5 state files and their memory files: {quarantined:?}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// Issue 11 item 1: damaged templates are moved into quarantine unchanged; the others load.
#[test]
fn test_damaged_templates_are_moved_to_quarantine_unchanged_and_the_others_load() {
    let dir = state_dir("quarantine");
    let template = template_with_data(&kvm(), 16, &[8 * MIB]);
    for id in ["tpl-1", "tpl-2", "tpl-3", "tpl-4", "tpl-6", "tpl-7"] {
        persist::save(&dir, id, &template).expect("save");
    }
    let state = |id: &str| persist::state_path(&dir, id);
    let mut bytes = std::fs::read(state("tpl-2")).expect("read");
    let last = bytes.len() - 1;
    bytes[last] ^= 0x20;
    std::fs::write(state("tpl-2"), &bytes).expect("bad crc");
    let bytes = std::fs::read(state("tpl-3")).expect("read");
    std::fs::write(state("tpl-3"), &bytes[..bytes.len() - 10]).expect("truncate");
    let mut bytes = std::fs::read(state("tpl-4")).expect("read");
    bytes.extend_from_slice(b"trailing");
    std::fs::write(state("tpl-4"), &bytes).expect("trailing bytes");
    std::os::unix::fs::symlink("tpl-1.state", state("tpl-5")).expect("symlink");
    std::fs::remove_file(memory_file(&dir, "tpl-6")).expect("lose a memory file");
    let tpl1_memory = memory_file(&dir, "tpl-1")
        .file_name()
        .expect("name")
        .to_string_lossy()
        .into_owned();
    rewrite(&state("tpl-7"), 2, |p| p["memory_file"] = tpl1_memory.clone().into());

    let mut before = std::collections::BTreeMap::new();
    for name in names(&dir) {
        if !name.starts_with("tpl-1.") && !name.starts_with("tpl-5.") {
            before.insert(name.clone(), std::fs::read(dir.join(&name)).expect("read"));
        }
    }
    let startup = persist::load_all(&dir).expect("load");
    assert_eq!(ids(&startup), ["tpl-1"]);
    assert_eq!(startup.refused.len(), before.len() + 1, "{:#?}", startup.refused);
    for id in ["tpl-2", "tpl-3", "tpl-4", "tpl-5", "tpl-6", "tpl-7"] {
        assert!(
            startup
                .refused
                .iter()
                .any(|l| l.contains(&format!("{id}.state")) && l.contains("quarantine")),
            "{id} is reported: {:#?}",
            startup.refused
        );
    }
    let quarantine = dir.join("quarantine");
    for (name, bytes) in &before {
        assert!(!dir.join(name).exists(), "{name} left the state directory");
        assert_eq!(
            &std::fs::read(quarantine.join(name)).expect("kept"),
            bytes,
            "{name} unchanged"
        );
    }
    assert_eq!(
        std::fs::read_link(quarantine.join("tpl-5.state")).expect("the symlink itself"),
        PathBuf::from("tpl-1.state")
    );
    let mut left = vec![
        "cowvm-ids.json".to_owned(),
        "quarantine".into(),
        "tpl-1.state".into(),
        tpl1_memory,
    ];
    left.sort();
    assert_eq!(names(&dir), left, "only tpl-1 and cowvm's own files remain");
    std::fs::remove_dir_all(&dir).ok();
}

/// Issue 11 item 3.
#[test]
fn test_only_cowvm_leftovers_are_removed_and_each_removal_is_reported() {
    let dir = state_dir("sweep");
    let foreign = ["backup-disk.mem", ".editor.swp.tmp", "notes.txt", "tpl-3.state.bak"];
    let leftovers = [
        ".tpl-3.0123456789abcdef.mem.tmp",
        ".tpl-3.state.0123456789abcdef.tmp",
        "tpl-4.0123456789abcdef.mem",
    ];
    for name in foreign.iter().chain(&leftovers) {
        std::fs::write(dir.join(name), b"data").expect("write");
    }
    let startup = persist::load_all(&dir).expect("load");
    for name in foreign {
        assert_eq!(
            std::fs::read(dir.join(name)).expect("kept"),
            b"data",
            "{name} is not cowvm's"
        );
    }
    for name in leftovers {
        assert!(!dir.join(name).exists(), "{name} is swept");
        assert!(
            startup.removed.iter().any(|l| l.contains(name)),
            "{name} is logged: {:?}",
            startup.removed
        );
    }
    assert_eq!(startup.removed.len(), leftovers.len());
    std::fs::remove_dir_all(&dir).ok();
}

/// Issue 11 item 4.
#[test]
fn test_fifos_sockets_and_devices_in_the_state_dir_are_refused_without_blocking() {
    let dir = state_dir("special");
    let fifo = std::ffi::CString::new(dir.join("zzz.state").to_string_lossy().as_bytes()).expect("path");
    // SAFETY: mkfifo on a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0, "mkfifo");
    let _socket = std::os::unix::net::UnixListener::bind(dir.join("sock.state")).expect("socket");
    let device =
        std::ffi::CString::new(dir.join("tpl-2.0123456789abcdef.mem").to_string_lossy().as_bytes()).expect("path");
    // SAFETY: mknod of /dev/null's numbers on a NUL-terminated path.
    let made_device = unsafe { libc::mknod(device.as_ptr(), libc::S_IFCHR | 0o600, libc::makedev(1, 3)) } == 0;
    let (tx, rx) = std::sync::mpsc::channel();
    let scan = dir.clone();
    std::thread::spawn(move || tx.send(persist::load_all(&scan).map(|s| s.refused)));
    let refused = rx
        .recv_timeout(std::time::Duration::from_secs(60))
        .expect("the start-up pass never blocks on a FIFO")
        .expect("load");
    let quarantined = names(&dir.join("quarantine"));
    for (name, kind) in [("zzz.state", "FIFO"), ("sock.state", "socket")] {
        assert!(quarantined.contains(&name.to_owned()), "{quarantined:?}");
        assert!(
            refused.iter().any(|l| l.contains(name) && l.contains(kind)),
            "{refused:?}"
        );
    }
    if made_device {
        assert!(
            refused.iter().any(|l| l.contains("tpl-2.") && l.contains("device")),
            "{refused:?}"
        );
    } else {
        eprintln!("skipped the device case: mknod is not permitted here");
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// Issue 11 item 5.
#[test]
fn test_two_state_files_claiming_one_id_load_it_once() {
    let dir = state_dir("twins");
    let template = template_with_data(&kvm(), 16, &[8 * MIB]);
    persist::save(&dir, "tpl-1", &template).expect("save");
    std::fs::copy(persist::state_path(&dir, "tpl-1"), persist::state_path(&dir, "tpl-2")).expect("copy");
    std::os::unix::fs::symlink("tpl-1.state", persist::state_path(&dir, "tpl-3")).expect("symlink");
    let startup = persist::load_all(&dir).expect("load");
    assert_eq!(ids(&startup), ["tpl-1"], "loaded once");
    assert_eq!(startup.refused.len(), 2, "{:?}", startup.refused);
    assert!(startup
        .refused
        .iter()
        .any(|l| l.contains("tpl-2.state") && l.contains("claims template id \"tpl-1\"")));
    assert!(startup
        .refused
        .iter()
        .any(|l| l.contains("tpl-3.state") && l.contains("symbolic link")));
    assert!(
        memory_file(&dir, "tpl-1").exists(),
        "the original keeps its memory file"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// Issue 11 item 6.
#[test]
fn test_a_state_dir_group_or_others_can_write_is_refused() {
    let dir = state_dir("mode");
    for mode in [0o770, 0o707, 0o722] {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode)).expect("chmod");
        let err = persist::load_all(&dir).err().expect("refused");
        assert!(
            matches!(err, PersistError::StateDir { .. }) && err.to_string().contains("chmod 700"),
            "{mode:o}: {err}"
        );
    }
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o750)).expect("chmod");
    persist::load_all(&dir).expect("group may read");
    std::fs::remove_dir_all(&dir).ok();
}

/// Issue 11 item 2: refused, quarantined and deleted ids stay out of use.
#[test]
fn test_ids_refused_quarantined_or_deleted_are_never_handed_out_again() {
    let dir = state_dir("ids");
    let template = template_with_data(&kvm(), 16, &[8 * MIB]);
    persist::save(&dir, "tpl-7", &template).expect("save");
    std::fs::write(persist::state_path(&dir, "tpl-7"), b"damaged").expect("damage");
    let first = persist::load_all(&dir).expect("load");
    assert!(
        first.refused.iter().any(|l| l.contains("tpl-7.state")),
        "{:?}",
        first.refused
    );
    assert_eq!(first.next_template, 8, "tpl-7 was refused, so 7 is taken");
    let again = persist::load_all(&dir).expect("load");
    assert_eq!(again.next_template, 8, "tpl-7 in quarantine keeps 7 taken");

    persist::save(&dir, "tpl-12", &template).expect("save");
    let removed = persist::remove(&dir, "tpl-12").expect("remove");
    assert_eq!(removed.len(), 2, "its state file and its memory file: {removed:?}");
    let after = persist::load_all(&dir).expect("load");
    assert_eq!(after.next_template, 13, "a deleted id is not handed out again");
    std::fs::remove_dir_all(&dir).ok();
}

/// Issue 18 item 9: every run takes a new block of generation ids.
#[test]
fn test_every_start_takes_a_new_block_of_generation_ids() {
    let dir = state_dir("generations");
    let first = persist::load_all(&dir).expect("load").generation_floor;
    let second = persist::load_all(&dir).expect("load").generation_floor;
    assert!(first >= 1 << 32, "{first:#x}");
    assert_eq!(second, first + (1 << 32), "{first:#x} then {second:#x}");
    std::fs::remove_dir_all(&dir).ok();
}
