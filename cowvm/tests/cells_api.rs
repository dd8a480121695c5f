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
    start_config(ServerConfig {
        limits: limits(),
        cells,
        ..ServerConfig::local(0)
    })
}

/// Starts a server with `config` and a client of it.
fn start_config(config: ServerConfig) -> (RunningServer, Client) {
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
    let (_server, client) = start_config(config);
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
    let (_server, client) = start_config(config);
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
    let (server, client) = start_config(config);
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
    let (_server, client) = start_config(config);
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
    let (_server, client) = start_config(config);
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
    let (_server, client) = start_config(config);
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

/// The tests of in-cell snapshots look for the memfds of new template layers in this process
/// (the server runs in it) and in the cells: one at a time.
static LAYERS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The 64 pages the warm-up wrote, written over by the guest with `value`.
fn write_pages(client: &Client, vm: &str, value: u64) {
    let write = json!({"command": "write", "start_gpa": 8 << 20, "count": 64, "stride": 4096, "value": value});
    let out = ok(client, "POST", &format!("/v1/vms/{vm}/run"), Some(write), 200);
    assert_eq!(out["status"], 0, "{out}");
}

/// The first qword of those pages (a checksum of one qword is the qword): tells the values
/// written apart, which the checksum of 64 equal qwords does not.
fn first_page(client: &Client, vm: &str) -> u64 {
    let read = json!({"command": "checksum", "start_gpa": 8 << 20, "count": 1});
    let out = ok(client, "POST", &format!("/v1/vms/{vm}/run"), Some(read), 200);
    assert_eq!(out["status"], 0, "{out}");
    out["result"].as_u64().expect("result")
}

/// Inodes of the new-layer memfds (`cowvm-template-overlay`) process `pid` holds open.
fn layer_memfds(pid: u32) -> std::collections::BTreeSet<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| {
            dir.filter_map(|e| {
                let path = e.ok()?.path();
                let target = std::fs::read_link(&path).ok()?;
                target
                    .to_string_lossy()
                    .contains("memfd:cowvm-template-overlay")
                    .then(|| std::fs::metadata(&path).ok().map(|m| m.ino()))
                    .flatten()
            })
            .collect()
        })
        .unwrap_or_default()
}

/// Host addresses where process `pid` maps byte `offset` of the memfd with inode `inode`
/// (from `/proc/<pid>/maps`: start-end perms offset dev inode path).
fn mapped_at(pid: u32, inode: u64, offset: u64) -> Vec<u64> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    maps.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (range, file_offset, ino) = (fields.first()?, fields.get(2)?, fields.get(4)?);
            if ino.parse::<u64>().ok()? != inode {
                return None;
            }
            let (start, end) = range.split_once('-')?;
            let start = u64::from_str_radix(start, 16).ok()?;
            let end = u64::from_str_radix(end, 16).ok()?;
            let file_offset = u64::from_str_radix(file_offset, 16).ok()?;
            let at = start + offset.checked_sub(file_offset)?;
            (at < end).then_some(at)
        })
        .collect()
}

/// Whether process `pid` holds the memfd with inode `inode` open or mapped.
fn holds(pid: u32, inode: u64) -> bool {
    layer_memfds(pid).contains(&inode) || !mapped_at(pid, inode, 0).is_empty() || {
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
        maps.lines()
            .any(|l| l.split_whitespace().nth(4).and_then(|i| i.parse::<u64>().ok()) == Some(inode))
    }
}

/// The frame behind host address `at` in process `pid` (`/proc/<pid>/pagemap`), if present.
fn frame(pid: u32, at: u64) -> Option<u64> {
    use std::os::unix::fs::FileExt;
    let pagemap = std::fs::File::open(format!("/proc/{pid}/pagemap")).expect("the cell's pagemap");
    let mut entry = [0u8; 8];
    pagemap.read_exact_at(&mut entry, at / 4096 * 8).expect("read pagemap");
    let entry = u64::from_le_bytes(entry);
    let pfn = entry & ((1 << 55) - 1);
    (entry & (1 << 63) != 0 && pfn != 0).then_some(pfn)
}

/// `/proc/kpagecount` of frame `pfn`: how many mappings it has, over all processes.
fn kpagecount(pfn: u64) -> u64 {
    use std::os::unix::fs::FileExt;
    let counts = std::fs::File::open("/proc/kpagecount").expect("/proc/kpagecount");
    let mut count = [0u8; 8];
    counts.read_exact_at(&mut count, pfn * 8).expect("read kpagecount");
    u64::from_le_bytes(count)
}

fn cell_pids(client: &Client) -> Vec<u32> {
    ok(client, "GET", "/v1/cells", None, 200)
        .as_array()
        .expect("cells")
        .iter()
        .map(|c| c["pid"].as_u64().expect("pid") as u32)
        .collect()
}

/// Waits until no process of `pids` holds the memfd with inode `inode`.
fn released(pids: &[u32], inode: u64) -> bool {
    eventually(|| pids.iter().all(|&pid| !holds(pid, inode)))
}

