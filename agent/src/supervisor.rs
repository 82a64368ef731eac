//! One supervisor per allocation: a tokio task that prepares (pulls) and
//! starts the replica, watches it and runs its health check, restarts it on
//! any exit or when unhealthy with exponential backoff, records its PID
//! durably, reports every state change, and stops it on request.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::backoff::{human, Backoff};
use crate::health::{self, HealthTracker, Probe, Transition};
use crate::runtime::{Exit, Runtime, TaskHandle};
use crate::spec::ReplicaSpec;
use crate::store::{AllocRecord, AllocStore};

/// The shared states (the agent never reports `Pending`).
pub use skiff_spec::AllocState;

/// One state change of one allocation, sent to the sync loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusUpdate {
    pub alloc_id: String,
    pub state: AllocState,
    pub restarts: u32,
    /// Host PID while running, else 0.
    pub pid: u32,
    pub message: String,
    /// The port the replica listens on in its own network (0: the host's
    /// or not known yet).
    pub port: u16,
    /// The replica has a health check: it serves only once healthy.
    pub health_checked: bool,
    /// A job's replica that ended: its exit status.
    pub exit_code: Option<i32>,
    /// The agent refuses the assignment: it never runs here.
    pub refused: bool,
}

/// Replica teardowns (runtime state, network, mounts) running at once.
static TEARDOWNS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);

/// The shortest drain of a published replica (see `Supervisor::drain`):
/// the control plane pushes endpoint changes to every agent's proxy within
/// tens of milliseconds on a LAN, and a proxy that still dials the replica
/// after it stopped listening retries on another before the client sees
/// anything.
const MIN_DRAIN: Duration = Duration::from_millis(250);
/// How often a draining replica's connections are counted.
const DRAIN_POLL: Duration = Duration::from_millis(100);

/// Established TCP connections whose local port is `port` in the network
/// namespace of process `pid` (`/proc/PID/net/tcp{,6}`); `None` if unreadable.
fn established_connections(pid: u32, port: u16) -> Option<usize> {
    let mut count = 0;
    let mut read_any = false;
    for table in ["tcp", "tcp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
            continue;
        };
        read_any = true;
        count += count_established(&text, port);
    }
    read_any.then_some(count)
}

/// Rows of a `/proc/net/tcp` table in state ESTABLISHED (01) whose local
/// address has port `port` (hex after the colon).
fn count_established(table: &str, port: u16) -> usize {
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local_port = fields
                .get(1)
                .and_then(|local| local.rsplit(':').next())
                .and_then(|hex| u16::from_str_radix(hex, 16).ok());
            local_port == Some(port) && fields.get(3) == Some(&"01")
        })
        .count()
}

#[derive(Debug, Clone)]
pub struct SupervisorConfig {
    /// SIGTERM -> SIGKILL grace when stopping.
    pub stop_grace: Duration,
    pub restart_base: Duration,
    pub restart_max: Duration,
    /// A replica that ran this long restarts with the base delay again.
    pub stable_after: Duration,
    /// How long a published replica asked to stop keeps running before
    /// SIGTERM: the control plane already took it out of every routing
    /// proxy's pool, and its open connections get this long to finish.
    pub drain: Duration,
}

impl Default for SupervisorConfig {
    fn default() -> Self {
        Self {
            stop_grace: Duration::from_secs(5),
            restart_base: Duration::from_secs(1),
            restart_max: Duration::from_secs(30),
            stable_after: Duration::from_secs(10),
            drain: Duration::ZERO,
        }
    }
}

/// Tells a supervisor to stop its replica. Dropping it instead detaches the
/// supervisor: the task ends and the replica keeps running (agent shutdown
/// without stopping replicas).
pub type StopSender = oneshot::Sender<()>;

pub struct Supervisor<R: Runtime> {
    runtime: Arc<R>,
    store: Arc<AllocStore>,
    config: SupervisorConfig,
    spec: ReplicaSpec,
    restarts: u32,
    updates: mpsc::UnboundedSender<StatusUpdate>,
    /// The running replica's container port, sent with every report.
    port: u16,
    /// Whether the running replica has a health check (its spec's or its
    /// image's), sent with every report.
    health_checked: bool,
}

