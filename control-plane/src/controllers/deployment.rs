//! The deployment decision for one replicated service with an active
//! deployment: which new replicas to place, which old ones to stop, and
//! which step the deployment takes. Pure: it reads the committed state (and
//! the routing proxies' traffic counts for canary gating), so a new leader
//! continues a deployment exactly where the old one left it.
//!
//! Replacement is surge-first and drain-first: an old replica is stopped
//! only when enough new ones have served for `min_healthy_ms` to keep the
//! service at its desired count minus `max_unavailable`. Stopping it takes
//! it out of every routing proxy in the same committed entry, and its agent
//! lets open connections drain before SIGTERM, so even a one-replica
//! service updates with no failed request.

use std::collections::BTreeMap;

use crate::state::{
    AllocState, Allocation, Deployment, DeploymentStatus, DeploymentStep, Strategy,
};

/// What the routing proxies measured of one replica, summed over nodes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReplicaTraffic {
    pub responses: u64,
    /// HTTP 5xx responses plus failed dials.
    pub errors: u64,
}

/// Traffic by allocation id.
pub type Traffic = BTreeMap<String, ReplicaTraffic>;

/// Requests a canary must have answered before its error rate is judged
/// (and, when gated, before it may promote itself).
pub const MIN_JUDGED_RESPONSES: u64 = 20;

/// What the deployment does now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rollout {
    /// New replicas to place (they get the service's current spec).
    pub place: u32,
    /// Live allocations to stop, with why.
    pub stop: Vec<(String, String)>,
    pub step: Option<DeploymentStep>,
}

/// The live replicas of a service, split by whether they run the current
/// spec.
pub struct Replicas<'a> {
    pub current: Vec<&'a Allocation>,
    pub old: Vec<&'a Allocation>,
    /// Allocations still holding resources (live, or stopping), counted
    /// against the surge.
    pub holding: usize,
    /// Every node that may run the new version has its image stored.
    pub prepulled: bool,
}

/// Decides the next step of `deployment` for a service wanting `desired`
/// replicas.
pub fn rollout(
    deployment: &Deployment,
    desired: usize,
    replicas: &Replicas,
    traffic: &Traffic,
    now_ms: u64,
) -> Rollout {
    let policy = &deployment.policy;
    let mut out = Rollout::default();
    if let Some(reason) = failure(deployment, replicas, traffic, now_ms) {
        out.step = Some(DeploymentStep::Fail(reason));
        return out;
    }
    if deployment.status == DeploymentStatus::Paused {
        return out;
    }
    let ready = |a: &&&Allocation| is_ready(a, policy.min_healthy_ms, now_ms);
    let current_ready = replicas.current.iter().filter(ready).count();
    match policy.strategy {
        Strategy::BlueGreen if !deployment.promoted => {
            out.place = desired.saturating_sub(replicas.current.len()) as u32;
            if current_ready >= desired {
                out.step = Some(if policy.auto_promote {
                    DeploymentStep::Promote
                } else {
                    DeploymentStep::AwaitPromotion
                });
            }
            return keep_pending_step(deployment, out);
        }
        Strategy::Canary if !deployment.promoted => {
            let canaries = (policy.canary as usize).min(desired).max(1);
            out.place = canaries.saturating_sub(replicas.current.len()) as u32;
            if current_ready >= canaries {
                let judged = policy.max_error_rate.is_none()
                    || canary_traffic(replicas, traffic).responses >= MIN_JUDGED_RESPONSES;
                out.step = if policy.auto_promote && judged {
                    Some(DeploymentStep::Promote)
                } else if policy.auto_promote {
                    None
                } else {
                    Some(DeploymentStep::AwaitPromotion)
                };
            }
            return keep_pending_step(deployment, out);
        }
        _ => {}
    }
    rolling(
        deployment,
        desired,
        replicas,
        current_ready,
        now_ms,
        &mut out,
    );
    out
}

/// An await-promotion step is only news while the deployment still runs.
fn keep_pending_step(deployment: &Deployment, mut out: Rollout) -> Rollout {
    if out.step == Some(DeploymentStep::AwaitPromotion)
        && deployment.status != DeploymentStatus::Running
    {
        out.step = None;
    }
    out
}

