//! Variable substitution in stack files, by Compose's rules: `$VAR`,
//! `${VAR}`, `${VAR:-default}`, `${VAR-default}`, `${VAR:?message}`,
//! `${VAR?message}`, `${VAR:+alt}`, `${VAR+alt}`, and `$$` for a literal
//! `$`. Defaults may nest (`${A:-${B}}`). Only values are substituted,
//! never mapping keys.

use std::collections::BTreeMap;

use serde_yaml::Value;

use super::error::{Position, StackError, Warning};

/// Where variables come from, first match wins: the command line, the
/// shell's environment, then the `.env` file.
pub(crate) struct Vars<'a> {
    pub layers: Vec<&'a BTreeMap<String, String>>,
}

impl Vars<'_> {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.layers
            .iter()
            .find_map(|layer| layer.get(name))
            .map(String::as_str)
    }
}

/// What went wrong in one string.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Failure {
    /// `${VAR:?message}` with VAR unset (or empty).
    Required(String),
    /// Not Compose's syntax, e.g. `${}` or an unclosed brace.
    Syntax(String),
}

/// The variable Skiff sets in every replica to its host port; `$PORT` and
/// `${PORT}` in a file are left for the agent to fill in (as on the command
/// line), never taken from the shell or `.env`.
const REPLICA_PORT: &str = "PORT";

/// Substitutes variables in `text`; `unset` collects the names of
/// variables used without a value or a default.
pub(crate) fn interpolate(
    text: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
    unset: &mut Vec<String>,
) -> Result<String, Failure> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(after) = after.strip_prefix('$') {
            out.push('$');
            rest = after;
        } else if let Some(tail) = after.strip_prefix("{PORT}").or_else(|| {
            after
                .strip_prefix(REPLICA_PORT)
                .filter(|t| name_len(t) == 0)
        }) {
            out.push_str(&rest[at..rest.len() - tail.len()]);
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('{') {
            let close = matching_brace(inner).ok_or_else(|| {
                Failure::Syntax(format!("\"{text}\" has a ${{ without its closing }}"))
            })?;
            out.push_str(&braced(&inner[..close], text, lookup, unset)?);
            rest = &inner[close + 1..];
        } else if after.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_') {
            let len = name_len(after);
            let name = &after[..len];
            match lookup(name) {
                Some(value) => out.push_str(&value),
                None => unset.push(name.to_string()),
            }
            rest = &after[len..];
        } else {
            // A `$` before anything else stays as it is, as in a shell.
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

fn name_len(text: &str) -> usize {
    text.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(text.len())
}

/// Index of the `}` closing a `${`, counting nested `${ … }`.
fn matching_brace(text: &str) -> Option<usize> {
    let mut depth = 0usize;
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'$' if bytes.get(i + 1) == Some(&b'{') => {
                depth += 1;
                i += 1;
            }
            b'}' if depth == 0 => return Some(i),
            b'}' => depth -= 1,
            _ => {}
        }
        i += 1;
    }
    None
}

/// The inside of `${…}`: a name and an optional operator with its word.
fn braced(
    inner: &str,
    text: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
    unset: &mut Vec<String>,
) -> Result<String, Failure> {
    let len = name_len(inner);
    let (name, operation) = inner.split_at(len);
    if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
        return Err(Failure::Syntax(format!(
            "\"{text}\" has an invalid substitution ${{{inner}}}; use ${{NAME}}, ${{NAME:-default}} or $$ for a literal $"
        )));
    }
    let value = lookup(name);
    let set = value.is_some();
    let non_empty = value.as_deref().is_some_and(|v| !v.is_empty());
    let word = |unset: &mut Vec<String>, word: &str| interpolate(word, lookup, unset);
    let (operator, argument) = [":-", "-", ":?", "?", ":+", "+"]
        .iter()
        .find_map(|op| operation.strip_prefix(op).map(|arg| (*op, arg)))
        .unwrap_or(("", operation));
    match operator {
        "" if argument.is_empty() => match value {
            Some(value) => Ok(value),
            None => {
                unset.push(name.to_string());
                Ok(String::new())
            }
        },
        ":-" if non_empty => Ok(value.unwrap_or_default()),
        "-" if set => Ok(value.unwrap_or_default()),
        ":-" | "-" => word(unset, argument),
        ":?" if non_empty => Ok(value.unwrap_or_default()),
        "?" if set => Ok(value.unwrap_or_default()),
        ":?" | "?" => {
            let message = word(unset, argument)?;
            let message = if message.is_empty() {
                format!("required variable {name} is not set")
            } else {
                format!("required variable {name} is not set: {message}")
            };
            Err(Failure::Required(message))
        }
        ":+" if non_empty => word(unset, argument),
        "+" if set => word(unset, argument),
        ":+" | "+" => Ok(String::new()),
        _ => Err(Failure::Syntax(format!(
            "\"{text}\" has an invalid substitution ${{{inner}}}; use ${{NAME}}, ${{NAME:-default}}, ${{NAME:?message}} or ${{NAME:+alt}}"
        ))),
    }
}

