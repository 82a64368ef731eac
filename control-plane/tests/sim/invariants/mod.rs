//! The properties every simulated run must keep; one file each.

mod convergence;
mod election_safety;
mod no_lost_writes;

pub use convergence::state_machines_converge;
pub use election_safety::LeaderLog;
pub use no_lost_writes::no_acknowledged_write_lost;
