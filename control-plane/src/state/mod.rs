//! The replicated state machine: services, nodes, allocations, servers and
//! the ring of recent cluster events.
//!
//! Every change arrives as a [`Command`] committed through Raft and is applied
//! here deterministically, in log order, on every server. Applying carries the
//! Raft index, and a command at or below the last applied index is ignored, so
//! replaying the log after a crash is idempotent. The machine is pure; it
//! is persisted in Raft snapshots.
//! Time never comes from the applying server's clock: events are stamped
//! with the time the proposer put in the entry ([`Command::Timed`]).

mod deployment;
mod stacks;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use serde::{Deserialize, Serialize};

pub use deployment::{Deployment, DeploymentStatus, VersionRecord};
pub use skiff_spec::{
    AllocState, AutoscalePolicy, Constraint, ConstraintOp, HealthCheck, HealthKind, NetworkMode,
    PlacementPolicy, Protocol, RuntimeKind, ServiceMode, ServiceSpec, SpecError, Strategy,
    UpdatePolicy,
};

/// Versions of a service kept in its history (older ones are dropped).
pub const HISTORY_LEN: usize = 20;

/// How many recent events the state keeps (older ones are dropped).
pub const EVENT_RING: usize = 10_000;

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
    fn running_again(&self, earlier: &ServiceSpec) -> ServiceSpec {
        ServiceSpec {
            replicas: self.spec.replicas,
            update: self.spec.update.clone(),
            autoscale: self.spec.autoscale.clone(),
            ..earlier.clone()
        }
    }

    fn set_outcome(&mut self, version: u64, outcome: &str, message: &str) {
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
}

impl Node {
    /// The scheduler may place new replicas here.
    pub fn is_eligible(&self) -> bool {
        self.status == NodeStatus::Ready && self.availability == Availability::Active
    }

    /// A replica of `spec` may run here: the node takes new replicas and
    /// meets the spec's constraints.
    pub fn can_run(&self, spec: &ServiceSpec) -> bool {
        self.is_eligible() && spec.constraints_hold(&self.labels, &self.name, &self.address)
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
}

impl Allocation {
    /// Counts toward the service's replicas: wanted and not known to be dead.
    pub fn is_live(&self) -> bool {
        self.desired == DesiredState::Run && self.state != AllocState::Stopped
    }

    /// Holds its node's resources and host port: anything not yet stopped,
    /// including a replica asked to stop that is still shutting down.
    pub fn holds_resources(&self) -> bool {
        self.state != AllocState::Stopped
    }

    /// Serves as far as the control plane can tell: healthy, or running
    /// when the service declares no health check.
    pub fn is_serving(&self) -> bool {
        match self.state {
            AllocState::Healthy => true,
            AllocState::Running => self.spec.health.is_none(),
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
}

/// A new allocation decided by the scheduler.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    pub id: String,
    pub service: String,
    pub node: String,
    pub host_port: u16,
}

/// A batch of decisions from the controllers, committed as one entry.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub place: Vec<Placement>,
    /// Allocations to stop (desired becomes stop).
    pub stop: Vec<String>,
    /// Stopped allocations to forget.
    pub forget: Vec<String>,
    /// Why allocations of `stop` are stopped, for the events; by id.
    #[serde(default)]
    pub reasons: BTreeMap<String, String>,
    /// Deployment steps decided with the plan.
    #[serde(default)]
    pub deployments: Vec<DeploymentChange>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.place.is_empty()
            && self.stop.is_empty()
            && self.forget.is_empty()
            && self.deployments.is_empty()
    }
}

/// A step of a deployment decided by its controller; ignored on apply
/// unless `version` is still the service's active deployment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploymentChange {
    pub service: String,
    pub version: u64,
    pub step: DeploymentStep,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeploymentStep {
    /// The new replicas are ready; waiting for `skiff service promote`.
    AwaitPromotion,
    /// Promote without waiting (`--auto-promote`).
    Promote,
    Succeed,
    /// Failed with the reason; rolls back when the policy says so.
    Fail(String),
}

/// An allocation status reported by an agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocReport {
    pub id: String,
    pub state: AllocState,
    pub restarts: u32,
    pub pid: u32,
    pub message: String,
}

/// What happened in the cluster, derived from applied commands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EventKind {
    ServiceCreated,
    ServiceUpdated,
    ServiceRemoved,
    ReplicaPlaced,
    ReplicaStarting,
    ReplicaStarted,
    ReplicaHealthy,
    ReplicaUnhealthy,
    ReplicaRestarting,
    ReplicaFailed,
    /// Asked to stop (desired became stop), with the reason.
    ReplicaStopping,
    /// The agent reported it stopped.
    ReplicaStopped,
    NodeUp,
    NodeDown,
    NodePaused,
    NodeActivated,
    NodeDraining,
    NodeDrained,
    DeploymentStarted,
    DeploymentPaused,
    DeploymentResumed,
    DeploymentAwaitingPromotion,
    DeploymentPromoted,
    DeploymentSucceeded,
    DeploymentFailed,
    DeploymentRolledBack,
    ServiceScaled,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::ServiceCreated => "service-created",
            EventKind::ServiceUpdated => "service-updated",
            EventKind::ServiceRemoved => "service-removed",
            EventKind::ReplicaPlaced => "replica-placed",
            EventKind::ReplicaStarting => "replica-starting",
            EventKind::ReplicaStarted => "replica-started",
            EventKind::ReplicaHealthy => "replica-healthy",
            EventKind::ReplicaUnhealthy => "replica-unhealthy",
            EventKind::ReplicaRestarting => "replica-restarting",
            EventKind::ReplicaFailed => "replica-failed",
            EventKind::ReplicaStopping => "replica-stopping",
            EventKind::ReplicaStopped => "replica-stopped",
            EventKind::NodeUp => "node-up",
            EventKind::NodeDown => "node-down",
            EventKind::NodePaused => "node-paused",
            EventKind::NodeActivated => "node-activated",
            EventKind::NodeDraining => "node-draining",
            EventKind::NodeDrained => "node-drained",
            EventKind::DeploymentStarted => "deployment-started",
            EventKind::DeploymentPaused => "deployment-paused",
            EventKind::DeploymentResumed => "deployment-resumed",
            EventKind::DeploymentAwaitingPromotion => "deployment-awaiting-promotion",
            EventKind::DeploymentPromoted => "deployment-promoted",
            EventKind::DeploymentSucceeded => "deployment-succeeded",
            EventKind::DeploymentFailed => "deployment-failed",
            EventKind::DeploymentRolledBack => "deployment-rolled-back",
            EventKind::ServiceScaled => "service-scaled",
        }
    }

    fn for_state(state: AllocState) -> Option<Self> {
        Some(match state {
            AllocState::Pending => return None,
            AllocState::Pulling | AllocState::Starting => EventKind::ReplicaStarting,
            AllocState::Running => EventKind::ReplicaStarted,
            AllocState::Healthy => EventKind::ReplicaHealthy,
            AllocState::Unhealthy => EventKind::ReplicaUnhealthy,
            AllocState::Restarting => EventKind::ReplicaRestarting,
            AllocState::Failed => EventKind::ReplicaFailed,
            AllocState::Stopped => EventKind::ReplicaStopped,
        })
    }
}

