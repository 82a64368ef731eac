//! Unit tests of the deployment decision, driven through the whole control
//! loop and nothing else: a [`State`] with three nodes, [`plan_cluster`]
//! applied as `ApplyPlan` entries, and a simulated agent that moves new
//! replicas pending → starting → running → healthy (or not, as the spec's
//! `BEHAVIOUR` variable says) and stops the ones asked to stop after a
//! short drain. A simulated clock advances [`TICK_MS`] per step; every run
//! is bounded. Every state after every applied entry is kept, so the
//! invariants are checked at each step, not only at the end.

use std::collections::{BTreeMap, BTreeSet};

use super::*;
use crate::api::convert::endpoints;
use crate::controllers::plan_cluster;
use crate::state::{
    AllocReport, Command, CommandError, DesiredState, EventKind, HealthCheck, HealthKind, Outcome,
    Plan, ServiceSpec, State, UpdatePolicy,
};

const SERVICE: &str = "web";
const TICK_MS: u64 = 500;
const START_MS: u64 = 1_700_000_000_000;
const MAX_TICKS: u64 = 400;

/// How the simulated agent runs replicas of a spec: its `BEHAVIOUR`
/// variable.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Behaviour {
    /// Starts, runs, passes its health check.
    Healthy,
    /// Starts, runs, fails its health check.
    Unhealthy,
    /// Never gets past starting.
    Stuck,
}

fn behaviour(spec: &ServiceSpec) -> Behaviour {
    match spec.env.get("BEHAVIOUR").map(String::as_str) {
        Some("unhealthy") => Behaviour::Unhealthy,
        Some("stuck") => Behaviour::Stuck,
        _ => Behaviour::Healthy,
    }
}

/// What the simulated routing proxies measured of one replica.
type TrafficOf = fn(&Allocation) -> Option<ReplicaTraffic>;

/// One committed state of the simulated cluster and when it was reached.
struct Snapshot {
    now: u64,
    state: State,
}

struct Sim {
    state: State,
    index: u64,
    now: u64,
    ticks: u64,
    /// Agent steps a replica asked to stop keeps draining (still holding
    /// its resources) before its agent reports it stopped.
    drain_ticks: u32,
    draining: BTreeMap<String, u32>,
    traffic_of: TrafficOf,
    /// The state after every applied entry since the last `clear_trace`.
    trace: Vec<Snapshot>,
    /// The non-empty plans applied, with the tick they were decided at.
    plans: Vec<(u64, Plan)>,
}

fn no_traffic(_: &Allocation) -> Option<ReplicaTraffic> {
    None
}

fn policy() -> UpdatePolicy {
    UpdatePolicy {
        min_healthy_ms: 1_000,
        healthy_deadline_ms: 10_000,
        progress_deadline_ms: 300_000,
        ..UpdatePolicy::default()
    }
}

fn health() -> HealthCheck {
    HealthCheck {
        kind: HealthKind::Tcp,
        interval_ms: 0,
        timeout_ms: 0,
        retries: 0,
        start_period_ms: 0,
    }
}

/// Version 1 of the service: healthy, health checked, published.
fn spec_v1(replicas: u32, update: UpdatePolicy) -> ServiceSpec {
    ServiceSpec {
        name: SERVICE.into(),
        replicas,
        command: vec!["app".into(), "--release".into(), "1".into()],
        env: [("BEHAVIOUR".to_string(), "healthy".to_string())].into(),
        health: Some(health()),
        publish: Some(8080),
        update,
        ..Default::default()
    }
}

/// Turns the current spec into a new release whose replicas behave as
/// `behaviour` says.
fn release(number: u32, behaviour: &str) -> impl FnOnce(&mut ServiceSpec) + '_ {
    move |spec| {
        spec.command[2] = number.to_string();
        spec.env.insert("BEHAVIOUR".into(), behaviour.into());
    }
}

impl Sim {
    /// Three nodes in three zones and the service at version 1 with all
    /// its replicas serving.
    fn new(replicas: u32, update: UpdatePolicy) -> Sim {
        Sim::sized(replicas, update, [0; 3], None)
    }

    /// Like `new`, with the nodes' memory (0: not counted) and each
    /// replica's.
    fn sized(
        replicas: u32,
        update: UpdatePolicy,
        node_memory_mb: [u32; 3],
        replica_memory_mb: Option<u32>,
    ) -> Sim {
        let mut sim = Sim {
            state: State::default(),
            index: 0,
            now: START_MS,
            ticks: 0,
            drain_ticks: 1,
            draining: BTreeMap::new(),
            traffic_of: no_traffic,
            trace: Vec::new(),
            plans: Vec::new(),
        };
        for ((name, zone), memory_mb) in [("n1", "a"), ("n2", "b"), ("n3", "c")]
            .into_iter()
            .zip(node_memory_mb)
        {
            sim.apply(Command::RegisterNode {
                process_runtime: true,
                agent_address: String::new(),
                name: name.into(),
                address: format!("10.0.0.{}", &name[1..]),
                port_range: (20000, 20999),
                cpu_millis: 0,
                memory_mb,
                labels: [("zone".to_string(), zone.to_string())].into(),
            })
            .unwrap();
        }
        let spec = ServiceSpec {
            memory_mb: replica_memory_mb,
            ..spec_v1(replicas, update)
        };
        sim.apply(Command::CreateService { spec }).unwrap();
        sim.run_until("version 1 serves", |s| {
            serving(s) == replicas as usize && holding(s) == replicas as usize
        });
        assert!(
            sim.service().deployment.is_none(),
            "creating deploys nothing"
        );
        sim.clear_trace();
        sim
    }

    /// Applies one committed entry stamped with the simulated clock.
    fn apply(&mut self, command: Command) -> Result<Outcome, CommandError> {
        self.index += 1;
        let result = self.state.apply(self.index, command.at(self.now));
        self.trace.push(Snapshot {
            now: self.now,
            state: self.state.clone(),
        });
        result
    }

    fn clear_trace(&mut self) {
        self.trace.clear();
        self.plans.clear();
    }

    fn service(&self) -> &crate::state::Service {
        &self.state.services[SERVICE]
    }

    fn deployment(&self) -> &Deployment {
        self.service().deployment.as_ref().expect("a deployment")
    }

    /// `UpdateService` with the current spec changed by `change`.
    fn update(&mut self, change: impl FnOnce(&mut ServiceSpec)) -> Result<Outcome, CommandError> {
        let mut spec = self.service().spec.clone();
        change(&mut spec);
        self.apply(Command::UpdateService { spec })
    }

    /// What every agent reports now: one `ReportAllocs` entry per node
    /// with anything to say.
    fn agents(&mut self) {
        let mut reports: BTreeMap<String, Vec<AllocReport>> = BTreeMap::new();
        for alloc in self.state.allocs.values() {
            let next = if alloc.desired == DesiredState::Stop {
                if alloc.state == AllocState::Stopped {
                    continue;
                }
                let drained = self.draining.entry(alloc.id.clone()).or_insert(0);
                if *drained < self.drain_ticks {
                    *drained += 1;
                    continue;
                }
                (AllocState::Stopped, "")
            } else {
                match (alloc.state, behaviour(&alloc.spec)) {
                    (AllocState::Pending, _) => (AllocState::Starting, ""),
                    (AllocState::Starting, Behaviour::Stuck) => continue,
                    (AllocState::Starting, _) => (AllocState::Running, ""),
                    (AllocState::Running, Behaviour::Healthy) => (AllocState::Healthy, ""),
                    (AllocState::Running, Behaviour::Unhealthy) => {
                        (AllocState::Unhealthy, "health check failed")
                    }
                    _ => continue,
                }
            };
            reports
                .entry(alloc.node.clone())
                .or_default()
                .push(AllocReport {
                    id: alloc.id.clone(),
                    state: next.0,
                    restarts: 0,
                    pid: 100,
                    message: next.1.to_string(),
                    port: 0,
                    health_checked: false,
                    exit_code: None,
                    refused: false,
                });
        }
        for (node, reports) in reports {
            self.apply(Command::ReportAllocs { node, reports }).unwrap();
        }
    }

