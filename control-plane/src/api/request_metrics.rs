//! `skiff_api_request_seconds{method, code}`: how long each gRPC call of a
//! server took to answer, by method and gRPC status, for alerts on slow or
//! failing APIs. Measured to the response head: the whole call for unary
//! methods, the time to the first answer for streams (`Events`, logs).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tonic::body::BoxBody;
use tonic::codegen::http;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The gRPC method (`ListServices`), or `unknown` for a path no
    /// service answers (so a caller cannot add series at will).
    pub method: String,
    /// The gRPC status name (`OK`, `NotFound`, `Unauthenticated`, ...).
    pub code: String,
}

type Durations = Family<RequestLabels, Histogram, fn() -> Histogram>;

/// Times every call of the services it wraps.
#[derive(Clone)]
pub struct RequestMetricsLayer {
    durations: Durations,
}

impl RequestMetricsLayer {
    /// A layer whose histograms are registered in `registry`.
    pub fn new(registry: &mut Registry) -> Self {
        let durations: Durations =
            Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.0005, 2.0, 14)));
        registry.register(
            "skiff_api_request_seconds",
            "gRPC calls answered by this server, to the response head, by method and status.",
            durations.clone(),
        );
        RequestMetricsLayer { durations }
    }
}

impl<S> tower_layer::Layer<S> for RequestMetricsLayer {
    type Service = RequestMetrics<S>;

    fn layer(&self, inner: S) -> RequestMetrics<S> {
        RequestMetrics {
            inner,
            durations: self.durations.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RequestMetrics<S> {
    inner: S,
    durations: Durations,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S> tower_service::Service<http::Request<BoxBody>> for RequestMetrics<S>
where
    S: tower_service::Service<http::Request<BoxBody>, Response = http::Response<BoxBody>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<BoxBody>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let durations = self.durations.clone();
        let method = request
            .uri()
            .path()
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_string();
        Box::pin(async move {
            let started = Instant::now();
            let response = inner.call(request).await?;
            let code = status_of(response.headers());
            let method = if code == tonic::Code::Unimplemented {
                "unknown".to_string()
            } else {
                method
            };
            durations
                .get_or_create(&RequestLabels {
                    method,
                    code: format!("{code:?}"),
                })
                .observe(started.elapsed().as_secs_f64());
            Ok(response)
        })
    }
}

/// The gRPC status of a response head: an error is answered in the head
/// (trailers-only); a head without one starts a successful answer.
fn status_of(headers: &http::HeaderMap) -> tonic::Code {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map_or(tonic::Code::Ok, tonic::Code::from_i32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_is_read_from_the_head_and_ok_without_one() {
        let mut headers = http::HeaderMap::new();
        assert_eq!(status_of(&headers), tonic::Code::Ok);
        headers.insert("grpc-status", http::HeaderValue::from_static("16"));
        assert_eq!(status_of(&headers), tonic::Code::Unauthenticated);
        assert_eq!(format!("{:?}", status_of(&headers)), "Unauthenticated");
    }
}
