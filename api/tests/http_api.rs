//! The HTTP API over real HTTP on 127.0.0.1: the whole flow, every error class with its status
//! and JSON body, the OpenAPI document, the token, a spinning guest, metrics.

mod common;

use std::time::Duration;

use cowvm::client::{Answer, Client};
use cowvm::server::{self, ApiDoc, Limits, RunningServer, ServerConfig, SpecOptions};
use serde_json::{json, Value};

fn start(limits: Limits) -> (RunningServer, Client) {
    let config = ServerConfig {
        limits,
        ..ServerConfig::local(0)
    };
    let server = server::start(config).expect("server starts");
    let client = Client::new(&format!("http://{}", server.addr), None);
    (server, client)
}

fn small() -> Limits {
    Limits {
        max_memory_mib: 512,
        warm_shells: 2,
        guest_deadline: Duration::from_millis(500),
        ..Limits::default()
    }
}

fn ok(client: &Client, method: &str, path: &str, body: Option<Value>, status: u16) -> Value {
    let answer = client.request(method, path, body.as_ref()).expect("request");
    assert_eq!(answer.status, status, "{method} {path}: {}", answer.body);
    answer.body
}

fn expect_error(answer: Answer, status: u16, code: &str) {
    assert_eq!(answer.status, status, "{}", answer.body);
    assert_eq!(answer.body["error"]["code"], code, "{}", answer.body);
    assert!(
        answer.body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{}",
        answer.body
    );
}

/// Sends raw bytes with a content type.
fn raw(server: &RunningServer, method: &str, path: &str, content_type: Option<&str>, body: &[u8]) -> Answer {
    common::raw(server.addr, method, path, content_type, body)
}

