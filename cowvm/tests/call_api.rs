//! `call` over HTTP and the CLI: a user guest (guest ABI v1, built with the C SDK) boots from the
//! kernel directory to `ready()`, is snapshotted, and answers calls in fresh clones or in place;
//! each kind of misbehaviour is a JSON error with its code, and the server and other VMs go on.

use std::path::{Path, PathBuf};
use std::process::Command;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use cowvm::client::{Answer, Client};
use cowvm::server::{self, Limits, RunningServer, ServerConfig};
use serde_json::{json, Value};

#[path = "../../api/tests/common/mod.rs"]
mod common;

fn kernel_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cowvm-call-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("kernel dir");
    std::fs::write(dir.join("hello.elf"), cowvm_guest::HELLO_ELF).expect("hello");
    std::fs::copy(cowvm_tests::abi_guest("misbehave.elf"), dir.join("misbehave.elf")).expect("misbehave");
    dir
}

fn start(dir: &Path) -> (RunningServer, Client) {
    let config = ServerConfig {
        kernel_dir: Some(dir.to_owned()),
        limits: Limits {
            warm_shells: 2,
            ..Limits::default()
        },
        ..ServerConfig::local(0)
    };
    let server = server::start(config).expect("server");
    let client = Client::new(&format!("http://{}", server.addr), None);
    (server, client)
}

/// Boots `kernel` to ready() and snapshots it; returns (VM id, template id).
fn template(c: &Client, kernel: &str) -> (String, String) {
    let vm = c
        .call("POST", "/v1/vms", Some(&json!({"memory_mib": 64, "kernel": kernel})))
        .expect("boot the user guest");
    let vm = vm["id"].as_str().expect("id").to_owned();
    let made = c
        .call("POST", &format!("/v1/vms/{vm}/snapshot"), None)
        .expect("snapshot at ready()");
    (vm, made["template_id"].as_str().expect("template id").to_owned())
}

fn call(c: &Client, path: &str, input: &[u8], timeout_ms: Option<u64>) -> Answer {
    let mut body = json!({"input": BASE64.encode(input)});
    if let Some(ms) = timeout_ms {
        body["timeout_ms"] = ms.into();
    }
    c.request("POST", path, Some(&body)).expect("the server answers")
}

fn output(answer: &Answer) -> Vec<u8> {
    assert_eq!(answer.status, 200, "{}", answer.body);
    BASE64
        .decode(answer.body["output"].as_str().expect("output"))
        .expect("base64")
}