/// One committed event. `seq` orders all events; `index` is the Raft
/// index of the command that produced it (several events may share one).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub seq: u64,
    pub index: u64,
    /// Milliseconds since the epoch, from the proposer's clock.
    pub time_ms: u64,
    pub kind: EventKind,
    #[serde(default)]
    pub service: String,
    #[serde(default)]
    pub node: String,
    #[serde(default)]
    pub alloc: String,
    #[serde(default)]
    pub message: String,
}

/// Every change to the state, as committed in the Raft log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    CreateService {
        spec: ServiceSpec,
    },
    ScaleService {
        name: String,
        replicas: u32,
    },
    RemoveService {
        name: String,
    },
    /// A new spec: a new version rolled out by a deployment, or, when it
    /// runs the same as the current one, an in-place change of the replica
    /// count or the policies.
    UpdateService {
        spec: ServiceSpec,
    },
    /// Deploys an earlier version's spec again as a new version; `None`:
    /// the stable version while a deployment is active, else the newest
    /// succeeded version before the current one.
    RollbackService {
        name: String,
        to_version: Option<u64>,
    },
    PromoteDeployment {
        name: String,
    },
    PauseDeployment {
        name: String,
        paused: bool,
    },
    /// The pre-pull images a node's agent has stored (the whole set).
    ReportImages {
        node: String,
        images: BTreeSet<String>,
    },
    /// A scale decision of the autoscaler, with its reason.
    Autoscale {
        name: String,
        replicas: u32,
        reason: String,
    },
    RegisterNode {
        name: String,
        address: String,
        port_range: (u16, u16),
        #[serde(default)]
        cpu_millis: u32,
        #[serde(default)]
        memory_mb: u32,
        #[serde(default)]
        labels: BTreeMap<String, String>,
    },
    /// The liveness controller's verdict. `Down` stops the node's
    /// replicas (they are re-placed elsewhere).
    SetNodeStatus {
        name: String,
        status: NodeStatus,
    },
    /// `skiff node drain|pause|activate`.
    SetNodeAvailability {
        name: String,
        availability: Availability,
        /// For a drain: when remaining replicas are stopped regardless.
        #[serde(default)]
        deadline_ms: Option<u64>,
    },
    ApplyPlan {
        plan: Plan,
    },
    ReportAllocs {
        node: String,
        reports: Vec<AllocReport>,
    },
    UpsertMember {
        member: Member,
    },
    RemoveMember {
        id: u64,
    },
    /// Sets a cluster variable (small operator data, like Nomad's
    /// variables); also what `skiff bench raft` writes.
    PutVariable {
        key: String,
        value: String,
    },
    /// `skiff stack deploy`: the stack's services, all in one step;
    /// refused if the stack changed after `check_index`.
    DeployStack {
        stack: String,
        services: Vec<ServiceSpec>,
        #[serde(default)]
        check_index: Option<u64>,
    },
    /// `skiff stack rm`.
    RemoveStack {
        stack: String,
    },
    /// A command stamped with its proposer's clock. Proposers wrap what
    /// they propose in it so that events carry a time every server agrees
    /// on; a bare command is stamped with the last time seen.
    Timed {
        time_ms: u64,
        command: Box<Command>,
    },
}

impl Command {
    /// `self`, stamped with `time_ms` (milliseconds since the epoch).
    pub fn at(self, time_ms: u64) -> Command {
        Command::Timed {
            time_ms,
            command: Box::new(self),
        }
    }
}

/// Why a command was refused. Deterministic: every server refuses alike.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum CommandError {
    #[error("service \"{0}\" not found")]
    ServiceNotFound(String),
    #[error("service \"{0}\" already exists; use `skiff service scale` or remove it first")]
    ServiceExists(String),
    #[error("node \"{0}\" not found; see `skiff node ls`")]
    NodeNotFound(String),
    /// A deployment command that does not fit the service's state.
    #[error("{0}")]
    Deployment(String),
    #[error(transparent)]
    Invalid(#[from] SpecError),
}

/// What a successful command produced.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Done,
    /// A plan was applied; placements refused at apply time are counted.
    PlanApplied {
        placed: usize,
        rejected: usize,
    },
}

/// [`StateImage`] by reference, for encoding without copying the state.
#[derive(Serialize)]
struct StateImageRef<'a> {
    services: &'a BTreeMap<String, Service>,
    nodes: &'a BTreeMap<String, Node>,
    allocs: &'a BTreeMap<String, Allocation>,
    members: &'a BTreeMap<u64, Member>,
    variables: &'a imbl::OrdMap<String, String>,
    events: &'a VecDeque<Event>,
    applied_index: u64,
}

/// The serialized form of [`State`] carried by Raft snapshots.
#[derive(Default, Serialize, Deserialize)]
struct StateImage {
    services: BTreeMap<String, Service>,
    nodes: BTreeMap<String, Node>,
    allocs: BTreeMap<String, Allocation>,
    members: BTreeMap<u64, Member>,
    #[serde(default)]
    variables: BTreeMap<String, String>,
    #[serde(default)]
    events: VecDeque<Event>,
    applied_index: u64,
}

/// Lookups derived from `allocs`, rebuilt on load; never persisted.
#[derive(Clone, Debug, Default)]
struct AllocIndex {
    by_node: HashMap<String, BTreeSet<String>>,
    by_service: HashMap<String, BTreeSet<String>>,
    /// Raft index of the last change to any allocation of each node, so
    /// the agent streams resend only when something of theirs changed.
    node_changed: HashMap<String, u64>,
}

impl AllocIndex {
    fn insert(&mut self, alloc: &Allocation) {
        self.by_node
            .entry(alloc.node.clone())
            .or_default()
            .insert(alloc.id.clone());
        self.by_service
            .entry(alloc.service.clone())
            .or_default()
            .insert(alloc.id.clone());
    }

    fn remove(&mut self, alloc: &Allocation) {
        for (map, key) in [
            (&mut self.by_node, &alloc.node),
            (&mut self.by_service, &alloc.service),
        ] {
            if let Some(ids) = map.get_mut(key) {
                ids.remove(&alloc.id);
                if ids.is_empty() {
                    map.remove(key);
                }
            }
        }
    }
}

/// The applied state. Cloned as a snapshot by readers and controllers.
#[derive(Clone, Debug, Default)]
pub struct State {
    pub services: BTreeMap<String, Service>,
    pub nodes: BTreeMap<String, Node>,
    pub allocs: BTreeMap<String, Allocation>,
    pub members: BTreeMap<u64, Member>,
    /// A persistent map: cloning the state for a snapshot is O(1) in it,
    /// so the consensus thread never stalls copying a large map.
    pub variables: imbl::OrdMap<String, String>,
    /// The most recent events, oldest first, at most [`EVENT_RING`].
    pub events: VecDeque<Event>,
    /// Raft index of the last applied entry.
    pub applied_index: u64,
    /// The last proposer time seen; stamps events of untimed commands.
    clock_ms: u64,
    index: AllocIndex,
}