#[test]
fn test_the_whole_flow_over_http() {
    let (server, c) = start(small());
    let vm = ok(
        &c,
        "POST",
        "/v1/vms",
        Some(json!({"memory_mib": 64, "vcpus": 1, "warmup_mib": 8, "kernel": null})),
        201,
    );
    let vm_id = vm["id"].as_str().expect("id").to_owned();
    assert_eq!(
        (vm["memory_mib"].as_u64(), vm["state"].as_str()),
        (Some(64), Some("running"))
    );
    assert_eq!(ok(&c, "GET", "/v1/vms", None, 200).as_array().map(Vec::len), Some(1));
    assert_eq!(ok(&c, "GET", &format!("/v1/vms/{vm_id}"), None, 200)["id"], vm_id);

    let snap = ok(&c, "POST", &format!("/v1/vms/{vm_id}/snapshot"), None, 201);
    let tpl = snap["template_id"].as_str().expect("template id").to_owned();
    assert_eq!(ok(&c, "GET", "/v1/templates", None, 200)[0]["id"], tpl);

    let made = ok(
        &c,
        "POST",
        &format!("/v1/templates/{tpl}/clones"),
        Some(json!({"count": 5})),
        201,
    );
    let clones: Vec<String> = made["clones"]
        .as_array()
        .expect("clones")
        .iter()
        .map(|c| c["id"].as_str().expect("id").to_owned())
        .collect();
    assert_eq!(clones.len(), 5);
    assert!(made["failed"].as_array().is_some_and(Vec::is_empty));
    assert!(made["clones"][0]["spawn_us"].as_f64().is_some_and(|s| s > 0.0));

    let fork = ok(
        &c,
        "POST",
        &format!("/v1/vms/{vm_id}/clones"),
        Some(json!({"count": 2})),
        201,
    );
    assert!(fork["pause_us"].as_f64().is_some_and(|p| p > 0.0));
    assert_ne!(fork["template_id"], tpl);
    assert_eq!(fork["clones"].as_array().map(Vec::len), Some(2));

    let first = &clones[0];
    let run = ok(
        &c,
        "POST",
        &format!("/v1/vms/{first}/run"),
        Some(json!({"command": "checksum", "start_gpa": 8 << 20, "count": 10, "stride": 4096})),
        200,
    );
    assert_eq!(run["status"], 0);
    let probe = ok(
        &c,
        "POST",
        &format!("/v1/vms/{first}/probes/write"),
        Some(json!({"start_gpa": 8 << 20, "pages": 10, "stride": 4096})),
        200,
    );
    assert_eq!(
        (probe["written"].as_u64(), probe["became_private"].as_u64()),
        (Some(10), Some(10))
    );
    assert!(probe["host_cow_us"]["p50"].as_f64().is_some_and(|v| v > 0.0));
    let listed = ok(
        &c,
        "POST",
        &format!("/v1/vms/{}/probes/write", clones[1]),
        Some(json!({"gpas": [12 << 20, (12 << 20) + 8192]})),
        200,
    );
    assert_eq!(listed["written"], 2);

    let stats = ok(&c, "GET", &format!("/v1/vms/{first}/stats"), None, 200);
    assert_eq!(stats["pages"]["total"], 64 * 256);
    assert_eq!(stats["pages"]["private"], 10);
    for key in ["present", "template_backed", "shared", "zero", "untouched"] {
        assert!(stats["pages"][key].is_u64(), "{key}");
    }
    assert!(stats["kvm"]["vm"].is_object());
    let tstats = ok(&c, "GET", &format!("/v1/templates/{tpl}/stats"), None, 200);
    assert_eq!(tstats["clones"], 5);
    assert_eq!(tstats["private_bytes"], 12 * 4096, "10 + 2 probed pages");
    let copied = tstats["copied_pages"].as_array().expect("copied_pages");
    assert_eq!(copied.len(), 12);
    assert!(copied.iter().all(|p| p["clones_copied"] == 1), "{copied:?}");
    assert_eq!(tstats["full_copy_bytes"], 5 * (64 << 20), "the naive baseline");
    let populated = tstats["populated_pages"].as_u64().expect("populated_pages");
    assert!(populated >= 2048, "8 MiB of warm-up data: {populated}");
    let saved = tstats["saved_bytes"].as_u64().expect("saved_bytes");
    assert!(
        saved <= 5 * populated * 4096,
        "saved {saved} is bounded by what the template holds"
    );
    for key in ["pages_shared_by_all", "mapped_bytes", "own_bytes", "warm_shells"] {
        assert!(tstats[key].is_u64(), "{key}");
    }

    let reset = ok(&c, "POST", &format!("/v1/vms/{first}/reset"), None, 200);
    // By swap when a warm shell is ready (the used VM's pages go in the background), else in
    // place; either way the VM has no private page afterwards.
    let dropped = if reset["swapped"] == true { 0 } else { 10 };
    assert_eq!(reset["pages_dropped"], dropped, "{reset}");
    assert!(reset["reset_us"].as_f64().is_some_and(|v| v > 0.0));
    let after = ok(&c, "GET", &format!("/v1/vms/{first}/stats"), None, 200);
    assert_eq!(after["pages"]["private"], 0);

    expect_error(
        c.request("DELETE", &format!("/v1/templates/{tpl}"), None).expect("req"),
        409,
        "template_in_use",
    );
    for id in &clones {
        ok(&c, "DELETE", &format!("/v1/vms/{id}"), None, 204);
    }
    ok(&c, "DELETE", &format!("/v1/templates/{tpl}"), None, 204);
    ok(&c, "DELETE", &format!("/v1/vms/{vm_id}"), None, 204);
    expect_error(
        c.request("GET", &format!("/v1/vms/{vm_id}"), None).expect("req"),
        404,
        "not_found",
    );
    server.stop().expect("stop");
}

