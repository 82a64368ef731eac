//! The dashboard's calls to the server's gRPC `Control` API, each with the
//! user's token, and the JSON the browser gets from their answers (only
//! the fields the pages show; protobuf stays here).

use std::time::Duration;

use serde_json::{json, Value};
use skiff_proto::v1 as pb;
use skiff_proto::v1::control_client::ControlClient;
use tonic::transport::{Channel, Endpoint};

use crate::UiError;

/// How long one call may take (event streams take none).
const CALL_TIMEOUT: Duration = Duration::from_secs(15);
/// How far back a service page looks for scale decisions, and how many it
/// lists.
const RECENT_EVENTS: u32 = 500;
const MAX_SCALE_DECISIONS: usize = 20;

/// A lazily connected channel to the API; calls share it.
#[derive(Clone)]
pub struct Cluster {
    channel: Channel,
}

/// Why a call failed, as the browser is told.
#[derive(Debug)]
pub struct Failure {
    pub code: tonic::Code,
    pub message: String,
}

impl From<tonic::Status> for Failure {
    fn from(status: tonic::Status) -> Self {
        Failure {
            code: status.code(),
            message: status.message().to_string(),
        }
    }
}

impl Failure {
    pub fn invalid(message: impl Into<String>) -> Self {
        Failure {
            code: tonic::Code::InvalidArgument,
            message: message.into(),
        }
    }

    pub fn no_token() -> Self {
        Failure {
            code: tonic::Code::Unauthenticated,
            message: "no API token: log in with a token (`skiff token create`, or the one in the client.toml that `skiff dev` wrote)".into(),
        }
    }
}

/// A request presenting `token`, as the CLI sends it.
fn authorized<T>(message: T, token: &str, timeout: bool) -> Result<tonic::Request<T>, Failure> {
    if token.trim().is_empty() {
        return Err(Failure::no_token());
    }
    let mut request = tonic::Request::new(message);
    let value = format!("Bearer {}", token.trim())
        .parse()
        .map_err(|_| Failure {
            code: tonic::Code::Unauthenticated,
            message: "malformed API token".into(),
        })?;
    request.metadata_mut().insert("authorization", value);
    if timeout {
        request.set_timeout(CALL_TIMEOUT);
    }
    Ok(request)
}

impl Cluster {
    /// Dials `api` (`HOST:PORT`) over TLS, verifying a server certificate
    /// of the CA `ca_pem` and presenting none of its own: the API then
    /// treats the dashboard as any client, by its token.
    pub fn connect(api: &str, ca_pem: &str) -> Result<Cluster, UiError> {
        let config = skiff_pki::tls::anonymous_client_config(ca_pem)?;
        let connector = skiff_pki::tls::connector(config, skiff_pki::identity::SERVER_NAME)?;
        let endpoint = Endpoint::from_shared(format!("http://{api}"))
            .map_err(|e| UiError::Address {
                address: api.to_string(),
                reason: e.to_string(),
            })?
            .connect_timeout(Duration::from_secs(5));
        Ok(Cluster {
            channel: endpoint.connect_with_connector_lazy(connector),
        })
    }

    fn client(&self) -> ControlClient<Channel> {
        ControlClient::new(self.channel.clone())
    }

    /// Checks that `token` may read (what logging in means).
    pub async fn check(&self, token: &str) -> Result<(), Failure> {
        let request = authorized(pb::ClusterStatusRequest {}, token, true)?;
        self.client().cluster_status(request).await?;
        Ok(())
    }

    /// The cluster in one answer: servers, nodes, services and their
    /// replicas (what the map, the services and the nodes pages show).
    pub async fn overview(&self, token: &str) -> Result<Value, Failure> {
        let (mut a, mut b, mut c) = (self.client(), self.client(), self.client());
        let (status, nodes, services) = tokio::join!(
            a.cluster_status(authorized(pb::ClusterStatusRequest {}, token, true)?),
            b.list_nodes(authorized(pb::ListNodesRequest {}, token, true)?),
            c.list_services(authorized(
                pb::ListServicesRequest { show_values: false },
                token,
                true
            )?),
        );
        let status = status?.into_inner();
        let nodes = nodes?.into_inner().nodes;
        let services = services?.into_inner().services;
        Ok(overview_json(&status, &nodes, &services))
    }

