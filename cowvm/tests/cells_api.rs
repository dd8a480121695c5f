//! `cowvm serve --cells` over real HTTP on /dev/kvm: clones of a template live in sandboxed
//! `cowvm cell` processes, answer like in-process clones, and a cell killed with SIGKILL loses
//! only its own VMs (reported `lost`, 409 `vm_lost`) while the others keep answering.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cowvm::client::Client;
use cowvm::server::{self, CellsConfig, Limits, RunningServer, ServerConfig};
use serde_json::{json, Value};

fn limits() -> Limits {
    Limits {
        max_memory_mib: 512,
        warm_shells: 2,
        guest_deadline: Duration::from_millis(2000),
        ..Limits::default()
    }
}

fn start(cells: Option<CellsConfig>) -> (RunningServer, Client) {
    let config = ServerConfig {
        limits: limits(),
        cells,
        ..ServerConfig::local(0)
    };
    let server = server::start(config).expect("server starts");
    let client = Client::new(&format!("http://{}", server.addr), None);
    (server, client)
}

fn cells(vms_per_cell: u32, max_cells: usize) -> CellsConfig {
    CellsConfig {
        program: PathBuf::from(env!("CARGO_BIN_EXE_cowvm")),
        args: vec!["cell".into()],
        vms_per_cell,
        max_cells,
        idle_cells: 1,
        idle_after: Duration::from_secs(3600),
    }
}

