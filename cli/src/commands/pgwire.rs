//! The smallest PostgreSQL client `skiff bench stateful` needs: protocol 3.0
//! over one blocking TCP connection, trust authentication only, simple
//! queries whose result is the first column of the last row. Enough to tell
//! a served request from a failed one, and why it failed; not a driver (no
//! passwords, no TLS, no extended protocol).
//!
//! A backend message is a type byte, an i32 length counting itself and the
//! body, and the body; the startup message has no type byte.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// Why a request failed, in words a bench can count by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PgError {
    /// Connecting failed: refused, reset, unreachable, timed out.
    Connect(io::ErrorKind),
    /// Reading or writing an open connection failed (a timeout too).
    Io(io::ErrorKind),
    /// The server closed the connection before ReadyForQuery.
    Closed,
    /// An ErrorResponse: its severity, SQLSTATE code and message.
    Server(String),
    /// Bytes this client does not understand.
    Protocol(String),
}

impl std::fmt::Display for PgError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PgError::Connect(kind) => write!(f, "connect: {kind}"),
            PgError::Io(kind) if is_timeout(*kind) => write!(f, "timeout"),
            PgError::Io(kind) => write!(f, "io: {kind}"),
            PgError::Closed => write!(f, "closed by the server"),
            PgError::Server(text) => write!(f, "server: {text}"),
            PgError::Protocol(text) => write!(f, "protocol: {text}"),
        }
    }
}

fn is_timeout(kind: io::ErrorKind) -> bool {
    matches!(kind, io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock)
}

impl From<io::Error> for PgError {
    fn from(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            PgError::Closed
        } else {
            PgError::Io(e.kind())
        }
    }
}

/// One backend (server) message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// 'R' with code 0.
    AuthenticationOk,
    /// 'R' with any other code (a password or SASL is asked for).
    AuthenticationOther(i32),
    /// 'S': a run-time parameter.
    ParameterStatus(String, String),
    /// 'K': the key to cancel this session's queries (unused here).
    BackendKeyData,
    /// 'Z' with the transaction status byte.
    ReadyForQuery(u8),
    /// 'T': the result's columns (their names are not needed).
    RowDescription,
    /// 'D': one row; `None` is NULL.
    DataRow(Vec<Option<String>>),
    /// 'C': the command tag, e.g. `INSERT 0 1`.
    CommandComplete(String),
    /// 'E': severity, code and message.
    Error(String),
    /// 'N'
    Notice,
    /// 'I': the query was empty.
    EmptyQueryResponse,
    /// Any other type byte, skipped.
    Other(u8),
}

/// The startup message for protocol 3.0 as `user` on `database`.
pub fn startup(user: &str, database: &str) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&196_608_i32.to_be_bytes()); // 3 << 16 | 0
    for (key, value) in [("user", user), ("database", database)] {
        cstr(&mut body, key);
        cstr(&mut body, value);
    }
    body.push(0);
    with_length(None, body)
}

/// A simple Query message.
pub fn query(sql: &str) -> Vec<u8> {
    let mut body = Vec::new();
    cstr(&mut body, sql);
    with_length(Some(b'Q'), body)
}

/// The Terminate message.
pub fn terminate() -> Vec<u8> {
    with_length(Some(b'X'), Vec::new())
}

fn cstr(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(s.as_bytes());
    out.push(0);
}

