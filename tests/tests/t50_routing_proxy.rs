//! The routing proxy end to end: a real `skiff server` and two `skiff agent`
//! processes (advertise 127.0.0.2 and 127.0.0.3, own port ranges) running
//! process-runtime replicas of a small Python HTTP/1.1 server that answers
//! with its own port (so a test knows which replica served it) and sleeps on
//! `/slow`.
//!
//! Agents get a short drain (`SKIFF_DRAIN_SECS`, set once before any agent
//! starts, since the shared agent helper takes no extra flags).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use skiff_e2e::agents::{on_loopback, AgentCluster, AgentSpec};
use skiff_e2e::servers::ServerCluster;
use skiff_e2e::{free_port, sigkill, skiff_at, skiff_ok_at, wait_until, Allocation, POLL};

/// Drain of every agent in this file, in seconds.
const DRAIN_SECS: &str = "4";
/// How long `/slow` sleeps, well inside the drain.
const SLOW: Duration = Duration::from_secs(2);

const REPLICA: &str = r#"
import http.server, sys, time
port = int(sys.argv[1])
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        if self.path.startswith("/slow"):
            time.sleep(2)
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

fn specs() -> [AgentSpec<'static>; 2] {
    on_loopback(["a1", "a2"])
}

/// Creates a published HTTP service of `replicas` replicas with a fast
/// health check; `extra` adds flags (e.g. a constraint).
fn create(server: &str, name: &str, publish: u16, replicas: u32, extra: &[&str]) {
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
        "500ms",
    ];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--", "python3", "-c", REPLICA, "$PORT"]);
    skiff_ok_at(server, &args);
}

fn wait_healthy(agents: &AgentCluster, service: &str, n: usize) -> Vec<Allocation> {
    let mut last = Vec::new();
    let ok = wait_until(Duration::from_secs(40), POLL, || {
        last = agents
            .allocs(service)
            .into_iter()
            .filter(|a| a.desired == "run" && a.state == "healthy")
            .collect();
        last.len() == n
    });
    assert!(ok, "{service}: {last:?} healthy of {n}\n{}", agents.logs());
    last
}

// ---------------------------------------------------------------------------------------------
// A small HTTP/1.1 client
// ---------------------------------------------------------------------------------------------

// The details are read through `Debug` in failure messages.
#[allow(dead_code)]
#[derive(Debug)]
enum Failure {
    /// The connection ended before any byte of the response.
    NoResponse(String),
    /// Anything else: refused, timed out, a partial or bad response.
    Other(String),
}

struct Conn {
    reader: BufReader<TcpStream>,
}

impl Conn {
    fn open(addr: SocketAddr) -> Result<Self, Failure> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
            .map_err(|e| Failure::Other(format!("connect {addr}: {e}")))?;
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .and_then(|()| stream.set_write_timeout(Some(Duration::from_secs(5))))
            .and_then(|()| stream.set_nodelay(true))
            .map_err(|e| Failure::Other(e.to_string()))?;
        Ok(Conn {
            reader: BufReader::new(stream),
        })
    }

    /// One `GET path` on this connection; the body on 200.
    fn get(&mut self, path: &str) -> Result<String, Failure> {
        let request = format!("GET {path} HTTP/1.1\r\nHost: skiff\r\n\r\n");
        self.reader
            .get_mut()
            .write_all(request.as_bytes())
            .map_err(|e| Failure::NoResponse(format!("write: {e}")))?;
        let mut status = String::new();
        match self.reader.read_line(&mut status) {
            Ok(0) => return Err(Failure::NoResponse("closed".into())),
            Ok(_) => {}
            Err(e) => return Err(Failure::NoResponse(format!("read: {e}"))),
        }
        if !status.starts_with("HTTP/1.1 200") {
            return Err(Failure::Other(format!("status line {status:?}")));
        }
        let mut length = None;
        loop {
            let mut line = String::new();
            match self.reader.read_line(&mut line) {
                Ok(0) => return Err(Failure::Other("closed in the head".into())),
                Ok(_) => {}
                Err(e) => return Err(Failure::Other(format!("read head: {e}"))),
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    length = v.trim().parse::<usize>().ok();
                }
            }
        }
        let length = length.ok_or_else(|| Failure::Other("no content-length".into()))?;
        let mut body = vec![0u8; length];
        self.reader
            .read_exact(&mut body)
            .map_err(|e| Failure::Other(format!("read body: {e}")))?;
        Ok(String::from_utf8_lossy(&body).into_owned())
    }
}

