//! `skiff service ...`

use std::collections::HashMap;

use anyhow::{anyhow, Context};
use skiff_control_plane::state::spec;
use skiff_proto::v1 as pb;

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
    let mut client = connect(server).await?;
    match command {
        ServiceCommand::Create(_) => {
            let spec = create_spec.expect("built above");
            let (name, count) = (spec.name.clone(), spec.replicas);
            client
                .create_service(pb::CreateServiceRequest { spec: Some(spec) })
                .await
                .map_err(explain)?;
            println!("service {name} created with {count} replicas");
        }
        ServiceCommand::Ls => {
            let services = client
                .list_services(pb::ListServicesRequest {})
                .await
                .map_err(explain)?
                .into_inner()
                .services;
            let rows = services
                .iter()
                .map(|s| {
                    let spec = s.spec.clone().unwrap_or_default();
                    vec![
                        spec.name,
                        format!("{}/{}", s.running, spec.replicas),
                        spec.runtime,
                        spec.command.join(" "),
                    ]
                })
                .collect();
            output::print(
                format,
                &services,
                &["NAME", "RUNNING", "RUNTIME", "COMMAND"],
                rows,
            );
        }
        ServiceCommand::Ps { name, all } => {
            let status = get(&mut client, &name).await?;
            let allocs: Vec<&pb::Allocation> = status
                .allocations
                .iter()
                .filter(|a| all || a.desired == "run")
                .collect();
            let rows = allocs
                .iter()
                .map(|a| {
                    vec![
                        a.id.clone(),
                        a.node.clone(),
                        a.state.clone(),
                        a.desired.clone(),
                        a.host_port.to_string(),
                        a.restarts.to_string(),
                        if a.pid == 0 {
                            "-".into()
                        } else {
                            a.pid.to_string()
                        },
                        a.message.clone(),
                    ]
                })
                .collect();
            output::print(
                format,
                &allocs,
                &[
                    "ID", "NODE", "STATE", "DESIRED", "PORT", "RESTARTS", "PID", "MESSAGE",
                ],
                rows,
            );
            if format == OutputFormat::Table && !status.unplaced_reason.is_empty() {
                println!("\n{}", status.unplaced_reason);
            }
        }
        ServiceCommand::Inspect { name } => {
            let status = get(&mut client, &name).await?;
            match format {
                OutputFormat::Json => output::print(format, &status, &[], vec![]),
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
    }
    Ok(())
}

fn replicas(value: i64) -> anyhow::Result<u32> {
    spec::validate_replicas(value).map_err(|e| anyhow!("{e}"))
}

fn build_spec(args: &CreateArgs, replicas: u32) -> anyhow::Result<pb::ServiceSpec> {
    let invalid = |e: spec::SpecError| anyhow!("{e}");
    spec::validate_name(&args.name).map_err(invalid)?;
    let runtime = spec::RuntimeKind::resolve(
        args.runtime.as_deref().unwrap_or_default(),
        args.image.is_some(),
    )
    .map_err(invalid)?;
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
        network: spec::NetworkMode::parse(args.network.as_deref().unwrap_or_default())
            .map_err(invalid)?,
        init: init(args),
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
    Ok(pb::ServiceSpec {
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
        network: args.network.clone().unwrap_or_default(),
        health,
        init: init(args),
    })
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

async fn get(client: &mut crate::client::Client, name: &str) -> anyhow::Result<pb::ServiceStatus> {
    Ok(client
        .get_service(pb::GetServiceRequest {
            name: name.to_string(),
        })
        .await
        .map_err(explain)?
        .into_inner())
}

/// The human-readable `inspect`: the spec, then the replicas.
fn describe(status: &pb::ServiceStatus) -> String {
    let spec = status.spec.clone().unwrap_or_default();
    let mut env: Vec<String> = spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    env.sort();
    let mut out = format!(
        "Name:        {}\nRuntime:     {}\nReplicas:    {} desired, {} running\nCommand:     {}\nEnv:         {}\nWorkdir:     {}\nGeneration:  {} (modify index {})\n",
        spec.name,
        spec.runtime,
        spec.replicas,
        status.running,
        spec.command.join(" "),
        if env.is_empty() { "-".into() } else { env.join(" ") },
        if spec.workdir.is_empty() { "-" } else { &spec.workdir },
        status.generation,
        status.modify_index,
    );
    if !status.unplaced_reason.is_empty() {
        out.push_str(&format!("Unplaced:    {}\n", status.unplaced_reason));
    }
    out.push_str("\nReplicas:\n");
    let rows: Vec<Vec<String>> = status
        .allocations
        .iter()
        .map(|a| {
            vec![
                a.id.clone(),
                a.node.clone(),
                a.state.clone(),
                a.desired.clone(),
                a.host_port.to_string(),
                a.restarts.to_string(),
            ]
        })
        .collect();
    out.push_str(&output::table(
        &["ID", "NODE", "STATE", "DESIRED", "PORT", "RESTARTS"],
        &rows,
    ));
    out
}
