//! The crate's error: what can stop the agent from running at all. Failures
//! of the sync stream or of single replicas are retried, logged and reported,
//! never returned.

use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("invalid agent configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}
