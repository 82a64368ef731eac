//! What the leader's loop keeps of each autoscaled service between
//! rounds (reports, samples, the decision's memory), and which services
//! are autoscaled in the applied state.

use super::{
    aggregate_traffic, cpu_sample, decide, Decision, Memory, MetricSample, NodeTraffic, Observed,
    Policy, ReplicaCpu, Timings, DEFAULT_TRAFFIC_WINDOW_MS,
};
use crate::state::{ServiceMode, State};
use skiff_spec::Protocol;

/// Two equal reports of one node received this close together are one
/// report read twice (agents report every 2 s; a report forwarded by a
/// follower arrives with its age, so its time jitters by a few ms).
/// Different counters make a new report however close: the one a proxy
/// sends at once when a connection starts waiting at zero replicas may
/// follow the periodic one by a few ms.
const SAME_REPORT_MS: u64 = 500;

/// An autoscaled service as the applied state has it.
#[derive(Clone, Debug, PartialEq)]
pub struct Autoscaled {
    pub name: String,
    pub policy: Policy,
    /// The replica count in the spec: what the autoscaler sets.
    pub current: u32,
    /// Live replicas serving (healthy, or running without a check).
    pub ready: u32,
    /// A deployment is rolling out: autoscaling pauses.
    pub deploying: bool,
    /// Published as HTTP: rates are requests, else connections.
    pub http: bool,
    /// The live replicas' ids: whose CPU use counts.
    pub replicas: Vec<String>,
}

/// Every replicated service with an autoscale policy, by name.
pub fn autoscaled(state: &State, timings: &Timings) -> Vec<Autoscaled> {
    state
        .services
        .iter()
        .filter(|(_, s)| s.spec.mode == ServiceMode::Replicated)
        .filter_map(|(name, service)| {
            let spec = service.spec.autoscale.as_ref()?;
            let current = service.spec.replicas;
            let ready = state
                .live_allocs(name)
                .filter(|a| a.is_serving())
                .count()
                .min(current as usize) as u32;
            let replicas = state.live_allocs(name).map(|a| a.id.clone()).collect();
            Some(Autoscaled {
                name: name.clone(),
                policy: timings.policy(spec),
                current,
                ready,
                deploying: service.active_deployment().is_some(),
                http: service.spec.protocol == Protocol::Http,
                replicas,
            })
        })
        .collect()
}

/// What the loop remembers of one service.
#[derive(Debug, Default)]
pub struct Tracker {
    /// Reports within the traffic window, several per node.
    reports: Vec<NodeTraffic>,
    /// Samples built from them, oldest first, as far back as the idle
    /// window needs.
    samples: Vec<MetricSample>,
    /// Connections waiting for a replica: held now, or turned away within
    /// the traffic window.
    waiting: u64,
    pub memory: Memory,
}

impl Tracker {
    /// Takes in the latest report of each node (a report already seen is
    /// ignored) and builds a sample from the reports in the window.
    pub fn observe(&mut self, latest: Vec<NodeTraffic>, policy: &Policy, now_ms: u64) {
        for report in latest {
            let seen = self.reports.iter().any(|r| same_report(r, &report));
            if !seen {
                self.reports.push(report);
            }
        }
        let from = now_ms.saturating_sub(DEFAULT_TRAFFIC_WINDOW_MS);
        self.reports.retain(|r| r.at_ms >= from);
        let keep_from = now_ms
            .saturating_sub(policy.idle_window_ms.max(policy.stale_after_ms))
            .saturating_sub(policy.stale_after_ms);
        self.samples.retain(|s| s.at_ms >= keep_from);
        self.waiting = 0;
        let Some(traffic) = aggregate_traffic(&self.reports, now_ms, DEFAULT_TRAFFIC_WINDOW_MS)
        else {
            return;
        };
        let fresh = now_ms.saturating_sub(traffic.at_ms) <= policy.stale_after_ms;
        self.waiting = traffic.turned_away + if fresh { traffic.waiting } else { 0 };
        let sample = traffic.metric_sample();
        if self.newest(|s| s.total_rps.is_some()) < Some(sample.at_ms) {
            self.samples.push(sample);
        }
    }

