//! The node's local allocations: one supervisor per allocation that should
//! run, the records of replicas a previous agent left behind, and the last
//! status of each, resent after every reconnect.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::reconcile::{self, Assigned, Local};
use crate::runtime::Runtime;
use crate::store::{AllocRecord, AllocStore, StoreError};
use crate::supervisor::{AllocState, StatusUpdate, StopSender, Supervisor, SupervisorConfig};

/// Extra time on top of the stop grace for supervisors to finish on
/// shutdown: SIGKILL delivery and reaping.
const SHUTDOWN_SLACK: Duration = Duration::from_secs(12);
/// How long detached supervisors get to notice they are detached.
const DETACH_WAIT: Duration = Duration::from_secs(2);

struct Entry {
    /// `None` once stop was requested.
    stop: Option<StopSender>,
    task: JoinHandle<()>,
}

pub struct LocalAllocs<R: Runtime> {
    runtime: Arc<R>,
    store: Arc<AllocStore>,
    config: SupervisorConfig,
    updates: mpsc::UnboundedSender<StatusUpdate>,
    supervisors: BTreeMap<String, Entry>,
    /// Records whose process was gone when the agent started.
    dormant: BTreeMap<String, AllocRecord>,
    statuses: BTreeMap<String, StatusUpdate>,
    /// The last assignment set, kept to re-plan when a stop completes.
    assigned: Option<Vec<Assigned>>,
    /// Every id in the last assignment set, including refused ones.
    assigned_ids: BTreeSet<String>,
}

impl<R: Runtime> LocalAllocs<R> {
    pub fn new(
        runtime: Arc<R>,
        store: Arc<AllocStore>,
        config: SupervisorConfig,
        updates: mpsc::UnboundedSender<StatusUpdate>,
    ) -> Self {
        Self {
            runtime,
            store,
            config,
            updates,
            supervisors: BTreeMap::new(),
            dormant: BTreeMap::new(),
            statuses: BTreeMap::new(),
            assigned: None,
            assigned_ids: BTreeSet::new(),
        }
    }

    /// Loads the records a previous agent left: live replicas are adopted
    /// and supervised at once (before any server is reached, so they are
    /// watched and restarted meanwhile); the others wait for an assignment.
    pub fn recover(&mut self) -> Result<(), StoreError> {
        for record in self.store.load_all()? {
            let id = record.spec.alloc_id.clone();
            let adopted = if record.pid == 0 {
                None
            } else {
                self.runtime
                    .recover(&record.spec, record.pid, record.start_time)
            };
            match adopted {
                Some(handle) => {
                    tracing::info!(alloc = %id, pid = record.pid, "re-adopting replica");
                    self.spawn(record.spec, record.restarts, Some(handle));
                }
                None => {
                    tracing::info!(alloc = %id, pid = record.pid, "replica of a previous agent is gone; restarting it once assigned");
                    self.dormant.insert(id, record);
                }
            }
        }
        Ok(())
    }

    /// Takes the node's full assignment set and reconciles. `refused` are
    /// assigned allocations that cannot run here (id, reason); they are
    /// reported failed.
    /// The runtime, for work beside the replicas (pre-pulling images).
    pub fn runtime(&self) -> Arc<R> {
        self.runtime.clone()
    }

    pub fn assign(&mut self, assigned: Vec<Assigned>, refused: Vec<(String, String)>) {
        self.assigned_ids = assigned
            .iter()
            .map(|a| a.spec.alloc_id.clone())
            .chain(refused.iter().map(|(id, _)| id.clone()))
            .collect();
        self.assigned = Some(assigned);
        for (id, message) in refused {
            if self.statuses.get(&id).is_some_and(|s| s.message == message) {
                continue;
            }
            tracing::warn!(alloc = %id, %message, "refusing assigned allocation");
            let _ = self.updates.send(StatusUpdate {
                alloc_id: id,
                state: AllocState::Failed,
                restarts: 0,
                pid: 0,
                message,
            });
        }
        self.reconcile();
    }

