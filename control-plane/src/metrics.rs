//! Server metrics in Prometheus' text format, served by a tiny HTTP/1.1
//! responder on `--metrics-listen` (GET /metrics).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::consensus::RaftStatus;

/// Bucket bounds of the latency histograms, in seconds.
const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0,
];

/// A fixed-bucket histogram updated with atomics (no lock on the hot path).
#[derive(Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len()],
    sum_micros: AtomicU64,
    total: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, duration: Duration) {
        let seconds = duration.as_secs_f64();
        if let Some(bucket) = BUCKETS.iter().position(|bound| seconds <= *bound) {
            self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        }
        self.sum_micros
            .fetch_add(duration.as_micros() as u64, Ordering::Relaxed);
        self.total.fetch_add(1, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (bound, count) in BUCKETS.iter().zip(&self.counts) {
            cumulative += count.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let total = self.total.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {total}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {total}");
    }
}

/// Everything a server counts.
#[derive(Default)]
pub struct Metrics {
    pub proposals: AtomicU64,
    pub proposals_failed: AtomicU64,
    pub leader_changes: AtomicU64,
    pub snapshots: AtomicU64,
    /// From a proposal reaching the leader to its result (committed and applied).
    pub commit_latency: Histogram,
    /// One turn of the Ready loop: apply, persist with one fsync, send.
    pub ready_latency: Histogram,
}

impl Metrics {
    pub fn render(&self, status: &RaftStatus) -> String {
        let mut out = String::new();
        let gauges = [
            ("skiff_raft_term", "Current Raft term.", status.term),
            (
                "skiff_raft_commit_index",
                "Highest committed log index.",
                status.commit_index,
            ),
            (
                "skiff_raft_applied_index",
                "Highest applied log index.",
                status.applied_index,
            ),
            (
                "skiff_raft_log_entries",
                "Entries in the log since the last snapshot.",
                status.last_index.saturating_sub(status.snapshot_index),
            ),
            (
                "skiff_raft_is_leader",
                "1 if this server leads.",
                u64::from(status.role == "leader"),
            ),
            (
                "skiff_raft_voters",
                "Voting members.",
                status.voters.len() as u64,
            ),
        ];
        for (name, help, value) in gauges {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
        }
        let counters = [
            (
                "skiff_raft_proposals_total",
                "Proposals handled by this server as leader.",
                &self.proposals,
            ),
            (
                "skiff_raft_proposals_failed_total",
                "Proposals refused or lost.",
                &self.proposals_failed,
            ),
            (
                "skiff_raft_leader_changes_total",
                "Leader changes seen.",
                &self.leader_changes,
            ),
            (
                "skiff_raft_snapshots_total",
                "Snapshots taken or installed.",
                &self.snapshots,
            ),
        ];
        for (name, help, value) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                value.load(Ordering::Relaxed)
            );
        }
        self.commit_latency.render(
            &mut out,
            "skiff_raft_commit_seconds",
            "Proposal to committed and applied, on the leader.",
        );
        self.ready_latency.render(
            &mut out,
            "skiff_raft_ready_seconds",
            "One Ready: apply, persist (fsync), send.",
        );
        out
    }
}

/// Serves `GET /metrics` until `stop` turns true.
pub async fn serve(
    listener: TcpListener,
    metrics: std::sync::Arc<Metrics>,
    status: watch::Receiver<RaftStatus>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.wait_for(|s| *s) => return,
        };
        let Ok((mut socket, _)) = accepted else {
            continue;
        };
        let metrics = metrics.clone();
        let status = status.clone();
        tokio::spawn(async move {
            let mut request = [0u8; 2048];
            let read =
                tokio::time::timeout(Duration::from_secs(5), socket.read(&mut request)).await;
            let Ok(Ok(n)) = read else { return };
            let head = String::from_utf8_lossy(&request[..n]);
            let (code, body) = if head.starts_with("GET /metrics") {
                ("200 OK", metrics.render(&status.borrow()))
            } else {
                ("404 Not Found", "try GET /metrics\n".to_string())
            };
            let response = format!(
                "HTTP/1.1 {code}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = socket.write_all(response.as_bytes()).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every sample line is `name{labels} value` with a finite number, and
    /// every metric is declared with HELP and TYPE first.
    #[test]
    fn metrics_render_as_prometheus_text() {
        let metrics = Metrics::default();
        metrics.proposals.fetch_add(3, Ordering::Relaxed);
        metrics.commit_latency.observe(Duration::from_micros(1500));
        metrics.commit_latency.observe(Duration::from_millis(30));
        let status = RaftStatus {
            term: 4,
            commit_index: 9,
            role: "leader",
            ..Default::default()
        };
        let text = metrics.render(&status);
        let mut declared = std::collections::HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                declared.insert(rest.split(' ').next().unwrap().to_string());
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            let (name, value) = line.rsplit_once(' ').expect("sample has a value");
            assert!(
                value.parse::<f64>().is_ok_and(f64::is_finite),
                "bad value in {line}"
            );
            let base = name.split('{').next().unwrap();
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .fold(base, |n, s| n.strip_suffix(s).unwrap_or(n));
            assert!(
                declared.contains(family),
                "{base} used before its TYPE line"
            );
        }
        assert!(text.contains("skiff_raft_term 4\n"));
        assert!(text.contains("skiff_raft_proposals_total 3\n"));
        assert!(text.contains("skiff_raft_commit_seconds_bucket{le=\"0.002\"} 1\n"));
        assert!(text.contains("skiff_raft_commit_seconds_count 2\n"));
        assert!(text.contains("skiff_raft_is_leader 1\n"));
    }
}
