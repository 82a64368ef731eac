//! Read-only lookups over the state, as the scheduler, the controllers
//! and the API make them.

use super::{Allocation, Availability, NodeStatus, State};

impl State {
    /// Live allocations of a service, by id.
    pub fn live_allocs<'a>(&'a self, service: &'a str) -> impl Iterator<Item = &'a Allocation> {
        self.allocs_of(service).filter(|a| a.is_live())
    }

    /// Every allocation of a service, by id.
    pub fn allocs_of<'a>(&'a self, service: &'a str) -> impl Iterator<Item = &'a Allocation> {
        self.index
            .by_service
            .get(service)
            .into_iter()
            .flatten()
            .filter_map(|id| self.allocs.get(id))
    }

    /// Names of the services that have allocations (in no order).
    pub fn services_with_allocs(&self) -> impl Iterator<Item = &str> {
        self.index.by_service.keys().map(String::as_str)
    }

    /// Every allocation placed on a node, by id.
    pub fn allocs_on<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Allocation> {
        self.index
            .by_node
            .get(node)
            .into_iter()
            .flatten()
            .filter_map(|id| self.allocs.get(id))
    }

    /// Raft index of the last change to the node's allocations (0: none).
    pub fn node_changed_index(&self, node: &str) -> u64 {
        self.index.node_changed.get(node).copied().unwrap_or(0)
    }

    /// The images a node should pull ahead: those of deployments in
    /// progress whose service may run there (eligible and within its
    /// constraints).
    pub fn prepull_images(&self, node: &str) -> Vec<String> {
        let Some(node) = self.nodes.get(node) else {
            return Vec::new();
        };
        let mut images: Vec<String> = self
            .services
            .values()
            .filter(|s| s.active_deployment().is_some())
            .filter(|s| node.can_run(&s.spec))
            .filter_map(|s| s.spec.image.clone())
            .collect();
        images.sort();
        images.dedup();
        images
    }

    /// Whether every node that may run `service` has its image stored (or
    /// it runs no image).
    pub fn image_prepulled(&self, service: &str) -> bool {
        let Some(spec) = self.services.get(service).map(|s| &s.spec) else {
            return true;
        };
        let Some(image) = &spec.image else {
            return true;
        };
        self.nodes
            .values()
            .filter(|n| n.status == NodeStatus::Ready && n.can_run(spec))
            .all(|n| n.images.contains(image))
    }

    /// Live replicas of the service's current version that count toward
    /// its desired count (not on a draining node): what placements may
    /// add to. Replicas of older versions are replaced by a deployment and
    /// do not count.
    pub fn counted_current(&self, service: &str) -> usize {
        let Some(spec) = self.services.get(service).map(|s| &s.spec) else {
            return 0;
        };
        self.live_allocs(service)
            .filter(|a| a.spec.runs_same(spec))
            .filter(|a| {
                self.nodes
                    .get(&a.node)
                    .is_none_or(|n| n.availability != Availability::Drain)
            })
            .count()
    }

    /// Live replicas of a service that count toward its desired count:
    /// those not on a draining node (which are being replaced).
    pub fn counted_replicas(&self, service: &str) -> usize {
        self.live_allocs(service)
            .filter(|a| {
                self.nodes
                    .get(&a.node)
                    .is_none_or(|n| n.availability != Availability::Drain)
            })
            .count()
    }
}
