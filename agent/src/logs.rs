//! Replica logs: every runtime writes a replica's output to
//! `DATA/allocs/<id>/{stdout,stderr}.log` (opened for appending, so a
//! container keeps writing to it across agent restarts). This module rotates
//! those files by size, marks when they grew (`log_times.rs`, for `--since`
//! and `--timestamps`) and serves them over the `AgentLogs` gRPC service
//! that the servers relay `skiff service logs` to, like `nomad alloc logs`
//! asks the client that runs the allocation. The same service runs
//! `skiff service exec` (`exec/`) and prunes the node's image store for
//! `skiff node prune`.
//!
//! Rotation is copy-and-truncate: the writer holds the file open (a
//! container's stdout is the file itself), so the file is copied to
//! `NAME.1` and truncated in place; the writer's appends land at the new
//! end. Lines written between the copy and the truncation are lost, which is
//! the known price of copytruncate.

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use skiff_proto::v1 as pb;
use skiff_proto::v1::agent_logs_server::{AgentLogs, AgentLogsServer};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

/// The streams a replica writes.
pub const STREAMS: [&str; 2] = ["stdout", "stderr"];
/// How often a followed log is polled for new output.
const FOLLOW_POLL: Duration = Duration::from_millis(200);
/// At most this much is sent in one chunk.
const CHUNK: usize = 64 * 1024;
/// How long an exec call may take to send its start message.
const EXEC_START_WAIT: Duration = Duration::from_secs(10);
/// Record whose presence says the allocation is still known to the agent
/// (see `store.rs`).
const RECORD_FILE: &str = "state.json";

/// `DIR/stdout.log` for `stream` = `stdout`.
pub fn log_path(alloc_dir: &Path, stream: &str) -> PathBuf {
    alloc_dir.join(format!("{stream}.log"))
}

fn rotated_path(alloc_dir: &Path, stream: &str) -> PathBuf {
    alloc_dir.join(format!("{stream}.log.1"))
}

/// Rotates each log of `alloc_dir` that has grown beyond `max_bytes`: its
/// content replaces `NAME.log.1` and the file is truncated in place. Returns
/// the streams rotated.
pub fn rotate(alloc_dir: &Path, max_bytes: u64) -> Vec<&'static str> {
    let mut rotated = Vec::new();
    for stream in STREAMS {
        let path = log_path(alloc_dir, stream);
        let Ok(meta) = fs::metadata(&path) else {
            continue;
        };
        if meta.len() <= max_bytes {
            continue;
        }
        let old = rotated_path(alloc_dir, stream);
        let tmp = alloc_dir.join(format!("{stream}.log.1.tmp"));
        let copied = fs::copy(&path, &tmp).and_then(|len| fs::rename(&tmp, &old).map(|()| len));
        let len = match copied {
            Ok(len) => len,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "failed to rotate log");
                let _ = fs::remove_file(&tmp);
                continue;
            }
        };
        crate::log_times::rotate(alloc_dir, stream, len, now_ms());
        match fs::OpenOptions::new().write(true).open(&path) {
            Ok(file) => {
                if let Err(e) = file.set_len(0) {
                    tracing::warn!(path = %path.display(), error = %e, "failed to truncate log");
                    continue;
                }
                rotated.push(stream);
            }
            Err(e) => tracing::warn!(path = %path.display(), error = %e, "failed to truncate log"),
        }
    }
    rotated
}

/// Milliseconds since the epoch, by this node's clock.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// How often the logs' growth is marked (the precision of `--since` and
/// `--timestamps` for lines read back later).
pub const MARK_EVERY: Duration = Duration::from_secs(1);

