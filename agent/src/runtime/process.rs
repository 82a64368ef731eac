//! The `process` runtime (like Nomad's raw_exec): a replica is a host
//! process in its own process group, its output appended to files in the
//! allocation directory. The files are handed to the child directly, so
//! logging goes on while the agent is down, and the process outlives the
//! agent so a new agent can re-adopt it.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

use super::{procfs, Exit, Runtime, RuntimeError, TaskHandle};
use crate::health::HealthCheck;
use crate::spec::ReplicaSpec;

/// The search path of a process replica, as Docker gives containers.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How often an adopted process (not our child, so no SIGCHLD) is checked.
const ADOPTED_POLL: Duration = Duration::from_millis(500);
/// How long a SIGKILLed process group may take to disappear before we give up
/// waiting; only a process stuck in the kernel (D state) takes that long.
const KILL_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, Default)]
pub struct ProcessRuntime {
    /// This node's DNS server for discovery by name; `None`: replicas use
    /// the host's resolvers.
    nameserver: Option<std::net::Ipv4Addr>,
    /// Writes the replicas' secret files; `None`: replicas that use
    /// secrets fail to start.
    secrets: Option<std::sync::Arc<crate::secrets::Secrets>>,
}

/// Runs a replica's program in a mount namespace of its own where
/// `/etc/resolv.conf` is the replica's (`$0`): the host's file is left
/// alone, and the program is exec'd, so it keeps the PID the agent
/// records. Mounts of the host still reach it (slave propagation). Without
/// the bind (no `/etc/resolv.conf` on the host) it runs all the same.
const WITH_RESOLV_CONF: &str = "mount --bind \"$0\" /etc/resolv.conf 2>/dev/null; exec \"$@\"";

impl ProcessRuntime {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with_secrets(mut self, secrets: std::sync::Arc<crate::secrets::Secrets>) -> Self {
        self.secrets = Some(secrets);
        self
    }

    /// Points the replicas' resolver at this node's DNS server, in a mount
    /// namespace of their own (see [`WITH_RESOLV_CONF`]).
    pub fn with_nameserver(mut self, nameserver: Option<std::net::Ipv4Addr>) -> Self {
        let unshare = DEFAULT_PATH
            .split(':')
            .any(|dir| Path::new(dir).join("unshare").is_file());
        if nameserver.is_some() && !unshare {
            tracing::warn!("no unshare (util-linux): process replicas use the host's resolvers, without names of the cluster");
        }
        self.nameserver = nameserver.filter(|_| unshare);
        self
    }

    /// The program and arguments that start `spec`: as it says, or
    /// wrapped so it resolves the cluster's names.
    fn command_line(
        &self,
        spec: &ReplicaSpec,
        alloc_dir: &Path,
        workdir: &Path,
    ) -> Result<(String, Vec<String>), String> {
        let program = spec.program().to_string();
        let args = spec.args();
        let Some(nameserver) = self.nameserver else {
            return Ok((program, args));
        };
        // The wrapper's shell would report a missing program only as exit
        // status 127, a crash loop; say it at start, as a direct spawn does.
        if !executable_exists(&program, workdir) {
            return Err("No such file or directory".to_string());
        }
        let resolv = match crate::discovery::write_resolv_conf(alloc_dir, nameserver, &spec.stack) {
            Ok(path) => path,
            Err(e) => {
                tracing::warn!(alloc = %spec.alloc_id, error = %e, "cannot write resolv.conf; the replica uses the host's resolvers");
                return Ok((program, args));
            }
        };
        let mut wrapped = vec![
            "--mount".to_string(),
            "--propagation".to_string(),
            "slave".to_string(),
            "/bin/sh".to_string(),
            "-c".to_string(),
            WITH_RESOLV_CONF.to_string(),
            resolv.to_string_lossy().into_owned(),
            program,
        ];
        wrapped.extend(args);
        Ok(("unshare".to_string(), wrapped))
    }
}

