//! t12: the CLI's polish as an operator meets it — completion scripts, man pages, fixed choices
//! refused with the flag named, `service ls` with image and ports, `-o yaml`, `service ps
//! --watch`, and typed config files under `SKIFF_*` variables — against real `skiff` processes.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use skiff_e2e::{
    assert_cli_error, describe, free_port, run_with_timeout, skiff_at, skiff_bin, wait_until,
    DevCluster, CLI_TIMEOUT, POLL, READY_TIMEOUT,
};

/// `skiff ARGS` with no server involved (and none of the caller's `SKIFF_*` settings).
fn skiff(args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(skiff_bin());
    cmd.env_remove("SKIFF_ADDR").args(args).stdin(Stdio::null());
    run_with_timeout(&mut cmd, CLI_TIMEOUT)
}

/// A child process killed when dropped, so that nothing outlives a failed test.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn completion_scripts_and_man_pages_cover_the_commands() {
    let args = ["completion", "bash"];
    let out = skiff(&args);
    assert!(out.status.success(), "{}", describe(&args, &out));
    let script = String::from_utf8_lossy(&out.stdout);
    assert!(
        script.contains("service") && script.contains("--placement"),
        "{script}"
    );
    for shell in ["zsh", "fish"] {
        let args = ["completion", shell];
        let out = skiff(&args);
        assert!(
            out.status.success() && !out.stdout.is_empty(),
            "{}",
            describe(&args, &out)
        );
    }

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_str().unwrap();
    let args = ["man", path];
    let out = skiff(&args);
    assert!(out.status.success(), "{}", describe(&args, &out));
    for page in [
        "skiff.1",
        "skiff-service.1",
        "skiff-service-create.1",
        "skiff-agent.1",
    ] {
        let text = std::fs::read_to_string(dir.path().join(page))
            .unwrap_or_else(|e| panic!("{page}: {e}"));
        assert!(
            text.starts_with(".ie") || text.contains(".TH"),
            "{page}: {text}"
        );
    }
    let create = std::fs::read_to_string(dir.path().join("skiff-service-create.1")).unwrap();
    assert!(create.contains("placement"), "{create}");
    assert!(
        !dir.path().join("skiff-shim.1").exists(),
        "the hidden shim has no page"
    );
}

#[test]
fn help_groups_options_and_fixed_choices_are_refused_naming_the_flag() {
    let args = ["service", "create", "--help"];
    let out = skiff(&args);
    assert!(out.status.success(), "{}", describe(&args, &out));
    let help = String::from_utf8_lossy(&out.stdout);
    for heading in [
        "Global options:",
        "Health check:",
        "Update policy:",
        "Autoscaling:",
    ] {
        assert!(help.contains(heading), "no {heading:?} in\n{help}");
    }

    let args = [
        "service",
        "create",
        "web",
        "--placement",
        "diagonal",
        "--",
        "true",
    ];
    let out = skiff(&args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&args, &out));
    assert!(
        stderr.contains("--placement") && stderr.contains("spread") && stderr.contains("binpack"),
        "the flag and its choices are named: {stderr}"
    );
}

#[test]
fn service_ls_shows_image_and_ports_and_every_format_reads_back() {
    let cluster = DevCluster::start();
    let published = free_port().to_string();
    let publish = format!("{published}:8080");
    // No replicas: nothing is pulled, so the image need not exist.
    cluster.skiff_ok(&[
        "service",
        "create",
        "web",
        "--detach",
        "--replicas",
        "0",
        "--image",
        "127.0.0.1:5999/demo/web:v1",
        "--publish",
        &publish,
        "--protocol",
        "http",
    ]);

    let table = cluster.skiff_ok(&["service", "ls"]);
    let lines: Vec<&str> = table.lines().collect();
    let header: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(
        header,
        ["NAME", "RUNNING", "RUNTIME", "IMAGE/COMMAND", "PORTS"],
        "{table}"
    );
    let row: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(
        row,
        [
            "web",
            "0/0",
            "oci",
            "127.0.0.1:5999/demo/web:v1",
            &format!("{published}->8080/http")
        ],
        "{table}"
    );

    let yaml = cluster.skiff_ok(&["-o", "yaml", "service", "ls"]);
    let services: serde_yaml::Value =
        serde_yaml::from_str(&yaml).unwrap_or_else(|e| panic!("not YAML ({e}):\n{yaml}"));
    let spec = &services[0]["spec"];
    assert_eq!(spec["name"].as_str(), Some("web"), "{yaml}");
    assert_eq!(
        spec["image"].as_str(),
        Some("127.0.0.1:5999/demo/web:v1"),
        "{yaml}"
    );
    let json = cluster.skiff_json(&["service", "ls"]);
    assert_eq!(
        serde_json::to_value(&services).unwrap(),
        json,
        "YAML and JSON say the same"
    );
    let nodes = cluster.skiff_ok(&["-o", "yaml", "node", "ls"]);
    assert!(
        serde_yaml::from_str::<serde_yaml::Value>(&nodes).is_ok(),
        "{nodes}"
    );
}

