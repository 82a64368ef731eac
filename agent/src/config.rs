//! The agent's configuration, as the CLI builds it.

use std::collections::BTreeMap;
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
    /// Static init bind-mounted into containers (`--init`).
    pub init_binary: PathBuf,
    /// Schedulable CPU in millicores, reported in `Register`; detected.
    pub cpu_millis: u32,
    /// Schedulable memory in MB, reported in `Register`; detected.
    pub memory_mb: u32,
    /// Node labels for constraints and zone spreading (`--label zone=a`).
    pub labels: BTreeMap<String, String>,
    /// Port (on `advertise`) where the agent serves `AgentLogs` (replica
    /// logs and exec, relayed by the servers, and image prunes); 0: any
    /// free port (in its registration, so its node record, either way).
    pub logs_port: u16,
    /// A replica's stdout or stderr log is rotated above this size (one
    /// rotated file is kept).
    pub log_max_bytes: u64,
    /// Where the agent serves `GET /metrics` (Prometheus text); `None`: the
    /// advertise address, port [`skiff_metrics::DEFAULT_AGENT_PORT`] (9465),
    /// or any free port if that is taken. Published to the servers either
    /// way, in the variable `_skiff/nodes/<node>/metrics`.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Export the routing proxy's per-replica series (`--proxy-replica-metrics`).
    pub proxy_replica_metrics: bool,
    /// The routing proxy may listen on published ports below 1024
    /// (`--allow-privileged-ports`); otherwise such a service is reported as
    /// one this node cannot publish.
    pub allow_privileged_ports: bool,
    /// Images the node's registry credentials are used for
    /// (`--registry-auth-scope`, see `image::PullOptions`).
    pub registry_auth_scopes: Vec<String>,
    /// How long a stopping replica of a published service keeps running
    /// after it left the proxies' pools, for its open connections, before
    /// SIGTERM.
    pub drain: Duration,
    /// How often the routing proxy's counters are reported to the control
    /// plane.
    pub traffic_interval: Duration,
    /// Above this many MB of stored images, images no allocation of the
    /// node uses are removed (checked every `image_gc_interval`); `None`:
    /// never automatically.
    pub image_gc_threshold_mb: Option<u64>,
    pub image_gc_interval: Duration,
    /// Runs `process` replicas: host processes with the agent's own
    /// rights (root). Off unless `--enable-process-runtime` (on in
    /// `skiff dev`), as Nomad ships `raw_exec` disabled.
    pub process_runtime: bool,
    /// Host path prefixes replicas may bind-mount (`--allow-host-path`);
    /// none by default.
    pub allow_host_paths: Vec<String>,
    /// Where the replicas' secrets tmpfs mounts go (`<dir>/<alloc id>`);
    /// outside the data dir, so no value is ever under it. Default:
    /// `/run/skiff/<name>-<hash of the data dir>/secrets`, so agents
    /// sharing a machine (and a node name, in tests) never share it.
    pub secrets_dir: PathBuf,
    /// The agent join token (`skiff cluster token agent`): needed on the
    /// first start, when `DATA/pki` holds no certificate yet.
    pub join_token: Option<String>,
    /// This node's credentials when the caller has them already (`skiff
    /// dev` issues them from its own CA); else loaded from `DATA/pki`, or
    /// obtained with `join_token`.
    pub credentials: Option<std::sync::Arc<skiff_pki::Credentials>>,
}

impl AgentConfig {
    /// A configuration with the defaults: advertise 127.0.0.1 (`skiff
    /// agent` passes [`Self::default_route_address`] unless told), ports
    /// 20000-29999, 5s stop grace, replicas left running on shutdown.
    pub fn new(name: impl Into<String>, data_dir: PathBuf, servers: Vec<String>) -> Self {
        let name = name.into();
        Self {
            secrets_dir: default_secrets_dir(&name, &data_dir),
            name,
            data_dir,
            servers,
            advertise: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port_range: (20000, 29999),
            stop_grace: Duration::from_secs(5),
            stop_replicas_on_shutdown: false,
            oci_runtime: None,
            insecure_registries: Vec::new(),
            process_runtime: false,
            docker_config: None,
            init_binary: PathBuf::from("/usr/bin/tini-static"),
            cpu_millis: detect_cpu_millis(),
            memory_mb: detect_memory_mb(),
            labels: BTreeMap::new(),
            logs_port: 0,
            log_max_bytes: 10 * 1024 * 1024,
            metrics_listen: None,
            proxy_replica_metrics: false,
            allow_privileged_ports: false,
            registry_auth_scopes: Vec::new(),
            drain: Duration::from_secs(5),
            traffic_interval: Duration::from_secs(2),
            image_gc_threshold_mb: None,
            image_gc_interval: Duration::from_secs(60),
            allow_host_paths: Vec::new(),
            join_token: None,
            credentials: None,
        }
    }