    fn traffic(&self) -> Traffic {
        self.state
            .allocs
            .values()
            .filter(|a| a.is_live() && a.is_serving())
            .filter_map(|a| (self.traffic_of)(a).map(|t| (a.id.clone(), t)))
            .collect()
    }

    /// The leader's reconciler: one plan, applied when not empty.
    fn plan(&mut self) -> Plan {
        let (plan, _) = plan_cluster(&self.state, self.now, self.ticks, &self.traffic());
        if !plan.is_empty() {
            let outcome = self
                .apply(Command::ApplyPlan { plan: plan.clone() })
                .unwrap();
            assert!(
                matches!(outcome, Outcome::PlanApplied { rejected: 0, .. }),
                "a plan decided on the current state is applied whole: {outcome:?}"
            );
            self.plans.push((self.ticks, plan.clone()));
        }
        plan
    }

    /// One step of the simulated clock: the agents report, then the leader
    /// plans.
    fn tick(&mut self) -> Plan {
        self.ticks += 1;
        self.now += TICK_MS;
        self.agents();
        self.plan()
    }

    /// Ticks until `done` holds; returns how many ticks it took.
    fn run_until(&mut self, what: &str, done: impl Fn(&State) -> bool) -> u64 {
        for n in 1..=MAX_TICKS {
            self.tick();
            if done(&self.state) {
                return n;
            }
        }
        panic!(
            "{what}: not reached in {MAX_TICKS} ticks\n{}",
            describe(&self.state)
        );
    }

    fn run_until_status(&mut self, status: DeploymentStatus) -> u64 {
        self.run_until(&format!("deployment {}", status.as_str()), |s| {
            deployment_of(s).is_some_and(|d| d.status == status)
        })
    }

    /// Ticks until every stopped replica is stopped and forgotten.
    fn settle(&mut self) {
        self.run_until("stopped replicas forgotten", |s| {
            s.allocs_of(SERVICE).all(|a| a.is_live())
        });
    }
}

fn deployment_of(state: &State) -> Option<&Deployment> {
    state.services.get(SERVICE)?.deployment.as_ref()
}

/// Allocations of the service still holding resources (not stopped).
fn holding(state: &State) -> usize {
    state
        .allocs_of(SERVICE)
        .filter(|a| a.holds_resources())
        .count()
}

/// Replicas wanted and serving.
fn serving(state: &State) -> usize {
    state
        .live_allocs(SERVICE)
        .filter(|a| a.is_serving())
        .count()
}

fn live_ids(state: &State) -> BTreeSet<String> {
    state.live_allocs(SERVICE).map(|a| a.id.clone()).collect()
}

fn ids_of_version(state: &State, version: u64) -> BTreeSet<String> {
    state
        .allocs_of(SERVICE)
        .filter(|a| a.version == version)
        .map(|a| a.id.clone())
        .collect()
}

/// What the routing proxies are told: (alloc id, version, weight).
fn endpoint_list(state: &State) -> Vec<(String, u64, u32)> {
    endpoints(state)
        .services
        .into_iter()
        .filter(|s| s.service == SERVICE)
        .flat_map(|s| s.endpoints)
        .map(|e| (e.alloc_id, e.version, e.weight))
        .collect()
}

fn endpoint_ids(state: &State) -> BTreeSet<String> {
    endpoint_list(state).into_iter().map(|e| e.0).collect()
}

fn describe(state: &State) -> String {
    let mut out = format!("deployment: {:?}\n", deployment_of(state));
    for a in state.allocs_of(SERVICE) {
        out += &format!(
            "  {} v{} on {}: {} (desired {}, held {}, serving since {}) {}\n",
            a.id,
            a.version,
            a.node,
            a.state.as_str(),
            a.desired.as_str(),
            a.held,
            a.serving_since_ms,
            a.message
        );
    }
    out
}

/// Every allocation ever seen in the trace, by id, in its last seen form.
fn allocs_seen(sim: &Sim) -> BTreeMap<String, Allocation> {
    let mut seen = BTreeMap::new();
    for snap in &sim.trace {
        for a in snap.state.allocs_of(SERVICE) {
            seen.insert(a.id.clone(), a.clone());
        }
    }
    seen
}

/// Ids asked to stop at any point of the trace.
fn ever_stopped(sim: &Sim) -> BTreeSet<String> {
    sim.trace
        .iter()
        .flat_map(|s| s.state.allocs_of(SERVICE))
        .filter(|a| a.desired == DesiredState::Stop)
        .map(|a| a.id.clone())
        .collect()
}

/// The allocation ids a plan stops or places for the service.
fn touched(plan: &Plan) -> (Vec<String>, Vec<String>) {
    (
        plan.place
            .iter()
            .filter(|p| p.service == SERVICE)
            .map(|p| p.id.clone())
            .collect(),
        plan.stop.clone(),
    )
}

/// Checks the surge and availability bounds at every committed step, and
/// that at most `max_parallel` new replicas are in flight at once.
fn assert_bounds(sim: &Sim, desired: usize, policy: &UpdatePolicy, new_version: u64) {
    let most = desired + policy.max_surge as usize;
    let least = desired - policy.max_unavailable as usize;
    for (i, snap) in sim.trace.iter().enumerate() {
        let s = &snap.state;
        assert!(
            holding(s) <= most,
            "step {i}: {} allocations hold resources, more than {desired} + surge {}\n{}",
            holding(s),
            policy.max_surge,
            describe(s)
        );
        assert!(
            serving(s) >= least,
            "step {i}: {} serving, below {desired} - {} unavailable\n{}",
            serving(s),
            policy.max_unavailable,
            describe(s)
        );
        assert!(
            endpoint_list(s).len() >= least,
            "step {i}: the proxies route to fewer than {least}\n{}",
            describe(s)
        );
        let in_flight = s
            .live_allocs(SERVICE)
            .filter(|a| a.version == new_version)
            .filter(|a| !is_ready(a, policy.min_healthy_ms, snap.now))
            .count();
        assert!(
            in_flight <= policy.max_parallel as usize,
            "step {i}: {in_flight} new replicas in flight, above max-parallel {}\n{}",
            policy.max_parallel,
            describe(s)
        );
    }
}

/// The service runs `desired` healthy replicas of `version` and nothing else.
fn assert_all_run(sim: &Sim, desired: usize, version: u64) {
    let service = sim.service();
    let live: Vec<&Allocation> = sim.state.live_allocs(SERVICE).collect();
    assert_eq!(live.len(), desired, "{}", describe(&sim.state));
    for a in &live {
        assert_eq!(a.version, version, "{}", describe(&sim.state));
        assert!(a.spec.runs_same(&service.spec), "{} runs an old spec", a.id);
        assert_eq!(a.state, AllocState::Healthy);
    }
    assert_eq!(holding(&sim.state), desired, "{}", describe(&sim.state));
    assert_eq!(endpoint_ids(&sim.state), live_ids(&sim.state));
}

