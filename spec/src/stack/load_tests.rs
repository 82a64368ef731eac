//! The loader end to end on Skiff's own format: interpolation and its
//! precedence, `.env`, merging `-f` files, profiles, dependencies, names,
//! and the messages of every kind of mistake.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use super::*;
use crate::{DependsCondition, RuntimeKind};

/// Files in memory, by path.
#[derive(Default)]
pub(crate) struct MemFs {
    pub files: BTreeMap<PathBuf, String>,
}

impl MemFs {
    pub fn with(files: &[(&str, &str)]) -> Self {
        MemFs {
            files: files
                .iter()
                .map(|(p, t)| (PathBuf::from(p), t.to_string()))
                .collect(),
        }
    }
}

impl FileSource for MemFs {
    fn read(&self, path: &Path) -> io::Result<String> {
        self.files
            .get(path)
            .cloned()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such file"))
    }
}

pub(crate) fn options(files: &[(&str, &str)]) -> LoadOptions {
    LoadOptions {
        files: files
            .iter()
            .map(|(p, t)| StackFile {
                path: PathBuf::from(p),
                contents: t.to_string(),
            })
            .collect(),
        ..LoadOptions::default()
    }
}

pub(crate) fn load_with(
    stack: Option<&str>,
    files: &[(&str, &str)],
    fs: &MemFs,
) -> Result<LoadedStack, StackError> {
    let mut opts = options(files);
    opts.stack = stack.map(str::to_string);
    load(&opts, fs)
}

fn load_one(text: &str) -> Result<LoadedStack, StackError> {
    load_with(Some("app"), &[("stack.yaml", text)], &MemFs::default())
}

fn error(text: &str) -> String {
    load_one(text).unwrap_err().to_string()
}

fn vars(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

const WEB: &str = "skiff: v1
services:
  web:
    image: 127.0.0.1:5000/demo/web:v1
    replicas: 2
    command: python3 -m 'http.server' 80
    env: {GREETING: hi}
    port: 80
    publish: 8080
    protocol: http
    health: {http: /healthz, interval: 10s, timeout: 2s, retries: 3}
    update: {strategy: canary, canary: 1, canary-weight: 10, max-error-rate: 5.0, min-healthy-time: 1m30s, healthy-deadline: 2m}
    autoscale: {min: 1, max: 10, target-rps: 100}
    depends-on: {db: healthy}
  db:
    image: postgres:16
    init: false
    entrypoint: []
";

#[test]
fn a_skiff_format_stack_loads_with_full_names_labels_and_dependencies() {
    let loaded = load_one(WEB).unwrap();
    let names: Vec<&str> = loaded.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["app-db", "app-web"]);
    let web = &loaded.services[1];
    assert_eq!(web.runtime, RuntimeKind::Oci);
    assert_eq!(web.command, ["python3", "-m", "http.server", "80"]);
    assert_eq!(web.labels[STACK_LABEL], "app");
    assert_eq!(web.depends_on[0].service, "app-db");
    assert_eq!(web.depends_on[0].condition, DependsCondition::Healthy);
    assert_eq!(web.update.max_error_rate, Some(5));
    assert_eq!(web.update.min_healthy_ms, 90_000);
    assert_eq!(web.health.as_ref().map(|h| h.timeout_ms), Some(2000));
    let db = &loaded.services[0];
    assert_eq!(
        (db.init, db.entrypoint.as_deref()),
        (Some(false), Some(&[][..]))
    );
    assert!(loaded.warnings.is_empty());
}

#[test]
fn without_a_stack_names_are_used_as_they_are_and_no_label_is_added() {
    let loaded = load_with(None, &[("s.yaml", WEB)], &MemFs::default()).unwrap();
    assert_eq!(loaded.services[1].name, "web");
    assert_eq!(loaded.services[1].depends_on[0].service, "db");
    assert!(loaded.services[1].labels.is_empty());
}

#[test]
fn start_order_puts_dependencies_first() {
    let loaded = load_one(WEB).unwrap();
    assert_eq!(
        start_order(&loaded.services).unwrap(),
        ["app-db", "app-web"]
    );
}

#[test]
fn an_unknown_key_names_its_path_and_the_nearest_valid_key() {
    let err = error("skiff: v1\nservices:\n  web:\n    image: busybox\n    replics: 2\n");
    assert_eq!(
        err,
        "stack.yaml:5:5: unknown key services.web.replics; did you mean replicas?"
    );
    let err =
        error("skiff: v1\nservices:\n  web:\n    image: busybox\n    update: {max_surge: 2}\n");
    assert!(
        err.contains("services.web.update.max_surge; did you mean max-surge?"),
        "{err}"
    );
}

