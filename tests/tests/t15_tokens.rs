//! t15: API tokens end to end against real `skiff dev` processes — a call without a token, or
//! with a wrong one, is refused for reads and writes and changes nothing; each role may do
//! what the role table says and no more; revoked and expired tokens stop working; events name
//! the token whose call made them; and `skiff dev` writes `.skiff/client.toml` (0600) so that
//! the CLI run in the same directory needs no flags.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;
use skiff_e2e::{
    claim_port_range, client_token, describe, events_at, free_port, run_with_timeout, skiff_bin,
    wait_until, DevCluster, CLI_TIMEOUT, POLL, READY_TIMEOUT,
};

/// `skiff --server SERVER ARGS` presenting `token` (none: no token at all), with none of this
/// process's `SKIFF_*` credentials and in a directory without a `.skiff/client.toml`.
fn skiff_as(server: &str, token: Option<&str>, args: &[&str]) -> Output {
    let empty = tempfile::tempdir().expect("temp dir");
    let mut cmd = Command::new(skiff_bin());
    cmd.env_remove("SKIFF_ADDR")
        .env_remove("SKIFF_TOKEN")
        .env_remove("SKIFF_CLIENT_CONFIG")
        .current_dir(empty.path())
        .args(["--server", server]);
    if let Some(token) = token {
        cmd.args(["--token", token]);
    }
    cmd.args(args);
    run_with_timeout(&mut cmd, CLI_TIMEOUT)
}

