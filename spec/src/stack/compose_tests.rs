//! Compose files: every supported key onto the spec, every refused key
//! with its fix, and a realistic stack.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::load_tests::{load_with, options, MemFs};
use super::*;
use crate::{
    Constraint, DependsCondition, HealthCheck, HealthKind, NetworkMode, Protocol, RuntimeKind,
    ServiceMode, UpdatePolicy,
};

pub(crate) const REALISTIC: &str = r#"
name: shop
x-defaults: &defaults
  restart: unless-stopped
services:
  web:
    <<: *defaults
    image: 127.0.0.1:5000/shop/web:${TAG:-v1}
    ports: ["8080:80"]
    environment:
      DATABASE_URL: postgres://app@db/app
      REDIS_URL: redis://cache:6379
    depends_on:
      db: {condition: service_healthy}
      cache: {condition: service_started}
    healthcheck:
      test: ["CMD", "wget", "-q", "-O-", "http://localhost/healthz"]
      interval: 10s
      timeout: 3s
      retries: 3
      start_period: 5s
    deploy:
      replicas: 3
      resources:
        limits: {cpus: "0.5", memory: 256M}
      update_config:
        parallelism: 1
        order: start-first
        failure_action: rollback
        monitor: 10s
  db:
    image: postgres:16
    environment:
      POSTGRES_USER: app
      POSTGRES_DB: app
    healthcheck:
      test: ["CMD-SHELL", "pg_isready -U app"]
      interval: 5s
      timeout: 5s
      retries: 5
    deploy:
      resources:
        limits: {cpus: 1, memory: 1g}
  cache:
    image: redis:7-alpine
    command: redis-server --save "" --appendonly no
    healthcheck:
      test: redis-cli ping
    deploy:
      resources:
        limits: {memory: 128m}
"#;

fn realistic_specs() -> Vec<ServiceSpec> {
    let health =
        |command: Vec<&str>, interval_ms, timeout_ms, retries, start_period_ms| HealthCheck {
            kind: HealthKind::Exec {
                command: command.into_iter().map(String::from).collect(),
            },
            interval_ms,
            timeout_ms,
            retries,
            start_period_ms,
        };
    let labels: BTreeMap<String, String> = [(STACK_LABEL.to_string(), "shop".to_string())].into();
    let base = ServiceSpec {
        runtime: RuntimeKind::Oci,
        replicas: 1,
        labels,
        ..ServiceSpec::default()
    };
    vec![
        ServiceSpec {
            name: "shop-cache".into(),
            image: Some("redis:7-alpine".into()),
            command: ["redis-server", "--save", "", "--appendonly", "no"]
                .map(String::from)
                .to_vec(),
            memory_mb: Some(128),
            health: Some(health(vec!["/bin/sh", "-c", "redis-cli ping"], 0, 0, 0, 0)),
            ..base.clone()
        },
        ServiceSpec {
            name: "shop-db".into(),
            image: Some("postgres:16".into()),
            env: [("POSTGRES_USER", "app"), ("POSTGRES_DB", "app")]
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .into(),
            cpu_millis: Some(1000),
            memory_mb: Some(1024),
            health: Some(health(
                vec!["/bin/sh", "-c", "pg_isready -U app"],
                5000,
                5000,
                5,
                0,
            )),
            ..base.clone()
        },
        ServiceSpec {
            name: "shop-web".into(),
            image: Some("127.0.0.1:5000/shop/web:v1".into()),
            replicas: 3,
            env: [
                ("DATABASE_URL", "postgres://app@db/app"),
                ("REDIS_URL", "redis://cache:6379"),
            ]
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .into(),
            port: Some(80),
            publish: Some(8080),
            cpu_millis: Some(500),
            memory_mb: Some(256),
            health: Some(health(
                vec!["wget", "-q", "-O-", "http://localhost/healthz"],
                10_000,
                3000,
                3,
                5000,
            )),
            update: UpdatePolicy {
                max_parallel: 1,
                max_surge: 1,
                max_unavailable: 0,
                min_healthy_ms: 10_000,
                auto_rollback: true,
                ..UpdatePolicy::default()
            },
            depends_on: vec![
                crate::Dependency {
                    service: "shop-db".into(),
                    condition: DependsCondition::Healthy,
                },
                crate::Dependency {
                    service: "shop-cache".into(),
                    condition: DependsCondition::Started,
                },
            ],
            ..base
        },
    ]
}