    /// Takes in the latest CPU use of the service's `replicas` (a sample
    /// already taken is not taken again). Call after [`Tracker::observe`],
    /// which drops the samples no longer needed.
    pub fn observe_cpu(
        &mut self,
        usage: &[ReplicaCpu],
        replicas: &[String],
        policy: &Policy,
        now_ms: u64,
    ) {
        let Some(sample) = cpu_sample(usage, replicas, now_ms, policy.stale_after_ms) else {
            return;
        };
        if self.newest(|s| s.cpu.is_some()) < Some(sample.at_ms) {
            self.samples.push(sample);
        }
    }

    /// When the newest sample with `what` was taken.
    fn newest(&self, what: impl Fn(&MetricSample) -> bool) -> Option<u64> {
        self.samples
            .iter()
            .filter(|s| what(s))
            .map(|s| s.at_ms)
            .max()
    }

    /// Connections waiting for a replica, as last observed.
    pub fn waiting(&self) -> u64 {
        self.waiting
    }

    /// Decides `service`'s count at `now_ms`; `None` when there is nothing
    /// to decide: a deployment is in flight (autoscaling pauses), or this
    /// is a quick look (`every_second == false`) and no connection waits at
    /// zero replicas. A decision that changes nothing is recorded here; a
    /// change is recorded by the caller once carried out
    /// ([`Tracker::carried_out`]).
    pub fn consider(
        &mut self,
        service: &Autoscaled,
        now_ms: u64,
        every_second: bool,
    ) -> Option<Decision> {
        if service.deploying {
            return None;
        }
        let waking = service.current == 0 && self.waiting > 0;
        if !(every_second || waking) {
            return None;
        }
        let observed = Observed {
            current: service.current,
            ready: service.ready,
            waiting_connections: self.waiting,
            samples: &self.samples,
        };
        let decision = decide(&service.policy, &observed, &self.memory, now_ms);
        if !decision.changed {
            self.memory.record(&service.policy, &decision, now_ms);
            return None;
        }
        Some(decision)
    }

    /// Records the outcome of proposing `decision`: a committed change
    /// starts its cooldown; one not carried out only counts as a
    /// recommendation.
    pub fn carried_out(&mut self, policy: &Policy, decision: &Decision, ok: bool, now_ms: u64) {
        if ok {
            self.memory.record(policy, decision, now_ms);
        } else {
            self.memory
                .record_recommendation(policy, decision.recommendation, now_ms);
        }
    }
}

