//! The `oci` runtime: a replica is a container from an image, run by runc
//! (or crun) with a runtime spec we write. Containers are started with
//! `run --detach` by a per-container [`shim`] (the agent's binary as
//! `skiff shim`), their output going straight to log files, so they outlive
//! the agent; the shim waits for the container and records its exit status
//! in the bundle, so a restarted agent, which re-adopts containers through
//! `runc state`, still learns how they ended. Stopping is the image's stop
//! signal (SIGTERM by default), SIGKILL after the grace, then `delete`,
//! network teardown, rootfs unmount and cgroup removal.
//!
//! Layout per allocation: `DATA/allocs/<id>/{stdout.log,stderr.log}` and the
//! bundle `DATA/allocs/<id>/bundle/{config.json,rootfs,hosts,resolv.conf,
//! skiff.json,exit.json}`; runtime state under `DATA/oci/<runtime>`.

pub mod bridge;
pub mod cgroup;
pub mod images;
pub mod runc;
pub mod seccomp;
pub mod shim;
pub mod spec;

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use self::bridge::{BridgeNetwork, PortMapping};
use self::images::{ImageDefaults, ImageSource};
use self::runc::{find_in_path, Runc};
use self::shim::{ShimConfig, ShimProcess};
use super::reaper::{self, Reaped};
use super::{procfs, Exit, Runtime, RuntimeError, TaskHandle};
use crate::health::HealthCheck;
use crate::spec::{Network, ReplicaSpec};

const POLL: Duration = Duration::from_millis(200);
const KILL_WAIT: Duration = Duration::from_secs(10);
/// How long a clean-up waits for a shim to record its container's exit.
const SHIM_EXIT_WAIT: Duration = Duration::from_secs(2);
pub const NO_RUNTIME: &str = "no OCI runtime installed: install runc (apt-get install runc)";
pub const DEFAULT_INIT: &str = "/usr/bin/tini-static";

/// How the oci runtime is set up on this node.
#[derive(Debug, Clone)]
pub struct OciConfig {
    /// `runc`, `crun` or a path; `None`: runc if installed, else crun.
    pub runtime: Option<String>,
    /// Holds the runtime's state dirs (`--root`).
    pub state_dir: PathBuf,
    /// `DATA/allocs`: where [`Runtime::recover`] finds a container's bundle.
    pub allocs_dir: PathBuf,
    pub network: BridgeNetwork,
    /// Static init bind-mounted into containers; `None` or missing: no init.
    pub init_binary: Option<PathBuf>,
    /// The binary that runs `shim` (see [`shim::set_binary`]); `None`:
    /// containers are started without a shim, and an exit while no agent
    /// watches is known only as "exited".
    pub shim: Option<PathBuf>,
    /// The node's named volumes and allowed host paths.
    pub volumes: crate::volumes::Volumes,
    /// This node's DNS server for discovery by name; `None`: containers
    /// get the host's resolvers.
    pub nameserver: Option<std::net::Ipv4Addr>,
    /// Writes the replicas' secret files; `None`: containers that use
    /// secrets fail to start.
    pub secrets: Option<Arc<crate::secrets::Secrets>>,
}

impl OciConfig {
    pub fn new(state_dir: PathBuf, allocs_dir: PathBuf) -> Self {
        Self {
            runtime: None,
            state_dir,
            network: BridgeNetwork::default(),
            init_binary: Some(PathBuf::from(DEFAULT_INIT)),
            shim: None,
            volumes: crate::volumes::Volumes::new(allocs_dir.with_file_name("volumes"), Vec::new()),
            nameserver: None,
            secrets: None,
            allocs_dir,
        }
    }
}

