//! The `Control` service: the RPCs of the CLI (services, deployments,
//! nodes, variables, events, the cluster) and the heartbeats followers
//! forward to the leader.

use std::pin::Pin;
use std::time::{Duration, Instant};

use futures::Stream;
use skiff_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::events::EventFilter;
use super::leader_view::{forwarded, LeaderView};
use super::{convert, status_from, Api};
use crate::controllers::now_ms;
use crate::state::{Availability, Command, Event, Outcome};
use skiff_spec as spec;

pub(super) fn invalid(err: spec::SpecError) -> Status {
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
            if let Some(why) = reserved_port(&state, publish) {
                return Err(Status::invalid_argument(format!(
                    "invalid publish: port {publish} {why}; choose another --publish port"
                )));
            }
        }
        Ok(spec)
    }
}

/// Why `port` cannot be published, if it cannot: every node's proxy
/// listens on it, so it must not be one a node hands to replicas or one a
/// server listens on (a proxy that took the API port while the server
/// restarts would lock operators out).
pub(super) fn reserved_port(state: &crate::state::State, port: u16) -> Option<String> {
    if let Some(node) = state
        .nodes
        .values()
        .find(|n| (n.port_range.0..=n.port_range.1).contains(&port))
    {
        return Some(format!(
            "is in node {}'s host-port range {}-{}, which it gives to replicas",
            node.name, node.port_range.0, node.port_range.1
        ));
    }
    state
        .members
        .values()
        .find(|m| {
            m.address
                .rsplit_once(':')
                .and_then(|(_, p)| p.parse::<u16>().ok())
                == Some(port)
        })
        .map(|m| format!("is server {}'s port ({})", m.name, m.address))
}

