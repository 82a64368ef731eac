//! A full disk under a real `skiff server`: its data dir is on a small
//! tmpfs this test mounts (and unmounts on drop), filled by a file the test
//! writes. Below the reserve (`--reserve-disk-mb`) writes are refused with
//! an error that says why and what to do, reads go on, and writes resume
//! once the filler is gone. Without a reserve the disk really fills: the
//! server stops with a message naming the full disk, and once space is
//! freed it starts again with every write it acknowledged. For each Raft
//! log store (sled, the default, and the write-ahead log).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use skiff_e2e::{
    assert_cli_error, free_port, skiff_at, skiff_bin, skiff_ok_at, use_cluster_ca,
    wait_for_token_of, wait_until, POLL,
};

/// A tmpfs of `size_mb` mounted on a new dir under `parent`, unmounted
/// (lazily, so a process still holding a file cannot keep it) on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(parent: &Path, size_mb: u32) -> Tmpfs {
        let path = parent.join("fs");
        fs::create_dir(&path).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mb}m"), "tmpfs"])
            .arg(&path)
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "mount -t tmpfs failed (the tests run as root)"
        );
        Tmpfs(path)
    }

    /// Bytes free for writing.
    fn free(&self) -> u64 {
        let out = Command::new("stat")
            .args(["-f", "-c", "%a %S"])
            .arg(&self.0)
            .output()
            .expect("run stat");
        let text = String::from_utf8_lossy(&out.stdout);
        let mut numbers = text.split_whitespace().map(|n| n.parse::<u64>().unwrap());
        numbers.next().unwrap() * numbers.next().unwrap()
    }

    /// Fills the file system until `leave` bytes are free (about: tmpfs
    /// counts in pages).
    fn fill_leaving(&self, leave: u64) -> PathBuf {
        let filler = self.0.join("filler");
        let size = self.free().saturating_sub(leave);
        let file = fs::File::create(&filler).unwrap();
        // Written, not just set_len: tmpfs reserves pages as they are written.
        let chunk = vec![0x5a_u8; 1 << 20];
        let mut left = size;
        use std::io::Write;
        let mut file = std::io::BufWriter::new(file);
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            file.write_all(&chunk[..n]).unwrap();
            left -= n as u64;
        }
        file.flush().unwrap();
        filler
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// One `skiff server` on `data`, its log outside the small file system
/// (the log must survive the disk filling up); killed by PID on drop.
struct Server {
    child: Option<Child>,
    /// How the last process ended, once it did by itself.
    exited: Option<std::process::ExitStatus>,
    address: String,
    data: PathBuf,
    log: PathBuf,
}

impl Server {
    fn start(data: &Path, log: &Path, extra: &[&str]) -> Server {
        let address = format!("127.0.0.1:{}", free_port());
        let mut server = Server {
            child: None,
            exited: None,
            address,
            data: data.to_path_buf(),
            log: log.to_path_buf(),
        };
        server.spawn(true, extra);
        wait_for_token_of(data);
        use_cluster_ca(&data.join("pki/ca.crt"));
        server.wait_ready();
        server
    }

    fn spawn(&mut self, bootstrap: bool, extra: &[&str]) {
        self.exited = None;
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut command = Command::new(skiff_bin());
        command
            .env_remove("SKIFF_ADDR")
            .args(["server", "--name", "s1", "--listen", &self.address])
            .arg("--data-dir")
            .arg(&self.data)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if bootstrap {
            command.arg("--bootstrap");
        }
        self.child = Some(command.spawn().expect("start skiff server"));
    }

    fn restart(&mut self, extra: &[&str]) {
        self.kill();
        self.spawn(false, extra);
        self.wait_ready();
    }

