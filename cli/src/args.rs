//! Every command line Skiff accepts, in one place.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::{Deserialize, Serialize};

use crate::choices::{Mode, Network, Placement, Protocol, Runtime, Strategy};

/// The headings `--help` groups options under, so that a long list (`service
/// create` has over fifty) reads by topic and the global options stand apart.
pub mod heading {
    pub const GLOBAL: &str = "Global options";
    pub const JOB: &str = "Job";
    pub const IMAGE: &str = "What runs";
    pub const NETWORK: &str = "Ports and network";
    pub const PLACEMENT: &str = "Replicas, resources and placement";
    pub const HEALTH: &str = "Health check";
    pub const UPDATE: &str = "Update policy";
    pub const AUTOSCALE: &str = "Autoscaling";
    pub const NODE: &str = "Node";
    pub const RAFT: &str = "Raft and control plane";
    pub const RECOVERY: &str = "Backup and recovery";
}

#[derive(Parser, Debug)]
#[command(
    name = "skiff",
    version,
    about = "A small-cluster container scheduler",
    propagate_version = true
)]
pub struct Cli {
    /// The cluster CA certificate servers are verified against (a server's
    /// DATA_DIR/pki/ca.crt); default: the client config's `ca_cert`.
    #[arg(long, global = true, env = "SKIFF_CA_CERT", value_name = "FILE", help_heading = heading::GLOBAL)]
    pub ca_cert: Option<std::path::PathBuf>,
    /// Address of any skiff server, or several comma-separated: the first
    /// that answers is used [default: the client config's `address`, else
    /// 127.0.0.1:7070].
    #[arg(long, global = true, env = "SKIFF_ADDR", help_heading = heading::GLOBAL)]
    pub server: Option<String>,
    /// The API token to present [default: the client config's `token`];
    /// for `skiff server --join` and `skiff agent`, the join token
    /// (`skiff cluster token server|agent`; also `SKIFF_JOIN_TOKEN`).
    #[arg(long, global = true, env = "SKIFF_TOKEN", hide_env_values = true, help_heading = heading::GLOBAL)]
    pub token: Option<String>,
    /// The client config file (address, token) [default:
    /// ./.skiff/client.toml when present, which `skiff dev` writes].
    #[arg(long, global = true, env = "SKIFF_CLIENT_CONFIG", value_name = "FILE", help_heading = heading::GLOBAL)]
    pub client_config: Option<PathBuf>,
    /// How read commands print their result.
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = OutputFormat::Table, help_heading = heading::GLOBAL)]
    pub output: OutputFormat,
    /// Log level or filter (e.g. `debug`, `skiff_agent=trace`); overrides RUST_LOG.
    #[arg(long, global = true, env = "SKIFF_LOG_LEVEL", help_heading = heading::GLOBAL)]
    pub log_level: Option<String>,
    /// Log line format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "SKIFF_LOG_FORMAT", help_heading = heading::GLOBAL)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

/// `--raft-log`: see `skiff_control_plane::RaftLog`.
#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RaftLogArg {
    Sled,
    Wal,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Aligned columns for people.
    Table,
    /// The API's objects, for machines.
    Json,
    /// The same objects as JSON, as YAML.
    Yaml,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a control-plane server.
    Server(ServerArgs),
    /// Run the node agent that runs replicas on this machine.
    Agent(AgentArgs),
    /// Run a whole one-node cluster (one server and one agent) in this process.
    Dev(DevArgs),
    /// Create, inspect, scale and remove services.
    #[command(subcommand)]
    Service(ServiceCommand),
    /// Run one-shot jobs to completion (retried on failure); list, inspect,
    /// read the logs of and remove them.
    #[command(subcommand)]
    Job(JobCommand),
    /// Deploy, plan, list, export and remove stacks: the services of one
    /// file (Skiff's own YAML or a Compose file) as one unit.
    #[command(subcommand)]
    Stack(StackCommand),
    /// Inspect the nodes of the cluster; drain, pause and activate them.
    #[command(subcommand)]
    Node(NodeCommand),
    /// List, inspect and remove the named volumes kept on the nodes.
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// Create, update, list, inspect and remove secrets (files in
    /// /run/secrets of the replicas that use them; values never shown).
    #[command(subcommand)]
    Secret(SecretCommand),
    /// Print the committed events of the cluster (with --follow, as they happen).
    Events(EventsArgs),
    /// Inspect the control plane.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Read and write cluster variables (small key/value data kept in Raft).
    #[command(subcommand)]
    Var(VarCommand),
    /// Create, list and revoke API tokens (admin role).
    #[command(subcommand)]
    Token(TokenCommand),
    /// Measure the control plane (figures are printed, never asserted).
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Print a shell completion script: `skiff completion bash >
    /// /etc/bash_completion.d/skiff`, or `source <(skiff completion bash)`.
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write man pages (skiff.1 and one per subcommand, `skiff-service-create.1`) into DIR.
    Man {
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
    /// Run one container and record its exit status: the per-container
    /// monitor the agent starts, not a command for people.
    #[command(hide = true)]
    Shim(ShimArgs),
}

/// `skiff shim`: see `skiff_agent::runtime::oci::shim`.
#[derive(Args, Debug)]
pub struct ShimArgs {
    /// The OCI runtime binary.
    #[arg(long)]
    pub runtime: PathBuf,
    /// The runtime's state directory (`--root`).
    #[arg(long)]
    pub root: PathBuf,
    #[arg(long)]
    pub bundle: PathBuf,
    /// Log file the container's stdout is appended to.
    #[arg(long)]
    pub stdout: PathBuf,
    /// Log file the container's stderr is appended to.
    #[arg(long)]
    pub stderr: PathBuf,
    /// The container id.
    pub id: String,
}

#[derive(Subcommand, Debug)]
pub enum VarCommand {
    /// Set KEY to VALUE.
    Put { key: String, value: String },
    /// Print the value of KEY (a linearizable read: it sees every write
    /// acknowledged before it).
    Get {
        key: String,
        /// Read this server's copy without asking the leader: faster and
        /// answered without a leader, but it may miss the latest writes.
        #[arg(long)]
        stale: bool,
    },
    /// Compare and set: `var cas KEY EXPECTED NEW` sets KEY to NEW only if
    /// it holds EXPECTED, `var cas --absent KEY NEW` only if it does not
    /// exist; atomic, in one Raft entry. Exits 1 without setting otherwise,
    /// saying what KEY holds.
    Cas {
        /// KEY EXPECTED NEW, or KEY NEW with --absent.
        #[arg(num_args = 2..=3, value_name = "KEY [EXPECTED] NEW", required = true)]
        words: Vec<String>,
        /// Set only if KEY does not exist (then no EXPECTED).
        #[arg(long)]
        absent: bool,
    },
    /// List variables whose key starts with PREFIX.
    Ls {
        #[arg(default_value = "")]
        prefix: String,
        /// As `var get --stale`.
        #[arg(long)]
        stale: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Write throughput and latency: C clients put N variables of V bytes.
    Raft(BenchRaftArgs),
    /// Leader failover: kill -9 the leader of a fresh 3-server cluster under
    /// load and time until writes succeed again.
    Failover(BenchFailoverArgs),
    /// Scheduling at scale: simulated nodes against a fresh 3-server
    /// cluster, services totalling --replicas replicas; time until every
    /// placement is committed and delivered.
    Schedule(BenchScheduleArgs),
    /// Container start: time from `service create` of 1 and of 20 replicas
    /// of a cached image to all healthy, and agent RSS with 50 containers,
    /// on a fresh server and agent started for the run.
    Start(BenchStartArgs),
    /// Routing proxy cost: keep-alive HTTP load against one loopback
    /// replica directly and through the agent's proxy, in the same run;
    /// requests/s, p50/p99 and their ratio.
    Proxy(BenchProxyArgs),
    /// Deployments under load: wall time of a rolling update and of a
    /// blue-green switch of 20 replicas, and of 10 replicas with
    /// max_parallel 2 (vs Docker Swarm), with the failed requests of an HTTP
    /// load through the routing proxy and the theoretical bound, on a fresh
    /// server and agent started for the run.
    Rollout(BenchRolloutArgs),
    /// Autoscaling: time from a load step to the new replicas serving
    /// traffic, and scale events over a sawtooth load, on a fresh server
    /// and agent started for the run.
    Autoscale(BenchAutoscaleArgs),
    /// A stateful service updated under load: a postgres service with a
    /// volume, updated (stop-first) while clients open a new connection per
    /// query through its discovery address; failed requests and the p99
    /// the swap adds, on a fresh server and agent started for the run.
    Stateful(BenchStatefulArgs),
    /// Linearizability under faults (Jepsen-style): clients on every server
    /// of a fresh 3-server cluster put, get and compare-and-set a few
    /// variables while leaders are killed (-9) and servers paused (SIGSTOP);
    /// each run's history is checked by a linearizability checker.
    Chaos(BenchChaosArgs),
}

#[derive(Args, Debug)]
pub struct BenchStatefulArgs {
    /// The postgres image (ADDR/skiff-test/postgres:v1 from
    /// deploy/images/build.sh, or one with the official image's
    /// POSTGRES_HOST_AUTH_METHOD and PGDATA).
    #[arg(long)]
    pub image: String,
    /// Registry (HOST:PORT) to pull from over plain HTTP; repeatable.
    #[arg(long = "insecure-registry")]
    pub insecure_registries: Vec<String>,
    /// OCI runtime of the agent: runc, crun or a path.
    #[arg(long)]
    pub oci_runtime: Option<String>,
    /// Client threads, each one query at a time on a new connection.
    #[arg(long, default_value_t = 4)]
    pub clients: usize,
    /// Load before the (first) update: the baseline window.
    #[arg(long, default_value_t = 5.0, value_parser = parse_secs)]
    pub baseline_secs: f64,
    /// Load kept after each update ended.
    #[arg(long, default_value_t = 3.0, value_parser = parse_secs)]
    pub after_secs: f64,
    /// Updates (`service update db --env GEN=n`) run one after the other.
    #[arg(long, default_value_t = 1)]
    pub updates: u32,
    /// Host ports of the agent started for the run.
    #[arg(long, default_value = "31000-31999", value_parser = parse_port_range)]
    pub port_range: (u16, u16),
    /// Keep the agent's log in this file.
    #[arg(long)]
    pub agent_log: Option<std::path::PathBuf>,
}

#[derive(Args, Debug)]
pub struct BenchAutoscaleArgs {
    /// Clients at full load, each one request at a time on a new connection.
    #[arg(long, default_value_t = 8)]
    pub connections: usize,
    /// How long the replica takes to answer each request, in milliseconds.
    #[arg(long, default_value_t = 100)]
    pub request_ms: u64,
    /// Target open connections per replica.
    #[arg(long, default_value_t = 2.0)]
    pub target_concurrency: f64,
    /// Most replicas.
    #[arg(long, default_value_t = 8)]
    pub max: u32,
    /// The server's --autoscale-window, in seconds (as its default: a dip
    /// in the load shorter than this changes nothing).
    #[arg(long, default_value_t = 60)]
    pub window: u64,
    /// Seconds of sawtooth load (e.g. 300 for five minutes).
    #[arg(long, default_value_t = 60)]
    pub duration: u64,
    /// Seconds per sawtooth tooth: four rising steps, then the drop.
    #[arg(long, default_value_t = 40)]
    pub period: u64,
    /// Host ports for the agent's replicas.
    #[arg(long, default_value = "32000-32999", value_parser = parse_port_range)]
    pub port_range: (u16, u16),
}

#[derive(Args, Debug)]
pub struct BenchProxyArgs {
    /// Concurrent keep-alive connections.
    #[arg(long, default_value_t = 64)]
    pub connections: usize,
    /// Measured seconds per run (direct, then through the proxy).
    #[arg(long, default_value_t = 5)]
    pub duration: u64,
    /// Unmeasured warm-up seconds before each run.
    #[arg(long, default_value_t = 1)]
    pub warmup: u64,
    /// Worker threads of each of the replica, proxy and client runtimes.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Route as an `--protocol http` service (the proxy counts requests).
    #[arg(long)]
    pub http: bool,
    /// CPU the replica spends on each request before answering, in
    /// microseconds (0: a trivial replica, the proxy's worst case).
    #[arg(long, default_value_t = 0)]
    pub replica_cpu_us: u64,
    /// Also load the replica through a reference proxy, started for the run
    /// with the same number of threads, for side-by-side figures.
    #[arg(long, value_enum)]
    pub reference: Option<ReferenceProxy>,
    /// Connections of the second, unloaded pair of runs, where latency is
    /// the proxy's own and not the queueing of a saturated machine (0: skip).
    #[arg(long, default_value_t = 1)]
    pub unloaded_connections: usize,
}

/// A proxy `skiff bench proxy` can measure beside the routing proxy.
#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum ReferenceProxy {
    /// HAProxy in TCP mode (`apt-get install haproxy`).
    Haproxy,
}

