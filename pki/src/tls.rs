//! Mutual TLS for tonic, both ends.
//!
//! - [`Credentials`]: a process's key and certificate, swapped in place on
//!   renewal; rustls asks it for the certificate at every handshake, so a
//!   renewed certificate is used from the next connection on, with no
//!   restart and no dropped stream.
//! - [`incoming`]: a listener's connections after their handshake (run
//!   concurrently, bounded in time), each carrying the peer's verified
//!   certificate as [`PeerInfo`] in every request's extensions.
//! - [`connector`]: what tonic's `Endpoint::connect_with_connector` dials
//!   with: TCP, then TLS verifying the peer's role name.
//!
//! TLS 1.3 only, P-256 keys, the `ring` provider (no C build).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::KeyPair;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::ca::{digest_of, IssuedCertificate};
use crate::identity::{PeerIdentity, Role};
use crate::{files, PkiError};

const CERT_FILE: &str = "identity.crt";
const KEY_FILE: &str = "identity.key";
const EXPIRY_FILE: &str = "identity.expiry";
const CA_CERT_FILE: &str = "ca.crt";

/// How long a TLS handshake may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn ca_roots(ca: &CertificateDer<'static>) -> Result<Arc<RootCertStore>, PkiError> {
    let mut roots = RootCertStore::empty();
    roots.add(ca.clone())?;
    Ok(Arc::new(roots))
}

/// Parses one PEM certificate.
pub fn parse_cert_pem(pem: &str) -> Result<CertificateDer<'static>, PkiError> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| PkiError::Invalid(format!("invalid certificate: {e}")))
}

/// When a certificate issued at `issued` and expiring at `not_after` is
/// renewed: at a random 50–80 % of its lifetime, so that a cluster's
/// certificates (often issued together) do not all renew at once.
pub fn renewal_time(issued: SystemTime, not_after: SystemTime) -> SystemTime {
    let lifetime = not_after.duration_since(issued).unwrap_or_default();
    let fraction = rand::random::<f64>().mul_add(0.3, 0.5);
    issued + lifetime.mul_f64(fraction)
}

