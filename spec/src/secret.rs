//! Secrets a service's replicas read as files: the reference a spec holds
//! ([`SecretRef`]: which secret, the file it becomes under `/run/secrets`,
//! its mode and what a new version of the secret does to a running
//! replica), its text form (`--secret`) and its validation. The values
//! themselves never appear in a spec: specs are shown by `inspect`, kept in
//! every version of the history and copied into every allocation.

use serde::{Deserialize, Serialize};

use crate::{ServiceSpec, SpecError};

/// Largest secret value, as Swarm's (500 KiB) and Kubernetes' (1 MiB)
/// bound theirs: a secret is a password or a key, and every version of it
/// travels in a Raft entry.
pub const MAX_SECRET_BYTES: usize = 512 * 1024;

/// Most secrets one service references.
pub const MAX_SECRET_REFS: usize = 32;

/// Most secrets a cluster holds (each is kept encrypted in the state of
/// every server and in every snapshot).
pub const MAX_SECRETS: usize = 1000;

/// Most bytes of all secret values together: the state of every server
/// and every snapshot holds each (sealed, in base64: a third more).
pub const MAX_SECRETS_TOTAL_BYTES: usize = 32 * 1024 * 1024;

/// Longest secret name.
pub const MAX_SECRET_NAME: usize = 63;

/// Where secret files appear inside a container (a tmpfs).
pub const SECRETS_DIR: &str = "/run/secrets";

/// Mode of a secret file unless the reference says otherwise.
pub const DEFAULT_SECRET_MODE: u32 = 0o400;

/// What a new version of a secret does to a replica that uses it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind", content = "signal")]
pub enum OnChange {
    /// The service rolls out a new version with its update policy.
    #[default]
    Restart,
    /// The file is replaced in place (a rename in the tmpfs) and the
    /// replica's main process gets this signal (`SIGHUP`); nothing restarts.
    Signal(String),
}

impl OnChange {
    pub fn parse(text: &str) -> Result<Self, SpecError> {
        match text {
            "" | "restart" => Ok(OnChange::Restart),
            other => match other.strip_prefix("signal:") {
                Some(signal) => {
                    let signal = normalize_signal(signal).ok_or_else(|| {
                        SpecError::new(
                            "secret",
                            format!("on-change=\"{other}\" names no signal; use on-change=signal:SIGHUP"),
                        )
                    })?;
                    Ok(OnChange::Signal(signal))
                }
                None => Err(SpecError::new(
                    "secret",
                    format!("unknown on-change \"{other}\"; use on-change=restart or on-change=signal:SIGHUP"),
                )),
            },
        }
    }
}

impl std::fmt::Display for OnChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OnChange::Restart => f.write_str("restart"),
            OnChange::Signal(signal) => write!(f, "signal:{signal}"),
        }
    }
}

/// `HUP`, `sighup` and `SIGHUP` alike become `SIGHUP`; `None` for anything
/// that is not a signal name the agent can send.
fn normalize_signal(text: &str) -> Option<String> {
    let upper = text.trim().to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    const KNOWN: [&str; 8] = [
        "SIGHUP", "SIGUSR1", "SIGUSR2", "SIGINT", "SIGQUIT", "SIGTERM", "SIGWINCH", "SIGALRM",
    ];
    KNOWN.contains(&name.as_str()).then_some(name)
}

/// One secret a service's replicas read, as `/run/secrets/<target>`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretRef {
    /// The secret's name in the cluster (`skiff secret ls`).
    pub name: String,
    /// The file name under [`SECRETS_DIR`]; empty: the secret's name.
    #[serde(default)]
    pub target: String,
    /// The file's mode; 0: [`DEFAULT_SECRET_MODE`].
    #[serde(default)]
    pub mode: u32,
    #[serde(default)]
    pub on_change: OnChange,
    /// The secret's version the replicas run with, set by the control
    /// plane when the spec is committed (a reference that restarts on a
    /// change pins it, so a new version of the secret is a new version of
    /// the service); 0 for `on-change=signal`, which follows the latest.
    #[serde(default)]
    pub version: u64,
}

impl SecretRef {
    /// `--secret NAME[:TARGET][,target=T][,mode=0440][,on-change=restart|signal:SIGHUP]`.
    pub fn parse(text: &str) -> Result<Self, SpecError> {
        let mut parts = text.split(',');
        let first = parts.next().unwrap_or_default();
        let (name, target) = first.split_once(':').unwrap_or((first, ""));
        let mut secret = SecretRef {
            name: name.to_string(),
            target: target.to_string(),
            ..SecretRef::default()
        };
        for option in parts {
            let (key, value) = option.split_once('=').unwrap_or((option, ""));
            match key {
                "target" => secret.target = value.to_string(),
                "mode" => {
                    secret.mode = u32::from_str_radix(value.trim_start_matches("0o"), 8)
                        .map_err(|_| {
                            SpecError::new(
                                "secret",
                                format!("mode \"{value}\" is not an octal mode; use e.g. mode=0440"),
                            )
                        })?
                }
                "on-change" => secret.on_change = OnChange::parse(value)?,
                other => {
                    return Err(SpecError::new(
                        "secret",
                        format!("\"{text}\" has an unknown option \"{other}\"; use NAME[:TARGET][,mode=0400][,on-change=signal:SIGHUP]"),
                    ))
                }
            }
        }
        if let Some(rest) = secret.target.strip_prefix(SECRETS_DIR) {
            secret.target = rest.trim_start_matches('/').to_string();
        }
        secret.validate()?;
        Ok(secret)
    }

    /// The file name under [`SECRETS_DIR`].
    pub fn file_name(&self) -> &str {
        if self.target.is_empty() {
            &self.name
        } else {
            &self.target
        }
    }

