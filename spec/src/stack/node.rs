//! Typed reads of YAML values with their key paths, so every wrong type
//! and unknown key is reported as `services.web.replicas: expected an
//! integer, found a string "two"`. After interpolation a number, a boolean
//! or a duration may arrive as a string (`replicas: "${N:-2}"`); the
//! readers accept those strings where Compose does.

use std::collections::BTreeMap;

use serde_yaml::Value;

use super::duration;
use super::error::StackError;
use super::shell;
use super::suggest::nearest;

/// A value and the key path that leads to it.
#[derive(Clone, Copy)]
pub(crate) struct Node<'a> {
    pub value: &'a Value,
    pub path: &'a str,
}

/// `services` + `web` → `services.web`.
pub(crate) fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// A mapping key as text (numbers and booleans as written).
pub(crate) fn key_text(key: &Value) -> String {
    match key {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Null => "null".to_string(),
        other => describe(other),
    }
}

/// How a value reads in an error: `a string "two"`, `a list`.
pub(crate) fn describe(value: &Value) -> String {
    match value {
        Value::Null => "nothing (null)".to_string(),
        Value::Bool(b) => format!("a boolean {b}"),
        Value::Number(n) if n.is_f64() => format!("a number {n}"),
        Value::Number(n) => format!("an integer {n}"),
        Value::String(s) => format!("a string {s:?}"),
        Value::Sequence(_) => "a list".to_string(),
        Value::Mapping(_) => "a mapping".to_string(),
        Value::Tagged(t) => format!("a value tagged {}", t.tag),
    }
}

/// Fails when the mapping at `path` has a key outside `known`, naming the
/// nearest known one.
pub(crate) fn check_keys(
    entries: &[(String, Value)],
    path: &str,
    known: &[&str],
) -> Result<(), StackError> {
    for (key, _) in entries {
        if !known.contains(&key.as_str()) {
            return Err(StackError::unknown_key(
                join(path, key),
                nearest(key, known).map(str::to_string),
            ));
        }
    }
    Ok(())
}

impl<'a> Node<'a> {
    pub fn new(value: &'a Value, path: &'a str) -> Self {
        Node { value, path }
    }

    fn wrong(&self, expected: &str) -> StackError {
        StackError::wrong_type(self.path, expected, describe(self.value))
    }

    pub fn invalid(&self, problem: impl Into<String>) -> StackError {
        StackError::invalid(self.path, problem)
    }

    pub fn is_null(&self) -> bool {
        self.value.is_null()
    }

    /// The entries of a mapping with their keys as text (an empty mapping
    /// for null, as `healthcheck:` with nothing under it).
    pub fn entries(&self) -> Result<Vec<(String, Value)>, StackError> {
        match self.value {
            Value::Mapping(map) => Ok(map.iter().map(|(k, v)| (key_text(k), v.clone())).collect()),
            Value::Null => Ok(Vec::new()),
            _ => Err(self.wrong("a mapping")),
        }
    }

