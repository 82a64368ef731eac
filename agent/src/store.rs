//! Durable records of the node's allocations, one `state.json` per
//! allocation under `DATA/allocs/<id>/`, so that a restarted agent knows
//! which processes are its replicas and can re-adopt them; and the end of an
//! allocation's directory once the control plane no longer assigns it: its
//! logs move to `DATA/logs/<id>/`, kept for [`LOG_KEEP_FOR`] and at most
//! [`LOG_KEEP_COUNT`] allocations, and the rest is removed.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::spec::{validate_alloc_id, ReplicaSpec};

const RECORD_FILE: &str = "state.json";
/// Logs of allocations no longer assigned are kept this long after they
/// were retired...
pub const LOG_KEEP_FOR: Duration = Duration::from_secs(24 * 60 * 60);
/// ...and for at most this many allocations (the newest).
pub const LOG_KEEP_COUNT: usize = 100;
/// The files of an allocation directory that outlive it: its logs and their
/// rotated copies (see `logs.rs`).
const LOG_FILES: [&str; 8] = [
    "stdout.log",
    "stdout.log.1",
    "stderr.log",
    "stderr.log.1",
    "stdout.log.times",
    "stdout.log.times.1",
    "stderr.log.times",
    "stderr.log.times.1",
];

/// What the agent must remember about one allocation across restarts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocRecord {
    pub spec: ReplicaSpec,
    /// Host PID of the running replica; 0 while none runs.
    pub pid: u32,
    /// `/proc/<pid>/stat` field 22 of that process, so a recycled PID is
    /// never mistaken for the replica.
    pub start_time: u64,
    pub restarts: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("failed to create allocation directory {path}: {source}")]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("failed to write allocation record {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("failed to encode record of allocation {alloc}: {source}")]
    Encode {
        alloc: String,
        source: serde_json::Error,
    },
    #[error("failed to read allocation records in {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("failed to delete allocation record {path}: {source}")]
    Delete { path: PathBuf, source: io::Error },
    #[error("failed to keep the logs of allocation {alloc} in {path}: {source}")]
    Archive {
        alloc: String,
        path: PathBuf,
        source: io::Error,
    },
    #[error("failed to remove allocation directory {path}: {source}")]
    Remove { path: PathBuf, source: io::Error },
    #[error("not removing allocation directory {path}: something is still mounted in it")]
    Mounted { path: PathBuf },
    #[error(transparent)]
    Spec(#[from] crate::spec::SpecError),
}

/// The `DATA/allocs` directory, and `DATA/logs` for the logs of retired
/// allocations.
#[derive(Debug)]
pub struct AllocStore {
    root: PathBuf,
    logs: PathBuf,
}

impl AllocStore {
    /// Opens (creating) `DATA/allocs` and `DATA/logs`, both 0700: records
    /// hold the replicas' environment and logs their output, which only
    /// root may read (as Docker keeps `/var/lib/docker` 0710).
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        let (root, logs) = (data_dir.join("allocs"), data_dir.join("logs"));
        for dir in [&root, &logs] {
            fs::create_dir_all(dir)
                .and_then(|()| fs::set_permissions(dir, fs::Permissions::from_mode(0o700)))
                .map_err(|source| StoreError::CreateDir {
                    path: dir.clone(),
                    source,
                })?;
        }
        Ok(Self { root, logs })
    }

    /// Where the logs of retired allocations are kept: `DATA/logs/<id>/`.
    pub fn logs_dir(&self) -> &Path {
        &self.logs
    }

    /// The allocation's directory: its logs, its record, and the default
    /// working directory of its process. The id must have passed
    /// [`validate_alloc_id`].
    pub fn alloc_dir(&self, alloc_id: &str) -> PathBuf {
        self.root.join(alloc_id)
    }

    /// Writes the record atomically: a crash of the agent leaves either the
    /// old or the new record, never a torn one.
    ///
    /// Not fsynced: the record is written on every start (before the replica
    /// is reported running), where two fsyncs cost tens of milliseconds of
    /// start latency. The page cache outlives an agent crash, which is what
    /// re-adoption needs; a host crash also ends the replica, and the
    /// control plane, which holds the assignment durably, starts it again.
    pub fn save(&self, record: &AllocRecord) -> Result<(), StoreError> {
        let id = &record.spec.alloc_id;
        validate_alloc_id(id)?;
        let dir = self.alloc_dir(id);
        fs::create_dir_all(&dir).map_err(|source| StoreError::CreateDir {
            path: dir.clone(),
            source,
        })?;
        let bytes = serde_json::to_vec_pretty(record).map_err(|source| StoreError::Encode {
            alloc: id.clone(),
            source,
        })?;
        let tmp = dir.join(format!("{RECORD_FILE}.tmp"));
        let path = dir.join(RECORD_FILE);
        let write = || -> io::Result<()> {
            let mut file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            file.write_all(&bytes)?;
            fs::rename(&tmp, &path)
        };
        write().map_err(|source| StoreError::Write { path, source })
    }

    /// Every readable record. A record that cannot be parsed is logged and
    /// skipped: one corrupt file must not keep the node from starting.
    pub fn load_all(&self) -> Result<Vec<AllocRecord>, StoreError> {
        let entries = fs::read_dir(&self.root).map_err(|source| StoreError::Read {
            path: self.root.clone(),
            source,
        })?;
        let mut records = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path().join(RECORD_FILE);
            let bytes = match fs::read(&path) {
                Ok(bytes) => bytes,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "skipping unreadable allocation record");
                    continue;
                }
            };
            match serde_json::from_slice::<AllocRecord>(&bytes) {
                Ok(record) if validate_alloc_id(&record.spec.alloc_id).is_ok() => {
                    records.push(record)
                }
                Ok(record) => {
                    tracing::warn!(path = %path.display(), alloc = %record.spec.alloc_id, "skipping allocation record with an unsafe id");
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "skipping corrupt allocation record");
                }
            }
        }
        records.sort_by(|a, b| a.spec.alloc_id.cmp(&b.spec.alloc_id));
        Ok(records)
    }

    /// Forgets a stopped allocation. Its directory stays for its logs
    /// while the control plane still assigns it (see [`Self::retire`]).
    pub fn delete(&self, alloc_id: &str) -> Result<(), StoreError> {
        validate_alloc_id(alloc_id)?;
        let path = self.alloc_dir(alloc_id).join(RECORD_FILE);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StoreError::Delete { path, source }),
        }
    }

    /// Ids of every allocation directory, with or without a record.
    pub fn alloc_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|id| validate_alloc_id(id).is_ok())
            .collect();
        ids.sort();
        ids
    }

    /// Ends an allocation the control plane no longer assigns, whose
    /// replica was stopped and destroyed: its logs move to
    /// `DATA/logs/<id>/`, its directory is removed (refused while anything
    /// is mounted in it: removing would reach into the mount), and the kept
    /// logs are pruned as of `now`. An allocation already gone is fine.
    pub fn retire(&self, alloc_id: &str, now: SystemTime) -> Result<(), StoreError> {
        validate_alloc_id(alloc_id)?;
        let dir = self.alloc_dir(alloc_id);
        if !dir.exists() {
            return Ok(());
        }
        if crate::runtime::oci::images::has_mount_under(&dir) {
            return Err(StoreError::Mounted { path: dir });
        }
        let kept = self.logs.join(alloc_id);
        for name in LOG_FILES {
            let from = dir.join(name);
            if !from.is_file() {
                continue;
            }
            let to = kept.join(name);
            fs::create_dir_all(&kept)
                .and_then(|()| fs::rename(&from, &to))
                .map_err(|source| StoreError::Archive {
                    alloc: alloc_id.to_string(),
                    path: to,
                    source,
                })?;
        }
        match fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(StoreError::Remove { path: dir, source }),
        }
        prune_logs(&self.logs, now, LOG_KEEP_FOR, LOG_KEEP_COUNT);
        Ok(())
    }
}

