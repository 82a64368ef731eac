//! `skiff bench start`: how fast containers of a cached image become
//! healthy, and what the agent costs in memory. A fresh `skiff server` and
//! `skiff agent` (separate processes, so the agent's RSS is its own) are
//! started for the run; every service is removed and its containers gone
//! before the next run and before the processes are stopped. Figures are
//! printed, never asserted.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use skiff_proto::v1 as pb;

use super::bench::LocalCluster;
use crate::args::BenchStartArgs;
use crate::client::{connect, Client};

const POLL: Duration = Duration::from_millis(10);
/// Bound on any one wait (pull, start, removal).
const LIMIT: Duration = Duration::from_secs(120);

/// The agent started for the run; SIGTERMed on drop.
struct Agent {
    child: Child,
    dir: PathBuf,
    /// Where the log is copied once the agent stopped.
    keep_log: Option<PathBuf>,
}

impl Agent {
    fn start(args: &BenchStartArgs, server: &str, dir: PathBuf) -> anyhow::Result<Agent> {
        std::fs::create_dir_all(&dir)?;
        let log = std::fs::File::create(dir.join("agent.log"))?;
        let mut command = Command::new(std::env::current_exe()?);
        command
            .args(["agent", "--name", "bench", "--servers", server])
            .arg("--data-dir")
            .arg(dir.join("data"))
            .arg("--port-range")
            .arg(format!("{}-{}", args.port_range.0, args.port_range.1));
        for registry in &args.insecure_registries {
            command.args(["--insecure-registry", registry]);
        }
        if let Some(runtime) = &args.oci_runtime {
            command.args(["--oci-runtime", runtime]);
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("failed to start skiff agent")?;
        Ok(Agent {
            child,
            dir,
            keep_log: args.agent_log.clone(),
        })
    }

    fn containers(&self) -> usize {
        ["runc", "crun"]
            .iter()
            .map(|r| self.dir.join("data/oci").join(r))
            .filter_map(|root| std::fs::read_dir(root).ok())
            .map(|entries| entries.flatten().filter(|e| e.path().is_dir()).count())
            .sum()
    }
}

impl Drop for Agent {
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

fn rss_mb(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

fn spec(name: &str, image: &str, replicas: u32) -> pb::ServiceSpec {
    pb::ServiceSpec {
        name: name.to_string(),
        runtime: "oci".into(),
        replicas,
        image: image.to_string(),
        health: Some(pb::HealthCheck {
            kind: "http".into(),
            http_path: "/".into(),
            interval_ms: 1000,
            timeout_ms: 1000,
            retries: 3,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Creates the service and returns the time until all its replicas are
/// healthy.
async fn create_until_healthy(
    client: &mut Client,
    image: &str,
    name: &str,
    replicas: u32,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    client
        .create_service(pb::CreateServiceRequest {
            spec: Some(spec(name, image, replicas)),
        })
        .await
        .map_err(|e| anyhow!("failed to create {name}: {}", e.message()))?;
    loop {
        let status = client
            .get_service(pb::GetServiceRequest { name: name.into() })
            .await
            .map_err(|e| anyhow!("failed to read {name}: {}", e.message()))?
            .into_inner();
        let healthy = status
            .allocations
            .iter()
            .filter(|a| a.desired == "run" && a.state == "healthy")
            .count();
        if healthy == replicas as usize {
            return Ok(started.elapsed());
        }
        if started.elapsed() > LIMIT {
            let states: Vec<String> = status
                .allocations
                .iter()
                .map(|a| format!("{} {} {}", a.id, a.state, a.message))
                .collect();
            return Err(anyhow!(
                "{name}: {healthy} of {replicas} replicas healthy after {LIMIT:?}: {states:?}"
            ));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Removes the service and waits until the control plane and the agent are
/// rid of it.
async fn remove(client: &mut Client, agent: &Agent, name: &str) -> anyhow::Result<()> {
    client
        .remove_service(pb::RemoveServiceRequest { name: name.into() })
        .await
        .map_err(|e| anyhow!("failed to remove {name}: {}", e.message()))?;
    let started = Instant::now();
    loop {
        let gone = client
            .get_service(pb::GetServiceRequest { name: name.into() })
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

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

pub async fn run(args: BenchStartArgs) -> anyhow::Result<()> {
    let cluster = LocalCluster::start(1).await?;
    let server = cluster.addresses[0].clone();
    let agent = Agent::start(&args, &server, cluster.dir().join("agent"))?;
    let mut client = connect(&server).await?;
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
            break;
        }
        if started.elapsed() > Duration::from_secs(30) {
            return Err(anyhow!(
                "the agent did not register within 30 s; see {}",
                agent.dir.join("agent.log").display()
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Warm-up: pulls the image, so the runs measure a cached image.
    let pull = create_until_healthy(&mut client, &args.image, "bench-warm", 1).await?;
    remove(&mut client, &agent, "bench-warm").await?;
    println!(
        "skiff bench start: {} ({} runs per size; first start with pull {})",
        args.image,
        args.runs,
        ms(pull)
    );
    println!(
        "{:>9}  {:>8}  {:>8}  {:>8}  {:>8}",
        "replicas", "p50", "p99", "min", "max"
    );
    for &size in &args.replicas {
        let mut times = Vec::new();
        for run in 0..args.runs {
            let name = format!("bench-{size}-{run}");
            times.push(create_until_healthy(&mut client, &args.image, &name, size).await?);
            remove(&mut client, &agent, &name).await?;
        }
        times.sort();
        println!(
            "{:>9}  {:>8}  {:>8}  {:>8}  {:>8}",
            size,
            ms(percentile(&times, 50.0)),
            ms(percentile(&times, 99.0)),
            ms(times[0]),
            ms(times[times.len() - 1])
        );
    }

    let idle = rss_mb(agent.child.id());
    let took =
        create_until_healthy(&mut client, &args.image, "bench-rss", args.rss_replicas).await?;
    // Let the health checks settle into their steady interval.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let busy = rss_mb(agent.child.id());
    let server_rss = cluster.pids().first().and_then(|&pid| rss_mb(pid));
    println!(
        "{} replicas healthy in {}; agent RSS {:.1} MB with them running ({:.1} MB idle); server RSS {:.1} MB",
        args.rss_replicas,
        ms(took),
        busy.unwrap_or(f64::NAN),
        idle.unwrap_or(f64::NAN),
        server_rss.unwrap_or(f64::NAN),
    );
    remove(&mut client, &agent, "bench-rss").await?;
    drop(agent);
    drop(cluster);
    Ok(())
}
