//! The per-container monitor (like conmon or containerd-shim): a small
//! process, the agent's own binary run as `skiff shim`, that starts one
//! container and outlives the agent. It makes itself a child subreaper, runs
//! `runc run --detach` (so the container's process is re-parented to it),
//! tells the agent the container's PID, then waits for that process and
//! writes its exit status to `exit.json` in the bundle (tmp + rename), and
//! exits. It runs in its own session, so nothing aimed at the agent's
//! process group or terminal reaches it.
//!
//! So an exit code is never lost: while the agent lives, the shim is its
//! child and the shim's exit wakes it (SIGCHLD); a restarted agent, whose
//! re-adopted containers are nobody's children it can wait for, reads the
//! status from the file once the shim is gone.
//!
//! The agent learns the outcome of the start from one JSON line the shim
//! prints on its stdout (a pipe): the container's PID, or the runtime's
//! error with its status and output.

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitStatus};
use serde::{Deserialize, Serialize};

use super::runc::{ExitDesc, Runc, RuncError};
use crate::runtime::{procfs, reaper, Exit};

/// Where the shim records the container's exit, in the bundle.
pub const EXIT_FILE: &str = "exit.json";
/// How often a shim whose container is not its child (which should not
/// happen) looks whether it still runs.
const ORPHAN_POLL: Duration = Duration::from_millis(100);

static BINARY: OnceLock<PathBuf> = OnceLock::new();

/// Declares that `binary` runs [`run`] when invoked as `BINARY shim ...`
/// (the `skiff` binary passes `/proc/self/exe`, which stays valid when the
/// file is replaced by a rebuild or upgrade). An agent started in this
/// process afterwards starts its containers through shims; without it (an
/// agent embedded in another program) containers are started directly and
/// only the live agent, as their subreaper, sees their exit codes.
pub fn set_binary(binary: PathBuf) {
    let _ = BINARY.set(binary);
}

/// The binary [`set_binary`] declared.
pub fn binary() -> Option<PathBuf> {
    BINARY.get().cloned()
}

/// What `skiff shim` is told.
#[derive(Debug, Clone)]
pub struct ShimConfig {
    /// The runtime binary (runc, crun).
    pub runtime: PathBuf,
    /// The runtime's `--root`.
    pub root: PathBuf,
    pub bundle: PathBuf,
    /// Log files the container's output is appended to.
    pub stdout: PathBuf,
    pub stderr: PathBuf,
    /// The container id.
    pub id: String,
}

/// The line the shim prints once the start is over.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Report {
    Started {
        pid: u32,
    },
    Failed {
        command: String,
        status: Option<i32>,
        stdout: String,
        stderr: String,
    },
    Spawn {
        reason: String,
    },
}

impl From<RuncError> for Report {
    fn from(e: RuncError) -> Self {
        match e {
            RuncError::Failed {
                command,
                status,
                stdout,
                stderr,
                ..
            } => Report::Failed {
                command,
                status: status.0,
                stdout,
                stderr,
            },
            RuncError::Spawn { reason, .. } => Report::Spawn { reason },
        }
    }
}

/// How the container's process ended, as `exit.json` holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitRecord {
    /// The container's host PID: a record is only believed for that PID.
    pub pid: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
}

impl ExitRecord {
    fn new(pid: u32, exit: Exit) -> Self {
        let (code, signal) = match exit {
            Exit::Code(c) => (Some(c), None),
            Exit::Signal(s) => (None, Some(s)),
            Exit::Unknown => (None, None),
        };
        Self { pid, code, signal }
    }

    pub fn exit(&self) -> Exit {
        match (self.code, self.signal) {
            (Some(code), _) => Exit::Code(code),
            (None, Some(signal)) => Exit::Signal(signal),
            (None, None) => Exit::Unknown,
        }
    }
}

/// The exit `bundle/exit.json` records for the container process `pid`.
pub fn read_exit(bundle: &Path, pid: u32) -> Option<Exit> {
    let bytes = fs::read(bundle.join(EXIT_FILE)).ok()?;
    let record: ExitRecord = serde_json::from_slice(&bytes).ok()?;
    (record.pid == pid).then(|| record.exit())
}

/// Writes `record` to `bundle/exit.json` atomically: a reader sees no file
/// or a whole one.
pub fn write_exit(bundle: &Path, record: &ExitRecord) -> std::io::Result<()> {
    let json = serde_json::to_vec(record).map_err(std::io::Error::other)?;
    let tmp = bundle.join(format!("{EXIT_FILE}.tmp"));
    fs::write(&tmp, json)?;
    fs::rename(&tmp, bundle.join(EXIT_FILE))
}

