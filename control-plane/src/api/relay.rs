//! `ServiceLogs` and `ServiceExec`: any server, a follower too, finds the
//! replica's node in its state and relays the call to that node's agent
//! (at the address the agent registered, `Node.agent_address`), so a client
//! needs to reach only one server, never an agent.

use std::pin::Pin;
use std::time::Duration;

use futures::{Stream, StreamExt};
use skiff_proto::v1 as pb;
use skiff_proto::v1::agent_logs_client::AgentLogsClient;
use skiff_proto::v1::exec_input::Msg as In;
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

use super::Api;
use crate::controllers::now_ms;
use crate::state::{AllocState, Allocation, DesiredState, State};

/// How long reaching an agent may take.
const AGENT_DIAL_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a read barrier may hold a relay up; past it the server answers
/// from what it has applied (a replica's node rarely changes).
const BARRIER_WAIT: Duration = Duration::from_secs(2);
/// How long the client may take to send an exec's start message.
const START_WAIT: Duration = Duration::from_secs(10);
/// The largest message relayed either way (output and stdin chunks are far
/// smaller).
const MAX_MESSAGE: usize = 1024 * 1024;

pub(super) type LogStream = Pin<Box<dyn Stream<Item = Result<pb::LogChunk, Status>> + Send>>;
pub(super) type ExecStream = Pin<Box<dyn Stream<Item = Result<pb::ExecOutput, Status>> + Send>>;

/// The replica of `service` whose id is or starts with `prefix`.
fn find_replica<'a>(
    state: &'a State,
    service: &'a str,
    prefix: &str,
) -> Result<&'a Allocation, Status> {
    let matching: Vec<&Allocation> = state
        .allocs_of(service)
        .filter(|a| a.id.starts_with(prefix))
        .collect();
    match matching.as_slice() {
        [one] => Ok(one),
        [] => Err(Status::not_found(format!(
            "invalid --replica: service {service} has no replica {prefix}; see `skiff service ps {service} --all`"
        ))),
        many => Err(Status::invalid_argument(format!(
            "invalid --replica: {prefix} matches {} replicas of {service}; give more of the id",
            many.len()
        ))),
    }
}

/// The replica an exec without `--replica` goes to: the first running one
/// meant to run, by id.
fn running_replica<'a>(state: &'a State, service: &'a str) -> Result<&'a Allocation, Status> {
    state
        .allocs_of(service)
        .filter(|a| a.desired == DesiredState::Run)
        .filter(|a| matches!(a.state, AllocState::Running | AllocState::Healthy))
        .min_by(|a, b| a.id.cmp(&b.id))
        .ok_or_else(|| {
            Status::failed_precondition(format!(
                "invalid service: {service} has no running replica to exec in; scale it up (`skiff service scale {service} 1`) or check `skiff service ps {service}`"
            ))
        })
}

impl Api {
    /// Waits for a read barrier, or not past [`BARRIER_WAIT`] (no leader):
    /// a relay then reads the state as applied, since it reads only a
    /// replica's node.
    async fn relay_barrier(&self) {
        let _ = tokio::time::timeout(BARRIER_WAIT, self.barrier()).await;
    }

    /// A client of the agent running `alloc`.
    fn agent_client(
        &self,
        state: &State,
        alloc: &Allocation,
    ) -> Result<AgentLogsClient<Channel>, Status> {
        if !state.nodes.contains_key(&alloc.node) {
            return Err(Status::unavailable(format!(
                "node {} of replica {} is gone",
                alloc.node, alloc.id
            )));
        }
        self.node_client(state, &alloc.node)
    }

