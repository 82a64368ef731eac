//! A bounded HTTP/1.1 load generator for end-to-end tests of rolling updates, rollbacks and
//! autoscaling: std threads sending `GET`s at one address, every request's outcome recorded
//! with the time it was sent, and a [`LoadReport`] to assert on afterwards.
//!
//! ```no_run
//! # use std::time::Duration;
//! # use skiff_e2e::load::{Load, LoadConfig};
//! # let addr = "127.0.0.1:8080".parse().unwrap();
//! let load = Load::start(LoadConfig {
//!     workers: 8,
//!     max_duration: Duration::from_secs(60),
//!     ..LoadConfig::new(addr)
//! });
//! // ... `skiff service update web --image .../web:v2`, wait for the deployment ...
//! let promoted = load.mark("promoted");
//! std::thread::sleep(Duration::from_secs(3));
//! let report = load.stop();
//! report.assert_no_failures("during the rolling update");
//! let late = report.after(promoted + Duration::from_secs(2));
//! assert_eq!(late.count_containing("v2"), late.total(), "{report}");
//! ```
//!
//! Bounds: connecting, every write and every read, and each request as a whole are limited
//! by [`LoadConfig::request_timeout`]; no request starts after [`LoadConfig::max_duration`]
//! (nor after [`LoadConfig::max_requests`]), so [`Load::stop`] returns at the latest one
//! request timeout after that, and dropping a [`Load`] stops it the same way.
//!
//! Responses are framed by `Transfer-Encoding: chunked`, `Content-Length`, or the end of the
//! connection (busybox httpd's CGI answers have neither); a connection is reused only if the
//! worker keeps connections alive and the response allows it (HTTP/1.1 without
//! `Connection: close`, or HTTP/1.0 with `Connection: keep-alive`, and not framed by EOF).

use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// How many bytes of each response body a [`Sample`] keeps.
pub const BODY_SNIPPET: usize = 256;

/// Longest status, header or chunk-size line accepted.
const MAX_LINE: usize = 16 * 1024;
/// Most header lines accepted in one response head.
const MAX_HEADERS: usize = 100;

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

/// How workers use connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionMode {
    /// Every worker keeps its connection open across requests while the server allows it.
    KeepAlive,
    /// Every request opens a fresh connection and sends `Connection: close`.
    NewPerRequest,
    /// Even-numbered workers keep connections alive, odd-numbered ones open one per request
    /// (so any number of active workers, see [`Load::set_workers`], stays mixed).
    Mixed,
}

/// What [`Load::start`] runs. Build it with struct update syntax over [`LoadConfig::new`].
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// Where requests go.
    pub addr: SocketAddr,
    /// The request target, e.g. `/`.
    pub path: String,
    /// The `Host` header; `addr` when `None`.
    pub host: Option<String>,
    /// Worker threads: the most requests in flight at once.
    pub workers: usize,
    /// How many workers send requests at start (`None`: all); see [`Load::set_workers`].
    pub active_workers: Option<usize>,
    pub mode: ConnectionMode,
    /// How long each worker waits after a request before its next one.
    pub pause_between: Duration,
    /// No request starts later than this after [`Load::start`].
    pub max_duration: Duration,
    /// Limit on connecting, on each read and write, and on a request as a whole; a request
    /// that hits it is recorded as [`FailureKind::Timeout`].
    pub request_timeout: Duration,
    /// No more requests than this in the whole run (bounds memory when `pause_between` is
    /// zero); [`LoadReport::truncated`] says whether it was reached.
    pub max_requests: usize,
    /// When a request on a kept-alive connection that already served earlier requests fails
    /// before any response byte (the server closed or reset the idle connection), open a new
    /// connection and send it once more, as HTTP clients do for idempotent requests. The
    /// [`Sample`] then records the outcome of the retry and the first failure in
    /// [`Sample::retried`]. Off by default: every failure counts.
    pub retry_stale_keep_alive: bool,
}

impl LoadConfig {
    /// `GET /` from 4 workers in [`ConnectionMode::Mixed`], 20 ms apart, for at most 60 s, with
    /// a 5 s request timeout and at most 200 000 requests; no retries.
    pub fn new(addr: SocketAddr) -> LoadConfig {
        LoadConfig {
            addr,
            path: "/".to_string(),
            host: None,
            workers: 4,
            active_workers: None,
            mode: ConnectionMode::Mixed,
            pause_between: Duration::from_millis(20),
            max_duration: Duration::from_secs(60),
            request_timeout: Duration::from_secs(5),
            max_requests: 200_000,
            retry_stale_keep_alive: false,
        }
    }

    fn keeps_alive(&self, worker: usize) -> bool {
        match self.mode {
            ConnectionMode::KeepAlive => true,
            ConnectionMode::NewPerRequest => false,
            ConnectionMode::Mixed => worker.is_multiple_of(2),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Samples
// ---------------------------------------------------------------------------------------------

/// Why a request got no HTTP response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FailureKind {
    /// Connecting was refused (nothing listens).
    Refused,
    /// The connection was reset or aborted (also a broken pipe while writing).
    Reset,
    /// The server closed the connection before the response was complete.
    Closed,
    /// Connecting, a read or write, or the request as a whole took longer than
    /// [`LoadConfig::request_timeout`].
    Timeout,
    /// Bytes arrived that are not a well-formed HTTP/1.x response.
    BadResponse,
    /// Any other I/O error.
    Other,
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FailureKind::Refused => "refused",
            FailureKind::Reset => "reset",
            FailureKind::Closed => "closed",
            FailureKind::Timeout => "timeout",
            FailureKind::BadResponse => "bad response",
            FailureKind::Other => "other",
        })
    }
}

/// What one request got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A complete HTTP response, whatever its status.
    Response {
        status: u16,
        /// The first [`BODY_SNIPPET`] bytes of the body (lossy UTF-8).
        body: String,
        /// The whole body's length in bytes.
        body_len: usize,
    },
    /// No complete response.
    Error { kind: FailureKind, detail: String },
}

