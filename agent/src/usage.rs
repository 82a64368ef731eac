//! Per-replica resource use, measured for the autoscaler's CPU target and
//! sent with every traffic report: each running replica's cumulative CPU
//! time is read at each report and turned into a percent of its CPU limit
//! over the time since the previous reading.
//!
//! Where it comes from:
//! - A container: its cgroup, `/skiff/<alloc id>` in every hierarchy (the
//!   cgroupsPath the oci runtime gives runc). CPU from `cpuacct.usage` (ns)
//!   of the cgroup v1 cpuacct hierarchy, else `usage_usec` of cgroup v2's
//!   `cpu.stat`; memory from v1 `memory.usage_in_bytes`, else v2
//!   `memory.current`. Everything in the container counts.
//! - A process replica: `/proc/<pid>/stat` of its process, its own user and
//!   system time plus that of the children it has waited for (a child still
//!   running is not counted, so a replica that forks its work off shows
//!   less than it uses); memory is the process's resident set (`VmRSS`).

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Linux's `USER_HZ`: the unit of the times in `/proc/<pid>/stat` (100 on
/// every architecture Linux exposes to user space this way).
const USER_HZ: u64 = 100;
/// Readings closer together than this are too coarse for a percent (the
/// process times are in 10 ms ticks): the previous percent stands, and the
/// next reading is measured from the older one.
const MIN_SPAN: Duration = Duration::from_millis(900);

/// Where a replica's use is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source<'a> {
    /// A container's cgroupsPath (absolute, like `/skiff/<id>`).
    Cgroup(&'a Path),
    /// A process replica's PID.
    Process(u32),
}

/// One running replica to measure.
#[derive(Clone, Copy, Debug)]
pub struct Replica<'a> {
    pub alloc_id: &'a str,
    pub service: &'a str,
    /// The replica's host PID: a new one means the replica restarted, and
    /// its counters with it.
    pub pid: u32,
    /// Its CPU limit; 0: none (percent of one CPU).
    pub cpu_millis: u32,
    pub source: Source<'a>,
}

/// One read of a replica's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reading {
    /// CPU time used since the replica started, in nanoseconds.
    pub cpu_ns: u64,
    /// Memory charged to it now; 0: not measured.
    pub memory_bytes: u64,
}

/// What is reported of one replica.
#[derive(Clone, Debug, PartialEq)]
pub struct ReplicaUsage {
    pub alloc_id: String,
    pub service: String,
    /// Percent of the replica's CPU limit (of one CPU without a limit).
    pub cpu_percent: f64,
    /// CPU time used since the replica (re)started, in seconds.
    pub cpu_seconds: f64,
    pub memory_bytes: u64,
}

/// The CPU used between two readings `elapsed` apart, in percent of
/// `cpu_millis` (0: of one CPU). `None` when it cannot be told: a counter
/// that went down (the replica restarted), or no time between the readings.
///
/// A replica with a limit is held to it by the kernel in 100 ms periods, so
/// readings that do not fall on period boundaries can show a few percent
/// more than the limit (up to one period's quota over the span); that is
/// measurement jitter, not use, and is cut at 100%.
pub fn cpu_percent(
    previous_ns: u64,
    current_ns: u64,
    elapsed: Duration,
    cpu_millis: u32,
) -> Option<f64> {
    let used = current_ns.checked_sub(previous_ns)?;
    if elapsed.is_zero() {
        return None;
    }
    if cpu_millis == 0 {
        return Some(used as f64 * 100.0 / elapsed.as_nanos() as f64);
    }
    let cpus = f64::from(cpu_millis) / 1000.0;
    Some((used as f64 * 100.0 / (elapsed.as_nanos() as f64 * cpus)).min(100.0))
}

/// A replica's previous reading and what was last measured from it.
#[derive(Clone, Copy, Debug)]
struct Previous {
    pid: u32,
    at: Instant,
    cpu_ns: u64,
    percent: Option<f64>,
}