/// Waits (up to a generous bound) until `done` holds; whether it does.
fn eventually(mut done: impl FnMut() -> bool) -> bool {
    let started = Instant::now();
    while !done() {
        if started.elapsed() > Duration::from_secs(60) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// Whether process `pid` is gone (or a zombie).
fn process_gone(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_or(true, |s| s.lines().any(|l| l.starts_with("State:") && l.contains('Z')))
}

fn ok(client: &Client, method: &str, path: &str, body: Option<Value>, status: u16) -> Value {
    let answer = client.request(method, path, body.as_ref()).expect("request");
    assert_eq!(answer.status, status, "{method} {path}: {}", answer.body);
    answer.body
}

fn error_code(client: &Client, method: &str, path: &str, body: Option<Value>, status: u16) -> String {
    let body = ok(client, method, path, body, status);
    let message = body["error"]["message"].as_str().unwrap_or("");
    assert!(!message.is_empty(), "{body}");
    body["error"]["code"].as_str().unwrap_or("").to_owned()
}

/// The checksum command every test runs: 64 qwords over the warm-up data, one per page.
fn checksum() -> Value {
    json!({"command": "checksum", "start_gpa": 8 << 20, "count": 64, "stride": 4096})
}

fn run_checksum(client: &Client, vm: &str) -> u64 {
    let out = ok(client, "POST", &format!("/v1/vms/{vm}/run"), Some(checksum()), 200);
    assert_eq!(out["status"], 0, "{out}");
    out["result"].as_u64().expect("result")
}

/// Boots the same VM (64 MiB, 8 MiB of warm-up data) and snapshots it; the template id.
fn template(client: &Client) -> (String, String) {
    let vm = ok(
        client,
        "POST",
        "/v1/vms",
        Some(json!({"memory_mib": 64, "vcpus": 1, "warmup_mib": 8, "kernel": null})),
        201,
    );
    let vm = vm["id"].as_str().expect("vm id").to_owned();
    let snap = ok(client, "POST", &format!("/v1/vms/{vm}/snapshot"), None, 201);
    (vm, snap["template_id"].as_str().expect("template id").to_owned())
}

/// A template as [`template`] makes it, its booted source VM deleted: with cells the source
/// lives in a cell too, and the tests that use this count only clones there.
fn clones_template(client: &Client) -> String {
    let (vm, tpl) = template(client);
    ok(client, "DELETE", &format!("/v1/vms/{vm}"), None, 204);
    tpl
}

fn clone_ids(client: &Client, template: &str, count: u64) -> Vec<String> {
    let made = ok(
        client,
        "POST",
        &format!("/v1/templates/{template}/clones"),
        Some(json!({ "count": count })),
        201,
    );
    assert_eq!(made["failed"], json!([]), "{made}");
    made["clones"]
        .as_array()
        .expect("clones")
        .iter()
        .map(|c| c["id"].as_str().expect("clone id").to_owned())
        .collect()
}

/// A field of `/proc/<pid>/status` (its first number).
fn status_field(pid: u64, name: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("cell status");
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("/proc/{pid}/status lacks {name}"))
}

fn running_as_root() -> bool {
    status_field(std::process::id() as u64, "Uid:") == 0
}

/// The checksum of an in-process clone of the same VM, on a server without cells.
fn in_process_checksum() -> u64 {
    let (_server, client) = start(None);
    let (_, tpl) = template(&client);
    let clone = clone_ids(&client, &tpl, 1).remove(0);
    let info = ok(&client, "GET", &format!("/v1/vms/{clone}"), None, 200);
    assert_eq!(info["kind"], "clone", "{info}");
    run_checksum(&client, &clone)
}

#[test]
fn test_cells_list_is_empty_without_cells() {
    let (_server, client) = start(None);
    assert_eq!(ok(&client, "GET", "/v1/cells", None, 200), json!([]));
    let doc = ok(&client, "GET", "/openapi.json", None, 200);
    assert!(
        doc["paths"]["/v1/cells"]["get"].is_object(),
        "GET /v1/cells in the OpenAPI document"
    );
}

#[test]
fn test_clones_in_cells_run_reset_delete_and_a_killed_cell_loses_only_its_vms() {
    let reference = in_process_checksum();
    let (_server, client) = start(Some(cells(10, 4)));
    let (source, tpl) = template(&client);
    assert_eq!(
        run_checksum(&client, &source),
        reference,
        "the VM frozen (in its cell) answers as an in-process clone"
    );
    // The booted VM lives in a cell too; only the clones are counted below.
    ok(&client, "DELETE", &format!("/v1/vms/{source}"), None, 204);
    let clones = clone_ids(&client, &tpl, 20);
    assert_eq!(clones.len(), 20);

    // 20 clones at 10 per cell: two sandboxed cells hold them (others may hold warm shells).
    let listed = ok(&client, "GET", "/v1/cells", None, 200);
    let listed = listed.as_array().expect("cells").clone();
    let holding = listed.iter().filter(|c| c["vms"].as_u64().unwrap_or(0) > 0).count();
    assert_eq!(holding, 2, "{listed:?}");
    assert_eq!(listed.iter().map(|c| c["vms"].as_u64().unwrap_or(0)).sum::<u64>(), 20);
    for cell in &listed {
        let pid = cell["pid"].as_u64().expect("pid");
        assert_ne!(pid, u64::from(std::process::id()), "a cell is a process of its own");
        assert_eq!(cell["seccomp"], 2, "{cell}");
        assert_eq!(status_field(pid, "Seccomp:"), 2, "seccomp filter mode");
        assert_eq!(status_field(pid, "NoNewPrivs:"), 1);
        if running_as_root() {
            assert_eq!(cell["uid"], 65534, "{cell}");
            assert_eq!(status_field(pid, "Uid:"), 65534);
        }
    }

    // The VM list holds every clone; a clone answers like one in-process.
    let all = ok(&client, "GET", "/v1/vms", None, 200);
    assert_eq!(all.as_array().map(Vec::len), Some(20), "{all}");
    assert_eq!(ok(&client, "GET", "/healthz", None, 200)["vms"], 20);
    assert_eq!(
        ok(&client, "GET", &format!("/v1/templates/{tpl}"), None, 200)["clones"],
        20
    );
    let first = &clones[0];
    let info = ok(&client, "GET", &format!("/v1/vms/{first}"), None, 200);
    assert_eq!(
        (info["state"].as_str(), info["kind"].as_str()),
        (Some("running"), Some("clone"))
    );
    assert_eq!(info["template_id"], tpl.as_str());
    assert_eq!(
        run_checksum(&client, first),
        reference,
        "same data as an in-process clone"
    );

    // A write changes the clone only; a reset takes it back to the template.
    let write = json!({"command": "write", "start_gpa": 8 << 20, "count": 64, "stride": 4096, "value": 7});
    ok(&client, "POST", &format!("/v1/vms/{first}/run"), Some(write), 200);
    assert_ne!(run_checksum(&client, first), reference);
    assert_eq!(run_checksum(&client, &clones[1]), reference);
    let reset = ok(&client, "POST", &format!("/v1/vms/{first}/reset"), None, 200);
    assert!(reset["generation"].is_u64(), "{reset}");
    assert_eq!(run_checksum(&client, first), reference);

    // A bad command is refused without failing the VM.
    let outside = json!({"command": "checksum", "start_gpa": 1u64 << 40, "count": 1});
    assert_eq!(
        error_code(&client, "POST", &format!("/v1/vms/{first}/run"), Some(outside), 422),
        "address_out_of_range"
    );
    assert_eq!(run_checksum(&client, first), reference);

    // A guest that runs past its deadline fails its VM only (409 vm_failed, as in process).
    let spinner = &clones[18];
    let spin = json!({"command": "spin"});
    assert_eq!(
        error_code(&client, "POST", &format!("/v1/vms/{spinner}/run"), Some(spin), 409),
        "vm_failed"
    );
    let info = ok(&client, "GET", &format!("/v1/vms/{spinner}"), None, 200);
    assert_eq!(info["state"], "failed", "{info}");
    assert_eq!(
        error_code(
            &client,
            "POST",
            &format!("/v1/vms/{spinner}/run"),
            Some(checksum()),
            409
        ),
        "vm_failed"
    );
    ok(&client, "DELETE", &format!("/v1/vms/{spinner}"), None, 204);
    assert_eq!(run_checksum(&client, &clones[17]), reference);

    // What in-cell VMs cannot do yet is a clear 409.
    for (method, suffix, body) in [
        ("POST", "snapshot", None),
        ("POST", "clones", Some(json!({"count": 1}))),
        ("POST", "probes/write", Some(json!({"gpas": [8 << 20]}))),
    ] {
        let code = error_code(&client, method, &format!("/v1/vms/{first}/{suffix}"), body, 409);
        assert_eq!(code, "not_supported_in_cell", "{method} {suffix}");
    }
    assert_eq!(
        error_code(&client, "DELETE", &format!("/v1/templates/{tpl}"), None, 409),
        "template_in_use"
    );

    // Delete.
    ok(&client, "DELETE", &format!("/v1/vms/{}", clones[19]), None, 204);
    assert_eq!(
        error_code(&client, "GET", &format!("/v1/vms/{}", clones[19]), None, 404),
        "not_found"
    );
    let clones = &clones[..18];

    // kill -9 of one cell: its VMs are lost, the others keep answering.
    let listed = ok(&client, "GET", "/v1/cells", None, 200);
    let victim = listed
        .as_array()
        .expect("cells")
        .iter()
        .find(|c| c["vms"].as_u64().unwrap_or(0) > 0)
        .unwrap_or_else(|| panic!("no cell holds a VM: {listed}"))
        .clone();
    let victim_id = victim["id"].clone();
    let victim_vms = victim["vms"].as_u64().expect("vms") as usize;
    let victim = victim["pid"].as_u64().expect("pid");
    assert!(victim_vms > 0 && victim_vms < clones.len(), "{listed}");
    let killed = std::process::Command::new("kill")
        .args(["-9", &victim.to_string()])
        .status()
        .expect("run kill");
    assert!(killed.success());
    let started = Instant::now();
    let (lost, alive) = loop {
        let states: Vec<(String, Value)> = clones
            .iter()
            .map(|id| (id.clone(), ok(&client, "GET", &format!("/v1/vms/{id}"), None, 200)))
            .collect();
        let (lost, alive): (Vec<_>, Vec<_>) = states.into_iter().partition(|(_, info)| info["state"] == "lost");
        if lost.len() >= victim_vms || started.elapsed() > Duration::from_secs(60) {
            break (lost, alive);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // Every VM of the killed cell is reported, and only those.
    assert_eq!(lost.len(), victim_vms, "lost VMs");
    assert_eq!(alive.len(), clones.len() - victim_vms, "VMs of the other cell");
    assert!(alive.iter().all(|(_, info)| info["state"] == "running"));
    for (id, info) in &lost {
        assert!(
            info["failure"]
                .as_str()
                .is_some_and(|r| r.contains("killed by signal 9")),
            "{info}"
        );
        assert_eq!(
            error_code(&client, "POST", &format!("/v1/vms/{id}/run"), Some(checksum()), 409),
            "vm_lost"
        );
        assert_eq!(
            error_code(&client, "POST", &format!("/v1/vms/{id}/reset"), None, 409),
            "vm_lost"
        );
    }
    for (id, _) in &alive {
        assert_eq!(run_checksum(&client, id), reference, "{id} keeps answering");
    }
    let cells_now = ok(&client, "GET", "/v1/cells", None, 200);
    assert!(
        cells_now
            .as_array()
            .expect("cells")
            .iter()
            .all(|c| c["id"] != victim_id),
        "the dead cell is gone from the list: {cells_now}"
    );

    // A new clone call gets a new cell where it needs one.
    let more = clone_ids(&client, &tpl, 5);
    assert_eq!(run_checksum(&client, &more[0]), reference);

    // Lost VMs can be deleted like any other.
    let (lost_id, _) = &lost[0];
    ok(&client, "DELETE", &format!("/v1/vms/{lost_id}"), None, 204);
    ok(&client, "GET", &format!("/v1/vms/{lost_id}"), None, 404);
}

#[test]
fn test_serve_with_cells_flag_runs_clones_in_cowvm_cell_processes_up_to_max_cells() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_cowvm"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--cells",
            "--vms-per-cell",
            "2",
            "--max-cells",
            "3",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start cowvm serve --cells");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let first = lines.next().expect("a line").expect("read");
    let url = first.rsplit(' ').next().expect("url").to_owned();
    let client = Client::new(&url, None);
    let tpl = clones_template(&client);
    let clones = clone_ids(&client, &tpl, 3);
    let listed = ok(&client, "GET", "/v1/cells", None, 200);
    let pids: Vec<u64> = listed
        .as_array()
        .expect("cells")
        .iter()
        .map(|c| c["pid"].as_u64().expect("pid"))
        .collect();
    assert!(pids.len() <= 3, "never more cells than --max-cells: {listed}");
    let holding = listed
        .as_array()
        .expect("cells")
        .iter()
        .filter(|c| c["vms"].as_u64().unwrap_or(0) > 0)
        .count();
    assert_eq!(holding, 2, "3 clones at 2 per cell: {listed}");
    for pid in &pids {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("cmdline");
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        assert_eq!(args.get(1).copied(), Some(&b"cell"[..]), "a cell is `cowvm cell`");
        assert_eq!(status_field(*pid, "Seccomp:"), 2);
    }
    assert_eq!(run_checksum(&client, &clones[2]), run_checksum(&client, &clones[0]));
    // 1 place left and room for 1 more cell of 2: 4 more clones do not fit.
    let full = json!({"count": 4});
    assert_eq!(
        error_code(&client, "POST", &format!("/v1/templates/{tpl}/clones"), Some(full), 429),
        "too_many_vms"
    );
    assert_eq!(clone_ids(&client, &tpl, 3).len(), 3, "3 more fit");
    // SAFETY: sending SIGTERM to our own child process.
    assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) }, 0);
    let status = child.wait().expect("wait");
    assert!(status.success(), "{status}");
    // The cells end with their server.
    let started = Instant::now();
    let gone = |pid: &u64| {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .map_or(true, |s| s.lines().any(|l| l.starts_with("State:") && l.contains('Z')))
    };
    while !pids.iter().all(gone) && started.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(pids.iter().all(gone), "cells outlived their server");
}

