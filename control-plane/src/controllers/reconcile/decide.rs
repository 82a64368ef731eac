//! The reconciler decision for one service: desired replicas, the nodes and
//! the allocations that exist in; what to place, stop and forget out. Pure;
//! the controller loop turns the decisions of all services into one plan.
//!
//! Replicas on a draining node are migrated like Nomad's drainer does: the
//! replacement is placed first, and an old replica is stopped only once
//! enough replicas serve (healthy, or running without a health check) to
//! stay at the desired count, or when the drain deadline has passed.

use std::collections::BTreeMap;

use crate::controllers::deployment::{self, Replicas, Traffic};
use crate::controllers::rebalance;
use crate::scheduler::Request;
use crate::state::{
    AllocState, Allocation, Availability, DeploymentStep, DesiredState, ServiceMode, State,
};

/// What to do about one service's allocations.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Decision {
    /// Replicas to place.
    pub place: Vec<Request>,
    /// Live allocations to stop, with why.
    pub stop: Vec<(String, String)>,
    /// Stopped allocations that can be forgotten.
    pub forget: Vec<String>,
    /// Allocations of unknown state (their node is down) that are
    /// replaced or not wanted any more: written off as lost.
    pub lost: Vec<String>,
    /// The step of the service's active deployment, if it takes one.
    pub deployment: Option<(u64, DeploymentStep)>,
    /// The service's rebalance is done.
    pub rebalanced: bool,
    /// The job fails, with why (its deadline passed).
    pub fail_job: Option<String>,
}

impl Decision {
    pub(super) fn stop(&mut self, alloc: &Allocation, reason: &str) {
        self.stop.push((alloc.id.clone(), reason.to_string()));
    }
}

/// Decides for `service` (which may have been removed) at `now_ms`;
/// `traffic` is what the routing proxies measured of each replica (for
/// canary gating).
pub fn reconcile(state: &State, service: &str, now_ms: u64, traffic: &Traffic) -> Decision {
    let mut decision = Decision::default();
    let allocs: Vec<&Allocation> = state.allocs_of(service).collect();
    for alloc in &allocs {
        if alloc.desired == DesiredState::Stop && alloc.state == AllocState::Stopped {
            decision.forget.push(alloc.id.clone());
        }
    }
    let live: Vec<&Allocation> = allocs.iter().copied().filter(|a| a.is_live()).collect();
    let unknown = allocs
        .iter()
        .filter(|a| a.desired == DesiredState::Stop && a.state == AllocState::Unknown);
    let Some(spec) = state.services.get(service).map(|s| &s.spec) else {
        // A removed job's ended attempts were kept for `job ps` until now.
        decision.forget.extend(
            allocs
                .iter()
                .filter(|a| a.desired == DesiredState::Stop && a.state.is_terminal())
                .map(|a| a.id.clone()),
        );
        decision.lost.extend(unknown.map(|a| a.id.clone()));
        for alloc in live {
            decision.stop(alloc, "service removed");
        }
        return decision;
    };
    // A replica of a down node is written off once the service is back at
    // its count without it (a global service never replaces it).
    let replaced = match spec.mode {
        ServiceMode::Replicated => state.counted_replicas(service) >= spec.replicas as usize,
        ServiceMode::Global => true,
        // A job places its next attempt when it stops one of a down node.
        ServiceMode::Job => true,
    };
    if replaced {
        decision.lost.extend(unknown.map(|a| a.id.clone()));
    }
    match spec.mode {
        ServiceMode::Replicated => replicated(
            state,
            service,
            spec.replicas as usize,
            live,
            now_ms,
            traffic,
            &mut decision,
        ),
        ServiceMode::Global => {
            global(state, service, live, now_ms, &mut decision);
            global_rollout(state, service, now_ms, &mut decision);
        }
        ServiceMode::Job => {
            let job = state.services.get(service).and_then(|s| s.job.as_ref());
            super::job::job(spec, job, &live, now_ms, &mut decision);
        }
    }
    // A service whose `depends_on` do not hold yet waits for its first
    // start (nothing to stop or replace before it has started).
    if state.held_by_dependencies(service).is_some() {
        decision.place.clear();
    }
    decision.place.retain(|r| r.count > 0);
    for request in &mut decision.place {
        request.service = service.to_string();
    }
    decision
}

/// How long a replacement must have served before the replica it replaces
/// on a draining node is stopped.
pub const REPLACEMENT_SERVING_MS: u32 = 1_000;

