//! `cowvm serve --state-dir` at start-up, as an operator sees it: damaged templates are moved to
//! `quarantine/` unchanged and logged while the others load; files that are not cowvm's are left
//! alone; a FIFO never blocks start-up; refused ids are never handed out again; generation ids do
//! not repeat after a restart; a directory others can write is refused; layered templates are
//! saved as their own overlay and come back after their parent.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use cowvm::client::Client;
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;

struct Server {
    child: Child,
    client: Client,
    stderr: std::thread::JoinHandle<String>,
}

impl Server {
    /// Kills the server (as a crash would) and returns what it wrote to stderr.
    fn kill(mut self) -> String {
        self.child.kill().expect("kill");
        self.child.wait().expect("reap");
        self.stderr.join().expect("stderr")
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        self.client
            .call(method, path, body.as_ref())
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }
}

fn state_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cowvm-state-dir-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    dir
}

/// Starts `cowvm serve` on `dir`; `Err(stderr)` if it exits instead of listening. Start-up must
/// not hang: a server that is not listening after a minute fails the test.
fn serve(dir: &Path) -> Result<Server, String> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_cowvm"))
        .args(["serve", "--listen", "127.0.0.1:0", "--warm-shells", "0", "--state-dir"])
        .arg(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start cowvm serve");
    let mut err = child.stderr.take().expect("stderr");
    let stderr = std::thread::spawn(move || {
        let mut text = String::new();
        err.read_to_string(&mut text).ok();
        text
    });
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let line = BufReader::new(stdout).lines().next().and_then(Result::ok);
        let _ = tx.send(line);
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(Some(line)) => {
            let url = line.rsplit(' ').next().expect("url").to_owned();
            Ok(Server {
                child,
                client: Client::new(&url, None),
                stderr,
            })
        }
        Ok(None) => {
            let status = child.wait().expect("reap");
            Err(format!("{status}: {}", stderr.join().expect("stderr")))
        }
        Err(_) => {
            child.kill().ok();
            child.wait().ok();
            panic!("cowvm serve did not listen within 60 s: start-up blocked");
        }
    }
}

fn names(dir: &Path) -> Vec<String> {
    let mut all: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
                .collect()
        })
        .unwrap_or_default();
    all.sort();
    all
}

fn template_ids(server: &Server) -> Vec<String> {
    server
        .call("GET", "/v1/templates", None)
        .as_array()
        .expect("array")
        .iter()
        .map(|t| t["id"].as_str().expect("id").to_owned())
        .collect()
}

fn generations(made: &Value) -> Vec<u64> {
    made["clones"]
        .as_array()
        .expect("clones")
        .iter()
        .map(|c| c["generation"].as_u64().expect("generation"))
        .collect()
}

fn allocated(dir: &Path, id: &str) -> u64 {
    let name = names(dir)
        .into_iter()
        .find(|n| n.starts_with(&format!("{id}.")) && n.ends_with(".mem"))
        .expect("memory file");
    std::fs::metadata(dir.join(name)).expect("stat").blocks() * 512
}

