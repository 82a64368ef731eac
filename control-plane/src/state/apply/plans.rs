//! Applying a plan of the controllers: stops, forgets, deployment steps,
//! and placements re-checked against the current state.

use std::collections::{BTreeSet, HashMap};

use super::super::{
    AllocState, Allocation, DesiredState, EventKind, Outcome, Plan, ServiceMode, State, Strategy,
};

/// Per-node usage while one plan is checked on apply.
#[derive(Default)]
struct NodeUsage {
    cpu: u64,
    memory: u64,
    ports: BTreeSet<u16>,
    live: HashMap<String, u32>,
}

impl State {
    /// What a node has committed to allocations that still hold resources.
    fn usage_of(&self, node: &str) -> NodeUsage {
        let mut usage = NodeUsage::default();
        for alloc in self.allocs_on(node) {
            usage.ports.insert(alloc.host_port);
            if alloc.holds_resources() {
                usage.cpu += u64::from(alloc.spec.cpu_millis.unwrap_or(0));
                usage.memory += u64::from(alloc.spec.memory_mb.unwrap_or(0));
            }
            if alloc.is_live() {
                *usage.live.entry(alloc.service.clone()).or_default() += 1;
            }
        }
        usage
    }

    /// Applies a plan after re-checking every placement against the current
    /// state, like Nomad's plan applier: the service must still exist and
    /// want more replicas, the node must be eligible, satisfy the
    /// constraints and max-per-node, have the CPU, memory and host port
    /// free. Plans are computed on a snapshot that may be stale by the time
    /// they commit, so two plans can never overcommit a node.
    pub(in crate::state) fn apply_plan(&mut self, index: u64, plan: Plan) -> Outcome {
        let mut placed = 0;
        let mut rejected = 0;
        for id in &plan.stop {
            let reason = plan.reasons.get(id).map_or("", String::as_str);
            self.stop_alloc(index, id, reason);
        }
        for id in &plan.forget {
            let forgettable = self.allocs.get(id).is_some_and(|a| {
                a.desired == DesiredState::Stop
                    && (a.state == AllocState::Stopped || a.state.is_terminal())
            });
            if forgettable {
                if let Some(alloc) = self.allocs.remove(id) {
                    self.index.remove(&alloc);
                    self.index.node_changed.insert(alloc.node.clone(), index);
                }
            }
        }
        for (service, reason) in &plan.failed_jobs {
            self.fail_job(index, service, reason);
        }
        for id in &plan.lost {
            if let Some(alloc) = self.allocs.get_mut(id) {
                if alloc.desired == DesiredState::Stop && alloc.state == AllocState::Unknown {
                    alloc.state = AllocState::Lost;
                    alloc.modify_index = index;
                    self.index.node_changed.insert(alloc.node.clone(), index);
                }
            }
        }
        for name in &plan.rebalanced {
            if let Some(service) = self.services.get_mut(name).filter(|s| s.rebalance) {
                service.rebalance = false;
                self.event(index, EventKind::ServiceRebalanced, name, "", "", "");
            }
        }
        for change in plan.deployments {
            self.apply_deployment_change(index, change);
        }
        let mut usage: HashMap<String, NodeUsage> = HashMap::new();
        let mut counted: HashMap<String, usize> = HashMap::new();
        for placement in plan.place {
            let Some(service) = self.services.get(&placement.service) else {
                rejected += 1;
                continue;
            };
            let spec = &service.spec;
            let Some(node) = self.nodes.get(&placement.node) else {
                rejected += 1;
                continue;
            };
            let fits_node = node.is_eligible()
                && spec
                    .constraints
                    .iter()
                    .all(|c| c.holds(&node.labels, &node.name, &node.address))
                && (node.port_range.0..=node.port_range.1).contains(&placement.host_port);
            if !fits_node || self.allocs.contains_key(&placement.id) {
                rejected += 1;
                continue;
            }
            let used = usage
                .entry(placement.node.clone())
                .or_insert_with(|| self.usage_of(&placement.node));
            let cpu = u64::from(spec.cpu_millis.unwrap_or(0));
            let memory = u64::from(spec.memory_mb.unwrap_or(0));
            let on_node = used.live.get(&placement.service).copied().unwrap_or(0);
            let fits_resources = (node.cpu_millis == 0
                || used.cpu + cpu <= u64::from(node.cpu_millis))
                && (node.memory_mb == 0 || used.memory + memory <= u64::from(node.memory_mb))
                && !used.ports.contains(&placement.host_port)
                && spec.max_per_node.is_none_or(|max| on_node < max);
            let wanted = match spec.mode {
                ServiceMode::Global => on_node == 0,
                ServiceMode::Replicated => {
                    let count = counted
                        .entry(placement.service.clone())
                        .or_insert_with(|| self.counted_current(&placement.service));
                    // A rebalance moves replicas surge-first: one more.
                    *count < spec.replicas as usize + usize::from(service.rebalance)
                }
                // One attempt at a time, none once the job is done.
                ServiceMode::Job => {
                    let count = counted
                        .entry(placement.service.clone())
                        .or_insert_with(|| self.counted_current(&placement.service));
                    *count == 0 && !service.job.as_ref().is_some_and(|j| j.state.is_done())
                }
            };
            let held = !service.started && self.dependencies_ready(&service.spec).is_err();
            let volumes_fit = self.volumes_allow(spec, &placement);
            if !fits_resources || !wanted || held || !volumes_fit {
                rejected += 1;
                continue;
            }
            used.cpu += cpu;
            used.memory += memory;
            used.ports.insert(placement.host_port);
            *used.live.entry(placement.service.clone()).or_default() += 1;
            if let Some(count) = counted.get_mut(&placement.service) {
                *count += 1;
            }
            let alloc = Allocation {
                id: placement.id.clone(),
                service: placement.service.clone(),
                node: placement.node.clone(),
                spec: spec.clone(),
                host_port: placement.host_port,
                desired: DesiredState::Run,
                state: AllocState::Pending,
                restarts: 0,
                pid: 0,
                message: String::new(),
                create_index: index,
                modify_index: index,
                version: service.version,
                created_ms: self.clock_ms,
                serving_since_ms: 0,
                held: service
                    .active_deployment()
                    .is_some_and(|d| d.policy.strategy == Strategy::BlueGreen && !d.promoted),
                slot: placement.slot,
                health_checked: false,
                exit_code: None,
            };
            self.record_placed_volumes(index, &alloc);
            self.index.insert(&alloc);
            self.index.node_changed.insert(alloc.node.clone(), index);
            self.allocs.insert(alloc.id.clone(), alloc);
            if let Some(service) = self.services.get_mut(&placement.service) {
                service.started = true;
            }
            let message = format!("port {}", placement.host_port);
            self.event(
                index,
                EventKind::ReplicaPlaced,
                &placement.service,
                &placement.node,
                &placement.id,
                &message,
            );
            placed += 1;
        }
        Outcome::PlanApplied { placed, rejected }
    }
}

#[cfg(test)]
mod tests {
    use crate::state::fixtures::{node, place, spec};
    use crate::state::*;

    #[test]
    fn plans_are_rechecked_when_applied() {
        let mut s = State::default();
        s.apply(1, node("n1")).unwrap();
        s.apply(
            2,
            Command::CreateService {
                spec: spec("web", 2),
            },
        )
        .unwrap();
        let plan = Plan {
            place: vec![
                place("a", "web", 20000),
                place("b", "web", 20000), // port taken by a
                place("c", "web", 20001),
                place("d", "web", 20002),  // beyond 2 replicas
                place("e", "gone", 20003), // no such service
            ],
            ..Plan::default()
        };
        let outcome = s.apply(3, Command::ApplyPlan { plan }).unwrap();
        assert_eq!(
            outcome,
            Outcome::PlanApplied {
                placed: 2,
                rejected: 3
            }
        );
        assert_eq!(s.live_allocs("web").count(), 2);
    }
}
