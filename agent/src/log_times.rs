//! When each line of a replica's log was written. A replica writes its log
//! file directly (a container's stdout is the file), so lines carry no
//! time; beside each `STREAM.log` the agent keeps `STREAM.log.times`, marks
//! of `OFFSET MILLIS` lines appended about once a second while the log
//! grows: every byte before OFFSET was written by MILLIS. A line's time is
//! that of the first mark at or past its end (or, written after the last
//! mark, the file's modification time), so it is late by at most one mark
//! period. The log format is untouched: logs written before marks existed
//! (or by an older agent) read as written at their file's modification
//! time. Rotation moves the marks with the log (`STREAM.log.times.1`).

use std::collections::HashMap;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

/// Past this size a marks file is thinned to every other mark (older lines
/// then get coarser times), so a quiet replica that never rotates keeps a
/// small index.
const MAX_MARKS_BYTES: u64 = 256 * 1024;

/// `DIR/stdout.log.times` for `stdout`.
pub fn marks_path(alloc_dir: &Path, stream: &str) -> PathBuf {
    alloc_dir.join(format!("{stream}.log.times"))
}

/// The marks of the rotated log `STREAM.log.1`.
pub fn rotated_marks_path(alloc_dir: &Path, stream: &str) -> PathBuf {
    alloc_dir.join(format!("{stream}.log.times.1"))
}

/// `(offset, millis)` marks of a marks file, in file order; unreadable
/// lines are skipped.
pub fn read_marks(path: &Path) -> Vec<(u64, u64)> {
    let text = fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let (offset, ms) = line.split_once(' ')?;
            Some((offset.parse().ok()?, ms.parse().ok()?))
        })
        .collect()
}

/// Appends the mark `(offset, ms)` to `path`.
pub fn append_mark(path: &Path, offset: u64, ms: u64) -> std::io::Result<()> {
    let mut file = OpenOptions::new().create(true).append(true).open(path)?;
    writeln!(file, "{offset} {ms}")
}

/// Milliseconds since the epoch of `path`'s last modification; 0 if
/// unknown.
pub fn modified_ms(path: &Path) -> u64 {
    fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The write time of each line of `text`, which starts at offset 0 of its
/// file: the first mark at or past the line's end, else `after_last`.
pub fn line_times(text: &[u8], marks: &[(u64, u64)], after_last: u64) -> Vec<u64> {
    let mut times = Vec::new();
    let mut next = 0;
    for (end, _) in text.iter().enumerate().filter(|(_, b)| **b == b'\n') {
        let end = end as u64 + 1;
        while next < marks.len() && marks[next].0 < end {
            next += 1;
        }
        times.push(marks.get(next).map_or(after_last, |m| m.1));
    }
    if !text.is_empty() && !text.ends_with(b"\n") {
        times.push(after_last);
    }
    times
}

/// Marks every log that grew since it was last marked. Keeps in memory
/// the length marked last per file; a log found shorter was rotated or
/// truncated and is marked again from its new length.
#[derive(Debug, Default)]
pub struct Marker {
    marked: HashMap<PathBuf, u64>,
}

impl Marker {
    /// Marks the logs of `alloc_dir` at `now_ms`.
    pub fn mark(&mut self, alloc_dir: &Path, now_ms: u64) {
        for stream in crate::logs::STREAMS {
            let log = crate::logs::log_path(alloc_dir, stream);
            let Ok(len) = fs::metadata(&log).map(|m| m.len()) else {
                self.marked.remove(&log);
                continue;
            };
            let last = self.marked.get(&log).copied().unwrap_or(0);
            if len == 0 || len == last {
                continue;
            }
            let path = marks_path(alloc_dir, stream);
            if len < last {
                // Truncated: the old marks describe other bytes.
                let _ = fs::remove_file(&path);
            }
            if let Err(e) = append_mark(&path, len, now_ms) {
                tracing::debug!(path = %path.display(), error = %e, "failed to mark log times");
                continue;
            }
            self.marked.insert(log, len);
            if fs::metadata(&path).is_ok_and(|m| m.len() > MAX_MARKS_BYTES) {
                thin(&path);
            }
        }
    }

    /// Forgets the logs of allocation directories no longer present.
    pub fn forget_missing(&mut self) {
        self.marked.retain(|log, _| log.exists());
    }
}

/// Keeps every other mark of `path` (and always the last).
fn thin(path: &Path) {
    let marks = read_marks(path);
    let last = marks.len().saturating_sub(1);
    let kept: String = marks
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 2 == 1 || *i == last)
        .map(|(_, (offset, ms))| format!("{offset} {ms}\n"))
        .collect();
    let tmp = path.with_extension("times.tmp");
    if fs::write(&tmp, kept)
        .and_then(|()| fs::rename(&tmp, path))
        .is_err()
    {
        let _ = fs::remove_file(&tmp);
    }
}

/// At rotation: the log's marks, closed by a mark at the copied length,
/// become the rotated log's.
pub fn rotate(alloc_dir: &Path, stream: &str, copied_len: u64, now_ms: u64) {
    let current = marks_path(alloc_dir, stream);
    let _ = append_mark(&current, copied_len, now_ms);
    if let Err(e) = fs::rename(&current, rotated_marks_path(alloc_dir, stream)) {
        tracing::debug!(path = %current.display(), error = %e, "failed to rotate log times");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_takes_the_time_of_the_first_mark_at_or_past_its_end() {
        let text = b"a\nbb\nccc\nd";
        // Offsets: "a\n" ends at 2, "bb\n" at 5, "ccc\n" at 9.
        let marks = [(2, 100), (7, 200), (9, 300)];
        assert_eq!(line_times(text, &marks, 999), [100, 200, 300, 999]);
        assert_eq!(line_times(b"x\n", &[], 5), [5], "no marks: the fallback");
        assert!(line_times(b"", &marks, 5).is_empty());
    }

    #[test]
    fn the_marker_marks_only_growth_and_starts_over_after_a_truncation() {
        let dir = tempfile::tempdir().unwrap();
        let log = crate::logs::log_path(dir.path(), "stdout");
        fs::write(&log, "one\n").unwrap();
        let mut marker = Marker::default();
        marker.mark(dir.path(), 10);
        marker.mark(dir.path(), 20);
        fs::write(&log, "one\ntwo\n").unwrap();
        marker.mark(dir.path(), 30);
        assert_eq!(
            read_marks(&marks_path(dir.path(), "stdout")),
            [(4, 10), (8, 30)]
        );
        fs::write(&log, "x\n").unwrap();
        marker.mark(dir.path(), 40);
        let marks = read_marks(&marks_path(dir.path(), "stdout"));
        assert_eq!(marks, [(2, 40)], "a truncated log's marks start over");
        assert!(!marks_path(dir.path(), "stderr").exists());
    }

    #[test]
    fn thinning_halves_the_marks_and_keeps_the_last() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.log.times");
        for i in 1..=5 {
            append_mark(&path, i * 10, i * 100).unwrap();
        }
        thin(&path);
        assert_eq!(read_marks(&path), [(20, 200), (40, 400), (50, 500)]);
    }
}
