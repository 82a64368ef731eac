//! `GET /api/services/NAME/traffic`: a service's traffic as server-sent
//! events, one sample every [`EVERY`], for the service page's charts.
//!
//! The routing proxies report to the servers every ~2 s (`ServiceStatus.
//! traffic`, one report per node); this stream reads `GetService` with the
//! user's token at the same pace and sends one sample of the whole
//! service: its request rate (the sum over nodes), its error rate (the 5xx
//! among the responses since the previous sample, over every replica), its
//! open connections and the connections refused or failed since then. The
//! browser keeps the last five minutes; nothing is kept here beyond the
//! previous totals of this stream.

use std::convert::Infallible;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use serde_json::{json, Value};
use skiff_proto::v1 as pb;
use tokio_stream::StreamExt;

use crate::cluster::Cluster;
use crate::routes::Body;

/// How often a sample is sent (the agents report about as often).
pub const EVERY: Duration = Duration::from_secs(2);
/// A node's report older than this is of a proxy that stopped reporting:
/// its rate and open connections no longer count.
const STALE_MS: u64 = 10_000;

/// What the proxies' latest reports add up to for one service.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Totals {
    /// Requests per second (the sum of the nodes' latest rates).
    pub request_rate: f64,
    /// Connections open now.
    pub active: u64,
    /// HTTP responses and those with a 5xx status, over every replica
    /// (totals since each agent started).
    pub responses: u64,
    pub errors: u64,
    /// Connections closed at once for want of a replica, and failed dials.
    pub no_endpoint: u64,
    pub connect_failures: u64,
}

impl Totals {
    pub fn of(traffic: &[pb::ServiceTraffic]) -> Totals {
        let mut totals = Totals::default();
        for report in traffic {
            if report.age_ms <= STALE_MS {
                totals.request_rate += report.request_rate.max(0.0);
                totals.active += report.active;
            }
            totals.no_endpoint += report.no_endpoint;
            totals.connect_failures += report.connect_failures;
            for endpoint in &report.endpoints {
                totals.responses += endpoint.responses;
                totals.errors += endpoint.errors;
            }
        }
        totals
    }
}

/// The percent of the responses since `before` that were 5xx; `None` when
/// there were none (no rate to speak of). A total that went down (an agent
/// restarted, a node's report gone) counts as no change.
pub fn error_rate(before: &Totals, now: &Totals) -> Option<f64> {
    let responses = now.responses.saturating_sub(before.responses);
    if responses == 0 {
        return None;
    }
    let errors = now.errors.saturating_sub(before.errors).min(responses);
    Some(100.0 * errors as f64 / responses as f64)
}

/// One sample: `now` against the previous totals (`None` for the first).
pub fn sample(
    before: Option<&Totals>,
    now: &Totals,
    time_ms: u64,
    max_error_rate: Option<u32>,
) -> Value {
    let delta = |f: fn(&Totals) -> u64| before.map_or(0, |b| f(now).saturating_sub(f(b)));
    let rate = (now.request_rate * 100.0).round() / 100.0;
    json!({
        "time_ms": time_ms,
        "request_rate": rate,
        "error_rate": before.and_then(|b| error_rate(b, now)),
        "responses": delta(|t| t.responses),
        "errors": delta(|t| t.errors),
        "active": now.active,
        "no_endpoint": delta(|t| t.no_endpoint),
        "connect_failures": delta(|t| t.connect_failures),
        "max_error_rate": max_error_rate,
    })
}

fn max_error_rate(status: &pb::ServiceStatus) -> Option<u32> {
    status
        .spec
        .as_ref()
        .and_then(|s| s.update.as_ref())
        .and_then(|u| u.max_error_rate)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn frame(sample: &Value) -> Bytes {
    Bytes::from(format!("event: sample\ndata: {sample}\n\n"))
}

/// The stream of `name`'s samples, starting from `first` (the answer that
/// showed the token may read the service), until the browser leaves or a
/// read is refused.
pub fn body(cluster: Cluster, token: String, name: String, first: pb::ServiceStatus) -> Body {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(16);
    tokio::spawn(async move {
        let mut before = Totals::of(&first.traffic);
        let opening = sample(None, &before, now_ms(), max_error_rate(&first));
        if tx
            .send(Bytes::from_static(b"retry: 2000\n\n"))
            .await
            .is_err()
            || tx.send(frame(&opening)).await.is_err()
        {
            return;
        }
        let mut tick = tokio::time::interval(EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = tx.closed() => return,
            }
            let bytes = match cluster.service_status(&token, &name).await {
                Ok(status) => {
                    let now = Totals::of(&status.traffic);
                    let value = sample(Some(&before), &now, now_ms(), max_error_rate(&status));
                    before = now;
                    frame(&value)
                }
                Err(failure) => {
                    let data = json!({ "error": failure.message });
                    let _ = tx
                        .send(Bytes::from(format!("event: failure\ndata: {data}\n\n")))
                        .await;
                    return;
                }
            };
            if tx.send(bytes).await.is_err() {
                return;
            }
        }
    });
    let frames = tokio_stream::wrappers::ReceiverStream::new(rx)
        .map(|bytes| Ok::<_, Infallible>(Frame::data(bytes)));
    StreamBody::new(frames).boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(node: &str, rate: f64, endpoints: &[(u64, u64)]) -> pb::ServiceTraffic {
        pb::ServiceTraffic {
            node: node.into(),
            request_rate: rate,
            active: 2,
            no_endpoint: 1,
            endpoints: endpoints
                .iter()
                .map(|&(responses, errors)| pb::EndpointTraffic {
                    responses,
                    errors,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn the_error_rate_is_the_new_5xx_over_the_new_responses_of_every_replica() {
        let before = Totals::of(&[
            report("n1", 10.0, &[(100, 1), (50, 0)]),
            report("n2", 5.0, &[(20, 0)]),
        ]);
        assert_eq!(before.responses, 170);
        assert_eq!(before.errors, 1);
        assert!((before.request_rate - 15.0).abs() < 1e-9);
        // 40 new responses, 10 of them 5xx: 25 %.
        let now = Totals::of(&[
            report("n1", 12.0, &[(120, 6), (60, 0)]),
            report("n2", 4.0, &[(30, 5)]),
        ]);
        assert_eq!(error_rate(&before, &now), Some(25.0));
        let s = sample(Some(&before), &now, 7, Some(5));
        assert_eq!(s["error_rate"], 25.0);
        assert_eq!(s["responses"], 40);
        assert_eq!(s["errors"], 10);
        assert_eq!(s["request_rate"], 16.0);
        assert_eq!(s["active"], 4);
        assert_eq!(s["no_endpoint"], 0);
        assert_eq!(s["max_error_rate"], 5);
        // No new response: no rate, not 0 %.
        assert_eq!(error_rate(&now, &now), None);
        assert!(sample(None, &now, 7, None)["error_rate"].is_null());
        // An agent restarted (its totals fell): no negative counts.
        let restarted = Totals::of(&[report("n1", 1.0, &[(3, 1)])]);
        assert_eq!(error_rate(&now, &restarted), None);
    }

    #[test]
    fn a_stale_report_no_longer_counts_towards_the_rate() {
        let mut stale = report("n2", 50.0, &[]);
        stale.age_ms = STALE_MS + 1;
        let totals = Totals::of(&[report("n1", 3.0, &[]), stale]);
        assert!((totals.request_rate - 3.0).abs() < 1e-9);
        assert_eq!(totals.active, 2);
    }
}
