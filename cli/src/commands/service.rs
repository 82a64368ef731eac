//! `skiff service ...`

use std::collections::HashMap;

use anyhow::{anyhow, Context};
use skiff_proto::v1 as pb;
use skiff_spec as spec;

use crate::args::{CreateArgs, OutputFormat, ServiceCommand};
use crate::client::{connect, explain};
use crate::output;

pub async fn run(
    server: &str,
    format: OutputFormat,
    command: ServiceCommand,
) -> anyhow::Result<()> {
    // Validate before connecting: bad input is reported even with no server.
    let replicas = match &command {
        ServiceCommand::Create(args) => Some(replicas(args.replicas)?),
        ServiceCommand::Scale { replicas: n, .. } => Some(replicas(*n)?),
        _ => None,
    };
    let create_spec = match &command {
        ServiceCommand::Create(args) => Some(build_spec(args, replicas.unwrap_or(1))?),
        _ => None,
    };
    let command = match command {
        ServiceCommand::Exec(args) => {
            let code = super::exec::exec(server, args).await?;
            // The command's code is the CLI's (a shell's 0..=255; an
            // unknown one, -1, is 255).
            std::process::exit(if (0..=255).contains(&code) { code } else { 255 });
        }
        command => command,
    };
    let mut client = connect(server).await?;
    match command {
        ServiceCommand::Create(_) => {
            let spec = create_spec.expect("built above");
            let (name, count) = (spec.name.clone(), spec.replicas);
            let global = spec.mode == "global";
            client
                .create_service(pb::CreateServiceRequest { spec: Some(spec) })
                .await
                .map_err(explain)?;
            if global {
                println!("service {name} created: one replica on every eligible node");
            } else {
                println!("service {name} created with {count} replicas");
            }
            let detach = matches!(&command, ServiceCommand::Create(args) if args.detach);
            if !detach {
                super::progress::wait_until_serving(
                    &mut client,
                    format,
                    std::slice::from_ref(&name),
                )
                .await?;
                if let Some(problem) = super::progress::published_port_problem(
                    &mut client,
                    &name,
                    std::time::Duration::ZERO,
                )
                .await?
                {
                    anyhow::bail!("service {name}: {problem}");
                }
                println!("service {name}: every replica serves");
            } else {
                // Detached: still say at once when no node can hold it, with
                // the scheduler's numbers (the service stays, waiting), or
                // when a node cannot listen on the published port.
                let status = get(&mut client, &name).await?;
                let reason = &status.unplaced_reason;
                if reason.contains("unplaced") {
                    eprintln!("warning: service {name}: {reason}");
                }
                if let Some(problem) = super::progress::published_port_problem(
                    &mut client,
                    &name,
                    super::progress::PORT_SETTLE,
                )
                .await?
                {
                    eprintln!("warning: service {name}: {problem}");
                }
            }
        }
        ServiceCommand::Ls => {
            let services = client
                .list_services(pb::ListServicesRequest { show_values: false })
                .await
                .map_err(explain)?
                .into_inner()
                .services;
            // Jobs have their own list (`skiff job ls`): a finished job
            // would only read as a service with 0/0 replicas here.
            let services: Vec<pb::ServiceStatus> = services
                .into_iter()
                .filter(|s| s.spec.as_ref().is_none_or(|spec| spec.mode != "job"))
                .collect();
            output::print(format, &services, &LS_HEADERS, ls_rows(&services));
        }
        ServiceCommand::Ps { name, all, watch } => {
            if watch {
                return watch_ps(&mut client, format, &name, all).await;
            }
            ps(&mut client, format, &name, all).await?;
        }
        ServiceCommand::Export { name } => {
            super::stack::export_service(&mut client, &name).await?;
        }
        ServiceCommand::Apply {
            files,
            vars,
            strict,
            detach,
        } => {
            super::stack::apply(&mut client, format, files, vars, strict, detach).await?;
        }
        ServiceCommand::Inspect { name, show_values } => {
            let status = get_shown(&mut client, &name, show_values).await?;
            match format {
                OutputFormat::Json | OutputFormat::Yaml => {
                    output::print(format, &status, &[], vec![])
                }
                OutputFormat::Table => print!("{}", describe(&status)),
            }
        }
        ServiceCommand::Scale { name, .. } => {
            let replicas = replicas.expect("validated above");
            client
                .scale_service(pb::ScaleServiceRequest {
                    name: name.clone(),
                    replicas,
                })
                .await
                .map_err(explain)?;
            println!("service {name} scaled to {replicas} replicas");
        }
        ServiceCommand::Rm { name } => {
            client
                .remove_service(pb::RemoveServiceRequest { name: name.clone() })
                .await
                .map_err(explain)?;
            println!("service {name} removed; its replicas are stopping");
        }
        ServiceCommand::Update(args) => super::deploy::update(&mut client, format, *args).await?,
        ServiceCommand::History { name, show_values } => {
            super::deploy::history(&mut client, format, &name, show_values).await?
        }
        ServiceCommand::Rollback { name, to, detach } => {
            super::deploy::rollback(&mut client, format, &name, to, detach).await?
        }
        ServiceCommand::Promote { name, detach } => {
            super::deploy::promote(&mut client, format, &name, detach).await?
        }
        ServiceCommand::Rebalance { name } => rebalance(&mut client, &name).await?,
        ServiceCommand::Pause { name } => super::deploy::pause(&mut client, &name, true).await?,
        ServiceCommand::Resume { name } => super::deploy::pause(&mut client, &name, false).await?,
        ServiceCommand::Exec(_) => unreachable!("run above"),
        ServiceCommand::Logs {
            name,
            follow,
            replica,
            tail,
            since,
            timestamps,
        } => {
            let status = get(&mut client, &name).await?;
            let (since_ms, max_age_ms) = match since {
                None => (0, 0),
                Some(crate::args::LogSince::At(ms)) => (ms, 0),
                Some(crate::args::LogSince::AgeMs(ms)) => (0, ms),
            };
            let options = LogOptions {
                follow,
                tail: tail.unwrap_or(0),
                since_ms,
                max_age_ms,
                timestamps,
            };
            logs(server, &status, replica.as_deref(), options).await?;
        }
    }
    Ok(())
}

