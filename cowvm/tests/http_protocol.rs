//! The HTTP layer below the handlers, spoken to over raw TCP where a client library would hide
//! it: JSON bodies on the errors hyper answers itself (400/414/431), the header-read timeout,
//! the `Authorization` scheme and `WWW-Authenticate`, bodies that are JSON but not objects,
//! client-facing error messages, and the `--token-file` checks of `cowvm serve`.

#[path = "../../api/tests/common/mod.rs"]
mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use cowvm::client::Client;
use cowvm::server::{self, Limits, RunningServer, ServerConfig};
use serde_json::{json, Value};

fn start(config: ServerConfig) -> (RunningServer, Client) {
    let server = server::start(config).expect("server starts");
    let client = Client::new(&format!("http://{}", server.addr), None);
    (server, client)
}

fn small() -> ServerConfig {
    ServerConfig {
        limits: Limits {
            max_vms: 4,
            warm_shells: 0,
            ..Limits::default()
        },
        ..ServerConfig::local(0)
    }
}

/// Sends `request` as is and reads the whole answer (the server closes after these errors).
fn exchange(addr: SocketAddr, request: &[u8]) -> (String, String) {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    // The server may answer and close before it has read everything; that is fine.
    let _ = stream.write_all(request);
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    (head.to_owned(), body.to_owned())
}

fn assert_json_error(head: &str, body: &str, status: u16, code: &str) {
    assert!(
        head.starts_with(&format!("HTTP/1.1 {status} ")),
        "status {status}: {head}"
    );
    assert!(
        head.to_ascii_lowercase().contains("content-type: application/json"),
        "{head}"
    );
    let json: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("JSON body ({e}): {body:?}"));
    assert_eq!(json["error"]["code"], code, "{json}");
    assert!(
        json["error"]["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{json}"
    );
}

