//! A point-in-time view of the engine as a stream of bounded chunks, and the builder that
//! turns such a stream back into an engine beside the live one. InstallSnapshot, backups
//! (`clerk snapshot save`) and restores (`kvserver restore`) all move the state this way, so
//! that neither end ever holds more than one chunk of it in memory, whatever the data set.
//!
//! # Reading
//!
//! [`SnapshotReader`] walks an [`EngineView`] (an MVCC snapshot: writes go on meanwhile and
//! do not change it) in key order and yields chunks of about `chunk_bytes` each: a chunk holds
//! whole records, and stops at the first record that takes it to `chunk_bytes` or beyond, so
//! a chunk is at most `chunk_bytes` plus one record (a key of at most
//! [`MAX_KEY_BYTES`](super::engine::MAX_KEY_BYTES) and one value). Use it as an iterator of
//! chunks ([`SnapshotReader::next_chunk`]), with a callback
//! ([`SnapshotReader::for_each_chunk`]), or into any [`Write`]
//! ([`SnapshotReader::write_to`], each chunk framed by its length).
//!
//! # Building
//!
//! [`SnapshotBuilder`] takes the chunks one at a time ([`SnapshotBuilder::push`], or
//! [`SnapshotBuilder::read_from`] for a framed [`Read`]) and writes them into a fresh engine
//! in [`incoming_dir`](super::engine::incoming_dir) of the live engine. The incoming engine's
//! applied index stays 0 until the end record has been checked; only then
//! ([`SnapshotBuilder::finish`]) are the applied index and clock written and the engine made
//! durable (checkpoint) and closed. [`VerifiedSnapshot::swap_in`] then replaces the live
//! engine by rename and directory fsync ([`swap_in`](super::engine::swap_in)); the live
//! engine must be closed by then. A crash before the swap leaves the old engine and a
//! half-built incoming directory, which [`recover_dirs`](super::engine::recover_dirs) removes
//! at the next start: an interrupted transfer restarts from the beginning.
//!
//! # The stream format (version 1)
//!
//! A sequence of records, each starting with a tag byte; integers are LEB128 varints:
//!
//! ```text
//! 0 "KVSTREAM" version:u8                       the header, first record of the stream
//! 1 key_len key value_len value                 a key, in strictly increasing key order
//! 2 client_id session_len session               a client session (the state machine's
//!                                               encoding), in strictly increasing id order,
//!                                               after every key
//! 3 applied_index clock_ms keys sessions crc:u32le   the end: the counts of the records
//!                                               above and the CRC-32 of every byte of the
//!                                               stream before this record
//! ```
//!
//! The stream carries the state only. What a transport or a file adds around it (the term,
//! the cluster membership, a creation time) is the caller's header, kept apart so either can
//! change without the other.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use super::engine::{self, Engine, EngineBatch, EngineError, EngineMeta, EngineView};

/// The chunk size callers use when they have no reason to choose another: large enough that
/// per-chunk costs (a batch commit, a network frame) are small, small enough to be nothing
/// next to the engine's caches.
pub const DEFAULT_CHUNK_BYTES: usize = 1 << 20;

/// The largest chunk [`SnapshotBuilder`] accepts: bounds the memory a damaged or hostile
/// length prefix can make it allocate. Readers keep `chunk_bytes` well below it.
pub const MAX_CHUNK_BYTES: usize = 64 << 20;

const MAGIC: &[u8] = b"KVSTREAM";
const VERSION: u8 = 1;

const TAG_HEADER: u8 = 0;
const TAG_KEY: u8 = 1;
const TAG_SESSION: u8 = 2;
const TAG_END: u8 = 3;

/// A failure while reading or building a snapshot stream: one line saying what is wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamError(pub String);

impl std::fmt::Display for StreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StreamError {}

impl From<EngineError> for StreamError {
    fn from(e: EngineError) -> StreamError {
        StreamError(e.0)
    }
}

fn io_error(what: impl std::fmt::Display, e: std::io::Error) -> StreamError {
    StreamError(format!("snapshot stream: {what}: {e}"))
}

