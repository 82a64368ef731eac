//! `skiff bench ...`: load generators that print figures. They never assert
//! a timing; the numbers go into notes and comparisons (e.g. with the etcd
//! baseline measured the same way: 256-byte values, random keys, C
//! long-lived gRPC connections, a fresh cluster per run, a warm-up).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use skiff_proto::v1 as pb;

use crate::args::{BenchCommand, BenchFailoverArgs, BenchRaftArgs, RaftLogArg};

pub async fn run(command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Raft(args) => raft(args).await,
        BenchCommand::Failover(args) => failover(args).await,
        BenchCommand::Schedule(args) => super::bench_schedule::run(args).await,
        BenchCommand::Start(args) => super::bench_start::run(args).await,
        BenchCommand::Proxy(args) => super::bench_proxy::run(args).await,
        BenchCommand::Rollout(args) => super::bench_rollout::run(args).await,
        BenchCommand::Autoscale(args) => super::bench_autoscale::run(args).await,
        BenchCommand::Stateful(args) => super::bench_stateful::run(args).await,
        BenchCommand::Chaos(args) => super::bench_chaos::run(args).await,
    }
}

/// The `skiff agent` process a benchmark starts for its run (its own
/// process, so its RSS is its own); SIGTERMed on drop, so it detaches from
/// whatever still runs, and its log copied to `keep_log` if given.
pub struct BenchAgent {
    pub child: Child,
    pub dir: PathBuf,
    keep_log: Option<PathBuf>,
}

/// How a [`BenchAgent`] is started.
pub struct BenchAgentOptions<'a> {
    pub port_range: (u16, u16),
    pub insecure_registries: &'a [String],
    pub oci_runtime: Option<&'a str>,
    /// More `skiff agent` flags.
    pub extra_args: Vec<String>,
    pub keep_log: Option<PathBuf>,
}

impl BenchAgent {
    /// Starts node `bench` against `server`, with data and log under `dir`.
    pub fn start(server: &str, dir: PathBuf, options: BenchAgentOptions) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        let log = std::fs::File::create(dir.join("agent.log"))?;
        let mut command = Command::new(std::env::current_exe()?);
        command
            .args(["agent", "--name", "bench", "--servers", server])
            .arg("--enable-process-runtime")
            .args(["--advertise", "127.0.0.1"])
            .arg("--data-dir")
            .arg(dir.join("data"))
            .arg("--port-range")
            .arg(format!("{}-{}", options.port_range.0, options.port_range.1))
            .args(&options.extra_args);
        for registry in options.insecure_registries {
            command.args(["--insecure-registry", registry]);
        }
        if let Some(runtime) = options.oci_runtime {
            command.args(["--oci-runtime", runtime]);
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("failed to start skiff agent")?;
        Ok(BenchAgent {
            child,
            dir,
            keep_log: options.keep_log,
        })
    }

    /// Containers the agent's OCI runtimes have state for.
    pub fn containers(&self) -> usize {
        ["runc", "crun"]
            .iter()
            .map(|r| self.dir.join("data/oci").join(r))
            .filter_map(|root| std::fs::read_dir(root).ok())
            .map(|entries| entries.flatten().filter(|e| e.path().is_dir()).count())
            .sum()
    }
}

impl Drop for BenchAgent {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // SIGTERM (by PID, our own child): the agent detaches cleanly.
            let _ = Command::new("kill").arg(pid.to_string()).status();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline && !matches!(self.child.try_wait(), Ok(Some(_))) {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(path) = &self.keep_log {
            if let Err(e) = std::fs::copy(self.dir.join("agent.log"), path) {
                eprintln!("cannot keep the agent log in {}: {e}", path.display());
            }
        }
    }
}

/// A cluster of `skiff server` processes started for one run, on loopback,
/// with data in a temp dir; stopped (by PID) and removed on drop.
pub struct LocalCluster {
    pub addresses: Vec<String>,
    pub children: Vec<Option<Child>>,
    dir: PathBuf,
    /// Given to every `skiff server` started (e.g. `--raft-log wal`).
    server_args: Vec<String>,
}

/// The server flag for a bench's `--raft-log`.
pub(crate) fn raft_log_args(log: RaftLogArg) -> Vec<String> {
    let value = match log {
        RaftLogArg::Sled => "sled",
        RaftLogArg::Wal => "wal",
    };
    vec!["--raft-log".into(), value.into()]
}

impl LocalCluster {
    pub async fn start(size: usize) -> anyhow::Result<Self> {
        Self::start_with(size, Vec::new()).await
    }

    /// Like [`LocalCluster::start`], with `server_args` on every server.
    pub async fn start_with(size: usize, server_args: Vec<String>) -> anyhow::Result<Self> {
        let localhost = vec![std::net::Ipv4Addr::LOCALHOST; size];
        Self::start_on(&localhost, server_args).await
    }

