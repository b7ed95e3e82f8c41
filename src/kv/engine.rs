//! The storage engine under the state machine: the applied key-value state lives in an
//! embedded, durable, copy-on-write B-tree (redb), not in a map in memory, so a node's memory
//! is bounded by `engine_cache_bytes` whatever the size of the data set, and a restart reads
//! nothing but a few rows of metadata.
//!
//! # Why fjall
//!
//! `bench/engine-choice/` measured redb (a copy-on-write B-tree) and fjall (an LSM tree), both
//! pure Rust, on this machine for the apply pattern; figures and reasoning are in
//! `bench/engine-choice/README.md`. At 8 million keys redb took 12,000 random puts/s (each
//! 256-byte put rewrites a 4 KiB page, and its durable commits stalled up to 1.7 s); fjall took
//! 99,000 puts/s with its slowest batch at 0.3 s. Both give consistent read views (MVCC), one
//! atomic batch across several keyspaces, and checksummed storage (fjall verifies every block
//! it reads). fjall costs more resident memory (memtables; bounded here by
//! `MAX_MEMTABLE_BYTES`) and its file I/O cannot be replaced by a simulated disk, so its
//! durability is checked with real crashes (see the tests named in the README).
//!
//! # Keyspaces
//!
//! - `data`: key -> `[crc32 of key and value, u32 le][value]`. fjall checksums its blocks;
//!   the row checksum is verified on every read on top of that, so a flipped bit in a value is
//!   an error naming the engine directory, never a wrong answer, whatever the engine checks.
//! - `sessions`: client id (u64 big-endian) -> the session, encoded by the state machine,
//!   with the same checksum prefix.
//! - `meta`: `applied_index`, `clock_ms` (u64 little-endian).
//!
//! # Durability contract
//!
//! [`Engine::commit`] writes one batch atomically: a crash leaves the engine at the state
//! before or after it, never in between, and the applied index always matches the data (all
//! three keyspaces are in the same fjall batch, one journal record). A relaxed commit
//! (`durable == false`) may be lost in a crash — the node then replays those entries from its
//! WAL, which still holds them. A checkpoint ([`Engine::checkpoint`]: the journal fsynced)
//! makes every commit before it survive a crash; the Raft log may be compacted only up to the
//! applied index of a checkpointed commit.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode, Readable};

const APPLIED_INDEX: &[u8] = b"applied_index";
const CLOCK_MS: &[u8] = b"clock_ms";

/// The directory of the engine inside a node's data directory.
pub const ENGINE_DIR_NAME: &str = "engine";

/// The longest key the engine stores (fjall refuses longer ones, by a panic): the service
/// refuses longer keys, and the state machine skips a command that carries one.
pub const MAX_KEY_BYTES: usize = u16::MAX as usize - DATA_KEY_PREFIX.len();

/// In front of every stored data key: fjall refuses an empty key, the map allows it.
const DATA_KEY_PREFIX: &[u8] = b"k";

fn data_key(key: &[u8]) -> Vec<u8> {
    let mut stored = Vec::with_capacity(DATA_KEY_PREFIX.len() + key.len());
    stored.extend_from_slice(DATA_KEY_PREFIX);
    stored.extend_from_slice(key);
    stored
}

/// Bytes of the checksum in front of every stored row.
const CHECKSUM_BYTES: usize = 4;

/// The most memory one keyspace's memtables hold before they are flushed to disk: with the
/// cache, what bounds the engine's resident memory.
const MAX_MEMTABLE_BYTES: u64 = 16 << 20;

/// The journal is bounded so that a restart replays at most this much (the minimum fjall takes).
const MAX_JOURNAL_BYTES: u64 = 64 << 20;

/// Background flush and compaction threads per node: three nodes share two cores on the
/// benchmark machine, and compactions of one node should not starve the others.
const WORKER_THREADS: usize = 2;

/// A failure of the engine: one line naming the directory and what went wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineError(pub String);

impl std::fmt::Display for EngineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for EngineError {}

/// What the engine's metadata says about the state it holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngineMeta {
    pub applied_index: u64,
    pub clock_ms: u64,
}

/// Keys and their values, in key order: one batch of a bulk load ([`Engine::ingest_data`]).
pub type Rows = Vec<(Vec<u8>, Vec<u8>)>;

/// The changes of one apply batch, written by one [`Engine::commit`]. `None` removes.
#[derive(Debug, Default)]
pub struct EngineBatch {
    pub data: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    pub sessions: BTreeMap<u64, Option<Vec<u8>>>,
    pub meta: EngineMeta,
}

