//! Secret values on the node: held in the agent's memory as the control
//! plane last sent them (`Assignments.secrets`: only the secret versions
//! the node's replicas reference, several of one secret while a rollback
//! runs an earlier one beside the current), and written only into one
//! tmpfs per replica
//! at `ROOT/<alloc id>` (ROOT is `/run/skiff/<node>/secrets` by default,
//! outside the data dir), which a container sees at `/run/secrets` and a
//! process replica finds in `$SKIFF_SECRETS_DIR`. Nothing here touches a
//! disk: the allocation records keep the references (names, targets,
//! modes), never a value, and no value is ever logged.
//!
//! A file is written to a temporary name and renamed over its target, so
//! a replica that signals on change (`on-change=signal:SIG`) never reads
//! half a value.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use skiff_spec::{OnChange, SecretRef};

/// The environment variable naming a process replica's secrets directory
/// (a path, never a value).
pub const DIR_ENV: &str = "SKIFF_SECRETS_DIR";

#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    #[error("secret {0} has not been received from the control plane")]
    Missing(String),
    #[error("version {version} of secret {name} has not been received from the control plane")]
    MissingVersion { name: String, version: u64 },
    #[error("failed to prepare the secrets tmpfs {path}: {reason}")]
    Mount { path: PathBuf, reason: String },
    #[error("failed to write secret file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// One value as received.
#[derive(Clone)]
struct Value {
    bytes: Vec<u8>,
}

/// The node's secret values (by name, then version) and the replicas'
/// tmpfs directories.
pub struct Secrets {
    root: PathBuf,
    values: Mutex<BTreeMap<String, BTreeMap<u64, Value>>>,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secrets").field("root", &self.root).finish()
    }
}

impl Secrets {
    pub fn new(root: PathBuf) -> Self {
        Secrets {
            root,
            values: Mutex::default(),
        }
    }

    /// The directory (a tmpfs while the replica exists) of `alloc_id`.
    pub fn dir(&self, alloc_id: &str) -> PathBuf {
        self.root.join(alloc_id)
    }

    /// Replaces the values with those of the latest assignments; returns
    /// the names whose latest version changed (not those new to the node).
    pub fn set_values(&self, received: Vec<skiff_proto::v1::SecretValue>) -> Vec<String> {
        let mut values = self.values.lock().unwrap_or_else(|p| p.into_inner());
        let mut next: BTreeMap<String, BTreeMap<u64, Value>> = BTreeMap::new();
        for secret in received {
            next.entry(secret.name).or_default().insert(
                secret.version,
                Value {
                    bytes: secret.value,
                },
            );
        }
        let latest = |versions: &BTreeMap<u64, Value>| versions.keys().next_back().copied();
        let changed = next
            .iter()
            .filter(|(name, versions)| {
                values
                    .get(*name)
                    .is_some_and(|old| latest(old) != latest(versions))
            })
            .map(|(name, _)| name.clone())
            .collect();
        *values = next;
        changed
    }

    /// The latest version received of `name`.
    fn value(&self, name: &str) -> Option<Value> {
        self.value_of(name, 0)
    }

    /// Version `version` of `name` (0: the latest received).
    fn value_of(&self, name: &str, version: u64) -> Option<Value> {
        let values = self.values.lock().unwrap_or_else(|p| p.into_inner());
        let versions = values.get(name)?;
        match version {
            0 => versions.values().next_back().cloned(),
            v => versions.get(&v).cloned(),
        }
    }

