//! Parsing one stack file: YAML with the line and column of a syntax
//! error, anchors' merge keys (`<<: *defaults`) applied, extension keys
//! (`x-*`) dropped at the top and service level (but a Compose service's
//! `x-skiff`), and the file's format.

use serde_yaml::{Mapping, Value};

use super::error::StackError;

/// Which of the two stack formats a file is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Format {
    /// Skiff's own (`skiff: v1` at the top).
    Skiff,
    Compose,
}

/// The top-level mapping of a file and its format.
pub(crate) fn parse(file: &str, contents: &str) -> Result<(Format, Mapping), StackError> {
    let mut value: Value = serde_yaml::from_str(contents).map_err(|e| {
        let (line, column) = e.location().map_or((0, 0), |l| (l.line(), l.column()));
        StackError::Yaml {
            file: file.to_string(),
            line,
            column,
            problem: e.to_string(),
        }
    })?;
    value.apply_merge().map_err(|e| StackError::File {
        file: file.to_string(),
        problem: format!("a merge key (<<) is wrong: {e}"),
    })?;
    let Value::Mapping(mut top) = value else {
        return Err(StackError::File {
            file: file.to_string(),
            problem: "the file is empty or not a mapping; a stack file starts with services:"
                .to_string(),
        });
    };
    drop_extensions(&mut top, None);
    let keep = (!top.contains_key("skiff")).then_some(SKIFF_EXTENSION);
    if let Some(Value::Mapping(services)) = top.get_mut("services") {
        for (_, service) in services.iter_mut() {
            if let Value::Mapping(service) = service {
                drop_extensions(service, keep);
            }
        }
    }
    let format = match top.get("skiff") {
        None => Format::Compose,
        Some(Value::String(v)) if v == "v1" => Format::Skiff,
        Some(other) => {
            return Err(StackError::File {
                file: file.to_string(),
                problem: format!(
                    "skiff: {} is not a format this version reads; use skiff: v1",
                    super::node::key_text(other)
                ),
            })
        }
    };
    Ok((format, top))
}

/// The one extension key a Compose service may give Skiff (`x-skiff:
/// {deadline: 10m}`): Skiff-only settings Compose has no key for.
pub(crate) const SKIFF_EXTENSION: &str = "x-skiff";

/// Drops the `x-*` keys of `map`, except `keep`.
fn drop_extensions(map: &mut Mapping, keep: Option<&str>) {
    map.retain(|key, _| {
        !key.as_str()
            .is_some_and(|k| k.starts_with("x-") && Some(k) != keep)
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_yaml_is_reported_with_file_line_and_column() {
        let err = parse("compose.yaml", "services:\n  web:\n    image: [a\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("compose.yaml:4:1: malformed YAML"), "{err}");
        let err = parse("c.yaml", "services:\n  web: {\n  db: x: y\n").unwrap_err();
        assert!(matches!(err, StackError::Yaml { line: 3, .. }), "{err}");
    }

    #[test]
    fn extension_keys_are_dropped_and_merge_keys_applied() {
        let text = "x-common: &common\n  image: busybox\nservices:\n  web:\n    <<: *common\n    x-note: hi\n";
        let (format, top) = parse("c.yaml", text).unwrap();
        assert_eq!(format, Format::Compose);
        assert!(top.get("x-common").is_none());
        let web = &top["services"]["web"];
        assert_eq!(web["image"], Value::from("busybox"));
        assert!(web.get("x-note").is_none());
    }

    #[test]
    fn the_skiff_key_selects_the_format() {
        assert_eq!(parse("s.yaml", "skiff: v1\n").unwrap().0, Format::Skiff);
        assert!(parse("s.yaml", "skiff: v2\n")
            .unwrap_err()
            .to_string()
            .contains("v1"));
        assert!(parse("s.yaml", "").is_err());
    }
}
