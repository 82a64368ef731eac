//! `skiff bench rollout`: wall time of deployments under HTTP load through
//! the routing proxy. A fresh `skiff server` and `skiff agent` (child
//! processes of this executable) are started for the run; it times
//!
//! - a rolling update of `--replicas` replicas (`--max-parallel`,
//!   min_healthy_time 0),
//! - a blue-green switch of `--replicas` replicas (green started beside
//!   blue, promoted once all green replicas are healthy),
//! - a rolling update of `--swarm-replicas` replicas with
//!   `--swarm-parallel` (the Docker Swarm comparison of issue 7),
//!
//! each while a few threads send HTTP GETs to the agent's routing proxy and
//! count the requests that failed. Next to every rolling update it prints
//! the theoretical bound batches × (start + health check + drain), where
//! "start + health check" is the time one replica of the new image takes to
//! become healthy in the same run and the drain is the agent's configured
//! `--drain-secs`. Every service is removed and its containers gone before
//! the next step and before the processes are stopped. Figures are printed,
//! never asserted.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::anyhow;
use skiff_proto::v1 as pb;

use super::bench::{free_port, BenchAgent, BenchAgentOptions, LocalCluster};
use crate::args::BenchRolloutArgs;
use crate::client::{connect, Client};

const POLL: Duration = Duration::from_millis(20);
/// Bound on any one wait (pull, start, deployment, removal).
const LIMIT: Duration = Duration::from_secs(300);
/// Load before an update starts and after it ended.
const SETTLE: Duration = Duration::from_secs(1);
/// Docker Swarm on this machine, 10 replicas, parallelism 2, delay 0
/// (issue 7).
const SWARM_SECS: (f64, f64) = (19.6, 23.7);

// ---------------------------------------------------------------------------
// HTTP load through the routing proxy
// ---------------------------------------------------------------------------

#[derive(Default)]
struct Seen {
    count: usize,
    first: Option<Instant>,
    last: Option<Instant>,
}

#[derive(Default)]
struct Tally {
    ok: usize,
    /// Slowest request (successful or not) and when it was sent.
    slowest: Option<(Duration, Instant)>,
    /// Failed requests by reason.
    failed: BTreeMap<String, usize>,
    /// Successful responses by the first line of their body.
    bodies: BTreeMap<String, Seen>,
}

/// Worker threads sending `GET /` to one address until stopped: even ones
/// keep their connection alive, odd ones open one per request.
struct Load {
    stop: Arc<AtomicBool>,
    tally: Arc<Mutex<Tally>>,
    threads: Vec<JoinHandle<()>>,
}

