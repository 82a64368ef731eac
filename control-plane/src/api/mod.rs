//! The gRPC API: `Control` for the CLI and `AgentSync` for agents. This is
//! the only layer that builds `tonic::Status`.
//!
//! Layout:
//! - `control`: the `Control` service, the CLI's RPCs.
//! - `agent_sync`: the `AgentSync` service, one stream per agent, and the
//!   tasks that wake those streams when their node's allocations or the
//!   published endpoints change.
//! - `reports`: the in-memory caches of the agents' traffic and resource
//!   use reports, and their forwarding to the leader.
//! - `convert`: domain types to and from protobuf.
//! - `events`: which events an `Events` call returns (`--tail`, `--since`).
//! - `leader_view`: a follower's forwarding of the reads of what only the
//!   leader holds in memory (heartbeats, reports, Raft progress).
//! - `secrets`: the secret RPCs and the values each agent gets.
//! - `volumes`: the volume RPCs and the agents' volume reports.
//! - `relay`: `service logs` and `exec` relayed to the replica's agent.
//! - `raft_service`: the Raft transport between servers.
//! - `auth`: the API tokens' check on every call and the role table.
//! - `tokens`: the token RPCs and the management token at bootstrap.
//! - here: [`Api`], the state both services share, and the helpers they
//!   use (proposing, read barriers, heartbeats, `Status` from errors).

// `tonic::Status` is large, but it is what every handler returns; boxing it
// in the helpers would only move the conversion.
#![allow(clippy::result_large_err)]

mod agent_sync;
pub mod auth;
mod backup;
mod control;
pub mod convert;
mod events;
mod leader_view;
mod pki;
mod raft_service;
mod relay;
mod reports;
pub mod request_metrics;
mod secrets;
mod stacks;
mod tokens;
mod volumes;

pub use auth::AuthLayer;
pub use pki::PkiService;
pub use raft_service::RaftService;
pub use tokens::MANAGEMENT_TOKEN;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use skiff_proto::v1 as pb;
use skiff_proto::v1::control_client::ControlClient;
use tokio::sync::watch;
use tonic::transport::Channel;
use tonic::Status;

use crate::consensus::{Consensus, ProposeError};
use crate::controllers::{now_ms, Heartbeats};
use crate::state::{Command, CommandError};
use agent_sync::NodeWatch;
use reports::{Traffic, Usage};

/// A client of the leader's `Control` service and the address it calls.
type LeaderClient = (String, ControlClient<Channel>);

/// How often agents are asked to send a heartbeat.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);

/// Shared by both services: the consensus handle and what only this server
/// holds in memory (the heartbeats and reports of the agents connected to
/// it, and on the leader those the followers forward; reads of it go to
/// the leader, see `leader_view`).
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
    /// The leader's address and a client of it, for forwarded reads.
    leader_client: Arc<Mutex<Option<LeaderClient>>>,
    limits: Limits,
    /// Seals the values of `secret create|update` and opens them for the
    /// agents that need them; `None`: this server refuses secret calls.
    secrets_key: Option<crate::secrets::SecretKey>,
    /// The cluster CA and this server's certificate: join tokens, dialing
    /// other servers and agents over mutual TLS.
    trust: Option<Arc<crate::trust::Trust>>,
}

