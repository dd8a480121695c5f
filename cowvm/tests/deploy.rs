//! docs/examples/deploy/cowvm.service passes `systemd-analyze verify` (with the path of the
//! binary under test in `ExecStart=`). Skipped, with the reason printed, where systemd-analyze is
//! not installed.

use std::process::Command;

#[test]
fn test_the_systemd_unit_in_the_docs_verifies() {
    let Ok(probe) = Command::new("systemd-analyze").arg("--version").output() else {
        println!("skipped: systemd-analyze is not installed");
        return;
    };
    assert!(probe.status.success());
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/examples/deploy/cowvm.service"
    ))
    .expect("read the unit");
    assert!(unit.contains("ExecStart=/usr/local/bin/cowvm serve"));
    let dir = std::env::temp_dir().join(format!("cowvm-deploy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create a directory");
    let path = dir.join("cowvm.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/cowvm", env!("CARGO_BIN_EXE_cowvm"))).expect("write the unit");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("run systemd-analyze");
    let _ = std::fs::remove_dir_all(&dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {stderr}"
    );
}