/// The readings kept between reports, per replica.
#[derive(Debug, Default)]
pub struct Usage {
    previous: HashMap<String, Previous>,
    /// The cgroup mount points, found on first use.
    hierarchies: Option<Vec<PathBuf>>,
    /// Whether the last report had anything in it.
    reported: bool,
}

impl Usage {
    /// Reads every replica in `running` and returns their use, or `None`
    /// when there is nothing to tell: no replica measured now nor at the
    /// previous report. A replica read for the first time (or since it
    /// restarted) is left out until its next reading.
    pub fn report<'a>(
        &mut self,
        running: impl IntoIterator<Item = Replica<'a>>,
        now: Instant,
    ) -> Option<Vec<ReplicaUsage>> {
        let hierarchies = self
            .hierarchies
            .get_or_insert_with(crate::runtime::oci::cgroup::hierarchies)
            .clone();
        let mut seen = std::collections::HashSet::new();
        let mut usage = Vec::new();
        for replica in running {
            seen.insert(replica.alloc_id.to_string());
            let reading = match replica.source {
                Source::Cgroup(path) => read_cgroup(&hierarchies, path),
                Source::Process(pid) => read_process(pid),
            };
            let Some(reading) = reading else {
                continue;
            };
            if let Some(cpu_percent) = self.observe(&replica, reading.cpu_ns, now) {
                usage.push(ReplicaUsage {
                    alloc_id: replica.alloc_id.to_string(),
                    service: replica.service.to_string(),
                    cpu_percent,
                    cpu_seconds: reading.cpu_ns as f64 / 1e9,
                    memory_bytes: reading.memory_bytes,
                });
            }
        }
        self.previous.retain(|id, _| seen.contains(id));
        let was_reported = std::mem::replace(&mut self.reported, !usage.is_empty());
        (was_reported || !usage.is_empty()).then_some(usage)
    }

    /// Takes in `replica`'s CPU counter read at `now`; returns its percent
    /// since the previous reading (the last one measured, if that reading
    /// is too recent), `None` for a first reading or a restart.
    fn observe(&mut self, replica: &Replica<'_>, cpu_ns: u64, now: Instant) -> Option<f64> {
        let first = Previous {
            pid: replica.pid,
            at: now,
            cpu_ns,
            percent: None,
        };
        let Some(previous) = self.previous.get_mut(replica.alloc_id) else {
            self.previous.insert(replica.alloc_id.to_string(), first);
            return None;
        };
        if previous.pid != replica.pid || cpu_ns < previous.cpu_ns {
            *previous = first;
            return None;
        }
        let elapsed = now.saturating_duration_since(previous.at);
        if elapsed < MIN_SPAN {
            return previous.percent;
        }
        let percent = cpu_percent(previous.cpu_ns, cpu_ns, elapsed, replica.cpu_millis);
        *previous = Previous { percent, ..first };
        percent
    }
}

/// A container's counters from its cgroup under any of `hierarchies`.
fn read_cgroup(hierarchies: &[PathBuf], cgroups_path: &Path) -> Option<Reading> {
    let relative = cgroups_path.strip_prefix("/").unwrap_or(cgroups_path);
    let dirs: Vec<PathBuf> = hierarchies.iter().map(|h| h.join(relative)).collect();
    let read = |file: &str| {
        dirs.iter()
            .find_map(|dir| fs::read_to_string(dir.join(file)).ok())
    };
    let cpu_ns = read("cpuacct.usage")
        .and_then(|s| s.trim().parse().ok())
        .or_else(|| {
            let usec = dirs.iter().find_map(|dir| {
                stat_field(
                    &fs::read_to_string(dir.join("cpu.stat")).ok()?,
                    "usage_usec",
                )
            })?;
            Some(usec.saturating_mul(1000))
        })?;
    let memory_bytes = read("memory.usage_in_bytes")
        .or_else(|| read("memory.current"))
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    Some(Reading {
        cpu_ns,
        memory_bytes,
    })
}