/// How often a replica's failed probes count until its first successful
/// check (or the check's interval, if shorter).
const HEALTH_WARMUP_INTERVAL: Duration = Duration::from_millis(250);
/// Until the first success, probes also run in between, starting this soon
/// after the start and doubling up to [`HEALTH_WARMUP_INTERVAL`], so a
/// replica that is ready within milliseconds shows healthy within
/// milliseconds. Failures of these extra probes do not count.
const HEALTH_FIRST_PROBE: Duration = Duration::from_millis(5);

/// How many replicas start at once. Starting is mostly CPU (runc, `ip`,
/// `iptables-restore`, the kernel setting up namespaces), so more at once
/// is not faster; and each concurrent start holds a blocking thread whose
/// malloc arena stays in the agent's RSS.
const START_CONCURRENCY: usize = 4;
static START_SLOTS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(START_CONCURRENCY);

/// See [`Supervisor::persist`].
fn persist_record(
    store: &AllocStore,
    spec: &ReplicaSpec,
    restarts: u32,
    pid: u32,
    start_time: u64,
) {
    let record = AllocRecord {
        spec: spec.clone(),
        pid,
        start_time,
        restarts,
    };
    if let Err(e) = store.save(&record) {
        tracing::warn!(alloc = %spec.alloc_id, error = %e, "failed to persist allocation record");
    }
}

/// Sleeps until `at`, or forever if there is no such instant.
async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// A failed attempt to start the replica.
struct StartFailure {
    error: crate::runtime::RuntimeError,
    /// Whether preparing (pulling the image) had succeeded, so that the
    /// runtime tried to run it.
    prepared: bool,
}

/// How watching a running replica ended.
enum Ended {
    Exited(Exit),
    Unhealthy(String),
    Stopped,
    Detached,
}

/// Whether the supervisor carries on after waiting.
enum Flow {
    Continue,
    /// Stopped on request; the record is gone and "stopped" reported.
    Stopped,
    /// The agent went away; leave everything as it is.
    Detached,
}

impl<R: Runtime> Supervisor<R> {
    pub fn new(
        runtime: Arc<R>,
        store: Arc<AllocStore>,
        config: SupervisorConfig,
        spec: ReplicaSpec,
        restarts: u32,
        updates: mpsc::UnboundedSender<StatusUpdate>,
    ) -> Self {
        Self {
            runtime,
            store,
            config,
            spec,
            restarts,
            updates,
            port: 0,
            health_checked: false,
        }
    }

    /// Supervises until stopped or detached. `adopted` is a replica a
    /// previous agent started; it is watched instead of starting a new one.
    pub async fn run(mut self, adopted: Option<R::Handle>, mut stop: oneshot::Receiver<()>) {
        let mut backoff = Backoff::new(self.config.restart_base, self.config.restart_max);
        let mut next = adopted;
        loop {
            let adopting = next.is_some();
            let mut handle = match next.take() {
                Some(handle) => {
                    self.persist(handle.pid(), handle.start_time());
                    handle
                }
                None => match self.start(&mut stop).await {
                    Ok(handle) => handle,
                    Err(Some(StartFailure { error, prepared })) if prepared && self.spec.job => {
                        // A job's program that cannot start fails the
                        // attempt, as a shell does: status 127.
                        tracing::warn!(alloc = %self.spec.alloc_id, %error, "job replica failed to start");
                        self.end_job(Exit::Code(127), error.to_string()).await;
                        return;
                    }
                    Err(Some(StartFailure { error, prepared })) => {
                        let delay = backoff.next_delay();
                        tracing::warn!(alloc = %self.spec.alloc_id, %error, "replica failed to start");
                        // An image that cannot be pulled is no restart:
                        // nothing ran. RESTARTS counts runs that ended.
                        if prepared {
                            self.restarts = self.restarts.saturating_add(1);
                        }
                        self.persist(0, 0);
                        self.report(
                            AllocState::Failed,
                            0,
                            format!("{error}; retrying in {}", human(delay)),
                        );
                        match self.pause(delay, &mut stop).await {
                            Flow::Continue => continue,
                            Flow::Stopped | Flow::Detached => return,
                        }
                    }
                    Err(None) => return,
                },
            };
            let pid = handle.pid();
            self.port = handle.container_port().unwrap_or(0);
            self.health_checked = handle.health_check().is_some();
            let message = if adopting {
                "re-adopted after agent restart".to_string()
            } else {
                String::new()
            };
            self.report(AllocState::Running, pid, message);
            let started = Instant::now();

            let why = match self.watch(&mut handle, started, &mut stop).await {
                Ended::Exited(exit) if self.spec.job => {
                    tracing::info!(alloc = %self.spec.alloc_id, pid, %exit, "job replica ended");
                    self.end_job(exit, exit.to_string()).await;
                    return;
                }
                Ended::Exited(exit) => exit.to_string(),
                Ended::Unhealthy(reason) => {
                    self.report(AllocState::Unhealthy, pid, reason.clone());
                    let exit = handle.stop(self.config.stop_grace).await;
                    tracing::info!(alloc = %self.spec.alloc_id, pid, %exit, %reason, "unhealthy replica stopped");
                    format!("unhealthy: {reason}")
                }
                Ended::Stopped => {
                    if let Some(exit) = self.drain(&mut handle, pid).await {
                        self.finish(exit.to_string()).await;
                        return;
                    }
                    let exit = handle.stop(self.config.stop_grace).await;
                    tracing::info!(alloc = %self.spec.alloc_id, pid, %exit, "replica stopped");
                    self.finish(exit.to_string()).await;
                    return;
                }
                Ended::Detached => return,
            };
            if started.elapsed() >= self.config.stable_after {
                backoff.reset();
            }
            let delay = backoff.next_delay();
            self.restarts = self.restarts.saturating_add(1);
            tracing::info!(alloc = %self.spec.alloc_id, pid, %why, delay = ?delay, "replica ended; restarting");
            self.persist(0, 0);
            self.report(
                AllocState::Restarting,
                0,
                format!("{why}; restarting in {}", human(delay)),
            );
            match self.pause(delay, &mut stop).await {
                Flow::Continue => {}
                Flow::Stopped | Flow::Detached => return,
            }
        }
    }

