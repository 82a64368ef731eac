//! The replicated control plane with real `skiff server` processes on
//! loopback: leader failover under a continuous write load without losing
//! an acknowledged write, catching up from a snapshot, and every server
//! answering with the leader's view of what only it holds in memory; the
//! bounded number of services and variables; a joined server is a voter
//! only once it caught up, so one that never can costs no quorum.

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use skiff_e2e::agents::{AgentCluster, AgentSpec};
use skiff_e2e::servers::{ServerCluster, LEARNER};
use skiff_e2e::{
    assert_cli_error, free_port, join_token, json_at, skiff_at, skiff_bin, skiff_ok_at, wait_until,
    POLL,
};

#[test]
fn writes_continue_after_the_leader_is_killed_and_no_acknowledged_write_is_lost() {
    failovers_lose_no_acknowledged_write(&[]);
}

#[test]
fn the_write_ahead_log_loses_no_acknowledged_write_through_leader_kills() {
    failovers_lose_no_acknowledged_write(&["--raft-log", "wal"]);
}

/// Five rounds of kill -9 of the leader under a continuous write load,
/// with the servers started with `server_args`.
fn failovers_lose_no_acknowledged_write(server_args: &[&str]) {
    let mut cluster = ServerCluster::start(3, server_args);
    let acknowledged = Arc::new(Mutex::new(BTreeSet::new()));
    let mut failovers = Vec::new();
    for round in 1..=5 {
        // A client writes continuously through every server while the
        // leader is killed.
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (addresses, stop, acknowledged) = (
                cluster.addresses.clone(),
                stop.clone(),
                acknowledged.clone(),
            );
            thread::spawn(move || {
                for i in 0..100_000u64 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let key = format!("load/r{round}/k{i}");
                    let address = &addresses[(i as usize) % addresses.len()];
                    let out = skiff_e2e::skiff_at(address, &["var", "put", &key, "v"]);
                    if out.status.success() {
                        acknowledged.lock().unwrap().insert(key);
                    }
                }
            })
        };
        thread::sleep(Duration::from_millis(500));
        let leader = cluster.leader().expect("a leader before the kill");
        cluster.kill9(leader);
        let failover =
            cluster.time_to_first_write(&format!("probe/{round}"), Duration::from_secs(15));
        let failover =
            failover.unwrap_or_else(|| panic!("round {round}: writes did not resume within 15 s"));
        eprintln!(
            "round {round}: leader s{} killed, first write {} ms later",
            leader + 1,
            failover.as_millis()
        );
        failovers.push(failover);
        thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::Relaxed);
        writer.join().unwrap();
        cluster.restart(leader);
        cluster.wait_for_members(3);
    }
    failovers.sort();
    eprintln!(
        "failover to first write: median {} ms, max {} ms",
        failovers[2].as_millis(),
        failovers[4].as_millis()
    );

    // Every acknowledged write is on every server once they have caught up.
    let acknowledged = acknowledged.lock().unwrap().clone();
    assert!(
        acknowledged.len() > 20,
        "the load wrote too little to prove anything: {}",
        acknowledged.len()
    );
    for index in 0..3 {
        let mut missing = Vec::new();
        let caught_up = wait_until(Duration::from_secs(20), POLL, || {
            let Some(present) = cluster.variables(index, "load/") else {
                return false;
            };
            missing = acknowledged
                .iter()
                .filter(|k| !present.contains_key(*k))
                .cloned()
                .collect();
            missing.is_empty()
        });
        assert!(
            caught_up,
            "server s{} lacks {} acknowledged writes, e.g. {:?}",
            index + 1,
            missing.len(),
            missing.first()
        );
    }
}

#[test]
fn a_server_joining_after_log_compaction_catches_up_from_a_snapshot() {
    joins_from_a_snapshot(&["--snapshot-every", "20"]);
}

#[test]
fn a_server_joining_a_write_ahead_log_cluster_catches_up_from_a_snapshot() {
    joins_from_a_snapshot(&["--snapshot-every", "20", "--raft-log", "wal"]);
}

