//! Raft's log, `HardState` and `ConfState` in a write-ahead log ([`Wal`]),
//! behind raft-rs' own [`Storage`] trait (returning the same
//! `StorageError`s as `MemStorage`). The applied state is persisted in
//! snapshots only, each in a file of its own ([`SnapshotFile`]).
//!
//! Each `Ready` is appended as one write and made durable with one
//! `fdatasync` on the consensus thread (group commit): entries and hard
//! state of one Ready become durable together, before any message that
//! depends on them is sent. The entries after the latest snapshot are also
//! kept in memory (as etcd does), so raft-rs reads them without touching
//! the disk.
//!
//! Chosen with `--raft-log wal`; the default is the sled log of
//! [`super::sled_storage`], as the design asks. Measured under `bench raft`
//! (64 clients, 3 servers on 2 cores): sled's flush hands the write to its
//! own I/O threads and waits for them, 8–40 ms per Ready under load against
//! ~0.2 ms for an `fdatasync` of this disk, its I/O threads used a third of
//! each server's CPU, and it wrote ~100 MB per server for 30 MB of entries.
//! A server whose log is still in sled has it moved into the write-ahead
//! log when it opens with `--raft-log wal`.

use std::path::Path;
use std::sync::Arc;

use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, Storage, StorageError};

use super::log_store::{LogStore, StorageFailure};
// The sled layout a log is moved out of.
use super::sled_storage::{log_key, read_pb, CONF_STATE, HARD_STATE, SNAPSHOT_META};
use super::snapshot_file::SnapshotFile;
use super::wal::fs::WalFs;
use super::wal::{self, Record, Wal};

/// What the log holds, in memory; rebuilt from the WAL's records on open.
#[derive(Default)]
struct Log {
    hard_state: HardState,
    conf_state: ConfState,
    /// Metadata of the latest snapshot; the log starts right after it.
    snapshot_meta: SnapshotMetadata,
    /// The entries after the snapshot, contiguous.
    entries: Vec<Entry>,
}

impl Log {
    fn first_index(&self) -> u64 {
        self.snapshot_meta.index + 1
    }

    fn last_index(&self) -> u64 {
        self.entries
            .last()
            .map_or(self.snapshot_meta.index, |e| e.index)
    }

    /// Appends `entries`, dropping the entries they conflict with first.
    fn append(&mut self, entries: &[Entry]) -> Result<(), StorageFailure> {
        let entries = match entries
            .iter()
            .position(|e| e.index > self.snapshot_meta.index)
        {
            Some(from) => &entries[from..],
            None => return Ok(()),
        };
        let first = entries[0].index;
        if first > self.last_index() + 1 {
            return Err(StorageFailure(format!(
                "raft log gap: entry {first} appended after {}",
                self.last_index()
            )));
        }
        self.entries.truncate((first - self.first_index()) as usize);
        self.entries.extend_from_slice(entries);
        Ok(())
    }

    /// Drops the entries up to `metadata.index`, or all of them when the
    /// snapshot replaced the log.
    fn start_after(&mut self, metadata: SnapshotMetadata, installed: bool) -> Vec<Entry> {
        if !installed && metadata.index < self.snapshot_meta.index {
            return Vec::new();
        }
        let dropped = if installed || metadata.index >= self.last_index() {
            std::mem::take(&mut self.entries)
        } else {
            let covered = metadata.index.saturating_sub(self.snapshot_meta.index) as usize;
            // Moves the few entries kept, not the many dropped.
            let kept = self.entries.split_off(covered);
            std::mem::replace(&mut self.entries, kept)
        };
        if installed {
            self.conf_state = metadata.get_conf_state().clone();
        }
        self.snapshot_meta = metadata;
        dropped
    }

    fn replay(&mut self, record: Record) -> Result<(), StorageFailure> {
        match record {
            Record::Entries(entries) => self.append(&entries)?,
            Record::HardState(hard_state) => self.hard_state = hard_state,
            Record::ConfState(conf_state) => self.conf_state = conf_state,
            Record::Snapshot {
                metadata,
                installed,
            } => {
                self.start_after(metadata, installed);
            }
        }
        Ok(())
    }

    /// Everything needed to rebuild the log, as the start of a segment.
    fn checkpoint(&self, buffer: &mut Vec<u8>) {
        wal::encode_snapshot(buffer, &self.snapshot_meta, false);
        wal::encode_hard_state(buffer, &self.hard_state);
        wal::encode_conf_state(buffer, &self.conf_state);
        wal::encode_entries(buffer, &self.entries);
    }
}

/// The durable Raft log of one server: a [`Wal`] and its contents in
/// memory, plus the snapshot in a [`SnapshotFile`].
pub struct WalStorage {
    /// Where an older version kept the log; none on a disk that never
    /// had sled (the simulation's).
    db: Option<sled::Db>,
    wal: Option<Wal>,
    snapshot_file: SnapshotFile,
    log: Log,
    /// The commit index was raised since the hard state was last written.
    commit_unwritten: bool,
}

