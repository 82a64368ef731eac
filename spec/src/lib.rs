//! Skiff's one service vocabulary, shared by the CLI, the control plane and
//! the agent: what an operator declares about a service, the rules it must
//! follow, and its forms on the wire and in files.
//!
//! # Layout
//! - [`service`]: the service spec, its enums (runtime, network, mode,
//!   placement, protocol, health check, constraint) and [`ServiceSpec::validate`],
//!   the one validation every side calls.
//! - [`policy`]: the update and autoscale policies.
//! - [`alloc`]: the states of an allocation.
//! - [`diff`]: what changed between two specs, field by field.
//! - [`pb`]: the protobuf conversions, in one place.
//! - [`secret`]: references to secrets, read as files in `/run/secrets`.
//! - [`volume`]: named volumes and bind mounts, and their scope.
//! - [`stack`]: stack files (Compose and Skiff's own format) into specs and back.
//! - [`time`]: RFC 3339 times as Skiff prints and reads them.

pub mod alloc;
pub mod diff;
pub mod pb;
pub mod policy;
pub mod secret;
pub mod service;
pub mod stack;
pub mod time;
pub mod volume;

pub use alloc::AllocState;
pub use diff::{spec_diff, value_hash};
pub use policy::{AutoscalePolicy, Strategy, UpdatePolicy};
pub use secret::{
    validate_secret_name, validate_secret_value, OnChange, SecretRef, MAX_SECRETS,
    MAX_SECRETS_TOTAL_BYTES, MAX_SECRET_BYTES, SECRETS_DIR,
};
pub use service::{
    validate_env, validate_health, validate_image_reference, validate_name, validate_replicas,
    validate_user, validate_variable, Constraint, ConstraintOp, Dependency, DependsCondition,
    HealthCheck, HealthKind, NetworkMode, PlacementPolicy, Protocol, RuntimeKind, ServiceMode,
    ServiceSpec, SpecError, MAX_JOB_DEADLINE_SECS, MAX_JOB_RETRIES, MAX_LABELS, MAX_NAME_LEN,
    MAX_REPLICAS, MAX_VARIABLE_BYTES, MIN_MEMORY_MB, SECCOMP_UNCONFINED, STACK_LABEL,
};
pub use volume::{host_path_allowed, validate_volume_name, Mount, MountKind, VolumeScope};
