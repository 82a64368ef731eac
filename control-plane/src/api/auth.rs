//! Who may call what: every call to the API presents an API token
//! (`authorization: Bearer SECRET`), which this tower layer hashes, looks
//! up in the committed state (tokens are replicated by Raft, see
//! `state::tokens`), checks for revocation and expiry, and weighs against
//! the one role table, [`required_role`]. A call it refuses never reaches
//! a handler, so it commits nothing.
//!
//! A call let through carries its [`Caller`] in the request extensions
//! (for handlers that weigh a field of the message, `--show-values`), and
//! runs inside [`CALLER`], where [`super::Api::propose`] reads the token
//! name it stamps on every command ([`crate::state::Command::Timed`]), so
//! each event of a write records who made it.
//!
//! Servers and agents call some methods without a token; they are listed
//! in [`EXEMPT_FROM_TOKENS`] and gated by their certificates instead.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use sha2::{Digest, Sha256};
use tonic::body::BoxBody;
use tonic::codegen::http;
use tonic::Status;

use crate::consensus::Consensus;
use crate::controllers::now_ms;
use crate::state::Role;

/// Methods (`/package.Service/Method`) and whole services
/// (`/package.Service/`) that take no API token: servers and agents call
/// them, and mutual TLS authenticates those callers by certificate.
pub const EXEMPT_FROM_TOKENS: &[&str] = &[
    // Raft messages, joins and forwarded proposals between servers.
    "/skiff.raft.v1.Raft/",
    // Each agent's stream to its server.
    "/skiff.v1.AgentSync/",
    // Certificates for joining servers and agents (the TLS work).
    "/skiff.pki.v1.Pki/",
    // A follower's agents' heartbeats, forwarded to the leader.
    "/skiff.v1.Control/ReportHeartbeats",
];

/// What a call needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// No token (see [`EXEMPT_FROM_TOKENS`]).
    Exempt,
    /// A token of this role or a higher one.
    Role(Role),
}

/// The role each method of `skiff.v1.Control` needs: the one table of the
/// API's permissions. A method missing here needs admin (deny by default).
pub const CONTROL_ROLES: &[(&str, Role)] = &[
    // Reads: lists, gets, inspect, events, logs, cluster status.
    ("ListServices", Role::ReadOnly),
    ("GetService", Role::ReadOnly),
    ("ListNodes", Role::ReadOnly),
    ("InspectNode", Role::ReadOnly),
    ("ClusterStatus", Role::ReadOnly),
    ("GetVariable", Role::ReadOnly),
    ("ListVariables", Role::ReadOnly),
    ("Events", Role::ReadOnly),
    ("PlanStack", Role::ReadOnly),
    ("ListVolumes", Role::ReadOnly),
    ("ServiceLogs", Role::ReadOnly),
    ("SecretList", Role::ReadOnly),
    ("SecretInspect", Role::ReadOnly),
    // Writes to what runs: services (and jobs), deployments, stacks,
    // volumes, secrets, variables; exec.
    ("CreateService", Role::Operator),
    ("ScaleService", Role::Operator),
    ("RemoveService", Role::Operator),
    ("UpdateService", Role::Operator),
    ("RollbackService", Role::Operator),
    ("PromoteDeployment", Role::Operator),
    ("PauseDeployment", Role::Operator),
    ("RebalanceService", Role::Operator),
    ("DeployStack", Role::Operator),
    ("RemoveStack", Role::Operator),
    ("RemoveVolume", Role::Operator),
    ("PutVariable", Role::Operator),
    ("CompareAndSetVariable", Role::Operator),
    ("SecretCreate", Role::Operator),
    ("SecretUpdate", Role::Operator),
    ("SecretRemove", Role::Operator),
    ("ServiceExec", Role::Operator),
    // The cluster itself: tokens, nodes, servers.
    ("TokenCreate", Role::Admin),
    ("TokenList", Role::Admin),
    ("TokenRevoke", Role::Admin),
    ("SetNodeAvailability", Role::Admin),
    ("RemoveNode", Role::Admin),
    ("RemoveServer", Role::Admin),
    ("ClusterToken", Role::Admin),
    // Holds the CA key and the secrets key unless redacted.
    ("SnapshotSave", Role::Admin),
    ("RevokeNode", Role::Admin),
    ("PruneNode", Role::Admin),
];

