//! The node's runtime: dispatches each replica to the runtime its spec
//! names (process or oci).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::oci::{OciHandle, OciRuntime};
use super::process::{ProcessHandle, ProcessRuntime};
use super::{Exit, Runtime, RuntimeError, TaskHandle};
use crate::health::HealthCheck;
use crate::spec::{ReplicaSpec, RuntimeKind};

pub struct AnyRuntime {
    pub process: ProcessRuntime,
    pub oci: Arc<OciRuntime>,
    /// `process` replicas are allowed (`--enable-process-runtime`); the
    /// scheduler never sends them otherwise, and this refuses any that
    /// arrives anyway.
    pub process_allowed: bool,
}

impl AnyRuntime {
    fn check_allowed(&self, spec: &ReplicaSpec) -> Result<(), RuntimeError> {
        if spec.runtime == RuntimeKind::Process && !self.process_allowed {
            return Err(RuntimeError::Unsupported {
                short_id: spec.alloc_id.chars().take(12).collect(),
                service: spec.service.clone(),
                reason: "the process runtime is disabled on this node (start its agent with --enable-process-runtime)".into(),
            });
        }
        Ok(())
    }
}

#[derive(Debug)]
pub enum AnyHandle {
    Process(ProcessHandle),
    Oci(OciHandle),
}

impl Runtime for AnyRuntime {
    type Handle = AnyHandle;

    async fn prepare(&self, spec: &ReplicaSpec) -> Result<(), RuntimeError> {
        self.check_allowed(spec)?;
        match spec.runtime {
            RuntimeKind::Process => self.process.prepare(spec).await,
            RuntimeKind::Oci => self.oci.prepare(spec).await,
        }
    }

    async fn prefetch(&self, image: &str) -> Result<(), String> {
        self.oci.prefetch(image).await
    }

    fn start(&self, spec: &ReplicaSpec, alloc_dir: &Path) -> Result<AnyHandle, RuntimeError> {
        self.check_allowed(spec)?;
        match spec.runtime {
            RuntimeKind::Process => self.process.start(spec, alloc_dir).map(AnyHandle::Process),
            RuntimeKind::Oci => self.oci.start(spec, alloc_dir).map(AnyHandle::Oci),
        }
    }

    fn recover(&self, spec: &ReplicaSpec, pid: u32, start_time: u64) -> Option<AnyHandle> {
        match spec.runtime {
            RuntimeKind::Process => self
                .process
                .recover(spec, pid, start_time)
                .map(AnyHandle::Process),
            RuntimeKind::Oci => self.oci.recover(spec, pid, start_time).map(AnyHandle::Oci),
        }
    }

    fn destroy(&self, spec: &ReplicaSpec, alloc_dir: &Path) {
        match spec.runtime {
            RuntimeKind::Process => self.process.destroy(spec, alloc_dir),
            RuntimeKind::Oci => self.oci.destroy(spec, alloc_dir),
        }
    }
}

impl TaskHandle for AnyHandle {
    fn pid(&self) -> u32 {
        match self {
            AnyHandle::Process(h) => h.pid(),
            AnyHandle::Oci(h) => h.pid(),
        }
    }

    fn start_time(&self) -> u64 {
        match self {
            AnyHandle::Process(h) => h.start_time(),
            AnyHandle::Oci(h) => h.start_time(),
        }
    }

    async fn wait(&mut self) -> Exit {
        match self {
            AnyHandle::Process(h) => h.wait().await,
            AnyHandle::Oci(h) => h.wait().await,
        }
    }

    async fn stop(&mut self, grace: Duration) -> Exit {
        match self {
            AnyHandle::Process(h) => h.stop(grace).await,
            AnyHandle::Oci(h) => h.stop(grace).await,
        }
    }

    fn health_check(&self) -> Option<HealthCheck> {
        match self {
            AnyHandle::Process(h) => h.health_check(),
            AnyHandle::Oci(h) => h.health_check(),
        }
    }

    fn probe_addr(&self) -> Option<SocketAddr> {
        match self {
            AnyHandle::Process(h) => h.probe_addr(),
            AnyHandle::Oci(h) => h.probe_addr(),
        }
    }

    fn container_port(&self) -> Option<u16> {
        match self {
            AnyHandle::Process(h) => h.container_port(),
            AnyHandle::Oci(h) => h.container_port(),
        }
    }

    async fn exec_check(&self, command: &[String], timeout: Duration) -> Result<(), String> {
        match self {
            AnyHandle::Process(h) => h.exec_check(command, timeout).await,
            AnyHandle::Oci(h) => h.exec_check(command, timeout).await,
        }
    }
}