/// Per-node usage while one plan is checked on apply.
#[derive(Default)]
struct NodeUsage {
    cpu: u64,
    memory: u64,
    ports: BTreeSet<u16>,
    live: HashMap<String, u32>,
}

impl State {
    /// Applies one committed command at `index`. Entries at or below the
    /// applied index were applied before (a replay) and change nothing.
    pub fn apply(&mut self, index: u64, command: Command) -> Result<Outcome, CommandError> {
        if index <= self.applied_index {
            return Ok(Outcome::Done);
        }
        self.applied_index = index;
        let outcome = self.apply_command(index, command);
        self.check_drains(index);
        outcome
    }

    fn apply_command(&mut self, index: u64, command: Command) -> Result<Outcome, CommandError> {
        match command {
            Command::Timed { time_ms, command } => {
                self.clock_ms = self.clock_ms.max(time_ms);
                self.apply_command(index, *command)
            }
            Command::CreateService { spec } => self.create_service(index, spec),
            Command::ScaleService { name, replicas } => self.scale_service(index, &name, replicas),
            Command::RemoveService { name } => self.remove_service(index, &name),
            Command::UpdateService { spec } => self.update_service(index, spec, None),
            Command::DeployStack {
                stack,
                services,
                check_index,
            } => self.deploy_stack(index, &stack, services, check_index),
            Command::RemoveStack { stack } => self.remove_stack(index, &stack),
            Command::RollbackService { name, to_version } => {
                self.rollback_service(index, &name, to_version)
            }
            Command::PromoteDeployment { name } => self.promote(index, &name),
            Command::ReportImages { node, images } => {
                if let Some(n) = self.nodes.get_mut(&node) {
                    n.images = images;
                }
                Ok(Outcome::Done)
            }
            Command::PauseDeployment { name, paused } => self.pause(index, &name, paused),
            Command::Autoscale {
                name,
                replicas,
                reason,
            } => self.autoscale(index, &name, replicas, &reason),
            Command::RegisterNode {
                name,
                address,
                port_range,
                cpu_millis,
                memory_mb,
                labels,
            } => {
                let previous = self.nodes.get(&name);
                let came_up = previous.is_none_or(|n| n.status != NodeStatus::Ready);
                let node = Node {
                    name: name.clone(),
                    address,
                    port_range,
                    status: NodeStatus::Ready,
                    register_index: previous.map_or(index, |n| n.register_index),
                    cpu_millis,
                    memory_mb,
                    labels,
                    availability: previous.map_or(Availability::Active, |n| n.availability),
                    drain_deadline_ms: previous.and_then(|n| n.drain_deadline_ms),
                    drained: previous.is_some_and(|n| n.drained),
                    images: previous.map(|n| n.images.clone()).unwrap_or_default(),
                };
                if previous != Some(&node) {
                    self.nodes.insert(name.clone(), node);
                }
                if came_up {
                    self.event(index, EventKind::NodeUp, "", &name, "", "registered");
                }
                Ok(Outcome::Done)
            }
            Command::SetNodeStatus { name, status } => self.set_node_status(index, &name, status),
            Command::SetNodeAvailability {
                name,
                availability,
                deadline_ms,
            } => self.set_node_availability(index, &name, availability, deadline_ms),
            Command::ApplyPlan { plan } => Ok(self.apply_plan(index, plan)),
            Command::ReportAllocs { node, reports } => {
                self.report_allocs(index, &node, reports);
                Ok(Outcome::Done)
            }
            Command::PutVariable { key, value } => {
                self.variables.insert(key, value);
                Ok(Outcome::Done)
            }
            Command::RemoveMember { id } => {
                self.members.remove(&id);
                Ok(Outcome::Done)
            }
            Command::UpsertMember { member } => {
                self.members.insert(member.id, member);
                Ok(Outcome::Done)
            }
        }
    }

    /// Marks that an entry at `index` was applied without a command (Raft's
    /// empty entries and configuration changes).
    pub fn skip(&mut self, index: u64) {
        self.applied_index = self.applied_index.max(index);
    }

    /// Encodes the whole state for a Raft snapshot (by reference: the
    /// state is not copied).
    pub fn to_image(&self) -> Vec<u8> {
        let image = StateImageRef {
            services: &self.services,
            nodes: &self.nodes,
            allocs: &self.allocs,
            members: &self.members,
            variables: &self.variables,
            events: &self.events,
            applied_index: self.applied_index,
        };
        serde_json::to_vec(&image).expect("state always serializes")
    }

    /// Decodes a snapshot image; every record counts as changed so the
    /// storage layer rewrites them all.
    pub fn from_image(bytes: &[u8]) -> Result<State, serde_json::Error> {
        let image: StateImage = if bytes.is_empty() {
            StateImage::default()
        } else {
            serde_json::from_slice(bytes)?
        };
        let mut state = State {
            services: image.services,
            nodes: image.nodes,
            allocs: image.allocs,
            members: image.members,
            variables: image.variables.into_iter().collect(),
            events: image.events,
            applied_index: image.applied_index,
            ..State::default()
        };
        state.rebuild_indexes();
        Ok(state)
    }

    /// Recomputes what is derived from the records (after loading them).
    fn rebuild_indexes(&mut self) {
        self.index = AllocIndex::default();
        for alloc in self.allocs.values() {
            self.index.insert(alloc);
            self.index
                .node_changed
                .insert(alloc.node.clone(), self.applied_index);
        }
        self.clock_ms = self.events.iter().map(|e| e.time_ms).max().unwrap_or(0);
    }

    /// Whether two states hold the same records (ignoring derived indexes).
    pub fn same_records(&self, other: &State) -> bool {
        self.services == other.services
            && self.nodes == other.nodes
            && self.allocs == other.allocs
            && self.members == other.members
            && self.variables == other.variables
            && self.events == other.events
    }

    /// The event with sequence number `seq`, if still in the ring.
    pub fn event_by_seq(&self, seq: u64) -> Option<&Event> {
        let first = self.events.front()?.seq;
        let event = self
            .events
            .get(usize::try_from(seq.checked_sub(first)?).ok()?)?;
        (event.seq == seq).then_some(event)
    }

    /// Events after sequence number `after`, oldest first.
    pub fn events_after(&self, after: u64) -> impl Iterator<Item = &Event> {
        let skip = match self.events.front() {
            Some(first) if after >= first.seq => (after - first.seq + 1) as usize,
            _ => 0,
        };
        self.events.iter().skip(skip)
    }

    /// Live allocations of a service, by id.
    pub fn live_allocs<'a>(&'a self, service: &'a str) -> impl Iterator<Item = &'a Allocation> {
        self.allocs_of(service).filter(|a| a.is_live())
    }

    /// Every allocation of a service, by id.
    pub fn allocs_of<'a>(&'a self, service: &'a str) -> impl Iterator<Item = &'a Allocation> {
        self.index
            .by_service
            .get(service)
            .into_iter()
            .flatten()
            .filter_map(|id| self.allocs.get(id))
    }

    /// Names of the services that have allocations (in no order).
    pub fn services_with_allocs(&self) -> impl Iterator<Item = &str> {
        self.index.by_service.keys().map(String::as_str)
    }

