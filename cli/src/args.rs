//! Every command line Skiff accepts, in one place.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    name = "skiff",
    version,
    about = "A small-cluster container scheduler",
    propagate_version = true
)]
pub struct Cli {
    /// Address of any skiff server.
    #[arg(
        long,
        global = true,
        env = "SKIFF_ADDR",
        default_value = "127.0.0.1:7070"
    )]
    pub server: String,
    /// How read commands print their result.
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
    /// Log level or filter (e.g. `debug`, `skiff_agent=trace`); overrides RUST_LOG.
    #[arg(long, global = true)]
    pub log_level: Option<String>,
    /// Log line format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Table,
    Json,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
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
    /// Inspect the nodes of the cluster.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Inspect the control plane.
    #[command(subcommand)]
    Cluster(ClusterCommand),
}

#[derive(Args, Debug)]
pub struct ServerArgs {
    /// Name of this server in the cluster.
    #[arg(long)]
    pub name: String,
    /// Where the Raft log and state live.
    #[arg(long)]
    pub data_dir: PathBuf,
    /// Address for the gRPC API (CLI, agents).
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,
    /// Start a new one-member cluster if the data dir holds none.
    #[arg(long)]
    pub bootstrap: bool,
}

#[derive(Args, Debug)]
pub struct AgentArgs {
    /// Name of this node.
    #[arg(long)]
    pub name: String,
    /// Where allocations, logs and agent state live.
    #[arg(long)]
    pub data_dir: PathBuf,
    /// Servers to connect to, comma-separated or repeated.
    #[arg(long, value_delimiter = ',', required = true)]
    pub servers: Vec<String>,
    #[command(flatten)]
    pub node: NodeArgs,
}

/// Node settings shared by `skiff agent` and `skiff dev`.
#[derive(Args, Debug)]
pub struct NodeArgs {
    /// Address at which this node's replicas are reached.
    #[arg(long, default_value = "127.0.0.1")]
    pub advertise: IpAddr,
    /// Host ports the scheduler may assign to replicas on this node.
    #[arg(long, default_value = "20000-29999", value_parser = parse_port_range)]
    pub port_range: (u16, u16),
    /// Seconds between SIGTERM and SIGKILL when a replica stops.
    #[arg(long, default_value_t = 5)]
    pub stop_grace_secs: u64,
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
    #[command(flatten)]
    pub node: NodeArgs,
}

#[derive(Subcommand, Debug)]
pub enum ServiceCommand {
    /// Create a service: `skiff service create web --replicas 3 -- python3 -m http.server '$PORT'`.
    Create(CreateArgs),
    /// List services.
    Ls,
    /// List the replicas of a service.
    Ps {
        name: String,
        /// Include replicas that are stopping or stopped.
        #[arg(long)]
        all: bool,
    },
    /// Show a service's spec and replicas.
    Inspect { name: String },
    /// Change the number of replicas.
    Scale {
        name: String,
        #[arg(allow_negative_numbers = true)]
        replicas: i64,
    },
    /// Remove a service and stop all its replicas.
    Rm { name: String },
}

#[derive(Args, Debug)]
pub struct CreateArgs {
    pub name: String,
    /// How replicas run: `process` (a host process per replica).
    #[arg(long, default_value = "process")]
    pub runtime: String,
    /// Number of replicas.
    #[arg(long, default_value_t = 1, allow_negative_numbers = true)]
    pub replicas: i64,
    /// Environment variable KEY=VALUE (repeatable).
    #[arg(long = "env", short = 'e')]
    pub env: Vec<String>,
    /// Working directory of each replica (absolute).
    #[arg(long)]
    pub workdir: Option<String>,
    /// Program and arguments, after `--`. `$PORT` is replaced by the replica's host port.
    #[arg(last = true)]
    pub command: Vec<String>,
}

#[derive(Subcommand, Debug)]
pub enum NodeCommand {
    /// List nodes.
    Ls,
}

#[derive(Subcommand, Debug)]
pub enum ClusterCommand {
    /// Show members, leader, term and commit index.
    Status,
}

fn parse_port_range(value: &str) -> Result<(u16, u16), String> {
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
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
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
