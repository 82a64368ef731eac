//! Network faults between real processes on one machine: packet filters
//! on loopback address pairs. Each server (and agent) of a partition test
//! owns a loopback address of its own (`127.24.T.N`) and also dials from it
//! (`skiff_pki::tls::loopback_source`), so an iptables rule `-s A -d B -j
//! DROP` in INPUT (loopback packets pass OUTPUT, then INPUT on `lo`) cuts
//! exactly what A sends to B; a port narrows it to what A sends to B's
//! listener, i.e. the messages A dials B with (Raft streams, forwarded
//! requests), and `statistic` makes it a loss rate.
//!
//! Every rule carries a comment naming its [`Partitions`] and names only
//! addresses of one test, so tests running in parallel are unaffected;
//! the rules go on [`Partitions::heal`] and on drop (a panicking test
//! too), and rules a killed test left behind go when the next one with
//! the same name starts.

use std::process::Command;
use std::time::Duration;

use crate::try_run_with_timeout;

/// The iptables rules one test added.
pub struct Partitions {
    comment: String,
    rules: Vec<Vec<String>>,
}

/// Whether this process may add iptables rules (root, iptables present
/// and working).
pub fn available() -> bool {
    iptables(&["-w", "5", "-S", "INPUT"]).is_ok()
}

fn iptables(args: &[&str]) -> Result<String, String> {
    let mut command = Command::new("iptables");
    command.args(args);
    let out = try_run_with_timeout(&mut command, Duration::from_secs(10))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "iptables {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Partitions {
    /// No faults yet; `name` (unique per test) tags every rule, and the
    /// rules an earlier run of the same test left behind are removed.
    pub fn new(name: &str) -> Self {
        assert!(
            available(),
            "partition tests need root and a working iptables"
        );
        let partitions = Partitions {
            comment: format!("skiff-e2e-{name}"),
            rules: Vec::new(),
        };
        partitions.remove_stale();
        partitions
    }

    fn remove_stale(&self) {
        let Ok(rules) = iptables(&["-w", "5", "-S", "INPUT"]) else {
            return;
        };
        for line in rules.lines().filter(|l| l.contains(&self.comment)) {
            let Some(rule) = line.strip_prefix("-A INPUT ") else {
                continue;
            };
            let mut args = vec!["-w", "5", "-D", "INPUT"];
            args.extend(rule.split_whitespace().map(|w| w.trim_matches('"')));
            let _ = iptables(&args);
        }
    }

    fn add(&mut self, mut rule: Vec<String>) {
        rule.extend(
            ["-m", "comment", "--comment", &self.comment, "-j", "DROP"].map(str::to_string),
        );
        let mut args = vec!["-w", "5", "-I", "INPUT"];
        args.extend(rule.iter().map(String::as_str));
        iptables(&args).unwrap_or_else(|e| panic!("{e}"));
        self.rules.push(rule);
    }

    /// Drops every packet `from` sends to `to` (IP addresses): one way.
    pub fn drop_one_way(&mut self, from: &str, to: &str) {
        self.add(vec!["-s".into(), from.into(), "-d".into(), to.into()]);
    }

    /// Drops what `from` sends to `to`'s TCP port `port`: the connections
    /// `from` opens to `to`'s listener carry nothing any more (no request
    /// and no answer), while `to`'s own connections to `from` still work.
    /// For Raft this is "`from`'s messages to `to` are lost".
    pub fn drop_to_listener(&mut self, from: &str, to: &str, port: u16) {
        self.add(
            [
                "-s",
                from,
                "-d",
                to,
                "-p",
                "tcp",
                "--dport",
                &port.to_string(),
            ]
            .map(str::to_string)
            .to_vec(),
        );
    }

    /// Cuts `a` and `b` apart both ways.
    pub fn cut(&mut self, a: &str, b: &str) {
        self.drop_one_way(a, b);
        self.drop_one_way(b, a);
    }

    /// Cuts `node` from each of `others`, both ways.
    pub fn isolate(&mut self, node: &str, others: &[&str]) {
        for other in others {
            self.cut(node, other);
        }
    }

    /// Drops each packet `from` sends to `to` with `probability` (0..1).
    pub fn lose(&mut self, from: &str, to: &str, probability: f64) {
        self.add(
            [
                "-s",
                from,
                "-d",
                to,
                "-m",
                "statistic",
                "--mode",
                "random",
                "--probability",
                &format!("{probability:.3}"),
            ]
            .map(str::to_string)
            .to_vec(),
        );
    }

    /// Removes every rule added so far.
    pub fn heal(&mut self) {
        for rule in self.rules.drain(..).rev() {
            let mut args = vec!["-w", "5", "-D", "INPUT"];
            args.extend(rule.iter().map(String::as_str));
            if let Err(e) = iptables(&args) {
                eprintln!("partition: cannot remove a rule: {e}");
            }
        }
    }

    /// How many rules are in place.
    pub fn active(&self) -> usize {
        self.rules.len()
    }
}

impl Drop for Partitions {
    fn drop(&mut self) {
        self.heal();
        self.remove_stale();
    }
}

/// The IP part of `HOST:PORT`.
pub fn ip_of(address: &str) -> &str {
    address.rsplit_once(':').map_or(address, |(ip, _)| ip)
}

/// The port part of `HOST:PORT`.
pub fn port_of(address: &str) -> u16 {
    address
        .rsplit_once(':')
        .and_then(|(_, port)| port.parse().ok())
        .unwrap_or_else(|| panic!("no port in {address}"))
}
