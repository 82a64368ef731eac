//! What changed between two versions of a spec, field by field: shown by
//! `service history`, recorded in events and reported by `stack plan`.
//! Environment values never appear in it, only a short hash of each (an
//! event log is an audit log, readable by more people than the values).

use sha2::{Digest, Sha256};

use crate::ServiceSpec;

/// How an environment value is shown where values must not appear:
/// `sha256:` and the first 12 hex digits of its SHA-256, enough to tell
/// whether a value changed or two services share it.
pub fn value_hash(value: &str) -> String {
    let digest = Sha256::digest(value.as_bytes());
    let hex: String = digest.iter().take(6).map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// What changed from `old` to `new`, one "field: old -> new" per line;
/// nested fields are named with dots (`update.strategy`).
pub fn spec_diff(old: &ServiceSpec, new: &ServiceSpec) -> Vec<String> {
    let hashed = |spec: &ServiceSpec| {
        let mut spec = spec.clone();
        for value in spec.env.values_mut() {
            *value = value_hash(value);
        }
        serde_json::to_value(spec).unwrap_or_default()
    };
    let (a, b) = (hashed(old), hashed(new));
    let mut out = Vec::new();
    diff_values("", &a, &b, &mut out);
    out
}

fn diff_values(path: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<String>) {
    use serde_json::Value;
    if a == b {
        return;
    }
    match (a, b) {
        (Value::Object(x), Value::Object(y))
            if path.is_empty() || path == "update" || path == "env" =>
        {
            let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            for key in keys {
                let name = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                diff_values(
                    &name,
                    x.get(key).unwrap_or(&Value::Null),
                    y.get(key).unwrap_or(&Value::Null),
                    out,
                );
            }
        }
        _ => out.push(format!("{path}: {a} -> {b}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn environment_changes_name_the_key_and_never_the_value() {
        let mut old = ServiceSpec::default();
        old.env.insert("DB_PASSWORD".into(), "hunter2".into());
        old.env.insert("MODE".into(), "a".into());
        let mut new = old.clone();
        new.env.insert("DB_PASSWORD".into(), "hunter3".into());
        new.replicas = 3;
        let diff = spec_diff(&old, &new);
        assert_eq!(
            diff,
            vec![
                format!(
                    "env.DB_PASSWORD: \"{}\" -> \"{}\"",
                    value_hash("hunter2"),
                    value_hash("hunter3")
                ),
                format!("replicas: {} -> 3", old.replicas),
            ]
        );
        assert!(!diff.join(" ").contains("hunter"));
        assert_eq!(value_hash("hunter2").len(), "sha256:".len() + 12);
    }
}
