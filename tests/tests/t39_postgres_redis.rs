//! t39: the real PostgreSQL and Redis fixture images of `deploy/images/build.sh`
//! (`skiff-test/postgres:v1`, `skiff-test/redis:v1`, built from Debian's packages) run as
//! Skiff services, end to end:
//!
//! - postgres: a service with a named volume on PGDATA, `POSTGRES_PASSWORD` and
//!   `POSTGRES_DB`, published on a free port, becomes healthy through the image's own
//!   Healthcheck (`pg_isready`); the entrypoint initialised the volume (PG_VERSION, owned by
//!   the image's postgres user, 999) and the server runs as that user; a row written with
//!   the image's `psql` through the published port (password auth: a wrong password is
//!   refused) is read back after `service update --env X=2` (stop-first, the new replica
//!   reuses the volume without a new initdb) and after a SIGKILL of the replica's postmaster
//!   (restarted in place, crash recovery from the WAL), and a kill -9 of `skiff dev` (the
//!   container is re-adopted, the same postmaster serves the rows).
//! - redis without `--volume`: the image's Volume /data becomes an anonymous volume that
//!   `volume ls` lists (KIND anonymous, its replica and path), `volume rm` refuses naming
//!   the replica, and that leaves the list once `service rm` removed its replica.
//! - redis: a service published on a free port becomes healthy through the image's
//!   Healthcheck (`redis-cli ping`), runs as redis (998), and answers `SET`/`GET` sent as raw
//!   RESP over TCP through the published port (`--protected-mode no` lets a non-local client
//!   in).
//!
//! psql is the image's own: run with `nsenter --mount` in the replica's mount namespace (its
//! files) but in the host's network namespace, so it connects to the published port on
//! 127.0.0.1 as any client would, through the node's routing proxy.
//!
//! Needs root and the tools of t30 (runc, docker-registry, skopeo, busybox-static...), and
//! what build.sh needs for these two images (apt-get, dpkg-deb, readelf).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::MetadataExt;
use std::process::{Command, Output};
use std::time::Duration;

use skiff_e2e::containers::{children, uids, OciDev, Registry};
use skiff_e2e::{
    assert_cli_error, free_port, pid_alive, run_with_timeout, sigkill, wait_until, Allocation, POLL,
};

const TIMEOUT: Duration = Duration::from_secs(60);
const PSQL: &str = "/usr/lib/postgresql/15/bin/psql";
const PASSWORD: &str = "t39-secret";

fn healthy(a: &Allocation) -> bool {
    a.desired == "run" && a.state == "healthy" && pid_alive(a.pid)
}

fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

/// The first process in the tree of `pid` (itself included) whose command line starts
/// with `prefix`.
fn find_process(pid: u32, prefix: &str) -> Option<u32> {
    let mut queue = vec![pid];
    while let Some(p) = queue.pop() {
        if cmdline(p).starts_with(prefix) {
            return Some(p);
        }
        queue.extend(children(p));
    }
    None
}

/// The postmaster of the replica `a` (its command line is `postgres`; the server's other
/// processes rename themselves `postgres: checkpointer`, ...).
fn postmaster(a: &Allocation) -> u32 {
    find_process(a.pid, "postgres ")
        .unwrap_or_else(|| panic!("no postmaster under pid {} ({a:?})", a.pid))
}

/// Runs `sql` with the image's psql (from replica `a`'s files) against the published port,
/// as `postgres` on database `app`; tuples only, unaligned.
fn psql(a: &Allocation, port: u16, password: &str, sql: &str) -> Output {
    let target = a.pid.to_string();
    let port = port.to_string();
    let nsenter = ["--target", &target, "--mount", "--root", "--", PSQL];
    let connect = [
        "-h",
        "127.0.0.1",
        "-p",
        &port,
        "-U",
        "postgres",
        "-d",
        "app",
    ];
    let run = ["-X", "-q", "-v", "ON_ERROR_STOP=1", "-tA", "-c", sql];
    let mut cmd = Command::new("nsenter");
    cmd.args(nsenter)
        .args(connect)
        .args(run)
        .env("PGPASSWORD", password)
        .env("PGCONNECT_TIMEOUT", "5");
    run_with_timeout(&mut cmd, Duration::from_secs(20))
}

