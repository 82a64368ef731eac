//! Consensus: one thread drives the [`Core`] (raft-rs `RawNode` over
//! [`SledStorage`] or [`WalStorage`]) and everything else talks to it through its inbox.
//!
//! The thread handles whatever arrived (ticks every 100 ms, peer messages,
//! proposals, reads, membership changes), then one `Ready` with a single
//! fsync, so throughput comes from batching rather than skipping fsync.
//! A proposal is answered only after its entry is committed and applied.
//! Commands reaching a follower are proposed there and forwarded to the
//! leader by Raft, membership changes by a call to the leader; reads wait
//! for a ReadIndex so they are linearizable on any server.

#[cfg(test)]
mod conformance;
pub mod core;
pub mod disk;
pub mod forwarded;
mod log_store;
mod logger;
pub mod mem;
mod sled_storage;
pub(crate) mod snapshot_file;
pub(crate) mod transport;
mod wal;
mod wal_storage;
mod witness;

use std::collections::HashMap;
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use raft::eraftpb::Message;
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, watch};

use self::core::{Core, CoreConfig, CoreError, Reply};
use crate::metrics::Metrics;
use crate::state::{Command, CommandError, Outcome, State};
pub use log_store::{bootstrap, bootstrap_from, LogStore, StorageFailure};
pub use sled_storage::SledStorage;
pub use snapshot_file::SnapshotFile;
pub use transport::Transport;
#[doc(hidden)]
pub use wal::{fs::WalFs, sim_fs};
pub use wal_storage::WalStorage;

/// The raft log's record codec, for the fuzz targets in `fuzz/`: not an
/// API, no other caller.
#[doc(hidden)]
pub mod fuzzing {
    pub use super::wal::{
        decode_all, encode_conf_state, encode_entries, encode_hard_state, encode_snapshot,
        is_torn_tail, Record,
    };
}

/// How long a call waits for a leader (during an election) before it
/// answers "no leader".
pub const LEADER_WAIT: Duration = Duration::from_secs(5);

/// How long a follower waits to apply a command it forwarded to the leader
/// before answering that it may or may not have been applied: Raft drops
/// a forwarded proposal silently when it is lost on the way.
const FORWARDED_PATIENCE: Duration = Duration::from_secs(5);

/// Why a write's outcome is unknown after a leader steps down or changes.
const LEADERSHIP_CHANGED: &str = "leadership changed before the write committed";

/// Why a proposal, read or membership change did not happen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum ProposeError {
    #[error("no leader elected; retry in a moment")]
    NoLeader,
    #[error("this server is not the leader (leader is server {0})")]
    NotLeader(u64),
    #[error(transparent)]
    Rejected(#[from] CommandError),
    #[error("{0}")]
    Membership(String),
    #[error("{0}")]
    Busy(String),
    /// This server's disk is under its reserve (see [`disk`]); nothing was
    /// proposed.
    #[error("{0}")]
    NoSpace(String),
    /// The outcome is unknown; the text says why (a leadership change, or
    /// a forwarded write the leader never confirmed).
    #[error("{0}; it may or may not have been applied")]
    Unknown(String),
    #[error("cannot reach the leader: {0}")]
    Forward(String),
    #[error("the consensus thread stopped")]
    Stopped,
}

impl ProposeError {
    /// Errors after which retrying cannot apply a write twice.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            ProposeError::NoLeader | ProposeError::NotLeader(_) | ProposeError::Busy(_)
        )
    }
}

/// A point-in-time view of this server's Raft progress.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RaftStatus {
    pub id: u64,
    pub leader_id: u64,
    pub term: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    pub last_index: u64,
    pub snapshot_index: u64,
    pub role: &'static str,
    pub voters: Vec<u64>,
}

