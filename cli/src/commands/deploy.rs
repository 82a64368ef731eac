//! `skiff service update|history|rollback|promote|pause|resume`: new
//! versions of a service and their deployments, with live progress.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use indicatif::ProgressBar;
use skiff_proto::v1 as pb;
use skiff_spec as spec;

use crate::args::{AutoscaleArgs, OutputFormat, UpdateArgs, UpdatePolicyArgs};
use crate::client::{explain, Client};
use crate::output;

/// The update policy `args` describe over `base` (the current one, or the
/// defaults for a new service).
pub fn policy_from_args(
    base: Option<pb::UpdatePolicy>,
    args: &UpdatePolicyArgs,
) -> pb::UpdatePolicy {
    let mut p = base.unwrap_or_default();
    if let Some(s) = args.update_strategy {
        p.strategy = s.as_str().to_string();
    } else if args.canary.is_some() {
        p.strategy = "canary".to_string();
    }
    if let Some(v) = args.max_parallel {
        p.max_parallel = v;
    }
    if let Some(v) = args.max_surge {
        p.max_surge = Some(v);
    }
    if let Some(v) = args.max_unavailable {
        p.max_unavailable = Some(v);
    }
    if let Some(v) = args.min_healthy_time {
        p.min_healthy_ms = Some(v);
    }
    if let Some(v) = args.healthy_deadline {
        p.healthy_deadline_ms = v;
    }
    if let Some(v) = args.progress_deadline {
        p.progress_deadline_ms = v;
    }
    if args.no_auto_rollback {
        p.auto_rollback = Some(false);
    } else if args.auto_rollback {
        p.auto_rollback = Some(true);
    }
    if args.auto_promote {
        p.auto_promote = true;
    }
    if let Some(v) = args.canary {
        p.canary = v;
    }
    if let Some(v) = args.canary_weight {
        p.canary_weight = v;
    }
    if let Some(v) = args.max_error_rate {
        p.max_error_rate = Some(v);
    }
    p
}

/// The autoscale policy `args` describe over `base`; `None`: not
/// autoscaled.
pub fn autoscale_from_args(
    base: Option<pb::Autoscale>,
    args: &AutoscaleArgs,
) -> anyhow::Result<Option<pb::Autoscale>> {
    if args.no_autoscale {
        return Ok(None);
    }
    let given = args.autoscale_min.is_some()
        || args.autoscale_max.is_some()
        || args.target_rps.is_some()
        || args.target_concurrency.is_some()
        || args.target_cpu.is_some();
    if !given {
        return Ok(base);
    }
    let mut a = base.unwrap_or_default();
    if let Some(v) = args.autoscale_min {
        a.min = v;
    }
    if let Some(v) = args.autoscale_max {
        a.max = v;
    }
    if a.max == 0 {
        bail!("invalid autoscale-max: autoscaling needs --autoscale-max M (the most replicas)");
    }
    if let Some(v) = args.target_rps {
        a.target_rps = v;
    }
    if let Some(v) = args.target_concurrency {
        a.target_concurrency = v;
    }
    if let Some(v) = args.target_cpu {
        a.target_cpu = v;
    }
    Ok(Some(a))
}

