//! Compose's `ports` and `expose` onto Skiff's one published port and one
//! container port per service: the routing proxy publishes a single TCP
//! port on every node.

use serde_yaml::Value;

use super::error::StackError;
use super::node::{check_keys, join, Node};
use super::Context;
use crate::Protocol;

/// The ports a service ends up with.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Ports {
    pub publish: Option<u16>,
    pub port: Option<u16>,
    pub protocol: Protocol,
}

/// One entry of `ports`.
struct PortEntry {
    path: String,
    published: Option<u16>,
    target: u16,
    http: bool,
}

const LONG_KEYS: &[&str] = &[
    "target",
    "published",
    "protocol",
    "mode",
    "host_ip",
    "app_protocol",
    "name",
];

pub(crate) fn read_ports(node: Node, context: &mut Context) -> Result<Ports, StackError> {
    let mut entries = Vec::new();
    for (i, item) in node.items()?.iter().enumerate() {
        let path = format!("{}[{i}]", node.path);
        let n = Node::new(item, &path);
        let entry = match item {
            Value::Mapping(_) => long_syntax(n, context)?,
            _ => short_syntax(n, context)?,
        };
        entries.push(entry);
    }
    let published: Vec<&PortEntry> = entries.iter().filter(|e| e.published.is_some()).collect();
    if published.len() > 1 {
        return Err(StackError::unsupported(
            node.path,
            "Skiff publishes one port per service: keep one in ports, move others to their own service",
        ));
    }
    for entry in entries.iter().filter(|e| e.published.is_none()) {
        context.warn(
            &entry.path,
            format!(
                "port {} has no published port, so it is not published: Skiff publishes only a port given as PUBLISHED:CONTAINER (e.g. \"8080:{}\")",
                entry.target, entry.target
            ),
        );
    }
    let chosen = published.first().copied().or(entries.first());
    Ok(Ports {
        publish: chosen.and_then(|e| e.published),
        port: chosen.map(|e| e.target),
        protocol: if chosen.is_some_and(|e| e.http && e.published.is_some()) {
            Protocol::Http
        } else {
            Protocol::Tcp
        },
    })
}

fn port_number(text: &str, node: &Node) -> Result<u16, StackError> {
    if text.contains('-') {
        return Err(StackError::unsupported(
            node.path,
            format!("\"{text}\" is a port range; Skiff publishes one port per service, give single ports"),
        ));
    }
    match text.trim().parse::<u16>() {
        Ok(port) if port > 0 => Ok(port),
        _ => Err(node.invalid(format!("\"{text}\" is not a port; use 1 to 65535"))),
    }
}

fn check_protocol(protocol: &str, node: &Node) -> Result<(), StackError> {
    match protocol {
        "tcp" | "" => Ok(()),
        "udp" => Err(StackError::unsupported(
            node.path,
            "the routing proxy carries TCP only; UDP ports are not supported",
        )),
        other => Err(node.invalid(format!("unknown protocol \"{other}\"; use tcp"))),
    }
}

/// `"80"`, `"8080:80"`, `"8080:80/tcp"`, `"127.0.0.1:8080:80"`.
fn short_syntax(node: Node, context: &mut Context) -> Result<PortEntry, StackError> {
    let text = node.string()?;
    let (spec, protocol) = text.split_once('/').unwrap_or((&text, "tcp"));
    check_protocol(protocol, &node)?;
    let (host_ip, rest) = match spec.strip_prefix('[') {
        Some(v6) => {
            let (ip, rest) = v6
                .split_once("]:")
                .ok_or_else(|| node.invalid(format!("\"{text}\" is not a port mapping")))?;
            (Some(ip.to_string()), rest.to_string())
        }
        None => (None, spec.to_string()),
    };
    let parts: Vec<&str> = rest.split(':').collect();
    let (ip, published, target) = match parts.as_slice() {
        [target] => (host_ip, None, *target),
        [published, target] => (host_ip, Some(*published), *target),
        [ip, published, target] if host_ip.is_none() => {
            (Some(ip.to_string()), Some(*published), *target)
        }
        _ => {
            return Err(node.invalid(format!(
                "\"{text}\" is not a port mapping; use PUBLISHED:CONTAINER, e.g. \"8080:80\""
            )))
        }
    };
    if let Some(ip) = ip.filter(|ip| !ip.is_empty()) {
        context.warn(
            node.path,
            format!(
                "the host IP {ip} is not used: the routing proxy listens on every node's address"
            ),
        );
    }
    let published = match published.filter(|p| !p.is_empty()) {
        Some(p) => Some(port_number(p, &node)?),
        None => None,
    };
    Ok(PortEntry {
        path: node.path.to_string(),
        published,
        target: port_number(target, &node)?,
        http: false,
    })
}

/// `{target, published, protocol, mode, host_ip, app_protocol}`.
fn long_syntax(node: Node, context: &mut Context) -> Result<PortEntry, StackError> {
    let entries = node.entries()?;
    check_keys(&entries, node.path, LONG_KEYS)?;
    let mut entry = PortEntry {
        path: node.path.to_string(),
        published: None,
        target: 0,
        http: false,
    };
    for (key, value) in &entries {
        let path = join(node.path, key);
        let n = Node::new(value, &path);
        match key.as_str() {
            "target" => entry.target = port_number(&n.string()?, &n)?,
            "published" => entry.published = Some(port_number(&n.string()?, &n)?),
            "protocol" => check_protocol(&n.string()?, &n)?,
            "mode" => match n.string()?.as_str() {
                "ingress" => {}
                "host" => context.warn(
                    &path,
                    "mode host is not used: the routing proxy publishes the port on every node",
                ),
                other => return Err(n.invalid(format!("unknown mode \"{other}\"; use ingress"))),
            },
            "host_ip" => context.warn(
                &path,
                "the host IP is not used: the routing proxy listens on every node's address",
            ),
            "app_protocol" => entry.http = n.string()?.eq_ignore_ascii_case("http"),
            _ => {}
        }
    }
    if entry.target == 0 {
        return Err(node.invalid("the port has no target; give target: CONTAINER_PORT"));
    }
    Ok(entry)
}

/// `expose`: the first entry is the container port when `ports` gave none.
pub(crate) fn read_expose(node: Node, context: &mut Context) -> Result<Option<u16>, StackError> {
    let mut first = None;
    for (i, item) in node.items()?.iter().enumerate() {
        let path = format!("{}[{i}]", node.path);
        let n = Node::new(item, &path);
        let text = n.string()?;
        let (port, protocol) = text.split_once('/').unwrap_or((&text, "tcp"));
        check_protocol(protocol, &n)?;
        let port = port_number(port, &n)?;
        if first.is_none() {
            first = Some(port);
        } else {
            context.warn(
                &path,
                "only the first exposed port is used: Skiff gives a service one container port",
            );
        }
    }
    Ok(first)
}
