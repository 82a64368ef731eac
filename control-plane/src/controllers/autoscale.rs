//! The autoscaler decision for one service: its policy, what it runs now,
//! recent metric samples and the autoscaler's memory in; the desired replica
//! count and why out. Also the pure aggregation of the proxies' cumulative
//! traffic counters into those samples. No I/O and no clock: time comes in
//! as `now_ms`, and a leader-only loop feeds this and proposes the result.
//!
//! The rules follow the Kubernetes HPA:
//! - Each target turns its metric into a load measured in replicas,
//!   `load = total / target` (rps, concurrency) or
//!   `load = avg% × reporting / target%` (cpu), so
//!   `desired = ceil(current × per_replica / target)`. Within `tolerance`
//!   of the target the count stays; the highest recommendation of all
//!   targets wins, clamped to `[min, max]`.
//! - Replicas that are not ready are counted as carrying no load when
//!   scaling up (demand must exceed every replica already started, so a
//!   scale-up is not repeated while its replicas start) and as carrying
//!   exactly the target when scaling down (the measured load is what the
//!   ready ones could serve; a starting replica is never removed because it
//!   has no traffic yet).
//! - Scale-up acts at once, at most to `max(ceil(current × factor),
//!   current + min_step)` per step (HPA's default: +100% or +4 pods,
//!   whichever is more), then waits the scale-up cooldown so the new
//!   replicas' effect shows in the metrics.
//! - Scale-down takes the highest recommendation within the stabilization
//!   window, so it happens only once the load has stayed low for the whole
//!   window, and waits the scale-down cooldown between steps. A memory
//!   that has not watched a whole window (a new leader) never scales down.
//! - A metric whose newest sample is older than `stale_after_ms` (three
//!   traffic reports) is missing. A missing metric never scales anything;
//!   while any target's metric is missing the service never scales down,
//!   but another target's fresh metric may still scale it up (as the HPA).
//! - With `min == 0`, the service goes to zero only once it has had no
//!   requests and no connections for the whole idle window (with samples
//!   covering it without gaps); otherwise at least one replica stays. From
//!   zero, any demand (a waiting connection, a request, a connection) wakes
//!   it at once.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

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

    fn has_traffic_target(&self) -> bool {
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
    fn step_limit(&self, current: u32) -> u32 {
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

/// CPU use of the replicas that reported it.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct CpuSample {
    pub replicas_reporting: u32,
    /// Average over those replicas, in percent of a replica's CPU limit.
    pub percent_avg: f64,
}

/// One measurement of a whole service. `None`: not measured in this sample.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MetricSample {
    /// When the newest report in it was taken.
    pub at_ms: u64,
    /// Requests per second to the service, summed over all proxies.
    pub total_rps: Option<f64>,
    /// Connections open to the service, summed over all proxies.
    pub total_active: Option<f64>,
    pub cpu: Option<CpuSample>,
}

/// What the service runs now, and how it is loaded.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Observed<'a> {
    /// The replica count the service is at (the one the autoscaler sets).
    pub current: u32,
    /// Of those, the ones serving. The rest (`current - ready`: placing,
    /// starting, or failing) are the not-yet-ready ones; what keeps them
    /// from serving does not change how they count.
    pub ready: u32,
    /// Connections waiting for a replica (held by a proxy, or turned away
    /// for lack of one within the traffic window). Counted as concurrency,
    /// and any of it wakes a service at zero.
    pub waiting_connections: u64,
    /// Recent samples, in any order; those older than the idle window (or
    /// `stale_after_ms`, without `min == 0`) are not needed.
    pub samples: &'a [MetricSample],
}

/// What to do with one service's replica count.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// The count the decision started from (`Observed::current`).
    pub current: u32,
    pub desired: u32,
    /// `desired != current`.
    pub changed: bool,
    /// Metric, value and target that drove it, then what held it back:
    /// "concurrency 3.9/replica > target 1.0; limited to 6 this step".
    pub reason: String,
    /// What the metrics asked for (clamped to `[min, max]`) before the
    /// step limit, cooldowns and stabilization; remembered for the
    /// stabilization window.
    pub recommendation: u32,
}

/// A recommendation, as remembered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recommendation {
    pub at_ms: u64,
    pub replicas: u32,
}

/// What the autoscaler remembers of one service between decisions.
/// `Default` is a fresh memory, as a new leader has.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Memory {
    /// Recommendations within the stabilization window, oldest first. Only
    /// those that may still be the highest of a later window are kept (each
    /// is higher than every newer one), which bounds the list.
    pub recommendations: VecDeque<Recommendation>,
    /// The first decision recorded.
    pub watching_since_ms: Option<u64>,
    pub last_scale_up_ms: Option<u64>,
    pub last_scale_down_ms: Option<u64>,
}

impl Memory {
    /// Records a decision that was carried out: its recommendation and,
    /// when it changed the count, the time for the cooldowns.
    pub fn record(&mut self, policy: &Policy, decision: &Decision, now_ms: u64) {
        self.record_recommendation(policy, decision.recommendation, now_ms);
        if decision.desired > decision.current {
            self.last_scale_up_ms = Some(now_ms);
        } else if decision.desired < decision.current {
            self.last_scale_down_ms = Some(now_ms);
        }
    }

    /// Records only a recommendation: for a decision that could not be
    /// carried out, so no cooldown starts.
    pub fn record_recommendation(&mut self, policy: &Policy, replicas: u32, now_ms: u64) {
        self.watching_since_ms.get_or_insert(now_ms);
        while self
            .recommendations
            .back()
            .is_some_and(|r| r.replicas <= replicas)
        {
            self.recommendations.pop_back();
        }
        self.recommendations.push_back(Recommendation {
            at_ms: now_ms,
            replicas,
        });
        let from = now_ms.saturating_sub(policy.scale_down_window_ms);
        while self.recommendations.front().is_some_and(|r| r.at_ms < from) {
            self.recommendations.pop_front();
        }
    }

    fn highest_since(&self, from_ms: u64) -> Option<u32> {
        self.recommendations
            .iter()
            .filter(|r| r.at_ms >= from_ms)
            .map(|r| r.replicas)
            .max()
    }

