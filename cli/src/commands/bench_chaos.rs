//! `skiff bench chaos`: a Jepsen-style check that the control plane's
//! variables are linearizable under faults. Each run starts a fresh
//! 3-server cluster; clients spread over the servers put, get (linearizable
//! reads: ReadIndex) and compare-and-set a few shared variables, each value
//! unique, while a nemesis kills the leader with SIGKILL (then restarts it),
//! pauses a random server with SIGSTOP (then SIGCONT), or partitions the
//! leader or a random server from the other two (then heals). Every call
//! and answer is timed on one clock; a write or swap without an answer is
//! recorded as unknown (it may have happened any time after its call, or
//! never), a failed read is left out. The history is then checked by
//! `linearizable::check`.
//!
//! Partitions are iptables rules on loopback address pairs: each server
//! listens on, and dials from, a loopback address of its own
//! (`127.A.B.1-3`, A.B from this process's id), and a rule drops what one
//! address sends to another. They need root and a working iptables;
//! without them the nemesis only kills and pauses, and says so. Clients
//! dial from 127.0.0.1 and are never cut off.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use rand::Rng;
use skiff_proto::v1 as pb;

use super::bench::{client, leader_index, raft_log_args, wait_for_leader, LocalCluster};
use super::linearizable::{self, Answer, Call, Op};
use crate::args::BenchChaosArgs;

/// How long a client waits for an answer before recording it unknown.
const CALL_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Default)]
struct Figures {
    ops: usize,
    unknown: usize,
    kills: usize,
    pauses: usize,
    partitions: usize,
    violations: usize,
    check: Duration,
}

pub async fn run(args: BenchChaosArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.runs > 0 && args.clients > 0 && args.keys > 0 && args.duration_secs > 0,
        "--runs, --clients, --keys and --duration-secs must each be at least 1"
    );
    let partitions = Cuts::available();
    if !partitions {
        println!(
            "chaos: no partitions (they need root and a working iptables): only kills and pauses"
        );
    }
    let mut totals = Figures::default();
    for run in 1..=args.runs {
        let f = one_run(&args, partitions).await?;
        println!(
            "run {run}: {} ops ({} unknown) on {} keys by {} clients in {} s; {} leader kills, {} pauses, {} partitions; {} (checked in {:.0} ms)",
            f.ops,
            f.unknown,
            args.keys,
            args.clients,
            args.duration_secs,
            f.kills,
            f.pauses,
            f.partitions,
            if f.violations == 0 {
                "linearizable".to_string()
            } else {
                format!("NOT linearizable on {} keys", f.violations)
            },
            f.check.as_secs_f64() * 1e3
        );
        totals.ops += f.ops;
        totals.unknown += f.unknown;
        totals.kills += f.kills;
        totals.pauses += f.pauses;
        totals.partitions += f.partitions;
        totals.violations += usize::from(f.violations > 0);
        totals.check = totals.check.max(f.check);
    }
    println!(
        "chaos: runs={} ops={} unknown={} kills={} pauses={} partitions={} violations={} (slowest check {:.0} ms)",
        args.runs,
        totals.ops,
        totals.unknown,
        totals.kills,
        totals.pauses,
        totals.partitions,
        totals.violations,
        totals.check.as_secs_f64() * 1e3
    );
    anyhow::ensure!(
        totals.violations == 0,
        "{} of {} runs were not linearizable",
        totals.violations,
        args.runs
    );
    Ok(())
}

