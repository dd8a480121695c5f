//! `cowvm run` end to end: the binary boots a real guest and prints what the README promises.

use std::process::Command;

fn cowvm(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_cowvm"))
        .args(args)
        .output()
        .expect("run cowvm")
}

#[test]
fn test_run_json_reports_memory_exit_reason_and_first_exit_time() {
    let out = cowvm(&["run", "--memory-mib", "256", "--json"]);
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(report["memory_mib"], 256);
    assert_eq!(report["exit_reason"], "done");
    let first_exit_us = report["first_exit_us"].as_f64().expect("first_exit_us is a number");
    assert!(first_exit_us > 0.0 && first_exit_us < 10_000_000.0, "{first_exit_us}");
    assert_eq!(report["self_check"]["passed"], true);
}

#[test]
fn test_run_prints_a_human_summary() {
    let out = cowvm(&["run", "--memory-mib", "64"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("long mode") && text.contains("first guest exit: done") && text.contains("self-check passed"),
        "{text}"
    );
}

#[test]
fn test_run_refuses_absurd_memory_with_a_clear_message() {
    let out = cowvm(&["run", "--memory-mib", "1"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("memory of 1 MiB is outside the supported"), "{err}");
}

#[test]
fn test_run_reports_the_first_exit_of_a_custom_kernel() {
    // A tiny ELF whose code is `hlt`, built like the tests crate does.
    let (image, _) = cowvm_tests::tiny_elf(&[0xf4]);
    let path = cowvm_tests::write_temp_kernel("cli-hlt", &image);
    let out = cowvm(&[
        "run",
        "--memory-mib",
        "16",
        "--json",
        "--kernel",
        path.to_str().expect("utf-8 path"),
    ]);
    std::fs::remove_file(&path).ok();
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(report["exit_reason"], "hlt");
    assert!(report["self_check"].is_null());
}