/// Finds the runtime binary `choice` names (see [`OciConfig::runtime`]).
pub fn resolve_runtime(choice: Option<&str>) -> Result<PathBuf, String> {
    match choice {
        None | Some("") => find_in_path("runc")
            .or_else(|| find_in_path("crun"))
            .ok_or_else(|| NO_RUNTIME.to_string()),
        Some(name @ ("runc" | "crun")) => find_in_path(name).ok_or_else(|| {
            format!("OCI runtime {name} is not installed: install it (apt-get install {name})")
        }),
        Some(path) => {
            let path = PathBuf::from(path);
            if path.is_file() {
                Ok(path)
            } else {
                Err(format!("OCI runtime {} does not exist", path.display()))
            }
        }
    }
}

/// What the agent keeps about a running container in its bundle, so a
/// restarted agent can check, probe, stop and clean it up.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct ContainerInfo {
    stop_signal: String,
    health: Option<HealthCheck>,
    probe_addr: Option<SocketAddr>,
    port: Option<(u16, u16)>,
    /// The container's address on the node bridge.
    ip: Option<std::net::Ipv4Addr>,
    /// The shim watching the container, if it was started through one.
    shim: Option<ShimProcess>,
}

pub struct OciRuntime {
    /// The runtime, or why there is none.
    runc: Result<Runc, String>,
    images: Option<Arc<dyn ImageSource>>,
    pulled: Mutex<HashMap<String, ImageDefaults>>,
    /// The image of every allocation this runtime prepares, runs or
    /// re-adopted, by allocation id, until it is destroyed: what garbage
    /// collection must keep.
    leases: Arc<Mutex<HashMap<String, String>>>,
    network: BridgeNetwork,
    init: Option<PathBuf>,
    shim: Option<PathBuf>,
    allocs_dir: PathBuf,
    volumes: crate::volumes::Volumes,
    nameserver: Option<std::net::Ipv4Addr>,
    secrets: Option<Arc<crate::secrets::Secrets>>,
}

impl OciRuntime {
    /// Never fails: a node without runtime or images still runs process
    /// replicas, and oci replicas fail with the reason.
    pub fn new(config: OciConfig, images: Option<Arc<dyn ImageSource>>) -> Self {
        let runc = resolve_runtime(config.runtime.as_deref()).and_then(|binary| {
            let name = binary
                .file_name()
                .map_or("runtime".into(), |n| n.to_string_lossy().into_owned());
            let root = config.state_dir.join(name);
            fs::create_dir_all(&root)
                .map_err(|e| format!("cannot create runtime state dir {}: {e}", root.display()))?;
            Ok(Runc::new(binary, root))
        });
        match &runc {
            Ok(r) => {
                if let Err(e) = reaper::become_subreaper() {
                    tracing::warn!(error = %e, "container exit codes may be lost");
                }
                tracing::info!(runtime = %r.binary().display(), shim = config.shim.is_some(), "oci runtime ready");
            }
            Err(e) => tracing::warn!(reason = %e, "oci replicas cannot run on this node"),
        }
        Self {
            runc,
            images,
            pulled: Mutex::new(HashMap::new()),
            leases: Arc::default(),
            network: config.network,
            init: config.init_binary.filter(|p| p.is_file()),
            shim: config.shim,
            allocs_dir: config.allocs_dir,
            volumes: config.volumes,
            nameserver: config.nameserver,
            secrets: config.secrets,
        }
    }

    /// Removes the NAT rules and address leases of containers that went
    /// without a teardown (see [`BridgeNetwork::sweep`]). Run once at start;
    /// a failure only costs a warning.
    pub fn sweep_network(&self) {
        if self.runc.is_err() {
            return;
        }
        if let Err(e) = self.network.sweep() {
            tracing::warn!(error = %e, "failed to sweep the network leftovers of gone containers");
        }
    }

    pub fn runc(&self) -> Result<&Runc, String> {
        self.runc.as_ref().map_err(Clone::clone)
    }

    fn lease(&self, spec: &ReplicaSpec) {
        self.leases
            .lock()
            .expect("lease table poisoned")
            .insert(spec.alloc_id.clone(), spec.image.clone());
    }

