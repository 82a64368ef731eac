//! What a service mounts into its containers: named volumes (kept on the
//! node across updates, restarts and `service rm`, removed only by
//! `skiff volume rm`) and bind mounts of host paths (allowed by each
//! agent's `--allow-host-path`), with their text forms (`--volume`,
//! `--mount`, Compose's short syntax) and their validation.
//!
//! Named volumes are per replica by default: replica `i` of a replicated
//! service (its allocation's slot) gets its own volume `NAME-i`, like a
//! Kubernetes StatefulSet, so two replicas never share a data directory.
//! `--volume-scope shared` (and every global service) uses one volume
//! `NAME` per node instead.

use serde::{Deserialize, Serialize};

use crate::{RuntimeKind, ServiceMode, ServiceSpec, SpecError, Strategy};

/// Most mounts on one service.
pub const MAX_MOUNTS: usize = 32;

/// Longest volume name as declared: the per-replica suffix (`-999`) must
/// still fit a 63-byte name.
pub const MAX_VOLUME_NAME: usize = 59;

/// What a mount's source is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MountKind {
    /// A named volume the agent keeps under its data dir.
    #[default]
    Volume,
    /// A path on the node, mounted as it is.
    Bind,
}

impl MountKind {
    pub fn as_str(self) -> &'static str {
        match self {
            MountKind::Volume => "volume",
            MountKind::Bind => "bind",
        }
    }
}

/// One mount of a service's containers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mount {
    pub kind: MountKind,
    /// The volume's name, or the host path of a bind mount.
    pub source: String,
    /// Absolute path inside the container.
    pub target: String,
    #[serde(default)]
    pub read_only: bool,
    /// Do not copy the image's content at `target` into a new, empty
    /// volume (Docker's `nocopy`).
    #[serde(default)]
    pub nocopy: bool,
}

/// Whether replicas of a service share its named volumes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VolumeScope {
    /// Replica `i` gets its own volume `NAME-i`, on the node it was first
    /// placed on, and is always placed back there.
    #[default]
    PerReplica,
    /// One volume `NAME` per node, shared by the replicas there.
    Shared,
}

impl VolumeScope {
    pub fn as_str(self) -> &'static str {
        match self {
            VolumeScope::PerReplica => "per-replica",
            VolumeScope::Shared => "shared",
        }
    }

    pub fn parse(value: &str) -> Result<Self, SpecError> {
        match value {
            "" | "per-replica" => Ok(VolumeScope::PerReplica),
            "shared" => Ok(VolumeScope::Shared),
            other => Err(SpecError::new(
                "volume-scope",
                format!("unknown scope \"{other}\"; use --volume-scope per-replica or --volume-scope shared"),
            )),
        }
    }
}

impl Mount {
    /// `--volume NAME:/path[:ro][:nocopy]`, or `/host/path:/path[:ro]` for
    /// a bind mount (Docker's and Compose's short syntax).
    pub fn parse_volume(text: &str) -> Result<Self, SpecError> {
        let bad = |why: &str| {
            SpecError::new(
                "volume",
                format!("\"{text}\" {why}; use NAME:/path[:ro][:nocopy], e.g. --volume data:/var/lib/data"),
            )
        };
        let mut parts = text.split(':');
        let (Some(source), Some(target)) = (parts.next(), parts.next()) else {
            return Err(bad("has no target path"));
        };
        let kind = if source.starts_with('/') {
            MountKind::Bind
        } else {
            MountKind::Volume
        };
        let mut mount = Mount {
            kind,
            source: source.to_string(),
            target: target.to_string(),
            ..Mount::default()
        };
        for option in parts.flat_map(|o| o.split(',')) {
            match option {
                "ro" => mount.read_only = true,
                "rw" => mount.read_only = false,
                "nocopy" => mount.nocopy = true,
                other => return Err(bad(&format!("has an unknown option \"{other}\""))),
            }
        }
        mount.validate()?;
        Ok(mount)
    }

