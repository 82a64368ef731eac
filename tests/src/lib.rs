//! Helpers shared by Skiff's end-to-end tests in `tests/tests/`: finding the `skiff` binary,
//! claiming loopback ports, running a real `skiff dev` process ([`DevCluster`]), calling the
//! CLI with a time limit, plain HTTP GETs and bounded polling.
//!
//! Every wait here is bounded in time and in rounds, and everything a test starts is killed by
//! PID (never by name) when its [`DevCluster`] is dropped, also when the test panics.
//!
//! [`servers`] runs clusters of `skiff server` processes (t20); [`containers`] a registry and
//! a `skiff dev` with the OCI runtime (t30).

pub mod agents;
pub mod containers;
pub mod load;
pub mod metrics;
pub mod partition;
pub mod servers;
pub mod webdriver;

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use tempfile::TempDir;

/// How long `skiff dev` may take until its node is ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one CLI call may take before the test fails instead of hanging.
pub const CLI_TIMEOUT: Duration = Duration::from_secs(20);
/// How long replicas may take to converge on what was asked for.
pub const CONVERGE_TIMEOUT: Duration = Duration::from_secs(30);
/// How often waits poll.
pub const POLL: Duration = Duration::from_millis(200);

/// Name `DevCluster` gives its node.
pub const NODE_NAME: &str = "dev";

// ---------------------------------------------------------------------------------------------
// Binary and CLI
// ---------------------------------------------------------------------------------------------

/// The workspace root: the parent of this crate's directory.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent directory")
        .to_path_buf()
}

/// The `skiff` binary under test: `$SKIFF_BIN` if set (a relative path is taken from the
/// workspace root), else whichever of `target/release/skiff` and `target/debug/skiff` was
/// built last (`$CARGO_TARGET_DIR` replaces `target/` when set).
pub fn skiff_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("SKIFF_BIN") {
        let bin = PathBuf::from(bin);
        let bin = if bin.is_relative() {
            workspace_root().join(bin)
        } else {
            bin
        };
        assert!(bin.is_file(), "SKIFF_BIN={} is not a file", bin.display());
        return bin;
    }
    let target = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if Path::new(&dir).is_absolute() => PathBuf::from(dir),
        Some(dir) => workspace_root().join(dir),
        None => workspace_root().join("target"),
    };
    let modified = |p: &Path| fs::metadata(p).and_then(|m| m.modified()).ok();
    let release = target.join("release/skiff");
    let debug = target.join("debug/skiff");
    match (modified(&release), modified(&debug)) {
        (Some(r), Some(d)) if r >= d => release,
        (Some(_), None) => release,
        (_, Some(_)) => debug,
        (None, None) => panic!(
            "no skiff binary at {} or {}; run `cargo build --release -p skiff` or set SKIFF_BIN",
            release.display(),
            debug.display()
        ),
    }
}

/// Runs `cmd` with stdin closed, capturing stdout and stderr; kills it and panics if it has
/// not finished within `timeout`.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Output {
    try_run_with_timeout(cmd, timeout).unwrap_or_else(|e| panic!("{e}"))
}

/// Like [`run_with_timeout`], but says what went wrong instead of panicking (for `Drop`).
pub fn try_run_with_timeout(cmd: &mut Command, timeout: Duration) -> Result<Output, String> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("failed to start {cmd:?}: {e}"))?;
    let stdout = drain(child.stdout.take().expect("stdout is piped"));
    let stderr = drain(child.stderr.take().expect("stderr is piped"));
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{cmd:?} did not finish within {timeout:?}"));
            }
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("failed to wait for {cmd:?}: {e}"));
            }
        }
    };
    Ok(Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    })
}

fn drain(mut pipe: impl Read + Send + 'static) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = pipe.read_to_end(&mut buf);
        buf
    })
}