/// What a call of `path` (`/skiff.v1.Control/CreateService`) needs.
pub fn required_role(path: &str) -> Access {
    let exempt = EXEMPT_FROM_TOKENS.iter().any(|e| {
        if e.ends_with('/') {
            path.starts_with(e)
        } else {
            path == *e
        }
    });
    if exempt {
        return Access::Exempt;
    }
    let role = path
        .strip_prefix("/skiff.v1.Control/")
        .and_then(|method| CONTROL_ROLES.iter().find(|(m, _)| *m == method))
        .map_or(Role::Admin, |(_, role)| *role);
    Access::Role(role)
}

/// The token a call was let through with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The token's name (what events record; never its secret).
    pub name: String,
    pub role: Role,
}

tokio::task_local! {
    /// The caller of the call being handled, for the proposals it makes.
    pub static CALLER: Caller;
}

/// The caller of the call this task handles, if any.
pub fn current_caller() -> Option<Caller> {
    CALLER.try_with(Caller::clone).ok()
}

/// Whether `request` comes from another server of this cluster (a server
/// certificate, verified in the TLS handshake): servers call each other's
/// `Control` for forwarded reads and reports, and are trusted as members.
pub fn internal_peer<B>(request: &http::Request<B>) -> bool {
    request
        .extensions()
        .get::<skiff_pki::PeerInfo>()
        .is_some_and(skiff_pki::PeerInfo::is_server)
}

/// SHA-256 of a token's secret, lowercase hex: what the state keeps.
pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// A new random token secret: `skiff_` and 32 random bytes in hex.
pub fn new_secret() -> String {
    let bytes: [u8; 32] = rand::random();
    format!("skiff_{}", hex::encode(bytes))
}

/// What a caller without a token is told.
pub const NO_TOKEN: &str = "no API token: pass --token or SKIFF_TOKEN, or point --client-config/SKIFF_CLIENT_CONFIG at the client.toml that `skiff dev` / `skiff server --bootstrap` wrote in its data dir";

/// Installs the token check on every service of a server.
#[derive(Clone)]
pub struct AuthLayer {
    consensus: Consensus,
}

impl AuthLayer {
    pub fn new(consensus: Consensus) -> Self {
        AuthLayer { consensus }
    }
}

impl<S> tower_layer::Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Auth<S> {
        Auth {
            inner,
            consensus: self.consensus.clone(),
        }
    }
}

/// [`AuthLayer`]'s service around a server's routes.
#[derive(Clone)]
pub struct Auth<S> {
    inner: S,
    consensus: Consensus,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S> tower_service::Service<http::Request<BoxBody>> for Auth<S>
where
    S: tower_service::Service<http::Request<BoxBody>, Response = http::Response<BoxBody>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<BoxBody>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<BoxBody>) -> Self::Future {
        // The clone that was made ready is the one that serves this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let consensus = self.consensus.clone();
        Box::pin(async move {
            let path = request.uri().path().to_string();
            let needed = match required_role(&path) {
                Access::Exempt => return inner.call(request).await,
                Access::Role(role) => role,
            };
            if internal_peer(&request) {
                return inner.call(request).await;
            }
            match authorize(&consensus, request.headers(), needed).await {
                Ok(caller) => {
                    request.extensions_mut().insert(caller.clone());
                    CALLER.scope(caller, inner.call(request)).await
                }
                Err(refusal) => {
                    let status = refusal.into_status(&path);
                    tracing::debug!(%path, code = ?status.code(), "call refused");
                    Ok(status.into_http())
                }
            }
        })
    }
}

/// Why a presented token is refused, before its role is weighed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    Missing,
    Malformed,
    Unknown,
    Revoked(String),
    Expired(String),
    RoleTooLow {
        token: String,
        has: Role,
        needs: Role,
    },
}