/// `service ps`: the replicas of `name` (the running ones, or `all`).
pub(crate) async fn ps(
    client: &mut crate::client::Client,
    format: OutputFormat,
    name: &str,
    all: bool,
) -> anyhow::Result<()> {
    let status = get_shown(client, name, false).await?;
    let allocs: Vec<&pb::Allocation> = status
        .allocations
        .iter()
        .filter(|a| all || a.desired == "run")
        .collect();
    let nodes = match format {
        OutputFormat::Table => {
            client
                .list_nodes(pb::ListNodesRequest {})
                .await
                .map_err(explain)?
                .into_inner()
                .nodes
        }
        OutputFormat::Json | OutputFormat::Yaml => vec![],
    };
    output::print(format, &allocs, &PS_HEADERS, ps_rows(&allocs, &nodes));
    if format == OutputFormat::Table && !status.unplaced_reason.is_empty() {
        println!("\n{}", status.unplaced_reason);
    }
    if format == OutputFormat::Table {
        for failure in &status.port_failures {
            println!(
                "\nnode {} does not serve published port {}: {}",
                failure.node, failure.port, failure.error
            );
        }
    }
    Ok(())
}

/// `service ps --watch`: `ps` redrawn every [`WATCH_INTERVAL`], like
/// watch(1), until Ctrl-C or until the service is removed.
async fn watch_ps(
    client: &mut crate::client::Client,
    format: OutputFormat,
    name: &str,
    all: bool,
) -> anyhow::Result<()> {
    let redraw = async {
        let mut ticks = tokio::time::interval(WATCH_INTERVAL);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let request = pb::GetServiceRequest {
                name: name.to_string(),
                show_values: false,
            };
            match client.get_service(request).await {
                Err(status) if status.code() == tonic::Code::NotFound => {
                    println!("service {name} removed");
                    return Ok(());
                }
                Err(status) => return Err(explain(status)),
                Ok(_) => {}
            }
            output::redraw_begin(&format!(
                "Every {}s: skiff service ps {name}",
                WATCH_INTERVAL.as_secs()
            ));
            ps(client, format, name, all).await?;
        }
    };
    tokio::select! {
        ended = redraw => ended,
        _ = tokio::signal::ctrl_c() => Ok(()),
    }
}

/// How often `service ps --watch` redraws: fresh enough to follow a
/// rollout, and one request a second to the server.
const WATCH_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// `skiff service rebalance NAME`: asks the control plane to spread the
/// service again; the moves show in `skiff events`.
async fn rebalance(client: &mut crate::client::Client, name: &str) -> anyhow::Result<()> {
    client
        .rebalance_service(pb::RebalanceServiceRequest {
            name: name.to_string(),
        })
        .await
        .map_err(explain)?;
    println!(
        "service {name} rebalancing: one replica at a time, the new one first; follow with `skiff events --follow --service {name}`"
    );
    Ok(())
}

/// What `service logs` asks of each replica's log.
pub(crate) struct LogOptions {
    pub follow: bool,
    pub tail: u32,
    pub since_ms: u64,
    pub max_age_ms: u64,
    pub timestamps: bool,
}