fn unix(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

#[derive(Debug)]
struct Current {
    certified: Arc<CertifiedKey>,
    cert_pem: String,
    issued: SystemTime,
    not_after: SystemTime,
    renew_at: SystemTime,
}

/// A process's identity: its key, its current certificate and the cluster
/// CA it trusts.
#[derive(Debug)]
pub struct Credentials {
    role: Role,
    name: String,
    key_pem: String,
    public_key: Vec<u8>,
    ca_pem: String,
    ca: CertificateDer<'static>,
    current: RwLock<Current>,
}

impl Credentials {
    /// A new key pair for a certificate request; its public key is what
    /// the CA signs ([`KeyPair::public_key_raw`]).
    pub fn generate_key() -> Result<KeyPair, PkiError> {
        Ok(KeyPair::generate()?)
    }

    /// Credentials from a key, the certificate issued for it and the CA.
    pub fn new(
        role: Role,
        name: &str,
        key: &KeyPair,
        issued: &IssuedCertificate,
        ca_pem: &str,
    ) -> Result<Arc<Credentials>, PkiError> {
        Self::assemble(
            role,
            name,
            &key.serialize_pem(),
            &issued.pem,
            SystemTime::now(),
            issued.not_after,
            ca_pem,
        )
    }

    fn assemble(
        role: Role,
        name: &str,
        key_pem: &str,
        cert_pem: &str,
        issued: SystemTime,
        not_after: SystemTime,
        ca_pem: &str,
    ) -> Result<Arc<Credentials>, PkiError> {
        let key = KeyPair::from_pem(key_pem)?;
        let ca = parse_cert_pem(ca_pem)?;
        let current = Self::current(&key, &ca, cert_pem, issued, not_after)?;
        let identity = PeerIdentity::new(parse_cert_pem(cert_pem)?);
        let matches = match role {
            Role::Server => identity.is_server_named(name),
            Role::Agent => identity.is_node(name),
        };
        if !matches {
            return Err(PkiError::Invalid(format!(
                "the certificate is not one of {} {name}",
                role.as_str()
            )));
        }
        Ok(Arc::new(Credentials {
            role,
            name: name.to_string(),
            key_pem: key_pem.to_string(),
            public_key: key.public_key_raw().to_vec(),
            ca_pem: ca_pem.to_string(),
            ca,
            current: RwLock::new(current),
        }))
    }

    fn current(
        key: &KeyPair,
        ca: &CertificateDer<'static>,
        cert_pem: &str,
        issued: SystemTime,
        not_after: SystemTime,
    ) -> Result<Current, PkiError> {
        let cert = parse_cert_pem(cert_pem)?;
        let private = PrivateKeyDer::try_from(key.serialize_der())
            .map_err(|e| PkiError::Invalid(format!("invalid private key: {e}")))?;
        let signer = rustls::crypto::ring::sign::any_supported_type(&private)?;
        Ok(Current {
            certified: Arc::new(CertifiedKey::new(vec![cert, ca.clone()], signer)),
            cert_pem: cert_pem.to_string(),
            issued,
            not_after,
            renew_at: renewal_time(issued, not_after),
        })
    }

    /// The credentials kept in `dir` (`identity.crt`, `identity.key`,
    /// `ca.crt`), if there are any.
    pub fn load(dir: &Path, role: Role, name: &str) -> Result<Option<Arc<Credentials>>, PkiError> {
        let cert = files::read(&dir.join(CERT_FILE))?;
        let key = files::read(&dir.join(KEY_FILE))?;
        let ca = files::read(&dir.join(CA_CERT_FILE))?;
        let expiry = files::read(&dir.join(EXPIRY_FILE))?;
        let (Some(cert), Some(key), Some(ca)) = (cert, key, ca) else {
            return Ok(None);
        };
        // "ISSUED NOT_AFTER" in seconds since the epoch.
        let times: Vec<u64> = expiry
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|t| t.parse().ok())
            .collect();
        let (issued, not_after) = match times[..] {
            [issued, not_after] => (
                UNIX_EPOCH + Duration::from_secs(issued),
                UNIX_EPOCH + Duration::from_secs(not_after),
            ),
            // Unknown: renew soon.
            _ => (
                SystemTime::now(),
                SystemTime::now() + Duration::from_secs(60),
            ),
        };
        Self::assemble(role, name, &key, &cert, issued, not_after, &ca).map(Some)
    }

    /// Writes the key (0600), the certificate and the CA to `dir` (0700).
    pub fn save(&self, dir: &Path) -> Result<(), PkiError> {
        let (cert_pem, issued, not_after) = {
            let current = self.current.read().unwrap_or_else(|p| p.into_inner());
            (current.cert_pem.clone(), current.issued, current.not_after)
        };
        files::write(&dir.join(KEY_FILE), self.key_pem.as_bytes(), 0o600)?;
        files::write(&dir.join(CA_CERT_FILE), self.ca_pem.as_bytes(), 0o644)?;
        files::write(&dir.join(CERT_FILE), cert_pem.as_bytes(), 0o644)?;
        files::write(
            &dir.join(EXPIRY_FILE),
            format!("{} {}\n", unix(issued), unix(not_after)).as_bytes(),
            0o644,
        )
    }

    /// Swaps in a renewed certificate for the same key: used from the next
    /// handshake on.
    pub fn replace(&self, issued: &IssuedCertificate) -> Result<(), PkiError> {
        let key = KeyPair::from_pem(&self.key_pem)?;
        let next = Self::current(
            &key,
            &self.ca,
            &issued.pem,
            SystemTime::now(),
            issued.not_after,
        )?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = next;
        Ok(())
    }

    pub fn role(&self) -> Role {
        self.role
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The public key certificates are issued for (uncompressed P-256).
    pub fn public_key(&self) -> &[u8] {
        &self.public_key
    }

    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    pub fn ca_der(&self) -> &CertificateDer<'static> {
        &self.ca
    }

    /// When the current certificate should be renewed.
    pub fn renew_at(&self) -> SystemTime {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .renew_at
    }

    pub fn not_after(&self) -> SystemTime {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .not_after
    }

    /// The current certificate (PEM).
    pub fn cert_pem(&self) -> String {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .cert_pem
            .clone()
    }

    fn certified(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .certified
            .clone()
    }

    /// What a listener of this process serves: its certificate, and
    /// client certificates of the CA verified when presented (clients of
    /// the API present none and authenticate with a token instead).
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<ServerConfig>, PkiError> {
        let verifier = WebPkiClientVerifier::builder_with_provider(ca_roots(&self.ca)?, provider())
            .allow_unauthenticated()
            .build()
            .map_err(|e| PkiError::Invalid(format!("client verifier: {e}")))?;
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }

    /// What this process dials other Skiff processes with: the CA as the
    /// only root, and this certificate as the client certificate.
    pub fn client_config(self: &Arc<Self>) -> Result<Arc<ClientConfig>, PkiError> {
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(ca_roots(&self.ca)?)
            .with_client_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }
}

