//! Compose files onto Skiff's services: the subset of the Compose
//! Specification Skiff can run, warnings for what it ignores, and errors
//! with the fix for what it cannot honour. Volumes and secrets are parsed
//! into the typed forms below, then into the spec's mounts and secret
//! references; a secret declared with `file:` is returned for the CLI to
//! create before the deploy.

use std::collections::BTreeMap;
use std::path::Path;

use serde_yaml::{Mapping, Value};

use super::error::StackError;
use super::node::{check_keys, join, Node};
use super::suggest::nearest;
use super::{compose_deploy, compose_ports, dotenv, units, Context, ReadService};
use crate::{
    Dependency, DependsCondition, HealthCheck, HealthKind, NetworkMode, RuntimeKind, ServiceSpec,
};

/// A service's volume mount, as Compose writes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeMount {
    pub kind: VolumeKind,
    /// Volume name or host path; `None` for an anonymous volume or tmpfs.
    pub source: Option<String>,
    pub target: String,
    pub read_only: bool,
    /// `volume: {nocopy: true}`, or `:nocopy` in the short syntax.
    pub nocopy: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VolumeKind {
    Volume,
    Bind,
    Tmpfs,
}

/// A secret a service uses (`source` at `/run/secrets/<target>`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretRef {
    pub source: String,
    pub target: Option<String>,
    /// `mode:` in octal notation (`0440`); `None`: 0400.
    pub mode: Option<u32>,
}

/// A top-level `volumes:` or `secrets:` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Definition {
    pub name: String,
    pub external: bool,
    /// A secret's `file:` or `environment:`, a volume's `driver:`.
    pub source: Option<String>,
}

const TOP_KEYS: &[&str] = &[
    "services", "volumes", "secrets", "name", "version", "networks",
];

/// The keys of a Compose service Skiff reads.
const SERVICE_KEYS: &[&str] = &[
    "image",
    "command",
    "entrypoint",
    "environment",
    "env_file",
    "ports",
    "expose",
    "healthcheck",
    "depends_on",
    "deploy",
    "user",
    "working_dir",
    "init",
    "network_mode",
    "networks",
    "labels",
    "hostname",
    "container_name",
    "restart",
    "stop_grace_period",
    "stop_signal",
    "logging",
    "tty",
    "stdin_open",
    "profiles",
    "volumes",
    "secrets",
    "cpus",
    "mem_limit",
    "scale",
    super::yaml::SKIFF_EXTENSION,
];

/// The keys of a service's `x-skiff`: what Skiff runs that Compose has no
/// key for.
const SKIFF_EXTENSION_KEYS: &[&str] = &["deadline"];

/// The Compose Specification's other service keys, refused by name.
const OTHER_COMPOSE_KEYS: &[&str] = &[
    "annotations",
    "attach",
    "blkio_config",
    "build",
    "cap_add",
    "cap_drop",
    "cgroup",
    "cgroup_parent",
    "configs",
    "cpu_count",
    "cpu_percent",
    "cpu_period",
    "cpu_quota",
    "cpu_rt_period",
    "cpu_rt_runtime",
    "cpu_shares",
    "cpuset",
    "credential_spec",
    "develop",
    "device_cgroup_rules",
    "devices",
    "dns",
    "dns_opt",
    "dns_search",
    "domainname",
    "extends",
    "external_links",
    "extra_hosts",
    "gpus",
    "group_add",
    "ipc",
    "isolation",
    "label_file",
    "links",
    "mac_address",
    "mem_reservation",
    "mem_swappiness",
    "memswap_limit",
    "oom_kill_disable",
    "oom_score_adj",
    "pid",
    "pids_limit",
    "platform",
    "post_start",
    "pre_stop",
    "privileged",
    "pull_policy",
    "read_only",
    "runtime",
    "security_opt",
    "shm_size",
    "storage_opt",
    "sysctls",
    "tmpfs",
    "ulimits",
    "userns_mode",
    "uts",
    "volumes_from",
];