/// Makes every `skiff` this test process starts verify servers against the
/// cluster CA at `ca_cert` (a server's `DATA/pki/ca.crt`): sets
/// `SKIFF_CA_CERT` in this process's environment, which each child
/// inherits. Called when a cluster starts; nextest runs one test per
/// process, so one cluster's CA is current at a time.
pub fn use_cluster_ca(ca_cert: &Path) {
    std::env::set_var("SKIFF_CA_CERT", ca_cert);
}

/// The join token of `role` (`server` or `agent`) of the cluster at
/// `server`, as `skiff cluster token ROLE -q` prints it.
pub fn join_token(server: &str, role: &str) -> String {
    skiff_ok_at(server, &["cluster", "token", role, "-q"])
        .trim()
        .to_string()
}

/// The API token of the cluster a test started: read from the client config (`client.toml`)
/// its bootstrap server or `skiff dev` wrote in `data_dir`, and put in this process's
/// environment as `SKIFF_TOKEN`, so that every CLI run of the test (through these helpers or
/// its own `Command`s, and the scripts it runs) presents it. Each nextest test is its own
/// process, so this credential is the test's. False while the file is not written yet.
pub fn use_token_of(data_dir: &Path) -> bool {
    match client_token(data_dir) {
        Some(token) => {
            std::env::set_var("SKIFF_TOKEN", token);
            true
        }
        None => false,
    }
}

/// The `token` of `data_dir/client.toml`, if written (quoted as JSON quotes strings).
pub fn client_token(data_dir: &Path) -> Option<String> {
    let text = fs::read_to_string(data_dir.join("client.toml")).ok()?;
    text.lines()
        .filter_map(|line| line.trim().strip_prefix("token"))
        .filter_map(|rest| rest.trim_start().strip_prefix('='))
        .find_map(|value| serde_json::from_str::<String>(value.trim()).ok())
        .filter(|token| !token.is_empty())
}

/// Waits (at most [`READY_TIMEOUT`]) until the cluster whose bootstrap data dir is
/// `data_dir` has written its client config, then uses its token ([`use_token_of`]).
pub fn wait_for_token_of(data_dir: &Path) {
    assert!(
        wait_until(READY_TIMEOUT, Duration::from_millis(50), || use_token_of(
            data_dir
        )),
        "no client.toml with the management token in {} within {READY_TIMEOUT:?}",
        data_dir.display()
    );
}

/// Runs `skiff --server <server> <args>` (with `SKIFF_ADDR` removed from its environment).
pub fn skiff_at<S: AsRef<OsStr>>(server: &str, args: &[S]) -> Output {
    let mut cmd = Command::new(skiff_bin());
    cmd.env_remove("SKIFF_ADDR").arg("--server").arg(server);
    cmd.args(args);
    run_with_timeout(&mut cmd, CLI_TIMEOUT)
}

