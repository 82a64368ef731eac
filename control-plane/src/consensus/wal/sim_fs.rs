//! A fault-injecting in-memory [`WalFs`] for the deterministic simulation
//! and tests: a disk that keeps, for each file, the bytes a reader sees
//! and the bytes that survive a crash.
//!
//! [`SimFs::crash`] does what a power cut does: every file goes back to
//! what its last `fsync` made durable, and directory entries (a created,
//! renamed or removed file) go back to the last `fsync` of their
//! directory. What was written after the last `fsync` is lost, or torn: a
//! random prefix of it survives, possibly followed by garbage or zeros in
//! place of the rest (never longer than what was written, as a file's size
//! does not outrun its writes). Directories themselves are created durably.
//! All randomness comes from the seed, so a run is reproduced by its seed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::fs::{WalFile, WalFs};

/// What the faults did so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultStats {
    pub crashes: u64,
    /// Files whose unsynced writes survived a crash in part.
    pub torn_writes: u64,
    /// Torn writes followed by garbage or zeros.
    pub garbage_tails: u64,
    /// Written bytes a crash dropped.
    pub lost_bytes: u64,
    pub fsyncs: u64,
}

impl std::ops::AddAssign for FaultStats {
    fn add_assign(&mut self, other: FaultStats) {
        self.crashes += other.crashes;
        self.torn_writes += other.torn_writes;
        self.garbage_tails += other.garbage_tails;
        self.lost_bytes += other.lost_bytes;
        self.fsyncs += other.fsyncs;
    }
}

#[derive(Default)]
struct Data {
    /// What a reader sees.
    bytes: Vec<u8>,
    /// What survives a crash.
    durable: Vec<u8>,
    /// `bytes` and `durable` agree up to here.
    same_until: usize,
}

struct Disk {
    rng: StdRng,
    next_id: u64,
    /// The directory entries a process sees.
    names: BTreeMap<PathBuf, u64>,
    /// The directory entries that survive a crash.
    durable_names: BTreeMap<PathBuf, u64>,
    files: HashMap<u64, Data>,
    dirs: BTreeSet<PathBuf>,
    /// Bumped by a crash: files opened before it are gone with their process.
    generation: u64,
    stats: FaultStats,
    /// `fdatasync` does nothing (a disk that lies, or a store that skips
    /// it): for tests that must catch that.
    lying_fdatasync: bool,
}

/// A simulated disk; clones share it.
#[derive(Clone)]
pub struct SimFs {
    disk: Arc<Mutex<Disk>>,
}

impl fmt::Debug for SimFs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SimFs")
    }
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("{} not found", path.display()),
    )
}

fn in_dir(path: &Path, dir: &Path) -> bool {
    path.parent() == Some(dir)
}

impl SimFs {
    pub fn new(seed: u64) -> Self {
        SimFs {
            disk: Arc::new(Mutex::new(Disk {
                rng: StdRng::seed_from_u64(seed),
                next_id: 0,
                names: BTreeMap::new(),
                durable_names: BTreeMap::new(),
                files: HashMap::new(),
                dirs: BTreeSet::new(),
                generation: 0,
                stats: FaultStats::default(),
                lying_fdatasync: false,
            })),
        }
    }

    /// This disk with an `fdatasync` that makes nothing durable (`fsync`
    /// still does): what a store that acknowledged before syncing would
    /// look like, for tests that must catch it.
    pub fn with_lying_fdatasync(self) -> Self {
        self.disk().lying_fdatasync = true;
        self
    }

    /// This disk as the stores take it.
    pub fn shared(&self) -> Arc<dyn WalFs> {
        Arc::new(self.clone())
    }

    fn disk(&self) -> MutexGuard<'_, Disk> {
        self.disk.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn stats(&self) -> FaultStats {
        self.disk().stats
    }

