//! The simulated cluster and network, over any store a server's disk can
//! hold ([`Disk`]).

use std::collections::BTreeSet;
use std::fmt;
use std::path::Path;

use raft::eraftpb::{Message, MessageType, Snapshot};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use skiff_control_plane::consensus::core::{Core, CoreConfig, Reply, SnapshotJob};
use skiff_control_plane::consensus::mem::MemLog;
use skiff_control_plane::consensus::sim_fs::{FaultStats, SimFs};
use skiff_control_plane::consensus::{
    LogStore, SledStorage, SnapshotFile, StorageFailure, WalStorage,
};
use skiff_control_plane::state::{Command, Member, RuntimeKind, ServiceSpec, State};

use crate::invariants::LeaderLog;

/// One step is this many milliseconds of virtual time.
const STEP_MS: u64 = 10;
/// Raft ticks every 100 ms, as in production.
const TICK_EVERY: u64 = 10;

pub struct SimConfig {
    pub servers: usize,
    pub seed: u64,
    pub fault_steps: u64,
    pub settle_steps: u64,
    pub drop: f64,
    pub duplicate: f64,
    /// Largest message delay in steps; delays are random, so messages reorder.
    pub max_delay: u64,
    pub crash: f64,
    pub partition: f64,
    pub write: f64,
    /// During the fault phase, a new server joins (id `servers + 1`, empty
    /// disk), then a ghost that never runs (id `servers + 2`, at an address
    /// no one can reach).
    pub joins: bool,
}

impl SimConfig {
    pub fn faulty(servers: usize, seed: u64) -> Self {
        SimConfig {
            servers,
            seed,
            fault_steps: 1500,
            settle_steps: 3000,
            drop: 0.05,
            duplicate: 0.02,
            max_delay: 5,
            crash: 0.002,
            partition: 0.002,
            write: 0.2,
            joins: false,
        }
    }

    /// [`SimConfig::faulty`], with a server and a ghost joining.
    pub fn joining(servers: usize, seed: u64) -> Self {
        SimConfig {
            joins: true,
            ..SimConfig::faulty(servers, seed)
        }
    }
}

/// A server's disk, and what a crash does to it.
pub trait Disk {
    type Store: LogStore;
    /// How the store is named in reports (`mem`, `wal`).
    const NAME: &'static str;
    /// An empty disk; `seed` drives its faults.
    fn empty(seed: u64) -> Self;
    /// The store as a (re)started server opens it from this disk.
    fn open(&self) -> Result<Self::Store, StorageFailure>;
    /// A power cut under a server that is already gone.
    fn crash(&self);
    fn faults(&self) -> FaultStats;
}

/// [`MemLog`]: whatever `persist` accepted counts as fsynced.
impl Disk for MemLog {
    type Store = MemLog;
    const NAME: &'static str = "mem";

    fn empty(_seed: u64) -> Self {
        MemLog::new()
    }

    fn open(&self) -> Result<MemLog, StorageFailure> {
        Ok(self.clone())
    }

    fn crash(&self) {}

    fn faults(&self) -> FaultStats {
        FaultStats::default()
    }
}

/// The real write-ahead log ([`WalStorage`]) over a fault-injecting disk
/// ([`SimFs`]): a crash drops what was not fsynced and may tear the last
/// writes.
pub struct WalDisk(SimFs);

impl WalDisk {
    pub fn on(fs: SimFs) -> Self {
        WalDisk(fs)
    }
}

impl Disk for WalDisk {
    type Store = WalStorage;
    const NAME: &'static str = "wal";

    fn empty(seed: u64) -> Self {
        WalDisk(SimFs::new(seed))
    }

    fn open(&self) -> Result<WalStorage, StorageFailure> {
        WalStorage::open_on(self.0.shared(), Path::new("/data"))
    }

    fn crash(&self) {
        self.0.crash();
    }

    fn faults(&self) -> FaultStats {
        self.0.stats()
    }
}

