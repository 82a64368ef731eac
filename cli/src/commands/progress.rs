//! Following new services until they serve: `service create` and
//! `stack deploy` wait, like `update`, until every replica is healthy (or
//! running, for a service without a health check), and fail with the reason
//! when an image cannot be pulled, a replica keeps failing, replicas cannot
//! be placed, or the healthy deadline passes.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use anyhow::bail;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use skiff_proto::v1 as pb;

use crate::args::OutputFormat;
use crate::client::Client;

/// How long replicas may stay unplaceable before the wait gives up (the
/// scheduler keeps trying; the service is not removed).
const UNPLACED_GRACE: Duration = Duration::from_secs(10);

/// Restarts of one replica that count as "keeps failing".
const FAILING_RESTARTS: u32 = 3;

/// Where one service stands.
#[derive(Debug, PartialEq, Eq)]
enum Standing {
    /// `ready` of `desired` serve; more to come.
    Progressing {
        ready: u32,
        desired: u32,
        note: String,
    },
    /// Waiting for its `depends_on` (its deadline has not started).
    Held(String),
    Done {
        ready: u32,
    },
    Failed(String),
}

/// Replicas of the current version that serve: healthy, or running when
/// the service has no health check of its own.
fn ready_replicas(status: &pb::ServiceStatus) -> u32 {
    // The servers' judgement (`serving_since_ms`), not the spec's: a
    // replica whose image declares a health check (HEALTHCHECK) serves only
    // once healthy, although the spec has none.
    let ready = status
        .allocations
        .iter()
        .filter(|a| a.desired == "run" && a.version == status.version)
        .filter(|a| a.serving_since_ms > 0)
        .count();
    u32::try_from(ready).unwrap_or(u32::MAX)
}

/// Where `status` stands, `unplaced_for` being how long its replicas have
/// been unplaceable.
fn standing(status: &pb::ServiceStatus, unplaced_for: Duration) -> Standing {
    if let Some(d) = &status.deployment {
        if d.version == status.version {
            match d.status.as_str() {
                "failed" | "rolled-back" | "superseded" => {
                    return Standing::Failed(format!(
                        "version {} {}: {}",
                        d.version, d.status, d.message
                    ))
                }
                "awaiting-promotion" => {
                    return Standing::Done {
                        ready: d.new_healthy,
                    }
                }
                _ => {}
            }
        }
    }
    let current = status
        .allocations
        .iter()
        .filter(|a| a.desired == "run" && a.version == status.version);
    for alloc in current {
        if alloc.state == "failed" || alloc.restarts >= FAILING_RESTARTS {
            return Standing::Failed(format!(
                "replica {} on {} {}: {}",
                alloc.id, alloc.node, alloc.state, alloc.message
            ));
        }
    }
    if let Some(problem) = port_problem(status) {
        return Standing::Failed(problem);
    }
    let reason = &status.unplaced_reason;
    if reason.starts_with("waiting for") {
        return Standing::Held(reason.clone());
    }
    if !reason.is_empty() && unplaced_for >= UNPLACED_GRACE {
        return Standing::Failed(reason.clone());
    }
    let ready = ready_replicas(status);
    let active = status
        .deployment
        .as_ref()
        .is_some_and(|d| d.version == status.version && d.status != "succeeded");
    if ready >= status.desired && !active {
        return Standing::Done { ready };
    }
    Standing::Progressing {
        ready,
        desired: status.desired,
        note: reason.clone(),
    }
}

/// The nodes whose routing proxy cannot listen on the service's published
/// port, as one message with the fix; `None` when every node serves it.
pub fn port_problem(status: &pb::ServiceStatus) -> Option<String> {
    let first = status.port_failures.first()?;
    let name = status.spec.as_ref().map_or("", |s| s.name.as_str());
    let nodes: Vec<String> = status
        .port_failures
        .iter()
        .map(|f| format!("{} ({})", f.node, f.error))
        .collect();
    Some(format!(
        "published port {} cannot be served on {}; free the port there or publish another (`skiff service update {name} --publish PORT`); the proxy keeps retrying",
        first.port,
        nodes.join(", ")
    ))
}

