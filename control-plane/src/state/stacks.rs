//! Stacks: the services one `skiff stack deploy` declares, applied as one
//! committed step (all or nothing), and the `depends_on` conditions that
//! hold a service's first start.
//!
//! A stack is not a record of its own: its services carry the
//! [`STACK_LABEL`] label and are named `STACK-SERVICE`, as Swarm does with
//! `com.docker.stack.namespace`. What a stack changed since an index is read
//! from its services' modify indexes and from the removal events, which
//! name the stack.

use std::collections::{BTreeMap, BTreeSet};

use skiff_spec::{DependsCondition, ServiceSpec, SpecError, STACK_LABEL};

use super::{AllocState, CommandError, DesiredState, EventKind, Outcome, State};

impl State {
    /// The services of `stack`, by name.
    pub fn stack_services<'a>(
        &'a self,
        stack: &'a str,
    ) -> impl Iterator<Item = &'a super::Service> + 'a {
        self.services
            .values()
            .filter(move |s| s.spec.labels.get(STACK_LABEL).map(String::as_str) == Some(stack))
    }

    /// The names of every stack, each with its number of services.
    pub fn stacks(&self) -> BTreeMap<String, usize> {
        let mut stacks = BTreeMap::new();
        for service in self.services.values() {
            if let Some(stack) = service.spec.labels.get(STACK_LABEL) {
                *stacks.entry(stack.clone()).or_default() += 1;
            }
        }
        stacks
    }

    /// The last index at which `stack` changed: a service of it created,
    /// updated, scaled or removed. `None` when the recent events no longer
    /// reach back to `since`, so a change after it cannot be ruled out.
    pub fn stack_changed_since(&self, stack: &str, since: u64) -> Option<u64> {
        let modified = self
            .stack_services(stack)
            .map(|s| s.modify_index)
            .max()
            .unwrap_or(0);
        let removal = removal_message(stack);
        let removed = self
            .events
            .iter()
            .filter(|e| e.kind == EventKind::ServiceRemoved && e.message == removal)
            .map(|e| e.index)
            .max()
            .unwrap_or(0);
        let covered = self.events.front().is_none_or(|e| e.index <= since.max(1))
            || self.events.len() < super::EVENT_RING;
        covered.then_some(modified.max(removed))
    }

    /// `skiff stack deploy`: creates, updates and removes services so that
    /// `stack` is exactly `services`. Everything is checked before anything
    /// changes, so a stack that fails changes nothing. An unchanged service
    /// is not touched (a redeploy of the same file restarts nothing), and
    /// an autoscaled one keeps the replica count its autoscaler chose.
    pub(super) fn deploy_stack(
        &mut self,
        index: u64,
        stack: &str,
        services: Vec<ServiceSpec>,
        check_index: Option<u64>,
    ) -> Result<Outcome, CommandError> {
        self.check_stack(stack, &services, check_index)?;
        let wanted: BTreeSet<&str> = services.iter().map(|s| s.name.as_str()).collect();
        let gone: Vec<String> = self
            .stack_services(stack)
            .map(|s| s.spec.name.clone())
            .filter(|name| !wanted.contains(name.as_str()))
            .collect();
        for mut spec in services {
            match self.services.get(&spec.name) {
                Some(current) => {
                    if spec.autoscale.is_some() && current.spec.autoscale.is_some() {
                        spec.replicas = current.spec.replicas;
                    }
                    self.update_service(index, spec, None)?;
                }
                None => {
                    self.create_service(index, spec)?;
                }
            }
        }
        for name in gone {
            self.remove_service(index, &name)?;
        }
        Ok(Outcome::Done)
    }

    /// Every reason `deploy_stack` would refuse, checked without changing
    /// anything.
    fn check_stack(
        &self,
        stack: &str,
        services: &[ServiceSpec],
        check_index: Option<u64>,
    ) -> Result<(), CommandError> {
        skiff_spec::validate_name(stack).map_err(|e| SpecError::new("stack", e.problem))?;
        if let Some(since) = check_index {
            match self.stack_changed_since(stack, since) {
                Some(changed) if changed <= since => {}
                Some(changed) => {
                    return Err(CommandError::Deployment(format!(
                        "stack \"{stack}\" changed at index {changed}, after the planned index {since}; run `skiff stack plan` again"
                    )))
                }
                None => {
                    return Err(CommandError::Deployment(format!(
                        "the recent events no longer reach back to index {since}; run `skiff stack plan` again"
                    )))
                }
            }
        }
        let prefix = format!("{stack}-");
        let mut names = BTreeSet::new();
        for spec in services {
            spec.validate()
                .map_err(|e| SpecError::new(&format!("{}.{}", spec.name, e.field), e.problem))?;
            self.resolve_secrets(&mut spec.clone())?;
            if spec.labels.get(STACK_LABEL).map(String::as_str) != Some(stack)
                || !spec.name.starts_with(&prefix)
            {
                return Err(SpecError::new(
                    "stack",
                    format!(
                        "service \"{}\" is not named {prefix}NAME with label {STACK_LABEL}={stack}; deploy it with `skiff stack deploy {stack} -f FILE`",
                        spec.name
                    ),
                )
                .into());
            }
            if !names.insert(spec.name.as_str()) {
                return Err(SpecError::new(
                    "stack",
                    format!("service \"{}\" is declared twice", spec.name),
                )
                .into());
            }
            if let Some(current) = self.services.get(&spec.name) {
                if current.spec.labels.get(STACK_LABEL).map(String::as_str) != Some(stack) {
                    return Err(CommandError::Deployment(format!(
                        "service \"{}\" exists outside stack \"{stack}\"; remove it with `skiff service rm {}` or choose another stack name",
                        spec.name, spec.name
                    )));
                }
            }
        }
        for spec in services {
            for dep in &spec.depends_on {
                if !names.contains(dep.service.as_str())
                    && !self.services.contains_key(&dep.service)
                {
                    return Err(SpecError::new(
                        &format!("{}.depends-on", spec.name),
                        format!(
                            "service \"{}\" is neither in the stack nor running",
                            dep.service
                        ),
                    )
                    .into());
                }
            }
        }
        if let Some(cycle) = dependency_cycle(services) {
            return Err(SpecError::new(
                "depends-on",
                format!("a cycle: {}; break it", cycle.join(" -> ")),
            )
            .into());
        }
        Ok(())
    }

    /// `skiff stack rm`: removes every service of `stack` in one step.
    pub(super) fn remove_stack(
        &mut self,
        index: u64,
        stack: &str,
    ) -> Result<Outcome, CommandError> {
        let names: Vec<String> = self
            .stack_services(stack)
            .map(|s| s.spec.name.clone())
            .collect();
        if names.is_empty() {
            return Err(CommandError::Deployment(format!(
                "stack \"{stack}\" not found; see `skiff stack ls`"
            )));
        }
        for name in names {
            self.remove_service(index, &name)?;
        }
        Ok(Outcome::Done)
    }

    /// Whether every `depends_on` condition of `spec` holds; otherwise the
    /// first one that does not, in words ("app-db to be healthy").
    pub fn dependencies_ready(&self, spec: &ServiceSpec) -> Result<(), String> {
        for dep in &spec.depends_on {
            let Some(service) = self.services.get(&dep.service) else {
                return Err(format!("{} to exist", dep.service));
            };
            let checked = service.spec.health.is_some();
            let mut live = self
                .allocs_of(&dep.service)
                .filter(|a| a.desired == DesiredState::Run);
            let ready = match dep.condition {
                DependsCondition::Started => live.any(|a| a.state.is_up()),
                // Without a check of its own, a running replica counts as
                // healthy (an image's HEALTHCHECK makes the agent report
                // `healthy` once it passes).
                DependsCondition::Healthy => live.any(|a| {
                    a.state == AllocState::Healthy || (!checked && a.state == AllocState::Running)
                }),
                DependsCondition::Completed => false,
            };
            if !ready {
                let what = match dep.condition {
                    DependsCondition::Started => "to start",
                    DependsCondition::Healthy => "to be healthy",
                    DependsCondition::Completed => "to complete",
                };
                return Err(format!("{} {what}", dep.service));
            }
        }
        Ok(())
    }

    /// Why `service` is held before its first start, if it is.
    pub fn held_by_dependencies(&self, service: &str) -> Option<String> {
        let record = self.services.get(service)?;
        if record.started {
            return None;
        }
        self.dependencies_ready(&record.spec).err()
    }
}

