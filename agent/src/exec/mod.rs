//! `skiff service exec` on the node: a command in a running replica, its
//! stdin, stdout and stderr streamed over the `AgentLogs.Exec` call the
//! servers relay, ending with the command's exit code (128+N when signal N
//! ended it).
//!
//! - A container (`oci`): `runc exec` in the container's namespaces, cgroup
//!   and process settings (environment, working directory and user: the
//!   image's or the service's `--user`), as `--user` asks otherwise
//!   (resolved against the container's `/etc/passwd`). Without a terminal
//!   the command shares runc's pipes; with one, runc sends the pty master
//!   over a console socket (`tty.rs`) and detaches, and the agent, the
//!   child subreaper, reaps the command for its exit code.
//! - A process replica: the command runs on the host (it is the host), in
//!   the replica's working directory with its environment, as the agent's
//!   user or `--user` (from the host's `/etc/passwd`), in a process group
//!   of its own.
//!
//! The command is killed when the client goes away.

mod tty;

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Stdio;
use std::time::Duration;

use futures::{Stream, StreamExt};
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use skiff_proto::v1 as pb;
use skiff_proto::v1::exec_input::Msg as In;
use skiff_proto::v1::exec_output::Msg as Out;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::runtime::oci::runc::{ExecOptions, Runc};
use crate::runtime::reaper::{self, Reaped};
use crate::runtime::Exit;

/// The most arguments and bytes of a command (and of its extra
/// environment).
const MAX_ARGS: usize = 1024;
const MAX_COMMAND_BYTES: usize = 128 * 1024;
/// Output is sent in pieces of at most this much.
const CHUNK: usize = 32 * 1024;
/// How long runc may take to hand over the terminal.
const CONSOLE_WAIT: Duration = Duration::from_secs(15);
/// After the command exited, output still buffered is read for this long
/// (a background process may keep the pipes open forever).
const DRAIN: Duration = Duration::from_millis(500);
/// A terminal's end-of-file character (Ctrl-D).
const EOT: u8 = 0x04;
/// How often a detached command is checked for its exit.
const REAP_POLL: Duration = Duration::from_millis(20);

/// The client's messages after `start` (an error ends them).
pub type Input = Pin<Box<dyn Stream<Item = Result<pb::ExecInput, tonic::Status>> + Send>>;
/// Output to the client.
pub type OutputSender = mpsc::Sender<pb::ExecOutput>;

/// Why a command could not start; the API layer (`logs.rs`) makes each
/// kind a gRPC status.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The request is wrong (command, user, environment).
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    /// The replica is not in a state to run commands.
    #[error("{0}")]
    NotRunning(String),
    /// This node cannot run it (no runc).
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Timeout(String),
    /// Setting the command up failed on the node.
    #[error("{0}")]
    Internal(String),
}

/// Where replicas live on this node and the runtime that runs containers.
#[derive(Clone, Debug)]
pub struct ExecContext {
    pub allocs_dir: PathBuf,
    pub runc: Option<Runc>,
}

fn output(msg: Out) -> pb::ExecOutput {
    pb::ExecOutput { msg: Some(msg) }
}

