//! Skiff's own stack format (`skiff: v1`), both ways. Keys are named like
//! the CLI flags (`max-per-node`, `update.min-healthy-time`); durations are
//! Go's (`10s`), memory is in MB and CPU in millicores. [`write`] writes
//! every field that differs from what [`read`] assumes when it is absent,
//! so reading what was written gives the same specs back.

use serde_yaml::{Mapping, Number, Value};

use super::duration;
use super::error::StackError;
use super::node::{check_keys, join, Node};
use super::{Context, ReadService};
use crate::{
    AutoscalePolicy, Constraint, Dependency, DependsCondition, HealthCheck, HealthKind,
    NetworkMode, PlacementPolicy, Protocol, RuntimeKind, ServiceMode, ServiceSpec, SpecError,
    Strategy, UpdatePolicy, STACK_LABEL,
};

const TOP_KEYS: &[&str] = &["skiff", "services"];

const SERVICE_KEYS: &[&str] = &[
    "image",
    "runtime",
    "replicas",
    "command",
    "entrypoint",
    "env",
    "workdir",
    "port",
    "publish",
    "protocol",
    "memory",
    "cpu",
    "user",
    "network",
    "init",
    "health",
    "constraints",
    "max-per-node",
    "placement",
    "mode",
    "max-retries",
    "deadline",
    "update",
    "autoscale",
    "labels",
    "depends-on",
    "profiles",
    "seccomp",
    "volumes",
    "secrets",
    "volume-scope",
];

const HEALTH_KEYS: &[&str] = &[
    "http",
    "tcp",
    "cmd",
    "interval",
    "timeout",
    "retries",
    "start-period",
];

const UPDATE_KEYS: &[&str] = &[
    "strategy",
    "max-parallel",
    "max-surge",
    "max-unavailable",
    "min-healthy-time",
    "healthy-deadline",
    "progress-deadline",
    "auto-rollback",
    "auto-promote",
    "canary",
    "canary-weight",
    "max-error-rate",
];

const AUTOSCALE_KEYS: &[&str] = &[
    "min",
    "max",
    "target-rps",
    "target-concurrency",
    "target-cpu",
];

/// Replicas when `replicas` is absent, as `service create`.
const DEFAULT_REPLICAS: u32 = 1;

/// The services of a merged Skiff-format file.
/// (`_context` is unused: Skiff's format has no `env_file` and no
/// ignored keys to warn about.)
pub(crate) fn read(top: &Mapping, _context: &mut Context) -> Result<Vec<ReadService>, StackError> {
    let top_value = Value::Mapping(top.clone());
    let entries = Node::new(&top_value, "").entries()?;
    check_keys(&entries, "", TOP_KEYS)?;
    let Some(services) = top.get("services") else {
        return Err(StackError::invalid(
            "services",
            "the file has no services:; add one",
        ));
    };
    let mut out = Vec::new();
    for (name, value) in Node::new(services, "services").entries()? {
        let path = join("services", &name);
        out.push(read_service(name, Node::new(&value, &path))?);
    }
    Ok(out)
}

/// A [`SpecError`] from an enum's parser, at the key that held the value.
fn at(path: &str) -> impl Fn(SpecError) -> StackError + '_ {
    move |e| StackError::invalid(path, e.problem)
}

