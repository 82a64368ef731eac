//! A witness of what the sled log durably held, kept beside it, so that a
//! log sled cut short is noticed instead of trusted.
//!
//! sled 0.34 treats a record failing its checksum as the end of its log
//! when it opens (measured: one flipped byte in the middle of its file and
//! 501 of 5,000 flushed keys were gone, with no error), which would let a
//! server forget entries it acknowledged and the vote it cast. After every
//! flush the store writes here its last log index, term and vote (a
//! 32-byte `pwrite`, no fsync); before anything that lowers them (Raft
//! truncating a conflicting suffix, a snapshot replacing the log) the lower
//! value is written and fsynced first. So the witness never claims more
//! than sled durably held, and on open a log that ends before it, or a
//! hard state behind it, was cut by sled: the server refuses to start.
//! After a power loss the witness may lag sled (its last writes were not
//! fsynced): it then checks less, never wrongly.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::log_store::StorageFailure;

const MAGIC: &[u8; 4] = b"SKW1";
const LEN: usize = 32;

/// What the sled log held when the witness was last written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Mark {
    pub last_index: u64,
    pub term: u64,
    pub vote: u64,
}

impl Mark {
    fn encode(&self) -> [u8; LEN] {
        let mut bytes = [0u8; LEN];
        bytes[..4].copy_from_slice(MAGIC);
        bytes[4..12].copy_from_slice(&self.last_index.to_le_bytes());
        bytes[12..20].copy_from_slice(&self.term.to_le_bytes());
        bytes[20..28].copy_from_slice(&self.vote.to_le_bytes());
        let crc = crc32fast::hash(&bytes[..28]);
        bytes[28..].copy_from_slice(&crc.to_le_bytes());
        bytes
    }

    fn decode(bytes: &[u8]) -> Option<Mark> {
        if bytes.len() != LEN || &bytes[..4] != MAGIC {
            return None;
        }
        let crc = u32::from_le_bytes(bytes[28..].try_into().ok()?);
        if crc32fast::hash(&bytes[..28]) != crc {
            return None;
        }
        let word = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap_or_default());
        Some(Mark {
            last_index: word(4),
            term: word(12),
            vote: word(20),
        })
    }

    /// Why a log that opened as `found` lost what this mark saw, if it did.
    pub fn lost_in(&self, found: &Mark) -> Option<String> {
        if found.last_index < self.last_index {
            Some(format!(
                "it ends at index {} but held entries up to {}",
                found.last_index, self.last_index
            ))
        } else if found.term < self.term {
            Some(format!(
                "its term is {} but it had reached term {}",
                found.term, self.term
            ))
        } else if found.term == self.term && self.vote != 0 && found.vote != self.vote {
            Some(format!(
                "its vote in term {} is {} but it had voted for {}",
                self.term, found.vote, self.vote
            ))
        } else {
            None
        }
    }
}

/// The witness file of one sled log.
pub struct Witness {
    path: PathBuf,
    file: File,
    mark: Mark,
}

impl Witness {
    /// Opens (or creates) the witness at `path`; its mark, if it holds a
    /// valid one. A damaged witness is reported and replaced: it can only
    /// make the check weaker, never stop a sound log.
    pub fn open(path: &Path) -> Result<(Witness, Option<Mark>), StorageFailure> {
        let failed = |e: std::io::Error| {
            StorageFailure(format!(
                "failed to open the log witness {}: {e}",
                path.display()
            ))
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(failed)?;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(failed)?;
        let mut bytes = [0u8; LEN];
        let read = file.read_at(&mut bytes, 0).map_err(failed)?;
        let mark = match read {
            0 => None,
            LEN => Mark::decode(&bytes),
            _ => None,
        };
        if read != 0 && mark.is_none() {
            tracing::warn!(witness = %path.display(), "the raft log witness is damaged; it is written again from the log as it is");
        }
        Ok((
            Witness {
                path: path.to_path_buf(),
                file,
                mark: mark.unwrap_or_default(),
            },
            mark,
        ))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records `mark` after the log holding it was flushed (no fsync).
    pub fn advance(&mut self, mark: Mark) -> Result<(), StorageFailure> {
        if mark == self.mark {
            return Ok(());
        }
        self.write(mark, false)
    }

    /// Before the log goes below what the witness says (a truncated
    /// suffix, a snapshot replacing the log): records the lower `mark`
    /// durably, so a crash before the log's own flush never leaves a
    /// witness ahead of it.
    pub fn lower_to(&mut self, mark: Mark) -> Result<(), StorageFailure> {
        let lower = Mark {
            last_index: mark.last_index.min(self.mark.last_index),
            term: self.mark.term,
            vote: self.mark.vote,
        };
        if lower == self.mark {
            return Ok(());
        }
        self.write(lower, true)
    }

    /// Records `mark` durably as it is (after an accepted loss).
    pub fn reset(&mut self, mark: Mark) -> Result<(), StorageFailure> {
        self.write(mark, true)
    }

    fn write(&mut self, mark: Mark, sync: bool) -> Result<(), StorageFailure> {
        let failed = |e: std::io::Error| {
            StorageFailure(format!(
                "failed to write the log witness {}: {e}",
                self.path.display()
            ))
        };
        self.file.write_all_at(&mark.encode(), 0).map_err(failed)?;
        if sync {
            self.file.sync_data().map_err(failed)?;
        }
        self.mark = mark;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mark(last_index: u64, term: u64, vote: u64) -> Mark {
        Mark {
            last_index,
            term,
            vote,
        }
    }

    #[test]
    fn a_mark_round_trips_and_a_damaged_one_is_not_read() {
        let m = mark(1234, 7, 3);
        assert_eq!(Mark::decode(&m.encode()), Some(m));
        let mut bytes = m.encode();
        bytes[5] ^= 1;
        assert_eq!(Mark::decode(&bytes), None);
    }

    #[test]
    fn a_shorter_log_a_lower_term_or_another_vote_is_a_loss() {
        let seen = mark(100, 5, 2);
        assert_eq!(seen.lost_in(&mark(100, 5, 2)), None);
        assert_eq!(seen.lost_in(&mark(150, 6, 0)), None);
        assert!(seen.lost_in(&mark(99, 5, 2)).unwrap().contains("up to 100"));
        assert!(seen.lost_in(&mark(100, 4, 2)).unwrap().contains("term 5"));
        assert!(seen
            .lost_in(&mark(100, 5, 3))
            .unwrap()
            .contains("voted for 2"));
        assert_eq!(mark(100, 5, 0).lost_in(&mark(100, 5, 3)), None);
    }

    #[test]
    fn the_witness_keeps_its_mark_across_opens_and_lowers_before_a_truncation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w");
        let (mut w, none) = Witness::open(&path).unwrap();
        assert_eq!(none, None);
        w.advance(mark(10, 2, 1)).unwrap();
        w.lower_to(mark(8, 2, 1)).unwrap();
        drop(w);
        let (_, seen) = Witness::open(&path).unwrap();
        assert_eq!(seen, Some(mark(8, 2, 1)));
    }
}
