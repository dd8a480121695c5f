//! kill -9 of the server while it saves templates, at many points: on restart every template
//! that is there loads (the old or the new, never a corrupt one), and leftovers are swept.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use cowvm::client::Client;
use serde_json::json;

/// Files in `dir` whose names end with `suffix`.
fn count_files(dir: &std::path::Path, suffix: &str) -> usize {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().ends_with(suffix))
                .count()
        })
        .unwrap_or(0)
}

fn serve(dir: &std::path::Path) -> (Child, Client) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_cowvm"))
        .args(["serve", "--listen", "127.0.0.1:0", "--warm-shells", "0", "--state-dir"])
        .arg(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start cowvm serve");
    let stdout = child.stdout.take().expect("stdout");
    let line = BufReader::new(stdout).lines().next().expect("a line").expect("read");
    let url = line.rsplit(' ').next().expect("url").to_owned();
    (child, Client::new(&url, None))
}

#[test]
fn test_kill_9_during_saves_never_leaves_a_corrupt_template() {
    let dir = std::env::temp_dir().join(format!("cowvm-crash-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut committed = 0;
    let mut mid_save = 0;
    let rounds = 13u64;
    for round in 0..rounds {
        let (mut child, client) = serve(&dir);
        let vm = client
            .call("POST", "/v1/vms", Some(&json!({"memory_mib": 64, "warmup_mib": 32})))
            .expect("create");
        let id = vm["id"].as_str().expect("id").to_owned();
        // Fire a snapshot (which saves ~32 MiB of data) and kill the server at a different moment
        // each round: before, during and after the save.
        let url_client = client;
        let request = std::thread::spawn(move || {
            url_client
                .request("POST", &format!("/v1/vms/{id}/snapshot"), None)
                .map(|a| a.status)
        });
        if round + 1 == rounds {
            // Last round: let the save commit, then kill.
            while count_files(&dir, ".state") == 0 {
                std::thread::sleep(Duration::from_millis(5));
            }
        } else {
            std::thread::sleep(Duration::from_micros(round * round * 2500));
        }
        child.kill().expect("kill -9");
        child.wait().expect("reap");
        if let Ok(Ok(201)) = request.join() {
            committed += 1;
        }
        mid_save += usize::from(count_files(&dir, ".tmp") > 0);

        let (mut child, client) = serve(&dir);
        let templates = client.call("GET", "/v1/templates", None).expect("list");
        let mut stderr = String::new();
        for template in templates.as_array().expect("array") {
            let tpl = template["id"].as_str().expect("id");
            let made = client
                .call(
                    "POST",
                    &format!("/v1/templates/{tpl}/clones"),
                    Some(&json!({"count": 1})),
                )
                .expect("clone a reloaded template");
            let clone = made["clones"][0]["id"].as_str().expect("clone");
            let sum = client
                .call(
                    "POST",
                    &format!("/v1/vms/{clone}/run"),
                    Some(&json!({"command": "checksum", "start_gpa": 8 << 20, "count": 64, "stride": 4096})),
                )
                .expect("read");
            assert_ne!(sum["result"], 0, "round {round}: {tpl} has its data");
        }
        child.kill().expect("kill");
        child.wait().expect("reap");
        if let Some(mut err) = child.stderr.take() {
            use std::io::Read;
            err.read_to_string(&mut stderr).ok();
        }
        assert!(!stderr.contains("refused a saved template"), "round {round}: {stderr}");
        let all: Vec<String> = std::fs::read_dir(&dir)
            .expect("list")
            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect();
        assert_eq!(
            count_files(&dir, ".tmp"),
            0,
            "round {round}: uncommitted files left: {all:?}; stderr {stderr}"
        );
        assert!(
            templates.as_array().expect("array").len() >= committed,
            "round {round}: a committed template is missing"
        );
        assert_eq!(
            templates.as_array().expect("array").len(),
            count_files(&dir, ".state"),
            "round {round}: every committed state file loads"
        );
    }
    let states = count_files(&dir, ".state");
    eprintln!(
        "{rounds} kills: {mid_save} in the middle of a save; {states} saves committed (reloaded after every kill)"
    );
    assert!(states > 0, "no save ever committed");
    std::fs::remove_dir_all(&dir).ok();
}
