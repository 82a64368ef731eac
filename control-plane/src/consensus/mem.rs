//! An in-memory [`LogStore`] for the deterministic simulation and unit
//! tests; a fake that says so. A clone shares the same "disk", so a
//! simulated crash drops the node and keeps its storage: whatever `persist`
//! accepted counts as fsynced, whatever was only in the node is lost.

use std::sync::{Arc, Mutex, MutexGuard};

use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, Storage, StorageError};

use super::log_store::{LogStore, StorageFailure};

#[derive(Default)]
struct Disk {
    hard_state: HardState,
    conf_state: ConfState,
    snapshot: Snapshot,
    /// Entries after the snapshot's index, contiguous.
    entries: Vec<Entry>,
}

impl Disk {
    fn snapshot_index(&self) -> u64 {
        self.snapshot.get_metadata().index
    }

    fn last_index(&self) -> u64 {
        self.entries
            .last()
            .map_or(self.snapshot_index(), |e| e.index)
    }
}

#[derive(Clone, Default)]
pub struct MemLog {
    disk: Arc<Mutex<Disk>>,
}

impl MemLog {
    pub fn new() -> Self {
        Self::default()
    }

    fn disk(&self) -> MutexGuard<'_, Disk> {
        self.disk.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl LogStore for MemLog {
    fn persist(
        &mut self,
        entries: &[Entry],
        hard_state: Option<&HardState>,
    ) -> Result<(), StorageFailure> {
        let mut disk = self.disk();
        if let Some(first) = entries.first() {
            let keep = first.index.saturating_sub(disk.snapshot_index() + 1) as usize;
            if keep > disk.entries.len() {
                return Err(StorageFailure(format!(
                    "gap in log: appending {} after {}",
                    first.index,
                    disk.last_index()
                )));
            }
            disk.entries.truncate(keep);
            disk.entries.extend_from_slice(entries);
        }
        if let Some(hs) = hard_state {
            disk.hard_state = hs.clone();
        }
        Ok(())
    }

    fn persist_commit(&mut self, commit: u64) -> Result<(), StorageFailure> {
        let mut disk = self.disk();
        disk.hard_state.commit = disk.hard_state.commit.max(commit);
        Ok(())
    }

    fn set_conf_state(&mut self, conf_state: ConfState) -> Result<(), StorageFailure> {
        self.disk().conf_state = conf_state;
        Ok(())
    }

    fn apply_snapshot(&mut self, snapshot: &Snapshot) -> Result<(), StorageFailure> {
        let mut disk = self.disk();
        let meta = snapshot.get_metadata();
        disk.hard_state.term = disk.hard_state.term.max(meta.term);
        disk.hard_state.commit = disk.hard_state.commit.max(meta.index);
        disk.conf_state = meta.get_conf_state().clone();
        disk.entries.clear();
        disk.snapshot = snapshot.clone();
        Ok(())
    }

    fn compact(&mut self, snapshot: Snapshot) -> Result<(), StorageFailure> {
        let mut disk = self.disk();
        let index = snapshot.get_metadata().index;
        if index <= disk.snapshot_index() {
            return Ok(());
        }
        let drop = (index - disk.snapshot_index()) as usize;
        let drop = drop.min(disk.entries.len());
        disk.entries.drain(..drop);
        disk.snapshot = snapshot;
        Ok(())
    }
}

impl Storage for MemLog {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let disk = self.disk();
        Ok(RaftState::new(
            disk.hard_state.clone(),
            disk.conf_state.clone(),
        ))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let disk = self.disk();
        if low <= disk.snapshot_index() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > disk.last_index() + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let offset = disk.snapshot_index() + 1;
        let mut entries = disk.entries[(low - offset) as usize..(high - offset) as usize].to_vec();
        raft::util::limit_size(&mut entries, max_size.into());
        Ok(entries)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        let disk = self.disk();
        if idx == disk.snapshot_index() {
            return Ok(disk.snapshot.get_metadata().term);
        }
        if idx < disk.snapshot_index() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if idx > disk.last_index() {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        Ok(disk.entries[(idx - disk.snapshot_index() - 1) as usize].term)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.disk().snapshot_index() + 1)
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.disk().last_index())
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        let disk = self.disk();
        if disk.snapshot_index() < request_index {
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        Ok(disk.snapshot.clone())
    }
}
