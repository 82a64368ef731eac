//! The decision's scenarios, and random sequences that must stay within
//! the bounds and hold within the tolerance.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::controllers::autoscale::{
    PolicyError, Targets, DEFAULT_IDLE_WINDOW_MS, DEFAULT_SCALE_DOWN_WINDOW_MS,
    DEFAULT_SCALE_UP_COOLDOWN_MS, DEFAULT_STALE_AFTER_MS,
};

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
