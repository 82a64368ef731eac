//! t11: the CLI as an operator pipes and points it — output into a closed pipe or a full disk,
//! several `--server` addresses, `events --tail/--since` — against a real `skiff dev` process.

use std::fs::OpenOptions;
use std::process::{Command, Output, Stdio};

use skiff_e2e::{assert_cli_error, describe, free_port, skiff_at, skiff_bin, DevCluster};

/// Runs `skiff --server <server> <args>` with stdout a pipe whose reading end is already
/// closed, as in `skiff events | head -1` once `head` has its line.
fn skiff_into_closed_pipe(server: &str, args: &[&str]) -> Output {
    let mut child = Command::new(skiff_bin())
        .env_remove("SKIFF_ADDR")
        .arg("--server")
        .arg(server)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start skiff");
    drop(child.stdout.take());
    child.wait_with_output().expect("wait for skiff")
}

#[test]
fn output_into_a_closed_pipe_ends_quietly_like_a_sigpiped_tool() {
    let cluster = DevCluster::start();
    for args in [
        &["events"][..],
        &["-o", "json", "node", "ls"],
        &["service", "ls"],
        &["cluster", "status"],
    ] {
        let out = skiff_into_closed_pipe(&cluster.addr(), args);
        let what = describe(args, &out);
        assert_eq!(out.status.code(), Some(141), "{what}");
        assert!(out.stderr.is_empty(), "nothing on stderr: {what}");
    }
}

#[test]
fn output_onto_a_full_disk_is_a_one_line_error() {
    let cluster = DevCluster::start();
    let args = ["events"];
    let full = OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .expect("open /dev/full");
    let out = Command::new(skiff_bin())
        .env_remove("SKIFF_ADDR")
        .arg("--server")
        .arg(cluster.addr())
        .args(args)
        .stdin(Stdio::null())
        .stdout(full)
        .stderr(Stdio::piped())
        .output()
        .expect("run skiff");
    let line = assert_cli_error(&args, &out, &["no space left"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&args, &out));
    assert!(line.contains("failed to write the output"), "{line}");
}

#[test]
fn several_server_addresses_use_the_first_that_answers_and_name_every_one_that_does_not() {
    let cluster = DevCluster::start();
    let dead = format!("127.0.0.1:{}", free_port());
    let args = ["service", "ls"];

    let out = skiff_at(&format!("{dead},{}", cluster.addr()), &args);
    assert!(out.status.success(), "{}", describe(&args, &out));

    let out = Command::new(skiff_bin())
        .env("SKIFF_ADDR", format!("{dead},{}", cluster.addr()))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run skiff");
    assert!(
        out.status.success(),
        "SKIFF_ADDR: {}",
        describe(&args, &out)
    );

    let other = format!("127.0.0.1:{}", free_port());
    let out = skiff_at(&format!("{dead},{other}"), &args);
    let line = assert_cli_error(&args, &out, &["cannot reach any skiff server"]);
    assert!(line.contains(&dead) && line.contains(&other), "{line}");
}

#[test]
fn events_tail_and_since_choose_what_is_printed() {
    let cluster = DevCluster::start();
    // No replicas: no events arrive later than the ones of the creates.
    for name in ["a", "b", "c"] {
        cluster.skiff_ok(&[
            "service",
            "create",
            "--detach",
            name,
            "--replicas",
            "0",
            "--runtime",
            "process",
            "--",
            "sleep",
            "600",
        ]);
    }
    let lines = |args: &[&str]| -> Vec<String> {
        cluster
            .skiff_ok(args)
            .lines()
            .skip(1)
            .map(str::to_string)
            .collect()
    };
    let all = lines(&["events"]);
    assert!(all.len() >= 3, "{all:?}");

    let tail = lines(&["events", "--tail", "2"]);
    assert_eq!(tail, all[all.len() - 2..], "--tail 2 prints the last two");

    let created = lines(&["events", "--service", "b", "--tail", "1"]);
    assert_eq!(created.len(), 1, "{created:?}");
    let index: u64 = created[0]
        .split_whitespace()
        .nth(1)
        .and_then(|i| i.parse().ok())
        .unwrap_or_else(|| panic!("no index in {created:?}"));
    let since = lines(&["events", "--since", &index.to_string()]);
    let newer: Vec<&String> = all
        .iter()
        .filter(|l| {
            l.split_whitespace()
                .nth(1)
                .and_then(|i| i.parse::<u64>().ok())
                .is_some_and(|i| i >= index)
        })
        .collect();
    assert_eq!(since.iter().collect::<Vec<_>>(), newer, "--since INDEX");

    assert_eq!(lines(&["events", "--since", "1h"]).len(), all.len());
    let args = ["events", "--since", "10x"];
    let out = cluster.skiff(&args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("a Raft index like 12345"),
        "{}",
        describe(&args, &out)
    );
}
