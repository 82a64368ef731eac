//! Writes the generated part of the seed corpus: protobuf and JSON specs
//! from the example stack files, a WAL segment from the real encoder, and
//! raft message sequences encoded as peers send them. Run by hand after a
//! format change:
//! `cargo test -p skiff-fuzz --test seeds -- --ignored`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use prost::Message as _;
use protobuf::Message as _;
use raft::eraftpb::{
    ConfChange, ConfChangeType, ConfState, Entry, EntryType, HardState, Message, MessageType,
    SnapshotMetadata,
};
use skiff_control_plane::consensus::fuzzing::{
    encode_conf_state, encode_entries, encode_hard_state, encode_snapshot,
};
use skiff_spec::pb::spec_to_pb;
use skiff_spec::stack::{self, FileSource, LoadOptions, StackFile};

struct NoFiles;

impl FileSource for NoFiles {
    fn read(&self, _: &Path) -> std::io::Result<String> {
        Err(std::io::ErrorKind::NotFound.into())
    }
}

fn corpus(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target)
}

fn write(target: &str, name: &str, bytes: &[u8]) {
    std::fs::write(corpus(target).join(format!("seed-{name}")), bytes).expect("write a seed");
}

fn example_specs() -> Vec<skiff_spec::ServiceSpec> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut specs = Vec::new();
    for file in ["deploy/examples/compose.yaml", "deploy/examples/stack.yaml"] {
        let options = LoadOptions {
            stack: Some("app".to_string()),
            files: vec![StackFile {
                path: PathBuf::from(file),
                contents: std::fs::read_to_string(root.join(file)).expect("an example"),
            }],
            cli_vars: BTreeMap::new(),
            ..LoadOptions::default()
        };
        specs.extend(
            stack::load(&options, &NoFiles)
                .expect("an example loads")
                .services,
        );
    }
    specs
}

fn entry(index: u64, term: u64, data: &[u8]) -> Entry {
    Entry {
        index,
        term,
        data: data.to_vec().into(),
        ..Default::default()
    }
}

#[test]
#[ignore = "writes the seed corpus; run by hand"]
fn write_seed_corpus() {
    for spec in example_specs() {
        let mut bytes = vec![0];
        spec_to_pb(&spec).encode(&mut bytes).expect("encode");
        write("spec_conversions", &format!("pb-{}", spec.name), &bytes);
        let mut bytes = vec![1];
        bytes.extend(serde_json::to_vec(&spec).expect("json"));
        write("spec_conversions", &format!("json-{}", spec.name), &bytes);
    }

    let mut wal = Vec::new();
    let cs = ConfState {
        voters: vec![1, 2, 3],
        ..Default::default()
    };
    let meta = SnapshotMetadata {
        index: 1,
        term: 1,
        conf_state: protobuf::SingularPtrField::some(cs.clone()),
        ..Default::default()
    };
    encode_snapshot(&mut wal, &meta, true);
    encode_conf_state(&mut wal, &cs);
    let hs = HardState {
        term: 2,
        vote: 1,
        commit: 3,
        ..Default::default()
    };
    encode_hard_state(&mut wal, &hs);
    encode_entries(
        &mut wal,
        &[entry(2, 2, b""), entry(3, 2, br#"{"origin":1,"tag":7}"#)],
    );
    encode_entries(&mut wal, &[entry(3, 3, b"truncates")]);
    encode_snapshot(&mut wal, &meta, false);
    write("wal_record", "segment", &wal);
    let mut torn = wal.clone();
    torn.truncate(wal.len() - 5);
    write("wal_record", "torn-tail", &torn);
    let mut corrupt = wal.clone();
    corrupt[20] ^= 1;
    write("wal_record", "corrupt-middle", &corrupt);

    // raft_message: [server, op] then, for op 4, [len, protobuf bytes].
    let mut heartbeat = Message::default();
    heartbeat.set_msg_type(MessageType::MsgHeartbeat);
    heartbeat.from = 2;
    heartbeat.to = 1;
    heartbeat.term = 2;
    heartbeat.commit = 1;
    let mut append = Message::default();
    append.set_msg_type(MessageType::MsgAppend);
    append.from = 2;
    append.to = 1;
    append.term = 2;
    append.index = 1;
    append.log_term = 1;
    append.commit = 2;
    let mut cc = ConfChange {
        node_id: 4,
        ..Default::default()
    };
    cc.set_change_type(ConfChangeType::AddLearnerNode);
    let mut conf = entry(3, 2, &cc.write_to_bytes().expect("encode"));
    conf.set_entry_type(EntryType::EntryConfChange);
    append.set_entries(vec![entry(2, 2, b"{}"), conf].into());
    let mut vote = Message::default();
    vote.set_msg_type(MessageType::MsgRequestPreVote);
    vote.from = 3;
    vote.to = 1;
    vote.term = 3;
    vote.log_term = 1;
    vote.index = 1;
    let mut sequence = Vec::new();
    for (server, m) in [(0u8, &heartbeat), (0, &append), (0, &vote), (1, &append)] {
        let bytes = m.write_to_bytes().expect("encode");
        sequence.extend([
            server,
            4,
            u8::try_from(bytes.len()).expect("a small message"),
        ]);
        sequence.extend(bytes);
        sequence.extend([server, 5, 20]);
    }
    write("raft_message", "heartbeat-append-vote", &sequence);
    write(
        "raft_message",
        "campaign-and-ticks",
        &[0, 7, 0, 5, 30, 0, 5, 30, 1, 7, 1, 5, 30],
    );
}
