//! The service spec an operator declares, and its validation. The CLI,
//! the server (before a proposal and again when a command is applied) and
//! the stack-file reader all call the same [`ServiceSpec::validate`], so a
//! bad spec can never reach the state machine from any client.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Upper bound on replicas of one service: far above what a 50-node cluster
/// runs, low enough that a typo (`--replicas 100000`) is refused, not obeyed.
pub const MAX_REPLICAS: u32 = 1000;

/// Longest service name; a DNS label, so names can become hostnames later.
pub const MAX_NAME_LEN: usize = 63;

/// Smallest memory limit accepted: below it runc itself cannot start.
pub const MIN_MEMORY_MB: u32 = 4;

/// Bounds on what one spec may hold. A spec is copied into every
/// allocation, every agent's assignments and every `service ls` answer, so
/// an oversized one would wedge the cluster rather than one service (a
/// 3.5 MB environment made `service ls` fail for every client). Far above
/// what real services use: Kubernetes caps a whole object at 1.5 MB.
pub mod limits {
    /// Environment variables, and their keys and values together in bytes.
    pub const ENV_VARS: usize = 500;
    pub const ENV_BYTES: usize = 128 * 1024;
    /// Arguments of the command (and of the entrypoint), and their bytes.
    pub const ARGS: usize = 1000;
    pub const ARGS_BYTES: usize = 128 * 1024;
    /// Placement constraints and the values of one `in` constraint.
    pub const CONSTRAINTS: usize = 32;
    pub const CONSTRAINT_VALUES: usize = 64;
    /// `depends_on` entries.
    pub const DEPENDENCIES: usize = 64;
    /// Shortest health-check interval: every check is a connection or a
    /// process on the node.
    pub const MIN_HEALTH_INTERVAL_MS: u32 = 100;
    /// Longest image reference, user, working directory and HTTP check path.
    pub const TEXT_BYTES: usize = 4096;
    /// A whole spec, as JSON (etcd's `--max-request-bytes` is 1.5 MiB for a
    /// whole request; one spec is copied into each of its allocations).
    pub const SPEC_BYTES: usize = 256 * 1024;
}

/// How a replica is run on its node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeKind {
    /// A host process per replica, like Nomad's raw_exec.
    #[default]
    Process,
    /// A container from an OCI image, run by runc or crun.
    Oci,
}

impl RuntimeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RuntimeKind::Process => "process",
            RuntimeKind::Oci => "oci",
        }
    }

    /// Parses a runtime name; empty means "process" (see [`RuntimeKind::resolve`]
    /// for the default that depends on the image).
    pub fn parse(value: &str) -> Result<Self, SpecError> {
        match value {
            "process" | "" => Ok(RuntimeKind::Process),
            "oci" => Ok(RuntimeKind::Oci),
            other => Err(SpecError::new(
                "runtime",
                format!("unknown runtime \"{other}\"; use --runtime oci or --runtime process"),
            )),
        }
    }

    /// The runtime a spec asks for: the named one, or when none is named,
    /// "oci" if an image is given and "process" otherwise.
    pub fn resolve(value: &str, has_image: bool) -> Result<Self, SpecError> {
        match value {
            "" if has_image => Ok(RuntimeKind::Oci),
            other => Self::parse(other),
        }
    }
}

/// The network a container joins.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// Its own network namespace on the node bridge; the host port maps to
    /// the container port.
    #[default]
    Bridge,
    /// The host's network namespace; the replica listens on `$PORT`.
    Host,
}

impl NetworkMode {
    pub fn as_str(self) -> &'static str {
        match self {
            NetworkMode::Bridge => "bridge",
            NetworkMode::Host => "host",
        }
    }

    pub fn parse(value: &str) -> Result<Self, SpecError> {
        match value {
            "bridge" | "" => Ok(NetworkMode::Bridge),
            "host" => Ok(NetworkMode::Host),
            other => Err(SpecError::new(
                "network",
                format!("unknown network mode \"{other}\"; use --network bridge or --network host"),
            )),
        }
    }
}

/// What a health check probes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind")]
pub enum HealthKind {
    /// GET `path` on the replica's port; 2xx and 3xx are healthy.
    Http { path: String },
    /// A TCP connect to the replica's port.
    Tcp,
    /// A command run inside the replica; exit status 0 is healthy.
    Exec { command: Vec<String> },
}

/// A health check with its timing; zero durations and retries mean the
/// defaults (10s interval, 5s timeout, 3 retries, no start period).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthCheck {
    #[serde(flatten)]
    pub kind: HealthKind,
    pub interval_ms: u32,
    pub timeout_ms: u32,
    pub retries: u32,
    pub start_period_ms: u32,
}

/// What the operator wants to run.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSpec {
    pub name: String,
    pub runtime: RuntimeKind,
    pub replicas: u32,
    /// Program and arguments; `$PORT` in them is replaced by the agent.
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// Working directory; `None` runs in the allocation's own directory
    /// (process) or the image's working directory (oci).
    pub workdir: Option<String>,
    /// Image reference; set exactly when the runtime is oci.
    #[serde(default)]
    pub image: Option<String>,
    /// Port the container listens on in bridge mode; `None`: the image's
    /// first exposed TCP port, else the host port.
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub memory_mb: Option<u32>,
    #[serde(default)]
    pub cpu_millis: Option<u32>,
    /// User in the image (`name`, `uid`, `name:group`, `uid:gid`); `None`:
    /// the image's user.
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub network: NetworkMode,
    /// `None`: the image's HEALTHCHECK, if any.
    #[serde(default)]
    pub health: Option<HealthCheck>,
    /// Run under a tiny init; `None`: yes unless the entrypoint is an init.
    #[serde(default)]
    pub init: Option<bool>,
    /// Every one must hold on a node for a replica to be placed there.
    #[serde(default)]
    pub constraints: Vec<Constraint>,
    /// At most this many live replicas of the service on one node.
    #[serde(default)]
    pub max_per_node: Option<u32>,
    #[serde(default)]
    pub placement: PlacementPolicy,
    #[serde(default)]
    pub mode: ServiceMode,
    /// Port every node's routing proxy listens on and forwards to the
    /// replicas; `None`: not published.
    #[serde(default)]
    pub publish: Option<u16>,
    /// What the published port carries.
    #[serde(default)]
    pub protocol: Protocol,
    /// How a new version replaces this one.
    #[serde(default)]
    pub update: crate::UpdatePolicy,
    /// Replicas follow the load between min and max; `None`: fixed count.
    #[serde(default)]
    pub autoscale: Option<crate::AutoscalePolicy>,
    /// Replaces the image's Entrypoint; `None`: the image's. As in Docker,
    /// a replaced entrypoint also drops the image's Cmd.
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    /// The operator's metadata; [`STACK_LABEL`] names the stack a service
    /// belongs to. Changing labels restarts nothing.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Services whose condition must hold before this one first starts
    /// (Compose's `depends_on`); later updates are not held.
    #[serde(default)]
    pub depends_on: Vec<Dependency>,
    /// The container's seccomp filter (Docker's `--security-opt seccomp=`):
    /// `None`, Docker's default profile; `"unconfined"`, none; otherwise
    /// a profile in the OCI runtime spec's `linux.seccomp` JSON form.
    #[serde(default)]
    pub seccomp: Option<String>,
    /// Named volumes and bind mounts of its containers (see [`crate::volume`]).
    #[serde(default)]
    pub volumes: Vec<crate::Mount>,
    /// Whether replicas share the named volumes or own one each.
    #[serde(default)]
    pub volume_scope: crate::VolumeScope,
    /// Secrets its replicas read as files under `/run/secrets` (see
    /// [`crate::secret`]); names only, never values.
    #[serde(default)]
    pub secrets: Vec<crate::SecretRef>,
    /// A job's failed attempts replaced before it fails (see
    /// [`ServiceMode::Job`]); ignored by services.
    #[serde(default)]
    pub max_retries: u32,
    /// A job not done this long after it was created fails and its
    /// replica is stopped; `None`: no deadline. Ignored by services.
    #[serde(default)]
    pub deadline_secs: Option<u64>,
}

