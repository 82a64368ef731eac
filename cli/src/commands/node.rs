//! `skiff node ...`

use anyhow::{anyhow, bail};
use serde::Serialize;
use skiff_proto::v1 as pb;

use crate::args::{NodeCommand, OutputFormat};
use crate::client::{connect, explain, Client};
use crate::output;

pub async fn run(server: &str, format: OutputFormat, command: NodeCommand) -> anyhow::Result<()> {
    let mut client = connect(server).await?;
    let (name, availability, deadline) = match command {
        NodeCommand::Ls => {
            let nodes = client
                .list_nodes(pb::ListNodesRequest {})
                .await
                .map_err(explain)?
                .into_inner()
                .nodes;
            let rows = nodes.iter().map(row).collect();
            output::print(
                format,
                &nodes,
                &[
                    "NAME",
                    "ADDRESS",
                    "STATUS",
                    "AVAILABILITY",
                    "CPU",
                    "MEMORY",
                    "LABELS",
                    "PORTS",
                    "REPLICAS",
                    "HEARTBEAT",
                ],
                rows,
            );
            return Ok(());
        }
        NodeCommand::Inspect { name } => return inspect(&mut client, format, &name).await,
        NodeCommand::Rm { name } => {
            let removed = client
                .remove_node(pb::RemoveNodeRequest { name: name.clone() })
                .await
                .map_err(explain)?
                .into_inner();
            println!(
                "node {name} removed; {} of its allocations forgotten",
                removed.forgotten
            );
            return Ok(());
        }
        NodeCommand::Revoke { name } => {
            client
                .revoke_node(pb::RevokeNodeRequest { name: name.clone() })
                .await
                .map_err(explain)?;
            println!("node {name} revoked: its certificate is refused by every server");
            return Ok(());
        }
        NodeCommand::Drain { name, deadline } => (name, "drain", deadline.unwrap_or(0)),
        NodeCommand::Pause { name } => (name, "pause", 0),
        NodeCommand::Activate { name } => (name, "active", 0),
        NodeCommand::Prune { nodes } => return prune(&mut client, format, nodes).await,
    };
    let node = client
        .set_node_availability(pb::SetNodeAvailabilityRequest {
            name: name.clone(),
            availability: availability.to_string(),
            deadline_ms: u64::from(deadline),
        })
        .await
        .map_err(explain)?
        .into_inner();
    match (format, availability) {
        (OutputFormat::Json | OutputFormat::Yaml, _) => output::print(format, &node, &[], vec![]),
        (_, "drain") => println!(
            "node {name} draining: {} replicas to move (replacements start first); follow with `skiff events --follow --node {name}`",
            node.allocations
        ),
        (_, "pause") => println!("node {name} paused: no new replicas; its {} replicas keep running", node.allocations),
        _ => println!("node {name} active: the scheduler may place replicas on it"),
    }
    Ok(())
}

/// `skiff node inspect NAME`: the node as `node ls` shows it, one field a
/// line, then its replicas.
async fn inspect(client: &mut Client, format: OutputFormat, name: &str) -> anyhow::Result<()> {
    let detail = client
        .inspect_node(pb::InspectNodeRequest {
            name: name.to_string(),
        })
        .await
        .map_err(explain)?
        .into_inner();
    if format != OutputFormat::Table {
        output::print(format, &detail, &[], vec![]);
        return Ok(());
    }
    let node = detail
        .node
        .as_ref()
        .ok_or_else(|| anyhow!("the server answered without the node {name}"))?;
    let fields = row(node);
    let labels = [
        "Name",
        "Address",
        "Status",
        "Availability",
        "CPU",
        "Memory",
        "Labels",
        "Ports",
        "Replicas",
        "Heartbeat",
    ];
    for (label, value) in labels.iter().zip(&fields) {
        println!("{:<14}{value}", format!("{label}:"));
    }
    println!();
    let rows = detail
        .allocations
        .iter()
        .map(|a| {
            vec![
                a.id.clone(),
                a.service.clone(),
                a.version.to_string(),
                a.state.clone(),
                a.desired.clone(),
                a.host_port.to_string(),
            ]
        })
        .collect();
    output::print(
        format,
        &detail.allocations,
        &["ID", "SERVICE", "VERSION", "STATE", "DESIRED", "PORT"],
        rows,
    );
    Ok(())
}