#[test]
fn a_realistic_compose_file_loads_into_the_expected_specs() {
    let loaded = load_with(
        Some("shop"),
        &[("compose.yaml", REALISTIC)],
        &MemFs::default(),
    )
    .unwrap();
    assert_eq!(loaded.services, realistic_specs());
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    assert_eq!(
        start_order(&loaded.services).unwrap(),
        ["shop-cache", "shop-db", "shop-web"]
    );
}

#[test]
fn the_realistic_file_with_a_named_volume_mounts_it_scoped_to_the_stack() {
    let text = REALISTIC.replace(
        "    image: postgres:16\n",
        "    image: postgres:16\n    volumes: [\"pgdata:/var/lib/postgresql/data\"]\n",
    ) + "volumes:\n  pgdata:\n";
    let loaded = load_with(Some("shop"), &[("compose.yaml", &text)], &MemFs::default()).unwrap();
    let db = loaded
        .services
        .iter()
        .find(|s| s.name == "shop-db")
        .unwrap();
    assert_eq!(
        db.volumes,
        vec![crate::Mount::parse_volume("shop-pgdata:/var/lib/postgresql/data").unwrap()]
    );
}

#[test]
fn a_named_volume_must_be_declared_at_the_top_level() {
    let err = error_of("image: busybox\nvolumes: [\"data:/data\"]\n");
    assert!(
        err.contains("services.web.volumes[0]: volume data is not declared; add it under the top-level volumes:"),
        "{err}"
    );
}

/// Loads one service `web` from a Compose service body.
fn web(body: &str) -> Result<LoadedStack, StackError> {
    let text = format!("services:\n  web:\n{}", indent(body));
    load_with(Some("app"), &[("compose.yaml", &text)], &MemFs::default())
}

fn indent(body: &str) -> String {
    body.lines().map(|l| format!("    {l}\n")).collect()
}

fn spec_of(body: &str) -> ServiceSpec {
    let loaded = web(body).unwrap_or_else(|e| panic!("{e}"));
    loaded.services[0].clone()
}

fn warnings_of(body: &str) -> Vec<String> {
    web(body).unwrap_or_else(|e| panic!("{e}")).warnings
}

fn error_of(body: &str) -> String {
    web(body).unwrap_err().to_string()
}

const IMAGE: &str = "image: busybox\n";

#[test]
fn image_is_required_and_runs_as_oci() {
    let s = spec_of(IMAGE);
    assert_eq!(
        (s.runtime, s.image.as_deref(), s.replicas),
        (RuntimeKind::Oci, Some("busybox"), 1)
    );
    assert!(error_of("command: [sh]\n").contains("services.web: has no image"));
}

#[test]
fn command_and_entrypoint_take_a_string_or_a_list() {
    let s = spec_of(
        "image: busybox\ncommand: sh -c 'echo \"hi there\"'\nentrypoint: [/bin/tini, --]\n",
    );
    assert_eq!(s.command, ["sh", "-c", "echo \"hi there\""]);
    assert_eq!(
        s.entrypoint,
        Some(vec!["/bin/tini".to_string(), "--".to_string()])
    );
    assert_eq!(
        spec_of("image: busybox\nentrypoint: \"\"\n").entrypoint,
        Some(vec![])
    );
}