const HEALTH_KEYS: &[&str] = &[
    "test",
    "interval",
    "timeout",
    "retries",
    "start_period",
    "start_interval",
    "disable",
];

/// Why a Compose key Skiff does not read is refused, with the fix.
fn refusal(key: &str) -> String {
    match key {
        "build" => {
            "Skiff runs images: build and push the image, then name it in image:".to_string()
        }
        "privileged" | "cap_add" | "cap_drop" | "devices" | "pid" | "ipc" | "userns_mode" => {
            format!("Skiff runs containers with Docker's default hardening; {key} is not supported")
        }
        "links" | "external_links" => "services find each other by name; drop links".to_string(),
        "extends" => "extends is not supported; merge files with several -f instead".to_string(),
        _ => format!("{key} is not supported by Skiff; remove it"),
    }
}

/// The services of a merged Compose file.
pub(crate) fn read(top: &Mapping, context: &mut Context) -> Result<Vec<ReadService>, StackError> {
    let mut definitions = Vec::new();
    for (key, value) in top {
        let key = super::node::key_text(key);
        let n = Node::new(value, &key);
        match key.as_str() {
            "services" => {}
            "version" => context.warn(&key, "obsolete: Compose files need no version; remove it"),
            "name" => {
                let name = n.string()?;
                if let Some(stack) = context.stack.filter(|s| *s != name) {
                    context.warn(
                        &key,
                        format!("the file names the project {name}, but the stack is {stack}; the stack's name is used"),
                    );
                }
            }
            "networks" => read_networks(n, context)?,
            "volumes" | "secrets" => {
                if !n.is_null() && !n.entries()?.is_empty() {
                    definitions.push((key.clone(), read_definitions(n)?));
                }
            }
            "configs" => {
                return Err(StackError::unsupported(
                    &key,
                    "configs are not supported; pass settings as environment variables or bake them into the image",
                ))
            }
            "include" => {
                return Err(StackError::unsupported(
                    &key,
                    "include is not supported; give the files with several -f instead",
                ))
            }
            other => {
                return Err(StackError::unknown_key(
                    other,
                    nearest(other, TOP_KEYS).map(str::to_string),
                ))
            }
        }
    }
    let Some(services) = top.get("services") else {
        return Err(StackError::invalid(
            "services",
            "the file has no services:; add one",
        ));
    };
    let mut out = Vec::new();
    for (name, value) in Node::new(services, "services").entries()? {
        let path = join("services", &name);
        out.push(read_service(name, Node::new(&value, &path), context)?);
    }
    let mut declared = Vec::new();
    let mut secrets = Vec::new();
    for (key, defined) in &definitions {
        if key == "secrets" {
            secrets = defined.clone();
            continue;
        }
        for definition in defined {
            if let Some(driver) = definition.source.as_deref().filter(|d| *d != "local") {
                return Err(StackError::unsupported(
                    join(key, &definition.name),
                    format!("volume driver {driver} is not supported; Skiff keeps volumes on the node's disk (driver: local)"),
                ));
            }
            declared.push(definition.name.clone());
        }
    }
    for service in &mut out {
        name_volumes(service, &declared, context.stack)?;
        name_secrets(service, &secrets, context.stack)?;
    }
    for secret in secrets.iter().filter(|s| !s.external) {
        let path = join("secrets", &secret.name);
        let Some(file) = &secret.source else {
            return Err(StackError::unsupported(
                &path,
                "only file: and external: secrets are supported; give file: PATH (read by the CLI when it deploys)",
            ));
        };
        context.secrets.push(super::StackSecret {
            name: stack_secret_name(context.stack, &secret.name),
            file: context.base_dir.join(file),
        });
    }
    Ok(out)
}

/// A stack's own secret `NAME` is `STACK-NAME` in the cluster, as Swarm
/// scopes a stack's secrets; an `external: true` one keeps its name.
fn stack_secret_name(stack: Option<&str>, name: &str) -> String {
    match stack {
        Some(stack) => format!("{stack}-{name}"),
        None => name.to_string(),
    }
}

