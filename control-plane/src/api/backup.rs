//! `SnapshotSave`: the backup behind `skiff cluster snapshot save FILE`
//! (see `crate::backup`), sent as the bytes of the file in chunks.

use std::pin::Pin;

use futures::Stream;
use skiff_proto::v1 as pb;
use tonic::{Response, Status};

use super::Api;

/// Bytes per chunk: well under gRPC's 4 MiB message limit.
const CHUNK: usize = 1024 * 1024;

pub type SnapshotStream = Pin<Box<dyn Stream<Item = Result<pb::SnapshotChunk, Status>> + Send>>;

impl Api {
    /// The state after a linearizable read (what the leader has committed
    /// when the call arrived, or later), one consistent image of it.
    pub(super) async fn snapshot_save_here(
        &self,
        request: pb::SnapshotSaveRequest,
    ) -> Result<Response<SnapshotStream>, Status> {
        self.barrier().await?;
        let trust = self.trust()?;
        let state = self.consensus.state().clone();
        let backup = crate::backup::of_state(
            &state,
            trust.ca(),
            self.secrets_key.as_ref(),
            request.redact,
            crate::controllers::now_ms(),
        );
        let bytes = crate::backup::encode(&backup);
        tracing::info!(
            index = backup.applied_index,
            bytes = bytes.len(),
            redacted = request.redact,
            "snapshot saved for a client"
        );
        let chunks: Vec<Result<pb::SnapshotChunk, Status>> = bytes
            .chunks(CHUNK)
            .map(|piece| {
                Ok(pb::SnapshotChunk {
                    data: piece.to_vec(),
                })
            })
            .collect();
        Ok(Response::new(Box::pin(futures::stream::iter(chunks))))
    }
}