/// Whether `program` names a file `execvp` would find: a path (relative
/// to the replica's working dir), else a file in [`DEFAULT_PATH`].
fn executable_exists(program: &str, workdir: &Path) -> bool {
    if program.contains('/') {
        return workdir.join(program).is_file();
    }
    !program.is_empty()
        && DEFAULT_PATH
            .split(':')
            .any(|dir| Path::new(dir).join(program).is_file())
}

/// A replica's process: our child if we started it, else adopted.
#[derive(Debug)]
pub struct ProcessHandle {
    pid: u32,
    start_time: u64,
    /// `None` for an adopted process, which init reaps, not us.
    child: Option<Child>,
    health: Option<HealthCheck>,
    port: u16,
}

impl Runtime for ProcessRuntime {
    type Handle = ProcessHandle;

    fn start(&self, spec: &ReplicaSpec, alloc_dir: &Path) -> Result<ProcessHandle, RuntimeError> {
        let start_error = |reason: String| RuntimeError::Start {
            short_id: spec.short_id().to_string(),
            service: spec.service.clone(),
            program: spec.program().to_string(),
            reason,
        };
        fs::create_dir_all(alloc_dir).map_err(|e| {
            start_error(format!(
                "cannot create allocation directory {}: {}",
                alloc_dir.display(),
                os_reason(&e)
            ))
        })?;
        let workdir = if spec.workdir.is_empty() {
            alloc_dir.to_path_buf()
        } else {
            PathBuf::from(&spec.workdir)
        };
        if !workdir.is_dir() {
            return Err(start_error(format!(
                "working directory {} does not exist",
                workdir.display()
            )));
        }
        let stdout = open_log(spec, &alloc_dir.join("stdout.log"))?;
        let stderr = open_log(spec, &alloc_dir.join("stderr.log"))?;
        // A process replica runs as root, so its files are root's; it finds
        // them in $SKIFF_SECRETS_DIR (a path, never a value).
        let secrets_dir = match (&self.secrets, spec.secrets.is_empty()) {
            (_, true) => None,
            (None, false) => return Err(start_error("this agent holds no secrets".into())),
            (Some(secrets), false) => Some(
                secrets
                    .populate(&spec.alloc_id, &spec.secrets, (0, 0))
                    .map_err(|e| start_error(e.to_string()))?,
            ),
        };

        let (program, args) = self
            .command_line(spec, alloc_dir, &workdir)
            .map_err(start_error)?;
        let mut command = Command::new(program);
        // The replica's environment is its spec's, not the agent's: the
        // agent's own variables (tokens, paths, settings) stay with it.
        command
            .env_clear()
            .env("PATH", DEFAULT_PATH)
            .env("HOME", &workdir)
            .args(args)
            .envs(spec.environment())
            .current_dir(&workdir)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            // Its own group, so stop reaches every process the replica forks
            // and a signal to the agent's group does not reach the replica.
            .process_group(0)
            .kill_on_drop(false);
        if let Some(dir) = &secrets_dir {
            command.env(crate::secrets::DIR_ENV, dir);
        }
        let child = command.spawn().map_err(|e| start_error(os_reason(&e)))?;
        let pid = child
            .id()
            .ok_or_else(|| start_error("exited before its pid was read".into()))?;
        // 0 if unreadable: such a record is never re-adopted, only restarted.
        let start_time = procfs::read_stat(pid).map_or(0, |s| s.start_time);
        tracing::info!(alloc = %spec.alloc_id, service = %spec.service, pid, "started replica process");
        Ok(ProcessHandle {
            pid,
            start_time,
            child: Some(child),
            health: spec.health.clone(),
            port: spec.host_port,
        })
    }

    fn destroy(&self, spec: &ReplicaSpec, _alloc_dir: &Path) {
        if let Some(secrets) = &self.secrets {
            secrets.remove(&spec.alloc_id);
        }
    }