/// `service logs`: asks the server for the output of each replica, which
/// it relays from the replica's agent (the CLI reaches only the server),
/// and prints the streams as they arrive.
pub(crate) async fn logs(
    server: &str,
    status: &pb::ServiceStatus,
    replica: Option<&str>,
    options: LogOptions,
) -> anyhow::Result<()> {
    use std::io::Write;

    let name = status.spec.as_ref().map_or("", |s| s.name.as_str());
    let mut chosen: Vec<&pb::Allocation> = status
        .allocations
        .iter()
        .filter(|a| match replica {
            Some(id) => a.id.starts_with(id),
            // A job's ended attempts too: their output is the point.
            None => a.desired == "run" || a.state == "completed" || a.state == "exited",
        })
        .collect();
    chosen.sort_by(|a, b| a.id.cmp(&b.id));
    if chosen.is_empty() {
        return Err(match replica {
            Some(id) => anyhow!("service {name} has no replica {id}"),
            None => anyhow!("service {name} has no replicas to show logs of"),
        });
    }
    // Followed logs run until interrupted: no request timeout.
    let channel = crate::client::channel(server, None).await?;
    let prefix = chosen.len() > 1;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(String, pb::LogChunk)>(64);
    let mut tasks = Vec::new();
    for alloc in chosen {
        let request = pb::ServiceLogsRequest {
            service: name.to_string(),
            replica: alloc.id.clone(),
            follow: options.follow,
            tail: options.tail,
            since_ms: options.since_ms,
            max_age_ms: options.max_age_ms,
            timestamps: options.timestamps,
        };
        let mut stream = crate::client::client(channel.clone())
            .service_logs(request)
            .await
            .map_err(|e| {
                anyhow!(
                    "failed to read the logs of replica {} on node {}: {}",
                    alloc.id,
                    alloc.node,
                    e.message()
                )
            })?
            .into_inner();
        let (tx, id) = (tx.clone(), alloc.id.clone());
        tasks.push(tokio::spawn(async move {
            while let Some(chunk) = stream.message().await? {
                if tx.send((id.clone(), chunk)).await.is_err() {
                    break;
                }
            }
            Ok::<_, tonic::Status>(())
        }));
    }
    drop(tx);
    while let Some((id, chunk)) = rx.recv().await {
        let text = String::from_utf8_lossy(&chunk.data);
        let mut out: Box<dyn Write> = if chunk.stream == "stderr" {
            Box::new(std::io::stderr().lock())
        } else {
            Box::new(std::io::stdout().lock())
        };
        let written = if prefix {
            text.split_inclusive('\n')
                .try_for_each(|line| write!(out, "{id} | {line}"))
        } else {
            out.write_all(text.as_bytes())
        };
        if let Err(err) = written.and_then(|()| out.flush()) {
            output::write_failed(&err);
        }
    }
    for task in tasks {
        if let Ok(Err(e)) = task.await {
            return Err(anyhow!("log stream interrupted: {}", e.message()));
        }
    }
    Ok(())
}

fn replicas(value: i64) -> anyhow::Result<u32> {
    spec::validate_replicas(value).map_err(|e| anyhow!("{e}"))
}

