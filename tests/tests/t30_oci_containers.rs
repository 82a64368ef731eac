//! t30: real containers end to end — `skiff dev` pulls the busybox test images of
//! `deploy/images/build.sh` from a local `docker-registry` and runs them with runc (and crun
//! where it can run): bridge and host networking, memory limits, the image's user, the
//! seccomp filter and cgroup namespace, surviving a SIGKILL of the agent, removal without
//! leftovers.
//!
//! Needs root and `apt-get install runc crun tini iptables iproute2
//! docker-registry skopeo busybox-static zstd`; a missing tool fails the test with the package
//! to install.

use std::collections::BTreeMap;
use std::time::Duration;

use skiff_e2e::containers::{children, leftovers, memory_limit, uids, OciDev, Registry};
use skiff_e2e::{answers, http_get, pid_alive, proc_env, wait_until, Allocation, POLL};

/// How long removed containers may take to be stopped (grace 3 s) and destroyed.
const RM_TIMEOUT: Duration = Duration::from_secs(20);

fn running_and_answering(a: &Allocation) -> bool {
    a.desired == "run"
        && matches!(a.state.as_str(), "running" | "healthy")
        && pid_alive(a.pid)
        && answers(a.host_port)
}

/// `service rm NAME`, then waits until none of `ids` has anything left behind.
fn remove_and_assert_nothing_left(cluster: &OciDev, service: &str, runtime: &str, ids: &[String]) {
    cluster.skiff_ok(&["service", "rm", service]);
    let mut left = Vec::new();
    let clean = wait_until(RM_TIMEOUT, POLL, || {
        left = ids
            .iter()
            .flat_map(|id| leftovers(cluster, runtime, id))
            .collect();
        left.is_empty()
    });
    assert!(
        clean,
        "`service rm {service}` left behind: {left:#?}\n--- dev log ---\n{}",
        cluster.log_tail(40)
    );
}

#[test]
fn bridge_replicas_answer_on_their_host_ports_with_their_memory_limit_and_rm_leaves_nothing() {
    let registry = Registry::shared();
    let cluster = OciDev::start(registry.clone(), &[]);
    let image = registry.image("web:v1");
    cluster.skiff_ok(&[
        "service",
        "create",
        "--detach",
        "web",
        "--image",
        &image,
        "--port",
        "80",
        "--replicas",
        "3",
        "--memory",
        "64",
    ]);
    let replicas = cluster.wait_replicas(
        "web",
        3,
        "running and answering HTTP",
        running_and_answering,
    );

    let mut ports: Vec<u16> = replicas.iter().map(|a| a.host_port).collect();
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(ports.len(), 3, "three distinct host ports: {replicas:#?}");
    for a in &replicas {
        let page = http_get(a.host_port, "/").expect("GET /");
        assert!(
            page.body.contains("v1"),
            "replica {} serves {:?}",
            a.id,
            page.body
        );
        assert_eq!(
            proc_env(a.pid).get("PORT").map(String::as_str),
            Some("80"),
            "bridge mode: PORT is the container port"
        );
        assert_eq!(
            memory_limit(a.pid),
            Some(64 * 1024 * 1024),
            "replica {}: --memory 64 in its cgroup",
            a.id
        );
    }

    let ids = cluster.container_ids("runc");
    assert_eq!(ids.len(), 3, "one runc container per replica: {ids:?}");
    remove_and_assert_nothing_left(&cluster, "web", "runc", &ids);
    for a in &replicas {
        assert!(
            !answers(a.host_port),
            "port {} still answers after rm",
            a.host_port
        );
        assert!(
            !pid_alive(a.pid),
            "container process {} still alive after rm",
            a.pid
        );
    }
}