#[test]
fn test_a_snapshot_of_an_in_cell_clone_keeps_its_writes_is_saved_and_its_clones_share_frames_across_cells() {
    let _layers = LAYERS.lock().unwrap_or_else(|e| e.into_inner());
    let dir = std::env::temp_dir().join(format!("cowvm-cells-snapshot-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("state dir");
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700)).expect("chmod");
    let config = || ServerConfig {
        limits: Limits {
            warm_shells: 0,
            ..limits()
        },
        cells: Some(cells(2, 4)),
        state_dir: Some(dir.clone()),
        ..ServerConfig::local(0)
    };
    let server = server::start(config()).expect("server starts");
    let client = Client::new(&format!("http://{}", server.addr), None);
    let (_, tpl) = template(&client);
    let source = clone_ids(&client, &tpl, 1).remove(0);
    let reference = run_checksum(&client, &source);
    write_pages(&client, &source, 0x77);
    let written = run_checksum(&client, &source);
    assert_ne!(written, reference);

    let ours = std::process::id();
    let before = layer_memfds(ours);
    let snap = ok(&client, "POST", &format!("/v1/vms/{source}/snapshot"), None, 201);
    assert_eq!(
        keys(&snap),
        ["layers", "memory_mib", "pause_us", "persisted", "template_id"],
        "{snap}"
    );
    assert_eq!(snap["layers"], 2, "the template's base plus the clone's pages: {snap}");
    assert_eq!(snap["memory_mib"], 64);
    assert_eq!(snap["persisted"], true);
    assert!(snap["pause_us"].as_f64().is_some_and(|us| us > 0.0), "{snap}");
    let snapped = snap["template_id"].as_str().expect("template id").to_owned();
    let new: Vec<u64> = layer_memfds(ours).difference(&before).copied().collect();
    assert_eq!(new.len(), 1, "the supervisor got the new layer's memfd: {new:?}");
    let layer = new[0];
    let info = ok(&client, "GET", &format!("/v1/templates/{snapped}"), None, 200);
    assert_eq!(
        (info["layers"].as_u64(), info["source_vm"].as_str()),
        (Some(2), Some(source.as_str()))
    );

    // The VM keeps running on its own pages; the template keeps what it had when frozen.
    assert_eq!(run_checksum(&client, &source), written);
    assert_eq!(first_page(&client, &source), 0x77);
    write_pages(&client, &source, 0x99);
    assert_eq!(first_page(&client, &source), 0x99);

    let clones = clone_ids(&client, &snapped, 3);
    for clone in &clones {
        assert_eq!(
            run_checksum(&client, clone),
            written,
            "{clone} sees the snapshot's data"
        );
        assert_eq!(
            first_page(&client, clone),
            0x77,
            "{clone}: not the source's later writes"
        );
    }
    if running_as_root() {
        // Each clone maps the written page from the new layer's memfd, in its cell: one frame.
        let mut mappings = Vec::new();
        for pid in cell_pids(&client) {
            for at in mapped_at(pid, layer, 8 << 20) {
                mappings.push((pid, frame(pid, at).expect("the page the checksum read is present")));
            }
        }
        assert_eq!(mappings.len(), 3, "one mapping per clone: {mappings:?}");
        let pids: std::collections::BTreeSet<u32> = mappings.iter().map(|m| m.0).collect();
        assert!(pids.len() >= 2, "2 VMs per cell: the clones span cells {mappings:?}");
        let frames: std::collections::BTreeSet<u64> = mappings.iter().map(|m| m.1).collect();
        assert_eq!(frames.len(), 1, "every cell maps the same frame: {mappings:?}");
        let pfn = frames.into_iter().next().expect("frame");
        assert!(kpagecount(pfn) >= 3, "kpagecount {} of {pfn:#x}", kpagecount(pfn));
    } else {
        eprintln!("skipped the frame check: PFNs in another process's pagemap need root");
    }

    // Saved under --state-dir: a new server loads it, and its clones see the data.
    server.stop().expect("stop");
    let server = server::start(config()).expect("server starts again");
    let client = Client::new(&format!("http://{}", server.addr), None);
    let info = ok(&client, "GET", &format!("/v1/templates/{snapped}"), None, 200);
    assert_eq!(
        (info["layers"].as_u64(), info["persisted"].as_bool()),
        (Some(2), Some(true)),
        "{info}"
    );
    let again = clone_ids(&client, &snapped, 1).remove(0);
    assert_eq!(run_checksum(&client, &again), written);
    assert_eq!(first_page(&client, &again), 0x77);
    drop(server);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn test_a_live_fork_of_an_in_cell_clone_makes_clones_of_its_data_while_it_keeps_running() {
    let _layers = LAYERS.lock().unwrap_or_else(|e| e.into_inner());
    let config = ServerConfig {
        limits: Limits {
            warm_shells: 0,
            max_vms: 6,
            ..limits()
        },
        cells: Some(cells(2, 4)),
        ..ServerConfig::local(0)
    };
    let (_server, client) = start_config(config);
    let (_, tpl) = template(&client);
    let source = clone_ids(&client, &tpl, 1).remove(0);
    write_pages(&client, &source, 0x55);
    let written = run_checksum(&client, &source);

    let path = format!("/v1/vms/{source}/clones");
    let fork = ok(&client, "POST", &path, Some(json!({"count": 3})), 201);
    assert_eq!(fork["failed"], json!([]), "{fork}");
    assert!(fork["pause_us"].as_f64().is_some_and(|us| us > 0.0), "{fork}");
    assert!(fork["total_us"].as_f64().is_some_and(|us| us > 0.0), "{fork}");
    let forked = fork["template_id"].as_str().expect("template id").to_owned();
    assert_ne!(forked, tpl);
    let clones: Vec<String> = fork["clones"]
        .as_array()
        .expect("clones")
        .iter()
        .map(|c| c["id"].as_str().expect("id").to_owned())
        .collect();
    assert_eq!(clones.len(), 3, "{fork}");
    for clone in &clones {
        let info = ok(&client, "GET", &format!("/v1/vms/{clone}"), None, 200);
        assert_eq!(info["template_id"], forked.as_str(), "{info}");
        assert_eq!(run_checksum(&client, clone), written, "{clone} sees the source's data");
        assert_eq!(first_page(&client, clone), 0x55);
    }
    let info = ok(&client, "GET", &format!("/v1/templates/{forked}"), None, 200);
    assert_eq!(
        (
            info["clones"].as_u64(),
            info["layers"].as_u64(),
            info["source_vm"].as_str()
        ),
        (Some(3), Some(2), Some(source.as_str())),
        "{info}"
    );

    // The source goes on and answers; its later writes stay its own.
    assert_eq!(
        ok(&client, "GET", &format!("/v1/vms/{source}"), None, 200)["state"],
        "running"
    );
    assert_eq!(run_checksum(&client, &source), written);
    write_pages(&client, &source, 0x66);
    assert_eq!(first_page(&client, &source), 0x66);
    assert_eq!(first_page(&client, &clones[0]), 0x55);

    // Bad counts and a full server are refused as in process, and freeze nothing.
    let templates = || {
        ok(&client, "GET", "/v1/templates", None, 200)
            .as_array()
            .map_or(0, Vec::len)
    };
    let before = templates();
    assert_eq!(
        error_code(&client, "POST", &path, Some(json!({"count": 0})), 422),
        "count_out_of_range"
    );
    // 5 of 6 VMs are held (the booted VM, the source and its 3 clones): 2 more do not fit.
    assert_eq!(
        error_code(&client, "POST", &path, Some(json!({"count": 2})), 429),
        "too_many_vms"
    );
    assert_eq!(templates(), before, "a refused fork leaves no template");
    let one = ok(&client, "POST", &path, Some(json!({"count": 1})), 201);
    assert_eq!(one["clones"].as_array().map(Vec::len), Some(1), "{one}");
}

#[test]
fn test_snapshots_and_live_forks_of_in_cell_vms_leave_no_memfd_behind_once_deleted() {
    let _layers = LAYERS.lock().unwrap_or_else(|e| e.into_inner());
    let config = ServerConfig {
        limits: Limits {
            warm_shells: 0,
            ..limits()
        },
        cells: Some(cells(2, 4)),
        ..ServerConfig::local(0)
    };
    let (_server, client) = start_config(config);
    let (_, tpl) = template(&client);
    let source = clone_ids(&client, &tpl, 1).remove(0);
    write_pages(&client, &source, 0x11);
    let ours = std::process::id();
    for fork in [false, true] {
        let before = layer_memfds(ours);
        let (made, clones) = if fork {
            let made = ok(
                &client,
                "POST",
                &format!("/v1/vms/{source}/clones"),
                Some(json!({"count": 3})),
                201,
            );
            let ids = made["clones"]
                .as_array()
                .expect("clones")
                .iter()
                .map(|c| c["id"].as_str().expect("id").to_owned())
                .collect();
            (made["template_id"].as_str().expect("template").to_owned(), ids)
        } else {
            let snap = ok(&client, "POST", &format!("/v1/vms/{source}/snapshot"), None, 201);
            let made = snap["template_id"].as_str().expect("template").to_owned();
            let ids = clone_ids(&client, &made, 3);
            (made, ids)
        };
        let new: Vec<u64> = layer_memfds(ours).difference(&before).copied().collect();
        assert_eq!(new.len(), 1, "one new layer: {new:?}");
        let layer = new[0];
        let mut pids = cell_pids(&client);
        assert!(
            pids.iter().any(|&pid| holds(pid, layer)),
            "the cells hold the new layer"
        );
        pids.push(ours);
        for clone in &clones {
            ok(&client, "DELETE", &format!("/v1/vms/{clone}"), None, 204);
        }
        ok(&client, "DELETE", &format!("/v1/templates/{made}"), None, 204);
        assert!(
            released(&pids, layer),
            "the new layer's memfd is closed and unmapped in the server and every cell (fork: {fork})"
        );
        write_pages(&client, &source, 0x12);
    }
}

#[test]
fn test_snapshot_and_live_fork_of_a_lost_or_failed_in_cell_vm_answer_409_as_other_operations_do() {
    let config = ServerConfig {
        limits: Limits {
            warm_shells: 0,
            ..limits()
        },
        cells: Some(cells(1, 3)),
        ..ServerConfig::local(0)
    };
    let (_server, client) = start_config(config);
    let tpl = clones_template(&client);
    let lost = clone_ids(&client, &tpl, 1).remove(0);
    let pids = cell_pids(&client);
    assert_eq!(pids.len(), 1, "one cell holds the clone");
    let killed = Command::new("kill")
        .args(["-9", &pids[0].to_string()])
        .status()
        .expect("run kill");
    assert!(killed.success());
    assert!(eventually(|| ok(&client, "GET", &format!("/v1/vms/{lost}"), None, 200)
        ["state"]
        == "lost"));
    let templates = || {
        ok(&client, "GET", "/v1/templates", None, 200)
            .as_array()
            .map_or(0, Vec::len)
    };
    let before = templates();
    assert_eq!(
        error_code(&client, "POST", &format!("/v1/vms/{lost}/snapshot"), None, 409),
        "vm_lost"
    );
    let fork = Some(json!({"count": 1}));
    assert_eq!(
        error_code(&client, "POST", &format!("/v1/vms/{lost}/clones"), fork.clone(), 409),
        "vm_lost"
    );

    let failed = clone_ids(&client, &tpl, 1).remove(0);
    let spin = json!({"command": "spin"});
    assert_eq!(
        error_code(&client, "POST", &format!("/v1/vms/{failed}/run"), Some(spin), 409),
        "vm_failed"
    );
    assert_eq!(
        error_code(&client, "POST", &format!("/v1/vms/{failed}/snapshot"), None, 409),
        "vm_failed"
    );
    assert_eq!(
        error_code(&client, "POST", &format!("/v1/vms/{failed}/clones"), fork, 409),
        "vm_failed"
    );
    assert_eq!(templates(), before, "nothing was frozen");
}

#[test]
fn test_snapshots_of_in_cell_clones_stack_layers_up_to_the_limit_then_answer_409_as_in_process() {
    let config = ServerConfig {
        limits: Limits {
            warm_shells: 0,
            ..limits()
        },
        cells: Some(cells(10, 3)),
        ..ServerConfig::local(0)
    };
    let (_server, client) = start_config(config);
    let (_, mut tpl) = template(&client);
    for layers in 2..=cowvm_vmm::memory::MAX_TEMPLATE_LAYERS {
        let clone = clone_ids(&client, &tpl, 1).remove(0);
        write_pages(&client, &clone, layers as u64);
        let snap = ok(&client, "POST", &format!("/v1/vms/{clone}/snapshot"), None, 201);
        assert_eq!(snap["layers"], layers, "{snap}");
        tpl = snap["template_id"].as_str().expect("template").to_owned();
    }
    let clone = clone_ids(&client, &tpl, 1).remove(0);
    write_pages(&client, &clone, 1);
    assert_eq!(
        error_code(&client, "POST", &format!("/v1/vms/{clone}/snapshot"), None, 409),
        "template_too_fragmented"
    );
    // The VM stays usable.
    run_checksum(&client, &clone);
}

/// The probe the in-cell probe tests make: 8 pages of the template's data, one per page.
fn eight_pages() -> Value {
    json!({"start_gpa": 8 << 20, "pages": 8, "stride": 4096})
}

/// One 64-bit entry of `/proc/<pid>/<file>` (pagemap, kpagecount, kpageflags) at `index`.
fn proc_u64(pid: Option<u64>, file: &str, index: u64) -> u64 {
    use std::os::unix::fs::FileExt;
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/{file}"),
        None => format!("/proc/{file}"),
    };
    let mut word = [0u8; 8];
    std::fs::File::open(&path)
        .and_then(|f| f.read_exact_at(&mut word, index * 8))
        .unwrap_or_else(|e| panic!("reading {path}: {e}"));
    u64::from_le_bytes(word)
}