/// Checks that each secret of a service is declared under the top-level
/// `secrets:` and names it as the cluster knows it; the file keeps the
/// declared name (`/run/secrets/db_password`), as in Compose.
fn name_secrets(
    service: &mut ReadService,
    declared: &[Definition],
    stack: Option<&str>,
) -> Result<(), StackError> {
    for (i, secret) in service.spec.secrets.iter_mut().enumerate() {
        let path = format!("services.{}.secrets[{i}]", service.name);
        let Some(definition) = declared.iter().find(|d| d.name == secret.name) else {
            return Err(StackError::invalid(
                path,
                format!(
                    "secret {0} is not declared; add it under the top-level secrets: ({0}: {{file: ./{0}.txt}})",
                    secret.name
                ),
            ));
        };
        if secret.target.is_empty() {
            secret.target = secret.name.clone();
        }
        if !definition.external {
            secret.name = stack_secret_name(stack, &secret.name);
        }
        secret
            .validate()
            .map_err(|e| StackError::invalid(&path, e.problem))?;
    }
    Ok(())
}

/// Checks that each named volume of a service is declared under the
/// top-level `volumes:` (as Compose does) and gives it the stack's prefix
/// (`app-data` for `data` in stack `app`), as Compose scopes volumes to
/// their project.
fn name_volumes(
    service: &mut ReadService,
    declared: &[String],
    stack: Option<&str>,
) -> Result<(), StackError> {
    for (i, mount) in service.spec.volumes.iter_mut().enumerate() {
        if mount.kind != crate::MountKind::Volume {
            continue;
        }
        if !declared.contains(&mount.source) {
            return Err(StackError::invalid(
                format!("services.{}.volumes[{i}]", service.name),
                format!(
                    "volume {} is not declared; add it under the top-level volumes: ({}: {{}})",
                    mount.source, mount.source
                ),
            ));
        }
        if let Some(stack) = stack {
            mount.source = format!("{stack}-{}", mount.source);
        }
        mount.validate().map_err(|e| {
            StackError::invalid(format!("services.{}.volumes[{i}]", service.name), e.problem)
        })?;
    }
    Ok(())
}

fn read_networks(node: Node, context: &mut Context) -> Result<(), StackError> {
    let names: Vec<String> = match node.value {
        Value::Sequence(_) => node.string_list()?,
        _ => node.entries()?.into_iter().map(|(k, _)| k).collect(),
    };
    if names.iter().all(|n| n == "default") {
        context.warn(node.path, "ignored: every Skiff service shares one network");
    } else {
        context.warn(
            node.path,
            format!(
                "networks {} are not created: every Skiff service shares one network and reaches the others by name",
                names.join(", ")
            ),
        );
    }
    Ok(())
}

fn read_definitions(node: Node) -> Result<Vec<Definition>, StackError> {
    let mut out = Vec::new();
    for (name, value) in node.entries()? {
        let path = join(node.path, &name);
        let n = Node::new(&value, &path);
        let mut definition = Definition {
            name,
            external: false,
            source: None,
        };
        for (key, value) in n.entries()? {
            let path = join(&path, &key);
            let v = Node::new(&value, &path);
            match key.as_str() {
                "external" => definition.external = v.bool()?,
                "file" | "driver" => definition.source = Some(v.string()?),
                "environment" => {
                    return Err(StackError::unsupported(
                        &path,
                        "secrets from environment: are not supported; write the value to a file and give file: PATH",
                    ))
                }
                _ => {}
            }
        }
        out.push(definition);
    }
    Ok(out)
}

