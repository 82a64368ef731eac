//! The routing proxy: for every published service, a TCP listener on this
//! node's advertise address and published port that forwards each client
//! connection to a serving replica anywhere in the cluster (node address +
//! host port), as the control plane's `Endpoints` list them.
//!
//! A replica is chosen by the power of two choices over the connections
//! this proxy has open to each (random tie-break). A dial that fails is
//! retried on another replica before any client byte is read, so it is
//! safe for any protocol. Bytes flow through `copy_bidirectional` with its
//! two fixed buffers per connection; nothing is allocated per byte.

pub mod http;

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use rand::Rng;
use skiff_proto::v1 as pb;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinHandle;

use crate::metrics::{Metrics, ServiceCounters};
use http::RequestCounter;

/// How long one dial of a replica may take before the next is tried.
const DIAL_TIMEOUT: Duration = Duration::from_secs(2);
/// Most dials for one client connection.
const MAX_DIALS: usize = 8;

/// One published service as the proxy routes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub service: String,
    pub publish: u16,
    /// Count HTTP/1.1 requests.
    pub http: bool,
    pub endpoints: Vec<Endpoint>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub alloc_id: String,
    pub addr: SocketAddr,
}

/// The routes an `Endpoints` message describes; endpoints with an address
/// that does not parse, and services with port 0, are skipped (logged).
pub fn routes_from_pb(endpoints: &pb::Endpoints) -> Vec<Route> {
    endpoints
        .services
        .iter()
        .filter_map(|s| {
            let publish = u16::try_from(s.publish).ok().filter(|p| *p != 0)?;
            let endpoints = s
                .endpoints
                .iter()
                .filter_map(|e| {
                    let ip: IpAddr = e.address.parse().ok()?;
                    let port = u16::try_from(e.port).ok().filter(|p| *p != 0)?;
                    Some(Endpoint {
                        alloc_id: e.alloc_id.clone(),
                        addr: SocketAddr::new(ip, port),
                    })
                })
                .collect::<Vec<_>>();
            if endpoints.len() != s.endpoints.len() {
                tracing::warn!(service = %s.service, "skipped endpoints with an invalid address");
            }
            Some(Route {
                service: s.service.clone(),
                publish,
                http: s.protocol == "http",
                endpoints,
            })
        })
        .collect()
}

/// A replica in a pool, with the connections this proxy has open to it.
#[derive(Debug)]
struct Backend {
    alloc_id: String,
    addr: SocketAddr,
    active: AtomicU64,
}

/// The replicas of one service; replaced wholesale on every update while
/// connections keep the `Backend` they dialled.
struct Pool {
    backends: RwLock<Arc<[Arc<Backend>]>>,
    http: bool,
    counters: Arc<ServiceCounters>,
}

impl Pool {
    fn snapshot(&self) -> Arc<[Arc<Backend>]> {
        self.backends
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Replaces the endpoints, keeping the `Backend` (and its count) of
    /// every replica that stays.
    fn set(&self, endpoints: &[Endpoint]) {
        let mut backends = self.backends.write().unwrap_or_else(|p| p.into_inner());
        let next: Vec<Arc<Backend>> = endpoints
            .iter()
            .map(|e| {
                backends
                    .iter()
                    .find(|b| b.alloc_id == e.alloc_id && b.addr == e.addr)
                    .cloned()
                    .unwrap_or_else(|| {
                        Arc::new(Backend {
                            alloc_id: e.alloc_id.clone(),
                            addr: e.addr,
                            active: AtomicU64::new(0),
                        })
                    })
            })
            .collect();
        self.counters
            .endpoints
            .store(next.len() as u64, Ordering::Relaxed);
        *backends = next.into();
    }
}

struct Listener {
    publish: u16,
    pool: Arc<Pool>,
    task: JoinHandle<()>,
}

/// Every published service's listener on this node.
pub struct Proxy {
    bind: IpAddr,
    metrics: Metrics,
    listeners: HashMap<String, Listener>,
    /// The last routes, applied again by [`Proxy::retry`] for listeners
    /// that could not bind.
    routes: Vec<Route>,
}

impl Proxy {
    pub fn new(bind: IpAddr, metrics: Metrics) -> Self {
        Self {
            bind,
            metrics,
            listeners: HashMap::new(),
            routes: Vec::new(),
        }
    }

