//! Scenario tests and seeded property tests of the scheduler.

use std::collections::BTreeMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::state::{
    Availability, Command, Constraint, NodeStatus, Plan, RuntimeKind, ServiceMode, ServiceSpec,
};

struct NodeDef {
    name: String,
    cpu: u32,
    memory: u32,
    ports: (u16, u16),
    zone: &'static str,
}

fn node(name: &str, zone: &'static str) -> NodeDef {
    NodeDef {
        name: name.into(),
        cpu: 4000,
        memory: 8192,
        ports: (20000, 20999),
        zone,
    }
}

fn spec(name: &str, replicas: u32) -> ServiceSpec {
    ServiceSpec {
        name: name.into(),
        runtime: RuntimeKind::Process,
        replicas,
        command: vec!["true".into()],
        ..Default::default()
    }
}

struct Cluster {
    state: State,
    index: u64,
}

impl Cluster {
    fn new(nodes: &[NodeDef]) -> Self {
        let mut c = Cluster {
            state: State::default(),
            index: 0,
        };
        for n in nodes {
            let mut labels = BTreeMap::new();
            if !n.zone.is_empty() {
                labels.insert("zone".to_string(), n.zone.to_string());
            }
            c.apply(Command::RegisterNode {
                process_runtime: true,
                agent_address: String::new(),
                name: n.name.clone(),
                address: "127.0.0.1".into(),
                port_range: n.ports,
                cpu_millis: n.cpu,
                memory_mb: n.memory,
                labels,
            });
        }
        c
    }

    fn apply(&mut self, command: Command) -> crate::state::Outcome {
        self.index += 1;
        self.state.apply(self.index, command).unwrap()
    }

    fn service(&mut self, spec: ServiceSpec) {
        self.apply(Command::CreateService { spec });
    }

    /// Schedules `count` replicas of `service` and commits the plan,
    /// asserting the state machine accepts every placement.
    fn place(&mut self, service: &str, count: u32, seed: u64) -> (Vec<Placement>, Vec<Unplaced>) {
        let (placed, unplaced) = schedule(&self.state, &[Request::new(service, count)], seed);
        let plan = Plan {
            place: placed.clone(),
            ..Plan::default()
        };
        let outcome = self.apply(Command::ApplyPlan { plan });
        assert_eq!(
            outcome,
            crate::state::Outcome::PlanApplied {
                placed: placed.len(),
                rejected: 0
            },
            "the state machine refused a placement of a fresh plan"
        );
        (placed, unplaced)
    }

    fn per_node(&self, service: &str) -> BTreeMap<String, usize> {
        let mut counts: BTreeMap<String, usize> =
            self.state.nodes.keys().map(|n| (n.clone(), 0)).collect();
        for a in self.state.live_allocs(service) {
            *counts.entry(a.node.clone()).or_default() += 1;
        }
        counts
    }
}

#[test]
fn nine_replicas_spread_three_per_node_across_two_zones() {
    let mut c = Cluster::new(&[node("a1", "a"), node("a2", "a"), node("b1", "b")]);
    c.service(spec("web", 9));
    let (placed, unplaced) = c.place("web", 9, 7);
    assert_eq!(placed.len(), 9);
    assert!(unplaced.is_empty());
    assert_eq!(
        c.per_node("web").into_values().collect::<Vec<_>>(),
        vec![3, 3, 3]
    );
}

#[test]
fn a_blue_green_set_spreads_by_its_own_replicas_not_the_old_ones() {
    let mut c = Cluster::new(&[node("n1", ""), node("n2", ""), node("n3", "")]);
    c.service(spec("web", 7));
    for (name, count) in [("n1", 3), ("n2", 3), ("n3", 1)] {
        let request = Request {
            service: "web".into(),
            count,
            node: Some(name.into()),
        };
        let (place, _) = schedule(&c.state, &[request], 1);
        c.apply(Command::ApplyPlan {
            plan: Plan {
                place,
                ..Plan::default()
            },
        });
    }
    let mut green = spec("web", 6);
    green.env.insert("VERSION".into(), "2".into());
    green.update.strategy = crate::state::Strategy::BlueGreen;
    c.apply(Command::UpdateService { spec: green });
    let (placed, _) = schedule(&c.state, &[Request::new("web", 6)], 5);
    let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
    for p in &placed {
        *per_node.entry(p.node.clone()).or_default() += 1;
    }
    assert_eq!(per_node.into_values().collect::<Vec<_>>(), vec![2, 2, 2]);
}

