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
use crate::metrics::Metrics;
use crate::proxy::{self, Proxy};
use crate::runtime::Runtime;
use crate::supervisor::StatusUpdate;

/// How often the node's volumes (and their sizes) are listed.
const VOLUME_REPORT_INTERVAL: Duration = Duration::from_secs(3);
const RECONNECT_BASE: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(2);
/// Between attempts of a node whose certificate the cluster revoked: it
/// gets nothing until an operator acts, so it asks rarely.
const REVOKED_RETRY: Duration = Duration::from_secs(30);
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

impl SyncError {
    /// The server refused this node because its certificate is revoked.
    pub fn is_revoked(&self) -> bool {
        matches!(self, SyncError::Stream { source, .. }
            if source.code() == tonic::Code::PermissionDenied && source.message().contains("revoked"))
    }
}

pub struct SyncLoop<'a, R: Runtime> {
    config: &'a AgentConfig,
    local: &'a mut LocalAllocs<R>,
    updates: &'a mut mpsc::UnboundedReceiver<StatusUpdate>,
    /// Set once the current server answered `Registered`.
    registered: bool,
    /// Where this agent serves `AgentLogs` (logs, exec); sent in `Register`.
    logs_addr: Option<std::net::SocketAddr>,
    /// The routing proxy fed by `Endpoints`, its counters reported as
    /// traffic, and where `/metrics` is served (published in a variable).
    proxy: Option<ProxyParts<'a>>,
    prepull: Prepull,
    /// The replicas' CPU and memory readings, sent with the traffic.
    usage: crate::usage::Usage,
    /// The secret values of the latest assignments (memory only).
    secrets: Option<std::sync::Arc<crate::secrets::Secrets>>,
    /// Mutual TLS with this node's certificate; `None` only in tests
    /// against a fake plaintext server.
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
}

/// Largest message the agent accepts from its server (tonic's default is
/// 4 MiB). A spec is at most `skiff_spec::limits::SPEC_BYTES` and every
/// allocation carries its spec, so a node's assignments of 256 replicas of
/// the largest spec still decode: no spec size can freeze a node.
const MAX_ASSIGNMENTS_BYTES: usize = 64 << 20;

/// Images the control plane asked this node to pull ahead (deployments in
/// progress), and those stored. Kept across sessions: a pull is started
/// once per image and the stored set is resent to each new server.
struct Prepull {
    requested: std::collections::HashSet<String>,
    ready: std::collections::BTreeSet<String>,
    done_tx: mpsc::UnboundedSender<String>,
    done_rx: mpsc::UnboundedReceiver<String>,
}

impl Prepull {
    fn new() -> Self {
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        Prepull {
            requested: Default::default(),
            ready: Default::default(),
            done_tx,
            done_rx,
        }
    }

    fn message(&self) -> AgentMsg {
        AgentMsg::ImagesReady(skiff_proto::v1::ImagesReady {
            images: self.ready.iter().cloned().collect(),
        })
    }
}