/// One request and its outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    /// When the request was sent (its connection opened, if new), since [`Load::start`].
    pub at: Duration,
    /// From `at` until the response was complete or the request failed.
    pub latency: Duration,
    /// Index of the worker that sent it (`0..workers`).
    pub worker: usize,
    /// Sent on a kept-alive connection that had served earlier requests.
    pub reused: bool,
    /// The failure of the first attempt when [`LoadConfig::retry_stale_keep_alive`] resent
    /// the request; the outcome is the retry's.
    pub retried: Option<String>,
    pub outcome: Outcome,
}

impl Sample {
    /// The response status, if there was a response.
    pub fn status(&self) -> Option<u16> {
        match self.outcome {
            Outcome::Response { status, .. } => Some(status),
            Outcome::Error { .. } => None,
        }
    }

    /// The body snippet, if there was a response (of any status).
    pub fn body(&self) -> Option<&str> {
        match &self.outcome {
            Outcome::Response { body, .. } => Some(body),
            Outcome::Error { .. } => None,
        }
    }

    /// The failure kind, if there was no response.
    pub fn error_kind(&self) -> Option<FailureKind> {
        match self.outcome {
            Outcome::Error { kind, .. } => Some(kind),
            Outcome::Response { .. } => None,
        }
    }

    /// A failure is an error or a response whose status is not 2xx.
    pub fn is_failure(&self) -> bool {
        !matches!(self.status(), Some(200..=299))
    }

    /// The timeline's name for this outcome: the trimmed body for 2xx, `HTTP <status>: <body>`
    /// for other statuses, `error: <kind>` for errors.
    pub fn label(&self) -> String {
        match &self.outcome {
            Outcome::Response { status, body, .. } if (200..=299).contains(status) => {
                body.trim().to_string()
            }
            Outcome::Response { status, body, .. } => format!("HTTP {status}: {}", body.trim()),
            Outcome::Error { kind, .. } => format!("error: {kind}"),
        }
    }
}

impl fmt::Display for Sample {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:>9.3}s worker {:>2}{} ({} ms): ",
            self.at.as_secs_f64(),
            self.worker,
            if self.reused { " reused" } else { "" },
            self.latency.as_millis()
        )?;
        match &self.outcome {
            Outcome::Response { status, body, .. } => write!(f, "HTTP {status} {:?}", body.trim())?,
            Outcome::Error { kind, detail } => write!(f, "{kind}: {detail}")?,
        }
        if let Some(first) = &self.retried {
            write!(f, " (retried after: {first})")?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------------

/// Every request of a run (or of a time window of it, see [`LoadReport::after`]), sorted by
/// [`Sample::at`]. `Display` prints a summary, the first failures and a 1 s timeline.
#[derive(Debug, Clone)]
pub struct LoadReport {
    target: String,
    started: Instant,
    elapsed: Duration,
    samples: Vec<Sample>,
    marks: Vec<(Duration, String)>,
    truncated: bool,
}

/// One bucket of [`LoadReport::timeline`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimelineBucket {
    /// Start of the bucket, since [`Load::start`].
    pub from: Duration,
    pub total: usize,
    pub failures: usize,
    /// Requests by [`Sample::label`].
    pub outcomes: BTreeMap<String, usize>,
}

impl fmt::Display for TimelineBucket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:>8.1}s {:>6} requests {:>5} failures ",
            self.from.as_secs_f64(),
            self.total,
            self.failures
        )?;
        let outcomes: Vec<String> = self
            .outcomes
            .iter()
            .map(|(label, n)| format!("{label:?}: {n}"))
            .collect();
        write!(f, "[{}]", outcomes.join(", "))
    }
}

impl LoadReport {
    /// All samples, sorted by [`Sample::at`].
    pub fn samples(&self) -> &[Sample] {
        &self.samples
    }

    /// Number of requests.
    pub fn total(&self) -> usize {
        self.samples.len()
    }

    /// Requests answered with a 2xx status.
    pub fn successes(&self) -> usize {
        self.samples.iter().filter(|s| !s.is_failure()).count()
    }

    /// Errors and non-2xx responses, in time order.
    pub fn failures(&self) -> Vec<&Sample> {
        self.samples.iter().filter(|s| s.is_failure()).collect()
    }

    /// Only the requests that got no response at all (non-2xx responses excluded).
    pub fn errors(&self) -> Vec<&Sample> {
        self.samples
            .iter()
            .filter(|s| s.error_kind().is_some())
            .collect()
    }

    /// Responses (of any status) whose body snippet contains `needle`.
    pub fn count_containing(&self, needle: &str) -> usize {
        self.samples
            .iter()
            .filter(|s| s.body().is_some_and(|b| b.contains(needle)))
            .count()
    }

    /// Responses by status.
    pub fn statuses(&self) -> BTreeMap<u16, usize> {
        let mut out = BTreeMap::new();
        for status in self.samples.iter().filter_map(Sample::status) {
            *out.entry(status).or_default() += 1;
        }
        out
    }

