//! What the autoscaler decides under: a service's [`Policy`] (its bounds
//! and targets, tolerance, windows and cooldowns), the defaults, and the
//! [`Timings`] that scale every window from one knob.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::state::AutoscalePolicy;

/// Relative distance from a target within which the count stays.
pub const DEFAULT_TOLERANCE: f64 = 0.10;
/// Scale-down follows the highest recommendation of this long.
pub const DEFAULT_SCALE_DOWN_WINDOW_MS: u64 = 60_000;
/// Between two scale-ups: HPA's 15 s policy period, and more than the
/// traffic window plus a report, so a step's effect is seen before the next.
pub const DEFAULT_SCALE_UP_COOLDOWN_MS: u64 = 15_000;
/// Between two scale-downs, so the load redistributes over the remaining
/// replicas and is measured again before removing more.
pub const DEFAULT_SCALE_DOWN_COOLDOWN_MS: u64 = 30_000;
/// One scale-up step at most multiplies the count by this...
pub const DEFAULT_SCALE_UP_FACTOR: f64 = 2.0;
/// ...or adds this many replicas, whichever is more (so small services,
/// and services at zero, grow quickly).
pub const DEFAULT_SCALE_UP_MIN_STEP: u32 = 4;
/// With `min == 0`: idle this long before going to zero. Long, because the
/// next request after it pays a cold start.
pub const DEFAULT_IDLE_WINDOW_MS: u64 = 300_000;
/// A metric older than this is missing: three of the agents' 2 s traffic
/// reports.
pub const DEFAULT_STALE_AFTER_MS: u64 = 6_000;
/// The window `aggregate_traffic` measures request rates over.
pub const DEFAULT_TRAFFIC_WINDOW_MS: u64 = 10_000;
/// A node's request rate comes from its counters only when its reports in
/// the window span at least this; otherwise from the rate it reported.
pub const MIN_RATE_SPAN_MS: u64 = 1_000;

/// What each replica should carry. `None`: not a target.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Targets {
    /// Requests per second per replica.
    pub rps: Option<f64>,
    /// Open connections per replica.
    pub concurrency: Option<f64>,
    /// Average CPU use, in percent of the replica's CPU limit.
    pub cpu_percent: Option<f64>,
}

impl Targets {
    /// From the spec's fields, where 0 means "not a target".
    pub fn from_spec(rps: f64, concurrency: f64, cpu_percent: f64) -> Self {
        let target = |value: f64| (value != 0.0).then_some(value);
        Targets {
            rps: target(rps),
            concurrency: target(concurrency),
            cpu_percent: target(cpu_percent),
        }
    }

    pub(super) fn has_traffic_target(&self) -> bool {
        self.rps.is_some() || self.concurrency.is_some()
    }
}

/// How one service scales. `Policy::new` fills in the defaults above.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Policy {
    pub min: u32,
    pub max: u32,
    pub targets: Targets,
    pub tolerance: f64,
    pub scale_down_window_ms: u64,
    pub scale_up_cooldown_ms: u64,
    pub scale_down_cooldown_ms: u64,
    pub scale_up_factor: f64,
    pub scale_up_min_step: u32,
    pub idle_window_ms: u64,
    pub stale_after_ms: u64,
}

/// Why a policy cannot be used.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum PolicyError {
    #[error("autoscale max must be at least 1")]
    ZeroMax,
    #[error("autoscale min {min} is above max {max}")]
    MinAboveMax { min: u32, max: u32 },
    #[error("autoscale needs at least one target (rps, concurrency or cpu)")]
    NoTarget,
    #[error("autoscale target {name} must be a positive number, not {value}")]
    BadTarget { name: &'static str, value: f64 },
    #[error("autoscale tolerance must be at least 0 and below 1, not {0}")]
    BadTolerance(f64),
    #[error("autoscale scale-up factor must be at least 1, not {0}")]
    BadScaleUpFactor(f64),
}

impl Policy {
    pub fn new(min: u32, max: u32, targets: Targets) -> Self {
        Policy {
            min,
            max,
            targets,
            tolerance: DEFAULT_TOLERANCE,
            scale_down_window_ms: DEFAULT_SCALE_DOWN_WINDOW_MS,
            scale_up_cooldown_ms: DEFAULT_SCALE_UP_COOLDOWN_MS,
            scale_down_cooldown_ms: DEFAULT_SCALE_DOWN_COOLDOWN_MS,
            scale_up_factor: DEFAULT_SCALE_UP_FACTOR,
            scale_up_min_step: DEFAULT_SCALE_UP_MIN_STEP,
            idle_window_ms: DEFAULT_IDLE_WINDOW_MS,
            stale_after_ms: DEFAULT_STALE_AFTER_MS,
        }
    }

