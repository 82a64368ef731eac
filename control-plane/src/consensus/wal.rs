//! The Raft log on disk as a write-ahead log, as etcd keeps it: one
//! append-only segment file (`wal-<seq>.log`) of checksummed records,
//! written by the consensus thread itself and made durable with one
//! `fdatasync` per Ready.
//!
//! A record is `len: u32 | crc32: u32 | kind: u8 | payload` (little
//! endian; the checksum and length cover kind and payload). Replaying the
//! records in order rebuilds the log: entries (a lower index than the last
//! one truncates the log there first), the hard state, the conf state, and
//! snapshots (which drop the entries they cover). Only a torn tail is cut
//! off when a segment is opened: a last record cut short by a crash (its
//! length runs past the end of the file, or it is the final record and
//! fails its checksum), or zeros the file system left after it. A record
//! that fails its checksum with more records after it is corruption of
//! fsynced data: the server refuses to start, naming the file and the
//! offset, because dropping acknowledged entries or the vote would break
//! Raft's safety (etcd refuses too).
//!
//! Compaction starts a new segment that holds only what is still needed
//! (the snapshot's metadata, the hard and conf state, the entries after
//! the snapshot), written to a temporary file, fsynced and renamed into
//! place before the old segment is removed; the newest segment is always
//! complete on its own.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, SnapshotMetadata};

use super::log_store::StorageFailure;
use fs::{WalFile, WalFs};

pub mod fs;
#[doc(hidden)]
pub mod sim_fs;

const ENTRIES: u8 = 1;
const HARD_STATE: u8 = 2;
const CONF_STATE: u8 = 3;
/// The log starts after this snapshot; entries it covers are dropped.
const COMPACTED: u8 = 4;
/// A snapshot from the leader replaced the whole log.
const INSTALLED: u8 = 5;

const HEADER: usize = 8;

/// One replayed record.
#[derive(Debug, PartialEq)]
pub enum Record {
    Entries(Vec<Entry>),
    HardState(HardState),
    ConfState(ConfState),
    Snapshot {
        metadata: SnapshotMetadata,
        /// True when the snapshot replaced the log (installed from the
        /// leader), false when it only compacted it.
        installed: bool,
    },
}

/// The open segment and the records buffered for it.
pub struct Wal {
    fs: Arc<dyn WalFs>,
    dir: PathBuf,
    seq: u64,
    file: Box<dyn WalFile>,
    buffer: Vec<u8>,
}

fn failed(what: &str, path: &Path, err: impl std::fmt::Display) -> StorageFailure {
    StorageFailure(format!("failed to {what} {}: {err}", path.display()))
}

fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("wal-{seq:016}.log"))
}

fn segment_seq(name: &str) -> Option<u64> {
    name.strip_prefix("wal-")?
        .strip_suffix(".log")?
        .parse()
        .ok()
}

fn sync_dir(fs: &dyn WalFs, dir: &Path) -> Result<(), StorageFailure> {
    fs.sync_dir(dir)
        .map_err(|e| failed("fsync the directory", dir, e))
}

impl Wal {
    /// [`Wal::open_on`] the real file system.
    #[cfg(test)]
    pub fn open(
        dir: &Path,
        cut_corrupt: bool,
    ) -> Result<Option<(Wal, Vec<Record>)>, StorageFailure> {
        Self::open_on(fs::StdFs::shared(), dir, cut_corrupt)
    }