#[derive(Args, Debug)]
#[command(
    after_help = "Images: two versions of a web image that answers HTTP GET / on its \
exposed port, e.g. the test images of the repository, pushed to a local registry:\n  \
deploy/images/registry.sh start            # prints REGISTRY_ADDR=127.0.0.1:PORT\n  \
deploy/images/build.sh 127.0.0.1:PORT /tmp/skiff-images\n  \
skiff bench rollout --insecure-registry 127.0.0.1:PORT \\\n    \
--image-v1 127.0.0.1:PORT/skiff-test/web:v2 --image-v2 127.0.0.1:PORT/skiff-test/web:v3\n  \
deploy/images/registry.sh stop PID DIR     # with REGISTRY_PID and REGISTRY_DIR"
)]
pub struct BenchRolloutArgs {
    /// Image the services start with (e.g. ADDR/skiff-test/web:v2).
    #[arg(long)]
    pub image_v1: String,
    /// Image every update rolls out (e.g. ADDR/skiff-test/web:v3).
    #[arg(long)]
    pub image_v2: String,
    /// Registry (HOST:PORT) to pull from over plain HTTP; repeatable.
    #[arg(long = "insecure-registry")]
    pub insecure_registries: Vec<String>,
    /// OCI runtime of the agent: runc, crun or a path.
    #[arg(long)]
    pub oci_runtime: Option<String>,
    /// Replicas of the rolling update and of the blue-green switch.
    #[arg(long, default_value_t = 20)]
    pub replicas: u32,
    /// max_parallel of that rolling update.
    #[arg(long, default_value_t = 5)]
    pub max_parallel: u32,
    /// Replicas of the rolling update compared with Docker Swarm.
    #[arg(long, default_value_t = 10)]
    pub swarm_replicas: u32,
    /// max_parallel of the rolling update compared with Docker Swarm.
    #[arg(long, default_value_t = 2)]
    pub swarm_parallel: u32,
    /// max_surge of the rolling updates (default: their max_parallel, so
    /// each batch starts max_parallel new replicas beside the old ones).
    #[arg(long)]
    pub max_surge: Option<u32>,
    /// `--drain-secs` of the agent: how long a stopping replica keeps its
    /// open connections after leaving the routing proxy.
    #[arg(long, default_value_t = 2.0, value_parser = parse_secs)]
    pub drain_secs: f64,
    /// Interval of the replicas' HTTP health check.
    #[arg(long, default_value = "200ms", value_parser = parse_millis)]
    pub health_interval: u32,
    /// Load threads sending GET / through the routing proxy (even ones
    /// keep their connection alive, odd ones open one per request).
    #[arg(long, default_value_t = 4)]
    pub load_threads: usize,
    /// Pause of each load thread between requests.
    #[arg(long, default_value = "20ms", value_parser = parse_millis_or_zero)]
    pub load_pause: u32,
    /// Runs timing one replica's start + health check (median taken).
    #[arg(long, default_value_t = 3)]
    pub start_runs: usize,
    /// Steps to run (comma-separated): rolling, blue-green, swarm.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "rolling,blue-green,swarm"
    )]
    pub scenarios: Vec<String>,
    /// Host ports of the agent started for the run.
    #[arg(long, default_value = "31000-31999", value_parser = parse_port_range)]
    pub port_range: (u16, u16),
    /// Keep the agent's log in this file.
    #[arg(long)]
    pub agent_log: Option<std::path::PathBuf>,
}

#[derive(Args, Debug)]
pub struct BenchStartArgs {
    /// Image to run; it must answer HTTP GET / on its port (e.g.
    /// 127.0.0.1:5000/skiff-test/web:v1 from deploy/images/build.sh).
    #[arg(long)]
    pub image: String,
    /// Registry (HOST:PORT) to pull from over plain HTTP; repeatable.
    #[arg(long = "insecure-registry")]
    pub insecure_registries: Vec<String>,
    /// OCI runtime of the agent: runc, crun or a path.
    #[arg(long)]
    pub oci_runtime: Option<String>,
    /// Service sizes to time (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,20")]
    pub replicas: Vec<u32>,
    /// Runs per size.
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Containers running while the agent's RSS is measured.
    #[arg(long, default_value_t = 50)]
    pub rss_replicas: u32,
    /// Host ports of the agent started for the run.
    #[arg(long, default_value = "31000-31999", value_parser = parse_port_range)]
    pub port_range: (u16, u16),
    /// Keep the agent's log (its per-phase start timings) in this file.
    #[arg(long)]
    pub agent_log: Option<std::path::PathBuf>,
}

#[derive(Args, Debug)]
pub struct BenchScheduleArgs {
    /// Simulated nodes (each one agent stream).
    #[arg(long, default_value_t = 5000)]
    pub nodes: usize,
    /// Replicas in total, over services of at most 1000 replicas.
    #[arg(long, default_value_t = 100_000)]
    pub replicas: usize,
    /// Servers in the cluster started for the run.
    #[arg(long, default_value_t = 3)]
    pub servers: usize,
    /// Only time the pure scheduler, in memory (no cluster).
    #[arg(long)]
    pub scheduler_only: bool,
}

#[derive(Args, Debug)]
pub struct EventsArgs {
    /// Keep printing events as they commit.
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// Only events of this service.
    #[arg(long)]
    pub service: Option<String>,
    /// Only events of this node.
    #[arg(long)]
    pub node: Option<String>,
    /// Only events newer than a duration (`10m`, `90s`, `2h`, `1d`) or from
    /// a Raft index on (a plain number, e.g. `12345`).
    #[arg(long, value_parser = parse_since)]
    pub since: Option<Since>,
    /// Only the last N events (then, with --follow, every new one; 0: only
    /// new ones).
    #[arg(long)]
    pub tail: Option<u32>,
}

/// `events --since`: an age or a Raft index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Since {
    AgeMs(u64),
    Index(u64),
}

fn parse_since(value: &str) -> Result<Since, String> {
    let fix = "use a duration like 90s, 10m, 2h or 1d, or a Raft index like 12345";
    let (number, unit) = value
        .find(|c: char| !c.is_ascii_digit())
        .map_or((value, ""), |i| value.split_at(i));
    let n: u64 = number
        .parse()
        .map_err(|_| format!("\"{value}\" is neither a duration nor an index; {fix}"))?;
    let unit_ms: u64 = match unit {
        "" => return Ok(Since::Index(n)),
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(format!("\"{value}\" has an unknown unit; {fix}")),
    };
    n.checked_mul(unit_ms)
        .map(Since::AgeMs)
        .ok_or_else(|| format!("\"{value}\" is out of range; {fix}"))
}

