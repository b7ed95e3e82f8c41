//! The one error type of the storage layer. Every variant names what failed
//! and where (a path, and an offset inside the file when one is known), so
//! that the single line a node prints when it stops is enough to act on.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// Why a storage operation failed.
#[derive(Debug)]
pub enum StorageError {
    /// An operating-system call failed; `op` says which ("fsync", "write", ...).
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    /// Another open `DiskStorage` (in this or another process) holds the
    /// data directory's lock.
    Locked { dir: PathBuf },
    /// A file's contents are damaged in a way that is not a torn write at
    /// the tail of the log: opening stops rather than guess.
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    /// A file that must exist does not (a WAL segment in the middle of the
    /// sequence, or the whole WAL next to a snapshot).
    Missing { path: PathBuf, reason: String },
    /// `save_snapshot` was given a snapshot older than the stored one; storing
    /// it would move durable state backwards.
    StaleSnapshot {
        index: u64,
        term: u64,
        stored_index: u64,
        stored_term: u64,
    },
    /// One entry is larger than a WAL record may be.
    EntryTooLarge {
        index: u64,
        data_bytes: usize,
        max_bytes: usize,
    },
    /// An earlier write or fsync failed. After a failed fsync the kernel may
    /// have dropped the dirty pages, so nothing written since the last good
    /// sync can be trusted: the storage refuses all further work.
    Stopped { cause: String },
}

impl StorageError {
    /// A closure for `map_err` that wraps an `io::Error` with its operation and path.
    pub(crate) fn io(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StorageError {
        let path = path.to_path_buf();
        move |source| StorageError::Io { op, path, source }
    }

    pub(crate) fn corrupt(path: &Path, offset: u64, reason: impl Into<String>) -> StorageError {
        StorageError::Corrupt {
            path: path.to_path_buf(),
            offset,
            reason: reason.into(),
        }
    }
}

impl fmt::Display for StorageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StorageError::Io { op, path, source } => {
                write!(f, "{op} {}: {source}", path.display())
            }
            StorageError::Locked { dir } => write!(
                f,
                "data directory {} is locked by another process",
                dir.display()
            ),
            StorageError::Corrupt {
                path,
                offset,
                reason,
            } => write!(f, "corrupt {} at offset {offset}: {reason}", path.display()),
            StorageError::Missing { path, reason } => {
                write!(f, "missing {}: {reason}", path.display())
            }
            StorageError::StaleSnapshot {
                index,
                term,
                stored_index,
                stored_term,
            } => write!(
                f,
                "snapshot at index {index} (term {term}) is not newer than the stored \
                 snapshot at index {stored_index} (term {stored_term})"
            ),
            StorageError::EntryTooLarge {
                index,
                data_bytes,
                max_bytes,
            } => write!(
                f,
                "entry {index} has {data_bytes} bytes of data; a WAL record holds at most {max_bytes}"
            ),
            StorageError::Stopped { cause } => {
                write!(f, "storage stopped after an earlier failure: {cause}")
            }
        }
    }
}

impl std::error::Error for StorageError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StorageError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}
