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

/// Certificates for servers and agents: issued against a join token,
/// renewed over mutual TLS.
pub mod pki {
    tonic::include_proto!("skiff.pki.v1");
}

/// Debug without the value (see build.rs).
impl std::fmt::Debug for v1::SecretValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretValue")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("bytes", &self.value.len())
            .finish()
    }
}

/// Debug without the value (see build.rs).
impl std::fmt::Debug for v1::PutSecretRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PutSecretRequest")
            .field("name", &self.name)
            .field("bytes", &self.value.len())
            .finish()
    }
}

/// Debug without the key (see build.rs).
impl std::fmt::Debug for raft::JoinResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinResponse")
            .field("id", &self.id)
            .field("peers", &self.peers)
            .finish()
    }
}

/// Debug without the join secret (see build.rs).
impl std::fmt::Debug for pki::IssueRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssueRequest")
            .field("role", &self.role)
            .field("name", &self.name)
            .finish()
    }
}
