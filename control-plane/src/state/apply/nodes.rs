//! Applying node commands: the liveness verdict, the operator's
//! availability (active, pause, drain), and marking drains done.

use std::collections::BTreeMap;

use super::super::{
    AllocState, Availability, CommandError, DesiredState, EventKind, NodeStatus, Outcome,
    PortFailure, ServiceMode, State,
};

impl State {
    /// Records the published ports a node cannot listen on, with an event
    /// for each port that failed or recovered since its last report.
    pub(in crate::state) fn report_ports(
        &mut self,
        index: u64,
        name: &str,
        failures: BTreeMap<String, PortFailure>,
    ) {
        let Some(node) = self.nodes.get_mut(name) else {
            return;
        };
        let before = std::mem::replace(&mut node.port_failures, failures.clone());
        for (service, failure) in &failures {
            if before.get(service) != Some(failure) {
                let message = format!("published port {}: {}", failure.port, failure.error);
                self.event(
                    index,
                    EventKind::PortUnavailable,
                    service,
                    name,
                    "",
                    &message,
                );
            }
        }
        for (service, failure) in &before {
            if !failures.contains_key(service) {
                let message = format!("published port {} served again", failure.port);
                self.event(index, EventKind::PortListening, service, name, "", &message);
            }
        }
    }

    pub(in crate::state) fn set_node_status(
        &mut self,
        index: u64,
        name: &str,
        status: NodeStatus,
    ) -> Result<Outcome, CommandError> {
        let node = self
            .nodes
            .get_mut(name)
            .ok_or_else(|| CommandError::NodeNotFound(name.to_string()))?;
        if node.status == status {
            return Ok(Outcome::Done);
        }
        node.status = status;
        match status {
            NodeStatus::Ready => {
                let message = match self.keep_unreplaced(index, name) {
                    0 => "heartbeats resumed".to_string(),
                    n => format!(
                        "heartbeats resumed; {n} replicas it still runs kept (not replaced while it was down)"
                    ),
                };
                self.event(index, EventKind::NodeUp, "", name, "", &message);
            }
            NodeStatus::Down => {
                self.event(
                    index,
                    EventKind::NodeDown,
                    "",
                    name,
                    "",
                    "missed heartbeats",
                );
                // Nobody knows what runs on a down node any more: its
                // replicas show unknown (not the last state reported) until
                // its agent reports again.
                let unknown: Vec<String> = self
                    .allocs_on(name)
                    .filter(|a| a.holds_resources() && a.state != AllocState::Lost)
                    .map(|a| a.id.clone())
                    .collect();
                for id in &unknown {
                    if let Some(alloc) = self.allocs.get_mut(id) {
                        alloc.state = AllocState::Unknown;
                        alloc.serving_since_ms = 0;
                        alloc.modify_index = index;
                    }
                }
                self.index.node_changed.insert(name.to_string(), index);
                let ids: Vec<String> = self
                    .allocs_on(name)
                    .filter(|a| a.desired == DesiredState::Run)
                    .map(|a| a.id.clone())
                    .collect();
                let reason = format!("node {name} down");
                for id in ids {
                    self.stop_alloc(index, &id, &reason);
                }
            }
        }
        Ok(Outcome::Done)
    }

