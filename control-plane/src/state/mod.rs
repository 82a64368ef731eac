//! The replicated state machine: services, nodes, allocations and servers.
//!
//! Every change arrives as a [`Command`] committed through Raft and is applied
//! here deterministically, in log order, on every server. Applying carries the
//! Raft index, and a command at or below the last applied index is ignored, so
//! replaying the log after a crash is idempotent. The machine is pure: it
//! records which keys it changed ([`Key`]) and the storage layer writes them.

pub mod spec;
pub mod store;

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

pub use spec::{HealthCheck, HealthKind, NetworkMode, RuntimeKind, ServiceSpec, SpecError};

/// A service as stored: the spec plus bookkeeping.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    pub spec: ServiceSpec,
    /// Bumped by every change of the spec; 1 at creation.
    pub generation: u64,
    pub create_index: u64,
    pub modify_index: u64,
}

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

/// What the agent last reported of an allocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AllocState {
    /// Placed, not yet reported by the agent.
    Pending,
    /// The agent is pulling the replica's image.
    Pulling,
    Starting,
    /// Started; healthy as far as anyone knows (no check passed or failed yet,
    /// or it has none).
    Running,
    /// Its health check passes.
    Healthy,
    /// Its health check failed; the agent restarts it.
    Unhealthy,
    /// Exited; the agent restarts it after a backoff.
    Restarting,
    /// Cannot be started (e.g. the program does not exist); still retried.
    Failed,
    /// Stopped for good; the allocation can be forgotten.
    Stopped,
}

impl AllocState {
    pub fn as_str(self) -> &'static str {
        match self {
            AllocState::Pending => "pending",
            AllocState::Pulling => "pulling",
            AllocState::Starting => "starting",
            AllocState::Running => "running",
            AllocState::Healthy => "healthy",
            AllocState::Unhealthy => "unhealthy",
            AllocState::Restarting => "restarting",
            AllocState::Failed => "failed",
            AllocState::Stopped => "stopped",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        Some(match value {
            "pending" => AllocState::Pending,
            "pulling" => AllocState::Pulling,
            "starting" => AllocState::Starting,
            "running" => AllocState::Running,
            "healthy" => AllocState::Healthy,
            "unhealthy" => AllocState::Unhealthy,
            "restarting" => AllocState::Restarting,
            "failed" => AllocState::Failed,
            "stopped" => AllocState::Stopped,
            _ => return None,
        })
    }

