//! Secure by default (#14): mutual TLS with role-checked certificates,
//! join tokens that pin the CA, node identity, revocation and renewal,
//! against real `skiff server` and `skiff agent` processes. The raw calls
//! are made with hand-made clients holding certificates of the cluster's
//! own CA (read from the bootstrap server's data dir), or none.

use std::time::{Duration, Instant};

use skiff_e2e::agents::{on_loopback, AgentCluster};
use skiff_e2e::servers::ServerCluster;
use skiff_e2e::{join_token, skiff_at, skiff_bin, skiff_ok_at, wait_until, POLL};
use skiff_pki::identity::SERVER_NAME;
use skiff_pki::tls::{self, Credentials};
use skiff_pki::{ClusterCa, Role};
use skiff_proto::raft::raft_client::RaftClient;
use skiff_proto::raft::{JoinRequest, ProposeRequest, RaftBatch};
use skiff_proto::v1::agent_message::Msg as AgentMsg;
use skiff_proto::v1::agent_sync_client::AgentSyncClient;
use skiff_proto::v1::control_client::ControlClient;
use skiff_proto::v1::{AgentMessage, Register, ReportHeartbeatsRequest};
use tonic::transport::{Channel, Endpoint};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn cluster_ca(servers: &ServerCluster) -> ClusterCa {
    ClusterCa::load(&servers.data_dir(0).join("pki"))
        .unwrap()
        .expect("the bootstrap server holds the CA")
}

/// Credentials of `role` for `name`, issued by `ca` (as a join would).
fn credentials(ca: &ClusterCa, role: Role, name: &str) -> std::sync::Arc<Credentials> {
    let key = Credentials::generate_key().unwrap();
    let issued = ca
        .issue(role, name, key.public_key_raw(), Duration::from_secs(600))
        .unwrap();
    Credentials::new(role, name, &key, &issued, ca.cert_pem()).unwrap()
}

/// A TLS channel to `address` verifying the server against the CA, with
/// `client` as the client certificate (or none).
async fn channel(
    address: &str,
    ca: &ClusterCa,
    client: Option<&std::sync::Arc<Credentials>>,
) -> Channel {
    let config = match client {
        Some(credentials) => credentials.client_config().unwrap(),
        None => tls::anonymous_client_config(ca.cert_pem()).unwrap(),
    };
    let connector = tls::connector(config, SERVER_NAME).unwrap();
    Endpoint::from_shared(format!("http://{address}"))
        .unwrap()
        .timeout(Duration::from_secs(5))
        .connect_with_connector(connector)
        .await
        .expect("TLS connection")
}

fn assert_denied<T: std::fmt::Debug>(what: &str, result: Result<T, tonic::Status>) {
    match result {
        Err(status) => assert_eq!(
            status.code(),
            tonic::Code::PermissionDenied,
            "{what}: {status:?}"
        ),
        Ok(answer) => panic!("{what} was accepted: {answer:?}"),
    }
}

/// The cluster still has a leader and commits a write.
fn assert_still_commits(servers: &ServerCluster, key: &str) {
    let server = &servers.addresses[0];
    skiff_ok_at(server, &["var", "put", key, "still-committing"]);
    assert_eq!(
        skiff_ok_at(server, &["var", "get", key]).trim(),
        "still-committing"
    );
}