fn assert_succeeded(sim: &Sim, version: u64) {
    let service = sim.service();
    let d = sim.deployment();
    assert_eq!(d.version, version, "{}", describe(&sim.state));
    assert_eq!(d.status, DeploymentStatus::Succeeded, "{}", d.message);
    assert!(d.ended_ms >= d.started_ms);
    assert_eq!(service.version, version);
    assert_eq!(service.stable_version, version);
    assert_eq!(
        service.version_record(version).unwrap().outcome,
        "succeeded"
    );
}

// ---------------------------------------------------------------------
// Rolling updates
// ---------------------------------------------------------------------

#[test]
fn rolling_six_replicas_two_at_a_time_stays_within_the_surge_and_never_loses_capacity() {
    let policy = UpdatePolicy {
        max_parallel: 2,
        max_surge: 2,
        min_healthy_ms: 1_000,
        ..policy()
    };
    let mut sim = Sim::new(6, policy.clone());
    let v1 = live_ids(&sim.state);
    sim.update(release(2, "healthy")).unwrap();
    assert_eq!(sim.service().version, 2);
    assert_eq!(sim.deployment().status, DeploymentStatus::Running);
    assert_eq!(sim.deployment().from_version, 1);
    assert_eq!(sim.service().version_record(2).unwrap().outcome, "running");

    let first = sim.tick();
    assert_eq!(first.place.len(), 2, "max-parallel 2 within a surge of 2");
    assert!(first.stop.is_empty(), "surge first: nothing stops yet");

    let ticks = sim.run_until_status(DeploymentStatus::Succeeded);
    assert!(ticks < 60, "took {ticks} ticks");
    assert_succeeded(&sim, 2);
    assert_bounds(&sim, 6, &policy, 2);
    let peak = sim.trace.iter().map(|s| holding(&s.state)).max().unwrap();
    assert_eq!(peak, 8, "the surge is used");

    sim.settle();
    assert_all_run(&sim, 6, 2);
    assert!(live_ids(&sim.state).is_disjoint(&v1));
    assert!(
        v1.iter().all(|id| !sim.state.allocs.contains_key(id)),
        "old replicas stopped and forgotten"
    );
    // Every old replica was stopped because a new one replaced it.
    let reasons: BTreeSet<&String> = sim
        .plans
        .iter()
        .flat_map(|(_, p)| p.reasons.values())
        .collect();
    assert_eq!(
        reasons.into_iter().collect::<Vec<_>>(),
        vec!["replaced by version 2"]
    );
    let kinds: Vec<EventKind> = sim.state.events.iter().map(|e| e.kind).collect();
    assert!(kinds.contains(&EventKind::DeploymentStarted));
    assert_eq!(
        kinds
            .iter()
            .filter(|k| **k == EventKind::DeploymentSucceeded)
            .count(),
        1
    );
}

#[test]
fn a_new_replica_is_not_stopped_or_counted_before_min_healthy_time() {
    let policy = UpdatePolicy {
        max_parallel: 2,
        max_surge: 2,
        min_healthy_ms: 3_000,
        ..policy()
    };
    let mut sim = Sim::new(4, policy.clone());
    sim.update(release(2, "healthy")).unwrap();
    sim.run_until_status(DeploymentStatus::Succeeded);
    // The first old replica is asked to stop only once a new one has
    // served for min_healthy_ms.
    let first_stop = sim
        .trace
        .iter()
        .find(|s| {
            s.state
                .allocs_of(SERVICE)
                .any(|a| a.version == 1 && a.desired == DesiredState::Stop)
        })
        .unwrap();
    let ready = first_stop
        .state
        .live_allocs(SERVICE)
        .filter(|a| a.version == 2)
        .filter(|a| is_ready(a, 3_000, first_stop.now))
        .count();
    assert!(ready >= 1, "{}", describe(&first_stop.state));
    assert_bounds(&sim, 4, &policy, 2);
}

#[test]
fn one_replica_rolling_serves_the_new_replica_before_the_old_is_asked_to_stop() {
    let policy = policy();
    let mut sim = Sim::new(1, policy.clone());
    let old = live_ids(&sim.state).into_iter().next().unwrap();
    sim.update(release(2, "healthy")).unwrap();
    sim.run_until_status(DeploymentStatus::Succeeded);
    assert_succeeded(&sim, 2);
    assert_bounds(&sim, 1, &policy, 2);
    for (i, snap) in sim.trace.iter().enumerate() {
        assert!(
            !endpoint_list(&snap.state).is_empty(),
            "step {i}: no endpoint\n{}",
            describe(&snap.state)
        );
    }
    let asked = sim
        .trace
        .iter()
        .position(|s| s.state.allocs[&old].desired == DesiredState::Stop)
        .expect("the old replica is asked to stop");
    let at = &sim.trace[asked].state;
    let before = &sim.trace[asked - 1].state;
    let new_serving: Vec<&Allocation> = before
        .live_allocs(SERVICE)
        .filter(|a| a.version == 2 && a.is_serving())
        .collect();
    assert_eq!(new_serving.len(), 1, "{}", describe(before));
    assert_eq!(
        endpoint_ids(at),
        BTreeSet::from([new_serving[0].id.clone()]),
        "the same entry that stops the old replica leaves the new one routed"
    );
    sim.settle();
    assert_all_run(&sim, 1, 2);
}

#[test]
fn without_surge_one_unavailable_replaces_in_place() {
    let policy = UpdatePolicy {
        max_parallel: 1,
        max_surge: 0,
        max_unavailable: 1,
        ..policy()
    };
    let mut sim = Sim::new(4, policy.clone());
    sim.update(release(2, "healthy")).unwrap();
    let first = sim.tick();
    assert!(first.place.is_empty(), "no room before an old one stops");
    assert_eq!(first.stop.len(), 1);
    sim.run_until_status(DeploymentStatus::Succeeded);
    assert_succeeded(&sim, 2);
    assert_bounds(&sim, 4, &policy, 2);
    assert!(
        sim.trace.iter().any(|s| serving(&s.state) == 3),
        "the unavailable budget is used"
    );
    sim.settle();
    assert_all_run(&sim, 4, 2);
}

#[test]
fn without_surge_two_at_a_time_with_two_unavailable() {
    let policy = UpdatePolicy {
        max_parallel: 2,
        max_surge: 0,
        max_unavailable: 2,
        ..policy()
    };
    let mut sim = Sim::new(6, policy.clone());
    sim.update(release(2, "healthy")).unwrap();
    sim.run_until_status(DeploymentStatus::Succeeded);
    assert_bounds(&sim, 6, &policy, 2);
    sim.settle();
    assert_all_run(&sim, 6, 2);
}

#[test]
fn long_drains_still_count_against_the_surge() {
    let policy = UpdatePolicy {
        max_parallel: 3,
        max_surge: 1,
        ..policy()
    };
    let mut sim = Sim::new(5, policy.clone());
    sim.drain_ticks = 8;
    sim.update(release(2, "healthy")).unwrap();
    sim.run_until_status(DeploymentStatus::Succeeded);
    assert_bounds(&sim, 5, &policy, 2);
    sim.settle();
    assert_all_run(&sim, 5, 2);
}

