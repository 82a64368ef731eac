//! The autoscaler: a pure decision per service, fed by the proxies'
//! traffic and the replicas' CPU, and a leader-only loop that proposes
//! each change as a scale event.
//!
//! Layout:
//! - `policy`: the policy a decision follows, its defaults and timings.
//! - `decide`: the decision (Kubernetes HPA's rules) and its memory.
//! - `traffic`: the aggregation of traffic reports into samples.
//! - `load`: what the reports say of a service's load, and its CPU sample.
//! - `tracker`: what the loop keeps per autoscaled service.
//! - `run`: the leader-only loop that decides and proposes.

mod decide;
mod load;
mod policy;
mod run;
mod tracker;
mod traffic;

pub use decide::{decide, CpuSample, Decision, Memory, MetricSample, Observed, Recommendation};
pub use load::{cpu_sample, Load, LoadSource, ReplicaCpu};
pub use policy::{
    Policy, PolicyError, Targets, Timings, DEFAULT_IDLE_WINDOW_MS, DEFAULT_SCALE_DOWN_COOLDOWN_MS,
    DEFAULT_SCALE_DOWN_WINDOW_MS, DEFAULT_SCALE_UP_COOLDOWN_MS, DEFAULT_SCALE_UP_FACTOR,
    DEFAULT_SCALE_UP_MIN_STEP, DEFAULT_STALE_AFTER_MS, DEFAULT_TOLERANCE,
    DEFAULT_TRAFFIC_WINDOW_MS, MIN_RATE_SPAN_MS,
};
pub use run::{run_autoscaler, DECIDE_EVERY, WAKE_TICK};
pub use tracker::{autoscaled, Autoscaled, Tracker};
pub use traffic::{aggregate_traffic, NodeTraffic, TrafficSample};
