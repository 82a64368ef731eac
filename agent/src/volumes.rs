//! The node's named volumes and a container's mounts of them.
//!
//! A named volume is a directory `DATA/volumes/<name>/_data` (parents 0700,
//! root only; the container reaches it through its bind mount), with the
//! service and slot that created it in `meta.json`. It is created at first
//! use and outlives its replicas: only `skiff volume rm` deletes it. While a
//! volume is empty, the image's content at the mount's target is copied in
//! with its ownership and modes (Docker's behaviour, so an image's user can
//! write its data dir); `nocopy` skips that. The image config's `Volumes`
//! become anonymous volumes under the allocation's own directory
//! (`DATA/allocs/<id>/volumes/<i>`, its target in `<i>.json`), removed with
//! it; they are listed as `<alloc id>-<i>`. Bind mounts are allowed only
//! below the agent's `--allow-host-path` prefixes.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use skiff_spec::{Mount, MountKind};

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("failed to {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("failed to copy the image's {target} into volume {volume}: {detail}")]
    Copy {
        target: String,
        volume: String,
        detail: String,
    },
    #[error("bind mount of {path} refused: this agent allows host paths only below {allowed}; start it with --allow-host-path PREFIX")]
    HostPathRefused { path: String, allowed: String },
    #[error("volume {0} is not a volume name")]
    BadName(String),
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> VolumeError + 'a {
    move |source| VolumeError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// What `meta.json` records of a volume.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeMeta {
    pub service: String,
    /// `None` for a shared volume.
    pub slot: Option<u32>,
}

/// What `<i>.json` beside an anonymous volume records: its replica's
/// service and slot, and where it is mounted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct AnonymousMeta {
    #[serde(flatten)]
    meta: VolumeMeta,
    target: String,
}

/// Where an anonymous volume belongs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Anonymous {
    /// The allocation whose directory holds it.
    pub alloc_id: String,
    /// Its path in the container (empty when not recorded).
    pub target: String,
}

/// A volume as the agent reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeInfo {
    pub name: String,
    pub meta: VolumeMeta,
    pub size_bytes: u64,
    /// `Some` for one of an image's `Volumes` (removed with its replica).
    pub anonymous: Option<Anonymous>,
}

/// One bind mount of a container: host path, target, read-only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    pub source: PathBuf,
    pub target: String,
    pub read_only: bool,
}

/// The node's named volumes, under `DATA/volumes`, and its replicas'
/// anonymous ones under the sibling `DATA/allocs`.
#[derive(Debug, Clone)]
pub struct Volumes {
    dir: PathBuf,
    allocs_dir: PathBuf,
    allowed_host_paths: Vec<String>,
}

impl Volumes {
    pub fn new(dir: PathBuf, allowed_host_paths: Vec<String>) -> Self {
        Volumes {
            allocs_dir: dir.with_file_name("allocs"),
            dir,
            allowed_host_paths,
        }
    }

    fn data_path(&self, name: &str) -> Result<PathBuf, VolumeError> {
        let safe = !name.is_empty()
            && name.len() <= 63
            && !name.starts_with('.')
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
        if !safe {
            return Err(VolumeError::BadName(name.to_string()));
        }
        Ok(self.dir.join(name).join("_data"))
    }

    /// The volume's data directory, created (parents 0700) with its meta
    /// when missing.
    pub fn ensure(&self, name: &str, meta: &VolumeMeta) -> Result<PathBuf, VolumeError> {
        let data = self.data_path(name)?;
        if data.is_dir() {
            return Ok(data);
        }
        let root = self.dir.join(name);
        for dir in [&self.dir, &root] {
            fs::create_dir_all(dir).map_err(io("create", dir))?;
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
                .map_err(io("restrict", dir))?;
        }
        let json = serde_json::to_vec(meta).unwrap_or_default();
        let meta_path = root.join("meta.json");
        fs::write(&meta_path, json).map_err(io("write", &meta_path))?;
        fs::create_dir_all(&data).map_err(io("create", &data))?;
        tracing::info!(volume = name, service = %meta.service, "volume created");
        Ok(data)
    }