/// Puts back the current value of every environment variable `spec` sends
/// as its short hash (as reads show it without `--show-values`), so that
/// `service update` starts from what anyone with an operator token may
/// read and still keeps values it does not change.
pub(super) fn keep_hidden_env(
    spec: &mut pb::ServiceSpec,
    current: &std::collections::BTreeMap<String, String>,
) {
    for (key, value) in spec.env.iter_mut() {
        if let Some(old) = current.get(key) {
            if *value == skiff_spec::value_hash(old) {
                value.clone_from(old);
            }
        }
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::Event, Status>> + Send>>;

#[tonic::async_trait]
impl pb::control_server::Control for Api {
    type ServiceLogsStream = super::relay::LogStream;

    async fn service_logs(
        &self,
        request: Request<pb::ServiceLogsRequest>,
    ) -> Result<Response<Self::ServiceLogsStream>, Status> {
        self.service_logs_here(request.into_inner()).await
    }

    type SnapshotSaveStream = super::backup::SnapshotStream;

    async fn snapshot_save(
        &self,
        request: Request<pb::SnapshotSaveRequest>,
    ) -> Result<Response<Self::SnapshotSaveStream>, Status> {
        self.snapshot_save_here(request.into_inner()).await
    }

    type ServiceExecStream = super::relay::ExecStream;

    async fn service_exec(
        &self,
        request: Request<tonic::Streaming<pb::ExecInput>>,
    ) -> Result<Response<Self::ServiceExecStream>, Status> {
        self.service_exec_here(request).await
    }

    async fn secret_create(
        &self,
        request: Request<pb::PutSecretRequest>,
    ) -> Result<Response<pb::SecretInfo>, Status> {
        self.put_secret_here(request.into_inner(), true)
            .await
            .map(Response::new)
    }

    async fn secret_update(
        &self,
        request: Request<pb::PutSecretRequest>,
    ) -> Result<Response<pb::SecretInfo>, Status> {
        self.put_secret_here(request.into_inner(), false)
            .await
            .map(Response::new)
    }

    async fn secret_list(
        &self,
        _request: Request<pb::ListSecretsRequest>,
    ) -> Result<Response<pb::ListSecretsResponse>, Status> {
        self.list_secrets_here().await.map(Response::new)
    }

    async fn secret_inspect(
        &self,
        request: Request<pb::InspectSecretRequest>,
    ) -> Result<Response<pb::SecretInfo>, Status> {
        self.inspect_secret_here(&request.into_inner().name)
            .await
            .map(Response::new)
    }

    async fn token_create(
        &self,
        request: Request<pb::TokenCreateRequest>,
    ) -> Result<Response<pb::TokenCreateResponse>, Status> {
        self.create_token_here(request.into_inner())
            .await
            .map(Response::new)
    }

    async fn token_list(
        &self,
        _request: Request<pb::TokenListRequest>,
    ) -> Result<Response<pb::TokenListResponse>, Status> {
        self.list_tokens_here().await.map(Response::new)
    }

    async fn token_revoke(
        &self,
        request: Request<pb::TokenRevokeRequest>,
    ) -> Result<Response<pb::TokenRevokeResponse>, Status> {
        self.revoke_token_here(request.into_inner().name)
            .await
            .map(|()| Response::new(pb::TokenRevokeResponse {}))
    }

    async fn secret_remove(
        &self,
        request: Request<pb::RemoveSecretRequest>,
    ) -> Result<Response<pb::RemoveSecretResponse>, Status> {
        self.remove_secret_here(&request.into_inner().name)
            .await
            .map(|()| Response::new(pb::RemoveSecretResponse {}))
    }

    async fn cluster_token(
        &self,
        request: Request<pb::ClusterTokenRequest>,
    ) -> Result<Response<pb::ClusterTokenResponse>, Status> {
        let request = request.into_inner();
        let role = skiff_pki::Role::parse(&request.role).map_err(Status::invalid_argument)?;
        if request.rotate {
            self.propose(Command::RotateJoinToken {
                role: role.as_str().to_string(),
            })
            .await?;
        }
        self.barrier().await?;
        let state = self.consensus.state();
        let trust = self.trust()?;
        let token = skiff_pki::JoinToken {
            ca_digest: trust.ca().digest(),
            secret: trust
                .ca()
                .join_secret(role, state.pki.join_generation(role.as_str())),
        }
        .to_string();
        let servers: Vec<String> = state.members.values().map(|m| m.address.clone()).collect();
        let command = match role {
            skiff_pki::Role::Agent => format!(
                "skiff agent --name NODE --servers {} --token {token}",
                servers.join(",")
            ),
            skiff_pki::Role::Server => format!(
                "skiff server --name NAME --join {} --token {token}",
                servers.first().cloned().unwrap_or_default()
            ),
        };
        Ok(Response::new(pb::ClusterTokenResponse { token, command }))
    }

    async fn prune_node(
        &self,
        request: Request<pb::PruneNodeRequest>,
    ) -> Result<Response<pb::PruneResponse>, Status> {
        self.prune_node_here(&request.into_inner().node)
            .await
            .map(Response::new)
    }

    async fn revoke_node(
        &self,
        request: Request<pb::RevokeNodeRequest>,
    ) -> Result<Response<pb::RevokeNodeResponse>, Status> {
        let name = request.into_inner().name;
        skiff_spec::validate_name(&name)
            .map_err(|e| Status::invalid_argument(format!("invalid node {e}")))?;
        self.propose(Command::RevokeNode { name }).await?;
        Ok(Response::new(pb::RevokeNodeResponse {}))
    }

    async fn list_volumes(
        &self,
        _request: Request<pb::ListVolumesRequest>,
    ) -> Result<Response<pb::ListVolumesResponse>, Status> {
        self.volumes_here().await.map(Response::new)
    }

    async fn remove_volume(
        &self,
        request: Request<pb::RemoveVolumeRequest>,
    ) -> Result<Response<pb::RemoveVolumeResponse>, Status> {
        self.remove_volume_here(request.into_inner())
            .await
            .map(Response::new)
    }

    async fn create_service(
        &self,
        request: Request<pb::CreateServiceRequest>,
    ) -> Result<Response<pb::ServiceStatus>, Status> {
        let spec = request.into_inner().spec;
        let spec = self.checked_spec(spec).await?;
        let name = spec.name.clone();
        let new = usize::from(!self.consensus.state().services.contains_key(&name));
        self.check_service_count(new)?;
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
        request: Request<pb::ListServicesRequest>,
    ) -> Result<Response<pb::ListServicesResponse>, Status> {
        super::auth::check_show_values(&request, request.get_ref().show_values)?;
        let show_values = request.into_inner().show_values;
        self.barrier().await?;
        let state = self.consensus.state();
        let services = state
            .services
            .values()
            .map(|s| {
                let mut status = convert::service_to_pb(&state, s);
                if !show_values {
                    convert::hide_env_values(&mut status);
                }
                status
            })
            .collect();
        Ok(Response::new(pb::ListServicesResponse { services }))
    }

    async fn get_service(
        &self,
        request: Request<pb::GetServiceRequest>,
    ) -> Result<Response<pb::ServiceStatus>, Status> {
        super::auth::check_show_values(&request, request.get_ref().show_values)?;
        let metadata = request.metadata().clone();
        let asked = request.into_inner();
        let (name, show_values) = (asked.name.clone(), asked.show_values);
        let incoming = &metadata;
        let view = self
            .ask_leader(&metadata, |mut leader| async move {
                leader.get_service(forwarded(asked, incoming)).await
            })
            .await;
        if let LeaderView::Leader(answer) = view {
            return answer;
        }
        let mut status = self.service_status_shown(&name, show_values).await?;
        status.traffic = self.service_traffic(&name);
        status.usage = self.service_usage(&name);
        status.leader_unreachable = matches!(view, LeaderView::Unreachable);
        Ok(Response::new(status))
    }

    async fn list_nodes(
        &self,
        request: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        let metadata = request.metadata().clone();
        let incoming = &metadata;
        let view = self
            .ask_leader(&metadata, |mut leader| async move {
                leader
                    .list_nodes(forwarded(pb::ListNodesRequest {}, incoming))
                    .await
            })
            .await;
        let own = match view {
            LeaderView::Leader(answer) => return answer,
            LeaderView::Here => false,
            LeaderView::Unreachable => true,
        };
        self.barrier().await?;
        let state = self.consensus.state();
        let nodes = state
            .nodes
            .values()
            .map(|node| self.node_to_pb(&state, node, own))
            .collect();
        Ok(Response::new(pb::ListNodesResponse { nodes }))
    }

    async fn put_variable(
        &self,
        request: Request<pb::PutVariableRequest>,
    ) -> Result<Response<pb::PutVariableResponse>, Status> {
        let request = request.into_inner();
        spec::validate_variable(&request.key, &request.value).map_err(invalid)?;
        if request.key.starts_with("_skiff/") {
            return Err(Status::permission_denied(format!(
                "variable {} is reserved: keys under _skiff/ are written by the cluster itself",
                request.key
            )));
        }
        let (exists, have) = {
            let state = self.consensus.state();
            (
                state.variables.contains_key(&request.key),
                state.variables.len(),
            )
        };
        let max = self.limits.max_variables;
        if !exists && have >= max {
            return Err(Status::resource_exhausted(format!(
                "too many variables: the cluster holds {have} and takes at most {max}; remove some or raise --max-variables on every server"
            )));
        }
        self.propose(Command::PutVariable {
            key: request.key,
            value: request.value,
        })
        .await?;
        Ok(Response::new(pb::PutVariableResponse {}))
    }

    async fn compare_and_set_variable(
        &self,
        request: Request<pb::CasVariableRequest>,
    ) -> Result<Response<pb::CasVariableResponse>, Status> {
        let request = request.into_inner();
        spec::validate_variable(&request.key, &request.value).map_err(invalid)?;
        if let Some(expected) = &request.expected {
            spec::validate_variable(&request.key, expected).map_err(invalid)?;
        }
        if request.key.starts_with("_skiff/") {
            return Err(Status::permission_denied(format!(
                "variable {} is reserved: keys under _skiff/ are written by the cluster itself",
                request.key
            )));
        }
        if request.expected.is_none() {
            let have = self.consensus.state().variables.len();
            let max = self.limits.max_variables;
            if have >= max {
                return Err(Status::resource_exhausted(format!(
                    "too many variables: the cluster holds {have} and takes at most {max}; remove some or raise --max-variables on every server"
                )));
            }
        }
        let by = super::auth::current_caller().map(|caller| caller.name);
        let outcome = self
            .consensus
            .propose(
                Command::CompareAndSetVariable {
                    key: request.key,
                    expected: request.expected,
                    value: request.value,
                }
                .at_by(crate::controllers::now_ms(), by),
            )
            .await
            .map_err(super::status_from)?;
        match outcome {
            Outcome::Compared { swapped, current } => {
                Ok(Response::new(pb::CasVariableResponse { swapped, current }))
            }
            other => Err(Status::internal(format!(
                "compare-and-set answered {other:?}"
            ))),
        }
    }

    async fn get_variable(
        &self,
        request: Request<pb::GetVariableRequest>,
    ) -> Result<Response<pb::GetVariableResponse>, Status> {
        let request = request.into_inner();
        if !request.stale {
            self.barrier().await?;
        }
        let value = self.consensus.state().variables.get(&request.key).cloned();
        Ok(Response::new(pb::GetVariableResponse {
            found: value.is_some(),
            value: value.unwrap_or_default(),
        }))
    }

    async fn list_variables(
        &self,
        request: Request<pb::ListVariablesRequest>,
    ) -> Result<Response<pb::ListVariablesResponse>, Status> {
        let request = request.into_inner();
        if !request.stale {
            self.barrier().await?;
        }
        let prefix = request.prefix;
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
        let metadata = request.metadata().clone();
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
        // The heartbeat in the answer is the leader's, as `node ls` shows.
        let asked = pb::InspectNodeRequest {
            name: request.name.clone(),
        };
        let incoming = &metadata;
        let view = self
            .ask_leader(&metadata, |mut leader| async move {
                leader.inspect_node(forwarded(asked, incoming)).await
            })
            .await;
        let own = match view {
            LeaderView::Leader(Ok(detail)) => {
                if let Some(node) = detail.into_inner().node {
                    return Ok(Response::new(node));
                }
                true
            }
            LeaderView::Leader(Err(_)) | LeaderView::Unreachable => true,
            LeaderView::Here => false,
        };
        self.barrier().await?;
        let state = self.consensus.state();
        let node = state
            .nodes
            .get(&request.name)
            .ok_or_else(|| Status::not_found(format!("node \"{}\" not found", request.name)))?;
        Ok(Response::new(self.node_to_pb(&state, node, own)))
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
        let filter = EventFilter::new(&request, now_ms());
        tokio::spawn(async move {
            let mut status = api.consensus.watch_status();
            let mut after = request.after_seq;
            let mut backlog = true;
            loop {
                let batch: Vec<pb::Event> = {
                    let state = api.consensus.state();
                    let events: Vec<&Event> = state.events_after(after).collect();
                    if let Some(last) = events.last() {
                        after = last.seq;
                    }
                    let chosen = if backlog {
                        filter.backlog(events.into_iter())
                    } else {
                        events.into_iter().filter(|e| filter.matches(e)).collect()
                    };
                    chosen.into_iter().map(convert::event_to_pb).collect()
                };
                backlog = false;
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
        let mut spec = request.into_inner().spec;
        if let Some(spec) = spec.as_mut() {
            self.barrier().await?;
            if let Some(current) = self.consensus.state().services.get(&spec.name) {
                keep_hidden_env(spec, &current.spec.env);
            }
        }
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

    async fn rebalance_service(
        &self,
        request: Request<pb::RebalanceServiceRequest>,
    ) -> Result<Response<pb::ServiceStatus>, Status> {
        let name = request.into_inner().name;
        self.propose(Command::RebalanceService { name: name.clone() })
            .await?;
        self.service_status(&name).await.map(Response::new)
    }

    async fn remove_node(
        &self,
        request: Request<pb::RemoveNodeRequest>,
    ) -> Result<Response<pb::RemoveNodeResponse>, Status> {
        let name = request.into_inner().name;
        self.barrier().await?;
        let forgotten = self.consensus.state().allocs_on(&name).count() as u32;
        self.propose(Command::RemoveNode { name }).await?;
        Ok(Response::new(pb::RemoveNodeResponse { forgotten }))
    }

    async fn inspect_node(
        &self,
        request: Request<pb::InspectNodeRequest>,
    ) -> Result<Response<pb::NodeDetail>, Status> {
        let metadata = request.metadata().clone();
        let name = request.into_inner().name;
        let asked = pb::InspectNodeRequest { name: name.clone() };
        let incoming = &metadata;
        let view = self
            .ask_leader(&metadata, |mut leader| async move {
                leader.inspect_node(forwarded(asked, incoming)).await
            })
            .await;
        let own = match view {
            LeaderView::Leader(answer) => return answer,
            LeaderView::Here => false,
            LeaderView::Unreachable => true,
        };
        self.barrier().await?;
        let state = self.consensus.state();
        let node = state.nodes.get(&name).ok_or_else(|| {
            Status::not_found(format!("node \"{name}\" not found; see `skiff node ls`"))
        })?;
        Ok(Response::new(pb::NodeDetail {
            node: Some(self.node_to_pb(&state, node, own)),
            allocations: state
                .allocs_on(&name)
                .map(|a| {
                    let mut alloc = convert::alloc_to_pb(a);
                    if let Some(spec) = alloc.spec.as_mut() {
                        convert::hide_spec_env(spec);
                    }
                    alloc
                })
                .collect(),
        }))
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
        // Followers forward their agents' heartbeats and reports: only a
        // server certificate may (an agent reports on its own stream).
        let from_server = request
            .extensions()
            .get::<skiff_pki::PeerInfo>()
            .is_some_and(skiff_pki::PeerInfo::is_server);
        if !from_server {
            return Err(Status::permission_denied(
                "heartbeat reports come only from servers (a server certificate is needed)",
            ));
        }
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
        request: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        // Reachability is the leader's to tell: ask it, unless this is it.
        let metadata = request.metadata().clone();
        let incoming = &metadata;
        let view = self
            .ask_leader(&metadata, |mut leader| async move {
                leader
                    .cluster_status(forwarded(pb::ClusterStatusRequest {}, incoming))
                    .await
            })
            .await;
        let leaders_view: Option<Vec<pb::Member>> = match view {
            LeaderView::Leader(Ok(answer)) => Some(answer.into_inner().members),
            LeaderView::Leader(Err(_)) | LeaderView::Unreachable | LeaderView::Here => None,
        };
        let status = self.consensus.status();
        let state = self.consensus.state();
        let name_of = |id: u64| {
            state
                .members
                .get(&id)
                .map_or_else(|| id.to_string(), |m| m.name.clone())
        };
        let member = |id: u64, name: String, address: String, learner: bool| {
            // A learner receives the log but does not vote until the leader
            // promotes it, once it has caught up.
            let role = if learner {
                "learner (catching up)".to_string()
            } else if id == status.id {
                status.role.to_string()
            } else if id == status.leader_id {
                "leader".to_string()
            } else {
                "follower".to_string()
            };
            let seen = leaders_view
                .as_ref()
                .and_then(|members| members.iter().find(|m| m.id == id));
            let (reachable, last_contact_ms, matched_index) = match seen {
                Some(m) => (m.reachable.clone(), m.last_contact_ms, m.matched_index),
                None => self.own_contact(id, &status),
            };
            pb::Member {
                id,
                name,
                address,
                role,
                reachable,
                last_contact_ms,
                matched_index,
            }
        };
        let mut members: Vec<pb::Member> = state
            .members
            .values()
            .map(|m| member(m.id, m.name.clone(), m.address.clone(), m.learner))
            .collect();
        if !state.members.contains_key(&status.id) {
            members.push(member(
                status.id,
                self.server_name.clone(),
                String::new(),
                false,
            ));
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

impl Api {
    /// Member `id`'s reachability, last contact and matched index as this
    /// server knows them: all of it on the leader; on a follower, only its
    /// contact with the leader ("unknown" for the others).
    fn own_contact(&self, id: u64, status: &crate::consensus::RaftStatus) -> (String, u64, u64) {
        if id == status.id {
            return ("yes".into(), 0, status.last_index);
        }
        let leading = status.leader_id == status.id;
        if !leading && id != status.leader_id {
            return ("unknown".into(), u64::MAX, 0);
        }
        let contact = self.consensus.contact(id);
        let reachable = contact
            .since_heard
            .is_some_and(|since| since < self.consensus.election_timeout());
        (
            if reachable { "yes" } else { "no" }.into(),
            contact
                .since_heard
                .map_or(u64::MAX, |since| since.as_millis() as u64),
            contact.matched.unwrap_or(0),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Command, Member, State};

    #[test]
    fn an_update_that_sends_hidden_values_back_keeps_them() {
        let current = std::collections::BTreeMap::from([
            ("A".to_string(), "secret".to_string()),
            ("B".to_string(), "old".to_string()),
        ]);
        let mut spec = pb::ServiceSpec {
            env: [
                ("A".to_string(), skiff_spec::value_hash("secret")),
                ("B".to_string(), "new".to_string()),
                ("C".to_string(), skiff_spec::value_hash("x")),
            ]
            .into(),
            ..Default::default()
        };
        keep_hidden_env(&mut spec, &current);
        assert_eq!(spec.env["A"], "secret");
        assert_eq!(spec.env["B"], "new");
        assert_eq!(spec.env["C"], skiff_spec::value_hash("x"));
    }

    #[test]
    fn ports_of_node_ranges_and_servers_cannot_be_published() {
        let mut state = State::default();
        state
            .apply(
                1,
                Command::RegisterNode {
                    process_runtime: true,
                    agent_address: String::new(),
                    name: "n1".into(),
                    address: "127.0.0.1".into(),
                    port_range: (20000, 29999),
                    cpu_millis: 0,
                    memory_mb: 0,
                    labels: Default::default(),
                },
            )
            .unwrap();
        state
            .apply(
                2,
                Command::UpsertMember {
                    member: Member {
                        id: 1,
                        name: "s1".into(),
                        address: "127.0.0.1:7070".into(),
                        learner: false,
                    },
                },
            )
            .unwrap();
        assert!(reserved_port(&state, 20000).unwrap().contains("n1"));
        assert!(reserved_port(&state, 7070).unwrap().contains("s1"));
        assert_eq!(reserved_port(&state, 8080), None);
    }
}
