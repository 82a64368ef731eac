//! `--config FILE` for `skiff server` and `skiff agent`: settings read from
//! TOML into typed structs ([`ServerFile`], [`AgentFile`]), so that a key
//! that is no setting, or a value of the wrong type, is an error naming the
//! key, the file and the line.
//!
//! Where a setting comes from, strongest first: the command line, a
//! `SKIFF_*` environment variable (clap's `env` on the argument), the file,
//! the built-in default. The file takes its place by becoming the
//! arguments' default values, so clap applies that order itself and the
//! commands get one set of arguments whatever their source.

use std::ffi::OsString;
use std::fmt::Debug;
use std::marker::PhantomData;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use clap::Command;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};

use crate::args::{self, LogFormat, RaftLogArg};

/// `skiff server`'s file. Every key is a long flag of the command, with
/// `_` for `-` (`data_dir` for `--data-dir`), and takes the same values.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerFile {
    name: Option<String>,
    data_dir: Option<PathBuf>,
    listen: Option<SocketAddr>,
    bootstrap: Option<bool>,
    join: Option<String>,
    advertise: Option<String>,
    tick_ms: Option<u64>,
    election_ticks: Option<usize>,
    snapshot_every: Option<u64>,
    raft_log: Option<RaftLogArg>,
    heartbeat_ttl: Option<Checked<Duration>>,
    metrics_listen: Option<SocketAddr>,
    ui_listen: Option<SocketAddr>,
    autoscale_window: Option<Checked<Duration>>,
    max_services: Option<usize>,
    max_variables: Option<usize>,
    max_request_bytes: Option<u32>,
    reserve_disk_mb: Option<u64>,
    max_raft_message_bytes: Option<u32>,
    max_concurrent_streams: Option<u32>,
    request_timeout: Option<Checked<Duration>>,
    log_level: Option<String>,
    log_format: Option<LogFormat>,
}

/// `skiff agent`'s file, keyed as [`ServerFile`]; repeatable flags
/// (`--label`, `--insecure-registry`, `--servers`) take a list.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentFile {
    name: Option<String>,
    data_dir: Option<PathBuf>,
    servers: Option<Vec<String>>,
    advertise: Option<IpAddr>,
    port_range: Option<Checked<PortRange>>,
    stop_grace_secs: Option<u64>,
    oci_runtime: Option<String>,
    insecure_registry: Option<Vec<String>>,
    docker_config: Option<PathBuf>,
    cpu: Option<u32>,
    memory: Option<u32>,
    label: Option<Vec<Checked<Label>>>,
    metrics_listen: Option<SocketAddr>,
    proxy_replica_metrics: Option<bool>,
    drain_secs: Option<f64>,
    image_gc_threshold_mb: Option<u64>,
    enable_process_runtime: Option<bool>,
    allow_host_path: Option<Vec<String>>,
    allow_privileged_ports: Option<bool>,
    registry_auth_scope: Option<Vec<String>>,
    log_level: Option<String>,
    log_format: Option<LogFormat>,
}

/// `skiff`'s command line with the settings of the `--config` file given to
/// `server` or `agent` in `args`, if any, as the arguments' defaults.
pub fn command(mut command: Command, args: &[OsString]) -> anyhow::Result<Command> {
    let Some((subcommand, path)) = config_path(&command, args) else {
        return Ok(command);
    };
    let settings = match subcommand.as_str() {
        "server" => settings(&read::<ServerFile>(&path)?),
        "agent" => settings(&read::<AgentFile>(&path)?),
        _ => return Ok(command),
    };
    for (key, values) in settings {
        let long = key.replace('_', "-");
        let set = |arg: clap::Arg| arg.default_values(values.clone()).required(false);
        if let Some(id) = id_of(&command, &long) {
            command = command.mut_arg(id, set);
        } else {
            let sub = command
                .find_subcommand(&subcommand)
                .ok_or_else(|| anyhow!("no subcommand {subcommand}"))?;
            let Some(id) = id_of(sub, &long) else {
                bail!("config key `{key}` is no flag of skiff {subcommand}");
            };
            command = command.mut_subcommand(&subcommand, |sub| sub.mut_arg(id, set));
        }
    }
    Ok(command)
}

/// The id of `command`'s argument `--long`.
fn id_of(command: &Command, long: &str) -> Option<clap::Id> {
    command
        .get_arguments()
        .find(|arg| arg.get_long() == Some(long))
        .map(|arg| arg.get_id().clone())
}

