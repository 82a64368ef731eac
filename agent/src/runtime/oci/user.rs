//! Resolves a Docker `USER` (`name`, `uid`, `name:group`, `uid:gid`) through
//! the image's own `/etc/passwd` and `/etc/group`: uids differ per image, so
//! the host's databases are never consulted.

use std::fs;
use std::path::Path;

/// The ids a container process runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedUser {
    pub uid: u32,
    pub gid: u32,
    /// Groups listing the user in `/etc/group`, besides `gid`.
    pub additional_gids: Vec<u32>,
    /// Home directory from `/etc/passwd` (for `HOME`), `/` if unknown.
    pub home: String,
}

#[derive(Debug, Clone)]
struct PasswdEntry {
    name: String,
    uid: u32,
    gid: u32,
    home: String,
}

#[derive(Debug, Clone)]
struct GroupEntry {
    name: String,
    gid: u32,
    members: Vec<String>,
}

fn parse_passwd(text: &str) -> Vec<PasswdEntry> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            Some(PasswdEntry {
                name: f.first()?.to_string(),
                uid: f.get(2)?.parse().ok()?,
                gid: f.get(3)?.parse().ok()?,
                home: f.get(5).unwrap_or(&"/").to_string(),
            })
        })
        .collect()
}

fn parse_group(text: &str) -> Vec<GroupEntry> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            Some(GroupEntry {
                name: f.first()?.to_string(),
                gid: f.get(2)?.parse().ok()?,
                members: f
                    .get(3)
                    .map(|m| {
                        m.split(',')
                            .filter(|s| !s.is_empty())
                            .map(str::to_string)
                            .collect()
                    })
                    .unwrap_or_default(),
            })
        })
        .collect()
}

/// Reads `etc/<name>` of the rootfs, refusing a symlink: an image's absolute
/// link would otherwise resolve on the host.
fn read_image_file(rootfs: &Path, name: &str) -> String {
    let path = rootfs.join("etc").join(name);
    match fs::symlink_metadata(&path) {
        Ok(meta) if meta.is_file() => fs::read_to_string(&path).unwrap_or_default(),
        _ => String::new(),
    }
}

/// Resolves `user` in the image at `rootfs`.
pub fn resolve(rootfs: &Path, user: &str) -> Result<ResolvedUser, String> {
    resolve_in(
        &read_image_file(rootfs, "passwd"),
        &read_image_file(rootfs, "group"),
        user,
    )
}

/// Resolves `user` against the texts of `/etc/passwd` and `/etc/group`.
/// Empty means root. Numeric ids need no entry (as in Docker).
pub fn resolve_in(passwd: &str, group: &str, user: &str) -> Result<ResolvedUser, String> {
    let users = parse_passwd(passwd);
    let groups = parse_group(group);
    let (user_part, group_part) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let user_part = if user_part.is_empty() { "0" } else { user_part };
    let entry = match user_part.parse::<u32>() {
        Ok(uid) => users
            .iter()
            .find(|e| e.uid == uid)
            .cloned()
            .or(Some(PasswdEntry {
                name: String::new(),
                uid,
                gid: 0,
                home: "/".into(),
            })),
        Err(_) => users.iter().find(|e| e.name == user_part).cloned(),
    }
    .ok_or_else(|| format!("user \"{user_part}\" not found in the image's /etc/passwd"))?;
    let gid = match group_part {
        None => entry.gid,
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => groups
                .iter()
                .find(|e| e.name == g)
                .map(|e| e.gid)
                .ok_or_else(|| format!("group \"{g}\" not found in the image's /etc/group"))?,
        },
    };
    let mut additional_gids: Vec<u32> = if group_part.is_some() || entry.name.is_empty() {
        Vec::new()
    } else {
        groups
            .iter()
            .filter(|g| g.members.contains(&entry.name) && g.gid != gid)
            .map(|g| g.gid)
            .collect()
    };
    additional_gids.sort_unstable();
    additional_gids.dedup();
    Ok(ResolvedUser {
        uid: entry.uid,
        gid,
        additional_gids,
        home: entry.home,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\nnginx:x:101:101:nginx:/var/cache/nginx:/sbin/nologin\npostgres:x:999:999::/var/lib/postgresql:/bin/bash\n";
    const GROUP: &str = "root:x:0:\nnginx:x:101:\npostgres:x:999:\nssl-cert:x:110:postgres\ntty:x:5:postgres,nginx\n";

    #[test]
    fn names_resolve_through_the_images_own_databases() {
        let u = resolve_in(PASSWD, GROUP, "postgres").unwrap();
        assert_eq!((u.uid, u.gid), (999, 999));
        assert_eq!(u.additional_gids, [5, 110]);
        assert_eq!(u.home, "/var/lib/postgresql");
        let u = resolve_in(PASSWD, GROUP, "nginx:tty").unwrap();
        assert_eq!((u.uid, u.gid), (101, 5));
        assert!(u.additional_gids.is_empty());
    }

    #[test]
    fn numeric_ids_need_no_entry_and_empty_is_root() {
        let u = resolve_in(PASSWD, GROUP, "1234:4321").unwrap();
        assert_eq!((u.uid, u.gid), (1234, 4321));
        let u = resolve_in(PASSWD, GROUP, "101").unwrap();
        assert_eq!(
            (u.uid, u.gid),
            (101, 101),
            "uid with an entry takes its group"
        );
        let u = resolve_in("", "", "").unwrap();
        assert_eq!((u.uid, u.gid), (0, 0));
    }

    #[test]
    fn unknown_names_are_errors_naming_the_file() {
        let err = resolve_in(PASSWD, GROUP, "www-data").unwrap_err();
        assert!(
            err.contains("www-data") && err.contains("/etc/passwd"),
            "{err}"
        );
        let err = resolve_in(PASSWD, GROUP, "nginx:nogroup").unwrap_err();
        assert!(err.contains("/etc/group"), "{err}");
    }

    #[test]
    fn a_symlinked_passwd_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("etc")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("etc/passwd")).unwrap();
        assert!(
            resolve(dir.path(), "0").is_ok(),
            "numeric root needs no entry"
        );
        assert!(
            resolve(dir.path(), "daemon").is_err(),
            "host passwd not read"
        );
    }
}
