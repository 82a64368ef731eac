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
//!
//! Layout:
//! - `model`: the records (services, nodes, allocations, members) and
//!   their enums; `deployment`: the record of each rollout and version.
//! - `command`: the commands, their payloads, outcomes and errors.
//! - `event`: event kinds, the event record and the ring of recent ones.
//! - `image`: the snapshot image and the derived allocation indexes.
//! - `query`: read-only lookups for the scheduler, controllers and API.
//! - `apply`: one module per subject (services, deployments, nodes,
//!   plans, allocations) applying its commands as `impl State` blocks.
//! - `secrets`: secrets (sealed values, versions) and their roll-outs.
//! - `stacks`: a stack's services applied as one step, and the
//!   `depends_on` conditions that hold a first start.
//! - `tokens`: the API tokens (role, expiry, the hash of the secret).
//! - here: the [`State`] itself and the dispatch of each command.

mod apply;
mod command;
mod deployment;
mod event;
#[cfg(test)]
mod fixtures;
mod image;
mod job;
mod model;
mod pki;
mod query;
mod secrets;
mod stacks;
mod tokens;
mod volumes;

use std::collections::{BTreeMap, VecDeque};

pub use command::{
    AllocReport, Command, CommandError, DeploymentChange, DeploymentStep, Outcome, Placement, Plan,
};
pub use deployment::{Deployment, DeploymentStatus, VersionRecord};
pub use event::{Event, EventKind, EVENT_RING};
pub use job::{after_attempt, retry_delay_ms, JobState, JobStatus};
pub use model::{
    Allocation, Availability, DesiredState, Member, Node, NodeStatus, PortFailure, Service,
    HISTORY_LEN,
};
pub use skiff_spec::{
    AllocState, AutoscalePolicy, Constraint, ConstraintOp, HealthCheck, HealthKind, NetworkMode,
    PlacementPolicy, Protocol, RuntimeKind, ServiceMode, ServiceSpec, SpecError, Strategy,
    UpdatePolicy,
};

pub use pki::PkiState;
pub use secrets::{Secret, SecretWrite};
pub use tokens::{Role, Token, TokenWrite};
pub use volumes::{AnonymousVolume, Volume, VolumeReport};

