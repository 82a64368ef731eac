//! The stack-file reader: Compose files and Skiff's own format into
//! validated [`ServiceSpec`]s, and those specs back into Skiff's format.
//! Pure: every file is read through [`FileSource`], so all of it is
//! unit-tested without a disk.
//!
//! Both formats take one path: YAML parse → drop `x-*` keys →
//! interpolation → merge of the `-f` files → conversion → names, profiles,
//! dependencies and [`ServiceSpec::validate`].
//!
//! # Layout
//! - [`error`]: [`StackError`] and the warnings.
//! - `yaml`, `interpolate`, `dotenv`, `merge`: the steps before conversion.
//! - [`compose`]: Compose files (and the typed volumes and secrets Skiff
//!   does not run yet); `skiff_format`: Skiff's own format both ways.
//! - `node`, `duration`, `units`, `shell`, `suggest`, `locate`: typed reads
//!   with key paths, quantities, command splitting, "did you mean" and
//!   line numbers.
//! - `graph`: the start order and its cycles.

pub mod compose;
mod compose_deploy;
mod compose_ports;
mod dotenv;
mod duration;
pub mod error;
mod graph;
mod interpolate;
mod locate;
mod merge;
mod node;
mod shell;
mod skiff_format;
mod suggest;
mod units;
mod yaml;

#[cfg(test)]
mod compose_tests;
#[cfg(test)]
mod example_tests;
#[cfg(test)]
mod load_tests;
#[cfg(test)]
mod roundtrip_tests;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

pub use error::{Position, StackError};

use crate::{validate_name, Dependency, ServiceSpec, STACK_LABEL};
use error::Warning;
use interpolate::Vars;
use locate::KeyLines;
use yaml::Format;

/// Where the loader reads `.env` and `env_file` files (the CLI passes the
/// real filesystem).
pub trait FileSource {
    fn read(&self, path: &Path) -> std::io::Result<String>;
}

/// One `-f` file and its text.
pub struct StackFile {
    pub path: PathBuf,
    pub contents: String,
}

/// What to load and how.
#[derive(Default)]
pub struct LoadOptions {
    /// The stack's name (a DNS label, validated with validate_name);
    /// `None`: service names are used as they are (for `service export`
    /// files).
    pub stack: Option<String>,
    /// The `-f` files in order (later ones override earlier ones, Compose's
    /// merge rules).
    pub files: Vec<StackFile>,
    /// Variables given on the command line (highest precedence), then the
    /// shell's environment.
    pub cli_vars: BTreeMap<String, String>,
    pub shell_vars: BTreeMap<String, String>,
    /// Path of the `.env` file to read (Compose: the project directory =
    /// the first file's directory); `None`: no .env.
    pub dotenv: Option<PathBuf>,
    pub profiles: Vec<String>,
    /// Warnings become errors.
    pub strict: bool,
}

/// The services of a stack, ready to deploy.
#[derive(Debug)]
pub struct LoadedStack {
    /// Sorted by name.
    pub services: Vec<ServiceSpec>,
    pub warnings: Vec<String>,
    /// The stack's own secrets (Compose's top-level `secrets:` with
    /// `file:`), which the deploy creates or updates before the services.
    pub secrets: Vec<StackSecret>,
}

/// A secret a stack file declares with `file:`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StackSecret {
    /// Its name in the cluster (`STACK-NAME`).
    pub name: String,
    /// The file holding the value, relative to the first stack file's
    /// directory.
    pub file: PathBuf,
}

/// Reads, merges, converts and validates the stack's files.
pub fn load(options: &LoadOptions, fs: &dyn FileSource) -> Result<LoadedStack, StackError> {
    let lines: Vec<KeyLines> = options
        .files
        .iter()
        .map(|f| KeyLines::scan(&f.path.display().to_string(), &f.contents))
        .collect();
    let mut warnings = Vec::new();
    let (services, secrets) = load_services(options, fs, &mut warnings).map_err(|mut err| {
        if let Some((path, at)) = err.key_path() {
            *at = locate::position(&lines, path);
        }
        err
    })?;
    let mut seen = BTreeSet::new();
    warnings.retain(|w| seen.insert(w.clone()));
    if options.strict {
        if let Some(warning) = warnings.into_iter().next() {
            return Err(StackError::Strict {
                at: locate::position(&lines, &warning.path),
                path: warning.path,
                problem: warning.problem,
            });
        }
        return Ok(LoadedStack {
            services,
            warnings: Vec::new(),
            secrets,
        });
    }
    let warnings = warnings
        .into_iter()
        .map(|w| {
            format!(
                "{}{}: {}",
                locate::position(&lines, &w.path),
                w.path,
                w.problem
            )
        })
        .collect();
    Ok(LoadedStack {
        services,
        warnings,
        secrets,
    })
}

