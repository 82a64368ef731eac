//! The scheduler: a pure function from a state snapshot and placement
//! requests to placements, each a node and a host port.
//!
//! This first scheduler spreads replicas round-robin: each goes to the ready
//! node with the fewest replicas of its service (then fewest allocations
//! overall, then by name), on a free host port of the node's range. It never
//! imports tokio, sled or tonic; the leader's controller loop commits what it
//! returns, and the state machine re-checks it on apply.

use std::collections::{BTreeMap, BTreeSet};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::state::{NodeStatus, Placement, State};

/// Asks for `count` more replicas of `service`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub service: String,
    pub count: u32,
}

/// Replicas that could not be placed, and why, in words an operator acts on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unplaced {
    pub service: String,
    pub count: u32,
    pub reason: String,
}

/// What one node offers while a plan is being built.
struct NodeView {
    name: String,
    port_range: (u16, u16),
    used_ports: BTreeSet<u16>,
    total: usize,
    per_service: BTreeMap<String, usize>,
}

impl NodeView {
    fn free_port(&self, rng: &mut StdRng) -> Option<u16> {
        let (low, high) = self.port_range;
        if low > high {
            return None;
        }
        let span = u32::from(high - low) + 1;
        // Start at a random offset: a port freed a moment ago may still be
        // held by a replica that is shutting down.
        let start = rng.gen_range(0..span);
        (0..span)
            .map(|i| low + ((start + i) % span) as u16)
            .find(|port| !self.used_ports.contains(port))
    }
}

/// Places the requested replicas. Ids of new allocations come from `seed`,
/// so the same snapshot and seed always give the same plan.
pub fn schedule(state: &State, requests: &[Request], seed: u64) -> (Vec<Placement>, Vec<Unplaced>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut nodes: Vec<NodeView> = state
        .nodes
        .values()
        .filter(|n| n.status == NodeStatus::Ready)
        .map(|n| NodeView {
            name: n.name.clone(),
            port_range: n.port_range,
            used_ports: BTreeSet::new(),
            total: 0,
            per_service: BTreeMap::new(),
        })
        .collect();
    for alloc in state.allocs.values() {
        if let Some(node) = nodes.iter_mut().find(|n| n.name == alloc.node) {
            node.used_ports.insert(alloc.host_port);
            if alloc.is_live() {
                node.total += 1;
                *node.per_service.entry(alloc.service.clone()).or_default() += 1;
            }
        }
    }

    let mut placements = Vec::new();
    let mut unplaced = Vec::new();
    for request in requests {
        let mut missing = 0;
        for _ in 0..request.count {
            let candidate = nodes
                .iter_mut()
                .filter_map(|n| n.free_port(&mut rng).map(|port| (n, port)))
                .min_by(|(a, _), (b, _)| {
                    let count =
                        |n: &NodeView| n.per_service.get(&request.service).copied().unwrap_or(0);
                    (count(a), a.total, &a.name).cmp(&(count(b), b.total, &b.name))
                });
            let Some((node, port)) = candidate else {
                missing += 1;
                continue;
            };
            node.used_ports.insert(port);
            node.total += 1;
            *node.per_service.entry(request.service.clone()).or_default() += 1;
            placements.push(Placement {
                id: format!("{:08x}", rng.gen::<u32>()),
                service: request.service.clone(),
                node: node.name.clone(),
                host_port: port,
            });
        }
        if missing > 0 {
            unplaced.push(Unplaced {
                service: request.service.clone(),
                count: missing,
                reason: explain(state, nodes.len()),
            });
        }
    }
    (placements, unplaced)
}

fn explain(state: &State, ready: usize) -> String {
    let registered = state.nodes.len();
    if registered == 0 {
        "no nodes registered; start `skiff agent` (or use `skiff dev`)".to_string()
    } else if ready == 0 {
        format!("none of {registered} nodes is ready")
    } else {
        format!("all {ready} ready nodes have no free host port in their range")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Command, RuntimeKind, ServiceSpec};

    fn state_with_nodes(nodes: &[(&str, (u16, u16))]) -> State {
        let mut state = State::default();
        for (i, (name, range)) in nodes.iter().enumerate() {
            let command = Command::RegisterNode {
                name: name.to_string(),
                address: "127.0.0.1".into(),
                port_range: *range,
            };
            state.apply(i as u64 + 1, command).unwrap();
        }
        let spec = ServiceSpec {
            name: "web".into(),
            runtime: RuntimeKind::Process,
            replicas: 100,
            command: vec!["true".into()],
            env: Default::default(),
            workdir: None,
            ..Default::default()
        };
        state.apply(100, Command::CreateService { spec }).unwrap();
        state
    }

    fn request(count: u32) -> Vec<Request> {
        vec![Request {
            service: "web".into(),
            count,
        }]
    }

    #[test]
    fn replicas_spread_evenly_across_ready_nodes() {
        let state = state_with_nodes(&[
            ("a", (20000, 20100)),
            ("b", (20000, 20100)),
            ("c", (20000, 20100)),
        ]);
        let (placed, unplaced) = schedule(&state, &request(7), 1);
        assert!(unplaced.is_empty());
        let mut per_node = BTreeMap::new();
        for p in &placed {
            *per_node.entry(p.node.as_str()).or_insert(0) += 1;
        }
        assert_eq!(
            per_node.values().copied().collect::<Vec<_>>(),
            vec![3, 2, 2]
        );
    }

    #[test]
    fn ports_are_unique_per_node_and_inside_its_range() {
        let state = state_with_nodes(&[("a", (20000, 20004))]);
        let (placed, unplaced) = schedule(&state, &request(7), 42);
        assert_eq!(placed.len(), 5);
        let ports: BTreeSet<u16> = placed.iter().map(|p| p.host_port).collect();
        assert_eq!(ports, (20000..=20004).collect());
        assert_eq!(unplaced[0].count, 2);
        assert!(
            unplaced[0].reason.contains("no free host port"),
            "{}",
            unplaced[0].reason
        );
    }

    #[test]
    fn without_nodes_nothing_is_placed_and_the_reason_says_so() {
        let state = state_with_nodes(&[]);
        let (placed, unplaced) = schedule(&state, &request(2), 1);
        assert!(placed.is_empty());
        assert_eq!(unplaced[0].count, 2);
        assert!(unplaced[0].reason.contains("no nodes registered"));
    }

    #[test]
    fn the_same_snapshot_and_seed_give_the_same_plan() {
        let state = state_with_nodes(&[("a", (20000, 29999)), ("b", (20000, 29999))]);
        assert_eq!(
            schedule(&state, &request(4), 9),
            schedule(&state, &request(4), 9)
        );
    }
}