/// Most retries of one job: a job that fails a hundred times will not
/// succeed on the next try; a bound also keeps a typo (`--max-retries
/// 1000000`) from retrying for days.
pub const MAX_JOB_RETRIES: u32 = 100;
/// Longest job deadline: 30 days.
pub const MAX_JOB_DEADLINE_SECS: u64 = 30 * 24 * 3600;

/// `seccomp` value that turns the filter off.
pub const SECCOMP_UNCONFINED: &str = "unconfined";

/// The label that names the stack a service was deployed by.
pub const STACK_LABEL: &str = "skiff.stack";

/// Most labels on one service, and longest key and value: metadata, not data.
pub const MAX_LABELS: usize = 64;
const MAX_LABEL_KEY: usize = 128;
const MAX_LABEL_VALUE: usize = 1024;

/// One service this one waits for before its first start.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Dependency {
    /// The service's full name (`app-db` for `db` in stack `app`).
    pub service: String,
    #[serde(default)]
    pub condition: DependsCondition,
}

/// When a dependency counts as ready (Compose's `depends_on` conditions).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DependsCondition {
    /// Some replica of it runs.
    #[default]
    Started,
    /// Some replica of it is healthy (passes its health check, or runs
    /// when it has none).
    Healthy,
    /// It ran to completion with exit status 0 (one-shot jobs).
    Completed,
}

impl DependsCondition {
    pub fn as_str(self) -> &'static str {
        match self {
            DependsCondition::Started => "started",
            DependsCondition::Healthy => "healthy",
            DependsCondition::Completed => "completed",
        }
    }

    pub fn parse(value: &str) -> Result<Self, SpecError> {
        match value {
            "" | "started" | "service_started" => Ok(DependsCondition::Started),
            "healthy" | "service_healthy" => Ok(DependsCondition::Healthy),
            "completed" | "service_completed_successfully" => Ok(DependsCondition::Completed),
            other => Err(SpecError::new(
                "depends-on",
                format!("unknown condition \"{other}\"; use service_started, service_healthy or service_completed_successfully"),
            )),
        }
    }
}

/// What a published port carries, as far as the routing proxy cares.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Any TCP stream; the proxy counts connections and bytes.
    #[default]
    Tcp,
    /// Plain HTTP/1.1; the proxy also counts requests.
    Http,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Http => "http",
        }
    }

    pub fn parse(value: &str) -> Result<Self, SpecError> {
        match value {
            "tcp" | "" => Ok(Protocol::Tcp),
            "http" => Ok(Protocol::Http),
            other => Err(SpecError::new(
                "protocol",
                format!("unknown protocol \"{other}\"; use --protocol tcp or --protocol http"),
            )),
        }
    }
}

/// How the scheduler ranks the nodes that can take a replica.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PlacementPolicy {
    /// Fewest replicas of the service per node, then per zone (the `zone`
    /// label), then the least loaded node.
    #[default]
    Spread,
    /// The most loaded node that still fits, to keep others free.
    Binpack,
}

impl PlacementPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            PlacementPolicy::Spread => "spread",
            PlacementPolicy::Binpack => "binpack",
        }
    }

    pub fn parse(value: &str) -> Result<Self, SpecError> {
        match value {
            "spread" | "" => Ok(PlacementPolicy::Spread),
            "binpack" => Ok(PlacementPolicy::Binpack),
            other => Err(SpecError::new(
                "placement",
                format!(
                    "unknown placement \"{other}\"; use --placement spread or --placement binpack"
                ),
            )),
        }
    }
}

/// How many replicas a service has.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceMode {
    /// `replicas` replicas wherever the scheduler puts them.
    #[default]
    Replicated,
    /// One replica on every eligible node (like Nomad's system jobs);
    /// `replicas` is ignored.
    Global,
    /// A one-shot job: one replica runs to completion. Exit status 0
    /// ends it succeeded; a failed attempt is replaced up to
    /// `max_retries` times, then the job has failed. Nothing is
    /// restarted by its agent: the control plane counts attempts, so the
    /// count survives agent restarts and node failures.
    Job,
}

impl ServiceMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceMode::Replicated => "replicated",
            ServiceMode::Global => "global",
            ServiceMode::Job => "job",
        }
    }

    pub fn parse(value: &str) -> Result<Self, SpecError> {
        match value {
            "replicated" | "" => Ok(ServiceMode::Replicated),
            "global" => Ok(ServiceMode::Global),
            "job" => Ok(ServiceMode::Job),
            other => Err(SpecError::new(
                "mode",
                format!("unknown mode \"{other}\"; use --mode replicated or --mode global"),
            )),
        }
    }
}

