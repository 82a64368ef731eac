//! Every change to the state as committed in the Raft log ([`Command`]),
//! what applying one produces ([`Outcome`]) and why one is refused
//! ([`CommandError`]), with the payloads they carry (plans, placements,
//! deployment steps, allocation reports).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::{AllocState, Availability, Member, NodeStatus, PortFailure, ServiceSpec, SpecError};

/// A new allocation decided by the scheduler.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    pub id: String,
    pub service: String,
    pub node: String,
    pub host_port: u16,
    /// The replica's ordinal (see [`super::Allocation::slot`]).
    #[serde(default)]
    pub slot: u32,
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
    /// Allocations of unknown state on a down node that have been
    /// replaced (or are not wanted any more): they become lost.
    #[serde(default)]
    pub lost: Vec<String>,
    /// Services whose rebalance is done (spread again).
    #[serde(default)]
    pub rebalanced: Vec<String>,
    /// Jobs to fail (their deadline passed), with why.
    #[serde(default)]
    pub failed_jobs: Vec<(String, String)>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.place.is_empty()
            && self.stop.is_empty()
            && self.forget.is_empty()
            && self.deployments.is_empty()
            && self.lost.is_empty()
            && self.rebalanced.is_empty()
            && self.failed_jobs.is_empty()
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
    /// The port the replica's container listens on in its own network; 0
    /// when unknown or the host's (see [`crate::state::Service::image_port`]).
    #[serde(default)]
    pub port: u16,
    /// The replica has a health check (its spec's or its image's).
    #[serde(default)]
    pub health_checked: bool,
    /// A job's replica that ended: its exit status.
    #[serde(default)]
    pub exit_code: Option<i32>,
    /// The agent refuses the assignment (state failed): it never runs it.
    #[serde(default)]
    pub refused: bool,
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
    /// `skiff service rebalance`: move replicas, one at a time and
    /// surge-first, until the service is spread again.
    RebalanceService {
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
    /// The published ports a node's proxy cannot listen on (the whole set).
    ReportPorts {
        node: String,
        failures: BTreeMap<String, PortFailure>,
    },
    /// A scale decision of the autoscaler, with its reason.
    Autoscale {
        name: String,
        replicas: u32,
        reason: String,
    },
    /// `skiff cluster token rotate ROLE`: the role's join secret changes.
    RotateJoinToken {
        role: String,
    },
    /// `skiff node revoke NAME`: the node's certificate is refused.
    RevokeNode {
        name: String,
    },
    RegisterNode {
        name: String,
        address: String,
        port_range: (u16, u16),
        #[serde(default)]
        process_runtime: bool,
        /// Where its agent serves `AgentLogs` (`HOST:PORT`).
        #[serde(default)]
        agent_address: String,
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
    /// `skiff node rm`: forgets a down node and its allocations; refused
    /// while the node is ready.
    RemoveNode {
        name: String,
    },
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
    /// Sets a variable only if it holds `expected` (`None`: only if it
    /// does not exist): `skiff var cas`, what the linearizability check
    /// exercises.
    CompareAndSetVariable {
        key: String,
        expected: Option<String>,
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
    /// The named volumes a node's agent holds (the whole set).
    ReportVolumes {
        node: String,
        volumes: Vec<super::VolumeReport>,
    },
    /// `skiff volume rm`: refused while a replica uses the volume; its
    /// agent deletes it.
    RemoveVolume {
        name: String,
        #[serde(default)]
        node: Option<String>,
    },
    /// `skiff secret create|update`: a value sealed by the proposer with
    /// the cluster's secrets key (never the plain value).
    PutSecret {
        secret: super::SecretWrite,
    },
    /// `skiff secret rm`: refused while a service references it.
    RemoveSecret {
        name: String,
    },
    /// `skiff token create`: the secret's hash, never the secret.
    CreateToken {
        token: super::TokenWrite,
    },
    /// `skiff token revoke`.
    RevokeToken {
        name: String,
    },
    /// A command stamped with its proposer's clock. Proposers wrap what
    /// they propose in it so that events carry a time every server agrees
    /// on; a bare command is stamped with the last time seen.
    Timed {
        time_ms: u64,
        /// The API token (its name) of the call that proposed it, stamped
        /// by the server that received the call; `None`: no caller (a
        /// controller, an agent's report). Events record it as `by`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        by: Option<String>,
        command: Box<Command>,
    },
}

impl Command {
    /// `self`, stamped with `time_ms` (milliseconds since the epoch).
    pub fn at(self, time_ms: u64) -> Command {
        self.at_by(time_ms, None)
    }

    /// `self`, stamped with `time_ms` and the caller `by` (a token name).
    pub fn at_by(self, time_ms: u64, by: Option<String>) -> Command {
        Command::Timed {
            time_ms,
            by,
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
    #[error("node \"{0}\" is ready; only a down node can be removed: drain it, stop its agent and wait for it to show down in `skiff node ls`")]
    NodeReady(String),
    /// A deployment command that does not fit the service's state.
    #[error("{0}")]
    Deployment(String),
    #[error(transparent)]
    Invalid(#[from] SpecError),
    /// A volume command that does not fit the volumes' state.
    #[error("{0}")]
    Volume(String),
    /// A secret command that does not fit the secrets' state.
    #[error("{0}")]
    Secret(String),
    /// A token command that does not fit the tokens' state.
    #[error("{0}")]
    Token(String),
}

/// What a successful command produced.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Done,
    /// A compare-and-set: whether it set the value, and the value after it.
    Compared {
        swapped: bool,
        current: Option<String>,
    },
    /// A plan was applied; placements refused at apply time are counted.
    PlanApplied {
        placed: usize,
        rejected: usize,
    },
}