#[test]
fn spread_prefers_the_emptier_zone_when_nodes_tie() {
    let mut c = Cluster::new(&[node("a1", "a"), node("a2", "a"), node("b1", "b")]);
    c.service(spec("web", 2));
    c.place("web", 2, 3);
    let per_node = c.per_node("web");
    assert_eq!(per_node["b1"], 1, "{per_node:?}");
}

#[test]
fn a_constraint_keeps_replicas_in_its_zone_and_explains_the_rest() {
    let mut c = Cluster::new(&[node("a1", "a"), node("a2", "a"), node("b1", "b")]);
    let mut s = spec("db", 4);
    s.constraints = vec![Constraint::parse("zone==a").unwrap()];
    s.max_per_node = Some(1);
    c.service(s);
    let (placed, unplaced) = c.place("db", 4, 1);
    assert!(placed.iter().all(|p| p.node.starts_with('a')), "{placed:?}");
    assert_eq!(placed.len(), 2);
    assert_eq!(unplaced[0].count, 2);
    assert_eq!(
        unplaced[0].summary(),
        "2 replicas unplaced: 1 node filtered by constraint zone==a, 2 nodes at max-per-node 1"
    );
}

#[test]
fn exhausted_memory_is_explained_in_numbers() {
    let mut small = node("n1", "");
    small.memory = 812;
    let mut c = Cluster::new(&[small, node("n2", "b")]);
    let mut s = spec("big", 3);
    s.memory_mb = Some(512);
    s.constraints = vec![Constraint::parse("zone!=b").unwrap()];
    c.service(s);
    let (placed, unplaced) = c.place("big", 3, 1);
    assert_eq!(placed.len(), 1);
    assert_eq!(
        unplaced[0].summary(),
        "2 replicas unplaced: 1 node filtered by constraint zone!=b, 1 node exhausted memory (needs 512 MB, 300 free)"
    );
}

#[test]
fn paused_draining_and_down_nodes_take_nothing() {
    let mut c = Cluster::new(&[
        node("n1", ""),
        node("n2", ""),
        node("n3", ""),
        node("n4", ""),
    ]);
    c.apply(Command::SetNodeAvailability {
        name: "n1".into(),
        availability: Availability::Pause,
        deadline_ms: None,
    });
    c.apply(Command::SetNodeAvailability {
        name: "n2".into(),
        availability: Availability::Drain,
        deadline_ms: None,
    });
    c.apply(Command::SetNodeStatus {
        name: "n3".into(),
        status: NodeStatus::Down,
    });
    c.service(spec("web", 3));
    let (placed, unplaced) = c.place("web", 3, 1);
    assert!(placed.iter().all(|p| p.node == "n4"));
    assert_eq!(
        unplaced.first().map(Unplaced::summary),
        None,
        "n4 takes all three"
    );
}

#[test]
fn binpack_fills_one_node_before_the_next() {
    let mut c = Cluster::new(&[node("n1", ""), node("n2", ""), node("n3", "")]);
    let mut s = spec("batch", 6);
    s.placement = PlacementPolicy::Binpack;
    s.cpu_millis = Some(1000);
    c.service(s);
    let (placed, _) = c.place("batch", 6, 5);
    assert_eq!(placed.len(), 6);
    let mut counts: Vec<usize> = c.per_node("batch").into_values().collect();
    counts.sort_unstable();
    assert_eq!(counts, vec![0, 2, 4]);
}

#[test]
fn ports_are_unique_per_node_and_inside_its_range() {
    let mut tiny = node("a", "");
    tiny.ports = (20000, 20004);
    let mut c = Cluster::new(&[tiny]);
    c.service(spec("web", 7));
    let (placed, unplaced) = c.place("web", 7, 42);
    assert_eq!(placed.len(), 5);
    let ports: BTreeSet<u16> = placed.iter().map(|p| p.host_port).collect();
    assert_eq!(ports, (20000..=20004).collect());
    assert_eq!(
        unplaced[0].summary(),
        "2 replicas unplaced: 1 node out of host ports"
    );
}

