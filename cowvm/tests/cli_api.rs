//! The CLI against a real server, `cowvm demo`, and `cowvm serve` stopping on SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use cowvm::server::{self, ServerConfig};
use serde_json::Value;

fn cowvm(url: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_cowvm"))
        .args(args)
        .env("COWVM_URL", url)
        .output()
        .expect("run cowvm");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json(url: &str, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    let (ok, out, err) = cowvm(url, &all);
    assert!(ok, "cowvm {args:?}: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("cowvm {args:?} printed no JSON ({e}): {out}"))
}

#[test]
fn test_cli_drives_the_api_with_tables_and_json() {
    let server = server::start(ServerConfig::local(0)).expect("server");
    let url = format!("http://{}", server.addr);
    let vm = json(&url, &["vm", "create", "--memory-mib", "32", "--warmup-mib", "4"]);
    let vm_id = vm["id"].as_str().expect("id").to_owned();
    let (ok, table, _) = cowvm(&url, &["vm", "ls"]);
    assert!(ok && table.contains(&vm_id) && table.contains("running"), "{table}");

    let snap = json(&url, &["snapshot", &vm_id]);
    let tpl = snap["template_id"].as_str().expect("template").to_owned();
    let made = json(&url, &["clone", &tpl, "--count", "3"]);
    assert_eq!(made["clones"].as_array().map(Vec::len), Some(3));
    let (ok, text, _) = cowvm(&url, &["clone", &tpl, "--count", "2"]);
    assert!(
        ok && text.contains("2 clones of") && text.contains("spawn p50"),
        "{text}"
    );
    let clone = made["clones"][0]["id"].as_str().expect("clone").to_owned();

    let (ok, text, err) = cowvm(&url, &["probe", &clone, "--start-gpa", "0x800000", "--pages", "4"]);
    assert!(ok, "{err}");
    assert!(text.contains("4 written") && text.contains("FAULT_US"), "{text}");
    let probe = json(&url, &["probe", &clone, "--gpas", "0xa00000,0xa02000"]);
    assert_eq!(probe["written"], 2);

    let stats = json(&url, &["stats", &clone]);
    assert_eq!(stats["pages"]["private"], 6);
    let (ok, text, _) = cowvm(&url, &["stats", "--template", &tpl]);
    assert!(
        ok && text.contains("5 clones") && text.contains("mapped by every clone") && text.contains("naive baseline"),
        "{text}"
    );
    let (ok, text, _) = cowvm(&url, &["template", "ls"]);
    assert!(ok && text.contains(&tpl), "{text}");
    let (ok, text, _) = cowvm(&url, &["vm", "reset", &clone]);
    assert!(
        ok && (text.contains("by swap") || text.contains("in place in") && text.contains("6 private pages dropped")),
        "{text}"
    );
    assert_eq!(json(&url, &["stats", &clone])["pages"]["private"], 0);

    let (ok, _, err) = cowvm(&url, &["template", "rm", &tpl]);
    assert!(!ok && err.contains("409 template_in_use"), "{err}");
    let (ok, _, err) = cowvm(&url, &["vm", "rm", "vm-4242"]);
    assert!(!ok && err.contains("404 not_found"), "{err}");
    server.stop().expect("stop");
    let (ok, _, err) = cowvm(&url, &["vm", "ls"]);
    assert!(!ok && err.contains("cannot reach the cowvm server"), "{err}");
}

#[test]
fn test_demo_runs_end_to_end_and_cleans_up() {
    let out = Command::new(env!("CARGO_BIN_EXE_cowvm"))
        .args(["demo", "--memory-mib", "64", "--clones", "10"])
        .output()
        .expect("run demo");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    for needle in [
        "made 10 clones",
        "spawn p50",
        "host memory per clone",
        "10 of 10 went from the template's frame",
        "cleaned up",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
}

#[test]
fn test_serve_stops_gracefully_on_sigterm() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_cowvm"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start cowvm serve");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let first = lines.next().expect("a line").expect("read");
    let url = first.rsplit(' ').next().expect("url").to_owned();
    assert!(first.contains("listening on http://127.0.0.1:"), "{first}");
    let client = cowvm::client::Client::new(&url, None);
    let vm = client
        .call("POST", "/v1/vms", Some(&serde_json::json!({"memory_mib": 16})))
        .expect("create");
    assert_eq!(vm["state"], "running");
    // SAFETY: sending SIGTERM to our own child process.
    assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) }, 0);
    let status = child.wait().expect("wait");
    assert!(status.success(), "{status}");
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(rest.iter().any(|l| l.contains("every VM was torn down")), "{rest:?}");
}
