//! The `AgentSync` stream: register, heartbeat, report allocation statuses,
//! take assignments. One stream at a time, to one server; when it fails the
//! agent cycles to the next server with bounded backoff while the replicas
//! keep running.

use std::time::Duration;

use futures::future;
use skiff_proto::v1::agent_message::Msg as AgentMsg;
use skiff_proto::v1::agent_sync_client::AgentSyncClient;
use skiff_proto::v1::server_message::Msg as ServerMsg;
use skiff_proto::v1::{AgentMessage, Heartbeat};
use tokio::sync::mpsc;
use tokio::time::{Instant, Interval, MissedTickBehavior};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::transport::Endpoint;

use crate::backoff::Backoff;
use crate::config::AgentConfig;
use crate::convert;
use crate::local::LocalAllocs;
use crate::runtime::Runtime;
use crate::supervisor::StatusUpdate;

const RECONNECT_BASE: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(2);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a server may take to accept the stream.
const OPEN_TIMEOUT: Duration = Duration::from_secs(5);
/// HTTP/2 pings notice a server that vanished without closing the socket.
const KEEPALIVE: Duration = Duration::from_secs(5);
const DEFAULT_HEARTBEAT: Duration = Duration::from_millis(1000);

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("invalid server address {server}: {source}")]
    Address {
        server: String,
        source: tonic::transport::Error,
    },
    #[error("failed to connect to server {server}: {source}")]
    Connect {
        server: String,
        source: tonic::transport::Error,
    },
    #[error("server {server} did not open the sync stream within {timeout:?}")]
    OpenTimeout { server: String, timeout: Duration },
    #[error("sync stream to server {server} failed: {source}")]
    Stream {
        server: String,
        source: tonic::Status,
    },
    #[error("server {server} closed the sync stream")]
    Closed { server: String },
}

pub struct SyncLoop<'a, R: Runtime> {
    config: &'a AgentConfig,
    local: &'a mut LocalAllocs<R>,
    updates: &'a mut mpsc::UnboundedReceiver<StatusUpdate>,
    /// Set once the current server answered `Registered`.
    registered: bool,
    /// Where this agent serves replica logs; published after registering.
    logs_addr: Option<std::net::SocketAddr>,
}

impl<'a, R: Runtime> SyncLoop<'a, R> {
    pub fn new(
        config: &'a AgentConfig,
        local: &'a mut LocalAllocs<R>,
        updates: &'a mut mpsc::UnboundedReceiver<StatusUpdate>,
    ) -> Self {
        Self {
            config,
            local,
            updates,
            registered: false,
            logs_addr: None,
        }
    }

    /// Publishes `addr` as this node's logs address on every registration.
    pub fn with_logs_addr(mut self, addr: Option<std::net::SocketAddr>) -> Self {
        self.logs_addr = addr;
        self
    }

    /// Syncs forever; the caller ends it by dropping the future (shutdown).
    pub async fn run(&mut self) {
        let mut backoff = Backoff::new(RECONNECT_BASE, RECONNECT_MAX);
        for server in self.config.servers.iter().cycle() {
            self.registered = false;
            if let Err(e) = self.session(server).await {
                tracing::warn!(error = %e, "sync with control plane interrupted");
            }
            if self.registered {
                backoff.reset();
            }
            let delay = jitter(backoff.next_delay());
            self.idle(delay).await;
        }
        // `servers` is never empty (validated), so `cycle` never ends.
        future::pending::<()>().await;
    }

