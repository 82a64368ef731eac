//! Secrets in the replicated state: each secret's current version and a
//! few earlier ones, sealed (encrypted) by the server that proposed them
//! with the cluster's secrets key (see `crate::secrets`), so the Raft log,
//! the snapshots and every server's memory hold only ciphertext. Applying
//! never needs the key: it stores what it is given, counts versions, pins
//! the version a service's restarting references run with, rolls those
//! services out when the secret changes, and keeps the versions a rollback
//! may return to: the last [`KEEP_SECRET_VERSIONS`] and any a service
//! version (its spec or its history) or a replica still pins.

use serde::{Deserialize, Serialize};
use skiff_spec::{OnChange, SpecError};

use super::{CommandError, EventKind, Outcome, ServiceSpec, State};

/// Versions kept of a secret, the current one included, beyond those still
/// pinned by a service version or a replica.
pub const KEEP_SECRET_VERSIONS: usize = 5;

/// An earlier version of a secret, kept for rollbacks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretVersion {
    pub version: u64,
    /// Sealed as [`Secret::sealed`].
    pub sealed: String,
    pub size_bytes: u64,
    /// When it became the current version.
    pub created_ms: u64,
}

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
    /// Earlier versions still kept, oldest first (none in snapshots from
    /// before versions were kept).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub previous: Vec<SecretVersion>,
}

impl Secret {
    /// The sealed value of `version` (0: the current one) and its number,
    /// if it is kept.
    pub fn sealed_version(&self, version: u64) -> Option<(u64, &str)> {
        if version == 0 || version == self.version {
            return Some((self.version, &self.sealed));
        }
        self.previous
            .iter()
            .find(|v| v.version == version)
            .map(|v| (v.version, v.sealed.as_str()))
    }