    fn watched_for(&self, window_ms: u64, now_ms: u64) -> bool {
        self.watching_since_ms
            .is_some_and(|since| now_ms.saturating_sub(since) >= window_ms)
    }

    fn cooling_down(last: Option<u64>, cooldown_ms: u64, now_ms: u64) -> Option<u64> {
        let left = cooldown_ms.saturating_sub(now_ms.saturating_sub(last?));
        (left > 0).then_some(left)
    }
}

/// Decides `observed`'s replica count under `policy` at `now_ms`. Record
/// the result with `Memory::record` once it is carried out.
pub fn decide(policy: &Policy, observed: &Observed<'_>, memory: &Memory, now_ms: u64) -> Decision {
    let current = observed.current;
    let upper = policy.max.max(policy.min);
    let tolerance = if policy.tolerance.is_finite() {
        policy.tolerance.clamp(0.0, 0.99)
    } else {
        DEFAULT_TOLERANCE
    };
    let signals: Vec<Signal> = Metric::ALL
        .iter()
        .filter_map(|&metric| Signal::measure(metric, policy, observed, now_ms))
        .collect();
    if current == 0 {
        return decide_at_zero(policy, observed, &signals, now_ms);
    }
    let missing: Vec<&str> = signals
        .iter()
        .filter(|s| s.load.is_none())
        .map(|s| s.metric.name())
        .collect();
    let idle = policy.min == 0
        && policy.targets.has_traffic_target()
        && missing.is_empty()
        && observed.waiting_connections == 0
        && idle_throughout(
            observed.samples,
            now_ms.saturating_sub(policy.idle_window_ms),
            now_ms,
            policy.stale_after_ms,
        );

    // What the metrics ask for, and which one asks for the most.
    let mut notes = Vec::new();
    let mut recommendation = current;
    let mut reason = String::new();
    for signal in &signals {
        if let Some((replicas, why)) = signal.recommend(current, tolerance) {
            if reason.is_empty() || replicas > recommendation {
                recommendation = replicas;
                reason = why;
            }
        }
    }
    if signals.is_empty() {
        reason = "no usable target".to_string();
    } else if reason.is_empty() {
        reason = format!("no fresh {} metrics", missing.join(", "));
    } else if !missing.is_empty() && recommendation < current {
        recommendation = current;
        notes.push(format!(
            "not scaling down while {} metrics are missing",
            missing.join(", ")
        ));
    }
    let lower = if idle {
        0
    } else {
        policy.min.max(1).min(upper)
    };
    if idle {
        recommendation = 0;
        reason = format!(
            "idle (no requests, no connections) for {}s",
            policy.idle_window_ms / 1000
        );
    } else if recommendation > upper {
        notes.push(format!("held at max {upper}"));
    } else if recommendation < lower && policy.min == 0 {
        notes.push(format!(
            "held at 1 until idle for {}s",
            policy.idle_window_ms / 1000
        ));
    } else if recommendation < lower {
        notes.push(format!("held at min {lower}"));
    }
    let recommendation = recommendation.clamp(lower, upper);

    let desired = if recommendation > current {
        // Up: at once to at least min; beyond that, a step at a time.
        let floor = lower.max(current);
        let stepped = recommendation.min(policy.step_limit(current).max(floor));
        let cooldown =
            Memory::cooling_down(memory.last_scale_up_ms, policy.scale_up_cooldown_ms, now_ms);
        if let Some(left) = cooldown {
            notes.push(format!("scale-up cooldown ({}s left)", left.div_ceil(1000)));
            floor
        } else {
            if stepped < recommendation {
                notes.push(format!("limited to {stepped} this step"));
            }
            stepped
        }
    } else if recommendation < current && idle {
        0
    } else if recommendation < current {
        // Down: at once to at most max; beyond that, only as low as the
        // highest recommendation of the window.
        let ceiling = current.min(upper);
        if ceiling < current {
            notes.push(format!("above max {upper}"));
        }
        let window = policy.scale_down_window_ms;
        let highest = memory
            .highest_since(now_ms.saturating_sub(window))
            .map_or(recommendation, |h| h.max(recommendation));
        let cooldown = Memory::cooling_down(
            memory.last_scale_down_ms,
            policy.scale_down_cooldown_ms,
            now_ms,
        );
        if !memory.watched_for(window, now_ms) {
            notes.push(format!(
                "stabilizing: watched {}s of the {}s window",
                now_ms.saturating_sub(memory.watching_since_ms.unwrap_or(now_ms)) / 1000,
                window / 1000
            ));
            ceiling
        } else if highest >= ceiling {
            if ceiling == current {
                notes.push(format!(
                    "stabilizing: {highest} recommended within the last {}s",
                    window / 1000
                ));
            }
            ceiling
        } else if let Some(left) = cooldown {
            notes.push(format!(
                "scale-down cooldown ({}s left)",
                left.div_ceil(1000)
            ));
            ceiling
        } else {
            if highest > recommendation {
                notes.push(format!(
                    "stabilized at {highest}, the highest within the last {}s",
                    window / 1000
                ));
            }
            highest
        }
    } else {
        current
    };

    if !notes.is_empty() {
        reason = format!("{reason}; {}", notes.join("; "));
    }
    Decision {
        current,
        desired,
        changed: desired != current,
        reason,
        recommendation,
    }
}

