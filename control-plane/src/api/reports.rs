//! What this server keeps in memory of its agents' reports: the traffic
//! each node's routing proxy measured and each replica's resource use,
//! read by the controllers and `service inspect`, and forwarded with the
//! heartbeats to the leader by a follower.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use skiff_proto::v1 as pb;
use skiff_proto::v1::control_client::ControlClient;
use tokio::sync::watch;
use tonic::transport::Channel;

use super::{Api, HEARTBEAT_INTERVAL};
use crate::consensus::transport::endpoint;

pub(super) type Traffic = BTreeMap<(String, String), (pb::ServiceTraffic, Instant)>;

/// The latest resource use report per node (each replica's CPU and
/// memory), kept beside the traffic and forwarded to the leader with it.
pub(super) type Usage = BTreeMap<String, (Vec<pb::ReplicaUsage>, Instant)>;

/// Traffic reports older than this are dropped from reads: the agent or
/// its stream went away.
const TRAFFIC_TTL: Duration = Duration::from_secs(30);

impl Api {
    /// The latest traffic reports of `service`'s proxies, one per node, as
    /// this server received them (for `service inspect` and the autoscaler).
    pub fn service_traffic(&self, service: &str) -> Vec<pb::ServiceTraffic> {
        let traffic = self.traffic.lock().unwrap_or_else(|p| p.into_inner());
        traffic
            .range((service.to_string(), String::new())..)
            .take_while(|((s, _), _)| s == service)
            .filter(|(_, (_, at))| at.elapsed() < TRAFFIC_TTL)
            .map(|(_, (report, at))| pb::ServiceTraffic {
                age_ms: at.elapsed().as_millis() as u64,
                ..report.clone()
            })
            .collect()
    }

    /// What every node's proxy measured of each replica of every service
    /// (errors: HTTP 5xx answers plus failed dials), for the leader's
    /// deployment controller. Followers forward their agents' reports.
    pub fn replica_traffic(&self) -> crate::controllers::Traffic {
        let traffic = self.traffic.lock().unwrap_or_else(|p| p.into_inner());
        let mut sums = crate::controllers::Traffic::new();
        for (report, at) in traffic.values() {
            if at.elapsed() >= TRAFFIC_TTL {
                continue;
            }
            for endpoint in &report.endpoints {
                let sum = sums.entry(endpoint.alloc_id.clone()).or_default();
                sum.responses += endpoint.responses + endpoint.connect_failures;
                sum.errors += endpoint.errors + endpoint.connect_failures;
            }
        }
        sums
    }

    /// The latest report of each node's proxy for `service`, for the
    /// autoscaler: its counter is requests for an `http` service, else
    /// connections, and `at_ms` is when this server received the report
    /// (on this server's clock, as `controllers::now_ms`).
    pub fn node_traffic(
        &self,
        service: &str,
        http: bool,
    ) -> Vec<crate::controllers::autoscale::NodeTraffic> {
        let now = crate::controllers::now_ms();
        self.service_traffic(service)
            .into_iter()
            .map(|r| crate::controllers::autoscale::NodeTraffic {
                at_ms: now.saturating_sub(r.age_ms),
                requests: if http { r.requests } else { r.connections },
                active: r.active,
                turned_away: r.no_endpoint,
                request_rate: r.request_rate,
                waiting: r.waiting,
                node: r.node,
            })
            .collect()
    }

    /// The latest use of `service`'s replicas, from every node's newest
    /// report, with `node` and `age_ms` filled in.
    pub fn service_usage(&self, service: &str) -> Vec<pb::ReplicaUsage> {
        let usage = self.usage.lock().unwrap_or_else(|p| p.into_inner());
        usage
            .iter()
            .filter(|(_, (_, at))| at.elapsed() < TRAFFIC_TTL)
            .flat_map(|(node, (replicas, at))| {
                replicas
                    .iter()
                    .filter(|r| r.service == service)
                    .map(move |r| pb::ReplicaUsage {
                        node: node.clone(),
                        age_ms: at.elapsed().as_millis() as u64,
                        ..r.clone()
                    })
            })
            .collect()
    }

    /// The CPU use of `service`'s replicas for the autoscaler, `at_ms` on
    /// this server's clock (as `node_traffic`).
    pub fn replica_cpu(&self, service: &str) -> Vec<crate::controllers::autoscale::ReplicaCpu> {
        let now = crate::controllers::now_ms();
        self.service_usage(service)
            .into_iter()
            .map(|u| crate::controllers::autoscale::ReplicaCpu {
                at_ms: now.saturating_sub(u.age_ms),
                percent: u.cpu_percent,
                alloc_id: u.alloc_id,
            })
            .collect()
    }

    /// Keeps `replicas` as `node`'s latest use unless a newer report is
    /// known (one forwarded by another server may be older).
    pub(super) fn record_usage(&self, node: String, replicas: Vec<pb::ReplicaUsage>, at: Instant) {
        let mut usage = self.usage.lock().unwrap_or_else(|p| p.into_inner());
        keep_newest_usage(&mut usage, node, replicas, at);
    }

    pub(super) fn record_traffic(&self, node: &str, report: pb::TrafficReport) {
        let now = Instant::now();
        self.record_usage(node.to_string(), report.usage, now);
        let mut traffic = self.traffic.lock().unwrap_or_else(|p| p.into_inner());
        traffic.retain(|_, (_, at)| now.duration_since(*at) < TRAFFIC_TTL);
        let mut urgent = false;
        for mut service in report.services {
            service.node = node.to_string();
            urgent |= service.waiting > 0;
            traffic.insert((service.service.clone(), node.to_string()), (service, now));
        }
        if urgent {
            self.urgent_traffic.notify_one();
        }
    }