impl Load {
    fn start(addr: SocketAddr, threads: usize, pause: Duration) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let tally = Arc::new(Mutex::new(Tally::default()));
        let threads = (0..threads)
            .map(|worker| {
                let (stop, tally) = (stop.clone(), tally.clone());
                std::thread::spawn(move || {
                    let keep_alive = worker % 2 == 0;
                    let mut conn: Option<TcpStream> = None;
                    while !stop.load(Ordering::Relaxed) {
                        let sent = Instant::now();
                        let result = request(addr, &mut conn, keep_alive);
                        let now = Instant::now();
                        let mut tally = tally.lock().unwrap_or_else(|e| e.into_inner());
                        if tally.slowest.is_none_or(|(took, _)| now - sent > took) {
                            tally.slowest = Some((now - sent, sent));
                        }
                        match result {
                            Ok(body) => {
                                tally.ok += 1;
                                let seen = tally.bodies.entry(body).or_default();
                                seen.count += 1;
                                seen.first.get_or_insert(now);
                                seen.last = Some(now);
                            }
                            Err(reason) => {
                                conn = None;
                                *tally.failed.entry(reason).or_default() += 1;
                            }
                        }
                        drop(tally);
                        std::thread::sleep(pause);
                    }
                })
            })
            .collect();
        Load {
            stop,
            tally,
            threads,
        }
    }

    fn finish(mut self) -> Tally {
        self.stop.store(true, Ordering::Relaxed);
        for thread in std::mem::take(&mut self.threads) {
            let _ = thread.join();
        }
        std::mem::take(&mut *self.tally.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl Drop for Load {
    /// A step that failed or was interrupted stops its workers too.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Connect, read and write limit of one request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// One `GET /`; the first line of a 2xx response's body, or why it failed.
/// Reuses `conn` if given and leaves a reusable connection in it.
fn request(
    addr: SocketAddr,
    conn: &mut Option<TcpStream>,
    keep_alive: bool,
) -> Result<String, String> {
    let mut stream = match conn.take() {
        Some(stream) => stream,
        None => {
            let stream = TcpStream::connect_timeout(&addr, REQUEST_TIMEOUT)
                .map_err(|e| format!("connect: {}", e.kind()))?;
            stream
                .set_read_timeout(Some(REQUEST_TIMEOUT))
                .and_then(|()| stream.set_write_timeout(Some(REQUEST_TIMEOUT)))
                .and_then(|()| stream.set_nodelay(true))
                .map_err(|e| format!("socket: {}", e.kind()))?;
            stream
        }
    };
    let connection = if keep_alive { "keep-alive" } else { "close" };
    stream
        .write_all(
            format!("GET / HTTP/1.1\r\nHost: bench\r\nConnection: {connection}\r\n\r\n").as_bytes(),
        )
        .map_err(|e| format!("write: {}", e.kind()))?;
    let started = Instant::now();
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 4096];
    let mut head: Option<(usize, u16, Option<usize>, bool)> = None;
    loop {
        if started.elapsed() > REQUEST_TIMEOUT {
            return Err("timeout".into());
        }
        let n = match stream.read(&mut chunk) {
            Ok(n) => n,
            Err(e) if buf.is_empty() => return Err(format!("read: {}", e.kind())),
            Err(e) => return Err(format!("read mid-response: {}", e.kind())),
        };
        buf.extend_from_slice(&chunk[..n]);
        if head.is_none() {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let (status, length, close) = parse_head(&buf[..end])?;
                head = Some((end + 4, status, length, close));
            }
        }
        let eof = n == 0;
        if let Some((body_at, status, length, close)) = head {
            let body = &buf[body_at..];
            let complete = match length {
                Some(length) => body.len() >= length,
                None => eof,
            };
            if complete {
                if !(200..300).contains(&status) {
                    return Err(format!("HTTP {status}"));
                }
                if keep_alive && !close && length.is_some() {
                    *conn = Some(stream);
                }
                let text = String::from_utf8_lossy(body);
                let line = text.lines().next().unwrap_or("").trim();
                return Ok(line.chars().take(60).collect());
            }
        }
        if eof {
            return Err(if buf.is_empty() {
                "closed before a response".into()
            } else {
                "closed mid-response".into()
            });
        }
    }
}

/// Status, Content-Length and whether the server closes the connection.
fn parse_head(head: &[u8]) -> Result<(u16, Option<usize>, bool), String> {
    let text = String::from_utf8_lossy(head);
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status = status_line
        .strip_prefix("HTTP/1.")
        .and_then(|rest| rest.get(2..5))
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| "bad response".to_string())?;
    let http10 = status_line.starts_with("HTTP/1.0");
    let mut length = None;
    let mut close = http10;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim().to_ascii_lowercase();
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => length = value.parse().ok(),
            "connection" if value == "close" => close = true,
            "connection" if value == "keep-alive" => close = false,
            // Chunked bodies are not decoded: read to the end, not reused.
            "transfer-encoding" => {
                length = None;
                close = true;
            }
            _ => {}
        }
    }
    Ok((status, length, close))
}

// ---------------------------------------------------------------------------
// Services
// ---------------------------------------------------------------------------