#[test]
fn a_host_network_replica_listens_on_its_host_port_given_in_port() {
    let registry = Registry::shared();
    let cluster = OciDev::start(registry.clone(), &[]);
    let image = registry.image("web:v1");
    cluster.skiff_ok(&[
        "service",
        "create",
        "--detach",
        "web-host",
        "--image",
        &image,
        "--network",
        "host",
        "--replicas",
        "2",
    ]);
    let replicas = cluster.wait_replicas(
        "web-host",
        2,
        "running and answering HTTP",
        running_and_answering,
    );
    for a in &replicas {
        assert_eq!(
            proc_env(a.pid).get("PORT"),
            Some(&a.host_port.to_string()),
            "host mode: PORT is the assigned host port"
        );
        let netns = |pid: u32| std::fs::read_link(format!("/proc/{pid}/ns/net")).ok();
        assert_eq!(
            netns(a.pid),
            netns(std::process::id()),
            "host mode shares the host's network namespace"
        );
    }
    let ids = cluster.container_ids("runc");
    remove_and_assert_nothing_left(&cluster, "web-host", "runc", &ids);
}

#[test]
fn the_container_process_runs_as_the_images_user() {
    let registry = Registry::shared();
    let cluster = OciDev::start(registry.clone(), &[]);
    let image = registry.image("web-user:v1");
    // No --port: the image's exposed 8080 is the container port.
    cluster.skiff_ok(&[
        "service", "create", "--detach", "web-user", "--image", &image,
    ]);
    let replicas = cluster.wait_replicas(
        "web-user",
        1,
        "running and answering HTTP",
        running_and_answering,
    );
    let a = &replicas[0];
    let mut pids = vec![a.pid];
    pids.extend(children(a.pid));
    for pid in pids {
        assert_eq!(
            uids(pid),
            [1000, 1000, 1000, 1000],
            "process {pid} runs as www (uid 1000 in the image's /etc/passwd)"
        );
    }
    assert_eq!(
        proc_env(a.pid).get("PORT").map(String::as_str),
        Some("8080")
    );
}

#[test]
fn containers_keep_serving_through_a_kill_9_of_the_agent_and_are_re_adopted_unchanged() {
    let registry = Registry::shared();
    let mut cluster = OciDev::start(registry.clone(), &[]);
    let image = registry.image("web:v1");
    cluster.skiff_ok(&[
        "service",
        "create",
        "--detach",
        "web",
        "--image",
        &image,
        "--replicas",
        "2",
    ]);
    let before = cluster.wait_replicas(
        "web",
        2,
        "running and answering HTTP",
        running_and_answering,
    );
    let by_id = |allocs: &[Allocation]| -> BTreeMap<String, (u32, u16, u32)> {
        allocs
            .iter()
            .map(|a| (a.id.clone(), (a.pid, a.host_port, a.restarts)))
            .collect()
    };

    cluster.kill9();
    for a in &before {
        assert!(pid_alive(a.pid), "container {} died with the agent", a.id);
        assert!(
            answers(a.host_port),
            "container {} stopped serving without its agent",
            a.id
        );
    }

    cluster.restart();
    let after = cluster.wait_replicas("web", 2, "re-adopted and answering", running_and_answering);
    assert_eq!(
        by_id(&after),
        by_id(&before),
        "same replicas, PIDs, ports and restart counts"
    );
    // Nothing restarts them a little later either (a supervisor that lost track would).
    std::thread::sleep(Duration::from_secs(3));
    let later = cluster.wait_replicas("web", 2, "still running", running_and_answering);
    assert_eq!(
        by_id(&later),
        by_id(&before),
        "no restart after re-adoption"
    );
    assert!(
        cluster.log().contains("adopted container"),
        "the agent says it re-adopted\n{}",
        cluster.log_tail(30)
    );
    let ids = cluster.container_ids("runc");
    remove_and_assert_nothing_left(&cluster, "web", "runc", &ids);
}

