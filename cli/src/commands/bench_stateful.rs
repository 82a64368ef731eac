//! `skiff bench stateful`: a stateful service updated under load. A fresh
//! `skiff server` and `skiff agent` (child processes of this executable)
//! run service `db` (postgres, one replica owning the volume `pgdata`,
//! trust authentication, no `--publish`); `--clients` threads reach it by
//! name — `db` resolved by the agent's DNS server to the service's virtual
//! address — each opening a new connection per request (startup, one
//! `INSERT` + `SELECT count(*)`, Terminate). After the baseline window the
//! bench runs `skiff service update db --env GEN=n` (a stop-first swap: the
//! new replica needs the old one's volume, and the routing proxy holds new
//! connections while neither serves), waits until the deployment ended and
//! keeps the load `--after-secs`. It prints the failed requests by reason,
//! p50/p99/max of the baseline and of the swap windows, the p99 the swap
//! adds, the swap's wall time and whether every committed row is still
//! there. Figures are printed, never asserted.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};

use super::bench::{BenchAgent, BenchAgentOptions, LocalCluster};
use super::bench_rollout::{clean_up, describe, get, remove, wait_for_agent};
use super::pgwire::Session;
use crate::args::BenchStatefulArgs;
use crate::client::{connect, Client};

const SERVICE: &str = "db";
const VOLUME: &str = "pgdata:/var/lib/postgresql/data";
const PG_PORT: u16 = 5432;
/// Bound of a connect and of every read and write of one request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on any one wait (pull + initdb, deployment, name, removal).
const LIMIT: Duration = Duration::from_secs(300);
const POLL: Duration = Duration::from_millis(20);

// ---------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------

/// One request as a client saw it.
struct Request {
    sent: Instant,
    took: Duration,
    /// Why it failed; `None`: its INSERT committed.
    failure: Option<String>,
}

/// Client threads, each looping one request at a time until stopped.
struct Clients {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Vec<Request>>>,
}

impl Clients {
    fn start(addr: SocketAddr, clients: usize) -> Clients {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..clients)
            .map(|client| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut seen = Vec::new();
                    let mut seq = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        seq += 1;
                        let sent = Instant::now();
                        let failure = request(addr, client, seq).err();
                        seen.push(Request {
                            sent,
                            took: sent.elapsed(),
                            failure,
                        });
                    }
                    seen
                })
            })
            .collect();
        Clients { stop, threads }
    }

    /// Stops the clients (each after its request in flight); every request
    /// they made, in no particular order.
    fn finish(mut self) -> Vec<Request> {
        self.stop.store(true, Ordering::Relaxed);
        std::mem::take(&mut self.threads)
            .into_iter()
            .flat_map(|t| t.join().unwrap_or_default())
            .collect()
    }
}

