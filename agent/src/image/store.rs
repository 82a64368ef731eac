//! The node's content-addressed image store under `DATA/images`:
//!
//! ```text
//! blobs/sha256/<hex>   manifests, configs and layer blobs, each verified, stored once
//! layers/<diffid hex>/ each layer unpacked once, shared by every image and container
//! refs/<hash>.json     reference -> manifest digest of the last pull
//! l/<short>            short symlinks to layers, for long overlay lowerdir lists
//! tmp/                 downloads in flight (cleared at open)
//! ```
//!
//! Blobs are written to `tmp/`, hashed while written, and renamed into
//! `blobs/` only when their sha256 matches; layers are unpacked into a
//! temporary directory and renamed when complete. So anything under `blobs/`
//! or `layers/` is complete and verified, and a crash leaves only `tmp/`
//! debris. Concurrent pulls of the same image, blob or layer are coalesced by
//! per-key async locks: the first does the work, the others find it done.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures::{StreamExt, TryStreamExt};
use oci_client::manifest::{OciImageManifest, OciManifest};
use oci_client::Reference;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::config::{parse_config, ImageConfig};
use super::platform::{choose, Platform};
use super::registry::{parse_reference, Registry};
use super::{unpack, ImageError};

/// How a pull of an image may use what is already on the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PullPolicy {
    /// Kubernetes' default: a digest or a tag other than `latest` is
    /// served from the store when present; `latest` is re-resolved.
    #[default]
    Default,
    /// Use the stored image when present, without asking the registry.
    IfNotPresent,
    /// Always ask the registry what the tag points at (blobs already stored
    /// are not downloaded again). If the registry is unreachable and the
    /// image is stored, the stored one is used.
    Always,
}

/// Settings of a node's image store.
#[derive(Debug, Clone, Default)]
pub struct PullOptions {
    /// Registries (`host:port`) spoken to over plain HTTP, like dockerd's
    /// `--insecure-registry`. All others use HTTPS.
    pub insecure_registries: Vec<String>,
    /// Docker `config.json` with credentials (`auths.<host>.auth`); default
    /// `$DOCKER_CONFIG/config.json` or `~/.docker/config.json`.
    pub docker_config: Option<PathBuf>,
    /// The images the node's credentials are used for: `registry/` or
    /// `registry/path` prefixes (`--registry-auth-scope`); others are
    /// pulled anonymously.
    pub registry_auth_scopes: Vec<String>,
}

/// An image whose blobs are verified and whose layers are unpacked on this
/// node, ready for [`ImageStore::mount_rootfs`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PulledImage {
    /// The reference as given to `pull`.
    pub reference: String,
    /// Digest of the (platform) image manifest.
    pub manifest_digest: String,
    pub config: ImageConfig,
    /// Unpacked layer directories, base first.
    pub layers: Vec<PathBuf>,
}

/// Counters of the store's work since it was opened (per `ImageStore`
/// value and its clones).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Blobs (manifests, configs, layers) fetched from registries.
    pub blobs_downloaded: u64,
    pub bytes_downloaded: u64,
    pub layers_unpacked: u64,
}

/// Pulls from registries as Prometheus sees them: one per agent process,
/// registered with its metrics (`skiff_image_pull_seconds`,
/// `skiff_image_pull_failures_total`). Pulls served from the store are not
/// counted.
pub struct PullMetrics {
    pub duration: prometheus_client::metrics::histogram::Histogram,
    pub failures: prometheus_client::metrics::counter::Counter,
}

pub static PULL_METRICS: std::sync::LazyLock<PullMetrics> =
    std::sync::LazyLock::new(|| PullMetrics {
        // 50 ms to ~7 min, doubling.
        duration: prometheus_client::metrics::histogram::Histogram::new(
            prometheus_client::metrics::histogram::exponential_buckets(0.05, 2.0, 14),
        ),
        failures: Default::default(),
    });

impl PullMetrics {
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "skiff_image_pull_seconds",
            "Image pulls from a registry that succeeded, by duration.",
            self.duration.clone(),
        );
        registry.register(
            "skiff_image_pull_failures",
            "Image pulls from a registry that failed (an unreachable registry served from the store included).",
            self.failures.clone(),
        );
    }
}

