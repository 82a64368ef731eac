//! Talking to OCI distribution / Docker Registry v2 endpoints through
//! `oci-client`: manifests (OCI and Docker schema 2, image indexes and
//! manifest lists), blobs as streams, bearer-token or basic auth with
//! credentials from the Docker `config.json`, plain HTTP only for registries
//! listed as insecure. Errors are mapped to [`ImageError`]s that name the
//! image or registry.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Once;
use std::time::Duration;

use base64::Engine;
use oci_client::client::{ClientConfig, ClientProtocol, SizedStream};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::manifest::{
    IMAGE_MANIFEST_LIST_MEDIA_TYPE, IMAGE_MANIFEST_MEDIA_TYPE, OCI_IMAGE_INDEX_MEDIA_TYPE,
    OCI_IMAGE_MEDIA_TYPE,
};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde::Deserialize;

use super::ImageError;

/// Every manifest type we can use. The registry answers `MANIFEST_UNKNOWN`
/// for an OCI manifest unless the OCI types are accepted, so all four go in
/// `Accept`.
pub(crate) const MANIFEST_MEDIA_TYPES: &[&str] = &[
    OCI_IMAGE_MEDIA_TYPE,
    IMAGE_MANIFEST_MEDIA_TYPE,
    OCI_IMAGE_INDEX_MEDIA_TYPE,
    IMAGE_MANIFEST_LIST_MEDIA_TYPE,
];

/// A registry client shared by all pulls of one store (it caches tokens).
pub(crate) struct Registry {
    /// For images in the node's auth scopes, with its credentials.
    client: Client,
    /// For every other image: `oci-client` keeps credentials per registry
    /// once given, so a client that ever presented the node's credentials
    /// would present them for any repository of that registry.
    anonymous: Client,
    docker_config: Option<PathBuf>,
    /// Repositories the node's credentials are for (`--registry-auth-scope`).
    auth_scopes: Vec<String>,
}

fn install_crypto_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Fails only if a provider is already installed, which is as good.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

impl Registry {
    pub fn new(
        insecure_registries: &[String],
        docker_config: Option<PathBuf>,
        auth_scopes: Vec<String>,
    ) -> Result<Self, String> {
        install_crypto_provider();
        let config = || ClientConfig {
            protocol: ClientProtocol::HttpsExcept(insecure_registries.to_vec()),
            platform_resolver: Some(Box::new(super::platform::host_resolver)),
            connect_timeout: Some(Duration::from_secs(10)),
            read_timeout: Some(Duration::from_secs(60)),
            ..ClientConfig::default()
        };
        let client = Client::try_from(config()).map_err(|e| e.to_string())?;
        let anonymous = Client::try_from(config()).map_err(|e| e.to_string())?;
        Ok(Registry {
            client,
            anonymous,
            docker_config,
            auth_scopes,
        })
    }

    /// The node's credentials for the image's registry, but only for an
    /// image in one of the node's auth scopes: any client who may create a
    /// service names the image, so the node's credentials for every other
    /// repository would pull (and let it run and read) images the client
    /// could not pull itself, the node acting as a confused deputy.
    fn auth_for(&self, reference: &Reference) -> RegistryAuth {
        if !in_auth_scope(&self.auth_scopes, reference) {
            return RegistryAuth::Anonymous;
        }
        credentials_for(self.docker_config.as_deref(), reference.resolve_registry())
    }

    /// The client for the image, its credentials stored.
    async fn client_for(&self, reference: &Reference) -> &Client {
        let auth = self.auth_for(reference);
        let client = match auth {
            RegistryAuth::Anonymous => &self.anonymous,
            _ => &self.client,
        };
        client
            .store_auth_if_needed(reference.resolve_registry(), &auth)
            .await;
        client
    }

