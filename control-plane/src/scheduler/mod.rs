//! The scheduler: a pure function from a state snapshot and placement
//! requests to placements (a node and a host port each) and, for what
//! cannot be placed, an explanation in numbers.
//!
//! Like Nomad's, it works in two stages. Feasibility filters the nodes: the
//! node is ready and active (not paused or draining), satisfies every
//! constraint, has the CPU, memory and a free host port the replica needs,
//! and holds fewer than `max_per_node` replicas of the service. Ranking
//! orders the feasible nodes: `spread` prefers the node with the fewest
//! replicas of the service (while a deployment is active, of its new
//! version only), then the zone (label `zone`) with the fewest,
//! then the least loaded node; `binpack` prefers the most loaded node that
//! still fits, with fewer replicas of the service (anti-affinity) breaking
//! ties. Remaining ties fall to a hash of the node name and the seed, so the
//! same snapshot, requests and seed always give the same plan.
//!
//! Many replicas are placed in one call: feasible nodes sit in a heap keyed
//! by rank, and placing a replica only ever worsens the rank of other nodes
//! (spread) or changes the chosen node's own (binpack), so a popped node
//! whose recomputed rank still matches is the best, and each placement
//! costs O(log nodes). It never imports tokio, sled or tonic; the leader's
//! controller loop commits what it returns, and the state machine re-checks
//! it on apply.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, HashSet};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::state::{
    Availability, Node, NodeStatus, Placement, PlacementPolicy, ServiceSpec, State,
};

/// Asks for `count` more replicas of `service`, on `node` if given (global
/// services place one replica on each eligible node).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub service: String,
    pub count: u32,
    pub node: Option<String>,
}

impl Request {
    pub fn new(service: impl Into<String>, count: u32) -> Self {
        Request {
            service: service.into(),
            count,
            node: None,
        }
    }
}

/// Replicas of a service that could not be placed, and why, in numbers an
/// operator can act on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unplaced {
    pub service: String,
    pub count: u32,
    /// E.g. "2 nodes filtered by constraint zone==b, 1 node exhausted
    /// memory (needs 512 MB, 300 free)".
    pub reason: String,
}

impl Unplaced {
    /// "3 replicas unplaced: ..." as `service ps` shows it.
    pub fn summary(&self) -> String {
        format!(
            "{} unplaced: {}",
            plural(self.count as usize, "replica", "replicas"),
            self.reason
        )
    }
}

/// Why one node cannot take a replica now.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Filtered {
    Down,
    Paused,
    Draining,
    Constraint(String),
    /// A `process` replica on a node whose agent refuses host processes.
    NoProcessRuntime,
    Cpu {
        needs: u64,
        free: u64,
    },
    Memory {
        needs: u64,
        free: u64,
    },
    Ports,
    MaxPerNode(u32),
}

/// Reasons over many nodes, aggregated per kind for the explanation.
#[derive(Default)]
struct Reasons {
    nodes: BTreeMap<String, (usize, u64, u64)>,
    no_nodes: bool,
    missing_node: Option<String>,
    service_gone: bool,
    /// Replicas held by their volumes' node, one text each.
    volumes: Vec<String>,
}

impl Filtered {
    /// What the node is, for a replica that may only go there.
    fn describe(&self) -> String {
        match self {
            Filtered::Down => "down".into(),
            Filtered::Paused => "paused".into(),
            Filtered::Draining => "draining".into(),
            Filtered::Constraint(c) => format!("filtered by constraint {c}"),
            Filtered::NoProcessRuntime => "without the process runtime".into(),
            Filtered::Cpu { needs, free } => {
                format!("out of cpu (needs {needs} millicores, {free} free)")
            }
            Filtered::Memory { needs, free } => {
                format!("out of memory (needs {needs} MB, {free} free)")
            }
            Filtered::Ports => "out of host ports".into(),
            Filtered::MaxPerNode(max) => format!("at max-per-node {max}"),
        }
    }
}

