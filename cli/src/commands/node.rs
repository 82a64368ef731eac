//! `skiff node ...`

use skiff_proto::v1 as pb;

use crate::args::{NodeCommand, OutputFormat};
use crate::client::{connect, explain};
use crate::output;

pub async fn run(server: &str, format: OutputFormat, command: NodeCommand) -> anyhow::Result<()> {
    let mut client = connect(server).await?;
    match command {
        NodeCommand::Ls => {
            let nodes = client
                .list_nodes(pb::ListNodesRequest {})
                .await
                .map_err(explain)?
                .into_inner()
                .nodes;
            let rows = nodes
                .iter()
                .map(|n| {
                    vec![
                        n.name.clone(),
                        n.address.clone(),
                        n.status.clone(),
                        format!("{}-{}", n.port_range_start, n.port_range_end),
                        n.allocations.to_string(),
                        if n.last_heartbeat_secs == u64::MAX {
                            "never".into()
                        } else {
                            format!("{}s ago", n.last_heartbeat_secs)
                        },
                    ]
                })
                .collect();
            output::print(
                format,
                &nodes,
                &[
                    "NAME",
                    "ADDRESS",
                    "STATUS",
                    "PORTS",
                    "REPLICAS",
                    "HEARTBEAT",
                ],
                rows,
            );
        }
    }
    Ok(())
}
