//! `cowvm bench` end to end at small sizes: `bench spawn` writes the JSON keys it promises, and
//! the whole suite (`--quick --out DIR`) writes every result and plot.

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
    assert_eq!(r["reset_us"]["by"], "swap");
    assert!(number(&r["reset_us"]["in_place"]["clean"]) > 0.0);
    assert!(number(&r["reset_us"]["in_place"]["dirty_1000"]) > 0.0);
    assert!(number(&r["recycle_us"]["p50"]) > 0.0);
    assert!(number(&r["api_clone_us"]["p50"]) > 0.0);
    assert!(number(&r["api_clone_us"]["p99"]) > 0.0);
    assert!(number(&r["api_clones_1000_ms"]) > 0.0);
    assert!(number(&r["api_vms_recycled"]) > 0.0, "deleted API clones were recycled");
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(summary.contains("spawn (request → first guest exit)"), "{summary}");
}

#[test]
fn test_bench_suite_writes_every_result_and_plot() {
    let dir = std::env::temp_dir().join(format!("cowvm-bench-suite-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = Command::new(env!("CARGO_BIN_EXE_cowvm"))
        .args(["bench", "--quick", "--out"])
        .arg(&dir)
        .output()
        .expect("run cowvm bench");
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    for name in [
        "spawn-cdf.svg",
        "spawn-vs-size.svg",
        "spawn-vs-live-clones.svg",
        "memory-vs-live-clones.svg",
        "cow-fault.svg",
        "cow-vs-live-clones.svg",
        "sharing-histogram.svg",
        "memory-saved.svg",
        "ci-loop.svg",
    ] {
        let svg = std::fs::read_to_string(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(
            svg.starts_with("<svg") && (svg.contains("<line") || svg.contains("<rect")),
            "{name} is not a drawn SVG"
        );
    }
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).expect("summary")).expect("JSON");
    let sharing = &summary["sharing"]["rows"];
    assert!(
        sharing[0]["histogram"]["10"].as_u64().is_some_and(|n| n >= 4096),
        "nothing written: all 10 clones map the 4096 data frames they read: {}",
        sharing[0]
    );
    assert_eq!(sharing[0]["private_bytes"], 0);
    assert_eq!(
        sharing[2]["histogram"]["9"], 4096,
        "10 %: every data page copied by exactly one of 10 clones, mapped by the other 9"
    );
    assert_eq!(sharing[2]["private_bytes"], 4096 * 4096);
    assert!(summary["ci_loop"]["rows"][1]["iterations"]
        .as_u64()
        .is_some_and(|n| n > 0));
    let ci_rows = summary["ci_loop"]["rows"].as_array().expect("ci_loop rows");
    for (via, cells) in [("in_process", None), ("http", Some(false)), ("http", Some(true))] {
        let mut workers: Vec<u64> = ci_rows
            .iter()
            .filter(|r| r["via"] == via && cells.is_none_or(|c| r["cells"] == c))
            .map(|r| {
                for key in ["iterations", "iterations_per_s", "seconds"] {
                    assert!(r[key].is_number(), "ci_loop row without {key}: {r}");
                }
                assert!(
                    r["iterations"].as_u64().is_some_and(|n| n > 0),
                    "no iteration done: {r}"
                );
                r["workers"].as_u64().expect("workers")
            })
            .collect();
        workers.sort_unstable();
        assert_eq!(
            workers,
            [1, 2],
            "ci_loop rows via {via} (cells {cells:?}) with 1 and 2 workers"
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn test_a_sweep_runs_on_its_own_by_name() {
    let dir = std::env::temp_dir().join(format!("cowvm-sweep-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = Command::new(env!("CARGO_BIN_EXE_cowvm"))
        .args(["bench", "ci-loop", "--quick", "--out"])
        .arg(&dir)
        .output()
        .expect("run");
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let result: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("ci-loop.json")).expect("json")).expect("JSON");
    assert_eq!(
        result["rows"].as_array().map(Vec::len),
        Some(6),
        "1 and 2 workers, in process and over HTTP to a server with and without cells"
    );
    assert!(dir.join("ci-loop.svg").exists());
    std::fs::remove_dir_all(&dir).ok();
}
