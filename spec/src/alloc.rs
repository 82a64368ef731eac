//! The states of an allocation (a replica), as the agent reports them and
//! the control plane, the CLI and the dashboard show them.

use serde::{Deserialize, Serialize};

/// What the agent last reported of an allocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AllocState {
    /// Placed, not yet reported by the agent.
    Pending,
    /// The agent is pulling the replica's image.
    Pulling,
    Starting,
    /// Started; healthy as far as anyone knows (no check passed or failed yet,
    /// or it has none).
    Running,
    /// Its health check passes.
    Healthy,
    /// Its health check failed; the agent restarts it.
    Unhealthy,
    /// Exited; the agent restarts it after a backoff.
    Restarting,
    /// Cannot be started (e.g. the program does not exist); still retried.
    Failed,
    /// Stopped for good; the allocation can be forgotten.
    Stopped,
    /// A job's replica exited with status 0; not restarted.
    Completed,
    /// A job's replica exited with another status (or could not start);
    /// not restarted by its agent: the control plane may place another
    /// attempt.
    Exited,
    /// Its node is down: nobody knows whether it still runs. Set by the
    /// control plane, never reported by an agent; a report from its agent
    /// (the node came back) replaces it.
    Unknown,
    /// Its node is down and it has been replaced or stopped for good
    /// without its agent confirming it: written off, not stopped. A report
    /// from its agent replaces it.
    Lost,
}

impl AllocState {
    pub fn as_str(self) -> &'static str {
        match self {
            AllocState::Pending => "pending",
            AllocState::Pulling => "pulling",
            AllocState::Starting => "starting",
            AllocState::Running => "running",
            AllocState::Healthy => "healthy",
            AllocState::Unhealthy => "unhealthy",
            AllocState::Restarting => "restarting",
            AllocState::Failed => "failed",
            AllocState::Stopped => "stopped",
            AllocState::Completed => "completed",
            AllocState::Exited => "exited",
            AllocState::Unknown => "unknown",
            AllocState::Lost => "lost",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        Some(match value {
            "pending" => AllocState::Pending,
            "pulling" => AllocState::Pulling,
            "starting" => AllocState::Starting,
            "running" => AllocState::Running,
            "healthy" => AllocState::Healthy,
            "unhealthy" => AllocState::Unhealthy,
            "restarting" => AllocState::Restarting,
            "failed" => AllocState::Failed,
            "stopped" => AllocState::Stopped,
            "completed" => AllocState::Completed,
            "exited" => AllocState::Exited,
            "unknown" => AllocState::Unknown,
            "lost" => AllocState::Lost,
            _ => return None,
        })
    }

    /// Its process runs (healthy or not yet checked).
    pub fn is_up(self) -> bool {
        matches!(self, AllocState::Running | AllocState::Healthy)
    }

    /// A job's replica ended for good: nothing runs or holds resources.
    pub fn is_terminal(self) -> bool {
        matches!(self, AllocState::Completed | AllocState::Exited)
    }

    /// An agent may report it: `unknown` and `lost` are the control
    /// plane's verdicts on a down node, never an agent's.
    pub fn is_reportable(self) -> bool {
        !matches!(self, AllocState::Unknown | AllocState::Lost)
    }
}
