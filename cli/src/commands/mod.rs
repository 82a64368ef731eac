//! One module per command noun.

pub mod bench;
pub mod cluster;
pub mod daemon;
pub mod node;
pub mod service;
pub mod var;
