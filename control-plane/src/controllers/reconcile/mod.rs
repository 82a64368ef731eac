//! The reconciler: what each service's replicas need (`decide`, pure), the
//! cluster's plan from those decisions (`plan`, pure), and the leader loop
//! that proposes it (`run`).

mod decide;
mod job;
mod plan;
mod run;

pub(crate) use decide::{scale_down_order, REPLACEMENT_SERVING_MS};
pub use plan::{explain, plan_cluster};
pub use run::run;
