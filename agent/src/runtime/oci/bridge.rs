//! Bridge networking set up by the agent itself, the way Docker's bridge
//! driver does it: one network namespace per container with a veth pair
//! to the node bridge `skiff0`, an address from a lease directory, and the
//! scheduler-assigned host port mapped to the container port by a DNAT
//! rule. The equivalent of the CNI bridge + host-local + portmap chain,
//! but with one `ip` batch per side and one `iptables-restore` per
//! container instead of three plugin binaries and a dozen iptables calls:
//! about 10 ms per container instead of 110–130 ms (measured with
//! `skiff bench start`, see the README).
//!
//! Everything a container gets is named after its id, so a teardown (and
//! the sweep after a crash) finds it again without any record: the
//! namespace `skiff-<id>`, the host-side veth `vsk<id>`, the lease file
//! holding `<id>` and the NAT rules commented `skiff-<id>`.

use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};

const NETNS_DIR: &str = "/run/netns";
/// Address leases, one file per address holding the container id. On a
/// tmpfs, like the namespaces: both are gone after a reboot.
const LEASE_DIR: &str = "/run/skiff/ipam";
const LOCK_FILE: &str = "/run/skiff/network.lock";
/// The NAT chain holding every container's port mapping.
const HOSTPORTS: &str = "SKIFF-HOSTPORTS";
const POSTROUTING: &str = "SKIFF-POSTROUTING";
/// Marks connections to a mapped port that come from the host's loopback
/// or from a container (hairpin): they are masqueraded on the way to the
/// container, or its answer would not come back through the DNAT.
const MASQ_MARK: &str = "0x4000/0x4000";

/// The node's container network.
#[derive(Debug, Clone)]
pub struct BridgeNetwork {
    pub bridge: String,
    /// The gateway (the bridge's address) and the subnet's prefix length.
    pub gateway: Ipv4Addr,
    pub prefix: u8,
}

impl Default for BridgeNetwork {
    fn default() -> Self {
        Self {
            bridge: "skiff0".into(),
            gateway: Ipv4Addr::new(10, 89, 0, 1),
            prefix: 16,
        }
    }
}

/// One port published on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortMapping {
    pub host_port: u16,
    pub container_port: u16,
}

/// Whether this process has set the bridge and the shared chains up.
static HOST_READY: AtomicBool = AtomicBool::new(false);
/// Where the next lease search starts, shared by the agents of the host
/// like host-local's `last_reserved_ip`: addresses are handed out round
/// robin, so a freed one is not given again at once. The host's neighbour
/// cache may still hold the old container's MAC for it, and connections to
/// the new one would stall for seconds until the entry is probed again.
const LEASE_CURSOR: &str = "/run/skiff/ipam.next";

impl BridgeNetwork {
    pub fn netns_name(container_id: &str) -> String {
        format!("skiff-{container_id}")
    }

    pub fn netns_path(container_id: &str) -> PathBuf {
        Path::new(NETNS_DIR).join(Self::netns_name(container_id))
    }