fn read_service(
    name: String,
    node: Node,
    context: &mut Context,
) -> Result<ReadService, StackError> {
    let entries = node.entries()?;
    let mut spec = ServiceSpec {
        runtime: RuntimeKind::Oci,
        replicas: 1,
        ..ServiceSpec::default()
    };
    let mut env_files = Vec::new();
    let mut environment = Vec::new();
    let mut labels = BTreeMap::new();
    let mut deploy_labels = BTreeMap::new();
    let mut ports = None;
    let mut expose = None;
    let mut deploy = None;
    let mut extension = None;
    let mut profiles = Vec::new();
    for (key, value) in &entries {
        let path = join(node.path, key);
        let n = Node::new(value, &path);
        match key.as_str() {
            "image" => spec.image = Some(n.string()?),
            "command" => spec.command = n.command()?,
            "entrypoint" => spec.entrypoint = Some(n.command()?),
            "environment" => environment = n.string_map()?,
            "env_file" => env_files = read_env_file_list(n)?,
            "ports" => ports = Some(compose_ports::read_ports(n, context)?),
            "expose" => expose = compose_ports::read_expose(n, context)?,
            "healthcheck" => spec.health = read_healthcheck(n, context)?,
            "depends_on" => spec.depends_on = read_depends_on(n, context)?,
            "deploy" => deploy = Some(value),
            "user" => spec.user = Some(n.string()?),
            "working_dir" => spec.workdir = Some(n.string()?),
            "init" => spec.init = Some(n.bool()?),
            "security_opt" => {
                for option in n.string_list()? {
                    spec.seccomp = read_security_opt(&option, &path, context)?.or(spec.seccomp);
                }
            }
            "network_mode" => {
                spec.network = match n.string()?.as_str() {
                    "host" => NetworkMode::Host,
                    "bridge" => NetworkMode::Bridge,
                    other => {
                        return Err(StackError::unsupported(
                            &path,
                            format!(
                        "network_mode {other} is not supported; use host or bridge, or remove it"
                    ),
                        ))
                    }
                }
            }
            "networks" => read_networks(n, context)?,
            "labels" => {
                for (k, v) in n.string_map()? {
                    labels.insert(k, v.unwrap_or_default());
                }
            }
            "hostname" => {}
            "container_name" => context.warn(
                &path,
                "ignored: Skiff names replicas itself (services reach each other by service name)",
            ),
            "restart" => read_restart(n, context)?,
            "stop_grace_period" | "stop_signal" | "logging" | "tty" | "stdin_open" => {
                context.warn(&path, format!("ignored: Skiff does not use {key} yet"))
            }
            "profiles" => profiles = n.string_list()?,
            "volumes" => spec.volumes = read_volumes(n)?,
            "secrets" => spec.secrets = read_secrets(n)?,
            "cpus" => {
                spec.cpu_millis =
                    Some(units::parse_cpus(&n.decimal_text()?).map_err(|e| n.invalid(e))?)
            }
            "mem_limit" => {
                spec.memory_mb =
                    Some(units::parse_memory_mb(&n.string()?).map_err(|e| n.invalid(e))?)
            }
            "scale" => spec.replicas = n.u32()?,
            super::yaml::SKIFF_EXTENSION => extension = Some(value),
            other if OTHER_COMPOSE_KEYS.contains(&other) => {
                return Err(StackError::unsupported(&path, refusal(other)))
            }
            other => {
                let known: Vec<&str> = SERVICE_KEYS
                    .iter()
                    .chain(OTHER_COMPOSE_KEYS)
                    .copied()
                    .collect();
                return Err(StackError::unknown_key(
                    &path,
                    nearest(other, &known).map(str::to_string),
                ));
            }
        }
    }
    if let Some(value) = deploy {
        let path = join(node.path, "deploy");
        compose_deploy::read(
            Node::new(value, &path),
            &mut spec,
            &mut deploy_labels,
            context,
        )?;
    }
    if let Some(value) = extension {
        let path = join(node.path, super::yaml::SKIFF_EXTENSION);
        read_skiff_extension(Node::new(value, &path), &mut spec)?;
    }
    if spec.image.is_none() {
        return Err(StackError::invalid(
            node.path,
            "has no image; Skiff runs images: build and push one, then name it in image:",
        ));
    }
    if let Some(ports) = ports {
        spec.publish = ports.publish;
        spec.port = ports.port;
        spec.protocol = ports.protocol;
    }
    if spec.port.is_none() {
        spec.port = expose;
    }
    spec.env = read_environment(&env_files, environment, node.path, context)?;
    deploy_labels.extend(labels);
    spec.labels = deploy_labels;
    Ok(ReadService {
        name,
        spec,
        profiles,
    })
}

