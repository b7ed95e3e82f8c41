//! A simulated disk for tests: a [`FileSystem`] in memory that knows, per
//! file and per directory, what is durable and what is only written, and
//! that forgets at a power loss whatever no completed fsync covered.
//!
//! The model is the one POSIX promises and LazyFS enforces:
//! - a write lands in the file's cache; `sync_data`/`sync_all` of that file
//!   makes everything written to it so far durable;
//! - creating, renaming and deleting change the directory's cache only; a
//!   `sync_dir` of the directory makes all its entry changes durable (an
//!   fsynced file whose directory entry is not durable is lost with it);
//! - [`SimFs::power_loss`] puts every directory back to its durable entries
//!   and every file back to its durable bytes, optionally keeping a random
//!   prefix of the unsynced writes, the last one torn at a random byte (a
//!   disk writes back in order but may stop anywhere). Handles opened
//!   before the power loss fail from then on, and the directory locks are
//!   released, as when the process dies with the machine.
//!
//! [`SimFs::crash_after_ops`] makes the disk die after a given number of
//! further mutating calls: that call and every later one fail, so that a
//! test can stop a workload at any point, then call `power_loss`.
//!
//! Every file is append-only (the storage layer only appends, creates,
//! truncates durably and renames), so a file's durable bytes are always a
//! prefix of its written bytes; that keeps fsync O(1).
//!
//! Directories are created durable (`create_dir_all` fsyncs the parent in
//! the real implementation too); only files are simulated in full.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{self, Cursor, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use super::error::StorageError;
use super::fs::{DirGuard, FileSystem, WriteFile};
use crate::raft::SplitMix64;

/// What a power loss keeps of the writes no fsync covered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PowerLoss {
    /// Nothing: only what completed fsyncs covered.
    Strict,
    /// Per file, a prefix of the unsynced writes (drawn with `seed`), the
    /// last kept one possibly cut at any byte; unsynced directory changes
    /// are still lost.
    TornPrefix { seed: u64 },
    /// Per file, exactly the first `bytes` unsynced bytes (all if fewer):
    /// lets a test walk every tear position of one write.
    KeepUnsyncedBytes { bytes: u64 },
}

/// A shared in-memory disk; clones see the same disk.
#[derive(Clone, Debug, Default)]
pub struct SimFs {
    state: Arc<Mutex<State>>,
}

#[derive(Debug, Default)]
struct State {
    dirs: BTreeMap<PathBuf, Dir>,
    inodes: HashMap<u64, Inode>,
    next_inode: u64,
    /// Bumped by every power loss; a handle of an older generation is dead.
    generation: u64,
    locked: HashSet<PathBuf>,
    /// Mutating calls left before the disk dies (`None`: it never does).
    ops_left: Option<u64>,
    dead: bool,
    /// Each file fsync takes this long (a slow disk widens the window
    /// between a write and its durability).
    sync_delay: Duration,
    counters: Counters,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    /// Mutating calls that succeeded (what `crash_after_ops` counts).
    pub mutating_ops: u64,
    /// File fsyncs completed (`sync_data` and `sync_all`).
    pub file_syncs: u64,
    pub dir_syncs: u64,
    pub power_losses: u64,
}

#[derive(Debug, Default)]
struct Dir {
    entries: BTreeMap<String, u64>,
    durable: BTreeMap<String, u64>,
}

#[derive(Debug, Default)]
struct Inode {
    data: Vec<u8>,
    durable_len: usize,
    /// The end offsets of the writes after `durable_len`, in order.
    unsynced_ends: Vec<usize>,
}

fn dead_disk() -> io::Error {
    io::Error::other("simulated disk: power lost")
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("simulated disk: no such file {}", path.display()),
    )
}

fn split(path: &Path) -> io::Result<(PathBuf, String)> {
    let parent = path.parent().unwrap_or(Path::new("")).to_path_buf();
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "bad file name"))?;
    Ok((parent, name.to_string()))
}

impl State {
    /// Counts one mutating call; fails once the disk has died.
    fn mutate(&mut self) -> io::Result<()> {
        if self.dead {
            return Err(dead_disk());
        }
        if let Some(left) = self.ops_left.as_mut() {
            if *left == 0 {
                self.dead = true;
                return Err(dead_disk());
            }
            *left -= 1;
        }
        self.counters.mutating_ops += 1;
        Ok(())
    }

    fn dir_mut(&mut self, dir: &Path) -> io::Result<&mut Dir> {
        self.dirs.get_mut(dir).ok_or_else(|| not_found(dir))
    }

    fn lookup(&self, path: &Path) -> io::Result<u64> {
        let (parent, name) = split(path)?;
        self.dirs
            .get(&parent)
            .and_then(|d| d.entries.get(&name))
            .copied()
            .ok_or_else(|| not_found(path))
    }

