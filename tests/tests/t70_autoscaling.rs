//! Autoscaling end to end: a real `skiff server` with a short
//! `--autoscale-window` and one `skiff agent` (advertise 127.0.0.2) running
//! process-runtime replicas of a small Python HTTP/1.1 server behind the
//! routing proxy; the load comes from the bounded generator in
//! `skiff_e2e::load`.
//!
//! The CPU target runs busybox containers (the local registry's test images)
//! under runc in a `skiff dev`, measured from their cgroups.
//!
//! Agents get a short drain (`SKIFF_DRAIN_SECS`, set once before any agent
//! starts), so replicas removed by a scale-down go quickly.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Once;
use std::time::{Duration, Instant};

use serde_json::Value;
use skiff_e2e::agents::{AgentCluster, AgentSpec};
use skiff_e2e::containers::{OciDev, Registry};
use skiff_e2e::load::{ConnectionMode, Load, LoadConfig};
use skiff_e2e::servers::ServerCluster;
use skiff_e2e::{free_port, skiff_at, skiff_ok_at, wait_until, POLL};

/// Drain of every agent in this file, in seconds.
const DRAIN_SECS: &str = "1";
/// The longest a first request to a service at zero may take: placing a
/// replica, starting Python, one passing health check, the endpoints
/// reaching the proxy.
const COLD_START: Duration = Duration::from_secs(15);

const REPLICA: &str = r#"
import http.server, sys
port = int(sys.argv[1])
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = ("port=%d\n" % port).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
class S(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256
S(("0.0.0.0", port), H).serve_forever()
"#;

fn setup() {
    static ONCE: Once = Once::new();
    // Before any agent of this binary starts; std's environment lock keeps
    // it from racing with process spawns.
    ONCE.call_once(|| std::env::set_var("SKIFF_DRAIN_SECS", DRAIN_SECS));
}

/// A server with `window` as its autoscale window, and one agent.
fn cluster(window: &str) -> (ServerCluster, AgentCluster) {
    setup();
    let servers = ServerCluster::start(1, &["--autoscale-window", window]);
    let agents = AgentCluster::start(
        &servers.addresses,
        &[AgentSpec {
            name: "a1",
            advertise: "127.0.0.2",
            labels: &[],
        }],
    );
    (servers, agents)
}

/// Creates a published, autoscaled HTTP service at `replicas` replicas
/// with a fast health check.
fn create(server: &str, name: &str, publish: u16, replicas: u32, autoscale: &[&str]) {
    let publish = publish.to_string();
    let replicas = replicas.to_string();
    let mut args = vec![
        "service",
        "create",
        "--detach",
        name,
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
    ];
    args.extend_from_slice(autoscale);
    args.extend_from_slice(&["--", "python3", "-c", REPLICA, "$PORT"]);
    skiff_ok_at(server, &args);
}

/// The replica count in the service's spec: what the autoscaler set.
fn replicas(server: &str, name: &str) -> Option<u64> {
    let out = skiff_at(server, &["service", "inspect", name, "--output", "json"]);
    let inspect: Value = serde_json::from_slice(&out.stdout).ok()?;
    inspect["spec"]["replicas"].as_u64()
}

/// Waits (bounded) until the spec's count satisfies `done`; returns it.
fn wait_replicas(
    server: &str,
    agents: &AgentCluster,
    name: &str,
    limit: Duration,
    done: impl Fn(u64) -> bool,
) -> u64 {
    let mut last = None;
    let ok = wait_until(limit, POLL, || {
        last = replicas(server, name);
        last.is_some_and(&done)
    });
    assert!(
        ok,
        "{name}: replicas {last:?} after {limit:?}\n{}\n{}",
        events(server, name).join("\n"),
        agents.logs()
    );
    last.unwrap_or_default()
}

/// Live replicas reported healthy.
fn healthy(agents: &AgentCluster, name: &str) -> usize {
    agents
        .allocs(name)
        .iter()
        .filter(|a| a.desired == "run" && a.state == "healthy")
        .count()
}

/// The messages of `name`'s `service-scaled` events, oldest first.
fn events(server: &str, name: &str) -> Vec<String> {
    let out = skiff_at(server, &["events", "--service", name, "--output", "json"]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e["kind"] == "service-scaled")
        .filter_map(|e| e["message"].as_str().map(str::to_string))
        .collect()
}

/// The agent's metrics text, from the address it published.
fn scrape_metrics(server: &str, node: &str) -> String {
    let key = format!("_skiff/nodes/{node}/metrics");
    let out = skiff_at(server, &["var", "get", &key]);
    let Ok(addr) = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse::<SocketAddr>()
    else {
        return String::new();
    };
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
        return String::new();
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut text = String::new();
    let _ = stream.read_to_string(&mut text);
    text
}

/// Waits until `node`'s proxy listens for `name` (its series appear with
/// the listener), without connecting to it: a connection would wake it.
fn wait_listening(server: &str, agents: &AgentCluster, name: &str, node: &str) {
    let series = format!("skiff_proxy_endpoints{{service=\"{name}\",node=\"{node}\"}}");
    let ok = wait_until(Duration::from_secs(20), POLL, || {
        scrape_metrics(server, node).contains(&series)
    });
    assert!(
        ok,
        "{node}'s proxy never listened for {name}\n{}",
        agents.logs()
    );
}

/// One `GET /` on a new connection, allowing `limit` for the answer: the
/// status line and body.
fn get(addr: SocketAddr, limit: Duration) -> Result<(String, String), String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(limit))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: skiff\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .map_err(|e| format!("read: {e} after {answer:?}"))?;
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no response head in {answer:?}"))?;
    let status = head.lines().next().unwrap_or_default().to_string();
    Ok((status, body.to_string()))
}