    /// Removes the stored images no allocation of this node uses (never
    /// one that is pulling, starting, running or waiting to restart).
    pub async fn prune_images(&self) -> Result<crate::image::PruneReport, String> {
        let Some(images) = &self.images else {
            return Ok(crate::image::PruneReport::default());
        };
        let leases = self.leases.clone();
        images
            .prune(Box::new(move || {
                leases
                    .lock()
                    .expect("lease table poisoned")
                    .values()
                    .cloned()
                    .collect()
            }))
            .await
    }

    /// Bytes the stored images take on disk.
    pub fn image_disk_usage(&self) -> u64 {
        self.images.as_ref().map_or(0, |i| i.disk_usage())
    }

    fn error(spec: &ReplicaSpec, reason: String) -> RuntimeError {
        RuntimeError::Start {
            short_id: spec.short_id().to_string(),
            service: spec.service.clone(),
            program: spec.image.clone(),
            reason,
        }
    }

    fn unsupported(spec: &ReplicaSpec, reason: String) -> RuntimeError {
        RuntimeError::Unsupported {
            short_id: spec.short_id().to_string(),
            service: spec.service.clone(),
            reason,
        }
    }

    fn bundle(alloc_dir: &Path) -> PathBuf {
        alloc_dir.join("bundle")
    }

    /// The cgroupsPath runc gets for `spec`'s container.
    pub(crate) fn cgroups_path(spec: &ReplicaSpec) -> PathBuf {
        PathBuf::from("/skiff").join(&spec.alloc_id)
    }

