//! The local reconcile decision: given the node's full set of assignments
//! and what runs (or is remembered) locally, which replicas to start, which
//! to stop, and which stale records to forget. Pure, so it is tested alone.

use std::collections::{BTreeMap, BTreeSet};

use crate::spec::ReplicaSpec;

/// What the control plane wants of an allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Desired {
    Run,
    Stop,
}

impl Desired {
    /// Only an explicit "run" runs: an unknown word is safest read as stop.
    pub fn parse(s: &str) -> Self {
        if s == "run" {
            Desired::Run
        } else {
            Desired::Stop
        }
    }
}

/// One allocation of the node's assignment set, already validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assigned {
    pub spec: ReplicaSpec,
    pub desired: Desired,
}

/// How an allocation is known locally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Local {
    /// A supervisor runs (or restarts) it.
    Active,
    /// Its supervisor was told to stop and has not finished.
    Stopping,
    /// Only its record is left (loaded at startup, process gone).
    Dormant,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Start a supervisor for these.
    pub start: Vec<ReplicaSpec>,
    /// Stop these supervisors and their replicas.
    pub stop: Vec<String>,
    /// Delete these dormant records.
    pub forget: Vec<String>,
}

/// Decides the local changes. An allocation that is still stopping is left
/// alone even if desired again: it is started once its supervisor is done
/// (the caller re-plans then), so two processes never share an allocation.
pub fn plan(assigned: &[Assigned], local: &BTreeMap<String, Local>) -> Plan {
    let mut plan = Plan::default();
    let mut wanted = BTreeSet::new();
    for a in assigned {
        let id = &a.spec.alloc_id;
        if a.desired == Desired::Run {
            wanted.insert(id.as_str());
        }
        match (a.desired, local.get(id)) {
            (Desired::Run, None | Some(Local::Dormant)) => plan.start.push(a.spec.clone()),
            (Desired::Run, Some(Local::Active | Local::Stopping)) => {}
            (Desired::Stop, _) => {}
        }
    }
    for (id, state) in local {
        if wanted.contains(id.as_str()) {
            continue;
        }
        match state {
            Local::Active => plan.stop.push(id.clone()),
            Local::Dormant => plan.forget.push(id.clone()),
            Local::Stopping => {}
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::test_spec;

    fn assigned(id: &str, desired: Desired) -> Assigned {
        Assigned {
            spec: test_spec(id, &["sleep", "30"], 20001),
            desired,
        }
    }

    fn local(entries: &[(&str, Local)]) -> BTreeMap<String, Local> {
        entries.iter().map(|(id, l)| (id.to_string(), *l)).collect()
    }

    fn ids(specs: &[ReplicaSpec]) -> Vec<&str> {
        specs.iter().map(|s| s.alloc_id.as_str()).collect()
    }

    #[test]
    fn starts_run_allocations_not_yet_running() {
        let p = plan(
            &[assigned("a", Desired::Run), assigned("b", Desired::Run)],
            &local(&[("a", Local::Active)]),
        );
        assert_eq!(ids(&p.start), ["b"]);
        assert!(p.stop.is_empty() && p.forget.is_empty());
    }

    #[test]
    fn stops_allocations_desired_stop_or_missing_from_the_set() {
        let p = plan(
            &[assigned("a", Desired::Stop), assigned("c", Desired::Run)],
            &local(&[
                ("a", Local::Active),
                ("b", Local::Active),
                ("c", Local::Active),
            ]),
        );
        assert!(p.start.is_empty());
        assert_eq!(p.stop, ["a", "b"]);
    }

    #[test]
    fn dormant_records_restart_when_assigned_and_are_forgotten_otherwise() {
        let p = plan(
            &[assigned("a", Desired::Run), assigned("b", Desired::Stop)],
            &local(&[
                ("a", Local::Dormant),
                ("b", Local::Dormant),
                ("c", Local::Dormant),
            ]),
        );
        assert_eq!(ids(&p.start), ["a"]);
        assert_eq!(p.forget, ["b", "c"]);
        assert!(p.stop.is_empty());
    }

    #[test]
    fn stopping_allocations_are_neither_restarted_nor_stopped_again() {
        let p = plan(
            &[assigned("a", Desired::Run)],
            &local(&[("a", Local::Stopping), ("b", Local::Stopping)]),
        );
        assert_eq!(p, Plan::default());
    }

    #[test]
    fn desired_stop_for_unknown_allocation_does_nothing() {
        let p = plan(&[assigned("a", Desired::Stop)], &BTreeMap::new());
        assert_eq!(p, Plan::default());
    }

    #[test]
    fn only_the_word_run_means_run() {
        assert_eq!(Desired::parse("run"), Desired::Run);
        assert_eq!(Desired::parse("stop"), Desired::Stop);
        assert_eq!(Desired::parse("RUN?"), Desired::Stop);
    }
}