pub(crate) fn build_spec(args: &CreateArgs, replicas: u32) -> anyhow::Result<pb::ServiceSpec> {
    let invalid = |e: spec::SpecError| anyhow!("{e}");
    spec::validate_name(&args.name).map_err(invalid)?;
    let runtime = match args.runtime {
        Some(runtime) => runtime.into(),
        None => spec::RuntimeKind::resolve("", args.image.is_some()).map_err(invalid)?,
    };
    if runtime == spec::RuntimeKind::Process && args.command.is_empty() {
        return Err(anyhow!(
            "invalid command: the command is empty; give it after `--`, e.g. `skiff service create {} -- python3 -m http.server '$PORT'`, or run an image with --image REF",
            args.name
        ));
    }
    let port = match args.port {
        Some(p) if !(1..=65535).contains(&p) => {
            return Err(anyhow!(
                "invalid port: {p} is out of range; use a container port from 1 to 65535"
            ))
        }
        p => p,
    };
    let (publish, port) = match (args.publish, port) {
        (None, port) => (None, port),
        (Some((published, None)), port) => (Some(published), port),
        (Some((_, Some(_))), _) if runtime == spec::RuntimeKind::Process => {
            return Err(anyhow!(
                "invalid publish: process replicas listen on $PORT, so there is no container port; use --publish PUBLISHED"
            ))
        }
        (Some((published, Some(container))), None) => (Some(published), Some(u32::from(container))),
        (Some((published, Some(container))), Some(p)) if p == u32::from(container) => {
            (Some(published), Some(p))
        }
        (Some((_, Some(container))), Some(p)) => {
            return Err(anyhow!(
                "invalid publish: its container port {container} differs from --port {p}; give the container port once"
            ))
        }
    };
    let protocol = args.protocol.map(spec::Protocol::from).unwrap_or_default();
    if args.cpu == Some(0) {
        return Err(anyhow!(
            "invalid cpu: 0 millicores would never run; use a value above 0 (1000 = one CPU)"
        ));
    }
    if let Some(mb) = args.memory {
        if mb < spec::MIN_MEMORY_MB {
            return Err(anyhow!(
                "invalid memory: {mb} MB is too small; use at least {} MB",
                spec::MIN_MEMORY_MB
            ));
        }
    }
    let health = health(args);
    let timings = args.health_interval.is_some()
        || args.health_timeout.is_some()
        || args.health_retries.is_some()
        || args.health_start_period.is_some();
    if health.is_none() && timings {
        return Err(anyhow!(
            "invalid health: timings need a check; add --health-http PATH, --health-tcp or --health-cmd CMD"
        ));
    }
    let domain = spec::ServiceSpec {
        name: args.name.clone(),
        runtime,
        replicas,
        command: args.command.clone(),
        image: args.image.clone(),
        port: port.map(|p| p as u16),
        memory_mb: args.memory,
        cpu_millis: args.cpu,
        user: args.user.clone(),
        network: args
            .network
            .map(spec::NetworkMode::from)
            .unwrap_or_default(),
        init: init(args),
        constraints: args
            .constraints
            .iter()
            .map(|c| spec::Constraint::parse(c))
            .collect::<Result<_, _>>()
            .map_err(invalid)?,
        max_per_node: args.max_per_node,
        placement: args.placement.map(Into::into).unwrap_or_default(),
        mode: args.mode.map(Into::into).unwrap_or_default(),
        publish,
        protocol,
        ..spec::ServiceSpec::default()
    };
    if runtime == spec::RuntimeKind::Process && args.network.is_some() {
        return Err(anyhow!(
            "invalid network: --network applies to containers only; use --runtime oci with --image REF, or drop --network"
        ));
    }
    domain.validate().map_err(invalid)?;
    let mut env = HashMap::new();
    for pair in &args.env {
        let (key, value) = pair
            .split_once('=')
            .with_context(|| format!("invalid --env \"{pair}\": use KEY=VALUE"))?;
        spec::validate_env(key, value).map_err(|e| anyhow!("{e}"))?;
        env.insert(key.to_string(), value.to_string());
    }
    let spec = pb::ServiceSpec {
        name: args.name.clone(),
        runtime: runtime.as_str().to_string(),
        replicas,
        command: args.command.clone(),
        env,
        workdir: args.workdir.clone().unwrap_or_default(),
        image: args.image.clone().unwrap_or_default(),
        port: port.unwrap_or(0),
        memory_mb: args.memory.unwrap_or(0),
        cpu_millis: args.cpu.unwrap_or(0),
        user: args.user.clone().unwrap_or_default(),
        network: args
            .network
            .map(|n| n.as_str().to_string())
            .unwrap_or_default(),
        health,
        init: init(args),
        constraints: domain.constraints.iter().map(|c| c.to_string()).collect(),
        max_per_node: args.max_per_node.unwrap_or(0),
        placement: domain.placement.as_str().to_string(),
        mode: domain.mode.as_str().to_string(),
        publish: publish.map_or(0, u32::from),
        protocol: protocol.as_str().to_string(),
        update: Some(super::deploy::policy_from_args(None, &args.update)),
        autoscale: super::deploy::autoscale_from_args(None, &args.autoscale)?,
        entrypoint: args.entrypoint.as_ref().map(|e| pb::Argv {
            args: if e.is_empty() {
                vec![]
            } else {
                vec![e.clone()]
            },
        }),
        labels: labels(&args.labels)?,
        seccomp: match &args.security_opt {
            Some(option) => seccomp_option(option)?.unwrap_or_default(),
            None => String::new(),
        },
        ..pb::ServiceSpec::default()
    };
    let mut spec = spec;
    super::volume::apply_args(&mut spec, &args.volumes, &[])?;
    super::secret::apply_args(&mut spec, &args.secrets, &[])?;
    // Every field through the one validation the server runs too.
    spec::pb::spec_from_pb(spec.clone()).map_err(invalid)?;
    Ok(spec)
}

/// `--security-opt seccomp=...` as the spec holds it: `None` for the
/// default profile, `"unconfined"`, or the profile file's JSON.
pub(crate) fn seccomp_option(option: &str) -> anyhow::Result<Option<String>> {
    let value = option
        .strip_prefix("seccomp=")
        .or_else(|| option.strip_prefix("seccomp:"))
        .with_context(|| {
            format!("invalid --security-opt \"{option}\": use seccomp=unconfined, seccomp=default or seccomp=FILE")
        })?;
    match value {
        "default" => Ok(None),
        spec::SECCOMP_UNCONFINED => Ok(Some(value.to_string())),
        file => std::fs::read_to_string(file).map(Some).with_context(|| {
            format!("invalid --security-opt: cannot read the seccomp profile {file}")
        }),
    }
}

fn labels(pairs: &[String]) -> anyhow::Result<HashMap<String, String>> {
    pairs
        .iter()
        .map(|pair| {
            pair.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .with_context(|| format!("invalid --label \"{pair}\": use KEY=VALUE"))
        })
        .collect()
}

fn init(args: &CreateArgs) -> Option<bool> {
    match (args.init, args.no_init) {
        (true, _) => Some(true),
        (_, true) => Some(false),
        _ => None,
    }
}

/// The check the flags describe, if any.
fn health(args: &CreateArgs) -> Option<pb::HealthCheck> {
    let (kind, http_path, command) = if let Some(path) = &args.health_http {
        ("http", path.clone(), vec![])
    } else if args.health_tcp {
        ("tcp", String::new(), vec![])
    } else if let Some(cmd) = &args.health_cmd {
        (
            "exec",
            String::new(),
            vec!["/bin/sh".into(), "-c".into(), cmd.clone()],
        )
    } else {
        return None;
    };
    Some(pb::HealthCheck {
        kind: kind.into(),
        http_path,
        command,
        interval_ms: args.health_interval.unwrap_or(0),
        timeout_ms: args.health_timeout.unwrap_or(0),
        retries: args.health_retries.unwrap_or(0),
        start_period_ms: args.health_start_period.unwrap_or(0),
    })
}

