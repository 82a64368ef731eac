//! Counts HTTP/1.1 messages in the two byte streams of a proxied
//! connection as they pass, without buffering or allocating: requests in
//! what the client sends, and responses (with those of a 5xx status) in
//! what the replica answers. Both sides are one small state machine over
//! message framing (start line, headers, `Content-Length` or chunked body).
//! Anything it does not understand (an upgrade, `CONNECT`, a malformed
//! head, a response body that ends only at close) makes it stop counting
//! for the rest of the connection rather than guess.
//!
//! Responses to `HEAD` have no body whatever their headers say, so the
//! request side notes in a [`HeadQueue`], in order, which requests were
//! `HEAD`, and the response side takes one note per final response. That
//! is approximate: requests the request side no longer parses (after it
//! stopped counting) or beyond 64 outstanding pipelined ones leave no
//! note, and a response without a note is taken to answer a method other
//! than `HEAD`. A `HEAD` response mistaken that way has its announced body
//! length skipped in the next response's bytes; the counter then almost
//! always lands on bytes that are not a status line and stops counting.

/// Longest line prefix kept to recognise start lines and framing headers.
const KEEP: usize = 40;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before a start line; blank lines between messages are skipped.
    Idle,
    /// Inside the request or status line.
    StartLine,
    /// Inside the header block, at the start of a line or within one.
    Header,
    /// Body bytes still to pass.
    Body(u64),
    /// Hex digits of a chunk size line (and any extension up to LF).
    ChunkSize,
    /// Chunk data still to pass, then its CRLF.
    ChunkData(u64),
    ChunkDataEnd,
    /// Trailer lines after the last chunk, until an empty line.
    Trailer,
    /// Not counted any more (upgrade, CONNECT, body until close, or
    /// unparseable).
    Opaque,
}

/// Which stream a [`Framer`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Request,
    Response,
}

/// Which of the requests still awaiting their final response were `HEAD`,
/// oldest first; at most 64 are remembered (later ones leave no note).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct HeadQueue {
    bits: u64,
    len: u32,
}

impl HeadQueue {
    fn push(&mut self, head: bool) {
        if self.len < u64::BITS {
            self.bits |= u64::from(head) << self.len;
            self.len += 1;
        }
    }

    /// Whether the oldest outstanding request was `HEAD` (`false` when no
    /// note is left).
    fn pop(&mut self) -> bool {
        if self.len == 0 {
            return false;
        }
        let head = self.bits & 1 == 1;
        self.bits >>= 1;
        self.len -= 1;
        head
    }
}

/// Messages that started in the bytes fed to a counter.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    /// Requests, or final responses (1xx other than 101 are interim and
    /// not counted).
    pub messages: u64,
    /// Responses with a 5xx status.
    pub errors: u64,
    /// Final responses by status class, in the order they ended (1xx is
    /// 101 Switching Protocols); at most [`Seen::CLASSES_KEPT`] kept.
    pub classes: [u8; Seen::CLASSES_KEPT],
}

impl Seen {
    /// Responses whose status class is kept per write (more in one write
    /// are counted, their classes not).
    pub const CLASSES_KEPT: usize = 16;

    /// The status classes (1..=5) of the responses that ended, in order.
    pub fn classes(&self) -> impl Iterator<Item = u8> + '_ {
        let kept = usize::try_from(self.messages)
            .map_or(Self::CLASSES_KEPT, |n| n.min(Self::CLASSES_KEPT));
        self.classes[..kept].iter().copied()
    }
}

/// The framing state machine shared by both sides.
#[derive(Debug)]
struct Framer {
    side: Side,
    state: State,
    /// The start of the current line; header lines lowercased.
    line: [u8; KEEP],
    line_len: usize,
    /// Bytes in the current line, including those not kept.
    line_total: usize,
    content_length: Option<u64>,
    chunked: bool,
    upgrade: bool,
    chunk_size: u64,
    chunk_ext: bool,
    trailer_blank: bool,
    /// The status of the response being read.
    status: u16,
    /// The response has no body (1xx, 204, 304, or it answers `HEAD`).
    bodiless: bool,
}

