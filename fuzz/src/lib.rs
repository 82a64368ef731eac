//! Fuzz targets for Skiff's parsers of hostile input (issue #17): one plain
//! function per target, `NAME(data: &[u8])`, which feeds the bytes to the
//! real parser and panics only when a property fails (a panic in the code
//! under test counts as one). The stable runner (`tests/fuzz.rs`) runs each
//! over its committed corpus and a bounded number of mutations in CI; the
//! `cargo-fuzz/` package runs the same functions under libFuzzer on nightly.
//!
//! Where the input is a text format the property is a round trip (parse,
//! render, parse gives the same value); the tar unpacker's is that nothing
//! outside the layer directory changes.

mod consensus;
mod image;
mod input;
mod proxy;
mod spec;
mod tar_unpack;

pub use consensus::{raft_message, wal_record};
pub use image::{image_config, image_reference};
pub use proxy::proxy_http_head;
pub use spec::{spec_conversions, spec_file};
pub use tar_unpack::tar_unpack;

/// A fuzz target: bytes in, a panic when a property fails.
pub type Target = fn(&[u8]);

/// Every target by name, for the runners.
pub const TARGETS: &[(&str, Target)] = &[
    ("spec_file", spec_file),
    ("spec_conversions", spec_conversions),
    ("image_reference", image_reference),
    ("image_config", image_config),
    ("tar_unpack", tar_unpack),
    ("proxy_http_head", proxy_http_head),
    ("wal_record", wal_record),
    ("raft_message", raft_message),
];
