//! Compose's `deploy` section (Swarm's vocabulary) onto the spec: replicas
//! and mode, resource limits, the update policy, placement, labels, and a
//! job's retries (`mode: replicated-job` with `restart_policy`).

use std::collections::BTreeMap;

use super::error::StackError;
use super::node::{check_keys, join, Node};
use super::units;
use super::Context;
use crate::{Constraint, ServiceMode, ServiceSpec, MAX_REPLICAS};

const DEPLOY_KEYS: &[&str] = &[
    "mode",
    "replicas",
    "resources",
    "update_config",
    "rollback_config",
    "placement",
    "labels",
    "restart_policy",
    "endpoint_mode",
];
const RESOURCES_KEYS: &[&str] = &["limits", "reservations"];
const LIMITS_KEYS: &[&str] = &["cpus", "memory", "pids"];
const UPDATE_KEYS: &[&str] = &[
    "parallelism",
    "delay",
    "failure_action",
    "monitor",
    "max_failure_ratio",
    "order",
];
const PLACEMENT_KEYS: &[&str] = &["constraints", "preferences", "max_replicas_per_node"];
const RESTART_KEYS: &[&str] = &["condition", "delay", "max_attempts", "window"];

/// What `deploy.restart_policy` asks for, applied once the mode is known:
/// a job's retries; a service always restarts its replicas.
#[derive(Default)]
struct RestartPolicy {
    /// Where it was written, for the warning when it is ignored.
    path: String,
    /// `condition: none`.
    never: bool,
    max_attempts: Option<u32>,
}

/// Swarm's `update_config.order`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Order {
    StartFirst,
    StopFirst,
}

/// What `deploy.update_config` asks for, applied once replicas are known.
#[derive(Default)]
struct UpdateConfig {
    parallelism: Option<u32>,
    auto_rollback: Option<bool>,
    monitor_ms: Option<u32>,
    order: Option<Order>,
}

/// Reads `deploy` into `spec`; `labels` are the deploy labels, which the
/// caller merges under the service's own.
pub(crate) fn read(
    node: Node,
    spec: &mut ServiceSpec,
    labels: &mut BTreeMap<String, String>,
    context: &mut Context,
) -> Result<(), StackError> {
    let entries = node.entries()?;
    check_keys(&entries, node.path, DEPLOY_KEYS)?;
    let mut update = UpdateConfig::default();
    let mut restart = None;
    let mut replicas = None;
    for (key, value) in &entries {
        let path = join(node.path, key);
        let n = Node::new(value, &path);
        match key.as_str() {
            "mode" => {
                spec.mode = match n.string()?.as_str() {
                    "replicated" => ServiceMode::Replicated,
                    "global" => ServiceMode::Global,
                    "replicated-job" => ServiceMode::Job,
                    "global-job" => return Err(StackError::unsupported(
                        &path,
                        "global jobs are not supported; use replicated-job (one attempt at a time)",
                    )),
                    other => {
                        return Err(n.invalid(format!(
                            "unknown mode \"{other}\"; use replicated, global or replicated-job"
                        )))
                    }
                }
            }
            "replicas" => {
                spec.replicas = n.u32()?;
                replicas = Some(path.clone());
            }
            "resources" => read_resources(n, spec, context)?,
            "update_config" => update = read_update(n, context)?,
            "rollback_config" => context.warn(
                &path,
                "ignored: Skiff rolls back with the update policy (update_config)",
            ),
            "placement" => read_placement(n, spec, context)?,
            "labels" => {
                for (k, v) in n.string_map()? {
                    labels.insert(k, v.unwrap_or_default());
                }
            }
            "restart_policy" => restart = Some(read_restart_policy(n, context)?),
            "endpoint_mode" => context.warn(
                &path,
                "ignored: services reach each other through the routing proxy",
            ),
            _ => {}
        }
    }
    apply_update(&update, spec);
    if spec.mode == ServiceMode::Job {
        if let Some(path) = replicas.filter(|_| spec.replicas != 1) {
            return Err(StackError::invalid(
                &path,
                "a job runs one attempt at a time; use replicas: 1 or remove it",
            ));
        }
        if let Some(restart) = restart {
            spec.max_retries = if restart.never {
                0
            } else {
                restart.max_attempts.unwrap_or(0)
            };
        }
    } else if let Some(restart) = restart {
        context.warn(
            &restart.path,
            "ignored: a service's replicas are always restarted; restart_policy applies to jobs (mode: replicated-job)",
        );
    }
    Ok(())
}