/// At zero replicas no per-replica ratio exists: any demand wakes the
/// service at once (no cooldown), to what the load asks for within one
/// step; no demand keeps it at zero (with `min == 0`).
fn decide_at_zero(
    policy: &Policy,
    observed: &Observed<'_>,
    signals: &[Signal],
    now_ms: u64,
) -> Decision {
    let upper = policy.max.max(policy.min);
    let newest_traffic = observed
        .samples
        .iter()
        .filter(|s| s.total_rps.is_some() || s.total_active.is_some())
        .max_by_key(|s| s.at_ms)
        .filter(|s| now_ms.saturating_sub(s.at_ms) <= policy.stale_after_ms);
    let (rps, active) = newest_traffic.map_or((0.0, 0.0), |s| {
        (s.total_rps.unwrap_or(0.0), s.total_active.unwrap_or(0.0))
    });
    let demand = if observed.waiting_connections > 0 {
        Some(format!(
            "{} connections waiting at zero replicas",
            observed.waiting_connections
        ))
    } else if rps > 0.0 {
        Some(format!("rps {rps:.1} at zero replicas"))
    } else if active > 0.0 {
        Some(format!("concurrency {active:.1} at zero replicas"))
    } else {
        None
    };
    let lower = policy.min.min(upper);
    let (wanted, mut reason) = match demand {
        Some(why) => {
            let load = signals.iter().filter_map(|s| s.load).fold(0.0, f64::max);
            (ceil_replicas(load).max(1), why)
        }
        None if lower > 0 => (lower, format!("below min {lower}")),
        None => (0, "no demand at zero replicas".to_string()),
    };
    if wanted > upper {
        reason = format!("{reason}; held at max {upper}");
    }
    let recommendation = wanted.clamp(lower, upper);
    let desired = recommendation.min(policy.step_limit(0).max(lower));
    if desired < recommendation {
        reason = format!("{reason}; limited to {desired} this step");
    }
    Decision {
        current: 0,
        desired,
        changed: desired != 0,
        reason,
        recommendation,
    }
}

/// Whether traffic samples cover `[from_ms, now_ms]` without a gap longer
/// than `stale_after_ms`, starting from the last one taken at or before
/// `from_ms`, and every one of those shows no requests and no connections.
fn idle_throughout(
    samples: &[MetricSample],
    from_ms: u64,
    now_ms: u64,
    stale_after_ms: u64,
) -> bool {
    let quiet = |v: Option<f64>| v.is_none_or(|v| v <= 0.0);
    let mut traffic: Vec<(u64, bool)> = samples
        .iter()
        .filter(|s| s.total_rps.is_some() || s.total_active.is_some())
        .map(|s| {
            (
                s.at_ms.min(now_ms),
                quiet(s.total_rps) && quiet(s.total_active),
            )
        })
        .collect();
    traffic.sort_unstable();
    let Some(start) = traffic.iter().rposition(|(at, _)| *at <= from_ms) else {
        return false;
    };
    let mut covered_to = from_ms;
    for &(at, quiet) in &traffic[start..] {
        if !quiet || at.saturating_sub(covered_to) > stale_after_ms {
            return false;
        }
        covered_to = at;
    }
    from_ms - traffic[start].0 <= stale_after_ms && now_ms - covered_to <= stale_after_ms
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Metric {
    Rps,
    Concurrency,
    Cpu,
}

impl Metric {
    const ALL: [Metric; 3] = [Metric::Rps, Metric::Concurrency, Metric::Cpu];

    fn name(self) -> &'static str {
        match self {
            Metric::Rps => "rps",
            Metric::Concurrency => "concurrency",
            Metric::Cpu => "cpu",
        }
    }

    fn target(self, targets: &Targets) -> Option<f64> {
        match self {
            Metric::Rps => targets.rps,
            Metric::Concurrency => targets.concurrency,
            Metric::Cpu => targets.cpu_percent,
        }
    }

    fn show(self, value: f64) -> String {
        match self {
            Metric::Cpu => format!("{value:.1}%"),
            _ => format!("{value:.1}"),
        }
    }
}

/// One target's view of the service.
#[derive(Clone, Copy, Debug)]
struct Signal {
    metric: Metric,
    target: f64,
    /// The load in replicas' worth (`None`: missing or stale).
    load: Option<f64>,
    /// Replicas whose load `load` does not include: counted as idle for
    /// scale-up and as at the target for scale-down.
    unknown: u32,
}

impl Signal {
    /// `None` when `metric` is not a (usable) target.
    fn measure(
        metric: Metric,
        policy: &Policy,
        observed: &Observed<'_>,
        now_ms: u64,
    ) -> Option<Signal> {
        let target = metric
            .target(&policy.targets)
            .filter(|t| t.is_finite() && *t > 0.0)?;
        let newest = observed
            .samples
            .iter()
            .filter_map(|s| {
                let value = match metric {
                    Metric::Rps => s.total_rps.map(|rps| (rps, observed.ready)),
                    Metric::Concurrency => s.total_active.map(|active| {
                        (active + observed.waiting_connections as f64, observed.ready)
                    }),
                    Metric::Cpu => s.cpu.map(|c| {
                        (
                            c.percent_avg * f64::from(c.replicas_reporting),
                            c.replicas_reporting,
                        )
                    }),
                }?;
                Some((s.at_ms, value))
            })
            .max_by_key(|(at, _)| *at)
            .filter(|(at, _)| now_ms.saturating_sub(*at) <= policy.stale_after_ms)
            .filter(|(_, (total, _))| total.is_finite());
        Some(Signal {
            metric,
            target,
            load: newest.map(|(_, (total, _))| total.max(0.0) / target),
            unknown: newest.map_or(0, |(_, (_, known))| observed.current.saturating_sub(known)),
        })
    }

    /// The count this target asks for at `current > 0`, and why.
    fn recommend(&self, current: u32, tolerance: f64) -> Option<(u32, String)> {
        let load = self.load?;
        let replicas = f64::from(current);
        let name = self.metric.name();
        let target = self.metric.show(self.target);
        let per_replica = |load: f64| self.metric.show(load * self.target / replicas);
        Some(if load > replicas * (1.0 + tolerance) {
            (
                ceil_replicas(load),
                format!("{name} {}/replica > target {target}", per_replica(load)),
            )
        } else if load + f64::from(self.unknown) < replicas * (1.0 - tolerance) {
            let counted = load + f64::from(self.unknown);
            let mut why = format!("{name} {}/replica < target {target}", per_replica(counted));
            if self.unknown > 0 {
                why.push_str(&format!(" ({} not ready, counted at target)", self.unknown));
            }
            (ceil_replicas(counted), why)
        } else {
            (
                current,
                format!(
                    "{name} {}/replica within {:.0}% of target {target}",
                    per_replica(load),
                    tolerance * 100.0
                ),
            )
        })
    }
}