/// Skiff's own format for these specs; `load` of it gives the same specs
/// back.
pub fn export(stack: Option<&str>, services: &[ServiceSpec]) -> String {
    skiff_format::write(stack, services)
}

/// The order in which first starts happen (dependencies first); errors
/// name a cycle.
pub fn start_order(services: &[ServiceSpec]) -> Result<Vec<String>, StackError> {
    graph::start_order(services)
}

/// A service as a format reader returns it: named as in the file, with
/// `depends_on` naming services as in the file.
pub(crate) struct ReadService {
    pub name: String,
    pub spec: ServiceSpec,
    pub profiles: Vec<String>,
}

/// What the format readers need besides the merged file.
pub(crate) struct Context<'a> {
    pub vars: Vars<'a>,
    pub fs: &'a dyn FileSource,
    /// Directory `env_file` paths are relative to: the first file's.
    pub base_dir: PathBuf,
    pub stack: Option<&'a str>,
    pub warnings: &'a mut Vec<Warning>,
    /// The secrets the file declares with `file:` (Compose).
    pub secrets: Vec<StackSecret>,
}

impl Context<'_> {
    pub fn warn(&mut self, path: impl Into<String>, problem: impl Into<String>) {
        self.warnings.push(Warning::new(path, problem));
    }
}

fn load_services(
    options: &LoadOptions,
    fs: &dyn FileSource,
    warnings: &mut Vec<Warning>,
) -> Result<(Vec<ServiceSpec>, Vec<StackSecret>), StackError> {
    if let Some(stack) = &options.stack {
        validate_name(stack)
            .map_err(|e| StackError::invalid("stack", format!("the stack name {}", e.problem)))?;
    }
    let Some(first) = options.files.first() else {
        return Err(StackError::invalid(
            "files",
            "no stack file given; name one with -f",
        ));
    };
    let dotenv_vars = read_dotenv(options, fs)?;
    let vars = Vars {
        layers: vec![&options.cli_vars, &options.shell_vars, &dotenv_vars],
    };
    let mut merged: Option<(Format, String, serde_yaml::Mapping)> = None;
    for file in &options.files {
        let name = file.path.display().to_string();
        let (format, mut top) = yaml::parse(&name, &file.contents)?;
        for (key, value) in top.iter_mut() {
            let key = node::key_text(key);
            interpolate::interpolate_value(value, &key, &vars, warnings)?;
        }
        merged = Some(match merged {
            None => (format, name, top),
            Some((first_format, first_name, base)) => {
                if first_format != format {
                    let (skiff, compose) = match first_format {
                        Format::Skiff => (first_name, name),
                        Format::Compose => (name, first_name),
                    };
                    return Err(StackError::MixedFormats {
                        first: skiff,
                        second: compose,
                    });
                }
                (format, first_name, merge::merge(base, top))
            }
        });
    }
    let Some((format, _, top)) = merged else {
        return Ok((Vec::new(), Vec::new()));
    };
    let mut context = Context {
        vars,
        fs,
        base_dir: first
            .path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default(),
        stack: options.stack.as_deref(),
        warnings,
        secrets: Vec::new(),
    };
    let read = match format {
        Format::Skiff => skiff_format::read(&top, &mut context)?,
        Format::Compose => compose::read(&top, &mut context)?,
    };
    let depends_key = match format {
        Format::Skiff => "depends-on",
        Format::Compose => "depends_on",
    };
    let secrets = std::mem::take(&mut context.secrets);
    Ok((finish(read, options, depends_key)?, secrets))
}