/// Descriptors and mappings of memfds in process `pid` (template memory).
fn memfds_held(pid: u64) -> usize {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("cell fds")
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|target| target.to_string_lossy().contains("memfd:"))
        .count();
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("cell maps");
    fds + maps.lines().filter(|l| l.contains("memfd:")).count()
}

#[test]
fn test_deleting_a_template_drops_its_memfds_from_the_cells() {
    let (_server, client) = start(Some(cells(10, 2)));
    let tpl = clones_template(&client);
    let clones = clone_ids(&client, &tpl, 2);
    let listed = ok(&client, "GET", "/v1/cells", None, 200);
    let pid = listed[0]["pid"].as_u64().expect("pid");
    assert!(memfds_held(pid) > 0, "the cell maps the template's memfd");
    assert_eq!(
        error_code(&client, "DELETE", &format!("/v1/templates/{tpl}"), None, 409),
        "template_in_use"
    );
    for clone in &clones {
        ok(&client, "DELETE", &format!("/v1/vms/{clone}"), None, 204);
    }
    ok(&client, "DELETE", &format!("/v1/templates/{tpl}"), None, 204);
    let started = Instant::now();
    while memfds_held(pid) > 0 && started.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        memfds_held(pid),
        0,
        "the cell still holds the deleted template's memory"
    );
}

#[test]
fn test_in_cell_clones_count_against_max_vms_with_in_process_vms() {
    // --max-vms 4 with room for 8 VMs in cells: the booted VM holds one, so 3 clones fit.
    let config = ServerConfig {
        limits: Limits { max_vms: 4, ..limits() },
        cells: Some(cells(2, 4)),
        ..ServerConfig::local(0)
    };
    let server = server::start(config).expect("server starts");
    let client = Client::new(&format!("http://{}", server.addr), None);
    let (_vm, tpl) = template(&client);
    let path = format!("/v1/templates/{tpl}/clones");
    let code = error_code(&client, "POST", &path, Some(json!({"count": 4})), 429);
    assert_eq!(code, "too_many_vms");
    let live = || ok(&client, "GET", "/v1/vms", None, 200).as_array().expect("vms").len();
    assert_eq!(live(), 1, "a refused call places nothing");
    let ids = clone_ids(&client, &tpl, 3);
    assert_eq!(live(), 4);
    let code = error_code(&client, "POST", &path, Some(json!({"count": 1})), 429);
    assert_eq!(code, "too_many_vms");
    // A booted VM is refused too: the in-cell clones hold the room.
    let boot = json!({"memory_mib": 64, "vcpus": 1, "warmup_mib": 0, "kernel": null});
    let code = error_code(&client, "POST", "/v1/vms", Some(boot), 429);
    assert_eq!(code, "too_many_vms");
    assert_eq!(live(), 4);
    // Deleting an in-cell clone gives its room back.
    ok(&client, "DELETE", &format!("/v1/vms/{}", ids[0]), None, 204);
    let again = clone_ids(&client, &tpl, 1);
    assert_eq!(again.len(), 1);
    assert_eq!(live(), 4);
    // A VM lost with its killed cell gives its room back too (while it is still listed).
    let listed = ok(&client, "GET", "/v1/cells", None, 200);
    let victim = listed
        .as_array()
        .expect("cells")
        .iter()
        .find(|c| c["vms"].as_u64().unwrap_or(0) > 0)
        .unwrap_or_else(|| panic!("no cell holds a VM: {listed}"));
    let victim_vms = victim["vms"].as_u64().expect("vms") as usize;
    let killed = Command::new("kill")
        .args(["-9", &victim["pid"].as_u64().expect("pid").to_string()])
        .status()
        .expect("run kill");
    assert!(killed.success());
    let started = Instant::now();
    let lost_count = || {
        let all = ok(&client, "GET", "/v1/vms", None, 200);
        all.as_array()
            .expect("vms")
            .iter()
            .filter(|v| v["state"] == "lost")
            .count()
    };
    while lost_count() < victim_vms && started.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(lost_count(), victim_vms);
    let refill = clone_ids(&client, &tpl, victim_vms as u64);
    assert_eq!(refill.len(), victim_vms);
    let code = error_code(&client, "POST", &path, Some(json!({"count": 1})), 429);
    assert_eq!(code, "too_many_vms");
}