/// How a constraint compares a node attribute with its values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConstraintOp {
    Eq,
    Ne,
    In,
}

/// A condition on a node: `zone==a`, `zone!=a`, `zone in (a,b)`. The
/// attribute is a node label, or `node.name` / `node.address`. A node
/// without the label fails `==` and `in` and passes `!=`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Constraint {
    pub attribute: String,
    pub op: ConstraintOp,
    pub values: Vec<String>,
}

impl Constraint {
    /// Parses the operator's text form.
    pub fn parse(text: &str) -> Result<Self, SpecError> {
        let bad = |why: &str| {
            SpecError::new(
                "constraint",
                format!("\"{text}\" {why}; use ATTR==VALUE, ATTR!=VALUE or 'ATTR in (V1,V2)', e.g. zone==a"),
            )
        };
        let word_ok = constraint_word;
        let (attribute, op, values) = if let Some((a, v)) = text.split_once("==") {
            (a.trim(), ConstraintOp::Eq, vec![v.trim().to_string()])
        } else if let Some((a, v)) = text.split_once("!=") {
            (a.trim(), ConstraintOp::Ne, vec![v.trim().to_string()])
        } else if let Some((a, v)) = text.split_once(" in ") {
            let v = v.trim();
            let inner = v
                .strip_prefix('(')
                .and_then(|v| v.strip_suffix(')'))
                .ok_or_else(|| bad("lists its values without parentheses"))?;
            let values = inner.split(',').map(|s| s.trim().to_string()).collect();
            (a.trim(), ConstraintOp::In, values)
        } else {
            return Err(bad("has no operator"));
        };
        if !word_ok(attribute) {
            return Err(bad("names no attribute"));
        }
        if values.iter().any(|v| !word_ok(v)) {
            return Err(bad("has an empty or invalid value"));
        }
        Ok(Constraint {
            attribute: attribute.to_string(),
            op,
            values,
        })
    }

    /// Checks a constraint however it arrived (parsed from text, read from
    /// a file, or decoded from a message): an attribute, one value for `==`
    /// and `!=`, one or more for `in`, each a plain word.
    pub fn validate(&self) -> Result<(), SpecError> {
        let bad = |why: &str| {
            SpecError::new(
                "constraint",
                format!("\"{self}\" {why}; use ATTR==VALUE, ATTR!=VALUE or 'ATTR in (V1,V2)', e.g. zone==a"),
            )
        };
        if !constraint_word(&self.attribute) {
            return Err(bad("names no attribute"));
        }
        let count_ok = match self.op {
            ConstraintOp::Eq | ConstraintOp::Ne => self.values.len() == 1,
            ConstraintOp::In => (1..=limits::CONSTRAINT_VALUES).contains(&self.values.len()),
        };
        if !count_ok {
            return Err(bad("has the wrong number of values"));
        }
        if !self.values.iter().all(|v| constraint_word(v)) {
            return Err(bad("has an empty or invalid value"));
        }
        Ok(())
    }

    /// Whether a node with these labels, name and address satisfies it.
    pub fn holds(&self, labels: &BTreeMap<String, String>, name: &str, address: &str) -> bool {
        let value = match self.attribute.as_str() {
            "node.name" => Some(name),
            "node.address" => Some(address),
            label => labels.get(label).map(String::as_str),
        };
        match (self.op, value) {
            (ConstraintOp::Eq, Some(v)) => self.values.first().is_some_and(|x| x == v),
            (ConstraintOp::Ne, Some(v)) => self.values.first().is_none_or(|x| x != v),
            (ConstraintOp::Ne, None) => true,
            (ConstraintOp::In, Some(v)) => self.values.iter().any(|x| x == v),
            (ConstraintOp::Eq | ConstraintOp::In, None) => false,
        }
    }
}

impl std::fmt::Display for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.op {
            ConstraintOp::Eq => write!(f, "{}=={}", self.attribute, self.values.join(",")),
            ConstraintOp::Ne => write!(f, "{}!={}", self.attribute, self.values.join(",")),
            ConstraintOp::In => write!(f, "{} in ({})", self.attribute, self.values.join(",")),
        }
    }
}

/// A constraint's attribute or value: a node label's characters.
fn constraint_word(w: &str) -> bool {
    !w.is_empty()
        && w.len() <= 128
        && w.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-' | '/'))
}

/// A spec field that is wrong, with what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[error("invalid {field}: {problem}")]
pub struct SpecError {
    pub field: String,
    pub problem: String,
}

impl SpecError {
    pub fn new(field: &str, problem: impl Into<String>) -> Self {
        SpecError {
            field: field.to_string(),
            problem: problem.into(),
        }
    }
}

impl ServiceSpec {
    /// Checks every field; the first problem found is returned.
    /// A job's retry and deadline bounds.
    fn validate_job(&self) -> Result<(), SpecError> {
        if self.max_retries > MAX_JOB_RETRIES {
            return Err(SpecError::new(
                "max-retries",
                format!(
                    "{} is too many; use 0 to {MAX_JOB_RETRIES}",
                    self.max_retries
                ),
            ));
        }
        if let Some(secs) = self.deadline_secs {
            if secs == 0 || secs > MAX_JOB_DEADLINE_SECS {
                return Err(SpecError::new(
                    "deadline",
                    "must be from 1s to 30 days (720h)",
                ));
            }
        }
        Ok(())
    }

    pub fn validate(&self) -> Result<(), SpecError> {
        validate_name(&self.name)?;
        validate_replicas(i64::from(self.replicas))?;
        self.validate_job()?;
        match self.runtime {
            RuntimeKind::Process => self.validate_process()?,
            RuntimeKind::Oci => self.validate_oci()?,
        }
        self.validate_resources()?;
        self.validate_sizes()?;
        for constraint in &self.constraints {
            constraint.validate()?;
        }
        if self.command.first().is_some_and(|p| p.trim().is_empty()) {
            return Err(SpecError::new("command", "the program name is blank"));
        }
        if self.command.iter().any(|arg| arg.contains('\0')) {
            return Err(SpecError::new(
                "command",
                "arguments may not contain NUL bytes",
            ));
        }
        for (key, value) in &self.env {
            validate_env(key, value)?;
        }
        if let Some(dir) = &self.workdir {
            if !dir.starts_with('/') {
                return Err(SpecError::new(
                    "workdir",
                    format!("\"{dir}\" is not an absolute path"),
                ));
            }
        }
        if let Some(health) = &self.health {
            validate_health(health)?;
        }
        self.validate_publish()?;
        if let Some(entrypoint) = &self.entrypoint {
            if self.runtime != RuntimeKind::Oci {
                return Err(SpecError::new(
                    "entrypoint",
                    "--entrypoint applies to containers only; use --image REF, or put the program in the command",
                ));
            }
            if entrypoint.iter().any(|arg| arg.contains('\0')) {
                return Err(SpecError::new(
                    "entrypoint",
                    "arguments may not contain NUL bytes",
                ));
            }
        }
        self.validate_labels()?;
        self.validate_depends_on()?;
        self.validate_seccomp()?;
        self.update.validate()?;
        self.validate_volumes()?;
        self.validate_secrets()?;
        if let Some(autoscale) = &self.autoscale {
            autoscale.validate()?;
        }
        Ok(())
    }

