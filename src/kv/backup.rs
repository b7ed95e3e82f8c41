//! Backup files (`clerk snapshot save`, `clerk snapshot status`, `kvserver restore`): a header
//! saying what the backup holds, the node's snapshot stream ([`super::snapshot_stream`]) as
//! length-prefixed chunks, a trailer, and a CRC-32 of every byte before it. Written and read
//! in bounded pieces: memory never holds the data set, only one chunk.
//!
//! ```text
//! "KVBACKUP" version:u8 header_len:u32le header(JSON)
//! { chunk_len:u32le chunk }*  0:u32le                the snapshot stream, chunk by chunk
//! trailer_len:u32le trailer(JSON)
//! crc32:u32le                                         of every byte before it
//! "KVBEND!!"
//! ```
//!
//! A backup is written to `FILE.partial`, fsynced and renamed to FILE only when complete, so
//! FILE is either a whole backup or absent. Reading one checks everything (magic, version,
//! end marker, checksum, framing) before anything is written; restoring then builds the
//! engine with [`SnapshotBuilder`], which checks the stream's own checksum and counts again.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::engine::ENGINE_DIR_NAME;
use super::snapshot_stream::{SnapshotBuilder, MAX_CHUNK_BYTES};
use crate::raft::{HardState, Membership, Snapshot, SnapshotMeta};
use crate::storage::{DiskStorage, StorageOptions};

const MAGIC: &[u8; 8] = b"KVBACKUP";
const END_MAGIC: &[u8; 8] = b"KVBEND!!";
/// The format this build writes and reads.
pub const BACKUP_VERSION: u8 = 1;
/// A header or trailer longer than this is damage, not data.
const MAX_JSON_BYTES: u32 = 64 * 1024;
/// Magic, version and the header's length.
const PREFIX_BYTES: u64 = 8 + 1 + 4;
/// The CRC and the end magic.
const TAIL_BYTES: u64 = 4 + 8;

/// What a backup is of: written first, so `snapshot status` and `restore` can say it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupHeader {
    pub cluster_id: String,
    /// The node it was read from.
    pub node_id: u64,
    /// The applied index of the state it holds: every entry up to it, nothing after.
    pub index: u64,
    /// The node's term when the view was taken (at least the term of entry `index`).
    pub term: u64,
    /// Wall clock of the machine that saved it, milliseconds since the Unix epoch.
    pub created_at_ms: u64,
}

/// What the stream held, written last.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupTrailer {
    pub keys: u64,
    pub sessions: u64,
    /// Bytes of the snapshot stream (chunks only).
    pub stream_bytes: u64,
    pub chunks: u64,
}

/// A checked backup file: what `clerk snapshot status` prints.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BackupInfo {
    pub path: PathBuf,
    pub version: u8,
    pub file_bytes: u64,
    pub checksum: u32,
    pub header: BackupHeader,
    pub trailer: BackupTrailer,
    /// Where the chunks start in the file.
    #[serde(skip)]
    stream_offset: u64,
}

/// Writes a backup file chunk by chunk (see the module documentation).
pub struct BackupWriter {
    path: PathBuf,
    partial: PathBuf,
    out: BufWriter<File>,
    hasher: crc32fast::Hasher,
    trailer: BackupTrailer,
}

fn io_error(what: &str, path: &Path, e: std::io::Error) -> String {
    format!("{what} {}: {e}", path.display())
}

impl BackupWriter {
    /// Starts `path` (as `path.partial`, replaced if there) with `header`.
    pub fn create(path: &Path, header: &BackupHeader) -> Result<BackupWriter, String> {
        let mut partial = path.as_os_str().to_owned();
        partial.push(".partial");
        let partial = PathBuf::from(partial);
        let file = File::create(&partial).map_err(|e| io_error("cannot create", &partial, e))?;
        let mut writer = BackupWriter {
            path: path.to_path_buf(),
            partial,
            out: BufWriter::new(file),
            hasher: crc32fast::Hasher::new(),
            trailer: BackupTrailer::default(),
        };
        let json = serde_json::to_vec(header).expect("a header serializes");
        writer.write(MAGIC)?;
        writer.write(&[BACKUP_VERSION])?;
        writer.write(&(json.len() as u32).to_le_bytes())?;
        writer.write(&json)?;
        Ok(writer)
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.hasher.update(bytes);
        self.out
            .write_all(bytes)
            .map_err(|e| io_error("cannot write", &self.partial, e))
    }

