//! `skiff cluster ...`

use skiff_proto::v1 as pb;

use crate::args::{ClusterCommand, OutputFormat, SnapshotCommand};
use crate::client::{connect, explain};
use crate::output;
use skiff_control_plane::backup;

pub async fn run(
    server: &str,
    format: OutputFormat,
    command: ClusterCommand,
) -> anyhow::Result<()> {
    if let ClusterCommand::Snapshot(SnapshotCommand::Inspect { file }) = &command {
        return inspect_snapshot(format, file);
    }
    let mut client = connect(server).await?;
    match command {
        ClusterCommand::Snapshot(SnapshotCommand::Inspect { .. }) => unreachable!("answered above"),
        ClusterCommand::Snapshot(SnapshotCommand::Save { file, redact }) => {
            let mut stream = client
                .snapshot_save(pb::SnapshotSaveRequest { redact })
                .await
                .map_err(explain)?
                .into_inner();
            let mut bytes = Vec::new();
            while let Some(chunk) = stream.message().await.map_err(explain)? {
                bytes.extend_from_slice(&chunk.data);
            }
            // Checked as a restore will check it, before it is kept.
            let name = file.display().to_string();
            let backup = backup::decode(&name, &bytes)?;
            let summary = Summary::of(&name, &backup)?;
            backup::write_file(&file, &bytes)?;
            println!(
                "Saved the cluster at index {} ({} services, {} nodes, {} replicas, {} secrets; {} bytes) to {name}.",
                backup.applied_index,
                summary.services,
                summary.nodes,
                summary.replicas,
                summary.secrets,
                bytes.len()
            );
            if redact {
                println!("Redacted: it holds no CA key and no secrets key; a cluster restored from it gets a new CA and no secrets.");
            } else {
                println!("It holds the cluster's CA key and secrets key: keep it as private as a server's data dir.");
            }
            println!("Restore with: skiff server --name NAME --data-dir EMPTY_DIR --bootstrap --restore {name}");
        }
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

/// What `snapshot inspect` and `snapshot save` report of a backup.
#[derive(serde::Serialize)]
struct Summary {
    format: u32,
    created_ms: u64,
    applied_index: u64,
    skiff_version: String,
    redacted: bool,
    ca_digest: String,
    services: usize,
    nodes: usize,
    replicas: usize,
    variables: usize,
    volumes: usize,
    secrets: usize,
    tokens: usize,
    servers: Vec<String>,
}

impl Summary {
    fn of(file: &str, backup: &pb::ClusterBackup) -> anyhow::Result<Summary> {
        let state = skiff_control_plane::state::State::from_image(&backup.state_image)
            .map_err(|e| anyhow::anyhow!("{file}: its state cannot be read: {e}"))?;
        let ca_digest = skiff_pki::ca::digest_of_pem(&backup.ca_cert_pem)
            .map_err(|e| anyhow::anyhow!("{file}: its CA certificate cannot be read: {e}"))?;
        Ok(Summary {
            format: backup.format,
            created_ms: backup.created_ms,
            applied_index: backup.applied_index,
            skiff_version: backup.skiff_version.clone(),
            redacted: backup.redacted,
            ca_digest,
            services: state.services.len(),
            nodes: state.nodes.len(),
            replicas: state.allocs.len(),
            variables: state.variables.len(),
            volumes: state.volumes.len(),
            secrets: state.secrets.len(),
            tokens: state.tokens.len(),
            servers: state.members.values().map(|m| m.name.clone()).collect(),
        })
    }
}

/// `cluster snapshot inspect FILE`: checks the file offline.
fn inspect_snapshot(format: OutputFormat, file: &std::path::Path) -> anyhow::Result<()> {
    let name = file.display().to_string();
    let backup = backup::read_file(file)?;
    let summary = Summary::of(&name, &backup)?;
    let created = super::events::time(summary.created_ms);
    let rows = vec![
        vec!["checksum".into(), "ok (SHA-256)".into()],
        vec!["format".into(), summary.format.to_string()],
        vec!["created".into(), created],
        vec![
            "written by".into(),
            format!("skiff {}", summary.skiff_version),
        ],
        vec!["index".into(), summary.applied_index.to_string()],
        vec![
            "redacted".into(),
            if summary.redacted {
                "yes (no CA key, no secrets key)".into()
            } else {
                "no (holds the CA key and the secrets key)".into()
            },
        ],
        vec!["CA".into(), summary.ca_digest.clone()],
        vec!["servers".into(), summary.servers.join(", ")],
        vec!["services".into(), summary.services.to_string()],
        vec!["nodes".into(), summary.nodes.to_string()],
        vec!["replicas".into(), summary.replicas.to_string()],
        vec!["variables".into(), summary.variables.to_string()],
        vec!["volumes".into(), summary.volumes.to_string()],
        vec!["secrets".into(), summary.secrets.to_string()],
        vec!["tokens".into(), summary.tokens.to_string()],
    ];
    output::print(format, &summary, &["FIELD", "VALUE"], rows);
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
