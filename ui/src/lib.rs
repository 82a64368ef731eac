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
mod traffic;

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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn https_serves_the_page_with_the_servers_certificate_of_the_cluster_ca() {
        use skiff_pki::{ClusterCa, Credentials, Role};
        let ca = ClusterCa::create().unwrap();
        let key = Credentials::generate_key().unwrap();
        let lifetime = Duration::from_secs(3600);
        let issued = ca
            .issue(Role::Server, "s1", key.public_key_raw(), lifetime)
            .unwrap();
        let credentials =
            Credentials::new(Role::Server, "s1", &key, &issued, ca.cert_pem()).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let config = UiConfig {
            // Never called: the page needs no API call.
            api: "127.0.0.1:9".into(),
            ca_pem: ca.cert_pem().to_string(),
            tls: Some(https_config(credentials).unwrap()),
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, config, async {
            let _ = stopped.await;
        }));

        // A browser that trusts the cluster CA, as an operator's does once told to.
        let client = skiff_pki::tls::anonymous_client_config(ca.cert_pem()).unwrap();
        let mut client = (*client).clone();
        client.alpn_protocols = vec![b"http/1.1".to_vec()];
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name =
            rustls::pki_types::ServerName::try_from(skiff_pki::identity::SERVER_NAME).unwrap();
        let mut tls = connector.connect(name, tcp).await.unwrap();
        tls.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut page = String::new();
        let _ = tls.read_to_string(&mut page).await;
        assert!(page.starts_with("HTTP/1.1 200 OK"), "{page}");
        assert!(
            page.contains("content-security-policy: default-src 'none'"),
            "{page}"
        );
        assert!(page.contains("<title>Skiff</title>"));
        let _ = stop.send(());
        server.await.unwrap().unwrap();
    }
}