/// A service's `x-skiff` (read after `deploy`, which sets the mode):
/// `deadline`, a job's, as `job run --deadline`.
fn read_skiff_extension(node: Node, spec: &mut ServiceSpec) -> Result<(), StackError> {
    let entries = node.entries()?;
    check_keys(&entries, node.path, SKIFF_EXTENSION_KEYS)?;
    for (key, value) in &entries {
        let path = join(node.path, key);
        let n = Node::new(value, &path);
        if key == "deadline" {
            if spec.mode != crate::ServiceMode::Job {
                return Err(n.invalid(
                    "a deadline is a job's; add deploy.mode: replicated-job, or remove it",
                ));
            }
            spec.deadline_secs = Some(super::skiff_format::job_deadline_secs(&n)?);
        }
    }
    Ok(())
}

/// `env_file`: a path, or a list of paths or `{path, required}`.
/// One `security_opt` entry: `seccomp=unconfined` (or `:`), `seccomp=FILE`
/// (an OCI `linux.seccomp` object, read relative to the first file), and
/// `no-new-privileges` (always on in Skiff). Others are refused.
fn read_security_opt(
    option: &str,
    path: &str,
    context: &mut Context,
) -> Result<Option<String>, StackError> {
    let (key, value) = option.split_once(['=', ':']).unwrap_or((option, ""));
    match key {
        "no-new-privileges" => Ok(None),
        "seccomp" if value == crate::SECCOMP_UNCONFINED => Ok(Some(value.to_string())),
        "seccomp" if !value.is_empty() => {
            let full = if Path::new(value).is_absolute() {
                Path::new(value).to_path_buf()
            } else {
                context.base_dir.join(value)
            };
            context.fs.read(&full).map(Some).map_err(|e| {
                StackError::invalid(path, format!("cannot read the seccomp profile {}: {e}", full.display()))
            })
        }
        _ => Err(StackError::invalid(
            path,
            format!("security_opt {option} is not supported; Skiff takes seccomp=unconfined, seccomp=FILE and no-new-privileges"),
        )),
    }
}

fn read_env_file_list(node: Node) -> Result<Vec<(String, String, bool)>, StackError> {
    if let Value::String(path) = node.value {
        return Ok(vec![(path.clone(), node.path.to_string(), true)]);
    }
    let mut out = Vec::new();
    for (i, item) in node.items()?.iter().enumerate() {
        let path = format!("{}[{i}]", node.path);
        let n = Node::new(item, &path);
        match item {
            Value::Mapping(_) => {
                let entries = n.entries()?;
                check_keys(&entries, &path, &["path", "required", "format"])?;
                let mut file = None;
                let mut required = true;
                for (key, value) in &entries {
                    let p = join(&path, key);
                    match key.as_str() {
                        "path" => file = Some(Node::new(value, &p).string()?),
                        "required" => required = Node::new(value, &p).bool()?,
                        _ => {}
                    }
                }
                let file = file.ok_or_else(|| n.invalid("has no path; give path: FILE"))?;
                out.push((file, path, required));
            }
            _ => out.push((n.string()?, path, true)),
        }
    }
    Ok(out)
}

