//! A corpus of over 200 bad requests, and property-based tests over the request bodies: every
//! one gets its documented 4xx and a JSON error, nothing panics, and the server keeps serving the
//! VMs it already had.

mod common;

use std::sync::OnceLock;

use cowvm::client::{Answer, Client};
use cowvm::server::{self, Limits, RunningServer, ServerConfig};
use proptest::prelude::*;
use serde_json::{json, Value};

struct Fixture {
    server: RunningServer,
    client: Client,
    vm: String,
    clone: String,
    template: String,
}

/// The corpus's server, with a booted VM, a template and a clone of it.
fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(new_fixture)
}

/// The property tests' own server (they create VMs and may fail them).
fn prop_fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(new_fixture)
}

fn new_fixture() -> Fixture {
    {
        let limits = Limits {
            max_vms: 12,
            max_clones_per_call: 4,
            max_body_bytes: 4096,
            warm_shells: 1,
            ..Limits::default()
        };
        let server = server::start(ServerConfig {
            limits,
            ..ServerConfig::local(0)
        })
        .expect("server");
        let client = Client::new(&format!("http://{}", server.addr), None);
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
            .expect("tpl")
            .to_owned();
        let clone = client
            .call(
                "POST",
                &format!("/v1/templates/{template}/clones"),
                Some(&json!({"count": 1})),
            )
            .expect("clone")["clones"][0]["id"]
            .as_str()
            .expect("clone id")
            .to_owned();
        Fixture {
            server,
            client,
            vm,
            clone,
            template,
        }
    }
}

fn send(method: &str, path: &str, content_type: Option<&str>, body: &[u8]) -> Answer {
    send_to(fixture(), method, path, content_type, body)
}

fn send_to(f: &Fixture, method: &str, path: &str, content_type: Option<&str>, body: &[u8]) -> Answer {
    common::raw(f.server.addr, method, path, content_type, body)
}

