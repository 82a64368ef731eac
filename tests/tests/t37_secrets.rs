//! t37: secrets end to end, on real containers from the local registry. A secret is
//! created from a file; a replica of the image whose user is www (uid 1000) reports, from
//! inside its container, the mode, owner and size of /run/secrets/<name> (never the value);
//! the value is found nowhere under the cluster's data dir (server, agent, dev.log), nor in
//! `service inspect`, `secret ls|inspect`, `events` or the replicas' logs. `secret update`
//! rolls a restarting service out to a new version, and swaps the file of a replica with
//! on-change=signal:SIGHUP in place and signals it, without a restart. Bad input: an unknown
//! secret is one line naming the field (nothing created), and `secret rm` of a secret in use
//! is refused.
//!
//! Needs root and the tools of t30 (runc, docker-registry, skopeo, busybox-static...).

use std::path::Path;
use std::time::Duration;

use std::os::unix::fs::PermissionsExt;

use skiff_e2e::containers::{OciDev, Registry};
use skiff_e2e::servers::ServerCluster;
use skiff_e2e::{assert_cli_error, pid_alive, skiff_at, skiff_ok_at, wait_until, Allocation, POLL};

const TIMEOUT: Duration = Duration::from_secs(60);

/// Reports the file's mode, owner and size once, then each time SIGHUP arrives (the value
/// itself is never printed: the logs are on the agent's disk).
const REPORT: &str = "report() { echo \"secret $(stat -c '%a %u' /run/secrets/$F) $(wc -c < /run/secrets/$F | tr -d ' ') bytes\"; }; \
                      trap report HUP; report; while true; do sleep 1 & wait $!; done";

fn running(a: &Allocation) -> bool {
    a.desired == "run" && a.state == "running" && pid_alive(a.pid)
}

/// Every file under `dir` holding `needle` (sockets and unreadable files skipped).
fn files_containing(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            let path = entry.path();
            if kind.is_dir() {
                stack.push(path);
            } else if kind.is_file() {
                let bytes = std::fs::read(&path).unwrap_or_default();
                if bytes.windows(needle.len()).any(|w| w == needle) {
                    found.push(path.display().to_string());
                }
            }
        }
    }
    found
}

/// Waits until the service's logs contain `want`, and returns them.
fn wait_logs(cluster: &OciDev, service: &str, want: &str) -> String {
    let mut logs = String::new();
    let ok = wait_until(TIMEOUT, POLL, || {
        logs = String::from_utf8_lossy(&cluster.skiff(&["service", "logs", service]).stdout)
            .into_owned();
        logs.contains(want)
    });
    assert!(
        ok,
        "{service}: no \"{want}\" in its logs:\n{logs}\n--- dev log ---\n{}",
        cluster.log_tail(40)
    );
    logs
}

fn create(cluster: &OciDev, image: &str, name: &str, secret: &str, file: &str) {
    cluster.skiff_ok(&[
        "service",
        "create",
        "--detach",
        name,
        "--image",
        image,
        "--secret",
        secret,
        "--min-healthy-time",
        "0",
        "--env",
        &format!("F={file}"),
        "--entrypoint",
        "/bin/sh",
        "--",
        "-c",
        REPORT,
    ]);
}

