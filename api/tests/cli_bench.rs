//! `cowvm bench spawn` runs end to end (small sizes) and writes the JSON keys it promises.

use std::process::Command;

#[test]
fn test_bench_spawn_writes_every_promised_key() {
    let json = std::env::temp_dir().join(format!("cowvm-bench-{}.json", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_cowvm"))
        .args([
            "bench",
            "spawn",
            "--memory-mib",
            "64",
            "--clones",
            "20",
            "--samples",
            "3",
            "--json",
        ])
        .arg(&json)
        .output()
        .expect("run cowvm bench spawn");
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let text = std::fs::read_to_string(&json).expect("JSON written");
    std::fs::remove_file(&json).ok();
    let r: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    assert_eq!(r["memory_mib"], 64);
    assert_eq!(r["clones"], 20);
    let number = |v: &serde_json::Value| v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"));
    for key in ["p50", "p90", "p99", "max"] {
        assert!(number(&r["spawn_us"][key]) > 0.0, "spawn_us.{key}");
    }
    for key in [
        "total_ms",
        "clones_per_s",
        "spawn_p50_us_with_1000_live",
        "spawn_p50_us_64mib",
        "spawn_p50_us_4gib",
        "live_fork_pause_us",
    ] {
        assert!(number(&r[key]) > 0.0, "{key}");
    }
    for key in ["user", "kernel", "total"] {
        number(&r["host_memory_per_clone_kib"][key]);
    }
    assert!(number(&r["baselines"]["fresh_vm_us"]["p50"]) > 0.0);
    assert!(number(&r["baselines"]["fresh_vm_us"]["p99"]) > 0.0);
    assert!(number(&r["baselines"]["memcpy_clone_us"]["p50"]) > 0.0);
    assert!(number(&r["baselines"]["fork_us"]["p50"]) > 0.0);
    assert!(number(&r["reset_us"]["clean"]) > 0.0);
    assert!(number(&r["reset_us"]["dirty_1000"]) > 0.0);
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(summary.contains("spawn (request → first guest exit)"), "{summary}");
}
