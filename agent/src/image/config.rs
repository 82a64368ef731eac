//! The image configuration (the config blob a manifest points at): what the
//! runtime needs to start a container from the image — entrypoint, cmd, env,
//! user, working dir, exposed ports, stop signal, the Docker `Healthcheck`,
//! labels — and the layers' uncompressed digests (`rootfs.diff_ids`).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The parts of an image's config that decide how its containers run.
/// Empty strings and vectors mean "not set by the image".
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    /// `KEY=VALUE` entries, in the image's order.
    pub env: Vec<String>,
    /// `name`, `uid`, `name:group`, `uid:gid`...; empty means root.
    pub user: String,
    pub working_dir: String,
    /// `PORT/PROTO` keys of `ExposedPorts`, sorted (e.g. `80/tcp`).
    pub exposed_ports: Vec<String>,
    /// The image's `StopSignal` (e.g. `SIGINT`, `SIGQUIT`, `15`), if any.
    pub stop_signal: Option<String>,
    /// The Docker `Healthcheck`; `None` when absent or disabled (`["NONE"]`).
    pub healthcheck: Option<Healthcheck>,
    pub labels: BTreeMap<String, String>,
    /// Paths of the image's `Volumes`, sorted: anonymous volumes of each
    /// container.
    #[serde(default)]
    pub volumes: Vec<String>,
}

/// Docker's `Healthcheck`. `test` keeps Docker's form: `["CMD", args...]`
/// or `["CMD-SHELL", "command line"]`. Zero durations and retries mean
/// "inherit the default", so they are `None`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Healthcheck {
    pub test: Vec<String>,
    pub interval: Option<Duration>,
    pub timeout: Option<Duration>,
    pub start_period: Option<Duration>,
    pub retries: Option<u32>,
}

impl ImageConfig {
    /// The command Docker would run with no overrides: entrypoint followed by
    /// cmd.
    pub fn command(&self) -> Vec<String> {
        self.entrypoint
            .iter()
            .chain(self.cmd.iter())
            .cloned()
            .collect()
    }
}

/// The config blob as parsed: the runtime config plus the layers' diff ids.
#[derive(Debug, Clone)]
pub struct ParsedConfig {
    pub config: ImageConfig,
    pub diff_ids: Vec<String>,
    pub os: String,
    pub architecture: String,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawFile {
    os: String,
    architecture: String,
    config: Option<RawConfig>,
    rootfs: Option<RawRootfs>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawRootfs {
    diff_ids: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "PascalCase")]
struct RawConfig {
    entrypoint: Option<Vec<String>>,
    cmd: Option<Vec<String>>,
    env: Option<Vec<String>>,
    user: Option<String>,
    working_dir: Option<String>,
    exposed_ports: Option<BTreeMap<String, serde_json::Value>>,
    stop_signal: Option<String>,
    healthcheck: Option<RawHealthcheck>,
    labels: Option<BTreeMap<String, String>>,
    volumes: Option<BTreeMap<String, serde_json::Value>>,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "PascalCase")]
struct RawHealthcheck {
    test: Option<Vec<String>>,
    interval: Option<u64>,
    timeout: Option<u64>,
    start_period: Option<u64>,
    retries: Option<u32>,
}

fn nanos(value: Option<u64>) -> Option<Duration> {
    value.filter(|n| *n > 0).map(Duration::from_nanos)
}

pub fn parse_config(bytes: &[u8]) -> Result<ParsedConfig, String> {
    let raw: RawFile = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    let c = raw.config.unwrap_or_default();
    let healthcheck = c.healthcheck.and_then(|h| {
        let test = h.test.unwrap_or_default();
        if test.is_empty() || test[0] == "NONE" {
            return None;
        }
        Some(Healthcheck {
            test,
            interval: nanos(h.interval),
            timeout: nanos(h.timeout),
            start_period: nanos(h.start_period),
            retries: h.retries.filter(|r| *r > 0),
        })
    });
    Ok(ParsedConfig {
        config: ImageConfig {
            entrypoint: c.entrypoint.unwrap_or_default(),
            cmd: c.cmd.unwrap_or_default(),
            env: c.env.unwrap_or_default(),
            user: c.user.unwrap_or_default(),
            working_dir: c.working_dir.unwrap_or_default(),
            exposed_ports: c.exposed_ports.unwrap_or_default().into_keys().collect(),
            stop_signal: c.stop_signal.filter(|s| !s.is_empty()),
            healthcheck,
            labels: c.labels.unwrap_or_default(),
            volumes: c.volumes.unwrap_or_default().into_keys().collect(),
        },
        diff_ids: raw.rootfs.unwrap_or_default().diff_ids,
        os: raw.os,
        architecture: raw.architecture,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_config_with_healthcheck_parses() {
        let json = br#"{
            "architecture": "amd64", "os": "linux",
            "config": {
                "User": "www", "Env": ["PATH=/bin"], "Entrypoint": ["/bin/serve"], "Cmd": null,
                "WorkingDir": "/www", "ExposedPorts": {"80/tcp": {}, "443/tcp": {}},
                "StopSignal": "SIGINT", "Labels": {"a": "b"},
                "Healthcheck": {"Test": ["CMD", "/bin/false"], "Interval": 1000000000, "Retries": 2}
            },
            "rootfs": {"type": "layers", "diff_ids": ["sha256:aa"]}
        }"#;
        let parsed = parse_config(json).unwrap();
        let c = parsed.config;
        assert_eq!(c.entrypoint, ["/bin/serve"]);
        assert!(c.cmd.is_empty());
        assert_eq!(c.user, "www");
        assert_eq!(c.exposed_ports, ["443/tcp", "80/tcp"]);
        assert_eq!(c.stop_signal.as_deref(), Some("SIGINT"));
        let h = c.healthcheck.unwrap();
        assert_eq!(h.test, ["CMD", "/bin/false"]);
        assert_eq!(h.interval, Some(Duration::from_secs(1)));
        assert_eq!(h.timeout, None);
        assert_eq!(h.retries, Some(2));
        assert_eq!(parsed.diff_ids, ["sha256:aa"]);
    }

    #[test]
    fn healthcheck_none_disables_it() {
        let json = br#"{"config": {"Healthcheck": {"Test": ["NONE"]}}}"#;
        assert!(parse_config(json).unwrap().config.healthcheck.is_none());
    }
}
