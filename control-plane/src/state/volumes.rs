//! Named volumes on the nodes: what the state knows of them, and the rules
//! that keep a replica with its data.
//!
//! A volume is recorded when a replica using it is placed (its agent
//! creates it at first use) and kept up to date by its agent's reports
//! (sizes; volumes gone from the disk). It outlives its replicas and its
//! service; only `skiff volume rm` deletes it, and only while no replica
//! uses it. A replica that owns per-replica volumes (`NAME-<slot>`) is
//! pinned to the node holding them: the scheduler asks
//! [`State::pinned_volume`], and the plan applier re-checks with
//! [`State::volumes_allow`].
//!
//! Anonymous volumes (an image's `Volumes` no mount covers) are only
//! reported: they belong to one replica, pin nothing, cannot be removed by
//! `volume rm`, and are forgotten when their agent stops reporting them
//! (it removed the replica's directory).

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use super::{
    AllocState, Allocation, CommandError, DesiredState, EventKind, Outcome, Placement, ServiceSpec,
    State,
};

/// A named volume on one node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    pub name: String,
    pub node: String,
    /// The service whose replica created it (it may be gone since).
    pub service: String,
    /// The replica slot that owns it; `None` for a shared volume.
    pub slot: Option<u32>,
    /// As last reported by its agent.
    pub size_bytes: u64,
    pub create_index: u64,
    /// `skiff volume rm` asked for it; its agent has yet to delete it.
    #[serde(default)]
    pub removing: bool,
    /// `Some` for an anonymous volume (older snapshots hold none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anonymous: Option<AnonymousVolume>,
}

/// The replica an anonymous volume belongs to, and where it is mounted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnonymousVolume {
    pub alloc_id: String,
    pub target: String,
}

/// One volume as an agent reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeReport {
    pub name: String,
    pub service: String,
    pub slot: Option<u32>,
    pub size_bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anonymous: Option<AnonymousVolume>,
}

fn key(node: &str, name: &str) -> String {
    format!("{node}/{name}")
}

impl State {
    /// Where the replica in `slot` of `spec` must run: the node holding one
    /// of its per-replica volumes, if any exists yet (`None` also when its
    /// replicas do not own volumes).
    pub fn pinned_volume(&self, spec: &ServiceSpec, slot: u32) -> Option<&Volume> {
        if !spec.owns_volumes() {
            return None;
        }
        let names = spec.volume_names(slot);
        self.volumes
            .values()
            .find(|v| !v.removing && v.anonymous.is_none() && names.contains(&v.name))
    }

    /// The slots of `service` a new replica may not take: those of
    /// replicas that may still run. A replica that owns volumes keeps its
    /// slot until it has stopped (so its replacement never shares its
    /// data); otherwise, while a deployment is active, only replicas of
    /// the new version hold theirs (a rolling update keeps the slots).
    pub fn taken_slots(&self, service: &str) -> BTreeSet<u32> {
        let Some(record) = self.services.get(service) else {
            return BTreeSet::new();
        };
        let spec = &record.spec;
        let deploying = record.active_deployment().is_some();
        self.allocs_of(service)
            .filter(|a| {
                if spec.owns_volumes() {
                    !matches!(
                        a.state,
                        AllocState::Stopped | AllocState::Unknown | AllocState::Lost
                    )
                } else {
                    a.is_live() && (!deploying || a.spec.runs_same(spec))
                }
            })
            .map(|a| a.slot)
            .collect()
    }

    /// Whether a placement agrees with the volumes, re-checked on apply
    /// (plans may be computed on a stale snapshot): its slot is free and
    /// it goes where its volumes are.
    pub(super) fn volumes_allow(&self, spec: &ServiceSpec, placement: &Placement) -> bool {
        if !spec.owns_volumes() {
            return true;
        }
        if self
            .taken_slots(&placement.service)
            .contains(&placement.slot)
        {
            return false;
        }
        self.pinned_volume(spec, placement.slot)
            .is_none_or(|v| v.node == placement.node)
    }