fn row(n: &pb::Node) -> Vec<String> {
    let mut labels: Vec<String> = n.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    labels.sort();
    let availability = if n.drained {
        "drain (done)".to_string()
    } else {
        n.availability.clone()
    };
    vec![
        n.name.clone(),
        n.address.clone(),
        n.status.clone(),
        availability,
        format!("{}/{}m", n.cpu_used, n.cpu_millis),
        format!("{}/{}MB", n.memory_used, n.memory_mb),
        if labels.is_empty() {
            "-".into()
        } else {
            labels.join(",")
        },
        format!("{}-{}", n.port_range_start, n.port_range_end),
        n.allocations.to_string(),
        if n.leader_unreachable {
            // This server could not ask the leader, which alone knows.
            "?".into()
        } else if n.last_heartbeat_secs == u64::MAX {
            "never".into()
        } else {
            format!("{}s ago", n.last_heartbeat_secs)
        },
    ]
}

/// What one node's prune removed, as `--output json` prints it.
#[derive(Debug, Serialize)]
struct Pruned {
    node: String,
    images: u32,
    layers: u32,
    blobs: u32,
    bytes: u64,
}

/// `skiff node prune [NODE...]`: asks each node's agent (over its
/// `AgentLogs` service, at the address in its node record) to remove the
/// images none of its replicas uses. Every node is tried; the command fails
/// if any could not be pruned.
async fn prune(
    client: &mut Client,
    format: OutputFormat,
    names: Vec<String>,
) -> anyhow::Result<()> {
    let nodes = client
        .list_nodes(pb::ListNodesRequest {})
        .await
        .map_err(explain)?
        .into_inner()
        .nodes;
    let mut chosen: Vec<&pb::Node> = Vec::new();
    for name in &names {
        let node = nodes.iter().find(|n| &n.name == name).ok_or_else(|| {
            let known: Vec<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
            anyhow!(
                "unknown node {name} (nodes: {})",
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            )
        })?;
        if !chosen.iter().any(|c| c.name == node.name) {
            chosen.push(node);
        }
    }
    if names.is_empty() {
        chosen = nodes.iter().collect();
    }
    if chosen.is_empty() {
        bail!("the cluster has no nodes to prune");
    }
    let mut pruned = Vec::new();
    let mut failed = Vec::new();
    for node in chosen {
        match prune_node(client, node).await {
            Ok(p) => pruned.push(p),
            Err(e) => failed.push((node.name.clone(), e)),
        }
    }
    if !pruned.is_empty() {
        let rows = pruned
            .iter()
            .map(|p| {
                vec![
                    p.node.clone(),
                    p.images.to_string(),
                    p.layers.to_string(),
                    p.blobs.to_string(),
                    human_bytes(p.bytes),
                ]
            })
            .collect();
        output::print(
            format,
            &pruned,
            &["NODE", "IMAGES", "LAYERS", "BLOBS", "FREED"],
            rows,
        );
    }
    match failed.len() {
        0 => Ok(()),
        1 if pruned.is_empty() => Err(failed.remove(0).1),
        n => {
            for (node, e) in &failed {
                eprintln!("error: node {node}: {e:#}");
            }
            bail!("failed to prune {n} of {} nodes", n + pruned.len())
        }
    }
}

/// Prunes one node's image store, relayed by the server (only servers
/// may call an agent).
async fn prune_node(client: &mut Client, node: &pb::Node) -> anyhow::Result<Pruned> {
    let name = &node.name;
    if node.agent_address.is_empty() {
        bail!("node {name} cannot be pruned: its agent registered no address (status {}); restart it with this version of skiff", node.status);
    }
    let report = client
        .prune_node(pb::PruneNodeRequest { node: name.clone() })
        .await
        .map_err(|e| anyhow!("node {name}: {}", e.message()))?
        .into_inner();
    Ok(Pruned {
        node: name.clone(),
        images: report.images,
        layers: report.layers,
        blobs: report.blobs,
        bytes: report.bytes,
    })
}

/// `0 B`, `512 KB`, `1.5 MB`, `2.0 GB` (powers of 1024).
fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KB", "MB", "GB", "TB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if value < 10.0 {
        format!("{value:.1} {}", UNITS[unit])
    } else {
        format!("{value:.0} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::human_bytes;

    #[test]
    fn freed_space_reads_in_binary_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KB");
        assert_eq!(human_bytes(300 * 1024 * 1024), "300 MB");
    }
}
