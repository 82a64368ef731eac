//! The names a node's DNS server answers, built from the routes the
//! control plane sends: a pure table, so what resolves and what fails fast
//! is decided (and tested) without a socket.
//!
//! Every service reachable by name answers as
//! - `NAME` and `NAME.skiff` (its full name, e.g. `app-db`), and
//! - `SHORT.STACK.skiff` when it belongs to a stack (`db.app.skiff`), which
//!   a replica of that stack reaches as plain `db` through its search
//!   domain (see [`resolv_conf`]).
//!
//! A single-label name and any name under `skiff` that is not a service
//! gets NXDOMAIN at once: a typo fails in microseconds instead of waiting
//! for the host's resolvers (which could not know it anyway). Every other
//! name goes to the host's resolvers.

use std::collections::HashMap;
use std::net::Ipv4Addr;

/// The cluster's DNS domain.
pub const DOMAIN: &str = "skiff";
/// How long a resolver may keep an answer: short, so a removed or new
/// service is seen within seconds (Swarm's 600 s records are a known
/// complaint). The address of a service does not change while it exists.
pub const TTL_SECS: u32 = 5;

/// What the server does with one question.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    /// One of ours: this address.
    Found(Ipv4Addr),
    /// In our namespace but not a service: NXDOMAIN.
    NotFound,
    /// Somebody else's name: ask the host's resolvers.
    Forward,
}

/// One service as discovery names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Named<'a> {
    pub service: &'a str,
    pub stack: &'a str,
    pub address: Ipv4Addr,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Names {
    by_name: HashMap<String, Ipv4Addr>,
}

impl Names {
    pub fn new<'a>(services: impl IntoIterator<Item = Named<'a>>) -> Self {
        let mut by_name = HashMap::new();
        for s in services {
            let full = s.service.to_ascii_lowercase();
            by_name.insert(format!("{full}.{DOMAIN}"), s.address);
            // A replica's own name `REPLICA.SERVICE` (`app-db-0.app-db`)
            // is `db-0.db` within the stack.
            let short = match s.service.split_once('.') {
                Some((replica, service)) => short_name(service, s.stack).and_then(|short| {
                    let rest = replica.strip_prefix(service)?;
                    Some(format!("{short}{rest}.{short}"))
                }),
                None => short_name(s.service, s.stack).map(str::to_string),
            };
            if let Some(short) = short {
                let stack = s.stack.to_ascii_lowercase();
                by_name.insert(
                    format!("{}.{stack}.{DOMAIN}", short.to_ascii_lowercase()),
                    s.address,
                );
            }
            by_name.insert(full, s.address);
        }
        Names { by_name }
    }

    /// The answer for `name` (any case, with or without the final dot).
    pub fn resolve(&self, name: &str) -> Resolution {
        let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
        if let Some(ip) = self.by_name.get(&name) {
            return Resolution::Found(*ip);
        }
        // Also `x.db` when `db` is a service: a replica name that is not
        // (or no longer) there.
        let under_a_service = name
            .rsplit_once('.')
            .is_some_and(|(_, last)| self.by_name.contains_key(last));
        let ours = !name.contains('.')
            || name == DOMAIN
            || name.ends_with(&format!(".{DOMAIN}"))
            || under_a_service;
        if ours {
            Resolution::NotFound
        } else {
            Resolution::Forward
        }
    }
}

/// A stack service's name within its stack: `db` for `app-db` in `app`.
pub fn short_name<'a>(service: &'a str, stack: &str) -> Option<&'a str> {
    if stack.is_empty() {
        return None;
    }
    service
        .strip_prefix(stack)?
        .strip_prefix('-')
        .filter(|s| !s.is_empty())
}

/// A replica's `/etc/resolv.conf`: this node's DNS server only (it
/// forwards what is not ours to the host's resolvers), the stack's domain
/// and the cluster's as search domains, and `ndots:1` so a dotted external
/// name is asked as it is first instead of once per search domain.
pub fn resolv_conf(nameserver: Ipv4Addr, stack: &str) -> String {
    let search = if stack.is_empty() {
        DOMAIN.to_string()
    } else {
        format!("{}.{DOMAIN} {DOMAIN}", stack.to_ascii_lowercase())
    };
    format!(
        "# Written by skiff: names of the cluster's services, then the host's resolvers.\n\
         nameserver {nameserver}\nsearch {search}\noptions ndots:1 timeout:2 attempts:2\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Names {
        Names::new([
            Named {
                service: "web",
                stack: "",
                address: Ipv4Addr::new(10, 90, 0, 2),
            },
            Named {
                service: "app-db",
                stack: "app",
                address: Ipv4Addr::new(10, 90, 0, 3),
            },
        ])
    }

    #[test]
    fn services_answer_by_full_and_short_name() {
        let n = names();
        let web = Resolution::Found(Ipv4Addr::new(10, 90, 0, 2));
        let db = Resolution::Found(Ipv4Addr::new(10, 90, 0, 3));
        assert_eq!(n.resolve("web"), web);
        assert_eq!(n.resolve("WEB."), web);
        assert_eq!(n.resolve("web.skiff"), web);
        assert_eq!(n.resolve("app-db"), db);
        assert_eq!(n.resolve("db.app.skiff"), db);
        assert_eq!(n.resolve("app-db.skiff."), db);
    }

    #[test]
    fn unknown_names_of_ours_fail_and_others_are_forwarded() {
        let n = names();
        assert_eq!(n.resolve("nosuch"), Resolution::NotFound);
        assert_eq!(
            n.resolve("db"),
            Resolution::NotFound,
            "short names only through the stack's search domain"
        );
        assert_eq!(n.resolve("db.other.skiff"), Resolution::NotFound);
        assert_eq!(n.resolve("skiff"), Resolution::NotFound);
        assert_eq!(n.resolve("example.com"), Resolution::Forward);
        assert_eq!(n.resolve("web.example.com."), Resolution::Forward);
    }

    #[test]
    fn replicas_have_names_of_their_own_also_within_their_stack() {
        let member = Ipv4Addr::new(10, 90, 0, 9);
        let n = Names::new([
            Named {
                service: "app-db",
                stack: "app",
                address: Ipv4Addr::new(10, 90, 0, 3),
            },
            Named {
                service: "app-db-0.app-db",
                stack: "app",
                address: member,
            },
        ]);
        assert_eq!(n.resolve("app-db-0.app-db"), Resolution::Found(member));
        assert_eq!(n.resolve("db-0.db.app.skiff"), Resolution::Found(member));
        assert_eq!(
            n.resolve("app-db-7.app-db"),
            Resolution::NotFound,
            "fails fast"
        );
        assert_eq!(n.resolve("db-7.db.app.skiff"), Resolution::NotFound);
    }

    #[test]
    fn short_names_need_the_stack_prefix() {
        assert_eq!(short_name("app-db", "app"), Some("db"));
        assert_eq!(short_name("app-", "app"), None);
        assert_eq!(short_name("appdb", "app"), None);
        assert_eq!(short_name("db", ""), None);
    }

    #[test]
    fn resolv_conf_searches_the_stack_first() {
        let conf = resolv_conf(Ipv4Addr::new(10, 90, 3, 1), "App");
        assert!(conf.contains("nameserver 10.90.3.1\n"), "{conf}");
        assert!(conf.contains("search app.skiff skiff\n"), "{conf}");
        assert!(conf.contains("options ndots:1"), "{conf}");
        assert!(resolv_conf(Ipv4Addr::new(10, 90, 3, 1), "").contains("search skiff\n"));
    }
}