    /// Records a supervisor's status; a finished stop frees the allocation
    /// and re-plans, in case it was assigned to run again meanwhile.
    pub fn observe(&mut self, update: &StatusUpdate) {
        self.statuses
            .insert(update.alloc_id.clone(), update.clone());
        if update.state == AllocState::Stopped {
            let stopping = self
                .supervisors
                .get(&update.alloc_id)
                .is_some_and(|e| e.stop.is_none());
            if stopping {
                self.supervisors.remove(&update.alloc_id);
                self.reconcile();
            }
        }
    }

    /// The last status of every allocation the node knows.
    pub fn statuses(&self) -> impl Iterator<Item = &StatusUpdate> {
        self.statuses.values()
    }

    /// The assigned replicas whose process runs now (running, healthy or
    /// unhealthy), with their host PID: those whose use is measured.
    pub fn running(&self) -> impl Iterator<Item = (&crate::spec::ReplicaSpec, u32)> {
        let statuses = &self.statuses;
        self.assigned.iter().flatten().filter_map(move |a| {
            let status = statuses.get(&a.spec.alloc_id)?;
            let up = matches!(
                status.state,
                AllocState::Running | AllocState::Healthy | AllocState::Unhealthy
            );
            (up && status.pid != 0).then_some((&a.spec, status.pid))
        })
    }

    fn reconcile(&mut self) {
        let Some(assigned) = &self.assigned else {
            return;
        };
        let local: BTreeMap<String, Local> = self
            .supervisors
            .iter()
            .map(|(id, e)| {
                let state = if e.stop.is_some() {
                    Local::Active
                } else {
                    Local::Stopping
                };
                (id.clone(), state)
            })
            .chain(self.dormant.keys().map(|id| (id.clone(), Local::Dormant)))
            .collect();
        let plan = reconcile::plan(assigned, &local);
        for spec in plan.start {
            let restarts = self
                .dormant
                .remove(&spec.alloc_id)
                .map_or(0, |r| r.restarts.saturating_add(1));
            tracing::info!(alloc = %spec.alloc_id, service = %spec.service, port = spec.host_port, "starting supervisor");
            self.spawn(spec, restarts, None);
        }
        for id in plan.stop {
            if let Some(stop) = self.supervisors.get_mut(&id).and_then(|e| e.stop.take()) {
                tracing::info!(alloc = %id, "stopping replica");
                let _ = stop.send(());
            }
        }
        for id in plan.forget {
            if let Some(record) = self.dormant.remove(&id) {
                self.runtime
                    .destroy(&record.spec, &self.store.alloc_dir(&id));
            }
            if let Err(e) = self.store.delete(&id) {
                tracing::warn!(alloc = %id, error = %e, "failed to delete allocation record");
            }
        }
        let (supervisors, assigned_ids) = (&self.supervisors, &self.assigned_ids);
        self.statuses
            .retain(|id, _| supervisors.contains_key(id) || assigned_ids.contains(id));
    }

    fn spawn(&mut self, spec: crate::spec::ReplicaSpec, restarts: u32, adopted: Option<R::Handle>) {
        let id = spec.alloc_id.clone();
        let (stop, stop_rx) = oneshot::channel();
        let supervisor = Supervisor::new(
            self.runtime.clone(),
            self.store.clone(),
            self.config.clone(),
            spec,
            restarts,
            self.updates.clone(),
        );
        let task = tokio::spawn(supervisor.run(adopted, stop_rx));
        self.supervisors.insert(
            id,
            Entry {
                stop: Some(stop),
                task,
            },
        );
    }

