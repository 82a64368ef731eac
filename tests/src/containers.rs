//! Helpers for end-to-end tests of real containers: the tools they need (with the apt package
//! that provides each), a local `docker-registry` with the busybox test images pushed to it
//! (`deploy/images/`), a `skiff dev` started with extra flags ([`OciDev`]), and checks that a
//! container left nothing behind (mounts, cgroups, runtime state, network namespaces, NAT
//! rules).
//!
//! Everything started here is stopped by PID when its guard drops, also when a test panics:
//! the registry by `registry.sh stop PID DIR` (and, should the test process die, by the
//! script's own `--watch`), the dev process with SIGTERM so that the agent stops and
//! destroys its containers, and whatever survives that with `runc delete --force`, `umount`
//! and `ip netns delete`.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::{
    claim_port_range, describe, free_port, proc_start_time, run_with_timeout, try_run_with_timeout,
    wait_until, Allocation, DevCluster, NODE_NAME, POLL,
};

/// How long a replica may take from `service create` to running (pull included).
pub const CONTAINER_TIMEOUT: Duration = Duration::from_secs(60);

/// Tools the container tests run, and the Debian package that installs each.
const TOOLS: &[(&str, &str)] = &[
    ("/usr/sbin/runc", "runc"),
    ("/usr/bin/crun", "crun"),
    ("/usr/bin/tini-static", "tini"),
    ("docker-registry", "docker-registry"),
    ("skopeo", "skopeo"),
    ("busybox", "busybox-static"),
    ("zstd", "zstd"),
    ("iptables", "iptables"),
    ("ip", "iproute2"),
    // build.sh's postgres and redis images (apt-get download, dpkg-deb -x, readelf), and
    // t39's psql in a replica's mount namespace.
    ("readelf", "binutils"),
    ("dpkg-deb", "dpkg"),
    ("nsenter", "util-linux"),
];

/// Whether `tool` (a path, or a name looked up in `PATH` and the sbin directories) exists.
fn tool_exists(tool: &str) -> bool {
    if tool.starts_with('/') {
        return Path::new(tool).exists()
            || Path::new(tool)
                .file_name()
                .is_some_and(|name| tool_exists(&name.to_string_lossy()));
    }
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/usr/bin", "/sbin", "/bin"])
        .any(|dir| Path::new(dir).join(tool).is_file());
    found
}

/// Panics, naming the apt packages to install, unless this runs as root with every tool the
/// container tests need. Nothing is skipped silently.
pub fn require_container_tools() {
    assert!(
        fs::read_to_string("/proc/self/status")
            .unwrap_or_default()
            .lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0")),
        "container tests need root (overlay mounts, network namespaces, cgroups)"
    );
    let mut missing: Vec<&str> = TOOLS
        .iter()
        .filter(|(tool, _)| !tool_exists(tool))
        .map(|(_, package)| *package)
        .collect();
    missing.dedup();
    assert!(
        missing.is_empty(),
        "container tests need more tools: apt-get install -y {}",
        missing.join(" ")
    );
}

// ---------------------------------------------------------------------------------------------
// Registry
// ---------------------------------------------------------------------------------------------

/// A `docker-registry` on 127.0.0.1 with the test images of `deploy/images/build.sh` pushed.
#[derive(Debug)]
pub struct Registry {
    pub pid: u32,
    /// `127.0.0.1:PORT`.
    pub addr: String,
    dir: PathBuf,
    /// `build.sh`'s output (`images.env`).
    images: tempfile::TempDir,
}

static SHARED: Mutex<Weak<Registry>> = Mutex::new(Weak::new());
static SHARED_DB: Mutex<Weak<Registry>> = Mutex::new(Weak::new());

impl Registry {
    /// The registry of this test binary: started and filled on first use, shared by tests
    /// running at the same time, stopped when the last of them drops it. Without the
    /// `postgres:v1` and `redis:v1` images (see [`Registry::shared_with_db`]).
    pub fn shared() -> Arc<Registry> {
        Self::shared_in(&SHARED, false)
    }

    /// As [`Registry::shared`], with the `postgres:v1` and `redis:v1` images too (about
    /// 40 MB more to push into each registry; their layers are cached by build.sh).
    pub fn shared_with_db() -> Arc<Registry> {
        Self::shared_in(&SHARED_DB, true)
    }

    fn shared_in(slot: &Mutex<Weak<Registry>>, db: bool) -> Arc<Registry> {
        let mut shared = slot.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(registry) = shared.upgrade() {
            return registry;
        }
        let registry = Arc::new(Registry::start_with(db));
        *shared = Arc::downgrade(&registry);
        registry
    }

