//! The one place where the protocol's messages become the spec's types and
//! back. Incoming specs are validated here, so every field error names the
//! field, whichever side (CLI, server, agent) converts.

use skiff_proto::v1 as pb;

use crate::{
    AutoscalePolicy, Constraint, Dependency, DependsCondition, HealthCheck, HealthKind, Mount,
    MountKind, NetworkMode, OnChange, PlacementPolicy, Protocol, RuntimeKind, SecretRef,
    ServiceMode, ServiceSpec, SpecError, Strategy, UpdatePolicy, VolumeScope,
};

pub fn mount_from_pb(m: pb::VolumeMount) -> Result<Mount, SpecError> {
    let kind = match m.r#type.as_str() {
        "" | "volume" => MountKind::Volume,
        "bind" => MountKind::Bind,
        other => {
            return Err(SpecError::new(
                "mount",
                format!("unknown mount type \"{other}\"; use volume or bind"),
            ))
        }
    };
    Ok(Mount {
        kind,
        source: m.source,
        target: m.target,
        read_only: m.read_only,
        nocopy: m.nocopy,
    })
}

pub fn mount_to_pb(m: &Mount) -> pb::VolumeMount {
    pb::VolumeMount {
        r#type: m.kind.as_str().to_string(),
        source: m.source.clone(),
        target: m.target.clone(),
        read_only: m.read_only,
        nocopy: m.nocopy,
    }
}

pub fn secret_from_pb(s: pb::SecretMount) -> Result<SecretRef, SpecError> {
    Ok(SecretRef {
        name: s.name,
        target: s.target,
        mode: s.mode,
        on_change: OnChange::parse(&s.on_change)?,
        version: s.version,
    })
}

pub fn secret_to_pb(s: &SecretRef) -> pb::SecretMount {
    pb::SecretMount {
        name: s.name.clone(),
        target: s.target.clone(),
        mode: s.mode,
        on_change: match &s.on_change {
            OnChange::Restart => String::new(),
            other => other.to_string(),
        },
        version: s.version,
    }
}

pub fn spec_from_pb(spec: pb::ServiceSpec) -> Result<ServiceSpec, SpecError> {
    let image = Some(spec.image).filter(|i| !i.is_empty());
    let port = match spec.port {
        0 => None,
        p => Some(u16::try_from(p).map_err(|_| {
            SpecError::new(
                "port",
                format!("{p} is out of range; use a container port from 1 to 65535"),
            )
        })?),
    };
    let spec = ServiceSpec {
        name: spec.name,
        runtime: RuntimeKind::resolve(&spec.runtime, image.is_some())?,
        replicas: crate::validate_replicas(i64::from(spec.replicas))?,
        command: spec.command,
        env: spec.env.into_iter().collect(),
        workdir: Some(spec.workdir).filter(|w| !w.is_empty()),
        image,
        port,
        memory_mb: Some(spec.memory_mb).filter(|m| *m != 0),
        cpu_millis: Some(spec.cpu_millis).filter(|c| *c != 0),
        user: Some(spec.user).filter(|u| !u.is_empty()),
        network: NetworkMode::parse(&spec.network)?,
        health: spec.health.map(health_from_pb).transpose()?.flatten(),
        init: spec.init,
        constraints: spec
            .constraints
            .iter()
            .map(|c| Constraint::parse(c))
            .collect::<Result<_, _>>()?,
        max_per_node: Some(spec.max_per_node).filter(|m| *m != 0),
        placement: PlacementPolicy::parse(&spec.placement)?,
        mode: ServiceMode::parse(&spec.mode)?,
        publish: match spec.publish {
            0 => None,
            p => Some(u16::try_from(p).map_err(|_| {
                SpecError::new(
                    "publish",
                    format!("{p} is out of range; use a published port from 1 to 65535"),
                )
            })?),
        },
        protocol: Protocol::parse(&spec.protocol)?,
        update: update_from_pb(spec.update.unwrap_or_default())?,
        autoscale: spec.autoscale.map(autoscale_from_pb),
        entrypoint: spec.entrypoint.map(|argv| argv.args),
        seccomp: Some(spec.seccomp).filter(|s| !s.is_empty()),
        volumes: spec
            .volumes
            .into_iter()
            .map(mount_from_pb)
            .collect::<Result<_, _>>()?,
        volume_scope: VolumeScope::parse(&spec.volume_scope)?,
        secrets: spec
            .secrets
            .into_iter()
            .map(secret_from_pb)
            .collect::<Result<_, _>>()?,
        labels: spec.labels.into_iter().collect(),
        depends_on: spec
            .depends_on
            .into_iter()
            .map(|d| {
                Ok(Dependency {
                    condition: DependsCondition::parse(&d.condition)?,
                    service: d.service,
                })
            })
            .collect::<Result<_, SpecError>>()?,
        max_retries: spec.max_retries,
        deadline_secs: Some(spec.deadline_secs).filter(|d| *d != 0),
    };
    spec.validate()?;
    Ok(spec)
}

/// Zero values and unset options mean the defaults.
pub fn update_from_pb(p: pb::UpdatePolicy) -> Result<UpdatePolicy, SpecError> {
    let d = UpdatePolicy::default();
    let nonzero = |v: u32, default: u32| if v == 0 { default } else { v };
    Ok(UpdatePolicy {
        strategy: Strategy::parse(&p.strategy)?,
        max_parallel: nonzero(p.max_parallel, d.max_parallel),
        max_surge: p.max_surge.unwrap_or(d.max_surge),
        max_unavailable: p.max_unavailable.unwrap_or(d.max_unavailable),
        min_healthy_ms: p.min_healthy_ms.unwrap_or(d.min_healthy_ms),
        healthy_deadline_ms: nonzero(p.healthy_deadline_ms, d.healthy_deadline_ms),
        progress_deadline_ms: nonzero(p.progress_deadline_ms, d.progress_deadline_ms),
        auto_rollback: p.auto_rollback.unwrap_or(d.auto_rollback),
        auto_promote: p.auto_promote,
        canary: nonzero(p.canary, d.canary),
        canary_weight: Some(p.canary_weight).filter(|w| *w != 0),
        max_error_rate: p.max_error_rate,
    })
}