/// Checks `start` against the node's replicas and starts the command; its
/// output and exit code arrive on the returned channel.
pub async fn start(
    ctx: &ExecContext,
    start: pb::ExecStart,
    input: Input,
) -> Result<mpsc::Receiver<pb::ExecOutput>, ExecError> {
    check_start(&start)?;
    let id = start.replica.clone();
    crate::spec::validate_alloc_id(&id).map_err(|e| ExecError::Invalid(e.to_string()))?;
    let alloc_dir = ctx.allocs_dir.join(&id);
    let record = std::fs::read(alloc_dir.join("state.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<crate::store::AllocRecord>(&b).ok())
        .ok_or_else(|| ExecError::NotFound(format!("replica {id} is not on this node")))?;
    if record.pid == 0 {
        return Err(ExecError::NotRunning(format!(
            "replica {id} is not running; wait until `skiff service ps {}` shows it running",
            record.spec.service
        )));
    }
    let (tx, rx) = mpsc::channel(32);
    let rows = u16::try_from(start.rows).unwrap_or(u16::MAX);
    let cols = u16::try_from(start.cols).unwrap_or(u16::MAX);
    match record.spec.runtime {
        skiff_spec::RuntimeKind::Oci => {
            let runc = ctx.runc.clone().ok_or_else(|| {
                ExecError::Unavailable("this node runs no containers (no runc)".into())
            })?;
            let user = match start.user.as_str() {
                "" => None,
                user => {
                    let found = crate::image::lookup_user(&[alloc_dir.join("bundle/rootfs")], user)
                        .map_err(|e| ExecError::Invalid(format!("invalid --user: {e}")))?;
                    Some((found.uid, found.gid, found.additional_gids))
                }
            };
            let options = ExecOptions {
                command: start.command.clone(),
                user,
                env: start.env.clone(),
                console_socket: None,
            };
            if start.tty {
                let session = ContainerTty::open(&runc, &id, options, rows, cols).await?;
                tokio::spawn(session.run(input, tx));
            } else {
                let dir = private_dir()?;
                let pid_file = dir.join("pid");
                let mut command = runc.exec_command(&id, &options, &pid_file);
                command.stdin(if start.stdin {
                    Stdio::piped()
                } else {
                    Stdio::null()
                });
                let child = spawn_piped(command)?;
                tokio::spawn(async move {
                    run_piped(child, Killer::PidFile(pid_file), input, tx).await;
                    let _ = std::fs::remove_dir_all(dir);
                });
            }
        }
        skiff_spec::RuntimeKind::Process => {
            let spec = &record.spec;
            let workdir = if spec.workdir.is_empty() {
                alloc_dir.clone()
            } else {
                PathBuf::from(&spec.workdir)
            };
            let mut command = tokio::process::Command::new(&start.command[0]);
            command
                .args(&start.command[1..])
                .env_clear()
                .env("PATH", crate::runtime::process::DEFAULT_PATH)
                .env("HOME", &workdir)
                .envs(spec.environment())
                .envs(start.env.iter().filter_map(|e| e.split_once('=')))
                .current_dir(&workdir)
                .process_group(0);
            if !start.user.is_empty() {
                let found = crate::image::lookup_user(&[PathBuf::from("/")], &start.user)
                    .map_err(|e| ExecError::Invalid(format!("invalid --user: {e}")))?;
                command.uid(found.uid).gid(found.gid);
            }
            if start.tty {
                let (master, slave) = tty::open_pty(rows, cols).map_err(internal)?;
                let io = |fd: &std::os::fd::OwnedFd| fd.try_clone().map(Stdio::from);
                command
                    .stdin(io(&slave).map_err(internal)?)
                    .stdout(io(&slave).map_err(internal)?)
                    .stderr(io(&slave).map_err(internal)?)
                    .kill_on_drop(true);
                let mut child = command
                    .spawn()
                    .map_err(|e| spawn_error(&start.command[0], &e))?;
                drop(command);
                drop(slave);
                let master = tty::Master::new(master).map_err(internal)?;
                let pid = child.id().unwrap_or(0);
                let exit = async move { child.wait().await.map_or(-1, exit_code) };
                tokio::spawn(run_tty(
                    master,
                    Box::pin(exit),
                    Killer::Group(pid),
                    input,
                    tx,
                ));
            } else {
                command.stdin(if start.stdin {
                    Stdio::piped()
                } else {
                    Stdio::null()
                });
                let child = spawn_piped(command)
                    .map_err(|e| ExecError::Invalid(format!("{}: {e}", start.command[0])))?;
                let pid = child.id().unwrap_or(0);
                tokio::spawn(run_piped(child, Killer::Group(pid), input, tx));
            }
        }
    }
    tracing::info!(alloc = %id, tty = start.tty, user = %start.user, "exec started");
    Ok(rx)
}

/// Bounds and shape of a start message.
fn check_start(start: &pb::ExecStart) -> Result<(), ExecError> {
    if start.command.is_empty() || start.command[0].is_empty() {
        return Err(ExecError::Invalid(
            "invalid command: it is empty; give it after `--`, e.g. `skiff service exec web -- sh`"
                .into(),
        ));
    }
    let bytes: usize = start
        .command
        .iter()
        .chain(&start.env)
        .map(String::len)
        .sum();
    if start.command.len() + start.env.len() > MAX_ARGS || bytes > MAX_COMMAND_BYTES {
        return Err(ExecError::Invalid(format!(
            "invalid command: at most {MAX_ARGS} arguments and {MAX_COMMAND_BYTES} bytes with the environment"
        )));
    }
    if let Some(bad) = start
        .env
        .iter()
        .find(|e| !e.contains('=') || e.starts_with('='))
    {
        return Err(ExecError::Invalid(format!(
            "invalid --env {bad:?}: use KEY=VALUE"
        )));
    }
    Ok(())
}

fn internal(e: std::io::Error) -> ExecError {
    ExecError::Internal(format!("failed to set up the command's terminal: {e}"))
}

fn spawn_error(program: &str, e: &std::io::Error) -> ExecError {
    ExecError::Invalid(format!("failed to run {program}: {e}"))
}

/// A directory only root reads, for a console socket and a pid file.
fn private_dir() -> Result<PathBuf, ExecError> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = std::env::temp_dir().join(format!("skiff-exec-{:016x}", rand::random::<u64>()));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(|e| ExecError::Internal(format!("failed to create {}: {e}", dir.display())))?;
    Ok(dir)
}

/// An exit status as the exit code a shell reports.
fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(-1)
}