    /// The host end of the container's veth pair: at most 15 bytes, so an
    /// id longer than the scheduler's 12 hex digits is hashed to 12.
    fn host_veth(container_id: &str) -> String {
        if container_id.len() <= 12 && container_id.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return format!("vsk{container_id}");
        }
        // FNV-1a: stable across processes, unlike the std hasher.
        let hash = container_id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        format!("vsk{:012x}", hash & 0xffff_ffff_ffff)
    }

    fn comment(container_id: &str) -> String {
        format!("skiff-{container_id}")
    }

    /// `10.89.0.0/16` for the default network.
    pub fn subnet(&self) -> String {
        format!("{}/{}", self.network_address(), self.prefix)
    }

    fn mask(&self) -> u32 {
        u32::MAX
            .checked_shl(32 - u32::from(self.prefix))
            .unwrap_or(0)
    }

    fn network_address(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.gateway) & self.mask())
    }

    /// Creates the namespace, its veth, address and routes, and the port
    /// mapping; returns the container's address. On failure, whatever was
    /// made is left for [`BridgeNetwork::del`], which the caller runs.
    pub fn add(&self, container_id: &str, port: PortMapping) -> Result<Ipv4Addr, String> {
        self.ensure_host()?;
        let _lock = host_lock(nix::fcntl::FlockArg::LockShared)?;
        let netns = Self::netns_name(container_id);
        if !Self::netns_path(container_id).exists() {
            run("ip", &["netns", "add", &netns], None)?;
        }
        let ip = self.lease(container_id)?;
        let veth = Self::host_veth(container_id);
        // The flush forgets the MAC of a container that had the address
        // before (see LEASE_CURSOR).
        let host_side = format!(
            "neigh flush to {ip} dev {bridge}\n\
             link add {veth} type veth peer name eth0 netns {netns}\n\
             link set dev {veth} master {bridge} up\n\
             link set dev {veth} type bridge_slave hairpin on\n",
            bridge = self.bridge
        );
        run("ip", &["-batch", "-"], Some(&host_side))?;
        let container_side = format!(
            "link set dev lo up\n\
             addr add {ip}/{prefix} dev eth0\n\
             link set dev eth0 up\n\
             route add default via {gateway}\n",
            prefix = self.prefix,
            gateway = self.gateway
        );
        run(
            "ip",
            &["-netns", &netns, "-batch", "-"],
            Some(&container_side),
        )?;
        self.map_port(container_id, ip, port)?;
        Ok(ip)
    }

    /// Removes the container's port mapping, veth, namespace and lease.
    /// Idempotent: every step is tried, the first error returned.
    pub fn del(&self, container_id: &str) -> Result<(), String> {
        let _lock = host_lock(nix::fcntl::FlockArg::LockShared)?;
        let mut first_error = None;
        let comment = Self::comment(container_id);
        if let Err(e) = remove_rules(|rule| rule.contains(&comment)) {
            first_error.get_or_insert(e);
        }
        let veth = Self::host_veth(container_id);
        if Path::new("/sys/class/net").join(&veth).exists() {
            if let Err(e) = run("ip", &["link", "delete", &veth], None) {
                first_error.get_or_insert(e);
            }
        }
        if Self::netns_path(container_id).exists() {
            if let Err(e) = run(
                "ip",
                &["netns", "delete", &Self::netns_name(container_id)],
                None,
            ) {
                first_error.get_or_insert(e);
            }
        }
        release_leases(|holder| holder == container_id);
        first_error.map_or(Ok(()), Err)
    }

    /// Removes what containers that no longer have a namespace left
    /// behind: NAT rules and address leases. A container whose teardown
    /// never ran (an agent killed, a bundle deleted by hand, a test's
    /// forced clean-up) would otherwise keep its DNAT rule, which then
    /// catches the next replica given the same host port.
    pub fn sweep(&self) -> Result<usize, String> {
        let _lock = host_lock(nix::fcntl::FlockArg::LockExclusive)?;
        let gone = |id: &str| !Self::netns_path(id).exists();
        let has_chain = iptables_save()?
            .lines()
            .any(|l| l.starts_with(&format!(":{HOSTPORTS} ")));
        let rules = if has_chain {
            remove_rules(|rule| comment_id(rule).is_some_and(gone))?
        } else {
            0
        };
        let leases = release_leases(gone);
        if rules + leases > 0 {
            tracing::info!(
                rules,
                leases,
                "removed the network leftovers of gone containers"
            );
        }
        Ok(rules + leases)
    }

    /// The bridge with the gateway address, forwarding, and the shared NAT
    /// chains; once per process (and idempotent across processes).
    fn ensure_host(&self) -> Result<(), String> {
        if HOST_READY.load(Ordering::Acquire) {
            return Ok(());
        }
        let _lock = host_lock(nix::fcntl::FlockArg::LockExclusive)?;
        if !Path::new("/sys/class/net").join(&self.bridge).exists() {
            run("ip", &["link", "add", &self.bridge, "type", "bridge"], None)?;
        }
        let bridge_setup = format!(
            "addr replace {gateway}/{prefix} dev {bridge}\nlink set dev {bridge} up\n",
            gateway = self.gateway,
            prefix = self.prefix,
            bridge = self.bridge
        );
        run("ip", &["-batch", "-"], Some(&bridge_setup))?;
        write_sysctl("net/ipv4/ip_forward", "1")?;
        // Lets a DNAT rule send 127.0.0.1's connections to the bridge.
        write_sysctl(
            &format!("net/ipv4/conf/{}/route_localnet", self.bridge),
            "1",
        )?;
        let current = iptables_save()?;
        let restore = nat_base_rules(&current, &self.subnet());
        if !restore.is_empty() {
            iptables_restore(&restore)?;
        }
        HOST_READY.store(true, Ordering::Release);
        Ok(())
    }

    /// The container's three NAT rules, after removing any other rule for
    /// the same host port: the scheduler gave the port to this container
    /// alone on this node, so another mapping of it is a leftover.
    fn map_port(&self, container_id: &str, ip: Ipv4Addr, port: PortMapping) -> Result<(), String> {
        let current = list_rules()?;
        let dport = format!("--dport {} ", port.host_port);
        let mut script = String::from("*nat\n");
        for rule in current.iter().filter(|r| format!("{r} ").contains(&dport)) {
            script.push_str(&rule.replacen("-A ", "-D ", 1));
            script.push('\n');
        }
        script.push_str(&port_rules(
            &Self::comment(container_id),
            &self.subnet(),
            ip,
            port,
        ));
        script.push_str("COMMIT\n");
        iptables_restore(&script)
    }

    /// Takes the first free address after the last one taken, by creating
    /// its lease file exclusively (safe between agents on one host).
    fn lease(&self, container_id: &str) -> Result<Ipv4Addr, String> {
        std::fs::create_dir_all(LEASE_DIR)
            .map_err(|e| format!("cannot create {LEASE_DIR}: {e}"))?;
        if let Some(ip) = leases().find(|(_, holder)| holder == container_id) {
            return Ok(ip.0);
        }
        let base = u32::from(self.network_address());
        let size = 1u32 << (32 - u32::from(self.prefix));
        // Skip the network address, the gateway and broadcast.
        let usable = size.saturating_sub(3).max(1);
        let start = std::fs::read_to_string(LEASE_CURSOR)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            .unwrap_or(0)
            % usable;
        for i in 0..usable {
            let offset = 2 + (start + i) % usable;
            let ip = Ipv4Addr::from(base + offset);
            let path = Path::new(LEASE_DIR).join(ip.to_string());
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut file) => {
                    file.write_all(container_id.as_bytes())
                        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
                    // Best effort: a lost update only means an earlier
                    // start for the next search.
                    let _ = std::fs::write(LEASE_CURSOR, ((start + i + 1) % usable).to_string());
                    return Ok(ip);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(format!("cannot create {}: {e}", path.display())),
            }
        }
        Err(format!(
            "no free address left in {} ({usable} containers on this host)",
            self.subnet()
        ))
    }
}

