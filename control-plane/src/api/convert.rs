//! Conversions between the protocol's messages and domain types. Incoming
//! specs are validated here, so every field error names the field.

use skiff_proto::v1 as pb;

use crate::scheduler;
use crate::state::{
    spec, AllocState, Allocation, Node, RuntimeKind, Service, ServiceSpec, SpecError, State,
};

pub fn spec_from_pb(spec: pb::ServiceSpec) -> Result<ServiceSpec, SpecError> {
    let spec = ServiceSpec {
        name: spec.name,
        runtime: RuntimeKind::parse(&spec.runtime)?,
        replicas: spec::validate_replicas(i64::from(spec.replicas))?,
        command: spec.command,
        env: spec.env.into_iter().collect(),
        workdir: Some(spec.workdir).filter(|w| !w.is_empty()),
    };
    spec.validate()?;
    Ok(spec)
}

pub fn spec_to_pb(spec: &ServiceSpec) -> pb::ServiceSpec {
    pb::ServiceSpec {
        name: spec.name.clone(),
        runtime: spec.runtime.as_str().to_string(),
        replicas: spec.replicas,
        command: spec.command.clone(),
        env: spec.env.clone().into_iter().collect(),
        workdir: spec.workdir.clone().unwrap_or_default(),
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
    }
}

/// A service with its allocations, running count and, when replicas are
/// missing, the scheduler's explanation.
pub fn service_to_pb(state: &State, service: &Service) -> pb::ServiceStatus {
    let name = service.spec.name.as_str();
    let allocations: Vec<pb::Allocation> = state.allocs_of(name).map(alloc_to_pb).collect();
    let running = state
        .live_allocs(name)
        .filter(|a| a.state == AllocState::Running)
        .count() as u32;
    let live = state.live_allocs(name).count() as u32;
    let missing = service.spec.replicas.saturating_sub(live);
    let unplaced_reason = if missing == 0 {
        String::new()
    } else {
        let request = scheduler::Request {
            service: name.to_string(),
            count: missing,
        };
        let (_, unplaced) = scheduler::schedule(state, &[request], 0);
        match unplaced.first() {
            Some(u) => format!("{} replicas unplaced: {}", u.count, u.reason),
            None => format!("{missing} replicas waiting to be placed"),
        }
    };
    pb::ServiceStatus {
        spec: Some(spec_to_pb(&service.spec)),
        generation: service.generation,
        modify_index: service.modify_index,
        running,
        allocations,
        unplaced_reason,
    }
}

pub fn node_to_pb(state: &State, node: &Node, last_heartbeat_secs: u64) -> pb::Node {
    pb::Node {
        name: node.name.clone(),
        address: node.address.clone(),
        status: node.status.as_str().to_string(),
        port_range_start: u32::from(node.port_range.0),
        port_range_end: u32::from(node.port_range.1),
        allocations: state
            .allocs
            .values()
            .filter(|a| a.node == node.name && a.is_live())
            .count() as u32,
        last_heartbeat_secs,
    }
}