impl WalStorage {
    /// Opens the log in `wal/` next to the snapshot directory. `db` is only
    /// read for a log kept there by an older version.
    pub fn open(db: &sled::Db, snapshot_file: SnapshotFile) -> Result<Self, StorageFailure> {
        Self::open_checked(db, snapshot_file, false)
    }

    /// Like [`WalStorage::open`]; with `cut_corrupt`
    /// (`--truncate-corrupt-log`) a record failing its checksum before the
    /// end is cut off with everything after it, and what was cut is logged.
    pub fn open_checked(
        db: &sled::Db,
        snapshot_file: SnapshotFile,
        cut_corrupt: bool,
    ) -> Result<Self, StorageFailure> {
        let wal_dir = snapshot_file.dir().with_file_name("wal");
        Self::open_in(Some(db), snapshot_file, &wal_dir, cut_corrupt)
    }

    /// Opens the log in `dir/wal` and the snapshots in `dir/snapshots` of
    /// `fs`, with no sled database: the simulation runs the real log over
    /// its fault-injecting disk ([`super::wal::sim_fs::SimFs`]) this way.
    pub fn open_on(fs: Arc<dyn WalFs>, dir: &Path) -> Result<Self, StorageFailure> {
        let snapshot_file = SnapshotFile::on(fs, dir.join("snapshots"));
        Self::open_in(None, snapshot_file, &dir.join("wal"), false)
    }

    fn open_in(
        db: Option<&sled::Db>,
        snapshot_file: SnapshotFile,
        wal_dir: &Path,
        cut_corrupt: bool,
    ) -> Result<Self, StorageFailure> {
        let fs = snapshot_file.fs().clone();
        let (wal, log) = match Wal::open_on(fs.clone(), wal_dir, cut_corrupt)? {
            Some((wal, records)) => {
                let mut log = Log::default();
                for record in records {
                    log.replay(record)?;
                }
                (wal, log)
            }
            None => {
                let log = match db {
                    Some(db) => read_sled_log(db)?,
                    None => Log::default(),
                };
                let wal = Wal::create_on(fs, wal_dir, None, |buffer| log.checkpoint(buffer))?;
                if !log.entries.is_empty() || log.snapshot_meta.index > 0 {
                    tracing::info!(
                        entries = log.entries.len(),
                        "raft log moved from sled to the write-ahead log"
                    );
                }
                if let Some(db) = db {
                    clear_sled_log(db)?;
                }
                (wal, log)
            }
        };
        let mut storage = WalStorage {
            db: db.cloned(),
            wal: Some(wal),
            snapshot_file,
            log,
            commit_unwritten: false,
        };
        // The commit index is written without an fsync: after a crash it
        // may name entries that were not durable.
        let last = storage.log.last_index();
        let commit = &mut storage.log.hard_state.commit;
        *commit = (*commit).min(last);
        Ok(storage)
    }

    /// The sled database the log was opened next to, if any.
    pub fn db(&self) -> Option<&sled::Db> {
        self.db.as_ref()
    }

    pub fn snapshot_file(&self) -> &SnapshotFile {
        &self.snapshot_file
    }

    fn wal(&mut self) -> &mut Wal {
        self.wal.as_mut().expect("the wal is open between calls")
    }

    /// Starts a new segment holding only what the log still needs.
    fn rewrite(&mut self) -> Result<(), StorageFailure> {
        let previous = self.wal.take().expect("the wal is open between calls");
        let dir = previous.dir().to_path_buf();
        let fs = previous.fs().clone();
        let log = &self.log;
        self.wal = Some(Wal::create_on(fs, &dir, Some(previous), |buffer| {
            log.checkpoint(buffer)
        })?);
        self.commit_unwritten = false;
        Ok(())
    }
}

/// Dropping a hundred thousand entries takes milliseconds; not on the
/// consensus thread.
fn drop_later(entries: Vec<Entry>) {
    if entries.len() > 1024 {
        std::thread::spawn(move || drop(entries));
    }
}

/// The log as the sled store keeps it (empty for a new server).
fn read_sled_log(db: &sled::Db) -> Result<Log, StorageFailure> {
    let open = |name: &str| db.open_tree(name).map_err(StorageFailure::from);
    let (tree, meta) = (open("raft_log")?, open("raft_meta")?);
    let mut log = Log {
        hard_state: read_pb(&meta, HARD_STATE)?.unwrap_or_default(),
        conf_state: read_pb(&meta, CONF_STATE)?.unwrap_or_default(),
        snapshot_meta: read_pb(&meta, SNAPSHOT_META)?.unwrap_or_default(),
        entries: Vec::new(),
    };
    let after = log.snapshot_meta.index + 1;
    for item in tree.range(log_key(after)..) {
        let (_, bytes) = item.map_err(StorageFailure::from)?;
        let entry = Entry::parse_from_bytes(&bytes)
            .map_err(|e| StorageFailure(format!("corrupt raft log entry in sled: {e}")))?;
        if entry.index != log.last_index() + 1 {
            break;
        }
        log.entries.push(entry);
    }
    Ok(log)
}