#[test]
fn crun_runs_containers_or_says_clearly_why_it_cannot() {
    let registry = Registry::shared();
    let cluster = OciDev::start(registry.clone(), &["--oci-runtime", "crun"]);
    let image = registry.image("web:v1");
    cluster.skiff_ok(&[
        "service", "create", "--detach", "web", "--image", &image, "--port", "80",
    ]);
    let mut last = Vec::new();
    let settled = wait_until(Duration::from_secs(60), POLL, || {
        last = cluster.ps("web");
        last.len() == 1 && (running_and_answering(&last[0]) || last[0].message.contains("crun"))
    });
    assert!(
        settled,
        "crun neither ran the container nor explained why not: {last:#?}\n--- dev log ---\n{}",
        cluster.log_tail(40)
    );
    let a = &last[0];
    if running_and_answering(a) {
        eprintln!("crun ran the container on this host");
        let ids = cluster.container_ids("crun");
        assert_eq!(ids.len(), 1, "crun holds the container: {ids:?}");
        remove_and_assert_nothing_left(&cluster, "web", "crun", &ids);
    } else {
        // Debian's crun 1.8 on a hybrid cgroup v1+v2 host.
        eprintln!("crun cannot run containers on this host: {}", a.message);
        assert!(
            a.message.contains("hybrid") && a.message.contains("--oci-runtime runc"),
            "the replica says why crun cannot run it and what to do: {a:#?}"
        );
    }
}

#[test]
fn service_logs_prints_tails_and_follows_replica_output_until_the_service_is_removed() {
    let registry = Registry::shared();
    let cluster = OciDev::start(registry.clone(), &[]);
    let image = registry.image("many:v1");
    let script =
        "echo first; echo oops >&2; i=0; while true; do i=$((i+1)); echo tick-$i; sleep 0.3; done";
    cluster.skiff_ok(&[
        "service",
        "create",
        "--detach",
        "talk",
        "--image",
        &image,
        "--replicas",
        "2",
        "--",
        "/bin/sh",
        "-c",
        script,
    ]);
    let replicas = cluster.wait_replicas("talk", 2, "running", |a| {
        a.state == "running" && pid_alive(a.pid)
    });
    let id = replicas[0].id.clone();

    // One replica: its streams as they are, stdout and stderr apart.
    let mut out = None;
    let ok = wait_until(Duration::from_secs(20), POLL, || {
        let o = cluster.skiff(&["service", "logs", "talk", "--replica", &id]);
        let done = o.status.success() && String::from_utf8_lossy(&o.stdout).contains("tick-3");
        out = Some(o);
        done
    });
    let out = out.expect("ran once");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(
        ok,
        "no tick-3 in the logs of {id}: {stdout}\n{stderr}\n{}",
        cluster.log_tail(30)
    );
    assert!(stdout.starts_with("first\ntick-1\n"), "stdout: {stdout}");
    assert_eq!(stderr, "oops\n", "stderr apart from stdout");

    // --tail: the last lines of each stream.
    let tail = cluster.skiff_ok(&["service", "logs", "talk", "--replica", &id, "--tail", "2"]);
    let lines: Vec<&str> = tail.lines().collect();
    assert_eq!(lines.len(), 2, "--tail 2: {tail}");
    assert!(
        lines.iter().all(|l| l.starts_with("tick-")),
        "--tail 2: {tail}"
    );

    // Every replica, each line prefixed with its id.
    let all = cluster.skiff_ok(&["service", "logs", "talk", "--tail", "1"]);
    for a in &replicas {
        assert!(
            all.lines()
                .any(|l| l.starts_with(&format!("{} | tick-", a.id))),
            "no line of {} in: {all}",
            a.id
        );
    }

    // --follow streams new lines, and ends by itself once the service is removed.
    let mut follow = std::process::Command::new(skiff_e2e::skiff_bin())
        .args([
            "--server",
            &cluster.addr(),
            "service",
            "logs",
            "talk",
            "--follow",
        ])
        .args(["--replica", &id, "--tail", "1"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start skiff service logs --follow");
    let mut reader = std::io::BufReader::new(follow.stdout.take().expect("piped"));
    let mut seen = Vec::new();
    let reading = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut line = String::new();
        while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
            seen.push(line.trim_end().to_string());
            line.clear();
        }
        seen
    });
    std::thread::sleep(Duration::from_secs(2));
    cluster.skiff_ok(&["service", "rm", "talk"]);
    let ended = wait_until(RM_TIMEOUT, POLL, || {
        matches!(follow.try_wait(), Ok(Some(_)))
    });
    if !ended {
        let _ = follow.kill();
    }
    let status = follow.wait().expect("wait for logs --follow");
    let seen = reading.join().expect("reader thread");
    assert!(
        ended,
        "logs --follow did not end after the service was removed: {seen:?}"
    );
    assert!(
        status.success(),
        "logs --follow exited with {status}: {seen:?}"
    );
    let ticks: Vec<u32> = seen
        .iter()
        .filter_map(|l| l.strip_prefix("tick-")?.parse().ok())
        .collect();
    assert!(
        ticks.len() >= 4 && ticks.windows(2).all(|w| w[1] == w[0] + 1),
        "--follow printed consecutive new lines: {seen:?}"
    );
}

