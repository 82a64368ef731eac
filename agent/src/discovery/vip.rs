//! Virtual addresses for discovery by name: where each service is reached
//! on this node, and where the node's DNS server listens.
//!
//! The range `10.90.0.0/16` is made local with one route (`ip route add
//! local 10.90.0.0/16 dev lo`, "AnyIP", as 127.0.0.0/8 is), so any address
//! in it can be bound without configuring it, and is reached both by host
//! processes and by bridge containers (through their gateway, like any
//! address of the host). An `INPUT` rule drops packets to the range that
//! arrive from anywhere but the loopback and the node bridge: nothing
//! outside the host reaches it.
//!
//! Each agent of a host leases one block `10.90.B.0/24` (a file in
//! `/run/skiff/discovery`, naming its data dir): `.1` is its DNS server,
//! `.2`–`.254` its services. The lease is the data dir's for good, so an
//! agent restarted on the same data dir gets the same block, and the
//! replicas that outlived it keep a working `resolv.conf`; a block whose
//! data dir is gone is free again. Which service has which address is kept
//! in `DATA/discovery.json`, so connections a client keeps open, or an
//! address it cached, stay valid across agent restarts.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::runtime::oci::bridge::run;

pub const RANGE: &str = "10.90.0.0/16";
const LEASE_DIR: &str = "/run/skiff/discovery";
const LOCK_FILE: &str = "/run/skiff/discovery.lock";
const GUARD_CHAIN: &str = "SKIFF-DISCOVERY";
/// Host numbers of a block that go to services.
const FIRST_SERVICE: u8 = 2;
const LAST_SERVICE: u8 = 254;

/// Makes the range local and guards it; idempotent, shared by the agents
/// of the host (which run it one at a time, under the lease lock).
pub fn prepare_host(bridge: &str) -> Result<(), String> {
    let _lock = host_lock()?;
    let routes = run("ip", &["route", "show", "table", "local", RANGE], None)?;
    if routes.trim().is_empty() {
        run(
            "ip",
            &[
                "route", "replace", "local", RANGE, "dev", "lo", "table", "local",
            ],
            None,
        )?;
    }
    let iptables = |args: &[&str]| {
        let mut all = vec!["-w", "5"];
        all.extend_from_slice(args);
        run("iptables", &all, None)
    };
    let want = [
        format!("-A {GUARD_CHAIN} -i lo -j RETURN"),
        format!("-A {GUARD_CHAIN} -i {bridge} -j RETURN"),
        format!("-A {GUARD_CHAIN} -j DROP"),
    ];
    let have: Vec<String> = iptables(&["-S", GUARD_CHAIN])
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("-A "))
        .map(str::to_string)
        .collect();
    if have != want {
        let _ = iptables(&["-N", GUARD_CHAIN]);
        iptables(&["-F", GUARD_CHAIN])?;
        for iface in ["lo", bridge] {
            iptables(&["-A", GUARD_CHAIN, "-i", iface, "-j", "RETURN"])?;
        }
        iptables(&["-A", GUARD_CHAIN, "-j", "DROP"])?;
    }
    if iptables(&["-C", "INPUT", "-d", RANGE, "-j", GUARD_CHAIN]).is_err() {
        iptables(&["-I", "INPUT", "-d", RANGE, "-j", GUARD_CHAIN])?;
    }
    Ok(())
}

/// Orders the agents of a host around the shared route, chain and leases.
fn host_lock() -> Result<nix::fcntl::Flock<std::fs::File>, String> {
    std::fs::create_dir_all(LEASE_DIR).map_err(|e| format!("cannot create {LEASE_DIR}: {e}"))?;
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(LOCK_FILE)
        .map_err(|e| format!("cannot open {LOCK_FILE}: {e}"))?;
    nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| format!("cannot lock {LOCK_FILE}: {e}"))
}

/// This agent's block and the addresses it gave.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VipTable {
    pub block: u8,
    /// Service name → host number in the block.
    pub services: BTreeMap<String, u8>,
    /// Where the next search for a free number starts: a freed address is
    /// not given again at once, so a client that cached it meets nothing
    /// rather than another service.
    #[serde(default)]
    pub next: u8,
}

impl VipTable {
    pub fn new(block: u8) -> Self {
        VipTable {
            block,
            services: BTreeMap::new(),
            next: FIRST_SERVICE,
        }
    }

