//! Where the oci runtime gets images from: the [`ImageSource`] seam, the
//! adapter over the agent's image store, and [`DirImages`], images made of
//! a local directory (tests and machines without a registry).

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Mutex;

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::health::HealthCheck;
use crate::image::ImageUser;

/// The parts of an image's config the runtime spec is built from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageDefaults {
    pub reference: String,
    pub digest: String,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    /// `KEY=VALUE` entries.
    pub env: Vec<String>,
    pub user: String,
    pub working_dir: String,
    /// `80/tcp`, `53/udp`, ...
    pub exposed_ports: Vec<String>,
    pub stop_signal: Option<String>,
    pub healthcheck: Option<HealthCheck>,
    pub labels: BTreeMap<String, String>,
    /// The image's `Volumes`: anonymous volumes of each container.
    pub volumes: Vec<String>,
}

impl ImageDefaults {
    /// The first exposed TCP port (lowest, for determinism).
    pub fn first_tcp_port(&self) -> Option<u16> {
        self.exposed_ports
            .iter()
            .filter_map(|p| match p.split_once('/') {
                Some((port, "tcp")) | Some((port, "")) => port.parse().ok(),
                None => p.parse().ok(),
                Some(_) => None,
            })
            .min()
    }
}

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Pulls images and assembles container root filesystems. Errors are
/// messages for the replica's status.
pub trait ImageSource: Send + Sync + 'static {
    fn pull<'a>(&'a self, reference: &'a str) -> BoxFuture<'a, Result<ImageDefaults, String>>;
    /// Mounts a fresh rootfs of a pulled image under `container_dir` and
    /// returns its path.
    fn mount_rootfs(&self, reference: &str, container_dir: &Path) -> Result<PathBuf, String>;
    /// Unmounts and removes what [`ImageSource::mount_rootfs`] made; fine if
    /// nothing is mounted.
    fn unmount_rootfs(&self, container_dir: &Path) -> Result<(), String>;
    /// Resolves `user` (`name`, `uid`, `name:group`, ...) through the pulled
    /// image's own `/etc/passwd` and `/etc/group`.
    fn lookup_user(&self, reference: &str, user: &str) -> Result<ImageUser, String>;
    /// Removes the images (and their blobs and layers) whose references
    /// `in_use` does not return; see [`crate::image::ImageStore::prune`].
    fn prune<'a>(
        &'a self,
        _in_use: Box<dyn FnOnce() -> Vec<String> + Send>,
    ) -> BoxFuture<'a, Result<crate::image::PruneReport, String>> {
        Box::pin(async { Ok(crate::image::PruneReport::default()) })
    }
    /// Bytes the stored images take on disk.
    fn disk_usage(&self) -> u64 {
        0
    }
}

/// Images that are directories on this machine: `register(reference, dir,
/// defaults)`, then containers get an overlayfs over `dir`.
#[derive(Default)]
pub struct DirImages {
    images: Mutex<HashMap<String, (PathBuf, ImageDefaults)>>,
}

impl DirImages {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn register(&self, reference: &str, rootfs: PathBuf, mut defaults: ImageDefaults) {
        defaults.reference = reference.to_string();
        self.images
            .lock()
            .expect("image table poisoned")
            .insert(reference.to_string(), (rootfs, defaults));
    }
}

impl ImageSource for DirImages {
    fn pull<'a>(&'a self, reference: &'a str) -> BoxFuture<'a, Result<ImageDefaults, String>> {
        let found = self
            .images
            .lock()
            .expect("image table poisoned")
            .get(reference)
            .map(|(_, d)| d.clone());
        Box::pin(async move { found.ok_or_else(|| format!("image {reference} not found")) })
    }

    fn mount_rootfs(&self, reference: &str, container_dir: &Path) -> Result<PathBuf, String> {
        let lower = self
            .images
            .lock()
            .expect("image table poisoned")
            .get(reference)
            .map(|(dir, _)| dir.clone())
            .ok_or_else(|| format!("image {reference} not pulled"))?;
        mount_overlay(&[lower], container_dir)
    }

    fn unmount_rootfs(&self, container_dir: &Path) -> Result<(), String> {
        unmount_overlay(container_dir)
    }

