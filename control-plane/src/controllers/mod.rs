//! Leader-only control loops. Each is a pure decision over a snapshot
//! (`reconciler`, `liveness`, the scheduler) plus a thin loop here that
//! proposes its result through Raft.

pub mod autoscale;
pub(crate) mod deployment;
mod liveness;
mod rebalance;
mod reconciler;
pub mod stack_plan;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

use crate::consensus::{self, Consensus};
use crate::scheduler::{self, Request, Unplaced};
use crate::state::{Command, DeploymentChange, Plan, State};
pub use deployment::{ReplicaTraffic, Traffic};
pub use liveness::Heartbeats;

/// What the routing proxies measured of each replica, as this server
/// knows it now (its agents' reports plus those followers forward).
pub type TrafficSource = std::sync::Arc<dyn Fn() -> Traffic + Send + Sync>;

/// Placements per plan: bounds the size of one Raft entry and how long
/// applying it holds the state; the rest follow in the next plans.
pub const MAX_PLACEMENTS_PER_PLAN: u32 = 25_000;

/// Milliseconds since the epoch on this server's clock, as stamped into
/// proposed commands.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Decides the plan that brings every service to its desired replicas, and
/// what could not be placed.
pub fn plan_cluster(
    state: &State,
    now_ms: u64,
    seed: u64,
    traffic: &Traffic,
) -> (Plan, Vec<Unplaced>) {
    let mut plan = Plan::default();
    let mut requests = Vec::new();
    let mut budget = MAX_PLACEMENTS_PER_PLAN;
    let mut services: Vec<&str> = state.services_with_allocs().collect();
    services.extend(state.services.keys().map(String::as_str));
    services.sort_unstable();
    services.dedup();
    for service in services {
        let decision = reconciler::reconcile(state, service, now_ms, traffic);
        if let Some((version, step)) = decision.deployment {
            plan.deployments.push(DeploymentChange {
                service: service.to_string(),
                version,
                step,
            });
        }
        for (id, reason) in decision.stop {
            plan.reasons.insert(id.clone(), reason);
            plan.stop.push(id);
        }
        plan.forget.extend(decision.forget);
        plan.lost.extend(decision.lost);
        if decision.rebalanced {
            plan.rebalanced.push(service.to_string());
        }
        for mut request in decision.place {
            request.count = request.count.min(budget);
            budget -= request.count;
            if request.count > 0 {
                requests.push(request);
            }
        }
    }
    let (placements, unplaced) = scheduler::schedule(state, &requests, seed);
    plan.place = placements;
    (plan, unplaced)
}

/// Why replicas of `service` are not placed ("3 replicas unplaced: ..."),
/// or empty when nothing is missing.
pub fn explain(state: &State, service: &str) -> String {
    if let Some(waiting) = state.held_by_dependencies(service) {
        return format!("waiting for {waiting} before the first start (depends_on)");
    }
    let requests: Vec<Request> =
        reconciler::reconcile(state, service, now_ms(), &Traffic::new()).place;
    if requests.is_empty() {
        return String::new();
    }
    let (_, unplaced) = scheduler::schedule(state, &requests, 0);
    match unplaced.first() {
        Some(u) => u.summary(),
        None => {
            let missing: u32 = requests.iter().map(|r| r.count).sum();
            format!("{missing} replicas waiting to be placed")
        }
    }
}

/// Runs every controller until `shutdown`.
pub async fn run(
    consensus: Consensus,
    heartbeats: Heartbeats,
    traffic: TrafficSource,
    heartbeat_ttl: Duration,
    load: autoscale::LoadSource,
    autoscale_timings: autoscale::Timings,
    shutdown: watch::Receiver<bool>,
) {
    tokio::join!(
        run_reconciler(consensus.clone(), traffic, shutdown.clone()),
        run_liveness(
            consensus.clone(),
            heartbeats,
            heartbeat_ttl,
            shutdown.clone()
        ),
        autoscale::run_autoscaler(consensus, load, autoscale_timings, shutdown),
    );
}

/// Runs the reconciler on the leader whenever the state changes (and every
/// second), proposing each non-empty plan and waiting for it to apply.
pub async fn run_reconciler(
    consensus: Consensus,
    traffic: TrafficSource,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut status = consensus.watch_status();
    let mut every_second = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = every_second.tick() => {}
            changed = status.changed() => if changed.is_err() { return },
            _ = shutdown.changed() => return,
        }
        if !consensus.is_leader() {
            continue;
        }
        let started = Instant::now();
        let (plan, unplaced) =
            plan_cluster(&consensus.state(), now_ms(), rand::random(), &traffic());
        for u in &unplaced {
            tracing::debug!(service = %u.service, reason = %u.summary(), "replicas unplaced");
        }
        if plan.is_empty() {
            // Changes arrive in bursts: wait ten times what deciding cost
            // (at least 5 ms) before deciding again, so a large cluster is
            // not re-planned on every applied entry while a small one
            // reacts at once.
            tokio::time::sleep((started.elapsed() * 10).max(Duration::from_millis(5))).await;
            continue;
        }
        tracing::debug!(
            place = plan.place.len(),
            stop = plan.stop.len(),
            forget = plan.forget.len(),
            took = ?started.elapsed(),
            "proposing plan"
        );
        match consensus
            .propose(Command::ApplyPlan { plan }.at(now_ms()))
            .await
        {
            Ok(outcome) => tracing::debug!(?outcome, "plan applied"),
            Err(err) => tracing::warn!(error = %err, "plan not applied"),
        }
        // Let reports arrive before deciding again, so a plan rejected on
        // apply cannot spin the loop.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// On the leader, marks nodes down whose heartbeats stopped for the TTL
/// (which stops their replicas so the reconciler re-places them), and up
/// again when heartbeats resume. Proposes only as the leader itself: a
/// verdict must never be forwarded to a newer leader, whose grace period
/// it would bypass.
pub async fn run_liveness(
    consensus: Consensus,
    heartbeats: Heartbeats,
    ttl: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick =
        tokio::time::interval((ttl / 10).clamp(Duration::from_millis(100), Duration::from_secs(1)));
    let mut leader_since: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        if !consensus.is_leader() {
            leader_since = None;
            continue;
        }
        let since = *leader_since.get_or_insert_with(Instant::now);
        let beats = heartbeats.lock().map(|b| b.clone()).unwrap_or_default();
        let verdicts =
            liveness::decide(&consensus.state().nodes, &beats, Instant::now(), since, ttl);
        for (name, status) in verdicts {
            tracing::info!(node = %name, status = status.as_str(), "node liveness changed");
            let command = Command::SetNodeStatus { name, status }.at(now_ms());
            let request = consensus::Request::Command(Box::new(command));
            if let Err(err) = consensus.request_local(request).await {
                tracing::warn!(error = %err, "node status not recorded");
            }
        }
    }
}