    /// Every volume on the node with its size.
    pub fn list(&self) -> Vec<VolumeInfo> {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut out: Vec<VolumeInfo> = entries
            .flatten()
            .filter_map(|entry| {
                let name = entry.file_name().into_string().ok()?;
                let data = self.data_path(&name).ok()?;
                if !data.is_dir() {
                    return None;
                }
                let meta = fs::read(entry.path().join("meta.json"))
                    .ok()
                    .and_then(|b| serde_json::from_slice(&b).ok())
                    .unwrap_or_default();
                Some(VolumeInfo {
                    name,
                    meta,
                    size_bytes: disk_usage(&data),
                    anonymous: None,
                })
            })
            .collect();
        out.extend(self.list_anonymous());
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// The anonymous volumes in the allocations' directories, named
    /// `<alloc id>-<i>`; they go when their allocation's directory does.
    fn list_anonymous(&self) -> Vec<VolumeInfo> {
        let mut out = Vec::new();
        let Ok(allocs) = fs::read_dir(&self.allocs_dir) else {
            return out;
        };
        for alloc in allocs.flatten() {
            let Ok(alloc_id) = alloc.file_name().into_string() else {
                continue;
            };
            let Ok(entries) = fs::read_dir(alloc.path().join("volumes")) else {
                continue;
            };
            for entry in entries.flatten() {
                let Some(i) = entry
                    .file_name()
                    .to_str()
                    .and_then(|n| n.parse::<u32>().ok())
                else {
                    continue;
                };
                if !entry.path().is_dir() {
                    continue;
                }
                let recorded: AnonymousMeta = fs::read(entry.path().with_extension("json"))
                    .ok()
                    .and_then(|b| serde_json::from_slice(&b).ok())
                    .unwrap_or_default();
                out.push(VolumeInfo {
                    name: format!("{alloc_id}-{i}"),
                    meta: recorded.meta,
                    size_bytes: disk_usage(&entry.path()),
                    anonymous: Some(Anonymous {
                        alloc_id: alloc_id.clone(),
                        target: recorded.target,
                    }),
                });
            }
        }
        out
    }

    /// Deletes a volume and its data.
    pub fn remove(&self, name: &str) -> Result<(), VolumeError> {
        self.data_path(name)?;
        let root = self.dir.join(name);
        match fs::remove_dir_all(&root) {
            Ok(()) => {
                tracing::info!(volume = name, "volume removed");
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io("remove", &root)(e)),
        }
    }

    /// The bind mounts of a container: its named volumes (created and
    /// filled from the image when new), its allowed host paths, and one
    /// anonymous volume under `alloc_dir` for each of the image's
    /// `Volumes` no mount covers. `rootfs` is the container's mounted
    /// root (the image's content); `owner` the uid and gid of its user.
    pub fn binds(
        &self,
        mounts: &[Mount],
        meta: &VolumeMeta,
        image_volumes: &[String],
        rootfs: &Path,
        alloc_dir: &Path,
        owner: (u32, u32),
    ) -> Result<Vec<Bind>, VolumeError> {
        let mut binds = Vec::new();
        for mount in mounts {
            let source = match mount.kind {
                MountKind::Bind => {
                    if !skiff_spec::host_path_allowed(&mount.source, &self.allowed_host_paths) {
                        let allowed = if self.allowed_host_paths.is_empty() {
                            "(none)".to_string()
                        } else {
                            self.allowed_host_paths.join(", ")
                        };
                        return Err(VolumeError::HostPathRefused {
                            path: mount.source.clone(),
                            allowed,
                        });
                    }
                    PathBuf::from(&mount.source)
                }
                MountKind::Volume => {
                    let data = self.ensure(&mount.source, meta)?;
                    if !mount.nocopy {
                        populate(rootfs, &mount.target, &data, owner).map_err(|detail| {
                            VolumeError::Copy {
                                target: mount.target.clone(),
                                volume: mount.source.clone(),
                                detail,
                            }
                        })?;
                    }
                    data
                }
            };
            binds.push(Bind {
                source,
                target: mount.target.clone(),
                read_only: mount.read_only,
            });
        }
        for (i, target) in image_volumes.iter().enumerate() {
            let target = normalise(target);
            if target == "/" || mounts.iter().any(|m| normalise(&m.target) == target) {
                continue;
            }
            let data = alloc_dir.join("volumes").join(i.to_string());
            fs::create_dir_all(&data).map_err(io("create", &data))?;
            let recorded = AnonymousMeta {
                meta: meta.clone(),
                target: target.clone(),
            };
            let meta_path = data.with_extension("json");
            let json = serde_json::to_vec(&recorded).unwrap_or_default();
            fs::write(&meta_path, json).map_err(io("write", &meta_path))?;
            populate(rootfs, &target, &data, owner).map_err(|detail| VolumeError::Copy {
                target: target.clone(),
                volume: "(anonymous)".into(),
                detail,
            })?;
            binds.push(Bind {
                source: data,
                target,
                read_only: false,
            });
        }
        Ok(binds)
    }
}

/// `/data/` and `data` as `/data`.
fn normalise(path: &str) -> String {
    let trimmed = path.trim_matches('/');
    format!("/{trimmed}")
}

/// Fills an empty volume from the image: the content at `target` in
/// `rootfs` with its ownership and modes (`cp -a`), or, when the image has
/// nothing there, the volume's root owned by the image's user so it can
/// write it. A volume with anything in it is left alone, as is a target
/// reached through a symlink in the image (it could point anywhere on the
/// host).
pub fn populate(
    rootfs: &Path,
    target: &str,
    volume: &Path,
    owner: (u32, u32),
) -> Result<(), String> {
    let not_empty = fs::read_dir(volume)
        .map_err(|e| format!("cannot read {}: {e}", volume.display()))?
        .next()
        .is_some();
    if not_empty {
        return Ok(());
    }
    let mut source = rootfs.to_path_buf();
    let mut through_symlink = false;
    for component in target.split('/').filter(|c| !c.is_empty()) {
        source.push(component);
        if fs::symlink_metadata(&source).is_ok_and(|m| m.file_type().is_symlink()) {
            through_symlink = true;
            break;
        }
    }
    let source_dir = fs::symlink_metadata(&source).ok().filter(|m| m.is_dir());
    match source_dir {
        Some(meta) if !through_symlink => {
            let output = std::process::Command::new("cp")
                .arg("-a")
                .arg(format!("{}/.", source.display()))
                .arg(volume)
                .output()
                .map_err(|e| format!("cannot run cp: {e}"))?;
            if !output.status.success() {
                return Err(String::from_utf8_lossy(&output.stderr).trim().to_string());
            }
            // `cp -a DIR/.` copies the content; the root takes the image
            // directory's owner and mode too.
            std::os::unix::fs::chown(volume, Some(meta.uid()), Some(meta.gid()))
                .map_err(|e| format!("cannot chown {}: {e}", volume.display()))?;
            fs::set_permissions(volume, fs::Permissions::from_mode(meta.mode() & 0o7777))
                .map_err(|e| format!("cannot chmod {}: {e}", volume.display()))
        }
        _ => std::os::unix::fs::chown(volume, Some(owner.0), Some(owner.1))
            .map_err(|e| format!("cannot chown {}: {e}", volume.display())),
    }
}

/// Bytes the files under `path` take (apparent sizes, symlinks not
/// followed).
pub fn disk_usage(path: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![path.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                stack.push(entry.path());
            } else {
                total += meta.len();
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("skiff-volumes-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn me() -> (u32, u32) {
        let meta = fs::metadata("/proc/self").unwrap();
        (meta.uid(), meta.gid())
    }

    #[test]
    fn a_new_volume_is_filled_from_the_image_once_and_listed_with_its_size() {
        let base = temp("fill");
        let rootfs = base.join("rootfs");
        fs::create_dir_all(rootfs.join("var/lib/app")).unwrap();
        fs::write(rootfs.join("var/lib/app/seed"), "hello").unwrap();
        let volumes = Volumes::new(base.join("volumes"), vec![]);
        let meta = VolumeMeta {
            service: "db".into(),
            slot: Some(0),
        };
        let mounts = vec![Mount::parse_volume("data-0:/var/lib/app").unwrap()];
        let binds = volumes
            .binds(&mounts, &meta, &[], &rootfs, &base, me())
            .unwrap();
        assert_eq!(binds[0].target, "/var/lib/app");
        assert_eq!(
            fs::read_to_string(binds[0].source.join("seed")).unwrap(),
            "hello"
        );
        let mode = fs::metadata(base.join("volumes/data-0")).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o700);
        // Not empty any more: the image's content is not copied again.
        fs::write(binds[0].source.join("seed"), "changed!").unwrap();
        volumes
            .binds(&mounts, &meta, &[], &rootfs, &base, me())
            .unwrap();
        assert_eq!(
            fs::read_to_string(binds[0].source.join("seed")).unwrap(),
            "changed!"
        );
        let listed = volumes.list();
        assert_eq!(listed.len(), 1);
        assert_eq!(
            (listed[0].name.as_str(), listed[0].size_bytes),
            ("data-0", 8)
        );
        assert_eq!(listed[0].meta, meta);
        volumes.remove("data-0").unwrap();
        assert!(volumes.list().is_empty());
        let _ = fs::remove_dir_all(&base);
    }

    #[test]
    fn nocopy_leaves_the_volume_empty_and_image_volumes_become_anonymous() {
        let base = temp("nocopy");
        let rootfs = base.join("rootfs");
        fs::create_dir_all(rootfs.join("data")).unwrap();
        fs::write(rootfs.join("data/seed"), "x").unwrap();
        fs::create_dir_all(rootfs.join("cache")).unwrap();
        fs::write(rootfs.join("cache/c"), "y").unwrap();
        let volumes = Volumes::new(base.join("volumes"), vec![]);
        let mounts = vec![Mount::parse_volume("v:/data:nocopy").unwrap()];
        let meta = VolumeMeta {
            service: "web".into(),
            slot: Some(3),
        };
        let alloc_dir = base.join("allocs/0123456789ab");
        let binds = volumes
            .binds(
                &mounts,
                &meta,
                &["/data".into(), "/cache/".into()],
                &rootfs,
                &alloc_dir,
                me(),
            )
            .unwrap();
        assert_eq!(binds.len(), 2, "/data is covered by the named volume");
        assert!(fs::read_dir(&binds[0].source).unwrap().next().is_none());
        assert_eq!(binds[1].target, "/cache");
        assert_eq!(fs::read_to_string(binds[1].source.join("c")).unwrap(), "y");
        let _ = fs::remove_dir_all(&base);
    }

    #[test]
    fn anonymous_volumes_are_listed_with_their_replica_and_target_until_its_dir_goes() {
        let base = temp("anonymous");
        let rootfs = base.join("rootfs");
        fs::create_dir_all(rootfs.join("cache")).unwrap();
        fs::write(rootfs.join("cache/c"), "four").unwrap();
        let volumes = Volumes::new(base.join("volumes"), vec![]);
        let meta = VolumeMeta {
            service: "web".into(),
            slot: Some(3),
        };
        let alloc_dir = base.join("allocs/0123456789ab");
        let mounts = vec![Mount::parse_volume("v:/data").unwrap()];
        volumes
            .binds(
                &mounts,
                &meta,
                &["/data".into(), "/cache/".into()],
                &rootfs,
                &alloc_dir,
                me(),
            )
            .unwrap();
        let listed = volumes.list();
        let names: Vec<&str> = listed.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(names, ["0123456789ab-1", "v"]);
        let anonymous = &listed[0];
        assert_eq!(
            anonymous.anonymous,
            Some(Anonymous {
                alloc_id: "0123456789ab".into(),
                target: "/cache".into(),
            })
        );
        assert_eq!((&anonymous.meta, anonymous.size_bytes), (&meta, 4));
        assert_eq!(listed[1].anonymous, None);
        // Removing the replica's directory removes its anonymous volume.
        fs::remove_dir_all(&alloc_dir).unwrap();
        let names: Vec<String> = volumes.list().into_iter().map(|v| v.name).collect();
        assert_eq!(names, ["v"]);
        let _ = fs::remove_dir_all(&base);
    }

    #[test]
    fn bind_mounts_outside_the_allowed_prefixes_are_refused() {
        let base = temp("bind");
        let volumes = Volumes::new(base.join("volumes"), vec!["/srv".into()]);
        let refused = Mount::parse_mount("type=bind,src=/etc,dst=/x").unwrap();
        let err = volumes
            .binds(&[refused], &VolumeMeta::default(), &[], &base, &base, me())
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("allows host paths only below /srv"),
            "{err}"
        );
        let allowed = Mount::parse_mount("type=bind,src=/srv/a,dst=/x,ro").unwrap();
        let binds = volumes
            .binds(&[allowed], &VolumeMeta::default(), &[], &base, &base, me())
            .unwrap();
        assert!(binds[0].read_only);
        let _ = fs::remove_dir_all(&base);
    }
}
