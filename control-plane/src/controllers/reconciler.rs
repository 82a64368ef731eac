//! The reconciler decision: desired replicas and the allocations that exist
//! in, what to place, stop and forget out. Pure; the controller loop turns
//! it into a plan.

use crate::state::{AllocState, Allocation, DesiredState};

/// What to do about one service's allocations.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Decision {
    /// How many new replicas to place.
    pub place: u32,
    /// Live allocations to stop (surplus, or the service is gone).
    pub stop: Vec<String>,
    /// Stopped allocations that can be forgotten.
    pub forget: Vec<String>,
}

/// Compares `desired` (`None`: the service was removed) with the service's
/// allocations. Surplus replicas are stopped worst first: ones that are not
/// running before running ones, then the newest.
pub fn reconcile(desired: Option<u32>, allocs: &[&Allocation]) -> Decision {
    let mut decision = Decision::default();
    for alloc in allocs {
        if alloc.desired == DesiredState::Stop && alloc.state == AllocState::Stopped {
            decision.forget.push(alloc.id.clone());
        }
    }
    let mut live: Vec<&Allocation> = allocs.iter().copied().filter(|a| a.is_live()).collect();
    let desired = desired.unwrap_or(0) as usize;
    if live.len() > desired {
        live.sort_by_key(|a| (a.state.is_up(), std::cmp::Reverse(a.create_index)));
        let surplus = live.len() - desired;
        decision.stop = live.iter().take(surplus).map(|a| a.id.clone()).collect();
    } else {
        decision.place = (desired - live.len()) as u32;
    }
    decision
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{RuntimeKind, ServiceSpec};

    fn alloc(id: &str, index: u64, desired: DesiredState, state: AllocState) -> Allocation {
        Allocation {
            id: id.into(),
            service: "web".into(),
            node: "n1".into(),
            spec: ServiceSpec {
                name: "web".into(),
                runtime: RuntimeKind::Process,
                replicas: 1,
                command: vec!["true".into()],
                env: Default::default(),
                workdir: None,
                ..Default::default()
            },
            host_port: 20000 + index as u16,
            desired,
            state,
            restarts: 0,
            pid: 0,
            message: String::new(),
            create_index: index,
            modify_index: index,
        }
    }

    use AllocState::*;
    use DesiredState::*;

    #[test]
    fn missing_replicas_are_placed() {
        let a = alloc("a", 1, Run, Running);
        assert_eq!(
            reconcile(Some(3), &[&a]),
            Decision {
                place: 2,
                ..Decision::default()
            }
        );
    }

    #[test]
    fn a_converged_service_needs_nothing() {
        let (a, b) = (alloc("a", 1, Run, Running), alloc("b", 2, Run, Pending));
        assert_eq!(reconcile(Some(2), &[&a, &b]), Decision::default());
    }

    #[test]
    fn scaling_down_stops_non_running_then_newest_replicas_first() {
        let old = alloc("old", 1, Run, Running);
        let new = alloc("new", 3, Run, Running);
        let broken = alloc("broken", 2, Run, Restarting);
        let decision = reconcile(Some(1), &[&old, &new, &broken]);
        assert_eq!(decision.stop, vec!["broken".to_string(), "new".to_string()]);
        assert_eq!(decision.place, 0);
    }

    #[test]
    fn a_removed_service_stops_everything_and_forgets_what_stopped() {
        let running = alloc("a", 1, Run, Running);
        let stopping = alloc("b", 2, Stop, Running);
        let stopped = alloc("c", 3, Stop, Stopped);
        let decision = reconcile(None, &[&running, &stopping, &stopped]);
        assert_eq!(decision.stop, vec!["a".to_string()]);
        assert_eq!(decision.forget, vec!["c".to_string()]);
    }

    #[test]
    fn stopping_replicas_do_not_count_so_replacements_are_placed() {
        let stopping = alloc("a", 1, Stop, Running);
        assert_eq!(reconcile(Some(1), &[&stopping]).place, 1);
    }
}