/// `GET path` on a new connection.
fn get_once(addr: SocketAddr, path: &str) -> Result<String, Failure> {
    Conn::open(addr)?.get(path)
}

fn proxy(ip: &str, port: u16) -> SocketAddr {
    format!("{ip}:{port}").parse().unwrap()
}

/// Waits until `addr` answers through the proxy.
fn wait_answering(addr: SocketAddr, agents: &AgentCluster) {
    let ok = wait_until(Duration::from_secs(30), POLL, || {
        get_once(addr, "/").is_ok()
    });
    assert!(ok, "nothing answers on {addr}\n{}", agents.logs());
}

// ---------------------------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------------------------

/// The agent's metrics address as it published it.
fn metrics_addr(server: &str, node: &str) -> SocketAddr {
    let key = format!("_skiff/nodes/{node}/metrics");
    let mut addr = None;
    wait_until(Duration::from_secs(10), POLL, || {
        let out = skiff_at(server, &["var", "get", &key]);
        addr = String::from_utf8_lossy(&out.stdout).trim().parse().ok();
        out.status.success() && addr.is_some()
    });
    addr.unwrap_or_else(|| panic!("{node} published no metrics address"))
}

/// Scrapes `/metrics` and parses it strictly as Prometheus text (see
/// `skiff_e2e::metrics`). Keyed by `name{service="..",node=".."}`.
fn scrape(addr: SocketAddr) -> BTreeMap<String, f64> {
    skiff_e2e::metrics::scrape(addr).by_key()
}

