//! A wrapper of the `runc`/`crun` command line (shaped like
//! containerd/rust-extensions' runc crate): a configured struct with an
//! injectable binary and a `--root` of our own, whose errors keep the exit
//! status, stdout and stderr of the failed command.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize;

/// How long any runtime command may take before it is killed.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(2);

#[derive(Debug, thiserror::Error)]
pub enum RuncError {
    #[error("{binary} {command} failed ({status}): {}", message(stderr, stdout))]
    Failed {
        binary: String,
        command: String,
        /// Exit status, `None` if killed by a signal or by our timeout.
        status: ExitDesc,
        stdout: String,
        stderr: String,
    },
    #[error("cannot run {binary}: {reason}")]
    Spawn { binary: String, reason: String },
}

/// An exit status as it reads in messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitDesc(pub Option<i32>);

impl std::fmt::Display for ExitDesc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(code) => write!(f, "exit status {code}"),
            None => write!(f, "killed or timed out"),
        }
    }
}

/// runc prints `time=... level=error msg="..."` lines or JSON; crun plain
/// text. The last non-empty line is the error.
fn message(stderr: &str, stdout: &str) -> String {
    let text = if stderr.trim().is_empty() {
        stdout
    } else {
        stderr
    };
    let line = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    if let Some(start) = line.find("msg=\"") {
        let rest = &line[start + 5..];
        let end = rest.rfind('"').unwrap_or(rest.len());
        return rest[..end].replace("\\\"", "\"");
    }
    line.trim().to_string()
}

impl RuncError {
    /// Everything the command printed, for matching known failures.
    pub fn output(&self) -> String {
        match self {
            RuncError::Failed { stdout, stderr, .. } => format!("{stderr}\n{stdout}"),
            RuncError::Spawn { reason, .. } => reason.clone(),
        }
    }
}

/// `runc state` output.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct ContainerState {
    pub id: String,
    pub pid: u32,
    /// "created", "running", "paused", "stopped".
    pub status: String,
}

/// What [`Runc::exec_command`] runs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecOptions {
    pub command: Vec<String>,
    /// uid, gid and additional gids; `None`: the container's user.
    pub user: Option<(u32, u32, Vec<u32>)>,
    /// `KEY=VALUE` added to the container's environment.
    pub env: Vec<String>,
    /// Where runc sends the terminal's master (`--tty`); `None`: no
    /// terminal.
    pub console_socket: Option<PathBuf>,
}

/// The runtime binary and the state directory it keeps its containers in.
#[derive(Debug, Clone)]
pub struct Runc {
    binary: PathBuf,
    root: PathBuf,
}

impl Runc {
    pub fn new(binary: PathBuf, root: PathBuf) -> Self {
        Self { binary, root }
    }

    pub fn binary(&self) -> &Path {
        &self.binary
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `runc`, `crun` or whatever the binary is called.
    pub fn name(&self) -> String {
        self.binary.file_name().map_or_else(
            || self.binary.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        )
    }

    fn command(&self) -> Command {
        let mut command = Command::new(&self.binary);
        command.arg("--root").arg(&self.root).stdin(Stdio::null());
        command
    }

    /// `run --detach`: creates and starts the container whose process
    /// inherits `stdout` and `stderr` (log files), so it logs while the
    /// agent is away. Returns the container's host PID.
    pub fn run_detached(
        &self,
        id: &str,
        bundle: &Path,
        mut stdout: File,
        mut stderr: File,
    ) -> Result<u32, RuncError> {
        let pid_file = bundle.join("container.pid");
        let _ = std::fs::remove_file(&pid_file);
        // The runtime reports its own failure on the stderr it shares with
        // the container: note where the log ends to cut its message out.
        let out_start = stdout.seek(SeekFrom::End(0)).unwrap_or(0);
        let err_start = stderr.seek(SeekFrom::End(0)).unwrap_or(0);
        let mut command = self.command();
        command
            .arg("run")
            .arg("--detach")
            .arg("--bundle")
            .arg(bundle)
            .arg("--pid-file")
            .arg(&pid_file)
            .arg(id)
            .stdout(stdout.try_clone().map_err(|e| self.spawn_error(e))?)
            .stderr(stderr.try_clone().map_err(|e| self.spawn_error(e))?);
        let status = self.wait(command, "run")?;
        if status != Some(0) {
            return Err(RuncError::Failed {
                binary: self.name(),
                command: format!("run {id}"),
                status: ExitDesc(status),
                stdout: read_from(&mut stdout, out_start),
                stderr: read_from(&mut stderr, err_start),
            });
        }
        let pid = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| RuncError::Failed {
                binary: self.name(),
                command: format!("run {id}"),
                status: ExitDesc(Some(0)),
                stdout: String::new(),
                stderr: format!("no pid in {}", pid_file.display()),
            })?;
        Ok(pid)
    }

    pub fn state(&self, id: &str) -> Result<ContainerState, RuncError> {
        let out = self.output(&["state", id])?;
        serde_json::from_str(&out).map_err(|e| RuncError::Failed {
            binary: self.name(),
            command: format!("state {id}"),
            status: ExitDesc(Some(0)),
            stdout: out,
            stderr: format!("unreadable state: {e}"),
        })
    }

    /// Sends `signal` (a name like "TERM" or a number) to the container's
    /// init process.
    pub fn kill(&self, id: &str, signal: &str) -> Result<(), RuncError> {
        self.output(&["kill", id, signal]).map(drop)
    }