    /// One service with its replicas, versions, deployment and events.
    pub async fn service(&self, token: &str, name: &str) -> Result<Value, Failure> {
        let (status, recent) = tokio::join!(
            self.service_status(token, name),
            self.recent_events(token, name)
        );
        let mut value = service_detail_json(&status?);
        // `GetService` carries only the latest few events: the scale
        // decisions come from a longer look back, when it answers.
        if let (Ok(events), Value::Object(map)) = (recent, &mut value) {
            let scaling: Vec<Value> = events.iter().filter_map(scale_json).collect();
            let skip = scaling.len().saturating_sub(MAX_SCALE_DECISIONS);
            map.insert("scaling".into(), Value::Array(scaling[skip..].to_vec()));
        }
        Ok(value)
    }

    /// The service's last [`RECENT_EVENTS`] events, oldest first.
    async fn recent_events(&self, token: &str, name: &str) -> Result<Vec<pb::Event>, Failure> {
        let request = pb::EventsRequest {
            service: name.to_string(),
            follow: false,
            tail: Some(RECENT_EVENTS),
            ..Default::default()
        };
        let mut stream = self
            .client()
            .events(authorized(request, token, true)?)
            .await?
            .into_inner();
        let mut events = Vec::new();
        while let Some(event) = stream.message().await? {
            events.push(event);
        }
        Ok(events)
    }

    /// `GetService` as the API answers it (traffic reports included).
    pub async fn service_status(
        &self,
        token: &str,
        name: &str,
    ) -> Result<pb::ServiceStatus, Failure> {
        let request = pb::GetServiceRequest {
            name: name.to_string(),
            show_values: false,
        };
        Ok(self
            .client()
            .get_service(authorized(request, token, true)?)
            .await?
            .into_inner())
    }

    /// An action of the service page; `body` holds its arguments.
    pub async fn service_action(
        &self,
        token: &str,
        name: &str,
        action: &str,
        body: &Value,
    ) -> Result<Value, Failure> {
        let mut client = self.client();
        let name = name.to_string();
        let status = match action {
            "scale" => {
                let replicas = body
                    .get("replicas")
                    .and_then(Value::as_u64)
                    .and_then(|r| u32::try_from(r).ok())
                    .ok_or_else(|| Failure::invalid("scale needs replicas, a whole number"))?;
                let request = pb::ScaleServiceRequest { name, replicas };
                client
                    .scale_service(authorized(request, token, true)?)
                    .await?
            }
            "image" => {
                let image = body
                    .get("image")
                    .and_then(Value::as_str)
                    .map(str::trim)
                    .filter(|i| !i.is_empty())
                    .ok_or_else(|| Failure::invalid("update needs an image reference"))?;
                // As `skiff service update --image`: the current spec (its
                // environment values as hashes, which the server keeps)
                // with the new image.
                let get = pb::GetServiceRequest {
                    name,
                    show_values: false,
                };
                let current = client
                    .get_service(authorized(get, token, true)?)
                    .await?
                    .into_inner();
                let mut spec = current.spec.unwrap_or_default();
                if spec.image.is_empty() {
                    return Err(Failure::invalid(
                        "this service runs a host process, not an image",
                    ));
                }
                spec.image = image.to_string();
                let request = pb::UpdateServiceRequest { spec: Some(spec) };
                client
                    .update_service(authorized(request, token, true)?)
                    .await?
            }
            "promote" => {
                let request = pb::PromoteDeploymentRequest { name };
                client
                    .promote_deployment(authorized(request, token, true)?)
                    .await?
            }
            "pause" | "resume" => {
                let request = pb::PauseDeploymentRequest {
                    name,
                    paused: action == "pause",
                };
                client
                    .pause_deployment(authorized(request, token, true)?)
                    .await?
            }
            "rollback" => {
                let to_version = body.get("to_version").and_then(Value::as_u64).unwrap_or(0);
                let request = pb::RollbackServiceRequest { name, to_version };
                client
                    .rollback_service(authorized(request, token, true)?)
                    .await?
            }
            other => {
                return Err(Failure {
                    code: tonic::Code::NotFound,
                    message: format!(
                        "no action {other}: try scale, image, promote, pause, resume or rollback"
                    ),
                })
            }
        };
        Ok(service_detail_json(&status.into_inner()))
    }

