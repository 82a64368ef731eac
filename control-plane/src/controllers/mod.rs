//! Leader-only control loops. Each is a pure decision over a snapshot plus
//! this thin loop that proposes its result through Raft.

pub mod reconciler;

use std::time::Duration;

use tokio::sync::watch;

use crate::consensus::Consensus;
use crate::scheduler::{self, Request};
use crate::state::{Command, Plan, State};

/// Decides the plan that brings every service to its desired replicas.
pub fn plan_cluster(state: &State, seed: u64) -> Plan {
    let mut plan = Plan::default();
    let mut requests = Vec::new();
    let mut services: Vec<&str> = state.allocs.values().map(|a| a.service.as_str()).collect();
    services.extend(state.services.keys().map(String::as_str));
    services.sort_unstable();
    services.dedup();
    for service in services {
        let desired = state.services.get(service).map(|s| s.spec.replicas);
        let allocs: Vec<_> = state.allocs_of(service).collect();
        let decision = reconciler::reconcile(desired, &allocs);
        plan.stop.extend(decision.stop);
        plan.forget.extend(decision.forget);
        if decision.place > 0 {
            requests.push(Request {
                service: service.to_string(),
                count: decision.place,
            });
        }
    }
    let (placements, _unplaced) = scheduler::schedule(state, &requests, seed);
    plan.place = placements;
    plan
}

/// Runs the reconciler on the leader whenever the state changes (and every
/// second), proposing each non-empty plan and waiting for it to apply.
pub async fn run_reconciler(consensus: Consensus, mut shutdown: watch::Receiver<bool>) {
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
        let plan = plan_cluster(&consensus.state(), rand::random());
        if plan.is_empty() {
            continue;
        }
        tracing::debug!(
            place = plan.place.len(),
            stop = plan.stop.len(),
            forget = plan.forget.len(),
            "proposing plan"
        );
        match consensus.propose(Command::ApplyPlan { plan }).await {
            Ok(outcome) => tracing::debug!(?outcome, "plan applied"),
            Err(err) => tracing::warn!(error = %err, "plan not applied"),
        }
        // Let reports arrive before deciding again, so a plan rejected on
        // apply cannot spin the loop.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