fn spec(
    args: &BenchRolloutArgs,
    name: &str,
    image: &str,
    replicas: u32,
    publish: u16,
    policy: pb::UpdatePolicy,
) -> pb::ServiceSpec {
    pb::ServiceSpec {
        name: name.to_string(),
        runtime: "oci".into(),
        replicas,
        image: image.to_string(),
        health: Some(pb::HealthCheck {
            kind: "http".into(),
            http_path: "/".into(),
            interval_ms: args.health_interval,
            timeout_ms: args.health_interval.min(1000),
            retries: 3,
            ..Default::default()
        }),
        publish: u32::from(publish),
        protocol: if publish == 0 { "" } else { "http" }.into(),
        update: Some(policy),
        ..Default::default()
    }
}

fn rolling_policy(max_parallel: u32, max_surge: u32) -> pb::UpdatePolicy {
    pb::UpdatePolicy {
        strategy: "rolling".into(),
        max_parallel,
        max_surge: Some(max_surge),
        max_unavailable: Some(0),
        min_healthy_ms: Some(0),
        ..Default::default()
    }
}

pub(super) async fn get(client: &mut Client, name: &str) -> anyhow::Result<pb::ServiceStatus> {
    Ok(client
        .get_service(pb::GetServiceRequest {
            name: name.into(),
            show_values: false,
        })
        .await
        .map_err(|e| anyhow!("failed to read {name}: {}", e.message()))?
        .into_inner())
}

pub(super) fn describe(status: &pb::ServiceStatus) -> String {
    let states: Vec<String> = status
        .allocations
        .iter()
        .filter(|a| a.state != "stopped")
        .map(|a| {
            format!(
                "{} v{} {}/{} {}",
                a.id, a.version, a.desired, a.state, a.message
            )
        })
        .collect();
    format!("{states:?}")
}