    /// Appends one chunk of the snapshot stream (never empty).
    pub fn push_chunk(&mut self, chunk: &[u8]) -> Result<(), String> {
        assert!(!chunk.is_empty(), "an empty chunk would end the stream");
        self.write(&(chunk.len() as u32).to_le_bytes())?;
        self.write(chunk)?;
        self.trailer.chunks += 1;
        self.trailer.stream_bytes += chunk.len() as u64;
        Ok(())
    }

    /// Ends the file with the counts the node reported, fsyncs it and renames it into place
    /// (then fsyncs the directory). Returns the trailer written.
    pub fn finish(mut self, keys: u64, sessions: u64) -> Result<BackupTrailer, String> {
        self.trailer.keys = keys;
        self.trailer.sessions = sessions;
        let json = serde_json::to_vec(&self.trailer).expect("a trailer serializes");
        self.write(&0u32.to_le_bytes())?;
        self.write(&(json.len() as u32).to_le_bytes())?;
        self.write(&json)?;
        let crc = self.hasher.clone().finalize();
        self.write(&crc.to_le_bytes())?;
        self.write(END_MAGIC)?;
        let file = self
            .out
            .into_inner()
            .map_err(|e| io_error("cannot write", &self.partial, e.into_error()))?;
        file.sync_all()
            .map_err(|e| io_error("cannot fsync", &self.partial, e))?;
        std::fs::rename(&self.partial, &self.path)
            .map_err(|e| io_error("cannot rename into", &self.path, e))?;
        let dir = match self.path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
            _ => PathBuf::from("."),
        };
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io_error("cannot fsync directory", &dir, e))?;
        Ok(self.trailer)
    }

    /// Gives up: removes the partial file.
    pub fn abandon(self) {
        let _ = std::fs::remove_file(&self.partial);
    }
}

/// Reads `n` bytes as a little-endian u32 at the reader's position.
fn read_u32(input: &mut impl Read, what: &str) -> Result<u32, String> {
    let mut bytes = [0u8; 4];
    input
        .read_exact(&mut bytes)
        .map_err(|e| format!("damaged: cannot read the {what}: {e}"))?;
    Ok(u32::from_le_bytes(bytes))
}

fn read_json<T: serde::de::DeserializeOwned>(
    input: &mut impl Read,
    what: &str,
) -> Result<(T, u64), String> {
    let len = read_u32(input, &format!("{what} length"))?;
    if len > MAX_JSON_BYTES {
        return Err(format!(
            "damaged: a {what} of {len} bytes (at most {MAX_JSON_BYTES})"
        ));
    }
    let mut json = vec![0u8; len as usize];
    input
        .read_exact(&mut json)
        .map_err(|e| format!("truncated: the {what} ends early: {e}"))?;
    let value = serde_json::from_slice(&json).map_err(|e| format!("damaged {what}: {e}"))?;
    Ok((value, 4 + u64::from(len)))
}

/// Checks the whole backup at `path` — magic, version, end marker, checksum, framing — and
/// says what it holds; writes nothing. The error is one line naming the file and what is
/// wrong.
pub fn inspect(path: &Path) -> Result<BackupInfo, String> {
    inspect_file(path).map_err(|why| format!("backup {}: {why}", path.display()))
}

