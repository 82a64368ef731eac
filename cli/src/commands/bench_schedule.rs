//! `skiff bench schedule`: the scheduler at scale. Simulated nodes (each a
//! real `AgentSync` stream that registers with capacity and labels, sends
//! heartbeats and receives its assignments, but runs nothing) connect to a
//! fresh 3-server cluster on loopback; services totalling `--replicas`
//! replicas are created; the figure is the time until every placement is
//! committed and delivered to its node's stream. The pure scheduler is then
//! timed alone on an in-process state of the same shape. Figures are
//! printed, never asserted.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use skiff_control_plane::bench::SimNode;
use skiff_proto::v1 as pb;
use skiff_proto::v1::agent_message::Msg as AgentMsg;
use skiff_proto::v1::agent_sync_client::AgentSyncClient;
use skiff_proto::v1::server_message::Msg as ServerMsg;
use skiff_spec::{RuntimeKind, ServiceSpec};
use tokio::sync::mpsc;
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

use super::bench::LocalCluster;
use crate::args::BenchScheduleArgs;

/// Simulated nodes sharing one HTTP/2 connection.
const NODE_CPU: u32 = 4000;
const NODE_MEMORY: u32 = 8192;
const REPLICA_CPU: u32 = 100;
const REPLICA_MEMORY: u32 = 64;

