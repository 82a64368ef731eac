//! `.env` and `env_file` files in Compose's format: `KEY=VALUE` lines,
//! `export KEY=VALUE`, `#` comments, single-quoted values taken literally,
//! double-quoted values with `\n`, `\"` and `\\` escapes, and unquoted
//! values with a trailing ` # comment` dropped. Unquoted and double-quoted
//! values may use variables set earlier in the file or outside it.

use std::collections::BTreeMap;

use super::error::StackError;
use super::interpolate::{interpolate, Failure};

/// The variables of one file, in order; `outer` supplies variables the
/// file does not set itself.
pub(crate) fn parse(
    file: &str,
    text: &str,
    outer: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<(String, String)>, StackError> {
    let mut vars: Vec<(String, String)> = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let fail = |problem: String| StackError::Dotenv {
            file: file.to_string(),
            line: index + 1,
            problem,
        };
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").map_or(line, str::trim_start);
        let Some((key, raw)) = line.split_once('=') else {
            return Err(fail(format!(
                "\"{line}\" is not a KEY=VALUE line; write it as KEY=VALUE or comment it out with #"
            )));
        };
        let key = key.trim();
        let key_ok = key.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
            && key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
        if !key_ok {
            return Err(fail(format!(
                "\"{key}\" is not a variable name; use letters, digits and '_'"
            )));
        }
        let raw = raw.trim_start();
        let known: BTreeMap<String, String> = vars.iter().cloned().collect();
        let lookup = |name: &str| known.get(name).cloned().or_else(|| outer(name));
        let substitute = |text: &str| {
            interpolate(text, &lookup, &mut Vec::new()).map_err(|failure| match failure {
                Failure::Required(problem) | Failure::Syntax(problem) => fail(problem),
            })
        };
        let value = if let Some(quoted) = raw.strip_prefix('\'') {
            let (value, after) = quoted
                .split_once('\'')
                .ok_or_else(|| fail("the single quote is not closed".to_string()))?;
            trailing_comment_only(after).map_err(fail)?;
            value.to_string()
        } else if let Some(quoted) = raw.strip_prefix('"') {
            let (value, after) = double_quoted(quoted).map_err(fail)?;
            trailing_comment_only(after).map_err(fail)?;
            substitute(&value)?
        } else {
            let value = match raw.find(" #").or_else(|| raw.find("\t#")) {
                Some(at) => &raw[..at],
                None if raw.starts_with('#') => "",
                None => raw,
            };
            substitute(value.trim_end())?
        };
        vars.retain(|(k, _)| k != key);
        vars.push((key.to_string(), value));
    }
    Ok(vars)
}

/// The value of a double-quoted string up to its closing quote, and what
/// follows it.
fn double_quoted(text: &str) -> Result<(String, &str), String> {
    let mut value = String::new();
    let mut chars = text.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Ok((value, &text[i + 1..])),
            '\\' => match chars.next() {
                Some((_, 'n')) => value.push('\n'),
                Some((_, 't')) => value.push('\t'),
                Some((_, 'r')) => value.push('\r'),
                Some((_, c @ ('"' | '\\'))) => value.push(c),
                Some((_, c)) => {
                    value.push('\\');
                    value.push(c);
                }
                None => break,
            },
            c => value.push(c),
        }
    }
    Err("the double quote is not closed".to_string())
}

fn trailing_comment_only(after: &str) -> Result<(), String> {
    let after = after.trim();
    if after.is_empty() || after.starts_with('#') {
        Ok(())
    } else {
        Err(format!(
            "\"{after}\" follows the closing quote; put the whole value in the quotes"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_text(text: &str) -> Result<Vec<(String, String)>, StackError> {
        let outer = |name: &str| (name == "HOME").then(|| "/home/op".to_string());
        parse(".env", text, &outer)
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn dotenv_lines_comments_exports_and_quotes_are_read_as_compose_does() {
        let text = r#"
# a comment
PLAIN=value
export EXPORTED=yes
SPACED = padded value   # trailing comment
HASH=a#b
SINGLE='literal $HOME \n # kept'
DOUBLE="line\nnext \"quoted\" back\\slash"  # comment
EMPTY=
"#;
        assert_eq!(
            parse_text(text).unwrap(),
            pairs(&[
                ("PLAIN", "value"),
                ("EXPORTED", "yes"),
                ("SPACED", "padded value"),
                ("HASH", "a#b"),
                ("SINGLE", "literal $HOME \\n # kept"),
                ("DOUBLE", "line\nnext \"quoted\" back\\slash"),
                ("EMPTY", ""),
            ])
        );
    }

    #[test]
    fn dotenv_values_may_use_earlier_variables_and_the_environment() {
        let text = "A=one\nB=${A}-two\nC=\"$HOME/x\"\nD='${A}'\nA=again\n";
        assert_eq!(
            parse_text(text).unwrap(),
            pairs(&[
                ("B", "one-two"),
                ("C", "/home/op/x"),
                ("D", "${A}"),
                ("A", "again")
            ])
        );
    }

    #[test]
    fn a_malformed_dotenv_line_is_refused_with_its_line_number() {
        let err = parse_text("A=1\nnot a pair\n").unwrap_err().to_string();
        assert!(err.starts_with(".env:2: "), "{err}");
        assert!(err.contains("KEY=VALUE"), "{err}");
        let err = parse_text("A='open\n").unwrap_err().to_string();
        assert!(
            err.contains(".env:1: the single quote is not closed"),
            "{err}"
        );
        assert!(parse_text("1A=x").is_err());
        assert!(parse_text("A=\"x\" y").is_err());
    }
}