/// How to end the command when the client goes away.
enum Killer {
    /// A process group of our own (a process replica's command).
    Group(u32),
    /// The pid runc wrote (a container's command).
    PidFile(PathBuf),
    Pid(u32),
}

impl Killer {
    fn kill(&self) {
        let pid = match self {
            Killer::Group(pid) | Killer::Pid(pid) => *pid,
            Killer::PidFile(path) => std::fs::read_to_string(path)
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0),
        };
        let Ok(raw) = i32::try_from(pid) else {
            return;
        };
        if raw <= 1 {
            return;
        }
        let _ = match self {
            Killer::Group(_) => killpg(Pid::from_raw(raw), Signal::SIGKILL),
            _ => kill(Pid::from_raw(raw), Signal::SIGKILL),
        };
    }
}

fn spawn_piped(mut command: tokio::process::Command) -> Result<tokio::process::Child, ExecError> {
    command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| ExecError::Internal(format!("failed to start the command: {e}")))
}

/// Copies `from` to the client as `wrap` messages until its end.
async fn forward(mut from: impl AsyncRead + Unpin, tx: OutputSender, wrap: fn(Vec<u8>) -> Out) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if tx.send(output(wrap(buf[..n].to_vec()))).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// A command without a terminal: stdin from the client, stdout and stderr
/// to it, then the exit code.
async fn run_piped(
    mut child: tokio::process::Child,
    killer: Killer,
    mut input: Input,
    tx: OutputSender,
) {
    let mut stdin = child.stdin.take();
    let readers = [
        child
            .stdout
            .take()
            .map(|o| tokio::spawn(forward(o, tx.clone(), Out::Stdout))),
        child
            .stderr
            .take()
            .map(|e| tokio::spawn(forward(e, tx.clone(), Out::Stderr))),
    ];
    let mut input_open = true;
    let status = loop {
        tokio::select! {
            status = child.wait() => break status.map_or(-1, exit_code),
            message = input.next(), if input_open => match message {
                Some(Ok(pb::ExecInput { msg: Some(In::Stdin(data)) })) => {
                    if let Some(pipe) = stdin.as_mut() {
                        if pipe.write_all(&data).await.is_err() {
                            stdin = None;
                        }
                    }
                }
                Some(Ok(pb::ExecInput { msg: Some(In::CloseStdin(_)) })) => stdin = None,
                Some(Ok(_)) => {}
                // The client stopped sending: its stdin has ended.
                None | Some(Err(_)) => {
                    input_open = false;
                    stdin = None;
                }
            },
            () = tx.closed() => {
                killer.kill();
                let _ = child.kill().await;
                return;
            }
        }
    };
    drop(stdin);
    for reader in readers.into_iter().flatten() {
        let abort = reader.abort_handle();
        if tokio::time::timeout(DRAIN, reader).await.is_err() {
            abort.abort();
        }
    }
    let _ = tx.send(output(Out::ExitCode(status))).await;
}

/// A command with a terminal: typed input and resizes to the master,
/// everything the terminal prints as stdout, then the exit code `exit`
/// resolves to.
async fn run_tty(
    master: tty::Master,
    exit: Pin<Box<dyn std::future::Future<Output = i32> + Send>>,
    killer: Killer,
    mut input: Input,
    tx: OutputSender,
) {
    let mut exit = exit;
    let mut buf = vec![0u8; CHUNK];
    let mut input_open = true;
    let mut output_open = true;
    let code = loop {
        tokio::select! {
            code = &mut exit => break code,
            read = master.read(&mut buf), if output_open => match read {
                Ok(0) | Err(_) => output_open = false,
                Ok(n) => {
                    let _ = tx.send(output(Out::Stdout(buf[..n].to_vec()))).await;
                }
            },
            message = input.next(), if input_open => match message {
                Some(Ok(pb::ExecInput { msg: Some(In::Stdin(data)) })) => {
                    let _ = master.write_all(&data).await;
                }
                Some(Ok(pb::ExecInput { msg: Some(In::Resize(size)) })) => {
                    let (rows, cols) = (clamp(size.rows), clamp(size.cols));
                    let _ = master.resize(rows, cols);
                }
                // A terminal has no end of input: its EOF character is
                // the closest (piped stdin with -it).
                Some(Ok(pb::ExecInput { msg: Some(In::CloseStdin(_)) })) => {
                    let _ = master.write_all(&[EOT]).await;
                }
                Some(Ok(_)) => {}
                None | Some(Err(_)) => input_open = false,
            },
            () = tx.closed() => {
                killer.kill();
                return;
            }
        }
    };
    // What the command printed last is still in the terminal's buffer.
    let drained = async {
        while output_open {
            match master.read(&mut buf).await {
                Ok(0) | Err(_) => output_open = false,
                Ok(n) => {
                    let _ = tx.send(output(Out::Stdout(buf[..n].to_vec()))).await;
                }
            }
        }
    };
    let _ = tokio::time::timeout(DRAIN, drained).await;
    let _ = tx.send(output(Out::ExitCode(code))).await;
}

