//! t22: backup, restore and recovery from a lost quorum (issue #18, items 1
//! and 2), on real `skiff server` and `skiff agent` processes:
//!
//! 1. `cluster snapshot save` on a three-server cluster with an agent
//!    running replicas that read a secret; every server killed and its data
//!    dir wiped; `server --bootstrap --restore FILE` makes a new cluster at
//!    the first address; the agent connects again and its replicas are
//!    re-adopted (same allocations, same PIDs, no restart); the variables,
//!    the secret (opened by a new replica) and the API token are back; a
//!    damaged file is refused and a redacted one holds no key.
//! 2. Two of three servers killed and wiped: the survivor, started with
//!    `--recover`, is a one-member cluster with every acknowledged write,
//!    and two fresh servers join it.

use std::net::SocketAddr;
use std::time::Duration;

use skiff_e2e::agents::{on_loopback, AgentCluster};
use skiff_e2e::servers::ServerCluster;
use skiff_e2e::{
    http_get_at, json_at, pid_alive, skiff_at, skiff_ok_at, wait_until, Allocation, POLL,
};

const TIMEOUT: Duration = Duration::from_secs(60);
const SECRET: &str = "s3cr3t-for-t22";

/// The replicas of `web` wanted and running, by allocation id.
fn running(agents: &AgentCluster) -> Vec<Allocation> {
    let mut running: Vec<Allocation> = agents
        .allocs("web")
        .into_iter()
        .filter(|a| a.desired == "run" && a.state == "healthy" && pid_alive(a.pid))
        .collect();
    running.sort_by(|a, b| a.id.cmp(&b.id));
    running
}

/// What the replica `alloc` of a1 (127.0.0.2) copied from its secret file.
fn secret_seen_by(alloc: &Allocation) -> Option<String> {
    let addr: SocketAddr = format!("127.0.0.2:{}", alloc.host_port).parse().ok()?;
    let answer = http_get_at(addr, "/secret.txt").ok()?;
    (answer.status == 200).then_some(answer.body)
}

/// Makes the CLI verify servers against a copy of the cluster CA in `dir`:
/// the first server's data dir, where it was, is wiped by the tests.
fn keep_ca(servers: &ServerCluster, dir: &std::path::Path) {
    let copy = dir.join("ca.crt");
    std::fs::copy(servers.data_dir(0).join("pki/ca.crt"), &copy).expect("copy the CA");
    skiff_e2e::use_cluster_ca(&copy);
}