/// Removes the kept logs (one directory per allocation under `logs`) older
/// than `keep_for` as of `now` (by the directory's modification time: when
/// the allocation was retired), and beyond the newest `keep_count`.
fn prune_logs(logs: &Path, now: SystemTime, keep_for: Duration, keep_count: usize) {
    let mut kept: Vec<(SystemTime, PathBuf)> = fs::read_dir(logs)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| {
            let modified = e.metadata().and_then(|m| m.modified()).unwrap_or(now);
            (modified, e.path())
        })
        .collect();
    kept.sort_by(|a, b| b.cmp(a));
    for (i, (modified, path)) in kept.into_iter().enumerate() {
        let age = now.duration_since(modified).unwrap_or_default();
        if i < keep_count && age <= keep_for {
            continue;
        }
        if let Err(e) = fs::remove_dir_all(&path) {
            tracing::warn!(path = %path.display(), error = %e, "failed to remove old replica logs");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::test_spec;

    fn record(id: &str, pid: u32) -> AllocRecord {
        AllocRecord {
            spec: test_spec(id, &["sleep", "30"], 20001),
            pid,
            start_time: 42,
            restarts: 3,
        }
    }

    #[test]
    fn records_are_private_to_root() {
        let dir = tempfile::tempdir().unwrap();
        let store = AllocStore::open(dir.path()).unwrap();
        let record = record("a1b2c3", 42);
        store.save(&record).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir.path().join("allocs")), 0o700);
        assert_eq!(mode(&dir.path().join("logs")), 0o700);
        assert_eq!(mode(&store.alloc_dir("a1b2c3").join(RECORD_FILE)), 0o600);
    }

    #[test]
    fn saved_records_load_back_and_deleted_ones_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let store = AllocStore::open(dir.path()).unwrap();
        store.save(&record("a1", 10)).unwrap();
        store.save(&record("b2", 20)).unwrap();
        store.save(&record("a1", 11)).unwrap();
        assert_eq!(
            store.load_all().unwrap(),
            vec![record("a1", 11), record("b2", 20)]
        );

        store.delete("a1").unwrap();
        store.delete("a1").unwrap();
        assert_eq!(store.load_all().unwrap(), vec![record("b2", 20)]);
        assert!(store.alloc_dir("a1").is_dir(), "directory stays for logs");
    }

    #[test]
    fn a_retired_allocation_leaves_only_its_logs() {
        let dir = tempfile::tempdir().unwrap();
        let store = AllocStore::open(dir.path()).unwrap();
        store.save(&record("a1", 10)).unwrap();
        let alloc = store.alloc_dir("a1");
        fs::write(alloc.join("stdout.log"), b"out\n").unwrap();
        fs::write(alloc.join("stderr.log.1"), b"old err\n").unwrap();
        fs::create_dir_all(alloc.join("bundle/work")).unwrap();
        fs::write(alloc.join("bundle/work/data"), b"x").unwrap();
        fs::create_dir_all(store.alloc_dir("left-behind")).unwrap();
        assert_eq!(store.alloc_ids(), ["a1", "left-behind"]);

        store.retire("a1", SystemTime::now()).unwrap();
        store.retire("a1", SystemTime::now()).unwrap();
        store.retire("left-behind", SystemTime::now()).unwrap();
        assert!(!alloc.exists());
        assert!(store.alloc_ids().is_empty());
        assert!(store.load_all().unwrap().is_empty());
        let kept = store.logs_dir().join("a1");
        assert_eq!(fs::read(kept.join("stdout.log")).unwrap(), b"out\n");
        assert_eq!(fs::read(kept.join("stderr.log.1")).unwrap(), b"old err\n");
        assert_eq!(fs::read_dir(&kept).unwrap().count(), 2, "logs only");
        assert!(
            !store.logs_dir().join("left-behind").exists(),
            "it had no logs"
        );
        assert!(store.retire("../x", SystemTime::now()).is_err());
    }

    #[test]
    fn kept_logs_last_a_day_and_only_the_newest_hundred() {
        let dir = tempfile::tempdir().unwrap();
        let logs = dir.path().join("logs");
        let now = SystemTime::now();
        let hour = Duration::from_secs(3600);
        // 103 recent (one per minute, newest first: r000), 2 older than a day.
        let mut ages: Vec<(String, Duration)> = (0..103)
            .map(|i| (format!("r{i:03}"), Duration::from_secs(60 * i)))
            .collect();
        ages.push(("old1".into(), 25 * hour));
        ages.push(("old2".into(), 48 * hour));
        for (name, age) in &ages {
            let path = logs.join(name);
            fs::create_dir_all(&path).unwrap();
            fs::write(path.join("stdout.log"), b"x").unwrap();
            fs::File::open(&path)
                .unwrap()
                .set_modified(now - *age)
                .unwrap();
        }
        prune_logs(&logs, now, LOG_KEEP_FOR, LOG_KEEP_COUNT);
        let mut left: Vec<String> = fs::read_dir(&logs)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        let newest: Vec<String> = (0..100).map(|i| format!("r{i:03}")).collect();
        assert_eq!(left, newest);

        prune_logs(&logs, now + 23 * hour, LOG_KEEP_FOR, LOG_KEEP_COUNT);
        let left = fs::read_dir(&logs).unwrap().count();
        assert_eq!(left, 61, "those retired within the last day: r000-r060");
    }

    #[test]
    fn corrupt_records_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let store = AllocStore::open(dir.path()).unwrap();
        store.save(&record("good", 1)).unwrap();
        fs::create_dir_all(store.alloc_dir("bad")).unwrap();
        fs::write(store.alloc_dir("bad").join(RECORD_FILE), b"{not json").unwrap();
        assert_eq!(store.load_all().unwrap(), vec![record("good", 1)]);
    }

    #[test]
    fn unsafe_ids_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = AllocStore::open(dir.path()).unwrap();
        assert!(store.save(&record("../x", 1)).is_err());
        assert!(store.delete("../x").is_err());
    }
}