/// What this server knows of its contact with each peer, for `cluster
/// status`: raft-rs keeps no clock, so arrival times are noted here.
#[derive(Default)]
struct Contacts {
    /// When a Raft message from each peer last arrived.
    heard: HashMap<u64, Instant>,
    /// On the leader, each member's matched index (`Core::matched`).
    matched: HashMap<u64, u64>,
}

/// One peer as this server sees it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerContact {
    /// How long ago a Raft message from it last arrived; `None`: never
    /// since this server started.
    pub since_heard: Option<Duration>,
    /// On the leader: the index of its log known to match the leader's.
    pub matched: Option<u64>,
}

/// What the leader can be asked to do on a follower's behalf.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Request {
    Command(Box<Command>),
    AddMember { name: String, address: String },
    RemoveMember { name: String },
}

/// The answer to a [`Request`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Response {
    Outcome(Outcome),
    Member(u64),
}

pub(crate) enum Inbox {
    Request {
        request: Request,
        reply: oneshot::Sender<Result<Response, ProposeError>>,
        /// Refused unless this server leads (else a command is forwarded
        /// to the leader through Raft).
        leader_only: bool,
    },
    Read {
        reply: oneshot::Sender<Result<(), ProposeError>>,
    },
    Step(Message),
    Unreachable(u64),
    SnapshotSent {
        to: u64,
        delivered: bool,
    },
    SnapshotWritten(Result<raft::eraftpb::SnapshotMetadata, StorageFailure>),
    Shutdown,
}

/// Messages the consensus thread's inbox holds at most. A flood of
/// requests or peer messages then meets `Busy` (retried by callers within
/// their deadline) or is dropped (Raft sends again) instead of growing
/// the server's memory without bound; at 10,000 writes/s it is 1.6 s of
/// work.
pub const INBOX_CAPACITY: usize = 16 * 1024;

/// The sending side of the consensus thread's bounded inbox.
#[derive(Clone)]
pub(crate) struct InboxSender(std_mpsc::SyncSender<Inbox>);

/// The inbox was full (or the thread stopped); the message was not queued.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum NotQueued {
    Full,
    Stopped,
}

impl InboxSender {
    /// Queues `message` unless the inbox is full.
    pub(crate) fn offer(&self, message: Inbox) -> Result<(), NotQueued> {
        self.0.try_send(message).map_err(|e| match e {
            std_mpsc::TrySendError::Full(_) => NotQueued::Full,
            std_mpsc::TrySendError::Disconnected(_) => NotQueued::Stopped,
        })
    }

    /// Queues `message`, waiting for room: for what must not be lost (a
    /// written snapshot, shutdown), from threads that may block.
    pub(crate) fn send(&self, message: Inbox) {
        let _ = self.0.send(message);
    }
}

impl NotQueued {
    fn into_error(self) -> ProposeError {
        match self {
            NotQueued::Full => ProposeError::Busy(format!(
                "this server's consensus inbox is full ({INBOX_CAPACITY} messages waiting); retry in a moment"
            )),
            NotQueued::Stopped => ProposeError::Stopped,
        }
    }
}

