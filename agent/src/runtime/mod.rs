//! Runtimes run replicas. The trait is shaped like Nomad's task drivers
//! (start, wait, stop with a grace period, recover after an agent restart)
//! and is the seam between supervision logic and the OS: the supervisor is
//! tested against a fake, the process runtime against real processes.

pub mod any;
pub mod oci;
pub mod process;
pub mod procfs;
pub mod reaper;

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::health::HealthCheck;
use crate::spec::ReplicaSpec;

/// How a replica's process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
    /// An adopted process is not our child, so its status is not ours to read.
    Unknown,
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exit::Code(code) => write!(f, "exited with status {code}"),
            Exit::Signal(sig) => match nix::sys::signal::Signal::try_from(*sig) {
                Ok(signal) => write!(f, "killed by {}", signal.as_str()),
                Err(_) => write!(f, "killed by signal {sig}"),
            },
            Exit::Unknown => write!(f, "exited"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("failed to start replica {short_id} of {service}: {program}: {reason}")]
    Start {
        short_id: String,
        service: String,
        program: String,
        reason: String,
    },
    #[error("failed to open log {path} of replica {short_id}: {source}")]
    Log {
        short_id: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("failed to pull image of replica {short_id} of {service}: {reason}")]
    Pull {
        short_id: String,
        service: String,
        reason: String,
    },
    /// The node cannot run this kind of replica at all (e.g. no OCI runtime).
    #[error("replica {short_id} of {service} cannot run on this node: {reason}")]
    Unsupported {
        short_id: String,
        service: String,
        reason: String,
    },
}

/// Starts replicas and recovers those a previous agent started.
pub trait Runtime: Send + Sync + 'static {
    type Handle: TaskHandle;

    /// Fetches what [`Runtime::start`] needs (the image); may take long and
    /// is retried by the supervisor with backoff.
    fn prepare(
        &self,
        _spec: &ReplicaSpec,
    ) -> impl Future<Output = Result<(), RuntimeError>> + Send {
        async { Ok(()) }
    }

    /// Stores `image` ahead of any replica needing it (a deployment's
    /// pre-pull). Runtimes without images have nothing to fetch.
    fn prefetch(&self, _image: &str) -> impl Future<Output = Result<(), String>> + Send {
        async { Ok(()) }
    }

    /// Starts the replica. `alloc_dir` exists or is created; it holds the
    /// logs and is the working directory unless the spec names one.
    /// Synchronous so that nothing can interrupt the caller between the
    /// start and the durable record of the new PID.
    fn start(&self, spec: &ReplicaSpec, alloc_dir: &Path) -> Result<Self::Handle, RuntimeError>;

    /// Re-attaches to a replica started by a previous agent, if the process
    /// `pid` still runs and is the one started at `start_time`.
    fn recover(&self, spec: &ReplicaSpec, pid: u32, start_time: u64) -> Option<Self::Handle>;

    /// Removes whatever a replica that is no longer running left behind
    /// (runtime state, mounts, network, cgroups). Idempotent.
    fn destroy(&self, _spec: &ReplicaSpec, _alloc_dir: &Path) {}
}

/// One running replica.
pub trait TaskHandle: Send + 'static {
    fn pid(&self) -> u32;
    /// Identifies the process together with the PID (see `procfs`).
    fn start_time(&self) -> u64;
    /// Resolves when the replica exits. Cancel-safe: dropping the future
    /// loses nothing, so it can sit in a `select!`.
    fn wait(&mut self) -> impl Future<Output = Exit> + Send + '_;
    /// Asks the replica to stop (SIGTERM to its process group), kills it
    /// after `grace`, and resolves once it is gone and reaped.
    fn stop(&mut self, grace: Duration) -> impl Future<Output = Exit> + Send + '_;

    /// The check that decides the replica's health: the service's, else the
    /// image's.
    fn health_check(&self) -> Option<HealthCheck> {
        None
    }

    /// Where HTTP and TCP checks connect.
    fn probe_addr(&self) -> Option<SocketAddr> {
        None
    }

    /// The port the replica listens on in its own network namespace (the
    /// spec's container port or the image's); `None` when it shares the
    /// host's network. Reported, so discovery by name knows the port.
    fn container_port(&self) -> Option<u16> {
        None
    }

    /// Runs an exec check in the replica: `Ok` if it exits 0 in time.
    fn exec_check(
        &self,
        _command: &[String],
        _timeout: Duration,
    ) -> impl Future<Output = Result<(), String>> + Send {
        async { Err("exec checks are not supported by this runtime".to_string()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exits_read_like_messages() {
        assert_eq!(Exit::Code(1).to_string(), "exited with status 1");
        assert_eq!(Exit::Signal(9).to_string(), "killed by SIGKILL");
        assert_eq!(Exit::Unknown.to_string(), "exited");
    }
}