impl Drop for Clients {
    /// A run that failed or was interrupted stops its clients too.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// One request on a new connection: startup, one row inserted and the rows
/// counted in one implicit transaction, Terminate.
fn request(addr: SocketAddr, client: usize, seq: u64) -> Result<(), String> {
    let mut session = Session::connect(addr, "postgres", "postgres", REQUEST_TIMEOUT)
        .map_err(|e| e.to_string())?;
    session
        .query(&format!(
            "INSERT INTO t (client, seq) VALUES ({client}, {seq}); SELECT count(*) FROM t"
        ))
        .map_err(|e| e.to_string())?;
    // The row is committed once ReadyForQuery came; a failed Terminate does
    // not undo it.
    let _ = session.terminate();
    Ok(())
}

/// Runs `sql` on a new session, trying again until `limit` (the name's
/// address may route nowhere for a moment after the service is healthy).
async fn query_until(
    addr: SocketAddr,
    sql: &str,
    limit: Duration,
) -> anyhow::Result<Option<String>> {
    let started = Instant::now();
    loop {
        let owned = sql.to_string();
        let result = tokio::task::spawn_blocking(move || {
            let mut session = Session::connect(addr, "postgres", "postgres", REQUEST_TIMEOUT)?;
            let row = session.query(&owned)?;
            let _ = session.terminate();
            Ok::<_, super::pgwire::PgError>(row)
        })
        .await?;
        match result {
            Ok(row) => return Ok(row),
            Err(e) if started.elapsed() > limit => {
                return Err(anyhow!("{SERVICE} at {addr} does not answer `{sql}`: {e}"))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

// ---------------------------------------------------------------------------
// Discovery
// ---------------------------------------------------------------------------

/// The address of the agent's DNS server: 10.90.B.1, B from its
/// `discovery.json`.
fn nameserver(agent: &BenchAgent) -> anyhow::Result<Ipv4Addr> {
    let path = agent.dir.join("data/discovery.json");
    let table: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?,
    )
    .with_context(|| format!("{} is not JSON", path.display()))?;
    let block = table["block"]
        .as_u64()
        .and_then(|b| u8::try_from(b).ok())
        .ok_or_else(|| anyhow!("no block in {}", path.display()))?;
    Ok(Ipv4Addr::new(10, 90, block, 1))
}

/// Asks `server` for the A records of `name` (one UDP query).
fn resolve(server: Ipv4Addr, name: &str) -> anyhow::Result<Vec<Ipv4Addr>> {
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    socket.set_read_timeout(Some(Duration::from_secs(2)))?;
    let id = [0x5b, 0x1f];
    let mut query = vec![id[0], id[1], 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        query.push(u8::try_from(label.len()).context("label too long")?);
        query.extend_from_slice(label.as_bytes());
    }
    query.extend_from_slice(&[0, 0, 1, 0, 1]);
    socket.send_to(&query, SocketAddr::from((server, 53)))?;
    let mut buf = [0u8; 512];
    let n = socket
        .recv(&mut buf)
        .with_context(|| format!("no answer from the DNS server {server}"))?;
    answers(&buf[..n], &id, query.len()).ok_or_else(|| anyhow!("bad DNS answer from {server}"))
}

/// The A records of an answer to a one-question query of `question_end`
/// bytes (the answer repeats the question; its records name it by pointer).
fn answers(buf: &[u8], id: &[u8; 2], question_end: usize) -> Option<Vec<Ipv4Addr>> {
    if buf.get(..2)? != id || buf.get(3)? & 0xf != 0 {
        return None;
    }
    let count = u16::from_be_bytes([*buf.get(6)?, *buf.get(7)?]);
    let mut at = question_end;
    let mut addresses = Vec::new();
    for _ in 0..count {
        // A pointer name (2 bytes), type, class, TTL, rdlength, rdata.
        let header = buf.get(at..at + 12)?;
        let kind = u16::from_be_bytes([header[2], header[3]]);
        let length = usize::from(u16::from_be_bytes([header[10], header[11]]));
        let data = buf.get(at + 12..at + 12 + length)?;
        if kind == 1 && length == 4 {
            addresses.push(Ipv4Addr::new(data[0], data[1], data[2], data[3]));
        }
        at += 12 + length;
    }
    Some(addresses)
}

/// Waits until the agent's DNS server answers `name`; the nameserver and
/// the first address.
async fn discover(agent: &BenchAgent, name: &str) -> anyhow::Result<(Ipv4Addr, Ipv4Addr)> {
    let started = Instant::now();
    loop {
        let found = nameserver(agent).and_then(|server| {
            let addresses = resolve(server, name)?;
            Ok((server, addresses))
        });
        match found {
            Ok((server, addresses)) if !addresses.is_empty() => return Ok((server, addresses[0])),
            Ok(_) | Err(_) if started.elapsed() < Duration::from_secs(30) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ok(_) => return Err(anyhow!("the agent's DNS server does not know {name}")),
            Err(e) => return Err(e.context(format!("cannot resolve {name}"))),
        }
    }
}

// ---------------------------------------------------------------------------
// The service
// ---------------------------------------------------------------------------

/// Runs `skiff --server SERVER ARGS` (this executable), which must succeed.
async fn skiff(server: &str, args: Vec<String>) -> anyhow::Result<String> {
    let exe = std::env::current_exe()?;
    let server = server.to_string();
    let shown = args.join(" ");
    let token = crate::client::token();
    let ca = crate::client::ca_cert_file();
    let out = tokio::task::spawn_blocking(move || {
        let mut command = Command::new(exe);
        if let Some(token) = token {
            command.env("SKIFF_TOKEN", token);
        }
        if let Some(ca) = ca {
            command.env("SKIFF_CA_CERT", ca);
        }
        command
            .env_remove("SKIFF_ADDR")
            .arg("--server")
            .arg(server)
            .args(args)
            .output()
    })
    .await??;
    if !out.status.success() {
        return Err(anyhow!(
            "`skiff {shown}` failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Waits until `db` runs one healthy replica of `version`, its deployment
/// (if any) succeeded and no replica of an older version is left; returns
/// when the last old replica was first seen stopped and when the new one
/// was first seen healthy, relative to `since`.
async fn settled(
    client: &mut Client,
    version: u64,
    since: Instant,
) -> anyhow::Result<(Option<Duration>, Duration)> {
    let (mut old_gone, mut new_healthy) = (None, None);
    loop {
        let status = get(client, SERVICE).await?;
        let deployment = status.deployment.clone().unwrap_or_default();
        if deployment.version == version
            && ["failed", "rolled-back", "superseded"].contains(&deployment.status.as_str())
        {
            return Err(anyhow!(
                "{SERVICE}: deployment of version {version} {}: {} {}",
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
        let healthy = status
            .allocations
            .iter()
            .any(|a| a.version == version && a.desired == "run" && a.state == "healthy");
        if old_live == 0 && old_gone.is_none() {
            old_gone = Some(since.elapsed());
        }
        if healthy && new_healthy.is_none() {
            new_healthy = Some(since.elapsed());
        }
        let done =
            version == 1 || (deployment.version == version && deployment.status == "succeeded");
        if done && healthy && old_live == 0 {
            return Ok((old_gone, new_healthy.unwrap_or_default()));
        }
        if since.elapsed() > LIMIT {
            return Err(anyhow!(
                "{SERVICE}: version {version} not settled within {LIMIT:?}: {}",
                describe(&status)
            ));
        }
        tokio::time::sleep(POLL).await;
    }
}

// ---------------------------------------------------------------------------
// Figures
// ---------------------------------------------------------------------------

/// An update as the bench saw it.
struct Swap {
    generation: u32,
    sent: Instant,
    /// Update command sent until the deployment ended.
    wall: Duration,
    old_gone: Option<Duration>,
    new_healthy: Duration,
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let last = sorted.len() - 1;
    // Nearest rank; `p` is in 0..=1, so the index is within the slice.
    let index = ((last as f64) * p).round() as usize;
    sorted[index.min(last)]
}

/// The requests sent within a window: the latencies of those that
/// succeeded (a refused connection fails in microseconds and would only pull
/// the percentiles down) and how many failed.
struct Window {
    took: Vec<Duration>,
    failed: usize,
}

impl Window {
    fn of<'a>(requests: impl Iterator<Item = &'a Request>) -> Window {
        let mut window = Window {
            took: Vec::new(),
            failed: 0,
        };
        for r in requests {
            match r.failure {
                Some(_) => window.failed += 1,
                None => window.took.push(r.took),
            }
        }
        window.took.sort_unstable();
        window
    }

    fn p99(&self) -> Duration {
        percentile(&self.took, 0.99)
    }

    fn print(&self, title: &str, length: Duration) {
        println!(
            "  {title:<9} {:>7}: {} requests, {} failed, p50 {}, p99 {}, max {}",
            secs(length),
            self.took.len() + self.failed,
            self.failed,
            ms(percentile(&self.took, 0.5)),
            ms(self.p99()),
            ms(self.took.last().copied().unwrap_or_default())
        );
    }
}

/// The command line as given, with `skiff` for the executable's path.
fn command_line() -> String {
    let args: Vec<String> = std::env::args_os()
        .skip(1)
        .map(|a| {
            let a = a.to_string_lossy().into_owned();
            if a.is_empty() || a.contains(char::is_whitespace) {
                format!("'{a}'")
            } else {
                a
            }
        })
        .collect();
    format!("skiff {}", args.join(" "))
}

fn print_figures(
    requests: &[Request],
    load_started: Instant,
    load_ended: Instant,
    swaps: &[Swap],
    rows: (u64, u64),
) {
    let failed: Vec<&Request> = requests.iter().filter(|r| r.failure.is_some()).collect();
    println!("load: {} requests, {} failed", requests.len(), failed.len());
    if !failed.is_empty() {
        // By reason: how many, and when the first and the last were sent
        // relative to the first update.
        let first = swaps.first().map_or(load_started, |s| s.sent);
        let offset = |at: Instant| {
            at.saturating_duration_since(first).as_secs_f64()
                - first.saturating_duration_since(at).as_secs_f64()
        };
        let mut reasons: BTreeMap<&str, (usize, f64, f64)> = BTreeMap::new();
        for r in &failed {
            let at = offset(r.sent);
            let seen = reasons
                .entry(r.failure.as_deref().unwrap_or_default())
                .or_insert((0, at, at));
            *seen = (seen.0 + 1, seen.1.min(at), seen.2.max(at));
        }
        println!("  failed by reason (sent from .. to, relative to the first update):");
        for (reason, (n, from, to)) in reasons {
            println!("    {n:>6}  {reason} ({from:+.3} s .. {to:+.3} s)");
        }
    }
    let first_update = swaps.first().map_or(load_ended, |s| s.sent);
    let in_swap = |r: &Request| {
        swaps
            .iter()
            .any(|s| r.sent >= s.sent && r.sent <= s.sent + s.wall)
    };
    let baseline = Window::of(requests.iter().filter(|r| r.sent < first_update));
    let swapping = Window::of(requests.iter().filter(|r| in_swap(r)));
    let after = Window::of(
        requests
            .iter()
            .filter(|r| r.sent >= first_update && !in_swap(r)),
    );
    let swap_time: Duration = swaps.iter().map(|s| s.wall).sum();
    println!("latency of a successful request (connect + startup + INSERT/SELECT + Terminate), by the window it was sent in:");
    baseline.print("baseline", first_update - load_started);
    swapping.print("swap", swap_time);
    after.print(
        "after",
        load_ended
            .saturating_duration_since(first_update)
            .saturating_sub(swap_time),
    );
    let added = swapping.p99().as_secs_f64() - baseline.p99().as_secs_f64();
    println!(
        "p99 added by the swap: {:+.0} ms (swap p99 {} - baseline p99 {})",
        added * 1000.0,
        ms(swapping.p99()),
        ms(baseline.p99())
    );
    if let Some(slowest) = requests.iter().max_by_key(|r| r.took) {
        let relative: Vec<String> = swaps
            .iter()
            .filter(|s| slowest.sent + slowest.took >= s.sent)
            .map(|s| {
                let sent = slowest.sent.saturating_duration_since(s.sent).as_secs_f64()
                    - s.sent.saturating_duration_since(slowest.sent).as_secs_f64();
                format!("{sent:+.2} s from update {}", s.generation)
            })
            .collect();
        println!(
            "slowest request {}{}",
            ms(slowest.took),
            relative
                .last()
                .map(|r| format!(", sent {r}"))
                .unwrap_or_default()
        );
    }
    let (committed, counted) = rows;
    let verdict = if counted == committed {
        "kept".to_string()
    } else if counted > committed {
        format!(
            "kept ({} more: commits whose answer was lost)",
            counted - committed
        )
    } else {
        format!("LOST {}", committed - counted)
    };
    println!(
        "rows: {committed} committed by successful INSERTs, {counted} counted after the last update: {verdict}"
    );
}

// ---------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------

async fn bench(
    client: &mut Client,
    server: &str,
    agent: &BenchAgent,
    args: &BenchStatefulArgs,
) -> anyhow::Result<()> {
    let created = Instant::now();
    skiff(
        server,
        [
            "service",
            "create",
            "--detach",
            SERVICE,
            "--image",
            args.image.as_str(),
            "--volume",
            VOLUME,
            "--env",
            "POSTGRES_HOST_AUTH_METHOD=trust",
        ]
        .map(String::from)
        .to_vec(),
    )
    .await?;
    let (_, healthy) = settled(client, 1, created).await?;
    let (nameserver, vip) = discover(agent, SERVICE).await?;
    let addr = SocketAddr::V4(SocketAddrV4::new(vip, PG_PORT));
    query_until(
        addr,
        "CREATE TABLE IF NOT EXISTS t (client int, seq bigint)",
        Duration::from_secs(30),
    )
    .await?;
    println!(
        "{SERVICE}: 1 replica of {} with volume {VOLUME}, healthy (pull + initdb + pg_isready) after {}; `{SERVICE}` resolved by the agent's DNS server {nameserver} to {addr}",
        args.image,
        secs(healthy)
    );
    println!(
        "{} clients, each a new connection per request through {addr}: startup (trust), INSERT + SELECT count(*), Terminate; timeout {} per step",
        args.clients,
        secs(REQUEST_TIMEOUT)
    );

    let clients = Clients::start(addr, args.clients);
    let load_started = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(args.baseline_secs)).await;
    let mut swaps = Vec::new();
    for generation in 1..=args.updates {
        let sent = Instant::now();
        skiff(
            server,
            vec![
                "service".into(),
                "update".into(),
                "--detach".into(),
                SERVICE.into(),
                "--env".into(),
                format!("GEN={generation}"),
            ],
        )
        .await?;
        let version = get(client, SERVICE).await?.version;
        let (old_gone, new_healthy) = settled(client, version, sent).await?;
        swaps.push(Swap {
            generation,
            sent,
            wall: sent.elapsed(),
            old_gone,
            new_healthy,
        });
        tokio::time::sleep(Duration::from_secs_f64(args.after_secs)).await;
    }
    let requests = clients.finish();
    let load_ended = Instant::now();
    let committed = requests.iter().filter(|r| r.failure.is_none()).count() as u64;
    let counted = query_until(addr, "SELECT count(*) FROM t", Duration::from_secs(30))
        .await?
        .and_then(|n| n.parse::<u64>().ok())
        .ok_or_else(|| anyhow!("SELECT count(*) returned no number"))?;

    for swap in &swaps {
        println!(
            "update {} (`skiff service update {SERVICE} --env GEN={}`, stop-first): swap wall time {} (old replica stopped +{}, new replica healthy +{}, deployment succeeded +{})",
            swap.generation,
            swap.generation,
            secs(swap.wall),
            swap.old_gone.map_or("?".into(), ms),
            ms(swap.new_healthy),
            ms(swap.wall)
        );
    }
    print_figures(
        &requests,
        load_started,
        load_ended,
        &swaps,
        (committed, counted),
    );
    remove(client, agent, SERVICE).await?;
    println!("{SERVICE} removed; its containers are gone");
    Ok(())
}

pub async fn run(args: BenchStatefulArgs) -> anyhow::Result<()> {
    println!("command: {}", command_line());
    let cluster = LocalCluster::start(1).await?;
    let server = cluster.addresses[0].clone();
    let agent = BenchAgent::start(
        &server,
        cluster.dir().join("agent"),
        BenchAgentOptions {
            port_range: args.port_range,
            insecure_registries: &args.insecure_registries,
            oci_runtime: args.oci_runtime.as_deref(),
            extra_args: Vec::new(),
            keep_log: args.agent_log.clone(),
        },
    )?;
    let mut client = connect(&server).await?;
    wait_for_agent(&mut client, &agent).await?;
    let result = tokio::select! {
        result = bench(&mut client, &server, &agent, &args) => result,
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
    };
    // Clients of an interrupted run stop with their `Clients` (dropped
    // above); the containers go before the agent does.
    let cleaned = clean_up(&mut client, &agent).await;
    drop(agent);
    drop(cluster);
    result.and(cleaned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_reads_the_a_records_after_the_question() {
        let id = [0x5b, 0x1f];
        let mut buf = vec![0x5b, 0x1f, 0x85, 0x00, 0, 1, 0, 2, 0, 0, 0, 0];
        buf.extend_from_slice(b"\x02db\0\0\x01\0\x01");
        let question_end = buf.len();
        for last in [2, 3] {
            buf.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 5, 0, 4, 10, 90, 0, last]);
        }
        assert_eq!(
            answers(&buf, &id, question_end),
            Some(vec![
                Ipv4Addr::new(10, 90, 0, 2),
                Ipv4Addr::new(10, 90, 0, 3)
            ])
        );
        // NXDOMAIN, or someone else's answer.
        buf[3] = 0x03;
        assert_eq!(answers(&buf, &id, question_end), None);
        buf[3] = 0;
        assert_eq!(answers(&buf, &[0, 0], question_end), None);
    }

    #[test]
    fn percentile_takes_the_nearest_rank() {
        let sorted: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&sorted, 0.5), Duration::from_millis(51));
        assert_eq!(percentile(&sorted, 0.99), Duration::from_millis(99));
        assert_eq!(percentile(&[], 0.99), Duration::ZERO);
    }
}
