//! Generated code of the `skiff.v1` protocol. Domain types live in the crates
//! that own them; conversions sit at their API edges.
#![allow(clippy::all, missing_docs)]

pub mod v1 {
    tonic::include_proto!("skiff.v1");
}

pub use v1::*;

/// Server-to-server traffic: Raft messages, joins, forwarded proposals.
pub mod raft {
    tonic::include_proto!("skiff.raft.v1");
}
