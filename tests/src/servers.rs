//! A cluster of real `skiff server` processes on loopback for the
//! control-plane tests: each with its own data dir and log under one temp
//! dir, started with `--bootstrap` / `--join`, killed by PID (never by name)
//! on [`ServerCluster::kill9`] and on drop.

use std::fs;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

use crate::{free_port, json_at, skiff_at, skiff_bin, wait_until, POLL};

/// The role `skiff cluster status` gives a server that joined and is not
/// yet a voter.
pub const LEARNER: &str = "learner (catching up)";

pub struct ServerCluster {
    dir: TempDir,
    pub addresses: Vec<String>,
    children: Vec<Option<Child>>,
    extra_args: Vec<String>,
    /// Added to the environment of the next server spawned.
    env: Vec<(String, String)>,
    /// The loopback address of each server to come (127.0.0.1 past the
    /// end): partition tests give each server one of its own.
    ips: Vec<String>,
}

impl ServerCluster {
    /// Starts `size` servers: the first bootstraps, the others join it.
    pub fn start(size: usize, extra_args: &[&str]) -> Self {
        Self::start_on(&vec!["127.0.0.1"; size], extra_args)
    }

    /// Like [`ServerCluster::start`], one server per address in `ips`
    /// (loopback addresses; each server also dials other servers from its
    /// own, so packet filters can cut address pairs, see `partition`).
    pub fn start_on(ips: &[&str], extra_args: &[&str]) -> Self {
        let size = ips.len();
        let dir = tempfile::Builder::new()
            .prefix("skiff-servers-")
            .tempdir()
            .expect("temp dir");
        let mut cluster = ServerCluster {
            dir,
            addresses: Vec::new(),
            children: Vec::new(),
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            env: Vec::new(),
            ips: ips.iter().map(|ip| ip.to_string()).collect(),
        };
        for _ in 0..size {
            cluster.add_server();
        }
        cluster.wait_for_members(size);
        cluster
    }

    /// Starts one more server that joins through the first one.
    pub fn add_server(&mut self) -> usize {
        let index = self.addresses.len();
        let ip = self.ips.get(index).map_or("127.0.0.1", String::as_str);
        self.addresses.push(format!("{ip}:{}", free_port()));
        self.children.push(None);
        self.spawn(index);
        if index == 0 {
            crate::wait_for_token_of(&self.data_dir(0));
            assert!(
                wait_until(Duration::from_secs(15), POLL, || self.leader().is_some()),
                "the first server never became leader:\n{}",
                self.log(0)
            );
        }
        index
    }

    fn spawn(&mut self, index: usize) {
        self.spawn_with(index, &[]);
    }

    /// Starts server `index` again with `env` added to its environment
    /// (e.g. the clock-fault hook `SKIFF_CLOCK_OFFSET_MS`).
    pub fn respawn_with_env(&mut self, index: usize, env: &[(&str, &str)]) {
        self.kill9(index);
        self.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.spawn_with(index, &[]);
        self.env.clear();
    }

    /// Starts server `index` again on its data dir and address with
    /// `args` added (`--restore FILE`, `--recover`); `wipe` first empties
    /// its data dir, as a lost machine's.
    pub fn respawn_with(&mut self, index: usize, wipe: bool, args: &[&str]) {
        self.kill9(index);
        if wipe {
            let _ = fs::remove_dir_all(self.data_dir(index));
        }
        self.spawn_with(index, args);
    }

    /// Kills server `index` and empties its data dir, as a lost machine's.
    pub fn kill_and_wipe(&mut self, index: usize) {
        self.kill9(index);
        let _ = fs::remove_dir_all(self.data_dir(index));
    }

    fn spawn_with(&mut self, index: usize, args: &[&str]) {
        let name = format!("s{}", index + 1);
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{name}.log")))
            .expect("log file");
        let mut command = Command::new(skiff_bin());
        command
            .env_remove("SKIFF_ADDR")
            .args([
                "server",
                "--name",
                &name,
                "--listen",
                &self.addresses[index],
            ])
            .arg("--data-dir")
            .arg(self.dir.path().join(&name))
            .args(&self.extra_args)
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("SKIFF_CLOCK_OFFSET_FILE", self.clock_file(index))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let recovering = args.contains(&"--recover");
        if index == 0 && !recovering {
            command.arg("--bootstrap");
            crate::use_cluster_ca(&self.data_dir(0).join("pki/ca.crt"));
        } else if !recovering && !self.data_dir(index).join("pki/ca.key").exists() {
            // A new member: it joins the first running one with the server token.
            let members: Vec<&str> = (0..self.addresses.len())
                .filter(|i| *i != index && self.children[*i].is_some())
                .map(|i| self.addresses[i].as_str())
                .collect();
            let token = crate::join_token(&members.join(","), "server");
            command.args(["--join", members[0], "--token", &token]);
        }
        self.children[index] = Some(command.spawn().expect("start skiff server"));
    }

    /// The file server `index` reads its clock offset from (the test hook
    /// `SKIFF_CLOCK_OFFSET_FILE`; absent: no offset).
    fn clock_file(&self, index: usize) -> std::path::PathBuf {
        self.dir
            .path()
            .join(format!("s{}.clock-offset-ms", index + 1))
    }

