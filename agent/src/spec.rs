//! What one replica runs, as the agent keeps it: plain serde types so the
//! records on disk do not depend on the protobuf types, plus `$PORT`
//! interpolation of arguments and environment.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::health::HealthCheck;

pub use skiff_spec::{NetworkMode as Network, RuntimeKind};

/// One allocation's replica: its identity, the service spec copied at
/// placement, and the host port the scheduler gave it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaSpec {
    pub alloc_id: String,
    pub service: String,
    /// The node it is placed on (`SKIFF_NODE`); empty in records written
    /// before it was kept.
    #[serde(default)]
    pub node: String,
    /// Program and arguments; never empty (checked by [`ReplicaSpec::validate`]).
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// Empty means the allocation's directory (process) or the image's
    /// working directory (oci).
    pub workdir: String,
    pub host_port: u16,
    #[serde(default)]
    pub runtime: RuntimeKind,
    /// Image reference; empty for the process runtime.
    #[serde(default)]
    pub image: String,
    /// Port inside the container (bridge mode); 0: the image's first exposed
    /// TCP port, else the host port.
    #[serde(default)]
    pub container_port: u16,
    /// 0: no limit.
    #[serde(default)]
    pub memory_mb: u32,
    /// 0: no limit.
    #[serde(default)]
    pub cpu_millis: u32,
    /// Empty: the image's user.
    #[serde(default)]
    pub user: String,
    #[serde(default)]
    pub network: Network,
    /// `None`: the image's health check, if any.
    #[serde(default)]
    pub health: Option<HealthCheck>,
    /// `None`: an init unless the entrypoint is one.
    #[serde(default)]
    pub init: Option<bool>,
    /// The service's published port (0: none); a published replica is
    /// drained before it is stopped.
    #[serde(default)]
    pub publish: u16,
    /// Replaces the image's Entrypoint (and then its Cmd, as Docker does);
    /// `None`: the image's.
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    /// `None`: Docker's default profile; `"unconfined"`: none; else an OCI
    /// `linux.seccomp` JSON object.
    #[serde(default)]
    pub seccomp: Option<String>,
    /// Named volumes (by their name on this node, `NAME-<slot>` for a
    /// per-replica one) and bind mounts.
    #[serde(default)]
    pub mounts: Vec<skiff_spec::Mount>,
    /// The replica's slot when it owns its volumes; `None` otherwise.
    #[serde(default)]
    pub slot: Option<u32>,
    /// The stack the service belongs to (empty: none): its replicas find
    /// the stack's other services by their short names.
    #[serde(default)]
    pub stack: String,
    /// Secrets it reads under `/run/secrets` (references only: the values
    /// live in memory and in the replica's tmpfs, see `crate::secrets`).
    #[serde(default)]
    pub secrets: Vec<skiff_spec::SecretRef>,
    /// A one-shot job's replica: when it ends, it ends for good (reported
    /// `completed` or `exited` with its status, never restarted here: the
    /// control plane decides on another attempt).
    #[serde(default)]
    pub job: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("allocation {0} has no spec")]
    MissingSpec(String),
    #[error("allocation {alloc} of {service} has an empty command")]
    EmptyCommand { alloc: String, service: String },
    #[error("allocation {alloc} has host port {port}, outside 1-65535")]
    BadPort { alloc: String, port: u32 },
    #[error("allocation id {0:?} is not a safe directory name")]
    BadId(String),
    #[error("allocation {alloc} of {service} runs on oci but names no image")]
    MissingImage { alloc: String, service: String },
    #[error("allocation {alloc}: {problem}")]
    Invalid { alloc: String, problem: String },
}

impl ReplicaSpec {
    /// Checks what the agent relies on: an id usable as a directory name and
    /// a program to run.
    pub fn validate(&self) -> Result<(), SpecError> {
        validate_alloc_id(&self.alloc_id)?;
        if self.runtime == RuntimeKind::Oci {
            return if self.image.is_empty() {
                Err(SpecError::MissingImage {
                    alloc: self.alloc_id.clone(),
                    service: self.service.clone(),
                })
            } else {
                Ok(())
            };
        }
        match self.command.first() {
            Some(program) if !program.is_empty() => Ok(()),
            _ => Err(SpecError::EmptyCommand {
                alloc: self.alloc_id.clone(),
                service: self.service.clone(),
            }),
        }
    }

    /// The id's first 8 characters: enough to name a replica in messages.
    pub fn short_id(&self) -> &str {
        let end = self
            .alloc_id
            .char_indices()
            .nth(8)
            .map_or(self.alloc_id.len(), |(i, _)| i);
        &self.alloc_id[..end]
    }

    pub fn program(&self) -> &str {
        self.command.first().map_or("", String::as_str)
    }

    /// Arguments after the program, with `$PORT` interpolated.
    pub fn args(&self) -> Vec<String> {
        self.command
            .iter()
            .skip(1)
            .map(|a| interpolate_port(a, self.host_port))
            .collect()
    }

    /// The port the replica listens on, given the container port its image
    /// suggests: the host port for processes and host networking, else the
    /// spec's container port, the image's, or the host port.
    pub fn listen_port(&self, image_port: Option<u16>) -> u16 {
        match (self.runtime, self.network) {
            (RuntimeKind::Process, _) | (_, Network::Host) => self.host_port,
            (RuntimeKind::Oci, Network::Bridge) => Some(self.container_port)
                .filter(|p| *p != 0)
                .or(image_port)
                .unwrap_or(self.host_port),
        }
    }

    /// Whether routing proxies may send it connections: published, or
    /// reachable by name (its own port: the spec's, or an image's in a
    /// bridge container). Such a replica is drained before it stops.
    pub fn reached_through_proxies(&self) -> bool {
        self.publish != 0
            || self.container_port != 0
            || (self.runtime == RuntimeKind::Oci && self.network == Network::Bridge)
    }