    /// Every allocation placed on a node, by id.
    pub fn allocs_on<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Allocation> {
        self.index
            .by_node
            .get(node)
            .into_iter()
            .flatten()
            .filter_map(|id| self.allocs.get(id))
    }

    /// Raft index of the last change to the node's allocations (0: none).
    pub fn node_changed_index(&self, node: &str) -> u64 {
        self.index.node_changed.get(node).copied().unwrap_or(0)
    }

    fn event(
        &mut self,
        index: u64,
        kind: EventKind,
        service: &str,
        node: &str,
        alloc: &str,
        message: &str,
    ) {
        let seq = self.events.back().map_or(1, |e| e.seq + 1);
        self.events.push_back(Event {
            seq,
            index,
            time_ms: self.clock_ms,
            kind,
            service: service.to_string(),
            node: node.to_string(),
            alloc: alloc.to_string(),
            message: message.to_string(),
        });
        while self.events.len() > EVENT_RING {
            self.events.pop_front();
        }
    }

    fn create_service(&mut self, index: u64, spec: ServiceSpec) -> Result<Outcome, CommandError> {
        spec.validate()?;
        if self.services.contains_key(&spec.name) {
            return Err(CommandError::ServiceExists(spec.name));
        }
        let name = spec.name.clone();
        let message = match spec.mode {
            ServiceMode::Global => "global".to_string(),
            ServiceMode::Replicated => format!("{} replicas", spec.replicas),
        };
        let record = VersionRecord {
            version: 1,
            spec: spec.clone(),
            created_ms: self.clock_ms,
            outcome: "succeeded".to_string(),
            message: "created".to_string(),
        };
        self.services.insert(
            name.clone(),
            Service {
                spec,
                generation: 1,
                create_index: index,
                modify_index: index,
                version: 1,
                stable_version: 1,
                history: vec![record],
                deployment: None,
                started: false,
            },
        );
        self.event(index, EventKind::ServiceCreated, &name, "", "", &message);
        Ok(Outcome::Done)
    }

    fn scale_service(
        &mut self,
        index: u64,
        name: &str,
        replicas: u32,
    ) -> Result<Outcome, CommandError> {
        skiff_spec::validate_replicas(i64::from(replicas))?;
        let service = self
            .services
            .get_mut(name)
            .ok_or_else(|| CommandError::ServiceNotFound(name.to_string()))?;
        if let Some(policy) = &service.spec.autoscale {
            return Err(CommandError::Deployment(format!(
                "service \"{name}\" is autoscaled between {} and {} replicas; change the bounds with `skiff service update {name} --autoscale-min N --autoscale-max M`",
                policy.min, policy.max
            )));
        }
        if service.spec.replicas != replicas {
            let from = service.spec.replicas;
            service.spec.replicas = replicas;
            service.generation += 1;
            service.modify_index = index;
            let message = format!("scaled from {from} to {replicas} replicas");
            self.event(index, EventKind::ServiceUpdated, name, "", "", &message);
        }
        Ok(Outcome::Done)
    }

    /// A new spec for an existing service. When its replicas would run the
    /// same as now, the spec changes in place (a scale or policy change,
    /// like Kubernetes, which makes no new revision for those); otherwise
    /// it becomes a new version rolled out by a new deployment, which
    /// supersedes any deployment still active. A rollback (`Some`, with
    /// the failed version for an automatic one, else 0) is always rolled out
    /// as a rolling update without gates: returning to a known version must
    /// not wait for a promotion.
    fn update_service(
        &mut self,
        index: u64,
        spec: ServiceSpec,
        rollback: Option<u64>,
    ) -> Result<Outcome, CommandError> {
        let rollback_of = rollback.unwrap_or(0);
        spec.validate()?;
        let now = self.clock_ms;
        let name = spec.name.clone();
        let service = self
            .services
            .get_mut(&name)
            .ok_or_else(|| CommandError::ServiceNotFound(name.clone()))?;
        if service.spec.mode != spec.mode {
            return Err(CommandError::Invalid(SpecError::new(
                "mode",
                "a service cannot change between replicated and global; remove it and create it again",
            )));
        }
        if service.spec == spec {
            return Ok(Outcome::Done);
        }
        service.generation += 1;
        service.modify_index = index;
        if service.spec.runs_same(&spec) {
            let diff = skiff_spec::spec_diff(&service.spec, &spec).join("; ");
            service.spec = spec;
            self.event(index, EventKind::ServiceUpdated, &name, "", "", &diff);
            return Ok(Outcome::Done);
        }
        let from_version = service.stable_version;
        if let Some(active) = service.deployment.as_mut().filter(|d| d.status.is_active()) {
            let version = active.version;
            active.status = DeploymentStatus::Superseded;
            active.ended_ms = now;
            active.message = format!("superseded by version {}", service.version + 1);
            let message = active.message.clone();
            service.set_outcome(version, "superseded", &message);
        }
        service.version += 1;
        let version = service.version;
        let mut policy = spec.update.clone();
        if rollback.is_some() {
            policy.strategy = Strategy::Rolling;
            policy.max_error_rate = None;
        }
        let diff = skiff_spec::spec_diff(&service.spec, &spec);
        service.history.push(VersionRecord {
            version,
            spec: spec.clone(),
            created_ms: now,
            outcome: "running".to_string(),
            message: if rollback_of > 0 {
                format!("automatic rollback of version {rollback_of}")
            } else {
                String::new()
            },
        });
        if service.history.len() > HISTORY_LEN {
            service.history.remove(0);
        }
        service.spec = spec;
        service.deployment = Some(Deployment {
            version,
            from_version,
            status: DeploymentStatus::Running,
            message: "starting".to_string(),
            promoted: false,
            started_ms: now,
            progress_since_ms: now,
            ended_ms: 0,
            rollback_of,
            policy: policy.clone(),
        });
        let message = format!(
            "version {version} ({}; from version {from_version}): {}",
            policy.strategy.as_str(),
            diff.join("; ")
        );
        self.event(index, EventKind::DeploymentStarted, &name, "", "", &message);
        // Wake every node's agent stream: the pre-pull list changed.
        let nodes: Vec<String> = self.nodes.keys().cloned().collect();
        for node in nodes {
            self.index.node_changed.insert(node, index);
        }
        Ok(Outcome::Done)
    }

