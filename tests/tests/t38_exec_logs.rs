//! t38: `skiff service exec` and `skiff service logs` through the servers
//! (issues #15 item 5, #18 item 4, #14 item 3): the CLI reaches only a
//! server, which relays to the replica's agent at the address in its node
//! record.
//!
//! 1. A container (`skiff dev`, runc, the `web-user` image whose user is
//!    `www`): the exit code and both outputs, stdin, the image's user and
//!    `--user`, a terminal (`-t`, runc's console socket), `logs --since`
//!    and `--timestamps`, and a service with no running replica refused in
//!    one line.
//! 2. Three servers and one agent: logs and exec through a follower the
//!    CLI alone knows; an agent that does not answer is named.
//!
//! Needs root and the tools of t30 (runc, a local registry).

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use skiff_e2e::agents::{on_loopback, AgentCluster};
use skiff_e2e::containers::{uids, OciDev, Registry};
use skiff_e2e::servers::ServerCluster;
use skiff_e2e::{
    assert_cli_error, describe, pid_alive, skiff_at, skiff_bin, skiff_ok_at, wait_until, POLL,
};

/// `skiff --server SERVER ARGS` with `input` on its stdin.
fn skiff_with_stdin(server: &str, args: &[&str], input: &[u8]) -> Output {
    let mut child = Command::new(skiff_bin())
        .env_remove("SKIFF_ADDR")
        .arg("--server")
        .arg(server)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start skiff");
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(input)
        .expect("write stdin");
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().expect("wait for skiff").is_none() {
        assert!(Instant::now() < deadline, "`skiff {}` hung", args.join(" "));
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("skiff output")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn exec_runs_in_a_replica_container_with_its_code_streams_and_user_and_logs_filter_by_time() {
    let registry = Registry::shared();
    let cluster = OciDev::start(registry.clone(), &[]);
    let server = cluster.addr();
    let image = registry.image("web-user:v1");
    cluster.skiff_ok(&[
        "service",
        "create",
        "--detach",
        "app",
        "--image",
        &image,
        "--entrypoint",
        "/bin/sh",
        "--",
        "-c",
        "echo hello; echo oops >&2; exec sleep 1000",
    ]);
    let replica = cluster
        .wait_replicas("app", 1, "running", |a| {
            a.state == "running" && pid_alive(a.pid)
        })
        .remove(0);

    // The exit code and both streams, apart.
    let args = [
        "service",
        "exec",
        "app",
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2; exit 7",
    ];
    let out = cluster.skiff(&args);
    assert_eq!(out.status.code(), Some(7), "{}", describe(&args, &out));
    assert_eq!(
        (text(&out.stdout), text(&out.stderr)),
        ("out\n".into(), "err\n".into())
    );

    // Stdin passes through with -i; the end of stdin ends `cat`.
    let args = [
        "service",
        "exec",
        "-i",
        "app",
        "--replica",
        &replica.id[..8],
        "--",
        "cat",
    ];
    let out = skiff_with_stdin(&server, &args, b"piped\nthrough\n");
    assert!(out.status.success(), "{}", describe(&args, &out));
    assert_eq!(text(&out.stdout), "piped\nthrough\n");

    // The replica's own user by default (the image's `www`), in its
    // working directory; `--user` by name or number.
    let image_uid = uids(replica.pid)
        .first()
        .copied()
        .expect("the replica's uid");
    let out = cluster.skiff_ok(&["service", "exec", "app", "--", "sh", "-c", "id -u; pwd"]);
    assert_eq!(
        out,
        format!("{image_uid}\n/www\n"),
        "the image's user: {out}"
    );
    assert_eq!(image_uid, 1000);
    let out = cluster.skiff_ok(&["service", "exec", "--user", "root", "app", "--", "id", "-u"]);
    assert_eq!(out, "0\n");
    let out = cluster.skiff_ok(&["service", "exec", "-u", "4242:4343", "app", "--", "id"]);
    assert!(out.starts_with("uid=4242 gid=4343"), "{out}");
    let args = ["service", "exec", "-u", "nosuchuser", "app", "--", "id"];
    assert_cli_error(&args, &cluster.skiff(&args), &["--user"]);

    // -t: a terminal made by runc in the container (the console socket).
    let args = [
        "service",
        "exec",
        "-t",
        "app",
        "--",
        "sh",
        "-c",
        "tty; exit 3",
    ];
    let out = cluster.skiff(&args);
    assert_eq!(out.status.code(), Some(3), "{}", describe(&args, &out));
    assert!(
        text(&out.stdout).contains("/dev/pts/"),
        "{}",
        describe(&args, &out)
    );

    // Logs through the server: --since an age or a time, --timestamps.
    let logs = cluster.skiff_ok(&["service", "logs", "app", "--since", "1h"]);
    assert_eq!(logs, "hello\n");
    let future = "2999-01-01T00:00:00Z";
    let none = cluster.skiff_ok(&["service", "logs", "app", "--since", future]);
    assert_eq!(none, "", "nothing was written after {future}");
    let stamped = cluster.skiff_ok(&["service", "logs", "app", "--timestamps"]);
    let (time, line) = stamped.trim_end().split_once(' ').expect("a timestamp");
    assert_eq!(line, "hello", "{stamped}");
    assert!(
        time.starts_with("20") && time.ends_with('Z') && time.len() == 24,
        "{stamped}"
    );
    let args = ["service", "logs", "app", "--since", "yesterday"];
    let out = cluster.skiff(&args);
    assert!(
        !out.status.success() && text(&out.stderr).contains("RFC 3339"),
        "{}",
        describe(&args, &out)
    );

    // No running replica: one line naming the field and the fix.
    cluster.skiff_ok(&["service", "scale", "app", "0"]);
    let args = ["service", "exec", "app", "--", "true"];
    let line = assert_cli_error(&args, &cluster.skiff(&args), &["no running replica"]);
    assert!(line.contains("service") && line.contains("scale"), "{line}");
}

#[test]
fn logs_and_exec_go_through_a_follower_that_the_cli_alone_knows() {
    let servers = ServerCluster::start(3, &[]);
    let mut agents = AgentCluster::start(&servers.addresses, &on_loopback(["x1"]));
    let leader = servers.leader().expect("a leader");
    let follower = servers.addresses[(leader + 1) % 3].clone();
    skiff_ok_at(
        &follower,
        &[
            "service",
            "create",
            "--detach",
            "talk",
            "--",
            "/bin/sh",
            "-c",
            "echo hello-$SKIFF_SERVICE; exec sleep 1000",
        ],
    );
    let mut logs = String::new();
    let ok = wait_until(Duration::from_secs(20), POLL, || {
        let out = skiff_at(&follower, &["service", "logs", "talk"]);
        logs = text(&out.stdout);
        logs == "hello-talk\n"
    });
    assert!(ok, "logs through the follower: {logs:?}\n{}", agents.logs());

    // A process replica's command runs on its node, with its environment.
    let args = [
        "service",
        "exec",
        "talk",
        "--",
        "/bin/sh",
        "-c",
        "echo $SKIFF_SERVICE; exit 5",
    ];
    let out = skiff_at(&follower, &args);
    assert_eq!(out.status.code(), Some(5), "{}", describe(&args, &out));
    assert_eq!(text(&out.stdout), "talk\n");

    // The node record holds the agent's address; no variable does.
    let nodes = skiff_ok_at(&follower, &["node", "ls", "--output", "json"]);
    let nodes: serde_json::Value = serde_json::from_str(&nodes).expect("node ls json");
    let address = nodes[0]["agent_address"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(address.starts_with("127.0.0.2:"), "{nodes}");
    let vars = skiff_ok_at(&follower, &["var", "ls"]);
    assert!(!vars.contains("/logs"), "no logs address variable: {vars}");

    // An agent that does not answer is named.
    agents.kill9(0);
    let args = ["service", "logs", "talk"];
    let line = assert_cli_error(
        &args,
        &skiff_at(&follower, &args),
        &["failed to reach the agent"],
    );
    assert!(line.contains("x1"), "{line}");
    let args = ["node", "prune", "x1"];
    assert_cli_error(
        &args,
        &skiff_at(&follower, &args),
        &["failed to reach the agent of node"],
    );
}