    /// Responses (of any status) by trimmed body snippet.
    pub fn bodies(&self) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for body in self.samples.iter().filter_map(Sample::body) {
            *out.entry(body.trim().to_string()).or_default() += 1;
        }
        out
    }

    /// The requests sent at or after `t` (since [`Load::start`]).
    pub fn after(&self, t: Duration) -> LoadReport {
        self.window(t, Duration::MAX)
    }

    /// The requests sent before `t`.
    pub fn before(&self, t: Duration) -> LoadReport {
        self.window(Duration::ZERO, t)
    }

    /// The requests sent in `[from, to)`.
    pub fn window(&self, from: Duration, to: Duration) -> LoadReport {
        LoadReport {
            samples: self
                .samples
                .iter()
                .filter(|s| from <= s.at && s.at < to)
                .cloned()
                .collect(),
            ..self.without_samples()
        }
    }

    /// The requests sent at or after `instant`, e.g. one taken right after `service promote`.
    pub fn since(&self, instant: Instant) -> LoadReport {
        self.after(self.offset_of(instant))
    }

    /// `instant` as an offset since the start of the run (zero if earlier).
    pub fn offset_of(&self, instant: Instant) -> Duration {
        instant.saturating_duration_since(self.started)
    }

    /// Moments recorded with [`Load::mark`], in order.
    pub fn marks(&self) -> &[(Duration, String)] {
        &self.marks
    }

    /// The offset of the first mark called `label`.
    pub fn mark(&self, label: &str) -> Option<Duration> {
        self.marks.iter().find(|(_, l)| l == label).map(|(t, _)| *t)
    }

    /// How long the run lasted (until [`Load::stop`] or the snapshot).
    pub fn elapsed(&self) -> Duration {
        self.elapsed
    }

    /// Whether [`LoadConfig::max_requests`] ended the run.
    pub fn truncated(&self) -> bool {
        self.truncated
    }

    /// Requests per `bucket` of send time, from the start of the run to the last request
    /// (empty buckets included, so gaps show).
    pub fn timeline(&self, bucket: Duration) -> Vec<TimelineBucket> {
        let bucket = bucket.max(Duration::from_millis(1));
        let index = |at: Duration| (at.as_nanos() / bucket.as_nanos()) as usize;
        let Some(last) = self.samples.iter().map(|s| s.at).max() else {
            return Vec::new();
        };
        let mut out: Vec<TimelineBucket> = (0..=index(last))
            .map(|i| TimelineBucket {
                from: bucket * i as u32,
                total: 0,
                failures: 0,
                outcomes: BTreeMap::new(),
            })
            .collect();
        for sample in &self.samples {
            let b = &mut out[index(sample.at)];
            b.total += 1;
            b.failures += usize::from(sample.is_failure());
            *b.outcomes.entry(sample.label()).or_default() += 1;
        }
        out
    }

    /// Panics, printing this report, if any request failed.
    #[track_caller]
    pub fn assert_no_failures(&self, what: &str) {
        let failures = self.failures().len();
        assert!(
            failures == 0,
            "{what}: {failures} of {} requests failed\n{self}",
            self.total()
        );
    }

    fn without_samples(&self) -> LoadReport {
        LoadReport {
            target: self.target.clone(),
            started: self.started,
            elapsed: self.elapsed,
            samples: Vec::new(),
            marks: self.marks.clone(),
            truncated: self.truncated,
        }
    }
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const SHOWN: usize = 20;
        let failures = self.failures();
        writeln!(
            f,
            "load on {}: {} requests in {:.1}s, {} failures{}",
            self.target,
            self.total(),
            self.elapsed.as_secs_f64(),
            failures.len(),
            if self.truncated {
                " (stopped at max_requests)"
            } else {
                ""
            }
        )?;
        writeln!(f, "statuses: {:?}", self.statuses())?;
        writeln!(f, "bodies: {:?}", self.bodies())?;
        if !failures.is_empty() {
            writeln!(
                f,
                "failures (first {} of {}):",
                failures.len().min(SHOWN),
                failures.len()
            )?;
            for sample in failures.iter().take(SHOWN) {
                writeln!(f, "  {sample}")?;
            }
        }
        for (at, label) in &self.marks {
            writeln!(f, "mark {:>9.3}s {label}", at.as_secs_f64())?;
        }
        writeln!(f, "timeline:")?;
        for bucket in self.timeline(Duration::from_secs(1)) {
            writeln!(f, "  {bucket}")?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Load
// ---------------------------------------------------------------------------------------------

/// A running load: worker threads sending requests until [`Load::stop`], the end of
/// [`LoadConfig::max_duration`] or [`LoadConfig::max_requests`].
pub struct Load {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    started: Instant,
    workers: usize,
}

struct Shared {
    control: Mutex<Control>,
    wake: Condvar,
    samples: Mutex<Vec<Sample>>,
    marks: Mutex<Vec<(Duration, String)>>,
    issued: AtomicUsize,
    truncated: AtomicBool,
    running: AtomicUsize,
    target: String,
}

struct Control {
    stop: bool,
    active: usize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Load {
    /// Starts `config.workers` threads (at least one) sending requests right away.
    pub fn start(config: LoadConfig) -> Load {
        let workers = config.workers.max(1);
        let active = config.active_workers.unwrap_or(workers).min(workers);
        let started = Instant::now();
        let deadline = started
            .checked_add(config.max_duration)
            .unwrap_or(started + Duration::from_secs(365 * 24 * 3600));
        let shared = Arc::new(Shared {
            control: Mutex::new(Control {
                stop: false,
                active,
            }),
            wake: Condvar::new(),
            samples: Mutex::new(Vec::new()),
            marks: Mutex::new(Vec::new()),
            issued: AtomicUsize::new(0),
            truncated: AtomicBool::new(false),
            running: AtomicUsize::new(workers),
            target: format!("{}{}", config.addr, config.path),
        });
        let config = Arc::new(config);
        let threads = (0..workers)
            .map(|id| {
                let worker = Worker {
                    id,
                    keep_alive: config.keeps_alive(id),
                    config: Arc::clone(&config),
                    shared: Arc::clone(&shared),
                    started,
                    deadline,
                };
                thread::Builder::new()
                    .name(format!("load-{id}"))
                    .spawn(move || worker.run())
                    .expect("spawn a load worker")
            })
            .collect();
        Load {
            shared,
            threads,
            started,
            workers,
        }
    }

    /// Sets how many workers send requests (clamped to `0..=workers`): workers `0..n` run,
    /// the others finish their current request, close their connection and idle.
    pub fn set_workers(&self, n: usize) {
        lock(&self.shared.control).active = n.min(self.workers);
        self.shared.wake.notify_all();
    }

    /// How many workers are set to send requests.
    pub fn active_workers(&self) -> usize {
        lock(&self.shared.control).active
    }

    /// When the run started.
    pub fn started_at(&self) -> Instant {
        self.started
    }

    /// Time since the run started, comparable with [`Sample::at`].
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Records a labelled moment (listed in the report) and returns its offset, e.g. for
    /// `report.after(load.mark("promoted") + 2s)`.
    pub fn mark(&self, label: &str) -> Duration {
        let at = self.elapsed();
        lock(&self.shared.marks).push((at, label.to_string()));
        at
    }

    /// Whether every worker has ended (max duration or max requests reached).
    pub fn is_finished(&self) -> bool {
        self.shared.running.load(Ordering::SeqCst) == 0
    }

    /// The requests completed so far, while the load goes on.
    pub fn snapshot(&self) -> LoadReport {
        let samples = lock(&self.shared.samples).clone();
        self.report(samples)
    }

    /// Stops sending, waits for the requests in flight (each bounded by the request timeout)
    /// and returns the report.
    pub fn stop(mut self) -> LoadReport {
        if let Some(panic) = self.join() {
            std::panic::resume_unwind(panic);
        }
        let samples = std::mem::take(&mut *lock(&self.shared.samples));
        self.report(samples)
    }

    fn report(&self, mut samples: Vec<Sample>) -> LoadReport {
        samples.sort_by_key(|s| s.at);
        LoadReport {
            target: self.shared.target.clone(),
            started: self.started,
            elapsed: self.elapsed(),
            samples,
            marks: lock(&self.shared.marks).clone(),
            truncated: self.shared.truncated.load(Ordering::SeqCst),
        }
    }

    /// Signals the workers to stop and joins them; returns the first worker panic, if any.
    fn join(&mut self) -> Option<Box<dyn std::any::Any + Send>> {
        lock(&self.shared.control).stop = true;
        self.shared.wake.notify_all();
        let mut panic = None;
        for handle in self.threads.drain(..) {
            if let Err(p) = handle.join() {
                panic.get_or_insert(p);
            }
        }
        panic
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        let _ = self.join();
    }
}

struct Worker {
    id: usize,
    keep_alive: bool,
    config: Arc<LoadConfig>,
    shared: Arc<Shared>,
    started: Instant,
    deadline: Instant,
}

/// Counts a worker as ended however it ends.
struct Running<'a>(&'a AtomicUsize);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Worker {
    fn run(self) {
        let _running = Running(&self.shared.running);
        let host = self
            .config
            .host
            .clone()
            .unwrap_or_else(|| self.config.addr.to_string());
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: skiff-e2e-load\r\nAccept: */*\r\n{}\r\n",
            self.config.path,
            if self.keep_alive {
                ""
            } else {
                "Connection: close\r\n"
            }
        );
        let mut conn: Option<Conn> = None;
        while self.wait_until_active(&mut conn) {
            if self.shared.issued.fetch_add(1, Ordering::SeqCst) >= self.config.max_requests {
                self.shared.truncated.store(true, Ordering::SeqCst);
                break;
            }
            let sent = Instant::now();
            let reused = conn.is_some();
            let mut result = self.attempt(&mut conn, request.as_bytes());
            let mut retried = None;
            if let Err(failure) = &result {
                if self.config.retry_stale_keep_alive && reused && failure.is_stale() {
                    retried = Some(failure.to_string());
                    result = self.attempt(&mut conn, request.as_bytes());
                }
            }
            let outcome = match result {
                Ok(r) => Outcome::Response {
                    status: r.status,
                    body: String::from_utf8_lossy(&r.snippet).into_owned(),
                    body_len: r.body_len,
                },
                Err(f) => Outcome::Error {
                    kind: f.kind,
                    detail: f.detail,
                },
            };
            lock(&self.shared.samples).push(Sample {
                at: sent.saturating_duration_since(self.started),
                latency: sent.elapsed(),
                worker: self.id,
                reused,
                retried,
                outcome,
            });
            self.pause();
        }
    }

    /// Blocks while this worker is idle; false once the run is over.
    fn wait_until_active(&self, conn: &mut Option<Conn>) -> bool {
        let mut control = lock(&self.shared.control);
        loop {
            let now = Instant::now();
            if control.stop || now >= self.deadline {
                return false;
            }
            if self.id < control.active {
                return true;
            }
            *conn = None;
            control = self
                .shared
                .wake
                .wait_timeout(control, self.deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Sleeps `pause_between`, waking early when the run stops.
    fn pause(&self) {
        let until = (Instant::now() + self.config.pause_between).min(self.deadline);
        let mut control = lock(&self.shared.control);
        loop {
            let now = Instant::now();
            if control.stop || now >= until {
                return;
            }
            control = self
                .shared
                .wake
                .wait_timeout(control, until - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// One request on `conn` (opened if `None`); keeps the connection in `conn` only if it
    /// may serve another request.
    fn attempt(&self, conn: &mut Option<Conn>, request: &[u8]) -> Result<Response, Failure> {
        let deadline = Instant::now() + self.config.request_timeout;
        let mut c = match conn.take() {
            Some(c) => c,
            None => Conn::open(self.config.addr, deadline)?,
        };
        let response = c.exchange(request, deadline)?;
        if self.keep_alive && response.reusable {
            *conn = Some(c);
        }
        Ok(response)
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP/1.1 client
// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
struct Failure {
    kind: FailureKind,
    detail: String,
    /// Whether any byte of the response had arrived.
    got_bytes: bool,
}

impl Failure {
    fn io(phase: &str, e: &io::Error, got_bytes: bool) -> Failure {
        let kind = match e.kind() {
            io::ErrorKind::ConnectionRefused => FailureKind::Refused,
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe => FailureKind::Reset,
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => FailureKind::Timeout,
            io::ErrorKind::UnexpectedEof => FailureKind::Closed,
            _ => FailureKind::Other,
        };
        Failure {
            kind,
            detail: format!("{phase}: {e}"),
            got_bytes,
        }
    }

    /// A kept-alive connection the server had already given up on.
    fn is_stale(&self) -> bool {
        !self.got_bytes && matches!(self.kind, FailureKind::Closed | FailureKind::Reset)
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.detail)
    }
}

#[derive(Debug)]
struct Response {
    status: u16,
    snippet: Vec<u8>,
    body_len: usize,
    reusable: bool,
}

/// How a response body ends.
enum Framing {
    None,
    Length(usize),
    Chunked,
    Eof,
}

struct Conn {
    reader: BufReader<TcpStream>,
    /// Whether a byte of the current response has arrived.
    got_bytes: bool,
}

/// Time left until `deadline` (at least 1 ms, as a zero socket timeout is an error), or a
/// timeout failure.
fn remaining(deadline: Instant, phase: &str, got_bytes: bool) -> Result<Duration, Failure> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(Failure {
            kind: FailureKind::Timeout,
            detail: format!("{phase}: request timed out"),
            got_bytes,
        });
    }
    Ok(left.max(Duration::from_millis(1)))
}

impl Conn {
    fn open(addr: SocketAddr, deadline: Instant) -> Result<Conn, Failure> {
        let timeout = remaining(deadline, "connect", false)?;
        let stream = TcpStream::connect_timeout(&addr, timeout)
            .map_err(|e| Failure::io(&format!("connect {addr}"), &e, false))?;
        stream
            .set_nodelay(true)
            .map_err(|e| Failure::io("set TCP_NODELAY", &e, false))?;
        Ok(Conn {
            reader: BufReader::new(stream),
            got_bytes: false,
        })
    }

    fn bad(&self, detail: String) -> Failure {
        Failure {
            kind: FailureKind::BadResponse,
            detail,
            got_bytes: self.got_bytes,
        }
    }

    fn closed(&self, phase: &str) -> Failure {
        Failure {
            kind: FailureKind::Closed,
            detail: format!("{phase}: connection closed"),
            got_bytes: self.got_bytes,
        }
    }

    /// Sends `request` and reads one complete response, all before `deadline`.
    fn exchange(&mut self, request: &[u8], deadline: Instant) -> Result<Response, Failure> {
        self.got_bytes = false;
        let stream = self.reader.get_mut();
        let timeout = remaining(deadline, "write request", false)?;
        stream
            .set_write_timeout(Some(timeout))
            .and_then(|()| stream.write_all(request))
            .and_then(|()| stream.flush())
            .map_err(|e| Failure::io("write request", &e, false))?;
        // Interim 1xx responses precede the real one.
        for _ in 0..5 {
            let status_line = self.line(deadline, "read status line")?;
            let (http10, status) = parse_status_line(&status_line)
                .ok_or_else(|| self.bad(format!("status line {status_line:?}")))?;
            let head = self.head(deadline)?;
            if (100..200).contains(&status) {
                continue;
            }
            let mut close = head.connection_close || (http10 && !head.connection_keep_alive);
            let framing = if status == 204 || status == 304 {
                Framing::None
            } else if head.chunked {
                Framing::Chunked
            } else if let Some(len) = head.content_length {
                Framing::Length(len)
            } else {
                close = true;
                Framing::Eof
            };
            let mut body = Body::default();
            match framing {
                Framing::None => {}
                Framing::Length(len) => self.read_n(len, &mut body, deadline)?,
                Framing::Chunked => self.read_chunked(&mut body, deadline)?,
                Framing::Eof => self.read_to_eof(&mut body, deadline)?,
            }
            return Ok(Response {
                status,
                snippet: body.snippet,
                body_len: body.len,
                reusable: !close,
            });
        }
        Err(self.bad("more than 5 interim (1xx) responses".to_string()))
    }

    /// The buffered bytes, reading more (with the time left) if none are buffered; empty at
    /// the end of the stream.
    fn fill(&mut self, deadline: Instant, phase: &str) -> Result<&[u8], Failure> {
        let got = self.got_bytes;
        let timeout = remaining(deadline, phase, got)?;
        if self.reader.buffer().is_empty() {
            self.reader
                .get_ref()
                .set_read_timeout(Some(timeout))
                .map_err(|e| Failure::io(phase, &e, got))?;
        }
        let buf = self
            .reader
            .fill_buf()
            .map_err(|e| Failure::io(phase, &e, got))?;
        if !buf.is_empty() {
            self.got_bytes = true;
        }
        Ok(buf)
    }

    /// One CRLF- (or LF-) terminated line without its terminator.
    fn line(&mut self, deadline: Instant, phase: &str) -> Result<String, Failure> {
        let mut line = Vec::new();
        loop {
            let buf = self.fill(deadline, phase)?;
            if buf.is_empty() {
                return Err(self.closed(phase));
            }
            let (take, done) = match buf.iter().position(|&b| b == b'\n') {
                Some(i) => (i + 1, true),
                None => (buf.len(), false),
            };
            line.extend_from_slice(&buf[..take]);
            self.reader.consume(take);
            if line.len() > MAX_LINE {
                return Err(self.bad(format!("{phase}: line longer than {MAX_LINE} bytes")));
            }
            if done {
                while matches!(line.last(), Some(b'\n' | b'\r')) {
                    line.pop();
                }
                return Ok(String::from_utf8_lossy(&line).into_owned());
            }
        }
    }

    fn head(&mut self, deadline: Instant) -> Result<Head, Failure> {
        let mut head = Head::default();
        for _ in 0..=MAX_HEADERS {
            let line = self.line(deadline, "read response head")?;
            if line.is_empty() {
                return Ok(head);
            }
            let (name, value) = line
                .split_once(':')
                .ok_or_else(|| self.bad(format!("header line {line:?}")))?;
            let (name, value) = (name.trim(), value.trim());
            if name.eq_ignore_ascii_case("content-length") {
                let len = value
                    .parse::<usize>()
                    .map_err(|_| self.bad(format!("Content-Length {value:?}")))?;
                if head.content_length.is_some_and(|l| l != len) {
                    return Err(self.bad("conflicting Content-Length headers".to_string()));
                }
                head.content_length = Some(len);
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                head.chunked = value
                    .rsplit(',')
                    .next()
                    .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
            } else if name.eq_ignore_ascii_case("connection") {
                for token in value.split(',').map(str::trim) {
                    head.connection_close |= token.eq_ignore_ascii_case("close");
                    head.connection_keep_alive |= token.eq_ignore_ascii_case("keep-alive");
                }
            }
        }
        Err(self.bad(format!("more than {MAX_HEADERS} header lines")))
    }

    fn read_n(&mut self, mut n: usize, body: &mut Body, deadline: Instant) -> Result<(), Failure> {
        while n > 0 {
            let buf = self.fill(deadline, "read body")?;
            if buf.is_empty() {
                return Err(self.closed(&format!("read body ({n} bytes missing)")));
            }
            let take = buf.len().min(n);
            body.push(&buf[..take]);
            self.reader.consume(take);
            n -= take;
        }
        Ok(())
    }

    fn read_to_eof(&mut self, body: &mut Body, deadline: Instant) -> Result<(), Failure> {
        loop {
            let buf = self.fill(deadline, "read body until close")?;
            if buf.is_empty() {
                return Ok(());
            }
            let take = buf.len();
            body.push(buf);
            self.reader.consume(take);
        }
    }

    fn read_chunked(&mut self, body: &mut Body, deadline: Instant) -> Result<(), Failure> {
        loop {
            let line = self.line(deadline, "read chunk size")?;
            let size = line.split(';').next().unwrap_or_default().trim();
            let size = usize::from_str_radix(size, 16)
                .map_err(|_| self.bad(format!("chunk size line {line:?}")))?;
            if size == 0 {
                // Trailers, up to the blank line.
                for _ in 0..=MAX_HEADERS {
                    if self.line(deadline, "read trailers")?.is_empty() {
                        return Ok(());
                    }
                }
                return Err(self.bad(format!("more than {MAX_HEADERS} trailer lines")));
            }
            self.read_n(size, body, deadline)?;
            let end = self.line(deadline, "read chunk end")?;
            if !end.is_empty() {
                return Err(self.bad(format!("chunk not followed by CRLF: {end:?}")));
            }
        }
    }
}

#[derive(Default)]
struct Head {
    content_length: Option<usize>,
    chunked: bool,
    connection_close: bool,
    connection_keep_alive: bool,
}

#[derive(Default)]
struct Body {
    snippet: Vec<u8>,
    len: usize,
}

impl Body {
    fn push(&mut self, bytes: &[u8]) {
        let room = BODY_SNIPPET.saturating_sub(self.snippet.len());
        self.snippet
            .extend_from_slice(&bytes[..room.min(bytes.len())]);
        self.len += bytes.len();
    }
}

/// `HTTP/1.x NNN reason` -> (is HTTP/1.0, status).
fn parse_status_line(line: &str) -> Option<(bool, u16)> {
    let mut parts = line.splitn(3, ' ');
    let version = parts.next()?;
    let http10 = match version {
        "HTTP/1.1" => false,
        "HTTP/1.0" => true,
        _ => return None,
    };
    let code = parts.next()?;
    if code.len() != 3 {
        return None;
    }
    let status = code
        .parse::<u16>()
        .ok()
        .filter(|s| (100..600).contains(s))?;
    Some((http10, status))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::net::TcpListener;

    /// What the test server does with one request.
    enum Reply {
        /// Writes these bytes; closes the connection afterwards if `close`.
        Bytes(Vec<u8>, bool),
        /// Closes the connection without answering.
        Close,
        /// Never answers (the connection stays open until the server stops).
        Silence,
    }

    fn ok(body: &str) -> Reply {
        Reply::Bytes(
            format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .into_bytes(),
            false,
        )
    }

    type Handler = dyn Fn(usize) -> Reply + Send + Sync;

    /// A tiny HTTP server on 127.0.0.1: one thread per connection, reading request heads and
    /// answering with `handler(request number)`. Stops (and joins) on drop.
    struct TestServer {
        addr: SocketAddr,
        connections: Arc<AtomicUsize>,
        requests: Arc<AtomicUsize>,
        stop: Arc<AtomicBool>,
        thread: Option<JoinHandle<()>>,
    }

    impl TestServer {
        fn start(handler: impl Fn(usize) -> Reply + Send + Sync + 'static) -> TestServer {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            listener.set_nonblocking(true).unwrap();
            let addr = listener.local_addr().unwrap();
            let connections = Arc::new(AtomicUsize::new(0));
            let requests = Arc::new(AtomicUsize::new(0));
            let stop = Arc::new(AtomicBool::new(false));
            let handler: Arc<Handler> = Arc::new(handler);
            let thread = {
                let (connections, requests, stop) =
                    (connections.clone(), requests.clone(), stop.clone());
                thread::spawn(move || {
                    let mut handles = Vec::new();
                    while !stop.load(Ordering::SeqCst) {
                        match listener.accept() {
                            Ok((conn, _)) => {
                                connections.fetch_add(1, Ordering::SeqCst);
                                let (requests, stop, handler) =
                                    (requests.clone(), stop.clone(), handler.clone());
                                handles.push(thread::spawn(move || {
                                    serve(conn, &requests, &stop, &*handler)
                                }));
                            }
                            Err(_) => thread::sleep(Duration::from_millis(2)),
                        }
                    }
                    for h in handles {
                        h.join().unwrap();
                    }
                })
            };
            TestServer {
                addr,
                connections,
                requests,
                stop,
                thread: Some(thread),
            }
        }

        fn connections(&self) -> usize {
            self.connections.load(Ordering::SeqCst)
        }

        fn requests(&self) -> usize {
            self.requests.load(Ordering::SeqCst)
        }
    }

    impl Drop for TestServer {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::SeqCst);
            if let Some(t) = self.thread.take() {
                t.join().unwrap();
            }
        }
    }

    fn serve(mut conn: TcpStream, requests: &AtomicUsize, stop: &AtomicBool, handler: &Handler) {
        conn.set_nonblocking(false).unwrap();
        conn.set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let mut pending = Vec::new();
        let mut buf = [0u8; 4096];
        while !stop.load(Ordering::SeqCst) {
            if let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                pending.drain(..end + 4);
                match handler(requests.fetch_add(1, Ordering::SeqCst)) {
                    Reply::Bytes(bytes, close) => {
                        if conn.write_all(&bytes).is_err() || close {
                            return;
                        }
                    }
                    Reply::Close => return,
                    Reply::Silence => {
                        while !stop.load(Ordering::SeqCst) {
                            thread::sleep(Duration::from_millis(5));
                        }
                        return;
                    }
                }
                continue;
            }
            match conn.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => pending.extend_from_slice(&buf[..n]),
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock) => {}
                Err(_) => return,
            }
        }
    }

    fn config(addr: SocketAddr, mode: ConnectionMode) -> LoadConfig {
        LoadConfig {
            workers: 2,
            mode,
            pause_between: Duration::from_millis(5),
            max_duration: Duration::from_secs(10),
            request_timeout: Duration::from_secs(2),
            ..LoadConfig::new(addr)
        }
    }

    fn run_for(config: LoadConfig, d: Duration) -> LoadReport {
        let load = Load::start(config);
        thread::sleep(d);
        load.stop()
    }

    #[test]
    fn keep_alive_workers_reuse_their_connections() {
        let server = TestServer::start(|_| ok("skiff-test web v1\n"));
        let report = run_for(
            config(server.addr, ConnectionMode::KeepAlive),
            Duration::from_millis(300),
        );
        report.assert_no_failures("keep-alive");
        assert!(report.total() >= 10, "{report}");
        assert_eq!(report.count_containing("v1"), report.total());
        assert_eq!(report.statuses(), BTreeMap::from([(200, report.total())]));
        assert_eq!(server.connections(), 2, "one connection per worker");
        assert_eq!(server.requests(), report.total());
        assert!(report.samples().iter().any(|s| s.reused));
        let sample = &report.samples()[0];
        assert_eq!(sample.body(), Some("skiff-test web v1\n"));
        assert!(matches!(
            sample.outcome,
            Outcome::Response { body_len: 18, .. }
        ));
    }

    #[test]
    fn new_connection_mode_opens_one_connection_per_request() {
        let server = TestServer::start(|_| ok("v1"));
        let report = run_for(
            config(server.addr, ConnectionMode::NewPerRequest),
            Duration::from_millis(300),
        );
        report.assert_no_failures("new connections");
        assert!(report.total() >= 10, "{report}");
        assert_eq!(server.connections(), report.total());
        assert!(report.samples().iter().all(|s| !s.reused));
    }

    #[test]
    fn mixed_mode_keeps_alive_on_even_workers_only() {
        let server = TestServer::start(|_| ok("v1"));
        let report = run_for(
            config(server.addr, ConnectionMode::Mixed),
            Duration::from_millis(300),
        );
        report.assert_no_failures("mixed");
        let per_worker = |w: usize| report.samples().iter().filter(|s| s.worker == w).count();
        assert!(per_worker(0) >= 3 && per_worker(1) >= 3, "{report}");
        // Worker 0's connection, plus one per request of worker 1.
        assert_eq!(server.connections(), 1 + per_worker(1));
    }

    #[test]
    fn chunked_and_close_delimited_bodies_are_read_whole() {
        let server = TestServer::start(|n| match n % 3 {
            0 => Reply::Bytes(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
                  7;ext=1\r\nchunked\r\n5\r\n body\r\n0\r\nX-Trailer: t\r\n\r\n"
                    .to_vec(),
                false,
            ),
            // Like busybox httpd's CGI answers: no length, ends with the connection.
            1 => Reply::Bytes(
                b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/plain\r\n\r\n\
                  skiff-test web-500 v1\n"
                    .to_vec(),
                true,
            ),
            _ => Reply::Bytes(
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n".to_vec(),
                false,
            ),
        });
        let report = run_for(
            LoadConfig {
                workers: 1,
                ..config(server.addr, ConnectionMode::KeepAlive)
            },
            Duration::from_millis(300),
        );
        assert!(report.total() >= 6, "{report}");
        assert!(report.errors().is_empty(), "{report}");
        let statuses = report.statuses();
        assert_eq!(
            statuses.keys().copied().collect::<Vec<_>>(),
            [200, 204, 500]
        );
        assert_eq!(report.count_containing("chunked body"), statuses[&200]);
        assert_eq!(report.count_containing("web-500"), statuses[&500]);
        // Non-2xx responses count as failures; 204 does not.
        assert_eq!(report.failures().len(), statuses[&500]);
        assert!(report.failures().iter().all(|s| s.status() == Some(500)));
        // Each 500 ended its connection, so the request after it opened a new one.
        let last_was_500 = report.samples().last().and_then(Sample::status) == Some(500);
        let reopened = statuses[&500] - usize::from(last_was_500);
        assert_eq!(server.connections(), 1 + reopened, "{report}");
    }

    #[test]
    fn a_server_that_closes_without_answering_is_recorded_as_closed() {
        let server = TestServer::start(|n| if n % 2 == 0 { ok("v1") } else { Reply::Close });
        let report = run_for(
            LoadConfig {
                workers: 1,
                ..config(server.addr, ConnectionMode::NewPerRequest)
            },
            Duration::from_millis(300),
        );
        let failures = report.failures();
        assert!(!failures.is_empty(), "{report}");
        assert_eq!(failures.len(), report.errors().len());
        assert!(
            failures
                .iter()
                .all(|s| s.error_kind() == Some(FailureKind::Closed)),
            "{report}"
        );
        assert_eq!(report.successes() + failures.len(), report.total());
        let text = report.to_string();
        assert!(text.contains("closed: read status line"), "{text}");
        assert!(text.contains("\"error: closed\""), "{text}");
    }

    #[test]
    fn stale_keep_alive_connections_fail_unless_retried() {
        // Answers with a Content-Length and no `Connection: close`, then closes anyway.
        let closing = || {
            TestServer::start(|_| {
                Reply::Bytes(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nv1".to_vec(),
                    true,
                )
            })
        };
        let cfg = |addr| LoadConfig {
            workers: 1,
            pause_between: Duration::from_millis(20),
            ..config(addr, ConnectionMode::KeepAlive)
        };
        let server = closing();
        let report = run_for(cfg(server.addr), Duration::from_millis(300));
        assert!(!report.failures().is_empty(), "{report}");
        assert!(
            report.failures().iter().all(|s| s.reused
                && matches!(
                    s.error_kind(),
                    Some(FailureKind::Closed | FailureKind::Reset)
                )),
            "{report}"
        );

        let server = closing();
        let report = run_for(
            LoadConfig {
                retry_stale_keep_alive: true,
                ..cfg(server.addr)
            },
            Duration::from_millis(300),
        );
        report.assert_no_failures("with retries");
        assert!(
            report.samples().iter().any(|s| s.retried.is_some()),
            "{report}"
        );
    }

    #[test]
    fn refused_connections_and_silent_servers_are_failures_within_the_timeout() {
        let closed_port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let report = run_for(
            LoadConfig {
                workers: 1,
                ..config(closed_port, ConnectionMode::NewPerRequest)
            },
            Duration::from_millis(100),
        );
        assert!(report.total() >= 1);
        assert!(report
            .samples()
            .iter()
            .all(|s| s.error_kind() == Some(FailureKind::Refused)));

        let server = TestServer::start(|_| Reply::Silence);
        let started = Instant::now();
        let report = run_for(
            LoadConfig {
                workers: 2,
                request_timeout: Duration::from_millis(300),
                ..config(server.addr, ConnectionMode::KeepAlive)
            },
            Duration::from_millis(100),
        );
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "stop is bounded"
        );
        assert_eq!(report.total(), 2, "{report}");
        assert!(report
            .samples()
            .iter()
            .all(|s| s.error_kind() == Some(FailureKind::Timeout)
                && s.latency >= Duration::from_millis(250)));
    }

    #[test]
    fn the_run_ends_at_max_duration_and_max_requests() {
        let server = TestServer::start(|_| ok("v1"));
        let load = Load::start(LoadConfig {
            max_duration: Duration::from_millis(200),
            ..config(server.addr, ConnectionMode::Mixed)
        });
        let ended = wait(Duration::from_secs(3), || load.is_finished());
        assert!(ended, "workers still running after max_duration");
        let report = load.stop();
        assert!(report.total() > 0 && !report.truncated());
        // The last request starts before the deadline (give or take the clock reads).
        let last = report.samples().last().map(|s| s.at).unwrap_or_default();
        assert!(last < Duration::from_millis(250), "{report}");

        let load = Load::start(LoadConfig {
            max_requests: 7,
            pause_between: Duration::ZERO,
            ..config(server.addr, ConnectionMode::KeepAlive)
        });
        assert!(wait(Duration::from_secs(3), || load.is_finished()));
        let report = load.stop();
        assert_eq!(report.total(), 7);
        assert!(report.truncated());
    }

    #[test]
    fn set_workers_raises_and_lowers_concurrency() {
        let server = TestServer::start(|_| ok("v1"));
        let load = Load::start(LoadConfig {
            workers: 4,
            active_workers: Some(1),
            ..config(server.addr, ConnectionMode::Mixed)
        });
        thread::sleep(Duration::from_millis(200));
        let raised = load.mark("raised");
        load.set_workers(4);
        assert_eq!(load.active_workers(), 4);
        thread::sleep(Duration::from_millis(200));
        let lowered = load.mark("lowered");
        load.set_workers(2);
        thread::sleep(Duration::from_millis(200));
        let snapshot = load.snapshot();
        assert!(snapshot.total() > 0);
        let report = load.stop();
        assert!(report.total() >= snapshot.total());
        report.assert_no_failures("set_workers");
        let workers = |r: LoadReport| {
            let mut w: Vec<usize> = r.samples().iter().map(|s| s.worker).collect();
            w.sort_unstable();
            w.dedup();
            w
        };
        assert_eq!(workers(report.before(raised)), [0]);
        assert_eq!(workers(report.window(raised, lowered)), [0, 1, 2, 3]);
        // A request in flight when lowered may still be recorded just after.
        let settled = lowered + Duration::from_millis(50);
        assert_eq!(workers(report.after(settled)), [0, 1], "{report}");
        assert_eq!(report.mark("lowered"), Some(lowered));
    }

    #[test]
    fn report_windows_and_timeline_tell_versions_apart() {
        let switch = Arc::new(AtomicBool::new(false));
        let server = {
            let switch = switch.clone();
            TestServer::start(move |_| {
                ok(if switch.load(Ordering::SeqCst) {
                    "skiff-test web v2\n"
                } else {
                    "skiff-test web v1\n"
                })
            })
        };
        let load = Load::start(config(server.addr, ConnectionMode::Mixed));
        thread::sleep(Duration::from_millis(300));
        switch.store(true, Ordering::SeqCst);
        let promoted = Instant::now();
        load.mark("promoted");
        thread::sleep(Duration::from_millis(300));
        let report = load.stop();
        report.assert_no_failures("versions");
        let late = report.since(promoted + Duration::from_millis(50));
        assert!(late.total() > 0);
        assert_eq!(late.count_containing("v2"), late.total(), "{report}");
        assert!(
            report
                .before(report.mark("promoted").unwrap())
                .count_containing("v1")
                > 0
        );
        assert_eq!(
            report.count_containing("v1") + report.count_containing("v2"),
            report.total()
        );
        let timeline = report.timeline(Duration::from_millis(100));
        assert!(timeline.len() >= 5, "{timeline:?}");
        assert_eq!(
            timeline.iter().map(|b| b.total).sum::<usize>(),
            report.total()
        );
        assert!(timeline[0].outcomes.contains_key("skiff-test web v1"));
        assert!(timeline
            .last()
            .unwrap()
            .outcomes
            .contains_key("skiff-test web v2"));
        let text = report.to_string();
        assert!(
            text.contains("0 failures") && text.contains("mark"),
            "{text}"
        );
    }

    #[test]
    fn status_lines_are_parsed_strictly() {
        assert_eq!(parse_status_line("HTTP/1.1 200 OK"), Some((false, 200)));
        assert_eq!(parse_status_line("HTTP/1.0 500"), Some((true, 500)));
        assert_eq!(parse_status_line("HTTP/2 200 OK"), None);
        assert_eq!(parse_status_line("HTTP/1.1 20 OK"), None);
        assert_eq!(parse_status_line("SSH-2.0-OpenSSH"), None);
    }

    fn wait(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if cond() {
                return true;
            }
            thread::sleep(Duration::from_millis(10));
        }
        cond()
    }
}