    /// Mounts the replica's tmpfs (unless mounted) and writes every file of
    /// `refs`, owned by `owner` with each reference's mode.
    pub fn populate(
        &self,
        alloc_id: &str,
        refs: &[SecretRef],
        owner: (u32, u32),
    ) -> Result<PathBuf, SecretsError> {
        let values: Vec<(&SecretRef, Value)> = refs
            .iter()
            .map(|r| match self.value_of(&r.name, r.version) {
                Some(v) => Ok((r, v)),
                None if r.version != 0 && self.value(&r.name).is_some() => {
                    Err(SecretsError::MissingVersion {
                        name: r.name.clone(),
                        version: r.version,
                    })
                }
                None => Err(SecretsError::Missing(r.name.clone())),
            })
            .collect::<Result<_, _>>()?;
        let dir = self.dir(alloc_id);
        self.mount(&dir, refs.len())?;
        for (reference, value) in values {
            write_file(&dir, reference, &value.bytes, owner)?;
        }
        Ok(dir)
    }

    /// For a running replica: rewrites the files of its references that
    /// signal on change whose content differs from the current value, and
    /// returns the signals to send it (one per rewritten file, deduped).
    /// References that restart are left alone: their service rolls out.
    pub fn refresh(&self, alloc_id: &str, refs: &[SecretRef]) -> Vec<String> {
        let dir = self.dir(alloc_id);
        let mut signals = Vec::new();
        for reference in refs {
            let OnChange::Signal(signal) = &reference.on_change else {
                continue;
            };
            let Some(value) = self.value(&reference.name) else {
                continue;
            };
            let path = dir.join(reference.file_name());
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            if std::fs::read(&path).is_ok_and(|current| current == value.bytes) {
                continue;
            }
            use std::os::unix::fs::MetadataExt;
            match write_file(&dir, reference, &value.bytes, (meta.uid(), meta.gid())) {
                Ok(()) => {
                    if !signals.contains(signal) {
                        signals.push(signal.clone());
                    }
                }
                Err(err) => {
                    tracing::warn!(alloc = alloc_id, secret = %reference.name, error = %err, "secret file not replaced")
                }
            }
        }
        signals
    }

    /// Unmounts and removes the replica's directory. Idempotent.
    pub fn remove(&self, alloc_id: &str) {
        let dir = self.dir(alloc_id);
        if !dir.exists() {
            return;
        }
        if is_mount_point(&dir) {
            if let Err(e) = umount2(&dir, MntFlags::MNT_DETACH) {
                tracing::warn!(alloc = alloc_id, error = %e, "failed to unmount secrets tmpfs");
            }
        }
        let _ = std::fs::remove_dir(&dir);
    }

    /// A size-limited tmpfs at `dir`, root's, mode 0755 (the files in it
    /// are each the replica user's, with their own mode).
    fn mount(&self, dir: &Path, files: usize) -> Result<(), SecretsError> {
        let failed = |reason: String| SecretsError::Mount {
            path: dir.to_path_buf(),
            reason,
        };
        std::fs::create_dir_all(&self.root).map_err(|e| failed(e.to_string()))?;
        let _ = std::fs::set_permissions(&self.root, std::fs::Permissions::from_mode(0o700));
        std::fs::create_dir_all(dir).map_err(|e| failed(e.to_string()))?;
        if is_mount_point(dir) {
            return Ok(());
        }
        // Room for every file twice over (a replacement is written beside
        // the file it replaces).
        let size = (files + 1) * skiff_spec::MAX_SECRET_BYTES * 2;
        let options = format!("size={size},mode=0755");
        mount(
            Some("tmpfs"),
            dir,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            Some(options.as_str()),
        )
        .map_err(|e| failed(e.to_string()))
    }
}

/// Writes `value` to `dir/<target>` through a temporary file and a rename.
fn write_file(
    dir: &Path,
    reference: &SecretRef,
    value: &[u8],
    owner: (u32, u32),
) -> Result<(), SecretsError> {
    let path = dir.join(reference.file_name());
    let temp = dir.join(format!(".{}.new", reference.file_name()));
    let failed = |source| SecretsError::Write {
        path: path.clone(),
        source,
    };
    let _ = std::fs::remove_file(&temp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temp)
        .map_err(failed)?;
    file.write_all(value).map_err(failed)?;
    drop(file);
    std::os::unix::fs::chown(&temp, Some(owner.0), Some(owner.1)).map_err(failed)?;
    std::fs::set_permissions(
        &temp,
        std::fs::Permissions::from_mode(reference.file_mode()),
    )
    .map_err(failed)?;
    std::fs::rename(&temp, &path).map_err(failed)
}

