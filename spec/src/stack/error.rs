//! What can go wrong reading a stack: one error type whose messages name
//! the file, the line and column where known, the key path
//! (`services.web.deploy.replicas`) and the fix; and the warnings the
//! loader collects on the way.

use std::fmt;

use crate::SpecError;

/// Where in which file a key was found; empty when it could not be found
/// (the key path alone then says where).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Position {
    pub file: Option<String>,
    /// 1-based; 0 when only the file is known.
    pub line: usize,
    pub column: usize,
}

/// Written as a prefix: `compose.yaml:12:5: `, `compose.yaml: ` or nothing.
impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.file, self.line) {
            (None, _) => Ok(()),
            (Some(file), 0) => write!(f, "{file}: "),
            (Some(file), line) => write!(f, "{file}:{line}:{}: ", self.column),
        }
    }
}

/// Why a stack could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum StackError {
    #[error("{file}:{line}:{column}: malformed YAML: {problem}")]
    Yaml {
        file: String,
        line: usize,
        column: usize,
        problem: String,
    },
    #[error("{file}: {problem}")]
    File { file: String, problem: String },
    #[error("cannot read {file}: {source}")]
    Read {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}:{line}: {problem}")]
    Dotenv {
        file: String,
        line: usize,
        problem: String,
    },
    #[error("{at}unknown key {path}{}", suggestion.as_ref().map(|s| format!("; did you mean {s}?")).unwrap_or_default())]
    UnknownKey {
        at: Position,
        path: String,
        suggestion: Option<String>,
    },
    #[error("{at}{path}: expected {expected}, found {found}")]
    WrongType {
        at: Position,
        path: String,
        expected: String,
        found: String,
    },
    #[error("{at}{path}: {problem}")]
    Invalid {
        at: Position,
        path: String,
        problem: String,
    },
    /// A Compose feature Skiff does not offer (yet), with what to do.
    #[error("{at}{path}: {problem}")]
    Unsupported {
        at: Position,
        path: String,
        problem: String,
    },
    /// `${VAR:?message}` with VAR unset.
    #[error("{at}{path}: {problem}")]
    Variable {
        at: Position,
        path: String,
        problem: String,
    },
    /// The converted spec fails [`crate::ServiceSpec::validate`].
    #[error("{at}{path}: invalid {}: {}", source.field, source.problem)]
    Validation {
        at: Position,
        path: String,
        #[source]
        source: SpecError,
    },
    #[error("depends_on forms a cycle: {}; remove one of these dependencies", cycle.join(" -> "))]
    Cycle { cycle: Vec<String> },
    #[error("{first} is in Skiff's own format (skiff: v1) and {second} is a Compose file; give -f files of one format")]
    MixedFormats { first: String, second: String },
    /// A warning, refused because the load is strict.
    #[error("{at}{path}: {problem} (a warning, refused under --strict)")]
    Strict {
        at: Position,
        path: String,
        problem: String,
    },
}

impl StackError {
    pub(crate) fn invalid(path: impl Into<String>, problem: impl Into<String>) -> Self {
        StackError::Invalid {
            at: Position::default(),
            path: path.into(),
            problem: problem.into(),
        }
    }

    pub(crate) fn unsupported(path: impl Into<String>, problem: impl Into<String>) -> Self {
        StackError::Unsupported {
            at: Position::default(),
            path: path.into(),
            problem: problem.into(),
        }
    }

    pub(crate) fn unknown_key(path: impl Into<String>, suggestion: Option<String>) -> Self {
        StackError::UnknownKey {
            at: Position::default(),
            path: path.into(),
            suggestion,
        }
    }

    pub(crate) fn wrong_type(
        path: impl Into<String>,
        expected: impl Into<String>,
        found: impl Into<String>,
    ) -> Self {
        StackError::WrongType {
            at: Position::default(),
            path: path.into(),
            expected: expected.into(),
            found: found.into(),
        }
    }

    /// The key path the error is about, if any, and its position to fill.
    pub(crate) fn key_path(&mut self) -> Option<(&str, &mut Position)> {
        match self {
            StackError::UnknownKey { at, path, .. }
            | StackError::WrongType { at, path, .. }
            | StackError::Invalid { at, path, .. }
            | StackError::Unsupported { at, path, .. }
            | StackError::Variable { at, path, .. }
            | StackError::Validation { at, path, .. }
            | StackError::Strict { at, path, .. } => Some((path.as_str(), at)),
            _ => None,
        }
    }
}

/// Something the loader accepted but the operator should know: a Compose
/// key Skiff ignores, a variable that is not set.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Warning {
    pub path: String,
    pub problem: String,
}

impl Warning {
    pub fn new(path: impl Into<String>, problem: impl Into<String>) -> Self {
        Warning {
            path: path.into(),
            problem: problem.into(),
        }
    }
}