/// What a complete stream held: the engine's metadata, the number of keys, sessions and
/// bytes, and the CRC-32 of the stream before its end record.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamSummary {
    pub meta: EngineMeta,
    pub keys: u64,
    pub sessions: u64,
    /// Every byte of the stream, the end record included.
    pub bytes: u64,
    pub checksum: u32,
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn put_record(out: &mut Vec<u8>, tag: u8, id_or_len: u64, first: &[u8], second: Option<&[u8]>) {
    out.push(tag);
    put_varint(out, id_or_len);
    out.extend_from_slice(first);
    if let Some(second) = second {
        put_varint(out, second.len() as u64);
        out.extend_from_slice(second);
    }
}

// ------------------------------------------------------------------------ reader

enum Stage {
    Header,
    Keys,
    Sessions(std::vec::IntoIter<(u64, Vec<u8>)>),
    End,
    Done,
}

/// Reads a consistent view of an engine as a stream of bounded chunks (see the module
/// documentation). Memory: one chunk, plus the sessions (bounded by `max_sessions`).
pub struct SnapshotReader {
    view: EngineView,
    meta: EngineMeta,
    chunk_bytes: usize,
    stage: Stage,
    last_key: Option<Vec<u8>>,
    hasher: crc32fast::Hasher,
    summary: StreamSummary,
}

impl SnapshotReader {
    /// A reader of `view` yielding chunks of about `chunk_bytes` (at least 1).
    pub fn new(view: EngineView, chunk_bytes: usize) -> Result<SnapshotReader, StreamError> {
        assert!(chunk_bytes > 0, "a chunk of 0 bytes");
        let meta = view.meta()?;
        Ok(SnapshotReader {
            view,
            meta,
            chunk_bytes,
            stage: Stage::Header,
            last_key: None,
            hasher: crc32fast::Hasher::new(),
            summary: StreamSummary {
                meta,
                ..StreamSummary::default()
            },
        })
    }

    /// The applied index and clock of the view being read.
    pub fn meta(&self) -> EngineMeta {
        self.meta
    }

    /// Whether the end record has been returned (the chunk returned last was the last).
    pub fn is_finished(&self) -> bool {
        matches!(self.stage, Stage::Done)
    }

    /// What the chunks returned so far held (complete once `next_chunk` returned `None`).
    pub fn summary(&self) -> StreamSummary {
        self.summary
    }

    /// The next chunk, or `None` once the end record has been returned.
    pub fn next_chunk(&mut self) -> Result<Option<Vec<u8>>, StreamError> {
        let mut chunk = Vec::new();
        while chunk.len() < self.chunk_bytes {
            match &mut self.stage {
                Stage::Header => {
                    chunk.push(TAG_HEADER);
                    chunk.extend_from_slice(MAGIC);
                    chunk.push(VERSION);
                    self.stage = Stage::Keys;
                }
                Stage::Keys => {
                    let (limit, mut last_start, mut keys) = (self.chunk_bytes, None, 0);
                    let mut done = true;
                    self.view
                        .scan_while(self.last_key.as_deref(), |key, value| {
                            if chunk.len() >= limit {
                                done = false;
                                return false;
                            }
                            last_start = Some(chunk.len());
                            put_record(&mut chunk, TAG_KEY, key.len() as u64, key, Some(value));
                            keys += 1;
                            true
                        })?;
                    self.summary.keys += keys;
                    if let Some(start) = last_start {
                        // Parsed back rather than copied per key: the scan allocates nothing
                        // per key.
                        self.last_key = Some(key_of_record(&chunk[start..]));
                    }
                    if done {
                        self.stage = Stage::Sessions(self.view.sessions()?.into_iter());
                    }
                }
                Stage::Sessions(sessions) => match sessions.next() {
                    Some((id, session)) => {
                        chunk.push(TAG_SESSION);
                        put_varint(&mut chunk, id);
                        put_varint(&mut chunk, session.len() as u64);
                        chunk.extend_from_slice(&session);
                        self.summary.sessions += 1;
                    }
                    None => self.stage = Stage::End,
                },
                Stage::End => {
                    self.hasher.update(&chunk);
                    self.summary.bytes += chunk.len() as u64;
                    self.summary.checksum = self.hasher.clone().finalize();
                    let end_start = chunk.len();
                    chunk.push(TAG_END);
                    put_varint(&mut chunk, self.meta.applied_index);
                    put_varint(&mut chunk, self.meta.clock_ms);
                    put_varint(&mut chunk, self.summary.keys);
                    put_varint(&mut chunk, self.summary.sessions);
                    chunk.extend_from_slice(&self.summary.checksum.to_le_bytes());
                    self.summary.bytes += (chunk.len() - end_start) as u64;
                    self.stage = Stage::Done;
                    return Ok(Some(chunk));
                }
                Stage::Done => break,
            }
        }
        if chunk.is_empty() {
            return Ok(None);
        }
        self.hasher.update(&chunk);
        self.summary.bytes += chunk.len() as u64;
        Ok(Some(chunk))
    }

