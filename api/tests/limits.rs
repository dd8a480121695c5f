//! Limits that hold, also under concurrency: warm shells count against `--max-vms` and give way
//! first, admission is atomic, a template cannot be deleted while it is cloned, a timed-out
//! request leaves nothing behind, and the guest deadline holds for custom kernels.
//!
//! Concurrency tests assert invariants (never more than N live, no orphans), not timings.

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use cowvm::client::{Answer, Client};
use cowvm::server::{self, Limits, RunningServer, ServerConfig};
use serde_json::{json, Value};

fn start_with(limits: Limits, kernel_dir: Option<std::path::PathBuf>) -> (RunningServer, Client) {
    let config = ServerConfig {
        limits,
        kernel_dir,
        ..ServerConfig::local(0)
    };
    let server = server::start(config).expect("server starts");
    let client = Client::new(&format!("http://{}", server.addr), None);
    (server, client)
}

fn start(limits: Limits) -> (RunningServer, Client) {
    start_with(limits, None)
}

fn id(value: &Value, key: &str) -> String {
    value[key]
        .as_str()
        .unwrap_or_else(|| panic!("{key} in {value}"))
        .to_owned()
}

fn boot(c: &Client) -> String {
    id(
        &c.call("POST", "/v1/vms", Some(&json!({"memory_mib": 16})))
            .expect("boot"),
        "id",
    )
}

fn snapshot(c: &Client, vm: &str) -> String {
    id(
        &c.call("POST", &format!("/v1/vms/{vm}/snapshot"), None)
            .expect("snapshot"),
        "template_id",
    )
}