#[test]
fn secrets_are_files_of_the_image_user_and_nowhere_else() {
    let registry = Registry::shared();
    let cluster = OciDev::start(registry.clone(), &[]);
    let image = registry.image("web-user:v1");
    let files = tempfile::tempdir().expect("tempdir");
    let value = format!("pw-{:016x}-v1", std::process::id() as u64 * 0x9e37_79b9);
    let value2 = format!("{value}-and-longer");
    let v1 = files.path().join("v1");
    let v2 = files.path().join("v2");
    std::fs::write(&v1, &value).expect("write");
    std::fs::write(&v2, &value2).expect("write");
    let v1 = v1.to_string_lossy().into_owned();
    let v2 = v2.to_string_lossy().into_owned();

    cluster.skiff_ok(&["secret", "create", "db_password", "--from-file", &v1]);

    // Bad input: an unknown secret is one line naming the field; nothing is created.
    let args = [
        "service", "create", "bad", "--image", &image, "--secret", "nope",
    ];
    let out = cluster.skiff(&args);
    let line = assert_cli_error(&args, &out, &["secret", "nope", "not found"]);
    assert!(line.contains("invalid secret"), "{line}");
    assert!(!cluster.skiff_ok(&["service", "ls"]).contains("bad"));

    // At most 512 KiB: the limit itself is taken (and travels through Raft), one byte more
    // is one line naming the field and the limit, and nothing is created.
    let big = files.path().join("big");
    std::fs::write(&big, vec![b'x'; 512 * 1024]).expect("write");
    let big = big.to_string_lossy().into_owned();
    cluster.skiff_ok(&["secret", "create", "big", "--from-file", &big]);
    cluster.skiff_ok(&["secret", "rm", "big"]);
    let too_big = files.path().join("too-big");
    std::fs::write(&too_big, vec![b'x'; 512 * 1024 + 1]).expect("write");
    let too_big = too_big.to_string_lossy().into_owned();
    let args = ["secret", "create", "big", "--from-file", &too_big];
    let out = cluster.skiff(&args);
    assert_cli_error(&args, &out, &["invalid secret", "512 KiB"]);

    // `--from-file -` reads standard input.
    let mut child = std::process::Command::new(skiff_e2e::skiff_bin())
        .args([
            "--server",
            &cluster.addr(),
            "secret",
            "create",
            "piped",
            "--from-file",
            "-",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start skiff");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(b"from stdin").expect("write");
    }
    assert!(child.wait().expect("wait").success());
    let piped = cluster.skiff_json(&["secret", "inspect", "piped"]);
    assert_eq!(piped["size_bytes"], 10, "{piped}");
    cluster.skiff_ok(&["secret", "rm", "piped"]);
    let listed = cluster.skiff_json(&["secret", "ls"]);
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");

    // The file is the image user's (www, 1000), mode 0400, the value's size.
    create(&cluster, &image, "app", "db_password", "db_password");
    create(
        &cluster,
        &image,
        "sig",
        "db_password:pw,on-change=signal:SIGHUP",
        "pw",
    );
    let size = value.len();
    wait_logs(&cluster, "app", &format!("secret 400 1000 {size} bytes"));
    wait_logs(&cluster, "sig", &format!("secret 400 1000 {size} bytes"));
    let sig = cluster.wait_replicas("sig", 1, "running", running)[0].clone();

    // A process replica (root) finds the file in $SKIFF_SECRETS_DIR; its environment holds
    // that path, never the value.
    cluster.skiff_ok(&[
        "service",
        "create",
        "--detach",
        "proc",
        "--runtime",
        "process",
        "--secret",
        "db_password",
        "--",
        "sh",
        "-c",
        "echo \"secret $(stat -c '%a %u' $SKIFF_SECRETS_DIR/db_password) $(wc -c < $SKIFF_SECRETS_DIR/db_password) bytes\"; exec sleep 3600",
    ]);
    wait_logs(&cluster, "proc", &format!("secret 400 0 {size} bytes"));
    let proc = cluster.wait_replicas("proc", 1, "running", running)[0].clone();
    let environ = std::fs::read(format!("/proc/{}/environ", proc.pid)).unwrap_or_default();
    let environ = String::from_utf8_lossy(&environ);
    assert!(
        environ.contains("SKIFF_SECRETS_DIR=/run/skiff/"),
        "{environ}"
    );
    assert!(
        !environ.contains(&value),
        "the value is not in the environment"
    );

    // In use: secret rm is refused, naming the services.
    let args = ["secret", "rm", "db_password"];
    let out = cluster.skiff(&args);
    assert_cli_error(&args, &out, &["used by service", "app"]);

    // secret update: app rolls out version 2; sig gets the new file and a SIGHUP, same
    // process, no restart.
    let updated = cluster.skiff_ok(&["secret", "update", "db_password", "--from-file", &v2]);
    assert!(updated.contains("version 2"), "{updated}");
    let size2 = value2.len();
    wait_logs(&cluster, "sig", &format!("secret 400 1000 {size2} bytes"));
    let after = cluster.wait_replicas("sig", 1, "running", running)[0].clone();
    assert_eq!((after.id.as_str(), after.pid), (sig.id.as_str(), sig.pid));
    assert_eq!(after.restarts, 0);
    let rolled = wait_until(TIMEOUT, POLL, || {
        let status = cluster.skiff_json(&["service", "inspect", "app"]);
        status["version"] == 2
            && status["deployment"]["status"] == "succeeded"
            && cluster.ps("app").iter().filter(|a| running(a)).count() == 1
    });
    assert!(rolled, "app never rolled out\n{}", cluster.log_tail(40));
    wait_logs(&cluster, "app", &format!("secret 400 1000 {size2} bytes"));
    // The same value again is no new version.
    let same = cluster.skiff_ok(&["secret", "update", "db_password", "--from-file", &v2]);
    assert!(same.contains("unchanged"), "{same}");

    // The values appear nowhere: not on the cluster's disks, not in what the CLI shows.
    for needle in [&value, &value2] {
        let found = files_containing(cluster.data_dir(), needle.as_bytes());
        assert!(found.is_empty(), "secret value found in {found:?}");
        for args in [
            &["service", "inspect", "app", "--output", "json"][..],
            &["service", "inspect", "sig", "--show-values"],
            &["service", "history", "app"],
            &["secret", "ls", "--output", "json"],
            &["secret", "inspect", "db_password", "--output", "json"],
            &["events"],
            &["service", "logs", "app"],
            &["service", "logs", "sig"],
            &["service", "logs", "proc"],
        ] {
            let out = cluster.skiff_ok(args);
            assert!(!out.contains(needle.as_str()), "value in {args:?}: {out}");
        }
    }
    let inspect = cluster.skiff_ok(&["service", "inspect", "app"]);
    assert!(
        inspect.contains("db_password (v2) -> /run/secrets/db_password"),
        "{inspect}"
    );
    let listed = cluster.skiff_json(&["secret", "ls"]);
    assert_eq!(listed[0]["name"], "db_password");
    assert_eq!(listed[0]["version"], 2);
    let events = cluster.skiff_ok(&["events"]);
    assert!(
        events.contains("secret db_password updated (version 2"),
        "{events}"
    );

    // A rollback to app's version 1 runs with the value version 1 was deployed with (kept
    // for it), not the current one; `secret inspect` lists both versions.
    cluster.skiff_ok(&["service", "rollback", "app", "--to", "1", "--detach"]);
    let rolled = wait_until(TIMEOUT, POLL, || {
        let status = cluster.skiff_json(&["service", "inspect", "app"]);
        status["version"] == 3
            && status["deployment"]["status"] == "succeeded"
            && cluster.ps("app").iter().filter(|a| running(a)).count() == 1
    });
    assert!(rolled, "app never rolled back\n{}", cluster.log_tail(40));
    let inspect = cluster.skiff_ok(&["service", "inspect", "app"]);
    assert!(inspect.contains("db_password (v1)"), "{inspect}");
    let mut read = String::new();
    let same = wait_until(TIMEOUT, POLL, || {
        let out = cluster.skiff(&[
            "service",
            "exec",
            "app",
            "--",
            "cat",
            "/run/secrets/db_password",
        ]);
        read = String::from_utf8_lossy(&out.stdout).into_owned();
        read == value
    });
    assert!(
        same,
        "app's file after the rollback is not version 1 ({} bytes)",
        read.len()
    );
    let versions = cluster.skiff_json(&["secret", "inspect", "db_password"]);
    let listed: Vec<u64> = versions["versions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v["version"].as_u64())
        .collect();
    assert_eq!(listed, [2, 1], "{versions}");
    assert_eq!(versions["versions"][1]["services"][0], "app", "{versions}");
    assert_eq!(versions["version"], 2, "the secret itself is unchanged");

    // Once no service uses it, it can be removed; its tmpfs mounts went with the replicas.
    cluster.skiff_ok(&["service", "rm", "app"]);
    cluster.skiff_ok(&["service", "rm", "sig"]);
    cluster.skiff_ok(&["service", "rm", "proc"]);
    let removed = wait_until(TIMEOUT, POLL, || {
        cluster
            .skiff(&["secret", "rm", "db_password"])
            .status
            .success()
    });
    assert!(removed, "secret rm refused after service rm");
    let unmounted = wait_until(TIMEOUT, POLL, || {
        !skiff_e2e::containers::mount_points()
            .iter()
            .any(|m| m.contains(&sig.id) && m.contains("secrets"))
    });
    assert!(
        unmounted,
        "the secrets tmpfs of {} is still mounted",
        sig.id
    );
    assert!(cluster.skiff_ok(&["secret", "ls"]).lines().count() <= 1);

    // A Compose stack: its top-level secret is created from the file beside it (named
    // STACK-NAME), the service reads it as /run/secrets/db_password; a redeploy of the same
    // files changes nothing.
    let stack = tempfile::tempdir().expect("tempdir");
    std::fs::write(stack.path().join("db_password.txt"), &value).expect("write");
    let compose = format!(
        "services:\n  db:\n    image: {image}\n    entrypoint: [/bin/sh, -c, \"stat -c 'stack %a %u %s' /run/secrets/db_password; exec sleep 3600\"]\n    secrets: [db_password]\nsecrets:\n  db_password:\n    file: ./db_password.txt\n"
    );
    let file = stack.path().join("compose.yaml");
    std::fs::write(&file, compose).expect("write");
    let file = file.to_string_lossy().into_owned();
    let deployed = cluster.skiff_ok(&["stack", "deploy", "st", "-f", &file, "--detach"]);
    assert!(
        deployed.contains("secret st-db_password created"),
        "{deployed}"
    );
    wait_logs(&cluster, "st-db", &format!("stack 400 1000 {size}"));
    let again = cluster.skiff_ok(&["stack", "deploy", "st", "-f", &file, "--detach"]);
    assert!(!again.contains("secret"), "{again}");
    let status = cluster.skiff_json(&["service", "inspect", "st-db"]);
    assert_eq!(status["version"], 1, "a redeploy restarts nothing");
    let found = files_containing(cluster.data_dir(), value.as_bytes());
    assert!(found.is_empty(), "secret value found in {found:?}");
}

/// The secrets key is the bootstrap server's, handed to servers that join (never through
/// Raft): every server, joined or restarted, seals and opens the same values, and no
/// server's data dir (log, snapshots, key file aside) holds a value.
#[test]
fn every_server_holds_the_clusters_key_and_no_value() {
    let mut cluster = ServerCluster::start(3, &[]);
    let files = tempfile::tempdir().expect("tempdir");
    let value = format!("srv-{:016x}", std::process::id() as u64 * 0x9e37_79b9);
    let file = files.path().join("v");
    std::fs::write(&file, &value).expect("write");
    let file = file.to_string_lossy().into_owned();

    let keys: Vec<Vec<u8>> = (0..3)
        .map(|i| {
            let path = cluster.data_dir(i).join("secrets.key");
            let mode = std::fs::metadata(&path)
                .expect("key file")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{}", path.display());
            std::fs::read(&path).expect("key")
        })
        .collect();
    assert_eq!(keys[0].len(), 32);
    assert!(keys.iter().all(|k| *k == keys[0]), "one key in the cluster");

    // Created through a joined server; updated to the same value through another, which
    // must open the sealed value to see it unchanged.
    skiff_ok_at(
        &cluster.addresses[2],
        &["secret", "create", "pw", "--from-file", &file],
    );
    let same = skiff_ok_at(
        &cluster.addresses[1],
        &["secret", "update", "pw", "--from-file", &file],
    );
    assert!(same.contains("unchanged"), "{same}");
    cluster.restart(1);
    let after = wait_until(TIMEOUT, POLL, || {
        let out = skiff_at(
            &cluster.addresses[1],
            &["secret", "update", "pw", "--from-file", &file],
        );
        String::from_utf8_lossy(&out.stdout).contains("unchanged")
    });
    assert!(
        after,
        "a restarted server opens the value:\n{}",
        cluster.log(1)
    );
    for i in 0..3 {
        let found = files_containing(&cluster.data_dir(i), value.as_bytes());
        assert!(found.is_empty(), "secret value found in {found:?}");
        assert!(!cluster.log(i).contains(&value));
    }
}
