//! The scheduler end to end: real `skiff server` and separate `skiff agent`
//! processes (own data dirs, advertise addresses 127.0.0.2-4, port ranges,
//! labels zone=a/a/b) running process-runtime replicas.
//!
//! Replicas bind 0.0.0.0 on their `PORT`: the agents' port ranges never
//! overlap, and a proxy dialing advertise address + port reaches them.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use skiff_e2e::agents::{AgentCluster, AgentSpec};
use skiff_e2e::servers::ServerCluster;
use skiff_e2e::{events_at, pid_alive, skiff_ok_at, wait_until, Allocation, POLL};

const TTL: &str = "3s";
const TTL_SECS: u64 = 3;

fn specs() -> [AgentSpec<'static>; 3] {
    [
        AgentSpec {
            name: "a1",
            advertise: "127.0.0.2",
            labels: &["zone=a"],
        },
        AgentSpec {
            name: "a2",
            advertise: "127.0.0.3",
            labels: &["zone=a"],
        },
        AgentSpec {
            name: "b1",
            advertise: "127.0.0.4",
            labels: &["zone=b"],
        },
    ]
}

fn create(server: &str, name: &str, extra: &[&str]) {
    let mut args = vec!["service", "create", "--detach", name];
    args.extend_from_slice(extra);
    args.extend_from_slice(&[
        "--",
        "python3",
        "-m",
        "http.server",
        "$PORT",
        "--bind",
        "0.0.0.0",
    ]);
    skiff_ok_at(server, &args);
}

fn per_node(allocs: &[Allocation]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for a in allocs {
        *counts.entry(a.node.clone()).or_insert(0) += 1;
    }
    counts
}

fn wait_running(
    agents: &AgentCluster,
    service: &str,
    n: usize,
    timeout: Duration,
) -> Vec<Allocation> {
    let mut last = Vec::new();
    let ok = wait_until(timeout, POLL, || {
        last = agents.running(service);
        last.len() == n
    });
    assert!(
        ok,
        "{service}: {} of {n} replicas running: {:?}\n{}",
        last.len(),
        per_node(&last),
        agents.logs()
    );
    last
}

#[test]
fn replicas_spread_evenly_constraints_hold_global_services_cover_every_node_and_events_tell_it() {
    let servers = ServerCluster::start(1, &["--heartbeat-ttl", TTL]);
    let server = servers.addresses[0].clone();
    let agents = AgentCluster::start(&servers.addresses, &specs());

    create(&server, "web", &["--replicas", "9"]);
    let web = wait_running(&agents, "web", 9, Duration::from_secs(40));
    assert_eq!(
        per_node(&web).into_values().collect::<Vec<_>>(),
        vec![3, 3, 3],
        "9 replicas spread 3/3/3: {web:?}"
    );

    create(
        &server,
        "db",
        &["--replicas", "4", "--constraint", "zone==a"],
    );
    let db = wait_running(&agents, "db", 4, Duration::from_secs(40));
    assert!(
        db.iter().all(|a| a.node.starts_with('a')),
        "db left zone a: {db:?}"
    );
    assert_eq!(per_node(&db).into_values().collect::<Vec<_>>(), vec![2, 2]);

    create(&server, "logs", &["--mode", "global"]);
    let logs = wait_running(&agents, "logs", 3, Duration::from_secs(40));
    assert_eq!(per_node(&logs).len(), 3, "one per node: {logs:?}");

    // Nothing fits: the explanation is in numbers.
    create(
        &server,
        "nowhere",
        &["--replicas", "2", "--constraint", "zone==c"],
    );
    let ps = skiff_ok_at(&server, &["service", "ps", "nowhere"]);
    assert!(
        ps.contains("2 replicas unplaced: 3 nodes filtered by constraint zone==c"),
        "{ps}"
    );
    create(
        &server,
        "huge",
        &["--replicas", "1", "--memory", "100000000"],
    );
    let inspect = skiff_ok_at(&server, &["service", "inspect", "huge"]);
    assert!(
        inspect
            .contains("1 replica unplaced: 3 nodes exhausted memory (needs 100000000 MB, at most"),
        "{inspect}"
    );

    let all = events_at(&server, &[]);
    let kinds: BTreeSet<&str> = all.iter().filter_map(|e| e["kind"].as_str()).collect();
    for kind in [
        "node-up",
        "service-created",
        "replica-placed",
        "replica-started",
    ] {
        assert!(kinds.contains(kind), "no {kind} event in {kinds:?}");
    }
    assert!(all
        .iter()
        .all(|e| e["index"].as_u64() > Some(0) && e["time_ms"].as_u64() > Some(0)));
    let db_events = events_at(&server, &["--service", "db"]);
    assert!(!db_events.is_empty() && db_events.iter().all(|e| e["service"] == "db"));
    let placed = db_events
        .iter()
        .filter(|e| e["kind"] == "replica-placed")
        .count();
    assert_eq!(placed, 4);
}