    fn read_info(alloc_dir: &Path) -> ContainerInfo {
        fs::read(Self::bundle(alloc_dir).join("skiff.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// Everything up to `runc run`; on error the caller destroys.
    fn start_inner(
        &self,
        spec: &ReplicaSpec,
        alloc_dir: &Path,
        runc: &Runc,
    ) -> Result<OciHandle, String> {
        let image = self
            .pulled
            .lock()
            .expect("image table poisoned")
            .get(&spec.image)
            .cloned()
            .ok_or_else(|| format!("image {} is not pulled", spec.image))?;
        let images = self
            .images
            .as_ref()
            .ok_or("this agent has no image store")?;
        let began = std::time::Instant::now();
        let bundle = Self::bundle(alloc_dir);
        fs::create_dir_all(&bundle)
            .map_err(|e| format!("cannot create {}: {e}", bundle.display()))?;
        // The bundle holds the container's config (its environment) and
        // its rootfs mount: root only, like the image store.
        {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&bundle, fs::Permissions::from_mode(0o700))
                .map_err(|e| format!("cannot restrict {}: {e}", bundle.display()))?;
        }
        let rootfs = images.mount_rootfs(&spec.image, &bundle)?;
        let mounted = began.elapsed();
        let user_name = if spec.user.is_empty() {
            &image.user
        } else {
            &spec.user
        };
        let user = images.lookup_user(&spec.image, user_name)?;
        let meta = crate::volumes::VolumeMeta {
            service: spec.service.clone(),
            slot: spec.slot,
        };
        let mut binds = self
            .volumes
            .binds(
                &spec.mounts,
                &meta,
                &image.volumes,
                &rootfs,
                alloc_dir,
                (user.uid, user.gid),
            )
            .map_err(|e| e.to_string())?;
        if !spec.secrets.is_empty() {
            let secrets = self.secrets.as_ref().ok_or("this agent holds no secrets")?;
            let dir = secrets
                .populate(&spec.alloc_id, &spec.secrets, (user.uid, user.gid))
                .map_err(|e| e.to_string())?;
            binds.push(crate::volumes::Bind {
                source: dir,
                target: skiff_spec::SECRETS_DIR.to_string(),
                read_only: true,
            });
        }
        let port = spec.listen_port(image.first_tcp_port());
        let hostname = format!("{}-{}", spec.service, spec.short_id());
        let mut info = ContainerInfo {
            stop_signal: stop_signal(image.stop_signal.as_deref()),
            health: spec.health.clone().or_else(|| image.healthcheck.clone()),
            ..ContainerInfo::default()
        };
        let (netns, ip) = match spec.network {
            Network::Bridge => {
                let mapping = PortMapping {
                    host_port: spec.host_port,
                    container_port: port,
                };
                info.port = Some((spec.host_port, port));
                // Recorded before ADD so a failed ADD is still undone.
                write_info(&bundle, &info)?;
                let ip = self.network.add(&spec.alloc_id, mapping)?;
                info.ip = Some(ip);
                info.probe_addr = Some(SocketAddr::from((ip, port)));
                (Some(BridgeNetwork::netns_path(&spec.alloc_id)), Some(ip))
            }
            Network::Host => {
                info.probe_addr = Some(SocketAddr::from(([127, 0, 0, 1], port)));
                (None, None)
            }
        };
        let networked = began.elapsed();
        write_info(&bundle, &info)?;
        let host_resolv = fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        let resolv = bundle.join("resolv.conf");
        let hosts = bundle.join("hosts");
        let resolv_text = match self.nameserver {
            Some(nameserver) => crate::discovery::names::resolv_conf(nameserver, &spec.stack),
            None => spec::resolv_conf(&host_resolv, netns.is_some()),
        };
        write(&resolv, &resolv_text)?;
        write(&hosts, &spec::hosts_file(&hostname, ip))?;
        let setup = spec::ContainerSetup {
            rootfs,
            hostname,
            netns,
            init: self.init.clone(),
            resolv_conf: resolv,
            hosts,
            cgroups_path: Self::cgroups_path(spec),
            port,
            seccomp: seccomp::for_replica(spec.seccomp.as_deref())?,
            binds,
        };
        let oci = spec::build(spec, &image, &user, &setup)?;
        let json = serde_json::to_vec_pretty(&oci)
            .map_err(|e| format!("cannot encode the runtime spec: {e}"))?;
        write_bytes(&bundle.join("config.json"), &json)?;

        let configured = began.elapsed();
        let (stdout, stderr) = (alloc_dir.join("stdout.log"), alloc_dir.join("stderr.log"));
        let pid = match &self.shim {
            Some(binary) => {
                let config = ShimConfig {
                    runtime: runc.binary().to_path_buf(),
                    root: runc.root().to_path_buf(),
                    bundle: bundle.clone(),
                    stdout,
                    stderr,
                    id: spec.alloc_id.clone(),
                };
                let (pid, shim) =
                    shim::start(binary, runc, &config).map_err(|e| explain_runtime_error(&e))?;
                info.shim = Some(shim);
                write_info(&bundle, &info)?;
                pid
            }
            None => runc
                .run_detached(
                    &spec.alloc_id,
                    &bundle,
                    open_log(&stdout)?,
                    open_log(&stderr)?,
                )
                .map_err(|e| explain_runtime_error(&e))?,
        };
        let start_time = procfs::read_stat(pid).map_or(0, |s| s.start_time);
        // Phase timings (cumulative ms since the start began), for start
        // latency work: rootfs mounted, network attached, spec written,
        // runtime returned.
        tracing::info!(
            alloc = %spec.alloc_id,
            service = %spec.service,
            pid,
            image = %spec.image,
            mount_ms = mounted.as_millis() as u64,
            network_ms = networked.as_millis() as u64,
            spec_ms = configured.as_millis() as u64,
            run_ms = began.elapsed().as_millis() as u64,
            "started container"
        );
        Ok(OciHandle {
            id: spec.alloc_id.clone(),
            pid,
            start_time,
            runc: runc.clone(),
            info,
            bundle,
        })
    }
}

/// Automatic image garbage collection: every `every`, when the stored
/// images take more than `threshold_bytes`, removes those no allocation of
/// the node uses. Runs until dropped.
pub async fn gc_loop(runtime: Arc<OciRuntime>, threshold_bytes: u64, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let sizing = runtime.clone();
        let Ok(usage) = tokio::task::spawn_blocking(move || sizing.image_disk_usage()).await else {
            continue;
        };
        if usage <= threshold_bytes {
            continue;
        }
        tracing::info!(
            usage_mb = usage / (1024 * 1024),
            threshold_mb = threshold_bytes / (1024 * 1024),
            "image store above its threshold; pruning unused images"
        );
        if let Err(e) = runtime.prune_images().await {
            tracing::warn!(error = %e, "image garbage collection failed");
        }
    }
}

/// Turns crun's refusal of hybrid cgroup hosts into advice.
pub fn explain_runtime_error(e: &runc::RuncError) -> String {
    if e.output().contains("hybrid mode not supported") {
        return format!(
            "{e}: this crun cannot run containers on a host with hybrid cgroups v1+v2; run the agent with --oci-runtime runc"
        );
    }
    e.to_string()
}

/// The signal `runc kill` gets to stop a container: the image's StopSignal
/// ("SIGINT", "INT" or "2"), else SIGTERM.
pub fn stop_signal(image: Option<&str>) -> String {
    use std::str::FromStr;
    let Some(value) = image.map(str::trim).filter(|s| !s.is_empty()) else {
        return "SIGTERM".into();
    };
    if let Ok(n) = value.parse::<i32>() {
        if let Ok(sig) = nix::sys::signal::Signal::try_from(n) {
            return sig.as_str().to_string();
        }
    }
    let upper = value.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    match nix::sys::signal::Signal::from_str(&name) {
        Ok(sig) => sig.as_str().to_string(),
        Err(_) => "SIGTERM".into(),
    }
}

fn write_info(bundle: &Path, info: &ContainerInfo) -> Result<(), String> {
    let json = serde_json::to_vec(info).map_err(|e| e.to_string())?;
    write_bytes(&bundle.join("skiff.json"), &json)
}

fn write(path: &Path, text: &str) -> Result<(), String> {
    write_bytes(path, text.as_bytes())
}

fn write_bytes(path: &Path, bytes: &[u8]) -> Result<(), String> {
    fs::write(path, bytes).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

fn open_log(path: &Path) -> Result<File, String> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .read(true)
        .open(path)
        .map_err(|e| format!("cannot open log {}: {e}", path.display()))
}

impl Runtime for OciRuntime {
    async fn prefetch(&self, image: &str) -> Result<(), String> {
        let images = self
            .images
            .as_ref()
            .ok_or_else(|| "this agent has no image store".to_string())?;
        images.pull(image).await.map(|_| ())
    }