impl Refusal {
    fn into_status(self, path: &str) -> Status {
        let method = path.rsplit('/').next().unwrap_or(path);
        match self {
            Refusal::Missing => Status::unauthenticated(NO_TOKEN),
            Refusal::Malformed => Status::unauthenticated(
                "malformed authorization metadata: send `authorization: Bearer SECRET` (the CLI does this with --token or SKIFF_TOKEN)",
            ),
            Refusal::Unknown => Status::unauthenticated(
                "unknown API token: check --token, SKIFF_TOKEN or the client config (`skiff token ls` lists the tokens)",
            ),
            Refusal::Revoked(name) => Status::unauthenticated(format!(
                "API token \"{name}\" was revoked: ask an admin for a new one (`skiff token create`)"
            )),
            Refusal::Expired(name) => Status::unauthenticated(format!(
                "API token \"{name}\" has expired: ask an admin for a new one (`skiff token create`)"
            )),
            Refusal::RoleTooLow { token, has, needs } => Status::permission_denied(format!(
                "permission denied: {method} needs the {needs} role; token \"{token}\" has {has}: use a token with the {needs} role"
            )),
        }
    }
}

/// The caller a call with `headers` is let through as, if its token may
/// call `path`.
async fn authorize(
    consensus: &Consensus,
    headers: &http::HeaderMap,
    needed: Role,
) -> Result<Caller, Refusal> {
    let secret = bearer(headers)?;
    let hash = hash_secret(secret);
    let lookup =
        || -> Option<crate::state::Token> { consensus.state().token_by_hash(&hash).cloned() };
    let token = match lookup() {
        Some(token) => Some(token),
        // Created a moment ago through another server: wait until this
        // one has applied everything committed, then look again.
        None => match consensus.read_barrier().await {
            Ok(()) => lookup(),
            Err(_) => None,
        },
    };
    check(token.as_ref(), now_ms(), needed)
}

/// The secret of an `authorization: Bearer SECRET` header.
fn bearer(headers: &http::HeaderMap) -> Result<&str, Refusal> {
    let value = headers
        .get(http::header::AUTHORIZATION)
        .ok_or(Refusal::Missing)?;
    let value = value.to_str().map_err(|_| Refusal::Malformed)?.trim();
    let (scheme, secret) = value.split_once(' ').ok_or(Refusal::Malformed)?;
    let secret = secret.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || secret.is_empty() {
        return Err(Refusal::Malformed);
    }
    Ok(secret)
}

/// Whether `token` (the one the presented secret hashes to, if any) may
/// make a call that needs `needed` at `now_ms`.
pub fn check(
    token: Option<&crate::state::Token>,
    now_ms: u64,
    needed: Role,
) -> Result<Caller, Refusal> {
    let token = token.ok_or(Refusal::Unknown)?;
    if token.revoked_ms.is_some() {
        return Err(Refusal::Revoked(token.name.clone()));
    }
    if token.expired(now_ms) {
        return Err(Refusal::Expired(token.name.clone()));
    }
    if token.role < needed {
        return Err(Refusal::RoleTooLow {
            token: token.name.clone(),
            has: token.role,
            needs: needed,
        });
    }
    Ok(Caller {
        name: token.name.clone(),
        role: token.role,
    })
}

