//! Routes raft-rs' slog records into `tracing`, so one `--log-format` and
//! one `RUST_LOG` govern every line the server prints.

use std::fmt::Write as _;

use slog::{Drain, Never, OwnedKVList, Record, KV};

struct TracingDrain;

struct Fields(String);

impl slog::Serializer for Fields {
    fn emit_arguments(&mut self, key: slog::Key, val: &std::fmt::Arguments) -> slog::Result {
        let _ = write!(self.0, " {key}={val}");
        Ok(())
    }
}

impl Drain for TracingDrain {
    type Ok = ();
    type Err = Never;

    fn log(&self, record: &Record, values: &OwnedKVList) -> Result<(), Never> {
        let mut fields = Fields(String::new());
        let _ = record.kv().serialize(record, &mut fields);
        let _ = values.serialize(record, &mut fields);
        let fields = fields.0;
        let msg = record.msg();
        match record.level() {
            slog::Level::Critical | slog::Level::Error => {
                tracing::error!(target: "raft", "{msg}{fields}")
            }
            slog::Level::Warning => tracing::warn!(target: "raft", "{msg}{fields}"),
            slog::Level::Info => tracing::info!(target: "raft", "{msg}{fields}"),
            slog::Level::Debug | slog::Level::Trace => {
                tracing::debug!(target: "raft", "{msg}{fields}")
            }
        }
        Ok(())
    }
}

/// A slog logger for raft-rs that writes through `tracing`.
pub fn raft_logger() -> slog::Logger {
    slog::Logger::root(TracingDrain.fuse(), slog::o!())
}