#[test]
fn test_every_error_class_has_its_status_and_a_json_body() {
    let limits = Limits {
        max_vms: 3,
        max_clones_per_call: 10,
        max_body_bytes: 1024,
        ..small()
    };
    let (server, c) = start(limits);
    let vm = ok(&c, "POST", "/v1/vms", Some(json!({"memory_mib": 16})), 201);
    let id = vm["id"].as_str().expect("id").to_owned();

    let json = Some("application/json");
    let huge = format!("{{\"memory_mib\": 16, \"kernel\": \"{}\"}}", "x".repeat(4096));
    let raw_cases: [(Option<&str>, &[u8], u16, &str); 8] = [
        (json, b"{\"memory_mib\": 16", 400, "malformed_json"),
        (json, b"{\"memory_mib\": \"lots\"}", 400, "invalid_field"),
        (json, b"{\"memory_mb\": 16}", 400, "invalid_field"),
        (json, b"{\"memory_mib\": -5}", 400, "invalid_field"),
        (json, b"{\"memory_mib\": 1.5}", 400, "invalid_field"),
        (Some("text/plain"), b"{}", 415, "unsupported_media_type"),
        (None, b"{}", 415, "unsupported_media_type"),
        (json, huge.as_bytes(), 413, "body_too_large"),
    ];
    for (content_type, body, status, code) in raw_cases {
        expect_error(raw(&server, "POST", "/v1/vms", content_type, body), status, code);
    }
    expect_error(c.request("GET", "/v1/vms/vm-999", None).expect("req"), 404, "not_found");
    expect_error(
        c.request("GET", &format!("/v1/vms/{}", "é".repeat(300)), None)
            .expect("req"),
        404,
        "not_found",
    );
    expect_error(
        c.request("GET", "/v1/templates/..%2F..%2Fetc%2Fpasswd", None)
            .expect("req"),
        404,
        "not_found",
    );
    expect_error(
        c.request("GET", "/v1/nothing-here", None).expect("req"),
        404,
        "route_not_found",
    );
    expect_error(
        c.request("DELETE", "/v1/templates", None).expect("req"),
        405,
        "method_not_allowed",
    );
    expect_error(
        raw(&server, "PUT", "/v1/vms", Some("application/json"), b"{}"),
        405,
        "method_not_allowed",
    );
    expect_error(
        c.request("POST", "/v1/vms", Some(&json!({"memory_mib": 100000})))
            .expect("req"),
        422,
        "memory_out_of_range",
    );
    expect_error(
        c.request("POST", "/v1/vms", Some(&json!({"memory_mib": 2})))
            .expect("req"),
        422,
        "memory_out_of_range",
    );
    expect_error(
        c.request("POST", "/v1/vms", Some(&json!({"memory_mib": 16, "vcpus": 9})))
            .expect("req"),
        422,
        "vcpus_out_of_range",
    );
    expect_error(
        c.request(
            "POST",
            "/v1/vms",
            Some(&json!({"memory_mib": 16, "kernel": "../../bin/sh"})),
        )
        .expect("req"),
        422,
        "kernels_disabled",
    );
    let outside = json!({"start_gpa": 64u64 << 20, "pages": 1, "stride": 4096});
    expect_error(
        c.request("POST", &format!("/v1/vms/{id}/probes/write"), Some(&outside))
            .expect("req"),
        422,
        "address_out_of_range",
    );
    let tables = json!({"gpas": [0x9000]});
    expect_error(
        c.request("POST", &format!("/v1/vms/{id}/probes/write"), Some(&tables))
            .expect("req"),
        422,
        "address_out_of_range",
    );
    expect_error(
        c.request(
            "POST",
            &format!("/v1/vms/{id}/run"),
            Some(&json!({"command": "explode"})),
        )
        .expect("req"),
        400,
        "invalid_field",
    );
    expect_error(
        c.request("POST", &format!("/v1/vms/{id}/reset"), None).expect("req"),
        409,
        "not_a_clone",
    );

    let tpl = ok(&c, "POST", &format!("/v1/vms/{id}/snapshot"), None, 201)["template_id"]
        .as_str()
        .expect("tpl")
        .to_owned();
    for count in [json!(0), json!(11), json!(1u64 << 40)] {
        expect_error(
            c.request(
                "POST",
                &format!("/v1/templates/{tpl}/clones"),
                Some(&json!({"count": count})),
            )
            .expect("req"),
            422,
            "count_out_of_range",
        );
    }
    ok(
        &c,
        "POST",
        &format!("/v1/templates/{tpl}/clones"),
        Some(json!({"count": 2})),
        201,
    );
    expect_error(
        c.request(
            "POST",
            &format!("/v1/templates/{tpl}/clones"),
            Some(&json!({"count": 1})),
        )
        .expect("req"),
        429,
        "too_many_vms",
    );
    expect_error(
        c.request("POST", "/v1/vms", Some(&json!({"memory_mib": 16})))
            .expect("req"),
        429,
        "too_many_vms",
    );

    let metrics = c.request("GET", "/metrics", None).expect("metrics");
    let text = metrics.body.as_str().expect("text").to_owned();
    assert!(
        text.contains("cowvm_vms{kind=\"clone\"} 2") && text.contains("cowvm_http_responses_total{class=\"4xx\"}"),
        "{text}"
    );
    assert!(
        !text.contains("class=\"5xx\"} 1"),
        "no bad input was answered with a 5xx: {text}"
    );
    assert_eq!(ok(&c, "GET", "/healthz", None, 200)["status"], "ok");
    server.stop().expect("stop");
}

