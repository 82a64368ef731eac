//! `GET /api/events`: the cluster's events as server-sent events, fed by
//! the streaming `Events` RPC with `follow`. Each carries its sequence
//! number as its `id`, so a browser that reconnects sends it back as
//! `Last-Event-ID` and resumes after it, missing nothing.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use skiff_proto::v1 as pb;
use tokio_stream::StreamExt;

use crate::cluster::{event_json, Failure};
use crate::routes::Body;

/// A comment line this often keeps proxies and the browser from timing
/// out an idle stream.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// One server-sent event of `event`.
pub fn frame(event: &pb::Event) -> String {
    format!(
        "id: {}\nevent: skiff\ndata: {}\n\n",
        event.seq,
        event_json(event)
    )
}

/// The body that relays `stream` until it ends, fails or the browser
/// leaves.
pub fn body(mut stream: tonic::Streaming<pb::Event>) -> Body {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(256);
    tokio::spawn(async move {
        // Reconnect after a second when the stream breaks.
        if tx
            .send(Bytes::from_static(b"retry: 1000\n\n"))
            .await
            .is_err()
        {
            return;
        }
        let mut keep_alive = tokio::time::interval(KEEP_ALIVE);
        keep_alive.tick().await;
        loop {
            let frame = tokio::select! {
                message = stream.message() => match message {
                    Ok(Some(event)) => frame(&event),
                    Ok(None) => return,
                    Err(status) => {
                        let failure = Failure::from(status);
                        let data = serde_json::json!({ "error": failure.message });
                        let _ = tx.send(Bytes::from(format!("event: failure\ndata: {data}\n\n"))).await;
                        return;
                    }
                },
                _ = keep_alive.tick() => ": keep-alive\n\n".to_string(),
                () = tx.closed() => return,
            };
            if tx.send(Bytes::from(frame)).await.is_err() {
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

    #[test]
    fn each_event_carries_its_sequence_number_as_its_id() {
        let event = pb::Event {
            seq: 17,
            kind: "replica-healthy".into(),
            service: "web".into(),
            ..Default::default()
        };
        let text = frame(&event);
        assert!(text.starts_with("id: 17\nevent: skiff\ndata: {"), "{text}");
        assert!(text.ends_with("}\n\n"));
        assert!(!text.trim_end().contains("\n\n"), "one event, one frame");
    }
}
