//! Discovery by name: from every replica on this node (bridge or host
//! network, container or process) a service of the cluster is reachable by
//! its name on its own port — `psql -h db`, `curl http://web:8080/` — with
//! no `--publish` and no address in the environment.
//!
//! Each service gets a virtual address on this node ([`vip`]), where the
//! routing proxy listens on the service's own port: internal traffic goes
//! through the same pool as published traffic, so health, draining, canary
//! weights and holding while a replica is swapped apply to it too. The
//! node's DNS server ([`dns`]) answers the names ([`names`]) with those
//! addresses; every replica's `/etc/resolv.conf` points at it.
//!
//! The names follow the routes the control plane pushes, so a new service
//! answers as soon as its endpoints reach the node; a replica that stops
//! leaves the proxy's pool at once (the name's address does not change).

pub mod dns;
pub mod names;
pub mod vip;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

use crate::proxy::Route;
use names::{Named, Names};
use vip::{VipStore, VipTable};

/// This node's discovery: its addresses, its names and its DNS server.
pub struct Discovery {
    table: VipTable,
    store: VipStore,
    names: Arc<RwLock<Names>>,
    server: JoinHandle<()>,
}

impl Discovery {
    /// Leases this data dir's block, makes the range local and starts the
    /// DNS server; `None` (logged) where the host does not allow it (not
    /// root, no `ip`/`iptables`): replicas then get the host's resolvers.
    pub async fn start(data_dir: &Path, bridge: &str) -> Option<Discovery> {
        let (data_dir, bridge) = (data_dir.to_path_buf(), bridge.to_string());
        let prepared =
            tokio::task::spawn_blocking(move || -> Result<(VipStore, VipTable), String> {
                vip::prepare_host(&bridge)?;
                let store = VipStore::new(&data_dir);
                let table = store.load(&data_dir)?;
                Ok((store, table))
            })
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
        let (store, table) = match prepared {
            Ok(ready) => ready,
            Err(e) => {
                tracing::warn!(error = %e, "discovery by name is off on this node");
                return None;
            }
        };
        let dns = table.dns();
        let socket = match UdpSocket::bind(SocketAddr::from((dns, 53))).await {
            Ok(socket) => socket,
            Err(e) => {
                tracing::warn!(%dns, error = %e, "discovery by name is off on this node: cannot listen for DNS");
                return None;
            }
        };
        let host = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        let upstreams = dns::upstreams(&host, dns);
        let names = Arc::new(RwLock::new(Names::default()));
        let server = tokio::spawn(dns::serve(socket, names.clone(), upstreams.clone()));
        tracing::info!(%dns, ?upstreams, "discovery by name: DNS server listening");
        Some(Discovery {
            table,
            store,
            names,
            server,
        })
    }

    /// Where this node's DNS server listens: every replica's nameserver.
    pub fn nameserver(&self) -> Ipv4Addr {
        self.table.dns()
    }

    /// Gives every route with a port its address on this node, and
    /// answers their names from now on; adds the routes of per-replica
    /// names ([`per_replica_routes`]).
    pub fn assign(&mut self, routes: &mut Vec<Route>) {
        let replicas = per_replica_routes(routes);
        routes.extend(replicas);
        let (addresses, changed) = self.table.assign(
            routes
                .iter()
                .filter(|r| r.port != 0)
                .map(|r| r.service.as_str()),
        );
        if changed {
            self.store.save(&self.table);
        }
        for route in routes.iter_mut() {
            route.internal = addresses
                .get(&route.service)
                .filter(|_| route.port != 0)
                .map(|ip| SocketAddr::from((*ip, route.port)));
        }
        let names = Names::new(routes.iter().filter_map(|r| {
            Some(Named {
                service: &r.service,
                stack: &r.stack,
                address: *addresses.get(&r.service)?,
            })
        }));
        *self.names.write().unwrap_or_else(|p| p.into_inner()) = names;
    }
}

impl Drop for Discovery {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// A replica's own name: `db-0.db` for slot 0 of `db`.
pub fn replica_name(service: &str, slot: u32) -> String {
    format!("{service}-{slot}.{service}")
}

/// For each service whose replicas own per-replica volumes (a database's
/// members), one route per live slot, named [`replica_name`], whose pool
/// is that replica alone: a client can reach a given member, and its
/// connections are held while that member is swapped, as for the service.
pub fn per_replica_routes(routes: &[Route]) -> Vec<Route> {
    routes
        .iter()
        .filter(|r| r.port != 0)
        .flat_map(|r| {
            r.slots.iter().map(move |slot| Route {
                service: replica_name(&r.service, *slot),
                publish: 0,
                port: r.port,
                stack: r.stack.clone(),
                internal: None,
                slots: Vec::new(),
                http: r.http,
                endpoints: r
                    .endpoints
                    .iter()
                    .filter(|e| e.slot == *slot)
                    .cloned()
                    .collect(),
                hold_when_empty: true,
            })
        })
        .collect()
}

/// Writes a replica's `resolv.conf` into `dir` and returns its path.
pub fn write_resolv_conf(
    dir: &Path,
    nameserver: Ipv4Addr,
    stack: &str,
) -> std::io::Result<PathBuf> {
    let path = dir.join("resolv.conf");
    std::fs::write(&path, names::resolv_conf(nameserver, stack))?;
    Ok(path)
}