/// The subcommand of `args` and its `--config FILE`, if it has one: the
/// subcommand is the first argument that is neither an option nor the
/// value of one of `skiff`'s own options (`--server ADDR`).
fn config_path(command: &Command, args: &[OsString]) -> Option<(String, PathBuf)> {
    let takes_value: Vec<String> = command
        .get_arguments()
        .filter(|arg| arg.get_action().takes_values())
        .flat_map(|arg| {
            let long = arg.get_long().map(|l| format!("--{l}"));
            let short = arg.get_short().map(|s| format!("-{s}"));
            long.into_iter().chain(short)
        })
        .collect();
    let mut rest = args.iter().skip(1);
    let subcommand = loop {
        let arg = rest.next()?.to_str()?;
        if takes_value.iter().any(|t| t == arg) {
            rest.next();
        } else if !arg.starts_with('-') {
            break arg.to_string();
        }
    };
    let mut path = None;
    while let Some(arg) = rest.next() {
        if arg == "--config" {
            path = rest.next().map(PathBuf::from);
        } else if let Some(value) = arg.to_str().and_then(|a| a.strip_prefix("--config=")) {
            path = Some(PathBuf::from(value));
        } else if arg == "--" {
            break;
        }
    }
    Some((subcommand, path?))
}

/// The file at `path`, or an error naming it (and the line and key at fault).
fn read<T: DeserializeOwned + Serialize + Default>(path: &Path) -> anyhow::Result<T> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("failed to read config file {}", path.display()))?;
    toml::from_str(&text).map_err(|err| anyhow!(describe(&err, &text, path, &keys::<T>())))
}

/// The keys a file of type `T` may hold.
fn keys<T: Serialize + Default>() -> Vec<String> {
    match serde_json::to_value(T::default()) {
        Ok(serde_json::Value::Object(map)) => map.keys().cloned().collect(),
        _ => Vec::new(),
    }
}

/// `invalid config file FILE:LINE: ...`, with a hint for an unknown key.
fn describe(err: &toml::de::Error, text: &str, path: &Path, keys: &[String]) -> String {
    let line = err
        .span()
        .map(|span| text[..span.start.min(text.len())].matches('\n').count() + 1);
    let at = match line {
        Some(line) => format!("{}:{line}", path.display()),
        None => path.display().to_string(),
    };
    let message = err.message();
    if let Some(key) = unknown_key(message) {
        let hint = match nearest(key, keys) {
            Some(known) => format!("did you mean `{known}`?"),
            None => format!("the keys are {}", keys.join(", ")),
        };
        return format!("invalid config file {at}: unknown key `{key}`; {hint}");
    }
    let source = line
        .and_then(|line| text.lines().nth(line - 1))
        .map(|source| format!(" (in `{}`)", source.trim()))
        .unwrap_or_default();
    format!("invalid config file {at}: {message}{source}")
}

/// The key of serde's "unknown field `KEY`, expected ..." message.
fn unknown_key(message: &str) -> Option<&str> {
    message.strip_prefix("unknown field `")?.split('`').next()
}

/// The known key closest to `key` (a flag's spelling, `data-dir`, or a typo
/// of a letter or two), if any is close.
fn nearest<'a>(key: &str, keys: &'a [String]) -> Option<&'a str> {
    let key = key.replace('-', "_");
    keys.iter()
        .map(|known| (edit_distance(&key, known), known))
        .filter(|(distance, known)| *distance <= 2.max(known.len() / 4))
        .min()
        .map(|(_, known)| known.as_str())
}

/// Levenshtein distance: insertions, deletions and substitutions.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitute = diagonal + usize::from(ca != *cb);
            diagonal = row[j + 1];
            row[j + 1] = substitute.min(row[j] + 1).min(diagonal + 1);
        }
    }
    row[b.len()]
}

/// Each setting the file holds, as its key and the text of its value(s)
/// as the flag takes them; unset keys and `false` are left out.
fn settings<T: Serialize>(file: &T) -> Vec<(String, Vec<String>)> {
    use serde_json::Value;
    let text = |value: &Value| match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let Ok(Value::Object(map)) = serde_json::to_value(file) else {
        return Vec::new();
    };
    map.into_iter()
        .filter_map(|(key, value)| {
            let values = match &value {
                Value::Null | Value::Bool(false) => return None,
                Value::Array(items) => items.iter().map(text).collect(),
                other => vec![text(other)],
            };
            Some((key, values))
        })
        .collect()
}

