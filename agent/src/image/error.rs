//! The image subsystem's error type. Messages are lowercase and name the
//! image, blob, layer or path concerned.

use std::path::PathBuf;

/// Everything that can go wrong while pulling, unpacking or mounting an image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The reference does not parse as `[registry/]repository[:tag][@digest]`.
    #[error("invalid image reference {reference}: {reason}")]
    InvalidReference { reference: String, reason: String },

    /// The registry answered that the repository, tag or digest does not
    /// exist: most often a typo in the name, so the message says where to look.
    #[error("{image} not found in {registry}: check the repository and tag")]
    NotFound { image: String, registry: String },

    /// An image index without an image this node's platform runs; names
    /// the platforms the index has.
    #[error("failed to pull {reference}: no {platform} image in its index (it has {})", platform_list(.available))]
    NoPlatform {
        reference: String,
        platform: String,
        available: Vec<String>,
    },

    /// The registry answered an HTTPS request in plain HTTP: a local
    /// registry the agent was not told is insecure.
    #[error("registry {registry} speaks plain HTTP, not HTTPS: add --insecure-registry {registry} to the agent")]
    PlainHttp { registry: String },

    /// The registry refused our credentials (or wanted some).
    #[error("failed to pull {reference}: unauthorized: {reason}")]
    Unauthorized { reference: String, reason: String },

    /// The registry could not be reached at all (connection refused, DNS,
    /// timeout). Worth retrying with backoff.
    #[error("registry {registry} unreachable: {reason}")]
    Unreachable { registry: String, reason: String },

    /// Any other failure of the pull (bad manifest, unsupported media type,
    /// unexpected status...).
    #[error("failed to pull {reference}: {reason}")]
    Pull { reference: String, reason: String },

    /// A blob's content does not hash to its digest: refused, never stored.
    #[error("failed to pull {reference}: digest mismatch for blob {digest}: expected {digest}, got {actual}")]
    DigestMismatch {
        reference: String,
        digest: String,
        actual: String,
    },

    /// The image config blob is not a valid image configuration.
    #[error("invalid image config of {reference}: {reason}")]
    Config { reference: String, reason: String },

    /// A layer could not be unpacked, or carries an entry that would escape
    /// the layer (`..`, a write through a symlink, a hardlink to outside).
    #[error("failed to unpack layer {layer}: {reason}")]
    Unpack { layer: String, reason: String },

    /// The image's user could not be resolved to ids.
    #[error("unable to resolve user {user:?} in the image: {reason}")]
    User { user: String, reason: String },

    /// Mounting or unmounting a container's overlay rootfs failed.
    #[error("failed to {action} overlay rootfs at {}: {reason}", path.display())]
    Mount {
        action: &'static str,
        path: PathBuf,
        reason: String,
    },

    /// A filesystem operation of the store failed.
    #[error("{context} {}: {source}", path.display())]
    Io {
        context: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl ImageError {
    /// Whether retrying later may succeed (registry down, transient network
    /// or server errors), as opposed to a permanent refusal (unknown image,
    /// digest mismatch, malformed layer).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            ImageError::Unreachable { .. } | ImageError::Pull { .. } | ImageError::Io { .. }
        )
    }

    pub(crate) fn io(
        context: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| ImageError::Io {
            context,
            path,
            source,
        }
    }
}

/// The platforms of an index, for [`ImageError::NoPlatform`].
fn platform_list(available: &[String]) -> String {
    if available.is_empty() {
        "no platform entries".to_string()
    } else {
        available.join(", ")
    }
}