#[test]
fn a_full_cluster_updates_within_its_one_spare_slot() {
    // Room for exactly seven replicas of 100 MB: six plus a surge of one.
    let policy = UpdatePolicy {
        max_parallel: 2,
        max_surge: 1,
        ..policy()
    };
    let mut sim = Sim::sized(6, policy.clone(), [300, 200, 200], Some(100));
    sim.drain_ticks = 3;
    sim.update(release(2, "healthy")).unwrap();
    sim.run_until_status(DeploymentStatus::Succeeded);
    assert_bounds(&sim, 6, &policy, 2);
    sim.settle();
    assert_all_run(&sim, 6, 2);
}

#[test]
fn a_full_cluster_without_surge_waits_for_each_old_replica_to_stop() {
    // Room for exactly the six replicas: each new one needs an old one gone.
    let policy = UpdatePolicy {
        max_parallel: 1,
        max_surge: 0,
        max_unavailable: 1,
        ..policy()
    };
    let mut sim = Sim::sized(6, policy.clone(), [200, 200, 200], Some(100));
    sim.drain_ticks = 3;
    sim.update(release(2, "healthy")).unwrap();
    sim.run_until_status(DeploymentStatus::Succeeded);
    assert_bounds(&sim, 6, &policy, 2);
    sim.settle();
    assert_all_run(&sim, 6, 2);
}

#[test]
fn scaling_up_during_a_rolling_update_ends_with_every_replica_new() {
    let policy = UpdatePolicy {
        max_parallel: 2,
        max_surge: 1,
        ..policy()
    };
    let mut sim = Sim::new(4, policy.clone());
    sim.update(release(2, "healthy")).unwrap();
    sim.run_until("a replica replaced", |s| {
        s.live_allocs(SERVICE).filter(|a| a.version == 1).count() < 4
    });
    sim.apply(Command::ScaleService {
        name: SERVICE.into(),
        replicas: 6,
    })
    .unwrap();
    sim.run_until_status(DeploymentStatus::Succeeded);
    // The surge is over the new count; the four that served keep serving.
    for snap in &sim.trace {
        assert!(holding(&snap.state) <= 7, "{}", describe(&snap.state));
        assert!(serving(&snap.state) >= 4, "{}", describe(&snap.state));
    }
    sim.settle();
    assert_all_run(&sim, 6, 2);
}

#[test]
fn scaling_down_during_a_rolling_update_ends_with_every_replica_new() {
    let policy = UpdatePolicy {
        max_parallel: 2,
        max_surge: 2,
        ..policy()
    };
    let mut sim = Sim::new(6, policy.clone());
    sim.update(release(2, "healthy")).unwrap();
    sim.run_until("replicas replaced", |s| {
        s.live_allocs(SERVICE).filter(|a| a.version == 1).count() < 5
    });
    sim.apply(Command::ScaleService {
        name: SERVICE.into(),
        replicas: 3,
    })
    .unwrap();
    sim.run_until_status(DeploymentStatus::Succeeded);
    sim.settle();
    assert_all_run(&sim, 3, 2);
}

#[test]
fn a_manual_rollback_to_an_earlier_version_rolls_back() {
    let mut sim = Sim::new(3, policy());
    let v1_spec = sim.service().spec.clone();
    sim.update(release(2, "healthy")).unwrap();
    sim.run_until_status(DeploymentStatus::Succeeded);
    sim.settle();
    sim.clear_trace();
    sim.apply(Command::RollbackService {
        name: SERVICE.into(),
        to_version: Some(1),
    })
    .unwrap();
    assert_eq!(sim.service().version, 3);
    assert!(sim.service().spec.runs_same(&v1_spec));
    assert_eq!(sim.deployment().policy.strategy, Strategy::Rolling);
    assert_eq!(sim.deployment().message, "rollback to version 1");
    assert_eq!(
        sim.service().version_record(3).unwrap().message,
        "rollback to version 1"
    );
    assert_eq!(
        sim.service().version_record(2).unwrap().outcome,
        "succeeded"
    );
    sim.run_until_status(DeploymentStatus::Succeeded);
    assert_succeeded(&sim, 3);
    assert_bounds(&sim, 3, &policy(), 3);
    sim.settle();
    assert_all_run(&sim, 3, 3);
}

// ---------------------------------------------------------------------
// Failing versions
// ---------------------------------------------------------------------

/// A failed new version, rolled back automatically: checks what every
/// failure must leave behind and returns the failure reason.
fn assert_failed_and_rolled_back(
    sim: &mut Sim,
    v1: &BTreeSet<String>,
    v1_spec: &ServiceSpec,
) -> String {
    let service = sim.service();
    assert_eq!(service.version, 3, "{}", describe(&sim.state));
    assert!(service.spec.runs_same(v1_spec), "version 3 runs version 1");
    let d = sim.deployment();
    assert_eq!(d.rollback_of, 2);
    assert_eq!(d.policy.strategy, Strategy::Rolling);
    let failed = service.version_record(2).unwrap();
    assert_eq!(failed.outcome, "failed");
    let reason = failed
        .message
        .strip_suffix("; rolled back to version 1")
        .unwrap_or_else(|| panic!("outcome message: {}", failed.message))
        .to_string();
    assert_eq!(
        service.version_record(3).unwrap().message,
        "automatic rollback of version 2"
    );
    let kinds: Vec<EventKind> = sim.state.events.iter().map(|e| e.kind).collect();
    assert!(kinds.contains(&EventKind::DeploymentFailed));
    assert!(kinds.contains(&EventKind::DeploymentRolledBack));

    sim.run_until_status(DeploymentStatus::Succeeded);
    sim.settle();
    let service = sim.service();
    assert_eq!(service.stable_version, 3);
    assert_eq!(
        service.version_record(3).unwrap().message,
        "rolled back from version 2"
    );
    assert_eq!(service.version_record(2).unwrap().outcome, "failed");
    // The old replicas were never touched and still serve; the new ones are
    // all stopped.
    assert!(
        ever_stopped(sim).is_disjoint(v1),
        "an old replica was stopped"
    );
    assert_eq!(&live_ids(&sim.state), v1);
    assert!(ids_of_version(&sim.state, 2).is_empty());
    let new: BTreeSet<String> = allocs_seen(sim)
        .values()
        .filter(|a| a.version == 2)
        .map(|a| a.id.clone())
        .collect();
    assert!(!new.is_empty());
    assert!(new.is_subset(&ever_stopped(sim)));
    for snap in &sim.trace {
        assert!(
            v1.is_subset(&endpoint_ids(&snap.state)),
            "an old replica left the proxies\n{}",
            describe(&snap.state)
        );
    }
    reason
}

#[test]
fn an_unhealthy_new_version_fails_naming_the_replica_and_rolls_back() {
    let policy = policy();
    let mut sim = Sim::new(3, policy.clone());
    let v1 = live_ids(&sim.state);
    let v1_spec = sim.service().spec.clone();
    sim.update(release(2, "unhealthy")).unwrap();
    sim.run_until("version 2 fails", |s| s.services[SERVICE].version == 3);
    let bad: Vec<Allocation> = allocs_seen(&sim)
        .into_values()
        .filter(|a| a.version == 2)
        .collect();
    assert_eq!(bad.len(), 1, "max-parallel 1: one replica tried");
    let reason = assert_failed_and_rolled_back(&mut sim, &v1, &v1_spec);
    assert_eq!(
        reason,
        format!(
            "replica {} on {} unhealthy: health check failed",
            bad[0].id, bad[0].node
        )
    );
    assert_bounds(&sim, 3, &policy, 2);
}

