//! `skiff bench proxy`: what the routing proxy costs. One minimal HTTP/1.1
//! replica on loopback is loaded with the same keep-alive clients, in the
//! same run: directly, through the agent's real proxy (`skiff_agent::proxy`,
//! routing one published port to it) and, with `--reference haproxy`,
//! through HAProxy in TCP mode, the yardstick for an L4 proxy. Then once
//! more with one connection, where latency is the path's own rather than
//! the queueing of a saturated machine. Figures are printed, never asserted.
//!
//! The replica, the proxy and the clients each run on their own tokio
//! runtime (threads), so the proxy's work is not hidden in the client's,
//! and the CPU each spends per request is printed: when the load saturates
//! every core, that CPU, not the proxy's latency, sets the throughput ratio.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use skiff_agent::metrics::Metrics;
use skiff_agent::proxy::{Endpoint, Proxy, Route};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::bench::free_port;
use crate::args::{BenchProxyArgs, ReferenceProxy};

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

    /// The cores the measured roles kept busy on average over the run.
    fn cores_busy(&self) -> f64 {
        let total: Duration = self.cpu.values().sum();
        total.as_secs_f64() / self.elapsed.as_secs_f64()
    }

    /// CPU microseconds per request of the threads named `role`.
    fn cpu_per_request(&self, role: &str) -> f64 {
        let cpu = self.cpu.get(role).copied().unwrap_or_default();
        micros(cpu) / self.requests.max(1) as f64
    }
}

/// CPU time by role: the bench runtimes' thread names (`bench-*`) and, when
/// one runs, the reference proxy's process.
type CpuByRole = std::collections::BTreeMap<String, Duration>;

/// The role under which a reference proxy's CPU time is counted.
const REFERENCE_ROLE: &str = "reference";

/// The CPU time each `bench-*` thread of this process has used so far,
/// summed by thread name, plus the reference proxy's threads if `reference`
/// names its process. Read from `/proc/PID/task/*/schedstat` (nanoseconds on
/// the CPU); threads that end between two samples are not counted, and the
/// bench's threads live through the whole run.
fn cpu_by_role(reference: Option<u32>) -> CpuByRole {
    let mut by_role = CpuByRole::new();
    for (name, ns) in thread_cpu("/proc/self/task") {
        if name.starts_with("bench-") {
            *by_role.entry(name).or_default() += Duration::from_nanos(ns);
        }
    }
    if let Some(pid) = reference {
        let total: u64 = thread_cpu(&format!("/proc/{pid}/task"))
            .map(|(_, ns)| ns)
            .sum();
        by_role.insert(REFERENCE_ROLE.into(), Duration::from_nanos(total));
    }
    by_role
}

/// (thread name, nanoseconds on the CPU) of every thread under `tasks`.
fn thread_cpu(tasks: &str) -> impl Iterator<Item = (String, u64)> {
    std::fs::read_dir(tasks)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|task| {
            let path = task.path();
            let name = std::fs::read_to_string(path.join("comm")).ok()?;
            let ns = std::fs::read_to_string(path.join("schedstat"))
                .ok()
                .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
                .unwrap_or(0);
            Some((name.trim().to_string(), ns))
        })
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

/// A path to the replica the load runs over, and whose threads do the
/// forwarding on it.
struct Path {
    name: &'static str,
    addr: SocketAddr,
    /// The CPU role that forwards on this path (none for direct).
    forwarder: Option<&'static str>,
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
    replica_rt.spawn(serve_replica(
        replica,
        Duration::from_micros(args.replica_cpu_us),
    ));

    let proxy_rt = runtime("bench-proxy", args.threads)?;
    let published = free_port()?;
    let metrics = Metrics::default();
    let proxy = proxy_rt.block_on(async {
        let mut proxy = Proxy::new(LOOPBACK, metrics.clone());
        proxy.update(vec![Route {
            service: "bench".into(),
            publish: published,
            port: 0,
            stack: String::new(),
            internal: None,
            slots: Vec::new(),
            http: args.http,
            hold_when_empty: false,
            endpoints: vec![Endpoint {
                alloc_id: "bench-replica".into(),
                addr: replica_addr,
                weight: 1,
                version: 1,
                slot: 0,
            }],
        }]);
        proxy
    });
    let reference = match args.reference {
        Some(ReferenceProxy::Haproxy) => Some(Haproxy::start(replica_addr, args.threads)?),
        None => None,
    };
    let mut paths = vec![
        Path {
            name: "direct",
            addr: replica_addr,
            forwarder: None,
        },
        Path {
            name: "through proxy",
            addr: SocketAddr::new(LOOPBACK, published),
            forwarder: Some("bench-proxy"),
        },
    ];
    if let Some(haproxy) = &reference {
        paths.push(Path {
            name: "through haproxy",
            addr: haproxy.addr,
            forwarder: Some(REFERENCE_ROLE),
        });
    }
    let reference_pid = reference.as_ref().map(|h| h.child.id());

