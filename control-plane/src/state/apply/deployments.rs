//! Applying deployment commands and steps: promote, pause or resume, and
//! the steps the deployment controller decides (await promotion, succeed,
//! fail and roll back).

use super::super::{
    Allocation, CommandError, DeploymentChange, DeploymentStatus, DeploymentStep, EventKind,
    Outcome, State, Strategy,
};

impl State {
    /// Promotes a blue-green or canary deployment. Blue-green: the green
    /// replicas join the routing proxies and every blue one is stopped in
    /// this same entry, so proxies flip in one committed step (blue ones
    /// drain before their SIGTERM). Canary: the rollout continues.
    pub(in crate::state) fn promote(
        &mut self,
        index: u64,
        name: &str,
    ) -> Result<Outcome, CommandError> {
        let now = self.clock_ms;
        let service = self
            .services
            .get(name)
            .ok_or_else(|| CommandError::ServiceNotFound(name.to_string()))?;
        let Some(deployment) = service.active_deployment() else {
            return Err(CommandError::Deployment(format!(
                "service \"{name}\" has no deployment in progress; start one with `skiff service update`"
            )));
        };
        if deployment.policy.strategy == Strategy::Rolling {
            return Err(CommandError::Deployment(format!(
                "the deployment of \"{name}\" is a rolling update, which needs no promotion"
            )));
        }
        if deployment.promoted {
            return Ok(Outcome::Done);
        }
        let version = deployment.version;
        let blue_green = deployment.policy.strategy == Strategy::BlueGreen;
        if blue_green {
            let spec = service.spec.clone();
            let desired = spec.replicas as usize;
            let ready = self
                .live_allocs(name)
                .filter(|a| a.spec.runs_same(&spec) && a.is_serving())
                .count();
            if ready < desired {
                return Err(CommandError::Deployment(format!(
                    "only {ready} of {desired} green replicas serve; promote once all are healthy (see `skiff service ps {name}`)"
                )));
            }
            let (green, blue): (Vec<&Allocation>, Vec<&Allocation>) = self
                .live_allocs(name)
                .partition(|a| a.spec.runs_same(&spec));
            let green: Vec<String> = green.iter().map(|a| a.id.clone()).collect();
            let blue: Vec<String> = blue.iter().map(|a| a.id.clone()).collect();
            for id in green {
                if let Some(alloc) = self.allocs.get_mut(&id) {
                    alloc.held = false;
                    alloc.modify_index = index;
                    self.index.node_changed.insert(alloc.node.clone(), index);
                }
            }
            for id in blue {
                self.stop_alloc(index, &id, "blue-green promoted");
            }
        }
        let service = self.services.get_mut(name).expect("checked above");
        if let Some(deployment) = service.deployment.as_mut() {
            deployment.promoted = true;
            deployment.status = DeploymentStatus::Running;
            deployment.progress_since_ms = now;
            deployment.message = "promoted".to_string();
        }
        let message = format!("version {version} promoted");
        self.event(index, EventKind::DeploymentPromoted, name, "", "", &message);
        Ok(Outcome::Done)
    }

    pub(in crate::state) fn pause(
        &mut self,
        index: u64,
        name: &str,
        paused: bool,
    ) -> Result<Outcome, CommandError> {
        let now = self.clock_ms;
        let service = self
            .services
            .get_mut(name)
            .ok_or_else(|| CommandError::ServiceNotFound(name.to_string()))?;
        let Some(deployment) = service.deployment.as_mut().filter(|d| d.status.is_active()) else {
            return Err(CommandError::Deployment(format!(
                "service \"{name}\" has no deployment in progress to {}",
                if paused { "pause" } else { "resume" }
            )));
        };
        let kind = match (paused, deployment.status) {
            (true, DeploymentStatus::Paused) | (false, DeploymentStatus::Running) => {
                return Ok(Outcome::Done)
            }
            (false, DeploymentStatus::AwaitingPromotion) => return Ok(Outcome::Done),
            (true, _) => {
                deployment.status = DeploymentStatus::Paused;
                EventKind::DeploymentPaused
            }
            (false, _) => {
                deployment.status = DeploymentStatus::Running;
                deployment.progress_since_ms = now;
                EventKind::DeploymentResumed
            }
        };
        let message = format!("version {}", deployment.version);
        self.event(index, kind, name, "", "", &message);
        Ok(Outcome::Done)
    }

    /// Applies the deployment steps of a plan.
    pub(super) fn apply_deployment_change(&mut self, index: u64, change: DeploymentChange) {
        let now = self.clock_ms;
        let name = change.service.as_str();
        let Some(service) = self.services.get_mut(name) else {
            return;
        };
        let Some(deployment) = service
            .deployment
            .as_mut()
            .filter(|d| d.status.is_active() && d.version == change.version)
        else {
            return;
        };
        let version = deployment.version;
        match change.step {
            DeploymentStep::AwaitPromotion => {
                if deployment.status != DeploymentStatus::Running || deployment.promoted {
                    return;
                }
                deployment.status = DeploymentStatus::AwaitingPromotion;
                deployment.message = format!("waiting for `skiff service promote {name}`");
                let message = format!("version {version}");
                self.event(
                    index,
                    EventKind::DeploymentAwaitingPromotion,
                    name,
                    "",
                    "",
                    &message,
                );
            }
            DeploymentStep::Promote => {
                let _ = self.promote(index, name);
            }
            DeploymentStep::Succeed => {
                deployment.status = DeploymentStatus::Succeeded;
                deployment.ended_ms = now;
                deployment.message = "all replicas updated".to_string();
                let rollback_of = deployment.rollback_of;
                service.stable_version = version;
                let outcome_message = if rollback_of > 0 {
                    format!("rolled back from version {rollback_of}")
                } else {
                    service
                        .version_record(version)
                        .map(|r| r.message.clone())
                        .unwrap_or_default()
                };
                service.set_outcome(version, "succeeded", &outcome_message);
                let message = format!("version {version}");
                self.event(
                    index,
                    EventKind::DeploymentSucceeded,
                    name,
                    "",
                    "",
                    &message,
                );
            }
            DeploymentStep::Fail(reason) => {
                deployment.status = DeploymentStatus::Failed;
                deployment.ended_ms = now;
                deployment.message = reason.clone();
                let auto_rollback = deployment.policy.auto_rollback;
                let stable = service.stable_version;
                let rollback = service
                    .version_record(stable)
                    .filter(|_| auto_rollback && stable != version)
                    .map(|r| service.running_again(&r.spec));
                let outcome = match rollback {
                    Some(_) => format!("{reason}; rolled back to version {stable}"),
                    None => reason.clone(),
                };
                service.set_outcome(version, "failed", &outcome);
                let message = format!("version {version}: {reason}");
                self.event(index, EventKind::DeploymentFailed, name, "", "", &message);
                if let Some(spec) = rollback {
                    if self.update_service(index, spec, Some(version)).is_ok() {
                        let message = format!("version {version} failed; back to version {stable}");
                        self.event(
                            index,
                            EventKind::DeploymentRolledBack,
                            name,
                            "",
                            "",
                            &message,
                        );
                    }
                }
            }
        }
    }
}
