//! Separate `skiff agent` processes for the scheduler tests (t40): each with
//! its own data dir, log, advertise address in 127.0.0.0/8 (127.0.0.2,
//! 127.0.0.3, ...), claimed host-port range and labels.
//!
//! Agents are killed by PID (never by name) on [`AgentCluster::kill9`] and
//! on drop. Their replicas outlive a killed agent (it re-adopts them when it
//! restarts), so on drop the replicas are killed too: the live processes,
//! started since the cluster was, whose `PORT` lies in one of the agents'
//! ranges.

use std::fs;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use tempfile::TempDir;

use crate::{
    allocations, claim_port_range, skiff_at, skiff_bin, wait_until, Allocation, PortRange, POLL,
};

/// One agent to start: node name, advertise address and labels (`zone=a`).
pub struct AgentSpec<'a> {
    pub name: &'a str,
    pub advertise: &'a str,
    pub labels: &'a [&'a str],
}

/// Unlabelled agents named `names`, advertising 127.0.0.2, 127.0.0.3, ...
/// in order (at most 8).
pub fn on_loopback<const N: usize>(names: [&'static str; N]) -> [AgentSpec<'static>; N] {
    const ADDRESSES: [&str; 8] = [
        "127.0.0.2",
        "127.0.0.3",
        "127.0.0.4",
        "127.0.0.5",
        "127.0.0.6",
        "127.0.0.7",
        "127.0.0.8",
        "127.0.0.9",
    ];
    let mut i = 0;
    names.map(|name| {
        let spec = AgentSpec {
            name,
            advertise: ADDRESSES[i],
            labels: &[],
        };
        i += 1;
        spec
    })
}

struct Agent {
    name: String,
    advertise: String,
    labels: Vec<String>,
    ports: PortRange,
    child: Option<Child>,
}

pub struct AgentCluster {
    dir: TempDir,
    servers: Vec<String>,
    agents: Vec<Agent>,
    /// Flags added to every agent (e.g. `--insecure-registry`).
    extra_args: Vec<String>,
    /// Agents run `--runtime process` replicas (`--enable-process-runtime`).
    process_runtime: bool,
    /// Clock ticks since boot when the cluster started; older processes
    /// are never killed on drop.
    since: u64,
    /// The agent join token (each agent keeps its certificate after the
    /// first start).
    token: String,
}

impl AgentCluster {
    /// Starts one agent per spec against `servers` and waits until the
    /// first server lists them all ready.
    pub fn start(servers: &[String], specs: &[AgentSpec]) -> Self {
        Self::start_with(servers, specs, &[])
    }

    /// Like [`AgentCluster::start`], with `extra_args` given to every agent.
    /// Containers (oci runtime) outlive a killed agent, so on drop the
    /// cluster also deletes what each agent's runtime still has.
    pub fn start_with(servers: &[String], specs: &[AgentSpec], extra_args: &[&str]) -> Self {
        Self::launch(servers, specs, extra_args, true)
    }

    /// Like [`AgentCluster::start_with`], with agents that refuse the
    /// process runtime (its default).
    pub fn start_without_process_runtime(
        servers: &[String],
        specs: &[AgentSpec],
        extra_args: &[&str],
    ) -> Self {
        Self::launch(servers, specs, extra_args, false)
    }

    fn launch(
        servers: &[String],
        specs: &[AgentSpec],
        extra_args: &[&str],
        process_runtime: bool,
    ) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("skiff-agents-")
            .tempdir()
            .expect("temp dir");
        let mut cluster = AgentCluster {
            dir,
            servers: servers.to_vec(),
            agents: Vec::new(),
            extra_args: extra_args.iter().map(|a| a.to_string()).collect(),
            process_runtime,
            since: boot_ticks(),
            token: crate::join_token(&servers[0], "agent"),
        };
        for spec in specs {
            cluster.agents.push(Agent {
                name: spec.name.to_string(),
                advertise: spec.advertise.to_string(),
                labels: spec.labels.iter().map(|l| l.to_string()).collect(),
                ports: claim_port_range(),
                child: None,
            });
        }
        for i in 0..cluster.agents.len() {
            cluster.spawn(i);
        }
        let ready = wait_until(Duration::from_secs(30), POLL, || {
            cluster.ready_nodes().len() == specs.len()
        });
        assert!(ready, "agents never all ready:\n{}", cluster.logs());
        cluster
    }

    fn spawn(&mut self, index: usize) {
        let agent = &self.agents[index];
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{}.log", agent.name)))
            .expect("agent log file");
        let mut command = Command::new(skiff_bin());
        command
            .env_remove("SKIFF_ADDR")
            .args([
                "agent",
                "--name",
                &agent.name,
                "--advertise",
                &agent.advertise,
            ])
            .arg("--data-dir")
            .arg(self.dir.path().join(&agent.name))
            .args(["--servers", &self.servers.join(",")])
            .args(["--token", &self.token])
            .args([
                "--port-range",
                &format!("{}-{}", agent.ports.start, agent.ports.end),
                "--stop-grace-secs",
                "2",
            ]);
        for label in &agent.labels {
            command.args(["--label", label]);
        }
        command.args(&self.extra_args);
        if self.process_runtime {
            command.arg("--enable-process-runtime");
        }
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let child = command.spawn().expect("start skiff agent");
        self.agents[index].child = Some(child);
    }

    /// Agent `index`'s `--data-dir`.
    pub fn data_dir(&self, index: usize) -> std::path::PathBuf {
        self.dir.path().join(&self.agents[index].name)
    }

    /// PID of agent `index` while it runs.
    pub fn pid(&self, index: usize) -> Option<u32> {
        self.agents[index].child.as_ref().map(Child::id)
    }

    pub fn name(&self, index: usize) -> &str {
        &self.agents[index].name
    }

    pub fn port_range(&self, index: usize) -> (u16, u16) {
        (self.agents[index].ports.start, self.agents[index].ports.end)
    }

    pub fn logs(&self) -> String {
        self.agents
            .iter()
            .map(|a| {
                let log = fs::read_to_string(self.dir.path().join(format!("{}.log", a.name)))
                    .unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                format!("--- {} ---\n{}\n", a.name, tail.join("\n"))
            })
            .collect()
    }

    /// Kills agent `index` with SIGKILL (its replicas keep running).
    pub fn kill9(&mut self, index: usize) {
        if let Some(mut child) = self.agents[index].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts a killed agent again on its data dir, address and ports.
    pub fn restart(&mut self, index: usize) {
        self.kill9(index);
        self.spawn(index);
    }

    /// `skiff node ls` as the first running server that answers sees it.
    pub fn nodes(&self) -> Vec<Value> {
        for server in &self.servers {
            let out = skiff_at(server, &["node", "ls", "--output", "json"]);
            if out.status.success() {
                if let Ok(Value::Array(nodes)) = serde_json::from_slice::<Value>(&out.stdout) {
                    return nodes;
                }
            }
        }
        Vec::new()
    }

    pub fn ready_nodes(&self) -> Vec<String> {
        self.nodes()
            .iter()
            .filter(|n| n["status"] == "ready")
            .filter_map(|n| n["name"].as_str().map(str::to_string))
            .collect()
    }

    /// Every allocation of `service` (`service ps --all`), from any server.
    pub fn allocs(&self, service: &str) -> Vec<Allocation> {
        for server in &self.servers {
            let out = skiff_at(
                server,
                &["service", "ps", service, "--all", "--output", "json"],
            );
            if out.status.success() {
                if let Ok(v) = serde_json::from_slice::<Value>(&out.stdout) {
                    return allocations(&v);
                }
            }
        }
        Vec::new()
    }

    /// Allocations of `service` wanted and reported running.
    pub fn running(&self, service: &str) -> Vec<Allocation> {
        self.allocs(service)
            .into_iter()
            .filter(Allocation::is_running)
            .collect()
    }

    /// PIDs of live processes started since the cluster whose `PORT` lies in
    /// agent `index`'s range: the replicas that really run on it.
    pub fn replica_pids(&self, index: usize) -> Vec<u32> {
        replicas_in_range(self.port_range(index), self.since)
    }
}

impl AgentCluster {
    /// Ids of the containers agent `agent`'s OCI runtimes have state for.
    fn container_ids(&self, agent: &Agent) -> Vec<String> {
        ["runc", "crun"]
            .iter()
            .map(|runtime| self.dir.path().join(&agent.name).join("oci").join(runtime))
            .filter_map(|root| fs::read_dir(root).ok())
            .flat_map(|entries| entries.flatten())
            .filter(|e| e.path().is_dir())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()
    }

    /// While the agents still run: removes every service and waits
    /// (bounded) until no container is left, so that each one is torn down
    /// by its agent, network teardown included. A container only deleted by force
    /// afterwards would leave its port-mapping rules behind, which then
    /// catch a later test's replica on the same host port.
    fn stop_containers(&self) {
        if self.agents.iter().all(|a| self.container_ids(a).is_empty()) {
            return;
        }
        for server in &self.servers {
            let out = skiff_at(server, &["service", "ls", "--output", "json"]);
            let Ok(Value::Array(services)) = serde_json::from_slice::<Value>(&out.stdout) else {
                continue;
            };
            for service in services {
                if let Some(name) = service["spec"]["name"].as_str() {
                    let _ = skiff_at(server, &["service", "rm", name]);
                }
            }
            break;
        }
        // A container's bundle goes last in its teardown, after its network teardown.
        wait_until(Duration::from_secs(30), POLL, || {
            self.agents.iter().all(|a| self.bundles(a) == 0)
        });
    }

    /// Container bundles under agent `agent`'s allocation directories.
    fn bundles(&self, agent: &Agent) -> usize {
        fs::read_dir(self.dir.path().join(&agent.name).join("allocs"))
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().join("bundle").is_dir())
            .count()
    }

    /// Deletes by force the containers the agents' OCI runtimes still
    /// know (after the agents are gone), their network namespaces and the
    /// mounts under the cluster's directory.
    fn remove_containers(&self) {
        for agent in &self.agents {
            for runtime in ["runc", "crun"] {
                let root = self.dir.path().join(&agent.name).join("oci").join(runtime);
                let ids: Vec<String> = fs::read_dir(&root)
                    .into_iter()
                    .flatten()
                    .filter_map(|e| e.ok())
                    .filter(|e| e.path().is_dir())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect();
                for id in ids {
                    let mut cmd = Command::new(runtime);
                    cmd.arg("--root")
                        .arg(&root)
                        .args(["delete", "--force", &id]);
                    let _ = crate::try_run_with_timeout(&mut cmd, Duration::from_secs(10));
                    let mut cmd = Command::new("ip");
                    cmd.args(["netns", "delete", &format!("skiff-{id}")]);
                    let _ = crate::try_run_with_timeout(&mut cmd, Duration::from_secs(10));
                }
            }
        }
        let dir = self.dir.path().display().to_string();
        let mut mounts: Vec<String> = crate::containers::mount_points()
            .into_iter()
            .filter(|m| m.starts_with(&dir))
            .collect();
        mounts.reverse();
        for m in mounts {
            let _ = crate::try_run_with_timeout(
                Command::new("umount").arg("-l").arg(&m),
                Duration::from_secs(10),
            );
        }
    }
}

