//! The routing proxy's traffic counters per published service on this node,
//! and their collector for the agent's `GET /metrics` (served by
//! `skiff_metrics::serve`).
//!
//! Counters only grow for the agent's lifetime (also after a service is
//! removed), as Prometheus expects of a counter. Per-replica counters are
//! keyed by allocation id, so they survive pool updates; a replica's are
//! forgotten once it has been out of the pool for [`REPLICA_RETENTION`]
//! with no connection open (its series then ends), which bounds memory
//! under a churn of replicas.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::usage::ReplicaUsage;

/// The variable where an agent publishes its metrics address (`HOST:PORT`).
pub fn address_key(node: &str) -> String {
    format!("_skiff/nodes/{node}/metrics")
}

/// The counters of one published service's proxy on this node.
#[derive(Debug, Default)]
pub struct ServiceCounters {
    pub connections: AtomicU64,
    pub active: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub connect_failures: AtomicU64,
    pub no_endpoint: AtomicU64,
    pub requests: AtomicU64,
    /// Endpoints in the pool now (a gauge).
    pub endpoints: AtomicU64,
    /// Client connections held now, waiting for a replica (a gauge).
    pub waiting: AtomicU64,
    /// Per replica, by allocation id.
    replicas: Mutex<BTreeMap<String, ReplicaEntry>>,
    /// HTTP request durations (request head to response status line, as
    /// the proxy sees them), by status class.
    durations: RequestDurations,
}

/// One histogram per status class (1xx to 5xx), and whether each has
/// observed anything (a class never seen is not exported).
#[derive(Debug)]
struct RequestDurations([Histogram; 5], [AtomicU64; 5]);

impl Default for RequestDurations {
    fn default() -> Self {
        // 1 ms to ~16 s, doubling.
        Self(
            std::array::from_fn(|_| Histogram::new(exponential_buckets(0.001, 2.0, 15))),
            Default::default(),
        )
    }
}

/// How long a replica's counters outlive its leaving the pool.
pub const REPLICA_RETENTION: Duration = Duration::from_secs(60);

/// The counters of one replica of a service, as this node's proxy sees it.
#[derive(Debug, Default)]
pub struct ReplicaCounters {
    /// Connections opened to the replica for a client.
    pub connections: AtomicU64,
    /// Dials refused or timed out, and connections the replica closed
    /// before answering the first request (replayed on another replica).
    pub connect_failures: AtomicU64,
    /// HTTP final responses, and those with a 5xx status.
    pub responses: AtomicU64,
    pub errors: AtomicU64,
    /// Connections open to the replica now (a gauge).
    pub active: AtomicU64,
    /// The service version the replica runs (a label).
    pub version: AtomicU64,
}

#[derive(Debug)]
struct ReplicaEntry {
    counters: Arc<ReplicaCounters>,
    /// When the replica left the pool; `None` while it is in it.
    gone_since: Option<Instant>,
}

impl ServiceCounters {
    /// Records an HTTP request answered with a status of `class` (1..=5)
    /// after `duration`.
    pub fn observe_request(&self, class: u8, duration: Duration) {
        let index = usize::from(class.clamp(1, 5) - 1);
        self.durations.0[index].observe(duration.as_secs_f64());
        self.durations.1[index].fetch_add(1, Ordering::Relaxed);
    }

    /// Makes `alloc_ids` the replicas in the pool as of `now` and returns
    /// their counters in the same order (kept from before, or new at
    /// zero). Replicas not listed are marked gone and forgotten later.
    pub fn update_replicas(&self, alloc_ids: &[&str], now: Instant) -> Vec<Arc<ReplicaCounters>> {
        let mut replicas = self.replicas.lock().unwrap_or_else(|p| p.into_inner());
        for (alloc_id, entry) in replicas.iter_mut() {
            if !alloc_ids.contains(&alloc_id.as_str()) {
                entry.gone_since.get_or_insert(now);
            }
        }
        let counters = alloc_ids
            .iter()
            .map(|alloc_id| {
                let entry =
                    replicas
                        .entry((*alloc_id).to_string())
                        .or_insert_with(|| ReplicaEntry {
                            counters: Arc::default(),
                            gone_since: None,
                        });
                entry.gone_since = None;
                entry.counters.clone()
            })
            .collect();
        forget_expired(&mut replicas, now);
        counters
    }

