//! An operator's day on three servers and three agents (issue #20): real
//! `skiff server` and `skiff agent` processes (advertise addresses
//! 127.0.0.2-4), process-runtime replicas, one sequence through the
//! failures found when the cluster was first run by hand:
//!
//! 1. a published port another program holds on one node (B1);
//! 2. an agent killed: its replicas show unknown, never healthy (B5);
//! 3. the leader killed: every server answers with the cluster's view
//!    (B3) and shows the dead member unreachable (B4);
//! 4. the agent back: no replica already replaced is logged as started
//!    again (B7);
//! 5. scale up and down, drain, activate and rebalance keep the spread (B6).
//!
//! The closed-pipe CLI (B2) is t11's, the scale-from-zero wait (B9) t70's,
//! and the local-cluster script's stop (B8) t25's.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use serde_json::Value;
use skiff_e2e::agents::{on_loopback, AgentCluster, AgentSpec};
use skiff_e2e::servers::ServerCluster;
use skiff_e2e::{
    assert_cli_error_after_progress, events_at, free_port, http_get_at, json_at, skiff_at,
    skiff_ok_at, wait_until, Allocation, POLL,
};

const TTL: &str = "3s";

fn specs() -> [AgentSpec<'static>; 3] {
    on_loopback(["a1", "a2", "b1"])
}

fn per_node(allocs: &[Allocation]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for a in allocs {
        *counts.entry(a.node.clone()).or_insert(0) += 1;
    }
    counts
}

fn counts(pairs: &[(&str, usize)]) -> BTreeMap<String, usize> {
    pairs.iter().map(|(n, c)| (n.to_string(), *c)).collect()
}

/// `web`'s replicas wanted and serving (healthy: the service has a check).
fn serving(agents: &AgentCluster) -> Vec<Allocation> {
    agents
        .allocs("web")
        .into_iter()
        .filter(|a| a.desired == "run" && a.state == "healthy" && a.pid != 0)
        .collect()
}

/// Waits until `web`'s serving replicas are spread as `want` per node.
fn wait_spread(agents: &AgentCluster, want: &BTreeMap<String, usize>, what: &str) {
    let mut last = BTreeMap::new();
    let ok = wait_until(Duration::from_secs(40), POLL, || {
        last = per_node(&serving(agents));
        &last == want
    });
    assert!(ok, "{what}: {last:?}, want {want:?}\n{}", agents.logs());
}