/// [`skiff_at`] that must succeed: its stdout, or a panic describing the run.
pub fn skiff_ok_at(server: &str, args: &[&str]) -> String {
    let out = skiff_at(server, args);
    assert!(out.status.success(), "{}", describe(args, &out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `skiff <args> --output json` on `server`, if it answered with JSON.
pub fn json_at(server: &str, args: &[&str]) -> Option<Value> {
    let args: Vec<&str> = args.iter().copied().chain(["--output", "json"]).collect();
    let out = skiff_at(server, &args);
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).ok())
        .flatten()
}

/// `skiff events --output json EXTRA...` on `server`: the retained events.
pub fn events_at(server: &str, extra: &[&str]) -> Vec<Value> {
    let mut args = vec!["events", "--output", "json"];
    args.extend_from_slice(extra);
    skiff_ok_at(server, &args)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON event per line"))
        .collect()
}

/// Human-readable account of a CLI run, for assertion messages.
pub fn describe(args: &[&str], out: &Output) -> String {
    format!(
        "`skiff {}` exited with {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Asserts the CLI contract for errors: non-zero exit, exactly one non-empty line on stderr,
/// starting with `error: ` and containing (case-insensitively) at least one of `keywords`.
/// Returns that line.
pub fn assert_cli_error(args: &[&str], out: &Output, keywords: &[&str]) -> String {
    let what = describe(args, out);
    assert!(!out.status.success(), "expected a failure: {what}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "expected exactly one line on stderr: {what}"
    );
    let line = lines[0];
    assert!(line.starts_with("error: "), "expected `error: ...`: {what}");
    let lower = line.to_lowercase();
    assert!(
        keywords.iter().any(|k| lower.contains(&k.to_lowercase())),
        "expected the error to mention one of {keywords:?}: {what}"
    );
    line.to_string()
}

/// [`assert_cli_error`] for a command that follows a roll-out (`service create` without
/// `--detach`): on a non-terminal stderr it may print progress lines (`NAME: 0/3 serving
/// ...`) before its one error line, depending on how far the cluster got before the failure
/// showed.
pub fn assert_cli_error_after_progress(args: &[&str], out: &Output, keywords: &[&str]) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    let (last, progress) = lines.split_last().unwrap_or((&"", &[]));
    for line in progress {
        assert!(
            line.contains(" serving"),
            "expected only progress lines before the error: {}",
            describe(args, out)
        );
    }
    let only_error = Output {
        status: out.status,
        stdout: out.stdout.clone(),
        stderr: last.as_bytes().to_vec(),
    };
    assert_cli_error(args, &only_error, keywords)
}

// ---------------------------------------------------------------------------------------------
// Ports
// ---------------------------------------------------------------------------------------------

/// A loopback port that was free a moment ago (bound to `127.0.0.1:0`, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// Host ports handed to one test's node. Ranges lie below Linux's ephemeral ports (32768+),
/// so outgoing connections never take them, and never overlap between tests, even across
/// processes (cargo-nextest): the port just below the range stays bound while this value
/// lives, and a range is only claimed if that listener can be bound.
#[derive(Debug)]
pub struct PortRange {
    pub start: u16,
    pub end: u16,
    _claim: TcpListener,
}

const RANGE_FIRST: u16 = 21_000;
const RANGE_LAST: u16 = 32_700;
const BLOCK: u16 = 40;

static CLAIMS: AtomicUsize = AtomicUsize::new(0);

/// Claims a fresh [`PortRange`] of 39 ports whose ports are all free right now.
pub fn claim_port_range() -> PortRange {
    let blocks = usize::from((RANGE_LAST - RANGE_FIRST) / BLOCK);
    let first = (usize::from(free_port()) + 97 * CLAIMS.fetch_add(1, Ordering::Relaxed)) % blocks;
    for i in 0..blocks {
        let base = RANGE_FIRST + BLOCK * ((first + i) % blocks) as u16;
        let Ok(claim) = TcpListener::bind(("127.0.0.1", base)) else {
            continue;
        };
        let (start, end) = (base + 1, base + BLOCK - 1);
        if (start..=end).all(|p| TcpListener::bind(("127.0.0.1", p)).is_ok()) {
            return PortRange {
                start,
                end,
                _claim: claim,
            };
        }
    }
    panic!("no free block of {BLOCK} ports between {RANGE_FIRST} and {RANGE_LAST}");
}

// ---------------------------------------------------------------------------------------------
// HTTP and waiting
// ---------------------------------------------------------------------------------------------

/// A response from [`http_get`].
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub body: String,
}

/// `GET path` over HTTP/1.0 from `127.0.0.1:port`, with 2 s connect, read and write timeouts;
/// reads at most about 1 MiB.
pub fn http_get(port: u16, path: &str) -> std::io::Result<HttpResponse> {
    http_get_at(SocketAddr::from(([127, 0, 0, 1], port)), path)
}

/// `GET path` over HTTP/1.0 from `addr` (any loopback address), as [`http_get`].
pub fn http_get_at(addr: SocketAddr, path: &str) -> std::io::Result<HttpResponse> {
    let timeout = Duration::from_secs(2);
    let port = addr.port();
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    let mut chunk = [0u8; 8192];
    // Read until EOF, or until the body announced by Content-Length is complete (servers that
    // keep the connection open), or until the read timeout with a complete header.
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&chunk[..n]),
            Err(e) if head_len(&raw).is_some() && is_timeout(&e) => break,
            Err(e) => return Err(e),
        }
        if raw.len() >= 1 << 20 || response_complete(&raw) {
            break;
        }
    }
    let head = head_len(&raw).ok_or_else(|| invalid("incomplete HTTP response"))?;
    let head_text = String::from_utf8_lossy(&raw[..head]);
    let status = head_text
        .lines()
        .next()
        .filter(|line| line.starts_with("HTTP/"))
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| invalid("not an HTTP response"))?;
    let body = String::from_utf8_lossy(&raw[head..]).into_owned();
    Ok(HttpResponse { status, body })
}

