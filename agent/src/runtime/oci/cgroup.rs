//! Removal of a container's cgroup directories. runc removes the leaf
//! directories it made on `delete` most of the time but leaves parents (and,
//! on hybrid v1+v2 hosts, sometimes a hierarchy's leaf) behind; the agent
//! removes its own in every mounted hierarchy.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Every cgroup (v1 and v2) mount point of this host.
pub fn hierarchies() -> Vec<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut roots: Vec<PathBuf> = info
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let fstype = right.split(' ').next()?;
            let mount_point = left.split(' ').nth(4)?;
            matches!(fstype, "cgroup" | "cgroup2").then(|| PathBuf::from(mount_point))
        })
        .collect();
    roots.sort();
    roots.dedup();
    roots
}

/// The directories of `cgroups_path` (absolute, like `/skiff/<id>`) that
/// exist in any hierarchy.
pub fn existing(cgroups_path: &Path) -> Vec<PathBuf> {
    let relative = cgroups_path.strip_prefix("/").unwrap_or(cgroups_path);
    hierarchies()
        .into_iter()
        .map(|root| root.join(relative))
        .filter(|p| p.is_dir())
        .collect()
}

/// Removes `cgroups_path` in every hierarchy, retrying briefly while the
/// kernel still counts exiting tasks. Returns the directories left.
pub fn remove(cgroups_path: &Path) -> Vec<PathBuf> {
    let mut left = existing(cgroups_path);
    for _ in 0..20 {
        left.retain(|dir| remove_tree(dir).is_err());
        if left.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    left
}

/// rmdir children first: cgroup directories can only be removed bottom-up
/// and never with their (virtual) files.
fn remove_tree(dir: &Path) -> std::io::Result<()> {
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&entry.path())?;
            }
        }
    }
    match fs::remove_dir(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hierarchies_are_found() {
        // Every Linux test machine mounts at least one hierarchy.
        assert!(!hierarchies().is_empty());
        assert!(existing(Path::new("/skiff-test-does-not-exist/x")).is_empty());
    }
}
