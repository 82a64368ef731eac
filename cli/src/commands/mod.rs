//! One module per command noun.

pub mod bench;
pub mod bench_autoscale;
pub mod bench_chaos;
pub mod bench_proxy;
pub mod bench_rollout;
pub mod bench_schedule;
pub mod bench_start;
pub mod bench_stateful;
pub mod cluster;
pub mod completion;
pub mod daemon;
pub mod deploy;
pub mod events;
pub mod exec;
pub mod job;
pub mod linearizable;
pub mod man;
pub mod node;
pub mod pgwire;
pub mod progress;
pub mod secret;
pub mod service;
pub mod stack;
pub mod token;
pub mod var;
pub mod volume;

/// Ends the command with this exit status and no message (what it had to
/// say is printed): `stack plan`'s 2 for "changes".
#[derive(Debug)]
pub struct Exit(pub u8);

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit status {}", self.0)
    }
}

impl std::error::Error for Exit {}