/// The lines of an `iptables-restore --noflush` script that add whatever
/// of the shared NAT setup `current` (the nat table as `iptables-save`
/// prints it) lacks. Declaring a chain that exists would flush it, so only
/// missing chains are declared.
fn nat_base_rules(current: &str, subnet: &str) -> String {
    let has = |line: &str| current.lines().any(|l| l.trim() == line);
    let mut script = String::new();
    for chain in [HOSTPORTS, POSTROUTING] {
        if !current
            .lines()
            .any(|l| l.starts_with(&format!(":{chain} ")))
        {
            script.push_str(&format!(":{chain} - [0:0]\n"));
        }
    }
    let rules = [
        format!("-A PREROUTING -m addrtype --dst-type LOCAL -j {HOSTPORTS}"),
        format!("-A OUTPUT -m addrtype --dst-type LOCAL -j {HOSTPORTS}"),
        format!("-A POSTROUTING -j {POSTROUTING}"),
        format!("-A {POSTROUTING} -m mark --mark {MASQ_MARK} -j MASQUERADE"),
        // Outbound traffic from containers leaves with the host's address.
        format!("-A {POSTROUTING} -s {subnet} -d {subnet} -j RETURN"),
        format!("-A {POSTROUTING} -s {subnet} -d 224.0.0.0/4 -j RETURN"),
        format!("-A {POSTROUTING} -s {subnet} -j MASQUERADE"),
    ];
    for rule in rules.iter().filter(|r| !has(r)) {
        script.push_str(rule);
        script.push('\n');
    }
    if script.is_empty() {
        return script;
    }
    format!("*nat\n{script}COMMIT\n")
}

