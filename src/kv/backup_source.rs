//! The node's side of `clerk snapshot save`: serves a consistent view of its engine as the
//! chunks of a snapshot stream ([`SnapshotReader`]), one `SnapshotChunk` call per chunk, on
//! the RPC connection thread that received the call (never on the Raft threads). Memory: one
//! chunk per backup in progress (the last one, kept to answer a repeated call), and at most
//! [`MAX_BACKUPS`] of them; one left idle for [`BACKUP_IDLE_MS`] is dropped, which releases
//! its view.
//!
//! Consistency: a backup starts from a view taken once the engine holds every entry
//! committed when the call arrived, so every write acknowledged before it is in the backup
//! (a write is acknowledged only once applied, hence committed).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::engine::{Engine, EngineView};
use super::snapshot_stream::{SnapshotReader, DEFAULT_CHUNK_BYTES};
use crate::node::NodeHandle;
use crate::proto::kvstore::{ErrorCode, SnapshotChunkReply, SnapshotChunkRequest};

/// Backups a node serves at once; one more is answered BUSY.
pub const MAX_BACKUPS: usize = 2;
/// A backup nobody asked a chunk of for this long is dropped.
pub const BACKUP_IDLE_MS: u64 = 60_000;
/// How often a starting backup looks whether the engine has caught up.
const CATCH_UP_POLL_MS: u64 = 5;

/// The engine the apply thread currently writes, for readers on other threads (backups,
/// snapshot senders). The apply thread retires it before it replaces its engine (a snapshot
/// from the leader): readers see their lease go stale and drop their views, and the apply
/// thread waits until every lease is gone, so no handle on the old engine is open when its
/// directory is renamed. Then it fills the slot again.
#[derive(Default)]
pub struct EngineSlot {
    engine: Mutex<Option<Engine>>,
    generation: Arc<std::sync::atomic::AtomicU64>,
    /// One clone per lease alive.
    leases: Arc<()>,
    /// Called by `retire`, for readers that hold leases while idle (backups between calls).
    on_retire: Mutex<Vec<Box<dyn Fn() + Send + Sync>>>,
}

/// A reader's hold on the engine: while it lives, the apply thread does not swap the engine.
pub struct EngineLease {
    pub engine: Engine,
    generation: u64,
    current: Arc<std::sync::atomic::AtomicU64>,
    _lease: Arc<()>,
}

impl EngineLease {
    /// False once the apply thread wants to replace the engine: drop the lease and its views.
    pub fn is_current(&self) -> bool {
        self.current.load(std::sync::atomic::Ordering::SeqCst) == self.generation
    }
}

/// A view of the engine handed to a reader on another thread (a Redis SCAN, KEYS or DBSIZE)
/// together with a lease, so the apply thread does not swap the engine while the reader
/// walks it (a view holds the old engine's files open; after the swap, their directory is
/// gone). Reads through it as through the view itself.
pub struct LeasedView {
    view: EngineView,
    _lease: EngineLease,
}

impl LeasedView {
    /// A view of the leased engine's last commit.
    pub fn new(lease: EngineLease) -> LeasedView {
        LeasedView {
            view: lease.engine.view(),
            _lease: lease,
        }
    }
}

impl std::ops::Deref for LeasedView {
    type Target = EngineView;

    fn deref(&self) -> &EngineView {
        &self.view
    }
}

impl EngineSlot {
    /// A slot holding `engine` from the start.
    pub fn holding(engine: Option<Engine>) -> EngineSlot {
        let slot = EngineSlot::default();
        slot.set(engine);
        slot
    }

    pub fn set(&self, engine: Option<Engine>) {
        *self.engine.lock() = engine;
    }

    /// Runs `hook` whenever the engine is retired.
    pub fn on_retire(&self, hook: impl Fn() + Send + Sync + 'static) {
        self.on_retire.lock().push(Box::new(hook));
    }

    /// The engine, held until the lease is dropped; `None` while it is being replaced.
    pub fn lease(&self) -> Option<EngineLease> {
        let engine = self.engine.lock();
        Some(EngineLease {
            engine: engine.clone()?,
            generation: self.generation.load(std::sync::atomic::Ordering::SeqCst),
            current: Arc::clone(&self.generation),
            _lease: Arc::clone(&self.leases),
        })
    }

    /// Empties the slot, marks every lease stale and waits up to `timeout` for them all to be
    /// dropped. An error (the slot stays empty) when some reader still holds one.
    pub fn retire(&self, timeout: Duration) -> Result<(), String> {
        {
            let mut engine = self.engine.lock();
            *engine = None;
            self.generation
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        for hook in self.on_retire.lock().iter() {
            hook();
        }
        let deadline = Instant::now() + timeout;
        loop {
            let held = Arc::strong_count(&self.leases) - 1;
            if held == 0 {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{held} reader(s) of the engine (a backup or a snapshot sender) did not let go within {} ms",
                    timeout.as_millis()
                ));
            }
            std::thread::sleep(Duration::from_millis(RETIRE_POLL_MS));
        }
    }
}

/// How often `retire` looks whether the readers let go.
const RETIRE_POLL_MS: u64 = 5;

struct Backup {
    reader: SnapshotReader,
    /// Dropped with the backup; the engine is not replaced while it lives.
    _lease: EngineLease,
    index: u64,
    term: u64,
    /// The number of the next chunk to produce.
    next: u64,
    /// The last chunk produced (number `next - 1`), for a repeated call.
    last: Vec<u8>,
    last_used: Instant,
}