    println!(
        "skiff bench proxy: {} keep-alive connections, {:?} per run after {:?} warm-up, {} thread(s) each for replica and proxy, replica work {} µs CPU per request{}{}",
        args.connections,
        Duration::from_secs(args.duration),
        Duration::from_secs(args.warmup),
        args.threads,
        args.replica_cpu_us,
        if args.http { ", HTTP request counting on" } else { "" },
        if reference.is_some() { ", HAProxy (mode tcp) beside it" } else { "" },
    );
    let loaded = load_each(&paths, args.connections, &args, reference_pid)?;
    report(&paths, &loaded);

    if args.unloaded_connections > 0 {
        println!(
            "\nunloaded: {} keep-alive connection(s), where the latency is the path's own",
            args.unloaded_connections
        );
        let unloaded = load_each(&paths, args.unloaded_connections, &args, reference_pid)?;
        for (path, f) in paths.iter().zip(&unloaded) {
            row(path.name, f);
        }
        for (path, f) in paths.iter().zip(&unloaded).skip(1) {
            println!(
                "added latency  {:<16} p50 {:+.1} µs   p99 {:+.1} µs",
                path.name,
                micros(f.p50) - micros(unloaded[0].p50),
                micros(f.p99) - micros(unloaded[0].p99),
            );
        }
    }

    let proxy_seen = metrics.samples();
    if let Some(s) = proxy_seen.first() {
        println!(
            "proxy counted  {} connections, {} bytes in, {} bytes out, {} requests, {} dial failures",
            s.connections, s.bytes_in, s.bytes_out, s.requests, s.connect_failures
        );
    }
    drop(reference);
    drop(proxy);
    proxy_rt.shutdown_background();
    replica_rt.shutdown_background();
    Ok(())
}

fn row(name: &str, f: &Figures) {
    println!(
        "{name:<16} {:>10.0} req/s   p50 {:>7.1} µs   p99 {:>7.1} µs   ({} requests)",
        f.rate(),
        micros(f.p50),
        micros(f.p99),
        f.requests
    );
}

/// Prints the loaded runs: rates and latencies, each proxied path's ratio to
/// direct, and where the CPU went.
fn report(paths: &[Path], figures: &[Figures]) {
    for (path, f) in paths.iter().zip(figures) {
        row(path.name, f);
    }
    let direct = &figures[0];
    for (path, f) in paths.iter().zip(figures).skip(1) {
        println!(
            "ratio {:<16} {:>5.1} % of direct throughput   p50 {:+.1} µs ({:.2}x)   p99 {:+.1} µs ({:.2}x)",
            path.name,
            100.0 * f.rate() / direct.rate(),
            micros(f.p50) - micros(direct.p50),
            micros(f.p50) / micros(direct.p50).max(f64::EPSILON),
            micros(f.p99) - micros(direct.p99),
            micros(f.p99) / micros(direct.p99).max(f64::EPSILON),
        );
    }
    // Where the CPU goes: with every core busy, a request through a proxy
    // costs the client's, the replica's and the proxy's CPU, so the
    // throughput ratio cannot exceed (client + replica) / (client +
    // replica + proxy), whatever the proxy's latency. When the direct run
    // leaves cores idle (a replica whose one thread is the bottleneck), the
    // proxy runs on them and that bound does not apply.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    for (path, f) in paths.iter().zip(figures) {
        let (client, replica) = (
            f.cpu_per_request("bench-client"),
            f.cpu_per_request("bench-replica"),
        );
        let forwarder = path.forwarder.map(|role| f.cpu_per_request(role));
        print!(
            "CPU per request {:<16} client {client:.1} µs, replica {replica:.1} µs",
            path.name
        );
        if let Some(proxy) = forwarder {
            print!(", proxy {proxy:.1} µs");
        }
        print!("; {:.2} of {cores} cores busy", f.cores_busy());
        match forwarder {
            Some(proxy) if client + replica + proxy > 0.0 => println!(
                ": bounds the ratio at {:.1} % when all cores are busy",
                100.0 * (client + replica) / (client + replica + proxy)
            ),
            _ => println!(),
        }
    }
}