fn read_service(name: String, node: Node) -> Result<ReadService, StackError> {
    let entries = node.entries()?;
    check_keys(&entries, node.path, SERVICE_KEYS)?;
    let mut spec = ServiceSpec {
        replicas: DEFAULT_REPLICAS,
        ..ServiceSpec::default()
    };
    let mut runtime = (String::new(), node.path.to_string());
    let mut profiles = Vec::new();
    for (key, value) in &entries {
        let path = join(node.path, key);
        let n = Node::new(value, &path);
        match key.as_str() {
            "image" => spec.image = Some(n.string()?),
            "runtime" => runtime = (n.string()?, path.clone()),
            "replicas" => spec.replicas = n.u32()?,
            "command" => spec.command = n.command()?,
            "entrypoint" => spec.entrypoint = Some(n.command()?),
            "seccomp" => spec.seccomp = Some(n.string()?),
            "secrets" => {
                spec.secrets = n
                    .string_list()?
                    .iter()
                    .map(|t| crate::SecretRef::parse(t))
                    .collect::<Result<_, _>>()
                    .map_err(at(&path))?
            }
            "volumes" => {
                spec.volumes = n
                    .string_list()?
                    .iter()
                    .map(|m| {
                        if m.starts_with("type=") {
                            crate::Mount::parse_mount(m)
                        } else {
                            crate::Mount::parse_volume(m)
                        }
                    })
                    .collect::<Result<_, _>>()
                    .map_err(at(&path))?
            }
            "volume-scope" => {
                spec.volume_scope = crate::VolumeScope::parse(&n.string()?).map_err(at(&path))?
            }
            "env" => spec.env = n.string_map_strict()?,
            "workdir" => spec.workdir = Some(n.string()?),
            "port" => spec.port = Some(n.port()?),
            "publish" => spec.publish = Some(n.port()?),
            "protocol" => spec.protocol = Protocol::parse(&n.string()?).map_err(at(&path))?,
            "memory" => spec.memory_mb = Some(n.u32()?),
            "cpu" => spec.cpu_millis = Some(n.u32()?),
            "user" => spec.user = Some(n.string()?),
            "network" => spec.network = NetworkMode::parse(&n.string()?).map_err(at(&path))?,
            "init" => spec.init = Some(n.bool()?),
            "health" => spec.health = Some(read_health(n)?),
            "constraints" => {
                spec.constraints = n
                    .string_list()?
                    .iter()
                    .map(|c| Constraint::parse(c))
                    .collect::<Result<_, _>>()
                    .map_err(at(&path))?
            }
            "max-per-node" => spec.max_per_node = Some(n.u32()?),
            "placement" => {
                spec.placement = PlacementPolicy::parse(&n.string()?).map_err(at(&path))?
            }
            "mode" => spec.mode = ServiceMode::parse(&n.string()?).map_err(at(&path))?,
            "max-retries" => spec.max_retries = n.u32()?,
            "deadline" => spec.deadline_secs = Some(job_deadline_secs(&n)?),
            "update" => spec.update = read_update(n)?,
            "autoscale" => spec.autoscale = Some(read_autoscale(n)?),
            "labels" => spec.labels = n.string_map_strict()?,
            "depends-on" => spec.depends_on = read_depends_on(n)?,
            "profiles" => profiles = n.string_list()?,
            _ => {}
        }
    }
    spec.runtime =
        RuntimeKind::resolve(&runtime.0, spec.image.is_some()).map_err(at(&runtime.1))?;
    Ok(ReadService {
        name,
        spec,
        profiles,
    })
}

/// A job's `deadline` (a duration such as `10m`) in whole seconds, rounded
/// up as `job run --deadline` does.
pub(crate) fn job_deadline_secs(node: &Node) -> Result<u64, StackError> {
    let ms = node.duration_ms()?;
    if ms == 0 {
        return Err(
            node.invalid("0s fails the job at once; give a duration such as 10m, or remove it")
        );
    }
    Ok(u64::from(ms).div_ceil(1000))
}

fn read_health(node: Node) -> Result<HealthCheck, StackError> {
    let entries = node.entries()?;
    check_keys(&entries, node.path, HEALTH_KEYS)?;
    let mut kinds = Vec::new();
    let mut check = HealthCheck {
        kind: HealthKind::Tcp,
        interval_ms: 0,
        timeout_ms: 0,
        retries: 0,
        start_period_ms: 0,
    };
    for (key, value) in &entries {
        let path = join(node.path, key);
        let n = Node::new(value, &path);
        match key.as_str() {
            "http" => kinds.push(HealthKind::Http { path: n.string()? }),
            "tcp" => {
                if !n.bool()? {
                    return Err(
                        n.invalid("tcp: false checks nothing; use tcp: true, or remove health")
                    );
                }
                kinds.push(HealthKind::Tcp)
            }
            "cmd" => kinds.push(HealthKind::Exec {
                command: n.command()?,
            }),
            "interval" => check.interval_ms = n.duration_ms()?,
            "timeout" => check.timeout_ms = n.duration_ms()?,
            "retries" => check.retries = n.u32()?,
            "start-period" => check.start_period_ms = n.duration_ms()?,
            _ => {}
        }
    }
    if kinds.len() != 1 {
        return Err(
            node.invalid("give exactly one of http: PATH, tcp: true or cmd: [COMMAND, ARGS]")
        );
    }
    check.kind = kinds.remove(0);
    Ok(check)
}