/// Warm shells ready over all cells, as `GET /v1/cells` reports them.
fn cell_shells(client: &Client) -> u64 {
    let listed = ok(client, "GET", "/v1/cells", None, 200);
    listed
        .as_array()
        .expect("cells")
        .iter()
        .map(|c| c["warm_shells"].as_u64().expect("warm_shells"))
        .sum()
}

/// Waits until the cells report `shells` warm shells (they are built in the background).
fn wait_for_cell_shells(client: &Client, shells: u64) -> u64 {
    let started = Instant::now();
    loop {
        let ready = cell_shells(client);
        if ready == shells || started.elapsed() > Duration::from_secs(60) {
            return ready;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn test_cells_keep_warm_shells_that_clone_calls_take() {
    let (_server, client) = start(Some(cells(10, 4)));
    let tpl = clones_template(&client);
    // --warm-shells 2: kept in cells, not in the server.
    assert_eq!(wait_for_cell_shells(&client, 2), 2);
    let info = ok(&client, "GET", &format!("/v1/templates/{tpl}"), None, 200);
    assert_eq!(info["warm_shells"], 2, "{info}");
    let path = format!("/v1/templates/{tpl}/clones");
    let made = ok(&client, "POST", &path, Some(json!({"count": 2})), 201);
    let clones = made["clones"].as_array().expect("clones");
    assert_eq!(clones.len(), 2, "{made}");
    assert!(
        clones.iter().all(|c| c["pooled"] == true),
        "clones took warm shells in cells: {made}"
    );
    // The cells build new shells off the request path.
    assert_eq!(wait_for_cell_shells(&client, 2), 2);

    // A larger target spreads over cells; a call of that many takes them all.
    let warm = ok(
        &client,
        "POST",
        &format!("/v1/templates/{tpl}/warm"),
        Some(json!({"shells": 15})),
        200,
    );
    assert_eq!(warm["target"], 15, "{warm}");
    assert_eq!(wait_for_cell_shells(&client, 15), 15);
    let made = ok(&client, "POST", &path, Some(json!({"count": 15})), 201);
    let clones = made["clones"].as_array().expect("clones");
    assert_eq!(clones.len(), 15, "{made}");
    assert!(clones.iter().all(|c| c["pooled"] == true), "{made}");
    let id = clones[0]["id"].as_str().expect("id");
    assert_eq!(run_checksum(&client, id), run_checksum(&client, id));
    let listed = ok(&client, "GET", "/v1/cells", None, 200);
    let vms: u64 = listed
        .as_array()
        .expect("cells")
        .iter()
        .map(|c| c["vms"].as_u64().expect("vms"))
        .sum();
    assert_eq!(vms, 17, "{listed}");
    // No more shells wanted: the cells tear theirs down.
    ok(
        &client,
        "POST",
        &format!("/v1/templates/{tpl}/warm"),
        Some(json!({"shells": 0})),
        200,
    );
    assert_eq!(wait_for_cell_shells(&client, 0), 0);
}

#[test]
fn test_warm_shells_in_cells_count_against_max_vms_and_give_way_to_vms() {
    let config = ServerConfig {
        limits: Limits { max_vms: 4, ..limits() },
        cells: Some(cells(10, 2)),
        ..ServerConfig::local(0)
    };
    let server = server::start(config).expect("server starts");
    let client = Client::new(&format!("http://{}", server.addr), None);
    // The booted VM holds 1 of 4; the 2 shells in cells hold 2 more.
    let (_vm, tpl) = template(&client);
    assert_eq!(wait_for_cell_shells(&client, 2), 2);
    // Booted VMs still fit: shells give way.
    let boot = json!({"memory_mib": 64, "vcpus": 1, "warmup_mib": 0, "kernel": null});
    ok(&client, "POST", "/v1/vms", Some(boot.clone()), 201);
    ok(&client, "POST", "/v1/vms", Some(boot.clone()), 201);
    assert!(cell_shells(&client) <= 1, "3 VMs and the shells stay within 4");
    // One place is left, for a clone; then nothing fits.
    let path = format!("/v1/templates/{tpl}/clones");
    ok(&client, "POST", &path, Some(json!({"count": 1})), 201);
    assert_eq!(cell_shells(&client), 0);
    let code = error_code(&client, "POST", &path, Some(json!({"count": 1})), 429);
    assert_eq!(code, "too_many_vms");
    let code = error_code(&client, "POST", "/v1/vms", Some(boot), 429);
    assert_eq!(code, "too_many_vms");
    // A larger target does not get past the limit either.
    ok(
        &client,
        "POST",
        &format!("/v1/templates/{tpl}/warm"),
        Some(json!({"shells": 4})),
        200,
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(cell_shells(&client), 0, "no room for shells under --max-vms 4");
}

/// Keys of a JSON object, sorted.
fn keys(v: &Value) -> Vec<String> {
    let mut keys: Vec<String> = v.as_object().expect("an object").keys().cloned().collect();
    keys.sort();
    keys
}

#[test]
fn test_stats_of_an_in_cell_vm_are_read_by_the_supervisor_from_the_cells_pagemap() {
    // The keys an in-process clone's stats have.
    let in_process = {
        let (_server, client) = start(None);
        let (_, tpl) = template(&client);
        let clone = clone_ids(&client, &tpl, 1).remove(0);
        ok(&client, "GET", &format!("/v1/vms/{clone}/stats"), None, 200)
    };
    let (_server, client) = start(Some(cells(10, 2)));
    let (_, tpl) = template(&client);
    let clone = clone_ids(&client, &tpl, 1).remove(0);
    let stats = |client: &Client| ok(client, "GET", &format!("/v1/vms/{clone}/stats"), None, 200);
    run_checksum(&client, &clone);
    let before = stats(&client);
    assert_eq!(keys(&before), keys(&in_process), "{before}");
    assert_eq!(keys(&before["pages"]), keys(&in_process["pages"]));
    assert_eq!(before["id"], clone.as_str());
    assert_eq!(before["pages"]["total"], (64u64 << 20) / 4096, "{before}");
    assert!(
        before["pages"]["template_backed"].as_u64().expect("template_backed") >= 64,
        "the 64 pages the checksum read map template frames: {before}"
    );
    assert!(
        before["kvm"]["vcpus"][0].as_object().is_some_and(|o| !o.is_empty()),
        "{before}"
    );
    assert!(
        before["kvm"]["vm"].as_object().is_some_and(|o| !o.is_empty()),
        "{before}"
    );
    // A guest write to 64 pages it had read: 64 more private pages, seen from the supervisor.
    let write = json!({"command": "write", "start_gpa": 8 << 20, "count": 64, "stride": 4096, "value": 7});
    ok(&client, "POST", &format!("/v1/vms/{clone}/run"), Some(write), 200);
    let after = stats(&client);
    let private = |s: &Value| s["pages"]["private"].as_u64().expect("private");
    assert!(
        private(&after) >= private(&before) + 64,
        "before {before}\nafter {after}"
    );
    let exits = |s: &Value| s["kvm"]["vcpus"][0]["exits"]["value"].as_u64().unwrap_or(0);
    assert!(exits(&after) > exits(&before), "KVM's counters move: {after}");
}

#[test]
fn test_calls_run_in_the_cell_of_an_in_cell_vm() {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let dir = std::env::temp_dir().join(format!("cowvm-cells-call-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("kernel dir");
    std::fs::write(dir.join("hello.elf"), cowvm_guest::HELLO_ELF).expect("hello");
    let config = ServerConfig {
        limits: limits(),
        cells: Some(cells(10, 2)),
        kernel_dir: Some(dir.clone()),
        ..ServerConfig::local(0)
    };
    let server = server::start(config).expect("server starts");
    let client = Client::new(&format!("http://{}", server.addr), None);
    let vm = ok(
        &client,
        "POST",
        "/v1/vms",
        Some(json!({"memory_mib": 64, "kernel": "hello.elf"})),
        201,
    );
    let vm = vm["id"].as_str().expect("id").to_owned();
    let tpl = ok(&client, "POST", &format!("/v1/vms/{vm}/snapshot"), None, 201);
    let tpl = tpl["template_id"].as_str().expect("template").to_owned();
    let clone = clone_ids(&client, &tpl, 1).remove(0);
    let listed = ok(&client, "GET", "/v1/cells", None, 200);
    let held: u64 = listed
        .as_array()
        .expect("cells")
        .iter()
        .map(|c| c["vms"].as_u64().expect("vms"))
        .sum();
    assert_eq!(held, 2, "the booted VM and its clone live in cells: {listed}");
    for _ in 0..2 {
        let answer = ok(
            &client,
            "POST",
            &format!("/v1/vms/{clone}/call"),
            Some(json!({"input": b64.encode(b"world")})),
            200,
        );
        let output = b64.decode(answer["output"].as_str().expect("output")).expect("base64");
        assert_eq!(output, b"hello, world", "{answer}");
        assert_eq!(answer["status"], 0);
        assert!(answer["run_us"].as_f64().is_some_and(|v| v > 0.0), "{answer}");
    }
    // A built-in guest is not an ABI guest: 422 as in process, and the VM stays usable.
    let (_, builtin) = template(&client);
    let other = clone_ids(&client, &builtin, 1).remove(0);
    let code = error_code(
        &client,
        "POST",
        &format!("/v1/vms/{other}/call"),
        Some(json!({"input": b64.encode(b"x")})),
        422,
    );
    assert_eq!(code, "not_abi_guest");
    run_checksum(&client, &other);
    // Bad input is refused before any cell is asked.
    let code = error_code(
        &client,
        "POST",
        &format!("/v1/vms/{clone}/call"),
        Some(json!({"input": "not base64!"})),
        400,
    );
    assert!(!code.is_empty());
    drop(server);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn test_cells_that_held_only_deleted_vms_are_stopped_once_idle() {
    let config = ServerConfig {
        limits: Limits {
            warm_shells: 0,
            ..limits()
        },
        cells: Some(CellsConfig {
            idle_cells: 0,
            idle_after: Duration::from_millis(200),
            ..cells(1, 3)
        }),
        ..ServerConfig::local(0)
    };
    let server = server::start(config).expect("server starts");
    let client = Client::new(&format!("http://{}", server.addr), None);
    let tpl = clones_template(&client);
    let clones = clone_ids(&client, &tpl, 2);
    let listed = ok(&client, "GET", "/v1/cells", None, 200);
    let pids: Vec<u64> = listed
        .as_array()
        .expect("cells")
        .iter()
        .map(|c| c["pid"].as_u64().expect("pid"))
        .collect();
    assert_eq!(pids.len(), 2, "one clone per cell: {listed}");
    // Cells holding VMs are not idle, however long they hold them.
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(
        ok(&client, "GET", "/v1/cells", None, 200).as_array().map(Vec::len),
        Some(2)
    );
    let sum = run_checksum(&client, &clones[0]);
    ok(&client, "DELETE", &format!("/v1/vms/{}", clones[0]), None, 204);
    let cells_now = || {
        ok(&client, "GET", "/v1/cells", None, 200)
            .as_array()
            .map_or(0, Vec::len)
    };
    assert!(eventually(|| cells_now() == 1), "the idle cell is stopped");
    assert!(
        eventually(|| pids.iter().filter(|&&p| process_gone(p)).count() == 1),
        "its process ends"
    );
    ok(&client, "DELETE", &format!("/v1/vms/{}", clones[1]), None, 204);
    assert!(eventually(|| cells_now() == 0), "no cell is kept beyond the pool of 0");
    assert!(
        eventually(|| pids.iter().all(|&p| process_gone(p))),
        "the cells' processes end"
    );
    // New clones start new cells on demand.
    let again = clone_ids(&client, &tpl, 1);
    assert_eq!(run_checksum(&client, &again[0]), sum);
    assert_eq!(cells_now(), 1);
}

#[test]
fn test_template_stats_count_the_in_cell_clones_as_their_per_vm_stats_do() {
    let config = ServerConfig {
        limits: Limits {
            warm_shells: 0,
            ..limits()
        },
        cells: Some(cells(2, 3)),
        ..ServerConfig::local(0)
    };
    let server = server::start(config).expect("server starts");
    let client = Client::new(&format!("http://{}", server.addr), None);
    let (_, tpl) = template(&client);
    let clones = clone_ids(&client, &tpl, 3);
    for clone in &clones {
        run_checksum(&client, clone);
    }
    let write = json!({"command": "write", "start_gpa": 8 << 20, "count": 64, "stride": 4096, "value": 7});
    ok(&client, "POST", &format!("/v1/vms/{}/run", clones[0]), Some(write), 200);
    let stats = ok(&client, "GET", &format!("/v1/templates/{tpl}/stats"), None, 200);
    let per_vm: Vec<Value> = clones
        .iter()
        .map(|c| ok(&client, "GET", &format!("/v1/vms/{c}/stats"), None, 200))
        .collect();
    let sum = |key: &str| -> u64 { per_vm.iter().map(|s| s["bytes"][key].as_u64().expect(key)).sum() };
    assert_eq!(stats["clones"], 3, "{stats}");
    assert_eq!(stats["warm_shells"], 0, "{stats}");
    assert_eq!(stats["full_copy_bytes"], 3 * (64u64 << 20), "{stats}");
    assert_eq!(stats["mapped_bytes"].as_u64(), Some(sum("template_backed")), "{stats}");
    assert_eq!(stats["private_bytes"].as_u64(), Some(sum("private")), "{stats}");
    assert_eq!(stats["zero_bytes"].as_u64(), Some(sum("zero")), "{stats}");
    assert!(
        stats["histogram"]["2"].as_u64().unwrap_or(0) >= 64,
        "the 64 pages one clone wrote over stay mapped by the two others, in their cells: {stats}"
    );
    let copied = stats["copied_pages"].as_array().expect("copied_pages");
    let written: Vec<&Value> = copied
        .iter()
        .filter(|p| (8 << 20..(8 << 20) + 64 * 4096).contains(&p["gpa"].as_u64().unwrap_or(0)))
        .collect();
    assert_eq!(written.len(), 64, "{stats}");
    assert!(
        written
            .iter()
            .all(|p| p["clones_copied"] == 1 && p["clones_mapping"] == 2),
        "{stats}"
    );
}

#[test]
fn test_in_cell_clones_of_a_multi_vcpu_template_run_commands_on_every_vcpu() {
    let config = ServerConfig {
        limits: Limits {
            max_vcpus: 4,
            ..limits()
        },
        cells: Some(cells(2, 2)),
        ..ServerConfig::local(0)
    };
    let server = server::start(config).expect("server starts");
    let client = Client::new(&format!("http://{}", server.addr), None);
    let boot = json!({"memory_mib": 32, "vcpus": 4, "warmup_mib": 0, "kernel": null});
    let vm = ok(&client, "POST", "/v1/vms", Some(boot), 201)["id"]
        .as_str()
        .expect("vm id")
        .to_owned();
    for i in 0..4u64 {
        let write = json!({"command": "write", "vcpu": i, "start_gpa": (16 + i) << 20, "count": 1, "value": 40 + i});
        ok(&client, "POST", &format!("/v1/vms/{vm}/run"), Some(write), 200);
    }
    let tpl = ok(&client, "POST", &format!("/v1/vms/{vm}/snapshot"), None, 201)["template_id"]
        .as_str()
        .expect("template id")
        .to_owned();
    // The booted VM lives in a cell too; only the clones are counted below.
    ok(&client, "DELETE", &format!("/v1/vms/{vm}"), None, 204);
    let clones = clone_ids(&client, &tpl, 2);
    assert_eq!(
        ok(&client, "GET", "/v1/cells", None, 200)
            .as_array()
            .map_or(0, |c| c.iter().map(|c| c["vms"].as_u64().unwrap_or(0)).sum::<u64>()),
        2,
        "the clones live in cells"
    );
    for clone in &clones {
        for i in 0..4u64 {
            let identity = json!({"command": "identity", "vcpu": i});
            let out = ok(&client, "POST", &format!("/v1/vms/{clone}/run"), Some(identity), 200);
            assert_eq!(out["vcpu"], i, "clone {clone} vCPU {i} reads its own index: {out}");
            let sum = json!({"command": "checksum", "vcpu": i, "start_gpa": (16 + i) << 20, "count": 1});
            let out = ok(&client, "POST", &format!("/v1/vms/{clone}/run"), Some(sum), 200);
            assert_eq!(out["result"], 40 + i, "clone {clone} vCPU {i} reads the data");
        }
        let beyond = json!({"command": "exit", "vcpu": 4});
        assert_eq!(
            error_code(&client, "POST", &format!("/v1/vms/{clone}/run"), Some(beyond), 422),
            "vcpu_out_of_range"
        );
        assert_eq!(
            ok(&client, "GET", &format!("/v1/vms/{clone}"), None, 200)["state"],
            "running"
        );
    }
}

/// Guest RAM mappings of booted VMs (`memfd:cowvm-guest-ram`) of exactly `bytes` in process
/// `pid`, from its `/proc/<pid>/maps`.
fn guest_ram_mappings(pid: u64, bytes: u64) -> usize {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("maps");
    maps.lines()
        .filter(|l| l.contains("cowvm-guest-ram"))
        .filter(|l| {
            let range = l.split_whitespace().next().unwrap_or("");
            let (start, end) = range.split_once('-').unwrap_or(("0", "0"));
            let size = u64::from_str_radix(end, 16).unwrap_or(0) - u64::from_str_radix(start, 16).unwrap_or(0);
            size == bytes
        })
        .count()
}

/// The cells that hold VMs, as (pid, vms).
fn cells_holding_vms(client: &Client) -> Vec<(u64, u64)> {
    let listed = ok(client, "GET", "/v1/cells", None, 200);
    listed
        .as_array()
        .expect("cells")
        .iter()
        .map(|c| (c["pid"].as_u64().expect("pid"), c["vms"].as_u64().expect("vms")))
        .filter(|&(_, vms)| vms > 0)
        .collect()
}

/// The same requests on a booted VM, answered by one server: its GET, identity on vCPU 1, the
/// checksum after a write, and its stats.
fn booted_answers(client: &Client, boot: &Value) -> (String, Value, Value, u64, Value) {
    let made = ok(client, "POST", "/v1/vms", Some(boot.clone()), 201);
    let id = made["id"].as_str().expect("id").to_owned();
    let info = ok(client, "GET", &format!("/v1/vms/{id}"), None, 200);
    assert_eq!(info, made, "POST and GET answer the same VM");
    let identity = json!({"command": "identity", "vcpu": 1});
    let who = ok(client, "POST", &format!("/v1/vms/{id}/run"), Some(identity), 200);
    let write =
        json!({"command": "write", "start_gpa": 16 << 20, "count": 32, "stride": 4096, "value": 0x5eed_0001_u64});
    let wrote = ok(client, "POST", &format!("/v1/vms/{id}/run"), Some(write), 200);
    assert_eq!(wrote["status"], 0, "{wrote}");
    let check = json!({"command": "checksum", "start_gpa": 16 << 20, "count": 32, "stride": 4096});
    let sum = ok(client, "POST", &format!("/v1/vms/{id}/run"), Some(check), 200);
    assert_eq!(sum["status"], 0, "{sum}");
    let stats = ok(client, "GET", &format!("/v1/vms/{id}/stats"), None, 200);
    (id, info, who, sum["result"].as_u64().expect("result"), stats)
}

#[test]
fn test_post_vms_with_cells_boots_the_vm_in_a_cell_and_answers_as_in_process() {
    // 72 MiB: a size no other test boots, so that its RAM mapping can be looked for.
    let boot = json!({"memory_mib": 72, "vcpus": 2, "warmup_mib": 8, "kernel": null});
    let bytes = 72 << 20;
    let (_server, client) = start(Some(cells(10, 2)));
    let (id, info, who, sum, stats) = booted_answers(&client, &boot);
    assert_eq!(info["kind"], "vm", "{info}");
    assert_eq!(info["vcpus"], 2, "{info}");
    // The VM is in a cell: the cell maps its RAM, the server's process does not.
    let holding = cells_holding_vms(&client);
    assert_eq!(holding.len(), 1, "one cell holds the booted VM: {holding:?}");
    let (cell_pid, vms) = holding[0];
    assert_eq!(vms, 1);
    assert_eq!(guest_ram_mappings(cell_pid, bytes), 1, "the cell maps the guest's RAM");
    assert_eq!(
        guest_ram_mappings(std::process::id() as u64, bytes),
        0,
        "the server's process maps no guest RAM of the VM"
    );
    assert_eq!(who["vcpu"], 1, "identity on vCPU 1 answers vCPU 1: {who}");
    assert_eq!(stats["id"], id.as_str(), "{stats}");
    assert_eq!(stats["pages"]["total"], bytes / 4096, "{stats}");
    // A booted VM is not a clone, in a cell as in process.
    let code = error_code(&client, "POST", &format!("/v1/vms/{id}/reset"), None, 409);
    assert_eq!(code, "not_a_clone");
    // Its snapshot is a template whose clones see its writes.
    let tpl = ok(&client, "POST", &format!("/v1/vms/{id}/snapshot"), None, 201);
    assert_eq!(tpl["memory_mib"], 72, "{tpl}");
    let tpl = tpl["template_id"].as_str().expect("template").to_owned();
    let clone = clone_ids(&client, &tpl, 1).remove(0);
    let check = json!({"command": "checksum", "start_gpa": 16 << 20, "count": 32, "stride": 4096});
    let cloned = ok(
        &client,
        "POST",
        &format!("/v1/vms/{clone}/run"),
        Some(check.clone()),
        200,
    );
    assert_eq!(cloned["result"].as_u64(), Some(sum), "{cloned}");
    let after = ok(&client, "POST", &format!("/v1/vms/{id}/run"), Some(check), 200);
    assert_eq!(
        after["result"].as_u64(),
        Some(sum),
        "the frozen VM keeps running: {after}"
    );
    // Deleting it destroys it in its cell (booted VMs are not recycled into warm pools).
    ok(&client, "DELETE", &format!("/v1/vms/{id}"), None, 204);
    assert_eq!(
        error_code(&client, "GET", &format!("/v1/vms/{id}"), None, 404),
        "not_found"
    );
    assert!(
        eventually(|| guest_ram_mappings(cell_pid, bytes) == 0 || process_gone(cell_pid)),
        "the cell unmapped the deleted VM's RAM"
    );

    // The same VM in the server's own process answers the same.
    let (_local_server, local) = start(None);
    let (_, local_info, local_who, local_sum, local_stats) = booted_answers(&local, &boot);
    assert_eq!(info, local_info);
    assert_eq!(who["vcpu"], local_who["vcpu"]);
    assert_eq!(sum, local_sum);
    assert_eq!(
        stats["pages"], local_stats["pages"],
        "the same pages, read from the cell's pagemap"
    );
    assert_eq!(keys(&stats), keys(&local_stats));
}

#[test]
fn test_a_user_kernel_boots_in_a_cell_and_bad_requests_fail_as_in_process() {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let dir = std::env::temp_dir().join(format!("cowvm-cells-boot-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("kernel dir");
    std::fs::write(dir.join("hello.elf"), cowvm_guest::HELLO_ELF).expect("hello");
    std::fs::write(dir.join("junk.elf"), b"not an ELF image at all").expect("junk");
    let server_with = |cells: Option<CellsConfig>| {
        let config = ServerConfig {
            limits: limits(),
            cells,
            kernel_dir: Some(dir.clone()),
            ..ServerConfig::local(0)
        };
        let server = server::start(config).expect("server starts");
        let client = Client::new(&format!("http://{}", server.addr), None);
        (server, client)
    };
    let (_celled, client) = server_with(Some(cells(10, 2)));
    let vm = ok(
        &client,
        "POST",
        "/v1/vms",
        Some(json!({"memory_mib": 64, "kernel": "hello.elf"})),
        201,
    );
    assert_eq!(vm["kind"], "vm", "{vm}");
    let id = vm["id"].as_str().expect("id").to_owned();
    let holding = cells_holding_vms(&client);
    assert_eq!(holding.iter().map(|&(_, n)| n).sum::<u64>(), 1, "{holding:?}");
    assert_eq!(guest_ram_mappings(std::process::id() as u64, 64 << 20), 0);
    // It booted to ready() in its cell: a call answers.
    let answer = ok(
        &client,
        "POST",
        &format!("/v1/vms/{id}/call"),
        Some(json!({"input": b64.encode(b"world")})),
        200,
    );
    let output = b64.decode(answer["output"].as_str().expect("output")).expect("base64");
    assert_eq!(output, b"hello, world", "{answer}");

    // Bad requests: the same status, code and message with and without cells.
    let (_local, local) = server_with(None);
    let bad = [
        json!({"memory_mib": 64, "kernel": "junk.elf"}),
        json!({"memory_mib": 64, "kernel": "missing.elf"}),
        json!({"memory_mib": 64, "kernel": "../hello.elf"}),
        json!({"memory_mib": 64, "kernel": "hello.elf", "warmup_mib": 1}),
        json!({"memory_mib": 64, "vcpus": 0}),
        json!({"memory_mib": 100_000}),
        json!({"memory_mib": 64, "warmup_mib": 64}),
    ];
    for body in bad {
        let in_cell = client.request("POST", "/v1/vms", Some(&body)).expect("request");
        let in_process = local.request("POST", "/v1/vms", Some(&body)).expect("request");
        assert_eq!(in_cell.status, 422, "{body}: {}", in_cell.body);
        assert_eq!(
            (in_cell.status, &in_cell.body),
            (in_process.status, &in_process.body),
            "{body}"
        );
    }
    let listed = ok(&client, "GET", "/v1/vms", None, 200);
    assert_eq!(
        listed.as_array().map(Vec::len),
        Some(1),
        "refused boots leave nothing: {listed}"
    );
    drop(_celled);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn test_a_booted_vm_is_lost_with_its_killed_cell_and_boots_go_on() {
    let (_server, client) = start(Some(cells(10, 2)));
    let boot = json!({"memory_mib": 32, "vcpus": 1, "warmup_mib": 0, "kernel": null});
    let vm = ok(&client, "POST", "/v1/vms", Some(boot.clone()), 201);
    let id = vm["id"].as_str().expect("id").to_owned();
    let holding = cells_holding_vms(&client);
    assert_eq!(holding.len(), 1, "{holding:?}");
    let killed = Command::new("kill")
        .args(["-9", &holding[0].0.to_string()])
        .status()
        .expect("run kill");
    assert!(killed.success());
    assert!(
        eventually(|| ok(&client, "GET", &format!("/v1/vms/{id}"), None, 200)["state"] == "lost"),
        "the booted VM is reported lost"
    );
    let info = ok(&client, "GET", &format!("/v1/vms/{id}"), None, 200);
    assert!(info["failure"].as_str().is_some_and(|f| f.contains("killed")), "{info}");
    let code = error_code(&client, "POST", &format!("/v1/vms/{id}/run"), Some(checksum()), 409);
    assert_eq!(code, "vm_lost");
    ok(&client, "DELETE", &format!("/v1/vms/{id}"), None, 204);
    // The next boot gets a cell again.
    let again = ok(&client, "POST", "/v1/vms", Some(boot), 201);
    assert_eq!(again["state"], "running", "{again}");
    assert_eq!(cells_holding_vms(&client).len(), 1);
}

#[test]
fn test_booted_vms_in_cells_count_against_max_vms_and_the_cells_room() {
    // --max-vms 2: the third boot is refused as in process (429), wherever the VMs are.
    let config = ServerConfig {
        limits: Limits { max_vms: 2, ..limits() },
        cells: Some(cells(1, 4)),
        ..ServerConfig::local(0)
    };
    let server = server::start(config).expect("server starts");
    let client = Client::new(&format!("http://{}", server.addr), None);
    let boot = json!({"memory_mib": 16, "vcpus": 1, "warmup_mib": 0, "kernel": null});
    for _ in 0..2 {
        ok(&client, "POST", "/v1/vms", Some(boot.clone()), 201);
    }
    assert_eq!(
        cells_holding_vms(&client).len(),
        2,
        "one VM per cell (--vms-per-cell 1)"
    );
    let code = error_code(&client, "POST", "/v1/vms", Some(boot.clone()), 429);
    assert_eq!(code, "too_many_vms");
    drop(server);
    // Room under --max-vms but none in the cells (one cell of one VM): 503.
    let config = ServerConfig {
        limits: Limits {
            max_vms: 10,
            ..limits()
        },
        cells: Some(cells(1, 1)),
        ..ServerConfig::local(0)
    };
    let server = server::start(config).expect("server starts");
    let client = Client::new(&format!("http://{}", server.addr), None);
    let first = ok(&client, "POST", "/v1/vms", Some(boot.clone()), 201);
    let code = error_code(&client, "POST", "/v1/vms", Some(boot.clone()), 503);
    assert_eq!(code, "resources_exhausted");
    let listed = ok(&client, "GET", "/v1/vms", None, 200);
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    // Deleting the VM makes room again.
    ok(
        &client,
        "DELETE",
        &format!("/v1/vms/{}", first["id"].as_str().expect("id")),
        None,
        204,
    );
    ok(&client, "POST", "/v1/vms", Some(boot), 201);
}