pub async fn run(args: BenchScheduleArgs) -> anyhow::Result<()> {
    if args.nodes == 0 || args.replicas == 0 {
        bail!("--nodes and --replicas must be above 0");
    }
    let per_node = args.replicas.div_ceil(args.nodes) as u32;
    if per_node * REPLICA_CPU > NODE_CPU || per_node * REPLICA_MEMORY > NODE_MEMORY {
        bail!(
            "{} replicas on {} nodes do not fit ({} per node); add nodes",
            args.replicas,
            args.nodes,
            per_node
        );
    }
    let services = services(args.replicas);
    if args.scheduler_only {
        print_pure(args.nodes, &services);
        return Ok(());
    }
    println!(
        "bench schedule: {} simulated nodes ({NODE_CPU} millicores, {NODE_MEMORY} MB, zones z0-z2), {} replicas ({REPLICA_CPU} millicores, {REPLICA_MEMORY} MB each) in services of up to 1000, {} servers",
        args.nodes, args.replicas, args.servers
    );
    let cluster = LocalCluster::start(args.servers).await?;

    // Nodes.
    let started = Instant::now();
    let delivered = Arc::new(AtomicUsize::new(0));
    let registered = Arc::new(AtomicUsize::new(0));
    // One connection per node: each carries that node's own certificate
    // (a certificate speaks for exactly one node).
    let ca = cluster.ca()?;
    let mut channels = Vec::new();
    for i in 0..args.nodes {
        let address = &cluster.addresses[i % cluster.addresses.len()];
        let name = node_name(i);
        let key = skiff_pki::Credentials::generate_key()?;
        let issued = ca.issue(
            skiff_pki::Role::Agent,
            &name,
            key.public_key_raw(),
            skiff_pki::DEFAULT_LIFETIME,
        )?;
        let credentials = skiff_pki::Credentials::new(
            skiff_pki::Role::Agent,
            &name,
            &key,
            &issued,
            ca.cert_pem(),
        )?;
        let connector = skiff_pki::tls::connector(
            credentials.client_config()?,
            skiff_pki::identity::SERVER_NAME,
        )?;
        let channel = Endpoint::from_shared(format!("http://{address}"))?
            .connect_with_connector(connector)
            .await
            .with_context(|| format!("cannot reach {address}"))?;
        channels.push(channel);
    }
    for (i, channel) in channels.into_iter().enumerate() {
        tokio::spawn(simulated_node(
            channel,
            i,
            registered.clone(),
            delivered.clone(),
        ));
    }
    let limit = Instant::now() + Duration::from_secs(120);
    while registered.load(Ordering::Relaxed) < args.nodes {
        if Instant::now() > limit {
            bail!(
                "only {} of {} nodes registered within 120 s",
                registered.load(Ordering::Relaxed),
                args.nodes
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let registration = started.elapsed();
    println!(
        "  {} nodes registered in {:.2} s",
        args.nodes,
        registration.as_secs_f64()
    );

    // Services.
    let started = Instant::now();
    let mut creates = Vec::new();
    for (i, spec) in services.iter().enumerate() {
        let address = cluster.addresses[i % cluster.addresses.len()].clone();
        let spec = spec.clone();
        creates.push(tokio::spawn(async move {
            let channel =
                crate::client::connect_tls(Endpoint::from_shared(format!("http://{address}"))?)
                    .await??;
            crate::client::client(channel)
                .create_service(pb::CreateServiceRequest { spec: Some(spec) })
                .await?;
            anyhow::Ok(())
        }));
    }
    for create in creates {
        create.await??;
    }
    let created = started.elapsed();
    let limit = Instant::now() + Duration::from_secs(300);
    let mut last_report = Instant::now();
    while delivered.load(Ordering::Relaxed) < args.replicas {
        if Instant::now() > limit {
            bail!(
                "only {} of {} placements delivered within 300 s",
                delivered.load(Ordering::Relaxed),
                args.replicas
            );
        }
        if last_report.elapsed() > Duration::from_secs(2) {
            println!(
                "  ... {} placements delivered after {:.1} s",
                delivered.load(Ordering::Relaxed),
                started.elapsed().as_secs_f64()
            );
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let placed = started.elapsed();
    let rss: Vec<u64> = cluster.pids().iter().map(|pid| rss_mb(*pid)).collect();
    println!(
        "  {} services created in {:.2} s",
        services.len(),
        created.as_secs_f64()
    );
    println!(
        "  every placement committed and delivered to its node: {:.2} s after the first create ({:.0} placements/s)",
        placed.as_secs_f64(),
        args.replicas as f64 / placed.as_secs_f64()
    );
    println!(
        "  whole run (register + create + place): {:.2} s",
        (registration + placed).as_secs_f64()
    );
    println!("  server RSS at the end: {rss:?} MB");
    drop(cluster);

    print_pure(args.nodes, &services);
    Ok(())
}

/// Times the pure scheduler alone, on the same shape of state.
fn print_pure(nodes: usize, services: &[pb::ServiceSpec]) {
    let (placements, spent, plans) = pure_scheduler(nodes, services);
    println!(
        "  pure scheduler: {placements} placements in {plans} plans in {:.3} s ({:.0} placements/s)",
        spent.as_secs_f64(),
        placements as f64 / spent.as_secs_f64()
    );
}

fn services(replicas: usize) -> Vec<pb::ServiceSpec> {
    let mut left = replicas;
    let mut out = Vec::new();
    while left > 0 {
        let count = left.min(1000);
        left -= count;
        out.push(pb::ServiceSpec {
            name: format!("bench-{:03}", out.len()),
            runtime: "process".into(),
            replicas: count as u32,
            command: vec!["sleep".into(), "3600".into()],
            cpu_millis: REPLICA_CPU,
            memory_mb: REPLICA_MEMORY,
            ..Default::default()
        });
    }
    out
}

fn labels(i: usize) -> BTreeMap<String, String> {
    [("zone".to_string(), format!("z{}", i % 3))].into()
}

fn node_name(i: usize) -> String {
    format!("sim-{i:05}")
}

/// One simulated node: registers, heartbeats, and counts the replicas
/// assigned to run on it.
async fn simulated_node(
    channel: Channel,
    i: usize,
    registered: Arc<AtomicUsize>,
    delivered: Arc<AtomicUsize>,
) {
    let (outbound, rx) = mpsc::channel(4);
    let register = pb::Register {
        node: node_name(i),
        address: "127.0.0.1".into(),
        port_range_start: 20000,
        port_range_end: 29999,
        cpu_millis: NODE_CPU,
        memory_mb: NODE_MEMORY,
        labels: labels(i).into_iter().collect(),
        process_runtime: true,
        agent_address: String::new(),
        metrics_address: String::new(),
    };
    let _ = outbound
        .send(pb::AgentMessage {
            msg: Some(AgentMsg::Register(register)),
        })
        .await;
    let mut client = AgentSyncClient::new(channel);
    let Ok(response) = client.sync(ReceiverStream::new(rx)).await else {
        return;
    };
    registered.fetch_add(1, Ordering::Relaxed);
    let mut inbound = response.into_inner();
    let mut heartbeat = tokio::time::interval(Duration::from_secs(1));
    let mut assigned = 0usize;
    loop {
        tokio::select! {
            message = inbound.message() => match message {
                Ok(Some(pb::ServerMessage { msg: Some(ServerMsg::Assignments(a)) })) => {
                    let now = a.allocations.iter().filter(|a| a.desired == "run").count();
                    if now >= assigned {
                        delivered.fetch_add(now - assigned, Ordering::Relaxed);
                    } else {
                        delivered.fetch_sub(assigned - now, Ordering::Relaxed);
                    }
                    assigned = now;
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return,
            },
            _ = heartbeat.tick() => {
                let beat = pb::AgentMessage { msg: Some(AgentMsg::Heartbeat(pb::Heartbeat {})) };
                if outbound.send(beat).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Places every replica of `services` on `nodes` nodes in memory, plan by
/// plan as the leader does; returns placements, time spent deciding (not
/// applying) and the number of plans.
fn pure_scheduler(nodes: usize, services: &[pb::ServiceSpec]) -> (usize, Duration, usize) {
    let nodes: Vec<SimNode> = (0..nodes)
        .map(|i| SimNode {
            name: format!("sim-{i:05}"),
            cpu_millis: NODE_CPU,
            memory_mb: NODE_MEMORY,
            labels: labels(i),
        })
        .collect();
    let services: Vec<ServiceSpec> = services
        .iter()
        .map(|s| ServiceSpec {
            name: s.name.clone(),
            runtime: RuntimeKind::Process,
            replicas: s.replicas,
            command: s.command.clone(),
            cpu_millis: Some(s.cpu_millis),
            memory_mb: Some(s.memory_mb),
            ..Default::default()
        })
        .collect();
    match skiff_control_plane::bench::pure_scheduler(&nodes, &services) {
        Ok(run) => (run.placements, run.deciding, run.plans),
        Err(e) => {
            eprintln!("  pure scheduler: {e}");
            (0, Duration::ZERO, 0)
        }
    }
}

fn rss_mb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map_or(0, |kb| kb / 1024)
}
