//! What a certificate says about its holder, and how a peer checks it.
//!
//! Names are DNS names in the certificate's subject alternative names, so
//! that the standard webpki name check (no X.509 parser of our own) answers
//! "is this certificate valid for node n1?":
//! - a server: `server.skiff` (the role) and `NAME.server.skiff`;
//! - an agent: `NAME.node.skiff` only: exactly one node.
//!
//! Clients dial servers by address but verify the name `server.skiff`:
//! what matters is that the peer holds a server certificate of this
//! cluster's CA, whatever its address (as Swarm checks the role, not the
//! hostname).

use rustls::pki_types::{CertificateDer, ServerName};

/// The role a certificate is issued for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Server,
    Agent,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Server => "server",
            Role::Agent => "agent",
        }
    }

    pub fn parse(value: &str) -> Result<Role, String> {
        match value {
            "server" => Ok(Role::Server),
            "agent" => Ok(Role::Agent),
            other => Err(format!("unknown role \"{other}\": use server or agent")),
        }
    }
}

/// The name every server certificate carries: what clients verify.
pub const SERVER_NAME: &str = "server.skiff";

/// The subject alternative names of a certificate for `name` in `role`.
pub fn subject_names(role: Role, name: &str) -> Vec<String> {
    match role {
        Role::Server => vec![SERVER_NAME.to_string(), server_dns_name(name)],
        Role::Agent => vec![node_dns_name(name)],
    }
}

/// The name a server called `name` is verified as.
pub fn server_dns_name(name: &str) -> String {
    format!("{name}.server.skiff")
}

/// The name the agent of node `name` is verified as.
pub fn node_dns_name(name: &str) -> String {
    format!("{name}.node.skiff")
}

/// The verified certificate a peer presented in its TLS handshake (the
/// chain was checked against the cluster CA during the handshake).
#[derive(Clone, Debug)]
pub struct PeerIdentity {
    certificate: CertificateDer<'static>,
}

impl PeerIdentity {
    pub fn new(certificate: CertificateDer<'static>) -> Self {
        PeerIdentity { certificate }
    }

    /// Whether the certificate is valid for the DNS name `dns_name`.
    fn names(&self, dns_name: &str) -> bool {
        let Ok(name) = ServerName::try_from(dns_name) else {
            return false;
        };
        let Ok(cert) = webpki::EndEntityCert::try_from(&self.certificate) else {
            return false;
        };
        cert.verify_is_valid_for_subject_name(&name).is_ok()
    }

    /// Whether the peer holds a server certificate.
    pub fn is_server(&self) -> bool {
        self.names(SERVER_NAME)
    }

    /// Whether the peer is the server called `name`.
    pub fn is_server_named(&self, name: &str) -> bool {
        self.is_server() && self.names(&server_dns_name(name))
    }

    /// Whether the peer is the agent of node `name`.
    pub fn is_node(&self, name: &str) -> bool {
        !self.is_server() && self.names(&node_dns_name(name))
    }

    pub fn certificate(&self) -> &CertificateDer<'static> {
        &self.certificate
    }
}