struct ProxyParts<'a> {
    proxy: &'a mut Proxy,
    metrics: Metrics,
    metrics_addr: Option<std::net::SocketAddr>,
    /// Requests counted at the previous report, per service, and when.
    last_report: Option<(Instant, std::collections::BTreeMap<String, u64>)>,
    /// The port failures last sent in this session (`None`: none yet).
    ports_sent: Option<Vec<crate::proxy::PortFailure>>,
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
            proxy: None,
            prepull: Prepull::new(),
            usage: crate::usage::Usage::default(),
            secrets: None,
            tls: None,
        }
    }

    /// Connects to the servers over mutual TLS with `config`.
    pub fn with_tls(mut self, config: std::sync::Arc<rustls::ClientConfig>) -> Self {
        self.tls = Some(config);
        self
    }

    /// Keeps the secret values of the assignments in `secrets`.
    pub fn with_secrets(mut self, secrets: std::sync::Arc<crate::secrets::Secrets>) -> Self {
        self.secrets = Some(secrets);
        self
    }

    /// Takes the secret values of new assignments, before the replicas
    /// that need them start (their names are logged, never their values).
    fn take_secrets(&mut self, values: Vec<skiff_proto::v1::SecretValue>) {
        let Some(secrets) = &self.secrets else {
            return;
        };
        let changed = secrets.set_values(values);
        if !changed.is_empty() {
            tracing::info!(secrets = ?changed, "new secret versions received");
        }
    }

    /// Replaces the files of running replicas that signal on a change of
    /// a secret whose value differs from their file, and signals them.
    /// Comparing contents (not versions) also catches a change made while
    /// this agent was down.
    fn signal_secret_changes(&self) {
        let Some(secrets) = &self.secrets else {
            return;
        };
        for (spec, pid) in self.local.running() {
            if !spec
                .secrets
                .iter()
                .any(|r| matches!(r.on_change, skiff_spec::OnChange::Signal(_)))
            {
                continue;
            }
            for signal in secrets.refresh(&spec.alloc_id, &spec.secrets) {
                let sent = signal
                    .parse::<nix::sys::signal::Signal>()
                    .map_err(|e| e.to_string())
                    .and_then(|sig| {
                        let pid = i32::try_from(pid).map_err(|e| e.to_string())?;
                        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig)
                            .map_err(|e| e.to_string())
                    });
                match sent {
                    Ok(()) => {
                        tracing::info!(alloc = %spec.alloc_id, %signal, "secret replaced; replica signalled")
                    }
                    Err(e) => {
                        tracing::warn!(alloc = %spec.alloc_id, %signal, error = %e, "secret replaced; signal failed")
                    }
                }
            }
        }
    }

    /// Routes published ports through `proxy` and reports `metrics`.
    pub fn with_proxy(
        mut self,
        proxy: &'a mut Proxy,
        metrics: Metrics,
        metrics_addr: Option<std::net::SocketAddr>,
    ) -> Self {
        self.proxy = Some(ProxyParts {
            proxy,
            metrics,
            metrics_addr,
            last_report: None,
            ports_sent: None,
        });
        self
    }

    /// The traffic seen since the agent started and every running
    /// replica's use (`crate::usage`); `None` when there is neither.
    /// The published ports the proxy cannot listen on, when they differ
    /// from what this session last sent: the control plane shows them per
    /// node and commits an event.
    fn ports_report(&mut self) -> Option<AgentMsg> {
        let parts = self.proxy.as_mut()?;
        let failures = parts.proxy.failures();
        if parts.ports_sent.as_ref() == Some(&failures) {
            return None;
        }
        parts.ports_sent = Some(failures.clone());
        let failures = failures
            .into_iter()
            .map(|f| skiff_proto::v1::PortFailure {
                service: f.service,
                port: u32::from(f.port),
                error: f.error,
                node: String::new(),
            })
            .collect();
        Some(AgentMsg::Ports(skiff_proto::v1::PublishedPorts {
            failures,
        }))
    }

    fn traffic_report(&mut self) -> Option<skiff_proto::v1::TrafficReport> {
        let services = self.service_traffic();
        let usage = self.replica_usage();
        (services.is_some() || usage.is_some()).then(|| skiff_proto::v1::TrafficReport {
            services: services.unwrap_or_default(),
            usage: usage.unwrap_or_default(),
        })
    }

    /// Every running replica's CPU and memory use; `None` when none was
    /// measured now nor at the previous report (an empty list tells the
    /// control plane the last replica measured is gone).
    fn replica_usage(&mut self) -> Option<Vec<skiff_proto::v1::ReplicaUsage>> {
        use crate::usage::{Replica, Source};
        let running: Vec<_> = self
            .local
            .running()
            .map(|(spec, pid)| {
                let cgroup = (spec.runtime == crate::spec::RuntimeKind::Oci)
                    .then(|| crate::runtime::oci::OciRuntime::cgroups_path(spec));
                (spec, pid, cgroup)
            })
            .collect();
        let replicas = running.iter().map(|(spec, pid, cgroup)| Replica {
            alloc_id: &spec.alloc_id,
            service: &spec.service,
            pid: *pid,
            cpu_millis: spec.cpu_millis,
            source: cgroup
                .as_deref()
                .map_or(Source::Process(*pid), Source::Cgroup),
        });
        let usage = self.usage.report(replicas, std::time::Instant::now())?;
        if let Some(parts) = &self.proxy {
            parts.metrics.set_replica_usage(usage.clone());
        }
        Some(
            usage
                .into_iter()
                .map(|u| skiff_proto::v1::ReplicaUsage {
                    alloc_id: u.alloc_id,
                    service: u.service,
                    cpu_percent: u.cpu_percent,
                    memory_bytes: u.memory_bytes,
                    ..Default::default()
                })
                .collect(),
        )
    }

    /// The traffic seen since the agent started, with request rates since
    /// the previous report; `None` when no service was ever published here.
    fn service_traffic(&mut self) -> Option<Vec<skiff_proto::v1::ServiceTraffic>> {
        let parts = self.proxy.as_mut()?;
        parts.proxy.retry();
        let samples = parts.metrics.samples();
        if samples.is_empty() {
            return None;
        }
        let now = Instant::now();
        let previous = parts.last_report.take();
        let services = samples
            .iter()
            .map(|s| {
                let request_rate = match &previous {
                    Some((at, counts)) => {
                        let secs = now.duration_since(*at).as_secs_f64();
                        let before = counts.get(&s.service).copied().unwrap_or(0);
                        if secs > 0.0 {
                            s.requests.saturating_sub(before) as f64 / secs
                        } else {
                            0.0
                        }
                    }
                    None => 0.0,
                };
                skiff_proto::v1::ServiceTraffic {
                    service: s.service.clone(),
                    connections: s.connections,
                    active: s.active,
                    bytes_in: s.bytes_in,
                    bytes_out: s.bytes_out,
                    connect_failures: s.connect_failures,
                    no_endpoint: s.no_endpoint,
                    requests: s.requests,
                    request_rate,
                    node: String::new(),
                    age_ms: 0,
                    waiting: s.waiting,
                    endpoints: s
                        .replicas
                        .iter()
                        .map(|r| skiff_proto::v1::EndpointTraffic {
                            alloc_id: r.alloc_id.clone(),
                            connections: r.connections,
                            connect_failures: r.connect_failures,
                            responses: r.responses,
                            errors: r.errors,
                            active: r.active,
                        })
                        .collect(),
                }
            })
            .collect();
        parts.last_report = Some((
            now,
            samples
                .into_iter()
                .map(|s| (s.service, s.requests))
                .collect(),
        ));
        Some(services)
    }

    /// Registers `addr` as where this node serves logs and exec.
    pub fn with_logs_addr(mut self, addr: Option<std::net::SocketAddr>) -> Self {
        self.logs_addr = addr;
        self
    }

    /// Syncs forever; the caller ends it by dropping the future (shutdown).
    pub async fn run(&mut self) {
        let mut backoff = Backoff::new(RECONNECT_BASE, RECONNECT_MAX);
        for server in self.config.servers.iter().cycle() {
            self.registered = false;
            let revoked = match self.session(server).await {
                Err(e) if e.is_revoked() => {
                    tracing::error!(error = %e, retry_in = ?REVOKED_RETRY, "this node's certificate is revoked: it receives no assignments (its replicas keep running); remove it (`skiff node rm`) and join it again with a new agent token, or stop this agent");
                    true
                }
                Err(e) => {
                    tracing::warn!(error = %e, "sync with control plane interrupted");
                    false
                }
                Ok(()) => false,
            };
            if self.registered {
                backoff.reset();
            }
            let delay = if revoked {
                jitter(REVOKED_RETRY)
            } else {
                jitter(backoff.next_delay())
            };
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
        let connected = match &self.tls {
            Some(config) => {
                // From the node's own loopback address, if it has one, so
                // packet filters can tell this agent apart (partition tests).
                let source = skiff_pki::tls::loopback_source(self.config.advertise);
                let connector = skiff_pki::tls::connector_from(
                    config.clone(),
                    skiff_pki::identity::SERVER_NAME,
                    source,
                )
                .expect("the server name is a valid DNS name");
                endpoint.connect_with_connector(connector).await
            }
            None => endpoint.connect().await,
        };
        let channel = connected.map_err(|source| SyncError::Connect {
            server: server.to_string(),
            source,
        })?;
        let mut client =
            AgentSyncClient::new(channel.clone()).max_decoding_message_size(MAX_ASSIGNMENTS_BYTES);

        // Register and the current statuses are queued before the call, so
        // a server that reads before answering finds them.
        let (outbound, rx) = mpsc::unbounded_channel();
        let mut register = convert::register(self.config);
        register.agent_address = self.logs_addr.map(|a| a.to_string()).unwrap_or_default();
        register.metrics_address = self
            .proxy
            .as_ref()
            .and_then(|p| p.metrics_addr)
            .map(|a| a.to_string())
            .unwrap_or_default();
        register.cpu_millis = self.config.cpu_millis;
        register.memory_mb = self.config.memory_mb;
        register.labels = self.config.labels.clone().into_iter().collect();
        send(&outbound, AgentMsg::Register(register));
        for status in self.local.statuses() {
            send(&outbound, AgentMsg::Status(convert::status(status)));
        }
        if !self.prepull.ready.is_empty() {
            send(&outbound, self.prepull.message());
        }
        if let Some(parts) = self.proxy.as_mut() {
            parts.ports_sent = None;
        }
        if let Some(ports) = self.ports_report() {
            send(&outbound, ports);
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
        let mut traffic = tokio::time::interval(self.config.traffic_interval);
        traffic.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let demand = self.proxy.as_ref().map(|p| p.metrics.demand());
        // The node's volumes: listed (with their sizes) now and every few
        // seconds, reported when they changed.
        let volumes = crate::volumes::Volumes::new(
            self.config.data_dir.join("volumes"),
            self.config.allow_host_paths.clone(),
        );
        let mut volume_tick = tokio::time::interval(VOLUME_REPORT_INTERVAL);
        volume_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let (volumes_tx, mut volumes_rx) = mpsc::unbounded_channel();
        let mut volumes_sent = None;

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
                        }
                        Some(ServerMsg::Assignments(mut assignments)) => {
                            tracing::debug!(index = assignments.index, count = assignments.allocations.len(), "assignments received");
                            self.take_secrets(std::mem::take(&mut assignments.secrets));
                            let mut assigned = Vec::new();
                            let mut refused = Vec::new();
                            for alloc in &assignments.allocations {
                                match convert::assigned(alloc) {
                                    Ok(a) => assigned.push(a),
                                    Err(e) => refused.push((alloc.id.clone(), e.to_string())),
                                }
                            }
                            // Volumes `skiff volume rm` removed, unless a
                            // replica here is still meant to use one.
                            for name in assignments.remove_volumes {
                                let used = assigned.iter().any(|a| {
                                    a.desired == crate::reconcile::Desired::Run
                                        && a.spec.mounts.iter().any(|m| {
                                            m.kind == skiff_spec::MountKind::Volume && m.source == name
                                        })
                                });
                                if used {
                                    tracing::warn!(volume = %name, "not removing a volume a replica here uses");
                                    continue;
                                }
                                let (volumes, listed) = (volumes.clone(), volumes_tx.clone());
                                tokio::task::spawn_blocking(move || {
                                    if let Err(e) = volumes.remove(&name) {
                                        tracing::warn!(volume = %name, error = %e, "volume not removed");
                                    }
                                    let _ = listed.send(volumes.list());
                                });
                            }
                            self.local.assign(assigned, refused);
                            self.signal_secret_changes();
                            for image in assignments.prepull {
                                if self.prepull.requested.insert(image.clone()) {
                                    let (runtime, done) = (self.local.runtime(), self.prepull.done_tx.clone());
                                    tokio::spawn(async move {
                                        tracing::info!(%image, "pulling ahead for a deployment");
                                        match runtime.prefetch(&image).await {
                                            Ok(()) => { let _ = done.send(image); }
                                            Err(e) => tracing::warn!(%image, error = %e, "pre-pull failed"),
                                        }
                                    });
                                }
                            }
                        }
                        Some(ServerMsg::Endpoints(endpoints)) => {
                            let routes = proxy::routes_from_pb(&endpoints);
                            tracing::debug!(services = routes.len(), "endpoints received");
                            if let Some(parts) = self.proxy.as_mut() {
                                parts.proxy.update(routes);
                            }
                            if let Some(ports) = self.ports_report() {
                                send(&outbound, ports);
                            }
                        }
                        None => tracing::debug!(%server, "ignoring empty server message"),
                    }
                }
                Some(update) = self.updates.recv() => {
                    // Updates queued meanwhile go out together, each
                    // replica's latest only: a replica that went starting,
                    // running, healthy since the last turn costs the control
                    // plane one report, not three.
                    let mut batch = vec![update];
                    while let Ok(update) = self.updates.try_recv() {
                        batch.push(update);
                    }
                    for (i, update) in batch.iter().enumerate() {
                        self.local.observe(update);
                        let superseded = batch[i + 1..].iter().any(|u| u.alloc_id == update.alloc_id);
                        if !superseded {
                            send(&outbound, AgentMsg::Status(convert::status(update)));
                        }
                    }
                }
                Some(image) = self.prepull.done_rx.recv() => {
                    self.prepull.ready.insert(image);
                    send(&outbound, self.prepull.message());
                }
                _ = volume_tick.tick() => {
                    let (volumes, listed) = (volumes.clone(), volumes_tx.clone());
                    tokio::task::spawn_blocking(move || {
                        let _ = listed.send(volumes.list());
                    });
                }
                Some(listed) = volumes_rx.recv() => {
                    if volumes_sent.as_ref() != Some(&listed) {
                        send(&outbound, AgentMsg::Volumes(convert::volumes_report(&self.config.name, &listed)));
                        volumes_sent = Some(listed);
                    }
                }
                () = tick(&mut heartbeat) => {
                    send(&outbound, AgentMsg::Heartbeat(Heartbeat {}));
                }
                () = report_due(&mut traffic, demand.as_deref()) => {
                    if let Some(report) = self.traffic_report() {
                        send(&outbound, AgentMsg::Traffic(report));
                    }
                    if let Some(ports) = self.ports_report() {
                        send(&outbound, ports);
                    }
                }
            }
        }
    }
}