#[test]
fn raft_calls_need_a_server_certificate_and_plaintext_gets_nothing() {
    let servers = ServerCluster::start(1, &[]);
    let ca = cluster_ca(&servers);
    let address = servers.addresses[0].clone();
    let agent = credentials(&ca, Role::Agent, "a1");
    runtime().block_on(async {
        for (who, client) in [
            ("no certificate", None),
            ("an agent certificate", Some(&agent)),
        ] {
            let mut raft = RaftClient::new(channel(&address, &ca, client).await);
            let join = raft
                .join(JoinRequest {
                    name: "ghost".into(),
                    address: "127.0.0.1:1".into(),
                })
                .await;
            assert_denied(&format!("Join with {who}"), join);
            let propose = raft
                .propose(ProposeRequest {
                    command: br#"{"Command":{"SetNodeStatus":{"name":"a1","status":"Down"}}}"#
                        .to_vec(),
                })
                .await;
            assert_denied(&format!("Propose with {who}"), propose);
            let batch = RaftBatch {
                from: 1,
                messages: Vec::new(),
            };
            let send = raft.send(tokio_stream_once(batch)).await;
            assert_denied(&format!("Send with {who}"), send);
            let mut control = ControlClient::new(channel(&address, &ca, client).await);
            let report = control
                .report_heartbeats(ReportHeartbeatsRequest {
                    server: "s9".into(),
                    ..Default::default()
                })
                .await;
            assert_denied(&format!("ReportHeartbeats with {who}"), report);
        }
        // No plaintext listener: a plaintext HTTP/2 client gets no answer.
        let plain = Endpoint::from_shared(format!("http://{address}"))
            .unwrap()
            .timeout(Duration::from_secs(3))
            .connect()
            .await;
        if let Ok(plain) = plain {
            let answer = RaftClient::new(plain)
                .join(JoinRequest {
                    name: "ghost".into(),
                    address: "127.0.0.1:1".into(),
                })
                .await;
            assert!(answer.is_err(), "a plaintext call was answered: {answer:?}");
        }
    });
    let status = skiff_ok_at(&address, &["cluster", "status", "--output", "json"]);
    assert!(!status.contains("ghost"), "{status}");
    assert_still_commits(&servers, "after-raw-raft-calls");

    // A CLI with another cluster's CA is refused before anything is sent.
    let other = ClusterCa::create().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let wrong = dir.path().join("ca.crt");
    std::fs::write(&wrong, other.cert_pem()).unwrap();
    let out = skiff_at(
        &address,
        &[
            "--ca-cert",
            wrong.to_str().unwrap(),
            "var",
            "put",
            "wrong-ca",
            "x",
        ],
    );
    assert!(!out.status.success(), "a wrong CA was trusted");
    assert!(
        skiff_at(&address, &["var", "get", "wrong-ca"])
            .status
            .code()
            != Some(0),
        "the write with a wrong CA committed"
    );
}