    fn new_inode(&mut self) -> u64 {
        self.next_inode += 1;
        self.inodes.insert(self.next_inode, Inode::default());
        self.next_inode
    }

    fn check_handle(&self, generation: u64) -> io::Result<()> {
        if self.dead || generation != self.generation {
            return Err(dead_disk());
        }
        Ok(())
    }
}

impl SimFs {
    pub fn new() -> SimFs {
        SimFs::default()
    }

    /// The disk dies after `ops` more mutating calls (writes, fsyncs,
    /// creates, renames, deletes, truncates).
    pub fn crash_after_ops(&self, ops: u64) {
        self.state.lock().ops_left = Some(ops);
    }

    /// The disk dies now: every later call fails until the power loss.
    pub fn crash_now(&self) {
        self.state.lock().dead = true;
    }

    /// Whether the disk has died (and awaits its power loss).
    pub fn is_dead(&self) -> bool {
        self.state.lock().dead
    }

    pub fn set_sync_delay(&self, delay: Duration) {
        self.state.lock().sync_delay = delay;
    }

    pub fn counters(&self) -> Counters {
        self.state.lock().counters
    }

    /// The power fails: see the module documentation. The disk works again
    /// afterwards (a fresh boot).
    pub fn power_loss(&self, mode: PowerLoss) {
        let mut state = self.state.lock();
        let mut rng = match mode {
            PowerLoss::TornPrefix { seed } => Some(SplitMix64::new(seed)),
            _ => None,
        };
        for dir in state.dirs.values_mut() {
            dir.entries = dir.durable.clone();
        }
        let live: HashSet<u64> = state
            .dirs
            .values()
            .flat_map(|d| d.entries.values().copied())
            .collect();
        state.inodes.retain(|id, _| live.contains(id));
        let mut ids: Vec<u64> = state.inodes.keys().copied().collect();
        ids.sort_unstable();
        for id in ids {
            let inode = state.inodes.get_mut(&id).expect("listed");
            let mut keep = inode.durable_len;
            if let Some(rng) = rng.as_mut() {
                let writes = inode.unsynced_ends.len() as u64;
                let kept = rng.range(0, writes + 1) as usize;
                if kept > 0 {
                    keep = inode.unsynced_ends[kept - 1];
                }
                // The next write, torn somewhere inside.
                if let Some(&end) = inode.unsynced_ends.get(kept) {
                    keep += rng.range(0, (end - keep) as u64 + 1) as usize;
                }
            }
            if let PowerLoss::KeepUnsyncedBytes { bytes } = mode {
                keep = (keep + bytes as usize).min(inode.data.len());
            }
            inode.data.truncate(keep);
            inode.durable_len = keep;
            inode.unsynced_ends.clear();
        }
        state.generation += 1;
        state.locked.clear();
        state.dead = false;
        state.ops_left = None;
        state.counters.power_losses += 1;
    }

    /// The names in `dir` and their current bytes (for test assertions).
    pub fn files(&self, dir: &Path) -> BTreeMap<String, Vec<u8>> {
        let state = self.state.lock();
        let Some(d) = state.dirs.get(dir) else {
            return BTreeMap::new();
        };
        d.entries
            .iter()
            .map(|(name, id)| (name.clone(), state.inodes[id].data.clone()))
            .collect()
    }

    fn open_for_write(&self, path: &Path, exclusive: bool) -> io::Result<Box<dyn WriteFile>> {
        let mut state = self.state.lock();
        state.mutate()?;
        let (parent, name) = split(path)?;
        let existing = state.dir_mut(&parent)?.entries.get(&name).copied();
        let inode = match existing {
            Some(_) if exclusive => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("simulated disk: {} exists", path.display()),
                ))
            }
            Some(id) => {
                // O_TRUNC: the cut is not durable until an fsync; a real disk
                // could show old bytes after a power loss, but never a mix
                // that matters here, so model it as a fresh, unsynced file.
                let inode = state.inodes.get_mut(&id).expect("linked inode");
                inode.data.clear();
                inode.durable_len = 0;
                inode.unsynced_ends.clear();
                id
            }
            None => {
                let id = state.new_inode();
                state.dir_mut(&parent)?.entries.insert(name, id);
                id
            }
        };
        Ok(Box::new(SimFile {
            fs: self.clone(),
            inode,
            generation: state.generation,
        }))
    }
}

/// An open file of a [`SimFs`].
#[derive(Debug)]
struct SimFile {
    fs: SimFs,
    inode: u64,
    generation: u64,
}

