//! The file system as the write-ahead log and the snapshot files use it,
//! behind a narrow trait: [`StdFs`] (plain `std::fs`) in production, and a
//! fault-injecting in-memory one ([`super::sim_fs::SimFs`]) in the
//! simulation, so that a crash can drop what was not fsynced.
//!
//! A trait object rather than a type parameter: one virtual call per
//! `Ready` write is nothing next to its `fdatasync`, and the stores keep
//! their plain types.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::path::Path;
use std::sync::Arc;

/// The file operations the log and the snapshot files need, no more.
pub trait WalFs: Send + Sync + fmt::Debug {
    /// The names of the files in `dir`; `None` when it does not exist.
    fn list(&self, dir: &Path) -> io::Result<Option<Vec<String>>>;
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// Creates `path` empty (truncating it if it exists), for appending.
    fn create(&self, path: &Path) -> io::Result<Box<dyn WalFile>>;
    /// Opens an existing file for appending at its end.
    fn open_append(&self, path: &Path) -> io::Result<Box<dyn WalFile>>;
    fn read(&self, path: &Path) -> io::Result<Vec<u8>>;
    /// Durable only once the directory is synced ([`WalFs::sync_dir`]).
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Durable only once the directory is synced ([`WalFs::sync_dir`]).
    fn remove(&self, path: &Path) -> io::Result<()>;
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// Runs slow housekeeping (removing large files) off the consensus
    /// thread; the simulation runs it at once, to stay deterministic.
    fn in_background(&self, job: Box<dyn FnOnce() + Send>);
}

/// A file opened by [`WalFs`] for appending.
pub trait WalFile: Send {
    fn append(&mut self, bytes: &[u8]) -> io::Result<()>;
    fn set_len(&mut self, len: u64) -> io::Result<()>;
    fn sync_data(&mut self) -> io::Result<()>;
    fn sync_all(&mut self) -> io::Result<()>;
}

/// The real file system.
#[derive(Debug, Clone, Copy, Default)]
pub struct StdFs;

impl StdFs {
    pub fn shared() -> Arc<dyn WalFs> {
        Arc::new(StdFs)
    }
}

impl WalFs for StdFs {
    fn list(&self, dir: &Path) -> io::Result<Option<Vec<String>>> {
        let listing = match fs::read_dir(dir) {
            Ok(listing) => listing,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(err) => return Err(err),
        };
        let mut names = Vec::new();
        for item in listing {
            if let Ok(name) = item?.file_name().into_string() {
                names.push(name);
            }
        }
        Ok(Some(names))
    }

    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        fs::create_dir_all(dir)
    }

    fn create(&self, path: &Path) -> io::Result<Box<dyn WalFile>> {
        Ok(Box::new(File::create(path)?))
    }

    fn open_append(&self, path: &Path) -> io::Result<Box<dyn WalFile>> {
        Ok(Box::new(OpenOptions::new().append(true).open(path)?))
    }

    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        fs::read(path)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }

    fn in_background(&self, job: Box<dyn FnOnce() + Send>) {
        std::thread::spawn(job);
    }
}

impl WalFile for File {
    fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.write_all(bytes)
    }

    fn set_len(&mut self, len: u64) -> io::Result<()> {
        File::set_len(self, len)
    }

    fn sync_data(&mut self) -> io::Result<()> {
        File::sync_data(self)
    }

    fn sync_all(&mut self) -> io::Result<()> {
        File::sync_all(self)
    }
}