    /// Whether every constraint holds on a node with these labels, name
    /// and address (the scheduler also asks whether the node takes new
    /// replicas at all).
    pub fn constraints_hold(
        &self,
        labels: &BTreeMap<String, String>,
        name: &str,
        address: &str,
    ) -> bool {
        self.constraints
            .iter()
            .all(|c| c.holds(labels, name, address))
    }

    /// Whether replicas of `self` and `other` run the same thing: equal
    /// but for the replica count and the update and autoscale policies,
    /// which change how many run and how they are replaced, not what runs.
    /// A replica whose spec runs the same as the service's needs no
    /// replacement.
    ///
    /// Field by field without copying (it runs per replica on the
    /// scheduler's paths); the exhaustive pattern makes a new field a
    /// compile error here until it is sorted into one group or the other.
    pub fn runs_same(&self, other: &ServiceSpec) -> bool {
        let ServiceSpec {
            name,
            runtime,
            replicas: _,
            command,
            env,
            workdir,
            image,
            port,
            memory_mb,
            cpu_millis,
            user,
            network,
            health,
            init,
            constraints,
            max_per_node,
            placement,
            mode,
            publish,
            protocol,
            update: _,
            autoscale: _,
            entrypoint,
            labels: _,
            depends_on: _,
            seccomp,
            volumes,
            volume_scope,
            secrets,
            max_retries: _,
            deadline_secs: _,
        } = self;
        *name == other.name
            && *runtime == other.runtime
            && *command == other.command
            && *env == other.env
            && *workdir == other.workdir
            && *image == other.image
            && *port == other.port
            && *memory_mb == other.memory_mb
            && *cpu_millis == other.cpu_millis
            && *user == other.user
            && *network == other.network
            && *health == other.health
            && *init == other.init
            && *constraints == other.constraints
            && *max_per_node == other.max_per_node
            && *placement == other.placement
            && *mode == other.mode
            && *publish == other.publish
            && *protocol == other.protocol
            && *entrypoint == other.entrypoint
            && *seccomp == other.seccomp
            && *volumes == other.volumes
            && *volume_scope == other.volume_scope
            && *secrets == other.secrets
    }

    /// The bounds of [`limits`], each named with its field.
    fn validate_sizes(&self) -> Result<(), SpecError> {
        let too_many = |field: &str, what: &str, n: usize, max: usize| {
            SpecError::new(
                field,
                format!("{n} {what} is too many; use at most {max} (put bulk data in a file or an image)"),
            )
        };
        if self.env.len() > limits::ENV_VARS {
            return Err(too_many(
                "env",
                "variables",
                self.env.len(),
                limits::ENV_VARS,
            ));
        }
        let env_bytes: usize = self.env.iter().map(|(k, v)| k.len() + v.len()).sum();
        if env_bytes > limits::ENV_BYTES {
            return Err(too_many("env", "bytes", env_bytes, limits::ENV_BYTES));
        }
        let argvs = [
            ("command", Some(&self.command)),
            ("entrypoint", self.entrypoint.as_ref()),
        ];
        for (field, argv) in argvs {
            let Some(argv) = argv else { continue };
            if argv.len() > limits::ARGS {
                return Err(too_many(field, "arguments", argv.len(), limits::ARGS));
            }
            let bytes: usize = argv.iter().map(String::len).sum();
            if bytes > limits::ARGS_BYTES {
                return Err(too_many(field, "bytes", bytes, limits::ARGS_BYTES));
            }
        }
        if self.constraints.len() > limits::CONSTRAINTS {
            return Err(too_many(
                "constraint",
                "constraints",
                self.constraints.len(),
                limits::CONSTRAINTS,
            ));
        }
        if self.depends_on.len() > limits::DEPENDENCIES {
            return Err(too_many(
                "depends-on",
                "dependencies",
                self.depends_on.len(),
                limits::DEPENDENCIES,
            ));
        }
        let bytes = serde_json::to_vec(self).map_or(usize::MAX, |v| v.len());
        if bytes > limits::SPEC_BYTES {
            return Err(SpecError::new(
                "spec",
                format!(
                    "is {bytes} bytes; a spec holds at most {} KiB (put bulk data in a file or an image)",
                    limits::SPEC_BYTES / 1024
                ),
            ));
        }
        let texts = [
            ("image", self.image.as_deref()),
            ("user", self.user.as_deref()),
            ("workdir", self.workdir.as_deref()),
        ];
        for (field, text) in texts {
            if text.is_some_and(|t| t.len() > limits::TEXT_BYTES) {
                return Err(SpecError::new(
                    field,
                    format!("is over {} bytes; shorten it", limits::TEXT_BYTES),
                ));
            }
        }
        Ok(())
    }

    fn validate_seccomp(&self) -> Result<(), SpecError> {
        let Some(seccomp) = &self.seccomp else {
            return Ok(());
        };
        if self.runtime != RuntimeKind::Oci {
            return Err(SpecError::new(
                "security-opt",
                "seccomp applies to containers only; use --image REF, or drop --security-opt",
            ));
        }
        if seccomp == SECCOMP_UNCONFINED {
            return Ok(());
        }
        let profile: serde_json::Value = serde_json::from_str(seccomp).map_err(|e| {
            SpecError::new(
                "security-opt",
                format!("the seccomp profile is not JSON ({e}); use seccomp=unconfined or seccomp=FILE with an OCI linux.seccomp object"),
            )
        })?;
        if !profile
            .get("defaultAction")
            .is_some_and(serde_json::Value::is_string)
        {
            return Err(SpecError::new(
                "security-opt",
                "the seccomp profile has no defaultAction; give an OCI linux.seccomp object (defaultAction, architectures, syscalls)",
            ));
        }
        Ok(())
    }

