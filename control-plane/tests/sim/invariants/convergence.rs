//! Convergence: once healed and settled, all state machines are equal.

use crate::harness::{Disk, Sim};

pub fn state_machines_converge<D: Disk>(sim: &Sim<D>) {
    let states = sim.states();
    let (first_id, first) = &states[0];
    for (id, state) in &states[1..] {
        assert_eq!(
            state.applied_index, first.applied_index,
            "server {id} applied {} but server {first_id} applied {}",
            state.applied_index, first.applied_index
        );
        assert!(
            state.same_records(first),
            "server {id} and server {first_id} differ at applied index {}",
            state.applied_index
        );
    }
}