fn invalid(msg: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg.to_string())
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// Length of the response head including the blank line, once it has arrived.
fn head_len(raw: &[u8]) -> Option<usize> {
    raw.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

fn response_complete(raw: &[u8]) -> bool {
    let Some(head) = head_len(raw) else {
        return false;
    };
    let length = String::from_utf8_lossy(&raw[..head])
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.trim()
                .eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse::<usize>().ok())?
        });
    length.is_some_and(|len| raw.len() - head >= len)
}

/// Whether `127.0.0.1:port` answers `GET /` with 200.
pub fn answers(port: u16) -> bool {
    matches!(http_get(port, "/"), Ok(r) if r.status == 200)
}

/// Polls `cond` every `poll` until it holds (true) or `timeout` has passed (false). Bounded in
/// time and in rounds, however long `cond` itself takes.
pub fn wait_until(timeout: Duration, poll: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    let rounds = timeout.as_millis() / poll.as_millis().max(1) + 1;
    for _ in 0..rounds {
        if cond() {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        thread::sleep(poll.min(deadline - now));
    }
    cond()
}

// ---------------------------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------------------------

/// Fields of `/proc/<pid>/stat` after the command name: index 0 is field 3 (state).
fn proc_stat(pid: u32) -> Option<Vec<String>> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// The process state letter (`R`, `S`, `Z`, ...) of `pid`, if it exists.
pub fn proc_state(pid: u32) -> Option<char> {
    proc_stat(pid)?.first()?.chars().next()
}

/// Whether `pid` is a live process; a zombie counts as gone.
pub fn pid_alive(pid: u32) -> bool {
    pid != 0 && matches!(proc_state(pid), Some(s) if s != 'Z' && s != 'X')
}

/// The environment of process `pid` (empty if it cannot be read).
pub fn proc_env(pid: u32) -> HashMap<String, String> {
    let raw = fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
    raw.split(|&b| b == 0)
        .filter_map(|var| {
            let var = String::from_utf8_lossy(var);
            let (k, v) = var.split_once('=')?;
            Some((k.to_string(), v.to_string()))
        })
        .collect()
}

/// Start time of `pid` in clock ticks since boot: with the PID, identifies one process.
pub fn proc_start_time(pid: u32) -> Option<u64> {
    proc_stat(pid)?.get(19)?.parse().ok()
}

fn proc_pgid(pid: u32) -> Option<u32> {
    proc_stat(pid)?.get(2)?.parse().ok()
}

/// Sends SIGKILL to `pid` (only that process).
pub fn sigkill(pid: u32) {
    let pid = i32::try_from(pid).expect("pid fits i32");
    kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap_or_else(|e| panic!("kill -9 {pid}: {e}"));
}

/// Kills the process `pid` started at `start_time` and, if it leads one, its process group;
/// does nothing if the PID now belongs to another process.
pub fn kill_if_same(pid: u32, start_time: u64) {
    if pid == 0 || proc_start_time(pid) != Some(start_time) {
        return;
    }
    let Ok(raw) = i32::try_from(pid) else { return };
    if proc_pgid(pid) == Some(pid) {
        let _ = killpg(Pid::from_raw(raw), Signal::SIGKILL);
    }
    let _ = kill(Pid::from_raw(raw), Signal::SIGKILL);
}

/// PIDs of live processes whose environment has `PORT` inside `range` and that started at or
/// after `since` (clock ticks since boot): replicas a node with that port range started.
fn replicas_by_port_env(range: (u16, u16), since: u64) -> Vec<u32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let me = std::process::id();
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me && pid_alive(pid))
        .filter(|&pid| proc_start_time(pid).is_some_and(|t| t >= since))
        .filter(|&pid| {
            let Ok(env) = fs::read(format!("/proc/{pid}/environ")) else {
                return false;
            };
            env.split(|&b| b == 0).any(|var| {
                var.strip_prefix(b"PORT=")
                    .and_then(|v| std::str::from_utf8(v).ok()?.parse::<u16>().ok())
                    .is_some_and(|p| (range.0..=range.1).contains(&p))
            })
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Allocations
// ---------------------------------------------------------------------------------------------

/// One allocation (replica) as `skiff service ps --output json` reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct Allocation {
    pub id: String,
    pub service: String,
    pub node: String,
    pub desired: String,
    pub state: String,
    pub host_port: u16,
    pub restarts: u32,
    pub pid: u32,
    pub message: String,
}

impl Allocation {
    /// Reads one allocation object; panics with the object if a field is missing.
    pub fn from_json(v: &Value) -> Self {
        let s = |k: &str| {
            v.get(k)
                .and_then(Value::as_str)
                .unwrap_or_else(|| panic!("allocation without string `{k}`: {v}"))
                .to_string()
        };
        let n = |k: &str| {
            v.get(k)
                .and_then(Value::as_u64)
                .unwrap_or_else(|| panic!("allocation without number `{k}`: {v}"))
        };
        Allocation {
            id: s("id"),
            service: s("service"),
            node: s("node"),
            desired: s("desired"),
            state: s("state"),
            host_port: u16::try_from(n("host_port")).expect("host_port fits u16"),
            restarts: u32::try_from(n("restarts")).expect("restarts fits u32"),
            pid: u32::try_from(n("pid")).expect("pid fits u32"),
            message: v
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
        }
    }

    /// Desired to run, reported running, with a process.
    pub fn is_running(&self) -> bool {
        self.desired == "run" && self.state == "running" && self.pid != 0
    }
}

/// Reads a JSON array of allocations.
pub fn allocations(v: &Value) -> Vec<Allocation> {
    v.as_array()
        .unwrap_or_else(|| panic!("expected a JSON array of allocations, got {v}"))
        .iter()
        .map(Allocation::from_json)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// DevCluster
// ---------------------------------------------------------------------------------------------

/// A real `skiff dev` process (one server and one agent) on a free loopback port, with its
/// data in a temporary directory and its own host-port range.
///
/// The process's stdout and stderr go to `dev.log` in the data directory. On drop the
/// dev process and every replica it was seen running are killed by PID, so nothing outlives
/// a test, also a failed one. Set `SKIFF_E2E_KEEP=1` to keep the directory for inspection.
pub struct DevCluster {
    bin: PathBuf,
    dir: Option<TempDir>,
    listen_port: u16,
    /// Where the server and the agent serve `/metrics`.
    metrics_ports: (u16, u16),
    ports: PortRange,
    child: Option<Child>,
    /// Start time (clock ticks since boot) of the first dev process.
    started_at: u64,
    /// Replica PIDs seen in CLI output, with their start times.
    seen: Mutex<HashMap<u32, u64>>,
}

impl DevCluster {
    /// Starts `skiff dev` and waits until its node is ready.
    pub fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("skiff-e2e-")
            .tempdir()
            .expect("create a temporary directory");
        let mut cluster = DevCluster {
            bin: skiff_bin(),
            dir: Some(dir),
            listen_port: free_port(),
            metrics_ports: (free_port(), free_port()),
            ports: claim_port_range(),
            child: None,
            started_at: 0,
            seen: Mutex::new(HashMap::new()),
        };
        cluster.spawn();
        cluster.started_at = cluster
            .dev_pid()
            .and_then(proc_start_time)
            .unwrap_or_default();
        cluster.wait_ready();
        cluster
    }

    fn dir(&self) -> &Path {
        self.dir
            .as_ref()
            .expect("directory lives as long as the cluster")
            .path()
    }

    /// The directory passed as `--data-dir` (a fresh temporary directory).
    pub fn data_dir(&self) -> &Path {
        self.dir()
    }

    /// Where the dev process's output goes: `dev.log` in the data directory (the server and
    /// agent keep their state in subdirectories), appended across restarts.
    pub fn log_path(&self) -> PathBuf {
        self.dir().join("dev.log")
    }

    /// The dev process's output so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The last `n` lines of [`Self::log`].
    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// The server's gRPC address, `127.0.0.1:<port>`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.listen_port)
    }

    /// Where the server serves `GET /metrics`.
    pub fn server_metrics_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.metrics_ports.0))
    }

    /// Where the agent serves `GET /metrics`.
    pub fn agent_metrics_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.metrics_ports.1))
    }

    /// The node's host-port range (inclusive).
    pub fn port_range(&self) -> (u16, u16) {
        (self.ports.start, self.ports.end)
    }

    /// PID of the running dev process.
    pub fn dev_pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "dev process already running");
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open dev.log");
        let _ = writeln!(log, "==== e2e: starting skiff dev on {} ====", self.addr());
        use_cluster_ca(&self.data_dir().join("server/pki/ca.crt"));
        let child = Command::new(&self.bin)
            .arg("dev")
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg("--listen")
            .arg(self.addr())
            .arg("--port-range")
            .arg(format!("{}-{}", self.ports.start, self.ports.end))
            .arg("--name")
            .arg(NODE_NAME)
            .arg("--server-metrics-listen")
            .arg(self.server_metrics_addr().to_string())
            .arg("--metrics-listen")
            .arg(self.agent_metrics_addr().to_string())
            .env_remove("SKIFF_ADDR")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone dev.log handle"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("failed to start {} dev: {e}", self.bin.display()));
        self.child = Some(child);
    }

    /// Waits (at most [`READY_TIMEOUT`]) until `node ls` shows this cluster's node ready;
    /// panics with the dev log if it does not, or if the dev process exits.
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut last = String::new();
        let ready = wait_until(READY_TIMEOUT, POLL, || {
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                panic!(
                    "skiff dev exited with {status} before its node was ready\n{}",
                    self.log_tail(60)
                );
            }
            if !use_token_of(self.data_dir()) {
                last = "no client.toml with the management token yet".into();
                return false;
            }
            let args = ["node", "ls", "--output", "json"];
            let mut cmd = Command::new(&self.bin);
            cmd.env_remove("SKIFF_ADDR")
                .arg("--server")
                .arg(self.addr())
                .args(args);
            let left = deadline.saturating_duration_since(Instant::now());
            let out = run_with_timeout(&mut cmd, left.max(Duration::from_secs(2)));
            last = describe(&args, &out);
            out.status.success()
                && serde_json::from_slice::<Value>(&out.stdout).is_ok_and(|nodes| {
                    nodes.as_array().is_some_and(|nodes| {
                        nodes
                            .iter()
                            .any(|n| n["name"] == NODE_NAME && n["status"] == "ready")
                    })
                })
        });
        assert!(
            ready,
            "node {NODE_NAME} not ready within {READY_TIMEOUT:?}; last: {last}\n--- dev log ---\n{}",
            self.log_tail(60)
        );
    }

    /// Runs `skiff --server <this cluster> <args>`.
    pub fn skiff(&self, args: &[&str]) -> Output {
        skiff_at(&self.addr(), args)
    }

    /// Runs the CLI and returns its stdout; panics (with the dev log) if it fails.
    pub fn skiff_ok(&self, args: &[&str]) -> String {
        let out = self.skiff(args);
        assert!(
            out.status.success(),
            "{}\n--- dev log ---\n{}",
            describe(args, &out),
            self.log_tail(40)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs the CLI with `--output json` appended and parses stdout; remembers every replica
    /// PID in it so that drop can kill it.
    pub fn skiff_json(&self, args: &[&str]) -> Value {
        let mut full = args.to_vec();
        full.extend(["--output", "json"]);
        let stdout = self.skiff_ok(&full);
        let value: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
            panic!("`skiff {}` printed no JSON ({e}): {stdout}", full.join(" "))
        });
        self.remember_pids(&value);
        value
    }

    fn remember_pids(&self, v: &Value) {
        match v {
            Value::Array(items) => items.iter().for_each(|i| self.remember_pids(i)),
            Value::Object(map) => {
                let field = |k: &str| map.get(k).and_then(Value::as_u64);
                if let (Some(pid), Some(port)) = (field("pid"), field("host_port")) {
                    // Only a live process that is this replica (its PORT says so), not
                    // whatever process got a stale PID since.
                    let pid = u32::try_from(pid).unwrap_or(0);
                    let start = proc_start_time(pid);
                    let is_replica = proc_env(pid).get("PORT") == Some(&port.to_string());
                    if let (Some(start), true) = (start, is_replica && pid_alive(pid)) {
                        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
                        seen.insert(pid, start);
                    }
                }
                map.values().for_each(|i| self.remember_pids(i));
            }
            _ => {}
        }
    }

    /// `service ps NAME`: allocations desired to run.
    pub fn ps(&self, service: &str) -> Vec<Allocation> {
        allocations(&self.skiff_json(&["service", "ps", service]))
    }

    /// `service ps NAME --all`: also stopping and stopped allocations.
    pub fn ps_all(&self, service: &str) -> Vec<Allocation> {
        allocations(&self.skiff_json(&["service", "ps", service, "--all"]))
    }

    /// `service inspect NAME` (environment values hidden: short hashes).
    pub fn inspect(&self, service: &str) -> Value {
        self.skiff_json(&["service", "inspect", service])
    }

    /// `service inspect NAME --show-values`.
    pub fn inspect_values(&self, service: &str) -> Value {
        self.skiff_json(&["service", "inspect", service, "--show-values"])
    }

    /// Waits until `service` has exactly `n` allocations desired to run, all running on
    /// distinct host ports that answer HTTP, and returns them; panics with details if not
    /// within [`CONVERGE_TIMEOUT`].
    pub fn wait_for_answering_replicas(&self, service: &str, n: usize) -> Vec<Allocation> {
        let mut last = Vec::new();
        let ok = wait_until(CONVERGE_TIMEOUT, POLL, || {
            last = self.ps(service);
            let mut ports: Vec<u16> = last.iter().map(|a| a.host_port).collect();
            ports.sort_unstable();
            ports.dedup();
            last.len() == n
                && ports.len() == n
                && last
                    .iter()
                    .all(|a| a.is_running() && pid_alive(a.pid) && answers(a.host_port))
        });
        assert!(
            ok,
            "{service}: expected {n} running replicas answering HTTP within {CONVERGE_TIMEOUT:?}; \
             last ps: {last:#?}\n--- dev log ---\n{}",
            self.log_tail(40)
        );
        last
    }

    /// Creates a process-runtime service running `python3 -m http.server $PORT --bind
    /// 127.0.0.1` with `replicas` replicas.
    pub fn create_http_service(&self, name: &str, replicas: u32) {
        let replicas = replicas.to_string();
        self.skiff_ok(&[
            "service",
            "create",
            "--detach",
            name,
            "--runtime",
            "process",
            "--replicas",
            &replicas,
            "--",
            "python3",
            "-m",
            "http.server",
            "$PORT",
            "--bind",
            "127.0.0.1",
        ]);
    }

    /// Kills the dev process with SIGKILL (its replicas, in their own process groups, live on).
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts `skiff dev` again with the same data directory, address and port range, and
    /// waits until its node is ready.
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
        self.wait_ready();
    }
}