#[test]
fn without_nodes_nothing_is_placed_and_the_reason_says_so() {
    let mut c = Cluster::new(&[]);
    c.service(spec("web", 2));
    let (placed, unplaced) = schedule(&c.state, &[Request::new("web", 2)], 1);
    assert!(placed.is_empty());
    assert_eq!(unplaced[0].count, 2);
    assert!(unplaced[0].reason.contains("no nodes registered"));
}

#[test]
fn a_pinned_request_places_only_on_its_node() {
    let mut c = Cluster::new(&[node("n1", ""), node("n2", "")]);
    let mut s = spec("agent", 0);
    s.mode = ServiceMode::Global;
    c.service(s);
    let request = Request {
        service: "agent".into(),
        count: 1,
        node: Some("n2".into()),
    };
    let (placed, _) = schedule(&c.state, &[request], 1);
    assert_eq!(placed.len(), 1);
    assert_eq!(placed[0].node, "n2");
}

/// A random cluster: nodes with random capacity, zones, availability and
/// status, and services with random asks, constraints and policies.
fn random_cluster(rng: &mut StdRng) -> (Cluster, Vec<String>) {
    let zones = ["a", "b", "c", ""];
    let nodes: Vec<NodeDef> = (0..rng.gen_range(1..12))
        .map(|i| NodeDef {
            name: format!("n{i}"),
            cpu: [0, 1000, 2000, 4000][rng.gen_range(0..4)],
            memory: [0, 512, 1024, 4096][rng.gen_range(0..4)],
            ports: (20000, 20000 + rng.gen_range(0..40)),
            zone: zones[rng.gen_range(0..zones.len())],
        })
        .collect();
    let mut c = Cluster::new(&nodes);
    for n in &nodes {
        match rng.gen_range(0..10) {
            0 => {
                c.apply(Command::SetNodeStatus {
                    name: n.name.clone(),
                    status: NodeStatus::Down,
                });
            }
            1 => {
                c.apply(Command::SetNodeAvailability {
                    name: n.name.clone(),
                    availability: Availability::Pause,
                    deadline_ms: None,
                });
            }
            _ => {}
        }
    }
    let mut names = Vec::new();
    for i in 0..rng.gen_range(1..5) {
        let mut s = spec(&format!("s{i}"), rng.gen_range(0..60));
        if rng.gen_bool(0.5) {
            s.cpu_millis = Some(rng.gen_range(1..800));
        }
        if rng.gen_bool(0.5) {
            s.memory_mb = Some(rng.gen_range(4..600));
        }
        if rng.gen_bool(0.3) {
            s.max_per_node = Some(rng.gen_range(1..4));
        }
        if rng.gen_bool(0.3) {
            s.placement = PlacementPolicy::Binpack;
        }
        let constraint = ["zone==a", "zone!=b", "zone in (a,c)"][rng.gen_range(0..3)];
        if rng.gen_bool(0.4) {
            s.constraints = vec![Constraint::parse(constraint).unwrap()];
        }
        names.push(s.name.clone());
        c.service(s);
    }
    (c, names)
}