    /// Calls `each` with every chunk in order; stops at the first error (of the view or of
    /// `each`). Returns what the stream held.
    pub fn for_each_chunk(
        mut self,
        mut each: impl FnMut(&[u8]) -> Result<(), StreamError>,
    ) -> Result<StreamSummary, StreamError> {
        while let Some(chunk) = self.next_chunk()? {
            each(&chunk)?;
        }
        Ok(self.summary)
    }

    /// Writes every chunk to `out`, each after its length (u32 little-endian): the framing
    /// [`SnapshotBuilder::read_from`] reads. Does not flush or sync `out`.
    pub fn write_to(self, out: &mut dyn Write) -> Result<StreamSummary, StreamError> {
        self.for_each_chunk(|chunk| {
            let len = u32::try_from(chunk.len()).expect("a chunk is far below 4 GiB");
            out.write_all(&len.to_le_bytes())
                .and_then(|()| out.write_all(chunk))
                .map_err(|e| io_error("writing a chunk", e))
        })
    }
}

/// The key of the key record at the start of `record` (one the reader has just written).
fn key_of_record(record: &[u8]) -> Vec<u8> {
    match Parser::new(record).record() {
        Ok(Record::Key { key, .. }) => key.to_vec(),
        _ => unreachable!("the reader's own key record parses"),
    }
}

// ------------------------------------------------------------------------ parser

enum Record<'a> {
    Header,
    Key {
        key: &'a [u8],
        value: &'a [u8],
    },
    Session {
        id: u64,
        session: &'a [u8],
    },
    End {
        meta: EngineMeta,
        keys: u64,
        sessions: u64,
        checksum: u32,
    },
}

/// Reads whole records out of one chunk; every length is checked against what is left, so a
/// damaged chunk gives an error, never a panic or a large allocation.
struct Parser<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Parser<'a> {
    fn new(bytes: &'a [u8]) -> Parser<'a> {
        Parser { bytes, pos: 0 }
    }

    fn is_empty(&self) -> bool {
        self.pos == self.bytes.len()
    }

    fn truncated(&self, what: &str) -> StreamError {
        StreamError(format!(
            "snapshot stream: a chunk ends inside {what} (at byte {} of {})",
            self.pos,
            self.bytes.len()
        ))
    }

    fn take(&mut self, len: u64, what: &str) -> Result<&'a [u8], StreamError> {
        let left = (self.bytes.len() - self.pos) as u64;
        if len > left {
            return Err(self.truncated(what));
        }
        let taken = &self.bytes[self.pos..self.pos + len as usize];
        self.pos += len as usize;
        Ok(taken)
    }

    fn varint(&mut self, what: &str) -> Result<u64, StreamError> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.take(1, what)?[0];
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(StreamError(format!(
            "snapshot stream: {what} is not a valid varint"
        )))
    }

    fn bytes(&mut self, what: &str) -> Result<&'a [u8], StreamError> {
        let len = self.varint(what)?;
        self.take(len, what)
    }

    /// The record at the current position; `pos` is then past it.
    fn record(&mut self) -> Result<Record<'a>, StreamError> {
        let tag = self.take(1, "a record tag")?[0];
        match tag {
            TAG_HEADER => {
                if self.take(MAGIC.len() as u64, "the header")? != MAGIC {
                    return Err(StreamError(
                        "snapshot stream: bad magic, not a key-value snapshot stream".into(),
                    ));
                }
                let version = self.take(1, "the header")?[0];
                if version != VERSION {
                    return Err(StreamError(format!(
                        "snapshot stream: version {version} (this build reads {VERSION})"
                    )));
                }
                Ok(Record::Header)
            }
            TAG_KEY => {
                let key = self.bytes("a key")?;
                let value = self.bytes("a value")?;
                Ok(Record::Key { key, value })
            }
            TAG_SESSION => {
                let id = self.varint("a session id")?;
                let session = self.bytes("a session")?;
                Ok(Record::Session { id, session })
            }
            TAG_END => {
                let applied_index = self.varint("the applied index")?;
                let clock_ms = self.varint("the clock")?;
                let keys = self.varint("the key count")?;
                let sessions = self.varint("the session count")?;
                let crc = self.take(4, "the checksum")?;
                Ok(Record::End {
                    meta: EngineMeta {
                        applied_index,
                        clock_ms,
                    },
                    keys,
                    sessions,
                    checksum: u32::from_le_bytes(crc.try_into().expect("4 bytes")),
                })
            }
            other => Err(StreamError(format!(
                "snapshot stream: unknown record tag {other} at byte {} of a chunk",
                self.pos - 1
            ))),
        }
    }
}