/// How this server takes part in Raft.
#[derive(Clone, Debug)]
pub struct ConsensusConfig {
    pub id: u64,
    pub tick: Duration,
    pub election_ticks: usize,
    pub heartbeat_ticks: usize,
    pub snapshot_every: u64,
    /// Writes are refused while the data dir's free space is under this
    /// reserve (`None`: never).
    pub disk_reserve: Option<Arc<disk::DiskReserve>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConsensusError {
    #[error(transparent)]
    Core(#[from] CoreError),
    #[error("failed to start the consensus thread: {0}")]
    Thread(std::io::Error),
}

/// The handle everyone else holds: propose, read, change membership.
#[derive(Clone)]
pub struct Consensus {
    inbox: InboxSender,
    state: Arc<RwLock<State>>,
    status: watch::Receiver<RaftStatus>,
    transport: Arc<Transport>,
    id: u64,
    contacts: Arc<Mutex<Contacts>>,
    election_timeout: Duration,
    disk_reserve: Option<Arc<disk::DiskReserve>>,
}

impl Consensus {
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Runs a command through the leader and waits until it is committed
    /// and applied on this server.
    pub async fn propose(&self, command: Command) -> Result<Outcome, ProposeError> {
        match self.request(Request::Command(Box::new(command))).await? {
            Response::Outcome(outcome) => Ok(outcome),
            Response::Member(_) => Err(ProposeError::Stopped),
        }
    }

    /// Sends `request` to the leader, waiting out elections for at most
    /// [`LEADER_WAIT`]. Only errors that guarantee nothing was proposed are
    /// retried, so a write is never applied twice.
    ///
    /// A command is proposed on this server even when it follows: Raft
    /// forwards it to the leader in the batched peer stream, which costs
    /// far less than a gRPC call per write (measured: 64 clients spread
    /// over 3 servers reached 4,900 writes/s with a call per forwarded
    /// write, 7,000 with every client on the leader). Membership changes
    /// still go to the leader by a call.
    pub async fn request(&self, request: Request) -> Result<Response, ProposeError> {
        if let Some(why) = self.disk_reserve.as_ref().and_then(|d| d.refusal()) {
            return Err(ProposeError::NoSpace(why));
        }
        let deadline = Instant::now() + LEADER_WAIT;
        let mut status = self.status.clone();
        let local = matches!(request, Request::Command(_));
        loop {
            let leader = status.borrow_and_update().leader_id;
            let result = if leader == self.id || (local && leader != 0) {
                self.send_request(request.clone(), !local).await
            } else if leader != 0 {
                self.transport.forward(leader, &request).await
            } else {
                Err(ProposeError::NoLeader)
            };
            match result {
                Err(err) if err.is_retryable() && Instant::now() < deadline => {
                    let wait = deadline
                        .saturating_duration_since(Instant::now())
                        .min(Duration::from_millis(200));
                    let _ = tokio::time::timeout(wait, status.changed()).await;
                }
                result => return result,
            }
        }
    }

    /// Runs `request` on this server, which must be the leader (else
    /// `NotLeader`, and nothing is proposed).
    pub async fn request_local(&self, request: Request) -> Result<Response, ProposeError> {
        self.send_request(request, true).await
    }

    async fn send_request(
        &self,
        request: Request,
        leader_only: bool,
    ) -> Result<Response, ProposeError> {
        let (reply, answer) = oneshot::channel();
        self.inbox
            .offer(Inbox::Request {
                request,
                reply,
                leader_only,
            })
            .map_err(NotQueued::into_error)?;
        answer.await.map_err(|_| ProposeError::Stopped)?
    }

    /// Waits until this server has applied everything committed when the
    /// call was made (Raft's ReadIndex), so reading local state afterwards
    /// is linearizable.
    pub async fn read_barrier(&self) -> Result<(), ProposeError> {
        let (reply, answer) = oneshot::channel();
        self.inbox
            .offer(Inbox::Read { reply })
            .map_err(NotQueued::into_error)?;
        match tokio::time::timeout(LEADER_WAIT, answer).await {
            Ok(answer) => answer.map_err(|_| ProposeError::Stopped)?,
            Err(_) => Err(ProposeError::NoLeader),
        }
    }

    /// The applied state. Hold the guard briefly: the consensus thread
    /// waits for it to apply entries.
    pub fn state(&self) -> RwLockReadGuard<'_, State> {
        self.state
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn status(&self) -> RaftStatus {
        self.status.borrow().clone()
    }

    /// Changes whenever the status does, including every applied index.
    pub fn watch_status(&self) -> watch::Receiver<RaftStatus> {
        self.status.clone()
    }

    pub fn is_leader(&self) -> bool {
        self.status.borrow().leader_id == self.id
    }

    pub(crate) fn deliver(&self, mut message: Message) {
        core::cap_forwarded_time(&mut message, crate::controllers::now_ms());
        self.contacts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .heard
            .insert(message.from, Instant::now());
        // A message dropped from a full inbox is sent again by Raft.
        if self.inbox.offer(Inbox::Step(message)) == Err(NotQueued::Full) {
            tracing::debug!("consensus inbox full: a peer message dropped");
        }
    }

    /// `peer` as this server sees it (see [`PeerContact`]).
    pub fn contact(&self, peer: u64) -> PeerContact {
        let contacts = self.contacts.lock().unwrap_or_else(|p| p.into_inner());
        PeerContact {
            since_heard: contacts.heard.get(&peer).map(Instant::elapsed),
            matched: contacts.matched.get(&peer).copied(),
        }
    }

    /// How long followers wait for the leader before electing another: a
    /// peer not heard from for this long counts as unreachable.
    pub fn election_timeout(&self) -> Duration {
        self.election_timeout
    }

    /// Stops the consensus thread after its current turn.
    pub fn shutdown(&self) {
        self.inbox.send(Inbox::Shutdown);
    }
}

/// Starts the consensus thread over `store`. The caller has bootstrapped
/// or joined the store already; see `server.rs`.
pub fn start<S: LogStore + Send + 'static>(
    store: S,
    config: ConsensusConfig,
    transport: Arc<Transport>,
    metrics: Arc<Metrics>,
) -> Result<(Consensus, std::thread::JoinHandle<Result<(), CoreError>>), ConsensusError> {
    let core_config = CoreConfig {
        id: config.id,
        election_ticks: config.election_ticks,
        heartbeat_ticks: config.heartbeat_ticks,
        snapshot_every: config.snapshot_every,
    };
    let mut core = Core::new(core_config, store, &logger::raft_logger())?;
    if core.is_sole_voter() {
        core.campaign()?;
    }
    let (inbox_tx, inbox_rx) = std_mpsc::sync_channel(INBOX_CAPACITY);
    let inbox_tx = InboxSender(inbox_tx);
    let (status_tx, status_rx) = watch::channel(core.status());
    let contacts = Arc::new(Mutex::new(Contacts::default()));
    let handle = Consensus {
        inbox: inbox_tx.clone(),
        state: core.state(),
        status: status_rx,
        transport: transport.clone(),
        id: config.id,
        contacts: contacts.clone(),
        election_timeout: config.tick * u32::try_from(config.election_ticks).unwrap_or(u32::MAX),
        disk_reserve: config.disk_reserve,
    };
    transport.attach(inbox_tx.clone(), core.state());
    // Snapshots are encoded and written by a worker, so a large state does
    // not stall the consensus thread (measured: ~400 ms for 8 MB inline).
    let snapshot_jobs = match core.store_snapshot_file() {
        Some(file) => {
            let (jobs, job_queue) = std_mpsc::channel::<core::SnapshotJob>();
            let inbox = inbox_tx.clone();
            let metrics = metrics.clone();
            std::thread::Builder::new()
                .name("raft-snapshot".into())
                .spawn(move || {
                    for job in job_queue {
                        let started = Instant::now();
                        let written = job.write(&file);
                        crate::metrics::observe(&metrics.snapshot_duration, started.elapsed());
                        inbox.send(Inbox::SnapshotWritten(written));
                    }
                })
                .map_err(ConsensusError::Thread)?;
            Some(jobs)
        }
        None => None,
    };
    let driver = Driver {
        core,
        transport,
        status: status_tx,
        waiters: HashMap::new(),
        // Tags must not repeat across restarts: entries replayed after a
        // restart carry tags of the previous run.
        next_tag: u64::from(rand::random::<u32>()) << 32,
        tick: config.tick,
        metrics,
        started: HashMap::new(),
        forwarded: HashMap::new(),
        queued: Vec::new(),
        snapshot_jobs,
        failure: None,
        contacts,
    };
    let thread = std::thread::Builder::new()
        .name("raft".into())
        .spawn(move || driver.run(inbox_rx))
        .map_err(ConsensusError::Thread)?;
    Ok((handle, thread))
}

type ResponseSender = oneshot::Sender<Result<Response, ProposeError>>;

/// A command waiting for the end of the turn to be proposed.
struct Queued {
    tag: u64,
    command: Command,
    reply: ResponseSender,
    leader_only: bool,
}

enum Waiter {
    Request(ResponseSender),
    Read(oneshot::Sender<Result<(), ProposeError>>),
}

struct Driver<S: LogStore> {
    core: Core<S>,
    transport: Arc<Transport>,
    status: watch::Sender<RaftStatus>,
    waiters: HashMap<u64, Waiter>,
    next_tag: u64,
    tick: Duration,
    metrics: Arc<Metrics>,
    /// When each waiting proposal reached this server, for the histogram.
    started: HashMap<u64, Instant>,
    /// Commands proposed while following, by tag, with when and to which
    /// leader: answered when applied here, or given up on after
    /// [`FORWARDED_PATIENCE`] or when that leader is no longer the leader.
    forwarded: HashMap<u64, (Instant, u64)>,
    /// Commands received in this turn, proposed together before the Ready.
    queued: Vec<Queued>,
    snapshot_jobs: Option<std_mpsc::Sender<core::SnapshotJob>>,
    /// A storage failure met while handling the inbox; stops the thread.
    failure: Option<CoreError>,
    /// Where the members' matched indexes are published.
    contacts: Arc<Mutex<Contacts>>,
}

impl<S: LogStore> Driver<S> {
    fn run(mut self, inbox: std_mpsc::Receiver<Inbox>) -> Result<(), CoreError> {
        let mut next_tick = Instant::now() + self.tick;
        loop {
            let wait = next_tick.saturating_duration_since(Instant::now());
            match inbox.recv_timeout(wait) {
                Ok(Inbox::Shutdown) => break,
                Ok(message) => {
                    self.handle(message);
                    // Take what else is queued: one Ready, one fsync.
                    for message in inbox.try_iter().take(8192) {
                        if matches!(message, Inbox::Shutdown) {
                            return Ok(());
                        }
                        self.handle(message);
                    }
                }
                Err(std_mpsc::RecvTimeoutError::Timeout) => {}
                Err(std_mpsc::RecvTimeoutError::Disconnected) => break,
            }
            self.propose_queued();
            if Instant::now() >= next_tick {
                self.core.tick();
                self.expire_forwarded();
                next_tick = Instant::now() + self.tick;
            }
            let turn = Instant::now();
            if let Some(err) = self.failure.take() {
                tracing::error!(error = %err, "consensus stopped: storage failure");
                self.fail_all(ProposeError::Stopped);
                return Err(err);
            }
            let transport = self.transport.clone();
            let output = match self.core.advance(&mut |messages| transport.send(messages)) {
                Ok(output) => output,
                Err(err) => {
                    tracing::error!(error = %err, "consensus stopped: storage or raft failure");
                    self.fail_all(ProposeError::Stopped);
                    return Err(err);
                }
            };
            if !output.replies.is_empty() {
                crate::metrics::observe(&self.metrics.ready_latency, turn.elapsed());
            }
            if let Some(took) = output.apply_time {
                crate::metrics::observe(&self.metrics.apply_latency, took);
            }
            if let Some(took) = output.snapshot_time {
                crate::metrics::observe(&self.metrics.snapshot_duration, took);
            }
            if let (Some(job), Some(jobs)) = (self.core.take_snapshot_job(), &self.snapshot_jobs) {
                let _ = jobs.send(job);
            }
            for (tag, reply) in output.replies {
                self.answer(tag, reply);
            }
            self.publish_status();
        }
        Ok(())
    }

