//! The secret RPCs (`skiff secret create|update|ls|inspect|rm`) and the
//! secret values an agent's assignments carry. Values are sealed here,
//! before they are proposed, and opened here only for an agent whose node
//! runs a replica that references them (see `crate::secrets`). No answer
//! to a client carries a value.

use std::collections::BTreeSet;

use skiff_proto::v1 as pb;
use tonic::Status;

use super::Api;
use crate::secrets::SecretKey;
use crate::state::{Command, Secret, SecretWrite, State};

fn secret_to_pb(state: &State, secret: &Secret) -> pb::SecretInfo {
    pb::SecretInfo {
        name: secret.name.clone(),
        version: secret.version,
        size_bytes: secret.size_bytes,
        created_ms: secret.created_ms,
        updated_ms: secret.updated_ms,
        services: state.secret_users(&secret.name),
        unchanged: false,
        versions: versions_to_pb(state, secret),
    }
}

/// The kept versions of `secret`, newest first, each with the services
/// whose current spec runs with it (a reference that pins none runs with
/// the current one).
fn versions_to_pb(state: &State, secret: &Secret) -> Vec<pb::SecretVersionInfo> {
    let current = pb::SecretVersionInfo {
        version: secret.version,
        size_bytes: secret.size_bytes,
        created_ms: secret.updated_ms,
        services: Vec::new(),
    };
    let earlier = secret.previous.iter().rev().map(|v| pb::SecretVersionInfo {
        version: v.version,
        size_bytes: v.size_bytes,
        created_ms: v.created_ms,
        services: Vec::new(),
    });
    std::iter::once(current)
        .chain(earlier)
        .map(|mut info| {
            info.services = state
                .services
                .values()
                .filter(|s| {
                    s.spec.secrets.iter().any(|r| {
                        r.name == secret.name
                            && (r.version == info.version
                                || (r.version == 0 && info.version == secret.version))
                    })
                })
                .map(|s| s.spec.name.clone())
                .collect();
            info
        })
        .collect()
}

fn not_found(name: &str) -> Status {
    Status::not_found(format!(
        "secret \"{name}\" not found; see `skiff secret ls`"
    ))
}

impl Api {
    fn key(&self) -> Result<&SecretKey, Status> {
        self.secrets_key.as_ref().ok_or_else(|| {
            Status::failed_precondition(format!(
                "server {} holds no secrets key ({}); ask another server, or join this one to the cluster again",
                self.server_name,
                crate::secrets::KEY_FILE
            ))
        })
    }

    /// `secret create` (`create`) or `secret update`. An update to the
    /// value the secret already has changes nothing (a stack redeployed
    /// from the same files restarts nothing).
    pub(super) async fn put_secret_here(
        &self,
        request: pb::PutSecretRequest,
        create: bool,
    ) -> Result<pb::SecretInfo, Status> {
        let invalid = |e: skiff_spec::SpecError| Status::invalid_argument(e.to_string());
        skiff_spec::validate_secret_name(&request.name).map_err(invalid)?;
        skiff_spec::validate_secret_value(&request.name, &request.value).map_err(invalid)?;
        let key = self.key()?;
        if !create {
            self.barrier().await?;
            let state = self.consensus.state();
            let current = state
                .secrets
                .get(&request.name)
                .ok_or_else(|| not_found(&request.name))?;
            if key.open(&current.name, &current.sealed).ok().as_deref()
                == Some(request.value.as_slice())
            {
                return Ok(pb::SecretInfo {
                    unchanged: true,
                    ..secret_to_pb(&state, current)
                });
            }
        }
        let sealed = key.seal(&request.name, &request.value);
        self.propose(Command::PutSecret {
            secret: SecretWrite {
                name: request.name.clone(),
                sealed,
                size_bytes: request.value.len() as u64,
                create,
            },
        })
        .await?;
        self.inspect_secret_here(&request.name).await
    }

    pub(super) async fn inspect_secret_here(&self, name: &str) -> Result<pb::SecretInfo, Status> {
        self.barrier().await?;
        let state = self.consensus.state();
        let secret = state.secrets.get(name).ok_or_else(|| not_found(name))?;
        Ok(secret_to_pb(&state, secret))
    }

    pub(super) async fn list_secrets_here(&self) -> Result<pb::ListSecretsResponse, Status> {
        self.barrier().await?;
        let state = self.consensus.state();
        Ok(pb::ListSecretsResponse {
            secrets: state
                .secrets
                .values()
                .map(|s| secret_to_pb(&state, s))
                .collect(),
        })
    }

    pub(super) async fn remove_secret_here(&self, name: &str) -> Result<(), Status> {
        skiff_spec::validate_secret_name(name)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        self.propose(Command::RemoveSecret {
            name: name.to_string(),
        })
        .await
    }

    /// The values of the secrets referenced by the replicas assigned to
    /// `node` that are wanted running, opened with this server's key: the
    /// version each restarting reference pins (an earlier one after a
    /// rollback) and the current one for those that signal. A value that
    /// does not open is left out and logged by name: its replicas fail to
    /// start on the node, with the reason.
    pub(super) fn node_secrets(&self, state: &State, node: &str) -> Vec<pb::SecretValue> {
        let wanted: BTreeSet<(&str, u64)> = state
            .allocs_on(node)
            .filter(|a| a.desired == crate::state::DesiredState::Run)
            .flat_map(|a| a.spec.secrets.iter().map(|r| (r.name.as_str(), r.version)))
            .collect();
        if wanted.is_empty() {
            return Vec::new();
        }
        let Some(key) = self.secrets_key.as_ref() else {
            tracing::warn!(node, "no secrets key: replicas that use secrets get none");
            return Vec::new();
        };
        let versions: BTreeSet<(&str, u64, &str)> = wanted
            .into_iter()
            .filter_map(|(name, version)| {
                let secret = state.secrets.get(name)?;
                // A pin no longer kept (none is pruned while pinned) gets
                // the current value rather than none.
                let (version, sealed) = secret
                    .sealed_version(version)
                    .or_else(|| secret.sealed_version(0))?;
                Some((name, version, sealed))
            })
            .collect();
        versions
            .into_iter()
            .filter_map(|(name, version, sealed)| match key.open(name, sealed) {
                Ok(value) => Some(pb::SecretValue {
                    name: name.to_string(),
                    version,
                    value,
                }),
                Err(err) => {
                    tracing::warn!(node, secret = %name, version, error = %err, "secret not sent");
                    None
                }
            })
            .collect()
    }
}