/// HAProxy forwarding a loopback port to the replica in TCP mode, the
/// reference an L4 proxy in C is measured against. Killed (by its PID) and
/// its config removed when dropped.
struct Haproxy {
    child: std::process::Child,
    addr: SocketAddr,
    config: std::path::PathBuf,
}

impl Haproxy {
    fn start(replica: SocketAddr, threads: usize) -> anyhow::Result<Self> {
        let addr = SocketAddr::new(LOOPBACK, free_port()?);
        let config =
            std::env::temp_dir().join(format!("skiff-bench-haproxy-{}.cfg", std::process::id()));
        std::fs::write(
            &config,
            format!(
                "global\n  nbthread {}\n  maxconn 4096\n\
                 defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\
                 listen bench\n  bind {addr}\n  server replica {replica}\n",
                threads.max(1)
            ),
        )
        .with_context(|| format!("failed to write {}", config.display()))?;
        let child = std::process::Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&config)
            .stdout(std::process::Stdio::null())
            .spawn()
            .map_err(|e| {
                let _ = std::fs::remove_file(&config);
                anyhow!("failed to start haproxy ({e}): install it with `apt-get install haproxy`, or leave out --reference")
            })?;
        let haproxy = Haproxy {
            child,
            addr,
            config,
        };
        // Bounded wait for its listener: 250 tries, 20 ms apart.
        for _ in 0..250 {
            if std::net::TcpStream::connect(addr).is_ok() {
                return Ok(haproxy);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(anyhow!("haproxy did not listen on {addr} within 5 s"))
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.config);
    }
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

/// A replica that answers every request with the same small response,
/// after spending `work` of CPU on it (a busy loop: zero is the trivial
/// replica; an application's handler spends tens of microseconds).
async fn serve_replica(listener: TcpListener, work: Duration) {
    while let Ok((stream, _)) = listener.accept().await {
        tokio::spawn(answer(stream, work));
    }
}

/// Spins for `work` on this thread, as a request handler computing would.
fn burn(work: Duration) {
    if work.is_zero() {
        return;
    }
    let started = Instant::now();
    while started.elapsed() < work {
        std::hint::spin_loop();
    }
}

async fn answer(mut stream: TcpStream, work: Duration) -> std::io::Result<()> {
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
            burn(work);
            stream.write_all(RESPONSE).await?;
        }
    }
}

/// [`load`] over each path in turn, with `connections` clients.
fn load_each(
    paths: &[Path],
    connections: usize,
    args: &BenchProxyArgs,
    reference: Option<u32>,
) -> anyhow::Result<Vec<Figures>> {
    paths
        .iter()
        .map(|path| {
            load(path.addr, connections, args, reference)
                .with_context(|| format!("{} run with {connections} connection(s)", path.name))
        })
        .collect()
}

/// Runs the keep-alive clients against `addr`: a warm-up, then the measured
/// run; every request's latency is recorded.
fn load(
    addr: SocketAddr,
    connections: usize,
    args: &BenchProxyArgs,
    reference: Option<u32>,
) -> anyhow::Result<Figures> {
    let client_rt = runtime("bench-client", args.threads)?;
    let figures = client_rt.block_on(load_on(&client_rt, addr, connections, args, reference));
    client_rt.shutdown_background();
    figures
}

async fn load_on(
    client_rt: &tokio::runtime::Runtime,
    addr: SocketAddr,
    connections: usize,
    args: &BenchProxyArgs,
    reference: Option<u32>,
) -> anyhow::Result<Figures> {
    let warmup = Duration::from_secs(args.warmup);
    let duration = Duration::from_secs(args.duration);
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..connections {
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
    let cpu_before = cpu_by_role(reference);
    tokio::time::sleep(duration).await;
    measuring.store(false, Ordering::Relaxed);
    let cpu = cpu_since(&cpu_before, &cpu_by_role(reference));
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
