//! Server metrics: the consensus loop's counters and latency histograms
//! (updated by it), and a collector of gauges read at each scrape from the
//! Raft status and the applied state (services, replicas, nodes,
//! deployments). Served by `skiff_metrics::serve` on `--metrics-listen`.

use std::collections::BTreeMap;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use skiff_spec::AllocState;

use crate::consensus::{Consensus, RaftStatus};
use crate::state::{DesiredState, NodeStatus, State};

/// Latency buckets: 0.5 ms to ~2 s, doubling.
fn latency_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.0005, 2.0, 13)
}

/// What the consensus loop counts as it runs.
#[derive(Debug)]
pub struct Metrics {
    pub proposals: Counter,
    pub proposals_failed: Counter,
    pub leader_changes: Counter,
    pub snapshots: Counter,
    /// From a proposal reaching the leader to its result (committed and applied).
    pub commit_latency: Histogram,
    /// One turn of the Ready loop: apply, persist with one fsync, send.
    pub ready_latency: Histogram,
    /// Applying one Ready's committed entries to the state.
    pub apply_latency: Histogram,
    /// Encoding and writing one snapshot (then compacting the log).
    pub snapshot_duration: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            proposals: Counter::default(),
            proposals_failed: Counter::default(),
            leader_changes: Counter::default(),
            snapshots: Counter::default(),
            commit_latency: Histogram::new(latency_buckets()),
            ready_latency: Histogram::new(latency_buckets()),
            apply_latency: Histogram::new(latency_buckets()),
            snapshot_duration: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
        }
    }
}

/// Records `duration` in `histogram`, in seconds.
pub fn observe(histogram: &Histogram, duration: Duration) {
    histogram.observe(duration.as_secs_f64());
}

impl Metrics {
    /// Adds these metrics to `registry`.
    pub fn register(&self, registry: &mut Registry) {
        let counters = [
            (
                "skiff_raft_proposals",
                "Proposals handled by this server as leader.",
                &self.proposals,
            ),
            (
                "skiff_raft_proposals_failed",
                "Proposals refused or lost.",
                &self.proposals_failed,
            ),
            (
                "skiff_raft_leader_changes",
                "Leader changes seen by this server.",
                &self.leader_changes,
            ),
            (
                "skiff_raft_snapshots",
                "Snapshots taken or installed.",
                &self.snapshots,
            ),
        ];
        for (name, help, counter) in counters {
            registry.register(name, help, counter.clone());
        }
        registry.register(
            "skiff_raft_commit_seconds",
            "Proposal to committed and applied, on the leader.",
            self.commit_latency.clone(),
        );
        registry.register(
            "skiff_raft_ready_seconds",
            "One Ready turn: apply, persist (one fsync), send.",
            self.ready_latency.clone(),
        );
        registry.register(
            "skiff_raft_apply_seconds",
            "Applying one Ready's committed entries to the state machine.",
            self.apply_latency.clone(),
        );
        registry.register(
            "skiff_raft_snapshot_seconds",
            "Encoding and writing one snapshot of the state, then compacting the log.",
            self.snapshot_duration.clone(),
        );
    }
}

/// Gauges read at each scrape from a server's Raft status and applied state.
pub struct StateCollector {
    pub consensus: Consensus,
}

impl std::fmt::Debug for StateCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StateCollector")
    }
}

/// One service's replica counts.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ServiceGauges {
    /// Replicas its spec asks for.
    pub desired: u64,
    /// Replicas desired to run that are running or healthy.
    pub running: u64,
    /// Restarts of its current replicas.
    pub restarts: u64,
}

/// A per-service gauge: name, help, and how to read it.
type ServiceFamily = (&'static str, &'static str, fn(&ServiceGauges) -> u64);