fn inspect_file(path: &Path) -> Result<BackupInfo, String> {
    let mut file = File::open(path).map_err(|e| format!("cannot open: {e}"))?;
    let file_bytes = file
        .metadata()
        .map_err(|e| format!("cannot stat: {e}"))?
        .len();
    let mut prefix = [0u8; 9];
    let got = read_up_to(&mut file, &mut prefix).map_err(|e| format!("cannot read: {e}"))?;
    if got < MAGIC.len() || &prefix[..8] != MAGIC {
        return Err("not a kvstore-raft backup (bad magic)".to_string());
    }
    if got < 9 {
        return Err(format!("truncated: {file_bytes} bytes"));
    }
    let version = prefix[8];
    if version != BACKUP_VERSION {
        return Err(format!(
            "unsupported backup version {version} (this build reads {BACKUP_VERSION})"
        ));
    }
    if file_bytes < PREFIX_BYTES + TAIL_BYTES {
        return Err(format!("truncated: {file_bytes} bytes"));
    }
    let mut tail = [0u8; TAIL_BYTES as usize];
    file.seek(SeekFrom::Start(file_bytes - TAIL_BYTES))
        .and_then(|_| file.read_exact(&mut tail))
        .map_err(|e| format!("cannot read the end: {e}"))?;
    if &tail[4..] != END_MAGIC {
        return Err(format!(
            "truncated: no end marker ({file_bytes} bytes; an interrupted save?)"
        ));
    }
    let stored = u32::from_le_bytes(tail[..4].try_into().expect("4 bytes"));
    file.seek(SeekFrom::Start(0))
        .map_err(|e| format!("cannot read: {e}"))?;
    let covered = file_bytes - TAIL_BYTES;
    let computed = crc_of_prefix(&mut file, covered).map_err(|e| format!("cannot read: {e}"))?;
    if stored != computed {
        return Err(format!(
            "checksum mismatch (stored {stored:#010x}, computed {computed:#010x}): the file is \
             damaged"
        ));
    }
    // The checksum holds: walk the structure (bounded reads, chunks skipped).
    let mut input = BufReader::new(file);
    input
        .seek(SeekFrom::Start(9))
        .map_err(|e| format!("cannot read: {e}"))?;
    let (header, header_bytes): (BackupHeader, u64) = read_json(&mut input, "header")?;
    let stream_offset = 9 + header_bytes;
    let mut at = stream_offset;
    let mut trailer_seen = BackupTrailer::default();
    loop {
        let len = read_u32(&mut input, "chunk length")?;
        at += 4;
        if len == 0 {
            break;
        }
        if len as usize > MAX_CHUNK_BYTES {
            return Err(format!(
                "damaged: a chunk of {len} bytes (at most {MAX_CHUNK_BYTES})"
            ));
        }
        input
            .seek_relative(i64::from(len))
            .map_err(|e| format!("cannot read: {e}"))?;
        at += u64::from(len);
        if at > file_bytes - TAIL_BYTES {
            return Err("damaged: a chunk runs past the end".to_string());
        }
        trailer_seen.chunks += 1;
        trailer_seen.stream_bytes += u64::from(len);
    }
    let (trailer, trailer_bytes): (BackupTrailer, u64) = read_json(&mut input, "trailer")?;
    at += trailer_bytes;
    if at != file_bytes - TAIL_BYTES {
        return Err(format!(
            "damaged: {} unexpected bytes before the checksum",
            (file_bytes - TAIL_BYTES).saturating_sub(at)
        ));
    }
    if (trailer.chunks, trailer.stream_bytes) != (trailer_seen.chunks, trailer_seen.stream_bytes) {
        return Err(format!(
            "damaged: the trailer counts {} chunks of {} bytes, the file holds {} of {}",
            trailer.chunks, trailer.stream_bytes, trailer_seen.chunks, trailer_seen.stream_bytes
        ));
    }
    Ok(BackupInfo {
        path: path.to_path_buf(),
        version,
        file_bytes,
        checksum: stored,
        header,
        trailer,
        stream_offset,
    })
}