/// The node's image store. Cheap to clone; clones share everything.
#[derive(Clone)]
pub struct ImageStore {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub root: PathBuf,
    registry: Registry,
    image_locks: KeyedLocks,
    blob_locks: KeyedLocks,
    layer_locks: KeyedLocks,
    blobs_downloaded: AtomicU64,
    bytes_downloaded: AtomicU64,
    layers_unpacked: AtomicU64,
    /// Pulls hold it shared, garbage collection exclusively (see `gc`).
    pub gc_lock: tokio::sync::RwLock<()>,
}

/// One async mutex per key, dropped from the map when nobody holds it.
#[derive(Default)]
struct KeyedLocks(Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>);

struct KeyedGuard<'a> {
    locks: &'a KeyedLocks,
    key: String,
    lock: Arc<tokio::sync::Mutex<()>>,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl KeyedLocks {
    async fn lock(&self, key: &str) -> KeyedGuard<'_> {
        let lock = {
            let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
            map.entry(key.to_string()).or_default().clone()
        };
        let guard = lock.clone().lock_owned().await;
        KeyedGuard {
            locks: self,
            key: key.to_string(),
            lock,
            guard: Some(guard),
        }
    }
}

impl Drop for KeyedGuard<'_> {
    fn drop(&mut self) {
        self.guard.take();
        let mut map = self.locks.0.lock().unwrap_or_else(|e| e.into_inner());
        // The map's reference and ours: nobody else waits for this key.
        if Arc::strong_count(&self.lock) == 2 {
            map.remove(&self.key);
        }
    }
}

#[derive(Serialize, Deserialize)]
pub(crate) struct RefRecord {
    pub reference: String,
    pub manifest_digest: String,
}

/// `sha256:<hex>` of `bytes`.
pub(crate) fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// The hex part of a `sha256:<64 hex>` digest; other algorithms and
/// malformed digests are refused (they also name paths in the store).
pub fn digest_hex<'a>(digest: &'a str, display: &str) -> Result<&'a str, ImageError> {
    match digest.strip_prefix("sha256:") {
        Some(hex)
            if hex.len() == 64
                && hex
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) =>
        {
            Ok(hex)
        }
        _ => Err(ImageError::Pull {
            reference: display.to_string(),
            reason: format!("unsupported digest {digest}"),
        }),
    }
}

/// Makes `dir` reachable by root only.
pub(crate) fn restrict(dir: &Path) -> Result<(), ImageError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(ImageError::io("failed to restrict", dir))
}

fn create_dir(path: &Path) -> Result<(), ImageError> {
    std::fs::create_dir_all(path).map_err(ImageError::io("failed to create", path))
}