    /// A power cut: drops what was not fsynced (see the module doc). Files
    /// opened before it fail from now on.
    pub fn crash(&self) {
        let mut disk = self.disk();
        let disk = &mut *disk;
        disk.stats.crashes += 1;
        disk.generation += 1;
        disk.names = disk.durable_names.clone();
        let live: BTreeSet<u64> = disk.names.values().copied().collect();
        disk.files.retain(|id, _| live.contains(id));
        for id in &live {
            let Some(data) = disk.files.get_mut(id) else {
                continue;
            };
            let written = &data.bytes[data.same_until.min(data.bytes.len())..];
            let mut after = data.durable.clone();
            // Only appends since the last fsync can tear: a file shortened
            // and not synced goes back whole.
            if !written.is_empty() && data.durable.len() == data.same_until {
                if disk.rng.gen_bool(0.5) {
                    let kept = disk.rng.gen_range(0..written.len());
                    after.extend_from_slice(&written[..kept]);
                    disk.stats.torn_writes += 1;
                    let room = written.len() - kept;
                    if room > 0 && disk.rng.gen_bool(0.5) {
                        let len = disk.rng.gen_range(1..=room);
                        let zeros = disk.rng.gen_bool(0.5);
                        for _ in 0..len {
                            after.push(if zeros { 0 } else { disk.rng.gen() });
                        }
                        disk.stats.garbage_tails += 1;
                    }
                }
                let lost = data.bytes.len().saturating_sub(after.len());
                disk.stats.lost_bytes += lost as u64;
            }
            data.same_until = after.len();
            data.durable = after.clone();
            data.bytes = after;
        }
    }

    fn file(&self, id: u64) -> Box<dyn WalFile> {
        let generation = self.disk().generation;
        Box::new(SimFile {
            fs: self.clone(),
            id,
            generation,
        })
    }
}

impl WalFs for SimFs {
    fn list(&self, dir: &Path) -> io::Result<Option<Vec<String>>> {
        let disk = self.disk();
        if !disk.dirs.contains(dir) {
            return Ok(None);
        }
        let names = disk
            .names
            .keys()
            .filter(|path| in_dir(path, dir))
            .filter_map(|path| path.file_name()?.to_str().map(str::to_string))
            .collect();
        Ok(Some(names))
    }

    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        let mut disk = self.disk();
        for ancestor in dir.ancestors() {
            disk.dirs.insert(ancestor.to_path_buf());
        }
        Ok(())
    }

    fn create(&self, path: &Path) -> io::Result<Box<dyn WalFile>> {
        let id = {
            let mut disk = self.disk();
            let disk = &mut *disk;
            if !path.parent().is_some_and(|dir| disk.dirs.contains(dir)) {
                return Err(not_found(path));
            }
            match disk.names.get(path) {
                Some(&id) => {
                    let data = disk.files.entry(id).or_default();
                    data.bytes.clear();
                    data.same_until = 0;
                    id
                }
                None => {
                    disk.next_id += 1;
                    let id = disk.next_id;
                    disk.files.insert(id, Data::default());
                    disk.names.insert(path.to_path_buf(), id);
                    id
                }
            }
        };
        Ok(self.file(id))
    }

    fn open_append(&self, path: &Path) -> io::Result<Box<dyn WalFile>> {
        let id = *self.disk().names.get(path).ok_or_else(|| not_found(path))?;
        Ok(self.file(id))
    }

    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        let disk = self.disk();
        let id = disk.names.get(path).ok_or_else(|| not_found(path))?;
        Ok(disk
            .files
            .get(id)
            .map(|d| d.bytes.clone())
            .unwrap_or_default())
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut disk = self.disk();
        let id = disk.names.remove(from).ok_or_else(|| not_found(from))?;
        disk.names.insert(to.to_path_buf(), id);
        Ok(())
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        let mut disk = self.disk();
        disk.names.remove(path).ok_or_else(|| not_found(path))?;
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut disk = self.disk();
        let disk = &mut *disk;
        if !disk.dirs.contains(dir) {
            return Err(not_found(dir));
        }
        disk.durable_names.retain(|path, _| !in_dir(path, dir));
        for (path, id) in &disk.names {
            if in_dir(path, dir) {
                disk.durable_names.insert(path.clone(), *id);
            }
        }
        disk.stats.fsyncs += 1;
        Ok(())
    }

    fn in_background(&self, job: Box<dyn FnOnce() + Send>) {
        job();
    }
}

