//! `skiff service exec NAME [--replica ID] [-it] -- CMD...`: a command in
//! a replica, relayed by the server to the replica's agent. Stdin (with
//! `-i`) and window size changes (with `-t`) go up the stream; stdout,
//! stderr and finally the exit code come down. The CLI exits with that code.

use std::io::{Read, Write};

use anyhow::anyhow;
use skiff_proto::v1 as pb;
use skiff_proto::v1::exec_input::Msg as In;
use skiff_proto::v1::exec_output::Msg as Out;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::args::ExecArgs;
use crate::client::explain;

/// Stdin is sent in pieces of at most this much.
const STDIN_CHUNK: usize = 32 * 1024;
/// The largest message accepted from the server.
const MAX_MESSAGE: usize = 1024 * 1024;

fn input(msg: In) -> pb::ExecInput {
    pb::ExecInput { msg: Some(msg) }
}

/// Runs the command; returns its exit code.
pub async fn exec(server: &str, args: ExecArgs) -> anyhow::Result<i32> {
    skiff_spec::validate_name(&args.name).map_err(|e| anyhow!("invalid service {e}"))?;
    let size = if args.tty {
        crate::terminal::size()
    } else {
        None
    };
    let (rows, cols) = size.unwrap_or((24, 80));
    let start = pb::ExecStart {
        service: args.name.clone(),
        replica: args.replica.clone().unwrap_or_default(),
        command: args.command.clone(),
        user: args.user.clone().unwrap_or_default(),
        tty: args.tty,
        env: args.env.clone(),
        rows: u32::from(rows),
        cols: u32::from(cols),
        stdin: args.interactive,
    };
    let channel = crate::client::channel(server, None).await?;
    let mut client = crate::client::client(channel)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    let (tx, rx) = mpsc::channel::<pb::ExecInput>(16);
    tx.send(input(In::Start(start)))
        .await
        .map_err(|_| anyhow!("exec stream closed"))?;
    let mut output = client
        .service_exec(ReceiverStream::new(rx))
        .await
        .map_err(explain)?
        .into_inner();
    // Raw mode only once the command runs, so an error prints normally.
    let raw = if args.tty && args.interactive {
        crate::terminal::RawMode::enter()
    } else {
        None
    };
    if args.interactive {
        let stdin_tx = tx.clone();
        std::thread::spawn(move || pump_stdin(&stdin_tx));
    }
    if args.tty {
        tokio::spawn(forward_resizes(tx.clone()));
    }
    // Without -i nothing more is sent; with -t the resizes keep a sender.
    drop(tx);
    let code = loop {
        let message = match output.message().await {
            Ok(Some(message)) => message,
            Ok(None) => break None,
            Err(status) => {
                drop(raw);
                return Err(explain(status));
            }
        };
        match message.msg {
            Some(Out::Stdout(data)) => write_out(&mut std::io::stdout().lock(), &data),
            Some(Out::Stderr(data)) => write_out(&mut std::io::stderr().lock(), &data),
            Some(Out::ExitCode(code)) => break Some(code),
            None => {}
        }
    };
    drop(raw);
    code.ok_or_else(|| {
        anyhow!(
            "the exec of {} ended without an exit code (the server or the agent went away)",
            args.name
        )
    })
}

fn write_out(out: &mut impl Write, data: &[u8]) {
    if let Err(err) = out.write_all(data).and_then(|()| out.flush()) {
        crate::output::write_failed(&err);
    }
}

/// Reads stdin until its end (a thread: stdin cannot be read without
/// blocking), then says it ended.
fn pump_stdin(tx: &mpsc::Sender<pb::ExecInput>) {
    let mut stdin = std::io::stdin().lock();
    let mut buf = vec![0u8; STDIN_CHUNK];
    loop {
        match stdin.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if tx
                    .blocking_send(input(In::Stdin(buf[..n].to_vec())))
                    .is_err()
                {
                    return;
                }
            }
        }
    }
    let _ = tx.blocking_send(input(In::CloseStdin(true)));
}

/// Sends the terminal's new size at every SIGWINCH.
async fn forward_resizes(tx: mpsc::Sender<pb::ExecInput>) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut changes) = signal(SignalKind::window_change()) else {
        return;
    };
    while changes.recv().await.is_some() {
        if let Some((rows, cols)) = crate::terminal::size() {
            let resize = pb::TerminalSize {
                rows: u32::from(rows),
                cols: u32::from(cols),
            };
            if tx.send(input(In::Resize(resize))).await.is_err() {
                return;
            }
        }
    }
}
