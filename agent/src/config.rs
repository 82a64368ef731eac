//! The agent's configuration, as the CLI builds it.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::Duration;

use crate::error::AgentError;

/// Everything `skiff agent` and `skiff dev` decide about the agent.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Node name, unique in the cluster.
    pub name: String,
    /// Where allocation records and replica logs live (`DATA/allocs/<id>/`).
    pub data_dir: PathBuf,
    /// `host:port` of control-plane servers; tried in turn.
    pub servers: Vec<String>,
    /// Address reported in `Register`; proxies dial replicas at it.
    pub advertise: IpAddr,
    /// Inclusive host port range the scheduler may assign on this node.
    pub port_range: (u16, u16),
    /// How long a replica has between SIGTERM and SIGKILL.
    pub stop_grace: Duration,
    /// `true` for `skiff dev`; `false` for `skiff agent`, whose replicas keep
    /// running across agent restarts and are re-adopted.
    pub stop_replicas_on_shutdown: bool,
    /// OCI runtime: `runc`, `crun` or a path; `None`: runc if installed,
    /// else crun.
    pub oci_runtime: Option<String>,
    /// Registries (`host:port`) pulled from over plain HTTP.
    pub insecure_registries: Vec<String>,
    /// Docker `config.json` with registry credentials; `None`:
    /// `~/.docker/config.json` if it exists.
    pub docker_config: Option<PathBuf>,
    /// Where the CNI plugins are.
    pub cni_plugin_dir: PathBuf,
    /// Static init bind-mounted into containers (`--init`).
    pub init_binary: PathBuf,
}

impl AgentConfig {
    /// A configuration with the defaults: advertise 127.0.0.1, ports
    /// 20000-29999, 5s stop grace, replicas left running on shutdown.
    pub fn new(name: impl Into<String>, data_dir: PathBuf, servers: Vec<String>) -> Self {
        Self {
            name: name.into(),
            data_dir,
            servers,
            advertise: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port_range: (20000, 29999),
            stop_grace: Duration::from_secs(5),
            stop_replicas_on_shutdown: false,
            oci_runtime: None,
            insecure_registries: Vec::new(),
            docker_config: None,
            cni_plugin_dir: PathBuf::from("/usr/lib/cni"),
            init_binary: PathBuf::from("/usr/bin/tini-static"),
        }
    }

    pub(crate) fn validate(&self) -> Result<(), AgentError> {
        if self.name.is_empty() {
            return Err(AgentError::Config("node name is empty".into()));
        }
        if self.servers.is_empty() {
            return Err(AgentError::Config("no control-plane servers given".into()));
        }
        let (start, end) = self.port_range;
        if start == 0 || start > end {
            return Err(AgentError::Config(format!(
                "port range {start}-{end} is empty or starts at 0"
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_uses_documented_defaults() {
        let c = AgentConfig::new("n1", PathBuf::from("/tmp/x"), vec!["127.0.0.1:7000".into()]);
        assert_eq!(c.advertise, IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert_eq!(c.port_range, (20000, 29999));
        assert_eq!(c.stop_grace, Duration::from_secs(5));
        assert!(!c.stop_replicas_on_shutdown);
        assert!(c.validate().is_ok());
    }

    #[test]
    fn validate_rejects_no_servers_and_inverted_port_range() {
        let mut c = AgentConfig::new("n1", PathBuf::from("/tmp/x"), vec![]);
        assert!(c.validate().is_err());
        c.servers.push("127.0.0.1:7000".into());
        c.port_range = (3000, 2000);
        assert!(c.validate().is_err());
    }
}