    /// Prepares (pulls) and starts the replica. `Err(None)`: stopped or
    /// detached meanwhile (already handled).
    async fn start(
        &mut self,
        stop: &mut oneshot::Receiver<()>,
    ) -> Result<R::Handle, Option<StartFailure>> {
        if !self.spec.image.is_empty() {
            self.report(AllocState::Pulling, 0, self.spec.image.clone());
        }
        let runtime = self.runtime.clone();
        let spec = self.spec.clone();
        tokio::select! {
            prepared = runtime.prepare(&spec) => prepared.map_err(|error| {
                Some(StartFailure { error, prepared: false })
            })?,
            request = &mut *stop => {
                if request.is_ok() {
                    self.finish("stopped before it started".into()).await;
                }
                return Err(None);
            }
        }
        self.report(AllocState::Starting, 0, String::new());
        // Starting runs the runtime's commands (mount, network, `runc run`):
        // blocking work, kept off the async workers so that replicas start
        // side by side. The new PID is recorded in the same blocking task,
        // so nothing (not even the agent shutting down and dropping this
        // future) comes between the start and the record.
        let (runtime, store, spec) = (self.runtime.clone(), self.store.clone(), self.spec.clone());
        let restarts = self.restarts;
        let slot = START_SLOTS.acquire().await.expect("never closed");
        let started = tokio::task::spawn_blocking(move || {
            let dir = store.alloc_dir(&spec.alloc_id);
            let handle = runtime.start(&spec, &dir)?;
            persist_record(&store, &spec, restarts, handle.pid(), handle.start_time());
            Ok(handle)
        })
        .await;
        drop(slot);
        if START_SLOTS.available_permits() == START_CONCURRENCY {
            // A burst of starts is over: hand the memory it used back.
            crate::mem::release_free_memory();
        }
        let failed = |error| {
            Some(StartFailure {
                error,
                prepared: true,
            })
        };
        match started {
            Ok(result) => result.map_err(failed),
            Err(e) => Err(failed(crate::runtime::RuntimeError::Start {
                short_id: self.spec.short_id().into(),
                service: self.spec.service.clone(),
                program: self.spec.program().into(),
                reason: format!("start task failed: {e}"),
            })),
        }
    }