#[test]
fn a_new_version_never_healthy_fails_at_its_healthy_deadline_and_rolls_back() {
    let policy = UpdatePolicy {
        healthy_deadline_ms: 3_000,
        max_parallel: 2,
        max_surge: 2,
        ..policy()
    };
    let mut sim = Sim::new(3, policy.clone());
    let v1 = live_ids(&sim.state);
    let v1_spec = sim.service().spec.clone();
    sim.update(release(2, "stuck")).unwrap();
    sim.run_until("version 2 fails", |s| s.services[SERVICE].version == 3);
    let failed_at = sim.now;
    let bad: Vec<Allocation> = allocs_seen(&sim)
        .into_values()
        .filter(|a| a.version == 2)
        .collect();
    assert_eq!(bad.len(), 2);
    let created = bad.iter().map(|a| a.created_ms).min().unwrap();
    assert!(
        failed_at > created + 3_000 && failed_at <= created + 3_000 + TICK_MS,
        "failed at +{} ms",
        failed_at - created
    );
    let reason = assert_failed_and_rolled_back(&mut sim, &v1, &v1_spec);
    let named: Vec<String> = bad
        .iter()
        .map(|a| {
            format!(
                "replica {} on {} not healthy within the healthy deadline",
                a.id, a.node
            )
        })
        .collect();
    assert!(named.contains(&reason), "{reason} is none of {named:?}");
    assert_bounds(&sim, 3, &policy, 2);
}

#[test]
fn without_auto_rollback_a_failed_version_just_fails() {
    let policy = UpdatePolicy {
        auto_rollback: false,
        ..policy()
    };
    let mut sim = Sim::new(3, policy.clone());
    let v1 = live_ids(&sim.state);
    sim.update(release(2, "unhealthy")).unwrap();
    sim.run_until_status(DeploymentStatus::Failed);
    let service = sim.service();
    assert_eq!(service.version, 2, "no rollback version");
    assert_eq!(service.stable_version, 1);
    assert_eq!(service.history.len(), 2);
    let record = service.version_record(2).unwrap();
    assert_eq!(record.outcome, "failed");
    assert!(record.message.contains("unhealthy"), "{}", record.message);
    assert!(
        !record.message.contains("rolled back"),
        "{}",
        record.message
    );
    let d = sim.deployment();
    assert_eq!(d.message, record.message);
    assert!(!sim
        .state
        .events
        .iter()
        .any(|e| e.kind == EventKind::DeploymentRolledBack));
    for _ in 0..20 {
        sim.tick();
    }
    assert_eq!(sim.deployment().status, DeploymentStatus::Failed);
    assert!(
        ever_stopped(&sim).is_disjoint(&v1),
        "old replicas untouched"
    );
    assert!(v1.is_subset(&endpoint_ids(&sim.state)));
    assert_eq!(serving(&sim.state), 3);
    assert_bounds(&sim, 3, &policy, 2);
}

#[test]
fn a_new_version_that_fails_midway_rolls_back_every_replaced_replica() {
    // The new version passes on the first replicas, then a later one fails:
    // the rollback must bring back all six replicas at version 1's spec.
    let policy = UpdatePolicy {
        max_parallel: 2,
        max_surge: 2,
        ..policy()
    };
    let mut sim = Sim::new(6, policy.clone());
    let v1_spec = sim.service().spec.clone();
    sim.update(release(2, "healthy")).unwrap();
    sim.run_until("two old replicas replaced", |s| {
        s.live_allocs(SERVICE).filter(|a| a.version == 1).count() <= 4
    });
    assert_eq!(sim.deployment().status, DeploymentStatus::Running);
    // A replica of version 2 turns unhealthy.
    let victim = sim
        .state
        .live_allocs(SERVICE)
        .find(|a| a.version == 2 && a.is_serving())
        .unwrap()
        .clone();
    sim.apply(Command::ReportAllocs {
        node: victim.node.clone(),
        reports: vec![AllocReport {
            id: victim.id.clone(),
            state: AllocState::Unhealthy,
            restarts: 0,
            pid: 1,
            message: "oom".into(),
            port: 0,
            health_checked: false,
            exit_code: None,
            refused: false,
        }],
    })
    .unwrap();
    sim.tick();
    let service = sim.service();
    assert_eq!(service.version, 3);
    assert_eq!(
        service.version_record(2).unwrap().message,
        format!(
            "replica {} on {} unhealthy: oom; rolled back to version 1",
            victim.id, victim.node
        )
    );
    sim.run_until_status(DeploymentStatus::Succeeded);
    sim.settle();
    let live: Vec<&Allocation> = sim.state.live_allocs(SERVICE).collect();
    assert_eq!(live.len(), 6);
    assert!(live
        .iter()
        .all(|a| a.spec.runs_same(&v1_spec) && a.is_serving()));
    // The fake agent keeps the victim unhealthy; nothing else misbehaves.
    for snap in &sim.trace {
        assert!(holding(&snap.state) <= 8, "{}", describe(&snap.state));
        assert!(serving(&snap.state) >= 5, "{}", describe(&snap.state));
    }
}

// ---------------------------------------------------------------------
// Blue-green
// ---------------------------------------------------------------------

fn blue_green() -> UpdatePolicy {
    UpdatePolicy {
        strategy: Strategy::BlueGreen,
        ..policy()
    }
}

#[test]
fn blue_green_holds_green_back_until_promotion_then_flips_in_one_entry() {
    let mut sim = Sim::new(3, blue_green());
    let blue = live_ids(&sim.state);
    sim.update(release(2, "healthy")).unwrap();
    let first = sim.tick();
    assert_eq!(first.place.len(), 3, "green placed at full count at once");
    let green = ids_of_version(&sim.state, 2);
    assert_eq!(green.len(), 3);
    assert!(green.iter().all(|id| sim.state.allocs[id].held));

    let err = sim
        .apply(Command::PromoteDeployment {
            name: SERVICE.into(),
        })
        .unwrap_err();
    assert!(
        matches!(&err, CommandError::Deployment(m) if m.contains("0 of 3 green")),
        "{err:?}"
    );
    assert!(!sim.deployment().promoted);

    sim.run_until_status(DeploymentStatus::AwaitingPromotion);
    let awaiting = sim.trace.last().unwrap();
    for id in &green {
        let a = &awaiting.state.allocs[id];
        assert!(
            is_ready(a, 1_000, awaiting.now),
            "awaiting before {id} served min-healthy time"
        );
    }
    // Not one step earlier: the previous entry did not have all green ready.
    let before = sim
        .trace
        .iter()
        .rev()
        .find(|s| deployment_of(&s.state).unwrap().status == DeploymentStatus::Running)
        .unwrap();
    assert!(green.iter().any(|id| before
        .state
        .allocs
        .get(id)
        .is_none_or(|a| !is_ready(a, 1_000, before.now))));

    // Waiting changes nothing.
    for _ in 0..10 {
        let plan = sim.tick();
        assert!(plan.place.is_empty() && plan.stop.is_empty(), "{plan:?}");
    }
    assert_eq!(sim.deployment().status, DeploymentStatus::AwaitingPromotion);
    for (i, snap) in sim.trace.iter().enumerate() {
        assert_eq!(
            endpoint_ids(&snap.state),
            blue,
            "step {i}: only blue is routed before promotion"
        );
    }
    assert!(ever_stopped(&sim).is_empty());

    sim.apply(Command::PromoteDeployment {
        name: SERVICE.into(),
    })
    .unwrap();
    assert_eq!(endpoint_ids(&sim.state), green, "flipped in one entry");
    for id in &blue {
        assert_eq!(sim.state.allocs[id].desired, DesiredState::Stop);
    }
    assert!(green.iter().all(|id| !sim.state.allocs[id].held));
    assert!(sim.deployment().promoted);
    assert_eq!(sim.deployment().status, DeploymentStatus::Running);

    sim.run_until_status(DeploymentStatus::Succeeded);
    assert_succeeded(&sim, 2);
    sim.settle();
    assert_all_run(&sim, 3, 2);
    assert_eq!(live_ids(&sim.state), green);
}

