//! `skiff stack deploy|plan|ls|ps|rm|export` and `skiff service export`:
//! the files are read and validated here by `skiff_spec::stack` (so a bad
//! file is refused before anything is sent), and the server applies a stack
//! as one committed step.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use skiff_proto::v1 as pb;
use skiff_spec::stack::{self, FileSource, LoadOptions, StackFile, StackSecret};
use skiff_spec::{ServiceSpec, STACK_LABEL};

use crate::args::{OutputFormat, StackCommand, StackFileArgs};
use crate::client::{connect, explain, Client};
use crate::output;

pub async fn run(server: &str, format: OutputFormat, command: StackCommand) -> anyhow::Result<()> {
    // Read and validate the files before connecting: a bad file is
    // reported even with no server.
    let loaded = match &command {
        StackCommand::Deploy { files, .. } | StackCommand::Plan { files } => Some(load(files)?),
        _ => None,
    };
    let mut client = connect(server).await?;
    match command {
        StackCommand::Deploy {
            files,
            check_index,
            detach,
        } => {
            let (services, secrets) = loaded.expect("loaded above");
            put_secrets(&mut client, &secrets).await?;
            deploy(
                &mut client,
                format,
                &files.name,
                services,
                check_index,
                detach,
            )
            .await
        }
        StackCommand::Plan { files } => {
            let (services, secrets) = loaded.expect("loaded above");
            let secrets: Vec<String> = secrets.into_iter().map(|s| s.name).collect();
            plan(&mut client, format, &files.name, services, &secrets).await
        }
        StackCommand::Ls => list(&mut client, format).await,
        StackCommand::Ps { name, all } => ps(&mut client, format, &name, all).await,
        StackCommand::Rm { name } => {
            client
                .remove_stack(pb::RemoveStackRequest {
                    stack: name.clone(),
                })
                .await
                .map_err(explain)?;
            println!("stack {name} removed; its replicas are stopping");
            Ok(())
        }
        StackCommand::Export { name } => {
            let services = stack_services(&mut client, &name).await?;
            if services.is_empty() {
                bail!("stack \"{name}\" not found; see `skiff stack ls`");
            }
            print!("{}", stack::export(Some(&name), &services));
            Ok(())
        }
    }
}

/// `skiff service export NAME`.
pub async fn export_service(client: &mut Client, name: &str) -> anyhow::Result<()> {
    let status = super::service::get_with_values(client, name).await?;
    let spec = domain(status.spec.unwrap_or_default())?;
    // A service of a stack is exported as one of that stack, so that
    // `stack deploy STACK` of the file names it the same.
    let stack = spec.labels.get(STACK_LABEL).cloned();
    print!("{}", stack::export(stack.as_deref(), &[spec]));
    Ok(())
}

/// `skiff service apply -f FILE`: the file's services under their own
/// names, each created or updated (a spec that runs the same changes in
/// place; one that does not rolls out with its policy).
pub async fn apply(
    client: &mut Client,
    format: OutputFormat,
    files: Vec<PathBuf>,
    vars: Vec<String>,
    strict: bool,
    detach: bool,
) -> anyhow::Result<()> {
    let args = StackFileArgs {
        name: String::new(),
        files,
        vars,
        profiles: Vec::new(),
        env_file: None,
        strict,
    };
    let (services, secrets) = load_as(&args, None)?;
    put_secrets(client, &secrets).await?;
    let existing: Vec<String> = all_services(client, false)
        .await?
        .into_iter()
        .filter_map(|s| s.spec.map(|spec| spec.name))
        .collect();
    let mut names = Vec::new();
    for spec in &services {
        let pb = skiff_spec::pb::spec_to_pb(spec);
        if existing.contains(&spec.name) {
            client
                .update_service(pb::UpdateServiceRequest { spec: Some(pb) })
                .await
                .map_err(explain)?;
            println!("service {} updated", spec.name);
        } else {
            client
                .create_service(pb::CreateServiceRequest { spec: Some(pb) })
                .await
                .map_err(explain)?;
            println!("service {} created", spec.name);
        }
        names.push(spec.name.clone());
    }
    if !detach {
        super::progress::wait_until_serving(client, format, &names).await?;
    }
    Ok(())
}

/// The real filesystem, for `.env` and `env_file`.
struct Disk;

impl FileSource for Disk {
    fn read(&self, path: &Path) -> std::io::Result<String> {
        std::fs::read_to_string(path)
    }
}

/// The stack the files describe, validated as a whole; warnings go to
/// stderr.
fn load(args: &StackFileArgs) -> anyhow::Result<Loaded> {
    load_as(args, Some(args.name.clone()))
}

/// [`load`] as the services of `stack`, or under their own names.
/// The services of the files and the secrets they declare with `file:`.
type Loaded = (Vec<ServiceSpec>, Vec<StackSecret>);

