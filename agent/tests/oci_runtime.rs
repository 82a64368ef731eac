//! The oci runtime against real runc (and crun where it can run), the
//! agent's bridge networking and overlayfs, on a busybox rootfs built here.
//! Needs root and `runc crun tini iptables iproute2 busybox-static`; a test fails, naming the packages, where they are
//! missing. Every container a test starts is destroyed by a drop guard, also
//! when the test panics, so nothing (mount, netns, cgroup, NAT rule) leaks.

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use skiff_agent::runtime::oci::images::{is_mount_point, DirImages, ImageDefaults};
use skiff_agent::runtime::oci::{bridge::BridgeNetwork, cgroup, OciConfig, OciRuntime};
use skiff_agent::runtime::{Runtime, TaskHandle};
use skiff_agent::spec::{Network, ReplicaSpec, RuntimeKind};

const IMAGE: &str = "test/web:v1";

/// Panics, naming what to install, unless the runtime tests can run here.
fn require_tools() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "the oci runtime tests need root"
    );
    let missing: Vec<&str> = [
        ("/usr/bin/busybox", "busybox-static"),
        ("/usr/sbin/iptables-restore", "iptables"),
        ("/usr/bin/ip", "iproute2"),
        ("/usr/bin/tini-static", "tini"),
    ]
    .iter()
    .filter(|(path, _)| !Path::new(path).exists())
    .map(|(_, package)| *package)
    .collect();
    assert!(
        missing.is_empty(),
        "apt-get install -y {}",
        missing.join(" ")
    );
    if let Err(e) = skiff_agent::runtime::oci::resolve_runtime(Some("runc")) {
        panic!("{e}");
    }
}

/// A rootfs with a static busybox, a `www` user (uid 1000) and a page.
fn build_rootfs(dir: &Path) -> PathBuf {
    let rootfs = dir.join("image");
    for d in ["bin", "etc", "www", "tmp", "proc", "sys", "dev"] {
        fs::create_dir_all(rootfs.join(d)).unwrap();
    }
    fs::copy("/usr/bin/busybox", rootfs.join("bin/busybox")).unwrap();
    for applet in ["sh", "httpd", "sleep", "cat", "id", "echo"] {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet)).unwrap();
    }
    fs::write(
        rootfs.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nwww:x:1000:1000:www:/www:/bin/sh\n",
    )
    .unwrap();
    fs::write(rootfs.join("etc/group"), "root:x:0:\nwww:x:1000:\n").unwrap();
    fs::write(rootfs.join("www/index.html"), "hello skiff\n").unwrap();
    rootfs
}

