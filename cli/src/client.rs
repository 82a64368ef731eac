//! The CLI's connection to a server, with errors that say what to do.

use std::time::Duration;

use anyhow::anyhow;
use skiff_proto::v1::control_client::ControlClient;
use tonic::transport::{Channel, Endpoint};

pub type Client = ControlClient<Channel>;

pub async fn connect(address: &str) -> anyhow::Result<Client> {
    let url = if address.contains("://") {
        address.to_string()
    } else {
        format!("http://{address}")
    };
    let endpoint = Endpoint::from_shared(url)
        .map_err(|_| anyhow!("invalid --server \"{address}\": use HOST:PORT, e.g. 127.0.0.1:7070"))?
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(30));
    let channel = endpoint
        .connect()
        .await
        .map_err(|err| unreachable(address, &err))?;
    Ok(ControlClient::new(channel))
}

fn unreachable(address: &str, err: &tonic::transport::Error) -> anyhow::Error {
    let mut cause: &dyn std::error::Error = err;
    while let Some(source) = cause.source() {
        cause = source;
    }
    anyhow!("cannot reach skiff server at {address}: {cause} (is `skiff dev` or `skiff server` running? set --server or SKIFF_ADDR)")
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
