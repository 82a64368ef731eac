//! Raft's log, `HardState` and `ConfState` in a sled tree, behind raft-rs'
//! own [`Storage`] trait (returning the same `StorageError`s as
//! `MemStorage`).
//!
//! Writes go through a [`sled::Batch`] that the consensus task applies and
//! flushes once per `Ready` (group commit): entries and hard state of one
//! Ready become durable together, before any message that depends on them
//! is sent.

use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, Storage, StorageError};

const HARD_STATE: &[u8] = b"meta/hard_state";
const CONF_STATE: &[u8] = b"meta/conf_state";
const SNAPSHOT_META: &[u8] = b"meta/snapshot_meta";
const LOG_PREFIX: &[u8] = b"log/";

fn log_key(index: u64) -> [u8; 12] {
    let mut key = [0u8; 12];
    key[..4].copy_from_slice(LOG_PREFIX);
    key[4..].copy_from_slice(&index.to_be_bytes());
    key
}

fn key_index(key: &[u8]) -> u64 {
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&key[4..12]);
    u64::from_be_bytes(bytes)
}

fn store_err(err: impl std::fmt::Display) -> raft::Error {
    raft::Error::Store(StorageError::Other(err.to_string().into()))
}

/// The durable Raft log of one server.
pub struct SledStorage {
    tree: sled::Tree,
    hard_state: HardState,
    conf_state: ConfState,
    /// Index and term of the last entry folded into a snapshot (0 if none).
    snapshot_meta: SnapshotMetadata,
    last_index: u64,
}

impl SledStorage {
    pub fn open(db: &sled::Db) -> Result<Self, sled::Error> {
        let tree = db.open_tree("raft")?;
        let hard_state = read_pb(&tree, HARD_STATE)?.unwrap_or_default();
        let conf_state = read_pb(&tree, CONF_STATE)?.unwrap_or_default();
        let snapshot_meta: SnapshotMetadata = read_pb(&tree, SNAPSHOT_META)?.unwrap_or_default();
        let last_index = match tree.scan_prefix(LOG_PREFIX).next_back() {
            Some(item) => key_index(&item?.0),
            None => snapshot_meta.index,
        };
        Ok(SledStorage {
            tree,
            hard_state,
            conf_state,
            snapshot_meta,
            last_index,
        })
    }

    /// Whether this server has ever been part of a cluster.
    pub fn is_initialized(&self) -> bool {
        !self.conf_state.voters.is_empty()
    }

    /// Makes this storage the start of a new cluster with the given voters.
    pub fn bootstrap(&mut self, voters: Vec<u64>) -> Result<(), sled::Error> {
        let conf_state = ConfState {
            voters,
            ..Default::default()
        };
        self.tree.insert(CONF_STATE, pb_bytes(&conf_state))?;
        self.conf_state = conf_state;
        self.tree.flush()?;
        Ok(())
    }

    pub fn hard_state(&self) -> &HardState {
        &self.hard_state
    }

    /// Appends entries from a Ready into `batch`, first dropping any
    /// conflicting suffix the leader overwrote.
    pub fn append(&mut self, entries: &[Entry], batch: &mut sled::Batch) {
        let Some(first) = entries.first() else { return };
        for stale in first.index..=self.last_index {
            batch.remove(&log_key(stale));
        }
        for entry in entries {
            batch.insert(&log_key(entry.index), pb_bytes(entry));
        }
        self.last_index = entries.last().map_or(self.last_index, |e| e.index);
    }

    pub fn set_hard_state(&mut self, hard_state: HardState, batch: &mut sled::Batch) {
        batch.insert(HARD_STATE, pb_bytes(&hard_state));
        self.hard_state = hard_state;
    }

    /// Raises the commit index. Everything already applied was committed,
    /// so after a crash the commit index may be raised to the applied index.
    pub fn set_commit(&mut self, commit: u64, batch: &mut sled::Batch) {
        if commit > self.hard_state.commit {
            let mut hard_state = self.hard_state.clone();
            hard_state.commit = commit;
            self.set_hard_state(hard_state, batch);
        }
    }

    pub fn write(&self, batch: sled::Batch) -> Result<(), sled::Error> {
        self.tree.apply_batch(batch)
    }

    pub fn tree(&self) -> &sled::Tree {
        &self.tree
    }

    fn first_index_inner(&self) -> u64 {
        self.snapshot_meta.index + 1
    }
}

fn pb_bytes(message: &impl protobuf::Message) -> Vec<u8> {
    message
        .write_to_bytes()
        .expect("raft messages always encode")
}