    /// Watches a running replica: its exit, a stop request, and its health
    /// check. Probes run between waits (`wait` is cancel-safe), bounded by
    /// the check's timeout.
    async fn watch(
        &mut self,
        handle: &mut R::Handle,
        started: Instant,
        stop: &mut oneshot::Receiver<()>,
    ) -> Ended {
        let check = handle.health_check();
        let mut tracker = check.as_ref().map(HealthTracker::new);
        let pid = handle.pid();
        let mut healthy = false;
        // Until the first success, probe often so "healthy" shows soon: a
        // failure counts once per warm-up cadence, the probes in between
        // (`ramp`) only look for the first success.
        let mut ramp = HEALTH_FIRST_PROBE;
        let mut last_counted = started;
        loop {
            let delay = match &check {
                Some(c) if !healthy => {
                    let cadence = c.interval.min(HEALTH_WARMUP_INTERVAL);
                    let due = (last_counted + cadence).saturating_duration_since(Instant::now());
                    let delay = ramp.min(due);
                    ramp = (ramp * 2).min(HEALTH_WARMUP_INTERVAL);
                    delay
                }
                Some(c) => c.interval,
                None => Duration::MAX,
            };
            let probe_at = Instant::now().checked_add(delay);
            tokio::select! {
                exit = handle.wait() => return Ended::Exited(exit),
                request = &mut *stop => {
                    return if request.is_ok() { Ended::Stopped } else { Ended::Detached };
                }
                () = sleep_until_opt(probe_at) => {}
            }
            let (Some(check), Some(tracker)) = (&check, &mut tracker) else {
                continue;
            };
            let result = match &check.probe {
                Probe::Http { path } => match handle.probe_addr() {
                    Some(addr) => health::probe_http(addr, path, check.timeout).await,
                    None => Err("the replica has no address to probe".into()),
                },
                Probe::Tcp => match handle.probe_addr() {
                    Some(addr) => health::probe_tcp(addr, check.timeout).await,
                    None => Err("the replica has no address to probe".into()),
                },
                Probe::Exec { command } => handle.exec_check(command, check.timeout).await,
            };
            if !healthy && result.is_err() {
                let cadence = check.interval.min(HEALTH_WARMUP_INTERVAL);
                if Instant::now() < last_counted + cadence {
                    continue;
                }
                last_counted = Instant::now();
            }
            match tracker.record(result, started.elapsed()) {
                Some(Transition::Healthy) => {
                    healthy = true;
                    tracing::info!(alloc = %self.spec.alloc_id, pid, after_ms = started.elapsed().as_millis() as u64, "replica healthy");
                    self.report(AllocState::Healthy, pid, String::new());
                }
                Some(Transition::Unhealthy(reason)) => {
                    return Ended::Unhealthy(format!(
                        "health check failed {} times: {reason}",
                        check.retries
                    ))
                }
                None => {}
            }
        }
    }

