//! A small DNS server over UDP: A records for the cluster's services from
//! [`Names`], NXDOMAIN for unknown names of ours, and every other question
//! relayed as it is to the host's resolvers.
//!
//! Only what a stub resolver sends is understood: one question, standard
//! query. Answers carry no EDNS record (allowed: a client that sent one
//! then knows the server does not speak it) and are far below 512 bytes;
//! relayed answers come back byte for byte, truncation bit included.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::Semaphore;

use super::names::{Names, Resolution, TTL_SECS};

const TYPE_A: u16 = 1;
const TYPE_ANY: u16 = 255;
const CLASS_IN: u16 = 1;
const RCODE_FORMERR: u8 = 1;
const RCODE_SERVFAIL: u8 = 2;
const RCODE_NXDOMAIN: u8 = 3;
/// A relayed question waits this long for each upstream resolver.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// Relayed questions in flight at once; more are answered SERVFAIL, so a
/// flood of external names cannot exhaust the agent's sockets.
const MAX_FORWARDS: usize = 128;

/// One parsed question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pub id: u16,
    /// Recursion desired, echoed in the answer.
    pub rd: bool,
    pub name: String,
    pub qtype: u16,
    pub qclass: u16,
    /// The question section as received, echoed in the answer.
    question: Vec<u8>,
}

/// Parses a standard query with exactly one question; `None` for anything
/// else (answers, other opcodes, compressed or oversized names).
pub fn parse_query(packet: &[u8]) -> Option<Query> {
    if packet.len() < 12 {
        return None;
    }
    let flags = u16::from_be_bytes([packet[2], packet[3]]);
    let is_response = flags & 0x8000 != 0;
    let opcode = (flags >> 11) & 0xf;
    let qdcount = u16::from_be_bytes([packet[4], packet[5]]);
    if is_response || opcode != 0 || qdcount != 1 {
        return None;
    }
    let mut pos = 12;
    let mut labels: Vec<String> = Vec::new();
    loop {
        let len = usize::from(*packet.get(pos)?);
        pos += 1;
        if len == 0 {
            break;
        }
        if len > 63 {
            return None; // a compression pointer or a bad length
        }
        let label = packet.get(pos..pos + len)?;
        labels.push(String::from_utf8_lossy(label).into_owned());
        pos += len;
        if pos > 12 + 255 {
            return None;
        }
    }
    let qtype = u16::from_be_bytes([*packet.get(pos)?, *packet.get(pos + 1)?]);
    let qclass = u16::from_be_bytes([*packet.get(pos + 2)?, *packet.get(pos + 3)?]);
    pos += 4;
    Some(Query {
        id: u16::from_be_bytes([packet[0], packet[1]]),
        rd: flags & 0x0100 != 0,
        name: labels.join("."),
        qtype,
        qclass,
        question: packet[12..pos].to_vec(),
    })
}

/// The answer to `query` for a name of ours: its address for an A (or
/// ANY) question, no record for other types of a name that exists
/// (NODATA: an AAAA question gets an empty answer, not an error, so
/// `getaddrinfo` uses the A record), NXDOMAIN otherwise.
pub fn answer(query: &Query, address: Option<Ipv4Addr>) -> Vec<u8> {
    let rcode = if address.is_some() { 0 } else { RCODE_NXDOMAIN };
    let record = address
        .filter(|_| query.qclass == CLASS_IN && (query.qtype == TYPE_A || query.qtype == TYPE_ANY));
    let mut out = header(query.id, query.rd, rcode, u16::from(record.is_some()));
    out.extend_from_slice(&query.question);
    if let Some(ip) = record {
        out.extend_from_slice(&[0xc0, 12]); // the name: a pointer to the question's
        out.extend_from_slice(&TYPE_A.to_be_bytes());
        out.extend_from_slice(&CLASS_IN.to_be_bytes());
        out.extend_from_slice(&TTL_SECS.to_be_bytes());
        out.extend_from_slice(&4u16.to_be_bytes());
        out.extend_from_slice(&ip.octets());
    }
    out
}