    /// Takes back the replicas of node `name` that were stopped only
    /// because it was down (their state is still unknown) and that nothing
    /// replaced meanwhile: its agent, registering again, still runs them
    /// (a partition, not a crash), and stopping them to place the same
    /// replicas again would restart them for nothing. Only replicas of the
    /// service's current version on an active node, and only as many as
    /// the service lacks; the rest stay stopped. Returns how many.
    ///
    /// Called when the node is back: its agent's stream, silent while the
    /// node was down, is woken to send the node's assignments.
    pub(in crate::state) fn keep_unreplaced(&mut self, index: u64, name: &str) -> usize {
        self.index.node_changed.insert(name.to_string(), index);
        let active = self
            .nodes
            .get(name)
            .is_some_and(|n| n.availability == Availability::Active);
        if !active {
            return 0;
        }
        let candidates: Vec<String> = self
            .allocs_on(name)
            .filter(|a| a.desired == DesiredState::Stop && a.state == AllocState::Unknown)
            .map(|a| a.id.clone())
            .collect();
        let mut kept = 0;
        for id in candidates {
            let Some(alloc) = self.allocs.get(&id) else {
                continue;
            };
            let wanted = self.services.get(&alloc.service).is_some_and(|s| {
                s.spec.mode == ServiceMode::Replicated
                    && s.version == alloc.version
                    && self.counted_replicas(&alloc.service) < s.spec.replicas as usize
            });
            if !wanted {
                continue;
            }
            if let Some(alloc) = self.allocs.get_mut(&id) {
                alloc.desired = DesiredState::Run;
                alloc.modify_index = index;
                kept += 1;
            }
        }
        kept
    }

    /// Forgets a down node and every allocation placed on it (whatever
    /// they were, nobody will report them again); a ready node is refused.
    pub(in crate::state) fn remove_node(
        &mut self,
        index: u64,
        name: &str,
    ) -> Result<Outcome, CommandError> {
        let node = self
            .nodes
            .get(name)
            .ok_or_else(|| CommandError::NodeNotFound(name.to_string()))?;
        if node.status == NodeStatus::Ready {
            return Err(CommandError::NodeReady(name.to_string()));
        }
        let ids: Vec<String> = self.allocs_on(name).map(|a| a.id.clone()).collect();
        for id in &ids {
            if let Some(alloc) = self.allocs.remove(id) {
                self.index.remove(&alloc);
            }
        }
        self.index.node_changed.remove(name);
        self.nodes.remove(name);
        let message = format!("{} allocations forgotten", ids.len());
        self.event(index, EventKind::NodeRemoved, "", name, "", &message);
        Ok(Outcome::Done)
    }

    pub(in crate::state) fn set_node_availability(
        &mut self,
        index: u64,
        name: &str,
        availability: Availability,
        deadline_ms: Option<u64>,
    ) -> Result<Outcome, CommandError> {
        let node = self
            .nodes
            .get_mut(name)
            .ok_or_else(|| CommandError::NodeNotFound(name.to_string()))?;
        let changed = node.availability != availability
            || (availability == Availability::Drain && node.drain_deadline_ms != deadline_ms);
        if !changed {
            return Ok(Outcome::Done);
        }
        node.availability = availability;
        node.drain_deadline_ms = deadline_ms.filter(|_| availability == Availability::Drain);
        node.drained = false;
        let (kind, message) = match availability {
            Availability::Active => (EventKind::NodeActivated, String::new()),
            Availability::Pause => (EventKind::NodePaused, String::new()),
            Availability::Drain => (
                EventKind::NodeDraining,
                deadline_ms.map_or_else(String::new, |d| format!("deadline {d} ms")),
            ),
        };
        self.event(index, kind, "", name, "", &message);
        Ok(Outcome::Done)
    }

