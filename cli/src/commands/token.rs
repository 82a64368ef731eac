//! `skiff token create|ls|revoke`: API tokens and their roles. The secret
//! is printed once, by `create`; nothing else ever shows it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use skiff_proto::v1 as pb;

use crate::args::{OutputFormat, RoleArg, TokenCommand};
use crate::client::{connect, explain};
use crate::output;

pub async fn run(server: &str, format: OutputFormat, command: TokenCommand) -> anyhow::Result<()> {
    let mut client = connect(server).await?;
    match command {
        TokenCommand::Create { name, role, ttl } => {
            let role = match role {
                RoleArg::Admin => "admin",
                RoleArg::Operator => "operator",
                RoleArg::ReadOnly => "read-only",
            };
            let created = client
                .token_create(pb::TokenCreateRequest {
                    name: name.clone(),
                    role: role.into(),
                    ttl_ms: ttl.unwrap_or(0),
                })
                .await
                .map_err(explain)?
                .into_inner();
            match format {
                OutputFormat::Table => {
                    let expires = created
                        .token
                        .as_ref()
                        .map_or_else(|| "-".into(), |t| expires(t.expires_ms));
                    println!("{}", created.secret);
                    eprintln!(
                        "token {name} created (role {role}, expires {expires}); the secret above is shown only once: use it with --token SECRET, SKIFF_TOKEN=SECRET or `token = \"SECRET\"` in a client config (--client-config FILE)"
                    );
                }
                _ => output::print(format, &created, &[], vec![]),
            }
        }
        TokenCommand::Ls => {
            let tokens = client
                .token_list(pb::TokenListRequest {})
                .await
                .map_err(explain)?
                .into_inner()
                .tokens;
            let rows = tokens
                .iter()
                .map(|t| {
                    vec![
                        t.name.clone(),
                        t.role.clone(),
                        crate::commands::events::time(t.created_ms),
                        expires(t.expires_ms),
                        state(t).into(),
                        if t.created_by.is_empty() {
                            "-".into()
                        } else {
                            t.created_by.clone()
                        },
                    ]
                })
                .collect();
            output::print(
                format,
                &tokens,
                &["NAME", "ROLE", "CREATED", "EXPIRES", "STATE", "CREATED BY"],
                rows,
            );
        }
        TokenCommand::Revoke { name } => {
            client
                .token_revoke(pb::TokenRevokeRequest { name: name.clone() })
                .await
                .map_err(explain)?;
            println!("token {name} revoked; calls presenting it are refused");
        }
    }
    Ok(())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_millis() as u64
}

fn expires(ms: u64) -> String {
    if ms == 0 {
        "never".into()
    } else {
        crate::commands::events::time(ms)
    }
}

/// `active`, `expired` or `revoked`.
fn state(token: &pb::TokenInfo) -> &'static str {
    if token.revoked_ms != 0 {
        "revoked"
    } else if token.expires_ms != 0 && token.expires_ms <= now_ms() {
        "expired"
    } else {
        "active"
    }
}
