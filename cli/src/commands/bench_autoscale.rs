//! `skiff bench autoscale`: how fast the autoscaler reacts to a load step,
//! and how many scale events a sawtooth load causes. A fresh `skiff server`
//! (with `--autoscale-window`) and `skiff agent` are started for the run;
//! the service runs process-runtime replicas of a small Python HTTP server
//! whose every answer takes `--request-ms`, behind the agent's routing
//! proxy. The load is `--connections` clients, each sending one request
//! per new connection (so they spread over new replicas) and starting the
//! next as soon as it is answered: the service's concurrency is about the
//! number of clients. Figures are printed, never asserted.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, Context};
use skiff_proto::v1 as pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::bench::free_port;
use crate::args::BenchAutoscaleArgs;
use crate::client::{connect, Client};

const POLL: Duration = Duration::from_millis(50);
/// Bound on any one wait (start, scale, settle).
const LIMIT: Duration = Duration::from_secs(120);
const SERVICE: &str = "bench-autoscale";

const REPLICA: &str = r#"
import http.server, sys, time
port, delay = int(sys.argv[1]), float(sys.argv[2]) / 1000
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        if self.path != "/health":
            time.sleep(delay)
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

/// The server and agent started for the run; killed (by PID, our own
/// children) and their data removed on drop.
struct Processes {
    children: Vec<Child>,
    dir: PathBuf,
}