#[test]
fn blue_green_auto_promote_flips_once_green_is_ready() {
    let policy = UpdatePolicy {
        auto_promote: true,
        ..blue_green()
    };
    let mut sim = Sim::new(3, policy);
    let blue = live_ids(&sim.state);
    sim.update(release(2, "healthy")).unwrap();
    sim.run_until("promoted", |s| deployment_of(s).unwrap().promoted);
    let green = ids_of_version(&sim.state, 2);
    assert_eq!(endpoint_ids(&sim.state), green);
    assert!(!sim
        .trace
        .iter()
        .any(|s| deployment_of(&s.state).unwrap().status == DeploymentStatus::AwaitingPromotion));
    let flip = sim
        .trace
        .iter()
        .position(|s| deployment_of(&s.state).unwrap().promoted)
        .unwrap();
    for snap in &sim.trace[..flip] {
        assert_eq!(endpoint_ids(&snap.state), blue);
    }
    sim.run_until_status(DeploymentStatus::Succeeded);
    sim.settle();
    assert_all_run(&sim, 3, 2);
}

#[test]
fn blue_green_rollback_before_promotion_stops_green_and_never_touches_blue() {
    let mut sim = Sim::new(3, blue_green());
    let blue = live_ids(&sim.state);
    let v1_spec = sim.service().spec.clone();
    sim.update(release(2, "healthy")).unwrap();
    sim.run_until_status(DeploymentStatus::AwaitingPromotion);
    let green = ids_of_version(&sim.state, 2);
    sim.apply(Command::RollbackService {
        name: SERVICE.into(),
        to_version: None,
    })
    .unwrap();
    let service = sim.service();
    assert_eq!(service.version, 3);
    assert!(service.spec.runs_same(&v1_spec));
    assert_eq!(service.version_record(2).unwrap().outcome, "rolled-back");
    assert_eq!(sim.deployment().policy.strategy, Strategy::Rolling);
    assert_eq!(endpoint_ids(&sim.state), blue);

    sim.run_until_status(DeploymentStatus::Succeeded);
    sim.settle();
    assert!(ever_stopped(&sim).is_disjoint(&blue), "blue never stopped");
    assert!(green.is_subset(&ever_stopped(&sim)), "green stopped");
    for (i, snap) in sim.trace.iter().enumerate() {
        assert!(
            endpoint_ids(&snap.state).is_disjoint(&green),
            "step {i}: green routed"
        );
        assert_eq!(endpoint_ids(&snap.state), blue, "step {i}");
    }
    assert_eq!(live_ids(&sim.state), blue);
    assert_eq!(sim.service().stable_version, 3);
}

// ---------------------------------------------------------------------
// Canary
// ---------------------------------------------------------------------

fn canary(weight: Option<u32>, max_error_rate: Option<u32>) -> UpdatePolicy {
    UpdatePolicy {
        strategy: Strategy::Canary,
        canary: 1,
        canary_weight: weight,
        max_error_rate,
        ..policy()
    }
}

#[test]
fn canary_waits_for_promotion_then_rolls_to_completion() {
    let policy = canary(None, None);
    let mut sim = Sim::new(4, policy.clone());
    let v1 = live_ids(&sim.state);
    sim.update(release(2, "healthy")).unwrap();
    sim.run_until_status(DeploymentStatus::AwaitingPromotion);
    let canaries = ids_of_version(&sim.state, 2);
    assert_eq!(canaries.len(), 1, "one canary of four");
    assert_eq!(live_ids(&sim.state).len(), 5);
    for _ in 0..10 {
        let plan = sim.tick();
        assert!(plan.place.is_empty() && plan.stop.is_empty(), "{plan:?}");
    }
    assert!(ever_stopped(&sim).is_empty());
    assert!(
        canaries.is_subset(&endpoint_ids(&sim.state)),
        "a canary takes traffic"
    );
    assert!(v1.is_subset(&endpoint_ids(&sim.state)));

    sim.apply(Command::PromoteDeployment {
        name: SERVICE.into(),
    })
    .unwrap();
    assert!(sim.deployment().promoted);
    assert_eq!(sim.deployment().status, DeploymentStatus::Running);
    sim.run_until_status(DeploymentStatus::Succeeded);
    assert_succeeded(&sim, 2);
    assert_bounds(&sim, 4, &policy, 2);
    sim.settle();
    assert_all_run(&sim, 4, 2);
    assert!(
        canaries.is_subset(&live_ids(&sim.state)),
        "the canary stays"
    );
}

fn half_errors(_: &Allocation) -> Option<ReplicaTraffic> {
    Some(ReplicaTraffic {
        responses: 2 * MIN_JUDGED_RESPONSES,
        errors: MIN_JUDGED_RESPONSES,
    })
}

fn v2_half_errors(a: &Allocation) -> Option<ReplicaTraffic> {
    (a.version == 2).then(|| half_errors(a)).flatten()
}

fn v2_all_errors_too_few(a: &Allocation) -> Option<ReplicaTraffic> {
    (a.version == 2).then_some(ReplicaTraffic {
        responses: MIN_JUDGED_RESPONSES - 1,
        errors: MIN_JUDGED_RESPONSES - 1,
    })
}

fn v2_clean(a: &Allocation) -> Option<ReplicaTraffic> {
    (a.version == 2).then_some(ReplicaTraffic {
        responses: MIN_JUDGED_RESPONSES,
        errors: 0,
    })
}

#[test]
fn a_canary_over_its_error_rate_fails_and_rolls_back() {
    let mut sim = Sim::new(4, canary(None, Some(10)));
    sim.traffic_of = v2_half_errors;
    let v1 = live_ids(&sim.state);
    let v1_spec = sim.service().spec.clone();
    sim.update(release(2, "healthy")).unwrap();
    sim.run_until("the canary fails", |s| s.services[SERVICE].version == 3);
    let reason = assert_failed_and_rolled_back(&mut sim, &v1, &v1_spec);
    assert_eq!(
        reason,
        format!(
            "error rate 50.0% of {} requests to the new version is above --max-error-rate 10%",
            2 * MIN_JUDGED_RESPONSES
        )
    );
    // The rollback is not judged by the canary's gate.
    assert_eq!(sim.deployment().policy.max_error_rate, None);
}

#[test]
fn a_canary_is_not_judged_on_too_few_responses() {
    let mut sim = Sim::new(4, canary(None, Some(10)));
    sim.traffic_of = v2_all_errors_too_few;
    sim.update(release(2, "healthy")).unwrap();
    sim.run_until_status(DeploymentStatus::AwaitingPromotion);
    for _ in 0..10 {
        sim.tick();
    }
    assert_eq!(sim.deployment().status, DeploymentStatus::AwaitingPromotion);
    assert_eq!(sim.service().version, 2);
}

