//! Persistence of the applied state in a sled tree, one record per key.
//!
//! Each batch of applied entries is written as one atomic sled batch that
//! also carries the applied index, so after a crash the stored state and its
//! index always agree and the log is replayed from exactly the next entry.
//! The batch is not flushed on its own: the Raft log it came from is already
//! durable, so losing the tail of applied state only means replaying it.

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{Key, State};

const APPLIED_INDEX: &[u8] = b"meta/applied_index";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state store i/o failed: {0}")]
    Sled(#[from] sled::Error),
    #[error("state record {key} is corrupt: {source}")]
    Corrupt {
        key: String,
        source: serde_json::Error,
    },
}

/// The sled tree holding the applied state.
pub struct StateStore {
    tree: sled::Tree,
}

impl StateStore {
    pub fn open(db: &sled::Db) -> Result<Self, StoreError> {
        Ok(StateStore {
            tree: db.open_tree("state")?,
        })
    }

    /// Makes every saved record durable.
    pub fn flush_pending(&self) -> Result<(), StoreError> {
        self.tree.flush()?;
        Ok(())
    }

    /// Loads the whole state, as persisted by [`StateStore::save`].
    pub fn load(&self) -> Result<State, StoreError> {
        let mut state = State::default();
        for item in self.tree.iter() {
            let (key, value) = item?;
            let key = String::from_utf8_lossy(&key).into_owned();
            if let Some(name) = key.strip_prefix("service/") {
                state
                    .services
                    .insert(name.to_string(), decode(&key, &value)?);
            } else if let Some(name) = key.strip_prefix("node/") {
                state.nodes.insert(name.to_string(), decode(&key, &value)?);
            } else if let Some(id) = key.strip_prefix("alloc/") {
                state.allocs.insert(id.to_string(), decode(&key, &value)?);
            } else if key.starts_with("member/") {
                let member: super::Member = decode(&key, &value)?;
                state.members.insert(member.id, member);
            } else if let Some(name) = key.strip_prefix("var/") {
                state
                    .variables
                    .insert(name.to_string(), decode(&key, &value)?);
            } else if key.as_bytes() == APPLIED_INDEX {
                state.applied_index = decode(&key, &value)?;
            }
        }
        Ok(state)
    }

    /// Replaces everything stored with `state` (after a snapshot was
    /// installed), in one atomic batch.
    pub fn replace(&self, state: &mut State) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for key in self.tree.iter().keys() {
            batch.remove(key?);
        }
        self.write(state, batch)
    }

    /// Writes every record changed since the last save, and the applied
    /// index, in one atomic batch.
    pub fn save(&self, state: &mut State) -> Result<(), StoreError> {
        self.write(state, sled::Batch::default())
    }

    fn write(&self, state: &mut State, mut batch: sled::Batch) -> Result<(), StoreError> {
        for key in state.take_dirty() {
            let (name, value) = match &key {
                Key::Service(n) => (format!("service/{n}"), state.services.get(n).map(encode)),
                Key::Node(n) => (format!("node/{n}"), state.nodes.get(n).map(encode)),
                Key::Alloc(id) => (format!("alloc/{id}"), state.allocs.get(id).map(encode)),
                Key::Member(id) => (
                    format!("member/{id:020}"),
                    state.members.get(id).map(encode),
                ),
                Key::Variable(k) => (format!("var/{k}"), state.variables.get(k).map(encode)),
            };
            match value {
                Some(bytes) => batch.insert(name.as_bytes(), bytes),
                None => batch.remove(name.as_bytes()),
            }
        }
        batch.insert(APPLIED_INDEX, encode(&state.applied_index));
        self.tree.apply_batch(batch)?;
        Ok(())
    }
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("state records always serialize")
}

fn decode<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|source| StoreError::Corrupt {
        key: key.to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Command, RuntimeKind, ServiceSpec};

    #[test]
    fn saved_state_loads_back_including_removals() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let store = StateStore::open(&db).unwrap();
        let mut state = State::default();
        for (i, name) in ["a", "b"].into_iter().enumerate() {
            let spec = ServiceSpec {
                name: name.into(),
                runtime: RuntimeKind::Process,
                replicas: 1,
                command: vec!["true".into()],
                env: Default::default(),
                workdir: None,
                ..Default::default()
            };
            state
                .apply(i as u64 + 1, Command::CreateService { spec })
                .unwrap();
        }
        store.save(&mut state).unwrap();
        state
            .apply(3, Command::RemoveService { name: "a".into() })
            .unwrap();
        store.save(&mut state).unwrap();
        let loaded = store.load().unwrap();
        assert_eq!(loaded.applied_index, 3);
        assert_eq!(loaded.services.keys().collect::<Vec<_>>(), vec!["b"]);
        assert_eq!(loaded.services["b"], state.services["b"]);
    }
}