    /// Why a refused pull may have been refused: the node has credentials
    /// for the registry that this image is not in scope of.
    pub fn unused_credentials(&self, reference: &Reference) -> Option<String> {
        if in_auth_scope(&self.auth_scopes, reference) {
            return None;
        }
        let registry = reference.resolve_registry();
        if matches!(
            credentials_for(self.docker_config.as_deref(), registry),
            RegistryAuth::Anonymous
        ) {
            return None;
        }
        Some(format!(
            "this node has credentials for {registry}, but uses them only for images under its --registry-auth-scope prefixes ({}), so that no one who can create a service pulls private images with them; add a scope to the agent (e.g. --registry-auth-scope {}) if every user of the cluster may pull {}",
            if self.auth_scopes.is_empty() {
                "none".to_string()
            } else {
                self.auth_scopes.join(", ")
            },
            repository_of(reference)
                .rsplit_once('/')
                .map_or(registry.to_string(), |(parent, _)| format!("{parent}/")),
            repository_of(reference)
        ))
    }

    /// The raw manifest (or index) the reference names and its digest,
    /// checked against the reference's digest when it has one.
    pub async fn manifest(
        &self,
        reference: &Reference,
        display: &str,
    ) -> Result<(Vec<u8>, String), ImageError> {
        let (bytes, _digest) = self
            .client_for(reference)
            .await
            .pull_manifest_raw(reference, &RegistryAuth::Anonymous, MANIFEST_MEDIA_TYPES)
            .await
            .map_err(|e| match map_error(e, reference, display) {
                ImageError::Unauthorized {
                    reference: r,
                    reason,
                } => ImageError::Unauthorized {
                    reference: r,
                    reason: match self.unused_credentials(reference) {
                        Some(hint) => format!("{reason}; {hint}"),
                        None => reason,
                    },
                },
                other => other,
            })?;
        // The registry's Docker-Content-Digest is trusted only as far as it
        // matches the bytes; ours is the sha256 of what we received.
        let digest = super::store::sha256_digest(&bytes);
        if let Some(expected) = reference.digest() {
            if expected != digest {
                return Err(ImageError::DigestMismatch {
                    reference: display.to_string(),
                    digest: expected.to_string(),
                    actual: digest,
                });
            }
        }
        Ok((bytes.to_vec(), digest))
    }

    /// A stream of the blob's bytes (verified by the caller).
    pub async fn blob(
        &self,
        reference: &Reference,
        digest: &str,
        display: &str,
    ) -> Result<SizedStream, ImageError> {
        self.client_for(reference)
            .await
            .pull_blob_stream(reference, digest)
            .await
            .map_err(|e| map_error(e, reference, display))
    }
}

/// Parses an image reference, Docker style (`busybox` is
/// `docker.io/library/busybox:latest`), without `oci-spec`'s regex (see
/// [`super::reference`]).
pub(crate) fn parse_reference(reference: &str) -> Result<Reference, ImageError> {
    super::reference::parse(reference)
}

/// Turns an `oci-client` error into ours: unknown image, unauthorized,
/// unreachable registry, or a generic pull failure.
pub(crate) fn map_error(
    e: OciDistributionError,
    reference: &Reference,
    display: &str,
) -> ImageError {
    let registry = reference.registry().to_string();
    let pull = |reason: String| ImageError::Pull {
        reference: display.to_string(),
        reason,
    };
    let not_found = || ImageError::NotFound {
        image: image_name(reference),
        registry: registry.clone(),
    };
    match e {
        OciDistributionError::RegistryError { envelope, .. } => {
            let reason = envelope
                .errors
                .iter()
                .map(|e| {
                    if e.message.is_empty() {
                        format!("{:?}", e.code).to_lowercase()
                    } else {
                        e.message.to_lowercase()
                    }
                })
                .collect::<Vec<_>>()
                .join("; ");
            let not_found_in_registry = envelope.errors.iter().any(|e| {
                matches!(
                    e.code,
                    OciErrorCode::ManifestUnknown
                        | OciErrorCode::NameUnknown
                        | OciErrorCode::BlobUnknown
                        | OciErrorCode::NotFound
                )
            });
            let unauthorized = envelope
                .errors
                .iter()
                .any(|e| matches!(e.code, OciErrorCode::Unauthorized | OciErrorCode::Denied));
            if not_found_in_registry {
                not_found()
            } else if unauthorized {
                ImageError::Unauthorized {
                    reference: display.to_string(),
                    reason,
                }
            } else {
                pull(reason)
            }
        }
        OciDistributionError::UnauthorizedError { url } => ImageError::Unauthorized {
            reference: display.to_string(),
            reason: format!("registry refused {url}"),
        },
        OciDistributionError::AuthenticationFailure(reason) => ImageError::Unauthorized {
            reference: display.to_string(),
            reason: reason.to_lowercase(),
        },
        OciDistributionError::ServerError { code: 404, .. }
        | OciDistributionError::ImageManifestNotFoundError(_) => not_found(),
        OciDistributionError::RequestError(e) => {
            let reason = error_chain(&e);
            if speaks_plain_http(&reason) {
                ImageError::PlainHttp { registry }
            } else if e.is_connect() || e.is_timeout() {
                ImageError::Unreachable { registry, reason }
            } else {
                pull(reason)
            }
        }
        other => pull(other.to_string().to_lowercase()),
    }
}