    /// Makes the listeners and pools match `routes`: new services get a
    /// listener, removed ones lose it (their open connections carry on).
    pub fn update(&mut self, routes: Vec<Route>) {
        self.listeners.retain(|service, listener| {
            let keep = routes
                .iter()
                .any(|r| &r.service == service && r.publish == listener.publish);
            if !keep {
                tracing::info!(%service, port = listener.publish, "routing proxy stops listening");
                listener.task.abort();
                listener.pool.counters.endpoints.store(0, Ordering::Relaxed);
            }
            keep
        });
        for route in &routes {
            if let Some(listener) = self.listeners.get(&route.service) {
                listener.pool.set(&route.endpoints);
                continue;
            }
            let addr = SocketAddr::new(self.bind, route.publish);
            let listener = match bind(addr) {
                Ok(listener) => listener,
                Err(e) => {
                    tracing::warn!(service = %route.service, %addr, error = %e, "routing proxy failed to listen; retrying");
                    continue;
                }
            };
            let pool = Arc::new(Pool {
                backends: RwLock::new(Arc::from(Vec::new())),
                http: route.http,
                counters: self.metrics.service(&route.service),
            });
            pool.set(&route.endpoints);
            tracing::info!(service = %route.service, %addr, endpoints = route.endpoints.len(), "routing proxy listening");
            let task = tokio::spawn(accept_loop(listener, pool.clone()));
            self.listeners.insert(
                route.service.clone(),
                Listener {
                    publish: route.publish,
                    pool,
                    task,
                },
            );
        }
        self.routes = routes;
    }

    /// Tries again to listen where binding failed.
    pub fn retry(&mut self) {
        if self.routes.len() != self.listeners.len() {
            self.update(self.routes.clone());
        }
    }