    /// Drains, pauses or activates a node.
    pub async fn set_availability(
        &self,
        token: &str,
        node: &str,
        availability: &str,
    ) -> Result<Value, Failure> {
        if !matches!(availability, "active" | "pause" | "drain") {
            return Err(Failure::invalid(
                "availability is one of active, pause or drain",
            ));
        }
        let request = pb::SetNodeAvailabilityRequest {
            name: node.to_string(),
            availability: availability.to_string(),
            deadline_ms: 0,
        };
        let node = self
            .client()
            .set_node_availability(authorized(request, token, true)?)
            .await?
            .into_inner();
        Ok(node_json(&node, 0))
    }

    /// The last `tail` lines of a replica's output (stdout and stderr, as
    /// `skiff service logs NAME --replica ID --tail N` prints them).
    pub async fn logs(
        &self,
        token: &str,
        service: &str,
        replica: &str,
        tail: u32,
    ) -> Result<Value, Failure> {
        /// The most of a replica's output one answer carries.
        const MAX_BYTES: usize = 256 * 1024;
        let request = pb::ServiceLogsRequest {
            service: service.to_string(),
            replica: replica.to_string(),
            follow: false,
            tail,
            ..Default::default()
        };
        let mut stream = self
            .client()
            .service_logs(authorized(request, token, true)?)
            .await?
            .into_inner();
        let mut text = Vec::new();
        while let Some(chunk) = stream.message().await? {
            text.extend_from_slice(&chunk.data);
            if text.len() > MAX_BYTES {
                text.drain(..text.len() - MAX_BYTES);
            }
        }
        Ok(json!({ "replica": replica, "text": String::from_utf8_lossy(&text) }))
    }

    /// The cluster's events from `after_seq` on (or the last `tail`), then
    /// every new one, filtered by service and node.
    pub async fn events(
        &self,
        token: &str,
        service: &str,
        node: &str,
        after_seq: Option<u64>,
    ) -> Result<tonic::Streaming<pb::Event>, Failure> {
        let request = pb::EventsRequest {
            service: service.to_string(),
            node: node.to_string(),
            follow: true,
            after_seq: after_seq.unwrap_or(0),
            tail: if after_seq.is_some() { None } else { Some(200) },
            ..Default::default()
        };
        let stream = self
            .client()
            .events(authorized(request, token, false)?)
            .await?
            .into_inner();
        Ok(stream)
    }
}

/// Replicas the pages show: those wanted, and those still on their way out.
fn shown(alloc: &pb::Allocation) -> bool {
    alloc.desired == "run" || !matches!(alloc.state.as_str(), "stopped" | "lost" | "completed")
}

pub fn event_json(event: &pb::Event) -> Value {
    json!({
        "seq": event.seq,
        "index": event.index,
        "time_ms": event.time_ms,
        "kind": event.kind,
        "service": event.service,
        "node": event.node,
        "alloc": event.alloc,
        "message": event.message,
        "by": event.by,
    })
}

fn alloc_json(alloc: &pb::Allocation) -> Value {
    let image = alloc.spec.as_ref().map_or("", |s| s.image.as_str());
    json!({
        "id": alloc.id,
        "service": alloc.service,
        "node": alloc.node,
        "desired": alloc.desired,
        "state": alloc.state,
        "version": alloc.version,
        "slot": alloc.slot,
        "host_port": alloc.host_port,
        "restarts": alloc.restarts,
        "message": alloc.message,
        "image": image,
    })
}

fn deployment_json(spec: &pb::ServiceSpec, deployment: Option<&pb::Deployment>) -> Value {
    let Some(d) = deployment else {
        return Value::Null;
    };
    let policy = spec.update.clone().unwrap_or_default();
    json!({
        "version": d.version,
        "from_version": d.from_version,
        "strategy": d.strategy,
        "status": d.status,
        "message": d.message,
        "promoted": d.promoted,
        "started_ms": d.started_ms,
        "ended_ms": d.ended_ms,
        "new_placed": d.new_placed,
        "new_healthy": d.new_healthy,
        "desired": d.desired,
        "old_running": d.old_running,
        "rollback_of": d.rollback_of,
        "canary": policy.canary,
        "canary_weight": policy.canary_weight,
        "max_error_rate": policy.max_error_rate,
    })
}

/// The image of a container, the command of a process.
fn what_runs(spec: &pb::ServiceSpec) -> String {
    if spec.image.is_empty() {
        spec.command.join(" ")
    } else {
        spec.image.clone()
    }
}

