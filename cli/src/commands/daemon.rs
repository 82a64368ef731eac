//! `skiff server`, `skiff agent` and `skiff dev`: the long-running commands.
//! Each binds its listener, builds its library config and runs until
//! SIGINT or SIGTERM.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use anyhow::Context;
use skiff_agent::AgentConfig;
use skiff_control_plane::{RaftLog, ServerConfig};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::args::{AgentArgs, DevArgs, NodeArgs, RaftLogArg, ServerArgs};

pub async fn server(args: ServerArgs) -> anyhow::Result<()> {
    let listener = bind(args.listen).await?;
    // Where the management token goes (see `ServerConfig::client_config`).
    let client_config = args
        .bootstrap
        .then(|| args.data_dir.join(skiff_control_plane::CLIENT_CONFIG_FILE));
    let mut config = ServerConfig::new(args.name, args.data_dir);
    config.client_config = client_config;
    config.bootstrap = args.bootstrap;
    config.join = args.join;
    config.advertise = args.advertise;
    config.tick = Duration::from_millis(args.tick_ms.max(1));
    config.election_ticks = args.election_ticks;
    config.snapshot_every = args.snapshot_every.max(1);
    config.raft_log = match args.raft_log {
        RaftLogArg::Sled => RaftLog::Sled,
        RaftLogArg::Wal => RaftLog::Wal,
    };
    config.heartbeat_ttl = Duration::from_millis(u64::from(args.heartbeat_ttl));
    config.metrics_listen = args.metrics_listen;
    config.ui_listen = args.ui_listen;
    config.autoscale_window = Duration::from_millis(u64::from(args.autoscale_window));
    config.limits = skiff_control_plane::Limits {
        max_services: args.max_services,
        max_variables: args.max_variables,
    };
    config.reserve_disk_bytes = args.reserve_disk_mb.saturating_mul(1 << 20);
    config.grpc_limits = skiff_control_plane::GrpcLimits {
        max_request_bytes: args.max_request_bytes as usize,
        max_raft_message_bytes: args.max_raft_message_bytes as usize,
        max_concurrent_streams: args.max_concurrent_streams,
        request_timeout: Duration::from_millis(u64::from(args.request_timeout.max(1))),
    };
    config.join_token = args.join_token;
    config.cert_lifetime = args.cert_lifetime;
    config.restore = args.restore;
    config.recover = args.recover;
    config.truncate_corrupt_log = args.truncate_corrupt_log;
    skiff_control_plane::run(config, listener, wait_for_signal()).await?;
    Ok(())
}

pub async fn agent(args: AgentArgs) -> anyhow::Result<()> {
    let mut config = agent_config(args.name, args.data_dir, args.servers, &args.node, false);
    config.process_runtime = args.enable_process_runtime;
    config.join_token = args.join_token;
    config.advertise = match args.node.advertise {
        Some(address) => address,
        None => default_advertise(),
    };
    skiff_agent::run(config, wait_for_signal()).await?;
    Ok(())
}

/// One server and one agent in this process; Ctrl-C stops the replicas too.
pub async fn dev(args: DevArgs) -> anyhow::Result<()> {
    let listener = bind(args.listen).await?;
    let address = listener.local_addr()?;
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("failed to create data dir {}", args.data_dir.display()))?;
    let data_dir = std::fs::canonicalize(&args.data_dir)?;
    let mut server_config = ServerConfig::new("dev-server", data_dir.join("server"));
    server_config.bootstrap = true;
    let client_config = data_dir.join(skiff_control_plane::CLIENT_CONFIG_FILE);
    server_config.client_config = Some(client_config.clone());
    server_config.autoscale_window = Duration::from_millis(u64::from(args.autoscale_window));
    server_config.metrics_listen = args.server_metrics_listen;
    server_config.ui_listen = dev_ui_listen(&args)?;
    // Another dev cluster may take the probed port before the server binds it.
    server_config.ui_fallback = args.ui_listen.is_none();
    let ui_listen = server_config.ui_listen;
    let mut agent = agent_config(
        args.name,
        data_dir.join("agent"),
        vec![address.to_string()],
        &args.node,
        true,
    );
    // The dev cluster is the machine's own user's playground, like
    // Nomad's dev mode: host processes are allowed (and logged).
    agent.process_runtime = true;
    // Its published ports are on loopback, and the machine is its user's:
    // `--publish 80` works as with `docker run -p 80:80`.
    agent.allow_privileged_ports = true;
    // And its user's `docker login` is theirs to use for any image.
    if agent.registry_auth_scopes.is_empty() {
        agent.registry_auth_scopes = vec!["*".to_string()];
    }
    // One process holds the CA: the agent's certificate comes from it
    // directly (the server loads the same CA when it starts).
    agent.credentials = Some(dev_credentials(&server_config, &agent)?);

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let server = tokio::spawn(skiff_control_plane::run(
        server_config,
        listener,
        stopped(stop_rx.clone()),
    ));
    let agent = tokio::spawn(skiff_agent::run(agent, stopped(stop_rx)));
    let dashboard = match ui_listen {
        Some(ui) => format!(
            "Dashboard: {}://{ui}/ (log in with the token in {})\n",
            if ui.ip().is_loopback() {
                "http"
            } else {
                "https"
            },
            client_config.display()
        ),
        None => String::new(),
    };
    println!(
        "skiff dev: server and agent running, API on {address}, data in {}\n{dashboard}\
         \nThe CLI finds the API address and the admin token in {} when run in this directory;\nelsewhere: export SKIFF_CLIENT_CONFIG={}\n\n  skiff service create demo --replicas 2 -- python3 -m http.server '$PORT'\n  skiff service ps demo\n  skiff node ls\n\nPress Ctrl-C to stop (replicas are stopped too).",
        data_dir.display(),
        client_config.display(),
        client_config.display(),
    );
    let mut server = server;
    tokio::select! {
        _ = wait_for_signal() => {}
        ended = &mut server => {
            // The server only ends on its own when something failed: say what.
            let _ = stop_tx.send(true);
            let _ = tokio::time::timeout(Duration::from_secs(60), agent).await;
            return match ended {
                Ok(Ok(())) => Err(anyhow::anyhow!("the server stopped unexpectedly")),
                Ok(Err(err)) => Err(anyhow::Error::new(err).context("the server stopped")),
                Err(panic) => Err(anyhow::anyhow!("the server panicked: {panic}")),
            };
        }
    }
    let _ = stop_tx.send(true);
    // The agent stops its replicas (SIGTERM, then SIGKILL after the grace).
    match tokio::time::timeout(Duration::from_secs(60), agent).await {
        Ok(joined) => joined.context("agent task panicked")??,
        Err(_) => tracing::warn!("agent did not stop within 60 s"),
    }
    server.await.context("server task panicked")??;
    Ok(())
}

