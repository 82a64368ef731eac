//! t36: named volumes and bind mounts end to end, on real containers from the local registry:
//! a replica appends a line to a file in its volume at every start and serves the volume
//! over HTTP (busybox httpd), so what survives is read back through the replica itself.
//! Data survives `service update` (stop-first, each replica keeps its slot and volume), a
//! kill -9 of the agent, and `service rm` + create; per-replica volumes `data-0`/`data-1`
//! are distinct, owned by the image's user; `volume ls` lists them, `volume rm` is refused
//! while used and works after `service rm`; a bad volume spec fails with one clear line and
//! changes nothing; bind mounts work only below `--allow-host-path`.
//!
//! Needs root and the tools of t30 (runc, docker-registry, skopeo, busybox-static...).

use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use skiff_e2e::containers::{OciDev, Registry};
use skiff_e2e::load::{ConnectionMode, Load, LoadConfig};
use skiff_e2e::{
    assert_cli_error, free_port, http_get, http_get_at, pid_alive, wait_until, Allocation, POLL,
};

const TIMEOUT: Duration = Duration::from_secs(60);

/// Appends `start-$GEN` to /data/log at each start, then serves /data.
const SCRIPT: &str = "echo start-$GEN >> /data/log && exec httpd -f -p $PORT -h /data";

fn serving(a: &Allocation) -> bool {
    a.desired == "run" && a.state == "running" && pid_alive(a.pid)
}

/// `GET /log` from each replica, by slot order of their volumes' content.
fn logs(cluster: &OciDev, service: &str, n: usize) -> Vec<String> {
    let replicas = cluster.wait_replicas(service, n, "running", serving);
    let mut out: Vec<String> = replicas
        .iter()
        .map(|a| {
            let mut body = String::new();
            wait_until(TIMEOUT, POLL, || {
                body = http_get(a.host_port, "/log")
                    .map(|r| r.body)
                    .unwrap_or_default();
                !body.is_empty()
            });
            body
        })
        .collect();
    out.sort();
    out
}

/// Waits until both replicas' logs are `want` (any order of replicas).
fn wait_logs(cluster: &OciDev, service: &str, want: &[&str]) {
    let mut last = Vec::new();
    let ok = wait_until(TIMEOUT, Duration::from_millis(500), || {
        last = logs(cluster, service, want.len());
        last == want
    });
    assert!(
        ok,
        "{service}: logs {last:?}, expected {want:?}\n--- dev log ---\n{}",
        cluster.log_tail(40)
    );
}

fn volumes(cluster: &OciDev) -> Vec<Value> {
    let v = cluster.skiff_json(&["volume", "ls"]);
    v.as_array().cloned().unwrap_or_default()
}

fn volume_names(cluster: &OciDev) -> Vec<String> {
    let mut names: Vec<String> = volumes(cluster)
        .iter()
        .filter_map(|v| v["name"].as_str().map(str::to_string))
        .collect();
    names.sort();
    names
}

fn create_db(cluster: &OciDev, image: &str, generation: &str) {
    cluster.skiff_ok(&[
        "service",
        "create",
        "--detach",
        "db",
        "--image",
        image,
        "--port",
        "8080",
        "--replicas",
        "2",
        "--volume",
        "data:/data",
        "--env",
        &format!("GEN={generation}"),
        "--entrypoint",
        "/bin/sh",
        "--",
        "-c",
        SCRIPT,
    ]);
}

fn wait_gone(cluster: &OciDev, service: &str) {
    let gone = wait_until(TIMEOUT, POLL, || {
        let in_use = volumes(cluster)
            .iter()
            .any(|v| v["used_by"].as_array().is_some_and(|u| !u.is_empty()));
        !in_use && !cluster.skiff_ok(&["service", "ls"]).contains(service)
    });
    assert!(
        gone,
        "{service} still has replicas\n{}",
        cluster.log_tail(30)
    );
}

