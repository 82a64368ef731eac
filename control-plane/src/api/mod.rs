//! The gRPC API: `Control` for the CLI and `AgentSync` for agents. This is
//! the only layer that builds `tonic::Status`.

// `tonic::Status` is large, but it is what every handler returns; boxing it
// in the helpers would only move the conversion.
#![allow(clippy::result_large_err)]

mod convert;
mod raft_service;

pub use raft_service::RaftService;

use std::collections::HashMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::Stream;
use skiff_proto::v1 as pb;
use skiff_proto::v1::agent_message::Msg as AgentMsg;
use skiff_proto::v1::server_message::Msg as ServerMsg;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::consensus::{Consensus, ProposeError};
use crate::state::{spec, AllocReport, AllocState, Command, CommandError};

/// How often agents are asked to send a heartbeat.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);

/// Shared by both services: the consensus handle and what only this server
/// sees (the last heartbeat of each node connected to it).
#[derive(Clone)]
pub struct Api {
    consensus: Consensus,
    heartbeats: Arc<Mutex<HashMap<String, Instant>>>,
    server_name: String,
}

impl Api {
    pub fn new(consensus: Consensus, server_name: String) -> Self {
        Api {
            consensus,
            heartbeats: Arc::default(),
            server_name,
        }
    }

    async fn propose(&self, command: Command) -> Result<(), Status> {
        self.consensus
            .propose(command)
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

    fn touch(&self, node: &str) {
        if let Ok(mut beats) = self.heartbeats.lock() {
            beats.insert(node.to_string(), Instant::now());
        }
    }
}

pub(crate) fn status_from(err: ProposeError) -> Status {
    match err {
        ProposeError::Rejected(CommandError::ServiceNotFound(_)) => {
            Status::not_found(err.to_string())
        }
        ProposeError::Rejected(CommandError::ServiceExists(_)) => {
            Status::already_exists(err.to_string())
        }
        ProposeError::Rejected(CommandError::Invalid(_)) => {
            Status::invalid_argument(err.to_string())
        }
        ProposeError::Membership(_) => Status::failed_precondition(err.to_string()),
        ProposeError::NoLeader | ProposeError::NotLeader(_) | ProposeError::Forward(_) => {
            Status::unavailable(err.to_string())
        }
        ProposeError::Unknown => Status::aborted(err.to_string()),
        ProposeError::Stopped => Status::internal(err.to_string()),
    }
}

fn invalid(err: spec::SpecError) -> Status {
    Status::invalid_argument(err.to_string())
}

#[tonic::async_trait]
impl pb::control_server::Control for Api {
    async fn create_service(
        &self,
        request: Request<pb::CreateServiceRequest>,
    ) -> Result<Response<pb::ServiceStatus>, Status> {
        let spec = request
            .into_inner()
            .spec
            .ok_or_else(|| Status::invalid_argument("invalid spec: missing"))?;
        let spec = convert::spec_from_pb(spec).map_err(invalid)?;
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
        self.service_status(&request.into_inner().name)
            .await
            .map(Response::new)
    }

    async fn list_nodes(
        &self,
        _request: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        self.barrier().await?;
        let beats = self
            .heartbeats
            .lock()
            .map(|b| b.clone())
            .unwrap_or_default();
        let state = self.consensus.state();
        let nodes = state
            .nodes
            .values()
            .map(|node| {
                let secs = beats
                    .get(&node.name)
                    .map_or(u64::MAX, |t| t.elapsed().as_secs());
                convert::node_to_pb(&state, node, secs)
            })
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
        self.propose(Command::RegisterNode {
            name: node.clone(),
            address: address.to_string(),
            port_range,
        })
        .await?;
        self.touch(&node);
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
        let mut status = self.consensus.watch_status();
        let mut last_sent: Option<Vec<pb::Allocation>> = None;
        loop {
            let assignments = self.assignments(&node);
            if last_sent.as_ref() != Some(&assignments.allocations) {
                last_sent = Some(assignments.allocations.clone());
                if outbound
                    .send(Ok(server_msg(ServerMsg::Assignments(assignments))))
                    .await
                    .is_err()
                {
                    break;
                }
            }
            tokio::select! {
                changed = status.changed() => if changed.is_err() { break },
                message = inbound.message() => match message {
                    Ok(Some(pb::AgentMessage { msg: Some(msg) })) => self.on_agent_message(&node, msg).await,
                    Ok(Some(pb::AgentMessage { msg: None })) => {}
                    Ok(None) | Err(_) => break,
                },
            }
        }
        tracing::info!(node = %node, "agent stream closed");
    }

    fn assignments(&self, node: &str) -> pb::Assignments {
        let state = self.consensus.state();
        pb::Assignments {
            index: state.applied_index,
            allocations: state
                .allocs
                .values()
                .filter(|a| a.node == node)
                .map(convert::alloc_to_pb)
                .collect(),
        }
    }

    async fn on_agent_message(&self, node: &str, msg: AgentMsg) {
        self.touch(node);
        let report = match msg {
            AgentMsg::Status(report) => report,
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
        if let Err(err) = self.consensus.propose(command).await {
            tracing::warn!(node, error = %err, "allocation status not recorded");
        }
    }
}