/// Surge-first rolling replacement (also blue-green after promotion and
/// canary after promotion).
fn rolling(
    deployment: &Deployment,
    desired: usize,
    replicas: &Replicas,
    current_ready: usize,
    now_ms: u64,
    out: &mut Rollout,
) {
    let policy = &deployment.policy;
    let current = replicas.current.len();
    // Too many current replicas (scaled down mid-update): the worst go.
    if current > desired {
        let mut extra: Vec<&&Allocation> = replicas.current.iter().collect();
        extra.sort_by_key(|a| (a.is_serving(), std::cmp::Reverse(a.create_index)));
        for alloc in extra.into_iter().take(current - desired) {
            out.stop.push((alloc.id.clone(), "scaled down".to_string()));
        }
    }
    let in_flight = current.saturating_sub(current_ready);
    let room = (desired + policy.max_surge as usize).saturating_sub(replicas.holding);
    let missing = desired.saturating_sub(current);
    let parallel = (policy.max_parallel as usize).saturating_sub(in_flight);
    // With no surge allowed, old replicas make room first (below).
    out.place = missing.min(room).min(parallel) as u32;

    // No old replica stops before the new image is on every node that may
    // run it (pulled ahead from the deployment's start), unless pulling
    // takes longer than a replica may take to become healthy: a node that
    // cannot pull must not hold the deployment forever.
    let pull_wait_over =
        now_ms > deployment.started_ms + u64::from(deployment.policy.healthy_deadline_ms);
    if !replicas.prepulled && !pull_wait_over {
        return;
    }
    // Old replicas: those not serving go at once (they carry no traffic);
    // serving ones only while enough others serve.
    let mut old: Vec<&&Allocation> = replicas.old.iter().collect();
    old.sort_by_key(|a| (a.is_serving(), a.create_index));
    let old_serving = old.iter().filter(|a| a.is_serving()).count();
    let min_available = desired.saturating_sub(policy.max_unavailable as usize);
    let mut spare = (current_ready + old_serving).saturating_sub(min_available);
    let mut budget = if policy.max_surge == 0 {
        // Without a surge, stopping an old replica is what makes room for
        // a new one: at most max_parallel replacements in flight, counting
        // old replicas still shutting down.
        let stopping = replicas.holding.saturating_sub(current + old.len());
        (policy.max_parallel as usize).saturating_sub(in_flight + stopping)
    } else {
        // Never stop more old replicas than new ones replace.
        (current + out.place as usize + old.len()).saturating_sub(desired)
    };
    for alloc in old {
        if budget == 0 {
            break;
        }
        if alloc.is_serving() {
            if spare == 0 {
                continue;
            }
            spare -= 1;
        }
        budget -= 1;
        let reason = format!("replaced by version {}", deployment.version);
        out.stop.push((alloc.id.clone(), reason));
    }
    if current_ready >= desired && replicas.old.is_empty() && current == desired {
        out.step = Some(DeploymentStep::Succeed);
    }
}

/// The deployment as it runs for replicas that own volumes: stop-first,
/// never surged (two replicas must never share a data directory), one
/// replica unavailable at a time at least. The old replica's slot is free
/// only once it has stopped, so its replacement (which takes the slot and
/// the volume) starts after it.
pub fn stop_first(deployment: &Deployment) -> Deployment {
    let mut d = deployment.clone();
    d.policy.max_surge = 0;
    d.policy.max_unavailable = d.policy.max_unavailable.max(1);
    d
}

/// Has served for at least `min_healthy_ms`.
pub fn is_ready(alloc: &Allocation, min_healthy_ms: u32, now_ms: u64) -> bool {
    alloc.is_serving()
        && alloc.serving_since_ms > 0
        && now_ms >= alloc.serving_since_ms + u64::from(min_healthy_ms)
}

fn canary_traffic(replicas: &Replicas, traffic: &Traffic) -> ReplicaTraffic {
    replicas
        .current
        .iter()
        .filter_map(|a| traffic.get(&a.id))
        .fold(ReplicaTraffic::default(), |sum, t| ReplicaTraffic {
            responses: sum.responses + t.responses,
            errors: sum.errors + t.errors,
        })
}

/// Why the deployment fails now, if it does: a new replica that failed,
/// turned unhealthy, exited before serving or missed its healthy deadline;
/// canaries over their error budget; the progress deadline.
fn failure(
    deployment: &Deployment,
    replicas: &Replicas,
    traffic: &Traffic,
    now_ms: u64,
) -> Option<String> {
    let policy = &deployment.policy;
    for alloc in replicas
        .current
        .iter()
        .filter(|a| a.version == deployment.version)
    {
        let what = match alloc.state {
            AllocState::Failed => Some("failed"),
            AllocState::Unhealthy => Some("unhealthy"),
            AllocState::Restarting => Some("exited"),
            _ if alloc.restarts > 0 && !alloc.is_serving() => Some("restarted"),
            _ if !alloc.is_serving()
                && alloc.created_ms > 0
                && now_ms > alloc.created_ms + u64::from(policy.healthy_deadline_ms) =>
            {
                Some("not healthy within the healthy deadline")
            }
            _ => None,
        };
        if let Some(what) = what {
            let detail = if alloc.message.is_empty() {
                String::new()
            } else {
                format!(": {}", alloc.message)
            };
            return Some(format!(
                "replica {} on {} {what}{detail}",
                alloc.id, alloc.node
            ));
        }
    }
    if let Some(max) = policy.max_error_rate {
        let canary = canary_traffic(replicas, traffic);
        if canary.responses >= MIN_JUDGED_RESPONSES
            && canary.errors * 100 > u64::from(max) * canary.responses
        {
            return Some(format!(
                "error rate {:.1}% of {} requests to the new version is above --max-error-rate {max}%",
                canary.errors as f64 * 100.0 / canary.responses as f64,
                canary.responses
            ));
        }
    }
    if deployment.status != DeploymentStatus::AwaitingPromotion
        && deployment.status != DeploymentStatus::Paused
        && now_ms
            > deployment.started_ms.max(deployment.progress_since_ms)
                + u64::from(policy.progress_deadline_ms)
    {
        return Some(format!(
            "not finished within the progress deadline of {} s",
            policy.progress_deadline_ms / 1000
        ));
    }
    None
}

#[cfg(test)]
#[path = "deployment_tests.rs"]
mod tests;