    /// Stops every listener (open connections carry on until they end).
    pub fn shutdown(&mut self) {
        for (_, listener) in self.listeners.drain() {
            listener.task.abort();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shutdown();
    }
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

async fn forward(client: TcpStream, pool: Arc<Pool>) {
    let counters = pool.counters.clone();
    counters.connections.fetch_add(1, Ordering::Relaxed);
    let _active = Gauge::up(&counters.active);
    let mut tried = Vec::new();
    let Some((mut backend, mut upstream)) = dial(&pool, &mut tried).await else {
        counters.no_endpoint.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let _ = client.set_nodelay(true);
    let mut client = Counted {
        inner: client,
        counters: &counters,
        requests: pool.http.then(RequestCounter::default),
    };
    if pool.http {
        match first_exchange(&mut client, &pool, &mut tried, backend, upstream).await {
            Some((answered_by, stream)) => (backend, upstream) = (answered_by, stream),
            None => return,
        }
    }
    let _backend_active = Gauge::up(&backend.active);
    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        tracing::trace!(alloc = %backend.alloc_id, error = %e, "proxied connection ended with an error");
    }
}

/// Largest first request the proxy keeps for a replay.
const REPLAY_BYTES: usize = 16 * 1024;

/// For HTTP services: forwards the client's first request and waits for
/// the replica's first byte. A replica that closes or resets the
/// connection before answering anything (it died between the dial and the
/// request: a killed process's socket accepts for a moment) gets the
/// request replayed on another replica — only for a complete, bodiless
/// request with an idempotent method, which the dead replica cannot have
/// half-applied. Returns the replica that answered, its first bytes
/// already sent on to the client.
async fn first_exchange(
    client: &mut Counted<'_>,
    pool: &Pool,
    tried: &mut Vec<Arc<Backend>>,
    mut backend: Arc<Backend>,
    mut upstream: TcpStream,
) -> Option<(Arc<Backend>, TcpStream)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut request = vec![0u8; REPLAY_BYTES];
    let n = client.read(&mut request).await.ok()?;
    if n == 0 {
        return None;
    }
    request.truncate(n);
    let replayable = http::is_replayable(&request);
    let mut answer = [0u8; 4096];
    loop {
        let _ = upstream.set_nodelay(true);
        let got = match upstream.write_all(&request).await {
            Ok(()) => upstream.read(&mut answer).await.unwrap_or(0),
            Err(_) => 0,
        };
        if got > 0 {
            client.write_all(&answer[..got]).await.ok()?;
            return Some((backend, upstream));
        }
        if !replayable {
            return None;
        }
        tracing::debug!(alloc = %backend.alloc_id, "replica closed before answering; replaying the request on another");
        pool.counters
            .connect_failures
            .fetch_add(1, Ordering::Relaxed);
        (backend, upstream) = dial(pool, tried).await?;
    }
}

/// Dials replicas until one accepts: nothing has been read from the client
/// yet, so a refused or timed-out dial is retried on another replica.
/// Replicas in `tried` are skipped, and every one dialed is added to it.
async fn dial(pool: &Pool, tried: &mut Vec<Arc<Backend>>) -> Option<(Arc<Backend>, TcpStream)> {
    while tried.len() < MAX_DIALS {
        let backends = pool.snapshot();
        let backend = choose(&backends, tried)?;
        tried.push(backend.clone());
        match tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(backend.addr)).await {
            Ok(Ok(stream)) => return Some((backend, stream)),
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
    }
    None
}

/// Power of two choices among the replicas not yet tried: two distinct
/// random ones, the one with fewer open connections wins (the first drawn
/// on a tie, which is itself random).
fn choose(backends: &[Arc<Backend>], tried: &[Arc<Backend>]) -> Option<Arc<Backend>> {
    let untried = |b: &&Arc<Backend>| !tried.iter().any(|t| Arc::ptr_eq(t, b));
    let n = backends.iter().filter(untried).count();
    let nth = |i: usize| backends.iter().filter(untried).nth(i).cloned();
    match n {
        0 => None,
        1 => nth(0),
        _ => {
            let mut rng = rand::thread_rng();
            let i = rng.gen_range(0..n);
            let mut j = rng.gen_range(0..n - 1);
            if j >= i {
                j += 1;
            }
            let (a, b) = (nth(i)?, nth(j)?);
            if b.active.load(Ordering::Relaxed) < a.active.load(Ordering::Relaxed) {
                Some(b)
            } else {
                Some(a)
            }
        }
    }
}

/// The client side of a proxied connection, counting bytes both ways and,
/// for HTTP services, the requests in what the client sends.
struct Counted<'a> {
    inner: TcpStream,
    counters: &'a ServiceCounters,
    requests: Option<RequestCounter>,
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
                this.counters
                    .bytes_in
                    .fetch_add(new.len() as u64, Ordering::Relaxed);
                if let Some(counter) = &mut this.requests {
                    let started = counter.feed(new);
                    if started > 0 {
                        this.counters.requests.fetch_add(started, Ordering::Relaxed);
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
            this.counters
                .bytes_out
                .fetch_add(n as u64, Ordering::Relaxed);
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
        Arc::new(Backend {
            alloc_id: id.into(),
            addr: "127.0.0.1:1".parse().unwrap(),
            active: AtomicU64::new(active),
        })
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
            http: true,
            endpoints: vec![
                Endpoint {
                    alloc_id: "bad".into(),
                    addr: bad,
                },
                Endpoint {
                    alloc_id: "good".into(),
                    addr: good,
                },
            ],
        }]);
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

        proxy.update(vec![Route {
            service: "web".into(),
            publish,
            http: true,
            endpoints: vec![],
        }]);
        let mut s = TcpStream::connect(("127.0.0.1", publish)).await.unwrap();
        let mut buf = [0u8; 1];
        assert_eq!(s.read(&mut buf).await.unwrap(), 0, "closed at once");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(metrics.samples()[0].no_endpoint, 1);
    }
}