#[test]
fn test_errors_hyper_answers_itself_414_431_400_have_json_bodies() {
    let (server, _) = start(small());
    let long_uri = format!("GET /v1/vms/{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(70_000));
    let (head, body) = exchange(server.addr, long_uri.as_bytes());
    assert_json_error(&head, &body, 414, "uri_too_long");

    let many_headers: String = (0..200).map(|i| format!("X-H{i}: v\r\n")).collect();
    let request = format!("GET /healthz HTTP/1.1\r\nHost: x\r\n{many_headers}\r\n");
    let (head, body) = exchange(server.addr, request.as_bytes());
    assert_json_error(&head, &body, 431, "headers_too_large");

    let huge_header = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "b".repeat(600_000)
    );
    let (head, body) = exchange(server.addr, huge_header.as_bytes());
    assert_json_error(&head, &body, 431, "headers_too_large");

    let (head, body) = exchange(server.addr, b"NOT HTTP\x01 AT ALL\r\n\r\n");
    assert_json_error(&head, &body, 400, "bad_request");

    // The server still serves, with its ordinary answers unchanged.
    let (head, body) = exchange(
        server.addr,
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    assert!(body.contains("\"status\":\"ok\""), "{body}");
    server.stop().expect("stop");
}

#[test]
fn test_a_client_trickling_its_headers_is_cut_off_at_the_header_timeout() {
    let (server, _) = start(ServerConfig {
        header_timeout: Duration::from_millis(500),
        ..small()
    });
    let mut stream = TcpStream::connect(server.addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_millis(50)))
        .expect("timeout");
    let started = Instant::now();
    let request = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let mut closed = false;
    // One byte every 100 ms: a whole head never arrives. Without a header timeout hyper would keep
    // the connection for as long as the bytes keep coming (here 60 s).
    for i in 0..600 {
        let byte = request.get(i).copied().unwrap_or(b'a');
        if stream.write_all(&[byte]).is_err() {
            closed = true;
            break;
        }
        let mut buf = [0u8; 64];
        match stream.read(&mut buf) {
            Ok(0) => {
                closed = true;
                break;
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => {
                closed = true;
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(closed, "the connection was still open after {:?}", started.elapsed());
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "not closed before the timeout"
    );
    server.stop().expect("stop");
}

#[test]
fn test_bearer_scheme_is_case_insensitive_and_401_says_www_authenticate_bearer() {
    let (server, _) = start(ServerConfig {
        token: Some("s3cret".into()),
        ..small()
    });
    let get = |authorization: Option<&str>| {
        let line = authorization
            .map(|a| format!("Authorization: {a}\r\n"))
            .unwrap_or_default();
        exchange(
            server.addr,
            format!("GET /healthz HTTP/1.1\r\nHost: x\r\n{line}Connection: close\r\n\r\n").as_bytes(),
        )
    };
    for accepted in ["Bearer s3cret", "bearer s3cret", "BEARER s3cret", "bEaReR   s3cret"] {
        let (head, _) = get(Some(accepted));
        assert!(head.starts_with("HTTP/1.1 200 "), "{accepted}: {head}");
    }
    for refused in [
        None,
        Some("Bearer wrong"),
        Some("Basic s3cret"),
        Some("Bearers3cret"),
        Some("s3cret"),
    ] {
        let (head, body) = get(refused);
        assert_json_error(&head, &body, 401, "unauthorized");
        assert!(
            head.lines()
                .any(|l| l.to_ascii_lowercase().starts_with("www-authenticate: bearer")),
            "{refused:?}: {head}"
        );
    }
    server.stop().expect("stop");
}

#[test]
fn test_a_json_body_that_is_not_an_object_is_a_400_and_creates_nothing() {
    let (server, client) = start(small());
    let vm = client
        .call("POST", "/v1/vms", Some(&json!({"memory_mib": 16})))
        .expect("vm")["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let template = client
        .call("POST", &format!("/v1/vms/{vm}/snapshot"), None)
        .expect("snapshot")["template_id"]
        .as_str()
        .expect("template id")
        .to_owned();
    let paths = [
        "/v1/vms".to_owned(),
        format!("/v1/vms/{vm}/clones"),
        format!("/v1/vms/{vm}/run"),
        format!("/v1/vms/{vm}/probes/write"),
        format!("/v1/templates/{template}/clones"),
        format!("/v1/templates/{template}/warm"),
    ];
    for path in &paths {
        for body in [
            "[]",
            "[16]",
            "[\"identity\"]",
            " [1, 2] ",
            "16",
            "\"x\"",
            "null",
            "true",
        ] {
            let answer = common::raw(server.addr, "POST", path, Some("application/json"), body.as_bytes());
            assert_eq!(answer.status, 400, "{path} {body}: {}", answer.body);
            assert_eq!(answer.body["error"]["code"], "body_not_an_object", "{path} {body}");
        }
    }
    let vms = client.call("GET", "/v1/vms", None).expect("list");
    assert_eq!(vms.as_array().map(Vec::len), Some(1), "nothing was created: {vms}");
    let templates = client.call("GET", "/v1/templates", None).expect("list");
    assert_eq!(templates.as_array().map(Vec::len), Some(1), "{templates}");
    // Malformed JSON keeps its own error, and objects still work.
    let answer = common::raw(server.addr, "POST", "/v1/vms", Some("application/json"), b"[16");
    assert_eq!(answer.body["error"]["code"], "malformed_json", "{}", answer.body);
    let answer = common::raw(
        server.addr,
        "POST",
        &paths[2],
        Some("application/json"),
        br#"{"command":"identity"}"#,
    );
    assert_eq!(answer.status, 200, "{}", answer.body);
    server.stop().expect("stop");
}

#[test]
fn test_a_kernel_that_does_not_load_is_named_as_sent_in_a_one_line_message() {
    let dir = std::env::temp_dir().join(format!("cowvm-kernels-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(
        dir.join("garbage"),
        b"this is not an ELF file at all, just some bytes\n".repeat(20),
    )
    .expect("write");
    let (server, client) = start(ServerConfig {
        kernel_dir: Some(dir.clone()),
        ..small()
    });
    let answer = client
        .request("POST", "/v1/vms", Some(&json!({"memory_mib": 16, "kernel": "garbage"})))
        .expect("request");
    assert_eq!(answer.status, 422, "{}", answer.body);
    assert_eq!(answer.body["error"]["code"], "bad_kernel");
    let message = answer.body["error"]["message"].as_str().expect("message");
    assert!(message.contains("\"garbage\""), "names what was sent: {message}");
    assert!(!message.contains('\n'), "one line: {message:?}");
    assert!(!message.contains("GuestAddress"), "no Debug dump: {message}");
    let server_path = dir.to_string_lossy();
    assert!(
        !message.contains(&*server_path) && !message.contains("/tmp"),
        "no server path: {message}"
    );
    server.stop().expect("stop");
    std::fs::remove_dir_all(&dir).ok();
}

/// Runs `cowvm serve --token-file <file>` and returns its exit status and stderr; a server that
/// has not exited after 20 s is killed and counts as hanging.
fn serve_with_token_file(file: &std::path::Path) -> (Option<i32>, String) {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_cowvm"))
        .args(["serve", "--listen", "127.0.0.1:0", "--token-file"])
        .arg(file)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(20) {
        if let Some(status) = child.try_wait().expect("wait") {
            let mut stderr = String::new();
            child.stderr.take().expect("stderr").read_to_string(&mut stderr).ok();
            return (status.code(), stderr);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().ok();
    child.wait().ok();
    (None, "still running: it hung".into())
}

#[test]
fn test_token_files_that_are_not_private_regular_files_are_refused_without_blocking() {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("cowvm-token-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");

    let fifo = dir.join("fifo");
    let c_path = std::ffi::CString::new(fifo.to_string_lossy().as_bytes()).expect("path");
    // SAFETY: mkfifo with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0, "mkfifo");
    let (code, stderr) = serve_with_token_file(&fifo);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("not a regular file"), "{stderr}");

    let (code, stderr) = serve_with_token_file(&dir);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("not a regular file"), "{stderr}");

    let (code, stderr) = serve_with_token_file(std::path::Path::new("/dev/zero"));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("not a regular file"), "{stderr}");

    let readable = dir.join("readable");
    std::fs::write(&readable, "tok\n").expect("write");
    std::fs::set_permissions(&readable, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let (code, stderr) = serve_with_token_file(&readable);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("chmod 600"), "{stderr}");

    std::fs::remove_dir_all(&dir).ok();
}
