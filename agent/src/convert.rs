//! Conversions between `skiff.v1` messages and the agent's domain types;
//! the only place besides `sync` that touches protobuf types.

use skiff_proto::v1;

use std::time::Duration;

use crate::config::AgentConfig;
use crate::health::{HealthCheck, Probe};
use crate::reconcile::{Assigned, Desired};
use crate::spec::{ReplicaSpec, SpecError};
use crate::supervisor::StatusUpdate;

/// An assigned allocation, validated so the agent can run it as is: the
/// spec passes the same validation the CLI and the server run
/// (`skiff_spec`), then the agent's own checks of what it relies on.
pub fn assigned(alloc: &v1::Allocation) -> Result<Assigned, SpecError> {
    let spec = alloc
        .spec
        .clone()
        .ok_or_else(|| SpecError::MissingSpec(alloc.id.clone()))?;
    let host_port = u16::try_from(alloc.host_port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or(SpecError::BadPort {
            alloc: alloc.id.clone(),
            port: alloc.host_port,
        })?;
    let spec = skiff_spec::pb::spec_from_pb(spec).map_err(|e| SpecError::Invalid {
        alloc: alloc.id.clone(),
        problem: e.to_string(),
    })?;
    let service = if alloc.service.is_empty() {
        spec.name.clone()
    } else {
        alloc.service.clone()
    };
    let mounts: Vec<skiff_spec::Mount> = spec
        .volumes
        .iter()
        .map(|m| skiff_spec::Mount {
            source: match m.kind {
                skiff_spec::MountKind::Volume => spec.volume_name(m, alloc.slot),
                skiff_spec::MountKind::Bind => m.source.clone(),
            },
            ..m.clone()
        })
        .collect();
    let slot = spec.owns_volumes().then_some(alloc.slot);
    let stack = spec
        .labels
        .get(skiff_spec::STACK_LABEL)
        .cloned()
        .unwrap_or_default();
    let replica = ReplicaSpec {
        alloc_id: alloc.id.clone(),
        service,
        node: alloc.node.clone(),
        command: spec.command,
        env: spec.env,
        workdir: spec.workdir.unwrap_or_default(),
        host_port,
        runtime: spec.runtime,
        image: spec.image.unwrap_or_default(),
        container_port: spec.port.unwrap_or(0),
        memory_mb: spec.memory_mb.unwrap_or(0),
        cpu_millis: spec.cpu_millis.unwrap_or(0),
        user: spec.user.unwrap_or_default(),
        network: spec.network,
        health: spec.health.as_ref().map(health),
        init: spec.init,
        publish: spec.publish.unwrap_or(0),
        entrypoint: spec.entrypoint,
        seccomp: spec.seccomp,
        mounts,
        slot,
        stack,
        job: spec.mode == skiff_spec::ServiceMode::Job,
        secrets: spec.secrets,
    };
    replica.validate()?;
    Ok(Assigned {
        spec: replica,
        desired: Desired::parse(&alloc.desired),
    })
}

/// The check the supervisor runs, with Docker's defaults for unset timings.
fn health(h: &skiff_spec::HealthCheck) -> HealthCheck {
    let probe = match &h.kind {
        skiff_spec::HealthKind::Http { path } => Probe::Http { path: path.clone() },
        skiff_spec::HealthKind::Tcp => Probe::Tcp,
        skiff_spec::HealthKind::Exec { command } => Probe::Exec {
            command: command.clone(),
        },
    };
    let ms = |v: u32| Some(Duration::from_millis(u64::from(v)));
    HealthCheck::new(
        probe,
        ms(h.interval_ms),
        ms(h.timeout_ms),
        Some(h.retries),
        ms(h.start_period_ms),
    )
}

pub fn status(update: &StatusUpdate) -> v1::AllocationStatus {
    v1::AllocationStatus {
        id: update.alloc_id.clone(),
        state: update.state.as_str().to_string(),
        restarts: update.restarts,
        pid: update.pid,
        message: update.message.clone(),
        port: u32::from(update.port),
        health_checked: update.health_checked,
        exit_code: update.exit_code,
        refused: update.refused,
    }
}

pub fn register(config: &AgentConfig) -> v1::Register {
    v1::Register {
        node: config.name.clone(),
        address: config.advertise.to_string(),
        port_range_start: u32::from(config.port_range.0),
        port_range_end: u32::from(config.port_range.1),
        process_runtime: config.process_runtime,
        // Resources and labels are filled in by the sync loop.
        ..Default::default()
    }
}

/// The node's volumes as the control plane records them.
pub fn volumes_report(node: &str, volumes: &[crate::volumes::VolumeInfo]) -> v1::VolumesReport {
    v1::VolumesReport {
        volumes: volumes
            .iter()
            .map(|v| v1::VolumeInfo {
                name: v.name.clone(),
                node: node.to_string(),
                service: v.meta.service.clone(),
                slot: v.meta.slot.unwrap_or(0),
                size_bytes: v.size_bytes,
                used_by: Vec::new(),
                status: String::new(),
                anonymous: v.anonymous.is_some(),
                alloc_id: v
                    .anonymous
                    .as_ref()
                    .map(|a| a.alloc_id.clone())
                    .unwrap_or_default(),
                target: v
                    .anonymous
                    .as_ref()
                    .map(|a| a.target.clone())
                    .unwrap_or_default(),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{Network, RuntimeKind};
    use crate::supervisor::AllocState;

    fn alloc(id: &str, desired: &str, port: u32, command: &[&str]) -> v1::Allocation {
        v1::Allocation {
            id: id.into(),
            service: "web".into(),
            node: "n1".into(),
            desired: desired.into(),
            host_port: port,
            spec: Some(v1::ServiceSpec {
                name: "web".into(),
                runtime: "process".into(),
                replicas: 1,
                command: command.iter().map(|s| s.to_string()).collect(),
                env: [("A".to_string(), "1".to_string())].into(),
                workdir: String::new(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn assignment_becomes_a_replica_spec() {
        let a = assigned(&alloc("a1", "run", 20001, &["sleep", "30"])).unwrap();
        assert_eq!(a.desired, Desired::Run);
        assert_eq!(a.spec.host_port, 20001);
        assert_eq!(a.spec.command, ["sleep", "30"]);
        assert_eq!(a.spec.env.get("A").map(String::as_str), Some("1"));
        let stop = assigned(&alloc("a1", "stop", 20001, &["sleep"])).unwrap();
        assert_eq!(stop.desired, Desired::Stop);
    }

    #[test]
    fn container_fields_reach_the_replica_spec() {
        let mut a = alloc("a1", "run", 20001, &[]);
        let spec = a.spec.as_mut().unwrap();
        spec.runtime = String::new();
        spec.image = "127.0.0.1:5000/demo/web:v1".into();
        spec.port = 80;
        spec.memory_mb = 64;
        spec.cpu_millis = 500;
        spec.user = "nobody".into();
        spec.network = "host".into();
        spec.init = Some(false);
        spec.health = Some(v1::HealthCheck {
            kind: "http".into(),
            http_path: "/".into(),
            interval_ms: 500,
            ..Default::default()
        });
        let r = assigned(&a).unwrap().spec;
        assert_eq!(r.runtime, RuntimeKind::Oci);
        assert_eq!(
            (r.container_port, r.memory_mb, r.cpu_millis, r.user.as_str()),
            (80, 64, 500, "nobody")
        );
        assert_eq!((r.network, r.init), (Network::Host, Some(false)));
        let h = r.health.unwrap();
        assert_eq!(h.probe, Probe::Http { path: "/".into() });
        assert_eq!(h.interval, Duration::from_millis(500));
        assert_eq!(h.retries, 3);
    }

    #[test]
    fn invalid_assignments_are_refused() {
        assert!(assigned(&alloc("a1", "run", 70000, &["sleep"])).is_err());
        assert!(assigned(&alloc("a1", "run", 0, &["sleep"])).is_err());
        assert!(assigned(&alloc("a1", "run", 20001, &[])).is_err());
        assert!(assigned(&alloc("../a", "run", 20001, &["sleep"])).is_err());
        let mut no_spec = alloc("a1", "run", 20001, &["sleep"]);
        no_spec.spec = None;
        assert!(assigned(&no_spec).is_err());
    }

    #[test]
    fn status_and_register_carry_every_field() {
        let s = status(&StatusUpdate {
            alloc_id: "a1".into(),
            state: AllocState::Restarting,
            restarts: 2,
            pid: 0,
            message: "exited with status 1; restarting in 2s".into(),
            port: 0,
            health_checked: false,
            exit_code: None,
            refused: false,
        });
        assert_eq!(
            (s.id.as_str(), s.state.as_str(), s.restarts),
            ("a1", "restarting", 2)
        );
        let mut config = AgentConfig::new("n1", "/tmp".into(), vec!["x:1".into()]);
        config.advertise = "127.0.0.2".parse().unwrap();
        let r = register(&config);
        assert_eq!(
            (
                r.node.as_str(),
                r.address.as_str(),
                r.port_range_start,
                r.port_range_end
            ),
            ("n1", "127.0.0.2", 20000, 29999)
        );
    }
}
