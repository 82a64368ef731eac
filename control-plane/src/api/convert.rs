//! Conversions of the control plane's own records (allocations, services
//! with their deployments and history, nodes, events, endpoints) to the
//! protocol's messages. The spec's conversions are `skiff_spec::pb`.

use skiff_proto::v1 as pb;

use crate::controllers;
use crate::state::{Allocation, Event, Node, Service, ServiceMode, ServiceSpec, State, Strategy};

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
        spec: Some(skiff_spec::pb::spec_to_pb(&alloc.spec)),
        create_index: alloc.create_index,
        version: alloc.version,
        serving_since_ms: alloc.serving_since_ms,
        slot: alloc.slot,
        exit_code: alloc.exit_code,
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
            let diff = previous.map_or_else(Vec::new, |p| skiff_spec::spec_diff(p, &record.spec));
            previous = Some(&record.spec);
            pb::ServiceVersion {
                version: record.version,
                spec: Some(skiff_spec::pb::spec_to_pb(&record.spec)),
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
        ServiceMode::Job => u32::from(!service.job.as_ref().is_some_and(|j| j.state.is_done())),
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
        spec: Some(skiff_spec::pb::spec_to_pb(&service.spec)),
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
        leader_unreachable: false,
        port_failures: port_failures(state, service),
        job_state: service
            .job
            .as_ref()
            .map(|j| j.state.as_str().to_string())
            .unwrap_or_default(),
        job_attempts: service.job.as_ref().map_or(0, |j| j.attempts),
        job_exit_code: service.job.as_ref().and_then(|j| j.exit_code),
    }
}

/// Replaces every environment value of the service's spec and history by
/// its short hash: what `inspect` and `history` show unless the caller asks
/// for the values.
pub fn hide_env_values(status: &mut pb::ServiceStatus) {
    let specs = status
        .spec
        .iter_mut()
        .chain(status.history.iter_mut().filter_map(|v| v.spec.as_mut()))
        .chain(
            status
                .allocations
                .iter_mut()
                .filter_map(|a| a.spec.as_mut()),
        );
    specs.for_each(hide_spec_env);
}

/// Replaces the spec's environment values by their short hashes.
pub fn hide_spec_env(spec: &mut pb::ServiceSpec) {
    for value in spec.env.values_mut() {
        *value = skiff_spec::value_hash(value);
    }
}

/// The nodes whose proxy cannot listen on the service's published port
/// (reports of an older port are left out).
fn port_failures(state: &State, service: &Service) -> Vec<pb::PortFailure> {
    let Some(publish) = service.spec.publish else {
        return Vec::new();
    };
    let name = service.spec.name.as_str();
    state
        .nodes
        .values()
        .filter_map(|node| {
            let failure = node.port_failures.get(name)?;
            (failure.port == publish).then(|| pb::PortFailure {
                service: name.to_string(),
                port: u32::from(failure.port),
                error: failure.error.clone(),
                node: node.name.clone(),
            })
        })
        .collect()
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
        leader_unreachable: false,
        agent_address: node.agent_address.clone(),
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
        by: event.by.clone(),
    }
}

/// Every service with a port, published or reachable by name inside the
/// cluster (its own port, [`internal_port`]), with its endpoints:
/// allocations wanted, serving, not held back (a blue-green replica before
/// promotion) and on a ready node. A replica being stopped (desired stop) leaves the set at once,
/// before its agent stops it, so proxies drain it first. During a canary
/// deployment the weights give the canaries their share of new connections.
pub fn endpoints(state: &State) -> pb::Endpoints {
    let services = state
        .services
        .values()
        .filter_map(|service| {
            let publish = service.spec.publish.unwrap_or(0);
            let port = internal_port(service).unwrap_or(0);
            if publish == 0 && port == 0 {
                return None;
            }
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
                    slot: a.slot,
                })
                .collect();
            let slots = if service.spec.owns_volumes() {
                let mut slots: Vec<u32> = state.live_allocs(name).map(|a| a.slot).collect();
                slots.sort_unstable();
                slots.dedup();
                slots
            } else {
                Vec::new()
            };
            Some(pb::ServiceEndpoints {
                service: name.to_string(),
                publish: u32::from(publish),
                protocol: service.spec.protocol.as_str().to_string(),
                endpoints,
                hold_when_empty: holds_when_empty(&service.spec),
                port: u32::from(port),
                stack: service
                    .spec
                    .labels
                    .get(skiff_spec::STACK_LABEL)
                    .cloned()
                    .unwrap_or_default(),
                slots,
            })
        })
        .collect();
    pb::Endpoints { services }
}

/// The port a service is reached on by name: its spec's `--port`, else
/// the port its image declares (as an agent reported it). A process or
/// host-network service without `--port` listens on a port drawn per
/// replica and has none.
pub fn internal_port(service: &Service) -> Option<u16> {
    let spec = &service.spec;
    spec.port.or(match (spec.runtime, spec.network) {
        (skiff_spec::RuntimeKind::Oci, skiff_spec::NetworkMode::Bridge) => service.image_port,
        _ => None,
    })
}

/// Whether the proxies hold new connections while the service has no
/// serving replica instead of refusing them: when it scales from zero, and
/// when its replicas own volumes, which are replaced stop-first (the old
/// one stops before the new one starts on the same data): during that
/// swap clients wait for the new replica rather than see an error.
fn holds_when_empty(spec: &ServiceSpec) -> bool {
    spec.autoscale.as_ref().is_some_and(|a| a.min == 0) || spec.owns_volumes()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxies_hold_connections_for_scale_from_zero_and_stop_first_swaps_only() {
        let mut spec = ServiceSpec::default();
        assert!(!holds_when_empty(&spec));
        spec.autoscale = Some(skiff_spec::AutoscalePolicy {
            min: 0,
            ..Default::default()
        });
        assert!(holds_when_empty(&spec));
        spec.autoscale = None;
        spec.volumes = vec![skiff_spec::Mount::parse_volume("data:/data").unwrap()];
        assert!(holds_when_empty(&spec), "a replica owning a volume");
    }
}
