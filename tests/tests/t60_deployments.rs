//! Zero-downtime deployments end to end: a real `skiff server` (three for
//! the failover test), three `skiff agent`s (advertise 127.0.0.2-4) running
//! real containers with runc from the local registry's test images, and a
//! bounded HTTP load through the routing proxies of a node that runs no
//! replica (a3) and of one that does (a1). Replicas are kept on a1 and a2
//! by a constraint, so a3's proxy always forwards across nodes.
//!
//! The images: `web:v2` and `web:v3` answer "skiff-test web v2" / "v3";
//! `web-500:v1` answers HTTP 500 while its health check passes. Every
//! service has an explicit HTTP health check, so "v1" and "v2" of the
//! issue are web:v2 and web:v3 here.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Once};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use skiff_e2e::agents::{on_loopback, AgentCluster};
use skiff_e2e::containers::{require_container_tools, Registry};
use skiff_e2e::load::{Load, LoadConfig, LoadReport};
use skiff_e2e::servers::ServerCluster;
use skiff_e2e::{describe, skiff_at, wait_until, POLL};

/// Drain of every agent in this file, in seconds: a stopping replica keeps
/// serving its open connections this long after leaving the proxies.
const DRAIN_SECS: &str = "2";

fn setup() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| std::env::set_var("SKIFF_DRAIN_SECS", DRAIN_SECS));
}

struct Cluster {
    // Dropped in field order: agents (and their containers) first.
    agents: AgentCluster,
    servers: ServerCluster,
    registry: Arc<Registry>,
}

impl Cluster {
    fn start(servers: usize) -> Cluster {
        require_container_tools();
        setup();
        let registry = Registry::shared();
        let servers = ServerCluster::start(servers, &[]);
        let specs = on_loopback(["a1", "a2", "a3"]);
        let agents = AgentCluster::start_with(
            &servers.addresses,
            &specs,
            &["--insecure-registry", &registry.addr],
        );
        Cluster {
            agents,
            servers,
            registry,
        }
    }

    /// Any server that answers.
    fn server(&self) -> String {
        for (i, address) in self.servers.addresses.iter().enumerate() {
            if self.servers.is_running(i) {
                return address.clone();
            }
        }
        panic!("no server running");
    }

    fn skiff(&self, args: &[&str]) -> std::process::Output {
        skiff_at(&self.server(), args)
    }

