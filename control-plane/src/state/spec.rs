//! The service spec an operator declares, and its validation. Validation
//! runs on the server before a proposal and again when a command is applied,
//! so a bad spec can never reach the state machine from any client.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Upper bound on replicas of one service: far above what a 50-node cluster
/// runs, low enough that a typo (`--replicas 100000`) is refused, not obeyed.
pub const MAX_REPLICAS: u32 = 1000;

/// Longest service name; a DNS label, so names can become hostnames later.
pub const MAX_NAME_LEN: usize = 63;

/// How a replica is run on its node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeKind {
    /// A host process per replica, like Nomad's raw_exec.
    Process,
}

impl RuntimeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RuntimeKind::Process => "process",
        }
    }

    pub fn parse(value: &str) -> Result<Self, SpecError> {
        match value {
            "process" | "" => Ok(RuntimeKind::Process),
            other => Err(SpecError::new(
                "runtime",
                format!("unknown runtime \"{other}\"; use --runtime process"),
            )),
        }
    }
}

/// What the operator wants to run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSpec {
    pub name: String,
    pub runtime: RuntimeKind,
    pub replicas: u32,
    /// Program and arguments; `$PORT` in them is replaced by the agent.
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// Working directory; `None` runs in the allocation's own directory.
    pub workdir: Option<String>,
}

/// A spec field that is wrong, with what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[error("invalid {field}: {problem}")]
pub struct SpecError {
    pub field: String,
    pub problem: String,
}

impl SpecError {
    pub fn new(field: &str, problem: impl Into<String>) -> Self {
        SpecError {
            field: field.to_string(),
            problem: problem.into(),
        }
    }
}

impl ServiceSpec {
    /// Checks every field; the first problem found is returned.
    pub fn validate(&self) -> Result<(), SpecError> {
        validate_name(&self.name)?;
        validate_replicas(i64::from(self.replicas))?;
        match self.command.first() {
            None => {
                return Err(SpecError::new(
                    "command",
                    "the command is empty; give it after `--`, e.g. `-- python3 -m http.server '$PORT'`",
                ))
            }
            Some(program) if program.trim().is_empty() => {
                return Err(SpecError::new("command", "the program name is blank"))
            }
            Some(_) => {}
        }
        if self.command.iter().any(|arg| arg.contains('\0')) {
            return Err(SpecError::new(
                "command",
                "arguments may not contain NUL bytes",
            ));
        }
        for (key, value) in &self.env {
            validate_env(key, value)?;
        }
        if let Some(dir) = &self.workdir {
            if !dir.starts_with('/') {
                return Err(SpecError::new(
                    "workdir",
                    format!("\"{dir}\" is not an absolute path"),
                ));
            }
        }
        Ok(())
    }
}

/// A service name is a DNS label: 1-63 of `a-z`, `0-9` and `-`, starting
/// with a letter and not ending with `-`.
pub fn validate_name(name: &str) -> Result<(), SpecError> {
    let fix = "use 1-63 lowercase letters, digits and '-', starting with a letter";
    if name.is_empty() {
        return Err(SpecError::new("name", format!("the name is empty; {fix}")));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(SpecError::new(
            "name",
            format!("\"{name}\" is {} characters long; {fix}", name.len()),
        ));
    }
    let valid_chars = name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    let starts_with_letter = name.starts_with(|c: char| c.is_ascii_lowercase());
    if !valid_chars || !starts_with_letter || name.ends_with('-') {
        return Err(SpecError::new(
            "name",
            format!("\"{name}\" is not valid; {fix}"),
        ));
    }
    Ok(())
}

/// Replicas must lie in `0..=MAX_REPLICAS`; takes a signed value so that a
/// negative count from any client is named as such.
pub fn validate_replicas(replicas: i64) -> Result<u32, SpecError> {
    if !(0..=i64::from(MAX_REPLICAS)).contains(&replicas) {
        return Err(SpecError::new(
            "replicas",
            format!("{replicas} is out of range; use a count from 0 to {MAX_REPLICAS}"),
        ));
    }
    Ok(replicas as u32)
}

/// Environment keys follow POSIX shell names so every program can read them.
pub fn validate_env(key: &str, value: &str) -> Result<(), SpecError> {
    let valid_key = !key.is_empty()
        && key.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid_key {
        return Err(SpecError::new(
            "env",
            format!("\"{key}\" is not a valid variable name; use letters, digits and '_', not starting with a digit"),
        ));
    }
    if key == "PORT" {
        return Err(SpecError::new(
            "env",
            "PORT is set by skiff to the replica's host port; choose another name",
        ));
    }
    if value.contains('\0') {
        return Err(SpecError::new(
            "env",
            format!("the value of {key} contains a NUL byte"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ServiceSpec {
        ServiceSpec {
            name: "web".into(),
            runtime: RuntimeKind::Process,
            replicas: 3,
            command: vec!["python3".into(), "-m".into(), "http.server".into()],
            env: BTreeMap::new(),
            workdir: None,
        }
    }

    #[test]
    fn a_plain_spec_is_valid() {
        assert_eq!(spec().validate(), Ok(()));
    }

    #[test]
    fn an_empty_command_is_refused_naming_the_command() {
        let mut s = spec();
        s.command.clear();
        assert_eq!(s.validate().unwrap_err().field, "command");
        s.command = vec!["  ".into()];
        assert_eq!(s.validate().unwrap_err().field, "command");
    }

    #[test]
    fn replica_counts_outside_the_range_are_refused() {
        assert!(validate_replicas(-1)
            .unwrap_err()
            .to_string()
            .contains("-1"));
        assert!(validate_replicas(1001).is_err());
        assert_eq!(validate_replicas(0), Ok(0));
        assert_eq!(validate_replicas(1000), Ok(1000));
        let mut s = spec();
        s.replicas = 100_000;
        assert_eq!(s.validate().unwrap_err().field, "replicas");
    }

    #[test]
    fn names_must_be_dns_labels() {
        for bad in ["", "Web", "1web", "web-", "we b", "web_1", &"a".repeat(64)] {
            assert_eq!(validate_name(bad).unwrap_err().field, "name", "{bad:?}");
        }
        for good in ["web", "web-1", "a", &"a".repeat(63)] {
            assert_eq!(validate_name(good), Ok(()), "{good:?}");
        }
    }

    #[test]
    fn env_keys_must_be_shell_names_and_port_is_reserved() {
        assert!(validate_env("GREETING", "hi").is_ok());
        assert!(validate_env("_X1", "").is_ok());
        for bad in ["", "1X", "A-B", "A=B"] {
            assert!(validate_env(bad, "v").is_err(), "{bad:?}");
        }
        assert!(validate_env("PORT", "80")
            .unwrap_err()
            .problem
            .contains("PORT"));
    }

    #[test]
    fn relative_workdirs_are_refused() {
        let mut s = spec();
        s.workdir = Some("tmp".into());
        assert_eq!(s.validate().unwrap_err().field, "workdir");
    }

    #[test]
    fn unknown_runtimes_are_refused() {
        assert_eq!(RuntimeKind::parse("docker").unwrap_err().field, "runtime");
    }
}
