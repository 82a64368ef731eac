//! The gRPC API: `Control` for the CLI and `AgentSync` for agents. This is
//! the only layer that builds `tonic::Status`.

// `tonic::Status` is large, but it is what every handler returns; boxing it
// in the helpers would only move the conversion.
#![allow(clippy::result_large_err)]

pub mod convert;
mod raft_service;
mod stacks;

pub use raft_service::RaftService;

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::Stream;
use skiff_proto::v1 as pb;
use skiff_proto::v1::agent_message::Msg as AgentMsg;
use skiff_proto::v1::control_client::ControlClient;
use skiff_proto::v1::server_message::Msg as ServerMsg;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

use crate::consensus::transport::endpoint;
use crate::consensus::{Consensus, ProposeError};
use crate::controllers::{now_ms, Heartbeats};
use crate::state::{AllocReport, AllocState, Availability, Command, CommandError, Event};
use skiff_spec as spec;

/// How often agents are asked to send a heartbeat.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);

/// Shared by both services: the consensus handle and what only this server
/// sees (the last heartbeat of each node connected to it).
#[derive(Clone)]
pub struct Api {
    consensus: Consensus,
    heartbeats: Heartbeats,
    server_name: String,
    node_watch: Arc<NodeWatch>,
    /// When the last completed shared read barrier started.
    shared_barrier: Arc<tokio::sync::Mutex<Option<Instant>>>,
    /// The published services' endpoints as last computed from the applied
    /// state; every agent stream forwards each new value.
    endpoints: Arc<watch::Sender<Arc<pb::Endpoints>>>,
    /// The latest traffic report per (service, node) received by this
    /// server, kept in memory only (it is refreshed every few seconds).
    traffic: Arc<Mutex<Traffic>>,
    /// Woken when a report shows connections waiting for a replica, so a
    /// follower forwards it to the leader at once (a scale from zero).
    urgent_traffic: Arc<tokio::sync::Notify>,
    /// The latest resource use report of each node (see [`Usage`]).
    usage: Arc<Mutex<Usage>>,
}

type Traffic = BTreeMap<(String, String), (pb::ServiceTraffic, Instant)>;

/// The latest resource use report per node (each replica's CPU and
/// memory), kept beside the traffic and forwarded to the leader with it.
type Usage = BTreeMap<String, (Vec<pb::ReplicaUsage>, Instant)>;

/// Traffic reports older than this are dropped from reads: the agent or
/// its stream went away.
const TRAFFIC_TTL: Duration = Duration::from_secs(30);

/// Per node, the Raft index of the last change to its allocations, so each
/// agent stream wakes only when something of its own changed (thousands of
/// streams waking on every applied entry would swamp a server).
#[derive(Default)]
struct NodeWatch {
    senders: Mutex<HashMap<String, watch::Sender<u64>>>,
}

impl NodeWatch {
    fn subscribe(&self, node: &str) -> watch::Receiver<u64> {
        let mut senders = self.senders.lock().unwrap_or_else(|p| p.into_inner());
        senders
            .entry(node.to_string())
            .or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }
}

impl Api {
    pub fn new(consensus: Consensus, server_name: String) -> Self {
        Api {
            consensus,
            heartbeats: Heartbeats::default(),
            node_watch: Arc::default(),
            shared_barrier: Arc::default(),
            endpoints: Arc::new(watch::channel(Arc::new(pb::Endpoints::default())).0),
            traffic: Arc::default(),
            urgent_traffic: Arc::default(),
            usage: Arc::default(),
            server_name,
        }
    }

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
    pub fn replica_cpu(&self, service: &str) -> Vec<crate::controllers::autoscaler::ReplicaCpu> {
        let now = crate::controllers::now_ms();
        self.service_usage(service)
            .into_iter()
            .map(|u| crate::controllers::autoscaler::ReplicaCpu {
                at_ms: now.saturating_sub(u.age_ms),
                percent: u.cpu_percent,
                alloc_id: u.alloc_id,
            })
            .collect()
    }

    /// Keeps `replicas` as `node`'s latest use unless a newer report is
    /// known (one forwarded by another server may be older).
    fn record_usage(&self, node: String, replicas: Vec<pb::ReplicaUsage>, at: Instant) {
        let mut usage = self.usage.lock().unwrap_or_else(|p| p.into_inner());
        keep_newest_usage(&mut usage, node, replicas, at);
    }

