//! What each path answers: the embedded assets, `POST /login` and
//! `/logout`, and the JSON/SSE API under `/api/`.

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};

use crate::cluster::{Cluster, Failure};

pub type Body = BoxBody<Bytes, Infallible>;

/// The cookie holding the API token after `POST /login`.
const COOKIE: &str = "skiff_token";
/// The header every write must carry (no cross-site form can set it).
const WRITE_HEADER: &str = "x-skiff-ui";
/// The largest request body read.
const MAX_BODY: usize = 64 * 1024;

/// Only this page's own script and style; no framing.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

pub async fn answer(cluster: &Cluster, secure: bool, request: Request<Incoming>) -> Response<Body> {
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let mut response = route(cluster, secure, request, &method, &path).await;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers
        .entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    response
}

async fn route(
    cluster: &Cluster,
    secure: bool,
    request: Request<Incoming>,
    method: &Method,
    path: &str,
) -> Response<Body> {
    if *method == Method::GET {
        if let Some((content_type, text)) = crate::assets::find(path) {
            return text_response(StatusCode::OK, content_type, text);
        }
    }
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    if *method == Method::POST && !request.headers().contains_key(WRITE_HEADER) {
        return error(StatusCode::FORBIDDEN, "a write needs the X-Skiff-UI header");
    }
    let token = token_of(request.headers());
    match (method, segments.as_slice()) {
        (&Method::POST, ["login"]) => {
            let body = match json_body(request).await {
                Ok(body) => body,
                Err(response) => return response,
            };
            let token = body
                .get("token")
                .and_then(Value::as_str)
                .unwrap_or("")
                .trim();
            match cluster.check(token).await {
                Ok(()) => {
                    let mut response = json_response(StatusCode::OK, &json!({ "ok": true }));
                    set_cookie(&mut response, token, secure);
                    response
                }
                Err(failure) => failure_response(&failure),
            }
        }
        (&Method::POST, ["logout"]) => {
            let mut response = json_response(StatusCode::OK, &json!({ "ok": true }));
            set_cookie(&mut response, "", secure);
            response
        }
        (&Method::GET, ["api", "overview"]) => reply(cluster.overview(&token).await),
        (&Method::GET, ["api", "services", name]) => reply(cluster.service(&token, name).await),
        (&Method::GET, ["api", "services", name, "traffic"]) => {
            // The first read answers now: a refused token gets its status
            // (401, 403, 404) instead of a stream.
            match cluster.service_status(&token, name).await {
                Ok(first) => {
                    let body = crate::traffic::body(
                        cluster.clone(),
                        token.clone(),
                        name.to_string(),
                        first,
                    );
                    event_stream(body)
                }
                Err(failure) => failure_response(&failure),
            }
        }
        (&Method::GET, ["api", "services", name, "logs"]) => {
            let query = request.uri().query().unwrap_or("");
            let replica = query_value(query, "replica");
            let tail = query_value(query, "tail").parse().unwrap_or(50);
            reply(cluster.logs(&token, name, &replica, tail).await)
        }
        (&Method::POST, ["api", "services", name, action]) => {
            let (name, action) = (name.to_string(), action.to_string());
            match json_body(request).await {
                Ok(body) => reply(cluster.service_action(&token, &name, &action, &body).await),
                Err(response) => response,
            }
        }
        (&Method::POST, ["api", "nodes", name, "availability"]) => {
            let name = name.to_string();
            match json_body(request).await {
                Ok(body) => {
                    let availability = body
                        .get("availability")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string();
                    reply(cluster.set_availability(&token, &name, &availability).await)
                }
                Err(response) => response,
            }
        }
        (&Method::GET, ["api", "events"]) => {
            let query = request.uri().query().unwrap_or("");
            let service = query_value(query, "service");
            let node = query_value(query, "node");
            let after = request
                .headers()
                .get("last-event-id")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
                .or_else(|| Some(query_value(query, "after")).filter(|a| !a.is_empty()))
                .and_then(|v| v.trim().parse::<u64>().ok());
            match cluster.events(&token, &service, &node, after).await {
                Ok(stream) => event_stream(crate::events::body(stream)),
                Err(failure) => failure_response(&failure),
            }
        }
        (&Method::GET, _) => error(StatusCode::NOT_FOUND, "not found"),
        _ => error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed"),
    }
}