/// The one cell that holds VMs, and its pid.
fn only_cell_with_vms(client: &Client) -> u64 {
    let listed = ok(client, "GET", "/v1/cells", None, 200);
    let holding: Vec<&Value> = listed
        .as_array()
        .expect("cells")
        .iter()
        .filter(|c| c["vms"].as_u64().unwrap_or(0) > 0)
        .collect();
    assert_eq!(holding.len(), 1, "{listed}");
    holding[0]["pid"].as_u64().expect("pid")
}

#[test]
fn test_a_write_probe_of_an_in_cell_clone_reports_what_an_independent_pagemap_reader_sees() {
    // The answer of an in-process probe of a clone, for its keys.
    let in_process = {
        let (_server, client) = start(None);
        let tpl = clones_template(&client);
        let clone = clone_ids(&client, &tpl, 1).remove(0);
        run_checksum(&client, &clone);
        ok(
            &client,
            "POST",
            &format!("/v1/vms/{clone}/probes/write"),
            Some(eight_pages()),
            200,
        )
    };
    let (_server, client) = start(Some(cells(10, 2)));
    let tpl = clones_template(&client);
    let clone = clone_ids(&client, &tpl, 1).remove(0);
    // The checksum reads the 8 pages: they map the template's frames.
    let reference = run_checksum(&client, &clone);
    let pid = only_cell_with_vms(&client);
    let probe = ok(
        &client,
        "POST",
        &format!("/v1/vms/{clone}/probes/write"),
        Some(eight_pages()),
        200,
    );

    assert_eq!(keys(&probe), keys(&in_process), "{probe}");
    assert_eq!(keys(&probe["pages"][0]), keys(&in_process["pages"][0]));
    assert_eq!(keys(&probe["kvm"]), keys(&in_process["kvm"]));
    assert_eq!(
        (probe["written"].as_u64(), probe["became_private"].as_u64()),
        (Some(8), Some(8)),
        "{probe}"
    );
    // KVM's counters come from the cell: two guest writes per page, each a KVM_RUN with exits.
    assert!(probe["kvm"]["exits"].as_i64().is_some_and(|e| e >= 16), "{probe}");
    assert!(probe["kvm"]["pf_taken"].is_i64(), "{probe}");
    assert!(probe["host_cow_us"]["p50"].as_f64().is_some_and(|v| v > 0.0), "{probe}");
    assert!(probe["guest_cow_us"]["p50"].is_f64(), "{probe}");
    let pages = probe["pages"].as_array().expect("pages");
    assert_eq!(pages.len(), 8);
    for (i, page) in pages.iter().enumerate() {
        let gpa = (8u64 << 20) + i as u64 * 4096;
        assert_eq!(
            (page["gva"].as_u64(), page["gpa"].as_u64()),
            (Some(gpa), Some(gpa)),
            "{page}"
        );
        assert_eq!(page["before_kind"], "template", "{page}");
        assert_eq!(page["shared_before"], true, "{page}");
        assert_eq!(page["private_after"], true, "{page}");
        let (before, after) = (&page["before"], &page["after"]);
        assert_eq!(
            (before["present"].as_bool(), before["file_or_shmem"].as_bool()),
            (Some(true), Some(true))
        );
        assert_eq!(
            (after["anon"].as_bool(), after["exclusive"].as_bool()),
            (Some(true), Some(true))
        );
        assert_ne!(before["pfn"], after["pfn"], "the write copied the page: {page}");

        // Read independently: the cell's pagemap at the page's host address, then the frame.
        let hva = page["hva"].as_u64().expect("hva");
        let entry = proc_u64(Some(pid), "pagemap", hva / 4096);
        let pfn = entry & ((1 << 55) - 1);
        assert!(entry & (1 << 63) != 0, "page {i} present in the cell: {entry:#x}");
        assert!(
            entry & (1 << 56) != 0,
            "page {i} mapped exclusively by the cell: {entry:#x}"
        );
        assert!(
            entry & (1 << 61) == 0,
            "page {i} is no longer the template's file page: {entry:#x}"
        );
        assert_eq!(after["pfn"].as_u64(), Some(pfn), "page {i}: {page}");
        assert_eq!(
            proc_u64(None, "kpagecount", pfn),
            1,
            "page {i}: one mapping of the copy"
        );
        assert_eq!(after["kpagecount"], 1, "{page}");
        assert!(proc_u64(None, "kpageflags", pfn) & (1 << 12) != 0, "page {i}: KPF_ANON");
        assert!(
            before["kpagecount"].as_u64().is_some_and(|c| c >= 1),
            "the clone mapped the template frame: {page}"
        );
    }

    // The supervisor's stats agree, the scratch clone is gone, and the VM keeps answering.
    let stats = ok(&client, "GET", &format!("/v1/vms/{clone}/stats"), None, 200);
    assert_eq!(stats["pages"]["private"], 8, "{stats}");
    let listed = ok(&client, "GET", "/v1/cells", None, 200);
    let vms: u64 = listed
        .as_array()
        .expect("cells")
        .iter()
        .map(|c| c["vms"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(vms, 1, "{listed}");
    assert_ne!(run_checksum(&client, &clone), reference, "the probe wrote the pages");
    let info = ok(&client, "GET", &format!("/v1/vms/{clone}"), None, 200);
    assert_eq!(info["state"], "running", "{info}");
}

#[test]
fn test_a_write_probe_of_an_in_cell_clone_refuses_bad_targets_as_in_process_and_failed_or_lost_vms_with_409() {
    let bad: [(Value, u16); 4] = [
        (json!({"gpas": [64u64 << 20]}), 422),
        (json!({"gpas": [0x9000]}), 422),
        (json!({"gpas": [8 << 20, (8 << 20) + 8]}), 422),
        (json!({"start_gpa": 8 << 20, "pages": 0}), 422),
    ];
    let in_process: Vec<String> = {
        let (_server, client) = start(None);
        let (_, tpl) = template(&client);
        let clone = clone_ids(&client, &tpl, 1).remove(0);
        let path = format!("/v1/vms/{clone}/probes/write");
        bad.iter()
            .map(|(body, status)| error_code(&client, "POST", &path, Some(body.clone()), *status))
            .collect()
    };
    assert_eq!(in_process[0], "address_out_of_range");
    let (_server, client) = start(Some(cells(10, 2)));
    let (_, tpl) = template(&client);
    let clones = clone_ids(&client, &tpl, 3);
    let first = &clones[0];
    let reference = run_checksum(&client, first);
    let path = format!("/v1/vms/{first}/probes/write");
    for ((body, status), expected) in bad.iter().zip(&in_process) {
        let code = error_code(&client, "POST", &path, Some(body.clone()), *status);
        assert_eq!(&code, expected, "{body}");
        // Nothing was written and the VM keeps answering.
        let info = ok(&client, "GET", &format!("/v1/vms/{first}"), None, 200);
        assert_eq!(info["state"], "running", "{info}");
        assert_eq!(run_checksum(&client, first), reference);
    }
    let stats = ok(&client, "GET", &format!("/v1/vms/{first}/stats"), None, 200);
    assert_eq!(stats["pages"]["private"], 0, "a refused probe writes nothing: {stats}");
    ok(&client, "POST", &path, Some(eight_pages()), 200);
    // The largest probe crosses the cell boundary in one message each way.
    let most = json!({"start_gpa": 8 << 20, "pages": 4096, "stride": 4096});
    let probe = ok(&client, "POST", &path, Some(most), 200);
    assert_eq!(probe["written"], 4096);
    assert_eq!(probe["pages"][4095]["gpa"], (8 << 20) + 4095 * 4096);

    // A failed VM: 409 vm_failed, as in process.
    let failed = &clones[1];
    let spin = json!({"command": "spin"});
    assert_eq!(
        error_code(&client, "POST", &format!("/v1/vms/{failed}/run"), Some(spin), 409),
        "vm_failed"
    );
    let failed_probe = format!("/v1/vms/{failed}/probes/write");
    assert_eq!(
        error_code(&client, "POST", &failed_probe, Some(eight_pages()), 409),
        "vm_failed"
    );

    // A VM lost with its cell: 409 vm_lost.
    let lost = &clones[2];
    let pid = only_cell_with_vms(&client);
    let killed = Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(killed.success());
    assert!(eventually(|| ok(&client, "GET", &format!("/v1/vms/{lost}"), None, 200)
        ["state"]
        == "lost"));
    let lost_probe = format!("/v1/vms/{lost}/probes/write");
    assert_eq!(
        error_code(&client, "POST", &lost_probe, Some(eight_pages()), 409),
        "vm_lost"
    );
}

#[test]
fn test_a_write_probe_whose_scratch_clone_finds_no_room_is_refused_clearly_and_writes_nothing() {
    let refused = |client: &Client, clone: &str| {
        let reference = run_checksum(client, clone);
        let path = format!("/v1/vms/{clone}/probes/write");
        let body = ok(client, "POST", &path, Some(eight_pages()), 429);
        assert_eq!(body["error"]["code"], "too_many_vms", "{body}");
        let message = body["error"]["message"].as_str().unwrap_or("");
        assert!(message.contains("scratch clone"), "{body}");
        let stats = ok(client, "GET", &format!("/v1/vms/{clone}/stats"), None, 200);
        assert_eq!(stats["pages"]["private"], 0, "nothing was written: {stats}");
        assert_eq!(run_checksum(client, clone), reference);
        message.to_owned()
    };
    // One VM per cell: the clone fills its cell, which has no room for the scratch clone.
    {
        let (_server, client) = start(Some(cells(1, 4)));
        let (_, tpl) = template(&client);
        let clone = clone_ids(&client, &tpl, 1).remove(0);
        let message = refused(&client, &clone);
        assert!(message.contains("no room in the cell"), "{message}");
    }
    // --max-vms 2: the booted VM and the clone hold it all.
    let config = ServerConfig {
        limits: Limits { max_vms: 2, ..limits() },
        cells: Some(cells(10, 2)),
        ..ServerConfig::local(0)
    };
    let (_server, client) = start_config(config);
    let (_, tpl) = template(&client);
    let clone = clone_ids(&client, &tpl, 1).remove(0);
    let message = refused(&client, &clone);
    assert!(message.contains("room for one more VM"), "{message}");
}

/// `cowvm serve --listen 127.0.0.1:0 --cells <args>` and a client for it.
fn serve_cells(args: &[&str]) -> (Served, Client) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_cowvm"))
        .args(["serve", "--listen", "127.0.0.1:0", "--cells"])
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .expect("start cowvm serve --cells");
    let stdout = child.stdout.take().expect("stdout");
    let served = Served::new(child);
    let first = BufReader::new(stdout).lines().next().expect("a line").expect("read");
    let url = first.rsplit(' ').next().expect("url").to_owned();
    (served, Client::new(&url, None))
}

/// A server process that is killed if the test ends (or panics) before [`stop_server`].
type Served = cowvm_tests::ChildGuard;

/// Stops a server started by [`serve_cells`] with SIGTERM; whether it exited cleanly.
fn stop_server(mut served: Served) -> bool {
    let mut child = served.take().expect("a running server");
    // SAFETY: sending SIGTERM to our own child process.
    assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) }, 0);
    child.wait().expect("wait").success()
}

