//! Health checks: what to probe (HTTP, TCP, exec), the probes that need no
//! runtime (HTTP GET and TCP connect), and the pure bookkeeping that turns
//! probe results into healthy / unhealthy transitions with Docker's
//! semantics (start period, consecutive failures).

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_RETRIES: u32 = 3;

/// What a check probes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind")]
pub enum Probe {
    /// GET `path`; 2xx and 3xx are healthy.
    Http { path: String },
    /// A TCP connect.
    Tcp,
    /// A command run inside the replica; exit status 0 is healthy.
    Exec { command: Vec<String> },
}

/// A check with its timing; durations are never zero.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthCheck {
    pub probe: Probe,
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive failures that make the replica unhealthy.
    pub retries: u32,
    /// Failures in this time after the start do not count.
    pub start_period: Duration,
}

impl HealthCheck {
    /// A check from optional timings, filling Docker's defaults.
    pub fn new(
        probe: Probe,
        interval: Option<Duration>,
        timeout: Option<Duration>,
        retries: Option<u32>,
        start_period: Option<Duration>,
    ) -> Self {
        let nonzero = |d: Option<Duration>| d.filter(|d| !d.is_zero());
        Self {
            probe,
            interval: nonzero(interval).unwrap_or(DEFAULT_INTERVAL),
            timeout: nonzero(timeout).unwrap_or(DEFAULT_TIMEOUT),
            retries: retries.filter(|r| *r != 0).unwrap_or(DEFAULT_RETRIES),
            start_period: start_period.unwrap_or_default(),
        }
    }
}

/// A change of the replica's health worth reporting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    Healthy,
    /// Failed `retries` times in a row; the last failure's reason.
    Unhealthy(String),
}

/// Counts consecutive failures the way Docker does.
#[derive(Debug, Clone)]
pub struct HealthTracker {
    retries: u32,
    start_period: Duration,
    failures: u32,
    healthy: bool,
}

impl HealthTracker {
    pub fn new(check: &HealthCheck) -> Self {
        Self {
            retries: check.retries.max(1),
            start_period: check.start_period,
            failures: 0,
            healthy: false,
        }
    }

    /// Records one probe result, `since_start` after the replica started.
    pub fn record(
        &mut self,
        result: Result<(), String>,
        since_start: Duration,
    ) -> Option<Transition> {
        match result {
            Ok(()) => {
                self.failures = 0;
                if self.healthy {
                    None
                } else {
                    self.healthy = true;
                    Some(Transition::Healthy)
                }
            }
            // Docker: failures in the start period do not count until the
            // first success.
            Err(_) if !self.healthy && since_start < self.start_period => None,
            Err(reason) => {
                self.failures += 1;
                if self.failures >= self.retries {
                    self.failures = 0;
                    self.healthy = false;
                    Some(Transition::Unhealthy(reason))
                } else {
                    None
                }
            }
        }
    }
}

/// A TCP connect to `addr` within `timeout`.
pub async fn probe_tcp(addr: SocketAddr, timeout: Duration) -> Result<(), String> {
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("tcp connect to {addr}: {e}")),
        Err(_) => Err(format!("tcp connect to {addr} timed out after {timeout:?}")),
    }
}

/// `GET path` over HTTP/1.0 within `timeout`; 2xx and 3xx are healthy.
pub async fn probe_http(addr: SocketAddr, path: &str, timeout: Duration) -> Result<(), String> {
    let attempt = async {
        let mut stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("GET http://{addr}{path}: {e}"))?;
        let request =
            format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nUser-Agent: skiff-health\r\nConnection: close\r\n\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("GET http://{addr}{path}: {e}"))?;
        // The status line is all we need; read a bounded prefix.
        let mut buf = vec![0u8; 256];
        let mut len = 0;
        while len < buf.len() && !buf[..len].contains(&b'\n') {
            let n = stream
                .read(&mut buf[len..])
                .await
                .map_err(|e| format!("GET http://{addr}{path}: {e}"))?;
            if n == 0 {
                break;
            }
            len += n;
        }
        let status = parse_status(&buf[..len])
            .ok_or_else(|| format!("GET http://{addr}{path}: no HTTP status line in the answer"))?;
        if (200..400).contains(&status) {
            Ok(())
        } else {
            Err(format!("GET http://{addr}{path}: status {status}"))
        }
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "GET http://{addr}{path} timed out after {timeout:?}"
            ))
        })
}