/// `repository:tag` (or `@digest`), as the operator wrote it after the
/// registry's name.
fn image_name(reference: &Reference) -> String {
    match (reference.digest(), reference.tag()) {
        (Some(digest), _) => format!("{}@{digest}", reference.repository()),
        (None, Some(tag)) => format!("{}:{tag}", reference.repository()),
        (None, None) => reference.repository().to_string(),
    }
}

/// Whether a failed HTTPS request met a server that speaks plain HTTP:
/// rustls reads the HTTP answer as a corrupt TLS record
/// ("InvalidContentType"); other TLS stacks say it in their own words.
fn speaks_plain_http(error_chain: &str) -> bool {
    let lower = error_chain.to_lowercase();
    [
        "invalidcontenttype",
        "received corrupt message",
        "http response to https",
        "wrong version number",
    ]
    .iter()
    .any(|sign| lower.contains(sign))
}

/// The error and its sources, joined: reqwest's own message alone ("error
/// sending request") does not say what went wrong.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    let mut depth = 0;
    while let Some(s) = source {
        if depth >= 8 {
            break;
        }
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
        depth += 1;
    }
    out
}

#[derive(Deserialize, Default)]
struct DockerConfig {
    #[serde(default)]
    auths: HashMap<String, DockerAuth>,
}

#[derive(Deserialize, Default)]
struct DockerAuth {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

/// The Docker config file to read: the explicit one, else
/// `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`.
fn docker_config_path(explicit: Option<&Path>) -> Option<PathBuf> {
    if let Some(path) = explicit {
        return Some(path.to_path_buf());
    }
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG") {
        return Some(PathBuf::from(dir).join("config.json"));
    }
    std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".docker/config.json"))
}

/// Docker Hub's many spellings are one registry.
fn normalize_registry(host: &str) -> String {
    let host = host
        .trim_start_matches("https://")
        .trim_start_matches("http://");
    let host = host.split('/').next().unwrap_or(host);
    match host {
        "index.docker.io" | "registry-1.docker.io" | "docker.io" => "docker.io".to_string(),
        other => other.to_string(),
    }
}

/// `registry/repository` of an image, Docker Hub spelled `docker.io`.
fn repository_of(reference: &Reference) -> String {
    format!(
        "{}/{}",
        normalize_registry(reference.resolve_registry()),
        reference.repository()
    )
}

/// Whether the image is under one of the `scopes` (`registry/` for a whole
/// registry, `registry/path` for a repository and everything under it, `*`
/// for every image).
fn in_auth_scope(scopes: &[String], reference: &Reference) -> bool {
    let repository = repository_of(reference);
    scopes.iter().any(|scope| {
        if scope == "*" {
            return true;
        }
        let scope = scope.trim_end_matches('/');
        let (host, path) = scope.split_once('/').unwrap_or((scope, ""));
        let scope = if path.is_empty() {
            normalize_registry(host)
        } else {
            format!("{}/{path}", normalize_registry(host))
        };
        repository == scope || repository.starts_with(&format!("{scope}/"))
    })
}