/// `psql` that must succeed; returns its stdout, trimmed.
fn psql_ok(cluster: &OciDev, a: &Allocation, port: u16, sql: &str) -> String {
    let out = psql(a, port, PASSWORD, sql);
    assert!(
        out.status.success(),
        "psql `{sql}` failed: {}\n{}\n--- db log ---\n{}\n--- dev log ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        cluster.skiff_ok(&["service", "logs", "db", "--tail", "20"]),
        cluster.log_tail(30)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Waits for one healthy replica of `db` that `ok` accepts.
fn wait_db(cluster: &OciDev, what: &str, mut ok: impl FnMut(&Allocation) -> bool) -> Allocation {
    cluster
        .wait_replicas("db", 1, what, |a| healthy(a) && ok(a))
        .remove(0)
}

#[test]
fn postgres_keeps_its_rows_through_an_update_and_a_killed_postmaster() {
    let registry = Registry::shared_with_db();
    let mut cluster = OciDev::start(registry.clone(), &[]);
    let image = registry.image("postgres:v1");
    let port = free_port();
    let publish = port.to_string();
    cluster.skiff_ok(&[
        "service",
        "create",
        "--detach",
        "db",
        "--image",
        &image,
        "--volume",
        "pgdata:/var/lib/postgresql/data",
        "--publish",
        &publish,
        "--env",
        &format!("POSTGRES_PASSWORD={PASSWORD}"),
        "--env",
        "POSTGRES_DB=app",
        "--env",
        "X=1",
    ]);

    // Healthy by the image's Healthcheck (pg_isready), after the entrypoint's initdb.
    let first = wait_db(&cluster, "healthy", |_| true);
    let data = cluster.agent_dir().join("volumes/pgdata-0/_data");
    let meta = std::fs::metadata(&data).expect("the volume's data dir");
    assert_eq!(meta.uid(), 999, "PGDATA owned by the image's postgres user");
    assert_eq!(
        meta.mode() & 0o777,
        0o700,
        "PGDATA mode 700, as postgres requires"
    );
    assert!(
        data.join("PG_VERSION").is_file(),
        "initdb ran in the volume"
    );
    let pm = postmaster(&first);
    assert_eq!(uids(pm).first(), Some(&999), "postgres runs as uid 999");
    let logs = cluster.skiff_ok(&["service", "logs", "db"]);
    assert!(logs.contains("PostgreSQL init process complete"), "{logs}");

    // Password auth for host connections (scram-sha-256): a wrong password is refused.
    let wrong = psql(&first, port, "not-the-password", "SELECT 1");
    let err = String::from_utf8_lossy(&wrong.stderr);
    assert!(
        !wrong.status.success() && err.contains("password authentication failed"),
        "a wrong password: {} {err}",
        wrong.status
    );

    // A row written through the published port.
    let out = psql_ok(
        &cluster,
        &first,
        port,
        "CREATE TABLE notes (v text); INSERT INTO notes VALUES ('kept'); SELECT v FROM notes",
    );
    assert_eq!(out, "kept");

    // Stop-first update: a new replica on the same volume, no new initdb.
    cluster.skiff_ok(&["service", "update", "db", "--env", "X=2"]);
    let updated = wait_db(&cluster, "healthy after the update", |a| a.id != first.id);
    assert_eq!(
        psql_ok(&cluster, &updated, port, "SELECT v FROM notes"),
        "kept",
        "the row survives the update"
    );
    let logs = cluster.skiff_ok(&["service", "logs", "db", "--replica", &updated.id]);
    assert!(
        !logs.contains("PostgreSQL init process complete"),
        "the new replica found an initialised PGDATA: {logs}"
    );

    // SIGKILL of the postmaster: the replica restarts in place and recovers from the WAL.
    let pm = postmaster(&updated);
    sigkill(pm);
    let restarted = wait_db(&cluster, "healthy after a killed postmaster", |a| {
        a.id == updated.id
            && a.restarts > updated.restarts
            && find_process(a.pid, "postgres ").is_some_and(|p| p != pm)
    });
    assert_eq!(
        psql_ok(
            &cluster,
            &restarted,
            port,
            "INSERT INTO notes VALUES ('after the kill'); SELECT string_agg(v, ',' ORDER BY v) FROM notes"
        ),
        "after the kill,kept",
        "the row survives a killed postmaster, and the database takes writes again"
    );

    // kill -9 of `skiff dev` (server and agent): the container outlives it and is re-adopted,
    // the same postmaster keeps serving, and the rows are all there.
    let pm = postmaster(&restarted);
    cluster.restart();
    let adopted = wait_db(&cluster, "healthy after the agent's kill -9", |a| {
        a.id == restarted.id && find_process(a.pid, "postgres ") == Some(pm)
    });
    // The replica's record says healthy at once (it never stopped), but the
    // routing proxy lives in the agent: the published port answers again
    // only once the restarted agent has its endpoints and listens.
    let listening = wait_until(TIMEOUT, POLL, || {
        TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    assert!(
        listening,
        "published port {port} never listened again after the restart:\n{}",
        cluster.log_tail(30)
    );
    assert_eq!(
        psql_ok(
            &cluster,
            &adopted,
            port,
            "SELECT string_agg(v, ',' ORDER BY v) FROM notes"
        ),
        "after the kill,kept",
        "the rows survive a kill -9 of the agent, served by the same postmaster"
    );
}

/// Sends one RESP command (an array of bulk strings) and returns the reply: its first
/// line, and for a bulk string (`$N`) its data line too.
fn resp(conn: &mut TcpStream, args: &[&str]) -> std::io::Result<String> {
    let mut req = format!("*{}\r\n", args.len());
    for a in args {
        req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    conn.write_all(req.as_bytes())?;
    let mut reply = Vec::new();
    let mut byte = [0u8; 1];
    let mut lines = 0;
    loop {
        conn.read_exact(&mut byte)?;
        reply.push(byte[0]);
        if reply.ends_with(b"\r\n") {
            lines += 1;
            let bulk = reply.starts_with(b"$") && !reply.starts_with(b"$-1");
            if lines == 2 || !bulk {
                break;
            }
        }
    }
    Ok(String::from_utf8_lossy(&reply).into_owned())
}

#[test]
fn redis_answers_set_and_get_through_the_published_port() {
    let registry = Registry::shared_with_db();
    let cluster = OciDev::start(registry.clone(), &[]);
    let image = registry.image("redis:v1");
    let port = free_port();
    cluster.skiff_ok(&[
        "service",
        "create",
        "--detach",
        "cache",
        "--image",
        &image,
        "--volume",
        "redis-data:/data",
        "--publish",
        &port.to_string(),
    ]);
    // Healthy by the image's Healthcheck (redis-cli ping), running as redis (998).
    let replica = cluster
        .wait_replicas("cache", 1, "healthy", healthy)
        .remove(0);
    let server = find_process(replica.pid, "redis-server")
        .unwrap_or_else(|| panic!("no redis-server under pid {}", replica.pid));
    assert_eq!(uids(server).first(), Some(&998), "redis runs as uid 998");

    // SET and GET through the published port (the routing proxy), as raw RESP.
    let mut reply = String::new();
    let answered = wait_until(TIMEOUT, POLL, || {
        let Ok(mut conn) = TcpStream::connect(("127.0.0.1", port)) else {
            return false;
        };
        conn.set_read_timeout(Some(Duration::from_secs(5))).ok();
        match resp(&mut conn, &["SET", "t39", "kept"]) {
            Ok(r) if r == "+OK\r\n" => {}
            Ok(r) => {
                reply = r;
                return false;
            }
            Err(e) => {
                reply = e.to_string();
                return false;
            }
        }
        reply = resp(&mut conn, &["GET", "t39"]).unwrap_or_else(|e| e.to_string());
        true
    });
    assert!(answered, "no +OK to SET through port {port}: {reply:?}");
    assert_eq!(reply, "$4\r\nkept\r\n");

    // The image declares the Volume /data. Covered by --volume above, it made no anonymous
    // volume; without one, the replica gets an anonymous volume that `volume ls` lists with
    // its replica and path, `volume rm` refuses, and that goes with its replica.
    let anonymous = |cluster: &OciDev| -> Vec<serde_json::Value> {
        cluster
            .skiff_json(&["volume", "ls"])
            .as_array()
            .into_iter()
            .flatten()
            .filter(|v| v["anonymous"] == true)
            .cloned()
            .collect()
    };
    assert!(anonymous(&cluster).is_empty(), "{:?}", anonymous(&cluster));
    cluster.skiff_ok(&[
        "service", "create", "--detach", "scratch", "--image", &image,
    ]);
    let replica = cluster
        .wait_replicas("scratch", 1, "healthy", healthy)
        .remove(0);
    let mut listed = Vec::new();
    let reported = wait_until(TIMEOUT, POLL, || {
        listed = anonymous(&cluster);
        !listed.is_empty()
    });
    assert!(
        reported,
        "no anonymous volume listed\n{}",
        cluster.log_tail(30)
    );
    assert_eq!(listed.len(), 1, "{listed:?}");
    let volume = &listed[0];
    let name = volume["name"].as_str().unwrap_or_default().to_string();
    assert!(
        replica
            .id
            .starts_with(volume["alloc_id"].as_str().unwrap_or("?")),
        "{volume}"
    );
    assert_eq!(
        name,
        format!("{}-0", volume["alloc_id"].as_str().unwrap_or("?"))
    );
    assert_eq!(volume["target"], "/data", "{volume}");
    assert_eq!(volume["service"], "scratch", "{volume}");
    let table = cluster.skiff_ok(&["volume", "ls"]);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with(&name) && l.contains("anonymous")),
        "{table}"
    );
    let inspect = cluster.skiff_ok(&["volume", "inspect", &name]);
    assert!(inspect.contains("Target:   /data"), "{inspect}");
    let args = ["volume", "rm", name.as_str()];
    let line = assert_cli_error(&args, &cluster.skiff(&args), &["removed with its replica"]);
    assert!(
        line.contains(volume["alloc_id"].as_str().unwrap_or("?")),
        "{line}"
    );
    cluster.skiff_ok(&["service", "rm", "scratch"]);
    let gone = wait_until(TIMEOUT, POLL, || anonymous(&cluster).is_empty());
    assert!(gone, "still listed: {:?}", anonymous(&cluster));
}
