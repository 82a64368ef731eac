//! The token RPCs (`skiff token create|ls|revoke`): a new token's secret
//! is drawn and hashed here, so only its hash is proposed, and the secret
//! is in the one answer to the call that created it.

use skiff_proto::v1 as pb;
use tonic::Status;

use super::auth::{hash_secret, new_secret};
use super::control::invalid;
use super::Api;
use crate::controllers::now_ms;
use crate::state::{Command, Role, Token, TokenWrite};

/// The name of the admin token `skiff server --bootstrap` and `skiff dev`
/// create for the cluster's first operator.
pub const MANAGEMENT_TOKEN: &str = "management";

/// What `token ls` shows of a token.
fn token_to_pb(token: &Token) -> pb::TokenInfo {
    pb::TokenInfo {
        name: token.name.clone(),
        role: token.role.as_str().to_string(),
        created_ms: token.created_ms,
        expires_ms: token.expires_ms.unwrap_or(0),
        revoked_ms: token.revoked_ms.unwrap_or(0),
        created_by: token.created_by.clone(),
    }
}

impl Api {
    pub(super) async fn create_token_here(
        &self,
        request: pb::TokenCreateRequest,
    ) -> Result<pb::TokenCreateResponse, Status> {
        skiff_spec::validate_name(&request.name)
            .map_err(|e| invalid(skiff_spec::SpecError::new("token name", e.problem)))?;
        let role = Role::parse(&request.role).ok_or_else(|| {
            Status::invalid_argument(format!(
                "invalid role \"{}\": use admin, operator or read-only",
                request.role
            ))
        })?;
        let expires_ms = (request.ttl_ms > 0).then(|| now_ms().saturating_add(request.ttl_ms));
        let (secret, token) = self.create_token(&request.name, role, expires_ms).await?;
        Ok(pb::TokenCreateResponse {
            token: Some(token_to_pb(&token)),
            secret,
        })
    }

    /// Proposes a new token and answers its secret and its record.
    pub(super) async fn create_token(
        &self,
        name: &str,
        role: Role,
        expires_ms: Option<u64>,
    ) -> Result<(String, Token), Status> {
        let secret = new_secret();
        let hash = hash_secret(&secret);
        self.propose(Command::CreateToken {
            token: TokenWrite {
                name: name.to_string(),
                role,
                hash: hash.clone(),
                expires_ms,
            },
        })
        .await?;
        self.barrier().await?;
        let token = self
            .consensus
            .state()
            .token_by_hash(&hash)
            .cloned()
            .ok_or_else(|| {
                Status::internal(format!(
                    "token \"{name}\" was committed but is not in the state"
                ))
            })?;
        Ok((secret, token))
    }

    pub(super) async fn list_tokens_here(&self) -> Result<pb::TokenListResponse, Status> {
        self.barrier().await?;
        let tokens = self
            .consensus
            .state()
            .tokens
            .values()
            .map(token_to_pb)
            .collect();
        Ok(pb::TokenListResponse { tokens })
    }

    pub(super) async fn revoke_token_here(&self, name: String) -> Result<(), Status> {
        skiff_spec::validate_name(&name)
            .map_err(|e| invalid(skiff_spec::SpecError::new("token name", e.problem)))?;
        self.propose(Command::RevokeToken { name }).await
    }

    /// Once this server leads a cluster that has no token yet, creates
    /// the admin token [`MANAGEMENT_TOKEN`] and writes it with `address`
    /// into the client config at `path` (for `skiff server --bootstrap`
    /// and `skiff dev`), so the first operator can call the API. Gives up
    /// at `shutdown`.
    pub async fn bootstrap_management_token(
        self,
        path: std::path::PathBuf,
        address: String,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut status = self.consensus.watch_status();
        loop {
            // Tokens exist (a restart, or another server leads and they
            // were made): nothing to do.
            if !self.consensus.state().tokens.is_empty() {
                return;
            }
            let now = status.borrow_and_update().clone();
            if now.leader_id == now.id && now.id != 0 && self.barrier().await.is_ok() {
                break;
            }
            tokio::select! {
                changed = status.changed() => if changed.is_err() { return },
                _ = shutdown.changed() => return,
            }
        }
        if !self.consensus.state().tokens.is_empty() {
            return;
        }
        let created = self.create_token(MANAGEMENT_TOKEN, Role::Admin, None).await;
        let secret = match created {
            Ok((secret, _)) => secret,
            Err(err) => {
                tracing::error!(error = %err.message(), "failed to create the management token");
                return;
            }
        };
        let config = crate::client_config::ClientConfig {
            address,
            token: secret,
            ca_cert: self.trust.as_ref().map(|t| t.ca_cert_path()),
        };
        match config.write(&path) {
            Ok(()) => {
                tracing::info!(path = %path.display(), "created the admin API token \"{MANAGEMENT_TOKEN}\"; the CLI finds it in the client config")
            }
            Err(err) => {
                tracing::error!(error = %err, "failed to write the client config with the management token")
            }
        }
    }
}
