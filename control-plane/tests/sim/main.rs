//! Deterministic simulation of the control plane's consensus: N servers
//! (the real [`Core`]: raft-rs plus the state machine) over a seeded
//! in-memory network that drops, delays, duplicates and reorders messages,
//! partitions and heals, and crash-restarts servers from their disks.
//!
//! Every scenario runs over each store a disk can hold ([`harness::Disk`]):
//! [`MemLog`], a fake disk that keeps whatever was persisted, and the real
//! write-ahead log ([`WalStorage`]) over a fault-injecting file system
//! ([`SimFs`]), where a crash drops everything written after the last
//! fsync and may leave a torn last write (a prefix of it, then garbage or
//! zeros); the restarted server reopens the log from what survived. The
//! sled store runs on a real temp dir ([`harness::SledDisk`]): sled cannot
//! run over this file layer, so its crashes are killed processes (what sled
//! wrote survives), not power cuts.
//!
//! Each seed runs a fault phase with random client writes, then heals
//! everything and runs a liveness phase; the invariants in `invariants/`
//! are checked along the way and at the end. A failing seed prints itself.
//! `SKIFF_SIM_SEED=N` re-runs just that seed; `SKIFF_SIM_SEEDS=START..END`
//! runs that range in every scenario and store and prints a summary (time,
//! crashes, torn writes). Measured on two cores shared with other builds,
//! release mode: 1,000 seeds of every scenario and store pass in 16 min (so
//! 10,000 take about 2.7 h); 10,000 over the WAL in 7 min for one server
//! and 19 min for three. The default run is about 200 seeds, most over [`MemLog`]:
//! CI runs it in the debug profile, where the WAL's seeds cost the most.
//!
//! [`Core`]: skiff_control_plane::consensus::core::Core
//! [`MemLog`]: skiff_control_plane::consensus::mem::MemLog
//! [`WalStorage`]: skiff_control_plane::consensus::WalStorage
//! [`SimFs`]: skiff_control_plane::consensus::sim_fs::SimFs

mod durability;
mod harness;
mod invariants;

use std::ops::Range;
use std::time::Instant;

use harness::{Disk, Sim, SimConfig, SledDisk, Stats, WalDisk, GHOST};
use skiff_control_plane::consensus::mem::MemLog;

/// The seeds to run: `SKIFF_SIM_SEED=N`, `SKIFF_SIM_SEEDS=START..END`, or
/// `0..default`. The second member says whether a range was asked for (and
/// so a summary is wanted).
fn seeds(default: u64) -> (Range<u64>, bool) {
    if let Ok(seed) = std::env::var("SKIFF_SIM_SEED") {
        let seed: u64 = seed.parse().expect("SKIFF_SIM_SEED must be a number");
        return (seed..seed + 1, false);
    }
    if let Ok(range) = std::env::var("SKIFF_SIM_SEEDS") {
        let parsed = range
            .split_once("..")
            .and_then(|(start, end)| Some((start.parse().ok()?, end.parse().ok()?)));
        let Some((start, end)) = parsed else {
            panic!("SKIFF_SIM_SEEDS must be START..END, such as 0..10000; got {range:?}");
        };
        return (start..end, true);
    }
    (0..default, false)
}

/// Runs `scenario` for each seed, naming the seed when one fails; with a
/// range, prints a summary when done.
fn for_each_seed(
    test: &str,
    store: &str,
    default: u64,
    scenario: impl Fn(u64) -> Stats + std::panic::RefUnwindSafe,
) {
    let (range, summary) = seeds(default);
    let started = Instant::now();
    let mut total = Stats::default();
    for seed in range.clone() {
        match std::panic::catch_unwind(|| scenario(seed)) {
            Ok(stats) => {
                if range.end - range.start == 1 && !summary {
                    eprintln!("seed {seed}: {stats}");
                }
                total += stats;
            }
            Err(panic) => {
                eprintln!(
                    "\nsimulation failed: {test} ({store} store), seed {seed}\n\
                     re-run alone with: SKIFF_SIM_SEED={seed} cargo test -p skiff-control-plane --test sim {test}\n"
                );
                std::panic::resume_unwind(panic);
            }
        }
    }
    if summary {
        eprintln!(
            "{test}: store {store}, seeds {}..{} ({} seeds) passed in {:.1} s: {total}",
            range.start,
            range.end,
            range.end - range.start,
            started.elapsed().as_secs_f64()
        );
    }
}