fn service_json(status: &pb::ServiceStatus) -> Value {
    let spec = status.spec.clone().unwrap_or_default();
    let replicas: Vec<Value> = status
        .allocations
        .iter()
        .filter(|a| shown(a))
        .map(alloc_json)
        .collect();
    let healthy = status
        .allocations
        .iter()
        .filter(|a| a.desired == "run" && a.state == "healthy")
        .count();
    let strategy = spec
        .update
        .as_ref()
        .map(|u| u.strategy.clone())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "rolling".into());
    json!({
        "name": spec.name,
        "image": what_runs(&spec),
        "mode": if spec.mode.is_empty() { "replicated" } else { spec.mode.as_str() },
        "desired": status.desired,
        "running": status.running,
        "healthy": healthy,
        "port": spec.port,
        "publish": spec.publish,
        "protocol": if spec.protocol.is_empty() { "tcp" } else { spec.protocol.as_str() },
        "strategy": strategy,
        "version": status.version,
        "deployment": deployment_json(&spec, status.deployment.as_ref()),
        "unplaced_reason": status.unplaced_reason,
        "replicas": replicas,
    })
}

fn service_detail_json(status: &pb::ServiceStatus) -> Value {
    let mut value = service_json(status);
    let history: Vec<Value> = status
        .history
        .iter()
        .map(|v| {
            json!({
                "version": v.version,
                "image": v.spec.as_ref().map(what_runs).unwrap_or_default(),
                "created_ms": v.created_ms,
                "outcome": v.outcome,
                "message": v.message,
                "diff": v.diff,
            })
        })
        .collect();
    let events: Vec<Value> = status.events.iter().map(event_json).collect();
    let scaling: Vec<Value> = status.events.iter().filter_map(scale_json).collect();
    let autoscale = status
        .spec
        .as_ref()
        .and_then(|s| s.autoscale.as_ref())
        .map_or(Value::Null, |a| {
            json!({
                "min": a.min,
                "max": a.max,
                "target_rps": a.target_rps,
                "target_concurrency": a.target_concurrency,
                "target_cpu": a.target_cpu,
            })
        });
    if let Value::Object(map) = &mut value {
        map.insert("history".into(), Value::Array(history));
        map.insert("events".into(), Value::Array(events));
        map.insert("scaling".into(), Value::Array(scaling));
        map.insert("autoscale".into(), autoscale);
    }
    value
}

/// A scale decision of the service's events, as the autoscaler's
/// `service-scaled` ("2 -> 4 replicas: REASON") or an operator's scale
/// (`service-updated`, "scaled from 2 to 4 replicas"): its time, counts
/// and reason.
fn scale_json(event: &pb::Event) -> Option<Value> {
    let (from, to, reason, automatic) = match event.kind.as_str() {
        "service-scaled" => {
            let (counts, reason) = event
                .message
                .split_once(" replicas: ")
                .or_else(|| event.message.split_once(" replicas"))?;
            let (from, to) = counts.split_once(" -> ")?;
            (from.trim(), to.trim(), reason.trim().to_string(), true)
        }
        "service-updated" => {
            let rest = event.message.strip_prefix("scaled from ")?;
            let (counts, _) = rest.split_once(" replicas")?;
            let (from, to) = counts.split_once(" to ")?;
            let by = if event.by.is_empty() {
                "by an operator".to_string()
            } else {
                format!("by {}", event.by)
            };
            (from.trim(), to.trim(), by, false)
        }
        _ => return None,
    };
    let from: u64 = from.parse().ok()?;
    let to: u64 = to.parse().ok()?;
    Some(json!({
        "seq": event.seq,
        "time_ms": event.time_ms,
        "from": from,
        "to": to,
        "reason": reason,
        "automatic": automatic,
    }))
}

fn node_json(node: &pb::Node, ports_used: usize) -> Value {
    json!({
        "name": node.name,
        "address": node.address,
        "status": node.status,
        "availability": node.availability,
        "drained": node.drained,
        "cpu_millis": node.cpu_millis,
        "cpu_used": node.cpu_used,
        "memory_mb": node.memory_mb,
        "memory_used": node.memory_used,
        "ports": node.port_range_end.saturating_sub(node.port_range_start) + 1,
        "ports_used": ports_used,
        "allocations": node.allocations,
        "last_heartbeat_secs": node.last_heartbeat_secs,
    })
}

