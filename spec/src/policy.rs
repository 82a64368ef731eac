//! How a new version of a service replaces the running one (the update
//! policy an operator declares) and how its replicas scale by themselves
//! (the autoscale policy): one type each, for the CLI, the files, the
//! server and the controllers.

use serde::{Deserialize, Serialize};

use crate::SpecError;

/// How replicas of a new version replace the old ones.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// Replace a few replicas at a time, new first (surge), old drained.
    #[default]
    Rolling,
    /// Start the whole new version beside the old one with no traffic;
    /// promotion flips all traffic in one committed step.
    BlueGreen,
    /// Start a few new replicas that take a share of the traffic; promotion
    /// continues as a rolling update.
    Canary,
}

impl Strategy {
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Rolling => "rolling",
            Strategy::BlueGreen => "blue-green",
            Strategy::Canary => "canary",
        }
    }

    pub fn parse(value: &str) -> Result<Self, SpecError> {
        match value {
            "" | "rolling" => Ok(Strategy::Rolling),
            "blue-green" | "bluegreen" => Ok(Strategy::BlueGreen),
            "canary" => Ok(Strategy::Canary),
            other => Err(SpecError::new(
                "update-strategy",
                format!("unknown strategy \"{other}\"; use rolling, blue-green or canary"),
            )),
        }
    }
}

/// The update policy of a service (Nomad's `update` block, Kubernetes'
/// rolling-update parameters). Defaults: one new replica at a time, one
/// extra replica allowed, none missing, 5 s of health before a new replica
/// counts, automatic rollback.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct UpdatePolicy {
    pub strategy: Strategy,
    pub max_parallel: u32,
    pub max_surge: u32,
    pub max_unavailable: u32,
    pub min_healthy_ms: u32,
    pub healthy_deadline_ms: u32,
    pub progress_deadline_ms: u32,
    pub auto_rollback: bool,
    pub auto_promote: bool,
    pub canary: u32,
    /// Percent of requests sent to the canaries; `None`: by replica count.
    pub canary_weight: Option<u32>,
    /// Percent of failed canary requests above which the update fails.
    pub max_error_rate: Option<u32>,
}

impl Default for UpdatePolicy {
    fn default() -> Self {
        UpdatePolicy {
            strategy: Strategy::Rolling,
            max_parallel: 1,
            max_surge: 1,
            max_unavailable: 0,
            min_healthy_ms: 5_000,
            healthy_deadline_ms: 60_000,
            progress_deadline_ms: 600_000,
            auto_rollback: true,
            auto_promote: false,
            canary: 1,
            canary_weight: None,
            max_error_rate: None,
        }
    }
}

/// Longest a deadline may be: a day. Longer ones are typos.
const MAX_DEADLINE_MS: u32 = 86_400_000;

impl UpdatePolicy {
    /// Checks the values; the message names the flag and the fix.
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.max_parallel == 0 {
            return Err(SpecError::new(
                "max-parallel",
                "0 would never replace a replica; use at least 1",
            ));
        }
        if self.strategy == Strategy::Rolling && self.max_surge == 0 && self.max_unavailable == 0 {
            return Err(SpecError::new(
                "max-surge",
                "max-surge and max-unavailable are both 0, so no replica could ever be replaced; allow a surge (--max-surge 1) or an unavailable replica (--max-unavailable 1)",
            ));
        }
        if self.healthy_deadline_ms == 0 || self.healthy_deadline_ms > MAX_DEADLINE_MS {
            return Err(SpecError::new(
                "healthy-deadline",
                "must be between 1 ms and 24 h, e.g. --healthy-deadline 60s",
            ));
        }
        if self.progress_deadline_ms == 0 || self.progress_deadline_ms > MAX_DEADLINE_MS {
            return Err(SpecError::new(
                "progress-deadline",
                "must be between 1 ms and 24 h, e.g. --progress-deadline 10m",
            ));
        }
        if self.min_healthy_ms >= self.healthy_deadline_ms {
            return Err(SpecError::new(
                "min-healthy-time",
                format!(
                    "{} ms is not below the healthy deadline ({} ms), so no replica could ever count; lower --min-healthy-time or raise --healthy-deadline",
                    self.min_healthy_ms, self.healthy_deadline_ms
                ),
            ));
        }
        if self.strategy == Strategy::Canary && self.canary == 0 {
            return Err(SpecError::new(
                "canary",
                "a canary update needs at least 1 canary replica; use --canary 1",
            ));
        }
        if let Some(weight) = self.canary_weight {
            if !(1..=100).contains(&weight) {
                return Err(SpecError::new(
                    "canary-weight",
                    format!("{weight} is not a percent from 1 to 100"),
                ));
            }
        }
        if let Some(rate) = self.max_error_rate {
            if rate > 100 {
                return Err(SpecError::new(
                    "max-error-rate",
                    format!("{rate} is not a percent from 0 to 100"),
                ));
            }
        }
        Ok(())
    }
}

/// Target tracking, like Kubernetes' HPA: replicas between `min` and `max`
/// so that each replica sees about the target load.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AutoscalePolicy {
    pub min: u32,
    pub max: u32,
    /// Requests per second per replica (routing proxy, HTTP services).
    pub target_rps: Option<f64>,
    /// Open connections per replica (routing proxy).
    pub target_concurrency: Option<f64>,
    /// Percent of the replica's CPU limit (cgroup stats).
    pub target_cpu: Option<f64>,
}

// Targets are validated finite, so equality is total in practice.
impl Eq for AutoscalePolicy {}

impl AutoscalePolicy {
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.max == 0 || self.max > crate::MAX_REPLICAS {
            return Err(SpecError::new(
                "autoscale-max",
                format!(
                    "must be between 1 and {}; use e.g. --autoscale-max 10",
                    crate::MAX_REPLICAS
                ),
            ));
        }
        if self.min > self.max {
            return Err(SpecError::new(
                "autoscale-min",
                format!(
                    "{} is above --autoscale-max {}; lower it",
                    self.min, self.max
                ),
            ));
        }
        let targets = [
            ("target-rps", self.target_rps),
            ("target-concurrency", self.target_concurrency),
            ("target-cpu", self.target_cpu),
        ];
        if targets.iter().all(|(_, t)| t.is_none()) {
            return Err(SpecError::new(
                "autoscale",
                "needs a target; add --target-rps R, --target-concurrency C or --target-cpu P",
            ));
        }
        for (field, target) in targets {
            if let Some(t) = target {
                if !t.is_finite() || t <= 0.0 {
                    return Err(SpecError::new(
                        field,
                        format!("{t} is not a positive number"),
                    ));
                }
            }
        }
        Ok(())
    }
}
