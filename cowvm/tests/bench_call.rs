//! `cowvm bench call` end to end at small counts: it writes the keys it promises, with figures
//! from real calls (no timing is asserted; performance belongs in the benchmark itself).

use std::process::Command;

#[test]
fn test_bench_call_writes_call_us_and_calls_per_s() {
    let json = std::env::temp_dir().join(format!("cowvm-bench-call-{}.json", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_cowvm"))
        .args(["bench", "call", "--samples", "10", "--calls", "20", "--json"])
        .arg(&json)
        .output()
        .expect("run cowvm bench call");
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let text = std::fs::read_to_string(&json).expect("JSON written");
    std::fs::remove_file(&json).ok();
    let r: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    let number = |v: &serde_json::Value| v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"));
    for key in ["p50", "p99"] {
        assert!(number(&r["call_us"][key]) > 0.0, "call_us.{key}");
    }
    assert_eq!(r["call_us"]["n"], 10);
    for key in ["in_process", "http"] {
        assert!(number(&r["calls_per_s"][key]) > 0.0, "calls_per_s.{key}");
    }
    assert_eq!(r["clients"], 2);
    assert_eq!(r["http_call_us"]["n"], 200, "the default HTTP samples");
    assert!(number(&r["http_call_us"]["p50"]) > 0.0);
    assert_eq!(r["cells"], false);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("empty call, in-process: p50"), "{stdout}");
    assert!(stdout.contains("empty call over HTTP: p50"), "{stdout}");
}

#[test]
fn test_bench_call_with_cells_times_template_calls_run_in_cells() {
    let json = std::env::temp_dir().join(format!("cowvm-bench-call-cells-{}.json", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_cowvm"))
        .args([
            "bench",
            "call",
            "--samples",
            "10",
            "--calls",
            "20",
            "--http-samples",
            "10",
        ])
        .args(["--cells", "--json"])
        .arg(&json)
        .output()
        .expect("run cowvm bench call --cells");
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let text = std::fs::read_to_string(&json).expect("JSON written");
    std::fs::remove_file(&json).ok();
    let r: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    assert_eq!(r["cells"], true);
    assert_eq!(r["http_call_us"]["n"], 10);
    assert!(r["http_spawn_us"]["p50"].as_f64().is_some_and(|v| v > 0.0), "{r}");
    assert!(r["calls_per_s"]["http"].as_f64().is_some_and(|v| v > 0.0), "{r}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("empty call over HTTP with --cells: p50"), "{stdout}");
}