    /// A client of the agent of node `name`, over mutual TLS checking that
    /// the peer holds that node's certificate.
    fn node_client(&self, state: &State, name: &str) -> Result<AgentLogsClient<Channel>, Status> {
        let node = state.nodes.get(name).ok_or_else(|| {
            Status::not_found(format!("node {name} not found; see `skiff node ls`"))
        })?;
        if state.pki.is_revoked(name) {
            return Err(Status::failed_precondition(format!(
                "node {name} is revoked"
            )));
        }
        if node.agent_address.is_empty() {
            return Err(Status::unavailable(format!(
                "the agent of node {} registered no address for logs and exec; restart it with this version of skiff",
                node.name
            )));
        }
        let endpoint =
            tonic::transport::Endpoint::from_shared(format!("http://{}", node.agent_address))
                .map_err(|_| {
                    Status::internal(format!(
                        "node {} registered an invalid agent address {}",
                        node.name, node.agent_address
                    ))
                })?
                .connect_timeout(AGENT_DIAL_TIMEOUT);
        let channel = self
            .trust()?
            .dial_agent(&node.name, endpoint)
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(AgentLogsClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE))
    }

    pub(super) async fn service_logs_here(
        &self,
        request: pb::ServiceLogsRequest,
    ) -> Result<Response<LogStream>, Status> {
        skiff_spec::validate_name(&request.service)
            .map_err(|e| Status::invalid_argument(format!("invalid service {e}")))?;
        if request.replica.is_empty() {
            return Err(Status::invalid_argument(
                "invalid --replica: give the replica's id (see `skiff service ps`)",
            ));
        }
        self.relay_barrier().await;
        let (mut client, asked, node) = {
            let state = self.consensus.state();
            if !state.services.contains_key(&request.service) {
                return Err(Status::not_found(format!(
                    "service {} not found",
                    request.service
                )));
            }
            let alloc = find_replica(&state, &request.service, &request.replica)?;
            let since_ms = match request.max_age_ms {
                0 => request.since_ms,
                age => request.since_ms.max(now_ms().saturating_sub(age)),
            };
            let asked = pb::LogsRequest {
                alloc_id: alloc.id.clone(),
                follow: request.follow,
                tail: request.tail,
                since_ms,
                timestamps: request.timestamps,
            };
            (self.agent_client(&state, alloc)?, asked, alloc.node.clone())
        };
        let id = asked.alloc_id.clone();
        let stream = client
            .logs(asked)
            .await
            .map_err(|e| agent_error(e, &node, &id, "logs"))?
            .into_inner();
        Ok(Response::new(Box::pin(stream)))
    }

    pub(super) async fn service_exec_here(
        &self,
        request: Request<Streaming<pb::ExecInput>>,
    ) -> Result<Response<ExecStream>, Status> {
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(START_WAIT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no exec start message in time"))??;
        let Some(pb::ExecInput {
            msg: Some(In::Start(mut start)),
        }) = first
        else {
            return Err(Status::invalid_argument(
                "the first message of an exec must be start",
            ));
        };
        skiff_spec::validate_name(&start.service)
            .map_err(|e| Status::invalid_argument(format!("invalid service {e}")))?;
        self.relay_barrier().await;
        let (mut client, node, id) = {
            let state = self.consensus.state();
            if !state.services.contains_key(&start.service) {
                return Err(Status::not_found(format!(
                    "service {} not found",
                    start.service
                )));
            }
            let alloc = if start.replica.is_empty() {
                running_replica(&state, &start.service)?
            } else {
                let alloc = find_replica(&state, &start.service, &start.replica)?;
                if alloc.desired != DesiredState::Run || alloc.state == AllocState::Stopped {
                    return Err(Status::failed_precondition(format!(
                        "invalid --replica: replica {} of {} is stopped; pick a running one from `skiff service ps {}`",
                        alloc.id, start.service, start.service
                    )));
                }
                alloc
            };
            let client = self.agent_client(&state, alloc)?;
            (client, alloc.node.clone(), alloc.id.clone())
        };
        start.replica = id.clone();
        let first = pb::ExecInput {
            msg: Some(In::Start(start)),
        };
        // The client's input after the start, until it ends or fails.
        let rest = inbound
            .take_while(|m| futures::future::ready(m.is_ok()))
            .filter_map(|m| async move { m.ok() });
        let outbound = futures::stream::iter([first]).chain(rest);
        let stream = client
            .exec(outbound)
            .await
            .map_err(|e| agent_error(e, &node, &id, "exec"))?
            .into_inner();
        tracing::info!(replica = %id, %node, "exec relayed");
        Ok(Response::new(Box::pin(stream)))
    }
}

/// An agent's answer as the client sees it: the agent's own refusals pass
/// through; failing to reach it names the node.
fn agent_error(e: Status, node: &str, id: &str, what: &str) -> Status {
    if e.code() == tonic::Code::Unavailable {
        return Status::unavailable(format!(
            "failed to reach the agent of node {node} for the {what} of replica {id}: {}",
            e.message()
        ));
    }
    e
}

/// How long a relayed prune may take (it deletes files on the node).
const PRUNE_TIMEOUT: Duration = Duration::from_secs(120);

impl Api {
    /// `skiff node prune`: relayed to the node's agent, like logs and exec.
    pub(super) async fn prune_node_here(&self, name: &str) -> Result<pb::PruneResponse, Status> {
        self.relay_barrier().await;
        let mut client = self.node_client(&self.consensus.state(), name)?;
        let mut request = tonic::Request::new(pb::PruneRequest {});
        request.set_timeout(PRUNE_TIMEOUT);
        client
            .prune(request)
            .await
            .map(tonic::Response::into_inner)
            .map_err(|e| match e.code() {
                tonic::Code::Cancelled
                | tonic::Code::DeadlineExceeded
                | tonic::Code::Unavailable => Status::unavailable(format!(
                    "failed to reach the agent of node {name} for the prune: {}",
                    e.message()
                )),
                _ => Status::new(e.code(), format!("node {name}: {}", e.message())),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exec_without_a_running_replica_names_the_service_and_the_fix() {
        let state = State::default();
        let err = running_replica(&state, "web").unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition);
        assert!(
            err.message().contains("web has no running replica")
                && err.message().contains("skiff service scale web 1")
                && !err.message().contains('\n'),
            "{}",
            err.message()
        );
    }
}