/// `deploy.restart_policy`, Swarm's: for a job, `max_attempts` is its
/// retries (`job run --max-retries`) and `condition: none` allows none;
/// `delay` and `window` are Skiff's own (1 s doubling up to 30 s).
fn read_restart_policy(node: Node, context: &mut Context) -> Result<RestartPolicy, StackError> {
    let entries = node.entries()?;
    check_keys(&entries, node.path, RESTART_KEYS)?;
    let mut policy = RestartPolicy {
        path: node.path.to_string(),
        ..RestartPolicy::default()
    };
    for (key, value) in &entries {
        let path = join(node.path, key);
        let n = Node::new(value, &path);
        match key.as_str() {
            "condition" => match n.string()?.as_str() {
                "none" => policy.never = true,
                "on-failure" => {}
                "any" => context.warn(
                    &path,
                    "any is taken as on-failure: a job that succeeded is done",
                ),
                other => {
                    return Err(n.invalid(format!(
                        "unknown condition \"{other}\"; use none, on-failure or any"
                    )))
                }
            },
            "max_attempts" => {
                let attempts = n.u32()?;
                if attempts > crate::MAX_JOB_RETRIES {
                    return Err(n.invalid(format!(
                        "{attempts} is too many; use 0 to {}",
                        crate::MAX_JOB_RETRIES
                    )));
                }
                policy.max_attempts = Some(attempts);
            }
            "delay" | "window" => context.warn(
                &path,
                "ignored: Skiff retries a job after 1s, doubling up to 30s",
            ),
            _ => {}
        }
    }
    Ok(policy)
}

fn read_resources(
    node: Node,
    spec: &mut ServiceSpec,
    context: &mut Context,
) -> Result<(), StackError> {
    let entries = node.entries()?;
    check_keys(&entries, node.path, RESOURCES_KEYS)?;
    for (key, value) in &entries {
        let path = join(node.path, key);
        let n = Node::new(value, &path);
        if key == "reservations" {
            context.warn(
                &path,
                "ignored: Skiff reserves what it limits (limits.cpus, limits.memory)",
            );
            continue;
        }
        let limits = n.entries()?;
        check_keys(&limits, &path, LIMITS_KEYS)?;
        for (key, value) in &limits {
            let path = join(&path, key);
            let n = Node::new(value, &path);
            match key.as_str() {
                "cpus" => {
                    spec.cpu_millis =
                        Some(units::parse_cpus(&n.decimal_text()?).map_err(|e| n.invalid(e))?)
                }
                "memory" => {
                    spec.memory_mb =
                        Some(units::parse_memory_mb(&n.string()?).map_err(|e| n.invalid(e))?)
                }
                _ => context.warn(
                    &path,
                    "ignored: Skiff does not limit processes per container",
                ),
            }
        }
    }
    Ok(())
}

fn read_update(node: Node, context: &mut Context) -> Result<UpdateConfig, StackError> {
    let entries = node.entries()?;
    check_keys(&entries, node.path, UPDATE_KEYS)?;
    let mut update = UpdateConfig::default();
    for (key, value) in &entries {
        let path = join(node.path, key);
        let n = Node::new(value, &path);
        match key.as_str() {
            "parallelism" => update.parallelism = Some(n.u32()?),
            "delay" => context.warn(
                &path,
                "ignored: Skiff starts the next batch once the last one is healthy (see monitor)",
            ),
            "failure_action" => {
                update.auto_rollback = Some(match n.string()?.as_str() {
                    "rollback" => true,
                    "pause" | "continue" => false,
                    other => {
                        return Err(n.invalid(format!(
                            "unknown failure_action \"{other}\"; use rollback, pause or continue"
                        )))
                    }
                })
            }
            "monitor" => update.monitor_ms = Some(n.duration_ms()?),
            "max_failure_ratio" => context.warn(
                &path,
                "ignored: a Skiff update fails when a new replica misses its healthy deadline",
            ),
            "order" => {
                update.order = Some(match n.string()?.as_str() {
                    "start-first" => Order::StartFirst,
                    "stop-first" => Order::StopFirst,
                    other => {
                        return Err(n.invalid(format!(
                            "unknown order \"{other}\"; use start-first or stop-first"
                        )))
                    }
                })
            }
            _ => {}
        }
    }
    Ok(update)
}