    /// The default route's interface and its address: where other machines
    /// most likely reach this one, what `skiff agent` advertises unless told
    /// (as Nomad's client does). `None` without an IPv4 default route.
    ///
    /// The route comes from `/proc/net/route`; the address is the source the
    /// kernel picks for that route, read from a UDP socket connected to the
    /// route's gateway (connecting a UDP socket sends nothing).
    pub fn default_route_address() -> Option<(String, IpAddr)> {
        let routes = std::fs::read_to_string("/proc/net/route").ok()?;
        let route = default_route(&routes)?;
        // A route without a gateway (a point-to-point link): any address it
        // carries will do; TEST-NET-1 (RFC 5737) has no route of its own.
        let peer = if route.gateway.is_unspecified() {
            Ipv4Addr::new(192, 0, 2, 1)
        } else {
            route.gateway
        };
        let socket = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).ok()?;
        socket.connect((peer, 9)).ok()?;
        let address = socket.local_addr().ok()?.ip();
        (!address.is_unspecified() && !address.is_loopback()).then_some((route.interface, address))
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

/// See [`AgentConfig::secrets_dir`].
fn default_secrets_dir(name: &str, data_dir: &std::path::Path) -> PathBuf {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    data_dir.hash(&mut hasher);
    let hash = hasher.finish() & 0xffff_ffff;
    PathBuf::from("/run/skiff")
        .join(format!("{name}-{hash:08x}"))
        .join("secrets")
}

/// One IPv4 default route of `/proc/net/route`.
#[derive(Debug, PartialEq, Eq)]
struct DefaultRoute {
    interface: String,
    gateway: Ipv4Addr,
}

/// The default route (destination and mask 0, up) with the lowest metric
/// in the text of `/proc/net/route`, whose columns are `Iface Destination
/// Gateway Flags RefCnt Use Metric Mask ...`, addresses in hex, in the
/// kernel's (little-endian) byte order.
fn default_route(routes: &str) -> Option<DefaultRoute> {
    const RTF_UP: u32 = 0x1;
    routes
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [interface, destination, gateway, flags, _, _, metric, mask, ..] = fields[..]
            else {
                return None;
            };
            let flags = u32::from_str_radix(flags, 16).ok()?;
            if destination != "00000000" || mask != "00000000" || flags & RTF_UP == 0 {
                return None;
            }
            let gateway = Ipv4Addr::from(u32::from_str_radix(gateway, 16).ok()?.to_le_bytes());
            let metric: u32 = metric.parse().ok()?;
            Some((metric, interface.to_string(), gateway))
        })
        .min()
        .map(|(_, interface, gateway)| DefaultRoute { interface, gateway })
}

/// CPUs this process may use, in millicores (1000 per CPU).
pub fn detect_cpu_millis() -> u32 {
    std::thread::available_parallelism().map_or(1000, |n| n.get() as u32 * 1000)
}

/// `MemTotal` of `/proc/meminfo` in MB; 0 (not counted) if unreadable.
pub fn detect_memory_mb() -> u32 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
            let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            u32::try_from(kb / 1024).ok()
        })
        .unwrap_or(0)
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
    fn the_default_route_with_the_lowest_metric_is_chosen() {
        let routes =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
            wlan0\t00000000\t0102A8C0\t0003\t0\t0\t600\t00000000\t0\t0\t0\n\
            eth0\t00000000\t010010AC\t0003\t0\t0\t100\t00000000\t0\t0\t0\n\
            eth0\t000010AC\t00000000\t0001\t0\t0\t100\t0000FFFF\t0\t0\t0\n";
        assert_eq!(
            default_route(routes),
            Some(DefaultRoute {
                interface: "eth0".into(),
                gateway: Ipv4Addr::new(172, 16, 0, 1),
            })
        );
    }

    #[test]
    fn no_default_route_means_none() {
        let routes = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\n\
            eth0\t000010AC\t00000000\t0001\t0\t0\t100\t0000FFFF\n\
            eth1\t00000000\t010010AC\t0002\t0\t0\t100\t00000000\n";
        assert_eq!(
            default_route(routes),
            None,
            "a route that is down does not count"
        );
        assert_eq!(default_route(""), None);
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
