//! Templates through a real OCI registry on loopback: Debian's `docker-registry` (distribution
//! v2) and `skopeo`. A template is pushed from server A with `cowvm template push` and pulled
//! into server B (its own state directory) with `cowvm template pull`; clones on B compute the
//! same guest checksum as clones on A. Skipped, with the reason printed, when either tool is not
//! installed (`apt-get install -y docker-registry skopeo`).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cowvm::client::Client;
use cowvm::server::{self, Limits, RunningServer, ServerConfig};
use serde_json::{json, Value};

/// A temporary directory removed when dropped.
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        let dir = std::env::temp_dir().join(format!("cowvm-registry-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create a temporary directory");
        Dir(dir)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The registry process, killed when dropped.
struct Registry(Child);

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn installed(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Starts `docker-registry serve` on a free loopback port with storage in `dir`.
fn start_registry(dir: &Path) -> (Registry, u16) {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let config = dir.join("config.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.join("data").display()
        ),
    )
    .expect("write the registry config");
    let child = Command::new("docker-registry")
        .arg("serve")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start docker-registry");
    let registry = Registry(child);
    let started = Instant::now();
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    while agent.get(&format!("http://127.0.0.1:{port}/v2/")).call().is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the registry did not answer in 30 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (registry, port)
}

fn start(dir: &Path) -> (RunningServer, Client) {
    let config = ServerConfig {
        state_dir: Some(dir.to_owned()),
        limits: Limits {
            max_memory_mib: 512,
            warm_shells: 1,
            ..Limits::default()
        },
        ..ServerConfig::local(0)
    };
    let server = server::start(config).expect("server starts");
    let client = Client::new(&format!("http://{}", server.addr), None);
    (server, client)
}

fn ok(client: &Client, method: &str, path: &str, body: Option<Value>, status: u16) -> Value {
    let answer = client.request(method, path, body.as_ref()).expect("request");
    assert_eq!(answer.status, status, "{method} {path}: {}", answer.body);
    answer.body
}

fn text(value: &Value) -> String {
    value.as_str().expect("a string").to_owned()
}

const DATA: u64 = 8 << 20;
const PAGES: u64 = 128;

fn clone_checksum(c: &Client, tpl: &str) -> Value {
    let made = ok(
        c,
        "POST",
        &format!("/v1/templates/{tpl}/clones"),
        Some(json!({"count": 1})),
        201,
    );
    let clone = text(&made["clones"][0]["id"]);
    let sum = ok(
        c,
        "POST",
        &format!("/v1/vms/{clone}/run"),
        Some(json!({"command": "checksum", "start_gpa": DATA, "count": PAGES, "stride": 4096})),
        200,
    );
    assert_eq!(sum["status"], 0, "{sum}");
    sum["result"].clone()
}

/// Runs `cowvm --json template ARGS` against `server` and returns its JSON output.
fn cli(server: &RunningServer, args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_cowvm"))
        .arg("template")
        .args(args)
        .arg("--json")
        .arg("--url")
        .arg(format!("http://{}", server.addr))
        .output()
        .expect("run cowvm");
    assert!(
        out.status.success(),
        "cowvm template {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON output")
}

#[test]
fn test_a_template_pushed_from_one_server_and_pulled_into_another_clones_the_same() {
    for tool in ["docker-registry", "skopeo"] {
        if !installed(tool) {
            println!("skipped: {tool} is not installed (apt-get install -y docker-registry skopeo)");
            return;
        }
    }
    let registry_dir = Dir::new("storage");
    let (_registry, port) = start_registry(&registry_dir.0);
    let (dir_a, dir_b) = (Dir::new("a"), Dir::new("b"));
    let (a, ca) = start(&dir_a.0);
    let (b, cb) = start(&dir_b.0);

    let vm = text(
        &ok(
            &ca,
            "POST",
            "/v1/vms",
            Some(json!({"memory_mib": 64, "warmup_mib": 4})),
            201,
        )["id"],
    );
    let wrote = ok(
        &ca,
        "POST",
        &format!("/v1/vms/{vm}/run"),
        Some(json!({"command": "write", "start_gpa": DATA, "count": PAGES, "stride": 4096, "value": 0xfeed})),
        200,
    );
    assert_eq!(wrote["status"], 0);
    let tpl = text(&ok(&ca, "POST", &format!("/v1/vms/{vm}/snapshot"), None, 201)["template_id"]);

    let reference = format!("127.0.0.1:{port}/cowvm/test:{tpl}");
    let pushed = cli(&a, &["push", &tpl, &reference, "--insecure"]);
    assert_eq!(pushed["reference"], format!("docker://{reference}"));
    let manifest: Value = ureq::get(&format!("http://127.0.0.1:{port}/v2/cowvm/test/manifests/{tpl}"))
        .header("Accept", "application/vnd.oci.image.manifest.v1+json")
        .call()
        .expect("the registry holds the manifest")
        .body_mut()
        .read_json()
        .expect("JSON");
    assert_eq!(manifest["artifactType"], cowvm::archive::ARTIFACT_TYPE);

    let pulled = cli(&b, &["pull", &reference, "--insecure"]);
    let copy = text(&pulled["template_id"]);
    assert_eq!(pulled["persisted"], true);
    let on_a = clone_checksum(&ca, &tpl);
    assert_ne!(on_a, 0);
    assert_eq!(clone_checksum(&cb, &copy), on_a, "clones on B see the memory A pushed");
    let populated =
        |c: &Client, t: &str| ok(c, "GET", &format!("/v1/templates/{t}/stats"), None, 200)["populated_pages"].clone();
    assert_eq!(populated(&cb, &copy), populated(&ca, &tpl));
    a.stop().expect("stop A");
    b.stop().expect("stop B");
}
