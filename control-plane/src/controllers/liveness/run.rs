//! The liveness leader loop: node verdicts from heartbeat TTLs, proposed
//! by the leader itself.

use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::{decide, Heartbeats};
use crate::consensus::{self, Consensus};
use crate::controllers::now_ms;
use crate::state::Command;

/// On the leader, marks nodes down whose heartbeats stopped for the TTL
/// (which stops their replicas so the reconciler re-places them), and up
/// again when heartbeats resume. Proposes only as the leader itself: a
/// verdict must never be forwarded to a newer leader, whose grace period
/// it would bypass.
pub async fn run(
    consensus: Consensus,
    heartbeats: Heartbeats,
    ttl: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick =
        tokio::time::interval((ttl / 10).clamp(Duration::from_millis(100), Duration::from_secs(1)));
    let mut leader_since: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        if !consensus.is_leader() {
            leader_since = None;
            continue;
        }
        let since = *leader_since.get_or_insert_with(Instant::now);
        let beats = heartbeats.lock().map(|b| b.clone()).unwrap_or_default();
        let verdicts = decide::decide(&consensus.state().nodes, &beats, Instant::now(), since, ttl);
        for (name, status) in verdicts {
            tracing::info!(node = %name, status = status.as_str(), "node liveness changed");
            let command = Command::SetNodeStatus { name, status }.at(now_ms());
            let request = consensus::Request::Command(Box::new(command));
            if let Err(err) = consensus.request_local(request).await {
                tracing::warn!(error = %err, "node status not recorded");
            }
        }
    }
}