#[derive(Args, Debug)]
pub struct BenchRaftArgs {
    /// Servers to load (comma-separated). Without it, a fresh cluster of
    /// --spawn servers is started on loopback for the run and stopped after.
    #[arg(long, value_delimiter = ',')]
    pub servers: Vec<String>,
    /// Size of the cluster started when --servers is not given.
    #[arg(long, default_value_t = 3)]
    pub spawn: usize,
    /// Concurrent clients, each with its own long-lived connection.
    #[arg(long, default_value_t = 64)]
    pub clients: usize,
    /// Total writes.
    #[arg(long, default_value_t = 50_000)]
    pub writes: usize,
    #[arg(long, default_value_t = 256)]
    pub value_bytes: usize,
    /// Unmeasured warm-up before the run, in seconds.
    #[arg(long, default_value_t = 2)]
    pub warmup_secs: u64,
    /// Distinct keys written (random keys from this space).
    #[arg(long, default_value_t = 1_000_000)]
    pub key_space: u64,
    /// Raft log store of the servers started for the run.
    #[arg(long, value_enum, default_value_t = RaftLogArg::Sled)]
    pub raft_log: RaftLogArg,
}

#[derive(Args, Debug)]
pub struct BenchChaosArgs {
    /// Runs, each on a fresh cluster.
    #[arg(long, default_value_t = 20)]
    pub runs: usize,
    /// Seconds of load and faults per run.
    #[arg(long, default_value_t = 10)]
    pub duration_secs: u64,
    /// Concurrent clients, spread over the servers.
    #[arg(long, default_value_t = 6)]
    pub clients: usize,
    /// Variables the clients share (fewer: more contention).
    #[arg(long, default_value_t = 3)]
    pub keys: usize,
    /// Raft log store of the servers started for the run.
    #[arg(long, value_enum, default_value_t = RaftLogArg::Sled)]
    pub raft_log: RaftLogArg,
}

#[derive(Args, Debug)]
pub struct BenchFailoverArgs {
    /// Failovers to measure.
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Raft log store of the servers started for the run.
    #[arg(long, value_enum, default_value_t = RaftLogArg::Sled)]
    pub raft_log: RaftLogArg,
    #[arg(long, default_value_t = 8)]
    pub clients: usize,
}

#[derive(Args, Debug)]
#[command(args_override_self = true)]
pub struct ServerArgs {
    /// Read settings from this TOML file (keys are the long flag names with
    /// `_`, e.g. `data_dir`); SKIFF_* variables and flags win over it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<std::path::PathBuf>,
    /// Name of this server in the cluster.
    #[arg(long, env = "SKIFF_NAME")]
    pub name: String,
    /// Where the Raft log and state live.
    #[arg(long, env = "SKIFF_DATA_DIR")]
    pub data_dir: PathBuf,
    /// Address for the gRPC API (CLI, agents).
    #[arg(long, default_value = "127.0.0.1:7070", env = "SKIFF_LISTEN")]
    pub listen: SocketAddr,
    /// Start a new one-member cluster if the data dir holds none.
    #[arg(long, conflicts_with = "join", env = "SKIFF_BOOTSTRAP")]
    pub bootstrap: bool,
    /// Join the cluster of this server (any member, HOST:PORT) if the data dir holds none.
    #[arg(long, env = "SKIFF_JOIN")]
    pub join: Option<String>,
    /// Address other servers and agents reach this one at (default: the --listen address).
    #[arg(long, env = "SKIFF_ADVERTISE")]
    pub advertise: Option<String>,
    /// Milliseconds per Raft tick.
    #[arg(long, default_value_t = 100, env = "SKIFF_TICK_MS", help_heading = heading::RAFT)]
    pub tick_ms: u64,
    /// Ticks without a leader before an election starts.
    #[arg(long, default_value_t = 10, env = "SKIFF_ELECTION_TICKS", help_heading = heading::RAFT)]
    pub election_ticks: usize,
    /// Applied entries between snapshots (and log compactions); etcd's
    /// default too. A snapshot encodes the whole state, so a smaller value
    /// costs write latency while it is taken.
    #[arg(long, default_value_t = 100_000, env = "SKIFF_SNAPSHOT_EVERY", help_heading = heading::RAFT)]
    pub snapshot_every: u64,
    /// Where a new data dir keeps the Raft log: `sled` (the default), or
    /// `wal`, an append-only write-ahead log with one fdatasync per batch
    /// (as etcd), measured faster under load; `wal` on a data dir whose log
    /// is in sled moves it over, and cannot be undone.
    #[arg(long, value_enum, default_value_t = RaftLogArg::Sled, env = "SKIFF_RAFT_LOG", help_heading = heading::RAFT)]
    pub raft_log: RaftLogArg,
    /// A node whose heartbeats stop for this long is marked down and its
    /// replicas are re-placed (e.g. 10s, 3s).
    #[arg(long, default_value = "10s", value_parser = parse_millis, env = "SKIFF_HEARTBEAT_TTL", help_heading = heading::RAFT)]
    pub heartbeat_ttl: u32,
    /// Serve GET /metrics (Prometheus text) on this address (default: the
    /// --listen host, port 9464, or any free port if that is taken).
    #[arg(long, env = "SKIFF_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Serve the web dashboard on this address (default: nowhere): plain
    /// HTTP on a loopback address, HTTPS with the server's certificate on
    /// any other.
    #[arg(long, env = "SKIFF_UI_LISTEN")]
    pub ui_listen: Option<SocketAddr>,
    /// Autoscaler stabilization window: a service scales down only after
    /// its load stayed low this long; the cooldowns (1/4 and 1/2 of it)
    /// and the idle time before scaling to zero (5x) scale with it.
    #[arg(long, default_value = "60s", value_parser = parse_millis, env = "SKIFF_AUTOSCALE_WINDOW", help_heading = heading::RAFT)]
    pub autoscale_window: u32,
    /// Most services the cluster holds; creating more is refused.
    #[arg(long, default_value_t = 10_000, env = "SKIFF_MAX_SERVICES", help_heading = heading::RAFT)]
    pub max_services: usize,
    /// Most variables the cluster holds; adding more is refused.
    #[arg(long, default_value_t = 100_000, env = "SKIFF_MAX_VARIABLES", help_heading = heading::RAFT)]
    pub max_variables: usize,
    /// Free space, in MiB, the server keeps on its data dir's file system:
    /// below it, writes are refused (reads go on) until space is freed, so
    /// the Raft log never runs out of space in the middle of a write. 0: no
    /// reserve.
    #[arg(long, default_value_t = 64, env = "SKIFF_RESERVE_DISK_MB", help_heading = heading::RAFT)]
    pub reserve_disk_mb: u64,
    /// Largest request a client or agent may send, in bytes; larger ones
    /// are refused before they are read (as etcd's --max-request-bytes).
    #[arg(long, default_value_t = 4 << 20, value_parser = clap::value_parser!(u32).range(65_536..), env = "SKIFF_MAX_REQUEST_BYTES", help_heading = heading::RAFT)]
    pub max_request_bytes: u32,
    /// Largest message another server may send, in bytes. A snapshot of
    /// the whole state travels in one: keep this above `skiff_raft_snapshot_bytes`.
    #[arg(long, default_value_t = 256 << 20, value_parser = clap::value_parser!(u32).range(1_048_576..), env = "SKIFF_MAX_RAFT_MESSAGE_BYTES", help_heading = heading::RAFT)]
    pub max_raft_message_bytes: u32,
    /// Streams one client connection may have open at once.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(16..), env = "SKIFF_MAX_CONCURRENT_STREAMS", help_heading = heading::RAFT)]
    pub max_concurrent_streams: u32,
    /// How long a call may take to answer (streams, once answered, run on;
    /// the longest call, `node prune` relayed to an agent, allows 120 s).
    #[arg(long, default_value = "150s", value_parser = parse_millis, env = "SKIFF_REQUEST_TIMEOUT", help_heading = heading::RAFT)]
    pub request_timeout: u32,
    /// With --bootstrap: start the new cluster from this backup (`skiff
    /// cluster snapshot save`) instead of empty, in an empty data dir. Its
    /// agents keep their replicas and connect again when the backup was not
    /// redacted and the server is at an address they know.
    #[arg(long, value_name = "FILE", requires = "bootstrap", help_heading = heading::RECOVERY)]
    pub restore: Option<PathBuf>,
    /// After the cluster lost its quorum for good: make this server the only
    /// member of a new cluster with all of its data (every entry of its log,
    /// also ones that may not have committed). Its old log is kept in
    /// DATA/before-recover-SECS. Start it like this once, then join new
    /// servers with empty data dirs; never start the lost servers again
    /// with their old data.
    #[arg(long, conflicts_with_all = ["bootstrap", "join", "restore"], help_heading = heading::RECOVERY)]
    pub recover: bool,
    /// Start even though the Raft log is damaged: cut a write-ahead log at
    /// its first bad record (a copy of what is cut is kept), or accept a
    /// sled log that lost records. The server may then have lost entries
    /// it acknowledged and the vote it cast; prefer removing it and joining
    /// again with an empty data dir. Without it, such a log stops the start.
    #[arg(long, help_heading = heading::RECOVERY)]
    pub truncate_corrupt_log: bool,
    /// The server join token (`--token`, a global flag, or
    /// `SKIFF_JOIN_TOKEN`): needed with --join on a new data dir.
    #[arg(skip)]
    pub join_token: Option<String>,
    /// Lifetime of the certificates this server issues to servers and
    /// agents (e.g. 90d, 12h, 30s); they renew at a random 50-80 % of it.
    #[arg(long, default_value = "90d", value_parser = parse_lifetime, env = "SKIFF_CERT_LIFETIME")]
    pub cert_lifetime: std::time::Duration,
}