#[test]
fn a_service_at_zero_answers_its_first_request_and_returns_to_zero_when_idle() {
    // Window 2 s: idle 10 s before scaling to zero.
    let (servers, agents) = cluster("2s");
    let server = servers.addresses[0].clone();
    let publish = free_port();
    create(
        &server,
        "cold",
        publish,
        0,
        &[
            "--autoscale-min",
            "0",
            "--autoscale-max",
            "3",
            "--target-concurrency",
            "1",
        ],
    );
    wait_listening(&server, &agents, "cold", "a1");
    assert!(agents.allocs("cold").is_empty(), "at zero replicas");
    assert_eq!(replicas(&server, "cold"), Some(0));

    let addr: SocketAddr = format!("127.0.0.2:{publish}").parse().unwrap();
    for round in ["first", "second"] {
        let started = Instant::now();
        let answer = get(addr, COLD_START);
        let took = started.elapsed();
        eprintln!("{round} request at zero replicas answered in {took:?}");
        let (status, body) = answer.unwrap_or_else(|e| {
            panic!(
                "{round} request failed after {took:?}: {e}\n{}\n{}",
                events(&server, "cold").join("\n"),
                agents.logs()
            )
        });
        assert_eq!(status, "HTTP/1.1 200 OK", "{body}");
        assert!(body.starts_with("port="), "{body}");
        assert!(took < COLD_START, "{took:?}");
        let scaled = events(&server, "cold");
        let woke = "0 -> 1 replicas: 1 connections waiting at zero replicas";
        assert!(scaled.iter().any(|m| m == woke), "{scaled:?}");

        // Idle: back to zero after the idle window, not before.
        let idle_from = Instant::now();
        wait_replicas(&server, &agents, "cold", Duration::from_secs(30), |n| {
            n == 0
        });
        let idle = idle_from.elapsed();
        eprintln!("{round}: back to zero after {idle:?} idle");
        assert!(idle >= Duration::from_secs(8), "{idle:?}");
        let scaled = events(&server, "cold");
        assert!(
            scaled
                .last()
                .is_some_and(|m| m.contains("1 -> 0 replicas: idle")),
            "{scaled:?}"
        );
        let gone = wait_until(Duration::from_secs(15), POLL, || {
            healthy(&agents, "cold") == 0
        });
        assert!(gone, "{:?}", agents.allocs("cold"));
    }
}

