//! One conformance suite for every [`LogStore`]: the disk stores used in
//! production and the in-memory one the simulation relies on must behave
//! alike, or the simulation proves nothing about production.

use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, Storage, StorageError};

use super::log_store::LogStore;
use crate::state::{Member, State};

fn entry(index: u64, term: u64) -> Entry {
    Entry {
        index,
        term,
        data: format!("{index}@{term}").into_bytes().into(),
        ..Default::default()
    }
}

fn entries(store: &impl Storage, low: u64, high: u64) -> raft::Result<Vec<Entry>> {
    store.entries(low, high, None, GetEntriesContext::empty(false))
}

fn snapshot_at(index: u64, term: u64, voters: Vec<u64>) -> Snapshot {
    let mut snapshot = Snapshot::default();
    let mut state = State::default();
    state.applied_index = index;
    snapshot.data = state.to_image().into();
    snapshot.mut_metadata().index = index;
    snapshot.mut_metadata().term = term;
    snapshot.mut_metadata().mut_conf_state().voters = voters;
    snapshot
}

/// Runs every check against stores made by `open`; `reopen` simulates a
/// restart of the same store (for the durable one) or returns a clone.
pub fn run_all<S: LogStore>(open: impl Fn() -> S, reopen: impl Fn(S) -> S) {
    a_new_store_is_empty(open());
    appends_persist_and_conflicts_truncate(open(), &reopen);
    bootstrap_starts_the_log_after_the_snapshot(open(), &reopen);
    compaction_drops_entries_and_keeps_the_term(open());
}

fn a_new_store_is_empty<S: LogStore>(store: S) {
    assert_eq!(
        (store.first_index().unwrap(), store.last_index().unwrap()),
        (1, 0)
    );
    assert_eq!(store.term(0).unwrap(), 0);
    assert_eq!(
        store.term(1),
        Err(raft::Error::Store(StorageError::Unavailable))
    );
    assert!(store.initial_state().unwrap().conf_state.voters.is_empty());
}

fn appends_persist_and_conflicts_truncate<S: LogStore>(mut store: S, reopen: &impl Fn(S) -> S) {
    let hs = HardState {
        term: 2,
        vote: 1,
        commit: 2,
        ..Default::default()
    };
    store
        .persist(&[entry(1, 1), entry(2, 1), entry(3, 1)], Some(&hs))
        .unwrap();
    store.persist(&[entry(3, 2), entry(4, 2)], None).unwrap();
    let store = reopen(store);
    assert_eq!(store.last_index().unwrap(), 4);
    assert_eq!(store.initial_state().unwrap().hard_state, hs);
    assert_eq!(
        entries(&store, 1, 5).unwrap(),
        vec![entry(1, 1), entry(2, 1), entry(3, 2), entry(4, 2)]
    );
    assert_eq!(store.term(3).unwrap(), 2);
    let limited = store
        .entries(1, 5, Some(1), GetEntriesContext::empty(false))
        .unwrap();
    assert_eq!(limited.len(), 1, "max_size still returns one entry");
}

fn bootstrap_starts_the_log_after_the_snapshot<S: LogStore>(
    mut store: S,
    reopen: &impl Fn(S) -> S,
) {
    super::log_store::bootstrap(
        &mut store,
        Member {
            id: 1,
            name: "s1".into(),
            address: "127.0.0.1:1".into(),
            learner: false,
        },
    )
    .unwrap();
    let store = reopen(store);
    assert_eq!(
        (store.first_index().unwrap(), store.last_index().unwrap()),
        (2, 1)
    );
    assert_eq!(store.term(1).unwrap(), 1);
    assert_eq!(
        entries(&store, 1, 2),
        Err(raft::Error::Store(StorageError::Compacted))
    );
    assert_eq!(store.initial_state().unwrap().conf_state.voters, vec![1]);
    assert_eq!(store.snapshot(0, 2).unwrap().get_metadata().index, 1);
    let state = super::log_store::snapshot_state(&store).unwrap();
    assert_eq!(state.applied_index, 1);
    assert_eq!(state.members[&1].name, "s1");
}

fn compaction_drops_entries_and_keeps_the_term<S: LogStore>(mut store: S) {
    store
        .persist(&[entry(1, 1), entry(2, 1), entry(3, 2), entry(4, 2)], None)
        .unwrap();
    store.compact(snapshot_at(3, 2, vec![1])).unwrap();
    assert_eq!(store.first_index().unwrap(), 4);
    assert_eq!(store.term(3).unwrap(), 2);
    assert_eq!(
        store.term(2),
        Err(raft::Error::Store(StorageError::Compacted))
    );
    assert_eq!(entries(&store, 4, 5).unwrap(), vec![entry(4, 2)]);
    assert_eq!(store.snapshot(3, 2).unwrap().get_metadata().index, 3);
    assert_eq!(
        store.snapshot(4, 2),
        Err(raft::Error::Store(
            StorageError::SnapshotTemporarilyUnavailable
        ))
    );
    // A snapshot from the leader replaces the whole log.
    store
        .apply_snapshot(&snapshot_at(10, 3, vec![1, 2]))
        .unwrap();
    assert_eq!(
        (store.first_index().unwrap(), store.last_index().unwrap()),
        (11, 10)
    );
    let initial = store.initial_state().unwrap();
    assert_eq!(
        (initial.hard_state.term, initial.hard_state.commit),
        (3, 10)
    );
    assert_eq!(initial.conf_state.voters, vec![1, 2]);
}

