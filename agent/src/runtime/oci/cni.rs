//! Bridge networking through the standard CNI plugins (bridge, host-local,
//! portmap from Debian's containernetworking-plugins), invoked as binaries
//! the way Nomad and Podman do: one network namespace per container,
//! created with `ip netns add` and handed to runc by path.

use std::collections::BTreeSet;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;

use serde_json::{json, Value};

pub const CNI_VERSION: &str = "1.0.0";
const NETNS_DIR: &str = "/run/netns";

/// The node's container network.
#[derive(Debug, Clone)]
pub struct CniNetwork {
    /// Where the plugin binaries are (`/usr/lib/cni` on Debian).
    pub plugin_dir: PathBuf,
    pub name: String,
    pub bridge: String,
    pub subnet: String,
}

impl Default for CniNetwork {
    fn default() -> Self {
        Self {
            plugin_dir: PathBuf::from("/usr/lib/cni"),
            name: "skiff".into(),
            bridge: "skiff0".into(),
            subnet: "10.89.0.0/16".into(),
        }
    }
}

/// One port published on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortMapping {
    pub host_port: u16,
    pub container_port: u16,
}

impl CniNetwork {
    /// The conflist: a bridge with NAT for outbound traffic (`ipMasq`) and
    /// host-local addresses, then portmap with SNAT so that published ports
    /// answer on the host's loopback addresses too.
    pub fn conflist(&self) -> Value {
        json!({
            "cniVersion": CNI_VERSION,
            "name": self.name,
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": self.bridge,
                    "isGateway": true,
                    "ipMasq": true,
                    "hairpinMode": true,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{ "subnet": self.subnet }]],
                        "routes": [{ "dst": "0.0.0.0/0" }]
                    }
                },
                {
                    "type": "portmap",
                    "capabilities": { "portMappings": true },
                    "snat": true
                }
            ]
        })
    }

    pub fn netns_name(container_id: &str) -> String {
        format!("skiff-{container_id}")
    }

    pub fn netns_path(container_id: &str) -> PathBuf {
        Path::new(NETNS_DIR).join(Self::netns_name(container_id))
    }

    /// Creates the namespace and attaches it; returns the CNI result (kept
    /// for `del`) and the container's address.
    pub fn add(&self, container_id: &str, port: PortMapping) -> Result<(Value, Ipv4Addr), String> {
        let ready = self.is_ready();
        let _lock = host_lock(if ready { Lock::Shared } else { Lock::Exclusive })?;
        let netns = Self::netns_path(container_id);
        if !netns.exists() {
            run_ip(&["netns", "add", &Self::netns_name(container_id)])?;
        }
        let conflist = self.conflist();
        let mut prev: Option<Value> = None;
        for plugin in conflist["plugins"].as_array().into_iter().flatten() {
            let began = std::time::Instant::now();
            let result = self.invoke("ADD", plugin, container_id, &netns, port, prev.as_ref())?;
            tracing::debug!(container = container_id, plugin = %plugin["type"], elapsed_ms = began.elapsed().as_millis() as u64, "CNI ADD");
            prev = Some(result);
        }
        let result = prev.unwrap_or(Value::Null);
        let ip = container_ip(&result)
            .ok_or_else(|| format!("CNI result has no IPv4 address: {result}"))?;
        if !ready {
            self.mark_ready();
        }
        Ok((result, ip))
    }

    /// Detaches the container (plugins in reverse order) and deletes its
    /// namespace. Idempotent: every step is tried, the first error returned.
    pub fn del(
        &self,
        container_id: &str,
        port: PortMapping,
        prev: Option<&Value>,
    ) -> Result<(), String> {
        // DEL only removes the container's own rules and chains.
        let _lock = host_lock(Lock::Shared)?;
        let netns = Self::netns_path(container_id);
        let conflist = self.conflist();
        let mut first_error = None;
        for plugin in conflist["plugins"].as_array().into_iter().flatten().rev() {
            if let Err(e) = self.invoke("DEL", plugin, container_id, &netns, port, prev) {
                first_error.get_or_insert(e);
            }
        }
        if netns.exists() {
            if let Err(e) = run_ip(&["netns", "delete", &Self::netns_name(container_id)]) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    fn invoke(
        &self,
        command: &str,
        plugin: &Value,
        container_id: &str,
        netns: &Path,
        port: PortMapping,
        prev: Option<&Value>,
    ) -> Result<Value, String> {
        let kind = plugin["type"].as_str().unwrap_or_default();
        let mut config = plugin.clone();
        config["name"] = json!(self.name);
        config["cniVersion"] = json!(CNI_VERSION);
        if let Some(prev) = prev {
            config["prevResult"] = prev.clone();
        }
        if kind == "portmap" {
            config["runtimeConfig"] = json!({
                "portMappings": [{
                    "hostPort": port.host_port,
                    "containerPort": port.container_port,
                    "protocol": "tcp"
                }]
            });
        }
        let binary = self.plugin_dir.join(kind);
        let mut child = Command::new(&binary)
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", container_id)
            .env("CNI_NETNS", netns)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", &self.plugin_dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| {
                format!(
                    "cannot run CNI plugin {}: {e} (install containernetworking-plugins)",
                    binary.display()
                )
            })?;
        if let Some(mut stdin) = child.stdin.take() {
            let _ = stdin.write_all(config.to_string().as_bytes());
        }
        let output = child
            .wait_with_output()
            .map_err(|e| format!("CNI plugin {kind} {command}: {e}"))?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() {
            let detail = serde_json::from_str::<Value>(&stdout)
                .ok()
                .map(|v| {
                    format!(
                        "{} {}",
                        v["msg"].as_str().unwrap_or_default(),
                        v["details"].as_str().unwrap_or_default()
                    )
                })
                .filter(|s| !s.trim().is_empty())
                .unwrap_or_else(|| String::from_utf8_lossy(&output.stderr).trim().to_string());
            return Err(format!(
                "CNI plugin {kind} {command} failed: {}",
                detail.trim()
            ));
        }
        if command == "DEL" || stdout.trim().is_empty() {
            return Ok(prev.cloned().unwrap_or(Value::Null));
        }
        serde_json::from_str(&stdout)
            .map_err(|e| format!("CNI plugin {kind} answered no JSON: {e}"))
    }
}

