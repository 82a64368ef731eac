//! Skiff's node agent: registers the node with the control plane over one
//! `AgentSync` stream, runs the allocations assigned to it as supervised
//! replicas, reports their state back, and re-adopts replicas that outlived a
//! previous agent process.
//!
//! The CLI calls [`run`] with an [`AgentConfig`] and a shutdown future; all
//! else is internal.

mod backoff;
mod config;
mod convert;
pub mod discovery;
mod error;
mod exec;
pub mod health;
pub mod image;
mod local;
mod log_times;
pub mod logs;
mod mem;
pub mod metrics;
pub mod proxy;
mod reconcile;
pub mod runtime;
pub mod secrets;
pub mod spec;
mod store;
mod supervisor;
mod sync;
mod usage;
pub mod volumes;

use std::future::Future;
use std::sync::Arc;

use tokio::sync::mpsc;

pub use config::AgentConfig;
pub use error::AgentError;
pub use runtime::RuntimeError;
pub use spec::SpecError;
pub use store::StoreError;

use local::LocalAllocs;
use runtime::any::AnyRuntime;
use runtime::oci::{images, OciConfig, OciRuntime};
use runtime::process::ProcessRuntime;
use store::AllocStore;
use supervisor::SupervisorConfig;

/// Runs the agent until `shutdown` resolves.
///
/// Replicas keep running while the control plane is unreachable. On shutdown
/// they are stopped (with `stop_grace`) only if
/// `config.stop_replicas_on_shutdown`; otherwise they are left running and
/// the next agent on the same `data_dir` re-adopts them.
pub async fn run(
    config: AgentConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), AgentError> {
    config.validate()?;
    mem::limit_arenas();
    let store = Arc::new(AllocStore::open(&config.data_dir)?);
    let (updates_tx, mut updates_rx) = mpsc::unbounded_channel();
    let supervisor_config = SupervisorConfig {
        stop_grace: config.stop_grace,
        drain: config.drain,
        ..SupervisorConfig::default()
    };
    let bridge = runtime::oci::bridge::BridgeNetwork::default();
    let discovery = discovery::Discovery::start(&config.data_dir, &bridge.bridge).await;
    let nameserver = discovery.as_ref().map(discovery::Discovery::nameserver);
    let mut oci_config = OciConfig::new(config.data_dir.join("oci"), store.alloc_dir(""));
    oci_config.nameserver = nameserver;
    oci_config.runtime = config.oci_runtime.clone();
    oci_config.init_binary = Some(config.init_binary.clone());
    oci_config.shim = runtime::oci::shim::binary();
    oci_config.volumes = volumes::Volumes::new(
        config.data_dir.join("volumes"),
        config.allow_host_paths.clone(),
    );
    let secrets = Arc::new(secrets::Secrets::new(config.secrets_dir.clone()));
    oci_config.secrets = Some(secrets.clone());
    let oci = Arc::new(OciRuntime::new(oci_config, images::open_store(&config)));
    let sweeper = oci.clone();
    tokio::task::spawn_blocking(move || sweeper.sweep_network());
    let image_gc = config.image_gc_threshold_mb.map(|mb| {
        tokio::spawn(runtime::oci::gc_loop(
            oci.clone(),
            mb.saturating_mul(1024 * 1024),
            config.image_gc_interval,
        ))
    });
    if config.process_runtime {
        tracing::warn!("process runtime enabled: `--runtime process` replicas run as host processes with the agent's rights");
    }
    let runtime = AnyRuntime {
        process: ProcessRuntime::new()
            .with_nameserver(nameserver)
            .with_secrets(secrets.clone()),
        oci: oci.clone(),
        process_allowed: config.process_runtime,
    };
    let allocs_dir = store.alloc_dir("");
    let kept_logs_dir = store.logs_dir().to_path_buf();
    let mut local = LocalAllocs::new(Arc::new(runtime), store, supervisor_config, updates_tx);
    local.recover()?;

    let credentials = establish_credentials(&config).await?;
    let (renew_stop, renew_stopped) = tokio::sync::oneshot::channel::<()>();
    let renewal = {
        let servers = config.servers.clone();
        tokio::spawn(skiff_pki::tls::keep_renewed(
            credentials.clone(),
            Some(skiff_pki::files::pki_dir(&config.data_dir)),
            move |credentials| {
                let servers = servers.clone();
                async move { skiff_pki::join::renew(&credentials, &servers).await }
            },
            async {
                let _ = renew_stopped.await;
            },
        ))
    };
    let tls_error = |e: skiff_pki::PkiError| AgentError::Config(format!("TLS setup failed: {e}"));
    let server_tls = credentials.server_config().map_err(tls_error)?;
    let client_tls = credentials.client_config().map_err(tls_error)?;

    let logs_bind = std::net::SocketAddr::new(config.advertise, config.logs_port);
    let listener = tokio::net::TcpListener::bind(logs_bind)
        .await
        .map_err(|e| {
            AgentError::Config(format!(
                "failed to listen for log requests on {logs_bind}: {e}"
            ))
        })?;
    let logs_addr = listener.local_addr().ok();
    let (logs_stop, logs_stopped) = tokio::sync::oneshot::channel::<()>();
    let log_service = logs::LogService::new(allocs_dir.clone())
        .with_kept_logs(kept_logs_dir)
        .with_images(oci.clone());
    let log_server = tokio::spawn(log_service.serve(listener, server_tls, async {
        let _ = logs_stopped.await;
    }));
    let rotation = tokio::spawn(logs::rotate_loop(
        allocs_dir,
        config.log_max_bytes,
        std::time::Duration::from_secs(10),
    ));
    let metrics_bind = config.metrics_listen.unwrap_or(std::net::SocketAddr::new(
        config.advertise,
        skiff_metrics::DEFAULT_AGENT_PORT,
    ));
    let metrics_listener = skiff_metrics::bind(metrics_bind, config.metrics_listen.is_some())
        .await
        .map_err(|e| {
            AgentError::Config(format!(
                "failed to listen for metrics on {metrics_bind}: {e} (choose another with --metrics-listen)"
            ))
        })?;
    let metrics_addr = metrics_listener.local_addr().ok();
    let proxy_metrics = metrics::Metrics::default();
    let mut registry = skiff_metrics::registry(&config.data_dir);
    proxy_metrics.register(&mut registry, &config.name, config.proxy_replica_metrics);
    image::PULL_METRICS.register(&mut registry);
    let (metrics_stop, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
    let metrics_server = tokio::spawn(skiff_metrics::serve(
        metrics_listener,
        std::sync::Arc::new(registry),
        async {
            let _ = metrics_stopped.await;
        },
    ));
    let mut proxy = proxy::Proxy::new(config.advertise, proxy_metrics.clone())
        .with_discovery(discovery)
        .with_privileged_ports(config.allow_privileged_ports);
    tracing::info!(node = %config.name, servers = ?config.servers, logs = ?logs_addr, metrics = ?metrics_addr, "agent started");

    {
        let mut sync = sync::SyncLoop::new(&config, &mut local, &mut updates_rx)
            .with_tls(client_tls)
            .with_logs_addr(logs_addr)
            .with_secrets(secrets)
            .with_proxy(&mut proxy, proxy_metrics, metrics_addr);
        tokio::select! {
            () = sync.run() => {}
            () = shutdown => {}
        }
    }
    rotation.abort();
    let _ = renew_stop.send(());
    let _ = renewal.await;
    if let Some(gc) = image_gc {
        gc.abort();
    }
    let _ = logs_stop.send(());
    let _ = log_server.await;
    let _ = metrics_stop.send(());
    let _ = metrics_server.await;

    tracing::info!(
        stop_replicas = config.stop_replicas_on_shutdown,
        "agent shutting down"
    );
    local.shutdown(config.stop_replicas_on_shutdown).await;
    Ok(())
}

/// This node's certificate: given by the caller, kept in `DATA/pki`, or
/// obtained from the first server that takes the join token.
async fn establish_credentials(
    config: &AgentConfig,
) -> Result<Arc<skiff_pki::Credentials>, AgentError> {
    use skiff_pki::{Credentials, JoinToken, Role};
    if let Some(credentials) = &config.credentials {
        return Ok(credentials.clone());
    }
    let dir = skiff_pki::files::pki_dir(&config.data_dir);
    match Credentials::load(&dir, Role::Agent, &config.name) {
        Ok(Some(credentials)) if credentials.not_after() > std::time::SystemTime::now() => {
            return Ok(credentials)
        }
        Ok(Some(_)) => {
            tracing::warn!(dir = %dir.display(), "this node's certificate has expired: joining again with the token")
        }
        Ok(None) => {}
        Err(err) => {
            return Err(AgentError::Config(format!(
                "cannot load this node's certificate from {}: {err}",
                dir.display()
            )))
        }
    }
    let token = config.join_token.as_deref().ok_or_else(|| {
        AgentError::Config(format!(
            "node {} has no certificate yet: start the agent with --token T (print T on a server with `skiff cluster token agent`)",
            config.name
        ))
    })?;
    let token = JoinToken::parse(token).map_err(AgentError::Config)?;
    let mut errors = Vec::new();
    for server in &config.servers {
        match skiff_pki::join::issue_for_join(
            &config.data_dir,
            server,
            Role::Agent,
            &config.name,
            &token,
        )
        .await
        {
            Ok(credentials) => {
                tracing::info!(%server, node = %config.name, "joined the cluster: certificate issued");
                return Ok(credentials);
            }
            Err(err) => errors.push(format!("{server}: {err}")),
        }
    }
    Err(AgentError::Config(format!(
        "could not join with the token: {}",
        errors.join("; ")
    )))
}
