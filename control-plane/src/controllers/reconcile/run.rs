//! The reconciler's leader loop: plans on every change (and every second)
//! and proposes each non-empty plan.

use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::plan_cluster;
use crate::consensus::Consensus;
use crate::controllers::{now_ms, TrafficSource};
use crate::state::Command;

/// Runs the reconciler on the leader whenever the state changes (and every
/// second), proposing each non-empty plan and waiting for it to apply.
pub async fn run(
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
