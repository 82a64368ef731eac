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
    spec::validate_name(&args.name).map_err(|e| anyhow!("{e}"))?;
    spec::RuntimeKind::parse(&args.runtime).map_err(|e| anyhow!("{e}"))?;
    if args.command.is_empty() {
        return Err(anyhow!(
            "invalid command: the command is empty; give it after `--`, e.g. `skiff service create {} -- python3 -m http.server '$PORT'`",
            args.name
        ));
    }
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
        runtime: args.runtime.clone(),
        replicas,
        command: args.command.clone(),
        env,
        workdir: args.workdir.clone().unwrap_or_default(),
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
