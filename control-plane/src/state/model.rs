//! The records the state holds: services, nodes, allocations and servers,
//! with the small enums that describe them.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::{AllocState, Deployment, RuntimeKind, ServiceSpec, VersionRecord};

/// Versions of a service kept in its history (older ones are dropped).
pub const HISTORY_LEN: usize = 20;

/// A service as stored: the spec plus bookkeeping.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    pub spec: ServiceSpec,
    /// Bumped by every change of the spec; 1 at creation.
    pub generation: u64,
    pub create_index: u64,
    pub modify_index: u64,
    /// The version `spec` is: 1 at creation, +1 per update or rollback.
    #[serde(default = "first_version")]
    pub version: u64,
    /// The last version whose rollout succeeded: where an automatic
    /// rollback returns to.
    #[serde(default = "first_version")]
    pub stable_version: u64,
    /// The latest versions, oldest first, at most [`HISTORY_LEN`].
    #[serde(default)]
    pub history: Vec<VersionRecord>,
    /// The latest deployment, active or ended; `None` before any update.
    #[serde(default)]
    pub deployment: Option<Deployment>,
    /// A replica has been placed once: its `depends_on` no longer hold it.
    #[serde(default = "yes")]
    pub started: bool,
    /// `skiff service rebalance` asked to spread the replicas again; set
    /// until the counts per eligible node differ by at most one. While
    /// set, one replica above the desired count may run (the surge of
    /// each move).
    #[serde(default)]
    pub rebalance: bool,
    /// The port the service's image declares, as an agent running its
    /// current version reported it: where discovery by name reaches the
    /// service when its spec names no `--port`. Kept when the service
    /// scales to zero, so connections by name can still be held.
    #[serde(default)]
    pub image_port: Option<u16>,
    /// A job's progress (mode `job`); `None` for services.
    #[serde(default)]
    pub job: Option<super::JobStatus>,
}

fn yes() -> bool {
    true
}

fn first_version() -> u64 {
    1
}

impl Service {
    /// The deployment still rolling out, if any.
    pub fn active_deployment(&self) -> Option<&Deployment> {
        self.deployment.as_ref().filter(|d| d.status.is_active())
    }

    pub fn version_record(&self, version: u64) -> Option<&VersionRecord> {
        self.history.iter().find(|r| r.version == version)
    }

    /// The spec that runs `earlier` again (a rollback): only what runs
    /// comes from it; the replica count and the policies stay the
    /// operator's latest.
    pub(super) fn running_again(&self, earlier: &ServiceSpec) -> ServiceSpec {
        ServiceSpec {
            replicas: self.spec.replicas,
            update: self.spec.update.clone(),
            autoscale: self.spec.autoscale.clone(),
            ..earlier.clone()
        }
    }

    pub(super) fn set_outcome(&mut self, version: u64, outcome: &str, message: &str) {
        if let Some(record) = self.history.iter_mut().find(|r| r.version == version) {
            record.outcome = outcome.to_string();
            record.message = message.to_string();
        }
    }
}

/// Whether a node is alive, as decided by the leader's liveness controller.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeStatus {
    Ready,
    Down,
}

impl NodeStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeStatus::Ready => "ready",
            NodeStatus::Down => "down",
        }
    }
}

/// Whether the operator lets the scheduler use a node (Swarm's
/// availability): independent of whether the node is alive.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Availability {
    #[default]
    Active,
    /// No new replicas; the running ones stay.
    Pause,
    /// No new replicas; the running ones move elsewhere.
    Drain,
}

impl Availability {
    pub fn as_str(self) -> &'static str {
        match self {
            Availability::Active => "active",
            Availability::Pause => "pause",
            Availability::Drain => "drain",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        Some(match value {
            "active" => Availability::Active,
            "pause" => Availability::Pause,
            "drain" => Availability::Drain,
            _ => return None,
        })
    }
}

