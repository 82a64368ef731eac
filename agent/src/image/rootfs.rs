//! Per-container root filesystems: an overlayfs mount whose lowerdirs are the
//! image's unpacked layers (top first) and whose upper and work dirs live in
//! the container's directory, so containers share layers and write only to
//! their own upper dir.
//!
//! The mount options must fit in one page; when the layers' full paths do
//! not, each layer is named through a short symlink under the store's `l/`
//! (as Docker's overlay2 does), which overlayfs follows when it resolves the
//! lowerdirs.

use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use sha2::{Digest, Sha256};

use super::{ImageError, ImageStore, PulledImage};

/// Room for the mount options (one page, less a margin for the kernel's
/// own additions).
pub(crate) const MOUNT_OPTIONS_LIMIT: usize = 4000;

fn mount_error(action: &'static str, path: &Path, reason: impl ToString) -> ImageError {
    ImageError::Mount {
        action,
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// Decodes the octal escapes (`\040` for space...) of /proc/self/mountinfo.
fn unescape_mount_path(field: &str) -> PathBuf {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            if let Some(v) = std::str::from_utf8(&bytes[i + 1..i + 4])
                .ok()
                .and_then(|s| u8::from_str_radix(s, 8).ok())
            {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    PathBuf::from(std::ffi::OsString::from(
        <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(&out),
    ))
}

/// Whether `path` is a mount point in this process' mount namespace.
pub fn is_mounted(path: &Path) -> bool {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let target = fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    info.lines().any(|line| {
        line.split(' ')
            .nth(4)
            .is_some_and(|mp| unescape_mount_path(mp) == target)
    })
}

fn check_option_path(path: &Path) -> Result<String, String> {
    let s = path
        .to_str()
        .ok_or_else(|| format!("path {} is not utf-8", path.display()))?;
    if s.contains(',') || s.contains(':') {
        return Err(format!("path {s} contains ',' or ':'"));
    }
    Ok(s.to_string())
}

/// A short, stable name for a layer dir under `links_dir`, created (or
/// fixed) on demand.
fn short_link(links_dir: &Path, layer: &Path) -> Result<PathBuf, String> {
    let id = hex::encode(&Sha256::digest(layer.as_os_str().as_encoded_bytes())[..8]);
    let link = links_dir.join(id);
    match fs::read_link(&link) {
        Ok(target) if target == layer => return Ok(link),
        Ok(_) => fs::remove_file(&link).map_err(|e| e.to_string())?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e.to_string()),
    }
    match std::os::unix::fs::symlink(layer, &link) {
        Ok(()) => Ok(link),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(link),
        Err(e) => Err(e.to_string()),
    }
}

/// The overlay mount options for `lowers` (top first). Tried in turn until
/// one fits in `limit`: full paths; short symlinks under `links_dir`; and
/// `/proc/self/fd/N` of directories opened here (whatever the store's path
/// length), whose files must stay open until the mount is done.
pub(crate) fn overlay_options(
    lowers: &[PathBuf],
    upper: &Path,
    work: &Path,
    links_dir: &Path,
    limit: usize,
) -> Result<(String, Vec<fs::File>), String> {
    let tail = format!(
        ",upperdir={},workdir={}",
        check_option_path(upper)?,
        check_option_path(work)?
    );
    let full = lowers
        .iter()
        .map(|l| check_option_path(l))
        .collect::<Result<Vec<_>, _>>()?
        .join(":");
    let options = format!("lowerdir={full}{tail}");
    if options.len() <= limit {
        return Ok((options, Vec::new()));
    }
    let short = lowers
        .iter()
        .map(|l| short_link(links_dir, l).and_then(|p| check_option_path(&p)))
        .collect::<Result<Vec<_>, _>>()?
        .join(":");
    let options = format!("lowerdir={short}{tail}");
    if options.len() <= limit {
        return Ok((options, Vec::new()));
    }
    let mut files = Vec::new();
    let mut fd_path = |dir: &Path| -> Result<String, String> {
        let file = fs::File::open(dir).map_err(|e| format!("open {}: {e}", dir.display()))?;
        let path = format!("/proc/self/fd/{}", file.as_raw_fd());
        files.push(file);
        Ok(path)
    };
    let lower = lowers
        .iter()
        .map(|l| fd_path(l))
        .collect::<Result<Vec<_>, _>>()?
        .join(":");
    let options = format!(
        "lowerdir={lower},upperdir={},workdir={}",
        fd_path(upper)?,
        fd_path(work)?
    );
    if options.len() <= limit {
        Ok((options, files))
    } else {
        Err(format!(
            "{} layers do not fit in the overlay mount options",
            lowers.len()
        ))
    }
}

impl ImageStore {
    /// Mounts the container's rootfs at `container_dir/rootfs`: an overlay
    /// of the image's layers with `container_dir/upper` and
    /// `container_dir/work`. Idempotent: an existing mount is kept.
    pub fn mount_rootfs(
        &self,
        image: &PulledImage,
        container_dir: &Path,
    ) -> Result<PathBuf, ImageError> {
        let rootfs = container_dir.join("rootfs");
        if is_mounted(&rootfs) {
            return Ok(rootfs);
        }
        let upper = container_dir.join("upper");
        let work = container_dir.join("work");
        for dir in [&rootfs, &upper, &work] {
            fs::create_dir_all(dir).map_err(ImageError::io("failed to create", dir))?;
        }
        let mut lowers: Vec<PathBuf> = image.layers.iter().rev().cloned().collect();
        if lowers.is_empty() {
            // An image without layers (FROM scratch, nothing added).
            let empty = container_dir.join("empty");
            fs::create_dir_all(&empty).map_err(ImageError::io("failed to create", &empty))?;
            lowers.push(empty);
        }
        for lower in &lowers {
            if !lower.is_dir() {
                return Err(mount_error(
                    "mount",
                    &rootfs,
                    format!("layer {} is missing", lower.display()),
                ));
            }
        }
        let (options, _open_dirs) = overlay_options(
            &lowers,
            &upper,
            &work,
            &self.inner.root.join("l"),
            MOUNT_OPTIONS_LIMIT,
        )
        .map_err(|reason| mount_error("mount", &rootfs, reason))?;
        mount(
            Some("overlay"),
            &rootfs,
            Some("overlay"),
            MsFlags::empty(),
            Some(options.as_str()),
        )
        .map_err(|e| mount_error("mount", &rootfs, e.desc().to_lowercase()))?;
        Ok(rootfs)
    }

    /// Unmounts `container_dir/rootfs` and removes the upper and work dirs
    /// (and the empty mount point). Fine when nothing is mounted.
    pub fn unmount_rootfs(&self, container_dir: &Path) -> Result<(), ImageError> {
        let rootfs = container_dir.join("rootfs");
        // Bounded: a few stacked mounts at most.
        for _ in 0..8 {
            if !is_mounted(&rootfs) {
                break;
            }
            if let Err(e) = umount2(&rootfs, MntFlags::empty()) {
                if e == nix::errno::Errno::EBUSY {
                    umount2(&rootfs, MntFlags::MNT_DETACH)
                        .map_err(|e| mount_error("unmount", &rootfs, e.desc().to_lowercase()))?;
                } else if e != nix::errno::Errno::EINVAL {
                    return Err(mount_error("unmount", &rootfs, e.desc().to_lowercase()));
                }
            }
        }
        if is_mounted(&rootfs) {
            return Err(mount_error("unmount", &rootfs, "still mounted"));
        }
        for dir in ["upper", "work", "empty"] {
            let path = container_dir.join(dir);
            match fs::remove_dir_all(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(ImageError::io("failed to remove", &path)(e)),
            }
        }
        // Only the (now empty) mount point: never a rootfs that is someone's
        // real directory with content.
        if fs::symlink_metadata(&rootfs).is_ok_and(|m| m.is_dir() && m.nlink() <= 2) {
            let _ = fs::remove_dir(&rootfs);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_lowerdir_lists_use_short_links() {
        let tmp = tempfile::tempdir().unwrap();
        let deep = tmp.path().join("a".repeat(120)).join("b".repeat(120));
        let links = tmp.path().join("l");
        fs::create_dir_all(&links).unwrap();
        let lowers: Vec<PathBuf> = (0..25)
            .map(|i| {
                let p = deep.join(format!("{i:064}"));
                fs::create_dir_all(&p).unwrap();
                p
            })
            .collect();
        let (options, _open_dirs) = overlay_options(
            &lowers,
            &tmp.path().join("u"),
            &tmp.path().join("w"),
            &links,
            MOUNT_OPTIONS_LIMIT,
        )
        .unwrap();
        assert!(options.len() <= MOUNT_OPTIONS_LIMIT);
        assert!(options.contains(links.to_str().unwrap()));
        // Same layer, same link: idempotent.
        let (again, _) = overlay_options(
            &lowers,
            &tmp.path().join("u"),
            &tmp.path().join("w"),
            &links,
            MOUNT_OPTIONS_LIMIT,
        )
        .unwrap();
        assert_eq!(options, again);
        assert_eq!(fs::read_dir(&links).unwrap().count(), 25);
    }

    #[test]
    fn short_lowerdir_lists_use_full_paths() {
        let (options, _open_dirs) = overlay_options(
            &[PathBuf::from("/s/l2"), PathBuf::from("/s/l1")],
            Path::new("/c/upper"),
            Path::new("/c/work"),
            Path::new("/s/l"),
            MOUNT_OPTIONS_LIMIT,
        )
        .unwrap();
        assert_eq!(
            options,
            "lowerdir=/s/l2:/s/l1,upperdir=/c/upper,workdir=/c/work"
        );
    }

    #[test]
    fn very_long_store_paths_fall_back_to_proc_fds() {
        let tmp = tempfile::tempdir().unwrap();
        let deep = tmp.path().join("a".repeat(200)).join("b".repeat(200));
        let links = deep.join("l");
        fs::create_dir_all(&links).unwrap();
        let lowers: Vec<PathBuf> = (0..30)
            .map(|i| {
                let p = deep.join(format!("{i:064}"));
                fs::create_dir_all(&p).unwrap();
                p
            })
            .collect();
        let (upper, work) = (deep.join("upper"), deep.join("work"));
        fs::create_dir_all(&upper).unwrap();
        fs::create_dir_all(&work).unwrap();
        let (options, files) =
            overlay_options(&lowers, &upper, &work, &links, MOUNT_OPTIONS_LIMIT).unwrap();
        assert_eq!(files.len(), 32);
        assert!(options.starts_with("lowerdir=/proc/self/fd/"), "{options}");
        assert!(options.len() <= MOUNT_OPTIONS_LIMIT);
    }

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape_mount_path("/a\\040b"), PathBuf::from("/a b"));
        assert_eq!(unescape_mount_path("/plain"), PathBuf::from("/plain"));
    }
}