#[test]
fn volumes_keep_their_data_through_updates_agent_kills_and_service_rm() {
    let registry = Registry::shared();
    let allowed = tempfile::tempdir().expect("tempdir");
    let allowed_path = allowed.path().to_string_lossy().into_owned();
    std::fs::write(allowed.path().join("log"), "from the host\n").expect("write");
    let mut cluster = OciDev::start(registry.clone(), &["--allow-host-path", &allowed_path]);
    let image = registry.image("web-user:v1");

    // A bad volume spec: one line naming the field and the fix, nothing created.
    let args = [
        "service",
        "create",
        "bad",
        "--image",
        &image,
        "--volume",
        "data:relative/path",
    ];
    let out = cluster.skiff(&args);
    let line = assert_cli_error(&args, &out, &["absolute path"]);
    assert!(line.contains("invalid volume"), "{line}");
    let ls = cluster.skiff_ok(&["service", "ls"]);
    assert!(!ls.contains("bad"), "nothing created: {ls}");

    // Two replicas, each with its own volume, writable by the image's user (www, 1000).
    create_db(&cluster, &image, "1");
    wait_logs(&cluster, "db", &["start-1\n", "start-1\n"]);
    assert_eq!(volume_names(&cluster), ["data-0", "data-1"]);
    let volumes_dir = cluster.agent_dir().join("volumes");
    for name in ["data-0", "data-1"] {
        let data = volumes_dir.join(name).join("_data");
        assert_eq!(
            std::fs::metadata(&data).expect("volume dir").uid(),
            1000,
            "{name} owned by www"
        );
        let parent = std::fs::metadata(volumes_dir.join(name))
            .expect("volume")
            .mode()
            & 0o777;
        assert_eq!(parent, 0o700);
    }

    // An update (environment change) replaces each replica stop-first, on its own volume.
    cluster.skiff_ok(&["service", "update", "--detach", "db", "--env", "GEN=2"]);
    wait_logs(
        &cluster,
        "db",
        &["start-1\nstart-2\n", "start-1\nstart-2\n"],
    );

    // A kill -9 of the agent: the containers are re-adopted, the data is there.
    cluster.kill9();
    cluster.restart();
    wait_logs(
        &cluster,
        "db",
        &["start-1\nstart-2\n", "start-1\nstart-2\n"],
    );

    // In use: volume rm is refused with the replica using it.
    let list = volumes(&cluster);
    assert!(
        list.iter()
            .all(|v| v["service"] == "db" && v["node"].is_string()),
        "{list:?}"
    );
    let args = ["volume", "rm", "data-0"];
    let out = cluster.skiff(&args);
    assert_cli_error(&args, &out, &["used by replica"]);

    // service rm keeps the volumes; the same service created again finds its data.
    cluster.skiff_ok(&["service", "rm", "db"]);
    wait_gone(&cluster, "db");
    assert_eq!(volume_names(&cluster), ["data-0", "data-1"]);
    create_db(&cluster, &image, "3");
    wait_logs(
        &cluster,
        "db",
        &["start-1\nstart-2\nstart-3\n", "start-1\nstart-2\nstart-3\n"],
    );

    // Once no replica uses it, volume rm deletes it and its data.
    cluster.skiff_ok(&["service", "rm", "db"]);
    wait_gone(&cluster, "db");
    cluster.skiff_ok(&["volume", "rm", "data-0"]);
    let removed = wait_until(TIMEOUT, POLL, || {
        volume_names(&cluster) == ["data-1"] && !volumes_dir.join("data-0").exists()
    });
    assert!(removed, "data-0 still there: {:?}", volume_names(&cluster));

    // Bind mounts: refused outside --allow-host-path, served from inside it.
    let bind = |name: &str, src: &str| {
        cluster.skiff_ok(&[
            "service",
            "create",
            "--detach",
            name,
            "--image",
            &image,
            "--port",
            "8080",
            "--mount",
            &format!("type=bind,src={src},dst=/data,ro"),
            "--entrypoint",
            "/bin/sh",
            "--",
            "-c",
            "exec httpd -f -p $PORT -h /data",
        ]);
    };
    bind("outside", "/etc");
    let mut last = Vec::new();
    let refused = wait_until(TIMEOUT, POLL, || {
        last = cluster.ps("outside");
        last.iter().any(|a| a.message.contains("--allow-host-path"))
    });
    assert!(refused, "the agent refuses /etc: {last:#?}");
    bind("inside", &allowed_path);
    let replicas = cluster.wait_replicas("inside", 1, "running", serving);
    let mut body = String::new();
    wait_until(TIMEOUT, POLL, || {
        body = http_get(replicas[0].host_port, "/log")
            .map(|r| r.body)
            .unwrap_or_default();
        body == "from the host\n"
    });
    assert_eq!(body, "from the host\n");
    assert!(Path::new(&allowed_path).join("log").exists());
}

/// Issue #15's stateful swap: one replica that owns its volume (as a single
/// postgres would) is updated stop-first, and clients going through the
/// routing proxy see a slower answer while it is swapped, never an error:
/// the proxies hold new connections until the new replica is healthy.
#[test]
fn a_stateful_replica_is_swapped_with_no_failed_request_through_the_proxy() {
    let registry = Registry::shared();
    let cluster = OciDev::start(registry.clone(), &[]);
    let image = registry.image("web-user:v1");
    let publish = free_port().to_string();
    cluster.skiff_ok(&[
        "service",
        "create",
        "solo",
        "--image",
        &image,
        "--port",
        "8080",
        "--volume",
        "solo-data:/data",
        "--publish",
        &publish,
        "--protocol",
        "http",
        "--health-http",
        "/log",
        "--env",
        "GEN=1",
        "--entrypoint",
        "/bin/sh",
        "--",
        "-c",
        SCRIPT,
    ]);
    let addr: SocketAddr = format!("127.0.0.1:{publish}").parse().unwrap();
    let load = Load::start(LoadConfig {
        path: "/log".into(),
        workers: 2,
        mode: ConnectionMode::NewPerRequest,
        pause_between: Duration::from_millis(50),
        // Held through the swap: the drain (5 s), the stop, the start and
        // the first health check; the proxies' hold limit is 30 s.
        request_timeout: Duration::from_secs(40),
        max_duration: Duration::from_secs(90),
        ..LoadConfig::new(addr)
    });
    std::thread::sleep(Duration::from_secs(1));
    cluster.skiff_ok(&["service", "update", "solo", "--env", "GEN=2"]);
    let swapped = wait_until(TIMEOUT, POLL, || {
        http_get_at(addr, "/log").is_ok_and(|r| r.body == "start-1\nstart-2\n")
    });
    assert!(swapped, "never served from the new replica");
    std::thread::sleep(Duration::from_millis(500));
    let report = load.stop();
    let failures: Vec<String> = report.failures().iter().map(|s| s.label()).collect();
    assert!(
        failures.is_empty(),
        "{} of {} requests failed: {failures:?}",
        failures.len(),
        report.total()
    );
    assert!(
        report.count_containing("start-2") > 0,
        "{:?}",
        report.bodies()
    );
    let longest = report
        .samples()
        .iter()
        .map(|s| s.latency)
        .max()
        .unwrap_or_default();
    eprintln!(
        "stateful swap: {} requests, 0 failed, longest held {longest:?}",
        report.total()
    );
    assert!(report.total() > 20, "only {} requests", report.total());
}
