//! Applying commands, one module per subject, each an `impl State` block
//! called by [`State::apply`](super::State::apply).

mod allocs;
mod deployments;
mod nodes;
mod plans;
mod services;
