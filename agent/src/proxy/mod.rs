//! The routing proxy: for every published service, a TCP listener on this
//! node's advertise address and published port that forwards each client
//! connection to a serving replica anywhere in the cluster (node address +
//! host port), as the control plane's `Endpoints` list them. A service
//! reachable by name (see [`crate::discovery`]) also has a listener on its
//! virtual address and own port; both share the service's pool, so health,
//! draining, canary weights and holding apply to traffic inside the
//! cluster as to published traffic.
//!
//! A replica is chosen by the power of two choices: two distinct
//! candidates drawn with probability proportional to their weight, the one
//! with fewer open connections per unit of weight wins. A dial that fails
//! is retried on another replica before any client byte is read, so it is
//! safe for any protocol. Bytes flow through `copy_bidirectional` with its
//! two fixed buffers per connection; nothing is allocated per byte.
//!
//! Besides the service's counters, every replica has its own (keyed by
//! allocation id in [`ServiceCounters`], so they outlive pool updates):
//! connections, failed dials, open connections and, for HTTP services,
//! responses and 5xx responses read from the replica's byte stream.
//!
//! A service with no replica in its pool (scaled to zero, or every replica
//! restarting) has its new connections held, within [`HoldLimits`], until
//! a replica appears, then forwarded: the client sees a slow first answer,
//! not an error. Held connections are counted as `waiting`, and the first
//! one signals `Metrics::demand` so the control plane hears of it at once
//! and starts a replica. A connection that waits too long, or finds the
//! queue full, is refused (counted as `no_endpoint`; an HTTP client gets a
//! 503 saying why).

pub mod http;

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use rand::Rng;
use skiff_proto::v1 as pb;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

use crate::metrics::{Metrics, ReplicaCounters, ServiceCounters};
use http::{RequestCounter, ResponseCounter};

/// How long one dial of a replica may take before the next is tried.
const DIAL_TIMEOUT: Duration = Duration::from_secs(2);
/// Most dials for one client connection.
const MAX_DIALS: usize = 8;
/// Most connections held per service while it has no replica.
pub const MAX_WAITING: u64 = 256;
/// Longest a connection is held waiting for a replica: more than a cold
/// start of a replica (placement, image already pulled, start, first
/// health check) takes.
pub const HOLD_TIMEOUT: Duration = Duration::from_secs(30);

/// How connections to a service without replicas are held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HoldLimits {
    /// Most connections held per service; more are refused at once.
    pub max_waiting: u64,
    /// Longest one connection is held before it is refused.
    pub timeout: Duration,
}

impl Default for HoldLimits {
    fn default() -> Self {
        HoldLimits {
            max_waiting: MAX_WAITING,
            timeout: HOLD_TIMEOUT,
        }
    }
}

/// One service as the proxy routes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub service: String,
    /// The port published on the node's advertise address; 0: none.
    pub publish: u16,
    /// The service's own port, where it is reached by name; 0: none.
    pub port: u16,
    /// The stack the service belongs to (empty: none).
    pub stack: String,
    /// Where the service is reached by name on this node (its virtual
    /// address and own port), once discovery has given it one.
    pub internal: Option<SocketAddr>,
    /// The slots of its live replicas when each has a name of its own
    /// (replicas owning per-replica volumes); empty otherwise.
    pub slots: Vec<u32>,
    /// Count HTTP/1.1 requests.
    pub http: bool,
    pub endpoints: Vec<Endpoint>,
    /// Hold new connections while there is no endpoint (the service
    /// scales from zero); otherwise refuse them at once.
    pub hold_when_empty: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub alloc_id: String,
    pub addr: SocketAddr,
    /// Relative share of new connections (canary weighting); 0 counts as 1.
    pub weight: u32,
    /// The service version the replica runs (a metrics label).
    pub version: u64,
    /// The replica's slot.
    pub slot: u32,
}

/// The routes an `Endpoints` message describes; endpoints with an address
/// that does not parse, and services with port 0, are skipped (logged).
pub fn routes_from_pb(endpoints: &pb::Endpoints) -> Vec<Route> {
    endpoints
        .services
        .iter()
        .filter_map(|s| {
            let publish = u16::try_from(s.publish).unwrap_or(0);
            let port = u16::try_from(s.port).unwrap_or(0);
            if publish == 0 && port == 0 {
                return None;
            }
            let endpoints = s
                .endpoints
                .iter()
                .filter_map(|e| {
                    let ip: IpAddr = e.address.parse().ok()?;
                    let port = u16::try_from(e.port).ok().filter(|p| *p != 0)?;
                    Some(Endpoint {
                        alloc_id: e.alloc_id.clone(),
                        addr: SocketAddr::new(ip, port),
                        weight: e.weight,
                        version: e.version,
                        slot: e.slot,
                    })
                })
                .collect::<Vec<_>>();
            if endpoints.len() != s.endpoints.len() {
                tracing::warn!(service = %s.service, "skipped endpoints with an invalid address");
            }
            Some(Route {
                service: s.service.clone(),
                publish,
                port,
                stack: s.stack.clone(),
                internal: None,
                slots: s.slots.clone(),
                http: s.protocol == "http",
                endpoints,
                hold_when_empty: s.hold_when_empty,
            })
        })
        .collect()
}

/// A replica in a pool; its counters (open connections among them) are
/// the replica's, shared by every pool update that lists it.
#[derive(Debug)]
struct Backend {
    alloc_id: String,
    addr: SocketAddr,
    /// Relative share of new connections, at least 1.
    weight: u64,
    counters: Arc<ReplicaCounters>,
}

impl Backend {
    fn active(&self) -> u64 {
        self.counters.active.load(Ordering::Relaxed)
    }
}

/// The replicas of one service; replaced wholesale on every update while
/// connections keep the `Backend` they dialled.
struct Pool {
    service: String,
    backends: RwLock<Arc<[Arc<Backend>]>>,
    /// Count HTTP requests; changes with the service's protocol, for the
    /// connections accepted from then on (the listener stays bound).
    http: std::sync::atomic::AtomicBool,
    counters: Arc<ServiceCounters>,
    /// Whether the pool has a replica: what held connections wait for.
    ready: watch::Sender<bool>,
    /// Signalled when a connection starts waiting and none was.
    demand: Arc<Notify>,
    hold: HoldLimits,
    /// The route holds connections while the pool is empty.
    holds: std::sync::atomic::AtomicBool,
    /// Client connections open now (a gauge), bounded by `limits`.
    open: AtomicU64,
    limits: ConnLimits,
}

impl Pool {
    fn new(service: &str, http: bool, metrics: &Metrics, hold: HoldLimits) -> Self {
        Pool {
            service: service.to_string(),
            backends: RwLock::new(Arc::from(Vec::new())),
            http: std::sync::atomic::AtomicBool::new(http),
            counters: metrics.service(service),
            ready: watch::channel(false).0,
            demand: metrics.demand(),
            hold,
            holds: std::sync::atomic::AtomicBool::new(false),
            open: AtomicU64::new(0),
            limits: ConnLimits::default(),
        }
    }

