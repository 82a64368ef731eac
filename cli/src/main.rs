//! The `skiff` binary: parses the command line and calls the library crates.

// Every print of the CLI, in every module below, goes through `output`,
// which handles a failed write (a closed pipe, a full disk) instead of
// panicking as std's macros do. Defined before the modules to shadow std's.
macro_rules! print {
    ($($arg:tt)*) => { $crate::output::stdout(format_args!($($arg)*)) };
}
macro_rules! println {
    () => { $crate::output::stdout(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::output::stdout(format_args!("{}\n", format_args!($($arg)*))) };
}
macro_rules! eprintln {
    () => { $crate::output::stderr(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::output::stderr(format_args!("{}\n", format_args!($($arg)*))) };
}

mod args;
mod choices;
mod client;
mod commands;
mod config_file;
mod output;
mod terminal;

use clap::{CommandFactory, FromArgMatches};

/// musl's allocator serializes threads; the static binary uses mimalloc.
#[cfg(target_env = "musl")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use tracing_subscriber::EnvFilter;

use args::{Cli, Command, LogFormat};

/// What `skiff --version` prints after the name: the version and the commit
/// it was built from, the ones `skiff_build_info` reports (`skiff-metrics`'
/// build script reads the commit from git, or `SKIFF_COMMIT` outside a
/// checkout).
fn version() -> String {
    format!(
        "{} (commit {})",
        skiff_metrics::VERSION,
        skiff_metrics::COMMIT
    )
}

fn main() -> std::process::ExitCode {
    // The agent starts one shim per container: they skip building the whole
    // CLI (clap's tree of every command, ~350 KB of heap and the pages of
    // its code in each shim) and parse only their own flags.
    if std::env::args_os().nth(1).is_some_and(|a| a == "shim") {
        return shim(&parse_shim_args());
    }
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let command = match config_file::command(Cli::command().version(version()), &args) {
        Ok(command) => command,
        Err(err) => {
            eprintln!("error: {}", format!("{err:#}").replace('\n', " "));
            return std::process::ExitCode::FAILURE;
        }
    };
    let cli = command
        .try_get_matches_from(args)
        .and_then(|matches| Cli::from_arg_matches(&matches))
        .unwrap_or_else(|err| err.exit());
    if let Command::Shim(args) = &cli.command {
        return shim(args);
    }
    // Agents started by this process (`agent`, `dev`, benches) monitor each
    // container with this very binary run as `skiff shim`.
    skiff_agent::runtime::oci::shim::set_binary("/proc/self/exe".into());
    init_logging(&cli);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: failed to start the async runtime: {err}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) if err.downcast_ref::<commands::Exit>().is_some() => {
            std::process::ExitCode::from(err.downcast_ref::<commands::Exit>().map_or(1, |e| e.0))
        }
        Err(err) => {
            eprintln!("error: {}", format!("{err:#}").replace('\n', " "));
            std::process::ExitCode::FAILURE
        }
    }
}

async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    let client_command = !matches!(
        cli.command,
        Command::Server(_)
            | Command::Agent(_)
            | Command::Dev(_)
            | Command::Completion { .. }
            | Command::Man { .. }
            | Command::Shim(_)
    );
    let server = if client_command {
        client::resolve(
            cli.server.as_deref(),
            cli.token.as_deref(),
            cli.client_config.as_deref(),
            cli.ca_cert.as_deref(),
        )?
    } else {
        cli.server
            .unwrap_or_else(|| client::DEFAULT_ADDRESS.to_string())
    };
    let (server, output) = (server.as_str(), cli.output);
    match cli.command {
        Command::Server(mut args) => {
            args.join_token = join_token(cli.token);
            commands::daemon::server(args).await
        }
        Command::Agent(mut args) => {
            args.join_token = join_token(cli.token);
            commands::daemon::agent(args).await
        }
        Command::Dev(args) => commands::daemon::dev(args).await,
        Command::Service(command) => commands::service::run(server, output, command).await,
        Command::Job(command) => commands::job::run(server, output, command).await,
        Command::Stack(command) => commands::stack::run(server, output, command).await,
        Command::Node(command) => commands::node::run(server, output, command).await,
        Command::Volume(command) => commands::volume::run(server, output, command).await,
        Command::Secret(command) => commands::secret::run(server, output, command).await,
        Command::Events(args) => commands::events::run(server, output, args).await,
        Command::Cluster(command) => commands::cluster::run(server, output, command).await,
        Command::Var(command) => commands::var::run(server, output, command).await,
        Command::Token(command) => commands::token::run(server, output, command).await,
        Command::Bench(command) => commands::bench::run(command).await,
        Command::Completion { shell } => {
            commands::completion::run(shell);
            Ok(())
        }
        Command::Man { dir } => commands::man::run(&dir),
        Command::Shim(_) => unreachable!("the shim runs without the async runtime"),
    }
}

/// The join token of `skiff server --join` / `skiff agent`: `--token` when
/// it holds one (`SKIFF-1-...`), else `SKIFF_JOIN_TOKEN`, else whatever
/// `--token` / `SKIFF_TOKEN` holds (refused with a message if it is used).
fn join_token(token: Option<String>) -> Option<String> {
    let from_env = std::env::var("SKIFF_JOIN_TOKEN")
        .ok()
        .filter(|t| !t.trim().is_empty());
    match token {
        Some(t) if t.trim().starts_with("SKIFF-1-") => Some(t),
        other => from_env.or(other),
    }
}

fn parse_shim_args() -> args::ShimArgs {
    use clap::{Args, FromArgMatches};
    let command = args::ShimArgs::augment_args(clap::Command::new("shim").bin_name("skiff shim"));
    let matches = command.get_matches_from(std::env::args_os().skip(1));
    args::ShimArgs::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

/// `skiff shim`: no logging, no async runtime, just the container's monitor.
fn shim(args: &args::ShimArgs) -> std::process::ExitCode {
    let config = skiff_agent::runtime::oci::shim::ShimConfig {
        runtime: args.runtime.clone(),
        root: args.root.clone(),
        bundle: args.bundle.clone(),
        stdout: args.stdout.clone(),
        stderr: args.stderr.clone(),
        id: args.id.clone(),
    };
    let code = skiff_agent::runtime::oci::shim::run(&config);
    std::process::ExitCode::from(u8::try_from(code).unwrap_or(1))
}

/// Daemons log at info by default; client commands only warn, so their
/// output stays the result.
fn init_logging(cli: &Cli) {
    let daemon = matches!(
        cli.command,
        Command::Server(_) | Command::Agent(_) | Command::Dev(_)
    );
    let default = if daemon { "info" } else { "warn" };
    let filter = match &cli.log_level {
        Some(level) => EnvFilter::try_new(level),
        None => EnvFilter::try_from_default_env().or_else(|_| EnvFilter::try_new(default)),
    }
    .unwrap_or_else(|_| EnvFilter::new(default));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