    fn skiff_ok(&self, args: &[&str]) -> String {
        let out = self.skiff(args);
        assert!(
            out.status.success(),
            "{}\n{}",
            describe(args, &out),
            self.agents.logs()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn image(&self, name_tag: &str) -> String {
        self.registry.image(name_tag)
    }

    /// Creates a published HTTP service of `image` on a1/a2 with a fast
    /// health check and the given update flags.
    fn create(&self, name: &str, publish: u16, replicas: u32, image: &str, flags: &[&str]) {
        let (publish, replicas, image) = (
            format!("{publish}:80"),
            replicas.to_string(),
            self.image(image),
        );
        let mut args = vec![
            "service",
            "create",
            "--detach",
            name,
            "--image",
            &image,
            "--replicas",
            &replicas,
            "--publish",
            &publish,
            "--protocol",
            "http",
            "--health-http",
            "/",
            "--health-interval",
            "300ms",
            "--health-retries",
            "2",
            "--constraint",
            "node.name in (a1,a2)",
        ];
        args.extend_from_slice(flags);
        self.skiff_ok(&args);
    }

    fn inspect(&self, name: &str) -> Value {
        let out = self.skiff_ok(&["service", "inspect", name, "--output", "json"]);
        serde_json::from_str(&out).expect("inspect prints JSON")
    }

    /// Waits until `name` has `n` healthy replicas desired to run and
    /// no other live one.
    fn wait_healthy(&self, name: &str, n: usize) {
        let mut last = Vec::new();
        let ok = wait_until(Duration::from_secs(60), POLL, || {
            last = self
                .agents
                .allocs(name)
                .into_iter()
                .filter(|a| a.desired == "run")
                .collect();
            last.len() == n && last.iter().all(|a| a.state == "healthy")
        });
        assert!(
            ok,
            "{name}: {last:#?} not {n} healthy\n{}",
            self.agents.logs()
        );
    }

    /// Waits until the latest deployment of `name` has ended (not running,
    /// paused or awaiting promotion) and returns the service.
    fn wait_deployment_end(&self, name: &str, limit: Duration) -> Value {
        let mut last = Value::Null;
        let ok = wait_until(limit, POLL, || {
            last = self.inspect(name);
            let status = last["deployment"]["status"].as_str().unwrap_or("");
            matches!(status, "succeeded" | "failed")
        });
        assert!(
            ok,
            "deployment of {name} did not end: {:#}\n{}",
            last["deployment"],
            self.agents.logs()
        );
        last
    }

    /// The routing proxy of agent `index` (a1 = 0) on `publish`.
    fn proxy(&self, index: usize, publish: u16) -> SocketAddr {
        let ip = ["127.0.0.2", "127.0.0.3", "127.0.0.4"][index];
        format!("{ip}:{publish}").parse().expect("socket address")
    }

    /// Waits until the proxy of agent `index` answers with `body`.
    fn wait_answering(&self, index: usize, publish: u16, body: &str) {
        let addr = self.proxy(index, publish);
        let ok = wait_until(Duration::from_secs(20), POLL, || {
            skiff_e2e::http_get_at(addr, "/")
                .is_ok_and(|r| r.status == 200 && r.body.contains(body))
        });
        assert!(
            ok,
            "proxy {addr} never answered {body}\n{}",
            self.agents.logs()
        );
    }
}

/// A load through a3 (runs no replica) and one through a1 (runs some).
fn loads(cluster: &Cluster, publish: u16, limit: Duration) -> [Load; 2] {
    [2, 0].map(|index| {
        Load::start(LoadConfig {
            workers: 4,
            max_duration: limit,
            ..LoadConfig::new(cluster.proxy(index, publish))
        })
    })
}

fn stop(loads: [Load; 2]) -> [LoadReport; 2] {
    loads.map(Load::stop)
}

/// Polls the allocations of `name` in the background and records the most
/// that held resources at once (any state but stopped).
struct Watcher {
    stop: Arc<AtomicBool>,
    most: Arc<AtomicUsize>,
    handle: Option<thread::JoinHandle<()>>,
}

impl Watcher {
    fn start(server: String, name: &str) -> Watcher {
        let (stop, most) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicUsize::new(0)),
        );
        let (s, m, name) = (stop.clone(), most.clone(), name.to_string());
        let handle = thread::spawn(move || {
            let started = Instant::now();
            while !s.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(300) {
                let out = skiff_at(
                    &server,
                    &["service", "ps", &name, "--all", "--output", "json"],
                );
                if let Ok(v) = serde_json::from_slice::<Value>(&out.stdout) {
                    let holding = skiff_e2e::allocations(&v)
                        .iter()
                        .filter(|a| a.state != "stopped")
                        .count();
                    m.fetch_max(holding, Ordering::Relaxed);
                }
                thread::sleep(Duration::from_millis(100));
            }
        });
        Watcher {
            stop,
            most,
            handle: Some(handle),
        }
    }

    fn finish(mut self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        self.most.load(Ordering::Relaxed)
    }
}

