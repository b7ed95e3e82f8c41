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
//! in [`incoming_dir`](super::engine::incoming_dir) of the live engine: the keys, which arrive
//! in key order, are bulk-loaded into its table files by a thread of its own
//! ([`Engine::ingest_data`]; registered only once the stream is complete), the sessions
//! committed as batches. The incoming engine's applied index stays 0 until the end record has
//! been checked; only then
//! ([`SnapshotBuilder::finish`]) are the applied index and clock written and the engine made
//! durable (checkpoint) and closed. [`VerifiedSnapshot::swap_in`] then replaces the live
//! engine by rename and directory fsync ([`swap_in`](super::engine::swap_in)); the live
//! engine must be closed by then. A crash before the swap leaves the old engine and a
//! half-built incoming directory, which [`recover_dirs`](super::engine::recover_dirs) removes
//! at the next start: an interrupted transfer restarts from the beginning.
//!
//! # The stream format (versions 1 and 2)
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
//! 4 raw_len packed_len packed                   version 2 only: a block, the records of
//!                                               `raw_len` bytes (keys, sessions, the end;
//!                                               never a header or another block) compressed
//!                                               with LZ4 (block format)
//! ```
//!
//! A reader with [`ChunkCodec::Lz4`] writes version 2 and packs each chunk's records after the
//! header into one block (a chunk that does not shrink stays as it is). The header itself is
//! never packed, so a build that reads only version 1 refuses such a stream at its first
//! bytes with `version 2 (this build reads 1)` instead of misreading it. The checksum and the
//! counts are of the records themselves, blocks unpacked: the end record vouches for what
//! was decompressed, not only for what was sent. [`ChunkCodec::None`] writes version 1,
//! byte for byte what builds before version 2 wrote (backups use it).
//!
//! The stream carries the state only. What a transport or a file adds around it (the term,
//! the cluster membership, a creation time) is the caller's header, kept apart so either can
//! change without the other.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use super::engine::{self, Engine, EngineBatch, EngineError, EngineMeta, EngineView, Rows};

/// The chunk size callers use when they have no reason to choose another: large enough that
/// per-chunk costs (a batch commit, a network frame) are small, small enough to be nothing
/// next to the engine's caches.
pub const DEFAULT_CHUNK_BYTES: usize = 1 << 20;

/// The largest chunk [`SnapshotBuilder`] accepts: bounds the memory a damaged or hostile
/// length prefix can make it allocate. Readers keep `chunk_bytes` well below it.
pub const MAX_CHUNK_BYTES: usize = 64 << 20;

const MAGIC: &[u8] = b"KVSTREAM";
/// Records only.
const VERSION_PLAIN: u8 = 1;
/// Records and compressed blocks of records.
const VERSION_BLOCKS: u8 = 2;

const TAG_HEADER: u8 = 0;
const TAG_KEY: u8 = 1;
const TAG_SESSION: u8 = 2;
const TAG_END: u8 = 3;
const TAG_BLOCK: u8 = 4;

/// How a [`SnapshotReader`] encodes its chunks (see the module documentation).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ChunkCodec {
    /// Version 1: the records as they are.
    #[default]
    None,
    /// Version 2: each chunk's records LZ4-compressed into one block. LZ4 because it
    /// compresses and decompresses at several hundred MB/s per core: on a busy leader the
    /// stream's bytes, not the codec's CPU, should set the transfer's pace.
    Lz4,
}