// ------------------------------------------------------------------------ builder

/// Builds a fresh engine beside the live one from a stream's chunks (see the module
/// documentation). Memory: one chunk and one engine batch of it.
pub struct SnapshotBuilder {
    engine: Engine,
    live: PathBuf,
    incoming: PathBuf,
    hasher: crc32fast::Hasher,
    seen_header: bool,
    last_key: Option<Vec<u8>>,
    last_session: Option<u64>,
    /// Set by the end record, once its counts and checksum matched.
    end: Option<StreamSummary>,
    keys: u64,
    sessions: u64,
    bytes: u64,
}

impl SnapshotBuilder {
    /// Starts building into `incoming_dir(live)`, removing whatever an earlier, interrupted
    /// build left there. The live engine is not touched (it may be open).
    pub fn new(live: &Path, cache_bytes: u64) -> Result<SnapshotBuilder, StreamError> {
        let incoming = engine::incoming_dir(live);
        if incoming.exists() {
            std::fs::remove_dir_all(&incoming)
                .map_err(|e| io_error(format!("removing {}", incoming.display()), e))?;
        }
        let engine = Engine::open(&incoming, cache_bytes)?;
        Ok(SnapshotBuilder {
            engine,
            live: live.to_path_buf(),
            incoming,
            hasher: crc32fast::Hasher::new(),
            seen_header: false,
            last_key: None,
            last_session: None,
            end: None,
            keys: 0,
            sessions: 0,
            bytes: 0,
        })
    }

    fn error(&self, what: impl std::fmt::Display) -> StreamError {
        StreamError(format!(
            "snapshot stream into {}: {what}",
            self.incoming.display()
        ))
    }

    /// Writes the records of `chunk` (whole records, as a [`SnapshotReader`] makes them) into
    /// the incoming engine. Any disorder, damage or record after the end is an error; the
    /// builder is then to be dropped (its directory is removed by the next build or start).
    pub fn push(&mut self, chunk: &[u8]) -> Result<(), StreamError> {
        if chunk.len() > MAX_CHUNK_BYTES {
            return Err(self.error(format!(
                "a chunk of {} bytes (at most {MAX_CHUNK_BYTES})",
                chunk.len()
            )));
        }
        let mut batch = EngineBatch::default();
        let mut parser = Parser::new(chunk);
        while !parser.is_empty() {
            if self.end.is_some() {
                return Err(self.error("bytes after the end record"));
            }
            let start = parser.pos;
            let record = parser.record().map_err(|e| self.error(e))?;
            if !self.seen_header && !matches!(record, Record::Header) {
                return Err(self.error("the stream does not start with its header"));
            }
            match record {
                Record::Header if self.seen_header => {
                    return Err(self.error("a second header"));
                }
                Record::Header => self.seen_header = true,
                Record::Key { key, value } => {
                    if self.last_session.is_some() {
                        return Err(self.error("a key after the sessions"));
                    }
                    if key.len() > engine::MAX_KEY_BYTES {
                        return Err(self.error(format!("a key of {} bytes", key.len())));
                    }
                    if self.last_key.as_deref().is_some_and(|last| last >= key) {
                        return Err(self.error(format!("key {} is out of order", self.keys)));
                    }
                    self.last_key = Some(key.to_vec());
                    batch.data.insert(key.to_vec(), Some(value.to_vec()));
                    self.keys += 1;
                }
                Record::Session { id, session } => {
                    if self.last_session.is_some_and(|last| last >= id) {
                        return Err(self.error(format!("session of client {id} is out of order")));
                    }
                    self.last_session = Some(id);
                    batch.sessions.insert(id, Some(session.to_vec()));
                    self.sessions += 1;
                }
                Record::End {
                    meta,
                    keys,
                    sessions,
                    checksum,
                } => {
                    self.hasher.update(&chunk[..start]);
                    self.bytes += start as u64;
                    let computed = self.hasher.clone().finalize();
                    if computed != checksum {
                        return Err(self.error(format!(
                            "checksum mismatch (sent {checksum:#010x}, computed {computed:#010x})"
                        )));
                    }
                    if (keys, sessions) != (self.keys, self.sessions) {
                        return Err(self.error(format!(
                            "the end record counts {keys} keys and {sessions} sessions, the stream held {} and {}",
                            self.keys, self.sessions
                        )));
                    }
                    self.bytes += (parser.pos - start) as u64;
                    self.end = Some(StreamSummary {
                        meta,
                        keys,
                        sessions,
                        bytes: self.bytes,
                        checksum,
                    });
                }
            }
        }
        if self.end.is_none() {
            self.hasher.update(chunk);
            self.bytes += chunk.len() as u64;
        }
        // Applied index 0 until the end: a half-built engine never passes for a state.
        if !batch.data.is_empty() || !batch.sessions.is_empty() {
            self.engine.commit(&batch, false)?;
        }
        Ok(())
    }

