//! Space kept free on the data dir's file system. A server that runs out of
//! space in the middle of a write cannot finish it: the Raft log store
//! fails, the consensus thread stops and the server exits (nothing
//! acknowledged is lost, but the server is down until space is freed). So
//! writes are refused while the free space is under a reserve, with an error
//! that says why and what to do, and accepted again as soon as space is
//! freed; reads and replication go on meanwhile.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long one look at the free space stands: writes come thousands a
/// second, the disk fills in seconds at the very least.
const RECHECK: Duration = Duration::from_millis(250);

/// The reserve on one data dir (`skiff server --reserve-disk-mb`).
#[derive(Debug)]
pub struct DiskReserve {
    path: PathBuf,
    reserve_bytes: u64,
    /// When the space was last looked at and how much was free (`None`:
    /// could not tell, which never refuses a write).
    last: Mutex<Option<(Instant, Option<u64>)>>,
}

impl DiskReserve {
    pub fn new(path: PathBuf, reserve_bytes: u64) -> Self {
        DiskReserve {
            path,
            reserve_bytes,
            last: Mutex::new(None),
        }
    }

    /// Why a write must be refused now, if it must.
    pub fn refusal(&self) -> Option<String> {
        if self.reserve_bytes == 0 {
            return None;
        }
        let free = {
            let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
            match *last {
                Some((at, free)) if at.elapsed() < RECHECK => free,
                _ => {
                    let free = free_bytes(&self.path);
                    *last = Some((Instant::now(), free));
                    free
                }
            }
        }?;
        (free < self.reserve_bytes).then(|| refusal(&self.path, free, self.reserve_bytes))
    }
}

fn refusal(path: &std::path::Path, free: u64, reserve: u64) -> String {
    format!(
        "this server's disk is nearly full: {} has {} free, under the {} kept in reserve (--reserve-disk-mb); writes are refused until space is freed (reads go on)",
        path.display(),
        mib(free),
        mib(reserve)
    )
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

/// Bytes an unprivileged writer may still use on `path`'s file system.
fn free_bytes(path: &std::path::Path) -> Option<u64> {
    let stat = nix::sys::statvfs::statvfs(path).ok()?;
    Some(stat.blocks_available().saturating_mul(stat.fragment_size()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reserve_larger_than_the_disk_refuses_naming_the_flag_and_none_refuses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let refused = DiskReserve::new(dir.path().into(), u64::MAX)
            .refusal()
            .unwrap();
        assert!(refused.contains("--reserve-disk-mb"), "{refused}");
        assert!(
            refused.contains(&dir.path().display().to_string()),
            "{refused}"
        );
        assert_eq!(DiskReserve::new(dir.path().into(), 0).refusal(), None);
        assert_eq!(DiskReserve::new(dir.path().into(), 1).refusal(), None);
    }

    #[test]
    fn the_message_gives_sizes_in_mib() {
        assert_eq!(mib(3 << 20), "3.0 MiB");
        let text = refusal("/data".as_ref(), 1 << 20, 64 << 20);
        assert!(
            text.contains("/data has 1.0 MiB free, under the 64.0 MiB"),
            "{text}"
        );
    }
}
