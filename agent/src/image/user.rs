//! Resolving an image's `User` (`name`, `uid`, `name:group`, `uid:gid`...)
//! to numeric ids through the image's own `/etc/passwd` and `/etc/group`:
//! uids differ per image, so the host's files are never consulted.
//!
//! Files are read from the unpacked layers directly (top layer first,
//! honouring whiteouts and opaque directories), without a mounted rootfs and
//! without following a symlink out of the image.

use std::fs;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use super::unpack::OPAQUE_XATTR;
use super::ImageError;

/// The ids a container's process runs with.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageUser {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups: those of `/etc/group` listing the user by name
    /// (only when the user spec names no group, as runc does).
    pub additional_gids: Vec<u32>,
    /// Home directory from `/etc/passwd` (the container's `HOME`); `/` when
    /// the user has no entry.
    pub home: String,
}

enum Lookup {
    File(PathBuf),
    /// A symlink on the way, resolved to an image-relative path.
    Link(PathBuf),
    Hidden,
    Absent,
}

fn is_whiteout(meta: &fs::Metadata) -> bool {
    meta.file_type().is_char_device() && meta.rdev() == 0
}

fn is_opaque(dir: &Path) -> bool {
    matches!(xattr::get(dir, OPAQUE_XATTR), Ok(Some(v)) if v == b"y")
}

/// Looks `rel` up in one layer.
fn lookup_in_layer(layer: &Path, rel: &Path) -> Lookup {
    let parts: Vec<_> = rel.components().collect();
    let mut current = layer.to_path_buf();
    let mut opaque_above = false;
    for (i, part) in parts.iter().enumerate() {
        current.push(part);
        let last = i + 1 == parts.len();
        match fs::symlink_metadata(&current) {
            Err(_) => {
                return if opaque_above {
                    Lookup::Hidden
                } else {
                    Lookup::Absent
                }
            }
            Ok(meta) if is_whiteout(&meta) => return Lookup::Hidden,
            Ok(meta) if meta.file_type().is_symlink() => {
                // Resolved inside the image; a symlinked parent (`/etc ->
                // ...`) carries the rest of the path along.
                let target = fs::read_link(&current).unwrap_or_default();
                let parent: PathBuf = parts[..i].iter().collect();
                let rest: PathBuf = parts[i + 1..].iter().collect();
                return Lookup::Link(join_link(&parent, &target).join(rest));
            }
            Ok(meta) if last => {
                return if meta.is_file() {
                    Lookup::File(current)
                } else {
                    Lookup::Hidden
                }
            }
            Ok(meta) if meta.is_dir() => {
                if is_opaque(&current) {
                    opaque_above = true;
                }
            }
            Ok(_) => return Lookup::Hidden,
        }
    }
    Lookup::Absent
}

/// Where a symlink found in directory `dir` (image-relative) points,
/// image-relative, with `..` clamped at the image root.
fn join_link(dir: &Path, target: &Path) -> PathBuf {
    let base = if target.is_absolute() {
        PathBuf::new()
    } else {
        dir.to_path_buf()
    };
    normalize(&base.join(target))
}

fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::ParentDir => {
                out.pop();
            }
            _ => {}
        }
    }
    out
}

/// Most of an image's `/etc/passwd` or `/etc/group` read: the image
/// decides its size, the agent's memory does not.
const MAX_ACCOUNT_FILE_BYTES: u64 = 4 << 20;

