//! `skiff events`: the committed events of the cluster, oldest first (the
//! last N with `--tail`, the newer ones with `--since`); with `--follow`,
//! then new ones as they commit.

use skiff_proto::v1 as pb;

use crate::args::{EventsArgs, OutputFormat, Since};
use crate::client::explain;

pub async fn run(server: &str, format: OutputFormat, args: EventsArgs) -> anyhow::Result<()> {
    // Without a request timeout: --follow runs until interrupted.
    let channel = crate::client::channel(server, None).await?;
    let mut client = crate::client::client(channel);
    let request = pb::EventsRequest {
        service: args.service.unwrap_or_default(),
        node: args.node.unwrap_or_default(),
        follow: args.follow,
        after_seq: 0,
        tail: args.tail,
        max_age_ms: match args.since {
            Some(Since::AgeMs(ms)) => ms,
            _ => 0,
        },
        min_index: match args.since {
            Some(Since::Index(index)) => index,
            _ => 0,
        },
    };
    let mut stream = client.events(request).await.map_err(explain)?.into_inner();
    if format == OutputFormat::Table {
        println!(
            "{:<24}  {:>7}  {:<18}  {:<12}  {:<10}  {:<12}  {:<12}  MESSAGE",
            "TIME", "INDEX", "EVENT", "SERVICE", "NODE", "REPLICA", "BY"
        );
    }
    while let Some(event) = stream.message().await.map_err(explain)? {
        match format {
            // One JSON object per line, so a machine can follow the stream.
            OutputFormat::Json => println!("{}", serde_json::to_string(&event)?),
            // One YAML document per event, for the same reason.
            OutputFormat::Yaml => print!("---\n{}", serde_yaml::to_string(&event)?),
            OutputFormat::Table => println!(
                "{:<24}  {:>7}  {:<18}  {:<12}  {:<10}  {:<12}  {:<12}  {}",
                time(event.time_ms),
                event.index,
                event.kind,
                dash(&event.service),
                dash(&event.node),
                dash(&event.alloc),
                dash(&event.by),
                event.message
            ),
        }
    }
    Ok(())
}

fn dash(value: &str) -> &str {
    if value.is_empty() {
        "-"
    } else {
        value
    }
}

/// `2024-05-01T12:00:00.123Z` (UTC) from milliseconds since the epoch.
pub(crate) fn time(ms: u64) -> String {
    skiff_spec::time::format_rfc3339_ms(ms)
}

#[cfg(test)]
mod tests {
    #[test]
    fn times_print_as_utc() {
        assert_eq!(super::time(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(super::time(1_714_564_800_123), "2024-05-01T12:00:00.123Z");
    }
}
