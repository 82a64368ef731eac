//! Counts HTTP/1.1 requests in a client's byte stream as it passes, without
//! buffering or allocating: a small state machine over request framing
//! (request line, headers, `Content-Length` or chunked body). Anything it
//! does not understand (an upgrade, `CONNECT`, a malformed head) makes it
//! stop counting for the rest of the connection rather than guess.

/// Longest header line prefix kept to recognise the framing headers.
const KEEP: usize = 40;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before a request line; blank lines between requests are skipped.
    Idle,
    /// Inside the request line.
    RequestLine,
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
    /// Not counted any more (upgrade, CONNECT or unparseable).
    Opaque,
}

/// The request counter of one client connection.
#[derive(Debug)]
pub struct RequestCounter {
    state: State,
    /// The start of the current line, lowercased (header names).
    line: [u8; KEEP],
    line_len: usize,
    /// Bytes in the current line, including those not kept.
    line_total: usize,
    content_length: u64,
    chunked: bool,
    upgrade: bool,
    chunk_size: u64,
    chunk_ext: bool,
    trailer_blank: bool,
}

impl Default for RequestCounter {
    fn default() -> Self {
        Self {
            state: State::Idle,
            line: [0; KEEP],
            line_len: 0,
            line_total: 0,
            content_length: 0,
            chunked: false,
            upgrade: false,
            chunk_size: 0,
            chunk_ext: false,
            trailer_blank: true,
        }
    }
}

impl RequestCounter {
    /// Feeds the next bytes from the client; returns how many requests
    /// started in them.
    pub fn feed(&mut self, mut data: &[u8]) -> u64 {
        let mut started = 0;
        while !data.is_empty() {
            match self.state {
                State::Opaque => return started,
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
                    if self.byte(byte) {
                        started += 1;
                    }
                }
            }
        }
        started
    }

    /// One byte of a line-oriented state; `true` when a request starts.
    fn byte(&mut self, b: u8) -> bool {
        match self.state {
            State::Idle => {
                if b == b'\r' || b == b'\n' {
                    return false;
                }
                if !b.is_ascii_uppercase() {
                    self.state = State::Opaque;
                    return false;
                }
                self.state = State::RequestLine;
                self.content_length = 0;
                self.chunked = false;
                self.upgrade = false;
                self.start_line();
                self.keep(b);
                true
            }
            State::RequestLine => {
                if b == b'\n' {
                    if self.line_starts_with(b"CONNECT ") {
                        self.state = State::Opaque;
                    } else {
                        self.state = State::Header;
                        self.start_line();
                    }
                } else {
                    self.keep(b);
                }
                false
            }
            State::Header => {
                if b != b'\n' {
                    self.keep(b.to_ascii_lowercase());
                    return false;
                }
                if self.line_len == 0 || (self.line_len == 1 && self.line[0] == b'\r') {
                    self.end_of_head();
                } else {
                    self.header_line();
                    self.start_line();
                }
                false
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
                false
            }
            State::ChunkDataEnd => {
                if b == b'\n' {
                    self.begin_chunk();
                } else if b != b'\r' {
                    self.state = State::Opaque;
                }
                false
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
                false
            }
            State::Body(_) | State::ChunkData(_) | State::Opaque => false,
        }
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
                Some(n) if self.line_total <= KEEP => self.content_length = n,
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
        self.state = if self.upgrade {
            State::Opaque
        } else if self.chunked {
            self.begin_chunk();
            return;
        } else if self.content_length > 0 {
            State::Body(self.content_length)
        } else {
            State::Idle
        };
    }

    fn begin_chunk(&mut self) {
        self.chunk_size = 0;
        self.chunk_ext = false;
        self.state = State::ChunkSize;
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