    /// Replicas on `node` that use the named volume `name` (any not yet
    /// stopped).
    pub fn volume_users<'a>(&'a self, node: &'a str, name: &str) -> Vec<&'a Allocation> {
        self.allocs_on(node)
            .filter(|a| a.holds_resources())
            .filter(|a| a.spec.volume_names(a.slot).iter().any(|n| n == name))
            .collect()
    }

    /// Replicas using `volume` now: for an anonymous one, its replica
    /// while not yet stopped.
    pub fn users_of<'a>(&'a self, volume: &'a Volume) -> Vec<&'a Allocation> {
        match &volume.anonymous {
            None => self.volume_users(&volume.node, &volume.name),
            Some(anonymous) => self
                .allocs
                .get(&anonymous.alloc_id)
                .filter(|a| a.holds_resources())
                .into_iter()
                .collect(),
        }
    }

    /// Volumes `skiff volume rm` asked a node's agent to delete.
    pub fn volumes_to_remove(&self, node: &str) -> Vec<String> {
        self.volumes
            .values()
            .filter(|v| v.node == node && v.removing)
            .map(|v| v.name.clone())
            .collect()
    }

    /// Records the volumes of a new allocation on its node: its agent
    /// creates them at first use, and the next placement of its slot must
    /// find them before the agent's first report.
    pub(super) fn record_placed_volumes(&mut self, index: u64, alloc: &Allocation) {
        let owned = alloc.spec.owns_volumes();
        for name in alloc.spec.volume_names(alloc.slot) {
            self.volumes
                .entry(key(&alloc.node, &name))
                .or_insert_with(|| Volume {
                    name,
                    node: alloc.node.clone(),
                    service: alloc.service.clone(),
                    slot: owned.then_some(alloc.slot),
                    size_bytes: 0,
                    create_index: index,
                    removing: false,
                    anonymous: None,
                });
        }
    }

    /// A node's whole set of volumes: sizes are updated, new ones added;
    /// a recorded volume the agent no longer has is forgotten unless a
    /// replica of the node is about to create it (anonymous ones always:
    /// the agent creates them only with their replica's directory).
    pub(super) fn report_volumes(&mut self, index: u64, node: &str, reports: Vec<VolumeReport>) {
        let reported: BTreeSet<String> = reports.iter().map(|r| r.name.clone()).collect();
        for report in reports {
            let entry = self
                .volumes
                .entry(key(node, &report.name))
                .or_insert_with(|| Volume {
                    name: report.name.clone(),
                    node: node.to_string(),
                    service: report.service.clone(),
                    slot: report.slot,
                    size_bytes: 0,
                    create_index: index,
                    removing: false,
                    anonymous: report.anonymous.clone(),
                });
            entry.size_bytes = report.size_bytes;
        }
        let gone: Vec<String> = self
            .volumes
            .iter()
            .filter(|(_, v)| v.node == node && !reported.contains(&v.name))
            .filter(|(_, v)| {
                v.removing || v.anonymous.is_some() || self.volume_users(node, &v.name).is_empty()
            })
            .map(|(k, _)| k.clone())
            .collect();
        for k in gone {
            if let Some(volume) = self.volumes.remove(&k) {
                if volume.removing {
                    self.event(
                        index,
                        EventKind::VolumeRemoved,
                        &volume.service,
                        node,
                        "",
                        &volume.name,
                    );
                }
            }
        }
    }