    fn recover(&self, spec: &ReplicaSpec, pid: u32, start_time: u64) -> Option<ProcessHandle> {
        let stat = procfs::read_stat(pid)?;
        let ours = pid > 1
            && start_time != 0
            && stat.start_time == start_time
            && !stat.is_exited()
            && u32::try_from(stat.pgrp).ok() == Some(pid);
        if !ours {
            return None;
        }
        tracing::info!(alloc = %spec.alloc_id, service = %spec.service, pid, "adopted replica process");
        Some(ProcessHandle {
            pid,
            start_time,
            child: None,
            health: spec.health.clone(),
            port: spec.host_port,
        })
    }
}

impl ProcessHandle {
    /// Whether the process may still be running. Reaps our child if it has
    /// exited, and returns how.
    fn exited(&mut self) -> Option<Exit> {
        match &mut self.child {
            Some(child) => match child.try_wait() {
                Ok(Some(status)) => {
                    self.signal_group(Signal::SIGKILL);
                    Some(exit_of(status))
                }
                Ok(None) => None,
                Err(_) => (!procfs::is_same_live_process(self.pid, self.start_time))
                    .then_some(Exit::Unknown),
            },
            None => {
                (!procfs::is_same_live_process(self.pid, self.start_time)).then_some(Exit::Unknown)
            }
        }
    }

    /// Signals the replica's whole process group. Never signals PID 0 or 1:
    /// `killpg(0)` would hit the agent's own group.
    fn signal_group(&self, signal: Signal) {
        let Ok(pgid) = i32::try_from(self.pid) else {
            return;
        };
        if pgid <= 1 {
            return;
        }
        if let Err(e) = killpg(Pid::from_raw(pgid), signal) {
            if e != nix::errno::Errno::ESRCH {
                tracing::warn!(pid = self.pid, %signal, error = %e, "failed to signal replica process group");
            }
        }
    }
}

impl TaskHandle for ProcessHandle {
    fn pid(&self) -> u32 {
        self.pid
    }

    fn start_time(&self) -> u64 {
        self.start_time
    }

    async fn wait(&mut self) -> Exit {
        if let Some(child) = &mut self.child {
            match child.wait().await {
                Ok(status) => {
                    // The replica is its process group: once the leader is
                    // gone, whatever it forked goes too, so nothing keeps
                    // holding the port its successor needs.
                    self.signal_group(Signal::SIGKILL);
                    return exit_of(status);
                }
                Err(e) => {
                    tracing::warn!(pid = self.pid, error = %e, "failed to wait for replica process; polling it");
                }
            }
        }
        while procfs::is_same_live_process(self.pid, self.start_time) {
            tokio::time::sleep(ADOPTED_POLL).await;
        }
        Exit::Unknown
    }

    fn health_check(&self) -> Option<HealthCheck> {
        self.health.clone()
    }

    fn probe_addr(&self) -> Option<std::net::SocketAddr> {
        Some(std::net::SocketAddr::from(([127, 0, 0, 1], self.port)))
    }

    /// Runs the check command on the host with the replica's `PORT`.
    async fn exec_check(&self, command: &[String], timeout: Duration) -> Result<(), String> {
        let (program, args) = command.split_first().ok_or("empty check command")?;
        let mut child = Command::new(program)
            .args(args)
            .env("PORT", self.port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("{program}: {}", os_reason(&e)))?;
        match tokio::time::timeout(timeout, child.wait()).await {
            Ok(Ok(status)) if status.success() => Ok(()),
            Ok(Ok(status)) => Err(format!("{program}: {}", exit_of(status))),
            Ok(Err(e)) => Err(format!("{program}: {e}")),
            Err(_) => Err(format!("{program} timed out after {timeout:?}")),
        }
    }