impl ResolvesServerCert for Credentials {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.certified())
    }
}

impl ResolvesClientCert for Credentials {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.certified())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// A client config without a certificate (the CLI): the CA as the only
/// root.
pub fn anonymous_client_config(ca_pem: &str) -> Result<Arc<ClientConfig>, PkiError> {
    let ca = parse_cert_pem(ca_pem)?;
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(ca_roots(&ca)?)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// A client config for a newcomer holding only a join token: the server
/// must present a chain whose CA has exactly `ca_digest`, and its own
/// certificate must verify against that CA (no trust on first use).
pub fn pinned_client_config(ca_digest: &str) -> Result<Arc<ClientConfig>, PkiError> {
    let verifier = Arc::new(PinnedCa {
        digest: ca_digest.to_string(),
        provider: provider(),
    });
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

#[derive(Debug)]
struct PinnedCa {
    digest: String,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|cert| digest_of(cert) == self.digest)
            .ok_or_else(|| {
                rustls::Error::General(
                    "the server's CA does not match the join token's CA digest: this is not the cluster the token belongs to".into(),
                )
            })?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?
            .verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Who is on the other end of a connection, in every request's
/// extensions (`request.extensions().get::<PeerInfo>()`).
#[derive(Clone, Debug)]
pub struct PeerInfo {
    pub remote: Option<SocketAddr>,
    /// The verified client certificate, if the peer presented one.
    pub identity: Option<PeerIdentity>,
}

impl PeerInfo {
    pub fn is_server(&self) -> bool {
        self.identity.as_ref().is_some_and(PeerIdentity::is_server)
    }
}

/// One accepted TLS connection.
pub struct TlsConn {
    stream: tokio_rustls::server::TlsStream<TcpStream>,
    info: PeerInfo,
}

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// A listener's connections after their TLS handshake, for tonic's
/// `serve_with_incoming*`. Handshakes run concurrently (a slow client
/// holds up no one) and are dropped after [`HANDSHAKE_TIMEOUT`]; the
/// accept loop ends when the stream is dropped.
pub fn incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
) -> tokio_stream::wrappers::ReceiverStream<Result<TlsConn, std::io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let acceptor = TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = tx.closed() => return,
            };
            let (tcp, remote) = match accepted {
                Ok(pair) => pair,
                Err(err) => {
                    // EMFILE and the like: wait instead of spinning.
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let stream =
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => stream,
                        Ok(Err(err)) => {
                            tracing::debug!(%remote, error = %err, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%remote, "TLS handshake timed out");
                            return;
                        }
                    };
                let identity = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|certs| certs.first())
                    .map(|cert| PeerIdentity::new(cert.clone().into_owned()));
                let info = PeerInfo {
                    remote: Some(remote),
                    identity,
                };
                let _ = tx.send(Ok(TlsConn { stream, info })).await;
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// The connector tonic dials with (`Endpoint::connect_with_connector`, on
/// an `http://HOST:PORT` endpoint): TCP with no delay, then TLS checking
/// that the peer's certificate is valid for `peer_name` (e.g.
/// [`crate::identity::SERVER_NAME`]).
pub fn connector(
    config: Arc<ClientConfig>,
    peer_name: &str,
) -> Result<
    impl tower::Service<
            tonic::transport::Uri,
            Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>,
            Error = std::io::Error,
            Future = impl Send,
        > + Clone
        + Send
        + 'static,
    PkiError,