    /// Like [`LocalCluster::start_with`], one server per loopback address
    /// in `ips` (each also dials the others from its own address, so
    /// packet filters can cut address pairs: `bench chaos` partitions).
    pub async fn start_on(
        ips: &[std::net::Ipv4Addr],
        server_args: Vec<String>,
    ) -> anyhow::Result<Self> {
        let size = ips.len();
        let dir = std::env::temp_dir().join(format!("skiff-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let ports = (0..size)
            .map(|_| free_port())
            .collect::<anyhow::Result<Vec<_>>>()?;
        let addresses: Vec<String> = ips
            .iter()
            .zip(&ports)
            .map(|(ip, p)| format!("{ip}:{p}"))
            .collect();
        let mut cluster = LocalCluster {
            addresses,
            children: Vec::new(),
            dir,
            server_args,
        };
        for index in 0..size {
            let child = cluster.spawn(index)?;
            cluster.children.push(Some(child));
            if index == 0 {
                cluster.trust_first_server()?;
                use_management_token(&cluster.dir.join("s1"), Duration::from_secs(10)).await?;
                wait_for_leader(&cluster.addresses[0], Duration::from_secs(10)).await?;
            }
        }
        wait_for_voters(&cluster.addresses, size, Duration::from_secs(30)).await?;
        Ok(cluster)
    }

    /// The first server's CA (it bootstraps the cluster).
    pub fn ca(&self) -> anyhow::Result<skiff_pki::ClusterCa> {
        let dir = skiff_pki::files::pki_dir(&self.dir.join("s1"));
        skiff_pki::ClusterCa::load(&dir)?
            .with_context(|| format!("no cluster CA in {}", dir.display()))
    }

    /// The join token of `role` (the cluster is fresh: generation 0).
    pub fn join_token(&self, role: skiff_pki::Role) -> anyhow::Result<String> {
        let ca = self.ca()?;
        Ok(skiff_pki::JoinToken {
            ca_digest: ca.digest(),
            secret: ca.join_secret(role, 0),
        }
        .to_string())
    }

    /// Waits (bounded) for the first server to create the CA, then verifies
    /// servers against it, and gives the bench's agents (child processes)
    /// the agent join token through `SKIFF_JOIN_TOKEN`.
    fn trust_first_server(&self) -> anyhow::Result<()> {
        let ca_file = skiff_pki::files::pki_dir(&self.dir.join("s1")).join("ca.crt");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !ca_file.exists() {
            if std::time::Instant::now() > deadline {
                anyhow::bail!(
                    "the first server created no CA within 10 s ({})",
                    ca_file.display()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(50));
        crate::client::trust_ca_file(&ca_file)?;
        std::env::set_var("SKIFF_JOIN_TOKEN", self.join_token(skiff_pki::Role::Agent)?);
        Ok(())
    }

    fn spawn(&self, index: usize) -> anyhow::Result<Child> {
        let exe = std::env::current_exe()?;
        let data = self.dir.join(format!("s{}", index + 1));
        let log = std::fs::File::create(self.dir.join(format!("s{}.log", index + 1)))?;
        let mut command = Command::new(exe);
        command
            .args([
                "server",
                "--name",
                &format!("s{}", index + 1),
                "--listen",
                &self.addresses[index],
            ])
            .arg("--data-dir")
            .arg(&data)
            .args(&self.server_args)
            .stdout(Stdio::null())
            .stderr(log);
        if index == 0 {
            command.arg("--bootstrap");
        } else {
            command.args(["--join", &self.addresses[0]]);
            command.args(["--token", &self.join_token(skiff_pki::Role::Server)?]);
        }
        command.spawn().context("failed to start skiff server")
    }

    /// SIGKILLs server `index`.
    pub fn kill(&mut self, index: usize) {
        if let Some(mut child) = self.children[index].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn restart(&mut self, index: usize) -> anyhow::Result<()> {
        self.kill(index);
        self.children[index] = Some(self.spawn(index)?);
        Ok(())
    }

    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().flatten().map(|c| c.id()).collect()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for index in 0..self.children.len() {
            self.kill(index);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

pub(crate) async fn client(address: &str) -> anyhow::Result<crate::client::Client> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{address}"))?
        .connect_timeout(Duration::from_secs(2));
    let channel = crate::client::connect_tls(endpoint)
        .await?
        .with_context(|| format!("cannot reach {address}"))?;
    Ok(crate::client::client(channel))
}

/// Waits until the bootstrap server with data in `data_dir` has written
/// its client config (once it leads and has created the management
/// token), and presents that token on every call from now on.
/// The agent join token of the fresh cluster whose bootstrap server keeps
/// its data in `data_dir` (token generation 0), once it created its CA
/// (waits at most `limit`).
pub fn agent_join_token(data_dir: &Path, limit: Duration) -> anyhow::Result<String> {
    let dir = skiff_pki::files::pki_dir(data_dir);
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(Some(ca)) = skiff_pki::ClusterCa::load(&dir) {
            return Ok(skiff_pki::JoinToken {
                ca_digest: ca.digest(),
                secret: ca.join_secret(skiff_pki::Role::Agent, 0),
            }
            .to_string());
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "the bench server created no CA in {} within {limit:?}",
                dir.display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub async fn use_management_token(data_dir: &Path, limit: Duration) -> anyhow::Result<()> {
    let path = data_dir.join(skiff_control_plane::CLIENT_CONFIG_FILE);
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(config) = skiff_control_plane::ClientConfig::read(&path) {
            if let Some(ca) = &config.ca_cert {
                crate::client::trust_ca_file(ca)?;
            }
            return crate::client::set_token(&config.token);
        }
        if Instant::now() > deadline {
            return Err(anyhow!(
                "the bench server wrote no client config {} within {limit:?}",
                path.display()
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn cluster_status(address: &str) -> anyhow::Result<pb::ClusterStatusResponse> {
    Ok(client(address)
        .await?
        .cluster_status(pb::ClusterStatusRequest {})
        .await?
        .into_inner())
}

pub(crate) async fn wait_for_leader(address: &str, limit: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok(status) = cluster_status(address).await {
            if !status.leader.is_empty() {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(anyhow!("no leader at {address} within {limit:?}"))
}

/// Waits until every server in `addresses` knows a leader and counts
/// `voters` members, none of them a learner. Asking only one server is not
/// enough: a joined server is a learner until the leader promotes it, and a
/// follower that has not yet applied the promotion cannot win an election
/// without the killed leader's vote (a failover round would then wait for
/// ever).
async fn wait_for_voters(
    addresses: &[String],
    voters: usize,
    limit: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        let mut all = true;
        for address in addresses {
            let ready = cluster_status(address).await.is_ok_and(|status| {
                !status.leader.is_empty()
                    && status.members.len() >= voters
                    && status
                        .members
                        .iter()
                        .all(|m| !m.role.starts_with("learner"))
            });
            all &= ready;
        }
        if all {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(anyhow!(
        "the servers at {} did not all see {voters} voting members within {limit:?}",
        addresses.join(", ")
    ))
}

/// Runs `clients` writers over `addresses` until `total` writes are done
/// (or `until` passes); returns each acknowledged write's latency.
async fn load(
    addresses: &[String],
    clients: usize,
    total: usize,
    until: Option<Instant>,
    value_bytes: usize,
    key_space: u64,
) -> anyhow::Result<(Vec<Vec<Duration>>, usize)> {
    let issued = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(AtomicUsize::new(0));
    let value = "v".repeat(value_bytes);
    let mut tasks = Vec::new();
    for index in 0..clients {
        let mut client = client(&addresses[index % addresses.len()]).await?;
        let (issued, errors, value) = (issued.clone(), errors.clone(), value.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while issued.fetch_add(1, Ordering::Relaxed) < total
                && until.is_none_or(|u| Instant::now() < u)
            {
                let key = format!("bench/{}", rand::random::<u64>() % key_space.max(1));
                let started = Instant::now();
                match client
                    .put_variable(pb::PutVariableRequest {
                        key,
                        value: value.clone(),
                    })
                    .await
                {
                    Ok(_) => latencies.push(started.elapsed()),
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            latencies
        }));
    }
    // Per server, in the order of `addresses`.
    let mut latencies = vec![Vec::new(); addresses.len()];
    for (index, task) in tasks.into_iter().enumerate() {
        latencies[index % addresses.len()].extend(task.await?);
    }
    Ok((latencies, errors.load(Ordering::Relaxed)))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// CPU time (user + system) of a process so far, from /proc.
fn cpu_time(pid: u32) -> Duration {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Duration::ZERO;
    };
    let Some(after) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
        return Duration::ZERO;
    };
    let fields: Vec<&str> = after.split(' ').collect();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|i| fields.get(*i)?.parse::<u64>().ok())
        .sum();
    Duration::from_millis(ticks * 10)
}

async fn raft(args: BenchRaftArgs) -> anyhow::Result<()> {
    let spawned = if args.servers.is_empty() {
        Some(LocalCluster::start_with(args.spawn, raft_log_args(args.raft_log)).await?)
    } else {
        None
    };
    let addresses = spawned
        .as_ref()
        .map_or_else(|| args.servers.clone(), |c| c.addresses.clone());
    let pids = spawned.as_ref().map(|c| c.pids()).unwrap_or_default();
    if args.warmup_secs > 0 {
        let until = Instant::now() + Duration::from_secs(args.warmup_secs);
        load(
            &addresses,
            args.clients,
            usize::MAX,
            Some(until),
            args.value_bytes,
            args.key_space,
        )
        .await?;
    }
    let cpu_before: Duration = pids.iter().map(|p| cpu_time(*p)).sum();
    let started = Instant::now();
    let (by_server, errors) = load(
        &addresses,
        args.clients,
        args.writes,
        None,
        args.value_bytes,
        args.key_space,
    )
    .await?;
    let elapsed = started.elapsed();
    let cpu = pids
        .iter()
        .map(|p| cpu_time(*p))
        .sum::<Duration>()
        .saturating_sub(cpu_before);
    let mut latencies: Vec<Duration> = by_server.iter().flatten().copied().collect();
    latencies.sort_unstable();
    let ok = latencies.len();
    println!(
        "servers={} clients={} writes={} value_bytes={} ok={} errors={}",
        addresses.len(),
        args.clients,
        args.writes,
        args.value_bytes,
        ok,
        errors
    );
    println!(
        "ops/s={:.0} p50_ms={:.2} p99_ms={:.2} max_ms={:.2} elapsed_s={:.2}",
        ok as f64 / elapsed.as_secs_f64(),
        percentile(&latencies, 0.50).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        latencies.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
        elapsed.as_secs_f64()
    );
    // Clients of a follower wait for it to learn the commit from the
    // leader: a breakdown shows whether the tail is theirs.
    for (address, mut server) in addresses.iter().zip(by_server) {
        // Each server names only its own role.
        let role = match cluster_status(address).await {
            Ok(status) => status
                .members
                .into_iter()
                .find(|m| m.address == *address)
                .map_or_else(|| "?".to_string(), |m| m.role),
            Err(_) => "?".to_string(),
        };
        server.sort_unstable();
        println!(
            "  via {address} ({role}): writes={} p50_ms={:.2} p99_ms={:.2}",
            server.len(),
            percentile(&server, 0.50).as_secs_f64() * 1e3,
            percentile(&server, 0.99).as_secs_f64() * 1e3,
        );
    }
    if !pids.is_empty() && ok > 0 {
        println!(
            "server_cpu_us_per_write={:.0} (summed over all servers)",
            cpu.as_secs_f64() * 1e6 / ok as f64
        );
    }
    if let Some(cluster) = &spawned {
        println!("data_dir_bytes={}", dir_size(cluster.dir()));
    }
    Ok(())
}

fn dir_size(path: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

pub(crate) async fn leader_index(cluster: &LocalCluster) -> Option<usize> {
    for (index, address) in cluster.addresses.iter().enumerate() {
        if cluster.children[index].is_none() {
            continue;
        }
        if let Ok(status) = cluster_status(address).await {
            let leader = status.members.iter().find(|m| m.role == "leader")?;
            return cluster.addresses.iter().position(|a| *a == leader.address);
        }
    }
    None
}

async fn failover(args: BenchFailoverArgs) -> anyhow::Result<()> {
    let mut cluster = LocalCluster::start_with(3, raft_log_args(args.raft_log)).await?;
    let mut figures = Vec::new();
    for round in 1..=args.rounds {
        let leader = leader_index(&cluster)
            .await
            .ok_or_else(|| anyhow!("no leader before round {round}"))?;
        let survivors: Vec<String> = cluster
            .addresses
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != leader)
            .map(|(_, a)| a.clone())
            .collect();
        let mut clients = Vec::new();
        for address in &survivors {
            clients.push(client(address).await?);
        }
        cluster.kill(leader);
        let killed = Instant::now();
        let deadline = killed + Duration::from_secs(15);
        let mut recovered = None;
        'probe: while Instant::now() < deadline {
            for client in clients.iter_mut() {
                let put = pb::PutVariableRequest {
                    key: format!("failover/{round}"),
                    value: "x".into(),
                };
                if tokio::time::timeout(Duration::from_millis(300), client.put_variable(put))
                    .await
                    .is_ok_and(|r| r.is_ok())
                {
                    recovered = Some(killed.elapsed());
                    break 'probe;
                }
            }
        }
        let recovered = recovered
            .ok_or_else(|| anyhow!("writes did not recover within 15 s in round {round}"))?;
        println!(
            "round {round}: killed leader s{}, first successful write after {:.0} ms",
            leader + 1,
            recovered.as_secs_f64() * 1e3
        );
        figures.push(recovered);
        cluster.restart(leader)?;
        wait_for_leader(&cluster.addresses[leader], Duration::from_secs(10)).await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    figures.sort_unstable();
    println!(
        "failover ms: median={:.0} min={:.0} max={:.0} (rounds={}, clients={})",
        percentile(&figures, 0.5).as_secs_f64() * 1e3,
        figures[0].as_secs_f64() * 1e3,
        figures[figures.len() - 1].as_secs_f64() * 1e3,
        figures.len(),
        args.clients
    );
    Ok(())
}