    /// Opens the newest segment in `dir` and returns its records, or `None`
    /// when there is none yet. Older segments and temporary files left by a
    /// crash are removed; a damaged tail is cut off.
    pub fn open_on(
        fs: Arc<dyn WalFs>,
        dir: &Path,
        cut_corrupt: bool,
    ) -> Result<Option<(Wal, Vec<Record>)>, StorageFailure> {
        let Some(names) = fs.list(dir).map_err(|e| failed("list", dir, e))? else {
            return Ok(None);
        };
        let mut segments = Vec::new();
        for name in names {
            if let Some(seq) = segment_seq(&name) {
                segments.push(seq);
            } else if name.starts_with("wal-") && name.ends_with(".tmp") {
                let _ = fs.remove(&dir.join(name));
            }
        }
        segments.sort_unstable();
        let Some(&seq) = segments.last() else {
            return Ok(None);
        };
        for &older in &segments[..segments.len() - 1] {
            let _ = fs.remove(&segment_path(dir, older));
        }
        let path = segment_path(dir, seq);
        let bytes = fs.read(&path).map_err(|e| failed("read", &path, e))?;
        let mut file = fs
            .open_append(&path)
            .map_err(|e| failed("open", &path, e))?;
        let (records, valid) = decode_all(&bytes);
        let corrupt = valid < bytes.len() && !is_torn_tail(&bytes, valid);
        if corrupt && !cut_corrupt {
            return Err(StorageFailure(format!(
                "the raft log {} is corrupt at byte {valid} of {}: a record fails its checksum with more records after it, so fsynced entries would be lost; \
                 this server cannot start from it. Remove the server (`skiff cluster remove NAME` on a live one) and start it again with an empty data dir and --join, \
                 so that it catches up from the others; or, knowing that it may lose acknowledged entries and its vote, start it once with --truncate-corrupt-log",
                path.display(),
                bytes.len()
            )));
        }
        if corrupt {
            // Kept for whoever looks into it; the log goes on without it.
            let kept = path.with_extension(format!("corrupt-{valid}"));
            let _ = fs
                .create(&kept)
                .and_then(|mut copy| copy.append(&bytes[valid..]));
            tracing::error!(
                segment = %path.display(),
                at = valid,
                dropped_bytes = bytes.len() - valid,
                kept_records = records.len(),
                copy = %kept.display(),
                "--truncate-corrupt-log: the raft log is corrupt; cutting it at the damaged record with everything after it (entries and votes written there are lost)"
            );
        }
        if valid < bytes.len() {
            tracing::warn!(
                segment = %path.display(),
                kept = valid,
                dropped = bytes.len() - valid,
                "damaged end of the raft log cut off (a write cut short by a crash)"
            );
            file.set_len(valid as u64)
                .and_then(|()| file.sync_all())
                .map_err(|e| failed("truncate", &path, e))?;
        }
        let wal = Wal {
            fs,
            dir: dir.to_path_buf(),
            seq,
            file,
            buffer: Vec::new(),
        };
        Ok(Some((wal, records)))
    }

    /// [`Wal::create_on`] the real file system.
    #[cfg(test)]
    pub fn create(
        dir: &Path,
        previous: Option<Wal>,
        write: impl FnOnce(&mut Vec<u8>),
    ) -> Result<Wal, StorageFailure> {
        Self::create_on(fs::StdFs::shared(), dir, previous, write)
    }

    /// Starts a new segment holding `records` (durable when this returns)
    /// and removes the previous one. `previous` is the segment it replaces,
    /// if any.
    pub fn create_on(
        fs: Arc<dyn WalFs>,
        dir: &Path,
        previous: Option<Wal>,
        write: impl FnOnce(&mut Vec<u8>),
    ) -> Result<Wal, StorageFailure> {
        fs.create_dir_all(dir)
            .map_err(|e| failed("create", dir, e))?;
        let seq = previous.as_ref().map_or(1, |w| w.seq + 1);
        let path = segment_path(dir, seq);
        let tmp = path.with_extension("tmp");
        let mut buffer = Vec::new();
        write(&mut buffer);
        let mut file = fs.create(&tmp).map_err(|e| failed("create", &tmp, e))?;
        file.append(&buffer)
            .and_then(|()| file.sync_all())
            .map_err(|e| failed("write", &tmp, e))?;
        fs.rename(&tmp, &path)
            .map_err(|e| failed("rename", &tmp, e))?;
        sync_dir(&*fs, dir)?;
        drop(file);
        if let Some(previous) = previous {
            // Removing a file of tens of megabytes takes milliseconds; the
            // consensus thread need not wait (a segment left by a crash is
            // removed when the log is next opened).
            let old = segment_path(dir, previous.seq);
            drop(previous);
            let remover = fs.clone();
            fs.in_background(Box::new(move || {
                let _ = remover.remove(&old);
            }));
        }
        let file = fs
            .open_append(&path)
            .map_err(|e| failed("open", &path, e))?;
        Ok(Wal {
            fs,
            dir: dir.to_path_buf(),
            seq,
            file,
            buffer: Vec::new(),
        })
    }