/// The file at `path`, or `None` when it is over [`MAX_ACCOUNT_FILE_BYTES`]
/// (as if the image had none) or unreadable.
fn read_bounded(path: &Path) -> Option<Vec<u8>> {
    use std::io::Read;
    let file = fs::File::open(path).ok()?;
    let mut bytes = Vec::new();
    file.take(MAX_ACCOUNT_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .ok()?;
    let too_big = u64::try_from(bytes.len()).map_or(true, |n| n > MAX_ACCOUNT_FILE_BYTES);
    if too_big {
        tracing::warn!(path = %path.display(), "image file over {} MiB ignored", MAX_ACCOUNT_FILE_BYTES >> 20);
        return None;
    }
    Some(bytes)
}

/// Reads the file at image path `path` (e.g. `/etc/passwd`) from the
/// layers (base first), as the merged rootfs would show it; `None` when the
/// image has no such file.
pub fn read_image_file(layers: &[PathBuf], path: &str) -> Option<Vec<u8>> {
    let mut rel = normalize(Path::new(path));
    // Bounded symlink resolution, like the kernel's.
    for _ in 0..40 {
        let mut next = None;
        for layer in layers.iter().rev() {
            match lookup_in_layer(layer, &rel) {
                Lookup::File(p) => return read_bounded(&p),
                Lookup::Link(resolved) => {
                    next = Some(resolved);
                    break;
                }
                Lookup::Hidden => return None,
                Lookup::Absent => {}
            }
        }
        rel = next?;
    }
    None
}

struct PasswdEntry {
    name: String,
    uid: u32,
    gid: u32,
    home: String,
}

struct GroupEntry {
    name: String,
    gid: u32,
    members: Vec<String>,
}

fn parse_passwd(text: &str) -> Vec<PasswdEntry> {
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            Some(PasswdEntry {
                name: f.first()?.to_string(),
                uid: f.get(2)?.parse().ok()?,
                gid: f.get(3)?.parse().ok()?,
                home: f
                    .get(5)
                    .filter(|h| !h.is_empty())
                    .map_or("/", |h| h)
                    .to_string(),
            })
        })
        .collect()
}

fn parse_group(text: &str) -> Vec<GroupEntry> {
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            Some(GroupEntry {
                name: f.first()?.to_string(),
                gid: f.get(2)?.parse().ok()?,
                members: f
                    .get(3)
                    .map(|m| {
                        m.split(',')
                            .map(str::trim)
                            .filter(|s| !s.is_empty())
                            .map(String::from)
                            .collect()
                    })
                    .unwrap_or_default(),
            })
        })
        .collect()
}

/// Resolves `user` (the image's `User` or a service's override) against the
/// image whose layers (base first) are given. Empty means root. A numeric
/// uid not in `/etc/passwd` runs with gid 0, as in Docker; a name must
/// exist.
pub fn lookup_user(layers: &[PathBuf], user: &str) -> Result<ImageUser, ImageError> {
    let fail = |reason: String| ImageError::User {
        user: user.to_string(),
        reason,
    };
    let passwd = read_image_file(layers, "/etc/passwd")
        .map(|b| parse_passwd(&String::from_utf8_lossy(&b)))
        .unwrap_or_default();
    let groups = read_image_file(layers, "/etc/group")
        .map(|b| parse_group(&String::from_utf8_lossy(&b)))
        .unwrap_or_default();
    let (user_part, group_part) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let user_part = if user_part.is_empty() { "0" } else { user_part };
    let (uid, mut gid, name, home) = match user_part.parse::<u32>() {
        Ok(uid) => match passwd.iter().find(|p| p.uid == uid) {
            Some(p) => (uid, p.gid, Some(p.name.clone()), p.home.clone()),
            None => (uid, 0, None, "/".to_string()),
        },
        Err(_) => match passwd.iter().find(|p| p.name == user_part) {
            Some(p) => (p.uid, p.gid, Some(p.name.clone()), p.home.clone()),
            None => {
                return Err(fail(format!(
                    "no user {user_part:?} in the image's /etc/passwd"
                )))
            }
        },
    };
    let mut additional_gids = Vec::new();
    match group_part.filter(|g| !g.is_empty()) {
        Some(group) => {
            gid = match group.parse::<u32>() {
                Ok(gid) => gid,
                Err(_) => groups
                    .iter()
                    .find(|g| g.name == group)
                    .map(|g| g.gid)
                    .ok_or_else(|| fail(format!("no group {group:?} in the image's /etc/group")))?,
            };
        }
        None => {
            if let Some(name) = &name {
                for g in groups.iter().filter(|g| g.members.contains(name)) {
                    if g.gid != gid && !additional_gids.contains(&g.gid) {
                        additional_gids.push(g.gid);
                    }
                }
            }
        }
    }
    Ok(ImageUser {
        uid,
        gid,
        additional_gids,
        home,
    })
}