    type Handle = OciHandle;

    async fn prepare(&self, spec: &ReplicaSpec) -> Result<(), RuntimeError> {
        self.runc()
            .map_err(|reason| Self::unsupported(spec, reason))?;
        let images = self
            .images
            .as_ref()
            .ok_or_else(|| Self::unsupported(spec, "this agent has no image store".into()))?;
        self.lease(spec);
        let image = images
            .pull(&spec.image)
            .await
            .map_err(|reason| RuntimeError::Pull {
                short_id: spec.short_id().to_string(),
                service: spec.service.clone(),
                reason,
            })?;
        self.pulled
            .lock()
            .expect("image table poisoned")
            .insert(spec.image.clone(), image);
        Ok(())
    }

    fn start(&self, spec: &ReplicaSpec, alloc_dir: &Path) -> Result<OciHandle, RuntimeError> {
        let runc = self
            .runc()
            .map_err(|reason| Self::unsupported(spec, reason))?;
        // A container of this allocation that exited (or a half-made one)
        // is cleared first: ids are reused across restarts.
        self.clean_up(spec, alloc_dir);
        self.start_inner(spec, alloc_dir, runc).map_err(|reason| {
            self.clean_up(spec, alloc_dir);
            Self::error(spec, reason)
        })
    }

    /// Adopts the container if it still runs, and also if it ended while
    /// no agent watched but its shim recorded how: the handle then reports
    /// that exit at once, so the replica restarts (and counts) as if the
    /// agent had seen it end.
    fn recover(&self, spec: &ReplicaSpec, pid: u32, start_time: u64) -> Option<OciHandle> {
        let runc = self.runc().ok()?;
        let alloc_dir = self.allocs_dir.join(&spec.alloc_id);
        let bundle = Self::bundle(&alloc_dir);
        let live = runc.state(&spec.alloc_id).is_ok_and(|state| {
            matches!(state.status.as_str(), "running" | "created")
                && state.pid == pid
                && procfs::is_same_live_process(pid, start_time)
        });
        if live {
            tracing::info!(alloc = %spec.alloc_id, pid, "adopted container");
        } else {
            let exit = shim::read_exit(&bundle, pid)?;
            tracing::info!(alloc = %spec.alloc_id, pid, %exit, "adopted container that ended while the agent was away");
        }
        self.lease(spec);
        Some(OciHandle {
            id: spec.alloc_id.clone(),
            pid,
            start_time,
            runc: runc.clone(),
            info: Self::read_info(&alloc_dir),
            bundle,
        })
    }

