//! Builds the guest-ABI-v1 test guests with cowvm's C SDK (`guest/sdk/cowvm-cc`) into `$OUT_DIR`:
//! `misbehave.elf` (the error paths of `call`) and `inflate.elf`, zlib's inflate compiled from the
//! sources the `libz-sys` package ships. Those are found through `cargo metadata`, where cargo
//! unpacked the package (a build-dependency, so it is always there); nothing is copied into
//! this repository.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The zlib sources inflate needs (no deflate, no gz* file I/O).
const ZLIB_SOURCES: [&str; 6] = [
    "inflate.c",
    "inffast.c",
    "inftrees.c",
    "adler32.c",
    "crc32.c",
    "zutil.c",
];

fn run(cmd: &mut Command) -> Vec<u8> {
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (a C compiler and binutils must be installed)"));
    assert!(
        output.status.success(),
        "{cmd:?} failed with {}:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    output.stdout
}

/// `src/zlib` of the libz-sys package this workspace locks.
fn zlib_dir(workspace: &Path) -> PathBuf {
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let json = run(Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--offline", "--manifest-path"])
        .arg(workspace.join("Cargo.toml")));
    let metadata: serde_json::Value = serde_json::from_slice(&json).expect("cargo metadata prints JSON");
    let manifest = metadata["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == "libz-sys")
        .and_then(|p| p["manifest_path"].as_str())
        .expect("libz-sys is a build-dependency of cowvm-tests, so cargo metadata lists it");
    let dir = Path::new(manifest)
        .parent()
        .expect("manifest has a directory")
        .join("src/zlib");
    assert!(dir.join("inflate.c").is_file(), "no zlib sources in {}", dir.display());
    dir
}

fn main() {
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let here = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let workspace = here.parent().expect("tests/ is inside the workspace").to_owned();
    let sdk_cc = workspace.join("guest/sdk/cowvm-cc");

    run(Command::new("sh")
        .arg(&sdk_cc)
        .arg("-o")
        .arg(out.join("misbehave.elf"))
        .arg(here.join("guests/misbehave.c")));

    let zlib = zlib_dir(&workspace);
    let mut inflate = Command::new("sh");
    inflate
        .arg(&sdk_cc)
        .arg("-o")
        .arg(out.join("inflate.elf"))
        .arg("-DZ_SOLO")
        .arg(format!("-I{}", zlib.display()))
        .arg(here.join("guests/inflate.c"));
    for source in ZLIB_SOURCES {
        inflate.arg(zlib.join(source));
    }
    run(&mut inflate);

    for path in ["guests", "build.rs", "../guest/sdk"] {
        println!("cargo:rerun-if-changed={path}");
    }
    println!("cargo:rerun-if-env-changed=COWVM_CC");
    println!("cargo:rerun-if-env-changed=CC");
}
