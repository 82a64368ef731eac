//! Skiff's web dashboard, served by every server on `--ui-listen`: the
//! assets embedded in the binary (one page, a small hand-written script
//! and style sheet) and a small JSON and server-sent-events API under
//! `/api/`.
//!
//! The dashboard holds no authority of its own: every call it makes goes
//! to the server's own gRPC `Control` API, over TLS verified against the
//! cluster CA and without a client certificate (exactly as the CLI dials),
//! presenting the *user's* API token. So what a user may see and do here
//! is what their token may do with the CLI, checked by the same code.
//!
//! The token comes from `POST /login` (checked with a read, then kept in
//! an `HttpOnly`, `SameSite=Strict` cookie) or an `Authorization: Bearer`
//! header. Writes also need the header `X-Skiff-UI`, which no cross-site
//! form can send.

mod assets;
mod cluster;
mod events;
mod routes;

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

pub use cluster::Cluster;

/// Where `skiff dev` serves the dashboard unless told otherwise.
pub const DEFAULT_DEV_ADDRESS: &str = "127.0.0.1:7071";

/// How long a client may take to send its request head.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum UiError {
    #[error("invalid API address {address}: {reason}")]
    Address { address: String, reason: String },
    #[error(transparent)]
    Pki(#[from] skiff_pki::PkiError),
    #[error("failed to set up HTTPS for the dashboard: {0}")]
    Tls(#[from] rustls::Error),
}

/// What the dashboard is told.
#[derive(Clone)]
pub struct UiConfig {
    /// The gRPC API the dashboard calls (this server's own), `HOST:PORT`.
    pub api: String,
    /// The cluster CA certificate (PEM) the API's certificate must chain to.
    pub ca_pem: String,
    /// Serve HTTPS with this config (see [`https_config`]); `None`: plain
    /// HTTP (only for a loopback address, where no one else listens in).
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

/// HTTPS with the server's own certificate (renewed in place: the config
/// resolves the current certificate at each handshake), no client
/// certificate, HTTP/1.1.
pub fn https_config(
    credentials: Arc<skiff_pki::Credentials>,
) -> Result<Arc<rustls::ServerConfig>, UiError> {
    let mut config = rustls::ServerConfig::builder_with_provider(skiff_pki::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(credentials);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Serves the dashboard on `listener` until `shutdown` resolves;
/// connections in flight (event streams included) end with the process or
/// when their client leaves.
pub async fn serve(
    listener: TcpListener,
    config: UiConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), UiError> {
    let cluster = Arc::new(Cluster::connect(&config.api, &config.ca_pem)?);
    let secure = config.tls.is_some();
    let acceptor = config.tls.map(TlsAcceptor::from);
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => return Ok(()),
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "dashboard listener failed to accept");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let cluster = cluster.clone();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            match acceptor {
                None => serve_connection(TokioIo::new(stream), cluster, secure).await,
                Some(acceptor) => {
                    let handshake = tokio::time::timeout(
                        skiff_pki::tls::HANDSHAKE_TIMEOUT,
                        acceptor.accept(stream),
                    );
                    match handshake.await {
                        Ok(Ok(tls)) => serve_connection(TokioIo::new(tls), cluster, secure).await,
                        Ok(Err(e)) => tracing::debug!(error = %e, "dashboard TLS handshake failed"),
                        Err(_) => tracing::debug!("dashboard TLS handshake timed out"),
                    }
                }
            }
        });
    }
}

async fn serve_connection<I>(io: I, cluster: Arc<Cluster>, secure: bool)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |request| {
        let cluster = cluster.clone();
        async move { Ok::<_, Infallible>(routes::answer(&cluster, secure, request).await) }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .keep_alive(true)
        .serve_connection(io, service);
    if let Err(e) = connection.await {
        tracing::debug!(error = %e, "dashboard connection ended with an error");
    }
}
