//! `skiff cluster ...`

use skiff_proto::v1 as pb;

use crate::args::{ClusterCommand, OutputFormat};
use crate::client::{connect, explain};
use crate::output;

pub async fn run(
    server: &str,
    format: OutputFormat,
    command: ClusterCommand,
) -> anyhow::Result<()> {
    let mut client = connect(server).await?;
    match command {
        ClusterCommand::Status => {
            let status = client
                .cluster_status(pb::ClusterStatusRequest {})
                .await
                .map_err(explain)?
                .into_inner();
            if format == OutputFormat::Table {
                println!(
                    "Leader: {}  Term: {}  Commit index: {}  Applied index: {}\n",
                    if status.leader.is_empty() {
                        "(none)"
                    } else {
                        &status.leader
                    },
                    status.term,
                    status.commit_index,
                    status.applied_index
                );
            }
            let rows = status
                .members
                .iter()
                .map(|m| {
                    vec![
                        m.id.to_string(),
                        m.name.clone(),
                        m.address.clone(),
                        m.role.clone(),
                    ]
                })
                .collect();
            output::print(format, &status, &["ID", "NAME", "ADDRESS", "ROLE"], rows);
        }
        ClusterCommand::Remove { name } => {
            client
                .remove_server(pb::RemoveServerRequest { name: name.clone() })
                .await
                .map_err(explain)?;
            println!("server {name} removed from the cluster");
        }
    }
    Ok(())
}