    fn handle(&mut self, message: Inbox) {
        match message {
            Inbox::Request {
                request,
                reply,
                leader_only,
            } => {
                if leader_only && !self.core.is_leader() {
                    let _ = reply.send(Err(self.core.not_leader()));
                    return;
                }
                let tag = self.tag();
                let result = match request {
                    Request::Command(command) => {
                        self.queued.push(Queued {
                            tag,
                            command: *command,
                            reply,
                            leader_only,
                        });
                        return;
                    }
                    Request::AddMember { name, address } => {
                        match self.core.add_member(tag, name, address) {
                            Ok(Some(existing)) => {
                                let _ = reply.send(Ok(Response::Member(existing)));
                                return;
                            }
                            Ok(None) => Ok(()),
                            Err(err) => Err(err),
                        }
                    }
                    Request::RemoveMember { name } => self.core.remove_member(tag, &name),
                };
                match result {
                    Ok(()) => {
                        self.metrics.proposals.inc();
                        self.started.insert(tag, Instant::now());
                        self.waiters.insert(tag, Waiter::Request(reply));
                    }
                    Err(err) => {
                        self.metrics.proposals_failed.inc();
                        let _ = reply.send(Err(err));
                    }
                }
            }
            Inbox::Read { reply } => {
                let tag = self.tag();
                self.core.read_index(tag);
                self.waiters.insert(tag, Waiter::Read(reply));
            }
            Inbox::Step(message) => self.core.step(message),
            Inbox::Unreachable(peer) => self.core.report_unreachable(peer),
            Inbox::SnapshotSent { to, delivered } => self.core.report_snapshot(to, delivered),
            Inbox::SnapshotWritten(written) => {
                if let Err(err) = self.core.snapshot_written(written) {
                    self.failure = Some(err);
                }
            }
            Inbox::Shutdown => {}
        }
    }

