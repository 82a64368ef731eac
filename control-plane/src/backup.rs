//! Backups of a whole cluster (`skiff cluster snapshot save FILE`) and the
//! new cluster made from one (`skiff server --bootstrap --restore FILE`).
//!
//! A snapshot file is `MAGIC`, a [`pb::ClusterBackup`] (the state machine's
//! image at a Raft index, the CA, and the secrets key unless redacted) and
//! the SHA-256 of everything before it: a damaged or cut file is refused
//! before anything is restored from it. Nothing here does I/O but
//! [`read_file`] and [`write_file`].

use std::io::Write as _;
use std::path::Path;

use prost::Message as _;
use sha2::{Digest as _, Sha256};
use skiff_proto::v1 as pb;

use crate::secrets::SecretKey;
use crate::state::State;

/// What every snapshot file starts with.
pub const MAGIC: &[u8] = b"SKIFF-SNAPSHOT\n";
/// The layout this version writes and reads.
pub const FORMAT: u32 = 1;
const CHECKSUM: usize = 32;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BackupError {
    #[error("{0} is not a Skiff snapshot file (it does not start with SKIFF-SNAPSHOT); give the FILE `skiff cluster snapshot save` wrote")]
    NotASnapshot(String),
    #[error("{0} is damaged or cut short: its SHA-256 does not match the one it ends with; use another copy")]
    Checksum(String),
    #[error("{file} cannot be read: {why}")]
    Undecodable { file: String, why: String },
    #[error("{file} has format {found}, newer than this skiff reads ({FORMAT}); restore it with the skiff version that wrote it ({version})")]
    NewerFormat {
        file: String,
        found: u32,
        version: String,
    },
    #[error("failed to read {file}: {why}")]
    Read { file: String, why: String },
    #[error("failed to write {file}: {why}")]
    Write { file: String, why: String },
}

/// The backup of `state` (at its applied index), with the CA and, unless
/// `redact`, the CA key and the secrets key.
pub fn of_state(
    state: &State,
    ca: &skiff_pki::ClusterCa,
    secrets_key: Option<&SecretKey>,
    redact: bool,
    created_ms: u64,
) -> pb::ClusterBackup {
    pb::ClusterBackup {
        format: FORMAT,
        created_ms,
        applied_index: state.applied_index,
        skiff_version: env!("CARGO_PKG_VERSION").to_string(),
        state_image: state.to_image(),
        secrets_key: match (redact, secrets_key) {
            (false, Some(key)) => key.to_bytes(),
            _ => Vec::new(),
        },
        ca_cert_pem: ca.cert_pem().to_string(),
        ca_key_pem: if redact { String::new() } else { ca.key_pem() },
        redacted: redact,
    }
}

/// The bytes of a snapshot file holding `backup`.
pub fn encode(backup: &pb::ClusterBackup) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(MAGIC.len() + backup.encoded_len() + CHECKSUM);
    bytes.extend_from_slice(MAGIC);
    backup
        .encode(&mut bytes)
        .expect("a Vec grows to any length");
    let checksum = Sha256::digest(&bytes);
    bytes.extend_from_slice(&checksum);
    bytes
}

/// The backup in the bytes of a snapshot file named `file` (for errors).
pub fn decode(file: &str, bytes: &[u8]) -> Result<pb::ClusterBackup, BackupError> {
    if !bytes.starts_with(MAGIC) {
        return Err(BackupError::NotASnapshot(file.to_string()));
    }
    let Some(end) = bytes
        .len()
        .checked_sub(CHECKSUM)
        .filter(|e| *e >= MAGIC.len())
    else {
        return Err(BackupError::Checksum(file.to_string()));
    };
    if Sha256::digest(&bytes[..end]).as_slice() != &bytes[end..] {
        return Err(BackupError::Checksum(file.to_string()));
    }
    let backup = pb::ClusterBackup::decode(&bytes[MAGIC.len()..end]).map_err(|e| {
        BackupError::Undecodable {
            file: file.to_string(),
            why: e.to_string(),
        }
    })?;
    if backup.format > FORMAT {
        return Err(BackupError::NewerFormat {
            file: file.to_string(),
            found: backup.format,
            version: backup.skiff_version.clone(),
        });
    }
    Ok(backup)
}

pub fn read_file(path: &Path) -> Result<pb::ClusterBackup, BackupError> {
    let file = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| BackupError::Read {
        file: file.clone(),
        why: e.to_string(),
    })?;
    decode(&file, &bytes)
}

/// Writes `bytes` to `path` as a new file readable by its owner only
/// (a backup may hold the CA key and the secrets key): a temporary file,
/// fsynced, then renamed into place.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<(), BackupError> {
    use std::os::unix::fs::OpenOptionsExt;
    let failed = |e: std::io::Error| BackupError::Write {
        file: path.display().to_string(),
        why: e.to_string(),
    };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".partial");
    let tmp = std::path::PathBuf::from(tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(failed)?;
    file.write_all(bytes).map_err(failed)?;
    file.sync_all().map_err(failed)?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(failed)?;
    Ok(())
}

