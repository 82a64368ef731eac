//! Builders shared by the state's unit tests.

use std::collections::BTreeMap;

use super::{Command, Placement, RuntimeKind, ServiceSpec};

pub(super) fn spec(name: &str, replicas: u32) -> ServiceSpec {
    ServiceSpec {
        name: name.into(),
        runtime: RuntimeKind::Process,
        replicas,
        command: vec!["sleep".into(), "100".into()],
        env: BTreeMap::new(),
        workdir: None,
        ..Default::default()
    }
}

pub(super) fn node(name: &str) -> Command {
    Command::RegisterNode {
        process_runtime: true,
        agent_address: String::new(),
        name: name.into(),
        address: "127.0.0.1".into(),
        port_range: (20000, 20010),
        cpu_millis: 0,
        memory_mb: 0,
        labels: BTreeMap::new(),
    }
}

pub(super) fn place(id: &str, service: &str, port: u16) -> Placement {
    Placement {
        id: id.into(),
        service: service.into(),
        node: "n1".into(),
        host_port: port,
        slot: 0,
    }
}
