//! Secrets in the replicated state: each secret's current version, sealed
//! (encrypted) by the server that proposed it with the cluster's secrets
//! key (see `crate::secrets`), so the Raft log, the snapshots and every
//! server's memory hold only ciphertext. Applying never needs the key:
//! it stores what it is given, counts versions, pins the version a
//! service's restarting references run with, and rolls those services out
//! when the secret changes.

use serde::{Deserialize, Serialize};
use skiff_spec::{OnChange, SpecError};

use super::{CommandError, EventKind, Outcome, ServiceSpec, State};

/// A secret as the state keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Secret {
    pub name: String,
    /// 1 at creation, +1 per `secret update`.
    pub version: u64,
    /// The value, sealed with the cluster key: nonce and ciphertext, in
    /// base64 (see `crate::secrets::SecretKey::seal`).
    pub sealed: String,
    /// Bytes of the plain value.
    pub size_bytes: u64,
    pub created_ms: u64,
    pub updated_ms: u64,
    pub create_index: u64,
    pub modify_index: u64,
}

/// A new value of a secret, sealed by the proposer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretWrite {
    pub name: String,
    pub sealed: String,
    pub size_bytes: u64,
    /// `secret create` (refused if it exists) or `secret update` (refused
    /// if it does not).
    pub create: bool,
}

impl State {
    /// The services whose spec references `name`, by name.
    pub fn secret_users(&self, name: &str) -> Vec<String> {
        self.services
            .values()
            .filter(|s| s.spec.secrets.iter().any(|r| r.name == name))
            .map(|s| s.spec.name.clone())
            .collect()
    }

    /// Refuses references to secrets that do not exist, and pins the
    /// current version of every restarting reference (a reference that
    /// signals follows the latest and pins nothing).
    pub fn resolve_secrets(&self, spec: &mut ServiceSpec) -> Result<(), CommandError> {
        for reference in &mut spec.secrets {
            let Some(secret) = self.secrets.get(&reference.name) else {
                return Err(SpecError::new(
                    "secret",
                    format!(
                        "secret \"{0}\" not found; create it with `skiff secret create {0} --from-file FILE`",
                        reference.name
                    ),
                )
                .into());
            };
            reference.version = match reference.on_change {
                OnChange::Restart => secret.version,
                OnChange::Signal(_) => 0,
            };
        }
        Ok(())
    }

    pub(super) fn put_secret(
        &mut self,
        index: u64,
        write: SecretWrite,
    ) -> Result<Outcome, CommandError> {
        skiff_spec::validate_secret_name(&write.name)?;
        let now = self.clock_ms;
        let others: u64 = self
            .secrets
            .values()
            .filter(|s| s.name != write.name)
            .map(|s| s.size_bytes)
            .sum();
        let max = skiff_spec::MAX_SECRETS_TOTAL_BYTES as u64;
        if others + write.size_bytes > max {
            return Err(CommandError::Secret(format!(
                "too much secret data: the cluster holds {others} bytes of secrets and takes at most {max}; remove unused ones with `skiff secret rm NAME`"
            )));
        }
        let version = match (self.secrets.get_mut(&write.name), write.create) {
            (Some(_), true) => {
                return Err(CommandError::Secret(format!(
                    "secret \"{0}\" already exists; give it a new value with `skiff secret update {0} --from-file FILE`",
                    write.name
                )))
            }
            (None, false) => {
                return Err(CommandError::Secret(format!(
                    "secret \"{0}\" not found; create it with `skiff secret create {0} --from-file FILE`",
                    write.name
                )))
            }
            (Some(secret), false) => {
                secret.version += 1;
                secret.sealed = write.sealed;
                secret.size_bytes = write.size_bytes;
                secret.updated_ms = now;
                secret.modify_index = index;
                secret.version
            }
            (None, true) => {
                if self.secrets.len() >= skiff_spec::MAX_SECRETS {
                    return Err(CommandError::Secret(format!(
                        "too many secrets: the cluster holds {}; remove unused ones with `skiff secret rm NAME`",
                        self.secrets.len()
                    )));
                }
                self.secrets.insert(
                    write.name.clone(),
                    Secret {
                        name: write.name.clone(),
                        version: 1,
                        sealed: write.sealed,
                        size_bytes: write.size_bytes,
                        created_ms: now,
                        updated_ms: now,
                        create_index: index,
                        modify_index: index,
                    },
                );
                1
            }
        };
        let (kind, verb) = if version == 1 {
            (EventKind::SecretCreated, "created")
        } else {
            (EventKind::SecretUpdated, "updated")
        };
        let message = format!(
            "secret {} {verb} (version {version}, {} bytes)",
            write.name, write.size_bytes
        );
        self.event(index, kind, "", "", "", &message);
        if version > 1 {
            self.roll_out_secret(index, &write.name);
        }
        Ok(Outcome::Done)
    }