    fn rollback_service(
        &mut self,
        index: u64,
        name: &str,
        to_version: Option<u64>,
    ) -> Result<Outcome, CommandError> {
        let service = self
            .services
            .get(name)
            .ok_or_else(|| CommandError::ServiceNotFound(name.to_string()))?;
        let target = match to_version {
            Some(v) => v,
            None if service.active_deployment().is_some() => service.stable_version,
            None => service
                .history
                .iter()
                .rev()
                .find(|r| r.version < service.version && r.outcome == "succeeded")
                .map(|r| r.version)
                .ok_or_else(|| {
                    CommandError::Deployment(format!(
                        "service \"{name}\" has no earlier succeeded version to roll back to; see `skiff service history {name}`"
                    ))
                })?,
        };
        let record = service.version_record(target).ok_or_else(|| {
            let known: Vec<String> = service
                .history
                .iter()
                .map(|r| r.version.to_string())
                .collect();
            CommandError::Deployment(format!(
                "unknown version {target} of service \"{name}\"; known versions: {}",
                known.join(", ")
            ))
        })?;
        let spec = service.running_again(&record.spec);
        if spec.runs_same(&service.spec) {
            return Err(CommandError::Deployment(format!(
                "version {target} runs the same as the current version {}; nothing to roll back",
                service.version
            )));
        }
        let rolled_back = service.active_deployment().map(|d| d.version);
        self.update_service(index, spec, Some(0))?;
        let service = self.services.get_mut(name).expect("updated above");
        let new_version = service.version;
        if let Some(version) = rolled_back {
            let message = format!("rolled back to version {target} by the operator");
            service.set_outcome(version, "rolled-back", &message);
        }
        if let Some(deployment) = service.deployment.as_mut() {
            deployment.message = format!("rollback to version {target}");
        }
        if let Some(record) = service
            .history
            .iter_mut()
            .find(|r| r.version == new_version)
        {
            record.message = format!("rollback to version {target}");
        }
        let message = format!("version {new_version} rolls back to version {target}");
        self.event(
            index,
            EventKind::DeploymentRolledBack,
            name,
            "",
            "",
            &message,
        );
        Ok(Outcome::Done)
    }

    /// Promotes a blue-green or canary deployment. Blue-green: the green
    /// replicas join the routing proxies and every blue one is stopped in
    /// this same entry, so proxies flip in one committed step (blue ones
    /// drain before their SIGTERM). Canary: the rollout continues.
    fn promote(&mut self, index: u64, name: &str) -> Result<Outcome, CommandError> {
        let now = self.clock_ms;
        let service = self
            .services
            .get(name)
            .ok_or_else(|| CommandError::ServiceNotFound(name.to_string()))?;
        let Some(deployment) = service.active_deployment() else {
            return Err(CommandError::Deployment(format!(
                "service \"{name}\" has no deployment in progress; start one with `skiff service update`"
            )));
        };
        if deployment.policy.strategy == Strategy::Rolling {
            return Err(CommandError::Deployment(format!(
                "the deployment of \"{name}\" is a rolling update, which needs no promotion"
            )));
        }
        if deployment.promoted {
            return Ok(Outcome::Done);
        }
        let version = deployment.version;
        let blue_green = deployment.policy.strategy == Strategy::BlueGreen;
        if blue_green {
            let spec = service.spec.clone();
            let desired = spec.replicas as usize;
            let ready = self
                .live_allocs(name)
                .filter(|a| a.spec.runs_same(&spec) && a.is_serving())
                .count();
            if ready < desired {
                return Err(CommandError::Deployment(format!(
                    "only {ready} of {desired} green replicas serve; promote once all are healthy (see `skiff service ps {name}`)"
                )));
            }
            let (green, blue): (Vec<&Allocation>, Vec<&Allocation>) = self
                .live_allocs(name)
                .partition(|a| a.spec.runs_same(&spec));
            let green: Vec<String> = green.iter().map(|a| a.id.clone()).collect();
            let blue: Vec<String> = blue.iter().map(|a| a.id.clone()).collect();
            for id in green {
                if let Some(alloc) = self.allocs.get_mut(&id) {
                    alloc.held = false;
                    alloc.modify_index = index;
                    self.index.node_changed.insert(alloc.node.clone(), index);
                }
            }
            for id in blue {
                self.stop_alloc(index, &id, "blue-green promoted");
            }
        }
        let service = self.services.get_mut(name).expect("checked above");
        if let Some(deployment) = service.deployment.as_mut() {
            deployment.promoted = true;
            deployment.status = DeploymentStatus::Running;
            deployment.progress_since_ms = now;
            deployment.message = "promoted".to_string();
        }
        let message = format!("version {version} promoted");
        self.event(index, EventKind::DeploymentPromoted, name, "", "", &message);
        Ok(Outcome::Done)
    }

    fn pause(&mut self, index: u64, name: &str, paused: bool) -> Result<Outcome, CommandError> {
        let now = self.clock_ms;
        let service = self
            .services
            .get_mut(name)
            .ok_or_else(|| CommandError::ServiceNotFound(name.to_string()))?;
        let Some(deployment) = service.deployment.as_mut().filter(|d| d.status.is_active()) else {
            return Err(CommandError::Deployment(format!(
                "service \"{name}\" has no deployment in progress to {}",
                if paused { "pause" } else { "resume" }
            )));
        };
        let kind = match (paused, deployment.status) {
            (true, DeploymentStatus::Paused) | (false, DeploymentStatus::Running) => {
                return Ok(Outcome::Done)
            }
            (false, DeploymentStatus::AwaitingPromotion) => return Ok(Outcome::Done),
            (true, _) => {
                deployment.status = DeploymentStatus::Paused;
                EventKind::DeploymentPaused
            }
            (false, _) => {
                deployment.status = DeploymentStatus::Running;
                deployment.progress_since_ms = now;
                EventKind::DeploymentResumed
            }
        };
        let message = format!("version {}", deployment.version);
        self.event(index, kind, name, "", "", &message);
        Ok(Outcome::Done)
    }

    fn autoscale(
        &mut self,
        index: u64,
        name: &str,
        replicas: u32,
        reason: &str,
    ) -> Result<Outcome, CommandError> {
        let service = self
            .services
            .get_mut(name)
            .ok_or_else(|| CommandError::ServiceNotFound(name.to_string()))?;
        let Some(policy) = &service.spec.autoscale else {
            return Ok(Outcome::Done);
        };
        let replicas = replicas.clamp(policy.min, policy.max);
        if service.spec.replicas == replicas {
            return Ok(Outcome::Done);
        }
        let from = service.spec.replicas;
        service.spec.replicas = replicas;
        service.generation += 1;
        service.modify_index = index;
        let message = format!("{from} -> {replicas} replicas: {reason}");
        self.event(index, EventKind::ServiceScaled, name, "", "", &message);
        Ok(Outcome::Done)
    }

