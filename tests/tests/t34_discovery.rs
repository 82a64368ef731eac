//! t34: discovery by name across two agents, on real containers and a real host process.
//! `db` (on a2) and `cache` (on a1) are internal-only services (no `--publish`) of the test
//! image, reached on the image's own port 80. A bridge-mode container and a process replica
//! on a1 fetch `http://db/` and `http://cache/` in a loop and print what they got; the test
//! reads it with `skiff service logs`. The node's DNS server is also asked directly over UDP:
//! known names answer with a 5 s TTL, an unknown name is NXDOMAIN within milliseconds, and a
//! removed service's name is gone within a second or two.
//!
//! Needs root and the tools of t30 (runc, docker-registry, skopeo, busybox-static...).

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use skiff_e2e::agents::{on_loopback, AgentCluster};
use skiff_e2e::containers::{require_container_tools, Registry};
use skiff_e2e::servers::ServerCluster;
use skiff_e2e::{describe, http_get_at, skiff_at, wait_until, POLL};

const TIMEOUT: Duration = Duration::from_secs(60);

struct Cluster {
    // Dropped in field order: agents (and their containers) first.
    agents: AgentCluster,
    servers: ServerCluster,
    registry: Arc<Registry>,
}

impl Cluster {
    fn start() -> Cluster {
        require_container_tools();
        let registry = Registry::shared();
        let servers = ServerCluster::start(1, &[]);
        let agents = AgentCluster::start_with(
            &servers.addresses,
            &on_loopback(["a1", "a2"]),
            &["--insecure-registry", &registry.addr],
        );
        Cluster {
            agents,
            servers,
            registry,
        }
    }

