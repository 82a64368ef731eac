//! Skiff's metrics endpoint, shared by servers and agents: a small HTTP/1.1
//! server (hyper) answering `GET /metrics` with a `prometheus-client`
//! registry in Prometheus' text format (0.0.4), `skiff_build_info`, the
//! `process_*` metrics of this process, and the documented default ports.

mod process;

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

pub use process::ProcessCollector;

/// Where a server serves `/metrics` unless told otherwise (on the host of
/// its API address; `--metrics-listen` chooses another).
pub const DEFAULT_SERVER_PORT: u16 = 9464;
/// Where an agent serves `/metrics` unless told otherwise (on its advertise
/// address; `--metrics-listen` chooses another).
pub const DEFAULT_AGENT_PORT: u16 = 9465;

/// The content type of [`prometheus_client::encoding::prometheus_text`].
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// How long a client may take to send its request head.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// The build's version and commit (from `SKIFF_COMMIT` or `git` at build
/// time; "unknown" outside a checkout).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
pub const COMMIT: &str = env!("SKIFF_COMMIT");

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
    commit: &'static str,
}

/// A registry holding what every Skiff process exports:
/// `skiff_build_info{version,commit} 1`, the `process_*` metrics and the
/// size and free space of the filesystem holding `data_dir`.
pub fn registry(data_dir: &std::path::Path) -> Registry {
    let mut registry = Registry::default();
    let build: Family<BuildLabels, Gauge> = Family::default();
    build
        .get_or_create(&BuildLabels {
            version: VERSION,
            commit: COMMIT,
        })
        .set(1);
    registry.register(
        "skiff_build_info",
        "Always 1; the labels say which build runs.",
        build,
    );
    registry.register_collector(Box::new(ProcessCollector));
    registry.register_collector(Box::new(process::DiskCollector {
        path: data_dir.to_path_buf(),
    }));
    registry
}

/// The registry in Prometheus' text format.
pub fn render(registry: &Registry) -> String {
    let mut out = String::with_capacity(4096);
    // Writing to a String fails only if a collector fails; what was
    // written so far is still served.
    if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut out, registry) {
        tracing::warn!(error = %e, "failed to encode metrics");
    }
    out
}

/// Serves `GET /metrics` (the registry, encoded at each scrape) on
/// `listener` until `shutdown` resolves; connections in flight are left
/// to finish on their own.
pub async fn serve(
    listener: TcpListener,
    registry: Arc<Registry>,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => return,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "metrics listener failed to accept");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let registry = registry.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let registry = registry.clone();
                async move { Ok::<_, Infallible>(answer(&request, &registry)) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "metrics connection ended with an error");
            }
        });
    }
}

fn answer(request: &Request<Incoming>, registry: &Registry) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match (request.method(), request.uri().path()) {
        (&Method::GET, "/metrics") => (StatusCode::OK, CONTENT_TYPE, render(registry)),
        (&Method::GET, _) => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found; try GET /metrics\n".to_string(),
        ),
        _ => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "use GET /metrics\n".to_string(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = hyper::header::HeaderValue::from_str(content_type) {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}

/// Binds `wanted`; if that is the default port and it is taken (several
/// servers or agents on one machine), any free port on the same host,
/// said in a warning. An explicitly chosen address must be free.
pub async fn bind(wanted: std::net::SocketAddr, explicit: bool) -> std::io::Result<TcpListener> {
    match TcpListener::bind(wanted).await {
        Ok(listener) => Ok(listener),
        Err(e) if !explicit && e.kind() == std::io::ErrorKind::AddrInUse => {
            let listener = TcpListener::bind((wanted.ip(), 0)).await?;
            tracing::warn!(
                wanted = %wanted,
                chosen = ?listener.local_addr().ok(),
                "the default metrics port is taken; serving metrics on another (choose one with --metrics-listen)"
            );
            Ok(listener)
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn registry_has_build_info_and_process_metrics() {
        let text = render(&registry(std::path::Path::new("/")));
        assert!(text.contains("skiff_data_dir_free_bytes "));
        assert!(text.contains("# TYPE skiff_build_info gauge\n"), "{text}");
        assert!(text.contains(&format!(
            "skiff_build_info{{version=\"{VERSION}\",commit=\"{COMMIT}\"}} 1\n"
        )));
        assert!(text.contains("# TYPE process_cpu_seconds_total counter\n"));
        assert!(text.contains("process_resident_memory_bytes "));
        assert!(text.contains("process_open_fds "));
    }

    #[tokio::test]
    async fn get_metrics_answers_prometheus_text_and_other_paths_404() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(
            listener,
            Arc::new(registry(std::path::Path::new("/"))),
            async {
                let _ = stopped.await;
            },
        ));
        let get = |path: &'static str| async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            s.write_all(request.as_bytes()).await.unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        let ok = get("/metrics").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK"), "{ok}");
        assert!(
            ok.contains("content-type: text/plain; version=0.0.4"),
            "{ok}"
        );
        assert!(ok.contains("skiff_build_info{"));
        assert!(get("/").await.starts_with("HTTP/1.1 404"));
        let _ = stop.send(());
        server.await.unwrap();
    }

    #[tokio::test]
    async fn a_taken_default_port_falls_back_to_a_free_one_but_an_explicit_one_fails() {
        let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = taken.local_addr().unwrap();
        let other = bind(addr, false).await.unwrap();
        assert_ne!(other.local_addr().unwrap().port(), addr.port());
        assert!(bind(addr, true).await.is_err());
    }
}