    fn snapshot(&self) -> Arc<[Arc<Backend>]> {
        self.backends
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Replaces the endpoints, keeping the `Backend` of every replica that
    /// stays as it was, and every replica's counters.
    fn set(&self, endpoints: &[Endpoint]) {
        let mut backends = self.backends.write().unwrap_or_else(|p| p.into_inner());
        let ids: Vec<&str> = endpoints.iter().map(|e| e.alloc_id.as_str()).collect();
        let replicas = self.counters.update_replicas(&ids, Instant::now());
        let next: Vec<Arc<Backend>> = endpoints
            .iter()
            .zip(replicas)
            .map(|(e, counters)| {
                counters.version.store(e.version, Ordering::Relaxed);
                let weight = u64::from(e.weight.max(1));
                backends
                    .iter()
                    .find(|b| b.alloc_id == e.alloc_id && b.addr == e.addr && b.weight == weight)
                    .cloned()
                    .unwrap_or_else(|| {
                        Arc::new(Backend {
                            alloc_id: e.alloc_id.clone(),
                            addr: e.addr,
                            weight,
                            counters,
                        })
                    })
            })
            .collect();
        self.counters
            .endpoints
            .store(next.len() as u64, Ordering::Relaxed);
        let ready = !next.is_empty();
        *backends = next.into();
        drop(backends);
        self.ready
            .send_if_modified(|was| std::mem::replace(was, ready) != ready);
    }
}

struct Listener {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

/// A published port this node cannot listen on; the proxy retries it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortFailure {
    pub service: String,
    pub port: u16,
    pub error: String,
}

/// Every routed service's pool and listeners on this node.
pub struct Proxy {
    bind: IpAddr,
    metrics: Metrics,
    hold: HoldLimits,
    limits: ConnLimits,
    pools: HashMap<String, Arc<Pool>>,
    /// Published ports, by service.
    listeners: HashMap<String, Listener>,
    /// Virtual addresses of discovery by name, by service.
    internal: HashMap<String, Listener>,
    /// Gives services their addresses and names; `None`: published ports
    /// only.
    discovery: Option<crate::discovery::Discovery>,
    /// The last routes, applied again by [`Proxy::retry`] for listeners
    /// that could not bind.
    routes: Vec<Route>,
    /// Services whose port could not be bound at the last attempt, with
    /// the error: reported to the control plane, which shows them.
    failures: BTreeMap<String, PortFailure>,
    /// Published ports below 1024 may be listened on
    /// (`--allow-privileged-ports`).
    privileged_ports: bool,
}

impl Proxy {
    /// Lets the proxy listen on published ports below 1024.
    pub fn with_privileged_ports(mut self, allowed: bool) -> Self {
        self.privileged_ports = allowed;
        self
    }

