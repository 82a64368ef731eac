//! The stack-file reader and the protocol conversions of `skiff-spec`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use prost::Message as _;
use skiff_proto::v1 as pb;
use skiff_spec::pb::{spec_from_pb, spec_to_pb};
use skiff_spec::stack::{self, FileSource, LoadOptions, StackFile};
use skiff_spec::{spec_diff, ServiceSpec};

/// The files a stack may read besides itself (`.env`, `env_file`).
struct MemFs(BTreeMap<PathBuf, String>);

impl FileSource for MemFs {
    fn read(&self, path: &Path) -> std::io::Result<String> {
        self.0
            .get(path)
            .cloned()
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotFound))
    }
}

fn options(stack: Option<&str>, text: String) -> LoadOptions {
    LoadOptions {
        stack: stack.map(str::to_string),
        files: vec![StackFile {
            path: PathBuf::from("stack.yaml"),
            contents: text,
        }],
        dotenv: Some(PathBuf::from(".env")),
        ..LoadOptions::default()
    }
}

/// A Compose or Skiff-format file (then, after a NUL byte, the `.env` text
/// and, after another, an `env_file`'s): loading never panics, and what
/// loads exports to Skiff's format and loads back the same.
pub fn spec_file(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.splitn(3, '\0');
    let file = parts.next().unwrap_or_default().to_string();
    let mut files = BTreeMap::new();
    files.insert(
        PathBuf::from(".env"),
        parts.next().unwrap_or_default().to_string(),
    );
    files.insert(
        PathBuf::from("app.env"),
        parts.next().unwrap_or_default().to_string(),
    );
    let fs = MemFs(files);
    let Ok(loaded) = stack::load(&options(Some("app"), file), &fs) else {
        return;
    };
    let _ = stack::start_order(&loaded.services);
    let exported = stack::export(Some("app"), &loaded.services);
    let again = stack::load(
        &options(Some("app"), exported.clone()),
        &MemFs(BTreeMap::new()),
    )
    .unwrap_or_else(|e| panic!("an exported stack does not load: {e}\n{exported}"));
    assert_eq!(again.services, loaded.services, "{exported}");
}

/// A protobuf `ServiceSpec` (first byte even) or a JSON one as the state
/// stores it (odd): converting and validating never panics, and a valid
/// spec survives protobuf, JSON and Skiff's stack format unchanged.
pub fn spec_conversions(data: &[u8]) {
    let Some((&kind, rest)) = data.split_first() else {
        return;
    };
    let spec = if kind % 2 == 0 {
        let Ok(message) = pb::ServiceSpec::decode(rest) else {
            return;
        };
        match spec_from_pb(message) {
            Ok(spec) => spec,
            Err(e) => {
                let _ = e.to_string();
                return;
            }
        }
    } else {
        let Ok(spec) = serde_json::from_slice::<ServiceSpec>(rest) else {
            return;
        };
        // Read back from disk or a peer and not validated yet: everything
        // that looks at a spec must cope with it.
        for constraint in &spec.constraints {
            let _ = constraint.to_string();
        }
        let labels = BTreeMap::from([("zone".to_string(), "a".to_string())]);
        let _ = spec.constraints_hold(&labels, "node-1", "127.0.0.1");
        let _ = spec.runs_same(&ServiceSpec::default());
        let _ = spec_diff(&ServiceSpec::default(), &spec);
        let _ = spec_from_pb(spec_to_pb(&spec));
        if spec.validate().is_err() {
            return;
        }
        let _ = stack::export(None, std::slice::from_ref(&spec));
        return;
    };
    let again = spec_from_pb(spec_to_pb(&spec))
        .unwrap_or_else(|e| panic!("a valid spec does not convert back: {e}\n{spec:?}"));
    assert_eq!(again, spec);
    let json = serde_json::to_vec(&spec).expect("a spec serializes");
    let back: ServiceSpec = serde_json::from_slice(&json).expect("a spec deserializes");
    assert_eq!(back, spec);
    let _ = spec_diff(&spec, &again);
    assert!(spec.runs_same(&again));
    // Alone in its stack file, a spec can only depend on itself.
    let mut alone = spec;
    alone.depends_on.retain(|d| d.service == alone.name);
    let exported = stack::export(None, std::slice::from_ref(&alone));
    let loaded = stack::load(&options(None, exported.clone()), &MemFs(BTreeMap::new()))
        .unwrap_or_else(|e| panic!("an exported spec does not load: {e}\n{exported}"));
    assert_eq!(loaded.services, vec![alone], "{exported}");
}
