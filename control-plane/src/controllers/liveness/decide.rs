//! Node liveness: which nodes to mark down (or up again) from the
//! heartbeats the leader has seen. Pure; the loop in `mod.rs` proposes the
//! verdicts.
//!
//! Heartbeats live in memory on each server, so a newly elected leader
//! starts knowing none of them. To never move workloads because of a
//! leader change, every node gets a full TTL from the moment this server
//! became leader before it can be marked down.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::state::{Node, NodeStatus};

/// The last heartbeat this server saw from each node (directly, or
/// forwarded by another server). Shared by the API and the liveness loop.
pub type Heartbeats = Arc<Mutex<HashMap<String, Instant>>>;

/// Nodes whose status should change, in name order.
pub fn decide(
    nodes: &BTreeMap<String, Node>,
    heartbeats: &HashMap<String, Instant>,
    now: Instant,
    leader_since: Instant,
    ttl: Duration,
) -> Vec<(String, NodeStatus)> {
    let mut verdicts = Vec::new();
    for node in nodes.values() {
        let beat = heartbeats.get(&node.name).copied();
        let fresh = |t: Instant| now.saturating_duration_since(t) < ttl;
        match node.status {
            NodeStatus::Ready => {
                let seen = beat.map_or(leader_since, |t| t.max(leader_since));
                if !fresh(seen) {
                    verdicts.push((node.name.clone(), NodeStatus::Down));
                }
            }
            NodeStatus::Down => {
                // Only a real heartbeat brings a node back, never the grace.
                if beat.is_some_and(|t| t > leader_since && fresh(t)) {
                    verdicts.push((node.name.clone(), NodeStatus::Ready));
                }
            }
        }
    }
    verdicts
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Availability;

    fn nodes(statuses: &[(&str, NodeStatus)]) -> BTreeMap<String, Node> {
        statuses
            .iter()
            .map(|(name, status)| {
                let node = Node {
                    name: name.to_string(),
                    address: "127.0.0.1".into(),
                    port_range: (20000, 20010),
                    status: *status,
                    register_index: 1,
                    cpu_millis: 0,
                    memory_mb: 0,
                    labels: BTreeMap::new(),
                    availability: Availability::Active,
                    drain_deadline_ms: None,
                    drained: false,
                    images: Default::default(),
                    port_failures: Default::default(),
                    process_runtime: true,
                    agent_address: String::new(),
                };
                (name.to_string(), node)
            })
            .collect()
    }

    const TTL: Duration = Duration::from_secs(10);

    #[test]
    fn a_node_silent_for_the_ttl_goes_down() {
        let t0 = Instant::now();
        let nodes = nodes(&[("n1", NodeStatus::Ready), ("n2", NodeStatus::Ready)]);
        let beats = HashMap::from([
            ("n1".to_string(), t0 + Duration::from_secs(9)),
            ("n2".to_string(), t0 + Duration::from_secs(15)),
        ]);
        let now = t0 + Duration::from_secs(20);
        assert_eq!(
            decide(&nodes, &beats, now, t0, TTL),
            vec![("n1".to_string(), NodeStatus::Down)]
        );
    }

    #[test]
    fn a_new_leader_gives_every_node_a_full_ttl_of_grace() {
        let t0 = Instant::now();
        let nodes = nodes(&[("n1", NodeStatus::Ready)]);
        let elected = t0 + Duration::from_secs(100);
        let no_beats = HashMap::new();
        let stale = HashMap::from([("n1".to_string(), t0)]);
        for beats in [&no_beats, &stale] {
            let just_before = elected + TTL - Duration::from_millis(1);
            assert!(decide(&nodes, beats, just_before, elected, TTL).is_empty());
            assert_eq!(decide(&nodes, beats, elected + TTL, elected, TTL).len(), 1);
        }
    }

    #[test]
    fn a_down_node_comes_back_only_on_a_fresh_heartbeat() {
        let t0 = Instant::now();
        let nodes = nodes(&[("n1", NodeStatus::Down)]);
        let now = t0 + Duration::from_secs(30);
        assert!(decide(&nodes, &HashMap::new(), now, t0, TTL).is_empty());
        let beats = HashMap::from([("n1".to_string(), now - Duration::from_secs(1))]);
        assert_eq!(
            decide(&nodes, &beats, now, t0, TTL),
            vec![("n1".to_string(), NodeStatus::Ready)]
        );
    }
}