    /// The file system this log is on.
    pub fn fs(&self) -> &Arc<dyn WalFs> {
        &self.fs
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Buffers records; [`Wal::write`] writes them.
    pub fn buffer(&mut self) -> &mut Vec<u8> {
        &mut self.buffer
    }

    /// Writes the buffered records, and makes them (and everything written
    /// before) durable when `sync`.
    pub fn write(&mut self, sync: bool) -> Result<(), StorageFailure> {
        if !self.buffer.is_empty() {
            let written = self.file.append(&self.buffer);
            self.buffer.clear();
            written.map_err(|e| failed("write", &segment_path(&self.dir, self.seq), e))?;
        }
        if sync {
            self.file
                .sync_data()
                .map_err(|e| failed("fsync", &segment_path(&self.dir, self.seq), e))?;
        }
        Ok(())
    }
}

fn frame(buffer: &mut Vec<u8>, kind: u8, payload: impl FnOnce(&mut Vec<u8>)) {
    let start = buffer.len();
    buffer.extend_from_slice(&[0; HEADER]);
    buffer.push(kind);
    payload(buffer);
    let body = &buffer[start + HEADER..];
    let len = u32::try_from(body.len()).expect("raft log records stay under 4 GiB");
    let crc = crc32fast::hash(body);
    buffer[start..start + 4].copy_from_slice(&len.to_le_bytes());
    buffer[start + 4..start + HEADER].copy_from_slice(&crc.to_le_bytes());
}

fn protobuf_into(buffer: &mut Vec<u8>, message: &impl protobuf::Message) {
    message
        .write_to_vec(buffer)
        .expect("raft messages always encode");
}

pub fn encode_entries(buffer: &mut Vec<u8>, entries: &[Entry]) {
    if entries.is_empty() {
        return;
    }
    frame(buffer, ENTRIES, |buffer| {
        for entry in entries {
            let at = buffer.len();
            buffer.extend_from_slice(&[0; 4]);
            protobuf_into(buffer, entry);
            let len = (buffer.len() - at - 4) as u32;
            buffer[at..at + 4].copy_from_slice(&len.to_le_bytes());
        }
    });
}

pub fn encode_hard_state(buffer: &mut Vec<u8>, hard_state: &HardState) {
    frame(buffer, HARD_STATE, |b| protobuf_into(b, hard_state));
}

pub fn encode_conf_state(buffer: &mut Vec<u8>, conf_state: &ConfState) {
    frame(buffer, CONF_STATE, |b| protobuf_into(b, conf_state));
}

pub fn encode_snapshot(buffer: &mut Vec<u8>, metadata: &SnapshotMetadata, installed: bool) {
    let kind = if installed { INSTALLED } else { COMPACTED };
    frame(buffer, kind, |b| protobuf_into(b, metadata));
}

/// Whether what follows the last good record at `valid` is what a crash
/// leaves: writes that were not fsynced, cut short and possibly followed by
/// garbage or zeros over whatever was written after them (a file's last
/// pages may reach the disk in part). That is so when no intact record
/// follows the damaged one, walking on by the lengths in the headers. An
/// intact record after it means fsynced data was damaged: corruption,
/// never cut silently.
pub fn is_torn_tail(bytes: &[u8], valid: usize) -> bool {
    let mut at = valid;
    // Bounded: `at` grows by at least a header each turn.
    loop {
        let Some(header) = bytes.get(at..at + HEADER) else {
            return true;
        };
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let next = match (at + HEADER).checked_add(len) {
            Some(next) if next < bytes.len() => next,
            // Cut short, or the final record (its own bytes half written).
            _ => return true,
        };
        if decode_one(bytes, next).is_some() {
            return false;
        }
        at = next;
    }
}

/// Decodes records up to the first damaged one; returns them and how many
/// bytes were valid.
pub fn decode_all(bytes: &[u8]) -> (Vec<Record>, usize) {
    let mut records = Vec::new();
    let mut at = 0;
    while let Some((record, next)) = decode_one(bytes, at) {
        records.push(record);
        at = next;
    }
    (records, at)
}

fn decode_one(bytes: &[u8], at: usize) -> Option<(Record, usize)> {
    let header = bytes.get(at..at + HEADER)?;
    let len = u32::from_le_bytes(header[..4].try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(header[4..].try_into().ok()?);
    let body = bytes.get(at + HEADER..(at + HEADER).checked_add(len)?)?;
    if len == 0 || crc32fast::hash(body) != crc {
        return None;
    }
    let (kind, payload) = (body[0], &body[1..]);
    let record = match kind {
        ENTRIES => {
            let mut entries = Vec::new();
            let mut rest = payload;
            while !rest.is_empty() {
                let n = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?) as usize;
                let bytes = rest.get(4..4 + n)?;
                entries.push(Entry::parse_from_bytes(bytes).ok()?);
                rest = &rest[4 + n..];
            }
            Record::Entries(entries)
        }
        HARD_STATE => Record::HardState(HardState::parse_from_bytes(payload).ok()?),
        CONF_STATE => Record::ConfState(ConfState::parse_from_bytes(payload).ok()?),
        COMPACTED | INSTALLED => Record::Snapshot {
            metadata: SnapshotMetadata::parse_from_bytes(payload).ok()?,
            installed: kind == INSTALLED,
        },
        _ => return None,
    };
    Some((record, at + HEADER + len))
}

#[cfg(test)]
mod tests {
    use std::fs::{self, OpenOptions};