#[test]
fn concurrency_scales_out_without_failed_requests_and_back_in_after_the_window() {
    const WINDOW: Duration = Duration::from_secs(5);
    let (servers, agents) = cluster("5s");
    let server = servers.addresses[0].clone();
    let publish = free_port();
    create(
        &server,
        "web",
        publish,
        1,
        &[
            "--autoscale-min",
            "1",
            "--autoscale-max",
            "6",
            "--target-concurrency",
            "2",
        ],
    );
    let up = wait_until(Duration::from_secs(30), POLL, || {
        healthy(&agents, "web") == 1
    });
    assert!(up, "web never healthy\n{}", agents.logs());
    let addr: SocketAddr = format!("127.0.0.2:{publish}").parse().unwrap();
    let answering = wait_until(Duration::from_secs(20), POLL, || {
        get(addr, Duration::from_secs(5)).is_ok()
    });
    assert!(answering, "nothing answers on {addr}\n{}", agents.logs());

    // 8 kept-alive connections at 2 per replica: about 4 replicas needed.
    let steady = Load::start(LoadConfig {
        workers: 8,
        mode: ConnectionMode::KeepAlive,
        max_duration: Duration::from_secs(60),
        ..LoadConfig::new(addr)
    });
    let stepped = Instant::now();
    let mut last = (0, 0);
    let reached = wait_until(Duration::from_secs(40), POLL, || {
        let want = replicas(&server, "web").unwrap_or(0);
        last = (want, healthy(&agents, "web") as u64);
        (3..=5).contains(&want) && last.1 == want
    });
    assert!(
        reached,
        "replicas (spec, healthy) {last:?}\n{}\n{}",
        events(&server, "web").join("\n"),
        agents.logs()
    );
    eprintln!(
        "{} replicas serving {:?} after the load step",
        last.0,
        stepped.elapsed()
    );

    // New connections now spread over the new replicas too.
    let spread = Load::start(LoadConfig {
        workers: 1,
        mode: ConnectionMode::NewPerRequest,
        max_duration: Duration::from_secs(3),
        ..LoadConfig::new(addr)
    });
    std::thread::sleep(Duration::from_secs(3));
    let spread = spread.stop();
    let steady = steady.stop();
    let stopped = Instant::now();
    steady.assert_no_failures("while scaling out");
    spread.assert_no_failures("over the new replicas");
    let served: BTreeMap<String, usize> = spread.bodies();
    assert!(
        served.len() >= 2,
        "one replica served everything: {served:?}"
    );
    let during = replicas(&server, "web").unwrap_or(0);
    assert!((3..=5).contains(&during), "{during} replicas under load");

    // Load gone: back to 1 once the window has passed.
    wait_replicas(&server, &agents, "web", WINDOW * 5, |n| n == 1);
    let down = stopped.elapsed();
    eprintln!("back to 1 replica {down:?} after the load stopped");
    assert!(down >= WINDOW - Duration::from_secs(1), "{down:?}");
    let scaled = events(&server, "web");
    assert!(
        scaled
            .iter()
            .any(|m| m.starts_with("1 -> ") && m.contains("concurrency")),
        "{scaled:?}"
    );
    assert!(
        scaled
            .last()
            .is_some_and(|m| m.contains("-> 1 replicas: concurrency")),
        "{scaled:?}"
    );
}

#[test]
fn containers_busy_above_their_cpu_target_scale_up_to_max() {
    // Window 4 s: a 1 s scale-up cooldown.
    let registry = Registry::shared();
    let cluster = OciDev::start(registry.clone(), &["--autoscale-window", "4s"]);
    let server = cluster.addr();
    // An image without an entrypoint: the command is the container's.
    let image = registry.image("many:v1");
    // Each replica spins at its limit of a fifth of a CPU: 100% of it,
    // twice the target, so 1 replica asks for 2, and 2 for 4 (held at 3).
    cluster.skiff_ok(&[
        "service",
        "create",
        "--detach",
        "burn",
        "--image",
        &image,
        "--network",
        "host",
        "--cpu",
        "200",
        "--autoscale-min",
        "1",
        "--autoscale-max",
        "3",
        "--target-cpu",
        "50",
        "--",
        "/bin/sh",
        "-c",
        "while :; do :; done",
    ]);
    let created = Instant::now();
    let mut last = None;
    let reached = wait_until(Duration::from_secs(90), POLL, || {
        last = replicas(&server, "burn");
        last == Some(3)
    });
    assert!(
        reached,
        "burn: replicas {last:?} after 90 s\n{}\n--- dev log ---\n{}",
        events(&server, "burn").join("\n"),
        cluster.log_tail(60)
    );
    eprintln!("burn at 3 replicas {:?} after create", created.elapsed());
    let scaled = events(&server, "burn");
    eprintln!("{}", scaled.join("\n"));
    // One replica at its limit is two replicas' worth; two are four's,
    // held at max.
    assert_eq!(scaled.len(), 2, "{scaled:?}");
    assert!(
        scaled[0].starts_with("1 -> 2 replicas: cpu ") && scaled[0].contains("> target 50.0%"),
        "{scaled:?}"
    );
    // Two replicas at their limit would ask for four (held at max 3); on a
    // machine busy with other work they get less than their limit and ask
    // for three: either way the step is to the max.
    assert!(
        scaled[1].starts_with("2 -> 3 replicas: cpu ") && scaled[1].contains("> target 50.0%"),
        "{scaled:?}"
    );
    cluster.wait_replicas("burn", 3, "running", |a| a.is_running());

    // `service inspect` shows each replica's CPU, at its limit.
    let mut usage = Vec::new();
    let measured = wait_until(Duration::from_secs(20), POLL, || {
        usage = cluster.inspect("burn")["usage"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        usage.len() == 3
    });
    assert!(measured, "usage of burn: {usage:?}");
    // Busy (an idle replica reads about 0 %); how close to its limit it
    // gets depends on what else the machine runs.
    for replica in &usage {
        let percent = replica["cpu_percent"].as_f64().unwrap_or_default();
        assert!(percent > 25.0, "{replica}");
    }
    assert_eq!(replicas(&server, "burn"), Some(3), "held at max");
}