#[test]
fn property_never_overcommits_and_honours_every_constraint() {
    for seed in 0..300 {
        let mut rng = StdRng::seed_from_u64(seed);
        let (mut c, services) = random_cluster(&mut rng);
        let requests: Vec<Request> = services
            .iter()
            .map(|s| Request::new(s.clone(), c.state.services[s].spec.replicas))
            .collect();
        let (placed, _) = schedule(&c.state, &requests, seed);
        let plan = Plan {
            place: placed.clone(),
            ..Plan::default()
        };
        // The state machine re-checks everything: a fresh plan is accepted whole.
        assert_eq!(
            c.apply(Command::ApplyPlan { plan }),
            crate::state::Outcome::PlanApplied {
                placed: placed.len(),
                rejected: 0
            },
            "seed {seed}"
        );
        for node in c.state.nodes.values() {
            let allocs: Vec<_> = c.state.allocs_on(&node.name).collect();
            let cpu: u64 = allocs
                .iter()
                .map(|a| u64::from(a.spec.cpu_millis.unwrap_or(0)))
                .sum();
            let memory: u64 = allocs
                .iter()
                .map(|a| u64::from(a.spec.memory_mb.unwrap_or(0)))
                .sum();
            assert!(
                node.cpu_millis == 0 || cpu <= u64::from(node.cpu_millis),
                "seed {seed}"
            );
            assert!(
                node.memory_mb == 0 || memory <= u64::from(node.memory_mb),
                "seed {seed}"
            );
            let ports: BTreeSet<u16> = allocs.iter().map(|a| a.host_port).collect();
            assert_eq!(ports.len(), allocs.len(), "seed {seed}: a port twice");
            if !allocs.is_empty() {
                assert!(node.is_eligible(), "seed {seed}: placed on {node:?}");
            }
            for a in &allocs {
                for constraint in &a.spec.constraints {
                    assert!(
                        constraint.holds(&node.labels, &node.name, &node.address),
                        "seed {seed}: {constraint} broken on {}",
                        node.name
                    );
                }
                if let Some(max) = a.spec.max_per_node {
                    let same = allocs.iter().filter(|b| b.service == a.service).count();
                    assert!(same <= max as usize, "seed {seed}");
                }
            }
        }
    }
}

#[test]
fn property_spreads_within_one_replica_on_equal_nodes() {
    for seed in 0..200 {
        let mut rng = StdRng::seed_from_u64(seed);
        let count = rng.gen_range(1..15);
        let nodes: Vec<NodeDef> = (0..count).map(|i| node(&format!("n{i}"), "")).collect();
        let mut c = Cluster::new(&nodes);
        let replicas = rng.gen_range(0..100);
        c.service(spec("web", replicas));
        // In several plans, as the reconciler would.
        let mut left = replicas;
        while left > 0 {
            let batch = rng.gen_range(1..=left);
            c.place("web", batch, rng.gen());
            left -= batch;
        }
        let counts: Vec<usize> = c.per_node("web").into_values().collect();
        let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        assert!(max - min <= 1, "seed {seed}: {counts:?}");
        assert_eq!(counts.iter().sum::<usize>(), replicas as usize);
    }
}

#[test]
fn property_the_same_snapshot_and_seed_give_the_same_plan() {
    for seed in 0..100 {
        let mut rng = StdRng::seed_from_u64(seed);
        let (c, services) = random_cluster(&mut rng);
        let requests: Vec<Request> = services
            .iter()
            .map(|s| Request::new(s.clone(), 20))
            .collect();
        assert_eq!(
            schedule(&c.state, &requests, seed),
            schedule(&c.state, &requests, seed),
            "seed {seed}"
        );
    }
}

#[test]
fn process_replicas_go_only_to_agents_that_enable_the_process_runtime() {
    let mut c = Cluster::new(&[node("n1", ""), node("n2", ""), node("n3", "")]);
    c.apply(Command::RegisterNode {
        process_runtime: false,
        agent_address: String::new(),
        name: "n2".into(),
        address: "127.0.0.1".into(),
        port_range: (20000, 20999),
        cpu_millis: 0,
        memory_mb: 0,
        labels: BTreeMap::new(),
    });
    let mut s = spec("sh", 3);
    s.runtime = crate::state::RuntimeKind::Process;
    s.max_per_node = Some(1);
    c.service(s);
    let (placed, unplaced) = c.place("sh", 3, 1);
    assert!(placed.iter().all(|p| p.node != "n2"), "{placed:?}");
    assert_eq!(
        unplaced[0].summary(),
        "1 replica unplaced: 1 node without the process runtime (start their agent with --enable-process-runtime), 2 nodes at max-per-node 1"
    );
}
fn stateful(name: &str, replicas: u32) -> ServiceSpec {
    ServiceSpec {
        name: name.into(),
        runtime: RuntimeKind::Oci,
        image: Some("127.0.0.1:5000/demo/web:v1".into()),
        replicas,
        volumes: vec![skiff_spec::Mount::parse_volume("data:/data").unwrap()],
        ..Default::default()
    }
}