#[test]
fn test_openapi_document_lists_every_endpoint() {
    let (server, c) = start(small());
    let doc = ok(&c, "GET", "/openapi.json", None, 200);
    assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")));
    let expected = [
        ("/v1/vms", "post"),
        ("/v1/vms", "get"),
        ("/v1/vms/{id}", "get"),
        ("/v1/vms/{id}", "delete"),
        ("/v1/vms/{id}/snapshot", "post"),
        ("/v1/vms/{id}/clones", "post"),
        ("/v1/vms/{id}/reset", "post"),
        ("/v1/vms/{id}/probes/write", "post"),
        ("/v1/vms/{id}/stats", "get"),
        ("/v1/vms/{id}/run", "post"),
        ("/v1/vms/{id}/call", "post"),
        ("/v1/templates", "get"),
        ("/v1/templates/{id}", "get"),
        ("/v1/templates/{id}", "delete"),
        ("/v1/templates/{id}/clones", "post"),
        ("/v1/templates/{id}/stats", "get"),
        ("/v1/templates/{id}/warm", "post"),
        ("/v1/templates/{id}/call", "post"),
        ("/v1/templates/{id}/export", "get"),
        ("/v1/templates/import", "post"),
        ("/v1/cells", "get"),
        ("/openapi.json", "get"),
        ("/metrics", "get"),
        ("/healthz", "get"),
    ];
    for (path, method) in expected {
        assert!(
            doc["paths"][path][method].is_object(),
            "{method} {path} missing from /openapi.json"
        );
    }
    let documented: usize = doc["paths"]
        .as_object()
        .expect("paths")
        .values()
        .map(|p| p.as_object().map_or(0, |m| m.len()))
        .sum();
    assert_eq!(
        documented,
        expected.len(),
        "no undocumented extras and no missing endpoint"
    );
    let described = server::openapi_document(&SpecOptions {
        limits: small(),
        token: false,
        kernels: false,
    });
    assert_eq!(described, doc, "the served document describes this server");
    server.stop().expect("stop");
}

/// The statuses each operation documents, as `/openapi.json` lists them.
fn documented_statuses(doc: &Value, path: &str, method: &str) -> Vec<u16> {
    let responses = doc["paths"][path][method]["responses"].as_object();
    let mut statuses: Vec<u16> = responses
        .map(|r| r.keys().filter_map(|k| k.parse().ok()).collect())
        .unwrap_or_default();
    statuses.sort_unstable();
    statuses
}