/// Creates the service and returns the time until all its replicas are
/// healthy.
async fn create_until_healthy(
    client: &mut Client,
    spec: pb::ServiceSpec,
) -> anyhow::Result<Duration> {
    let (name, replicas) = (spec.name.clone(), spec.replicas as usize);
    let started = Instant::now();
    client
        .create_service(pb::CreateServiceRequest { spec: Some(spec) })
        .await
        .map_err(|e| anyhow!("failed to create {name}: {}", e.message()))?;
    loop {
        let status = get(client, &name).await?;
        let healthy = status
            .allocations
            .iter()
            .filter(|a| a.desired == "run" && a.state == "healthy")
            .count();
        if healthy == replicas {
            return Ok(started.elapsed());
        }
        if started.elapsed() > LIMIT {
            return Err(anyhow!(
                "{name}: {healthy} of {replicas} replicas healthy after {LIMIT:?}: {}",
                describe(&status)
            ));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Removes the service and waits until the control plane and the agent are
/// rid of it.
pub(super) async fn remove(
    client: &mut Client,
    agent: &BenchAgent,
    name: &str,
) -> anyhow::Result<()> {
    client
        .remove_service(pb::RemoveServiceRequest { name: name.into() })
        .await
        .map_err(|e| anyhow!("failed to remove {name}: {}", e.message()))?;
    let started = Instant::now();
    loop {
        let gone = client
            .get_service(pb::GetServiceRequest {
                name: name.into(),
                show_values: false,
            })
            .await
            .is_err();
        if gone && agent.containers() == 0 {
            return Ok(());
        }
        if started.elapsed() > LIMIT {
            return Err(anyhow!("{name} not removed within {LIMIT:?}"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the routing proxy answers on `addr` with a 2xx; returns the
/// body's first line.
async fn proxy_answers(addr: SocketAddr) -> anyhow::Result<String> {
    let started = Instant::now();
    loop {
        let result = tokio::task::spawn_blocking(move || request(addr, &mut None, false)).await?;
        match result {
            Ok(body) => return Ok(body),
            Err(e) if started.elapsed() > Duration::from_secs(30) => {
                return Err(anyhow!("the routing proxy on {addr} does not answer: {e}"))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Sends the service's current spec with `image`; returns the new version.
async fn update_image(client: &mut Client, name: &str, image: &str) -> anyhow::Result<u64> {
    let mut spec = get(client, name)
        .await?
        .spec
        .ok_or_else(|| anyhow!("{name} has no spec"))?;
    spec.image = image.to_string();
    let status = client
        .update_service(pb::UpdateServiceRequest { spec: Some(spec) })
        .await
        .map_err(|e| anyhow!("failed to update {name}: {}", e.message()))?
        .into_inner();
    Ok(status.version)
}

/// What a deployment poll saw.
struct Progress {
    status: String,
    /// Replicas of older versions not stopped yet.
    old_live: usize,
}

async fn progress(client: &mut Client, name: &str, version: u64) -> anyhow::Result<Progress> {
    let status = get(client, name).await?;
    let deployment = status.deployment.clone().unwrap_or_default();
    if deployment.version != version {
        return Ok(Progress {
            status: "pending".into(),
            old_live: usize::MAX,
        });
    }
    if ["failed", "rolled-back", "superseded"].contains(&deployment.status.as_str()) {
        return Err(anyhow!(
            "{name}: deployment of version {version} {}: {} {}",
            deployment.status,
            deployment.message,
            describe(&status)
        ));
    }
    let old_live = status
        .allocations
        .iter()
        .filter(|a| a.version != version && !["stopped", "failed"].contains(&a.state.as_str()))
        .count();
    Ok(Progress {
        status: deployment.status,
        old_live,
    })
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

/// Signed milliseconds from `from` to `to`.
fn offset_ms(from: Instant, to: Instant) -> String {
    if to >= from {
        format!("+{:.0} ms", (to - from).as_secs_f64() * 1000.0)
    } else {
        format!("-{:.0} ms", (from - to).as_secs_f64() * 1000.0)
    }
}

/// `started`: when the update was sent.
fn print_load(tally: &Tally, started: Instant) {
    let failed: usize = tally.failed.values().sum();
    let bodies: Vec<String> = tally
        .bodies
        .iter()
        .map(|(body, seen)| format!("\"{body}\" {}", seen.count))
        .collect();
    println!(
        "  load: {} requests, {failed} failed; responses {}",
        tally.ok + failed,
        bodies.join(", ")
    );
    if let Some((took, sent)) = tally.slowest {
        println!(
            "  slowest request {}, sent {} after the update was sent",
            ms(took),
            offset_ms(started, sent)
        );
    }
    if failed > 0 {
        let reasons: Vec<String> = tally
            .failed
            .iter()
            .map(|(reason, n)| format!("{reason} {n}"))
            .collect();
        println!("  failures: {}", reasons.join(", "));
    }
}

/// A published service of `image_v1` at `replicas`, all healthy, with the
/// load running against it; returns the load and the v1 body.
async fn serve_under_load(
    client: &mut Client,
    args: &BenchRolloutArgs,
    name: &str,
    replicas: u32,
    policy: pb::UpdatePolicy,
) -> anyhow::Result<(Load, String)> {
    let publish = free_port()?;
    let spec = spec(args, name, &args.image_v1, replicas, publish, policy);
    create_until_healthy(client, spec).await?;
    let addr: SocketAddr = ([127, 0, 0, 1], publish).into();
    let body = proxy_answers(addr).await?;
    let load = Load::start(
        addr,
        args.load_threads,
        Duration::from_millis(args.load_pause.into()),
    );
    tokio::time::sleep(SETTLE).await;
    Ok((load, body))
}

struct Rolling {
    /// When the update was sent.
    started: Instant,
    /// Update sent until the last old replica stopped.
    wall: Duration,
    /// Update sent until the deployment succeeded.
    succeeded: Duration,
    peak_containers: usize,
    tally: Tally,
}

async fn rolling(
    client: &mut Client,
    agent: &BenchAgent,
    args: &BenchRolloutArgs,
    name: &str,
    replicas: u32,
    max_parallel: u32,
    max_surge: u32,
) -> anyhow::Result<Rolling> {
    let policy = rolling_policy(max_parallel, max_surge);
    let (load, _) = serve_under_load(client, args, name, replicas, policy).await?;
    let started = Instant::now();
    let version = update_image(client, name, &args.image_v2).await?;
    let mut succeeded = None;
    let mut peak_containers = 0;
    let wall = loop {
        peak_containers = peak_containers.max(agent.containers());
        let now = progress(client, name, version).await?;
        if now.status == "succeeded" && succeeded.is_none() {
            succeeded = Some(started.elapsed());
        }
        if succeeded.is_some() && now.old_live == 0 {
            break started.elapsed();
        }
        if started.elapsed() > LIMIT {
            return Err(anyhow!(
                "{name}: the rolling update did not finish within {LIMIT:?}"
            ));
        }
        tokio::time::sleep(POLL).await;
    };
    tokio::time::sleep(SETTLE).await;
    let tally = load.finish();
    remove(client, agent, name).await?;
    Ok(Rolling {
        started,
        wall,
        succeeded: succeeded.unwrap_or(wall),
        peak_containers,
        tally,
    })
}

fn print_rolling(
    title: &str,
    result: &Rolling,
    replicas: u32,
    max_parallel: u32,
    start_health: Duration,
    drain: Duration,
) -> f64 {
    let batches = replicas.div_ceil(max_parallel);
    let bound = (start_health + drain) * batches;
    let ratio = result.wall.as_secs_f64() / bound.as_secs_f64();
    println!("{title}");
    println!(
        "  wall time {} (deployment succeeded after {}, last old replica stopped after {}); peak containers {}",
        secs(result.wall),
        secs(result.succeeded),
        secs(result.wall),
        result.peak_containers
    );
    println!(
        "  bound {batches} batches x (start + health check {} + drain {}) = {}; measured / bound = {ratio:.2}x (target <= 1.5x)",
        ms(start_health),
        ms(drain),
        secs(bound)
    );
    print_load(&result.tally, result.started);
    ratio
}

async fn blue_green(
    client: &mut Client,
    agent: &BenchAgent,
    args: &BenchRolloutArgs,
    name: &str,
) -> anyhow::Result<()> {
    let policy = pb::UpdatePolicy {
        strategy: "blue-green".into(),
        min_healthy_ms: Some(0),
        ..Default::default()
    };
    let (load, blue) = serve_under_load(client, args, name, args.replicas, policy).await?;
    let started = Instant::now();
    let version = update_image(client, name, &args.image_v2).await?;
    let mut peak_containers = 0;
    loop {
        peak_containers = peak_containers.max(agent.containers());
        if progress(client, name, version).await?.status == "awaiting-promotion" {
            break;
        }
        if started.elapsed() > LIMIT {
            return Err(anyhow!("{name}: green not healthy within {LIMIT:?}"));
        }
        tokio::time::sleep(POLL).await;
    }
    let green_ready = started.elapsed();
    let promoted_at = Instant::now();
    client
        .promote_deployment(pb::PromoteDeploymentRequest { name: name.into() })
        .await
        .map_err(|e| anyhow!("failed to promote {name}: {}", e.message()))?;
    let promote_call = promoted_at.elapsed();
    let mut succeeded = None;
    let blue_stopped = loop {
        peak_containers = peak_containers.max(agent.containers());
        let now = progress(client, name, version).await?;
        if now.status == "succeeded" && succeeded.is_none() {
            succeeded = Some(promoted_at.elapsed());
        }
        if succeeded.is_some() && now.old_live == 0 {
            break promoted_at.elapsed();
        }
        if promoted_at.elapsed() > LIMIT {
            return Err(anyhow!("{name}: blue not stopped within {LIMIT:?}"));
        }
        tokio::time::sleep(POLL).await;
    };
    let wall = started.elapsed();
    tokio::time::sleep(SETTLE).await;
    let tally = load.finish();
    remove(client, agent, name).await?;

    println!(
        "blue-green switch, {} replicas (min_healthy_time 0, promoted by the bench as soon as it waits):",
        args.replicas
    );
    println!(
        "  wall time {} = green healthy {} + promote -> blue stopped {} (promote call {}, deployment succeeded +{}); peak containers {}",
        secs(wall),
        secs(green_ready),
        secs(blue_stopped),
        ms(promote_call),
        ms(succeeded.unwrap_or(blue_stopped)),
        peak_containers
    );
    let green: Vec<(&String, &Seen)> = tally.bodies.iter().filter(|(b, _)| **b != blue).collect();
    let blue_last = tally.bodies.get(&blue).and_then(|s| s.last);
    let green_first = green.iter().filter_map(|(_, s)| s.first).min();
    println!(
        "  relative to promote: first green response {}, last blue response {}",
        green_first.map_or("none".into(), |t| offset_ms(promoted_at, t)),
        blue_last.map_or("none".into(), |t| offset_ms(promoted_at, t)),
    );
    print_load(&tally, started);
    Ok(())
}

/// Time for one replica of `image_v2` (cached) to become healthy: the
/// median of `--start-runs` runs.
async fn start_and_health(
    client: &mut Client,
    agent: &BenchAgent,
    args: &BenchRolloutArgs,
) -> anyhow::Result<(Duration, Vec<Duration>)> {
    let mut times = Vec::new();
    for run in 0..args.start_runs.max(1) {
        let name = format!("bench-one-{run}");
        let spec = spec(args, &name, &args.image_v2, 1, 0, rolling_policy(1, 1));
        times.push(create_until_healthy(client, spec).await?);
        remove(client, agent, &name).await?;
    }
    let mut sorted = times.clone();
    sorted.sort();
    Ok((sorted[sorted.len() / 2], times))
}

async fn bench(
    client: &mut Client,
    agent: &BenchAgent,
    args: &BenchRolloutArgs,
) -> anyhow::Result<()> {
    let drain = Duration::from_secs_f64(args.drain_secs);
    // Warm-up: pulls both images, so every step runs cached images.
    let mut pulls = Vec::new();
    for (index, image) in [&args.image_v1, &args.image_v2].into_iter().enumerate() {
        let name = format!("bench-warm-{index}");
        let spec = spec(args, &name, image, 1, 0, rolling_policy(1, 1));
        pulls.push(create_until_healthy(client, spec).await?);
        remove(client, agent, &name).await?;
    }
    let (start_health, runs) = start_and_health(client, agent, args).await?;
    println!(
        "skiff bench rollout: {} -> {}",
        args.image_v1, args.image_v2
    );
    println!(
        "agent drain {} (--drain-secs), health check http / every {} ms, {} load threads ({} ms pause, half keep-alive) through the routing proxy",
        ms(drain),
        args.health_interval,
        args.load_threads,
        args.load_pause
    );
    let runs: Vec<String> = runs.iter().map(|d| ms(*d)).collect();
    println!(
        "start + health check of one replica (cached image): median {} of [{}] (first starts with pull: {}, {})",
        ms(start_health),
        runs.join(", "),
        ms(pulls[0]),
        ms(pulls[1])
    );

    let scenario = |s: &str| args.scenarios.iter().any(|x| x == s);
    if scenario("rolling") {
        let surge = args.max_surge.unwrap_or(args.max_parallel);
        let result = rolling(
            client,
            agent,
            args,
            "bench-rolling",
            args.replicas,
            args.max_parallel,
            surge,
        )
        .await?;
        print_rolling(
            &format!(
                "rolling update, {} replicas, max_parallel {}, max_surge {surge}, min_healthy_time 0:",
                args.replicas, args.max_parallel
            ),
            &result,
            args.replicas,
            args.max_parallel,
            start_health,
            drain,
        );
    }
    if scenario("blue-green") {
        blue_green(client, agent, args, "bench-blue-green").await?;
    }
    if scenario("swarm") {
        let surge = args.max_surge.unwrap_or(args.swarm_parallel);
        let result = rolling(
            client,
            agent,
            args,
            "bench-swarm",
            args.swarm_replicas,
            args.swarm_parallel,
            surge,
        )
        .await?;
        print_rolling(
            &format!(
                "rolling update, {} replicas, max_parallel {}, max_surge {surge}, min_healthy_time 0 (Docker Swarm: {}-{} s for 10 replicas, parallelism 2, delay 0):",
                args.swarm_replicas, args.swarm_parallel, SWARM_SECS.0, SWARM_SECS.1
            ),
            &result,
            args.swarm_replicas,
            args.swarm_parallel,
            start_health,
            drain,
        );
        let wall = result.wall.as_secs_f64();
        println!(
            "  vs Docker Swarm: {:.1}-{:.1}x faster (target >= 5x)",
            SWARM_SECS.0 / wall,
            SWARM_SECS.1 / wall
        );
    }
    Ok(())
}

/// Removes every service left (after an error or an interrupt) and waits
/// until the agent runs no container.
pub(super) async fn clean_up(client: &mut Client, agent: &BenchAgent) -> anyhow::Result<()> {
    let services = client
        .list_services(pb::ListServicesRequest { show_values: false })
        .await
        .map_err(|e| anyhow!("failed to list services: {}", e.message()))?
        .into_inner()
        .services;
    for service in services {
        let name = service.spec.unwrap_or_default().name;
        remove(client, agent, &name).await?;
    }
    let started = Instant::now();
    while agent.containers() > 0 {
        if started.elapsed() > LIMIT {
            return Err(anyhow!(
                "{} containers still known to the OCI runtime in {}",
                agent.containers(),
                agent.dir.join("data/oci").display()
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Ask the runtime too (`runc list --root ...`), where it is installed.
    for runtime in ["runc", "crun"] {
        let root = agent.dir.join("data/oci").join(runtime);
        if !root.is_dir() {
            continue;
        }
        let Ok(out) = Command::new(runtime)
            .arg("--root")
            .arg(&root)
            .args(["list", "-q"])
            .output()
        else {
            continue;
        };
        let left = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if !left.is_empty() {
            return Err(anyhow!(
                "{runtime} --root {} list still shows: {left}",
                root.display()
            ));
        }
        println!(
            "cleaned up: `{runtime} --root {} list` is empty",
            root.display()
        );
    }
    Ok(())
}

/// Waits until the bench's agent (node `bench`) is registered and ready.
pub(super) async fn wait_for_agent(client: &mut Client, agent: &BenchAgent) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let nodes = client
            .list_nodes(pb::ListNodesRequest {})
            .await
            .map(|r| r.into_inner().nodes)
            .unwrap_or_default();
        if nodes
            .iter()
            .any(|n| n.name == "bench" && n.status == "ready")
        {
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(30) {
            return Err(anyhow!(
                "the agent did not register within 30 s; see {}",
                agent.dir.join("agent.log").display()
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn run(args: BenchRolloutArgs) -> anyhow::Result<()> {
    let cluster = LocalCluster::start(1).await?;
    let server = cluster.addresses[0].clone();
    // `--drain-secs` on the command line wins over a SKIFF_DRAIN_SECS
    // in the environment.
    let agent = BenchAgent::start(
        &server,
        cluster.dir().join("agent"),
        BenchAgentOptions {
            port_range: args.port_range,
            insecure_registries: &args.insecure_registries,
            oci_runtime: args.oci_runtime.as_deref(),
            extra_args: vec!["--drain-secs".into(), args.drain_secs.to_string()],
            keep_log: args.agent_log.clone(),
        },
    )?;
    let mut client = connect(&server).await?;
    wait_for_agent(&mut client, &agent).await?;
    let result = tokio::select! {
        result = bench(&mut client, &agent, &args) => result,
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
    };
    // Load threads of an interrupted step stop with their Load (dropped
    // above); the containers go before the agent does.
    let cleaned = clean_up(&mut client, &agent).await;
    drop(agent);
    drop(cluster);
    result.and(cleaned)
}