impl SimFile {
    fn sync(&mut self) -> io::Result<()> {
        let delay = {
            let mut state = self.fs.state.lock();
            state.check_handle(self.generation)?;
            state.mutate()?;
            state.sync_delay
        };
        if !delay.is_zero() {
            std::thread::sleep(delay);
        }
        let mut state = self.fs.state.lock();
        // The power may have failed while the fsync was under way: then it
        // never completed.
        state.check_handle(self.generation)?;
        let inode = state.inodes.get_mut(&self.inode).ok_or_else(dead_disk)?;
        inode.durable_len = inode.data.len();
        inode.unsynced_ends.clear();
        state.counters.file_syncs += 1;
        Ok(())
    }
}

impl WriteFile for SimFile {
    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        let mut state = self.fs.state.lock();
        state.check_handle(self.generation)?;
        state.mutate()?;
        let inode = state.inodes.get_mut(&self.inode).ok_or_else(dead_disk)?;
        inode.data.extend_from_slice(bytes);
        let end = inode.data.len();
        inode.unsynced_ends.push(end);
        Ok(())
    }
    fn sync_data(&mut self) -> io::Result<()> {
        self.sync()
    }
    fn sync_all(&mut self) -> io::Result<()> {
        self.sync()
    }
}

/// The lock of one simulated data directory.
#[derive(Debug)]
struct SimLock {
    fs: SimFs,
    dir: PathBuf,
    generation: u64,
}

impl Drop for SimLock {
    fn drop(&mut self) {
        let mut state = self.fs.state.lock();
        if state.generation == self.generation {
            state.locked.remove(&self.dir);
        }
    }
}

impl FileSystem for SimFs {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        let mut state = self.state.lock();
        if state.dirs.contains_key(dir) {
            return Ok(());
        }
        state.mutate()?;
        state.dirs.insert(dir.to_path_buf(), Dir::default());
        Ok(())
    }

    fn lock_dir(&self, dir: &Path) -> Result<Box<dyn DirGuard>, StorageError> {
        let mut state = self.state.lock();
        if !state.locked.insert(dir.to_path_buf()) {
            return Err(StorageError::Locked {
                dir: dir.to_path_buf(),
            });
        }
        Ok(Box::new(SimLock {
            fs: self.clone(),
            dir: dir.to_path_buf(),
            generation: state.generation,
        }))
    }

    fn list_dir(&self, dir: &Path) -> io::Result<Vec<String>> {
        let state = self.state.lock();
        let d = state.dirs.get(dir).ok_or_else(|| not_found(dir))?;
        Ok(d.entries.keys().cloned().collect())
    }

    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        let state = self.state.lock();
        let id = state.lookup(path)?;
        Ok(state.inodes[&id].data.clone())
    }

    fn open_read(&self, path: &Path) -> io::Result<(Box<dyn Read + Send>, u64)> {
        let bytes = self.read(path)?;
        let len_bytes = bytes.len() as u64;
        Ok((Box::new(Cursor::new(bytes)), len_bytes))
    }

    fn create_new(&self, path: &Path) -> io::Result<Box<dyn WriteFile>> {
        self.open_for_write(path, true)
    }

    fn create_truncate(&self, path: &Path) -> io::Result<Box<dyn WriteFile>> {
        self.open_for_write(path, false)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut state = self.state.lock();
        state.mutate()?;
        let (from_dir, from_name) = split(from)?;
        let (to_dir, to_name) = split(to)?;
        if from_dir != to_dir {
            return Err(io::Error::other(
                "simulated disk: rename across directories",
            ));
        }
        let dir = state.dir_mut(&from_dir)?;
        let id = dir
            .entries
            .remove(&from_name)
            .ok_or_else(|| not_found(from))?;
        dir.entries.insert(to_name, id);
        Ok(())
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let mut state = self.state.lock();
        state.mutate()?;
        let (parent, name) = split(path)?;
        state
            .dir_mut(&parent)?
            .entries
            .remove(&name)
            .map(|_| ())
            .ok_or_else(|| not_found(path))
    }

    fn truncate_durably(&self, path: &Path, len_bytes: u64) -> io::Result<()> {
        let mut state = self.state.lock();
        state.mutate()?;
        let id = state.lookup(path)?;
        let inode = state.inodes.get_mut(&id).expect("linked inode");
        let len = (len_bytes as usize).min(inode.data.len());
        inode.data.truncate(len);
        inode.durable_len = len;
        inode.unsynced_ends.clear();
        state.counters.file_syncs += 1;
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut state = self.state.lock();
        state.mutate()?;
        let d = state.dir_mut(dir)?;
        d.durable = d.entries.clone();
        state.counters.dir_syncs += 1;
        Ok(())
    }
}