impl Framer {
    fn new(side: Side) -> Self {
        Self {
            side,
            state: State::Idle,
            line: [0; KEEP],
            line_len: 0,
            line_total: 0,
            content_length: None,
            chunked: false,
            upgrade: false,
            chunk_size: 0,
            chunk_ext: false,
            trailer_blank: true,
            status: 0,
            bodiless: false,
        }
    }

    fn feed(&mut self, mut data: &[u8], heads: &mut HeadQueue) -> Seen {
        let mut seen = Seen::default();
        while !data.is_empty() {
            match self.state {
                State::Opaque => return seen,
                State::Body(left) => {
                    let n = (data.len() as u64).min(left);
                    data = &data[n as usize..];
                    self.state = if left == n {
                        State::Idle
                    } else {
                        State::Body(left - n)
                    };
                }
                State::ChunkData(left) => {
                    let n = (data.len() as u64).min(left);
                    data = &data[n as usize..];
                    self.state = if left == n {
                        State::ChunkDataEnd
                    } else {
                        State::ChunkData(left - n)
                    };
                }
                _ => {
                    let byte = data[0];
                    data = &data[1..];
                    self.byte(byte, heads, &mut seen);
                }
            }
        }
        seen
    }

    /// One byte of a line-oriented state.
    fn byte(&mut self, b: u8, heads: &mut HeadQueue, seen: &mut Seen) {
        match self.state {
            State::Idle => {
                if b == b'\r' || b == b'\n' {
                    return;
                }
                let plausible = match self.side {
                    Side::Request => b.is_ascii_uppercase(),
                    Side::Response => b == b'H',
                };
                if !plausible {
                    self.state = State::Opaque;
                    return;
                }
                if self.side == Side::Request {
                    seen.messages += 1;
                }
                self.state = State::StartLine;
                self.content_length = None;
                self.chunked = false;
                self.upgrade = false;
                self.bodiless = false;
                self.start_line();
                self.keep(b);
            }
            State::StartLine => {
                if b != b'\n' {
                    self.keep(b);
                    return;
                }
                match self.side {
                    Side::Request => self.request_line(heads),
                    Side::Response => self.status_line(heads, seen),
                }
                if self.state == State::StartLine {
                    self.state = State::Header;
                    self.start_line();
                }
            }
            State::Header => {
                if b != b'\n' {
                    self.keep(b.to_ascii_lowercase());
                    return;
                }
                if self.line_len == 0 || (self.line_len == 1 && self.line[0] == b'\r') {
                    self.end_of_head();
                } else {
                    self.header_line();
                    self.start_line();
                }
            }
            State::ChunkSize => {
                if b == b'\n' {
                    self.state = if self.chunk_size == 0 {
                        self.trailer_blank = true;
                        State::Trailer
                    } else {
                        State::ChunkData(self.chunk_size)
                    };
                } else if !self.chunk_ext {
                    match (b as char).to_digit(16) {
                        Some(d) => match self
                            .chunk_size
                            .checked_mul(16)
                            .and_then(|s| s.checked_add(u64::from(d)))
                        {
                            Some(size) => self.chunk_size = size,
                            None => self.state = State::Opaque,
                        },
                        None if b == b';' || b == b'\r' || b == b' ' || b == b'\t' => {
                            self.chunk_ext = true;
                        }
                        None => self.state = State::Opaque,
                    }
                }
            }
            State::ChunkDataEnd => {
                if b == b'\n' {
                    self.begin_chunk();
                } else if b != b'\r' {
                    self.state = State::Opaque;
                }
            }
            State::Trailer => {
                if b == b'\n' {
                    if self.trailer_blank {
                        self.state = State::Idle;
                    }
                    self.trailer_blank = true;
                } else if b != b'\r' {
                    self.trailer_blank = false;
                }
            }
            State::Body(_) | State::ChunkData(_) | State::Opaque => {}
        }
    }

    fn request_line(&mut self, heads: &mut HeadQueue) {
        if self.line_starts_with(b"CONNECT ") {
            self.state = State::Opaque;
        } else {
            heads.push(self.line_starts_with(b"HEAD "));
        }
    }