impl ImageStore {
    /// Opens (creating) the store at `root` (the agent's `DATA/images`) and
    /// clears debris of interrupted downloads and unpacks.
    pub fn open(root: &Path, options: PullOptions) -> Result<Self, ImageError> {
        for sub in ["blobs/sha256", "layers", "refs", "l", "tmp"] {
            create_dir(&root.join(sub))?;
        }
        // Images hold setuid-root binaries and secrets baked into layers:
        // no local user may reach them through the store (Docker keeps
        // its own at 0700/0710). Tightened on every open, for stores made
        // before this rule.
        restrict(root)?;
        let tmp = root.join("tmp");
        let _ = std::fs::remove_dir_all(&tmp);
        create_dir(&tmp)?;
        if let Ok(entries) = std::fs::read_dir(root.join("layers")) {
            for entry in entries.flatten() {
                if entry.file_name().to_string_lossy().starts_with(".tmp-") {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        let registry = Registry::new(
            &options.insecure_registries,
            options.docker_config,
            options.registry_auth_scopes,
        )
        .map_err(|reason| ImageError::Pull {
            reference: String::new(),
            reason: format!("cannot create registry client: {reason}"),
        })?;
        Ok(ImageStore {
            inner: Arc::new(Inner {
                root: root.to_path_buf(),
                registry,
                image_locks: KeyedLocks::default(),
                blob_locks: KeyedLocks::default(),
                layer_locks: KeyedLocks::default(),
                blobs_downloaded: AtomicU64::new(0),
                bytes_downloaded: AtomicU64::new(0),
                layers_unpacked: AtomicU64::new(0),
                gc_lock: tokio::sync::RwLock::new(()),
            }),
        })
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// What this store has downloaded and unpacked since it was opened.
    pub fn stats(&self) -> StoreStats {
        StoreStats {
            blobs_downloaded: self.inner.blobs_downloaded.load(Ordering::Relaxed),
            bytes_downloaded: self.inner.bytes_downloaded.load(Ordering::Relaxed),
            layers_unpacked: self.inner.layers_unpacked.load(Ordering::Relaxed),
        }
    }

    /// Where the blob with `digest` lives once stored (it may not be yet).
    pub fn blob_path(&self, digest: &str) -> Option<PathBuf> {
        let hex = digest.strip_prefix("sha256:")?;
        Some(self.inner.root.join("blobs/sha256").join(hex))
    }

    /// Pulls `reference` with [`PullPolicy::Default`]: idempotent, served
    /// from the store when the policy allows, and coalesced with concurrent
    /// pulls of the same image (and of shared blobs and layers).
    pub async fn pull(&self, reference: &str) -> Result<PulledImage, ImageError> {
        self.pull_with_policy(reference, PullPolicy::Default).await
    }

    /// Pulls `reference` under an explicit [`PullPolicy`].
    pub async fn pull_with_policy(
        &self,
        reference: &str,
        policy: PullPolicy,
    ) -> Result<PulledImage, ImageError> {
        let parsed = parse_reference(reference)?;
        let key = parsed.whole();
        let _no_gc = self.inner.gc_lock.read().await;
        let _guard = self.inner.image_locks.lock(&key).await;
        let use_cache = match policy {
            PullPolicy::IfNotPresent => true,
            PullPolicy::Always => false,
            PullPolicy::Default => parsed.digest().is_some() || parsed.tag() != Some("latest"),
        };
        if use_cache {
            if let Some(image) = self.load_cached(&key, reference) {
                return Ok(image);
            }
        }
        let started = Instant::now();
        let fetched = self.fetch(&parsed, reference).await;
        match &fetched {
            Ok(_) => PULL_METRICS
                .duration
                .observe(started.elapsed().as_secs_f64()),
            Err(_) => {
                PULL_METRICS.failures.inc();
            }
        }
        match fetched {
            Ok(image) => {
                self.write_record(&key, &image)?;
                tracing::info!(
                    reference,
                    digest = %image.manifest_digest,
                    layers = image.layers.len(),
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "image pulled"
                );
                Ok(image)
            }
            Err(e @ ImageError::Unreachable { .. }) => match self.load_cached(&key, reference) {
                Some(image) => {
                    tracing::warn!(reference, error = %e, "registry unreachable, using the stored image");
                    Ok(image)
                }
                None => Err(e),
            },
            Err(e) => Err(e),
        }
    }

    fn record_path(&self, key: &str) -> PathBuf {
        let name = hex::encode(Sha256::digest(key.as_bytes()));
        self.inner.root.join("refs").join(format!("{name}.json"))
    }

    fn write_record(&self, key: &str, image: &PulledImage) -> Result<(), ImageError> {
        let record = RefRecord {
            reference: key.to_string(),
            manifest_digest: image.manifest_digest.clone(),
        };
        let path = self.record_path(key);
        let bytes = serde_json::to_vec(&record).expect("record serializes");
        write_atomically(&self.inner.root.join("tmp"), &path, &bytes)
    }

    /// The stored image `key` names, if the record, manifest, config and
    /// every unpacked layer are there.
    fn load_cached(&self, key: &str, display: &str) -> Option<PulledImage> {
        let bytes = std::fs::read(self.record_path(key)).ok()?;
        let record: RefRecord = serde_json::from_slice(&bytes).ok()?;
        let manifest_bytes = std::fs::read(self.blob_path(&record.manifest_digest)?).ok()?;
        let manifest: OciImageManifest = serde_json::from_slice(&manifest_bytes).ok()?;
        let config_bytes = std::fs::read(self.blob_path(&manifest.config.digest)?).ok()?;
        let parsed = parse_config(&config_bytes).ok()?;
        let layers = self.layer_dirs(&manifest, &parsed.diff_ids, display).ok()?;
        if !layers.iter().all(|l| l.is_dir()) {
            return None;
        }
        Some(PulledImage {
            reference: display.to_string(),
            manifest_digest: record.manifest_digest,
            config: parsed.config,
            layers,
        })
    }

    /// Layer directories, keyed by diff id (so one layer compressed two ways
    /// is still unpacked once).
    fn layer_dirs(
        &self,
        manifest: &OciImageManifest,
        diff_ids: &[String],
        display: &str,
    ) -> Result<Vec<PathBuf>, ImageError> {
        if diff_ids.len() != manifest.layers.len() {
            return Err(ImageError::Config {
                reference: display.to_string(),
                reason: format!(
                    "config lists {} diff ids for {} layers",
                    diff_ids.len(),
                    manifest.layers.len()
                ),
            });
        }
        diff_ids
            .iter()
            .map(|d| Ok(self.inner.root.join("layers").join(digest_hex(d, display)?)))
            .collect()
    }

    async fn fetch(&self, reference: &Reference, display: &str) -> Result<PulledImage, ImageError> {
        let registry = &self.inner.registry;
        let (bytes, digest) = registry.manifest(reference, display).await?;
        let manifest: OciManifest =
            serde_json::from_slice(&bytes).map_err(|e| ImageError::Pull {
                reference: display.to_string(),
                reason: format!("invalid manifest: {e}"),
            })?;
        let (manifest, digest, bytes) = match manifest {
            OciManifest::Image(m) => (m, digest, bytes),
            OciManifest::ImageIndex(index) => {
                let platform = Platform::host();
                let entry = choose(&index.manifests, &platform).map_err(|available| {
                    ImageError::NoPlatform {
                        reference: display.to_string(),
                        platform: platform.to_string(),
                        available,
                    }
                })?;
                let platform_ref = reference.clone_with_digest(entry.digest.clone());
                let (bytes, digest) = registry.manifest(&platform_ref, display).await?;
                match serde_json::from_slice(&bytes) {
                    Ok(OciManifest::Image(m)) => (m, digest, bytes),
                    _ => {
                        return Err(ImageError::Pull {
                            reference: display.to_string(),
                            reason: format!(
                                "index entry {} is not an image manifest",
                                entry.digest
                            ),
                        })
                    }
                }
            }
        };
        self.store_bytes(&digest, &bytes, display)?;

        let config_path = self
            .ensure_blob(
                reference,
                &manifest.config.digest,
                manifest.config.size,
                display,
            )
            .await?;
        let config_bytes = tokio::fs::read(&config_path)
            .await
            .map_err(ImageError::io("failed to read", &config_path))?;
        let parsed = parse_config(&config_bytes).map_err(|reason| ImageError::Config {
            reference: display.to_string(),
            reason,
        })?;
        if !parsed.os.is_empty() && parsed.os != "linux" {
            return Err(ImageError::Pull {
                reference: display.to_string(),
                reason: format!(
                    "image is for {}/{}, not linux",
                    parsed.os, parsed.architecture
                ),
            });
        }
        let dirs = self.layer_dirs(&manifest, &parsed.diff_ids, display)?;
        for layer in &manifest.layers {
            if !layer.media_type.contains("tar") {
                return Err(ImageError::Pull {
                    reference: display.to_string(),
                    reason: format!("unsupported layer media type {}", layer.media_type),
                });
            }
        }

        // Layers download and unpack in parallel, a few at a time. (The
        // futures are collected first so no closure lives across an await,
        // which keeps `pull`'s future `Send` for `tokio::spawn`.)
        let jobs: Vec<_> = manifest
            .layers
            .iter()
            .zip(parsed.diff_ids.iter())
            .zip(dirs.iter())
            .map(|((layer, diff_id), dir)| {
                Box::pin(self.fetch_layer(
                    reference,
                    &layer.digest,
                    layer.size,
                    diff_id,
                    dir,
                    display,
                ))
            })
            .collect();
        futures::stream::iter(jobs)
            .buffer_unordered(4)
            .try_collect::<Vec<()>>()
            .await?;

        Ok(PulledImage {
            reference: display.to_string(),
            manifest_digest: digest,
            config: parsed.config,
            layers: dirs,
        })
    }

    /// Downloads (if needed) and unpacks (if needed) one layer.
    async fn fetch_layer(
        &self,
        reference: &Reference,
        digest: &str,
        size: i64,
        diff_id: &str,
        dir: &Path,
        display: &str,
    ) -> Result<(), ImageError> {
        if dir.is_dir() {
            return Ok(());
        }
        let blob = self.ensure_blob(reference, digest, size, display).await?;
        self.ensure_layer(&blob, dir, diff_id, digest).await
    }

    /// Stores already-verified bytes (a manifest) under their digest.
    fn store_bytes(
        &self,
        digest: &str,
        bytes: &[u8],
        display: &str,
    ) -> Result<PathBuf, ImageError> {
        let hex = digest_hex(digest, display)?;
        let path = self.inner.root.join("blobs/sha256").join(hex);
        if !path.exists() {
            write_atomically(&self.inner.root.join("tmp"), &path, bytes)?;
        }
        Ok(path)
    }

    /// The stored blob `digest`, downloaded and verified first if needed.
    /// Concurrent callers for one digest download it once.
    async fn ensure_blob(
        &self,
        reference: &Reference,
        digest: &str,
        size: i64,
        display: &str,
    ) -> Result<PathBuf, ImageError> {
        let hex = digest_hex(digest, display)?;
        let path = self.inner.root.join("blobs/sha256").join(hex);
        if path.exists() {
            return Ok(path);
        }
        let _guard = self.inner.blob_locks.lock(digest).await;
        if path.exists() {
            return Ok(path);
        }
        let tmp = self
            .inner
            .root
            .join("tmp")
            .join(format!("{hex}-{}", rand::random::<u32>()));
        // Removes the partial download if this future is dropped mid-way
        // (a sibling layer failed and the whole pull was abandoned).
        let partial = PartialDownload(Some(tmp.clone()));
        let result = self.download(reference, digest, size, display, &tmp).await;
        match result {
            Ok(bytes) => {
                tokio::fs::rename(&tmp, &path)
                    .await
                    .map_err(ImageError::io("failed to store blob", &path))?;
                partial.stored();
                self.inner.blobs_downloaded.fetch_add(1, Ordering::Relaxed);
                self.inner
                    .bytes_downloaded
                    .fetch_add(bytes, Ordering::Relaxed);
                Ok(path)
            }
            Err(e) => {
                let _ = tokio::fs::remove_file(&tmp).await;
                Err(e)
            }
        }
    }

    /// Streams blob `digest` into `tmp`, hashing as it goes; refuses it
    /// unless the sha256 matches (and it is no larger than the descriptor
    /// says). Returns the number of bytes.
    async fn download(
        &self,
        reference: &Reference,
        digest: &str,
        size: i64,
        display: &str,
        tmp: &Path,
    ) -> Result<u64, ImageError> {
        let limit = blob_limit(size, digest, display)?;
        let sized = self.inner.registry.blob(reference, digest, display).await?;
        let mut stream = sized.stream;
        let mut file = tokio::fs::File::create(tmp)
            .await
            .map_err(ImageError::io("failed to create", tmp))?;
        let mut hasher = Sha256::new();
        let mut total: u64 = 0;
        let mismatch = |hasher: Sha256| ImageError::DigestMismatch {
            reference: display.to_string(),
            digest: digest.to_string(),
            actual: format!("sha256:{}", hex::encode(hasher.finalize())),
        };
        while let Some(chunk) = stream.next().await {
            let chunk = match chunk {
                Ok(chunk) => chunk,
                Err(e) => {
                    // oci-client's own verification: report it as ours.
                    let is_digest = e
                        .get_ref()
                        .is_some_and(|inner| inner.is::<oci_client::errors::DigestError>());
                    if is_digest {
                        return Err(mismatch(hasher));
                    }
                    return Err(ImageError::Pull {
                        reference: display.to_string(),
                        reason: format!("download of blob {digest} failed: {e}"),
                    });
                }
            };
            total += chunk.len() as u64;
            if total > limit {
                return Err(ImageError::Pull {
                    reference: display.to_string(),
                    reason: format!(
                        "blob {digest} is larger than the {limit} bytes its manifest gives; the registry sent a different blob"
                    ),
                });
            }
            hasher.update(&chunk);
            file.write_all(&chunk)
                .await
                .map_err(ImageError::io("failed to write", tmp))?;
        }
        file.flush()
            .await
            .map_err(ImageError::io("failed to write", tmp))?;
        if total != limit {
            return Err(ImageError::Pull {
                reference: display.to_string(),
                reason: format!(
                    "blob {digest} ended after {total} bytes; the manifest says it has {limit}"
                ),
            });
        }
        let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
        if actual != digest {
            return Err(ImageError::DigestMismatch {
                reference: display.to_string(),
                digest: digest.to_string(),
                actual,
            });
        }
        Ok(total)
    }

    /// Unpacks the layer blob into `dir` unless done; concurrent callers for
    /// one layer unpack it once.
    async fn ensure_layer(
        &self,
        blob: &Path,
        dir: &Path,
        diff_id: &str,
        layer_digest: &str,
    ) -> Result<(), ImageError> {
        let _guard = self.inner.layer_locks.lock(diff_id).await;
        if dir.is_dir() {
            return Ok(());
        }
        let (blob, dest, expected) = (blob.to_path_buf(), dir.to_path_buf(), diff_id.to_string());
        let result = tokio::task::spawn_blocking(move || {
            unpack::unpack_layer_file(&blob, &dest, Some(&expected))
        })
        .await
        .map_err(|e| ImageError::Unpack {
            layer: layer_digest.to_string(),
            reason: format!("unpack task failed: {e}"),
        })?;
        result.map_err(|e| ImageError::Unpack {
            layer: layer_digest.to_string(),
            reason: e.0,
        })?;
        self.inner.layers_unpacked.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// A blob download in `tmp/`, removed when dropped before it is stored.
struct PartialDownload(Option<PathBuf>);

impl PartialDownload {
    /// The download was renamed into the store: nothing to remove.
    fn stored(mut self) {
        self.0 = None;
    }
}

impl Drop for PartialDownload {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Writes `bytes` to `path` via a temporary file in `tmp_dir` and a rename.
fn write_atomically(tmp_dir: &Path, path: &Path, bytes: &[u8]) -> Result<(), ImageError> {
    let tmp = tmp_dir.join(format!(
        "{}-{}",
        path.file_name().unwrap_or_default().to_string_lossy(),
        rand::random::<u32>()
    ));
    std::fs::write(&tmp, bytes).map_err(ImageError::io("failed to write", &tmp))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        ImageError::Io {
            context: "failed to write",
            path: path.to_path_buf(),
            source: e,
        }
    })
}

/// Most bytes a blob may have: the manifest's descriptor says how big a
/// blob is, but the manifest comes from the same registry as the blob, so
/// its word is capped too. A layer blob is compressed, so never larger than
/// what it may unpack to ([`super::unpack::MAX_LAYER_BYTES`]). The download
/// stops at the declared size, so a blob is never read without end.
pub const MAX_BLOB_BYTES: u64 = super::unpack::MAX_LAYER_BYTES;

/// How many bytes to accept for blob `digest`: its descriptor's size, which
/// no more than [`MAX_BLOB_BYTES`].
fn blob_limit(size: i64, digest: &str, display: &str) -> Result<u64, ImageError> {
    let refuse = |reason: String| ImageError::Pull {
        reference: display.to_string(),
        reason,
    };
    match size {
        size if size < 0 => Err(refuse(format!(
            "the manifest gives blob {digest} a negative size ({size}); the registry's manifest is broken"
        ))),
        size if size as u64 > MAX_BLOB_BYTES => Err(refuse(format!(
            "the manifest says blob {digest} is {size} bytes, over Skiff's limit of {} GiB per blob",
            MAX_BLOB_BYTES >> 30
        ))),
        size => Ok(size as u64),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_image_store_is_reachable_by_root_only_even_when_made_before() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("images");
        std::fs::create_dir(&root).unwrap();
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
        ImageStore::open(&root, PullOptions::default()).unwrap();
        let mode = std::fs::metadata(&root).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o700);
    }
}