fn metric(samples: &BTreeMap<String, f64>, name: &str, service: &str, node: &str) -> u64 {
    let key = format!("{name}{{service=\"{service}\",node=\"{node}\"}}");
    samples.get(&key).copied().unwrap_or(0.0) as u64
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn any_node_answers_for_replicas_placed_on_another_and_metrics_match_the_clients_counts() {
    setup();
    let servers = ServerCluster::start(1, &[]);
    let server = servers.addresses[0].clone();
    let agents = AgentCluster::start(&servers.addresses, &specs());
    let publish = free_port();
    create(
        &server,
        "web",
        publish,
        2,
        &["--constraint", "node.name==a1"],
    );
    let replicas = wait_healthy(&agents, "web", 2);
    assert!(replicas.iter().all(|a| a.node == "a1"), "{replicas:?}");
    let ports: BTreeSet<String> = replicas
        .iter()
        .map(|a| format!("port={}\n", a.host_port))
        .collect();

    // a2 runs no replica of web, yet its proxy answers.
    let other = proxy("127.0.0.3", publish);
    wait_answering(other, &agents);
    let a2_metrics = metrics_addr(&server, "a2");
    let a1_metrics = metrics_addr(&server, "a1");
    let before = scrape(a2_metrics);
    let a1_before = scrape(a1_metrics);

    let mut served = BTreeSet::new();
    const NEW: u64 = 40;
    const KEEP_ALIVE: u64 = 30;
    for _ in 0..NEW {
        served.insert(get_once(other, "/").expect("a new connection through a2"));
    }
    let mut conn = Conn::open(other).unwrap();
    for _ in 0..KEEP_ALIVE {
        served.insert(conn.get("/x").expect("keep-alive through a2"));
    }
    drop(conn);
    assert_eq!(served, ports, "both replicas on a1 served through a2");

    // Counters are updated as bytes pass; the last connection's close is
    // seen a moment later.
    let mut after = BTreeMap::new();
    let settled = wait_until(Duration::from_secs(5), POLL, || {
        after = scrape(a2_metrics);
        metric(&after, "skiff_proxy_active_connections", "web", "a2") == 0
    });
    assert!(settled, "connections still active: {after:?}");
    let delta = |name: &str| metric(&after, name, "web", "a2") - metric(&before, name, "web", "a2");
    assert_eq!(delta("skiff_proxy_connections_total"), NEW + 1);
    assert_eq!(delta("skiff_proxy_http_requests_total"), NEW + KEEP_ALIVE);
    let request_bytes = NEW * "GET / HTTP/1.1\r\nHost: skiff\r\n\r\n".len() as u64
        + KEEP_ALIVE * "GET /x HTTP/1.1\r\nHost: skiff\r\n\r\n".len() as u64;
    assert_eq!(delta("skiff_proxy_received_bytes_total"), request_bytes);
    assert_eq!(delta("skiff_proxy_no_endpoint_total"), 0);
    assert_eq!(metric(&after, "skiff_proxy_endpoints", "web", "a2"), 2);
    // a1's proxy saw none of it.
    let a1_after = scrape(a1_metrics);
    assert_eq!(
        metric(&a1_after, "skiff_proxy_connections_total", "web", "a1"),
        metric(&a1_before, "skiff_proxy_connections_total", "web", "a1")
    );

    // The report reaches the control plane (`service inspect`).
    let mut traffic = Value::Null;
    let reported = wait_until(Duration::from_secs(10), POLL, || {
        let out = skiff_at(&server, &["service", "inspect", "web", "--output", "json"]);
        traffic =
            serde_json::from_slice::<Value>(&out.stdout).unwrap_or_default()["traffic"].clone();
        traffic.as_array().is_some_and(|t| {
            t.iter().any(|r| {
                r["node"] == "a2"
                    && r["requests"].as_u64().unwrap_or(0)
                        >= metric(&after, "skiff_proxy_http_requests_total", "web", "a2")
            })
        })
    });
    assert!(reported, "traffic not reported: {traffic}");
}

#[test]
fn load_while_replicas_are_killed_and_replaced_fails_no_request_that_was_not_in_flight() {
    setup();
    let servers = ServerCluster::start(1, &[]);
    let server = servers.addresses[0].clone();
    let agents = AgentCluster::start(&servers.addresses, &specs());
    let publish = free_port();
    create(&server, "load", publish, 2, &[]);
    wait_healthy(&agents, "load", 2);
    let targets = [proxy("127.0.0.2", publish), proxy("127.0.0.3", publish)];
    for t in targets {
        wait_answering(t, &agents);
    }

    let start = Instant::now();
    let kills: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let done = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let broken_keep_alive = Arc::new(AtomicU64::new(0));
    let failures: Arc<Mutex<Vec<String>>> = Arc::default();
    /// Upper bound on requests, whatever happens.
    const MAX_REQUESTS: u64 = 6000;
    let in_flight_at_kill = |kills: &[Duration], from: Duration, to: Duration| {
        kills.iter().any(|k| from <= *k && *k <= to)
    };

    let mut clients = Vec::new();
    for i in 0..8 {
        let target = targets[i % 2];
        let keep_alive = i >= 4;
        let (kills, done, ok, broken, failures) = (
            kills.clone(),
            done.clone(),
            ok.clone(),
            broken_keep_alive.clone(),
            failures.clone(),
        );
        clients.push(thread::spawn(move || {
            let mut conn: Option<(Conn, Duration)> = None;
            while !done.load(Ordering::Relaxed) && ok.load(Ordering::Relaxed) < MAX_REQUESTS {
                thread::sleep(Duration::from_millis(5));
                let from = start.elapsed();
                if !keep_alive {
                    match get_once(target, "/") {
                        Ok(_) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            let to = start.elapsed();
                            if !in_flight_at_kill(&kills.lock().unwrap(), from, to) {
                                failures
                                    .lock()
                                    .unwrap()
                                    .push(format!("new connection to {target} at {from:?}: {e:?}"));
                            }
                        }
                    }
                    continue;
                }
                let reused = conn.is_some();
                let (mut c, opened) = match conn.take() {
                    Some(c) => c,
                    None => match Conn::open(target) {
                        Ok(c) => (c, from),
                        Err(e) => {
                            failures
                                .lock()
                                .unwrap()
                                .push(format!("connect to {target} at {from:?}: {e:?}"));
                            continue;
                        }
                    },
                };
                match c.get("/") {
                    Ok(_) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                        conn = Some((c, opened));
                    }
                    Err(e) => {
                        let to = start.elapsed();
                        let kills = kills.lock().unwrap();
                        // A keep-alive connection whose replica was killed
                        // while it was open ends before any response byte;
                        // like any HTTP client, reconnect and resend (the
                        // retry itself must succeed).
                        let broken_by_kill = reused
                            && matches!(e, Failure::NoResponse(_))
                            && in_flight_at_kill(&kills, opened, to);
                        if broken_by_kill {
                            broken.fetch_add(1, Ordering::Relaxed);
                            drop(kills);
                            let retry = start.elapsed();
                            match Conn::open(target).and_then(|mut c| {
                                let body = c.get("/")?;
                                Ok((c, body))
                            }) {
                                Ok((c, _)) => {
                                    ok.fetch_add(1, Ordering::Relaxed);
                                    conn = Some((c, retry));
                                }
                                Err(e) => failures.lock().unwrap().push(format!(
                                    "retry on a new connection to {target} at {retry:?}: {e:?}"
                                )),
                            }
                        } else if !in_flight_at_kill(&kills, from, to) {
                            failures
                                .lock()
                                .unwrap()
                                .push(format!("keep-alive request to {target} at {from:?}: {e:?}"));
                        }
                    }
                }
            }
        }));
    }

    // Kill a replica, wait until it is replaced and healthy, three times.
    thread::sleep(Duration::from_millis(500));
    for round in 0..3 {
        let victims = wait_healthy(&agents, "load", 2);
        let victim = &victims[round % 2];
        kills.lock().unwrap().push(start.elapsed());
        sigkill(victim.pid);
        let replaced = wait_until(Duration::from_secs(30), POLL, || {
            agents
                .allocs("load")
                .iter()
                .any(|a| a.id == victim.id && a.state == "healthy" && a.pid != victim.pid)
        });
        assert!(replaced, "{} never came back\n{}", victim.id, agents.logs());
        thread::sleep(Duration::from_millis(300));
    }
    done.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    let failures = failures.lock().unwrap();
    let total = ok.load(Ordering::Relaxed);
    eprintln!(
        "load: {total} requests answered, {} keep-alive connections broken by kills (retried), {} failures not in flight",
        broken_keep_alive.load(Ordering::Relaxed),
        failures.len()
    );
    assert!(total >= 1000, "too little load to mean anything: {total}");
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn a_stopping_replica_gets_no_new_connections_and_finishes_its_in_flight_request() {
    setup();
    let servers = ServerCluster::start(1, &[]);
    let server = servers.addresses[0].clone();
    let agents = AgentCluster::start(&servers.addresses, &specs());
    let publish = free_port();
    create(&server, "drain", publish, 2, &[]);
    let replicas = wait_healthy(&agents, "drain", 2);
    let target = proxy("127.0.0.2", publish);
    wait_answering(target, &agents);
    let metrics = [
        (metrics_addr(&server, "a1"), "a1"),
        (metrics_addr(&server, "a2"), "a2"),
    ];

    // Four slow requests through one proxy: least-connections gives each
    // replica two.
    let slow: Vec<_> = (0..4)
        .map(|_| {
            let started = Instant::now();
            let handle = thread::spawn(move || get_once(target, "/slow"));
            thread::sleep(Duration::from_millis(50));
            (started, handle)
        })
        .collect();
    thread::sleep(Duration::from_millis(200));
    skiff_ok_at(&server, &["service", "scale", "drain", "1"]);
    let mut stopping = None;
    wait_until(Duration::from_secs(5), Duration::from_millis(50), || {
        stopping = agents
            .allocs("drain")
            .into_iter()
            .find(|a| a.desired == "stop");
        stopping.is_some()
    });
    let stopping = stopping.expect("one replica asked to stop");
    let stopping_body = format!("port={}\n", stopping.host_port);
    let left_pool = wait_until(Duration::from_secs(5), Duration::from_millis(50), || {
        metrics
            .iter()
            .all(|(addr, node)| metric(&scrape(*addr), "skiff_proxy_endpoints", "drain", node) == 1)
    });
    assert!(left_pool, "the stopping replica is still in a pool");

    // While it drains (still running), new connections go elsewhere.
    let mut new_bodies = BTreeSet::new();
    for i in 0..40 {
        let via = if i % 2 == 0 {
            target
        } else {
            proxy("127.0.0.3", publish)
        };
        new_bodies.insert(get_once(via, "/").expect("new connection while draining"));
    }
    assert!(
        !new_bodies.contains(&stopping_body),
        "the stopping replica got a new connection: {new_bodies:?}"
    );
    let still_running = agents
        .allocs("drain")
        .into_iter()
        .any(|a| a.id == stopping.id && a.state != "stopped");
    assert!(still_running, "the drain ended too early to tell");

    // Its in-flight requests complete.
    let mut bodies = Vec::new();
    for (started, handle) in slow {
        let body = handle.join().unwrap().expect("in-flight slow request");
        assert!(started.elapsed() >= SLOW);
        bodies.push(body);
    }
    assert!(
        bodies.contains(&stopping_body),
        "no in-flight request was on the stopping replica: {bodies:?} vs {stopping_body:?} ({replicas:?})"
    );

    // Then it stops.
    let stopped = wait_until(Duration::from_secs(20), POLL, || {
        agents
            .allocs("drain")
            .iter()
            .all(|a| a.id != stopping.id || a.state == "stopped")
    });
    assert!(stopped, "{} never stopped\n{}", stopping.id, agents.logs());
}