    use super::*;

    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            data: vec![7; 300].into(),
            ..Default::default()
        }
    }

    #[test]
    fn records_come_back_in_order_after_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::create(dir.path(), None, |_| {}).unwrap();
        let hs = HardState {
            term: 2,
            vote: 1,
            commit: 1,
            ..Default::default()
        };
        encode_entries(wal.buffer(), &[entry(1, 1), entry(2, 1)]);
        encode_hard_state(wal.buffer(), &hs);
        wal.write(true).unwrap();
        drop(wal);
        let (_, records) = Wal::open(dir.path(), false).unwrap().unwrap();
        assert_eq!(
            records,
            vec![
                Record::Entries(vec![entry(1, 1), entry(2, 1)]),
                Record::HardState(hs)
            ]
        );
    }

    #[test]
    fn a_torn_last_record_is_cut_off_and_appending_goes_on_after_the_good_ones() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::create(dir.path(), None, |_| {}).unwrap();
        encode_entries(wal.buffer(), &[entry(1, 1)]);
        wal.write(true).unwrap();
        encode_entries(wal.buffer(), &[entry(2, 1)]);
        wal.write(true).unwrap();
        drop(wal);
        let path = segment_path(dir.path(), 1);
        let len = fs::metadata(&path).unwrap().len();
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(len - 10).unwrap();
        drop(file);
        let (mut wal, records) = Wal::open(dir.path(), false).unwrap().unwrap();
        assert_eq!(records, vec![Record::Entries(vec![entry(1, 1)])]);
        encode_entries(wal.buffer(), &[entry(2, 2)]);
        wal.write(true).unwrap();
        drop(wal);
        let (_, records) = Wal::open(dir.path(), false).unwrap().unwrap();
        assert_eq!(
            records,
            vec![
                Record::Entries(vec![entry(1, 1)]),
                Record::Entries(vec![entry(2, 2)])
            ]
        );
    }

    /// A log of three entries, one fsynced write each.
    fn three_entries() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::create(dir.path(), None, |_| {}).unwrap();
        for index in 1..=3 {
            encode_entries(wal.buffer(), &[entry(index, 1)]);
            wal.write(true).unwrap();
        }
        dir
    }

    /// A flipped bit in a record that has more records after it is
    /// corruption of fsynced data, not a torn write: refused, never cut.
    #[test]
    fn a_corrupt_record_before_the_end_stops_the_open_naming_file_and_offset() {
        let dir = three_entries();
        let path = segment_path(dir.path(), 1);
        let mut bytes = fs::read(&path).unwrap();
        let before = bytes.len();
        bytes[HEADER + 2] ^= 0x40;
        fs::write(&path, &bytes).unwrap();
        let err = match Wal::open(dir.path(), false) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("a corrupt log was opened"),
        };
        assert!(err.contains("corrupt at byte 0"), "{err}");
        assert!(err.contains("--join"), "{err}");
        assert_eq!(
            fs::metadata(&path).unwrap().len() as usize,
            before,
            "nothing was cut"
        );
        // A flipped bit in the last record is a torn write: cut, as before.
        let mut bytes = fs::read(&path).unwrap();
        bytes[HEADER + 2] ^= 0x40;
        let last = bytes.len() - 3;
        bytes[last] ^= 0x40;
        fs::write(&path, &bytes).unwrap();
        let (_, records) = Wal::open(dir.path(), false).unwrap().unwrap();
        assert_eq!(records.len(), 2);
    }

    /// A power cut can tear a write that was not fsynced (a commit-only
    /// hard state, a conf state) and leave zeros or garbage after the torn
    /// prefix, over the records written after it: no intact record follows
    /// the damage, so it is the torn tail, cut, and the log opens; the
    /// fsynced records before it are all kept. (Found by the simulation
    /// over the faulty disk: such a tail was refused as corruption.)
    #[test]
    fn a_torn_record_followed_by_zeros_or_garbage_over_later_unsynced_records_is_cut() {
        for filler in [0u8, 0xa5] {
            let dir = three_entries();
            let path = segment_path(dir.path(), 1);
            let synced = fs::read(&path).unwrap().len();
            let mut wal = Wal::open(dir.path(), false).unwrap().unwrap().0;
            let hard_state = |commit| HardState {
                term: 1,
                commit,
                ..Default::default()
            };
            // Two unsynced writes.
            encode_hard_state(wal.buffer(), &hard_state(2));
            wal.write(false).unwrap();
            encode_hard_state(wal.buffer(), &hard_state(3));
            wal.write(false).unwrap();
            drop(wal);
            let mut bytes = fs::read(&path).unwrap();
            // The first one's header and a few bytes reached the disk; the
            // rest of what was written reads back as zeros or garbage.
            for byte in &mut bytes[synced + HEADER + 2..] {
                *byte = filler;
            }
            fs::write(&path, &bytes).unwrap();
            let (_, records) = Wal::open(dir.path(), false).unwrap().unwrap();
            assert_eq!(records.len(), 3, "the three fsynced entries are kept");
            assert_eq!(fs::metadata(&path).unwrap().len() as usize, synced, "cut");
        }
    }

    /// `--truncate-corrupt-log`: the log is cut at the damaged record with
    /// everything after it, a copy of what was cut is kept, and it opens.
    #[test]
    fn a_corrupt_record_is_cut_with_what_follows_only_when_asked() {
        let dir = three_entries();
        let path = segment_path(dir.path(), 1);
        let bytes = fs::read(&path).unwrap();
        let record = (bytes.len() - HEADER) / 3;
        let mut damaged = bytes.clone();
        // The second entry's record.
        damaged[HEADER + record + 2] ^= 0x40;
        fs::write(&path, &damaged).unwrap();
        assert!(Wal::open(dir.path(), false).is_err(), "refused by default");
        let (_, records) = Wal::open(dir.path(), true).unwrap().unwrap();
        assert_eq!(records.len(), 1, "the first entry's record is kept");
        assert!(
            fs::metadata(&path).unwrap().len() < bytes.len() as u64,
            "cut"
        );
        let copies: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().contains(".corrupt-"))
            .collect();
        assert_eq!(copies.len(), 1, "a copy of what was cut");
        // And it opens as it is afterwards.
        let (_, records) = Wal::open(dir.path(), false).unwrap().unwrap();
        assert_eq!(records.len(), 1);
    }

    #[test]
    fn a_new_segment_replaces_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::create(dir.path(), None, |_| {}).unwrap();
        encode_entries(wal.buffer(), &[entry(1, 1)]);
        wal.write(true).unwrap();
        let wal = Wal::create(dir.path(), Some(wal), |b| {
            encode_entries(b, &[entry(5, 3)]);
        })
        .unwrap();
        drop(wal);
        let names = || -> Vec<String> {
            fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect()
        };
        for _ in 0..100 {
            if names().len() == 1 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(names(), vec!["wal-0000000000000002.log".to_string()]);
        let (_, records) = Wal::open(dir.path(), false).unwrap().unwrap();
        assert_eq!(records, vec![Record::Entries(vec![entry(5, 3)])]);
    }
}