fn read_update(node: Node) -> Result<UpdatePolicy, StackError> {
    let entries = node.entries()?;
    check_keys(&entries, node.path, UPDATE_KEYS)?;
    let mut update = UpdatePolicy::default();
    for (key, value) in &entries {
        let path = join(node.path, key);
        let n = Node::new(value, &path);
        match key.as_str() {
            "strategy" => update.strategy = Strategy::parse(&n.string()?).map_err(at(&path))?,
            "max-parallel" => update.max_parallel = n.u32()?,
            "max-surge" => update.max_surge = n.u32()?,
            "max-unavailable" => update.max_unavailable = n.u32()?,
            "min-healthy-time" => update.min_healthy_ms = n.duration_ms()?,
            "healthy-deadline" => update.healthy_deadline_ms = n.duration_ms()?,
            "progress-deadline" => update.progress_deadline_ms = n.duration_ms()?,
            "auto-rollback" => update.auto_rollback = n.bool()?,
            "auto-promote" => update.auto_promote = n.bool()?,
            "canary" => update.canary = n.u32()?,
            "canary-weight" => update.canary_weight = Some(n.u32()?),
            "max-error-rate" => update.max_error_rate = Some(whole_percent(n)?),
            _ => {}
        }
    }
    Ok(update)
}

/// A percent the spec keeps whole: `5` and `5.0` are accepted, `5.5` not.
fn whole_percent(node: Node) -> Result<u32, StackError> {
    let text = node.decimal_text()?;
    let (whole, fraction) = text.split_once('.').unwrap_or((&text, ""));
    if !fraction.chars().all(|c| c == '0') {
        return Err(node.invalid(format!(
            "{text} is not a whole percent; Skiff keeps whole percents, e.g. 5"
        )));
    }
    whole.parse::<u32>().map_err(|_| {
        StackError::wrong_type(
            node.path,
            "a whole percent",
            super::node::describe(node.value),
        )
    })
}

fn read_autoscale(node: Node) -> Result<AutoscalePolicy, StackError> {
    let entries = node.entries()?;
    check_keys(&entries, node.path, AUTOSCALE_KEYS)?;
    let mut policy = AutoscalePolicy {
        min: 1,
        ..AutoscalePolicy::default()
    };
    for (key, value) in &entries {
        let path = join(node.path, key);
        let n = Node::new(value, &path);
        match key.as_str() {
            "min" => policy.min = n.u32()?,
            "max" => policy.max = n.u32()?,
            "target-rps" => policy.target_rps = Some(n.f64()?),
            "target-concurrency" => policy.target_concurrency = Some(n.f64()?),
            "target-cpu" => policy.target_cpu = Some(n.f64()?),
            _ => {}
        }
    }
    Ok(policy)
}

/// A mapping `name: condition` (null: started), or a list of names.
fn read_depends_on(node: Node) -> Result<Vec<Dependency>, StackError> {
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
        let condition = match &value {
            Value::Null => DependsCondition::Started,
            other => {
                DependsCondition::parse(&Node::new(other, &path).string()?).map_err(at(&path))?
            }
        };
        out.push(Dependency { service, condition });
    }
    Ok(out)
}

/// Skiff's format for `services`, named without the stack's prefix and
/// label when a stack is given.
pub(crate) fn write(stack: Option<&str>, services: &[ServiceSpec]) -> String {
    let short = |name: &str| -> String {
        stack
            .and_then(|s| name.strip_prefix(s)?.strip_prefix('-'))
            .unwrap_or(name)
            .to_string()
    };
    let mut all = Mapping::new();
    for spec in services {
        all.insert(
            short(&spec.name).into(),
            Value::Mapping(write_service(spec, stack, &short)),
        );
    }
    let mut top = Mapping::new();
    top.insert("skiff".into(), "v1".into());
    top.insert("services".into(), Value::Mapping(all));
    let mut top = Value::Mapping(top);
    escape_dollars(&mut top);
    serde_yaml::to_string(&top).unwrap_or_default()
}