fn tokio_stream_once(batch: RaftBatch) -> impl tonic::IntoStreamingRequest<Message = RaftBatch> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.try_send(batch).unwrap();
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Opens a sync stream presenting `client` and registering as `node`: the
/// first answer (a `Registered` message) or the refusal.
async fn register_as(
    address: &str,
    ca: &ClusterCa,
    client: &std::sync::Arc<Credentials>,
    node: &str,
) -> Result<(), tonic::Status> {
    let mut sync = AgentSyncClient::new(channel(address, ca, Some(client)).await);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(AgentMessage {
        msg: Some(AgentMsg::Register(Register {
            node: node.into(),
            address: "127.0.0.9".into(),
            port_range_start: 20000,
            port_range_end: 20010,
            cpu_millis: 4_294_967_295,
            memory_mb: 1024,
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let mut stream = sync
        .sync(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    stream.message().await?;
    drop(tx);
    Ok(())
}

#[test]
fn an_agent_certificate_speaks_for_its_own_node_only_and_revocation_cuts_it_off() {
    let servers = ServerCluster::start(1, &[]);
    let ca = cluster_ca(&servers);
    let address = servers.addresses[0].clone();
    let mut agents = AgentCluster::start(&servers.addresses, &on_loopback(["a1", "b1"]));
    let a1 = Credentials::load(&agents.data_dir(0).join("pki"), Role::Agent, "a1")
        .unwrap()
        .expect("a1 kept its certificate");
    runtime().block_on(async {
        // The certificate of a1 cannot register as b1 (and so never
        // receives b1's assignments or rewrites its address)...
        assert_denied(
            "a1's certificate registering as b1",
            register_as(&address, &ca, &a1, "b1").await,
        );
        // ...nor as a new node.
        assert_denied(
            "a1's certificate registering as z9",
            register_as(&address, &ca, &a1, "z9").await,
        );
    });
    let nodes = skiff_ok_at(&address, &["node", "ls", "--output", "json"]);
    assert!(
        !nodes.contains("127.0.0.9") && !nodes.contains("z9"),
        "{nodes}"
    );
    // The cluster's own variables are not for clients to write.
    let out = skiff_at(
        &address,
        &["var", "put", "_skiff/nodes/b1/metrics", "127.0.0.1:1"],
    );
    assert!(!out.status.success(), "a reserved variable was written");

    // Revoked: a1's stream is cut and its certificate refused within 5 s.
    let revoked_at = Instant::now();
    skiff_ok_at(&address, &["node", "revoke", "a1"]);
    let refused = wait_until(Duration::from_secs(5), POLL, || {
        runtime()
            .block_on(register_as(&address, &ca, &a1, "a1"))
            .is_err_and(|s| s.code() == tonic::Code::PermissionDenied)
    });
    assert!(refused, "a1's certificate still accepted 5 s after revoke");
    let cut = wait_until(Duration::from_secs(5), POLL, || {
        agents.logs().contains("node a1 is revoked")
    });
    assert!(
        cut,
        "a1's agent stream not closed within 5 s of the revoke:\n{}",
        agents.logs()
    );
    eprintln!(
        "revocation took effect within {:.1} s",
        revoked_at.elapsed().as_secs_f64()
    );
    // The agent says what happened and what to do, and asks again only
    // every 30 s or so (not once a second).
    assert!(
        wait_until(Duration::from_secs(5), POLL, || agents
            .logs()
            .contains("this node's certificate is revoked")),
        "{}",
        agents.logs()
    );
    // b1 keeps working.
    assert!(agents.ready_nodes().contains(&"b1".to_string()));
    agents.kill9(0);
}

#[test]
fn a_rotated_agent_token_stops_admitting_new_agents_and_the_new_one_works() {
    let servers = ServerCluster::start(1, &[]);
    let address = servers.addresses[0].clone();
    let old = join_token(&address, "agent");
    let rotated = skiff_ok_at(&address, &["cluster", "token", "rotate", "agent"]);
    assert!(rotated.contains("skiff agent"), "{rotated}");
    let new = join_token(&address, "agent");
    assert_ne!(old, new);

    let dir = tempfile::tempdir().unwrap();
    let out = skiff_e2e::run_with_timeout(
        std::process::Command::new(skiff_bin())
            .args(["agent", "--name", "late", "--advertise", "127.0.0.5"])
            .args(["--servers", &address, "--token", &old])
            .arg("--data-dir")
            .arg(dir.path()),
        Duration::from_secs(30),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "an agent joined with a rotated token"
    );
    assert!(
        stderr.contains("join token is not valid"),
        "the refusal says why: {stderr}"
    );
    // A token of another cluster (a digest that does not match) is
    // refused before the secret is shown.
    let foreign = format!("SKIFF-1-{}-{}", "ab".repeat(32), &new[new.len() - 32..]);
    let out = skiff_e2e::run_with_timeout(
        std::process::Command::new(skiff_bin())
            .args(["agent", "--name", "late", "--advertise", "127.0.0.5"])
            .args(["--servers", &address, "--token", &foreign])
            .arg("--data-dir")
            .arg(dir.path()),
        Duration::from_secs(30),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("CA digest"), "{stderr}");

    // The new token admits (the harness gets it from `cluster token`).
    let agents = AgentCluster::start(&servers.addresses, &on_loopback(["late"]));
    assert_eq!(agents.ready_nodes(), vec!["late".to_string()]);
}

#[test]
fn certificates_renew_before_they_expire_with_no_restart_and_no_dropped_stream() {
    // Ten-second certificates: renewed at 5-8 s, expired at 10 s.
    let servers = ServerCluster::start(1, &["--cert-lifetime", "10s"]);
    let address = servers.addresses[0].clone();
    let agents = AgentCluster::start(&servers.addresses, &on_loopback(["r1"]));
    let pid = agents.pid(0);
    let cert = agents.data_dir(0).join("pki/identity.crt");
    let first = std::fs::read_to_string(&cert).unwrap();
    let started = Instant::now();
    let renewed = wait_until(Duration::from_secs(12), POLL, || {
        std::fs::read_to_string(&cert).is_ok_and(|now| now != first)
    });
    assert!(
        renewed,
        "the agent's certificate was not renewed within 12 s"
    );
    eprintln!(
        "agent certificate renewed after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    // Past the first certificate's expiry: new handshakes in both
    // directions use the renewed certificates.
    std::thread::sleep(Duration::from_secs(11).saturating_sub(started.elapsed()));
    let pruned = skiff_ok_at(&address, &["node", "prune", "r1"]);
    assert!(pruned.contains("r1"), "{pruned}");
    assert_eq!(agents.ready_nodes(), vec!["r1".to_string()]);
    assert_eq!(agents.pid(0), pid, "the agent was not restarted");
    let logs = agents.logs();
    assert!(logs.contains("certificate renewed"), "{logs}");
    assert!(
        !logs.contains("sync with control plane interrupted"),
        "the agent's stream dropped during renewal:\n{logs}"
    );
    let server_log = servers.log(0);
    assert!(
        server_log.contains("certificate renewed"),
        "the server renews its own certificate too:\n{server_log}"
    );
}