/// Creates each secret a stack file declares with `file:` from that file,
/// or updates it (a new version only when the value differs), before the
/// services that use it are deployed.
async fn put_secrets(client: &mut Client, secrets: &[StackSecret]) -> anyhow::Result<()> {
    if secrets.is_empty() {
        return Ok(());
    }
    let existing: Vec<String> = client
        .secret_list(pb::ListSecretsRequest {})
        .await
        .map_err(explain)?
        .into_inner()
        .secrets
        .into_iter()
        .map(|s| s.name)
        .collect();
    for secret in secrets {
        let value = super::secret::read_value(&secret.name, &secret.file.display().to_string())?;
        let request = pb::PutSecretRequest {
            name: secret.name.clone(),
            value,
        };
        if existing.contains(&secret.name) {
            let info = client
                .secret_update(request)
                .await
                .map_err(explain)?
                .into_inner();
            if !info.unchanged {
                println!("secret {} updated to version {}", secret.name, info.version);
            }
        } else {
            client.secret_create(request).await.map_err(explain)?;
            println!("secret {} created", secret.name);
        }
    }
    Ok(())
}

fn load_as(args: &StackFileArgs, stack: Option<String>) -> anyhow::Result<Loaded> {
    let files = args
        .files
        .iter()
        .map(|path| {
            let contents = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read stack file {}", path.display()))?;
            Ok(StackFile {
                path: path.clone(),
                contents,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut cli_vars = BTreeMap::new();
    for pair in &args.vars {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| anyhow!("invalid --var \"{pair}\": use KEY=VALUE"))?;
        cli_vars.insert(key.to_string(), value.to_string());
    }
    let dotenv = args.env_file.clone().or_else(|| {
        let dir = args
            .files
            .first()
            .and_then(|f| f.parent())
            .map(Path::to_path_buf)
            .unwrap_or_default();
        Some(if dir.as_os_str().is_empty() {
            PathBuf::from(".env")
        } else {
            dir.join(".env")
        })
    });
    let options = LoadOptions {
        stack,
        files,
        cli_vars,
        shell_vars: std::env::vars().collect(),
        dotenv,
        profiles: args.profiles.clone(),
        strict: args.strict,
    };
    let loaded = stack::load(&options, &Disk).map_err(|e| anyhow!("{e}"))?;
    for warning in &loaded.warnings {
        eprintln!("warning: {warning}");
    }
    Ok((loaded.services, loaded.secrets))
}

fn request(
    name: &str,
    services: &[ServiceSpec],
    check_index: Option<u64>,
    secrets: &[String],
) -> pb::DeployStackRequest {
    pb::DeployStackRequest {
        stack: name.to_string(),
        services: services.iter().map(skiff_spec::pb::spec_to_pb).collect(),
        check_index,
        secrets: secrets.to_vec(),
    }
}

async fn deploy(
    client: &mut Client,
    format: OutputFormat,
    name: &str,
    services: Vec<ServiceSpec>,
    check_index: Option<u64>,
    detach: bool,
) -> anyhow::Result<()> {
    let plan = client
        .plan_stack(request(name, &services, None, &[]))
        .await
        .map_err(explain)?
        .into_inner();
    let response = client
        .deploy_stack(request(name, &services, check_index, &[]))
        .await
        .map_err(explain)?
        .into_inner();
    for change in &plan.changes {
        if change.action != "unchanged" {
            println!("{} {}", change.action, change.service);
        }
    }
    let changed = plan
        .changes
        .iter()
        .filter(|c| c.action != "unchanged")
        .count();
    println!(
        "stack {name} deployed at index {} ({} services, {changed} changed)",
        response.index,
        services.len()
    );
    if detach {
        return Ok(());
    }
    let mut order = stack::start_order(&services).map_err(|e| anyhow!("{e}"))?;
    order.retain(|s| services.iter().any(|x| &x.name == s));
    super::progress::wait_until_serving(client, format, &order).await?;
    println!("stack {name}: every replica serves");
    Ok(())
}

async fn plan(
    client: &mut Client,
    format: OutputFormat,
    name: &str,
    services: Vec<ServiceSpec>,
    secrets: &[String],
) -> anyhow::Result<()> {
    let plan = client
        .plan_stack(request(name, &services, None, secrets))
        .await
        .map_err(explain)?
        .into_inner();
    let changes = plan.changes.iter().any(|c| c.action != "unchanged");
    match format {
        OutputFormat::Json | OutputFormat::Yaml => output::print(format, &plan, &[], vec![]),
        OutputFormat::Table => print!("{}", describe_plan(name, &plan)),
    }
    if changes {
        return Err(super::Exit(2).into());
    }
    Ok(())
}

/// The plan as `terraform plan` shows one: a line per service with its
/// action, its changed fields, and where new replicas go.
fn describe_plan(name: &str, plan: &pb::StackPlan) -> String {
    let mut out = String::new();
    for change in &plan.changes {
        let sign = match change.action.as_str() {
            "create" => "+",
            "remove" => "-",
            "unchanged" => "=",
            _ => "~",
        };
        out.push_str(&format!("{sign} {} ({})\n", change.service, change.action));
        for line in &change.diff {
            out.push_str(&format!("    {line}\n"));
        }
        if !change.placements.is_empty() {
            let nodes: Vec<String> = change
                .placements
                .iter()
                .map(|p| format!("{} on {}", p.replicas, p.node))
                .collect();
            out.push_str(&format!("    new replicas: {}\n", nodes.join(", ")));
        }
        if !change.unplaced.is_empty() {
            out.push_str(&format!("    {}\n", change.unplaced));
        }
    }
    let changed = plan
        .changes
        .iter()
        .filter(|c| c.action != "unchanged")
        .count();
    if changed == 0 {
        out.push_str(&format!(
            "stack {name}: no changes (planned at index {})\n",
            plan.index
        ));
    } else {
        out.push_str(&format!(
            "stack {name}: {changed} services change (planned at index {}); apply exactly this with `skiff stack deploy {name} -f ... --check-index {}`\n",
            plan.index, plan.index
        ));
    }
    out
}

/// Every service; their environment values only with `show_values` (which
/// takes an admin token: `stack export` needs them, the rest do not).
async fn all_services(
    client: &mut Client,
    show_values: bool,
) -> anyhow::Result<Vec<pb::ServiceStatus>> {
    Ok(client
        .list_services(pb::ListServicesRequest { show_values })
        .await
        .map_err(explain)?
        .into_inner()
        .services)
}

fn stack_of(status: &pb::ServiceStatus) -> Option<&str> {
    status
        .spec
        .as_ref()
        .and_then(|s| s.labels.get(STACK_LABEL))
        .map(String::as_str)
}

fn domain(spec: pb::ServiceSpec) -> anyhow::Result<ServiceSpec> {
    skiff_spec::pb::spec_from_pb(spec).map_err(|e| anyhow!("{e}"))
}

async fn stack_services(client: &mut Client, name: &str) -> anyhow::Result<Vec<ServiceSpec>> {
    all_services(client, true)
        .await?
        .into_iter()
        .filter(|s| stack_of(s) == Some(name))
        .map(|s| domain(s.spec.unwrap_or_default()))
        .collect()
}

async fn list(client: &mut Client, format: OutputFormat) -> anyhow::Result<()> {
    #[derive(serde::Serialize, Default)]
    struct Row {
        name: String,
        services: u32,
        running: u32,
        desired: u32,
    }
    let mut stacks: BTreeMap<String, Row> = BTreeMap::new();
    for status in all_services(client, false).await? {
        if let Some(stack) = stack_of(&status) {
            let row = stacks.entry(stack.to_string()).or_insert_with(|| Row {
                name: stack.to_string(),
                ..Row::default()
            });
            row.services += 1;
            row.running += status.running;
            row.desired += status.desired;
        }
    }
    let rows: Vec<&Row> = stacks.values().collect();
    let table = rows
        .iter()
        .map(|r| {
            vec![
                r.name.clone(),
                r.services.to_string(),
                format!("{}/{}", r.running, r.desired),
            ]
        })
        .collect();
    output::print(format, &rows, &["NAME", "SERVICES", "RUNNING"], table);
    Ok(())
}

async fn ps(
    client: &mut Client,
    format: OutputFormat,
    name: &str,
    all: bool,
) -> anyhow::Result<()> {
    let services: Vec<pb::ServiceStatus> = all_services(client, false)
        .await?
        .into_iter()
        .filter(|s| stack_of(s) == Some(name))
        .collect();
    if services.is_empty() {
        bail!("stack \"{name}\" not found; see `skiff stack ls`");
    }
    let allocs: Vec<&pb::Allocation> = services
        .iter()
        .flat_map(|s| s.allocations.iter())
        .filter(|a| all || a.desired == "run")
        .collect();
    let rows = allocs
        .iter()
        .map(|a| {
            vec![
                a.service.clone(),
                a.id.clone(),
                a.node.clone(),
                a.state.clone(),
                a.desired.clone(),
                a.host_port.to_string(),
                a.restarts.to_string(),
                a.message.clone(),
            ]
        })
        .collect();
    output::print(
        format,
        &allocs,
        &[
            "SERVICE", "ID", "NODE", "STATE", "DESIRED", "PORT", "RESTARTS", "MESSAGE",
        ],
        rows,
    );
    if format == OutputFormat::Table {
        for s in services.iter().filter(|s| !s.unplaced_reason.is_empty()) {
            let service = s.spec.as_ref().map_or("", |x| x.name.as_str());
            println!("\n{service}: {}", s.unplaced_reason);
        }
    }
    Ok(())
}