impl ChunkCodec {
    /// The codec named `name` (`lz4` or `none`), as the configuration spells it.
    pub fn from_name(name: &str) -> Option<ChunkCodec> {
        match name {
            "lz4" => Some(ChunkCodec::Lz4),
            "none" => Some(ChunkCodec::None),
            _ => None,
        }
    }
}

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
/// documentation). Memory: one chunk (two with a codec: the records and their block), plus
/// the sessions (bounded by `max_sessions`).
pub struct SnapshotReader {
    view: EngineView,
    meta: EngineMeta,
    chunk_bytes: usize,
    codec: ChunkCodec,
    /// The compressor's output, kept from chunk to chunk.
    packed: Vec<u8>,
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
            codec: ChunkCodec::None,
            packed: Vec::new(),
            stage: Stage::Header,
            last_key: None,
            hasher: crc32fast::Hasher::new(),
            summary: StreamSummary {
                meta,
                ..StreamSummary::default()
            },
        })
    }

    /// Encodes the chunks with `codec` (before the first chunk is read).
    pub fn with_codec(mut self, codec: ChunkCodec) -> SnapshotReader {
        assert!(
            matches!(self.stage, Stage::Header),
            "the codec is chosen before the first chunk"
        );
        self.codec = codec;
        self
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
        // The header is never packed (see the module documentation).
        let mut header_bytes = 0;
        // Whether the end record's stage has hashed and counted the chunk already.
        let mut ended = false;
        while chunk.len() < self.chunk_bytes {
            match &mut self.stage {
                Stage::Header => {
                    chunk.push(TAG_HEADER);
                    chunk.extend_from_slice(MAGIC);
                    chunk.push(match self.codec {
                        ChunkCodec::None => VERSION_PLAIN,
                        ChunkCodec::Lz4 => VERSION_BLOCKS,
                    });
                    header_bytes = chunk.len();
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
                    ended = true;
                    break;
                }
                Stage::Done => break,
            }
        }
        if chunk.is_empty() {
            return Ok(None);
        }
        if !ended {
            self.hasher.update(&chunk);
            self.summary.bytes += chunk.len() as u64;
        }
        Ok(Some(self.encode(chunk, header_bytes)))
    }

    /// The chunk as the codec sends it: with LZ4, the records after the first
    /// `header_bytes` packed into one block, unless that does not make it smaller.
    fn encode(&mut self, chunk: Vec<u8>, header_bytes: usize) -> Vec<u8> {
        let records = &chunk[header_bytes..];
        if self.codec == ChunkCodec::None || records.is_empty() {
            return chunk;
        }
        self.packed
            .resize(lz4_flex::block::get_maximum_output_size(records.len()), 0);
        let packed_len = lz4_flex::block::compress_into(records, &mut self.packed)
            .expect("the output holds the maximum compressed size");
        // Tag and two varints of at most 10 bytes each.
        let mut out = Vec::with_capacity(header_bytes + 21 + packed_len);
        out.extend_from_slice(&chunk[..header_bytes]);
        out.push(TAG_BLOCK);
        put_varint(&mut out, records.len() as u64);
        put_varint(&mut out, packed_len as u64);
        out.extend_from_slice(&self.packed[..packed_len]);
        if out.len() >= chunk.len() {
            return chunk;
        }
        out
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
    Header {
        version: u8,
    },
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
    Block {
        raw_len: u64,
        packed: &'a [u8],
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
                if !(VERSION_PLAIN..=VERSION_BLOCKS).contains(&version) {
                    return Err(StreamError(format!(
                        "snapshot stream: version {version} (this build reads {VERSION_PLAIN} and {VERSION_BLOCKS})"
                    )));
                }
                Ok(Record::Header { version })
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
            TAG_BLOCK => {
                let raw_len = self.varint("a block's length")?;
                let packed = self.bytes("a block")?;
                Ok(Record::Block { raw_len, packed })
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
/// documentation). Memory: one chunk, its records unpacked, and one engine batch of them.
pub struct SnapshotBuilder {
    engine: Engine,
    /// Writes the keys into `engine`'s table files, on a thread of its own.
    ingest: Ingest,
    live: PathBuf,
    incoming: PathBuf,
    hasher: crc32fast::Hasher,
    /// The header's version, once read.
    version: Option<u8>,
    /// A decompressed block, kept from block to block.
    unpacked: Vec<u8>,
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
        let ingest = Ingest::start(&engine)?;
        Ok(SnapshotBuilder {
            engine,
            ingest,
            live: live.to_path_buf(),
            incoming,
            hasher: crc32fast::Hasher::new(),
            version: None,
            unpacked: Vec::new(),
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
        let mut records = Records::default();
        self.take_records(chunk, &mut records, false)?;
        if !records.keys.is_empty() {
            self.ingest.send(records.keys)?;
        }
        // Applied index 0 until the end: a half-built engine never passes for a state.
        if !records.sessions.sessions.is_empty() {
            self.engine.commit(&records.sessions, false)?;
        }
        Ok(())
    }

    /// Checks the records of `bytes` and adds them to `batch`; unpacks a block into its
    /// records (`in_block`: these are a block's, which may not hold another). Every record
    /// but the end is hashed and counted, blocks as their records.
    fn take_records(
        &mut self,
        bytes: &[u8],
        records: &mut Records,
        in_block: bool,
    ) -> Result<(), StreamError> {
        let mut parser = Parser::new(bytes);
        // Where the bytes not yet hashed start: a block or the end record hashes the records
        // before it (and the end record is itself never hashed).
        let mut unhashed = 0;
        while !parser.is_empty() {
            if self.end.is_some() {
                return Err(self.error("bytes after the end record"));
            }
            let start = parser.pos;
            let record = parser.record().map_err(|e| self.error(e))?;
            if self.version.is_none() && !matches!(record, Record::Header { .. }) {
                return Err(self.error("the stream does not start with its header"));
            }
            match record {
                Record::Header { .. } if self.version.is_some() => {
                    return Err(self.error("a second header"));
                }
                Record::Header { version } => self.version = Some(version),
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
                    let last = self.last_key.get_or_insert_with(Vec::new);
                    last.clear();
                    last.extend_from_slice(key);
                    records.keys.push((key.to_vec(), value.to_vec()));
                    self.keys += 1;
                }
                Record::Session { id, session } => {
                    if self.last_session.is_some_and(|last| last >= id) {
                        return Err(self.error(format!("session of client {id} is out of order")));
                    }
                    self.last_session = Some(id);
                    records.sessions.sessions.insert(id, Some(session.to_vec()));
                    self.sessions += 1;
                }
                Record::Block { raw_len, packed } => {
                    self.hash(&bytes[unhashed..start]);
                    unhashed = parser.pos;
                    let unpacked = self.unpack(raw_len, packed, in_block)?;
                    let taken = self.take_records(&unpacked, records, true);
                    // The buffer is kept for the next block.
                    self.unpacked = unpacked;
                    taken?;
                }
                Record::End {
                    meta,
                    keys,
                    sessions,
                    checksum,
                } => {
                    self.hash(&bytes[unhashed..start]);
                    unhashed = bytes.len();
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
        self.hash(&bytes[unhashed..]);
        Ok(())
    }

    fn hash(&mut self, records: &[u8]) {
        self.hasher.update(records);
        self.bytes += records.len() as u64;
    }

    /// The records of a block, decompressed into the builder's buffer (taken from it: the
    /// caller puts it back). Bounded: a block unpacks to at most `MAX_CHUNK_BYTES`, and to
    /// exactly the length its record names.
    fn unpack(
        &mut self,
        raw_len: u64,
        packed: &[u8],
        in_block: bool,
    ) -> Result<Vec<u8>, StreamError> {
        if in_block {
            return Err(self.error("a compressed block inside another"));
        }
        if self.version != Some(VERSION_BLOCKS) {
            return Err(self.error(format!(
                "a compressed block in a version {} stream",
                self.version.unwrap_or(0)
            )));
        }
        if raw_len > MAX_CHUNK_BYTES as u64 {
            return Err(self.error(format!(
                "a compressed block of {raw_len} bytes (at most {MAX_CHUNK_BYTES})"
            )));
        }
        let mut records = std::mem::take(&mut self.unpacked);
        records.resize(raw_len as usize, 0);
        match lz4_flex::block::decompress_into(packed, &mut records) {
            Ok(len) if len == records.len() => Ok(records),
            Ok(len) => Err(self.error(format!(
                "a compressed block unpacks to {len} bytes, its record says {raw_len}"
            ))),
            Err(e) => Err(self.error(format!("a compressed block does not unpack: {e}"))),
        }
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
    pub fn finish(mut self) -> Result<VerifiedSnapshot, StreamError> {
        let Some(summary) = self.end else {
            return Err(self.error(format!(
                "the stream ended after {} bytes, without its end record",
                self.bytes
            )));
        };
        if !self.ingest.finish()? {
            return Err(self.error("the engine's bulk load ended early"));
        }
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

/// What one chunk holds, on its way into the incoming engine.
#[derive(Default)]
struct Records {
    /// For the bulk load, in key order.
    keys: Rows,
    /// Committed as a batch (there are at most `max_sessions`).
    sessions: EngineBatch,
}

/// Chunks of keys the bulk load has not taken yet: the builder parses the next chunk while
/// the thread writes the last one, and memory stays at a few chunks.
const INGEST_QUEUE_CHUNKS: usize = 2;

/// The thread that bulk-loads a received stream's keys into the incoming engine
/// ([`Engine::ingest_data`]), so that receiving and checking the next chunk overlaps with
/// writing the last one. Dropped before it finished (the stream was refused or abandoned),
/// it registers nothing and is joined: no thread outlives its builder to touch a directory
/// the next transfer reuses.
struct Ingest {
    rows: Option<crossbeam_channel::Sender<Option<Rows>>>,
    thread: Option<std::thread::JoinHandle<Result<bool, EngineError>>>,
}

impl Ingest {
    fn start(engine: &Engine) -> Result<Ingest, StreamError> {
        let (rows, batches) = crossbeam_channel::bounded(INGEST_QUEUE_CHUNKS);
        let engine = engine.clone();
        let thread = std::thread::Builder::new()
            .name("snapshot-ingest".into())
            .spawn(move || {
                crate::threads::yield_to_clients("snapshot-ingest");
                engine.ingest_data(batches.into_iter())
            })
            .map_err(|e| io_error("starting the snapshot-ingest thread", e))?;
        Ok(Ingest {
            rows: Some(rows),
            thread: Some(thread),
        })
    }

    fn send(&mut self, keys: Rows) -> Result<(), StreamError> {
        let sent = self.rows.as_ref().map(|rows| rows.send(Some(keys)));
        match sent {
            Some(Ok(())) => Ok(()),
            // The thread has stopped: its error says why.
            _ => Err(self.join().err().unwrap_or_else(|| {
                StreamError("snapshot stream: the engine's bulk load stopped".into())
            })),
        }
    }

    /// Ends the load: `Ok(true)` once every key is in fsynced, registered tables.
    fn finish(&mut self) -> Result<bool, StreamError> {
        if let Some(rows) = self.rows.take() {
            // A failed send: the thread stopped, and `join` says why.
            let _ = rows.send(None);
        }
        self.join()
    }

    fn join(&mut self) -> Result<bool, StreamError> {
        self.rows = None;
        match self.thread.take().map(std::thread::JoinHandle::join) {
            Some(Ok(result)) => Ok(result?),
            Some(Err(_)) => Err(StreamError(
                "snapshot stream: the engine's bulk load panicked".into(),
            )),
            None => Ok(false),
        }
    }
}

impl Drop for Ingest {
    fn drop(&mut self) {
        let _ = self.join();
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
        chunks_with(engine, chunk_bytes, ChunkCodec::None)
    }

    fn chunks_with(engine: &Engine, chunk_bytes: usize, codec: ChunkCodec) -> Vec<Vec<u8>> {
        let mut reader = SnapshotReader::new(engine.view(), chunk_bytes)
            .unwrap()
            .with_codec(codec);
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
        header.push(VERSION_PLAIN);
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

    /// Builds `chunks` into a fresh engine and returns what it holds and the summary.
    fn build(chunks: &[Vec<u8>]) -> (Contents, StreamSummary) {
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("engine");
        let mut builder = SnapshotBuilder::new(&live, CACHE_BYTES).unwrap();
        for chunk in chunks {
            builder.push(chunk).unwrap();
        }
        let summary = builder.finish().unwrap().swap_in().unwrap();
        (
            contents(&Engine::open(&live, CACHE_BYTES).unwrap()),
            summary,
        )
    }

    #[test]
    fn compressed_chunks_carry_the_same_stream_in_fewer_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let source = filled(&dir.path().join("source"), 3000);
        let plain = chunks_of(&source, 4096);
        let packed = chunks_with(&source, 4096, ChunkCodec::Lz4);
        assert_eq!(plain.len(), packed.len(), "the same records per chunk");
        // The header is left as it is, with version 2: a build reading only version 1
        // refuses the stream at its first bytes. Every chunk after it is one block.
        assert_eq!(&plain[0][..10], b"\x00KVSTREAM\x01");
        assert_eq!(&packed[0][..10], b"\x00KVSTREAM\x02");
        assert_eq!(packed[0][10], TAG_BLOCK);
        assert!(packed[1..].iter().all(|chunk| chunk[0] == TAG_BLOCK));
        let size = |chunks: &[Vec<u8>]| chunks.iter().map(Vec::len).sum::<usize>();
        assert!(
            size(&packed) * 3 < size(&plain),
            "{} bytes packed, {} plain",
            size(&packed),
            size(&plain)
        );
        let (from_plain, plain_summary) = build(&plain);
        let (from_packed, packed_summary) = build(&packed);
        assert_eq!(from_packed, contents(&source));
        assert_eq!(from_plain, from_packed);
        // The same records (counted unpacked); the checksums differ by the header's version.
        assert_eq!(
            StreamSummary {
                checksum: 0,
                ..plain_summary
            },
            StreamSummary {
                checksum: 0,
                ..packed_summary
            }
        );
        assert_ne!(plain_summary.checksum, packed_summary.checksum);
    }

    #[test]
    fn a_chunk_that_does_not_shrink_is_sent_as_it_is() {
        let dir = tempfile::tempdir().unwrap();
        let source = Engine::open(&dir.path().join("source"), CACHE_BYTES).unwrap();
        let mut batch = EngineBatch::default();
        let mut rng = crate::raft::SplitMix64::new(5);
        for i in 0..400 {
            let value: Vec<u8> = (0..64).flat_map(|_| rng.next_u64().to_le_bytes()).collect();
            batch
                .data
                .insert(format!("k{i:04}").into_bytes(), Some(value));
        }
        source.commit(&batch, true).unwrap();
        let chunks = chunks_with(&source, 4096, ChunkCodec::Lz4);
        assert!(
            chunks[1..chunks.len() - 1]
                .iter()
                .all(|chunk| chunk[0] == TAG_KEY),
            "random values do not shrink: their chunks stay records"
        );
        assert_eq!(build(&chunks).0, contents(&source));
    }

    /// A block record holding `records` (packed), with the length it claims.
    fn block(records: &[u8], raw_len: u64) -> Vec<u8> {
        let packed = lz4_flex::block::compress(records);
        let mut out = vec![TAG_BLOCK];
        put_varint(&mut out, raw_len);
        put_varint(&mut out, packed.len() as u64);
        out.extend_from_slice(&packed);
        out
    }

    #[test]
    fn a_damaged_or_misplaced_block_is_refused_with_one_line() {
        let dir = tempfile::tempdir().unwrap();
        let source = filled(&dir.path().join("source"), 400);
        let packed = chunks_with(&source, 2048, ChunkCodec::Lz4);
        let plain = chunks_of(&source, 2048);
        assert!(packed.len() > 4);

        // Bytes that are no LZ4 at all.
        let mut garbage = packed.clone();
        let at = garbage[2].len() / 2;
        garbage[2].truncate(at);
        let tail = vec![0xffu8; 64];
        let mut chunk = vec![TAG_BLOCK];
        put_varint(&mut chunk, 4096);
        put_varint(&mut chunk, tail.len() as u64);
        chunk.extend_from_slice(&tail);
        garbage[2] = chunk;
        let error = build_error(&garbage);
        assert!(
            error.0.contains("a compressed block does not unpack"),
            "{error}"
        );

        // A block that unpacks to fewer bytes than its record says.
        let mut short = plain.clone();
        short[2] = block(&plain[2], plain[2].len() as u64 + 7);
        short[0][9] = VERSION_BLOCKS;
        let error = build_error(&short);
        assert!(
            error.0.contains("compressed block")
                && (error.0.contains("does not unpack") || error.0.contains("its record says")),
            "{error}"
        );

        // A block claiming more than any chunk may hold: refused before any allocation.
        let mut huge = packed.clone();
        huge[2] = block(&plain[2], MAX_CHUNK_BYTES as u64 + 1);
        let error = build_error(&huge);
        assert!(error.0.contains("at most"), "{error}");

        // A block inside a block.
        let mut nested = packed.clone();
        let inner = block(&plain[2], plain[2].len() as u64);
        nested[2] = block(&inner, inner.len() as u64);
        let error = build_error(&nested);
        assert!(error.0.contains("inside another"), "{error}");

        // A block in a stream whose header says version 1.
        let mut old = packed.clone();
        old[0][9] = VERSION_PLAIN;
        let error = build_error(&old);
        assert!(
            error.0.contains("a compressed block in a version 1 stream"),
            "{error}"
        );

        // A version this build does not know.
        let mut newer = packed.clone();
        newer[0][9] = 3;
        let error = build_error(&newer);
        assert!(
            error.0.contains("version 3 (this build reads 1 and 2)"),
            "{error}"
        );
    }

    /// Random damage to compressed chunks, from a fixed seed: an error naming the stream,
    /// never a panic, a huge allocation, or a state that differs from the source (a change
    /// LZ4 undoes, such as a match offset moved within a run of equal bytes, unpacks to the
    /// same records: then the build is whole and equal).
    #[test]
    fn random_damage_to_compressed_chunks_is_refused_never_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let source = filled(&dir.path().join("source"), 300);
        let packed = chunks_with(&source, 1024, ChunkCodec::Lz4);
        let mut rng = crate::raft::SplitMix64::new(42);
        for round in 0..60 {
            let mut chunks = packed.clone();
            let which = 1 + (rng.next_u64() as usize) % (chunks.len() - 1);
            let chunk = &mut chunks[which];
            for _ in 0..1 + rng.next_u64() % 4 {
                let at = (rng.next_u64() as usize) % chunk.len();
                match rng.next_u64() % 3 {
                    0 => chunk[at] ^= 1 << (rng.next_u64() % 8),
                    1 => chunk[at] = rng.next_u64() as u8,
                    _ => chunk.truncate(at.max(1)),
                }
            }
            let dir = tempfile::tempdir().unwrap();
            let live = dir.path().join("engine");
            let built = (|| {
                let mut builder = SnapshotBuilder::new(&live, CACHE_BYTES)?;
                for chunk in &chunks {
                    builder.push(chunk)?;
                }
                builder.finish()?.swap_in()
            })();
            match built {
                Ok(_) => assert_eq!(
                    contents(&Engine::open(&live, CACHE_BYTES).unwrap()),
                    contents(&source),
                    "round {round}: a damaged stream built another state"
                ),
                Err(error) => assert!(
                    error.0.starts_with("snapshot stream"),
                    "round {round}: {error}"
                ),
            }
        }
    }
}
