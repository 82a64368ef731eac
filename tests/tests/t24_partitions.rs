//! Network partitions between real processes: servers and agents on
//! loopback addresses of their own (`127.24.T.N`, T one per test), cut
//! apart with iptables rules on address pairs (see `skiff_e2e::partition`):
//! an isolated leader steps down while the majority elects and commits and
//! the minority commits nothing; one-way cuts neither stop the cluster nor
//! make leaders flap; 20 % packet loss between all servers still commits;
//! agents cut off from every server keep their replicas and reconcile
//! after healing without duplicates or restarts.
//!
//! Servers run with 50 ms ticks and a 10-tick (500 ms) election timeout so
//! the whole file stays short. Figures are printed as `MEASURED` lines.

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use skiff_e2e::agents::{AgentCluster, AgentSpec};
use skiff_e2e::partition::{ip_of, port_of, Partitions};
use skiff_e2e::servers::ServerCluster;
use skiff_e2e::{
    events_at, proc_start_time, skiff_bin, skiff_ok_at, try_run_with_timeout, wait_until,
    Allocation, POLL,
};

const RAFT: [&str; 4] = ["--tick-ms", "50", "--election-ticks", "10"];
/// The configured election timeout (`RAFT`).
const ELECTION: Duration = Duration::from_millis(500);
const FAST_POLL: Duration = Duration::from_millis(50);

/// Loopback addresses 127.24.`test`.1..=`n`.
fn addresses(test: u8, n: u8) -> Vec<String> {
    (1..=n).map(|i| format!("127.24.{test}.{i}")).collect()
}

fn start(test: u8, extra: &[&str]) -> ServerCluster {
    let ips = addresses(test, 3);
    let ips: Vec<&str> = ips.iter().map(String::as_str).collect();
    let args: Vec<&str> = RAFT.iter().copied().chain(extra.iter().copied()).collect();
    ServerCluster::start_on(&ips, &args)
}

fn ip(cluster: &ServerCluster, index: usize) -> String {
    ip_of(&cluster.addresses[index]).to_string()
}

/// A leader every one of `among` agrees on, other than `not`.
fn agreed_leader(cluster: &ServerCluster, among: &[usize], not: Option<usize>) -> Option<usize> {
    let seen: Vec<Option<usize>> = among.iter().map(|i| cluster.leader_seen_by(*i)).collect();
    let first = seen.first().copied().flatten()?;
    (seen.iter().all(|s| *s == Some(first)) && Some(first) != not).then_some(first)
}