impl Drop for AgentCluster {
    fn drop(&mut self) {
        self.stop_containers();
        for i in 0..self.agents.len() {
            self.kill9(i);
        }
        self.remove_containers();
        for i in 0..self.agents.len() {
            for pid in self.replica_pids(i) {
                if let Ok(pid) = i32::try_from(pid) {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
            }
        }
    }
}

fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// Clock ticks since boot now (the start time a process started now gets).
fn boot_ticks() -> u64 {
    stat_fields(std::process::id())
        .and_then(|f| f.get(19)?.parse().ok())
        .unwrap_or(0)
}

fn replicas_in_range(range: (u16, u16), since: u64) -> Vec<u32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let me = std::process::id();
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|&pid| {
            stat_fields(pid).is_some_and(|f| {
                !matches!(f.first().map(String::as_str), Some("Z" | "X"))
                    && f.get(19).and_then(|t| t.parse::<u64>().ok()) >= Some(since)
            })
        })
        .filter(|&pid| {
            let Ok(env) = fs::read(format!("/proc/{pid}/environ")) else {
                return false;
            };
            env.split(|&b| b == 0).any(|var| {
                var.strip_prefix(b"PORT=")
                    .and_then(|v| std::str::from_utf8(v).ok()?.parse::<u16>().ok())
                    .is_some_and(|p| (range.0..=range.1).contains(&p))
            })
        })
        .collect()
}
