//! `skiff volume ls|inspect|rm`, and `--volume`/`--mount` of `service
//! create` and `update` turned into the spec's mounts.

use anyhow::{anyhow, bail};
use skiff_proto::v1 as pb;
use skiff_spec as spec;

use crate::args::{OutputFormat, VolumeArgs, VolumeCommand};
use crate::client::{connect, explain};
use crate::output;

/// Adds the mounts of `--volume` and `--mount` to `target` (one at the
/// same path is replaced), removes those at the `remove` paths, and sets
/// `--volume-scope`; each text goes through `skiff_spec`'s parsers.
pub fn apply_args(
    target: &mut pb::ServiceSpec,
    args: &VolumeArgs,
    remove: &[String],
) -> anyhow::Result<()> {
    let invalid = |e: spec::SpecError| anyhow!("{e}");
    for path in remove {
        let before = target.volumes.len();
        target.volumes.retain(|m| m.target != *path);
        if target.volumes.len() == before {
            bail!("invalid volume-rm: the service mounts nothing at {path}; see `skiff service inspect`");
        }
    }
    let volumes = args.volume.iter().map(|t| spec::Mount::parse_volume(t));
    let mounts = args.mount.iter().map(|t| spec::Mount::parse_mount(t));
    for mount in volumes.chain(mounts) {
        let mount = mount.map_err(invalid)?;
        target.volumes.retain(|m| m.target != mount.target);
        target.volumes.push(spec::pb::mount_to_pb(&mount));
    }
    if let Some(scope) = &args.volume_scope {
        let scope = spec::VolumeScope::parse(scope).map_err(invalid)?;
        target.volume_scope = match scope {
            spec::VolumeScope::PerReplica => String::new(),
            other => other.as_str().to_string(),
        };
    }
    Ok(())
}

pub async fn run(server: &str, format: OutputFormat, command: VolumeCommand) -> anyhow::Result<()> {
    let mut client = connect(server).await?;
    match command {
        VolumeCommand::Ls => {
            let volumes = client
                .list_volumes(pb::ListVolumesRequest {})
                .await
                .map_err(explain)?
                .into_inner()
                .volumes;
            print(format, &volumes);
        }
        VolumeCommand::Inspect { name } => {
            let volumes: Vec<pb::VolumeInfo> = client
                .list_volumes(pb::ListVolumesRequest {})
                .await
                .map_err(explain)?
                .into_inner()
                .volumes
                .into_iter()
                .filter(|v| v.name == name)
                .collect();
            if volumes.is_empty() {
                bail!("volume \"{name}\" not found; see `skiff volume ls`");
            }
            match format {
                OutputFormat::Json => output::print(format, &volumes, &[], vec![]),
                _ => {
                    for v in &volumes {
                        println!("Name:     {}", v.name);
                        println!("Kind:     {}", kind(v));
                        if v.anonymous {
                            println!("Replica:  {} (removed with it)", v.alloc_id);
                            println!("Target:   {}", v.target);
                        }
                        println!("Node:     {}", v.node);
                        println!("Service:  {}", v.service);
                        println!("Slot:     {}", slot(v));
                        println!("Size:     {} bytes", v.size_bytes);
                        println!("Status:   {}", v.status);
                        println!("Used by:  {}", used_by(v));
                    }
                }
            }
        }
        VolumeCommand::Rm { name, node } => {
            let removed = client
                .remove_volume(pb::RemoveVolumeRequest {
                    name: name.clone(),
                    node: node.unwrap_or_default(),
                })
                .await
                .map_err(explain)?
                .into_inner()
                .removed;
            let on = removed
                .first()
                .map(|v| format!(" on {}", v.node))
                .unwrap_or_default();
            println!("volume {name} removed{on}; its agent deletes its data");
        }
    }
    Ok(())
}

/// "named", or "anonymous" for one of an image's `Volumes`.
fn kind(v: &pb::VolumeInfo) -> &'static str {
    if v.anonymous {
        "anonymous"
    } else {
        "named"
    }
}

fn slot(v: &pb::VolumeInfo) -> String {
    if !v.anonymous && v.name.ends_with(&format!("-{}", v.slot)) {
        v.slot.to_string()
    } else {
        "-".into()
    }
}

fn used_by(v: &pb::VolumeInfo) -> String {
    if v.used_by.is_empty() {
        "-".into()
    } else {
        v.used_by.join(",")
    }
}

fn print(format: OutputFormat, volumes: &[pb::VolumeInfo]) {
    let rows = volumes
        .iter()
        .map(|v| {
            vec![
                v.name.clone(),
                kind(v).to_string(),
                v.node.clone(),
                v.service.clone(),
                slot(v),
                v.size_bytes.to_string(),
                if v.used_by.is_empty() { "no" } else { "yes" }.to_string(),
                v.status.clone(),
            ]
        })
        .collect();
    output::print(
        format,
        volumes,
        &[
            "NAME", "KIND", "NODE", "SERVICE", "SLOT", "SIZE", "IN USE", "STATUS",
        ],
        rows,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_anonymous_volume_shows_its_kind_and_no_slot() {
        let named = pb::VolumeInfo {
            name: "data-0".into(),
            slot: 0,
            ..Default::default()
        };
        // An anonymous volume's name ends with the image volume's index,
        // which is no slot.
        let anonymous = pb::VolumeInfo {
            name: "3fa9c01b2d4e-0".into(),
            anonymous: true,
            alloc_id: "3fa9c01b2d4e".into(),
            target: "/data".into(),
            ..Default::default()
        };
        assert_eq!((kind(&named), slot(&named).as_str()), ("named", "0"));
        assert_eq!(
            (kind(&anonymous), slot(&anonymous).as_str()),
            ("anonymous", "-")
        );
    }
}