/// Replicas needed for `load` (a hair of float error does not add one).
fn ceil_replicas(load: f64) -> u32 {
    (load - 1e-9).ceil().max(0.0) as u32
}

/// One proxy's report for one service: cumulative counters since its agent
/// started, as the control plane received them. From a
/// `skiff_proto::v1::ServiceTraffic`: `node`, `at_ms = now_ms - age_ms`,
/// `requests` (or `connections` for a service without HTTP requests),
/// `active`, `turned_away = no_endpoint`, `request_rate`, `waiting`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodeTraffic {
    pub node: String,
    pub at_ms: u64,
    /// Requests since the agent started.
    pub requests: u64,
    /// Connections open now.
    pub active: u64,
    /// Connections closed at once since the agent started, because no
    /// replica was serving.
    pub turned_away: u64,
    /// Requests per second since the agent's previous report.
    pub request_rate: f64,
    /// Connections held now, waiting for a replica (a gauge).
    pub waiting: u64,
}

/// A service's traffic over a window, summed over nodes.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct TrafficSample {
    /// The newest report in it.
    pub at_ms: u64,
    /// Nodes that reported within the window.
    pub nodes: u32,
    pub rps: f64,
    /// Connections open, from each node's newest report.
    pub active: u64,
    /// Connections turned away for lack of a replica within the window:
    /// demand for `Observed::waiting_connections`.
    pub turned_away: u64,
    /// Connections held waiting for a replica, from each node's newest
    /// report: demand for `Observed::waiting_connections` too.
    pub waiting: u64,
}

impl TrafficSample {
    pub fn metric_sample(&self) -> MetricSample {
        MetricSample {
            at_ms: self.at_ms,
            total_rps: Some(self.rps),
            total_active: Some(self.active as f64),
            cpu: None,
        }
    }
}

/// Sums one service's traffic over the reports taken within `window_ms`
/// before `now_ms` (several per node, in any order; repeated copies of a
/// report are harmless). `None` when no node reported in the window.
///
/// A node's rate is the increase of its counter over the span of its
/// reports; a counter that went down means its agent restarted, and its new
/// value is what was counted since (what came between the previous report
/// and the restart is lost, as with Prometheus' `rate`). With reports
/// spanning less than `MIN_RATE_SPAN_MS`, the node's own reported rate is
/// used. Open and waiting connections are gauges: each node's newest value.
pub fn aggregate_traffic(
    reports: &[NodeTraffic],
    now_ms: u64,
    window_ms: u64,
) -> Option<TrafficSample> {
    let from = now_ms.saturating_sub(window_ms);
    let mut by_node: BTreeMap<&str, Vec<&NodeTraffic>> = BTreeMap::new();
    for report in reports.iter().filter(|r| r.at_ms.min(now_ms) >= from) {
        by_node.entry(&report.node).or_default().push(report);
    }
    let mut sample = TrafficSample::default();
    for reports in by_node.values_mut() {
        reports.sort_by_key(|r| r.at_ms);
        let (first, last) = (reports[0], reports[reports.len() - 1]);
        let span = last.at_ms.min(now_ms).saturating_sub(first.at_ms);
        sample.rps += if span >= MIN_RATE_SPAN_MS {
            increase(reports.iter().map(|r| r.requests)) as f64 * 1000.0 / span as f64
        } else if last.request_rate.is_finite() {
            last.request_rate.max(0.0)
        } else {
            0.0
        };
        sample.active = sample.active.saturating_add(last.active);
        sample.waiting = sample.waiting.saturating_add(last.waiting);
        sample.turned_away = sample
            .turned_away
            .saturating_add(increase(reports.iter().map(|r| r.turned_away)));
        sample.at_ms = sample.at_ms.max(last.at_ms.min(now_ms));
        sample.nodes += 1;
    }
    (sample.nodes > 0).then_some(sample)
}