    /// The DNS server's address.
    pub fn dns(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 90, self.block, 1)
    }

    fn address(&self, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 90, self.block, host)
    }

    /// Gives every service of `wanted` an address (keeping the ones it
    /// had) and forgets the others; returns the addresses and whether the
    /// table changed. A service beyond the block's 253 gets none (logged).
    pub fn assign<'a>(
        &mut self,
        wanted: impl IntoIterator<Item = &'a str>,
    ) -> (BTreeMap<String, Ipv4Addr>, bool) {
        let wanted: std::collections::BTreeSet<&str> = wanted.into_iter().collect();
        let before = self.services.len();
        self.services.retain(|s, _| wanted.contains(s.as_str()));
        let mut changed = self.services.len() != before;
        let mut out = BTreeMap::new();
        for service in wanted {
            let host = match self.services.get(service) {
                Some(host) => *host,
                None => {
                    let Some(host) = self.free_host() else {
                        tracing::warn!(%service, "no address left for discovery by name on this node (253 services)");
                        continue;
                    };
                    self.services.insert(service.to_string(), host);
                    changed = true;
                    host
                }
            };
            out.insert(service.to_string(), self.address(host));
        }
        (out, changed)
    }

    fn free_host(&mut self) -> Option<u8> {
        let taken: std::collections::BTreeSet<u8> = self.services.values().copied().collect();
        let span = u16::from(LAST_SERVICE - FIRST_SERVICE) + 1;
        let start = self.next.clamp(FIRST_SERVICE, LAST_SERVICE);
        let host = (0..span)
            .map(|i| {
                let offset = (u16::from(start - FIRST_SERVICE) + i) % span;
                FIRST_SERVICE + offset as u8
            })
            .find(|h| !taken.contains(h))?;
        self.next = if host == LAST_SERVICE {
            FIRST_SERVICE
        } else {
            host + 1
        };
        Some(host)
    }
}

/// The agent's persisted table, under its data dir.
pub struct VipStore {
    path: PathBuf,
}

impl VipStore {
    pub fn new(data_dir: &Path) -> Self {
        VipStore {
            path: data_dir.join("discovery.json"),
        }
    }

    /// The table of the block this data dir holds (leasing one if it holds
    /// none yet).
    pub fn load(&self, data_dir: &Path) -> Result<VipTable, String> {
        let block = lease_block(data_dir)?;
        let table = std::fs::read(&self.path)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<VipTable>(&bytes).ok())
            .filter(|t| t.block == block)
            .unwrap_or_else(|| VipTable::new(block));
        Ok(table)
    }

    pub fn save(&self, table: &VipTable) {
        let tmp = self.path.with_extension("json.tmp");
        let written = serde_json::to_vec(table)
            .map_err(std::io::Error::other)
            .and_then(|bytes| std::fs::write(&tmp, bytes))
            .and_then(|()| std::fs::rename(&tmp, &self.path));
        if let Err(e) = written {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot save discovery addresses");
        }
    }
}

/// The block leased to `data_dir`: the one it holds, else a free one (none
/// or a holder whose data dir is gone).
fn lease_block(data_dir: &Path) -> Result<u8, String> {
    let _lock = host_lock()?;
    let me = std::fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
    let holders: BTreeMap<u8, PathBuf> = (0..=255u8)
        .filter_map(|b| {
            let holder = std::fs::read_to_string(block_file(b)).ok()?;
            Some((b, PathBuf::from(holder.trim())))
        })
        .collect();
    let block = holders
        .iter()
        .find(|(_, holder)| **holder == me)
        .map(|(b, _)| *b)
        .or_else(|| holders.iter().find(|(_, h)| !h.exists()).map(|(b, _)| *b))
        .or_else(|| (0..=255u8).find(|b| !holders.contains_key(b)))
        .ok_or("every discovery block of 10.90.0.0/16 is held by another agent's data dir")?;
    std::fs::write(block_file(block), me.to_string_lossy().as_bytes())
        .map_err(|e| format!("cannot write {}: {e}", block_file(block).display()))?;
    Ok(block)
}

fn block_file(block: u8) -> PathBuf {
    Path::new(LEASE_DIR).join(format!("block-{block}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn services_keep_their_address_and_freed_ones_are_not_reused_at_once() {
        let mut t = VipTable::new(7);
        let (a, changed) = t.assign(["web", "db"]);
        assert!(changed);
        assert_eq!(a["db"], Ipv4Addr::new(10, 90, 7, 2));
        assert_eq!(a["web"], Ipv4Addr::new(10, 90, 7, 3));
        let (b, changed) = t.assign(["web"]);
        assert!(changed);
        assert_eq!(b["web"], a["web"]);
        let (c, _) = t.assign(["web", "cache"]);
        assert_eq!(
            c["cache"],
            Ipv4Addr::new(10, 90, 7, 4),
            "not db's old address"
        );
        assert!(!t.assign(["web", "cache"]).1);
        assert_eq!(t.dns(), Ipv4Addr::new(10, 90, 7, 1));
    }

    #[test]
    fn a_full_block_gives_no_address_and_wraps_around() {
        let mut t = VipTable::new(0);
        let names: Vec<String> = (0..260).map(|i| format!("s{i:03}")).collect();
        let (got, _) = t.assign(names.iter().map(String::as_str));
        assert_eq!(got.len(), 253);
        let (got, _) = t.assign(names[..10].iter().map(String::as_str));
        assert_eq!(got.len(), 10);
        let (got, _) = t.assign(["new"]);
        assert_eq!(got.len(), 1);
    }
}