/// The environment: `env_file`s in order, then `environment` over them; an
/// entry without a value takes the variable from the command line, shell
/// or `.env`, and is left out when none sets it.
fn read_environment(
    env_files: &[(String, String, bool)],
    environment: Vec<(String, Option<String>)>,
    service_path: &str,
    context: &mut Context,
) -> Result<BTreeMap<String, String>, StackError> {
    let mut env = BTreeMap::new();
    for (file, path, required) in env_files {
        let full = if Path::new(file).is_absolute() {
            Path::new(file).to_path_buf()
        } else {
            context.base_dir.join(file)
        };
        let text = match context.fs.read(&full) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => continue,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StackError::invalid(
                    path,
                    format!(
                        "{} does not exist; create it, or mark it required: false",
                        full.display()
                    ),
                ))
            }
            Err(source) => {
                return Err(StackError::Read {
                    file: full.display().to_string(),
                    source,
                })
            }
        };
        let lookup = |name: &str| context.vars.get(name).map(str::to_string);
        for (key, value) in dotenv::parse(&full.display().to_string(), &text, &lookup)? {
            env.insert(key, value);
        }
    }
    for (key, value) in environment {
        match value.or_else(|| context.vars.get(&key).map(str::to_string)) {
            Some(value) => {
                env.insert(key, value);
            }
            None => {
                env.remove(&key);
                context.warn(
                    join(&join(service_path, "environment"), &key),
                    format!("{key} has no value and no variable sets it; it is left out"),
                );
            }
        }
    }
    Ok(env)
}

fn read_healthcheck(node: Node, context: &mut Context) -> Result<Option<HealthCheck>, StackError> {
    let entries = node.entries()?;
    check_keys(&entries, node.path, HEALTH_KEYS)?;
    let mut check = HealthCheck {
        kind: HealthKind::Tcp,
        interval_ms: 0,
        timeout_ms: 0,
        retries: 0,
        start_period_ms: 0,
    };
    let mut command = None;
    let mut disabled = false;
    for (key, value) in &entries {
        let path = join(node.path, key);
        let n = Node::new(value, &path);
        match key.as_str() {
            "test" => match value {
                Value::String(text) => {
                    command = Some(vec!["/bin/sh".to_string(), "-c".to_string(), text.clone()])
                }
                _ => {
                    let words = n.string_list()?;
                    match words.split_first() {
                        Some((first, rest)) if first == "CMD" => command = Some(rest.to_vec()),
                        Some((first, rest)) if first == "CMD-SHELL" => {
                            command = Some(vec!["/bin/sh".to_string(), "-c".to_string(), rest.join(" ")])
                        }
                        Some((first, _)) if first == "NONE" => disabled = true,
                        _ => {
                            return Err(n.invalid(
                                "a test list starts with CMD, CMD-SHELL or NONE, e.g. [\"CMD\", \"pg_isready\"]",
                            ))
                        }
                    }
                }
            },
            "interval" => check.interval_ms = n.duration_ms()?,
            "timeout" => check.timeout_ms = n.duration_ms()?,
            "retries" => check.retries = n.u32()?,
            "start_period" => check.start_period_ms = n.duration_ms()?,
            "start_interval" => {
                context.warn(&path, "ignored: Skiff checks at interval from the start")
            }
            "disable" => disabled |= n.bool()?,
            _ => {}
        }
    }
    if disabled {
        context.warn(
            node.path,
            "Skiff cannot turn off an image's HEALTHCHECK yet; the image's check (if any) still runs",
        );
        return Ok(None);
    }
    let Some(command) = command else {
        context.warn(
            node.path,
            "has no test, so it is ignored: Skiff cannot change the timing of an image's HEALTHCHECK; give test:",
        );
        return Ok(None);
    };
    check.kind = HealthKind::Exec { command };
    Ok(Some(check))
}

/// A list of names (condition started) or `{name: {condition, required, restart}}`.
fn read_depends_on(node: Node, context: &mut Context) -> Result<Vec<Dependency>, StackError> {
    if let Value::Sequence(_) = node.value {
        return Ok(node
            .string_list()?
            .into_iter()
            .map(|service| Dependency {
                service,
                condition: DependsCondition::Started,
            })
            .collect());
    }
    let mut out = Vec::new();
    for (service, value) in node.entries()? {
        let path = join(node.path, &service);
        let n = Node::new(&value, &path);
        let entries = n.entries()?;
        check_keys(&entries, &path, &["condition", "required", "restart"])?;
        let mut condition = DependsCondition::Started;
        for (key, value) in &entries {
            let p = join(&path, key);
            let v = Node::new(value, &p);
            match key.as_str() {
                "condition" => {
                    condition = DependsCondition::parse(&v.string()?).map_err(|e| v.invalid(e.problem))?
                }
                "required" if !v.bool()? => context.warn(
                    &p,
                    "ignored: Skiff always waits for a dependency; remove the dependency if it is optional",
                ),
                "restart" if v.bool()? => context.warn(
                    &p,
                    "ignored: Skiff does not restart a service when its dependency restarts",
                ),
                _ => {}
            }
        }
        out.push(Dependency { service, condition });
    }
    Ok(out)
}