#[derive(Args, Debug)]
#[command(args_override_self = true)]
pub struct AgentArgs {
    /// Read settings from this TOML file (keys are the long flag names with
    /// `_`, e.g. `data_dir`); SKIFF_* variables and flags win over it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<std::path::PathBuf>,
    /// Name of this node.
    #[arg(long, env = "SKIFF_NAME")]
    pub name: String,
    /// Where allocations, logs and agent state live.
    #[arg(long, env = "SKIFF_DATA_DIR")]
    pub data_dir: PathBuf,
    /// Servers to connect to, comma-separated or repeated.
    #[arg(long, value_delimiter = ',', required = true, env = "SKIFF_SERVERS")]
    pub servers: Vec<String>,
    /// Run `--runtime process` replicas: host processes with this agent's
    /// rights (root). Off by default; `skiff dev` turns it on.
    #[arg(long)]
    pub enable_process_runtime: bool,
    /// The agent join token (`--token`, a global flag, or
    /// `SKIFF_JOIN_TOKEN`): needed on the first start (the certificate it
    /// gets is kept in the data dir).
    #[arg(skip)]
    pub join_token: Option<String>,
    #[command(flatten)]
    pub node: NodeArgs,
}

/// Node settings shared by `skiff agent` and `skiff dev`.
#[derive(Args, Debug)]
pub struct NodeArgs {
    /// Address at which this node's replicas are reached (default: for
    /// `skiff agent`, the address of the interface that holds the default
    /// route, else 127.0.0.1; for `skiff dev`, 127.0.0.1).
    #[arg(long, env = "SKIFF_ADVERTISE", help_heading = heading::NODE)]
    pub advertise: Option<IpAddr>,
    /// Host ports the scheduler may assign to replicas on this node.
    #[arg(long, default_value = "20000-29999", value_parser = parse_port_range, env = "SKIFF_PORT_RANGE", help_heading = heading::NODE)]
    pub port_range: (u16, u16),
    /// Seconds between SIGTERM and SIGKILL when a replica stops.
    #[arg(long, default_value_t = 5, env = "SKIFF_STOP_GRACE_SECS", help_heading = heading::NODE)]
    pub stop_grace_secs: u64,
    /// OCI runtime for containers: `runc`, `crun` or a path (default: runc if installed, else crun).
    #[arg(long, env = "SKIFF_OCI_RUNTIME", help_heading = heading::NODE)]
    pub oci_runtime: Option<String>,
    /// Registry (HOST:PORT) to pull from over plain HTTP; repeatable.
    #[arg(long = "insecure-registry", help_heading = heading::NODE)]
    pub insecure_registries: Vec<String>,
    /// Docker config.json with registry credentials (default ~/.docker/config.json).
    #[arg(long, env = "SKIFF_DOCKER_CONFIG", help_heading = heading::NODE)]
    pub docker_config: Option<PathBuf>,
    /// CPU the scheduler may reserve on this node, in millicores (default: all CPUs).
    #[arg(long = "cpu", env = "SKIFF_CPU", help_heading = heading::NODE)]
    pub cpu_millis: Option<u32>,
    /// Memory the scheduler may reserve on this node, in MB (default: MemTotal).
    #[arg(long = "memory", env = "SKIFF_MEMORY", help_heading = heading::NODE)]
    pub memory_mb: Option<u32>,
    /// Node label KEY=VALUE for constraints and zone spreading, e.g. zone=a (repeatable).
    #[arg(long = "label", value_parser = parse_label, help_heading = heading::NODE)]
    pub labels: Vec<(String, String)>,
    /// Let replicas bind-mount host paths below PREFIX (`--mount
    /// type=bind,...`; repeatable; none by default).
    #[arg(long = "allow-host-path", value_name = "PREFIX")]
    pub allow_host_paths: Vec<String>,
    /// Let this node's routing proxy listen on published ports below 1024
    /// (off by default, so that no client can take a node's well-known
    /// ports such as 22, 53 or 443; `skiff dev` allows them).
    #[arg(long, env = "SKIFF_ALLOW_PRIVILEGED_PORTS", help_heading = heading::NODE)]
    pub allow_privileged_ports: bool,
    /// Use the node's registry credentials (--docker-config) only for
    /// images under PREFIX: `registry/` (a whole registry),
    /// `registry/path`, or `*` for all (repeatable). Other images are pulled
    /// anonymously, so that whoever may create a service cannot pull
    /// private images with the node's credentials. None by default (`*` in
    /// `skiff dev`, the machine user's own cluster).
    #[arg(long = "registry-auth-scope", value_name = "PREFIX", help_heading = heading::NODE)]
    pub registry_auth_scopes: Vec<String>,
    /// Serve GET /metrics (Prometheus text: routing proxy traffic, build
    /// and process metrics) on this address (default: the advertise
    /// address, port 9465, or any free port if that is taken; published in
    /// the variable `_skiff/nodes/NODE/metrics`).
    #[arg(long, env = "SKIFF_METRICS_LISTEN", help_heading = heading::NODE)]
    pub metrics_listen: Option<SocketAddr>,
    /// Also export the routing proxy's series per replica in its pools
    /// (`skiff_proxy_replica_*`, five per replica of every published
    /// service in the cluster): off by default, as the per-service series
    /// answer most questions and these grow with the whole cluster.
    #[arg(long, env = "SKIFF_PROXY_REPLICA_METRICS", help_heading = heading::NODE)]
    pub proxy_replica_metrics: bool,
    /// Seconds a stopping replica of a published service keeps serving its
    /// open connections, after leaving every routing proxy, before SIGTERM.
    #[arg(long, env = "SKIFF_DRAIN_SECS", default_value_t = 5.0, value_parser = parse_secs, help_heading = heading::NODE)]
    pub drain_secs: f64,
    /// Above this many MB of stored images, remove the images (and their
    /// layers) no replica on this node uses; checked every minute (default:
    /// never automatically).
    #[arg(long, value_name = "MB", env = "SKIFF_IMAGE_GC_THRESHOLD_MB", help_heading = heading::NODE)]
    pub image_gc_threshold_mb: Option<u64>,
}

#[derive(Args, Debug)]
pub struct DevArgs {
    /// Where the dev cluster keeps its data.
    #[arg(long, default_value = ".skiff")]
    pub data_dir: PathBuf,
    /// Address for the gRPC API.
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,
    /// Name of the dev node.
    #[arg(long, default_value = "dev")]
    pub name: String,
    /// Autoscaler stabilization window (as `skiff server --autoscale-window`).
    #[arg(long, default_value = "60s", value_parser = parse_millis)]
    pub autoscale_window: u32,
    /// Serve the server's GET /metrics on this address (default: the
    /// --listen host, port 9464, or any free port if that is taken); the
    /// agent's is --metrics-listen (default port 9465).
    #[arg(long)]
    pub server_metrics_listen: Option<SocketAddr>,
    /// Serve the web dashboard on this address (default 127.0.0.1:7071,
    /// or any free port if that is taken).
    #[arg(long, conflicts_with = "no_ui")]
    pub ui_listen: Option<SocketAddr>,
    /// Do not serve the web dashboard.
    #[arg(long)]
    pub no_ui: bool,
    #[command(flatten)]
    pub node: NodeArgs,
}

#[derive(Subcommand, Debug)]
pub enum JobCommand {
    /// Run a job: `skiff job run migrate --max-retries 2 --wait -- sh -c './migrate'`.
    /// Takes the flags of `service create` (image, env, volumes, secrets,
    /// constraints); one replica runs at a time.
    Run(Box<JobRunArgs>),
    /// List jobs with their state and attempts.
    Ls,
    /// Show a job's state and every attempt (replica) with its exit status.
    Ps { name: String },
    /// Print the output of a job's attempts (prefixed with the replica's id
    /// when there are several).
    Logs {
        name: String,
        /// Keep printing new output until interrupted.
        #[arg(long, short = 'f')]
        follow: bool,
    },
    /// Remove a job, stopping its attempt if one runs.
    Rm { name: String },
}

#[derive(Args, Debug)]
pub struct JobRunArgs {
    /// Failed attempts replaced before the job fails (0 to 100).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true, help_heading = heading::JOB)]
    pub max_retries: i64,
    /// The job fails (and its attempt is stopped) if not done this long
    /// after it was created: `90s`, `10m`.
    #[arg(long, value_parser = parse_millis, help_heading = heading::JOB)]
    pub deadline: Option<u32>,
    /// Print each attempt as it ends and exit with the job's exit status
    /// (0 once it succeeded).
    #[arg(long, help_heading = heading::JOB)]
    pub wait: bool,
    /// Remove a job of the same name first (stopping its attempt; its
    /// ended attempts go with it), as `job rm NAME` would.
    #[arg(long, help_heading = heading::JOB)]
    pub replace: bool,
    #[command(flatten)]
    pub create: CreateArgs,
}