/// Queues a message on the stream. A failed send means the stream is gone,
/// which the inbound side reports; the status is resent after reconnecting.
fn send(outbound: &mpsc::UnboundedSender<AgentMessage>, msg: AgentMsg) {
    let _ = outbound.send(AgentMessage { msg: Some(msg) });
}

/// Waits until traffic is to be reported: at every tick of `period`, and
/// at once when a connection starts waiting for a replica (`demand`), so
/// the control plane wakes a service at zero without waiting for the next
/// tick; the period then starts over.
async fn report_due(period: &mut Interval, demand: Option<&tokio::sync::Notify>) {
    let demanded = async {
        match demand {
            Some(demand) => demand.notified().await,
            None => future::pending().await,
        }
    };
    tokio::select! {
        _ = period.tick() => {}
        () = demanded => period.reset(),
    }
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
    fn only_a_refusal_for_revocation_counts_as_revoked() {
        let stream = |code, message: &str| SyncError::Stream {
            server: "s".into(),
            source: tonic::Status::new(code, message),
        };
        assert!(stream(tonic::Code::PermissionDenied, "node n1 is revoked").is_revoked());
        assert!(!stream(tonic::Code::PermissionDenied, "wrong certificate").is_revoked());
        assert!(!stream(tonic::Code::Unavailable, "revoked").is_revoked());
        assert!(!SyncError::Closed { server: "s".into() }.is_revoked());
    }

    #[test]
    fn jitter_stays_within_a_fifth_of_the_delay() {
        for _ in 0..100 {
            let d = jitter(Duration::from_secs(1));
            assert!(d >= Duration::from_millis(800) && d <= Duration::from_millis(1200));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn traffic_is_reported_within_100ms_of_demand_and_the_period_starts_over() {
        let period = Duration::from_secs(2);
        let mut traffic = tokio::time::interval(period);
        let demand = std::sync::Arc::new(tokio::sync::Notify::new());
        // The first tick is at once.
        report_due(&mut traffic, Some(&demand)).await;
        let start = Instant::now();
        let signal = demand.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            signal.notify_one();
        });
        report_due(&mut traffic, Some(&demand)).await;
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_millis(300) && waited < Duration::from_millis(400),
            "{waited:?}"
        );
        // The next periodic report comes a whole period after that one.
        let after_demand = Instant::now();
        report_due(&mut traffic, Some(&demand)).await;
        assert!(
            after_demand.elapsed() >= period,
            "{:?}",
            after_demand.elapsed()
        );
        // Without a proxy, only the period reports.
        let before = Instant::now();
        report_due(&mut traffic, None).await;
        assert!(before.elapsed() >= period - Duration::from_millis(1));
    }
}
