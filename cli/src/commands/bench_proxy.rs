//! `skiff bench proxy`: what the routing proxy costs. One minimal HTTP/1.1
//! replica on loopback is loaded twice in the same run, with the same
//! keep-alive clients: directly, then through the agent's real proxy
//! (`skiff_agent::proxy`, routing one published port to it). Figures are
//! printed, never asserted.
//!
//! The replica, the proxy and the clients each run on their own tokio
//! runtime (threads), so the proxy's work is not hidden in the client's.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use skiff_agent::metrics::Metrics;
use skiff_agent::proxy::{Endpoint, Proxy, Route};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::args::BenchProxyArgs;

const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n";
const RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\n\r\nhello, skiff\n";
const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// One load run's figures.
struct Figures {
    requests: u64,
    elapsed: Duration,
    p50: Duration,
    p99: Duration,
    /// CPU time the clients', the replica's and the proxy's threads spent
    /// during the measured window.
    cpu: CpuByRole,
}

impl Figures {
    fn rate(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }

    /// CPU microseconds per request of the threads named `role`.
    fn cpu_per_request(&self, role: &str) -> f64 {
        let cpu = self.cpu.get(role).copied().unwrap_or_default();
        micros(cpu) / self.requests.max(1) as f64
    }
}

/// CPU time by thread name (the runtimes' `bench-*` names).
type CpuByRole = std::collections::BTreeMap<String, Duration>;

/// The CPU time each `bench-*` thread of this process has used so far,
/// summed by thread name, from `/proc/self/task/*/schedstat` (nanoseconds
/// on the CPU). Threads that end between two samples are not counted; the
/// bench's threads live through the whole run.
fn cpu_by_role() -> CpuByRole {
    let mut by_role = CpuByRole::new();
    for task in std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
    {
        let path = task.path();
        let Ok(name) = std::fs::read_to_string(path.join("comm")) else {
            continue;
        };
        let name = name.trim();
        if !name.starts_with("bench-") {
            continue;
        }
        let ns = std::fs::read_to_string(path.join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0);
        *by_role.entry(name.to_string()).or_default() += Duration::from_nanos(ns);
    }
    by_role
}

/// What each role used between two [`cpu_by_role`] samples.
fn cpu_since(before: &CpuByRole, after: &CpuByRole) -> CpuByRole {
    after
        .iter()
        .map(|(role, t)| {
            let was = before.get(role).copied().unwrap_or_default();
            (role.clone(), t.saturating_sub(was))
        })
        .collect()
}

pub async fn run(args: BenchProxyArgs) -> anyhow::Result<()> {
    // Its runtimes are driven from a plain thread, outside the CLI's own.
    let bench = std::thread::spawn(move || run_blocking(args));
    tokio::task::spawn_blocking(move || bench.join())
        .await
        .context("bench thread failed")?
        .map_err(|_| anyhow!("bench thread panicked"))?
}