#[test]
fn test_openapi_tells_the_truth_statuses_bounds_security_and_unsigned_integers() {
    let limits = Limits::default();
    let doc = server::openapi_document(&SpecOptions {
        limits: limits.clone(),
        token: true,
        kernels: false,
    });
    let expected: &[(&str, &str, &[u16])] = &[
        ("/v1/vms", "post", &[201, 400, 401, 413, 415, 422, 429, 503]),
        ("/v1/vms", "get", &[200, 401]),
        ("/v1/vms/{id}", "get", &[200, 400, 401, 404]),
        ("/v1/vms/{id}", "delete", &[204, 400, 401, 404, 503]),
        ("/v1/vms/{id}/snapshot", "post", &[201, 400, 401, 404, 409, 503]),
        (
            "/v1/vms/{id}/clones",
            "post",
            &[201, 400, 401, 404, 409, 413, 415, 422, 429, 503],
        ),
        ("/v1/vms/{id}/reset", "post", &[200, 400, 401, 404, 409, 503]),
        (
            "/v1/vms/{id}/probes/write",
            "post",
            &[200, 400, 401, 404, 409, 413, 415, 422, 429, 503],
        ),
        ("/v1/vms/{id}/stats", "get", &[200, 400, 401, 404, 409, 503]),
        (
            "/v1/vms/{id}/run",
            "post",
            &[200, 400, 401, 404, 409, 413, 415, 422, 503],
        ),
        ("/v1/templates", "get", &[200, 401]),
        ("/v1/templates/{id}", "get", &[200, 400, 401, 404]),
        ("/v1/templates/{id}", "delete", &[204, 400, 401, 404, 409, 503]),
        (
            "/v1/templates/{id}/clones",
            "post",
            &[201, 400, 401, 404, 409, 413, 415, 422, 429, 503],
        ),
        ("/v1/templates/{id}/stats", "get", &[200, 400, 401, 404, 503]),
        ("/v1/templates/{id}/warm", "post", &[200, 400, 401, 404, 413, 415, 422]),
    ];
    for (path, method, statuses) in expected {
        assert_eq!(&documented_statuses(&doc, path, method), statuses, "{method} {path}");
        for status in statuses.iter().filter(|s| **s >= 400) {
            let body = &doc["paths"][path][method]["responses"][status.to_string()]["content"]["application/json"]
                ["schema"]["$ref"];
            assert_eq!(body, "#/components/schemas/ErrorBody", "{method} {path} {status}");
        }
    }
    assert_eq!(doc["components"]["securitySchemes"]["bearer"]["scheme"], "bearer");
    assert_eq!(doc["components"]["securitySchemes"]["bearer"]["type"], "http");
    assert_eq!(doc["security"], json!([{"bearer": []}]));
    let www = &doc["paths"]["/v1/vms"]["get"]["responses"]["401"]["headers"]["WWW-Authenticate"];
    assert!(www.is_object(), "401 documents WWW-Authenticate");

    let schemas = &doc["components"]["schemas"];
    let field = |schema: &str, name: &str| schemas[schema]["properties"][name].clone();
    let bounds = |schema: &str, name: &str| {
        (
            field(schema, name)["minimum"].clone(),
            field(schema, name)["maximum"].clone(),
        )
    };
    assert_eq!(
        bounds("CreateVm", "memory_mib"),
        (json!(4), json!(limits.max_memory_mib))
    );
    assert_eq!(bounds("CreateVm", "vcpus"), (json!(1), json!(limits.max_vcpus)));
    assert_eq!(
        bounds("CloneRequest", "count"),
        (json!(1), json!(limits.max_clones_per_call))
    );
    assert_eq!(bounds("WarmRequest", "shells"), (json!(0), json!(limits.max_vms)));
    assert_eq!(field("ProbeList", "gpas")["minItems"], 1);
    assert_eq!(
        field("RunCommand", "command")["enum"],
        json!(["exit", "write", "checksum", "identity", "triple_fault", "spin", "halt"])
    );
    assert_eq!(
        field("CreateVm", "kernel")["type"],
        "null",
        "no --kernel-dir: only the built-in guest"
    );
    for name in [
        "CreateVm",
        "CloneRequest",
        "WarmRequest",
        "ProbeList",
        "ProbeRange",
        "RunCommand",
    ] {
        assert_eq!(schemas[name]["additionalProperties"], false, "{name} is closed");
    }
    for (schema, name) in [
        ("CloneMade", "seed"),
        ("CloneMade", "generation"),
        ("RunResult", "result"),
        ("RunResult", "extra"),
        ("RunCommand", "value"),
        ("ProbeRange", "start_gpa"),
    ] {
        let f = field(schema, name);
        assert_eq!(f["format"], "uint64", "{schema}.{name}: {f}");
        assert_eq!(f["minimum"], 0, "{schema}.{name}");
        assert_eq!(f["maximum"], json!(u64::MAX), "{schema}.{name}");
    }
    assert_eq!(field("ProbeList", "gpas")["items"]["format"], "uint64");
    // Signed figures (the probe's KVM counter deltas) are int64; nothing unsigned is.
    fn signed_minimum_zero(v: &Value, found: &mut Vec<String>) {
        match v {
            Value::Object(o) => {
                if matches!(o.get("format").and_then(Value::as_str), Some("int64" | "int32"))
                    && o.get("minimum").and_then(Value::as_u64) == Some(0)
                {
                    found.push(v.to_string());
                }
                o.values().for_each(|v| signed_minimum_zero(v, found));
            }
            Value::Array(items) => items.iter().for_each(|v| signed_minimum_zero(v, found)),
            _ => {}
        }
    }
    let mut unsigned_declared_signed = Vec::new();
    signed_minimum_zero(&doc, &mut unsigned_declared_signed);
    assert!(
        unsigned_declared_signed.is_empty(),
        "no u64 left declared int64: {unsigned_declared_signed:?}"
    );
    assert_eq!(field("KvmDeltas", "exits")["format"], "int64", "deltas are signed");
    // The VMM's own report types describe themselves in place: a local reset's steps are an
    // object of the oneOf (not a nested oneOf), KVM statistics are maps of `Stat` by name.
    let local_reset = &schemas["ResetSteps"]["oneOf"][0];
    assert_eq!(local_reset["type"], "object", "{local_reset}");
    assert_eq!(local_reset["properties"]["pages_dropped"]["format"], "uint64");
    assert_eq!(
        schemas["ResetSteps"]["oneOf"][1]["properties"]["in_cell_us"]["type"],
        "number"
    );
    let stat = json!({"$ref": "#/components/schemas/Stat"});
    assert_eq!(field("KvmStats", "vm")["additionalProperties"], stat);
    assert_eq!(field("KvmStats", "vcpus")["items"]["additionalProperties"], stat);
    assert_eq!(field("Stat", "kind")["type"], "string");
    assert_eq!(field("PageProbe", "before_kind")["type"], "string");

    // A server started with other limits describes those, and without a token asks for none.
    let (server, c) = start(small());
    let served = ok(&c, "GET", "/openapi.json", None, 200);
    assert_eq!(
        served["components"]["schemas"]["CreateVm"]["properties"]["memory_mib"]["maximum"],
        small().max_memory_mib
    );
    assert!(served.get("security").is_none(), "{}", served["security"]);
    assert!(documented_statuses(&served, "/v1/vms", "get") == [200]);
    server.stop().expect("stop");
}