/// Credentials for `registry` from the Docker config (`auths.<host>.auth`,
/// base64 `user:pass`, or `username`/`password`); anonymous when there are
/// none. Read at each pull, so a `docker login` takes effect without a
/// restart. Credential helpers (`credsStore`) are not supported.
pub(crate) fn credentials_for(explicit: Option<&Path>, registry: &str) -> RegistryAuth {
    let Some(path) = docker_config_path(explicit) else {
        return RegistryAuth::Anonymous;
    };
    let Ok(bytes) = std::fs::read(&path) else {
        return RegistryAuth::Anonymous;
    };
    let config: DockerConfig = match serde_json::from_slice(&bytes) {
        Ok(config) => config,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "ignoring unreadable docker config");
            return RegistryAuth::Anonymous;
        }
    };
    credentials_from(&config, registry)
}

fn credentials_from(config: &DockerConfig, registry: &str) -> RegistryAuth {
    let wanted = normalize_registry(registry);
    for (host, auth) in &config.auths {
        if normalize_registry(host) != wanted {
            continue;
        }
        if let Some(encoded) = auth.auth.as_deref().filter(|a| !a.is_empty()) {
            if let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded.trim()) {
                if let Ok(text) = String::from_utf8(decoded) {
                    if let Some((user, pass)) = text.split_once(':') {
                        return RegistryAuth::Basic(user.to_string(), pass.to_string());
                    }
                }
            }
        }
        if let (Some(user), Some(pass)) = (&auth.username, &auth.password) {
            return RegistryAuth::Basic(user.clone(), pass.clone());
        }
    }
    RegistryAuth::Anonymous
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: &str) -> DockerConfig {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn docker_config_auth_is_base64_user_colon_pass() {
        // "alice:s3cr:et"
        let c = config(r#"{"auths": {"127.0.0.1:5000": {"auth": "YWxpY2U6czNjcjpldA=="}}}"#);
        match credentials_from(&c, "127.0.0.1:5000") {
            RegistryAuth::Basic(user, pass) => {
                assert_eq!(user, "alice");
                assert_eq!(pass, "s3cr:et");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(
            credentials_from(&c, "127.0.0.1:5001"),
            RegistryAuth::Anonymous
        ));
    }

    #[test]
    fn docker_hub_spellings_match() {
        let c = config(
            r#"{"auths": {"https://index.docker.io/v1/": {"username": "u", "password": "p"}}}"#,
        );
        assert!(matches!(
            credentials_from(&c, "index.docker.io"),
            RegistryAuth::Basic(..)
        ));
        assert!(matches!(
            credentials_from(&c, "docker.io"),
            RegistryAuth::Basic(..)
        ));
    }

    #[test]
    fn node_credentials_apply_only_to_images_in_its_scopes() {
        let scopes = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let image = |r: &str| parse_reference(r).unwrap();
        // No scope: never (the confused deputy: any image a client names).
        assert!(!in_auth_scope(&[], &image("ghcr.io/acme/app:v1")));
        let acme = scopes(&["ghcr.io/acme"]);
        assert!(in_auth_scope(&acme, &image("ghcr.io/acme/app:v1")));
        assert!(in_auth_scope(&acme, &image("ghcr.io/acme/team/app@sha256:0000000000000000000000000000000000000000000000000000000000000000")));
        assert!(!in_auth_scope(&acme, &image("ghcr.io/acmecorp/app:v1")));
        assert!(!in_auth_scope(&acme, &image("ghcr.io/other/app:v1")));
        assert!(!in_auth_scope(&acme, &image("acme/app:v1")));
        // A whole registry, and Docker Hub by any of its names.
        let local = scopes(&["127.0.0.1:5000/"]);
        assert!(in_auth_scope(&local, &image("127.0.0.1:5000/x/y:1")));
        assert!(!in_auth_scope(&local, &image("127.0.0.1:5001/x/y:1")));
        let hub = scopes(&["index.docker.io/acme/"]);
        assert!(in_auth_scope(&hub, &image("acme/app")));
        assert!(in_auth_scope(&hub, &image("docker.io/acme/app:v2")));
        assert!(!in_auth_scope(&hub, &image("busybox")));
        assert!(in_auth_scope(&scopes(&["*"]), &image("busybox")));
    }

    #[test]
    fn an_out_of_scope_image_is_pulled_anonymously_and_a_refusal_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(
            &path,
            r#"{"auths": {"ghcr.io": {"username": "node", "password": "secret"}}}"#,
        )
        .unwrap();
        let registry = Registry::new(&[], Some(path), vec!["ghcr.io/acme/".to_string()]).unwrap();
        let inside = parse_reference("ghcr.io/acme/app:v1").unwrap();
        let outside = parse_reference("ghcr.io/victim/private:v1").unwrap();
        assert!(matches!(
            registry.auth_for(&inside),
            RegistryAuth::Basic(..)
        ));
        assert!(matches!(
            registry.auth_for(&outside),
            RegistryAuth::Anonymous
        ));
        assert_eq!(registry.unused_credentials(&inside), None);
        let hint = registry.unused_credentials(&outside).unwrap();
        assert!(
            hint.contains("--registry-auth-scope ghcr.io/victim/"),
            "{hint}"
        );
        assert!(hint.contains("(ghcr.io/acme/)"), "{hint}");
        // No credentials for the registry at all: nothing to say.
        let other = parse_reference("quay.io/x/y:1").unwrap();
        assert_eq!(registry.unused_credentials(&other), None);
    }

    fn registry_error(code: OciErrorCode, message: &str) -> OciDistributionError {
        OciDistributionError::RegistryError {
            envelope: oci_client::errors::OciEnvelope {
                errors: vec![oci_client::errors::OciError {
                    code,
                    message: message.into(),
                    detail: serde_json::Value::Null,
                }],
            },
            url: "http://127.0.0.1:5000/v2/skiff-test/web/manifests/v9".into(),
        }
    }

    #[test]
    fn an_unknown_tag_or_repository_says_which_and_where_to_look() {
        let display = "127.0.0.1:5000/skiff-test/web:v9";
        let reference = parse_reference(display).unwrap();
        for code in [OciErrorCode::ManifestUnknown, OciErrorCode::NameUnknown] {
            let e = map_error(
                registry_error(code, "manifest unknown"),
                &reference,
                display,
            );
            assert_eq!(
                e.to_string(),
                "skiff-test/web:v9 not found in 127.0.0.1:5000: check the repository and tag"
            );
        }
        let by_digest = format!("127.0.0.1:5000/skiff-test/web@sha256:{}", "a".repeat(64));
        let reference = parse_reference(&by_digest).unwrap();
        let e = map_error(
            OciDistributionError::ImageManifestNotFoundError("gone".into()),
            &reference,
            &by_digest,
        );
        assert!(
            e.to_string().starts_with("skiff-test/web@sha256:aaaa"),
            "{e}"
        );
    }

    #[test]
    fn tls_errors_of_a_plain_http_server_are_recognised() {
        for chain in [
            "error sending request for url (https://127.0.0.1:5000/v2/): client error (Connect): received corrupt message of type InvalidContentType",
            "Get \"https://reg:5000/v2/\": http: server gave HTTP response to HTTPS client",
            "ssl routines: wrong version number",
        ] {
            assert!(speaks_plain_http(chain), "{chain}");
        }
        assert!(!speaks_plain_http(
            "error sending request: tcp connect error: Connection refused (os error 111)"
        ));
    }

    /// A real HTTPS request to a server that answers in plain HTTP, as a
    /// local `docker-registry` does.
    #[tokio::test]
    async fn a_plain_http_registry_contacted_over_https_asks_for_insecure_registry() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let _ = socket.read(&mut buf).await;
                let _ = socket
                    .write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                    .await;
            }
        });
        let display = format!("{address}/skiff-test/web:v1");
        let reference = parse_reference(&display).unwrap();
        let registry = Registry::new(&[], None, Vec::new()).unwrap();
        let e = registry.manifest(&reference, &display).await.unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("registry {address} speaks plain HTTP, not HTTPS: add --insecure-registry {address} to the agent")
        );
    }

    #[test]
    fn manifest_accept_covers_oci_and_docker_types() {
        for t in [
            "application/vnd.oci.image.manifest.v1+json",
            "application/vnd.oci.image.index.v1+json",
            "application/vnd.docker.distribution.manifest.v2+json",
            "application/vnd.docker.distribution.manifest.list.v2+json",
        ] {
            assert!(MANIFEST_MEDIA_TYPES.contains(&t), "{t}");
        }
    }
}