/// The spec `args` make of the current one.
fn updated_spec(current: &pb::ServiceSpec, args: &UpdateArgs) -> anyhow::Result<pb::ServiceSpec> {
    let mut spec = current.clone();
    if let Some(image) = &args.image {
        spec.image = image.clone();
    }
    for pair in &args.env {
        let (key, value) = pair
            .split_once('=')
            .with_context(|| format!("invalid --env \"{pair}\": use KEY=VALUE"))?;
        spec::validate_env(key, value).map_err(|e| anyhow!("{e}"))?;
        spec.env.insert(key.to_string(), value.to_string());
    }
    for key in &args.env_rm {
        if spec.env.remove(key).is_none() {
            bail!("invalid env-rm: the service has no variable \"{key}\"; see `skiff service inspect {}`", spec.name);
        }
    }
    if let Some(n) = args.replicas {
        spec.replicas = spec::validate_replicas(n).map_err(|e| anyhow!("{e}"))?;
    }
    if let Some(mb) = args.memory {
        spec.memory_mb = mb;
    }
    if let Some(cpu) = args.cpu {
        if cpu == 0 {
            bail!(
                "invalid cpu: 0 millicores would never run; use a value above 0 (1000 = one CPU)"
            );
        }
        spec.cpu_millis = cpu;
    }
    if let Some(user) = &args.user {
        spec.user = user.clone();
    }
    if let Some(port) = args.port {
        spec.port = port;
    }
    if let Some(path) = &args.health_http {
        spec.health = Some(pb::HealthCheck {
            kind: "http".into(),
            http_path: path.clone(),
            ..spec.health.clone().unwrap_or_default()
        });
    } else if args.health_tcp {
        spec.health = Some(pb::HealthCheck {
            kind: "tcp".into(),
            ..spec.health.clone().unwrap_or_default()
        });
    } else if let Some(cmd) = &args.health_cmd {
        spec.health = Some(pb::HealthCheck {
            kind: "exec".into(),
            command: vec!["/bin/sh".into(), "-c".into(), cmd.clone()],
            ..spec.health.clone().unwrap_or_default()
        });
    }
    if args.health_rm {
        spec.health = None;
    }
    let timings = args.health_interval.is_some()
        || args.health_timeout.is_some()
        || args.health_retries.is_some()
        || args.health_start_period.is_some();
    if timings {
        let Some(health) = spec.health.as_mut().filter(|h| !h.kind.is_empty()) else {
            bail!("invalid health: timings need a check; add --health-http PATH, --health-tcp or --health-cmd CMD");
        };
        if let Some(v) = args.health_interval {
            health.interval_ms = v;
        }
        if let Some(v) = args.health_timeout {
            health.timeout_ms = v;
        }
        if let Some(v) = args.health_retries {
            health.retries = v;
        }
        if let Some(v) = args.health_start_period {
            health.start_period_ms = v;
        }
    }
    for text in &args.constraint_add {
        let constraint = spec::Constraint::parse(text).map_err(|e| anyhow!("{e}"))?;
        let text = constraint.to_string();
        if !spec.constraints.contains(&text) {
            spec.constraints.push(text);
        }
    }
    for text in &args.constraint_rm {
        let text = spec::Constraint::parse(text)
            .map(|c| c.to_string())
            .unwrap_or_else(|_| text.clone());
        let before = spec.constraints.len();
        spec.constraints.retain(|c| c != &text);
        if spec.constraints.len() == before {
            bail!("invalid constraint-rm: the service has no constraint \"{text}\"; see `skiff service inspect {}`", spec.name);
        }
    }
    if args.publish_rm {
        spec.publish = 0;
        spec.protocol = String::new();
    }
    if let Some((published, container)) = args.publish {
        spec.publish = u32::from(published);
        if let Some(port) = container {
            spec.port = u32::from(port);
        }
    }
    if let Some(v) = args.protocol {
        spec.protocol = v.as_str().to_string();
    }
    if let Some(v) = args.network {
        spec.network = v.as_str().to_string();
    }
    if let Some(v) = args.placement {
        spec.placement = v.as_str().to_string();
    }
    if let Some(v) = args.mode {
        spec.mode = v.as_str().to_string();
    }
    if let Some(v) = args.max_per_node {
        spec.max_per_node = v;
    }
    if let Some(v) = &args.workdir {
        spec.workdir = v.clone();
    }
    if let Some(v) = args.runtime {
        spec.runtime = v.as_str().to_string();
    }
    if let Some(v) = &args.entrypoint {
        spec.entrypoint = (!v.is_empty()).then(|| pb::Argv {
            args: vec![v.clone()],
        });
    }
    for pair in &args.label_add {
        let (key, value) = pair
            .split_once('=')
            .with_context(|| format!("invalid --label-add \"{pair}\": use KEY=VALUE"))?;
        spec.labels.insert(key.to_string(), value.to_string());
    }
    for key in &args.label_rm {
        if spec.labels.remove(key).is_none() {
            bail!("invalid label-rm: the service has no label \"{key}\"");
        }
    }
    super::volume::apply_args(&mut spec, &args.volumes, &args.volume_rm)?;
    super::secret::apply_args(&mut spec, &args.secrets, &args.secret_rm)?;
    if let Some(option) = &args.security_opt {
        spec.seccomp = super::service::seccomp_option(option)?.unwrap_or_default();
    }
    if args.init {
        spec.init = Some(true);
    } else if args.no_init {
        spec.init = Some(false);
    }
    if !args.command.is_empty() {
        spec.command = args.command.clone();
    }
    spec.update = Some(policy_from_args(spec.update.clone(), &args.update));
    spec.autoscale = autoscale_from_args(spec.autoscale, &args.autoscale)?;
    Ok(spec)
}