fn live_vms(c: &Client) -> Vec<Value> {
    c.call("GET", "/v1/vms", None)
        .expect("list VMs")
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn warm_shells(c: &Client) -> u64 {
    c.call("GET", "/v1/templates", None)
        .expect("list templates")
        .as_array()
        .map(|all| all.iter().map(|t| t["warm_shells"].as_u64().unwrap_or(0)).sum())
        .unwrap_or(0)
}

/// KVM VMs the server shows: live VMs plus warm shells.
fn kvm_vms(c: &Client) -> u64 {
    live_vms(c).len() as u64 + warm_shells(c)
}

/// Polls until `done` holds (or `limit` passes), asserting `always` at every look.
fn watch(limit: Duration, mut always: impl FnMut(), mut done: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + limit;
    loop {
        always();
        if done() {
            return true;
        }
        if Instant::now() > until {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn expect(answer: &Answer, status: u16, code: &str) {
    assert_eq!(answer.status, status, "{}", answer.body);
    assert_eq!(answer.body["error"]["code"], code, "{}", answer.body);
}

#[test]
fn test_warm_shells_count_against_max_vms_and_give_way_first() {
    let max = 4;
    let (server, c) = start(Limits {
        max_vms: max,
        warm_shells: 8,
        ..Limits::default()
    });
    let vm = boot(&c);
    let tpl = snapshot(&c, &vm);
    let within = |c: &Client| {
        let n = kvm_vms(c);
        assert!(n <= max as u64, "{n} KVM VMs (live + warm shells) > --max-vms {max}");
    };
    // The pool fills the room there is (3 beside the VM), never its target of 8.
    assert!(
        watch(Duration::from_secs(30), || within(&c), || warm_shells(&c) == 3),
        "the pool filled the free room"
    );
    let _ = watch(Duration::from_secs(1), || within(&c), || false);
    // Asking for more shells cannot build past the limit either.
    let warm = c
        .call(
            "POST",
            &format!("/v1/templates/{tpl}/warm"),
            Some(&json!({"shells": max})),
        )
        .expect("warm");
    assert_eq!(warm["target"], max as u64);
    let _ = watch(Duration::from_secs(1), || within(&c), || false);

    // A booted VM needs room: a shell gives way, the boot succeeds.
    let second = boot(&c);
    within(&c);
    // Clones take the remaining shells (and a shell of another template gives way).
    let other = snapshot(&c, &second);
    let clones = c
        .request(
            "POST",
            &format!("/v1/templates/{other}/clones"),
            Some(&json!({"count": 2})),
        )
        .expect("clone");
    assert_eq!(clones.status, 201, "{}", clones.body);
    assert_eq!(clones.body["clones"].as_array().map(Vec::len), Some(2));
    let _ = watch(Duration::from_secs(1), || within(&c), || false);
    assert_eq!(live_vms(&c).len(), max);
    // Now the limit is held by VMs, not shells: the next VM is refused.
    expect(
        &c.request("POST", "/v1/vms", Some(&json!({"memory_mib": 16})))
            .expect("boot"),
        429,
        "too_many_vms",
    );
    server.stop().expect("stop");
}

fn concurrently(n: usize, call: impl Fn() -> Answer + Send + Sync + 'static) -> Vec<Answer> {
    let barrier = Arc::new(Barrier::new(n));
    let call = Arc::new(call);
    let threads: Vec<_> = (0..n)
        .map(|_| {
            let (barrier, call) = (Arc::clone(&barrier), Arc::clone(&call));
            std::thread::spawn(move || {
                barrier.wait();
                call()
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().expect("thread")).collect()
}

fn count_status(answers: &[Answer], status: u16) -> usize {
    answers.iter().filter(|a| a.status == status).count()
}

#[test]
fn test_concurrent_creates_and_clones_never_exceed_max_vms() {
    let max = 5;
    let (server, c) = start(Limits {
        max_vms: max,
        warm_shells: 2,
        ..Limits::default()
    });
    let base = format!("http://{}", server.addr);

    let url = base.clone();
    let answers = concurrently(20, move || {
        Client::new(&url, None)
            .request("POST", "/v1/vms", Some(&json!({"memory_mib": 16})))
            .expect("create")
    });
    let created = count_status(&answers, 201);
    for a in answers.iter().filter(|a| a.status != 201) {
        expect(a, 429, "too_many_vms");
    }
    assert_eq!(created, max, "exactly the limit is admitted");
    assert_eq!(live_vms(&c).len(), max);

    for vm in live_vms(&c).iter().skip(1) {
        c.call("DELETE", &format!("/v1/vms/{}", id(vm, "id")), None)
            .expect("delete");
    }
    let source = id(&live_vms(&c)[0], "id");
    let tpl = snapshot(&c, &source);
    let url = base.clone();
    let path = format!("/v1/templates/{tpl}/clones");
    let answers = concurrently(20, move || {
        Client::new(&url, None)
            .request("POST", &path, Some(&json!({"count": 1})))
            .expect("clone")
    });
    for a in answers.iter().filter(|a| a.status != 201) {
        expect(a, 429, "too_many_vms");
    }
    // Deleted VMs gave their room back at once: exactly the rest of the limit is admitted.
    assert_eq!(count_status(&answers, 201), max - 1, "one VM and max-1 clones");
    assert_eq!(live_vms(&c).len(), max);
    server.stop().expect("stop");
}

#[test]
fn test_deleting_a_template_while_it_is_cloned_leaves_no_orphans() {
    let (server, c) = start(Limits {
        warm_shells: 0,
        ..Limits::default()
    });
    let base = format!("http://{}", server.addr);
    let vm = boot(&c);
    for delay_ms in [0u64, 5, 20, 60] {
        let tpl = snapshot(&c, &vm);
        let (url, path) = (base.clone(), format!("/v1/templates/{tpl}/clones"));
        let cloning = std::thread::spawn(move || {
            Client::new(&url, None)
                .request("POST", &path, Some(&json!({"count": 300})))
                .expect("clone")
        });
        std::thread::sleep(Duration::from_millis(delay_ms));
        let deleted = c
            .request("DELETE", &format!("/v1/templates/{tpl}"), None)
            .expect("delete");
        let cloned = cloning.join().expect("clone thread");
        let orphans: Vec<String> = live_vms(&c)
            .iter()
            .filter(|v| v["template_id"] == tpl.as_str())
            .map(|v| id(v, "id"))
            .collect();
        match deleted.status {
            204 => {
                assert!(
                    orphans.is_empty(),
                    "template deleted, yet {} clones of it live",
                    orphans.len()
                );
                assert_ne!(cloned.status, 201, "a clone call succeeded on a deleted template");
            }
            409 => expect(&deleted, 409, "template_in_use"),
            other => panic!("delete answered {other}: {}", deleted.body),
        }
        if cloned.status == 201 {
            assert_eq!(
                deleted.status, 409,
                "clones were made, so the delete must have been refused"
            );
        }
        for clone in &orphans {
            c.call("DELETE", &format!("/v1/vms/{clone}"), None)
                .expect("delete clone");
        }
        if deleted.status == 409 {
            c.call("DELETE", &format!("/v1/templates/{tpl}"), None)
                .expect("delete once the clones are gone");
        }
    }
    server.stop().expect("stop");
}

#[test]
fn test_a_request_that_times_out_has_created_nothing() {
    let (server, c) = start(Limits {
        request_timeout: Duration::from_millis(20),
        warm_shells: 0,
        ..Limits::default()
    });
    // Even a boot may time out here; whatever answers 503 must have left nothing.
    let mut vm = None;
    for _ in 0..50 {
        let answer = c
            .request("POST", "/v1/vms", Some(&json!({"memory_mib": 16})))
            .expect("boot");
        match answer.status {
            201 => {
                vm = Some(id(&answer.body, "id"));
                break;
            }
            _ => expect(&answer, 503, "timeout"),
        }
    }
    let vm = vm.expect("one boot of 16 MiB fits in 20 ms");
    let mut tpl = None;
    for _ in 0..50 {
        let answer = c
            .request("POST", &format!("/v1/vms/{vm}/snapshot"), None)
            .expect("snapshot");
        match answer.status {
            201 => {
                tpl = Some(id(&answer.body, "template_id"));
                break;
            }
            _ => expect(&answer, 503, "timeout"),
        }
    }
    let tpl = tpl.expect("a snapshot of 16 MiB fits in 20 ms");
    let templates = c.call("GET", "/v1/templates", None).expect("templates");
    assert_eq!(
        templates.as_array().map(Vec::len),
        Some(1),
        "timed-out snapshots made no template: {templates}"
    );

    let answer = c
        .request(
            "POST",
            &format!("/v1/templates/{tpl}/clones"),
            Some(&json!({"count": 500})),
        )
        .expect("clone");
    expect(&answer, 503, "timeout");
    // The abandoned call goes on in the background for a while; none of it may ever appear.
    let only_the_source = || {
        let live = live_vms(&c);
        assert_eq!(live.len(), 1, "a timed-out clone call left VMs: {}", live.len());
    };
    let _ = watch(Duration::from_secs(3), only_the_source, || false);
    server.stop().expect("stop");
}

#[test]
fn test_the_guest_deadline_holds_for_custom_kernels() {
    let dir = std::env::temp_dir().join(format!("cowvm-limits-kernels-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("kernel dir");
    // `jmp $`: never reaches its first exit.
    std::fs::write(dir.join("spin.elf"), cowvm_tests::tiny_elf(&[0xeb, 0xfe]).0).expect("write kernel");
    let (server, c) = start_with(
        Limits {
            guest_deadline: Duration::from_millis(500),
            ..Limits::default()
        },
        Some(dir.clone()),
    );
    let started = Instant::now();
    let answer = c
        .request(
            "POST",
            "/v1/vms",
            Some(&json!({"memory_mib": 16, "kernel": "spin.elf"})),
        )
        .expect("boot");
    let took = started.elapsed();
    assert_eq!(answer.status, 422, "{}", answer.body);
    assert_eq!(answer.body["error"]["code"], "boot_failed", "{}", answer.body);
    // The old fixed boot deadline was 10 s; the guest deadline here is 0.5 s.
    assert!(
        took < Duration::from_secs(5),
        "a spinning kernel held the request for {took:?}"
    );
    assert!(live_vms(&c).is_empty(), "nothing half-built remains");
    server.stop().expect("stop");
    std::fs::remove_dir_all(&dir).ok();
}
