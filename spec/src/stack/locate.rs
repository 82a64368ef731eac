//! Finds the line and column of a key path in a stack file's text.
//! `serde_yaml::Value` keeps no positions, so the loader re-scans the
//! source: block mappings by indentation, which is how stack files are
//! written. A key it cannot find leaves the key path alone to say where.

use std::collections::HashMap;

use super::error::Position;

/// Every block-mapping key of one file by its dotted path (list indices
/// left out), at its first occurrence.
pub(crate) struct KeyLines {
    file: String,
    keys: HashMap<String, (usize, usize)>,
}

impl KeyLines {
    pub fn scan(file: &str, source: &str) -> Self {
        let mut keys = HashMap::new();
        // (column, key) of the enclosing keys.
        let mut stack: Vec<(usize, String)> = Vec::new();
        // Inside a block scalar (`|`, `>`) started by a key at this column.
        let mut block_scalar: Option<usize> = None;
        for (index, line) in source.lines().enumerate() {
            let trimmed = line.trim_start();
            let mut column = line.len() - trimmed.len();
            if let Some(key_column) = block_scalar {
                if trimmed.is_empty() || column > key_column {
                    continue;
                }
                block_scalar = None;
            }
            if trimmed.is_empty() || trimmed.starts_with('#') || trimmed.starts_with("---") {
                continue;
            }
            let mut rest = trimmed;
            while let Some(after) = rest.strip_prefix('-') {
                if !(after.is_empty() || after.starts_with(' ')) {
                    break;
                }
                let inner = after.trim_start();
                column += rest.len() - inner.len();
                rest = inner;
            }
            let Some((key, value)) = split_key(rest) else {
                continue;
            };
            while stack.last().is_some_and(|(c, _)| *c >= column) {
                stack.pop();
            }
            let mut path: Vec<&str> = stack.iter().map(|(_, k)| k.as_str()).collect();
            path.push(&key);
            keys.entry(path.join("."))
                .or_insert((index + 1, column + 1));
            let value = value.trim_start();
            if value.starts_with('|') || value.starts_with('>') {
                block_scalar = Some(column);
            }
            stack.push((column, key));
        }
        KeyLines {
            file: file.to_string(),
            keys,
        }
    }
}

/// `key: value` → (key, value) for plain and quoted keys.
fn split_key(text: &str) -> Option<(String, &str)> {
    if let Some(quote) = text.chars().next().filter(|c| *c == '"' || *c == '\'') {
        let end = text[1..].find(quote)? + 1;
        let after = text[end + 1..].strip_prefix(':')?;
        if after.is_empty() || after.starts_with(' ') {
            return Some((text[1..end].to_string(), after));
        }
        return None;
    }
    if text.starts_with(['{', '[', '&', '*', '!', '|', '>']) {
        return None;
    }
    let mut search = 0;
    while let Some(i) = text[search..].find(':') {
        let at = search + i;
        let after = &text[at + 1..];
        if after.is_empty() || after.starts_with(' ') {
            let key = text[..at].trim_end();
            if key.is_empty() || key.contains(" #") {
                return None;
            }
            return Some((key.to_string(), after));
        }
        search = at + 1;
    }
    None
}

/// The position of `path` (`services.web.ports[1]`) in the last file that
/// has it, falling back to its nearest enclosing key.
pub(crate) fn position(files: &[KeyLines], path: &str) -> Position {
    let mut key = strip_indices(path);
    loop {
        for file in files.iter().rev() {
            if let Some(&(line, column)) = file.keys.get(&key) {
                return Position {
                    file: Some(file.file.clone()),
                    line,
                    column,
                };
            }
        }
        match key.rfind('.') {
            Some(i) => key.truncate(i),
            None => break,
        }
    }
    match files {
        [only] => Position {
            file: Some(only.file.clone()),
            line: 0,
            column: 0,
        },
        _ => Position::default(),
    }
}

fn strip_indices(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    let mut depth = 0usize;
    for c in path.chars() {
        match c {
            '[' => depth += 1,
            ']' => depth = depth.saturating_sub(1),
            _ if depth == 0 => out.push(c),
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SOURCE: &str = "\
services:
  web:
    image: nginx
    command: |
      replicas: not a key
    deploy:
      replicas: 2
    ports:
      - target: 80
        published: 8080
  'db':
    image: postgres
";

    #[test]
    fn keys_are_found_by_path_with_line_and_column() {
        let lines = [KeyLines::scan("compose.yaml", SOURCE)];
        let at = position(&lines, "services.web.deploy.replicas");
        assert_eq!((at.line, at.column), (7, 7));
        assert_eq!(at.to_string(), "compose.yaml:7:7: ");
        assert_eq!(position(&lines, "services.db.image").line, 12);
    }

    #[test]
    fn list_items_and_missing_keys_fall_back_to_the_enclosing_key() {
        let lines = [KeyLines::scan("compose.yaml", SOURCE)];
        assert_eq!(position(&lines, "services.web.ports[0].published").line, 10);
        assert_eq!(position(&lines, "services.web.ports[3]").line, 8);
        assert_eq!(position(&lines, "services.web.user").line, 2);
        assert_eq!(position(&lines, "services.web.replicas").line, 2);
    }

    #[test]
    fn the_last_file_that_has_the_key_is_named() {
        let lines = [
            KeyLines::scan("a.yaml", SOURCE),
            KeyLines::scan("b.yaml", "services:\n  web:\n    image: other\n"),
        ];
        let at = position(&lines, "services.web.image");
        assert_eq!(at.file.as_deref(), Some("b.yaml"));
        assert_eq!(
            position(&lines, "services.db").file.as_deref(),
            Some("a.yaml")
        );
    }
}
