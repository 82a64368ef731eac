//! The agent as child subreaper: container processes started by
//! `runc run --detach` are re-parented to the agent when runc exits, so
//! their exits are reaped at once and their status is kept. Only PIDs the
//! runtimes name are reaped; children tokio spawned are left to tokio.

use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use super::Exit;

/// Makes orphaned descendants of this process its children.
pub fn become_subreaper() -> Result<(), String> {
    nix::sys::prctl::set_child_subreaper(true)
        .map_err(|e| format!("cannot become a child subreaper: {e}"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reaped {
    Exited(Exit),
    Running,
    /// Not our child (e.g. adopted after an agent restart).
    NotChild,
}

/// Reaps `pid` without blocking if it is our child and has exited.
pub fn try_reap(pid: u32) -> Reaped {
    let Ok(raw) = i32::try_from(pid) else {
        return Reaped::NotChild;
    };
    if raw <= 1 {
        return Reaped::NotChild;
    }
    match waitpid(Pid::from_raw(raw), Some(WaitPidFlag::WNOHANG)) {
        Ok(WaitStatus::Exited(_, code)) => Reaped::Exited(Exit::Code(code)),
        Ok(WaitStatus::Signaled(_, signal, _)) => Reaped::Exited(Exit::Signal(signal as i32)),
        Ok(_) => Reaped::Running,
        Err(Errno::ECHILD) | Err(_) => Reaped::NotChild,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reaps_own_children_and_ignores_others() {
        #[allow(clippy::zombie_processes)] // reaped by try_reap below
        let child = std::process::Command::new("sh")
            .args(["-c", "exit 7"])
            .spawn()
            .unwrap();
        let pid = child.id();
        let mut reaped = Reaped::Running;
        for _ in 0..200 {
            reaped = try_reap(pid);
            if reaped != Reaped::Running {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(reaped, Reaped::Exited(Exit::Code(7)));
        assert_eq!(try_reap(1), Reaped::NotChild);
    }
}