/// An open file; it fails once the disk crashed under it.
struct SimFile {
    fs: SimFs,
    id: u64,
    generation: u64,
}

impl SimFile {
    fn with<T>(&mut self, f: impl FnOnce(&mut Data, &mut FaultStats) -> T) -> io::Result<T> {
        let mut disk = self.fs.disk();
        let disk = &mut *disk;
        if disk.generation != self.generation {
            return Err(io::Error::other("the disk crashed under this file"));
        }
        let data = disk.files.entry(self.id).or_default();
        Ok(f(data, &mut disk.stats))
    }

    fn sync(&mut self) -> io::Result<()> {
        self.with(|data, stats| {
            data.durable.truncate(data.same_until);
            let from = data.same_until;
            data.durable.extend_from_slice(&data.bytes[from..]);
            data.same_until = data.bytes.len();
            stats.fsyncs += 1;
        })
    }
}

impl WalFile for SimFile {
    fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.with(|data, _| data.bytes.extend_from_slice(bytes))
    }

    fn set_len(&mut self, len: u64) -> io::Result<()> {
        let len = usize::try_from(len).map_err(io::Error::other)?;
        self.with(|data, _| {
            data.bytes.resize(len, 0);
            data.same_until = data.same_until.min(len);
        })
    }

    fn sync_data(&mut self) -> io::Result<()> {
        if self.fs.disk().lying_fdatasync {
            return self.with(|_, _| ());
        }
        self.sync()
    }

    fn sync_all(&mut self) -> io::Result<()> {
        self.sync()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> PathBuf {
        PathBuf::from("/data")
    }

    #[test]
    fn a_crash_keeps_fsynced_bytes_and_at_most_a_torn_prefix_of_the_rest() {
        for seed in 0..50 {
            let fs = SimFs::new(seed);
            fs.create_dir_all(&dir()).unwrap();
            let path = dir().join("f");
            let mut file = fs.create(&path).unwrap();
            fs.sync_dir(&dir()).unwrap();
            file.append(b"durable").unwrap();
            file.sync_data().unwrap();
            file.append(b" and not").unwrap();
            fs.crash();
            let after = fs.read(&path).unwrap();
            assert!(after.starts_with(b"durable"), "{after:?}");
            // Never all of it, never longer than what was written.
            assert!(after.len() <= b"durable and not".len(), "{after:?}");
            assert_ne!(
                after, b"durable and not",
                "the unsynced write is never whole"
            );
            assert!(file.append(b"x").is_err(), "a handle dies with the crash");
        }
    }

    #[test]
    fn a_rename_survives_a_crash_only_after_the_directory_is_synced() {
        let fs = SimFs::new(1);
        fs.create_dir_all(&dir()).unwrap();
        let (tmp, path) = (dir().join("a.tmp"), dir().join("a"));
        let mut file = fs.create(&tmp).unwrap();
        file.append(b"x").unwrap();
        file.sync_all().unwrap();
        fs.rename(&tmp, &path).unwrap();
        fs.crash();
        assert_eq!(fs.list(&dir()).unwrap(), Some(vec![]));
        let mut file = fs.create(&tmp).unwrap();
        file.append(b"x").unwrap();
        file.sync_all().unwrap();
        fs.rename(&tmp, &path).unwrap();
        fs.sync_dir(&dir()).unwrap();
        fs.crash();
        assert_eq!(fs.list(&dir()).unwrap(), Some(vec!["a".to_string()]));
        assert_eq!(fs.read(&path).unwrap(), b"x");
    }
}
