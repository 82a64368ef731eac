//! Applying the service commands: create, scale, update (a new version
//! and its deployment), roll back, autoscale, remove.

use super::super::{
    CommandError, Deployment, DeploymentStatus, EventKind, Outcome, Service, ServiceMode,
    ServiceSpec, State, Strategy, VersionRecord, HISTORY_LEN,
};

impl State {
    pub(in crate::state) fn create_service(
        &mut self,
        index: u64,
        mut spec: ServiceSpec,
    ) -> Result<Outcome, CommandError> {
        spec.validate()?;
        self.resolve_secrets(&mut spec)?;
        if let Some(existing) = self.services.get(&spec.name) {
            return Err(name_taken(existing, &spec));
        }
        let name = spec.name.clone();
        let message = match spec.mode {
            ServiceMode::Global => "global".to_string(),
            ServiceMode::Replicated => format!("{} replicas", spec.replicas),
            ServiceMode::Job => format!("job, {} retries", spec.max_retries),
        };
        let job = (spec.mode == ServiceMode::Job).then(|| crate::state::JobStatus {
            created_ms: self.clock_ms,
            ..Default::default()
        });
        let record = VersionRecord {
            version: 1,
            spec: spec.clone(),
            created_ms: self.clock_ms,
            outcome: "succeeded".to_string(),
            message: "created".to_string(),
        };
        self.services.insert(
            name.clone(),
            Service {
                spec,
                generation: 1,
                create_index: index,
                modify_index: index,
                version: 1,
                stable_version: 1,
                history: vec![record],
                deployment: None,
                started: false,
                rebalance: false,
                image_port: None,
                job,
            },
        );
        self.event(index, EventKind::ServiceCreated, &name, "", "", &message);
        Ok(Outcome::Done)
    }

    pub(in crate::state) fn scale_service(
        &mut self,
        index: u64,
        name: &str,
        replicas: u32,
    ) -> Result<Outcome, CommandError> {
        skiff_spec::validate_replicas(i64::from(replicas))?;
        let service = self
            .services
            .get_mut(name)
            .ok_or_else(|| CommandError::ServiceNotFound(name.to_string()))?;
        if let Some(policy) = &service.spec.autoscale {
            return Err(CommandError::Deployment(format!(
                "service \"{name}\" is autoscaled between {} and {} replicas; change the bounds with `skiff service update {name} --autoscale-min N --autoscale-max M`",
                policy.min, policy.max
            )));
        }
        if service.spec.replicas != replicas {
            let from = service.spec.replicas;
            service.spec.replicas = replicas;
            service.generation += 1;
            service.modify_index = index;
            let message = format!("scaled from {from} to {replicas} replicas");
            self.event(index, EventKind::ServiceUpdated, name, "", "", &message);
        }
        Ok(Outcome::Done)
    }