    fn lookup_user(&self, reference: &str, user: &str) -> Result<ImageUser, String> {
        let dir = self
            .images
            .lock()
            .expect("image table poisoned")
            .get(reference)
            .map(|(dir, _)| dir.clone())
            .ok_or_else(|| format!("image {reference} not pulled"))?;
        crate::image::lookup_user(&[dir], user).map_err(|e| e.to_string())
    }
}

/// Mounts `lowers` (top first) with an upper and work dir in
/// `container_dir` at `container_dir/rootfs`.
pub fn mount_overlay(lowers: &[PathBuf], container_dir: &Path) -> Result<PathBuf, String> {
    unmount_overlay(container_dir)?;
    let (upper, work, target) = overlay_dirs(container_dir);
    for dir in [&upper, &work, &target] {
        fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    let lowerdir: Vec<String> = lowers.iter().map(|p| p.display().to_string()).collect();
    let options = format!(
        "lowerdir={},upperdir={},workdir={}",
        lowerdir.join(":"),
        upper.display(),
        work.display()
    );
    mount(
        Some("overlay"),
        &target,
        Some("overlay"),
        MsFlags::empty(),
        Some(options.as_str()),
    )
    .map_err(|e| format!("cannot mount the rootfs at {}: {e}", target.display()))?;
    Ok(target)
}

pub fn unmount_overlay(container_dir: &Path) -> Result<(), String> {
    let (upper, work, target) = overlay_dirs(container_dir);
    if is_mount_point(&target) {
        umount2(&target, MntFlags::MNT_DETACH)
            .map_err(|e| format!("cannot unmount {}: {e}", target.display()))?;
    }
    for dir in [&target, &upper, &work] {
        if let Err(e) = fs::remove_dir_all(dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                return Err(format!("cannot remove {}: {e}", dir.display()));
            }
        }
    }
    Ok(())
}

fn overlay_dirs(container_dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    (
        container_dir.join("upper"),
        container_dir.join("work"),
        container_dir.join("rootfs"),
    )
}

/// Whether `path` is a mount point, read from `/proc/self/mountinfo`.
pub fn is_mount_point(path: &Path) -> bool {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let wanted = path.display().to_string();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|mp| unescape_mountinfo(mp) == wanted)
}

/// Whether anything is mounted at `dir` or below it, read from
/// `/proc/self/mountinfo`: a directory about to be removed recursively must
/// not hold a mount (the removal would reach into it).
pub fn has_mount_under(dir: &Path) -> bool {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let dir = fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|mp| Path::new(&unescape_mountinfo(mp)).starts_with(&dir))
}

