//! Raft traffic between servers over tonic: one long-lived client stream
//! per peer carrying batches of raft-rs messages, plus forwarding of
//! requests to the leader.
//!
//! Sending never blocks the consensus thread: messages go into a bounded
//! per-peer queue and are dropped when it is full or the peer is down, which
//! Raft tolerates (it retries); the core is told the peer is unreachable.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use protobuf::Message as _;
use raft::eraftpb::{Message, MessageType};
use skiff_proto::raft as pb;
use skiff_proto::raft::raft_client::RaftClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

use super::{Inbox, ProposeError, Request, Response};
use crate::state::State;

/// Largest gRPC message between servers: snapshots travel in one message.
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024 * 1024;

const PEER_QUEUE: usize = 4096;

struct Link {
    address: String,
    queue: mpsc::Sender<Message>,
}

type ConnectFuture = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<Channel, tonic::transport::Error>> + Send>,
>;

/// How a server opens channels to other servers: over mutual TLS with its
/// certificate (built by `crate::trust`), lazily or at once.
#[derive(Clone)]
pub struct Dial {
    lazy: Arc<dyn Fn(Endpoint) -> Channel + Send + Sync>,
    eager: Arc<dyn Fn(Endpoint) -> ConnectFuture + Send + Sync>,
}

impl Dial {
    pub fn new(
        lazy: impl Fn(Endpoint) -> Channel + Send + Sync + 'static,
        eager: impl Fn(Endpoint) -> ConnectFuture + Send + Sync + 'static,
    ) -> Dial {
        Dial {
            lazy: Arc::new(lazy),
            eager: Arc::new(eager),
        }
    }

    /// A channel that connects on first use.
    pub fn lazy(&self, endpoint: Endpoint) -> Channel {
        (self.lazy)(endpoint)
    }

    /// A channel connected now.
    pub async fn connect(&self, endpoint: Endpoint) -> Result<Channel, tonic::transport::Error> {
        (self.eager)(endpoint).await
    }
}

/// Outbound Raft traffic and request forwarding for one server.
pub struct Transport {
    id: u64,
    dial: Dial,
    runtime: tokio::runtime::Handle,
    /// Addresses learned before they are in the state (a join's peers).
    seeds: RwLock<HashMap<u64, String>>,
    links: Mutex<HashMap<u64, Link>>,
    channels: Mutex<HashMap<String, Channel>>,
    inbox: Mutex<Option<super::InboxSender>>,
    state: RwLock<Option<Arc<RwLock<State>>>>,
}

impl Transport {
    pub fn new(id: u64, runtime: tokio::runtime::Handle, dial: Dial) -> Arc<Self> {
        Arc::new(Transport {
            id,
            dial,
            runtime,
            seeds: RwLock::default(),
            links: Mutex::default(),
            channels: Mutex::default(),
            inbox: Mutex::default(),
            state: RwLock::default(),
        })
    }

    /// Remembers a peer's address until the replicated state has it.
    pub fn add_seed(&self, id: u64, address: String) {
        self.seeds
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, address);
    }

    pub(crate) fn attach(&self, inbox: super::InboxSender, state: Arc<RwLock<State>>) {
        *self.inbox.lock().unwrap_or_else(|p| p.into_inner()) = Some(inbox);
        *self.state.write().unwrap_or_else(|p| p.into_inner()) = Some(state);
    }

    /// The address of server `id`: from the replicated members, else seeds.
    pub fn address_of(&self, id: u64) -> Option<String> {
        let from_state = self
            .state
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .and_then(|s| {
                s.read()
                    .unwrap_or_else(|p| p.into_inner())
                    .members
                    .get(&id)
                    .map(|m| m.address.clone())
            });
        from_state.or_else(|| {
            self.seeds
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .get(&id)
                .cloned()
        })
    }

    /// Queues messages for their peers. Called from the consensus thread.
    pub fn send(&self, messages: Vec<Message>) {
        if messages.is_empty() {
            return;
        }
        let mut links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        for message in messages {
            let to = message.to;
            let Some(address) = self.address_of(to) else {
                tracing::debug!(to, "no address for raft peer; message dropped");
                continue;
            };
            let stale = links
                .get(&to)
                .is_some_and(|l| l.address != address || l.queue.is_closed());
            if stale {
                links.remove(&to);
            }
            let link = links
                .entry(to)
                .or_insert_with(|| self.open_link(to, address));
            if link.queue.try_send(message).is_err() {
                self.notify(Inbox::Unreachable(to));
            }
        }
    }

    fn open_link(&self, to: u64, address: String) -> Link {
        let (queue, receiver) = mpsc::channel(PEER_QUEUE);
        let inbox = self.inbox.lock().unwrap_or_else(|p| p.into_inner()).clone();
        self.runtime.spawn(peer_loop(
            self.id,
            to,
            address.clone(),
            receiver,
            inbox,
            self.dial.clone(),
        ));
        Link { address, queue }
    }

    fn notify(&self, message: Inbox) {
        if let Some(inbox) = self
            .inbox
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            // Dropped when the inbox is full: Raft reports and probes again.
            let _ = inbox.offer(message);
        }
    }

    fn channel(&self, address: &str) -> Result<Channel, ProposeError> {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(channel) = channels.get(address) {
            return Ok(channel.clone());
        }
        let channel = self.dial.lazy(endpoint(address)?);
        channels.insert(address.to_string(), channel.clone());
        Ok(channel)
    }

    /// Runs `request` on the leader `leader`.
    pub async fn forward(&self, leader: u64, request: &Request) -> Result<Response, ProposeError> {
        let address = self
            .address_of(leader)
            .ok_or_else(|| ProposeError::Forward(format!("address of leader {leader} unknown")))?;
        let mut client = RaftClient::new(self.channel(&address)?);
        let body = serde_json::to_vec(request).expect("requests always serialize");
        match client.propose(pb::ProposeRequest { command: body }).await {
            Ok(response) => serde_json::from_slice(&response.into_inner().result)
                .map_err(|e| ProposeError::Forward(format!("bad answer from {address}: {e}")))?,
            // Refused before anything was proposed: safe to retry.
            Err(status) if status.code() == tonic::Code::FailedPrecondition => {
                Err(ProposeError::NotLeader(leader))
            }
            Err(status) if status.code() == tonic::Code::Unavailable && connect_failed(&status) => {
                Err(ProposeError::NoLeader)
            }
            Err(status) => Err(ProposeError::Forward(format!(
                "{address}: {}",
                status.message()
            ))),
        }
    }
}