#[test]
fn an_auto_promoted_canary_with_an_error_gate_waits_for_judged_traffic() {
    let policy = UpdatePolicy {
        auto_promote: true,
        ..canary(None, Some(10))
    };
    let mut sim = Sim::new(4, policy);
    sim.update(release(2, "healthy")).unwrap();
    sim.run_until("the canary is ready", |s| {
        s.live_allocs(SERVICE)
            .any(|a| a.version == 2 && a.state == AllocState::Healthy)
    });
    for _ in 0..10 {
        sim.tick();
    }
    let d = sim.deployment();
    assert!(!d.promoted, "no traffic judged yet");
    assert_eq!(d.status, DeploymentStatus::Running);
    sim.traffic_of = v2_clean;
    sim.tick();
    assert!(sim.deployment().promoted);
    sim.run_until_status(DeploymentStatus::Succeeded);
    sim.settle();
    assert_all_run(&sim, 4, 2);
}

#[test]
fn canary_weight_gives_the_canaries_their_share_of_the_endpoints() {
    let mut sim = Sim::new(4, canary(Some(20), None));
    sim.update(release(2, "healthy")).unwrap();
    sim.run_until_status(DeploymentStatus::AwaitingPromotion);
    let list = endpoint_list(&sim.state);
    assert_eq!(list.len(), 5);
    let total: u32 = list.iter().map(|e| e.2).sum();
    let canary: u32 = list.iter().filter(|e| e.1 == 2).map(|e| e.2).sum();
    assert_eq!(canary * 100, total * 20, "{list:?}");
    // Old replicas share the rest equally.
    let old: BTreeSet<u32> = list.iter().filter(|e| e.1 == 1).map(|e| e.2).collect();
    assert_eq!(old.len(), 1, "{list:?}");

    sim.apply(Command::PromoteDeployment {
        name: SERVICE.into(),
    })
    .unwrap();
    assert!(
        endpoint_list(&sim.state).iter().all(|e| e.2 == 1),
        "equal weights once promoted"
    );
}

// ---------------------------------------------------------------------
// Pause
// ---------------------------------------------------------------------

#[test]
fn a_paused_deployment_places_and_stops_nothing_until_resumed() {
    let policy = UpdatePolicy {
        max_parallel: 2,
        max_surge: 2,
        ..policy()
    };
    let mut sim = Sim::new(6, policy.clone());
    sim.update(release(2, "healthy")).unwrap();
    sim.run_until("some replicas replaced", |s| {
        s.allocs_of(SERVICE)
            .any(|a| a.version == 1 && a.desired == DesiredState::Stop)
    });
    sim.apply(Command::PauseDeployment {
        name: SERVICE.into(),
        paused: true,
    })
    .unwrap();
    assert_eq!(sim.deployment().status, DeploymentStatus::Paused);
    let live = live_ids(&sim.state);
    for _ in 0..30 {
        let (placed, stopped) = touched(&sim.tick());
        assert!(
            placed.is_empty() && stopped.is_empty(),
            "{placed:?} {stopped:?}"
        );
    }
    assert_eq!(live_ids(&sim.state), live);
    assert_eq!(sim.deployment().status, DeploymentStatus::Paused);
    assert!(ids_of_version(&sim.state, 1).len() < 6);

    sim.apply(Command::PauseDeployment {
        name: SERVICE.into(),
        paused: false,
    })
    .unwrap();
    assert_eq!(sim.deployment().status, DeploymentStatus::Running);
    sim.run_until_status(DeploymentStatus::Succeeded);
    assert_bounds(&sim, 6, &policy, 2);
    sim.settle();
    assert_all_run(&sim, 6, 2);
    let kinds: Vec<EventKind> = sim.state.events.iter().map(|e| e.kind).collect();
    assert!(kinds.contains(&EventKind::DeploymentPaused));
    assert!(kinds.contains(&EventKind::DeploymentResumed));
}

#[test]
fn resuming_after_a_pause_longer_than_the_progress_deadline_continues() {
    let policy = UpdatePolicy {
        progress_deadline_ms: 30_000,
        ..policy()
    };
    let mut sim = Sim::new(3, policy);
    sim.update(release(2, "healthy")).unwrap();
    sim.tick();
    sim.apply(Command::PauseDeployment {
        name: SERVICE.into(),
        paused: true,
    })
    .unwrap();
    for _ in 0..(40_000 / TICK_MS) {
        sim.tick();
    }
    assert_eq!(sim.deployment().status, DeploymentStatus::Paused);
    sim.apply(Command::PauseDeployment {
        name: SERVICE.into(),
        paused: false,
    })
    .unwrap();
    sim.tick();
    assert_eq!(
        (sim.deployment().version, sim.deployment().status),
        (2, DeploymentStatus::Running),
        "{}",
        sim.service().version_record(2).unwrap().message
    );
    sim.run_until_status(DeploymentStatus::Succeeded);
    assert_succeeded(&sim, 2);
}

#[test]
fn promoting_a_canary_that_waited_longer_than_the_progress_deadline_continues() {
    let policy = UpdatePolicy {
        progress_deadline_ms: 30_000,
        ..canary(None, None)
    };
    let mut sim = Sim::new(4, policy);
    sim.update(release(2, "healthy")).unwrap();
    sim.run_until_status(DeploymentStatus::AwaitingPromotion);
    for _ in 0..(40_000 / TICK_MS) {
        sim.tick();
    }
    assert_eq!(sim.deployment().status, DeploymentStatus::AwaitingPromotion);
    sim.apply(Command::PromoteDeployment {
        name: SERVICE.into(),
    })
    .unwrap();
    sim.tick();
    assert_eq!(
        sim.deployment().version,
        2,
        "{}",
        sim.service().version_record(2).unwrap().message
    );
    sim.run_until_status(DeploymentStatus::Succeeded);
    assert_succeeded(&sim, 2);
}

// ---------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------

#[test]
fn an_update_that_could_never_replace_a_replica_is_refused_and_changes_nothing() {
    let mut sim = Sim::new(3, policy());
    let before = sim.state.clone();
    let err = sim
        .update(|spec| {
            release(2, "healthy")(spec);
            spec.update.max_surge = 0;
            spec.update.max_unavailable = 0;
        })
        .unwrap_err();
    assert!(
        matches!(&err, CommandError::Invalid(e) if e.to_string().contains("max-surge")),
        "{err:?}"
    );
    assert!(sim.state.same_records(&before));
    assert_eq!(sim.service().version, 1);
    assert!(sim.service().deployment.is_none());
}

#[test]
fn a_rollback_to_an_unknown_version_is_refused() {
    let mut sim = Sim::new(2, policy());
    let before = sim.state.clone();
    let err = sim
        .apply(Command::RollbackService {
            name: SERVICE.into(),
            to_version: Some(7),
        })
        .unwrap_err();
    assert!(
        matches!(&err, CommandError::Deployment(m) if m.contains("unknown version 7")),
        "{err:?}"
    );
    assert!(sim.state.same_records(&before));
    // Nothing earlier to return to either.
    let err = sim
        .apply(Command::RollbackService {
            name: SERVICE.into(),
            to_version: None,
        })
        .unwrap_err();
    assert!(matches!(err, CommandError::Deployment(_)), "{err:?}");
    assert!(sim.state.same_records(&before));
}