    /// `--mount type=bind,src=/host/path,dst=/path[,ro]` (also
    /// `type=volume,src=NAME,...`; `source`/`target`/`destination` and
    /// `readonly` as Docker spells them).
    pub fn parse_mount(text: &str) -> Result<Self, SpecError> {
        let bad = |why: &str| {
            SpecError::new(
                "mount",
                format!("\"{text}\" {why}; use type=bind,src=/host/path,dst=/path[,ro]"),
            )
        };
        let mut kind = None;
        let mut mount = Mount::default();
        for part in text.split(',') {
            let (key, value) = part.split_once('=').unwrap_or((part, ""));
            match key {
                "type" => {
                    kind = Some(match value {
                        "bind" => MountKind::Bind,
                        "volume" => MountKind::Volume,
                        other => return Err(bad(&format!("has an unknown type \"{other}\""))),
                    })
                }
                "src" | "source" => mount.source = value.to_string(),
                "dst" | "destination" | "target" => mount.target = value.to_string(),
                "ro" | "readonly" if matches!(value, "" | "true" | "1") => mount.read_only = true,
                "ro" | "readonly" if matches!(value, "false" | "0") => mount.read_only = false,
                "volume-nocopy" | "nocopy" => mount.nocopy = true,
                other => return Err(bad(&format!("has an unknown key \"{other}\""))),
            }
        }
        mount.kind = kind.ok_or_else(|| bad("names no type"))?;
        mount
            .validate()
            .map_err(|e| SpecError::new("mount", e.problem))?;
        Ok(mount)
    }

    /// Checks one mount however it arrived: an absolute, plain target; a
    /// valid volume name or an absolute host path.
    pub fn validate(&self) -> Result<(), SpecError> {
        let field = match self.kind {
            MountKind::Volume => "volume",
            MountKind::Bind => "mount",
        };
        if !self.target.starts_with('/') {
            return Err(SpecError::new(
                field,
                format!(
                    "the target \"{}\" is not an absolute path; give the path inside the container, e.g. {}:/data",
                    self.target, self.source
                ),
            ));
        }
        if !plain_path(&self.target) || self.target == "/" {
            return Err(SpecError::new(
                field,
                format!("the target \"{}\" is not a plain path below /; drop '..', '.' and empty components", self.target),
            ));
        }
        match self.kind {
            MountKind::Volume => validate_volume_name(&self.source),
            MountKind::Bind => {
                if !self.source.starts_with('/') || !plain_path(&self.source) {
                    return Err(SpecError::new(
                        "mount",
                        format!("the host path \"{}\" is not an absolute plain path; use e.g. src=/srv/data", self.source),
                    ));
                }
                if self.nocopy {
                    return Err(SpecError::new(
                        "mount",
                        "nocopy applies to volumes only; drop it from the bind mount",
                    ));
                }
                Ok(())
            }
        }
    }
}

impl std::fmt::Display for Mount {
    /// The `--volume` form for volumes, the `--mount` form for binds.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.kind {
            MountKind::Volume => {
                write!(f, "{}:{}", self.source, self.target)?;
                if self.read_only {
                    write!(f, ":ro")?;
                }
                if self.nocopy {
                    write!(f, ":nocopy")?;
                }
                Ok(())
            }
            MountKind::Bind => {
                write!(f, "type=bind,src={},dst={}", self.source, self.target)?;
                if self.read_only {
                    write!(f, ",ro")?;
                }
                Ok(())
            }
        }
    }
}

/// Absolute, with no empty, `.` or `..` component (after the leading `/`),
/// no NUL and no ':' (the separator of the short syntax).
fn plain_path(path: &str) -> bool {
    path.len() <= 4096
        && !path.contains(['\0', ':', ','])
        && path.strip_prefix('/').is_some_and(|rest| {
            rest.is_empty() || rest.split('/').all(|c| !matches!(c, "" | "." | ".."))
        })
}

