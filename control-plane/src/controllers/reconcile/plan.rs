//! The whole cluster's plan: each service's reconcile decision gathered
//! into one plan and placed by the scheduler, and why replicas of a service
//! are not placed (`service ps`, `stack plan`).

use super::decide;
use crate::controllers::{now_ms, Traffic, MAX_PLACEMENTS_PER_PLAN};
use crate::scheduler::{self, Request, Unplaced};
use crate::state::{DeploymentChange, Plan, State};

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
        let decision = decide::reconcile(state, service, now_ms, traffic);
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
        if let Some(reason) = decision.fail_job {
            plan.failed_jobs.push((service.to_string(), reason));
        }
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
    let requests: Vec<Request> = decide::reconcile(state, service, now_ms(), &Traffic::new()).place;
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