#[test]
fn promoting_or_pausing_what_cannot_be_is_refused() {
    let mut sim = Sim::new(2, policy());
    let promote = Command::PromoteDeployment {
        name: SERVICE.into(),
    };
    let err = sim.apply(promote.clone()).unwrap_err();
    assert!(
        matches!(&err, CommandError::Deployment(m) if m.contains("no deployment in progress")),
        "{err:?}"
    );
    let err = sim
        .apply(Command::PauseDeployment {
            name: SERVICE.into(),
            paused: true,
        })
        .unwrap_err();
    assert!(matches!(err, CommandError::Deployment(_)), "{err:?}");

    sim.update(release(2, "healthy")).unwrap();
    let before = sim.state.clone();
    let err = sim.apply(promote).unwrap_err();
    assert!(
        matches!(&err, CommandError::Deployment(m) if m.contains("rolling update")),
        "{err:?}"
    );
    assert!(sim.state.same_records(&before));
    assert!(!sim.deployment().promoted);
    let err = sim
        .apply(Command::PromoteDeployment {
            name: "nope".into(),
        })
        .unwrap_err();
    assert_eq!(err, CommandError::ServiceNotFound("nope".into()));
}

#[test]
fn a_policy_only_change_is_not_a_new_version() {
    let mut sim = Sim::new(3, policy());
    sim.update(|spec| spec.update.max_parallel = 3).unwrap();
    assert_eq!(sim.service().version, 1);
    assert!(sim.service().deployment.is_none());
    for _ in 0..5 {
        let plan = sim.tick();
        assert!(plan.is_empty(), "{plan:?}");
    }
}

#[test]
fn a_newer_update_supersedes_the_running_deployment() {
    let mut sim = Sim::new(4, policy());
    sim.update(release(2, "healthy")).unwrap();
    sim.tick();
    sim.tick();
    sim.update(release(3, "healthy")).unwrap();
    let service = sim.service();
    assert_eq!(service.version, 3);
    assert_eq!(service.version_record(2).unwrap().outcome, "superseded");
    assert_eq!(sim.deployment().from_version, 1);
    sim.run_until_status(DeploymentStatus::Succeeded);
    assert_succeeded(&sim, 3);
    sim.settle();
    assert_all_run(&sim, 4, 3);
    for snap in &sim.trace {
        assert!(holding(&snap.state) <= 5, "{}", describe(&snap.state));
        assert!(serving(&snap.state) >= 4, "{}", describe(&snap.state));
    }
}

// ---------------------------------------------------------------------
// Leader change
// ---------------------------------------------------------------------

/// Runs a rolling update of six replicas; at `cut` (a tick count), the
/// state is encoded and decoded, as a new leader would load it from a
/// snapshot. Returns the final state and the tick the deployment
/// succeeded at.
fn rolling_with_leader_change(cut: Option<u64>) -> (State, u64) {
    let policy = UpdatePolicy {
        max_parallel: 2,
        max_surge: 1,
        max_unavailable: 1,
        ..policy()
    };
    let mut sim = Sim::new(6, policy.clone());
    sim.update(release(2, "healthy")).unwrap();
    let started = sim.ticks;
    let mut succeeded = None;
    while sim.ticks < started + MAX_TICKS {
        if cut == Some(sim.ticks - started) {
            let image = sim.state.to_image();
            sim.state = State::from_image(&image).unwrap();
        }
        sim.tick();
        if succeeded.is_none() && sim.deployment().status == DeploymentStatus::Succeeded {
            succeeded = Some(sim.ticks - started);
        }
        if succeeded.is_some_and(|at| sim.ticks - started >= at + 5) {
            break;
        }
    }
    assert_bounds(&sim, 6, &policy, 2);
    (sim.state, succeeded.expect("the deployment succeeds"))
}

#[test]
fn a_leader_change_at_any_step_continues_the_deployment_identically() {
    let (expected, took) = rolling_with_leader_change(None);
    assert!(took > 3);
    for cut in 0..=took {
        let (state, at) = rolling_with_leader_change(Some(cut));
        assert_eq!(at, took, "leader change at tick {cut}");
        assert!(
            state.same_records(&expected),
            "leader change at tick {cut}: the deployment went differently\n{}\nvs\n{}",
            describe(&state),
            describe(&expected)
        );
    }
}

#[test]
fn a_leader_change_while_awaiting_promotion_keeps_the_gate() {
    let mut sim = Sim::new(3, blue_green());
    let blue = live_ids(&sim.state);
    sim.update(release(2, "healthy")).unwrap();
    sim.run_until_status(DeploymentStatus::AwaitingPromotion);
    sim.state = State::from_image(&sim.state.to_image()).unwrap();
    for _ in 0..5 {
        let plan = sim.tick();
        assert!(plan.place.is_empty() && plan.stop.is_empty(), "{plan:?}");
    }
    assert_eq!(endpoint_ids(&sim.state), blue);
    assert!(ids_of_version(&sim.state, 2)
        .iter()
        .all(|id| sim.state.allocs[id].held));
    sim.apply(Command::PromoteDeployment {
        name: SERVICE.into(),
    })
    .unwrap();
    sim.run_until_status(DeploymentStatus::Succeeded);
    sim.settle();
    assert_all_run(&sim, 3, 2);
}

#[test]
fn rolling_back_while_the_automatic_rollback_runs_changes_nothing_or_is_refused() {
    let mut sim = Sim::new(3, policy());
    sim.update(release(2, "unhealthy")).unwrap();
    sim.run_until("version 2 fails", |s| s.services[SERVICE].version == 3);
    let before = sim.state.clone();
    let result = sim.apply(Command::RollbackService {
        name: SERVICE.into(),
        to_version: None,
    });
    if result.is_ok() {
        let service = sim.service();
        assert_eq!(service.version, 3, "no new version: nothing to roll back");
        assert_eq!(
            service.version_record(3).unwrap().outcome,
            "running",
            "version 3 still rolls out"
        );
        assert!(
            sim.state.same_records(&before),
            "a rollback that does nothing records nothing; events: {:?}",
            sim.state
                .events_after(before.events.back().unwrap().seq)
                .collect::<Vec<_>>()
        );
    }
    sim.run_until_status(DeploymentStatus::Succeeded);
    assert_succeeded(&sim, 3);
}

#[test]
fn a_replicated_service_becomes_global_and_back_as_a_rolling_update() {
    let mut sim = Sim::new(2, policy());
    sim.update(|spec| spec.mode = crate::state::ServiceMode::Global)
        .unwrap();
    let version = sim.service().version;
    assert_eq!(version, 2, "a mode change is a new version");
    sim.run_until_status(DeploymentStatus::Succeeded);
    sim.settle();
    assert_all_run(&sim, 3, version);
    let nodes: BTreeSet<String> = sim
        .state
        .live_allocs(SERVICE)
        .map(|a| a.node.clone())
        .collect();
    assert_eq!(nodes.len(), 3, "one replica on every node");
    assert!(
        sim.trace.iter().all(|s| serving(&s.state) >= 1),
        "the service kept serving while it became global"
    );

    sim.clear_trace();
    sim.update(|spec| {
        spec.mode = crate::state::ServiceMode::Replicated;
        spec.replicas = 2;
    })
    .unwrap();
    let version = sim.service().version;
    sim.run_until_status(DeploymentStatus::Succeeded);
    sim.settle();
    assert_all_run(&sim, 2, version);
    assert!(
        sim.trace.iter().all(|s| serving(&s.state) >= 1),
        "the service kept serving while it became replicated"
    );
}
