//! Snapshot files. One file per snapshot, `snap-<index>-<term>.snap`
//! (20-digit, zero-padded), laid out as
//!
//! ```text
//! [magic "KVSNAP02"][index u64][term u64][payload_len u64][crc32 u32]
//! [membership_len u32][membership][data]
//! ```
//!
//! with the CRC-32 over index, term, payload_len and the payload. The
//! membership (the cluster configuration at `index`, in the core's encoding)
//! is snapshot metadata: the conf-change entries it summarizes are gone from
//! the log. A `KVSNAP01` file (written before membership was replicated) has
//! no membership part: it loads with an empty one, for which the core uses
//! the bootstrap configuration. A file is written
//! under a `.tmp` name, fsynced, renamed into place and the directory
//! fsynced, so a snapshot file either exists whole or not at all; a `.tmp`
//! left by a crash is ignored and removed at the next open.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::error::StorageError;
use super::fs::FileSystem;
use crate::raft::{Membership, Snapshot, SnapshotMeta};

const MAGIC: &[u8; 8] = b"KVSNAP02";
const MAGIC_WITHOUT_MEMBERSHIP: &[u8; 8] = b"KVSNAP01";
/// magic + index + term + data_len + crc32.
pub(crate) const SNAPSHOT_HEADER_BYTES: usize = 8 + 8 + 8 + 8 + 4;
const CRC_OFFSET: usize = 32;
const DATA_LEN_OFFSET: usize = 24;

const SNAPSHOT_PREFIX: &str = "snap-";
const SNAPSHOT_SUFFIX: &str = ".snap";
pub(crate) const TEMP_SUFFIX: &str = ".tmp";

pub(crate) fn snapshot_file_name(meta: &SnapshotMeta) -> String {
    format!(
        "{SNAPSHOT_PREFIX}{:020}-{:020}{SNAPSHOT_SUFFIX}",
        meta.index, meta.term
    )
}

/// The index and term named by a snapshot file name, or `None` for other files.
pub(crate) fn parse_snapshot_file_name(name: &str) -> Option<SnapshotMeta> {
    let middle = name
        .strip_prefix(SNAPSHOT_PREFIX)?
        .strip_suffix(SNAPSHOT_SUFFIX)?;
    let (index, term) = middle.split_once('-')?;
    let number = |digits: &str| {
        if digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit()) {
            digits.parse::<u64>().ok()
        } else {
            None
        }
    };
    Some(SnapshotMeta {
        index: number(index)?,
        term: number(term)?,
    })
}

/// The payload before the data: `[membership_len u32][membership]`.
fn membership_prefix(membership: &Membership) -> Vec<u8> {
    let encoded = membership.encode();
    let mut prefix = Vec::with_capacity(4 + encoded.len());
    prefix.extend_from_slice(&(encoded.len() as u32).to_le_bytes());
    prefix.extend_from_slice(&encoded);
    prefix
}

fn header(meta: &SnapshotMeta, prefix: &[u8], data: &[u8]) -> [u8; SNAPSHOT_HEADER_BYTES] {
    let mut header = [0u8; SNAPSHOT_HEADER_BYTES];
    header[0..8].copy_from_slice(MAGIC);
    header[8..16].copy_from_slice(&meta.index.to_le_bytes());
    header[16..24].copy_from_slice(&meta.term.to_le_bytes());
    let payload_bytes = (prefix.len() + data.len()) as u64;
    header[DATA_LEN_OFFSET..CRC_OFFSET].copy_from_slice(&payload_bytes.to_le_bytes());
    let crc = checksum(&header, &[prefix, data]);
    header[CRC_OFFSET..].copy_from_slice(&crc.to_le_bytes());
    header
}

fn checksum(header: &[u8; SNAPSHOT_HEADER_BYTES], payload: &[&[u8]]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&header[8..CRC_OFFSET]);
    for part in payload {
        hasher.update(part);
    }
    hasher.finalize()
}

/// Writes `snapshot` atomically into `dir` and returns its path and size.
/// When this returns, the file is durable under its final name.
pub(crate) fn write_snapshot(
    fs: &dyn FileSystem,
    dir: &Path,
    snapshot: &Snapshot,
) -> Result<(PathBuf, u64), StorageError> {
    let name = snapshot_file_name(&snapshot.meta);
    let path = dir.join(&name);
    let temp_path = dir.join(format!("{name}{TEMP_SUFFIX}"));
    let prefix = membership_prefix(&snapshot.membership);
    let header = header(&snapshot.meta, &prefix, &snapshot.data);
    let mut file = fs
        .create_truncate(&temp_path)
        .map_err(StorageError::io("create", &temp_path))?;
    file.write_all(&header)
        .and_then(|()| file.write_all(&prefix))
        .and_then(|()| file.write_all(&snapshot.data))
        .map_err(StorageError::io("write", &temp_path))?;
    file.sync_all()
        .map_err(StorageError::io("fsync", &temp_path))?;
    drop(file);
    fs.rename(&temp_path, &path)
        .map_err(StorageError::io("rename", &temp_path))?;
    fs.sync_dir(dir)
        .map_err(StorageError::io("fsync directory", dir))?;
    let size_bytes = (SNAPSHOT_HEADER_BYTES + prefix.len() + snapshot.data.len()) as u64;
    Ok((path, size_bytes))
}

