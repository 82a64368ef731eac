//! Rebalancing a replicated service (`skiff service rebalance`): after a
//! node returns or is activated, replicas move from the nodes holding the
//! most to the least loaded eligible node until the counts per node differ
//! by at most one. Surge-first and drain-first like an update: one new
//! replica is placed, and only once it has served a moment is one stopped
//! on the most loaded node; then the next move. Pure: the reconciler
//! turns the step into its decision.

use std::collections::BTreeMap;

use super::deployment;
use super::reconcile::{scale_down_order, REPLACEMENT_SERVING_MS};
use crate::state::{AllocState, Allocation, State};

/// The next step of a rebalance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step<'a> {
    /// Spread: the counts per eligible node differ by at most one.
    Done,
    /// Place the surge replica on this node.
    Place(String),
    /// The surge serves: stop this replica.
    Stop(&'a Allocation),
    /// The surge does not serve yet.
    Wait,
    /// The surge failed: stop it and end the rebalance rather than try
    /// the same move forever.
    GiveUp(&'a Allocation),
}

/// Decides the next step for `service`, wanting `desired` replicas, whose
/// live replicas (none on a draining node) are `kept`: `desired` of them
/// between moves, one more while a move is in flight.
pub fn decide<'a>(
    state: &State,
    service: &str,
    desired: usize,
    kept: &[&'a Allocation],
    now_ms: u64,
) -> Step<'a> {
    let Some(spec) = state.services.get(service).map(|s| &s.spec) else {
        return Step::Done;
    };
    // Replicas per eligible node; those on other nodes (paused, down)
    // neither move nor count.
    let mut on_node: BTreeMap<&str, usize> = state
        .nodes
        .values()
        .filter(|n| n.can_run(spec))
        .map(|n| (n.name.as_str(), 0))
        .collect();
    let mut movable: Vec<&'a Allocation> = Vec::new();
    for &alloc in kept {
        if let Some(count) = on_node.get_mut(alloc.node.as_str()) {
            *count += 1;
            movable.push(alloc);
        }
    }
    if kept.len() > desired {
        let Some(surge) = kept.iter().max_by_key(|a| a.create_index) else {
            return Step::Done;
        };
        if matches!(
            surge.state,
            AllocState::Failed | AllocState::Restarting | AllocState::Unhealthy
        ) {
            return Step::GiveUp(surge);
        }
        if !deployment::is_ready(surge, REPLACEMENT_SERVING_MS, now_ms) {
            return Step::Wait;
        }
        return match scale_down_order(state, &movable, 1).first() {
            Some(alloc) => Step::Stop(alloc),
            None => Step::Done,
        };
    }
    let most = on_node.values().copied().max().unwrap_or(0);
    let least = on_node
        .iter()
        .map(|(&node, &count)| (count, node_total(state, node), node))
        .min();
    match least {
        Some((count, _, node)) if most > count + 1 => Step::Place(node.to_string()),
        _ => Step::Done,
    }
}

/// Allocations a node holds: how loaded it is, for choosing among the
/// nodes with the fewest replicas of the service.
fn node_total(state: &State, node: &str) -> usize {
    state
        .allocs_on(node)
        .filter(|a| a.holds_resources())
        .count()
}