/// Removes a moved log from sled, once the write-ahead log is durable.
fn clear_sled_log(db: &sled::Db) -> Result<(), StorageFailure> {
    let open = |name: &str| db.open_tree(name).map_err(StorageFailure::from);
    let (tree, meta) = (open("raft_log")?, open("raft_meta")?);
    if tree.is_empty() && meta.is_empty() {
        return Ok(());
    }
    tree.clear().map_err(StorageFailure::from)?;
    meta.clear().map_err(StorageFailure::from)?;
    db.flush().map_err(StorageFailure::from)?;
    Ok(())
}

impl LogStore for WalStorage {
    fn persist(
        &mut self,
        entries: &[Entry],
        hard_state: Option<&HardState>,
    ) -> Result<(), StorageFailure> {
        if entries.is_empty() && hard_state.is_none() {
            return Ok(());
        }
        // Only new entries, a new term or a vote must be durable before
        // raft-rs goes on (etcd's MustSync): a lost commit index is learned
        // again from the leader, so a Ready that only raises it is written
        // without an fsync.
        let must_sync = !entries.is_empty()
            || hard_state.is_some_and(|hs| {
                hs.term != self.log.hard_state.term || hs.vote != self.log.hard_state.vote
            });
        self.log.append(entries)?;
        if let Some(hard_state) = hard_state {
            self.log.hard_state = hard_state.clone();
        }
        let wal = self.wal.as_mut().expect("the wal is open between calls");
        wal::encode_entries(wal.buffer(), entries);
        if hard_state.is_some() || self.commit_unwritten {
            wal::encode_hard_state(wal.buffer(), &self.log.hard_state);
            self.commit_unwritten = false;
        }
        wal.write(must_sync)
    }

    fn persist_commit(&mut self, commit: u64) -> Result<(), StorageFailure> {
        if commit > self.log.hard_state.commit {
            // Written with the next record; it need not be durable.
            self.log.hard_state.commit = commit;
            self.commit_unwritten = true;
        }
        Ok(())
    }

    fn set_conf_state(&mut self, conf_state: ConfState) -> Result<(), StorageFailure> {
        wal::encode_conf_state(self.wal().buffer(), &conf_state);
        self.wal().write(false)?;
        self.log.conf_state = conf_state;
        Ok(())
    }

    fn apply_snapshot(&mut self, snapshot: &Snapshot) -> Result<(), StorageFailure> {
        let meta = snapshot.get_metadata();
        self.snapshot_file.write(snapshot)?;
        let hard_state = &mut self.log.hard_state;
        hard_state.term = hard_state.term.max(meta.term);
        hard_state.commit = hard_state.commit.max(meta.index);
        drop_later(self.log.start_after(meta.clone(), true));
        self.rewrite()?;
        self.snapshot_file.prune(meta.index);
        Ok(())
    }

    fn background_snapshots(&self) -> Option<SnapshotFile> {
        Some(self.snapshot_file.clone())
    }

    fn compact_written(&mut self, meta: SnapshotMetadata) -> Result<(), StorageFailure> {
        if meta.index <= self.log.snapshot_meta.index {
            return Ok(());
        }
        if meta.index > self.log.last_index() {
            return Err(StorageFailure(format!(
                "snapshot at {} is past the end of the log at {}",
                meta.index,
                self.log.last_index()
            )));
        }
        let index = meta.index;
        drop_later(self.log.start_after(meta, false));
        // The new segment names the new snapshot: older snapshot files go
        // only once it is durable (and off this thread: removing tens of
        // megabytes takes milliseconds).
        self.rewrite()?;
        let snapshot_file = self.snapshot_file.clone();
        self.snapshot_file
            .fs()
            .in_background(Box::new(move || snapshot_file.prune(index)));
        Ok(())
    }
}

impl Storage for WalStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(
            self.log.hard_state.clone(),
            self.log.conf_state.clone(),
        ))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low < self.log.first_index() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.log.last_index() + 1 || low >= high {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let offset = self.log.first_index();
        let range = &self.log.entries[(low - offset) as usize..(high - offset) as usize];
        let max_size = max_size.into();
        let mut size = 0u64;
        let mut taken = 0;
        for entry in range {
            size += u64::from(entry.compute_size());
            if taken > 0 && max_size.is_some_and(|max| size > max) {
                break;
            }
            taken += 1;
        }
        Ok(range[..taken].to_vec())
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        let snapshot = &self.log.snapshot_meta;
        if idx == snapshot.index {
            return Ok(snapshot.term);
        }
        if idx < self.log.first_index() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if idx > self.log.last_index() {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        Ok(self.log.entries[(idx - self.log.first_index()) as usize].term)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.log.first_index())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.log.last_index())
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        let snapshot = self
            .snapshot_file
            .read(self.log.snapshot_meta.index)
            .map_err(|e| raft::Error::Store(StorageError::Other(e.0.into())))?;
        if snapshot.get_metadata().index < request_index {
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        Ok(snapshot)
    }
}