async fn one_run(args: &BenchChaosArgs, partitions: bool) -> anyhow::Result<Figures> {
    let mut cuts = Cuts::new();
    let mut cluster = if partitions {
        LocalCluster::start_on(&cuts.ips, raft_log_args(args.raft_log)).await?
    } else {
        LocalCluster::start_with(3, raft_log_args(args.raft_log)).await?
    };
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.duration_secs);
    let history = Arc::new(Mutex::new(Vec::new()));
    let mut clients = Vec::new();
    for index in 0..args.clients {
        let address = cluster.addresses[index % cluster.addresses.len()].clone();
        let history = history.clone();
        let keys = args.keys;
        clients.push(tokio::spawn(async move {
            client_loop(index, address, keys, started, deadline, history).await;
        }));
    }
    let mut figures = Figures::default();
    // The nemesis: a fault every 1-2 s, healed within 1-2 s, none in the
    // last second so the run ends on a healthy cluster.
    let faults = if partitions { 3 } else { 2 };
    while Instant::now() + Duration::from_secs(3) < deadline {
        let (wait, heal, fault, leader_first) = {
            let mut rng = rand::thread_rng();
            (
                Duration::from_millis(rng.gen_range(1000..2000)),
                Duration::from_millis(rng.gen_range(700..1500)),
                rng.gen_range(0..faults),
                rng.gen_bool(0.5),
            )
        };
        tokio::time::sleep(wait).await;
        if fault == 2 {
            let random = rand::thread_rng().gen_range(0..cluster.addresses.len());
            let victim = if leader_first {
                leader_index(&cluster).await.unwrap_or(random)
            } else {
                random
            };
            cuts.isolate(victim)?;
            figures.partitions += 1;
            tokio::time::sleep(heal).await;
            cuts.heal();
        } else if fault == 1 {
            let victim = rand::thread_rng().gen_range(0..cluster.addresses.len());
            let Some(pid) = cluster.children[victim].as_ref().map(|c| c.id()) else {
                continue;
            };
            let pid = Pid::from_raw(i32::try_from(pid)?);
            kill(pid, Signal::SIGSTOP)?;
            figures.pauses += 1;
            tokio::time::sleep(heal).await;
            kill(pid, Signal::SIGCONT)?;
        } else if let Some(leader) = leader_index(&cluster).await {
            cluster.kill(leader);
            figures.kills += 1;
            tokio::time::sleep(heal).await;
            cluster.restart(leader)?;
        }
    }
    for task in clients {
        let _ = task.await;
    }
    let _ = wait_for_leader(&cluster.addresses[0], Duration::from_secs(10)).await;
    drop(cluster);
    drop(cuts);
    let ops = std::mem::take(&mut *history.lock().unwrap_or_else(|p| p.into_inner()));
    figures.ops = ops.len();
    figures.unknown = ops.iter().filter(|o| o.answer == Answer::Unknown).count();
    let checking = Instant::now();
    let verdict = linearizable::check(&ops);
    figures.check = checking.elapsed();
    figures.violations = verdict.violations.len();
    if !verdict.violations.is_empty() {
        for key in &verdict.violations {
            println!("history of {key} (not linearizable):");
            for op in ops.iter().filter(|o| &o.key == key) {
                println!(
                    "  {:>10} {:>10} {:?} -> {:?}",
                    op.called, op.answered, op.call, op.answer
                );
            }
        }
    }
    Ok(figures)
}