fn with_length(kind: Option<u8>, body: Vec<u8>) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 5);
    out.extend(kind);
    // Messages built here are a few hundred bytes at most.
    let length = i32::try_from(body.len() + 4).unwrap_or(i32::MAX);
    out.extend_from_slice(&length.to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// Splits the first whole message off `buf`: `Ok(None)` if more bytes are
/// needed, else the message and how many bytes it took.
pub fn split(buf: &[u8]) -> Result<Option<(Message, usize)>, PgError> {
    let Some(header) = buf.get(..5) else {
        return Ok(None);
    };
    let kind = header[0];
    let length = i32::from_be_bytes([header[1], header[2], header[3], header[4]]);
    let length = usize::try_from(length)
        .ok()
        .filter(|l| *l >= 4)
        .ok_or_else(|| {
            PgError::Protocol(format!("message '{}' of length {length}", kind as char))
        })?;
    let Some(body) = buf.get(5..1 + length) else {
        return Ok(None);
    };
    Ok(Some((parse(kind, body)?, 1 + length)))
}

/// A backend message from its type byte and body.
pub fn parse(kind: u8, body: &[u8]) -> Result<Message, PgError> {
    let short = || PgError::Protocol(format!("short '{}' message", kind as char));
    Ok(match kind {
        b'R' => {
            let code = body.get(..4).ok_or_else(short)?;
            match i32::from_be_bytes([code[0], code[1], code[2], code[3]]) {
                0 => Message::AuthenticationOk,
                other => Message::AuthenticationOther(other),
            }
        }
        b'S' => {
            let mut fields = cstrs(body);
            let name = fields.next().ok_or_else(short)?;
            let value = fields.next().ok_or_else(short)?;
            Message::ParameterStatus(name, value)
        }
        b'K' => Message::BackendKeyData,
        b'Z' => Message::ReadyForQuery(*body.first().ok_or_else(short)?),
        b'T' => Message::RowDescription,
        b'D' => Message::DataRow(data_row(body).ok_or_else(short)?),
        b'C' => Message::CommandComplete(cstrs(body).next().ok_or_else(short)?),
        b'E' => Message::Error(error_text(body)),
        b'N' => Message::Notice,
        b'I' => Message::EmptyQueryResponse,
        other => Message::Other(other),
    })
}

/// The NUL-terminated strings at the start of `body`.
fn cstrs(body: &[u8]) -> impl Iterator<Item = String> + '_ {
    body.split(|b| *b == 0)
        .take(body.iter().filter(|b| **b == 0).count())
        .map(|s| String::from_utf8_lossy(s).into_owned())
}

/// Int16 column count, then per column an Int32 length (-1: NULL) and bytes.
fn data_row(body: &[u8]) -> Option<Vec<Option<String>>> {
    let count = u16::from_be_bytes(body.get(..2)?.try_into().ok()?);
    let mut at = 2;
    let mut columns = Vec::with_capacity(usize::from(count));
    for _ in 0..count {
        let length = i32::from_be_bytes(body.get(at..at + 4)?.try_into().ok()?);
        at += 4;
        match usize::try_from(length) {
            Ok(length) => {
                let value = body.get(at..at + length)?;
                columns.push(Some(String::from_utf8_lossy(value).into_owned()));
                at += length;
            }
            Err(_) => columns.push(None),
        }
    }
    Some(columns)
}

/// "SEVERITY CODE: message" from an ErrorResponse's fields (a type byte and a
/// string each, ended by a zero byte).
fn error_text(body: &[u8]) -> String {
    let (mut severity, mut code, mut message) = (String::new(), String::new(), String::new());
    let mut rest = body;
    while let Some((&field, after)) = rest.split_first() {
        if field == 0 {
            break;
        }
        let end = after.iter().position(|b| *b == 0).unwrap_or(after.len());
        let value = String::from_utf8_lossy(&after[..end]).into_owned();
        match field {
            b'S' => severity = value,
            b'C' => code = value,
            b'M' => message = value,
            _ => {}
        }
        rest = after.get(end + 1..).unwrap_or_default();
    }
    format!("{severity} {code}: {message}")
}