fn draining(state: &State, alloc: &Allocation) -> bool {
    state
        .nodes
        .get(&alloc.node)
        .is_some_and(|n| n.availability == Availability::Drain)
}

fn deadline_passed(state: &State, alloc: &Allocation, now_ms: u64) -> bool {
    state
        .nodes
        .get(&alloc.node)
        .and_then(|n| n.drain_deadline_ms)
        .is_some_and(|deadline| now_ms >= deadline)
}

/// The `count` replicas of `kept` to stop when scaling down, in order:
/// those not serving first, then one from the node holding the most
/// replicas of the service (ties: the most loaded node, then the newest
/// replica), counting again after each, so a scale-down never worsens the
/// spread. Replicas that own volumes go by slot instead, the highest first
/// (as a StatefulSet): the volumes left in use are `NAME-0..NAME-(n-1)`,
/// the slots a later scale-up gives out again.
pub(crate) fn scale_down_order<'a>(
    state: &State,
    kept: &[&'a Allocation],
    count: usize,
) -> Vec<&'a Allocation> {
    let by_slot = kept.iter().any(|a| a.spec.owns_volumes());
    let mut on_node: BTreeMap<&str, usize> = BTreeMap::new();
    for alloc in kept {
        *on_node.entry(alloc.node.as_str()).or_default() += 1;
    }
    let load: BTreeMap<&str, (u64, usize)> = on_node
        .keys()
        .map(|&node| (node, node_load(state, node)))
        .collect();
    let mut left: Vec<&Allocation> = kept.to_vec();
    let mut order = Vec::with_capacity(count);
    while order.len() < count {
        let worst = left.iter().enumerate().min_by_key(|(_, a)| {
            let node = a.node.as_str();
            (
                a.is_serving(),
                std::cmp::Reverse(if by_slot { a.slot } else { 0 }),
                std::cmp::Reverse(on_node.get(node).copied().unwrap_or(0)),
                std::cmp::Reverse(load.get(node).copied().unwrap_or_default()),
                std::cmp::Reverse(a.create_index),
            )
        });
        let Some((i, _)) = worst else {
            break;
        };
        let alloc = left.swap_remove(i);
        if let Some(n) = on_node.get_mut(alloc.node.as_str()) {
            *n = n.saturating_sub(1);
        }
        order.push(alloc);
    }
    order
}

/// How loaded a node is, as the scheduler ranks it: the used fraction of
/// its scarcer resource (thousandths), then the allocations it holds.
fn node_load(state: &State, node: &str) -> (u64, usize) {
    let Some(record) = state.nodes.get(node) else {
        return (0, 0);
    };
    let (mut cpu, mut memory, mut total) = (0u64, 0u64, 0usize);
    for alloc in state.allocs_on(node).filter(|a| a.holds_resources()) {
        cpu += u64::from(alloc.spec.cpu_millis.unwrap_or(0));
        memory += u64::from(alloc.spec.memory_mb.unwrap_or(0));
        total += 1;
    }
    let fraction = |used: u64, capacity: u32| {
        if capacity == 0 {
            0
        } else {
            (used * 1000 / u64::from(capacity)).min(1000)
        }
    };
    let load = fraction(cpu, record.cpu_millis).max(fraction(memory, record.memory_mb));
    (load, total)
}

