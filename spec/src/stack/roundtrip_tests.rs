//! `load(export(specs)) == specs` for random valid specs, and for a stack
//! loaded from Compose.

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use super::load_tests::{load_with, options, MemFs};
use super::*;
use crate::{
    AutoscalePolicy, Constraint, DependsCondition, HealthCheck, HealthKind, NetworkMode,
    PlacementPolicy, Protocol, RuntimeKind, ServiceMode, Strategy, UpdatePolicy,
};

/// Strings YAML could take for something else, or interpolation could
/// change, and a few ordinary ones.
const TRICKY: &[&str] = &[
    "",
    " ",
    "yes",
    "no",
    "true",
    "False",
    "null",
    "~",
    "123",
    "-1.5",
    "0x1F",
    "0o17",
    ".inf",
    "1e3",
    "-",
    "- a",
    "a: b",
    "#x",
    "x #y",
    "$PORT",
    "${X}",
    "$$",
    "$",
    "'",
    "\"",
    "\\",
    "é",
    "tab\there",
    "line\nbreak",
    "[a]",
    "{b}",
    "*",
    "&a",
    "!tag",
    "%x",
    "@x",
    "`x`",
    "  padded  ",
    "hello",
    "python3",
    "-m",
    "http.server",
    "8080:80",
    "2021-01-01",
];

fn text(rng: &mut StdRng) -> String {
    if rng.gen_bool(0.7) {
        TRICKY.choose(rng).map_or(String::new(), |s| s.to_string())
    } else {
        let len = rng.gen_range(1..12);
        (0..len)
            .map(|_| char::from(rng.gen_range(b' '..=b'~')))
            .collect()
    }
}

fn words(rng: &mut StdRng, min: usize) -> Vec<String> {
    let n = rng.gen_range(min..5);
    (0..n).map(|_| text(rng)).collect()
}

fn maybe<T>(rng: &mut StdRng, f: impl FnOnce(&mut StdRng) -> T) -> Option<T> {
    if rng.gen_bool(0.5) {
        Some(f(rng))
    } else {
        None
    }
}

fn duration(rng: &mut StdRng) -> u32 {
    *[0, 1, 250, 999, 1000, 5000, 90_500, 3_600_000, 86_400_000]
        .choose(rng)
        .unwrap_or(&0)
}

fn spec(rng: &mut StdRng, name: String, earlier: &[String]) -> ServiceSpec {
    let oci = rng.gen_bool(0.7);
    let images = [
        "busybox",
        "127.0.0.1:5000/demo/web:v1",
        "postgres:16",
        "library/redis:7.2-alpine",
    ];
    let mut s = ServiceSpec {
        name,
        runtime: if oci {
            RuntimeKind::Oci
        } else {
            RuntimeKind::Process
        },
        replicas: *[0, 1, 2, 3, 7, 1000].choose(rng).unwrap_or(&1),
        command: words(rng, usize::from(!oci)),
        env: (0..rng.gen_range(0..4))
            .map(|i| {
                (
                    format!(
                        "{}_{i}",
                        ["A", "_b", "GREETING"].choose(rng).unwrap_or(&"A")
                    ),
                    text(rng),
                )
            })
            .collect(),
        workdir: maybe(rng, |r| {
            ["/", "/app", "/srv/a b"]
                .choose(r)
                .unwrap_or(&"/")
                .to_string()
        }),
        image: oci.then(|| images.choose(rng).unwrap_or(&"busybox").to_string()),
        memory_mb: maybe(rng, |r| r.gen_range(4..100_000)),
        cpu_millis: maybe(rng, |r| r.gen_range(1..64_000)),
        constraints: (0..rng.gen_range(0..3))
            .filter_map(|_| {
                let c = [
                    "zone==a",
                    "disk!=hdd",
                    "node.name==n1",
                    "zone in (a,b)",
                    "rack in (r-1)",
                ];
                Constraint::parse(c.choose(rng)?).ok()
            })
            .collect(),
        max_per_node: maybe(rng, |r| r.gen_range(1..5)),
        placement: *[PlacementPolicy::Spread, PlacementPolicy::Binpack]
            .choose(rng)
            .unwrap_or(&PlacementPolicy::Spread),
        mode: *[ServiceMode::Replicated, ServiceMode::Global]
            .choose(rng)
            .unwrap_or(&ServiceMode::Replicated),
        publish: maybe(rng, |r| r.gen_range(1..=u16::MAX)),
        labels: (0..rng.gen_range(0..4))
            .map(|i| {
                (
                    format!(
                        "{}{i}",
                        ["team", "com.example/x", "a_b-c"]
                            .choose(rng)
                            .unwrap_or(&"x")
                    ),
                    text(rng),
                )
            })
            .collect(),
        ..ServiceSpec::default()
    };
    if oci {
        s.port = maybe(rng, |r| r.gen_range(1..=u16::MAX));
        s.user = maybe(rng, |r| {
            ["nobody", "1000", "1000:1000", "www-data:www-data"]
                .choose(r)
                .unwrap_or(&"1")
                .to_string()
        });
        s.init = maybe(rng, |r| r.gen_bool(0.5));
        s.network = if rng.gen_bool(0.2) {
            NetworkMode::Host
        } else {
            NetworkMode::Bridge
        };
        s.entrypoint = maybe(rng, |r| words(r, 0));
    }
    if s.publish.is_some() && rng.gen_bool(0.5) {
        s.protocol = Protocol::Http;
    }
    s.health = maybe(rng, |r| {
        let kind = match r.gen_range(0..3) {
            0 => HealthKind::Http {
                path: ["/", "/healthz", "/a?b=c"]
                    .choose(r)
                    .unwrap_or(&"/")
                    .to_string(),
            },
            1 => HealthKind::Tcp,
            _ => HealthKind::Exec {
                command: words(r, 1),
            },
        };
        HealthCheck {
            kind,
            interval_ms: duration(r),
            timeout_ms: duration(r),
            retries: r.gen_range(0..5),
            start_period_ms: duration(r),
        }
    });
    if rng.gen_bool(0.6) {
        s.update = UpdatePolicy {
            strategy: *[Strategy::Rolling, Strategy::BlueGreen, Strategy::Canary]
                .choose(rng)
                .unwrap_or(&Strategy::Rolling),
            max_parallel: rng.gen_range(1..5),
            max_surge: rng.gen_range(0..3),
            max_unavailable: rng.gen_range(0..3),
            min_healthy_ms: duration(rng),
            healthy_deadline_ms: duration(rng).max(1),
            progress_deadline_ms: duration(rng).max(1),
            auto_rollback: rng.gen_bool(0.5),
            auto_promote: rng.gen_bool(0.5),
            canary: rng.gen_range(0..4),
            canary_weight: maybe(rng, |r| r.gen_range(1..=100)),
            max_error_rate: maybe(rng, |r| r.gen_range(0..=100)),
        };
    }
    s.autoscale = maybe(rng, |r| {
        let max = r.gen_range(1..=1000);
        let target = |r: &mut StdRng| maybe(r, |r| r.gen_range(0.001..1e6_f64));
        let mut policy = AutoscalePolicy {
            min: r.gen_range(0..=max),
            max,
            target_rps: target(r),
            target_concurrency: target(r),
            target_cpu: target(r),
        };
        if policy.target_rps.is_none() {
            policy.target_cpu = Some(*[70.0, 0.5, 1e-7, 123_456.789].choose(r).unwrap_or(&1.0));
        }
        policy
    });
    if s.runtime == crate::RuntimeKind::Oci && rng.gen_bool(0.3) {
        let profiles = [
            "unconfined",
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["mount"],"action":"SCMP_ACT_ERRNO"}]}"#,
        ];
        s.seccomp = profiles.choose(rng).map(|p| p.to_string());
    }
    if s.runtime == crate::RuntimeKind::Oci && rng.gen_bool(0.3) {
        s.volumes = vec![
            crate::Mount::parse_volume("data:/var/lib/data:nocopy").unwrap(),
            crate::Mount::parse_mount("type=bind,src=/srv/x,dst=/x,ro").unwrap(),
        ];
        if s.update.strategy != crate::Strategy::Rolling || rng.gen_bool(0.3) {
            s.volume_scope = crate::VolumeScope::Shared;
        }
    }
    if rng.gen_bool(0.3) {
        s.secrets = vec![
            crate::SecretRef::parse("db_password").unwrap(),
            crate::SecretRef::parse("tls.key:key.pem,mode=0440,on-change=signal:SIGHUP").unwrap(),
        ];
    }
    for dep in earlier {
        if rng.gen_bool(0.4) {
            let condition = *[DependsCondition::Started, DependsCondition::Healthy]
                .choose(rng)
                .unwrap_or(&DependsCondition::Started);
            s.depends_on.push(crate::Dependency {
                service: dep.clone(),
                condition,
            });
        }
    }
    s
}