    /// Checks what `decide` relies on; for spec validation. (`decide`
    /// itself never panics on an invalid policy: it ignores bad targets and
    /// treats `max < min` as `max == min`.)
    pub fn validate(&self) -> Result<(), PolicyError> {
        if self.max == 0 {
            return Err(PolicyError::ZeroMax);
        }
        if self.min > self.max {
            return Err(PolicyError::MinAboveMax {
                min: self.min,
                max: self.max,
            });
        }
        let mut any = false;
        for metric in Metric::ALL {
            if let Some(value) = metric.target(&self.targets) {
                if !(value.is_finite() && value > 0.0) {
                    return Err(PolicyError::BadTarget {
                        name: metric.name(),
                        value,
                    });
                }
                any = true;
            }
        }
        if !any {
            return Err(PolicyError::NoTarget);
        }
        if !(0.0..1.0).contains(&self.tolerance) {
            return Err(PolicyError::BadTolerance(self.tolerance));
        }
        if !(self.scale_up_factor >= 1.0 && self.scale_up_factor.is_finite()) {
            return Err(PolicyError::BadScaleUpFactor(self.scale_up_factor));
        }
        Ok(())
    }

    /// The most one scale-up step may reach from `current`.
    pub(super) fn step_limit(&self, current: u32) -> u32 {
        let factor = if self.scale_up_factor.is_finite() {
            self.scale_up_factor.max(1.0)
        } else {
            1.0
        };
        let multiplied = (f64::from(current) * factor).ceil() as u32;
        multiplied
            .max(current.saturating_add(self.scale_up_min_step))
            .max(current.saturating_add(1))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Metric {
    Rps,
    Concurrency,
    Cpu,
}

impl Metric {
    pub(super) const ALL: [Metric; 3] = [Metric::Rps, Metric::Concurrency, Metric::Cpu];

    pub(super) fn name(self) -> &'static str {
        match self {
            Metric::Rps => "rps",
            Metric::Concurrency => "concurrency",
            Metric::Cpu => "cpu",
        }
    }

    pub(super) fn target(self, targets: &Targets) -> Option<f64> {
        match self {
            Metric::Rps => targets.rps,
            Metric::Concurrency => targets.concurrency,
            Metric::Cpu => targets.cpu_percent,
        }
    }

    pub(super) fn show(self, value: f64) -> String {
        match self {
            Metric::Cpu => format!("{value:.1}%"),
            _ => format!("{value:.1}"),
        }
    }
}

/// The autoscaler's windows and cooldowns. One knob, the scale-down
/// stabilization window, sets all of them in the defaults' proportions
/// (60 s window: 15 s scale-up cooldown, 30 s scale-down cooldown, 300 s
/// idle before scaling to zero), so tests and benchmarks can run the same
/// policy faster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timings {
    pub scale_down_window_ms: u64,
    pub scale_up_cooldown_ms: u64,
    pub scale_down_cooldown_ms: u64,
    pub idle_window_ms: u64,
}

impl Timings {
    /// The defaults scaled so the stabilization window is `window`.
    pub fn from_window(window: Duration) -> Self {
        let window_ms = window.as_millis() as u64;
        let scale = |default_ms: u64| {
            (u128::from(default_ms) * u128::from(window_ms)
                / u128::from(DEFAULT_SCALE_DOWN_WINDOW_MS)) as u64
        };
        Timings {
            scale_down_window_ms: window_ms,
            scale_up_cooldown_ms: scale(DEFAULT_SCALE_UP_COOLDOWN_MS),
            scale_down_cooldown_ms: scale(DEFAULT_SCALE_DOWN_COOLDOWN_MS),
            idle_window_ms: scale(DEFAULT_IDLE_WINDOW_MS),
        }
    }

    /// The decision core's policy for a service's autoscale spec.
    pub fn policy(&self, spec: &AutoscalePolicy) -> Policy {
        let targets = Targets {
            rps: spec.target_rps,
            concurrency: spec.target_concurrency,
            cpu_percent: spec.target_cpu,
        };
        Policy {
            scale_down_window_ms: self.scale_down_window_ms,
            scale_up_cooldown_ms: self.scale_up_cooldown_ms,
            scale_down_cooldown_ms: self.scale_down_cooldown_ms,
            idle_window_ms: self.idle_window_ms,
            ..Policy::new(spec.min, spec.max, targets)
        }
    }
}

impl Default for Timings {
    fn default() -> Self {
        Timings::from_window(Duration::from_millis(DEFAULT_SCALE_DOWN_WINDOW_MS))
    }
}