fn clamp(n: u32) -> u16 {
    u16::try_from(n).unwrap_or(u16::MAX)
}

/// A container command with a terminal: runc started it detached and sent
/// its pty master over the console socket.
struct ContainerTty {
    master: tty::Master,
    pid: u32,
    dir: PathBuf,
}

impl ContainerTty {
    async fn open(
        runc: &Runc,
        id: &str,
        mut options: ExecOptions,
        rows: u16,
        cols: u16,
    ) -> Result<Self, ExecError> {
        let dir = private_dir()?;
        let opened = Self::open_in(runc, id, &mut options, rows, cols, &dir).await;
        if opened.is_err() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        opened.map(|(master, pid)| ContainerTty { master, pid, dir })
    }

    async fn open_in(
        runc: &Runc,
        id: &str,
        options: &mut ExecOptions,
        rows: u16,
        cols: u16,
        dir: &Path,
    ) -> Result<(tty::Master, u32), ExecError> {
        let socket = dir.join("console.sock");
        let listener = tokio::net::UnixListener::bind(&socket).map_err(|e| {
            ExecError::Internal(format!("failed to listen on {}: {e}", socket.display()))
        })?;
        options.console_socket = Some(socket);
        let pid_file = dir.join("pid");
        let mut command = runc.exec_command(id, options, &pid_file);
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let child = command
            .spawn()
            .map_err(|e| ExecError::Internal(format!("cannot run {}: {e}", runc.name())))?;
        let receive = async {
            let (stream, _) = listener.accept().await?;
            let stream = stream.into_std()?;
            stream.set_nonblocking(false)?;
            stream.set_read_timeout(Some(CONSOLE_WAIT))?;
            tokio::task::spawn_blocking(move || tty::receive_fd(&stream))
                .await
                .map_err(std::io::Error::other)?
        };
        let (received, finished) = tokio::time::timeout(CONSOLE_WAIT, async {
            tokio::join!(receive, child.wait_with_output())
        })
        .await
        .map_err(|_| {
            ExecError::Timeout(format!(
                "{} exec did not start the command in time",
                runc.name()
            ))
        })?;
        let finished =
            finished.map_err(|e| ExecError::Internal(format!("{} exec: {e}", runc.name())))?;
        if !finished.status.success() {
            let text = String::from_utf8_lossy(&finished.stderr);
            let line = text
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("");
            return Err(ExecError::NotRunning(format!(
                "{} exec failed: {}",
                runc.name(),
                line.trim()
            )));
        }
        let master = received
            .map_err(|e| ExecError::Internal(format!("failed to receive the terminal: {e}")))?;
        let pid = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| ExecError::Internal(format!("{} exec wrote no pid", runc.name())))?;
        let _ = tty::set_size(&master, rows, cols);
        let master = tty::Master::new(master).map_err(internal)?;
        Ok((master, pid))
    }

    async fn run(self, input: Input, tx: OutputSender) {
        let pid = self.pid;
        let exit = async move {
            loop {
                match reaper::try_reap(pid) {
                    Reaped::Exited(Exit::Code(code)) => return code,
                    Reaped::Exited(Exit::Signal(signal)) => return 128 + signal,
                    Reaped::Exited(_) => return -1,
                    Reaped::Running => {}
                    // Not re-parented to us (the agent is no subreaper):
                    // its end is seen, its code is not.
                    Reaped::NotChild => {
                        if !Path::new(&format!("/proc/{pid}")).exists() {
                            return -1;
                        }
                    }
                }
                tokio::time::sleep(REAP_POLL).await;
            }
        };
        run_tty(self.master, Box::pin(exit), Killer::Pid(pid), input, tx).await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(messages: Vec<In>) -> Input {
        let items: Vec<Result<pb::ExecInput, tonic::Status>> = messages
            .into_iter()
            .map(|m| pb::ExecInput { msg: Some(m) })
            .map(Ok)
            .collect();
        Box::pin(futures::stream::iter(items).chain(futures::stream::pending()))
    }

    async fn collect(mut rx: mpsc::Receiver<pb::ExecOutput>) -> (Vec<u8>, Vec<u8>, i32) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        while let Some(message) = rx.recv().await {
            match message.msg {
                Some(Out::Stdout(d)) => out.extend(d),
                Some(Out::Stderr(d)) => err.extend(d),
                Some(Out::ExitCode(code)) => return (out, err, code),
                _ => {}
            }
        }
        panic!("no exit code");
    }

    fn shell(script: &str) -> tokio::process::Command {
        let mut command = tokio::process::Command::new("/bin/sh");
        command.arg("-c").arg(script).process_group(0);
        command
    }

    #[tokio::test]
    async fn a_piped_command_gets_stdin_and_returns_both_outputs_and_its_code() {
        let mut command = shell("cat; echo err >&2; exit 7");
        command.stdin(Stdio::piped());
        let child = spawn_piped(command).unwrap();
        let pid = child.id().unwrap();
        let (tx, rx) = mpsc::channel(8);
        let stdin = input(vec![In::Stdin(b"typed\n".to_vec()), In::CloseStdin(true)]);
        tokio::spawn(run_piped(child, Killer::Group(pid), stdin, tx));
        let (out, err, code) = collect(rx).await;
        assert_eq!(
            (out.as_slice(), err.as_slice(), code),
            (&b"typed\n"[..], &b"err\n"[..], 7)
        );
    }

    #[tokio::test]
    async fn a_command_ended_by_a_signal_exits_with_128_plus_the_signal() {
        let child = spawn_piped(shell("kill -9 $$")).unwrap();
        let (tx, rx) = mpsc::channel(8);
        tokio::spawn(run_piped(child, Killer::Pid(0), input(vec![]), tx));
        assert_eq!(collect(rx).await.2, 137);
    }

    /// The terminal path of a process replica end to end: the command sees
    /// a terminal of the asked size and its output comes back.
    #[tokio::test]
    async fn a_tty_command_sees_a_terminal_of_the_asked_size() {
        let (master, slave) = tty::open_pty(33, 101).unwrap();
        let mut command = shell("test -t 0 && stty size; read line; echo got=$line; exit 3");
        let io = |fd: &std::os::fd::OwnedFd| Stdio::from(fd.try_clone().unwrap());
        command
            .stdin(io(&slave))
            .stdout(io(&slave))
            .stderr(io(&slave));
        let mut child = command.spawn().unwrap();
        drop(command);
        drop(slave);
        let pid = child.id().unwrap();
        let exit = async move { child.wait().await.map_or(-1, exit_code) };
        let (tx, rx) = mpsc::channel(8);
        let stdin = input(vec![In::Stdin(b"hello\r".to_vec())]);
        let master = tty::Master::new(master).unwrap();
        tokio::spawn(run_tty(
            master,
            Box::pin(exit),
            Killer::Group(pid),
            stdin,
            tx,
        ));
        let (out, _, code) = tokio::time::timeout(Duration::from_secs(10), collect(rx))
            .await
            .unwrap();
        let out = String::from_utf8_lossy(&out);
        assert!(out.contains("33 101"), "{out:?}");
        assert!(out.contains("got=hello"), "{out:?}");
        assert_eq!(code, 3);
    }

    #[test]
    fn start_messages_are_bounded_and_need_a_command() {
        let ok = pb::ExecStart {
            command: vec!["sh".into()],
            env: vec!["A=1".into()],
            ..Default::default()
        };
        assert!(check_start(&ok).is_ok());
        let empty = pb::ExecStart::default();
        assert!(check_start(&empty)
            .unwrap_err()
            .to_string()
            .contains("invalid command"));
        let bad_env = pb::ExecStart {
            env: vec!["NOVALUE".into()],
            ..ok.clone()
        };
        assert!(check_start(&bad_env)
            .unwrap_err()
            .to_string()
            .contains("KEY=VALUE"));
        let huge = pb::ExecStart {
            command: vec!["x".repeat(MAX_COMMAND_BYTES + 1)],
            ..ok
        };
        assert!(check_start(&huge).is_err());
    }
}
