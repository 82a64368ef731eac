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
            alloc.health_checked = report.health_checked;
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
            if report.port != 0 {
                let version = alloc.version;
                if let Some(s) = self.services.get_mut(&service) {
                    if s.version == version && s.image_port != Some(report.port) {
                        s.image_port = Some(report.port);
                    }
                }
            }
            let message = alloc.message.clone();
            let wanted = alloc.desired == DesiredState::Run;
            // A job's replica that ended is never restarted: it stops
            // being wanted in the same entry, so no agent (a restarted
            // one included) starts it again; the attempt is counted once.
            let is_job = alloc.spec.mode == crate::state::ServiceMode::Job;
            if is_job && report.state.is_up() {
                if let Some(job) = self.services.get_mut(&service).and_then(|s| s.job.as_mut()) {
                    if job.state == crate::state::JobState::Pending {
                        job.state = crate::state::JobState::Running;
                    }
                }
            }
            let Some(alloc) = self.allocs.get_mut(&report.id) else {
                continue;
            };
            if is_job && report.state.is_terminal() && wanted {
                let exit_code = report.exit_code.unwrap_or(
                    if report.state == crate::state::AllocState::Completed {
                        0
                    } else {
                        1
                    },
                );
                alloc.exit_code = Some(exit_code);
                alloc.desired = DesiredState::Stop;
                let id = report.id.clone();
                let end = crate::state::job::AttemptEnd::Exited(exit_code);
                self.job_attempt_ended(index, &service, node, &id, end);
            } else if is_job && report.refused && wanted {
                // The agent will never run it: the attempt ends now (and
                // is retried, elsewhere if need be), not at the deadline.
                alloc.desired = DesiredState::Stop;
                let id = report.id.clone();
                let end = crate::state::job::AttemptEnd::Refused(message.clone());
                self.job_attempt_ended(index, &service, node, &id, end);
            }
            self.index.node_changed.insert(node.to_string(), index);
            // A replica already asked to stop (replaced while its agent was
            // away, which now re-adopts it) is only news when it stops.
            let newsworthy = |kind: &EventKind| wanted || *kind == EventKind::ReplicaStopped;
            if let Some(kind) = EventKind::for_state(report.state)
                .filter(|_| changed_state)
                .filter(newsworthy)
            {
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
            port: 0,
            health_checked: false,
            exit_code: None,
            refused: false,
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

    #[test]
    fn a_re_adopted_replica_already_asked_to_stop_logs_only_its_stop() {
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
        let stop = Plan {
            stop: vec!["a".into()],
            ..Plan::default()
        };
        s.apply(4, Command::ApplyPlan { plan: stop }).unwrap();
        let report = |state| AllocReport {
            id: "a".into(),
            state,
            restarts: 0,
            pid: 9,
            message: "re-adopted after agent restart".into(),
            port: 0,
            health_checked: false,
            exit_code: None,
            refused: false,
        };
        for (index, state) in [
            (5, AllocState::Running),
            (6, AllocState::Healthy),
            (7, AllocState::Stopped),
        ] {
            s.apply(
                index,
                Command::ReportAllocs {
                    node: "n1".into(),
                    reports: vec![report(state)],
                },
            )
            .unwrap();
        }
        let kinds: Vec<EventKind> = s
            .events
            .iter()
            .filter(|e| e.alloc == "a")
            .map(|e| e.kind)
            .collect();
        assert_eq!(
            kinds,
            vec![
                EventKind::ReplicaPlaced,
                EventKind::ReplicaStopping,
                EventKind::ReplicaStopped
            ]
        );
    }
}
