//! The example stack files in `deploy/examples/` read as their comments say.

use super::load_tests::{load_with, MemFs};
use crate::DependsCondition;

const COMPOSE: &str = include_str!("../../../deploy/examples/compose.yaml");
const STACK: &str = include_str!("../../../deploy/examples/stack.yaml");

#[test]
fn the_classic_example_loads_as_web_db_and_cache_with_web_waiting_for_db() {
    let loaded = load_with(Some("app"), &[("compose.yaml", COMPOSE)], &MemFs::default())
        .unwrap_or_else(|e| panic!("{e}"));
    let names: Vec<&str> = loaded.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["app-cache", "app-db", "app-web"]);
    let web = &loaded.services[2];
    assert_eq!(web.publish, Some(8080));
    assert_eq!(web.replicas, 2);
    let db = web
        .depends_on
        .iter()
        .find(|d| d.service == "app-db")
        .unwrap();
    assert_eq!(db.condition, DependsCondition::Healthy);
    assert_eq!(loaded.services[1].env["POSTGRES_DB"], "shop");
    let volume = &loaded.services[1].volumes[0];
    assert_eq!(
        (volume.source.as_str(), volume.target.as_str()),
        ("app-db-data", "/var/lib/postgresql/data")
    );
    assert!(loaded.services[1].owns_volumes());
    let db = &loaded.services[1];
    assert_eq!(
        db.env["POSTGRES_PASSWORD_FILE"],
        format!("{}/db_password", crate::SECRETS_DIR)
    );
    assert!(!db.env.contains_key("POSTGRES_PASSWORD"));
    assert_eq!(db.secrets[0].name, "app-db_password");
    assert_eq!(db.secrets[0].file_name(), "db_password");
    assert_eq!(loaded.secrets[0].name, "app-db_password");
    assert!(loaded.secrets[0].file.ends_with("db_password.txt"));
}

#[test]
fn the_skiff_format_example_loads() {
    let loaded = load_with(Some("demo"), &[("stack.yaml", STACK)], &MemFs::default()).unwrap();
    assert_eq!(loaded.services[0].command[3], "$PORT", "left for the agent");
    let worker = &loaded.services[1];
    assert_eq!(worker.name, "demo-worker");
    assert_eq!(worker.depends_on[0].service, "demo-web");
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
}