/// The image references the agent's store holds (`images/refs/*.json`).
fn stored_references(cluster: &OciDev) -> Vec<String> {
    let refs = cluster.agent_dir().join("images").join("refs");
    let mut found: Vec<String> = std::fs::read_dir(&refs)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read(e.path()).ok())
        .filter_map(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .filter_map(|v| Some(v.get("reference")?.as_str()?.to_string()))
        .collect();
    found.sort();
    found
}

/// Unpacked layers in the agent's store (`images/layers/*`).
fn stored_layers(cluster: &OciDev) -> usize {
    let layers = cluster.agent_dir().join("images").join("layers");
    std::fs::read_dir(layers).into_iter().flatten().count()
}

#[test]
fn node_prune_removes_the_images_of_removed_services_and_keeps_those_in_use() {
    let registry = Registry::shared();
    let cluster = OciDev::start(registry.clone(), &[]);
    let gone_image = registry.image("layers:v1");
    let kept_image = registry.image("web:v1");
    cluster.skiff_ok(&[
        "service",
        "create",
        "--detach",
        "gone",
        "--image",
        &gone_image,
    ]);
    cluster.wait_replicas("gone", 1, "running", |a| {
        a.state == "running" && pid_alive(a.pid)
    });
    let gone_ids = cluster.container_ids("runc");
    cluster.skiff_ok(&[
        "service",
        "create",
        "--detach",
        "kept",
        "--image",
        &kept_image,
        "--port",
        "80",
    ]);
    let kept = cluster.wait_replicas(
        "kept",
        1,
        "running and answering HTTP",
        running_and_answering,
    );
    let before = stored_references(&cluster);
    assert!(
        before.iter().any(|r| r.ends_with("layers:v1"))
            && before.iter().any(|r| r.ends_with("web:v1")),
        "both images stored: {before:?}"
    );
    let layers_before = stored_layers(&cluster);

    // The removed service's replica is stopped and destroyed: its image is no longer leased.
    remove_and_assert_nothing_left(&cluster, "gone", "runc", &gone_ids);

    let out = cluster.skiff_ok(&["node", "prune", "--output", "json"]);
    let report: serde_json::Value = serde_json::from_str(&out).expect("prune prints JSON");
    let node = &report[0];
    assert_eq!(
        node["node"],
        skiff_e2e::NODE_NAME,
        "one row per node: {out}"
    );
    let count = |k: &str| {
        node[k]
            .as_u64()
            .unwrap_or_else(|| panic!("no {k} in {out}"))
    };
    assert!(
        count("images") >= 1,
        "the removed service's image is pruned: {out}"
    );
    assert!(count("layers") >= 1, "its own layers are pruned: {out}");
    assert!(count("bytes") > 0, "space was freed: {out}");

    let after = stored_references(&cluster);
    assert!(
        !after.iter().any(|r| r.ends_with("layers:v1")),
        "the unused image is gone from the store: {after:?}"
    );
    assert!(
        after.iter().any(|r| r.ends_with("web:v1")),
        "the image in use is kept: {after:?}"
    );
    assert!(
        stored_layers(&cluster) < layers_before,
        "unpacked layers were removed"
    );
    let still = cluster.wait_replicas("kept", 1, "still running", running_and_answering);
    assert_eq!(
        (still[0].id.as_str(), still[0].pid),
        (kept[0].id.as_str(), kept[0].pid),
        "the service in use was not touched"
    );
    let page = http_get(still[0].host_port, "/").expect("GET / after the prune");
    assert!(page.body.contains("v1"), "still serves: {:?}", page.body);

    // A second prune has nothing left to remove; the table names the node.
    let table = cluster.skiff_ok(&["node", "prune", skiff_e2e::NODE_NAME]);
    assert!(
        table.starts_with("NODE") && table.contains(&format!("{}  ", skiff_e2e::NODE_NAME)),
        "{table}"
    );
    let unknown = cluster.skiff(&["node", "prune", "nosuchnode"]);
    let stderr = String::from_utf8_lossy(&unknown.stderr);
    assert!(
        !unknown.status.success() && stderr.contains("unknown node nosuchnode"),
        "an unknown node is refused clearly: {stderr}"
    );
    // An agent that does not answer: t38 (its address is in the node
    // record now, which a test cannot point elsewhere).
}