    /// Stops every replica (with the grace) or detaches from them, then
    /// waits, bounded, for the supervisors to finish.
    pub async fn shutdown(mut self, stop_replicas: bool) {
        for entry in self.supervisors.values_mut() {
            if let Some(stop) = entry.stop.take() {
                if stop_replicas {
                    let _ = stop.send(());
                }
            }
        }
        let limit = if stop_replicas {
            self.config.stop_grace + SHUTDOWN_SLACK
        } else {
            DETACH_WAIT
        };
        let deadline = tokio::time::Instant::now() + limit;
        for (id, mut entry) in std::mem::take(&mut self.supervisors) {
            if tokio::time::timeout_at(deadline, &mut entry.task)
                .await
                .is_err()
            {
                tracing::warn!(alloc = %id, "supervisor did not finish in time; abandoning it");
                entry.task.abort();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconcile::Desired;
    use crate::runtime::process::ProcessRuntime;
    use crate::runtime::procfs;
    use crate::spec::test_spec;

    fn run(id: &str) -> Assigned {
        Assigned {
            spec: test_spec(id, &["sleep", "30"], 20001),
            desired: Desired::Run,
        }
    }

    async fn next(
        rx: &mut mpsc::UnboundedReceiver<StatusUpdate>,
        local: &mut LocalAllocs<ProcessRuntime>,
        state: AllocState,
    ) -> StatusUpdate {
        loop {
            let u = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .expect("no status in time")
                .expect("channel closed");
            local.observe(&u);
            if u.state == state {
                return u;
            }
        }
    }

    fn quick_config() -> SupervisorConfig {
        SupervisorConfig {
            stop_grace: Duration::from_secs(2),
            ..SupervisorConfig::default()
        }
    }

    #[tokio::test]
    async fn replicas_left_running_are_re_adopted_by_the_next_agent_and_stopped_when_unassigned() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(AllocStore::open(dir.path()).unwrap());
        let runtime = Arc::new(ProcessRuntime::new());

        // First agent: runs a1, then shuts down leaving it running.
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut first = LocalAllocs::new(runtime.clone(), store.clone(), quick_config(), tx);
        first.assign(vec![run("a1")], vec![]);
        let running = next(&mut rx, &mut first, AllocState::Running).await;
        first.shutdown(false).await;
        let record = store.load_all().unwrap().pop().unwrap();
        assert_eq!(record.pid, running.pid);
        assert!(
            procfs::is_same_live_process(record.pid, record.start_time),
            "left running"
        );

        // Second agent: adopts it with the same pid, then stops it.
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut second = LocalAllocs::new(runtime, store.clone(), quick_config(), tx);
        second.recover().unwrap();
        let adopted = next(&mut rx, &mut second, AllocState::Running).await;
        assert_eq!(adopted.pid, running.pid);
        second.assign(vec![], vec![]);
        next(&mut rx, &mut second, AllocState::Stopped).await;
        // Not our child any more: wait (bounded) for init to reap it.
        for _ in 0..50 {
            if !procfs::is_same_live_process(record.pid, record.start_time) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(!procfs::is_same_live_process(record.pid, record.start_time));
        assert!(store.load_all().unwrap().is_empty());
        assert_eq!(second.statuses().count(), 0);
        second.shutdown(true).await;
    }

    #[tokio::test]
    async fn dead_replica_records_restart_only_when_assigned_again() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(AllocStore::open(dir.path()).unwrap());
        for (id, restarts) in [("gone", 2), ("dropped", 0)] {
            store
                .save(&AllocRecord {
                    spec: test_spec(id, &["sleep", "30"], 20001),
                    pid: 0,
                    start_time: 0,
                    restarts,
                })
                .unwrap();
        }
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut local = LocalAllocs::new(
            Arc::new(ProcessRuntime::new()),
            store.clone(),
            quick_config(),
            tx,
        );
        local.recover().unwrap();
        assert!(
            rx.try_recv().is_err(),
            "nothing starts before an assignment"
        );

        local.assign(
            vec![run("gone")],
            vec![("bad".into(), "allocation bad has no spec".into())],
        );
        let failed = next(&mut rx, &mut local, AllocState::Failed).await;
        assert_eq!(failed.alloc_id, "bad");
        let running = next(&mut rx, &mut local, AllocState::Running).await;
        assert_eq!((running.alloc_id.as_str(), running.restarts), ("gone", 3));
        let ids: Vec<String> = store
            .load_all()
            .unwrap()
            .into_iter()
            .map(|r| r.spec.alloc_id)
            .collect();
        assert_eq!(ids, ["gone"], "unassigned record forgotten");

        let record = store.load_all().unwrap().pop().unwrap();
        assert_eq!(record.pid, running.pid);
        local.shutdown(true).await;
        assert!(!procfs::is_same_live_process(record.pid, record.start_time));
        assert!(store.load_all().unwrap().is_empty(), "stopped on shutdown");
    }
}
