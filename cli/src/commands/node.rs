//! `skiff node ...`

use skiff_proto::v1 as pb;

use crate::args::{NodeCommand, OutputFormat};
use crate::client::{connect, explain};
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
        NodeCommand::Drain { name, deadline } => (name, "drain", deadline.unwrap_or(0)),
        NodeCommand::Pause { name } => (name, "pause", 0),
        NodeCommand::Activate { name } => (name, "active", 0),
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
        (OutputFormat::Json, _) => output::print(format, &node, &[], vec![]),
        (_, "drain") => println!(
            "node {name} draining: {} replicas to move (replacements start first); follow with `skiff events --follow --node {name}`",
            node.allocations
        ),
        (_, "pause") => println!("node {name} paused: no new replicas; its {} replicas keep running", node.allocations),
        _ => println!("node {name} active: the scheduler may place replicas on it"),
    }
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
        if n.last_heartbeat_secs == u64::MAX {
            "never".into()
        } else {
            format!("{}s ago", n.last_heartbeat_secs)
        },
    ]
}
