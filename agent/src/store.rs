//! Durable records of the node's allocations, one `state.json` per
//! allocation under `DATA/allocs/<id>/`, so that a restarted agent knows
//! which processes are its replicas and can re-adopt them.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::spec::{validate_alloc_id, ReplicaSpec};

const RECORD_FILE: &str = "state.json";

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
    #[error(transparent)]
    Spec(#[from] crate::spec::SpecError),
}

/// The `DATA/allocs` directory.
#[derive(Debug)]
pub struct AllocStore {
    root: PathBuf,
}

impl AllocStore {
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        let root = data_dir.join("allocs");
        fs::create_dir_all(&root).map_err(|source| StoreError::CreateDir {
            path: root.clone(),
            source,
        })?;
        Ok(Self { root })
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

    /// Forgets a stopped allocation. Its directory stays for its logs.
    pub fn delete(&self, alloc_id: &str) -> Result<(), StoreError> {
        validate_alloc_id(alloc_id)?;
        let path = self.alloc_dir(alloc_id).join(RECORD_FILE);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StoreError::Delete { path, source }),
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