fn joins_from_a_snapshot(server_args: &[&str]) {
    let mut cluster = ServerCluster::start(1, server_args);
    for i in 0..60 {
        assert!(
            cluster.put(0, &format!("early/k{i:02}"), "v"),
            "write {i} failed:\n{}",
            cluster.log(0)
        );
    }
    let joined = cluster.add_server();
    cluster.wait_for_members(2);
    let caught_up = wait_until(Duration::from_secs(20), POLL, || {
        cluster
            .variables(joined, "early/")
            .is_some_and(|v| v.len() == 60)
    });
    assert!(
        caught_up,
        "the joined server did not catch up:\n{}",
        cluster.log(joined)
    );
    assert!(
        cluster
            .log(joined)
            .contains("installed snapshot from the leader"),
        "the joined server caught up without a snapshot, so compaction did not happen:\n{}",
        cluster.log(joined)
    );
    // It caught up, so the leader made it a voter.
    let role = |asked: usize| {
        let status = json_at(&cluster.addresses[asked], &["cluster", "status"])?;
        let members = status["members"].as_array()?.clone();
        let member = members.into_iter().find(|m| m["name"] == "s2")?;
        member["role"].as_str().map(str::to_string)
    };
    for asked in [0, joined] {
        assert_eq!(
            role(asked).as_deref(),
            Some("follower"),
            "asked s{}",
            asked + 1
        );
    }
    // And it keeps up with new writes as a follower.
    assert!(cluster.put(joined, "late/k", "v"));
    assert!(cluster.variables(0, "late/").is_some_and(|v| v.len() == 1));
}

/// Issue #14: a server that joined at an address no one can reach (here a
/// real `skiff server` advertising 127.0.0.1:1) left a one-server cluster
/// without a leader for good, since it was added as a voter at once. Now it
/// stays a learner: the cluster keeps its leader and its writes, and
/// `cluster remove` takes it out.
#[test]
fn a_server_joined_at_an_unreachable_address_stays_a_learner_and_costs_no_quorum() {
    ghost_joins_and_is_removed(1);
}

/// The same through followers: the join and the removal reach the leader
/// by `Raft.Propose`, which takes membership changes from followers.
#[test]
fn a_join_and_a_removal_through_followers_are_forwarded_to_the_leader() {
    ghost_joins_and_is_removed(3);
}

