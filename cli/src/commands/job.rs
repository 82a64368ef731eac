//! `skiff job ...`: one-shot jobs, services of mode `job` (see
//! `skiff_spec::ServiceMode::Job`). Creating one reuses `service create`'s
//! flags and spec building; logs and ps reuse the service plumbing.

use std::time::Duration;

use anyhow::anyhow;
use skiff_proto::v1 as pb;
use skiff_spec as spec;

use super::service::{self, LogOptions};
use crate::args::{JobCommand, JobRunArgs, OutputFormat};
use crate::client::{connect, explain};
use crate::output;

/// How often `job run --wait` looks at the job.
const WAIT_POLL: Duration = Duration::from_millis(200);

pub async fn run(server: &str, format: OutputFormat, command: JobCommand) -> anyhow::Result<()> {
    // Validate before connecting: bad input is reported even with no server.
    let spec = match &command {
        JobCommand::Run(args) => Some(job_spec(args)?),
        _ => None,
    };
    let mut client = connect(server).await?;
    match command {
        JobCommand::Run(args) => {
            let spec = spec.expect("built above");
            let name = spec.name.clone();
            if args.replace {
                replace(&mut client, &name).await?;
            }
            client
                .create_service(pb::CreateServiceRequest { spec: Some(spec) })
                .await
                .map_err(explain)?;
            println!("job {name} created");
            if args.wait {
                let code = wait(&mut client, &name).await?;
                if code != 0 {
                    return Err(super::Exit(exit_status(code)).into());
                }
            }
        }
        JobCommand::Ls => {
            let jobs: Vec<pb::ServiceStatus> = client
                .list_services(pb::ListServicesRequest { show_values: false })
                .await
                .map_err(explain)?
                .into_inner()
                .services
                .into_iter()
                .filter(is_job)
                .collect();
            output::print(format, &jobs, &LS_HEADERS, ls_rows(&jobs));
        }
        JobCommand::Ps { name } => {
            let status = get_job(&mut client, &name).await?;
            if format == OutputFormat::Table {
                println!("job {name}: {}", summary(&status));
            }
            service::ps(&mut client, format, &name, true).await?;
        }
        JobCommand::Logs { name, follow } => {
            let status = get_job(&mut client, &name).await?;
            let options = LogOptions {
                follow,
                tail: 0,
                since_ms: 0,
                max_age_ms: 0,
                timestamps: false,
            };
            service::logs(server, &status, None, options).await?;
        }
        JobCommand::Rm { name } => {
            get_job(&mut client, &name).await?;
            client
                .remove_service(pb::RemoveServiceRequest { name: name.clone() })
                .await
                .map_err(explain)?;
            println!("job {name} removed");
        }
    }
    Ok(())
}

/// `job run --replace`: removes the job `name` if there is one; a service
/// of that name is never removed.
async fn replace(client: &mut crate::client::Client, name: &str) -> anyhow::Result<()> {
    let status = match service::get(client, name).await {
        Ok(status) => status,
        Err(e) if e.to_string().contains("not found") => return Ok(()),
        Err(e) => return Err(e),
    };
    if !is_job(&status) {
        return Err(anyhow!(
            "invalid replace: {name} is a service, not a job; pick another name for the job"
        ));
    }
    client
        .remove_service(pb::RemoveServiceRequest {
            name: name.to_string(),
        })
        .await
        .map_err(explain)?;
    println!("job {name} removed");
    Ok(())
}

/// The spec of `job run`: `service create`'s, as a job. Flags that make no
/// sense for one attempt at a time are refused by name.
fn job_spec(args: &JobRunArgs) -> anyhow::Result<pb::ServiceSpec> {
    let max_retries = u32::try_from(args.max_retries)
        .ok()
        .filter(|n| *n <= spec::MAX_JOB_RETRIES)
        .ok_or_else(|| {
            anyhow!(
                "invalid max-retries: {} is out of range; use 0 to {}",
                args.max_retries,
                spec::MAX_JOB_RETRIES
            )
        })?;
    let create = &args.create;
    if create.replicas != 1 {
        return Err(anyhow!(
            "invalid replicas: a job runs one attempt at a time; drop --replicas"
        ));
    }
    if create.mode.is_some() {
        return Err(anyhow!(
            "invalid mode: `job run` always makes a job; drop --mode"
        ));
    }
    if create.publish.is_some() {
        return Err(anyhow!(
            "invalid publish: a job is not published; use `skiff service create` for a server"
        ));
    }
    let mut spec = service::build_spec(create, 1)?;
    spec.mode = spec::ServiceMode::Job.as_str().to_string();
    spec.max_retries = max_retries;
    spec.deadline_secs = args.deadline.map_or(0, |ms| u64::from(ms).div_ceil(1000));
    Ok(spec)
}