/// A volume name: 1-59 lowercase letters, digits, '_', '.' and '-',
/// starting with a letter or digit (room is kept for the `-i` suffix of
/// per-replica volumes).
pub fn validate_volume_name(name: &str) -> Result<(), SpecError> {
    let valid = !name.is_empty()
        && name.len() <= MAX_VOLUME_NAME
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '.' | '-'));
    if valid {
        Ok(())
    } else {
        Err(SpecError::new(
            "volume",
            format!("\"{name}\" is not a volume name; use 1-{MAX_VOLUME_NAME} lowercase letters, digits, '_', '.' and '-', starting with a letter or digit"),
        ))
    }
}

/// Whether an agent allowing `prefixes` (`--allow-host-path`) may mount
/// `path`: it equals a prefix or lies below one, component-wise (`/srv`
/// allows `/srv/data`, not `/srvx`).
pub fn host_path_allowed(path: &str, prefixes: &[String]) -> bool {
    prefixes.iter().any(|prefix| {
        let prefix = prefix.trim_end_matches('/');
        prefix.is_empty()
            || path == prefix
            || path
                .strip_prefix(prefix)
                .is_some_and(|rest| rest.starts_with('/'))
    })
}

impl ServiceSpec {
    /// Whether each replica owns its named volumes: per-replica scope on a
    /// replicated service. Such replicas are placed back on the node that
    /// holds their volumes and replaced stop-first, never surged.
    pub fn owns_volumes(&self) -> bool {
        self.mode == ServiceMode::Replicated
            && self.volume_scope == VolumeScope::PerReplica
            && self.volumes.iter().any(|m| m.kind == MountKind::Volume)
    }

    /// The name on the node of the volume `mount` for the replica in
    /// `slot`: `NAME-slot` when replicas own their volumes, else `NAME`.
    pub fn volume_name(&self, mount: &Mount, slot: u32) -> String {
        if self.owns_volumes() {
            format!("{}-{slot}", mount.source)
        } else {
            mount.source.clone()
        }
    }

    /// Names of the named volumes the replica in `slot` uses.
    pub fn volume_names(&self, slot: u32) -> Vec<String> {
        self.volumes
            .iter()
            .filter(|m| m.kind == MountKind::Volume)
            .map(|m| self.volume_name(m, slot))
            .collect()
    }