/// A point-in-time reading of the state, taken under its lock and encoded
/// after it is released.
#[derive(Debug, Default, PartialEq)]
pub struct StateGauges {
    pub services: u64,
    pub per_service: BTreeMap<String, ServiceGauges>,
    /// Per service and replica state, replicas desired to run.
    pub replicas: BTreeMap<(String, &'static str), u64>,
    /// Per node: 1 if ready, 0 if down.
    pub node_ready: BTreeMap<String, u64>,
    pub nodes_by_status: BTreeMap<&'static str, u64>,
    /// The services' latest deployments, by status.
    pub deployments: BTreeMap<&'static str, u64>,
    /// Per service whose latest deployment ended failed or rolled back, its status.
    pub deployment_status: BTreeMap<String, &'static str>,
}

impl StateGauges {
    pub fn read(state: &State) -> Self {
        let mut g = StateGauges {
            services: state.services.len() as u64,
            ..Default::default()
        };
        for (name, service) in &state.services {
            let desired = u64::from(service.spec.replicas);
            g.per_service.insert(
                name.clone(),
                ServiceGauges {
                    desired,
                    ..Default::default()
                },
            );
            if let Some(d) = &service.deployment {
                *g.deployments.entry(d.status.as_str()).or_default() += 1;
                g.deployment_status.insert(name.clone(), d.status.as_str());
            }
        }
        for alloc in state.allocs.values() {
            if alloc.desired != DesiredState::Run {
                continue;
            }
            *g.replicas
                .entry((alloc.service.clone(), alloc.state.as_str()))
                .or_default() += 1;
            if let Some(s) = g.per_service.get_mut(&alloc.service) {
                if matches!(alloc.state, AllocState::Running | AllocState::Healthy) {
                    s.running += 1;
                }
                s.restarts += u64::from(alloc.restarts);
            }
        }
        for status in [NodeStatus::Ready, NodeStatus::Down] {
            g.nodes_by_status.insert(status.as_str(), 0);
        }
        for node in state.nodes.values() {
            *g.nodes_by_status.entry(node.status.as_str()).or_default() += 1;
            g.node_ready.insert(
                node.name.clone(),
                u64::from(node.status == NodeStatus::Ready),
            );
        }
        g
    }
}

fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> std::fmt::Result {
    ConstGauge::new(value).encode(encoder.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

/// Encodes a gauge family with one label per series.
fn labelled<'a, K: AsRef<str> + 'a>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &str,
    series: impl IntoIterator<Item = (K, u64)>,
) -> std::fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (value_label, value) in series {
        let labels = [(label, value_label.as_ref())];
        ConstGauge::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// Encodes the Raft status and the state's gauges.
pub fn encode_gauges(
    encoder: &mut DescriptorEncoder,
    status: &RaftStatus,
    g: &StateGauges,
) -> std::fmt::Result {
    let raft = [
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
            "skiff_raft_has_leader",
            "1 if this server knows a leader.",
            u64::from(status.leader_id != 0),
        ),
        (
            "skiff_raft_voters",
            "Voting members.",
            status.voters.len() as u64,
        ),
        ("skiff_services", "Services in the state.", g.services),
    ];
    for (name, help, value) in raft {
        gauge(encoder, name, help, value)?;
    }
    let per_service: [ServiceFamily; 3] = [
        (
            "skiff_service_desired_replicas",
            "Replicas the service's spec asks for.",
            |s| s.desired,
        ),
        (
            "skiff_service_running_replicas",
            "Replicas desired to run that are running or healthy.",
            |s| s.running,
        ),
        (
            "skiff_service_restarts",
            "Restarts of the service's current replicas.",
            |s| s.restarts,
        ),
    ];
    for (name, help, value) in per_service {
        labelled(
            encoder,
            name,
            help,
            "service",
            g.per_service.iter().map(|(k, v)| (k, value(v))),
        )?;
    }
    let mut family = encoder.encode_descriptor(
        "skiff_replicas",
        "Replicas desired to run, by service and state.",
        None,
        MetricType::Gauge,
    )?;
    for ((service, state), value) in &g.replicas {
        let labels = [("service", service.as_str()), ("state", state)];
        ConstGauge::new(*value).encode(family.encode_family(&labels)?)?;
    }
    labelled(
        encoder,
        "skiff_nodes",
        "Nodes by status.",
        "status",
        g.nodes_by_status.iter().map(|(k, v)| (*k, *v)),
    )?;
    labelled(
        encoder,
        "skiff_node_ready",
        "1 if the node is ready, 0 if it is down.",
        "node",
        g.node_ready.iter().map(|(k, v)| (k, *v)),
    )?;
    labelled(
        encoder,
        "skiff_deployments",
        "The services' latest deployments, by status.",
        "status",
        g.deployments.iter().map(|(k, v)| (*k, *v)),
    )?;
    let mut family = encoder.encode_descriptor(
        "skiff_service_deployment",
        "1 for the status of the service's latest deployment.",
        None,
        MetricType::Gauge,
    )?;
    for (service, status) in &g.deployment_status {
        let labels = [("service", service.as_str()), ("status", status)];
        ConstGauge::new(1u64).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for StateCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let status = self.consensus.status();
        let gauges = StateGauges::read(&self.consensus.state());
        encode_gauges(&mut encoder, &status, &gauges)
    }
}

/// The bytes a server's Raft log (sled or WAL) and its snapshots take on
/// disk, read at each scrape (a walk of a few directories).
#[derive(Debug)]
pub struct StorageCollector {
    pub data_dir: std::path::PathBuf,
}

/// Bytes of the files under `dir`, recursively (0 if it does not exist).
fn dir_bytes(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| match entry.metadata() {
            Ok(meta) if meta.is_dir() => dir_bytes(&entry.path()),
            Ok(meta) => meta.len(),
            Err(_) => 0,
        })
        .sum()
}

impl Collector for StorageCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let log = dir_bytes(&self.data_dir.join("raft")) + dir_bytes(&self.data_dir.join("wal"));
        gauge(
            &mut encoder,
            "skiff_raft_log_bytes",
            "Bytes of the Raft log on disk (sled database or write-ahead log).",
            log,
        )?;
        gauge(
            &mut encoder,
            "skiff_raft_snapshot_bytes",
            "Bytes of the Raft snapshot files on disk.",
            dir_bytes(&self.data_dir.join("snapshots")),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Fixed(RaftStatus, StateGauges);

    impl Collector for Fixed {
        fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
            encode_gauges(&mut encoder, &self.0, &self.1)
        }
    }

