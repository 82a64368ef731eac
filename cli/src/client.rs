//! The CLI's connection to a server, with errors that say what to do, and
//! its credentials: the API token every call presents, found on the
//! command line, in the environment or in a client config file
//! ([`resolve`]).

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{anyhow, bail};
use skiff_control_plane::ClientConfig;
use skiff_proto::v1::control_client::ControlClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

pub type Client = ControlClient<InterceptedService<Channel, Credentials>>;

/// How the CLI verifies servers: their certificate must chain to the
/// cluster CA given by `--ca-cert` / `SKIFF_CA_CERT` or the client config
/// (set once by `main`, or by a bench for the cluster it started).
static TLS: std::sync::RwLock<Option<Arc<rustls::ClientConfig>>> = std::sync::RwLock::new(None);

/// Verifies servers against the CA certificate `ca_pem` from now on.
pub fn trust_ca(ca_pem: &str) -> anyhow::Result<()> {
    let config = skiff_pki::tls::anonymous_client_config(ca_pem)
        .map_err(|e| anyhow!("invalid CA certificate: {e}"))?;
    *TLS.write().unwrap_or_else(|p| p.into_inner()) = Some(config);
    Ok(())
}

/// The CA file given to [`trust_ca_file`] last, for a `skiff` this process
/// runs (as `SKIFF_CA_CERT`).
static CA_FILE: RwLock<Option<PathBuf>> = RwLock::new(None);

pub fn ca_cert_file() -> Option<PathBuf> {
    CA_FILE.read().unwrap_or_else(|p| p.into_inner()).clone()
}

/// Verifies servers against the CA certificate in the file `path`.
pub fn trust_ca_file(path: &std::path::Path) -> anyhow::Result<()> {
    *CA_FILE.write().unwrap_or_else(|p| p.into_inner()) = Some(path.to_path_buf());
    let pem = std::fs::read_to_string(path).map_err(|e| {
        anyhow!("cannot read the CA certificate {}: {e} (set --ca-cert or SKIFF_CA_CERT to the cluster's ca.crt)", path.display())
    })?;
    trust_ca(&pem).map_err(|e| anyhow!("{}: {e}", path.display()))
}

const NO_CA: &str = "no CA certificate to verify the server with: pass --ca-cert FILE or SKIFF_CA_CERT (the cluster's DATA_DIR/pki/ca.crt), or --client-config with the client.toml that `skiff dev` / `skiff server --bootstrap` wrote";

fn tls() -> anyhow::Result<Arc<rustls::ClientConfig>> {
    TLS.read()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
        .ok_or_else(|| anyhow!(NO_CA))
}

/// Connects `endpoint` (an `http://HOST:PORT` one) over TLS, verifying
/// that the peer holds a server certificate of the cluster CA.
pub async fn connect_tls(
    endpoint: Endpoint,
) -> anyhow::Result<Result<Channel, tonic::transport::Error>> {
    let connector = skiff_pki::tls::connector(tls()?, skiff_pki::identity::SERVER_NAME)?;
    Ok(endpoint.connect_with_connector(connector).await)
}

/// How long a request may take (streams that run until interrupted, like
/// `events --follow`, take none).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Where a client config is looked for when none is named: `skiff dev`'s
/// default data dir, so that after `skiff dev` every command works in the
/// same directory with no flags.
pub const DEFAULT_CLIENT_CONFIG: &str = ".skiff/client.toml";

/// The address used when neither a flag, the environment nor a client
/// config names one.
pub const DEFAULT_ADDRESS: &str = "127.0.0.1:7070";

/// The API token of this process's calls (`authorization: Bearer ...`),
/// set once by [`resolve`] (or by a bench for the cluster it starts).
static TOKEN: RwLock<Option<MetadataValue<Ascii>>> = RwLock::new(None);

/// Presents the API token on every call of a [`Client`].
#[derive(Clone, Default)]
pub struct Credentials {
    authorization: Option<MetadataValue<Ascii>>,
}

/// Never shows the token.
impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("token", &self.authorization.as_ref().map(|_| "<hidden>"))
            .finish()
    }
}

