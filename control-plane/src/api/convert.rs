//! Conversions between the protocol's messages and domain types. Incoming
//! specs are validated here, so every field error names the field.

use skiff_proto::v1 as pb;

use crate::controllers;
use crate::state::{
    spec, Allocation, Constraint, Event, HealthCheck, HealthKind, NetworkMode, Node,
    PlacementPolicy, RuntimeKind, Service, ServiceMode, ServiceSpec, SpecError, State,
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
    };
    spec.validate()?;
    Ok(spec)
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
        ..Default::default()
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
        ..Default::default()
    }
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
        ..Default::default()
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

/// Every published service with its endpoints: allocations wanted, serving
/// and on a ready node. A replica being stopped (desired stop) leaves the
/// set at once, before its agent stops it, so proxies drain it first.
pub fn endpoints(state: &State) -> pb::Endpoints {
    let services = state
        .services
        .values()
        .filter_map(|service| {
            let publish = service.spec.publish?;
            let name = service.spec.name.as_str();
            let endpoints = state
                .live_allocs(name)
                .filter(|a| a.is_serving())
                .filter_map(|a| {
                    let node = state.nodes.get(&a.node)?;
                    (node.status == crate::state::NodeStatus::Ready).then(|| pb::Endpoint {
                        alloc_id: a.id.clone(),
                        node: a.node.clone(),
                        address: node.address.clone(),
                        port: u32::from(a.host_port),
                        ..Default::default()
                    })
                })
                .collect();
            Some(pb::ServiceEndpoints {
                service: name.to_string(),
                publish: u32::from(publish),
                protocol: service.spec.protocol.as_str().to_string(),
                endpoints,
            })
        })
        .collect();
    pb::Endpoints { services }
}
