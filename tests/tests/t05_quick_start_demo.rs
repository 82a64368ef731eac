//! The README's first command, `./deploy/demo.sh`, as a newcomer runs it:
//! it starts `skiff dev`, creates the demo service published through the
//! routing proxy, answers on the published port, stops dev and its replicas
//! on SIGTERM (what Ctrl-C does), and finds its service again on the next
//! run. The build step is skipped (`SKIFF_BIN`): the binary under test is
//! the one the rest of the suite uses.

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
    fn start(data_dir: &std::path::Path, api: &str, publish: u16, ports: (u16, u16)) -> Demo {
        let mut child = Command::new("bash")
            .arg(workspace_root().join("deploy/demo.sh"))
            .env("SKIFF_BIN", skiff_bin())
            .env("SKIFF_ADDR", api)
            .env("DEMO_PORT", publish.to_string())
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

    /// The PIDs in the PID column of the `service ps` table it printed.
    fn replica_pids(&self) -> Vec<u32> {
        let header = self
            .seen
            .iter()
            .position(|l| l.starts_with("ID ") && l.contains(" PID"))
            .unwrap_or_else(|| panic!("no `service ps` table in:\n{}", self.output()));
        // Columns are aligned, and cells (the command) may hold spaces:
        // the PID is read where its header starts.
        let at = self.seen[header].find(" PID ").expect("PID column") + 1;
        self.seen[header + 1..]
            .iter()
            .take_while(|l| !l.trim().is_empty())
            .filter_map(|l| l.get(at..)?.split_whitespace().next()?.parse().ok())
            .collect()
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

#[test]
fn the_demo_serves_through_the_routing_proxy_and_stops_everything_it_started() {
    let data = tempfile::Builder::new()
        .prefix("skiff-demo-")
        .tempdir()
        .expect("temporary directory");
    let api = format!("127.0.0.1:{}", free_port());
    let publish = free_port();
    let ports = claim_port_range();

    for round in ["first run", "second run"] {
        let mut demo = Demo::start(data.path(), &api, publish, (ports.start, ports.end));
        assert!(
            demo.wait_for("Press Ctrl-C", Duration::from_secs(90)),
            "{round}: the demo did not come up:\n{}",
            demo.output()
        );
        let out = demo.output();
        if round == "second run" {
            assert!(out.contains("service demo exists already"), "{out}");
        }
        assert!(!out.contains("warning:"), "{round}: {out}");
        // Its own curl through the proxy got python's directory listing.
        assert!(out.contains("Directory listing for /"), "{round}: {out}");
        for _ in 0..10 {
            let answer = http_get(publish, "/").expect("GET through the published port");
            assert_eq!(answer.status, 200, "{answer:?}");
        }
        let dev = demo.dev_pid();
        let replicas = demo.replica_pids();
        assert_eq!(replicas.len(), 2, "{round}: {out}");
        assert!(replicas.iter().all(|&p| pid_alive(p)), "{replicas:?}");

        assert!(
            demo.stop(Duration::from_secs(30)),
            "{round}: the demo did not stop cleanly:\n{}",
            demo.output()
        );
        assert!(!pid_alive(dev), "{round}: skiff dev {dev} still runs");
        for pid in replicas {
            assert!(!pid_alive(pid), "{round}: replica {pid} still runs");
        }
    }
}
