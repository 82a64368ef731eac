//! The `process_*` metrics Prometheus' client libraries export, read from
//! `/proc/self` at each scrape (Linux only; elsewhere none are exported).

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;

/// Clock ticks per second in `/proc/<pid>/stat` (`USER_HZ`, fixed at 100
/// by the Linux ABI whatever the kernel's `HZ`).
const USER_HZ: f64 = 100.0;

/// What `/proc/self` says of this process.
#[derive(Debug, Default, PartialEq)]
struct ProcessStats {
    cpu_seconds: f64,
    resident_bytes: u64,
    virtual_bytes: u64,
    threads: u64,
    start_time_seconds: f64,
    open_fds: u64,
}

/// Parses `/proc/self/stat` (fields after the parenthesised command, which
/// may hold spaces), `VmRSS` from `/proc/self/status` and `btime` from
/// `/proc/stat`.
fn parse(stat: &str, status: &str, proc_stat: &str) -> Option<ProcessStats> {
    let after_comm = &stat[stat.rfind(')')? + 2..];
    // Field 3 (state) is index 0 here.
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    let field = |n: usize| -> Option<u64> { fields.get(n - 3)?.parse().ok() };
    let (utime, stime) = (field(14)?, field(15)?);
    let kb = |line: &str| -> Option<u64> {
        line.split_whitespace()
            .nth(1)?
            .parse::<u64>()
            .ok()
            .map(|k| k * 1024)
    };
    let resident_bytes = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(kb)
        .unwrap_or(0);
    let boot: f64 = proc_stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    Some(ProcessStats {
        cpu_seconds: (utime + stime) as f64 / USER_HZ,
        resident_bytes,
        virtual_bytes: field(23)?,
        threads: field(20)?,
        start_time_seconds: boot + field(22)? as f64 / USER_HZ,
        open_fds: 0,
    })
}

fn read() -> Option<ProcessStats> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let proc_stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let mut stats = parse(&stat, &status, &proc_stat)?;
    stats.open_fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64);
    Some(stats)
}

/// A collector of this process's `process_*` metrics.
#[derive(Debug)]
pub struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(s) = read() else { return Ok(()) };
        let cpu = ConstCounter::new(s.cpu_seconds);
        cpu.encode(encoder.encode_descriptor(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds.",
            None,
            MetricType::Counter,
        )?)?;
        let gauges: [(&str, &str, f64); 5] = [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                s.resident_bytes as f64,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes.",
                s.virtual_bytes as f64,
            ),
            (
                "process_open_fds",
                "Number of open file descriptors.",
                s.open_fds as f64,
            ),
            ("process_threads", "Number of OS threads.", s.threads as f64),
            (
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds.",
                s.start_time_seconds,
            ),
        ];
        for (name, help, value) in gauges {
            ConstGauge::new(value).encode(encoder.encode_descriptor(
                name,
                help,
                None,
                MetricType::Gauge,
            )?)?;
        }
        Ok(())
    }
}

/// The size and free space of the filesystem holding a data dir
/// (`skiff_data_dir_size_bytes`, `skiff_data_dir_free_bytes`: what a
/// non-root writer may still use).
#[derive(Debug)]
pub struct DiskCollector {
    pub path: std::path::PathBuf,
}

impl Collector for DiskCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Ok(fs) = nix::sys::statvfs::statvfs(&self.path) else {
            return Ok(());
        };
        let block = fs.fragment_size() as f64;
        let sizes = [
            (
                "skiff_data_dir_size_bytes",
                "Size of the filesystem holding the data dir.",
                fs.blocks() as f64 * block,
            ),
            (
                "skiff_data_dir_free_bytes",
                "Bytes available to unprivileged writers on the filesystem holding the data dir.",
                fs.blocks_available() as f64 * block,
            ),
        ];
        for (name, help, value) in sizes {
            ConstGauge::new(value).encode(encoder.encode_descriptor(
                name,
                help,
                None,
                MetricType::Gauge,
            )?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_is_parsed_past_a_command_with_spaces_and_parens() {
        let stat = "42 (skiff (dev) x) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 7 0 1000 123456789 3000 18446744073709551615";
        let status = "Name:\tskiff\nVmRSS:\t   2048 kB\n";
        let s = parse(stat, status, "cpu 1 2 3\nbtime 1700000000\n").unwrap();
        assert_eq!(s.cpu_seconds, 3.0);
        assert_eq!(s.threads, 7);
        assert_eq!(s.start_time_seconds, 1_700_000_010.0);
        assert_eq!(s.virtual_bytes, 123_456_789);
        assert_eq!(s.resident_bytes, 2048 * 1024);
    }
}