/// A service, its environment values as short hashes: what `update`
/// starts from (the server keeps the value of every hash sent back
/// unchanged, so updating needs no admin token) and what progress reads.
pub(crate) async fn get(
    client: &mut crate::client::Client,
    name: &str,
) -> anyhow::Result<pb::ServiceStatus> {
    get_shown(client, name, false).await
}

/// A service with its environment values (what `export` prints; takes an
/// admin token).
pub(crate) async fn get_with_values(
    client: &mut crate::client::Client,
    name: &str,
) -> anyhow::Result<pb::ServiceStatus> {
    get_shown(client, name, true).await
}

/// A service; its environment values only with `show_values`, else each
/// one's short hash (what `inspect` and `history` print by default).
pub(crate) async fn get_shown(
    client: &mut crate::client::Client,
    name: &str,
    show_values: bool,
) -> anyhow::Result<pb::ServiceStatus> {
    Ok(client
        .get_service(pb::GetServiceRequest {
            name: name.to_string(),
            show_values,
        })
        .await
        .map_err(explain)?
        .into_inner())
}

const LS_HEADERS: [&str; 5] = ["NAME", "RUNNING", "RUNTIME", "IMAGE/COMMAND", "PORTS"];

/// `service ls`: one row per service.
fn ls_rows(services: &[pb::ServiceStatus]) -> Vec<Vec<String>> {
    services
        .iter()
        .map(|s| {
            let spec = s.spec.clone().unwrap_or_default();
            vec![
                spec.name.clone(),
                format!("{}/{}", s.running, s.desired),
                spec.runtime.clone(),
                what_runs(&spec),
                ports(&spec),
            ]
        })
        .collect()
}

const PS_HEADERS: [&str; 11] = [
    "ID",
    "SLOT",
    "NODE",
    "ADDRESS",
    "VERSION",
    "IMAGE/COMMAND",
    "STATE",
    "DESIRED",
    "RESTARTS",
    "PID",
    "MESSAGE",
];

/// `service ps`: one row per replica; SLOT is its ordinal in the service
/// (kept across replacements and updates: slot i owns the per-replica
/// volumes NAME-i), ADDRESS is where it answers (its node's address and
/// its host port), VERSION and IMAGE/COMMAND tell the versions apart
/// during a deployment.
fn ps_rows(allocs: &[&pb::Allocation], nodes: &[pb::Node]) -> Vec<Vec<String>> {
    allocs
        .iter()
        .map(|a| {
            let address = nodes
                .iter()
                .find(|n| n.name == a.node && !n.address.is_empty())
                .map(|n| n.address.as_str());
            vec![
                a.id.clone(),
                a.slot.to_string(),
                a.node.clone(),
                match (address, a.host_port) {
                    (None, _) => "-".into(),
                    (Some(ip), 0) => ip.to_string(),
                    (Some(ip), port) => format!("{ip}:{port}"),
                },
                a.version.to_string(),
                a.spec.as_ref().map_or("-".into(), what_runs),
                a.state.clone(),
                a.desired.clone(),
                a.restarts.to_string(),
                if a.pid == 0 {
                    "-".into()
                } else {
                    a.pid.to_string()
                },
                a.message.clone(),
            ]
        })
        .collect()
}

/// The image of a container, the command of a process.
fn what_runs(spec: &pb::ServiceSpec) -> String {
    if !spec.image.is_empty() {
        spec.image.clone()
    } else if !spec.command.is_empty() {
        spec.command.join(" ")
    } else {
        "-".into()
    }
}

/// Like `docker ps`: `8080->80/http` (published -> container port),
/// `8080/tcp` (published, to `$PORT` or the image's port), `80/tcp`
/// (not published), `-`.
fn ports(spec: &pb::ServiceSpec) -> String {
    let protocol = if spec.protocol.is_empty() {
        "tcp"
    } else {
        spec.protocol.as_str()
    };
    match (spec.publish, spec.port) {
        (0, 0) => "-".into(),
        (0, port) => format!("{port}/{protocol}"),
        (published, 0) => format!("{published}/{protocol}"),
        (published, port) => format!("{published}->{port}/{protocol}"),
    }
}

/// `inspect`'s Ports: the container port, and the published one.
fn port_line(spec: &pb::ServiceSpec, failures: &[pb::PortFailure]) -> String {
    let container = match (spec.port, spec.runtime.as_str()) {
        (0, "process") => "$PORT (the host port)".to_string(),
        (0, _) => "the image's first exposed port".to_string(),
        (port, _) => format!("container {port}"),
    };
    let protocol = if spec.protocol.is_empty() {
        "tcp"
    } else {
        spec.protocol.as_str()
    };
    match spec.publish {
        0 => format!("{container}; not published"),
        published if failures.is_empty() => {
            format!("{container}; published {published} ({protocol}) on every node")
        }
        published => {
            let failing: Vec<String> = failures
                .iter()
                .map(|f| format!("{} ({})", f.node, f.error))
                .collect();
            format!(
                "{container}; published {published} ({protocol}) on every node except {}",
                failing.join(", ")
            )
        }
    }
}