/// The sled store ([`SledStorage`], the default) on a real temp dir, as
/// `skiff server` opens it. sled cannot run over [`SimFs`], so a crash here
/// is a killed process, not a power cut: the database is closed with the
/// server, keeping what sled wrote, which is everything acknowledged (the
/// store flushes each Ready itself; there is no background flusher, as in
/// production). What this adds over [`MemLog`] is the real sled store's
/// encoding, compaction, snapshots and restart path under the same faults.
pub struct SledDisk(tempfile::TempDir);

impl Disk for SledDisk {
    type Store = SledStorage;
    const NAME: &'static str = "sled";

    fn empty(_seed: u64) -> Self {
        SledDisk(
            tempfile::Builder::new()
                .prefix("skiff-sim-sled-")
                .tempdir()
                .expect("temp dir"),
        )
    }

    fn open(&self) -> Result<SledStorage, StorageFailure> {
        let config = sled::Config::new()
            .path(self.0.path().join("raft"))
            .mode(sled::Mode::LowSpace)
            .flush_every_ms(None);
        // sled's background I/O threads hold the closed database's file
        // lock for a moment after the last handle is dropped: a restarted
        // server waits for it (bounded), as a new process would not need to.
        let mut attempts = 0;
        let db = loop {
            match config.open() {
                Ok(db) => break db,
                Err(e) if attempts < 2_000 && e.to_string().contains("could not acquire lock") => {
                    attempts += 1;
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                Err(e) => panic!("sled at {}: {e}", self.0.path().display()),
            }
        };
        SledStorage::open(&db, SnapshotFile::new(self.0.path().join("snapshots")))
    }

    fn crash(&self) {}

    fn faults(&self) -> FaultStats {
        FaultStats::default()
    }
}

/// The name a joining server or ghost gets (the others are `s{id}`).
pub const JOINER: &str = "joiner";
pub const GHOST: &str = "ghost";

struct InFlight {
    at: u64,
    message: Message,
}

struct Server<D: Disk> {
    id: u64,
    disk: D,
    core: Option<Core<D::Store>>,
    /// Tags of writes this server accepted, with the service they create.
    waiting: Vec<(u64, String)>,
    /// Never runs: messages to it are lost.
    ghost: bool,
    /// A snapshot its worker is writing, done at the given step.
    snapshot_job: Option<(u64, SnapshotJob)>,
}

impl<D: Disk> Server<D> {
    fn new(id: u64, disk: D, core: Option<Core<D::Store>>, ghost: bool) -> Self {
        Server {
            id,
            disk,
            core,
            waiting: Vec::new(),
            ghost,
            snapshot_job: None,
        }
    }
}

/// Each server's disk gets its own fault seed, from the run's seed (not
/// from its RNG, so the runs over [`MemLog`] are those of before).
fn disk_seed(seed: u64, id: u64) -> u64 {
    seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ id
}

pub struct Sim<D: Disk> {
    config: SimConfig,
    rng: StdRng,
    servers: Vec<Server<D>>,
    network: Vec<InFlight>,
    /// Servers cut off from all others.
    isolated: BTreeSet<u64>,
    now: u64,
    next_tag: u64,
    next_write: u64,
    acknowledged: Vec<String>,
    leaders: LeaderLog,
    crashes: u32,
    partitions: u32,
    delivered: u64,
}

pub fn core_config(id: u64) -> CoreConfig {
    CoreConfig {
        id,
        election_ticks: 10,
        heartbeat_ticks: 2,
        snapshot_every: 25,
    }
}

pub fn logger() -> slog::Logger {
    slog::Logger::root(slog::Discard, slog::o!())
}

/// The snapshot every simulated cluster starts from: all servers voters.
pub fn initial_snapshot(servers: usize) -> Snapshot {
    let mut state = State::default();
    for id in 1..=servers as u64 {
        state.members.insert(
            id,
            Member {
                id,
                name: format!("s{id}"),
                address: format!("sim:{id}"),
                learner: false,
            },
        );
    }
    state.applied_index = 1;
    let mut snapshot = Snapshot {
        data: state.to_image().into(),
        ..Default::default()
    };
    let meta = snapshot.mut_metadata();
    meta.index = 1;
    meta.term = 1;
    meta.mut_conf_state().voters = (1..=servers as u64).collect();
    snapshot
}

impl<D: Disk> Sim<D> {
    pub fn new(config: SimConfig) -> Self {
        let snapshot = initial_snapshot(config.servers);
        let seed = config.seed;
        let mut servers = (1..=config.servers as u64)
            .map(|id| {
                let disk = D::empty(disk_seed(seed, id));
                let mut store = disk.open().unwrap();
                store.apply_snapshot(&snapshot).unwrap();
                let core = Core::new(core_config(id), store, &logger()).unwrap();
                Server::new(id, disk, Some(core), false)
            })
            .collect::<Vec<_>>();
        if config.joins {
            // Not a member yet: it starts empty and waits to be added.
            let id = config.servers as u64 + 1;
            let disk = D::empty(disk_seed(seed, id));
            let core = Core::new(core_config(id), disk.open().unwrap(), &logger()).unwrap();
            servers.push(Server::new(id, disk, Some(core), false));
            servers.push(Server::new(id + 1, D::empty(0), None, true));
        }
        Sim {
            rng: StdRng::seed_from_u64(config.seed),
            config,
            servers,
            network: Vec::new(),
            isolated: BTreeSet::new(),
            now: 0,
            next_tag: 0,
            next_write: 0,
            acknowledged: Vec::new(),
            leaders: LeaderLog::default(),
            crashes: 0,
            partitions: 0,
            delivered: 0,
        }
    }