fn connect_failed(status: &tonic::Status) -> bool {
    let text = format!("{status:?}").to_lowercase();
    text.contains("connect") || text.contains("refused")
}

pub fn endpoint(address: &str) -> Result<Endpoint, ProposeError> {
    Endpoint::from_shared(format!("http://{address}"))
        .map(|e| {
            e.connect_timeout(Duration::from_millis(500))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(2))
                .keep_alive_timeout(Duration::from_secs(2))
        })
        .map_err(|e| ProposeError::Forward(format!("invalid peer address {address}: {e}")))
}

/// Keeps one client stream open to a peer and feeds it batches from the
/// queue; reconnects with a capped backoff and reports the peer unreachable
/// meanwhile.
async fn peer_loop(
    from: u64,
    to: u64,
    address: String,
    mut queue: mpsc::Receiver<Message>,
    inbox: Option<super::InboxSender>,
    dial: Dial,
) {
    let report = |message: Inbox| {
        if let Some(inbox) = &inbox {
            // Dropped when the inbox is full: Raft reports and probes again.
            let _ = inbox.offer(message);
        }
    };
    let mut backoff = Duration::from_millis(50);
    loop {
        let channel = match endpoint(&address) {
            Ok(endpoint) => dial.connect(endpoint).await,
            Err(_) => return,
        };
        let channel = match channel {
            Ok(channel) => channel,
            Err(err) => {
                tracing::debug!(to, %address, error = %err, "raft peer unreachable");
                report(Inbox::Unreachable(to));
                // Drop what queued up meanwhile: Raft resends what matters.
                while let Ok(message) = queue.try_recv() {
                    if message.get_msg_type() == MessageType::MsgSnapshot {
                        report(Inbox::SnapshotSent {
                            to,
                            delivered: false,
                        });
                    }
                }
                if queue.is_closed() {
                    return;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        backoff = Duration::from_millis(50);
        let mut client = RaftClient::new(channel)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
            .max_decoding_message_size(MAX_MESSAGE_BYTES);
        let (batches, stream) = mpsc::channel::<pb::RaftBatch>(64);
        let call = tokio::spawn(async move { client.send(ReceiverStream::new(stream)).await });
        loop {
            let Some(first) = queue.recv().await else {
                return;
            };
            let mut snapshots = 0;
            let mut messages = Vec::new();
            for message in
                std::iter::once(first).chain(std::iter::from_fn(|| queue.try_recv().ok()).take(255))
            {
                if message.get_msg_type() == MessageType::MsgSnapshot {
                    snapshots += 1;
                }
                messages.push(
                    message
                        .write_to_bytes()
                        .expect("raft messages always encode"),
                );
            }
            let sent =
                batches.send(pb::RaftBatch { from, messages }).await.is_ok() && !call.is_finished();
            for _ in 0..snapshots {
                report(Inbox::SnapshotSent {
                    to,
                    delivered: sent,
                });
            }
            if !sent {
                report(Inbox::Unreachable(to));
                break;
            }
        }
    }
}
