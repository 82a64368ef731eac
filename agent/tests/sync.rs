//! The agent against a fake control plane on loopback: registration,
//! heartbeats, assignments run as real processes, statuses resent after a
//! reconnect while the replica keeps running, stop on desired "stop", and
//! failover past a dead server.

use std::collections::HashMap;
use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

use skiff_agent::AgentConfig;
use skiff_pki::{ClusterCa, Credentials, Role};
use skiff_proto::v1::agent_message::Msg as AgentMsg;
use skiff_proto::v1::agent_sync_server::{AgentSync, AgentSyncServer};
use skiff_proto::v1::server_message::Msg as ServerMsg;
use skiff_proto::v1::{
    AgentMessage, Allocation, AllocationStatus, Assignments, Registered, ServerMessage, ServiceSpec,
};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

/// One accepted `Sync` call: what the agent sends, and a way to answer.
struct Session {
    from_agent: mpsc::UnboundedReceiver<AgentMessage>,
    to_agent: mpsc::Sender<Result<ServerMessage, Status>>,
}

struct FakeServer {
    sessions: mpsc::UnboundedSender<Session>,
}

#[tonic::async_trait]
impl AgentSync for FakeServer {
    type SyncStream = ReceiverStream<Result<ServerMessage, Status>>;

    async fn sync(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::SyncStream>, Status> {
        let mut inbound = request.into_inner();
        let (from_tx, from_agent) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(Some(message)) = inbound.message().await {
                if from_tx.send(message).is_err() {
                    break;
                }
            }
        });
        let (to_agent, rx) = mpsc::channel(16);
        let _ = self.sessions.send(Session {
            from_agent,
            to_agent,
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// This test binary's cluster CA: the fake server and the agent get their
/// certificates from it, as a real cluster's would.
fn ca() -> &'static ClusterCa {
    static CA: OnceLock<ClusterCa> = OnceLock::new();
    CA.get_or_init(|| ClusterCa::create().unwrap())
}

fn credentials(role: Role, name: &str) -> std::sync::Arc<Credentials> {
    let key = Credentials::generate_key().unwrap();
    let issued = ca()
        .issue(role, name, key.public_key_raw(), Duration::from_secs(3600))
        .unwrap();
    Credentials::new(role, name, &key, &issued, ca().cert_pem()).unwrap()
}

/// A fake server over mutual TLS with a server certificate of [`ca`].
async fn serve() -> (String, mpsc::UnboundedReceiver<Session>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (sessions, rx) = mpsc::unbounded_channel();
    let tls = credentials(Role::Server, "fake").server_config().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AgentSyncServer::new(FakeServer { sessions }))
            .serve_with_incoming(skiff_pki::tls::incoming(listener, tls)),
    );
    (addr, rx)
}

impl Session {
    async fn next(&mut self) -> AgentMsg {
        tokio::time::timeout(Duration::from_secs(10), self.from_agent.recv())
            .await
            .expect("agent went quiet")
            .expect("stream closed")
            .msg
            .expect("empty message")
    }

    /// Skips heartbeats and other statuses until `alloc` reports `state`.
    async fn status(&mut self, alloc: &str, state: &str) -> AllocationStatus {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            assert!(
                std::time::Instant::now() < deadline,
                "{alloc} never reported {state} within 30 s"
            );
            if let AgentMsg::Status(s) = self.next().await {
                if s.id == alloc && s.state == state {
                    return s;
                }
            }
        }
    }

    async fn send(&self, msg: ServerMsg) {
        self.to_agent
            .send(Ok(ServerMessage { msg: Some(msg) }))
            .await
            .unwrap();
    }

    async fn assign(&self, index: u64, allocs: Vec<Allocation>) {
        self.send(ServerMsg::Assignments(Assignments {
            remove_volumes: vec![],
            secrets: vec![],
            index,
            allocations: allocs,
            prepull: Vec::new(),
        }))
        .await;
    }
}