    /// Marks draining nodes drained once nothing of theirs runs any more.
    pub(in crate::state) fn check_drains(&mut self, index: u64) {
        let done: Vec<String> = self
            .nodes
            .values()
            .filter(|n| n.availability == Availability::Drain && !n.drained)
            .filter(|n| self.allocs_on(&n.name).all(|a| !a.holds_resources()))
            .map(|n| n.name.clone())
            .collect();
        for name in done {
            if let Some(node) = self.nodes.get_mut(&name) {
                node.drained = true;
                self.event(index, EventKind::NodeDrained, "", &name, "", "");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use crate::state::fixtures::{node, place, spec};
    use crate::state::*;

    #[test]
    fn a_node_going_down_stops_its_replicas_and_plans_never_overcommit() {
        let mut s = State::default();
        s.apply(
            1,
            Command::RegisterNode {
                process_runtime: true,
                agent_address: String::new(),
                name: "n1".into(),
                address: "127.0.0.1".into(),
                port_range: (20000, 20010),
                cpu_millis: 1000,
                memory_mb: 1000,
                labels: BTreeMap::new(),
            },
        )
        .unwrap();
        let mut web = spec("web", 3);
        web.memory_mb = Some(400);
        s.apply(2, Command::CreateService { spec: web }).unwrap();
        let plan = Plan {
            place: vec![
                place("a", "web", 20000),
                place("b", "web", 20001),
                place("c", "web", 20002),
            ],
            ..Plan::default()
        };
        let outcome = s.apply(3, Command::ApplyPlan { plan }).unwrap();
        assert_eq!(
            outcome,
            Outcome::PlanApplied {
                placed: 2,
                rejected: 1
            },
            "only 800 of 1000 MB fit"
        );
        s.apply(
            4,
            Command::SetNodeStatus {
                name: "n1".into(),
                status: NodeStatus::Down,
            },
        )
        .unwrap();
        assert!(s.allocs.values().all(|a| a.desired == DesiredState::Stop));
        assert!(s.events.iter().any(|e| e.kind == EventKind::NodeDown));
        assert_eq!(
            s.events
                .iter()
                .filter(|e| e.kind == EventKind::ReplicaStopping)
                .count(),
            2
        );
    }

    #[test]
    fn a_node_reporting_a_port_it_cannot_bind_logs_it_once_and_its_recovery() {
        let mut s = State::default();
        s.apply(1, node("n1")).unwrap();
        let failure = PortFailure {
            port: 18090,
            error: "cannot listen on 127.0.0.3:18090: Address in use".into(),
        };
        let report = |failures: &[(&str, &PortFailure)]| Command::ReportPorts {
            node: "n1".into(),
            failures: failures
                .iter()
                .map(|(s, f)| (s.to_string(), (*f).clone()))
                .collect(),
        };
        s.apply(2, report(&[("web", &failure)])).unwrap();
        s.apply(3, report(&[("web", &failure)])).unwrap();
        assert_eq!(s.nodes["n1"].port_failures["web"], failure);
        let kinds = |s: &State, kind| s.events.iter().filter(|e| e.kind == kind).count();
        assert_eq!(kinds(&s, EventKind::PortUnavailable), 1, "reported once");
        s.apply(4, report(&[])).unwrap();
        assert!(s.nodes["n1"].port_failures.is_empty());
        assert_eq!(kinds(&s, EventKind::PortListening), 1);
        let last = s.events.back().unwrap();
        assert_eq!((last.service.as_str(), last.node.as_str()), ("web", "n1"));
    }

    #[test]
    fn only_a_down_node_can_be_removed_and_its_allocations_are_forgotten() {
        let mut s = State::default();
        s.apply(1, crate::state::fixtures::node("n1")).unwrap();
        s.apply(
            2,
            Command::CreateService {
                spec: spec("web", 1),
            },
        )
        .unwrap();
        let plan = Plan {
            place: vec![place("a", "web", 20000)],
            ..Plan::default()
        };
        s.apply(3, Command::ApplyPlan { plan }).unwrap();
        let remove = || Command::RemoveNode { name: "n1".into() };
        assert_eq!(
            s.apply(4, remove()),
            Err(CommandError::NodeReady("n1".into()))
        );
        assert!(s.nodes.contains_key("n1"));
        s.apply(
            5,
            Command::SetNodeStatus {
                name: "n1".into(),
                status: NodeStatus::Down,
            },
        )
        .unwrap();
        s.apply(6, remove()).unwrap();
        assert!(s.nodes.is_empty());
        assert!(s.allocs.is_empty());
        assert_eq!(s.allocs_on("n1").count(), 0);
        assert_eq!(s.allocs_of("web").count(), 0);
        assert!(s.events.iter().any(|e| e.kind == EventKind::NodeRemoved));
    }
}