    #[test]
    fn raft_counters_histograms_and_state_gauges_render_as_prometheus_text() {
        let metrics = Metrics::default();
        metrics.proposals.inc_by(3);
        observe(&metrics.commit_latency, Duration::from_micros(1500));
        observe(&metrics.commit_latency, Duration::from_millis(30));
        let status = RaftStatus {
            term: 4,
            commit_index: 9,
            leader_id: 1,
            role: "leader",
            ..Default::default()
        };
        let mut gauges = StateGauges {
            services: 1,
            ..Default::default()
        };
        gauges.per_service.insert(
            "web".into(),
            ServiceGauges {
                desired: 3,
                running: 2,
                restarts: 1,
            },
        );
        gauges.replicas.insert(("web".into(), "running"), 2);
        gauges.nodes_by_status.insert("down", 1);
        gauges.node_ready.insert("n1".into(), 0);
        gauges.deployment_status.insert("web".into(), "failed");
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        registry.register_collector(Box::new(Fixed(status, gauges)));
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &registry).unwrap();
        for expected in [
            "skiff_raft_term 4\n",
            "skiff_raft_has_leader 1\n",
            "skiff_raft_proposals_total 3\n",
            "# TYPE skiff_raft_commit_seconds histogram\n",
            "skiff_raft_commit_seconds_bucket{le=\"0.002\"} 1\n",
            "skiff_raft_commit_seconds_count 2\n",
            "skiff_raft_is_leader 1\n",
            "skiff_service_desired_replicas{service=\"web\"} 3\n",
            "skiff_service_running_replicas{service=\"web\"} 2\n",
            "skiff_replicas{service=\"web\",state=\"running\"} 2\n",
            "skiff_nodes{status=\"down\"} 1\n",
            "skiff_node_ready{node=\"n1\"} 0\n",
            "skiff_service_deployment{service=\"web\",status=\"failed\"} 1\n",
        ] {
            assert!(text.contains(expected), "no {expected:?} in\n{text}");
        }
    }
}
