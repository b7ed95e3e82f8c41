//! The storage layer's one door to the file system. Every open, write,
//! fsync, rename, delete and read of the WAL, the hard state and the
//! snapshot files goes through [`FileSystem`], so that tests can put the
//! storage on a simulated disk ([`super::SimFs`]) that forgets, at a power
//! loss, whatever no completed fsync covered — something a `kill -9` on a
//! real file system cannot show, because the page cache survives it.
//!
//! In production it is [`RealFs`]: each method is the one `std::fs` call it
//! replaces, reached through one virtual call; the calls it stands for are
//! system calls (and most of them fsyncs), so the indirection costs nothing
//! measurable. The seam is narrow on purpose: an embedded engine whose I/O
//! can be replaced (redb's `StorageBackend`, for one) can be put on the same
//! disk by adapting these few calls.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::Path;

use super::error::StorageError;
use super::lock::DirLock;

/// A file opened for writing: appends go to its end.
pub trait WriteFile: Send + fmt::Debug {
    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()>;
    /// Writes `len_bytes` zeroes at `offset` (at or past the end of what `write_all` wrote)
    /// without moving where the next `write_all` lands: the WAL preallocates its active
    /// segment this way, so that most fdatasyncs overwrite blocks already allocated and
    /// change no metadata. Returns false, having written nothing, where files do not
    /// preallocate (the simulated disk, whose files are append-only).
    fn write_zeroes_at(&mut self, _offset: u64, _len_bytes: u64) -> io::Result<bool> {
        Ok(false)
    }
    /// fdatasync(2): the file's data (and its size) are durable on return.
    fn sync_data(&mut self) -> io::Result<()>;
    /// fsync(2): data and metadata are durable on return.
    fn sync_all(&mut self) -> io::Result<()>;
}

/// Something held for as long as a data directory is in use (the lock).
pub trait DirGuard: Send + fmt::Debug {}

impl<T: Send + fmt::Debug> DirGuard for T {}

/// The file-system calls the storage layer makes. Paths are those the
/// storage was opened with, joined with file names.
pub trait FileSystem: Send + Sync + fmt::Debug {
    /// Creates `dir` and its missing parents, and makes the new entry durable.
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// Takes the exclusive lock of the data directory `dir`.
    fn lock_dir(&self, dir: &Path) -> Result<Box<dyn DirGuard>, StorageError>;
    /// The names in `dir` (files only matter; order unspecified).
    fn list_dir(&self, dir: &Path) -> io::Result<Vec<String>>;
    /// The whole file.
    fn read(&self, path: &Path) -> io::Result<Vec<u8>>;
    /// The file for reading, with its length in bytes.
    fn open_read(&self, path: &Path) -> io::Result<(Box<dyn Read + Send>, u64)>;
    /// Creates a file that must not exist yet, for appending.
    fn create_new(&self, path: &Path) -> io::Result<Box<dyn WriteFile>>;
    /// Creates or empties a file, for writing it from the start.
    fn create_truncate(&self, path: &Path) -> io::Result<Box<dyn WriteFile>>;
    /// Renames a file within its directory (durable after [`FileSystem::sync_dir`]).
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Deletes a file (durable after [`FileSystem::sync_dir`]).
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Cuts a file to `len_bytes` and fsyncs it.
    fn truncate_durably(&self, path: &Path, len_bytes: u64) -> io::Result<()>;
    /// fsync(2) of a directory: the entries created, renamed and deleted in
    /// it so far are durable on return.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
}

/// The real file system.
#[derive(Clone, Copy, Debug, Default)]
pub struct RealFs;

/// The zeroes `write_zeroes_at` writes, a block at a time.
static ZEROES: [u8; 64 << 10] = [0; 64 << 10];

impl WriteFile for File {
    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        Write::write_all(self, bytes)
    }
    fn write_zeroes_at(&mut self, offset: u64, len_bytes: u64) -> io::Result<bool> {
        use std::os::unix::fs::FileExt;
        let mut done_bytes = 0;
        while done_bytes < len_bytes {
            let block = (len_bytes - done_bytes).min(ZEROES.len() as u64);
            // pwrite(2): the file position (where appends land) does not move.
            self.write_all_at(&ZEROES[..block as usize], offset + done_bytes)?;
            done_bytes += block;
        }
        Ok(true)
    }
    fn sync_data(&mut self) -> io::Result<()> {
        File::sync_data(self)
    }
    fn sync_all(&mut self) -> io::Result<()> {
        File::sync_all(self)
    }
}

impl FileSystem for RealFs {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        if dir.is_dir() {
            return Ok(());
        }
        fs::create_dir_all(dir)?;
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            File::open(parent)?.sync_all()?;
        }
        Ok(())
    }

    fn lock_dir(&self, dir: &Path) -> Result<Box<dyn DirGuard>, StorageError> {
        Ok(Box::new(DirLock::acquire(dir)?))
    }

    fn list_dir(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for item in fs::read_dir(dir)? {
            // Names that are not UTF-8 are none of ours.
            if let Ok(name) = item?.file_name().into_string() {
                names.push(name);
            }
        }
        Ok(names)
    }

    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        fs::read(path)
    }

    fn open_read(&self, path: &Path) -> io::Result<(Box<dyn Read + Send>, u64)> {
        let file = File::open(path)?;
        let len_bytes = file.metadata()?.len();
        Ok((Box::new(file), len_bytes))
    }

    fn create_new(&self, path: &Path) -> io::Result<Box<dyn WriteFile>> {
        let file = OpenOptions::new().write(true).create_new(true).open(path)?;
        Ok(Box::new(file))
    }

    fn create_truncate(&self, path: &Path) -> io::Result<Box<dyn WriteFile>> {
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        Ok(Box::new(file))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }

    fn truncate_durably(&self, path: &Path, len_bytes: u64) -> io::Result<()> {
        let file = OpenOptions::new().write(true).open(path)?;
        file.set_len(len_bytes)?;
        file.sync_all()
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }
}