/// A value kept as the text its flag takes and checked on reading by the
/// flag's own parser `P`, so that a bad one is reported at its line.
#[derive(Debug, Serialize)]
#[serde(transparent)]
struct Checked<P> {
    text: String,
    #[serde(skip)]
    parser: PhantomData<P>,
}

/// The parser of a flag whose value is text with a form of its own.
trait FlagParser: Debug {
    fn check(text: &str) -> Result<(), String>;
}

impl<'de, P: FlagParser> Deserialize<'de> for Checked<P> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        P::check(&text).map_err(serde::de::Error::custom)?;
        Ok(Self {
            text,
            parser: PhantomData,
        })
    }
}

/// `10s`, `500ms`, `2m`.
#[derive(Debug)]
enum Duration {}

impl FlagParser for Duration {
    fn check(text: &str) -> Result<(), String> {
        args::parse_millis(text).map(drop)
    }
}

/// `20000-29999`.
#[derive(Debug)]
enum PortRange {}

impl FlagParser for PortRange {
    fn check(text: &str) -> Result<(), String> {
        args::parse_port_range(text).map(drop)
    }
}

/// `zone=a`.
#[derive(Debug)]
enum Label {}

impl FlagParser for Label {
    fn check(text: &str) -> Result<(), String> {
        args::parse_label(text).map(drop)
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, FromArgMatches};

    use super::*;
    use crate::args::{Cli, Command as CliCommand};

    /// Parses `list` as `main` does, with the file layered in.
    fn parse(list: &[&str]) -> anyhow::Result<Cli> {
        let args: Vec<OsString> = list.iter().map(OsString::from).collect();
        let matches = command(Cli::command(), &args)?.try_get_matches_from(&args)?;
        Ok(Cli::from_arg_matches(&matches)?)
    }