/// Like [`skiff_as`], and it must succeed: its stdout.
fn ok_as(server: &str, token: Option<&str>, args: &[&str]) -> String {
    let out = skiff_as(server, token, args);
    assert!(out.status.success(), "{}", describe(args, &out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Like [`skiff_as`], and it must fail with one `error:` line containing `expected`.
fn refused_as(server: &str, token: Option<&str>, args: &[&str], expected: &str) -> String {
    let out = skiff_as(server, token, args);
    let what = describe(args, &out);
    assert!(!out.status.success(), "expected a refusal: {what}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line on stderr: {what}");
    assert!(lines[0].starts_with("error: "), "{what}");
    assert!(lines[0].contains(expected), "expected {expected:?}: {what}");
    lines[0].to_string()
}

/// `token create NAME --role ROLE [EXTRA]` by the cluster's admin: the secret.
fn create_token(cluster: &DevCluster, name: &str, role: &str, extra: &[&str]) -> String {
    let mut args = vec!["token", "create", name, "--role", role, "--output", "json"];
    args.extend_from_slice(extra);
    let created: Value = serde_json::from_str(&cluster.skiff_ok(&args)).expect("JSON");
    let secret = created["secret"].as_str().expect("a secret").to_string();
    assert!(secret.starts_with("skiff_"), "{created}");
    secret
}

/// A service with no replicas (nothing runs), created by `token`.
fn create_idle(server: &str, token: Option<&str>, name: &str) -> Output {
    let args = [
        "service",
        "create",
        "--detach",
        name,
        "--runtime",
        "process",
        "--replicas",
        "0",
        "--",
        "sleep",
        "600",
    ];
    skiff_as(server, token, &args)
}

fn service_names(cluster: &DevCluster) -> Vec<String> {
    cluster
        .skiff_json(&["service", "ls"])
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|s| s["spec"]["name"].as_str().map(str::to_string))
        .collect()
}

#[test]
fn calls_without_a_valid_token_are_refused_and_change_nothing() {
    let cluster = DevCluster::start();
    let server = cluster.addr();
    let events_before = events_at(&server, &[]).len();

    let line = refused_as(&server, None, &["service", "ls"], "no API token");
    assert!(
        line.contains("--token") && line.contains("client.toml"),
        "{line}"
    );
    let out = create_idle(&server, None, "web");
    assert!(
        !out.status.success(),
        "{}",
        describe(&["service", "create"], &out)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("no API token"));

    let wrong = Some("skiff_0000000000000000000000000000000000000000000000000000000000000000");
    refused_as(&server, wrong, &["node", "ls"], "unknown API token");
    refused_as(
        &server,
        wrong,
        &["var", "put", "k", "v"],
        "unknown API token",
    );
    let out = create_idle(&server, wrong, "web");
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown API token"));

    // Nothing was committed: no service, no variable, no event.
    assert!(service_names(&cluster).is_empty());
    let out = cluster.skiff(&["var", "get", "k"]);
    assert!(!out.status.success(), "{}", describe(&["var", "get"], &out));
    assert_eq!(events_at(&server, &[]).len(), events_before);
}

#[test]
fn each_role_does_what_the_table_allows_and_no_more() {
    let cluster = DevCluster::start();
    let server = cluster.addr();
    let reader = create_token(&cluster, "reader", "read-only", &[]);
    let ops = create_token(&cluster, "ops", "operator", &[]);
    let (reader, ops) = (Some(reader.as_str()), Some(ops.as_str()));

    // An operator creates and scales; events name its token.
    let out = create_idle(&server, ops, "web");
    assert!(
        out.status.success(),
        "{}",
        describe(&["service", "create"], &out)
    );
    ok_as(&server, ops, &["service", "scale", "web", "0"]);
    let created = events_at(&server, &["--service", "web"])
        .into_iter()
        .find(|e| e["kind"] == "service-created")
        .expect("a service-created event");
    assert_eq!(created["by"], "ops", "{created}");
    let table = cluster.skiff_ok(&["events", "--service", "web"]);
    let header = table.lines().next().unwrap_or_default();
    assert!(header.contains(" BY "), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.contains("service-created") && l.contains(" ops ")),
        "{table}"
    );

    // A reader lists and inspects, and is refused every write with the role it needs.
    let listed = ok_as(&server, reader, &["service", "ls"]);
    assert!(listed.contains("web"), "{listed}");
    ok_as(&server, reader, &["service", "inspect", "web"]);
    ok_as(&server, reader, &["events", "--tail", "1"]);
    ok_as(&server, reader, &["cluster", "status"]);
    let line = refused_as(
        &server,
        reader,
        &["service", "scale", "web", "3"],
        "operator",
    );
    assert!(
        line.contains("permission denied") && line.contains("reader"),
        "{line}"
    );
    refused_as(
        &server,
        reader,
        &["service", "rm", "web"],
        "needs the operator role",
    );
    let out = create_idle(&server, reader, "other");
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs the operator role"));
    let status = cluster.inspect("web");
    assert_eq!(status["spec"]["replicas"], 0, "{status}");
    assert_eq!(service_names(&cluster), ["web"]);

    // Secret-bearing values and tokens are the admin's.
    refused_as(
        &server,
        reader,
        &["service", "inspect", "web", "--show-values"],
        "--show-values",
    );
    refused_as(
        &server,
        ops,
        &["service", "inspect", "web", "--show-values"],
        "needs the admin role",
    );
    cluster.inspect_values("web");
    refused_as(
        &server,
        ops,
        &["token", "create", "mine", "--role", "admin"],
        "needs the admin role",
    );
    refused_as(&server, ops, &["token", "ls"], "needs the admin role");
    let tokens = cluster.skiff_json(&["token", "ls"]);
    let names: Vec<&str> = tokens
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["name"].as_str())
        .collect();
    assert_eq!(names, ["management", "ops", "reader"], "{tokens}");
    let text = tokens.to_string();
    assert!(!text.contains("skiff_") && !text.contains("hash"), "{text}");

    // An operator updates a service without seeing its values, and keeps them.
    let args = [
        "service",
        "update",
        "web",
        "--detach",
        "-e",
        "PASSWORD=hunter2",
    ];
    ok_as(&server, ops, &args);
    let args = ["service", "update", "web", "--detach", "-e", "MODE=fast"];
    ok_as(&server, ops, &args);
    let shown = cluster.inspect_values("web");
    assert_eq!(shown["spec"]["env"]["PASSWORD"], "hunter2", "{shown}");
    assert_eq!(shown["spec"]["env"]["MODE"], "fast", "{shown}");

    ok_as(&server, ops, &["service", "rm", "web"]);
    assert!(service_names(&cluster).is_empty());
}