impl Reasons {
    fn add(&mut self, why: &Filtered) {
        let (key, needs, free) = match why {
            Filtered::Down => ("0 down".to_string(), 0, 0),
            Filtered::Paused => ("1 paused".to_string(), 0, 0),
            Filtered::Draining => ("2 draining".to_string(), 0, 0),
            Filtered::Constraint(c) => (format!("3 filtered by constraint {c}"), 0, 0),
            Filtered::NoProcessRuntime => (
                "3 without the process runtime (start their agent with --enable-process-runtime)"
                    .to_string(),
                0,
                0,
            ),
            Filtered::Cpu { needs, free } => ("4 cpu".to_string(), *needs, *free),
            Filtered::Memory { needs, free } => ("5 memory".to_string(), *needs, *free),
            Filtered::Ports => ("6 out of host ports".to_string(), 0, 0),
            Filtered::MaxPerNode(max) => (format!("7 at max-per-node {max}"), 0, 0),
        };
        let entry = self.nodes.entry(key).or_insert((0, needs, 0));
        entry.0 += 1;
        entry.2 = entry.2.max(free);
    }

    fn text(&self) -> String {
        if self.service_gone {
            return "the service was removed".into();
        }
        if self.no_nodes {
            return "no nodes registered; start `skiff agent` (or use `skiff dev`)".into();
        }
        let mut parts = self.volumes.clone();
        if let Some(node) = &self.missing_node {
            parts.push(format!("node {node} is not registered"));
        }
        for (key, (count, needs, free)) in &self.nodes {
            let nodes = plural(*count, "node", "nodes");
            let free = if *count > 1 {
                format!("at most {free} free")
            } else {
                format!("{free} free")
            };
            let what = &key[2..];
            parts.push(match what {
                "cpu" => format!("{nodes} exhausted cpu (needs {needs} millicores, {free})"),
                "memory" => format!("{nodes} exhausted memory (needs {needs} MB, {free})"),
                other => format!("{nodes} {other}"),
            });
        }
        if parts.is_empty() {
            "no node can take it".into()
        } else {
            parts.join(", ")
        }
    }
}

fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// What one node offers while a plan is being built.
struct NodeView<'a> {
    node: &'a Node,
    cpu_used: u64,
    memory_used: u64,
    ports: HashSet<u16>,
    /// Used ports inside the node's range.
    ports_in_range: u32,
    /// Allocations holding resources.
    total: u64,
    /// Live replicas per service (for max-per-node).
    per_service: HashMap<String, u32>,
    /// Live replicas per service that count for spread: while a
    /// deployment is active only those of the new version, so a
    /// blue-green or canary set spreads on its own.
    spread: HashMap<String, u32>,
    tiebreak: u64,
    /// Index of the node's `zone` label among the zones (0: none).
    zone: usize,
}

impl NodeView<'_> {
    fn span(&self) -> u32 {
        let (low, high) = self.node.port_range;
        if low > high {
            0
        } else {
            u32::from(high - low) + 1
        }
    }

    /// Filters that do not change while a plan is built.
    fn static_check(&self, spec: &ServiceSpec) -> Result<(), Filtered> {
        if self.node.status == NodeStatus::Down {
            return Err(Filtered::Down);
        }
        match self.node.availability {
            Availability::Active => {}
            Availability::Pause => return Err(Filtered::Paused),
            Availability::Drain => return Err(Filtered::Draining),
        }
        let node = self.node;
        if !node.runs(spec.runtime) {
            return Err(Filtered::NoProcessRuntime);
        }
        if let Some(c) = spec
            .constraints
            .iter()
            .find(|c| !c.holds(&node.labels, &node.name, &node.address))
        {
            return Err(Filtered::Constraint(c.to_string()));
        }
        Ok(())
    }

    /// Filters that placements in this plan can make fail.
    fn dynamic_check(&self, spec: &ServiceSpec) -> Result<(), Filtered> {
        let cpu = u64::from(spec.cpu_millis.unwrap_or(0));
        let capacity = u64::from(self.node.cpu_millis);
        if capacity > 0 && self.cpu_used + cpu > capacity {
            return Err(Filtered::Cpu {
                needs: cpu,
                free: capacity.saturating_sub(self.cpu_used),
            });
        }
        let memory = u64::from(spec.memory_mb.unwrap_or(0));
        let capacity = u64::from(self.node.memory_mb);
        if capacity > 0 && self.memory_used + memory > capacity {
            return Err(Filtered::Memory {
                needs: memory,
                free: capacity.saturating_sub(self.memory_used),
            });
        }
        if self.ports_in_range >= self.span() {
            return Err(Filtered::Ports);
        }
        if let Some(max) = spec.max_per_node {
            if self.per_service.get(&spec.name).copied().unwrap_or(0) >= max {
                return Err(Filtered::MaxPerNode(max));
            }
        }
        Ok(())
    }

    /// Used fraction of the scarcer resource, in thousandths.
    fn load(&self) -> u64 {
        let fraction = |used: u64, capacity: u32| {
            if capacity == 0 {
                0
            } else {
                (used * 1000 / u64::from(capacity)).min(1000)
            }
        };
        fraction(self.cpu_used, self.node.cpu_millis)
            .max(fraction(self.memory_used, self.node.memory_mb))
    }

    fn free_port(&self, rng: &mut StdRng) -> Option<u16> {
        let span = self.span();
        if span == 0 {
            return None;
        }
        // Start at a random offset: a port freed a moment ago may still be
        // held by a replica that is shutting down.
        let start = rng.gen_range(0..span);
        let low = self.node.port_range.0;
        (0..span)
            .map(|i| low + ((start + i) % span) as u16)
            .find(|port| !self.ports.contains(port))
    }
}

