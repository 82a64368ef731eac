//! The local terminal for `skiff service exec -t`: raw mode while the
//! remote command owns the screen (restored on drop, so on every way out),
//! and the window size. termios through `nix`; the size needs one ioctl.
#![allow(unsafe_code)]

use std::io::IsTerminal;
use std::os::fd::{AsFd, AsRawFd};

use nix::sys::termios::{self, SetArg, Termios};

/// Raw mode on stdin until dropped.
pub struct RawMode {
    saved: Termios,
}

impl RawMode {
    /// Puts stdin in raw mode if it is a terminal; `None` otherwise.
    pub fn enter() -> Option<RawMode> {
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return None;
        }
        let saved = termios::tcgetattr(stdin.as_fd()).ok()?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw).ok()?;
        Some(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(std::io::stdin().as_fd(), SetArg::TCSANOW, &self.saved);
    }
}

/// Rows and columns of the terminal on stdout (or stdin); `None` if
/// neither is one.
pub fn size() -> Option<(u16, u16)> {
    let of = |fd: std::os::fd::RawFd| {
        let mut size = libc::winsize {
            ws_row: 0,
            ws_col: 0,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCGWINSZ writes one `winsize` through the pointer,
        // which points at a live, writable local of that type.
        let rc = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut size) };
        (rc == 0 && size.ws_row > 0).then_some((size.ws_row, size.ws_col))
    };
    of(std::io::stdout().as_raw_fd()).or_else(|| of(std::io::stdin().as_raw_fd()))
}