#[test]
fn environment_takes_a_map_or_a_list_and_bare_names_come_from_variables() {
    let mut opts = options(&[(
        "compose.yaml",
        "services:\n  web:\n    image: busybox\n    environment: [A=1, B, C, D=x=y]\n  api:\n    image: busybox\n    environment: {N: 2, T: true, B: }\n",
    )]);
    opts.stack = Some("app".into());
    opts.shell_vars = [("B".to_string(), "from-shell".to_string())].into();
    let loaded = load(&opts, &MemFs::default()).unwrap();
    let env = |i: usize| loaded.services[i].env.clone();
    let pairs = |p: &[(&str, &str)]| -> BTreeMap<String, String> {
        p.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    assert_eq!(
        env(1),
        pairs(&[("A", "1"), ("B", "from-shell"), ("D", "x=y")])
    );
    assert_eq!(
        env(0),
        pairs(&[("N", "2"), ("T", "true"), ("B", "from-shell")])
    );
    assert!(
        loaded
            .warnings
            .iter()
            .any(|w| w.contains("services.web.environment.C")),
        "{:?}",
        loaded.warnings
    );
}

#[test]
fn env_files_are_read_relative_to_the_first_file_and_environment_wins() {
    let fs = MemFs::with(&[
        ("/proj/common.env", "A=common\nB=common\n"),
        ("/proj/web.env", "B=web\nC=web\n"),
    ]);
    let text = "services:\n  web:\n    image: busybox\n    env_file: [common.env, {path: web.env, required: true}, {path: missing.env, required: false}]\n    environment: {C: env}\n";
    let loaded = load_with(Some("app"), &[("/proj/compose.yaml", text)], &fs).unwrap();
    let env: Vec<(&str, &str)> = loaded.services[0]
        .env
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(env, [("A", "common"), ("B", "web"), ("C", "env")]);
    let text = "services:\n  web:\n    image: busybox\n    env_file: missing.env\n";
    let err = load_with(Some("app"), &[("/proj/compose.yaml", text)], &fs)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("services.web.env_file: /proj/missing.env does not exist"),
        "{err}"
    );
}

#[test]
fn ports_give_one_published_port_and_the_container_port() {
    let s = spec_of("image: busybox\nports: [\"8080:80/tcp\"]\n");
    assert_eq!((s.publish, s.port), (Some(8080), Some(80)));
    let s = spec_of("image: busybox\nports: [{target: 80, published: \"8081\", protocol: tcp, mode: ingress, app_protocol: http}]\n");
    assert_eq!(
        (s.publish, s.port, s.protocol),
        (Some(8081), Some(80), Protocol::Http)
    );
}

#[test]
fn a_container_port_alone_is_not_published_and_says_so() {
    let s = spec_of("image: busybox\nports: [\"80\"]\n");
    assert_eq!((s.publish, s.port), (None, Some(80)));
    let warnings = warnings_of("image: busybox\nports: [80]\n");
    assert!(
        warnings[0].contains("services.web.ports[0]: port 80 has no published port"),
        "{warnings:?}"
    );
}

#[test]
fn a_host_ip_is_accepted_with_a_warning() {
    let warnings = warnings_of("image: busybox\nports: [\"127.0.0.1:8080:80\"]\n");
    assert!(
        warnings[0].contains("listens on every node's address"),
        "{warnings:?}"
    );
    assert_eq!(
        spec_of("image: busybox\nports: [\"127.0.0.1:8080:80\"]\n").publish,
        Some(8080)
    );
}

#[test]
fn port_ranges_udp_and_two_published_ports_are_refused() {
    assert!(error_of("image: busybox\nports: [\"8000-8010:80\"]\n").contains("port range"));
    assert!(error_of("image: busybox\nports: [\"53:53/udp\"]\n").contains("TCP only"));
    let err = error_of("image: busybox\nports: [\"8080:80\", \"8443:443\"]\n");
    assert!(err.contains("Skiff publishes one port per service: keep one in ports, move others to their own service"), "{err}");
}

#[test]
fn expose_sets_the_container_port_when_ports_gave_none() {
    assert_eq!(
        spec_of("image: busybox\nexpose: [\"3000\", 3001]\n").port,
        Some(3000)
    );
    assert!(warnings_of("image: busybox\nexpose: [3000, 3001]\n")[0].contains("expose[1]"));
    assert_eq!(
        spec_of("image: busybox\nports: [\"8080:80\"]\nexpose: [3000]\n").port,
        Some(80)
    );
}