/// An open session, past authentication and ready for a query.
pub struct Session {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Session {
    /// Connects to `addr` and starts a session as `user` on `database`
    /// (trust authentication); `timeout` bounds the connect and every read
    /// and write.
    pub fn connect(
        addr: SocketAddr,
        user: &str,
        database: &str,
        timeout: Duration,
    ) -> Result<Session, PgError> {
        let stream =
            TcpStream::connect_timeout(&addr, timeout).map_err(|e| PgError::Connect(e.kind()))?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        stream.set_nodelay(true)?;
        let mut session = Session {
            stream,
            buf: Vec::with_capacity(1024),
        };
        session.stream.write_all(&startup(user, database))?;
        loop {
            match session.next()? {
                Message::AuthenticationOk
                | Message::ParameterStatus(..)
                | Message::BackendKeyData
                | Message::Notice
                | Message::Other(_) => {}
                Message::ReadyForQuery(_) => return Ok(session),
                Message::Error(text) => return Err(PgError::Server(text)),
                Message::AuthenticationOther(code) => {
                    return Err(PgError::Protocol(format!(
                        "authentication method {code} asked for (only trust is supported)"
                    )))
                }
                other => {
                    return Err(PgError::Protocol(format!(
                        "unexpected {other:?} during startup"
                    )))
                }
            }
        }
    }

    /// Runs `sql` (one or more statements) with the simple query protocol;
    /// the first column of the last row any statement returned.
    pub fn query(&mut self, sql: &str) -> Result<Option<String>, PgError> {
        self.stream.write_all(&query(sql))?;
        let (mut last, mut error) = (None, None);
        loop {
            match self.next()? {
                Message::DataRow(mut columns) if !columns.is_empty() => {
                    last = columns.swap_remove(0);
                }
                // The server sends ReadyForQuery after an error too.
                Message::Error(text) => error = Some(text),
                Message::ReadyForQuery(_) => {
                    return match error {
                        Some(text) => Err(PgError::Server(text)),
                        None => Ok(last),
                    }
                }
                _ => {}
            }
        }
    }

    /// Sends Terminate and closes the connection.
    pub fn terminate(mut self) -> Result<(), PgError> {
        self.stream.write_all(&terminate())?;
        Ok(())
    }