    /// Applies the deployment steps of a plan.
    fn apply_deployment_change(&mut self, index: u64, change: DeploymentChange) {
        let now = self.clock_ms;
        let name = change.service.as_str();
        let Some(service) = self.services.get_mut(name) else {
            return;
        };
        let Some(deployment) = service
            .deployment
            .as_mut()
            .filter(|d| d.status.is_active() && d.version == change.version)
        else {
            return;
        };
        let version = deployment.version;
        match change.step {
            DeploymentStep::AwaitPromotion => {
                if deployment.status != DeploymentStatus::Running || deployment.promoted {
                    return;
                }
                deployment.status = DeploymentStatus::AwaitingPromotion;
                deployment.message = format!("waiting for `skiff service promote {name}`");
                let message = format!("version {version}");
                self.event(
                    index,
                    EventKind::DeploymentAwaitingPromotion,
                    name,
                    "",
                    "",
                    &message,
                );
            }
            DeploymentStep::Promote => {
                let _ = self.promote(index, name);
            }
            DeploymentStep::Succeed => {
                deployment.status = DeploymentStatus::Succeeded;
                deployment.ended_ms = now;
                deployment.message = "all replicas updated".to_string();
                let rollback_of = deployment.rollback_of;
                service.stable_version = version;
                let outcome_message = if rollback_of > 0 {
                    format!("rolled back from version {rollback_of}")
                } else {
                    service
                        .version_record(version)
                        .map(|r| r.message.clone())
                        .unwrap_or_default()
                };
                service.set_outcome(version, "succeeded", &outcome_message);
                let message = format!("version {version}");
                self.event(
                    index,
                    EventKind::DeploymentSucceeded,
                    name,
                    "",
                    "",
                    &message,
                );
            }
            DeploymentStep::Fail(reason) => {
                deployment.status = DeploymentStatus::Failed;
                deployment.ended_ms = now;
                deployment.message = reason.clone();
                let auto_rollback = deployment.policy.auto_rollback;
                let stable = service.stable_version;
                let rollback = service
                    .version_record(stable)
                    .filter(|_| auto_rollback && stable != version)
                    .map(|r| service.running_again(&r.spec));
                let outcome = match rollback {
                    Some(_) => format!("{reason}; rolled back to version {stable}"),
                    None => reason.clone(),
                };
                service.set_outcome(version, "failed", &outcome);
                let message = format!("version {version}: {reason}");
                self.event(index, EventKind::DeploymentFailed, name, "", "", &message);
                if let Some(spec) = rollback {
                    if self.update_service(index, spec, Some(version)).is_ok() {
                        let message = format!("version {version} failed; back to version {stable}");
                        self.event(
                            index,
                            EventKind::DeploymentRolledBack,
                            name,
                            "",
                            "",
                            &message,
                        );
                    }
                }
            }
        }
    }

    /// Forgets the service and asks for all its replicas to stop; the
    /// allocations stay until their agent reports them stopped.
    fn remove_service(&mut self, index: u64, name: &str) -> Result<Outcome, CommandError> {
        let Some(removed) = self.services.remove(name) else {
            return Err(CommandError::ServiceNotFound(name.to_string()));
        };
        let message = removed
            .spec
            .labels
            .get(skiff_spec::STACK_LABEL)
            .map(|stack| stacks::removal_message(stack))
            .unwrap_or_default();
        self.event(index, EventKind::ServiceRemoved, name, "", "", &message);
        let ids: Vec<String> = self.allocs_of(name).map(|a| a.id.clone()).collect();
        for id in ids {
            self.stop_alloc(index, &id, "service removed");
        }
        Ok(Outcome::Done)
    }

    fn set_node_status(
        &mut self,
        index: u64,
        name: &str,
        status: NodeStatus,
    ) -> Result<Outcome, CommandError> {
        let node = self
            .nodes
            .get_mut(name)
            .ok_or_else(|| CommandError::NodeNotFound(name.to_string()))?;
        if node.status == status {
            return Ok(Outcome::Done);
        }
        node.status = status;
        match status {
            NodeStatus::Ready => {
                self.event(index, EventKind::NodeUp, "", name, "", "heartbeats resumed");
            }
            NodeStatus::Down => {
                self.event(
                    index,
                    EventKind::NodeDown,
                    "",
                    name,
                    "",
                    "missed heartbeats",
                );
                let ids: Vec<String> = self
                    .allocs_on(name)
                    .filter(|a| a.desired == DesiredState::Run)
                    .map(|a| a.id.clone())
                    .collect();
                let reason = format!("node {name} down");
                for id in ids {
                    self.stop_alloc(index, &id, &reason);
                }
            }
        }
        Ok(Outcome::Done)
    }

    fn set_node_availability(
        &mut self,
        index: u64,
        name: &str,
        availability: Availability,
        deadline_ms: Option<u64>,
    ) -> Result<Outcome, CommandError> {
        let node = self
            .nodes
            .get_mut(name)
            .ok_or_else(|| CommandError::NodeNotFound(name.to_string()))?;
        let changed = node.availability != availability
            || (availability == Availability::Drain && node.drain_deadline_ms != deadline_ms);
        if !changed {
            return Ok(Outcome::Done);
        }
        node.availability = availability;
        node.drain_deadline_ms = deadline_ms.filter(|_| availability == Availability::Drain);
        node.drained = false;
        let (kind, message) = match availability {
            Availability::Active => (EventKind::NodeActivated, String::new()),
            Availability::Pause => (EventKind::NodePaused, String::new()),
            Availability::Drain => (
                EventKind::NodeDraining,
                deadline_ms.map_or_else(String::new, |d| format!("deadline {d} ms")),
            ),
        };
        self.event(index, kind, "", name, "", &message);
        Ok(Outcome::Done)
    }

    /// Marks draining nodes drained once nothing of theirs runs any more.
    fn check_drains(&mut self, index: u64) {
        let done: Vec<String> = self
            .nodes
            .values()
            .filter(|n| n.availability == Availability::Drain && !n.drained)
            .filter(|n| self.allocs_on(&n.name).all(|a| !a.holds_resources()))
            .map(|n| n.name.clone())
            .collect();
        for name in done {
            if let Some(node) = self.nodes.get_mut(&name) {
                node.drained = true;
                self.event(index, EventKind::NodeDrained, "", &name, "", "");
            }
        }
    }

    /// What a node has committed to allocations that still hold resources.
    fn usage_of(&self, node: &str) -> NodeUsage {
        let mut usage = NodeUsage::default();
        for alloc in self.allocs_on(node) {
            usage.ports.insert(alloc.host_port);
            if alloc.holds_resources() {
                usage.cpu += u64::from(alloc.spec.cpu_millis.unwrap_or(0));
                usage.memory += u64::from(alloc.spec.memory_mb.unwrap_or(0));
            }
            if alloc.is_live() {
                *usage.live.entry(alloc.service.clone()).or_default() += 1;
            }
        }
        usage
    }

    /// The images a node should pull ahead: those of deployments in
    /// progress whose service may run there (eligible and within its
    /// constraints).
    pub fn prepull_images(&self, node: &str) -> Vec<String> {
        let Some(node) = self.nodes.get(node) else {
            return Vec::new();
        };
        let mut images: Vec<String> = self
            .services
            .values()
            .filter(|s| s.active_deployment().is_some())
            .filter(|s| node.can_run(&s.spec))
            .filter_map(|s| s.spec.image.clone())
            .collect();
        images.sort();
        images.dedup();
        images
    }

    /// Whether every node that may run `service` has its image stored (or
    /// it runs no image).
    pub fn image_prepulled(&self, service: &str) -> bool {
        let Some(spec) = self.services.get(service).map(|s| &s.spec) else {
            return true;
        };
        let Some(image) = &spec.image else {
            return true;
        };
        self.nodes
            .values()
            .filter(|n| n.status == NodeStatus::Ready && n.can_run(spec))
            .all(|n| n.images.contains(image))
    }

    /// Live replicas of the service's current version that count toward
    /// its desired count (not on a draining node): what placements may
    /// add to. Replicas of older versions are replaced by a deployment and
    /// do not count.
    pub fn counted_current(&self, service: &str) -> usize {
        let Some(spec) = self.services.get(service).map(|s| &s.spec) else {
            return 0;
        };
        self.live_allocs(service)
            .filter(|a| a.spec.runs_same(spec))
            .filter(|a| {
                self.nodes
                    .get(&a.node)
                    .is_none_or(|n| n.availability != Availability::Drain)
            })
            .count()
    }

