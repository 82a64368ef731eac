//! `skiff server`: opens the data dir, bootstraps or joins a cluster (or
//! resumes one), starts consensus, the controllers and the gRPC API on an
//! already-bound listener, and stops on `shutdown`.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use skiff_pki::{JoinToken, Role};
use skiff_proto::pki::pki_server::PkiServer;
use skiff_proto::raft::raft_client::RaftClient;
use skiff_proto::raft::raft_server::RaftServer;
use skiff_proto::raft::JoinRequest;
use skiff_proto::v1::agent_sync_server::AgentSyncServer;
use skiff_proto::v1::control_server::ControlServer;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::api::{Api, PkiService, RaftService};
use crate::consensus::snapshot_file::SnapshotFile;
use crate::consensus::transport::{endpoint, MAX_MESSAGE_BYTES};
use crate::consensus::{
    self, ConsensusConfig, ConsensusError, LogStore, SledStorage, StorageFailure, Transport,
    WalStorage,
};
use crate::controllers;
use crate::metrics::Metrics;
use crate::secrets::SecretKey;
use crate::state::Member;
use crate::trust;

/// Everything `skiff server` is told.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub name: String,
    pub data_dir: PathBuf,
    /// Start a new one-member cluster if the data dir holds none.
    pub bootstrap: bool,
    /// Join the cluster of this server (any member) if the data dir holds
    /// none.
    pub join: Option<String>,
    /// Address other servers and agents reach this one at; defaults to the
    /// listener's address.
    pub advertise: Option<String>,
    pub tick: Duration,
    /// Ticks without a leader before an election (about 1 s at 100 ms).
    pub election_ticks: usize,
    pub heartbeat_ticks: usize,
    /// Applied entries between snapshots (and log compactions).
    pub snapshot_every: u64,
    /// Where to serve `GET /metrics` (Prometheus text); `None`: the API
    /// listener's host, port [`skiff_metrics::DEFAULT_SERVER_PORT`] (9464),
    /// or any free port if that is taken.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Where to serve the web dashboard (`skiff_ui`); `None`: nowhere.
    /// Plain HTTP on a loopback address, HTTPS with this server's
    /// certificate on any other.
    pub ui_listen: Option<std::net::SocketAddr>,
    /// `ui_listen` is a default, not the operator's choice (`skiff dev`):
    /// if it is taken, serve on any free port of its host, said in a
    /// warning, instead of failing.
    pub ui_fallback: bool,
    /// A node whose heartbeats stop for this long is marked down.
    pub heartbeat_ttl: Duration,
    /// The autoscaler's scale-down stabilization window; its cooldowns and
    /// idle window scale with it (`controllers::autoscale::Timings`).
    pub autoscale_window: Duration,
    /// Where a new data dir keeps the Raft log.
    pub raft_log: RaftLog,
    /// Most services and variables the API accepts (see [`crate::api::Limits`]).
    pub limits: crate::api::Limits,
    /// Sizes, streams and time the gRPC listener allows each caller.
    pub grpc_limits: GrpcLimits,
    /// Writes are refused while the data dir has less free space than this
    /// (`--reserve-disk-mb`; 0: never), so the log never runs out mid-write.
    pub reserve_disk_bytes: u64,
    /// The server join token (`skiff cluster token server`), needed with
    /// `join` on a new data dir.
    pub join_token: Option<String>,
    /// Lifetime of the certificates this server issues (`--cert-lifetime`).
    pub cert_lifetime: Duration,
    /// Where to write the client config with the admin token `management`,
    /// created once this server leads a cluster without tokens (`skiff
    /// server --bootstrap`, `skiff dev`); `None`: no token is created.
    pub client_config: Option<PathBuf>,
    /// With `bootstrap`: start the new cluster from this snapshot file
    /// (`skiff cluster snapshot save`) instead of empty.
    pub restore: Option<PathBuf>,
    /// Make this server the only member of a new cluster with its own
    /// data, after its cluster lost its quorum (`skiff server --recover`).
    pub recover: bool,
    /// Start from a Raft log cut at a damaged record, or one sled cut short,
    /// instead of refusing (`--truncate-corrupt-log`); what is lost is logged.
    pub truncate_corrupt_log: bool,
}

/// The Raft log's durable store.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RaftLog {
    /// In sled, flushed once per Ready: the design's store.
    #[default]
    Sled,
    /// In an append-only write-ahead log, one `fdatasync` per Ready, as
    /// etcd keeps it: measured faster under load (see `WalStorage`).
    Wal,
}