/// Whether `a` and `b` are one report of a node read twice.
fn same_report(a: &NodeTraffic, b: &NodeTraffic) -> bool {
    a.node == b.node
        && a.at_ms.abs_diff(b.at_ms) < SAME_REPORT_MS
        && (a.requests, a.active, a.turned_away, a.waiting)
            == (b.requests, b.active, b.turned_away, b.waiting)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::CpuSample;
    use super::*;
    use crate::state::AutoscalePolicy;

    const T0: u64 = 1_000_000_000;

    fn service(current: u32, min: u32) -> Autoscaled {
        let spec = AutoscalePolicy {
            min,
            max: 6,
            target_concurrency: Some(2.0),
            ..AutoscalePolicy::default()
        };
        Autoscaled {
            name: "web".into(),
            policy: Timings::from_window(Duration::from_secs(6)).policy(&spec),
            current,
            ready: current,
            deploying: false,
            http: true,
            replicas: Vec::new(),
        }
    }

    /// At `current` replicas `r0..`, autoscaled on CPU alone.
    fn cpu_service(current: u32, max: u32, target: f64) -> Autoscaled {
        let spec = AutoscalePolicy {
            min: 1,
            max,
            target_cpu: Some(target),
            ..AutoscalePolicy::default()
        };
        Autoscaled {
            name: "burn".into(),
            policy: Timings::from_window(Duration::from_secs(6)).policy(&spec),
            current,
            ready: current,
            deploying: false,
            http: false,
            replicas: (0..current).map(|i| format!("r{i}")).collect(),
        }
    }

    fn cpu(alloc_id: &str, at_ms: u64, percent: f64) -> ReplicaCpu {
        ReplicaCpu {
            alloc_id: alloc_id.into(),
            at_ms,
            percent,
        }
    }

    fn report(node: &str, at_ms: u64, requests: u64, active: u64, waiting: u64) -> NodeTraffic {
        NodeTraffic {
            node: node.into(),
            at_ms,
            requests,
            active,
            waiting,
            ..NodeTraffic::default()
        }
    }

    #[test]
    fn a_connection_waiting_just_after_a_periodic_report_is_seen_at_once() {
        let service = service(0, 0);
        let mut tracker = Tracker::default();
        tracker.observe(vec![report("a", T0, 0, 0, 0)], &service.policy, T0);
        assert_eq!(tracker.waiting(), 0);
        // 150 ms later a connection waits and the proxy reports at once.
        let at = T0 + 150;
        tracker.observe(vec![report("a", at, 0, 0, 1)], &service.policy, at);
        assert_eq!(tracker.waiting(), 1);
        // The same report read again (a few ms of jitter) is one report.
        tracker.observe(
            vec![report("a", at + 3, 0, 0, 1)],
            &service.policy,
            at + 100,
        );
        assert_eq!(tracker.reports.len(), 2);
        assert_eq!(tracker.waiting(), 1);
    }

    #[test]
    fn the_window_scales_every_timing_in_the_default_proportions() {
        assert_eq!(
            Timings::default(),
            Timings {
                scale_down_window_ms: 60_000,
                scale_up_cooldown_ms: 15_000,
                scale_down_cooldown_ms: 30_000,
                idle_window_ms: 300_000,
            }
        );
        let fast = Timings::from_window(Duration::from_secs(4));
        assert_eq!(
            (
                fast.scale_up_cooldown_ms,
                fast.scale_down_cooldown_ms,
                fast.idle_window_ms
            ),
            (1_000, 2_000, 20_000)
        );
    }

    #[test]
    fn cpu_is_a_target_beside_the_others() {
        let spec = AutoscalePolicy {
            min: 1,
            max: 3,
            target_rps: Some(10.0),
            target_cpu: Some(50.0),
            ..AutoscalePolicy::default()
        };
        let policy = Timings::default().policy(&spec);
        assert_eq!(policy.targets.rps, Some(10.0));
        assert_eq!(policy.targets.cpu_percent, Some(50.0));
    }

    #[test]
    fn the_cpu_sample_averages_the_live_replicas_fresh_reports() {
        let replicas = vec!["r0".to_string(), "r1".to_string(), "r2".to_string()];
        let usage = vec![
            cpu("r0", T0 - 1_000, 90.0),
            // An older report of r0 (forwarded late) is not its newest.
            cpu("r0", T0 - 3_000, 10.0),
            cpu("r1", T0 - 2_000, 30.0),
            // Stale: counts as not reporting.
            cpu("r2", T0 - 10_000, 100.0),
            // A replica stopping (no longer live) or of another service.
            cpu("old", T0, 100.0),
        ];
        let sample = cpu_sample(&usage, &replicas, T0, 6_000).expect("a sample");
        assert_eq!(sample.at_ms, T0 - 1_000);
        assert_eq!((sample.total_rps, sample.total_active), (None, None));
        assert_eq!(
            sample.cpu,
            Some(CpuSample {
                replicas_reporting: 2,
                percent_avg: 60.0
            })
        );
        assert_eq!(cpu_sample(&usage[3..], &replicas, T0, 6_000), None);
        assert_eq!(cpu_sample(&[], &replicas, T0, 6_000), None);
    }

    #[test]
    fn replicas_busy_above_the_cpu_target_scale_up_to_max() {
        let mut service = cpu_service(1, 3, 50.0);
        let mut tracker = Tracker::default();
        // No CPU reported yet: the count stays.
        tracker.observe(Vec::new(), &service.policy, T0);
        tracker.observe_cpu(&[], &service.replicas, &service.policy, T0);
        assert!(tracker.consider(&service, T0, true).is_none());

        // One replica at its limit, target 50%: two replicas' worth.
        tracker.observe(Vec::new(), &service.policy, T0 + 1_000);
        tracker.observe_cpu(
            &[cpu("r0", T0 + 1_000, 100.0)],
            &service.replicas,
            &service.policy,
            T0 + 1_000,
        );
        let decision = tracker
            .consider(&service, T0 + 1_000, true)
            .expect("scales up");
        assert_eq!((decision.current, decision.desired), (1, 2));
        assert_eq!(decision.reason, "cpu 100.0%/replica > target 50.0%");
        tracker.carried_out(&service.policy, &decision, true, T0 + 1_000);
        service = cpu_service(2, 3, 50.0);

        // After the scale-up cooldown (1.5 s here), both at their limit:
        // four replicas' worth, held at max 3.
        let now = T0 + 3_000;
        tracker.observe(Vec::new(), &service.policy, now);
        tracker.observe_cpu(
            &[cpu("r0", now, 100.0), cpu("r1", now, 100.0)],
            &service.replicas,
            &service.policy,
            now,
        );
        let decision = tracker.consider(&service, now, true).expect("scales up");
        assert_eq!((decision.current, decision.desired), (2, 3));
        assert!(
            decision
                .reason
                .starts_with("cpu 100.0%/replica > target 50.0%"),
            "{}",
            decision.reason
        );
        assert!(
            decision.reason.contains("held at max 3"),
            "{}",
            decision.reason
        );
    }

    #[test]
    fn a_cpu_report_read_twice_is_one_sample_and_traffic_samples_still_count() {
        let service = cpu_service(1, 3, 50.0);
        let mut tracker = Tracker::default();
        let usage = [cpu("r0", T0, 40.0)];
        tracker.observe(vec![report("a", T0, 0, 0, 0)], &service.policy, T0);
        tracker.observe_cpu(&usage, &service.replicas, &service.policy, T0);
        tracker.observe(vec![], &service.policy, T0 + 900);
        tracker.observe_cpu(&usage, &service.replicas, &service.policy, T0 + 900);
        assert_eq!(tracker.samples.len(), 2);
        // A traffic report newer than the last traffic sample is taken
        // although a CPU sample came after it.
        tracker.observe(
            vec![report("a", T0 + 2_000, 20, 0, 0)],
            &service.policy,
            T0 + 2_000,
        );
        assert_eq!(tracker.samples.len(), 3);
    }

    #[test]
    fn cpu_below_target_scales_down_only_after_the_window() {
        let mut service = cpu_service(3, 3, 50.0);
        let mut tracker = Tracker::default();
        let mut changes = Vec::new();
        for second in 0..20u64 {
            let now = T0 + second * 1_000;
            let usage: Vec<ReplicaCpu> = service
                .replicas
                .iter()
                .map(|id| cpu(id, now, 10.0))
                .collect();
            tracker.observe(Vec::new(), &service.policy, now);
            tracker.observe_cpu(&usage, &service.replicas, &service.policy, now);
            if let Some(decision) = tracker.consider(&service, now, true) {
                tracker.carried_out(&service.policy, &decision, true, now);
                changes.push((second, decision.desired));
                service = cpu_service(decision.desired, 3, 50.0);
            }
        }
        // 3 × 10% at 50% each: one replica's worth, once a whole window
        // (6 s) has been watched.
        assert_eq!(changes, vec![(6, 1)]);
    }

    #[test]
    fn a_report_read_twice_is_kept_once() {
        let service = service(1, 1);
        let mut tracker = Tracker::default();
        tracker.observe(vec![report("a", T0, 10, 1, 0)], &service.policy, T0);
        tracker.observe(
            vec![report("a", T0 + 3, 10, 1, 0)],
            &service.policy,
            T0 + 900,
        );
        assert_eq!(tracker.reports.len(), 1);
        assert_eq!(tracker.samples.len(), 1);
        tracker.observe(
            vec![report("a", T0 + 2_000, 30, 1, 0)],
            &service.policy,
            T0 + 2_000,
        );
        assert_eq!(tracker.reports.len(), 2);
        assert_eq!(tracker.samples.len(), 2);
        assert_eq!(tracker.samples[1].total_rps, Some(10.0));
    }

    #[test]
    fn a_connection_waiting_at_zero_wakes_the_service_between_rounds() {
        let service = service(0, 0);
        let mut tracker = Tracker::default();
        tracker.observe(vec![report("a", T0, 0, 0, 0)], &service.policy, T0);
        assert!(tracker.consider(&service, T0, false).is_none());
        tracker.observe(
            vec![
                report("a", T0 + 700, 0, 0, 1),
                report("b", T0 + 100, 0, 0, 0),
            ],
            &service.policy,
            T0 + 800,
        );
        assert_eq!(tracker.waiting(), 1);
        let decision = tracker.consider(&service, T0 + 800, false).expect("wakes");
        assert_eq!((decision.current, decision.desired), (0, 1));
        // A service with replicas waits for the next round.
        let running = Autoscaled {
            current: 1,
            ..service.clone()
        };
        assert!(tracker.consider(&running, T0 + 800, false).is_none());
    }

    #[test]
    fn connections_turned_away_count_as_waiting_within_the_window() {
        let service = service(0, 0);
        let mut tracker = Tracker::default();
        let turned = |at_ms, no_endpoint| NodeTraffic {
            turned_away: no_endpoint,
            ..report("a", at_ms, 0, 0, 0)
        };
        tracker.observe(vec![turned(T0, 4)], &service.policy, T0);
        tracker.observe(vec![turned(T0 + 2_000, 6)], &service.policy, T0 + 2_000);
        assert_eq!(tracker.waiting(), 2);
        tracker.observe(vec![turned(T0 + 20_000, 6)], &service.policy, T0 + 20_000);
        assert_eq!(tracker.waiting(), 0);
    }

    #[test]
    fn autoscaling_pauses_during_a_deployment() {
        let mut deploying = service(1, 1);
        deploying.deploying = true;
        let mut tracker = Tracker::default();
        tracker.observe(vec![report("a", T0, 0, 9, 0)], &deploying.policy, T0);
        assert!(tracker.consider(&deploying, T0, true).is_none());
        deploying.deploying = false;
        let decision = tracker.consider(&deploying, T0, true).expect("resumes");
        assert_eq!(decision.desired, 5);
        assert!(
            decision
                .reason
                .starts_with("concurrency 9.0/replica > target 2.0"),
            "{}",
            decision.reason
        );
    }

    #[test]
    fn a_step_up_then_a_drop_scales_down_only_after_the_window() {
        let mut service = service(1, 1);
        let mut tracker = Tracker::default();
        let mut changes = Vec::new();
        let mut requests = 0;
        for second in 0..40u64 {
            let now = T0 + second * 1_000;
            let active = if second < 10 { 8 } else { 0 };
            requests += active * 10;
            tracker.observe(
                vec![report("a", now, requests, active, 0)],
                &service.policy,
                now,
            );
            if let Some(decision) = tracker.consider(&service, now, true) {
                tracker.carried_out(&service.policy, &decision, true, now);
                changes.push((second, decision.desired));
                service.current = decision.desired;
                service.ready = decision.desired;
            }
        }
        // Up at once to 4 (8 connections at 2 each); down to 1 a window
        // (6 s) after the last high recommendation, at second 9.
        assert_eq!(changes, vec![(0, 4), (16, 1)]);
    }
}