#[test]
fn a_wrong_type_names_the_field_and_the_expected_type() {
    let err = error("skiff: v1\nservices:\n  web:\n    image: busybox\n    replicas: two\n");
    assert_eq!(
        err,
        "stack.yaml:5:5: services.web.replicas: expected an integer, found a string \"two\""
    );
}

#[test]
fn a_bare_number_as_a_duration_asks_for_a_unit() {
    let err = error(
        "skiff: v1\nservices:\n  web:\n    image: busybox\n    health: {tcp: true, interval: 10}\n",
    );
    assert!(
        err.contains("services.web.health.interval: 10 has no unit"),
        "{err}"
    );
}

#[test]
fn a_validation_error_names_the_service() {
    let err = error("skiff: v1\nservices:\n  web:\n    image: busybox\n    replicas: 5000\n");
    assert!(
        err.starts_with("stack.yaml:3:3: services.web: invalid replicas: 5000"),
        "{err}"
    );
}

#[test]
fn a_name_too_long_with_its_stack_names_both() {
    let long = "s".repeat(60);
    let err = error(&format!(
        "skiff: v1\nservices:\n  {long}:\n    image: busybox\n"
    ));
    assert!(
        err.contains(&format!(
            "stack app and service {long} make the service name app-{long}"
        )),
        "{err}"
    );
}

#[test]
fn malformed_yaml_gives_the_file_line_and_column() {
    let err = error("skiff: v1\nservices:\n  web:\n    image: busybox\n   replicas: 2\n");
    assert!(err.starts_with("stack.yaml:5:4: malformed YAML"), "{err}");
}

#[test]
fn variables_follow_command_line_then_shell_then_dotenv() {
    let text = "skiff: v1\nservices:\n  web:\n    image: busybox:${TAG}\n    replicas: \"${N:-2}\"\n    env: {A: $A, B: '${B}', C: '$$C'}\n";
    let fs = MemFs::with(&[(".env", "TAG=env\nA=env\nB=env\n")]);
    let mut opts = options(&[("stack.yaml", text)]);
    opts.dotenv = Some(PathBuf::from(".env"));
    opts.shell_vars = vars(&[("TAG", "shell"), ("A", "shell")]);
    opts.cli_vars = vars(&[("TAG", "cli")]);
    let loaded = load(&opts, &fs).unwrap();
    let web = &loaded.services[0];
    assert_eq!(web.image.as_deref(), Some("busybox:cli"));
    assert_eq!(web.replicas, 2);
    assert_eq!(web.env, vars(&[("A", "shell"), ("B", "env"), ("C", "$C")]));
}

#[test]
fn a_missing_dotenv_file_means_no_variables() {
    let mut opts = options(&[(
        "stack.yaml",
        "skiff: v1\nservices:\n  web:\n    image: busybox:${TAG:-latest}\n",
    )]);
    opts.dotenv = Some(PathBuf::from("/nowhere/.env"));
    let loaded = load(&opts, &MemFs::default()).unwrap();
    assert_eq!(loaded.services[0].image.as_deref(), Some("busybox:latest"));
}

#[test]
fn a_malformed_dotenv_file_is_refused_with_its_line() {
    let mut opts = options(&[("stack.yaml", "skiff: v1\nservices: {}\n")]);
    opts.dotenv = Some(PathBuf::from(".env"));
    let err = load(&opts, &MemFs::with(&[(".env", "# ok\nA=1\noops\n")])).unwrap_err();
    assert!(err.to_string().starts_with(".env:3: "), "{err}");
}

#[test]
fn a_required_variable_that_is_unset_fails_with_its_message_and_path() {
    let err = error(
        "skiff: v1\nservices:\n  web:\n    image: \"busybox:${TAG:?set TAG to the release}\"\n",
    );
    assert_eq!(
        err,
        "stack.yaml:4:5: services.web.image: required variable TAG is not set: set TAG to the release"
    );
}

#[test]
fn an_unset_variable_becomes_empty_with_a_warning_and_strict_refuses_it() {
    let text = "skiff: v1\nservices:\n  web:\n    image: busybox\n    env: {A: \"x${UNSET}\"}\n";
    let loaded = load_one(text).unwrap();
    assert_eq!(loaded.services[0].env["A"], "x");
    assert_eq!(
        loaded.warnings,
        ["stack.yaml:5:5: services.web.env.A: variable UNSET is not set; using an empty string"]
    );
    let mut opts = options(&[("stack.yaml", text)]);
    opts.strict = true;
    let err = load(&opts, &MemFs::default()).unwrap_err();
    assert!(matches!(err, StackError::Strict { .. }), "{err}");
    assert!(err.to_string().contains("UNSET"), "{err}");
}

