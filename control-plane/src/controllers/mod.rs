//! Leader-only control loops. Each is a pure decision over a snapshot plus
//! a thin leader loop that proposes its result through Raft, in a folder
//! of its own with the decision and the loop in files named for them.
//!
//! # Layout
//! - `reconcile/`: desired vs actual replicas (`decide`), the cluster's
//!   plan and its explanations (`plan`), the leader loop (`run`).
//! - `liveness/`: heartbeat TTLs to node status (`decide`, `run`).
//! - `autoscale/`: replica counts from measured load.
//! - `deployment`: each rollout's next step; `rebalance`: spreading a
//!   service again; `stack_plan`: `skiff stack plan`, pure.

pub mod autoscale;
pub(crate) mod deployment;
mod liveness;
mod rebalance;
mod reconcile;
pub mod stack_plan;

use std::time::Duration;

use tokio::sync::watch;

use crate::consensus::Consensus;
pub use deployment::{ReplicaTraffic, Traffic};
pub use liveness::Heartbeats;
pub use reconcile::{explain, plan_cluster};

/// What the routing proxies measured of each replica, as this server
/// knows it now (its agents' reports plus those followers forward).
pub type TrafficSource = std::sync::Arc<dyn Fn() -> Traffic + Send + Sync>;

/// Placements per plan: bounds the size of one Raft entry and how long
/// applying it holds the state; the rest follow in the next plans.
pub const MAX_PLACEMENTS_PER_PLAN: u32 = 25_000;

pub use crate::clock::now_ms;

/// Runs every controller until `shutdown`.
pub async fn run(
    consensus: Consensus,
    heartbeats: Heartbeats,
    traffic: TrafficSource,
    heartbeat_ttl: Duration,
    load: autoscale::LoadSource,
    autoscale_timings: autoscale::Timings,
    shutdown: watch::Receiver<bool>,
) {
    tokio::join!(
        reconcile::run(consensus.clone(), traffic, shutdown.clone()),
        liveness::run(
            consensus.clone(),
            heartbeats,
            heartbeat_ttl,
            shutdown.clone()
        ),
        autoscale::run_autoscaler(consensus, load, autoscale_timings, shutdown),
    );
}