/// A shim as the agent knows it: its PID and start time (`procfs`), kept in
/// the bundle so a restarted agent can tell whether it still runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShimProcess {
    pub pid: u32,
    pub start_time: u64,
}

impl ShimProcess {
    /// Whether the shim is done: reaped now if it is our child and exited,
    /// or no longer the process it was.
    pub fn is_gone(&self) -> bool {
        match reaper::try_reap(self.pid) {
            reaper::Reaped::Exited(_) => true,
            reaper::Reaped::Running => false,
            reaper::Reaped::NotChild => !procfs::is_same_live_process(self.pid, self.start_time),
        }
    }
}

/// The agent's side: starts `config`'s container through a shim run from
/// `binary` and returns the container's PID and the shim, once the
/// container runs (or why it does not).
pub fn start(
    binary: &Path,
    runc: &Runc,
    config: &ShimConfig,
) -> Result<(u32, ShimProcess), RuncError> {
    let spawn_error = |reason: String| RuncError::Spawn {
        binary: runc.name(),
        reason,
    };
    let mut child = Command::new(binary)
        .arg0("skiff")
        .arg("shim")
        .arg("--runtime")
        .arg(&config.runtime)
        .arg("--root")
        .arg(&config.root)
        .arg("--bundle")
        .arg(&config.bundle)
        .arg("--stdout")
        .arg(&config.stdout)
        .arg("--stderr")
        .arg(&config.stderr)
        .arg(&config.id)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| spawn_error(format!("cannot start the shim {}: {e}", binary.display())))?;
    let shim = ShimProcess {
        pid: child.id(),
        start_time: procfs::read_stat(child.id()).map_or(0, |s| s.start_time),
    };
    let mut line = String::new();
    if let Some(out) = child.stdout.take() {
        let _ = BufReader::new(out).read_line(&mut line);
    }
    match serde_json::from_str::<Report>(line.trim()) {
        Ok(Report::Started { pid }) => Ok((pid, shim)),
        other => {
            // The shim exits after a failed start.
            let status = child.wait().ok().and_then(|s| s.code());
            Err(match other {
                Ok(Report::Failed {
                    command,
                    status,
                    stdout,
                    stderr,
                }) => RuncError::Failed {
                    binary: runc.name(),
                    command,
                    status: ExitDesc(status),
                    stdout,
                    stderr,
                },
                Ok(Report::Spawn { reason }) => spawn_error(reason),
                _ => spawn_error(format!(
                    "the shim {} ended ({}) without saying whether the container started",
                    binary.display(),
                    ExitDesc(status)
                )),
            })
        }
    }
}

/// `skiff shim`: runs the container of `config`, reports its PID (or the
/// failure) on stdout, waits for it and records its exit. Returns the
/// shim's exit status: 0 once the exit is recorded.
pub fn run(config: &ShimConfig) -> i32 {
    // Own session and process group, never the agent's.
    let _ = nix::unistd::setsid();
    let started = reaper::become_subreaper()
        .map_err(|reason| Report::Spawn { reason })
        .and_then(|()| start_container(config));
    let pid = match started {
        Ok(pid) => pid,
        Err(report) => {
            say(&report);
            return 1;
        }
    };
    say(&Report::Started { pid });
    // The agent has what it waited for; nothing more goes to its pipe, and
    // its end closes even though the shim lives on.
    if let Ok(null) = File::options().write(true).open("/dev/null") {
        use std::os::fd::AsRawFd;
        let _ = nix::unistd::dup2(null.as_raw_fd(), 1);
    }
    let exit = wait_for(pid);
    match write_exit(&config.bundle, &ExitRecord::new(pid, exit)) {
        Ok(()) => 0,
        Err(_) => 2,
    }
}

fn start_container(config: &ShimConfig) -> Result<u32, Report> {
    let open = |path: &Path| {
        OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| Report::Spawn {
                reason: format!("cannot open log {}: {e}", path.display()),
            })
    };
    let (stdout, stderr) = (open(&config.stdout)?, open(&config.stderr)?);
    let runc = Runc::new(config.runtime.clone(), config.root.clone());
    let _ = fs::remove_file(config.bundle.join(EXIT_FILE));
    runc.run_detached(&config.id, &config.bundle, stdout, stderr)
        .map_err(Report::from)
}