    /// The mode of the file.
    pub fn file_mode(&self) -> u32 {
        if self.mode == 0 {
            DEFAULT_SECRET_MODE
        } else {
            self.mode
        }
    }

    pub fn validate(&self) -> Result<(), SpecError> {
        validate_secret_name(&self.name)?;
        let target = self.file_name();
        if !target_ok(target) {
            return Err(SpecError::new(
                "secret",
                format!("target \"{}\" is not a file name in {SECRETS_DIR}; use a name like db_password or {SECRETS_DIR}/db_password", self.target),
            ));
        }
        if self.mode & !0o777 != 0 || self.mode & 0o444 == 0 && self.mode != 0 {
            return Err(SpecError::new(
                "secret",
                format!(
                    "mode {:o} of {} is not a readable file mode; use e.g. mode=0400",
                    self.mode, self.name
                ),
            ));
        }
        Ok(())
    }
}

impl std::fmt::Display for SecretRef {
    /// The `--secret` form, read back by [`SecretRef::parse`].
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)?;
        if !self.target.is_empty() && self.target != self.name {
            write!(f, ":{}", self.target)?;
        }
        if self.mode != 0 && self.mode != DEFAULT_SECRET_MODE {
            write!(f, ",mode=0{:o}", self.mode)?;
        }
        if self.on_change != OnChange::Restart {
            write!(f, ",on-change={}", self.on_change)?;
        }
        Ok(())
    }
}

/// A file name the agent can create in the tmpfs: no directories, no dot
/// names, the characters of a secret name.
fn target_ok(target: &str) -> bool {
    !target.is_empty()
        && target.len() <= 128
        && target != "."
        && target != ".."
        && target
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// A secret's name: letters, digits, `_`, `.` and `-`, starting with a
/// letter or digit (it names a file and appears in commands).
pub fn validate_secret_name(name: &str) -> Result<(), SpecError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_SECRET_NAME
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(SpecError::new(
            "secret",
            format!("name \"{name}\" is invalid; use up to {MAX_SECRET_NAME} letters, digits, '_', '.' and '-', starting with a letter or digit"),
        ))
    }
}

/// A secret value the cluster accepts: not empty, at most
/// [`MAX_SECRET_BYTES`].
pub fn validate_secret_value(name: &str, value: &[u8]) -> Result<(), SpecError> {
    if value.is_empty() {
        return Err(SpecError::new(
            "secret",
            format!("the value of {name} is empty; give a file with the value (--from-file FILE, or - for stdin)"),
        ));
    }
    if value.len() > MAX_SECRET_BYTES {
        return Err(SpecError::new(
            "secret",
            format!(
                "the value of {name} is {} bytes; a secret is at most {MAX_SECRET_BYTES} bytes (512 KiB)",
                value.len()
            ),
        ));
    }
    Ok(())
}

impl ServiceSpec {
    /// The secret references: valid, each file once, at most
    /// [`MAX_SECRET_REFS`].
    pub(crate) fn validate_secrets(&self) -> Result<(), SpecError> {
        if self.secrets.len() > MAX_SECRET_REFS {
            return Err(SpecError::new(
                "secret",
                format!(
                    "{} secrets is too many; use at most {MAX_SECRET_REFS}",
                    self.secrets.len()
                ),
            ));
        }
        let mut files = std::collections::BTreeSet::new();
        for secret in &self.secrets {
            secret.validate()?;
            if !files.insert(secret.file_name()) {
                return Err(SpecError::new(
                    "secret",
                    format!(
                        "two secrets become {SECRETS_DIR}/{}; give each its own target (NAME:TARGET)",
                        secret.file_name()
                    ),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_and_long_forms_parse_and_print_back() {
        let s = SecretRef::parse("db_password").unwrap();
        assert_eq!(s.file_name(), "db_password");
        assert_eq!(s.file_mode(), 0o400);
        assert_eq!(s.on_change, OnChange::Restart);
        let s = SecretRef::parse("tls.key:/run/secrets/key.pem,mode=0440,on-change=signal:hup")
            .unwrap();
        assert_eq!(s.target, "key.pem");
        assert_eq!(s.mode, 0o440);
        assert_eq!(s.on_change, OnChange::Signal("SIGHUP".into()));
        assert_eq!(SecretRef::parse(&s.to_string()).unwrap(), s);
    }

    #[test]
    fn targets_outside_run_secrets_and_odd_names_are_refused() {
        for bad in [
            "x:/etc/passwd",
            "x:../y",
            "x:a/b",
            "-x",
            "",
            "x,on-change=reload",
            "x,on-change=signal:NOPE",
            "x,mode=9",
            "x,mode=0200",
            "x,uid=0",
        ] {
            let err = SecretRef::parse(bad).unwrap_err();
            assert_eq!(err.field, "secret", "{bad}");
        }
    }

    #[test]
    fn two_references_to_one_file_are_refused() {
        let spec = ServiceSpec {
            secrets: vec![
                SecretRef::parse("a:f").unwrap(),
                SecretRef::parse("f").unwrap(),
            ],
            ..ServiceSpec::default()
        };
        let err = spec.validate_secrets().unwrap_err();
        assert!(err.to_string().contains("/run/secrets/f"), "{err}");
    }

    #[test]
    fn values_are_bounded_and_never_empty() {
        assert!(validate_secret_value("x", b"pw").is_ok());
        assert!(validate_secret_value("x", b"").is_err());
        let big = vec![b'a'; MAX_SECRET_BYTES + 1];
        let err = validate_secret_value("x", &big).unwrap_err();
        assert!(err.to_string().contains("512 KiB"), "{err}");
        assert!(validate_secret_value("x", &big[1..]).is_ok());
    }
}
