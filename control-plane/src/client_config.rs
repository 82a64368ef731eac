//! The client config file (`client.toml`): where the CLI finds a server
//! and the API token to present. `skiff server --bootstrap` and `skiff dev`
//! write one in their data dir with the management token; the CLI reads
//! it (`--client-config`, `SKIFF_CLIENT_CONFIG`, `./.skiff/client.toml`).
//! One struct for both sides, so the file has one shape:
//!
//! ```toml
//! address = "127.0.0.1:7070"
//! token = "skiff_..."
//! ca_cert = "/var/lib/skiff/ca.pem"   # optional
//! ```
//!
//! Unknown keys are ignored, so an older CLI reads a newer file.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The name of the file in a data dir.
pub const CLIENT_CONFIG_FILE: &str = "client.toml";

/// What a client needs to call the API.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientConfig {
    /// A server's API address, `HOST:PORT` (as `--server` takes it).
    #[serde(default)]
    pub address: String,
    /// The API token's secret, sent as `authorization: Bearer TOKEN`.
    #[serde(default)]
    pub token: String,
    /// The CA certificate that signed the servers' certificates (PEM), for
    /// TLS; `None`: plain connections.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_cert: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientConfigError {
    #[error("failed to read client config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid client config {path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("failed to write client config {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl ClientConfig {
    /// The file at `path`.
    pub fn read(path: &Path) -> Result<ClientConfig, ClientConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ClientConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|err| ClientConfigError::Invalid {
            path: path.to_path_buf(),
            message: err.message().to_string(),
        })
    }

    /// The file's text (TOML; strings quoted as JSON quotes them, which
    /// TOML reads alike).
    pub fn to_toml(&self) -> String {
        let quote = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into());
        let mut text = format!(
            "# Written by skiff: the API address and token the CLI uses.\naddress = {}\ntoken = {}\n",
            quote(&self.address),
            quote(&self.token)
        );
        if let Some(ca) = &self.ca_cert {
            text.push_str(&format!("ca_cert = {}\n", quote(&ca.to_string_lossy())));
        }
        text
    }

    /// Writes the file at `path` atomically (a temporary file renamed over
    /// it), readable by its owner only (0600), and makes its directory
    /// private (0700): the file holds a secret.
    pub fn write(&self, path: &Path) -> Result<(), ClientConfigError> {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let failed = |source| ClientConfigError::Write {
            path: path.to_path_buf(),
            source,
        };
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(failed)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(failed)?;
        let temp = dir.join(format!(".{CLIENT_CONFIG_FILE}.{}.tmp", std::process::id()));
        let written = (|| {
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&temp)?;
            file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
            file.write_all(self.to_toml().as_bytes())?;
            file.sync_all()?;
            std::fs::rename(&temp, path)?;
            std::fs::File::open(dir)?.sync_all()
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(&temp);
        }
        written.map_err(failed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_written_config_reads_back_private_and_unknown_keys_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data").join(CLIENT_CONFIG_FILE);
        let config = ClientConfig {
            address: "127.0.0.1:7070".into(),
            token: "skiff_\"q\\".into(),
            ca_cert: Some("/etc/skiff/ca.pem".into()),
        };
        config.write(&path).unwrap();
        assert_eq!(ClientConfig::read(&path).unwrap(), config);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().unwrap()), 0o700);
        std::fs::write(&path, "address = \"a:1\"\ntoken = \"t\"\nnewer = 1\n").unwrap();
        let read = ClientConfig::read(&path).unwrap();
        assert_eq!((read.address.as_str(), read.ca_cert), ("a:1", None));
        std::fs::write(&path, "address = 1\n").unwrap();
        let err = ClientConfig::read(&path).unwrap_err().to_string();
        assert!(err.starts_with("invalid client config"), "{err}");
    }
}
