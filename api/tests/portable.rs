//! Portable templates over real HTTP on 127.0.0.1 with real guests: export a template as an OCI
//! layout tar, import it back, clones of both compute the same guest checksum; corrupt,
//! truncated and oversized archives are refused and leave nothing behind.

use std::path::{Path, PathBuf};

use cowvm::client::{Client, ClientError};
use cowvm::server::{self, Limits, RunningServer, ServerConfig};
use serde_json::{json, Value};

/// A state directory of this test's own, removed when dropped.
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        let dir = std::env::temp_dir().join(format!("cowvm-portable-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        Dir(dir)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn start(dir: &Path, max_import_bytes: u64) -> (RunningServer, Client) {
    let config = ServerConfig {
        state_dir: Some(dir.to_owned()),
        limits: Limits {
            max_memory_mib: 512,
            warm_shells: 1,
            max_import_bytes,
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

/// Where the guest data the tests write lives, and how much of it.
const DATA: u64 = 8 << 20;
const PAGES: u64 = 256;

/// A booted VM with `DATA..DATA + PAGES` pages written (a value per page), snapshotted.
fn template(c: &Client) -> (String, String) {
    let vm = text(
        &ok(
            c,
            "POST",
            "/v1/vms",
            Some(json!({"memory_mib": 64, "warmup_mib": 4})),
            201,
        )["id"],
    );
    let wrote = ok(
        c,
        "POST",
        &format!("/v1/vms/{vm}/run"),
        Some(json!({"command": "write", "start_gpa": DATA, "count": PAGES, "stride": 4096, "value": 0x5eed_c0de})),
        200,
    );
    assert_eq!(wrote["status"], 0, "{wrote}");
    let tpl = text(&ok(c, "POST", &format!("/v1/vms/{vm}/snapshot"), None, 201)["template_id"]);
    (vm, tpl)
}

/// The guest checksum over the written pages, computed by a fresh clone of `tpl`.
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
        Some(json!({"command": "checksum", "start_gpa": DATA, "count": PAGES * 2, "stride": 2048})),
        200,
    );
    assert_eq!(sum["status"], 0, "{sum}");
    ok(c, "DELETE", &format!("/v1/vms/{clone}"), None, 204);
    sum["result"].clone()
}

fn export(c: &Client, tpl: &str) -> Vec<u8> {
    let mut archive = Vec::new();
    c.download(&format!("/v1/templates/{tpl}/export"), &mut archive)
        .expect("export");
    archive
}

fn import(c: &Client, archive: &[u8]) -> Result<Value, ClientError> {
    c.upload("/v1/templates/import", "application/x-tar", &mut &archive[..])
}

fn populated_pages(c: &Client, tpl: &str) -> Value {
    ok(c, "GET", &format!("/v1/templates/{tpl}/stats"), None, 200)["populated_pages"].clone()
}

/// The names in `dir` (hidden ones included), sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("list the state directory")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn test_export_then_import_gives_a_template_whose_clones_compute_the_same_checksum() {
    let dir = Dir::new("roundtrip");
    let (server, c) = start(&dir.0, 8 << 30);
    let (_vm, tpl) = template(&c);
    let archive = export(&c, &tpl);
    let populated = populated_pages(&c, &tpl);
    assert!(populated.as_u64().is_some_and(|p| p >= PAGES), "{populated}");
    assert!(
        (archive.len() as u64) < 8 << 20,
        "a 64 MiB template with {populated} populated pages exported as {} bytes",
        archive.len()
    );

    let imported = import(&c, &archive).expect("import");
    let copy = text(&imported["template_id"]);
    assert_ne!(copy, tpl);
    assert_eq!(imported["memory_mib"], 64);
    assert_eq!(imported["archive_bytes"], archive.len() as u64);
    assert_eq!(imported["persisted"], true);
    assert!(dir.0.join(format!("{copy}.state")).is_file(), "saved like a snapshot");
    assert_eq!(populated_pages(&c, &copy), populated, "the same populated pages");
    let original = clone_checksum(&c, &tpl);
    assert_ne!(original, 0, "the written pages are in the template");
    assert_eq!(
        clone_checksum(&c, &copy),
        original,
        "clones of the import see the same memory"
    );

    // A layered template (frozen from a clone that wrote more) exports flattened.
    let made = ok(
        &c,
        "POST",
        &format!("/v1/templates/{tpl}/clones"),
        Some(json!({"count": 1})),
        201,
    );
    let clone = text(&made["clones"][0]["id"]);
    let wrote = ok(
        &c,
        "POST",
        &format!("/v1/vms/{clone}/run"),
        Some(json!({"command": "write", "start_gpa": DATA + 4096 * 16, "count": 8, "stride": 4096, "value": 77})),
        200,
    );
    assert_eq!(wrote["status"], 0);
    let snap = ok(&c, "POST", &format!("/v1/vms/{clone}/snapshot"), None, 201);
    assert_eq!(snap["layers"], 2, "{snap}");
    let layered = text(&snap["template_id"]);
    let flat = text(&import(&c, &export(&c, &layered)).expect("import the layered one")["template_id"]);
    let layered_sum = clone_checksum(&c, &layered);
    assert_ne!(layered_sum, original, "the clone's writes changed the checksum");
    assert_eq!(clone_checksum(&c, &flat), layered_sum);
    assert_eq!(ok(&c, "GET", &format!("/v1/templates/{flat}"), None, 200)["layers"], 1);

    // The imported template survives a restart like any snapshot.
    server.stop().expect("stop");
    let (server, c) = start(&dir.0, 8 << 30);
    assert_eq!(clone_checksum(&c, &copy), original);
    server.stop().expect("stop");
}

/// Offset and size of the largest blob (a memory chunk) and of the state blob in `archive`.
fn blobs(archive: &[u8]) -> Vec<(String, u64, u64)> {
    let mut tar = tar::Archive::new(archive);
    let mut found = Vec::new();
    for entry in tar.entries().expect("a tar") {
        let entry = entry.expect("an entry");
        let path = entry.path().expect("a path").to_string_lossy().into_owned();
        if path.starts_with("blobs/sha256/") && entry.size() > 0 {
            found.push((path, entry.raw_file_position(), entry.size()));
        }
    }
    found.sort_by_key(|b| std::cmp::Reverse(b.2));
    found
}

/// The ids of the server's templates.
fn ids(c: &Client) -> Vec<String> {
    let list = ok(c, "GET", "/v1/templates", None, 200);
    list.as_array()
        .expect("a list")
        .iter()
        .map(|t| text(&t["id"]))
        .collect()
}

fn refused(result: Result<Value, ClientError>, status: u16, code: &str) {
    match result {
        Err(ClientError::Api {
            status: s,
            code: c,
            message,
        }) => {
            assert_eq!((s, c.as_str()), (status, code), "{message}");
            assert!(!message.is_empty());
        }
        other => panic!("expected {status} {code}, got {other:?}"),
    }
}

#[test]
fn test_corrupt_truncated_and_oversized_archives_are_refused_and_leave_nothing_behind() {
    let dir = Dir::new("refused");
    let (server, c) = start(&dir.0, 8 << 30);
    let (_vm, tpl) = template(&c);
    let archive = export(&c, &tpl);
    let before = listing(&dir.0);
    let templates = ids(&c);

    let found = blobs(&archive);
    assert!(found.len() >= 3, "state, manifest and at least one chunk: {found:?}");
    for (_, offset, size) in &found {
        let mut flipped = archive.clone();
        flipped[(offset + size / 2) as usize] ^= 0x40;
        refused(import(&c, &flipped), 422, "digest_mismatch");
    }
    refused(import(&c, &archive[..archive.len() / 2]), 422, "bad_archive");
    refused(import(&c, &archive[..found[0].1 as usize + 10]), 422, "bad_archive");
    refused(import(&c, b"not a tar archive at all"), 422, "bad_archive");
    refused(import(&c, &[]), 422, "bad_archive");

    assert_eq!(ids(&c), templates, "no template added");
    assert_eq!(listing(&dir.0), before, "no file added to the state directory");
    server.stop().expect("stop");

    // Oversized, streamed (chunked) and declared by Content-Length.
    let (server, c) = start(&dir.0, archive.len() as u64 - 1);
    refused(import(&c, &archive), 413, "archive_too_large");
    let answer = common_raw(server.addr, &archive);
    assert_eq!(answer.0, 413, "{}", answer.1);
    assert_eq!(ids(&c), templates, "no template added");
    assert_eq!(listing(&dir.0), before, "no file added to the state directory");
    server.stop().expect("stop");

    // A template with more RAM than --max-memory-mib is refused.
    let config = ServerConfig {
        state_dir: Some(dir.0.clone()),
        limits: Limits {
            max_memory_mib: 32,
            ..Limits::default()
        },
        ..ServerConfig::local(0)
    };
    let small = server::start(config).expect("server starts");
    let c = Client::new(&format!("http://{}", small.addr), None);
    refused(import(&c, &archive), 422, "memory_out_of_range");
    assert_eq!(ids(&c), templates, "no template added");
    assert_eq!(listing(&dir.0), before, "no file added to the state directory");
    small.stop().expect("stop");

    // Exactly at the limit is taken.
    let (server, c) = start(&dir.0, archive.len() as u64);
    import(&c, &archive).expect("an archive of exactly --max-import-bytes is taken");
    server.stop().expect("stop");
}

/// POSTs `body` with a Content-Length header (ureq sets it for a byte slice).
fn common_raw(addr: std::net::SocketAddr, body: &[u8]) -> (u16, String) {
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let mut response = agent
        .post(&format!("http://{addr}/v1/templates/import"))
        .header("content-type", "application/x-tar")
        .send(body)
        .expect("the server answers");
    let text = response.body_mut().read_to_string().unwrap_or_default();
    (response.status().as_u16(), text)
}

#[test]
fn test_an_archive_of_another_artifact_type_is_refused() {
    let dir = Dir::new("artifact");
    let (server, c) = start(&dir.0, 8 << 30);
    let (_vm, tpl) = template(&c);
    let archive = export(&c, &tpl);
    // The same archive with another artifactType in its manifest, every digest made right.
    let mut tar = tar::Archive::new(&archive[..]);
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    for entry in tar.entries().expect("tar") {
        let mut entry = entry.expect("entry");
        let path = entry.path().expect("path").to_string_lossy().into_owned();
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut entry, &mut bytes).expect("read");
        files.push((path, bytes));
    }
    let index: Value =
        serde_json::from_slice(&files.iter().find(|f| f.0 == "index.json").expect("index").1).expect("json");
    let manifest_digest = text(&index["manifests"][0]["digest"]);
    let manifest_path = format!("blobs/sha256/{}", manifest_digest.trim_start_matches("sha256:"));
    let manifest = &files.iter().find(|f| f.0 == manifest_path).expect("manifest").1;
    let other = String::from_utf8(manifest.clone())
        .expect("utf-8")
        .replace("application/vnd.cowvm.template.v1", "application/vnd.example.other.v1");
    let hex: String = sha2_hex(other.as_bytes());
    let mut index = index;
    index["manifests"][0]["digest"] = json!(format!("sha256:{hex}"));
    index["manifests"][0]["size"] = json!(other.len());
    let mut builder = tar::Builder::new(Vec::new());
    for (path, bytes) in &files {
        let bytes = if path == "index.json" {
            serde_json::to_vec(&index).expect("json")
        } else {
            bytes.clone()
        };
        let mut header = tar::Header::new_ustar();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        builder.append_data(&mut header, path, &bytes[..]).expect("append");
    }
    let mut header = tar::Header::new_ustar();
    header.set_size(other.len() as u64);
    header.set_mode(0o644);
    builder
        .append_data(&mut header, format!("blobs/sha256/{hex}"), other.as_bytes())
        .expect("append");
    let rebuilt = builder.into_inner().expect("tar");
    refused(import(&c, &rebuilt), 422, "unsupported_archive");
    assert_eq!(
        ok(&c, "GET", "/v1/templates", None, 200).as_array().map(Vec::len),
        Some(1)
    );
    server.stop().expect("stop");
}

fn sha2_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}