/// `inspect`'s Health: the check with its timings (defaults filled in).
fn health_line(spec: &pb::ServiceSpec) -> String {
    let or = |value: u32, default: u32| if value == 0 { default } else { value };
    let Some(h) = spec.health.as_ref().filter(|h| !h.kind.is_empty()) else {
        return if spec.image.is_empty() {
            "none (running counts as healthy)".into()
        } else {
            "none given (the image's HEALTHCHECK, if any)".into()
        };
    };
    let check = match h.kind.as_str() {
        "http" => format!("http GET {}", h.http_path),
        "tcp" => "tcp connect".to_string(),
        "exec" => format!("exec {}", h.command.join(" ")),
        other => other.to_string(),
    };
    format!(
        "{check} every {}, timeout {}, {} retries, start period {}",
        human_ms(or(h.interval_ms, 10_000)),
        human_ms(or(h.timeout_ms, 5_000)),
        or(h.retries, 3),
        human_ms(h.start_period_ms),
    )
}

/// `inspect`'s Update: the strategy and every setting that applies to it.
fn update_line(policy: Option<pb::UpdatePolicy>) -> String {
    let p = match spec::pb::update_from_pb(policy.unwrap_or_default()) {
        Ok(p) => p,
        Err(e) => return format!("invalid ({e})"),
    };
    let mut parts = vec![format!(
        "{}: {} at a time, max surge {}, max unavailable {}, healthy for {}, healthy deadline {}, progress deadline {}",
        p.strategy.as_str(),
        p.max_parallel,
        p.max_surge,
        p.max_unavailable,
        human_ms(p.min_healthy_ms),
        human_ms(p.healthy_deadline_ms),
        human_ms(p.progress_deadline_ms),
    )];
    if p.strategy == spec::Strategy::Canary {
        parts.push(format!("{} canaries", p.canary));
        parts.push(match p.canary_weight {
            Some(w) => format!("{w}% of requests to canaries"),
            None => "requests by replica count".into(),
        });
        parts.push(match p.max_error_rate {
            Some(r) => format!("fails above {r}% errors"),
            None => "not gated on errors".into(),
        });
    }
    if p.strategy != spec::Strategy::Rolling {
        parts.push(
            if p.auto_promote {
                "auto-promote"
            } else {
                "promote by hand"
            }
            .into(),
        );
    }
    parts.push(
        if p.auto_rollback {
            "auto-rollback"
        } else {
            "no auto-rollback"
        }
        .into(),
    );
    parts.join(", ")
}

/// `inspect`'s Autoscale: bounds and targets, or off.
fn autoscale_line(autoscale: Option<&pb::Autoscale>) -> String {
    let Some(a) = autoscale else {
        return "off".into();
    };
    let mut targets = Vec::new();
    if a.target_rps > 0.0 {
        targets.push(format!("{} req/s", a.target_rps));
    }
    if a.target_concurrency > 0.0 {
        targets.push(format!("{} connections", a.target_concurrency));
    }
    if a.target_cpu > 0.0 {
        targets.push(format!("{}% CPU", a.target_cpu));
    }
    format!(
        "{}..{} replicas, per replica {}",
        a.min,
        a.max,
        targets.join(", ")
    )
}

/// `500ms`, `5s`, `1m30s`, `10m`.
fn human_ms(ms: u32) -> String {
    match ms {
        0 => "0s".into(),
        ms if ms % 1000 != 0 => format!("{ms}ms"),
        ms if ms < 60_000 => format!("{}s", ms / 1000),
        ms if ms % 60_000 == 0 => format!("{}m", ms / 60_000),
        ms => format!("{}m{}s", ms / 60_000, ms % 60_000 / 1000),
    }
}

/// Mode, policy, constraints and max-per-node on one line.
fn placement(spec: &pb::ServiceSpec) -> String {
    let or = |value: &str, default: &str| {
        if value.is_empty() {
            default.to_string()
        } else {
            value.to_string()
        }
    };
    let mut parts = vec![or(&spec.mode, "replicated"), or(&spec.placement, "spread")];
    parts.extend(spec.constraints.iter().cloned());
    if spec.max_per_node > 0 {
        parts.push(format!("max {} per node", spec.max_per_node));
    }
    parts.join(", ")
}