    /// Builds from `input` framed as [`SnapshotReader::write_to`] writes it, then
    /// [`finish`](Self::finish)es.
    pub fn read_from(mut self, input: &mut dyn Read) -> Result<VerifiedSnapshot, StreamError> {
        let mut chunk = Vec::new();
        while self.end.is_none() {
            let mut len = [0u8; 4];
            input
                .read_exact(&mut len)
                .map_err(|e| io_error("reading a chunk length (the stream ends early?)", e))?;
            let len = u32::from_le_bytes(len) as usize;
            if len > MAX_CHUNK_BYTES {
                return Err(self.error(format!(
                    "a chunk of {len} bytes (at most {MAX_CHUNK_BYTES})"
                )));
            }
            chunk.resize(len, 0);
            input
                .read_exact(&mut chunk)
                .map_err(|e| io_error("reading a chunk", e))?;
            self.push(&chunk)?;
        }
        self.finish()
    }

    /// Whether the end record has arrived and checked out.
    pub fn is_complete(&self) -> bool {
        self.end.is_some()
    }

    /// After the end record: writes the applied index and clock, makes the incoming engine
    /// durable (checkpoint) and closes it. An error when the end record is missing.
    pub fn finish(self) -> Result<VerifiedSnapshot, StreamError> {
        let Some(summary) = self.end else {
            return Err(self.error(format!(
                "the stream ended after {} bytes, without its end record",
                self.bytes
            )));
        };
        let batch = EngineBatch {
            meta: summary.meta,
            ..EngineBatch::default()
        };
        self.engine.commit(&batch, true)?;
        drop(self.engine);
        Ok(VerifiedSnapshot {
            live: self.live,
            incoming: self.incoming,
            summary,
        })
    }
}

/// A complete, verified and durable engine in the incoming directory, ready to be swapped in.
#[must_use = "the incoming engine is used only once swapped in"]
pub struct VerifiedSnapshot {
    live: PathBuf,
    incoming: PathBuf,
    summary: StreamSummary,
}

impl VerifiedSnapshot {
    pub fn summary(&self) -> StreamSummary {
        self.summary
    }

