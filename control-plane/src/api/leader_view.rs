//! Reads of what only the leader holds in memory: each node's last
//! heartbeat, the routing proxies' traffic reports, the replicas' resource
//! use and the Raft progress of the members. A follower forwards those
//! calls to the leader, so every server answers them alike.
//!
//! Why forward rather than replicate the caches through Raft: they change
//! every second for every node, so replicating them would put each
//! heartbeat and report in every server's log (an fsync each) to serve an
//! occasional CLI read, and a server that just restarted would still have
//! nothing until the next round arrived. A forwarded read costs one call
//! when someone asks and shows exactly what the leader's controllers act
//! on. A follower that cannot reach the leader answers with its own view
//! and marks it (`leader_unreachable`, `reachable: unknown`).

use std::future::Future;
use std::time::Duration;

use skiff_proto::v1::control_client::ControlClient;
use tonic::metadata::MetadataMap;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};

use super::Api;
use crate::consensus::transport::endpoint;

/// Set on a call a follower forwards, so the receiver answers it itself
/// even if it no longer leads (never a second hop, never a loop).
const FORWARDED: &str = "skiff-forwarded";

/// How long a follower waits for the leader's answer before answering
/// with its own view.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(2);

/// Where a read of the leader's memory is answered.
pub(super) enum LeaderView<T> {
    /// Here: this server leads, or the call was forwarded to it.
    Here,
    /// The leader answered (an error it returned is the caller's answer).
    Leader(Result<Response<T>, Status>),
    /// No leader is known or it did not answer: answer here, marked as
    /// this server's own view.
    Unreachable,
}

/// `message` as a call forwarded by a follower, on behalf of the caller
/// of the call being answered: its `authorization` (its API token) goes
/// with it, so the leader checks the same token.
pub(super) fn forwarded<T>(message: T, incoming: &MetadataMap) -> Request<T> {
    let mut request = Request::new(message);
    let metadata = request.metadata_mut();
    metadata.insert(FORWARDED, tonic::metadata::MetadataValue::from_static("1"));
    if let Some(token) = incoming.get("authorization") {
        metadata.insert("authorization", token.clone());
    }
    request
}

impl Api {
    /// Runs `call` against the leader unless this server should answer
    /// itself (see [`LeaderView`]). `incoming` is the metadata of the call
    /// being answered.
    pub(super) async fn ask_leader<T, F, Fut>(
        &self,
        incoming: &MetadataMap,
        call: F,
    ) -> LeaderView<T>
    where
        F: FnOnce(ControlClient<Channel>) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        if incoming.contains_key(FORWARDED) {
            return LeaderView::Here;
        }
        let status = self.consensus.status();
        if status.leader_id == status.id {
            return LeaderView::Here;
        }
        let Some(leader) = self.leader_client(status.leader_id) else {
            return LeaderView::Unreachable;
        };
        match tokio::time::timeout(FORWARD_TIMEOUT, call(leader)).await {
            Ok(Err(err)) if unreachable(&err) => {
                tracing::debug!(error = %err, "leader not reached; answering with this server's view");
                LeaderView::Unreachable
            }
            Ok(answer) => LeaderView::Leader(answer),
            Err(_) => LeaderView::Unreachable,
        }
    }

    /// A client of the leader's `Control` service (cached per address; the
    /// channel reconnects by itself).
    fn leader_client(&self, leader_id: u64) -> Option<ControlClient<Channel>> {
        if leader_id == 0 {
            return None;
        }
        let address = self
            .consensus
            .state()
            .members
            .get(&leader_id)
            .map(|m| m.address.clone())?;
        let mut cached = self.leader_client.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, client)) = cached.as_ref() {
            if *at == address {
                return Some(client.clone());
            }
        }
        let dial = self.trust.as_ref()?.dial_servers();
        let client = ControlClient::new(dial.lazy(endpoint(&address).ok()?));
        *cached = Some((address, client.clone()));
        Some(client)
    }
}

/// Errors that say the leader was not reached (or could not answer as the
/// leader), rather than an answer to the call.
fn unreachable(err: &Status) -> bool {
    matches!(
        err.code(),
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown
    )
}
