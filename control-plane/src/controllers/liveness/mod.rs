//! Node liveness: which nodes are down by their heartbeats (`decide`, pure)
//! and the leader loop that records it (`run`).

mod decide;
mod run;

pub use decide::Heartbeats;
pub use run::run;