/// A handle on the engine; clones share the same database (the apply thread writes, other
/// threads may read consistent views).
#[derive(Clone)]
pub struct Engine {
    db: Database,
    data: Keyspace,
    sessions: Keyspace,
    meta: Keyspace,
    /// Named in every error.
    path: PathBuf,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Engine({})", self.path.display())
    }
}

fn checksum(key: &[u8], value: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&(key.len() as u64).to_le_bytes());
    hasher.update(key);
    hasher.update(value);
    hasher.finalize()
}

fn seal(key: &[u8], value: &[u8]) -> Vec<u8> {
    let mut row = Vec::with_capacity(CHECKSUM_BYTES + value.len());
    row.extend_from_slice(&checksum(key, value).to_le_bytes());
    row.extend_from_slice(value);
    row
}

fn u64_value(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(bytes.try_into().ok()?))
}

impl Engine {
    /// Opens the engine in directory `path`, creating it when missing, with a block cache of
    /// `cache_bytes`. After a crash fjall recovers its journal up to the last whole batch.
    pub fn open(path: &Path, cache_bytes: u64) -> Result<Engine, EngineError> {
        let error = |e: fjall::Error| EngineError(format!("engine {}: {e}", path.display()));
        let db = Database::builder(path)
            .cache_size(cache_bytes)
            .manual_journal_persist(true)
            .max_journaling_size(MAX_JOURNAL_BYTES)
            .worker_threads(WORKER_THREADS)
            .open()
            .map_err(error)?;
        let options = || KeyspaceCreateOptions::default().max_memtable_size(MAX_MEMTABLE_BYTES);
        let data = db.keyspace("data", options).map_err(error)?;
        let sessions = db.keyspace("sessions", options).map_err(error)?;
        let meta = db.keyspace("meta", options).map_err(error)?;
        Ok(Engine {
            db,
            data,
            sessions,
            meta,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn error(&self, what: impl std::fmt::Display) -> EngineError {
        EngineError(format!("engine {}: {what}", self.path.display()))
    }

    /// The metadata of the last commit.
    pub fn meta(&self) -> Result<EngineMeta, EngineError> {
        self.view().meta()
    }

    /// The value of `key`, its checksum verified.
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, EngineError> {
        if key.len() > MAX_KEY_BYTES {
            return Ok(None);
        }
        let row = self.data.get(data_key(key)).map_err(|e| self.error(e))?;
        match row {
            None => Ok(None),
            Some(row) => self.unseal(key, &row, || key_name(key)).map(Some),
        }
    }

    /// Every stored session, checksums verified (bounded by `max_sessions`).
    pub fn sessions(&self) -> Result<Vec<(u64, Vec<u8>)>, EngineError> {
        self.view().sessions()
    }

    fn unseal(
        &self,
        key: &[u8],
        row: &[u8],
        what: impl Fn() -> String,
    ) -> Result<Vec<u8>, EngineError> {
        self.checked(key, row, what).map(<[u8]>::to_vec)
    }

    /// The value in `row`, its checksum verified, without a copy.
    fn checked<'r>(
        &self,
        key: &[u8],
        row: &'r [u8],
        what: impl Fn() -> String,
    ) -> Result<&'r [u8], EngineError> {
        if row.len() < CHECKSUM_BYTES {
            return Err(self.error(format!(
                "{}: row of {} bytes is too short",
                what(),
                row.len()
            )));
        }
        let (stored, value) = row.split_at(CHECKSUM_BYTES);
        let stored = u32::from_le_bytes(stored.try_into().expect("4 bytes"));
        let computed = checksum(key, value);
        if stored != computed {
            return Err(self.error(format!(
                "{}: checksum mismatch (stored {stored:#010x}, computed {computed:#010x}); the engine's files are damaged",
                what()
            )));
        }
        Ok(value)
    }

    /// Writes `batch` atomically (one journal record). With `durable`, it and every commit
    /// before it are on disk when this returns (fsync); otherwise a crash may lose it (see the
    /// module documentation).
    pub fn commit(&self, batch: &EngineBatch, durable: bool) -> Result<(), EngineError> {
        let mut write = self.db.batch().durability(None);
        for (key, value) in &batch.data {
            match value {
                Some(value) => write.insert(&self.data, data_key(key), seal(key, value)),
                None => write.remove(&self.data, data_key(key)),
            }
        }
        for (id, session) in &batch.sessions {
            let id_bytes = id.to_be_bytes();
            match session {
                Some(session) => write.insert(&self.sessions, id_bytes, seal(&id_bytes, session)),
                None => write.remove(&self.sessions, id_bytes),
            }
        }
        write.insert(
            &self.meta,
            APPLIED_INDEX,
            batch.meta.applied_index.to_le_bytes(),
        );
        write.insert(&self.meta, CLOCK_MS, batch.meta.clock_ms.to_le_bytes());
        write.commit().map_err(|e| self.error(e))?;
        if durable {
            self.checkpoint()?;
        }
        Ok(())
    }

    /// Bulk-loads keys and values into an engine that holds no data yet, straight into table
    /// files (fjall's ingestion: no journal, no memtable, nothing for compaction to rewrite),
    /// for a snapshot being received. `batches` yields rows in strictly increasing key order
    /// across all batches, then `None`: the load is finished, its tables fsynced and
    /// registered, and `Ok(true)` returned. When `batches` ends without `None` the load was
    /// abandoned: nothing is registered (the caller discards the engine) and `Ok(false)` is
    /// returned. Rows out of order are an error (checked here too: fjall would panic).
    /// Memory: one batch, and the table being written (its blocks go to disk as they fill).
    pub fn ingest_data(
        &self,
        batches: impl Iterator<Item = Option<Rows>>,
    ) -> Result<bool, EngineError> {
        let mut ingestion = self.data.start_ingestion().map_err(|e| self.error(e))?;
        let mut stored = Vec::new();
        let mut last: Option<Vec<u8>> = None;
        for batch in batches {
            let Some(rows) = batch else {
                ingestion.finish().map_err(|e| self.error(e))?;
                return Ok(true);
            };
            for (key, value) in rows {
                if key.len() > MAX_KEY_BYTES {
                    return Err(self.error(format!("ingesting a key of {} bytes", key.len())));
                }
                stored.clear();
                stored.extend_from_slice(DATA_KEY_PREFIX);
                stored.extend_from_slice(&key);
                if last
                    .as_deref()
                    .is_some_and(|last| last >= stored.as_slice())
                {
                    return Err(self.error(format!("ingesting {} out of order", key_name(&key))));
                }
                let row = seal(&key, &value);
                ingestion
                    .write(stored.as_slice(), row)
                    .map_err(|e| self.error(e))?;
                last.get_or_insert_with(Vec::new).clone_from(&stored);
            }
        }
        Ok(false)
    }

    /// Makes every commit so far durable (the journal written and fsynced).
    pub fn checkpoint(&self) -> Result<(), EngineError> {
        self.db
            .persist(PersistMode::SyncAll)
            .map_err(|e| self.error(e))
    }

    /// Writes the memtables out to table files and waits (the engine does it by itself as
    /// they fill; tests use it to put data where a damaged block can be found).
    pub fn flush(&self) -> Result<(), EngineError> {
        for keyspace in [&self.data, &self.sessions, &self.meta] {
            keyspace
                .rotate_memtable_and_wait()
                .map_err(|e| self.error(e))?;
        }
        Ok(())
    }

    /// A consistent read-only view of the last commit; later commits do not change it.
    pub fn view(&self) -> EngineView {
        EngineView {
            engine: self.clone(),
            snapshot: self.db.snapshot(),
        }
    }
}

fn key_name(key: &[u8]) -> String {
    format!("key {:?}", String::from_utf8_lossy(key))
}

/// A point-in-time view of the engine (an MVCC snapshot across its keyspaces).
pub struct EngineView {
    engine: Engine,
    snapshot: fjall::Snapshot,
}

impl EngineView {
    pub fn meta(&self) -> Result<EngineMeta, EngineError> {
        let engine = &self.engine;
        let read = |name: &[u8]| -> Result<u64, EngineError> {
            match self
                .snapshot
                .get(&engine.meta, name)
                .map_err(|e| engine.error(e))?
            {
                None => Ok(0),
                Some(bytes) => u64_value(&bytes).ok_or_else(|| {
                    engine.error(format!(
                        "meta {:?} holds {} bytes, not 8",
                        String::from_utf8_lossy(name),
                        bytes.len()
                    ))
                }),
            }
        };
        Ok(EngineMeta {
            applied_index: read(APPLIED_INDEX)?,
            clock_ms: read(CLOCK_MS)?,
        })
    }

    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, EngineError> {
        if key.len() > MAX_KEY_BYTES {
            return Ok(None);
        }
        let engine = &self.engine;
        match self
            .snapshot
            .get(&engine.data, data_key(key))
            .map_err(|e| engine.error(e))?
        {
            None => Ok(None),
            Some(row) => engine.unseal(key, &row, || key_name(key)).map(Some),
        }
    }

