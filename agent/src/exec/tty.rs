//! The terminal side of `skiff service exec -t`: receiving the pty master
//! runc creates in the container (sent over `--console-socket` with
//! SCM_RIGHTS), opening a pty for a process replica, resizing, and reading
//! and writing the master without blocking a thread. The module holds the
//! agent's only unsafe code besides `mem.rs`: adopting a received
//! descriptor and the window-size ioctl.
#![allow(unsafe_code)]

use std::fs::File;
use std::io::{self, IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use tokio::io::unix::AsyncFd;

/// Receives the one descriptor the peer sends over `stream` (runc sends
/// the pty master with the pty's path as data). Blocks; set a read timeout
/// on `stream` first.
pub fn receive_fd(stream: &UnixStream) -> io::Result<OwnedFd> {
    let mut buf = [0u8; 4096];
    let mut iov = [IoSliceMut::new(&mut buf)];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let msg = recvmsg::<()>(
        stream.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut received: Option<OwnedFd> = None;
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            for fd in fds {
                // SAFETY: the kernel just installed `fd` in our table for
                // this message (SCM_RIGHTS); nothing else owns it, so
                // adopting it once is sound. Extra ones are adopted too,
                // to be closed.
                let owned = unsafe { OwnedFd::from_raw_fd(fd) };
                received.get_or_insert(owned);
            }
        }
    }
    received.ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "the console socket peer sent no file descriptor",
        )
    })
}

/// A pty pair for a process replica's command: (master, slave).
pub fn open_pty(rows: u16, cols: u16) -> io::Result<(OwnedFd, OwnedFd)> {
    let size = winsize(rows, cols);
    let pty = nix::pty::openpty(Some(&size), None)?;
    Ok((pty.master, pty.slave))
}

fn winsize(rows: u16, cols: u16) -> nix::pty::Winsize {
    nix::pty::Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

/// Sets the terminal size of the pty whose master (or slave) is `fd`.
pub fn set_size(fd: &impl AsRawFd, rows: u16, cols: u16) -> io::Result<()> {
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    let size = winsize(rows, cols);
    // SAFETY: TIOCSWINSZ reads one `winsize` through the pointer, which
    // points at a live local of that type; `fd` is an open descriptor.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &size) };
    if rc == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The size of the terminal `fd`; `None` if it is not one.
#[cfg(test)]
pub fn get_size(fd: &impl AsRawFd) -> Option<(u16, u16)> {
    let mut size = winsize(0, 0);
    // SAFETY: TIOCGWINSZ writes one `winsize` through the pointer, which
    // points at a live, writable local of that type.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, &mut size) };
    (rc == 0).then_some((size.ws_row, size.ws_col))
}

/// A pty master read and written from async code.
pub struct Master {
    fd: AsyncFd<File>,
}

impl Master {
    /// Makes `fd` non-blocking and registers it with the reactor.
    pub fn new(fd: OwnedFd) -> io::Result<Self> {
        let flags = OFlag::from_bits_truncate(fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL)?);
        fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
        // SAFETY: the `File` owns the descriptor for as long as the
        // `AsyncFd` owns the `File`, so it stays open and the same.
        let fd = unsafe { AsyncFd::register(File::from(fd)) }
            .map_err(|e| io::Error::other(e.to_string()))?;
        Ok(Self { fd })
    }

    /// Reads what the terminal printed; `Ok(0)` once no process holds the
    /// slave any more (Linux reports that as EIO).
    pub async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|inner| inner.get_ref().read(buf)) {
                Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Ok(0),
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }

    /// Writes all of `data` (typed input).
    pub async fn write_all(&self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let mut guard = self.fd.writable().await?;
            match guard.try_io(|inner| inner.get_ref().write(data)) {
                Ok(Ok(n)) => data = &data[n..],
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
        Ok(())
    }

    pub fn resize(&self, rows: u16, cols: u16) -> io::Result<()> {
        set_size(self.fd.get_ref(), rows, cols)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{sendmsg, ControlMessage};
    use std::io::IoSlice;
    use std::time::Duration;

    /// What runc does with `--console-socket`: sends a pty master; the
    /// receiver then talks to whatever holds the slave.
    #[tokio::test]
    async fn a_pty_master_received_over_a_console_socket_round_trips_bytes() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let (master, slave) = open_pty(24, 80).unwrap();
        let sender = std::thread::spawn(move || {
            let fds = [master.as_raw_fd()];
            let cmsg = [ControlMessage::ScmRights(&fds)];
            let iov = [IoSlice::new(b"/dev/pts/x")];
            sendmsg::<()>(theirs.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None).unwrap();
            // The sender's copy closes here, as runc's does.
        });
        ours.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let received = receive_fd(&ours).unwrap();
        sender.join().unwrap();

        set_size(&received, 40, 132).unwrap();
        assert_eq!(
            get_size(&slave),
            Some((40, 132)),
            "resize reaches the slave"
        );
        // Raw mode on the slave side, so bytes pass unchanged.
        let mut termios = nix::sys::termios::tcgetattr(&slave).unwrap();
        nix::sys::termios::cfmakeraw(&mut termios);
        nix::sys::termios::tcsetattr(&slave, nix::sys::termios::SetArg::TCSANOW, &termios).unwrap();

        let master = Master::new(received).unwrap();
        master.write_all(b"typed").await.unwrap();
        let mut slave_file = File::from(slave.try_clone().unwrap());
        let mut got = [0u8; 5];
        slave_file.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"typed", "input reaches the command");
        slave_file.write_all(b"printed").unwrap();
        let mut out = Vec::new();
        while out.len() < 7 {
            let mut buf = [0u8; 64];
            let n = tokio::time::timeout(Duration::from_secs(5), master.read(&mut buf))
                .await
                .unwrap()
                .unwrap();
            out.extend_from_slice(&buf[..n]);
        }
        assert_eq!(out, b"printed", "output reaches the client");
        drop((slave_file, slave));
        let mut buf = [0u8; 8];
        let n = tokio::time::timeout(Duration::from_secs(5), master.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(n, 0, "a closed slave reads as the end");
    }

    #[test]
    fn a_peer_that_sends_no_descriptor_is_an_error() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        theirs.write_all(b"no fd").unwrap();
        let err = receive_fd(&ours).unwrap_err();
        assert!(err.to_string().contains("no file descriptor"), "{err}");
    }
}