    /// Replaces the live engine with the incoming one (rename, directory fsync). The live
    /// engine must be closed: every handle on it dropped.
    pub fn swap_in(self) -> Result<StreamSummary, StreamError> {
        engine::swap_in(&self.live, &self.incoming)
            .map_err(|e| io_error(format!("swapping in {}", self.incoming.display()), e))?;
        Ok(self.summary)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CACHE_BYTES: u64 = 4 << 20;

    /// An engine at `dir` holding `keys` keys with values of varying length, three sessions,
    /// applied index 77 and clock 5000.
    fn filled(dir: &Path, keys: usize) -> Engine {
        let engine = Engine::open(dir, CACHE_BYTES).unwrap();
        let mut batch = EngineBatch {
            meta: EngineMeta {
                applied_index: 77,
                clock_ms: 5000,
            },
            ..EngineBatch::default()
        };
        for i in 0..keys {
            let value = format!("value-{i}-{}", "x".repeat(i % 97)).into_bytes();
            batch
                .data
                .insert(format!("key-{i:06}").into_bytes(), Some(value));
        }
        for id in [3u64, 9, 40] {
            batch
                .sessions
                .insert(id, Some(format!("session-{id}").into_bytes()));
        }
        engine.commit(&batch, true).unwrap();
        engine
    }

    /// Everything an engine holds, read back: meta, keys and sessions.
    type Contents = (EngineMeta, Vec<(Vec<u8>, Vec<u8>)>, Vec<(u64, Vec<u8>)>);

    fn contents(engine: &Engine) -> Contents {
        let view = engine.view();
        let mut keys = Vec::new();
        view.scan_while(None, |k, v| {
            keys.push((k.to_vec(), v.to_vec()));
            true
        })
        .unwrap();
        (view.meta().unwrap(), keys, view.sessions().unwrap())
    }

    fn chunks_of(engine: &Engine, chunk_bytes: usize) -> Vec<Vec<u8>> {
        let mut reader = SnapshotReader::new(engine.view(), chunk_bytes).unwrap();
        let mut chunks = Vec::new();
        while let Some(chunk) = reader.next_chunk().unwrap() {
            chunks.push(chunk);
        }
        chunks
    }

    #[test]
    fn chunks_build_an_equal_engine_that_is_swapped_in() {
        let dir = tempfile::tempdir().unwrap();
        let source = filled(&dir.path().join("source"), 3000);
        let expected = contents(&source);
        let chunk_bytes = 4096;
        let chunks = chunks_of(&source, chunk_bytes);
        assert!(chunks.len() > 20, "{} chunks", chunks.len());
        // Bounded: at most one record (here under 200 bytes) beyond the chunk size.
        let largest = chunks.iter().map(Vec::len).max().unwrap();
        assert!(largest < chunk_bytes + 200, "a chunk of {largest} bytes");

        let live = dir.path().join("engine");
        let old = filled(&live, 10);
        drop(old);
        let mut builder = SnapshotBuilder::new(&live, CACHE_BYTES).unwrap();
        for chunk in &chunks {
            assert!(!builder.is_complete());
            builder.push(chunk).unwrap();
        }
        let verified = builder.finish().unwrap();
        let summary = verified.swap_in().unwrap();
        assert_eq!((summary.keys, summary.sessions), (3000, 3));
        assert_eq!(summary.meta.applied_index, 77);
        assert_eq!(
            summary.bytes,
            chunks.iter().map(|c| c.len() as u64).sum::<u64>()
        );
        assert!(!engine::incoming_dir(&live).exists());
        let rebuilt = Engine::open(&live, CACHE_BYTES).unwrap();
        assert_eq!(contents(&rebuilt), expected);
    }

    #[test]
    fn the_stream_is_the_view_at_the_start_while_writes_go_on() {
        let dir = tempfile::tempdir().unwrap();
        let source = filled(&dir.path().join("source"), 500);
        let expected = contents(&source);
        let mut reader = SnapshotReader::new(source.view(), 512).unwrap();
        let live = dir.path().join("engine");
        let mut builder = SnapshotBuilder::new(&live, CACHE_BYTES).unwrap();
        let mut round = 0u64;
        while let Some(chunk) = reader.next_chunk().unwrap() {
            // A write between chunks: a new key, a changed key, a removed key, new meta.
            round += 1;
            let mut batch = EngineBatch {
                meta: EngineMeta {
                    applied_index: 77 + round,
                    clock_ms: 6000,
                },
                ..EngineBatch::default()
            };
            batch
                .data
                .insert(format!("key-{:06}", round * 3).into_bytes(), None);
            batch
                .data
                .insert(format!("key-{round}-new").into_bytes(), Some(b"n".to_vec()));
            batch.sessions.insert(3, None);
            source.commit(&batch, false).unwrap();
            builder.push(&chunk).unwrap();
        }
        assert!(round > 5);
        builder.finish().unwrap().swap_in().unwrap();
        assert_eq!(
            contents(&Engine::open(&live, CACHE_BYTES).unwrap()),
            expected
        );
    }

    #[test]
    fn framed_write_and_read_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let source = filled(&dir.path().join("source"), 700);
        let mut file = Vec::new();
        let written = SnapshotReader::new(source.view(), 1000)
            .unwrap()
            .write_to(&mut file)
            .unwrap();
        let live = dir.path().join("engine");
        let verified = SnapshotBuilder::new(&live, CACHE_BYTES)
            .unwrap()
            .read_from(&mut file.as_slice())
            .unwrap();
        assert_eq!(verified.summary(), written);
        verified.swap_in().unwrap();
        assert_eq!(
            contents(&Engine::open(&live, CACHE_BYTES).unwrap()),
            contents(&source)
        );
        // A file cut short: an error, not a state.
        let cut = &file[..file.len() - 3];
        let error = SnapshotBuilder::new(&dir.path().join("other"), CACHE_BYTES)
            .unwrap()
            .read_from(&mut &cut[..])
            .err()
            .unwrap();
        assert!(error.0.contains("reading a chunk"), "{error}");
    }