/// One client: random operations on random keys until `deadline`, each
/// recorded with its call and answer times (microseconds since `started`).
async fn client_loop(
    index: usize,
    address: String,
    keys: usize,
    started: Instant,
    deadline: Instant,
    history: Arc<Mutex<Vec<Op>>>,
) {
    let mut connection = None;
    // What this client last saw in each key: what its swaps expect.
    let mut last_seen: HashMap<String, Option<String>> = HashMap::new();
    let mut sequence = 0u64;
    let micros = |at: Instant| at.duration_since(started).as_micros() as u64;
    while Instant::now() < deadline {
        if connection.is_none() {
            match tokio::time::timeout(CALL_TIMEOUT, client(&address)).await {
                Ok(Ok(c)) => connection = Some(c),
                _ => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            }
        }
        let Some(c) = connection.as_mut() else {
            continue;
        };
        sequence += 1;
        let (key, kind) = {
            let mut rng = rand::thread_rng();
            (
                format!("chaos/{}", rng.gen_range(0..keys)),
                rng.gen_range(0..3u8),
            )
        };
        let value = format!("c{index}-{sequence}");
        let called = Instant::now();
        let (call, answer) = match kind {
            0 => {
                let put = c.put_variable(pb::PutVariableRequest {
                    key: key.clone(),
                    value: value.clone(),
                });
                let answer = match tokio::time::timeout(CALL_TIMEOUT, put).await {
                    Ok(Ok(_)) => Answer::Done,
                    _ => Answer::Unknown,
                };
                (Call::Put(value), answer)
            }
            1 => {
                let get = c.get_variable(pb::GetVariableRequest {
                    key: key.clone(),
                    stale: false,
                });
                match tokio::time::timeout(CALL_TIMEOUT, get).await {
                    Ok(Ok(r)) => {
                        let r = r.into_inner();
                        let seen = r.found.then_some(r.value);
                        last_seen.insert(key.clone(), seen.clone());
                        (Call::Get, Answer::Value(seen))
                    }
                    // A failed read changes nothing: left out.
                    _ => {
                        connection = None;
                        continue;
                    }
                }
            }
            _ => {
                let expected = last_seen.get(&key).cloned().flatten();
                let cas = c.compare_and_set_variable(pb::CasVariableRequest {
                    key: key.clone(),
                    expected: expected.clone(),
                    value: value.clone(),
                });
                let answer = match tokio::time::timeout(CALL_TIMEOUT, cas).await {
                    Ok(Ok(r)) => {
                        let r = r.into_inner();
                        last_seen.insert(key.clone(), r.current);
                        Answer::Swapped(r.swapped)
                    }
                    _ => Answer::Unknown,
                };
                (Call::Cas { expected, value }, answer)
            }
        };
        let answered = Instant::now();
        if answer == Answer::Unknown {
            // A fresh connection: the old one may be to a paused server.
            connection = None;
        }
        history.lock().unwrap_or_else(|p| p.into_inner()).push(Op {
            key,
            call,
            answer,
            called: micros(called),
            answered: micros(answered),
        });
    }
}

/// The loopback addresses of one run's three servers and the iptables
/// rules that cut them apart, removed on [`Cuts::heal`] and on drop.
struct Cuts {
    ips: Vec<Ipv4Addr>,
    comment: String,
    rules: Vec<Vec<String>>,
}

impl Cuts {
    /// Whether iptables rules can be added: iptables is installed and
    /// lists the rules (it refuses to without root).
    fn available() -> bool {
        Command::new("iptables")
            .args(["-w", "5", "-S", "INPUT"])
            .output()
            .is_ok_and(|o| o.status.success())
    }

    /// Addresses 127.A.B.1-3 from this process's id (so two benches on
    /// one machine rarely share them); no rules yet.
    fn new() -> Cuts {
        let pid = std::process::id();
        let a = u8::try_from(100 + pid % 100).unwrap_or(100);
        let b = u8::try_from((pid / 100) % 256).unwrap_or(0);
        Cuts {
            ips: (1..=3).map(|n| Ipv4Addr::new(127, a, b, n)).collect(),
            comment: format!("skiff-bench-chaos-{pid}"),
            rules: Vec::new(),
        }
    }

    /// Drops everything between server `victim` and the others, both ways.
    fn isolate(&mut self, victim: usize) -> anyhow::Result<()> {
        let cut = self.ips[victim].to_string();
        let others: Vec<String> = self
            .ips
            .iter()
            .filter(|ip| **ip != self.ips[victim])
            .map(Ipv4Addr::to_string)
            .collect();
        for other in &others {
            for (from, to) in [(&cut, other), (other, &cut)] {
                let rule: Vec<String> = [
                    "-s",
                    from,
                    "-d",
                    to,
                    "-m",
                    "comment",
                    "--comment",
                    &self.comment,
                    "-j",
                    "DROP",
                ]
                .map(str::to_string)
                .to_vec();
                iptables("-I", &rule)?;
                self.rules.push(rule);
            }
        }
        Ok(())
    }

    fn heal(&mut self) {
        for rule in self.rules.drain(..) {
            if let Err(e) = iptables("-D", &rule) {
                eprintln!("chaos: {e}");
            }
        }
    }
}

impl Drop for Cuts {
    fn drop(&mut self) {
        self.heal();
    }
}

fn iptables(action: &str, rule: &[String]) -> anyhow::Result<()> {
    let out = Command::new("iptables")
        .args(["-w", "5", action, "INPUT"])
        .args(rule)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "failed to run iptables {action} INPUT {}: {}",
        rule.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}
