//! Templates saved to a state directory load back, share pages across clones, and damaged or
//! unknown files are refused clearly and left untouched.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;

use cowvm_tests::{guest_read as read, kvm, pagemap, template_with_data, DEADLINE};
use cowvm_vmm::memory::PAGE_SIZE;
use cowvm_vmm::persist::{self, PersistError};
use cowvm_vmm::{CloneEngine, EngineConfig, GuestCommand, Template};
use vm_memory::GuestAddress;

const MIB: u64 = 1 << 20;

fn state_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cowvm-persist-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create state dir");
    dir
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
    let memory_file = std::fs::read_dir(&dir)
        .expect("list")
        .filter_map(|e| e.ok())
        .find(|e| e.path().extension().is_some_and(|x| x == "mem"))
        .expect("memory file");
    let meta = memory_file.metadata().expect("stat");
    use std::os::unix::fs::MetadataExt;
    assert!(
        meta.blocks() * 512 < meta.len() / 4,
        "the memory file is sparse: {} blocks for {} bytes",
        meta.blocks(),
        meta.len()
    );

    let (loaded, failed) = persist::load_all(&dir).expect("load");
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(loaded.len(), 1);
    assert_eq!(loaded[0].id, "tpl-7");
    let reloaded = Arc::new(loaded.into_iter().next().expect("one").template);
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
fn test_layered_template_saves_its_overlay_data_too() {
    let dir = state_dir("layered");
    let engine = CloneEngine::new(Arc::new(kvm()), EngineConfig::default()).expect("engine");
    let base = Arc::new(template_with_data(engine.kvm(), 64, &[8 * MIB]));
    let mut clone = engine.spawn(&base, 1).expect("spawn").clones.pop().expect("clone");
    clone
        .vm_mut()
        .execute(
            GuestCommand::Write {
                start: GuestAddress(12 * MIB),
                count: 1,
                stride: 8,
                value: 77,
            },
            DEADLINE,
        )
        .expect("write");
    let layered = Template::freeze(engine.kvm(), clone.vm_mut()).expect("freeze clone");
    persist::save(&dir, "tpl-layered", &layered).expect("save");
    let loaded = persist::load(&persist::state_path(&dir, "tpl-layered")).expect("load");
    assert_eq!(loaded.template.memory().depth(), 1, "loaded templates are flat");
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

#[test]
fn test_bad_checksum_and_unknown_version_are_refused_and_files_left_as_they_are() {
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
    assert!(err.to_string().contains("left as it is"));
    assert_eq!(std::fs::read(&path).expect("read"), flipped, "the file is untouched");

    let mut future = good.clone();
    future[8..12].copy_from_slice(&2u32.to_le_bytes());
    std::fs::write(&path, &future).expect("write");
    let err = persist::load(&path).err().expect("refused");
    assert!(matches!(err, PersistError::UnknownVersion { found: 2, .. }), "{err}");

    std::fs::write(&path, b"not a template").expect("write");
    assert!(matches!(persist::load(&path), Err(PersistError::BadMagic(_))));

    std::fs::write(&path, &good).expect("restore");
    let (loaded, failed) = persist::load_all(&dir).expect("load");
    assert_eq!((loaded.len(), failed.len()), (1, 0));
    std::fs::remove_dir_all(&dir).ok();
}