/// The cells `GET /v1/cells` lists, as (id, pid).
fn cell_ids(client: &Client) -> Vec<(u64, u64)> {
    ok(client, "GET", "/v1/cells", None, 200)
        .as_array()
        .expect("cells")
        .iter()
        .map(|c| (c["id"].as_u64().expect("id"), c["pid"].as_u64().expect("pid")))
        .collect()
}

#[test]
fn test_serve_idle_cells_flags_stop_a_cell_whose_last_vm_is_deleted_and_start_a_new_one_on_demand() {
    let (child, client) = serve_cells(&["--warm-shells", "0", "--idle-cells", "0", "--cell-idle-ms", "200"]);
    let tpl = clones_template(&client);
    let clone = clone_ids(&client, &tpl, 1).remove(0);
    let sum = run_checksum(&client, &clone);
    let cells = cell_ids(&client);
    assert_eq!(cells.len(), 1, "one clone, one cell: {cells:?}");
    let (cell, pid) = cells[0];
    ok(&client, "DELETE", &format!("/v1/vms/{clone}"), None, 204);
    // No verdict on timing: the cell only has to go within a generous bound.
    let started = Instant::now();
    while cell_ids(&client).iter().any(|&(id, _)| id == cell) {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "with --idle-cells 0 --cell-idle-ms 200 the idle cell {cell} is never stopped"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        eventually(|| process_gone(pid)),
        "the stopped cell's process (pid {pid}) ends"
    );
    // The next clone call starts a new cell, and its clone works.
    let again = clone_ids(&client, &tpl, 1).remove(0);
    assert_eq!(run_checksum(&client, &again), sum);
    let now = cell_ids(&client);
    assert_eq!(now.len(), 1, "{now:?}");
    assert_ne!(now[0].0, cell, "a new cell, not the stopped one");
    assert!(stop_server(child), "the server stops cleanly");
}

