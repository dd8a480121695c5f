//! Multi-vCPU VMs over HTTP: `vcpus` up to `--max-vcpus` (422 beyond, and the OpenAPI bound
//! follows the limit), guest commands addressed to a vCPU with `vcpu` (422 out of range), and
//! `identity` answering with the index the guest read; clones keep every vCPU.

use cowvm::client::{Answer, Client};
use cowvm::server::{self, Limits, RunningServer, ServerConfig};
use serde_json::{json, Value};

fn start(max_vcpus: usize) -> (RunningServer, Client) {
    let config = ServerConfig {
        limits: Limits {
            max_vcpus,
            warm_shells: 0,
            ..Limits::default()
        },
        ..ServerConfig::local(0)
    };
    let server = server::start(config).expect("server");
    let client = Client::new(&format!("http://{}", server.addr), None);
    (server, client)
}

fn ok(c: &Client, method: &str, path: &str, body: Option<Value>, status: u16) -> Value {
    let answer = c.request(method, path, body.as_ref()).expect("request");
    assert_eq!(answer.status, status, "{method} {path}: {}", answer.body);
    answer.body
}

fn refused(answer: Answer, code: &str) {
    assert_eq!(answer.status, 422, "{}", answer.body);
    assert_eq!(answer.body["error"]["code"], code, "{}", answer.body);
    assert!(answer.body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
}

fn identity(c: &Client, vm: &str, vcpu: u64) -> Value {
    let body = json!({"command": "identity", "vcpu": vcpu});
    ok(c, "POST", &format!("/v1/vms/{vm}/run"), Some(body), 200)
}

#[test]
fn test_vcpus_are_bounded_by_max_vcpus_and_commands_address_a_vcpu() {
    let (_server, c) = start(4);
    let doc = ok(&c, "GET", "/openapi.json", None, 200);
    let vcpus = &doc["components"]["schemas"]["CreateVm"]["properties"]["vcpus"];
    assert_eq!(
        (vcpus["minimum"].as_u64(), vcpus["maximum"].as_u64()),
        (Some(1), Some(4))
    );
    let vcpu = &doc["components"]["schemas"]["RunCommand"]["properties"]["vcpu"];
    assert_eq!(vcpu["maximum"].as_u64(), Some(3));

    for n in [0, 5] {
        let answer = c
            .request("POST", "/v1/vms", Some(&json!({"memory_mib": 16, "vcpus": n})))
            .expect("request");
        refused(answer, "vcpus_out_of_range");
    }
    assert_eq!(ok(&c, "GET", "/v1/vms", None, 200).as_array().map(Vec::len), Some(0));

    let vm = ok(&c, "POST", "/v1/vms", Some(json!({"memory_mib": 32, "vcpus": 4})), 201);
    let id = vm["id"].as_str().expect("id").to_owned();
    assert_eq!(vm["vcpus"], 4, "the VM says how many vCPUs it has");
    for i in 0..4u64 {
        let write = json!({"command": "write", "vcpu": i, "start_gpa": (16 + i) << 20, "count": 1, "value": 40 + i});
        ok(&c, "POST", &format!("/v1/vms/{id}/run"), Some(write), 200);
        assert_eq!(identity(&c, &id, i)["vcpu"], i, "vCPU {i} reads its own index");
    }
    let default = ok(
        &c,
        "POST",
        &format!("/v1/vms/{id}/run"),
        Some(json!({"command": "identity"})),
        200,
    );
    assert_eq!(default["vcpu"], 0, "vcpu defaults to 0");
    let answer = c
        .request(
            "POST",
            &format!("/v1/vms/{id}/run"),
            Some(&json!({"command": "exit", "vcpu": 4})),
        )
        .expect("request");
    refused(answer, "vcpu_out_of_range");
    assert_eq!(ok(&c, "GET", &format!("/v1/vms/{id}"), None, 200)["state"], "running");

    let tpl = ok(&c, "POST", &format!("/v1/vms/{id}/snapshot"), None, 201)["template_id"]
        .as_str()
        .expect("template id")
        .to_owned();
    let made = ok(
        &c,
        "POST",
        &format!("/v1/templates/{tpl}/clones"),
        Some(json!({"count": 2})),
        201,
    );
    for clone in made["clones"].as_array().expect("clones") {
        let clone = clone["id"].as_str().expect("id");
        assert_eq!(ok(&c, "GET", &format!("/v1/vms/{clone}"), None, 200)["vcpus"], 4);
        for i in 0..4u64 {
            assert_eq!(identity(&c, clone, i)["vcpu"], i, "clone {clone} vCPU {i}");
            let sum = json!({"command": "checksum", "vcpu": i, "start_gpa": (16 + i) << 20, "count": 1});
            let out = ok(&c, "POST", &format!("/v1/vms/{clone}/run"), Some(sum), 200);
            assert_eq!(out["result"], 40 + i, "clone {clone} vCPU {i} reads the data");
        }
    }
}