/// Swarm's parallelism 0 means "all at once": every replica, or the most a
/// service can have when the count is not fixed.
fn apply_update(update: &UpdateConfig, spec: &mut ServiceSpec) {
    let parallelism = update.parallelism.map(|p| match p {
        0 if spec.mode == ServiceMode::Replicated && spec.replicas > 0 => spec.replicas,
        0 => MAX_REPLICAS,
        p => p,
    });
    if let Some(p) = parallelism {
        spec.update.max_parallel = p;
    }
    if let Some(rollback) = update.auto_rollback {
        spec.update.auto_rollback = rollback;
    }
    if let Some(ms) = update.monitor_ms {
        spec.update.min_healthy_ms = ms;
    }
    let batch = parallelism.unwrap_or(1);
    match update.order {
        Some(Order::StartFirst) => {
            spec.update.max_surge = batch;
            spec.update.max_unavailable = 0;
        }
        Some(Order::StopFirst) => {
            spec.update.max_surge = 0;
            spec.update.max_unavailable = batch;
        }
        None => {}
    }
}

fn read_placement(
    node: Node,
    spec: &mut ServiceSpec,
    context: &mut Context,
) -> Result<(), StackError> {
    let entries = node.entries()?;
    check_keys(&entries, node.path, PLACEMENT_KEYS)?;
    for (key, value) in &entries {
        let path = join(node.path, key);
        let n = Node::new(value, &path);
        match key.as_str() {
            "constraints" => {
                for (i, text) in n.string_list()?.iter().enumerate() {
                    let item = format!("{path}[{i}]");
                    spec.constraints
                        .push(constraint(text).map_err(|e| StackError::invalid(&item, e))?);
                }
            }
            "preferences" => context.warn(
                &path,
                "ignored: Skiff spreads replicas over nodes and zones (the zone label) by itself",
            ),
            "max_replicas_per_node" => spec.max_per_node = Some(n.u32()?),
            _ => {}
        }
    }
    Ok(())
}

/// `node.labels.zone==a` → `zone==a`, `node.hostname==n1` →
/// `node.name==n1`; other node attributes are refused by name.
fn constraint(text: &str) -> Result<Constraint, String> {
    let (attribute, op, value) = match (text.split_once("=="), text.split_once("!=")) {
        (Some((a, v)), _) => (a.trim(), "==", v.trim()),
        (None, Some((a, v))) => (a.trim(), "!=", v.trim()),
        _ => {
            return Err(format!(
                "\"{text}\" is not a constraint; use node.labels.KEY==VALUE or node.hostname==NAME"
            ))
        }
    };
    let attribute = if let Some(label) = attribute.strip_prefix("node.labels.") {
        label
    } else if attribute == "node.hostname" {
        "node.name"
    } else {
        return Err(format!(
            "{attribute} is not a node attribute Skiff knows; constrain on node labels (node.labels.KEY==VALUE) or node.hostname"
        ));
    };
    Constraint::parse(&format!("{attribute}{op}{value}")).map_err(|e| e.problem)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swarm_constraints_become_skiff_constraints() {
        assert_eq!(
            constraint("node.labels.zone == a").unwrap().to_string(),
            "zone==a"
        );
        assert_eq!(
            constraint("node.labels.disk!=hdd").unwrap().to_string(),
            "disk!=hdd"
        );
        assert_eq!(
            constraint("node.hostname==n1").unwrap().to_string(),
            "node.name==n1"
        );
        assert!(constraint("node.role==manager")
            .unwrap_err()
            .contains("node.role"));
        assert!(constraint("node.platform.os==linux")
            .unwrap_err()
            .contains("node.platform.os"));
        assert!(constraint("zone").is_err());
    }
}
