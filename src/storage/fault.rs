//! A testing hook that makes the disk misbehave on request: the chaos runner
//! and the disk-fault tests use it to stall a node's fsyncs (a hung disk) or
//! to fail them (a dying disk), on a real `kvserver` process, without root
//! and without a special filesystem.
//!
//! It is off unless `kvserver --fault-file PATH` is given. When on, the
//! storage reads PATH before every fsync of the WAL and before writing a
//! snapshot: a file that starts with `stall` makes the fsync wait, polling
//! every 10 ms, for as long as it says so (a hung disk has no deadline
//! either); one that starts with `fail` makes the fsync fail with an I/O
//! error, which stops the storage and so the node, exactly as a real failed
//! fsync does. A missing, empty or other file means no fault. The cost when
//! on is one small read per batch; when off, nothing.
//!
//! The same file can make a server thread panic, to test that a panic in any
//! node thread stops the node (issue 16, item 7): `panic rpc` makes the next
//! KVStore request panic on its RPC connection thread, `panic http` the next
//! HTTP request on its HTTP thread ([`FaultFile::panic_if_requested`]).

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long a stalled fsync sleeps between two looks at the fault file.
const STALL_POLL_MS: u64 = 10;

/// What the fault file asks for right now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskFault {
    None,
    Stall,
    Fail,
}

/// The fault file of one node.
#[derive(Clone, Debug)]
pub struct FaultFile {
    path: PathBuf,
}

impl FaultFile {
    pub fn new(path: &Path) -> FaultFile {
        FaultFile {
            path: path.to_path_buf(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the fault the file asks for now. A file that cannot be read
    /// (most often: it does not exist) asks for none.
    pub fn current(&self) -> DiskFault {
        match std::fs::read(&self.path) {
            Ok(bytes) if bytes.starts_with(b"stall") => DiskFault::Stall,
            Ok(bytes) if bytes.starts_with(b"fail") => DiskFault::Fail,
            _ => DiskFault::None,
        }
    }

    /// Panics when the file asks for a panic at `place` (`panic rpc`, `panic http`): a
    /// testing hook, read only when `--fault-file` is given.
    pub fn panic_if_requested(&self, place: &str) {
        let wanted = format!("panic {place}");
        if std::fs::read(&self.path).is_ok_and(|bytes| bytes.starts_with(wanted.as_bytes())) {
            panic!("injected panic (fault file {})", self.path.display());
        }
    }

    /// Called right before an fsync: waits while the file says `stall`,
    /// then fails if it says `fail`.
    pub fn before_fsync(&self) -> io::Result<()> {
        let mut fault = self.current();
        if fault == DiskFault::Stall {
            log::warn!("fault file {}: fsync stalled", self.path.display());
            while fault == DiskFault::Stall {
                std::thread::sleep(Duration::from_millis(STALL_POLL_MS));
                fault = self.current();
            }
            log::warn!("fault file {}: fsync resumed", self.path.display());
        }
        if fault == DiskFault::Fail {
            return Err(io::Error::other(format!(
                "injected fsync failure (fault file {})",
                self.path.display()
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_says_which_fault() {
        let dir = std::env::temp_dir().join(format!("kv-fault-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let faults = FaultFile::new(&dir.join("fault"));
        assert_eq!(faults.current(), DiskFault::None);
        assert!(faults.before_fsync().is_ok());
        std::fs::write(faults.path(), "fail\n").unwrap();
        assert_eq!(faults.current(), DiskFault::Fail);
        let error = faults.before_fsync().unwrap_err();
        assert!(
            error.to_string().contains("injected fsync failure"),
            "{error}"
        );
        std::fs::write(faults.path(), "stall").unwrap();
        assert_eq!(faults.current(), DiskFault::Stall);
        std::fs::write(faults.path(), "").unwrap();
        assert!(faults.before_fsync().is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