    fn record_traffic(&self, node: &str, report: pb::TrafficReport) {
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

    /// The heartbeats this server knows, for the liveness controller.
    pub fn heartbeats(&self) -> Heartbeats {
        self.heartbeats.clone()
    }

    /// Proposes `command` stamped with this server's clock.
    async fn propose(&self, command: Command) -> Result<(), Status> {
        self.consensus
            .propose(command.at(now_ms()))
            .await
            .map(|_| ())
            .map_err(status_from)
    }

    /// Waits until this server has applied everything committed so far,
    /// so what it reads next is linearizable (and includes its own writes,
    /// even when they were forwarded to the leader).
    async fn barrier(&self) -> Result<(), Status> {
        self.consensus.read_barrier().await.map_err(status_from)
    }

    async fn service_status(&self, name: &str) -> Result<pb::ServiceStatus, Status> {
        self.barrier().await?;
        let state = self.consensus.state();
        let service = state
            .services
            .get(name)
            .ok_or_else(|| status_from(CommandError::ServiceNotFound(name.to_string()).into()))?;
        Ok(convert::service_to_pb(&state, service))
    }

    /// A read barrier shared by everyone waiting: a barrier that started
    /// after the call began serves it too, so thousands of agent streams
    /// opening at once cost a handful of ReadIndex rounds, not thousands.
    async fn shared_barrier(&self) -> Result<(), ProposeError> {
        let asked = Instant::now();
        let mut last = self.shared_barrier.lock().await;
        if last.is_some_and(|started| started >= asked) {
            return Ok(());
        }
        let started = Instant::now();
        self.consensus.read_barrier().await?;
        *last = Some(started);
        Ok(())
    }

    fn touch(&self, node: &str) {
        if let Ok(mut beats) = self.heartbeats.lock() {
            match beats.get_mut(node) {
                Some(seen) => *seen = Instant::now(),
                None => {
                    beats.insert(node.to_string(), Instant::now());
                }
            }
        }
    }

    /// Seconds since this server saw a heartbeat of `node`; `u64::MAX`: never.
    fn heartbeat_age(&self, node: &str) -> u64 {
        self.heartbeats
            .lock()
            .ok()
            .and_then(|b| b.get(node).map(|t| t.elapsed().as_secs()))
            .unwrap_or(u64::MAX)
    }

    /// What the API runs beside its handlers until `shutdown`: forwarding
    /// heartbeats to the leader and waking the agent streams of changed
    /// nodes.
    pub async fn background(self, shutdown: watch::Receiver<bool>) {
        tokio::join!(
            self.clone().forward_heartbeats(shutdown.clone()),
            self.clone().dispatch_endpoints(shutdown.clone()),
            self.dispatch_node_changes(shutdown),
        );
    }

    /// After each applied batch (at most every 10 ms), recomputes the
    /// published services' endpoints and wakes every agent stream if they
    /// changed.
    async fn dispatch_endpoints(self, mut shutdown: watch::Receiver<bool>) {
        let mut status = self.consensus.watch_status();
        loop {
            let endpoints = convert::endpoints(&self.consensus.state());
            self.endpoints.send_if_modified(|current| {
                let changed = **current != endpoints;
                if changed {
                    *current = Arc::new(endpoints);
                }
                changed
            });
            tokio::select! {
                changed = status.changed() => if changed.is_err() { return },
                _ = shutdown.changed() => return,
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// After each applied batch (at most every 10 ms), wakes the streams of
    /// the nodes whose allocations changed.
    async fn dispatch_node_changes(self, mut shutdown: watch::Receiver<bool>) {
        let mut status = self.consensus.watch_status();
        loop {
            tokio::select! {
                changed = status.changed() => if changed.is_err() { return },
                _ = shutdown.changed() => return,
            }
            {
                let mut senders = self
                    .node_watch
                    .senders
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                let state = self.consensus.state();
                senders.retain(|node, sender| {
                    let index = state.node_changed_index(node);
                    sender.send_if_modified(|seen| {
                        let changed = *seen != index;
                        *seen = index;
                        changed
                    });
                    sender.receiver_count() > 0
                });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// On a follower, tells the leader every [`HEARTBEAT_INTERVAL`] which
    /// nodes stream to this server and how long ago each last spoke, so the
    /// leader's liveness controller sees every agent wherever it connects.
    async fn forward_heartbeats(self, mut shutdown: watch::Receiver<bool>) {
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
                client = endpoint(&address)
                    .ok()
                    .map(|e| (address.clone(), ControlClient::new(e.connect_lazy())));
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

pub(crate) fn status_from(err: ProposeError) -> Status {
    match err {
        ProposeError::Rejected(
            CommandError::ServiceNotFound(_) | CommandError::NodeNotFound(_),
        ) => Status::not_found(err.to_string()),
        ProposeError::Rejected(CommandError::ServiceExists(_)) => {
            Status::already_exists(err.to_string())
        }
        ProposeError::Rejected(CommandError::Deployment(_)) => {
            Status::failed_precondition(err.to_string())
        }
        ProposeError::Rejected(CommandError::Invalid(_)) => {
            Status::invalid_argument(err.to_string())
        }
        ProposeError::Membership(_) => Status::failed_precondition(err.to_string()),
        ProposeError::NoLeader | ProposeError::NotLeader(_) | ProposeError::Forward(_) => {
            Status::unavailable(err.to_string())
        }
        ProposeError::Unknown(_) => Status::aborted(err.to_string()),
        ProposeError::Busy(_) => Status::unavailable(err.to_string()),
        ProposeError::Stopped => Status::internal(err.to_string()),
    }
}

fn invalid(err: spec::SpecError) -> Status {
    Status::invalid_argument(err.to_string())
}

impl Api {
    /// A create or update request's spec, validated, with its published
    /// port checked against every other service's (read after a barrier,
    /// so a port published a moment ago elsewhere counts).
    async fn checked_spec(
        &self,
        spec: Option<pb::ServiceSpec>,
    ) -> Result<crate::state::ServiceSpec, Status> {
        let spec = spec.ok_or_else(|| Status::invalid_argument("invalid spec: missing"))?;
        let spec = skiff_spec::pb::spec_from_pb(spec).map_err(invalid)?;
        if let Some(publish) = spec.publish {
            self.barrier().await?;
            let state = self.consensus.state();
            let taken = state
                .services
                .values()
                .find(|s| s.spec.publish == Some(publish) && s.spec.name != spec.name);
            if let Some(other) = taken {
                return Err(Status::already_exists(format!(
                    "invalid publish: port {publish} is already published by service \"{}\"; choose another --publish port",
                    other.spec.name
                )));
            }
        }
        Ok(spec)
    }
}

#[tonic::async_trait]
impl pb::control_server::Control for Api {
    async fn create_service(
        &self,
        request: Request<pb::CreateServiceRequest>,
    ) -> Result<Response<pb::ServiceStatus>, Status> {
        let spec = request.into_inner().spec;
        let spec = self.checked_spec(spec).await?;
        let name = spec.name.clone();
        self.propose(Command::CreateService { spec }).await?;
        self.service_status(&name).await.map(Response::new)
    }

    async fn scale_service(
        &self,
        request: Request<pb::ScaleServiceRequest>,
    ) -> Result<Response<pb::ServiceStatus>, Status> {
        let request = request.into_inner();
        let replicas = spec::validate_replicas(i64::from(request.replicas)).map_err(invalid)?;
        self.propose(Command::ScaleService {
            name: request.name.clone(),
            replicas,
        })
        .await?;
        self.service_status(&request.name).await.map(Response::new)
    }

    async fn remove_service(
        &self,
        request: Request<pb::RemoveServiceRequest>,
    ) -> Result<Response<pb::RemoveServiceResponse>, Status> {
        self.propose(Command::RemoveService {
            name: request.into_inner().name,
        })
        .await?;
        Ok(Response::new(pb::RemoveServiceResponse {}))
    }

    async fn list_services(
        &self,
        _request: Request<pb::ListServicesRequest>,
    ) -> Result<Response<pb::ListServicesResponse>, Status> {
        self.barrier().await?;
        let state = self.consensus.state();
        let services = state
            .services
            .values()
            .map(|s| convert::service_to_pb(&state, s))
            .collect();
        Ok(Response::new(pb::ListServicesResponse { services }))
    }

    async fn get_service(
        &self,
        request: Request<pb::GetServiceRequest>,
    ) -> Result<Response<pb::ServiceStatus>, Status> {
        let name = request.into_inner().name;
        let mut status = self.service_status(&name).await?;
        status.traffic = self.service_traffic(&name);
        status.usage = self.service_usage(&name);
        Ok(Response::new(status))
    }

    async fn list_nodes(
        &self,
        _request: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        self.barrier().await?;
        let state = self.consensus.state();
        let nodes = state
            .nodes
            .values()
            .map(|node| convert::node_to_pb(&state, node, self.heartbeat_age(&node.name)))
            .collect();
        Ok(Response::new(pb::ListNodesResponse { nodes }))
    }

    async fn put_variable(
        &self,
        request: Request<pb::PutVariableRequest>,
    ) -> Result<Response<pb::PutVariableResponse>, Status> {
        let request = request.into_inner();
        spec::validate_variable(&request.key, &request.value).map_err(invalid)?;
        self.propose(Command::PutVariable {
            key: request.key,
            value: request.value,
        })
        .await?;
        Ok(Response::new(pb::PutVariableResponse {}))
    }

    async fn get_variable(
        &self,
        request: Request<pb::GetVariableRequest>,
    ) -> Result<Response<pb::GetVariableResponse>, Status> {
        self.barrier().await?;
        let value = self
            .consensus
            .state()
            .variables
            .get(&request.into_inner().key)
            .cloned();
        Ok(Response::new(pb::GetVariableResponse {
            found: value.is_some(),
            value: value.unwrap_or_default(),
        }))
    }

    async fn list_variables(
        &self,
        request: Request<pb::ListVariablesRequest>,
    ) -> Result<Response<pb::ListVariablesResponse>, Status> {
        self.barrier().await?;
        let prefix = request.into_inner().prefix;
        let variables = self
            .consensus
            .state()
            .variables
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        Ok(Response::new(pb::ListVariablesResponse { variables }))
    }

    async fn set_node_availability(
        &self,
        request: Request<pb::SetNodeAvailabilityRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        let request = request.into_inner();
        let availability = Availability::parse(&request.availability).ok_or_else(|| {
            Status::invalid_argument(format!(
                "invalid availability \"{}\": use active, pause or drain",
                request.availability
            ))
        })?;
        let deadline_ms = (availability == Availability::Drain && request.deadline_ms > 0)
            .then(|| now_ms().saturating_add(request.deadline_ms));
        self.propose(Command::SetNodeAvailability {
            name: request.name.clone(),
            availability,
            deadline_ms,
        })
        .await?;
        self.barrier().await?;
        let state = self.consensus.state();
        let node = state
            .nodes
            .get(&request.name)
            .ok_or_else(|| Status::not_found(format!("node \"{}\" not found", request.name)))?;
        Ok(Response::new(convert::node_to_pb(
            &state,
            node,
            self.heartbeat_age(&node.name),
        )))
    }

    type EventsStream = EventStream;

    async fn events(
        &self,
        request: Request<pb::EventsRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let request = request.into_inner();
        self.barrier().await?;
        let (sender, receiver) = mpsc::channel(256);
        let api = self.clone();
        tokio::spawn(async move {
            let mut status = api.consensus.watch_status();
            let mut after = request.after_seq;
            loop {
                let batch: Vec<pb::Event> = {
                    let state = api.consensus.state();
                    let events: Vec<&Event> = state.events_after(after).collect();
                    if let Some(last) = events.last() {
                        after = last.seq;
                    }
                    events
                        .into_iter()
                        .filter(|e| request.service.is_empty() || e.service == request.service)
                        .filter(|e| request.node.is_empty() || e.node == request.node)
                        .map(convert::event_to_pb)
                        .collect()
                };
                for event in batch {
                    if sender.send(Ok(event)).await.is_err() {
                        return;
                    }
                }
                if !request.follow || status.changed().await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }

    async fn update_service(
        &self,
        request: Request<pb::UpdateServiceRequest>,
    ) -> Result<Response<pb::ServiceStatus>, Status> {
        let spec = request.into_inner().spec;
        let spec = self.checked_spec(spec).await?;
        let name = spec.name.clone();
        self.propose(Command::UpdateService { spec }).await?;
        self.service_status(&name).await.map(Response::new)
    }

    async fn rollback_service(
        &self,
        request: Request<pb::RollbackServiceRequest>,
    ) -> Result<Response<pb::ServiceStatus>, Status> {
        let request = request.into_inner();
        self.propose(Command::RollbackService {
            name: request.name.clone(),
            to_version: Some(request.to_version).filter(|v| *v != 0),
        })
        .await?;
        self.service_status(&request.name).await.map(Response::new)
    }

    async fn promote_deployment(
        &self,
        request: Request<pb::PromoteDeploymentRequest>,
    ) -> Result<Response<pb::ServiceStatus>, Status> {
        let name = request.into_inner().name;
        self.propose(Command::PromoteDeployment { name: name.clone() })
            .await?;
        self.service_status(&name).await.map(Response::new)
    }

    async fn pause_deployment(
        &self,
        request: Request<pb::PauseDeploymentRequest>,
    ) -> Result<Response<pb::ServiceStatus>, Status> {
        let request = request.into_inner();
        self.propose(Command::PauseDeployment {
            name: request.name.clone(),
            paused: request.paused,
        })
        .await?;
        self.service_status(&request.name).await.map(Response::new)
    }

    async fn deploy_stack(
        &self,
        request: Request<pb::DeployStackRequest>,
    ) -> Result<Response<pb::DeployStackResponse>, Status> {
        self.deploy_stack_call(request.into_inner())
            .await
            .map(Response::new)
    }

    async fn plan_stack(
        &self,
        request: Request<pb::DeployStackRequest>,
    ) -> Result<Response<pb::StackPlan>, Status> {
        self.plan_stack_call(request.into_inner())
            .await
            .map(Response::new)
    }

    async fn remove_stack(
        &self,
        request: Request<pb::RemoveStackRequest>,
    ) -> Result<Response<pb::RemoveStackResponse>, Status> {
        self.remove_stack_call(request.into_inner().stack).await?;
        Ok(Response::new(pb::RemoveStackResponse {}))
    }

    async fn report_heartbeats(
        &self,
        request: Request<pb::ReportHeartbeatsRequest>,
    ) -> Result<Response<pb::ReportHeartbeatsResponse>, Status> {
        let now = Instant::now();
        let request = request.into_inner();
        {
            let mut traffic = self.traffic.lock().unwrap_or_else(|p| p.into_inner());
            for report in request.traffic {
                let Some(at) = now.checked_sub(Duration::from_millis(report.age_ms)) else {
                    continue;
                };
                let key = (report.service.clone(), report.node.clone());
                if traffic.get(&key).is_none_or(|(_, seen)| *seen < at) {
                    traffic.insert(key, (report, at));
                }
            }
        }
        for report in request.usage {
            if let Some(at) = now.checked_sub(Duration::from_millis(report.age_ms)) {
                self.record_usage(report.node, report.replicas, at);
            }
        }
        if let Ok(mut beats) = self.heartbeats.lock() {
            for beat in request.beats {
                let Some(seen) = now.checked_sub(Duration::from_millis(beat.age_ms)) else {
                    continue;
                };
                let entry = beats.entry(beat.node).or_insert(seen);
                *entry = (*entry).max(seen);
            }
        }
        Ok(Response::new(pb::ReportHeartbeatsResponse {}))
    }

    async fn remove_server(
        &self,
        request: Request<pb::RemoveServerRequest>,
    ) -> Result<Response<pb::RemoveServerResponse>, Status> {
        let name = request.into_inner().name;
        let remove = crate::consensus::Request::RemoveMember { name };
        self.consensus.request(remove).await.map_err(status_from)?;
        Ok(Response::new(pb::RemoveServerResponse {}))
    }

    async fn cluster_status(
        &self,
        _request: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        let status = self.consensus.status();
        let state = self.consensus.state();
        let name_of = |id: u64| {
            state
                .members
                .get(&id)
                .map_or_else(|| id.to_string(), |m| m.name.clone())
        };
        let mut members: Vec<pb::Member> = state
            .members
            .values()
            .map(|m| pb::Member {
                id: m.id,
                name: m.name.clone(),
                address: m.address.clone(),
                role: if m.id == status.id {
                    status.role.to_string()
                } else if m.id == status.leader_id {
                    "leader".to_string()
                } else {
                    "follower".to_string()
                },
            })
            .collect();
        if !state.members.contains_key(&status.id) {
            members.push(pb::Member {
                id: status.id,
                name: self.server_name.clone(),
                address: String::new(),
                role: status.role.to_string(),
            });
        }
        Ok(Response::new(pb::ClusterStatusResponse {
            members,
            leader: if status.leader_id == 0 {
                String::new()
            } else {
                name_of(status.leader_id)
            },
            term: status.term,
            commit_index: status.commit_index,
            applied_index: status.applied_index,
        }))
    }
}

type SyncStream = Pin<Box<dyn Stream<Item = Result<pb::ServerMessage, Status>> + Send>>;
type EventStream = Pin<Box<dyn Stream<Item = Result<pb::Event, Status>> + Send>>;

#[tonic::async_trait]
impl pb::agent_sync_server::AgentSync for Api {
    type SyncStream = SyncStream;

    async fn sync(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<SyncStream>, Status> {
        let mut inbound = request.into_inner();
        let register = match inbound.message().await? {
            Some(pb::AgentMessage {
                msg: Some(AgentMsg::Register(register)),
            }) => register,
            _ => {
                return Err(Status::invalid_argument(
                    "the first message of a sync stream must be register",
                ))
            }
        };
        let node = register.node.clone();
        spec::validate_name(&node)
            .map_err(|e| Status::invalid_argument(format!("invalid node {e}")))?;
        let address: IpAddr = register.address.parse().map_err(|_| {
            Status::invalid_argument(format!(
                "invalid node address \"{}\": use an IP address",
                register.address
            ))
        })?;
        let port_range = port_range(&register)?;
        let labels = labels(&register)?;
        // Alive whether or not the registration commits soon (say, during
        // an election): the liveness controller must know it.
        self.touch(&node);
        self.propose(Command::RegisterNode {
            name: node.clone(),
            address: address.to_string(),
            port_range,
            cpu_millis: register.cpu_millis,
            memory_mb: register.memory_mb,
            labels,
        })
        .await?;
        tracing::info!(node = %node, %address, "agent registered");

        let (outbound, receiver) = mpsc::channel(16);
        let registered = pb::Registered {
            node: node.clone(),
            heartbeat_interval_ms: HEARTBEAT_INTERVAL.as_millis() as u32,
        };
        let _ = outbound
            .send(Ok(server_msg(ServerMsg::Registered(registered))))
            .await;
        tokio::spawn(self.clone().serve_agent(node, inbound, outbound));
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }
}

fn port_range(register: &pb::Register) -> Result<(u16, u16), Status> {
    let convert = |port: u32| u16::try_from(port).ok().filter(|p| *p >= 1024);
    match (
        convert(register.port_range_start),
        convert(register.port_range_end),
    ) {
        (Some(start), Some(end)) if start <= end => Ok((start, end)),
        _ => Err(Status::invalid_argument(format!(
            "invalid port range {}-{}: use START-END within 1024-65535",
            register.port_range_start, register.port_range_end
        ))),
    }
}

/// Labels are `key=value` words like constraints use.
fn labels(register: &pb::Register) -> Result<BTreeMap<String, String>, Status> {
    let word = |w: &str| {
        !w.is_empty()
            && w.len() <= 128
            && w.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-' | '/'))
    };
    for (key, value) in &register.labels {
        if !word(key) || !word(value) || key.starts_with("node.") {
            return Err(Status::invalid_argument(format!(
                "invalid label {key}={value}: use letters, digits, '_', '.', '-' and '/', e.g. --label zone=a"
            )));
        }
    }
    Ok(register.labels.clone().into_iter().collect())
}

fn server_msg(msg: ServerMsg) -> pb::ServerMessage {
    pb::ServerMessage { msg: Some(msg) }
}

impl Api {
    /// One agent's stream: pushes the node's allocations whenever they
    /// change, and records its heartbeats and status reports.
    async fn serve_agent(
        self,
        node: String,
        mut inbound: Streaming<pb::AgentMessage>,
        outbound: mpsc::Sender<Result<pb::ServerMessage, Status>>,
    ) {
        let mut changes = self.node_watch.subscribe(&node);
        let mut endpoints = self.endpoints.subscribe();
        endpoints.mark_changed();
        let mut last_sent: Option<(Vec<pb::Allocation>, Vec<String>)> = None;
        let mut last_index = None;
        // A lagging server (say, one that just came back) must not hand the
        // agent an old set: missing allocations would be stopped. Catch up
        // to the leader's commit index first (ReadIndex), retrying through
        // elections; the agent keeps running what it has meanwhile.
        let mut caught_up = false;
        loop {
            if !caught_up {
                caught_up = self.shared_barrier().await.is_ok();
            }
            let changed = self.consensus.state().node_changed_index(&node);
            if caught_up && last_index != Some(changed) {
                last_index = Some(changed);
                let assignments = self.assignments(&node);
                let sent = (assignments.allocations.clone(), assignments.prepull.clone());
                if last_sent.as_ref() != Some(&sent) {
                    last_sent = Some(sent);
                    if outbound
                        .send(Ok(server_msg(ServerMsg::Assignments(assignments))))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            }
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { break },
                changed = endpoints.changed(), if caught_up => {
                    if changed.is_err() { break }
                    let current = pb::Endpoints::clone(&endpoints.borrow_and_update());
                    if outbound.send(Ok(server_msg(ServerMsg::Endpoints(current)))).await.is_err() {
                        break;
                    }
                }
                _ = tokio::time::sleep(Duration::from_millis(200)), if !caught_up => {}
                message = inbound.message() => match message {
                    Ok(Some(pb::AgentMessage { msg: Some(msg) })) => self.on_agent_message(&node, msg).await,
                    Ok(Some(pb::AgentMessage { msg: None })) => {}
                    Ok(None) | Err(_) => break,
                },
            }
        }
        tracing::info!(node = %node, "agent stream closed");
    }

    /// Records which pre-pull images a node has, when that changed.
    async fn record_images(&self, node: &str, images: Vec<String>) {
        let images: std::collections::BTreeSet<String> = images.into_iter().collect();
        let unchanged = self
            .consensus
            .state()
            .nodes
            .get(node)
            .is_none_or(|n| n.images == images);
        if unchanged {
            return;
        }
        let command = Command::ReportImages {
            node: node.to_string(),
            images,
        };
        if let Err(err) = self.consensus.propose(command.at(now_ms())).await {
            tracing::warn!(node, error = %err, "pre-pulled images not recorded");
        }
    }

    fn assignments(&self, node: &str) -> pb::Assignments {
        let state = self.consensus.state();
        pb::Assignments {
            index: state.applied_index,
            allocations: state.allocs_on(node).map(convert::alloc_to_pb).collect(),
            prepull: state.prepull_images(node),
        }
    }

    async fn on_agent_message(&self, node: &str, msg: AgentMsg) {
        self.touch(node);
        let report = match msg {
            AgentMsg::Status(report) => report,
            AgentMsg::Traffic(report) => return self.record_traffic(node, report),
            AgentMsg::ImagesReady(ready) => return self.record_images(node, ready.images).await,
            AgentMsg::Heartbeat(_) | AgentMsg::Register(_) => return,
        };
        let Some(state) = AllocState::parse(&report.state) else {
            tracing::warn!(node, state = %report.state, "agent reported an unknown state");
            return;
        };
        let report = AllocReport {
            id: report.id,
            state,
            restarts: report.restarts,
            pid: report.pid,
            message: report.message,
        };
        let unchanged = self
            .consensus
            .state()
            .allocs
            .get(&report.id)
            .is_none_or(|a| {
                a.state == report.state
                    && a.restarts == report.restarts
                    && a.pid == report.pid
                    && a.message == report.message
            });
        if unchanged {
            return;
        }
        let command = Command::ReportAllocs {
            node: node.to_string(),
            reports: vec![report],
        };
        if let Err(err) = self.consensus.propose(command.at(now_ms())).await {
            tracing::warn!(node, error = %err, "allocation status not recorded");
        }
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
