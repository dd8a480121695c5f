//! Running out of file descriptors: a big clone request makes what fits, reports the rest, keeps
//! enough descriptors to go on answering, and works again once VMs are deleted.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use cowvm::client::Client;
use serde_json::json;

#[test]
fn test_fd_exhaustion_gives_partial_results_then_503_and_the_server_recovers() {
    let exe = env!("CARGO_BIN_EXE_cowvm");
    let mut child = Command::new("bash")
        .args([
            "-c",
            &format!("ulimit -n 300 && exec {exe} serve --listen 127.0.0.1:0 --warm-shells 0"),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start a server with 300 file descriptors");
    let line = BufReader::new(child.stdout.take().expect("stdout"))
        .lines()
        .next()
        .expect("line")
        .expect("read");
    let c = Client::new(line.rsplit(' ').next().expect("url"), None);
    let vm = c
        .call("POST", "/v1/vms", Some(&json!({"memory_mib": 16})))
        .expect("boot")["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let tpl = c
        .call("POST", &format!("/v1/vms/{vm}/snapshot"), None)
        .expect("snapshot")["template_id"]
        .as_str()
        .expect("tpl")
        .to_owned();

    let answer = c
        .request(
            "POST",
            &format!("/v1/templates/{tpl}/clones"),
            Some(&json!({"count": 200})),
        )
        .expect("clone");
    assert_eq!(answer.status, 201, "{}", answer.body);
    let made: Vec<String> = answer.body["clones"]
        .as_array()
        .expect("clones")
        .iter()
        .map(|c| c["id"].as_str().expect("id").to_owned())
        .collect();
    let failed = answer.body["failed"].as_array().expect("failed");
    assert!(!made.is_empty() && made.len() < 200, "{} made", made.len());
    assert_eq!(made.len() + failed.len(), 200);
    assert!(
        failed[0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("file descriptors")),
        "{}",
        failed[0]
    );

    let more = c
        .request(
            "POST",
            &format!("/v1/templates/{tpl}/clones"),
            Some(&json!({"count": 5})),
        )
        .expect("clone more");
    assert_eq!(more.status, 503, "{}", more.body);
    assert_eq!(more.body["error"]["code"], "resources_exhausted");
    let fresh = Client::new(line.rsplit(' ').next().expect("url"), None);
    assert_eq!(
        fresh
            .request("GET", "/healthz", None)
            .expect("a new connection is still accepted")
            .status,
        200
    );

    for id in &made {
        c.call("DELETE", &format!("/v1/vms/{id}"), None).expect("delete");
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    let again = c
        .call(
            "POST",
            &format!("/v1/templates/{tpl}/clones"),
            Some(&json!({"count": 20})),
        )
        .expect("clones again");
    assert_eq!(again["clones"].as_array().map(Vec::len), Some(20), "recovered: {again}");
    // SAFETY: SIGTERM to our own child.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    assert!(child.wait().expect("wait").success());
}