    /// Starts a registry (stopped even if this process dies: `--watch`) and pushes the
    /// test images, without `postgres:v1` and `redis:v1`.
    pub fn start() -> Registry {
        Self::start_with(false)
    }

    /// Starts a registry and pushes the test images; `db`: `postgres:v1` and `redis:v1` too.
    pub fn start_with(db: bool) -> Registry {
        require_container_tools();
        let script = crate::workspace_root().join("deploy/images/registry.sh");
        let me = std::process::id().to_string();
        let out = run_with_timeout(
            Command::new(&script).args(["start", "--watch", &me]),
            Duration::from_secs(30),
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{}",
            describe(&["(registry.sh start)"], &out)
        );
        let field = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key))
                .unwrap_or_else(|| panic!("registry.sh printed no {key}: {text}"))
                .to_string()
        };
        let images = tempfile::Builder::new()
            .prefix("skiff-e2e-images-")
            .tempdir()
            .expect("create a temporary directory");
        let registry = Registry {
            pid: field("REGISTRY_PID=")
                .parse()
                .expect("REGISTRY_PID is a number"),
            addr: field("REGISTRY_ADDR="),
            dir: PathBuf::from(field("REGISTRY_DIR=")),
            images,
        };
        let build = crate::workspace_root().join("deploy/images/build.sh");
        let out = run_with_timeout(
            Command::new(&build)
                .arg(&registry.addr)
                .arg(registry.images.path())
                .env("SKIFF_IMAGES_DB", if db { "1" } else { "0" }),
            Duration::from_secs(180),
        );
        assert!(
            out.status.success(),
            "{}",
            describe(&["(build.sh)", &registry.addr], &out)
        );
        registry
    }

    /// `ADDR/skiff-test/NAME:TAG` for `name_tag` = `NAME:TAG`.
    pub fn image(&self, name_tag: &str) -> String {
        format!("{}/skiff-test/{name_tag}", self.addr)
    }

    /// The manifest digest `build.sh` recorded for `NAME:TAG`.
    pub fn digest(&self, name_tag: &str) -> Option<String> {
        let env = fs::read_to_string(self.images.path().join("images.env")).ok()?;
        let key = format!("skiff-test/{name_tag}=");
        env.lines()
            .find_map(|l| l.strip_prefix(&key).map(str::to_string))
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let script = crate::workspace_root().join("deploy/images/registry.sh");
        let mut cmd = Command::new(script);
        cmd.arg("stop").arg(self.pid.to_string()).arg(&self.dir);
        if let Err(e) = try_run_with_timeout(&mut cmd, Duration::from_secs(15)) {
            eprintln!("failed to stop the registry (pid {}): {e}", self.pid);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// OciDev
// ---------------------------------------------------------------------------------------------

/// A `skiff dev` process started with extra flags (`--insecure-registry`, `--oci-runtime`),
/// that cleans up its containers when dropped. Derefs to [`DevCluster`] for the CLI helpers.
pub struct OciDev {
    dev: DevCluster,
    extra: Vec<String>,
    /// Keeps the registry up as long as the cluster may pull from it.
    _registry: Arc<Registry>,
}

impl Deref for OciDev {
    type Target = DevCluster;
    fn deref(&self) -> &DevCluster {
        &self.dev
    }
}

impl DerefMut for OciDev {
    fn deref_mut(&mut self) -> &mut DevCluster {
        &mut self.dev
    }
}

impl OciDev {
    /// Starts `skiff dev --insecure-registry <registry> --stop-grace-secs 3 <extra>` and waits
    /// until its node is ready.
    pub fn start(registry: Arc<Registry>, extra: &[&str]) -> OciDev {
        require_container_tools();
        let dir = tempfile::Builder::new()
            .prefix("skiff-e2e-oci-")
            .tempdir()
            .expect("create a temporary directory");
        let mut all: Vec<String> = vec![
            "--insecure-registry".into(),
            registry.addr.clone(),
            "--stop-grace-secs".into(),
            "3".into(),
        ];
        all.extend(extra.iter().map(|s| s.to_string()));
        let mut cluster = OciDev {
            dev: DevCluster {
                bin: crate::skiff_bin(),
                dir: Some(dir),
                listen_port: free_port(),
                metrics_ports: (free_port(), free_port()),
                ports: claim_port_range(),
                child: None,
                started_at: 0,
                seen: Mutex::new(Default::default()),
            },
            extra: all,
            _registry: registry,
        };
        cluster.spawn();
        cluster.dev.started_at = cluster
            .dev
            .dev_pid()
            .and_then(proc_start_time)
            .unwrap_or_default();
        cluster.dev.wait_ready();
        cluster
    }

    fn spawn(&mut self) {
        let dev = &mut self.dev;
        assert!(dev.child.is_none(), "dev process already running");
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(dev.log_path())
            .expect("open dev.log");
        let _ = writeln!(log, "==== e2e: starting skiff dev on {} ====", dev.addr());
        crate::use_cluster_ca(&dev.data_dir().join("server/pki/ca.crt"));
        let child = Command::new(&dev.bin)
            .arg("dev")
            .arg("--data-dir")
            .arg(dev.data_dir())
            .arg("--listen")
            .arg(dev.addr())
            .arg("--port-range")
            .arg(format!("{}-{}", dev.ports.start, dev.ports.end))
            .arg("--name")
            .arg(NODE_NAME)
            .arg("--server-metrics-listen")
            .arg(dev.server_metrics_addr().to_string())
            .arg("--metrics-listen")
            .arg(dev.agent_metrics_addr().to_string())
            .args(&self.extra)
            .env_remove("SKIFF_ADDR")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone dev.log handle"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("failed to start {} dev: {e}", dev.bin.display()));
        dev.child = Some(child);
    }

    /// Starts `skiff dev` again (after [`DevCluster::kill9`]) with the same flags and data,
    /// and waits until its node is ready.
    pub fn restart(&mut self) {
        self.dev.kill9();
        self.spawn();
        self.dev.wait_ready();
    }

    /// The agent's data directory.
    pub fn agent_dir(&self) -> PathBuf {
        self.data_dir().join("agent")
    }

    /// The `--root` of OCI runtime `runtime` (`runc`, `crun`).
    pub fn runtime_root(&self, runtime: &str) -> PathBuf {
        self.agent_dir().join("oci").join(runtime)
    }

    /// Ids of the containers the runtime has state for.
    pub fn container_ids(&self, runtime: &str) -> Vec<String> {
        let mut ids: Vec<String> = fs::read_dir(self.runtime_root(runtime))
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_dir())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        ids.sort();
        ids
    }

    /// Waits until `service` has exactly `n` replicas desired to run that satisfy `ok`, and
    /// returns them; panics with the last `service ps` and the dev log if not within
    /// [`CONTAINER_TIMEOUT`].
    pub fn wait_replicas(
        &self,
        service: &str,
        n: usize,
        what: &str,
        mut ok: impl FnMut(&Allocation) -> bool,
    ) -> Vec<Allocation> {
        let mut last = Vec::new();
        let done = wait_until(CONTAINER_TIMEOUT, POLL, || {
            last = self.ps(service);
            last.len() == n && last.iter().all(&mut ok)
        });
        assert!(
            done,
            "{service}: expected {n} replicas {what} within {CONTAINER_TIMEOUT:?}; last ps: \
             {last:#?}\n--- dev log ---\n{}",
            self.log_tail(40)
        );
        last
    }

    /// SIGTERM to the dev process: the agent stops its containers and destroys them. Waits
    /// (bounded) for it to exit; `false` if it did not.
    pub fn stop_gracefully(&mut self) -> bool {
        let Some(mut child) = self.dev.child.take() else {
            return true;
        };
        let pid = Pid::from_raw(i32::try_from(child.id()).expect("pid fits i32"));
        let _ = kill(pid, Signal::SIGTERM);
        let exited = wait_until(Duration::from_secs(30), POLL, || {
            matches!(child.try_wait(), Ok(Some(_)))
        });
        if !exited {
            let _ = child.kill();
        }
        let _ = child.wait();
        exited
    }

    /// Removes by force whatever containers of this cluster are left: runtime state,
    /// mounts under the data directory, network namespaces.
    fn force_cleanup(&self) {
        for runtime in ["runc", "crun"] {
            let root = self.runtime_root(runtime);
            for id in self.container_ids(runtime) {
                let mut cmd = Command::new(runtime);
                cmd.arg("--root")
                    .arg(&root)
                    .args(["delete", "--force", &id]);
                let _ = try_run_with_timeout(&mut cmd, Duration::from_secs(10));
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "delete", &format!("skiff-{id}")]);
                let _ = try_run_with_timeout(&mut cmd, Duration::from_secs(10));
            }
        }
        let data = self.data_dir().display().to_string();
        let mut mounts: Vec<String> = mount_points()
            .into_iter()
            .filter(|m| m.starts_with(&data))
            .collect();
        mounts.reverse();
        for m in mounts {
            let _ = try_run_with_timeout(
                Command::new("umount").arg("-l").arg(&m),
                Duration::from_secs(10),
            );
        }
    }
}