#[test]
fn test_hello_template_answers_calls_over_http() {
    let dir = kernel_dir("hello");
    let (_server, c) = start(&dir);
    let (_, tpl) = template(&c, "hello.elf");
    let answer = call(&c, &format!("/v1/templates/{tpl}/call"), b"world", None);
    assert_eq!(output(&answer), b"hello, world");
    let body = &answer.body;
    assert_eq!(body["status"], 0);
    assert_eq!(body["logs"], "");
    for key in ["spawn_us", "run_us", "total_us"] {
        assert!(body[key].as_f64().is_some_and(|v| v > 0.0), "{key}: {body}");
    }
    // The call's clone is gone afterwards.
    let vms = c.call("GET", "/v1/vms", None).expect("list");
    assert_eq!(vms.as_array().map(Vec::len), Some(1), "{vms}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn test_misbehaving_calls_get_their_error_codes_and_the_server_goes_on() {
    let dir = kernel_dir("errors");
    let (server, c) = start(&dir);
    let (_, tpl) = template(&c, "misbehave.elf");
    let (bystander, _) = template(&c, "misbehave.elf");
    let path = format!("/v1/templates/{tpl}/call");
    let cases: [(&[u8], Option<u64>, &str); 6] = [
        (b"fault", None, "guest_fault"),
        (b"spin", Some(200), "deadline_exceeded"),
        (b"badptr", None, "bad_hypercall"),
        (b"big", None, "output_too_large"),
        (b"abort", None, "guest_aborted"),
        (b"badcall", None, "bad_hypercall"),
    ];
    for (input, timeout, code) in cases {
        let answer = call(&c, &path, input, timeout);
        assert_eq!(answer.status, 422, "{}", answer.body);
        assert_eq!(answer.body["error"]["code"], code, "{}", answer.body);
        assert_eq!(
            output(&call(&c, &path, b"ok", None)),
            b"ok",
            "the template still answers"
        );
    }
    let bad: [(Value, u16, &str); 3] = [
        (json!({"input": "not base64!"}), 400, "invalid_field"),
        (json!({"input": "", "timeout_ms": 0}), 422, "timeout_out_of_range"),
        (json!({"input": "", "extra": 1}), 400, "invalid_field"),
    ];
    for (body, status, code) in bad {
        let answer = c.request("POST", &path, Some(&body)).expect("answer");
        assert_eq!(
            (answer.status, answer.body["error"]["code"].as_str()),
            (status, Some(code))
        );
    }
    let plain = common::raw(server.addr, "POST", &path, None, br#"{"input": ""}"#);
    assert_eq!(
        (plain.status, plain.body["error"]["code"].as_str()),
        (415, Some("unsupported_media_type"))
    );
    let missing = call(&c, "/v1/templates/tpl-999/call", b"", None);
    assert_eq!(missing.status, 404);

    // A VM keeps its state between calls; a failed call marks only that VM failed.
    let vm_path = format!("/v1/vms/{bystander}/call");
    assert_eq!(output(&call(&c, &vm_path, b"count", None)), 1u64.to_le_bytes());
    assert_eq!(output(&call(&c, &vm_path, b"count", None)), 2u64.to_le_bytes());
    let (victim, _) = template(&c, "misbehave.elf");
    let fault = call(&c, &format!("/v1/vms/{victim}/call"), b"fault", None);
    assert_eq!(fault.body["error"]["code"], "guest_fault");
    let info = c.call("GET", &format!("/v1/vms/{victim}"), None).expect("victim");
    assert_eq!(info["state"], "failed");
    let again = call(&c, &format!("/v1/vms/{victim}/call"), b"ok", None);
    assert_eq!(
        (again.status, again.body["error"]["code"].as_str()),
        (409, Some("vm_failed"))
    );
    assert_eq!(output(&call(&c, &vm_path, b"count", None)), 3u64.to_le_bytes());
    let health = c.call("GET", "/healthz", None).expect("healthz");
    assert_eq!(health["status"], "ok");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn test_builtin_template_is_not_an_abi_guest() {
    let dir = kernel_dir("builtin");
    let (_server, c) = start(&dir);
    let vm = c.call("POST", "/v1/vms", Some(&json!({"memory_mib": 16}))).expect("vm");
    let tpl = c
        .call(
            "POST",
            &format!("/v1/vms/{}/snapshot", vm["id"].as_str().expect("id")),
            None,
        )
        .expect("snapshot");
    let answer = call(
        &c,
        &format!("/v1/templates/{}/call", tpl["template_id"].as_str().expect("tpl")),
        b"",
        None,
    );
    assert_eq!(
        (answer.status, answer.body["error"]["code"].as_str()),
        (422, Some("not_abi_guest"))
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn test_calling_a_vm_that_is_not_an_abi_guest_leaves_it_usable() {
    let dir = kernel_dir("builtin-vm");
    let (_server, c) = start(&dir);
    let vm = c.call("POST", "/v1/vms", Some(&json!({"memory_mib": 16}))).expect("vm");
    let id = vm["id"].as_str().expect("id");
    let answer = call(&c, &format!("/v1/vms/{id}/call"), b"", None);
    assert_eq!(
        (answer.status, answer.body["error"]["code"].as_str()),
        (422, Some("not_abi_guest"))
    );
    let info = c.call("GET", &format!("/v1/vms/{id}"), None).expect("get");
    assert_ne!(info["state"], "failed", "{info}");
    let run = c
        .request(
            "POST",
            &format!("/v1/vms/{id}/run"),
            Some(&json!({"command": "identity"})),
        )
        .expect("run");
    assert_eq!(run.status, 200, "the VM still runs commands: {}", run.body);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn test_cli_call_writes_the_guests_output_to_a_file() {
    let dir = kernel_dir("cli");
    let (server, c) = start(&dir);
    let (_, tpl) = template(&c, "hello.elf");
    let input = dir.join("input.txt");
    let out = dir.join("output.txt");
    std::fs::write(&input, "from a file").expect("input");
    let run = Command::new(env!("CARGO_BIN_EXE_cowvm"))
        .args(["call", &tpl, "--url", &format!("http://{}", server.addr), "--input"])
        .arg(&input)
        .arg("--output")
        .arg(&out)
        .output()
        .expect("run cowvm call");
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    assert!(stderr.contains("status 0"), "{stderr}");
    assert_eq!(std::fs::read(&out).expect("output"), b"hello, from a file");
    std::fs::remove_dir_all(&dir).ok();
}
