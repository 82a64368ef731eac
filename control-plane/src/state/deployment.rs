//! The record of each rollout of a service (a deployment) and of each
//! version of its spec. The policies they follow are the spec's own
//! (`skiff_spec::UpdatePolicy`).

use serde::{Deserialize, Serialize};

use skiff_spec::UpdatePolicy;

/// Where a deployment is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeploymentStatus {
    Running,
    Paused,
    /// Blue-green or canary: the new replicas are ready; waiting for
    /// `skiff service promote`.
    AwaitingPromotion,
    Succeeded,
    Failed,
    /// Ended by a rollback (automatic or `skiff service rollback`).
    RolledBack,
    /// Replaced by a newer update before it ended.
    Superseded,
}

impl DeploymentStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DeploymentStatus::Running => "running",
            DeploymentStatus::Paused => "paused",
            DeploymentStatus::AwaitingPromotion => "awaiting-promotion",
            DeploymentStatus::Succeeded => "succeeded",
            DeploymentStatus::Failed => "failed",
            DeploymentStatus::RolledBack => "rolled-back",
            DeploymentStatus::Superseded => "superseded",
        }
    }

    /// Still rolling out (possibly paused or waiting for promotion).
    pub fn is_active(self) -> bool {
        matches!(
            self,
            DeploymentStatus::Running
                | DeploymentStatus::Paused
                | DeploymentStatus::AwaitingPromotion
        )
    }
}

/// The rollout of one version of a service, as committed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deployment {
    pub version: u64,
    /// The version that served when it started.
    pub from_version: u64,
    pub policy: UpdatePolicy,
    pub status: DeploymentStatus,
    pub message: String,
    /// Blue-green: traffic flipped; canary: continuing as rolling.
    pub promoted: bool,
    pub started_ms: u64,
    /// When the progress deadline started counting: the start, and again
    /// on resuming and on promotion (waiting for an operator is not slow
    /// progress).
    #[serde(default)]
    pub progress_since_ms: u64,
    pub ended_ms: u64,
    /// The failed version this deployment rolls back from (0: none).
    pub rollback_of: u64,
}

/// One version of a service's spec and how its rollout ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionRecord {
    pub version: u64,
    pub spec: skiff_spec::ServiceSpec,
    pub created_ms: u64,
    /// "running", "succeeded", "failed", "rolled-back", "superseded".
    pub outcome: String,
    pub message: String,
}
