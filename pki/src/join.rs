//! The newcomer's side of the PKI service: a first certificate against a
//! join token, and renewals with the current certificate.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use skiff_proto::pki as pb;
use tonic::transport::Endpoint;

use crate::identity::SERVER_NAME;
use crate::tls::{self, Credentials};
use crate::{files, IssuedCertificate, JoinToken, Role};

fn endpoint(address: &str) -> Result<Endpoint, String> {
    Ok(Endpoint::from_shared(format!("http://{address}"))
        .map_err(|e| format!("invalid address {address}: {e}"))?
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(10)))
}

fn root_cause(err: &dyn std::error::Error) -> String {
    let mut cause = err;
    while let Some(source) = cause.source() {
        cause = source;
    }
    cause.to_string()
}

/// A first certificate for `name` in `role` from the server at `address`,
/// whose CA must match the token's digest (no trust on first use); the
/// credentials are saved under `DATA/pki`.
pub async fn issue_for_join(
    data_dir: &Path,
    address: &str,
    role: Role,
    name: &str,
    token: &JoinToken,
) -> Result<Arc<Credentials>, String> {
    let config = tls::pinned_client_config(&token.ca_digest).map_err(|e| e.to_string())?;
    let connector = tls::connector(config, SERVER_NAME).map_err(|e| e.to_string())?;
    let channel = endpoint(address)?
        .connect_with_connector(connector)
        .await
        .map_err(|e| format!("cannot reach {address} over TLS: {}", root_cause(&e)))?;
    let key = Credentials::generate_key().map_err(|e| e.to_string())?;
    let response = pb::pki_client::PkiClient::new(channel)
        .issue(pb::IssueRequest {
            role: role.as_str().to_string(),
            name: name.to_string(),
            secret: token.secret.clone(),
            public_key: key.public_key_raw().to_vec(),
        })
        .await
        .map_err(|status| status.message().to_string())?
        .into_inner();
    let issued = issued_from(&response);
    let ca = tls::parse_cert_pem(&response.ca_pem).map_err(|e| e.to_string())?;
    if crate::ca::digest_of(&ca) != token.ca_digest {
        return Err("the CA sent does not match the join token's digest".into());
    }
    let credentials =
        Credentials::new(role, name, &key, &issued, &response.ca_pem).map_err(|e| e.to_string())?;
    credentials
        .save(&files::pki_dir(data_dir))
        .map_err(|e| e.to_string())?;
    Ok(credentials)
}

/// A renewed certificate for `credentials` from the first of `servers`
/// that answers, asked over mutual TLS with the current certificate.
pub async fn renew(
    credentials: &Arc<Credentials>,
    servers: &[String],
) -> Result<IssuedCertificate, String> {
    let config = credentials.client_config().map_err(|e| e.to_string())?;
    let connector = tls::connector(config, SERVER_NAME).map_err(|e| e.to_string())?;
    let mut errors = Vec::new();
    for address in servers {
        let channel = match endpoint(address)?
            .connect_with_connector(connector.clone())
            .await
        {
            Ok(channel) => channel,
            Err(err) => {
                errors.push(format!("{address}: {}", root_cause(&err)));
                continue;
            }
        };
        let request = pb::RenewRequest {
            role: credentials.role().as_str().to_string(),
            name: credentials.name().to_string(),
            public_key: credentials.public_key().to_vec(),
        };
        match pb::pki_client::PkiClient::new(channel).renew(request).await {
            Ok(response) => return Ok(issued_from(&response.into_inner())),
            Err(status) => errors.push(format!("{address}: {}", status.message())),
        }
    }
    Err(errors.join("; "))
}

/// An issued certificate as a [`pb::IssueResponse`] carries it.
pub fn issued_from(response: &pb::IssueResponse) -> IssuedCertificate {
    IssuedCertificate {
        pem: response.certificate_pem.clone(),
        not_after: std::time::UNIX_EPOCH + Duration::from_secs(response.not_after),
    }
}