/// Issue 11 items 1, 2, 3 and 5 and issue 18 item 9, through a real server.
#[test]
fn test_start_up_quarantines_damage_keeps_foreign_files_and_reuses_no_id_nor_generation() {
    let dir = state_dir("startup");
    let server = serve(&dir).expect("first start");
    let vm = server.call("POST", "/v1/vms", Some(json!({"memory_mib": 64})));
    let vm = vm["id"].as_str().expect("id").to_owned();
    for expected in ["tpl-1", "tpl-2"] {
        let made = server.call("POST", &format!("/v1/vms/{vm}/snapshot"), None);
        assert_eq!(made["template_id"], expected);
    }
    let made = server.call("POST", "/v1/templates/tpl-1/clones", Some(json!({"count": 3})));
    let first_run: HashSet<u64> = generations(&made).into_iter().collect();
    server.kill();

    // Damage tpl-2, copy tpl-1's state file under another id, and add foreign files.
    let tpl2 = dir.join("tpl-2.state");
    let mut damaged = std::fs::read(&tpl2).expect("read");
    let last = damaged.len() - 1;
    damaged[last] ^= 0x20;
    std::fs::write(&tpl2, &damaged).expect("damage");
    std::fs::copy(dir.join("tpl-1.state"), dir.join("tpl-5.state")).expect("copy");
    for foreign in ["backup-disk.mem", ".editor.swp.tmp"] {
        std::fs::write(dir.join(foreign), b"mine").expect("write");
    }
    let tpl2_memory: Vec<String> = names(&dir)
        .into_iter()
        .filter(|n| n.starts_with("tpl-2.") && n.ends_with(".mem"))
        .collect();
    assert_eq!(tpl2_memory.len(), 1);
    let tpl2_memory_bytes = std::fs::read(dir.join(&tpl2_memory[0])).expect("read");

    let server = serve(&dir).expect("second start");
    assert_eq!(template_ids(&server), ["tpl-1"], "the intact template loads, once");
    let quarantine = dir.join("quarantine");
    assert_eq!(
        std::fs::read(quarantine.join("tpl-2.state")).expect("kept"),
        damaged,
        "unchanged"
    );
    assert_eq!(
        std::fs::read(quarantine.join(&tpl2_memory[0])).expect("kept"),
        tpl2_memory_bytes,
        "its memory file is kept, unchanged"
    );
    assert!(quarantine.join("tpl-5.state").exists(), "{:?}", names(&quarantine));
    for foreign in ["backup-disk.mem", ".editor.swp.tmp"] {
        assert_eq!(
            std::fs::read(dir.join(foreign)).expect("kept"),
            b"mine",
            "{foreign} untouched"
        );
    }

    // New templates never take a refused id; clones after the restart get new generation ids.
    let vm = server.call("POST", "/v1/vms", Some(json!({"memory_mib": 64})));
    let vm = vm["id"].as_str().expect("id").to_owned();
    let made = server.call("POST", &format!("/v1/vms/{vm}/snapshot"), None);
    assert_eq!(made["template_id"], "tpl-6", "ids 2 and 5 stay out of use");
    assert_eq!(std::fs::read(quarantine.join("tpl-2.state")).expect("kept"), damaged);
    let made = server.call("POST", "/v1/templates/tpl-1/clones", Some(json!({"count": 3})));
    for generation in generations(&made) {
        assert!(
            !first_run.contains(&generation),
            "generation {generation} repeats across a restart"
        );
    }
    server.call("DELETE", &format!("/v1/vms/{vm}"), None);
    server
        .client
        .request("DELETE", "/v1/templates/tpl-6", None)
        .expect("delete");
    assert!(!dir.join("tpl-6.state").exists());
    let stderr = server.kill();
    assert!(
        stderr
            .lines()
            .filter(|l| l.contains("removed") && l.contains("tpl-6."))
            .count()
            == 2,
        "both files of a deleted template are logged as removed: {stderr}"
    );
    for name in ["tpl-2.state", "tpl-5.state"] {
        assert!(
            stderr.lines().any(|l| l.contains(name) && l.contains("quarantine")),
            "{name} is logged with its reason: {stderr}"
        );
    }
    assert!(stderr.contains("claims template id \"tpl-1\""), "{stderr}");
    std::fs::remove_dir_all(&dir).ok();
}

/// Issue 11 item 4.
#[test]
fn test_a_fifo_named_like_a_state_file_neither_blocks_start_up_nor_is_opened() {
    let dir = state_dir("fifo");
    let fifo = std::ffi::CString::new(dir.join("zzz.state").to_string_lossy().as_bytes()).expect("path");
    // SAFETY: mkfifo on a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0, "mkfifo");
    let server = serve(&dir).expect("start");
    assert!(template_ids(&server).is_empty());
    let stderr = server.kill();
    assert!(
        stderr
            .lines()
            .any(|l| l.contains("zzz.state") && l.contains("FIFO") && l.contains("quarantine")),
        "{stderr}"
    );
    assert!(dir.join("quarantine/zzz.state").exists());
    std::fs::remove_dir_all(&dir).ok();
}