fn image_defaults() -> ImageDefaults {
    ImageDefaults {
        cmd: vec![
            "/bin/httpd".into(),
            "-f".into(),
            "-p".into(),
            "80".into(),
            "-h".into(),
            "/www".into(),
        ],
        user: "www".into(),
        exposed_ports: vec!["80/tcp".into()],
        ..Default::default()
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Fixture {
    dir: tempfile::TempDir,
    images: Arc<DirImages>,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let images = Arc::new(DirImages::new());
        images.register(IMAGE, build_rootfs(dir.path()), image_defaults());
        Self { dir, images }
    }

    fn runtime(&self, binary: &str) -> OciRuntime {
        let mut config =
            OciConfig::new(self.dir.path().join("oci"), self.dir.path().join("allocs"));
        config.runtime = Some(binary.into());
        OciRuntime::new(config, Some(self.images.clone()))
    }

    fn alloc_dir(&self, id: &str) -> PathBuf {
        self.dir.path().join("allocs").join(id)
    }
}

/// Destroys a container when dropped (idempotent), so a failing test leaks
/// no mount, network namespace, NAT rule or cgroup. Has its own runtime over
/// the same state, so it works whichever runtime instance started it.
struct Cleanup {
    runtime: OciRuntime,
    spec: ReplicaSpec,
    dir: PathBuf,
}

impl Cleanup {
    fn new(f: &Fixture, binary: &str, spec: &ReplicaSpec) -> Self {
        Self {
            runtime: f.runtime(binary),
            spec: spec.clone(),
            dir: f.alloc_dir(&spec.alloc_id),
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        self.runtime.destroy(&self.spec, &self.dir);
    }
}

fn replica(id: &str, network: Network) -> ReplicaSpec {
    ReplicaSpec {
        alloc_id: format!("{id}-{}", std::process::id()),
        service: "web".into(),
        host_port: free_port(),
        runtime: RuntimeKind::Oci,
        image: IMAGE.into(),
        network,
        ..ReplicaSpec::default()
    }
}

/// GETs `/` on 127.0.0.1:port, retrying (bounded) while the server starts.
fn get(port: u16) -> String {
    let mut last = String::new();
    for _ in 0..50 {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(mut s) => {
                s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                let _ = s.write_all(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n");
                let mut body = String::new();
                let _ = s.read_to_string(&mut body);
                if body.contains("200") {
                    return body;
                }
                last = body;
            }
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("no answer on 127.0.0.1:{port}: {last}");
}

fn proc_status_field(pid: u32, field: &str) -> String {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find(|l| l.starts_with(field))
        .unwrap_or_default()
        .to_string()
}

/// Asserts nothing of the container is left: mount, cgroup, runc state,
/// network namespace.
fn assert_nothing_left(f: &Fixture, runtime: &OciRuntime, spec: &ReplicaSpec) {
    let bundle = f.alloc_dir(&spec.alloc_id).join("bundle");
    assert!(
        !is_mount_point(&bundle.join("rootfs")),
        "rootfs still mounted"
    );
    let cgroups = cgroup::existing(&PathBuf::from("/skiff").join(&spec.alloc_id));
    assert!(cgroups.is_empty(), "cgroups left: {cgroups:?}");
    let state = runtime.runc().unwrap().root().join(&spec.alloc_id);
    assert!(!state.exists(), "runtime state left: {}", state.display());
    assert!(
        !BridgeNetwork::netns_path(&spec.alloc_id).exists(),
        "netns left"
    );
    let nat = std::process::Command::new("iptables")
        .args(["-t", "nat", "-S"])
        .output()
        .expect("iptables runs");
    let nat = String::from_utf8_lossy(&nat.stdout);
    let rules: Vec<&str> = nat.lines().filter(|l| l.contains(&spec.alloc_id)).collect();
    assert!(rules.is_empty(), "NAT rules left: {rules:?}");
    let leases: Vec<String> = fs::read_dir("/run/skiff/ipam")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| fs::read_to_string(e.path()).is_ok_and(|holder| holder == spec.alloc_id))
        .map(|e| e.path().display().to_string())
        .collect();
    assert!(leases.is_empty(), "address leases left: {leases:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn bridge_container_serves_on_its_host_port_as_the_images_user_with_its_memory_limit() {
    require_tools();
    let f = Fixture::new();
    let runtime = f.runtime("runc");
    let mut spec = replica("bridge", Network::Bridge);
    spec.memory_mb = 64;
    let _cleanup = Cleanup::new(&f, "runc", &spec);
    runtime.prepare(&spec).await.unwrap();
    let dir = f.alloc_dir(&spec.alloc_id);
    let mut handle = runtime.start(&spec, &dir).unwrap();

    assert!(get(spec.host_port).contains("hello skiff"));
    let addr = handle.probe_addr().expect("container address");
    assert_eq!(addr.port(), 80, "probes go to the container port");

    // The image's user, resolved through its own /etc/passwd.
    assert!(proc_status_field(handle.pid(), "Uid:").starts_with("Uid:\t1000\t1000"));
    let limit = [
        "/sys/fs/cgroup/memory",
        "/sys/fs/cgroup/unified",
        "/sys/fs/cgroup",
    ]
    .iter()
    .flat_map(|root| {
        [
            format!("{root}/skiff/{}/memory.limit_in_bytes", spec.alloc_id),
            format!("{root}/skiff/{}/memory.max", spec.alloc_id),
        ]
    })
    .find_map(|p| fs::read_to_string(p).ok())
    .expect("memory limit file");
    assert_eq!(limit.trim(), (64 * 1024 * 1024).to_string());

    let exit = handle.stop(Duration::from_secs(5)).await;
    assert!(
        matches!(
            exit,
            skiff_agent::runtime::Exit::Signal(15)
                | skiff_agent::runtime::Exit::Code(143)
                | skiff_agent::runtime::Exit::Code(0)
        ),
        "{exit:?}"
    );
    runtime.destroy(&spec, &dir);
    assert_nothing_left(&f, &runtime, &spec);
}

#[tokio::test(flavor = "multi_thread")]
async fn host_network_container_listens_on_port() {
    require_tools();
    let f = Fixture::new();
    let runtime = f.runtime("runc");
    let mut spec = replica("host", Network::Host);
    spec.command = vec![
        "/bin/sh".into(),
        "-c".into(),
        "exec httpd -f -p 127.0.0.1:$PORT -h /www".into(),
    ];
    let _cleanup = Cleanup::new(&f, "runc", &spec);
    runtime.prepare(&spec).await.unwrap();
    let dir = f.alloc_dir(&spec.alloc_id);
    let mut handle = runtime.start(&spec, &dir).unwrap();
    assert!(get(spec.host_port).contains("hello skiff"));
    let env = fs::read_to_string(format!("/proc/{}/environ", handle.pid())).unwrap_or_default();
    let port_var = format!("PORT={}", spec.host_port);
    assert!(
        env.split('\0').any(|v| v == port_var),
        "PORT is the host port in host mode"
    );
    handle.stop(Duration::from_secs(5)).await;
    runtime.destroy(&spec, &dir);
    assert_nothing_left(&f, &runtime, &spec);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_runtime_re_adopts_a_running_container_without_restarting_it() {
    require_tools();
    let f = Fixture::new();
    let spec = replica("adopt", Network::Bridge);
    let _cleanup = Cleanup::new(&f, "runc", &spec);
    let dir = f.alloc_dir(&spec.alloc_id);
    let (pid, start_time) = {
        let first = f.runtime("runc");
        first.prepare(&spec).await.unwrap();
        let handle = first.start(&spec, &dir).unwrap();
        (handle.pid(), handle.start_time())
        // The first runtime and its handle are gone: the container is not.
    };
    assert!(get(spec.host_port).contains("hello skiff"));

    let second = f.runtime("runc");
    let mut adopted = second.recover(&spec, pid, start_time).expect("re-adopted");
    assert_eq!(adopted.pid(), pid, "same process, not restarted");
    assert!(
        adopted.probe_addr().is_some(),
        "probe address survives the restart"
    );
    assert!(
        second.recover(&spec, pid, start_time + 1).is_none(),
        "recycled pid refused"
    );

    // The image store is shared state; the second agent pulls (cached) first.
    second.prepare(&spec).await.unwrap();
    adopted.stop(Duration::from_secs(5)).await;
    second.destroy(&spec, &dir);
    assert_nothing_left(&f, &second, &spec);
}

#[tokio::test(flavor = "multi_thread")]
async fn crun_runs_the_container_or_explains_why_it_cannot() {
    require_tools();
    if let Err(e) = skiff_agent::runtime::oci::resolve_runtime(Some("crun")) {
        panic!("{e}");
    }
    let f = Fixture::new();
    let runtime = f.runtime("crun");
    let spec = replica("crun", Network::Bridge);
    let _cleanup = Cleanup::new(&f, "crun", &spec);
    runtime.prepare(&spec).await.unwrap();
    let dir = f.alloc_dir(&spec.alloc_id);
    match runtime.start(&spec, &dir) {
        Ok(mut handle) => {
            assert!(get(spec.host_port).contains("hello skiff"));
            handle.stop(Duration::from_secs(5)).await;
        }
        Err(e) => {
            let message = e.to_string();
            assert!(
                message.contains("hybrid") && message.contains("--oci-runtime runc"),
                "crun failed without the clear error: {message}"
            );
        }
    }
    runtime.destroy(&spec, &dir);
    assert_nothing_left(&f, &runtime, &spec);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_runtime_fails_the_replica_with_the_install_hint() {
    let f = Fixture::new();
    let runtime = f.runtime("/nonexistent/runc");
    let err = runtime
        .prepare(&replica("none", Network::Bridge))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("/nonexistent/runc"), "{err}");
    assert!(skiff_agent::runtime::oci::NO_RUNTIME.contains("apt-get install runc"));
}

/// NAT rules that mention `id`.
fn nat_rules_of(id: &str) -> Vec<String> {
    let nat = std::process::Command::new("iptables")
        .args(["-t", "nat", "-S"])
        .output()
        .expect("iptables runs");
    String::from_utf8_lossy(&nat.stdout)
        .lines()
        .filter(|l| l.contains(id))
        .map(str::to_string)
        .collect()
}

/// What a forced clean-up does: the container and its namespace go, the
/// agent's teardown never runs.
fn remove_by_force(runtime_root: &Path, id: &str) {
    let status = std::process::Command::new("runc")
        .arg("--root")
        .arg(runtime_root)
        .args(["delete", "--force", id])
        .status()
        .unwrap();
    assert!(status.success());
    let status = std::process::Command::new("ip")
        .args(["netns", "delete", &BridgeNetwork::netns_name(id)])
        .status()
        .unwrap();
    assert!(status.success());
}

/// A container removed by force (runtime state and namespace deleted, no
/// teardown) leaves its DNAT rule; a new container given the same host port
/// must still answer on it, and the start-up sweep removes the leftover.
#[tokio::test(flavor = "multi_thread")]
async fn a_forced_removal_leaves_nothing_that_catches_the_next_replica_on_its_port() {
    require_tools();
    let f = Fixture::new();
    let runtime = f.runtime("runc");
    let gone = replica("forced", Network::Bridge);
    let _cleanup_gone = Cleanup::new(&f, "runc", &gone);
    runtime.prepare(&gone).await.unwrap();
    let gone_dir = f.alloc_dir(&gone.alloc_id);
    let _handle = runtime.start(&gone, &gone_dir).unwrap();
    assert!(get(gone.host_port).contains("hello skiff"));
    let root = runtime.runc().unwrap().root().to_path_buf();
    remove_by_force(&root, &gone.alloc_id);
    assert!(
        !nat_rules_of(&gone.alloc_id).is_empty(),
        "the leftover exists"
    );

    // The next replica on that host port answers (its mapping replaced the
    // leftover one).
    let mut next = replica("next", Network::Bridge);
    next.host_port = gone.host_port;
    let _cleanup_next = Cleanup::new(&f, "runc", &next);
    let next_dir = f.alloc_dir(&next.alloc_id);
    let mut handle = runtime.start(&next, &next_dir).unwrap();
    assert!(get(next.host_port).contains("hello skiff"));
    assert!(nat_rules_of(&gone.alloc_id).is_empty(), "replaced on start");
    handle.stop(Duration::from_secs(5)).await;
    runtime.destroy(&next, &next_dir);
    assert_nothing_left(&f, &runtime, &next);

    // A leftover on a port nobody took again goes with the sweep.
    let lost = replica("lost", Network::Bridge);
    let _cleanup_lost = Cleanup::new(&f, "runc", &lost);
    let lost_dir = f.alloc_dir(&lost.alloc_id);
    let _lost_handle = runtime.start(&lost, &lost_dir).unwrap();
    remove_by_force(&root, &lost.alloc_id);
    assert!(
        !nat_rules_of(&lost.alloc_id).is_empty(),
        "the leftover exists"
    );
    runtime.sweep_network();
    assert!(nat_rules_of(&lost.alloc_id).is_empty(), "swept");
    runtime.destroy(&gone, &gone_dir);
    runtime.destroy(&lost, &lost_dir);
}