    /// `HTTP/1.x SSS[ reason]`: a final status counts a response and takes
    /// the note of the request it answers; anything else stops counting.
    fn status_line(&mut self, heads: &mut HeadQueue, seen: &mut Seen) {
        let line = &self.line[..self.line_len];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let status = match line {
            [b'H', b'T', b'T', b'P', b'/', b'1', b'.', v, b' ', s @ (b'1'..=b'5'), t, u, rest @ ..]
                if v.is_ascii_digit()
                    && t.is_ascii_digit()
                    && u.is_ascii_digit()
                    && (rest.is_empty() || rest[0] == b' ') =>
            {
                u16::from(s - b'0') * 100 + u16::from(t - b'0') * 10 + u16::from(u - b'0')
            }
            _ => {
                self.state = State::Opaque;
                return;
            }
        };
        self.status = status;
        let interim = (100..200).contains(&status) && status != 101;
        if !interim {
            if let Some(class) = usize::try_from(seen.messages)
                .ok()
                .and_then(|i| seen.classes.get_mut(i))
            {
                *class = u8::try_from(status / 100).unwrap_or(5);
            }
            seen.messages += 1;
            if status >= 500 {
                seen.errors += 1;
            }
            self.bodiless = heads.pop();
        }
        self.bodiless |= interim || status == 204 || status == 304;
    }

    fn start_line(&mut self) {
        self.line_len = 0;
        self.line_total = 0;
    }

    fn keep(&mut self, b: u8) {
        if self.line_len < KEEP {
            self.line[self.line_len] = b;
            self.line_len += 1;
        }
        self.line_total += 1;
    }

    fn line_starts_with(&self, prefix: &[u8]) -> bool {
        self.line[..self.line_len].starts_with(prefix)
    }

    /// The value of the kept header line if its (lowercased) name is `name`.
    fn value_of(&self, name: &[u8]) -> Option<&[u8]> {
        let line = &self.line[..self.line_len];
        let rest = line.strip_prefix(name)?.strip_prefix(b":")?;
        Some(rest.trim_ascii())
    }

    fn header_line(&mut self) {
        if let Some(v) = self.value_of(b"content-length") {
            match std::str::from_utf8(v).ok().and_then(|v| v.parse().ok()) {
                Some(n) if self.line_total <= KEEP => self.content_length = Some(n),
                _ => self.state = State::Opaque,
            }
        } else if let Some(v) = self.value_of(b"transfer-encoding") {
            // Chunked is always the last coding; a value too long to keep
            // is not understood.
            if v.ends_with(b"chunked") && self.line_total <= KEEP {
                self.chunked = true;
            } else {
                self.state = State::Opaque;
            }
        } else if self.value_of(b"upgrade").is_some() {
            self.upgrade = true;
        }
    }

    fn end_of_head(&mut self) {
        self.state = match self.side {
            // A request without framing headers has no body.
            Side::Request if self.upgrade => State::Opaque,
            // The connection is another protocol from here on.
            Side::Response if self.status == 101 => State::Opaque,
            Side::Response if self.bodiless => State::Idle,
            _ if self.chunked => {
                self.begin_chunk();
                return;
            }
            _ => match self.content_length {
                Some(0) => State::Idle,
                Some(n) => State::Body(n),
                None if self.side == Side::Request => State::Idle,
                // A response body delimited by the connection's close:
                // nothing follows it.
                None => State::Opaque,
            },
        };
    }

    fn begin_chunk(&mut self) {
        self.chunk_size = 0;
        self.chunk_ext = false;
        self.state = State::ChunkSize;
    }
}

/// The request counter of one client connection.
#[derive(Debug)]
pub struct RequestCounter {
    framer: Framer,
    heads: HeadQueue,
}

impl Default for RequestCounter {
    fn default() -> Self {
        Self {
            framer: Framer::new(Side::Request),
            heads: HeadQueue::default(),
        }
    }
}

impl RequestCounter {
    /// Feeds the next bytes from the client; returns how many requests
    /// started in them.
    pub fn feed(&mut self, data: &[u8]) -> u64 {
        self.framer.feed(data, &mut self.heads).messages
    }

    /// Which requests seen so far were `HEAD`, for the response counter.
    pub fn heads(&mut self) -> &mut HeadQueue {
        &mut self.heads
    }
}

/// The response counter of one connection to a replica.
#[derive(Debug)]
pub struct ResponseCounter {
    framer: Framer,
}

impl Default for ResponseCounter {
    fn default() -> Self {
        Self {
            framer: Framer::new(Side::Response),
        }
    }
}

