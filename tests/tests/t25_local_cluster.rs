//! `deploy/local-cluster.sh` end to end: 3 servers and 3 agents (127.0.0.2-4) in a temporary
//! directory, on ports this test claimed, with process-runtime replicas.
//!
//! `stop` stops servers and agents and says which replicas keep running; `start` again
//! re-adopts them; `stop --purge` removes them and leaves no process of the cluster; and a PID
//! in the pids file that is not one of the cluster's processes is never signalled.
//!
//! Everything the script or the test started is killed by PID (with its start time) when the
//! test ends, also when it fails.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::Duration;

use serde_json::Value;
use skiff_e2e::{
    allocations, claim_port_range, kill_if_same, pid_alive, proc_start_time, run_with_timeout,
    skiff_at, skiff_bin, wait_until, workspace_root, Allocation, PortRange, POLL,
};
use tempfile::TempDir;

/// One run of the script may take this long (start waits for three servers; stop --purge
/// for the replicas to stop).
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(90);

struct LocalCluster {
    dir: TempDir,
    /// Servers at base..base+2, metrics at base+10..base+12.
    servers: PortRange,
    agents: [PortRange; 3],
    /// Every process seen (members and replicas) with its start time, killed on drop.
    seen: HashMap<u32, u64>,
}

impl LocalCluster {
    fn new() -> Self {
        let cluster = LocalCluster {
            dir: tempfile::Builder::new()
                .prefix("skiff-local-cluster-")
                .tempdir()
                .expect("temp dir"),
            servers: claim_port_range(),
            agents: [claim_port_range(), claim_port_range(), claim_port_range()],
            seen: HashMap::new(),
        };
        skiff_e2e::use_cluster_ca(&cluster.path().join("s1/pki/ca.crt"));
        cluster
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn server(&self) -> String {
        format!("127.0.0.1:{}", self.servers.start)
    }

    fn script(&self, args: &[&str]) -> Output {
        let ranges: Vec<String> = self
            .agents
            .iter()
            .map(|r| format!("{}-{}", r.start, r.end))
            .collect();
        let mut cmd = Command::new("bash");
        cmd.arg(workspace_root().join("deploy/local-cluster.sh"))
            .args(args)
            .arg(self.path())
            .env_remove("SKIFF_ADDR")
            .env("SKIFF_BIN", skiff_bin())
            .env("SKIFF_BASE_PORT", self.servers.start.to_string())
            .env(
                "SKIFF_METRICS_BASE_PORT",
                (self.servers.start + 10).to_string(),
            )
            .env("SKIFF_PORT_RANGES", ranges.join(","))
            .env("SKIFF_SERVER_FLAGS", "--heartbeat-ttl 5s")
            .env(
                "SKIFF_AGENT_FLAGS",
                "--stop-grace-secs 1 --enable-process-runtime",
            );
        run_with_timeout(&mut cmd, SCRIPT_TIMEOUT)
    }

    fn script_ok(&mut self, args: &[&str]) -> String {
        let out = self.script(args);
        assert!(
            out.status.success(),
            "local-cluster.sh {args:?} failed with {}\n--- stdout ---\n{}\n--- stderr ---\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn logs(&self) -> String {
        ["s1", "n1", "n2", "n3"]
            .iter()
            .map(|m| {
                let log =
                    fs::read_to_string(self.path().join(format!("{m}.log"))).unwrap_or_default();
                let lines: Vec<&str> = log.lines().collect();
                format!(
                    "--- {m}.log ---\n{}",
                    lines[lines.len().saturating_sub(15)..].join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// `NAME PID START` lines of DIR/pids.
    fn members(&self) -> Vec<(String, u32)> {
        fs::read_to_string(self.path().join("pids"))
            .unwrap_or_default()
            .lines()
            .filter_map(|line| {
                let mut words = line.split_whitespace();
                let name = words.next()?.to_string();
                Some((name, words.next()?.parse().ok()?))
            })
            .collect()
    }

    fn remember(&mut self, pid: u32) {
        if let Some(start) = proc_start_time(pid) {
            self.seen.insert(pid, start);
        }
    }

    fn running(&self, service: &str) -> Vec<Allocation> {
        let out = skiff_at(
            &self.server(),
            &["service", "ps", service, "--output", "json"],
        );
        if !out.status.success() {
            return Vec::new();
        }
        serde_json::from_slice::<Value>(&out.stdout)
            .map(|v| allocations(&v))
            .unwrap_or_default()
            .into_iter()
            .filter(|a| a.is_running() && pid_alive(a.pid))
            .collect()
    }

    fn wait_running(&mut self, service: &str, n: usize) -> Vec<Allocation> {
        let mut last = Vec::new();
        let ok = wait_until(Duration::from_secs(30), POLL, || {
            last = self.running(service);
            last.len() == n
        });
        assert!(
            ok,
            "{service}: {n} replicas not running: {last:#?}\n{}",
            self.logs()
        );
        for a in &last {
            self.remember(a.pid);
        }
        last
    }

    /// Processes whose command line or working directory lies in the cluster's directory.
    fn processes_in_dir(&self) -> Vec<u32> {
        let dir = self.path().to_string_lossy().into_owned();
        let Ok(entries) = fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|&pid| pid_alive(pid))
            .filter(|&pid| {
                let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let cwd: PathBuf = fs::read_link(format!("/proc/{pid}/cwd")).unwrap_or_default();
                String::from_utf8_lossy(&cmdline).contains(&dir) || cwd.starts_with(self.path())
            })
            .collect()
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        let members: Vec<u32> = self.members().into_iter().map(|(_, pid)| pid).collect();
        for pid in members.into_iter().chain(self.processes_in_dir()) {
            self.remember(pid);
        }
        for (&pid, &start) in &self.seen {
            kill_if_same(pid, start);
        }
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
    }
}

/// A process that is not the cluster's: the script must leave it alone.
struct Bystander(Child);

impl Drop for Bystander {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn stop_keeps_replicas_and_says_so_purge_removes_them_and_foreign_pids_are_never_killed() {
    let mut cluster = LocalCluster::new();
    let out = cluster.script_ok(&["start"]);
    assert!(out.contains("cluster up"), "{out}");
    // The script's own calls use s1's client config; this test's use its token too.
    assert!(
        skiff_e2e::use_token_of(&cluster.path().join("s1")),
        "start wrote no client.toml in s1's data dir\n{}",
        cluster.logs()
    );
    let members = cluster.members();
    assert_eq!(members.len(), 6, "{members:?}");
    for &(_, pid) in &members {
        cluster.remember(pid);
    }
    let cmdline = |pid: u32| {
        String::from_utf8_lossy(&fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default())
            .replace('\0', " ")
    };
    let pid_of = |name: &str| members.iter().find(|(n, _)| n == name).unwrap().1;
    assert!(cmdline(pid_of("s2")).contains("--heartbeat-ttl 5s"));
    assert!(cmdline(pid_of("n3")).contains("--stop-grace-secs 1"));
    let ready = wait_until(Duration::from_secs(30), POLL, || {
        let out = skiff_at(&cluster.server(), &["node", "ls", "--output", "json"]);
        serde_json::from_slice::<Value>(&out.stdout).is_ok_and(|nodes| {
            nodes
                .as_array()
                .is_some_and(|n| n.iter().filter(|n| n["status"] == "ready").count() == 3)
        })
    });
    assert!(ready, "three nodes never ready\n{}", cluster.logs());

    let create = skiff_at(
        &cluster.server(),
        &[
            "service",
            "create",
            "--detach",
            "sleeper",
            "--runtime",
            "process",
            "--replicas",
            "3",
            "--",
            "sleep",
            "600",
        ],
    );
    assert!(create.status.success(), "{create:?}");
    let replicas = cluster.wait_running("sleeper", 3);

    // Plain stop: servers and agents go, replicas stay and are listed.
    let out = cluster.script_ok(&["stop"]);
    assert!(out.contains("keep running"), "{out}");
    for a in &replicas {
        assert!(
            out.contains(&format!("PID {}", a.pid)),
            "{} not listed: {out}",
            a.pid
        );
        assert!(
            pid_alive(a.pid),
            "replica {} was stopped by plain stop",
            a.pid
        );
    }
    for &(ref name, pid) in &members {
        assert!(!pid_alive(pid), "{name} (PID {pid}) still runs after stop");
    }
    assert!(cluster.members().is_empty(), "pids file keeps dead PIDs");

    // Start again: the agents re-adopt the same replicas.
    cluster.script_ok(&["start"]);
    for (_, pid) in cluster.members() {
        cluster.remember(pid);
    }
    let adopted = cluster.wait_running("sleeper", 3);
    let mut before: Vec<u32> = replicas.iter().map(|a| a.pid).collect();
    let mut after: Vec<u32> = adopted.iter().map(|a| a.pid).collect();
    before.sort_unstable();
    after.sort_unstable();
    assert_eq!(before, after, "replicas were not re-adopted");

    // A PID in the file that is not ours: a member's name and the right start time, but not a
    // skiff of this cluster; and the same PID in the old PID-only format.
    let bystander = Bystander(
        Command::new("sleep")
            .arg("600")
            .spawn()
            .expect("start sleep"),
    );
    let foreign = bystander.0.id();
    let start = proc_start_time(foreign).expect("sleep runs");
    let pids = cluster.path().join("pids");
    let mut text = fs::read_to_string(&pids).unwrap();
    text.push_str(&format!("s1 {foreign} {start}\n{foreign}\n"));
    fs::write(&pids, text).unwrap();

    let out = cluster.script_ok(&["stop", "--purge"]);
    assert!(out.contains("removing service sleeper"), "{out}");
    assert!(out.contains("purged"), "{out}");
    assert!(
        pid_alive(foreign),
        "stop killed a process that was not the cluster's"
    );
    for a in &adopted {
        assert!(!pid_alive(a.pid), "replica {} survived stop --purge", a.pid);
    }
    let left = cluster.processes_in_dir();
    assert!(left.is_empty(), "processes of the cluster left: {left:?}");
    let file = fs::read_to_string(&pids).unwrap_or_default();
    assert!(
        !file.contains(&foreign.to_string()),
        "foreign PID kept: {file}"
    );
    drop(bystander);
}
