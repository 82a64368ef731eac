//! The pure aggregation of the proxies' cumulative traffic counters,
//! several reports per node, into one [`TrafficSample`] of a service over
//! a window, and from it the decision's [`MetricSample`].

use std::collections::BTreeMap;

use super::{MetricSample, MIN_RATE_SPAN_MS};

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
    use super::*;

    const T0: u64 = 1_000_000_000;
    const SECOND: u64 = 1_000;

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
}
