//! The serialized form of the state carried by Raft snapshots, and the
//! lookups derived from its records, rebuilt on load and never persisted.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use serde::{Deserialize, Serialize};

use super::{Allocation, Event, Member, Node, PkiState, Secret, Service, State, Token, Volume};

/// [`StateImage`] by reference, for encoding without copying the state.
#[derive(Serialize)]
struct StateImageRef<'a> {
    services: &'a BTreeMap<String, Service>,
    nodes: &'a BTreeMap<String, Node>,
    allocs: &'a BTreeMap<String, Allocation>,
    members: &'a BTreeMap<u64, Member>,
    variables: &'a imbl::OrdMap<String, String>,
    events: &'a VecDeque<Event>,
    volumes: &'a BTreeMap<String, Volume>,
    secrets: &'a BTreeMap<String, Secret>,
    pki: &'a PkiState,
    tokens: &'a BTreeMap<String, Token>,
    applied_index: u64,
}

/// The serialized form of [`State`] carried by Raft snapshots.
#[derive(Default, Serialize, Deserialize)]
struct StateImage {
    services: BTreeMap<String, Service>,
    nodes: BTreeMap<String, Node>,
    allocs: BTreeMap<String, Allocation>,
    members: BTreeMap<u64, Member>,
    #[serde(default)]
    variables: BTreeMap<String, String>,
    #[serde(default)]
    events: VecDeque<Event>,
    #[serde(default)]
    volumes: BTreeMap<String, Volume>,
    #[serde(default)]
    secrets: BTreeMap<String, Secret>,
    #[serde(default)]
    pki: PkiState,
    tokens: BTreeMap<String, Token>,
    applied_index: u64,
}

/// Lookups derived from `allocs`, rebuilt on load; never persisted.
#[derive(Clone, Debug, Default)]
pub(super) struct AllocIndex {
    pub(super) by_node: HashMap<String, BTreeSet<String>>,
    pub(super) by_service: HashMap<String, BTreeSet<String>>,
    /// Raft index of the last change to any allocation of each node, so
    /// the agent streams resend only when something of theirs changed.
    pub(super) node_changed: HashMap<String, u64>,
}

impl AllocIndex {
    pub(super) fn insert(&mut self, alloc: &Allocation) {
        self.by_node
            .entry(alloc.node.clone())
            .or_default()
            .insert(alloc.id.clone());
        self.by_service
            .entry(alloc.service.clone())
            .or_default()
            .insert(alloc.id.clone());
    }

    pub(super) fn remove(&mut self, alloc: &Allocation) {
        for (map, key) in [
            (&mut self.by_node, &alloc.node),
            (&mut self.by_service, &alloc.service),
        ] {
            if let Some(ids) = map.get_mut(key) {
                ids.remove(&alloc.id);
                if ids.is_empty() {
                    map.remove(key);
                }
            }
        }
    }
}

impl State {
    /// Encodes the whole state for a Raft snapshot (by reference: the
    /// state is not copied).
    pub fn to_image(&self) -> Vec<u8> {
        let image = StateImageRef {
            services: &self.services,
            nodes: &self.nodes,
            allocs: &self.allocs,
            members: &self.members,
            variables: &self.variables,
            events: &self.events,
            volumes: &self.volumes,
            secrets: &self.secrets,
            pki: &self.pki,
            tokens: &self.tokens,
            applied_index: self.applied_index,
        };
        serde_json::to_vec(&image).expect("state always serializes")
    }

    /// Decodes a snapshot image; every record counts as changed so the
    /// storage layer rewrites them all.
    pub fn from_image(bytes: &[u8]) -> Result<State, serde_json::Error> {
        let image: StateImage = if bytes.is_empty() {
            StateImage::default()
        } else {
            serde_json::from_slice(bytes)?
        };
        let mut state = State {
            services: image.services,
            nodes: image.nodes,
            allocs: image.allocs,
            members: image.members,
            variables: image.variables.into_iter().collect(),
            events: image.events,
            volumes: image.volumes,
            secrets: image.secrets,
            pki: image.pki,
            tokens: image.tokens,
            applied_index: image.applied_index,
            ..State::default()
        };
        state.rebuild_indexes();
        Ok(state)
    }

    /// Recomputes what is derived from the records (after loading them).
    fn rebuild_indexes(&mut self) {
        self.index = AllocIndex::default();
        for alloc in self.allocs.values() {
            self.index.insert(alloc);
            self.index
                .node_changed
                .insert(alloc.node.clone(), self.applied_index);
        }
        self.clock_ms = self.events.iter().map(|e| e.time_ms).max().unwrap_or(0);
    }

    /// Whether two states hold the same records (ignoring derived indexes).
    pub fn same_records(&self, other: &State) -> bool {
        self.services == other.services
            && self.nodes == other.nodes
            && self.allocs == other.allocs
            && self.members == other.members
            && self.variables == other.variables
            && self.events == other.events
            && self.volumes == other.volumes
            && self.secrets == other.secrets
            && self.pki == other.pki
            && self.tokens == other.tokens
    }
}