    /// A new version of `name`: services that restart on it roll out a new
    /// version pinning it (with their update policy); the agents of nodes
    /// running replicas that use it get the new value (those that signal
    /// swap the file in place).
    fn roll_out_secret(&mut self, index: u64, name: &str) {
        let restarting: Vec<ServiceSpec> = self
            .services
            .values()
            .filter(|s| {
                s.spec
                    .secrets
                    .iter()
                    .any(|r| r.name == name && r.on_change == OnChange::Restart)
            })
            .map(|s| s.spec.clone())
            .collect();
        for spec in restarting {
            // The spec was valid when committed and its secrets exist, so
            // the update cannot be refused.
            let _ = self.update_service(index, spec, None);
        }
        let nodes: Vec<String> = self
            .allocs
            .values()
            .filter(|a| a.spec.secrets.iter().any(|r| r.name == name))
            .map(|a| a.node.clone())
            .collect();
        for node in nodes {
            self.index.node_changed.insert(node, index);
        }
    }

    /// `skiff secret rm`: refused while a service references it.
    pub(super) fn remove_secret(
        &mut self,
        index: u64,
        name: &str,
    ) -> Result<Outcome, CommandError> {
        if !self.secrets.contains_key(name) {
            return Err(CommandError::Secret(format!(
                "secret \"{name}\" not found; see `skiff secret ls`"
            )));
        }
        let users = self.secret_users(name);
        if let Some(first) = users.first() {
            return Err(CommandError::Secret(format!(
                "secret \"{name}\" is used by service {}; remove it from them first (`skiff service update {first} --secret-rm {name}`)",
                users.join(", ")
            )));
        }
        self.secrets.remove(name);
        let message = format!("secret {name} removed");
        self.event(index, EventKind::SecretRemoved, "", "", "", &message);
        Ok(Outcome::Done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::fixtures::spec;
    use crate::state::Command;

    fn put(name: &str, sealed: &str, create: bool) -> Command {
        Command::PutSecret {
            secret: SecretWrite {
                name: name.into(),
                sealed: sealed.into(),
                size_bytes: 2,
                create,
            },
        }
    }

    fn with_secret(mut spec: ServiceSpec, reference: &str) -> ServiceSpec {
        spec.secrets
            .push(skiff_spec::SecretRef::parse(reference).unwrap());
        spec
    }

    #[test]
    fn an_unknown_secret_is_refused_and_nothing_changes() {
        let mut s = State::default();
        let err = s
            .apply(
                1,
                Command::CreateService {
                    spec: with_secret(spec("web", 1), "nope"),
                },
            )
            .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("invalid secret: secret \"nope\" not found"),
            "{err}"
        );
        assert!(s.services.is_empty());
    }

    #[test]
    fn a_secret_update_rolls_out_restarting_services_and_not_signalled_ones() {
        let mut s = State::default();
        s.apply(1, put("pw", "AAA", true)).unwrap();
        s.apply(
            2,
            Command::CreateService {
                spec: with_secret(spec("web", 1), "pw"),
            },
        )
        .unwrap();
        s.apply(
            3,
            Command::CreateService {
                spec: with_secret(spec("api", 1), "pw,on-change=signal:SIGHUP"),
            },
        )
        .unwrap();
        assert_eq!(s.services["web"].spec.secrets[0].version, 1);
        assert_eq!(s.services["api"].spec.secrets[0].version, 0);
        s.apply(4, put("pw", "BBB", false)).unwrap();
        assert_eq!(s.secrets["pw"].version, 2);
        assert_eq!(s.services["web"].version, 2);
        assert_eq!(s.services["web"].spec.secrets[0].version, 2);
        assert_eq!(s.services["api"].version, 1);
        let kinds: Vec<_> = s.events.iter().map(|e| e.kind).collect();
        assert!(kinds.contains(&EventKind::SecretUpdated));
        assert!(s.events.iter().all(|e| !e.message.contains("BBB")));
    }

    #[test]
    fn a_secret_in_use_is_not_removed() {
        let mut s = State::default();
        s.apply(1, put("pw", "AAA", true)).unwrap();
        s.apply(
            2,
            Command::CreateService {
                spec: with_secret(spec("web", 1), "pw"),
            },
        )
        .unwrap();
        let rm = || Command::RemoveSecret { name: "pw".into() };
        let err = s.apply(3, rm()).unwrap_err();
        assert!(err.to_string().contains("used by service web"), "{err}");
        s.apply(4, Command::RemoveService { name: "web".into() })
            .unwrap();
        s.apply(5, rm()).unwrap();
        assert!(s.secrets.is_empty());
    }

    #[test]
    fn create_twice_and_update_of_a_missing_secret_are_refused() {
        let mut s = State::default();
        s.apply(1, put("pw", "AAA", true)).unwrap();
        assert!(s.apply(2, put("pw", "AAA", true)).is_err());
        assert!(s.apply(3, put("other", "AAA", false)).is_err());
        assert_eq!(s.secrets["pw"].version, 1);
    }
}