/// The human-readable `inspect`: the spec, then the replicas.
fn describe(status: &pb::ServiceStatus) -> String {
    let spec = status.spec.clone().unwrap_or_default();
    let mut env: Vec<String> = spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    env.sort();
    let mut out = format!(
        "Name:        {}\nRuntime:     {}\n",
        spec.name, spec.runtime
    );
    if !spec.image.is_empty() {
        out.push_str(&format!("Image:       {}\n", spec.image));
    }
    out.push_str(&format!(
        "Ports:       {}\nHealth:      {}\nUpdate:      {}\nAutoscale:   {}\n",
        port_line(&spec, &status.port_failures),
        health_line(&spec),
        update_line(spec.update.clone()),
        autoscale_line(spec.autoscale.as_ref()),
    ));
    out.push_str(&format!(
        "Replicas:    {} desired, {} running\nPlacement:   {}\nCommand:     {}\nEnv:         {}\nWorkdir:     {}\nGeneration:  {} (modify index {})\n",
        status.desired,
        status.running,
        placement(&spec),
        if spec.command.is_empty() { "-".into() } else { spec.command.join(" ") },
        if env.is_empty() { "-".into() } else { env.join(" ") },
        if spec.workdir.is_empty() { "-" } else { &spec.workdir },
        status.generation,
        status.modify_index,
    ));
    if !spec.secrets.is_empty() {
        // Names, files and versions; the values are never in a spec.
        let secrets: Vec<String> = spec
            .secrets
            .iter()
            .map(|s| {
                let file = if s.target.is_empty() {
                    &s.name
                } else {
                    &s.target
                };
                let version = if s.version == 0 {
                    "latest".to_string()
                } else {
                    format!("v{}", s.version)
                };
                format!("{} ({}) -> {}/{file}", s.name, version, spec::SECRETS_DIR)
            })
            .collect();
        out.push_str(&format!("Secrets:     {}\n", secrets.join(", ")));
    }
    if !status.unplaced_reason.is_empty() {
        out.push_str(&format!("Unplaced:    {}\n", status.unplaced_reason));
    }
    out.push_str(&format!("Version:     {}\n", status.version));
    if let Some(d) = &status.deployment {
        out.push_str(&format!(
            "Deployment:  version {} ({}, from version {}): {}; new healthy {}/{}, old running {}{}\n",
            d.version,
            d.strategy,
            d.from_version,
            d.status,
            d.new_healthy,
            d.desired,
            d.old_running,
            if d.message.is_empty() {
                String::new()
            } else {
                format!(" — {}", d.message)
            }
        ));
    }
    if !status.traffic.is_empty() {
        out.push_str("\nTraffic (routing proxy, per node):\n");
        let rows: Vec<Vec<String>> = status
            .traffic
            .iter()
            .map(|t| {
                vec![
                    t.node.clone(),
                    t.connections.to_string(),
                    t.active.to_string(),
                    t.requests.to_string(),
                    format!("{:.1}", t.request_rate),
                    t.bytes_in.to_string(),
                    t.bytes_out.to_string(),
                    t.connect_failures.to_string(),
                    t.no_endpoint.to_string(),
                ]
            })
            .collect();
        out.push_str(&output::table(
            &[
                "NODE",
                "CONNS",
                "ACTIVE",
                "REQUESTS",
                "REQ/S",
                "BYTES IN",
                "BYTES OUT",
                "DIAL FAILS",
                "NO ENDPOINT",
            ],
            &rows,
        ));
    }
    if !status.events.is_empty() {
        out.push_str("\nRecent events:\n");
        let rows: Vec<Vec<String>> = status
            .events
            .iter()
            .map(|e| {
                vec![
                    super::events::time(e.time_ms),
                    e.kind.clone(),
                    e.alloc.clone(),
                    e.message.clone(),
                ]
            })
            .collect();
        out.push_str(&output::table(
            &["TIME", "EVENT", "REPLICA", "MESSAGE"],
            &rows,
        ));
    }
    out.push_str("\nReplicas:\n");
    let rows: Vec<Vec<String>> = status
        .allocations
        .iter()
        .map(|a| {
            let usage = status.usage.iter().find(|u| u.alloc_id == a.id);
            vec![
                a.id.clone(),
                a.node.clone(),
                a.state.clone(),
                a.desired.clone(),
                a.host_port.to_string(),
                a.restarts.to_string(),
                usage.map_or("-".into(), |u| format!("{:.1}%", u.cpu_percent)),
                usage
                    .filter(|u| u.memory_bytes > 0)
                    .map_or("-".into(), |u| {
                        format!("{} MiB", u.memory_bytes / (1024 * 1024))
                    }),
            ]
        })
        .collect();
    out.push_str(&output::table(
        &[
            "ID", "NODE", "STATE", "DESIRED", "PORT", "RESTARTS", "CPU", "MEMORY",
        ],
        &rows,
    ));
    out
}

#[cfg(test)]
mod tests {
    use skiff_proto::v1 as pb;

    fn web(image: &str) -> pb::ServiceSpec {
        pb::ServiceSpec {
            name: "web".into(),
            runtime: "oci".into(),
            image: image.into(),
            port: 80,
            publish: 8080,
            protocol: "http".into(),
            ..Default::default()
        }
    }

    fn alloc(id: &str, version: u64, image: &str, port: u32) -> pb::Allocation {
        pb::Allocation {
            id: id.into(),
            service: "web".into(),
            node: "n2".into(),
            desired: "run".into(),
            state: "healthy".into(),
            host_port: port,
            restarts: 0,
            pid: 4242,
            spec: Some(web(image)),
            version,
            ..Default::default()
        }
    }

