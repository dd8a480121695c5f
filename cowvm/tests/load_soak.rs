//! A short load run and a short soak, as separate processes: no 5xx, fds and mappings back at
//! their baseline, and flat resource slopes while clones come and go.

use std::process::Command;

fn bench(args: &[&str], name: &str) -> serde_json::Value {
    let json = std::env::temp_dir().join(format!("cowvm-{name}-{}.json", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_cowvm"))
        .arg("bench")
        .args(args)
        .arg("--json")
        .arg(&json)
        .output()
        .expect("run bench");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let value = serde_json::from_str(&std::fs::read_to_string(&json).expect("json")).expect("valid JSON");
    std::fs::remove_file(&json).ok();
    value
}

#[test]
fn test_a_short_load_run_answers_no_5xx_and_returns_to_baseline() {
    let r = bench(&["load", "--clients", "8", "--requests", "1000"], "load");
    assert_eq!(r["requests"], 1000);
    assert_eq!(r["status_5xx"], 0, "{r}");
    assert_eq!(r["no_answer"], 0, "{r}");
    assert!(
        r["after"]["fds_delta"].as_f64().is_some_and(|d| d <= 0.0),
        "fds back at baseline: {r}"
    );
    assert!(
        r["after"]["mappings_delta"].as_f64().is_some_and(|d| d <= 0.0),
        "mappings back at baseline: {r}"
    );
}

#[test]
fn test_a_short_soak_is_flat() {
    let r = bench(&["soak", "--seconds", "6", "--batch", "5"], "soak");
    assert!(r["clones_made"].as_u64().is_some_and(|n| n > 100), "{r}");
    assert_eq!(r["flat"], true, "resource slopes per clone: {}", r["per_clone_growth"]);
}