    /// `skiff volume rm NAME [--node N]`.
    pub(super) fn remove_volume(
        &mut self,
        index: u64,
        name: &str,
        node: Option<&str>,
    ) -> Result<Outcome, CommandError> {
        let matches: Vec<String> = self
            .volumes
            .iter()
            .filter(|(_, v)| v.name == name && node.is_none_or(|n| n == v.node))
            .map(|(k, _)| k.clone())
            .collect();
        let k = match matches.as_slice() {
            [] => {
                return Err(CommandError::Volume(format!(
                    "volume \"{name}\" not found; see `skiff volume ls`"
                )))
            }
            [one] => one.clone(),
            many => {
                let nodes: Vec<&str> = many.iter().filter_map(|k| k.split('/').next()).collect();
                return Err(CommandError::Volume(format!(
                    "volume \"{name}\" is on nodes {}; name one with --node",
                    nodes.join(", ")
                )));
            }
        };
        let Some(volume) = self.volumes.get(&k).cloned() else {
            return Ok(Outcome::Done);
        };
        if let Some(anonymous) = &volume.anonymous {
            let at = Some(&anonymous.target)
                .filter(|t| !t.is_empty())
                .map(|t| format!(" at {t}"))
                .unwrap_or_default();
            return Err(CommandError::Volume(format!(
                "volume \"{name}\" is the anonymous volume{at} of replica {} of service {} on {}; it is removed with its replica",
                anonymous.alloc_id, volume.service, volume.node
            )));
        }
        if let Some(user) = self.volume_users(&volume.node, name).first() {
            let verb = if user.desired == DesiredState::Run {
                "used"
            } else {
                "still used (stopping)"
            };
            return Err(CommandError::Volume(format!(
                "volume \"{name}\" is {verb} by replica {} of service {} on {}; remove or scale down the service first",
                user.id, user.service, user.node
            )));
        }
        if !self.nodes.contains_key(&volume.node) {
            // Its node was removed: nobody is left to delete it.
            self.volumes.remove(&k);
        } else if let Some(v) = self.volumes.get_mut(&k) {
            v.removing = true;
            self.index.node_changed.insert(volume.node.clone(), index);
        }
        Ok(Outcome::Done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::fixtures::{node, spec};
    use crate::state::{Command, Plan, RuntimeKind};

    fn db(replicas: u32) -> ServiceSpec {
        let mut s = spec("db", replicas);
        s.runtime = RuntimeKind::Oci;
        s.command = vec![];
        s.image = Some("127.0.0.1:5000/demo/web:v1".into());
        s.volumes = vec![skiff_spec::Mount::parse_volume("data:/data").unwrap()];
        s
    }

    fn placement(id: &str, node: &str, port: u16, slot: u32) -> Placement {
        Placement {
            id: id.into(),
            service: "db".into(),
            node: node.into(),
            host_port: port,
            slot,
        }
    }

    fn setup() -> State {
        let mut s = State::default();
        s.apply(1, node("n1")).unwrap();
        s.apply(2, node("n2")).unwrap();
        s.apply(3, Command::CreateService { spec: db(2) }).unwrap();
        s
    }

    #[test]
    fn a_placed_replica_records_its_volume_and_pins_its_slot_to_the_node() {
        let mut s = setup();
        let plan = Plan {
            place: vec![placement("a", "n1", 20000, 0)],
            ..Plan::default()
        };
        s.apply(4, Command::ApplyPlan { plan }).unwrap();
        let spec = s.services["db"].spec.clone();
        let pinned = s.pinned_volume(&spec, 0).unwrap();
        assert_eq!(
            (pinned.name.as_str(), pinned.node.as_str()),
            ("data-0", "n1")
        );
        assert!(s.pinned_volume(&spec, 1).is_none());
        assert_eq!(s.taken_slots("db"), BTreeSet::from([0]));
        // The same slot twice, or elsewhere than its volume, is refused on apply.
        assert!(!s.volumes_allow(&spec, &placement("b", "n1", 20001, 0)));
        assert!(s.volumes_allow(&spec, &placement("b", "n2", 20001, 1)));
    }

    #[test]
    fn volume_rm_is_refused_while_used_and_the_agents_report_forgets_it() {
        let mut s = setup();
        let plan = Plan {
            place: vec![placement("a", "n1", 20000, 0)],
            ..Plan::default()
        };
        s.apply(4, Command::ApplyPlan { plan }).unwrap();
        let report = |size| Command::ReportVolumes {
            node: "n1".into(),
            volumes: vec![VolumeReport {
                name: "data-0".into(),
                service: "db".into(),
                slot: Some(0),
                size_bytes: size,
                anonymous: None,
            }],
        };
        s.apply(5, report(42)).unwrap();
        assert_eq!(s.volumes["n1/data-0"].size_bytes, 42);
        let err = s
            .apply(
                6,
                Command::RemoveVolume {
                    name: "data-0".into(),
                    node: None,
                },
            )
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("used by replica a of service db on n1"),
            "{err}"
        );
        s.apply(7, Command::RemoveService { name: "db".into() })
            .unwrap();
        s.apply(
            8,
            Command::ReportAllocs {
                node: "n1".into(),
                reports: vec![crate::state::AllocReport {
                    id: "a".into(),
                    state: AllocState::Stopped,
                    restarts: 0,
                    pid: 0,
                    message: String::new(),
                    port: 0,
                    health_checked: false,
                    exit_code: None,
                    refused: false,
                }],
            },
        )
        .unwrap();
        // Kept after the service is gone.
        s.apply(9, report(42)).unwrap();
        assert!(s.volumes.contains_key("n1/data-0"));
        s.apply(
            10,
            Command::RemoveVolume {
                name: "data-0".into(),
                node: None,
            },
        )
        .unwrap();
        assert_eq!(s.volumes_to_remove("n1"), vec!["data-0".to_string()]);
        // A report still listing it does not bring it back to use.
        s.apply(11, report(42)).unwrap();
        assert!(s.volumes["n1/data-0"].removing);
        s.apply(
            12,
            Command::ReportVolumes {
                node: "n1".into(),
                volumes: vec![],
            },
        )
        .unwrap();
        assert!(s.volumes.is_empty());
    }

    #[test]
    fn an_anonymous_volume_is_listed_with_its_replica_pins_nothing_and_goes_with_its_dir() {
        let mut s = setup();
        let plan = Plan {
            place: vec![placement("a", "n1", 20000, 0)],
            ..Plan::default()
        };
        s.apply(4, Command::ApplyPlan { plan }).unwrap();
        let anonymous = |slot: u32| VolumeReport {
            // Named after its replica; the trailing number is the image
            // volume's index, not a slot.
            name: format!("a-{slot}"),
            service: "db".into(),
            slot: None,
            size_bytes: 7,
            anonymous: Some(AnonymousVolume {
                alloc_id: "a".into(),
                target: "/cache".into(),
            }),
        };
        s.apply(
            5,
            Command::ReportVolumes {
                node: "n1".into(),
                volumes: vec![anonymous(1)],
            },
        )
        .unwrap();
        let volume = s.volumes["n1/a-1"].clone();
        assert_eq!(volume.anonymous.as_ref().unwrap().target, "/cache");
        let users: Vec<&str> = s.users_of(&volume).iter().map(|a| a.id.as_str()).collect();
        assert_eq!(users, ["a"]);
        // The per-replica volume data-0 still pins slot 0; the anonymous
        // one pins nothing, even for a slot its name seems to end with.
        let spec = s.services["db"].spec.clone();
        assert_eq!(s.pinned_volume(&spec, 0).unwrap().name, "data-0");
        assert!(s.pinned_volume(&spec, 1).is_none());
        let err = s
            .apply(
                6,
                Command::RemoveVolume {
                    name: "a-1".into(),
                    node: None,
                },
            )
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("anonymous volume at /cache of replica a of service db on n1")
                && err.contains("removed with its replica"),
            "{err}"
        );
        assert!(!s.volumes["n1/a-1"].removing);
        // The agent removed the replica's directory: its next whole-set
        // report drops the volume although the replica is still recorded.
        s.apply(
            7,
            Command::ReportVolumes {
                node: "n1".into(),
                volumes: vec![],
            },
        )
        .unwrap();
        assert!(!s.volumes.contains_key("n1/a-1"));
        assert!(s.volumes.contains_key("n1/data-0"), "kept for its replica");
    }

    #[test]
    fn a_volume_recorded_before_anonymous_volumes_existed_reads_as_named() {
        let old = r#"{"name":"data-0","node":"n1","service":"db","slot":0,"size_bytes":3,"create_index":4}"#;
        let volume: Volume = serde_json::from_str(old).unwrap();
        assert_eq!(volume.anonymous, None);
        let report = r#"{"name":"data-0","service":"db","slot":0,"size_bytes":3}"#;
        let report: VolumeReport = serde_json::from_str(report).unwrap();
        assert_eq!(report.anonymous, None);
    }
}
