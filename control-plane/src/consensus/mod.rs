//! Consensus: one task drives raft-rs' `RawNode` over [`SledStorage`].
//!
//! Everything that touches Raft goes through the task's inbox, so there is
//! no lock around the node. Each turn of the loop handles whatever arrived
//! (ticks every 100 ms, proposals), then one `Ready` in raft-rs' order:
//! send messages, apply committed entries, persist entries and hard state
//! with one sled flush (group commit), send persisted messages, advance,
//! handle the light ready. A proposal is answered only after its entry is
//! committed (durable in the log) and applied to the state machine.

mod logger;
pub mod storage;

use std::collections::HashMap;
use std::sync::{Arc, RwLock, RwLockReadGuard};
use std::time::Duration;

use raft::eraftpb::{Entry, EntryType, Message};
use raft::{RawNode, StateRole};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};

use crate::state::store::StateStore;
use crate::state::{Command, CommandError, Member, Outcome, State};
pub use storage::SledStorage;

/// How this server takes part in Raft.
#[derive(Clone, Debug)]
pub struct ConsensusConfig {
    pub id: u64,
    pub name: String,
    pub address: String,
    pub tick: Duration,
    /// Ticks without a leader before an election; about 1 s at 100 ms ticks.
    pub election_ticks: usize,
    pub heartbeat_ticks: usize,
}

/// Why a proposal was not applied.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProposeError {
    #[error("no leader elected yet; retry in a moment")]
    NoLeader,
    #[error("this server is not the leader (leader is {0})")]
    NotLeader(String),
    #[error(transparent)]
    Rejected(#[from] CommandError),
    #[error("the consensus task stopped: {0}")]
    Stopped(String),
}