/// Bridges whose network this process attached a container to: their
/// bridge device and the plugins' shared iptables chains exist.
static READY: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

impl CniNetwork {
    fn is_ready(&self) -> bool {
        READY
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&self.bridge)
    }

    fn mark_ready(&self) {
        READY
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(self.bridge.clone());
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lock {
    Shared,
    Exclusive,
}

/// Orders CNI calls on the host (also between agents). portmap and bridge
/// race on creating their shared iptables chains and the bridge ("chain
/// already exists"), so a process's first ADD on a network runs alone
/// (exclusive). Once those exist, every plugin only adds or removes the
/// container's own chains, rules and veth (iptables serializes itself with
/// `--wait`, host-local IPAM with its own lock), so later ADDs and every
/// DEL run side by side (shared): replicas start in parallel instead of
/// queueing behind each other's plugins.
fn host_lock(kind: Lock) -> Result<nix::fcntl::Flock<std::fs::File>, String> {
    let path = Path::new("/run/skiff-cni.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let arg = match kind {
        Lock::Shared => nix::fcntl::FlockArg::LockShared,
        Lock::Exclusive => nix::fcntl::FlockArg::LockExclusive,
    };
    nix::fcntl::Flock::lock(file, arg)
        .map_err(|(_, e)| format!("cannot lock {}: {e}", path.display()))
}

/// The first IPv4 address of a CNI result.
pub fn container_ip(result: &Value) -> Option<Ipv4Addr> {
    result["ips"]
        .as_array()?
        .iter()
        .filter_map(|ip| ip["address"].as_str())
        .filter_map(|a| a.split('/').next()?.parse().ok())
        .next()
}

fn run_ip(args: &[&str]) -> Result<(), String> {
    let output = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run ip {}: {e} (install iproute2)", args.join(" ")))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conflist_has_bridge_with_masquerade_and_portmap_with_snat() {
        let c = CniNetwork::default().conflist();
        assert_eq!(c["plugins"][0]["type"], "bridge");
        assert_eq!(c["plugins"][0]["ipMasq"], true);
        assert_eq!(c["plugins"][0]["ipam"]["type"], "host-local");
        assert_eq!(c["plugins"][1]["type"], "portmap");
        assert_eq!(c["plugins"][1]["snat"], true);
    }

    #[test]
    fn container_ip_reads_the_first_v4_address() {
        let r = json!({"ips": [{"address": "10.89.0.7/16", "gateway": "10.89.0.1"}]});
        assert_eq!(container_ip(&r), Some(Ipv4Addr::new(10, 89, 0, 7)));
        assert_eq!(container_ip(&json!({})), None);
    }
}