/// Marks every allocation's logs under `allocs_dir` every [`MARK_EVERY`]
/// and rotates them every `rotate_every`, in one task so a rotation and a
/// mark never race, until the task is dropped.
pub async fn rotate_loop(allocs_dir: PathBuf, max_bytes: u64, rotate_every: Duration) {
    let mut tick = tokio::time::interval(MARK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let marker = Arc::new(std::sync::Mutex::new(crate::log_times::Marker::default()));
    let mut last_rotation = tokio::time::Instant::now();
    loop {
        tick.tick().await;
        let rotating = last_rotation.elapsed() >= rotate_every;
        if rotating {
            last_rotation = tokio::time::Instant::now();
        }
        let (dir, marker) = (allocs_dir.clone(), marker.clone());
        let _ = tokio::task::spawn_blocking(move || {
            let Ok(mut marker) = marker.lock() else {
                return;
            };
            let now = now_ms();
            for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    marker.mark(&entry.path(), now);
                    if rotating {
                        rotate(&entry.path(), max_bytes);
                    }
                }
            }
            if rotating {
                marker.forget_missing();
            }
        })
        .await;
    }
}

/// The last `n` lines of `text` (all of it for `n` = 0).
fn last_lines(text: &[u8], n: usize) -> &[u8] {
    if n == 0 {
        return text;
    }
    let body = text.strip_suffix(b"\n").unwrap_or(text);
    let mut seen = 0;
    for (i, b) in body.iter().enumerate().rev() {
        if *b == b'\n' {
            seen += 1;
            if seen == n {
                return &text[i + 1..];
            }
        }
    }
    text
}

/// Which lines of a log to send and how.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct LogFilter {
    /// The last N lines; 0: all.
    tail: usize,
    /// Only lines written at or after this time (ms since the epoch); 0:
    /// all.
    since_ms: u64,
    /// Prefix each line with its write time.
    timestamps: bool,
}

impl LogFilter {
    fn new(request: &pb::LogsRequest) -> Self {
        Self {
            tail: request.tail as usize,
            since_ms: request.since_ms,
            timestamps: request.timestamps,
        }
    }

    /// Needs each line's write time.
    fn timed(&self) -> bool {
        self.since_ms > 0 || self.timestamps
    }
}

/// `text` with each line prefixed by its time (`times`, one per line) as
/// `2024-05-01T12:00:00.123Z `, as `docker logs --timestamps` prints.
fn stamped(text: &[u8], times: &[u64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len() + times.len() * 25);
    for (line, ms) in text.split_inclusive(|b| *b == b'\n').zip(times) {
        out.extend_from_slice(skiff_spec::time::format_rfc3339_ms(*ms).as_bytes());
        out.push(b' ');
        out.extend_from_slice(line);
    }
    out
}

/// A log file's lines with their write times (see `log_times.rs`).
fn timed_lines(log: &Path, marks: &Path) -> (Vec<u8>, Vec<u64>) {
    let text = fs::read(log).unwrap_or_default();
    let times = crate::log_times::line_times(
        &text,
        &crate::log_times::read_marks(marks),
        crate::log_times::modified_ms(log),
    );
    (text, times)
}

/// What a stream holds now (the rotated file, then the current one), cut to
/// the lines `filter` asks for, and the current file's length: where
/// following continues.
fn snapshot(alloc_dir: &Path, stream: &str, filter: LogFilter) -> (Vec<u8>, u64) {
    if !filter.timed() {
        let current = fs::read(log_path(alloc_dir, stream)).unwrap_or_default();
        let offset = current.len() as u64;
        let mut text = fs::read(rotated_path(alloc_dir, stream)).unwrap_or_default();
        if !text.is_empty() && !text.ends_with(b"\n") {
            text.push(b'\n');
        }
        text.extend_from_slice(&current);
        return (last_lines(&text, filter.tail).to_vec(), offset);
    }
    let (mut text, mut times) = timed_lines(
        &rotated_path(alloc_dir, stream),
        &crate::log_times::rotated_marks_path(alloc_dir, stream),
    );
    if !text.is_empty() && !text.ends_with(b"\n") {
        text.push(b'\n');
    }
    let (current, current_times) = timed_lines(
        &log_path(alloc_dir, stream),
        &crate::log_times::marks_path(alloc_dir, stream),
    );
    let offset = current.len() as u64;
    text.extend_from_slice(&current);
    times.extend(current_times);
    let lines: Vec<(&[u8], u64)> = text
        .split_inclusive(|b| *b == b'\n')
        .zip(times)
        .filter(|(_, ms)| *ms >= filter.since_ms)
        .collect();
    let skip = match filter.tail {
        0 => 0,
        n => lines.len().saturating_sub(n),
    };
    let mut out = Vec::new();
    for (line, ms) in &lines[skip..] {
        if filter.timestamps {
            out.extend(stamped(line, &[*ms]));
        } else {
            out.extend_from_slice(line);
        }
    }
    (out, offset)
}