/// Waits until the job is done, printing each attempt as it ends; the
/// job's last exit status.
async fn wait(client: &mut crate::client::Client, name: &str) -> anyhow::Result<i32> {
    let mut printed = std::collections::BTreeSet::new();
    loop {
        let status = get_job(client, name).await?;
        let mut ended: Vec<&pb::Allocation> = status
            .allocations
            .iter()
            .filter(|a| a.exit_code.is_some())
            .collect();
        ended.sort_by_key(|a| a.create_index);
        for alloc in ended {
            if printed.insert(alloc.id.clone()) {
                let code = alloc.exit_code.unwrap_or_default();
                println!(
                    "job {name}: attempt {} ({}) exited with status {code}",
                    printed.len(),
                    short(&alloc.id)
                );
            }
        }
        match status.job_state.as_str() {
            "succeeded" => {
                println!("job {name} succeeded");
                return Ok(0);
            }
            "failed" => {
                println!("job {name} failed: {}", summary(&status));
                // A deadline may fail a job whose attempt never ended.
                return Ok(status.job_exit_code.filter(|c| *c != 0).unwrap_or(1));
            }
            _ => tokio::time::sleep(WAIT_POLL).await,
        }
    }
}

/// The CLI's exit status for a job's: a shell's 0..=255, else 255.
fn exit_status(code: i32) -> u8 {
    u8::try_from(code).unwrap_or(255)
}

fn short(id: &str) -> &str {
    id.get(..8).unwrap_or(id)
}

fn is_job(status: &pb::ServiceStatus) -> bool {
    status.spec.as_ref().is_some_and(|s| s.mode == "job")
}

/// The job `name`; an error naming it if there is none (or a service).
async fn get_job(
    client: &mut crate::client::Client,
    name: &str,
) -> anyhow::Result<pb::ServiceStatus> {
    let status = service::get(client, name).await.map_err(|e| {
        if e.to_string().contains("not found") {
            anyhow!("job {name} not found; see `skiff job ls`")
        } else {
            e
        }
    })?;
    if !is_job(&status) {
        return Err(anyhow!(
            "job {name} not found: {name} is a service; see `skiff service ps {name}`"
        ));
    }
    Ok(status)
}

/// "succeeded after 3 attempts (exit status 0)", "running (1 attempt ended)".
fn summary(status: &pb::ServiceStatus) -> String {
    let spec = status.spec.clone().unwrap_or_default();
    let code = status
        .job_exit_code
        .map(|c| format!(", last exit status {c}"))
        .unwrap_or_default();
    // Why it ended, from its job-succeeded or job-failed event (the
    // status has no room for it).
    let why = status
        .events
        .iter()
        .rev()
        .find(|e| e.kind == "job-failed" || e.kind == "job-succeeded")
        .map(|e| format!(": {}", e.message))
        .unwrap_or_default();
    format!(
        "{}, {} of {} attempts ended{code}{why}",
        status.job_state,
        status.job_attempts,
        spec.max_retries + 1
    )
}

const LS_HEADERS: [&str; 5] = ["NAME", "STATE", "ATTEMPTS", "EXIT", "IMAGE/COMMAND"];

fn ls_rows(jobs: &[pb::ServiceStatus]) -> Vec<Vec<String>> {
    jobs.iter()
        .map(|s| {
            let spec = s.spec.clone().unwrap_or_default();
            let what = if spec.image.is_empty() {
                spec.command.join(" ")
            } else {
                spec.image.clone()
            };
            vec![
                spec.name.clone(),
                s.job_state.clone(),
                format!("{}/{}", s.job_attempts, spec.max_retries + 1),
                s.job_exit_code.map(|c| c.to_string()).unwrap_or_default(),
                what,
            ]
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_statuses_outside_a_shells_range_become_255() {
        assert_eq!(exit_status(3), 3);
        assert_eq!(exit_status(-1), 255);
        assert_eq!(exit_status(300), 255);
    }
}
