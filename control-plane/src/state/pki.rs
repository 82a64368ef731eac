//! What the cluster's trust needs in the replicated state: the generation
//! of each role's join token (rotating bumps it, which changes the secret
//! every server derives from the CA key, see `skiff_pki::ca`) and the
//! nodes whose certificates are refused.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::{CommandError, EventKind, Outcome, State};

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PkiState {
    /// Join token generation by role ("server", "agent"); absent: 0.
    #[serde(default)]
    pub join_generations: BTreeMap<String, u64>,
    /// Nodes revoked with `skiff node revoke`: their certificates are
    /// refused by every server, whatever their expiry.
    #[serde(default)]
    pub revoked_nodes: BTreeSet<String>,
}

impl PkiState {
    pub fn join_generation(&self, role: &str) -> u64 {
        self.join_generations.get(role).copied().unwrap_or(0)
    }

    pub fn is_revoked(&self, node: &str) -> bool {
        self.revoked_nodes.contains(node)
    }
}

impl State {
    pub(super) fn rotate_join_token(
        &mut self,
        index: u64,
        role: &str,
    ) -> Result<Outcome, CommandError> {
        if role != "server" && role != "agent" {
            return Err(CommandError::Invalid(skiff_spec::SpecError::new(
                "role",
                format!("unknown role \"{role}\": use server or agent"),
            )));
        }
        *self
            .pki
            .join_generations
            .entry(role.to_string())
            .or_default() += 1;
        let message = format!("the {role} join token was rotated; the old one is refused");
        self.event(index, EventKind::JoinTokenRotated, "", "", "", &message);
        Ok(Outcome::Done)
    }

    pub(super) fn revoke_node(&mut self, index: u64, name: &str) -> Result<Outcome, CommandError> {
        skiff_spec::validate_name(name)?;
        if !self.pki.revoked_nodes.insert(name.to_string()) {
            return Ok(Outcome::Done);
        }
        self.event(
            index,
            EventKind::NodeRevoked,
            "",
            name,
            "",
            "certificate revoked: the node's agent is refused by every server",
        );
        Ok(Outcome::Done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Command;

    #[test]
    fn rotation_bumps_one_role_and_revocation_is_idempotent() {
        let mut state = State::default();
        state
            .apply(
                1,
                Command::RotateJoinToken {
                    role: "agent".into(),
                },
            )
            .unwrap();
        assert_eq!(state.pki.join_generation("agent"), 1);
        assert_eq!(state.pki.join_generation("server"), 0);
        assert!(state
            .apply(2, Command::RotateJoinToken { role: "x".into() })
            .is_err());
        state
            .apply(3, Command::RevokeNode { name: "n1".into() })
            .unwrap();
        state
            .apply(4, Command::RevokeNode { name: "n1".into() })
            .unwrap();
        assert!(state.pki.is_revoked("n1"));
        let revoked = state
            .events
            .iter()
            .filter(|e| e.kind == EventKind::NodeRevoked)
            .count();
        assert_eq!(revoked, 1);
        let image = State::from_image(&state.to_image()).unwrap();
        assert_eq!(image.pki, state.pki);
    }
}