    /// Proposes the commands that arrived in this turn as one batch.
    fn propose_queued(&mut self) {
        if self.queued.is_empty() {
            return;
        }
        let mut commands = Vec::with_capacity(self.queued.len());
        let mut replies = Vec::with_capacity(self.queued.len());
        let leading = self.core.is_leader();
        for queued in std::mem::take(&mut self.queued) {
            if queued.leader_only && !leading {
                // Leadership moved while the inbox was read.
                let _ = queued.reply.send(Err(self.core.not_leader()));
                continue;
            }
            commands.push((queued.tag, queued.command));
            replies.push((queued.tag, queued.reply));
        }
        if commands.is_empty() {
            return;
        }
        let result = self.core.propose_all(commands);
        let (now, following) = (Instant::now(), !self.core.is_leader());
        let leader = self.core.leader_id();
        for (tag, reply) in replies {
            match &result {
                Ok(()) => {
                    self.metrics.proposals.inc();
                    self.started.insert(tag, now);
                    if following {
                        self.forwarded.insert(tag, (now, leader));
                    }
                    self.waiters.insert(tag, Waiter::Request(reply));
                }
                Err(err) => {
                    self.metrics.proposals_failed.inc();
                    let _ = reply.send(Err(err.clone()));
                }
            }
        }
    }