    /// Every session of the view, checksums verified.
    pub fn sessions(&self) -> Result<Vec<(u64, Vec<u8>)>, EngineError> {
        let engine = &self.engine;
        let mut out = Vec::new();
        for guard in self.snapshot.iter(&engine.sessions) {
            let (id, row) = guard.into_inner().map_err(|e| engine.error(e))?;
            let id_bytes: [u8; 8] = id
                .as_ref()
                .try_into()
                .map_err(|_| engine.error(format!("a session id of {} bytes", id.len())))?;
            let id = u64::from_be_bytes(id_bytes);
            out.push((
                id,
                engine.unseal(&id_bytes, &row, || format!("session of client {id}"))?,
            ));
        }
        Ok(out)
    }

    /// Calls `each` with up to `limit` keys after `after` (from the first key when `None`), in
    /// key order, checksums verified; returns how many it visited. Bounded work per call, so a
    /// caller can stream a view in chunks.
    pub fn scan(
        &self,
        after: Option<&[u8]>,
        limit: usize,
        mut each: impl FnMut(&[u8], &[u8]),
    ) -> Result<usize, EngineError> {
        let mut visited = 0;
        self.scan_while(after, |key, value| {
            if visited == limit {
                return false;
            }
            each(key, value);
            visited += 1;
            true
        })?;
        Ok(visited)
    }

