//! Skiff's control plane: Raft consensus over sled, the replicated state
//! machine, the scheduler, the controllers and the gRPC API.
//!
//! Layout:
//! - `server`: [`run`], `skiff server`: opens the data dir, joins or
//!   bootstraps the cluster and starts everything below.
//! - `consensus`: one thread driving the Raft node, its log storage
//!   (sled, WAL, in memory) and the transport between servers.
//! - `state`: the replicated state machine every command is applied to.
//! - `scheduler`: the pure placement of replicas on nodes.
//! - `controllers`: the leader-only decisions (reconciler, deployments,
//!   liveness, autoscaler) and the loops that propose them.
//! - `api`: the gRPC services for the CLI, agents and other servers; the
//!   only layer that builds `tonic::Status`.
//! - `clock`: this server's clock, monotonic and slewed toward the wall
//!   clock, so that a clock jump moves no deadline.
//! - `metrics`: the Prometheus endpoint.
//! - `secrets`: the cluster's secrets key and the sealing of values.
//! - `client_config`: the `client.toml` the CLI reads its server and API
//!   token from, written at bootstrap with the management token.
//!
//! Other crates use `consensus`, `controllers`, `scheduler` and `state`;
//! the rest is private to this crate.

mod api;
pub mod backup;
pub mod bench;
pub mod client_config;
pub mod clock;
pub mod consensus;
pub mod controllers;
mod metrics;
pub mod scheduler;
pub mod secrets;
mod server;
pub mod state;
pub mod trust;

pub use api::{Limits, MANAGEMENT_TOKEN};
pub use client_config::{ClientConfig, ClientConfigError, CLIENT_CONFIG_FILE};
pub use server::{run, GrpcLimits, RaftLog, ServerConfig, ServerError};