/// A random valid stack: services depend only on earlier ones.
fn stack(rng: &mut StdRng, stack: Option<&str>) -> Vec<ServiceSpec> {
    let mut names: Vec<&str> = vec!["web", "api", "db", "cache", "w2", "job-runner"];
    names.shuffle(rng);
    let count = rng.gen_range(1..=4);
    let mut out: Vec<ServiceSpec> = Vec::new();
    for short in names.into_iter().take(count) {
        let name = match stack {
            Some(stack) => format!("{stack}-{short}"),
            None => short.to_string(),
        };
        let earlier: Vec<String> = out.iter().map(|s| s.name.clone()).collect();
        let valid = (0..200).find_map(|_| {
            let mut s = spec(rng, name.clone(), &earlier);
            if let Some(stack) = stack {
                s.labels.insert(STACK_LABEL.to_string(), stack.to_string());
            }
            s.validate().is_ok().then_some(s)
        });
        if let Some(s) = valid {
            out.push(s);
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

#[test]
fn export_then_load_gives_random_valid_specs_back_exactly() {
    let mut rng = StdRng::seed_from_u64(0x5eed);
    let mut checked = 0;
    for case in 0..400 {
        let name = (case % 2 == 0).then_some("app");
        let specs = stack(&mut rng, name);
        if specs.is_empty() {
            continue;
        }
        let text = export(name, &specs);
        let mut opts = options(&[("stack.yaml", &text)]);
        opts.stack = name.map(str::to_string);
        let loaded =
            load(&opts, &MemFs::default()).unwrap_or_else(|e| panic!("case {case}: {e}\n{text}"));
        assert_eq!(loaded.services, specs, "case {case}:\n{text}");
        assert!(
            loaded.warnings.is_empty(),
            "case {case}: {:?}",
            loaded.warnings
        );
        checked += 1;
    }
    assert!(checked > 300, "only {checked} stacks were generated");
}

#[test]
fn an_exported_compose_stack_loads_back_identical() {
    let compose = super::compose_tests::REALISTIC;
    let first = load_with(
        Some("shop"),
        &[("compose.yaml", compose)],
        &MemFs::default(),
    )
    .unwrap();
    let text = export(Some("shop"), &first.services);
    let again = load_with(Some("shop"), &[("stack.yaml", &text)], &MemFs::default()).unwrap();
    assert_eq!(again.services, first.services, "{text}");
}