/// Where `skiff dev` serves the dashboard: `--ui-listen`, else
/// [`skiff_ui::DEFAULT_DEV_ADDRESS`] or, when that port is taken (another
/// dev cluster), any free port on loopback; `None` with `--no-ui`.
fn dev_ui_listen(args: &DevArgs) -> anyhow::Result<Option<std::net::SocketAddr>> {
    if args.no_ui {
        return Ok(None);
    }
    if let Some(address) = args.ui_listen {
        return Ok(Some(address));
    }
    let wanted: std::net::SocketAddr = skiff_ui::DEFAULT_DEV_ADDRESS.parse()?;
    // Probed here so the URL printed is the one served.
    let probe = std::net::TcpListener::bind(wanted)
        .or_else(|_| std::net::TcpListener::bind((wanted.ip(), 0)))
        .context(
            "failed to find a port for the dashboard (choose one with --ui-listen, or --no-ui)",
        )?;
    let chosen = probe.local_addr()?;
    if chosen != wanted {
        tracing::warn!(%wanted, %chosen, "the default dashboard port is taken; serving it on another (choose one with --ui-listen)");
    }
    Ok(Some(chosen))
}

/// The dev server's CA (created on the first start) and a certificate
/// from it for the dev agent.
fn dev_credentials(
    server: &ServerConfig,
    agent: &AgentConfig,
) -> anyhow::Result<std::sync::Arc<skiff_pki::Credentials>> {
    use skiff_pki::{Credentials, Role};
    let trust = skiff_control_plane::trust::load_or_bootstrap(
        &server.data_dir,
        &server.name,
        server.cert_lifetime,
        true,
        None,
    )?
    .context("the dev server's CA")?;
    let key = Credentials::generate_key()?;
    let issued = trust.issue(Role::Agent, &agent.name, key.public_key_raw())?;
    let credentials = Credentials::new(
        Role::Agent,
        &agent.name,
        &key,
        &issued,
        trust.ca().cert_pem(),
    )?;
    credentials.save(&skiff_pki::files::pki_dir(&agent.data_dir))?;
    Ok(credentials)
}

fn agent_config(
    name: String,
    data_dir: std::path::PathBuf,
    servers: Vec<String>,
    node: &NodeArgs,
    stop_on_shutdown: bool,
) -> AgentConfig {
    let mut config = AgentConfig::new(name, data_dir, servers);
    // `skiff dev` stays on loopback unless told: a dev cluster (and every
    // test that starts one) must not be reachable from the network.
    config.advertise = node.advertise.unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
    config.port_range = node.port_range;
    config.stop_grace = Duration::from_secs(node.stop_grace_secs);
    config.stop_replicas_on_shutdown = stop_on_shutdown;
    config.oci_runtime = node.oci_runtime.clone();
    config.insecure_registries = node.insecure_registries.clone();
    config.docker_config = node.docker_config.clone();
    if let Some(cpu) = node.cpu_millis {
        config.cpu_millis = cpu;
    }
    if let Some(memory) = node.memory_mb {
        config.memory_mb = memory;
    }
    config.labels = node.labels.iter().cloned().collect();
    config.allow_host_paths = node.allow_host_paths.clone();
    config.metrics_listen = node.metrics_listen;
    config.proxy_replica_metrics = node.proxy_replica_metrics;
    config.allow_privileged_ports = node.allow_privileged_ports;
    config.registry_auth_scopes = node.registry_auth_scopes.clone();
    config.drain = Duration::from_secs_f64(node.drain_secs);
    config.image_gc_threshold_mb = node.image_gc_threshold_mb;
    config
}

/// `skiff agent`'s advertise address when none is given: the address of
/// the interface holding the default route, which other machines can
/// reach (as Nomad's client picks), else loopback; said either way, since
/// the wrong one makes the node's replicas unreachable from other nodes.
fn default_advertise() -> IpAddr {
    match AgentConfig::default_route_address() {
        Some((interface, address)) => {
            eprintln!(
                "advertising {address}, the address of {interface} (the interface of the default route); choose another with --advertise"
            );
            address
        }
        None => {
            let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
            eprintln!(
                "advertising {loopback}: no default route, so only this machine reaches the replicas; choose another with --advertise"
            );
            loopback
        }
    }
}

async fn bind(address: std::net::SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(address)
        .await
        .with_context(|| format!("failed to listen on {address} (is another skiff running? choose another with --listen)"))
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(term) => term,
        Err(err) => {
            tracing::warn!(error = %err, "cannot watch SIGTERM; only Ctrl-C stops skiff");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
