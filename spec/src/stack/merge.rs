//! Several `-f` files into one, by Compose's rules: mappings merge key by
//! key, a later scalar or list replaces the earlier one, and a service's
//! `environment` / `labels` (`env` in Skiff's format, and
//! `deploy.labels`) merge by variable name whether written as a mapping or
//! as a `KEY=VALUE` list.

use serde_yaml::{Mapping, Value};

/// `over` laid on top of `base`.
pub(crate) fn merge(base: Mapping, over: Mapping) -> Mapping {
    merge_maps(base, over, &[])
}

fn merge_maps(mut base: Mapping, over: Mapping, path: &[String]) -> Mapping {
    for (key, value) in over {
        let name = super::node::key_text(&key);
        let mut child_path = path.to_vec();
        child_path.push(name);
        let merged = match base.remove(&key) {
            Some(old) if merges_by_key(&child_path) => {
                Value::Mapping(merge_maps(as_map(old), as_map(value), &child_path))
            }
            Some(Value::Mapping(old)) => match value {
                Value::Mapping(new) => Value::Mapping(merge_maps(old, new, &child_path)),
                other => other,
            },
            _ => value,
        };
        base.insert(key, merged);
    }
    base
}

/// `services.NAME.environment`, `services.NAME.labels`, `services.NAME.env`
/// and `services.NAME.deploy.labels`.
fn merges_by_key(path: &[String]) -> bool {
    match path {
        [top, _, key] => {
            top == "services" && matches!(key.as_str(), "environment" | "labels" | "env")
        }
        [top, _, deploy, key] => top == "services" && deploy == "deploy" && key == "labels",
        _ => false,
    }
}

/// A `KEY=VALUE` list as a mapping (`KEY` alone maps to null).
fn as_map(value: Value) -> Mapping {
    match value {
        Value::Mapping(map) => map,
        Value::Sequence(items) => items
            .into_iter()
            .map(|item| match item {
                Value::String(text) => match text.split_once('=') {
                    Some((k, v)) => (Value::from(k), Value::from(v)),
                    None => (Value::String(text), Value::Null),
                },
                other => (other, Value::Null),
            })
            .collect(),
        _ => Mapping::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yaml(text: &str) -> Mapping {
        serde_yaml::from_str(text).unwrap()
    }

    #[test]
    fn mappings_merge_and_scalars_and_lists_are_replaced() {
        let base = yaml("services:\n  web:\n    image: a:1\n    command: [x, y]\n    deploy: {replicas: 2, mode: replicated}\n  db:\n    image: pg\n");
        let over = yaml(
            "services:\n  web:\n    image: a:2\n    command: [z]\n    deploy: {replicas: 3}\n",
        );
        let merged = merge(base, over);
        assert_eq!(
            merged,
            yaml("services:\n  web:\n    image: a:2\n    command: [z]\n    deploy: {replicas: 3, mode: replicated}\n  db:\n    image: pg\n")
        );
    }

    #[test]
    fn environment_and_labels_merge_by_key_in_list_or_map_form() {
        let base = yaml("services:\n  web:\n    environment: [A=1, B=2]\n    labels: {x: '1'}\n");
        let over =
            yaml("services:\n  web:\n    environment: {B: '3', C: '4'}\n    labels: [y=2]\n");
        let merged = merge(base, over);
        assert_eq!(
            merged,
            yaml("services:\n  web:\n    environment: {A: '1', B: '3', C: '4'}\n    labels: {x: '1', y: '2'}\n")
        );
    }
}