#[test]
fn test_token_is_required_off_loopback_and_checked_when_set() {
    let open = ServerConfig {
        listen: "0.0.0.0:0".parse().expect("addr"),
        ..ServerConfig::local(0)
    };
    let refused = server::start(open).err().expect("refused without a token");
    assert!(refused.to_string().contains("without a bearer token"), "{refused}");

    let config = ServerConfig {
        listen: "0.0.0.0:0".parse().expect("addr"),
        token: Some("s3cret-token".into()),
        ..ServerConfig::local(0)
    };
    let server = server::start(config).expect("starts with a token");
    let url = format!("http://127.0.0.1:{}", server.addr.port());
    expect_error(
        Client::new(&url, None).request("GET", "/healthz", None).expect("req"),
        401,
        "unauthorized",
    );
    expect_error(
        Client::new(&url, Some("wrong".into()))
            .request("GET", "/v1/vms", None)
            .expect("req"),
        401,
        "unauthorized",
    );
    let good = Client::new(&url, Some("s3cret-token".into()));
    assert_eq!(good.request("GET", "/v1/vms", None).expect("req").status, 200);
    server.stop().expect("stop");
}

#[test]
fn test_a_spinning_guest_is_stopped_and_the_server_keeps_answering() {
    let (server, c) = start(small());
    let a = ok(&c, "POST", "/v1/vms", Some(json!({"memory_mib": 16})), 201)["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let b = ok(&c, "POST", "/v1/vms", Some(json!({"memory_mib": 16})), 201)["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let started = std::time::Instant::now();
    expect_error(
        c.request("POST", &format!("/v1/vms/{a}/run"), Some(&json!({"command": "spin"})))
            .expect("req"),
        409,
        "vm_failed",
    );
    assert!(started.elapsed() < Duration::from_secs(5), "stopped at its deadline");
    let info = ok(&c, "GET", &format!("/v1/vms/{a}"), None, 200);
    assert_eq!(info["state"], "failed");
    assert!(
        info["failure"].as_str().is_some_and(|f| f.contains("still running")),
        "{info}"
    );
    expect_error(
        c.request("POST", &format!("/v1/vms/{a}/run"), Some(&json!({"command": "exit"})))
            .expect("req"),
        409,
        "vm_failed",
    );
    assert_eq!(
        ok(
            &c,
            "POST",
            &format!("/v1/vms/{b}/run"),
            Some(json!({"command": "exit"})),
            200
        )["status"],
        0
    );
    expect_error(
        c.request(
            "POST",
            &format!("/v1/vms/{b}/run"),
            Some(&json!({"command": "triple_fault"})),
        )
        .expect("req"),
        409,
        "vm_failed",
    );
    assert!(ok(&c, "GET", &format!("/v1/vms/{b}"), None, 200)["failure"]
        .as_str()
        .is_some_and(|f| f.contains("triple fault")));
    assert_eq!(ok(&c, "GET", "/healthz", None, 200)["vms"], 2);
    ok(&c, "DELETE", &format!("/v1/vms/{a}"), None, 204);
    ok(&c, "DELETE", &format!("/v1/vms/{b}"), None, 204);
    server.stop().expect("stop");
}

#[test]
fn test_restart_with_the_same_state_dir_keeps_templates_and_their_clones_share_pages() {
    let dir = std::env::temp_dir().join(format!("cowvm-http-state-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let config = ServerConfig {
        state_dir: Some(dir.clone()),
        limits: small(),
        ..ServerConfig::local(0)
    };
    let (tpl, page) = {
        let server = server::start(config.clone()).expect("first server");
        let c = Client::new(&format!("http://{}", server.addr), None);
        let vm = ok(
            &c,
            "POST",
            "/v1/vms",
            Some(json!({"memory_mib": 32, "warmup_mib": 4})),
            201,
        )["id"]
            .as_str()
            .expect("id")
            .to_owned();
        let snap = ok(&c, "POST", &format!("/v1/vms/{vm}/snapshot"), None, 201);
        assert_eq!(snap["persisted"], true);
        server.stop().expect("stop");
        (snap["template_id"].as_str().expect("tpl").to_owned(), 8u64 << 20)
    };
    std::fs::write(dir.join("tpl-99.state"), b"COWVMTPL garbage that is not a template").expect("write a damaged file");

    let server = server::start(config).expect("second server");
    assert_eq!(server.refused_templates.len(), 1, "{:?}", server.refused_templates);
    assert_eq!(
        std::fs::read(dir.join("quarantine/tpl-99.state")).expect("read"),
        b"COWVMTPL garbage that is not a template",
        "moved unchanged into quarantine"
    );
    let c = Client::new(&format!("http://{}", server.addr), None);
    let templates = ok(&c, "GET", "/v1/templates", None, 200);
    assert_eq!(templates[0]["id"], tpl);
    assert_eq!(templates[0]["persisted"], true);
    let made = ok(
        &c,
        "POST",
        &format!("/v1/templates/{tpl}/clones"),
        Some(json!({"count": 2})),
        201,
    );
    for clone in made["clones"].as_array().expect("clones") {
        let id = clone["id"].as_str().expect("id");
        let sum = ok(
            &c,
            "POST",
            &format!("/v1/vms/{id}/run"),
            Some(json!({"command": "checksum", "start_gpa": page, "count": 16, "stride": 4096})),
            200,
        );
        assert_ne!(sum["result"], 0, "the warm-up data came back");
    }
    let id = made["clones"][0]["id"].as_str().expect("id");
    let stats = ok(&c, "GET", &format!("/v1/vms/{id}/stats"), None, 200);
    let shared_by_both = stats["kpagecount_histogram"]
        .as_object()
        .expect("histogram")
        .iter()
        .filter(|(k, _)| k.parse::<u64>().unwrap_or(0) >= 2)
        .count();
    assert!(
        shared_by_both > 0,
        "the two clones map the same reloaded frames: {}",
        stats["kpagecount_histogram"]
    );
    assert_eq!(stats["pages"]["private"], 0);
    server.stop().expect("stop");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn test_docs_api_md_documents_every_openapi_endpoint() {
    use utoipa::OpenApi;
    let doc = serde_json::to_value(ApiDoc::openapi()).expect("doc");
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/api.md")).expect("docs/api.md");
    for (path, methods) in doc["paths"].as_object().expect("paths") {
        for method in methods.as_object().expect("methods").keys() {
            let method = method.to_uppercase();
            let documented = text
                .lines()
                .any(|l| l.starts_with("### ") && l.contains(&method) && l.contains(&format!("{path}`")));
            assert!(documented, "docs/api.md has no heading for {method} {path}");
            let (before, after) = path.split_once("{id}").unwrap_or((path.as_str(), ""));
            let example = text
                .lines()
                .filter(|l| l.contains("curl") && l.contains(&format!("localhost:8080{before}")))
                .any(|l| {
                    let rest = &l[l.find(before).unwrap_or(0) + before.len()..];
                    let rest = rest.split_whitespace().next().unwrap_or("");
                    match (path.contains("{id}"), after) {
                        (false, _) => rest.is_empty() || rest.starts_with(['\'', '"', '#']),
                        (true, "") => rest.starts_with("vm-") || rest.starts_with("tpl-") && !rest.contains('/'),
                        (true, after) => rest.contains(after),
                    }
                });
            let needs_method = method != "GET";
            let with_method = text.lines().any(|l| {
                l.contains("curl")
                    && (!needs_method || l.contains(&format!("-X {method}")))
                    && l.contains(before)
                    && l.contains(after)
            });
            assert!(
                example && with_method,
                "docs/api.md has no curl example for {method} {path}"
            );
        }
    }
}