    /// Every remembered replica's counters as of `now` (forgetting those
    /// gone for [`REPLICA_RETENTION`] with no connection open).
    pub fn replica_samples(&self, now: Instant) -> Vec<ReplicaSample> {
        let mut replicas = self.replicas.lock().unwrap_or_else(|p| p.into_inner());
        forget_expired(&mut replicas, now);
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        replicas
            .iter()
            .map(|(alloc_id, entry)| {
                let c = &entry.counters;
                ReplicaSample {
                    alloc_id: alloc_id.clone(),
                    version: get(&c.version),
                    connections: get(&c.connections),
                    connect_failures: get(&c.connect_failures),
                    responses: get(&c.responses),
                    errors: get(&c.errors),
                    active: get(&c.active),
                }
            })
            .collect()
    }
}

fn forget_expired(replicas: &mut BTreeMap<String, ReplicaEntry>, now: Instant) {
    replicas.retain(|_, entry| match entry.gone_since {
        Some(gone) => {
            now.saturating_duration_since(gone) < REPLICA_RETENTION
                || entry.counters.active.load(Ordering::Relaxed) > 0
        }
        None => true,
    });
}

/// A point-in-time copy of one replica's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplicaSample {
    pub alloc_id: String,
    pub version: u64,
    pub connections: u64,
    pub connect_failures: u64,
    pub responses: u64,
    pub errors: u64,
    pub active: u64,
}

/// A point-in-time copy of one service's counters.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TrafficSample {
    pub service: String,
    pub connections: u64,
    pub active: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub connect_failures: u64,
    pub no_endpoint: u64,
    pub requests: u64,
    pub endpoints: u64,
    pub waiting: u64,
    /// Per replica, by allocation id.
    pub replicas: Vec<ReplicaSample>,
}

/// Every service's counters, shared by the proxy (writers), the sync loop
/// (traffic reports) and the metrics endpoint.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    services: Arc<Mutex<BTreeMap<String, Arc<ServiceCounters>>>>,
    /// Signalled when a connection starts waiting for a replica of a
    /// service none was waiting for: the sync loop reports traffic at once,
    /// so the control plane wakes a service at zero without waiting for
    /// the next periodic report.
    demand: Arc<tokio::sync::Notify>,
    /// Each running replica's CPU and memory use at the last traffic
    /// report (see `usage`).
    replica_usage: Arc<Mutex<Vec<ReplicaUsage>>>,
}

impl Metrics {
    /// The counters of `service`, created at zero on first use.
    pub fn service(&self, service: &str) -> Arc<ServiceCounters> {
        let mut services = self.services.lock().unwrap_or_else(|p| p.into_inner());
        services.entry(service.to_string()).or_default().clone()
    }

    /// Replaces the replicas' CPU and memory use exported.
    pub fn set_replica_usage(&self, usage: Vec<ReplicaUsage>) {
        *self.replica_usage.lock().unwrap_or_else(|p| p.into_inner()) = usage;
    }

    /// Where new demand is signalled (see `Metrics::demand`'s field).
    pub fn demand(&self) -> Arc<tokio::sync::Notify> {
        self.demand.clone()
    }

    pub fn samples(&self) -> Vec<TrafficSample> {
        let now = Instant::now();
        let services = self.services.lock().unwrap_or_else(|p| p.into_inner());
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        services
            .iter()
            .map(|(service, c)| TrafficSample {
                service: service.clone(),
                connections: get(&c.connections),
                active: get(&c.active),
                bytes_in: get(&c.bytes_in),
                bytes_out: get(&c.bytes_out),
                connect_failures: get(&c.connect_failures),
                no_endpoint: get(&c.no_endpoint),
                requests: get(&c.requests),
                endpoints: get(&c.endpoints),
                waiting: get(&c.waiting),
                replicas: c.replica_samples(now),
            })
            .collect()
    }