    /// Passes time without a stream, still taking in status updates so the
    /// local view (and pending re-plans) stay current.
    async fn idle(&mut self, delay: Duration) {
        let deadline = Instant::now() + delay;
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => return,
                Some(update) = self.updates.recv() => self.local.observe(&update),
            }
        }
    }

    /// One stream to one server, until it fails.
    async fn session(&mut self, server: &str) -> Result<(), SyncError> {
        let endpoint = Endpoint::from_shared(format!("http://{server}"))
            .map_err(|source| SyncError::Address {
                server: server.to_string(),
                source,
            })?
            .connect_timeout(CONNECT_TIMEOUT)
            .http2_keep_alive_interval(KEEPALIVE)
            .keep_alive_timeout(KEEPALIVE)
            .keep_alive_while_idle(true);
        let channel = endpoint
            .connect()
            .await
            .map_err(|source| SyncError::Connect {
                server: server.to_string(),
                source,
            })?;
        let mut client = AgentSyncClient::new(channel.clone());

        // Register and the current statuses are queued before the call, so
        // a server that reads before answering finds them.
        let (outbound, rx) = mpsc::unbounded_channel();
        let mut register = convert::register(self.config);
        register.cpu_millis = self.config.cpu_millis;
        register.memory_mb = self.config.memory_mb;
        register.labels = self.config.labels.clone().into_iter().collect();
        send(&outbound, AgentMsg::Register(register));
        for status in self.local.statuses() {
            send(&outbound, AgentMsg::Status(convert::status(status)));
        }
        let stream_err = |source| SyncError::Stream {
            server: server.to_string(),
            source,
        };
        let response =
            tokio::time::timeout(OPEN_TIMEOUT, client.sync(UnboundedReceiverStream::new(rx)))
                .await
                .map_err(|_| SyncError::OpenTimeout {
                    server: server.to_string(),
                    timeout: OPEN_TIMEOUT,
                })?
                .map_err(stream_err)?;
        let mut inbound = response.into_inner();
        let mut heartbeat: Option<Interval> = None;

        loop {
            tokio::select! {
                message = inbound.message() => {
                    let Some(message) = message.map_err(stream_err)? else {
                        return Err(SyncError::Closed { server: server.to_string() });
                    };
                    match message.msg {
                        Some(ServerMsg::Registered(registered)) => {
                            let period = match registered.heartbeat_interval_ms {
                                0 => DEFAULT_HEARTBEAT,
                                ms => Duration::from_millis(u64::from(ms)),
                            };
                            tracing::info!(%server, node = %registered.node, heartbeat = ?period, "registered with control plane");
                            let mut interval = tokio::time::interval_at(Instant::now() + period, period);
                            interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
                            heartbeat = Some(interval);
                            self.registered = true;
                            if let Some(addr) = self.logs_addr {
                                tokio::spawn(publish_logs_addr(channel.clone(), self.config.name.clone(), addr));
                            }
                        }
                        Some(ServerMsg::Assignments(assignments)) => {
                            tracing::debug!(index = assignments.index, count = assignments.allocations.len(), "assignments received");
                            let mut assigned = Vec::new();
                            let mut refused = Vec::new();
                            for alloc in &assignments.allocations {
                                match convert::assigned(alloc) {
                                    Ok(a) => assigned.push(a),
                                    Err(e) => refused.push((alloc.id.clone(), e.to_string())),
                                }
                            }
                            self.local.assign(assigned, refused);
                        }
                        None => tracing::debug!(%server, "ignoring empty server message"),
                    }
                }
                Some(update) = self.updates.recv() => {
                    self.local.observe(&update);
                    send(&outbound, AgentMsg::Status(convert::status(&update)));
                }
                () = tick(&mut heartbeat) => {
                    send(&outbound, AgentMsg::Heartbeat(Heartbeat {}));
                }
            }
        }
    }
}

/// Records where this node serves replica logs, in the variable
/// `skiff service logs` reads. Best effort: logged, retried at the next
/// registration.
async fn publish_logs_addr(
    channel: tonic::transport::Channel,
    node: String,
    addr: std::net::SocketAddr,
) {
    let mut client = skiff_proto::v1::control_client::ControlClient::new(channel);
    let request = skiff_proto::v1::PutVariableRequest {
        key: crate::logs::address_key(&node),
        value: addr.to_string(),
    };
    match tokio::time::timeout(OPEN_TIMEOUT, client.put_variable(request)).await {
        Ok(Ok(_)) => tracing::debug!(%addr, "published logs address"),
        Ok(Err(e)) => tracing::warn!(%addr, error = %e, "failed to publish logs address"),
        Err(_) => tracing::warn!(%addr, "publishing the logs address timed out"),
    }
}

/// Queues a message on the stream. A failed send means the stream is gone,
/// which the inbound side reports; the status is resent after reconnecting.
fn send(outbound: &mpsc::UnboundedSender<AgentMessage>, msg: AgentMsg) {
    let _ = outbound.send(AgentMessage { msg: Some(msg) });
}

async fn tick(interval: &mut Option<Interval>) {
    match interval {
        Some(interval) => {
            interval.tick().await;
        }
        None => future::pending().await,
    }
}

/// Spreads reconnects of many agents after a server dies: 80%..120%.
fn jitter(delay: Duration) -> Duration {
    use rand::Rng;
    delay.mul_f64(rand::thread_rng().gen_range(0.8..1.2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_a_fifth_of_the_delay() {
        for _ in 0..100 {
            let d = jitter(Duration::from_secs(1));
            assert!(d >= Duration::from_millis(800) && d <= Duration::from_millis(1200));
        }
    }
}