/// Reads what was appended to `path` since `offset`; starts over from 0 if
/// the file shrank (rotated).
fn read_new(path: &Path, offset: &mut u64) -> Vec<u8> {
    let Ok(mut file) = File::open(path) else {
        return Vec::new();
    };
    let len = file.metadata().map_or(0, |m| m.len());
    if len < *offset {
        *offset = 0;
    }
    if len == *offset || file.seek(SeekFrom::Start(*offset)).is_err() {
        return Vec::new();
    }
    let mut buf = Vec::new();
    let _ = (&mut file).take(len - *offset).read_to_end(&mut buf);
    *offset += buf.len() as u64;
    buf
}

/// Serves `AgentLogs` for the allocations under `allocs_dir` (and, once an
/// allocation is retired, from its kept logs under `kept_dir`), and prunes
/// the images of `oci` (if given).
#[derive(Clone)]
pub struct LogService {
    allocs_dir: PathBuf,
    kept_dir: Option<PathBuf>,
    oci: Option<Arc<crate::runtime::oci::OciRuntime>>,
}

impl LogService {
    pub fn new(allocs_dir: PathBuf) -> Self {
        Self {
            allocs_dir,
            kept_dir: None,
            oci: None,
        }
    }

    /// Logs of retired allocations are read from `kept_dir/<id>/`.
    pub fn with_kept_logs(mut self, kept_dir: PathBuf) -> Self {
        self.kept_dir = Some(kept_dir);
        self
    }

    /// `Prune` removes the images `oci` holds no lease on.
    pub fn with_images(mut self, oci: Arc<crate::runtime::oci::OciRuntime>) -> Self {
        self.oci = Some(oci);
        self
    }

    /// Serves on `listener` until `shutdown` resolves.
    ///
    /// Over mutual TLS: only a server of the cluster (a server
    /// certificate) may read logs, run commands or prune images.
    pub async fn serve(
        self,
        listener: TcpListener,
        tls: std::sync::Arc<rustls::ServerConfig>,
        shutdown: impl std::future::Future<Output = ()> + Send,
    ) -> Result<(), tonic::transport::Error> {
        tonic::transport::Server::builder()
            .add_service(AgentLogsServer::with_interceptor(self, servers_only))
            .serve_with_incoming_shutdown(skiff_pki::tls::incoming(listener, tls), shutdown)
            .await
    }
}

/// Refuses every caller without a server certificate.
#[allow(clippy::result_large_err)]
fn servers_only(request: Request<()>) -> Result<Request<()>, Status> {
    let server = request
        .extensions()
        .get::<skiff_pki::PeerInfo>()
        .is_some_and(skiff_pki::PeerInfo::is_server);
    if server {
        Ok(request)
    } else {
        Err(Status::permission_denied(
            "only the cluster's servers may call an agent (a server certificate is needed)",
        ))
    }
}

type ChunkSender = mpsc::Sender<Result<pb::LogChunk, Status>>;

