//! `skiff server`: opens the data dir, starts consensus, the controllers and
//! the gRPC API on an already-bound listener, and stops on `shutdown`.

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use skiff_proto::v1::agent_sync_server::AgentSyncServer;
use skiff_proto::v1::control_server::ControlServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::wrappers::TcpListenerStream;

use crate::api::Api;
use crate::consensus::{self, ConsensusConfig, ConsensusError};
use crate::controllers;

/// Everything `skiff server` is told.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub name: String,
    pub data_dir: PathBuf,
    /// Start a new one-member cluster if the data dir holds none.
    pub bootstrap: bool,
    pub tick: Duration,
    pub election_ticks: usize,
}

impl ServerConfig {
    pub fn new(name: impl Into<String>, data_dir: impl Into<PathBuf>) -> Self {
        ServerConfig {
            name: name.into(),
            data_dir: data_dir.into(),
            bootstrap: false,
            tick: Duration::from_millis(100),
            election_ticks: 10,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("failed to open data dir {path}: {source}")]
    DataDir { path: PathBuf, source: sled::Error },
    #[error(transparent)]
    Consensus(#[from] ConsensusError),
    #[error("failed to read listener address: {0}")]
    Listener(std::io::Error),
    #[error("grpc server failed: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error("consensus task panicked: {0}")]
    Panicked(String),
}

/// Runs a control-plane server until `shutdown` resolves.
pub async fn run(
    config: ServerConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    let address = listener.local_addr().map_err(ServerError::Listener)?;
    let raft_dir = config.data_dir.join("raft");
    let db = sled::Config::new()
        .path(&raft_dir)
        .open()
        .map_err(|source| ServerError::DataDir {
            path: raft_dir.clone(),
            source,
        })?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let consensus_config = ConsensusConfig {
        // The first member of a cluster is 1; joining servers get ids from
        // the membership change that adds them.
        id: 1,
        name: config.name.clone(),
        address: address.to_string(),
        tick: config.tick,
        election_ticks: config.election_ticks,
        heartbeat_ticks: 3,
    };
    let (consensus, consensus_task) =
        consensus::start(&db, consensus_config, config.bootstrap, stop_rx.clone())?;
    let reconciler = tokio::spawn(controllers::run_reconciler(
        consensus.clone(),
        stop_rx.clone(),
    ));

    let api = Api::new(consensus, config.name.clone());
    tracing::info!(name = %config.name, %address, data_dir = %config.data_dir.display(), "skiff server listening");
    let mut grpc_stop = stop_rx.clone();
    let serve = tonic::transport::Server::builder()
        .add_service(ControlServer::new(api.clone()))
        .add_service(AgentSyncServer::new(api))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
            let _ = grpc_stop.wait_for(|stop| *stop).await;
        });
    let serve = tokio::spawn(serve);

    shutdown.await;
    tracing::info!("skiff server stopping");
    let _ = stop_tx.send(true);
    let _ = reconciler.await;
    // Agents' streams end with the process; do not wait on them forever.
    let _ = tokio::time::timeout(Duration::from_secs(2), serve).await;
    let result = consensus_task
        .await
        .map_err(|e| ServerError::Panicked(e.to_string()))?;
    result?;
    db.flush_async()
        .await
        .map_err(|source| ServerError::DataDir {
            path: raft_dir,
            source,
        })?;
    Ok(())
}
