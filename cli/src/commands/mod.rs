//! One module per command noun.

pub mod bench;
pub mod bench_autoscale;
pub mod bench_proxy;
pub mod bench_rollout;
pub mod bench_schedule;
pub mod bench_start;
pub mod cluster;
pub mod daemon;
pub mod deploy;
pub mod events;
pub mod node;
pub mod progress;
pub mod service;
pub mod var;
