//! What changed between two versions of a spec, field by field: shown by
//! `service history`, recorded in events and reported by `stack plan`.

use crate::ServiceSpec;

/// What changed from `old` to `new`, one "field: old -> new" per line;
/// nested fields are named with dots (`update.strategy`).
pub fn spec_diff(old: &ServiceSpec, new: &ServiceSpec) -> Vec<String> {
    let (a, b) = (
        serde_json::to_value(old).unwrap_or_default(),
        serde_json::to_value(new).unwrap_or_default(),
    );
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
        (Value::Object(x), Value::Object(y)) if path.is_empty() || path == "update" => {
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