    /// Lets a replica's open connections (published, or by name) finish before it is
    /// stopped; `Some` if it exited on its own meanwhile. The drain lasts
    /// at most the configured period and ends early once the replica has
    /// no established connection on its port (read from its own network
    /// namespace), but never before [`MIN_DRAIN`]: the routing proxies
    /// learn that it left their pools through the control plane's endpoint
    /// stream, which takes a moment.
    async fn drain(&mut self, handle: &mut R::Handle, pid: u32) -> Option<Exit> {
        if !self.spec.reached_through_proxies() || self.config.drain.is_zero() {
            return None;
        }
        tracing::info!(alloc = %self.spec.alloc_id, pid, drain = ?self.config.drain, "draining replica before stopping it");
        let port = handle.probe_addr().map(|a| a.port());
        let started = tokio::time::Instant::now();
        let deadline = started + self.config.drain;
        let earliest = started + MIN_DRAIN.min(self.config.drain);
        loop {
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return None;
            }
            let wake = if now < earliest {
                earliest
            } else {
                (now + DRAIN_POLL).min(deadline)
            };
            tokio::select! {
                exit = handle.wait() => return Some(exit),
                () = tokio::time::sleep_until(wake) => {}
            }
            let idle = port.is_some_and(|port| established_connections(pid, port) == Some(0));
            if tokio::time::Instant::now() >= earliest && idle {
                tracing::info!(alloc = %self.spec.alloc_id, pid, after = ?started.elapsed(), "drained: no open connection left");
                return None;
            }
        }
    }

    /// Waits out a restart delay unless asked to stop or detached meanwhile.
    async fn pause(&mut self, delay: Duration, stop: &mut oneshot::Receiver<()>) -> Flow {
        tokio::select! {
            () = tokio::time::sleep(delay) => Flow::Continue,
            request = stop => {
                if request.is_ok() {
                    self.finish("stopped while waiting to restart".into()).await;
                    Flow::Stopped
                } else {
                    Flow::Detached
                }
            }
        }
    }

    /// Destroys what the stopped replica left (runtime state, network,
    /// mounts: slow, blocking work run off the async threads, which also
    /// carry the routing proxy), forgets its record and reports it stopped.
    async fn finish(&mut self, message: String) {
        self.finish_with(message, AllocState::Stopped, None).await;
    }

    /// [`Self::finish`], reporting `state` with `exit_code`.
    async fn finish_with(&mut self, message: String, state: AllocState, exit_code: Option<i32>) {
        let dir = self.store.alloc_dir(&self.spec.alloc_id);
        let (runtime, spec) = (self.runtime.clone(), self.spec.clone());
        // A few at a time: teardowns (runc, network, unmount) compete for
        // the same CPU as the next replicas' starts; with the CNI plugins,
        // whose iptables calls waited on the xtables lock in 1 s steps,
        // twenty side by side stalled the next starts by seconds.
        let _turn = TEARDOWNS.acquire().await;
        let destroyed = tokio::task::spawn_blocking(move || runtime.destroy(&spec, &dir)).await;
        if let Err(e) = destroyed {
            tracing::warn!(alloc = %self.spec.alloc_id, error = %e, "destroying the replica failed");
        }
        if let Err(e) = self.store.delete(&self.spec.alloc_id) {
            tracing::warn!(alloc = %self.spec.alloc_id, error = %e, "failed to delete allocation record");
        }
        self.report_exit(state, message, exit_code);
    }

    /// Ends a job's replica for good: destroys what it left (its logs stay)
    /// and reports `completed` (status 0) or `exited`, with the status.
    /// A death by signal counts as status 128+N, as in a shell; an adopted
    /// process's unknown status as 1 (a failure: it may be retried).
    async fn end_job(&mut self, exit: Exit, message: String) {
        let code = match exit {
            Exit::Code(code) => code,
            Exit::Signal(sig) => 128 + sig,
            Exit::Unknown => 1,
        };
        self.finish_with(
            message,
            if code == 0 {
                AllocState::Completed
            } else {
                AllocState::Exited
            },
            Some(code),
        )
        .await;
    }

    /// Records the current process before anything else can happen to it, so
    /// a crash of the agent right after a start leaves the PID on disk. A
    /// failed write is logged, not fatal: the replica runs either way.
    fn persist(&self, pid: u32, start_time: u64) {
        persist_record(&self.store, &self.spec, self.restarts, pid, start_time);
    }

    fn report(&self, state: AllocState, pid: u32, message: String) {
        self.send(state, pid, message, None);
    }

    fn report_exit(&self, state: AllocState, message: String, exit_code: Option<i32>) {
        self.send(state, 0, message, exit_code);
    }

    fn send(&self, state: AllocState, pid: u32, message: String, exit_code: Option<i32>) {
        // The receiver lives as long as the agent; after that nobody listens.
        let _ = self.updates.send(StatusUpdate {
            alloc_id: self.spec.alloc_id.clone(),
            state,
            restarts: self.restarts,
            pid,
            message,
            port: self.port,
            health_checked: self.health_checked,
            exit_code,
            refused: false,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::{Exit, RuntimeError};
    use crate::spec::test_spec;
    use std::collections::VecDeque;
    use std::path::Path;
    use std::sync::Mutex;

    /// What the fake's next start does.
    #[derive(Debug, Clone, Copy)]
    enum Outcome {
        Fail,
        /// Runs for this long, then exits with status 1.
        ExitAfter(Duration),
    }

    /// A runtime following a script of outcomes; once the script is used up,
    /// replicas run until stopped.
    #[derive(Default)]
    struct FakeRuntime {
        /// Pulls that fail before one succeeds.
        failing_pulls: Mutex<u32>,
        script: Mutex<VecDeque<Outcome>>,
        starts: Mutex<Vec<Instant>>,
        stops: Mutex<Vec<u32>>,
    }

    struct FakeHandle {
        pid: u32,
        lifetime: Option<Duration>,
        runtime: Arc<FakeRuntime>,
    }

    impl Runtime for Arc<FakeRuntime> {
        type Handle = FakeHandle;

        async fn prepare(&self, spec: &ReplicaSpec) -> Result<(), RuntimeError> {
            let mut failing = self.failing_pulls.lock().unwrap();
            if *failing == 0 {
                return Ok(());
            }
            *failing -= 1;
            Err(RuntimeError::Pull {
                short_id: spec.short_id().into(),
                service: spec.service.clone(),
                reason:
                    "skiff-test/web:v9 not found in 127.0.0.1:5000: check the repository and tag"
                        .into(),
            })
        }

        fn start(&self, spec: &ReplicaSpec, _dir: &Path) -> Result<FakeHandle, RuntimeError> {
            let mut starts = self.starts.lock().unwrap();
            starts.push(Instant::now());
            let pid = 1000 + starts.len() as u32;
            match self.script.lock().unwrap().pop_front() {
                Some(Outcome::Fail) => Err(RuntimeError::Start {
                    short_id: spec.short_id().into(),
                    service: spec.service.clone(),
                    program: spec.program().into(),
                    reason: "No such file or directory".into(),
                }),
                Some(Outcome::ExitAfter(d)) => Ok(FakeHandle {
                    pid,
                    lifetime: Some(d),
                    runtime: self.clone(),
                }),
                None => Ok(FakeHandle {
                    pid,
                    lifetime: None,
                    runtime: self.clone(),
                }),
            }
        }

        fn recover(&self, _spec: &ReplicaSpec, pid: u32, _start: u64) -> Option<FakeHandle> {
            Some(FakeHandle {
                pid,
                lifetime: None,
                runtime: self.clone(),
            })
        }
    }

    impl TaskHandle for FakeHandle {
        fn pid(&self) -> u32 {
            self.pid
        }
        fn start_time(&self) -> u64 {
            7
        }
        async fn wait(&mut self) -> Exit {
            match self.lifetime {
                Some(d) => {
                    tokio::time::sleep(d).await;
                    Exit::Code(1)
                }
                None => std::future::pending().await,
            }
        }
        async fn stop(&mut self, _grace: Duration) -> Exit {
            self.runtime.stops.lock().unwrap().push(self.pid);
            Exit::Signal(15)
        }
    }

    struct Harness {
        runtime: Arc<FakeRuntime>,
        store: Arc<AllocStore>,
        updates: mpsc::UnboundedReceiver<StatusUpdate>,
        stop: Option<StopSender>,
        task: tokio::task::JoinHandle<()>,
        began: Instant,
        _dir: tempfile::TempDir,
    }

    fn spawn(script: &[Outcome], adopt: Option<u32>) -> Harness {
        spawn_spec(script, adopt, false)
    }

    fn spawn_spec(script: &[Outcome], adopt: Option<u32>, job: bool) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(AllocStore::open(dir.path()).unwrap());
        let runtime = Arc::new(FakeRuntime::default());
        runtime
            .script
            .lock()
            .unwrap()
            .extend(script.iter().copied());
        let (tx, updates) = mpsc::unbounded_channel();
        let (stop, stop_rx) = oneshot::channel();
        let mut spec = test_spec("3f2a9c0d-aa", &["python4"], 20001);
        spec.job = job;
        let adopted = adopt.and_then(|pid| runtime.recover(&spec, pid, 7));
        let supervisor = Supervisor::new(
            Arc::new(runtime.clone()),
            store.clone(),
            SupervisorConfig::default(),
            spec,
            0,
            tx,
        );
        let task = tokio::spawn(supervisor.run(adopted, stop_rx));
        Harness {
            runtime,
            store,
            updates,
            stop: Some(stop),
            task,
            began: Instant::now(),
            _dir: dir,
        }
    }

    impl Harness {
        /// Collects updates until one is in `state` (bounded by paused time).
        async fn until(&mut self, state: AllocState) -> Vec<StatusUpdate> {
            let mut seen = Vec::new();
            loop {
                let update = tokio::time::timeout(Duration::from_secs(600), self.updates.recv())
                    .await
                    .expect("supervisor went quiet")
                    .expect("supervisor ended");
                let done = update.state == state;
                seen.push(update);
                if done {
                    return seen;
                }
            }
        }

        fn start_offsets(&self) -> Vec<u64> {
            let starts = self.runtime.starts.lock().unwrap();
            starts.iter().map(|t| (*t - self.began).as_secs()).collect()
        }
    }

    fn messages(updates: &[StatusUpdate], state: AllocState) -> Vec<String> {
        updates
            .iter()
            .filter(|u| u.state == state)
            .map(|u| u.message.clone())
            .collect()
    }

    const QUICK: Outcome = Outcome::ExitAfter(Duration::ZERO);

    #[tokio::test(start_paused = true)]
    async fn a_job_replica_that_exits_is_reported_exited_with_its_status_and_not_restarted() {
        let mut h = spawn_spec(&[QUICK], None, true);
        let all = h.until(AllocState::Exited).await;
        let last = all.last().unwrap();
        assert_eq!(last.exit_code, Some(1));
        assert_eq!(last.message, "exited with status 1");
        (&mut h.task).await.unwrap();
        assert_eq!(h.start_offsets(), [0], "started once");
        assert!(h.store.load_all().unwrap().is_empty(), "record forgotten");
    }

    #[tokio::test(start_paused = true)]
    async fn a_job_replica_that_cannot_start_ends_with_status_127() {
        let mut h = spawn_spec(&[Outcome::Fail], None, true);
        let all = h.until(AllocState::Exited).await;
        assert_eq!(all.last().unwrap().exit_code, Some(127));
        (&mut h.task).await.unwrap();
        assert_eq!(h.start_offsets(), [0]);
    }

    #[tokio::test(start_paused = true)]
    async fn crashing_replica_restarts_with_doubling_backoff() {
        let mut h = spawn(&[QUICK, QUICK, QUICK, QUICK], None);
        let mut all = Vec::new();
        for _ in 0..5 {
            all.extend(h.until(AllocState::Running).await);
        }
        assert_eq!(
            messages(&all, AllocState::Restarting),
            [
                "exited with status 1; restarting in 1s",
                "exited with status 1; restarting in 2s",
                "exited with status 1; restarting in 4s",
                "exited with status 1; restarting in 8s",
            ]
        );
        assert_eq!(h.start_offsets(), [0, 1, 3, 7, 15]);
        let last = all.last().unwrap();
        assert_eq!((last.restarts, last.pid), (4, 1005));
        assert_eq!(h.store.load_all().unwrap()[0].pid, 1005, "pid persisted");
        assert!(all
            .iter()
            .filter(|u| u.state != AllocState::Running)
            .all(|u| u.pid == 0));
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_resets_after_the_replica_ran_ten_seconds() {
        let long = Outcome::ExitAfter(Duration::from_secs(12));
        let mut h = spawn(&[QUICK, QUICK, long, QUICK], None);
        let mut all = Vec::new();
        for _ in 0..5 {
            all.extend(h.until(AllocState::Running).await);
        }
        let delays: Vec<String> = messages(&all, AllocState::Restarting)
            .iter()
            .map(|m| m.rsplit(' ').next().unwrap().to_string())
            .collect();
        assert_eq!(delays, ["1s", "2s", "1s", "2s"]);
    }

    #[tokio::test(start_paused = true)]
    async fn start_failures_are_reported_failed_and_retried() {
        let mut h = spawn(&[Outcome::Fail, Outcome::Fail], None);
        let all = h.until(AllocState::Running).await;
        assert_eq!(
            messages(&all, AllocState::Failed),
            [
                "failed to start replica 3f2a9c0d of web: python4: No such file or directory; retrying in 1s",
                "failed to start replica 3f2a9c0d of web: python4: No such file or directory; retrying in 2s",
            ]
        );
        assert_eq!(all.last().unwrap().restarts, 2);
        assert_eq!(h.start_offsets(), [0, 1, 3]);
    }

    #[tokio::test(start_paused = true)]
    async fn an_image_that_cannot_be_pulled_is_reported_failed_and_counts_no_restart() {
        let mut h = spawn(&[], None);
        *h.runtime.failing_pulls.lock().unwrap() = 3;
        let all = h.until(AllocState::Running).await;
        let failed: Vec<&StatusUpdate> = all
            .iter()
            .filter(|u| u.state == AllocState::Failed)
            .collect();
        assert_eq!(failed.len(), 3);
        assert_eq!(
            failed[0].message,
            "failed to pull image of replica 3f2a9c0d of web: skiff-test/web:v9 not found in 127.0.0.1:5000: check the repository and tag; retrying in 1s"
        );
        assert!(all.iter().all(|u| u.restarts == 0), "{all:?}");
        assert_eq!(h.start_offsets(), [7], "started once, after 1+2+4 s");
    }

    #[tokio::test(start_paused = true)]
    async fn stop_stops_the_replica_reports_stopped_and_forgets_the_record() {
        let mut h = spawn(&[], None);
        h.until(AllocState::Running).await;
        assert_eq!(h.store.load_all().unwrap().len(), 1);
        h.stop.take().unwrap().send(()).unwrap();
        let last = h.until(AllocState::Stopped).await.pop().unwrap();
        assert_eq!((last.pid, last.message.as_str()), (0, "killed by SIGTERM"));
        assert_eq!(*h.runtime.stops.lock().unwrap(), [1001]);
        assert!(h.store.load_all().unwrap().is_empty());
        (&mut h.task).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_published_replica_is_drained_before_it_is_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(AllocStore::open(dir.path()).unwrap());
        let runtime = Arc::new(FakeRuntime::default());
        let (tx, mut updates) = mpsc::unbounded_channel();
        let (stop, stop_rx) = oneshot::channel();
        let mut spec = test_spec("3f2a9c0d-dd", &["web"], 20001);
        spec.publish = 8080;
        let config = SupervisorConfig {
            drain: Duration::from_secs(3),
            ..SupervisorConfig::default()
        };
        let supervisor = Supervisor::new(Arc::new(runtime.clone()), store, config, spec, 0, tx);
        let task = tokio::spawn(supervisor.run(None, stop_rx));
        while updates.recv().await.unwrap().state != AllocState::Running {}
        let asked = Instant::now();
        stop.send(()).unwrap();
        tokio::time::sleep(Duration::from_millis(2900)).await;
        assert!(runtime.stops.lock().unwrap().is_empty(), "still draining");
        while updates.recv().await.unwrap().state != AllocState::Stopped {}
        assert!(asked.elapsed() >= Duration::from_secs(3));
        assert_eq!(*runtime.stops.lock().unwrap(), [1001]);
        task.await.unwrap();
    }

    #[test]
    fn established_connections_are_counted_by_local_port() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0000000000000000 100 0 0 10 0
   1: 0A590002:0050 0A590001:D2F0 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0000000000000000 20 4 30 10 -1
   2: 0A590002:0050 0A590001:D2F2 06 00000000:00000000 00:00000000 00000000     0        0 0 3 0000000000000000
   3: 0A590002:1F90 0A590001:D2F4 01 00000000:00000000 00:00000000 00000000     0        0 3 1 0000000000000000 20 4 30 10 -1
";
        assert_eq!(
            count_established(table, 80),
            1,
            "listener and TIME_WAIT do not count"
        );
        assert_eq!(count_established(table, 8080), 1);
        assert_eq!(count_established(table, 81), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn stop_during_restart_delay_starts_nothing_more() {
        let mut h = spawn(&[QUICK], None);
        h.until(AllocState::Restarting).await;
        h.stop.take().unwrap().send(()).unwrap();
        h.until(AllocState::Stopped).await;
        (&mut h.task).await.unwrap();
        assert_eq!(h.start_offsets(), [0]);
    }

    #[tokio::test(start_paused = true)]
    async fn adopted_replica_is_reported_running_with_its_pid_without_a_start() {
        let mut h = spawn(&[], Some(4242));
        let first = h.until(AllocState::Running).await;
        assert_eq!(first.len(), 1, "no starting state for an adopted replica");
        assert_eq!(first[0].pid, 4242);
        assert!(h.start_offsets().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn dropping_the_stop_sender_detaches_without_stopping() {
        let mut h = spawn(&[], None);
        h.until(AllocState::Running).await;
        drop(h.stop.take());
        (&mut h.task).await.unwrap();
        assert!(h.runtime.stops.lock().unwrap().is_empty());
        assert_eq!(
            h.store.load_all().unwrap().len(),
            1,
            "record kept for re-adoption"
        );
    }
}