    /// Deletes the container; `force` kills it first if it runs.
    pub fn delete(&self, id: &str, force: bool) -> Result<(), RuncError> {
        let args: &[&str] = if force {
            &["delete", "--force", id]
        } else {
            &["delete", id]
        };
        self.output(args).map(drop)
    }

    /// Runs `command` in the container; `Ok` if it exits 0 within `timeout`.
    pub async fn exec(
        &self,
        id: &str,
        command: &[String],
        timeout: Duration,
    ) -> Result<(), String> {
        let mut child = tokio::process::Command::new(&self.binary)
            .arg("--root")
            .arg(&self.root)
            .arg("exec")
            .arg(id)
            .args(command)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", self.name()))?;
        let mut stderr = child.stderr.take();
        match tokio::time::timeout(timeout, child.wait()).await {
            Ok(Ok(status)) if status.success() => Ok(()),
            Ok(Ok(status)) => {
                let mut text = String::new();
                if let Some(err) = stderr.as_mut() {
                    use tokio::io::AsyncReadExt;
                    let _ = err.read_to_string(&mut text).await;
                }
                Err(format!(
                    "{} exited with {status}{}",
                    command.join(" "),
                    if text.trim().is_empty() {
                        String::new()
                    } else {
                        format!(": {}", message(&text, ""))
                    }
                ))
            }
            Ok(Err(e)) => Err(format!("{}: {e}", command.join(" "))),
            Err(_) => Err(format!("{} timed out after {timeout:?}", command.join(" "))),
        }
    }

    /// `exec` of an interactive command (`skiff service exec`): the
    /// container's own process settings (environment, working directory,
    /// user) with `options` on top, its pid written to `pid_file`. With a
    /// console socket the command gets a terminal and runc detaches once it
    /// sent the terminal's master there; without, the command shares the
    /// returned command's stdio and runc exits with its exit status.
    pub fn exec_command(
        &self,
        id: &str,
        options: &ExecOptions,
        pid_file: &Path,
    ) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(&self.binary);
        command.arg("--root").arg(&self.root).arg("exec");
        if let Some(socket) = &options.console_socket {
            command
                .arg("--tty")
                .arg("--detach")
                .arg("--console-socket")
                .arg(socket);
        }
        command.arg("--pid-file").arg(pid_file);
        if let Some((uid, gid, additional)) = &options.user {
            command.arg("--user").arg(format!("{uid}:{gid}"));
            for g in additional {
                command.arg("--additional-gids").arg(g.to_string());
            }
        }
        for var in &options.env {
            command.arg("--env").arg(var);
        }
        command.arg("--").arg(id).args(&options.command);
        command
    }

    fn output(&self, args: &[&str]) -> Result<String, RuncError> {
        let mut command = self.command();
        command
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().map_err(|e| self.spawn_error(e))?;
        let status = wait_bounded(&mut child);
        let mut stdout = String::new();
        let mut stderr = String::new();
        if let Some(mut out) = child.stdout.take() {
            let _ = out.read_to_string(&mut stdout);
        }
        if let Some(mut err) = child.stderr.take() {
            let _ = err.read_to_string(&mut stderr);
        }
        if status == Some(0) {
            Ok(stdout)
        } else {
            Err(RuncError::Failed {
                binary: self.name(),
                command: args.join(" "),
                status: ExitDesc(status),
                stdout,
                stderr,
            })
        }
    }

    fn wait(&self, mut command: Command, what: &str) -> Result<Option<i32>, RuncError> {
        let mut child = command.spawn().map_err(|e| RuncError::Spawn {
            binary: self.name(),
            reason: format!("{what}: {e}"),
        })?;
        Ok(wait_bounded(&mut child))
    }

    fn spawn_error(&self, e: std::io::Error) -> RuncError {
        RuncError::Spawn {
            binary: self.name(),
            reason: e.to_string(),
        }
    }
}

/// Waits for `child` at most [`COMMAND_TIMEOUT`], killing it after that.
fn wait_bounded(child: &mut std::process::Child) -> Option<i32> {
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status.code(),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(POLL),
            Ok(None) | Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
}

fn read_from(file: &mut File, offset: u64) -> String {
    let mut text = String::new();
    if file.seek(SeekFrom::Start(offset)).is_ok() {
        let _ = file.take(64 * 1024).read_to_string(&mut text);
    }
    text
}

/// Finds `name` in `PATH`.
pub fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/usr/bin".into(), "/sbin".into()])
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_come_from_the_last_error_line() {
        let runc = "time=\"2024\" level=error msg=\"runc run failed: unable to start container process: exec: \\\"nope\\\": executable file not found in $PATH\"\n";
        assert_eq!(
            message(runc, ""),
            "runc run failed: unable to start container process: exec: \"nope\": executable file not found in $PATH"
        );
        assert_eq!(
            message("", "cgroups in hybrid mode not supported\n\n"),
            "cgroups in hybrid mode not supported"
        );
    }

    #[test]
    fn errors_keep_status_and_output() {
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("fake-runc");
        std::fs::write(&fake, "#!/bin/sh\necho out; echo 'boom' >&2; exit 3\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let runc = Runc::new(fake, dir.path().join("root"));
        match runc.state("x").unwrap_err() {
            RuncError::Failed {
                status,
                stdout,
                stderr,
                command,
                ..
            } => {
                assert_eq!(status, ExitDesc(Some(3)));
                assert_eq!((stdout.as_str(), stderr.as_str()), ("out\n", "boom\n"));
                assert_eq!(command, "state x");
            }
            other => panic!("{other}"),
        }
        let missing = Runc::new(dir.path().join("nope"), dir.path().into());
        assert!(matches!(missing.state("x"), Err(RuncError::Spawn { .. })));
    }
}