/// A node's rank for one service; lower is better. For spread, the
/// second field (replicas of the service in the node's zone) is filled in
/// per zone when choosing, see [`schedule`].
type Rank = (u64, u64, u64, u64, u64);

fn rank(view: &NodeView, spec: &ServiceSpec) -> Rank {
    let on_node = u64::from(view.spread.get(&spec.name).copied().unwrap_or(0));
    match spec.placement {
        PlacementPolicy::Spread => (on_node, 0, view.load(), view.total, view.tiebreak),
        PlacementPolicy::Binpack => (
            1000 - view.load(),
            on_node,
            u64::MAX - view.total,
            view.tiebreak,
            0,
        ),
    }
}

/// SplitMix64 over FNV-1a of the name: a stable per-node tie-breaker.
fn tiebreak(seed: u64, name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let mut z = h ^ seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Places the requested replicas.
///
/// Feasible nodes wait in heaps keyed by [`rank`]: one per zone for spread
/// (a placement raises the zone's count for every node of the zone, so the
/// zone term is applied when comparing the zones' best nodes), one for
/// binpack. A placement changes only the chosen node's own key, which is
/// pushed back, so each placement costs O(zones + log nodes). Ids of new allocations and the
/// tie-breaks come from `seed`, so the same snapshot and seed always give
/// the same plan.
pub fn schedule(state: &State, requests: &[Request], seed: u64) -> (Vec<Placement>, Vec<Unplaced>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut zone_ids: HashMap<&str, usize> = HashMap::new();
    let mut views: Vec<NodeView> = state
        .nodes
        .values()
        .map(|node| {
            let zone = node.labels.get("zone").map_or(0, |z| {
                let next = zone_ids.len() + 1;
                *zone_ids.entry(z.as_str()).or_insert(next)
            });
            NodeView {
                node,
                cpu_used: 0,
                memory_used: 0,
                ports: HashSet::new(),
                ports_in_range: 0,
                total: 0,
                per_service: HashMap::new(),
                spread: HashMap::new(),
                tiebreak: tiebreak(seed, &node.name),
                zone,
            }
        })
        .collect();
    let zone_count = zone_ids.len() + 1;
    let position: HashMap<&str, usize> = views
        .iter()
        .enumerate()
        .map(|(i, v)| (v.node.name.as_str(), i))
        .collect();
    for alloc in state.allocs.values() {
        let Some(&i) = position.get(alloc.node.as_str()) else {
            continue;
        };
        let view = &mut views[i];
        if view.ports.insert(alloc.host_port) {
            let (low, high) = view.node.port_range;
            if (low..=high).contains(&alloc.host_port) {
                view.ports_in_range += 1;
            }
        }
        if alloc.holds_resources() {
            view.cpu_used += u64::from(alloc.spec.cpu_millis.unwrap_or(0));
            view.memory_used += u64::from(alloc.spec.memory_mb.unwrap_or(0));
            view.total += 1;
        }
        if alloc.is_live() {
            bump(&mut view.per_service, &alloc.service);
            let counts_for_spread = state
                .services
                .get(&alloc.service)
                .filter(|s| s.active_deployment().is_some())
                .is_none_or(|s| alloc.spec.runs_same(&s.spec));
            if counts_for_spread {
                bump(&mut view.spread, &alloc.service);
            }
        }
    }

    let mut taken_ids: BTreeSet<String> = BTreeSet::new();
    // Slots taken per service, including this plan's placements.
    let mut slots: HashMap<String, BTreeSet<u32>> = HashMap::new();
    let mut placements = Vec::new();
    let mut unplaced: BTreeMap<String, (u32, Reasons)> = BTreeMap::new();
    for request in requests {
        if request.count == 0 {
            continue;
        }
        let Some(service) = state.services.get(&request.service) else {
            let entry = unplaced.entry(request.service.clone()).or_default();
            entry.0 += request.count;
            entry.1.service_gone = true;
            continue;
        };
        let spec = &service.spec;
        let mut reasons = Reasons {
            no_nodes: views.is_empty(),
            ..Reasons::default()
        };
        let candidates: Vec<usize> = match &request.node {
            Some(name) => match position.get(name.as_str()) {
                Some(&i) => vec![i],
                None => {
                    reasons.missing_node = Some(name.clone());
                    reasons.no_nodes = false;
                    vec![]
                }
            },
            None => (0..views.len()).collect(),
        };
        let mut feasible = Vec::with_capacity(candidates.len());
        for i in candidates {
            match views[i].static_check(spec) {
                Ok(()) => feasible.push(i),
                Err(why) => reasons.add(&why),
            }
        }
        let mut zones = vec![0u64; zone_count];
        if spec.placement == PlacementPolicy::Spread {
            // Replicas of the service per zone.
            for view in &views {
                if let Some(&n) = view.spread.get(&spec.name) {
                    zones[view.zone] += u64::from(n);
                }
            }
        }
        let spread = spec.placement == PlacementPolicy::Spread;
        let group_of = |view: &NodeView| if spread { view.zone } else { 0 };
        let mut groups: Vec<BinaryHeap<Reverse<(Rank, usize)>>> =
            vec![BinaryHeap::new(); zone_count];
        for &i in &feasible {
            if views[i].dynamic_check(spec).is_ok() {
                groups[group_of(&views[i])].push(Reverse((rank(&views[i], spec), i)));
            }
        }
        let mut taken = slots
            .entry(spec.name.clone())
            .or_insert_with(|| state.taken_slots(&spec.name))
            .clone();
        let mut placed = 0;
        for _ in 0..request.count {
            // The replica's slot: the lowest free one (a replacement takes
            // the slot of the replica it replaces). A slot whose volume is
            // on a node that cannot take it now is skipped, not given away.
            let slot = (0..).find(|s| !taken.contains(s)).unwrap_or(0);
            if spec.owns_volumes() && slot >= spec.replicas {
                // Replicas that own volumes live in slots 0..replicas
                // (like a StatefulSet's ordinals): one whose predecessor
                // still stops waits for it rather than take a fresh volume.
                reasons.volumes.push(format!(
                    "a replica waits for the one it replaces to stop (slots 0-{} are held)",
                    spec.replicas.saturating_sub(1)
                ));
                continue;
            }
            taken.insert(slot);
            let chosen = match state.pinned_volume(spec, slot) {
                Some(volume) => {
                    let fits = position.get(volume.node.as_str()).map(|&i| {
                        views[i]
                            .static_check(spec)
                            .and_then(|()| views[i].dynamic_check(spec))
                            .map(|()| i)
                    });
                    let other_node = request.node.as_ref().filter(|n| **n != volume.node);
                    match (fits, other_node) {
                        (Some(Ok(i)), None) => Some(i),
                        (fits, _) => {
                            let why = match fits {
                                None => "is not registered".to_string(),
                                Some(Err(why)) => format!("is {}", why.describe()),
                                Some(Ok(_)) => "is not the requested node".to_string(),
                            };
                            reasons.volumes.push(format!(
                                "volume {} of replica slot {slot} is on node {}, which {why}",
                                volume.name, volume.node
                            ));
                            None
                        }
                    }
                }
                None => best_node(&mut groups, &views, &zones, spec),
            };
            let Some(i) = chosen else {
                continue;
            };
            let view = &mut views[i];
            let Some(port) = view.free_port(&mut rng) else {
                continue;
            };
            view.ports.insert(port);
            view.ports_in_range += 1;
            view.cpu_used += u64::from(spec.cpu_millis.unwrap_or(0));
            view.memory_used += u64::from(spec.memory_mb.unwrap_or(0));
            view.total += 1;
            bump(&mut view.per_service, &spec.name);
            bump(&mut view.spread, &spec.name);
            if spec.placement == PlacementPolicy::Spread {
                zones[view.zone] += 1;
            }
            let id = loop {
                let id = format!("{:012x}", rng.gen::<u64>() & 0xffff_ffff_ffff);
                if !state.allocs.contains_key(&id) && taken_ids.insert(id.clone()) {
                    break id;
                }
            };
            placements.push(Placement {
                id,
                service: spec.name.clone(),
                node: view.node.name.clone(),
                host_port: port,
                slot,
            });
            slots.entry(spec.name.clone()).or_default().insert(slot);
            placed += 1;
            if view.dynamic_check(spec).is_ok() {
                let g = group_of(&views[i]);
                groups[g].push(Reverse((rank(&views[i], spec), i)));
            }
        }
        if placed < request.count && placed + reasons.volumes.len() as u32 == request.count {
            // Held only by their volumes' nodes: the other nodes do not matter.
            reasons.nodes.clear();
            reasons.no_nodes = false;
            reasons.missing_node = None;
        } else if placed < request.count {
            for &i in &feasible {
                if let Err(why) = views[i].dynamic_check(spec) {
                    reasons.add(&why);
                }
            }
        }
        if placed < request.count {
            let entry = unplaced.entry(request.service.clone()).or_default();
            entry.0 += request.count - placed;
            merge(&mut entry.1, reasons);
        }
    }
    let unplaced = unplaced
        .into_iter()
        .map(|(service, (count, reasons))| Unplaced {
            service,
            count,
            reason: reasons.text(),
        })
        .collect();
    (placements, unplaced)
}

/// The best feasible node in the heaps (see [`schedule`]), or `None` when
/// no node can take another replica. Stale entries (a node whose rank
/// changed since it was pushed) are pushed back with their fresh rank.
fn best_node(
    groups: &mut [BinaryHeap<Reverse<(Rank, usize)>>],
    views: &[NodeView],
    zones: &[u64],
    spec: &ServiceSpec,
) -> Option<usize> {
    let spread = spec.placement == PlacementPolicy::Spread;
    loop {
        let (_, g) = groups
            .iter()
            .enumerate()
            .filter_map(|(g, heap)| {
                let Reverse((mut key, _)) = *heap.peek()?;
                if spread {
                    key.1 = zones[g];
                }
                Some((key, g))
            })
            .min()?;
        let Reverse((stale, i)) = groups[g].pop()?;
        if views[i].dynamic_check(spec).is_err() {
            continue;
        }
        let fresh = rank(&views[i], spec);
        if fresh != stale {
            groups[g].push(Reverse((fresh, i)));
            continue;
        }
        return Some(i);
    }
}

/// Adds one to a service's count without cloning its name when present.
fn bump(counts: &mut HashMap<String, u32>, service: &str) {
    match counts.get_mut(service) {
        Some(count) => *count += 1,
        None => {
            counts.insert(service.to_string(), 1);
        }
    }
}

fn merge(into: &mut Reasons, from: Reasons) {
    for (key, (count, needs, free)) in from.nodes {
        let entry = into.nodes.entry(key).or_insert((0, needs, 0));
        entry.0 += count;
        entry.2 = entry.2.max(free);
    }
    into.volumes.extend(from.volumes);
    into.no_nodes |= from.no_nodes;
    into.service_gone |= from.service_gone;
    if from.missing_node.is_some() {
        into.missing_node = from.missing_node;
    }
}

#[cfg(test)]
mod tests;
