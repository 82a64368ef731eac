//! The routing proxy's traffic counters per published service on this node,
//! their Prometheus text rendering, and the agent's `GET /metrics` endpoint.
//!
//! Counters only grow for the agent's lifetime (also after a service is
//! removed), as Prometheus expects of a counter.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The variable where an agent publishes its metrics address (`HOST:PORT`).
pub fn address_key(node: &str) -> String {
    format!("_skiff/nodes/{node}/metrics")
}

/// The counters of one published service's proxy on this node.
#[derive(Debug, Default)]
pub struct ServiceCounters {
    pub connections: AtomicU64,
    pub active: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub connect_failures: AtomicU64,
    pub no_endpoint: AtomicU64,
    pub requests: AtomicU64,
    /// Endpoints in the pool now (a gauge).
    pub endpoints: AtomicU64,
}

/// A point-in-time copy of one service's counters.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TrafficSample {
    pub service: String,
    pub connections: u64,
    pub active: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub connect_failures: u64,
    pub no_endpoint: u64,
    pub requests: u64,
    pub endpoints: u64,
}

/// Every service's counters, shared by the proxy (writers), the sync loop
/// (traffic reports) and the metrics endpoint.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    services: Arc<Mutex<BTreeMap<String, Arc<ServiceCounters>>>>,
}

impl Metrics {
    /// The counters of `service`, created at zero on first use.
    pub fn service(&self, service: &str) -> Arc<ServiceCounters> {
        let mut services = self.services.lock().unwrap_or_else(|p| p.into_inner());
        services.entry(service.to_string()).or_default().clone()
    }

    pub fn samples(&self) -> Vec<TrafficSample> {
        let services = self.services.lock().unwrap_or_else(|p| p.into_inner());
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        services
            .iter()
            .map(|(service, c)| TrafficSample {
                service: service.clone(),
                connections: get(&c.connections),
                active: get(&c.active),
                bytes_in: get(&c.bytes_in),
                bytes_out: get(&c.bytes_out),
                connect_failures: get(&c.connect_failures),
                no_endpoint: get(&c.no_endpoint),
                requests: get(&c.requests),
                endpoints: get(&c.endpoints),
            })
            .collect()
    }

    /// Prometheus text exposition format (version 0.0.4).
    pub fn render(&self, node: &str) -> String {
        let samples = self.samples();
        let families: [Family; 8] = [
            (
                "skiff_proxy_connections_total",
                "counter",
                "Client connections accepted on the published port.",
                |s| s.connections,
            ),
            (
                "skiff_proxy_active_connections",
                "gauge",
                "Client connections open now.",
                |s| s.active,
            ),
            (
                "skiff_proxy_received_bytes_total",
                "counter",
                "Bytes received from clients and forwarded to replicas.",
                |s| s.bytes_in,
            ),
            (
                "skiff_proxy_sent_bytes_total",
                "counter",
                "Bytes from replicas sent to clients.",
                |s| s.bytes_out,
            ),
            (
                "skiff_proxy_connect_failures_total",
                "counter",
                "Failed dials of a replica (each retried on another one).",
                |s| s.connect_failures,
            ),
            (
                "skiff_proxy_no_endpoint_total",
                "counter",
                "Connections closed at once because no replica was serving.",
                |s| s.no_endpoint,
            ),
            (
                "skiff_proxy_http_requests_total",
                "counter",
                "HTTP/1.1 requests seen on services published with --protocol http.",
                |s| s.requests,
            ),
            (
                "skiff_proxy_endpoints",
                "gauge",
                "Replicas in the proxy's pool.",
                |s| s.endpoints,
            ),
        ];
        let mut out = String::new();
        let node = escape(node);
        for (name, kind, help, value) in families {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for s in &samples {
                let _ = writeln!(
                    out,
                    "{name}{{service=\"{}\",node=\"{node}\"}} {}",
                    escape(&s.service),
                    value(s)
                );
            }
        }
        out
    }
}

/// A metric family: name, type, help, and how to read it from a sample.
type Family = (
    &'static str,
    &'static str,
    &'static str,
    fn(&TrafficSample) -> u64,
);

/// Escapes a label value (backslash, double quote, newline).
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// How long a metrics client may take to send its request head.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request head read.
const MAX_HEAD: usize = 8192;

/// Serves `GET /metrics` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    metrics: Metrics,
    node: String,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let metrics = metrics.clone();
                    let node = node.clone();
                    tokio::spawn(async move {
                        let _ = tokio::time::timeout(REQUEST_TIMEOUT, answer(stream, &metrics, &node)).await;
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "metrics listener failed to accept");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
}

async fn answer(mut stream: TcpStream, metrics: &Metrics, node: &str) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_HEAD {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    let (method, path) = (parts.next(), parts.next());
    let (status, body) = match (method, path) {
        (Some(b"GET"), Some(p)) if p == b"/metrics" || p.starts_with(b"/metrics?") => {
            ("200 OK", metrics.render(node))
        }
        (Some(b"GET"), _) => ("404 Not Found", "not found; try GET /metrics\n".to_string()),
        _ => ("405 Method Not Allowed", "use GET /metrics\n".to_string()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_has_help_type_and_one_sample_per_service() {
        let m = Metrics::default();
        m.service("web").connections.fetch_add(3, Ordering::Relaxed);
        m.service("api\"x").requests.fetch_add(2, Ordering::Relaxed);
        let text = m.render("n1");
        assert!(text.contains("# TYPE skiff_proxy_connections_total counter"));
        assert!(text.contains("skiff_proxy_connections_total{service=\"web\",node=\"n1\"} 3"));
        assert!(
            text.contains("skiff_proxy_http_requests_total{service=\"api\\\"x\",node=\"n1\"} 2")
        );
        let samples = text.lines().filter(|l| !l.starts_with('#')).count();
        assert_eq!(samples, 16);
    }

    #[tokio::test]
    async fn get_metrics_answers_prometheus_text() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let m = Metrics::default();
        m.service("web").bytes_in.fetch_add(10, Ordering::Relaxed);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, m, "n1".into(), async {
            let _ = stopped.await;
        }));
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 200 OK"));
        assert!(out.contains("skiff_proxy_received_bytes_total{service=\"web\",node=\"n1\"} 10"));
        let _ = stop.send(());
        server.await.unwrap();
    }
}