fn event_stream(body: Body) -> Response<Body> {
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// The token of a request: `Authorization: Bearer T`, else the cookie.
fn token_of(headers: &HeaderMap) -> String {
    if let Some(bearer) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    {
        return bearer.trim().to_string();
    }
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.trim().to_string())
        .unwrap_or_default()
}

fn set_cookie(response: &mut Response<Body>, token: &str, secure: bool) {
    let max_age = if token.is_empty() { "; Max-Age=0" } else { "" };
    let secure = if secure { "; Secure" } else { "" };
    let cookie = format!("{COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict{max_age}{secure}");
    if let Ok(value) = HeaderValue::from_str(&cookie) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
}

/// The value of `key` in a query string (percent-decoded).
fn query_value(query: &str, key: &str) -> String {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| percent_decode(v))
        .unwrap_or_default()
}

fn percent_decode(text: &str) -> String {
    let hex = |b: u8| (b as char).to_digit(16);
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(high), Some(low)) => {
                    out.extend(u8::try_from(high * 16 + low).ok());
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            byte => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn json_body(request: Request<Incoming>) -> Result<Value, Response<Body>> {
    let bytes = Limited::new(request.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| {
            error(
                StatusCode::BAD_REQUEST,
                &format!("failed to read the body: {e}"),
            )
        })?
        .to_bytes();
    if bytes.is_empty() {
        return Ok(json!({}));
    }
    serde_json::from_slice(&bytes)
        .map_err(|e| error(StatusCode::BAD_REQUEST, &format!("invalid JSON body: {e}")))
}

fn reply(result: Result<Value, Failure>) -> Response<Body> {
    match result {
        Ok(value) => json_response(StatusCode::OK, &value),
        Err(failure) => failure_response(&failure),
    }
}

/// The HTTP status of a gRPC one, its message kept.
fn failure_response(failure: &Failure) -> Response<Body> {
    use tonic::Code;
    let status = match failure.code {
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::FailedPrecondition | Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error(status, &failure.message)
}

fn error(status: StatusCode, message: &str) -> Response<Body> {
    json_response(status, &json!({ "error": message }))
}

fn json_response(status: StatusCode, value: &Value) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(value.to_string())).boxed());
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn text_response(
    status: StatusCode,
    content_type: &'static str,
    text: &'static str,
) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from_static(text.as_bytes())).boxed());
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_comes_from_the_bearer_header_or_else_the_cookie() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            HeaderValue::from_static("a=b; skiff_token=skiff_c0ffee"),
        );
        assert_eq!(token_of(&headers), "skiff_c0ffee");
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer skiff_1"),
        );
        assert_eq!(token_of(&headers), "skiff_1");
        assert_eq!(token_of(&HeaderMap::new()), "");
    }

    #[test]
    fn query_values_are_percent_decoded() {
        assert_eq!(query_value("service=web%2D1&node=n+1", "service"), "web-1");
        assert_eq!(query_value("service=web%2D1&node=n+1", "node"), "n 1");
        assert_eq!(query_value("after=5", "node"), "");
        assert_eq!(query_value("x=%4", "x"), "%4");
    }

    #[test]
    fn a_refused_token_maps_to_401_and_a_low_role_to_403() {
        let refused = Failure::no_token();
        assert_eq!(
            failure_response(&refused).status(),
            StatusCode::UNAUTHORIZED
        );
        let low = Failure::from(tonic::Status::permission_denied("read-only"));
        assert_eq!(failure_response(&low).status(), StatusCode::FORBIDDEN);
    }
}
