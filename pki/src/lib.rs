//! Trust between Skiff's processes: the cluster CA that every server holds
//! ([`ca`]), the names a certificate may carry and what they allow
//! ([`identity`]), Swarm-style join tokens that pin the CA
//! ([`join_token`]), the files keys live in ([`files`]), and mutual TLS for
//! tonic on both ends of every connection ([`tls`]).
//!
//! The design in one paragraph: `skiff server --bootstrap` creates a CA; a
//! server or agent joins with a token `SKIFF-1-<sha256 of the CA>-<secret>`,
//! checks that the server it reached presents a certificate chained to
//! exactly that CA (no trust on first use), shows the secret and receives a
//! certificate for one name and one role. Peers check the role and the name
//! of each other's certificate, not only the CA: a certificate for node
//! `n1` lets its holder speak for `n1` only.

pub mod ca;
pub mod files;
pub mod identity;
pub mod join;
pub mod join_token;
pub mod tls;

pub use ca::{ClusterCa, IssuedCertificate, DEFAULT_LIFETIME};
pub use identity::{PeerIdentity, Role};
pub use join_token::JoinToken;
pub use tls::{Credentials, PeerInfo};

/// Why a PKI operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{0}")]
    Invalid(String),
    #[error("TLS setup failed: {0}")]
    Tls(#[from] rustls::Error),
}