fn replicated(
    state: &State,
    service: &str,
    desired: usize,
    live: Vec<&Allocation>,
    now_ms: u64,
    traffic: &Traffic,
    decision: &mut Decision,
) {
    let (migrating, kept): (Vec<&Allocation>, Vec<&Allocation>) = if state
        .nodes
        .values()
        .any(|n| n.availability == Availability::Drain)
    {
        live.into_iter().partition(|a| draining(state, a))
    } else {
        (Vec::new(), live)
    };
    let record = &state.services[service];
    let owns_volumes = record.spec.owns_volumes();
    let (migrating, kept) = if owns_volumes {
        stay_with_volumes(state, migrating, kept, now_ms, decision)
    } else {
        (migrating, kept)
    };
    let mut kept = kept;
    if let Some(active) = record.active_deployment() {
        let stop_first = owns_volumes.then(|| deployment::stop_first(active));
        let active = stop_first.as_ref().unwrap_or(active);
        let (current, old): (Vec<&Allocation>, Vec<&Allocation>) = kept
            .iter()
            .copied()
            .partition(|a| a.spec.runs_same(&record.spec));
        let replicas = Replicas {
            current,
            old,
            holding: state
                .allocs_of(service)
                .filter(|a| a.holds_resources())
                .count(),
            prepulled: state.image_prepulled(service),
        };
        let rollout = deployment::rollout(active, desired, &replicas, traffic, now_ms);
        decision.place.push(Request::new("", rollout.place));
        decision.stop.extend(rollout.stop);
        decision.deployment = rollout.step.map(|step| (active.version, step));
    } else if record.rebalance && owns_volumes {
        // Its replicas stay with their volumes: nothing to move.
        decision.rebalanced = true;
    } else if record.rebalance
        && migrating.is_empty()
        && (desired..=desired + 1).contains(&kept.len())
    {
        match rebalance::decide(state, service, desired, &kept, now_ms) {
            rebalance::Step::Done => decision.rebalanced = true,
            rebalance::Step::Place(node) => decision.place.push(Request {
                service: String::new(),
                count: 1,
                node: Some(node),
            }),
            rebalance::Step::Stop(alloc) => decision.stop(alloc, "rebalanced"),
            rebalance::Step::Wait => {}
            rebalance::Step::GiveUp(alloc) => {
                decision.stop(alloc, "rebalance given up: the new replica does not serve");
                decision.rebalanced = true;
            }
        }
    } else if kept.len() > desired {
        let surplus = kept.len() - desired;
        for alloc in scale_down_order(state, &kept, surplus) {
            decision.stop(alloc, "scaled down");
        }
        kept.retain(|a| !decision.stop.iter().any(|(id, _)| *id == a.id));
    } else {
        decision
            .place
            .push(Request::new("", (desired - kept.len()) as u32));
    }
    // Keep the old replicas of a draining node until their replacements
    // serve, so the service never drops below its desired count.
    // A replacement counts once it has served a moment: one that reports
    // healthy and exits right after must not let an old replica go.
    let serving_kept = kept
        .iter()
        .filter(|a| deployment::is_ready(a, REPLACEMENT_SERVING_MS, now_ms))
        .count();
    let mut spare = (serving_kept + migrating.iter().filter(|a| a.is_serving()).count())
        .saturating_sub(desired);
    let mut migrating = migrating;
    migrating.sort_by_key(|a| (a.is_serving(), a.create_index, a.id.clone()));
    for alloc in migrating {
        if deadline_passed(state, alloc, now_ms) {
            decision.stop(alloc, "drain deadline reached");
        } else if !alloc.is_serving() {
            decision.stop(alloc, "node draining");
        } else if spare > 0 {
            spare -= 1;
            decision.stop(alloc, "node draining; replacement serving");
        }
    }
}

/// Replicas that own volumes are not migrated off a draining node (their
/// data stays there): they keep running until the drain deadline stops
/// them, and their replacements wait for the node (see `state/volumes.rs`).
fn stay_with_volumes<'a>(
    state: &State,
    migrating: Vec<&'a Allocation>,
    mut kept: Vec<&'a Allocation>,
    now_ms: u64,
    decision: &mut Decision,
) -> (Vec<&'a Allocation>, Vec<&'a Allocation>) {
    for alloc in migrating {
        if deadline_passed(state, alloc, now_ms) {
            decision.stop(alloc, "drain deadline reached");
        } else {
            kept.push(alloc);
        }
    }
    (Vec::new(), kept)
}

/// A deployment of a global service replaces its one replica per node,
/// `max_parallel` nodes at a time: the old replica stops (drained first)
/// and `global` places the new one on the freed node.
fn global_rollout(state: &State, service: &str, now_ms: u64, decision: &mut Decision) {
    let record = &state.services[service];
    let Some(active) = record.active_deployment() else {
        return;
    };
    let policy = &active.policy;
    let live: Vec<&Allocation> = state.live_allocs(service).collect();
    let (current, old): (Vec<&Allocation>, Vec<&Allocation>) =
        live.iter().partition(|a| a.spec.runs_same(&record.spec));
    let in_flight = current
        .iter()
        .filter(|a| !deployment::is_ready(a, policy.min_healthy_ms, now_ms))
        .count();
    let stopping = state
        .allocs_of(service)
        .filter(|a| a.desired == DesiredState::Stop && a.holds_resources())
        .count();
    let budget = (policy.max_parallel as usize).saturating_sub(in_flight + stopping);
    let already: Vec<String> = decision.stop.iter().map(|(id, _)| id.clone()).collect();
    for alloc in old.iter().filter(|a| !already.contains(&a.id)).take(budget) {
        let reason = format!("replaced by version {}", active.version);
        decision.stop.push((alloc.id.clone(), reason));
    }
    if old.is_empty()
        && in_flight == 0
        && decision.place.is_empty()
        && active.status != crate::state::DeploymentStatus::Paused
    {
        decision.deployment = Some((active.version, DeploymentStep::Succeed));
    }
}