/// A container's port mapping: connections to the host port on any local
/// address go to the container; those from loopback or from a container
/// are marked for masquerading first.
fn port_rules(comment: &str, subnet: &str, ip: Ipv4Addr, port: PortMapping) -> String {
    let matched = format!(
        "-A {HOSTPORTS} -p tcp -m tcp --dport {} -m comment --comment {comment}",
        port.host_port
    );
    format!(
        "{matched} -s 127.0.0.0/8 -j MARK --set-xmark {MASQ_MARK}\n\
         {matched} -s {subnet} -j MARK --set-xmark {MASQ_MARK}\n\
         {matched} -j DNAT --to-destination {ip}:{}\n",
        port.container_port
    )
}

/// The container id of a rule's `skiff-<id>` comment.
fn comment_id(rule: &str) -> Option<&str> {
    let rest = &rule[rule.find("--comment ")? + "--comment ".len()..];
    let word = rest.split_whitespace().next()?.trim_matches('"');
    word.strip_prefix("skiff-")
}

/// The rules of the port-mapping chain, as `-A ...` lines.
fn list_rules() -> Result<Vec<String>, String> {
    let out = run("iptables", &["-w", "5", "-t", "nat", "-S", HOSTPORTS], None)?;
    Ok(out
        .lines()
        .filter(|l| l.starts_with("-A "))
        .map(str::to_string)
        .collect())
}

/// Deletes the port-mapping rules `doomed` picks; returns how many.
fn remove_rules(doomed: impl Fn(&str) -> bool) -> Result<usize, String> {
    let rules = list_rules()?;
    let doomed: Vec<&String> = rules.iter().filter(|r| doomed(r)).collect();
    if doomed.is_empty() {
        return Ok(0);
    }
    let mut script = String::from("*nat\n");
    for rule in &doomed {
        script.push_str(&rule.replacen("-A ", "-D ", 1));
        script.push('\n');
    }
    script.push_str("COMMIT\n");
    iptables_restore(&script)?;
    Ok(doomed.len())
}

/// Every lease: the address and the container id holding it.
fn leases() -> impl Iterator<Item = (Ipv4Addr, String)> {
    std::fs::read_dir(LEASE_DIR)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let ip = entry.file_name().to_str()?.parse().ok()?;
            let holder = std::fs::read_to_string(entry.path()).ok()?;
            Some((ip, holder.trim().to_string()))
        })
}

/// Removes the leases whose holder `doomed` picks; returns how many.
fn release_leases(doomed: impl Fn(&str) -> bool) -> usize {
    leases()
        .filter(|(_, holder)| doomed(holder))
        .filter(|(ip, _)| std::fs::remove_file(Path::new(LEASE_DIR).join(ip.to_string())).is_ok())
        .count()
}

fn iptables_save() -> Result<String, String> {
    run("iptables-save", &["-t", "nat"], None)
}

fn iptables_restore(script: &str) -> Result<(), String> {
    run("iptables-restore", &["-w", "5", "--noflush"], Some(script)).map(|_| ())
}

fn write_sysctl(key: &str, value: &str) -> Result<(), String> {
    let path = Path::new("/proc/sys").join(key);
    if std::fs::read_to_string(&path).is_ok_and(|v| v.trim() == value) {
        return Ok(());
    }
    std::fs::write(&path, value).map_err(|e| format!("cannot set {}: {e}", path.display()))
}

/// Orders network changes between the agents of one host: setting up the
/// shared bridge and chains, and the sweep, run alone (exclusive); adding
/// and removing containers run side by side (shared), each touching only
/// what is named after its own container.
fn host_lock(kind: nix::fcntl::FlockArg) -> Result<nix::fcntl::Flock<std::fs::File>, String> {
    let path = Path::new(LOCK_FILE);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    nix::fcntl::Flock::lock(file, kind)
        .map_err(|(_, e)| format!("cannot lock {}: {e}", path.display()))
}