/// What the server's gRPC listener allows one caller, like etcd's
/// `--max-request-bytes`: a request larger than this is refused before it
/// is decoded, a connection opens at most so many streams at once, and a
/// call (up to its response head; streams then run on) has so long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GrpcLimits {
    /// Largest request a client or agent may send (`--max-request-bytes`).
    pub max_request_bytes: usize,
    /// Largest message another server may send (`--max-raft-message-bytes`):
    /// a snapshot travels in one, so it must hold the whole state.
    pub max_raft_message_bytes: usize,
    /// Streams one connection may have open at once (`--max-concurrent-streams`).
    pub max_concurrent_streams: u32,
    /// How long a call may take to answer (`--request-timeout`).
    pub request_timeout: Duration,
}

impl Default for GrpcLimits {
    fn default() -> Self {
        GrpcLimits {
            max_request_bytes: 4 << 20,
            max_raft_message_bytes: MAX_MESSAGE_BYTES,
            max_concurrent_streams: 1024,
            request_timeout: Duration::from_secs(150),
        }
    }
}

impl ServerConfig {
    pub fn new(name: impl Into<String>, data_dir: impl Into<PathBuf>) -> Self {
        ServerConfig {
            name: name.into(),
            data_dir: data_dir.into(),
            bootstrap: false,
            join: None,
            advertise: None,
            tick: Duration::from_millis(100),
            election_ticks: 10,
            heartbeat_ticks: 2,
            snapshot_every: 100_000,
            metrics_listen: None,
            ui_listen: None,
            ui_fallback: false,
            heartbeat_ttl: Duration::from_secs(10),
            autoscale_window: Duration::from_millis(
                controllers::autoscale::DEFAULT_SCALE_DOWN_WINDOW_MS,
            ),
            raft_log: RaftLog::default(),
            limits: crate::api::Limits::default(),
            grpc_limits: GrpcLimits::default(),
            reserve_disk_bytes: 64 << 20,
            join_token: None,
            cert_lifetime: skiff_pki::DEFAULT_LIFETIME,
            client_config: None,
            restore: None,
            recover: false,
            truncate_corrupt_log: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("failed to open data dir {path}: {source}")]
    DataDir { path: PathBuf, source: sled::Error },
    #[error(transparent)]
    Storage(#[from] StorageFailure),
    #[error(transparent)]
    Secrets(#[from] crate::secrets::SecretsError),
    #[error(transparent)]
    Consensus(#[from] ConsensusError),
    #[error("data dir {0} holds no cluster: start the first server with --bootstrap, or others with --join ADDR")]
    NotInitialized(PathBuf),
    #[error("failed to join the cluster at {address}: {reason}")]
    Join { address: String, reason: String },
    #[error("failed to read listener address: {0}")]
    Listener(std::io::Error),
    #[error("grpc server failed: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error("consensus stopped: {0}")]
    Stopped(String),
    #[error(transparent)]
    Pki(#[from] skiff_pki::PkiError),
    #[error("failed to serve the dashboard on {address}: {reason} (choose another address with --ui-listen)")]
    Ui {
        address: std::net::SocketAddr,
        reason: String,
    },
    #[error("data dir {0} keeps its Raft log in a write-ahead log: start the server with --raft-log wal")]
    LogIsWal(PathBuf),
    #[error(transparent)]
    Backup(#[from] crate::backup::BackupError),
    #[error("the raft database {path} is damaged (sled: {why}); this server cannot start from it: remove the server (`skiff cluster remove NAME` on a live one) and start it again with an empty data dir and --join")]
    DamagedDb { path: PathBuf, why: String },
    #[error("data dir {0} already holds a cluster: --restore makes a new cluster in an empty data dir; give another --data-dir, or start without --restore")]
    RestoreIntoUsed(PathBuf),
    #[error("--recover: data dir {0} holds no cluster to recover; give the data dir of a surviving server")]
    NothingToRecover(PathBuf),
    #[error("--recover: failed to move the old log aside in {path}: {source}")]
    MoveAside {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What a new cluster starts from instead of an empty state: a restored
/// backup or a recovered server's data.
struct Seed {
    /// This server's id in the new cluster.
    id: u64,
    state: crate::state::State,
    /// Restores only: the old cluster's keys, to write into the data dir.
    secrets_key: Option<SecretKey>,
    ca: Option<skiff_pki::ClusterCa>,
}

const SERVER_ID: &[u8] = b"server_id";

/// Runs a control-plane server until `shutdown` resolves.
pub async fn run(
    config: ServerConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    let listen = listener.local_addr().map_err(ServerError::Listener)?;
    let advertise = config
        .advertise
        .clone()
        .unwrap_or_else(|| listen.to_string());
    let raft_dir = config.data_dir.join("raft");
    let seed = if config.recover {
        Some(recover(&config)?)
    } else if let Some(file) = &config.restore {
        Some(restore_seed(file)?)
    } else {
        None
    };
    let db = open_sled(&raft_dir)?;
    let local = local_tree(&db, &raft_dir)?;
    let snapshots = SnapshotFile::new(config.data_dir.join("snapshots"));
    let has_wal = holds_wal(&config.data_dir);
    let opened = Opened {
        listen,
        advertise,
        raft_dir,
        db,
        local,
        seed,
    };
    match config.raft_log {
        // The write-ahead log cannot be moved back into sled.
        RaftLog::Sled if has_wal => Err(ServerError::LogIsWal(config.data_dir.clone())),
        RaftLog::Sled => {
            let store =
                SledStorage::open_checked(&opened.db, snapshots, config.truncate_corrupt_log)?;
            serve(config, listener, shutdown, opened, store).await
        }
        // Moves a log kept in sled into the write-ahead log.
        RaftLog::Wal => {
            let store =
                WalStorage::open_checked(&opened.db, snapshots, config.truncate_corrupt_log)?;
            serve(config, listener, shutdown, opened, store).await
        }
    }
}

/// What [`run`] opened before choosing the log store.
struct Opened {
    listen: std::net::SocketAddr,
    advertise: String,
    raft_dir: PathBuf,
    db: sled::Db,
    /// This server's own records (its id).
    local: sled::Tree,
    seed: Option<Seed>,
}

/// `--restore FILE`: the state and keys of the backup, checked whole
/// before anything is written.
fn restore_seed(file: &Path) -> Result<Seed, ServerError> {
    let backup = crate::backup::read_file(file)?;
    let restored = crate::backup::restored(&file.display().to_string(), &backup)?;
    if !restored.dropped_secrets.is_empty() {
        tracing::warn!(
            secrets = ?restored.dropped_secrets,
            "the snapshot is redacted: these secrets are not restored; create them again with `skiff secret create`"
        );
    }
    if restored.ca.is_none() {
        tracing::warn!("the snapshot is redacted: the restored cluster gets a new CA; every agent must join again with a new agent token");
    }
    tracing::info!(file = %file.display(), index = backup.applied_index, services = restored.state.services.len(), nodes = restored.state.nodes.len(), "restoring a new cluster from a snapshot");
    Ok(Seed {
        id: 1,
        state: restored.state,
        secrets_key: restored.secrets_key,
        ca: restored.ca,
    })
}

/// `--recover`: replays this server's own log into its state, then moves
/// the old log and snapshots aside (`DATA/before-recover-SECS/`, kept
/// for an operator to inspect; never deleted), so that the server starts
/// a new one-member cluster from that state under its old id.
fn recover(config: &ServerConfig) -> Result<Seed, ServerError> {
    let data_dir = &config.data_dir;
    let raft_dir = data_dir.join("raft");
    if !raft_dir.exists() {
        return Err(ServerError::NothingToRecover(data_dir.clone()));
    }
    let (id, state) = {
        let db = open_sled(&raft_dir)?;
        let local = local_tree(&db, &raft_dir)?;
        let snapshots = SnapshotFile::new(data_dir.join("snapshots"));
        let has_wal = holds_wal(data_dir);
        let state = if has_wal {
            let store = WalStorage::open_checked(&db, snapshots, config.truncate_corrupt_log)?;
            if !store.is_initialized() {
                return Err(ServerError::NothingToRecover(data_dir.clone()));
            }
            crate::consensus::core::replay(&store).map_err(ConsensusError::from)?
        } else {
            let store = SledStorage::open_checked(&db, snapshots, config.truncate_corrupt_log)?;
            if !store.is_initialized() {
                return Err(ServerError::NothingToRecover(data_dir.clone()));
            }
            crate::consensus::core::replay(&store).map_err(ConsensusError::from)?
        };
        (read_id(&local)?, state)
    };
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let aside = data_dir.join(format!("before-recover-{secs}"));
    let moved = |source| ServerError::MoveAside {
        path: aside.clone(),
        source,
    };
    std::fs::create_dir_all(&aside).map_err(moved)?;
    for part in ["raft", "snapshots", "wal"] {
        let from = data_dir.join(part);
        if from.exists() {
            std::fs::rename(&from, aside.join(part)).map_err(moved)?;
        }
    }
    sync_dir(data_dir).map_err(moved)?;
    tracing::warn!(
        id,
        index = state.applied_index,
        old_log = %aside.display(),
        "recovering: this server becomes the only member of a new cluster with its data; join the others again with empty data dirs"
    );
    Ok(Seed {
        id,
        state,
        secrets_key: None,
        ca: None,
    })
}

/// Opens the sled database at `path`. sled panics on some damaged files
/// (measured: "tried to serialize Uninitialized" after one flipped byte);
/// that is an error naming the directory, not a crash.
fn open_sled(path: &Path) -> Result<sled::Db, ServerError> {
    let open = || {
        sled::Config::new()
            .path(path)
            .mode(sled::Mode::LowSpace)
            // No background flusher: the Raft store flushes each Ready
            // itself, so a failed write (a full disk) surfaces there as an
            // error that stops the server, not in a thread that leaves
            // sled failing later without a word (measured: a write then
            // hung until a read panicked raft-rs).
            .flush_every_ms(None)
            .open()
    };
    match std::panic::catch_unwind(open) {
        Ok(opened) => opened.map_err(|source| ServerError::DataDir {
            path: path.to_path_buf(),
            source,
        }),
        Err(panic) => {
            let why = panic_message(panic.as_ref())
                .unwrap_or("a panic")
                .to_string();
            Err(ServerError::DamagedDb {
                path: path.to_path_buf(),
                why,
            })
        }
    }
}

/// This server's own records (its id) in the database at `path`.
fn local_tree(db: &sled::Db, path: &Path) -> Result<sled::Tree, ServerError> {
    db.open_tree("local")
        .map_err(|source| ServerError::DataDir {
            path: path.to_path_buf(),
            source,
        })
}

/// Whether `data_dir` keeps its Raft log in the write-ahead log.
fn holds_wal(data_dir: &Path) -> bool {
    std::fs::read_dir(data_dir.join("wal"))
        .into_iter()
        .flatten()
        .flatten()
        .any(|entry| entry.file_name().to_string_lossy().starts_with("wal-"))
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Joins or resumes the cluster on `store` and serves until `shutdown`.
async fn serve<S: LogStore + Send + 'static>(
    config: ServerConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
    opened: Opened,
    mut store: S,
) -> Result<(), ServerError> {
    let Opened {
        listen,
        advertise,
        raft_dir,
        db,
        local,
        seed,
    } = opened;
    // Serve the gRPC API before joining: the leader must be able to reach
    // this server as soon as the membership change commits.
    let mut secrets_key = SecretKey::load(&config.data_dir)?;
    let lifetime = config.cert_lifetime;
    // Other servers see this one's connections come from its own address
    // when it has a loopback one of its own (partition tests filter on it).
    let source = skiff_pki::tls::loopback_source(listen.ip());
    let local_trust = |create: bool| {
        trust::load_or_bootstrap(&config.data_dir, &config.name, lifetime, create, source)
    };
    let mut joined_trust = None;
    let (id, seeds) = if store.is_initialized() {
        if config.restore.is_some() {
            return Err(ServerError::RestoreIntoUsed(config.data_dir.clone()));
        }
        (read_id(&local)?, Vec::new())
    } else if let Some(seed) = seed {
        let member = Member {
            id: seed.id,
            name: config.name.clone(),
            address: advertise.clone(),
            learner: false,
        };
        if let Some(ca) = &seed.ca {
            ca.save(&skiff_pki::files::pki_dir(&config.data_dir))?;
        }
        if let (Some(key), None) = (seed.secrets_key, &secrets_key) {
            key.store(&config.data_dir)?;
            secrets_key = Some(key);
        }
        if secrets_key.is_none() {
            let key = SecretKey::generate();
            key.store(&config.data_dir)?;
            secrets_key = Some(key);
        }
        consensus::bootstrap_from(&mut store, seed.state, member)?;
        (seed.id, Vec::new())
    } else if config.bootstrap {
        let member = Member {
            id: 1,
            name: config.name.clone(),
            address: advertise.clone(),
            learner: false,
        };
        // The key is on disk before the cluster exists, so no secret is
        // ever sealed with a key that a crash could lose.
        if secrets_key.is_none() {
            let key = SecretKey::generate();
            key.store(&config.data_dir)?;
            secrets_key = Some(key);
        }
        consensus::bootstrap(&mut store, member)?;
        (1, Vec::new())
    } else if let Some(join) = &config.join {
        let failed = |reason: String| ServerError::Join {
            address: join.clone(),
            reason,
        };
        let token = config.join_token.as_deref().ok_or_else(|| {
            failed("a join token is needed: add --token T (print it on a member with `skiff cluster token server`)".into())
        })?;
        let token = JoinToken::parse(token).map_err(&failed)?;
        let credentials =
            trust::issue_for_join(&config.data_dir, join, Role::Server, &config.name, &token)
                .await
                .map_err(&failed)?;
        let (id, seeds, key, ca) =
            join_cluster(join, &config.name, &advertise, &credentials).await?;
        let (ca_cert, ca_key) = ca;
        joined_trust = Some(trust::joined(
            &config.data_dir,
            credentials,
            &ca_cert,
            &ca_key,
            lifetime,
            source,
        )?);
        if let Some(key) = key {
            key.store(&config.data_dir)?;
            secrets_key = Some(key);
        }
        (id, seeds)
    } else {
        return Err(ServerError::NotInitialized(config.data_dir.clone()));
    };
    let trust = match joined_trust {
        Some(trust) => trust,
        // A restart, a bootstrap, or a data dir from before TLS (which
        // gets a CA of its own: its agents must join again with a token).
        None => local_trust(true)?.expect("created when missing"),
    };
    write_id(&local, id)?;
    db.flush_async()
        .await
        .map_err(|source| ServerError::DataDir {
            path: raft_dir.clone(),
            source,
        })?;

    let transport = Transport::new(id, tokio::runtime::Handle::current(), trust.dial_servers());
    for (peer, address) in seeds {
        transport.add_seed(peer, address);
    }
    let consensus_config = ConsensusConfig {
        id,
        tick: config.tick,
        election_ticks: config.election_ticks,
        heartbeat_ticks: config.heartbeat_ticks,
        snapshot_every: config.snapshot_every,
        disk_reserve: (config.reserve_disk_bytes > 0).then(|| {
            Arc::new(consensus::disk::DiskReserve::new(
                config.data_dir.clone(),
                config.reserve_disk_bytes,
            ))
        }),
    };
    let metrics = Arc::new(Metrics::default());
    let (consensus, consensus_thread) =
        consensus::start(store, consensus_config, transport, metrics.clone())?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let request_metrics = {
        let explicit = config.metrics_listen.is_some();
        let ip = listener.local_addr().map_err(ServerError::Listener)?.ip();
        let address = config.metrics_listen.unwrap_or(std::net::SocketAddr::new(
            ip,
            skiff_metrics::DEFAULT_SERVER_PORT,
        ));
        let metrics_listener = skiff_metrics::bind(address, explicit)
            .await
            .map_err(ServerError::Listener)?;
        let mut registry = skiff_metrics::registry(&config.data_dir);
        metrics.register(&mut registry);
        registry.register_collector(Box::new(crate::metrics::StateCollector {
            consensus: consensus.clone(),
        }));
        registry.register_collector(Box::new(crate::metrics::StorageCollector {
            data_dir: config.data_dir.clone(),
        }));
        let request_metrics = crate::api::request_metrics::RequestMetricsLayer::new(&mut registry);
        tracing::info!(address = ?metrics_listener.local_addr().ok(), "serving GET /metrics");
        let mut stop = stop_rx.clone();
        tokio::spawn(skiff_metrics::serve(
            metrics_listener,
            Arc::new(registry),
            async move {
                let _ = stop.wait_for(|s| *s).await;
            },
        ));
        request_metrics
    };
    if let Some(address) = config.ui_listen {
        let failed = |reason: String| ServerError::Ui { address, reason };
        let ui_listener = match TcpListener::bind(address).await {
            Ok(listener) => listener,
            Err(e) if config.ui_fallback && e.kind() == std::io::ErrorKind::AddrInUse => {
                let listener = TcpListener::bind((address.ip(), 0))
                    .await
                    .map_err(|e| failed(e.to_string()))?;
                tracing::warn!(wanted = %address, chosen = ?listener.local_addr().ok(), "the dashboard's port is taken; serving it on another (choose one with --ui-listen)");
                listener
            }
            Err(e) => return Err(failed(e.to_string())),
        };
        // The dashboard calls this server's own API, as a client does.
        let api_ip = match listen.ip() {
            ip if !ip.is_unspecified() => ip,
            std::net::IpAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::IpAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        };
        let tls = if address.ip().is_loopback() {
            None
        } else {
            let credentials = trust.credentials().clone();
            Some(skiff_ui::https_config(credentials).map_err(|e| failed(e.to_string()))?)
        };
        let scheme = if tls.is_some() { "https" } else { "http" };
        let ui_config = skiff_ui::UiConfig {
            api: std::net::SocketAddr::new(api_ip, listen.port()).to_string(),
            ca_pem: trust.ca().cert_pem().to_string(),
            tls,
        };
        let bound = ui_listener.local_addr().unwrap_or(address);
        tracing::info!(url = %format!("{scheme}://{bound}/"), "serving the dashboard");
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let stopped = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            if let Err(e) = skiff_ui::serve(ui_listener, ui_config, stopped).await {
                tracing::error!(error = %e, "the dashboard stopped");
            }
        });
    }
    if secrets_key.is_none() {
        tracing::warn!(data_dir = %config.data_dir.display(), "no secrets key in the data dir: this server refuses secret calls and sends no secret values to agents");
    }
    let api = Api::new(consensus.clone(), config.name.clone())
        .with_limits(config.limits)
        .with_trust(trust.clone())
        .with_secrets_key(secrets_key.clone());
    let traffic_api = api.clone();
    let load_api = api.clone();
    let reconciler = tokio::spawn(controllers::run(
        consensus.clone(),
        api.heartbeats(),
        Arc::new(move || traffic_api.replica_traffic()),
        config.heartbeat_ttl,
        Arc::new(
            move |service: &str, http: bool| controllers::autoscale::Load {
                traffic: load_api.node_traffic(service, http),
                cpu: load_api.replica_cpu(service),
            },
        ),
        controllers::autoscale::Timings::from_window(config.autoscale_window),
        stop_rx.clone(),
    ));
    tokio::spawn(api.clone().background(stop_rx.clone()));
    if let Some(path) = config.client_config.clone() {
        let bootstrap =
            api.clone()
                .bootstrap_management_token(path, advertise.clone(), stop_rx.clone());
        tokio::spawn(bootstrap);
    }
    tracing::info!(name = %config.name, id, %listen, %advertise, data_dir = %config.data_dir.display(), "skiff server listening");
    let mut grpc_stop = stop_rx.clone();
    {
        let mut stop = stop_rx.clone();
        tokio::spawn(trust.clone().keep_renewed(async move {
            let _ = stop.wait_for(|s| *s).await;
        }));
    }
    let incoming = skiff_pki::tls::incoming(listener, trust.server_config()?);
    let limits = config.grpc_limits;
    let serve = tonic::transport::Server::builder()
        .max_concurrent_streams(limits.max_concurrent_streams)
        .timeout(limits.request_timeout)
        .layer(request_metrics)
        .layer(crate::api::AuthLayer::new(consensus.clone()))
        .add_service(
            ControlServer::new(api.clone()).max_decoding_message_size(limits.max_request_bytes),
        )
        .add_service(AgentSyncServer::new(api).max_decoding_message_size(limits.max_request_bytes))
        .add_service(
            PkiServer::new(PkiService::new(consensus.clone(), trust.clone()))
                .max_decoding_message_size(limits.max_request_bytes),
        )
        .add_service(
            RaftServer::new(RaftService::new(consensus.clone(), secrets_key).with_trust(trust))
                .max_decoding_message_size(limits.max_raft_message_bytes)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = grpc_stop.wait_for(|stop| *stop).await;
        });
    let serve = tokio::spawn(serve);

    let thread_done = async {
        loop {
            if consensus_thread.is_finished() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    tokio::select! {
        _ = shutdown => {}
        _ = thread_done => {}
    }
    tracing::info!("skiff server stopping");
    let _ = stop_tx.send(true);
    let _ = reconciler.await;
    // Agents' streams end with the process; do not wait on them forever.
    let _ = tokio::time::timeout(Duration::from_secs(2), serve).await;
    consensus.shutdown();
    let joined = tokio::task::spawn_blocking(move || consensus_thread.join())
        .await
        .map_err(|e| ServerError::Stopped(e.to_string()))?;
    let failure = match joined {
        Ok(Ok(())) => None,
        Ok(Err(err)) => Some(err.to_string()),
        Err(panic) => Some(panic_text(panic.as_ref())),
    };
    if let Some(failure) = failure {
        // After a failed write sled waits forever for a flush that cannot
        // happen, also when the Db is dropped: the process would hang
        // instead of exiting (measured on a full disk). What it holds is
        // on disk already as far as it got; the OS closes the files.
        std::mem::forget(db);
        return Err(ServerError::Stopped(stopped_hint(
            failure,
            &config.data_dir,
        )));
    }
    db.flush_async()
        .await
        .map_err(|source| ServerError::DataDir {
            path: raft_dir,
            source,
        })?;
    Ok(())
}

/// The message of a panic payload, when it has one.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> Option<&str> {
    panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
}

/// Why the consensus thread stopped when it panicked (raft-rs panics on a
/// storage error).
fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    let text = panic_message(panic).unwrap_or("no message");
    format!("the consensus thread panicked: {text}")
}

/// Why the server stopped, with the way out when the disk is full.
fn stopped_hint(failure: String, data_dir: &std::path::Path) -> String {
    if failure.contains("No space left on device") {
        format!(
            "{failure}: the disk of {} is full; free space there (or raise --reserve-disk-mb so writes stop earlier) and start the server again: nothing acknowledged was lost",
            data_dir.display()
        )
    } else {
        failure
    }
}

fn read_id(local: &sled::Tree) -> Result<u64, ServerError> {
    let bytes = local.get(SERVER_ID).map_err(StorageFailure::from)?;
    let bytes =
        bytes.ok_or_else(|| StorageFailure("data dir holds a cluster but no server id".into()))?;
    let bytes: [u8; 8] = bytes
        .as_ref()
        .try_into()
        .map_err(|_| StorageFailure("corrupt server id".into()))?;
    Ok(u64::from_be_bytes(bytes))
}

fn write_id(local: &sled::Tree, id: u64) -> Result<(), ServerError> {
    local
        .insert(SERVER_ID, &id.to_be_bytes())
        .map_err(StorageFailure::from)?;
    Ok(())
}

/// The id, the peers, the secrets key and the CA (certificate and key PEM)
/// of a Join answer.
type Joined = (u64, Vec<(u64, String)>, Option<SecretKey>, (String, String));

/// Asks any member to add this server, retrying for a bounded time while
/// the cluster elects a leader; the answer carries the cluster's secrets
/// key when the member holds one.
async fn join_cluster(
    address: &str,
    name: &str,
    advertise: &str,
    credentials: &Arc<skiff_pki::Credentials>,
) -> Result<Joined, ServerError> {
    let failed = |reason: String| ServerError::Join {
        address: address.to_string(),
        reason,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last_error = String::new();
    let config = credentials
        .client_config()
        .map_err(|e| failed(e.to_string()))?;
    let connector = skiff_pki::tls::connector(config, skiff_pki::identity::SERVER_NAME)
        .map_err(|e| failed(e.to_string()))?;
    while Instant::now() < deadline {
        let endpoint = endpoint(address).map_err(|e| failed(e.to_string()))?;
        match endpoint.connect_with_connector(connector.clone()).await {
            Ok(channel) => {
                let request = JoinRequest {
                    name: name.to_string(),
                    address: advertise.to_string(),
                };
                match RaftClient::new(channel).join(request).await {
                    Ok(response) => {
                        let response = response.into_inner();
                        let peers = response
                            .peers
                            .into_iter()
                            .map(|p| (p.id, p.address))
                            .collect();
                        let key = SecretKey::from_bytes(&response.secrets_key);
                        if response.ca_key_pem.is_empty() {
                            return Err(failed("the answering server holds no cluster CA".into()));
                        }
                        let ca = (response.ca_cert_pem, response.ca_key_pem);
                        return Ok((response.id, peers, key, ca));
                    }
                    Err(status) if status.code() == tonic::Code::Unavailable => {
                        last_error = status.message().to_string()
                    }
                    Err(status) => return Err(failed(status.message().to_string())),
                }
            }
            Err(err) => last_error = err.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Err(failed(last_error))
}