/// How many services and variables the API accepts, as etcd bounds its
/// keyspace (`--quota-backend-bytes`): every spec is copied into every
/// snapshot and every list answer, so the count must be bounded for both
/// to stay small. Checked where a write is proposed; an update of what
/// exists is always accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// `--max-services`.
    pub max_services: usize,
    /// `--max-variables`.
    pub max_variables: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_services: 10_000,
            max_variables: 100_000,
        }
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
            leader_client: Arc::default(),
            server_name,
            limits: Limits::default(),
            secrets_key: None,
            trust: None,
        }
    }

    /// The same API with the cluster's trust (see `crate::trust`).
    pub fn with_trust(mut self, trust: Arc<crate::trust::Trust>) -> Self {
        self.trust = Some(trust);
        self
    }

    fn trust(&self) -> Result<&Arc<crate::trust::Trust>, Status> {
        self.trust
            .as_ref()
            .ok_or_else(|| Status::unavailable("this server holds no cluster CA"))
    }

    /// The same API sealing and opening secrets with `key`.
    pub fn with_secrets_key(mut self, key: Option<crate::secrets::SecretKey>) -> Self {
        self.secrets_key = key;
        self
    }

    /// The same API with other count limits.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Refuses `new` more services when they would pass `--max-services`.
    fn check_service_count(&self, new: usize) -> Result<(), Status> {
        let have = self.consensus.state().services.len();
        let max = self.limits.max_services;
        if new > 0 && have + new > max {
            return Err(Status::resource_exhausted(format!(
                "too many services: the cluster holds {have} and takes at most {max}; remove services (`skiff service rm`) or raise --max-services on every server"
            )));
        }
        Ok(())
    }

    /// The heartbeats this server knows, for the liveness controller.
    pub fn heartbeats(&self) -> Heartbeats {
        self.heartbeats.clone()
    }

    /// Proposes `command` stamped with this server's clock and the caller
    /// of the call being handled (see [`auth::CALLER`]), whose token name
    /// the command's events record.
    async fn propose(&self, command: Command) -> Result<(), Status> {
        let by = auth::current_caller().map(|caller| caller.name);
        self.consensus
            .propose(command.at_by(now_ms(), by))
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

    /// A service as write calls answer it: environment values hidden.
    async fn service_status(&self, name: &str) -> Result<pb::ServiceStatus, Status> {
        self.service_status_shown(name, false).await
    }

    /// A service, with its environment values only when `show_values`.
    async fn service_status_shown(
        &self,
        name: &str,
        show_values: bool,
    ) -> Result<pb::ServiceStatus, Status> {
        self.barrier().await?;
        let state = self.consensus.state();
        let service = state
            .services
            .get(name)
            .ok_or_else(|| status_from(CommandError::ServiceNotFound(name.to_string()).into()))?;
        let mut status = convert::service_to_pb(&state, service);
        if !show_values {
            convert::hide_env_values(&mut status);
        }
        Ok(status)
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

    /// `node` with this server's heartbeat age of it; `own_view`: this
    /// server follows and could not ask the leader, which the answer says.
    fn node_to_pb(
        &self,
        state: &crate::state::State,
        node: &crate::state::Node,
        own_view: bool,
    ) -> pb::Node {
        pb::Node {
            leader_unreachable: own_view,
            ..convert::node_to_pb(state, node, self.heartbeat_age(&node.name))
        }
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
}

pub(crate) fn status_from(err: ProposeError) -> Status {
    match err {
        ProposeError::Rejected(
            CommandError::ServiceNotFound(_) | CommandError::NodeNotFound(_),
        ) => Status::not_found(err.to_string()),
        ProposeError::Rejected(CommandError::ServiceExists(_)) => {
            Status::already_exists(err.to_string())
        }
        ProposeError::Rejected(
            CommandError::Deployment(_)
            | CommandError::NodeReady(_)
            | CommandError::Volume(_)
            | CommandError::Secret(_)
            | CommandError::Token(_),
        ) => Status::failed_precondition(err.to_string()),
        ProposeError::Rejected(CommandError::Invalid(_)) => {
            Status::invalid_argument(err.to_string())
        }
        ProposeError::Membership(_) => Status::failed_precondition(err.to_string()),
        ProposeError::NoLeader | ProposeError::NotLeader(_) | ProposeError::Forward(_) => {
            Status::unavailable(err.to_string())
        }
        ProposeError::Unknown(_) => Status::aborted(err.to_string()),
        ProposeError::Busy(_) => Status::unavailable(err.to_string()),
        ProposeError::NoSpace(_) => Status::resource_exhausted(err.to_string()),
        ProposeError::Stopped => Status::internal(err.to_string()),
    }
}