/// The `replica-restarting` messages among `service inspect`'s recent events of `service`.
fn restart_messages(cluster: &OciDev, service: &str) -> Vec<String> {
    let inspect = cluster.inspect(service);
    inspect["events"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["kind"] == "replica-restarting")
        .filter_map(|e| e["message"].as_str().map(str::to_string))
        .collect()
}

#[test]
fn exit_codes_of_containers_survive_a_kill_9_of_the_agent() {
    let registry = Registry::shared();
    let mut cluster = OciDev::start(registry.clone(), &[]);
    let image = registry.image("many:v1");
    // `late` ends once the agent is back, `early` while no agent runs.
    let late_cmd = "sleep 15; exit 7";
    let early_cmd = "sleep 5; exit 9";
    for (name, cmd) in [("late", late_cmd), ("early", early_cmd)] {
        cluster.skiff_ok(&[
            "service", "create", "--detach", name, "--image", &image, "--", "/bin/sh", "-c", cmd,
        ]);
    }
    let first_run = |a: &Allocation| a.state == "running" && a.restarts == 0 && pid_alive(a.pid);
    let late = cluster
        .wait_replicas("late", 1, "running", first_run)
        .remove(0);
    let early = cluster
        .wait_replicas("early", 1, "running", first_run)
        .remove(0);

    cluster.kill9();
    let ended = wait_until(Duration::from_secs(15), POLL, || !pid_alive(early.pid));
    assert!(ended, "`{early_cmd}` did not end");
    assert!(pid_alive(late.pid), "`{late_cmd}` died with the agent");
    cluster.restart();

    // Re-adopted, not restarted; then its exit is seen with its code.
    let adopted = cluster.wait_replicas("late", 1, "re-adopted", |a| {
        a.desired == "run" && a.restarts == 0 && a.pid == late.pid
    });
    assert_eq!(adopted[0].id, late.id);
    let mut messages = Vec::new();
    let seen = wait_until(Duration::from_secs(30), POLL, || {
        messages = restart_messages(&cluster, "late");
        !messages.is_empty()
    });
    assert!(
        seen,
        "no restart of `late` after its exit\n--- dev log ---\n{}",
        cluster.log_tail(40)
    );
    assert_eq!(
        messages[0], "exited with status 7; restarting in 1s",
        "the exit code of a re-adopted container is known, and backoff starts at its base"
    );
    let restarted = cluster.wait_replicas("late", 1, "restarted once", |a| {
        a.restarts == 1 && a.pid != late.pid && pid_alive(a.pid)
    });
    assert_eq!(
        restarted[0].id, late.id,
        "the same replica restarted in place"
    );

    // Ended while the agent was away: its shim kept the code for the next agent.
    let messages = restart_messages(&cluster, "early");
    assert!(
        messages
            .iter()
            .any(|m| m == "exited with status 9; restarting in 1s"),
        "the exit code of a container that ended while no agent ran is known: {messages:?}\n\
         --- dev log ---\n{}",
        cluster.log_tail(40)
    );
    let early_now = cluster.wait_replicas("early", 1, "restarted", |a| a.restarts >= 1);
    assert_eq!(early_now[0].id, early.id);
    assert!(
        cluster
            .log()
            .contains("adopted container that ended while the agent was away"),
        "{}",
        cluster.log_tail(30)
    );
}

