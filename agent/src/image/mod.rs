//! The agent's image subsystem: resolves and pulls images from OCI
//! distribution / Docker Registry v2 endpoints, keeps a content-addressed
//! store of verified blobs and unpacked layers shared by all containers of
//! the node, and assembles each container's rootfs with overlayfs.
//!
//! The runtime uses it as:
//! ```no_run
//! # async fn f() -> Result<(), skiff_agent::image::ImageError> {
//! use skiff_agent::image::{ImageStore, PullOptions};
//! let store = ImageStore::open("/var/lib/skiff/images".as_ref(), PullOptions::default())?;
//! let image = store.pull("127.0.0.1:5000/skiff-test/web:v1").await?;
//! let user = image.lookup_user(&image.config.user)?;
//! let rootfs = store.mount_rootfs(&image, "/var/lib/skiff/containers/abc".as_ref())?;
//! // ... run the container on `rootfs` as `user` ...
//! store.unmount_rootfs("/var/lib/skiff/containers/abc".as_ref())?;
//! # Ok(()) }
//! ```

mod config;
mod error;
mod gc;
mod platform;
mod reference;
mod registry;
mod rootfs;
mod store;
pub mod unpack;
mod user;

pub use config::{Healthcheck, ImageConfig};
pub use error::ImageError;
pub use gc::PruneReport;
pub use platform::Platform;
pub use rootfs::is_mounted;
pub use store::PULL_METRICS;
pub use store::{ImageStore, PullOptions, PullPolicy, PulledImage, StoreStats};
pub use user::{lookup_user, read_image_file, ImageUser};

/// The parsers of registry input, for the fuzz targets in `fuzz/`: not an
/// API, no other caller.
#[doc(hidden)]
pub mod fuzzing {
    pub use super::config::{parse_config, ParsedConfig};
    pub use super::platform::choose;
    pub use super::reference::parse as parse_reference;
    pub use super::store::digest_hex;
    pub use oci_client::manifest::OciManifest;
    pub use oci_client::Reference;
}