/// Reads and verifies the snapshot file at `path`, whose name said `named`.
pub(crate) fn read_snapshot(
    fs: &dyn FileSystem,
    path: &Path,
    named: &SnapshotMeta,
) -> Result<Snapshot, StorageError> {
    let (mut file, file_bytes) = fs.open_read(path).map_err(StorageError::io("open", path))?;
    let mut header = [0u8; SNAPSHOT_HEADER_BYTES];
    if file_bytes < SNAPSHOT_HEADER_BYTES as u64 {
        return Err(StorageError::corrupt(
            path,
            file_bytes,
            format!("snapshot file has {file_bytes} bytes, shorter than its header"),
        ));
    }
    file.read_exact(&mut header)
        .map_err(StorageError::io("read", path))?;
    let with_membership = &header[0..8] == MAGIC;
    if !with_membership && &header[0..8] != MAGIC_WITHOUT_MEMBERSHIP {
        return Err(StorageError::corrupt(
            path,
            0,
            "not a snapshot file (bad magic)",
        ));
    }
    let field = |at: usize| u64::from_le_bytes(header[at..at + 8].try_into().expect("8 bytes"));
    let meta = SnapshotMeta {
        index: field(8),
        term: field(16),
    };
    if meta != *named {
        return Err(StorageError::corrupt(
            path,
            8,
            format!(
                "header says index {} term {}, but the file name says index {} term {}",
                meta.index, meta.term, named.index, named.term
            ),
        ));
    }
    let data_bytes = field(DATA_LEN_OFFSET);
    if data_bytes != file_bytes - SNAPSHOT_HEADER_BYTES as u64 {
        return Err(StorageError::corrupt(
            path,
            DATA_LEN_OFFSET as u64,
            format!(
                "header says {data_bytes} data bytes, the file holds {}",
                file_bytes - SNAPSHOT_HEADER_BYTES as u64
            ),
        ));
    }
    let data_len = usize::try_from(data_bytes).map_err(|_| {
        StorageError::corrupt(path, DATA_LEN_OFFSET as u64, "snapshot too large to load")
    })?;
    let mut data = Vec::with_capacity(data_len);
    file.read_to_end(&mut data)
        .map_err(StorageError::io("read", path))?;
    // Check what we read back: the length we were promised, then the checksum.
    if data.len() != data_len {
        return Err(StorageError::corrupt(
            path,
            (SNAPSHOT_HEADER_BYTES + data.len()) as u64,
            "snapshot file changed size while being read",
        ));
    }
    let stored_crc = u32::from_le_bytes(header[CRC_OFFSET..].try_into().expect("4 bytes"));
    if checksum(&header, &[&data]) != stored_crc {
        return Err(StorageError::corrupt(
            path,
            CRC_OFFSET as u64,
            format!(
                "snapshot checksum mismatch over bytes 8..{}",
                SNAPSHOT_HEADER_BYTES as u64 + data_bytes
            ),
        ));
    }
    let membership = if with_membership {
        split_membership(&mut data).ok_or_else(|| {
            StorageError::corrupt(
                path,
                SNAPSHOT_HEADER_BYTES as u64,
                "the snapshot's membership does not decode",
            )
        })?
    } else {
        Membership::default()
    };
    Ok(Snapshot {
        meta,
        membership,
        data: Arc::new(data),
    })
}

/// Takes the membership prefix off a payload whose checksum has passed;
/// `None` if it is malformed.
fn split_membership(payload: &mut Vec<u8>) -> Option<Membership> {
    let length = u32::from_le_bytes(payload.get(0..4)?.try_into().ok()?) as usize;
    let membership = Membership::decode(payload.get(4..4 + length)?)?;
    payload.drain(..4 + length);
    Some(membership)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        let meta = SnapshotMeta { index: 42, term: 7 };
        let name = snapshot_file_name(&meta);
        assert_eq!(name, "snap-00000000000000000042-00000000000000000007.snap");
        assert_eq!(parse_snapshot_file_name(&name), Some(meta));
        assert_eq!(parse_snapshot_file_name(&format!("{name}.tmp")), None);
        assert_eq!(parse_snapshot_file_name("snap-1-2.snap"), None);
    }
}