/// A 4xx with `{"error": {"code", "message"}}`, and the code one of `codes`.
fn assert_rejected(case: &str, answer: &Answer, codes: &[&str]) {
    assert!(
        (400..500).contains(&answer.status),
        "{case}: status {} {}",
        answer.status,
        answer.body
    );
    let code = answer.body["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("{case}: no JSON error body: {}", answer.body));
    assert!(
        answer.body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{case}: empty message"
    );
    assert!(
        codes.contains(&code),
        "{case}: code {code:?}, expected one of {codes:?}: {}",
        answer.body
    );
}

const JSON: Option<&str> = Some("application/json");

/// One bad request and the error codes it may get.
struct Case {
    method: String,
    path: String,
    content_type: Option<&'static str>,
    body: Vec<u8>,
    codes: Vec<&'static str>,
}

fn corpus() -> Vec<Case> {
    let f = fixture();
    let mut cases: Vec<Case> = Vec::new();
    let mut add =
        |method: &str, path: String, content_type: Option<&'static str>, body: Vec<u8>, codes: &[&'static str]| {
            cases.push(Case {
                method: method.to_owned(),
                path,
                content_type,
                body,
                codes: codes.to_vec(),
            });
        };
    // Truncated JSON: every strict prefix of a valid body.
    let valid = br#"{"memory_mib": 16, "vcpus": 1, "warmup_mib": 0, "kernel": null}"#;
    for n in 0..valid.len() {
        add("POST", "/v1/vms".into(), JSON, valid[..n].to_vec(), &["malformed_json"]);
    }
    let count_body = br#"{"count": 2}"#;
    for n in 0..count_body.len() {
        add(
            "POST",
            format!("/v1/templates/{}/clones", f.template),
            JSON,
            count_body[..n].to_vec(),
            &["malformed_json"],
        );
    }
    // Wrong types, negative, fractional, huge and overflowing numbers, for every numeric field
    // (a whole float such as `16.0` is the number 16, as in JSON Schema, so it is not here).
    let bad_numbers = [
        "\"16\"",
        "true",
        "[]",
        "{}",
        "null",
        "-1",
        "1.5",
        "1e400",
        "18446744073709551616",
        "-2.0",
        "1e30",
        "\"\u{1F4A5}\"",
    ];
    for field in ["memory_mib", "vcpus", "warmup_mib"] {
        for v in bad_numbers {
            add(
                "POST",
                "/v1/vms".into(),
                JSON,
                format!("{{\"{field}\": {v}}}").into_bytes(),
                &["invalid_field", "malformed_json"],
            );
        }
    }
    for v in bad_numbers {
        add(
            "POST",
            format!("/v1/templates/{}/clones", f.template),
            JSON,
            format!("{{\"count\": {v}}}").into_bytes(),
            &["invalid_field", "malformed_json"],
        );
        add(
            "POST",
            format!("/v1/templates/{}/warm", f.template),
            JSON,
            format!("{{\"shells\": {v}}}").into_bytes(),
            &["invalid_field", "malformed_json"],
        );
        add(
            "POST",
            format!("/v1/vms/{}/probes/write", f.clone),
            JSON,
            format!("{{\"start_gpa\": {v}, \"pages\": 1}}").into_bytes(),
            &["invalid_field", "malformed_json"],
        );
        add(
            "POST",
            format!("/v1/vms/{}/run", f.vm),
            JSON,
            format!("{{\"command\": \"checksum\", \"count\": {v}}}").into_bytes(),
            &["invalid_field", "malformed_json"],
        );
    }
    for v in ["123", "[]", "{}", "true"] {
        add(
            "POST",
            "/v1/vms".into(),
            JSON,
            format!("{{\"kernel\": {v}}}").into_bytes(),
            &["invalid_field"],
        );
    }
    for body in [
        r#"{"memory_mb": 16}"#,
        r#"{"count": 1, "extra": 1}"#,
        r#"17"#,
        r#""text""#,
        r#"null"#,
        r#"[1, 2, 3, 4, 5]"#,
    ] {
        add(
            "POST",
            "/v1/vms".into(),
            JSON,
            body.as_bytes().to_vec(),
            &["invalid_field", "body_not_an_object"],
        );
    }
    for body in [r#"[]"#, r#"{}"#, r#"{"count": 1, "extra": 1}"#, r#"{"Count": 1}"#] {
        add(
            "POST",
            format!("/v1/templates/{}/clones", f.template),
            JSON,
            body.as_bytes().to_vec(),
            &["invalid_field", "body_not_an_object"],
        );
    }
    // Values out of range.
    for v in [0u64, 1, 3, 4097, 1 << 40] {
        add(
            "POST",
            "/v1/vms".into(),
            JSON,
            json!({"memory_mib": v}).to_string().into_bytes(),
            &["memory_out_of_range"],
        );
    }
    for v in [0u64, 5, 1000, u64::MAX] {
        add(
            "POST",
            format!("/v1/templates/{}/clones", f.template),
            JSON,
            json!({"count": v}).to_string().into_bytes(),
            &["count_out_of_range"],
        );
        add(
            "POST",
            format!("/v1/vms/{}/clones", f.vm),
            JSON,
            json!({"count": v}).to_string().into_bytes(),
            &["count_out_of_range"],
        );
    }
    add(
        "POST",
        "/v1/vms".into(),
        JSON,
        json!({"memory_mib": 16, "vcpus": 9}).to_string().into_bytes(),
        &["vcpus_out_of_range"],
    );
    add(
        "POST",
        "/v1/vms".into(),
        JSON,
        json!({"memory_mib": 16, "warmup_mib": 16}).to_string().into_bytes(),
        &["warmup_out_of_range"],
    );
    for kernel in ["k", "../../../../bin/sh", "/etc/shadow", "ñ\u{0}", &"x".repeat(100)] {
        add(
            "POST",
            "/v1/vms".into(),
            JSON,
            json!({"memory_mib": 16, "kernel": kernel}).to_string().into_bytes(),
            &["kernels_disabled"],
        );
    }
    for gpa in [
        16u64 << 20,
        (16 << 20) + 8,
        1 << 40,
        u64::MAX - 4095,
        0,
        0x9000,
        0x10_0000,
        0xfee0_0000,
    ] {
        add(
            "POST",
            format!("/v1/vms/{}/probes/write", f.clone),
            JSON,
            json!({"gpas": [gpa]}).to_string().into_bytes(),
            &["address_out_of_range"],
        );
        add(
            "POST",
            format!("/v1/vms/{}/run", f.vm),
            JSON,
            json!({"command": "write", "start_gpa": gpa, "count": 1})
                .to_string()
                .into_bytes(),
            &["address_out_of_range"],
        );
    }
    add(
        "POST",
        format!("/v1/vms/{}/probes/write", f.clone),
        JSON,
        json!({"gpas": []}).to_string().into_bytes(),
        &["count_out_of_range"],
    );
    add(
        "POST",
        format!("/v1/vms/{}/probes/write", f.clone),
        JSON,
        json!({"gpas": [8 << 20, (8 << 20) + 16]}).to_string().into_bytes(),
        &["invalid_targets"],
    );
    add(
        "POST",
        format!("/v1/vms/{}/probes/write", f.clone),
        JSON,
        json!({"start_gpa": 8 << 20, "pages": 2, "stride": 8})
            .to_string()
            .into_bytes(),
        &["invalid_targets"],
    );
    add(
        "POST",
        format!("/v1/vms/{}/probes/write", f.clone),
        JSON,
        json!({"start_gpa": 8 << 20, "pages": 5000}).to_string().into_bytes(),
        &["count_out_of_range"],
    );
    add(
        "POST",
        format!("/v1/vms/{}/run", f.vm),
        JSON,
        json!({"command": "checksum", "start_gpa": 8 << 20, "count": 2_000_000})
            .to_string()
            .into_bytes(),
        &["count_out_of_range"],
    );
    add(
        "POST",
        format!("/v1/vms/{}/run", f.vm),
        JSON,
        json!({"command": "checksum", "start_gpa": (8 << 20) + 1, "count": 1})
            .to_string()
            .into_bytes(),
        &["misaligned"],
    );
    for command in ["", "EXIT", "rm -rf /", "spin ", "\u{202e}exit", &"z".repeat(500)] {
        add(
            "POST",
            format!("/v1/vms/{}/run", f.vm),
            JSON,
            json!({"command": command}).to_string().into_bytes(),
            &["invalid_field"],
        );
    }
    add(
        "POST",
        format!("/v1/vms/{}/reset", f.vm),
        None,
        vec![],
        &["not_a_clone"],
    );
    // Unknown, odd and hostile ids; unknown routes.
    let long = "v".repeat(2000);
    for id in [
        "vm-0",
        "vm-999999",
        "vm-99999999999999999999999",
        "vm--1",
        "VM-1",
        "tpl-1",
        "vm-1%2F..%2F..",
        "..%2F..%2Fetc%2Fpasswd",
        "%00",
        "%E2%9C%93",
        "vm-1%20",
        long.as_str(),
    ] {
        for (method, suffix) in [
            ("GET", ""),
            ("DELETE", ""),
            ("GET", "/stats"),
            ("POST", "/reset"),
            ("POST", "/snapshot"),
        ] {
            add(method, format!("/v1/vms/{id}{suffix}"), None, vec![], &["not_found"]);
        }
        if id != f.template {
            add("GET", format!("/v1/templates/{id}"), None, vec![], &["not_found"]);
            add(
                "POST",
                format!("/v1/templates/{id}/clones"),
                JSON,
                br#"{"count": 1}"#.to_vec(),
                &["not_found"],
            );
        }
    }
    for path in [
        "/",
        "/v1",
        "/v2/vms",
        "/v1/vms/",
        "/v1/vms/vm-1/nothing",
        "/v1/templates/tpl-1/stats/more",
        "/metrics/x",
        "/openapi.yaml",
    ] {
        add("GET", path.into(), None, vec![], &["route_not_found"]);
    }
    // Wrong methods.
    for (method, path) in [
        ("PUT", "/v1/vms".to_owned()),
        ("PATCH", "/v1/vms".to_owned()),
        ("DELETE", "/v1/vms".to_owned()),
        ("PUT", format!("/v1/vms/{}", f.vm)),
        ("GET", format!("/v1/vms/{}/snapshot", f.vm)),
        ("GET", format!("/v1/vms/{}/reset", f.vm)),
        ("DELETE", format!("/v1/vms/{}/stats", f.vm)),
        ("GET", format!("/v1/templates/{}/clones", f.template)),
        ("PUT", format!("/v1/templates/{}", f.template)),
        ("POST", "/healthz".to_owned()),
        ("POST", "/openapi.json".to_owned()),
        ("DELETE", "/metrics".to_owned()),
    ] {
        add(method, path, JSON, b"{}".to_vec(), &["method_not_allowed"]);
    }
    // Wrong content types and oversized bodies.
    for ct in [
        None,
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        Some("application/xml"),
        Some("multipart/form-data"),
    ] {
        add(
            "POST",
            "/v1/vms".into(),
            ct,
            br#"{"memory_mib": 16}"#.to_vec(),
            &["unsupported_media_type"],
        );
        add(
            "POST",
            format!("/v1/templates/{}/clones", f.template),
            ct,
            br#"{"count": 1}"#.to_vec(),
            &["unsupported_media_type"],
        );
    }
    for size in [4097usize, 16384, 60000] {
        let mut body = br#"{"memory_mib": 16, "kernel": ""#.to_vec();
        body.extend(std::iter::repeat_n(b'a', size));
        body.extend_from_slice(br#""}"#);
        add("POST", "/v1/vms".into(), JSON, body, &["body_too_large"]);
    }
    cases
}

#[test]
fn test_a_corpus_of_over_200_bad_requests_gets_4xx_json_errors_and_the_server_keeps_serving() {
    let f = fixture();
    let cases = corpus();
    assert!(cases.len() >= 200, "only {} cases", cases.len());
    for case in &cases {
        let shown: String = case.path.chars().take(80).collect();
        let answer = send(&case.method, &case.path, case.content_type, &case.body);
        assert_rejected(
            &format!("{} {shown} ({} bytes)", case.method, case.body.len()),
            &answer,
            &case.codes,
        );
    }
    let exit = f
        .client
        .call(
            "POST",
            &format!("/v1/vms/{}/run", f.vm),
            Some(&json!({"command": "exit"})),
        )
        .expect("the VM still works");
    assert_eq!(exit["status"], 0);
    let clone = f
        .client
        .call("GET", &format!("/v1/vms/{}", f.clone), None)
        .expect("the clone is still there");
    assert_eq!(clone["state"], "running");
    let metrics = f.client.request("GET", "/metrics", None).expect("metrics");
    let text = metrics.body.as_str().unwrap_or_default();
    assert!(
        text.contains("cowvm_http_responses_total{class=\"5xx\"} 0"),
        "no bad request got a 5xx:\n{text}"
    );
    eprintln!(
        "{} bad requests, each answered with its 4xx and a JSON error",
        cases.len()
    );
}

fn arbitrary_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        "[ -~]{0,20}".prop_map(Value::from),
        "\\PC{0,10}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        let keys = prop_oneof![
            Just("memory_mib".to_owned()),
            Just("vcpus".to_owned()),
            Just("warmup_mib".to_owned()),
            Just("kernel".to_owned()),
            Just("count".to_owned()),
            Just("shells".to_owned()),
            Just("gpas".to_owned()),
            Just("start_gpa".to_owned()),
            Just("pages".to_owned()),
            Just("stride".to_owned()),
            Just("command".to_owned()),
            Just("input".to_owned()),
            Just("timeout_ms".to_owned()),
            "[a-z_]{1,8}",
        ];
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map(keys, inner, 0..4).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn prop_arbitrary_json_bodies_never_get_a_5xx(body in arbitrary_json(), endpoint in 0usize..7) {
        let f = prop_fixture();
        let path = match endpoint {
            0 => "/v1/vms".to_owned(),
            1 => format!("/v1/templates/{}/clones", f.template),
            2 => format!("/v1/templates/{}/warm", f.template),
            3 => format!("/v1/vms/{}/probes/write", f.clone),
            4 => format!("/v1/vms/{}/run", f.vm),
            5 => format!("/v1/templates/{}/call", f.template),
            _ => format!("/v1/vms/{}/clones", f.vm),
        };
        let answer = send_to(f, "POST", &path, JSON, body.to_string().as_bytes());
        prop_assert!(answer.status < 500, "{} {} -> {} {}", path, body, answer.status, answer.body);
        if answer.status >= 400 {
            prop_assert!(answer.body["error"]["code"].is_string(), "{} {} -> no JSON error: {}", path, body, answer.body);
        }
        // Whatever the request did, the first VM keeps working (unless the body ran a faulting
        // command on it, which marks it failed with a 409 — still not a 5xx).
        let health = f.client.request("GET", "/healthz", None).expect("health");
        prop_assert_eq!(health.status, 200);
    }

    #[test]
    fn prop_arbitrary_ids_are_404_never_5xx(id in "\\PC{1,40}") {
        let encoded: String = id.bytes().map(|b| format!("%{b:02X}")).collect();
        for suffix in ["", "/stats", "/reset"] {
            let method = if suffix == "/reset" { "POST" } else { "GET" };
            let answer = send_to(prop_fixture(), method, &format!("/v1/vms/{encoded}{suffix}"), None, b"");
            prop_assert!(answer.status == 404 || answer.status == 400, "{} -> {} {}", id, answer.status, answer.body);
            prop_assert!(answer.body["error"]["code"].is_string());
        }
    }
}