fn ghost_joins_and_is_removed(size: usize) {
    let cluster = ServerCluster::start(size, &[]);
    let leader = cluster.leader().expect("a leader");
    // Through a follower when there is one, removed through another.
    let (join_via, remove_via) = ((leader + 1) % size, (leader + 2) % size);
    let dir = tempfile::tempdir().expect("temp dir");
    let listen = format!("127.0.0.1:{}", free_port());
    let mut ghost = Command::new(skiff_bin())
        .env_remove("SKIFF_ADDR")
        .args(["server", "--name", "ghost", "--listen", &listen])
        .args(["--advertise", "127.0.0.1:1"])
        .args(["--join", &cluster.addresses[join_via]])
        .args(["--token", &join_token(&cluster.addresses[leader], "server")])
        .arg("--data-dir")
        .arg(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start skiff server");
    let server = cluster.addresses[leader].clone();
    let ghost_role = || {
        let status = json_at(&server, &["cluster", "status"])?;
        let members = status["members"].as_array()?.clone();
        let ghost = members.into_iter().find(|m| m["name"] == "ghost")?;
        ghost["role"].as_str().map(str::to_string)
    };
    let joined = wait_until(Duration::from_secs(15), POLL, || ghost_role().is_some());
    assert!(joined, "the ghost never joined:\n{}", cluster.log(leader));
    let _ = ghost.kill();
    let _ = ghost.wait();
    // Well past an election timeout (1 s): a voter it could not reach
    // would have cost a one-server cluster its quorum by now.
    thread::sleep(Duration::from_secs(3));
    assert_eq!(ghost_role().as_deref(), Some(LEARNER));
    assert_eq!(cluster.leader(), Some(leader));
    assert!(
        cluster.put(leader, "after/k", "v"),
        "a write failed:\n{}",
        cluster.log(leader)
    );
    skiff_ok_at(
        &cluster.addresses[remove_via],
        &["cluster", "remove", "ghost"],
    );
    cluster.wait_for_members(size);
    assert!(cluster.put(remove_via, "after/k2", "v"));
}

/// The heartbeat age `server` shows for each node (`u64::MAX`: never).
fn heartbeat_ages(server: &str) -> Option<Vec<u64>> {
    let nodes = json_at(server, &["node", "ls"])?;
    nodes
        .as_array()?
        .iter()
        .map(|n| n["last_heartbeat_secs"].as_u64())
        .collect()
}

#[test]
fn every_server_shows_the_leaders_heartbeats_also_a_restarted_former_leader() {
    let mut servers = ServerCluster::start(3, &[]);
    // The agent streams to the first server listed: the first leader.
    let spec = AgentSpec {
        name: "a1",
        advertise: "127.0.0.2",
        labels: &[],
    };
    let _agents = AgentCluster::start(&servers.addresses, &[spec]);
    let fresh = |server: &str| heartbeat_ages(server).is_some_and(|a| a.iter().all(|s| *s <= 3));
    for server in &servers.addresses {
        let ok = wait_until(Duration::from_secs(5), POLL, || fresh(server));
        assert!(ok, "{server} shows {:?}", heartbeat_ages(server));
    }
    let leader = servers.leader().expect("a leader");
    servers.kill9(leader);
    servers.restart(leader);
    // The restarted server has no agent and never heard a heartbeat: it
    // must show the new leader's ages, not "never".
    let restarted = servers.addresses[leader].clone();
    let ok = wait_until(Duration::from_secs(20), POLL, || fresh(&restarted));
    assert!(
        ok,
        "{restarted} shows {:?}\n{}",
        heartbeat_ages(&restarted),
        servers.log(leader)
    );
}

#[test]
fn cluster_status_on_any_server_shows_a_killed_member_unreachable() {
    let mut servers = ServerCluster::start(3, &[]);
    let leader = servers.leader().expect("a leader");
    let killed = (leader + 1) % 3;
    let other = (leader + 2) % 3;
    servers.kill9(killed);
    let name = format!("s{}", killed + 1);
    for asked in [leader, other] {
        let server = servers.addresses[asked].clone();
        let seen = wait_until(Duration::from_secs(5), POLL, || {
            let Some(status) = json_at(&server, &["cluster", "status"]) else {
                return false;
            };
            let members = status["members"].as_array().cloned().unwrap_or_default();
            members.len() == 3
                && members.iter().all(|m| {
                    let contact = m["last_contact_ms"].as_u64().unwrap_or(u64::MAX);
                    if m["name"] == name.as_str() {
                        m["reachable"] == "no" && contact >= 1000
                    } else {
                        m["reachable"] == "yes" && contact < 1000
                    }
                })
        });
        assert!(
            seen,
            "server {} shows {:?}",
            asked + 1,
            json_at(&server, &["cluster", "status"])
        );
    }
}

#[test]
fn services_and_variables_are_bounded_by_the_servers_limits() {
    let servers = ServerCluster::start(
        3,
        &[
            "--max-services",
            "2",
            "--max-variables",
            "2",
            "--max-request-bytes",
            "65536",
        ],
    );
    let server = servers.addresses[1].clone();
    let create = |name| {
        [
            "service",
            "create",
            "--detach",
            name,
            "--runtime",
            "process",
            "--",
            "sleep",
            "60",
        ]
    };
    for name in ["one", "two"] {
        skiff_ok_at(&server, &create(name));
    }
    let args = create("three");
    let out = skiff_at(&server, &args);
    assert_cli_error(&args, &out, &["too many services", "--max-services"]);
    let ls = skiff_ok_at(&server, &["service", "ls"]);
    assert!(!ls.contains("three"), "nothing created: {ls}");
    // An update of an existing service is not a new one.
    skiff_ok_at(&server, &["service", "scale", "two", "0"]);

    skiff_ok_at(&server, &["var", "put", "a", "1"]);
    skiff_ok_at(&server, &["var", "put", "b", "1"]);
    let args = ["var", "put", "c", "1"];
    let out = skiff_at(&server, &args);
    assert_cli_error(&args, &out, &["too many variables", "--max-variables"]);
    skiff_ok_at(&server, &["var", "put", "a", "2"]);

    // A request over --max-request-bytes is refused before it is read.
    let big = "x".repeat(100_000);
    let args = ["var", "put", "a", big.as_str()];
    let out = skiff_at(&server, &args);
    assert_cli_error(
        &args,
        &out,
        &[
            "over the server's limit of 65536 bytes",
            "--max-request-bytes",
        ],
    );
    assert_eq!(skiff_ok_at(&server, &["var", "get", "a"]).trim(), "2");
}

/// A follower whose clock is a year ahead (the `SKIFF_CLOCK_OFFSET_MS`
/// fault hook) proposes writes: no event time runs ahead of the leader's
/// clock, so the state's clock (and the deadlines measured from it) stays
/// the leader's.
#[test]
fn a_follower_with_a_clock_a_year_ahead_moves_no_event_time_forward() {
    const YEAR_MS: u64 = 365 * 24 * 3600 * 1000;
    let mut servers = ServerCluster::start(3, &[]);
    let leader = servers.leader().expect("a leader");
    let follower = (0..3).find(|i| *i != leader).expect("a follower");
    servers.respawn_with_env(follower, &[("SKIFF_CLOCK_OFFSET_MS", &YEAR_MS.to_string())]);
    servers.wait_for_members(3);
    let wrote = wait_until(Duration::from_secs(20), POLL, || {
        servers.put(follower, "clock/fast", "x")
    });
    assert!(
        wrote,
        "no write through the fast follower:\n{}",
        servers.log(follower)
    );
    for i in 0..5 {
        assert!(servers.put(follower, &format!("clock/{i}"), "y"));
    }
    let events = events_not_ahead_of_real_time(&servers.addresses[leader], "variable clock/");
    assert!(events >= 6, "{events} events of the writes");
}

/// The leader's own wall clock jumps an hour ahead while it runs (the
/// `SKIFF_CLOCK_OFFSET_FILE` fault hook): its clock only slews toward the
/// jump (1 % of the time that passes), so no event it stamps runs ahead of
/// real time, a token's TTL does not expire an hour early, and deadlines
/// still fire (a 2 s token still expires).
#[test]
fn a_leader_whose_clock_jumps_an_hour_ahead_fires_no_deadline_early() {
    const HOUR_MS: i64 = 3_600 * 1_000;
    let servers = ServerCluster::start(3, &[]);
    let leader = servers.leader().expect("a leader");
    let follower = (0..3).find(|i| *i != leader).expect("a follower");
    let at_leader = servers.addresses[leader].clone();
    let create_token = |name: &str, ttl: &str| -> String {
        let created = skiff_ok_at(
            &at_leader,
            &[
                "token",
                "create",
                name,
                "--role",
                "read-only",
                "--ttl",
                ttl,
                "--output",
                "json",
            ],
        );
        let created: serde_json::Value = serde_json::from_str(&created).expect("JSON");
        created["secret"].as_str().expect("a secret").to_string()
    };
    let ten_minutes = create_token("ten-minutes", "10m");

    servers.jump_clock(leader, HOUR_MS);
    assert_eq!(
        servers.leader(),
        Some(leader),
        "the jump changed the leader"
    );
    let as_token = |token: &str| {
        skiff_at(
            &at_leader,
            &["--token", token, "var", "ls", "--output", "json"],
        )
    };
    let out = as_token(&ten_minutes);
    assert!(
        out.status.success(),
        "a 10-minute token expired when the leader's clock jumped an hour: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (i, through) in [leader, follower, leader].into_iter().enumerate() {
        assert!(servers.put(through, &format!("jump/{i}"), "x"));
    }
    let events = events_not_ahead_of_real_time(&servers.addresses[follower], "variable jump/");
    assert_eq!(events, 3, "events of the writes");

    // Time still moves: a short token created after the jump expires.
    let brief = create_token("brief", "2s");
    assert!(as_token(&brief).status.success());
    let expired = wait_until(Duration::from_secs(10), POLL, || {
        String::from_utf8_lossy(&as_token(&brief).stderr).contains("has expired")
    });
    assert!(expired, "a 2 s token never expired after the jump");
}

/// How many of the events `server` keeps mention `what`; each must be
/// stamped no later than real time (5 s of slack), else this panics.
fn events_not_ahead_of_real_time(server: &str, what: &str) -> usize {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    let events = skiff_e2e::events_at(server, &[]);
    let matching: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e["message"].as_str().is_some_and(|m| m.contains(what)))
        .collect();
    for event in &matching {
        let at = event["time_ms"].as_u64().expect("time_ms");
        assert!(
            at <= now_ms + 5_000,
            "an event {} ms ahead of real time: {event}",
            at.saturating_sub(now_ms)
        );
    }
    matching.len()
}