#[derive(Subcommand, Debug)]
pub enum ServiceCommand {
    /// Create a service: `skiff service create web --replicas 3 -- python3 -m http.server '$PORT'`.
    Create(Box<CreateArgs>),
    /// List services.
    Ls,
    /// List the replicas of a service.
    Ps {
        name: String,
        /// Include replicas that are stopping or stopped.
        #[arg(long)]
        all: bool,
        /// Redraw every second until Ctrl-C or the service is removed.
        #[arg(long, short = 'w')]
        watch: bool,
    },
    /// Show a service's spec and replicas.
    Inspect {
        name: String,
        /// Print environment values (by default each shows as a short hash).
        #[arg(long)]
        show_values: bool,
    },
    /// Print a service as a Skiff stack file: `skiff service apply -f` of
    /// it (or `stack deploy` for a service of a stack) gives the same service.
    Export { name: String },
    /// Create or update the services a stack file declares, under their own
    /// names (like `kubectl apply -f`); each update rolls out with its policy.
    Apply {
        /// A Skiff stack file or a Compose file (later files override earlier ones).
        #[arg(long = "file", short = 'f', required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
        /// Set a variable for `${VAR}` in the files (repeatable).
        #[arg(long = "var", value_name = "KEY=VALUE")]
        vars: Vec<String>,
        /// Treat every warning as an error.
        #[arg(long)]
        strict: bool,
        /// Return once committed instead of waiting for the replicas.
        #[arg(long, short = 'd')]
        detach: bool,
    },
    /// Change the number of replicas.
    Scale {
        name: String,
        #[arg(allow_negative_numbers = true)]
        replicas: i64,
    },
    /// Remove a service and stop all its replicas.
    Rm { name: String },
    /// Roll out a new version: `skiff service update web --image REF`.
    /// Shows progress until the deployment ends unless --detach.
    Update(Box<UpdateArgs>),
    /// List a service's versions with what changed and how each rollout ended.
    History {
        name: String,
        /// Print environment values (by default each shows as a short hash).
        #[arg(long)]
        show_values: bool,
    },
    /// Deploy an earlier version again (default: the last good one).
    Rollback {
        name: String,
        /// The version to return to (see `service history`).
        #[arg(long = "to", value_name = "VERSION")]
        to: Option<u64>,
        /// Return at once instead of showing progress.
        #[arg(long, short = 'd')]
        detach: bool,
    },
    /// Promote a blue-green or canary deployment waiting for it.
    Promote {
        name: String,
        /// Return at once instead of showing progress.
        #[arg(long, short = 'd')]
        detach: bool,
    },
    /// Spread a service's replicas again (after a node returns or is
    /// activated): one at a time, a new replica on the least loaded node
    /// first, then one stopped on the most loaded, until the counts per
    /// node differ by at most one.
    Rebalance { name: String },
    /// Pause a running deployment (nothing more is started or stopped).
    Pause { name: String },
    /// Resume a paused deployment.
    Resume { name: String },
    /// Print the output of a service's replicas (stdout to stdout, stderr to
    /// stderr; lines prefixed with the replica's id when there are several).
    Logs {
        name: String,
        /// Keep printing new output until interrupted or the replicas are
        /// removed.
        #[arg(long, short = 'f')]
        follow: bool,
        /// Only this replica (an id, or a prefix of one).
        #[arg(long)]
        replica: Option<String>,
        /// Only the last N lines of each stream of each replica.
        #[arg(long)]
        tail: Option<u32>,
        /// Only lines written since a time: an age (`90s`, `10m`, `2h`,
        /// `1d`) or an RFC 3339 time (`2026-12-07T10:00:00Z`). Times are
        /// marked about once a second while a replica writes.
        #[arg(long, value_parser = parse_log_since)]
        since: Option<LogSince>,
        /// Prefix each line with the time it was written (RFC 3339, UTC).
        #[arg(long, short = 't')]
        timestamps: bool,
    },
    /// Run a command in a running replica: in its container (its
    /// namespaces, environment and user) or, for a process replica, on its
    /// node in its working directory with its environment. Exits with the
    /// command's exit code (128+N when signal N ended it).
    Exec(ExecArgs),
}

#[derive(Args, Debug)]
pub struct ExecArgs {
    pub name: String,
    /// The replica (an id, or a prefix of one); default: the first running
    /// one.
    #[arg(long)]
    pub replica: Option<String>,
    /// Pass stdin to the command.
    #[arg(long, short = 'i')]
    pub interactive: bool,
    /// Give the command a terminal (stdout and stderr arrive merged).
    #[arg(long, short = 't')]
    pub tty: bool,
    /// Run as this user (`NAME`, `UID` or `UID:GID`, looked up in the
    /// container's /etc/passwd); default: the replica's user.
    #[arg(long, short = 'u')]
    pub user: Option<String>,
    /// Extra environment variables (`KEY=VALUE`, repeatable).
    #[arg(long, short = 'e')]
    pub env: Vec<String>,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true, num_args = 1..)]
    pub command: Vec<String>,
}

/// `service logs --since`: an age or a point in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogSince {
    AgeMs(u64),
    /// Milliseconds since the epoch.
    At(u64),
}

fn parse_log_since(value: &str) -> Result<LogSince, String> {
    if let Some(ms) = skiff_spec::time::parse_rfc3339_ms(value) {
        return Ok(LogSince::At(ms));
    }
    let fix =
        "use a duration like 90s, 10m, 2h or 1d, or an RFC 3339 time like 2026-12-07T10:00:00Z";
    match parse_since(value) {
        Ok(Since::AgeMs(ms)) if ms > 0 => Ok(LogSince::AgeMs(ms)),
        _ => Err(format!(
            "\"{value}\" is neither a duration nor a time; {fix}"
        )),
    }
}

#[derive(Args, Debug)]
pub struct CreateArgs {
    pub name: String,
    /// Return once the service is created instead of waiting until every
    /// replica serves (healthy, or running without a health check).
    #[arg(long, short = 'd')]
    pub detach: bool,
    /// Replace the image's entrypoint (as Docker's --entrypoint, this also
    /// drops the image's command); give the arguments after `--`.
    #[arg(long, help_heading = heading::IMAGE)]
    pub entrypoint: Option<String>,
    /// Label the service with KEY=VALUE (repeatable).
    #[arg(long = "label", value_name = "KEY=VALUE", help_heading = heading::IMAGE)]
    pub labels: Vec<String>,
    /// `seccomp=unconfined` (no filter) or `seccomp=FILE` (an OCI
    /// linux.seccomp JSON profile); default: Docker's default profile.
    #[arg(long = "security-opt", value_name = "seccomp=unconfined|FILE", help_heading = heading::IMAGE)]
    pub security_opt: Option<String>,
    #[command(flatten)]
    pub volumes: VolumeArgs,
    /// Give replicas the secret NAME as the file /run/secrets/TARGET
    /// (repeatable); on-change=signal:SIGHUP replaces the file and signals
    /// the replica instead of rolling out a new version.
    #[arg(long = "secret", value_name = "NAME[:TARGET][,mode=0400][,on-change=signal:SIGHUP]", help_heading = heading::IMAGE)]
    pub secrets: Vec<String>,
    /// How replicas run: `oci` (a container from --image, the default when
    /// an image is given) or `process` (a host process running the command).
    #[arg(long, value_enum, help_heading = heading::IMAGE)]
    pub runtime: Option<Runtime>,
    /// Image to run, e.g. `127.0.0.1:5000/demo/web:v1`.
    #[arg(long, help_heading = heading::IMAGE)]
    pub image: Option<String>,
    /// Port the container listens on (bridge mode); the host port maps to it.
    /// Default: the image's first exposed TCP port.
    #[arg(long, help_heading = heading::NETWORK)]
    pub port: Option<u32>,
    /// Publish the service on every node: PUBLISHED[:CONTAINER_PORT]. Each
    /// node's routing proxy listens on PUBLISHED and forwards to healthy
    /// replicas anywhere; CONTAINER_PORT (containers only) is --port.
    #[arg(long, value_name = "PUBLISHED[:CONTAINER_PORT]", value_parser = parse_publish, help_heading = heading::NETWORK)]
    pub publish: Option<(u16, Option<u16>)>,
    /// What the published port carries: `tcp` (default) or `http` (HTTP/1.1;
    /// the proxy also counts requests).
    #[arg(long, value_enum, help_heading = heading::NETWORK)]
    pub protocol: Option<Protocol>,
    /// Memory reserved per replica in MB (at least 4); also the limit of a container.
    #[arg(long, help_heading = heading::PLACEMENT)]
    pub memory: Option<u32>,
    /// CPU reserved per replica in millicores (1000 = one CPU); also the limit of a container.
    #[arg(long, help_heading = heading::PLACEMENT)]
    pub cpu: Option<u32>,
    /// Place replicas only on nodes where this holds: `zone==a`, `zone!=b`,
    /// `'zone in (a,b)'`; a node label, node.name or node.address (repeatable).
    #[arg(long = "constraint", help_heading = heading::PLACEMENT)]
    pub constraints: Vec<String>,
    /// At most N replicas on one node.
    #[arg(long, help_heading = heading::PLACEMENT)]
    pub max_per_node: Option<u32>,
    /// `spread` (default: across nodes, then zones) or `binpack` (fill nodes up).
    #[arg(long, value_enum, help_heading = heading::PLACEMENT)]
    pub placement: Option<Placement>,
    /// `replicated` (default) or `global` (one replica on every eligible node).
    #[arg(long, value_enum, help_heading = heading::PLACEMENT)]
    pub mode: Option<Mode>,
    /// User to run as, resolved in the image: NAME, UID, NAME:GROUP or UID:GID.
    #[arg(long, help_heading = heading::IMAGE)]
    pub user: Option<String>,
    /// `bridge` (own network namespace, host port mapped; default) or `host`.
    #[arg(long, value_enum, help_heading = heading::NETWORK)]
    pub network: Option<Network>,
    /// HTTP health check: GET PATH on the replica's port (2xx/3xx healthy).
    #[arg(long, value_name = "PATH", conflicts_with_all = ["health_tcp", "health_cmd"], help_heading = heading::HEALTH)]
    pub health_http: Option<String>,
    /// TCP health check: connect to the replica's port.
    #[arg(long, conflicts_with = "health_cmd", help_heading = heading::HEALTH)]
    pub health_tcp: bool,
    /// Exec health check: run CMD (with /bin/sh -c) in the replica; exit 0 is healthy.
    #[arg(long, value_name = "CMD", help_heading = heading::HEALTH)]
    pub health_cmd: Option<String>,
    /// Time between checks (e.g. 10s, 500ms).
    #[arg(long, value_parser = parse_millis, help_heading = heading::HEALTH)]
    pub health_interval: Option<u32>,
    /// Time a check may take.
    #[arg(long, value_parser = parse_millis, help_heading = heading::HEALTH)]
    pub health_timeout: Option<u32>,
    /// Consecutive failures that make a replica unhealthy.
    #[arg(long, help_heading = heading::HEALTH)]
    pub health_retries: Option<u32>,
    /// Time after start during which failures do not count.
    #[arg(long, value_parser = parse_millis, help_heading = heading::HEALTH)]
    pub health_start_period: Option<u32>,
    /// Run the entrypoint under a tiny init (default unless it is one).
    #[arg(long, conflicts_with = "no_init", help_heading = heading::IMAGE)]
    pub init: bool,
    /// Run the entrypoint as PID 1 without an init.
    #[arg(long, help_heading = heading::IMAGE)]
    pub no_init: bool,
    /// Number of replicas.
    #[arg(long, default_value_t = 1, allow_negative_numbers = true, help_heading = heading::PLACEMENT)]
    pub replicas: i64,
    /// Environment variable KEY=VALUE (repeatable).
    #[arg(long = "env", short = 'e', help_heading = heading::IMAGE)]
    pub env: Vec<String>,
    /// Working directory of each replica (absolute).
    #[arg(long, help_heading = heading::IMAGE)]
    pub workdir: Option<String>,
    /// Program and arguments, after `--` (for an image: replaces its Cmd).
    /// `$PORT` is replaced by the port the replica listens on.
    #[arg(last = true)]
    pub command: Vec<String>,
    #[command(flatten)]
    pub update: UpdatePolicyArgs,
    #[command(flatten)]
    pub autoscale: AutoscaleArgs,
}

