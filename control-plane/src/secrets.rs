//! The cluster's secrets key and the sealing of secret values with it.
//!
//! What protects what: every server keeps the same 256-bit key in
//! `DATA/secrets.key` (mode 0600, never in the Raft log, a snapshot or an
//! RPC to a client or an agent). The bootstrap server creates it; a server
//! that joins receives it in the answer to its Join call (server-to-server
//! traffic only). A secret's value is sealed with XChaCha20-Poly1305 under
//! that key (a random 192-bit nonce per value, the secret's name as
//! associated data, so a sealed value cannot be moved to another name) by
//! the server that takes the `secret create|update` call, and only the
//! sealed form is proposed. So the Raft log, the snapshots and the state
//! in every server's memory hold ciphertext; whoever reads a server's data
//! dir reads the key beside it, so the data dir's permissions (root only)
//! remain what protects a server's disk, as for Swarm's unlocked managers.
//! A server opens a value only to hand it to an agent whose node runs a
//! replica that uses it (`api::agent_sync`).

use std::io::Write;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand::RngCore;

/// The file under a server's data dir holding the key.
pub const KEY_FILE: &str = "secrets.key";
const KEY_BYTES: usize = 32;
const NONCE_BYTES: usize = 24;

#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    #[error("failed to read secrets key {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("failed to write secrets key {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("secrets key {0} is not {KEY_BYTES} bytes")]
    BadKey(PathBuf),
    #[error("sealed value of secret {0} is corrupt or was sealed with another key")]
    Open(String),
}

/// The cluster's secrets key. Its `Debug` shows nothing of the key.
#[derive(Clone)]
pub struct SecretKey {
    bytes: [u8; KEY_BYTES],
}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey(..)")
    }
}

impl SecretKey {
    /// A new random key.
    pub fn generate() -> Self {
        let mut bytes = [0u8; KEY_BYTES];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        SecretKey { bytes }
    }

    /// The key as sent to a joining server.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.bytes.to_vec()
    }

    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        Some(SecretKey {
            bytes: bytes.try_into().ok()?,
        })
    }

    /// The key in `data_dir`, if the file exists.
    pub fn load(data_dir: &Path) -> Result<Option<Self>, SecretsError> {
        let path = data_dir.join(KEY_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => Self::from_bytes(&bytes)
                .map(Some)
                .ok_or(SecretsError::BadKey(path)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(SecretsError::Read { path, source }),
        }
    }

    /// Writes the key to `data_dir` (mode 0600, created only by this call).
    pub fn store(&self, data_dir: &Path) -> Result<(), SecretsError> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = data_dir.join(KEY_FILE);
        let write = || -> std::io::Result<()> {
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&path)?;
            file.write_all(&self.bytes)?;
            file.sync_all()
        };
        write().map_err(|source| SecretsError::Write {
            path: path.clone(),
            source,
        })
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new((&self.bytes).into())
    }

    /// `value` sealed for the secret `name`: base64 of nonce and ciphertext.
    pub fn seal(&self, name: &str, value: &[u8]) -> String {
        let mut nonce = [0u8; NONCE_BYTES];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let payload = Payload {
            msg: value,
            aad: name.as_bytes(),
        };
        let sealed = self
            .cipher()
            .encrypt(XNonce::from_slice(&nonce), payload)
            .expect("XChaCha20-Poly1305 encrypts any value of bounded size");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        BASE64.encode(out)
    }

    /// The value sealed by [`SecretKey::seal`] for `name`.
    pub fn open(&self, name: &str, sealed: &str) -> Result<Vec<u8>, SecretsError> {
        let bytes = BASE64
            .decode(sealed)
            .map_err(|_| SecretsError::Open(name.to_string()))?;
        if bytes.len() < NONCE_BYTES {
            return Err(SecretsError::Open(name.to_string()));
        }
        let (nonce, ciphertext) = bytes.split_at(NONCE_BYTES);
        let payload = Payload {
            msg: ciphertext,
            aad: name.as_bytes(),
        };
        self.cipher()
            .decrypt(XNonce::from_slice(nonce), payload)
            .map_err(|_| SecretsError::Open(name.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_value_opens_with_its_key_and_name_only() {
        let key = SecretKey::generate();
        let sealed = key.seal("db", b"hunter2");
        assert!(!sealed.contains("hunter2"));
        assert_eq!(key.open("db", &sealed).unwrap(), b"hunter2");
        assert!(key.open("other", &sealed).is_err());
        assert!(SecretKey::generate().open("db", &sealed).is_err());
        assert!(key.open("db", "not base64!").is_err());
        assert!(key.open("db", &BASE64.encode([1u8; 10])).is_err());
    }

    #[test]
    fn sealing_twice_gives_different_ciphertexts() {
        let key = SecretKey::generate();
        assert_ne!(key.seal("db", b"x"), key.seal("db", b"x"));
    }

    #[test]
    fn the_key_file_is_private_and_loads_back() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        assert!(SecretKey::load(dir.path()).unwrap().is_none());
        let key = SecretKey::generate();
        key.store(dir.path()).unwrap();
        let mode = std::fs::metadata(dir.path().join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let loaded = SecretKey::load(dir.path()).unwrap().unwrap();
        assert_eq!(loaded.to_bytes(), key.to_bytes());
        assert_eq!(format!("{loaded:?}"), "SecretKey(..)");
    }
}
