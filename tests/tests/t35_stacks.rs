//! t35: stacks end to end — `skiff stack plan|deploy|ls|ps|export|rm` of a Compose file
//! (web + db + cache, the shape of the classic web + postgres + redis app, on the busybox
//! test images of `deploy/images/build.sh`) against `skiff dev` running real containers
//! with runc, pulled from a local `docker-registry`.
//!
//! Shown here: `depends_on: service_healthy` holds web's first start until db is healthy;
//! `.env`, `${VAR:-default}` and `$$` are read as Compose reads them; `stack plan` exits 2
//! with the changed fields and where replicas go, and 0 when nothing would change; a
//! second deploy of the same file restarts nothing; a changed field rolls out as a new
//! version; `stack export` deploys back to no change; a file that fails half-way changes
//! nothing; `stack rm` removes the stack's services only.

use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;
use skiff_e2e::containers::{OciDev, Registry};
use skiff_e2e::{describe, free_port, http_get, run_with_timeout, skiff_bin, wait_until, POLL};

/// `stack deploy` waits for pulls and health checks: longer than a plain CLI call.
const DEPLOY_TIMEOUT: Duration = Duration::from_secs(90);

const COMPOSE: &str = r#"
version: "3.8"            # obsolete: accepted with a warning
name: app
x-health: &health
  interval: 300ms
  timeout: 300ms
  retries: 2
services:
  web:
    image: ${REGISTRY}/skiff-test/web:v2
    ports: ["${WEB_PORT}:80"]
    environment:
      GREETING: ${GREETING:-hello}
      DB_HOST: db
      LITERAL: "$$PORT stays"
    healthcheck:
      test: ["CMD-SHELL", "wget -q -O /dev/null http://127.0.0.1:$${PORT:-80}/ || exit 1"]
      <<: *health
    depends_on:
      db: {condition: service_healthy}
      cache: {condition: service_started}
    deploy:
      replicas: 2
      update_config: {parallelism: 1, order: start-first, monitor: 1s}
  db:
    image: ${REGISTRY}/skiff-test/web:v1
    environment:
      POSTGRES_DB: ${DB_NAME}
    healthcheck:
      test: ["CMD-SHELL", "wget -q -O /dev/null http://127.0.0.1:80/ || exit 1"]
      start_period: 1s
      <<: *health
    deploy:
      resources:
        limits: {memory: 64M, cpus: "0.5"}
  cache:
    image: ${REGISTRY}/skiff-test/web:v1
  debug:
    image: ${REGISTRY}/skiff-test/web:v1
    profiles: [debug]     # not deployed: no --profile debug
"#;

struct Stack {
    cluster: OciDev,
    registry: String,
    dir: tempfile::TempDir,
    web_port: u16,
}

impl Stack {
    fn start() -> Stack {
        let registry = Registry::shared();
        let cluster = OciDev::start(registry.clone(), &[]);
        let dir = tempfile::tempdir().expect("a temporary directory");
        std::fs::write(
            dir.path().join(".env"),
            "DB_NAME=shop\nGREETING=from-dotenv\n",
        )
        .expect("write .env");
        Stack {
            registry: registry.addr.clone(),
            cluster,
            dir,
            web_port: free_port(),
        }
    }