    /// A new spec for an existing service. When its replicas would run the
    /// same as now, the spec changes in place (a scale or policy change,
    /// like Kubernetes, which makes no new revision for those); otherwise
    /// it becomes a new version rolled out by a new deployment, which
    /// supersedes any deployment still active. A rollback (`Some`, with
    /// the failed version for an automatic one, else 0) is always rolled out
    /// as a rolling update without gates: returning to a known version must
    /// not wait for a promotion.
    pub(in crate::state) fn update_service(
        &mut self,
        index: u64,
        mut spec: ServiceSpec,
        rollback: Option<u64>,
    ) -> Result<Outcome, CommandError> {
        let rollback_of = rollback.unwrap_or(0);
        spec.validate()?;
        self.resolve_secrets_keeping(&mut spec, rollback.is_some())?;
        let now = self.clock_ms;
        let name = spec.name.clone();
        let service = self
            .services
            .get_mut(&name)
            .ok_or_else(|| CommandError::ServiceNotFound(name.clone()))?;
        if service.spec == spec {
            return Ok(Outcome::Done);
        }
        // A job has no rollout: its attempts are counted against one spec.
        if service.spec.mode == ServiceMode::Job || spec.mode == ServiceMode::Job {
            return Err(skiff_spec::SpecError::new(
                "mode",
                format!("{name} is a job or would become one: jobs are not updated; `skiff job rm {name}` and run it again"),
            )
            .into());
        }
        service.generation += 1;
        service.modify_index = index;
        if service.spec.runs_same(&spec) {
            let diff = skiff_spec::spec_diff(&service.spec, &spec).join("; ");
            service.spec = spec;
            self.event(index, EventKind::ServiceUpdated, &name, "", "", &diff);
            return Ok(Outcome::Done);
        }
        let from_version = service.stable_version;
        if let Some(active) = service.deployment.as_mut().filter(|d| d.status.is_active()) {
            let version = active.version;
            active.status = DeploymentStatus::Superseded;
            active.ended_ms = now;
            active.message = format!("superseded by version {}", service.version + 1);
            let message = active.message.clone();
            service.set_outcome(version, "superseded", &message);
        }
        service.version += 1;
        let version = service.version;
        let mut policy = spec.update.clone();
        if rollback.is_some() {
            policy.strategy = Strategy::Rolling;
            policy.max_error_rate = None;
        }
        let diff = skiff_spec::spec_diff(&service.spec, &spec);
        service.history.push(VersionRecord {
            version,
            spec: spec.clone(),
            created_ms: now,
            outcome: "running".to_string(),
            message: if rollback_of > 0 {
                format!("automatic rollback of version {rollback_of}")
            } else {
                String::new()
            },
        });
        if service.history.len() > HISTORY_LEN {
            service.history.remove(0);
        }
        service.spec = spec;
        service.deployment = Some(Deployment {
            version,
            from_version,
            status: DeploymentStatus::Running,
            message: "starting".to_string(),
            promoted: false,
            started_ms: now,
            progress_since_ms: now,
            ended_ms: 0,
            rollback_of,
            policy: policy.clone(),
        });
        let message = format!(
            "version {version} ({}; from version {from_version}): {}",
            policy.strategy.as_str(),
            diff.join("; ")
        );
        self.event(index, EventKind::DeploymentStarted, &name, "", "", &message);
        // Wake every node's agent stream: the pre-pull list changed.
        let nodes: Vec<String> = self.nodes.keys().cloned().collect();
        for node in nodes {
            self.index.node_changed.insert(node, index);
        }
        Ok(Outcome::Done)
    }

    pub(in crate::state) fn rollback_service(
        &mut self,
        index: u64,
        name: &str,
        to_version: Option<u64>,
    ) -> Result<Outcome, CommandError> {
        let service = self
            .services
            .get(name)
            .ok_or_else(|| CommandError::ServiceNotFound(name.to_string()))?;
        let target = match to_version {
            Some(v) => v,
            None if service.active_deployment().is_some() => service.stable_version,
            None => service
                .history
                .iter()
                .rev()
                .find(|r| r.version < service.version && r.outcome == "succeeded")
                .map(|r| r.version)
                .ok_or_else(|| {
                    CommandError::Deployment(format!(
                        "service \"{name}\" has no earlier succeeded version to roll back to; see `skiff service history {name}`"
                    ))
                })?,
        };
        let record = service.version_record(target).ok_or_else(|| {
            let known: Vec<String> = service
                .history
                .iter()
                .map(|r| r.version.to_string())
                .collect();
            CommandError::Deployment(format!(
                "unknown version {target} of service \"{name}\"; known versions: {}",
                known.join(", ")
            ))
        })?;
        let spec = service.running_again(&record.spec);
        if spec.runs_same(&service.spec) {
            return Err(CommandError::Deployment(format!(
                "version {target} runs the same as the current version {}; nothing to roll back",
                service.version
            )));
        }
        let rolled_back = service.active_deployment().map(|d| d.version);
        self.update_service(index, spec, Some(0))?;
        let service = self.services.get_mut(name).expect("updated above");
        let new_version = service.version;
        if let Some(version) = rolled_back {
            let message = format!("rolled back to version {target} by the operator");
            service.set_outcome(version, "rolled-back", &message);
        }
        if let Some(deployment) = service.deployment.as_mut() {
            deployment.message = format!("rollback to version {target}");
        }
        if let Some(record) = service
            .history
            .iter_mut()
            .find(|r| r.version == new_version)
        {
            record.message = format!("rollback to version {target}");
        }
        let message = format!("version {new_version} rolls back to version {target}");
        self.event(
            index,
            EventKind::DeploymentRolledBack,
            name,
            "",
            "",
            &message,
        );
        Ok(Outcome::Done)
    }

