//! Raft's log, `HardState`, `ConfState` and snapshots in sled, behind
//! raft-rs' own [`Storage`] trait (returning the same `StorageError`s as
//! `MemStorage`). The applied state is persisted in snapshots only, and the
//! snapshot in a file of its own ([`SnapshotFile`]).
//!
//! Each `Ready` is written as one atomic sled batch and flushed once (group
//! commit): entries and hard state of one Ready become durable together,
//! before any message that depends on them is sent.
//!
//! The default log store (`--raft-log sled`), as the design asks. The
//! write-ahead log of [`super::wal_storage`] (`--raft-log wal`) is the measured
//! alternative: sled's flush waits on its own I/O threads, 8–40 ms per
//! Ready under `bench raft`'s load on 2 cores, against ~0.2 ms for one
//! `fdatasync`.

use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, Storage, StorageError};

use super::log_store::{LogStore, StorageFailure};
use super::snapshot_file::SnapshotFile;
use super::witness::{Mark, Witness};

pub(super) const HARD_STATE: &[u8] = b"hard_state";
pub(super) const CONF_STATE: &[u8] = b"conf_state";
pub(super) const SNAPSHOT_META: &[u8] = b"snapshot_meta";
const LOG_PREFIX: &[u8] = b"log/";

pub(super) fn log_key(index: u64) -> [u8; 12] {
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

/// Compacted log entries removed per sled batch (see `compact_written`).
const COMPACT_BATCH: usize = 256;

/// The durable Raft log of one server: two sled trees, the entries and the
/// small records rewritten on every Ready (hard state, conf state, which
/// snapshot is current), plus the snapshot itself in a [`SnapshotFile`].
/// Large values stay out of sled because it rewrites a whole page when one
/// key in it changes: with the multi-megabyte snapshot next to the hard
/// state, every Ready rewrote the snapshot (measured: 12 GB of disk after
/// 30k writes).
pub struct SledStorage {
    db: sled::Db,
    log: sled::Tree,
    meta: sled::Tree,
    snapshot_file: SnapshotFile,
    hard_state: HardState,
    conf_state: ConfState,
    /// Metadata of the latest snapshot; the log starts right after it.
    snapshot_meta: SnapshotMetadata,
    last_index: u64,
    /// What the log durably held, to notice sled cutting it short.
    witness: Witness,
}

/// The witness file of the sled log whose snapshots are in `snapshots`.
const WITNESS_FILE: &str = "raft-log.witness";

impl SledStorage {
    /// Opens the log in `db` and the snapshot at `snapshot_file`; refuses a
    /// log that lost what its witness saw (see `witness`).
    pub fn open(db: &sled::Db, snapshot_file: SnapshotFile) -> Result<Self, StorageFailure> {
        Self::open_checked(db, snapshot_file, false)
    }

    /// Like [`SledStorage::open`]; with `accept_loss`
    /// (`--truncate-corrupt-log`) a log cut short is used as it is, and
    /// what it lost is logged.
    pub fn open_checked(
        db: &sled::Db,
        snapshot_file: SnapshotFile,
        accept_loss: bool,
    ) -> Result<Self, StorageFailure> {
        let open = |name: &str| db.open_tree(name).map_err(StorageFailure::from);
        let (log, meta) = (open("raft_log")?, open("raft_meta")?);
        let mut hard_state: HardState = read_pb(&meta, HARD_STATE)?.unwrap_or_default();
        let conf_state: ConfState = read_pb(&meta, CONF_STATE)?.unwrap_or_default();
        // The metadata is recorded only once the file is durable, so it never
        // names a snapshot that is not there.
        let snapshot_meta: SnapshotMetadata = read_pb(&meta, SNAPSHOT_META)?.unwrap_or_default();
        let last_logged = match log.scan_prefix(LOG_PREFIX).next_back() {
            Some(item) => key_index(&item.map_err(StorageFailure::from)?.0),
            None => 0,
        };
        let last_index = last_logged.max(snapshot_meta.index);
        // The trees are flushed together but not in one atomic batch; a
        // crash mid-flush must not leave a commit index past the log.
        hard_state.commit = hard_state.commit.min(last_index);
        let found = Mark {
            last_index,
            term: hard_state.term,
            vote: hard_state.vote,
        };
        let (mut witness, seen) = Witness::open(&snapshot_file.dir().join(WITNESS_FILE))?;
        match seen.and_then(|seen| seen.lost_in(&found)) {
            Some(why) if accept_loss => {
                tracing::error!(
                    witness = %witness.path().display(),
                    "--truncate-corrupt-log: the raft log lost records ({why}); starting from what is left. \
                     This server may have lost entries it acknowledged and the vote it cast: \
                     the cluster stays safe only if the other servers hold them"
                );
                witness.reset(found)?;
            }
            Some(why) => {
                return Err(StorageFailure(format!(
                    "the raft log in sled (DATA/raft) lost records: {why}, as {} recorded after its flushes; \
                     sled cuts its log at a damaged record when it opens. This server cannot start from it safely. \
                     Remove the server (`skiff cluster remove NAME` on a live one) and start it again with an empty data dir and --join, \
                     so that it catches up from the others; or, knowing that it may have lost acknowledged entries and its vote, \
                     start it once with --truncate-corrupt-log",
                    witness.path().display()
                )));
            }
            None => witness.advance(found)?,
        }
        Ok(SledStorage {
            db: db.clone(),
            log,
            meta,
            snapshot_file,
            hard_state,
            conf_state,
            snapshot_meta,
            last_index,
            witness,
        })
    }

    /// What the witness records once the log is flushed.
    fn mark(&self) -> Mark {
        Mark {
            last_index: self.last_index,
            term: self.hard_state.term,
            vote: self.hard_state.vote,
        }
    }

    pub fn db(&self) -> &sled::Db {
        &self.db
    }

    pub fn snapshot_file(&self) -> &SnapshotFile {
        &self.snapshot_file
    }

    fn flush(&self) -> Result<(), StorageFailure> {
        self.db.flush().map(|_| ()).map_err(StorageFailure::from)
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

pub(super) fn read_pb<M: protobuf::Message>(
    tree: &sled::Tree,
    key: &[u8],
) -> Result<Option<M>, StorageFailure> {
    let Some(bytes) = tree.get(key).map_err(StorageFailure::from)? else {
        return Ok(None);
    };
    M::parse_from_bytes(&bytes).map(Some).map_err(|e| {
        StorageFailure(format!(
            "corrupt raft record {}: {e}",
            String::from_utf8_lossy(key)
        ))
    })
}

impl LogStore for SledStorage {
    fn persist(
        &mut self,
        entries: &[Entry],
        hard_state: Option<&HardState>,
    ) -> Result<(), StorageFailure> {
        if entries.is_empty() && hard_state.is_none() {
            return Ok(());
        }
        let mut batch = sled::Batch::default();
        if let (Some(first), Some(last)) = (entries.first(), entries.last()) {
            if last.index < self.last_index {
                // A conflicting suffix goes: the witness first.
                self.witness.lower_to(Mark {
                    last_index: last.index,
                    ..self.mark()
                })?;
            }
            for stale in first.index..=self.last_index {
                batch.remove(&log_key(stale));
            }
            for entry in entries {
                batch.insert(&log_key(entry.index), pb_bytes(entry));
            }
        }
        self.log.apply_batch(batch).map_err(StorageFailure::from)?;
        if let Some(hard_state) = hard_state {
            self.meta
                .insert(HARD_STATE, pb_bytes(hard_state))
                .map_err(StorageFailure::from)?;
        }
        self.flush()?;
        if let Some(last) = entries.last() {
            self.last_index = last.index;
        }
        if let Some(hard_state) = hard_state {
            self.hard_state = hard_state.clone();
        }
        let mark = self.mark();
        self.witness.advance(mark)
    }

    fn persist_commit(&mut self, commit: u64) -> Result<(), StorageFailure> {
        if commit <= self.hard_state.commit {
            return Ok(());
        }
        self.hard_state.commit = commit;
        self.meta
            .insert(HARD_STATE, pb_bytes(&self.hard_state))
            .map_err(StorageFailure::from)?;
        Ok(())
    }

    fn set_conf_state(&mut self, conf_state: ConfState) -> Result<(), StorageFailure> {
        self.meta
            .insert(CONF_STATE, pb_bytes(&conf_state))
            .map_err(StorageFailure::from)?;
        self.conf_state = conf_state;
        Ok(())
    }

    fn apply_snapshot(&mut self, snapshot: &Snapshot) -> Result<(), StorageFailure> {
        let meta = snapshot.get_metadata();
        let mut hard_state = self.hard_state.clone();
        hard_state.term = hard_state.term.max(meta.term);
        hard_state.commit = hard_state.commit.max(meta.index);
        if meta.index < self.last_index {
            self.witness.lower_to(Mark {
                last_index: meta.index,
                ..self.mark()
            })?;
        }
        self.snapshot_file.write(snapshot)?;
        let mut records = sled::Batch::default();
        records.insert(SNAPSHOT_META, pb_bytes(meta));
        records.insert(CONF_STATE, pb_bytes(meta.get_conf_state()));
        records.insert(HARD_STATE, pb_bytes(&hard_state));
        self.meta
            .apply_batch(records)
            .map_err(StorageFailure::from)?;
        let mut stale = sled::Batch::default();
        for key in self.log.scan_prefix(LOG_PREFIX).keys() {
            stale.remove(key.map_err(StorageFailure::from)?);
        }
        self.log.apply_batch(stale).map_err(StorageFailure::from)?;
        self.flush()?;
        self.hard_state = hard_state;
        self.conf_state = meta.get_conf_state().clone();
        self.snapshot_meta = meta.clone();
        self.last_index = meta.index;
        self.snapshot_file.prune(meta.index);
        let mark = self.mark();
        self.witness.advance(mark)
    }

    fn background_snapshots(&self) -> Option<SnapshotFile> {
        Some(self.snapshot_file.clone())
    }

    fn compact_written(&mut self, meta: SnapshotMetadata) -> Result<(), StorageFailure> {
        if meta.index <= self.snapshot_meta.index {
            return Ok(());
        }
        // The file is durable: record it, then drop the entries it covers.
        self.meta
            .insert(SNAPSHOT_META, pb_bytes(&meta))
            .map_err(StorageFailure::from)?;
        // Older snapshot files go only once the new record is durable.
        self.flush()?;
        self.snapshot_file.prune(meta.index);
        // Raft never reads below the snapshot again, so the entries are
        // removed off the consensus thread (measured: ~300 ms for 30k keys),
        // in small batches: one atomic batch holds sled's write lock for
        // its whole length and the consensus thread's appends wait behind
        // it (that wait was most of the write-latency tail). Entries left
        // by a crash midway go with the next compaction.
        let (log, through) = (self.log.clone(), meta.index);
        std::thread::spawn(move || {
            let keys: Vec<sled::IVec> = log
                .range(log_key(0)..=log_key(through))
                .keys()
                .flatten()
                .collect();
            for chunk in keys.chunks(COMPACT_BATCH) {
                let mut compacted = sled::Batch::default();
                for key in chunk {
                    compacted.remove(key.clone());
                }
                if let Err(err) = log.apply_batch(compacted) {
                    tracing::warn!(error = %err, "compacted log entries not removed; the next compaction retries");
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(3));
            }
        });
        self.snapshot_meta = meta;
        Ok(())
    }
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
        let max_size = max_size.into();
        let mut entries = Vec::with_capacity((high - low).min(1024) as usize);
        let mut size = 0u64;
        for item in self.log.range(log_key(low)..log_key(high)) {
            let (_, bytes) = item.map_err(store_err)?;
            size += bytes.len() as u64;
            if !entries.is_empty() && max_size.is_some_and(|max| size > max) {
                break;
            }
            entries.push(Entry::parse_from_bytes(&bytes).map_err(store_err)?);
        }
        if entries.is_empty() || entries[0].index != low {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
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
        match self.log.get(log_key(idx)).map_err(store_err)? {
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

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        let snapshot = self
            .snapshot_file
            .read(self.snapshot_meta.index)
            .map_err(|e| store_err(e.0))?;
        if snapshot.get_metadata().index < request_index {
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        Ok(snapshot)
    }
}
