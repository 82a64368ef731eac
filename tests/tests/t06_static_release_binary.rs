//! The release binary of `deploy/release.sh` (static musl, stripped) on this
//! machine's path with no glibc assumption: `ldd` says it is static, it has
//! no ELF interpreter and needs no shared library,
//! `--version` names the commit, and the skeleton runs end to end with it
//! alone: `skiff dev` pulls an image from a registry, runs two containers
//! behind the routing proxy, they answer with their identity, and `service
//! rm` leaves nothing behind.
//!
//! Run by `deploy/test.sh`, whose whole suite runs with `SKIFF_BIN` set to
//! the static release binary (`--run-ignored all`); ignored in a plain
//! `cargo test`, where `SKIFF_BIN` is the ordinary build.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use skiff_e2e::containers::{leftovers, OciDev, Registry};
use skiff_e2e::{answers, free_port, http_get, run_with_timeout, skiff_bin, wait_until, POLL};

#[test]
#[ignore = "needs SKIFF_BIN = deploy/release.sh's binary: run by deploy/test.sh, whose suite runs against it"]
fn the_static_release_binary_runs_the_skeleton_end_to_end() {
    let bin = skiff_bin();

    // Nothing for a dynamic loader to do: glibc's ldd says "not a dynamic
    // executable" for a static binary and "statically linked" for a
    // static-pie one (what release.sh builds: static, with ASLR), and the
    // ELF has no interpreter and needs no shared library.
    let text = |out: std::process::Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    let ldd = text(run_with_timeout(
        Command::new("ldd").arg(&bin),
        Duration::from_secs(10),
    ));
    assert!(
        ldd.contains("not a dynamic executable") || ldd.trim() == "statically linked",
        "ldd {}: {ldd}",
        bin.display()
    );
    let headers = text(run_with_timeout(
        Command::new("readelf").args(["-lW"]).arg(&bin),
        Duration::from_secs(10),
    ));
    assert!(!headers.contains("INTERP"), "{headers}");
    let dynamic = text(run_with_timeout(
        Command::new("readelf").args(["-dW"]).arg(&bin),
        Duration::from_secs(10),
    ));
    assert!(!dynamic.contains("(NEEDED)"), "{dynamic}");
    let version = run_with_timeout(Command::new(&bin).arg("--version"), Duration::from_secs(10));
    let version = String::from_utf8_lossy(&version.stdout).into_owned();
    assert!(
        version.starts_with("skiff ") && version.contains("(commit "),
        "{version}"
    );

    let registry = Registry::shared();
    let cluster = OciDev::start(registry.clone(), &[]);
    let publish = free_port();
    cluster.skiff_ok(&[
        "service",
        "create",
        "demo",
        "--image",
        &registry.image("hello:v1"),
        "--replicas",
        "2",
        "--publish",
        &publish.to_string(),
        "--protocol",
        "http",
        "--health-http",
        "/",
        "--health-interval",
        "1s",
    ]);
    let replicas = cluster.wait_replicas("demo", 2, "healthy", |a| {
        a.desired == "run" && a.state == "healthy" && answers(a.host_port)
    });

    // Through the routing proxy: both replicas, each saying who it is.
    let mut answered = BTreeSet::new();
    let both = wait_until(Duration::from_secs(20), POLL, || {
        if let Ok(answer) = http_get(publish, "/") {
            if answer.status == 200 {
                answered.insert(answer.body.trim().to_string());
            }
        }
        answered.len() >= 2
    });
    assert!(both, "answers through port {publish}: {answered:?}");
    for a in &replicas {
        let short: String = a.id.chars().take(8).collect();
        let want = format!("hello from replica {short} of demo on node dev, version v1");
        assert!(answered.contains(&want), "{want:?} not in {answered:?}");
    }

    let ids = cluster.container_ids("runc");
    assert_eq!(ids.len(), 2, "one runc container per replica: {ids:?}");
    cluster.skiff_ok(&["service", "rm", "demo"]);
    let mut left = Vec::new();
    let clean = wait_until(Duration::from_secs(20), POLL, || {
        left = ids
            .iter()
            .flat_map(|id| leftovers(&cluster, "runc", id))
            .collect();
        left.is_empty()
    });
    assert!(
        clean,
        "`service rm demo` left behind: {left:#?}\n--- dev log ---\n{}",
        cluster.log_tail(40)
    );
    assert!(
        wait_until(Duration::from_secs(10), POLL, || http_get(publish, "/")
            .map_or(true, |a| a.status != 200)),
        "port {publish} still serves demo after rm"
    );
}

/// `deploy/install.sh --destdir D --prefix P BINARY` as a test or a packager
/// runs it: everything lands under D (nothing on the real system), the units
/// name P's binary, a second run changes nothing, and a config the operator
/// edited is kept with the new example beside it.
#[test]
fn install_sh_installs_into_a_destdir_idempotently_and_keeps_edited_configs() {
    let dest = tempfile::Builder::new()
        .prefix("skiff-install-")
        .tempdir()
        .expect("temporary directory");
    let script = skiff_e2e::workspace_root().join("deploy/install.sh");
    let install = || {
        let out = run_with_timeout(
            Command::new("bash")
                .arg(&script)
                .arg("--destdir")
                .arg(dest.path())
                .args(["--prefix", "/opt/skiff"])
                .arg(skiff_bin()),
            Duration::from_secs(30),
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    };
    let first = install();
    let root = dest.path();
    let bin = root.join("opt/skiff/bin/skiff");
    let meta = std::fs::metadata(&bin).expect("the binary is installed");
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
        0o755
    );
    assert_eq!(
        std::fs::read(&bin).unwrap(),
        std::fs::read(skiff_bin()).unwrap()
    );
    for unit in ["skiff-server", "skiff-agent"] {
        let text = std::fs::read_to_string(root.join(format!("etc/systemd/system/{unit}.service")))
            .expect("unit installed");
        let role = unit.trim_start_matches("skiff-");
        assert!(
            text.contains(&format!(
                "ExecStart=/opt/skiff/bin/skiff {role} --config /etc/skiff/{role}.toml"
            )),
            "{text}"
        );
    }
    for config in ["server.toml", "agent.toml"] {
        assert_eq!(
            std::fs::read_to_string(root.join("etc/skiff").join(config)).unwrap(),
            std::fs::read_to_string(skiff_e2e::workspace_root().join("deploy").join(config))
                .unwrap()
        );
    }
    assert!(first.contains("installed"), "{first}");

    // Again: nothing changes.
    let second = install();
    assert!(
        second
            .lines()
            .filter(|l| l.starts_with("unchanged"))
            .count()
            == 5
            && !second.contains("updated"),
        "{second}"
    );

    // An edited config is the operator's: kept, the example beside it.
    let agent = root.join("etc/skiff/agent.toml");
    std::fs::write(&agent, "name = \"n7\"\n").unwrap();
    let third = install();
    assert_eq!(std::fs::read_to_string(&agent).unwrap(), "name = \"n7\"\n");
    assert!(root.join("etc/skiff/agent.toml.new").is_file(), "{third}");
    assert!(third.contains("kept"), "{third}");
}
