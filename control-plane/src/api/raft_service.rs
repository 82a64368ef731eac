//! The server-to-server gRPC service: Raft messages in, joins, and writes
//! forwarded by followers to the leader.

use protobuf::Message as _;
use raft::eraftpb::Message;
use skiff_proto::raft as pb;
use tonic::{Request, Response, Status, Streaming};

use std::sync::Arc;

use skiff_pki::{PeerIdentity, PeerInfo};

use crate::consensus::{self, Consensus, ProposeError};
use crate::secrets::SecretKey;
use crate::trust::Trust;
use skiff_spec as spec;

pub struct RaftService {
    consensus: Consensus,
    /// Handed to servers that join (see `crate::secrets`).
    secrets_key: Option<SecretKey>,
    /// The CA handed to servers that join.
    trust: Option<Arc<Trust>>,
}

impl RaftService {
    pub fn new(consensus: Consensus, secrets_key: Option<SecretKey>) -> Self {
        RaftService {
            consensus,
            secrets_key,
            trust: None,
        }
    }

    pub fn with_trust(mut self, trust: Arc<Trust>) -> Self {
        self.trust = Some(trust);
        self
    }
}

/// Every call of this service needs a server certificate of the cluster:
/// a client or an agent cannot send Raft messages, join or propose.
fn require_server<T>(request: &Request<T>) -> Result<PeerIdentity, Status> {
    request
        .extensions()
        .get::<PeerInfo>()
        .and_then(|peer| peer.identity.clone())
        .filter(PeerIdentity::is_server)
        .ok_or_else(|| {
            Status::permission_denied(
                "server-to-server calls need a server certificate of this cluster",
            )
        })
}

/// A message of a stream whose sender was checked against its
/// certificate: it must say it comes from that sender, so that one server
/// cannot speak for another (raft-rs believes a message's `from`).
fn decode_from(sender: u64, bytes: &[u8]) -> Result<Message, String> {
    let message = Message::parse_from_bytes(bytes).map_err(|e| format!("undecodable: {e}"))?;
    if message.from != sender {
        return Err(format!(
            "a message from server {} in the stream of server {sender}",
            message.from
        ));
    }
    Ok(message)
}

#[tonic::async_trait]
impl pb::raft_server::Raft for RaftService {
    async fn send(
        &self,
        request: Request<Streaming<pb::RaftBatch>>,
    ) -> Result<Response<pb::SendAck>, Status> {
        let identity = require_server(&request)?;
        let mut stream = request.into_inner();
        // The sender of the stream's first batch, checked against the
        // certificate; every later batch must come from the same server.
        let mut sender: Option<u64> = None;
        while let Some(batch) = stream.message().await? {
            match sender {
                Some(from) if from == batch.from => {}
                Some(from) => {
                    return Err(Status::permission_denied(format!(
                        "a stream of server {from} carried messages from {}",
                        batch.from
                    )))
                }
                None => {
                    // A member must use its own certificate. An id this
                    // server does not know yet (it is joining and has no
                    // snapshot: it knows no member) is taken from any
                    // server certificate of the cluster.
                    let named = match self.consensus.state().members.get(&batch.from) {
                        Some(member) => identity.is_server_named(&member.name),
                        None => true,
                    };
                    if !named {
                        return Err(Status::permission_denied(format!(
                            "messages from server {} need that member's certificate",
                            batch.from
                        )));
                    }
                    sender = Some(batch.from);
                }
            }
            for bytes in batch.messages {
                match decode_from(batch.from, &bytes) {
                    Ok(message) => self.consensus.deliver(message),
                    Err(err) => {
                        tracing::warn!(from = batch.from, error = %err, "raft message dropped")
                    }
                }
            }
        }
        Ok(Response::new(pb::SendAck {}))
    }

    async fn join(
        &self,
        request: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        let identity = require_server(&request)?;
        let request = request.into_inner();
        if !identity.is_server_named(&request.name) {
            return Err(Status::permission_denied(format!(
                "joining as server {} needs that server's certificate (from `skiff server --join ADDR --token T`)",
                request.name
            )));
        }
        spec::validate_name(&request.name)
            .map_err(|e| Status::invalid_argument(format!("invalid server {e}")))?;
        if request.address.parse::<std::net::SocketAddr>().is_err() {
            return Err(Status::invalid_argument(format!(
                "invalid server address \"{}\": use IP:PORT",
                request.address
            )));
        }
        let add = consensus::Request::AddMember {
            name: request.name.clone(),
            address: request.address.clone(),
        };
        let id = match self.consensus.request(add).await {
            Ok(consensus::Response::Member(id)) => id,
            Ok(_) => return Err(Status::internal("unexpected answer to a join")),
            Err(err) => return Err(super::status_from(err)),
        };
        // Existing members are in this server's state already; the new one
        // may not be applied here yet (if the join was forwarded), and
        // waiting for it could block: the cluster may need the new server
        // running to reach a quorum again.
        let mut peers: Vec<pb::Peer> = self
            .consensus
            .state()
            .members
            .values()
            .filter(|m| m.id != id)
            .map(|m| pb::Peer {
                id: m.id,
                name: m.name.clone(),
                address: m.address.clone(),
            })
            .collect();
        peers.push(pb::Peer {
            id,
            name: request.name.clone(),
            address: request.address.clone(),
        });
        tracing::info!(
            name = %request.name,
            id,
            "server joined as a learner; the leader makes it a voter once it has caught up"
        );
        let secrets_key = self
            .secrets_key
            .as_ref()
            .map(SecretKey::to_bytes)
            .unwrap_or_default();
        let (ca_cert_pem, ca_key_pem) = self
            .trust
            .as_ref()
            .map(|t| (t.ca().cert_pem().to_string(), t.ca().key_pem()))
            .unwrap_or_default();
        Ok(Response::new(pb::JoinResponse {
            id,
            peers,
            secrets_key,
            ca_cert_pem,
            ca_key_pem,
        }))
    }

    async fn propose(
        &self,
        request: Request<pb::ProposeRequest>,
    ) -> Result<Response<pb::ProposeResponse>, Status> {
        require_server(&request)?;
        if !self.consensus.is_leader() {
            return Err(Status::failed_precondition("not the leader"));
        }
        let request: consensus::Request = serde_json::from_slice(&request.into_inner().command)
            .map_err(|e| Status::invalid_argument(format!("undecodable forwarded request: {e}")))?;
        // Only what followers forward by call (see `consensus::forwarded`),
        // with the checks the API would have run on it.
        consensus::forwarded::forwardable(&request).map_err(|why| {
            Status::permission_denied(format!("forwarded request refused: {why}"))
        })?;
        consensus::forwarded::validate(&request)
            .map_err(|why| Status::invalid_argument(format!("forwarded request refused: {why}")))?;
        let result = self.consensus.request_local(request).await;
        if matches!(&result, Err(err) if err.is_retryable()) {
            return Err(Status::failed_precondition("not the leader"));
        }
        let result: Result<consensus::Response, ProposeError> = result;
        let body = serde_json::to_vec(&result).expect("results always serialize");
        Ok(Response::new(pb::ProposeResponse { result: body }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_carries_only_its_own_servers_messages() {
        let message = Message {
            from: 2,
            to: 1,
            ..Default::default()
        };
        let bytes = message.write_to_bytes().unwrap();
        assert_eq!(decode_from(2, &bytes).unwrap(), message);
        assert_eq!(
            decode_from(3, &bytes).unwrap_err(),
            "a message from server 2 in the stream of server 3"
        );
        assert!(decode_from(2, b"\xff\xff").is_err());
    }
}
