//! `skiff var ...`

use anyhow::anyhow;
use skiff_proto::v1 as pb;

use crate::args::{OutputFormat, VarCommand};
use crate::client::{connect, explain};

pub async fn run(server: &str, format: OutputFormat, command: VarCommand) -> anyhow::Result<()> {
    let mut client = connect(server).await?;
    match command {
        VarCommand::Put { key, value } => {
            client
                .put_variable(pb::PutVariableRequest {
                    key: key.clone(),
                    value,
                })
                .await
                .map_err(explain)?;
            println!("variable {key} set");
        }
        VarCommand::Cas { words, absent } => {
            let (key, expected, value) = match (absent, &words[..]) {
                (false, [key, expected, value]) => (key, Some(expected.clone()), value),
                (true, [key, value]) => (key, None, value),
                (false, _) => {
                    return Err(anyhow!(
                        "var cas takes KEY EXPECTED NEW (or --absent KEY NEW)"
                    ))
                }
                (true, _) => return Err(anyhow!("var cas --absent takes KEY NEW")),
            };
            let answer = client
                .compare_and_set_variable(pb::CasVariableRequest {
                    key: key.clone(),
                    expected: expected.clone(),
                    value: value.clone(),
                })
                .await
                .map_err(explain)?
                .into_inner();
            if !answer.swapped {
                let holds = match &answer.current {
                    Some(current) => format!("holds \"{current}\""),
                    None => "does not exist".into(),
                };
                let wanted = match &expected {
                    Some(expected) => format!("\"{expected}\""),
                    None => "no value (--absent)".into(),
                };
                return Err(anyhow!("variable {key} not set: it {holds}, not {wanted}"));
            }
            println!("variable {key} set");
        }
        VarCommand::Get { key, stale } => {
            let answer = client
                .get_variable(pb::GetVariableRequest {
                    key: key.clone(),
                    stale,
                })
                .await
                .map_err(explain)?
                .into_inner();
            if !answer.found {
                return Err(anyhow!("variable {key} not found"));
            }
            match format {
                OutputFormat::Json => println!(
                    "{}",
                    serde_json::json!({ "key": key, "value": answer.value })
                ),
                OutputFormat::Yaml => crate::output::print(
                    format,
                    &serde_json::json!({ "key": key, "value": answer.value }),
                    &[],
                    vec![],
                ),
                OutputFormat::Table => println!("{}", answer.value),
            }
        }
        VarCommand::Ls { prefix, stale } => {
            let variables = client
                .list_variables(pb::ListVariablesRequest { prefix, stale })
                .await
                .map_err(explain)?
                .into_inner()
                .variables;
            let mut sorted: Vec<_> = variables.into_iter().collect();
            sorted.sort();
            let rows = sorted
                .iter()
                .map(|(k, v)| vec![k.clone(), v.clone()])
                .collect();
            let map: std::collections::BTreeMap<_, _> = sorted.iter().cloned().collect();
            crate::output::print(format, &map, &["KEY", "VALUE"], rows);
        }
    }
    Ok(())
}