/// A machine running `skiff agent`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub name: String,
    /// Where the node's replicas are reached (an IP address).
    pub address: String,
    /// Inclusive range of host ports the scheduler may assign on this node.
    pub port_range: (u16, u16),
    pub status: NodeStatus,
    pub register_index: u64,
    /// Schedulable CPU in millicores; 0: not counted.
    #[serde(default)]
    pub cpu_millis: u32,
    /// Schedulable memory in MB; 0: not counted.
    #[serde(default)]
    pub memory_mb: u32,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub availability: Availability,
    /// While draining: when replicas not yet moved are stopped anyway
    /// (milliseconds since the epoch, on the proposer's clock).
    #[serde(default)]
    pub drain_deadline_ms: Option<u64>,
    /// While draining: every replica has left.
    #[serde(default)]
    pub drained: bool,
    /// Pre-pull images its agent reports stored (deployment images).
    #[serde(default)]
    pub images: BTreeSet<String>,
    /// Its agent runs `process` replicas (`--enable-process-runtime`).
    #[serde(default)]
    pub process_runtime: bool,
    /// Where its agent serves `AgentLogs` (`HOST:PORT`): the servers relay
    /// `skiff service logs` and `exec` there. Empty: not known (an agent
    /// that registered before it was recorded).
    #[serde(default)]
    pub agent_address: String,
    /// Published ports its routing proxy cannot listen on, by service.
    #[serde(default)]
    pub port_failures: BTreeMap<String, PortFailure>,
}

/// A published port a node's proxy cannot listen on (another program
/// holds it); the proxy keeps retrying.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortFailure {
    pub port: u16,
    /// The bind error, as the node's operating system gave it.
    pub error: String,
}

impl Node {
    /// The scheduler may place new replicas here.
    pub fn is_eligible(&self) -> bool {
        self.status == NodeStatus::Ready && self.availability == Availability::Active
    }

    /// A replica of `spec` may run here: the node takes new replicas and
    /// meets the spec's constraints.
    pub fn can_run(&self, spec: &ServiceSpec) -> bool {
        self.is_eligible()
            && self.runs(spec.runtime)
            && spec.constraints_hold(&self.labels, &self.name, &self.address)
    }

    /// Its agent runs replicas of `runtime` (the process runtime is opt-in).
    pub fn runs(&self, runtime: RuntimeKind) -> bool {
        runtime != RuntimeKind::Process || self.process_runtime
    }
}

/// What the control plane wants of an allocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DesiredState {
    Run,
    Stop,
}

impl DesiredState {
    pub fn as_str(self) -> &'static str {
        match self {
            DesiredState::Run => "run",
            DesiredState::Stop => "stop",
        }
    }
}

/// One replica of a service placed on one node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    pub id: String,
    pub service: String,
    pub node: String,
    /// The spec this replica runs, copied when it was placed.
    pub spec: ServiceSpec,
    pub host_port: u16,
    pub desired: DesiredState,
    pub state: AllocState,
    pub restarts: u32,
    pub pid: u32,
    pub message: String,
    pub create_index: u64,
    pub modify_index: u64,
    /// The service version it was placed for.
    #[serde(default)]
    pub version: u64,
    /// Proposer time of its placement.
    #[serde(default)]
    pub created_ms: u64,
    /// Proposer time of the report that made it serving; 0 while not.
    #[serde(default)]
    pub serving_since_ms: u64,
    /// Kept out of the routing proxies: a blue-green replica before
    /// promotion.
    #[serde(default)]
    pub held: bool,
    /// The replica's ordinal in its service, kept by its replacements and
    /// updates: the replica in slot `i` owns the per-replica volumes
    /// `NAME-i` (see `state/volumes.rs`).
    #[serde(default)]
    pub slot: u32,
    /// Its agent said it has a health check (the spec's or, when the spec
    /// has none, its image's): then only a healthy replica serves.
    #[serde(default)]
    pub health_checked: bool,
    /// A job's replica that ended: its exit status.
    #[serde(default)]
    pub exit_code: Option<i32>,
}

impl Allocation {
    /// Counts toward the service's replicas: wanted and not known to be dead.
    pub fn is_live(&self) -> bool {
        self.desired == DesiredState::Run
            && self.state != AllocState::Stopped
            && !self.state.is_terminal()
    }

    /// Holds its node's resources and host port: anything not yet stopped,
    /// including a replica asked to stop that is still shutting down.
    pub fn holds_resources(&self) -> bool {
        self.state != AllocState::Stopped && !self.state.is_terminal()
    }

    /// Serves as far as the control plane can tell: healthy, or running
    /// when neither the service nor its image declares a health check (a
    /// Postgres image's `pg_isready` keeps a replica out of the proxies
    /// until the database accepts connections).
    pub fn is_serving(&self) -> bool {
        match self.state {
            AllocState::Healthy => true,
            AllocState::Running => self.spec.health.is_none() && !self.health_checked,
            _ => false,
        }
    }
}

/// A control-plane server (a Raft member).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub id: u64,
    pub name: String,
    pub address: String,
    /// A Raft learner: it receives the log but does not vote, until the
    /// leader promotes it once it has caught up. Absent in snapshots and
    /// entries of servers without learners: they were all voters.
    #[serde(default)]
    pub learner: bool,
}