/// Refuses a call that asks for secret-bearing values (`--show-values`)
/// unless its caller is an admin. A call with no caller came through an
/// exempt path or from an internal peer, and is let through.
pub fn check_show_values<T>(request: &tonic::Request<T>, show_values: bool) -> Result<(), Status> {
    if !show_values {
        return Ok(());
    }
    match request.extensions().get::<Caller>() {
        Some(caller) if caller.role < Role::Admin => Err(Status::permission_denied(format!(
            "permission denied: --show-values shows environment values and needs the admin role; token \"{}\" has {}: leave out --show-values or use an admin token",
            caller.name, caller.role
        ))),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Token;

    fn token(role: Role) -> Token {
        Token {
            name: "ci".into(),
            role,
            hash: hash_secret("s"),
            created_ms: 0,
            expires_ms: Some(1000),
            revoked_ms: None,
            created_by: String::new(),
        }
    }

    /// Every rpc of `service Control` in the proto file.
    fn control_methods() -> Vec<String> {
        let proto = include_str!("../../../proto/proto/skiff.proto");
        let body = proto
            .split("service Control {")
            .nth(1)
            .and_then(|rest| rest.split("\n}").next())
            .expect("service Control in skiff.proto");
        body.lines()
            .filter_map(|line| line.trim().strip_prefix("rpc "))
            .filter_map(|rest| rest.split('(').next())
            .map(|name| name.trim().to_string())
            .collect()
    }

    #[test]
    fn every_control_method_is_in_the_role_table_or_exempt() {
        let methods = control_methods();
        assert!(methods.len() > 30, "{methods:?}");
        for method in &methods {
            let path = format!("/skiff.v1.Control/{method}");
            let listed = CONTROL_ROLES.iter().any(|(m, _)| m == method);
            let exempt = required_role(&path) == Access::Exempt;
            assert!(
                listed != exempt,
                "{method}: listed {listed}, exempt {exempt}"
            );
        }
        for (method, _) in CONTROL_ROLES {
            assert!(methods.contains(&method.to_string()), "{method} is no rpc");
        }
    }

    #[test]
    fn the_role_table_gives_reads_writes_and_the_cluster_their_roles() {
        let role = |m: &str| required_role(&format!("/skiff.v1.Control/{m}"));
        assert_eq!(role("ListServices"), Access::Role(Role::ReadOnly));
        assert_eq!(role("Events"), Access::Role(Role::ReadOnly));
        assert_eq!(role("CreateService"), Access::Role(Role::Operator));
        assert_eq!(role("ServiceExec"), Access::Role(Role::Operator));
        assert_eq!(role("TokenCreate"), Access::Role(Role::Admin));
        assert_eq!(role("RemoveServer"), Access::Role(Role::Admin));
        assert_eq!(role("ReportHeartbeats"), Access::Exempt);
        // Deny by default: an unknown method, or another service, needs admin.
        assert_eq!(role("NewMethod"), Access::Role(Role::Admin));
        assert_eq!(
            required_role("/skiff.v1.Other/Method"),
            Access::Role(Role::Admin)
        );
        assert_eq!(required_role("/skiff.raft.v1.Raft/Send"), Access::Exempt);
        assert_eq!(required_role("/skiff.v1.AgentSync/Sync"), Access::Exempt);
        assert_eq!(required_role("/skiff.pki.v1.Pki/Issue"), Access::Exempt);
        // A prefix of an exempt method is not exempt.
        assert_eq!(role("ReportHeartbeatsX"), Access::Role(Role::Admin));
    }

    #[test]
    fn a_token_is_refused_when_unknown_revoked_expired_or_too_low() {
        assert_eq!(check(None, 0, Role::ReadOnly), Err(Refusal::Unknown));
        let ok = check(Some(&token(Role::Operator)), 999, Role::Operator).unwrap();
        assert_eq!(ok.name, "ci");
        assert_eq!(
            check(Some(&token(Role::Operator)), 1000, Role::ReadOnly),
            Err(Refusal::Expired("ci".into()))
        );
        let mut revoked = token(Role::Admin);
        revoked.revoked_ms = Some(5);
        assert_eq!(
            check(Some(&revoked), 0, Role::ReadOnly),
            Err(Refusal::Revoked("ci".into()))
        );
        let low = check(Some(&token(Role::ReadOnly)), 0, Role::Operator).unwrap_err();
        let status = low.into_status("/skiff.v1.Control/CreateService");
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
        assert!(status
            .message()
            .contains("CreateService needs the operator role"));
    }

    #[test]
    fn only_a_bearer_header_carries_a_secret() {
        let mut headers = http::HeaderMap::new();
        assert_eq!(bearer(&headers), Err(Refusal::Missing));
        headers.insert("authorization", "Basic abc".parse().unwrap());
        assert_eq!(bearer(&headers), Err(Refusal::Malformed));
        headers.insert("authorization", "Bearer skiff_abc".parse().unwrap());
        assert_eq!(bearer(&headers), Ok("skiff_abc"));
    }

    #[test]
    fn secrets_are_random_and_stored_only_hashed() {
        let (a, b) = (new_secret(), new_secret());
        assert_ne!(a, b);
        assert!(a.starts_with("skiff_") && a.len() == 6 + 64);
        let hash = hash_secret(&a);
        assert_eq!(hash.len(), 64);
        assert!(!hash.contains(&a[6..]));
    }
}