    /// Makes server `index`'s wall clock jump to `offset_ms` from the real
    /// one while it runs; it reads the new offset within 100 ms.
    pub fn jump_clock(&self, index: usize, offset_ms: i64) {
        fs::write(self.clock_file(index), offset_ms.to_string()).expect("clock offset file");
        std::thread::sleep(Duration::from_millis(300));
    }

    /// Server `index`'s `--data-dir`.
    pub fn data_dir(&self, index: usize) -> std::path::PathBuf {
        self.dir.path().join(format!("s{}", index + 1))
    }

    pub fn log(&self, index: usize) -> String {
        fs::read_to_string(self.dir.path().join(format!("s{}.log", index + 1))).unwrap_or_default()
    }

    pub fn is_running(&self, index: usize) -> bool {
        self.children[index].is_some()
    }

    pub fn kill9(&mut self, index: usize) {
        if let Some(mut child) = self.children[index].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts a killed server again on its data dir and address.
    pub fn restart(&mut self, index: usize) {
        self.kill9(index);
        self.spawn(index);
    }

    /// `skiff cluster status` as some running server sees it.
    pub fn status(&self) -> Option<Value> {
        (0..self.addresses.len())
            .filter(|i| self.is_running(*i))
            .find_map(|i| {
                let out = skiff_at(
                    &self.addresses[i],
                    &["cluster", "status", "--output", "json"],
                );
                if !out.status.success() {
                    return None;
                }
                serde_json::from_slice::<Value>(&out.stdout)
                    .ok()
                    .filter(|s| s["leader"] != "")
            })
    }

    /// `skiff cluster status` as server `index` itself sees it (its own
    /// role, term and commit index; `leader` is empty while it knows none).
    pub fn status_of(&self, index: usize) -> Option<Value> {
        json_at(&self.addresses[index], &["cluster", "status"])
    }

    /// Server `index`'s role in its own eyes (`leader`, `follower`, ...).
    pub fn role_of(&self, index: usize) -> Option<String> {
        let status = self.status_of(index)?;
        let me = &self.addresses[index];
        status["members"]
            .as_array()?
            .iter()
            .find(|m| m["address"] == me.as_str())
            .and_then(|m| m["role"].as_str())
            .map(str::to_string)
    }

    /// The leader server `index` knows of, by index.
    pub fn leader_seen_by(&self, index: usize) -> Option<usize> {
        let status = self.status_of(index)?;
        let leader = status["members"]
            .as_array()?
            .iter()
            .find(|m| m["role"] == "leader")?;
        self.addresses
            .iter()
            .position(|a| leader["address"] == a.as_str())
    }

    /// Index of the current leader, as a running server reports it.
    pub fn leader(&self) -> Option<usize> {
        let status = self.status()?;
        let members = status["members"].as_array()?;
        let leader = members.iter().find(|m| m["role"] == "leader")?;
        self.addresses
            .iter()
            .position(|a| leader["address"] == a.as_str())
    }

    /// Waits until every running server counts `size` members, all of them
    /// voters (a joined server is a learner until it has caught up). Every
    /// server, not one: a follower that has not applied the last promotion
    /// yet cannot win an election without the old leader's vote.
    pub fn wait_for_members(&self, size: usize) {
        let sees_all_voters = |index: usize| {
            let out = skiff_at(
                &self.addresses[index],
                &["cluster", "status", "--output", "json"],
            );
            let Ok(status) = serde_json::from_slice::<Value>(&out.stdout) else {
                return false;
            };
            let Some(members) = status["members"].as_array() else {
                return false;
            };
            out.status.success()
                && status["leader"] != ""
                && members.len() == size
                && members.iter().all(|m| m["role"] != LEARNER)
        };
        let ok = wait_until(Duration::from_secs(30), POLL, || {
            (0..self.addresses.len())
                .filter(|i| self.is_running(*i))
                .all(sees_all_voters)
        });
        assert!(
            ok,
            "cluster did not reach {size} voting members:\n{}",
            self.log(0)
        );
    }

    /// Writes one variable through server `index`; true if acknowledged.
    pub fn put(&self, index: usize, key: &str, value: &str) -> bool {
        skiff_at(&self.addresses[index], &["var", "put", key, value])
            .status
            .success()
    }

    /// All variables with `prefix`, read through server `index` (a
    /// linearizable read of that server's own applied state).
    pub fn variables(&self, index: usize, prefix: &str) -> Option<serde_json::Map<String, Value>> {
        let out = skiff_at(
            &self.addresses[index],
            &["var", "ls", prefix, "--output", "json"],
        );
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice::<Value>(&out.stdout)
            .ok()?
            .as_object()
            .cloned()
    }

    /// Time until a write through any running server succeeds (bounded).
    pub fn time_to_first_write(&self, key: &str, limit: Duration) -> Option<Duration> {
        let started = Instant::now();
        let running: Vec<usize> = (0..self.addresses.len())
            .filter(|i| self.is_running(*i))
            .collect();
        let mut round = 0;
        while started.elapsed() < limit {
            let index = running[round % running.len()];
            round += 1;
            if self.put(index, key, "x") {
                return Some(started.elapsed());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for ServerCluster {
    fn drop(&mut self) {
        for index in 0..self.children.len() {
            self.kill9(index);
        }
    }
}