    pub(in crate::state) fn autoscale(
        &mut self,
        index: u64,
        name: &str,
        replicas: u32,
        reason: &str,
    ) -> Result<Outcome, CommandError> {
        let service = self
            .services
            .get_mut(name)
            .ok_or_else(|| CommandError::ServiceNotFound(name.to_string()))?;
        let Some(policy) = &service.spec.autoscale else {
            return Ok(Outcome::Done);
        };
        let replicas = replicas.clamp(policy.min, policy.max);
        if service.spec.replicas == replicas {
            return Ok(Outcome::Done);
        }
        let from = service.spec.replicas;
        service.spec.replicas = replicas;
        service.generation += 1;
        service.modify_index = index;
        let message = format!("{from} -> {replicas} replicas: {reason}");
        self.event(index, EventKind::ServiceScaled, name, "", "", &message);
        Ok(Outcome::Done)
    }

    /// Marks a replicated service for rebalancing; the reconciler moves
    /// its replicas and clears the mark once it is spread again.
    pub(in crate::state) fn rebalance(
        &mut self,
        index: u64,
        name: &str,
    ) -> Result<Outcome, CommandError> {
        let service = self
            .services
            .get_mut(name)
            .ok_or_else(|| CommandError::ServiceNotFound(name.to_string()))?;
        if service.spec.mode == ServiceMode::Global {
            return Err(CommandError::Deployment(format!(
                "service \"{name}\" is global (one replica per node): there is nothing to rebalance"
            )));
        }
        if service.rebalance {
            return Ok(Outcome::Done);
        }
        service.rebalance = true;
        self.event(index, EventKind::ServiceRebalancing, name, "", "", "");
        Ok(Outcome::Done)
    }

    /// Forgets the service and asks for all its replicas to stop; the
    /// allocations stay until their agent reports them stopped.
    pub(in crate::state) fn remove_service(
        &mut self,
        index: u64,
        name: &str,
    ) -> Result<Outcome, CommandError> {
        let Some(removed) = self.services.remove(name) else {
            return Err(CommandError::ServiceNotFound(name.to_string()));
        };
        // A stack's removals are named, so `--check-index` sees them.
        let message = removed
            .spec
            .labels
            .get(skiff_spec::STACK_LABEL)
            .map(|stack| crate::state::stacks::removal_message(stack))
            .unwrap_or_default();
        self.event(index, EventKind::ServiceRemoved, name, "", "", &message);
        let ids: Vec<String> = self.allocs_of(name).map(|a| a.id.clone()).collect();
        for id in ids {
            self.stop_alloc(index, &id, "service removed");
        }
        Ok(Outcome::Done)
    }
}

/// Why `spec` cannot be created over `existing` of the same name. A job
/// is never updated (its attempts count against one spec), so running one
/// again is `job rm` first, or `job run --replace` (Kubernetes' Jobs and
/// Nomad's batch jobs are resubmitted under a new name or after a purge
/// too).
fn name_taken(existing: &Service, spec: &ServiceSpec) -> CommandError {
    let name = &spec.name;
    match (existing.spec.mode, spec.mode) {
        (ServiceMode::Job, ServiceMode::Job) => {
            let state = existing
                .job
                .as_ref()
                .map_or("pending", |j| j.state.as_str());
            skiff_spec::SpecError::new(
                "name",
                format!("job {name} already exists ({state}); remove it first with `skiff job rm {name}`, or run it again with `skiff job run {name} --replace ...`"),
            )
            .into()
        }
        (ServiceMode::Job, _) => skiff_spec::SpecError::new(
            "name",
            format!(
                "{name} is a job; pick another name, or remove it first with `skiff job rm {name}`"
            ),
        )
        .into(),
        (_, ServiceMode::Job) => skiff_spec::SpecError::new(
            "name",
            format!("{name} is a service, not a job; pick another name for the job"),
        )
        .into(),
        _ => CommandError::ServiceExists(name.clone()),
    }
}