/// How a new version replaces the running one (`service create` and
/// `service update`); unset flags keep the current value (or the default).
#[derive(Args, Debug, Default, Clone)]
pub struct UpdatePolicyArgs {
    /// `rolling` (default), `blue-green` or `canary`.
    #[arg(long, value_enum, value_name = "STRATEGY", help_heading = heading::UPDATE)]
    pub update_strategy: Option<Strategy>,
    /// Rolling: new replicas started at once (default 1).
    #[arg(long, help_heading = heading::UPDATE)]
    pub max_parallel: Option<u32>,
    /// Replicas allowed above the desired count during an update (default 1).
    #[arg(long, help_heading = heading::UPDATE)]
    pub max_surge: Option<u32>,
    /// Serving replicas allowed below the desired count (default 0).
    #[arg(long, help_heading = heading::UPDATE)]
    pub max_unavailable: Option<u32>,
    /// A new replica counts once healthy this long (default 5s; 0 allowed).
    #[arg(long, value_parser = parse_millis_or_zero, help_heading = heading::UPDATE)]
    pub min_healthy_time: Option<u32>,
    /// A new replica not healthy this long after placement fails the update (default 60s).
    #[arg(long, value_parser = parse_millis, help_heading = heading::UPDATE)]
    pub healthy_deadline: Option<u32>,
    /// The whole update must end within this (default 10m).
    #[arg(long, value_parser = parse_millis, help_heading = heading::UPDATE)]
    pub progress_deadline: Option<u32>,
    /// Do not return to the last good version when an update fails.
    #[arg(long, help_heading = heading::UPDATE)]
    pub no_auto_rollback: bool,
    /// Return to the last good version when an update fails (the default).
    #[arg(long, conflicts_with = "no_auto_rollback", help_heading = heading::UPDATE)]
    pub auto_rollback: bool,
    /// Blue-green and canary: promote once ready, without `service promote`.
    #[arg(long, help_heading = heading::UPDATE)]
    pub auto_promote: bool,
    /// Canary: new replicas started first (implies --update-strategy canary).
    #[arg(long, help_heading = heading::UPDATE)]
    pub canary: Option<u32>,
    /// Canary: percent of new connections sent to the canaries (default: by replica count).
    #[arg(long, value_name = "PCT", help_heading = heading::UPDATE)]
    pub canary_weight: Option<u32>,
    /// Fail the update when the new version's error rate (HTTP 5xx and
    /// failed dials through the routing proxies) exceeds PCT percent.
    #[arg(long, value_name = "PCT", help_heading = heading::UPDATE)]
    pub max_error_rate: Option<u32>,
}

/// Autoscaling between min and max replicas on one or more targets.
#[derive(Args, Debug, Default, Clone)]
pub struct AutoscaleArgs {
    /// Fewest replicas (0: scale to zero when idle).
    #[arg(long, value_name = "N", help_heading = heading::AUTOSCALE)]
    pub autoscale_min: Option<u32>,
    /// Most replicas.
    #[arg(long, value_name = "M", help_heading = heading::AUTOSCALE)]
    pub autoscale_max: Option<u32>,
    /// Target requests per second per replica (HTTP services).
    #[arg(long, value_name = "R", help_heading = heading::AUTOSCALE)]
    pub target_rps: Option<f64>,
    /// Target open connections per replica.
    #[arg(long, value_name = "C", help_heading = heading::AUTOSCALE)]
    pub target_concurrency: Option<f64>,
    /// Target CPU, percent of the replica's CPU limit.
    #[arg(long, value_name = "P", help_heading = heading::AUTOSCALE)]
    pub target_cpu: Option<f64>,
    /// Stop autoscaling: the replica count stays where it is.
    #[arg(long, help_heading = heading::AUTOSCALE)]
    pub no_autoscale: bool,
}

/// `service update`: what changes; anything not given stays as it is.
#[derive(Args, Debug)]
pub struct UpdateArgs {
    pub name: String,
    /// New image reference.
    #[arg(long, help_heading = heading::IMAGE)]
    pub image: Option<String>,
    /// Set an environment variable KEY=VALUE (repeatable).
    #[arg(long = "env", short = 'e', help_heading = heading::IMAGE)]
    pub env: Vec<String>,
    /// Remove an environment variable (repeatable).
    #[arg(long = "env-rm", value_name = "KEY", help_heading = heading::IMAGE)]
    pub env_rm: Vec<String>,
    /// Number of replicas.
    #[arg(long, allow_negative_numbers = true, help_heading = heading::PLACEMENT)]
    pub replicas: Option<i64>,
    /// Memory per replica in MB.
    #[arg(long, help_heading = heading::PLACEMENT)]
    pub memory: Option<u32>,
    /// CPU per replica in millicores.
    #[arg(long, help_heading = heading::PLACEMENT)]
    pub cpu: Option<u32>,
    /// User to run as.
    #[arg(long, help_heading = heading::IMAGE)]
    pub user: Option<String>,
    /// Port the container listens on.
    #[arg(long, help_heading = heading::NETWORK)]
    pub port: Option<u32>,
    /// HTTP health check path.
    #[arg(long, value_name = "PATH", conflicts_with_all = ["health_tcp", "health_cmd"], help_heading = heading::HEALTH)]
    pub health_http: Option<String>,
    /// TCP health check.
    #[arg(long, conflicts_with = "health_cmd", help_heading = heading::HEALTH)]
    pub health_tcp: bool,
    /// Exec health check (with /bin/sh -c).
    #[arg(long, value_name = "CMD", help_heading = heading::HEALTH)]
    pub health_cmd: Option<String>,
    /// Time between checks (e.g. 10s, 500ms).
    #[arg(long, value_parser = parse_millis, help_heading = heading::HEALTH)]
    pub health_interval: Option<u32>,
    /// Time a check may take.
    #[arg(long, value_parser = parse_millis, help_heading = heading::HEALTH)]
    pub health_timeout: Option<u32>,
    /// Consecutive failures that make a replica unhealthy.
    #[arg(long, help_heading = heading::HEALTH)]
    pub health_retries: Option<u32>,
    /// Time after start during which failures do not count.
    #[arg(long, value_parser = parse_millis, help_heading = heading::HEALTH)]
    pub health_start_period: Option<u32>,
    /// Drop the service's own health check (the image's HEALTHCHECK, if any, applies).
    #[arg(long, conflicts_with_all = ["health_http", "health_tcp", "health_cmd"], help_heading = heading::HEALTH)]
    pub health_rm: bool,
    /// Add a placement constraint (`zone==a`; repeatable).
    #[arg(long = "constraint-add", value_name = "CONSTRAINT", help_heading = heading::PLACEMENT)]
    pub constraint_add: Vec<String>,
    /// Remove a placement constraint, written as `service inspect` shows it (repeatable).
    #[arg(long = "constraint-rm", value_name = "CONSTRAINT", help_heading = heading::PLACEMENT)]
    pub constraint_rm: Vec<String>,
    /// Publish on another port: PUBLISHED[:CONTAINER_PORT]. Proxies move their
    /// listener; connections already open carry on.
    #[arg(long, value_name = "PUBLISHED[:CONTAINER_PORT]", value_parser = parse_publish, conflicts_with = "publish_rm", help_heading = heading::NETWORK)]
    pub publish: Option<(u16, Option<u16>)>,
    /// Stop publishing the service.
    #[arg(long, help_heading = heading::NETWORK)]
    pub publish_rm: bool,
    /// What the published port carries: `tcp` or `http`.
    #[arg(long, value_enum, help_heading = heading::NETWORK)]
    pub protocol: Option<Protocol>,
    /// `bridge` or `host` networking.
    #[arg(long, value_enum, help_heading = heading::NETWORK)]
    pub network: Option<Network>,
    /// `spread` or `binpack`.
    #[arg(long, value_enum, help_heading = heading::PLACEMENT)]
    pub placement: Option<Placement>,
    /// `replicated` or `global`, rolled out like any update (new replicas
    /// first, old ones drained).
    #[arg(long, value_enum, help_heading = heading::PLACEMENT)]
    pub mode: Option<Mode>,
    /// At most N replicas on one node (0: no limit).
    #[arg(long, help_heading = heading::PLACEMENT)]
    pub max_per_node: Option<u32>,
    /// Working directory (an absolute path; empty: the image's).
    #[arg(long, help_heading = heading::IMAGE)]
    pub workdir: Option<String>,
    /// `oci` or `process`.
    #[arg(long, value_enum, help_heading = heading::IMAGE)]
    pub runtime: Option<Runtime>,
    /// Replace the image's entrypoint (empty: the image's again).
    #[arg(long, help_heading = heading::IMAGE)]
    pub entrypoint: Option<String>,
    /// Add or change a label KEY=VALUE (repeatable; changes restart nothing).
    #[arg(long = "label-add", value_name = "KEY=VALUE", help_heading = heading::IMAGE)]
    pub label_add: Vec<String>,
    /// Remove a label (repeatable).
    #[arg(long = "label-rm", value_name = "KEY", help_heading = heading::IMAGE)]
    pub label_rm: Vec<String>,
    /// `seccomp=unconfined`, `seccomp=FILE` or `seccomp=default`.
    #[arg(long = "security-opt", value_name = "seccomp=unconfined|FILE|default", help_heading = heading::IMAGE)]
    pub security_opt: Option<String>,
    #[command(flatten)]
    pub volumes: VolumeArgs,
    /// Remove the volume or mount at this path in the container (repeatable).
    #[arg(long = "volume-rm", value_name = "PATH")]
    pub volume_rm: Vec<String>,
    /// Add a secret, or change how it is given (repeatable); see `service
    /// create --secret`.
    #[arg(long = "secret", value_name = "NAME[:TARGET][,mode=0400][,on-change=signal:SIGHUP]", help_heading = heading::IMAGE)]
    pub secrets: Vec<String>,
    /// Stop giving replicas the secret NAME (repeatable).
    #[arg(long = "secret-rm", value_name = "NAME", help_heading = heading::IMAGE)]
    pub secret_rm: Vec<String>,
    /// Run the entrypoint under a tiny init.
    #[arg(long, conflicts_with = "no_init", help_heading = heading::IMAGE)]
    pub init: bool,
    /// Run the entrypoint as PID 1 without an init.
    #[arg(long, help_heading = heading::IMAGE)]
    pub no_init: bool,
    /// Return at once instead of showing the deployment's progress.
    #[arg(long, short = 'd')]
    pub detach: bool,
    /// New program and arguments, after `--`.
    #[arg(last = true)]
    pub command: Vec<String>,
    #[command(flatten)]
    pub update: UpdatePolicyArgs,
    #[command(flatten)]
    pub autoscale: AutoscaleArgs,
}