impl Drop for OciDev {
    fn drop(&mut self) {
        let left = !self.container_ids("runc").is_empty() || !self.container_ids("crun").is_empty();
        if self.dev.child.is_none() && left {
            // Killed by the test: a new agent re-adopts the containers so that it can stop them.
            self.spawn();
            let ready = wait_until(Duration::from_secs(20), POLL, || {
                let out = self.dev.skiff(&["node", "ls"]);
                out.status.success()
            });
            if !ready {
                eprintln!("skiff dev did not come back to clean up its containers");
            }
        }
        if !self.stop_gracefully() {
            eprintln!("skiff dev did not stop within 30 s after SIGTERM");
        }
        self.force_cleanup();
    }
}

// ---------------------------------------------------------------------------------------------
// What a container leaves behind
// ---------------------------------------------------------------------------------------------

/// Mount points of this process's mount namespace (`/proc/self/mountinfo`), unescaped.
pub fn mount_points() -> Vec<String> {
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| {
            m.replace("\\040", " ")
                .replace("\\011", "\t")
                .replace("\\012", "\n")
                .replace("\\134", "\\")
        })
        .collect()
}

/// Mount points of every cgroup hierarchy (v1 and v2).
pub fn cgroup_hierarchies() -> Vec<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut roots: Vec<PathBuf> = info
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let fstype = right.split(' ').next()?;
            let mount_point = left.split(' ').nth(4)?;
            matches!(fstype, "cgroup" | "cgroup2").then(|| PathBuf::from(mount_point))
        })
        .collect();
    roots.sort();
    roots.dedup();
    roots
}