    fn skiff_ok(&self, args: &[&str]) -> String {
        let out = skiff_at(&self.servers.addresses[0], args);
        assert!(
            out.status.success(),
            "{}\n{}",
            describe(args, &out),
            self.agents.logs()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn logs(&self, service: &str) -> String {
        let out = skiff_at(&self.servers.addresses[0], &["service", "logs", service]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The address of the DNS server of agent `index`, from its data dir.
    fn nameserver(&self, index: usize) -> Ipv4Addr {
        let path = self.agents.data_dir(index).join("discovery.json");
        let table: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).expect("discovery.json")).unwrap();
        let block = table["block"].as_u64().expect("block") as u8;
        Ipv4Addr::new(10, 90, block, 1)
    }
}

/// Asks `server` for the A record of `name`: the rcode, the addresses and
/// the TTL of the first, and how long the answer took.
fn ask(server: Ipv4Addr, name: &str) -> (u8, Vec<Ipv4Addr>, u32, Duration) {
    let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut q = vec![0xab, 0xcd, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    let began = Instant::now();
    socket
        .send_to(&q, SocketAddr::from((server, 53)))
        .expect("send dns query");
    let mut buf = [0u8; 512];
    let n = socket.recv(&mut buf).expect("dns answer in time");
    let took = began.elapsed();
    assert!(n >= q.len(), "short answer");
    assert_eq!(&buf[..2], &[0xab, 0xcd]);
    let rcode = buf[3] & 0xf;
    let answers = u16::from_be_bytes([buf[6], buf[7]]) as usize;
    let mut pos = q.len();
    let (mut ips, mut ttl) = (Vec::new(), 0);
    for _ in 0..answers {
        // name (a pointer), type, class, ttl, rdlength, rdata
        ttl = u32::from_be_bytes(buf[pos + 6..pos + 10].try_into().unwrap());
        let len = u16::from_be_bytes([buf[pos + 10], buf[pos + 11]]) as usize;
        if len == 4 {
            let r = &buf[pos + 12..pos + 16];
            ips.push(Ipv4Addr::new(r[0], r[1], r[2], r[3]));
        }
        pos += 12 + len;
    }
    (rcode, ips, ttl, took)
}

/// A loop printing what `http://db/` and `http://cache/` answer, once a
/// second. The test image's busybox is static against glibc, whose
/// `getaddrinfo` needs the libc the image does not have, so the names are
/// resolved with busybox's own `nslookup` (through the container's
/// `resolv.conf`) and fetched by address with `nc` (its `wget` needs libc
/// even then); the libc resolver is the process
/// replica's below.
const CONTAINER_CLIENT: &str = "get() { ip=$(nslookup $1 2>/dev/null | awk '/^Address: /{print $2}' | tail -1); \
     [ -n \"$ip\" ] || { echo \"unknown name\"; return; }; printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 2 $ip 80 | tail -1 | head -c 40; }; \
     while true; do echo \"db=$(get db)\"; echo \"cache=$(get cache)\"; echo \"nosuch=$(get nosuch)\"; sleep 1; done";

/// The same from a host process, through the host's libc resolver.
const PROCESS_CLIENT: &str = r#"
import time, urllib.request
for _ in range(120):
    for name in ('db', 'cache'):
        try:
            body = urllib.request.urlopen(f'http://{name}/', timeout=2).read().decode().strip()
        except Exception as e:
            body = repr(e)[:60]
        print(f'{name}={body}', flush=True)
    time.sleep(1)
"#;

#[test]
fn services_are_reached_by_name_from_containers_and_processes_on_any_node() {
    let cluster = Cluster::start();
    let (web1, web2) = (
        cluster.registry.image("web:v1"),
        cluster.registry.image("web:v2"),
    );
    // Internal-only services on the image's own port (80, from its config).
    cluster.skiff_ok(&[
        "service",
        "create",
        "db",
        "--image",
        &web1,
        "--constraint",
        "node.name==a2",
    ]);
    cluster.skiff_ok(&[
        "service",
        "create",
        "cache",
        "--image",
        &web2,
        "--constraint",
        "node.name==a1",
    ]);
    cluster.skiff_ok(&[
        "service",
        "create",
        "--detach",
        "client",
        "--image",
        &web1,
        "--constraint",
        "node.name==a1",
        "--entrypoint",
        "/bin/sh",
        "--",
        "-c",
        CONTAINER_CLIENT,
    ]);
    cluster.skiff_ok(&[
        "service",
        "create",
        "--detach",
        "pyclient",
        "--runtime",
        "process",
        "--constraint",
        "node.name==a1",
        "--",
        "python3",
        "-c",
        PROCESS_CLIENT,
    ]);

    // The container on a1 reaches db on a2 and cache on a1 by name.
    let mut logs = String::new();
    let reached = wait_until(TIMEOUT, Duration::from_millis(500), || {
        logs = cluster.logs("client");
        logs.contains("db=skiff-test web v1") && logs.contains("cache=skiff-test web v2")
    });
    assert!(
        reached,
        "container client:\n{logs}\n{}",
        cluster.agents.logs()
    );
    assert!(
        logs.contains("nosuch=unknown name"),
        "an unknown name fails:\n{logs}"
    );
    // So does a host process.
    let reached = wait_until(TIMEOUT, Duration::from_millis(500), || {
        logs = cluster.logs("pyclient");
        logs.contains("db=skiff-test web v1") && logs.contains("cache=skiff-test web v2")
    });
    assert!(
        reached,
        "process client:\n{logs}\n{}",
        cluster.agents.logs()
    );

    // The DNS server itself: every name form, TTL, fail-fast for unknown names.
    let dns = cluster.nameserver(0);
    let (rcode, db_ips, ttl, _) = ask(dns, "db");
    assert_eq!((rcode, db_ips.len(), ttl), (0, 1, 5), "db");
    assert_eq!(ask(dns, "db.skiff").1, db_ips, "db.skiff");
    let mut slowest = Duration::ZERO;
    for _ in 0..20 {
        let (rcode, ips, _, took) = ask(dns, "nosuch");
        assert_eq!((rcode, ips.len()), (3, 0), "NXDOMAIN for an unknown name");
        slowest = slowest.max(took);
    }
    assert!(
        slowest < Duration::from_millis(100),
        "unknown name took {slowest:?}"
    );
    println!("unknown name: NXDOMAIN, slowest of 20 {slowest:?}");
    // Each node gives its own addresses; a2's answers db as well.
    let (rcode, ips, _, _) = ask(cluster.nameserver(1), "db");
    assert_eq!((rcode, ips.len()), (0, 1));

    // A removed service's name is gone within a couple of seconds.
    cluster.skiff_ok(&["service", "rm", "cache"]);
    let began = Instant::now();
    let gone = wait_until(Duration::from_secs(10), POLL, || ask(dns, "cache").0 == 3);
    assert!(gone, "cache still resolves after its removal");
    println!("removed service's name gone after {:?}", began.elapsed());
    assert!(
        began.elapsed() < Duration::from_secs(3),
        "took {:?}",
        began.elapsed()
    );

    // Replicas owning per-replica volumes have names of their own: `members-0.members`
    // always reaches the replica of slot 0, `members-1.members` the other.
    cluster.skiff_ok(&[
        "service",
        "create",
        "members",
        "--image",
        &web1,
        "--replicas",
        "2",
        "--volume",
        "data:/data",
        "--entrypoint",
        "/bin/sh",
        "--",
        "-c",
        "echo $HOSTNAME > /data/index.html && exec httpd -f -p $PORT -h /data",
    ]);
    let mut seen = Vec::new();
    for slot in 0..2 {
        let name = format!("members-{slot}.members");
        let mut found = None;
        wait_until(TIMEOUT, POLL, || {
            let (rcode, ips, _, _) = ask(dns, &name);
            found = (rcode == 0).then(|| ips.first().copied()).flatten();
            found.is_some()
        });
        let ip = found.unwrap_or_else(|| panic!("{name} never resolved"));
        let mut hosts = std::collections::BTreeSet::new();
        for _ in 0..6 {
            let mut body = String::new();
            wait_until(TIMEOUT, POLL, || {
                body = http_get_at(SocketAddr::from((ip, 80)), "/")
                    .map(|r| r.body.trim().to_string())
                    .unwrap_or_default();
                !body.is_empty()
            });
            hosts.insert(body);
        }
        assert_eq!(hosts.len(), 1, "{name} reaches one replica: {hosts:?}");
        seen.extend(hosts);
    }
    assert_ne!(seen[0], seen[1], "each slot its own replica: {seen:?}");
    let (rcode, _, _, took) = ask(dns, "members-7.members");
    assert_eq!(rcode, 3, "no slot 7");
    assert!(took < Duration::from_millis(100), "{took:?}");
}

/// Within a stack, a service reaches the stack's other services by their
/// short names (`db` for `app-db`), through its search domain `app.skiff`.
#[test]
fn a_stacks_services_reach_each_other_by_short_name() {
    let cluster = Cluster::start();
    let web1 = cluster.registry.image("web:v1");
    let client = CONTAINER_CLIENT.replace('$', "$$");
    let compose = format!(
        r#"
name: app
services:
  db:
    image: {web1}
  client:
    image: {web1}
    entrypoint: ["/bin/sh", "-c", {client:?}]
"#
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("compose.yaml");
    std::fs::write(&file, compose).unwrap();
    cluster.skiff_ok(&[
        "stack",
        "deploy",
        "app",
        "--detach",
        "-f",
        file.to_str().unwrap(),
    ]);
    let mut logs = String::new();
    let reached = wait_until(TIMEOUT, Duration::from_millis(500), || {
        logs = cluster.logs("app-client");
        logs.contains("db=skiff-test web v1")
    });
    assert!(reached, "stack client:\n{logs}\n{}", cluster.agents.logs());
    // `cache` is no service of this stack (nor of the cluster).
    assert!(logs.contains("cache=unknown name"), "{logs}");
    for node in 0..2 {
        let (rcode, ips, _, _) = ask(cluster.nameserver(node), "db.app.skiff");
        assert_eq!((rcode, ips.len()), (0, 1), "db.app.skiff on node {node}");
    }
    assert_eq!(
        ask(cluster.nameserver(0), "db").0,
        3,
        "no `db` outside the stack"
    );
}