    /// Live replicas of a service that count toward its desired count:
    /// those not on a draining node (which are being replaced).
    pub fn counted_replicas(&self, service: &str) -> usize {
        self.live_allocs(service)
            .filter(|a| {
                self.nodes
                    .get(&a.node)
                    .is_none_or(|n| n.availability != Availability::Drain)
            })
            .count()
    }

    /// Applies a plan after re-checking every placement against the current
    /// state, like Nomad's plan applier: the service must still exist and
    /// want more replicas, the node must be eligible, satisfy the
    /// constraints and max-per-node, have the CPU, memory and host port
    /// free. Plans are computed on a snapshot that may be stale by the time
    /// they commit, so two plans can never overcommit a node.
    fn apply_plan(&mut self, index: u64, plan: Plan) -> Outcome {
        let mut placed = 0;
        let mut rejected = 0;
        for id in &plan.stop {
            let reason = plan.reasons.get(id).map_or("", String::as_str);
            self.stop_alloc(index, id, reason);
        }
        for id in &plan.forget {
            let forgettable = self
                .allocs
                .get(id)
                .is_some_and(|a| a.desired == DesiredState::Stop && a.state == AllocState::Stopped);
            if forgettable {
                if let Some(alloc) = self.allocs.remove(id) {
                    self.index.remove(&alloc);
                    self.index.node_changed.insert(alloc.node.clone(), index);
                }
            }
        }
        for change in plan.deployments {
            self.apply_deployment_change(index, change);
        }
        let mut usage: HashMap<String, NodeUsage> = HashMap::new();
        let mut counted: HashMap<String, usize> = HashMap::new();
        for placement in plan.place {
            let Some(service) = self.services.get(&placement.service) else {
                rejected += 1;
                continue;
            };
            let spec = &service.spec;
            let Some(node) = self.nodes.get(&placement.node) else {
                rejected += 1;
                continue;
            };
            let fits_node = node.is_eligible()
                && spec
                    .constraints
                    .iter()
                    .all(|c| c.holds(&node.labels, &node.name, &node.address))
                && (node.port_range.0..=node.port_range.1).contains(&placement.host_port);
            if !fits_node || self.allocs.contains_key(&placement.id) {
                rejected += 1;
                continue;
            }
            let used = usage
                .entry(placement.node.clone())
                .or_insert_with(|| self.usage_of(&placement.node));
            let cpu = u64::from(spec.cpu_millis.unwrap_or(0));
            let memory = u64::from(spec.memory_mb.unwrap_or(0));
            let on_node = used.live.get(&placement.service).copied().unwrap_or(0);
            let fits_resources = (node.cpu_millis == 0
                || used.cpu + cpu <= u64::from(node.cpu_millis))
                && (node.memory_mb == 0 || used.memory + memory <= u64::from(node.memory_mb))
                && !used.ports.contains(&placement.host_port)
                && spec.max_per_node.is_none_or(|max| on_node < max);
            let wanted = match spec.mode {
                ServiceMode::Global => on_node == 0,
                ServiceMode::Replicated => {
                    let count = counted
                        .entry(placement.service.clone())
                        .or_insert_with(|| self.counted_current(&placement.service));
                    *count < spec.replicas as usize
                }
            };
            let held = !service.started && self.dependencies_ready(&service.spec).is_err();
            if !fits_resources || !wanted || held {
                rejected += 1;
                continue;
            }
            used.cpu += cpu;
            used.memory += memory;
            used.ports.insert(placement.host_port);
            *used.live.entry(placement.service.clone()).or_default() += 1;
            if let Some(count) = counted.get_mut(&placement.service) {
                *count += 1;
            }
            let alloc = Allocation {
                id: placement.id.clone(),
                service: placement.service.clone(),
                node: placement.node.clone(),
                spec: spec.clone(),
                host_port: placement.host_port,
                desired: DesiredState::Run,
                state: AllocState::Pending,
                restarts: 0,
                pid: 0,
                message: String::new(),
                create_index: index,
                modify_index: index,
                version: service.version,
                created_ms: self.clock_ms,
                serving_since_ms: 0,
                held: service
                    .active_deployment()
                    .is_some_and(|d| d.policy.strategy == Strategy::BlueGreen && !d.promoted),
            };
            self.index.insert(&alloc);
            self.index.node_changed.insert(alloc.node.clone(), index);
            self.allocs.insert(alloc.id.clone(), alloc);
            if let Some(service) = self.services.get_mut(&placement.service) {
                service.started = true;
            }
            let message = format!("port {}", placement.host_port);
            self.event(
                index,
                EventKind::ReplicaPlaced,
                &placement.service,
                &placement.node,
                &placement.id,
                &message,
            );
            placed += 1;
        }
        Outcome::PlanApplied { placed, rejected }
    }

    fn stop_alloc(&mut self, index: u64, id: &str, reason: &str) {
        let Some(alloc) = self.allocs.get_mut(id) else {
            return;
        };
        if alloc.desired == DesiredState::Stop {
            return;
        }
        alloc.desired = DesiredState::Stop;
        alloc.modify_index = index;
        let (service, node) = (alloc.service.clone(), alloc.node.clone());
        self.index.node_changed.insert(node.clone(), index);
        self.event(
            index,
            EventKind::ReplicaStopping,
            &service,
            &node,
            id,
            reason,
        );
    }

