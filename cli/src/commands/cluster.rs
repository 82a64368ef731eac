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
                        m.reachable.clone(),
                        last_contact(m),
                        if m.matched_index == 0 {
                            "-".into()
                        } else {
                            m.matched_index.to_string()
                        },
                    ]
                })
                .collect();
            output::print(
                format,
                &status,
                &[
                    "ID",
                    "NAME",
                    "ADDRESS",
                    "ROLE",
                    "REACHABLE",
                    "LAST CONTACT",
                    "MATCHED",
                ],
                rows,
            );
        }
        ClusterCommand::Remove { name } => {
            client
                .remove_server(pb::RemoveServerRequest { name: name.clone() })
                .await
                .map_err(explain)?;
            println!("server {name} removed from the cluster");
        }
        ClusterCommand::Token { words, quiet } => {
            let (rotate, role) = match words.iter().map(String::as_str).collect::<Vec<_>>()[..] {
                ["rotate", role] => (true, role.to_string()),
                [role] if role != "rotate" => (false, role.to_string()),
                _ => anyhow::bail!(
                    "invalid `cluster token {}`: use `cluster token server|agent` or `cluster token rotate server|agent`",
                    words.join(" ")
                ),
            };
            if role != "server" && role != "agent" {
                anyhow::bail!("invalid role \"{role}\": use server or agent");
            }
            let answer = client
                .cluster_token(pb::ClusterTokenRequest {
                    role: role.clone(),
                    rotate,
                })
                .await
                .map_err(explain)?
                .into_inner();
            if quiet {
                println!("{}", answer.token);
            } else {
                if rotate {
                    println!(
                        "The {role} join token was rotated: the old one is refused from now on.\n"
                    );
                }
                println!(
                    "To join this cluster as {role}, run:\n\n    {}\n",
                    answer.command
                );
            }
        }
    }
    Ok(())
}

/// When the leader last heard from `member`: "0.2s ago", "never", or "?"
/// when the answering server could not ask the leader.
fn last_contact(member: &pb::Member) -> String {
    match (member.reachable.as_str(), member.last_contact_ms) {
        ("unknown", _) => "?".into(),
        (_, u64::MAX) => "never".into(),
        (_, ms) => format!("{:.1}s ago", ms as f64 / 1000.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_contact_reads_as_an_age_never_or_unknown() {
        let member = |reachable: &str, last_contact_ms| pb::Member {
            reachable: reachable.into(),
            last_contact_ms,
            ..Default::default()
        };
        assert_eq!(last_contact(&member("yes", 230)), "0.2s ago");
        assert_eq!(last_contact(&member("no", 12_400)), "12.4s ago");
        assert_eq!(last_contact(&member("no", u64::MAX)), "never");
        assert_eq!(last_contact(&member("unknown", u64::MAX)), "?");
    }
}
