//! Warming a template while it is being deleted never leaves a pool nobody can reach (issue 18
//! item 7). Alone in its test binary, because it counts this process's file descriptors.

use std::time::Duration;

use cowvm::client::Client;
use cowvm::server::{self, Limits, ServerConfig};
use serde_json::json;

#[test]
fn test_warming_a_template_races_its_deletion_without_leaking_a_pool() {
    let config = ServerConfig {
        limits: Limits {
            warm_shells: 0,
            ..Limits::default()
        },
        ..ServerConfig::local(0)
    };
    let server = server::start(config).expect("server starts");
    let base = format!("http://{}", server.addr);
    let c = Client::new(&base, None);
    let vm = c
        .call("POST", "/v1/vms", Some(&json!({"memory_mib": 16})))
        .expect("boot")["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let fds_before = cowvm_vmm::host::open_fds().expect("fds");
    for _ in 0..20 {
        let tpl = c
            .call("POST", &format!("/v1/vms/{vm}/snapshot"), None)
            .expect("snapshot")["template_id"]
            .as_str()
            .expect("template id")
            .to_owned();
        let (url, path) = (base.clone(), format!("/v1/templates/{tpl}/warm"));
        let warming = std::thread::spawn(move || {
            Client::new(&url, None)
                .request("POST", &path, Some(&json!({"shells": 3})))
                .expect("warm")
        });
        let deleted = c
            .request("DELETE", &format!("/v1/templates/{tpl}"), None)
            .expect("delete");
        let warmed = warming.join().expect("thread");
        assert_eq!(deleted.status, 204, "{}", deleted.body);
        assert!(matches!(warmed.status, 200 | 404), "{}", warmed.body);
    }
    // No template is left, so no shell may be kept (an unreachable pool would hold 3 VMs).
    assert_eq!(c.call("GET", "/v1/templates", None).expect("list"), json!([]));
    std::thread::sleep(Duration::from_millis(500));
    let fds_after = cowvm_vmm::host::open_fds().expect("fds");
    assert!(
        fds_after < fds_before + 6,
        "shells of deleted templates hold fds: {fds_before} before, {fds_after} after"
    );
    server.stop().expect("stop");
}