    /// On a follower, tells the leader every [`HEARTBEAT_INTERVAL`] which
    /// nodes stream to this server and how long ago each last spoke, so the
    /// leader's liveness controller sees every agent wherever it connects.
    pub(super) async fn forward_heartbeats(self, mut shutdown: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(HEARTBEAT_INTERVAL);
        let mut client: Option<(String, ControlClient<Channel>)> = None;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = self.urgent_traffic.notified() => {}
                _ = shutdown.changed() => return,
            }
            let status = self.consensus.status();
            if status.leader_id == 0 || status.leader_id == status.id {
                continue;
            }
            let Some(address) = self
                .consensus
                .state()
                .members
                .get(&status.leader_id)
                .map(|m| m.address.clone())
            else {
                continue;
            };
            let now = Instant::now();
            let beats: Vec<pb::NodeHeartbeat> = match self.heartbeats.lock() {
                Ok(beats) => beats
                    .iter()
                    .filter(|(_, t)| now.duration_since(**t) < HEARTBEAT_FORWARD_WINDOW)
                    .map(|(node, t)| pb::NodeHeartbeat {
                        node: node.clone(),
                        age_ms: now.duration_since(*t).as_millis() as u64,
                    })
                    .collect(),
                Err(_) => continue,
            };
            if beats.is_empty() {
                continue;
            }
            if client.as_ref().is_none_or(|(a, _)| *a != address) {
                let dial = self.trust.as_ref().map(|t| t.dial_servers());
                client = endpoint(&address)
                    .ok()
                    .zip(dial)
                    .map(|(e, dial)| (address.clone(), ControlClient::new(dial.lazy(e))));
            }
            let Some((_, leader)) = client.as_mut() else {
                continue;
            };
            let traffic: Vec<pb::ServiceTraffic> = {
                let traffic = self.traffic.lock().unwrap_or_else(|p| p.into_inner());
                traffic
                    .values()
                    .filter(|(_, at)| at.elapsed() < TRAFFIC_TTL)
                    .map(|(report, at)| pb::ServiceTraffic {
                        age_ms: at.elapsed().as_millis() as u64,
                        ..report.clone()
                    })
                    .collect()
            };
            let usage: Vec<pb::NodeUsage> = {
                let usage = self.usage.lock().unwrap_or_else(|p| p.into_inner());
                usage
                    .iter()
                    .filter(|(_, (_, at))| at.elapsed() < TRAFFIC_TTL)
                    .map(|(node, (replicas, at))| pb::NodeUsage {
                        node: node.clone(),
                        age_ms: at.elapsed().as_millis() as u64,
                        replicas: replicas.clone(),
                    })
                    .collect()
            };
            let request = pb::ReportHeartbeatsRequest {
                server: self.server_name.clone(),
                beats,
                traffic,
                usage,
            };
            if let Err(err) = leader.report_heartbeats(request).await {
                tracing::debug!(error = %err, "heartbeats not forwarded to the leader");
                client = None;
            }
        }
    }
}

/// Heartbeats older than this are not forwarded: the agent has moved on.
const HEARTBEAT_FORWARD_WINDOW: Duration = Duration::from_secs(60);

/// Keeps `replicas`, received `at`, as `node`'s use unless a newer report
/// of it is kept, and forgets reports older than the TTL.
fn keep_newest_usage(
    usage: &mut Usage,
    node: String,
    replicas: Vec<pb::ReplicaUsage>,
    at: Instant,
) {
    usage.retain(|_, (_, seen)| seen.elapsed() < TRAFFIC_TTL);
    if usage.get(&node).is_none_or(|(_, seen)| *seen < at) {
        usage.insert(node, (replicas, at));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica(alloc_id: &str, cpu_percent: f64) -> pb::ReplicaUsage {
        pb::ReplicaUsage {
            alloc_id: alloc_id.into(),
            service: "web".into(),
            cpu_percent,
            ..Default::default()
        }
    }

    #[test]
    fn a_nodes_newest_usage_report_wins_wherever_it_came_from() {
        let mut usage = Usage::new();
        let now = Instant::now();
        let earlier = now - Duration::from_secs(2);
        keep_newest_usage(&mut usage, "a".into(), vec![replica("r1", 80.0)], now);
        // Forwarded by another server, but older: ignored.
        keep_newest_usage(&mut usage, "a".into(), vec![replica("r1", 10.0)], earlier);
        assert_eq!(usage["a"].0[0].cpu_percent, 80.0);
        // Newer and empty: the node's replicas are gone.
        keep_newest_usage(
            &mut usage,
            "a".into(),
            Vec::new(),
            now + Duration::from_millis(5),
        );
        assert!(usage["a"].0.is_empty());
        // Past the TTL: forgotten.
        if let Some(stale) = now.checked_sub(TRAFFIC_TTL + Duration::from_secs(1)) {
            keep_newest_usage(&mut usage, "b".into(), vec![replica("r2", 5.0)], stale);
            keep_newest_usage(
                &mut usage,
                "a".into(),
                Vec::new(),
                now + Duration::from_secs(1),
            );
            assert!(!usage.contains_key("b"));
        }
    }
}
