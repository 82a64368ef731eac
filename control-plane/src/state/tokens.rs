//! API tokens in the replicated state: each token's name, role, expiry and
//! the SHA-256 of its secret (hex). The secret itself is never proposed,
//! stored or logged: the server that creates a token hashes it before the
//! command is proposed, and the API layer hashes what a caller presents to
//! look it up (see `api::auth`). A revoked token keeps its record, so a
//! caller presenting it is told it was revoked rather than unknown.

use serde::{Deserialize, Serialize};

use super::{CommandError, EventKind, Outcome, State};

/// What a token may do, lowest first: each role may do everything the
/// roles below it may.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Lists, gets, inspect, events, logs, cluster status.
    ReadOnly,
    /// Also every write to services, stacks, jobs, volumes, secrets and
    /// variables, and `exec`.
    Operator,
    /// Also tokens, nodes, servers and secret-bearing reads
    /// (`--show-values`).
    Admin,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::ReadOnly, Role::Operator, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::ReadOnly => "read-only",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    pub fn parse(text: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == text)
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A token as the state keeps it (never its secret).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Token {
    pub name: String,
    pub role: Role,
    /// SHA-256 of the secret, lowercase hex.
    pub hash: String,
    pub created_ms: u64,
    /// After this (milliseconds since the epoch) the token is refused.
    #[serde(default)]
    pub expires_ms: Option<u64>,
    /// When `skiff token revoke` removed it; a revoked token is refused.
    #[serde(default)]
    pub revoked_ms: Option<u64>,
    /// The token that created it (empty: the server, at bootstrap).
    #[serde(default)]
    pub created_by: String,
}

impl Token {
    /// Whether it is expired at `now_ms`.
    pub fn expired(&self, now_ms: u64) -> bool {
        self.expires_ms.is_some_and(|at| now_ms >= at)
    }
}

/// A new token, as proposed: its secret already hashed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenWrite {
    pub name: String,
    pub role: Role,
    pub hash: String,
    #[serde(default)]
    pub expires_ms: Option<u64>,
}

impl State {
    /// The token whose secret hashes to `hash`, revoked or expired ones too.
    pub fn token_by_hash(&self, hash: &str) -> Option<&Token> {
        self.tokens.values().find(|t| t.hash == hash)
    }

    /// `skiff token create`: refused while a token of that name is in use
    /// (a revoked or expired name may be taken again).
    pub(super) fn create_token(
        &mut self,
        index: u64,
        write: TokenWrite,
    ) -> Result<Outcome, CommandError> {
        let now = self.clock_ms;
        if let Some(old) = self.tokens.get(&write.name) {
            if old.revoked_ms.is_none() && !old.expired(now) {
                return Err(CommandError::Token(format!(
                    "token \"{}\" already exists; revoke it first (`skiff token revoke {}`) or choose another name",
                    write.name, write.name
                )));
            }
        }
        if self.tokens.values().any(|t| t.hash == write.hash) {
            return Err(CommandError::Token(
                "a token with this secret already exists; create it again".into(),
            ));
        }
        let token = Token {
            name: write.name.clone(),
            role: write.role,
            hash: write.hash,
            created_ms: now,
            expires_ms: write.expires_ms,
            revoked_ms: None,
            created_by: self.by.clone(),
        };
        let message = match token.expires_ms {
            Some(at) => format!("token {} ({}), expires at {at} ms", token.name, token.role),
            None => format!("token {} ({})", token.name, token.role),
        };
        self.tokens.insert(write.name, token);
        self.event(index, EventKind::TokenCreated, "", "", "", &message);
        Ok(Outcome::Done)
    }

    /// `skiff token revoke`: the token is refused from now on.
    pub(super) fn revoke_token(&mut self, index: u64, name: &str) -> Result<Outcome, CommandError> {
        let now = self.clock_ms;
        match self.tokens.get_mut(name) {
            Some(token) if token.revoked_ms.is_none() => {
                token.revoked_ms = Some(now);
                let message = format!("token {name} ({})", token.role);
                self.event(index, EventKind::TokenRevoked, "", "", "", &message);
                Ok(Outcome::Done)
            }
            Some(_) => Err(CommandError::Token(format!(
                "token \"{name}\" is already revoked"
            ))),
            None => Err(CommandError::Token(format!(
                "token \"{name}\" not found; see `skiff token ls`"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Command;

    fn write(name: &str, hash: &str) -> Command {
        Command::CreateToken {
            token: TokenWrite {
                name: name.into(),
                role: Role::Operator,
                hash: hash.into(),
                expires_ms: Some(5000),
            },
        }
    }

    #[test]
    fn a_token_is_created_once_revoked_and_its_name_taken_again() {
        let mut s = State::default();
        s.apply(1, write("ci", "aa").at_by(1000, Some("management".into())))
            .unwrap();
        let token = &s.tokens["ci"];
        assert_eq!(
            (token.created_ms, token.created_by.as_str()),
            (1000, "management")
        );
        assert!(s.apply(2, write("ci", "bb").at(1001)).is_err());
        s.apply(3, Command::RevokeToken { name: "ci".into() }.at(1002))
            .unwrap();
        assert_eq!(s.tokens["ci"].revoked_ms, Some(1002));
        assert!(s
            .apply(4, Command::RevokeToken { name: "ci".into() }.at(1003))
            .is_err());
        s.apply(5, write("ci", "cc").at(1004)).unwrap();
        assert_eq!(s.token_by_hash("cc").map(|t| t.revoked_ms), Some(None));
        assert!(s.token_by_hash("aa").is_none());
        let image = State::from_image(&s.to_image()).unwrap();
        assert!(image.same_records(&s));
    }

    #[test]
    fn roles_are_ordered_and_spelled_as_the_cli_takes_them() {
        assert!(Role::ReadOnly < Role::Operator && Role::Operator < Role::Admin);
        for role in Role::ALL {
            assert_eq!(Role::parse(role.as_str()), Some(role));
        }
        assert_eq!(Role::parse("root"), None);
    }
}