fn read_restart(node: Node, context: &mut Context) -> Result<(), StackError> {
    let policy = node.string()?;
    match policy.as_str() {
        "always" | "unless-stopped" => Ok(()),
        "no" | "on-failure" => {
            context.warn(
                node.path,
                format!("restart {policy} is not honoured: Skiff restarts a service's replicas that exit; one-shot jobs are deploy.mode: replicated-job (retries: deploy.restart_policy.max_attempts)"),
            );
            Ok(())
        }
        p if p.starts_with("on-failure:") => {
            context.warn(
                node.path,
                format!("restart {p} is not honoured: Skiff restarts a service's replicas that exit; one-shot jobs are deploy.mode: replicated-job (retries: deploy.restart_policy.max_attempts)"),
            );
            Ok(())
        }
        other => Err(node.invalid(format!(
            "unknown restart policy \"{other}\"; use always, unless-stopped, on-failure or \"no\""
        ))),
    }
}

/// Parses `volumes` (`name:/path[:ro]` or `{type, source, target,
/// read_only}`).
pub(crate) fn parse_volumes(node: Node) -> Result<Vec<VolumeMount>, StackError> {
    let mut out = Vec::new();
    for (i, item) in node.items()?.iter().enumerate() {
        let path = format!("{}[{i}]", node.path);
        let n = Node::new(item, &path);
        let mount = match item {
            Value::Mapping(_) => {
                let mut mount = VolumeMount {
                    kind: VolumeKind::Volume,
                    source: None,
                    target: String::new(),
                    read_only: false,
                    nocopy: false,
                };
                for (key, value) in n.entries()? {
                    let p = join(&path, &key);
                    let v = Node::new(&value, &p);
                    match key.as_str() {
                        "type" => {
                            mount.kind = match v.string()?.as_str() {
                                "volume" => VolumeKind::Volume,
                                "bind" => VolumeKind::Bind,
                                "tmpfs" => VolumeKind::Tmpfs,
                                other => {
                                    return Err(v.invalid(format!(
                                        "unknown type \"{other}\"; use volume, bind or tmpfs"
                                    )))
                                }
                            }
                        }
                        "source" => mount.source = Some(v.string()?),
                        "target" => mount.target = v.string()?,
                        "read_only" => mount.read_only = v.bool()?,
                        "volume" => {
                            for (key, value) in v.entries()? {
                                if key == "nocopy" {
                                    mount.nocopy = Node::new(&value, &join(&p, &key)).bool()?;
                                }
                            }
                        }
                        _ => {}
                    }
                }
                mount
            }
            _ => {
                let text = n.string()?;
                let parts: Vec<&str> = text.split(':').collect();
                let (source, target, mode) = match parts.as_slice() {
                    [target] => (None, *target, ""),
                    [source, target] => (Some(*source), *target, ""),
                    [source, target, mode] => (Some(*source), *target, *mode),
                    _ => return Err(n.invalid(format!("\"{text}\" is not SOURCE:TARGET[:ro]"))),
                };
                let kind = match source {
                    Some(s) if s.starts_with(['.', '/', '~']) => VolumeKind::Bind,
                    _ => VolumeKind::Volume,
                };
                VolumeMount {
                    kind,
                    source: source.map(str::to_string),
                    target: target.to_string(),
                    read_only: mode.split(',').any(|m| m == "ro"),
                    nocopy: mode.split(',').any(|m| m == "nocopy"),
                }
            }
        };
        out.push(mount);
    }
    Ok(out)
}

