//! `skiff secret create|update|ls|inspect|rm`, and `--secret`/`--secret-rm`
//! of `service create` and `update` turned into the spec's references.
//! The value is read here and sent once; nothing prints it.

use std::io::Read;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context};
use skiff_proto::v1 as pb;
use skiff_spec as spec;

use crate::args::{OutputFormat, SecretCommand};
use crate::client::{connect, explain};
use crate::output;

/// Adds (or replaces, by name) the references of `--secret` and removes
/// those named by `--secret-rm`; each text goes through `skiff_spec`.
pub fn apply_args(
    target: &mut pb::ServiceSpec,
    add: &[String],
    remove: &[String],
) -> anyhow::Result<()> {
    for name in remove {
        let before = target.secrets.len();
        target.secrets.retain(|s| s.name != *name);
        if target.secrets.len() == before {
            bail!("invalid secret-rm: the service uses no secret \"{name}\"; see `skiff service inspect`");
        }
    }
    for text in add {
        let reference = spec::SecretRef::parse(text).map_err(|e| anyhow!("{e}"))?;
        target.secrets.retain(|s| s.name != reference.name);
        target.secrets.push(spec::pb::secret_to_pb(&reference));
    }
    Ok(())
}

/// The value in `path`, or standard input for `-`, refused when empty or
/// above the limit before anything is sent.
pub fn read_value(name: &str, path: &str) -> anyhow::Result<Vec<u8>> {
    let limit = spec::MAX_SECRET_BYTES as u64 + 1;
    let mut value = Vec::new();
    if path == "-" {
        std::io::stdin()
            .take(limit)
            .read_to_end(&mut value)
            .context("invalid from-file: cannot read standard input")?;
    } else {
        std::fs::File::open(path)
            .and_then(|f| f.take(limit).read_to_end(&mut value))
            .with_context(|| format!("invalid from-file: cannot read {path}"))?;
    }
    spec::validate_secret_value(name, &value).map_err(|e| anyhow!("{e}"))?;
    Ok(value)
}

pub async fn run(server: &str, format: OutputFormat, command: SecretCommand) -> anyhow::Result<()> {
    let mut client = connect(server).await?;
    match command {
        SecretCommand::Create { name, from_file } => {
            let value = read_value(&name, &from_file)?;
            let info = client
                .secret_create(pb::PutSecretRequest {
                    name: name.clone(),
                    value,
                })
                .await
                .map_err(explain)?
                .into_inner();
            println!("secret {name} created (version {})", info.version);
        }
        SecretCommand::Update { name, from_file } => {
            let value = read_value(&name, &from_file)?;
            let info = client
                .secret_update(pb::PutSecretRequest {
                    name: name.clone(),
                    value,
                })
                .await
                .map_err(explain)?
                .into_inner();
            if info.unchanged {
                println!(
                    "secret {name} unchanged (version {}): same value",
                    info.version
                );
            } else {
                let users = if info.services.is_empty() {
                    String::new()
                } else {
                    format!("; services using it: {}", info.services.join(", "))
                };
                println!("secret {name} updated to version {}{users}", info.version);
            }
        }
        SecretCommand::Ls => {
            let secrets = client
                .secret_list(pb::ListSecretsRequest {})
                .await
                .map_err(explain)?
                .into_inner()
                .secrets;
            print(format, &secrets);
        }
        SecretCommand::Inspect { name } => {
            let info = client
                .secret_inspect(pb::InspectSecretRequest { name })
                .await
                .map_err(explain)?
                .into_inner();
            match format {
                OutputFormat::Table => {
                    println!("Name:      {}", info.name);
                    println!("Version:   {}", info.version);
                    println!("Size:      {} bytes", info.size_bytes);
                    println!("Created:   {}", ago(info.created_ms));
                    println!("Updated:   {}", ago(info.updated_ms));
                    println!("Services:  {}", services(&info));
                    println!("Versions:  (kept for rollbacks, newest first)");
                    for v in &info.versions {
                        let users = if v.services.is_empty() {
                            "-".to_string()
                        } else {
                            v.services.join(",")
                        };
                        println!(
                            "  {:<6} {} bytes, set {}, used by {users}",
                            v.version,
                            v.size_bytes,
                            ago(v.created_ms)
                        );
                    }
                }
                _ => output::print(format, &info, &[], vec![]),
            }
        }
        SecretCommand::Rm { name } => {
            client
                .secret_remove(pb::RemoveSecretRequest { name: name.clone() })
                .await
                .map_err(explain)?;
            println!("secret {name} removed");
        }
    }
    Ok(())
}

fn services(info: &pb::SecretInfo) -> String {
    if info.services.is_empty() {
        "-".into()
    } else {
        info.services.join(",")
    }
}

/// How long ago `ms` (since the epoch) was, as `secret ls` shows it.
fn ago(ms: u64) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_millis() as u64;
    let secs = now.saturating_sub(ms) / 1000;
    match secs {
        0..=119 => format!("{secs}s ago"),
        120..=7199 => format!("{}m ago", secs / 60),
        7200..=172_799 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86_400),
    }
}

fn print(format: OutputFormat, secrets: &[pb::SecretInfo]) {
    let rows = secrets
        .iter()
        .map(|s| {
            vec![
                s.name.clone(),
                s.version.to_string(),
                s.size_bytes.to_string(),
                ago(s.created_ms),
                ago(s.updated_ms),
                services(s),
            ]
        })
        .collect();
    output::print(
        format,
        secrets,
        &["NAME", "VERSION", "SIZE", "CREATED", "UPDATED", "SERVICES"],
        rows,
    );
}
