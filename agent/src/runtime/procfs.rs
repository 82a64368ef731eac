//! Reads of `/proc/<pid>/stat`: enough to tell whether a PID is still the
//! process we started (start time, field 22), whether it leads its own
//! process group, and whether it has exited (zombie).

use std::fs;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    /// Field 3: R, S, D, Z, X, ...
    pub state: char,
    /// Field 5.
    pub pgrp: i32,
    /// Field 22, in clock ticks since boot.
    pub start_time: u64,
}

impl ProcStat {
    pub fn is_exited(&self) -> bool {
        matches!(self.state, 'Z' | 'X' | 'x')
    }
}

/// Parses a `/proc/<pid>/stat` line. The command name (field 2) is in
/// parentheses and may itself contain spaces and parentheses, so fields are
/// counted from the last `)`.
pub fn parse_stat(line: &str) -> Option<ProcStat> {
    let rest = &line[line.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 of the line.
    let state = fields.first()?.chars().next()?;
    let pgrp = fields.get(2)?.parse().ok()?;
    let start_time = fields.get(19)?.parse().ok()?;
    Some(ProcStat {
        state,
        pgrp,
        start_time,
    })
}

pub fn read_stat(pid: u32) -> Option<ProcStat> {
    if pid == 0 {
        return None;
    }
    parse_stat(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Whether `pid` is alive and is the process that started at `start_time`.
pub fn is_same_live_process(pid: u32, start_time: u64) -> bool {
    read_stat(pid).is_some_and(|s| s.start_time == start_time && !s.is_exited())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINE: &str = "4242 (my (odd) prog) S 1 4242 4242 0 -1 4194560 120 0 0 0 1 0 0 0 20 0 1 0 987654 2125824 200 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";

    #[test]
    fn parses_state_group_and_start_time_past_odd_names() {
        let s = parse_stat(LINE).unwrap();
        assert_eq!(
            s,
            ProcStat {
                state: 'S',
                pgrp: 4242,
                start_time: 987654
            }
        );
        assert!(!s.is_exited());
    }

    #[test]
    fn rejects_truncated_lines() {
        assert_eq!(parse_stat("1 (init) S 0 1"), None);
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn reads_own_process() {
        let me = std::process::id();
        let s = read_stat(me).unwrap();
        assert!(is_same_live_process(me, s.start_time));
        assert!(!is_same_live_process(me, s.start_time + 1));
        assert!(read_stat(0).is_none());
    }
}