impl Processes {
    fn start(args: &BenchAutoscaleArgs, server: &str) -> anyhow::Result<Processes> {
        let dir =
            std::env::temp_dir().join(format!("skiff-bench-autoscale-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let exe = std::env::current_exe()?;
        let mut processes = Processes {
            children: Vec::new(),
            dir: dir.clone(),
        };
        let window = format!("{}s", args.window);
        let mut command = Command::new(&exe);
        command
            .args(["server", "--name", "s1", "--bootstrap", "--listen", server])
            .args(["--autoscale-window", &window])
            .arg("--data-dir")
            .arg(dir.join("server"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("server.log"))?);
        processes
            .children
            .push(command.spawn().context("failed to start skiff server")?);
        let token = super::bench::agent_join_token(&dir.join("server"), Duration::from_secs(10))?;
        let mut command = Command::new(&exe);
        command
            .args(["agent", "--name", "bench", "--servers", server])
            .args(["--token", &token])
            .args(["--advertise", "127.0.0.1", "--stop-grace-secs", "1"])
            .arg("--enable-process-runtime")
            .arg("--data-dir")
            .arg(dir.join("agent"))
            .arg("--port-range")
            .arg(format!("{}-{}", args.port_range.0, args.port_range.1))
            .env("SKIFF_DRAIN_SECS", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("agent.log"))?);
        processes
            .children
            .push(command.spawn().context("failed to start skiff agent")?);
        Ok(processes)
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        // The agent first (SIGTERM: it stops its replicas), then the server.
        for child in self.children.iter_mut().rev() {
            if let Ok(pid) = i32::try_from(child.id()) {
                let _ = Command::new("kill").arg(pid.to_string()).status();
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline && !matches!(child.try_wait(), Ok(Some(_))) {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::env::var_os("SKIFF_BENCH_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The clients: `level` of them send requests; every answer's replica and
/// time are kept.
struct Clients {
    level: Arc<AtomicUsize>,
    started: Instant,
    /// Per replica (its answer), when it first answered after each mark.
    answers: Arc<Mutex<Vec<(Duration, String)>>>,
    failures: Arc<AtomicU64>,
    requests: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Clients {
    fn start(addr: SocketAddr, connections: usize) -> Clients {
        let level = Arc::new(AtomicUsize::new(0));
        let started = Instant::now();
        let answers = Arc::new(Mutex::new(Vec::new()));
        let failures = Arc::new(AtomicU64::new(0));
        let requests = Arc::new(AtomicU64::new(0));
        let tasks = (0..connections)
            .map(|i| {
                let (level, answers) = (level.clone(), answers.clone());
                let (failures, requests) = (failures.clone(), requests.clone());
                tokio::spawn(async move {
                    loop {
                        if i >= level.load(Ordering::Relaxed) {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            continue;
                        }
                        requests.fetch_add(1, Ordering::Relaxed);
                        match tokio::time::timeout(Duration::from_secs(30), get(addr)).await {
                            Ok(Ok(body)) => answers
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .push((started.elapsed(), body)),
                            _ => {
                                failures.fetch_add(1, Ordering::Relaxed);
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                        }
                    }
                })
            })
            .collect();
        Clients {
            level,
            started,
            answers,
            failures,
            requests,
            tasks,
        }
    }

    fn set(&self, level: usize) {
        self.level.store(level, Ordering::Relaxed);
    }

    /// Replicas that answered since `since` (offset from the start).
    fn replicas_since(&self, since: Duration) -> usize {
        let answers = self.answers.lock().unwrap_or_else(|p| p.into_inner());
        let mut seen: Vec<&str> = answers
            .iter()
            .rev()
            .take_while(|(at, _)| *at >= since)
            .map(|(_, body)| body.as_str())
            .collect();
        seen.sort_unstable();
        seen.dedup();
        seen.len()
    }
}

impl Drop for Clients {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// One `GET /` on a new connection; the body (the replica's port).
async fn get(addr: SocketAddr) -> anyhow::Result<String> {
    let mut stream = TcpStream::connect(addr).await?;
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        .await?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await?;
    let answer = String::from_utf8_lossy(&answer);
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("no response head"))?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(anyhow!("{}", head.lines().next().unwrap_or_default()));
    }
    Ok(body.trim().to_string())
}

async fn status(client: &mut Client) -> anyhow::Result<pb::ServiceStatus> {
    Ok(client
        .get_service(pb::GetServiceRequest {
            name: SERVICE.into(),
            show_values: false,
        })
        .await
        .map_err(|e| anyhow!("failed to read {SERVICE}: {}", e.message()))?
        .into_inner())
}

fn healthy(status: &pb::ServiceStatus) -> u32 {
    status
        .allocations
        .iter()
        .filter(|a| a.desired == "run" && a.state == "healthy")
        .count() as u32
}

fn wanted(status: &pb::ServiceStatus) -> u32 {
    status.spec.as_ref().map_or(0, |s| s.replicas)
}

/// The service's scale events committed at or after `since_ms`.
async fn scale_events(client: &mut Client, since_ms: u64) -> anyhow::Result<Vec<pb::Event>> {
    let mut stream = client
        .events(pb::EventsRequest {
            service: SERVICE.into(),
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow!("failed to read events: {}", e.message()))?
        .into_inner();
    let mut events = Vec::new();
    while let Some(event) = stream
        .message()
        .await
        .map_err(|e| anyhow!("failed to read events: {}", e.message()))?
    {
        if event.kind == "service-scaled" && event.time_ms >= since_ms {
            events.push(event);
        }
    }
    Ok(events)
}

fn epoch_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

/// Waits (bounded) until `done` holds for the service's status.
async fn wait_for(
    client: &mut Client,
    what: &str,
    done: impl Fn(&pb::ServiceStatus) -> bool,
) -> anyhow::Result<pb::ServiceStatus> {
    let started = Instant::now();
    loop {
        let status = status(client).await?;
        if done(&status) {
            return Ok(status);
        }
        if started.elapsed() > LIMIT {
            return Err(anyhow!(
                "{what}: not within {LIMIT:?} ({} wanted, {} healthy)",
                wanted(&status),
                healthy(&status)
            ));
        }
        tokio::time::sleep(POLL).await;
    }
}

pub async fn run(args: BenchAutoscaleArgs) -> anyhow::Result<()> {
    if args.connections == 0 || args.target_concurrency <= 0.0 {
        return Err(anyhow!(
            "invalid load: use --connections 1 or more and a positive --target-concurrency"
        ));
    }
    let server = format!("127.0.0.1:{}", free_port()?);
    let publish = free_port()?;
    let processes = Processes::start(&args, &server)?;
    super::bench::use_management_token(&processes.dir.join("server"), Duration::from_secs(20))
        .await
        .context("the bench server did not start")?;
    let mut client = {
        let started = Instant::now();
        loop {
            match connect(&server).await {
                Ok(client) => break client,
                Err(_) if started.elapsed() < Duration::from_secs(20) => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                Err(e) => return Err(e.context("the bench server did not start")),
            }
        }
    };
    let spec = pb::ServiceSpec {
        name: SERVICE.into(),
        runtime: "process".into(),
        replicas: 1,
        command: vec![
            "python3".into(),
            "-c".into(),
            REPLICA.into(),
            "$PORT".into(),
            args.request_ms.to_string(),
        ],
        health: Some(pb::HealthCheck {
            kind: "http".into(),
            http_path: "/health".into(),
            interval_ms: 250,
            timeout_ms: 250,
            retries: 3,
            ..Default::default()
        }),
        publish: u32::from(publish),
        protocol: "http".into(),
        autoscale: Some(pb::Autoscale {
            min: 1,
            max: args.max,
            target_concurrency: args.target_concurrency,
            ..Default::default()
        }),
        ..Default::default()
    };
    let registered = Instant::now();
    loop {
        let nodes = client
            .list_nodes(pb::ListNodesRequest {})
            .await
            .map_err(|e| anyhow!("failed to list nodes: {}", e.message()))?
            .into_inner()
            .nodes;
        if nodes.iter().any(|n| n.status == "ready") {
            break;
        }
        if registered.elapsed() > Duration::from_secs(20) {
            return Err(anyhow!("the bench agent did not register within 20 s"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    client
        .create_service(pb::CreateServiceRequest { spec: Some(spec) })
        .await
        .map_err(|e| anyhow!("failed to create {SERVICE}: {}", e.message()))?;
    wait_for(&mut client, "first replica healthy", |s| healthy(s) == 1).await?;
    let addr = SocketAddr::from(([127, 0, 0, 1], publish));
    let answering = Instant::now();
    while get(addr).await.is_err() {
        if answering.elapsed() > Duration::from_secs(20) {
            return Err(anyhow!("nothing answers on {addr}"));
        }
        tokio::time::sleep(POLL).await;
    }

    let clients = Clients::start(addr, args.connections);
    let need = (args.connections as f64 / args.target_concurrency).ceil() as u32;
    println!(
        "autoscale bench: {} connections of {} ms requests, target concurrency {} (about {} replicas), max {}, window {} s",
        args.connections,
        args.request_ms,
        args.target_concurrency,
        need.min(args.max),
        args.max,
        args.window
    );

    // The step: from idle to every connection.
    let step = clients.started.elapsed();
    let step_ms = epoch_ms();
    let stepped = Instant::now();
    clients.set(args.connections);
    let mut scaled = None;
    let mut all_healthy = None;
    let mut serving = None;
    while serving.is_none() {
        let status = status(&mut client).await?;
        let want = wanted(&status);
        if scaled.is_none() && want > 1 {
            scaled = Some((stepped.elapsed(), want));
        }
        if all_healthy.is_none() && want > 1 && healthy(&status) >= want {
            all_healthy = Some(stepped.elapsed());
        }
        if want > 1 && clients.replicas_since(step) >= want as usize {
            serving = Some((stepped.elapsed(), want));
        }
        if stepped.elapsed() > LIMIT {
            return Err(anyhow!(
                "no scale-out within {LIMIT:?}: {want} wanted, {} healthy, {} replicas answered",
                healthy(&status),
                clients.replicas_since(step)
            ));
        }
        tokio::time::sleep(POLL).await;
    }
    let events = scale_events(&mut client, step_ms).await?;
    let first = events.first().map_or(String::new(), |e| e.message.clone());
    if let Some((at, _)) = scaled {
        println!("step: scale event after {} ({first})", ms(at));
    }
    if let Some(at) = all_healthy {
        println!("step: new replicas healthy after {}", ms(at));
    }
    if let Some((at, want)) = serving {
        println!(
            "step: all {want} replicas serving traffic after {} (reaction target: under 10 s)",
            ms(at)
        );
    }

    // The sawtooth: ramps up in four steps per period, then drops.
    let start_ms = epoch_ms();
    let sawtooth = Instant::now();
    let levels = [
        args.connections / 4,
        args.connections / 2,
        args.connections * 3 / 4,
        args.connections,
    ];
    let stage = Duration::from_secs(args.period.max(1)) / levels.len() as u32;
    let mut changes = 0;
    let mut level = args.connections;
    let mut counts: BTreeMap<u32, usize> = BTreeMap::new();
    while sawtooth.elapsed() < Duration::from_secs(args.duration) {
        let i = (sawtooth.elapsed().as_millis() / stage.as_millis().max(1)) as usize;
        let next = levels[i % levels.len()].max(1);
        if next != level {
            level = next;
            changes += 1;
            clients.set(level);
        }
        let want = wanted(&status(&mut client).await?);
        *counts.entry(want).or_default() += 1;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let events = scale_events(&mut client, start_ms).await?;
    println!(
        "sawtooth: {} over {} s (period {} s, levels {:?} connections): {} load changes, {} scale events",
        if events.len() <= changes {
            "ok"
        } else {
            "more scale events than load changes"
        },
        args.duration,
        args.period,
        levels,
        changes,
        events.len()
    );
    let total: usize = counts.values().sum();
    let share: Vec<String> = counts
        .iter()
        .map(|(n, c)| format!("{n}: {:.0}%", *c as f64 * 100.0 / total.max(1) as f64))
        .collect();
    println!("sawtooth: time at each replica count: {}", share.join(", "));
    for event in &events {
        println!(
            "  +{:>6.1} s  {}",
            event.time_ms.saturating_sub(start_ms) as f64 / 1000.0,
            event.message
        );
    }
    println!(
        "requests: {} sent, {} failed",
        clients.requests.load(Ordering::Relaxed),
        clients.failures.load(Ordering::Relaxed)
    );
    clients.set(0);
    drop(clients);
    let _ = client
        .remove_service(pb::RemoveServiceRequest {
            name: SERVICE.into(),
        })
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    drop(processes);
    Ok(())
}