    pub(crate) fn validate_volumes(&self) -> Result<(), SpecError> {
        if self.volumes.is_empty() {
            return Ok(());
        }
        if self.volumes.len() > MAX_MOUNTS {
            return Err(SpecError::new(
                "volume",
                format!(
                    "{} mounts is too many; use at most {MAX_MOUNTS}",
                    self.volumes.len()
                ),
            ));
        }
        if self.runtime != RuntimeKind::Oci {
            return Err(SpecError::new(
                "volume",
                "volumes and mounts apply to containers only; use --image REF, or drop --volume/--mount",
            ));
        }
        let mut targets = std::collections::BTreeSet::new();
        for mount in &self.volumes {
            mount.validate()?;
            if !targets.insert(mount.target.as_str()) {
                return Err(SpecError::new(
                    "volume",
                    format!(
                        "two mounts target {}; give each mount its own path",
                        mount.target
                    ),
                ));
            }
        }
        if self.owns_volumes() && self.update.strategy != Strategy::Rolling {
            return Err(SpecError::new(
                "update-strategy",
                format!(
                    "{} runs two versions side by side, but a replica's volume may not be shared; use --update-strategy rolling or --volume-scope shared",
                    self.update.strategy.as_str()
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container() -> ServiceSpec {
        ServiceSpec {
            name: "db".into(),
            runtime: RuntimeKind::Oci,
            image: Some("127.0.0.1:5000/demo/web:v1".into()),
            replicas: 2,
            ..ServiceSpec::default()
        }
    }

    #[test]
    fn the_short_syntax_gives_named_volumes_and_binds_with_options() {
        let m = Mount::parse_volume("data:/var/lib/data:ro,nocopy").unwrap();
        assert_eq!(
            m,
            Mount {
                kind: MountKind::Volume,
                source: "data".into(),
                target: "/var/lib/data".into(),
                read_only: true,
                nocopy: true,
            }
        );
        assert_eq!(m.to_string(), "data:/var/lib/data:ro:nocopy");
        assert_eq!(Mount::parse_volume(&m.to_string()).unwrap(), m);
        let b = Mount::parse_volume("/srv/x:/x:ro").unwrap();
        assert_eq!(b.kind, MountKind::Bind);
        assert_eq!(Mount::parse_mount(&b.to_string()).unwrap(), b);
    }

    #[test]
    fn bad_volumes_name_the_field_and_the_fix() {
        let err = Mount::parse_volume("data:var/lib").unwrap_err();
        assert_eq!(err.field, "volume");
        assert!(err.to_string().contains("not an absolute path"), "{err}");
        let err = Mount::parse_volume("Data!:/x").unwrap_err();
        assert!(err.to_string().contains("not a volume name"), "{err}");
        let err = Mount::parse_volume("data").unwrap_err();
        assert!(err.to_string().contains("no target"), "{err}");
        let err = Mount::parse_volume("data:/x/../etc").unwrap_err();
        assert!(err.to_string().contains("plain path"), "{err}");
        let err = Mount::parse_volume("data:/x:rx").unwrap_err();
        assert!(err.to_string().contains("unknown option"), "{err}");
    }

    #[test]
    fn mount_takes_dockers_keys_and_checks_the_host_path() {
        let m = Mount::parse_mount("type=bind,source=/srv/a,destination=/a,readonly").unwrap();
        assert!(m.read_only && m.kind == MountKind::Bind && m.source == "/srv/a");
        let err = Mount::parse_mount("type=bind,src=srv/a,dst=/a").unwrap_err();
        assert_eq!(err.field, "mount");
        assert!(err.to_string().contains("host path"), "{err}");
        assert!(Mount::parse_mount("src=/a,dst=/a").is_err());
        assert!(Mount::parse_mount("type=tmpfs,dst=/a").is_err());
    }

    #[test]
    fn a_spec_refuses_duplicate_targets_process_replicas_and_side_by_side_updates() {
        let mut s = container();
        s.volumes = vec![
            Mount::parse_volume("a:/data").unwrap(),
            Mount::parse_volume("b:/data").unwrap(),
        ];
        let err = s.validate().unwrap_err();
        assert!(err.to_string().contains("two mounts target /data"), "{err}");
        s.volumes.pop();
        s.validate().unwrap();
        s.update.strategy = Strategy::BlueGreen;
        assert_eq!(s.validate().unwrap_err().field, "update-strategy");
        s.volume_scope = VolumeScope::Shared;
        s.validate().unwrap();
        let mut p = ServiceSpec {
            name: "p".into(),
            replicas: 1,
            command: vec!["true".into()],
            ..ServiceSpec::default()
        };
        p.volumes = vec![Mount::parse_volume("a:/data").unwrap()];
        assert!(p
            .validate()
            .unwrap_err()
            .to_string()
            .contains("containers only"));
    }

    #[test]
    fn replicas_own_their_volumes_unless_shared_or_global() {
        let mut s = container();
        let m = Mount::parse_volume("data:/data").unwrap();
        s.volumes = vec![m.clone()];
        assert!(s.owns_volumes());
        assert_eq!(s.volume_name(&m, 1), "data-1");
        s.volume_scope = VolumeScope::Shared;
        assert_eq!(s.volume_names(1), vec!["data".to_string()]);
        s.volume_scope = VolumeScope::PerReplica;
        s.mode = ServiceMode::Global;
        assert!(!s.owns_volumes());
    }

    #[test]
    fn host_paths_are_allowed_below_a_prefix_component_wise() {
        let allowed = vec!["/srv".to_string(), "/tmp/x/".to_string()];
        assert!(host_path_allowed("/srv", &allowed));
        assert!(host_path_allowed("/srv/data", &allowed));
        assert!(host_path_allowed("/tmp/x/y", &allowed));
        assert!(!host_path_allowed("/srvx", &allowed));
        assert!(!host_path_allowed("/etc", &allowed));
        assert!(!host_path_allowed("/etc", &[]));
    }
}