#[cfg(test)]
mod tests {
    use crate::state::fixtures::{node, place, spec};
    use crate::state::*;

    #[test]
    fn a_duplicate_service_is_refused_and_the_original_is_unchanged() {
        let mut s = State::default();
        s.apply(
            1,
            Command::CreateService {
                spec: spec("web", 2),
            },
        )
        .unwrap();
        let err = s
            .apply(
                2,
                Command::CreateService {
                    spec: spec("web", 9),
                },
            )
            .unwrap_err();
        assert_eq!(err, CommandError::ServiceExists("web".into()));
        assert_eq!(s.services["web"].spec.replicas, 2);
    }

    #[test]
    fn running_a_job_under_a_taken_name_is_refused_naming_job_rm_and_replace() {
        let mut s = State::default();
        let job = |name: &str| {
            let mut job = spec(name, 1);
            job.mode = ServiceMode::Job;
            job
        };
        s.apply(
            1,
            Command::CreateService {
                spec: job("migrate"),
            },
        )
        .unwrap();
        s.apply(
            2,
            Command::CreateService {
                spec: spec("web", 1),
            },
        )
        .unwrap();
        let mut again = job("migrate");
        again.max_retries = 3;
        let err = s
            .apply(3, Command::CreateService { spec: again })
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("job migrate already exists (pending)")
                && err.contains("`skiff job rm migrate`")
                && err.contains("--replace"),
            "{err}"
        );
        assert_eq!(s.services["migrate"].spec.max_retries, 0, "unchanged");
        let err = s
            .apply(4, Command::CreateService { spec: job("web") })
            .unwrap_err()
            .to_string();
        assert!(err.contains("web is a service, not a job"), "{err}");
        let err = s
            .apply(
                5,
                Command::CreateService {
                    spec: spec("migrate", 1),
                },
            )
            .unwrap_err()
            .to_string();
        assert!(err.contains("migrate is a job"), "{err}");
        // Removed first, the name is free again at once.
        s.apply(
            6,
            Command::RemoveService {
                name: "migrate".into(),
            },
        )
        .unwrap();
        s.apply(
            7,
            Command::CreateService {
                spec: job("migrate"),
            },
        )
        .unwrap();
    }

    #[test]
    fn removing_a_service_stops_its_allocations_and_forgets_them_once_stopped() {
        let mut s = State::default();
        s.apply(1, node("n1")).unwrap();
        s.apply(
            2,
            Command::CreateService {
                spec: spec("web", 1),
            },
        )
        .unwrap();
        let plan = Plan {
            place: vec![place("a", "web", 20000)],
            ..Plan::default()
        };
        s.apply(3, Command::ApplyPlan { plan }).unwrap();
        s.apply(4, Command::RemoveService { name: "web".into() })
            .unwrap();
        assert_eq!(s.allocs["a"].desired, DesiredState::Stop);
        let forget = Plan {
            forget: vec!["a".into()],
            ..Plan::default()
        };
        s.apply(
            5,
            Command::ApplyPlan {
                plan: forget.clone(),
            },
        )
        .unwrap();
        assert!(s.allocs.contains_key("a"), "not stopped yet: must be kept");
        let report = AllocReport {
            id: "a".into(),
            state: AllocState::Stopped,
            restarts: 0,
            pid: 0,
            message: String::new(),
            port: 0,
            health_checked: false,
            exit_code: None,
            refused: false,
        };
        s.apply(
            6,
            Command::ReportAllocs {
                node: "n1".into(),
                reports: vec![report],
            },
        )
        .unwrap();
        s.apply(7, Command::ApplyPlan { plan: forget }).unwrap();
        assert!(!s.allocs.contains_key("a"));
    }
}