/// Why a call was refused: the code and one line.
pub type Refusal = (ErrorCode, String);

pub struct BackupSource {
    node: NodeHandle,
    engine: Arc<EngineSlot>,
    backups: Arc<Mutex<HashMap<u64, Backup>>>,
    next_id: Mutex<u64>,
    chunk_bytes: usize,
    catch_up_timeout: Duration,
}

impl BackupSource {
    /// `max_frame_bytes` bounds a chunk (with room for one record past it and the reply's
    /// own fields); `catch_up_timeout` how long a start waits for the engine.
    pub fn new(
        node: NodeHandle,
        engine: Arc<EngineSlot>,
        max_frame_bytes: usize,
        catch_up_timeout: Duration,
    ) -> BackupSource {
        let backups: Arc<Mutex<HashMap<u64, Backup>>> = Arc::default();
        // A snapshot from the leader replaces the engine: backups in progress end (their
        // next call is told to start again).
        let held = Arc::clone(&backups);
        engine.on_retire(move || held.lock().clear());
        BackupSource {
            node,
            engine,
            backups,
            next_id: Mutex::new(1),
            chunk_bytes: DEFAULT_CHUNK_BYTES.min(max_frame_bytes / 4).max(1),
            catch_up_timeout,
        }
    }

    /// Answers one `SnapshotChunk` call.
    pub fn chunk(&self, request: &SnapshotChunkRequest) -> Result<SnapshotChunkReply, Refusal> {
        self.drop_idle();
        if request.backup_id == 0 {
            return self.start();
        }
        let mut backups = self.backups.lock();
        let Some(backup) = backups.get_mut(&request.backup_id) else {
            return Err((
                ErrorCode::INVALID_ARGUMENT,
                format!(
                    "no backup {} on this node (finished, idle for {BACKUP_IDLE_MS} ms, or \
                     the node restarted); start again",
                    request.backup_id
                ),
            ));
        };
        backup.last_used = Instant::now();
        let data = if request.chunk + 1 == backup.next {
            backup.last.clone()
        } else if request.chunk == backup.next {
            let chunk = backup
                .reader
                .next_chunk()
                .map_err(|e| (ErrorCode::SHUTTING_DOWN, format!("reading the engine: {e}")))?
                .unwrap_or_default();
            backup.next += 1;
            backup.last = chunk.clone();
            chunk
        } else {
            return Err((
                ErrorCode::INVALID_ARGUMENT,
                format!(
                    "backup {}: chunk {} asked, the next is {}",
                    request.backup_id, request.chunk, backup.next
                ),
            ));
        };
        let done = data.is_empty();
        let summary = backup.reader.summary();
        let reply = SnapshotChunkReply {
            backup_id: request.backup_id,
            index: backup.index,
            term: backup.term,
            node_id: self.node.id(),
            data,
            done,
            keys: summary.keys,
            sessions: summary.sessions,
            ..Default::default()
        };
        if done {
            backups.remove(&request.backup_id);
        }
        Ok(reply)
    }

    fn drop_idle(&self) {
        let idle = Duration::from_millis(BACKUP_IDLE_MS);
        self.backups
            .lock()
            .retain(|_, backup| backup.last_used.elapsed() < idle);
    }

    /// Takes the view once the engine holds everything committed now, and serves chunk 0.
    fn start(&self) -> Result<SnapshotChunkReply, Refusal> {
        if self.backups.lock().len() >= MAX_BACKUPS {
            return Err((
                ErrorCode::BUSY,
                format!("this node already serves {MAX_BACKUPS} backups; retry later"),
            ));
        }
        let status = self.node.status();
        let deadline = Instant::now() + self.catch_up_timeout;
        let (view, lease) = loop {
            let lease = self.engine.lease().ok_or_else(|| {
                (
                    ErrorCode::TIMEOUT,
                    "the node is replacing its state (a snapshot from the leader); retry".into(),
                )
            })?;
            let view = lease.engine.view();
            let applied = view
                .meta()
                .map_err(|e| (ErrorCode::SHUTTING_DOWN, format!("reading the engine: {e}")))?
                .applied_index;
            if applied >= status.commit {
                break (view, lease);
            }
            if Instant::now() >= deadline {
                return Err((
                    ErrorCode::TIMEOUT,
                    format!(
                        "the engine holds index {applied}, not yet the commit index {} \
                         (apply lag); retry",
                        status.commit
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(CATCH_UP_POLL_MS));
        };
        let mut reader = SnapshotReader::new(view, self.chunk_bytes)
            .map_err(|e| (ErrorCode::SHUTTING_DOWN, format!("reading the engine: {e}")))?;
        let index = reader.meta().applied_index;
        let first = reader
            .next_chunk()
            .map_err(|e| (ErrorCode::SHUTTING_DOWN, format!("reading the engine: {e}")))?
            .unwrap_or_default();
        let id = {
            let mut next = self.next_id.lock();
            *next += 1;
            *next - 1
        };
        log::info!(
            "node {}: backup {id} started at index {index} (term {})",
            self.node.id(),
            status.term
        );
        let reply = SnapshotChunkReply {
            backup_id: id,
            index,
            term: status.term,
            node_id: self.node.id(),
            data: first.clone(),
            ..Default::default()
        };
        self.backups.lock().insert(
            id,
            Backup {
                reader,
                _lease: lease,
                index,
                term: status.term,
                next: 1,
                last: first,
                last_used: Instant::now(),
            },
        );
        Ok(reply)
    }
}