fn int(n: u32) -> Value {
    Value::Number(Number::from(n))
}

fn list(items: &[String]) -> Value {
    Value::Sequence(items.iter().map(|s| Value::from(s.as_str())).collect())
}

fn string_map(map: &std::collections::BTreeMap<String, String>) -> Value {
    Value::Mapping(
        map.iter()
            .map(|(k, v)| (Value::from(k.as_str()), Value::from(v.as_str())))
            .collect(),
    )
}

fn write_service(
    spec: &ServiceSpec,
    stack: Option<&str>,
    short: &dyn Fn(&str) -> String,
) -> Mapping {
    let mut m = Mapping::new();
    let mut put = |key: &str, value: Value| {
        m.insert(key.into(), value);
    };
    if let Some(image) = &spec.image {
        put("image", image.as_str().into());
    }
    if spec.runtime != RuntimeKind::resolve("", spec.image.is_some()).unwrap_or_default() {
        put("runtime", spec.runtime.as_str().into());
    }
    put("replicas", int(spec.replicas));
    if spec.mode != ServiceMode::default() {
        put("mode", spec.mode.as_str().into());
    }
    if spec.max_retries != 0 {
        put("max-retries", int(spec.max_retries));
    }
    if let Some(secs) = spec.deadline_secs {
        // Whole seconds; a deadline beyond u32 milliseconds is refused by
        // validation anyway (30 days at most).
        let ms = u32::try_from(secs.saturating_mul(1000)).unwrap_or(u32::MAX);
        put("deadline", duration::format_ms(ms).into());
    }
    if !spec.command.is_empty() {
        put("command", list(&spec.command));
    }
    if let Some(entrypoint) = &spec.entrypoint {
        put("entrypoint", list(entrypoint));
    }
    if let Some(seccomp) = &spec.seccomp {
        put("seccomp", seccomp.as_str().into());
    }
    if !spec.secrets.is_empty() {
        let texts: Vec<String> = spec.secrets.iter().map(|s| s.to_string()).collect();
        put("secrets", list(&texts));
    }
    if !spec.volumes.is_empty() {
        let texts: Vec<String> = spec.volumes.iter().map(|m| m.to_string()).collect();
        put("volumes", list(&texts));
    }
    if spec.volume_scope != crate::VolumeScope::PerReplica {
        put("volume-scope", spec.volume_scope.as_str().into());
    }
    if !spec.env.is_empty() {
        put("env", string_map(&spec.env));
    }
    if let Some(workdir) = &spec.workdir {
        put("workdir", workdir.as_str().into());
    }
    if let Some(user) = &spec.user {
        put("user", user.as_str().into());
    }
    if let Some(port) = spec.port {
        put("port", int(u32::from(port)));
    }
    if let Some(publish) = spec.publish {
        put("publish", int(u32::from(publish)));
    }
    if spec.protocol != Protocol::default() {
        put("protocol", spec.protocol.as_str().into());
    }
    if spec.network != NetworkMode::default() {
        put("network", spec.network.as_str().into());
    }
    if let Some(init) = spec.init {
        put("init", init.into());
    }
    if let Some(memory) = spec.memory_mb {
        put("memory", int(memory));
    }
    if let Some(cpu) = spec.cpu_millis {
        put("cpu", int(cpu));
    }
    if let Some(health) = &spec.health {
        put("health", Value::Mapping(write_health(health)));
    }
    if !spec.constraints.is_empty() {
        let texts: Vec<String> = spec.constraints.iter().map(Constraint::to_string).collect();
        put("constraints", list(&texts));
    }
    if let Some(max) = spec.max_per_node {
        put("max-per-node", int(max));
    }
    if spec.placement != PlacementPolicy::default() {
        put("placement", spec.placement.as_str().into());
    }
    let update = write_update(&spec.update);
    if !update.is_empty() {
        put("update", Value::Mapping(update));
    }
    if let Some(autoscale) = &spec.autoscale {
        put("autoscale", Value::Mapping(write_autoscale(autoscale)));
    }
    let mut labels = spec.labels.clone();
    if stack.is_some() {
        labels.remove(STACK_LABEL);
    }
    if !labels.is_empty() {
        put("labels", string_map(&labels));
    }
    if !spec.depends_on.is_empty() {
        let deps = spec
            .depends_on
            .iter()
            .map(|d| {
                (
                    Value::from(short(&d.service)),
                    Value::from(d.condition.as_str()),
                )
            })
            .collect();
        put("depends-on", Value::Mapping(deps));
    }
    m
}