    /// Its process runs (healthy or not yet checked).
    pub fn is_up(self) -> bool {
        matches!(self, AllocState::Running | AllocState::Healthy)
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
}

impl Allocation {
    /// Counts toward the service's replicas: wanted and not known to be dead.
    pub fn is_live(&self) -> bool {
        self.desired == DesiredState::Run && self.state != AllocState::Stopped
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
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.place.is_empty() && self.stop.is_empty() && self.forget.is_empty()
    }
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
    RegisterNode {
        name: String,
        address: String,
        port_range: (u16, u16),
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
}

/// Why a command was refused. Deterministic: every server refuses alike.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum CommandError {
    #[error("service \"{0}\" not found")]
    ServiceNotFound(String),
    #[error("service \"{0}\" already exists; use `skiff service scale` or remove it first")]
    ServiceExists(String),
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

/// A record the state machine changed, for the storage layer to write.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Key {
    Service(String),
    Node(String),
    Alloc(String),
    Member(u64),
    Variable(String),
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
    applied_index: u64,
}

/// The applied state. Cloned as a snapshot by readers and controllers.
#[derive(Clone, Debug, Default)]
pub struct State {
    pub services: BTreeMap<String, Service>,
    pub nodes: BTreeMap<String, Node>,
    pub allocs: BTreeMap<String, Allocation>,
    pub members: BTreeMap<u64, Member>,
    pub variables: BTreeMap<String, String>,
    /// Raft index of the last applied entry.
    pub applied_index: u64,
    dirty: BTreeSet<Key>,
}

impl State {
    /// Applies one committed command at `index`. Entries at or below the
    /// applied index were applied before (a replay) and change nothing.
    pub fn apply(&mut self, index: u64, command: Command) -> Result<Outcome, CommandError> {
        if index <= self.applied_index {
            return Ok(Outcome::Done);
        }
        self.applied_index = index;
        match command {
            Command::CreateService { spec } => self.create_service(index, spec),
            Command::ScaleService { name, replicas } => self.scale_service(index, &name, replicas),
            Command::RemoveService { name } => self.remove_service(index, &name),
            Command::RegisterNode {
                name,
                address,
                port_range,
            } => {
                let register_index = self.nodes.get(&name).map_or(index, |n| n.register_index);
                self.dirty.insert(Key::Node(name.clone()));
                self.nodes.insert(
                    name.clone(),
                    Node {
                        name,
                        address,
                        port_range,
                        status: NodeStatus::Ready,
                        register_index,
                    },
                );
                Ok(Outcome::Done)
            }
            Command::ApplyPlan { plan } => Ok(self.apply_plan(index, plan)),
            Command::ReportAllocs { node, reports } => {
                self.report_allocs(index, &node, reports);
                Ok(Outcome::Done)
            }
            Command::PutVariable { key, value } => {
                self.dirty.insert(Key::Variable(key.clone()));
                self.variables.insert(key, value);
                Ok(Outcome::Done)
            }
            Command::RemoveMember { id } => {
                self.dirty.insert(Key::Member(id));
                self.members.remove(&id);
                Ok(Outcome::Done)
            }
            Command::UpsertMember { member } => {
                self.dirty.insert(Key::Member(member.id));
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

    /// Encodes the whole state for a Raft snapshot.
    pub fn to_image(&self) -> Vec<u8> {
        let image = StateImage {
            services: self.services.clone(),
            nodes: self.nodes.clone(),
            allocs: self.allocs.clone(),
            members: self.members.clone(),
            variables: self.variables.clone(),
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
            variables: image.variables,
            applied_index: image.applied_index,
            dirty: BTreeSet::new(),
        };
        state
            .dirty
            .extend(state.services.keys().cloned().map(Key::Service));
        state
            .dirty
            .extend(state.nodes.keys().cloned().map(Key::Node));
        state
            .dirty
            .extend(state.allocs.keys().cloned().map(Key::Alloc));
        state
            .dirty
            .extend(state.members.keys().copied().map(Key::Member));
        state
            .dirty
            .extend(state.variables.keys().cloned().map(Key::Variable));
        Ok(state)
    }

    /// Whether two states hold the same records (ignoring what is unsaved).
    pub fn same_records(&self, other: &State) -> bool {
        self.services == other.services
            && self.nodes == other.nodes
            && self.allocs == other.allocs
            && self.members == other.members
            && self.variables == other.variables
    }

    /// Keys changed since the last call; the caller persists them.
    pub fn take_dirty(&mut self) -> BTreeSet<Key> {
        std::mem::take(&mut self.dirty)
    }

    /// Live allocations of a service, oldest first.
    pub fn live_allocs<'a>(&'a self, service: &'a str) -> impl Iterator<Item = &'a Allocation> {
        self.allocs_of(service).filter(|a| a.is_live())
    }

    pub fn allocs_of<'a>(&'a self, service: &'a str) -> impl Iterator<Item = &'a Allocation> {
        self.allocs.values().filter(move |a| a.service == service)
    }

    fn create_service(&mut self, index: u64, spec: ServiceSpec) -> Result<Outcome, CommandError> {
        spec.validate()?;
        if self.services.contains_key(&spec.name) {
            return Err(CommandError::ServiceExists(spec.name));
        }
        self.dirty.insert(Key::Service(spec.name.clone()));
        self.services.insert(
            spec.name.clone(),
            Service {
                spec,
                generation: 1,
                create_index: index,
                modify_index: index,
            },
        );
        Ok(Outcome::Done)
    }

    fn scale_service(
        &mut self,
        index: u64,
        name: &str,
        replicas: u32,
    ) -> Result<Outcome, CommandError> {
        spec::validate_replicas(i64::from(replicas))?;
        let service = self
            .services
            .get_mut(name)
            .ok_or_else(|| CommandError::ServiceNotFound(name.to_string()))?;
        if service.spec.replicas != replicas {
            service.spec.replicas = replicas;
            service.generation += 1;
            service.modify_index = index;
            self.dirty.insert(Key::Service(name.to_string()));
        }
        Ok(Outcome::Done)
    }

    /// Forgets the service and asks for all its replicas to stop; the
    /// allocations stay until their agent reports them stopped.
    fn remove_service(&mut self, index: u64, name: &str) -> Result<Outcome, CommandError> {
        if self.services.remove(name).is_none() {
            return Err(CommandError::ServiceNotFound(name.to_string()));
        }
        self.dirty.insert(Key::Service(name.to_string()));
        let ids: Vec<String> = self.allocs_of(name).map(|a| a.id.clone()).collect();
        for id in ids {
            self.stop_alloc(index, &id);
        }
        Ok(Outcome::Done)
    }

    /// Applies a plan after re-checking it against the current state: a
    /// placement for a removed service, an unknown node, a port already taken
    /// on the node, or beyond the desired count is rejected. Plans are
    /// computed on a snapshot that may be stale by the time they commit.
    fn apply_plan(&mut self, index: u64, plan: Plan) -> Outcome {
        let mut placed = 0;
        let mut rejected = 0;
        for id in &plan.stop {
            self.stop_alloc(index, id);
        }
        for id in &plan.forget {
            let forgettable = self
                .allocs
                .get(id)
                .is_some_and(|a| a.desired == DesiredState::Stop && a.state == AllocState::Stopped);
            if forgettable {
                self.allocs.remove(id);
                self.dirty.insert(Key::Alloc(id.clone()));
            }
        }
        for placement in plan.place {
            let Some(service) = self.services.get(&placement.service) else {
                rejected += 1;
                continue;
            };
            let spec = service.spec.clone();
            let node_ok = self
                .nodes
                .get(&placement.node)
                .is_some_and(|n| n.status == NodeStatus::Ready);
            let port_taken = self
                .allocs
                .values()
                .any(|a| a.node == placement.node && a.host_port == placement.host_port);
            let live = self.live_allocs(&placement.service).count();
            let duplicate_id = self.allocs.contains_key(&placement.id);
            if !node_ok || port_taken || duplicate_id || live >= spec.replicas as usize {
                rejected += 1;
                continue;
            }
            self.dirty.insert(Key::Alloc(placement.id.clone()));
            self.allocs.insert(
                placement.id.clone(),
                Allocation {
                    id: placement.id,
                    service: placement.service,
                    node: placement.node,
                    spec,
                    host_port: placement.host_port,
                    desired: DesiredState::Run,
                    state: AllocState::Pending,
                    restarts: 0,
                    pid: 0,
                    message: String::new(),
                    create_index: index,
                    modify_index: index,
                },
            );
            placed += 1;
        }
        Outcome::PlanApplied { placed, rejected }
    }

    fn stop_alloc(&mut self, index: u64, id: &str) {
        if let Some(alloc) = self.allocs.get_mut(id) {
            if alloc.desired != DesiredState::Stop {
                alloc.desired = DesiredState::Stop;
                alloc.modify_index = index;
                self.dirty.insert(Key::Alloc(id.to_string()));
            }
        }
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
            alloc.state = report.state;
            alloc.restarts = report.restarts;
            alloc.pid = report.pid;
            alloc.message = report.message;
            alloc.modify_index = index;
            self.dirty.insert(Key::Alloc(report.id));
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
    fn commands_record_the_keys_they_change() {
        let mut s = State::default();
        s.apply(
            1,
            Command::CreateService {
                spec: spec("web", 1),
            },
        )
        .unwrap();
        assert_eq!(
            s.take_dirty().into_iter().collect::<Vec<_>>(),
            vec![Key::Service("web".into())]
        );
        assert!(s.take_dirty().is_empty());
    }
}