#[test]
fn a_cluster_restored_from_a_snapshot_readopts_the_agents_running_replicas() {
    let mut servers = ServerCluster::start(3, &[]);
    let agents = AgentCluster::start(&servers.addresses, &on_loopback(["a1"]));
    let first = servers.addresses[0].clone();
    let work = tempfile::tempdir().expect("temp dir");
    keep_ca(&servers, work.path());
    let secret_file = work.path().join("db-password");
    std::fs::write(&secret_file, SECRET).expect("secret file");
    skiff_ok_at(
        &first,
        &[
            "secret",
            "create",
            "db",
            "--from-file",
            secret_file.to_str().unwrap(),
        ],
    );
    skiff_ok_at(&first, &["var", "put", "app/colour", "teal"]);
    skiff_ok_at(
        &first,
        &[
            "service",
            "create",
            "web",
            "--replicas",
            "2",
            "--secret",
            "db",
            "--health-http",
            "/",
            "--",
            "sh",
            "-c",
            "cp \"$SKIFF_SECRETS_DIR/db\" secret.txt && exec python3 -m http.server $PORT --bind 0.0.0.0",
        ],
    );
    let mut before = Vec::new();
    assert!(
        wait_until(TIMEOUT, POLL, || {
            before = running(&agents);
            before.len() == 2
        }),
        "web never ran 2 replicas: {before:?}\n{}",
        agents.logs()
    );
    for alloc in &before {
        assert_eq!(secret_seen_by(alloc).as_deref(), Some(SECRET), "{alloc:?}");
    }

    let backup = work.path().join("cluster.snap");
    let backup_arg = backup.to_str().unwrap();
    let saved = skiff_ok_at(
        &servers.addresses[1],
        &["cluster", "snapshot", "save", backup_arg],
    );
    assert!(
        saved.contains("2 replicas") && saved.contains("1 secrets"),
        "{saved}"
    );
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&backup)
            .expect("saved file")
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "a backup holds keys: owner only");
    let inspect = json_at(&first, &["cluster", "snapshot", "inspect", backup_arg])
        .expect("inspect answers JSON");
    assert_eq!(inspect["services"], 1, "{inspect}");
    assert_eq!(inspect["redacted"], false, "{inspect}");
    let redacted = work.path().join("redacted.snap");
    let redacted_arg = redacted.to_str().unwrap();
    skiff_ok_at(
        &first,
        &["cluster", "snapshot", "save", redacted_arg, "--redact"],
    );
    let raw = std::fs::read(&redacted).expect("redacted file");
    let text = String::from_utf8_lossy(&raw);
    assert!(
        !text.contains("PRIVATE KEY"),
        "a redacted snapshot holds no CA key"
    );
    // A damaged copy is refused before anything is written.
    let mut damaged = std::fs::read(&backup).expect("backup");
    let middle = damaged.len() / 2;
    damaged[middle] ^= 0x20;
    let damaged_path = work.path().join("damaged.snap");
    std::fs::write(&damaged_path, &damaged).expect("damaged copy");
    let out = skiff_at(
        &first,
        &[
            "cluster",
            "snapshot",
            "inspect",
            damaged_path.to_str().unwrap(),
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("damaged or cut short"),
        "{stderr}"
    );

    // Every server lost, with its data.
    for index in 0..3 {
        servers.kill_and_wipe(index);
    }
    let empty = work.path().join("empty-restore");
    let out = std::process::Command::new(skiff_e2e::skiff_bin())
        .args([
            "server",
            "--name",
            "x",
            "--listen",
            "127.0.0.1:0",
            "--bootstrap",
        ])
        .arg("--data-dir")
        .arg(&empty)
        .arg("--restore")
        .arg(&damaged_path)
        .output()
        .expect("run skiff server");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("damaged or cut short"),
        "{stderr}"
    );
    assert!(
        !empty.join("raft").exists(),
        "nothing written from a damaged file"
    );

    let restoring = std::time::Instant::now();
    servers.respawn_with(0, false, &["--restore", backup_arg]);
    assert!(
        wait_until(TIMEOUT, POLL, || servers.leader() == Some(0)),
        "the restored server never led:\n{}",
        servers.log(0)
    );
    // The old API token works: tokens are part of the state.
    let status = json_at(&first, &["cluster", "status"]).expect("status");
    let members = status["members"].as_array().expect("members");
    assert_eq!(members.len(), 1, "a new one-member cluster: {status}");
    assert_eq!(
        skiff_ok_at(&first, &["var", "get", "app/colour"]).trim(),
        "teal"
    );
    let mut after = Vec::new();
    let readopted = wait_until(TIMEOUT, POLL, || {
        after = running(&agents);
        agents.ready_nodes() == ["a1"]
            && after
                .iter()
                .map(|a| (&a.id, a.pid))
                .eq(before.iter().map(|a| (&a.id, a.pid)))
    });
    assert!(
        readopted,
        "replicas not re-adopted as they were: before {before:?}, after {after:?}\n{}\n{}",
        servers.log(0),
        agents.logs()
    );
    assert!(after.iter().all(|a| a.restarts == 0), "{after:?}");
    eprintln!(
        "restored and re-adopted {} replicas in {:.2}s: {after:?}",
        after.len(),
        restoring.elapsed().as_secs_f64()
    );
    // A write works, and a new replica opens the secret with the restored key.
    skiff_ok_at(&first, &["service", "scale", "web", "3"]);
    let mut now = Vec::new();
    assert!(
        wait_until(TIMEOUT, POLL, || {
            now = running(&agents);
            now.len() == 3
        }),
        "web never scaled to 3 after the restore: {now:?}\n{}",
        agents.logs()
    );
    let new = now
        .iter()
        .find(|a| before.iter().all(|b| b.id != a.id))
        .expect("a new replica");
    assert_eq!(secret_seen_by(new).as_deref(), Some(SECRET), "{new:?}");
    // The agent runs the new cluster's assignments, and its old replicas
    // are among them as they ran: same allocations, same processes.
    for old in &before {
        assert!(
            now.iter()
                .any(|a| a.id == old.id && a.pid == old.pid && a.restarts == 0),
            "{old:?} not kept as it ran: {now:?}"
        );
    }
}