pub async fn update(
    client: &mut Client,
    format: OutputFormat,
    args: UpdateArgs,
) -> anyhow::Result<()> {
    let current = super::service::get(client, &args.name).await?;
    let before = current.version;
    let spec = updated_spec(&current.spec.unwrap_or_default(), &args)?;
    // Refuse a bad update here with the field's message; the server checks
    // again before anything changes.
    skiff_spec::pb::spec_from_pb(spec.clone()).map_err(|e| anyhow!("{e}"))?;
    let status = client
        .update_service(pb::UpdateServiceRequest { spec: Some(spec) })
        .await
        .map_err(explain)?
        .into_inner();
    if status.version == before {
        println!(
            "service {} updated in place (version {} unchanged: only the replica count or policies changed)",
            args.name, status.version
        );
        return check_published_port(client, &args.name, args.detach, true).await;
    }
    println!(
        "service {}: version {} is rolling out ({})",
        args.name,
        status.version,
        status
            .deployment
            .as_ref()
            .map_or("rolling", |d| d.strategy.as_str())
    );
    if !args.detach {
        watch(client, format, &args.name, status.version).await?;
    }
    check_published_port(client, &args.name, args.detach, args.detach).await
}

/// Fails (or, detached, warns) when a node cannot listen on the service's
/// published port after an update; `settle`: the command waited for
/// nothing, so the proxies' reports get a moment to arrive.
async fn check_published_port(
    client: &mut Client,
    name: &str,
    detach: bool,
    settle: bool,
) -> anyhow::Result<()> {
    let settle = if settle {
        super::progress::PORT_SETTLE
    } else {
        Duration::ZERO
    };
    match super::progress::published_port_problem(client, name, settle).await? {
        Some(problem) if detach => {
            eprintln!("warning: service {name}: {problem}");
            Ok(())
        }
        Some(problem) => bail!("service {name}: {problem}"),
        None => Ok(()),
    }
}

pub async fn rollback(
    client: &mut Client,
    format: OutputFormat,
    name: &str,
    to: Option<u64>,
    detach: bool,
) -> anyhow::Result<()> {
    let status = client
        .rollback_service(pb::RollbackServiceRequest {
            name: name.to_string(),
            to_version: to.unwrap_or(0),
        })
        .await
        .map_err(explain)?
        .into_inner();
    println!(
        "service {name}: version {} rolls back ({})",
        status.version,
        status
            .deployment
            .as_ref()
            .map_or("", |d| d.message.as_str())
    );
    if detach {
        return Ok(());
    }
    watch(client, format, name, status.version).await
}

pub async fn promote(
    client: &mut Client,
    format: OutputFormat,
    name: &str,
    detach: bool,
) -> anyhow::Result<()> {
    let status = client
        .promote_deployment(pb::PromoteDeploymentRequest {
            name: name.to_string(),
        })
        .await
        .map_err(explain)?
        .into_inner();
    println!("service {name}: version {} promoted", status.version);
    if detach {
        return Ok(());
    }
    watch(client, format, name, status.version).await
}

pub async fn pause(client: &mut Client, name: &str, paused: bool) -> anyhow::Result<()> {
    let status = client
        .pause_deployment(pb::PauseDeploymentRequest {
            name: name.to_string(),
            paused,
        })
        .await
        .map_err(explain)?
        .into_inner();
    let verb = if paused { "paused" } else { "resumed" };
    println!(
        "service {name}: deployment of version {} {verb}",
        status.version
    );
    Ok(())
}

pub async fn history(
    client: &mut Client,
    format: OutputFormat,
    name: &str,
    show_values: bool,
) -> anyhow::Result<()> {
    let status = super::service::get_shown(client, name, show_values).await?;
    let rows = status
        .history
        .iter()
        .map(|v| {
            let spec = v.spec.clone().unwrap_or_default();
            let what = if spec.image.is_empty() {
                spec.command.join(" ")
            } else {
                spec.image.clone()
            };
            vec![
                v.version.to_string(),
                what,
                v.outcome.clone(),
                if v.diff.is_empty() {
                    "-".to_string()
                } else {
                    v.diff.join("; ")
                },
                v.message.clone(),
            ]
        })
        .collect();
    output::print(
        format,
        &status.history,
        &["VERSION", "RUNS", "OUTCOME", "CHANGES", "MESSAGE"],
        rows,
    );
    Ok(())
}