fn run_seeds<D: Disk>(test: &str, servers: usize, default: u64) {
    for_each_seed(test, D::NAME, default, |seed| {
        let mut sim = Sim::<D>::new(SimConfig::faulty(servers, seed));
        sim.run_faults();
        sim.heal_and_settle();
        invariants::no_acknowledged_write_lost(&sim);
        invariants::state_machines_converge(&sim);
        sim.stats()
    });
}

/// A server joins during the faults: it catches up as a learner and ends
/// a voter; a ghost that joined at an unreachable address stays a learner
/// and the cluster still commits (its last write after healing).
fn joins<D: Disk>(test: &str, default: u64) {
    for_each_seed(test, D::NAME, default, |seed| {
        let mut sim = Sim::<D>::new(SimConfig::joining(3, seed));
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
        sim.stats()
    });
}

#[test]
fn sim_joins_under_faults_promote_the_joiner_and_never_the_ghost() {
    joins::<MemLog>(
        "sim_joins_under_faults_promote_the_joiner_and_never_the_ghost",
        20,
    );
}

#[test]
fn sim_wal_joins_under_faults_promote_the_joiner_and_never_the_ghost() {
    joins::<WalDisk>(
        "sim_wal_joins_under_faults_promote_the_joiner_and_never_the_ghost",
        3,
    );
}

#[test]
fn sim_1_server_keeps_safety_and_converges_under_faults() {
    run_seeds::<MemLog>(
        "sim_1_server_keeps_safety_and_converges_under_faults",
        1,
        10,
    );
}

#[test]
fn sim_3_servers_keep_safety_and_converge_under_faults() {
    run_seeds::<MemLog>("sim_3_servers_keep_safety_and_converge_under_faults", 3, 60);
}

#[test]
fn sim_5_servers_keep_safety_and_converge_under_faults() {
    run_seeds::<MemLog>("sim_5_servers_keep_safety_and_converge_under_faults", 5, 50);
}

#[test]
fn sim_wal_1_server_keeps_safety_and_converges_under_power_cuts() {
    run_seeds::<WalDisk>(
        "sim_wal_1_server_keeps_safety_and_converges_under_power_cuts",
        1,
        10,
    );
}

#[test]
fn sim_wal_3_servers_keep_safety_and_converge_under_power_cuts() {
    run_seeds::<WalDisk>(
        "sim_wal_3_servers_keep_safety_and_converge_under_power_cuts",
        3,
        10,
    );
}

#[test]
fn sim_wal_5_servers_keep_safety_and_converge_under_power_cuts() {
    run_seeds::<WalDisk>(
        "sim_wal_5_servers_keep_safety_and_converge_under_power_cuts",
        5,
        5,
    );
}

#[test]
fn sim_sled_1_server_keeps_safety_and_converges_under_crashes() {
    run_seeds::<SledDisk>(
        "sim_sled_1_server_keeps_safety_and_converges_under_crashes",
        1,
        5,
    );
}

#[test]
fn sim_sled_3_servers_keep_safety_and_converge_under_crashes() {
    run_seeds::<SledDisk>(
        "sim_sled_3_servers_keep_safety_and_converge_under_crashes",
        3,
        5,
    );
}

#[test]
fn sim_sled_5_servers_keep_safety_and_converge_under_crashes() {
    run_seeds::<SledDisk>(
        "sim_sled_5_servers_keep_safety_and_converge_under_crashes",
        5,
        3,
    );
}

#[test]
fn sim_sled_joins_under_faults_promote_the_joiner_and_never_the_ghost() {
    joins::<SledDisk>(
        "sim_sled_joins_under_faults_promote_the_joiner_and_never_the_ghost",
        3,
    );
}

/// Acknowledged means durable on a single server (etcd#14370): every
/// write answered before a power cut is there after it.
#[test]
fn a_single_server_acknowledges_a_write_only_once_it_survives_a_power_cut() {
    for_each_seed(
        "a_single_server_acknowledges_a_write_only_once_it_survives_a_power_cut",
        WalDisk::NAME,
        10,
        durability::single_server_seed,
    );
}

/// The test above has teeth: on a disk whose `fdatasync` makes nothing
/// durable (as if the server answered before syncing), a power cut loses
/// acknowledged writes and it says so.
#[test]
fn acknowledging_before_fdatasync_is_caught_as_a_lost_write() {
    let caught = std::panic::catch_unwind(|| durability::single_server_with_lying_fdatasync(1));
    let message = caught.expect_err("acknowledged writes survived a disk that never synced");
    let message = message
        .downcast_ref::<String>()
        .cloned()
        .unwrap_or_default();
    assert!(message.contains("lost in a power cut"), "{message}");
}