/// The value of `key` in a flat-keyed cgroup file (`cpu.stat`).
fn stat_field(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (k, v) = line.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok())?
    })
}

/// A process's counters from `/proc/<pid>`.
fn read_process(pid: u32) -> Option<Reading> {
    if pid == 0 {
        return None;
    }
    let ticks = process_ticks(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)?;
    let memory_bytes = fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib * 1024)
        })
        .unwrap_or(0);
    Some(Reading {
        cpu_ns: ticks.saturating_mul(1_000_000_000 / USER_HZ),
        memory_bytes,
    })
}

/// utime + stime + cutime + cstime (fields 14 to 17) of a
/// `/proc/<pid>/stat` line, in clock ticks. Fields are counted from the
/// last `)`: the command name may contain spaces and parentheses.
fn process_ticks(line: &str) -> Option<u64> {
    let rest = &line[line.rfind(')')? + 1..];
    // The first field after the name is field 3.
    let fields: Vec<&str> = rest.split_whitespace().skip(11).take(4).collect();
    if fields.len() < 4 {
        return None;
    }
    fields.iter().try_fold(0u64, |sum, f| {
        let ticks: i64 = f.parse().ok()?;
        Some(sum.saturating_add(ticks.max(0) as u64))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    fn replica(pid: u32, cpu_millis: u32) -> Replica<'static> {
        Replica {
            alloc_id: "a1",
            service: "web",
            pid,
            cpu_millis,
            source: Source::Process(pid),
        }
    }

    #[test]
    fn cpu_is_a_percent_of_the_replicas_limit() {
        // 100 ms of CPU in 1 s at a limit of 200 millicores: half of it.
        let used = cpu_percent(0, 100_000_000, SECOND, 200).unwrap();
        assert!((used - 50.0).abs() < 1e-9, "{used}");
        // Throttled at its limit: 100%.
        let full = cpu_percent(1_000, 1_000 + 400_000_000, 2 * SECOND, 200).unwrap();
        assert!((full - 100.0).abs() < 1e-9, "{full}");
        // A period's quota more than the limit allows over the span: cut.
        let jitter = cpu_percent(0, 420_000_000, 2 * SECOND, 200).unwrap();
        assert_eq!(jitter, 100.0);
    }

    #[test]
    fn cpu_without_a_limit_is_a_percent_of_one_cpu() {
        let half = cpu_percent(0, 500_000_000, SECOND, 0).unwrap();
        assert!((half - 50.0).abs() < 1e-9, "{half}");
        // Two busy CPUs: 200%.
        let two = cpu_percent(0, 2_000_000_000, SECOND, 0).unwrap();
        assert!((two - 200.0).abs() < 1e-9, "{two}");
    }

    #[test]
    fn a_counter_that_went_down_or_no_elapsed_time_measures_nothing() {
        assert_eq!(cpu_percent(500, 100, SECOND, 0), None);
        assert_eq!(cpu_percent(100, 500, Duration::ZERO, 0), None);
    }

    #[test]
    fn a_first_reading_reports_nothing_and_the_second_a_percent() {
        let mut usage = Usage::default();
        let t0 = Instant::now();
        let r = replica(10, 1000);
        assert_eq!(usage.observe(&r, 1_000_000_000, t0), None);
        let percent = usage.observe(&r, 1_500_000_000, t0 + 2 * SECOND);
        assert!((percent.unwrap() - 25.0).abs() < 1e-9, "{percent:?}");
    }

    #[test]
    fn a_counter_reset_starts_over_from_the_new_counter() {
        let mut usage = Usage::default();
        let t0 = Instant::now();
        let r = replica(10, 0);
        usage.observe(&r, 5_000_000_000, t0);
        // Restarted in place (same PID is possible for a container): lower.
        assert_eq!(usage.observe(&r, 100_000_000, t0 + 2 * SECOND), None);
        let after = usage.observe(&r, 1_100_000_000, t0 + 4 * SECOND).unwrap();
        assert!((after - 50.0).abs() < 1e-9, "{after}");
    }

    #[test]
    fn a_new_pid_starts_over_even_with_a_higher_counter() {
        let mut usage = Usage::default();
        let t0 = Instant::now();
        usage.observe(&replica(10, 0), 100, t0);
        assert_eq!(
            usage.observe(&replica(11, 0), 9_000_000_000, t0 + 2 * SECOND),
            None
        );
    }

    #[test]
    fn readings_too_close_together_keep_the_last_percent() {
        let mut usage = Usage::default();
        let t0 = Instant::now();
        let r = replica(10, 0);
        usage.observe(&r, 0, t0);
        let first = usage.observe(&r, 1_000_000_000, t0 + 2 * SECOND);
        assert!((first.unwrap() - 50.0).abs() < 1e-9);
        // 10 ms later, with a tick more: still the last percent...
        let soon = usage.observe(
            &r,
            1_010_000_000,
            t0 + 2 * SECOND + 10 * Duration::from_millis(1),
        );
        assert_eq!(soon, first);
        // ...and the next one is measured from the older reading.
        let next = usage
            .observe(&r, 1_000_000_000 + 2_000_000_000, t0 + 4 * SECOND)
            .unwrap();
        assert!((next - 100.0).abs() < 1e-9, "{next}");
    }

    #[test]
    fn reports_stop_once_no_replica_is_measured_twice_in_a_row() {
        let mut usage = Usage::default();
        let now = Instant::now();
        assert_eq!(usage.report(Vec::new(), now), None);
        let me = std::process::id();
        let running = [replica(me, 0)];
        // First reading: nothing measured yet, nothing to send.
        assert_eq!(usage.report(running, now), None);
        let measured = usage.report(running, now + 2 * SECOND).expect("measured");
        assert_eq!(measured.len(), 1);
        assert_eq!(measured[0].service, "web");
        assert!(measured[0].memory_bytes > 0);
        // The replica went away: one empty report, then nothing.
        assert_eq!(usage.report(Vec::new(), now + 4 * SECOND), Some(Vec::new()));
        assert_eq!(usage.report(Vec::new(), now + 6 * SECOND), None);
        assert!(usage.previous.is_empty());
    }

    #[test]
    fn process_times_are_summed_past_odd_names() {
        let line = "4242 (my (odd) prog) S 1 4242 4242 0 -1 4194560 120 0 0 0 7 3 2 1 20 0 1 0 987654 2125824 200";
        assert_eq!(process_ticks(line), Some(13));
        assert_eq!(process_ticks("1 (init) S 0 1"), None);
        assert!(read_process(std::process::id()).is_some_and(|r| r.memory_bytes > 0));
    }

    #[test]
    fn cgroup_counters_come_from_v1_cpuacct_or_v2_cpu_stat() {
        let root = tempfile::tempdir().unwrap();
        let (v1, v2) = (root.path().join("cpuacct"), root.path().join("unified"));
        let path = Path::new("/skiff/a1");
        fs::create_dir_all(v2.join("skiff/a1")).unwrap();
        fs::write(
            v2.join("skiff/a1/cpu.stat"),
            "usage_usec 2500\nuser_usec 2000\nsystem_usec 500\n",
        )
        .unwrap();
        fs::write(v2.join("skiff/a1/memory.current"), "4096\n").unwrap();
        let hierarchies = vec![v1.clone(), v2.clone()];
        assert_eq!(
            read_cgroup(&hierarchies, path),
            Some(Reading {
                cpu_ns: 2_500_000,
                memory_bytes: 4096
            })
        );
        fs::create_dir_all(v1.join("skiff/a1")).unwrap();
        fs::write(v1.join("skiff/a1/cpuacct.usage"), "123456789\n").unwrap();
        assert_eq!(
            read_cgroup(&hierarchies, path).map(|r| r.cpu_ns),
            Some(123_456_789)
        );
        assert_eq!(read_cgroup(&hierarchies, Path::new("/skiff/gone")), None);
    }
}