    fn destroy(&self, spec: &ReplicaSpec, alloc_dir: &Path) {
        self.clean_up(spec, alloc_dir);
        self.leases
            .lock()
            .expect("lease table poisoned")
            .remove(&spec.alloc_id);
    }
}

impl OciRuntime {
    /// Everything of [`Runtime::destroy`] but giving up the image: what a
    /// (re)start clears first.
    fn clean_up(&self, spec: &ReplicaSpec, alloc_dir: &Path) {
        let id = &spec.alloc_id;
        let bundle = Self::bundle(alloc_dir);
        // No state dir: the runtime knows no such container (a first start),
        // and a `delete` would only spend a process on saying so.
        if let Some(runc) = self
            .runc
            .as_ref()
            .ok()
            .filter(|r| r.root().join(id).exists())
        {
            if let Err(e) = runc.delete(id, true) {
                let out = e.output();
                if !out.contains("does not exist")
                    && !out.contains("not found")
                    && !out.contains("No such file")
                {
                    tracing::warn!(alloc = %id, error = %e, "failed to delete container");
                }
            }
        }
        let info = Self::read_info(alloc_dir);
        // A shim whose container `delete --force` just killed records that
        // exit: let it finish, so that nothing is written after the clean-up.
        if let Some(shim) = info.shim {
            let deadline = std::time::Instant::now() + SHIM_EXIT_WAIT;
            while !shim.is_gone() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let netns_exists = BridgeNetwork::netns_path(id).exists();
        if info.port.is_some() || netns_exists {
            if let Err(e) = self.network.del(id) {
                tracing::warn!(alloc = %id, error = %e, "failed to tear down container network");
            }
        }
        if let Some(images) = &self.images {
            if let Err(e) = images.unmount_rootfs(&bundle) {
                tracing::warn!(alloc = %id, error = %e, "failed to unmount container rootfs");
            }
        }
        if let Some(secrets) = &self.secrets {
            secrets.remove(id);
        }
        let left = cgroup::remove(&Self::cgroups_path(spec));
        if !left.is_empty() {
            tracing::warn!(alloc = %id, left = ?left, "failed to remove container cgroups");
        }
        for name in [
            "config.json",
            "skiff.json",
            "hosts",
            "resolv.conf",
            "container.pid",
            shim::EXIT_FILE,
            "exit.json.tmp",
        ] {
            let _ = fs::remove_file(bundle.join(name));
        }
        let _ = fs::remove_dir(&bundle);
    }
}

/// A running container.
#[derive(Debug)]
pub struct OciHandle {
    id: String,
    pid: u32,
    start_time: u64,
    runc: Runc,
    info: ContainerInfo,
    bundle: PathBuf,
}

impl OciHandle {
    /// How the container ended, once it has: from its shim's record (the
    /// shim is checked first and writes before it exits, so a gone shim
    /// means the record is there if it ever will be), else, without a shim
    /// or after one died, from reaping the process ourselves.
    fn exited(&self) -> Option<Exit> {
        let shim_running = self.info.shim.is_some_and(|shim| !shim.is_gone());
        if let Some(exit) = shim::read_exit(&self.bundle, self.pid) {
            return Some(exit);
        }
        if shim_running {
            return None;
        }
        match reaper::try_reap(self.pid) {
            Reaped::Exited(exit) => Some(exit),
            Reaped::Running => None,
            Reaped::NotChild => {
                (!procfs::is_same_live_process(self.pid, self.start_time)).then_some(Exit::Unknown)
            }
        }
    }

