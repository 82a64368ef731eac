//! The README's first command, `./deploy/demo.sh`, as a newcomer runs it:
//! it starts its own registry with the demo image and `skiff dev`, creates
//! the demo service published through the routing proxy, whose replicas
//! answer with their own identity (replica id, node, version), rolls it out
//! to its other version under load with no failed request, serves no
//! replica's files, stops dev, its replicas and its registry on SIGTERM
//! (what Ctrl-C does), and finds its service again on the next run (which
//! rolls back). The process-runtime path (machines without runc) is run
//! once too. The build step is skipped (`SKIFF_BIN`): the binary under test
//! is the one the rest of the suite uses.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use skiff_e2e::{
    claim_port_range, free_port, http_get, pid_alive, skiff_bin, wait_until, workspace_root, POLL,
};

/// One run of the demo script, reading its output as it comes.
struct Demo {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Demo {
    fn start(
        runtime: &str,
        data_dir: &std::path::Path,
        api: &str,
        (publish, registry): (u16, u16),
        ports: (u16, u16),
    ) -> Demo {
        let mut child = Command::new("bash")
            .arg(workspace_root().join("deploy/demo.sh"))
            .env("SKIFF_BIN", skiff_bin())
            .env("SKIFF_ADDR", api)
            .env("DEMO_RUNTIME", runtime)
            .env("DEMO_PORT", publish.to_string())
            .env("DEMO_REGISTRY_PORT", registry.to_string())
            .env("DEMO_DATA_DIR", data_dir)
            .env(
                "DEMO_DEV_FLAGS",
                format!("--port-range {}-{}", ports.0, ports.1),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start deploy/demo.sh");
        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        for pipe in [
            Box::new(stdout) as Box<dyn std::io::Read + Send>,
            Box::new(stderr),
        ] {
            let tx = tx.clone();
            thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        return;
                    }
                }
            });
        }
        Demo {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Reads output until a line contains `text` (bounded by `limit`).
    fn wait_for(&mut self, text: &str, limit: Duration) -> bool {
        let deadline = std::time::Instant::now() + limit;
        // Bounded: every round waits until the deadline at most.
        while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let found = line.contains(text);
                    self.seen.push(line);
                    if found {
                        return true;
                    }
                }
                Err(_) => return false,
            }
        }
        false
    }

    fn output(&self) -> String {
        self.seen.join("\n")
    }

    /// The `skiff dev` PID the script printed.
    fn dev_pid(&self) -> u32 {
        self.seen
            .iter()
            .find_map(|l| {
                let rest = l.split("Skiff dev is running (pid ").nth(1)?;
                rest.split(',').next()?.parse().ok()
            })
            .unwrap_or_else(|| panic!("no dev pid in:\n{}", self.output()))
    }

    /// SIGTERM to the script (as Ctrl-C would reach it), then its exit
    /// within `limit`; true if it exited successfully.
    fn stop(&mut self, limit: Duration) -> bool {
        let pid = i32::try_from(self.child.id()).expect("pid fits i32");
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        let exited = wait_until(limit, POLL, || matches!(self.child.try_wait(), Ok(Some(_))));
        if !exited {
            let _ = self.child.kill();
            let _ = self.child.wait();
            return false;
        }
        // Drain what it printed while stopping.
        while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
            self.seen.push(line);
        }
        self.child.wait().map(|s| s.success()).unwrap_or(false)
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.stop(Duration::from_secs(20));
        }
    }
}

impl Demo {
    /// The PID the script printed after `prefix` (up to the next `)`).
    fn printed_pid(&self, prefix: &str) -> Option<u32> {
        self.seen.iter().find_map(|l| {
            let rest = l.split(prefix).nth(1)?;
            rest.split(')').next()?.trim().parse().ok()
        })
    }

    /// The replica ids in the ID column of the `service ps` table it printed.
    fn replica_ids(&self) -> Vec<String> {
        let header = self
            .seen
            .iter()
            .position(|l| l.starts_with("ID "))
            .unwrap_or_else(|| panic!("no `service ps` table in:\n{}", self.output()));
        self.seen[header + 1..]
            .iter()
            .take_while(|l| !l.trim().is_empty())
            .filter_map(|l| l.split_whitespace().next().map(str::to_string))
            .collect()
    }
}

/// `(replica, node, version)` of an answer "hello from replica ID of demo on
/// node NODE, version V".
fn identity(answer: &str) -> Option<(String, String, String)> {
    let rest = answer.trim().strip_prefix("hello from replica ")?;
    let (id, rest) = rest.split_once(" of demo on node ")?;
    let (node, version) = rest.split_once(", version ")?;
    Some((id.to_string(), node.to_string(), version.to_string()))
}

/// `(from, to, requests, failed)` of the line the rollout printed.
fn rollout(out: &str) -> Option<(String, String, u32, u32)> {
    let line = out.lines().find(|l| l.contains("==> rolling update "))?;
    let rest = line.split("==> rolling update ").nth(1)?;
    let (versions, rest) = rest.split_once(" under load: ")?;
    let (from, to) = versions.split_once(" -> ")?;
    let (requests, rest) = rest.split_once(" requests, ")?;
    let (failed, _) = rest.split_once(" failed")?;
    Some((
        from.to_string(),
        to.to_string(),
        requests.parse().ok()?,
        failed.parse().ok()?,
    ))
}

