//! The CI example script of docs/ci-usage.md runs end to end against the real binary.

use std::process::Command;

#[test]
fn test_ci_example_script_clones_one_vm_per_test() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/examples/ci-clone-per-test.sh");
    let out = Command::new("bash")
        .arg(script)
        .env("COWVM", env!("CARGO_BIN_EXE_cowvm"))
        .env("TESTS", "3")
        .env("MEMORY_MIB", "64")
        .env_remove("COWVM_URL")
        .output()
        .expect("run the example script");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("ran 3 tests"), "{text}");
    for i in 1..=3 {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("test {i}:")))
            .unwrap_or_else(|| panic!("no line for test {i}: {text}"));
        assert!(line.contains("16 private pages"), "{line}");
    }
    let sums: std::collections::HashSet<&str> = text
        .lines()
        .filter_map(|l| l.split("checksum ").nth(1)?.split(',').next())
        .collect();
    assert_eq!(sums.len(), 1, "every clone reads the same pre-warmed data: {sums:?}");
}