    /// Builds `chunks` beside a live engine holding 10 keys; returns the error, after checking
    /// the live engine was left as it was.
    fn build_error(chunks: &[Vec<u8>]) -> StreamError {
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("engine");
        let before = contents(&filled(&live, 10));
        let result = (|| {
            let mut builder = SnapshotBuilder::new(&live, CACHE_BYTES)?;
            for chunk in chunks {
                builder.push(chunk)?;
            }
            builder.finish()?.swap_in()
        })();
        let error = result.expect_err("a damaged stream is refused");
        engine::recover_dirs(&live).unwrap();
        assert!(!engine::incoming_dir(&live).exists());
        assert_eq!(contents(&Engine::open(&live, CACHE_BYTES).unwrap()), before);
        error
    }

    #[test]
    fn a_flipped_byte_in_a_value_fails_the_checksum() {
        let dir = tempfile::tempdir().unwrap();
        let mut chunks = chunks_of(&filled(&dir.path().join("source"), 400), 2048);
        // The 40th byte from the end of the second chunk lies in a value ("xxx...").
        let chunk = &mut chunks[1];
        let at = chunk.len() - 40;
        assert_eq!(chunk[at], b'x');
        chunk[at] = b'y';
        let error = build_error(&chunks);
        assert!(error.0.contains("checksum mismatch"), "{error}");
    }

    #[test]
    fn a_lost_or_repeated_or_missing_chunk_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let chunks = chunks_of(&filled(&dir.path().join("source"), 400), 2048);
        assert!(chunks.len() > 4);

        let mut lost = chunks.clone();
        lost.remove(2);
        let error = build_error(&lost);
        assert!(error.0.contains("checksum mismatch"), "{error}");

        let mut repeated = chunks.clone();
        repeated.insert(2, chunks[2].clone());
        let error = build_error(&repeated);
        assert!(error.0.contains("out of order"), "{error}");

        let error = build_error(&chunks[..chunks.len() - 1]);
        assert!(error.0.contains("without its end record"), "{error}");

        let error = build_error(&chunks[1..]);
        assert!(
            error.0.contains("does not start with its header"),
            "{error}"
        );

        let mut after_end = chunks.clone();
        after_end.push(chunks[1].clone());
        let error = build_error(&after_end);
        assert!(error.0.contains("after the end record"), "{error}");
    }

    #[test]
    fn garbage_gives_an_error_never_a_panic() {
        let mut header = vec![TAG_HEADER];
        header.extend_from_slice(MAGIC);
        header.push(VERSION);
        for garbage in [
            vec![9u8],
            b"\x00NOTASTRM\x01".to_vec(),
            [header.as_slice(), &[TAG_KEY, 0xff, 0xff, 0xff, 0xff, 0x0f]].concat(),
            [header.as_slice(), &[TAG_KEY, 3, b'a']].concat(),
            [header.as_slice(), &[TAG_END, 1, 2, 3]].concat(),
            [header.as_slice(), &[0xff; 11]].concat(),
        ] {
            let error = build_error(std::slice::from_ref(&garbage));
            assert!(
                error.0.starts_with("snapshot stream"),
                "{garbage:?}: {error}"
            );
        }
    }

    #[test]
    fn an_empty_engine_streams_and_builds() {
        let dir = tempfile::tempdir().unwrap();
        let source = Engine::open(&dir.path().join("source"), CACHE_BYTES).unwrap();
        let chunks = chunks_of(&source, DEFAULT_CHUNK_BYTES);
        assert_eq!(chunks.len(), 1);
        let live = dir.path().join("engine");
        let mut builder = SnapshotBuilder::new(&live, CACHE_BYTES).unwrap();
        builder.push(&chunks[0]).unwrap();
        let summary = builder.finish().unwrap().swap_in().unwrap();
        assert_eq!((summary.keys, summary.sessions), (0, 0));
        assert_eq!(
            contents(&Engine::open(&live, CACHE_BYTES).unwrap()),
            contents(&source)
        );
    }
}