/// Longest the CLI follows one deployment (the server enforces the
/// deployment's own progress deadline).
const WATCH_LIMIT: Duration = Duration::from_secs(3600);

/// Shows the deployment of `version` until it ends (following an automatic
/// rollback to its end); errors when it failed or was rolled back. A
/// blue-green or canary deployment waiting for promotion ends the watch
/// successfully, with the command to promote it.
async fn watch(
    client: &mut Client,
    format: OutputFormat,
    name: &str,
    version: u64,
) -> anyhow::Result<()> {
    let display = super::progress::Bars::new(format, 12);
    let (interactive, bars) = (display.interactive, &display.multi);
    let bar = |prefix: &str| display.bar(prefix);
    let (healthy, stopped) = (bar("new healthy"), bar("old stopped"));
    let step = bars.add(ProgressBar::new_spinner());
    let started = Instant::now();
    let mut old_at_start: Option<u32> = None;
    let mut watched = version;
    let mut last_line = String::new();
    let mut failed_reason: Option<String> = None;
    loop {
        if started.elapsed() > WATCH_LIMIT {
            bail!("stopped following the deployment after {} s; it continues (see `skiff service inspect {name}`)", WATCH_LIMIT.as_secs());
        }
        let status = super::service::get(client, name).await?;
        let Some(d) = status.deployment.clone() else {
            return Ok(());
        };
        if d.version != watched {
            if d.rollback_of == watched {
                // The watched version failed and is being rolled back.
                let record = status.history.iter().find(|v| v.version == watched);
                failed_reason =
                    Some(record.map_or_else(|| d.message.clone(), |r| r.message.clone()));
                watched = d.version;
                old_at_start = None;
            } else {
                bars.clear().ok();
                bail!("version {watched} was superseded by version {}", d.version);
            }
        }
        let old_total = *old_at_start.get_or_insert(d.old_running);
        healthy.set_length(u64::from(d.desired));
        healthy.set_position(u64::from(d.new_healthy.min(d.desired)));
        stopped.set_length(u64::from(old_total));
        stopped.set_position(u64::from(old_total.saturating_sub(d.old_running)));
        let failing: Vec<String> = status
            .allocations
            .iter()
            .filter(|a| a.version == d.version && a.desired == "run")
            .filter(|a| matches!(a.state.as_str(), "failed" | "unhealthy" | "restarting"))
            .map(|a| format!("{} {}: {}", a.id, a.state, a.message))
            .collect();
        let line = format!(
            "version {} {} ({}): {}{}",
            d.version,
            d.status,
            d.strategy,
            d.message,
            if failing.is_empty() {
                String::new()
            } else {
                format!(" — failing: {}", failing.join("; "))
            }
        );
        step.set_message(line.clone());
        step.tick();
        if !interactive && line != last_line {
            eprintln!(
                "{line} [new healthy {}/{}, old running {}]",
                d.new_healthy, d.desired, d.old_running
            );
        }
        last_line = line;
        match d.status.as_str() {
            "succeeded" => {
                bars.clear().ok();
                if let Some(reason) = failed_reason {
                    bail!(
                        "version {version} failed and was rolled back (now version {}): {reason}",
                        d.version
                    );
                }
                println!("service {name}: version {} deployed", d.version);
                return Ok(());
            }
            "awaiting-promotion" => {
                bars.clear().ok();
                println!(
                    "service {name}: version {} is ready and waits for promotion: `skiff service promote {name}` (or roll back: `skiff service rollback {name}`)",
                    d.version
                );
                return Ok(());
            }
            "failed" if d.rollback_of == 0 || d.version == watched => {
                // Failed without an automatic rollback following it (a
                // rollback would show up as a newer deployment).
                tokio::time::sleep(Duration::from_millis(500)).await;
                let again = super::service::get(client, name).await?;
                if again
                    .deployment
                    .as_ref()
                    .is_some_and(|n| n.version != d.version)
                {
                    continue;
                }
                bars.clear().ok();
                bail!("version {} failed: {}", d.version, d.message);
            }
            "rolled-back" | "superseded" => {
                bars.clear().ok();
                bail!("version {} {}: {}", d.version, d.status, d.message);
            }
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