/// Whether `dir` is a mount point (its device differs from its parent's).
fn is_mount_point(dir: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(dir), dir.parent().map(std::fs::metadata)) {
        (Ok(d), Some(Ok(p))) => d.dev() != p.dev(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(name: &str, version: u64, bytes: &[u8]) -> skiff_proto::v1::SecretValue {
        skiff_proto::v1::SecretValue {
            name: name.into(),
            version,
            value: bytes.to_vec(),
        }
    }

    #[test]
    fn a_new_version_is_reported_and_a_new_secret_is_not() {
        let secrets = Secrets::new(PathBuf::from("/nonexistent"));
        assert!(secrets.set_values(vec![value("a", 1, b"x")]).is_empty());
        let changed = secrets.set_values(vec![value("a", 2, b"y"), value("b", 1, b"z")]);
        assert_eq!(changed, vec!["a".to_string()]);
        assert!(secrets.value("a").is_some_and(|v| v.bytes == b"y"));
        secrets.set_values(vec![]);
        assert!(secrets.value("a").is_none());
    }

    #[test]
    fn a_replica_gets_the_version_it_pins_beside_a_newer_one() {
        let dir = tempfile::tempdir().unwrap();
        let secrets = Secrets::new(dir.path().to_path_buf());
        // A rollback runs version 1 while others still run version 2.
        let changed = secrets.set_values(vec![value("pw", 2, b"two"), value("pw", 1, b"one")]);
        assert!(changed.is_empty());
        assert!(secrets.value_of("pw", 1).is_some_and(|v| v.bytes == b"one"));
        assert!(secrets.value_of("pw", 0).is_some_and(|v| v.bytes == b"two"));
        assert!(secrets.value("pw").is_some_and(|v| v.bytes == b"two"));
        // Only the older version is sent again: the latest went down, so
        // replicas that signal follow it.
        assert_eq!(secrets.set_values(vec![value("pw", 1, b"one")]), ["pw"]);
        let pinned = SecretRef {
            version: 3,
            ..SecretRef::parse("pw").unwrap()
        };
        let err = secrets.populate("a1", &[pinned], (0, 0)).unwrap_err();
        assert!(err.to_string().contains("version 3 of secret pw"), "{err}");
    }

    #[test]
    fn files_are_replaced_whole_with_their_mode_and_only_when_they_signal() {
        let dir = tempfile::tempdir().unwrap();
        let secrets = Secrets::new(dir.path().to_path_buf());
        let alloc_dir = secrets.dir("a1");
        std::fs::create_dir_all(&alloc_dir).unwrap();
        let me = (
            nix::unistd::getuid().as_raw(),
            nix::unistd::getgid().as_raw(),
        );
        let signalled = SecretRef::parse("pw,on-change=signal:SIGHUP").unwrap();
        let restarted = SecretRef::parse("key:k").unwrap();
        write_file(&alloc_dir, &signalled, b"one", me).unwrap();
        write_file(&alloc_dir, &restarted, b"one", me).unwrap();
        let mode = std::fs::metadata(alloc_dir.join("pw"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o400);
        secrets.set_values(vec![value("pw", 2, b"two"), value("key", 2, b"two")]);
        let refs = [signalled, restarted];
        assert_eq!(secrets.refresh("a1", &refs), vec!["SIGHUP".to_string()]);
        assert_eq!(std::fs::read(alloc_dir.join("pw")).unwrap(), b"two");
        assert_eq!(std::fs::read(alloc_dir.join("k")).unwrap(), b"one");
        assert!(secrets.refresh("a1", &refs).is_empty());
        let names: Vec<_> = std::fs::read_dir(&alloc_dir).unwrap().collect();
        assert_eq!(names.len(), 2, "no temporary file is left behind");
    }
}