impl ResponseCounter {
    /// Feeds the next bytes from the replica; `heads` are the notes of the
    /// request counter on the same connection. Returns the final responses
    /// (and 5xx among them) whose status line ended in these bytes.
    pub fn feed(&mut self, data: &[u8], heads: &mut HeadQueue) -> Seen {
        self.framer.feed(data, heads)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count_in_pieces(stream: &[u8], piece: usize) -> u64 {
        let mut c = RequestCounter::default();
        stream.chunks(piece).map(|p| c.feed(p)).sum()
    }

    #[test]
    fn keep_alive_requests_are_counted_however_the_bytes_are_split() {
        let stream = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET /x HTTP/1.1\r\nHost: a\r\n\r\nHEAD / HTTP/1.1\r\n\r\n";
        for piece in [1, 2, 3, 7, stream.len()] {
            assert_eq!(count_in_pieces(stream, piece), 3, "piece {piece}");
        }
    }

    #[test]
    fn a_body_that_looks_like_a_request_is_not_counted() {
        let body = b"GET /not-a-request HTTP/1.1\r\n\r\n";
        let mut stream =
            format!("POST /a HTTP/1.1\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
        stream.extend_from_slice(body);
        stream.extend_from_slice(b"GET /b HTTP/1.1\r\n\r\n");
        for piece in [1, 5, stream.len()] {
            assert_eq!(count_in_pieces(&stream, piece), 2, "piece {piece}");
        }
    }

    #[test]
    fn chunked_bodies_with_trailers_are_skipped() {
        let stream = b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n4;ext=1\r\nGET \r\n0\r\nX-T: 1\r\n\r\nGET /b HTTP/1.1\r\n\r\n";
        for piece in [1, 3, stream.len()] {
            assert_eq!(count_in_pieces(stream, piece), 2, "piece {piece}");
        }
    }

    #[test]
    fn upgrades_and_garbage_stop_the_count() {
        let upgrade = b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\n\r\nGET / HTTP/1.1\r\n\r\n";
        assert_eq!(count_in_pieces(upgrade, 4), 1);
        assert_eq!(count_in_pieces(b"\x16\x03\x01binary", 3), 0);
        assert_eq!(
            count_in_pieces(b"CONNECT a:443 HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\n\r\n", 2),
            1
        );
    }

    /// Responses and 5xx in `stream` fed in the given pieces, no request
    /// having been `HEAD`.
    fn responses_in(pieces: &[&[u8]]) -> (u64, u64) {
        let mut c = ResponseCounter::default();
        let mut heads = HeadQueue::default();
        let mut total = Seen::default();
        for piece in pieces {
            let seen = c.feed(piece, &mut heads);
            total.messages += seen.messages;
            total.errors += seen.errors;
        }
        (total.messages, total.errors)
    }

    /// Every split of `stream` in two, and byte by byte.
    fn assert_responses_however_split(stream: &[u8], expected: (u64, u64)) {
        for at in 0..=stream.len() {
            let (a, b) = stream.split_at(at);
            assert_eq!(responses_in(&[a, b]), expected, "split at {at}");
        }
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(responses_in(&bytes), expected, "byte by byte");
    }

    #[test]
    fn responses_and_server_errors_are_counted_at_every_split() {
        let stream: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 18\r\n\r\nHTTP/1.1 500 x\r\n\r\n\
            HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/plain\r\ncontent-length:0\r\n\r\n\
            HTTP/1.1 304 Not Modified\r\nContent-Length: 1234\r\n\r\n\
            HTTP/1.0 404 Not Found\r\nContent-Length: 3\r\n\r\nno\n\
            HTTP/1.1 503\r\nContent-Length: 2\r\n\r\n:(";
        assert_responses_however_split(stream, (5, 2));
    }

    #[test]
    fn chunked_responses_are_counted_at_every_split() {
        let stream: &[u8] = b"HTTP/1.1 502 Bad Gateway\r\nTransfer-Encoding: chunked\r\n\r\n\
            11;ext=\"a\"\r\nHTTP/1.1 200 OK\r\n\r\n3\r\nabc\r\n0\r\nX-Trailer: 1\r\n\r\n\
            HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n\
            HTTP/1.1 204 No Content\r\n\r\n";
        assert_responses_however_split(stream, (3, 1));
    }

    #[test]
    fn interim_responses_are_not_counted() {
        let stream: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n\
            HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n\
            HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok\
            HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n";
        assert_responses_however_split(stream, (2, 1));
    }

    #[test]
    fn responses_to_head_requests_have_no_body() {
        let mut requests = RequestCounter::default();
        let sent = requests
            .feed(b"HEAD /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\nHEAD /c HTTP/1.1\r\n\r\n");
        assert_eq!(sent, 3);
        let mut responses = ResponseCounter::default();
        let seen = responses.feed(
            b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n\
              HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok\
              HTTP/1.1 503 Busy\r\nContent-Length: 100\r\n\r\n",
            requests.heads(),
        );
        assert_eq!((seen.messages, seen.errors), (3, 1));
        assert_eq!(seen.classes().collect::<Vec<_>>(), [2, 2, 5]);
        assert_eq!(*requests.heads(), HeadQueue::default());
    }

    #[test]
    fn a_response_counter_out_of_sync_stops_counting() {
        // A body delimited by close, a protocol switch, a bad chunk size,
        // and bytes that are no status line: nothing after them counts.
        let until_close = b"HTTP/1.1 200 OK\r\n\r\nHTTP/1.1 500 x\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(responses_in(&[until_close]), (1, 0));
        let switched =
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\nHTTP/1.1 500 x\r\n\r\n";
        assert_eq!(responses_in(&[switched]), (1, 0));
        let bad_chunk =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nHTTP/1.1 500 x\r\n\r\n";
        assert_eq!(responses_in(&[bad_chunk]), (1, 0));
        assert_eq!(responses_in(&[b"HTTP/2 500 x\r\n\r\n"]), (0, 0));
        assert_eq!(responses_in(&[b"HTTP/1.1 5000 x\r\n\r\n"]), (0, 0));
        assert_eq!(responses_in(&[b"\x16\x03\x01binary"]), (0, 0));
        let bad_length = b"HTTP/1.1 200 OK\r\nContent-Length: many\r\n\r\nHTTP/1.1 500 x\r\n\r\n";
        assert_eq!(responses_in(&[bad_length]), (1, 0));
    }

    #[test]
    fn head_notes_beyond_sixty_four_are_dropped() {
        let mut heads = HeadQueue::default();
        for _ in 0..70 {
            heads.push(true);
        }
        assert!((0..64).all(|_| heads.pop()));
        assert!(!heads.pop());
    }
}

/// Whether `bytes` hold exactly complete HTTP/1.x request heads without
/// bodies, all with idempotent methods: such requests may be sent again to
/// another replica if the first closed without answering.
pub fn is_replayable(bytes: &[u8]) -> bool {
    const IDEMPOTENT: [&[u8]; 5] = [b"GET ", b"HEAD ", b"OPTIONS ", b"DELETE ", b"TRACE "];
    if !bytes.ends_with(b"\r\n\r\n") {
        return false;
    }
    let mut rest = bytes;
    while !rest.is_empty() {
        let Some(end) = rest.windows(4).position(|w| w == b"\r\n\r\n") else {
            return false;
        };
        let head = &rest[..end];
        if !IDEMPOTENT.iter().any(|m| head.starts_with(m)) {
            return false;
        }
        let lower = String::from_utf8_lossy(head).to_ascii_lowercase();
        if lower.contains("\r\ncontent-length:") && !lower.contains("\r\ncontent-length: 0")
            || lower.contains("\r\ntransfer-encoding:")
        {
            return false;
        }
        rest = &rest[end + 4..];
    }
    true
}

#[cfg(test)]
mod replay_tests {
    use super::is_replayable;

    #[test]
    fn only_complete_bodiless_idempotent_requests_are_replayable() {
        assert!(is_replayable(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"));
        assert!(is_replayable(
            b"GET /a HTTP/1.1\r\n\r\nHEAD /b HTTP/1.1\r\n\r\n"
        ));
        assert!(!is_replayable(
            b"POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n"
        ));
        assert!(!is_replayable(b"GET / HTTP/1.1\r\nHost: a\r\n"));
        assert!(!is_replayable(
            b"DELETE / HTTP/1.1\r\nContent-Length: 5\r\n\r\n"
        ));
        assert!(!is_replayable(
            b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        ));
        assert!(!is_replayable(b"\x16\x03\x01binary"));
    }
}
