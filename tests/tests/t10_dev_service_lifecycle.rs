//! t10: the life of a service on a real `skiff dev` process — create, answer, scale, replace a
//! killed replica, survive a SIGKILL of the dev process, remove — and the CLI's answers to bad
//! input. Replicas are `python3 -m http.server $PORT` host processes (process runtime).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use serde_json::Value;
use skiff_e2e::{
    answers, assert_cli_error, free_port, pid_alive, proc_env, sigkill, skiff_at, wait_until,
    Allocation, DevCluster, CONVERGE_TIMEOUT, NODE_NAME, POLL,
};

/// How long a stopped replica's port may keep answering (SIGTERM, then SIGKILL after 5 s).
const STOP_TIMEOUT: Duration = Duration::from_secs(12);

fn ports(allocs: &[Allocation]) -> HashSet<u16> {
    allocs.iter().map(|a| a.host_port).collect()
}

fn pids(allocs: &[Allocation]) -> HashSet<u32> {
    allocs.iter().map(|a| a.pid).collect()
}

fn assert_ports_stop_answering(cluster: &DevCluster, ports: &HashSet<u16>, why: &str) {
    let mut still = Vec::new();
    let stopped = wait_until(STOP_TIMEOUT, POLL, || {
        still = ports.iter().copied().filter(|&p| answers(p)).collect();
        still.is_empty()
    });
    assert!(
        stopped,
        "{why}: ports {still:?} still answer after {STOP_TIMEOUT:?}\n--- dev log ---\n{}",
        cluster.log_tail(40)
    );
}

fn assert_pids_gone(cluster: &DevCluster, pids: &HashSet<u32>, why: &str) {
    let mut alive = Vec::new();
    let gone = wait_until(STOP_TIMEOUT, POLL, || {
        alive = pids.iter().copied().filter(|&p| pid_alive(p)).collect();
        alive.is_empty()
    });
    assert!(
        gone,
        "{why}: processes {alive:?} still alive after {STOP_TIMEOUT:?}\n--- dev log ---\n{}",
        cluster.log_tail(40)
    );
}