    pub fn run_faults(&mut self) {
        for step in 0..self.config.fault_steps {
            self.inject_faults();
            if self.rng.gen_bool(self.config.write) {
                self.client_write();
            }
            if self.config.joins && step >= self.config.fault_steps / 4 && step % 20 == 0 {
                self.join_next();
            }
            self.step(true);
        }
    }

    /// Asks the leader, if any, to add the joiner, or once the leader has
    /// it, the ghost (in that order, so they get the ids their servers
    /// have). A request lost to a fault is asked again later.
    fn join_next(&mut self) {
        let Some(index) = self.leader() else {
            return;
        };
        self.next_tag += 1;
        let tag = self.next_tag;
        let core = self.servers[index].core.as_mut().unwrap();
        let has = |core: &Core<D::Store>, name: &str| {
            let state = core.state();
            let state = state.read().unwrap();
            state.members.values().any(|m| m.name == name)
        };
        let (name, address) = if !has(core, JOINER) {
            (JOINER, "sim:joiner")
        } else if !has(core, GHOST) {
            (GHOST, "sim:ghost")
        } else {
            return;
        };
        let _ = core.add_member(tag, name.into(), address.into());
    }

    /// Steps without faults (still asking for the joins, if configured)
    /// until `done` holds, at most `steps`; returns whether it did.
    pub fn run_until(&mut self, steps: u64, done: impl Fn(&Self) -> bool) -> bool {
        for step in 0..steps {
            if done(self) {
                return true;
            }
            if self.config.joins && step % 20 == 0 {
                self.join_next();
            }
            self.step(false);
        }
        done(self)
    }

    /// Each running server's Raft voters.
    pub fn voters(&self) -> Vec<(u64, Vec<u64>)> {
        self.servers
            .iter()
            .filter_map(|s| s.core.as_ref().map(|c| (s.id, c.status().voters)))
            .collect()
    }

    /// Heals every partition, restarts every crashed server and runs until
    /// all servers have applied the same index (bounded).
    pub fn heal_and_settle(&mut self) {
        self.isolated.clear();
        for index in 0..self.servers.len() {
            if self.servers[index].core.is_none() && !self.servers[index].ghost {
                self.restart(index);
            }
        }
        // One more write after healing, retried until acknowledged: once it
        // is, everything before it is committed too.
        let mut last_write = None;
        for step in 0..self.config.settle_steps {
            let acknowledged = last_write
                .as_ref()
                .is_some_and(|name| self.acknowledged.contains(name));
            if !acknowledged && step % 100 == 0 && self.client_write() {
                last_write = Some(format!("w{}", self.next_write));
            }
            self.step(false);
            if acknowledged && self.settled() {
                return;
            }
        }
        let servers: Vec<String> = self
            .servers
            .iter()
            .map(|s| match &s.core {
                Some(core) => {
                    let st = core.status();
                    format!(
                        "s{}: {} term {} commit {} applied {} last {} snap {}",
                        st.id,
                        st.role,
                        st.term,
                        st.commit_index,
                        st.applied_index,
                        st.last_index,
                        st.snapshot_index
                    )
                }
                None => format!("s{}: down", s.id),
            })
            .collect();
        panic!(
            "cluster did not settle within {} steps after healing: {}\n{}",
            self.config.settle_steps,
            self.stats(),
            servers.join("\n")
        );
    }