/// A service's `volumes` as mounts: named volumes and absolute binds;
/// relative binds, anonymous volumes and tmpfs are refused with the fix.
fn read_volumes(node: Node) -> Result<Vec<crate::Mount>, StackError> {
    let mounts = parse_volumes(node)?;
    let mut out = Vec::with_capacity(mounts.len());
    for (i, mount) in mounts.into_iter().enumerate() {
        let path = format!("{}[{i}]", node.path);
        let kind = match mount.kind {
            VolumeKind::Volume => crate::MountKind::Volume,
            VolumeKind::Bind => crate::MountKind::Bind,
            VolumeKind::Tmpfs => {
                return Err(StackError::unsupported(
                    path,
                    "tmpfs mounts are not supported; use a named volume",
                ))
            }
        };
        let Some(source) = mount.source else {
            return Err(StackError::unsupported(
                path,
                "anonymous volumes are not supported; name the volume (NAME:/path) and declare it under the top-level volumes:",
            ));
        };
        if kind == crate::MountKind::Bind && !source.starts_with('/') {
            return Err(StackError::unsupported(
                path,
                "a path on the machine running the CLI means nothing on a node; use a named volume or an absolute path allowed with --allow-host-path",
            ));
        }
        let mount = crate::Mount {
            kind,
            source,
            target: mount.target,
            read_only: mount.read_only,
            nocopy: mount.nocopy,
        };
        if kind == crate::MountKind::Bind {
            mount
                .validate()
                .map_err(|e| StackError::invalid(&path, e.problem))?;
        }
        out.push(mount);
    }
    Ok(out)
}

/// Parses `secrets` (a name or `{source, target}`).
pub(crate) fn parse_secrets(node: Node) -> Result<Vec<SecretRef>, StackError> {
    let mut out = Vec::new();
    for (i, item) in node.items()?.iter().enumerate() {
        let path = format!("{}[{i}]", node.path);
        let n = Node::new(item, &path);
        let secret = match item {
            Value::Mapping(_) => {
                let mut secret = SecretRef {
                    source: String::new(),
                    target: None,
                    mode: None,
                };
                for (key, value) in n.entries()? {
                    let p = join(&path, &key);
                    let v = Node::new(&value, &p);
                    match key.as_str() {
                        "source" => secret.source = v.string()?,
                        "target" => secret.target = Some(v.string()?),
                        "mode" => secret.mode = Some(octal_mode(&v)?),
                        "uid" | "gid" => {
                            return Err(v.invalid(
                                "is not supported: a secret file belongs to the image's user; drop uid/gid",
                            ))
                        }
                        _ => {}
                    }
                }
                if secret.source.is_empty() {
                    return Err(n.invalid("has no source; give source: SECRET"));
                }
                secret
            }
            _ => SecretRef {
                source: n.string()?,
                target: None,
                mode: None,
            },
        };
        out.push(secret);
    }
    Ok(out)
}

/// A `mode:` in octal notation: `0440` or `"0440"` (YAML 1.2 reads an
/// unquoted 0440 as the decimal 440, whose digits are what was meant).
fn octal_mode(node: &Node) -> Result<u32, StackError> {
    let text = match node.value {
        Value::Number(n) => n.to_string(),
        _ => node.string()?,
    };
    u32::from_str_radix(text.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| node.invalid("is not an octal file mode; write e.g. mode: 0440"))
}

/// A service's `secrets` as references (named as declared; `read` gives
/// them their cluster names).
fn read_secrets(node: Node) -> Result<Vec<crate::SecretRef>, StackError> {
    Ok(parse_secrets(node)?
        .into_iter()
        .map(|s| crate::SecretRef {
            name: s.source,
            target: s
                .target
                .map(|t| {
                    t.strip_prefix(crate::SECRETS_DIR)
                        .map(|r| r.trim_start_matches('/').to_string())
                        .unwrap_or(t)
                })
                .unwrap_or_default(),
            mode: s.mode.unwrap_or(0),
            ..crate::SecretRef::default()
        })
        .collect())
}