impl tonic::service::Interceptor for Credentials {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.authorization {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// Sets the API token every [`Client`] made from now on presents.
pub fn set_token(token: &str) -> anyhow::Result<()> {
    let value: MetadataValue<Ascii> = format!("Bearer {}", token.trim())
        .parse()
        .map_err(|_| anyhow!("invalid API token: it holds characters no token has; copy it again from `skiff token create` or the client config"))?;
    *TOKEN.write().unwrap_or_else(|p| p.into_inner()) = Some(value);
    Ok(())
}

/// The API token set by [`set_token`], for a `skiff` this process runs
/// (as `SKIFF_TOKEN`).
pub fn token() -> Option<String> {
    let value = TOKEN.read().unwrap_or_else(|p| p.into_inner()).clone()?;
    let text = value.to_str().ok()?;
    text.strip_prefix("Bearer ").map(str::to_string)
}

/// The credentials of this process (see [`set_token`]).
fn credentials() -> Credentials {
    Credentials {
        authorization: TOKEN.read().unwrap_or_else(|p| p.into_inner()).clone(),
    }
}

/// A client of `channel` that presents this process's API token.
pub fn client(channel: Channel) -> Client {
    ControlClient::with_interceptor(channel, credentials())
}

/// Where a client command's server and token come from, strongest first:
/// `--server`/`SKIFF_ADDR` and `--token`/`SKIFF_TOKEN`; then the client
/// config named by `--client-config`/`SKIFF_CLIENT_CONFIG`, or
/// `./.skiff/client.toml` when present; then 127.0.0.1:7070 and no token.
/// Sets the token for every call and returns the server address.
pub fn resolve(
    server: Option<&str>,
    token: Option<&str>,
    config: Option<&Path>,
    ca_cert: Option<&Path>,
) -> anyhow::Result<String> {
    let config_path = config
        .map(Path::to_path_buf)
        .or_else(|| Some(PathBuf::from(DEFAULT_CLIENT_CONFIG)).filter(|p| p.exists()));
    let file = match config {
        Some(path) => Some(read_config(path, true)?),
        None => {
            let path = PathBuf::from(DEFAULT_CLIENT_CONFIG);
            if path.exists() {
                Some(read_config(&path, false)?)
            } else {
                None
            }
        }
    }
    .unwrap_or_default();
    let token = token
        .filter(|t| !t.trim().is_empty())
        .map(str::to_string)
        .or_else(|| Some(file.token.clone()).filter(|t| !t.is_empty()));
    if let Some(token) = token {
        set_token(&token)?;
    }
    // The CA: `--ca-cert`/`SKIFF_CA_CERT`, else the file's `ca_cert`
    // (relative to the file's directory).
    let ca = ca_cert.map(Path::to_path_buf).or_else(|| {
        let path = file.ca_cert.clone()?;
        if path.is_absolute() {
            return Some(path);
        }
        let dir = config_path.as_deref()?.parent()?.to_path_buf();
        Some(dir.join(path))
    });
    if let Some(ca) = ca {
        trust_ca_file(&ca)?;
    }
    let address = server
        .filter(|s| !s.trim().is_empty())
        .map(str::to_string)
        .or_else(|| Some(file.address).filter(|a| !a.is_empty()))
        .unwrap_or_else(|| DEFAULT_ADDRESS.to_string());
    Ok(address)
}

/// The client config at `path`, with an error that says what to do.
fn read_config(path: &Path, named: bool) -> anyhow::Result<ClientConfig> {
    match ClientConfig::read(path) {
        Ok(config) => Ok(config),
        Err(err @ skiff_control_plane::ClientConfigError::Read { .. }) if named => bail!(
            "{err} (check --client-config or SKIFF_CLIENT_CONFIG: `skiff dev` and `skiff server --bootstrap` write client.toml in their data dir)"
        ),
        Err(err) => bail!("{err} (fix the file, or name another with --client-config)"),
    }
}

pub async fn connect(addresses: &str) -> anyhow::Result<Client> {
    Ok(client(channel(addresses, Some(REQUEST_TIMEOUT)).await?))
}

/// A channel to the first of `addresses` that answers, tried in order:
/// `--server` and `SKIFF_ADDR` take several, comma-separated, so that a
/// command still works with one server of the cluster down (any server
/// takes any call). The one place the CLI builds its channels to servers
/// (where TLS is to be configured).
pub async fn channel(addresses: &str, timeout: Option<Duration>) -> anyhow::Result<Channel> {
    let mut failures = Vec::new();
    for address in split(addresses)? {
        let url = if address.contains("://") {
            address.to_string()
        } else {
            format!("http://{address}")
        };
        let mut endpoint = Endpoint::from_shared(url)
            .map_err(|_| {
                anyhow!("invalid --server \"{address}\": use HOST:PORT, e.g. 127.0.0.1:7070")
            })?
            .connect_timeout(Duration::from_secs(3));
        if let Some(timeout) = timeout {
            endpoint = endpoint.timeout(timeout);
        }
        if tls().is_err() {
            // Without a CA nothing can be verified; still say first
            // whether anything answers there at all.
            let probe = tokio::time::timeout(
                Duration::from_secs(3),
                tokio::net::TcpStream::connect(address.trim_start_matches("http://")),
            )
            .await;
            match probe {
                Ok(Ok(_)) => return Err(anyhow!(NO_CA)),
                Ok(Err(err)) => failures.push((address.to_string(), err.to_string())),
                Err(_) => failures.push((address.to_string(), "timed out".to_string())),
            }
            continue;
        }
        match connect_tls(endpoint).await? {
            Ok(channel) => return Ok(channel),
            Err(err) => failures.push((address.to_string(), root_cause(&err))),
        }
    }
    Err(unreachable(&failures))
}

/// The addresses of a `--server` value, empty entries left out.
fn split(addresses: &str) -> anyhow::Result<Vec<&str>> {
    let list: Vec<&str> = addresses
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .collect();
    if list.is_empty() {
        return Err(anyhow!(
            "invalid --server \"{addresses}\": use HOST:PORT[,HOST:PORT...], e.g. 127.0.0.1:7070"
        ));
    }
    Ok(list)
}

fn root_cause(err: &tonic::transport::Error) -> String {
    let mut cause: &dyn std::error::Error = err;
    while let Some(source) = cause.source() {
        cause = source;
    }
    cause.to_string()
}

/// One line naming every address tried and why each failed.
fn unreachable(failures: &[(String, String)]) -> anyhow::Error {
    const HINT: &str = "(is `skiff dev` or `skiff server` running? set --server or SKIFF_ADDR)";
    match failures {
        [(address, cause)] => anyhow!("cannot reach skiff server at {address}: {cause} {HINT}"),
        _ => {
            let tried: Vec<String> = failures
                .iter()
                .map(|(address, cause)| format!("{address}: {cause}"))
                .collect();
            anyhow!(
                "cannot reach any skiff server of {}: {} {HINT}",
                failures.len(),
                tried.join("; ")
            )
        }
    }
}

/// Turns a gRPC status into the one-line error the user sees.
pub fn explain(status: tonic::Status) -> anyhow::Error {
    match status.code() {
        // The server's message says what to do (which token, which role).
        tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => {
            anyhow!("{}", status.message())
        }
        tonic::Code::Unavailable
            if status.message().contains("connect") || status.message().contains("transport") =>
        {
            anyhow!("lost connection to the skiff server: {}", status.message())
        }
        _ if status
            .message()
            .contains("decoded message length too large") =>
        {
            anyhow!("{}", too_large(status.message()))
        }
        _ => anyhow!("{}", status.message()),
    }
}

/// The server refused a request over its `--max-request-bytes` before
/// reading it; tonic says so in its own words ("found N bytes, the limit
/// is: M bytes"), which name neither the flag nor the way out.
fn too_large(message: &str) -> String {
    let numbers: Vec<&str> = message
        .split(|c: char| !c.is_ascii_digit())
        .filter(|n| !n.is_empty())
        .collect();
    match numbers.as_slice() {
        [found, limit, ..] => format!(
            "the request is {found} bytes, over the server's limit of {limit} bytes: send less, or raise the servers' --max-request-bytes"
        ),
        _ => format!("{message}: raise the servers' --max-request-bytes"),
    }
}

#[cfg(test)]
mod tests {
    /// A loopback address nothing listens on (bound, then released).
    fn dead_address() -> String {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().to_string()
    }