    fn wait_ready(&self) {
        assert!(
            wait_until(Duration::from_secs(20), POLL, || skiff_at(
                &self.address,
                &["var", "ls"]
            )
            .status
            .success()),
            "the server did not answer:\n{}",
            self.log()
        );
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The exit status once the server stopped by itself within `limit`.
    fn exited_within(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let started = Instant::now();
        loop {
            if self.exited.is_some() {
                return self.exited;
            }
            if let Some(status) = self.child.as_mut()?.try_wait().unwrap() {
                self.child = None;
                self.exited = Some(status);
                return Some(status);
            }
            if started.elapsed() >= limit {
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// `skiff var put KEY VALUE` without the helpers' panic on a timeout
/// (which would print the 60 kB value): `Some(acknowledged)`, or `None`
/// when no answer came within 15 s (the outcome is unknown; killed).
fn put_quietly(at: &str, key: &str, value: &str) -> Option<bool> {
    let mut child = Command::new(skiff_bin())
        .env_remove("SKIFF_ADDR")
        .args(["--server", at, "var", "put", key, value])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run skiff");
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(15) {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status.success());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

#[test]
fn a_full_disk_under_sled_refuses_writes_clearly_and_loses_nothing() {
    full_disk(&[]);
}

#[test]
fn a_full_disk_under_the_write_ahead_log_refuses_writes_clearly_and_loses_nothing() {
    full_disk(&["--raft-log", "wal"]);
}

fn full_disk(store: &[&str]) {
    let scratch = tempfile::Builder::new()
        .prefix("skiff-disk-full-")
        .tempdir()
        .unwrap();
    let disk = Tmpfs::mount(scratch.path(), 48);
    let data = disk.0.join("data");
    let log = scratch.path().join("server.log");
    let with_reserve: Vec<&str> = store
        .iter()
        .copied()
        .chain(["--reserve-disk-mb", "8"])
        .collect();
    let mut server = Server::start(&data, &log, &with_reserve);
    let at = server.address.clone();
    let mut acknowledged: Vec<(String, String)> = Vec::new();
    for i in 0..5 {
        let (key, value) = (format!("before/{i}"), format!("v{i}"));
        skiff_ok_at(&at, &["var", "put", &key, &value]);
        acknowledged.push((key, value));
    }

    // Under the reserve: refused, saying why and what to do; reads go on.
    let filler = disk.fill_leaving(4 << 20);
    // The server looks at the free space at most every 250 ms.
    std::thread::sleep(Duration::from_millis(500));
    let args = ["var", "put", "refused", "x"];
    let out = skiff_at(&at, &args);
    assert_cli_error(
        &args,
        &out,
        &[
            "disk is nearly full",
            "--reserve-disk-mb",
            "until space is freed",
        ],
    );
    assert_eq!(skiff_ok_at(&at, &["var", "get", "before/0"]).trim(), "v0");
    let out = skiff_at(&at, &["var", "get", "refused"]);
    assert!(!out.status.success(), "the refused write is not there");

    // Space freed: writes are accepted again, with no restart.
    fs::remove_file(&filler).unwrap();
    assert!(
        wait_until(Duration::from_secs(5), POLL, || skiff_at(
            &at,
            &["var", "put", "after/freed", "yes"]
        )
        .status
        .success()),
        "writes did not resume after space was freed:\n{}",
        server.log()
    );
    acknowledged.push(("after/freed".into(), "yes".into()));

    // No reserve: the disk really fills under a stream of writes. Every
    // write either is acknowledged or fails; the server stops, naming the
    // full disk, rather than go on or hang.
    let without_reserve: Vec<&str> = store
        .iter()
        .copied()
        .chain(["--reserve-disk-mb", "0"])
        .collect();
    server.restart(&without_reserve);
    let filler = disk.fill_leaving(3 << 20);
    let value = "z".repeat(60_000);
    let started = Instant::now();
    for i in 0..400 {
        if started.elapsed() > Duration::from_secs(90)
            || server.exited_within(Duration::ZERO).is_some()
        {
            break;
        }
        let key = format!("fill/{i}");
        if put_quietly(&at, &key, &value) == Some(true) {
            acknowledged.push((key, value.clone()));
        }
    }
    let status = server
        .exited_within(Duration::from_secs(30))
        .unwrap_or_else(|| {
            panic!(
                "the server neither stopped nor refused; log:\n{}",
                server.log()
            )
        });
    assert!(!status.success(), "{status:?}");
    let text = server.log();
    assert!(
        text.contains("No space left on device") && text.contains("free space there"),
        "the server's last words name the full disk and the way out:\n{}",
        &text[text.len().saturating_sub(3000)..]
    );
    eprintln!(
        "MEASURED disk full ({}): {} writes acknowledged before the disk filled",
        if store.is_empty() { "sled" } else { "wal" },
        acknowledged.len()
    );

    // Space freed: it starts again with every acknowledged write.
    fs::remove_file(&filler).unwrap();
    server.spawn(false, &with_reserve);
    server.wait_ready();
    for (key, value) in &acknowledged {
        let got = skiff_ok_at(&at, &["var", "get", key]);
        assert_eq!(got.trim_end(), value, "{key} after the restart");
    }
    skiff_ok_at(&at, &["var", "put", "after/restart", "yes"]);
}