fn overview_json(
    status: &pb::ClusterStatusResponse,
    nodes: &[pb::Node],
    services: &[pb::ServiceStatus],
) -> Value {
    let members: Vec<Value> = status
        .members
        .iter()
        .map(|m| {
            json!({
                "id": m.id,
                "name": m.name,
                "address": m.address,
                "role": m.role,
                "reachable": m.reachable,
            })
        })
        .collect();
    let nodes: Vec<Value> = nodes
        .iter()
        .map(|node| {
            let ports_used = services
                .iter()
                .flat_map(|s| &s.allocations)
                .filter(|a| a.node == node.name && a.desired == "run" && a.host_port != 0)
                .count();
            node_json(node, ports_used)
        })
        .collect();
    let services: Vec<Value> = services.iter().map(service_json).collect();
    json!({
        "cluster": {
            "leader": status.leader,
            "term": status.term,
            "commit_index": status.commit_index,
            "applied_index": status.applied_index,
            "members": members,
        },
        "nodes": nodes,
        "services": services,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alloc(id: &str, node: &str, desired: &str, state: &str, version: u64) -> pb::Allocation {
        pb::Allocation {
            id: id.into(),
            service: "web".into(),
            node: node.into(),
            desired: desired.into(),
            state: state.into(),
            version,
            host_port: 20000,
            ..Default::default()
        }
    }

    #[test]
    fn overview_places_each_shown_replica_and_counts_healthy_and_ports() {
        let service = pb::ServiceStatus {
            spec: Some(pb::ServiceSpec {
                name: "web".into(),
                image: "reg/web:v2".into(),
                ..Default::default()
            }),
            desired: 2,
            running: 2,
            version: 2,
            allocations: vec![
                alloc("a", "n1", "run", "healthy", 2),
                alloc("b", "n2", "run", "running", 2),
                alloc("c", "n1", "stop", "stopping", 1),
                alloc("d", "n1", "stop", "stopped", 1),
            ],
            ..Default::default()
        };
        let node = pb::Node {
            name: "n1".into(),
            port_range_start: 20000,
            port_range_end: 20099,
            ..Default::default()
        };
        let status = pb::ClusterStatusResponse {
            leader: "s1".into(),
            term: 3,
            commit_index: 42,
            ..Default::default()
        };
        let v = overview_json(&status, &[node], &[service]);
        assert_eq!(v["cluster"]["commit_index"], 42);
        let web = &v["services"][0];
        assert_eq!(web["healthy"], 1);
        assert_eq!(web["strategy"], "rolling");
        let ids: Vec<&str> = web["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, ["a", "b", "c"], "the stopped replica is not drawn");
        assert_eq!(v["nodes"][0]["ports"], 100);
        assert_eq!(v["nodes"][0]["ports_used"], 1);
    }

    #[test]
    fn scale_decisions_are_read_from_the_events_with_their_reasons() {
        let event = |kind: &str, message: &str| pb::Event {
            seq: 9,
            time_ms: 1000,
            kind: kind.into(),
            service: "web".into(),
            message: message.into(),
            by: "alice".into(),
            ..Default::default()
        };
        let auto = scale_json(&event(
            "service-scaled",
            "2 -> 4 replicas: 31.0 req/s per replica above the target 10",
        ))
        .unwrap();
        assert_eq!(auto["from"], 2);
        assert_eq!(auto["to"], 4);
        assert_eq!(auto["reason"], "31.0 req/s per replica above the target 10");
        assert_eq!(auto["automatic"], true);
        let manual = scale_json(&event("service-updated", "scaled from 3 to 5 replicas")).unwrap();
        assert_eq!(
            (manual["from"].as_u64(), manual["to"].as_u64()),
            (Some(3), Some(5))
        );
        assert_eq!(manual["reason"], "by alice");
        assert_eq!(manual["automatic"], false);
        assert!(scale_json(&event("service-updated", "image changed")).is_none());
        assert!(scale_json(&event("replica-healthy", "2 -> 4 replicas: x")).is_none());
    }

    #[test]
    fn a_call_without_a_token_is_refused_before_it_is_sent() {
        let refused = authorized(pb::ClusterStatusRequest {}, " ", true).unwrap_err();
        assert_eq!(refused.code, tonic::Code::Unauthenticated);
    }
}
