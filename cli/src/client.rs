//! The CLI's connection to a server, with errors that say what to do.

use std::sync::Arc;
use std::time::Duration;

use anyhow::anyhow;
use skiff_proto::v1::control_client::ControlClient;
use tonic::transport::{Channel, Endpoint};

pub type Client = ControlClient<Channel>;

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

/// Verifies servers against the CA certificate in the file `path`.
pub fn trust_ca_file(path: &std::path::Path) -> anyhow::Result<()> {
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

pub async fn connect(addresses: &str) -> anyhow::Result<Client> {
    Ok(ControlClient::new(
        channel(addresses, Some(REQUEST_TIMEOUT)).await?,
    ))
}

/// A channel to the first of `addresses` that answers, tried in order:
/// `--server` and `SKIFF_ADDR` take several, comma-separated, so that a
/// command still works with one server of the cluster down (any server
/// takes any call).
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
        tonic::Code::Unavailable
            if status.message().contains("connect") || status.message().contains("transport") =>
        {
            anyhow!("lost connection to the skiff server: {}", status.message())
        }
        _ => anyhow!("{}", status.message()),
    }
}

#[cfg(test)]
mod tests {
    /// A loopback address nothing listens on (bound, then released).
    fn dead_address() -> String {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().to_string()
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
    fn an_empty_server_list_is_invalid() {
        assert!(super::split(" , ").is_err());
        assert_eq!(super::split("a:1,,b:2").unwrap(), ["a:1", "b:2"]);
    }
}