    /// Bytes of every kept version.
    pub fn kept_bytes(&self) -> u64 {
        self.size_bytes + self.previous.iter().map(|v| v.size_bytes).sum::<u64>()
    }
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
        self.resolve_secrets_keeping(spec, false)
    }

    /// [`State::resolve_secrets`]; with `keep_pinned` (a rollback), a
    /// restarting reference keeps the version it pins while that version
    /// is kept, so the earlier service version runs with the value it was
    /// deployed with.
    pub(super) fn resolve_secrets_keeping(
        &self,
        spec: &mut ServiceSpec,
        keep_pinned: bool,
    ) -> Result<(), CommandError> {
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
            let kept = keep_pinned
                && reference.version != 0
                && secret.sealed_version(reference.version).is_some();
            reference.version = match reference.on_change {
                OnChange::Restart if kept => reference.version,
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
        // Every kept version counts: an update keeps the value it replaces
        // (those the pruning would drop are not counted).
        let previous = self
            .secrets
            .get(&write.name)
            .filter(|_| !write.create)
            .map(|s| self.kept_previous(s))
            .unwrap_or_default();
        let others: u64 = self
            .secrets
            .values()
            .filter(|s| s.name != write.name)
            .map(Secret::kept_bytes)
            .sum::<u64>()
            + previous.iter().map(|v| v.size_bytes).sum::<u64>();
        let max = skiff_spec::MAX_SECRETS_TOTAL_BYTES as u64;
        if others + write.size_bytes > max {
            return Err(CommandError::Secret(format!(
                "too much secret data: the cluster holds {others} bytes of secrets (kept versions included) and takes at most {max}; remove unused ones with `skiff secret rm NAME`"
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
                secret.previous = previous;
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
                        previous: Vec::new(),
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

    /// The earlier versions of `secret` to keep once its current version
    /// is replaced: the last [`KEEP_SECRET_VERSIONS`] - 1 and any pinned.
    fn kept_previous(&self, secret: &Secret) -> Vec<SecretVersion> {
        let mut all = secret.previous.clone();
        all.push(SecretVersion {
            version: secret.version,
            sealed: secret.sealed.clone(),
            size_bytes: secret.size_bytes,
            created_ms: secret.updated_ms,
        });
        let pinned = self.pinned_secret_versions(&secret.name);
        let recent = all.len().saturating_sub(KEEP_SECRET_VERSIONS - 1);
        all.into_iter()
            .enumerate()
            .filter(|(i, v)| *i >= recent || pinned.contains(&v.version))
            .map(|(_, v)| v)
            .collect()
    }

    /// The versions of secret `name` that a service's spec or history, or
    /// a replica, pins.
    fn pinned_secret_versions(&self, name: &str) -> std::collections::BTreeSet<u64> {
        let specs = self
            .services
            .values()
            .flat_map(|s| std::iter::once(&s.spec).chain(s.history.iter().map(|r| &r.spec)))
            .chain(self.allocs.values().map(|a| &a.spec));
        specs
            .flat_map(|spec| spec.secrets.iter())
            .filter(|r| r.name == name && r.version != 0)
            .map(|r| r.version)
            .collect()
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

    #[test]
    fn a_rollback_runs_with_the_secret_version_its_service_version_pinned() {
        let mut s = State::default();
        s.apply(1, put("pw", "AAA", true)).unwrap();
        s.apply(
            2,
            Command::CreateService {
                spec: with_secret(spec("web", 1), "pw"),
            },
        )
        .unwrap();
        s.apply(3, put("pw", "BBB", false)).unwrap();
        assert_eq!(s.services["web"].spec.secrets[0].version, 2);
        s.apply(
            4,
            Command::RollbackService {
                name: "web".into(),
                to_version: Some(1),
            },
        )
        .unwrap();
        let web = &s.services["web"];
        assert_eq!(web.version, 3);
        assert_eq!(
            web.spec.secrets[0].version, 1,
            "the value version 1 ran with"
        );
        let pw = &s.secrets["pw"];
        assert_eq!(pw.version, 2, "the secret itself is unchanged");
        assert_eq!(pw.sealed_version(1), Some((1, "AAA")));
        assert_eq!(pw.sealed_version(0), Some((2, "BBB")));
        // A plain update afterwards runs with the current version again.
        let mut updated = s.services["web"].spec.clone();
        updated.env.insert("A".into(), "1".into());
        s.apply(5, Command::UpdateService { spec: updated })
            .unwrap();
        assert_eq!(s.services["web"].spec.secrets[0].version, 2);
    }

    #[test]
    fn earlier_versions_are_kept_up_to_five_beyond_those_still_pinned() {
        let mut s = State::default();
        s.apply(1, put("pw", "v1", true)).unwrap();
        s.apply(
            2,
            Command::CreateService {
                spec: with_secret(spec("web", 1), "pw"),
            },
        )
        .unwrap();
        s.apply(3, Command::RemoveService { name: "web".into() })
            .unwrap();
        for i in 2..=12u64 {
            s.apply(2 + i, put("pw", &format!("v{i}"), false)).unwrap();
        }
        let pw = &s.secrets["pw"];
        assert_eq!(pw.version, 12);
        let kept: Vec<u64> = pw.previous.iter().map(|v| v.version).collect();
        assert_eq!(kept, [8, 9, 10, 11], "the current one and four before it");
        assert!(pw.sealed_version(7).is_none());

        // A version a service's history pins outlives the count.
        let mut s = State::default();
        s.apply(1, put("pw", "v1", true)).unwrap();
        s.apply(
            2,
            Command::CreateService {
                spec: with_secret(spec("web", 1), "pw"),
            },
        )
        .unwrap();
        for i in 2..=12u64 {
            s.apply(1 + i, put("pw", &format!("v{i}"), false)).unwrap();
        }
        let pw = &s.secrets["pw"];
        assert!(pw.sealed_version(1).is_some(), "web's version 1 pins it");
        assert!(pw.previous.len() <= 4 + crate::state::HISTORY_LEN);
    }

    #[test]
    fn a_snapshot_from_before_versions_were_kept_reads_with_none_kept() {
        let old = r#"{"name":"pw","version":3,"sealed":"x","size_bytes":1,"created_ms":0,"updated_ms":0,"create_index":1,"modify_index":2}"#;
        let secret: Secret = serde_json::from_str(old).unwrap();
        assert!(secret.previous.is_empty());
        assert_eq!(secret.sealed_version(3), Some((3, "x")));
        assert_eq!(secret.sealed_version(2), None);
    }
}
