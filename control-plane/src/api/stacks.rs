//! The stack calls: `stack deploy`, `stack plan` and `stack rm`. The specs
//! are converted and validated by `skiff_spec` like every other spec; the
//! published ports are checked against the services outside the stack.

use skiff_proto::v1 as pb;
use tonic::Status;

use super::control::invalid;
use super::{status_from, Api};
use crate::controllers::now_ms;
use crate::controllers::stack_plan::{self, StackPlan};
use crate::state::{Command, ServiceSpec, State};

impl Api {
    /// The request's specs, validated, with their published ports free.
    async fn stack_specs(
        &self,
        request: &pb::DeployStackRequest,
    ) -> Result<Vec<ServiceSpec>, Status> {
        let specs = request
            .services
            .iter()
            .cloned()
            .map(skiff_spec::pb::spec_from_pb)
            .collect::<Result<Vec<_>, _>>()
            .map_err(invalid)?;
        self.barrier().await?;
        let state = self.consensus.state();
        check_published_ports(&state, &request.stack, &specs)?;
        Ok(specs)
    }

    pub(super) async fn deploy_stack_call(
        &self,
        request: pb::DeployStackRequest,
    ) -> Result<pb::DeployStackResponse, Status> {
        let services = self.stack_specs(&request).await?;
        let new = {
            let state = self.consensus.state();
            services
                .iter()
                .filter(|s| !state.services.contains_key(&s.name))
                .count()
        };
        self.check_service_count(new)?;
        self.propose(Command::DeployStack {
            stack: request.stack,
            services,
            check_index: request.check_index,
        })
        .await?;
        self.barrier().await?;
        Ok(pb::DeployStackResponse {
            index: self.consensus.state().applied_index,
        })
    }

    pub(super) async fn plan_stack_call(
        &self,
        request: pb::DeployStackRequest,
    ) -> Result<pb::StackPlan, Status> {
        let services = self.stack_specs(&request).await?;
        let state = self.consensus.state();
        let plan =
            stack_plan::plan_stack(&state, &request.stack, services, &request.secrets, now_ms())
                .map_err(|e| status_from(e.into()))?;
        Ok(plan_to_pb(plan))
    }

    pub(super) async fn remove_stack_call(&self, stack: String) -> Result<(), Status> {
        self.propose(Command::RemoveStack { stack }).await
    }
}

/// Two services may not publish one port: the stack's own among
/// themselves, and against every service outside the stack.
fn check_published_ports(state: &State, stack: &str, specs: &[ServiceSpec]) -> Result<(), Status> {
    let mut taken: std::collections::BTreeMap<u16, &str> = state
        .services
        .values()
        .filter(|s| {
            s.spec
                .labels
                .get(skiff_spec::STACK_LABEL)
                .map(String::as_str)
                != Some(stack)
        })
        .filter_map(|s| s.spec.publish.map(|p| (p, s.spec.name.as_str())))
        .collect();
    for spec in specs {
        if let Some(port) = spec.publish {
            if let Some(why) = super::control::reserved_port(state, port) {
                return Err(Status::invalid_argument(format!(
                    "invalid {}.publish: port {port} {why}; choose another port",
                    spec.name
                )));
            }
            if let Some(other) = taken.insert(port, &spec.name) {
                return Err(Status::already_exists(format!(
                    "invalid {}.publish: port {port} is already published by service \"{other}\"; choose another port",
                    spec.name
                )));
            }
        }
    }
    Ok(())
}

fn plan_to_pb(plan: StackPlan) -> pb::StackPlan {
    pb::StackPlan {
        index: plan.index,
        changes: plan
            .changes
            .into_iter()
            .map(|c| pb::ServiceChange {
                service: c.service,
                action: c.action.as_str().to_string(),
                diff: c.diff,
                placements: c
                    .placements
                    .into_iter()
                    .map(|(node, replicas)| pb::NodeCount { node, replicas })
                    .collect(),
                unplaced: c.unplaced,
            })
            .collect(),
    }
}