fn read_dotenv(
    options: &LoadOptions,
    fs: &dyn FileSource,
) -> Result<BTreeMap<String, String>, StackError> {
    let Some(path) = &options.dotenv else {
        return Ok(BTreeMap::new());
    };
    let text = match fs.read(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(source) => {
            return Err(StackError::Read {
                file: path.display().to_string(),
                source,
            })
        }
    };
    let outer = |name: &str| {
        options
            .cli_vars
            .get(name)
            .or_else(|| options.shell_vars.get(name))
            .cloned()
    };
    Ok(dotenv::parse(&path.display().to_string(), &text, &outer)?
        .into_iter()
        .collect())
}

/// Profiles, dependencies, full names, the stack label and validation:
/// the same for both formats.
fn finish(
    read: Vec<ReadService>,
    options: &LoadOptions,
    depends_key: &str,
) -> Result<Vec<ServiceSpec>, StackError> {
    let all: BTreeMap<&str, &ReadService> = read.iter().map(|s| (s.name.as_str(), s)).collect();
    let included: Vec<&ReadService> = read
        .iter()
        .filter(|s| {
            s.profiles.is_empty() || s.profiles.iter().any(|p| options.profiles.contains(p))
        })
        .collect();
    let included_names: BTreeSet<&str> = included.iter().map(|s| s.name.as_str()).collect();
    for service in &included {
        let path = format!("services.{}.{depends_key}", service.name);
        for dep in &service.spec.depends_on {
            match all.get(dep.service.as_str()) {
                None => {
                    let names: Vec<&str> = all.keys().copied().collect();
                    let hint = suggest::nearest(&dep.service, &names)
                        .map(|n| format!("did you mean {n}? "))
                        .unwrap_or_default();
                    return Err(StackError::invalid(
                        format!("{path}.{}", dep.service),
                        format!(
                            "{} depends on {}, which is not a service of this stack; {hint}name one of: {}",
                            service.name,
                            dep.service,
                            names.join(", ")
                        ),
                    ));
                }
                Some(excluded) if !included_names.contains(dep.service.as_str()) => {
                    return Err(StackError::invalid(
                        format!("{path}.{}", dep.service),
                        format!(
                            "{} depends on {}, which only runs with profile {}; enable it with --profile {} or drop the dependency",
                            service.name,
                            dep.service,
                            excluded.profiles.join(" or "),
                            excluded.profiles.first().map_or("", String::as_str),
                        ),
                    ));
                }
                Some(_) => {}
            }
        }
    }
    let graph: BTreeMap<String, Vec<String>> = included
        .iter()
        .map(|s| {
            let deps = s
                .spec
                .depends_on
                .iter()
                .map(|d| d.service.clone())
                .collect();
            (s.name.clone(), deps)
        })
        .collect();
    graph::order(&graph)?;
    let full_name = |short: &str| match &options.stack {
        Some(stack) => format!("{stack}-{short}"),
        None => short.to_string(),
    };
    let mut specs = Vec::new();
    for service in included {
        let path = format!("services.{}", service.name);
        let mut spec = service.spec.clone();
        spec.name = full_name(&service.name);
        validate_name(&spec.name).map_err(|e| match &options.stack {
            Some(stack) => StackError::invalid(
                &path,
                format!(
                    "stack {stack} and service {} make the service name {}: {}; shorten the stack or the service name",
                    service.name, spec.name, e.problem
                ),
            ),
            None => StackError::invalid(&path, format!("the service name {}", e.problem)),
        })?;
        spec.depends_on = spec
            .depends_on
            .iter()
            .map(|d| Dependency {
                service: full_name(&d.service),
                condition: d.condition,
            })
            .collect();
        if let Some(stack) = &options.stack {
            if let Some(given) = spec.labels.get(STACK_LABEL).filter(|v| *v != stack) {
                return Err(StackError::invalid(
                    format!("{path}.labels"),
                    format!("the label {STACK_LABEL}={given} is Skiff's own; remove it (the service is labelled {STACK_LABEL}={stack})"),
                ));
            }
            spec.labels.insert(STACK_LABEL.to_string(), stack.clone());
        }
        spec.validate().map_err(|source| StackError::Validation {
            at: Position::default(),
            path: path.clone(),
            source,
        })?;
        specs.push(spec);
    }
    specs.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(specs)
}