    fn settled(&self) -> bool {
        let applied: BTreeSet<u64> = self.states().iter().map(|(_, s)| s.applied_index).collect();
        applied.len() == 1
    }

    pub fn states(&self) -> Vec<(u64, State)> {
        self.servers
            .iter()
            .filter_map(|s| {
                s.core
                    .as_ref()
                    .map(|c| (s.id, c.state().read().unwrap().clone()))
            })
            .collect()
    }

    pub fn acknowledged(&self) -> &[String] {
        &self.acknowledged
    }

    fn leader(&self) -> Option<usize> {
        self.servers
            .iter()
            .position(|s| s.core.as_ref().is_some_and(|c| c.is_leader()))
    }

    fn inject_faults(&mut self) {
        if self.rng.gen_bool(self.config.crash) {
            let index = self.rng.gen_range(0..self.servers.len());
            if self.servers[index].ghost {
                // It never runs.
            } else if self.servers[index].core.is_some() {
                // Lose everything not on disk: the node, its inbox, waiters,
                // a snapshot being written, and what was not fsynced.
                let server = &mut self.servers[index];
                server.core = None;
                server.waiting.clear();
                server.snapshot_job = None;
                server.disk.crash();
                self.crashes += 1;
            } else {
                self.restart(index);
            }
        }
        if self.rng.gen_bool(self.config.partition) {
            if self.isolated.is_empty() {
                let id = self.rng.gen_range(1..=self.servers.len() as u64);
                self.isolated.insert(id);
                self.partitions += 1;
            } else {
                self.isolated.clear();
            }
        }
        // Crashed servers come back eventually, so a majority can form.
        for index in 0..self.servers.len() {
            if self.servers[index].core.is_none()
                && !self.servers[index].ghost
                && self.rng.gen_bool(0.01)
            {
                self.restart(index);
            }
        }
    }

    fn restart(&mut self, index: usize) {
        let server = &mut self.servers[index];
        let store = server.disk.open().unwrap_or_else(|e| {
            panic!(
                "server {} failed to open its disk after a crash: {e}",
                server.id
            )
        });
        let core = Core::new(core_config(server.id), store, &logger()).unwrap_or_else(|e| {
            panic!("server {} failed to restart from its disk: {e}", server.id)
        });
        server.core = Some(core);
    }

    /// A client sends a write to whichever server leads; returns whether it
    /// was accepted (not yet acknowledged).
    fn client_write(&mut self) -> bool {
        let Some(index) = self.leader() else {
            return false;
        };
        self.next_write += 1;
        self.next_tag += 1;
        let name = format!("w{}", self.next_write);
        let spec = ServiceSpec {
            name: name.clone(),
            runtime: RuntimeKind::Process,
            replicas: 1,
            command: vec!["true".into()],
            ..Default::default()
        };
        let tag = self.next_tag;
        let server = &mut self.servers[index];
        let accepted = server
            .core
            .as_mut()
            .unwrap()
            .propose(tag, Command::CreateService { spec })
            .is_ok();
        if accepted {
            server.waiting.push((tag, name));
        }
        accepted
    }

