//! Skiff's control plane: Raft consensus over sled, the replicated state
//! machine, the scheduler, the controllers and the gRPC API.

pub mod api;
pub mod consensus;
pub mod controllers;
pub mod metrics;
pub mod scheduler;
pub mod server;
pub mod state;

pub use server::{run, RaftLog, ServerConfig, ServerError};