/// The problem if some node cannot listen on the service's published port,
/// waiting up to `settle` for the proxies' reports (they bind as soon as the
/// service is known to them): a caller that returns at once gives them a
/// moment; one that already waited for the replicas to serve, none.
pub async fn published_port_problem(
    client: &mut Client,
    name: &str,
    settle: Duration,
) -> anyhow::Result<Option<String>> {
    let started = Instant::now();
    loop {
        let status = super::service::get(client, name).await?;
        let published = status.spec.as_ref().is_some_and(|s| s.publish != 0);
        if let Some(problem) = port_problem(&status) {
            return Ok(Some(problem));
        }
        if !published || started.elapsed() >= settle {
            return Ok(None);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// How long a command that returns at once waits for port reports.
pub const PORT_SETTLE: Duration = Duration::from_secs(1);

/// The live display of `update` and `create`: bars on an interactive
/// stderr in table format (else hidden, and callers print lines), each bar
/// `prefix [=====>   ] pos/len message` with the prefix `width` wide.
pub struct Bars {
    pub interactive: bool,
    pub multi: MultiProgress,
    style: ProgressStyle,
}

impl Bars {
    pub fn new(format: OutputFormat, width: usize) -> Bars {
        let interactive = format == OutputFormat::Table && std::io::stderr().is_terminal();
        let multi = MultiProgress::with_draw_target(if interactive {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        });
        let template = format!("{{prefix:>{width}}} [{{bar:30}}] {{pos}}/{{len}} {{msg}}");
        let style = ProgressStyle::with_template(&template)
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
        Bars {
            interactive,
            multi,
            style,
        }
    }

    pub fn bar(&self, prefix: &str) -> ProgressBar {
        let bar = self.multi.add(ProgressBar::new(0));
        bar.set_style(self.style.clone());
        bar.set_prefix(prefix.to_string());
        bar
    }
}

/// The healthy deadline of a service's update policy (default 60 s).
fn healthy_deadline(status: &pb::ServiceStatus) -> Duration {
    let ms = status
        .spec
        .as_ref()
        .and_then(|s| s.update.as_ref())
        .map_or(0, |u| u.healthy_deadline_ms);
    Duration::from_millis(if ms == 0 { 60_000 } else { u64::from(ms) })
}

/// Follows `services` until each serves with all its replicas; an error
/// names the first that failed and why.
pub async fn wait_until_serving(
    client: &mut Client,
    format: OutputFormat,
    services: &[String],
) -> anyhow::Result<()> {
    let display = Bars::new(format, 16);
    let (interactive, bars) = (display.interactive, &display.multi);
    let bar_of: BTreeMap<String, ProgressBar> = services
        .iter()
        .map(|name| (name.clone(), display.bar(name)))
        .collect();
    let mut started_at: BTreeMap<String, Instant> = BTreeMap::new();
    let mut unplaced_since: BTreeMap<String, Instant> = BTreeMap::new();
    let mut last_line: BTreeMap<String, String> = BTreeMap::new();
    let mut done: BTreeMap<String, u32> = BTreeMap::new();
    // Bounded: every service fails by its own deadline.
    loop {
        for name in services {
            if done.contains_key(name) {
                continue;
            }
            let status = super::service::get(client, name).await?;
            let unplaced_for = if status.unplaced_reason.is_empty()
                || status.unplaced_reason.starts_with("waiting for")
            {
                unplaced_since.remove(name);
                Duration::ZERO
            } else {
                unplaced_since
                    .entry(name.clone())
                    .or_insert_with(Instant::now)
                    .elapsed()
            };
            let standing = standing(&status, unplaced_for);
            let line = match &standing {
                Standing::Held(why) => why.clone(),
                Standing::Progressing {
                    ready,
                    desired,
                    note,
                } => {
                    let since = *started_at.entry(name.clone()).or_insert_with(Instant::now);
                    let deadline = healthy_deadline(&status);
                    if since.elapsed() > deadline {
                        bars.clear().ok();
                        bail!(
                            "service {name}: {ready} of {desired} replicas serve after the healthy deadline ({} s){}; see `skiff service ps {name}`",
                            deadline.as_secs(),
                            if note.is_empty() { String::new() } else { format!(": {note}") }
                        );
                    }
                    format!(
                        "{ready}/{desired} serving{}",
                        if note.is_empty() {
                            String::new()
                        } else {
                            format!(" ({note})")
                        }
                    )
                }
                Standing::Done { ready } => {
                    done.insert(name.clone(), *ready);
                    format!("{ready}/{} serving", status.desired)
                }
                Standing::Failed(why) => {
                    bars.clear().ok();
                    bail!("service {name}: {why}");
                }
            };
            if let Some(bar) = bar_of.get(name) {
                bar.set_length(u64::from(status.desired));
                bar.set_position(u64::from(ready_replicas(&status).min(status.desired)));
                bar.set_message(line.clone());
            }
            if !interactive && last_line.get(name) != Some(&line) {
                eprintln!("{name}: {line}");
            }
            last_line.insert(name.clone(), line);
        }
        if done.len() == services.len() {
            bars.clear().ok();
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alloc(state: &str, restarts: u32) -> pb::Allocation {
        pb::Allocation {
            id: "a1".into(),
            node: "n1".into(),
            desired: "run".into(),
            state: state.into(),
            restarts,
            version: 1,
            message: "failed to pull 127.0.0.1:5000/x:v1: manifest unknown".into(),
            ..Default::default()
        }
    }

    fn status(allocs: Vec<pb::Allocation>, desired: u32) -> pb::ServiceStatus {
        pb::ServiceStatus {
            spec: Some(pb::ServiceSpec::default()),
            version: 1,
            desired,
            allocations: allocs,
            ..Default::default()
        }
    }

    #[test]
    fn a_node_that_cannot_listen_on_the_published_port_fails_the_wait() {
        let mut s = status(vec![alloc("healthy", 0)], 1);
        s.port_failures = vec![pb::PortFailure {
            service: "web".into(),
            port: 18090,
            error: "cannot listen on 127.0.0.3:18090: Address in use".into(),
            node: "n2".into(),
        }];
        match standing(&s, Duration::ZERO) {
            Standing::Failed(why) => {
                assert!(why.contains("published port 18090"), "{why}");
                assert!(
                    why.contains("n2 (cannot listen on 127.0.0.3:18090"),
                    "{why}"
                );
            }
            other => panic!("{other:?}"),
        }
    }

    /// `alloc`, counted as serving by the servers.
    fn serving(mut alloc: pb::Allocation) -> pb::Allocation {
        alloc.serving_since_ms = 1_000;
        alloc
    }

    #[test]
    fn a_service_serves_when_the_servers_count_every_replica_serving() {
        let s = status(
            vec![serving(alloc("running", 0)), serving(alloc("healthy", 0))],
            2,
        );
        assert_eq!(standing(&s, Duration::ZERO), Standing::Done { ready: 2 });
        let s = status(vec![serving(alloc("running", 0)), alloc("pulling", 0)], 2);
        assert!(matches!(
            standing(&s, Duration::ZERO),
            Standing::Progressing { ready: 1, .. }
        ));
    }

    /// A replica whose spec or image has a health check runs before it is
    /// healthy; the servers do not count it as serving until then, and the
    /// wait does not either (it once returned while `ps` said "running").
    #[test]
    fn a_running_replica_the_servers_do_not_count_as_serving_is_waited_for() {
        let s = status(vec![alloc("running", 0)], 1);
        assert!(matches!(
            standing(&s, Duration::ZERO),
            Standing::Progressing { ready: 0, .. }
        ));
    }

    #[test]
    fn a_failed_or_crash_looping_replica_fails_the_wait_with_its_message() {
        let s = status(vec![alloc("failed", 0)], 1);
        let Standing::Failed(why) = standing(&s, Duration::ZERO) else {
            panic!("not failed");
        };
        assert!(why.contains("manifest unknown"), "{why}");
        let s = status(vec![alloc("restarting", 3)], 1);
        assert!(matches!(standing(&s, Duration::ZERO), Standing::Failed(_)));
    }

    #[test]
    fn unplaceable_replicas_fail_the_wait_after_a_grace_and_dependencies_hold_it() {
        let mut s = status(vec![], 2);
        s.unplaced_reason = "2 unplaced: 1 node filtered by constraint zone==b".into();
        assert!(matches!(
            standing(&s, Duration::ZERO),
            Standing::Progressing { .. }
        ));
        assert!(matches!(standing(&s, UNPLACED_GRACE), Standing::Failed(_)));
        s.unplaced_reason =
            "waiting for app-db to be healthy before the first start (depends_on)".into();
        assert!(matches!(standing(&s, UNPLACED_GRACE), Standing::Held(_)));
    }
}