#[test]
fn revoked_and_expired_tokens_stop_working() {
    let cluster = DevCluster::start();
    let server = cluster.addr();
    let gone = create_token(&cluster, "gone", "operator", &[]);
    ok_as(&server, Some(&gone), &["service", "ls"]);
    let revoked = cluster.skiff_ok(&["token", "revoke", "gone"]);
    assert!(revoked.contains("gone revoked"), "{revoked}");
    refused_as(
        &server,
        Some(&gone),
        &["service", "ls"],
        "\"gone\" was revoked",
    );
    let out = create_idle(&server, Some(&gone), "web");
    assert!(String::from_utf8_lossy(&out.stderr).contains("was revoked"));

    let brief = create_token(&cluster, "brief", "read-only", &["--ttl", "2s"]);
    ok_as(&server, Some(&brief), &["service", "ls"]);
    std::thread::sleep(Duration::from_millis(2500));
    refused_as(
        &server,
        Some(&brief),
        &["service", "ls"],
        "\"brief\" has expired",
    );

    let listed = cluster.skiff_ok(&["token", "ls"]);
    let state = |name: &str| {
        listed
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_default()
            .to_string()
    };
    assert!(state("gone").contains("revoked"), "{listed}");
    assert!(state("brief").contains("expired"), "{listed}");
    assert!(state("management").contains("active"), "{listed}");
    assert!(service_names(&cluster).is_empty());
}

/// A `skiff dev` started in a directory with its default data dir, killed when dropped.
struct DevInDir(Child);

impl Drop for DevInDir {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn skiff_dev_writes_a_private_client_config_the_cli_finds_in_its_directory() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ports = claim_port_range();
    let api = format!("127.0.0.1:{}", free_port());
    let log = std::fs::File::create(dir.path().join("dev.log")).unwrap();
    let _dev = DevInDir(
        Command::new(skiff_bin())
            .current_dir(dir.path())
            .env_remove("SKIFF_ADDR")
            .env_remove("SKIFF_TOKEN")
            .args(["dev", "--listen", &api, "--name", "dev"])
            .args(["--port-range", &format!("{}-{}", ports.start, ports.end)])
            .args([
                "--server-metrics-listen",
                &format!("127.0.0.1:{}", free_port()),
            ])
            .args(["--metrics-listen", &format!("127.0.0.1:{}", free_port())])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start skiff dev"),
    );
    let data = dir.path().join(".skiff");
    let written = wait_until(READY_TIMEOUT, POLL, || client_token(&data).is_some());
    let log = || std::fs::read_to_string(dir.path().join("dev.log")).unwrap_or_default();
    assert!(written, "no .skiff/client.toml\n{}", log());
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&data.join("client.toml")), 0o600);
    assert_eq!(mode(&data), 0o700);
    let text = std::fs::read_to_string(data.join("client.toml")).unwrap();
    assert!(text.contains(&format!("address = \"{api}\"")), "{text}");

    // In that directory, with no flags and no SKIFF_* variables, the CLI works.
    let in_dir = |args: &[&str]| {
        let mut cmd = Command::new(skiff_bin());
        cmd.current_dir(dir.path())
            .env_remove("SKIFF_ADDR")
            .env_remove("SKIFF_TOKEN")
            .env_remove("SKIFF_CLIENT_CONFIG")
            .args(args);
        run_with_timeout(&mut cmd, CLI_TIMEOUT)
    };
    let ready = wait_until(READY_TIMEOUT, POLL, || {
        let out = in_dir(&["node", "ls", "--output", "json"]);
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("\"ready\"")
    });
    assert!(
        ready,
        "node ls in the dev directory never worked\n{}",
        log()
    );
    let args = ["var", "put", "greeting", "hello"];
    let out = in_dir(&args);
    assert!(out.status.success(), "{}", describe(&args, &out));
    let out = in_dir(&["events", "--output", "json"]);
    assert!(out.status.success(), "{}", describe(&["events"], &out));

    // A named client config that does not exist is one line saying what to do.
    let args = [
        "--client-config",
        "/nonexistent/client.toml",
        "service",
        "ls",
    ];
    let out = in_dir(&args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{}", describe(&args, &out));
    assert!(
        stderr.trim().lines().count() == 1 && stderr.contains("--client-config"),
        "{}",
        describe(&args, &out)
    );
}
