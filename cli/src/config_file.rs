//! `--config FILE` for `skiff server` and `skiff agent`: every flag can also
//! come from a TOML file, and flags given on the command line win.
//!
//! The file's keys are the long flag names (`data_dir` or `data-dir`);
//! they become flags inserted right after the subcommand, before the
//! user's own, and the commands let a later flag override an earlier one.

use std::ffi::OsString;

use anyhow::{anyhow, bail, Context};

/// Returns `args` with the settings of any `--config FILE` spliced in.
pub fn expand(args: Vec<OsString>) -> anyhow::Result<Vec<OsString>> {
    let Some(command_at) = args.iter().position(|a| a == "server" || a == "agent") else {
        return Ok(args);
    };
    let mut path = None;
    let mut rest = Vec::new();
    let mut iter = args[command_at + 1..].iter();
    while let Some(arg) = iter.next() {
        let text = arg.to_string_lossy();
        if text == "--config" {
            path = Some(
                iter.next()
                    .ok_or_else(|| anyhow!("--config needs a file path"))?
                    .clone(),
            );
        } else if let Some(value) = text.strip_prefix("--config=") {
            path = Some(OsString::from(value));
        } else {
            rest.push(arg.clone());
        }
    }
    let Some(path) = path else { return Ok(args) };
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("failed to read config file {}", path.to_string_lossy()))?;
    let flags = flags_from_toml(&text)
        .with_context(|| format!("invalid config file {}", path.to_string_lossy()))?;
    let mut expanded: Vec<OsString> = args[..=command_at].to_vec();
    expanded.extend(flags.into_iter().map(OsString::from));
    expanded.extend(rest);
    Ok(expanded)
}

fn flags_from_toml(text: &str) -> anyhow::Result<Vec<String>> {
    let table: toml::Table = text.parse()?;
    let mut flags = Vec::new();
    for (key, value) in table {
        let flag = format!("--{}", key.replace('_', "-"));
        match value {
            toml::Value::Boolean(true) => flags.push(flag),
            toml::Value::Boolean(false) => {}
            toml::Value::Array(items) => {
                for item in items {
                    flags.push(format!("{flag}={}", scalar(&key, &item)?));
                }
            }
            other => flags.push(format!("{flag}={}", scalar(&key, &other)?)),
        }
    }
    Ok(flags)
}

fn scalar(key: &str, value: &toml::Value) -> anyhow::Result<String> {
    Ok(match value {
        toml::Value::String(s) => s.clone(),
        toml::Value::Integer(i) => i.to_string(),
        toml::Value::Float(f) => f.to_string(),
        toml::Value::Boolean(b) => b.to_string(),
        _ => bail!("{key}: use a string, number, boolean or a list of them"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<OsString> {
        list.iter().map(OsString::from).collect()
    }

    #[test]
    fn file_settings_come_before_command_line_flags() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("server.toml");
        std::fs::write(&file, "name = \"s1\"\ndata_dir = \"/var/lib/skiff\"\nbootstrap = true\nlabel = [\"zone=a\", \"disk=ssd\"]\n").unwrap();
        let expanded = expand(args(&[
            "skiff",
            "server",
            "--config",
            file.to_str().unwrap(),
            "--name",
            "s2",
        ]))
        .unwrap();
        let expanded: Vec<String> = expanded
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            expanded,
            [
                "skiff",
                "server",
                "--bootstrap",
                "--data-dir=/var/lib/skiff",
                "--label=zone=a",
                "--label=disk=ssd",
                "--name=s1",
                "--name",
                "s2"
            ]
        );
    }

    #[test]
    fn a_missing_or_broken_file_is_named_in_the_error() {
        let err = expand(args(&["skiff", "agent", "--config", "/nonexistent.toml"])).unwrap_err();
        assert!(format!("{err:#}").contains("/nonexistent.toml"));
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("bad.toml");
        std::fs::write(&file, "name = [\n").unwrap();
        let err = expand(args(&[
            "skiff",
            "agent",
            "--config",
            file.to_str().unwrap(),
        ]))
        .unwrap_err();
        assert!(format!("{err:#}").contains("invalid config file"));
    }

    #[test]
    fn other_commands_are_left_alone() {
        let original = args(&["skiff", "service", "ls"]);
        assert_eq!(expand(original.clone()).unwrap(), original);
    }
}