    /// Listens on a published port, unless it is below 1024 and this node
    /// does not allow that: a port such as 22 or 443 on every node is the
    /// node operator's to give, not any client's who can create a service.
    fn bind_published(&self, addr: SocketAddr) -> io::Result<tokio::net::TcpListener> {
        if addr.port() < 1024 && !self.privileged_ports {
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                "ports below 1024 are not allowed on this node; start its agent with --allow-privileged-ports to publish them",
            ));
        }
        bind(addr)
    }

    pub fn new(bind: IpAddr, metrics: Metrics) -> Self {
        Self {
            bind,
            metrics,
            hold: HoldLimits::default(),
            limits: ConnLimits::default(),
            pools: HashMap::new(),
            listeners: HashMap::new(),
            internal: HashMap::new(),
            discovery: None,
            routes: Vec::new(),
            failures: BTreeMap::new(),
            privileged_ports: false,
        }
    }

    /// Holds connections to services without replicas within `hold`
    /// (applies to listeners started from now on).
    pub fn with_hold(mut self, hold: HoldLimits) -> Self {
        self.hold = hold;
        self
    }

    /// Makes services reachable by name on this node.
    pub fn with_discovery(mut self, discovery: Option<crate::discovery::Discovery>) -> Self {
        self.discovery = discovery;
        self
    }

    /// Bounds the client connections of listeners started from now on.
    pub fn with_limits(mut self, limits: ConnLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Makes the listeners and pools match `routes`: new services get a
    /// pool and their listeners, removed ones lose them (their open
    /// connections carry on).
    pub fn update(&mut self, mut routes: Vec<Route>) {
        if let Some(discovery) = self.discovery.as_mut() {
            discovery.assign(&mut routes);
        }
        let published = |r: &Route| (r.publish != 0).then(|| SocketAddr::new(self.bind, r.publish));
        let wanted_public: HashMap<&str, SocketAddr> = routes
            .iter()
            .filter_map(|r| Some((r.service.as_str(), published(r)?)))
            .collect();
        let wanted_internal: HashMap<&str, SocketAddr> = routes
            .iter()
            .filter_map(|r| Some((r.service.as_str(), r.internal?)))
            .collect();
        stop_unwanted(
            &mut self.listeners,
            &wanted_public,
            "routing proxy stops listening",
        );
        stop_unwanted(
            &mut self.internal,
            &wanted_internal,
            "routing proxy stops listening by name",
        );
        self.pools.retain(|service, pool| {
            let keep = routes.iter().any(|r| &r.service == service);
            if !keep {
                pool.set(&[]);
            }
            keep
        });
        self.failures.retain(|service, failure| {
            routes
                .iter()
                .any(|r| &r.service == service && r.publish == failure.port)
        });
        for route in &routes {
            let pool = match self.pools.get(&route.service) {
                Some(pool) => {
                    pool.holds.store(route.hold_when_empty, Ordering::Relaxed);
                    pool.http.store(route.http, Ordering::Relaxed);
                    pool.set(&route.endpoints);
                    pool.clone()
                }
                None => {
                    let mut pool = Pool::new(&route.service, route.http, &self.metrics, self.hold);
                    pool.limits = self.limits;
                    let pool = Arc::new(pool);
                    pool.holds.store(route.hold_when_empty, Ordering::Relaxed);
                    pool.set(&route.endpoints);
                    self.pools.insert(route.service.clone(), pool.clone());
                    pool
                }
            };
            if let Some(addr) = published(route) {
                if !self.listeners.contains_key(&route.service) {
                    match self.bind_published(addr) {
                        Ok(listener) => {
                            if self.failures.remove(&route.service).is_some() {
                                tracing::info!(service = %route.service, %addr, "routing proxy could listen after all");
                            }
                            tracing::info!(service = %route.service, %addr, endpoints = route.endpoints.len(), "routing proxy listening");
                            let task = tokio::spawn(accept_loop(listener, pool.clone()));
                            self.listeners
                                .insert(route.service.clone(), Listener { addr, task });
                        }
                        Err(e) => {
                            let failure = PortFailure {
                                service: route.service.clone(),
                                port: route.publish,
                                error: format!("cannot listen on {addr}: {e}"),
                            };
                            if self.failures.get(&route.service) != Some(&failure) {
                                tracing::warn!(service = %route.service, %addr, error = %e, "routing proxy failed to listen; retrying");
                            }
                            self.failures.insert(route.service.clone(), failure);
                        }
                    }
                }
            }
            if let Some(addr) = route.internal {
                if !self.internal.contains_key(&route.service) {
                    match bind(addr) {
                        Ok(listener) => {
                            tracing::info!(service = %route.service, %addr, "routing proxy listening by name");
                            let task = tokio::spawn(accept_loop(listener, pool.clone()));
                            self.internal
                                .insert(route.service.clone(), Listener { addr, task });
                        }
                        Err(e) => {
                            tracing::warn!(service = %route.service, %addr, error = %e, "routing proxy failed to listen by name; retrying");
                        }
                    }
                }
            }
        }
        self.routes = routes;
    }

    /// The published ports that could not be bound at the last attempt,
    /// by service.
    pub fn failures(&self) -> Vec<PortFailure> {
        self.failures.values().cloned().collect()
    }

    /// Tries again to listen where binding failed.
    pub fn retry(&mut self) {
        let publishing = self.routes.iter().filter(|r| r.publish != 0).count();
        let named = self.routes.iter().filter(|r| r.internal.is_some()).count();
        if publishing != self.listeners.len() || named != self.internal.len() {
            self.update(self.routes.clone());
        }
    }

    /// Stops every listener (open connections carry on until they end).
    pub fn shutdown(&mut self) {
        for (_, listener) in self.listeners.drain().chain(self.internal.drain()) {
            listener.task.abort();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Stops the listeners whose service is gone or listens elsewhere now.
fn stop_unwanted(
    listeners: &mut HashMap<String, Listener>,
    wanted: &HashMap<&str, SocketAddr>,
    what: &str,
) {
    listeners.retain(|service, listener| {
        let keep = wanted.get(service.as_str()) == Some(&listener.addr);
        if !keep {
            tracing::info!(%service, addr = %listener.addr, "{what}");
            listener.task.abort();
        }
        keep
    });
}

fn bind(addr: SocketAddr) -> io::Result<tokio::net::TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

async fn accept_loop(listener: tokio::net::TcpListener, pool: Arc<Pool>) {
    loop {
        match listener.accept().await {
            Ok((client, _)) => {
                if pool.open.load(Ordering::Relaxed) >= pool.limits.max_open {
                    pool.counters.no_endpoint.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(service = %pool.service, "connection refused: too many open");
                    tokio::spawn(refuse_owned(client, pool.clone(), Refusal::TooMany));
                    continue;
                }
                tokio::spawn(forward(client, pool.clone()));
            }
            Err(e) => {
                // Out of file descriptors and the like: back off briefly.
                tracing::warn!(error = %e, "routing proxy failed to accept");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Decrements a gauge when the connection it counts ends.
struct Gauge<'a>(&'a AtomicU64);

impl<'a> Gauge<'a> {
    fn up(counter: &'a AtomicU64) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        Gauge(counter)
    }
}

impl Drop for Gauge<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn refuse_owned(client: TcpStream, pool: Arc<Pool>, why: Refusal) {
    refuse(client, &pool, why).await;
}

async fn forward(client: TcpStream, pool: Arc<Pool>) {
    let _open = Gauge::up(&pool.open);
    let http = pool.http.load(Ordering::Relaxed);
    let counters = pool.counters.clone();
    counters.connections.fetch_add(1, Ordering::Relaxed);
    if let Err(why) = await_replica(&client, &pool).await {
        counters.no_endpoint.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(service = %pool.service, reason = %why, "connection refused");
        refuse(client, &pool, why).await;
        return;
    }
    let _active = Gauge::up(&counters.active);
    let mut tried = Vec::new();
    let Some(mut upstream) = dial(&pool, &mut tried).await else {
        counters.no_endpoint.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let _ = client.set_nodelay(true);
    let activity = Activity::new();
    let mut client = Counted {
        inner: client,
        counters: &counters,
        replica: upstream.backend.counters.clone(),
        http: http.then(HttpCounters::default),
        activity: &activity,
    };
    if http {
        match first_exchange(&mut client, &pool, &mut tried, upstream).await {
            Some(answered) => upstream = answered,
            None => return,
        }
    }
    let idle = if http {
        pool.limits.idle_http
    } else {
        pool.limits.idle_tcp
    };
    tokio::select! {
        copied = tokio::io::copy_bidirectional(&mut client, &mut upstream.stream) => {
            if let Err(e) = copied {
                tracing::trace!(alloc = %upstream.backend.alloc_id, error = %e, "proxied connection ended with an error");
            }
        }
        () = activity.idle_for(idle) => {
            tracing::debug!(service = %pool.service, idle_secs = idle.as_secs(), "idle connection closed");
        }
    }
}

/// Why a held connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// No replica serves and the service does not scale from zero.
    NoReplica,
    QueueFull,
    TimedOut,
    ClientLeft,
    /// The service has [`MAX_OPEN_PER_SERVICE`] connections open here.
    TooMany,
}

impl Refusal {
    fn as_str(self) -> &'static str {
        match self {
            Refusal::NoReplica => "no replica is serving",
            Refusal::QueueFull => "too many connections waiting for a replica",
            Refusal::TimedOut => "no replica became ready in time",
            Refusal::ClientLeft => "the client left while waiting for a replica",
            Refusal::TooMany => "too many connections open to this service on this node",
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Holds `client` while the pool has no replica, counted as waiting: until
/// one appears (`Ok`), or the hold times out, the queue is full, or the
/// client goes away first.
async fn await_replica(client: &TcpStream, pool: &Pool) -> Result<(), Refusal> {
    let mut ready = pool.ready.subscribe();
    if *ready.borrow_and_update() {
        return Ok(());
    }
    if !pool.holds.load(Ordering::Relaxed) {
        return Err(Refusal::NoReplica);
    }
    let waiting = pool.counters.waiting.fetch_add(1, Ordering::Relaxed);
    let _waiting = Gauge(&pool.counters.waiting);
    if waiting >= pool.hold.max_waiting {
        return Err(Refusal::QueueFull);
    }
    if waiting == 0 {
        pool.demand.notify_one();
    }
    tracing::debug!(service = %pool.service, waiting = waiting + 1, "holding a connection until a replica is ready");
    let wait = tokio::time::timeout(pool.hold.timeout, ready.wait_for(|ready| *ready));
    tokio::select! {
        waited = wait => match waited {
            Ok(Ok(_)) => Ok(()),
            // The pool is gone (its listener was removed), or time is up.
            Ok(Err(_)) | Err(_) => Err(Refusal::TimedOut),
        },
        () = client_left(client) => Err(Refusal::ClientLeft),
    }
}

/// Resolves when the client closes before sending anything (a held client
/// that gave up); once it has sent bytes, never (they wait for a replica).
async fn client_left(client: &TcpStream) {
    let mut byte = [0u8; 1];
    match client.peek(&mut byte).await {
        Ok(0) | Err(_) => {}
        Ok(_) => std::future::pending().await,
    }
}

/// Closes a refused connection; an HTTP client first gets a 503 saying
/// why, so the refusal is clear rather than a bare close.
async fn refuse(mut client: TcpStream, pool: &Pool, why: Refusal) {
    use tokio::io::AsyncWriteExt;
    if !pool.http.load(Ordering::Relaxed) || why == Refusal::ClientLeft {
        return;
    }
    // Take in the request already sent, so closing does not reset the
    // connection before the client reads the answer.
    let mut request = [0u8; 4096];
    let _ = client.try_read(&mut request);
    let body = format!("skiff: {} of service {}\n", why, pool.service);
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(DIAL_TIMEOUT, async {
        client.write_all(answer.as_bytes()).await?;
        client.shutdown().await
    })
    .await;
}

/// An open connection to a replica, counted in its open connections until
/// dropped.
struct Upstream {
    backend: Arc<Backend>,
    stream: TcpStream,
}

impl Upstream {
    fn open(backend: Arc<Backend>, stream: TcpStream) -> Self {
        backend.counters.connections.fetch_add(1, Ordering::Relaxed);
        backend.counters.active.fetch_add(1, Ordering::Relaxed);
        Self { backend, stream }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.backend.counters.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Largest first request the proxy keeps for a replay.
const REPLAY_BYTES: usize = 16 * 1024;

/// Most connections one service's listener keeps open on this node; more
/// are refused at once, so clients cannot exhaust the agent's descriptors
/// (500 idle connections held 816 of them before this bound).
pub const MAX_OPEN_PER_SERVICE: u64 = 10_000;

/// An HTTP client must send its first request head within this (slowloris);
/// later requests on a kept-alive connection are bounded by the idle timeout.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection with no byte in either direction this long is closed:
/// HTTP keep-alive connections after 5 minutes, any other TCP stream (a
/// database pool's idle connection) after an hour.
pub const IDLE_TIMEOUT_HTTP: Duration = Duration::from_secs(300);
pub const IDLE_TIMEOUT_TCP: Duration = Duration::from_secs(3600);

/// The bounds on client connections of one service's listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnLimits {
    pub max_open: u64,
    pub header_timeout: Duration,
    pub idle_http: Duration,
    pub idle_tcp: Duration,
}

impl Default for ConnLimits {
    fn default() -> Self {
        ConnLimits {
            max_open: MAX_OPEN_PER_SERVICE,
            header_timeout: HEADER_TIMEOUT,
            idle_http: IDLE_TIMEOUT_HTTP,
            idle_tcp: IDLE_TIMEOUT_TCP,
        }
    }
}

/// When a connection last carried a byte, in milliseconds since it opened.
struct Activity {
    opened: tokio::time::Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity {
            opened: tokio::time::Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Resolves once nothing has moved for `timeout`.
    async fn idle_for(&self, timeout: Duration) {
        loop {
            let last = self.opened + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let due = last + timeout;
            if tokio::time::Instant::now() >= due {
                return;
            }
            tokio::time::sleep_until(due).await;
        }
    }
}

/// Whether `bytes`, following `tail` (the last bytes seen before), complete
/// an HTTP head (an empty line); updates `tail`.
fn ends_head(tail: &mut Vec<u8>, bytes: &[u8]) -> bool {
    let mut window = std::mem::take(tail);
    window.extend_from_slice(bytes);
    let done = window.windows(4).any(|w| w == b"\r\n\r\n");
    let keep = window.len().saturating_sub(3);
    *tail = window.split_off(keep);
    done
}

/// For HTTP services: forwards the client's first request and waits for
/// the replica's first byte, forwarding whatever more the client sends
/// meanwhile (a request may arrive in pieces, and the replica answers only
/// once it has all of it). A replica that closes or resets the connection
/// before answering anything (it died between the dial and the request: a
/// killed process's socket accepts for a moment) gets the request replayed
/// on another replica — only for complete, bodiless requests with an
/// idempotent method, which the dead replica cannot have half-applied.
/// Returns the replica that answered, its first bytes already sent on to
/// the client.
async fn first_exchange(
    client: &mut Counted<'_>,
    pool: &Pool,
    tried: &mut Vec<Arc<Backend>>,
    mut upstream: Upstream,
) -> Option<Upstream> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = upstream.stream.set_nodelay(true);
    // Everything sent to the replica so far, kept for a replay while it
    // fits in REPLAY_BYTES (`None` once it did not).
    let mut sent = Some(Vec::new());
    let mut chunk = [0u8; 4096];
    let mut answer = [0u8; 4096];
    let mut client_open = true;
    let head_deadline = tokio::time::Instant::now() + pool.limits.header_timeout;
    let (mut head_done, mut tail) = (false, Vec::new());
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(head_deadline), if !head_done => {
                tracing::debug!(service = %pool.service, "client sent no complete request head in time; closed");
                return None;
            }
            read = client.read(&mut chunk), if client_open => {
                let n = read.ok()?;
                head_done = head_done || ends_head(&mut tail, &chunk[..n]);
                if n == 0 {
                    if sent.as_ref().is_some_and(Vec::is_empty) {
                        // Gone before sending anything.
                        return None;
                    }
                    client_open = false;
                    continue;
                }
                if let Some(kept) = &mut sent {
                    if kept.len() + n <= REPLAY_BYTES {
                        kept.extend_from_slice(&chunk[..n]);
                    } else {
                        sent = None;
                    }
                }
                // A replica that cannot take it has closed: the read branch
                // sees that next and replays or gives up.
                let _ = upstream.stream.write_all(&chunk[..n]).await;
            }
            got = upstream.stream.read(&mut answer) => {
                let got = got.unwrap_or(0);
                if got > 0 {
                    client.replica = upstream.backend.counters.clone();
                    client.write_all(&answer[..got]).await.ok()?;
                    return Some(upstream);
                }
                let request = sent.as_deref().filter(|r| http::is_replayable(r))?;
                tracing::debug!(alloc = %upstream.backend.alloc_id, "replica closed before answering; replaying the request on another");
                pool.counters
                    .connect_failures
                    .fetch_add(1, Ordering::Relaxed);
                upstream
                    .backend
                    .counters
                    .connect_failures
                    .fetch_add(1, Ordering::Relaxed);
                upstream = dial(pool, tried).await?;
                let _ = upstream.stream.set_nodelay(true);
                let _ = upstream.stream.write_all(request).await;
            }
        }
    }
}

/// Dials replicas until one accepts: nothing has been read from the client
/// yet, so a refused or timed-out dial is retried on another replica.
/// Replicas in `tried` are skipped, and every one dialed is added to it.
async fn dial(pool: &Pool, tried: &mut Vec<Arc<Backend>>) -> Option<Upstream> {
    while tried.len() < MAX_DIALS {
        let backends = pool.snapshot();
        let backend = choose(&backends, tried)?;
        tried.push(backend.clone());
        match tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(backend.addr)).await {
            Ok(Ok(stream)) => return Some(Upstream::open(backend, stream)),
            Ok(Err(e)) => {
                tracing::debug!(alloc = %backend.alloc_id, addr = %backend.addr, error = %e, "replica refused; trying another");
            }
            Err(_) => {
                tracing::debug!(alloc = %backend.alloc_id, addr = %backend.addr, "dialing replica timed out; trying another");
            }
        }
        pool.counters
            .connect_failures
            .fetch_add(1, Ordering::Relaxed);
        backend
            .counters
            .connect_failures
            .fetch_add(1, Ordering::Relaxed);
    }
    None
}

/// Power of two choices among the replicas not yet tried, weighted: two
/// distinct ones drawn with probability proportional to their weight; the
/// one with fewer open connections per unit of weight wins (the first
/// drawn on a tie, which is itself random). With no load this picks each
/// replica in proportion to its weight; under load it keeps open
/// connections proportional to weight, which for equally fast replicas
/// is a split of new connections by weight too.
fn choose(backends: &[Arc<Backend>], tried: &[Arc<Backend>]) -> Option<Arc<Backend>> {
    let untried = |b: &Arc<Backend>| !tried.iter().any(|t| Arc::ptr_eq(t, b));
    let total: u64 = backends
        .iter()
        .filter(|b| untried(b))
        .map(|b| b.weight)
        .sum();
    let mut rng = rand::thread_rng();
    let first = draw(backends, |b| untried(b), total, &mut rng)?;
    let rest = total - first.weight;
    let Some(second) = draw(
        backends,
        |b| untried(b) && !Arc::ptr_eq(b, &first),
        rest,
        &mut rng,
    ) else {
        return Some(first);
    };
    // active/weight compared without division.
    let load = |b: &Backend, other: &Backend| u128::from(b.active()) * u128::from(other.weight);
    if load(&second, &first) < load(&first, &second) {
        Some(second)
    } else {
        Some(first)
    }
}

/// One of the `eligible` backends, with probability proportional to its
/// weight; `total` is the weight of the eligible ones.
fn draw(
    backends: &[Arc<Backend>],
    eligible: impl Fn(&Arc<Backend>) -> bool,
    total: u64,
    rng: &mut impl Rng,
) -> Option<Arc<Backend>> {
    if total == 0 {
        return None;
    }
    let mut at = rng.gen_range(0..total);
    for b in backends.iter().filter(|b| eligible(b)) {
        if at < b.weight {
            return Some(b.clone());
        }
        at -= b.weight;
    }
    None
}

/// The HTTP counters of one proxied connection.
#[derive(Default)]
struct HttpCounters {
    requests: RequestCounter,
    responses: ResponseCounter,
    /// When each request still unanswered started, oldest first (HTTP/1.1
    /// answers in order); at most [`MAX_PENDING_STARTS`].
    starts: std::collections::VecDeque<Instant>,
}

/// Unanswered request start times kept per connection (a client
/// pipelining more has its oldest ones dropped, unmeasured).
const MAX_PENDING_STARTS: usize = 64;

/// The client side of a proxied connection, counting bytes both ways and,
/// for HTTP services, the requests in what the client sends and the
/// responses (for `replica`) in what it receives.
struct Counted<'a> {
    inner: TcpStream,
    counters: &'a ServiceCounters,
    /// The replica whose bytes are written to the client.
    replica: Arc<ReplicaCounters>,
    http: Option<HttpCounters>,
    activity: &'a Activity,
}

impl AsyncRead for Counted<'_> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = result {
            let new = &buf.filled()[before..];
            if !new.is_empty() {
                this.activity.touch();
                this.counters
                    .bytes_in
                    .fetch_add(new.len() as u64, Ordering::Relaxed);
                if let Some(http) = &mut this.http {
                    let started = http.requests.feed(new);
                    if started > 0 {
                        this.counters.requests.fetch_add(started, Ordering::Relaxed);
                        let now = Instant::now();
                        for _ in 0..started {
                            if http.starts.len() == MAX_PENDING_STARTS {
                                http.starts.pop_front();
                            }
                            http.starts.push_back(now);
                        }
                    }
                }
            }
        }
        result
    }
}

impl AsyncWrite for Counted<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = result {
            this.activity.touch();
            this.counters
                .bytes_out
                .fetch_add(n as u64, Ordering::Relaxed);
            if let Some(http) = &mut this.http {
                let seen = http.responses.feed(&buf[..n], http.requests.heads());
                if seen.messages > 0 {
                    let replica = &this.replica;
                    replica
                        .responses
                        .fetch_add(seen.messages, Ordering::Relaxed);
                    replica.errors.fetch_add(seen.errors, Ordering::Relaxed);
                    let now = Instant::now();
                    for class in seen.classes() {
                        if let Some(start) = http.starts.pop_front() {
                            this.counters
                                .observe_request(class, now.saturating_duration_since(start));
                        }
                    }
                }
            }
        }
        result
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn backend(id: &str, active: u64) -> Arc<Backend> {
        weighted(id, active, 1)
    }

    fn weighted(id: &str, active: u64, weight: u64) -> Arc<Backend> {
        let counters = ReplicaCounters::default();
        counters.active.store(active, Ordering::Relaxed);
        Arc::new(Backend {
            alloc_id: id.into(),
            addr: "127.0.0.1:1".parse().unwrap(),
            weight,
            counters: Arc::new(counters),
        })
    }

    fn endpoint(alloc_id: &str, addr: SocketAddr) -> Endpoint {
        Endpoint {
            alloc_id: alloc_id.into(),
            addr,
            weight: 1,
            version: 1,
            slot: 0,
        }
    }

    /// How often each backend of `pool` is chosen in `n` choices.
    fn shares(pool: &[Arc<Backend>], n: usize) -> HashMap<String, usize> {
        let mut chosen = HashMap::new();
        for _ in 0..n {
            *chosen
                .entry(choose(pool, &[]).unwrap().alloc_id.clone())
                .or_default() += 1;
        }
        chosen
    }

    #[test]
    fn choice_prefers_fewer_connections_and_skips_tried_replicas() {
        let busy = backend("busy", 10);
        let idle = backend("idle", 0);
        let pool = vec![busy.clone(), idle.clone()];
        for _ in 0..50 {
            assert_eq!(choose(&pool, &[]).unwrap().alloc_id, "idle");
        }
        assert_eq!(
            choose(&pool, std::slice::from_ref(&idle)).unwrap().alloc_id,
            "busy"
        );
        assert!(choose(&pool, &[idle, busy]).is_none());
        assert!(choose(&[], &[]).is_none());
    }

    #[test]
    fn ties_are_broken_at_random() {
        let pool: Vec<_> = (0..3).map(|i| backend(&i.to_string(), 0)).collect();
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..200 {
            seen.insert(choose(&pool, &[]).unwrap().alloc_id.clone());
        }
        assert_eq!(seen.len(), 3);
    }

    #[test]
    fn choices_without_load_follow_the_weights() {
        let pool = vec![weighted("canary", 0, 1), weighted("stable", 0, 9)];
        let chosen = shares(&pool, 10_000);
        let canary = chosen.get("canary").copied().unwrap_or(0);
        assert!(
            (800..=1200).contains(&canary),
            "canary chosen {canary} times"
        );
        assert_eq!(canary + chosen["stable"], 10_000);
    }

    #[test]
    fn load_is_compared_per_unit_of_weight() {
        // 3 connections on weight 4 is less load than 1 on weight 1.
        let heavy = weighted("heavy", 3, 4);
        let light = weighted("light", 1, 1);
        let pool = vec![heavy, light];
        for _ in 0..50 {
            assert_eq!(choose(&pool, &[]).unwrap().alloc_id, "heavy");
        }
    }

    /// Equally fast replicas (every connection lasts the same number of
    /// arrivals) get new connections in proportion to their weight: here
    /// two canaries of weight 4 and eight replicas of weight 9, so the
    /// canaries' share is 8 / 80.
    #[test]
    fn under_load_equally_fast_replicas_split_connections_by_weight() {
        let mut pool: Vec<_> = (0..2)
            .map(|i| weighted(&format!("canary{i}"), 0, 4))
            .collect();
        pool.extend((0..8).map(|i| weighted(&format!("stable{i}"), 0, 9)));
        let lasts = 30;
        let mut open = std::collections::VecDeque::new();
        let mut canary = 0;
        let rounds = 20_000;
        for _ in 0..rounds {
            if open.len() == lasts {
                let done: Arc<Backend> = open.pop_front().unwrap();
                done.counters.active.fetch_sub(1, Ordering::Relaxed);
            }
            let b = choose(&pool, &[]).unwrap();
            b.counters.active.fetch_add(1, Ordering::Relaxed);
            if b.alloc_id.starts_with("canary") {
                canary += 1;
            }
            open.push_back(b);
        }
        let share = f64::from(canary) / f64::from(rounds);
        assert!((0.08..=0.12).contains(&share), "canary share {share}");
    }

    #[test]
    fn endpoints_carry_weight_and_version() {
        let routes = routes_from_pb(&pb::Endpoints {
            services: vec![pb::ServiceEndpoints {
                service: "web".into(),
                publish: 8080,
                port: 0,
                stack: String::new(),
                slots: Vec::new(),
                protocol: "http".into(),
                hold_when_empty: false,
                endpoints: vec![pb::Endpoint {
                    alloc_id: "a1".into(),
                    node: "n1".into(),
                    address: "10.0.0.1".into(),
                    port: 20000,
                    weight: 3,
                    version: 7,
                    slot: 0,
                }],
            }],
        });
        assert_eq!(routes[0].endpoints[0].weight, 3);
        assert_eq!(routes[0].endpoints[0].version, 7);
    }

    #[test]
    fn replica_counters_survive_pool_updates() {
        let metrics = Metrics::default();
        let pool = Pool::new("web", false, &metrics, HoldLimits::default());
        let addr = "127.0.0.1:1".parse().unwrap();
        pool.set(&[endpoint("a", addr), endpoint("b", addr)]);
        pool.snapshot()[0]
            .counters
            .connections
            .fetch_add(4, Ordering::Relaxed);
        // A new weight makes a new backend, but the same replica counters.
        pool.set(&[Endpoint {
            weight: 5,
            version: 2,
            ..endpoint("a", addr)
        }]);
        let a = &pool.snapshot()[0];
        assert_eq!(a.weight, 5);
        assert_eq!(a.counters.connections.load(Ordering::Relaxed), 4);
        let replicas = &metrics.samples()[0].replicas;
        assert_eq!(replicas.len(), 2, "b is kept for a while after leaving");
        assert_eq!((replicas[0].connections, replicas[0].version), (4, 2));

        // Weight 0 counts as 1.
        pool.set(&[Endpoint {
            weight: 0,
            ..endpoint("a", addr)
        }]);
        assert_eq!(pool.snapshot()[0].weight, 1);
    }

    async fn echo_server() -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    /// A port nothing listens on (bound, then released).
    async fn refusing_addr() -> SocketAddr {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    }

    /// A proxy on a free port for one echoing replica, with `limits`.
    async fn limited(http: bool, limits: ConnLimits) -> (Proxy, u16) {
        let replica = if http {
            answers_whole_heads().await
        } else {
            echo_server().await
        };
        let mut proxy =
            Proxy::new("127.0.0.1".parse().unwrap(), Metrics::default()).with_limits(limits);
        let publish = refusing_addr().await.port();
        proxy.update(vec![Route {
            service: "web".into(),
            publish,
            port: 0,
            stack: String::new(),
            internal: None,
            slots: Vec::new(),
            http,
            endpoints: vec![endpoint("r1", replica)],
            hold_when_empty: false,
        }]);
        (proxy, publish)
    }

    /// Reads until the proxy closes the connection; `Err` if it stays
    /// open past `within`.
    async fn closed_within(s: &mut TcpStream, within: Duration) -> Result<(), ()> {
        let mut buf = [0u8; 64];
        tokio::time::timeout(within, async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await
        .map_err(|_| ())
    }

    #[test]
    fn a_head_ends_at_an_empty_line_even_across_reads() {
        let mut tail = Vec::new();
        assert!(!ends_head(&mut tail, b"GET / HTTP/1.1\r\nHost: x\r"));
        assert!(ends_head(&mut tail, b"\n\r\n"));
        let mut tail = Vec::new();
        assert!(!ends_head(&mut tail, b"GET / HTTP/1.1\r\n"));
        assert!(!ends_head(&mut tail, b"X: y\r\n"));
    }

    #[tokio::test]
    async fn a_client_that_never_completes_its_head_is_closed_after_the_header_timeout() {
        let limits = ConnLimits {
            header_timeout: Duration::from_millis(300),
            ..ConnLimits::default()
        };
        let (_proxy, publish) = limited(true, limits).await;
        let mut slow = TcpStream::connect(("127.0.0.1", publish)).await.unwrap();
        slow.write_all(b"GET / HTTP/1.1\r\nX-Slow: ").await.unwrap();
        assert_eq!(
            closed_within(&mut slow, Duration::from_secs(5)).await,
            Ok(())
        );
        // A whole head in time is served as before.
        let mut ok = TcpStream::connect(("127.0.0.1", publish)).await.unwrap();
        ok.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let mut back = [0u8; 19];
        ok.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"HTTP/1.0 200 OK\r\n\r\n");
    }

    #[tokio::test]
    async fn an_idle_connection_is_closed_and_a_busy_one_is_not() {
        let limits = ConnLimits {
            idle_tcp: Duration::from_millis(400),
            ..ConnLimits::default()
        };
        let (_proxy, publish) = limited(false, limits).await;
        let mut busy = TcpStream::connect(("127.0.0.1", publish)).await.unwrap();
        for _ in 0..6 {
            busy.write_all(b"ping").await.unwrap();
            let mut back = [0u8; 4];
            busy.read_exact(&mut back).await.unwrap();
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        let mut idle = TcpStream::connect(("127.0.0.1", publish)).await.unwrap();
        assert_eq!(
            closed_within(&mut idle, Duration::from_secs(5)).await,
            Ok(())
        );
    }

    #[tokio::test]
    async fn ports_below_1024_are_published_only_where_the_node_allows_it() {
        let route = Route {
            service: "web".into(),
            publish: 443,
            port: 0,
            stack: String::new(),
            internal: None,
            slots: Vec::new(),
            http: false,
            endpoints: vec![],
            hold_when_empty: false,
        };
        let mut proxy = Proxy::new("127.0.0.1".parse().unwrap(), Metrics::default());
        proxy.update(vec![route.clone()]);
        let failures = proxy.failures();
        assert_eq!(failures.len(), 1, "{failures:?}");
        assert!(
            failures[0]
                .error
                .contains("ports below 1024 are not allowed on this node; start its agent with --allow-privileged-ports"),
            "{failures:?}"
        );
        assert!(proxy.listeners.is_empty());

        // Allowed: the policy no longer stands in the way (the bind itself
        // may still fail if another program holds 127.0.0.1:443).
        let mut proxy = Proxy::new("127.0.0.1".parse().unwrap(), Metrics::default())
            .with_privileged_ports(true);
        proxy.update(vec![route]);
        assert!(proxy
            .failures()
            .iter()
            .all(|f| !f.error.contains("--allow-privileged-ports")));
    }

    #[tokio::test]
    async fn a_port_held_by_another_program_is_reported_until_it_is_free() {
        let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = other.local_addr().unwrap().port();
        let mut proxy = Proxy::new("127.0.0.1".parse().unwrap(), Metrics::default());
        let route = Route {
            service: "web".into(),
            publish: port,
            port: 0,
            stack: String::new(),
            internal: None,
            slots: Vec::new(),
            http: false,
            endpoints: vec![],
            hold_when_empty: false,
        };
        proxy.update(vec![route.clone()]);
        let failures = proxy.failures();
        assert_eq!(failures.len(), 1, "{failures:?}");
        assert_eq!(
            (failures[0].service.as_str(), failures[0].port),
            ("web", port)
        );
        assert!(
            failures[0].error.contains(&format!("127.0.0.1:{port}")),
            "{failures:?}"
        );

        drop(other);
        proxy.retry();
        assert_eq!(proxy.failures(), vec![]);
        TcpStream::connect(("127.0.0.1", port)).await.unwrap();

        let blocker = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let moved = blocker.local_addr().unwrap().port();
        proxy.update(vec![Route {
            publish: moved,
            port: 0,
            stack: String::new(),
            internal: None,
            slots: Vec::new(),
            ..route
        }]);
        assert_eq!(proxy.failures()[0].port, moved);
        proxy.update(vec![]);
        assert_eq!(proxy.failures(), vec![], "a removed route is no failure");
    }

    #[tokio::test]
    async fn connections_over_the_cap_are_refused_at_once() {
        let limits = ConnLimits {
            max_open: 2,
            ..ConnLimits::default()
        };
        let (_proxy, publish) = limited(false, limits).await;
        let mut open = Vec::new();
        for _ in 0..2 {
            let mut s = TcpStream::connect(("127.0.0.1", publish)).await.unwrap();
            s.write_all(b"hi").await.unwrap();
            let mut back = [0u8; 2];
            s.read_exact(&mut back).await.unwrap();
            open.push(s);
        }
        let mut third = TcpStream::connect(("127.0.0.1", publish)).await.unwrap();
        assert_eq!(
            closed_within(&mut third, Duration::from_secs(5)).await,
            Ok(())
        );
        drop(open);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut again = TcpStream::connect(("127.0.0.1", publish)).await.unwrap();
        again.write_all(b"hi").await.unwrap();
        let mut back = [0u8; 2];
        again.read_exact(&mut back).await.unwrap();
    }

    #[tokio::test]
    async fn refused_dials_are_retried_and_http_requests_counted() {
        let good = echo_server().await;
        let bad = refusing_addr().await;
        let metrics = Metrics::default();
        let mut proxy = Proxy::new("127.0.0.1".parse().unwrap(), metrics.clone());
        let publish = refusing_addr().await.port();
        proxy.update(vec![Route {
            service: "web".into(),
            publish,
            port: 0,
            stack: String::new(),
            internal: None,
            slots: Vec::new(),
            http: true,
            endpoints: vec![endpoint("bad", bad), endpoint("good", good)],
            hold_when_empty: false,
        }]);
        assert_eq!(metrics.samples()[0].endpoints, 2);
        for _ in 0..10 {
            let mut s = TcpStream::connect(("127.0.0.1", publish)).await.unwrap();
            let req = b"GET / HTTP/1.1\r\n\r\nGET /2 HTTP/1.1\r\n\r\n";
            s.write_all(req).await.unwrap();
            let mut back = vec![0u8; req.len()];
            s.read_exact(&mut back).await.unwrap();
            assert_eq!(&back, req);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let sample = &metrics.samples()[0];
        assert_eq!(sample.connections, 10);
        assert_eq!(sample.requests, 20);
        assert_eq!(sample.bytes_in, 10 * 37);
        assert_eq!(sample.bytes_out, 10 * 37);
        assert_eq!(sample.no_endpoint, 0);
        assert!(sample.connect_failures <= 10);
        let [bad, good] = &sample.replicas[..] else {
            panic!("two replicas: {:?}", sample.replicas);
        };
        assert_eq!(bad.connect_failures, sample.connect_failures);
        assert_eq!((bad.connections, good.connections), (0, 10));
        assert_eq!(good.active, 0);
        assert_eq!(good.responses, 0, "echoed requests are no responses");
    }

    /// A replica that answers only once a whole request head has arrived,
    /// as an HTTP server does.
    async fn answers_whole_heads() -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 256];
                    while !head.ends_with(b"\r\n\r\n") {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let _ = s.write_all(b"HTTP/1.0 200 OK\r\n\r\n").await;
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn a_request_that_arrives_in_pieces_reaches_the_replica_whole() {
        let replica = answers_whole_heads().await;
        let metrics = Metrics::default();
        let mut proxy = Proxy::new("127.0.0.1".parse().unwrap(), metrics.clone());
        let publish = refusing_addr().await.port();
        proxy.update(vec![Route {
            service: "web".into(),
            publish,
            port: 0,
            stack: String::new(),
            internal: None,
            slots: Vec::new(),
            http: true,
            endpoints: vec![endpoint("r", replica)],
            hold_when_empty: false,
        }]);
        let mut s = TcpStream::connect(("127.0.0.1", publish)).await.unwrap();
        s.set_nodelay(true).unwrap();
        for piece in ["GET ", "/ HTTP/1.0\r\n", "Host: x\r\n", "\r\n"] {
            s.write_all(piece.as_bytes()).await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer))
            .await
            .expect("the replica answered the whole request")
            .unwrap();
        assert_eq!(answer, b"HTTP/1.0 200 OK\r\n\r\n");
    }

    /// A route that holds connections while it has no endpoint.
    fn web(publish: u16, endpoints: Vec<Endpoint>) -> Vec<Route> {
        vec![Route {
            service: "web".into(),
            publish,
            port: 0,
            stack: String::new(),
            internal: None,
            slots: Vec::new(),
            http: true,
            endpoints,
            hold_when_empty: true,
        }]
    }

    /// Waits (bounded) until `web`'s counters satisfy `done`.
    async fn until(metrics: &Metrics, done: impl Fn(&crate::metrics::TrafficSample) -> bool) {
        tokio::time::timeout(Duration::from_secs(5), async {
            while !done(&metrics.samples()[0]) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("counters reached");
    }

    #[tokio::test]
    async fn connections_wait_for_a_replica_and_are_forwarded_when_one_appears() {
        let good = echo_server().await;
        let metrics = Metrics::default();
        let demand = metrics.demand();
        let mut proxy = Proxy::new("127.0.0.1".parse().unwrap(), metrics.clone());
        let publish = refusing_addr().await.port();
        proxy.update(web(publish, vec![]));

        let mut clients = Vec::new();
        for i in 0..3u8 {
            let mut s = TcpStream::connect(("127.0.0.1", publish)).await.unwrap();
            s.write_all(&[b'a' + i]).await.unwrap();
            clients.push(s);
        }
        until(&metrics, |s| s.waiting == 3).await;
        // The first one waiting signalled demand (once).
        tokio::time::timeout(Duration::from_secs(1), demand.notified())
            .await
            .expect("demand signalled");
        assert_eq!(metrics.samples()[0].active, 0, "waiting is not active");

        proxy.update(web(publish, vec![endpoint("good", good)]));
        for (i, s) in clients.iter_mut().enumerate() {
            let mut back = [0u8; 1];
            tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut back))
                .await
                .expect("forwarded once a replica is ready")
                .unwrap();
            assert_eq!(back[0], b'a' + i as u8);
        }
        let sample = &metrics.samples()[0];
        assert_eq!((sample.waiting, sample.no_endpoint), (0, 0));
        assert_eq!(sample.active, 3);
    }

    #[tokio::test]
    async fn a_service_that_does_not_scale_from_zero_refuses_at_once_when_empty() {
        let metrics = Metrics::default();
        let mut proxy = Proxy::new("127.0.0.1".parse().unwrap(), metrics.clone());
        let publish = refusing_addr().await.port();
        let mut route = web(publish, vec![]);
        route[0].hold_when_empty = false;
        proxy.update(route);
        let started = Instant::now();
        let mut s = TcpStream::connect(("127.0.0.1", publish)).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut answer))
            .await
            .expect("answered at once")
            .unwrap();
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
        assert!(answer.contains("no replica is serving"), "{answer}");
        assert!(started.elapsed() < Duration::from_secs(2));
        until(&metrics, |s| s.no_endpoint == 1 && s.waiting == 0).await;
    }

    #[tokio::test]
    async fn held_connections_are_refused_after_the_timeout_or_when_the_queue_is_full() {
        let metrics = Metrics::default();
        let hold = HoldLimits {
            max_waiting: 2,
            timeout: Duration::from_millis(300),
        };
        let mut proxy = Proxy::new("127.0.0.1".parse().unwrap(), metrics.clone()).with_hold(hold);
        let publish = refusing_addr().await.port();
        proxy.update(web(publish, vec![]));
        let request = b"GET / HTTP/1.1\r\nHost: web\r\n\r\n";
        let mut held = Vec::new();
        for _ in 0..2 {
            let mut s = TcpStream::connect(("127.0.0.1", publish)).await.unwrap();
            s.write_all(request).await.unwrap();
            held.push(s);
        }
        until(&metrics, |s| s.waiting == 2).await;
        // A third: the queue is full, refused at once with a 503.
        let started = Instant::now();
        let mut third = TcpStream::connect(("127.0.0.1", publish)).await.unwrap();
        third.write_all(request).await.unwrap();
        let mut answer = String::new();
        third.read_to_string(&mut answer).await.unwrap();
        assert!(started.elapsed() < Duration::from_millis(250));
        assert!(
            answer.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
            "{answer}"
        );
        assert!(
            answer.ends_with("skiff: too many connections waiting for a replica of service web\n")
        );
        // The held ones: refused after the timeout.
        for mut s in held {
            let mut answer = String::new();
            s.read_to_string(&mut answer).await.unwrap();
            assert!(
                answer.contains("no replica became ready in time"),
                "{answer}"
            );
        }
        assert!(started.elapsed() >= Duration::from_millis(250));
        until(&metrics, |s| s.no_endpoint == 3 && s.waiting == 0).await;

        // A client that gives up while held leaves the queue at once.
        let s = TcpStream::connect(("127.0.0.1", publish)).await.unwrap();
        until(&metrics, |s| s.waiting == 1).await;
        drop(s);
        until(&metrics, |s| s.waiting == 0 && s.no_endpoint == 4).await;
    }

    /// An HTTP/1.1 replica answering every (bodiless) request on a
    /// keep-alive connection with `response`.
    async fn http_server(response: &'static [u8]) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut pending = Vec::new();
                    let mut buf = [0u8; 1024];
                    loop {
                        let n = match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        pending.extend_from_slice(&buf[..n]);
                        while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                            pending.drain(..end + 4);
                            if s.write_all(response).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn replica_responses_and_server_errors_are_counted_per_replica() {
        // Both answers have the same length, so the client can read either.
        const OK: &[u8] =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n";
        const FAILED: &[u8] = b"HTTP/1.1 500 NO\r\nContent-Length: 20\r\n\r\nsomething went wrong";
        assert_eq!(OK.len(), FAILED.len());
        let failing = http_server(FAILED).await;
        let working = http_server(OK).await;
        let metrics = Metrics::default();
        let mut proxy = Proxy::new("127.0.0.1".parse().unwrap(), metrics.clone());
        let publish = refusing_addr().await.port();
        proxy.update(vec![Route {
            service: "web".into(),
            publish,
            port: 0,
            stack: String::new(),
            internal: None,
            slots: Vec::new(),
            http: true,
            endpoints: vec![endpoint("failing", failing), endpoint("working", working)],
            hold_when_empty: false,
        }]);

        let client = async {
            let (mut ok, mut failed) = (0u64, 0u64);
            for connection in 0..20 {
                let mut s = TcpStream::connect(("127.0.0.1", publish)).await.unwrap();
                // One request, then (from the second connection on) a
                // pipelined pair.
                let requests = if connection == 0 { 1 } else { 3 };
                s.write_all(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
                    .await
                    .unwrap();
                if requests == 3 {
                    s.write_all(b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n")
                        .await
                        .unwrap();
                }
                for _ in 0..requests {
                    let mut answer = vec![0u8; OK.len()];
                    s.read_exact(&mut answer).await.unwrap();
                    if answer == OK {
                        ok += 1;
                    } else {
                        assert_eq!(answer, FAILED);
                        failed += 1;
                    }
                }
            }
            (ok, failed)
        };
        let (ok, failed) = tokio::time::timeout(Duration::from_secs(10), client)
            .await
            .expect("requests through the proxy are answered in time");
        assert_eq!(ok + failed, 1 + 19 * 3);

        // Open connections to replicas drop to zero once the copies end.
        let replicas = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                let replicas = metrics.samples()[0].replicas.clone();
                if replicas.iter().all(|r| r.active == 0) {
                    return replicas;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("connections to replicas close");
        let [failing, working] = &replicas[..] else {
            panic!("two replicas: {replicas:?}");
        };
        assert_eq!(failing.alloc_id, "failing");
        assert_eq!((failing.responses, failing.errors), (failed, failed));
        assert_eq!((working.responses, working.errors), (ok, 0));
        assert_eq!(failing.connections + working.connections, 20);
        assert_eq!(failing.connect_failures + working.connect_failures, 0);
        assert_eq!(metrics.samples()[0].requests, ok + failed);
    }
}