/// Mount points in mountinfo escape space, tab, newline and backslash as
/// octal.
fn unescape_mountinfo(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// The node's image store ([`crate::image`]) as an [`ImageSource`].
pub struct StoreImages {
    store: crate::image::ImageStore,
    pulled: Mutex<HashMap<String, crate::image::PulledImage>>,
}

impl StoreImages {
    pub fn new(store: crate::image::ImageStore) -> Self {
        Self {
            store,
            pulled: Mutex::new(HashMap::new()),
        }
    }
}

/// Docker's `Healthcheck.Test`: `["CMD", args...]`, `["CMD-SHELL", line]`
/// or `["NONE"]`.
pub fn image_health(h: &crate::image::Healthcheck) -> Option<HealthCheck> {
    let command = match h.test.split_first() {
        Some((kind, args)) if kind == "CMD" && !args.is_empty() => args.to_vec(),
        Some((kind, [line])) if kind == "CMD-SHELL" => {
            vec!["/bin/sh".into(), "-c".into(), line.clone()]
        }
        _ => return None,
    };
    Some(HealthCheck::new(
        crate::health::Probe::Exec { command },
        h.interval,
        h.timeout,
        h.retries,
        h.start_period,
    ))
}

impl ImageSource for StoreImages {
    fn pull<'a>(&'a self, reference: &'a str) -> BoxFuture<'a, Result<ImageDefaults, String>> {
        Box::pin(async move {
            let image = self
                .store
                .pull(reference)
                .await
                .map_err(|e| e.to_string())?;
            let c = &image.config;
            let defaults = ImageDefaults {
                reference: reference.to_string(),
                digest: image.manifest_digest.clone(),
                entrypoint: c.entrypoint.clone(),
                cmd: c.cmd.clone(),
                env: c.env.clone(),
                user: c.user.clone(),
                working_dir: c.working_dir.clone(),
                exposed_ports: c.exposed_ports.clone(),
                stop_signal: c.stop_signal.clone(),
                healthcheck: c.healthcheck.as_ref().and_then(image_health),
                labels: c.labels.clone(),
                volumes: c.volumes.clone(),
            };
            self.pulled
                .lock()
                .expect("image table poisoned")
                .insert(reference.to_string(), image);
            Ok(defaults)
        })
    }

    fn mount_rootfs(&self, reference: &str, container_dir: &Path) -> Result<PathBuf, String> {
        let image = self
            .pulled
            .lock()
            .expect("image table poisoned")
            .get(reference)
            .cloned()
            .ok_or_else(|| format!("image {reference} is not pulled"))?;
        self.store
            .mount_rootfs(&image, container_dir)
            .map_err(|e| e.to_string())
    }

    fn unmount_rootfs(&self, container_dir: &Path) -> Result<(), String> {
        self.store
            .unmount_rootfs(container_dir)
            .map_err(|e| e.to_string())
    }

    fn lookup_user(&self, reference: &str, user: &str) -> Result<ImageUser, String> {
        self.pulled
            .lock()
            .expect("image table poisoned")
            .get(reference)
            .ok_or_else(|| format!("image {reference} is not pulled"))?
            .lookup_user(user)
            .map_err(|e| e.to_string())
    }

    fn prune<'a>(
        &'a self,
        in_use: Box<dyn FnOnce() -> Vec<String> + Send>,
    ) -> BoxFuture<'a, Result<crate::image::PruneReport, String>> {
        Box::pin(async move {
            let report = self.store.prune(in_use).await.map_err(|e| e.to_string())?;
            if report.images > 0 {
                // Forgotten references are pulled again before their next
                // use; their layers may be gone.
                self.pulled
                    .lock()
                    .expect("image table poisoned")
                    .retain(|_, image| image.layers.iter().all(|l| l.is_dir()));
            }
            Ok(report)
        })
    }

    fn disk_usage(&self) -> u64 {
        self.store.disk_usage()
    }
}

/// Opens the node's image store under `DATA/images`; `None` (logged) if it
/// cannot be opened, so process replicas still run.
pub fn open_store(config: &crate::config::AgentConfig) -> Option<std::sync::Arc<dyn ImageSource>> {
    let options = crate::image::PullOptions {
        insecure_registries: config.insecure_registries.clone(),
        docker_config: config.docker_config.clone(),
        registry_auth_scopes: config.registry_auth_scopes.clone(),
    };
    let root = config.data_dir.join("images");
    match crate::image::ImageStore::open(&root, options) {
        Ok(store) => Some(std::sync::Arc::new(StoreImages::new(store))),
        Err(e) => {
            tracing::warn!(error = %e, root = %root.display(), "cannot open the image store; oci replicas will fail");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_tcp_port_skips_udp_and_takes_the_lowest() {
        let d = ImageDefaults {
            exposed_ports: vec!["53/udp".into(), "8080/tcp".into(), "80/tcp".into()],
            ..Default::default()
        };
        assert_eq!(d.first_tcp_port(), Some(80));
        assert_eq!(ImageDefaults::default().first_tcp_port(), None);
    }

    #[test]
    fn overlay_mounts_and_unmounts_without_leftovers() {
        let dir = tempfile::tempdir().unwrap();
        let lower = dir.path().join("lower");
        fs::create_dir_all(&lower).unwrap();
        fs::write(lower.join("f"), "x").unwrap();
        let container = dir.path().join("c");
        let rootfs = mount_overlay(&[lower], &container).unwrap();
        assert!(is_mount_point(&rootfs));
        assert_eq!(fs::read_to_string(rootfs.join("f")).unwrap(), "x");
        fs::write(rootfs.join("g"), "y").unwrap();
        unmount_overlay(&container).unwrap();
        assert!(!is_mount_point(&rootfs));
        assert!(!rootfs.exists() && !container.join("upper").exists());
        unmount_overlay(&container).unwrap();
    }
}