    fn step(&mut self, faults: bool) {
        self.now += 1;
        // Deliver due messages, in random order among the due ones.
        let mut due = Vec::new();
        let mut index = 0;
        while index < self.network.len() {
            if self.network[index].at <= self.now {
                due.push(self.network.swap_remove(index).message);
            } else {
                index += 1;
            }
        }
        for message in due {
            let (from, to) = (message.from, message.to);
            if self.isolated.contains(&from) || self.isolated.contains(&to) {
                continue;
            }
            if let Some(core) = self.servers[(to - 1) as usize].core.as_mut() {
                core.step(message);
                self.delivered += 1;
            }
        }
        let tick = self.now.is_multiple_of(TICK_EVERY);
        for index in 0..self.servers.len() {
            let Some(core) = self.servers[index].core.as_mut() else {
                continue;
            };
            if tick {
                core.tick();
            }
            // The snapshot worker finishes; the core compacts its log.
            let due = self.servers[index]
                .snapshot_job
                .as_ref()
                .is_some_and(|(at, _)| *at <= self.now);
            let server = &mut self.servers[index];
            let core = server.core.as_mut().unwrap();
            if due {
                let (_, job) = server.snapshot_job.take().unwrap();
                let file = core.store_snapshot_file().unwrap();
                core.snapshot_written(job.write(&file))
                    .unwrap_or_else(|e| panic!("server {} failed to compact: {e}", index + 1));
            }
            let mut outbox = Vec::new();
            let output = core
                .advance(&mut |messages| outbox.extend(messages))
                .unwrap_or_else(|e| panic!("server {} failed: {e}", index + 1));
            if let Some(job) = core.take_snapshot_job() {
                let at = self.now + self.rng.gen_range(1..=20);
                self.servers[index].snapshot_job = Some((at, job));
            }
            let core = self.servers[index].core.as_ref().unwrap();
            let status = core.status();
            if status.role == "leader" {
                self.leaders.observe(status.term, status.id);
            }
            for (tag, reply) in output.replies {
                let server = &mut self.servers[index];
                if let Some(pos) = server.waiting.iter().position(|(t, _)| *t == tag) {
                    let (_, name) = server.waiting.remove(pos);
                    if let Reply::Command(Ok(_)) = reply {
                        self.acknowledged.push(name);
                    }
                }
            }
            for message in outbox {
                self.send(message, faults);
            }
        }
    }

    fn send(&mut self, message: Message, faults: bool) {
        let dropped = faults && self.rng.gen_bool(self.config.drop);
        if message.get_msg_type() == MessageType::MsgSnapshot {
            // The transport tells the sender whether a snapshot got through.
            if let Some(core) = self.servers[(message.from - 1) as usize].core.as_mut() {
                core.report_snapshot(message.to, !dropped);
            }
        }
        if dropped {
            return;
        }
        let copies = if faults && self.rng.gen_bool(self.config.duplicate) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let delay = 1 + self.rng.gen_range(0..=self.config.max_delay);
            self.network.push(InFlight {
                at: self.now + delay,
                message: message.clone(),
            });
        }
    }

    pub fn stats(&self) -> Stats {
        let mut faults = FaultStats::default();
        for server in &self.servers {
            faults += server.disk.faults();
        }
        Stats {
            faults,
            virtual_ms: self.now * STEP_MS,
            acknowledged: self.acknowledged.len(),
            crashes: self.crashes,
            partitions: self.partitions,
            terms: self.leaders.terms(),
            delivered: self.delivered,
        }
    }
}

#[derive(Debug, Default)]
pub struct Stats {
    pub virtual_ms: u64,
    pub acknowledged: usize,
    pub crashes: u32,
    pub partitions: u32,
    pub terms: usize,
    pub delivered: u64,
    /// What the disks' faults did (none for [`MemLog`]).
    pub faults: FaultStats,
}

impl std::ops::AddAssign for Stats {
    fn add_assign(&mut self, other: Stats) {
        self.virtual_ms += other.virtual_ms;
        self.acknowledged += other.acknowledged;
        self.crashes += other.crashes;
        self.partitions += other.partitions;
        self.terms += other.terms;
        self.delivered += other.delivered;
        self.faults += other.faults;
    }
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ms virtual, {} writes acknowledged, {} crashes, {} partitions, {} terms with a leader, {} messages delivered; \
             disk: {} fsyncs, {} torn writes ({} with garbage or zeros after them), {} unsynced bytes lost",
            self.virtual_ms,
            self.acknowledged,
            self.crashes,
            self.partitions,
            self.terms,
            self.delivered,
            self.faults.fsyncs,
            self.faults.torn_writes,
            self.faults.garbage_tails,
            self.faults.lost_bytes
        )
    }
}