#[test]
fn test_serve_refuses_idle_cells_beyond_max_cells_and_too_long_an_idle_time_with_a_clear_error() {
    for (args, says) in [
        (
            &["--max-cells", "2", "--idle-cells", "3"][..],
            "--idle-cells must be 0..=2",
        ),
        (&["--cell-idle-ms", "86400001"][..], "--cell-idle-ms"),
        (&["--idle-cells=-1"][..], "--idle-cells"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_cowvm"))
            .args(["serve", "--listen", "127.0.0.1:0", "--cells"])
            .args(args)
            .stdout(Stdio::null())
            .output()
            .expect("run cowvm serve");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} is refused");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
}

/// Boots a 4-vCPU VM (32 MiB) and snapshots it; the template id.
fn four_vcpu_template(client: &Client) -> String {
    let boot = json!({"memory_mib": 32, "vcpus": 4, "warmup_mib": 0, "kernel": null});
    let vm = ok(client, "POST", "/v1/vms", Some(boot), 201)["id"]
        .as_str()
        .expect("vm id")
        .to_owned();
    ok(client, "POST", &format!("/v1/vms/{vm}/snapshot"), None, 201)["template_id"]
        .as_str()
        .expect("template id")
        .to_owned()
}

/// The KVM statistics of a VM's `GET /v1/vms/{id}/stats`, one key list per vCPU.
fn vcpu_stat_keys(stats: &Value) -> Vec<Vec<String>> {
    stats["kvm"]["vcpus"]
        .as_array()
        .expect("kvm.vcpus")
        .iter()
        .map(keys)
        .collect()
}

#[test]
fn test_stats_of_an_in_cell_multi_vcpu_clone_show_every_vcpu_as_in_process() {
    let server_limits = Limits {
        max_vcpus: 4,
        ..limits()
    };
    let in_process = {
        let config = ServerConfig {
            limits: server_limits.clone(),
            ..ServerConfig::local(0)
        };
        let (_server, client) = start_config(config);
        let tpl = four_vcpu_template(&client);
        let clone = clone_ids(&client, &tpl, 1).remove(0);
        ok(&client, "GET", &format!("/v1/vms/{clone}/stats"), None, 200)
    };
    let config = ServerConfig {
        limits: server_limits,
        cells: Some(cells(2, 2)),
        ..ServerConfig::local(0)
    };
    let (_server, client) = start_config(config);
    let tpl = four_vcpu_template(&client);
    let clone = clone_ids(&client, &tpl, 1).remove(0);
    let stats = || ok(&client, "GET", &format!("/v1/vms/{clone}/stats"), None, 200);
    let before = stats();
    let shape = vcpu_stat_keys(&before);
    assert_eq!(shape.len(), 4, "one entry per vCPU: {before}");
    assert!(shape.iter().all(|k| k.contains(&"exits".to_owned())), "{before}");
    assert_eq!(shape, vcpu_stat_keys(&in_process), "the same shape as in process");
    let exits = |s: &Value, vcpu: usize| s["kvm"]["vcpus"][vcpu]["exits"]["value"].as_u64().expect("exits");
    let identity = json!({"command": "identity", "vcpu": 1});
    let out = ok(&client, "POST", &format!("/v1/vms/{clone}/run"), Some(identity), 200);
    assert_eq!(out["vcpu"], 1, "{out}");
    let after = stats();
    assert!(
        exits(&after, 1) > exits(&before, 1),
        "vCPU 1 ran: before {before}\nafter {after}"
    );
    assert_eq!(exits(&after, 2), exits(&before, 2), "vCPU 2 did not run: {after}");
}

/// A clone's answers to a clone call, `identity`, a write and a reset, on `client`'s server.
fn clone_answers(client: &Client) -> [Value; 4] {
    let (_, tpl) = template(client);
    let made = ok(
        client,
        "POST",
        &format!("/v1/templates/{tpl}/clones"),
        Some(json!({"count": 1})),
        201,
    );
    let clone = made["clones"][0]["id"].as_str().expect("clone id").to_owned();
    let run = |body: Value| ok(client, "POST", &format!("/v1/vms/{clone}/run"), Some(body), 200);
    let identity = run(json!({"command": "identity"}));
    let write = run(json!({"command": "write", "start_gpa": 8 << 20, "count": 3, "stride": 4096, "value": 5}));
    let reset = ok(client, "POST", &format!("/v1/vms/{clone}/reset"), None, 200);
    [made, identity, write, reset]
}

#[test]
fn test_in_cell_clone_run_and_reset_answers_have_the_keys_of_in_process_ones() {
    let in_process = {
        let (_server, client) = start(None);
        clone_answers(&client)
    };
    let (_server, client) = start(Some(cells(4, 2)));
    let [made, identity, write, reset] = clone_answers(&client);
    let [made_p, identity_p, write_p, reset_p] = &in_process;
    assert_eq!(keys(&made), keys(made_p), "{made}");
    assert_eq!(keys(&made["clones"][0]), keys(&made_p["clones"][0]), "{made}");
    assert_eq!(keys(&identity), keys(identity_p), "{identity}");
    assert_eq!(keys(&write), keys(write_p), "{write}");
    assert!(write.get("vcpu").is_none(), "no vcpu key but for identity: {write}");
    assert_eq!(identity["vcpu"], 0, "{identity}");
    assert_eq!(identity["result"], made["clones"][0]["generation"], "{identity}");
    assert_eq!(identity["extra"], made["clones"][0]["seed"], "{identity}");
    assert!(identity["run_us"].as_f64().is_some_and(|us| us > 0.0), "{identity}");
    assert_eq!(keys(&reset), keys(reset_p), "{reset}");
    // A cell resets by swap when it has a warm shell of the template (nothing to drop), else in
    // place (the 3 pages written are dropped); its steps are its time.
    let dropped = if reset["swapped"] == true { 0 } else { 3 };
    assert_eq!(reset["pages_dropped"], dropped, "{reset}");
    assert_eq!(reset["steps"]["in_cell_us"], reset["reset_us"], "{reset}");
    assert_ne!(reset["generation"], made["clones"][0]["generation"], "{reset}");
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
    // A live fork of it (frozen again, in its cell) makes clones that see its writes too.
    let fork = ok(
        &client,
        "POST",
        &format!("/v1/vms/{id}/clones"),
        Some(json!({"count": 2})),
        201,
    );
    assert!(fork["pause_us"].as_f64().is_some_and(|us| us > 0.0), "{fork}");
    let forked: Vec<&str> = fork["clones"]
        .as_array()
        .expect("clones")
        .iter()
        .map(|c| c["id"].as_str().expect("id"))
        .collect();
    assert_eq!(forked.len(), 2, "{fork}");
    let check = json!({"command": "checksum", "start_gpa": 16 << 20, "count": 32, "stride": 4096});
    for clone in forked {
        let out = ok(
            &client,
            "POST",
            &format!("/v1/vms/{clone}/run"),
            Some(check.clone()),
            200,
        );
        assert_eq!(out["result"].as_u64(), Some(sum), "{out}");
        ok(&client, "DELETE", &format!("/v1/vms/{clone}"), None, 204);
    }
    // A write probe of a booted VM, in a cell as in process: no scratch clone, no baseline.
    let probe = ok(
        &client,
        "POST",
        &format!("/v1/vms/{id}/probes/write"),
        Some(json!({"start_gpa": 16 << 20, "pages": 4, "stride": 4096})),
        200,
    );
    assert_eq!(probe["written"], 4, "{probe}");
    assert!(probe["host_cow_us"].is_null(), "{probe}");
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
        let (server, client) = start_config(config);
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
    let (server, client) = start_config(config);
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
    let (_server, client) = start_config(config);
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

#[test]
fn test_clones_in_different_cells_never_share_a_generation_id() {
    let config = ServerConfig {
        limits: Limits {
            warm_shells: 0,
            ..limits()
        },
        cells: Some(cells(1, 4)),
        ..ServerConfig::local(0)
    };
    let (_server, client) = start_config(config);
    let tpl = clones_template(&client);
    let made = ok(
        &client,
        "POST",
        &format!("/v1/templates/{tpl}/clones"),
        Some(json!({"count": 3})),
        201,
    );
    assert_eq!(cells_holding_vms(&client).len(), 3, "one clone per cell");
    let mut generations: Vec<u64> = made["clones"]
        .as_array()
        .expect("clones")
        .iter()
        .map(|c| c["generation"].as_u64().expect("generation"))
        .collect();
    // A reset takes a new one in the clone's own cell.
    let first = made["clones"][0]["id"].as_str().expect("id");
    let reset = ok(&client, "POST", &format!("/v1/vms/{first}/reset"), None, 200);
    generations.push(reset["generation"].as_u64().expect("generation"));
    let distinct: std::collections::BTreeSet<u64> = generations.iter().copied().collect();
    assert_eq!(distinct.len(), generations.len(), "{generations:?}");
}

/// A kernel directory with the guest-ABI guests the template-call tests boot.
fn call_kernel_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cowvm-cells-tcall-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("kernel dir");
    std::fs::write(dir.join("hello.elf"), cowvm_guest::HELLO_ELF).expect("hello");
    std::fs::copy(cowvm_tests::abi_guest("misbehave.elf"), dir.join("misbehave.elf")).expect("misbehave");
    dir
}

/// A server with the kernels of `dir`, bodies up to 1 MiB (an input beyond the mailbox fits)
/// and `limits` otherwise.
fn start_with_kernels(dir: &std::path::Path, limits: Limits, cells: Option<CellsConfig>) -> (RunningServer, Client) {
    let config = ServerConfig {
        limits: Limits {
            max_body_bytes: 1 << 20,
            ..limits
        },
        cells,
        kernel_dir: Some(dir.to_owned()),
        ..ServerConfig::local(0)
    };
    start_config(config)
}

/// Boots `kernel` (a guest-ABI guest) to `ready()` and snapshots it; the template id.
fn abi_template(client: &Client, kernel: &str) -> String {
    let vm = ok(
        client,
        "POST",
        "/v1/vms",
        Some(json!({"memory_mib": 64, "kernel": kernel})),
        201,
    );
    let vm = vm["id"].as_str().expect("vm id");
    let made = ok(client, "POST", &format!("/v1/vms/{vm}/snapshot"), None, 201);
    // The booted source goes: with cells it would live in a cell too, and these tests count
    // what the calls leave there.
    ok(client, "DELETE", &format!("/v1/vms/{vm}"), None, 204);
    made["template_id"].as_str().expect("template id").to_owned()
}

fn call_body(input: &[u8], timeout_ms: Option<u64>) -> Value {
    use base64::Engine as _;
    let mut body = json!({"input": base64::engine::general_purpose::STANDARD.encode(input)});
    if let Some(ms) = timeout_ms {
        body["timeout_ms"] = ms.into();
    }
    body
}

/// A template call's answer without what varies from call to call: the answer without its
/// timings (each checked positive), or the status and error code (with the message where it
/// is fixed).
fn call_outcome(client: &Client, tpl: &str, body: &Value) -> (u16, Value) {
    let path = format!("/v1/templates/{tpl}/call");
    let answer = client.request("POST", &path, Some(body)).expect("the server answers");
    let mut body = answer.body;
    if answer.status == 200 {
        let fields = body.as_object_mut().expect("an object");
        for key in ["spawn_us", "run_us", "total_us"] {
            let value = fields.remove(key);
            assert!(value.and_then(|v| v.as_f64()).is_some_and(|v| v > 0.0), "{key}");
        }
        return (200, body);
    }
    let code = body["error"]["code"].clone();
    let fixed = ["input_too_large", "not_found"].iter().any(|c| code == *c);
    let message = if fixed {
        body["error"]["message"].take()
    } else {
        Value::Null
    };
    (answer.status, json!({"code": code, "message": message}))
}

/// The template calls both servers answer: guests that answer, count (a fresh clone each time),
/// fault, spin past their deadline, abort, are no ABI guest; an input that fills the mailbox (a
/// cell message carries it), inputs beyond the mailbox or not base64; an unknown template.
fn template_call_outcomes(client: &Client, hello: &str, misbehave: &str, builtin: &str) -> Vec<(u16, Value)> {
    // The mailbox's 262080 input bytes, and one byte more.
    let full = vec![b'y'; 262_080];
    let too_large = vec![b'x'; 262_081];
    let cases: Vec<(&str, Value)> = vec![
        (hello, call_body(b"world", None)),
        (misbehave, call_body(b"ok", None)),
        (misbehave, call_body(b"count", None)),
        (misbehave, call_body(b"count", None)),
        (misbehave, call_body(b"fault", None)),
        (misbehave, call_body(b"spin", Some(200))),
        (misbehave, call_body(b"abort", None)),
        (misbehave, call_body(b"badcall", None)),
        (builtin, call_body(b"", None)),
        (hello, call_body(&full, None)),
        (hello, call_body(&too_large, None)),
        (hello, json!({"input": "not base64!"})),
        (hello, call_body(b"", Some(0))),
        ("tpl-999", call_body(b"world", None)),
        (hello, call_body(b"again", None)),
    ];
    cases
        .iter()
        .map(|(tpl, body)| call_outcome(client, tpl, body))
        .collect()
}

/// The `anon_inode:kvm-vm` descriptors of process `pid` (one per KVM VM it holds).
fn kvm_vms(pid: u64) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| {
            dir.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter(|target| target.to_string_lossy() == "anon_inode:kvm-vm")
                .count()
        })
        .unwrap_or(0)
}

