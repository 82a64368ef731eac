//! One module per command noun.

pub mod cluster;
pub mod daemon;
pub mod node;
pub mod service;