    /// Calls `each` with the keys after `after` (from the first key when `None`), in key
    /// order, checksums verified, until it returns `false` (that key is then not consumed:
    /// the caller resumes after the last key it kept) or the view ends.
    pub fn scan_while(
        &self,
        after: Option<&[u8]>,
        mut each: impl FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), EngineError> {
        let engine = &self.engine;
        let lower = match after {
            Some(after) => std::ops::Bound::Excluded(data_key(after)),
            None => std::ops::Bound::Unbounded,
        };
        let range = self
            .snapshot
            .range::<Vec<u8>, _>(&engine.data, (lower, std::ops::Bound::Unbounded));
        for guard in range {
            let (stored, row) = guard.into_inner().map_err(|e| engine.error(e))?;
            let key = stored.strip_prefix(DATA_KEY_PREFIX).ok_or_else(|| {
                engine.error(format!("a stored {} without its prefix", key_name(&stored)))
            })?;
            let value = engine.checked(key, &row, || key_name(key))?;
            if !each(key, value) {
                break;
            }
        }
        Ok(())
    }
}

// ------------------------------------------------------------- replacing the engine

/// Where a replacement engine is built before it is swapped in.
pub fn incoming_dir(live: &Path) -> PathBuf {
    live.with_extension("incoming")
}

/// Where the live engine is moved during a swap.
fn old_dir(live: &Path) -> PathBuf {
    live.with_extension("old")
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

fn parent(path: &Path) -> &Path {
    path.parent().unwrap_or(Path::new("."))
}

/// Swaps the complete, checkpointed engine in `incoming` for the one in `live`: rename live
/// to `.old`, rename incoming to live, fsync the directory, remove `.old`. Neither engine may
/// be open. A crash at any step leaves either the old engine or the new one at `live` after
/// [`recover_dirs`] (the node's snapshot file, saved before the swap starts, then brings a
/// stale old engine up to date).
pub fn swap_in(live: &Path, incoming: &Path) -> std::io::Result<()> {
    let old = old_dir(live);
    if old.exists() {
        std::fs::remove_dir_all(&old)?;
    }
    if live.exists() {
        std::fs::rename(live, &old)?;
    }
    std::fs::rename(incoming, live)?;
    sync_dir(parent(live))?;
    if old.exists() {
        std::fs::remove_dir_all(&old)?;
    }
    Ok(())
}

/// Puts the engine directories back in order after a crash: a swap cut between its two
/// renames gets its old engine back (the caller then rebuilds it from the snapshot file if it
/// is behind); a half-built incoming engine and a leftover old one are removed.
pub fn recover_dirs(live: &Path) -> std::io::Result<()> {
    let old = old_dir(live);
    if !live.exists() && old.exists() {
        std::fs::rename(&old, live)?;
        sync_dir(parent(live))?;
    }
    for leftover in [old, incoming_dir(live)] {
        if leftover.exists() {
            std::fs::remove_dir_all(&leftover)?;
        }
    }
    Ok(())
}