#[test]
fn healthcheck_tests_become_exec_checks_with_their_timing() {
    let s = spec_of("image: busybox\nhealthcheck: {test: [CMD, true], interval: 1m, timeout: 10s, retries: 2, start_period: 30s}\n");
    let h = s.health.unwrap();
    assert_eq!(
        h.kind,
        HealthKind::Exec {
            command: vec!["true".into()]
        }
    );
    assert_eq!(
        (h.interval_ms, h.timeout_ms, h.retries, h.start_period_ms),
        (60_000, 10_000, 2, 30_000)
    );
    let s = spec_of("image: busybox\nhealthcheck: {test: [CMD-SHELL, curl -f localhost]}\n");
    assert_eq!(
        s.health.unwrap().kind,
        HealthKind::Exec {
            command: vec!["/bin/sh".into(), "-c".into(), "curl -f localhost".into()]
        }
    );
}

#[test]
fn a_disabled_healthcheck_is_left_to_the_image_with_a_warning() {
    for body in [
        "healthcheck: {test: [NONE]}\n",
        "healthcheck: {disable: true}\n",
    ] {
        let body = format!("{IMAGE}{body}");
        assert_eq!(spec_of(&body).health, None);
        assert!(warnings_of(&body)[0].contains("cannot turn off an image's HEALTHCHECK"));
    }
    assert!(
        warnings_of("image: busybox\nhealthcheck: {test: [CMD, x], start_interval: 1s}\n")[0]
            .contains("start_interval")
    );
}

#[test]
fn depends_on_takes_the_short_and_the_long_form() {
    let text = "services:\n  web:\n    image: busybox\n    depends_on: [db]\n  api:\n    image: busybox\n    depends_on:\n      db: {condition: service_healthy, required: false, restart: true}\n  db:\n    image: busybox\n";
    let loaded = load_with(Some("app"), &[("compose.yaml", text)], &MemFs::default()).unwrap();
    let api = &loaded.services[0];
    assert_eq!(api.depends_on[0].service, "app-db");
    assert_eq!(api.depends_on[0].condition, DependsCondition::Healthy);
    let completed = text.replace("service_healthy", "service_completed_successfully");
    let err = load_with(
        Some("app"),
        &[("compose.yaml", &completed)],
        &MemFs::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("one-shot jobs"), "{err}");
    assert_eq!(
        loaded.services[2].depends_on[0].condition,
        DependsCondition::Started
    );
    assert_eq!(loaded.warnings.len(), 2, "{:?}", loaded.warnings);
}

#[test]
fn depends_on_an_unknown_service_or_in_a_cycle_is_refused() {
    let err = error_of("image: busybox\ndepends_on: [db]\n");
    assert!(
        err.contains(
            "services.web.depends_on.db: web depends on db, which is not a service of this stack"
        ),
        "{err}"
    );
    let text = "services:\n  web:\n    image: busybox\n    depends_on: [api]\n  api:\n    image: busybox\n    depends_on: [web]\n";
    let err = load_with(Some("app"), &[("c.yaml", text)], &MemFs::default()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "depends_on forms a cycle: api -> web -> api; remove one of these dependencies"
    );
}

#[test]
fn deploy_replicas_mode_and_resources_map_onto_the_spec() {
    let s = spec_of("image: busybox\ndeploy: {replicas: \"4\", mode: replicated, resources: {limits: {cpus: 0.25, memory: 4096k}}}\n");
    assert_eq!(
        (s.replicas, s.cpu_millis, s.memory_mb),
        (4, Some(250), Some(4))
    );
    assert_eq!(
        spec_of("image: busybox\ndeploy: {mode: global}\n").mode,
        ServiceMode::Global
    );
    assert!(
        warnings_of("image: busybox\ndeploy: {resources: {reservations: {cpus: '1'}}}\n")[0]
            .contains("reserves what it limits")
    );
    assert_eq!(
        spec_of("image: busybox\ncpus: \"1.5\"\nmem_limit: 1gb\nscale: 2\n").cpu_millis,
        Some(1500)
    );
}

#[test]
fn interpolated_numbers_are_accepted_where_compose_accepts_them() {
    let mut opts = options(&[("c.yaml", "services:\n  web:\n    image: busybox\n    deploy: {replicas: \"${REPLICAS:-2}\", resources: {limits: {cpus: \"${CPUS}\"}}}\n    init: \"${INIT:-true}\"\n")]);
    opts.stack = Some("app".into());
    opts.cli_vars = [("CPUS".to_string(), "0.5".to_string())].into();
    let s = load(&opts, &MemFs::default()).unwrap().services.remove(0);
    assert_eq!(
        (s.replicas, s.cpu_millis, s.init),
        (2, Some(500), Some(true))
    );
}