fn history(service: &Value) -> Vec<(u64, String, String)> {
    service["history"]
        .as_array()
        .map(|h| {
            h.iter()
                .map(|v| {
                    (
                        v["version"].as_u64().unwrap_or(0),
                        v["outcome"].as_str().unwrap_or("").to_string(),
                        v["message"].as_str().unwrap_or("").to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn assert_no_failures(reports: &[LoadReport], what: &str) {
    for (report, via) in reports.iter().zip(["a3 (no replica)", "a1"]) {
        assert!(
            report.total() > 50,
            "too little load through {via}: {report}"
        );
        report.assert_no_failures(&format!("{what}, through {via}"));
    }
}

#[test]
fn rolling_update_of_six_replicas_under_load_has_no_failed_request() {
    let cluster = Cluster::start(1);
    let publish = skiff_e2e::free_port();
    cluster.create(
        "roll",
        publish,
        6,
        "web:v2",
        &[
            "--max-parallel",
            "2",
            "--max-surge",
            "2",
            "--min-healthy-time",
            "1s",
        ],
    );
    cluster.wait_healthy("roll", 6);
    cluster.wait_answering(2, publish, "web v2");
    let loads = loads(&cluster, publish, Duration::from_secs(150));
    thread::sleep(Duration::from_secs(1));
    let watcher = Watcher::start(cluster.server(), "roll");
    let image = cluster.image("web:v3");
    let started = Instant::now();
    let out = cluster.skiff(&["service", "update", "roll", "--image", &image]);
    assert!(
        out.status.success(),
        "{}",
        describe(&["service", "update"], &out)
    );
    let took = started.elapsed();
    let done = loads[0].mark("deployed");
    thread::sleep(Duration::from_secs(2));
    let most = watcher.finish();
    let reports = stop(loads);
    let service = cluster.inspect("roll");
    assert_eq!(service["deployment"]["status"], "succeeded", "{service:#}");
    assert_eq!(service["version"], 2);
    eprintln!("rolling update of 6 (max_parallel 2) took {took:?}; at most {most} replicas held resources");
    assert!(
        most <= 8,
        "more than replicas + max_surge ran at once: {most}"
    );
    assert_no_failures(&reports, "rolling update");
    // Before the update only v2 answered (`wait_answering`); during it
    // both; after it only v3.
    assert!(reports[0].count_containing("web v2") > 0, "{}", reports[0]);
    let after = reports[0].after(done);
    assert!(after.total() > 0);
    assert_eq!(
        after.count_containing("web v3"),
        after.total(),
        "{}",
        reports[0]
    );
    let text = cluster.skiff_ok(&["service", "history", "roll"]);
    assert!(
        text.contains("image"),
        "history shows the image change: {text}"
    );
}

#[test]
fn a_rolling_update_whose_health_check_fails_rolls_back_by_itself() {
    let cluster = Cluster::start(1);
    let publish = skiff_e2e::free_port();
    cluster.create(
        "sick",
        publish,
        6,
        "web:v2",
        &[
            "--max-parallel",
            "2",
            "--max-surge",
            "2",
            "--min-healthy-time",
            "1s",
            "--healthy-deadline",
            "20s",
        ],
    );
    cluster.wait_healthy("sick", 6);
    cluster.wait_answering(2, publish, "web v2");
    let old: Vec<String> = cluster
        .agents
        .running("sick")
        .into_iter()
        .map(|a| a.id)
        .collect();
    let loads = loads(&cluster, publish, Duration::from_secs(90));
    let image = cluster.image("unhealthy:v1");
    let args = [
        "service",
        "update",
        "sick",
        "--image",
        &image,
        "--health-cmd",
        "exit 1",
    ];
    let out = cluster.skiff(&args);
    assert!(
        !out.status.success(),
        "a failed update exits non-zero: {}",
        describe(&args, &out)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("rolled back"), "{stderr}");
    let service = cluster.wait_deployment_end("sick", Duration::from_secs(60));
    thread::sleep(Duration::from_secs(2));
    let reports = stop(loads);
    assert_eq!(service["deployment"]["status"], "succeeded", "{service:#}");
    assert_eq!(service["deployment"]["rollback_of"], 2, "{service:#}");
    let versions = history(&service);
    let failed = versions
        .iter()
        .find(|(v, _, _)| *v == 2)
        .expect("version 2 in history");
    assert_eq!(failed.1, "failed", "{versions:?}");
    assert!(
        failed.2.contains("unhealthy") && failed.2.contains("rolled back"),
        "{versions:?}"
    );
    cluster.wait_healthy("sick", 6);
    let now: Vec<String> = cluster
        .agents
        .running("sick")
        .into_iter()
        .map(|a| a.id)
        .collect();
    for id in &old {
        assert!(now.contains(id), "old replica {id} was replaced: {now:?}");
    }
    assert_no_failures(&reports, "failed update and rollback");
    for report in &reports {
        assert_eq!(
            report.count_containing("web v2"),
            report.total(),
            "{report}"
        );
    }
    let text = cluster.skiff_ok(&["service", "history", "sick"]);
    assert!(text.contains("failed"), "{text}");
}

#[test]
fn blue_green_sends_all_traffic_to_green_at_promotion() {
    let cluster = Cluster::start(1);
    let publish = skiff_e2e::free_port();
    cluster.create(
        "bg",
        publish,
        3,
        "web:v2",
        &[
            "--update-strategy",
            "blue-green",
            "--min-healthy-time",
            "1s",
        ],
    );
    cluster.wait_healthy("bg", 3);
    cluster.wait_answering(2, publish, "web v2");
    let loads = loads(&cluster, publish, Duration::from_secs(90));
    let image = cluster.image("web:v3");
    let out = cluster.skiff(&["service", "update", "bg", "--image", &image]);
    assert!(
        out.status.success(),
        "{}",
        describe(&["service", "update"], &out)
    );
    let service = cluster.inspect("bg");
    assert_eq!(
        service["deployment"]["status"], "awaiting-promotion",
        "{service:#}"
    );
    cluster.wait_healthy("bg", 6);
    // Green serves and is healthy, but gets nothing for a while.
    thread::sleep(Duration::from_secs(2));
    let promoted = loads[0].mark("promote");
    let promoted_a1 = loads[1].mark("promote");
    cluster.skiff_ok(&["service", "promote", "bg"]);
    thread::sleep(Duration::from_secs(4));
    let reports = stop(loads);
    assert_no_failures(&reports, "blue-green");
    for (report, at) in reports.iter().zip([promoted, promoted_a1]) {
        let before = report.before(at);
        assert_eq!(
            before.count_containing("web v2"),
            before.total(),
            "{report}"
        );
        let after = report.after(at + Duration::from_secs(2));
        assert!(after.total() > 10, "{report}");
        assert_eq!(after.count_containing("web v3"), after.total(), "{report}");
    }
    let service = cluster.wait_deployment_end("bg", Duration::from_secs(30));
    assert_eq!(service["deployment"]["status"], "succeeded");
    cluster.wait_healthy("bg", 3);
}

#[test]
fn a_one_replica_service_updates_with_no_failed_request() {
    let cluster = Cluster::start(1);
    let publish = skiff_e2e::free_port();
    cluster.create("solo", publish, 1, "web:v2", &["--min-healthy-time", "1s"]);
    cluster.wait_healthy("solo", 1);
    cluster.wait_answering(2, publish, "web v2");
    let loads = loads(&cluster, publish, Duration::from_secs(60));
    let image = cluster.image("web:v3");
    cluster.skiff_ok(&["service", "update", "solo", "--image", &image, "--detach"]);
    let service = cluster.wait_deployment_end("solo", Duration::from_secs(60));
    assert_eq!(service["deployment"]["status"], "succeeded", "{service:#}");
    let done = loads[0].mark("deployed");
    thread::sleep(Duration::from_secs(3));
    let reports = stop(loads);
    assert_no_failures(&reports, "1-replica rolling update");
    let after = reports[0].after(done);
    assert_eq!(
        after.count_containing("web v3"),
        after.total(),
        "{}",
        reports[0]
    );
}

#[test]
fn canaries_are_promoted_or_discarded() {
    let cluster = Cluster::start(1);
    let publish = skiff_e2e::free_port();
    cluster.create("can", publish, 3, "web:v2", &["--min-healthy-time", "1s"]);
    cluster.wait_healthy("can", 3);
    cluster.wait_answering(2, publish, "web v2");

    // A canary that fails its health check is discarded.
    let sick = cluster.image("unhealthy:v1");
    let args = [
        "service",
        "update",
        "can",
        "--image",
        &sick,
        "--canary",
        "1",
        "--health-cmd",
        "exit 1",
    ];
    let out = cluster.skiff(&args);
    assert!(!out.status.success(), "{}", describe(&args, &out));
    let service = cluster.wait_deployment_end("can", Duration::from_secs(40));
    assert_eq!(service["deployment"]["rollback_of"], 2, "{service:#}");
    cluster.wait_healthy("can", 3);

    // A canary answering HTTP 500 above --max-error-rate is rolled back.
    let loads = loads(&cluster, publish, Duration::from_secs(60));
    let failing = cluster.image("web-500:v1");
    let args = [
        "service",
        "update",
        "can",
        "--image",
        &failing,
        "--canary",
        "1",
        "--canary-weight",
        "50",
        "--max-error-rate",
        "10",
        "--health-http",
        "/health.html",
    ];
    // The CLI exits 0 if the canary reaches "awaiting promotion" before its
    // error budget is judged, non-zero if the rollback comes first.
    let _ = cluster.skiff(&args);
    let service = cluster.wait_deployment_end("can", Duration::from_secs(40));
    let reports = stop(loads);
    let versions = history(&service);
    let gated = versions
        .iter()
        .find(|(v, _, _)| *v == 4)
        .expect("version 4");
    assert_eq!(gated.1, "failed", "{versions:?}\n{}", reports[0]);
    assert!(gated.2.contains("error rate"), "{versions:?}");
    cluster.wait_healthy("can", 3);

    // A good canary waits for promotion, then rolls out.
    let good = cluster.image("web:v3");
    let out = cluster.skiff(&[
        "service", "update", "can", "--image", &good, "--canary", "1",
    ]);
    assert!(
        out.status.success(),
        "{}",
        describe(&["service", "update"], &out)
    );
    let service = cluster.inspect("can");
    assert_eq!(
        service["deployment"]["status"], "awaiting-promotion",
        "{service:#}"
    );
    cluster.skiff_ok(&["service", "promote", "can"]);
    let service = cluster.wait_deployment_end("can", Duration::from_secs(60));
    assert_eq!(service["deployment"]["status"], "succeeded", "{service:#}");
    cluster.wait_healthy("can", 3);
    cluster.wait_answering(2, publish, "web v3");
}

#[test]
fn a_rolling_update_survives_the_leader_being_killed() {
    let mut cluster = Cluster::start(3);
    let publish = skiff_e2e::free_port();
    cluster.create(
        "ha",
        publish,
        4,
        "web:v2",
        &["--max-parallel", "1", "--min-healthy-time", "2s"],
    );
    cluster.wait_healthy("ha", 4);
    let image = cluster.image("web:v3");
    cluster.skiff_ok(&["service", "update", "ha", "--image", &image, "--detach"]);
    // Kill the leader once the update is under way.
    let under_way = wait_until(Duration::from_secs(30), POLL, || {
        cluster.inspect("ha")["deployment"]["new_placed"].as_u64() >= Some(1)
    });
    assert!(under_way);
    let leader = cluster.servers.leader().expect("a leader");
    cluster.servers.kill9(leader);
    let service = cluster.wait_deployment_end("ha", Duration::from_secs(90));
    assert_eq!(service["deployment"]["status"], "succeeded", "{service:#}");
    assert_eq!(service["version"], 2);
    cluster.wait_healthy("ha", 4);
    cluster.wait_answering(2, publish, "web v3");
}

/// Every field that used to need `rm` and `create` now rolls out as a new
/// version under load, with no failed request through either proxy; the
/// published port then moves, and a connection open on the old port is
/// still served.
#[test]
fn newly_updatable_fields_roll_out_with_no_failed_request_and_the_published_port_moves() {
    use std::io::{Read, Write};

    let cluster = Cluster::start(1);
    let publish = skiff_e2e::free_port();
    cluster.create(
        "fields",
        publish,
        2,
        "web:v2",
        &["--min-healthy-time", "500ms"],
    );
    cluster.wait_healthy("fields", 2);
    cluster.wait_answering(2, publish, "web v2");
    let loads = loads(&cluster, publish, Duration::from_secs(200));
    thread::sleep(Duration::from_secs(1));
    let changes: [&[&str]; 6] = [
        &["--protocol", "tcp"],
        &[
            "--constraint-rm",
            "node.name in (a1,a2)",
            "--constraint-add",
            "node.name!=a3",
        ],
        &["--placement", "binpack"],
        &["--workdir", "/"],
        &["--health-interval", "400ms"],
        &["--max-per-node", "2"],
    ];
    for (i, flags) in changes.iter().enumerate() {
        let mut args = vec!["service", "update", "fields"];
        args.extend_from_slice(flags);
        let out = cluster.skiff(&args);
        assert!(
            out.status.success(),
            "{}\n{}",
            describe(&args, &out),
            cluster.agents.logs()
        );
        let service = cluster.inspect("fields");
        assert_eq!(
            service["version"].as_u64(),
            Some(i as u64 + 2),
            "`{}` made no new version",
            args.join(" ")
        );
    }
    let reports = stop(loads);
    assert_no_failures(&reports, "six field updates");
    let spec = &cluster.inspect("fields")["spec"];
    assert_eq!(spec["protocol"], "tcp");
    assert_eq!(spec["constraints"][0], "node.name!=a3");
    assert_eq!(
        (spec["placement"].as_str(), spec["workdir"].as_str()),
        (Some("binpack"), Some("/"))
    );

    // The published port moves: every proxy takes the new port at the
    // commit, and a connection already open on the old one is still served
    // (its replica is replaced by the rollout like any other, surge-first
    // and drained, so the request goes out at once, well inside that).
    let mut open = std::net::TcpStream::connect(cluster.proxy(2, publish)).expect("connect");
    open.set_read_timeout(Some(Duration::from_secs(5))).ok();
    let moved = skiff_e2e::free_port();
    let to = moved.to_string();
    cluster.skiff_ok(&["service", "update", "fields", "--publish", &to, "--detach"]);
    open.write_all(b"GET / HTTP/1.0\r\n\r\n")
        .expect("send on the open connection");
    let mut answer = String::new();
    let _ = open.read_to_string(&mut answer);
    assert!(
        answer.contains("web v2"),
        "the open connection was dropped: {answer:?}"
    );
    cluster.wait_answering(2, moved, "web v2");
    let service = cluster.wait_deployment_end("fields", Duration::from_secs(60));
    assert_eq!(service["deployment"]["status"], "succeeded");
    let gone = wait_until(Duration::from_secs(10), POLL, || {
        std::net::TcpStream::connect(cluster.proxy(2, publish)).is_err()
    });
    assert!(gone, "the old port still listens");
}