    pub fn items(&self) -> Result<&'a [Value], StackError> {
        match self.value {
            Value::Sequence(items) => Ok(items),
            _ => Err(self.wrong("a list")),
        }
    }

    /// A string; numbers and booleans are taken as written (`user: 1000`,
    /// `test: [CMD, true]`).
    pub fn string(&self) -> Result<String, StackError> {
        match self.value {
            Value::String(s) => Ok(s.clone()),
            Value::Number(n) => Ok(n.to_string()),
            Value::Bool(b) => Ok(b.to_string()),
            _ => Err(self.wrong("a string")),
        }
    }

    pub fn u64(&self) -> Result<u64, StackError> {
        let expected = "an integer";
        match self.value {
            Value::Number(n) => match (n.as_u64(), n.as_i64()) {
                (Some(v), _) => Ok(v),
                (None, Some(v)) => Err(self.invalid(format!("{v} is negative; use 0 or more"))),
                _ => Err(self.wrong(expected)),
            },
            Value::String(s) => match s.trim().parse::<u64>() {
                Ok(v) => Ok(v),
                Err(_) if s.trim().parse::<i64>().is_ok() => {
                    Err(self.invalid(format!("{s} is negative; use 0 or more")))
                }
                Err(_) => Err(self.wrong(expected)),
            },
            _ => Err(self.wrong(expected)),
        }
    }

    pub fn u32(&self) -> Result<u32, StackError> {
        let v = self.u64()?;
        u32::try_from(v).map_err(|_| self.invalid(format!("{v} is too large")))
    }

    pub fn port(&self) -> Result<u16, StackError> {
        let v = self.u64()?;
        match u16::try_from(v) {
            Ok(port) if port > 0 => Ok(port),
            _ => Err(self.invalid(format!("{v} is not a port; use 1 to 65535"))),
        }
    }

    pub fn bool(&self) -> Result<bool, StackError> {
        match self.value {
            Value::Bool(b) => Ok(*b),
            Value::String(s) => match s.trim().to_ascii_lowercase().as_str() {
                "true" => Ok(true),
                "false" => Ok(false),
                _ => Err(self.wrong("true or false")),
            },
            _ => Err(self.wrong("true or false")),
        }
    }

    /// A number, written as an integer, a decimal, or a string of one.
    pub fn f64(&self) -> Result<f64, StackError> {
        match self.value {
            Value::Number(n) => n.as_f64().ok_or_else(|| self.wrong("a number")),
            Value::String(s) => s.trim().parse::<f64>().map_err(|_| self.wrong("a number")),
            _ => Err(self.wrong("a number")),
        }
    }

    /// A number as its decimal text (`0.5`, `"0.5"`, `2`), for exact
    /// conversions such as CPUs to millicores.
    pub fn decimal_text(&self) -> Result<String, StackError> {
        match self.value {
            Value::Number(n) => Ok(n.to_string()),
            Value::String(s) => Ok(s.trim().to_string()),
            _ => Err(self.wrong("a number")),
        }
    }

    /// A Go-style duration (`10s`) in milliseconds.
    pub fn duration_ms(&self) -> Result<u32, StackError> {
        match self.value {
            Value::String(s) => duration::parse_ms(s).map_err(|e| self.invalid(e)),
            Value::Number(n) => Err(self.invalid(format!(
                "{n} has no unit; write a duration with its unit, e.g. {n}s or {n}ms"
            ))),
            _ => Err(self.wrong("a duration like 10s")),
        }
    }

    /// A list of strings (numbers taken as written).
    pub fn string_list(&self) -> Result<Vec<String>, StackError> {
        let items = self.items().map_err(|_| self.wrong("a list of strings"))?;
        items
            .iter()
            .enumerate()
            .map(|(i, item)| Node::new(item, &format!("{}[{i}]", self.path)).string())
            .collect()
    }

    /// A command: a list, or a string split like a shell splits it.
    pub fn command(&self) -> Result<Vec<String>, StackError> {
        match self.value {
            Value::String(s) => shell::split(s).map_err(|e| self.invalid(e)),
            Value::Sequence(_) => self.string_list(),
            _ => Err(self.wrong("a list of strings or a string")),
        }
    }

    /// A mapping of strings (numbers and booleans as written; null as
    /// `None`), or a list of `KEY=VALUE` / `KEY` entries.
    pub fn string_map(&self) -> Result<Vec<(String, Option<String>)>, StackError> {
        match self.value {
            Value::Sequence(items) => items
                .iter()
                .enumerate()
                .map(|(i, item)| {
                    let text = Node::new(item, &format!("{}[{i}]", self.path)).string()?;
                    Ok(match text.split_once('=') {
                        Some((k, v)) => (k.to_string(), Some(v.to_string())),
                        None => (text, None),
                    })
                })
                .collect(),
            _ => {
                let mut out = Vec::new();
                for (key, value) in self
                    .entries()
                    .map_err(|_| self.wrong("a mapping or a list of KEY=VALUE"))?
                {
                    let path = join(self.path, &key);
                    let value = match &value {
                        Value::Null => None,
                        Value::Bool(b) => Some(b.to_string()),
                        other => Some(Node::new(other, &path).string()?),
                    };
                    out.push((key, value));
                }
                Ok(out)
            }
        }
    }

    /// [`Node::string_map`] with every entry given a value.
    pub fn string_map_strict(&self) -> Result<BTreeMap<String, String>, StackError> {
        self.string_map()?
            .into_iter()
            .map(|(key, value)| {
                value.map(|v| (key.clone(), v)).ok_or_else(|| {
                    StackError::invalid(join(self.path, &key), "has no value; give it one")
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yaml(text: &str) -> Value {
        serde_yaml::from_str(text).unwrap()
    }

    #[test]
    fn a_wrong_type_names_the_field_and_the_expected_type() {
        let value = yaml("two");
        let err = Node::new(&value, "services.web.replicas")
            .u32()
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "services.web.replicas: expected an integer, found a string \"two\""
        );
    }

    #[test]
    fn numbers_booleans_and_durations_are_accepted_as_strings() {
        assert_eq!(Node::new(&yaml("'2'"), "r").u32().unwrap(), 2);
        assert!(Node::new(&yaml("'true'"), "i").bool().unwrap());
        assert_eq!(Node::new(&yaml("'0.5'"), "c").f64().unwrap(), 0.5);
        assert_eq!(Node::new(&yaml("10s"), "d").duration_ms().unwrap(), 10_000);
        let err = Node::new(&yaml("10"), "d").duration_ms().unwrap_err();
        assert!(err.to_string().contains("10s"), "{err}");
        assert!(Node::new(&yaml("-1"), "r")
            .u32()
            .unwrap_err()
            .to_string()
            .contains("negative"));
        assert!(Node::new(&yaml("5000000000"), "r").u32().is_err());
        assert!(Node::new(&yaml("0"), "p").port().is_err());
    }

    #[test]
    fn string_maps_are_read_from_mappings_and_lists() {
        let map = Node::new(&yaml("{A: 1, B: true, C: }"), "env")
            .string_map()
            .unwrap();
        assert_eq!(
            map,
            [("A", Some("1")), ("B", Some("true")), ("C", None)]
                .map(|(k, v)| (k.to_string(), v.map(str::to_string)))
        );
        let list = Node::new(&yaml("[A=1, B=x=y, C]"), "env")
            .string_map()
            .unwrap();
        assert_eq!(list[1], ("B".to_string(), Some("x=y".to_string())));
        assert_eq!(list[2], ("C".to_string(), None));
    }

    #[test]
    fn unknown_keys_are_named_with_the_nearest_known_one() {
        let entries = vec![("replics".to_string(), Value::Null)];
        let err = check_keys(&entries, "services.web", &["replicas", "image"]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown key services.web.replics; did you mean replicas?"
        );
    }
}