#[test]
fn update_config_maps_onto_the_update_policy() {
    let s = spec_of("image: busybox\ndeploy: {replicas: 6, update_config: {parallelism: 2, order: stop-first, failure_action: pause, monitor: 20s}}\n");
    assert_eq!(
        (
            s.update.max_parallel,
            s.update.max_surge,
            s.update.max_unavailable,
            s.update.auto_rollback,
            s.update.min_healthy_ms
        ),
        (2, 0, 2, false, 20_000)
    );
    let s = spec_of("image: busybox\ndeploy: {replicas: 6, update_config: {parallelism: 0, order: start-first}}\n");
    assert_eq!(
        (
            s.update.max_parallel,
            s.update.max_surge,
            s.update.max_unavailable
        ),
        (6, 6, 0)
    );
    let warnings = warnings_of("image: busybox\ndeploy: {update_config: {delay: 10s, max_failure_ratio: 0.1}, rollback_config: {parallelism: 1}}\n");
    assert_eq!(warnings.len(), 3, "{warnings:?}");
}

#[test]
fn placement_constraints_and_max_replicas_per_node_map_onto_the_spec() {
    let s = spec_of("image: busybox\ndeploy:\n  placement:\n    constraints: [node.labels.zone==a, node.hostname!=n2]\n    max_replicas_per_node: 1\n    preferences: [{spread: node.labels.zone}]\n");
    let texts: Vec<String> = s.constraints.iter().map(Constraint::to_string).collect();
    assert_eq!(texts, ["zone==a", "node.name!=n2"]);
    assert_eq!(s.max_per_node, Some(1));
    let err =
        error_of("image: busybox\ndeploy: {placement: {constraints: [node.role==manager]}}\n");
    assert!(
        err.contains("services.web.deploy.placement.constraints[0]: node.role"),
        "{err}"
    );
}

#[test]
fn service_labels_win_over_deploy_labels() {
    let s =
        spec_of("image: busybox\nlabels: [team=web]\ndeploy: {labels: {team: ops, tier: front}}\n");
    assert_eq!(s.labels["team"], "web");
    assert_eq!(s.labels["tier"], "front");
    assert_eq!(s.labels[STACK_LABEL], "app");
}

#[test]
fn user_working_dir_init_and_network_mode_map_onto_the_spec() {
    let s = spec_of("image: busybox\nuser: 1000:1000\nworking_dir: /app\ninit: true\nnetwork_mode: host\nhostname: web\n");
    assert_eq!(s.user.as_deref(), Some("1000:1000"));
    assert_eq!(s.workdir.as_deref(), Some("/app"));
    assert_eq!((s.init, s.network), (Some(true), NetworkMode::Host));
    assert!(error_of("image: busybox\nnetwork_mode: none\n")
        .contains("network_mode none is not supported"));
}

#[test]
fn restart_policies_and_ignored_keys_warn_with_their_path() {
    assert!(warnings_of("image: busybox\nrestart: always\n").is_empty());
    assert!(warnings_of("image: busybox\nrestart: \"no\"\n")[0].contains("services.web.restart"));
    assert!(warnings_of("image: busybox\nrestart: on-failure:3\n")[0].contains("one-shot jobs"));
    assert!(warnings_of("image: busybox\ncontainer_name: x\n")[0].contains("names replicas itself"));
    for key in [
        "stop_grace_period: 10s",
        "stop_signal: SIGINT",
        "logging: {driver: json-file}",
        "tty: true",
        "stdin_open: true",
    ] {
        let warnings = warnings_of(&format!("{IMAGE}{key}\n"));
        assert!(warnings[0].contains("ignored"), "{key}: {warnings:?}");
    }
}