impl Drop for DevCluster {
    fn drop(&mut self) {
        if self.child.is_some() {
            // Learn about replicas started since the last CLI call.
            let mut cmd = Command::new(&self.bin);
            cmd.env_remove("SKIFF_ADDR")
                .arg("--server")
                .arg(self.addr())
                .args(["service", "ls", "--output", "json"]);
            if let Ok(out) = try_run_with_timeout(&mut cmd, Duration::from_secs(5)) {
                if let Ok(value) = serde_json::from_slice::<Value>(&out.stdout) {
                    self.remember_pids(&value);
                }
            }
        }
        self.kill9();
        let seen = std::mem::take(&mut *self.seen.lock().unwrap_or_else(|e| e.into_inner()));
        for (pid, start) in seen {
            kill_if_same(pid, start);
        }
        for pid in replicas_by_port_env(self.port_range(), self.started_at) {
            if let Some(start) = proc_start_time(pid) {
                kill_if_same(pid, start);
            }
        }
        if thread::panicking() {
            eprintln!(
                "--- skiff dev log ({}) ---\n{}",
                self.log_path().display(),
                self.log_tail(80)
            );
        }
        if std::env::var_os("SKIFF_E2E_KEEP").is_some() {
            if let Some(dir) = self.dir.take() {
                eprintln!("keeping {}", dir.keep().display());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_until_gives_up_after_its_timeout() {
        let started = Instant::now();
        let mut calls = 0;
        let held = wait_until(
            Duration::from_millis(300),
            Duration::from_millis(50),
            || {
                calls += 1;
                false
            },
        );
        assert!(!held);
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!((2..=10).contains(&calls), "{calls} calls");
        assert!(wait_until(Duration::from_secs(1), POLL, || true));
    }

    #[test]
    fn claimed_port_ranges_do_not_overlap() {
        let ranges: Vec<PortRange> = (0..20).map(|_| claim_port_range()).collect();
        for (i, a) in ranges.iter().enumerate() {
            assert!(a.start < a.end && a.end < 32_768, "{a:?}");
            for b in &ranges[i + 1..] {
                assert!(a.end < b.start || b.end < a.start, "{a:?} overlaps {b:?}");
            }
        }
    }

    #[test]
    fn http_get_reads_status_and_body_and_times_out_on_silence() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut buf = [0u8; 1024];
            let _ = conn.read(&mut buf);
            conn.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nhi")
                .unwrap();
            // A second client that never gets an answer.
            let (_silent, _) = listener.accept().unwrap();
            thread::sleep(Duration::from_secs(3));
        });
        let r = http_get(port, "/").unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "hi"));
        let started = Instant::now();
        assert!(!answers(port));
        assert!(started.elapsed() < Duration::from_secs(3));
        server.join().unwrap();
        assert!(!answers(free_port()), "nothing listening");
    }

    #[test]
    fn a_zombie_counts_as_gone() {
        let mut child = Command::new("true").spawn().unwrap();
        let pid = child.id();
        assert!(wait_until(
            Duration::from_secs(5),
            Duration::from_millis(10),
            || { proc_state(pid) == Some('Z') }
        ));
        assert!(!pid_alive(pid));
        child.wait().unwrap();
        assert!(pid_alive(std::process::id()));
    }

    #[test]
    fn run_with_timeout_captures_output() {
        let out = run_with_timeout(
            Command::new("sh").args(["-c", "echo out; echo err >&2; exit 3"]),
            Duration::from_secs(5),
        );
        assert_eq!(out.status.code(), Some(3));
        assert_eq!(out.stdout, b"out\n");
        assert_eq!(out.stderr, b"err\n");
    }
}