    fn validate_labels(&self) -> Result<(), SpecError> {
        if self.labels.len() > MAX_LABELS {
            return Err(SpecError::new(
                "labels",
                format!(
                    "{} labels is too many; use at most {MAX_LABELS}",
                    self.labels.len()
                ),
            ));
        }
        for (key, value) in &self.labels {
            let key_ok = !key.is_empty()
                && key.len() <= MAX_LABEL_KEY
                && key
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-' | '/'));
            if !key_ok {
                return Err(SpecError::new(
                    "labels",
                    format!("\"{key}\" is not a label key; use up to {MAX_LABEL_KEY} letters, digits, '_', '.', '-' and '/'"),
                ));
            }
            if value.len() > MAX_LABEL_VALUE || value.contains('\0') {
                return Err(SpecError::new(
                    "labels",
                    format!(
                        "the value of {key} is over {MAX_LABEL_VALUE} bytes or holds a NUL byte"
                    ),
                ));
            }
        }
        Ok(())
    }

    fn validate_depends_on(&self) -> Result<(), SpecError> {
        let mut seen = std::collections::BTreeSet::new();
        for dep in &self.depends_on {
            validate_name(&dep.service).map_err(|e| SpecError::new("depends-on", e.problem))?;
            if dep.service == self.name {
                return Err(SpecError::new(
                    "depends-on",
                    format!(
                        "{} depends on itself; remove it from its own depends_on",
                        self.name
                    ),
                ));
            }
            if dep.condition == DependsCondition::Completed {
                return Err(SpecError::new(
                    "depends-on",
                    format!("{} waits for {} to complete, but Skiff runs no one-shot jobs yet; use service_started or service_healthy", self.name, dep.service),
                ));
            }
            if !seen.insert(dep.service.as_str()) {
                return Err(SpecError::new(
                    "depends-on",
                    format!("{} is listed twice; keep one entry", dep.service),
                ));
            }
        }
        Ok(())
    }

    fn validate_publish(&self) -> Result<(), SpecError> {
        match self.publish {
            Some(0) => Err(SpecError::new(
                "publish",
                "0 is not a port; use --publish PUBLISHED:CONTAINER_PORT with ports from 1 to 65535",
            )),
            None if self.protocol != Protocol::Tcp => Err(SpecError::new(
                "protocol",
                "--protocol applies to published services only; add --publish PUBLISHED:CONTAINER_PORT",
            )),
            _ => Ok(()),
        }
    }

    fn validate_process(&self) -> Result<(), SpecError> {
        if self.command.is_empty() {
            return Err(SpecError::new(
                "command",
                "the command is empty; give it after `--`, e.g. `-- python3 -m http.server '$PORT'`, or run an image with --image REF",
            ));
        }
        let container_only = [
            ("image", self.image.is_some(), "--image"),
            ("port", self.port.is_some(), "--port"),
            ("user", self.user.is_some(), "--user"),
            ("init", self.init.is_some(), "--init/--no-init"),
            ("network", self.network == NetworkMode::Host, "--network"),
        ];
        for (field, given, flag) in container_only {
            if given {
                return Err(SpecError::new(
                    field,
                    format!("{flag} applies to containers only; use --runtime oci with --image REF, or drop {flag}"),
                ));
            }
        }
        Ok(())
    }

    /// `--cpu` and `--memory` are reservations the scheduler counts for
    /// every runtime (and limits for containers).
    fn validate_resources(&self) -> Result<(), SpecError> {
        if let Some(mb) = self.memory_mb {
            if mb < MIN_MEMORY_MB {
                return Err(SpecError::new(
                    "memory",
                    format!("{mb} MB is too small; use at least {MIN_MEMORY_MB} MB"),
                ));
            }
        }
        if self.cpu_millis == Some(0) {
            return Err(SpecError::new(
                "cpu",
                "0 millicores would never run; use a value above 0 (1000 = one CPU)",
            ));
        }
        if self.max_per_node == Some(0) {
            return Err(SpecError::new(
                "max-per-node",
                "0 would place nothing; use at least 1",
            ));
        }
        Ok(())
    }

    fn validate_oci(&self) -> Result<(), SpecError> {
        let Some(image) = &self.image else {
            return Err(SpecError::new(
                "image",
                "the oci runtime needs an image; give --image REF (e.g. 127.0.0.1:5000/demo/web:v1), or use --runtime process with a command",
            ));
        };
        validate_image_reference(image)?;
        if self.port == Some(0) {
            return Err(SpecError::new(
                "port",
                "0 is not a port; use a container port from 1 to 65535",
            ));
        }
        if let Some(user) = &self.user {
            validate_user(user)?;
        }
        Ok(())
    }
}

/// Checks a reference like `[host[:port]/]path[:tag][@sha256:<64 hex>]` as
/// registries accept it: lowercase path components, a tag of at most 128
/// word characters, dots and dashes, and a sha256 digest.
pub fn validate_image_reference(reference: &str) -> Result<(), SpecError> {
    let bad = |why: &str| {
        SpecError::new(
            "image",
            format!("\"{reference}\" is not an image reference: {why}; use e.g. 127.0.0.1:5000/demo/web:v1 or busybox@sha256:<64 hex digits>"),
        )
    };
    if reference.is_empty() {
        return Err(bad("it is empty"));
    }
    if reference
        .chars()
        .any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(bad("it contains whitespace"));
    }
    let (name_tag, digest) = match reference.split_once('@') {
        Some((n, d)) => (n, Some(d)),
        None => (reference, None),
    };
    if let Some(digest) = digest {
        let hex = digest
            .strip_prefix("sha256:")
            .ok_or_else(|| bad("the digest must start with sha256:"))?;
        if hex.len() != 64
            || !hex
                .chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        {
            return Err(bad("a sha256 digest has 64 lowercase hex digits"));
        }
    }
    // A tag follows the last ':' that comes after the last '/'.
    let last_slash = name_tag.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match name_tag[last_slash..].rfind(':') {
        Some(i) => (
            &name_tag[..last_slash + i],
            Some(&name_tag[last_slash + i + 1..]),
        ),
        None => (name_tag, None),
    };
    if let Some(tag) = tag {
        let valid = !tag.is_empty()
            && tag.len() <= 128
            && tag.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_')
            && tag
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
        if !valid {
            return Err(bad("a tag has 1-128 letters, digits, '_', '.' and '-'"));
        }
    }
    let mut components: Vec<&str> = name.split('/').collect();
    // The first component is a registry host when it looks like one.
    if components.len() > 1 && (components[0].contains(['.', ':']) || components[0] == "localhost")
    {
        let host = components.remove(0);
        let (hostname, port) = match host.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (host, None),
        };
        if hostname.is_empty()
            || !hostname
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-'))
        {
            return Err(bad("the registry host is not a host name"));
        }
        if port.is_some_and(|p| p.parse::<u16>().map_or(true, |p| p == 0)) {
            return Err(bad("the registry port is not a port"));
        }
    }
    for component in components {
        let valid = !component.is_empty()
            && component.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
            && component.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
            && component.chars().all(|c| {
                c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-')
            });
        if !valid {
            return Err(bad(
                "repository names use lowercase letters, digits and '.', '_', '-' between them",
            ));
        }
    }
    Ok(())
}