fn alloc(id: &str, desired: &str, command: &[&str]) -> Allocation {
    Allocation {
        id: id.into(),
        service: "web".into(),
        node: "n1".into(),
        desired: desired.into(),
        host_port: 20001,
        spec: Some(ServiceSpec {
            name: "web".into(),
            runtime: "process".into(),
            replicas: 1,
            command: command.iter().map(|s| s.to_string()).collect(),
            env: HashMap::new(),
            workdir: String::new(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            let state = s.rsplit(')').next().unwrap_or("").trim_start();
            !state.starts_with('Z')
        })
        .unwrap_or(false)
}

async fn wait_gone(pid: u32) {
    for _ in 0..100 {
        if !alive(pid) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("process {pid} still alive");
}

fn config(dir: &Path, servers: Vec<String>) -> AgentConfig {
    let mut config = AgentConfig::new("n1", dir.to_path_buf(), servers);
    config.advertise = "127.0.0.7".parse().unwrap();
    config.port_range = (21000, 21099);
    config.stop_grace = Duration::from_secs(2);
    // The fake server assigns process replicas.
    config.process_runtime = true;
    config.credentials = Some(credentials(Role::Agent, "n1"));
    config
}

#[tokio::test]
async fn agent_registers_runs_assignments_and_survives_a_reconnect() {
    let dir = tempfile::tempdir().unwrap();
    let (addr, mut sessions) = serve().await;
    // A dead server first: the agent must move on to the live one.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let mut config = config(dir.path(), vec![dead, addr]);
    config.stop_replicas_on_shutdown = true;
    let (shutdown, shutdown_rx) = oneshot::channel::<()>();
    let agent = tokio::spawn(skiff_agent::run(config, async {
        let _ = shutdown_rx.await;
    }));

    let mut s = tokio::time::timeout(Duration::from_secs(10), sessions.recv())
        .await
        .unwrap()
        .unwrap();
    let AgentMsg::Register(register) = s.next().await else {
        panic!("register must come first");
    };
    assert_eq!(
        (
            register.node.as_str(),
            register.address.as_str(),
            register.port_range_start,
            register.port_range_end
        ),
        ("n1", "127.0.0.7", 21000, 21099)
    );
    s.send(ServerMsg::Registered(Registered {
        node: "n1".into(),
        heartbeat_interval_ms: 100,
    }))
    .await;
    s.assign(1, vec![alloc("a1", "run", &["sleep", "30"])])
        .await;
    s.status("a1", "starting").await;
    let running = s.status("a1", "running").await;
    assert!(running.pid > 0 && alive(running.pid));
    loop {
        if let AgentMsg::Heartbeat(_) = s.next().await {
            break;
        }
    }

    // The server goes away; the replica keeps running and the agent
    // reconnects, registers again and resends the replica's status.
    drop(s);
    let mut s = tokio::time::timeout(Duration::from_secs(10), sessions.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(s.next().await, AgentMsg::Register(_)));
    let resent = s.status("a1", "running").await;
    assert_eq!(resent.pid, running.pid);
    assert!(alive(running.pid));

    // Desired stop stops it.
    s.assign(2, vec![alloc("a1", "stop", &["sleep", "30"])])
        .await;
    let stopped = s.status("a1", "stopped").await;
    assert_eq!(stopped.pid, 0);
    wait_gone(running.pid).await;

    // A missing executable is reported failed, with the reason.
    s.assign(3, vec![alloc("b1", "run", &["python4-does-not-exist"])])
        .await;
    let failed = s.status("b1", "failed").await;
    assert!(
        failed.message.starts_with(
            "failed to start replica b1 of web: python4-does-not-exist: No such file or directory"
        ),
        "{}",
        failed.message
    );

    shutdown.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(20), agent)
        .await
        .expect("agent did not shut down")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn replicas_outlive_the_agent_and_are_re_adopted() {
    let dir = tempfile::tempdir().unwrap();
    let (addr, mut sessions) = serve().await;
    let start_agent = |servers: Vec<String>| {
        let (shutdown, rx) = oneshot::channel::<()>();
        let agent = tokio::spawn(skiff_agent::run(config(dir.path(), servers), async {
            let _ = rx.await;
        }));
        (shutdown, agent)
    };

    let (shutdown, agent) = start_agent(vec![addr.clone()]);
    let mut s = sessions.recv().await.unwrap();
    assert!(matches!(s.next().await, AgentMsg::Register(_)));
    s.assign(1, vec![alloc("a1", "run", &["sleep", "30"])])
        .await;
    let running = s.status("a1", "running").await;
    shutdown.send(()).unwrap();
    agent.await.unwrap().unwrap();
    assert!(
        alive(running.pid),
        "left running when not told to stop replicas"
    );

    let (shutdown, agent) = start_agent(vec![addr]);
    let mut s = sessions.recv().await.unwrap();
    assert!(matches!(s.next().await, AgentMsg::Register(_)));
    let adopted = s.status("a1", "running").await;
    assert_eq!(adopted.pid, running.pid);

    // Omitted from the full set: stopped.
    s.assign(2, vec![]).await;
    s.status("a1", "stopped").await;
    wait_gone(running.pid).await;
    shutdown.send(()).unwrap();
    agent.await.unwrap().unwrap();
}