#[derive(Debug, thiserror::Error)]
pub enum ConsensusError {
    #[error("raft failed: {0}")]
    Raft(#[from] raft::Error),
    #[error("raft storage failed: {0}")]
    Sled(#[from] sled::Error),
    #[error(transparent)]
    Store(#[from] crate::state::store::StoreError),
    #[error("data dir holds no cluster: start the first server with --bootstrap")]
    NotInitialized,
}

/// A point-in-time view of this server's Raft progress.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RaftStatus {
    pub id: u64,
    pub leader_id: u64,
    pub term: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    pub role: &'static str,
}

/// An entry's payload: the command and the id its proposer waits on.
#[derive(Serialize, Deserialize)]
struct Proposal {
    id: u64,
    command: Command,
}

enum Inbox {
    Propose {
        command: Command,
        reply: oneshot::Sender<Result<Outcome, ProposeError>>,
    },
}

/// The handle everyone else holds: propose commands, read applied state.
#[derive(Clone)]
pub struct Consensus {
    inbox: mpsc::Sender<Inbox>,
    state: Arc<RwLock<State>>,
    status: watch::Receiver<RaftStatus>,
    id: u64,
}

impl Consensus {
    /// Proposes a command and waits until it is committed and applied.
    /// While an election is running it waits up to `leader_wait` for a
    /// leader, then answers `NoLeader`: never a silent drop.
    pub async fn propose(&self, command: Command) -> Result<Outcome, ProposeError> {
        self.wait_for_leader(Duration::from_secs(5)).await?;
        let (reply, answer) = oneshot::channel();
        self.inbox
            .send(Inbox::Propose { command, reply })
            .await
            .map_err(|_| ProposeError::Stopped("inbox closed".into()))?;
        answer
            .await
            .map_err(|_| ProposeError::Stopped("proposal dropped".into()))?
    }

    async fn wait_for_leader(&self, limit: Duration) -> Result<(), ProposeError> {
        let mut status = self.status.clone();
        let leader = tokio::time::timeout(limit, async {
            status
                .wait_for(|s| s.leader_id != 0)
                .await
                .map(|s| s.leader_id)
        })
        .await;
        match leader {
            Ok(Ok(leader)) if leader == self.id => Ok(()),
            Ok(Ok(leader)) => Err(ProposeError::NotLeader(leader.to_string())),
            Ok(Err(_)) => Err(ProposeError::Stopped("status closed".into())),
            Err(_) => Err(ProposeError::NoLeader),
        }
    }

    /// The applied state. Hold the guard briefly: the consensus task waits
    /// for it to apply entries.
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
        let status = self.status.borrow();
        status.leader_id == self.id
    }
}

/// Opens the Raft storage and state in `db`, and starts the consensus task.
/// With `bootstrap` an empty data dir becomes a new one-member cluster; a
/// data dir that already holds a cluster ignores it.
pub fn start(
    db: &sled::Db,
    config: ConsensusConfig,
    bootstrap: bool,
    shutdown: watch::Receiver<bool>,
) -> Result<
    (
        Consensus,
        tokio::task::JoinHandle<Result<(), ConsensusError>>,
    ),
    ConsensusError,
> {
    let mut storage = SledStorage::open(db)?;
    if !storage.is_initialized() {
        if !bootstrap {
            return Err(ConsensusError::NotInitialized);
        }
        storage.bootstrap(vec![config.id])?;
    }
    let state_store = StateStore::open(db)?;
    let mut state = state_store.load()?;
    // Entries already applied were committed; a crash between the two
    // writes can leave the stored commit index behind the applied index.
    let mut batch = sled::Batch::default();
    storage.set_commit(state.applied_index, &mut batch);
    storage.write(batch)?;
    state.take_dirty();

    let raft_config = raft::Config {
        id: config.id,
        election_tick: config.election_ticks,
        heartbeat_tick: config.heartbeat_ticks,
        applied: state.applied_index,
        pre_vote: true,
        check_quorum: true,
        max_size_per_msg: 1024 * 1024,
        max_inflight_msgs: 256,
        ..Default::default()
    };
    raft_config.validate()?;
    let mut node = RawNode::new(&raft_config, storage, &logger::raft_logger())?;
    let single_voter = node.raft.prs().conf().voters().ids().iter().eq([config.id]);
    if single_voter {
        // Alone in the group: no reason to wait an election timeout.
        node.campaign()?;
    }

    let state = Arc::new(RwLock::new(state));
    let (status_tx, status_rx) = watch::channel(RaftStatus {
        id: config.id,
        ..Default::default()
    });
    let (inbox_tx, inbox_rx) = mpsc::channel(4096);
    let handle = Consensus {
        inbox: inbox_tx,
        state: state.clone(),
        status: status_rx,
        id: config.id,
    };
    let task = ConsensusTask {
        node,
        db: db.clone(),
        state_store,
        state,
        status: status_tx,
        pending: HashMap::new(),
        config,
        next_proposal_id: rand::random(),
    };
    let join = tokio::spawn(task.run(inbox_rx, shutdown));
    Ok((handle, join))
}

struct ConsensusTask {
    node: RawNode<SledStorage>,
    db: sled::Db,
    state_store: StateStore,
    state: Arc<RwLock<State>>,
    status: watch::Sender<RaftStatus>,
    pending: HashMap<u64, oneshot::Sender<Result<Outcome, ProposeError>>>,
    config: ConsensusConfig,
    next_proposal_id: u64,
}

impl ConsensusTask {
    async fn run(
        mut self,
        mut inbox: mpsc::Receiver<Inbox>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), ConsensusError> {
        let mut ticker = tokio::time::interval(self.config.tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => { self.node.tick(); }
                message = inbox.recv() => match message {
                    Some(message) => {
                        self.handle(message);
                        // Take everything already queued: one Ready, one flush.
                        while let Ok(message) = inbox.try_recv() {
                            self.handle(message);
                        }
                    }
                    None => break,
                },
                _ = shutdown.changed() => break,
            }
            self.on_ready().await?;
            self.publish_status();
        }
        self.db.flush_async().await?;
        Ok(())
    }

    fn handle(&mut self, message: Inbox) {
        match message {
            Inbox::Propose { command, reply } => {
                if self.node.raft.state != StateRole::Leader {
                    let _ = reply.send(Err(match self.node.raft.leader_id {
                        0 => ProposeError::NoLeader,
                        id => ProposeError::NotLeader(id.to_string()),
                    }));
                    return;
                }
                let id = self.next_proposal_id;
                self.next_proposal_id = self.next_proposal_id.wrapping_add(1);
                let data = serde_json::to_vec(&Proposal { id, command })
                    .expect("commands always serialize");
                match self.node.propose(vec![], data) {
                    Ok(()) => {
                        self.pending.insert(id, reply);
                    }
                    Err(err) => {
                        tracing::warn!(error = %err, "proposal dropped by raft");
                        let _ = reply.send(Err(ProposeError::NoLeader));
                    }
                }
            }
        }
    }