/// The files of a stack and what is read with them.
#[derive(Args, Debug, Clone)]
pub struct StackFileArgs {
    /// The stack's name: its services are named NAME-SERVICE.
    pub name: String,
    /// A stack file: Skiff's own (`skiff: v1`) or a Compose file; later files
    /// override earlier ones, as `docker compose -f a -f b` does.
    #[arg(long = "file", short = 'f', required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
    /// Set a variable for `${VAR}` in the files (over the shell and `.env`; repeatable).
    #[arg(long = "var", value_name = "KEY=VALUE")]
    pub vars: Vec<String>,
    /// Include the services of this Compose profile (repeatable).
    #[arg(long = "profile", value_name = "PROFILE")]
    pub profiles: Vec<String>,
    /// Read variables from this file instead of the `.env` beside the first file.
    #[arg(long, value_name = "FILE")]
    pub env_file: Option<PathBuf>,
    /// Treat every warning (an ignored key) as an error.
    #[arg(long)]
    pub strict: bool,
}

#[derive(Subcommand, Debug)]
pub enum StackCommand {
    /// Create or update every service of a stack in one step, removing the
    /// services no longer in the files; waits until every replica serves.
    Deploy {
        #[command(flatten)]
        files: StackFileArgs,
        /// Refuse if the stack changed after this index (printed by `stack plan`).
        #[arg(long, value_name = "INDEX")]
        check_index: Option<u64>,
        /// Return once committed instead of waiting for the replicas.
        #[arg(long, short = 'd')]
        detach: bool,
    },
    /// Show what `stack deploy` would change and where new replicas would go;
    /// changes nothing. Exit status 0: no change, 2: changes.
    Plan {
        #[command(flatten)]
        files: StackFileArgs,
    },
    /// List stacks.
    Ls,
    /// List the replicas of every service of a stack.
    Ps {
        name: String,
        /// Include replicas that are stopping or stopped.
        #[arg(long)]
        all: bool,
    },
    /// Remove every service of a stack.
    Rm { name: String },
    /// Print the stack as a Skiff stack file that `stack deploy` turns back
    /// into the same state.
    Export { name: String },
}

/// A token's role (see `skiff_control_plane::state::Role`).
#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum RoleArg {
    /// Everything: also tokens, nodes, servers and `--show-values`.
    Admin,
    /// Reads, and writes to services, stacks, jobs, volumes, secrets,
    /// variables; exec.
    Operator,
    /// Lists, inspect, events, logs and cluster status.
    ReadOnly,
}

#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Create a token and print its secret (shown this once only).
    Create {
        name: String,
        #[arg(long, value_enum)]
        role: RoleArg,
        /// How long it is valid (e.g. 90s, 30m, 24h, 7d); default: until
        /// revoked.
        #[arg(long, value_parser = parse_ttl)]
        ttl: Option<u64>,
    },
    /// List tokens: name, role, created, expires, state (never a secret).
    Ls,
    /// Revoke a token: calls presenting it are refused from now on.
    Revoke { name: String },
}

#[derive(Subcommand, Debug)]
pub enum SecretCommand {
    /// Create a secret from a file (`-`: standard input); at most 512 KiB.
    Create {
        name: String,
        #[arg(long = "from-file", value_name = "FILE|-")]
        from_file: String,
    },
    /// Give a secret a new value (a new version): services using it roll
    /// out with their update policy, or with on-change=signal get the new
    /// file and a signal.
    Update {
        name: String,
        #[arg(long = "from-file", value_name = "FILE|-")]
        from_file: String,
    },
    /// List secrets: name, version, size, created, updated, services.
    Ls,
    /// Show one secret's metadata (never its value).
    Inspect { name: String },
    /// Remove a secret (refused while a service uses it).
    Rm { name: String },
}

