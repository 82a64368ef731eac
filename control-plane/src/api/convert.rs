//! Conversions between the protocol's messages and domain types. Incoming
//! specs are validated here, so every field error names the field.

use skiff_proto::v1 as pb;

use crate::controllers;
use crate::state::{
    spec, update, Allocation, AutoscalePolicy, Constraint, Event, HealthCheck, HealthKind,
    NetworkMode, Node, PlacementPolicy, RuntimeKind, Service, ServiceMode, ServiceSpec, SpecError,
    State, Strategy, UpdatePolicy,
};

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
        replicas: spec::validate_replicas(i64::from(spec.replicas))?,
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
        protocol: spec::Protocol::parse(&spec.protocol)?,
        update: update_from_pb(spec.update.unwrap_or_default())?,
        autoscale: spec.autoscale.map(autoscale_from_pb),
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

fn autoscale_from_pb(a: pb::Autoscale) -> AutoscalePolicy {
    let target = |t: f64| Some(t).filter(|t| *t != 0.0);
    AutoscalePolicy {
        min: a.min,
        max: a.max,
        target_rps: target(a.target_rps),
        target_concurrency: target(a.target_concurrency),
        target_cpu: target(a.target_cpu),
    }
}

fn autoscale_to_pb(a: &AutoscalePolicy) -> pb::Autoscale {
    pb::Autoscale {
        min: a.min,
        max: a.max,
        target_rps: a.target_rps.unwrap_or(0.0),
        target_concurrency: a.target_concurrency.unwrap_or(0.0),
        target_cpu: a.target_cpu.unwrap_or(0.0),
    }
}

/// `None` for a check of empty kind (none given).
fn health_from_pb(h: pb::HealthCheck) -> Result<Option<HealthCheck>, SpecError> {
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

fn health_to_pb(h: &HealthCheck) -> pb::HealthCheck {
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
    }
}

pub fn alloc_to_pb(alloc: &Allocation) -> pb::Allocation {
    pb::Allocation {
        id: alloc.id.clone(),
        service: alloc.service.clone(),
        node: alloc.node.clone(),
        desired: alloc.desired.as_str().to_string(),
        state: alloc.state.as_str().to_string(),
        host_port: u32::from(alloc.host_port),
        restarts: alloc.restarts,
        pid: alloc.pid,
        message: alloc.message.clone(),
        spec: Some(spec_to_pb(&alloc.spec)),
        create_index: alloc.create_index,
        version: alloc.version,
        serving_since_ms: alloc.serving_since_ms,
    }
}

/// The latest deployment with its progress counted now.
fn deployment_to_pb(state: &State, service: &Service) -> Option<pb::Deployment> {
    let d = service.deployment.as_ref()?;
    let now = controllers::now_ms();
    let spec = &service.spec;
    let live: Vec<&Allocation> = state.live_allocs(&spec.name).collect();
    let new: Vec<&&Allocation> = live.iter().filter(|a| a.spec.runs_same(spec)).collect();
    let new_healthy = new
        .iter()
        .filter(|a| controllers::deployment::is_ready(a, d.policy.min_healthy_ms, now))
        .count();
    Some(pb::Deployment {
        version: d.version,
        from_version: d.from_version,
        strategy: d.policy.strategy.as_str().to_string(),
        status: d.status.as_str().to_string(),
        message: d.message.clone(),
        promoted: d.promoted,
        started_ms: d.started_ms,
        ended_ms: d.ended_ms,
        new_placed: new.len() as u32,
        new_healthy: new_healthy as u32,
        desired: spec.replicas,
        old_running: (live.len() - new.len()) as u32,
        rollback_of: d.rollback_of,
    })
}

/// How many of a service's latest events `service inspect` shows.
const SERVICE_EVENTS: usize = 15;

/// The service's latest events, oldest first.
fn recent_events(state: &State, service: &str) -> Vec<pb::Event> {
    let mut events: Vec<pb::Event> = state
        .events
        .iter()
        .rev()
        .filter(|e| e.service == service)
        .take(SERVICE_EVENTS)
        .map(event_to_pb)
        .collect();
    events.reverse();
    events
}

fn history_to_pb(service: &Service) -> Vec<pb::ServiceVersion> {
    let mut previous: Option<&ServiceSpec> = None;
    service
        .history
        .iter()
        .map(|record| {
            let diff = previous.map_or_else(Vec::new, |p| update::spec_diff(p, &record.spec));
            previous = Some(&record.spec);
            pb::ServiceVersion {
                version: record.version,
                spec: Some(spec_to_pb(&record.spec)),
                created_ms: record.created_ms,
                outcome: record.outcome.clone(),
                message: record.message.clone(),
                diff,
            }
        })
        .collect()
}