/// Runs the demo `rounds.len()` times on one data dir, checking each round
/// rolls from `rounds[i].0` to `rounds[i].1`.
fn run_demo(runtime: &str, rounds: &[(&str, &str)]) {
    let data = tempfile::Builder::new()
        .prefix("skiff-demo-")
        .tempdir()
        .expect("temporary directory");
    let api = format!("127.0.0.1:{}", free_port());
    let publish = free_port();
    let registry = free_port();
    let ports = claim_port_range();

    for (round, (from, to)) in rounds.iter().enumerate() {
        let mut demo = Demo::start(
            runtime,
            data.path(),
            &api,
            (publish, registry),
            (ports.start, ports.end),
        );
        assert!(
            demo.wait_for("Press Ctrl-C", Duration::from_secs(180)),
            "{runtime} round {round}: the demo did not come up:\n{}",
            demo.output()
        );
        let out = demo.output();
        if round > 0 {
            assert!(out.contains("service demo exists already"), "{out}");
        }
        assert!(!out.contains("warning:"), "{runtime} round {round}: {out}");
        assert!(!out.contains("error:"), "{runtime} round {round}: {out}");

        // Before the update, its own curls got answers from the replicas
        // `service ps` listed, on node dev, at the version it started with.
        let ids = demo.replica_ids();
        assert_eq!(ids.len(), 2, "{out}");
        let before: Vec<_> = out.lines().filter_map(identity).collect();
        assert!(before.len() >= 4, "no identity answers in:\n{out}");
        for (id, node, version) in &before[..4] {
            assert!(
                ids.iter().any(|full| full.starts_with(id.as_str())),
                "{id} is not one of {ids:?}:\n{out}"
            );
            assert_eq!(node, "dev", "{out}");
            assert_eq!(version, from, "{out}");
        }
        // Only `/` answers: no replica's working dir or files.
        assert!(out.contains("state.json   (only / answers"), "{out}");
        let status_line = out
            .lines()
            .skip_while(|l| !l.contains("state.json   (only / answers"))
            .nth(1)
            .unwrap_or_default();
        assert_eq!(status_line.trim(), "404", "{out}");
        assert!(!out.contains("Directory listing"), "{out}");

        // The rollout under load: the versions, and not one failed request.
        let (f, t, requests, failed) =
            rollout(&out).unwrap_or_else(|| panic!("no rollout line in:\n{out}"));
        assert_eq!((f.as_str(), t.as_str()), (*from, *to), "{out}");
        assert!(requests > 0, "{out}");
        assert_eq!(failed, 0, "{out}");

        // Through the published port now: the new version, from both replicas.
        let mut answered = std::collections::BTreeSet::new();
        for _ in 0..20 {
            let answer = http_get(publish, "/").expect("GET through the published port");
            assert_eq!(answer.status, 200, "{answer:?}");
            let (id, node, version) = identity(&answer.body)
                .unwrap_or_else(|| panic!("not an identity answer: {answer:?}"));
            assert_eq!(
                (node.as_str(), version.as_str()),
                ("dev", *to),
                "{answer:?}"
            );
            answered.insert(id);
        }
        assert_eq!(answered.len(), 2, "{answered:?}");
        let missing = http_get(publish, "/state.json").expect("GET /state.json");
        assert_eq!(missing.status, 404, "{missing:?}");

        let dev = demo.dev_pid();
        assert!(
            demo.stop(Duration::from_secs(30)),
            "{runtime} round {round}: the demo did not stop cleanly:\n{}",
            demo.output()
        );
        assert!(
            !pid_alive(dev),
            "{runtime} round {round}: skiff dev {dev} still runs"
        );
        // The registry it started (containers only) is stopped too.
        let registry_pid = demo.printed_pid("stopping the demo's registry (pid ");
        assert_eq!(
            registry_pid.is_some(),
            runtime == "oci",
            "{runtime}: the registry line:\n{}",
            demo.output()
        );
        if let Some(pid) = registry_pid {
            assert!(
                wait_until(Duration::from_secs(5), POLL, || !pid_alive(pid)),
                "registry {pid} still runs"
            );
        }
        assert!(
            !answers_now(publish),
            "{runtime} round {round}: port {publish} still answers"
        );
    }
}

/// Whether anything still accepts connections on `port`.
fn answers_now(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(500),
    )
    .is_ok()
}

#[test]
fn the_demo_shows_identities_and_a_rollout_without_failed_requests_in_containers() {
    skiff_e2e::containers::require_container_tools();
    run_demo("oci", &[("v1", "v2"), ("v2", "v1")]);
}

#[test]
fn the_demo_runs_as_host_processes_where_there_is_no_container_runtime() {
    run_demo("process", &[("v1", "v2")]);
}