fn write_health(health: &HealthCheck) -> Mapping {
    let mut m = Mapping::new();
    match &health.kind {
        HealthKind::Http { path } => m.insert("http".into(), path.as_str().into()),
        HealthKind::Tcp => m.insert("tcp".into(), true.into()),
        HealthKind::Exec { command } => m.insert("cmd".into(), list(command)),
    };
    let timings = [
        ("interval", health.interval_ms),
        ("timeout", health.timeout_ms),
        ("start-period", health.start_period_ms),
    ];
    for (key, ms) in timings {
        if ms > 0 {
            m.insert(key.into(), duration::format_ms(ms).into());
        }
    }
    if health.retries > 0 {
        m.insert("retries".into(), int(health.retries));
    }
    m
}

fn write_update(update: &UpdatePolicy) -> Mapping {
    let d = UpdatePolicy::default();
    let mut m = Mapping::new();
    let mut put = |key: &str, differs: bool, value: Value| {
        if differs {
            m.insert(key.into(), value);
        }
    };
    put(
        "strategy",
        update.strategy != d.strategy,
        update.strategy.as_str().into(),
    );
    put(
        "max-parallel",
        update.max_parallel != d.max_parallel,
        int(update.max_parallel),
    );
    put(
        "max-surge",
        update.max_surge != d.max_surge,
        int(update.max_surge),
    );
    put(
        "max-unavailable",
        update.max_unavailable != d.max_unavailable,
        int(update.max_unavailable),
    );
    let durations = [
        ("min-healthy-time", update.min_healthy_ms, d.min_healthy_ms),
        (
            "healthy-deadline",
            update.healthy_deadline_ms,
            d.healthy_deadline_ms,
        ),
        (
            "progress-deadline",
            update.progress_deadline_ms,
            d.progress_deadline_ms,
        ),
    ];
    for (key, ms, default) in durations {
        put(key, ms != default, duration::format_ms(ms).into());
    }
    put(
        "auto-rollback",
        update.auto_rollback != d.auto_rollback,
        update.auto_rollback.into(),
    );
    put(
        "auto-promote",
        update.auto_promote != d.auto_promote,
        update.auto_promote.into(),
    );
    put("canary", update.canary != d.canary, int(update.canary));
    if let Some(weight) = update.canary_weight {
        put("canary-weight", true, int(weight));
    }
    if let Some(rate) = update.max_error_rate {
        put("max-error-rate", true, int(rate));
    }
    m
}

fn write_autoscale(policy: &AutoscalePolicy) -> Mapping {
    let mut m = Mapping::new();
    m.insert("min".into(), int(policy.min));
    m.insert("max".into(), int(policy.max));
    let targets = [
        ("target-rps", policy.target_rps),
        ("target-concurrency", policy.target_concurrency),
        ("target-cpu", policy.target_cpu),
    ];
    for (key, target) in targets {
        if let Some(t) = target {
            m.insert(key.into(), Value::Number(Number::from(t)));
        }
    }
    m
}

/// `$` → `$$` in every value, so interpolation on load gives the text back.
fn escape_dollars(value: &mut Value) {
    match value {
        Value::String(s) if s.contains('$') => *s = s.replace('$', "$$"),
        Value::Sequence(items) => items.iter_mut().for_each(escape_dollars),
        Value::Mapping(map) => map.iter_mut().for_each(|(_, v)| escape_dollars(v)),
        _ => {}
    }
}
