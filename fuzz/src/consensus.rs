//! The raft log's record decoder and the raft messages peers send.

use protobuf::Message as _;
use raft::eraftpb::{
    ConfChange, ConfChangeType, ConfState, Entry, EntryType, Message, Snapshot, SnapshotMetadata,
};
use skiff_control_plane::consensus::core::{cap_forwarded_time, Core, CoreConfig};
use skiff_control_plane::consensus::fuzzing::{
    decode_all, encode_conf_state, encode_entries, encode_hard_state, encode_snapshot,
    is_torn_tail, Record,
};
use skiff_control_plane::consensus::mem::MemLog;
use skiff_control_plane::consensus::LogStore;
use skiff_control_plane::state::{Member, State};

use crate::input::Input;

/// A WAL segment's bytes: decoding stops at the first damaged record
/// without panicking, and the records it kept encode to bytes that decode
/// to the same records, all valid.
pub fn wal_record(data: &[u8]) {
    let (records, valid) = decode_all(data);
    assert!(valid <= data.len());
    let _ = is_torn_tail(data, valid);
    let mut buffer = Vec::new();
    for record in &records {
        match record {
            Record::Entries(entries) => encode_entries(&mut buffer, entries),
            Record::HardState(hs) => encode_hard_state(&mut buffer, hs),
            Record::ConfState(cs) => encode_conf_state(&mut buffer, cs),
            Record::Snapshot {
                metadata,
                installed,
            } => encode_snapshot(&mut buffer, metadata, *installed),
        }
    }
    let (again, again_valid) = decode_all(&buffer);
    assert_eq!(again_valid, buffer.len());
    // An empty entries record encodes to nothing (it replays as nothing).
    let kept: Vec<&Record> = records
        .iter()
        .filter(|r| !matches!(r, Record::Entries(e) if e.is_empty()))
        .collect();
    assert_eq!(again.iter().collect::<Vec<_>>(), kept);
}

const SERVERS: u64 = 3;

fn logger() -> slog::Logger {
    slog::Logger::root(slog::Discard, slog::o!())
}

/// A three-server cluster's first snapshot, as the simulation starts.
fn cluster_snapshot() -> Snapshot {
    let mut state = State::default();
    for id in 1..=SERVERS {
        state.members.insert(
            id,
            Member {
                id,
                name: format!("s{id}"),
                address: format!("127.0.0.1:{}", 7000 + id),
                learner: false,
            },
        );
    }
    state.applied_index = 1;
    let mut snapshot = Snapshot {
        data: state.to_image().into(),
        ..Default::default()
    };
    let meta = snapshot.mut_metadata();
    meta.index = 1;
    meta.term = 1;
    meta.mut_conf_state().voters = (1..=SERVERS).collect();
    snapshot
}

fn core(id: u64, snapshot: Option<&Snapshot>) -> Core<MemLog> {
    let mut disk = MemLog::new();
    if let Some(snapshot) = snapshot {
        disk.apply_snapshot(snapshot)
            .expect("the first snapshot applies");
    }
    let config = CoreConfig {
        id,
        election_ticks: 10,
        heartbeat_ticks: 2,
        snapshot_every: 4,
    };
    Core::new(config, disk, &logger()).expect("a core starts")
}

/// A number near the ones a three-server cluster uses (ids, terms and
/// indexes below 8), or sometimes anything.
fn near(input: &mut Input) -> u64 {
    input.small()
}

fn entry(input: &mut Input) -> Entry {
    let mut entry = Entry {
        term: near(input),
        index: near(input),
        ..Default::default()
    };
    match input.byte() % 4 {
        0 => {
            entry.set_entry_type(EntryType::EntryConfChange);
            let mut cc = ConfChange::default();
            cc.set_change_type(input.pick(&[
                ConfChangeType::AddNode,
                ConfChangeType::RemoveNode,
                ConfChangeType::AddLearnerNode,
            ]));
            cc.node_id = near(input);
            entry.data = cc.write_to_bytes().unwrap_or_default().into();
            entry.context = input.bytes(64).to_vec().into();
        }
        1 => {
            entry.set_entry_type(EntryType::EntryConfChangeV2);
            entry.data = input.bytes(64).to_vec().into();
        }
        _ => entry.data = input.bytes(128).to_vec().into(),
    }
    entry
}

/// A message with fields a peer could set, most of them plausible.
fn message(input: &mut Input) -> Message {
    let mut m = Message::default();
    let kind = input.byte() % 19;
    m.set_msg_type(protobuf::ProtobufEnum::from_i32(i32::from(kind)).unwrap_or_default());
    m.to = near(input);
    m.from = near(input);
    m.term = near(input);
    m.log_term = near(input);
    m.index = near(input);
    m.commit = near(input);
    m.commit_term = near(input);
    m.reject = input.byte().is_multiple_of(4);
    m.reject_hint = near(input);
    m.request_snapshot = near(input);
    m.context = input.bytes(16).to_vec().into();
    let entries: Vec<Entry> = (0..input.byte() % 4).map(|_| entry(input)).collect();
    m.set_entries(entries.into());
    if input.byte().is_multiple_of(4) {
        let mut snapshot = Snapshot::default();
        let meta: &mut SnapshotMetadata = snapshot.mut_metadata();
        meta.index = near(input);
        meta.term = near(input);
        let voters = (0..input.byte() % 4).map(|_| near(input)).collect();
        let learners = (0..input.byte() % 3).map(|_| near(input)).collect();
        meta.set_conf_state(ConfState {
            voters,
            learners,
            ..Default::default()
        });
        snapshot.data = match input.byte() % 3 {
            0 => cluster_snapshot().data,
            _ => input.bytes(64).to_vec().into(),
        };
        m.set_snapshot(snapshot);
    }
    m
}

/// A sequence of events for two servers: server 1 of a three-server
/// cluster and server 4, new and empty (joining). Each event is a message
/// from a peer (built from fields, or decoded from raw protobuf bytes as
/// the transport does), ticks, or a campaign; every server handles its
/// `Ready` after each. Nothing a peer sends may panic a server.
pub fn raft_message(data: &[u8]) {
    let snapshot = cluster_snapshot();
    let mut servers = [Some(core(1, Some(&snapshot))), Some(core(4, None))];
    let mut input = Input::new(data);
    let mut events = 0;
    while !input.is_empty() && events < 64 {
        events += 1;
        let which = usize::from(input.byte() % 2);
        let Some(server) = &mut servers[which] else {
            continue;
        };
        match input.byte() % 8 {
            0..=3 => {
                let m = message(&mut input);
                deliver(server, m);
            }
            4 => {
                if let Ok(m) = Message::parse_from_bytes(input.bytes(255)) {
                    deliver(server, m);
                }
            }
            5 | 6 => {
                for _ in 0..input.byte() % 24 {
                    server.tick();
                }
            }
            // As the server does at start: only a sole voter campaigns by
            // itself (raft-rs panics when a server outside the
            // configuration does).
            _ if server.is_sole_voter() => {
                let _ = server.campaign();
            }
            _ => {}
        }
        // An error (a snapshot whose state does not decode, storage
        // refusing a gap) stops the server's consensus, as in the server:
        // a clean stop, not a panic.
        if server.advance(&mut |_| {}).is_err() {
            servers[which] = None;
        }
    }
}

fn deliver(server: &mut Core<MemLog>, mut m: Message) {
    cap_forwarded_time(&mut m, 1_000_000);
    server.step(m);
}
