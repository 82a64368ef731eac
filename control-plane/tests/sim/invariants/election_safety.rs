//! Election safety: never two leaders in one term. Checked after every
//! step of the simulation, for every server that believes it leads.

use std::collections::HashMap;

#[derive(Default)]
pub struct LeaderLog {
    leaders: HashMap<u64, u64>,
}

impl LeaderLog {
    pub fn observe(&mut self, term: u64, leader: u64) {
        let first = *self.leaders.entry(term).or_insert(leader);
        assert_eq!(
            first, leader,
            "two leaders in term {term}: servers {first} and {leader}"
        );
    }

    pub fn terms(&self) -> usize {
        self.leaders.len()
    }
}