/// Sends `data` in chunks; `false` once the client has gone.
async fn send(tx: &ChunkSender, stream: &str, data: &[u8]) -> bool {
    for piece in data.chunks(CHUNK) {
        let chunk = pb::LogChunk {
            stream: stream.to_string(),
            data: piece.to_vec(),
        };
        if tx.send(Ok(chunk)).await.is_err() {
            return false;
        }
    }
    true
}

/// Streams the replica's logs: the snapshot, then (following) new whole
/// lines until the allocation is forgotten or the client goes away.
async fn stream_logs(dir: PathBuf, request: pb::LogsRequest, tx: ChunkSender) {
    let filter = LogFilter::new(&request);
    let mut offsets = [0u64; 2];
    for (i, stream) in STREAMS.iter().enumerate() {
        let (text, offset) = snapshot(&dir, stream, filter);
        offsets[i] = offset;
        if !send(&tx, stream, &text).await {
            return;
        }
    }
    if !request.follow {
        return;
    }
    let mut partial: [Vec<u8>; 2] = [Vec::new(), Vec::new()];
    let mut known = dir.join(RECORD_FILE).exists();
    loop {
        tokio::select! {
            () = tokio::time::sleep(FOLLOW_POLL) => {}
            () = tx.closed() => return,
        }
        let exists = dir.join(RECORD_FILE).exists();
        for (i, stream) in STREAMS.iter().enumerate() {
            partial[i].extend(read_new(&log_path(&dir, stream), &mut offsets[i]));
            // Whole lines only, unless the replica is gone for good.
            let cut = if known && !exists {
                partial[i].len()
            } else {
                partial[i]
                    .iter()
                    .rposition(|b| *b == b'\n')
                    .map_or(0, |p| p + 1)
            };
            let mut lines: Vec<u8> = partial[i].drain(..cut).collect();
            if filter.timestamps && !lines.is_empty() {
                // Read within a poll of being written: now is its time.
                let now = now_ms();
                let count = lines.split_inclusive(|b| *b == b'\n').count();
                lines = stamped(&lines, &vec![now; count]);
            }
            if !lines.is_empty() && !send(&tx, stream, &lines).await {
                return;
            }
        }
        if known && !exists {
            return;
        }
        known |= exists;
    }
}

#[tonic::async_trait]
impl AgentLogs for LogService {
    type LogsStream = Pin<Box<ReceiverStream<Result<pb::LogChunk, Status>>>>;