#[test]
fn top_level_version_networks_and_name_are_accepted_with_warnings() {
    let text = "version: \"3.8\"\nname: other\nnetworks: {default: {}}\nservices:\n  web:\n    image: busybox\n    networks: [backend]\n";
    let loaded = load_with(Some("app"), &[("c.yaml", text)], &MemFs::default()).unwrap();
    let all = loaded.warnings.join("\n");
    assert!(all.contains("c.yaml:1:1: version: obsolete"), "{all}");
    assert!(all.contains("the stack is app"), "{all}");
    assert!(all.contains("networks: ignored"), "{all}");
    assert!(all.contains("networks backend are not created"), "{all}");
}

#[test]
fn unsupported_keys_are_refused_with_their_fix() {
    let cases = [
        (
            "build: .",
            "build and push the image, then name it in image:",
        ),
        (
            "privileged: true",
            "Docker's default hardening; privileged is not supported",
        ),
        ("cap_add: [NET_ADMIN]", "cap_add is not supported"),
        ("devices: [/dev/fuse]", "devices is not supported"),
        ("pid: host", "pid is not supported"),
        ("ipc: host", "ipc is not supported"),
        (
            "links: [db]",
            "services find each other by name; drop links",
        ),
        ("external_links: [db]", "drop links"),
        (
            "extends: {service: base}",
            "merge files with several -f instead",
        ),
        (
            "dns: 8.8.8.8",
            "services.web.dns: dns is not supported by Skiff",
        ),
    ];
    for (body, fix) in cases {
        let err = error_of(&format!("{IMAGE}{body}\n"));
        assert!(err.contains(fix), "{body}: {err}");
    }
    for (top, fix) in [
        ("configs: {a: {file: x}}", "configs are not supported"),
        ("include: [a.yaml]", "several -f"),
    ] {
        let err = load_with(
            Some("app"),
            &[("c.yaml", &format!("{top}\nservices: {{}}\n"))],
            &MemFs::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains(fix), "{err}");
    }
}

#[test]
fn an_unknown_compose_key_suggests_the_nearest_one() {
    assert_eq!(
        error_of("image: busybox\nhealtcheck: {test: [CMD, x]}\n"),
        "compose.yaml:4:5: unknown key services.web.healtcheck; did you mean healthcheck?"
    );
    let err = load_with(
        Some("app"),
        &[("c.yaml", "servces: {}\n")],
        &MemFs::default(),
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("unknown key servces; did you mean services?"),
        "{err}"
    );
}

#[test]
fn relative_bind_mounts_and_secrets_are_refused() {
    let err = error_of("image: busybox\nvolumes: [\".:/app\"]\n");
    assert!(err.contains("services.web.volumes[0]: a path on the machine running the CLI means nothing on a node"), "{err}");
    let err = error_of("image: busybox\nvolumes: [{type: bind, source: ./data, target: /x}]\n");
    assert!(err.contains("means nothing on a node"), "{err}");
    let spec = spec_of("image: busybox\nvolumes: [\"/srv/data:/data:ro\"]\n");
    assert_eq!(
        spec.volumes,
        vec![crate::Mount::parse_mount("type=bind,src=/srv/data,dst=/data,ro").unwrap()]
    );
    let err = error_of("image: busybox\nvolumes: [\"/data\"]\n");
    assert!(err.contains("anonymous volumes are not supported"), "{err}");
    let err = error_of("image: busybox\nsecrets: [db_password]\n");
    assert!(
        err.contains("services.web.secrets[0]: secret db_password is not declared"),
        "{err}"
    );
}