    fn file(text: &str) -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("skiff.toml");
        std::fs::write(&path, text).unwrap();
        let path = path.to_str().unwrap().to_string();
        (dir, path)
    }

    #[test]
    fn file_settings_reach_the_server_and_flags_win_over_them() {
        let (_dir, path) = file(
            "name = \"s1\"\ndata_dir = \"/var/lib/skiff\"\nbootstrap = true\n\
             raft_log = \"wal\"\nheartbeat_ttl = \"3s\"\nlog_format = \"json\"\n",
        );
        let cli = parse(&["skiff", "server", "--config", &path, "--name", "s2"]).unwrap();
        assert_eq!(cli.log_format, LogFormat::Json);
        let CliCommand::Server(server) = cli.command else {
            panic!("not a server command")
        };
        assert_eq!(server.name, "s2", "the flag wins over the file");
        assert_eq!(server.data_dir, PathBuf::from("/var/lib/skiff"));
        assert!(server.bootstrap);
        assert_eq!(server.raft_log, RaftLogArg::Wal);
        assert_eq!(server.heartbeat_ttl, 3000);
        assert_eq!(
            server.tick_ms, 100,
            "a key the file leaves out keeps its default"
        );
    }

    #[test]
    fn agent_lists_become_repeated_flags() {
        let (_dir, path) = file(
            "name = \"n1\"\ndata_dir = \"/d\"\nservers = [\"10.0.0.1:7070\", \"10.0.0.2:7070\"]\n\
             label = [\"zone=a\", \"disk=ssd\"]\nport_range = \"30000-30099\"\ndrain_secs = 2\n",
        );
        let cli = parse(&["skiff", "agent", "--config", &path]).unwrap();
        let CliCommand::Agent(agent) = cli.command else {
            panic!("not an agent command")
        };
        assert_eq!(agent.servers, ["10.0.0.1:7070", "10.0.0.2:7070"]);
        assert_eq!(
            agent.node.labels,
            [("zone".into(), "a".into()), ("disk".into(), "ssd".into())]
        );
        assert_eq!(agent.node.port_range, (30000, 30099));
        assert_eq!(agent.node.drain_secs, 2.0);
        assert_eq!(agent.node.advertise, None, "the agent picks it at start");
    }

    #[test]
    fn an_unknown_key_is_named_with_its_file_and_line_and_the_nearest_key() {
        let (_dir, path) = file("name = \"n1\"\n\ndatadir = \"/d\"\n");
        let err = parse(&["skiff", "agent", "--config", &path]).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "invalid config file {path}:3: unknown key `datadir`; did you mean `data_dir`?"
            )
        );
        // A flag's own spelling points to the key's.
        let (_dir, path) = file("stop-grace-secs = 3\n");
        let err = parse(&["skiff", "agent", "--config", &path]).unwrap_err();
        assert!(
            err.to_string().ends_with("did you mean `stop_grace_secs`?"),
            "{err}"
        );
        // Nothing close: every key is listed.
        let (_dir, path) = file("colour = \"blue\"\n");
        let err = parse(&["skiff", "server", "--config", &path]).unwrap_err();
        assert!(
            err.to_string()
                .contains(":1: unknown key `colour`; the keys are "),
            "{err}"
        );
        assert!(err.to_string().contains("data_dir"), "{err}");
    }

    #[test]
    fn a_wrong_value_is_named_with_its_line() {
        let (_dir, path) = file("name = \"s1\"\ntick_ms = \"fast\"\n");
        let err = parse(&["skiff", "server", "--config", &path]).unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with(&format!("invalid config file {path}:2: ")),
            "{text}"
        );
        assert!(text.contains("tick_ms = \"fast\""), "{text}");
        let (_dir, path) = file("heartbeat_ttl = \"10 years\"\n");
        let err = parse(&["skiff", "server", "--config", &path]).unwrap_err();
        assert!(err.to_string().contains(":1: "), "{err}");
        assert!(err.to_string().contains("duration"), "{err}");
    }

    #[test]
    fn a_missing_or_broken_file_is_named_in_the_error() {
        let err = parse(&["skiff", "agent", "--config", "/nonexistent.toml"]).unwrap_err();
        assert!(format!("{err:#}").contains("/nonexistent.toml"));
        let (_dir, path) = file("name = [\n");
        let err = parse(&["skiff", "agent", "--config", &path]).unwrap_err();
        assert!(err.to_string().starts_with("invalid config file"), "{err}");
    }

    /// The only test that sets SKIFF_ELECTION_TICKS: tests run in parallel
    /// threads of one process under `cargo test`.
    #[test]
    fn the_environment_sits_between_the_file_and_the_flags() {
        let election_ticks = |extra: &[&str], path: &str| {
            let mut args = vec!["skiff", "server", "--name", "s", "--data-dir", "/d"];
            args.extend_from_slice(&["--config", path]);
            args.extend_from_slice(extra);
            let CliCommand::Server(server) = parse(&args).unwrap().command else {
                panic!("not a server command")
            };
            server.election_ticks
        };
        let (_dir, path) = file("election_ticks = 20\n");
        std::env::remove_var("SKIFF_ELECTION_TICKS");
        assert_eq!(election_ticks(&[], &path), 20, "the file over the default");
        std::env::set_var("SKIFF_ELECTION_TICKS", "30");
        assert_eq!(
            election_ticks(&[], &path),
            30,
            "the environment over the file"
        );
        assert_eq!(
            election_ticks(&["--election-ticks", "40"], &path),
            40,
            "the flag over the environment"
        );
        std::env::remove_var("SKIFF_ELECTION_TICKS");
    }

    #[test]
    fn the_example_files_in_deploy_read_as_typed_settings() {
        let server: ServerFile = toml::from_str(include_str!("../../deploy/server.toml")).unwrap();
        assert_eq!(server.name.as_deref(), Some("s1"));
        let agent: AgentFile = toml::from_str(include_str!("../../deploy/agent.toml")).unwrap();
        assert_eq!(agent.advertise, Some("10.0.0.11".parse().unwrap()));
    }

    #[test]
    fn every_key_of_both_files_is_a_flag_of_its_command() {
        let command = Cli::command();
        for (subcommand, keys) in [
            ("server", keys::<ServerFile>()),
            ("agent", keys::<AgentFile>()),
        ] {
            let sub = command.find_subcommand(subcommand).unwrap();
            for key in keys {
                let long = key.replace('_', "-");
                assert!(
                    id_of(sub, &long).is_some() || id_of(&command, &long).is_some(),
                    "{subcommand}: {key}"
                );
            }
        }
    }

    #[test]
    fn the_config_of_another_command_or_a_value_is_left_alone() {
        let args = |list: &[&str]| list.iter().map(OsString::from).collect::<Vec<_>>();
        let command = Cli::command();
        assert_eq!(
            config_path(&command, &args(&["skiff", "service", "ls"])),
            None
        );
        assert_eq!(
            config_path(
                &command,
                &args(&["skiff", "--server", "agent", "node", "ls"])
            ),
            None,
            "`agent` is the value of --server here"
        );
        assert_eq!(
            config_path(
                &command,
                &args(&["skiff", "-o", "json", "agent", "--config=/a.toml"])
            ),
            Some(("agent".into(), PathBuf::from("/a.toml")))
        );
    }
}
