//! Applying changes to allocations: asking one to stop, and recording
//! what agents report of theirs.

use super::super::{AllocReport, DesiredState, EventKind, State};

impl State {
    pub(super) fn stop_alloc(&mut self, index: u64, id: &str, reason: &str) {
        let Some(alloc) = self.allocs.get_mut(id) else {
            return;
        };
        if alloc.desired == DesiredState::Stop {
            return;
        }
        alloc.desired = DesiredState::Stop;
        alloc.modify_index = index;
        let (service, node) = (alloc.service.clone(), alloc.node.clone());
        self.index.node_changed.insert(node.clone(), index);
        self.event(
            index,
            EventKind::ReplicaStopping,
            &service,
            &node,
            id,
            reason,
        );
    }

    /// Records what an agent says of its allocations. Reports for
    /// allocations of other nodes or unknown ones are ignored: an agent only
    /// speaks for itself.
    pub(in crate::state) fn report_allocs(
        &mut self,
        index: u64,
        node: &str,
        reports: Vec<AllocReport>,
    ) {
        for report in reports {
            let Some(alloc) = self.allocs.get_mut(&report.id) else {
                continue;
            };
            if alloc.node != node {
                continue;
            }
            let changed_state = alloc.state != report.state;
            let was_serving = alloc.is_serving();
            alloc.state = report.state;
            match (was_serving, alloc.is_serving()) {
                (false, true) => alloc.serving_since_ms = self.clock_ms.max(1),
                (true, false) => alloc.serving_since_ms = 0,
                _ => {}
            }
            alloc.restarts = report.restarts;
            alloc.pid = report.pid;
            alloc.message = report.message;
            alloc.modify_index = index;
            let service = alloc.service.clone();
            let message = alloc.message.clone();
            self.index.node_changed.insert(node.to_string(), index);
            if let Some(kind) = EventKind::for_state(report.state).filter(|_| changed_state) {
                self.event(index, kind, &service, node, &report.id, &message);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::state::fixtures::{node, place, spec};
    use crate::state::*;

    #[test]
    fn an_agent_cannot_report_for_another_nodes_allocation() {
        let mut s = State::default();
        s.apply(1, node("n1")).unwrap();
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
        let report = AllocReport {
            id: "a".into(),
            state: AllocState::Running,
            restarts: 0,
            pid: 9,
            message: String::new(),
        };
        s.apply(
            4,
            Command::ReportAllocs {
                node: "n2".into(),
                reports: vec![report],
            },
        )
        .unwrap();
        assert_eq!(s.allocs["a"].state, AllocState::Pending);
    }
}