    /// Variables added to the agent's environment: the spec's (with `$PORT`
    /// interpolated), then `PORT`, `SKIFF_ALLOC_ID`, `SKIFF_SERVICE` and
    /// `SKIFF_NODE` (when known), which the spec cannot override: a replica
    /// can say who it is.
    pub fn environment(&self) -> Vec<(String, String)> {
        self.environment_for(self.host_port)
    }

    /// [`ReplicaSpec::environment`] with `PORT` = `port`.
    pub fn environment_for(&self, port: u16) -> Vec<(String, String)> {
        const RESERVED: [&str; 4] = ["PORT", "SKIFF_ALLOC_ID", "SKIFF_SERVICE", "SKIFF_NODE"];
        let mut vars: Vec<(String, String)> = self
            .env
            .iter()
            .filter(|(k, _)| !RESERVED.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), interpolate_port(v, port)))
            .collect();
        vars.push(("PORT".into(), port.to_string()));
        vars.push(("SKIFF_ALLOC_ID".into(), self.alloc_id.clone()));
        vars.push(("SKIFF_SERVICE".into(), self.service.clone()));
        if !self.node.is_empty() {
            vars.push(("SKIFF_NODE".into(), self.node.clone()));
        }
        vars
    }
}

/// Allocation ids name directories under `DATA/allocs`, so they must not
/// climb out of it.
pub fn validate_alloc_id(id: &str) -> Result<(), SpecError> {
    let safe = !id.is_empty()
        && !id.starts_with('.')
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if safe {
        Ok(())
    } else {
        Err(SpecError::BadId(id.to_string()))
    }
}

/// Replaces `$PORT` and `${PORT}` with `port`. Users write
/// `python3 -m http.server '$PORT'` and no shell expands it for them.
/// `$PORTS` or `$PORT_X` are other variables and stay as they are.
pub fn interpolate_port(s: &str, port: u16) -> String {
    let port = port.to_string();
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if let Some(after) = tail.strip_prefix("${PORT}") {
            out.push_str(&port);
            rest = after;
        } else if let Some(after) = tail.strip_prefix("$PORT").filter(|after| {
            !after
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        }) {
            out.push_str(&port);
            rest = after;
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
pub(crate) fn test_spec(id: &str, command: &[&str], port: u16) -> ReplicaSpec {
    ReplicaSpec {
        alloc_id: id.into(),
        service: "web".into(),
        command: command.iter().map(|s| s.to_string()).collect(),
        env: BTreeMap::new(),
        workdir: String::new(),
        host_port: port,
        ..ReplicaSpec::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interpolates_both_port_forms() {
        assert_eq!(interpolate_port("$PORT", 20001), "20001");
        assert_eq!(interpolate_port("${PORT}", 20001), "20001");
        assert_eq!(
            interpolate_port("--listen=0.0.0.0:$PORT/${PORT}x", 8080),
            "--listen=0.0.0.0:8080/8080x"
        );
    }

    #[test]
    fn leaves_other_variables_and_lone_dollars_alone() {
        assert_eq!(
            interpolate_port("$PORTS $PORT_X $HOME", 1),
            "$PORTS $PORT_X $HOME"
        );
        assert_eq!(interpolate_port("cost: 5$ ${PORT", 1), "cost: 5$ ${PORT");
        assert_eq!(interpolate_port("$$PORT", 7), "$7");
        assert_eq!(interpolate_port("no vars", 7), "no vars");
    }

    #[test]
    fn args_and_env_are_interpolated_and_port_vars_added() {
        let mut spec = test_spec(
            "3f2a9c0d-1111",
            &["python3", "-m", "http.server", "$PORT"],
            20005,
        );
        spec.env
            .insert("URL".into(), "http://127.0.0.1:${PORT}/".into());
        spec.env.insert("PORT".into(), "ignored".into());
        assert_eq!(spec.args(), ["-m", "http.server", "20005"]);
        let env = spec.environment();
        assert!(env.contains(&("URL".into(), "http://127.0.0.1:20005/".into())));
        let ports: Vec<&str> = env
            .iter()
            .filter(|(k, _)| k == "PORT")
            .map(|(_, v)| v.as_str())
            .collect();
        assert_eq!(ports, ["20005"]);
        assert!(env.contains(&("SKIFF_SERVICE".into(), "web".into())));
        assert!(env.contains(&("SKIFF_ALLOC_ID".into(), "3f2a9c0d-1111".into())));
        assert_eq!(spec.short_id(), "3f2a9c0d");
        // No node known (an old record): no SKIFF_NODE rather than an empty one.
        assert!(!env.iter().any(|(k, _)| k == "SKIFF_NODE"));
    }

    #[test]
    fn a_replica_knows_its_node_and_the_spec_cannot_say_otherwise() {
        let mut spec = test_spec("3f2a9c0d-1111", &["serve"], 20005);
        spec.node = "n2".into();
        spec.env.insert("SKIFF_NODE".into(), "elsewhere".into());
        let env = spec.environment();
        let nodes: Vec<&str> = env
            .iter()
            .filter(|(k, _)| k == "SKIFF_NODE")
            .map(|(_, v)| v.as_str())
            .collect();
        assert_eq!(nodes, ["n2"]);
    }

    #[test]
    fn validate_rejects_path_like_ids_and_empty_commands() {
        assert!(test_spec("../etc", &["sh"], 1).validate().is_err());
        assert!(test_spec("a/b", &["sh"], 1).validate().is_err());
        assert!(test_spec("ok-1", &[], 1).validate().is_err());
        assert!(test_spec("ok-1", &["sh"], 1).validate().is_ok());
    }
}