    async fn logs(
        &self,
        request: Request<pb::LogsRequest>,
    ) -> Result<Response<Self::LogsStream>, Status> {
        let mut request = request.into_inner();
        crate::spec::validate_alloc_id(&request.alloc_id)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let mut dir = self.allocs_dir.join(&request.alloc_id);
        if !dir.is_dir() {
            let kept = self.kept_dir.as_ref().map(|d| d.join(&request.alloc_id));
            match kept.filter(|d| d.is_dir()) {
                Some(kept) => {
                    // Retired: nothing will be written any more.
                    request.follow = false;
                    dir = kept;
                }
                None => {
                    return Err(Status::not_found(format!(
                        "replica {} has no logs on this node",
                        request.alloc_id
                    )))
                }
            }
        }
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(stream_logs(dir, request, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type ExecStream = Pin<Box<dyn futures::Stream<Item = Result<pb::ExecOutput, Status>> + Send>>;

    async fn exec(
        &self,
        request: Request<tonic::Streaming<pb::ExecInput>>,
    ) -> Result<Response<Self::ExecStream>, Status> {
        use pb::exec_input::Msg;
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(EXEC_START_WAIT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no exec start message in time"))??;
        let Some(pb::ExecInput {
            msg: Some(Msg::Start(start)),
        }) = first
        else {
            return Err(Status::invalid_argument(
                "the first message of an exec must be start",
            ));
        };
        let context = crate::exec::ExecContext {
            allocs_dir: self.allocs_dir.clone(),
            runc: self.oci.as_ref().and_then(|o| o.runc().ok().cloned()),
        };
        let rx = crate::exec::start(&context, start, Box::pin(inbound))
            .await
            .map_err(exec_status)?;
        Ok(Response::new(Box::pin(futures::StreamExt::map(
            ReceiverStream::new(rx),
            Ok,
        ))))
    }

    async fn prune(
        &self,
        _request: Request<pb::PruneRequest>,
    ) -> Result<Response<pb::PruneResponse>, Status> {
        let Some(oci) = &self.oci else {
            return Err(Status::unimplemented("this agent keeps no images"));
        };
        let report = oci.prune_images().await.map_err(|e| {
            tracing::warn!(error = %e, "image prune failed");
            Status::internal(format!("failed to prune images: {e}"))
        })?;
        tracing::info!(
            images = report.images,
            layers = report.layers,
            blobs = report.blobs,
            bytes = report.bytes,
            "pruned unused images on request"
        );
        let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        Ok(Response::new(pb::PruneResponse {
            images: count(report.images),
            layers: count(report.layers),
            blobs: count(report.blobs),
            bytes: report.bytes,
        }))
    }
}

fn exec_status(e: crate::exec::ExecError) -> Status {
    use crate::exec::ExecError;
    let message = e.to_string();
    match e {
        ExecError::Invalid(_) => Status::invalid_argument(message),
        ExecError::NotFound(_) => Status::not_found(message),
        ExecError::NotRunning(_) => Status::failed_precondition(message),
        ExecError::Unavailable(_) => Status::unavailable(message),
        ExecError::Timeout(_) => Status::deadline_exceeded(message),
        ExecError::Internal(_) => Status::internal(message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn last_lines_counts_from_the_end_with_or_without_a_final_newline() {
        assert_eq!(last_lines(b"a\nb\nc\n", 2), b"b\nc\n");
        assert_eq!(last_lines(b"a\nb\nc", 2), b"b\nc");
        assert_eq!(last_lines(b"a\nb\n", 5), b"a\nb\n");
        assert_eq!(last_lines(b"a\nb\n", 0), b"a\nb\n");
    }

    #[test]
    fn rotation_keeps_one_old_file_and_the_writer_appends_at_the_new_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = log_path(dir.path(), "stdout");
        let mut writer = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap();
        writer.write_all(b"one\ntwo\n").unwrap();
        assert!(rotate(dir.path(), 100).is_empty(), "small logs stay");
        assert_eq!(rotate(dir.path(), 4), ["stdout"]);
        writer.write_all(b"three\n").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"three\n");
        assert_eq!(
            fs::read(rotated_path(dir.path(), "stdout")).unwrap(),
            b"one\ntwo\n"
        );
        let filter = LogFilter {
            tail: 2,
            ..LogFilter::default()
        };
        let (text, offset) = snapshot(dir.path(), "stdout", filter);
        assert_eq!((text.as_slice(), offset), (&b"two\nthree\n"[..], 6));
    }

    #[test]
    fn reading_new_output_starts_over_after_a_truncation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.log");
        fs::write(&path, "abc\n").unwrap();
        let mut offset = 0;
        assert_eq!(read_new(&path, &mut offset), b"abc\n");
        assert!(read_new(&path, &mut offset).is_empty());
        fs::write(&path, "d\n").unwrap();
        assert_eq!(read_new(&path, &mut offset), b"d\n");
    }

    #[tokio::test]
    async fn logs_of_a_retired_replica_are_served_from_the_kept_logs_without_following() {
        use tokio_stream::StreamExt;
        let dir = tempfile::tempdir().unwrap();
        let (allocs, kept) = (dir.path().join("allocs"), dir.path().join("logs"));
        fs::create_dir_all(&allocs).unwrap();
        fs::create_dir_all(kept.join("a1")).unwrap();
        fs::write(log_path(&kept.join("a1"), "stderr"), "bye\n").unwrap();
        let service = LogService::new(allocs).with_kept_logs(kept);
        let request = |id: &str| {
            Request::new(pb::LogsRequest {
                alloc_id: id.into(),
                follow: true,
                ..Default::default()
            })
        };
        let mut stream = service.logs(request("a1")).await.unwrap().into_inner();
        let mut stderr = Vec::new();
        // Ends by itself: a retired replica writes nothing more.
        let ended = tokio::time::timeout(Duration::from_secs(5), async {
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.unwrap();
                if chunk.stream == "stderr" {
                    stderr.extend(chunk.data);
                }
            }
        })
        .await;
        assert!(
            ended.is_ok(),
            "following a retired replica's logs never ended"
        );
        assert_eq!(stderr, b"bye\n");
        let missing = service.logs(request("a2")).await.err().unwrap();
        assert_eq!(missing.code(), tonic::Code::NotFound);
    }

    #[tokio::test]
    async fn following_streams_new_lines_and_ends_when_the_replica_is_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let alloc = dir.path().to_path_buf();
        fs::write(alloc.join(RECORD_FILE), "{}").unwrap();
        fs::write(log_path(&alloc, "stdout"), "old\n").unwrap();
        let (tx, mut rx) = mpsc::channel(16);
        let request = pb::LogsRequest {
            alloc_id: "a".into(),
            follow: true,
            ..Default::default()
        };
        let task = tokio::spawn(stream_logs(alloc.clone(), request, tx));
        let first = rx.recv().await.unwrap().unwrap();
        assert_eq!(
            (first.stream.as_str(), first.data.as_slice()),
            ("stdout", &b"old\n"[..])
        );
        let mut out = fs::OpenOptions::new()
            .append(true)
            .open(log_path(&alloc, "stdout"))
            .unwrap();
        out.write_all(b"new\npart").unwrap();
        let mut got = Vec::new();
        while !got.ends_with(b"new\n") {
            got.extend(rx.recv().await.unwrap().unwrap().data);
        }
        assert_eq!(got, b"new\n", "the partial line waits");
        fs::remove_file(alloc.join(RECORD_FILE)).unwrap();
        let mut rest = Vec::new();
        while let Some(chunk) = rx.recv().await {
            rest.extend(chunk.unwrap().data);
        }
        assert_eq!(rest, b"part", "flushed when the replica is gone");
        task.await.unwrap();
    }

    #[test]
    fn since_and_timestamps_use_the_marks_of_the_rotated_and_current_logs() {
        use crate::log_times::{append_mark, marks_path, rotated_marks_path};
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        fs::write(rotated_path(d, "stdout"), "old1\nold2\n").unwrap();
        append_mark(&rotated_marks_path(d, "stdout"), 5, 1_000).unwrap();
        append_mark(&rotated_marks_path(d, "stdout"), 10, 2_000).unwrap();
        fs::write(log_path(d, "stdout"), "new1\nnew2\n").unwrap();
        append_mark(&marks_path(d, "stdout"), 5, 3_000).unwrap();
        append_mark(&marks_path(d, "stdout"), 10, 4_000).unwrap();
        let since = |since_ms: u64, tail: usize| {
            let filter = LogFilter {
                tail,
                since_ms,
                timestamps: false,
            };
            String::from_utf8(snapshot(d, "stdout", filter).0).unwrap()
        };
        assert_eq!(since(2_000, 0), "old2\nnew1\nnew2\n");
        assert_eq!(since(3_500, 0), "new2\n");
        assert_eq!(since(1_500, 2), "new1\nnew2\n", "tail after since");
        let filter = LogFilter {
            tail: 1,
            since_ms: 0,
            timestamps: true,
        };
        let (text, offset) = snapshot(d, "stdout", filter);
        assert_eq!(
            (String::from_utf8(text).unwrap().as_str(), offset),
            ("1970-01-01T00:00:04.000Z new2\n", 10)
        );
    }
}
