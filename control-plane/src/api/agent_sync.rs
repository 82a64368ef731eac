//! The `AgentSync` service: one stream per agent, pushing its node's
//! allocations, the pre-pull images and the published endpoints whenever
//! they change, and recording what the agent reports.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::Stream;
use skiff_proto::v1 as pb;
use skiff_proto::v1::agent_message::Msg as AgentMsg;
use skiff_proto::v1::server_message::Msg as ServerMsg;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::{convert, Api, HEARTBEAT_INTERVAL};
use crate::controllers::now_ms;
use crate::state::{AllocReport, AllocState, Command, PortFailure};

/// Most published-port failures kept per node report (one per service).
const MAX_PORT_FAILURES: usize = 1024;
use skiff_spec as spec;

/// Per node, the Raft index of the last change to its allocations, so each
/// agent stream wakes only when something of its own changed (thousands of
/// streams waking on every applied entry would swamp a server).
#[derive(Default)]
pub(super) struct NodeWatch {
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
    /// After each applied batch (at most every 10 ms), recomputes the
    /// published services' endpoints and wakes every agent stream if they
    /// changed.
    pub(super) async fn dispatch_endpoints(self, mut shutdown: watch::Receiver<bool>) {
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
    pub(super) async fn dispatch_node_changes(self, mut shutdown: watch::Receiver<bool>) {
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
}

type SyncStream = Pin<Box<dyn Stream<Item = Result<pb::ServerMessage, Status>> + Send>>;

#[tonic::async_trait]
impl pb::agent_sync_server::AgentSync for Api {
    type SyncStream = SyncStream;

    async fn sync(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<SyncStream>, Status> {
        let identity = request
            .extensions()
            .get::<skiff_pki::PeerInfo>()
            .and_then(|peer| peer.identity.clone());
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
        // Node identity (Kubernetes' NodeRestriction): an agent speaks only
        // for the node its certificate names.
        if !identity.as_ref().is_some_and(|id| id.is_node(&node)) {
            return Err(Status::permission_denied(format!(
                "registering as node {node} needs that node's agent certificate (join with `skiff agent --token T`)"
            )));
        }
        if self.consensus.state().pki.is_revoked(&node) {
            return Err(Status::permission_denied(format!("node {node} is revoked")));
        }
        let address: IpAddr = register.address.parse().map_err(|_| {
            Status::invalid_argument(format!(
                "invalid node address \"{}\": use an IP address",
                register.address
            ))
        })?;
        let port_range = port_range(&register)?;
        let labels = labels(&register)?;
        let agent_address = register.agent_address.trim();
        if !agent_address.is_empty() && agent_address.parse::<std::net::SocketAddr>().is_err() {
            return Err(Status::invalid_argument(format!(
                "invalid agent address \"{agent_address}\": use HOST:PORT with an IP address"
            )));
        }
        // Alive whether or not the registration commits soon (say, during
        // an election): the liveness controller must know it.
        self.touch(&node);
        self.propose(Command::RegisterNode {
            name: node.clone(),
            address: address.to_string(),
            port_range,
            process_runtime: register.process_runtime,
            agent_address: agent_address.to_string(),
            cpu_millis: register.cpu_millis,
            memory_mb: register.memory_mb,
            labels,
        })
        .await?;
        tracing::info!(node = %node, %address, "agent registered");
        // The metrics address is recorded by the server, from the
        // authenticated registration: no client writes `_skiff/` keys.
        let metrics_address = register.metrics_address.trim();
        if metrics_address.parse::<std::net::SocketAddr>().is_ok() {
            let key = format!("_skiff/nodes/{node}/metrics");
            let current = self.consensus.state().variables.get(&key).cloned();
            if current.as_deref() != Some(metrics_address) {
                self.propose(Command::PutVariable {
                    key,
                    value: metrics_address.to_string(),
                })
                .await?;
            }
        }

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
        // A revoked node's stream ends within a second.
        let mut revocation_check = tokio::time::interval(Duration::from_secs(1));
        // What was last sent; secrets by name and version (a new version
        // is a new value).
        type Sent = (
            Vec<pb::Allocation>,
            Vec<String>,
            Vec<String>,
            Vec<(String, u64)>,
        );
        let mut last_sent: Option<Sent> = None;
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
            // A node marked down has its stream ended, and nothing sent
            // to it (stop everything, as its replicas were written off)
            // first: its agent, which keeps running what it has, registers
            // again once it can, with the state of every replica, and its
            // replicas nothing replaced meanwhile are kept
            // (`keep_unreplaced`) rather than stopped and placed again.
            let (changed, down) = {
                let state = self.consensus.state();
                let down = state
                    .nodes
                    .get(&node)
                    .is_some_and(|n| n.status == crate::state::NodeStatus::Down);
                (state.node_changed_index(&node), down)
            };
            if caught_up && down {
                tracing::info!(node = %node, "node marked down: its stream ends");
                break;
            }
            if caught_up && last_index != Some(changed) {
                last_index = Some(changed);
                let assignments = self.assignments(&node);
                let sent = (
                    assignments.allocations.clone(),
                    assignments.prepull.clone(),
                    assignments.remove_volumes.clone(),
                    assignments
                        .secrets
                        .iter()
                        .map(|s| (s.name.clone(), s.version))
                        .collect(),
                );
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
                _ = revocation_check.tick() => {
                    if self.consensus.state().pki.is_revoked(&node) {
                        tracing::warn!(node = %node, "node revoked: closing its stream");
                        let _ = outbound.send(Err(Status::permission_denied(format!("node {node} is revoked")))).await;
                        break;
                    }
                }
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

    /// Commits the node's published-port failures when they changed: every
    /// server then shows them, and the change is an event.
    async fn record_ports(&self, node: &str, report: pb::PublishedPorts) {
        let failures: std::collections::BTreeMap<String, PortFailure> = report
            .failures
            .into_iter()
            .filter_map(|f| {
                let port = u16::try_from(f.port).ok()?;
                let mut error = f.error;
                error.truncate(error.floor_char_boundary(512));
                Some((f.service, PortFailure { port, error }))
            })
            .take(MAX_PORT_FAILURES)
            .collect();
        let unchanged = self
            .consensus
            .state()
            .nodes
            .get(node)
            .is_none_or(|n| n.port_failures == failures);
        if unchanged {
            return;
        }
        let command = Command::ReportPorts {
            node: node.to_string(),
            failures,
        };
        if let Err(err) = self.consensus.propose(command.at(now_ms())).await {
            tracing::warn!(node, error = %err, "published-port failures not recorded");
        }
    }

    fn assignments(&self, node: &str) -> pb::Assignments {
        let state = self.consensus.state();
        pb::Assignments {
            index: state.applied_index,
            allocations: state.allocs_on(node).map(convert::alloc_to_pb).collect(),
            prepull: state.prepull_images(node),
            remove_volumes: state.volumes_to_remove(node),
            secrets: self.node_secrets(&state, node),
        }
    }

    async fn on_agent_message(&self, node: &str, msg: AgentMsg) {
        self.touch(node);
        let report = match msg {
            AgentMsg::Status(report) => report,
            AgentMsg::Traffic(report) => return self.record_traffic(node, report),
            AgentMsg::ImagesReady(ready) => return self.record_images(node, ready.images).await,
            AgentMsg::Ports(report) => return self.record_ports(node, report).await,
            AgentMsg::Volumes(report) => return self.record_volumes(node, report).await,
            AgentMsg::Heartbeat(_) | AgentMsg::Register(_) => return,
        };
        let Some(state) = AllocState::parse(&report.state).filter(|s| s.is_reportable()) else {
            tracing::warn!(node, state = %report.state, "agent reported an unknown state");
            return;
        };
        let report = AllocReport {
            id: report.id,
            state,
            restarts: report.restarts,
            pid: report.pid,
            message: report.message,
            port: u16::try_from(report.port).unwrap_or(0),
            health_checked: report.health_checked,
            exit_code: report.exit_code,
            refused: report.refused,
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
