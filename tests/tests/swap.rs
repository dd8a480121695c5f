//! Copies a clone made on write stay the clone's data when the host swaps them out: reset drops
//! them and a layered freeze copies them. Needs root and a kernel that lets us enable a swap
//! file; skipped with the reason otherwise.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;

use cowvm_tests::{guest_read as read, guest_write as write, kvm, pagemap, template_with_data};
use cowvm_vmm::memory::PAGE_SIZE;
use cowvm_vmm::{CloneEngine, EngineConfig, Template, Vm};

const MIB: u64 = 1 << 20;
const SWAP_BYTES: usize = 32 << 20;

/// A swap file of ours, enabled while this lives.
struct SwapFile {
    dir: PathBuf,
    file: PathBuf,
}

impl SwapFile {
    /// Creates and enables a swap file in a fresh temp directory, or says why it cannot.
    fn enable(name: &str) -> Result<SwapFile, String> {
        // SAFETY: geteuid has no preconditions and touches no memory.
        if unsafe { libc::geteuid() } != 0 {
            return Err("enabling swap needs root".into());
        }
        let dir = std::env::temp_dir().join(format!("cowvm-swap-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        let file = dir.join("swapfile");
        let swap = SwapFile { dir, file };
        // Written out (not sparse): swapon refuses files with holes.
        std::fs::write(&swap.file, vec![0u8; SWAP_BYTES]).map_err(|e| format!("write swap file: {e}"))?;
        std::fs::set_permissions(&swap.file, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .map_err(|e| format!("chmod swap file: {e}"))?;
        run("mkswap", &swap.file)?;
        run("swapon", &swap.file)?;
        Ok(swap)
    }
}

impl Drop for SwapFile {
    fn drop(&mut self) {
        if let Err(e) = run("swapoff", &self.file) {
            eprintln!("warning: {e}");
        }
        std::fs::remove_dir_all(&self.dir).ok();
    }
}

fn run(program: &str, file: &std::path::Path) -> Result<(), String> {
    let out = Command::new(program)
        .arg(file)
        .output()
        .map_err(|e| format!("{program} cannot run: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program} {} failed: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Asks the host to swap out the guest pages `gpas` of `vm` (`MADV_PAGEOUT`); returns whether
/// pagemap now shows every one of them as a swap entry.
fn page_out(vm: &Vm, gpas: &[u64]) -> bool {
    for &gpa in gpas {
        let hva = vm.ram().host_address() + gpa;
        // SAFETY: the page lies inside the VM's live RAM mapping; MADV_PAGEOUT only asks the
        // kernel to reclaim it, and the contents come back on the next access.
        let rc = unsafe { libc::madvise(hva as *mut libc::c_void, PAGE_SIZE as usize, libc::MADV_PAGEOUT) };
        assert_eq!(rc, 0, "madvise(MADV_PAGEOUT): {}", std::io::Error::last_os_error());
    }
    let entries = pagemap(vm.ram());
    gpas.iter().all(|&gpa| {
        let entry = entries[(gpa / PAGE_SIZE) as usize];
        entry.swapped() && !entry.present() && !entry.file_or_shared()
    })
}

fn engine() -> CloneEngine {
    CloneEngine::new(Arc::new(kvm()), EngineConfig::default()).expect("engine")
}

#[test]
fn test_reset_drops_private_pages_that_are_swapped_out() {
    let swap = match SwapFile::enable("reset") {
        Ok(swap) => swap,
        Err(reason) => {
            println!("skipped: cannot enable swap on this machine: {reason}");
            return;
        }
    };
    let engine = engine();
    let data = [8 * MIB, 8 * MIB + PAGE_SIZE, 20 * MIB];
    let template = Arc::new(template_with_data(engine.kvm(), 64, &data));
    let mut clone = engine.spawn(&template, 1).expect("spawn").clones.pop().expect("clone");
    for &gpa in &data {
        write(clone.vm_mut(), gpa, 0xd1d7);
    }
    if !page_out(clone.vm(), &data) {
        println!("skipped: MADV_PAGEOUT did not swap the clone's copies out on this machine");
        return;
    }
    let report = engine.reset(&mut clone).expect("reset");
    assert_eq!(report.pages_dropped, 3, "the swapped-out copies are dropped too");
    for &gpa in &data {
        assert_eq!(
            read(clone.vm_mut(), gpa),
            gpa | 0xfeed,
            "reset clone sees the template again"
        );
    }
    drop(clone);
    drop(swap);
}

#[test]
fn test_layered_freeze_copies_private_pages_that_are_swapped_out() {
    let swap = match SwapFile::enable("freeze") {
        Ok(swap) => swap,
        Err(reason) => {
            println!("skipped: cannot enable swap on this machine: {reason}");
            return;
        }
    };
    let engine = engine();
    let x = 8 * MIB;
    let base = Arc::new(template_with_data(engine.kvm(), 64, &[x]));
    let mut clone = engine.spawn(&base, 1).expect("spawn").clones.pop().expect("clone");
    write(clone.vm_mut(), x, 77);
    write(clone.vm_mut(), 9 * MIB, 78);
    if !page_out(clone.vm(), &[x, 9 * MIB]) {
        println!("skipped: MADV_PAGEOUT did not swap the clone's copies out on this machine");
        return;
    }
    let layered = Arc::new(Template::freeze(engine.kvm(), clone.vm_mut()).expect("freeze clone"));
    assert_eq!(
        layered.memory().overlay_runs(),
        2,
        "both swapped-out copies are in the overlay"
    );
    let mut child = engine.spawn(&layered, 1).expect("spawn").clones.pop().expect("child");
    assert_eq!(read(child.vm_mut(), x), 77, "not the parent template's old bytes");
    assert_eq!(read(child.vm_mut(), 9 * MIB), 78);
    drop((child, clone));
    drop(swap);
}
