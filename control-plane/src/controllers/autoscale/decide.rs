//! The autoscaler decision for one service: its policy, what it runs now,
//! recent metric samples and the autoscaler's memory in; the desired replica
//! count and why out (the pure aggregation of the proxies' cumulative
//! traffic counters into those samples is in `traffic`). No I/O and no
//! clock: time comes in as `now_ms`, and a leader-only loop feeds this and
//! proposes the result.
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

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use super::policy::Metric;
use super::{Policy, DEFAULT_TOLERANCE};

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

#[cfg(test)]
#[path = "decide_tests.rs"]
mod tests;