impl super::PulledImage {
    /// [`lookup_user`] on this image's layers.
    pub fn lookup_user(&self, user: &str) -> Result<ImageUser, ImageError> {
        lookup_user(&self.layers, user)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::stat::{makedev, mknod, Mode, SFlag};

    fn layer(root: &Path, name: &str, files: &[(&str, &str)]) -> PathBuf {
        let dir = root.join(name);
        for (path, content) in files {
            let p = dir.join(path);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, content).unwrap();
        }
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\nwww:x:1000:1000::/www:/bin/sh\n";
    const GROUP: &str = "root:x:0:\nwww:x:1000:\nwheel:x:10:www,other\n";

    #[test]
    fn names_and_numbers_resolve_through_the_images_files() {
        let tmp = tempfile::tempdir().unwrap();
        let base = layer(
            tmp.path(),
            "base",
            &[("etc/passwd", PASSWD), ("etc/group", GROUP)],
        );
        let layers = vec![base];
        let root = lookup_user(&layers, "").unwrap();
        assert_eq!((root.uid, root.gid, root.home.as_str()), (0, 0, "/root"));
        let www = lookup_user(&layers, "www").unwrap();
        assert_eq!(
            (www.uid, www.gid, www.additional_gids, www.home.as_str()),
            (1000, 1000, vec![10], "/www")
        );
        assert_eq!(lookup_user(&layers, "1000").unwrap().gid, 1000);
        let odd = lookup_user(&layers, "4242").unwrap();
        assert_eq!((odd.uid, odd.gid, odd.home.as_str()), (4242, 0, "/"));
        let named = lookup_user(&layers, "www:wheel").unwrap();
        assert_eq!(
            (named.uid, named.gid, named.additional_gids),
            (1000, 10, vec![])
        );
        assert_eq!(lookup_user(&layers, "5:7").unwrap().gid, 7);
        assert!(lookup_user(&layers, "nobody").is_err());
        assert!(lookup_user(&layers, "www:nogroup").is_err());
    }

    #[test]
    fn upper_layers_win_and_whiteouts_hide() {
        let tmp = tempfile::tempdir().unwrap();
        let base = layer(tmp.path(), "base", &[("etc/passwd", PASSWD)]);
        let top = layer(
            tmp.path(),
            "top",
            &[("etc/passwd", "app:x:77:77::/:/bin/sh\n")],
        );
        let layers = vec![base.clone(), top.clone()];
        assert_eq!(lookup_user(&layers, "app").unwrap().uid, 77);
        assert!(lookup_user(&layers, "www").is_err());

        fs::remove_file(top.join("etc/passwd")).unwrap();
        mknod(
            &top.join("etc/passwd"),
            SFlag::S_IFCHR,
            Mode::empty(),
            makedev(0, 0),
        )
        .unwrap();
        assert!(read_image_file(&layers, "/etc/passwd").is_none());

        // An opaque /etc in the top layer hides the base's files.
        let opaque = layer(tmp.path(), "opaque", &[("etc/hostname", "x")]);
        xattr::set(opaque.join("etc"), OPAQUE_XATTR, b"y").unwrap();
        assert!(read_image_file(&[base.clone(), opaque], "/etc/passwd").is_none());
        assert!(read_image_file(&[base], "/etc/passwd").is_some());
    }

    #[test]
    fn symlinks_resolve_inside_the_image() {
        let tmp = tempfile::tempdir().unwrap();
        let base = layer(tmp.path(), "base", &[("usr/etc/passwd", PASSWD)]);
        fs::create_dir_all(base.join("etc")).unwrap();
        // Absolute target: the image's /usr/etc, never the host's.
        std::os::unix::fs::symlink("/usr/etc/passwd", base.join("etc/passwd")).unwrap();
        assert_eq!(lookup_user(&[base], "www").unwrap().uid, 1000);
    }
}