/// The message of a removal event of a stack's service.
pub(super) fn removal_message(stack: &str) -> String {
    format!("stack {stack}")
}

/// A cycle among the services' `depends_on`, as names from a service back
/// to itself, if there is one.
fn dependency_cycle(services: &[ServiceSpec]) -> Option<Vec<String>> {
    let edges: BTreeMap<&str, Vec<&str>> = services
        .iter()
        .map(|s| {
            (
                s.name.as_str(),
                s.depends_on.iter().map(|d| d.service.as_str()).collect(),
            )
        })
        .collect();
    // Depth-first search with the current path; services outside the
    // stack have no edges here.
    fn visit<'a>(
        node: &'a str,
        edges: &BTreeMap<&'a str, Vec<&'a str>>,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) -> Option<Vec<String>> {
        if let Some(start) = path.iter().position(|n| *n == node) {
            let mut cycle: Vec<String> = path[start..].iter().map(|s| s.to_string()).collect();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if !done.insert(node) {
            return None;
        }
        path.push(node);
        for next in edges.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, edges, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        None
    }
    let mut done = BTreeSet::new();
    for node in edges.keys() {
        let mut path = Vec::new();
        if let Some(cycle) = visit(node, &edges, &mut path, &mut done) {
            return Some(cycle);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::super::{AllocReport, Command, Placement, Plan};
    use super::*;
    use skiff_spec::{Dependency, RuntimeKind};

    fn spec(stack: &str, short: &str, replicas: u32) -> ServiceSpec {
        ServiceSpec {
            name: format!("{stack}-{short}"),
            runtime: RuntimeKind::Process,
            replicas,
            command: vec!["sleep".into(), "100".into()],
            labels: [(STACK_LABEL.to_string(), stack.to_string())].into(),
            ..Default::default()
        }
    }

    fn deploy(services: Vec<ServiceSpec>) -> Command {
        Command::DeployStack {
            stack: "app".into(),
            services,
            check_index: None,
        }
    }

    fn node(name: &str) -> Command {
        Command::RegisterNode {
            process_runtime: true,
            agent_address: String::new(),
            name: name.into(),
            address: "127.0.0.1".into(),
            port_range: (20000, 20010),
            cpu_millis: 0,
            memory_mb: 0,
            labels: BTreeMap::new(),
        }
    }

    #[test]
    fn a_stack_deploy_creates_updates_and_removes_in_one_step() {
        let mut s = State::default();
        s.apply(1, deploy(vec![spec("app", "web", 2), spec("app", "db", 1)]))
            .unwrap();
        assert_eq!(s.stacks(), BTreeMap::from([("app".to_string(), 2)]));
        let mut web = spec("app", "web", 3);
        web.env.insert("A".into(), "1".into());
        s.apply(2, deploy(vec![web, spec("app", "cache", 1)]))
            .unwrap();
        let names: Vec<&str> = s
            .stack_services("app")
            .map(|x| x.spec.name.as_str())
            .collect();
        assert_eq!(names, ["app-cache", "app-web"]);
        assert_eq!(s.services["app-web"].version, 2, "a new version rolls out");
        assert_eq!(
            s.stack_changed_since("app", 1),
            Some(2),
            "the removal counts"
        );
    }

    #[test]
    fn redeploying_the_same_stack_changes_nothing() {
        let mut s = State::default();
        let stack = vec![spec("app", "web", 2), spec("app", "db", 1)];
        s.apply(1, deploy(stack.clone())).unwrap();
        s.apply(2, deploy(stack)).unwrap();
        assert!(s
            .services
            .values()
            .all(|x| x.modify_index == 1 && x.version == 1));
        assert_eq!(s.stack_changed_since("app", 1), Some(1));
    }

    #[test]
    fn a_stack_with_one_bad_service_changes_nothing() {
        let mut s = State::default();
        s.apply(1, deploy(vec![spec("app", "web", 2)])).unwrap();
        let mut bad = spec("app", "db", 1);
        bad.command.clear();
        let err = s
            .apply(2, deploy(vec![spec("app", "web", 5), bad]))
            .unwrap_err();
        assert!(err.to_string().contains("app-db.command"), "{err}");
        assert_eq!(s.services["app-web"].spec.replicas, 2);
        assert!(!s.services.contains_key("app-db"));
    }

    #[test]
    fn a_stack_cannot_take_over_a_service_outside_it() {
        let mut s = State::default();
        let mut plain = spec("app", "web", 1);
        plain.labels.clear();
        s.apply(1, Command::CreateService { spec: plain }).unwrap();
        let err = s.apply(2, deploy(vec![spec("app", "web", 1)])).unwrap_err();
        assert!(err.to_string().contains("outside stack"), "{err}");
    }

    #[test]
    fn check_index_refuses_a_stack_changed_since_the_plan() {
        let mut s = State::default();
        s.apply(1, deploy(vec![spec("app", "web", 1)])).unwrap();
        s.apply(
            2,
            Command::ScaleService {
                name: "app-web".into(),
                replicas: 4,
            },
        )
        .unwrap();
        let stale = Command::DeployStack {
            stack: "app".into(),
            services: vec![spec("app", "web", 1)],
            check_index: Some(1),
        };
        let err = s.apply(3, stale).unwrap_err();
        assert!(err.to_string().contains("stack plan"), "{err}");
        let fresh = Command::DeployStack {
            stack: "app".into(),
            services: vec![spec("app", "web", 1)],
            check_index: Some(2),
        };
        s.apply(4, fresh).unwrap();
    }

    #[test]
    fn a_dependency_cycle_is_refused_naming_it() {
        let mut s = State::default();
        let mut web = spec("app", "web", 1);
        let mut api = spec("app", "api", 1);
        web.depends_on = vec![Dependency {
            service: "app-api".into(),
            condition: DependsCondition::Started,
        }];
        api.depends_on = vec![Dependency {
            service: "app-web".into(),
            condition: DependsCondition::Started,
        }];
        let err = s.apply(1, deploy(vec![web, api])).unwrap_err();
        assert!(
            err.to_string().contains("app-api -> app-web -> app-api"),
            "{err}"
        );
        assert!(s.services.is_empty());
    }

    #[test]
    fn a_service_waits_for_its_dependency_to_be_healthy_before_its_first_start() {
        let mut s = State::default();
        s.apply(1, node("n1")).unwrap();
        let mut web = spec("app", "web", 1);
        web.depends_on = vec![Dependency {
            service: "app-db".into(),
            condition: DependsCondition::Healthy,
        }];
        let mut db = spec("app", "db", 1);
        db.health = Some(skiff_spec::HealthCheck {
            kind: skiff_spec::HealthKind::Tcp,
            interval_ms: 0,
            timeout_ms: 0,
            retries: 0,
            start_period_ms: 0,
        });
        s.apply(2, deploy(vec![web, db])).unwrap();
        assert_eq!(
            s.held_by_dependencies("app-web").as_deref(),
            Some("app-db to be healthy")
        );
        let place = |id: &str, service: &str, port| Placement {
            id: id.into(),
            service: service.into(),
            node: "n1".into(),
            host_port: port,
            slot: 0,
        };
        let plan = Plan {
            place: vec![place("d1", "app-db", 20000), place("w1", "app-web", 20001)],
            ..Plan::default()
        };
        s.apply(3, Command::ApplyPlan { plan }).unwrap();
        assert!(s.allocs.contains_key("d1"));
        assert!(!s.allocs.contains_key("w1"), "held on apply too");
        let report = |state| Command::ReportAllocs {
            node: "n1".into(),
            reports: vec![AllocReport {
                id: "d1".into(),
                state,
                restarts: 0,
                pid: 9,
                message: String::new(),
                port: 0,
                health_checked: false,
                exit_code: None,
                refused: false,
            }],
        };
        s.apply(4, report(AllocState::Running)).unwrap();
        assert!(
            s.held_by_dependencies("app-web").is_some(),
            "running is not healthy"
        );
        s.apply(5, report(AllocState::Healthy)).unwrap();
        assert_eq!(s.held_by_dependencies("app-web"), None);
        let plan = Plan {
            place: vec![place("w1", "app-web", 20001)],
            ..Plan::default()
        };
        s.apply(6, Command::ApplyPlan { plan }).unwrap();
        assert!(s.services["app-web"].started);
        s.apply(7, report(AllocState::Unhealthy)).unwrap();
        assert_eq!(
            s.held_by_dependencies("app-web"),
            None,
            "only the first start waits"
        );
    }

    #[test]
    fn removing_a_stack_removes_its_services_only() {
        let mut s = State::default();
        s.apply(1, deploy(vec![spec("app", "web", 1), spec("app", "db", 1)]))
            .unwrap();
        let mut other = spec("app", "x", 1);
        other.labels.clear();
        other.name = "apps".into();
        s.apply(2, Command::CreateService { spec: other }).unwrap();
        s.apply(
            3,
            Command::RemoveStack {
                stack: "app".into(),
            },
        )
        .unwrap();
        assert_eq!(s.services.keys().collect::<Vec<_>>(), ["apps"]);
        assert!(s
            .apply(
                4,
                Command::RemoveStack {
                    stack: "app".into()
                }
            )
            .is_err());
    }
}