    #[test]
    fn a_request_over_the_servers_limit_names_the_flag() {
        let status = tonic::Status::resource_exhausted(
            "Error, decoded message length too large: found 100009 bytes, the limit is: 65536 bytes",
        );
        assert_eq!(
            super::explain(status).to_string(),
            "the request is 100009 bytes, over the server's limit of 65536 bytes: send less, or raise the servers' --max-request-bytes"
        );
    }

    #[tokio::test]
    async fn every_address_tried_is_named_in_the_error() {
        let (a, b) = (dead_address(), dead_address());
        let err = super::connect(&format!("{a}, {b}"))
            .await
            .expect_err("nothing listens");
        let message = err.to_string();
        assert!(
            message.starts_with("cannot reach any skiff server of 2:"),
            "{message}"
        );
        assert!(message.contains(&format!("{a}: ")), "{message}");
        assert!(message.contains(&format!("; {b}: ")), "{message}");
        assert!(message.contains("refused"), "{message}");
    }

    #[test]
    fn flags_win_over_the_client_config_and_a_named_config_must_exist() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("client.toml");
        skiff_control_plane::ClientConfig {
            address: "10.0.0.1:7070".into(),
            token: "skiff_file".into(),
            ca_cert: None,
        }
        .write(&path)
        .unwrap();
        let address = super::resolve(None, None, Some(&path), None).unwrap();
        assert_eq!(address, "10.0.0.1:7070");
        let address = super::resolve(Some("10.0.0.2:7070"), Some("skiff_flag"), Some(&path), None);
        assert_eq!(address.unwrap(), "10.0.0.2:7070");
        let sent = super::credentials().authorization.unwrap();
        assert_eq!(sent.to_str().unwrap(), "Bearer skiff_flag");
        let missing = super::resolve(None, None, Some(&dir.path().join("none.toml")), None);
        let message = missing.unwrap_err().to_string();
        assert!(message.contains("--client-config"), "{message}");
    }

    #[test]
    fn an_empty_server_list_is_invalid() {
        assert!(super::split(" , ").is_err());
        assert_eq!(super::split("a:1,,b:2").unwrap(), ["a:1", "b:2"]);
    }
}