    /// Adds the proxy's counters of this node (`node` label) to `registry`,
    /// read at each scrape; the per-replica pool series only if
    /// `per_replica` (they grow with every published replica of the
    /// cluster, on every agent).
    pub fn register(&self, registry: &mut Registry, node: &str, per_replica: bool) {
        registry.register_collector(Box::new(ProxyCollector {
            metrics: self.clone(),
            node: node.to_string(),
            per_replica,
        }));
    }
}

/// Encodes [`Metrics::samples`] at each scrape.
#[derive(Debug)]
struct ProxyCollector {
    metrics: Metrics,
    node: String,
    per_replica: bool,
}

/// A metric family: name (without a counter's `_total`), type, help, and
/// how to read it from a sample.
type Family<S, V = u64> = (&'static str, MetricType, &'static str, fn(&S) -> V);

const SERVICE_FAMILIES: [Family<TrafficSample>; 9] = [
    (
        "skiff_proxy_connections",
        MetricType::Counter,
        "Client connections accepted on the published port.",
        |s| s.connections,
    ),
    (
        "skiff_proxy_active_connections",
        MetricType::Gauge,
        "Client connections open now.",
        |s| s.active,
    ),
    (
        "skiff_proxy_received_bytes",
        MetricType::Counter,
        "Bytes received from clients and forwarded to replicas.",
        |s| s.bytes_in,
    ),
    (
        "skiff_proxy_sent_bytes",
        MetricType::Counter,
        "Bytes from replicas sent to clients.",
        |s| s.bytes_out,
    ),
    (
        "skiff_proxy_connect_failures",
        MetricType::Counter,
        "Failed dials of a replica (each retried on another one).",
        |s| s.connect_failures,
    ),
    (
        "skiff_proxy_no_endpoint",
        MetricType::Counter,
        "Connections closed at once because no replica was serving.",
        |s| s.no_endpoint,
    ),
    (
        "skiff_proxy_http_requests",
        MetricType::Counter,
        "HTTP/1.1 requests seen on services published with --protocol http.",
        |s| s.requests,
    ),
    (
        "skiff_proxy_endpoints",
        MetricType::Gauge,
        "Replicas in the proxy's pool.",
        |s| s.endpoints,
    ),
    (
        "skiff_proxy_waiting_connections",
        MetricType::Gauge,
        "Client connections held waiting for a replica to start.",
        |s| s.waiting,
    ),
];

const REPLICA_FAMILIES: [Family<ReplicaSample>; 5] = [
    (
        "skiff_proxy_replica_connections",
        MetricType::Counter,
        "Connections opened to the replica for a client.",
        |r| r.connections,
    ),
    (
        "skiff_proxy_replica_connect_failures",
        MetricType::Counter,
        "Failed dials of the replica, and connections it closed before answering.",
        |r| r.connect_failures,
    ),
    (
        "skiff_proxy_replica_responses",
        MetricType::Counter,
        "HTTP responses from the replica (services published with --protocol http).",
        |r| r.responses,
    ),
    (
        "skiff_proxy_replica_errors",
        MetricType::Counter,
        "HTTP responses from the replica with a 5xx status.",
        |r| r.errors,
    ),
    (
        "skiff_proxy_replica_active_connections",
        MetricType::Gauge,
        "Connections open to the replica now.",
        |r| r.active,
    ),
];

/// Encodes one sample of a family of `kind`.
fn encode_value(encoder: MetricEncoder, kind: MetricType, value: u64) -> std::fmt::Result {
    match kind {
        MetricType::Counter => ConstCounter::new(value).encode(encoder),
        _ => ConstGauge::new(value).encode(encoder),
    }
}