/// The `Seccomp:` mode of `/proc/<pid>/status`: 0 off, 1 strict, 2 filter.
fn seccomp_mode(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| Some(l.strip_prefix("Seccomp:")?.trim().to_string()))
}

#[test]
fn containers_run_under_dockers_seccomp_profile_in_their_own_cgroup_namespace() {
    let registry = Registry::shared();
    let cluster = OciDev::start(registry.clone(), &[]);
    // A user namespace needs no capability, so only the seccomp filter
    // refuses `unshare -U`; mount and `unshare -m` lack CAP_SYS_ADMIN too.
    // chroot (CAP_SYS_CHROOT) and linux32 (personality 0x8) stay allowed.
    let script = "unshare -U true; echo unshare-user=$?; unshare -m true; echo unshare-mount=$?; \
                  mkdir -p /mnt/t; mount -t tmpfs none /mnt/t; echo mount=$?; \
                  chroot / true; echo chroot=$?; linux32 true; echo linux32=$?; \
                  grep Seccomp: /proc/self/status; cat /proc/self/cgroup; echo done; \
                  exec sleep 1000";
    let image = registry.image("many:v1");
    cluster.skiff_ok(&[
        "service", "create", "--detach", "jail", "--image", &image, "--", "/bin/sh", "-c", script,
    ]);
    let web = registry.image("web:v1");
    cluster.skiff_ok(&[
        "service", "create", "--detach", "web", "--image", &web, "--port", "80",
    ]);
    // A service may ask for no filter (`--security-opt seccomp=unconfined`).
    cluster.skiff_ok(&[
        "service",
        "create",
        "--detach",
        "free",
        "--image",
        &web,
        "--port",
        "80",
        "--security-opt",
        "seccomp=unconfined",
    ]);
    let free = cluster
        .wait_replicas("free", 1, "running", |a| {
            a.state == "running" && pid_alive(a.pid)
        })
        .remove(0);
    assert_eq!(seccomp_mode(free.pid).as_deref(), Some("0"), "unconfined");
    cluster.skiff_ok(&["service", "rm", "free"]);
    let jail = cluster
        .wait_replicas("jail", 1, "running", |a| {
            a.state == "running" && pid_alive(a.pid)
        })
        .remove(0);
    let mut out = String::new();
    let done = wait_until(Duration::from_secs(20), POLL, || {
        let o = cluster.skiff(&["service", "logs", "jail", "--replica", &jail.id]);
        out = String::from_utf8_lossy(&o.stdout).into_owned();
        out.contains("done\n")
    });
    assert!(
        done,
        "the script did not finish: {out}\n{}",
        cluster.log_tail(30)
    );
    for line in [
        "unshare-user=1",
        "unshare-mount=1",
        "chroot=0",
        "linux32=0",
        "Seccomp:\t2",
    ] {
        assert!(out.lines().any(|l| l == line), "no {line:?} in: {out}");
    }
    assert!(!out.contains("mount=0"), "mount succeeded: {out}");
    let cgroups: Vec<&str> = out
        .lines()
        .filter(|l| l.split(':').count() == 3 && l.contains(":/"))
        .collect();
    assert!(
        !cgroups.is_empty() && cgroups.iter().all(|l| l.ends_with(":/")),
        "in its cgroup namespace the container's cgroups are `/`: {out}"
    );

    // The web image serves under the same filter and namespaces.
    let served = cluster.wait_replicas(
        "web",
        1,
        "running and answering HTTP",
        running_and_answering,
    );
    let cgroupns = |pid: u32| std::fs::read_link(format!("/proc/{pid}/ns/cgroup")).ok();
    for a in [&jail, &served[0]] {
        assert_eq!(
            seccomp_mode(a.pid).as_deref(),
            Some("2"),
            "replica {}",
            a.id
        );
        assert_ne!(
            cgroupns(a.pid),
            cgroupns(std::process::id()),
            "replica {} has its own cgroup namespace",
            a.id
        );
    }
    let ids = cluster.container_ids("runc");
    cluster.skiff_ok(&["service", "rm", "jail"]);
    remove_and_assert_nothing_left(&cluster, "web", "runc", &ids);
}