#[test]
fn secrets_with_files_become_stack_secrets_and_references_in_both_syntaxes() {
    let text = "services:\n  web:\n    image: busybox\n    secrets:\n      - db_password\n      - {source: api_key, target: /run/secrets/key, mode: 0440}\n      - shared\nsecrets:\n  db_password: {file: ./db_password.txt}\n  api_key: {file: keys/api}\n  shared: {external: true}\n";
    let loaded = load_with(
        Some("app"),
        &[("dir/compose.yaml", text)],
        &MemFs::default(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let refs: Vec<String> = loaded.services[0]
        .secrets
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(
        refs,
        vec![
            "app-db_password:db_password",
            "app-api_key:key,mode=0440",
            "shared"
        ]
    );
    let files: Vec<(String, String)> = loaded
        .secrets
        .iter()
        .map(|s| (s.name.clone(), s.file.display().to_string()))
        .collect();
    assert_eq!(
        files,
        vec![
            (
                "app-db_password".to_string(),
                "dir/./db_password.txt".to_string()
            ),
            ("app-api_key".to_string(), "dir/keys/api".to_string()),
        ]
    );
    let err = load_with(
        Some("app"),
        &[(
            "c.yaml",
            "services: {}\nsecrets:\n  pw: {environment: PW}\n",
        )],
        &MemFs::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("write the value to a file"), "{err}");
}

#[test]
fn volumes_and_secrets_are_parsed_into_typed_forms() {
    let value: serde_yaml::Value = serde_yaml::from_str(
        "[\"pgdata:/var/lib/pg:ro\", \"./x:/x\", \"/tmp\", {type: tmpfs, target: /run}]",
    )
    .unwrap();
    let mounts = compose::parse_volumes(node::Node::new(&value, "v")).unwrap();
    assert_eq!(
        mounts[0],
        compose::VolumeMount {
            kind: compose::VolumeKind::Volume,
            source: Some("pgdata".into()),
            target: "/var/lib/pg".into(),
            read_only: true,
            nocopy: false,
        }
    );
    assert_eq!(mounts[1].kind, compose::VolumeKind::Bind);
    assert_eq!(
        (mounts[2].source.clone(), mounts[3].kind),
        (None, compose::VolumeKind::Tmpfs)
    );
    let value: serde_yaml::Value = serde_yaml::from_str("[a, {source: b, target: c}]").unwrap();
    let secrets = compose::parse_secrets(node::Node::new(&value, "s")).unwrap();
    assert_eq!(
        secrets[1],
        compose::SecretRef {
            source: "b".into(),
            target: Some("c".into()),
            mode: None,
        }
    );
}

#[test]
fn top_level_volumes_alone_are_accepted_and_other_drivers_refused() {
    load_with(
        Some("app"),
        &[("c.yaml", "services: {}\nvolumes: {data: {}}\n")],
        &MemFs::default(),
    )
    .unwrap();
    let err = load_with(
        Some("app"),
        &[("c.yaml", "services: {}\nvolumes: {data: {driver: nfs}}\n")],
        &MemFs::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("volume driver nfs"), "{err}");
}

#[test]
fn two_compose_files_merge_maps_replace_lists_and_merge_environment_by_key() {
    let base = "services:\n  web:\n    image: busybox:1\n    command: [a, b]\n    environment: [A=1, B=2]\n    deploy: {replicas: 2, resources: {limits: {cpus: '1'}}}\n";
    let over = "services:\n  web:\n    image: busybox:2\n    command: [c]\n    environment: {B: '3'}\n    deploy: {resources: {limits: {memory: 64m}}}\n";
    let loaded = load_with(
        Some("app"),
        &[("a.yaml", base), ("b.yaml", over)],
        &MemFs::default(),
    )
    .unwrap();
    let s = &loaded.services[0];
    assert_eq!(s.image.as_deref(), Some("busybox:2"));
    assert_eq!(s.command, ["c"]);
    assert_eq!(s.env.get("A").map(String::as_str), Some("1"));
    assert_eq!(s.env.get("B").map(String::as_str), Some("3"));
    assert_eq!(
        (s.replicas, s.cpu_millis, s.memory_mb),
        (2, Some(1000), Some(64))
    );
}

#[test]
fn compose_profiles_select_services() {
    let text = "services:\n  web:\n    image: busybox\n  adminer:\n    image: adminer\n    profiles: [debug]\n";
    let mut opts = options(&[("c.yaml", text)]);
    assert_eq!(load(&opts, &MemFs::default()).unwrap().services.len(), 1);
    opts.profiles = vec!["debug".into()];
    assert_eq!(load(&opts, &MemFs::default()).unwrap().services.len(), 2);
}

#[test]
fn strict_turns_a_compose_warning_into_an_error() {
    let mut opts = options(&[(
        "c.yaml",
        "services:\n  web:\n    image: busybox\n    tty: true\n",
    )]);
    opts.strict = true;
    opts.dotenv = Some(PathBuf::from(".env"));
    let err = load(&opts, &MemFs::default()).unwrap_err().to_string();
    assert!(
        err.starts_with("c.yaml:4:5: services.web.tty: ignored"),
        "{err}"
    );
}

#[test]
fn security_opt_takes_seccomp_unconfined_or_a_profile_file_and_refuses_the_rest() {
    let s = spec_of(&format!(
        "{IMAGE}security_opt: [\"seccomp=unconfined\", \"no-new-privileges:true\"]\n"
    ));
    assert_eq!(s.seccomp.as_deref(), Some("unconfined"));
    let err = error_of(&format!("{IMAGE}security_opt: [\"apparmor=unconfined\"]\n"));
    assert!(
        err.contains("security_opt") && err.contains("seccomp=FILE"),
        "{err}"
    );
}

#[test]
fn a_replicated_job_takes_its_retries_from_restart_policy_and_its_deadline_from_x_skiff() {
    let s = spec_of(
        "image: busybox\ndeploy:\n  mode: replicated-job\n  restart_policy: {condition: on-failure, max_attempts: 3}\nx-skiff: {deadline: 90s}\n",
    );
    assert_eq!(
        (s.mode, s.max_retries, s.deadline_secs),
        (ServiceMode::Job, 3, Some(90))
    );
    // condition: none allows no retry whatever max_attempts says; no
    // restart_policy at all is no retry, as `job run` without --max-retries.
    let s = spec_of("image: busybox\ndeploy: {mode: replicated-job, restart_policy: {condition: none, max_attempts: 3}}\n");
    assert_eq!((s.max_retries, s.deadline_secs), (0, None));
    let s = spec_of("image: busybox\ndeploy: {mode: replicated-job}\n");
    assert_eq!((s.mode, s.max_retries), (ServiceMode::Job, 0));
    let warnings = warnings_of("image: busybox\ndeploy: {mode: replicated-job, restart_policy: {delay: 5s, max_attempts: 1}}\n");
    assert!(
        warnings[0].contains("1s, doubling up to 30s"),
        "{warnings:?}"
    );
}

#[test]
fn a_services_restart_policy_is_ignored_with_a_warning_naming_jobs() {
    let loaded = web("image: busybox\ndeploy: {restart_policy: {max_attempts: 3}}\n").unwrap();
    assert_eq!(loaded.services[0].max_retries, 0);
    assert!(
        loaded.warnings[0].contains("services.web.deploy.restart_policy")
            && loaded.warnings[0].contains("mode: replicated-job"),
        "{:?}",
        loaded.warnings
    );
}

#[test]
fn bad_job_keys_are_refused_naming_the_field_and_the_fix() {
    let err = error_of(
        "image: busybox\ndeploy: {mode: replicated-job, restart_policy: {max_attempts: 1000}}\n",
    );
    assert!(
        err.contains("services.web.deploy.restart_policy.max_attempts")
            && err.contains("use 0 to 100"),
        "{err}"
    );
    let err = error_of("image: busybox\ndeploy: {mode: replicated-job, replicas: 3}\n");
    assert!(
        err.contains("services.web.deploy.replicas") && err.contains("one attempt at a time"),
        "{err}"
    );
    let err = error_of("image: busybox\ndeploy: {mode: global-job}\n");
    assert!(err.contains("use replicated-job"), "{err}");
    let err = error_of("image: busybox\nx-skiff: {deadline: 10m}\n");
    assert!(
        err.contains("services.web.x-skiff.deadline") && err.contains("replicated-job"),
        "{err}"
    );
    let err = error_of("image: busybox\ndeploy: {mode: replicated-job}\nx-skiff: {dedline: 10m}\n");
    assert!(
        err.contains("services.web.x-skiff.dedline") && err.contains("deadline"),
        "{err}"
    );
    let err = error_of(
        "image: busybox\ndeploy: {mode: replicated-job, restart_policy: {condition: always}}\n",
    );
    assert!(err.contains("use none, on-failure or any"), "{err}");
    // Other extension keys are still dropped, as Compose does.
    assert_eq!(
        spec_of("image: busybox\nx-team: {a: 1}\n").mode,
        ServiceMode::Replicated
    );
}
