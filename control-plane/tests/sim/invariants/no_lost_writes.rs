//! Durability: every write acknowledged to a client is in every server's
//! state once the cluster has healed, whatever crashed in between.

use crate::harness::{Disk, Sim};

pub fn no_acknowledged_write_lost<D: Disk>(sim: &Sim<D>) {
    for (server, state) in sim.states() {
        for name in sim.acknowledged() {
            assert!(
                state.services.contains_key(name),
                "acknowledged write {name} missing on server {server} (applied {})",
                state.applied_index
            );
        }
    }
}