/// `name`, `uid`, `name:group` or `uid:gid`; resolved later in the image.
pub fn validate_user(user: &str) -> Result<(), SpecError> {
    let valid_part = |p: &str| {
        !p.is_empty()
            && p.len() <= 32
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    };
    let valid = match user.split_once(':') {
        Some((u, g)) => valid_part(u) && valid_part(g),
        None => valid_part(user),
    };
    if valid {
        Ok(())
    } else {
        Err(SpecError::new(
            "user",
            format!("\"{user}\" is not a user; use a name or uid, optionally with :group or :gid (e.g. nobody, 1000:1000)"),
        ))
    }
}

pub fn validate_health(health: &HealthCheck) -> Result<(), SpecError> {
    match &health.kind {
        HealthKind::Http { path } if !path.starts_with('/') => {
            return Err(SpecError::new(
                "health",
                format!(
                "the HTTP check path \"{path}\" must start with '/', e.g. --health-http /healthz"
            ),
            ))
        }
        HealthKind::Http { path } if path.chars().any(|c| c.is_whitespace() || c.is_control()) => {
            return Err(SpecError::new(
                "health",
                "the HTTP check path contains whitespace; percent-encode it",
            ))
        }
        HealthKind::Exec { command }
            if command.first().filter(|p| !p.trim().is_empty()).is_none() =>
        {
            return Err(SpecError::new(
                "health",
                "the exec check command is empty; give it as --health-cmd 'CMD ARGS'",
            ))
        }
        _ => {}
    }
    if health.interval_ms > 0 && health.interval_ms < limits::MIN_HEALTH_INTERVAL_MS {
        return Err(SpecError::new(
            "health",
            format!(
                "an interval of {} ms is too short; use at least {} ms (e.g. --health-interval 1s)",
                health.interval_ms,
                limits::MIN_HEALTH_INTERVAL_MS
            ),
        ));
    }
    let long_path =
        matches!(&health.kind, HealthKind::Http { path } if path.len() > limits::TEXT_BYTES);
    let long_command = matches!(&health.kind, HealthKind::Exec { command } if command.len() > limits::ARGS
        || command.iter().map(String::len).sum::<usize>() > limits::ARGS_BYTES);
    if long_path || long_command {
        return Err(SpecError::new(
            "health",
            "the check is too long; shorten its path or command",
        ));
    }
    if health.timeout_ms > 0 && health.interval_ms > 0 && health.timeout_ms > health.interval_ms {
        return Err(SpecError::new(
            "health",
            format!(
                "the timeout ({} ms) exceeds the interval ({} ms); use a timeout at most the interval",
                health.timeout_ms, health.interval_ms
            ),
        ));
    }
    Ok(())
}

/// A service name is a DNS label: 1-63 of `a-z`, `0-9` and `-`, starting
/// with a letter and not ending with `-`.
pub fn validate_name(name: &str) -> Result<(), SpecError> {
    let fix = "use 1-63 lowercase letters, digits and '-', starting with a letter";
    if name.is_empty() {
        return Err(SpecError::new("name", format!("the name is empty; {fix}")));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(SpecError::new(
            "name",
            format!("\"{name}\" is {} characters long; {fix}", name.len()),
        ));
    }
    let valid_chars = name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    let starts_with_letter = name.starts_with(|c: char| c.is_ascii_lowercase());
    if !valid_chars || !starts_with_letter || name.ends_with('-') {
        return Err(SpecError::new(
            "name",
            format!("\"{name}\" is not valid; {fix}"),
        ));
    }
    Ok(())
}

/// Replicas must lie in `0..=MAX_REPLICAS`; takes a signed value so that a
/// negative count from any client is named as such.
pub fn validate_replicas(replicas: i64) -> Result<u32, SpecError> {
    if !(0..=i64::from(MAX_REPLICAS)).contains(&replicas) {
        return Err(SpecError::new(
            "replicas",
            format!("{replicas} is out of range; use a count from 0 to {MAX_REPLICAS}"),
        ));
    }
    Ok(replicas as u32)
}

/// Largest cluster variable value: variables are for small settings.
pub const MAX_VARIABLE_BYTES: usize = 64 * 1024;

/// Variable keys are paths of `[A-Za-z0-9_.-]` segments separated by `/`.
pub fn validate_variable(key: &str, value: &str) -> Result<(), SpecError> {
    let valid = !key.is_empty()
        && key.len() <= 256
        && key.split('/').all(|part| {
            !part.is_empty()
                && part != "."
                && part != ".."
                && part
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        });
    if !valid {
        return Err(SpecError::new(
            "key",
            format!("\"{key}\" is not valid; use up to 256 characters of letters, digits, '_', '.', '-' in '/'-separated parts"),
        ));
    }
    if value.len() > MAX_VARIABLE_BYTES {
        return Err(SpecError::new(
            "value",
            format!(
                "{} bytes is too large; variables hold at most {MAX_VARIABLE_BYTES} bytes",
                value.len()
            ),
        ));
    }
    Ok(())
}

