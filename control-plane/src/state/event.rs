//! What happened in the cluster: the kinds of event, the committed event,
//! and the bounded ring of recent events the state keeps.

use serde::{Deserialize, Serialize};

use super::{AllocState, State};

/// How many recent events the state keeps (older ones are dropped).
pub const EVENT_RING: usize = 10_000;

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
    NodeRemoved,
    DeploymentStarted,
    DeploymentPaused,
    DeploymentResumed,
    DeploymentAwaitingPromotion,
    DeploymentPromoted,
    DeploymentSucceeded,
    DeploymentFailed,
    DeploymentRolledBack,
    ServiceScaled,
    ServiceRebalancing,
    ServiceRebalanced,
    /// A node's routing proxy cannot listen on a published port.
    PortUnavailable,
    /// ... and now can (or the port is no longer published there).
    PortListening,
    /// Its agent deleted a volume `skiff volume rm` removed.
    VolumeRemoved,
    /// `skiff secret create|update|rm`; the message names the secret and
    /// its version, never the value.
    SecretCreated,
    SecretUpdated,
    SecretRemoved,
    /// A job's attempt exited with status 0.
    JobSucceeded,
    /// A job ran out of retries or passed its deadline.
    JobFailed,
    /// `skiff var put` (the key and size, never the value).
    VariableSet,
    /// A server became a member (a join) or stopped being one.
    ServerJoined,
    ServerRemoved,
    /// `skiff node revoke`.
    NodeRevoked,
    /// `skiff cluster token rotate`.
    JoinTokenRotated,
    /// `skiff token create|revoke`; the message names the token and its
    /// role, never the secret.
    TokenCreated,
    TokenRevoked,
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
            EventKind::JobSucceeded => "job-succeeded",
            EventKind::JobFailed => "job-failed",
            EventKind::ReplicaStopping => "replica-stopping",
            EventKind::ReplicaStopped => "replica-stopped",
            EventKind::NodeUp => "node-up",
            EventKind::NodeDown => "node-down",
            EventKind::NodePaused => "node-paused",
            EventKind::NodeActivated => "node-activated",
            EventKind::NodeDraining => "node-draining",
            EventKind::NodeDrained => "node-drained",
            EventKind::NodeRemoved => "node-removed",
            EventKind::DeploymentStarted => "deployment-started",
            EventKind::DeploymentPaused => "deployment-paused",
            EventKind::DeploymentResumed => "deployment-resumed",
            EventKind::DeploymentAwaitingPromotion => "deployment-awaiting-promotion",
            EventKind::DeploymentPromoted => "deployment-promoted",
            EventKind::DeploymentSucceeded => "deployment-succeeded",
            EventKind::DeploymentFailed => "deployment-failed",
            EventKind::DeploymentRolledBack => "deployment-rolled-back",
            EventKind::ServiceScaled => "service-scaled",
            EventKind::ServiceRebalancing => "service-rebalancing",
            EventKind::ServiceRebalanced => "service-rebalanced",
            EventKind::PortUnavailable => "port-unavailable",
            EventKind::PortListening => "port-listening",
            EventKind::VolumeRemoved => "volume-removed",
            EventKind::SecretCreated => "secret-created",
            EventKind::SecretUpdated => "secret-updated",
            EventKind::SecretRemoved => "secret-removed",
            EventKind::VariableSet => "variable-set",
            EventKind::ServerJoined => "server-joined",
            EventKind::ServerRemoved => "server-removed",
            EventKind::NodeRevoked => "node-revoked",
            EventKind::JoinTokenRotated => "join-token-rotated",
            EventKind::TokenCreated => "token-created",
            EventKind::TokenRevoked => "token-revoked",
        }
    }

    pub(super) fn for_state(state: AllocState) -> Option<Self> {
        Some(match state {
            // Unknown and lost come with the node-down event, never from
            // an agent.
            AllocState::Pending | AllocState::Unknown | AllocState::Lost => return None,
            AllocState::Pulling | AllocState::Starting => EventKind::ReplicaStarting,
            AllocState::Running => EventKind::ReplicaStarted,
            AllocState::Healthy => EventKind::ReplicaHealthy,
            AllocState::Unhealthy => EventKind::ReplicaUnhealthy,
            AllocState::Restarting => EventKind::ReplicaRestarting,
            AllocState::Failed | AllocState::Exited => EventKind::ReplicaFailed,
            AllocState::Completed => EventKind::ReplicaStopped,
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
    /// The API token (its name) whose call caused it; empty: the cluster
    /// itself (controllers, agents).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub by: String,
}

impl State {
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

    pub(super) fn event(
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
            by: self.by.clone(),
        });
        while self.events.len() > EVENT_RING {
            self.events.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::fixtures::{node, spec};
    use crate::state::Command;

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
}
