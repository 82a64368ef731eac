//! `skiff stack plan`: what a stack deploy would change, field by field,
//! and where the scheduler would put new replicas, decided on a copy of the
//! state. Pure: the state and `now` in, the plan out; nothing is proposed.

use std::collections::BTreeMap;

use skiff_spec::ServiceSpec;

use super::deployment::Traffic;
use crate::state::{Command, CommandError, State};

/// What a deploy would do to one service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Create,
    /// A new version, rolled out with the service's update policy.
    Update,
    /// Only the replica count or the policies change: no replica restarts.
    InPlace,
    Remove,
    Unchanged,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Create => "create",
            Action::Update => "update",
            Action::InPlace => "in-place",
            Action::Remove => "remove",
            Action::Unchanged => "unchanged",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceChange {
    pub service: String,
    pub action: Action,
    /// "field: old -> new", one per changed field.
    pub diff: Vec<String>,
    /// New replicas per node, as the scheduler would place them now.
    pub placements: BTreeMap<String, u32>,
    /// Why replicas would not be placed, or what they wait for.
    pub unplaced: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StackPlan {
    /// The applied index the plan was made against.
    pub index: u64,
    pub changes: Vec<ServiceChange>,
}

impl StackPlan {
    /// Whether the deploy would change anything.
    pub fn changes_something(&self) -> bool {
        self.changes.iter().any(|c| c.action != Action::Unchanged)
    }
}

/// The plan of deploying `services` as `stack` over `state` at `now_ms`;
/// refused exactly as the deploy itself would be.
pub fn plan_stack(
    state: &State,
    stack: &str,
    services: Vec<ServiceSpec>,
    declared_secrets: &[String],
    now_ms: u64,
) -> Result<StackPlan, CommandError> {
    // Secrets the deploy creates first count as present, at version 1
    // (the state is copied only when one is missing).
    let missing: Vec<&String> = declared_secrets
        .iter()
        .filter(|n| !state.secrets.contains_key(*n))
        .collect();
    let with_secrets;
    let state = if missing.is_empty() {
        state
    } else {
        let mut copy = state.clone();
        for name in missing {
            copy.secrets.insert(
                name.clone(),
                crate::state::Secret {
                    name: name.clone(),
                    version: 1,
                    sealed: String::new(),
                    size_bytes: 0,
                    created_ms: now_ms,
                    updated_ms: now_ms,
                    create_index: 0,
                    modify_index: 0,
                    previous: Vec::new(),
                },
            );
        }
        with_secrets = copy;
        &with_secrets
    };
    let mut changes = Vec::new();
    for spec in &services {
        let (action, diff) = match state.services.get(&spec.name) {
            None => (Action::Create, Vec::new()),
            Some(current) => {
                let mut spec = spec.clone();
                // As applying would: the versions of the secrets pinned.
                // An unknown secret is refused below, by the apply.
                let _ = state.resolve_secrets(&mut spec);
                if spec.autoscale.is_some() && current.spec.autoscale.is_some() {
                    spec.replicas = current.spec.replicas;
                }
                let diff = skiff_spec::spec_diff(&current.spec, &spec);
                let action = if diff.is_empty() {
                    Action::Unchanged
                } else if current.spec.runs_same(&spec) {
                    Action::InPlace
                } else {
                    Action::Update
                };
                (action, diff)
            }
        };
        changes.push(ServiceChange {
            service: spec.name.clone(),
            action,
            diff,
            placements: BTreeMap::new(),
            unplaced: String::new(),
        });
    }
    for gone in state.stack_services(stack) {
        if !services.iter().any(|s| s.name == gone.spec.name) {
            changes.push(ServiceChange {
                service: gone.spec.name.clone(),
                action: Action::Remove,
                diff: Vec::new(),
                placements: BTreeMap::new(),
                unplaced: String::new(),
            });
        }
    }
    let mut next = state.clone();
    let index = state.applied_index;
    next.apply(
        index + 1,
        Command::DeployStack {
            stack: stack.to_string(),
            services,
            check_index: None,
        }
        .at(now_ms),
    )?;
    let (plan, unplaced) = super::plan_cluster(&next, now_ms, 0, &Traffic::new());
    for change in &mut changes {
        if change.action == Action::Remove {
            continue;
        }
        for placement in plan.place.iter().filter(|p| p.service == change.service) {
            *change.placements.entry(placement.node.clone()).or_default() += 1;
        }
        if let Some(waiting) = next.held_by_dependencies(&change.service) {
            change.unplaced = format!("waiting for {waiting} before the first start");
        } else if let Some(u) = unplaced.iter().find(|u| u.service == change.service) {
            change.unplaced = u.summary();
        }
    }
    changes.sort_by(|a, b| a.service.cmp(&b.service));
    Ok(StackPlan { index, changes })
}

#[cfg(test)]
mod tests {
    use super::*;
    use skiff_spec::{RuntimeKind, STACK_LABEL};

    fn spec(short: &str, replicas: u32) -> ServiceSpec {
        ServiceSpec {
            name: format!("app-{short}"),
            runtime: RuntimeKind::Process,
            replicas,
            command: vec!["sleep".into(), "100".into()],
            memory_mb: Some(64),
            labels: [(STACK_LABEL.to_string(), "app".to_string())].into(),
            ..Default::default()
        }
    }

    fn cluster() -> State {
        let mut s = State::default();
        for (i, name) in ["n1", "n2"].into_iter().enumerate() {
            s.apply(
                i as u64 + 1,
                Command::RegisterNode {
                    process_runtime: true,
                    agent_address: String::new(),
                    name: name.into(),
                    address: "127.0.0.1".into(),
                    port_range: (20000, 20010),
                    cpu_millis: 1000,
                    memory_mb: 256,
                    labels: BTreeMap::new(),
                },
            )
            .unwrap();
        }
        s
    }

    #[test]
    fn a_new_stack_plans_creates_with_their_placements() {
        let state = cluster();
        let plan = plan_stack(&state, "app", vec![spec("web", 2)], &[], 1_000).unwrap();
        assert_eq!(plan.index, 2);
        let web = &plan.changes[0];
        assert_eq!(
            (web.service.as_str(), web.action),
            ("app-web", Action::Create)
        );
        assert_eq!(web.placements.values().sum::<u32>(), 2);
        assert_eq!(web.placements.len(), 2, "spread over both nodes");
        assert!(plan.changes_something());
        assert!(state.services.is_empty(), "planning changes nothing");
    }

    #[test]
    fn a_plan_names_exactly_the_changed_fields_and_explains_what_does_not_fit() {
        let mut state = cluster();
        let deployed = vec![spec("web", 1), spec("db", 1)];
        state
            .apply(
                3,
                Command::DeployStack {
                    stack: "app".into(),
                    services: deployed.clone(),
                    check_index: None,
                },
            )
            .unwrap();
        let same = plan_stack(&state, "app", deployed, &[], 1_000).unwrap();
        assert!(!same.changes_something());

        let mut web = spec("web", 1);
        web.env.insert("A".into(), "1".into());
        let mut big = spec("cache", 1);
        big.memory_mb = Some(4096);
        let plan = plan_stack(&state, "app", vec![web, big], &[], 1_000).unwrap();
        let by_name: BTreeMap<&str, &ServiceChange> = plan
            .changes
            .iter()
            .map(|c| (c.service.as_str(), c))
            .collect();
        assert_eq!(by_name["app-web"].action, Action::Update);
        assert_eq!(
            by_name["app-web"].diff,
            [format!(
                "env.A: null -> \"{}\"",
                skiff_spec::value_hash("1")
            )]
        );
        assert_eq!(by_name["app-db"].action, Action::Remove);
        assert_eq!(by_name["app-cache"].action, Action::Create);
        assert!(
            by_name["app-cache"].unplaced.contains("memory"),
            "{}",
            by_name["app-cache"].unplaced
        );
        let mut scaled = spec("web", 3);
        scaled.labels.insert("team".into(), "a".into());
        let plan = plan_stack(&state, "app", vec![scaled, spec("db", 1)], &[], 1_000).unwrap();
        assert_eq!(plan.changes[1].action, Action::InPlace);
        assert_eq!(plan.changes[1].diff.len(), 2, "{:?}", plan.changes[1].diff);
    }

    #[test]
    fn a_plan_is_refused_as_the_deploy_would_be() {
        let state = cluster();
        let mut bad = spec("web", 1);
        bad.command.clear();
        assert!(plan_stack(&state, "app", vec![bad], &[], 1_000).is_err());
    }
}