fn run_blocking(args: BenchProxyArgs) -> anyhow::Result<()> {
    if args.connections == 0 {
        return Err(anyhow!("invalid connections: use at least 1"));
    }
    let replica_rt = runtime("bench-replica", args.threads)?;
    let replica = replica_rt
        .block_on(TcpListener::bind(SocketAddr::new(LOOPBACK, 0)))
        .context("failed to listen for the bench replica")?;
    let replica_addr = replica.local_addr()?;
    replica_rt.spawn(serve_replica(replica));

    let proxy_rt = runtime("bench-proxy", args.threads)?;
    let published = {
        // A port that was free a moment ago.
        let probe = std::net::TcpListener::bind(SocketAddr::new(LOOPBACK, 0))?;
        probe.local_addr()?.port()
    };
    let metrics = Metrics::default();
    let proxy = proxy_rt.block_on(async {
        let mut proxy = Proxy::new(LOOPBACK, metrics.clone());
        proxy.update(vec![Route {
            service: "bench".into(),
            publish: published,
            http: args.http,
            hold_when_empty: false,
            endpoints: vec![Endpoint {
                alloc_id: "bench-replica".into(),
                addr: replica_addr,
                weight: 1,
                version: 1,
            }],
        }]);
        proxy
    });
    let proxy_addr = SocketAddr::new(LOOPBACK, published);

    println!(
        "skiff bench proxy: {} keep-alive connections, {:?} per run after {:?} warm-up, {} thread(s) each for replica and proxy{}",
        args.connections,
        Duration::from_secs(args.duration),
        Duration::from_secs(args.warmup),
        args.threads,
        if args.http { ", HTTP request counting on" } else { "" }
    );
    let direct = load(replica_addr, &args).context("direct run")?;
    let proxied = load(proxy_addr, &args).context("proxied run")?;

    let row = |name: &str, f: &Figures| {
        println!(
            "{name:<14} {:>10.0} req/s   p50 {:>7.1} µs   p99 {:>7.1} µs   ({} requests)",
            f.rate(),
            micros(f.p50),
            micros(f.p99),
            f.requests
        );
    };
    row("direct", &direct);
    row("through proxy", &proxied);
    println!(
        "ratio          {:>9.1} % of direct throughput   p50 +{:.1} µs ({:.2}x)   p99 +{:.1} µs ({:.2}x)",
        100.0 * proxied.rate() / direct.rate(),
        micros(proxied.p50) - micros(direct.p50),
        micros(proxied.p50) / micros(direct.p50).max(f64::EPSILON),
        micros(proxied.p99) - micros(direct.p99),
        micros(proxied.p99) / micros(direct.p99).max(f64::EPSILON),
    );
    // Where the CPU goes: with every core busy, a request through the proxy
    // costs the client's, the replica's and the proxy's CPU, so the
    // throughput ratio cannot exceed (client + replica) / (client +
    // replica + proxy), whatever the proxy's latency.
    let cpu_row = |name: &str, f: &Figures| {
        println!(
            "{name:<14} CPU per request: client {:.1} µs, replica {:.1} µs, proxy {:.1} µs",
            f.cpu_per_request("bench-client"),
            f.cpu_per_request("bench-replica"),
            f.cpu_per_request("bench-proxy"),
        );
    };
    cpu_row("direct", &direct);
    cpu_row("through proxy", &proxied);
    let (client_cpu, replica_cpu, proxy_cpu) = (
        proxied.cpu_per_request("bench-client"),
        proxied.cpu_per_request("bench-replica"),
        proxied.cpu_per_request("bench-proxy"),
    );
    if client_cpu + replica_cpu + proxy_cpu > 0.0 {
        println!(
            "CPU bound      {:>9.1} % of direct throughput when all cores are busy ((client + replica) / (client + replica + proxy))",
            100.0 * (client_cpu + replica_cpu) / (client_cpu + replica_cpu + proxy_cpu)
        );
    }
    let proxy_seen = metrics.samples();
    if let Some(s) = proxy_seen.first() {
        println!(
            "proxy counted  {} connections, {} bytes in, {} bytes out, {} requests, {} dial failures",
            s.connections, s.bytes_in, s.bytes_out, s.requests, s.connect_failures
        );
    }
    drop(proxy);
    proxy_rt.shutdown_background();
    replica_rt.shutdown_background();
    Ok(())
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn runtime(name: &str, threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .thread_name(name)
        .enable_all()
        .build()
        .with_context(|| format!("failed to start the {name} runtime"))
}

/// A replica that answers every request with the same small response.
async fn serve_replica(listener: TcpListener) {
    while let Ok((stream, _)) = listener.accept().await {
        tokio::spawn(answer(stream));
    }
}

async fn answer(mut stream: TcpStream) -> std::io::Result<()> {
    let _ = stream.set_nodelay(true);
    let mut buf = [0u8; 4096];
    // How much of "\r\n\r\n" the bytes so far end with.
    let mut matched = 0;
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        let mut complete = 0;
        for &b in &buf[..n] {
            matched = match (matched, b) {
                (0 | 2, b'\r') => matched + 1,
                (1 | 3, b'\n') => matched + 1,
                (_, b'\r') => 1,
                _ => 0,
            };
            if matched == 4 {
                complete += 1;
                matched = 0;
            }
        }
        for _ in 0..complete {
            stream.write_all(RESPONSE).await?;
        }
    }
}

/// Runs the keep-alive clients against `addr`: a warm-up, then the measured
/// run; every request's latency is recorded.
fn load(addr: SocketAddr, args: &BenchProxyArgs) -> anyhow::Result<Figures> {
    let client_rt = runtime("bench-client", args.threads)?;
    let figures = client_rt.block_on(load_on(&client_rt, addr, args));
    client_rt.shutdown_background();
    figures
}

async fn load_on(
    client_rt: &tokio::runtime::Runtime,
    addr: SocketAddr,
    args: &BenchProxyArgs,
) -> anyhow::Result<Figures> {
    let warmup = Duration::from_secs(args.warmup);
    let duration = Duration::from_secs(args.duration);
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..args.connections {
        let (measuring, stop) = (measuring.clone(), stop.clone());
        tasks.push(client_rt.spawn(async move {
            let mut stream = TcpStream::connect(addr).await?;
            stream.set_nodelay(true)?;
            let mut latencies = Vec::with_capacity(1 << 16);
            let mut response = [0u8; RESPONSE.len()];
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                stream.write_all(REQUEST).await?;
                stream.read_exact(&mut response).await?;
                if measuring.load(Ordering::Relaxed) {
                    latencies.push(started.elapsed());
                }
            }
            Ok::<_, std::io::Error>(latencies)
        }));
    }
    tokio::time::sleep(warmup).await;
    measuring.store(true, Ordering::Relaxed);
    let started = Instant::now();
    let cpu_before = cpu_by_role();
    tokio::time::sleep(duration).await;
    measuring.store(false, Ordering::Relaxed);
    let cpu = cpu_since(&cpu_before, &cpu_by_role());
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for task in tasks {
        let latencies = task
            .await
            .context("bench client panicked")?
            .with_context(|| format!("bench client against {addr} failed"))?;
        all.extend(latencies);
    }
    if all.is_empty() {
        return Err(anyhow!("no request completed against {addr}"));
    }
    all.sort_unstable();
    let pct = |p: f64| all[((all.len() - 1) as f64 * p) as usize];
    Ok(Figures {
        requests: all.len() as u64,
        elapsed,
        p50: pct(0.50),
        p99: pct(0.99),
        cpu,
    })
}