#[test]
fn a_killed_agents_replicas_move_within_the_ttl_and_come_back_without_duplicates() {
    let servers = ServerCluster::start(1, &["--heartbeat-ttl", TTL]);
    let server = servers.addresses[0].clone();
    let mut agents = AgentCluster::start(&servers.addresses, &specs());
    create(&server, "web", &["--replicas", "9"]);
    wait_running(&agents, "web", 9, Duration::from_secs(40));

    agents.kill9(2);
    let killed = Instant::now();
    let mut last = Vec::new();
    let moved = wait_until(Duration::from_secs(TTL_SECS + 5), POLL, || {
        last = agents.running("web");
        last.len() == 9 && last.iter().all(|a| a.node != "b1")
    });
    assert!(
        moved,
        "after {:?}: {:?}\n{}",
        killed.elapsed(),
        per_node(&last),
        agents.logs()
    );
    assert!(
        agents.ready_nodes().iter().all(|n| n != "b1"),
        "b1 still ready"
    );
    let stale = agents.replica_pids(2);
    assert_eq!(
        stale.len(),
        3,
        "the dead agent's replicas keep running meanwhile"
    );

    agents.restart(2);
    let settled = wait_until(Duration::from_secs(30), POLL, || {
        agents.ready_nodes().len() == 3
            && agents.replica_pids(2).is_empty()
            && agents.running("web").len() == 9
    });
    assert!(
        settled,
        "b1 back: running {:?}, its processes {:?}\n{}",
        per_node(&agents.running("web")),
        agents.replica_pids(2),
        agents.logs()
    );
    // Converged: exactly nine processes for nine replicas, and it stays so.
    std::thread::sleep(Duration::from_secs(2));
    let running = agents.running("web");
    assert_eq!(running.len(), 9);
    let processes: usize = (0..3).map(|i| agents.replica_pids(i).len()).sum();
    assert_eq!(processes, 9, "duplicates: {:?}", per_node(&running));

    let node_events = events_at(&server, &["--node", "b1"]);
    let kinds: Vec<&str> = node_events
        .iter()
        .filter_map(|e| e["kind"].as_str())
        .collect();
    assert!(
        kinds.contains(&"node-down") && kinds.contains(&"replica-stopping"),
        "{kinds:?}"
    );
}