fn parse_status(answer: &[u8]) -> Option<u16> {
    let line = std::str::from_utf8(answer).ok()?.lines().next()?;
    let mut parts = line.split_whitespace();
    parts.next().filter(|v| v.starts_with("HTTP/"))?;
    parts.next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    fn check(retries: u32, start_period: u64) -> HealthCheck {
        HealthCheck::new(
            Probe::Tcp,
            None,
            None,
            Some(retries),
            Some(Duration::from_secs(start_period)),
        )
    }

    const FAIL: fn() -> Result<(), String> = || Err("refused".into());

    #[test]
    fn defaults_follow_docker() {
        let c = HealthCheck::new(Probe::Tcp, Some(Duration::ZERO), None, Some(0), None);
        assert_eq!(
            (c.interval, c.timeout, c.retries, c.start_period),
            (DEFAULT_INTERVAL, DEFAULT_TIMEOUT, 3, Duration::ZERO)
        );
    }

    #[test]
    fn replica_turns_unhealthy_after_retries_consecutive_failures() {
        let mut t = HealthTracker::new(&check(3, 0));
        let s = Duration::from_secs(100);
        assert_eq!(t.record(Ok(()), s), Some(Transition::Healthy));
        assert_eq!(t.record(Ok(()), s), None);
        assert_eq!(t.record(FAIL(), s), None);
        assert_eq!(t.record(FAIL(), s), None);
        assert_eq!(t.record(Ok(()), s), None, "a success resets the count");
        assert_eq!(t.record(FAIL(), s), None);
        assert_eq!(t.record(FAIL(), s), None);
        assert_eq!(
            t.record(FAIL(), s),
            Some(Transition::Unhealthy("refused".into()))
        );
    }

    #[test]
    fn failures_in_the_start_period_do_not_count() {
        let mut t = HealthTracker::new(&check(1, 30));
        assert_eq!(t.record(FAIL(), Duration::from_secs(5)), None);
        assert_eq!(t.record(FAIL(), Duration::from_secs(29)), None);
        assert_eq!(
            t.record(FAIL(), Duration::from_secs(31)),
            Some(Transition::Unhealthy("refused".into()))
        );
    }

    #[test]
    fn status_lines_parse() {
        assert_eq!(parse_status(b"HTTP/1.0 200 OK\r\n"), Some(200));
        assert_eq!(
            parse_status(b"HTTP/1.1 302 Found\r\nLocation: /"),
            Some(302)
        );
        assert_eq!(parse_status(b"garbage"), None);
    }

    async fn serve_once(answer: &'static str) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            if let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 512];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(answer.as_bytes()).await;
            }
        });
        addr
    }

    #[tokio::test]
    async fn http_probe_accepts_2xx_and_3xx_only() {
        let t = Duration::from_secs(5);
        let ok = serve_once("HTTP/1.0 204 No Content\r\n\r\n").await;
        assert_eq!(probe_http(ok, "/", t).await, Ok(()));
        let bad = serve_once("HTTP/1.0 503 Unavailable\r\n\r\n").await;
        let err = probe_http(bad, "/healthz", t).await.unwrap_err();
        assert!(
            err.contains("status 503") && err.contains("/healthz"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn tcp_probe_fails_on_a_closed_port() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        assert_eq!(probe_tcp(addr, Duration::from_secs(5)).await, Ok(()));
        drop(listener);
        assert!(probe_tcp(addr, Duration::from_secs(5)).await.is_err());
    }
}