/// Environment keys follow POSIX shell names so every program can read them.
pub fn validate_env(key: &str, value: &str) -> Result<(), SpecError> {
    let valid_key = !key.is_empty()
        && key.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid_key {
        return Err(SpecError::new(
            "env",
            format!("\"{key}\" is not a valid variable name; use letters, digits and '_', not starting with a digit"),
        ));
    }
    if key == "PORT" {
        return Err(SpecError::new(
            "env",
            "PORT is set by skiff to the replica's host port; choose another name",
        ));
    }
    if value.contains('\0') {
        return Err(SpecError::new(
            "env",
            format!("the value of {key} contains a NUL byte"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ServiceSpec {
        ServiceSpec {
            name: "web".into(),
            runtime: RuntimeKind::Process,
            replicas: 3,
            command: vec!["python3".into(), "-m".into(), "http.server".into()],
            env: BTreeMap::new(),
            workdir: None,
            ..ServiceSpec::default()
        }
    }

    fn container() -> ServiceSpec {
        ServiceSpec {
            runtime: RuntimeKind::Oci,
            command: vec![],
            image: Some("127.0.0.1:5000/demo/web:v1".into()),
            ..spec()
        }
    }

    #[test]
    fn publish_zero_and_protocol_without_publish_are_refused_naming_the_field() {
        let zero = ServiceSpec {
            publish: Some(0),
            ..spec()
        };
        assert_eq!(zero.validate().unwrap_err().field, "publish");
        let http_unpublished = ServiceSpec {
            protocol: Protocol::Http,
            ..spec()
        };
        assert_eq!(http_unpublished.validate().unwrap_err().field, "protocol");
        let published = ServiceSpec {
            publish: Some(8080),
            protocol: Protocol::Http,
            ..spec()
        };
        assert_eq!(published.validate(), Ok(()));
        assert_eq!(Protocol::parse("udp").unwrap_err().field, "protocol");
    }

    #[test]
    fn a_plain_container_spec_is_valid_without_a_command() {
        assert_eq!(container().validate(), Ok(()));
    }

    #[test]
    fn runtime_defaults_to_oci_when_an_image_is_given() {
        assert_eq!(RuntimeKind::resolve("", true), Ok(RuntimeKind::Oci));
        assert_eq!(RuntimeKind::resolve("", false), Ok(RuntimeKind::Process));
        assert_eq!(
            RuntimeKind::resolve("process", true),
            Ok(RuntimeKind::Process)
        );
    }

    #[test]
    fn oci_needs_an_image_and_process_refuses_container_options() {
        let mut s = container();
        s.image = None;
        let err = s.validate().unwrap_err();
        assert_eq!(err.field, "image");
        assert!(err.problem.contains("--image"), "{err}");

        let mut s = spec();
        s.image = Some("busybox".into());
        assert_eq!(s.validate().unwrap_err().field, "image");
        let mut s = spec();
        s.user = Some("nobody".into());
        assert!(s.validate().unwrap_err().problem.contains("--runtime oci"));
        let mut s = spec();
        s.memory_mb = Some(64);
        s.cpu_millis = Some(250);
        assert_eq!(s.validate(), Ok(()), "reservations apply to processes too");
        let mut s = spec();
        s.network = NetworkMode::Host;
        assert_eq!(s.validate().unwrap_err().field, "network");
    }

    #[test]
    fn image_references_are_checked() {
        for good in [
            "busybox",
            "library/busybox:1.36",
            "127.0.0.1:5000/demo/web:v1",
            "localhost/a/b",
            "registry.example.com/team/app-x_y.z:v1.2-rc",
            &format!("demo/web@sha256:{}", "a".repeat(64)),
            &format!("127.0.0.1:5000/demo/web:v2@sha256:{}", "0".repeat(64)),
        ] {
            assert_eq!(validate_image_reference(good), Ok(()), "{good}");
        }
        for bad in [
            "",
            "Busybox",
            "demo/web:",
            "demo//web",
            "demo/web:v 1",
            "demo/web@sha256:abc",
            "demo/web@md5:abc",
            "127.0.0.1:99999/web",
            "-web",
            "web:*",
        ] {
            let err = validate_image_reference(bad).unwrap_err();
            assert_eq!(err.field, "image", "{bad}");
            assert!(err.problem.contains("e.g."), "{err}");
        }
    }

    #[test]
    fn container_limits_and_port_are_checked() {
        let mut s = container();
        s.memory_mb = Some(3);
        let err = s.validate().unwrap_err();
        assert_eq!(err.field, "memory");
        assert!(err.problem.contains("at least 4 MB"), "{err}");
        s.memory_mb = Some(4);
        assert_eq!(s.validate(), Ok(()));
        s.cpu_millis = Some(0);
        assert_eq!(s.validate().unwrap_err().field, "cpu");
        s.cpu_millis = Some(250);
        s.port = Some(0);
        assert_eq!(s.validate().unwrap_err().field, "port");
        s.port = Some(80);
        assert_eq!(s.validate(), Ok(()));
    }

    #[test]
    fn users_are_names_or_ids_with_an_optional_group() {
        for good in [
            "nobody",
            "1000",
            "1000:1000",
            "www-data:www-data",
            "app.user",
        ] {
            assert_eq!(validate_user(good), Ok(()), "{good}");
        }
        for bad in ["", ":", "a:", "a b", "a:b:c", "root;"] {
            assert_eq!(validate_user(bad).unwrap_err().field, "user", "{bad}");
        }
    }

    #[test]
    fn health_checks_are_checked() {
        let check = |kind| HealthCheck {
            kind,
            interval_ms: 0,
            timeout_ms: 0,
            retries: 0,
            start_period_ms: 0,
        };
        assert!(validate_health(&check(HealthKind::Http { path: "/".into() })).is_ok());
        assert!(validate_health(&check(HealthKind::Tcp)).is_ok());
        let err = validate_health(&check(HealthKind::Http {
            path: "healthz".into(),
        }))
        .unwrap_err();
        assert!(err.problem.contains("--health-http /healthz"), "{err}");
        assert!(validate_health(&check(HealthKind::Exec { command: vec![] })).is_err());
        let mut slow = check(HealthKind::Tcp);
        slow.interval_ms = 1000;
        slow.timeout_ms = 2000;
        assert!(validate_health(&slow)
            .unwrap_err()
            .problem
            .contains("timeout"));
    }

    #[test]
    fn health_checks_round_trip_through_json() {
        let h = HealthCheck {
            kind: HealthKind::Exec {
                command: vec!["true".into()],
            },
            interval_ms: 1,
            timeout_ms: 1,
            retries: 2,
            start_period_ms: 0,
        };
        let json = serde_json::to_string(&h).unwrap();
        assert_eq!(serde_json::from_str::<HealthCheck>(&json).unwrap(), h);
        let old: ServiceSpec = serde_json::from_str(
            r#"{"name":"web","runtime":"process","replicas":1,"command":["true"],"env":{},"workdir":null}"#,
        )
        .unwrap();
        assert_eq!(old.network, NetworkMode::Bridge);
        assert_eq!(old.image, None);
    }

    #[test]
    fn a_plain_spec_is_valid() {
        assert_eq!(spec().validate(), Ok(()));
    }

    #[test]
    fn an_empty_command_is_refused_naming_the_command() {
        let mut s = spec();
        s.command.clear();
        assert_eq!(s.validate().unwrap_err().field, "command");
        s.command = vec!["  ".into()];
        assert_eq!(s.validate().unwrap_err().field, "command");
    }

    #[test]
    fn replica_counts_outside_the_range_are_refused() {
        assert!(validate_replicas(-1)
            .unwrap_err()
            .to_string()
            .contains("-1"));
        assert!(validate_replicas(1001).is_err());
        assert_eq!(validate_replicas(0), Ok(0));
        assert_eq!(validate_replicas(1000), Ok(1000));
        let mut s = spec();
        s.replicas = 100_000;
        assert_eq!(s.validate().unwrap_err().field, "replicas");
    }

    #[test]
    fn names_must_be_dns_labels() {
        for bad in ["", "Web", "1web", "web-", "we b", "web_1", &"a".repeat(64)] {
            assert_eq!(validate_name(bad).unwrap_err().field, "name", "{bad:?}");
        }
        for good in ["web", "web-1", "a", &"a".repeat(63)] {
            assert_eq!(validate_name(good), Ok(()), "{good:?}");
        }
    }

    #[test]
    fn env_keys_must_be_shell_names_and_port_is_reserved() {
        assert!(validate_env("GREETING", "hi").is_ok());
        assert!(validate_env("_X1", "").is_ok());
        for bad in ["", "1X", "A-B", "A=B"] {
            assert!(validate_env(bad, "v").is_err(), "{bad:?}");
        }
        assert!(validate_env("PORT", "80")
            .unwrap_err()
            .problem
            .contains("PORT"));
    }

    #[test]
    fn relative_workdirs_are_refused() {
        let mut s = spec();
        s.workdir = Some("tmp".into());
        assert_eq!(s.validate().unwrap_err().field, "workdir");
    }

    #[test]
    fn constraints_parse_print_and_hold() {
        let labels: BTreeMap<String, String> = [("zone".to_string(), "a".to_string())].into();
        let none = BTreeMap::new();
        let eq = Constraint::parse("zone==a").unwrap();
        assert_eq!(eq.to_string(), "zone==a");
        assert!(eq.holds(&labels, "n1", "127.0.0.1"));
        assert!(!eq.holds(&none, "n1", "127.0.0.1"));
        let ne = Constraint::parse(" zone != b ").unwrap();
        assert_eq!(ne.to_string(), "zone!=b");
        assert!(ne.holds(&labels, "n1", "") && ne.holds(&none, "n1", ""));
        let within = Constraint::parse("zone in (b, a)").unwrap();
        assert_eq!(within.to_string(), "zone in (b,a)");
        assert!(within.holds(&labels, "n1", "") && !within.holds(&none, "n1", ""));
        let name = Constraint::parse("node.name==n2").unwrap();
        assert!(!name.holds(&labels, "n1", "") && name.holds(&labels, "n2", ""));
        for bad in [
            "zone",
            "zone==",
            "==a",
            "zone in a,b",
            "zone in ()",
            "zone==a b",
        ] {
            let err = Constraint::parse(bad).unwrap_err();
            assert_eq!(err.field, "constraint", "{bad}");
            assert!(err.problem.contains("zone==a"), "{err}");
        }
    }

    #[test]
    fn a_constraint_without_values_is_refused_not_a_panic() {
        for values in [vec![], vec!["a".to_string(), "b".to_string()]] {
            let mut s = spec();
            s.constraints = vec![Constraint {
                attribute: "zone".into(),
                op: ConstraintOp::Eq,
                values,
            }];
            assert_eq!(s.validate().unwrap_err().field, "constraint");
            assert!(!s.constraints[0].holds(&BTreeMap::new(), "n1", ""));
        }
        let mut s = spec();
        s.constraints = vec![Constraint {
            attribute: "zone".into(),
            op: ConstraintOp::In,
            values: vec![],
        }];
        assert_eq!(s.validate().unwrap_err().field, "constraint");
    }

    #[test]
    fn variable_keys_have_no_dot_segments() {
        assert!(validate_variable("app/db.url", "x").is_ok());
        for bad in ["..", "a/../b", "./a", "a//b"] {
            assert_eq!(
                validate_variable(bad, "x").unwrap_err().field,
                "key",
                "{bad}"
            );
        }
    }

    #[test]
    fn oversized_specs_are_refused_naming_the_field() {
        let mut s = spec();
        s.env = (0..=limits::ENV_VARS)
            .map(|i| (format!("K{i}"), String::new()))
            .collect();
        assert_eq!(s.validate().unwrap_err().field, "env");
        let mut s = spec();
        s.env.insert("BIG".into(), "x".repeat(limits::ENV_BYTES));
        assert!(s.validate().unwrap_err().problem.contains("bytes"));
        let mut s = container();
        s.env.insert("A".into(), "x".repeat(100 * 1024));
        s.command = vec!["y".repeat(100 * 1024)];
        s.entrypoint = Some(vec!["z".repeat(100 * 1024)]);
        assert_eq!(s.validate().unwrap_err().field, "spec");
        let mut s = spec();
        s.command = vec!["x".to_string(); limits::ARGS + 1];
        assert_eq!(s.validate().unwrap_err().field, "command");
        let mut s = spec();
        s.constraints = vec![Constraint::parse("zone==a").unwrap(); limits::CONSTRAINTS + 1];
        assert_eq!(s.validate().unwrap_err().field, "constraint");
        let mut s = spec();
        s.health = Some(HealthCheck {
            kind: HealthKind::Exec {
                command: vec!["true".into()],
            },
            interval_ms: 1,
            timeout_ms: 0,
            retries: 0,
            start_period_ms: 0,
        });
        assert!(s.validate().unwrap_err().problem.contains("too short"));
    }

    #[test]
    fn unknown_runtimes_are_refused() {
        assert_eq!(RuntimeKind::parse("docker").unwrap_err().field, "runtime");
    }
}