> {
    connector_from(config, peer_name, None)
}

/// Like [`connector`], with the local end of each connection bound to
/// `source` when it is given (see [`loopback_source`]).
pub fn connector_from(
    config: Arc<ClientConfig>,
    peer_name: &str,
    source: Option<IpAddr>,
) -> Result<
    impl tower::Service<
            tonic::transport::Uri,
            Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>,
            Error = std::io::Error,
            Future = impl Send,
        > + Clone
        + Send
        + 'static,
    PkiError,
> {
    let name = ServerName::try_from(peer_name.to_string())
        .map_err(|e| PkiError::Invalid(format!("invalid peer name {peer_name}: {e}")))?;
    let connector = TlsConnector::from(config);
    Ok(tower::service_fn(move |uri: tonic::transport::Uri| {
        let connector = connector.clone();
        let name = name.clone();
        async move {
            let host = uri
                .host()
                .ok_or_else(|| std::io::Error::other(format!("no host in {uri}")))?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let port = uri.port_u16().unwrap_or(443);
            let tcp = match source {
                None => TcpStream::connect((host.as_str(), port)).await?,
                Some(source) => connect_from(source, &host, port).await?,
            };
            tcp.set_nodelay(true)?;
            let tls = connector.connect(name, tcp).await?;
            Ok(hyper_util::rt::TokioIo::new(tls))
        }
    }))
}

/// The address to dial from for a process that listens (or advertises)
/// on `ip`: `ip` itself when it is a loopback address other than
/// 127.0.0.1 and ::1, else none (the kernel chooses, as it always did).
/// Processes on one machine that each own a loopback address then also
/// send from it, so packet filters can tell them apart by address pair
/// (the partition tests cut 127.0.0.21 from 127.0.0.22 this way); a
/// loopback connection would otherwise always come from 127.0.0.1.
pub fn loopback_source(ip: IpAddr) -> Option<IpAddr> {
    let default = match ip {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
    };
    (ip.is_loopback() && ip != default).then_some(ip)
}

/// A TCP connection to `host:port` whose local end is bound to `source`.
async fn connect_from(source: IpAddr, host: &str, port: u16) -> std::io::Result<TcpStream> {
    let mut last = None;
    for peer in tokio::net::lookup_host((host, port)).await? {
        if peer.is_ipv4() != source.is_ipv4() {
            continue;
        }
        let socket = if source.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.bind(SocketAddr::new(source, 0))?;
        match socket.connect(peer).await {
            Ok(stream) => return Ok(stream),
            Err(err) => last = Some(err),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::other(format!(
            "no address of {host}:{port} reachable from {source}"
        ))
    }))
}