#[test]
fn draining_a_node_empties_it_without_dropping_below_desired_minus_one() {
    let servers = ServerCluster::start(1, &["--heartbeat-ttl", TTL]);
    let server = servers.addresses[0].clone();
    let agents = Arc::new(AgentCluster::start(&servers.addresses, &specs()));
    create(&server, "web", &["--replicas", "6"]);
    wait_running(&agents, "web", 6, Duration::from_secs(40));

    let stop = Arc::new(AtomicBool::new(false));
    let lowest = Arc::new(AtomicUsize::new(usize::MAX));
    let watcher = {
        let (agents, stop, lowest) = (agents.clone(), stop.clone(), lowest.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let allocs = agents.allocs("web");
                if !allocs.is_empty() {
                    let up = allocs
                        .iter()
                        .filter(|a| a.state == "running" && pid_alive(a.pid))
                        .count();
                    lowest.fetch_min(up, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };

    let out = skiff_ok_at(&server, &["node", "drain", "a1", "--deadline", "60s"]);
    assert!(out.contains("draining"), "{out}");
    let drained = wait_until(Duration::from_secs(40), POLL, || {
        let running = agents.running("web");
        running.len() == 6
            && running.iter().all(|a| a.node != "a1")
            && agents.replica_pids(0).is_empty()
    });
    stop.store(true, Ordering::Relaxed);
    watcher.join().expect("watcher");
    assert!(
        drained,
        "a1 not empty: {:?}\n{}",
        per_node(&agents.running("web")),
        agents.logs()
    );
    let lowest = lowest.load(Ordering::Relaxed);
    assert!(
        lowest >= 5,
        "only {lowest} replicas ran at some point during the drain"
    );

    let node = agents
        .nodes()
        .into_iter()
        .find(|n| n["name"] == "a1")
        .expect("a1 listed");
    assert_eq!(node["availability"], "drain");
    let kinds: Vec<String> = events_at(&server, &["--node", "a1"])
        .iter()
        .filter_map(|e| e["kind"].as_str().map(str::to_string))
        .collect();
    assert!(kinds.iter().any(|k| k == "node-draining"), "{kinds:?}");
    assert!(
        wait_until(Duration::from_secs(10), POLL, || events_at(
            &server,
            &["--node", "a1"]
        )
        .iter()
        .any(|e| e["kind"] == "node-drained")),
        "no node-drained event"
    );

    // Paused: nothing new lands; activated: it takes replicas again.
    skiff_ok_at(&server, &["node", "pause", "a2"]);
    skiff_ok_at(&server, &["service", "scale", "web", "8"]);
    let running = wait_running(&agents, "web", 8, Duration::from_secs(30));
    assert!(running.iter().all(|a| a.node == "b1" || a.node == "a2"));
    assert_eq!(
        per_node(&running).get("a2"),
        Some(&3),
        "paused a2 kept its 3, took none"
    );
    skiff_ok_at(&server, &["node", "activate", "a1"]);
    skiff_ok_at(&server, &["service", "scale", "web", "9"]);
    let running = wait_running(&agents, "web", 9, Duration::from_secs(30));
    assert_eq!(per_node(&running).get("a1"), Some(&1), "{running:?}");
}

#[test]
fn killing_the_leader_restarts_and_moves_no_replica() {
    let mut servers = ServerCluster::start(3, &["--heartbeat-ttl", TTL]);
    let agents = AgentCluster::start(&servers.addresses, &specs());
    let leader = servers.leader().expect("a leader");
    let other = servers.addresses[(leader + 1) % 3].clone();
    create(&other, "web", &["--replicas", "6"]);
    let before: BTreeSet<(String, String, u32, u32)> =
        wait_running(&agents, "web", 6, Duration::from_secs(40))
            .into_iter()
            .map(|a| (a.id, a.node, a.pid, a.restarts))
            .collect();

    servers.kill9(leader);
    let killed = Instant::now();
    assert!(
        wait_until(Duration::from_secs(15), POLL, || servers
            .leader()
            .is_some_and(|l| l != leader)),
        "no new leader"
    );
    // Past the new leader's grace period and then some, nothing changes.
    let mut last = BTreeSet::new();
    while killed.elapsed() < Duration::from_secs(TTL_SECS * 3 + 3) {
        let running = agents.running("web");
        if running.len() == 6 {
            last = running
                .into_iter()
                .map(|a| (a.id, a.node, a.pid, a.restarts))
                .collect();
            assert_eq!(
                last,
                before,
                "a replica moved or restarted\n{}",
                agents.logs()
            );
        }
        std::thread::sleep(POLL);
    }
    assert_eq!(last, before, "never saw the 6 replicas after the failover");
    assert!(before.iter().all(|(_, _, pid, _)| pid_alive(*pid)));
    assert_eq!(agents.ready_nodes().len(), 3);
    let downs = events_at(&servers.addresses[(leader + 1) % 3], &[])
        .into_iter()
        .filter(|e| e["kind"] == "node-down")
        .count();
    assert_eq!(downs, 0, "a node was marked down by the failover");
}

#[test]
fn host_processes_run_only_where_an_agent_enables_the_process_runtime() {
    let servers = ServerCluster::start(1, &["--heartbeat-ttl", TTL]);
    let server = servers.addresses[0].clone();
    let agents =
        AgentCluster::start_without_process_runtime(&servers.addresses, &specs()[..1], &[]);
    create(&server, "sh", &["--replicas", "1"]);
    let mut ps = String::new();
    let explained = wait_until(Duration::from_secs(10), POLL, || {
        ps = skiff_ok_at(&server, &["service", "ps", "sh"]);
        ps.contains(
            "1 node without the process runtime (start their agent with --enable-process-runtime)",
        )
    });
    assert!(explained, "{ps}");
    assert!(agents.allocs("sh").is_empty(), "{:?}", agents.allocs("sh"));
    assert!(agents.replica_pids(0).is_empty());
}
