//! The `Pki` service: certificates for newcomers against a join token, and
//! renewals for holders of a certificate (proven by their mutual TLS).

use std::sync::Arc;
use std::time::UNIX_EPOCH;

use skiff_pki::ca::same_secret;
use skiff_pki::{PeerInfo, Role};
use skiff_proto::pki as pb;
use tonic::{Request, Response, Status};

use crate::consensus::Consensus;
use crate::trust::Trust;

pub struct PkiService {
    consensus: Consensus,
    trust: Arc<Trust>,
}

impl PkiService {
    pub fn new(consensus: Consensus, trust: Arc<Trust>) -> Self {
        PkiService { consensus, trust }
    }

    fn answer(
        &self,
        role: Role,
        name: &str,
        public_key: &[u8],
    ) -> Result<Response<pb::IssueResponse>, Status> {
        let issued = self
            .trust
            .issue(role, name, public_key)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        tracing::info!(role = role.as_str(), name, "certificate issued");
        Ok(Response::new(pb::IssueResponse {
            certificate_pem: issued.pem,
            ca_pem: self.trust.ca().cert_pem().to_string(),
            not_after: issued
                .not_after
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs(),
        }))
    }
}

fn role_of(value: &str) -> Result<Role, Status> {
    Role::parse(value).map_err(Status::invalid_argument)
}

#[tonic::async_trait]
impl pb::pki_server::Pki for PkiService {
    async fn issue(
        &self,
        request: Request<pb::IssueRequest>,
    ) -> Result<Response<pb::IssueResponse>, Status> {
        let request = request.into_inner();
        let role = role_of(&request.role)?;
        skiff_spec::validate_name(&request.name)
            .map_err(|e| Status::invalid_argument(format!("invalid {} {e}", role.as_str())))?;
        let state = self.consensus.state();
        let expected = self
            .trust
            .ca()
            .join_secret(role, state.pki.join_generation(role.as_str()));
        if !same_secret(&request.secret, &expected) {
            return Err(Status::permission_denied(format!(
                "the {} join token is not valid (rotated, or another cluster's): ask an admin for the current one with `skiff cluster token {}`",
                role.as_str(),
                role.as_str()
            )));
        }
        if role == Role::Agent && state.pki.is_revoked(&request.name) {
            return Err(Status::permission_denied(format!(
                "node {} is revoked: join under another name",
                request.name
            )));
        }
        self.answer(role, &request.name, &request.public_key)
    }

    async fn renew(
        &self,
        request: Request<pb::RenewRequest>,
    ) -> Result<Response<pb::IssueResponse>, Status> {
        let identity = request
            .extensions()
            .get::<PeerInfo>()
            .and_then(|peer| peer.identity.clone())
            .ok_or_else(|| {
                Status::unauthenticated(
                    "renewal needs the current certificate as the client certificate",
                )
            })?;
        let request = request.into_inner();
        let role = role_of(&request.role)?;
        let own = match role {
            Role::Server => identity.is_server_named(&request.name),
            Role::Agent => identity.is_node(&request.name),
        };
        if !own {
            return Err(Status::permission_denied(format!(
                "the client certificate is not the {} {}'s",
                role.as_str(),
                request.name
            )));
        }
        if role == Role::Agent && self.consensus.state().pki.is_revoked(&request.name) {
            return Err(Status::permission_denied(format!(
                "node {} is revoked",
                request.name
            )));
        }
        self.answer(role, &request.name, &request.public_key)
    }
}