impl Collector for ProxyCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let samples = self.metrics.samples();
        let node = self.node.as_str();
        for (name, kind, help, value) in SERVICE_FAMILIES {
            let mut family = encoder.encode_descriptor(name, help, None, kind)?;
            for s in &samples {
                let labels = [("service", s.service.as_str()), ("node", node)];
                encode_value(family.encode_family(&labels)?, kind, value(s))?;
            }
        }
        let replica_families = if self.per_replica {
            &REPLICA_FAMILIES[..]
        } else {
            &[]
        };
        for &(name, kind, help, value) in replica_families {
            let mut family = encoder.encode_descriptor(name, help, None, kind)?;
            for s in &samples {
                for r in &s.replicas {
                    let version = r.version.to_string();
                    // No `node` label: per-replica series are the bulk of
                    // a scrape, and `instance` tells the agent.
                    let labels = [
                        ("service", s.service.as_str()),
                        ("alloc", r.alloc_id.as_str()),
                        ("version", version.as_str()),
                    ];
                    encode_value(family.encode_family(&labels)?, kind, value(r))?;
                }
            }
        }
        let usage = self
            .metrics
            .replica_usage
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let usage_families: [Family<ReplicaUsage, f64>; 2] = [
            (
                "skiff_replica_cpu_seconds",
                MetricType::Counter,
                "CPU time the replica used since it (re)started (cgroup, or /proc for a process replica).",
                |u| u.cpu_seconds,
            ),
            (
                "skiff_replica_memory_bytes",
                MetricType::Gauge,
                "Memory charged to the replica (cgroup), or its resident set (process replica).",
                |u| u.memory_bytes as f64,
            ),
        ];
        for (name, kind, help, value) in usage_families {
            let mut family = encoder.encode_descriptor(name, help, None, kind)?;
            for u in &usage {
                let labels = [
                    ("service", u.service.as_str()),
                    ("alloc", u.alloc_id.as_str()),
                ];
                let encoder = family.encode_family(&labels)?;
                match kind {
                    MetricType::Counter => ConstCounter::new(value(u)).encode(encoder)?,
                    _ => ConstGauge::new(value(u)).encode(encoder)?,
                }
            }
        }
        let services = self
            .metrics
            .services
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut family = encoder.encode_descriptor(
            "skiff_proxy_request_duration_seconds",
            "HTTP request head to response status line through the proxy (--protocol http), by service and status class.",
            None,
            MetricType::Histogram,
        )?;
        for (service, counters) in &services {
            let durations = &counters.durations;
            for (i, (histogram, seen)) in durations.0.iter().zip(&durations.1).enumerate() {
                if seen.load(Ordering::Relaxed) == 0 {
                    continue;
                }
                let code = format!("{}xx", i + 1);
                let labels = [
                    ("service", service.as_str()),
                    ("code", code.as_str()),
                    ("node", node),
                ];
                histogram.encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Metrics {
        fn render(&self, node: &str) -> String {
            let mut registry = Registry::default();
            self.register(&mut registry, node, true);
            let mut out = String::new();
            prometheus_client::encoding::prometheus_text::encode(&mut out, &registry).unwrap();
            out
        }
    }

    #[test]
    fn render_has_help_type_and_one_sample_per_service() {
        let m = Metrics::default();
        m.service("web").connections.fetch_add(3, Ordering::Relaxed);
        m.service("api\"x").requests.fetch_add(2, Ordering::Relaxed);
        let text = m.render("n1");
        assert!(text.contains("# TYPE skiff_proxy_connections_total counter"));
        assert!(text.contains("skiff_proxy_connections_total{service=\"web\",node=\"n1\"} 3"));
        assert!(
            text.contains("skiff_proxy_http_requests_total{service=\"api\\\"x\",node=\"n1\"} 2")
        );
        let samples = text.lines().filter(|l| !l.starts_with('#')).count();
        assert_eq!(samples, 18);
    }

    #[test]
    fn replicas_are_rendered_with_service_alloc_and_version_labels() {
        let m = Metrics::default();
        let web = m.service("web");
        let replicas = web.update_replicas(&["a1", "a2"], Instant::now());
        replicas[0].version.store(3, Ordering::Relaxed);
        replicas[0].responses.fetch_add(7, Ordering::Relaxed);
        replicas[1].errors.fetch_add(2, Ordering::Relaxed);
        let text = m.render("n1");
        assert!(text.contains("# TYPE skiff_proxy_replica_responses_total counter"));
        assert!(text.contains(
            "skiff_proxy_replica_responses_total{service=\"web\",alloc=\"a1\",version=\"3\"} 7"
        ));
        assert!(text.contains(
            "skiff_proxy_replica_errors_total{service=\"web\",alloc=\"a2\",version=\"0\"} 2"
        ));
        assert!(text.contains(
            "skiff_proxy_replica_active_connections{service=\"web\",alloc=\"a1\",version=\"3\"} 0"
        ));
        let samples = text.lines().filter(|l| !l.starts_with('#')).count();
        assert_eq!(samples, 9 + 2 * 5);
    }

    #[test]
    fn replica_counters_survive_pool_updates_and_are_forgotten_after_retention() {
        let c = ServiceCounters::default();
        let t0 = Instant::now();
        let a = c.update_replicas(&["a", "b"], t0)[0].clone();
        a.connections.fetch_add(5, Ordering::Relaxed);
        // Listed again: the same counters.
        let again = c.update_replicas(&["b", "a"], t0 + Duration::from_secs(1));
        assert!(Arc::ptr_eq(&again[1], &a));

        // "a" leaves the pool; kept for the retention, then forgotten.
        let left = t0 + Duration::from_secs(2);
        c.update_replicas(&["b"], left);
        let ids = |now| -> Vec<String> {
            c.replica_samples(now)
                .into_iter()
                .map(|r| r.alloc_id)
                .collect()
        };
        assert_eq!(
            ids(left + REPLICA_RETENTION - Duration::from_millis(1)),
            ["a", "b"]
        );
        assert_eq!(c.replica_samples(left)[0].connections, 5);
        // An open connection keeps it past the retention.
        a.active.fetch_add(1, Ordering::Relaxed);
        assert_eq!(ids(left + REPLICA_RETENTION), ["a", "b"]);
        a.active.fetch_sub(1, Ordering::Relaxed);
        assert_eq!(ids(left + REPLICA_RETENTION), ["b"]);

        // Back after being forgotten: counted afresh. Back before: kept.
        let back = c.update_replicas(&["a", "b"], left + REPLICA_RETENTION);
        assert_eq!(back[0].connections.load(Ordering::Relaxed), 0);
        c.update_replicas(&["a"], left + REPLICA_RETENTION);
        c.update_replicas(
            &["a", "b"],
            left + REPLICA_RETENTION * 2 - Duration::from_secs(1),
        );
        assert_eq!(ids(left + REPLICA_RETENTION * 3), ["a", "b"]);
    }

    #[test]
    fn request_durations_and_replica_usage_are_exported_by_service() {
        let m = Metrics::default();
        let web = m.service("web");
        web.observe_request(2, Duration::from_millis(3));
        web.observe_request(5, Duration::from_millis(300));
        m.set_replica_usage(vec![ReplicaUsage {
            alloc_id: "a1".into(),
            service: "web".into(),
            cpu_percent: 12.5,
            cpu_seconds: 4.0,
            memory_bytes: 1024,
        }]);
        let text = m.render("n1");
        for expected in [
            "# TYPE skiff_proxy_request_duration_seconds histogram\n",
            "skiff_proxy_request_duration_seconds_bucket{service=\"web\",code=\"2xx\",node=\"n1\",le=\"0.004\"} 1\n",
            "skiff_proxy_request_duration_seconds_count{service=\"web\",code=\"5xx\",node=\"n1\"} 1\n",
            "skiff_replica_cpu_seconds_total{service=\"web\",alloc=\"a1\"} 4.0\n",
            "skiff_replica_memory_bytes{service=\"web\",alloc=\"a1\"} 1024.0\n",
        ] {
            assert!(text.contains(expected), "no {expected:?} in\n{text}");
        }
        assert!(
            !text.contains("code=\"4xx\""),
            "classes never seen are not exported"
        );
    }

    /// Encodes `registry` five times: the best time and the size.
    fn time_exposition(registry: &Registry) -> (Duration, usize) {
        let mut best = Duration::MAX;
        let mut size = 0;
        for _ in 0..5 {
            let started = Instant::now();
            let mut out = String::new();
            prometheus_client::encoding::prometheus_text::encode(&mut out, registry).unwrap();
            best = best.min(started.elapsed());
            size = out.len();
        }
        (best, size)
    }

    /// Issue #18's budget: 10,000 replicas' series on one agent encode in
    /// under 50 ms (checked in a release build) into under 5 MB. Met for
    /// 10,000 replicas running on the agent (CPU and memory series); not
    /// when each is also in a routing proxy pool of this agent (5 more
    /// series each): that figure is printed and held to 8 MB.
    #[test]
    fn exposition_of_10000_replicas_fits_the_budget() {
        let m = Metrics::default();
        let now = Instant::now();
        let mut usage = Vec::new();
        let mut pools = Vec::new();
        for s in 0..100u64 {
            let service = format!("service-{s:03}");
            // Allocation ids of 16 hex digits.
            let ids: Vec<String> = (0..100u64)
                .map(|r| format!("{:016x}", (s * 100 + r).wrapping_mul(0x9e37_79b9_7f4a_7c15)))
                .collect();
            usage.extend(ids.iter().map(|id| ReplicaUsage {
                alloc_id: id.clone(),
                service: service.clone(),
                cpu_percent: 12.5,
                cpu_seconds: 1234.5,
                memory_bytes: 123_456_789,
            }));
            pools.push((service, ids));
        }
        m.set_replica_usage(usage);
        let mut registry = Registry::default();
        m.register(&mut registry, "node-1", false);
        let mut detailed = Registry::default();
        m.register(&mut detailed, "node-1", true);
        let (local_time, local_size) = time_exposition(&registry);
        println!(
            "exposition of 10000 local replicas (20000 series): {:.1} ms (best of 5), {:.2} MB",
            local_time.as_secs_f64() * 1e3,
            local_size as f64 / 1e6
        );

        for (service, ids) in &pools {
            let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
            let counters = m.service(service);
            for (r, c) in counters.update_replicas(&refs, now).iter().enumerate() {
                c.connections.fetch_add(r as u64 * 1000, Ordering::Relaxed);
                c.responses.fetch_add(r as u64 * 999, Ordering::Relaxed);
            }
            counters.observe_request(2, Duration::from_millis(5));
        }
        let (pooled_time, pooled_size) = time_exposition(&registry);
        println!(
            "the same replicas also in this agent's proxy pools, defaults: {:.1} ms (best of 5), {:.2} MB",
            pooled_time.as_secs_f64() * 1e3,
            pooled_size as f64 / 1e6
        );
        let (detailed_time, detailed_size) = time_exposition(&detailed);
        println!(
            "with --proxy-replica-metrics ({} series): {:.1} ms (best of 5), {:.2} MB",
            10_000 * (REPLICA_FAMILIES.len() + 2),
            detailed_time.as_secs_f64() * 1e3,
            detailed_size as f64 / 1e6
        );
        assert!(local_size < 5_000_000, "{local_size} bytes");
        assert!(pooled_size < 5_000_000, "{pooled_size} bytes");
        assert!(detailed_size < 8_000_000, "{detailed_size} bytes");
        if !cfg!(debug_assertions) {
            assert!(local_time < Duration::from_millis(50), "{local_time:?}");
            assert!(pooled_time < Duration::from_millis(50), "{pooled_time:?}");
        }
    }
}