/// What a new cluster starts from, decoded from a backup.
pub struct Restored {
    pub state: State,
    pub secrets_key: Option<SecretKey>,
    /// The CA to keep: agents of the old cluster then trust the new one.
    pub ca: Option<skiff_pki::ClusterCa>,
    /// Secrets left out because the backup has no key to open them.
    pub dropped_secrets: Vec<String>,
}

/// Decodes `backup` into what [`crate::consensus::bootstrap_from`] takes.
pub fn restored(file: &str, backup: &pb::ClusterBackup) -> Result<Restored, BackupError> {
    let undecodable = |why: String| BackupError::Undecodable {
        file: file.to_string(),
        why,
    };
    let mut state =
        State::from_image(&backup.state_image).map_err(|e| undecodable(e.to_string()))?;
    state.applied_index = backup.applied_index;
    let secrets_key = if backup.secrets_key.is_empty() {
        None
    } else {
        Some(
            SecretKey::from_bytes(&backup.secrets_key)
                .ok_or_else(|| undecodable("its secrets key has the wrong length".into()))?,
        )
    };
    let ca = if backup.ca_key_pem.is_empty() {
        None
    } else {
        Some(
            skiff_pki::ClusterCa::from_pem(&backup.ca_cert_pem, &backup.ca_key_pem)
                .map_err(|e| undecodable(format!("its CA: {e}")))?,
        )
    };
    // Sealed values without their key would fail every replica that uses
    // them with a decryption error; listing them as gone is clearer.
    let dropped_secrets = if secrets_key.is_none() {
        let names = state.secrets.keys().cloned().collect();
        state.secrets.clear();
        names
    } else {
        Vec::new()
    };
    Ok(Restored {
        state,
        secrets_key,
        ca,
        dropped_secrets,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backup() -> pb::ClusterBackup {
        let mut state = State::default();
        state.variables.insert("k".into(), "v".into());
        state.applied_index = 42;
        let ca = skiff_pki::ClusterCa::create().unwrap();
        let key = SecretKey::generate();
        of_state(&state, &ca, Some(&key), false, 7)
    }

    #[test]
    fn a_saved_backup_decodes_to_the_same_state_key_and_ca() {
        let original = backup();
        let bytes = encode(&original);
        let decoded = decode("f", &bytes).unwrap();
        assert_eq!(decoded, original);
        let restored = restored("f", &decoded).unwrap();
        assert_eq!(restored.state.applied_index, 42);
        assert_eq!(
            restored.state.variables.get("k").map(String::as_str),
            Some("v")
        );
        assert!(restored.secrets_key.is_some());
        assert!(restored.ca.is_some());
    }

    #[test]
    fn any_flipped_or_missing_byte_is_refused_by_the_checksum() {
        let bytes = encode(&backup());
        for at in [MAGIC.len(), bytes.len() / 2, bytes.len() - 1] {
            let mut damaged = bytes.clone();
            damaged[at] ^= 0x01;
            assert_eq!(
                decode("f", &damaged),
                Err(BackupError::Checksum("f".into()))
            );
        }
        assert_eq!(
            decode("f", &bytes[..bytes.len() - 1]),
            Err(BackupError::Checksum("f".into()))
        );
        assert_eq!(decode("f", MAGIC), Err(BackupError::Checksum("f".into())));
        assert_eq!(
            decode("f", b"{\"not\": \"a snapshot\"}"),
            Err(BackupError::NotASnapshot("f".into()))
        );
    }

    #[test]
    fn a_newer_format_is_refused_naming_the_version_that_wrote_it() {
        let mut newer = backup();
        newer.format = FORMAT + 1;
        newer.skiff_version = "9.9.9".into();
        let err = decode("f", &encode(&newer)).unwrap_err();
        assert!(err.to_string().contains("9.9.9"), "{err}");
    }

    #[test]
    fn a_redacted_backup_holds_no_key_and_restores_without_secrets() {
        let mut state = State::default();
        state.secrets.insert(
            "db".into(),
            crate::state::Secret {
                name: "db".into(),
                version: 1,
                sealed: "c2VhbGVk".into(),
                size_bytes: 6,
                created_ms: 0,
                updated_ms: 0,
                create_index: 1,
                modify_index: 1,
                previous: Vec::new(),
            },
        );
        let ca = skiff_pki::ClusterCa::create().unwrap();
        let key = SecretKey::generate();
        let backup = of_state(&state, &ca, Some(&key), true, 0);
        assert!(backup.secrets_key.is_empty() && backup.ca_key_pem.is_empty());
        assert!(backup.redacted);
        let restored = restored("f", &decode("f", &encode(&backup)).unwrap()).unwrap();
        assert!(restored.ca.is_none() && restored.secrets_key.is_none());
        assert!(restored.state.secrets.is_empty());
        assert_eq!(restored.dropped_secrets, vec!["db".to_string()]);
    }
}
