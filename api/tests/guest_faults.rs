//! Guests that fault, over the API: the VM is marked failed with the reason, the other VMs and
//! the server go on. Kernels come only from the kernel directory.

use std::path::{Path, PathBuf};

use cowvm::client::{Answer, Client};
use cowvm::server::{self, Limits, RunningServer, ServerConfig};
use cowvm_tests::tiny_elf;
use serde_json::json;

/// `out 0xf0, eax` (eax = 0 at entry: "command done, status 0"), then `tail`.
fn kernel(tail: &[u8]) -> Vec<u8> {
    let mut code = vec![0xe7, 0xf0];
    code.extend_from_slice(tail);
    tiny_elf(&code).0
}

fn kernel_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cowvm-kernels-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("kernel dir");
    let write = |name: &str, bytes: &[u8]| std::fs::write(dir.join(name), bytes).expect("write kernel");
    write("port.elf", &kernel(&[0xe6, 0x99, 0xf4])); // out 0x99, al; hlt
    write("in.elf", &kernel(&[0xe4, 0x98, 0xf4])); // in al, 0x98; hlt
    write(
        "mmio.elf",
        &kernel(&[0x48, 0xc7, 0xc0, 0x00, 0x00, 0xf8, 0x00, 0x48, 0x89, 0x00, 0xf4]),
    ); // mov rax, 0xf80000; mov [rax], rax
    write("halt.elf", &kernel(&[0xfa, 0xf4])); // cli; hlt
    write(
        "shutdown.elf",
        &tiny_elf(&[0x0f, 0x01, 0x1c, 0x25, 0, 0, 0, 0, 0x0f, 0x0b]).0,
    ); // lidt [0]; ud2 → #UD with IDT base 0, limit 0 → triple fault
    write("text.elf", b"just text, not an ELF");
    std::os::unix::fs::symlink("/bin/true", dir.join("escape.elf")).expect("symlink");
    dir
}

fn start(dir: &Path) -> (RunningServer, Client) {
    let limits = Limits {
        guest_deadline: std::time::Duration::from_millis(500),
        ..Limits::default()
    };
    let config = ServerConfig {
        kernel_dir: Some(dir.to_owned()),
        limits,
        ..ServerConfig::local(0)
    };
    let server = server::start(config).expect("server");
    let client = Client::new(&format!("http://{}", server.addr), None);
    (server, client)
}

fn expect(answer: Answer, status: u16, code: &str) -> String {
    assert_eq!(answer.status, status, "{}", answer.body);
    assert_eq!(answer.body["error"]["code"], code, "{}", answer.body);
    answer.body["error"]["message"].as_str().unwrap_or_default().to_owned()
}

#[test]
fn test_each_kind_of_guest_fault_marks_only_that_vm_failed() {
    let dir = kernel_dir("faults");
    let (server, c) = start(&dir);
    let healthy = c
        .call("POST", "/v1/vms", Some(&json!({"memory_mib": 16})))
        .expect("builtin VM")["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let cases = [
        ("port.elf", 16, "out to unserved port 0x99"),
        ("in.elf", 16, "in from unserved port 0x98"),
        ("mmio.elf", 15, "outside guest RAM"),
        ("halt.elf", 16, "hlt with no way to wake"),
    ];
    for (name, memory_mib, reason) in cases {
        let vm = c
            .call(
                "POST",
                "/v1/vms",
                Some(&json!({"memory_mib": memory_mib, "kernel": name})),
            )
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(vm["state"], "running", "{name} booted (its first exit was 'done')");
        let id = vm["id"].as_str().expect("id");
        let message = expect(
            c.request("POST", &format!("/v1/vms/{id}/run"), Some(&json!({"command": "exit"})))
                .expect("run"),
            409,
            "vm_failed",
        );
        assert!(message.contains(reason), "{name}: {message}");
        let info = c.call("GET", &format!("/v1/vms/{id}"), None).expect("get");
        assert_eq!(info["state"], "failed");
        assert!(
            info["failure"].as_str().is_some_and(|f| f.contains(reason)),
            "{name}: {info}"
        );
        expect(
            c.request("GET", &format!("/v1/vms/{id}/stats"), None).expect("stats"),
            409,
            "vm_failed",
        );
        assert_eq!(
            c.call(
                "POST",
                &format!("/v1/vms/{healthy}/run"),
                Some(&json!({"command": "exit"}))
            )
            .expect("healthy VM")["status"],
            0
        );
        c.call("DELETE", &format!("/v1/vms/{id}"), None)
            .expect("a failed VM can be deleted");
    }
    let message = expect(
        c.request(
            "POST",
            "/v1/vms",
            Some(&json!({"memory_mib": 16, "kernel": "shutdown.elf"})),
        )
        .expect("req"),
        422,
        "boot_failed",
    );
    assert!(message.contains("triple fault"), "{message}");
    assert_eq!(
        c.call("GET", "/v1/vms", None).expect("list").as_array().map(Vec::len),
        Some(1),
        "nothing half-built remains"
    );
    server.stop().expect("stop");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn test_kernels_can_only_come_from_the_kernel_directory() {
    let dir = kernel_dir("paths");
    let (server, c) = start(&dir);
    for name in [
        "../port.elf",
        "/etc/passwd",
        "./port.elf",
        ".hidden",
        "sub/port.elf",
        "port.elf\u{0}",
        "",
        &"k".repeat(300),
    ] {
        expect(
            c.request("POST", "/v1/vms", Some(&json!({"memory_mib": 16, "kernel": name})))
                .expect("req"),
            422,
            "bad_kernel",
        );
    }
    let message = expect(
        c.request(
            "POST",
            "/v1/vms",
            Some(&json!({"memory_mib": 16, "kernel": "escape.elf"})),
        )
        .expect("req"),
        422,
        "bad_kernel",
    );
    assert!(
        message.contains("not a file inside the kernel directory"),
        "a symlink out of the directory is refused: {message}"
    );
    let message = expect(
        c.request(
            "POST",
            "/v1/vms",
            Some(&json!({"memory_mib": 16, "kernel": "text.elf"})),
        )
        .expect("req"),
        422,
        "bad_kernel",
    );
    assert!(message.contains("64-bit ELF"), "{message}");
    expect(
        c.request(
            "POST",
            "/v1/vms",
            Some(&json!({"memory_mib": 16, "kernel": "missing.elf"})),
        )
        .expect("req"),
        422,
        "bad_kernel",
    );
    assert_eq!(
        c.call("GET", "/v1/vms", None).expect("list").as_array().map(Vec::len),
        Some(0)
    );
    server.stop().expect("stop");
    std::fs::remove_dir_all(&dir).ok();
}