fn cells_list(client: &Client) -> Vec<Value> {
    ok(client, "GET", "/v1/cells", None, 200)
        .as_array()
        .expect("cells")
        .clone()
}

#[test]
fn test_template_calls_in_cells_answer_as_in_process_and_leave_no_vm_behind() {
    let dir = call_kernel_dir("same");
    let (in_process, in_process_vms) = {
        let (_server, client) = start_with_kernels(&dir, limits(), None);
        let (hello, misbehave) = (
            abi_template(&client, "hello.elf"),
            abi_template(&client, "misbehave.elf"),
        );
        let builtin = clones_template(&client);
        let outcomes = template_call_outcomes(&client, &hello, &misbehave, &builtin);
        let vms = ok(&client, "GET", "/v1/vms", None, 200);
        (outcomes, vms.as_array().expect("vms").len())
    };
    assert_eq!(
        in_process[0].1["output"], "aGVsbG8sIHdvcmxk",
        "hello, world: {in_process:?}"
    );
    assert_eq!(in_process_vms, 0, "no VM is left in process");

    let (_server, client) = start_with_kernels(&dir, limits(), Some(cells(10, 2)));
    let (hello, misbehave) = (
        abi_template(&client, "hello.elf"),
        abi_template(&client, "misbehave.elf"),
    );
    let builtin = clones_template(&client);
    // --warm-shells 2 of each template, in cells: the calls take them.
    assert_eq!(wait_for_cell_shells(&client, 6), 6);
    let in_cells = template_call_outcomes(&client, &hello, &misbehave, &builtin);
    assert_eq!(in_cells, in_process);
    // No call's VM is left: not listed, none held by a cell; each cell ends up holding just its
    // warm shells (rebuilt after the calls took them).
    let vms = ok(&client, "GET", "/v1/vms", None, 200);
    assert_eq!(vms.as_array().expect("vms").len(), in_process_vms, "{vms}");
    let settled = eventually(|| {
        let cells = cells_list(&client);
        let shells: u64 = cells.iter().map(|c| c["warm_shells"].as_u64().unwrap_or(0)).sum();
        shells == 6
            && cells.iter().all(|c| {
                c["vms"] == 0
                    && kvm_vms(c["pid"].as_u64().unwrap_or(0)) as u64 == c["warm_shells"].as_u64().unwrap_or(0)
            })
    });
    assert!(
        settled,
        "cells hold more than their warm shells: {:?}",
        cells_list(&client)
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn test_a_template_call_in_cells_holds_its_vm_in_a_cell_and_the_server_none() {
    let dir = call_kernel_dir("where");
    let mut child = Command::new(env!("CARGO_BIN_EXE_cowvm"))
        .args(["serve", "--listen", "127.0.0.1:0", "--cells", "--max-cells", "1"])
        .args(["--warm-shells", "0", "--kernel-dir"])
        .arg(&dir)
        .stdout(Stdio::piped())
        .spawn()
        .expect("start cowvm serve --cells");
    let server = child.id() as u64;
    let stdout = child.stdout.take().expect("stdout");
    let child = Served::new(child);
    let first = BufReader::new(stdout).lines().next().expect("a line").expect("read");
    let url = first.rsplit(' ').next().expect("url").to_owned();
    let client = Client::new(&url, None);
    let tpl = abi_template(&client, "misbehave.elf");
    // The first call starts the cell and loads the template there.
    let (status, answer) = call_outcome(&client, &tpl, &call_body(b"ok", None));
    assert_eq!(status, 200, "{answer}");
    let cells = cells_list(&client);
    assert_eq!(cells.len(), 1, "{cells:?}");
    let cell = cells[0]["pid"].as_u64().expect("pid");
    assert!(eventually(|| kvm_vms(cell) == 0), "the first call's VM is gone");
    let server_before = kvm_vms(server);

    // While a guest spins to its deadline, its VM is the cell's, not the server's.
    let spinning = {
        let client = Client::new(&url, None);
        let path = format!("/v1/templates/{tpl}/call");
        std::thread::spawn(move || client.request("POST", &path, Some(&call_body(b"spin", Some(1000)))))
    };
    let (mut server_most, mut cell_most) = (0, 0);
    while !spinning.is_finished() {
        server_most = server_most.max(kvm_vms(server));
        cell_most = cell_most.max(kvm_vms(cell));
        std::thread::sleep(Duration::from_millis(2));
    }
    let answer = spinning.join().expect("join").expect("answer");
    assert_eq!(
        (answer.status, &answer.body["error"]["code"]),
        (422, &json!("deadline_exceeded"))
    );
    assert_eq!(server_most, server_before, "the server held no VM for the call");
    assert_eq!(cell_most, 1, "the cell held the call's VM");

    // A call whose guest faults leaves nothing behind either.
    let (status, answer) = call_outcome(&client, &tpl, &call_body(b"fault", None));
    assert_eq!((status, &answer["code"]), (422, &json!("guest_fault")));
    assert!(
        eventually(|| kvm_vms(cell) == 0),
        "the calls' VMs are gone from the cell"
    );
    assert_eq!(kvm_vms(server), server_before);
    let vms = ok(&client, "GET", "/v1/vms", None, 200);
    assert_eq!(vms.as_array().expect("vms").len(), 0, "no VM is left: {vms}");
    assert_eq!(cells_list(&client)[0]["vms"], 0);
    assert!(stop_server(child), "the server stops cleanly");
    std::fs::remove_dir_all(&dir).ok();
}

/// With `--max-vms 2` held by two clones, a template call is refused 429; once a clone is
/// deleted, it runs.
fn template_call_when_full(cells: Option<CellsConfig>) -> Vec<(u16, Value)> {
    let dir = call_kernel_dir(if cells.is_some() { "full-cells" } else { "full" });
    let (_server, client) = start_with_kernels(&dir, Limits { max_vms: 2, ..limits() }, cells);
    let hello = abi_template(&client, "hello.elf");
    let clone = clone_ids(&client, &hello, 2).remove(0);
    let refused = call_outcome(&client, &hello, &call_body(b"full", None));
    ok(&client, "DELETE", &format!("/v1/vms/{clone}"), None, 204);
    let answered = call_outcome(&client, &hello, &call_body(b"room", None));
    std::fs::remove_dir_all(&dir).ok();
    vec![refused, answered]
}

#[test]
fn test_a_template_call_in_cells_counts_against_max_vms_as_in_process() {
    let in_process = template_call_when_full(None);
    assert_eq!(in_process[0], (429, json!({"code": "too_many_vms", "message": null})));
    assert_eq!(in_process[1].0, 200, "{in_process:?}");
    assert_eq!(template_call_when_full(Some(cells(10, 2))), in_process);
}

#[test]
fn test_a_templates_warm_shells_spread_over_as_many_cells_as_the_host_has_cpus_and_single_clones_alternate() {
    // A cell serves one request at a time: clones taken one by one by concurrent clients must
    // not all land in one cell.
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    let (_server, client) = start(Some(cells(10, 4)));
    let tpl = clones_template(&client);
    let warm = ok(
        &client,
        "POST",
        &format!("/v1/templates/{tpl}/warm"),
        Some(json!({"shells": 8})),
        200,
    );
    assert_eq!(warm["target"], 8, "{warm}");
    assert_eq!(wait_for_cell_shells(&client, 8), 8);
    let holding: Vec<Value> = cells_list(&client)
        .into_iter()
        .filter(|c| c["warm_shells"].as_u64().unwrap_or(0) > 0)
        .collect();
    assert_eq!(holding.len(), cpus.clamp(1, 4), "{holding:?}");
    if cpus < 2 {
        eprintln!("skipping the alternation check: this host has 1 CPU");
        return;
    }
    // Two single clones, one after the other, each from a warm shell, in two cells.
    let first = clone_ids(&client, &tpl, 1).remove(0);
    let second = clone_ids(&client, &tpl, 1).remove(0);
    let with_vms = cells_holding_vms(&client);
    assert_eq!(with_vms.len(), 2, "{first} and {second} share a cell: {with_vms:?}");
}

#[test]
fn test_many_vcpu_boots_in_a_cell_survive_the_sandbox() {
    // Found by schemathesis: `{"memory_mib": 4, "vcpus": 8}` killed its cell with SIGSYS (an
    // `openat` glibc made on a vCPU thread). Opens now fail with EACCES instead.
    let (_server, client) = start(Some(cells(10, 2)));
    for _ in 0..4 {
        let vm = ok(
            &client,
            "POST",
            "/v1/vms",
            Some(json!({"memory_mib": 4, "vcpus": 8, "warmup_mib": 0, "kernel": null})),
            201,
        );
        let id = vm["id"].as_str().expect("id");
        let who = ok(
            &client,
            "POST",
            &format!("/v1/vms/{id}/run"),
            Some(json!({"command": "identity", "vcpu": 7})),
            200,
        );
        assert_eq!(who["vcpu"], 7, "{who}");
    }
    assert!(cells_list(&client).iter().all(|c| c["seccomp"] == 2));
}

/// Deleted clones reset into warm shells over all cells, as `GET /v1/cells` reports them.
fn cells_recycled(client: &Client) -> u64 {
    cells_list(client)
        .iter()
        .map(|c| c["recycled"].as_u64().expect("recycled"))
        .sum()
}

#[test]
fn test_a_deleted_in_cell_clone_is_recycled_into_a_warm_shell_and_the_next_clone_starts_clean() {
    let (_server, client) = start(Some(cells(10, 1)));
    let tpl = clones_template(&client);
    assert_eq!(wait_for_cell_shells(&client, 2), 2, "the server keeps 2 shells");
    assert_eq!(cells_recycled(&client), 0);
    // A clone deleted while its shell has not been rebuilt is recycled. The warm keeper rebuilds
    // a shortfall that lasted a whole round (50 ms) itself, so on a slow host a deleted clone may
    // find its shell rebuilt and be torn down instead: a few tries.
    let pristine = {
        let id = clone_ids(&client, &tpl, 1).remove(0);
        let sum = run_checksum(&client, &id);
        write_pages(&client, &id, 0xd1d);
        let stats = ok(&client, "GET", &format!("/v1/vms/{id}/stats"), None, 200);
        assert_eq!(stats["pages"]["private"], 64, "{stats}");
        ok(&client, "DELETE", &format!("/v1/vms/{id}"), None, 204);
        sum
    };
    for _ in 0..20 {
        if cells_recycled(&client) > 0 {
            break;
        }
        let id = clone_ids(&client, &tpl, 1).remove(0);
        write_pages(&client, &id, 0xd1d);
        ok(&client, "DELETE", &format!("/v1/vms/{id}"), None, 204);
    }
    assert!(cells_recycled(&client) > 0, "no deleted clone was recycled in 21 tries");
    assert_eq!(
        wait_for_cell_shells(&client, 2),
        2,
        "the recycled VMs are the shells again"
    );
    assert!(cells_holding_vms(&client).is_empty(), "no clone is left in the cell");
    // Both shells are recycled or fresh; neither keeps a deleted clone's writes.
    for id in clone_ids(&client, &tpl, 2) {
        let stats = ok(&client, "GET", &format!("/v1/vms/{id}/stats"), None, 200);
        assert_eq!(stats["pages"]["private"], 0, "{stats}");
        assert_eq!(run_checksum(&client, &id), pristine);
        assert_ne!(first_page(&client, &id), 0xd1d);
    }
}

#[test]
fn test_a_reset_in_a_cell_with_a_warm_shell_swaps_and_the_clone_reads_its_new_ram() {
    let (_server, client) = start(Some(cells(10, 1)));
    let tpl = clones_template(&client);
    assert_eq!(wait_for_cell_shells(&client, 2), 2, "the server keeps 2 shells");
    let id = clone_ids(&client, &tpl, 1).remove(0);
    let pristine = run_checksum(&client, &id);
    write_pages(&client, &id, 0x5a5);
    let before = ok(&client, "GET", &format!("/v1/vms/{id}/stats"), None, 200);
    assert_eq!(before["pages"]["private"], 64, "{before}");
    let reset = ok(&client, "POST", &format!("/v1/vms/{id}/reset"), None, 200);
    assert_eq!(reset["swapped"], true, "the cell has a ready shell: {reset}");
    assert_eq!(reset["pages_dropped"], 0, "{reset}");
    // Same id, the shell's RAM: the supervisor reads the new mapping and the new KVM fds.
    let after = ok(&client, "GET", &format!("/v1/vms/{id}/stats"), None, 200);
    assert_eq!(after["pages"]["private"], 0, "{after}");
    assert_eq!(run_checksum(&client, &id), pristine);
    let who = ok(
        &client,
        "POST",
        &format!("/v1/vms/{id}/run"),
        Some(json!({"command": "identity"})),
        200,
    );
    assert_eq!(who["result"], reset["generation"], "{who}");
    let info = ok(&client, "GET", &format!("/v1/vms/{id}"), None, 200);
    assert_eq!(info["generation"], reset["generation"], "{info}");
    let stats = ok(&client, "GET", &format!("/v1/vms/{id}/stats"), None, 200);
    assert!(stats["kvm"].is_object(), "{stats}");
    // The used VM goes back to the pool as a shell.
    assert!(eventually(|| cells_recycled(&client) >= 1), "{:?}", cells_list(&client));
}
