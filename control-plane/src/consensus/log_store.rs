//! What the consensus core needs from durable storage beyond raft-rs'
//! read-only [`Storage`] trait: making a `Ready` durable, snapshots and
//! compaction. Snapshots carry the applied state.

use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::Storage;

use crate::state::{Member, State};

/// A storage operation failed; the server cannot go on safely.
#[derive(Debug, thiserror::Error)]
#[error("storage failed: {0}")]
pub struct StorageFailure(pub String);

impl StorageFailure {
    pub fn from(err: impl std::fmt::Display) -> Self {
        StorageFailure(err.to_string())
    }
}

pub trait LogStore: Storage {
    /// Whether this server has ever been part of a cluster: it knows
    /// voters, or its log starts after a snapshot.
    fn is_initialized(&self) -> bool {
        let voters = self
            .initial_state()
            .is_ok_and(|state| !state.conf_state.voters.is_empty());
        voters || self.first_index().is_ok_and(|first| first > 1)
    }

    /// Appends `entries` (dropping any conflicting suffix) and records the
    /// hard state; the entries and the hard state's term and vote are
    /// durable (fsynced) when this returns. Its commit index need not be,
    /// as for [`LogStore::persist_commit`].
    fn persist(
        &mut self,
        entries: &[Entry],
        hard_state: Option<&HardState>,
    ) -> Result<(), StorageFailure>;

    /// Raises the stored commit index. Need not be durable: a lost commit
    /// index is learned again from the leader.
    fn persist_commit(&mut self, commit: u64) -> Result<(), StorageFailure>;

    fn set_conf_state(&mut self, conf_state: ConfState) -> Result<(), StorageFailure>;

    /// Replaces the log with a snapshot received from the leader.
    fn apply_snapshot(&mut self, snapshot: &Snapshot) -> Result<(), StorageFailure>;

    /// Keeps `snapshot` as the latest one and drops the log up to its index.
    /// By default: written to the store's snapshot file, then recorded by
    /// [`LogStore::compact_written`]; an older snapshot changes nothing.
    fn compact(&mut self, snapshot: Snapshot) -> Result<(), StorageFailure> {
        let current = self.first_index().map_err(StorageFailure::from)? - 1;
        if snapshot.get_metadata().index <= current {
            return Ok(());
        }
        let file = self.background_snapshots().ok_or_else(|| {
            StorageFailure("this store keeps no snapshot file: it must implement compact".into())
        })?;
        file.write(&snapshot)?;
        self.compact_written(snapshot.get_metadata().clone())
    }

    /// Where a worker thread may write snapshots for this store, if it
    /// supports that; the core then calls [`LogStore::compact_written`].
    fn background_snapshots(&self) -> Option<super::snapshot_file::SnapshotFile> {
        None
    }

    /// Records a snapshot a worker wrote durably and drops the log up to it.
    fn compact_written(
        &mut self,
        _meta: raft::eraftpb::SnapshotMetadata,
    ) -> Result<(), StorageFailure> {
        Err(StorageFailure(
            "this store takes snapshots inline only".into(),
        ))
    }
}

/// The snapshot a new cluster starts from: index 1, term 1, `first` as the
/// only voter and member. Starting every cluster from a snapshot means a
/// joining server always receives one, and so learns the first membership,
/// which is not in the log.
pub fn bootstrap_snapshot(first: Member) -> Snapshot {
    let mut state = State::default();
    let id = first.id;
    state.members.insert(id, first);
    state.applied_index = 1;
    let mut snapshot = Snapshot {
        data: state.to_image().into(),
        ..Default::default()
    };
    let metadata = snapshot.mut_metadata();
    metadata.index = 1;
    metadata.term = 1;
    metadata.mut_conf_state().voters = vec![id];
    snapshot
}

/// Turns an empty store into the first server of a new cluster.
pub fn bootstrap(store: &mut impl LogStore, first: Member) -> Result<(), StorageFailure> {
    store.apply_snapshot(&bootstrap_snapshot(first))
}

/// Turns an empty store into the only server of a new cluster whose state
/// starts as `state` (a restored backup, or a recovered server's own data)
/// instead of empty. The snapshot is at the state's applied index, so
/// indexes and event numbers go on growing; the state's other members are
/// dropped, as a new cluster has only `first`.
pub fn bootstrap_from(
    store: &mut impl LogStore,
    mut state: State,
    first: Member,
) -> Result<(), StorageFailure> {
    let id = first.id;
    state.members.clear();
    state.members.insert(id, first);
    let index = state.applied_index.max(1);
    state.applied_index = index;
    let mut snapshot = Snapshot {
        data: state.to_image().into(),
        ..Default::default()
    };
    let metadata = snapshot.mut_metadata();
    metadata.index = index;
    metadata.term = 1;
    metadata.mut_conf_state().voters = vec![id];
    store.apply_snapshot(&snapshot)
}

/// The applied state as of the store's latest snapshot. The state machine
/// is persisted only in snapshots: after a restart the committed entries
/// after the snapshot are applied again (measured: keeping every applied
/// record in sled as well multiplied sled's writes and disk use by orders
/// of magnitude under load).
pub fn snapshot_state(store: &impl LogStore) -> Result<State, StorageFailure> {
    let snapshot = store.snapshot(0, 0).map_err(StorageFailure::from)?;
    let mut state = State::from_image(&snapshot.data).map_err(StorageFailure::from)?;
    state.applied_index = snapshot.get_metadata().index;
    Ok(state)
}