#[test]
fn later_files_override_earlier_ones_and_env_merges_by_key() {
    let base = "skiff: v1\nservices:\n  web:\n    image: busybox\n    command: [a, b]\n    env: {A: '1', B: '2'}\n    update: {max-surge: 2}\n";
    let over = "skiff: v1\nservices:\n  web:\n    command: [c]\n    env: {B: '3'}\n    update: {canary: 2}\n";
    let loaded = load_with(
        Some("app"),
        &[("a.yaml", base), ("b.yaml", over)],
        &MemFs::default(),
    )
    .unwrap();
    let web = &loaded.services[0];
    assert_eq!(web.command, ["c"]);
    assert_eq!(web.env, vars(&[("A", "1"), ("B", "3")]));
    assert_eq!((web.update.max_surge, web.update.canary), (2, 2));
}

#[test]
fn mixing_formats_across_files_is_refused() {
    let err = load_with(
        Some("app"),
        &[
            ("compose.yaml", "services: {}\n"),
            ("skiff.yaml", "skiff: v1\nservices: {}\n"),
        ],
        &MemFs::default(),
    )
    .unwrap_err();
    assert!(matches!(err, StackError::MixedFormats { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("skiff.yaml is in Skiff's own format"),
        "{err}"
    );
}

#[test]
fn profiles_include_a_service_only_when_one_of_them_is_asked_for() {
    let text = "skiff: v1\nservices:\n  web:\n    image: busybox\n  debug:\n    image: busybox\n    profiles: [debug]\n";
    let loaded = load_one(text).unwrap();
    assert_eq!(loaded.services.len(), 1);
    let mut opts = options(&[("stack.yaml", text)]);
    opts.stack = Some("app".into());
    opts.profiles = vec!["debug".into()];
    assert_eq!(load(&opts, &MemFs::default()).unwrap().services.len(), 2);
}

#[test]
fn a_dependency_on_a_service_left_out_by_profile_names_both() {
    let text = "skiff: v1\nservices:\n  web:\n    image: busybox\n    depends-on: [debug]\n  debug:\n    image: busybox\n    profiles: [tools]\n";
    let err = error(text);
    assert!(
        err.contains("web depends on debug, which only runs with profile tools"),
        "{err}"
    );
}

#[test]
fn a_dependency_on_an_unknown_service_and_a_cycle_are_refused() {
    let err = error("skiff: v1\nservices:\n  web:\n    image: busybox\n    depends-on: [dbb]\n  db:\n    image: busybox\n");
    assert!(
        err.contains("web depends on dbb, which is not a service of this stack; did you mean db?"),
        "{err}"
    );
    let err = error("skiff: v1\nservices:\n  web:\n    image: busybox\n    depends-on: [api]\n  api:\n    image: busybox\n    depends-on: {web: started}\n");
    assert_eq!(
        err,
        "depends_on forms a cycle: api -> web -> api; remove one of these dependencies"
    );
}

#[test]
fn health_needs_exactly_one_kind() {
    let err = error(
        "skiff: v1\nservices:\n  web:\n    image: busybox\n    health: {http: /, tcp: true}\n",
    );
    assert!(err.contains("exactly one of"), "{err}");
    let loaded = load_one("skiff: v1\nservices:\n  web:\n    image: busybox\n    health: {cmd: \"pg_isready -U app\"}\n").unwrap();
    let health = loaded.services[0].health.clone().map(|h| h.kind);
    assert_eq!(
        health,
        Some(crate::HealthKind::Exec {
            command: vec!["pg_isready".into(), "-U".into(), "app".into()]
        })
    );
}

#[test]
fn a_process_service_runs_its_command() {
    let loaded = load_one("skiff: v1\nservices:\n  web:\n    runtime: process\n    command: [python3, -m, http.server, $$PORT]\n").unwrap();
    assert_eq!(loaded.services[0].runtime, RuntimeKind::Process);
    assert_eq!(loaded.services[0].command[3], "$PORT");
}

#[test]
fn a_skiff_format_job_reads_and_writes_its_retries_and_deadline() {
    let text = "skiff: v1\nservices:\n  migrate:\n    image: busybox\n    mode: job\n    max-retries: 2\n    deadline: 10m\n";
    let loaded = load_one(text).unwrap();
    let job = &loaded.services[0];
    assert_eq!(
        (job.mode, job.max_retries, job.deadline_secs),
        (crate::ServiceMode::Job, 2, Some(600))
    );
    let written = export(Some("app"), &loaded.services);
    assert!(
        written.contains("max-retries: 2") && written.contains("deadline: 10m"),
        "{written}"
    );
    let again = load_one(&written).unwrap();
    assert_eq!(again.services, loaded.services);
    let err = error(
        "skiff: v1\nservices:\n  migrate:\n    image: busybox\n    mode: job\n    deadline: 0s\n",
    );
    assert!(err.contains("services.migrate.deadline"), "{err}");
}
