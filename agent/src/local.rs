//! The node's local allocations: one supervisor per allocation that should
//! run, the records of replicas a previous agent left behind, and the last
//! status of each, resent after every reconnect. An allocation the control
//! plane no longer assigns, once stopped, is retired: its directory removed,
//! its logs kept a while (see `store.rs`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

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
    /// Allocations whose directory is being retired off the async threads.
    retiring: Arc<Mutex<BTreeSet<String>>>,
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
            retiring: Arc::default(),
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
                port: 0,
                health_checked: false,
                exit_code: None,
                refused: true,
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
            // A job's supervisor ends on its own when its replica exits:
            // nothing is left to stop, and no "stopped" report will come.
            if self
                .supervisors
                .get(&id)
                .is_some_and(|e| e.task.is_finished())
            {
                self.supervisors.remove(&id);
                continue;
            }
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
        self.retire_unassigned();
    }

    /// Retires every allocation directory that nothing here knows any more:
    /// no supervisor, no dormant record, not in the assignment set (also
    /// directories earlier agents left). Removal can be slow (a process
    /// replica may have written into its directory), so it runs on the
    /// blocking pool, one batch per allocation at a time.
    fn retire_unassigned(&self) {
        let mut retiring = self.retiring.lock().unwrap_or_else(PoisonError::into_inner);
        let gone: Vec<String> = self
            .store
            .alloc_ids()
            .into_iter()
            .filter(|id| {
                !self.supervisors.contains_key(id)
                    && !self.dormant.contains_key(id)
                    && !self.assigned_ids.contains(id)
                    && !retiring.contains(id)
            })
            .collect();
        if gone.is_empty() {
            return;
        }
        retiring.extend(gone.iter().cloned());
        drop(retiring);
        let (store, retiring) = (self.store.clone(), self.retiring.clone());
        tokio::task::spawn_blocking(move || {
            for id in gone {
                match store.retire(&id, SystemTime::now()) {
                    Ok(()) => {
                        tracing::info!(alloc = %id, "removed the directory of a replica no longer assigned; its logs are kept")
                    }
                    Err(e) => {
                        tracing::warn!(alloc = %id, error = %e, "failed to remove the directory of a replica no longer assigned")
                    }
                }
                retiring
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&id);
            }
        });
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
    async fn directories_of_allocations_no_longer_assigned_are_removed_and_their_logs_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(AllocStore::open(dir.path()).unwrap());
        // Left by an earlier agent: a directory without a record.
        let old = store.alloc_dir("old1");
        std::fs::create_dir_all(&old).unwrap();
        std::fs::write(old.join("stderr.log"), b"old\n").unwrap();

        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut local = LocalAllocs::new(
            Arc::new(ProcessRuntime::new()),
            store.clone(),
            quick_config(),
            tx,
        );
        local.recover().unwrap();
        let stop = |id: &str| Assigned {
            desired: Desired::Stop,
            ..run(id)
        };
        local.assign(vec![run("a1"), run("a2")], vec![]);
        next(&mut rx, &mut local, AllocState::Running).await;
        next(&mut rx, &mut local, AllocState::Running).await;
        let kept = |id: &str, log: &str| {
            !store.alloc_dir(id).exists() && store.logs_dir().join(id).join(log).is_file()
        };
        let eventually = |cond: &dyn Fn() -> bool| {
            (0..100).any(|_| {
                if cond() {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(50));
                false
            })
        };
        assert!(
            eventually(&|| kept("old1", "stderr.log")),
            "a directory nothing assigns is retired"
        );
        for id in ["a1", "a2"] {
            std::fs::write(store.alloc_dir(id).join("stdout.log"), b"out\n").unwrap();
        }

        // a1 stopped but still assigned (desired stop): its directory stays for `service logs`.
        local.assign(vec![stop("a1"), run("a2")], vec![]);
        next(&mut rx, &mut local, AllocState::Stopped).await;
        assert!(store.alloc_dir("a1").is_dir(), "kept while assigned");

        // Both gone from the assignments: a1 is retired at once, a2 once stopped.
        local.assign(vec![], vec![]);
        next(&mut rx, &mut local, AllocState::Stopped).await;
        assert!(eventually(&|| kept("a1", "stdout.log")), "a1 not retired");
        assert!(eventually(&|| kept("a2", "stdout.log")), "a2 not retired");
        assert_eq!(
            std::fs::read(store.logs_dir().join("a2/stdout.log")).unwrap(),
            b"out\n"
        );
        assert!(store.alloc_ids().is_empty());
        local.shutdown(true).await;
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