    async fn stop(&mut self, grace: Duration) -> Exit {
        if let Some(exit) = self.exited() {
            return exit;
        }
        self.signal_group(Signal::SIGTERM);
        let exit = match tokio::time::timeout(grace, self.wait()).await {
            Ok(exit) => exit,
            Err(_) => {
                tracing::info!(pid = self.pid, grace = ?grace, "replica ignored SIGTERM; killing it");
                self.signal_group(Signal::SIGKILL);
                match tokio::time::timeout(KILL_WAIT, self.wait()).await {
                    Ok(exit) => exit,
                    Err(_) => {
                        tracing::warn!(pid = self.pid, "replica process survived SIGKILL");
                        return Exit::Unknown;
                    }
                }
            }
        };
        exit
    }
}

fn open_log(spec: &ReplicaSpec, path: &Path) -> Result<File, RuntimeError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| RuntimeError::Log {
            short_id: spec.short_id().to_string(),
            path: path.to_path_buf(),
            source,
        })
}

/// "No such file or directory" rather than "... (os error 2)".
fn os_reason(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(code) => nix::errno::Errno::from_raw(code).desc().to_string(),
        None => e.to_string(),
    }
}

fn exit_of(status: ExitStatus) -> Exit {
    match (status.code(), status.signal()) {
        (Some(code), _) => Exit::Code(code),
        (None, Some(signal)) => Exit::Signal(signal),
        (None, None) => Exit::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::test_spec;
    use std::os::unix::process::CommandExt;
    use std::time::Instant;

    /// Waits (bounded) until `path` contains `needle`.
    async fn wait_for_text(path: &Path, needle: &str) -> String {
        for _ in 0..100 {
            let text = fs::read_to_string(path).unwrap_or_default();
            if text.contains(needle) {
                return text;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{} never contained {needle:?}", path.display());
    }

    #[tokio::test]
    async fn sleep_is_stopped_by_sigterm_and_reaped() {
        let dir = tempfile::tempdir().unwrap();
        let rt = ProcessRuntime::new();
        let mut handle = rt
            .start(&test_spec("a1", &["sleep", "30"], 20001), dir.path())
            .unwrap();
        let pid = handle.pid();
        assert!(procfs::is_same_live_process(pid, handle.start_time()));
        assert_eq!(
            procfs::read_stat(pid).unwrap().pgrp,
            pid as i32,
            "own process group"
        );

        let exit = handle.stop(Duration::from_secs(5)).await;
        assert_eq!(exit, Exit::Signal(libc::SIGTERM));
        // Reaped: no zombie left under that pid.
        assert!(!procfs::is_same_live_process(pid, handle.start_time()));
        assert!(!matches!(procfs::read_stat(pid), Some(s) if s.start_time == handle.start_time()));
    }

    /// Cargo sets CARGO_PKG_NAME in this test process (the agent here).
    #[tokio::test]
    async fn a_replica_sees_its_spec_environment_not_the_agents() {
        assert!(std::env::var("CARGO_PKG_NAME").is_ok());
        let dir = tempfile::tempdir().unwrap();
        let rt = ProcessRuntime::new();
        let mut spec = test_spec(
            "a9",
            &[
                "sh",
                "-c",
                "echo \"agent=${CARGO_PKG_NAME:-none} own=$OWN path=$PATH\"; sleep 30",
            ],
            20009,
        );
        spec.env.insert("OWN".into(), "yes".into());
        let mut handle = rt.start(&spec, dir.path()).unwrap();
        wait_for_text(
            &dir.path().join("stdout.log"),
            "agent=none own=yes path=/usr/local/sbin",
        )
        .await;
        handle.stop(Duration::from_secs(5)).await;
    }

    #[tokio::test]
    async fn process_ignoring_sigterm_is_killed_after_the_grace() {
        let dir = tempfile::tempdir().unwrap();
        let rt = ProcessRuntime::new();
        let spec = test_spec(
            "a2",
            &["sh", "-c", "trap '' TERM; echo ready; sleep 30"],
            20002,
        );
        let mut handle = rt.start(&spec, dir.path()).unwrap();
        wait_for_text(&dir.path().join("stdout.log"), "ready").await;

        let began = Instant::now();
        let exit = handle.stop(Duration::from_millis(300)).await;
        assert_eq!(exit, Exit::Signal(libc::SIGKILL));
        assert!(began.elapsed() >= Duration::from_millis(300));
        assert!(!procfs::is_same_live_process(
            handle.pid(),
            handle.start_time()
        ));
    }

    #[tokio::test]
    async fn port_is_interpolated_and_output_goes_to_log_files() {
        let dir = tempfile::tempdir().unwrap();
        let rt = ProcessRuntime::new();
        let mut spec = test_spec(
            "a3",
            &[
                "sh",
                "-c",
                "echo arg=$PORT env=$PORT url=$URL id=$SKIFF_ALLOC_ID; pwd; echo oops >&2",
            ],
            20003,
        );
        spec.env.insert("URL".into(), "http://x:${PORT}/".into());
        let mut handle = rt.start(&spec, dir.path()).unwrap();
        assert_eq!(handle.wait().await, Exit::Code(0));
        let out = fs::read_to_string(dir.path().join("stdout.log")).unwrap();
        assert!(
            out.contains("arg=20003 env=20003 url=http://x:20003/ id=a3"),
            "{out}"
        );
        assert!(
            out.contains(dir.path().to_str().unwrap()),
            "runs in the allocation dir: {out}"
        );
        let err = fs::read_to_string(dir.path().join("stderr.log")).unwrap();
        assert_eq!(err, "oops\n");
    }

    #[tokio::test]
    async fn processes_left_in_the_group_die_with_the_replica() {
        let dir = tempfile::tempdir().unwrap();
        let spec = test_spec(
            "a7",
            &["sh", "-c", "sleep 30 & echo $! > bg.pid; exit 3"],
            20007,
        );
        let mut handle = ProcessRuntime::new().start(&spec, dir.path()).unwrap();
        assert_eq!(handle.wait().await, Exit::Code(3));
        let bg: u32 = fs::read_to_string(dir.path().join("bg.pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        for _ in 0..100 {
            if !matches!(procfs::read_stat(bg), Some(s) if !s.is_exited()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("background process {bg} outlived its replica");
    }

    #[tokio::test]
    async fn missing_executable_fails_with_a_message_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let spec = test_spec("3f2a9c0d-77", &["python4-does-not-exist"], 20004);
        let err = ProcessRuntime::new().start(&spec, dir.path()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "failed to start replica 3f2a9c0d of web: python4-does-not-exist: No such file or directory"
        );
    }

    #[tokio::test]
    async fn adoption_requires_matching_start_time_and_stops_by_group() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .process_group(0)
            .spawn()
            .unwrap();
        let pid = child.id();
        let start_time = procfs::read_stat(pid).unwrap().start_time;
        let rt = ProcessRuntime::new();
        let spec = test_spec("a5", &["sleep", "30"], 20005);

        assert!(
            rt.recover(&spec, pid, start_time + 1).is_none(),
            "recycled pid"
        );
        assert!(rt.recover(&spec, pid, 0).is_none());
        let mut adopted = rt.recover(&spec, pid, start_time).expect("adopted");
        assert_eq!(adopted.pid(), pid);

        // The test process is its parent, so it turns zombie: still "exited".
        assert_eq!(adopted.stop(Duration::from_secs(5)).await, Exit::Unknown);
        assert_eq!(child.wait().unwrap().signal(), Some(libc::SIGTERM));
        assert!(rt.recover(&spec, pid, start_time).is_none());
    }

    #[tokio::test]
    async fn process_not_leading_its_group_is_not_adopted() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id();
        let start_time = procfs::read_stat(pid).unwrap().start_time;
        assert!(ProcessRuntime::new()
            .recover(&test_spec("a6", &["sleep"], 1), pid, start_time)
            .is_none());
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