#[test]
fn a_survivor_of_a_lost_quorum_recovers_alone_and_new_servers_join_it() {
    let mut servers = ServerCluster::start(3, &[]);
    let work = tempfile::tempdir().expect("temp dir");
    keep_ca(&servers, work.path());
    let survivor = servers.addresses[2].clone();
    for i in 0..20 {
        let key = format!("acked/{i:02}");
        assert!(servers.put(i % 3, &key, "v"), "write {key} refused");
    }
    servers.kill_and_wipe(0);
    servers.kill_and_wipe(1);
    // No quorum: the survivor cannot commit.
    let out = skiff_at(&survivor, &["var", "put", "lost/quorum", "x"]);
    assert!(
        !out.status.success(),
        "a write without quorum was acknowledged"
    );
    // Reads are linearizable by default (no leader: no answer); a stale
    // read, asked for, answers from the survivor's copy.
    let linearizable = skiff_at(&survivor, &["var", "get", "acked/00"]);
    assert!(!linearizable.status.success(), "a read without a leader");
    let stale = skiff_ok_at(&survivor, &["var", "get", "acked/00", "--stale"]);
    assert_eq!(stale.trim(), "v");

    let recovering = std::time::Instant::now();
    servers.respawn_with(2, false, &["--recover"]);
    assert!(
        wait_until(TIMEOUT, POLL, || servers.leader() == Some(2)),
        "the recovered server never led:\n{}",
        servers.log(2)
    );
    let status = json_at(&survivor, &["cluster", "status"]).expect("status");
    assert_eq!(
        status["members"].as_array().map(Vec::len),
        Some(1),
        "{status}"
    );
    eprintln!(
        "recovered server leads after {:.2}s",
        recovering.elapsed().as_secs_f64()
    );
    let kept = servers.variables(2, "acked/").expect("variables");
    assert_eq!(kept.len(), 20, "every acknowledged write kept: {kept:?}");
    let aside = std::fs::read_dir(servers.data_dir(2))
        .expect("data dir")
        .flatten()
        .any(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("before-recover-")
        });
    assert!(aside, "the old log is kept aside");
    assert!(
        servers.put(2, "after/recover", "v"),
        "a write after --recover"
    );

    // Two fresh servers join the recovered one.
    servers.add_server();
    servers.add_server();
    servers.wait_for_members(3);
    for index in [3, 4] {
        let seen = servers.variables(index, "acked/").unwrap_or_default();
        assert_eq!(seen.len(), 20, "server {index} caught up: {seen:?}");
    }
    // A quorum of the new three: one of them may go.
    servers.kill9(3);
    assert!(
        servers.time_to_first_write("after/join", TIMEOUT).is_some(),
        "no write with 2 of 3"
    );
}

/// A server whose sled file has one flipped byte never starts with fewer
/// entries and no word: it refuses (naming the way out), and starts with
/// `--truncate-corrupt-log`; or, if the byte hit nothing live, it starts
/// with every acknowledged write.
#[test]
fn a_flipped_byte_in_the_raft_database_is_refused_or_harmless_never_silent() {
    let mut servers = ServerCluster::start(1, &[]);
    let work = tempfile::tempdir().expect("temp dir");
    keep_ca(&servers, work.path());
    for i in 0..200 {
        let key = format!("acked/{i:03}");
        assert!(servers.put(0, &key, "v"), "write {key} refused");
    }
    servers.kill9(0);
    let file = servers.data_dir(0).join("raft/db");
    let mut bytes = std::fs::read(&file).expect("sled file");
    let at = bytes.len() / 2;
    bytes[at] ^= 0x40;
    std::fs::write(&file, &bytes).expect("flip a byte");

    let mut start = std::process::Command::new(skiff_e2e::skiff_bin());
    start
        .env_remove("SKIFF_ADDR")
        .args(["server", "--name", "s1", "--listen", &servers.addresses[0]])
        .arg("--data-dir")
        .arg(servers.data_dir(0));
    match skiff_e2e::try_run_with_timeout(&mut start, Duration::from_secs(10)) {
        Ok(out) => {
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{stderr}");
            assert!(
                stderr.contains("lost records") || stderr.contains("is damaged"),
                "the refusal says what is wrong: {stderr}"
            );
            assert!(
                stderr.contains("--join") || stderr.contains("--truncate-corrupt-log"),
                "and the way out: {stderr}"
            );
            eprintln!(
                "byte {at} of {}: refused: {}",
                bytes.len(),
                stderr.lines().last().unwrap_or_default()
            );
            if stderr.contains("lost records") {
                servers.respawn_with(0, false, &["--truncate-corrupt-log"]);
                assert!(
                    wait_until(TIMEOUT, POLL, || servers.leader() == Some(0)),
                    "--truncate-corrupt-log did not start it:\n{}",
                    servers.log(0)
                );
                assert!(servers.put(0, "after/truncate", "v"));
            }
        }
        Err(_) => {
            // It kept running: the byte hit nothing live. Every write is there.
            servers.respawn_with(0, false, &[]);
            assert!(wait_until(TIMEOUT, POLL, || servers.leader() == Some(0)));
            let kept = servers.variables(0, "acked/").expect("variables");
            assert_eq!(kept.len(), 200, "byte {at}: writes lost without a word");
            eprintln!("byte {at} of {}: harmless", bytes.len());
        }
    }
}