#[test]
fn service_ps_watch_redraws_until_the_service_is_removed() {
    let cluster = DevCluster::start();
    cluster.skiff_ok(&[
        "service",
        "create",
        "web",
        "--detach",
        "--replicas",
        "0",
        "--runtime",
        "process",
        "--",
        "sleep",
        "600",
    ]);
    let mut watch = Killed(
        Command::new(skiff_bin())
            .env_remove("SKIFF_ADDR")
            .args([
                "--server",
                &cluster.addr(),
                "service",
                "ps",
                "web",
                "--watch",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start skiff service ps --watch"),
    );
    let (lines_tx, lines) = mpsc::channel();
    let stdout = watch.0.stdout.take().expect("piped stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let mut frames = 0;
    while frames < 2 {
        let line = lines
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("fewer than two frames in 10 s: {seen:?}"));
        frames += usize::from(line.starts_with("Every 1s: skiff service ps web"));
        seen.push(line);
    }
    assert!(seen.iter().any(|l| l.starts_with("ID ")), "{seen:?}");

    cluster.skiff_ok(&["service", "rm", "web"]);
    let ended = wait_until(Duration::from_secs(10), POLL, || {
        matches!(watch.0.try_wait(), Ok(Some(_)))
    });
    assert!(
        ended,
        "the watch ends once the service is removed: {seen:?}"
    );
    let status = watch.0.wait().unwrap();
    seen.extend(lines.try_iter());
    assert!(status.success(), "{status}: {seen:?}");
    assert_eq!(seen.last().map(String::as_str), Some("service web removed"));
}

#[test]
fn a_config_file_with_a_wrong_key_fails_naming_the_key_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("agent.toml");
    std::fs::write(
        &file,
        "name = \"n1\"\nservers = [\"127.0.0.1:1\"]\ndatadir = \"/tmp/nowhere\"\n",
    )
    .unwrap();
    let path = file.to_str().unwrap();
    let args = ["agent", "--config", path, "--advertise", "127.0.0.1"];
    let out = skiff(&args);
    let line = assert_cli_error(&args, &out, &["unknown key"]);
    assert_eq!(
        line,
        format!(
            "error: invalid config file {path}:3: unknown key `datadir`; did you mean `data_dir`?"
        )
    );
}

#[test]
fn a_server_runs_from_its_config_file_and_skiff_variables_override_it() {
    let dir = tempfile::tempdir().unwrap();
    let (in_file, in_env) = (free_port(), free_port());
    let file = dir.path().join("server.toml");
    std::fs::write(
        &file,
        format!(
            "name = \"s1\"\ndata_dir = \"{}\"\nlisten = \"127.0.0.1:{in_file}\"\nbootstrap = true\n",
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.path().join("server.log")).unwrap();
    let _server = Killed(
        Command::new(skiff_bin())
            .env_remove("SKIFF_ADDR")
            .env("SKIFF_LISTEN", format!("127.0.0.1:{in_env}"))
            .arg("server")
            .arg("--config")
            .arg(&file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start skiff server"),
    );
    skiff_e2e::use_cluster_ca(&dir.path().join("data/pki/ca.crt"));
    let status = ["cluster", "status"];
    let answered = wait_until(READY_TIMEOUT, POLL, || {
        skiff_e2e::use_token_of(&dir.path().join("data"))
            && skiff_at(&format!("127.0.0.1:{in_env}"), &status)
                .status
                .success()
    });
    let log = std::fs::read_to_string(dir.path().join("server.log")).unwrap_or_default();
    assert!(
        answered,
        "the server listens where SKIFF_LISTEN says\n--- log ---\n{log}"
    );
    let out = skiff_at(&format!("127.0.0.1:{in_file}"), &status);
    assert!(
        !out.status.success(),
        "not where the file says: {}",
        describe(&status, &out)
    );
    let members =
        String::from_utf8_lossy(&skiff_at(&format!("127.0.0.1:{in_env}"), &status).stdout)
            .into_owned();
    assert!(members.contains("s1"), "the file's name: {members}");
}