/// Waits (bounded) until every acknowledged key is readable through each
/// server; panics naming what is missing where.
fn assert_all_present(cluster: &ServerCluster, prefix: &str, acknowledged: &BTreeSet<String>) {
    for index in 0..cluster.addresses.len() {
        let mut missing = Vec::new();
        let present = wait_until(Duration::from_secs(20), POLL, || {
            let Some(present) = cluster.variables(index, prefix) else {
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
            present,
            "s{} lacks {} acknowledged writes, e.g. {:?}:\n{}",
            index + 1,
            missing.len(),
            missing.first(),
            cluster.log(index)
        );
    }
}

/// `skiff var put KEY VALUE` through `server`, given up after 10 s: Ok if
/// acknowledged, else what the CLI said (or that it did not answer).
fn put(server: &str, key: &str, value: &str) -> Result<(), String> {
    let mut command = Command::new(skiff_bin());
    command
        .env_remove("SKIFF_ADDR")
        .args(["--server", server, "var", "put", key, value]);
    let out = try_run_with_timeout(&mut command, Duration::from_secs(10))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// One client per server in `through`, each writing `prefix/sI-N` through
/// its server until `stop` (so a server that cannot commit slows only its
/// own client), recording each call's key, outcome and latency.
struct Writer {
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<Vec<(String, bool, Duration)>>>,
}

impl Writer {
    fn start(cluster: &ServerCluster, through: &[usize], prefix: &str) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = through
            .iter()
            .map(|i| {
                let address = cluster.addresses[*i].clone();
                let prefix = format!("{prefix}/s{}", i + 1);
                let flag = stop.clone();
                thread::spawn(move || {
                    let mut calls = Vec::new();
                    for n in 0..10_000usize {
                        if flag.load(Ordering::Relaxed) {
                            break;
                        }
                        let key = format!("{prefix}-{n}");
                        let started = Instant::now();
                        let answer = put(&address, &key, "v");
                        if let Err(e) = &answer {
                            println!(
                                "write {key} through {address} failed after {} ms: {e}",
                                started.elapsed().as_millis()
                            );
                        }
                        calls.push((key, answer.is_ok(), started.elapsed()));
                    }
                    calls
                })
            })
            .collect();
        Writer { stop, threads }
    }

    fn finish(self) -> Vec<(String, bool, Duration)> {
        self.stop.store(true, Ordering::Relaxed);
        self.threads
            .into_iter()
            .flat_map(|t| t.join().expect("writer thread"))
            .collect()
    }
}

fn acknowledged(calls: &[(String, bool, Duration)]) -> BTreeSet<String> {
    calls.iter().filter(|c| c.1).map(|c| c.0.clone()).collect()
}

fn percentile(calls: &[(String, bool, Duration)], p: f64) -> u128 {
    let mut ms: Vec<u128> = calls
        .iter()
        .filter(|c| c.1)
        .map(|c| c.2.as_millis())
        .collect();
    ms.sort_unstable();
    if ms.is_empty() {
        return 0;
    }
    let at = ((ms.len() - 1) as f64 * p).round() as usize;
    ms[at.min(ms.len() - 1)]
}

#[test]
fn an_isolated_leader_steps_down_the_minority_commits_nothing_and_the_majority_goes_on() {
    let cluster = start(1, &[]);
    let mut net = Partitions::new("t24-isolated-leader");
    let mut acked = BTreeSet::new();
    for i in 0..5 {
        let key = format!("p/before{i}");
        assert!(cluster.put(i % 3, &key, "v"), "write {key} before the cut");
        acked.insert(key);
    }
    let old = cluster.leader().expect("a leader");
    let majority: Vec<usize> = (0..3).filter(|i| *i != old).collect();
    let others: Vec<String> = majority.iter().map(|i| ip(&cluster, *i)).collect();
    let others: Vec<&str> = others.iter().map(String::as_str).collect();

    net.isolate(&ip(&cluster, old), &others);
    let cut = Instant::now();
    // A write through the isolated leader at once: it cannot commit.
    let minority = {
        let address = cluster.addresses[old].clone();
        thread::spawn(move || {
            let started = Instant::now();
            let answer = put(&address, "p/minority", "lost");
            (answer, started.elapsed())
        })
    };
    let stepped_down = wait_until(Duration::from_secs(10), FAST_POLL, || {
        cluster.role_of(old).is_some_and(|r| r != "leader")
    });
    let step_down = cut.elapsed();
    assert!(
        stepped_down,
        "the isolated leader s{} still leads after {step_down:?}:\n{}",
        old + 1,
        cluster.log(old)
    );
    let mut new = None;
    let elected = wait_until(Duration::from_secs(10), FAST_POLL, || {
        new = agreed_leader(&cluster, &majority, Some(old));
        new.is_some()
    });
    let election = cut.elapsed();
    assert!(elected, "the majority elected no leader in {election:?}");
    let new = new.expect("elected");
    let mut majority_ms = Vec::new();
    for i in 0..10 {
        let key = format!("p/majority{i}");
        let started = Instant::now();
        assert!(
            cluster.put(majority[i % 2], &key, "v"),
            "the majority does not commit {key}"
        );
        majority_ms.push(started.elapsed().as_millis());
        acked.insert(key);
    }
    let (answer, minority_took) = minority.join().expect("minority writer");
    let minority_error =
        answer.expect_err("a write through the isolated old leader was acknowledged");
    // Once it stepped down, a write through it fails and says why.
    let started = Instant::now();
    let late = put(&cluster.addresses[old], "p/late", "lost");
    let late_took = started.elapsed();
    let late_error = late.expect_err("the minority acknowledged p/late");
    assert!(
        late_error.contains("leader"),
        "the minority's refusal names no leader problem: {late_error}"
    );
    println!(
        "MEASURED isolated leader: stepped down {} ms after the cut, new leader s{} agreed on after {} ms (election timeout {} ms)",
        step_down.as_millis(),
        new + 1,
        election.as_millis(),
        ELECTION.as_millis()
    );
    println!(
        "MEASURED isolated leader: majority write latency max {} ms; minority write refused after {} ms ({minority_error}); later ones after {} ms ({late_error})",
        majority_ms.iter().max().copied().unwrap_or_default(),
        minority_took.as_millis(),
        late_took.as_millis()
    );

    net.heal();
    let healed = Instant::now();
    let converged = wait_until(Duration::from_secs(15), POLL, || {
        let leaders: Vec<Option<usize>> = (0..3).map(|i| cluster.leader_seen_by(i)).collect();
        leaders.iter().all(|l| l.is_some() && *l == leaders[0])
    });
    assert!(
        converged,
        "the three servers do not agree on a leader after healing"
    );
    assert_all_present(&cluster, "p/", &acked);
    println!(
        "MEASURED isolated leader: all 3 agree and hold every acknowledged write {} ms after healing",
        healed.elapsed().as_millis()
    );
    for index in 0..3 {
        let present = cluster.variables(index, "p/").expect("reads after healing");
        for key in ["p/minority", "p/late"] {
            assert!(
                !present.contains_key(key),
                "s{} holds {key}, written only to the isolated minority",
                index + 1
            );
        }
    }
    let applied: Vec<u64> = (0..3)
        .filter_map(|i| cluster.status_of(i))
        .filter_map(|s| s["applied_index"].as_u64())
        .collect();
    assert_eq!(applied.len(), 3, "every server answers its status");
}

/// What [`watch`] saw: each (leader, term) pair in the order first
/// reported by any server, in how many status answers.
struct Watched {
    leaders: Vec<(String, u64)>,
    answers: usize,
    calls: Vec<(String, bool, Duration)>,
}

impl Watched {
    /// Leader changes: distinct (leader, term) pairs after the first.
    fn changes(&self) -> usize {
        self.leaders.len().saturating_sub(1)
    }
}

/// Asks every server for its view of the leader every 100 ms while a
/// writer (keys `prefix/N`) runs through every server for `window`.
fn watch(cluster: &ServerCluster, prefix: &str, window: Duration) -> Watched {
    let writer = Writer::start(cluster, &[0, 1, 2], prefix);
    let started = Instant::now();
    let mut leaders: Vec<(String, u64)> = Vec::new();
    let mut answers = 0;
    for _ in 0..1000 {
        if started.elapsed() >= window {
            break;
        }
        for i in 0..cluster.addresses.len() {
            if let Some(status) = cluster.status_of(i) {
                answers += 1;
                let leader = status["leader"].as_str().unwrap_or_default().to_string();
                let term = status["term"].as_u64().unwrap_or_default();
                if !leader.is_empty() && !leaders.contains(&(leader.clone(), term)) {
                    leaders.push((leader, term));
                }
            }
        }
        thread::sleep(Duration::from_millis(100));
    }
    let calls = writer.finish();
    Watched {
        leaders,
        answers,
        calls,
    }
}

#[test]
fn one_way_cuts_keep_the_cluster_committing_without_flapping_leaders() {
    let cluster = start(2, &[]);
    let mut net = Partitions::new("t24-one-way");
    let leader = cluster.leader().expect("a leader");
    let followers: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    let mut acked = BTreeSet::new();
    let window = Duration::from_secs(5);

    // A follower that does not hear the leader (its messages to it are
    // lost) but is heard: pre-vote and the leader lease keep it from
    // disrupting the others.
    let deaf = followers[0];
    net.drop_to_listener(
        &ip(&cluster, leader),
        &ip(&cluster, deaf),
        port_of(&cluster.addresses[deaf]),
    );
    let seen = watch(&cluster, "a/deaf", window);
    let ok = seen.calls.iter().filter(|c| c.1).count();
    println!(
        "MEASURED one-way (follower s{} deaf to the leader): {} leader changes in {} s (leaders {:?} in {} status answers); {ok} of {} writes acknowledged, p50 {} ms",
        deaf + 1,
        seen.changes(),
        window.as_secs(),
        seen.leaders,
        seen.answers,
        seen.calls.len(),
        percentile(&seen.calls, 0.5)
    );
    assert!(seen.changes() <= 1, "leaders flap: {:?}", seen.leaders);
    assert!(
        ok * 2 >= seen.calls.len(),
        "the cluster stopped committing: {ok} of {}",
        seen.calls.len()
    );
    let calls = seen.calls;
    acked.extend(acknowledged(&calls));
    net.heal();
    assert!(
        wait_until(Duration::from_secs(10), POLL, || agreed_leader(
            &cluster,
            &[0, 1, 2],
            None
        )
        .is_some()),
        "no agreed leader after healing"
    );

    // A leader that is heard but hears nobody: it loses its quorum and
    // steps down; the followers elect one of them, which the deposed
    // leader, still unheard, must not disrupt.
    let leader = cluster.leader().expect("a leader");
    let followers: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    for f in &followers {
        net.drop_to_listener(
            &ip(&cluster, *f),
            &ip(&cluster, leader),
            port_of(&cluster.addresses[leader]),
        );
    }
    let seen = watch(&cluster, "a/mute", window);
    let ok = seen.calls.iter().filter(|c| c.1).count();
    println!(
        "MEASURED one-way (leader s{} hears no follower): {} leader changes in {} s (leaders {:?} in {} status answers); {ok} of {} writes acknowledged, p50 {} ms",
        leader + 1,
        seen.changes(),
        window.as_secs(),
        seen.leaders,
        seen.answers,
        seen.calls.len(),
        percentile(&seen.calls, 0.5)
    );
    assert!(seen.changes() <= 2, "leaders flap: {:?}", seen.leaders);
    assert!(
        ok * 2 >= seen.calls.len(),
        "the cluster stopped committing while the leader was deaf: {ok} of {}",
        seen.calls.len()
    );
    let calls = seen.calls;
    acked.extend(acknowledged(&calls));
    net.heal();
    assert_all_present(&cluster, "a/", &acked);
}

#[test]
fn twenty_percent_loss_between_all_servers_still_commits_writes() {
    let cluster = start(3, &[]);
    let mut net = Partitions::new("t24-loss");
    for a in 0..3 {
        for b in 0..3 {
            if a != b {
                net.lose(&ip(&cluster, a), &ip(&cluster, b), 0.2);
            }
        }
    }
    let window = Duration::from_secs(6);
    let writer = Writer::start(&cluster, &[0, 1, 2], "l");
    thread::sleep(window);
    let calls = writer.finish();
    net.heal();
    let ok = calls.iter().filter(|c| c.1).count();
    println!(
        "MEASURED 20 % loss: {ok} of {} writes acknowledged in {} s ({:.0} %), latency p50 {} ms, p99 {} ms, max {} ms",
        calls.len(),
        window.as_secs(),
        100.0 * ok as f64 / calls.len().max(1) as f64,
        percentile(&calls, 0.5),
        percentile(&calls, 0.99),
        percentile(&calls, 1.0)
    );
    assert!(
        ok * 2 >= calls.len() && ok >= 5,
        "writes under 20 % loss: {ok} of {}",
        calls.len()
    );
    assert_all_present(&cluster, "l/", &acknowledged(&calls));
}

const TTL: &str = "2s";
const TTL_TIME: Duration = Duration::from_secs(2);

fn agent_spec(name: &'static str, address: &'static str) -> AgentSpec<'static> {
    AgentSpec {
        name,
        advertise: address,
        labels: &[],
    }
}

/// One server, agents on 127.24.`test`.11.., process replicas that only
/// sleep.
fn agent_cluster(test: u8, agents: &[AgentSpec]) -> (ServerCluster, AgentCluster) {
    let server = format!("127.24.{test}.1");
    let servers = ServerCluster::start_on(&[&server], &["--heartbeat-ttl", TTL]);
    let agents = AgentCluster::start(&servers.addresses, agents);
    (servers, agents)
}

fn create_sleepers(server: &str, name: &str, replicas: u32) {
    skiff_ok_at(
        server,
        &[
            "service",
            "create",
            "--detach",
            name,
            "--runtime",
            "process",
            "--replicas",
            &replicas.to_string(),
            "--",
            "sleep",
            "600",
        ],
    );
}

fn wait_running(agents: &AgentCluster, service: &str, n: usize) -> Vec<Allocation> {
    let mut last = Vec::new();
    let ok = wait_until(Duration::from_secs(30), POLL, || {
        last = agents.running(service);
        last.len() == n
    });
    assert!(
        ok,
        "{service}: {} of {n} running: {last:?}\n{}",
        last.len(),
        agents.logs()
    );
    last
}

fn node_status(agents: &AgentCluster, node: &str) -> String {
    agents
        .nodes()
        .iter()
        .find(|n| n["name"] == node)
        .and_then(|n| n["status"].as_str())
        .unwrap_or_default()
        .to_string()
}

#[test]
fn an_agent_cut_off_from_its_server_keeps_its_replicas_and_reconciles_without_restarts() {
    let (servers, agents) = agent_cluster(4, &[agent_spec("cut", "127.24.4.11")]);
    let server = servers.addresses[0].clone();
    let mut net = Partitions::new("t24-agent-alone");
    create_sleepers(&server, "keep", 2);
    let before = wait_running(&agents, "keep", 2);
    let pids: BTreeSet<(u32, Option<u64>)> = before
        .iter()
        .map(|a| (a.pid, proc_start_time(a.pid)))
        .collect();

    net.cut("127.24.4.11", ip_of(&server));
    let cut = Instant::now();
    let down = wait_until(TTL_TIME * 4, POLL, || {
        node_status(&agents, "cut") != "ready"
    });
    let seen_down = cut.elapsed();
    // Stay cut off for at least twice the heartbeat TTL.
    thread::sleep((TTL_TIME * 2).saturating_sub(cut.elapsed()));
    let during: BTreeSet<(u32, Option<u64>)> = agents
        .replica_pids(0)
        .into_iter()
        .map(|p| (p, proc_start_time(p)))
        .collect();
    assert_eq!(
        during, pids,
        "the cut-off agent's replicas changed meanwhile"
    );
    let status_during = node_status(&agents, "cut");
    println!(
        "MEASURED agent alone: node {status_during} {} ms after the cut (down seen: {down}); replicas kept running",
        seen_down.as_millis()
    );

    net.heal();
    let healed = Instant::now();
    let mut last = Vec::new();
    let settled = wait_until(Duration::from_secs(30), POLL, || {
        last = agents.running("keep");
        node_status(&agents, "cut") == "ready" && last.len() == 2
    });
    assert!(settled, "after healing: {last:?}\n{}", agents.logs());
    thread::sleep(Duration::from_secs(2));
    let after = agents.running("keep");
    let all = agents.allocs("keep");
    let processes: BTreeSet<(u32, Option<u64>)> = agents
        .replica_pids(0)
        .into_iter()
        .map(|p| (p, proc_start_time(p)))
        .collect();
    println!(
        "MEASURED agent alone: ready again {} ms after healing; allocations {:?}",
        healed.elapsed().as_millis(),
        all.iter()
            .map(|a| format!(
                "{}:{}/{} pid {} restarts {}",
                a.id, a.desired, a.state, a.pid, a.restarts
            ))
            .collect::<Vec<_>>()
    );
    let events: Vec<String> = events_at(&server, &["--node", "cut"])
        .iter()
        .map(|e| format!("{} {} {}", e["kind"], e["replica"], e["message"]))
        .collect();
    assert_eq!(after.len(), 2, "running after healing: {after:?}");
    assert_eq!(
        processes, pids,
        "the same two processes, no duplicates, no restarts; before: {before:?}; events: {events:#?}"
    );
    assert!(after.iter().all(|a| a.restarts == 0), "restarts: {after:?}");
    let after_pids: BTreeSet<u32> = after.iter().map(|a| a.pid).collect();
    let before_pids: BTreeSet<u32> = pids.iter().map(|p| p.0).collect();
    assert_eq!(after_pids, before_pids, "service ps shows other processes");
}

#[test]
fn a_cut_off_agents_replicas_move_and_it_stops_its_superseded_ones_after_healing() {
    let (servers, agents) = agent_cluster(
        5,
        &[
            agent_spec("stays", "127.24.5.11"),
            agent_spec("cut", "127.24.5.12"),
        ],
    );
    let server = servers.addresses[0].clone();
    let mut net = Partitions::new("t24-agent-moves");
    create_sleepers(&server, "move", 2);
    let before = wait_running(&agents, "move", 2);
    let on_cut = before.iter().filter(|a| a.node == "cut").count();
    assert!(on_cut >= 1, "a replica on the agent to cut: {before:?}");

    net.cut("127.24.5.12", ip_of(&server));
    let cut = Instant::now();
    let mut last = Vec::new();
    let moved = wait_until(TTL_TIME * 5, POLL, || {
        last = agents.running("move");
        last.len() == 2 && last.iter().all(|a| a.node == "stays")
    });
    let moved_after = cut.elapsed();
    assert!(
        moved,
        "not re-placed after {moved_after:?}: {last:?}\n{}",
        agents.logs()
    );
    let superseded = agents.replica_pids(1);
    println!(
        "MEASURED agent moves: {on_cut} replica(s) re-placed {} ms after the cut; {} superseded process(es) still run on the cut-off node",
        moved_after.as_millis(),
        superseded.len()
    );

    net.heal();
    let healed = Instant::now();
    let settled = wait_until(Duration::from_secs(30), POLL, || {
        node_status(&agents, "cut") == "ready"
            && agents.replica_pids(1).is_empty()
            && agents.running("move").len() == 2
    });
    assert!(
        settled,
        "after healing: running {:?}, processes on the cut-off node {:?}\n{}",
        agents.running("move"),
        agents.replica_pids(1),
        agents.logs()
    );
    thread::sleep(Duration::from_secs(2));
    let running = agents.running("move");
    let processes = agents.replica_pids(0).len() + agents.replica_pids(1).len();
    println!(
        "MEASURED agent moves: superseded replicas stopped {} ms after healing; {processes} processes for {} running replicas",
        healed.elapsed().as_millis(),
        running.len()
    );
    assert_eq!(running.len(), 2, "{running:?}");
    assert_eq!(processes, 2, "duplicates after healing: {running:?}");
}