    /// Writes `text` as FILE in the stack's directory and returns its path.
    fn file(&self, name: &str, text: &str) -> String {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).expect("write a stack file");
        path.display().to_string()
    }

    /// `skiff ARGS --var REGISTRY=... --var WEB_PORT=...` with a deploy's time limit.
    fn run(&self, args: &[&str]) -> Output {
        let port = self.web_port.to_string();
        let registry = format!("REGISTRY={}", self.registry);
        let web_port = format!("WEB_PORT={port}");
        let mut cmd = Command::new(skiff_bin());
        cmd.env_remove("SKIFF_ADDR")
            .env_remove("GREETING")
            .arg("--server")
            .arg(self.cluster.addr())
            .args(args);
        if matches!(args.get(1), Some(&"deploy") | Some(&"plan")) {
            cmd.args(["--var", &registry, "--var", &web_port]);
        }
        run_with_timeout(&mut cmd, DEPLOY_TIMEOUT)
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "{}\n--- dev log ---\n{}",
            describe(args, &out),
            self.cluster.log_tail(40)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `stack plan` and its exit status (0: no change, 2: changes).
    fn plan(&self, file: &str, extra: &[&str]) -> (i32, String) {
        let mut args = vec!["stack", "plan", "app", "-f", file];
        args.extend_from_slice(extra);
        let out = self.run(&args);
        let code = out.status.code().unwrap_or(-1);
        assert!(matches!(code, 0 | 2), "{}", describe(&args, &out));
        (code, String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn alloc_ids(&self, service: &str) -> Vec<String> {
        let mut ids: Vec<String> = self.cluster.ps(service).into_iter().map(|a| a.id).collect();
        ids.sort();
        ids
    }

    fn events(&self) -> Vec<Value> {
        let out = self.ok(&["events", "-o", "json"]);
        out.lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

fn first_index(events: &[Value], kind: &str, service: &str) -> u64 {
    events
        .iter()
        .find(|e| e["kind"] == kind && e["service"] == service)
        .and_then(|e| e["index"].as_u64())
        .unwrap_or_else(|| panic!("no {kind} event of {service} in {events:#?}"))
}

#[test]
fn a_compose_stack_deploys_in_dependency_order_plans_exports_and_redeploys_without_restarts() {
    let stack = Stack::start();
    let compose = stack.file("compose.yaml", COMPOSE);

    // Plan before anything exists: every service is created, with its node.
    let (code, plan) = stack.plan(&compose, &[]);
    assert_eq!(code, 2, "{plan}");
    for service in ["app-web", "app-db", "app-cache"] {
        assert!(plan.contains(&format!("+ {service} (create)")), "{plan}");
    }
    assert!(plan.contains("new replicas: 1 on dev"), "{plan}");
    assert!(
        plan.contains("waiting for app-db to be healthy"),
        "web waits for db: {plan}"
    );

    let out = stack.run(&["stack", "deploy", "app", "-f", &compose]);
    assert!(
        out.status.success(),
        "{}",
        describe(&["stack", "deploy"], &out)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("version"),
        "the obsolete key is a warning: {stderr}"
    );

    // db was healthy before web's first replica was placed.
    let events = stack.events();
    let db_healthy = first_index(&events, "replica-healthy", "app-db");
    let web_placed = first_index(&events, "replica-placed", "app-web");
    assert!(
        db_healthy < web_placed,
        "web placed at {web_placed}, before db was healthy at {db_healthy}"
    );

    // Interpolation as Compose does it: .env, defaults, $$.
    let web = stack.cluster.inspect_values("app-web");
    let env = &web["spec"]["env"];
    assert_eq!(env["GREETING"], "from-dotenv", "{env}");
    assert_eq!(env["LITERAL"], "$PORT stays", "{env}");
    assert_eq!(
        stack.cluster.inspect_values("app-db")["spec"]["env"]["POSTGRES_DB"],
        "shop"
    );
    let db = &stack.cluster.inspect("app-db")["spec"];
    assert_eq!(
        (db["memory_mb"].as_u64(), db["cpu_millis"].as_u64()),
        (Some(64), Some(500))
    );

    // The published port answers through the routing proxy.
    let answered = wait_until(Duration::from_secs(10), POLL, || {
        http_get(stack.web_port, "/").is_ok_and(|r| r.status == 200 && r.body.contains("v2"))
    });
    assert!(answered, "web does not answer on {}", stack.web_port);

    let ls = stack.ok(&["stack", "ls"]);
    assert!(ls.lines().any(|l| l.starts_with("app ")), "{ls}");
    assert!(!ls.contains("debug"), "{ls}");
    let ps = stack.ok(&["stack", "ps", "app"]);
    assert_eq!(ps.matches("app-web").count(), 2, "{ps}");

    // The same file again: nothing changes, nothing restarts.
    let (code, plan) = stack.plan(&compose, &[]);
    assert_eq!(code, 0, "{plan}");
    let before = stack.alloc_ids("app-web");
    stack.ok(&["stack", "deploy", "app", "-f", &compose]);
    assert_eq!(
        stack.alloc_ids("app-web"),
        before,
        "a redeploy restarted web"
    );

    // A changed field: plan names exactly it, deploy rolls a new version.
    let (code, plan) = stack.plan(&compose, &["--var", "GREETING=hi"]);
    assert_eq!(code, 2, "{plan}");
    assert!(plan.contains("~ app-web (update)"), "{plan}");
    assert!(plan.contains("env.GREETING: \"sha256:"), "{plan}");
    assert!(
        !plan.contains("hi\""),
        "values stay out of the plan: {plan}"
    );
    assert!(plan.contains("= app-db (unchanged)"), "{plan}");
    let index: String = plan
        .split("--check-index ")
        .nth(1)
        .map(|rest| rest.chars().take_while(char::is_ascii_digit).collect())
        .expect("plan prints its index");
    stack.ok(&[
        "stack",
        "deploy",
        "app",
        "-f",
        &compose,
        "--var",
        "GREETING=hi",
        "--check-index",
        &index,
    ]);
    assert_eq!(stack.cluster.inspect("app-web")["version"], 2);
    assert_ne!(
        stack.alloc_ids("app-web"),
        before,
        "the new version replaced web"
    );
    // The plan's index is stale now.
    let stale = stack.run(&[
        "stack",
        "deploy",
        "app",
        "-f",
        &compose,
        "--check-index",
        &index,
        "--detach",
    ]);
    assert!(!stale.status.success());
    assert!(String::from_utf8_lossy(&stale.stderr).contains("stack plan"));

    // Export, and the exported file deploys back to no change.
    let exported = stack.ok(&["stack", "export", "app"]);
    assert!(exported.starts_with("skiff: v1"), "{exported}");
    let file = stack.file("exported.yaml", &exported);
    let (code, plan) = stack.plan(&file, &[]);
    assert_eq!(
        code, 0,
        "the export does not deploy back to the same state:\n{plan}\n{exported}"
    );

    // A file that fails half-way changes nothing.
    let broken = stack.file(
        "broken.yaml",
        &exported.replacen("replicas: 2", "replicas: 5000", 1),
    );
    let out = stack.run(&["stack", "deploy", "app", "-f", &broken]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("replicas"));
    assert_eq!(stack.cluster.inspect("app-web")["spec"]["replicas"], 2);

    // Removing a service from the file removes it; rm removes the rest.
    stack.ok(&[
        "service",
        "create",
        "--detach",
        "apps",
        "--image",
        &format!("{}/skiff-test/web:v1", stack.registry),
    ]);
    stack.ok(&["stack", "rm", "app"]);
    let listed = stack.ok(&["service", "ls"]);
    assert!(
        !listed.contains("app-web") && listed.contains("apps"),
        "{listed}"
    );
}

/// `service create` waits until its replicas serve, and an image that cannot be pulled ends
/// the wait with the registry's reason and a non-zero exit status.
#[test]
fn service_create_waits_for_healthy_replicas_and_fails_on_an_image_that_cannot_be_pulled() {
    let stack = Stack::start();
    let good = format!("{}/skiff-test/web:v2", stack.registry);
    let out = stack.ok(&[
        "service",
        "create",
        "web",
        "--image",
        &good,
        "--replicas",
        "2",
    ]);
    assert!(out.contains("every replica serves"), "{out}");
    let healthy = stack
        .cluster
        .ps("web")
        .iter()
        .filter(|a| a.state == "healthy")
        .count();
    assert_eq!(
        healthy, 2,
        "create returned before its replicas were healthy"
    );

    // service export, then apply: the same service, nothing restarted; an edit applies.
    let exported = stack.ok(&["service", "export", "web"]);
    let file = stack.file("web.yaml", &exported);
    let before = stack.alloc_ids("web");
    stack.ok(&["service", "apply", "-f", &file]);
    assert_eq!(stack.cluster.inspect("web")["version"], 1);
    assert_eq!(
        stack.alloc_ids("web"),
        before,
        "applying the export restarted web"
    );
    let edited = stack.file(
        "web3.yaml",
        &exported.replacen("replicas: 2", "replicas: 3", 1),
    );
    stack.ok(&["service", "apply", "-f", &edited]);
    assert_eq!(stack.cluster.ps("web").len(), 3);

    // No node can hold it: a detached create says so at once, with the scheduler's numbers.
    let out = stack.run(&[
        "service",
        "create",
        "--detach",
        "nowhere",
        "--image",
        &good,
        "--constraint",
        "zone==nowhere",
    ]);
    assert!(
        out.status.success(),
        "{}",
        describe(&["service", "create"], &out)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("warning: service nowhere") && stderr.contains("zone==nowhere"),
        "{stderr}"
    );

    let missing = format!("{}/skiff-test/web:v404", stack.registry);
    let out = stack.run(&["service", "create", "gone", "--image", &missing]);
    assert!(
        !out.status.success(),
        "{}",
        describe(&["service", "create"], &out)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("gone") && stderr.contains("web:v404"),
        "{stderr}"
    );
}