    async fn on_ready(&mut self) -> Result<(), ConsensusError> {
        if !self.node.has_ready() {
            return Ok(());
        }
        let mut ready = self.node.ready();
        send_messages(ready.take_messages());
        self.apply_committed(ready.take_committed_entries())?;

        let mut batch = sled::Batch::default();
        let store = self.node.mut_store();
        store.append(ready.entries(), &mut batch);
        if let Some(hard_state) = ready.hs() {
            store.set_hard_state(hard_state.clone(), &mut batch);
        }
        if !ready.entries().is_empty() || ready.hs().is_some() {
            store.write(batch)?;
            self.db.flush_async().await?;
        }
        send_messages(ready.take_persisted_messages());

        let mut light = self.node.advance(ready);
        if let Some(commit) = light.commit_index() {
            let mut batch = sled::Batch::default();
            self.node.mut_store().set_commit(commit, &mut batch);
            self.node.store().write(batch)?;
        }
        send_messages(light.take_messages());
        self.apply_committed(light.take_committed_entries())?;
        self.node.advance_apply();
        Ok(())
    }

    /// Applies committed entries to the state machine, persists the changed
    /// records with the new applied index, then answers waiting proposers.
    fn apply_committed(&mut self, entries: Vec<Entry>) -> Result<(), ConsensusError> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut answers = Vec::new();
        {
            let mut state = self
                .state
                .write()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            for entry in entries {
                if entry.data.is_empty() || entry.get_entry_type() != EntryType::EntryNormal {
                    state.skip(entry.index);
                    continue;
                }
                let proposal: Proposal = match serde_json::from_slice(&entry.data) {
                    Ok(p) => p,
                    Err(err) => {
                        // Written by a newer version or damaged: skipping it on
                        // every server alike keeps the machines equal.
                        tracing::error!(index = entry.index, error = %err, "undecodable entry skipped");
                        state.skip(entry.index);
                        continue;
                    }
                };
                let result = state.apply(entry.index, proposal.command);
                if let Some(reply) = self.pending.remove(&proposal.id) {
                    answers.push((reply, result.map_err(ProposeError::from)));
                }
            }
            self.state_store.save(&mut state)?;
        }
        for (reply, result) in answers {
            let _ = reply.send(result);
        }
        Ok(())
    }

    fn publish_status(&mut self) {
        let raft = &self.node.raft;
        let role = match raft.state {
            StateRole::Leader => "leader",
            StateRole::Follower => "follower",
            StateRole::Candidate => "candidate",
            StateRole::PreCandidate => "pre-candidate",
        };
        let status = RaftStatus {
            id: self.config.id,
            leader_id: raft.leader_id,
            term: raft.term,
            commit_index: raft.raft_log.committed,
            applied_index: raft.raft_log.applied,
            role,
        };
        let became_leader = role == "leader" && self.status.borrow().role != "leader";
        if role != "leader" && !self.pending.is_empty() {
            // Entries proposed by a deposed leader may never commit.
            for (_, reply) in self.pending.drain() {
                let _ = reply.send(Err(ProposeError::NoLeader));
            }
        }
        self.status.send_if_modified(|current| {
            let changed = *current != status;
            *current = status;
            changed
        });
        if became_leader {
            self.announce_self();
        }
    }

    /// Records this server's name and address in the state, so `cluster
    /// status` can show every member, once it leads.
    fn announce_self(&mut self) {
        let member = Member {
            id: self.config.id,
            name: self.config.name.clone(),
            address: self.config.address.clone(),
        };
        let known = self
            .state
            .read()
            .map(|s| s.members.get(&member.id) == Some(&member))
            .unwrap_or(false);
        if !known {
            let (reply, _) = oneshot::channel();
            self.handle(Inbox::Propose {
                command: Command::UpsertMember { member },
                reply,
            });
        }
    }
}

/// Sends Raft messages to peers. A one-member group has none; the gRPC
/// transport between servers arrives with replication.
fn send_messages(messages: Vec<Message>) {
    for message in messages {
        tracing::debug!(to = message.to, kind = ?message.get_msg_type(), "no transport for raft message");
    }
}