/// Reads as much of `buf` as the input holds.
fn read_up_to(input: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match input.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

/// The CRC-32 of the first `len` bytes of `input`, read 64 KiB at a time.
fn crc_of_prefix(input: &mut impl Read, len: u64) -> std::io::Result<u32> {
    let mut hasher = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = len;
    while left > 0 {
        let n = (buf.len() as u64).min(left) as usize;
        input.read_exact(&mut buf[..n])?;
        hasher.update(&buf[..n]);
        left -= n as u64;
    }
    Ok(hasher.finalize())
}

/// What `kvserver restore` did.
#[derive(Clone, Debug)]
pub struct Restored {
    pub info: BackupInfo,
    pub data_dir: PathBuf,
}

/// Seeds the new data directory `data_dir` of a node from the backup at `backup`: its engine
/// holds the backup's state, and its Raft log starts with a snapshot at the backup's index
/// and term, so every node seeded from the same backup starts from the same log position and
/// the cluster goes on from there. The backup is checked in full first; `data_dir` must not
/// exist or be empty; on any failure nothing is left in it (a directory this call created is
/// removed). `cache_bytes`: the engine's block cache while building.
pub fn restore(backup: &Path, data_dir: &Path, cache_bytes: u64) -> Result<Restored, String> {
    let info = inspect(backup)?;
    let existed = data_dir.exists();
    if existed {
        let mut entries = std::fs::read_dir(data_dir)
            .map_err(|e| io_error("cannot read data directory", data_dir, e))?;
        if entries.next().is_some() {
            return Err(format!(
                "data directory {} is not empty: restore seeds a new node's directory only \
                 (move the old one away first)",
                data_dir.display()
            ));
        }
    }
    let result = seed(&info, data_dir, cache_bytes);
    if result.is_err() {
        // Leave nothing behind: the directory (or its contents) as before.
        if existed {
            if let Ok(entries) = std::fs::read_dir(data_dir) {
                for entry in entries.flatten() {
                    let _ = std::fs::remove_dir_all(entry.path())
                        .or_else(|_| std::fs::remove_file(entry.path()));
                }
            }
        } else {
            let _ = std::fs::remove_dir_all(data_dir);
        }
    }
    result.map(|()| Restored {
        info,
        data_dir: data_dir.to_path_buf(),
    })
}

fn seed(info: &BackupInfo, data_dir: &Path, cache_bytes: u64) -> Result<(), String> {
    std::fs::create_dir_all(data_dir)
        .map_err(|e| io_error("cannot create data directory", data_dir, e))?;
    let live = data_dir.join(ENGINE_DIR_NAME);
    let builder = SnapshotBuilder::new(&live, cache_bytes).map_err(|e| e.to_string())?;
    let mut file = File::open(&info.path).map_err(|e| io_error("cannot open", &info.path, e))?;
    file.seek(SeekFrom::Start(info.stream_offset))
        .map_err(|e| io_error("cannot read", &info.path, e))?;
    let mut input = BufReader::new(file);
    let verified = builder
        .read_from(&mut input)
        .map_err(|e| format!("backup {}: {e}", info.path.display()))?;
    let summary = verified.summary();
    if summary.meta.applied_index != info.header.index {
        return Err(format!(
            "backup {}: the header says index {}, the stream holds index {}",
            info.path.display(),
            info.header.index,
            summary.meta.applied_index
        ));
    }
    verified.swap_in().map_err(|e| e.to_string())?;
    // The Raft side: a snapshot at (index, term) whose body is empty (the engine is the
    // state, as after a compaction), and the term in the hard state.
    let (mut storage, _) = DiskStorage::open(data_dir, StorageOptions::default())
        .map_err(|e| format!("data directory {}: {e}", data_dir.display()))?;
    let meta = SnapshotMeta {
        index: info.header.index,
        term: info.header.term,
    };
    storage
        .save_snapshot(&Snapshot {
            meta,
            // Empty: the new cluster's nodes start from the bootstrap configuration of its
            // own cluster file (the old cluster's members and addresses do not carry over).
            membership: Membership::default(),
            data: Arc::new(Vec::new()),
        })
        .map_err(|e| format!("data directory {}: {e}", data_dir.display()))?;
    let hard_state = HardState {
        term: info.header.term,
        vote: 0,
        commit: info.header.index,
    };
    storage
        .append(Some(hard_state), &[])
        .and_then(|()| storage.sync())
        .map_err(|e| format!("data directory {}: {e}", data_dir.display()))?;
    Ok(())
}