pub fn update_to_pb(u: &UpdatePolicy) -> pb::UpdatePolicy {
    pb::UpdatePolicy {
        strategy: u.strategy.as_str().to_string(),
        max_parallel: u.max_parallel,
        max_surge: Some(u.max_surge),
        max_unavailable: Some(u.max_unavailable),
        min_healthy_ms: Some(u.min_healthy_ms),
        healthy_deadline_ms: u.healthy_deadline_ms,
        progress_deadline_ms: u.progress_deadline_ms,
        auto_rollback: Some(u.auto_rollback),
        auto_promote: u.auto_promote,
        canary: u.canary,
        canary_weight: u.canary_weight.unwrap_or(0),
        max_error_rate: u.max_error_rate,
    }
}

pub fn autoscale_from_pb(a: pb::Autoscale) -> AutoscalePolicy {
    let target = |t: f64| Some(t).filter(|t| *t != 0.0);
    AutoscalePolicy {
        min: a.min,
        max: a.max,
        target_rps: target(a.target_rps),
        target_concurrency: target(a.target_concurrency),
        target_cpu: target(a.target_cpu),
    }
}

pub fn autoscale_to_pb(a: &AutoscalePolicy) -> pb::Autoscale {
    pb::Autoscale {
        min: a.min,
        max: a.max,
        target_rps: a.target_rps.unwrap_or(0.0),
        target_concurrency: a.target_concurrency.unwrap_or(0.0),
        target_cpu: a.target_cpu.unwrap_or(0.0),
    }
}

/// `None` for a check of empty kind (none given).
pub fn health_from_pb(h: pb::HealthCheck) -> Result<Option<HealthCheck>, SpecError> {
    let kind = match h.kind.as_str() {
        "" => return Ok(None),
        "http" => HealthKind::Http { path: h.http_path },
        "tcp" => HealthKind::Tcp,
        "exec" => HealthKind::Exec { command: h.command },
        other => {
            return Err(SpecError::new(
                "health",
                format!("unknown check kind \"{other}\"; use --health-http PATH, --health-tcp or --health-cmd CMD"),
            ))
        }
    };
    Ok(Some(HealthCheck {
        kind,
        interval_ms: h.interval_ms,
        timeout_ms: h.timeout_ms,
        retries: h.retries,
        start_period_ms: h.start_period_ms,
    }))
}

pub fn health_to_pb(h: &HealthCheck) -> pb::HealthCheck {
    let (kind, http_path, command) = match &h.kind {
        HealthKind::Http { path } => ("http", path.clone(), vec![]),
        HealthKind::Tcp => ("tcp", String::new(), vec![]),
        HealthKind::Exec { command } => ("exec", String::new(), command.clone()),
    };
    pb::HealthCheck {
        kind: kind.to_string(),
        http_path,
        command,
        interval_ms: h.interval_ms,
        timeout_ms: h.timeout_ms,
        retries: h.retries,
        start_period_ms: h.start_period_ms,
    }
}

pub fn spec_to_pb(spec: &ServiceSpec) -> pb::ServiceSpec {
    pb::ServiceSpec {
        name: spec.name.clone(),
        runtime: spec.runtime.as_str().to_string(),
        replicas: spec.replicas,
        command: spec.command.clone(),
        env: spec.env.clone().into_iter().collect(),
        workdir: spec.workdir.clone().unwrap_or_default(),
        image: spec.image.clone().unwrap_or_default(),
        port: spec.port.map_or(0, u32::from),
        memory_mb: spec.memory_mb.unwrap_or(0),
        cpu_millis: spec.cpu_millis.unwrap_or(0),
        user: spec.user.clone().unwrap_or_default(),
        network: spec.network.as_str().to_string(),
        health: spec.health.as_ref().map(health_to_pb),
        init: spec.init,
        constraints: spec.constraints.iter().map(|c| c.to_string()).collect(),
        max_per_node: spec.max_per_node.unwrap_or(0),
        placement: spec.placement.as_str().to_string(),
        mode: spec.mode.as_str().to_string(),
        publish: spec.publish.map_or(0, u32::from),
        protocol: spec.protocol.as_str().to_string(),
        update: Some(update_to_pb(&spec.update)),
        autoscale: spec.autoscale.as_ref().map(autoscale_to_pb),
        entrypoint: spec
            .entrypoint
            .as_ref()
            .map(|args| pb::Argv { args: args.clone() }),
        labels: spec.labels.clone().into_iter().collect(),
        seccomp: spec.seccomp.clone().unwrap_or_default(),
        volumes: spec.volumes.iter().map(mount_to_pb).collect(),
        volume_scope: match spec.volume_scope {
            VolumeScope::PerReplica => String::new(),
            scope => scope.as_str().to_string(),
        },
        secrets: spec.secrets.iter().map(secret_to_pb).collect(),
        max_retries: spec.max_retries,
        deadline_secs: spec.deadline_secs.unwrap_or(0),
        depends_on: spec
            .depends_on
            .iter()
            .map(|d| pb::Dependency {
                service: d.service.clone(),
                condition: d.condition.as_str().to_string(),
            })
            .collect(),
    }
}
