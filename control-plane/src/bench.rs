//! Measurements the CLI's benchmarks run in process, through this crate's
//! public surface rather than its internals: the pure scheduler placing a
//! simulated cluster's services plan by plan, as the leader does.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use skiff_spec::ServiceSpec;

use crate::controllers::plan_cluster;
use crate::state::{Command, Outcome, State};

/// A simulated node: what the scheduler sees of one.
#[derive(Clone, Debug)]
pub struct SimNode {
    pub name: String,
    pub cpu_millis: u32,
    pub memory_mb: u32,
    pub labels: BTreeMap<String, String>,
}

/// What one run of the pure scheduler did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScheduleRun {
    pub placements: usize,
    /// Time spent deciding (not applying) plans.
    pub deciding: Duration,
    pub plans: usize,
}

/// Places every replica of `services` on `nodes` in memory, plan by plan
/// as the leader does, until a plan places nothing.
pub fn pure_scheduler(nodes: &[SimNode], services: &[ServiceSpec]) -> Result<ScheduleRun, String> {
    let mut state = State::default();
    let mut index = 0;
    let mut apply = |state: &mut State, command: Command| {
        index += 1;
        state
            .apply(index, command)
            .map_err(|e| format!("bench command refused: {e}"))
    };
    for node in nodes {
        apply(
            &mut state,
            Command::RegisterNode {
                process_runtime: true,
                agent_address: String::new(),
                name: node.name.clone(),
                address: "127.0.0.1".into(),
                port_range: (20000, 29999),
                cpu_millis: node.cpu_millis,
                memory_mb: node.memory_mb,
                labels: node.labels.clone(),
            },
        )?;
    }
    for spec in services {
        apply(&mut state, Command::CreateService { spec: spec.clone() })?;
    }
    let mut run = ScheduleRun {
        placements: 0,
        deciding: Duration::ZERO,
        plans: 0,
    };
    loop {
        let started = Instant::now();
        let (plan, _) = plan_cluster(&state, 0, run.plans as u64, &Default::default());
        run.deciding += started.elapsed();
        if plan.place.is_empty() {
            return Ok(run);
        }
        run.plans += 1;
        if let Outcome::PlanApplied { placed, .. } = apply(&mut state, Command::ApplyPlan { plan })?
        {
            run.placements += placed;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use skiff_spec::RuntimeKind;

    #[test]
    fn the_pure_scheduler_places_every_replica_that_fits() {
        let nodes: Vec<SimNode> = (0..3)
            .map(|i| SimNode {
                name: format!("n{i}"),
                cpu_millis: 1000,
                memory_mb: 1024,
                labels: BTreeMap::new(),
            })
            .collect();
        let web = ServiceSpec {
            name: "web".into(),
            runtime: RuntimeKind::Process,
            replicas: 5,
            command: vec!["sleep".into()],
            memory_mb: Some(64),
            ..Default::default()
        };
        let run = pure_scheduler(&nodes, &[web]).unwrap();
        assert_eq!(run.placements, 5);
        assert!(run.plans >= 1);
    }
}