#[test]
fn an_operators_day_on_three_servers_and_three_agents() {
    let mut servers = ServerCluster::start(3, &["--heartbeat-ttl", TTL]);
    let mut agents = AgentCluster::start(&servers.addresses, &specs());
    let first = servers.addresses[0].clone();

    // 1. B1: another program holds the published port on a2's address.
    let publish = free_port();
    let blocker = TcpListener::bind(("127.0.0.3", publish)).expect("hold the port on a2");
    let publish_arg = publish.to_string();
    let create = [
        "service",
        "create",
        "web",
        "--replicas",
        "3",
        "--publish",
        &publish_arg,
        "--protocol",
        "http",
        "--health-http",
        "/",
        "--",
        "python3",
        "-m",
        "http.server",
        "$PORT",
        "--bind",
        "0.0.0.0",
    ];
    let out = skiff_at(&first, &create);
    let port_words = format!("published port {publish} cannot be served on a2");
    assert_cli_error_after_progress(&create, &out, &[&port_words, "127.0.0.3"]);
    for server in &servers.addresses {
        let inspect = skiff_ok_at(server, &["service", "inspect", "web"]);
        assert!(
            inspect.contains("on every node except a2 (cannot listen on 127.0.0.3"),
            "{server}: {inspect}"
        );
        let ps = skiff_ok_at(server, &["service", "ps", "web"]);
        assert!(
            ps.contains(&format!("node a2 does not serve published port {publish}")),
            "{server}: {ps}"
        );
    }
    let unavailable = events_at(&first, &["--service", "web"])
        .into_iter()
        .filter(|e| e["kind"] == "port-unavailable")
        .collect::<Vec<_>>();
    assert_eq!(unavailable.len(), 1, "{unavailable:?}");
    assert_eq!(unavailable[0]["node"], "a2");

    drop(blocker);
    let a2_proxy: SocketAddr = format!("127.0.0.3:{publish}").parse().unwrap();
    let served = wait_until(Duration::from_secs(15), POLL, || {
        http_get_at(a2_proxy, "/").is_ok_and(|r| r.status == 200)
    });
    assert!(served, "a2's proxy never took the port\n{}", agents.logs());
    let recovered = wait_until(Duration::from_secs(10), POLL, || {
        events_at(&first, &["--service", "web"])
            .iter()
            .any(|e| e["kind"] == "port-listening" && e["node"] == "a2")
    });
    assert!(recovered, "no port-listening event");
    let inspect = skiff_ok_at(&first, &["service", "inspect", "web"]);
    assert!(inspect.contains("on every node\n"), "{inspect}");
    wait_spread(
        &agents,
        &counts(&[("a1", 1), ("a2", 1), ("b1", 1)]),
        "created",
    );

    // 2. B5: b1's agent dies; its replica is unknown, then replaced.
    let before_kill = agents.allocs("web");
    let b1_alloc = before_kill
        .iter()
        .find(|a| a.node == "b1" && a.desired == "run")
        .expect("a replica on b1")
        .id
        .clone();
    agents.kill9(2);
    let mut seen_states = Vec::new();
    let replaced = wait_until(Duration::from_secs(20), POLL, || {
        let allocs = agents.allocs("web");
        if let Some(a) = allocs.iter().find(|a| a.id == b1_alloc) {
            seen_states.push(a.state.clone());
        }
        allocs
            .iter()
            .filter(|a| a.desired == "run" && a.state == "healthy")
            .count()
            == 3
            && allocs.iter().all(|a| a.node != "b1" || a.desired == "stop")
    });
    assert!(replaced, "b1's replica not replaced\n{}", agents.logs());
    let down_states: Vec<&String> = seen_states
        .iter()
        .skip_while(|s| *s == "healthy" || *s == "running")
        .collect();
    assert!(
        !down_states.is_empty() && down_states.iter().all(|s| *s == "unknown" || *s == "lost"),
        "b1's replica after its node went down: {seen_states:?}"
    );
    let last = agents
        .allocs("web")
        .into_iter()
        .find(|a| a.id == b1_alloc)
        .expect("still listed with --all");
    assert!(last.state == "unknown" || last.state == "lost", "{last:?}");

    // 3. B3 and B4: the leader dies; the others show it unreachable, and
    // once it is back every server shows the leader's heartbeats and
    // replica usage.
    let leader = servers.leader().expect("a leader");
    servers.kill9(leader);
    let dead = format!("s{}", leader + 1);
    let follower = servers.addresses[(leader + 1) % 3].clone();
    let unreachable = wait_until(Duration::from_secs(15), POLL, || {
        json_at(&follower, &["cluster", "status"]).is_some_and(|s| {
            s["members"].as_array().is_some_and(|m| {
                m.iter()
                    .any(|m| m["name"] == dead.as_str() && m["reachable"] == "no")
            })
        })
    });
    assert!(
        unreachable,
        "{follower}: {:?}",
        json_at(&follower, &["cluster", "status"])
    );
    servers.restart(leader);
    for server in &servers.addresses {
        let fresh = wait_until(Duration::from_secs(20), POLL, || {
            let Some(nodes) = json_at(server, &["node", "ls"]) else {
                return false;
            };
            nodes.as_array().is_some_and(|nodes| {
                nodes
                    .iter()
                    .filter(|n| n["status"] == "ready")
                    .all(|n| n["last_heartbeat_secs"].as_u64().is_some_and(|s| s <= 3))
                    && nodes.iter().filter(|n| n["status"] == "ready").count() == 2
            })
        });
        assert!(fresh, "{server}: {:?}", json_at(server, &["node", "ls"]));
        let usage = wait_until(Duration::from_secs(15), POLL, || {
            json_at(server, &["service", "inspect", "web"])
                .is_some_and(|s| s["usage"].as_array().is_some_and(|u| !u.is_empty()))
        });
        assert!(usage, "{server} shows no replica usage");
    }

    // 4. B7: b1's agent comes back; its replaced replica is stopped and
    // never logged as started or healthy again.
    let last_seq = events_at(&first, &[])
        .iter()
        .filter_map(|e| e["seq"].as_u64())
        .max()
        .unwrap_or(0);
    agents.restart(2);
    let settled = wait_until(Duration::from_secs(30), POLL, || {
        agents.ready_nodes().len() == 3 && agents.replica_pids(2).is_empty()
    });
    assert!(settled, "b1's old replica still runs\n{}", agents.logs());
    let misleading: Vec<Value> = events_at(&first, &["--node", "b1"])
        .into_iter()
        .filter(|e| e["seq"].as_u64().unwrap_or(0) > last_seq)
        .filter(|e| e["alloc"] == b1_alloc.as_str())
        .filter(|e| e["kind"] == "replica-started" || e["kind"] == "replica-healthy")
        .collect();
    assert!(misleading.is_empty(), "{misleading:?}");

    // 5. B6: the spread holds through scaling, a drain and a rebalance.
    skiff_ok_at(&first, &["service", "scale", "web", "6"]);
    wait_spread(
        &agents,
        &counts(&[("a1", 2), ("a2", 2), ("b1", 2)]),
        "scaled to 6",
    );
    skiff_ok_at(&first, &["service", "scale", "web", "3"]);
    wait_spread(
        &agents,
        &counts(&[("a1", 1), ("a2", 1), ("b1", 1)]),
        "scaled to 3",
    );
    skiff_ok_at(&first, &["node", "drain", "b1"]);
    let drained = wait_until(Duration::from_secs(30), POLL, || {
        let running = serving(&agents);
        running.len() == 3 && running.iter().all(|a| a.node != "b1")
    });
    assert!(drained, "drain: {:?}", per_node(&serving(&agents)));
    skiff_ok_at(&first, &["node", "activate", "b1"]);
    skiff_ok_at(&first, &["service", "rebalance", "web"]);
    wait_spread(
        &agents,
        &counts(&[("a1", 1), ("a2", 1), ("b1", 1)]),
        "rebalanced",
    );
}