fn say(report: &Report) {
    let mut out = std::io::stdout().lock();
    let _ = serde_json::to_writer(&mut out, report);
    let _ = out.write_all(b"\n");
    let _ = out.flush();
}

/// Reaps children until the container's process `pid` is among them (the
/// runtime's helper processes, re-parented to the shim too, are reaped on
/// the way).
fn wait_for(pid: u32) -> Exit {
    let Ok(raw) = i32::try_from(pid) else {
        return Exit::Unknown;
    };
    loop {
        match waitpid(None, None) {
            Ok(WaitStatus::Exited(p, code)) if p.as_raw() == raw => return Exit::Code(code),
            Ok(WaitStatus::Signaled(p, signal, _)) if p.as_raw() == raw => {
                return Exit::Signal(signal as i32)
            }
            Ok(_) | Err(Errno::EINTR) => {}
            Err(_) => {
                // Not our child after all: all that can be known is when it ends.
                let start_time = procfs::read_stat(pid).map_or(0, |s| s.start_time);
                while procfs::is_same_live_process(pid, start_time) {
                    std::thread::sleep(ORPHAN_POLL);
                }
                return Exit::Unknown;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_records_round_trip_and_belong_to_one_pid() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_exit(dir.path(), 42), None);
        write_exit(dir.path(), &ExitRecord::new(42, Exit::Code(7))).unwrap();
        assert_eq!(read_exit(dir.path(), 42), Some(Exit::Code(7)));
        assert_eq!(read_exit(dir.path(), 43), None, "another container's");
        write_exit(dir.path(), &ExitRecord::new(42, Exit::Signal(9))).unwrap();
        assert_eq!(read_exit(dir.path(), 42), Some(Exit::Signal(9)));
        assert_eq!(
            fs::read_to_string(dir.path().join(EXIT_FILE)).unwrap(),
            r#"{"pid":42,"signal":9}"#
        );
        assert!(!dir.path().join("exit.json.tmp").exists());
    }

    #[test]
    fn a_failed_start_reaches_the_agent_with_status_and_output() {
        let line = serde_json::to_string(&Report::from(RuncError::Failed {
            binary: "runc".into(),
            command: "run x".into(),
            status: ExitDesc(Some(1)),
            stdout: String::new(),
            stderr: "cgroups in hybrid mode not supported".into(),
        }))
        .unwrap();
        match serde_json::from_str(&line).unwrap() {
            Report::Failed { status, stderr, .. } => {
                assert_eq!(status, Some(1));
                assert!(stderr.contains("hybrid"));
            }
            other => panic!("{other:?}"),
        }
    }

    /// A fake `skiff shim` (a shell script) that answers like the real one.
    fn fake_shim(dir: &Path, body: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join("fake-shim");
        fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    fn config(dir: &Path) -> ShimConfig {
        ShimConfig {
            runtime: "/bin/false".into(),
            root: dir.into(),
            bundle: dir.into(),
            stdout: dir.join("stdout.log"),
            stderr: dir.join("stderr.log"),
            id: "c1".into(),
        }
    }

    #[test]
    fn the_agent_gets_the_pid_from_the_shim_and_its_exit_from_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let shim = fake_shim(
            dir.path(),
            &format!(
                "echo '{{\"started\":{{\"pid\":4242}}}}'; sleep 0.2; echo '{{\"pid\":4242,\"code\":7}}' > {}/exit.json",
                dir.path().display()
            ),
        );
        let runc = Runc::new("/bin/false".into(), dir.path().into());
        let (pid, process) = start(&shim, &runc, &config(dir.path())).unwrap();
        assert_eq!(pid, 4242);
        assert!(!process.is_gone(), "the shim outlives the start");
        let mut waited = 0;
        while !process.is_gone() && waited < 500 {
            std::thread::sleep(Duration::from_millis(10));
            waited += 1;
        }
        assert!(process.is_gone(), "the shim ends after recording the exit");
        assert_eq!(read_exit(dir.path(), pid), Some(Exit::Code(7)));
    }

    #[test]
    fn a_shim_that_dies_without_answering_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let shim = fake_shim(dir.path(), "exit 3");
        let runc = Runc::new("/bin/false".into(), dir.path().into());
        let err = start(&shim, &runc, &config(dir.path())).unwrap_err();
        assert!(
            err.to_string()
                .contains("without saying whether the container started")
                && err.to_string().contains("exit status 3"),
            "{err}"
        );
    }
}