fn service_names(cluster: &DevCluster) -> Vec<String> {
    let services = cluster.skiff_json(&["service", "ls"]);
    services
        .as_array()
        .unwrap_or_else(|| panic!("`service ls` is not an array: {services}"))
        .iter()
        .map(|s| {
            s["spec"]["name"]
                .as_str()
                .unwrap_or_else(|| panic!("service without spec.name: {s}"))
                .to_string()
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The happy path
// ---------------------------------------------------------------------------------------------

#[test]
fn dev_cluster_reports_one_ready_node_and_itself_as_leader() {
    let cluster = DevCluster::start();

    let nodes = cluster.skiff_json(&["node", "ls"]);
    let nodes = nodes.as_array().expect("node ls is an array");
    assert_eq!(nodes.len(), 1, "one node in dev mode: {nodes:?}");
    let node = &nodes[0];
    let (start, end) = cluster.port_range();
    assert_eq!(node["name"], NODE_NAME, "{node}");
    assert_eq!(node["status"], "ready", "{node}");
    assert_eq!(node["port_range_start"], u64::from(start), "{node}");
    assert_eq!(node["port_range_end"], u64::from(end), "{node}");
    assert_eq!(node["allocations"], 0, "{node}");

    let status = cluster.skiff_json(&["cluster", "status"]);
    let members = status["members"].as_array().expect("members is an array");
    assert_eq!(members.len(), 1, "one server in dev mode: {status}");
    assert!(
        !status["leader"].is_null() && status["leader"] != "" && status["leader"] != 0,
        "the dev server leads: {status}"
    );
    assert!(status["term"].as_u64().unwrap_or(0) >= 1, "{status}");
    assert!(
        status["applied_index"].as_u64() <= status["commit_index"].as_u64(),
        "{status}"
    );

    // Table output works too and names the node.
    let table = cluster.skiff_ok(&["node", "ls"]);
    assert!(table.contains(NODE_NAME), "node ls table: {table}");
    assert!(
        cluster.log().contains(&cluster.addr()),
        "skiff dev should print the address to talk to it:\n{}",
        cluster.log()
    );
}

#[test]
fn replicated_http_service_answers_on_every_replica_and_scales_up_and_down() {
    let cluster = DevCluster::start();
    cluster.create_http_service("web", 3);

    let three = cluster.wait_for_answering_replicas("web", 3);
    let (start, end) = cluster.port_range();
    for a in &three {
        assert!(
            (start..=end).contains(&a.host_port),
            "host port {} outside the node's range {start}-{end}: {a:?}",
            a.host_port
        );
        assert_eq!(a.service, "web", "{a:?}");
        assert_eq!(a.node, NODE_NAME, "{a:?}");
        assert_eq!(
            proc_env(a.pid).get("PORT"),
            Some(&a.host_port.to_string()),
            "the replica's environment has PORT: {a:?}"
        );
    }
    let listed = service_names(&cluster);
    assert_eq!(listed, vec!["web".to_string()], "service ls");
    let inspect = cluster.inspect("web");
    assert_eq!(inspect["spec"]["replicas"], 3, "{inspect}");
    assert_eq!(inspect["spec"]["runtime"], "process", "{inspect}");
    assert_eq!(
        inspect["spec"]["command"],
        serde_json::json!([
            "python3",
            "-m",
            "http.server",
            "$PORT",
            "--bind",
            "127.0.0.1"
        ]),
        "the spec keeps `$PORT` literally; the agent substitutes it: {inspect}"
    );

    cluster.skiff_ok(&["service", "scale", "web", "5"]);
    let five = cluster.wait_for_answering_replicas("web", 5);
    assert!(
        ports(&three).is_subset(&ports(&five)),
        "scaling up keeps the running replicas: {three:?} -> {five:?}"
    );
    let inspect = cluster.inspect("web");
    assert_eq!(inspect["spec"]["replicas"], 5, "{inspect}");
    assert_eq!(inspect["running"], 5, "{inspect}");

    cluster.skiff_ok(&["service", "scale", "web", "1"]);
    let one = cluster.wait_for_answering_replicas("web", 1);
    let removed: HashSet<u16> = ports(&five).difference(&ports(&one)).copied().collect();
    assert_eq!(removed.len(), 4, "{five:?} -> {one:?}");
    assert_ports_stop_answering(&cluster, &removed, "scaled down to 1");
    let removed_pids: HashSet<u32> = pids(&five).difference(&pids(&one)).copied().collect();
    assert_pids_gone(&cluster, &removed_pids, "scaled down to 1");
    assert!(
        answers(one[0].host_port),
        "the remaining replica still answers"
    );

    // `ps --all` also lists what was stopped, as desired "stop" and without a process.
    let all = cluster.ps_all("web");
    assert!(
        all.contains(&one[0]),
        "--all includes the running replica: {all:#?}"
    );
    for a in all.iter().filter(|a| a.id != one[0].id) {
        assert_eq!(a.desired, "stop", "{a:?}");
        assert!(!a.is_running(), "{a:?}");
    }
}

#[test]
fn killed_replica_is_restarted_and_answers_again() {
    let cluster = DevCluster::start();
    // `${PORT}` works like `$PORT`.
    cluster.skiff_ok(&[
        "service",
        "create",
        "--detach",
        "web",
        "--runtime",
        "process",
        "--replicas",
        "2",
        "--",
        "python3",
        "-m",
        "http.server",
        "${PORT}",
        "--bind",
        "127.0.0.1",
    ]);
    let before = cluster.wait_for_answering_replicas("web", 2);
    let victim = before[0].clone();
    let restarts_before: u32 = before.iter().map(|a| a.restarts).sum();

    sigkill(victim.pid);

    let mut last = Vec::new();
    let replaced = wait_until(CONVERGE_TIMEOUT, POLL, || {
        last = cluster.ps("web");
        let restarts: u32 = last.iter().map(|a| a.restarts).sum();
        last.len() == 2
            && restarts > restarts_before
            && last
                .iter()
                .all(|a| a.is_running() && a.pid != victim.pid && answers(a.host_port))
    });
    assert!(
        replaced,
        "after kill -9 of {victim:?}: expected 2 running replicas answering, none with the \
         killed pid, and the restart count up from {restarts_before}; last ps: {last:#?}\n\
         --- dev log ---\n{}",
        cluster.log_tail(40)
    );
    assert!(!pid_alive(victim.pid), "the killed process is gone");
    if let Some(same) = last.iter().find(|a| a.id == victim.id) {
        assert!(
            same.restarts >= 1,
            "restarted in place counts a restart: {same:?}"
        );
    }
    let inspect = cluster.inspect("web");
    assert_eq!(inspect["running"], 2, "{inspect}");
}

#[test]
fn dev_process_killed_with_sigkill_comes_back_with_its_service_and_replicas() {
    let mut cluster = DevCluster::start();
    cluster.create_http_service("web", 2);
    let before = cluster.wait_for_answering_replicas("web", 2);

    cluster.kill9();
    for a in &before {
        assert!(
            pid_alive(a.pid) && answers(a.host_port),
            "replicas run in their own process groups and outlive the dev process: {a:?}"
        );
    }

    let started = Instant::now();
    cluster.restart();
    let after = cluster.wait_for_answering_replicas("web", 2);
    eprintln!(
        "dev restart to 2 answering replicas: {:?}",
        started.elapsed()
    );
    assert_eq!(service_names(&cluster), vec!["web".to_string()]);
    let inspect = cluster.inspect("web");
    assert_eq!(inspect["spec"]["replicas"], 2, "{inspect}");

    // Re-adopted (same PIDs) or restarted; either way no replica of the old life is left over.
    let leftover: HashSet<u32> = pids(&before).difference(&pids(&after)).copied().collect();
    assert_pids_gone(
        &cluster,
        &leftover,
        "replicas not re-adopted after the restart",
    );

    // The restarted dev still supervises them: a replica killed now (possibly one it adopted,
    // which is not its child) is restarted too.
    let victim = after[0].clone();
    let restarts_before: u32 = after.iter().map(|a| a.restarts).sum();
    sigkill(victim.pid);
    let mut last = Vec::new();
    let replaced = wait_until(CONVERGE_TIMEOUT, POLL, || {
        last = cluster.ps("web");
        let restarts: u32 = last.iter().map(|a| a.restarts).sum();
        last.len() == 2
            && restarts > restarts_before
            && last
                .iter()
                .all(|a| a.is_running() && a.pid != victim.pid && answers(a.host_port))
    });
    assert!(
        replaced,
        "after the dev restart, kill -9 of {victim:?}: expected it restarted; last ps: \
         {last:#?}\n--- dev log ---\n{}",
        cluster.log_tail(40)
    );
}

#[test]
fn removing_a_service_stops_every_replica_process() {
    let cluster = DevCluster::start();
    cluster.create_http_service("web", 3);
    let running = cluster.wait_for_answering_replicas("web", 3);

    cluster.skiff_ok(&["service", "rm", "web"]);
    assert!(
        service_names(&cluster).is_empty(),
        "the service disappears from `service ls` at once"
    );
    assert_pids_gone(&cluster, &pids(&running), "service rm");
    assert_ports_stop_answering(&cluster, &ports(&running), "service rm");

    // The name is free again.
    cluster.create_http_service("web", 1);
    cluster.wait_for_answering_replicas("web", 1);
}

// ---------------------------------------------------------------------------------------------
// Bad input
// ---------------------------------------------------------------------------------------------

#[test]
fn unknown_service_is_reported_as_not_found() {
    let cluster = DevCluster::start();
    let keywords = [
        "not found",
        "no service",
        "unknown service",
        "does not exist",
    ];
    for args in [
        &["service", "ps", "nope"][..],
        &["service", "inspect", "nope"],
        &["service", "scale", "nope", "2"],
        &["service", "rm", "nope"],
    ] {
        assert_cli_error(args, &cluster.skiff(args), &keywords);
    }
}

#[test]
fn replicas_out_of_range_are_rejected() {
    let cluster = DevCluster::start();
    for replicas in ["-1", "100000", "1001"] {
        let args = [
            "service",
            "create",
            "--detach",
            "web",
            "--runtime",
            "process",
            "--replicas",
            replicas,
            "--",
            "python3",
            "-m",
            "http.server",
            "$PORT",
        ];
        assert_cli_error(&args, &cluster.skiff(&args), &["replicas"]);
    }
    assert!(service_names(&cluster).is_empty(), "nothing was created");

    cluster.create_http_service("web", 0);
    for replicas in ["-1", "100000"] {
        let args = ["service", "scale", "web", replicas];
        assert_cli_error(&args, &cluster.skiff(&args), &["replicas"]);
    }
    let inspect = cluster.inspect("web");
    assert_eq!(inspect["spec"]["replicas"], 0, "unchanged: {inspect}");
}

#[test]
fn empty_command_is_rejected() {
    let cluster = DevCluster::start();
    for args in [
        &[
            "service",
            "create",
            "--detach",
            "web",
            "--runtime",
            "process",
            "--replicas",
            "1",
        ][..],
        &[
            "service",
            "create",
            "--detach",
            "web",
            "--runtime",
            "process",
            "--replicas",
            "1",
            "--",
        ],
        &[
            "service",
            "create",
            "--detach",
            "web",
            "--runtime",
            "process",
            "--replicas",
            "1",
            "--",
            "",
        ],
    ] {
        assert_cli_error(args, &cluster.skiff(args), &["command"]);
    }
    assert!(service_names(&cluster).is_empty(), "nothing was created");
}

#[test]
fn duplicate_service_name_is_rejected_and_the_original_stays_unchanged() {
    let cluster = DevCluster::start();
    cluster.create_http_service("web", 1);
    let original = cluster.wait_for_answering_replicas("web", 1);
    let inspect_before = cluster.inspect("web");

    let args = [
        "service",
        "create",
        "--detach",
        "web",
        "--runtime",
        "process",
        "--replicas",
        "2",
        "--",
        "sleep",
        "1000",
    ];
    assert_cli_error(&args, &cluster.skiff(&args), &["already exists"]);

    let inspect_after = cluster.inspect("web");
    assert_eq!(
        inspect_after["spec"], inspect_before["spec"],
        "spec unchanged"
    );
    assert_eq!(inspect_after["generation"], inspect_before["generation"]);
    let now = cluster.wait_for_answering_replicas("web", 1);
    assert_eq!(
        (now[0].id.as_str(), now[0].pid),
        (original[0].id.as_str(), original[0].pid),
        "the original replica keeps running untouched"
    );
}

#[test]
fn commands_against_a_server_that_is_down_fail_fast_saying_so() {
    // A loopback port with nothing listening.
    let addr = format!("127.0.0.1:{}", free_port());
    let keywords = ["cannot reach", "connect", "unreachable", "refused"];
    for args in [
        &["service", "ls"][..],
        &["node", "ls"],
        &["cluster", "status"],
        &[
            "service",
            "create",
            "--detach",
            "web",
            "--runtime",
            "process",
            "--",
            "sleep",
            "1",
        ],
    ] {
        let started = Instant::now();
        let out = skiff_at(&addr, args);
        let line = assert_cli_error(args, &out, &keywords);
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "`skiff {}` took {:?} to fail",
            args.join(" "),
            started.elapsed()
        );
        assert!(line.contains(&addr), "the error names the address: {line}");
    }
}

#[test]
fn json_output_of_a_service_has_the_documented_shape_and_env_reaches_the_replica() {
    let cluster = DevCluster::start();
    cluster.skiff_ok(&[
        "service",
        "create",
        "--detach",
        "web",
        "--runtime",
        "process",
        "--env",
        "GREETING=hello world",
        "--env",
        "EMPTY=",
        "--",
        "python3",
        "-m",
        "http.server",
        "$PORT",
        "--bind",
        "127.0.0.1",
    ]);
    let running = cluster.wait_for_answering_replicas("web", 1);
    let env = proc_env(running[0].pid);
    assert_eq!(env.get("GREETING").map(String::as_str), Some("hello world"));
    assert_eq!(env.get("EMPTY").map(String::as_str), Some(""));

    let ps = cluster.skiff_json(&["service", "ps", "web"]);
    let alloc = &ps[0];
    for key in [
        "id",
        "service",
        "node",
        "desired",
        "state",
        "host_port",
        "restarts",
        "pid",
        "message",
        "spec",
        "create_index",
    ] {
        assert!(
            alloc.get(key).is_some(),
            "allocation lacks `{key}`: {alloc}"
        );
    }
    let inspect = cluster.inspect("web");
    for key in [
        "spec",
        "generation",
        "modify_index",
        "running",
        "allocations",
        "unplaced_reason",
    ] {
        assert!(
            inspect.get(key).is_some(),
            "service lacks `{key}`: {inspect}"
        );
    }
    for key in ["name", "runtime", "replicas", "command", "env", "workdir"] {
        assert!(
            inspect["spec"].get(key).is_some(),
            "spec lacks `{key}`: {inspect}"
        );
    }
    assert_eq!(
        inspect["spec"]["replicas"], 1,
        "one replica by default: {inspect}"
    );
    // Values stay out of plain sight: a short hash unless asked for.
    let hidden = inspect["spec"]["env"]["GREETING"]
        .as_str()
        .unwrap_or_default();
    assert!(
        hidden.starts_with("sha256:") && hidden.len() == 19,
        "{inspect}"
    );
    assert!(!inspect.to_string().contains("hello world"), "{inspect}");
    let table = cluster.skiff_ok(&["service", "inspect", "web"]);
    assert!(!table.contains("hello world"), "{table}");
    let shown = cluster.inspect_values("web");
    assert_eq!(shown["spec"]["env"]["GREETING"], "hello world", "{shown}");
    assert!(
        matches!(&inspect["allocations"], Value::Array(a) if a.len() == 1),
        "{inspect}"
    );
    let table = cluster.skiff_ok(&["service", "ps", "web"]);
    assert!(
        table.contains(&alloc["host_port"].to_string()),
        "the table shows the host port: {table}"
    );
}