/// Runs `program args`, feeding it `input`; its stdout, or an error naming
/// the command and its stderr.
pub(crate) fn run(program: &str, args: &[&str], input: Option<&str>) -> Result<String, String> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            let package = if program.starts_with("iptables") {
                "iptables"
            } else {
                "iproute2"
            };
            format!("cannot run {program}: {e} (install {package})")
        })?;
    if let (Some(mut stdin), Some(input)) = (child.stdin.take(), input) {
        let _ = stdin.write_all(input.as_bytes());
    }
    let output = child
        .wait_with_output()
        .map_err(|e| format!("{program} {}: {e}", args.join(" ")))?;
    if output.status.success() {
        return Ok(String::from_utf8_lossy(&output.stdout).into_owned());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let context = input.map_or(String::new(), |i| {
        format!(" (input: {})", i.trim().replace('\n', "; "))
    });
    Err(format!(
        "{program} {} failed: {}{context}",
        args.join(" "),
        stderr.trim()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnet_comes_from_the_gateway_and_prefix() {
        let net = BridgeNetwork::default();
        assert_eq!(net.subnet(), "10.89.0.0/16");
        let small = BridgeNetwork {
            gateway: Ipv4Addr::new(192, 168, 7, 1),
            prefix: 24,
            ..BridgeNetwork::default()
        };
        assert_eq!(small.subnet(), "192.168.7.0/24");
    }

    #[test]
    fn names_fit_the_kernel_limits() {
        assert_eq!(BridgeNetwork::host_veth("0123456789ab"), "vsk0123456789ab");
        // Longer ids (the tests' own) are hashed to the same length.
        let long = BridgeNetwork::host_veth("bridge-serves-4242");
        assert_eq!(long.len(), 15);
        assert_ne!(long, BridgeNetwork::host_veth("bridge-serves-4243"));
        assert_eq!(BridgeNetwork::netns_name("abc"), "skiff-abc");
    }

    #[test]
    fn base_rules_add_only_what_is_missing() {
        let empty = ":PREROUTING ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n";
        let script = nat_base_rules(empty, "10.89.0.0/16");
        assert!(script.starts_with("*nat\n:SKIFF-HOSTPORTS - [0:0]\n:SKIFF-POSTROUTING - [0:0]\n"));
        assert!(script.contains("-A OUTPUT -m addrtype --dst-type LOCAL -j SKIFF-HOSTPORTS\n"));
        assert!(script.contains("-A SKIFF-POSTROUTING -s 10.89.0.0/16 -j MASQUERADE\n"));
        assert!(script.ends_with("COMMIT\n"));
        // Once everything is there (as iptables-save prints it), nothing
        // is added and no chain is declared (which would flush it).
        let full: String = script
            .lines()
            .filter(|l| l.starts_with("-A ") || l.starts_with(':'))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(nat_base_rules(&full, "10.89.0.0/16"), "");
    }

    #[test]
    fn port_rules_mark_loopback_and_hairpin_then_dnat() {
        let rules = port_rules(
            "skiff-abc",
            "10.89.0.0/16",
            Ipv4Addr::new(10, 89, 0, 9),
            PortMapping {
                host_port: 31000,
                container_port: 80,
            },
        );
        let lines: Vec<&str> = rules.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].contains("-s 127.0.0.0/8 -j MARK"));
        assert!(lines[1].contains("-s 10.89.0.0/16 -j MARK"));
        assert!(lines[2].ends_with("-j DNAT --to-destination 10.89.0.9:80"));
        assert!(lines.iter().all(|l| l.contains("--dport 31000 ")));
        assert!(lines.iter().all(|l| comment_id(l) == Some("abc")));
    }

    #[test]
    fn comment_id_reads_saved_rules() {
        let saved = "-A SKIFF-HOSTPORTS -p tcp -m tcp --dport 31000 -m comment --comment skiff-1a2b -j DNAT --to-destination 10.89.0.9:80";
        assert_eq!(comment_id(saved), Some("1a2b"));
        let quoted = "-A X -m comment --comment \"skiff-1a2b\" -j ACCEPT";
        assert_eq!(comment_id(quoted), Some("1a2b"));
        assert_eq!(comment_id("-A X -j ACCEPT"), None);
        assert_eq!(
            comment_id("-A X -m comment --comment other -j ACCEPT"),
            None
        );
    }
}