    fn tag(&mut self) -> u64 {
        self.next_tag += 1;
        self.next_tag
    }

    fn answer(&mut self, tag: u64, reply: Reply) {
        self.forwarded.remove(&tag);
        if let Some(started) = self.started.remove(&tag) {
            crate::metrics::observe(&self.metrics.commit_latency, started.elapsed());
        }
        match (self.waiters.remove(&tag), reply) {
            (Some(Waiter::Request(tx)), Reply::Command(result)) => {
                let _ = tx.send(result.map(Response::Outcome).map_err(ProposeError::from));
            }
            (Some(Waiter::Request(tx)), Reply::Membership(result)) => {
                let _ = tx.send(result.map(Response::Member));
            }
            (Some(Waiter::Read(tx)), Reply::Read) => {
                let _ = tx.send(Ok(()));
            }
            (Some(waiter), _) => {
                self.waiters.insert(tag, waiter);
            }
            (None, _) => {}
        }
    }

    /// Answers forwarded commands that waited too long: lost on the way,
    /// or still to come; either way the caller must be told. Not while
    /// this server is still applying what it knows is committed (catching
    /// up after a restart, say): the command may be among those entries.
    fn expire_forwarded(&mut self) {
        if self.forwarded.is_empty() || !self.core.applied_all_committed() {
            return;
        }
        let expired: Vec<u64> = self
            .forwarded
            .iter()
            .filter(|(_, (at, _))| at.elapsed() >= FORWARDED_PATIENCE)
            .map(|(tag, _)| *tag)
            .collect();
        for tag in expired {
            self.fail_forwarded(
                tag,
                format!(
                    "the leader did not confirm the forwarded write within {} s",
                    FORWARDED_PATIENCE.as_secs()
                ),
            );
        }
    }

