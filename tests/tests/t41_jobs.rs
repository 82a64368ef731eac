//! t41: one-shot jobs (issue #15 item 6) on `skiff dev` with process
//! replicas: a job that fails twice then succeeds ends succeeded with
//! `--max-retries 2` and `job run --wait` exits 0; one that always exits 3
//! with `--max-retries 1` ends failed after two attempts and `--wait`
//! exits 3; `job ls`, `ps`, `logs`, `rm`; `job run` of a taken name is
//! refused naming `job rm` and `--replace`, which runs it anew; a stack
//! file's job takes `max-retries` and `deadline`; bad input
//! in one line naming the field.

use std::time::Duration;

use skiff_e2e::{assert_cli_error, describe, wait_until, DevCluster, POLL};

/// A command that fails until its third run (counted in `dir/count`).
fn third_time_lucky(dir: &std::path::Path) -> String {
    let count = dir.join("count");
    let count = count.display();
    format!(
        "n=$(cat {count} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {count}; echo attempt $n; [ $n -ge 3 ]"
    )
}

#[test]
fn a_job_that_fails_twice_then_succeeds_ends_succeeded_and_wait_exits_with_its_code() {
    let cluster = DevCluster::start();
    let dir = tempfile::tempdir().expect("temporary directory");
    let script = third_time_lucky(dir.path());

    // Fails twice, succeeds on the third attempt: --wait exits 0.
    let args = [
        "job",
        "run",
        "migrate",
        "--runtime",
        "process",
        "--max-retries",
        "2",
        "--wait",
        "--",
        "sh",
        "-c",
        &script,
    ];
    let out = cluster.skiff(&args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", describe(&args, &out));
    assert!(stdout.contains("attempt 3"), "{stdout}");
    assert!(stdout.contains("job migrate succeeded"), "{stdout}");
    let job = cluster.skiff_json(&["service", "inspect", "migrate"]);
    assert_eq!(job["job_state"], "succeeded", "{job}");
    assert_eq!(job["job_attempts"], 3, "{job}");
    assert_eq!(job["job_exit_code"], 0, "{job}");

    // Always exits 3, one retry: two attempts, then failed; --wait exits 3.
    let args = [
        "job",
        "run",
        "broken",
        "--runtime",
        "process",
        "--max-retries",
        "1",
        "--wait",
        "--",
        "sh",
        "-c",
        "echo doomed; exit 3",
    ];
    let out = cluster.skiff(&args);
    assert_eq!(out.status.code(), Some(3), "{}", describe(&args, &out));
    let job = cluster.skiff_json(&["service", "inspect", "broken"]);
    assert_eq!(job["job_state"], "failed", "{job}");
    assert_eq!(job["job_attempts"], 2, "{job}");
    // No third attempt is placed after the job failed.
    std::thread::sleep(Duration::from_millis(600));
    let job = cluster.skiff_json(&["service", "inspect", "broken"]);
    assert_eq!(
        job["allocations"].as_array().map(Vec::len),
        Some(2),
        "{job}"
    );

    // ls lists both with their state; service ls lists neither.
    let ls = cluster.skiff_ok(&["job", "ls"]);
    assert!(ls.contains("migrate") && ls.contains("succeeded"), "{ls}");
    assert!(ls.contains("broken") && ls.contains("failed"), "{ls}");
    let services = cluster.skiff_ok(&["service", "ls"]);
    assert!(!services.contains("migrate"), "{services}");

    // ps shows every attempt with its end.
    let ps = cluster.skiff_ok(&["job", "ps", "migrate"]);
    assert!(ps.contains("succeeded, 3 of 3 attempts ended"), "{ps}");
    let job = cluster.skiff_json(&["service", "inspect", "migrate"]);
    let states: Vec<&str> = job["allocations"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a["state"].as_str())
        .collect();
    assert_eq!(
        states.iter().filter(|s| **s == "completed").count(),
        1,
        "{ps}"
    );
    assert_eq!(states.iter().filter(|s| **s == "exited").count(), 2, "{ps}");

    // logs of every attempt.
    let logs = cluster.skiff_ok(&["job", "logs", "broken"]);
    assert_eq!(logs.matches("doomed").count(), 2, "{logs}");

    // A job without --wait returns at once and runs in the background.
    cluster.skiff_ok(&[
        "job",
        "run",
        "quick",
        "--runtime",
        "process",
        "--",
        "sh",
        "-c",
        "exit 0",
    ]);
    assert!(
        wait_until(Duration::from_secs(10), POLL, || {
            cluster.skiff_json(&["service", "inspect", "quick"])["job_state"] == "succeeded"
        }),
        "quick never succeeded"
    );

    // A deadline fails a job that runs too long and stops its attempt.
    let args = [
        "job",
        "run",
        "slow",
        "--runtime",
        "process",
        "--deadline",
        "1s",
        "--wait",
        "--",
        "sleep",
        "30",
    ];
    let out = cluster.skiff(&args);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&args, &out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("deadline"),
        "{}",
        describe(&args, &out)
    );

    // Running a job again under its name is refused with the fix; --replace does it.
    let args = [
        "job",
        "run",
        "migrate",
        "--runtime",
        "process",
        "--",
        "sh",
        "-c",
        "exit 0",
    ];
    let line = assert_cli_error(&args, &cluster.skiff(&args), &["already exists"]);
    assert!(
        line.contains("skiff job rm migrate") && line.contains("--replace"),
        "{line}"
    );
    let args = [
        "job",
        "run",
        "migrate",
        "--replace",
        "--max-retries",
        "1",
        "--runtime",
        "process",
        "--wait",
        "--",
        "sh",
        "-c",
        "echo replaced",
    ];
    let out = cluster.skiff(&args);
    assert!(out.status.success(), "{}", describe(&args, &out));
    let job = cluster.skiff_json(&["service", "inspect", "migrate"]);
    assert_eq!(job["job_state"], "succeeded", "{job}");
    assert_eq!(job["job_attempts"], 1, "a new job counts anew: {job}");
    assert_eq!(job["spec"]["max_retries"], 1, "{job}");
    // A service is never replaced by a job.
    cluster.skiff_ok(&[
        "service",
        "create",
        "--detach",
        "web",
        "--runtime",
        "process",
        "--",
        "sleep",
        "30",
    ]);
    let args = [
        "job",
        "run",
        "web",
        "--replace",
        "--runtime",
        "process",
        "--",
        "true",
    ];
    assert_cli_error(
        &args,
        &cluster.skiff(&args),
        &["web is a service, not a job"],
    );
    cluster.skiff_ok(&["service", "rm", "web"]);

    // A stack file's job with its retries and deadline (Skiff's format: Compose needs an
    // image) runs to completion like `job run`.
    let file = dir.path().join("stack.yaml");
    std::fs::write(
        &file,
        "skiff: v1\nservices:\n  once:\n    runtime: process\n    mode: job\n    max-retries: 1\n    deadline: 2m\n    command: [sh, -c, \"exit 0\"]\n",
    )
    .expect("write the stack file");
    let file = file.to_string_lossy().into_owned();
    cluster.skiff_ok(&["stack", "deploy", "st", "-f", &file, "--detach"]);
    assert!(
        wait_until(Duration::from_secs(10), POLL, || {
            cluster.skiff_json(&["service", "inspect", "st-once"])["job_state"] == "succeeded"
        }),
        "st-once never succeeded"
    );
    let job = cluster.skiff_json(&["service", "inspect", "st-once"]);
    assert_eq!(job["spec"]["max_retries"], 1, "{job}");
    assert_eq!(job["spec"]["deadline_secs"], 120, "{job}");

    // rm removes it.
    cluster.skiff_ok(&["job", "rm", "broken"]);
    let ls = cluster.skiff_ok(&["job", "ls"]);
    assert!(!ls.contains("broken"), "{ls}");

    // Bad input: one line naming the field.
    for (bad, field) in [("-1", "max-retries"), ("1000000", "max-retries")] {
        let args = [
            "job",
            "run",
            "bad",
            "--runtime",
            "process",
            "--max-retries",
            bad,
            "--",
            "true",
        ];
        assert_cli_error(&args, &cluster.skiff(&args), &[field]);
    }
    let args = ["job", "ps", "nosuch"];
    assert_cli_error(&args, &cluster.skiff(&args), &["nosuch"]);
}
