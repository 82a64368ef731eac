//! Garbage collection of the image store: images no container of the node
//! uses, and the blobs and unpacked layers only they needed, are removed.
//!
//! What is in use is the caller's word (the references of every allocation
//! the runtime holds, asked for only once the store is locked against
//! pulls), checked against the host: a layer any mounted overlay has as a
//! lowerdir is never removed, whatever the caller says.

use std::collections::{BTreeSet, HashSet};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use oci_client::manifest::OciImageManifest;

use super::config::parse_config;
use super::registry::parse_reference;
use super::store::RefRecord;
use super::{ImageError, ImageStore};

/// What a prune removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PruneReport {
    /// Image references forgotten.
    pub images: usize,
    pub blobs: usize,
    pub layers: usize,
    /// Disk space given back (allocated blocks).
    pub bytes: u64,
}

impl ImageStore {
    /// Removes every image whose reference `in_use` does not return, then
    /// every blob and layer no remaining image needs. `in_use` is called
    /// once pulls are held off (a pull that started before waits for the
    /// prune; one that starts after finds what it needs gone and fetches
    /// it again), so a reference the caller takes before pulling is safe.
    pub async fn prune<F>(&self, in_use: F) -> Result<PruneReport, ImageError>
    where
        F: FnOnce() -> Vec<String> + Send + 'static,
    {
        let _pulls_held = self.inner.gc_lock.write().await;
        let store = self.clone();
        tokio::task::spawn_blocking(move || store.prune_blocking(in_use()))
            .await
            .map_err(|e| ImageError::Io {
                context: "image garbage collection failed in",
                path: PathBuf::from("tmp"),
                source: std::io::Error::other(e.to_string()),
            })?
    }

    /// Allocated size of the store's blobs and layers in bytes.
    pub fn disk_usage(&self) -> u64 {
        ["blobs", "layers"]
            .iter()
            .map(|d| tree_size(&self.inner.root.join(d)))
            .sum()
    }

    fn prune_blocking(&self, in_use: Vec<String>) -> Result<PruneReport, ImageError> {
        let root = &self.inner.root;
        let keep: HashSet<String> = in_use
            .iter()
            .filter_map(|r| parse_reference(r).ok())
            .map(|r| r.whole())
            .collect();
        let mut report = PruneReport::default();
        let mut live_blobs = BTreeSet::new();
        let mut live_layers: BTreeSet<String> = mounted_layers(&root.join("layers"));
        let refs_dir = root.join("refs");
        let entries =
            fs::read_dir(&refs_dir).map_err(ImageError::io("failed to read", &refs_dir))?;
        for entry in entries.flatten() {
            let path = entry.path();
            let record: Option<RefRecord> = fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            match record {
                Some(record) if keep.contains(&record.reference) => {
                    self.mark_live(&record.manifest_digest, &mut live_blobs, &mut live_layers);
                }
                _ => {
                    fs::remove_file(&path).map_err(ImageError::io("failed to remove", &path))?;
                    report.images += 1;
                }
            }
        }
        let blobs_dir = root.join("blobs/sha256");
        for entry in fs::read_dir(&blobs_dir).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if live_blobs.contains(&name) {
                continue;
            }
            let size = entry.metadata().map_or(0, |m| m.blocks() * 512);
            fs::remove_file(entry.path())
                .map_err(ImageError::io("failed to remove", entry.path()))?;
            report.blobs += 1;
            report.bytes += size;
        }
        let layers_dir = root.join("layers");
        for entry in fs::read_dir(&layers_dir).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            // `.tmp-` dirs are unpacks in flight (or debris cleared at open).
            if live_layers.contains(&name) || name.starts_with(".tmp-") {
                continue;
            }
            let size = tree_size(&entry.path());
            fs::remove_dir_all(entry.path())
                .map_err(ImageError::io("failed to remove", entry.path()))?;
            report.layers += 1;
            report.bytes += size;
        }
        // Short links of removed layers (see `rootfs`) now dangle.
        let links_dir = root.join("l");
        for entry in fs::read_dir(&links_dir).into_iter().flatten().flatten() {
            if !entry.path().exists() {
                let _ = fs::remove_file(entry.path());
            }
        }
        if report != PruneReport::default() {
            tracing::info!(
                images = report.images,
                blobs = report.blobs,
                layers = report.layers,
                freed_mb = report.bytes / (1024 * 1024),
                "pruned unused images"
            );
        }
        Ok(report)
    }

    /// Marks the manifest, its config and layer blobs, and its unpacked
    /// layers live. An unreadable image protects only its manifest.
    fn mark_live(
        &self,
        manifest_digest: &str,
        blobs: &mut BTreeSet<String>,
        layers: &mut BTreeSet<String>,
    ) {
        let hex = |d: &str| d.strip_prefix("sha256:").unwrap_or(d).to_string();
        blobs.insert(hex(manifest_digest));
        let Some(manifest) = self
            .blob_path(manifest_digest)
            .and_then(|p| fs::read(p).ok())
            .and_then(|b| serde_json::from_slice::<OciImageManifest>(&b).ok())
        else {
            return;
        };
        blobs.insert(hex(&manifest.config.digest));
        blobs.extend(manifest.layers.iter().map(|l| hex(&l.digest)));
        let config = self
            .blob_path(&manifest.config.digest)
            .and_then(|p| fs::read(p).ok())
            .and_then(|b| parse_config(&b).ok());
        if let Some(config) = config {
            layers.extend(config.diff_ids.iter().map(|d| hex(d)));
        }
    }
}

/// Names (under `layers_dir`) of the layers that mounted overlays on this
/// host use as lowerdirs, directly or through the store's short links.
fn mounted_layers(layers_dir: &Path) -> BTreeSet<String> {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut names = BTreeSet::new();
    for line in info.lines() {
        let Some((_, right)) = line.split_once(" - ") else {
            continue;
        };
        let mut fields = right.split(' ');
        if fields.next() != Some("overlay") {
            continue;
        }
        let options = fields.nth(1).unwrap_or_default();
        let Some(lower) = options.split(',').find_map(|o| o.strip_prefix("lowerdir=")) else {
            continue;
        };
        for dir in lower.split(':') {
            let dir = PathBuf::from(dir.replace("\\040", " ").replace("\\134", "\\"));
            let dir = fs::read_link(&dir).unwrap_or(dir);
            if let Ok(rest) = dir.strip_prefix(layers_dir) {
                if let Some(name) = rest.components().next() {
                    names.insert(name.as_os_str().to_string_lossy().into_owned());
                }
            }
        }
    }
    names
}

/// Allocated size of everything under `path`, symlinks not followed.
fn tree_size(path: &Path) -> u64 {
    let Ok(meta) = fs::symlink_metadata(path) else {
        return 0;
    };
    let mut total = meta.blocks() * 512;
    if meta.is_dir() {
        for entry in fs::read_dir(path).into_iter().flatten().flatten() {
            total += tree_size(&entry.path());
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tree_size_counts_files_in_subdirectories() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("a/b")).unwrap();
        fs::write(dir.path().join("a/b/f"), vec![1u8; 10_000]).unwrap();
        assert!(tree_size(dir.path()) >= 10_000);
        assert_eq!(tree_size(&dir.path().join("missing")), 0);
    }
}
