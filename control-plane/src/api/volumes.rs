//! The volume RPCs (`skiff volume ls|inspect|rm`) and the volumes' side of
//! the agent stream: recording what an agent holds, and their wire form.

use skiff_proto::v1 as pb;
use tonic::Status;

use super::Api;
use crate::controllers::now_ms;
use crate::state::{AnonymousVolume, Command, State, Volume, VolumeReport};

/// A volume as `volume ls` shows it, with the replicas using it now.
pub(super) fn volume_to_pb(state: &State, volume: &Volume) -> pb::VolumeInfo {
    pb::VolumeInfo {
        name: volume.name.clone(),
        node: volume.node.clone(),
        service: volume.service.clone(),
        slot: volume.slot.unwrap_or(0),
        size_bytes: volume.size_bytes,
        used_by: state
            .users_of(volume)
            .iter()
            .map(|a| a.id.clone())
            .collect(),
        status: if volume.removing {
            "removing"
        } else {
            "present"
        }
        .to_string(),
        anonymous: volume.anonymous.is_some(),
        alloc_id: volume
            .anonymous
            .as_ref()
            .map(|a| a.alloc_id.clone())
            .unwrap_or_default(),
        target: volume
            .anonymous
            .as_ref()
            .map(|a| a.target.clone())
            .unwrap_or_default(),
    }
}

impl Api {
    pub(super) async fn volumes_here(&self) -> Result<pb::ListVolumesResponse, Status> {
        self.barrier().await?;
        let state = self.consensus.state();
        Ok(pb::ListVolumesResponse {
            volumes: state
                .volumes
                .values()
                .map(|v| volume_to_pb(&state, v))
                .collect(),
        })
    }

    pub(super) async fn remove_volume_here(
        &self,
        request: pb::RemoveVolumeRequest,
    ) -> Result<pb::RemoveVolumeResponse, Status> {
        skiff_spec::validate_volume_name(&request.name)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let node = Some(request.node).filter(|n| !n.is_empty());
        self.propose(Command::RemoveVolume {
            name: request.name.clone(),
            node: node.clone(),
        })
        .await?;
        let state = self.consensus.state();
        let removed = state
            .volumes
            .values()
            .filter(|v| v.name == request.name && node.as_ref().is_none_or(|n| *n == v.node))
            .map(|v| volume_to_pb(&state, v))
            .collect();
        Ok(pb::RemoveVolumeResponse { removed })
    }

    /// Records the volumes an agent holds, when they changed.
    pub(super) async fn record_volumes(&self, node: &str, report: pb::VolumesReport) {
        let mut volumes: Vec<VolumeReport> = report
            .volumes
            .into_iter()
            .filter(|v| !v.name.is_empty() && v.name.len() <= 63 && !v.name.contains('/'))
            .map(|v| VolumeReport {
                // A per-replica volume's name ends with its slot; an
                // anonymous one belongs to its replica, not to a slot.
                slot: Some(v.slot)
                    .filter(|slot| !v.anonymous && v.name.ends_with(&format!("-{slot}"))),
                anonymous: v.anonymous.then(|| AnonymousVolume {
                    alloc_id: v.alloc_id.clone(),
                    target: v.target.clone(),
                }),
                name: v.name,
                service: v.service,
                size_bytes: v.size_bytes,
            })
            .collect();
        volumes.sort_by(|a, b| a.name.cmp(&b.name));
        let unchanged = {
            let state = self.consensus.state();
            let known: Vec<(&str, u64)> = state
                .volumes
                .values()
                .filter(|v| v.node == node)
                .map(|v| (v.name.as_str(), v.size_bytes))
                .collect();
            known
                == volumes
                    .iter()
                    .map(|v| (v.name.as_str(), v.size_bytes))
                    .collect::<Vec<_>>()
        };
        if unchanged {
            return;
        }
        let command = Command::ReportVolumes {
            node: node.to_string(),
            volumes,
        };
        if let Err(err) = self.consensus.propose(command.at(now_ms())).await {
            tracing::warn!(node, error = %err, "volumes not recorded");
        }
    }
}