    fn fail_forwarded(&mut self, tag: u64, why: String) {
        self.forwarded.remove(&tag);
        self.started.remove(&tag);
        if let Some(Waiter::Request(tx)) = self.waiters.remove(&tag) {
            let _ = tx.send(Err(ProposeError::Unknown(why)));
        }
    }

    fn fail_all(&mut self, err: ProposeError) {
        self.started.clear();
        self.forwarded.clear();
        for (_, waiter) in self.waiters.drain() {
            match waiter {
                Waiter::Request(tx) => {
                    let _ = tx.send(Err(err.clone()));
                }
                Waiter::Read(tx) => {
                    let _ = tx.send(Err(err.clone()));
                }
            }
        }
    }

    fn publish_status(&mut self) {
        self.contacts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .matched = self.core.matched();
        let status = self.core.status();
        let previous = self.status.borrow().clone();
        if status.leader_id != previous.leader_id && status.leader_id != 0 {
            self.metrics.leader_changes.inc();
        }
        if status.snapshot_index != previous.snapshot_index {
            self.metrics.snapshots.inc();
        }
        let was_leader = previous.role == "leader";
        if was_leader && status.role != "leader" {
            // Entries proposed by a deposed leader may or may not commit.
            self.fail_all(ProposeError::Unknown(LEADERSHIP_CHANGED.into()));
        } else if status.leader_id != previous.leader_id && !self.forwarded.is_empty() {
            // So may commands forwarded to a previous leader.
            let tags: Vec<u64> = self
                .forwarded
                .iter()
                .filter(|(_, (_, leader))| *leader != status.leader_id)
                .map(|(tag, _)| *tag)
                .collect();
            for tag in tags {
                self.fail_forwarded(tag, LEADERSHIP_CHANGED.into());
            }
        }
        self.status.send_if_modified(|current| {
            let changed = *current != status;
            *current = status;
            changed
        });
    }
}

#[cfg(test)]
mod inbox_tests {
    use super::*;

    #[test]
    fn a_full_inbox_refuses_requests_as_busy_and_a_stopped_one_as_stopped() {
        let (tx, rx) = std_mpsc::sync_channel(1);
        let inbox = InboxSender(tx);
        assert_eq!(inbox.offer(Inbox::Unreachable(2)), Ok(()));
        let full = inbox.offer(Inbox::Unreachable(3)).unwrap_err();
        assert_eq!(full, NotQueued::Full);
        let busy = full.into_error();
        assert!(busy.is_retryable(), "callers retry a busy inbox: {busy}");
        assert!(busy.to_string().contains("inbox is full"), "{busy}");
        drop(rx);
        assert_eq!(
            inbox.offer(Inbox::Unreachable(4)).unwrap_err().into_error(),
            ProposeError::Stopped
        );
    }
}