fn global(
    state: &State,
    service: &str,
    live: Vec<&Allocation>,
    now_ms: u64,
    decision: &mut Decision,
) {
    let spec = &state.services[service].spec;
    let mut per_node: BTreeMap<&str, Vec<&Allocation>> = BTreeMap::new();
    for alloc in live {
        per_node.entry(alloc.node.as_str()).or_default().push(alloc);
    }
    for (node_name, mut allocs) in per_node.clone() {
        let node = state.nodes.get(node_name);
        let fits = node.is_some_and(|n| {
            spec.constraints
                .iter()
                .all(|c| c.holds(&n.labels, &n.name, &n.address))
        });
        if !fits {
            for alloc in allocs {
                decision.stop(alloc, "node no longer satisfies the constraints");
            }
            continue;
        }
        if node.is_some_and(|n| n.availability == Availability::Drain) {
            for alloc in allocs {
                let reason = if deadline_passed(state, alloc, now_ms) {
                    "drain deadline reached"
                } else {
                    "node draining"
                };
                decision.stop(alloc, reason);
            }
            continue;
        }
        allocs.sort_by_key(|a| (std::cmp::Reverse(a.is_serving()), a.create_index));
        for alloc in allocs.iter().skip(1) {
            decision.stop(alloc, "one replica per node");
        }
    }
    for node in state.nodes.values() {
        let eligible = node.is_eligible()
            && spec
                .constraints
                .iter()
                .all(|c| c.holds(&node.labels, &node.name, &node.address));
        if eligible && !per_node.contains_key(node.name.as_str()) {
            decision.place.push(Request {
                service: String::new(),
                count: 1,
                node: Some(node.name.clone()),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{
        AllocReport, Command, Constraint, NodeStatus, Placement, Plan, ServiceSpec,
    };

    struct Fixture {
        state: State,
        index: u64,
    }

    impl Fixture {
        fn new(nodes: &[(&str, &str)]) -> Self {
            let mut f = Fixture {
                state: State::default(),
                index: 0,
            };
            for (name, zone) in nodes {
                f.apply(Command::RegisterNode {
                    process_runtime: true,
                    agent_address: String::new(),
                    name: name.to_string(),
                    address: "127.0.0.1".into(),
                    port_range: (20000, 20100),
                    cpu_millis: 0,
                    memory_mb: 0,
                    labels: [("zone".to_string(), zone.to_string())].into(),
                });
            }
            f
        }

        fn apply(&mut self, command: Command) {
            self.index += 1;
            self.state.apply(self.index, command).unwrap();
        }

        fn service(&mut self, spec: ServiceSpec) {
            self.apply(Command::CreateService { spec });
        }

        fn place(&mut self, id: &str, service: &str, node: &str, state: AllocState) {
            let port = 20000 + self.index as u16;
            self.apply(Command::ApplyPlan {
                plan: Plan {
                    place: vec![Placement {
                        id: id.into(),
                        service: service.into(),
                        node: node.into(),
                        host_port: port,
                        slot: 0,
                    }],
                    ..Plan::default()
                },
            });
            assert!(self.state.allocs.contains_key(id), "{id} not placed");
            self.report(id, node, state);
        }

        fn report(&mut self, id: &str, node: &str, state: AllocState) {
            self.apply(Command::ReportAllocs {
                node: node.into(),
                reports: vec![AllocReport {
                    id: id.into(),
                    state,
                    restarts: 0,
                    pid: 1,
                    message: String::new(),
                    port: 0,
                    health_checked: false,
                    exit_code: None,
                    refused: false,
                }],
            });
        }

        fn stopped(&self, decision: &Decision) -> Vec<String> {
            decision.stop.iter().map(|(id, _)| id.clone()).collect()
        }
    }

    fn spec(name: &str, replicas: u32) -> ServiceSpec {
        ServiceSpec {
            name: name.into(),
            replicas,
            command: vec!["true".into()],
            ..Default::default()
        }
    }

    fn placed(decision: &Decision) -> u32 {
        decision.place.iter().map(|r| r.count).sum()
    }

    #[test]
    fn missing_replicas_are_placed() {
        let mut f = Fixture::new(&[("n1", "a")]);
        f.service(spec("web", 3));
        f.place("a", "web", "n1", AllocState::Running);
        assert_eq!(placed(&reconcile(&f.state, "web", 0, &Traffic::new())), 2);
    }

    #[test]
    fn scaling_down_stops_non_serving_then_newest_replicas_first() {
        let mut f = Fixture::new(&[("n1", "a")]);
        f.service(spec("web", 3));
        f.place("old", "web", "n1", AllocState::Running);
        f.place("broken", "web", "n1", AllocState::Restarting);
        f.place("new", "web", "n1", AllocState::Running);
        f.apply(Command::ScaleService {
            name: "web".into(),
            replicas: 1,
        });
        let decision = reconcile(&f.state, "web", 0, &Traffic::new());
        assert_eq!(f.stopped(&decision), vec!["broken", "new"]);
        assert_eq!(placed(&decision), 0);
    }

    #[test]
    fn scale_down_stops_replicas_on_the_most_loaded_nodes_first() {
        let mut f = Fixture::new(&[("n1", "a"), ("n2", "a"), ("n3", "a")]);
        f.service(spec("web", 7));
        f.service(spec("db", 1));
        f.place("db1", "db", "n2", AllocState::Running);
        for (id, node) in [
            ("a1", "n1"),
            ("b1", "n2"),
            ("a2", "n1"),
            ("b2", "n2"),
            ("a3", "n1"),
            ("b3", "n2"),
            ("c1", "n3"),
        ] {
            f.place(id, "web", node, AllocState::Running);
        }
        f.apply(Command::ScaleService {
            name: "web".into(),
            replicas: 6,
        });
        let decision = reconcile(&f.state, "web", 0, &Traffic::new());
        assert_eq!(
            f.stopped(&decision),
            vec!["b3"],
            "n3's only replica stays; n2 ties n1 but is more loaded"
        );

        f.apply(Command::ScaleService {
            name: "web".into(),
            replicas: 4,
        });
        let decision = reconcile(&f.state, "web", 0, &Traffic::new());
        assert_eq!(f.stopped(&decision), vec!["b3", "a3", "b2"]);
    }

    #[test]
    fn replicas_that_own_volumes_scale_down_from_the_highest_slot() {
        let mut f = Fixture::new(&[("n1", "a"), ("n2", "a")]);
        let mut db = spec("db", 3);
        db.runtime = crate::state::RuntimeKind::Oci;
        db.image = Some("127.0.0.1:5000/demo/db:v1".into());
        db.volumes = vec![skiff_spec::Mount::parse_volume("data:/data").unwrap()];
        f.service(db);
        // Slot 2 on the node with fewer replicas: spread alone would keep it.
        for (id, node, slot) in [("s0", "n1", 0), ("s1", "n1", 1), ("s2", "n2", 2)] {
            f.apply(Command::ApplyPlan {
                plan: Plan {
                    place: vec![Placement {
                        id: id.into(),
                        service: "db".into(),
                        node: node.into(),
                        host_port: 20000 + f.index as u16,
                        slot,
                    }],
                    ..Plan::default()
                },
            });
            assert!(f.state.allocs.contains_key(id), "{id} not placed");
            f.report(id, node, AllocState::Running);
        }
        f.apply(Command::ScaleService {
            name: "db".into(),
            replicas: 1,
        });
        let decision = reconcile(&f.state, "db", 0, &Traffic::new());
        assert_eq!(f.stopped(&decision), vec!["s2", "s1"]);
    }

    #[test]
    fn rebalance_moves_one_replica_at_a_time_surge_first_until_counts_differ_by_at_most_one() {
        let mut f = Fixture::new(&[("n1", "a"), ("n2", "a"), ("n3", "a")]);
        f.service(spec("web", 7));
        for (id, node) in [
            ("a1", "n1"),
            ("a2", "n1"),
            ("a3", "n1"),
            ("b1", "n2"),
            ("b2", "n2"),
            ("b3", "n2"),
            ("c1", "n3"),
        ] {
            f.place(id, "web", node, AllocState::Running);
        }
        f.apply(Command::RebalanceService { name: "web".into() });
        let decision = reconcile(&f.state, "web", 0, &Traffic::new());
        assert!(decision.stop.is_empty(), "surge first");
        assert_eq!(
            decision.place,
            vec![Request {
                service: "web".into(),
                count: 1,
                node: Some("n3".into()),
            }]
        );
        f.place("c2", "web", "n3", AllocState::Starting);
        assert_eq!(
            reconcile(&f.state, "web", 0, &Traffic::new()),
            Decision::default()
        );
        f.report("c2", "n3", AllocState::Running);
        let since = f.state.allocs["c2"].serving_since_ms;
        let later = since + u64::from(REPLACEMENT_SERVING_MS);
        assert!(reconcile(&f.state, "web", since, &Traffic::new())
            .stop
            .is_empty());
        let decision = reconcile(&f.state, "web", later, &Traffic::new());
        assert_eq!(f.stopped(&decision), vec!["b3"]);
        assert!(decision.place.is_empty() && !decision.rebalanced);
        f.apply(Command::ApplyPlan {
            plan: Plan {
                stop: vec!["b3".into()],
                ..Plan::default()
            },
        });
        // 3/2/2: spread again.
        let decision = reconcile(&f.state, "web", later, &Traffic::new());
        assert!(decision.rebalanced && decision.place.is_empty() && decision.stop.is_empty());
        f.apply(Command::ApplyPlan {
            plan: Plan {
                rebalanced: vec!["web".into()],
                ..Plan::default()
            },
        });
        assert!(!f.state.services["web"].rebalance);
        assert!(reconcile(&f.state, "web", later, &Traffic::new())
            .stop
            .is_empty());
    }

    #[test]
    fn a_rebalance_whose_new_replica_fails_stops_it_and_ends() {
        let mut f = Fixture::new(&[("n1", "a"), ("n2", "a")]);
        f.service(spec("web", 3));
        for id in ["a1", "a2", "a3"] {
            f.place(id, "web", "n1", AllocState::Running);
        }
        f.apply(Command::RebalanceService { name: "web".into() });
        f.place("b1", "web", "n2", AllocState::Failed);
        let decision = reconcile(&f.state, "web", 10_000, &Traffic::new());
        assert_eq!(f.stopped(&decision), vec!["b1"]);
        assert!(decision.rebalanced && decision.place.is_empty());
    }

    #[test]
    fn a_removed_service_stops_everything_and_forgets_what_stopped() {
        let mut f = Fixture::new(&[("n1", "a")]);
        f.service(spec("web", 2));
        f.place("a", "web", "n1", AllocState::Running);
        f.place("c", "web", "n1", AllocState::Running);
        f.apply(Command::RemoveService { name: "web".into() });
        f.report("c", "n1", AllocState::Stopped);
        let decision = reconcile(&f.state, "web", 0, &Traffic::new());
        assert_eq!(decision.forget, vec!["c".to_string()]);
        assert!(decision.stop.is_empty(), "already asked to stop");
    }

    #[test]
    fn a_down_nodes_replicas_are_stopped_and_replaced() {
        let mut f = Fixture::new(&[("n1", "a"), ("n2", "a")]);
        f.service(spec("web", 2));
        f.place("a", "web", "n1", AllocState::Running);
        f.place("b", "web", "n2", AllocState::Running);
        f.apply(Command::SetNodeStatus {
            name: "n1".into(),
            status: NodeStatus::Down,
        });
        assert_eq!(f.state.allocs["a"].desired, DesiredState::Stop);
        assert_eq!(placed(&reconcile(&f.state, "web", 0, &Traffic::new())), 1);
    }

    #[test]
    fn a_down_nodes_replicas_turn_unknown_then_lost_once_replaced_never_healthy() {
        let mut f = Fixture::new(&[("n1", "a"), ("n2", "a")]);
        f.service(spec("web", 2));
        f.place("a", "web", "n1", AllocState::Healthy);
        f.place("b", "web", "n2", AllocState::Healthy);
        f.apply(Command::SetNodeStatus {
            name: "n1".into(),
            status: NodeStatus::Down,
        });
        assert_eq!(f.state.allocs["a"].state, AllocState::Unknown);
        assert!(!f.state.allocs["a"].is_serving());
        let decision = reconcile(&f.state, "web", 0, &Traffic::new());
        assert!(decision.lost.is_empty(), "not replaced yet");
        assert_eq!(placed(&decision), 1);

        f.place("c", "web", "n2", AllocState::Starting);
        let decision = reconcile(&f.state, "web", 0, &Traffic::new());
        assert_eq!(decision.lost, vec!["a".to_string()]);
        f.apply(Command::ApplyPlan {
            plan: Plan {
                lost: decision.lost,
                ..Plan::default()
            },
        });
        assert_eq!(f.state.allocs["a"].state, AllocState::Lost);
        assert!(reconcile(&f.state, "web", 0, &Traffic::new())
            .lost
            .is_empty());
    }

    /// The agent of `node` registers again (as after a partition heals).
    fn register_again(f: &mut Fixture, node: &str) {
        f.apply(Command::RegisterNode {
            process_runtime: true,
            agent_address: String::new(),
            name: node.to_string(),
            address: "127.0.0.1".into(),
            port_range: (20000, 20100),
            cpu_millis: 0,
            memory_mb: 0,
            labels: [("zone".to_string(), "a".to_string())].into(),
        });
    }

    #[test]
    fn a_cut_off_nodes_unreplaced_replicas_are_kept_when_its_agent_registers_again() {
        let mut f = Fixture::new(&[("n1", "a")]);
        f.service(spec("web", 2));
        f.place("a", "web", "n1", AllocState::Running);
        f.place("b", "web", "n1", AllocState::Running);
        f.apply(Command::SetNodeStatus {
            name: "n1".into(),
            status: NodeStatus::Down,
        });
        assert_eq!(f.state.allocs["a"].desired, DesiredState::Stop);
        register_again(&mut f, "n1");
        for id in ["a", "b"] {
            assert_eq!(f.state.allocs[id].desired, DesiredState::Run, "{id}");
        }
        let decision = reconcile(&f.state, "web", 0, &Traffic::new());
        assert_eq!(placed(&decision), 0);
        assert!(decision.stop.is_empty() && decision.lost.is_empty());
        f.report("a", "n1", AllocState::Running);
        assert!(f.state.allocs["a"].is_live());
    }

    #[test]
    fn a_cut_off_nodes_replaced_replicas_stay_stopped_when_its_agent_registers_again() {
        let mut f = Fixture::new(&[("n1", "a"), ("n2", "a")]);
        f.service(spec("web", 2));
        f.place("a", "web", "n1", AllocState::Running);
        f.place("b", "web", "n1", AllocState::Running);
        f.apply(Command::SetNodeStatus {
            name: "n1".into(),
            status: NodeStatus::Down,
        });
        // One of the two was replaced on n2 meanwhile: one is kept.
        f.place("c", "web", "n2", AllocState::Running);
        register_again(&mut f, "n1");
        let kept = ["a", "b"]
            .iter()
            .filter(|id| f.state.allocs[**id].desired == DesiredState::Run)
            .count();
        assert_eq!(kept, 1);
        let decision = reconcile(&f.state, "web", 0, &Traffic::new());
        assert_eq!(placed(&decision), 0);
        assert!(decision.stop.is_empty(), "{:?}", decision.stop);
    }

    #[test]
    fn a_returning_agents_report_replaces_the_unknown_state() {
        let mut f = Fixture::new(&[("n1", "a"), ("n2", "a")]);
        f.service(spec("web", 1));
        f.place("a", "web", "n1", AllocState::Healthy);
        f.apply(Command::SetNodeStatus {
            name: "n1".into(),
            status: NodeStatus::Down,
        });
        f.place("b", "web", "n2", AllocState::Healthy);
        f.apply(Command::SetNodeStatus {
            name: "n1".into(),
            status: NodeStatus::Ready,
        });
        assert_eq!(f.state.allocs["a"].state, AllocState::Unknown);
        f.report("a", "n1", AllocState::Stopped);
        assert_eq!(f.state.allocs["a"].state, AllocState::Stopped);
        let decision = reconcile(&f.state, "web", 0, &Traffic::new());
        assert_eq!(decision.forget, vec!["a".to_string()]);
    }

    #[test]
    fn draining_places_the_replacement_first_and_stops_the_old_once_it_serves() {
        let mut f = Fixture::new(&[("n1", "a"), ("n2", "a")]);
        f.service(spec("web", 2));
        f.place("a", "web", "n1", AllocState::Running);
        f.place("b", "web", "n2", AllocState::Running);
        f.apply(Command::SetNodeAvailability {
            name: "n1".into(),
            availability: Availability::Drain,
            deadline_ms: Some(60_000),
        });
        let decision = reconcile(&f.state, "web", 0, &Traffic::new());
        assert_eq!(placed(&decision), 1, "replacement first");
        assert!(decision.stop.is_empty(), "old kept until it serves");

        f.place("c", "web", "n2", AllocState::Starting);
        assert!(reconcile(&f.state, "web", 0, &Traffic::new())
            .stop
            .is_empty());
        f.report("c", "n2", AllocState::Running);
        let since = f.state.allocs["c"].serving_since_ms;
        assert!(
            reconcile(&f.state, "web", since, &Traffic::new())
                .stop
                .is_empty(),
            "the replacement must serve a moment first"
        );
        let later = since + u64::from(REPLACEMENT_SERVING_MS);
        let decision = reconcile(&f.state, "web", later, &Traffic::new());
        assert_eq!(f.stopped(&decision), vec!["a"]);
        assert_eq!(placed(&decision), 0);
    }

    #[test]
    fn a_drain_deadline_stops_what_has_not_moved() {
        let mut f = Fixture::new(&[("n1", "a")]);
        f.service(spec("web", 1));
        f.place("a", "web", "n1", AllocState::Running);
        f.apply(Command::SetNodeAvailability {
            name: "n1".into(),
            availability: Availability::Drain,
            deadline_ms: Some(1000),
        });
        assert!(reconcile(&f.state, "web", 999, &Traffic::new())
            .stop
            .is_empty());
        let decision = reconcile(&f.state, "web", 1000, &Traffic::new());
        assert_eq!(
            decision.stop,
            vec![("a".into(), "drain deadline reached".into())]
        );
    }

    #[test]
    fn a_global_service_runs_once_on_every_eligible_node() {
        let mut f = Fixture::new(&[("n1", "a"), ("n2", "a"), ("n3", "b")]);
        let mut s = spec("logs", 0);
        s.mode = ServiceMode::Global;
        s.constraints = vec![Constraint::parse("zone==a").unwrap()];
        f.service(s);
        f.place("x", "logs", "n1", AllocState::Running);
        let decision = reconcile(&f.state, "logs", 0, &Traffic::new());
        let nodes: Vec<_> = decision.place.iter().map(|r| r.node.clone()).collect();
        assert_eq!(nodes, vec![Some("n2".to_string())]);
        assert!(decision.place.iter().all(|r| r.service == "logs"));
    }

    fn stateful(name: &str, replicas: u32) -> ServiceSpec {
        ServiceSpec {
            name: name.into(),
            replicas,
            runtime: crate::state::RuntimeKind::Oci,
            image: Some("127.0.0.1:5000/demo/web:v1".into()),
            volumes: vec![skiff_spec::Mount::parse_volume("data:/data").unwrap()],
            ..Default::default()
        }
    }

    #[test]
    fn a_replica_that_owns_a_volume_is_updated_stop_first_never_surged() {
        let mut f = Fixture::new(&[("n1", "a")]);
        f.service(stateful("db", 1));
        f.place("old", "db", "n1", AllocState::Running);
        let mut next = stateful("db", 1);
        next.env.insert("A".into(), "1".into());
        f.apply(Command::UpdateService { spec: next });
        let now = 61_000;
        let decision = reconcile(&f.state, "db", now, &Traffic::new());
        assert_eq!(
            f.stopped(&decision),
            vec!["old"],
            "the old replica stops first"
        );
        assert_eq!(placed(&decision), 0, "no surge beside it");
        f.apply(Command::ApplyPlan {
            plan: Plan {
                stop: vec!["old".into()],
                ..Plan::default()
            },
        });
        assert_eq!(
            placed(&reconcile(&f.state, "db", now, &Traffic::new())),
            0,
            "not while it still runs"
        );
        f.report("old", "n1", AllocState::Stopped);
        assert_eq!(placed(&reconcile(&f.state, "db", now, &Traffic::new())), 1);
    }

    #[test]
    fn a_replica_that_owns_a_volume_stays_on_a_draining_node_until_the_deadline() {
        let mut f = Fixture::new(&[("n1", "a"), ("n2", "a")]);
        f.service(stateful("db", 1));
        f.place("a", "db", "n1", AllocState::Running);
        f.apply(Command::SetNodeAvailability {
            name: "n1".into(),
            availability: Availability::Drain,
            deadline_ms: Some(1000),
        });
        let decision = reconcile(&f.state, "db", 0, &Traffic::new());
        assert!(
            decision.stop.is_empty() && decision.place.is_empty(),
            "{decision:?}"
        );
        let decision = reconcile(&f.state, "db", 1000, &Traffic::new());
        assert_eq!(f.stopped(&decision), vec!["a"]);
    }
}
