//! This server's side of the cluster's trust (see `skiff_pki`): the CA it
//! holds like every server, its own certificate, and how it dials other
//! servers and agents over mutual TLS.
//!
//! Set up once at start ([`establish`]): a bootstrapping server creates the
//! CA; a joining one gets a certificate against the server join token,
//! then the CA in the Join answer; a restarting one loads both from
//! `DATA/pki`.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use skiff_pki::identity::{node_dns_name, SERVER_NAME};
use skiff_pki::tls::{self, Credentials};
use skiff_pki::{files, ClusterCa, IssuedCertificate, PkiError, Role};

pub use skiff_pki::join::{issue_for_join, issued_from};
use tonic::transport::{Channel, Endpoint};

use crate::consensus::transport::Dial;

pub struct Trust {
    ca: ClusterCa,
    credentials: Arc<Credentials>,
    client_config: Arc<rustls::ClientConfig>,
    dial_servers: Dial,
    /// Lifetime of the certificates this server issues.
    lifetime: Duration,
    dir: PathBuf,
}

impl std::fmt::Debug for Trust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trust")
            .field("ca", &self.ca.digest())
            .field("name", &self.credentials.name())
            .finish()
    }
}

impl Trust {
    fn new(
        ca: ClusterCa,
        credentials: Arc<Credentials>,
        lifetime: Duration,
        dir: PathBuf,
        source: Option<IpAddr>,
    ) -> Result<Arc<Trust>, PkiError> {
        let client_config = credentials.client_config()?;
        let dial_servers = server_dial(&client_config, source);
        Ok(Arc::new(Trust {
            ca,
            credentials,
            client_config,
            dial_servers,
            lifetime,
            dir,
        }))
    }

    pub fn ca(&self) -> &ClusterCa {
        &self.ca
    }

    pub fn credentials(&self) -> &Arc<Credentials> {
        &self.credentials
    }

    /// Where the CA certificate is on disk (absolute): what clients
    /// verify servers against (the client config's `ca_cert`).
    pub fn ca_cert_path(&self) -> PathBuf {
        let path = self.dir.join("ca.crt");
        std::path::absolute(&path).unwrap_or(path)
    }

    pub fn lifetime(&self) -> Duration {
        self.lifetime
    }

    /// What this server's listener serves.
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, PkiError> {
        self.credentials.server_config()
    }

    /// Dials other servers, checking they hold a server certificate.
    pub fn dial_servers(&self) -> Dial {
        self.dial_servers.clone()
    }

    /// A channel to the agent of `node` at `endpoint`, checking that the
    /// peer holds exactly that node's certificate.
    pub fn dial_agent(&self, node: &str, endpoint: Endpoint) -> Result<Channel, PkiError> {
        let connector = tls::connector(self.client_config.clone(), &node_dns_name(node))?;
        Ok(endpoint.connect_with_connector_lazy(connector))
    }

    /// A certificate of this cluster for `name` in `role`.
    pub fn issue(
        &self,
        role: Role,
        name: &str,
        public_key: &[u8],
    ) -> Result<IssuedCertificate, PkiError> {
        self.ca.issue(role, name, public_key, self.lifetime)
    }

    /// Keeps this server's certificate renewed (it issues its own) until
    /// `stop`.
    pub async fn keep_renewed(self: Arc<Self>, stop: impl std::future::Future<Output = ()>) {
        let trust = self.clone();
        tls::keep_renewed(
            self.credentials.clone(),
            Some(self.dir.clone()),
            move |credentials| {
                let issued = trust
                    .issue(Role::Server, credentials.name(), credentials.public_key())
                    .map_err(|e| e.to_string());
                async move { issued }
            },
            stop,
        )
        .await;
    }
}

/// The trust of a server whose data dir holds its CA and certificate, or
/// of a bootstrapping server (which creates both). It dials other servers
/// from `source` when given ([`tls::loopback_source`]).
pub fn load_or_bootstrap(
    data_dir: &Path,
    name: &str,
    lifetime: Duration,
    create: bool,
    source: Option<IpAddr>,
) -> Result<Option<Arc<Trust>>, PkiError> {
    let dir = files::pki_dir(data_dir);
    let ca = match ClusterCa::load(&dir)? {
        Some(ca) => ca,
        None if create => {
            let ca = ClusterCa::create()?;
            ca.save(&dir)?;
            tracing::info!(digest = %ca.digest(), dir = %dir.display(), "created the cluster CA");
            ca
        }
        None => return Ok(None),
    };
    let credentials = match Credentials::load(&dir, Role::Server, name)? {
        Some(credentials) => credentials,
        None => {
            let key = Credentials::generate_key()?;
            let issued = ca.issue(Role::Server, name, key.public_key_raw(), lifetime)?;
            let credentials = Credentials::new(Role::Server, name, &key, &issued, ca.cert_pem())?;
            credentials.save(&dir)?;
            credentials
        }
    };
    Trust::new(ca, credentials, lifetime, dir, source).map(Some)
}

/// The trust of a server that joined: its credentials (from
/// [`issue_for_join`]) and the CA from the Join answer, saved.
pub fn joined(
    data_dir: &Path,
    credentials: Arc<Credentials>,
    ca_cert_pem: &str,
    ca_key_pem: &str,
    lifetime: Duration,
    source: Option<IpAddr>,
) -> Result<Arc<Trust>, PkiError> {
    let dir = files::pki_dir(data_dir);
    let ca = ClusterCa::from_pem(ca_cert_pem, ca_key_pem)?;
    if ca.digest() != skiff_pki::ca::digest_of(credentials.ca_der()) {
        return Err(PkiError::Invalid(
            "the CA in the Join answer is not the one that issued this server's certificate".into(),
        ));
    }
    ca.save(&dir)?;
    Trust::new(ca, credentials, lifetime, dir, source)
}

/// Dials servers with `config` from `source` (if given), checking they
/// hold a server certificate.
fn server_dial(config: &Arc<rustls::ClientConfig>, source: Option<IpAddr>) -> Dial {
    let connector = tls::connector_from(config.clone(), SERVER_NAME, source)
        .expect("the server name is a valid DNS name");
    let eager = connector.clone();
    Dial::new(
        move |endpoint: Endpoint| endpoint.connect_with_connector_lazy(connector.clone()),
        move |endpoint: Endpoint| {
            let connector = eager.clone();
            Box::pin(async move { endpoint.connect_with_connector(connector).await })
        },
    )
}