/// An error answer that echoes the query's id and, when it parsed, its
/// question.
fn error(packet: &[u8], query: Option<&Query>, rcode: u8) -> Option<Vec<u8>> {
    let id = u16::from_be_bytes([*packet.first()?, *packet.get(1)?]);
    let mut out = header(id, query.is_some_and(|q| q.rd), rcode, 0);
    if let Some(q) = query {
        out.extend_from_slice(&q.question);
    } else {
        out[5] = 0; // no question section
    }
    Some(out)
}

fn header(id: u16, rd: bool, rcode: u8, answers: u16) -> Vec<u8> {
    // QR, AA, RA; RD echoed.
    let flags: u16 = 0x8000 | 0x0400 | 0x0080 | if rd { 0x0100 } else { 0 } | u16::from(rcode);
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&answers.to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out
}

/// The host's resolvers from a `resolv.conf`, without `skip` (this server).
pub fn upstreams(resolv_conf: &str, skip: Ipv4Addr) -> Vec<SocketAddr> {
    resolv_conf
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|ip| ip.trim().parse::<std::net::IpAddr>().ok())
        .filter(|ip| *ip != std::net::IpAddr::V4(skip))
        .map(|ip| SocketAddr::new(ip, 53))
        .take(3)
        .collect()
}

/// Answers on `socket` until the task is aborted.
pub async fn serve(socket: UdpSocket, names: Arc<RwLock<Names>>, upstreams: Vec<SocketAddr>) {
    let socket = Arc::new(socket);
    let forwards = Arc::new(Semaphore::new(MAX_FORWARDS));
    let upstreams: Arc<[SocketAddr]> = upstreams.into();
    let mut buf = vec![0u8; 1500];
    loop {
        let (len, client) = match socket.recv_from(&mut buf).await {
            Ok(got) => got,
            Err(e) => {
                tracing::debug!(error = %e, "dns receive failed");
                continue;
            }
        };
        let packet = &buf[..len];
        let query = parse_query(packet);
        let reply = match &query {
            None => error(packet, None, RCODE_FORMERR),
            Some(q) => {
                let resolution = names
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .resolve(&q.name);
                match resolution {
                    Resolution::Found(ip) => Some(answer(q, Some(ip))),
                    Resolution::NotFound => Some(answer(q, None)),
                    Resolution::Forward => match forwards.clone().try_acquire_owned() {
                        Ok(permit) => {
                            let (socket, upstreams, packet) =
                                (socket.clone(), upstreams.clone(), packet.to_vec());
                            let q = q.clone();
                            tokio::spawn(async move {
                                let reply = relay(&packet, &upstreams)
                                    .await
                                    .or_else(|| error(&packet, Some(&q), RCODE_SERVFAIL));
                                if let Some(reply) = reply {
                                    let _ = socket.send_to(&reply, client).await;
                                }
                                drop(permit);
                            });
                            None
                        }
                        Err(_) => error(packet, Some(q), RCODE_SERVFAIL),
                    },
                }
            }
        };
        if let Some(reply) = reply {
            let _ = socket.send_to(&reply, client).await;
        }
    }
}