/// A service with its allocations, running count and, when replicas are
/// missing, the scheduler's explanation.
pub fn service_to_pb(state: &State, service: &Service) -> pb::ServiceStatus {
    let name = service.spec.name.as_str();
    let allocations: Vec<pb::Allocation> = state.allocs_of(name).map(alloc_to_pb).collect();
    let running = state.live_allocs(name).filter(|a| a.state.is_up()).count() as u32;
    let desired = match service.spec.mode {
        ServiceMode::Replicated => service.spec.replicas,
        ServiceMode::Global => state
            .nodes
            .values()
            .filter(|n| {
                n.is_eligible()
                    && service
                        .spec
                        .constraints
                        .iter()
                        .all(|c| c.holds(&n.labels, &n.name, &n.address))
            })
            .count() as u32,
    };
    let unplaced_reason = controllers::explain(state, name);
    pb::ServiceStatus {
        desired,
        spec: Some(spec_to_pb(&service.spec)),
        generation: service.generation,
        modify_index: service.modify_index,
        running,
        allocations,
        unplaced_reason,
        traffic: Vec::new(),
        version: service.version,
        deployment: deployment_to_pb(state, service),
        history: history_to_pb(service),
        events: recent_events(state, name),
        usage: Vec::new(),
    }
}

pub fn node_to_pb(state: &State, node: &Node, last_heartbeat_secs: u64) -> pb::Node {
    let (mut cpu_used, mut memory_used) = (0u32, 0u32);
    for alloc in state.allocs_on(&node.name).filter(|a| a.holds_resources()) {
        cpu_used = cpu_used.saturating_add(alloc.spec.cpu_millis.unwrap_or(0));
        memory_used = memory_used.saturating_add(alloc.spec.memory_mb.unwrap_or(0));
    }
    pb::Node {
        cpu_millis: node.cpu_millis,
        memory_mb: node.memory_mb,
        labels: node.labels.clone().into_iter().collect(),
        availability: node.availability.as_str().to_string(),
        cpu_used,
        memory_used,
        drained: node.drained,
        name: node.name.clone(),
        address: node.address.clone(),
        status: node.status.as_str().to_string(),
        port_range_start: u32::from(node.port_range.0),
        port_range_end: u32::from(node.port_range.1),
        allocations: state.allocs_on(&node.name).filter(|a| a.is_live()).count() as u32,
        last_heartbeat_secs,
    }
}

pub fn event_to_pb(event: &Event) -> pb::Event {
    pb::Event {
        seq: event.seq,
        index: event.index,
        time_ms: event.time_ms,
        kind: event.kind.as_str().to_string(),
        service: event.service.clone(),
        node: event.node.clone(),
        alloc: event.alloc.clone(),
        message: event.message.clone(),
    }
}

/// Every published service with its endpoints: allocations wanted, serving,
/// not held back (a blue-green replica before promotion) and on a ready
/// node. A replica being stopped (desired stop) leaves the set at once,
/// before its agent stops it, so proxies drain it first. During a canary
/// deployment the weights give the canaries their share of new connections.
pub fn endpoints(state: &State) -> pb::Endpoints {
    let services = state
        .services
        .values()
        .filter_map(|service| {
            let publish = service.spec.publish?;
            let name = service.spec.name.as_str();
            let serving: Vec<&Allocation> = state
                .live_allocs(name)
                .filter(|a| a.is_serving() && !a.held)
                .filter(|a| {
                    state
                        .nodes
                        .get(&a.node)
                        .is_some_and(|n| n.status == crate::state::NodeStatus::Ready)
                })
                .collect();
            let weights = canary_weights(service, &serving);
            let endpoints = serving
                .iter()
                .zip(weights)
                .map(|(a, weight)| pb::Endpoint {
                    alloc_id: a.id.clone(),
                    node: a.node.clone(),
                    address: state.nodes[&a.node].address.clone(),
                    port: u32::from(a.host_port),
                    weight,
                    version: a.version,
                })
                .collect();
            Some(pb::ServiceEndpoints {
                service: name.to_string(),
                publish: u32::from(publish),
                protocol: service.spec.protocol.as_str().to_string(),
                endpoints,
                hold_when_empty: service.spec.autoscale.as_ref().is_some_and(|a| a.min == 0),
            })
        })
        .collect();
    pb::Endpoints { services }
}

/// Per-endpoint weights: equal (1), except while an unpromoted canary
/// deployment with `--canary-weight PCT` runs, where the canaries together
/// get PCT percent of new connections and the others the rest.
fn canary_weights(service: &Service, serving: &[&Allocation]) -> Vec<u32> {
    let weight = service
        .active_deployment()
        .filter(|d| d.policy.strategy == Strategy::Canary && !d.promoted)
        .and_then(|d| d.policy.canary_weight);
    let canaries = serving
        .iter()
        .filter(|a| a.spec.runs_same(&service.spec))
        .count() as u32;
    let others = serving.len() as u32 - canaries;
    match weight {
        Some(pct) if canaries > 0 && others > 0 => serving
            .iter()
            .map(|a| {
                if a.spec.runs_same(&service.spec) {
                    (pct * others).max(1)
                } else {
                    ((100 - pct) * canaries).max(1)
                }
            })
            .collect(),
        _ => vec![1; serving.len()],
    }
}