/// Keeps `credentials` renewed until `stop` resolves: at
/// [`Credentials::renew_at`], `renew` gets a new certificate for the same
/// key; it is saved to `dir` (if any) and used from the next handshake.
/// A failed renewal is retried after a tenth of the time left (5 s to 60 s).
pub async fn keep_renewed<F, Fut>(
    credentials: Arc<Credentials>,
    dir: Option<PathBuf>,
    renew: F,
    stop: impl std::future::Future<Output = ()>,
) where
    F: Fn(Arc<Credentials>) -> Fut,
    Fut: std::future::Future<Output = Result<IssuedCertificate, String>>,
{
    tokio::pin!(stop);
    let mut retry_at: Option<SystemTime> = None;
    loop {
        let due = retry_at.unwrap_or_else(|| credentials.renew_at());
        let wait = due
            .duration_since(SystemTime::now())
            .unwrap_or_default()
            .min(Duration::from_secs(3600));
        tokio::select! {
            _ = &mut stop => return,
            _ = tokio::time::sleep(wait) => {}
        }
        if SystemTime::now() < due {
            continue;
        }
        match renew(credentials.clone()).await {
            Ok(issued) => {
                let replaced = credentials
                    .replace(&issued)
                    .and_then(|()| dir.as_deref().map_or(Ok(()), |d| credentials.save(d)));
                match replaced {
                    Ok(()) => {
                        retry_at = None;
                        tracing::info!(
                            role = credentials.role().as_str(),
                            name = credentials.name(),
                            not_after = unix(issued.not_after),
                            "certificate renewed"
                        );
                    }
                    Err(err) => {
                        tracing::warn!(error = %err, "renewed certificate not usable");
                        retry_at = Some(SystemTime::now() + retry_delay(&credentials));
                    }
                }
            }
            Err(err) => {
                tracing::warn!(error = %err, "certificate renewal failed; retrying");
                retry_at = Some(SystemTime::now() + retry_delay(&credentials));
            }
        }
    }
}

fn retry_delay(credentials: &Credentials) -> Duration {
    let left = credentials
        .not_after()
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    (left / 10).clamp(Duration::from_secs(1), Duration::from_secs(60))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ClusterCa;

    #[test]
    fn only_loopback_addresses_other_than_localhost_pick_the_source() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(loopback_source(ip("127.0.0.21")), Some(ip("127.0.0.21")));
        assert_eq!(loopback_source(ip("127.0.0.1")), None);
        assert_eq!(loopback_source(ip("::1")), None);
        assert_eq!(loopback_source(ip("0.0.0.0")), None);
        assert_eq!(loopback_source(ip("10.1.2.3")), None);
    }

    #[tokio::test]
    async fn a_connection_from_a_loopback_source_leaves_from_it() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let source: IpAddr = "127.0.0.29".parse().unwrap();
        let (dialed, accepted) =
            tokio::join!(connect_from(source, "127.0.0.1", port), listener.accept());
        assert_eq!(dialed.unwrap().local_addr().unwrap().ip(), source);
        assert_eq!(accepted.unwrap().1.ip(), source);
    }

    #[test]
    fn renewal_falls_between_half_and_four_fifths_of_the_lifetime() {
        let issued = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let not_after = issued + Duration::from_secs(1000);
        for _ in 0..200 {
            let at = renewal_time(issued, not_after)
                .duration_since(issued)
                .unwrap();
            assert!(
                at >= Duration::from_secs(500) && at <= Duration::from_secs(800),
                "{at:?}"
            );
        }
    }

    #[test]
    fn credentials_survive_a_save_and_load_and_refuse_another_name() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ClusterCa::create().unwrap();
        let key = Credentials::generate_key().unwrap();
        let issued = ca
            .issue(
                Role::Agent,
                "n1",
                key.public_key_raw(),
                Duration::from_secs(3600),
            )
            .unwrap();
        let creds = Credentials::new(Role::Agent, "n1", &key, &issued, ca.cert_pem()).unwrap();
        creds.save(dir.path()).unwrap();
        let loaded = Credentials::load(dir.path(), Role::Agent, "n1")
            .unwrap()
            .unwrap();
        assert_eq!(loaded.cert_pem(), creds.cert_pem());
        assert!(Credentials::load(dir.path(), Role::Agent, "n2").is_err());
        let mode = std::fs::metadata(dir.path().join(KEY_FILE)).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
            0o600
        );
    }
}
