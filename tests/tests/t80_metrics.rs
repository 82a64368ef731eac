//! Metrics: a running `skiff dev` serves its server's and its agent's
//! `/metrics`, which parse as Prometheus text; `deploy/prometheus/`'s
//! scrape config and alert rules pass `promtool` (when installed: Debian's
//! `prometheus` package, which `deploy/test.sh` installs).

use std::process::Command;
use std::time::Duration;

use skiff_e2e::metrics::scrape;
use skiff_e2e::{skiff_ok_at, wait_until, workspace_root, DevCluster, POLL};

fn promtool() -> Option<&'static str> {
    Command::new("promtool")
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|_| "promtool")
}

fn promtool_ok(args: &[&str]) {
    let Some(promtool) = promtool() else {
        eprintln!("promtool not installed: skipping promtool {args:?}");
        return;
    };
    let out = Command::new(promtool)
        .args(args)
        .current_dir(workspace_root().join("deploy/prometheus"))
        .output()
        .expect("run promtool");
    assert!(
        out.status.success(),
        "promtool {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_scrape_config_and_alert_rules_pass_promtool_and_their_unit_tests() {
    promtool_ok(&["check", "config", "prometheus.yml"]);
    promtool_ok(&["check", "rules", "rules.yml"]);
    promtool_ok(&["test", "rules", "rules_test.yml"]);
}

#[test]
fn skiff_dev_serves_server_and_agent_metrics_that_parse_as_prometheus_text() {
    let dev = DevCluster::start();
    let server = dev.addr();
    skiff_ok_at(
        &server,
        &[
            "service",
            "create",
            "m80",
            "--replicas",
            "1",
            "--",
            "sleep",
            "600",
        ],
    );
    let mut exposition = None;
    let running = wait_until(Duration::from_secs(30), POLL, || {
        let e = scrape(dev.server_metrics_addr());
        let ok = e
            .named("skiff_service_running_replicas")
            .any(|s| s.label("service") == Some("m80") && s.value == 1.0);
        exposition = Some(e);
        ok
    });
    let e = exposition.expect("scraped");
    assert!(running, "m80 never counted as running: {:?}", e.by_key());
    let by_key = e.by_key();
    assert_eq!(e.value("skiff_raft_is_leader"), Some(1.0));
    assert_eq!(e.value("skiff_raft_has_leader"), Some(1.0));
    assert!(e.value("skiff_raft_term").unwrap_or(0.0) >= 1.0);
    assert_eq!(e.value("skiff_services"), Some(1.0));
    assert_eq!(
        by_key.get("skiff_service_desired_replicas{service=\"m80\"}"),
        Some(&1.0)
    );
    assert_eq!(by_key.get("skiff_nodes{status=\"ready\"}"), Some(&1.0));
    assert!(e.value("skiff_raft_commit_seconds_count").unwrap_or(0.0) >= 1.0);
    assert!(e.value("skiff_raft_proposals_total").unwrap_or(0.0) >= 1.0);
    assert!(e.value("process_resident_memory_bytes").unwrap_or(0.0) > 0.0);
    assert!(e.value("skiff_data_dir_free_bytes").unwrap_or(0.0) > 0.0);
    assert!(e.value("skiff_raft_apply_seconds_count").unwrap_or(0.0) >= 1.0);
    assert!(e.value("skiff_raft_snapshot_seconds_count").is_some());
    assert!(e.value("skiff_raft_log_bytes").unwrap_or(0.0) > 0.0);
    assert!(e.value("skiff_raft_snapshot_bytes").unwrap_or(0.0) > 0.0);
    // API calls by method and status: the CLI's create was answered.
    let created: Vec<_> = e
        .named("skiff_api_request_seconds_count")
        .filter(|s| s.label("method") == Some("CreateService") && s.label("code") == Some("Ok"))
        .collect();
    assert!(
        created.len() == 1 && created[0].value >= 1.0,
        "{:?}",
        e.by_key()
    );

    for addr in [dev.server_metrics_addr(), dev.agent_metrics_addr()] {
        let e = scrape(addr);
        let build: Vec<_> = e.named("skiff_build_info").collect();
        assert_eq!(build.len(), 1, "{addr}");
        assert_eq!(build[0].value, 1.0);
        assert!(build[0].label("version").is_some() && build[0].label("commit").is_some());
        assert!(e.value("process_cpu_seconds_total").is_some(), "{addr}");
        if addr == dev.agent_metrics_addr() {
            assert!(
                e.value("skiff_image_pull_seconds_count").is_some(),
                "{addr}"
            );
            assert!(
                e.value("skiff_image_pull_failures_total").is_some(),
                "{addr}"
            );
        }
        // promtool parses (and lints) the exposition too, when installed.
        if let Some(promtool) = promtool() {
            let (_, body) = skiff_e2e::metrics::get(addr).expect("scrape");
            let mut child = Command::new(promtool)
                .args(["check", "metrics"])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("run promtool");
            use std::io::Write;
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(body.as_bytes())
                .expect("write");
            let out = child.wait_with_output().expect("promtool");
            assert!(
                out.status.success(),
                "promtool check metrics on {addr}:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    // The agent still publishes where it serves them.
    let published = skiff_ok_at(&server, &["var", "get", "_skiff/nodes/dev/metrics"]);
    assert_eq!(published.trim(), dev.agent_metrics_addr().to_string());
}
