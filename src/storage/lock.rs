//! The data directory's lock: one `DiskStorage` per directory. Two nodes
//! appending to the same WAL would interleave records and destroy it, so the
//! second one must fail at once with a clear message.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use super::error::StorageError;

const LOCK_FILE_NAME: &str = "LOCK";

/// Holds an exclusive flock(2) on `<dir>/LOCK` for as long as it lives.
/// flock locks belong to the open file description, so a second open of the
/// same directory conflicts even inside one process, and the kernel drops the
/// lock when the descriptor is closed (on drop, or when the process dies).
#[derive(Debug)]
pub(crate) struct DirLock {
    _file: File,
}

impl DirLock {
    pub(crate) fn acquire(dir: &Path) -> Result<DirLock, StorageError> {
        let path = dir.join(LOCK_FILE_NAME);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(StorageError::io("open lock file", &path))?;
        // SAFETY: flock takes a plain descriptor that `file` owns and keeps
        // open for the whole call; it touches no Rust-managed memory.
        let result = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if result != 0 {
            let error = io::Error::last_os_error();
            if error.kind() == io::ErrorKind::WouldBlock {
                return Err(StorageError::Locked {
                    dir: dir.to_path_buf(),
                });
            }
            return Err(StorageError::Io {
                op: "flock",
                path,
                source: error,
            });
        }
        Ok(DirLock { _file: file })
    }

    pub(crate) fn is_lock_file(name: &str) -> bool {
        name == LOCK_FILE_NAME
    }
}