    #[test]
    fn ps_tells_blue_from_green_by_version_and_image_and_says_where_each_answers() {
        let (blue, green) = (
            alloc("aaaa", 3, "reg:5000/web:v3", 20001),
            alloc("bbbb", 4, "reg:5000/web:v4", 20002),
        );
        let nodes = vec![pb::Node {
            name: "n2".into(),
            address: "10.0.0.2".into(),
            ..Default::default()
        }];
        let rows = super::ps_rows(&[&blue, &green], &nodes);
        let table = crate::output::table(&super::PS_HEADERS, &rows);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("ID    SLOT  NODE  ADDRESS         VERSION  IMAGE/COMMAND"));
        assert_eq!(
            rows[0][..6],
            ["aaaa", "0", "n2", "10.0.0.2:20001", "3", "reg:5000/web:v3"]
        );
        assert_eq!(
            rows[1][..6],
            ["bbbb", "0", "n2", "10.0.0.2:20002", "4", "reg:5000/web:v4"]
        );
        // A node the CLI does not know: no address rather than a wrong one.
        assert_eq!(super::ps_rows(&[&blue], &[])[0][3], "-");
    }

    #[test]
    fn ls_shows_the_image_or_the_command_and_published_to_container_ports() {
        let process = pb::ServiceSpec {
            name: "api".into(),
            runtime: "process".into(),
            command: vec!["python3".into(), "-m".into(), "http.server".into()],
            publish: 9000,
            ..Default::default()
        };
        let internal = pb::ServiceSpec {
            publish: 0,
            protocol: String::new(),
            ..web("reg:5000/db:v1")
        };
        let services: Vec<pb::ServiceStatus> = [web("reg:5000/web:v4"), process, internal]
            .into_iter()
            .map(|spec| pb::ServiceStatus {
                spec: Some(spec),
                running: 2,
                desired: 3,
                ..Default::default()
            })
            .collect();
        let rows = super::ls_rows(&services);
        assert_eq!(
            rows[0],
            ["web", "2/3", "oci", "reg:5000/web:v4", "8080->80/http"]
        );
        assert_eq!(
            rows[1],
            [
                "api",
                "2/3",
                "process",
                "python3 -m http.server",
                "9000/tcp"
            ]
        );
        assert_eq!(rows[2][3..], ["reg:5000/db:v1", "80/tcp"]);
    }

    #[test]
    fn inspect_shows_image_ports_health_update_and_autoscale() {
        let spec = pb::ServiceSpec {
            health: Some(pb::HealthCheck {
                kind: "http".into(),
                http_path: "/healthz".into(),
                interval_ms: 2000,
                ..Default::default()
            }),
            update: Some(pb::UpdatePolicy {
                strategy: "canary".into(),
                canary: 2,
                canary_weight: 10,
                max_error_rate: Some(5),
                ..Default::default()
            }),
            autoscale: Some(pb::Autoscale {
                min: 1,
                max: 5,
                target_rps: 50.0,
                ..Default::default()
            }),
            ..web("reg:5000/web:v4")
        };
        let status = pb::ServiceStatus {
            spec: Some(spec),
            ..Default::default()
        };
        let text = super::describe(&status);
        for line in [
            "Image:       reg:5000/web:v4\n",
            "Ports:       container 80; published 8080 (http) on every node\n",
            "Health:      http GET /healthz every 2s, timeout 5s, 3 retries, start period 0s\n",
            "Update:      canary: 1 at a time, max surge 1, max unavailable 0, healthy for 5s, healthy deadline 1m, progress deadline 10m, 2 canaries, 10% of requests to canaries, fails above 5% errors, promote by hand, auto-rollback\n",
            "Autoscale:   1..5 replicas, per replica 50 req/s\n",
        ] {
            assert!(text.contains(line), "no {line:?} in\n{text}");
        }
    }

    #[test]
    fn inspect_of_a_plain_service_says_what_the_defaults_are() {
        let spec = pb::ServiceSpec {
            port: 0,
            publish: 0,
            protocol: String::new(),
            ..web("reg:5000/web:v4")
        };
        let status = pb::ServiceStatus {
            spec: Some(spec),
            ..Default::default()
        };
        let text = super::describe(&status);
        for line in [
            "Ports:       the image's first exposed port; not published\n",
            "Health:      none given (the image's HEALTHCHECK, if any)\n",
            "Update:      rolling: 1 at a time, max surge 1, max unavailable 0, healthy for 5s, healthy deadline 1m, progress deadline 10m, auto-rollback\n",
            "Autoscale:   off\n",
        ] {
            assert!(text.contains(line), "no {line:?} in\n{text}");
        }
    }

    #[test]
    fn durations_print_in_the_largest_whole_unit() {
        let cases = [
            (0, "0s"),
            (250, "250ms"),
            (5000, "5s"),
            (60_000, "1m"),
            (90_000, "1m30s"),
        ];
        for (ms, text) in cases {
            assert_eq!(super::human_ms(ms), text);
        }
    }
}