#[derive(Subcommand, Debug)]
pub enum VolumeCommand {
    /// List volumes: name, node, service, slot, size, whether in use.
    Ls,
    /// Show one volume (on every node that holds one by that name).
    Inspect { name: String },
    /// Delete a volume and its data (refused while a replica uses it).
    Rm {
        name: String,
        /// The node whose volume to delete, when several hold one by that name.
        #[arg(long)]
        node: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum NodeCommand {
    /// List nodes.
    Ls,
    /// Show a node: address, status, availability, labels, capacity and
    /// use, ports, last heartbeat, and its replicas.
    Inspect { name: String },
    /// Forget a down node and its replicas (refused while it is ready).
    Rm { name: String },
    /// Refuse a node's certificate everywhere from now on (within 5 s):
    /// its agent can no longer register, report or receive assignments.
    Revoke { name: String },
    /// Move every replica off a node (replacements start first) and place
    /// nothing new on it.
    Drain {
        name: String,
        /// Stop replicas that have not moved after this long (e.g. 60s, 5m).
        #[arg(long, value_parser = parse_millis)]
        deadline: Option<u32>,
    },
    /// Place nothing new on a node; its replicas keep running.
    Pause { name: String },
    /// Let the scheduler use a paused or drained node again.
    Activate { name: String },
    /// Remove the images and layers no replica uses from nodes' image
    /// stores (every node when none is named); prints what each removed.
    Prune { nodes: Vec<String> },
}

#[derive(Subcommand, Debug)]
pub enum ClusterCommand {
    /// Show members, leader, term and commit index.
    Status,
    /// Remove a server from the control plane (a Raft membership change).
    Remove { name: String },
    /// Print the join token of a role and the command to join with it:
    /// `cluster token agent`, `cluster token server`; `cluster token
    /// rotate agent` invalidates the current one first.
    Token {
        /// `server` or `agent`, or `rotate server|agent`.
        #[arg(num_args = 1..=2, value_name = "[rotate] ROLE")]
        words: Vec<String>,
        /// Print only the token.
        #[arg(long, short = 'q')]
        quiet: bool,
    },
    /// Back up the whole cluster to a file, or inspect such a file; a new
    /// cluster starts from one with `skiff server --bootstrap --restore FILE`.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
}

#[derive(Subcommand, Debug)]
pub enum SnapshotCommand {
    /// Save a consistent snapshot of the cluster's state (services, nodes,
    /// replicas, variables, volumes, tokens, secrets) with the CA and the
    /// secrets key, checksummed, to FILE (mode 0600).
    Save {
        file: PathBuf,
        /// Leave out the CA key and the secrets key: the file holds no
        /// secret, but a cluster restored from it has no secrets and a new
        /// CA (every agent joins again).
        #[arg(long)]
        redact: bool,
    },
    /// Check a snapshot file's checksum and show what it holds (offline).
    Inspect { file: PathBuf },
}

/// `500ms`, `10s`, `2m` or a bare number of seconds, as milliseconds.
/// Like [`parse_millis`], but 0 is allowed.
fn parse_millis_or_zero(value: &str) -> Result<u32, String> {
    if value.trim_end_matches(|c: char| c.is_ascii_alphabetic()) == "0" {
        return Ok(0);
    }
    parse_millis(value)
}

pub(crate) fn parse_millis(value: &str) -> Result<u32, String> {
    let fix = "use a duration like 500ms, 10s or 2m";
    let (number, unit) = value
        .find(|c: char| !c.is_ascii_digit())
        .map_or((value, "s"), |i| value.split_at(i));
    let n: u64 = number
        .parse()
        .map_err(|_| format!("\"{value}\" is not a duration; {fix}"))?;
    let ms = match unit {
        "ms" => n,
        "s" => n * 1000,
        "m" => n * 60_000,
        _ => return Err(format!("\"{value}\" has an unknown unit; {fix}")),
    };
    u32::try_from(ms)
        .ok()
        .filter(|ms| *ms > 0)
        .ok_or_else(|| format!("\"{value}\" is out of range; {fix}"))
}

/// A token's lifetime: `90s`, `30m`, `24h`, `7d`.
pub(crate) fn parse_ttl(value: &str) -> Result<u64, String> {
    let fix = "use a duration like 90s, 30m, 24h or 7d";
    let (number, unit) = value
        .find(|c: char| !c.is_ascii_digit())
        .map_or((value, "s"), |i| value.split_at(i));
    let n: u64 = number
        .parse()
        .map_err(|_| format!("\"{value}\" is not a duration; {fix}"))?;
    let unit_ms: u64 = match unit {
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(format!("\"{value}\" has an unknown unit; {fix}")),
    };
    n.checked_mul(unit_ms)
        .filter(|ms| *ms > 0)
        .ok_or_else(|| format!("\"{value}\" is out of range; {fix}"))
}

pub(crate) fn parse_label(value: &str) -> Result<(String, String), String> {
    match value.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() && !v.trim().is_empty() => {
            Ok((k.trim().to_string(), v.trim().to_string()))
        }
        _ => Err(format!(
            "\"{value}\" is not a label; use KEY=VALUE, e.g. zone=a"
        )),
    }
}

/// Seconds, possibly fractional (`0.5`), from 0 to a day.
/// A certificate lifetime: `90d`, `12h`, `30m`, `45s` (at least 10 s).
pub(crate) fn parse_lifetime(value: &str) -> Result<std::time::Duration, String> {
    let fix = "use a duration like 90d, 12h, 30m or 60s (at least 10s)";
    let (number, unit) = value
        .find(|c: char| !c.is_ascii_digit())
        .map_or((value, "s"), |i| value.split_at(i));
    let n: u64 = number
        .parse()
        .map_err(|_| format!("\"{value}\" is not a duration; {fix}"))?;
    let secs = match unit {
        "s" => n,
        "m" => n.saturating_mul(60),
        "h" => n.saturating_mul(3600),
        "d" => n.saturating_mul(86_400),
        _ => return Err(format!("\"{value}\" has an unknown unit; {fix}")),
    };
    if !(10..=10 * 365 * 86_400).contains(&secs) {
        return Err(format!("\"{value}\" is out of range; {fix}"));
    }
    Ok(std::time::Duration::from_secs(secs))
}

fn parse_secs(value: &str) -> Result<f64, String> {
    value
        .parse::<f64>()
        .ok()
        .filter(|s| (0.0..=86_400.0).contains(s))
        .ok_or_else(|| format!("\"{value}\" is not a number of seconds; use e.g. 5 or 0.5"))
}

/// `PUBLISHED` or `PUBLISHED:CONTAINER_PORT`, ports from 1 to 65535.
fn parse_publish(value: &str) -> Result<(u16, Option<u16>), String> {
    let fix = "use PUBLISHED[:CONTAINER_PORT], e.g. 8080:80, ports from 1 to 65535";
    let port = |p: &str| {
        p.parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("\"{value}\" is not a port mapping; {fix}"))
    };
    match value.split_once(':') {
        Some((published, container)) => Ok((port(published)?, Some(port(container)?))),
        None => Ok((port(value)?, None)),
    }
}

pub(crate) fn parse_port_range(value: &str) -> Result<(u16, u16), String> {
    let fix = "use START-END, e.g. 20000-29999, within 1024-65535";
    let (start, end) = value
        .split_once('-')
        .ok_or_else(|| format!("\"{value}\" is not a range; {fix}"))?;
    let parse = |s: &str| s.trim().parse::<u16>().ok().filter(|p| *p >= 1024);
    match (parse(start), parse(end)) {
        (Some(start), Some(end)) if start <= end => Ok((start, end)),
        _ => Err(format!("\"{value}\" is not a valid range; {fix}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges_parse_and_bad_ones_say_how_to_fix_them() {
        assert_eq!(parse_port_range("20000-20010"), Ok((20000, 20010)));
        for bad in ["20000", "20010-20000", "80-90", "a-b", "20000-70000"] {
            assert!(
                parse_port_range(bad).unwrap_err().contains("START-END"),
                "{bad}"
            );
        }
    }

    #[test]
    fn since_is_a_raft_index_without_a_unit_and_an_age_with_one() {
        assert_eq!(parse_since("12345"), Ok(Since::Index(12345)));
        assert_eq!(parse_since("10m"), Ok(Since::AgeMs(600_000)));
        assert_eq!(parse_since("90s"), Ok(Since::AgeMs(90_000)));
        assert_eq!(parse_since("2h"), Ok(Since::AgeMs(7_200_000)));
        assert_eq!(parse_since("1d"), Ok(Since::AgeMs(86_400_000)));
        for bad in ["10x", "m", "-5", "1.5h"] {
            assert!(
                parse_since(bad).unwrap_err().contains("Raft index"),
                "{bad}"
            );
        }
    }

    #[test]
    fn log_since_is_an_age_or_an_rfc3339_time() {
        assert_eq!(parse_log_since("10m"), Ok(LogSince::AgeMs(600_000)));
        assert_eq!(
            parse_log_since("2024-05-01T12:00:00Z"),
            Ok(LogSince::At(1_714_564_800_000))
        );
        for bad in ["12345", "0s", "yesterday", "2024-05-01"] {
            assert!(
                parse_log_since(bad).unwrap_err().contains("RFC 3339"),
                "{bad}"
            );
        }
    }

    #[test]
    fn exec_takes_its_command_after_a_double_dash() {
        let parsed = Cli::try_parse_from([
            "skiff", "service", "exec", "web", "-it", "--user", "nobody", "--", "sh", "-c", "id",
        ])
        .unwrap();
        let Command::Service(ServiceCommand::Exec(args)) = parsed.command else {
            panic!("not exec: {parsed:?}");
        };
        assert!(args.interactive && args.tty);
        assert_eq!(args.user.as_deref(), Some("nobody"));
        assert_eq!(args.command, ["sh", "-c", "id"]);
        assert!(Cli::try_parse_from(["skiff", "service", "exec", "web"]).is_err());
    }

    #[test]
    fn token_lifetimes_parse_with_units_up_to_days() {
        assert_eq!(parse_ttl("2s"), Ok(2000));
        assert_eq!(parse_ttl("24h"), Ok(86_400_000));
        assert_eq!(parse_ttl("7d"), Ok(604_800_000));
        assert!(parse_ttl("0s").is_err());
        assert!(parse_ttl("1y").unwrap_err().contains("unknown unit"));
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_millis("500ms"), Ok(500));
        assert_eq!(parse_millis("10s"), Ok(10_000));
        assert_eq!(parse_millis("2m"), Ok(120_000));
        assert_eq!(parse_millis("3"), Ok(3000));
        assert!(parse_millis("0s").is_err());
        assert!(parse_millis("5h").is_err());
    }

    #[test]
    fn health_flags_are_exclusive() {
        let parse = |extra: &[&str]| {
            let mut args = vec!["skiff", "service", "create", "web", "--image", "busybox"];
            args.extend_from_slice(extra);
            Cli::try_parse_from(args)
        };
        assert!(parse(&["--health-http", "/", "--health-tcp"]).is_err());
        assert!(parse(&["--health-tcp", "--health-cmd", "true"]).is_err());
        assert!(parse(&["--init", "--no-init"]).is_err());
        assert!(parse(&["--health-http", "/", "--health-interval", "1s"]).is_ok());
    }

    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn a_later_server_flag_overrides_an_earlier_one() {
        let cli = Cli::try_parse_from([
            "skiff",
            "server",
            "--name=a",
            "--data-dir=/x",
            "--name",
            "b",
        ])
        .unwrap();
        let Command::Server(args) = cli.command else {
            panic!("not a server command")
        };
        assert_eq!(args.name, "b");
    }

    #[test]
    fn a_negative_replica_count_reaches_validation() {
        let cli = Cli::try_parse_from(["skiff", "service", "scale", "web", "-1"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Service(ServiceCommand::Scale { replicas: -1, .. })
        ));
    }
}

/// Volumes and mounts, on `service create` and `update` (on update they
/// add to the service's mounts, replacing one at the same path).
#[derive(clap::Args, Debug, Default)]
pub struct VolumeArgs {
    /// Mount the named volume NAME at /path (repeatable); kept on the node
    /// across updates, restarts and `service rm`, removed only by `skiff
    /// volume rm`. Each replica gets its own NAME-i unless --volume-scope
    /// shared.
    #[arg(long = "volume", short = 'v', value_name = "NAME:/path[:ro][:nocopy]")]
    pub volume: Vec<String>,
    /// Bind-mount a host path (allowed by the agent's --allow-host-path).
    #[arg(long = "mount", value_name = "type=bind,src=/host/path,dst=/path[,ro]")]
    pub mount: Vec<String>,
    /// `per-replica` (replica i owns NAME-i and stays on its node) or
    /// `shared` (one NAME per node).
    #[arg(long = "volume-scope", value_name = "per-replica|shared")]
    pub volume_scope: Option<String>,
}
