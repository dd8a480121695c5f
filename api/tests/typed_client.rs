//! The client parses the server's answers into the API's own types (`server::model`): one set of
//! types for server, client and CLI. Each answer that used to be untyped JSON (probe, reset
//! steps, VM stats) is read back as its type here, against a real server on /dev/kvm.

use cowvm::client::{Client, ClientError};
use cowvm::server::model::*;
use cowvm::server::{self, ServerConfig};

#[test]
fn test_typed_answers_round_trip_through_the_client() {
    let server = server::start(ServerConfig::local(0)).expect("server");
    let client = Client::new(&format!("http://{}", server.addr), None);
    let create = CreateVm {
        memory_mib: 32,
        vcpus: 1,
        warmup_mib: 4,
        kernel: None,
    };
    let vm: VmInfo = client.post("/v1/vms", &create).expect("create");
    assert_eq!(
        (vm.kind.as_str(), vm.state.as_str(), vm.memory_mib),
        ("vm", "running", 32)
    );
    let snap: SnapshotCreated = client
        .post_empty(&format!("/v1/vms/{}/snapshot", vm.id))
        .expect("snapshot");
    let made: ClonesCreated = client
        .post(
            &format!("/v1/templates/{}/clones", snap.template_id),
            &CloneRequest { count: 2 },
        )
        .expect("clones");
    assert_eq!(made.clones.len(), 2, "{:?}", made.failed);
    let clone = &made.clones[0].id;

    let targets = ProbeRequest::Range(ProbeRange {
        start_gpa: 8 << 20,
        pages: 3,
        stride: 4096,
    });
    let probe: ProbeReport = client
        .post(&format!("/v1/vms/{clone}/probes/write"), &targets)
        .expect("probe");
    assert_eq!((probe.written, probe.pages.len()), (3, 3));
    assert!(
        probe.pages.iter().all(|p| p.after.present && p.private_after),
        "{probe:?}"
    );
    assert!(
        probe.host_cow_us.is_some(),
        "a clone's probe times host-only copy-on-write"
    );

    let stats: VmStats = client.get(&format!("/v1/vms/{clone}/stats")).expect("stats");
    assert!(stats.pages.private >= 3, "{:?}", stats.pages);
    assert_eq!(stats.kvm.vcpus.len(), 1);
    assert!(!stats.kvm.vm.is_empty(), "KVM publishes VM statistics");

    let done: ResetDone = client.post_empty(&format!("/v1/vms/{clone}/reset")).expect("reset");
    assert!(
        matches!(done.steps, ResetSteps::Local { .. }),
        "an in-process reset reports its steps: {:?}",
        done.steps
    );

    let template: TemplateStats = client
        .get(&format!("/v1/templates/{}/stats", snap.template_id))
        .expect("template stats");
    assert_eq!(template.clones, 2);

    // An error answer is the server's ErrorBody, read into ClientError::Api.
    match client.get::<VmInfo>("/v1/vms/vm-404") {
        Err(ClientError::Api { status, code, .. }) => assert_eq!((status, code.as_str()), (404, "not_found")),
        other => panic!("expected a 404 not_found, got {other:?}"),
    }
    // An answer of another shape is refused by name, not read as defaults.
    match client.get::<ProbeReport>(&format!("/v1/vms/{}", vm.id)) {
        Err(ClientError::Unexpected { path, .. }) => assert!(path.ends_with(&vm.id)),
        other => panic!("expected an unexpected-answer error, got {other:?}"),
    }

    for c in &made.clones {
        client.delete(&format!("/v1/vms/{}", c.id)).expect("delete clone");
    }
    client.delete(&format!("/v1/vms/{}", vm.id)).expect("delete vm");
    client
        .delete(&format!("/v1/templates/{}", snap.template_id))
        .expect("delete template");
    server.stop().expect("stop");
}

#[test]
fn test_the_clients_endpoint_methods_send_and_read_the_api_types() {
    let server = server::start(ServerConfig::local(0)).expect("server");
    let client = Client::new(&format!("http://{}", server.addr), None);
    let vm = client
        .create_vm(&CreateVm {
            memory_mib: 32,
            vcpus: 1,
            warmup_mib: 4,
            kernel: None,
        })
        .expect("create");
    let template = client.snapshot(&vm.id).expect("snapshot").template_id;
    let warm = client.set_warm(&template, 3).expect("warm");
    assert_eq!((warm.template_id.as_str(), warm.target), (template.as_str(), 3));
    let made = client.clone_template(&template, 2).expect("clone");
    assert_eq!(made.clones.len(), 2, "{:?}", made.failed);
    assert_eq!(client.template(&template).expect("template").clones, 2);
    let clone = &made.clones[0].id;
    let write = RunCommand {
        command: "write".into(),
        start_gpa: 8 << 20,
        count: 5,
        stride: 4096,
        value: 9,
        vcpu: 0,
    };
    assert_eq!(client.run(clone, &write).expect("write").status, 0);
    let identity = RunCommand {
        command: "identity".into(),
        count: 0,
        value: 0,
        ..write
    };
    let out = client.run(clone, &identity).expect("identity");
    assert_eq!((out.result, out.vcpu), (made.clones[0].generation, Some(0)));
    let stats = client.vm_stats(clone).expect("stats");
    assert_eq!((stats.id.as_str(), stats.pages.private), (clone.as_str(), 5));
    assert!(client.cells().expect("cells").is_empty(), "no cells without --cells");
    assert!(client.metrics().expect("metrics").contains("cowvm_"), "Prometheus text");
    for c in &made.clones {
        client.delete_vm(&c.id).expect("delete clone");
    }
    client.delete_vm(&vm.id).expect("delete vm");
    client.set_warm(&template, 0).expect("no shells");
    client.delete_template(&template).expect("delete template");
    match client.template(&template) {
        Err(ClientError::Api { status: 404, .. }) => {}
        other => panic!("a deleted template answered {other:?}"),
    }
}