/// Asks each upstream in turn; the first answer with the query's id wins.
async fn relay(packet: &[u8], upstreams: &[SocketAddr]) -> Option<Vec<u8>> {
    for upstream in upstreams {
        let bind: SocketAddr = if upstream.is_ipv4() {
            "0.0.0.0:0".parse().ok()?
        } else {
            "[::]:0".parse().ok()?
        };
        let Ok(socket) = UdpSocket::bind(bind).await else {
            continue;
        };
        if socket.connect(upstream).await.is_err() || socket.send(packet).await.is_err() {
            continue;
        }
        let mut buf = vec![0u8; 4096];
        let deadline = tokio::time::Instant::now() + UPSTREAM_TIMEOUT;
        while let Ok(Ok(len)) = tokio::time::timeout_at(deadline, socket.recv(&mut buf)).await {
            if len >= 2 && buf[..2] == packet[..2] {
                return Some(buf[..len].to_vec());
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A query as `dig` sends it (with an EDNS record after the question).
    fn query(name: &str, qtype: u16) -> Vec<u8> {
        let mut p = vec![0x12, 0x34, 0x01, 0x20, 0, 1, 0, 0, 0, 0, 0, 1];
        for label in name.split('.') {
            p.push(label.len() as u8);
            p.extend_from_slice(label.as_bytes());
        }
        p.push(0);
        p.extend_from_slice(&qtype.to_be_bytes());
        p.extend_from_slice(&CLASS_IN.to_be_bytes());
        p.extend_from_slice(&[0, 0, 41, 4, 208, 0, 0, 0, 0, 0, 0]);
        p
    }

    #[test]
    fn parses_a_stub_resolvers_question() {
        let q = parse_query(&query("db.app.skiff", TYPE_A)).unwrap();
        assert_eq!(
            (q.id, q.rd, q.name.as_str(), q.qtype),
            (0x1234, true, "db.app.skiff", TYPE_A)
        );
        assert!(
            parse_query(&query("x", TYPE_A)[..14]).is_none(),
            "truncated"
        );
        let mut response = query("x", TYPE_A);
        response[2] |= 0x80;
        assert!(parse_query(&response).is_none(), "an answer is no question");
    }

    #[test]
    fn answers_a_with_the_address_and_aaaa_with_nothing() {
        let q = parse_query(&query("web", TYPE_A)).unwrap();
        let a = answer(&q, Some(Ipv4Addr::new(10, 90, 0, 2)));
        assert_eq!(&a[..2], &[0x12, 0x34]);
        assert_eq!(a[3] & 0xf, 0, "NOERROR");
        assert_eq!(u16::from_be_bytes([a[6], a[7]]), 1, "one answer");
        assert_eq!(&a[a.len() - 4..], &[10, 90, 0, 2]);
        let ttl = &a[a.len() - 10..a.len() - 6];
        assert_eq!(u32::from_be_bytes(ttl.try_into().unwrap()), TTL_SECS);

        let q6 = parse_query(&query("web", 28)).unwrap();
        let none = answer(&q6, Some(Ipv4Addr::new(10, 90, 0, 2)));
        assert_eq!((none[3] & 0xf, none[7]), (0, 0), "NODATA");

        let nx = answer(&q, None);
        assert_eq!((nx[3] & 0xf, nx[7]), (RCODE_NXDOMAIN, 0));
    }

    #[test]
    fn upstreams_skip_this_server() {
        let conf = "search x\nnameserver 10.90.0.1\nnameserver 127.0.0.53\nnameserver ::1\n";
        let got = upstreams(conf, Ipv4Addr::new(10, 90, 0, 1));
        assert_eq!(got.len(), 2);
        assert_eq!(got[0], "127.0.0.53:53".parse().unwrap());
    }

    #[tokio::test]
    async fn serves_over_udp_and_relays_other_names() {
        // A fake upstream resolver on loopback: answers anything with
        // rcode 5 (REFUSED), so the relay is visible.
        let upstream = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let upstream_addr = upstream.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            for _ in 0..4 {
                let Ok((n, from)) = upstream.recv_from(&mut buf).await else {
                    return;
                };
                let mut reply = buf[..n].to_vec();
                reply[2] |= 0x80;
                reply[3] = (reply[3] & 0xf0) | 5;
                let _ = upstream.send_to(&reply, from).await;
            }
        });
        let names = Arc::new(RwLock::new(Names::new([super::super::names::Named {
            service: "web",
            stack: "",
            address: Ipv4Addr::new(10, 90, 0, 2),
        }])));
        let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = server.local_addr().unwrap();
        let task = tokio::spawn(serve(server, names, vec![upstream_addr]));
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.connect(addr).await.unwrap();
        let mut buf = [0u8; 512];
        for (name, rcode) in [("web", 0u8), ("nosuch", RCODE_NXDOMAIN), ("example.com", 5)] {
            client.send(&query(name, TYPE_A)).await.unwrap();
            let n = tokio::time::timeout(Duration::from_secs(5), client.recv(&mut buf))
                .await
                .expect("an answer in time")
                .unwrap();
            assert!(n >= 12, "{name}");
            assert_eq!(buf[3] & 0xf, rcode, "{name}");
        }
        task.abort();
    }
}
