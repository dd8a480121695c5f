//! Assembles `asm/guest.S` with the system assembler and links it with `asm/guest.ld` into a
//! static x86-64 ELF, `$OUT_DIR/guest.elf`, which `src/lib.rs` embeds; and builds the C SDK's
//! examples (`sdk/examples/{hello,empty}.c`, guest ABI v1) with `sdk/cowvm-cc` into
//! `$OUT_DIR/{hello,empty}.elf`, so every build checks the SDK.

use std::env;
use std::fs;
use std::path::PathBuf;
use std::process::Command;

#[allow(dead_code)]
mod protocol {
    include!("src/protocol.rs");
}

fn run(cmd: &mut Command) {
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (binutils must be installed)"));
    assert!(status.success(), "{cmd:?} failed with {status}");
}

fn main() {
    use protocol::*;
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let constants = [
        ("PORT_DONE", u64::from(PORT_DONE)),
        ("PORT_EXCEPTION", u64::from(PORT_EXCEPTION)),
        ("CMD_EXIT", CMD_EXIT),
        ("CMD_WRITE", CMD_WRITE),
        ("CMD_CHECKSUM", CMD_CHECKSUM),
        ("CMD_IDENTITY", CMD_IDENTITY),
        ("CMD_TRIPLE_FAULT", CMD_TRIPLE_FAULT),
        ("CMD_SPIN", CMD_SPIN),
        ("CMD_HALT", CMD_HALT),
        ("STATUS_OK", u64::from(STATUS_OK)),
        ("STATUS_UNKNOWN_COMMAND", u64::from(STATUS_UNKNOWN_COMMAND)),
        ("CHECKSUM_ROTATE", u64::from(CHECKSUM_ROTATE)),
        ("MSR_VCPU_ID", u64::from(MSR_VCPU_ID)),
    ];
    let inc: String = constants
        .iter()
        .map(|(name, value)| format!(".set {name}, {value}\n"))
        .collect();
    fs::write(out.join("protocol.inc"), inc).expect("write protocol.inc");

    let object = out.join("guest.o");
    let elf = out.join("guest.elf");
    let assembler = env::var("AS").unwrap_or_else(|_| "as".into());
    let linker = env::var("LD").unwrap_or_else(|_| "ld".into());
    run(Command::new(assembler)
        .args(["--64", "-I"])
        .arg(&out)
        .arg("-o")
        .arg(&object)
        .arg("asm/guest.S"));
    run(Command::new(linker)
        .args([
            "-nostdlib",
            "-static",
            "--build-id=none",
            "-z",
            "max-page-size=0x1000",
            "-z",
            "noexecstack",
            "-T",
            "asm/guest.ld",
            "-o",
        ])
        .arg(&elf)
        .arg(&object));
    for example in ["hello", "empty"] {
        run(Command::new("sh")
            .arg("sdk/cowvm-cc")
            .arg("-o")
            .arg(out.join(format!("{example}.elf")))
            .arg(format!("sdk/examples/{example}.c")));
    }
    for input in ["asm/guest.S", "asm/guest.ld", "src/protocol.rs", "build.rs", "sdk"] {
        println!("cargo:rerun-if-changed={input}");
    }
    println!("cargo:rerun-if-env-changed=AS");
    println!("cargo:rerun-if-env-changed=LD");
    println!("cargo:rerun-if-env-changed=COWVM_CC");
    println!("cargo:rerun-if-env-changed=CC");
}
