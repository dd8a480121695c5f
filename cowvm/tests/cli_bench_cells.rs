//! `cowvm bench cells` end to end at small sizes. Its cells are `cowvm cell` processes (the hidden
//! subcommand) started by the bench, so this also checks that the binary serves as a cell.

use std::process::Command;

#[test]
fn test_bench_cells_runs_clones_in_cowvm_cell_processes_and_writes_every_key() {
    let out_dir = std::env::temp_dir().join(format!("cowvm-bench-cells-{}", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_cowvm"))
        .args([
            "bench",
            "cells",
            "--quick",
            "--live",
            "20",
            "--vms-per-cell",
            "10",
            "--out",
        ])
        .arg(&out_dir)
        .output()
        .expect("run cowvm bench cells");
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let text = std::fs::read_to_string(out_dir.join("cells.json")).expect("JSON written");
    assert!(out_dir.join("cells-notifier-sweep.svg").exists());
    std::fs::remove_dir_all(&out_dir).ok();
    let r: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    let rows = r["placement"].as_array().expect("placement rows");
    assert_eq!(rows.len(), 4, "in-process and cells, at 1 and 20 live clones");
    for row in rows {
        assert!(
            row["guest_read_then_write_us_p50"].as_f64().is_some_and(|v| v > 0.0),
            "{row}"
        );
        assert!(row["memory_per_clone_kib"]["total"].is_number(), "{row}");
    }
    let over_cells = rows
        .iter()
        .find(|row| row["placement"] == "cells" && row["live_clones"] == 20)
        .expect("a cells row at 20 live clones");
    assert_eq!(over_cells["cells"], 2, "20 clones at 10 per cell");
    assert_eq!(over_cells["vms_per_process"], 10);
    // The API rows: a server with --cells, warm shells in cells taken by the clone calls.
    let api = &r["api"];
    assert_eq!(api["cells"], true, "{api}");
    assert!(api["api_clone_us"]["p50"].as_f64().is_some_and(|v| v > 0.0), "{api}");
    assert!(api["api_clones_1000_ms"].as_f64().is_some_and(|v| v > 0.0), "{api}");
    assert_eq!(api["api_clones_1000_pooled"], api["api_clones_batch"], "{api}");
    assert_eq!(api["api_clone_pooled"], api["api_clone_samples"], "{api}");
    let sweep = r["notifier_sweep"].as_array().expect("sweep rows");
    assert_eq!(
        sweep.iter().map(|s| s["vms_per_cell"].as_u64()).collect::<Vec<_>>(),
        vec![Some(1), Some(10)]
    );
}
