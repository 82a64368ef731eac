//! The autoscaler's leader-only loop: it keeps, per autoscaled service, the
//! proxies' recent traffic reports, the metric samples built from them and
//! the decision core's [`Memory`](super::Memory), asks
//! [`decide`](super::decide) once a second (and at once when a connection
//! waits at zero replicas), and proposes each change as a
//! `Command::Autoscale` scale event with its reason. What it keeps per
//! service is in `tracker`.
//!
//! All of it lives in memory and is dropped when this server stops being
//! the leader: a new leader rebuilds it from the reports that keep coming,
//! and the decision core never scales down before it has watched a whole
//! stabilization window.
//!
//! CPU comes from the agents' per-replica use (read from each container's
//! cgroup, sent with every traffic report): the latest percent of each live
//! replica of the service that reported within the stale limit, averaged
//! into a `CpuSample`; replicas without a report count as not ready.

use std::collections::HashMap;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::MissedTickBehavior;

use super::{autoscaled, LoadSource, Timings, Tracker};
use crate::consensus::Consensus;
use crate::controllers::now_ms;
use crate::state::Command;

/// How often the loop looks at services at zero replicas with connections
/// waiting: a held connection should wake its service in well under a
/// second.
pub const WAKE_TICK: Duration = Duration::from_millis(100);
/// How often every autoscaled service is decided.
pub const DECIDE_EVERY: Duration = Duration::from_secs(1);

/// On the leader, scales every autoscaled service to what [`decide`](super::decide) asks
/// for, until `shutdown`.
pub async fn run_autoscaler(
    consensus: Consensus,
    load: LoadSource,
    timings: Timings,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(WAKE_TICK);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut trackers: HashMap<String, Tracker> = HashMap::new();
    let mut next_round_ms = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        if !consensus.is_leader() {
            trackers.clear();
            continue;
        }
        let now = now_ms();
        let every_second = now >= next_round_ms;
        if every_second {
            next_round_ms = now + DECIDE_EVERY.as_millis() as u64;
        }
        let services = autoscaled(&consensus.state(), &timings);
        trackers.retain(|name, _| services.iter().any(|s| &s.name == name));
        for service in &services {
            let tracker = trackers.entry(service.name.clone()).or_default();
            if !every_second && service.current > 0 {
                continue;
            }
            let load = load(&service.name, service.http);
            tracker.observe(load.traffic, &service.policy, now);
            tracker.observe_cpu(&load.cpu, &service.replicas, &service.policy, now);
            let Some(decision) = tracker.consider(service, now, every_second) else {
                continue;
            };
            // The state may have moved while deciding: act only on the
            // count the decision started from, outside a deployment.
            let still = consensus
                .state()
                .services
                .get(&service.name)
                .is_some_and(|s| {
                    s.spec.replicas == decision.current
                        && s.spec.autoscale.is_some()
                        && s.active_deployment().is_none()
                });
            if !still {
                continue;
            }
            tracing::info!(
                service = %service.name,
                from = decision.current,
                to = decision.desired,
                reason = %decision.reason,
                "autoscaling"
            );
            let command = Command::Autoscale {
                name: service.name.clone(),
                replicas: decision.desired,
                reason: decision.reason.clone(),
            };
            let ok = match consensus.propose(command.at(now_ms())).await {
                Ok(_) => true,
                Err(err) => {
                    tracing::warn!(service = %service.name, error = %err, "scale event not committed");
                    false
                }
            };
            tracker.carried_out(&service.policy, &decision, ok, now);
        }
    }
}
