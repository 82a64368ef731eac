//! `skiff bench start`: how fast containers of a cached image become
//! healthy, and what the agent costs in memory. A fresh `skiff server` and
//! `skiff agent` (separate processes, so the agent's RSS is its own) are
//! started for the run; every service is removed and its containers gone
//! before the next run and before the processes are stopped. Figures are
//! printed, never asserted.

use std::time::{Duration, Instant};

use anyhow::anyhow;
use skiff_proto::v1 as pb;

use super::bench::{BenchAgent, BenchAgentOptions, LocalCluster};
use crate::args::BenchStartArgs;
use crate::client::{connect, Client};

const POLL: Duration = Duration::from_millis(10);
/// Bound on any one wait (pull, start, removal).
const LIMIT: Duration = Duration::from_secs(120);

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

/// A field of `/proc/PID/smaps_rollup` (`Pss:`, `Rss:`) in MB.
fn smaps_mb(pid: u32, field: &str) -> Option<f64> {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let kb: f64 = rollup
        .lines()
        .find_map(|l| l.strip_prefix(field))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

/// The `skiff shim` processes (one per container) of the agent whose data
/// lives under `dir`: they monitor the containers for the agent, so their
/// memory is part of what running containers with Skiff costs.
fn shim_pids(dir: &std::path::Path) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let dir = dir.as_os_str().as_encoded_bytes();
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                return false;
            };
            let mut args = cmdline.split(|&b| b == 0);
            args.nth(1) == Some(b"shim".as_slice()) && args.any(|a| a.starts_with(dir))
        })
        .collect()
}

/// Shim count, their PSS summed (pages shared with each other and the
/// agent split among the sharers, so nothing is counted twice) and the mean
/// RSS of one (which counts the shared pages in full).
fn shims_mb(dir: &std::path::Path) -> (usize, f64, f64) {
    let pids = shim_pids(dir);
    let pss: f64 = pids.iter().filter_map(|&p| smaps_mb(p, "Pss:")).sum();
    let rss: f64 = pids.iter().filter_map(|&p| smaps_mb(p, "Rss:")).sum();
    (pids.len(), pss, rss / pids.len().max(1) as f64)
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
            .get_service(pb::GetServiceRequest {
                name: name.into(),
                show_values: false,
            })
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
async fn remove(client: &mut Client, agent: &BenchAgent, name: &str) -> anyhow::Result<()> {
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
    let (shims, shims_pss, shim_rss) = shims_mb(&agent.dir);
    let server_rss = cluster.pids().first().and_then(|&pid| rss_mb(pid));
    println!(
        "{} replicas healthy in {}; agent RSS {:.1} MB with them running ({:.1} MB idle); server RSS {:.1} MB",
        args.rss_replicas,
        ms(took),
        busy.unwrap_or(f64::NAN),
        idle.unwrap_or(f64::NAN),
        server_rss.unwrap_or(f64::NAN),
    );
    println!(
        "{shims} container shims (own processes, children of the agent): PSS {shims_pss:.1} MB in all, RSS {shim_rss:.1} MB each"
    );
    remove(&mut client, &agent, "bench-rss").await?;
    drop(agent);
    drop(cluster);
    Ok(())
}