/// The memory limit of `pid`'s cgroup in bytes (`memory.limit_in_bytes` on v1,
/// `memory.max` on v2); `None` if unlimited or unreadable.
pub fn memory_limit(pid: u32) -> Option<u64> {
    let cgroups = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    for line in cgroups.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let path = path.trim_start_matches('/');
        let file = if controllers.split(',').any(|c| c == "memory") {
            cgroup_hierarchies()
                .into_iter()
                .find(|root| {
                    root.join("memory.limit_in_bytes").exists() || root.ends_with("memory")
                })
                .map(|root| root.join(path).join("memory.limit_in_bytes"))
        } else if controllers.is_empty() {
            cgroup_hierarchies()
                .into_iter()
                .map(|root| root.join(path).join("memory.max"))
                .find(|f| f.exists())
        } else {
            None
        };
        if let Some(value) = file.and_then(|f| fs::read_to_string(f).ok()) {
            if let Ok(limit) = value.trim().parse::<u64>() {
                return Some(limit);
            }
        }
    }
    None
}

/// The `Uid:` line of `/proc/<pid>/status`: real, effective, saved and fs uid.
pub fn uids(pid: u32) -> Vec<u32> {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .map(|ids| {
            ids.split_whitespace()
                .filter_map(|i| i.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// PIDs of `pid`'s children.
pub fn children(pid: u32) -> Vec<u32> {
    let mut found = Vec::new();
    for task in fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let path = task.path().join("children");
        let text = fs::read_to_string(path).unwrap_or_default();
        found.extend(
            text.split_whitespace()
                .filter_map(|c| c.parse::<u32>().ok()),
        );
    }
    found
}

/// What container `id` of the cluster left behind: its allocation dir, mounts under its bundle, cgroup
/// directories `/skiff/<id>`, runtime state, its network namespace, its NAT rules. Empty when
/// nothing is left.
pub fn leftovers(cluster: &OciDev, runtime: &str, id: &str) -> Vec<String> {
    let mut left = Vec::new();
    let alloc_dir = cluster.agent_dir().join("allocs").join(id);
    // Deleted last, after the runtime destroyed the replica and gave up
    // its image: until then a prune still finds the image in use.
    if alloc_dir.exists() {
        left.push(format!("allocation dir {}", alloc_dir.display()));
    }
    let bundle = alloc_dir.display().to_string();
    left.extend(
        mount_points()
            .into_iter()
            .filter(|m| m.starts_with(&bundle))
            .map(|m| format!("mount {m}")),
    );
    left.extend(
        cgroup_hierarchies()
            .into_iter()
            .map(|root| root.join("skiff").join(id))
            .filter(|dir| dir.exists())
            .map(|dir| format!("cgroup {}", dir.display())),
    );
    let state = cluster.runtime_root(runtime).join(id);
    if state.exists() {
        left.push(format!("runtime state {}", state.display()));
    }
    let netns = Path::new("/run/netns").join(format!("skiff-{id}"));
    if netns.exists() {
        left.push(format!("network namespace {}", netns.display()));
    }
    let out = try_run_with_timeout(
        Command::new("iptables").args(["-t", "nat", "-S"]),
        Duration::from_secs(10),
    );
    if let Ok(out) = out {
        let wanted = format!("skiff-{id}");
        left.extend(
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| l.contains(&wanted))
                .map(|l| format!("NAT rule {l}")),
        );
    }
    left
}