/// Issue 11 item 6.
#[test]
fn test_a_state_dir_that_group_or_others_can_write_is_refused() {
    let dir = state_dir("mode");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let refused = serve(&dir).err().expect("refused");
    assert!(
        refused.contains("group or others") && refused.contains("chmod 700"),
        "a clear message: {refused}"
    );
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    serve(&dir).expect("0700 is fine").kill();
    std::fs::remove_dir_all(&dir).ok();
}

/// Issue 12 item 4: a snapshot or live fork of a clone is saved as its own pages plus a reference
/// to its parent; the parent cannot be deleted under it; it reloads after its parent, and without
/// its parent it is quarantined.
#[test]
fn test_layered_templates_are_saved_as_overlays_and_reload_after_their_parent() {
    let dir = state_dir("layered");
    let server = serve(&dir).expect("start");
    let vm = server.call("POST", "/v1/vms", Some(json!({"memory_mib": 64, "warmup_mib": 8})));
    let vm = vm["id"].as_str().expect("id").to_owned();
    let base = server.call("POST", &format!("/v1/vms/{vm}/snapshot"), None);
    assert_eq!(base["template_id"], "tpl-1");
    let made = server.call("POST", "/v1/templates/tpl-1/clones", Some(json!({"count": 1})));
    let clone = made["clones"][0]["id"].as_str().expect("clone").to_owned();
    let write = json!({"command": "write", "start_gpa": 12 * MIB, "count": 4, "stride": 4096, "value": 77});
    server.call("POST", &format!("/v1/vms/{clone}/run"), Some(write));
    let sum = json!({"command": "checksum", "start_gpa": 8 * MIB, "count": 2048, "stride": 4096});
    let expected = server.call("POST", &format!("/v1/vms/{clone}/run"), Some(sum.clone()))["result"].clone();
    let layered = server.call("POST", &format!("/v1/vms/{clone}/snapshot"), None);
    assert_eq!(
        (layered["template_id"].as_str(), layered["layers"].as_u64()),
        (Some("tpl-2"), Some(2))
    );
    let fork = server.call("POST", &format!("/v1/vms/{clone}/clones"), Some(json!({"count": 1})));
    assert_eq!(fork["template_id"], "tpl-3");

    let parent_bytes = allocated(&dir, "tpl-1");
    for id in ["tpl-2", "tpl-3"] {
        let own = allocated(&dir, id);
        assert!(
            own <= 64 * 1024 && own * 16 < parent_bytes,
            "{id} stores only its overlay: {own} bytes on disk, its parent {parent_bytes}"
        );
    }
    for vm in server.call("GET", "/v1/vms", None).as_array().expect("vms") {
        let id = vm["id"].as_str().expect("id");
        server.call("DELETE", &format!("/v1/vms/{id}"), None);
    }
    let refused = server
        .client
        .request("DELETE", "/v1/templates/tpl-1", None)
        .expect("answer");
    assert_eq!(refused.status, 409, "{:?}", refused.body);
    assert!(
        refused.body["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("tpl-2"),
        "{:?}",
        refused.body
    );
    server.kill();

    let server = serve(&dir).expect("restart");
    assert_eq!(template_ids(&server), ["tpl-1", "tpl-2", "tpl-3"]);
    let info = server.call("GET", "/v1/templates/tpl-2", None);
    assert_eq!(info["layers"], 2, "{info}");
    let made = server.call("POST", "/v1/templates/tpl-2/clones", Some(json!({"count": 1})));
    let clone = made["clones"][0]["id"].as_str().expect("clone").to_owned();
    let got = server.call("POST", &format!("/v1/vms/{clone}/run"), Some(sum));
    assert_eq!(
        got["result"], expected,
        "the reloaded layered template has the same memory"
    );
    server.kill();

    let aside = state_dir("layered-aside");
    for name in names(&dir).into_iter().filter(|n| n.starts_with("tpl-1.")) {
        std::fs::rename(dir.join(&name), aside.join(&name)).expect("move the parent away");
    }
    let server = serve(&dir).expect("restart without the parent");
    assert!(template_ids(&server).is_empty());
    let stderr = server.kill();
    assert!(
        stderr
            .lines()
            .any(|l| l.contains("tpl-2.state") && l.contains("parent template tpl-1")),
        "{stderr}"
    );
    assert!(dir.join("quarantine/tpl-2.state").exists());
    std::fs::remove_dir_all(&dir).ok();
    std::fs::remove_dir_all(&aside).ok();
}

/// Issue 18 item 3: copies that change sparseness (same content) keep the template.
#[test]
fn test_a_template_survives_cp_sparse_never_and_always_of_its_memory_file() {
    let dir = state_dir("sparse");
    let server = serve(&dir).expect("start");
    let vm = server.call("POST", "/v1/vms", Some(json!({"memory_mib": 64, "warmup_mib": 4})));
    let vm = vm["id"].as_str().expect("id").to_owned();
    server.call("POST", &format!("/v1/vms/{vm}/snapshot"), None);
    let sum = json!({"command": "checksum", "start_gpa": 8 * MIB, "count": 1024, "stride": 4096});
    let made = server.call("POST", "/v1/templates/tpl-1/clones", Some(json!({"count": 1})));
    let clone = made["clones"][0]["id"].as_str().expect("clone").to_owned();
    let expected = server.call("POST", &format!("/v1/vms/{clone}/run"), Some(sum.clone()))["result"].clone();
    server.kill();
    let memory = names(&dir)
        .into_iter()
        .find(|n| n.starts_with("tpl-1.") && n.ends_with(".mem"))
        .map(|n| dir.join(n))
        .expect("memory file");
    for mode in ["never", "always"] {
        let copy = dir.join("copy-in-progress");
        let copied = Command::new("cp")
            .arg(format!("--sparse={mode}"))
            .arg(&memory)
            .arg(&copy)
            .status()
            .expect("cp");
        assert!(copied.success());
        std::fs::rename(&copy, &memory).expect("replace");
        let server = serve(&dir).expect("restart");
        assert_eq!(template_ids(&server), ["tpl-1"], "--sparse={mode}");
        let made = server.call("POST", "/v1/templates/tpl-1/clones", Some(json!({"count": 1})));
        let clone = made["clones"][0]["id"].as_str().expect("clone").to_owned();
        let got = server.call("POST", &format!("/v1/vms/{clone}/run"), Some(sum.clone()));
        assert_eq!(got["result"], expected, "--sparse={mode}");
        server.kill();
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// Issue 18 item 8: a payload is tied to its file name and checked against its state.
#[test]
fn test_payloads_naming_another_id_or_a_wrong_size_are_quarantined_at_start() {
    const CRC: crc::Crc<u64> = crc::Crc::<u64>::new(&crc::CRC_64_XZ);
    let dir = state_dir("payload");
    let server = serve(&dir).expect("start");
    let vm = server.call("POST", "/v1/vms", Some(json!({"memory_mib": 64})));
    let vm = vm["id"].as_str().expect("id").to_owned();
    for _ in 0..3 {
        server.call("POST", &format!("/v1/vms/{vm}/snapshot"), None);
    }
    server.kill();
    let rewrite = |id: &str, edit: &dyn Fn(&mut Value)| {
        let path = dir.join(format!("{id}.state"));
        let bytes = std::fs::read(&path).expect("read");
        let mut payload: Value = serde_json::from_slice(&bytes[28..]).expect("payload");
        edit(&mut payload);
        let body = serde_json::to_vec(&payload).expect("encode");
        let mut out = bytes[..12].to_vec();
        out.extend_from_slice(&(body.len() as u64).to_le_bytes());
        out.extend_from_slice(&CRC.checksum(&body).to_le_bytes());
        out.extend_from_slice(&body);
        std::fs::write(&path, out).expect("write");
    };
    rewrite("tpl-2", &|p| p["id"] = "tpl-9".into());
    rewrite("tpl-3", &|p| p["memory_size"] = (128 * MIB).into());
    let server = serve(&dir).expect("restart");
    assert_eq!(template_ids(&server), ["tpl-1"]);
    let stderr = server.kill();
    assert!(stderr.contains("claims template id \"tpl-9\""), "{stderr}");
    assert!(stderr.contains("differs from the VM state"), "{stderr}");
    for name in ["tpl-2.state", "tpl-3.state"] {
        assert!(dir.join("quarantine").join(name).exists(), "{name}");
    }
    std::fs::remove_dir_all(&dir).ok();
}
