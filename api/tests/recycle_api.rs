//! Recycling through the API: a deleted clone goes back to its template's warm pool (reset off
//! the request path), `POST /v1/vms/{id}/reset` swaps in a warm shell when one is ready, and
//! `--max-vms` holds throughout. The room is arranged so that the builder cannot build a shell
//! (the VM limit is full), so every shell that appears was recycled.

mod common;

use std::time::{Duration, Instant};

use cowvm::client::Client;
use cowvm::server::{self, Limits, RunningServer, ServerConfig};
use serde_json::{json, Value};

const MAX: u64 = 4;

fn start() -> (RunningServer, Client) {
    let config = ServerConfig {
        limits: Limits {
            max_vms: MAX as usize,
            warm_shells: 8,
            ..Limits::default()
        },
        ..ServerConfig::local(0)
    };
    let server = server::start(config).expect("server starts");
    let client = Client::new(&format!("http://{}", server.addr), None);
    (server, client)
}

fn ok(c: &Client, method: &str, path: &str, body: Option<Value>, status: u16) -> Value {
    let answer = c.request(method, path, body.as_ref()).expect("request");
    assert_eq!(answer.status, status, "{method} {path}: {}", answer.body);
    answer.body
}

/// A counter from `/metrics`.
fn metric(server: &RunningServer, name: &str) -> u64 {
    let answer = common::raw(server.addr, "GET", "/metrics", None, b"");
    let text = answer.body.as_str().unwrap_or_default().to_owned();
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("{name} in /metrics"))
}

fn warm_shells(c: &Client, tpl: &str) -> u64 {
    ok(c, "GET", &format!("/v1/templates/{tpl}"), None, 200)["warm_shells"]
        .as_u64()
        .expect("warm_shells")
}

/// KVM VMs the server shows (live VMs and warm shells), which must never pass the limit.
fn within(c: &Client, tpl: &str) {
    let live = ok(c, "GET", "/v1/vms", None, 200).as_array().map_or(0, Vec::len) as u64;
    let held = live + warm_shells(c, tpl);
    assert!(held <= MAX, "{held} VMs (live + warm shells) > --max-vms {MAX}");
}

/// Polls until `done` holds, checking the VM limit at every look.
fn wait(c: &Client, tpl: &str, mut done: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(30);
    while !done() {
        within(c, tpl);
        assert!(Instant::now() < until, "timed out");
        std::thread::sleep(Duration::from_millis(10));
    }
    within(c, tpl);
}

fn clone(c: &Client, tpl: &str, count: u64) -> Vec<String> {
    let made = ok(
        c,
        "POST",
        &format!("/v1/templates/{tpl}/clones"),
        Some(json!({ "count": count })),
        201,
    );
    made["clones"]
        .as_array()
        .expect("clones")
        .iter()
        .map(|v| v["id"].as_str().expect("id").to_owned())
        .collect()
}

fn private_pages(c: &Client, vm: &str) -> u64 {
    ok(c, "GET", &format!("/v1/vms/{vm}/stats"), None, 200)["pages"]["private"]
        .as_u64()
        .expect("private pages")
}

fn dirty(c: &Client, vm: &str, pages: u64) {
    let write = json!({"command": "write", "start_gpa": 16 << 20, "count": pages, "stride": 4096, "value": 7});
    ok(c, "POST", &format!("/v1/vms/{vm}/run"), Some(write), 200);
    assert!(private_pages(c, vm) >= pages);
}

#[test]
fn test_deleted_clones_are_recycled_and_reset_swaps_in_a_warm_shell() {
    let (server, c) = start();
    let vm = ok(&c, "POST", "/v1/vms", Some(json!({"memory_mib": 64})), 201)["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let tpl = ok(&c, "POST", &format!("/v1/vms/{vm}/snapshot"), None, 201)["template_id"]
        .as_str()
        .expect("template id")
        .to_owned();
    // The pool fills the room beside the VM: 3 shells, and the limit is full.
    wait(&c, &tpl, || warm_shells(&c, &tpl) == MAX - 1);

    // Delete: the clone comes back as a shell (the builder has no room to build one).
    let first = clone(&c, &tpl, 1).remove(0);
    dirty(&c, &first, 50);
    assert_eq!(warm_shells(&c, &tpl), MAX - 2);
    ok(&c, "DELETE", &format!("/v1/vms/{first}"), None, 204);
    wait(&c, &tpl, || metric(&server, "cowvm_vms_recycled_total") == 1);
    wait(&c, &tpl, || warm_shells(&c, &tpl) == MAX - 1);
    assert_eq!(metric(&server, "cowvm_vms_not_recycled_total"), 0);

    // Reset by swap: same id, new generation, no private page at once; the used VM is recycled.
    let second = clone(&c, &tpl, 1).remove(0);
    let before = ok(&c, "GET", &format!("/v1/vms/{second}"), None, 200)["generation"].clone();
    dirty(&c, &second, 1000);
    let reset = ok(&c, "POST", &format!("/v1/vms/{second}/reset"), None, 200);
    assert_eq!(reset["swapped"], true, "{reset}");
    assert_eq!(reset["pages_dropped"], 0);
    assert_ne!(reset["generation"], before);
    let after = ok(&c, "GET", &format!("/v1/vms/{second}"), None, 200);
    assert_eq!(after["id"], second.as_str());
    assert_eq!(after["generation"], reset["generation"]);
    assert_eq!(private_pages(&c, &second), 0, "the VM id runs on a clean shell");
    wait(&c, &tpl, || metric(&server, "cowvm_vms_recycled_total") == 2);
    wait(&c, &tpl, || warm_shells(&c, &tpl) == MAX - 2);
    ok(
        &c,
        "POST",
        &format!("/v1/vms/{second}/run"),
        Some(json!({"command": "exit"})),
        200,
    );

    // Every clone taken from the recycled shells starts clean.
    let rest = clone(&c, &tpl, MAX - 2);
    for vm in &rest {
        assert_eq!(private_pages(&c, vm), 0, "{vm} starts with no private page");
    }
    within(&c, &tpl);
    // No shell is left and there is no room to build one: the reset happens in place.
    dirty(&c, &second, 10);
    let reset = ok(&c, "POST", &format!("/v1/vms/{second}/reset"), None, 200);
    assert_eq!(reset["swapped"], false, "{reset}");
    assert!(reset["pages_dropped"].as_u64().is_some_and(|n| n >= 10), "{reset}");
    assert_eq!(private_pages(&c, &second), 0);
    server.stop().expect("stop");
}
