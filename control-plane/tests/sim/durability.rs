//! Acknowledged means durable: a single-server cluster answers a write
//! only once the write survives a power cut. etcd lost acknowledged writes
//! exactly there (etcd#14370): its single member applied and answered
//! entries committed in the same Ready that had not been fsynced yet. Here
//! raft-rs hands out committed entries only up to its persisted index, and
//! the core persists (fsyncs) each Ready before advancing; this test holds
//! that in place for the real write-ahead log over the faulty disk.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use skiff_control_plane::consensus::core::{Core, Reply};
use skiff_control_plane::consensus::sim_fs::SimFs;
use skiff_control_plane::consensus::LogStore;
use skiff_control_plane::state::{Command, RuntimeKind, ServiceSpec};

use crate::harness::{core_config, initial_snapshot, logger, Disk, Stats, WalDisk};

fn write(name: &str) -> Command {
    Command::CreateService {
        spec: ServiceSpec {
            name: name.into(),
            runtime: RuntimeKind::Process,
            replicas: 1,
            command: vec!["true".into()],
            ..Default::default()
        },
    }
}

/// Restarts the single server from its disk and waits (bounded) until it
/// leads and applied its whole log again.
fn restart(disk: &WalDisk) -> Core<<WalDisk as Disk>::Store> {
    let store = disk.open().expect("the log opens after a power cut");
    let mut core = Core::new(core_config(1), store, &logger()).expect("the server restarts");
    core.campaign().unwrap();
    for _ in 0..100 {
        core.advance(&mut |_| {}).unwrap();
        let status = core.status();
        if core.is_leader() && status.applied_index == status.last_index {
            return core;
        }
    }
    panic!("the single server did not lead and apply its log after a restart");
}

/// Runs one seed: writes proposed at random, power cuts at random (the
/// Ready loop stops wherever it was: no further advance, no flush), and
/// after each cut every write acknowledged before it is in the state.
pub fn single_server_seed(seed: u64) -> Stats {
    single_server_on(WalDisk::empty(seed), seed)
}

/// [`single_server_seed`] on a disk whose `fdatasync` makes nothing
/// durable, as if the server acknowledged before syncing: it must fail,
/// or the test above could not catch that.
pub fn single_server_with_lying_fdatasync(seed: u64) -> Stats {
    single_server_on(WalDisk::on(SimFs::new(seed).with_lying_fdatasync()), seed)
}

fn single_server_on(disk: WalDisk, seed: u64) -> Stats {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut store = disk.open().unwrap();
    store.apply_snapshot(&initial_snapshot(1)).unwrap();
    drop(store);
    let mut core = restart(&disk);
    let (mut tag, mut acknowledged, mut waiting) = (0u64, Vec::new(), Vec::new());
    let mut stats = Stats::default();
    for _ in 0..200 {
        for _ in 0..rng.gen_range(0..4) {
            tag += 1;
            let name = format!("w{tag}");
            if core.propose(tag, write(&name)).is_ok() {
                waiting.push((tag, name));
            }
        }
        let output = core.advance(&mut |_| {}).unwrap();
        for (tag, reply) in output.replies {
            if let Some(at) = waiting.iter().position(|(t, _)| *t == tag) {
                let (_, name) = waiting.swap_remove(at);
                if let Reply::Command(Ok(_)) = reply {
                    acknowledged.push(name);
                }
            }
        }
        // The snapshot worker, at once.
        if let Some(job) = core.take_snapshot_job() {
            let file = core.store_snapshot_file().unwrap();
            core.snapshot_written(job.write(&file)).unwrap();
        }
        if rng.gen_bool(0.05) {
            drop(core);
            waiting.clear();
            disk.crash();
            stats.crashes += 1;
            core = restart(&disk);
            let state = core.state();
            let state = state.read().unwrap();
            for name in &acknowledged {
                assert!(
                    state.services.contains_key(name),
                    "acknowledged write {name} lost in a power cut (applied {})",
                    state.applied_index
                );
            }
        }
    }
    stats.acknowledged = acknowledged.len();
    stats.faults = disk.faults();
    assert!(stats.acknowledged > 50, "too few writes to tell: {stats}");
    stats
}