fn stopped(c: &mut Cluster, id: &str, node: &str) {
    c.apply(Command::ApplyPlan {
        plan: Plan {
            stop: vec![id.to_string()],
            ..Plan::default()
        },
    });
    c.apply(Command::ReportAllocs {
        node: node.into(),
        reports: vec![crate::state::AllocReport {
            id: id.into(),
            state: crate::state::AllocState::Stopped,
            restarts: 0,
            pid: 0,
            message: String::new(),
            port: 0,
            health_checked: false,
            exit_code: None,
            refused: false,
        }],
    });
}

#[test]
fn replicas_take_the_lowest_free_slots_and_a_replacement_takes_the_freed_one() {
    let mut c = Cluster::new(&[node("n1", ""), node("n2", "")]);
    c.service(spec("web", 3));
    let (placed, _) = c.place("web", 3, 1);
    let mut slots: Vec<u32> = placed.iter().map(|p| p.slot).collect();
    slots.sort_unstable();
    assert_eq!(slots, vec![0, 1, 2]);
    let middle = placed.iter().find(|p| p.slot == 1).unwrap().clone();
    stopped(&mut c, &middle.id, &middle.node);
    let (again, _) = c.place("web", 1, 2);
    assert_eq!(
        again[0].slot, 1,
        "the replacement takes the slot it replaces"
    );
}

#[test]
fn a_replica_with_a_volume_goes_back_to_the_node_holding_it() {
    let mut c = Cluster::new(&[node("n1", ""), node("n2", ""), node("n3", "")]);
    c.service(stateful("db", 2));
    let (placed, _) = c.place("db", 2, 7);
    let first = placed.iter().find(|p| p.slot == 0).unwrap().clone();
    let mut id = first.id.clone();
    for seed in 0..10 {
        stopped(&mut c, &id, &first.node);
        let (again, unplaced) = c.place("db", 1, 100 + seed);
        assert!(unplaced.is_empty(), "{unplaced:?}");
        assert_eq!(
            (again[0].slot, again[0].node.as_str()),
            (0, first.node.as_str())
        );
        id = again[0].id.clone();
    }
}

#[test]
fn a_replica_whose_volume_node_is_down_stays_pending_and_says_where_its_volume_is() {
    let mut c = Cluster::new(&[node("n1", ""), node("n2", "")]);
    c.service(stateful("db", 1));
    let (placed, _) = c.place("db", 1, 3);
    let holder = placed[0].node.clone();
    c.apply(Command::SetNodeStatus {
        name: holder.clone(),
        status: NodeStatus::Down,
    });
    let (again, unplaced) = schedule(&c.state, &[Request::new("db", 1)], 4);
    assert!(again.is_empty(), "never placed away from its data");
    assert_eq!(
        unplaced[0].summary(),
        format!("1 replica unplaced: volume data-0 of replica slot 0 is on node {holder}, which is down")
    );
    c.apply(Command::SetNodeAvailability {
        name: holder.clone(),
        availability: Availability::Drain,
        deadline_ms: None,
    });
    c.apply(Command::SetNodeStatus {
        name: holder.clone(),
        status: NodeStatus::Ready,
    });
    let (_, unplaced) = schedule(&c.state, &[Request::new("db", 1)], 4);
    assert!(
        unplaced[0].reason.contains("which is draining"),
        "{unplaced:?}"
    );
}

#[test]
fn a_stateful_replica_keeps_its_slot_until_it_has_stopped() {
    let mut c = Cluster::new(&[node("n1", "")]);
    c.service(stateful("db", 1));
    let (placed, _) = c.place("db", 1, 3);
    c.apply(Command::ApplyPlan {
        plan: Plan {
            stop: vec![placed[0].id.clone()],
            ..Plan::default()
        },
    });
    // Still shutting down: its slot (and volume) is not free yet.
    let (again, unplaced) = schedule(&c.state, &[Request::new("db", 1)], 4);
    assert!(again.is_empty());
    assert!(
        unplaced[0]
            .reason
            .contains("waits for the one it replaces to stop"),
        "{unplaced:?}"
    );
    stopped(&mut c, &placed[0].id, "n1");
    let (again, _) = schedule(&c.state, &[Request::new("db", 1)], 4);
    assert_eq!(again[0].slot, 0);
}