/// Substitutes variables in every string value under `value`, whose key
/// path is `path`; unset variables become empty with a warning.
pub(crate) fn interpolate_value(
    value: &mut Value,
    path: &str,
    vars: &Vars,
    warnings: &mut Vec<Warning>,
) -> Result<(), StackError> {
    match value {
        Value::String(text) if text.contains('$') => {
            let lookup = |name: &str| vars.get(name).map(str::to_string);
            let mut unset = Vec::new();
            *text = interpolate(text, &lookup, &mut unset).map_err(|failure| match failure {
                Failure::Required(problem) => StackError::Variable {
                    at: Position::default(),
                    path: path.to_string(),
                    problem,
                },
                Failure::Syntax(problem) => StackError::invalid(path, problem),
            })?;
            for name in unset {
                warnings.push(Warning::new(
                    path,
                    format!("variable {name} is not set; using an empty string"),
                ));
            }
        }
        Value::Sequence(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                interpolate_value(item, &format!("{path}[{i}]"), vars, warnings)?;
            }
        }
        Value::Mapping(map) => {
            for (key, item) in map.iter_mut() {
                let child = super::node::join(path, &super::node::key_text(key));
                interpolate_value(item, &child, vars, warnings)?;
            }
        }
        Value::Tagged(tagged) => interpolate_value(&mut tagged.value, path, vars, warnings)?,
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(text: &str) -> Result<(String, Vec<String>), Failure> {
        let vars: BTreeMap<&str, &str> = [("SET", "v"), ("EMPTY", ""), ("B", "b")].into();
        let lookup = |name: &str| vars.get(name).map(|v| v.to_string());
        let mut unset = Vec::new();
        interpolate(text, &lookup, &mut unset).map(|s| (s, unset))
    }

    fn ok(text: &str) -> String {
        run(text).unwrap().0
    }

    #[test]
    fn plain_and_braced_variables_are_substituted() {
        assert_eq!(ok("a $SET b ${SET}c"), "a v b vc");
        assert_eq!(ok("$SET_x"), "");
        assert_eq!(ok("cost: 5$ and $1"), "cost: 5$ and $1");
    }

    #[test]
    fn the_replica_port_is_left_for_the_agent() {
        assert_eq!(ok("--port=$PORT ${PORT} $PORTS"), "--port=$PORT ${PORT} ");
        assert_eq!(ok("$$PORT"), "$PORT");
    }

    #[test]
    fn a_double_dollar_is_a_literal_dollar() {
        assert_eq!(ok("$$SET $${SET} $$"), "$SET ${SET} $");
    }

    #[test]
    fn defaults_apply_to_unset_and_with_a_colon_to_empty_variables() {
        assert_eq!(ok("${NOPE:-d} ${EMPTY:-d} ${SET:-d}"), "d d v");
        assert_eq!(ok("${NOPE-d} ${EMPTY-d} ${SET-d}"), "d  v");
        assert_eq!(ok("${NOPE:-${B}} ${NOPE:-${NOPE2:-x}y}"), "b xy");
    }

    #[test]
    fn alternatives_apply_to_set_variables() {
        assert_eq!(ok("${SET:+a} ${EMPTY:+a} ${NOPE:+a}"), "a  ");
        assert_eq!(ok("${SET+a} ${EMPTY+a} ${NOPE+a}"), "a a ");
    }

    #[test]
    fn a_required_variable_that_is_missing_fails_with_its_message() {
        assert_eq!(
            run("${NOPE:?give the tag}"),
            Err(Failure::Required(
                "required variable NOPE is not set: give the tag".into()
            ))
        );
        assert!(matches!(run("${EMPTY:?x}"), Err(Failure::Required(_))));
        assert_eq!(ok("${EMPTY?x}"), "");
    }

    #[test]
    fn unset_variables_become_empty_and_are_reported() {
        assert_eq!(
            run("a${NOPE}b$OTHER").unwrap(),
            (
                "ab".to_string(),
                vec!["NOPE".to_string(), "OTHER".to_string()]
            )
        );
    }

    #[test]
    fn broken_substitutions_are_refused() {
        assert!(matches!(run("${SET"), Err(Failure::Syntax(_))));
        assert!(matches!(run("${}"), Err(Failure::Syntax(_))));
        assert!(matches!(run("${SET:x}"), Err(Failure::Syntax(_))));
    }

    #[test]
    fn command_line_variables_win_over_the_shell_and_the_dotenv_file() {
        let cli: BTreeMap<String, String> = [("A".to_string(), "cli".to_string())].into();
        let shell: BTreeMap<String, String> = [("A", "shell"), ("B", "shell")]
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .into();
        let dotenv: BTreeMap<String, String> = [("A", "env"), ("B", "env"), ("C", "env")]
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .into();
        let vars = Vars {
            layers: vec![&cli, &shell, &dotenv],
        };
        assert_eq!(
            (vars.get("A"), vars.get("B"), vars.get("C"), vars.get("D")),
            (Some("cli"), Some("shell"), Some("env"), None)
        );
    }
}