use image::AllocIndex;

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
    /// Named volumes on the nodes, by `node/name`.
    pub volumes: BTreeMap<String, Volume>,
    /// Secrets by name, their values sealed (see `secrets`).
    pub secrets: BTreeMap<String, Secret>,
    /// Join token generations and revoked nodes (see `pki`).
    pub pki: PkiState,
    /// API tokens by name, revoked ones too (see `tokens`).
    pub tokens: BTreeMap<String, Token>,
    /// Raft index of the last applied entry.
    pub applied_index: u64,
    /// The last proposer time seen; stamps events of untimed commands.
    clock_ms: u64,
    /// The caller (token name) of the command being applied, stamped by
    /// the API that received it ([`Command::Timed`]); empty for the
    /// controllers' and agents' commands. Events record it.
    by: String,
    index: AllocIndex,
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
            Command::Timed {
                time_ms,
                by,
                command,
            } => {
                self.clock_ms = self.clock_ms.max(time_ms);
                self.by = by.unwrap_or_default();
                let outcome = self.apply_command(index, *command);
                self.by.clear();
                outcome
            }
            Command::CreateToken { token } => self.create_token(index, token),
            Command::RevokeToken { name } => self.revoke_token(index, &name),
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
            Command::ReportVolumes { node, volumes } => {
                self.report_volumes(index, &node, volumes);
                Ok(Outcome::Done)
            }
            Command::RemoveVolume { name, node } => {
                self.remove_volume(index, &name, node.as_deref())
            }
            Command::PutSecret { secret } => self.put_secret(index, secret),
            Command::RemoveSecret { name } => self.remove_secret(index, &name),
            Command::RollbackService { name, to_version } => {
                self.rollback_service(index, &name, to_version)
            }
            Command::PromoteDeployment { name } => self.promote(index, &name),
            Command::RebalanceService { name } => self.rebalance(index, &name),
            Command::ReportImages { node, images } => {
                if let Some(n) = self.nodes.get_mut(&node) {
                    n.images = images;
                }
                Ok(Outcome::Done)
            }
            Command::ReportPorts { node, failures } => {
                self.report_ports(index, &node, failures);
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
                process_runtime,
                agent_address,
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
                    process_runtime,
                    agent_address,
                    port_failures: previous
                        .map(|n| n.port_failures.clone())
                        .unwrap_or_default(),
                };
                if previous != Some(&node) {
                    self.nodes.insert(name.clone(), node);
                }
                let kept = self.keep_unreplaced(index, &name);
                if came_up || kept > 0 {
                    let message = match kept {
                        0 => "registered".to_string(),
                        n => format!("registered; {n} replicas it still runs kept (not replaced while it was down)"),
                    };
                    self.event(index, EventKind::NodeUp, "", &name, "", &message);
                }
                Ok(Outcome::Done)
            }
            Command::SetNodeStatus { name, status } => self.set_node_status(index, &name, status),
            Command::RemoveNode { name } => self.remove_node(index, &name),
            Command::RotateJoinToken { role } => self.rotate_join_token(index, &role),
            Command::RevokeNode { name } => self.revoke_node(index, &name),
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
            Command::CompareAndSetVariable {
                key,
                expected,
                value,
            } => {
                let current = self.variables.get(&key).cloned();
                if current != expected {
                    return Ok(Outcome::Compared {
                        swapped: false,
                        current,
                    });
                }
                let message = format!("variable {key} set ({} bytes)", value.len());
                if current.as_ref() != Some(&value) {
                    self.event(index, EventKind::VariableSet, "", "", "", &message);
                }
                self.variables.insert(key, value.clone());
                Ok(Outcome::Compared {
                    swapped: true,
                    current: Some(value),
                })
            }
            Command::PutVariable { key, value } => {
                // The audit trail names the key and the size, never the value.
                let message = format!("variable {key} set ({} bytes)", value.len());
                let changed = self.variables.get(&key) != Some(&value);
                self.variables.insert(key, value);
                if changed {
                    self.event(index, EventKind::VariableSet, "", "", "", &message);
                }
                Ok(Outcome::Done)
            }
            Command::RemoveMember { id } => {
                if let Some(member) = self.members.remove(&id) {
                    let message = format!("server {} (id {id}) removed", member.name);
                    self.event(index, EventKind::ServerRemoved, "", "", "", &message);
                }
                Ok(Outcome::Done)
            }
            Command::UpsertMember { member } => {
                let message = format!(
                    "server {} (id {}) at {} joined",
                    member.name, member.id, member.address
                );
                if self.members.insert(member.id, member).is_none() {
                    self.event(index, EventKind::ServerJoined, "", "", "", &message);
                }
                Ok(Outcome::Done)
            }
        }
    }

    /// Marks that an entry at `index` was applied without a command (Raft's
    /// empty entries and configuration changes).
    pub fn skip(&mut self, index: u64) {
        self.applied_index = self.applied_index.max(index);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::fixtures::spec;

    #[test]
    fn compare_and_set_sets_only_what_it_expected() {
        let mut s = State::default();
        let cas = |expected: Option<&str>, value: &str| Command::CompareAndSetVariable {
            key: "k".into(),
            expected: expected.map(str::to_string),
            value: value.into(),
        };
        let compared = |swapped, current: Option<&str>| Outcome::Compared {
            swapped,
            current: current.map(str::to_string),
        };
        assert_eq!(s.apply(1, cas(None, "a")), Ok(compared(true, Some("a"))));
        assert_eq!(s.apply(2, cas(None, "b")), Ok(compared(false, Some("a"))));
        assert_eq!(
            s.apply(3, cas(Some("x"), "b")),
            Ok(compared(false, Some("a")))
        );
        assert_eq!(
            s.apply(4, cas(Some("a"), "b")),
            Ok(compared(true, Some("b")))
        );
        assert_eq!(s.variables.get("k").map(String::as_str), Some("b"));
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
}
