//! Deterministic simulation of the control plane's consensus: N servers
//! (the real [`Core`]: raft-rs plus the state machine) over a seeded
//! in-memory network that drops, delays, duplicates and reorders messages,
//! partitions and heals, and crash-restarts servers from their persisted
//! storage ([`MemLog`], a fake disk that keeps what was fsynced).
//!
//! Each seed runs a fault phase with random client writes, then heals
//! everything and runs a liveness phase; the invariants in `invariants/`
//! are checked along the way and at the end. A failing seed prints itself;
//! `SKIFF_SIM_SEED=N` re-runs just that seed.

mod harness;
mod invariants;

use harness::{Sim, SimConfig, GHOST};

const SEEDS_PER_SIZE: u64 = 100;

fn seeds() -> Vec<u64> {
    match std::env::var("SKIFF_SIM_SEED") {
        Ok(seed) => vec![seed.parse().expect("SKIFF_SIM_SEED must be a number")],
        Err(_) => (0..SEEDS_PER_SIZE).collect(),
    }
}

fn run_seeds(servers: usize) {
    for seed in seeds() {
        let result = std::panic::catch_unwind(|| {
            let mut sim = Sim::new(SimConfig::faulty(servers, seed));
            sim.run_faults();
            sim.heal_and_settle();
            invariants::no_acknowledged_write_lost(&sim);
            invariants::state_machines_converge(&sim);
            sim.stats()
        });
        match result {
            Ok(stats) => {
                if std::env::var("SKIFF_SIM_SEED").is_ok() {
                    eprintln!("seed {seed}: {stats}");
                }
            }
            Err(panic) => {
                eprintln!(
                    "\nsimulation failed: {servers} servers, seed {seed}\n\
                     re-run alone with: SKIFF_SIM_SEED={seed} cargo test -p skiff-control-plane --test sim sim_{servers}\n"
                );
                std::panic::resume_unwind(panic);
            }
        }
    }
}

/// A server joins during the faults: it catches up as a learner and ends
/// a voter; a ghost that joined at an unreachable address stays a learner
/// and the cluster still commits (its last write after healing).
#[test]
fn sim_joins_under_faults_promote_the_joiner_and_never_the_ghost() {
    for seed in seeds().into_iter().take(30) {
        let result = std::panic::catch_unwind(|| {
            let mut sim = Sim::new(SimConfig::joining(3, seed));
            sim.run_faults();
            sim.heal_and_settle();
            let all = vec![1, 2, 3, 4];
            let promoted = sim.run_until(3000, |sim| {
                sim.voters().iter().all(|(_, voters)| *voters == all)
                    && sim.states().iter().all(|(_, state)| {
                        state.members.len() == 5
                            && state
                                .members
                                .values()
                                .all(|m| m.learner == (m.name == GHOST))
                    })
            });
            assert!(
                promoted,
                "the joiner did not become a voter, or the ghost did: voters {:?}",
                sim.voters()
            );
            // And the cluster, ghost and all, still commits.
            sim.heal_and_settle();
            invariants::no_acknowledged_write_lost(&sim);
            invariants::state_machines_converge(&sim);
        });
        if let Err(panic) = result {
            eprintln!(
                "\nsimulation with joins failed: seed {seed}\n\
                 re-run alone with: SKIFF_SIM_SEED={seed} cargo test -p skiff-control-plane --test sim sim_joins\n"
            );
            std::panic::resume_unwind(panic);
        }
    }
}

#[test]
fn sim_3_servers_keep_safety_and_converge_under_faults() {
    run_seeds(3);
}

#[test]
fn sim_5_servers_keep_safety_and_converge_under_faults() {
    run_seeds(5);
}