/// How much a cumulative counter grew over consecutive readings, counting
/// a drop as a restart from zero.
fn increase(readings: impl Iterator<Item = u64>) -> u64 {
    let mut total = 0u64;
    let mut previous: Option<u64> = None;
    for value in readings {
        if let Some(previous) = previous {
            let grew = if value >= previous {
                value - previous
            } else {
                value
            };
            total = total.saturating_add(grew);
        }
        previous = Some(value);
    }
    total
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    const T0: u64 = 1_000_000_000;
    const SECOND: u64 = 1_000;

    fn concurrency(target: f64) -> Targets {
        Targets {
            concurrency: Some(target),
            ..Targets::default()
        }
    }

    fn rps(target: f64) -> Targets {
        Targets {
            rps: Some(target),
            ..Targets::default()
        }
    }

    fn traffic(at_ms: u64, rps: f64, active: f64) -> MetricSample {
        MetricSample {
            at_ms,
            total_rps: Some(rps),
            total_active: Some(active),
            cpu: None,
        }
    }

    /// A service driven once a second, whose new replicas are ready after
    /// `start_delay_ms`, as the loop would drive it.
    struct Sim {
        policy: Policy,
        memory: Memory,
        samples: Vec<MetricSample>,
        current: u32,
        ready: u32,
        started: Vec<u64>,
        start_delay_ms: u64,
        now: u64,
        changes: Vec<(u64, u32, u32)>,
    }

    impl Sim {
        fn new(policy: Policy, current: u32) -> Self {
            Sim {
                policy,
                memory: Memory::default(),
                samples: Vec::new(),
                current,
                ready: current,
                started: Vec::new(),
                start_delay_ms: 0,
                now: T0,
                changes: Vec::new(),
            }
        }

        /// One second passes; `sample` (if any) is measured now.
        fn tick(&mut self, sample: Option<(f64, f64)>, waiting: u64) -> Decision {
            self.now += SECOND;
            let now = self.now;
            let delay = self.start_delay_ms;
            let became_ready = self.started.iter().filter(|&&at| at + delay <= now).count();
            self.started.retain(|&at| at + delay > now);
            self.ready = (self.ready + became_ready as u32).min(self.current);
            if let Some((rps, active)) = sample {
                self.samples.push(traffic(now, rps, active));
            }
            let keep = self.policy.idle_window_ms + self.policy.stale_after_ms;
            self.samples.retain(|s| s.at_ms + keep >= now);
            let observed = Observed {
                current: self.current,
                ready: self.ready,
                waiting_connections: waiting,
                samples: &self.samples,
            };
            let decision = decide(&self.policy, &observed, &self.memory, now);
            self.memory.record(&self.policy, &decision, now);
            if decision.changed {
                self.changes.push((now, decision.current, decision.desired));
                if decision.desired > self.current {
                    for _ in self.current..decision.desired {
                        self.started.push(now);
                    }
                } else {
                    self.ready = self.ready.min(decision.desired);
                    self.started
                        .truncate(decision.desired.saturating_sub(self.ready) as usize);
                }
                self.current = decision.desired;
            }
            decision
        }

        /// Ticks with a steady `(rps, active)` for `seconds`.
        fn run(&mut self, seconds: u64, rps: f64, active: f64) -> Decision {
            let mut last = None;
            for _ in 0..seconds {
                last = Some(self.tick(Some((rps, active)), 0));
            }
            last.expect("at least one tick")
        }
    }

    #[test]
    fn steady_load_within_tolerance_never_scales() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut sim = Sim::new(Policy::new(1, 20, concurrency(10.0)), 4);
        for _ in 0..600 {
            let active = 40.0 * rng.gen_range(0.91..1.09);
            let decision = sim.tick(Some((0.0, active)), 0);
            assert!(!decision.changed, "{decision:?}");
            assert!(
                decision.reason.contains("within 10% of target 10.0"),
                "{decision:?}"
            );
        }
        assert_eq!(sim.current, 4);
    }

    #[test]
    fn a_step_up_reaches_the_right_count_in_two_steps() {
        let mut sim = Sim::new(Policy::new(1, 20, concurrency(1.0)), 2);
        sim.start_delay_ms = 5 * SECOND;
        sim.run(120, 0.0, 2.0);
        assert!(sim.changes.is_empty());

        let first = sim.tick(Some((0.0, 10.0)), 0);
        assert_eq!(first.desired, 6, "max(2 × 2, 2 + 4)");
        assert_eq!(
            first.reason,
            "concurrency 5.0/replica > target 1.0; limited to 6 this step"
        );
        assert_eq!(first.recommendation, 10);
        sim.run(60, 0.0, 10.0);
        assert_eq!(sim.current, 10);
        assert_eq!(sim.changes.len(), 2, "{:?}", sim.changes);
        let (first_at, second_at) = (sim.changes[0].0, sim.changes[1].0);
        assert_eq!(second_at - first_at, DEFAULT_SCALE_UP_COOLDOWN_MS);
    }

    #[test]
    fn a_small_step_up_takes_one_step() {
        let mut sim = Sim::new(Policy::new(1, 20, rps(10.0)), 4);
        sim.run(30, 40.0, 0.0);
        let decision = sim.tick(Some((65.0, 0.0)), 0);
        assert_eq!(decision.desired, 7);
        assert_eq!(decision.reason, "rps 16.2/replica > target 10.0");
        sim.run(300, 65.0, 0.0);
        assert_eq!(sim.changes.len(), 1);
    }

    #[test]
    fn a_drop_scales_down_only_after_the_stabilization_window() {
        let mut sim = Sim::new(Policy::new(1, 20, rps(10.0)), 10);
        sim.run(120, 100.0, 0.0);
        let drop_at = sim.now + SECOND;
        for _ in 0..59 {
            let decision = sim.tick(Some((30.0, 0.0)), 0);
            assert!(!decision.changed, "{decision:?}");
            assert_eq!(decision.recommendation, 3);
        }
        let held = sim.tick(Some((30.0, 0.0)), 0);
        assert_eq!(held.desired, 10);
        assert_eq!(
            held.reason,
            "rps 3.0/replica < target 10.0; stabilizing: 10 recommended within the last 60s"
        );
        let decision = sim.tick(Some((30.0, 0.0)), 0);
        assert_eq!(decision.desired, 3, "{decision:?}");
        assert_eq!(sim.now - drop_at, DEFAULT_SCALE_DOWN_WINDOW_MS);
    }

    #[test]
    fn scale_down_follows_the_highest_recommendation_of_the_window() {
        let mut sim = Sim::new(Policy::new(1, 20, rps(10.0)), 10);
        sim.run(120, 100.0, 0.0);
        sim.run(30, 60.0, 0.0); // asks for 6
        sim.run(40, 20.0, 0.0); // asks for 2
                                // 60 s after the load left 100, the window still holds the 6.
        assert_eq!(sim.changes, vec![(T0 + 181 * SECOND, 10, 6)]);
        // The cooldown after that step, then the 2 once the 6 left the window.
        sim.run(60, 20.0, 0.0);
        assert_eq!(sim.changes[1], (T0 + 211 * SECOND, 6, 2));
    }

    #[test]
    fn scale_downs_wait_for_the_cooldown() {
        let mut policy = Policy::new(1, 20, rps(10.0));
        policy.scale_down_window_ms = 0;
        let mut sim = Sim::new(policy, 10);
        sim.run(60, 100.0, 0.0);
        sim.run(1, 50.0, 0.0);
        assert_eq!(sim.current, 5);
        let decision = sim.run(29, 20.0, 0.0);
        assert_eq!(sim.current, 5);
        assert!(
            decision.reason.ends_with("scale-down cooldown (1s left)"),
            "{decision:?}"
        );
        sim.run(1, 20.0, 0.0);
        assert_eq!(sim.current, 2);
    }

    #[test]
    fn min_and_max_are_honoured() {
        let mut sim = Sim::new(Policy::new(2, 5, rps(10.0)), 3);
        let decision = sim.run(60, 1000.0, 0.0);
        assert_eq!(sim.current, 5);
        assert!(decision
            .reason
            .starts_with("rps 200.0/replica > target 10.0; held at max 5"));
        let decision = sim.run(600, 0.0, 0.0);
        assert_eq!(sim.current, 2);
        assert!(decision.reason.contains("held at min 2"), "{decision:?}");

        // A count outside the bounds (the policy changed) moves at once,
        // whatever the window and the cooldowns say.
        let memory = sim.memory.clone();
        let samples = [traffic(sim.now, 10.0, 0.0)];
        let above = Observed {
            current: 9,
            ready: 9,
            waiting_connections: 0,
            samples: &samples,
        };
        let fresh = Memory::default();
        let decision = decide(&sim.policy, &above, &fresh, sim.now);
        assert_eq!(decision.desired, 5);
        assert!(decision.reason.contains("above max 5"), "{decision:?}");
        // With the window's recommendations known, straight to them.
        assert_eq!(decide(&sim.policy, &above, &memory, sim.now).desired, 2);
        let below = Observed {
            current: 1,
            ready: 1,
            ..above
        };
        assert_eq!(decide(&sim.policy, &below, &memory, sim.now).desired, 2);
        let busy = [traffic(sim.now, 1000.0, 0.0)];
        let below_and_busy = Observed {
            samples: &busy,
            ..below
        };
        let mut cooling = memory.clone();
        cooling.last_scale_up_ms = Some(sim.now);
        assert_eq!(
            decide(&sim.policy, &below_and_busy, &cooling, sim.now).desired,
            2
        );
    }

    #[test]
    fn missing_metrics_never_scale_down_nor_up() {
        let mut sim = Sim::new(Policy::new(1, 20, rps(10.0)), 5);
        sim.run(120, 50.0, 0.0);
        for _ in 0..300 {
            let decision = sim.tick(None, 0);
            assert!(!decision.changed, "{decision:?}");
        }
        assert_eq!(sim.tick(None, 0).reason, "no fresh rps metrics");

        // A stale sample, high or low, moves nothing.
        let memory = sim.memory.clone();
        let now = sim.now;
        for rps in [0.0, 500.0] {
            let samples = [traffic(now - DEFAULT_STALE_AFTER_MS - 1, rps, 0.0)];
            let observed = Observed {
                current: 5,
                ready: 5,
                waiting_connections: 0,
                samples: &samples,
            };
            let decision = decide(&sim.policy, &observed, &memory, now);
            assert_eq!(decision.desired, 5, "{decision:?}");
        }
    }

    #[test]
    fn one_missing_metric_blocks_scale_down_but_not_scale_up() {
        let policy = Policy::new(
            1,
            20,
            Targets {
                rps: Some(10.0),
                cpu_percent: Some(60.0),
                ..Targets::default()
            },
        );
        let mut memory = Memory::default();
        memory.record_recommendation(&policy, 5, T0);
        let now = T0 + 600 * SECOND;
        let low = [traffic(now, 10.0, 0.0)];
        let observed = Observed {
            current: 5,
            ready: 5,
            waiting_connections: 0,
            samples: &low,
        };
        let decision = decide(&policy, &observed, &memory, now);
        assert_eq!(decision.desired, 5);
        assert_eq!(
            decision.reason,
            "rps 2.0/replica < target 10.0; not scaling down while cpu metrics are missing"
        );
        let high = [traffic(now, 80.0, 0.0)];
        let decision = decide(
            &policy,
            &Observed {
                samples: &high,
                ..observed
            },
            &memory,
            now,
        );
        assert_eq!(decision.desired, 8);
    }

    #[test]
    fn a_new_leader_does_not_scale_down_before_watching_a_whole_window() {
        let mut sim = Sim::new(Policy::new(1, 20, rps(10.0)), 10);
        let decision = sim.run(60, 20.0, 0.0);
        assert!(!decision.changed);
        assert!(decision
            .reason
            .contains("stabilizing: watched 59s of the 60s window"));
        sim.run(1, 20.0, 0.0);
        assert_eq!(sim.current, 2);
    }

    #[test]
    fn not_ready_replicas_carry_no_load_up_and_the_target_down() {
        let policy = Policy::new(1, 20, concurrency(1.0));
        let mut memory = Memory::default();
        memory.record_recommendation(&policy, 6, T0);
        let now = T0 + 600 * SECOND;
        let decide_at = |active: f64| {
            let samples = [traffic(now, 0.0, active)];
            let observed = Observed {
                current: 6,
                ready: 3,
                waiting_connections: 0,
                samples: &samples,
            };
            decide(&policy, &observed, &memory, now)
        };
        // 4 connections on 3 ready replicas: more than their target, but
        // less than the 6 started, so no second scale-up while 3 start...
        assert_eq!(decide_at(4.0).desired, 6);
        // ...and the 3 starting count at target, so no scale-down to 3.
        assert_eq!(decide_at(3.0).desired, 6);
        // Less than the ready ones' share: down, keeping the starting ones.
        let decision = decide_at(1.0);
        assert_eq!(decision.desired, 4);
        assert_eq!(
            decision.reason,
            "concurrency 0.7/replica < target 1.0 (3 not ready, counted at target)"
        );
        // More than all 6 could carry: up.
        assert_eq!(decide_at(8.0).desired, 8);
    }

    #[test]
    fn an_idle_service_scales_to_zero_after_the_idle_window() {
        let mut sim = Sim::new(Policy::new(0, 10, concurrency(5.0)), 3);
        sim.run(120, 30.0, 12.0);
        assert_eq!(sim.current, 3);
        let idle_from = sim.now + SECOND;
        let mut went_to_zero = None;
        for _ in 0..400 {
            sim.tick(Some((0.0, 0.0)), 0);
            if sim.current == 0 {
                went_to_zero = Some(sim.now);
                break;
            }
            assert!(sim.current >= 1, "never zero before the idle window");
        }
        let at = went_to_zero.expect("scaled to zero");
        assert_eq!(at - idle_from, DEFAULT_IDLE_WINDOW_MS);
        assert_eq!(sim.changes[0].2, 1, "down to 1 after the window first");
        // Stays at zero without demand.
        sim.run(600, 0.0, 0.0);
        assert_eq!(sim.current, 0);
    }

    #[test]
    fn a_gap_in_the_samples_restarts_the_idle_window() {
        let mut sim = Sim::new(Policy::new(0, 10, rps(5.0)), 1);
        sim.run(200, 0.0, 0.0);
        for _ in 0..10 {
            sim.tick(None, 0);
        }
        sim.run(300, 0.0, 0.0);
        assert_eq!(sim.current, 1);
        sim.run(1, 0.0, 0.0);
        assert_eq!(sim.current, 0);
    }

    #[test]
    fn a_waiting_connection_wakes_a_service_at_zero_at_once() {
        let policy = Policy::new(0, 10, concurrency(1.0));
        // Just scaled up: the cooldown does not delay waking.
        let memory = Memory {
            last_scale_up_ms: Some(T0),
            ..Memory::default()
        };
        let idle = Observed {
            current: 0,
            ready: 0,
            waiting_connections: 0,
            samples: &[],
        };
        // Nothing known (a new leader) and no demand: stays at zero.
        let decision = decide(&policy, &idle, &memory, T0 + SECOND);
        assert_eq!((decision.desired, decision.changed), (0, false));

        let waiting = Observed {
            waiting_connections: 1,
            ..idle
        };
        let decision = decide(&policy, &waiting, &memory, T0 + SECOND);
        assert_eq!((decision.desired, decision.changed), (1, true));
        assert_eq!(decision.reason, "1 connections waiting at zero replicas");

        // A crowd wakes more at once, within one step from zero.
        let samples = [traffic(T0, 0.0, 0.0)];
        let crowd = Observed {
            waiting_connections: 9,
            samples: &samples,
            ..idle
        };
        let decision = decide(&policy, &crowd, &memory, T0 + SECOND);
        assert_eq!(decision.desired, 4);
        assert_eq!(decision.recommendation, 9);
    }

    #[test]
    fn requests_wake_a_service_at_zero() {
        let policy = Policy::new(0, 10, rps(10.0));
        let samples = [traffic(T0, 25.0, 0.0)];
        let observed = Observed {
            current: 0,
            ready: 0,
            waiting_connections: 0,
            samples: &samples,
        };
        let decision = decide(&policy, &observed, &Memory::default(), T0);
        assert_eq!(decision.desired, 3);
        assert_eq!(decision.reason, "rps 25.0 at zero replicas");
    }

    #[test]
    fn min_above_zero_is_restored_from_zero() {
        let policy = Policy::new(2, 10, rps(10.0));
        let observed = Observed::default();
        let decision = decide(&policy, &observed, &Memory::default(), T0);
        assert_eq!(decision.desired, 2);
        assert_eq!(decision.reason, "below min 2");
    }

    #[test]
    fn cpu_counts_replicas_without_a_report_like_not_ready_ones() {
        let policy = Policy::new(
            1,
            20,
            Targets {
                cpu_percent: Some(50.0),
                ..Targets::default()
            },
        );
        let mut memory = Memory::default();
        memory.record_recommendation(&policy, 4, T0);
        let now = T0 + 600 * SECOND;
        let decide_at = |percent_avg: f64| {
            let samples = [MetricSample {
                at_ms: now,
                cpu: Some(CpuSample {
                    replicas_reporting: 2,
                    percent_avg,
                }),
                ..MetricSample::default()
            }];
            let observed = Observed {
                current: 4,
                ready: 4,
                waiting_connections: 0,
                samples: &samples,
            };
            decide(&policy, &observed, &memory, now)
        };
        let decision = decide_at(150.0);
        assert_eq!(decision.desired, 6);
        assert_eq!(decision.reason, "cpu 75.0%/replica > target 50.0%");
        assert_eq!(decide_at(90.0).desired, 4);
        assert_eq!(decide_at(10.0).desired, 3);
    }

    fn report(node: &str, at_ms: u64, requests: u64, active: u64) -> NodeTraffic {
        NodeTraffic {
            node: node.into(),
            at_ms,
            requests,
            active,
            turned_away: 0,
            request_rate: 0.0,
            waiting: 0,
        }
    }

    #[test]
    fn a_counter_reset_counts_from_zero() {
        let reports = [
            report("a", T0, 1_000, 3),
            report("a", T0 + 2 * SECOND, 1_100, 3),
            // The agent restarted: 50 since then.
            report("a", T0 + 4 * SECOND, 50, 1),
            report("a", T0 + 6 * SECOND, 150, 2),
        ];
        let sample = aggregate_traffic(&reports, T0 + 6 * SECOND, 10 * SECOND).unwrap();
        assert_eq!(sample.rps, 250.0 / 6.0);
        assert_eq!(sample.active, 2);
        assert_eq!(sample.nodes, 1);
    }

    #[test]
    fn traffic_sums_nodes_over_the_window() {
        let now = T0 + 20 * SECOND;
        let mut reports = vec![
            // Out of the window.
            report("a", T0, 0, 9),
            report("a", now - 8 * SECOND, 100, 1),
            report("b", now - 4 * SECOND, 5_000, 4),
            report("a", now - 2 * SECOND, 700, 2),
            report("b", now, 5_400, 6),
            // A copy of a report, read again later.
            report("b", now, 5_400, 6),
        ];
        let sample = aggregate_traffic(&reports, now, 10 * SECOND).unwrap();
        assert_eq!(sample.rps, 100.0 + 100.0);
        assert_eq!(sample.active, 8);
        assert_eq!(sample.at_ms, now);
        assert_eq!(sample.nodes, 2);

        // A node with one report in the window gives its own rate.
        reports.push(NodeTraffic {
            request_rate: 12.5,
            ..report("c", now - SECOND, 77, 0)
        });
        let sample = aggregate_traffic(&reports, now, 10 * SECOND).unwrap();
        assert_eq!(sample.rps, 212.5);

        assert_eq!(
            aggregate_traffic(&reports, now + 60 * SECOND, 10 * SECOND),
            None
        );
    }

    #[test]
    fn waiting_connections_are_summed_from_each_nodes_newest_report() {
        let held = |node, at_ms, waiting| NodeTraffic {
            waiting,
            ..report(node, at_ms, 0, 0)
        };
        let reports = [
            held("a", T0, 5),
            held("a", T0 + 2 * SECOND, 1),
            held("b", T0 + SECOND, 2),
        ];
        let sample = aggregate_traffic(&reports, T0 + 2 * SECOND, 10 * SECOND).unwrap();
        assert_eq!(sample.waiting, 3);
    }

    #[test]
    fn connections_turned_away_count_within_the_window() {
        let turned = |at_ms, turned_away| NodeTraffic {
            turned_away,
            ..report("a", at_ms, 0, 0)
        };
        let reports = [
            turned(T0, 10),
            turned(T0 + 2 * SECOND, 13),
            turned(T0 + 4 * SECOND, 1),
        ];
        let sample = aggregate_traffic(&reports, T0 + 4 * SECOND, 10 * SECOND).unwrap();
        assert_eq!(sample.turned_away, 4);
        assert_eq!(sample.metric_sample().total_rps, Some(0.0));
    }

    #[test]
    fn policies_are_validated() {
        assert_eq!(Policy::new(1, 5, rps(10.0)).validate(), Ok(()));
        assert_eq!(
            Policy::new(0, 0, rps(10.0)).validate(),
            Err(PolicyError::ZeroMax)
        );
        assert_eq!(
            Policy::new(6, 5, rps(10.0)).validate(),
            Err(PolicyError::MinAboveMax { min: 6, max: 5 })
        );
        assert_eq!(
            Policy::new(1, 5, Targets::from_spec(0.0, 0.0, 0.0)).validate(),
            Err(PolicyError::NoTarget)
        );
        assert_eq!(
            Policy::new(1, 5, Targets::from_spec(0.0, -1.0, 0.0)).validate(),
            Err(PolicyError::BadTarget {
                name: "concurrency",
                value: -1.0
            })
        );
        let mut policy = Policy::new(1, 5, rps(10.0));
        policy.tolerance = 1.0;
        assert_eq!(policy.validate(), Err(PolicyError::BadTolerance(1.0)));
    }

    #[test]
    fn the_memory_keeps_only_what_can_still_be_the_highest() {
        let policy = Policy::new(1, 20, rps(10.0));
        let mut memory = Memory::default();
        for (i, replicas) in [3, 5, 4, 4, 2, 3].into_iter().enumerate() {
            memory.record_recommendation(&policy, replicas, T0 + i as u64 * SECOND);
        }
        let kept: Vec<u32> = memory.recommendations.iter().map(|r| r.replicas).collect();
        assert_eq!(kept, vec![5, 4, 3]);
        memory.record_recommendation(&policy, 1, T0 + 62 * SECOND);
        let kept: Vec<u32> = memory.recommendations.iter().map(|r| r.replicas).collect();
        assert_eq!(kept, vec![4, 3, 1]);
    }

    /// Load in replicas' worth per target, as the decision should see it.
    fn loads(policy: &Policy, sample: &MetricSample, waiting: u64) -> Vec<f64> {
        let mut loads = Vec::new();
        if let Some(t) = policy.targets.rps {
            loads.push(sample.total_rps.unwrap() / t);
        }
        if let Some(t) = policy.targets.concurrency {
            loads.push((sample.total_active.unwrap() + waiting as f64) / t);
        }
        loads
    }

    #[test]
    fn random_sequences_stay_within_bounds_and_hold_within_tolerance() {
        for seed in 0..200 {
            let mut rng = StdRng::seed_from_u64(seed);
            let min = rng.gen_range(0..4);
            let max = rng.gen_range(min.max(1)..min + 25);
            let targets = match rng.gen_range(0..3) {
                0 => rps(rng.gen_range(1.0..50.0)),
                1 => concurrency(rng.gen_range(0.5..10.0)),
                _ => Targets {
                    rps: Some(rng.gen_range(1.0..50.0)),
                    concurrency: Some(rng.gen_range(0.5..10.0)),
                    cpu_percent: None,
                },
            };
            let mut policy = Policy::new(min, max, targets);
            if rng.gen_bool(0.5) {
                policy.idle_window_ms = rng.gen_range(10..120) * SECOND;
                policy.scale_down_window_ms = rng.gen_range(0..90) * SECOND;
            }
            let mut sim = Sim::new(policy.clone(), rng.gen_range(min..=max));
            sim.start_delay_ms = rng.gen_range(0..20) * SECOND;
            let mut load = rng.gen_range(0.0..f64::from(max) * 1.5);
            for _ in 0..600 {
                // A random walk with jumps, idle spells, and spells held
                // within tolerance of the current count.
                match rng.gen_range(0..20) {
                    0 => load = rng.gen_range(0.0..f64::from(max) * 2.0),
                    1 => load = 0.0,
                    2..=7 => {
                        load = f64::from(sim.current) * (1.0 + rng.gen_range(-0.099..0.099));
                    }
                    _ => load = (load * rng.gen_range(0.9..1.1)).max(0.0),
                }
                let waiting = if rng.gen_bool(0.05) {
                    rng.gen_range(0..3)
                } else {
                    0
                };
                let rps_per = policy.targets.rps.unwrap_or(1.0);
                let conc_per = policy.targets.concurrency.unwrap_or(1.0);
                let sample = traffic(sim.now + SECOND, load * rps_per, load * conc_per);
                let fresh = rng.gen_bool(0.9);
                let before = sim.current;
                let stale = !fresh
                    && sim
                        .samples
                        .last()
                        .is_none_or(|s| sim.now + SECOND - s.at_ms > policy.stale_after_ms);
                let within = fresh
                    && before > 0
                    && loads(&policy, &sample, waiting)
                        .iter()
                        .all(|l| (l / f64::from(before) - 1.0).abs() <= policy.tolerance - 1e-9);
                let decision = sim.tick(
                    fresh.then_some((sample.total_rps.unwrap(), sample.total_active.unwrap())),
                    waiting,
                );
                assert!(
                    (min..=max).contains(&decision.desired),
                    "seed {seed}: {decision:?} outside [{min}, {max}]"
                );
                if within {
                    assert_eq!(decision.desired, before, "seed {seed}: {decision:?}");
                }
                if stale && before > 0 {
                    assert!(decision.desired >= before, "seed {seed}: {decision:?}");
                }
            }
        }
    }
}