    fn next(&mut self) -> Result<Message, PgError> {
        let mut chunk = [0u8; 4096];
        loop {
            if let Some((message, used)) = split(&self.buf)? {
                self.buf.drain(..used);
                return Ok(message);
            }
            let n = self.stream.read(&mut chunk)?;
            if n == 0 {
                return Err(PgError::Closed);
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(kind: u8, body: &[u8]) -> Vec<u8> {
        with_length(Some(kind), body.to_vec())
    }

    #[test]
    fn startup_message_is_length_protocol_3_then_key_value_pairs() {
        let bytes = startup("postgres", "app");
        let mut expected = vec![0, 0, 0, 36, 0, 3, 0, 0];
        expected.extend_from_slice(b"user\0postgres\0database\0app\0\0");
        assert_eq!(bytes, expected);
    }

    #[test]
    fn query_and_terminate_carry_their_type_byte_and_length() {
        assert_eq!(query("SELECT 1"), b"Q\0\0\0\x0dSELECT 1\0".to_vec());
        assert_eq!(terminate(), b"X\0\0\0\x04".to_vec());
    }

    #[test]
    fn split_waits_for_a_whole_message() {
        let bytes = message(b'Z', b"I");
        assert_eq!(split(&bytes[..3]).unwrap(), None);
        assert_eq!(split(&bytes[..5]).unwrap(), None);
        assert_eq!(
            split(&bytes).unwrap(),
            Some((Message::ReadyForQuery(b'I'), 6))
        );
    }

    #[test]
    fn split_takes_one_message_of_several() {
        let mut bytes = message(b'R', &[0, 0, 0, 0]);
        bytes.extend(message(b'S', b"server_version\x0015.5\0"));
        let (first, used) = split(&bytes).unwrap().unwrap();
        assert_eq!((first, used), (Message::AuthenticationOk, 9));
        let (second, _) = split(&bytes[used..]).unwrap().unwrap();
        assert_eq!(
            second,
            Message::ParameterStatus("server_version".into(), "15.5".into())
        );
    }

    #[test]
    fn a_length_below_four_is_a_protocol_error() {
        assert!(matches!(split(b"Z\0\0\0\x02"), Err(PgError::Protocol(_))));
    }

    #[test]
    fn authentication_other_than_ok_is_reported_with_its_code() {
        // 10: SASL, with the mechanisms after the code.
        let bytes = message(b'R', b"\0\0\0\x0aSCRAM-SHA-256\0\0");
        assert_eq!(
            split(&bytes).unwrap().unwrap().0,
            Message::AuthenticationOther(10)
        );
    }

    #[test]
    fn data_row_reads_values_and_nulls() {
        let body = b"\0\x02\0\0\0\x0242\xff\xff\xff\xff";
        assert_eq!(
            parse(b'D', body).unwrap(),
            Message::DataRow(vec![Some("42".into()), None])
        );
        assert!(matches!(
            parse(b'D', b"\0\x01\0\0\0\x09short"),
            Err(PgError::Protocol(_))
        ));
    }

    #[test]
    fn error_response_keeps_severity_code_and_message() {
        let body =
            b"SFATAL\0VFATAL\0C57P01\0Mterminating connection due to administrator command\0\0";
        assert_eq!(
            parse(b'E', body).unwrap(),
            Message::Error(
                "FATAL 57P01: terminating connection due to administrator command".into()
            )
        );
    }

    #[test]
    fn other_messages_parse_to_their_kind() {
        assert_eq!(
            parse(b'C', b"INSERT 0 1\0").unwrap(),
            Message::CommandComplete("INSERT 0 1".into())
        );
        assert_eq!(parse(b'K', &[0; 8]).unwrap(), Message::BackendKeyData);
        assert_eq!(parse(b'N', b"SNOTICE\0\0").unwrap(), Message::Notice);
        assert_eq!(parse(b'T', b"\0\x01").unwrap(), Message::RowDescription);
        assert_eq!(parse(b'v', b"").unwrap(), Message::Other(b'v'));
    }

    #[test]
    fn a_session_reads_startup_and_a_query_from_a_scripted_server() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut seen = vec![0u8; startup("postgres", "postgres").len()];
            conn.read_exact(&mut seen).unwrap();
            let mut reply = message(b'R', &[0, 0, 0, 0]);
            reply.extend(message(b'S', b"TimeZone\0UTC\0"));
            reply.extend(message(b'K', &[0; 8]));
            reply.extend(message(b'Z', b"I"));
            conn.write_all(&reply).unwrap();
            let mut q = vec![0u8; query("SELECT count(*) FROM t").len()];
            conn.read_exact(&mut q).unwrap();
            // Split across writes, as TCP may deliver it.
            let mut reply = message(
                b'T',
                b"\0\x01count\0\0\0\0\0\0\0\0\0\0\x14\0\x08\xff\xff\xff\xff\0\0",
            );
            reply.extend(message(b'D', b"\0\x01\0\0\0\x017"));
            reply.extend(message(b'C', b"SELECT 1\0"));
            reply.extend(message(b'Z', b"I"));
            let (a, b) = reply.split_at(7);
            conn.write_all(a).unwrap();
            conn.flush().unwrap();
            std::thread::sleep(Duration::from_millis(20));
            conn.write_all(b).unwrap();
            let mut x = [0u8; 5];
            conn.read_exact(&mut x).unwrap();
            x
        });
        let mut session =
            Session::connect(addr, "postgres", "postgres", Duration::from_secs(5)).unwrap();
        assert_eq!(
            session.query("SELECT count(*) FROM t").unwrap(),
            Some("7".into())
        );
        session.terminate().unwrap();
        assert_eq!(server.join().unwrap(), *b"X\0\0\0\x04");
    }
}
