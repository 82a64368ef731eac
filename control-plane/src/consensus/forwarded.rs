//! What another server may ask the leader to run through `Raft.Propose`.
//!
//! Followers forward by call only membership changes: a `Join` that
//! reached a follower ([`Request::AddMember`]) and `skiff cluster remove`
//! on a follower ([`Request::RemoveMember`]). Commands travel to the
//! leader inside the Raft message stream instead (see
//! [`Consensus::request`](super::Consensus::request)); servers before that
//! change forwarded client writes and agent reports by call, so those are
//! still accepted. Commands only the leader itself originates (the
//! liveness verdict, plans, autoscale decisions, member records) are
//! refused: a peer asking for them is not a follower doing its job.

use skiff_spec as spec;

use super::Request;
use crate::state::Command;

/// Whether `request` is something a follower legitimately forwards; the
/// error says why not.
pub fn forwardable(request: &Request) -> Result<(), &'static str> {
    match request {
        Request::AddMember { .. } | Request::RemoveMember { .. } => Ok(()),
        Request::Command(command) => forwardable_command(command),
    }
}

fn forwardable_command(command: &Command) -> Result<(), &'static str> {
    match command {
        Command::Timed { command, .. } => match **command {
            Command::Timed { .. } => Err("a command is stamped with a time once"),
            ref inner => forwardable_command(inner),
        },
        // Client writes of the API.
        Command::CreateService { .. }
        | Command::ScaleService { .. }
        | Command::RemoveService { .. }
        | Command::UpdateService { .. }
        | Command::RollbackService { .. }
        | Command::PromoteDeployment { .. }
        | Command::RebalanceService { .. }
        | Command::PauseDeployment { .. }
        | Command::RemoveNode { .. }
        | Command::SetNodeAvailability { .. }
        | Command::PutVariable { .. }
        | Command::CompareAndSetVariable { .. }
        | Command::DeployStack { .. }
        | Command::RemoveStack { .. }
        | Command::RemoveVolume { .. }
        | Command::PutSecret { .. }
        | Command::RemoveSecret { .. }
        | Command::RotateJoinToken { .. }
        | Command::RevokeNode { .. }
        | Command::CreateToken { .. }
        | Command::RevokeToken { .. } => Ok(()),
        // Agents' reports, received by whichever server the agent talks to.
        Command::RegisterNode { .. }
        | Command::ReportAllocs { .. }
        | Command::ReportImages { .. }
        | Command::ReportPorts { .. }
        | Command::ReportVolumes { .. } => Ok(()),
        Command::SetNodeStatus { .. } => {
            Err("a node's status is the leader's liveness verdict; no server forwards it")
        }
        Command::ApplyPlan { .. } => Err("plans are made and proposed by the leader's reconciler"),
        Command::Autoscale { .. } => Err("autoscale decisions are made and proposed by the leader"),
        Command::UpsertMember { .. } | Command::RemoveMember { .. } => {
            Err("member records change only with a Raft membership change (join or cluster remove)")
        }
    }
}

/// The checks the API runs on a request before proposing it, for those it
/// can run without the API's context: a forwarded request skipped them on
/// the way. Checks against the state (a published port already taken, the
/// variable count) are left to the state machine.
pub fn validate(request: &Request) -> Result<(), String> {
    let invalid = |e: spec::SpecError| e.to_string();
    match request {
        Request::AddMember { name, address } => {
            spec::validate_name(name).map_err(|e| format!("invalid server {e}"))?;
            if address.parse::<std::net::SocketAddr>().is_err() {
                return Err(format!("invalid server address \"{address}\": use IP:PORT"));
            }
            Ok(())
        }
        Request::RemoveMember { name } => {
            spec::validate_name(name).map_err(|e| format!("invalid server {e}"))
        }
        Request::Command(command) => validate_command(command).map_err(invalid),
    }
}

fn validate_command(command: &Command) -> Result<(), spec::SpecError> {
    match command {
        Command::Timed { command, .. } => validate_command(command),
        Command::PutVariable { key, value } | Command::CompareAndSetVariable { key, value, .. } => {
            spec::validate_variable(key, value)
        }
        Command::CreateService { spec } | Command::UpdateService { spec } => spec.validate(),
        Command::DeployStack { services, .. } => services.iter().try_for_each(|s| s.validate()),
        Command::ScaleService { name, replicas } => {
            spec::validate_name(name)?;
            spec::validate_replicas(i64::from(*replicas)).map(|_| ())
        }
        Command::PutSecret { secret } => {
            spec::validate_secret_name(&secret.name)?;
            if secret.size_bytes > spec::MAX_SECRET_BYTES as u64 {
                return Err(spec::SpecError::new(
                    "secret",
                    format!(
                        "{} bytes; a secret is at most {} bytes",
                        secret.size_bytes,
                        spec::MAX_SECRET_BYTES
                    ),
                ));
            }
            Ok(())
        }
        Command::RemoveSecret { name } => spec::validate_secret_name(name),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Member, NodeStatus};

    fn command(command: Command) -> Request {
        Request::Command(Box::new(command))
    }

    fn put(value_bytes: usize) -> Command {
        Command::PutVariable {
            key: "k".into(),
            value: "v".repeat(value_bytes),
        }
    }

    #[test]
    fn membership_changes_client_writes_and_agent_reports_are_forwardable() {
        let join = Request::AddMember {
            name: "s2".into(),
            address: "127.0.0.1:7071".into(),
        };
        let remove = Request::RemoveMember { name: "s2".into() };
        let report = Command::ReportAllocs {
            node: "n1".into(),
            reports: Vec::new(),
        };
        for request in [
            join,
            remove,
            command(put(1)),
            command(put(1).at(5)),
            command(report),
        ] {
            assert_eq!(forwardable(&request), Ok(()), "{request:?}");
        }
    }

    #[test]
    fn what_only_the_leader_originates_is_refused() {
        let status = Command::SetNodeStatus {
            name: "n1".into(),
            status: NodeStatus::Down,
        };
        let autoscale = Command::Autoscale {
            name: "web".into(),
            replicas: 9,
            reason: "x".into(),
        };
        let member = Command::UpsertMember {
            member: Member {
                id: 9,
                name: "ghost".into(),
                address: "127.0.0.1:1".into(),
                learner: false,
            },
        };
        for refused in [
            status.clone(),
            status.clone().at(5),
            autoscale,
            member,
            Command::RemoveMember { id: 1 },
            put(1).at(5).at(6),
        ] {
            let request = command(refused);
            assert!(forwardable(&request).is_err(), "{request:?}");
        }
        assert!(forwardable(&command(status))
            .unwrap_err()
            .contains("liveness"));
    }

    #[test]
    fn forwarded_requests_get_the_apis_checks() {
        assert_eq!(validate(&command(put(64 * 1024).at(1))), Ok(()));
        let too_big = validate(&command(put(200 * 1024).at(1))).unwrap_err();
        assert!(too_big.contains("too large"), "{too_big}");
        let bad_address = Request::AddMember {
            name: "s2".into(),
            address: "nowhere".into(),
        };
        assert!(validate(&bad_address).unwrap_err().contains("IP:PORT"));
        let bad_name = Request::AddMember {
            name: "../s2".into(),
            address: "127.0.0.1:1".into(),
        };
        assert!(validate(&bad_name).is_err());
    }
}
