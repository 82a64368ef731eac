//! A service's load as this server's reports have it: each node's
//! proxy traffic and each replica's CPU use, and the CPU sample the
//! decision takes from them.

use std::collections::HashMap;
use std::sync::Arc;

use super::{CpuSample, MetricSample, NodeTraffic};

/// What is known of a service's load: `(service, http)` in; out, the
/// latest report of every node's proxy and its replicas' CPU use.
pub type LoadSource = Arc<dyn Fn(&str, bool) -> Load + Send + Sync>;

/// A service's load as the reports have it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Load {
    /// One per node whose proxy reported the service.
    pub traffic: Vec<NodeTraffic>,
    /// One per replica whose node reported its use.
    pub cpu: Vec<ReplicaCpu>,
}

/// One replica's CPU use as its node last reported it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ReplicaCpu {
    pub alloc_id: String,
    /// When the report was received (this server's clock).
    pub at_ms: u64,
    /// Percent of the replica's CPU limit (of one CPU without a limit).
    pub percent: f64,
}

/// The service's CPU as a sample: the newest fresh report of each of
/// `replicas` (its live replicas; a replica stopping or of another service
/// is ignored), averaged. `None` when none of them reported within
/// `stale_after_ms`.
pub fn cpu_sample(
    usage: &[ReplicaCpu],
    replicas: &[String],
    now_ms: u64,
    stale_after_ms: u64,
) -> Option<MetricSample> {
    let mut newest: HashMap<&str, &ReplicaCpu> = HashMap::new();
    for report in usage {
        let fresh = now_ms.saturating_sub(report.at_ms) <= stale_after_ms;
        if !fresh || !report.percent.is_finite() || !replicas.contains(&report.alloc_id) {
            continue;
        }
        let entry = newest.entry(&report.alloc_id).or_insert(report);
        if entry.at_ms < report.at_ms {
            *entry = report;
        }
    }
    let reporting = newest.len() as u32;
    let total: f64 = newest.values().map(|r| r.percent.max(0.0)).sum();
    let at_ms = newest.values().map(|r| r.at_ms.min(now_ms)).max()?;
    Some(MetricSample {
        at_ms,
        cpu: Some(CpuSample {
            replicas_reporting: reporting,
            percent_avg: total / f64::from(reporting),
        }),
        ..MetricSample::default()
    })
}