fn read_pb<M: protobuf::Message>(tree: &sled::Tree, key: &[u8]) -> Result<Option<M>, sled::Error> {
    let Some(bytes) = tree.get(key)? else {
        return Ok(None);
    };
    M::parse_from_bytes(&bytes).map(Some).map_err(|e| {
        let what = format!("corrupt raft record {}: {e}", String::from_utf8_lossy(key));
        sled::Error::Io(std::io::Error::new(std::io::ErrorKind::InvalidData, what))
    })
}

impl Storage for SledStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(
            self.hard_state.clone(),
            self.conf_state.clone(),
        ))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low < self.first_index_inner() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last_index + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let mut entries = Vec::with_capacity((high - low) as usize);
        for item in self.tree.range(log_key(low)..log_key(high)) {
            let (_, bytes) = item.map_err(store_err)?;
            entries.push(Entry::parse_from_bytes(&bytes).map_err(store_err)?);
        }
        if entries.len() as u64 != high - low {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        raft::util::limit_size(&mut entries, max_size.into());
        Ok(entries)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        if idx == self.snapshot_meta.index {
            return Ok(self.snapshot_meta.term);
        }
        if idx < self.first_index_inner() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if idx > self.last_index {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        match self.tree.get(log_key(idx)).map_err(store_err)? {
            Some(bytes) => Ok(Entry::parse_from_bytes(&bytes).map_err(store_err)?.term),
            None => Err(raft::Error::Store(StorageError::Unavailable)),
        }
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first_index_inner())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last_index)
    }

    fn snapshot(&self, _request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        // Snapshots are streamed to lagging followers once the control plane
        // is replicated; a single-member group never asks for one.
        Err(raft::Error::Store(
            StorageError::SnapshotTemporarilyUnavailable,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            data: format!("{index}@{term}").into_bytes().into(),
            ..Default::default()
        }
    }

    fn open(dir: &std::path::Path) -> SledStorage {
        SledStorage::open(&sled::open(dir).unwrap()).unwrap()
    }

    #[test]
    fn a_new_storage_is_empty_with_first_index_one() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        assert!(!s.is_initialized());
        assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (1, 0));
        assert_eq!(s.term(0).unwrap(), 0);
        assert_eq!(
            s.term(1),
            Err(raft::Error::Store(StorageError::Unavailable))
        );
    }

    #[test]
    fn appended_entries_and_hard_state_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = sled::open(dir.path()).unwrap();
            let mut s = SledStorage::open(&db).unwrap();
            s.bootstrap(vec![1]).unwrap();
            let mut batch = sled::Batch::default();
            s.append(&[entry(1, 1), entry(2, 1), entry(3, 1)], &mut batch);
            let hs = HardState {
                term: 1,
                commit: 2,
                ..Default::default()
            };
            s.set_hard_state(hs, &mut batch);
            s.write(batch).unwrap();
            db.flush().unwrap();
        }
        let s = open(dir.path());
        assert!(s.is_initialized());
        assert_eq!(s.last_index().unwrap(), 3);
        assert_eq!(s.hard_state().commit, 2);
        let got = s
            .entries(1, 4, None, GetEntriesContext::empty(false))
            .unwrap();
        assert_eq!(got, vec![entry(1, 1), entry(2, 1), entry(3, 1)]);
        assert_eq!(s.term(3).unwrap(), 1);
    }

    #[test]
    fn a_conflicting_append_truncates_the_old_suffix() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = open(dir.path());
        let mut batch = sled::Batch::default();
        s.append(&[entry(1, 1), entry(2, 1), entry(3, 1)], &mut batch);
        s.write(batch).unwrap();
        let mut batch = sled::Batch::default();
        s.append(&[entry(2, 2)], &mut batch);
        s.write(batch).unwrap();
        assert_eq!(s.last_index().unwrap(), 2);
        let got = s
            .entries(1, 3, None, GetEntriesContext::empty(false))
            .unwrap();
        assert_eq!(got, vec![entry(1, 1), entry(2, 2)]);
        let reopened = open_same(&s);
        assert_eq!(reopened.last_index().unwrap(), 2);
    }

    fn open_same(s: &SledStorage) -> SledStorage {
        // Reads the tree again from scratch, as a restart would.
        let tree = s.tree().clone();
        let last_index = tree
            .scan_prefix(LOG_PREFIX)
            .next_back()
            .map_or(0, |i| key_index(&i.unwrap().0));
        SledStorage {
            tree,
            hard_state: HardState::default(),
            conf_state: ConfState::default(),
            snapshot_meta: SnapshotMetadata::default(),
            last_index,
        }
    }

    #[test]
    fn entries_respect_max_size_but_return_at_least_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = open(dir.path());
        let mut batch = sled::Batch::default();
        s.append(&[entry(1, 1), entry(2, 1)], &mut batch);
        s.write(batch).unwrap();
        let got = s
            .entries(1, 3, Some(1), GetEntriesContext::empty(false))
            .unwrap();
        assert_eq!(got.len(), 1);
    }
}
