//! The KV layer's side of streamed InstallSnapshot (`node/snapshot.rs`): the engine's
//! consistent views as the chunks a leader sends ([`SnapshotReader`]), and the fresh engine a
//! follower builds from them beside its live one ([`SnapshotBuilder`]), swapped in by the
//! apply thread.

use std::path::PathBuf;
use std::sync::Arc;

use super::backup_source::{EngineLease, EngineSlot};
use super::snapshot_stream::{ChunkCodec, SnapshotBuilder, SnapshotReader, VerifiedSnapshot};
use crate::node::{ReceivedSnapshot, SnapshotChunks, SnapshotIntake, SnapshotStore};

/// The engine of one node, as a snapshot store.
pub struct EngineSnapshots {
    /// The live engine, for views (empty while the apply thread replaces it).
    slot: Arc<EngineSlot>,
    /// Where the live engine lives; a received one is built beside it.
    live: PathBuf,
    cache_bytes: u64,
    /// How the chunks sent are encoded; a receiver reads every codec.
    codec: ChunkCodec,
}

impl EngineSnapshots {
    pub fn new(
        slot: Arc<EngineSlot>,
        live: PathBuf,
        cache_bytes: u64,
        codec: ChunkCodec,
    ) -> EngineSnapshots {
        EngineSnapshots {
            slot,
            live,
            cache_bytes,
            codec,
        }
    }
}

impl SnapshotStore for EngineSnapshots {
    fn read(&self, chunk_bytes: usize) -> Result<Box<dyn SnapshotChunks>, String> {
        let lease = self
            .slot
            .lease()
            .ok_or("the node is replacing its engine (a snapshot from a leader)")?;
        let reader = SnapshotReader::new(lease.engine.view(), chunk_bytes)
            .map_err(|e| e.to_string())?
            .with_codec(self.codec);
        Ok(Box::new(ViewChunks {
            reader,
            lease,
            finished: false,
        }))
    }

    fn receive(&self) -> Result<Box<dyn SnapshotIntake>, String> {
        let builder = SnapshotBuilder::new(&self.live, self.cache_bytes).map_err(|e| e.0)?;
        Ok(Box::new(Intake(builder)))
    }
}

struct ViewChunks {
    reader: SnapshotReader,
    /// Held while the view is read: the engine is not replaced under it.
    lease: EngineLease,
    finished: bool,
}

impl SnapshotChunks for ViewChunks {
    fn applied_index(&self) -> u64 {
        self.reader.meta().applied_index
    }

    fn next_chunk(&mut self) -> Result<Option<Vec<u8>>, String> {
        if !self.lease.is_current() {
            return Err("the engine is being replaced (this node installs a snapshot)".into());
        }
        let chunk = self.reader.next_chunk().map_err(|e| e.0)?;
        self.finished = self.reader.is_finished();
        Ok(chunk)
    }

    fn is_finished(&self) -> bool {
        self.finished
    }
}

struct Intake(SnapshotBuilder);

impl SnapshotIntake for Intake {
    fn push(&mut self, chunk: &[u8]) -> Result<(), String> {
        self.0.push(chunk).map_err(|e| e.0)
    }

    fn is_complete(&self) -> bool {
        self.0.is_complete()
    }

    fn finish(self: Box<Self>) -> Result<Box<dyn ReceivedSnapshot>, String> {
        let verified = self.0.finish().map_err(|e| e.0)?;
        Ok(Box::new(Received(verified)))
    }
}

struct Received(VerifiedSnapshot);

impl ReceivedSnapshot for Received {
    fn applied_index(&self) -> u64 {
        self.0.summary().meta.applied_index
    }

    fn swap_in(self: Box<Self>) -> Result<(), String> {
        self.0.swap_in().map(|_| ()).map_err(|e| e.0)
    }
}