    /// Records what an agent says of its allocations. Reports for
    /// allocations of other nodes or unknown ones are ignored: an agent only
    /// speaks for itself.
    fn report_allocs(&mut self, index: u64, node: &str, reports: Vec<AllocReport>) {
        for report in reports {
            let Some(alloc) = self.allocs.get_mut(&report.id) else {
                continue;
            };
            if alloc.node != node {
                continue;
            }
            let changed_state = alloc.state != report.state;
            let was_serving = alloc.is_serving();
            alloc.state = report.state;
            match (was_serving, alloc.is_serving()) {
                (false, true) => alloc.serving_since_ms = self.clock_ms.max(1),
                (true, false) => alloc.serving_since_ms = 0,
                _ => {}
            }
            alloc.restarts = report.restarts;
            alloc.pid = report.pid;
            alloc.message = report.message;
            alloc.modify_index = index;
            let service = alloc.service.clone();
            let message = alloc.message.clone();
            self.index.node_changed.insert(node.to_string(), index);
            if let Some(kind) = EventKind::for_state(report.state).filter(|_| changed_state) {
                self.event(index, kind, &service, node, &report.id, &message);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, replicas: u32) -> ServiceSpec {
        ServiceSpec {
            name: name.into(),
            runtime: RuntimeKind::Process,
            replicas,
            command: vec!["sleep".into(), "100".into()],
            env: BTreeMap::new(),
            workdir: None,
            ..Default::default()
        }
    }

    fn node(name: &str) -> Command {
        Command::RegisterNode {
            name: name.into(),
            address: "127.0.0.1".into(),
            port_range: (20000, 20010),
            cpu_millis: 0,
            memory_mb: 0,
            labels: BTreeMap::new(),
        }
    }

    fn place(id: &str, service: &str, port: u16) -> Placement {
        Placement {
            id: id.into(),
            service: service.into(),
            node: "n1".into(),
            host_port: port,
        }
    }

    #[test]
    fn a_duplicate_service_is_refused_and_the_original_is_unchanged() {
        let mut s = State::default();
        s.apply(
            1,
            Command::CreateService {
                spec: spec("web", 2),
            },
        )
        .unwrap();
        let err = s
            .apply(
                2,
                Command::CreateService {
                    spec: spec("web", 9),
                },
            )
            .unwrap_err();
        assert_eq!(err, CommandError::ServiceExists("web".into()));
        assert_eq!(s.services["web"].spec.replicas, 2);
    }

    #[test]
    fn replaying_an_applied_index_changes_nothing() {
        let mut s = State::default();
        s.apply(
            5,
            Command::CreateService {
                spec: spec("web", 2),
            },
        )
        .unwrap();
        s.apply(
            5,
            Command::ScaleService {
                name: "web".into(),
                replicas: 7,
            },
        )
        .unwrap();
        assert_eq!(s.services["web"].spec.replicas, 2);
    }

    #[test]
    fn plans_are_rechecked_when_applied() {
        let mut s = State::default();
        s.apply(1, node("n1")).unwrap();
        s.apply(
            2,
            Command::CreateService {
                spec: spec("web", 2),
            },
        )
        .unwrap();
        let plan = Plan {
            place: vec![
                place("a", "web", 20000),
                place("b", "web", 20000), // port taken by a
                place("c", "web", 20001),
                place("d", "web", 20002),  // beyond 2 replicas
                place("e", "gone", 20003), // no such service
            ],
            ..Plan::default()
        };
        let outcome = s.apply(3, Command::ApplyPlan { plan }).unwrap();
        assert_eq!(
            outcome,
            Outcome::PlanApplied {
                placed: 2,
                rejected: 3
            }
        );
        assert_eq!(s.live_allocs("web").count(), 2);
    }

    #[test]
    fn removing_a_service_stops_its_allocations_and_forgets_them_once_stopped() {
        let mut s = State::default();
        s.apply(1, node("n1")).unwrap();
        s.apply(
            2,
            Command::CreateService {
                spec: spec("web", 1),
            },
        )
        .unwrap();
        let plan = Plan {
            place: vec![place("a", "web", 20000)],
            ..Plan::default()
        };
        s.apply(3, Command::ApplyPlan { plan }).unwrap();
        s.apply(4, Command::RemoveService { name: "web".into() })
            .unwrap();
        assert_eq!(s.allocs["a"].desired, DesiredState::Stop);
        let forget = Plan {
            forget: vec!["a".into()],
            ..Plan::default()
        };
        s.apply(
            5,
            Command::ApplyPlan {
                plan: forget.clone(),
            },
        )
        .unwrap();
        assert!(s.allocs.contains_key("a"), "not stopped yet: must be kept");
        let report = AllocReport {
            id: "a".into(),
            state: AllocState::Stopped,
            restarts: 0,
            pid: 0,
            message: String::new(),
        };
        s.apply(
            6,
            Command::ReportAllocs {
                node: "n1".into(),
                reports: vec![report],
            },
        )
        .unwrap();
        s.apply(7, Command::ApplyPlan { plan: forget }).unwrap();
        assert!(!s.allocs.contains_key("a"));
    }

    #[test]
    fn an_agent_cannot_report_for_another_nodes_allocation() {
        let mut s = State::default();
        s.apply(1, node("n1")).unwrap();
        s.apply(
            2,
            Command::CreateService {
                spec: spec("web", 1),
            },
        )
        .unwrap();
        let plan = Plan {
            place: vec![place("a", "web", 20000)],
            ..Plan::default()
        };
        s.apply(3, Command::ApplyPlan { plan }).unwrap();
        let report = AllocReport {
            id: "a".into(),
            state: AllocState::Running,
            restarts: 0,
            pid: 9,
            message: String::new(),
        };
        s.apply(
            4,
            Command::ReportAllocs {
                node: "n2".into(),
                reports: vec![report],
            },
        )
        .unwrap();
        assert_eq!(s.allocs["a"].state, AllocState::Pending);
    }

    #[test]
    fn events_are_stamped_with_the_proposers_time_and_the_ring_is_bounded() {
        let mut s = State::default();
        s.apply(
            1,
            Command::CreateService {
                spec: spec("web", 1),
            }
            .at(1234),
        )
        .unwrap();
        s.apply(2, node("n1")).unwrap();
        let kinds: Vec<_> = s
            .events
            .iter()
            .map(|e| (e.kind, e.index, e.time_ms))
            .collect();
        assert_eq!(
            kinds,
            vec![
                (EventKind::ServiceCreated, 1, 1234),
                (EventKind::NodeUp, 2, 1234)
            ]
        );
        for i in 0..EVENT_RING as u64 + 5 {
            s.apply(
                3 + 2 * i,
                Command::ScaleService {
                    name: "web".into(),
                    replicas: 2,
                },
            )
            .unwrap();
            s.apply(
                4 + 2 * i,
                Command::ScaleService {
                    name: "web".into(),
                    replicas: 1,
                },
            )
            .unwrap();
        }
        assert_eq!(s.events.len(), EVENT_RING);
        let last = s.events.back().unwrap().seq;
        assert_eq!(s.events_after(last - 3).count(), 3);
        assert_eq!(s.event_by_seq(last).map(|e| e.seq), Some(last));
        let image = State::from_image(&s.to_image()).unwrap();
        assert!(image.same_records(&s));
    }

    #[test]
    fn a_node_going_down_stops_its_replicas_and_plans_never_overcommit() {
        let mut s = State::default();
        s.apply(
            1,
            Command::RegisterNode {
                name: "n1".into(),
                address: "127.0.0.1".into(),
                port_range: (20000, 20010),
                cpu_millis: 1000,
                memory_mb: 1000,
                labels: BTreeMap::new(),
            },
        )
        .unwrap();
        let mut web = spec("web", 3);
        web.memory_mb = Some(400);
        s.apply(2, Command::CreateService { spec: web }).unwrap();
        let plan = Plan {
            place: vec![
                place("a", "web", 20000),
                place("b", "web", 20001),
                place("c", "web", 20002),
            ],
            ..Plan::default()
        };
        let outcome = s.apply(3, Command::ApplyPlan { plan }).unwrap();
        assert_eq!(
            outcome,
            Outcome::PlanApplied {
                placed: 2,
                rejected: 1
            },
            "only 800 of 1000 MB fit"
        );
        s.apply(
            4,
            Command::SetNodeStatus {
                name: "n1".into(),
                status: NodeStatus::Down,
            },
        )
        .unwrap();
        assert!(s.allocs.values().all(|a| a.desired == DesiredState::Stop));
        assert!(s.events.iter().any(|e| e.kind == EventKind::NodeDown));
        assert_eq!(
            s.events
                .iter()
                .filter(|e| e.kind == EventKind::ReplicaStopping)
                .count(),
            2
        );
    }
}
