//! The consensus core: raft-rs' `RawNode` plus the state machine, driven
//! synchronously. It owns no threads, sockets or clocks: the driver thread
//! (and the deterministic simulation) feed it ticks, messages and
//! proposals, and send what [`Core::advance`] returns.
//!
//! `advance` handles one `Ready` in raft-rs' order: messages that may leave
//! at once, a received snapshot, committed entries, then the new entries
//! and hard state made durable together (one fsync), messages that needed
//! them durable, and the light ready's commit index and entries.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use protobuf::Message as _;
use raft::eraftpb::{
    ConfChange, ConfChangeSingle, ConfChangeType, ConfState, Entry, EntryType, Message,
    MessageType, Snapshot, SnapshotMetadata,
};
use raft::{RawNode, StateRole};
use serde::{Deserialize, Serialize};

use super::log_store::{LogStore, StorageFailure};
use super::snapshot_file::SnapshotFile;
use super::{ProposeError, RaftStatus};
use crate::state::{Command, CommandError, Member, Outcome, State};

/// How far behind the commit index a learner's matched index may be for
/// the leader to promote it to voter.
pub const PROMOTION_LAG: u64 = 64;

#[derive(Clone, Debug)]
pub struct CoreConfig {
    pub id: u64,
    pub election_ticks: usize,
    pub heartbeat_ticks: usize,
    /// Applied entries between two snapshots (and log compactions).
    pub snapshot_every: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error("raft failed: {0}")]
    Raft(#[from] raft::Error),
    #[error(transparent)]
    Storage(#[from] StorageFailure),
    #[error("snapshot state is corrupt: {0}")]
    Snapshot(#[from] serde_json::Error),
}

/// A normal entry's payload: the command, and who waits for its result.
#[derive(Serialize, Deserialize)]
struct Proposal {
    origin: u64,
    tag: u64,
    command: Command,
}

/// A membership change's context: who waits, and the member's details.
#[derive(Serialize, Deserialize)]
struct ConfContext {
    origin: u64,
    tag: u64,
    member: Option<Member>,
}

/// Caps the proposer's time in a forwarded proposal at `now_ms`, this
/// server's clock: a follower whose clock runs ahead must not move the
/// state's clock (event times, the deadlines measured from it) forward for
/// good. The leader's own proposals carry its own time.
pub fn cap_forwarded_time(message: &mut Message, now_ms: u64) {
    if message.get_msg_type() != MessageType::MsgPropose {
        return;
    }
    for entry in message.mut_entries().iter_mut() {
        if entry.get_entry_type() != EntryType::EntryNormal || entry.data.is_empty() {
            continue;
        }
        let Ok(mut proposal) = serde_json::from_slice::<Proposal>(&entry.data) else {
            continue;
        };
        if let Command::Timed { time_ms, .. } = &mut proposal.command {
            if *time_ms > now_ms {
                *time_ms = now_ms;
                if let Ok(data) = serde_json::to_vec(&proposal) {
                    entry.data = data.into();
                }
            }
        }
    }
}

/// Whether raft-rs can restore a snapshot's configuration: it panics on
/// one it cannot (no voters, a learner that is also a voter, duplicates).
/// Checked the way it restores: the same changes on a scratch tracker, and
/// the configuration they give must be the one stated.
fn restorable(cs: &ConfState) -> bool {
    let single = |node_id: &u64, change_type| {
        let mut cc = ConfChangeSingle {
            node_id: *node_id,
            ..Default::default()
        };
        cc.set_change_type(change_type);
        cc
    };
    let outgoing: Vec<ConfChangeSingle> = cs
        .voters_outgoing
        .iter()
        .map(|id| single(id, ConfChangeType::AddNode))
        .collect();
    let incoming: Vec<ConfChangeSingle> = cs
        .voters_outgoing
        .iter()
        .map(|id| single(id, ConfChangeType::RemoveNode))
        .chain(
            cs.voters
                .iter()
                .map(|id| single(id, ConfChangeType::AddNode)),
        )
        .chain(
            cs.learners
                .iter()
                .chain(&cs.learners_next)
                .map(|id| single(id, ConfChangeType::AddLearnerNode)),
        )
        .collect();
    let mut tracker = raft::ProgressTracker::new(1);
    let simple = if outgoing.is_empty() {
        &incoming
    } else {
        &outgoing
    };
    for cc in simple {
        let Ok((conf, changes)) = raft::Changer::new(&tracker).simple(std::slice::from_ref(cc))
        else {
            return false;
        };
        tracker.apply_conf(conf, changes, 1);
    }
    if !outgoing.is_empty() {
        let Ok((conf, changes)) =
            raft::Changer::new(&tracker).enter_joint(cs.auto_leave, &incoming)
        else {
            return false;
        };
        tracker.apply_conf(conf, changes, 1);
    }
    let restored = tracker.conf().to_conf_state();
    let sorted = |ids: &[u64]| {
        let mut ids = ids.to_vec();
        ids.sort_unstable();
        ids
    };
    sorted(&restored.voters) == sorted(&cs.voters)
        && sorted(&restored.learners) == sorted(&cs.learners)
        && sorted(&restored.voters_outgoing) == sorted(&cs.voters_outgoing)
        && sorted(&restored.learners_next) == sorted(&cs.learners_next)
        && restored.auto_leave == cs.auto_leave
}

/// Terms and indexes from this on are refused in messages: no cluster
/// reaches them (a thousand elections a second for eight thousand years),
/// and raft-rs adds to them unchecked (a term of `u64::MAX` overflowed at
/// the next election).
const IMPLAUSIBLE: u64 = 1 << 48;

/// What a membership change does to the state's members.
fn member_command(cc: &ConfChange, context: Option<&ConfContext>) -> Option<Command> {
    match (cc.get_change_type(), context.and_then(|c| c.member.clone())) {
        (ConfChangeType::RemoveNode, _) => Some(Command::RemoveMember { id: cc.node_id }),
        (change, Some(mut member)) => {
            member.learner = change == ConfChangeType::AddLearnerNode;
            Some(Command::UpsertMember { member })
        }
        (_, None) => None,
    }
}

/// The state a server's own data leads to, without its peers: its latest
/// snapshot, then every entry of its log applied in order, committed or
/// not (as a leader elected alone would commit them). For `skiff server
/// --recover`, whose cluster lost its quorum: no other server can say
/// which of the last entries committed, and an acknowledged write is
/// among them.
pub fn replay(store: &impl LogStore) -> Result<State, CoreError> {
    let mut state = super::log_store::snapshot_state(store)?;
    let first = store.first_index()?;
    let last = store.last_index()?;
    if last < first {
        return Ok(state);
    }
    let entries = store.entries(first, last + 1, None, raft::GetEntriesContext::empty(false))?;
    for entry in entries {
        match entry.get_entry_type() {
            EntryType::EntryNormal if !entry.data.is_empty() => {
                match serde_json::from_slice::<Proposal>(&entry.data) {
                    Ok(proposal) => {
                        let _ = state.apply(entry.index, proposal.command);
                    }
                    Err(_) => state.skip(entry.index),
                }
            }
            EntryType::EntryConfChange => {
                let cc = ConfChange::parse_from_bytes(&entry.data)
                    .map_err(|e| StorageFailure(e.to_string()))?;
                let context: Option<ConfContext> = serde_json::from_slice(&entry.context).ok();
                match member_command(&cc, context.as_ref()) {
                    Some(command) => {
                        let _ = state.apply(entry.index, command);
                    }
                    None => state.skip(entry.index),
                }
            }
            _ => state.skip(entry.index),
        }
    }
    Ok(state)
}

/// A snapshot to encode and write off the consensus thread: the state as
/// of `metadata.index`, cloned (cheap next to encoding and writing it).
pub struct SnapshotJob {
    state: State,
    metadata: SnapshotMetadata,
}

impl SnapshotJob {
    /// Encodes the state and writes the snapshot durably.
    pub fn write(self, file: &SnapshotFile) -> Result<SnapshotMetadata, StorageFailure> {
        let mut snapshot = Snapshot {
            data: self.state.to_image().into(),
            ..Default::default()
        };
        snapshot.set_metadata(self.metadata.clone());
        file.write(&snapshot)?;
        Ok(self.metadata)
    }
}

/// The result for a waiter identified by its tag.
#[derive(Debug)]
pub enum Reply {
    Command(Result<Outcome, CommandError>),
    /// A membership change applied; carries the member's id.
    Membership(Result<u64, ProposeError>),
    /// The read index was reached: local reads are now linearizable.
    Read,
}

#[derive(Default)]
pub struct Output {
    pub replies: Vec<(u64, Reply)>,
    /// Time spent applying committed entries, if any were.
    pub apply_time: Option<std::time::Duration>,
    /// Time an inline snapshot took, if one was taken.
    pub snapshot_time: Option<std::time::Duration>,
}

pub struct Core<S: LogStore> {
    node: RawNode<S>,
    state: Arc<RwLock<State>>,
    config: CoreConfig,
    /// Read requests waiting for their read index to be applied.
    reads: Vec<(u64, u64)>,
    /// Read requests raft-rs has not answered yet, with the ticks they may
    /// still wait. raft-rs drops a read index request while there is no
    /// leader or the leader has not committed in its term, so these are
    /// asked again on every tick.
    unanswered_reads: Vec<(u64, u32)>,
    snapshot_index: u64,
    /// Set by a membership change: the next snapshot must carry the new
    /// configuration, or a joining server refuses it (it is not in it).
    snapshot_now: bool,
    /// A snapshot handed to a worker and not yet written.
    snapshot_in_flight: bool,
    snapshot_job: Option<SnapshotJob>,
}

impl<S: LogStore> Core<S> {
    /// Restarts from whatever `store` holds (a new, a bootstrapped or a
    /// crashed server alike).
    pub fn new(config: CoreConfig, mut store: S, logger: &slog::Logger) -> Result<Self, CoreError> {
        let state = super::log_store::snapshot_state(&store)?;
        // Everything applied was committed: the stored commit index may lag
        // if the server crashed between the two writes.
        store.persist_commit(state.applied_index)?;
        let snapshot_index = store.first_index()? - 1;
        let shortest_election = (config.election_ticks * 4 / 5).max(config.heartbeat_ticks + 1);
        let raft_config = raft::Config {
            id: config.id,
            // The configured timeout is the middle of the random range:
            // ±20 % rather than raft-rs' default [1×, 2×), so a dead leader
            // is replaced in about the configured time; pre-vote keeps
            // split votes rare.
            election_tick: shortest_election,
            min_election_tick: shortest_election,
            max_election_tick: (config.election_ticks * 6 / 5).max(shortest_election + 1),
            heartbeat_tick: config.heartbeat_ticks,
            applied: state.applied_index,
            pre_vote: true,
            check_quorum: true,
            max_size_per_msg: 1024 * 1024,
            max_inflight_msgs: 256,
            ..Default::default()
        };
        raft_config.validate()?;
        let node = RawNode::new(&raft_config, store, logger)?;
        Ok(Core {
            node,
            state: Arc::new(RwLock::new(state)),
            config,
            reads: Vec::new(),
            unanswered_reads: Vec::new(),
            snapshot_index,
            snapshot_now: false,
            snapshot_in_flight: false,
            snapshot_job: None,
        })
    }

    pub fn state(&self) -> Arc<RwLock<State>> {
        self.state.clone()
    }

    pub fn id(&self) -> u64 {
        self.config.id
    }

    /// Whether this server applied everything it knows to be committed.
    pub fn applied_all_committed(&self) -> bool {
        let log = &self.node.raft.raft_log;
        log.applied >= log.committed
    }

    /// The leader this server knows of; 0 when it knows none.
    pub fn leader_id(&self) -> u64 {
        self.node.raft.leader_id
    }

    pub fn is_leader(&self) -> bool {
        self.node.raft.state == StateRole::Leader
    }

    /// On the leader, each member's log index it knows to match its own
    /// (raft-rs' progress); empty on a follower.
    pub fn matched(&self) -> HashMap<u64, u64> {
        if !self.is_leader() {
            return HashMap::new();
        }
        self.node
            .raft
            .prs()
            .iter()
            .map(|(id, progress)| (*id, progress.matched))
            .collect()
    }

    /// True when this server is the only voter: no reason to wait an
    /// election timeout before leading.
    pub fn is_sole_voter(&self) -> bool {
        self.node
            .raft
            .prs()
            .conf()
            .voters()
            .ids()
            .iter()
            .eq([self.config.id])
    }

    pub fn campaign(&mut self) -> Result<(), CoreError> {
        Ok(self.node.campaign()?)
    }

    pub fn tick(&mut self) {
        self.node.tick();
        self.unanswered_reads.retain(|(_, ticks)| *ticks > 0);
        for (tag, ticks) in &mut self.unanswered_reads {
            *ticks -= 1;
            self.node.read_index(tag.to_be_bytes().to_vec());
        }
    }

    /// Feeds a message from a peer. Messages from unknown or removed peers
    /// and stale ones are dropped, as Raft allows; so are messages no
    /// correct peer sends (see [`Core::refusal`]).
    pub fn step(&mut self, message: Message) {
        if let Some(reason) = self.refusal(&message) {
            tracing::warn!(
                from = message.from,
                to = message.to,
                kind = ?message.get_msg_type(),
                term = message.term,
                reason,
                "raft message refused"
            );
            return;
        }
        if let Err(err) = self.node.step(message) {
            tracing::debug!(error = %err, "raft message dropped");
        }
    }

    /// Why a message from the network must not reach raft-rs, which trusts
    /// its peers and panics on some messages that none of them sends (found
    /// by fuzzing, issue #17): one addressed to another server or claiming
    /// to come from this one, without a term where raft-rs always sets one
    /// or with one where it sets none (forwarded proposals and read
    /// requests): raft-rs panicked answering a vote request without a term,
    /// and forwarding a proposal with one to the leader. Also a heartbeat
    /// committing past this server's log, an append of entries that are
    /// not consecutive with non-decreasing terms, a snapshot whose
    /// configuration raft-rs cannot restore, a log position of term 0, a
    /// term or index beyond [`IMPLAUSIBLE`], a leadership transfer, or a
    /// proposal without entries.
    pub fn refusal(&self, message: &Message) -> Option<&'static str> {
        let id = self.config.id;
        if matches!(
            message.get_msg_type(),
            MessageType::MsgTransferLeader | MessageType::MsgTimeoutNow
        ) {
            // Skiff never transfers leadership, and raft-rs panicked
            // forwarding a transfer request to the leader.
            return Some("a leadership transfer, which Skiff never starts");
        }
        if message.get_msg_type() == MessageType::MsgPropose && message.get_entries().is_empty() {
            // raft-rs: "stepped empty MsgProp" (a panic).
            return Some("a proposal without entries");
        }
        if message.to != id {
            return Some("addressed to another server");
        }
        if message.from == id || message.from == raft::INVALID_ID {
            return Some("no valid sender");
        }
        let termless = matches!(
            message.get_msg_type(),
            MessageType::MsgPropose | MessageType::MsgReadIndex
        );
        if (message.term == 0) != termless {
            return Some("a term where raft-rs sets none, or none where it sets one");
        }
        let snapshot = message.get_snapshot().get_metadata();
        let numbers = [
            message.term,
            message.log_term,
            message.index,
            message.commit,
            message.commit_term,
            message.reject_hint,
            message.request_snapshot,
            snapshot.index,
            snapshot.term,
        ];
        let entries = message.get_entries().iter().flat_map(|e| [e.index, e.term]);
        if numbers.into_iter().chain(entries).any(|n| n >= IMPLAUSIBLE) {
            return Some("a term or index no cluster reaches");
        }
        if message.get_msg_type() == MessageType::MsgHeartbeat
            && message.commit > self.node.raft.raft_log.last_index()
        {
            // A leader sends at most the index this server has matched;
            // raft-rs panics on more (it takes it for a lost log).
            return Some("a commit index beyond this server's log");
        }
        // raft-rs takes term 0 for any index past its log as a match: a
        // snapshot or an append "after" such a position moved the commit
        // index past the log, or appended with a gap. Every log here starts
        // at a snapshot of term 1 or more.
        let zero_term = match message.get_msg_type() {
            MessageType::MsgSnapshot => snapshot.term == 0 || snapshot.index == 0,
            MessageType::MsgAppend => message.index > 0 && message.log_term == 0,
            _ => false,
        };
        if zero_term {
            return Some("a position in the log with term 0");
        }
        if message.get_msg_type() == MessageType::MsgSnapshot
            && !restorable(snapshot.get_conf_state())
        {
            return Some("a snapshot whose configuration raft-rs cannot restore");
        }
        if message.get_msg_type() == MessageType::MsgAppend {
            // raft-rs appends what it is given; the log stores index the
            // entries by position, so a gap made them read out of bounds.
            let mut previous = (message.index, message.log_term);
            for entry in message.get_entries() {
                if Some(entry.index) != previous.0.checked_add(1)
                    || entry.term < previous.1
                    || entry.term > message.term
                {
                    return Some("entries that do not follow the previous one in order");
                }
                previous = (entry.index, entry.term);
            }
        }
        None
    }

    pub fn report_unreachable(&mut self, peer: u64) {
        self.node.report_unreachable(peer);
    }

    pub fn report_snapshot(&mut self, peer: u64, delivered: bool) {
        let status = if delivered {
            raft::SnapshotStatus::Finish
        } else {
            raft::SnapshotStatus::Failure
        };
        self.node.report_snapshot(peer, status);
    }

    pub fn not_leader(&self) -> ProposeError {
        match self.node.raft.leader_id {
            0 => ProposeError::NoLeader,
            id => ProposeError::NotLeader(id),
        }
    }

    /// Proposes a command; its result comes back tagged `tag` from
    /// `advance` once committed and applied here.
    pub fn propose(&mut self, tag: u64, command: Command) -> Result<(), ProposeError> {
        self.propose_all(vec![(tag, command)])
    }

    /// Proposes commands together: one append on the leader and one
    /// message to each follower for the lot (raft-rs' `RawNode::propose`
    /// takes one entry, and its leader sends every follower a message per
    /// proposal). Each result comes back tagged from `advance` once
    /// committed and applied here. On a follower raft-rs forwards the
    /// proposal to the leader in the Raft message stream (as etcd does),
    /// and the follower answers when it applies the entries; a proposal
    /// lost on the way is never answered, so the caller gives up on it
    /// after a while (see the driver). Either every command is proposed or
    /// none is.
    pub fn propose_all(&mut self, commands: Vec<(u64, Command)>) -> Result<(), ProposeError> {
        if self.node.raft.leader_id == 0 {
            return Err(ProposeError::NoLeader);
        }
        let origin = self.config.id;
        let entries: Vec<Entry> = commands
            .into_iter()
            .map(|(tag, command)| {
                let data = serde_json::to_vec(&Proposal {
                    origin,
                    tag,
                    command,
                })
                .expect("commands always serialize");
                Entry {
                    data: data.into(),
                    ..Default::default()
                }
            })
            .collect();
        let mut message = Message::default();
        message.set_msg_type(MessageType::MsgPropose);
        message.from = origin;
        message.set_entries(entries.into());
        self.node.step(message).map_err(|_| ProposeError::NoLeader)
    }

    /// Adds a server as a learner: it receives the log but does not count
    /// for quorum until [`Core::maybe_promote`] makes it a voter, so a
    /// server that never catches up (a wrong or unreachable address) can
    /// never cost the cluster its quorum. A server of the same name and
    /// address that is already a member gets its id back (a join retried
    /// after a crash).
    pub fn add_member(
        &mut self,
        tag: u64,
        name: String,
        address: String,
    ) -> Result<Option<u64>, ProposeError> {
        if !self.is_leader() {
            return Err(self.not_leader());
        }
        let (existing, next_id) = {
            let state = self.state.read().unwrap_or_else(|p| p.into_inner());
            let existing = state.members.values().find(|m| m.name == name).cloned();
            let conf = self.node.raft.prs().conf();
            let highest = state
                .members
                .keys()
                .copied()
                .chain(conf.voters().ids().iter())
                .chain(conf.learners().iter().copied())
                .max()
                .unwrap_or(0);
            (existing, highest + 1)
        };
        if let Some(member) = existing {
            if member.address == address {
                return Ok(Some(member.id));
            }
            return Err(ProposeError::Membership(format!(
                "a server named {name} is already a member at {}; remove it first with `skiff cluster remove {name}`",
                member.address
            )));
        }
        let member = Member {
            id: next_id,
            name,
            address,
            learner: true,
        };
        let cc = ConfChange {
            change_type: ConfChangeType::AddLearnerNode,
            node_id: next_id,
            ..Default::default()
        };
        self.propose_conf_change(tag, cc, Some(member))?;
        Ok(None)
    }

    pub fn remove_member(&mut self, tag: u64, name: &str) -> Result<(), ProposeError> {
        if !self.is_leader() {
            return Err(self.not_leader());
        }
        let id = {
            let state = self.state.read().unwrap_or_else(|p| p.into_inner());
            state
                .members
                .values()
                .find(|m| m.name == name)
                .map(|m| m.id)
        };
        let Some(id) = id else {
            return Err(ProposeError::Membership(format!(
                "no server named {name} is a member"
            )));
        };
        let cc = ConfChange {
            change_type: ConfChangeType::RemoveNode,
            node_id: id,
            ..Default::default()
        };
        self.propose_conf_change(tag, cc, None)
    }

    /// On the leader, promotes one learner that has caught up (its
    /// matched index within [`PROMOTION_LAG`] of the commit index) to a
    /// voter. Called on every turn; one membership change at a time, so
    /// nothing happens while another is pending. A learner that never
    /// answers keeps a matched index of 0 and stays a learner.
    pub fn maybe_promote(&mut self) {
        if !self.is_leader() || self.node.raft.has_pending_conf() {
            return;
        }
        let committed = self.node.raft.raft_log.committed;
        let prs = self.node.raft.prs();
        let mut learners: Vec<u64> = prs.conf().learners().iter().copied().collect();
        learners.sort_unstable();
        let ready = learners.into_iter().find(|id| {
            prs.get(*id).is_some_and(|progress| {
                progress.matched > 0 && progress.matched + PROMOTION_LAG >= committed
            })
        });
        let Some(id) = ready else {
            return;
        };
        let member = {
            let state = self.state.read().unwrap_or_else(|p| p.into_inner());
            state.members.get(&id).cloned()
        };
        let Some(mut member) = member else {
            return;
        };
        member.learner = false;
        let cc = ConfChange {
            change_type: ConfChangeType::AddNode,
            node_id: id,
            ..Default::default()
        };
        // Tag 0 is never a waiter's (the driver's tags start above it).
        match self.propose_conf_change(0, cc, Some(member)) {
            Ok(()) => tracing::info!(node = id, "learner caught up: promoting it to voter"),
            Err(err) => tracing::debug!(node = id, error = %err, "promotion not proposed"),
        }
    }

    fn propose_conf_change(
        &mut self,
        tag: u64,
        cc: ConfChange,
        member: Option<Member>,
    ) -> Result<(), ProposeError> {
        if self.node.raft.has_pending_conf() {
            // One membership change at a time; the caller retries (bounded).
            return Err(ProposeError::Busy(
                "another membership change is in progress".into(),
            ));
        }
        let context = serde_json::to_vec(&ConfContext {
            origin: self.config.id,
            tag,
            member,
        })
        .expect("contexts always serialize");
        self.node.propose_conf_change(context, cc).map_err(|_| {
            ProposeError::Membership("another membership change is in progress; retry".into())
        })
    }

    /// Asks for a read index; `Reply::Read` comes back once this server has
    /// applied everything committed before the request.
    pub fn read_index(&mut self, tag: u64) {
        // Longer than any caller waits (the driver gives up after 5 s).
        const READ_PATIENCE_TICKS: u32 = 100;
        self.node.read_index(tag.to_be_bytes().to_vec());
        self.unanswered_reads.push((tag, READ_PATIENCE_TICKS));
    }

    pub fn status(&self) -> RaftStatus {
        let raft = &self.node.raft;
        let role = match raft.state {
            StateRole::Leader => "leader",
            StateRole::Follower => "follower",
            StateRole::Candidate => "candidate",
            StateRole::PreCandidate => "pre-candidate",
        };
        let mut voters: Vec<u64> = raft.prs().conf().voters().ids().iter().collect();
        voters.sort_unstable();
        RaftStatus {
            id: self.config.id,
            leader_id: raft.leader_id,
            term: raft.term,
            commit_index: raft.raft_log.committed,
            applied_index: raft.raft_log.applied,
            last_index: raft.raft_log.last_index(),
            snapshot_index: self.snapshot_index,
            role,
            voters,
        }
    }

    /// Handles one Ready if there is one; see the module doc for the order.
    /// `send` is called with messages as soon as they may leave: the
    /// leader's appends go out before its own fsync, so followers persist
    /// in parallel with it.
    pub fn advance(&mut self, send: &mut dyn FnMut(Vec<Message>)) -> Result<Output, CoreError> {
        let mut out = Output::default();
        if !self.node.raft.prs().conf().learners().is_empty() {
            // As soon as a learner's progress allows: until then the
            // cluster has one server fewer that votes.
            self.maybe_promote();
        }
        if self.node.has_ready() {
            let mut ready = self.node.ready();
            send(ready.take_messages());
            if !ready.snapshot().is_empty() {
                self.install_snapshot(ready.snapshot().clone())?;
            }
            self.apply(ready.take_committed_entries(), &mut out)?;
            for read in ready.take_read_states() {
                if let Ok(bytes) = <[u8; 8]>::try_from(read.request_ctx.as_slice()) {
                    let tag = u64::from_be_bytes(bytes);
                    if let Some(at) = self.unanswered_reads.iter().position(|(t, _)| *t == tag) {
                        self.unanswered_reads.swap_remove(at);
                        self.reads.push((tag, read.index));
                    }
                }
            }
            self.node.mut_store().persist(ready.entries(), ready.hs())?;
            send(ready.take_persisted_messages());
            let mut light = self.node.advance(ready);
            if let Some(commit) = light.commit_index() {
                self.node.mut_store().persist_commit(commit)?;
            }
            send(light.take_messages());
            self.apply(light.take_committed_entries(), &mut out)?;
            self.node.advance_apply();
            self.maybe_compact(&mut out)?;
        }
        let applied = self.node.raft.raft_log.applied;
        self.reads.retain(|&(tag, index)| {
            let done = index <= applied;
            if done {
                out.replies.push((tag, Reply::Read));
            }
            !done
        });
        Ok(out)
    }

    fn install_snapshot(&mut self, snapshot: Snapshot) -> Result<(), CoreError> {
        let index = snapshot.get_metadata().index;
        let mut state = State::from_image(&snapshot.data)?;
        state.applied_index = index;
        self.node.mut_store().apply_snapshot(&snapshot)?;
        *self.state.write().unwrap_or_else(|p| p.into_inner()) = state;
        self.snapshot_index = index;
        tracing::info!(index, "installed snapshot from the leader");
        Ok(())
    }

    fn apply(&mut self, entries: Vec<Entry>, out: &mut Output) -> Result<(), CoreError> {
        if entries.is_empty() {
            return Ok(());
        }
        let started = std::time::Instant::now();
        let applied = self.apply_entries(entries, out);
        *out.apply_time.get_or_insert_default() += started.elapsed();
        applied
    }

    fn apply_entries(&mut self, entries: Vec<Entry>, out: &mut Output) -> Result<(), CoreError> {
        let state = self.state.clone();
        let mut state = state.write().unwrap_or_else(|p| p.into_inner());
        for entry in entries {
            match entry.get_entry_type() {
                EntryType::EntryNormal if !entry.data.is_empty() => {
                    match serde_json::from_slice::<Proposal>(&entry.data) {
                        Ok(proposal) => {
                            let result = state.apply(entry.index, proposal.command);
                            if proposal.origin == self.config.id {
                                out.replies.push((proposal.tag, Reply::Command(result)));
                            }
                        }
                        Err(err) => {
                            // Damaged or from a newer version: every server
                            // skips it alike, so the machines stay equal.
                            tracing::error!(index = entry.index, error = %err, "undecodable entry skipped");
                            state.skip(entry.index);
                        }
                    }
                }
                EntryType::EntryConfChange => self.apply_conf_change(&entry, &mut state, out)?,
                _ => state.skip(entry.index),
            }
        }
        Ok(())
    }

    fn apply_conf_change(
        &mut self,
        entry: &Entry,
        state: &mut State,
        out: &mut Output,
    ) -> Result<(), CoreError> {
        let cc =
            ConfChange::parse_from_bytes(&entry.data).map_err(|e| StorageFailure(e.to_string()))?;
        let context: Option<ConfContext> = serde_json::from_slice(&entry.context).ok();
        let result = match self.node.apply_conf_change(&cc) {
            Ok(conf_state) => {
                self.node.mut_store().set_conf_state(conf_state)?;
                self.snapshot_now = true;
                match member_command(&cc, context.as_ref()) {
                    Some(command) => {
                        let _ = state.apply(entry.index, command);
                    }
                    None => state.skip(entry.index),
                }
                tracing::info!(node = cc.node_id, change = ?cc.get_change_type(), "membership changed");
                Ok(cc.node_id)
            }
            Err(err) => {
                state.skip(entry.index);
                Err(ProposeError::Membership(format!(
                    "membership change refused: {err}"
                )))
            }
        };
        if let Some(context) = context.filter(|c| c.origin == self.config.id) {
            out.replies.push((context.tag, Reply::Membership(result)));
        }
        Ok(())
    }

    /// Where a worker may write snapshots, if the store supports that.
    pub fn store_snapshot_file(&self) -> Option<SnapshotFile> {
        self.node.store().background_snapshots()
    }

    /// A snapshot for the caller's worker to write, if one is due.
    pub fn take_snapshot_job(&mut self) -> Option<SnapshotJob> {
        self.snapshot_job.take()
    }

    /// Called when the worker finished a [`SnapshotJob`]: compacts the log
    /// up to it. A failed write is logged and retried when next due.
    pub fn snapshot_written(
        &mut self,
        written: Result<SnapshotMetadata, StorageFailure>,
    ) -> Result<(), CoreError> {
        self.snapshot_in_flight = false;
        match written {
            Ok(metadata) if metadata.index > self.snapshot_index => {
                let index = metadata.index;
                let started = std::time::Instant::now();
                self.node.mut_store().compact_written(metadata)?;
                self.snapshot_index = index;
                tracing::info!(
                    index,
                    compact_ms = started.elapsed().as_millis() as u64,
                    "snapshot written, log compacted"
                );
            }
            Ok(_) => {}
            Err(err) => tracing::error!(error = %err, "snapshot not written; retrying later"),
        }
        Ok(())
    }

    /// Snapshots the state and compacts the log every `snapshot_every`
    /// applied entries, so the data dir stays bounded.
    fn maybe_compact(&mut self, out: &mut Output) -> Result<(), CoreError> {
        let applied = self.node.raft.raft_log.applied;
        // Servers snapshot at different indexes, a third of the interval
        // apart: when all three encoded and wrote their whole state at the
        // same index, the cluster's writes stalled together (measured: a
        // 0.3 s stall, all servers' fsyncs slow behind three snapshot
        // writes on one disk). With one server at a time, the other two
        // still make a quorum.
        let every = self.config.snapshot_every.max(1);
        let offset = (self.config.id.saturating_sub(1) % 3) * every / 3;
        let due = (applied + offset) / every > (self.snapshot_index + offset) / every;
        if !(due || self.snapshot_now) || applied <= self.snapshot_index || self.snapshot_in_flight
        {
            return Ok(());
        }
        let term = self.node.raft.raft_log.term(applied)?;
        if !self.snapshot_now && self.node.store().background_snapshots().is_some() {
            let mut metadata = SnapshotMetadata {
                index: applied,
                term,
                ..Default::default()
            };
            metadata.set_conf_state(self.node.raft.prs().conf().to_conf_state());
            let started = std::time::Instant::now();
            let state = self.state.read().unwrap_or_else(|p| p.into_inner()).clone();
            tracing::info!(
                index = applied,
                clone_ms = started.elapsed().as_millis() as u64,
                "snapshot started"
            );
            self.snapshot_job = Some(SnapshotJob { state, metadata });
            self.snapshot_in_flight = true;
            return Ok(());
        }
        // Inline: the store has no worker, or a membership change needs the
        // new configuration in the snapshot before a joiner asks for it.
        self.snapshot_now = false;
        let started = std::time::Instant::now();
        let data = self
            .state
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .to_image();
        let mut snapshot = Snapshot {
            data: data.into(),
            ..Default::default()
        };
        let metadata = snapshot.mut_metadata();
        metadata.index = applied;
        metadata.term = term;
        metadata.set_conf_state(self.node.raft.prs().conf().to_conf_state());
        let encoded = started.elapsed();
        let bytes = snapshot.data.len();
        self.node.mut_store().compact(snapshot)?;
        self.snapshot_index = applied;
        out.snapshot_time = Some(started.elapsed());
        tracing::info!(
            index = applied,
            bytes,
            encode_ms = encoded.as_millis() as u64,
            total_ms = started.elapsed().as_millis() as u64,
            "snapshot taken, log compacted"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consensus::mem::MemLog;

    /// Three cores over in-memory logs, all voters from index 1.
    fn cluster() -> Vec<Core<MemLog>> {
        let mut state = State::default();
        for id in 1..=3 {
            let member = Member {
                id,
                name: format!("s{id}"),
                address: format!("test:{id}"),
                learner: false,
            };
            state.members.insert(id, member);
        }
        let mut snapshot = Snapshot {
            data: state.to_image().into(),
            ..Default::default()
        };
        snapshot.mut_metadata().index = 1;
        snapshot.mut_metadata().term = 1;
        snapshot.mut_metadata().mut_conf_state().voters = vec![1, 2, 3];
        let logger = super::super::logger::raft_logger();
        (1..=3)
            .map(|id| {
                let mut log = MemLog::new();
                log.apply_snapshot(&snapshot).unwrap();
                let config = CoreConfig {
                    id,
                    election_ticks: 10,
                    heartbeat_ticks: 2,
                    snapshot_every: 1000,
                };
                Core::new(config, log, &logger).unwrap()
            })
            .collect()
    }

    /// Runs Readies and delivers messages until nothing moves; returns the
    /// replies each core gave.
    fn settle(cores: &mut [Core<MemLog>]) -> Vec<Vec<(u64, Reply)>> {
        let mut replies: Vec<Vec<(u64, Reply)>> = cores.iter().map(|_| Vec::new()).collect();
        for _ in 0..100 {
            let mut messages = Vec::new();
            for (index, core) in cores.iter_mut().enumerate() {
                let output = core.advance(&mut |m| messages.extend(m)).unwrap();
                replies[index].extend(output.replies);
            }
            if messages.is_empty() {
                break;
            }
            for message in messages {
                cores[(message.to - 1) as usize].step(message);
            }
        }
        replies
    }

    fn put(key: &str) -> Command {
        Command::PutVariable {
            key: key.into(),
            value: "v".into(),
        }
    }

    #[test]
    fn a_follower_proposes_through_the_leader_and_answers_once_it_applied() {
        let mut cores = cluster();
        cores[0].campaign().unwrap();
        settle(&mut cores);
        assert!(cores[0].is_leader());
        cores[1]
            .propose_all(vec![(7, put("a")), (8, put("b"))])
            .unwrap();
        let replies = settle(&mut cores);
        let tags: Vec<u64> = replies[1].iter().map(|(tag, _)| *tag).collect();
        assert_eq!(tags, vec![7, 8], "the proposing follower answers both");
        assert!(replies[0].is_empty() && replies[2].is_empty());
        assert!(matches!(replies[1][0].1, Reply::Command(Ok(_))));
        for core in &cores {
            let state = core.state();
            let state = state.read().unwrap();
            assert!(state.variables.contains_key("a") && state.variables.contains_key("b"));
        }
    }

    #[test]
    fn servers_snapshot_at_different_indexes() {
        let mut cores = cluster();
        for core in &mut cores {
            core.config.snapshot_every = 30;
        }
        cores[0].campaign().unwrap();
        settle(&mut cores);
        for tag in 0..35 {
            cores[0].propose(tag, put(&format!("k{tag}"))).unwrap();
            settle(&mut cores);
        }
        let snapshots: Vec<u64> = cores.iter().map(|c| c.status().snapshot_index).collect();
        // Due at 30, at 20 (30 less a third) and at 10 (less two thirds).
        assert!(
            snapshots[0] >= 30
                && (20..30).contains(&snapshots[1])
                && (10..20).contains(&snapshots[2]),
            "snapshot indexes {snapshots:?}"
        );
    }

    /// Found by fuzzing (issue #17): raft-rs answered a pre-vote request
    /// without a term with a response without one, and panicked sending it
    /// ("term should be set when sending MsgRequestPreVoteResponse"); an
    /// append with a gap between its entries made the log store index out
    /// of bounds; a heartbeat committing past the log, a snapshot of a
    /// configuration without voters and a term of `u64::MAX` (at the next
    /// election) panicked raft-rs.
    #[test]
    fn messages_no_correct_peer_sends_are_refused_before_raft_rs_sees_them() {
        let cores = cluster();
        let message = |kind, from, to, term| {
            let mut m = Message::default();
            m.set_msg_type(kind);
            (m.from, m.to, m.term) = (from, to, term);
            m
        };
        let up_to_date = |mut m: Message| {
            (m.log_term, m.index) = (1, 1);
            m
        };
        let hostile = [
            up_to_date(message(MessageType::MsgRequestPreVote, 2, 1, 0)),
            up_to_date(message(MessageType::MsgRequestVote, 2, 1, 0)),
            message(MessageType::MsgHeartbeat, 2, 3, 5),
            message(MessageType::MsgHeartbeat, 1, 1, 5),
            message(MessageType::MsgHeartbeat, 0, 1, 5),
            message(MessageType::MsgPropose, 2, 1, 2),
            message(MessageType::MsgHeartbeat, 2, 1, u64::MAX),
            message(MessageType::MsgTransferLeader, 2, 1, 2),
            message(MessageType::MsgPropose, 2, 1, 0),
            {
                // raft-rs: "to_commit 4 is out of range [last_index 1]".
                let mut m = message(MessageType::MsgSnapshot, 2, 1, 2);
                let meta = m.mut_snapshot().mut_metadata();
                (meta.index, meta.term) = (4, 0);
                meta.mut_conf_state().voters = vec![1, 2, 3];
                m
            },
            {
                let mut m = message(MessageType::MsgHeartbeat, 2, 1, 2);
                m.commit = 31;
                m
            },
            {
                // raft-rs: "unable to restore config ...: removed all voters".
                let mut m = message(MessageType::MsgSnapshot, 2, 1, 2);
                let meta = m.mut_snapshot().mut_metadata();
                (meta.index, meta.term) = (5, 2);
                meta.mut_conf_state().learners = vec![1];
                m
            },
            {
                // A gap: the log stores read entries by position.
                let mut m = message(MessageType::MsgAppend, 2, 1, 2);
                (m.index, m.log_term) = (1, 1);
                let entry = |index, term| Entry {
                    index,
                    term,
                    ..Default::default()
                };
                m.set_entries(vec![entry(2, 2), entry(9, 2)].into());
                m
            },
        ];
        for m in hostile {
            let mut core = cluster().swap_remove(0);
            // Without the refusal, raft-rs or the log panics here (or at
            // the next election).
            core.step(m.clone());
            core.advance(&mut |_| {}).unwrap();
            for _ in 0..30 {
                core.tick();
                core.advance(&mut |_| {}).unwrap();
            }
            assert!(core.refusal(&m).is_some(), "{m:?}");
        }
        let mut forwarded = message(MessageType::MsgPropose, 2, 1, 0);
        forwarded.mut_entries().push(Entry::default());
        assert_eq!(cores[0].refusal(&forwarded), None);
        assert_eq!(
            cores[0].refusal(&message(MessageType::MsgRequestPreVote, 2, 1, 2)),
            None
        );
        let joint = ConfState {
            voters: vec![1, 2, 3],
            voters_outgoing: vec![1, 2, 4],
            learners_next: vec![4],
            ..Default::default()
        };
        assert!(restorable(&joint), "a joint configuration restores");
        let overlap = ConfState {
            voters: vec![1, 2],
            learners: vec![2],
            ..Default::default()
        };
        assert!(!restorable(&overlap));
    }

    #[test]
    fn a_forwarded_proposal_from_a_clock_ahead_is_capped_at_the_receivers_time() {
        let proposal = |time_ms| Proposal {
            origin: 2,
            tag: 1,
            command: put("k").at_by(time_ms, None),
        };
        let message = |time_ms| {
            let mut message = Message::default();
            message.set_msg_type(MessageType::MsgPropose);
            message.mut_entries().push(Entry {
                data: serde_json::to_vec(&proposal(time_ms)).unwrap().into(),
                ..Default::default()
            });
            message
        };
        let time_of = |message: &Message| {
            let p: Proposal = serde_json::from_slice(&message.get_entries()[0].data).unwrap();
            match p.command {
                Command::Timed { time_ms, .. } => time_ms,
                other => panic!("{other:?}"),
            }
        };
        let year_ahead = 1_000 + 365 * 24 * 3600 * 1000;
        let mut ahead = message(year_ahead);
        cap_forwarded_time(&mut ahead, 1_000);
        assert_eq!(time_of(&ahead), 1_000, "capped at the receiver's clock");
        let mut behind = message(500);
        cap_forwarded_time(&mut behind, 1_000);
        assert_eq!(time_of(&behind), 500, "an earlier time is kept");
    }

    #[test]
    fn a_replayed_log_is_the_live_state_and_seeds_a_one_member_cluster() {
        let mut cores = cluster();
        for core in &mut cores {
            core.config.snapshot_every = 30;
        }
        cores[0].campaign().unwrap();
        settle(&mut cores);
        for tag in 0..35 {
            cores[0].propose(tag, put(&format!("k{tag}"))).unwrap();
            settle(&mut cores);
        }
        // Part of it in a snapshot, the rest in the log.
        assert!(cores[2].status().snapshot_index > 1);
        let replayed = replay(cores[2].node.store()).unwrap();
        let live = cores[2].state().read().unwrap().clone();
        assert_eq!(replayed.variables, live.variables);
        assert_eq!(replayed.applied_index, live.applied_index);
        assert_eq!(replayed.members.len(), 3);

        let survivor = replayed.members[&3].clone();
        let mut disk = MemLog::new();
        super::super::bootstrap_from(&mut disk, replayed, survivor).unwrap();
        let mut alone = restarted(3, disk);
        assert!(alone.is_leader(), "the only voter leads");
        alone.propose(99, put("after")).unwrap();
        let mut replies = Vec::new();
        for _ in 0..3 {
            replies.extend(alone.advance(&mut |_| {}).unwrap().replies);
        }
        assert!(matches!(replies[..], [(99, Reply::Command(Ok(_)))]));
        let state = alone.state();
        let state = state.read().unwrap();
        assert_eq!(state.variables.len(), 36);
        assert_eq!(state.members.keys().copied().collect::<Vec<_>>(), vec![3]);
        assert!(state.applied_index > live.applied_index, "indexes go on");
    }

    /// A bootstrapped one-server cluster, leading.
    fn single() -> Core<MemLog> {
        let member = Member {
            id: 1,
            name: "s1".into(),
            address: "test:1".into(),
            learner: false,
        };
        let mut log = MemLog::new();
        super::super::bootstrap(&mut log, member).unwrap();
        restarted(1, log)
    }

    /// A server started on `disk`, campaigning at once if it is the only
    /// voter (as `consensus::start` does).
    fn restarted(id: u64, disk: MemLog) -> Core<MemLog> {
        let mut core = Core::new(config(id), disk, &super::super::logger::raft_logger()).unwrap();
        if core.is_sole_voter() {
            core.campaign().unwrap();
        }
        core
    }

    fn config(id: u64) -> CoreConfig {
        CoreConfig {
            id,
            election_ticks: 10,
            heartbeat_ticks: 2,
            snapshot_every: 1000,
        }
    }

    /// Ticks every core `ticks` times, settling after each; messages to a
    /// server that is not in `cores` (by id, from 1) are lost. Returns the
    /// replies each core gave.
    fn run(cores: &mut [Core<MemLog>], ticks: usize) -> Vec<Vec<(u64, Reply)>> {
        let mut replies: Vec<Vec<(u64, Reply)>> = cores.iter().map(|_| Vec::new()).collect();
        for round in 0..=ticks {
            if round > 0 {
                cores.iter_mut().for_each(Core::tick);
            }
            for _ in 0..100 {
                let mut messages = Vec::new();
                for (index, core) in cores.iter_mut().enumerate() {
                    let output = core.advance(&mut |m| messages.extend(m)).unwrap();
                    replies[index].extend(output.replies);
                }
                if messages.is_empty() {
                    break;
                }
                for message in messages {
                    let (to, snapshot) = (message.to, message.get_msg_type());
                    match cores.get_mut(to as usize - 1) {
                        Some(core) => core.step(message),
                        None if snapshot == MessageType::MsgSnapshot => {
                            cores[message.from as usize - 1].report_snapshot(to, false)
                        }
                        None => cores[message.from as usize - 1].report_unreachable(to),
                    }
                }
            }
        }
        replies
    }

    fn member(core: &Core<MemLog>, name: &str) -> Option<Member> {
        let state = core.state();
        let state = state.read().unwrap();
        state.members.values().find(|m| m.name == name).cloned()
    }

    /// Issue #14: one raw join of a server that does not exist took a
    /// one-server cluster's quorum for good (it was added as a voter).
    #[test]
    fn a_join_at_an_unreachable_address_costs_no_quorum_and_can_be_removed() {
        let mut cores = vec![single()];
        run(&mut cores, 0);
        assert!(cores[0].is_leader());
        let added = cores[0].add_member(5, "ghost".into(), "127.0.0.1:1".into());
        assert_eq!(added, Ok(None));
        let replies = run(&mut cores, 50);
        assert!(matches!(replies[0][..], [(5, Reply::Membership(Ok(2)))]));
        let ghost = member(&cores[0], "ghost").expect("the ghost is a member");
        assert!(ghost.learner, "it never caught up: still a learner");
        assert_eq!(cores[0].status().voters, vec![1]);
        assert!(cores[0].is_leader(), "the leader kept its quorum");

        cores[0].propose(6, put("after")).unwrap();
        let replies = run(&mut cores, 1);
        assert!(matches!(replies[0][..], [(6, Reply::Command(Ok(_)))]));

        // Also after a restart: still the only voter, it leads at once.
        let disk = cores[0].node.store().clone();
        cores[0] = restarted(1, disk);
        run(&mut cores, 1);
        assert!(cores[0].is_leader(), "leads again after a restart");
        assert!(member(&cores[0], "ghost").unwrap().learner);

        cores[0].remove_member(7, "ghost").unwrap();
        let replies = run(&mut cores, 1);
        assert!(matches!(replies[0][..], [(7, Reply::Membership(Ok(2)))]));
        assert_eq!(member(&cores[0], "ghost"), None);
        assert!(cores[0].node.raft.prs().conf().learners().is_empty());
    }

    #[test]
    fn a_joined_server_catches_up_as_a_learner_then_becomes_a_voter() {
        let mut cores = vec![single()];
        run(&mut cores, 0);
        for tag in 0..10 {
            cores[0].propose(tag, put(&format!("k{tag}"))).unwrap();
        }
        run(&mut cores, 0);
        let added = cores[0].add_member(20, "s2".into(), "test:2".into());
        assert_eq!(added, Ok(None));
        // Committed before the newcomer runs: a learner, not a voter.
        let replies = run(&mut cores, 0);
        assert!(matches!(replies[0][..], [(20, Reply::Membership(Ok(2)))]));
        assert!(member(&cores[0], "s2").unwrap().learner);
        assert_eq!(cores[0].status().voters, vec![1]);

        let logger = super::super::logger::raft_logger();
        cores.push(Core::new(config(2), MemLog::new(), &logger).unwrap());
        run(&mut cores, 10);
        for core in &cores {
            assert_eq!(core.status().voters, vec![1, 2], "server {}", core.id());
            let s2 = member(core, "s2").unwrap();
            assert!(!s2.learner, "promoted once caught up");
            let state = core.state();
            assert!(state.read().unwrap().variables.contains_key("k9"));
        }
        assert!(cores[0].is_leader());
        // Both vote now: a write commits with the two of them.
        cores[1].propose(30, put("both")).unwrap();
        let replies = run(&mut cores, 0);
        assert!(matches!(replies[1][..], [(30, Reply::Command(Ok(_)))]));
    }

    #[test]
    fn a_proposal_without_a_leader_is_refused_at_once() {
        let mut cores = cluster();
        assert_eq!(cores[1].propose(1, put("a")), Err(ProposeError::NoLeader));
    }
}