    /// `runc kill`, run off the async threads (it execs runc).
    async fn signal(&self, signal: &str) {
        let (runc, id, name) = (self.runc.clone(), self.id.clone(), signal.to_string());
        let result = tokio::task::spawn_blocking(move || runc.kill(&id, &name)).await;
        if let Ok(Err(e)) = result {
            tracing::debug!(alloc = %self.id, signal, error = %e, "kill failed (container gone?)");
        }
    }
}

impl TaskHandle for OciHandle {
    fn pid(&self) -> u32 {
        self.pid
    }

    fn start_time(&self) -> u64 {
        self.start_time
    }

    async fn wait(&mut self) -> Exit {
        use tokio::signal::unix::{signal, SignalKind};
        let mut sigchld = signal(SignalKind::child()).ok();
        loop {
            if let Some(exit) = self.exited() {
                return exit;
            }
            match &mut sigchld {
                Some(sig) => {
                    let _ = tokio::time::timeout(POLL, sig.recv()).await;
                }
                None => tokio::time::sleep(POLL).await,
            }
        }
    }

    async fn stop(&mut self, grace: Duration) -> Exit {
        if let Some(exit) = self.exited() {
            return exit;
        }
        let stop_signal = if self.info.stop_signal.is_empty() {
            "SIGTERM".to_string()
        } else {
            self.info.stop_signal.clone()
        };
        self.signal(&stop_signal).await;
        if let Ok(exit) = tokio::time::timeout(grace, self.wait()).await {
            return exit;
        }
        tracing::info!(alloc = %self.id, grace = ?grace, signal = %stop_signal, "container ignored its stop signal; killing it");
        self.signal("SIGKILL").await;
        match tokio::time::timeout(KILL_WAIT, self.wait()).await {
            Ok(exit) => exit,
            Err(_) => {
                tracing::warn!(alloc = %self.id, pid = self.pid, "container survived SIGKILL");
                Exit::Unknown
            }
        }
    }

    fn health_check(&self) -> Option<HealthCheck> {
        self.info.health.clone()
    }

    fn probe_addr(&self) -> Option<SocketAddr> {
        self.info.probe_addr
    }

    fn container_port(&self) -> Option<u16> {
        self.info.port.map(|(_, container)| container)
    }

    async fn exec_check(&self, command: &[String], timeout: Duration) -> Result<(), String> {
        self.runc.exec(&self.id, command, timeout).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_signals_normalise_and_default_to_sigterm() {
        assert_eq!(stop_signal(None), "SIGTERM");
        assert_eq!(stop_signal(Some("SIGINT")), "SIGINT");
        assert_eq!(stop_signal(Some("quit")), "SIGQUIT");
        assert_eq!(stop_signal(Some("2")), "SIGINT");
        assert_eq!(stop_signal(Some("SIGBOGUS")), "SIGTERM");
    }

    #[test]
    fn an_explicit_missing_runtime_is_named() {
        let err = resolve_runtime(Some("/nonexistent/runc")).unwrap_err();
        assert!(err.contains("/nonexistent/runc"), "{err}");
    }
}