#[cfg(test)]
mod tests {
    use super::super::log_store::StorageFailure;
    use super::super::mem::MemLog;
    use super::super::sled_storage::SledStorage;
    use super::super::snapshot_file::SnapshotFile;
    use super::super::wal_storage::WalStorage;
    use super::*;

    fn hs() -> HardState {
        HardState {
            term: 1,
            vote: 1,
            ..Default::default()
        }
    }

    #[test]
    fn a_sled_log_cut_short_is_refused_until_the_loss_is_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let snapshots = SnapshotFile::new(dir.path().join("snapshots"));
        // One handle for the whole test: a dropped sled handle releases its
        // file lock a moment later, so reopening the path could race it.
        let db = sled::open(dir.path().join("db")).unwrap();
        let mut store = SledStorage::open(&db, snapshots.clone()).unwrap();
        for i in 1..=100 {
            store.persist(&[entry(i, 1)], Some(&hs())).unwrap();
        }
        drop(store);
        // What sled does to a log with a damaged record when it opens
        // (measured): the log ends before it, and no error says so.
        let log = db.open_tree("raft_log").unwrap();
        for i in 91..=100 {
            log.remove(super::super::sled_storage::log_key(i)).unwrap();
        }
        db.flush().unwrap();
        let err = SledStorage::open(&db, snapshots.clone())
            .err()
            .expect("a log cut short is refused")
            .to_string();
        assert!(
            err.contains("ends at index 90 but held entries up to 100")
                && err.contains("--truncate-corrupt-log"),
            "{err}"
        );
        let store = SledStorage::open_checked(&db, snapshots.clone(), true).unwrap();
        assert_eq!(store.last_index().unwrap(), 90);
        drop(store);
        // Accepted once: later starts take the log as it now is.
        SledStorage::open(&db, snapshots).unwrap();
    }

    fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap().flatten() {
            let target = to.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                copy_dir(&entry.path(), &target);
            } else {
                std::fs::copy(entry.path(), &target).unwrap();
            }
        }
    }

    /// One flipped byte at each tenth of sled's file: the store opens with
    /// every entry, or refuses to open (sled's error, sled's panic, or the
    /// witness) — never with fewer entries and no word.
    #[test]
    fn a_flipped_byte_in_the_sled_file_never_loses_entries_silently() {
        const N: u64 = 3000;
        let pristine = tempfile::tempdir().unwrap();
        {
            let db = sled::open(pristine.path().join("db")).unwrap();
            let snapshots = SnapshotFile::new(pristine.path().join("snapshots"));
            let mut store = SledStorage::open(&db, snapshots).unwrap();
            let all: Vec<Entry> = (1..=N).map(|i| entry(i, 1)).collect();
            for batch in all.chunks(10) {
                store.persist(batch, Some(&hs())).unwrap();
            }
        }
        let size = std::fs::metadata(pristine.path().join("db/db"))
            .unwrap()
            .len();
        // sled's panics on damaged files are expected here; keep the output readable.
        std::panic::set_hook(Box::new(|_| {}));
        let mut outcomes = Vec::new();
        // Tenth 0: a copy left as it is, which must open with every entry.
        for tenth in 0..10u64 {
            let copy = tempfile::tempdir().unwrap();
            copy_dir(pristine.path(), copy.path());
            let file = copy.path().join("db/db");
            let mut bytes = std::fs::read(&file).unwrap();
            let at = (size * tenth / 10) as usize;
            if tenth > 0 {
                bytes[at] ^= 0x40;
            }
            std::fs::write(&file, bytes).unwrap();
            let path = copy.path().join("db");
            let outcome = match std::panic::catch_unwind(|| sled::open(&path)) {
                Err(_) => "sled panicked".to_string(),
                Ok(Err(e)) => format!("sled refused: {e}"),
                Ok(Ok(db)) => {
                    let snapshots = SnapshotFile::new(copy.path().join("snapshots"));
                    match SledStorage::open(&db, snapshots) {
                        Err(e) => {
                            assert!(e.to_string().contains("lost records"), "{e}");
                            "witness refused".to_string()
                        }
                        Ok(store) => {
                            let last = store.last_index().unwrap();
                            assert_eq!(last, N, "byte {at}: entries lost without a word");
                            let read = entries(&store, 1, N + 1).unwrap();
                            assert!(read.iter().zip(1..).all(|(e, i)| e == &entry(i, 1)));
                            "intact".to_string()
                        }
                    }
                }
            };
            outcomes.push((at, outcome));
        }
        let _ = std::panic::take_hook();
        println!("flipped bytes of a {size}-byte sled file: {outcomes:?}");
        assert_eq!(outcomes[0].1, "intact", "an undamaged copy opens whole");
    }

    #[test]
    fn the_in_memory_store_conforms() {
        run_all(MemLog::new, |store| store);
    }

    /// Opens a disk store on a sled database and a snapshot directory.
    type Open<S> = fn(&sled::Db, SnapshotFile) -> Result<S, StorageFailure>;

    fn conforms_across_restarts<S: LogStore>(
        open_at: Open<S>,
        parts: fn(&S) -> (sled::Db, SnapshotFile),
    ) {
        let dirs = std::cell::RefCell::new(Vec::new());
        let open = || {
            let dir = tempfile::tempdir().unwrap();
            let db = sled::open(dir.path().join("db")).unwrap();
            let snapshots = SnapshotFile::new(dir.path().join("snapshots"));
            dirs.borrow_mut().push((dir, db.clone()));
            open_at(&db, snapshots).unwrap()
        };
        // Reopening reads everything back from the disk, as a restart does.
        let reopen = |store: S| {
            let (db, snapshots) = parts(&store);
            drop(store);
            open_at(&db, snapshots).unwrap()
        };
        run_all(open, reopen);
    }

    fn reopens_compacted<S: LogStore>(open_at: Open<S>) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path().join("db")).unwrap();
        let snapshots = SnapshotFile::new(dir.path().join("snapshots"));
        let mut store = open_at(&db, snapshots.clone()).unwrap();
        let all: Vec<Entry> = (1..=6).map(|i| entry(i, 1)).collect();
        store.persist(&all[..4], None).unwrap();
        store
            .set_conf_state(ConfState {
                voters: vec![1],
                ..Default::default()
            })
            .unwrap();
        store.compact(snapshot_at(3, 1, vec![1])).unwrap();
        store.persist(&all[4..], None).unwrap();
        store.persist_commit(5).unwrap();
        drop(store);
        let store = open_at(&db, snapshots).unwrap();
        assert_eq!(
            (store.first_index().unwrap(), store.last_index().unwrap()),
            (4, 6)
        );
        assert_eq!(entries(&store, 4, 7).unwrap(), all[3..].to_vec());
        assert_eq!(store.term(3).unwrap(), 1);
        assert_eq!(store.initial_state().unwrap().conf_state.voters, vec![1]);
    }

    #[test]
    fn the_sled_store_conforms_across_restarts() {
        conforms_across_restarts(SledStorage::open, |s| {
            (s.db().clone(), s.snapshot_file().clone())
        });
    }

    #[test]
    fn the_wal_store_conforms_across_restarts() {
        conforms_across_restarts(WalStorage::open, |s| {
            (s.db().cloned().unwrap(), s.snapshot_file().clone())
        });
    }

    #[test]
    fn a_compacted_sled_store_reopens_with_the_entries_after_the_snapshot() {
        reopens_compacted(SledStorage::open);
    }

    #[test]
    fn a_compacted_wal_store_reopens_with_the_entries_after_the_snapshot() {
        reopens_compacted(WalStorage::open);
    }

    #[test]
    fn a_log_kept_in_sled_by_an_older_version_is_moved_to_the_wal() {
        use protobuf::Message as _;
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path().join("db")).unwrap();
        let snapshots = SnapshotFile::new(dir.path().join("snapshots"));
        let snapshot = snapshot_at(2, 1, vec![1]);
        snapshots.write(&snapshot).unwrap();
        let (log, meta) = (
            db.open_tree("raft_log").unwrap(),
            db.open_tree("raft_meta").unwrap(),
        );
        let hs = HardState {
            term: 3,
            vote: 1,
            commit: 4,
            ..Default::default()
        };
        meta.insert("hard_state", hs.write_to_bytes().unwrap())
            .unwrap();
        meta.insert(
            "snapshot_meta",
            snapshot.get_metadata().write_to_bytes().unwrap(),
        )
        .unwrap();
        for index in 3..=5 {
            let mut key = b"log/".to_vec();
            key.extend_from_slice(&u64::to_be_bytes(index));
            log.insert(key, entry(index, 3).write_to_bytes().unwrap())
                .unwrap();
        }
        let store = WalStorage::open(&db, snapshots.clone()).unwrap();
        assert_eq!(
            (store.first_index().unwrap(), store.last_index().unwrap()),
            (3, 5)
        );
        assert_eq!(store.initial_state().unwrap().hard_state, hs);
        assert!(log.is_empty(), "the moved log is removed from sled");
        drop(store);
        let store = WalStorage::open(&db, snapshots).unwrap();
        assert_eq!(
            entries(&store, 3, 6).unwrap(),
            vec![entry(3, 3), entry(4, 3), entry(5, 3)]
        );
    }
}
