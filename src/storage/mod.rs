//! Durability for one Raft node: a write-ahead log of hard states and
//! entries in segment files, and snapshot files, in one locked directory.
//!
//! The node's event loop drives it once per batch (group commit):
//!
//! ```text
//! storage.append(ready.hard_state, &ready.entries)?; // buffered: one write(2), no fsync
//! storage.sync()?;                                   // one fdatasync for the whole batch
//! ```
//!
//! and, when the application has taken a snapshot at index `i` or one has
//! arrived from the leader, `storage.save_snapshot(&snapshot)?`, which makes
//! the snapshot file durable and then deletes the WAL segments and snapshot
//! files it makes redundant.
//!
//! [`DiskStorage::open`] returns what was durable. Its recovery rules: a torn
//! record at the tail of the last segment (a crash mid-write) is cut off;
//! any other damage — a bad checksum before intact records, a missing
//! segment, a hole in the entry indexes, an unreadable snapshot — stops the
//! open with an error naming the file and offset, and then nothing on disk
//! has been modified. Opening never drops an entry that was synced, with
//! one exception it cannot tell apart: damage inside the very last record
//! (no intact record after it) looks exactly like a torn write, because
//! where the last fsync ended is not recorded, so it is cut off like one,
//! with a warning naming the file and the bytes dropped; bit rot in that
//! one record thus costs this node an acknowledged record. Conversely,
//! zeroes or garbage inside the unsynced tail with an intact record after
//! them (out-of-order writeback) are reported as corruption.
//!
//! Within one batch, term and vote are logged before the entries and the
//! commit index after them (as etcd does): a write torn anywhere then never
//! leaves a commit index over the entries the batch was replacing.
//!
//! Every file-system call goes through [`FileSystem`] (`fs.rs`): the real
//! file system in production, a simulated disk that forgets what no fsync
//! covered ([`SimFs`]) in tests.
//!
//! Any failed write or fsync stops the storage for good (see
//! [`StorageError::Stopped`]): after a failed fsync the kernel may already
//! have discarded the dirty pages, so retrying could report success for
//! data that is gone.

mod error;
mod fault;
mod fs;
mod lock;
mod record;
mod replay;
mod segment;
mod simfs;
mod snapshot;
mod terms;

pub use self::error::StorageError;
pub use self::fault::{DiskFault, FaultFile};
pub use self::fs::{DirGuard, FileSystem, RealFs, WriteFile};
pub use self::simfs::{Counters as SimCounters, PowerLoss, SimFs};

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use self::lock::DirLock;
use self::replay::{Origin, Replay};
use self::segment::{parse_segment_file_name, scan_segment, segment_file_name};
use self::snapshot::{parse_snapshot_file_name, read_snapshot, write_snapshot, TEMP_SUFFIX};
use self::terms::TermRuns;
use crate::raft::{Entry, HardState, RestoredState, Snapshot, SnapshotMeta};

/// Tuning of a [`DiskStorage`].
#[derive(Clone, Debug)]
pub struct StorageOptions {
    /// A segment is closed and a new one started once it holds at least this
    /// many bytes; a segment overshoots by at most one append batch. Smaller
    /// segments let `save_snapshot` free space sooner; larger ones mean fewer
    /// files and directory fsyncs. 0 starts a new segment for every batch.
    pub segment_bytes: u64,
    /// The active segment is kept this many bytes of zeroes ahead of its last record
    /// (written, not just reserved), so that an append usually overwrites allocated blocks
    /// and its fdatasync changes no metadata: no journal commit of the file system, which on
    /// this project's machines made each fsync about twice as slow (see the README's
    /// "Performance"). Never past `segment_bytes`; cut off when the segment is closed and at
    /// open, so only the active segment ever ends in zeroes. 0: no preallocation (a file
    /// then grows by each append, as tests that read the bytes of segments expect).
    pub preallocate_bytes: u64,
    /// A testing hook that stalls or fails fsyncs on request (see
    /// [`FaultFile`]); `None` in production.
    pub fault_file: Option<FaultFile>,
    /// The file system: [`RealFs`] in production, a [`SimFs`] in tests.
    pub fs: Arc<dyn FileSystem>,
}

impl Default for StorageOptions {
    fn default() -> Self {
        StorageOptions {
            segment_bytes: 64 << 20,
            preallocate_bytes: 1 << 20,
            fault_file: None,
            fs: Arc::new(RealFs),
        }
    }
}

/// A buffer that grew past this for one huge batch is given back afterwards,
/// so that memory stays flat.
const RETAINED_BUFFER_BYTES: usize = 4 << 20;

/// One WAL segment file.
#[derive(Debug)]
struct SegmentInfo {
    seq: u64,
    path: PathBuf,
    size_bytes: u64,
    /// The file's length: `size_bytes` and the zeroes preallocated after it.
    file_bytes: u64,
    /// The highest entry index written into this segment (0 if none): once
    /// a snapshot covers it, the segment holds nothing recovery needs.
    max_entry_index: u64,
}

/// The newest snapshot file.
#[derive(Debug)]
struct SnapshotFile {
    meta: SnapshotMeta,
    path: PathBuf,
    size_bytes: u64,
}

/// The durable state of one Raft node in one data directory. Holds the
/// directory's lock until dropped.
#[derive(Debug)]
pub struct DiskStorage {
    dir: PathBuf,
    /// Every file-system call goes through here (a clone of `options.fs`).
    fs: Arc<dyn FileSystem>,
    options: StorageOptions,
    /// Oldest first; the last one is the active segment that appends go to.
    /// Invariant: never empty, and the sequence numbers are consecutive.
    segments: VecDeque<SegmentInfo>,
    active: Box<dyn WriteFile>,
    /// True when `active` has bytes that are not yet fsynced.
    active_unsynced: bool,
    /// True when a segment was created and the directory not yet fsynced.
    dir_unsynced: bool,
    hard_state: HardState,
    snapshot: Option<SnapshotFile>,
    /// The terms of the entries after the snapshot.
    terms: TermRuns,
    /// Reused for every batch so an append costs no allocation.
    buffer: Vec<u8>,
    /// Set by the first failed write or fsync; every later call fails with it.
    stopped: Option<String>,
    _lock: Box<dyn DirGuard>,
}

impl DiskStorage {
    /// Opens (creating if needed) the data directory `dir`, takes its lock,
    /// and recovers what was durable. See the module documentation for the
    /// recovery rules.
    pub fn open(
        dir: &Path,
        options: StorageOptions,
    ) -> Result<(DiskStorage, RestoredState), StorageError> {
        let fs = Arc::clone(&options.fs);
        fs.create_dir_all(dir)
            .map_err(StorageError::io("create directory", dir))?;
        let lock = fs.lock_dir(dir)?;
        let listing = list_dir(&*fs, dir)?;

        // Phase 1: read and check everything, modifying nothing.
        let snapshot = match listing.snapshots.last() {
            Some(meta) => {
                let path = dir.join(snapshot::snapshot_file_name(meta));
                let snapshot = read_snapshot(&*fs, &path, meta)?;
                let size_bytes = (snapshot::SNAPSHOT_HEADER_BYTES + snapshot.data.len()) as u64;
                Some((snapshot, path, size_bytes))
            }
            None => None,
        };
        let snapshot_meta = snapshot.as_ref().map(|(s, _, _)| s.meta);
        check_segment_sequence(dir, &listing.segment_seqs, snapshot_meta.is_some())?;
        let mut replay = Replay::new(snapshot_meta);
        let mut segments = VecDeque::new();
        let mut cut_tail = None;
        for (position, &seq) in listing.segment_seqs.iter().enumerate() {
            let path = dir.join(segment_file_name(seq));
            let bytes = fs.read(&path).map_err(StorageError::io("read", &path))?;
            let is_last = position + 1 == listing.segment_seqs.len();
            let scanned = scan_segment(&path, &bytes, is_last)?;
            let mut max_entry_index = 0;
            for (offset, record) in scanned.records {
                match &record {
                    record::Record::Entries(entries) => {
                        let last = entries.last().expect("decoded runs are non-empty").index;
                        max_entry_index = max_entry_index.max(last);
                    }
                    record::Record::Reset(_) => {
                        // The entries logged before a reset are void.
                        max_entry_index = 0;
                        void_entries_of(&mut segments);
                    }
                    record::Record::HardState(_) => {}
                }
                let origin = Origin {
                    path: path.clone(),
                    offset,
                };
                replay.apply(record, origin)?;
            }
            if scanned.valid_bytes < bytes.len() as u64 {
                // A torn write, or (`torn` is None) the zeroes preallocated after the last record.
                cut_tail = Some((path.clone(), scanned.valid_bytes, bytes.len(), scanned.torn));
            }
            segments.push_back(SegmentInfo {
                seq,
                path,
                size_bytes: scanned.valid_bytes,
                file_bytes: scanned.valid_bytes,
                max_entry_index,
            });
        }
        let replayed = replay.finish(dir)?;

        // Phase 2: everything checked out; repair and clean up.
        if let Some((path, valid_bytes, file_bytes, torn)) = cut_tail {
            // Cut so that every closed segment ends with its last record, as `roll_segment`
            // leaves them: damage in a closed segment is then always corruption.
            match torn {
                Some(reason) => log::warn!(
                    "{}: cutting off a torn write at the tail of the WAL: {reason}; \
                     dropping bytes {valid_bytes}..{file_bytes}",
                    path.display()
                ),
                None => log::debug!(
                    "{}: cutting off {} preallocated bytes of zeroes",
                    path.display(),
                    file_bytes as u64 - valid_bytes
                ),
            }
            fs.truncate_durably(&path, valid_bytes)
                .map_err(StorageError::io("truncate", &path))?;
        }
        let snapshot_index = snapshot_meta.map_or(0, |m| m.index);
        let mut terms = TermRuns::new(snapshot_index);
        for entry in &replayed.entries {
            terms.push(entry.index, entry.term);
        }
        if replayed.needs_reset {
            void_entries_of(&mut segments);
        }
        let next_seq = listing.segment_seqs.last().map_or(1, |seq| seq + 1);
        let (active, active_info) = create_segment(&*fs, dir, next_seq)?;
        segments.push_back(active_info);
        let mut storage = DiskStorage {
            dir: dir.to_path_buf(),
            fs,
            options,
            segments,
            active,
            active_unsynced: false,
            dir_unsynced: true,
            hard_state: replayed.hard_state,
            snapshot: snapshot.as_ref().map(|(s, path, size_bytes)| SnapshotFile {
                meta: s.meta,
                path: path.clone(),
                size_bytes: *size_bytes,
            }),
            terms,
            buffer: Vec::new(),
            stopped: None,
            _lock: lock,
        };
        // Every segment starts with the hard state, so that deleting older
        // segments never loses it.
        let reset = if replayed.needs_reset {
            snapshot_meta
        } else {
            None
        };
        storage.write_segment_head(reset)?;
        storage.sync()?;
        storage.remove_stale_files(&listing)?;
        let restored = RestoredState {
            hard_state: replayed.hard_state,
            snapshot: snapshot.map(|(s, _, _)| s),
            entries: replayed.entries,
        };
        Ok((storage, restored))
    }

    /// Logs `hard_state` (if given and changed) and `entries`, in one write
    /// and without fsync: call [`DiskStorage::sync`] before anything that
    /// depends on them. The first entry may overwrite stored entries at the
    /// same or a higher index; it must not leave a hole after the last one.
    pub fn append(
        &mut self,
        hard_state: Option<HardState>,
        entries: &[Entry],
    ) -> Result<(), StorageError> {
        self.check_running()?;
        let hard_state = hard_state.filter(|h| *h != self.hard_state);
        if hard_state.is_none() && entries.is_empty() {
            return Ok(());
        }
        if let Some(next) = hard_state {
            check_hard_state_step(&self.hard_state, &next);
        }
        let current_term = hard_state.unwrap_or(self.hard_state).term;
        self.check_entries(entries, current_term)?;
        if self.active_size_bytes() >= self.options.segment_bytes {
            self.roll_segment()?;
        }
        self.buffer.clear();
        let previous = self.hard_state;
        if let Some(next) = hard_state {
            self.hard_state = next;
        }
        let segment_empty = self.active_size_bytes() == 0;
        if entries.is_empty() {
            if hard_state.is_some() || segment_empty {
                record::encode_hard_state(&mut self.buffer, &self.hard_state);
            }
        } else {
            // The commit index goes after the entries it may cover, as etcd
            // does: a crash can tear the write anywhere, and a commit that
            // reached the disk ahead of the entries it covers would make a
            // restarted node apply the entries this batch was overwriting.
            // Term and vote go first (replay refuses entries above the term).
            let head = HardState {
                commit: previous.commit.min(self.hard_state.commit),
                ..self.hard_state
            };
            if head != previous || segment_empty {
                record::encode_hard_state(&mut self.buffer, &head);
            }
            record::encode_entries(&mut self.buffer, entries);
            if self.hard_state != head {
                record::encode_hard_state(&mut self.buffer, &self.hard_state);
            }
        }
        self.write_buffer()?;
        if let Some(first) = entries.first() {
            self.terms.truncate_from(first.index);
            for entry in entries {
                self.terms.push(entry.index, entry.term);
            }
            let active = self.segments.back_mut().expect("an active segment");
            active.max_entry_index = active.max_entry_index.max(self.terms.last_index());
        }
        Ok(())
    }

    /// Makes everything appended so far durable: one fdatasync of the active
    /// segment (and of the directory after a new segment was created). Does
    /// nothing if nothing was appended since the last sync.
    pub fn sync(&mut self) -> Result<(), StorageError> {
        self.check_running()?;
        if self.active_unsynced {
            let path = &self.segments.back().expect("an active segment").path;
            let result = self
                .injected_fault()
                .and_then(|()| self.active.sync_data())
                .map_err(StorageError::io("fdatasync", path));
            self.stop_on_error(result)?;
            self.active_unsynced = false;
        }
        if self.dir_unsynced {
            let result = self
                .fs
                .sync_dir(&self.dir)
                .map_err(StorageError::io("fsync directory", &self.dir));
            self.stop_on_error(result)?;
            self.dir_unsynced = false;
        }
        Ok(())
    }

    /// Stores `snapshot` durably, then deletes what it makes redundant: the
    /// WAL segments whose entries are all at `<= snapshot.meta.index` and the
    /// older snapshot files. Entries after the snapshot's index are kept if
    /// the stored log has the snapshot's last entry (same index and term);
    /// otherwise they are discarded (Raft §7: a snapshot from the leader that
    /// conflicts with the log replaces all of it). Appends made before this
    /// call are synced first.
    pub fn save_snapshot(&mut self, snapshot: &Snapshot) -> Result<(), StorageError> {
        self.check_running()?;
        let meta = snapshot.meta;
        if let Some(current) = &self.snapshot {
            if current.meta == meta {
                return Ok(());
            }
            if meta.index <= current.meta.index {
                return Err(StorageError::StaleSnapshot {
                    index: meta.index,
                    term: meta.term,
                    stored_index: current.meta.index,
                    stored_term: current.meta.term,
                });
            }
        }
        self.sync()?;
        let result = self
            .injected_fault()
            .map_err(StorageError::io("fsync", &self.dir))
            .and_then(|()| write_snapshot(&*self.fs, &self.dir, snapshot));
        let (path, size_bytes) = self.stop_on_error(result)?;
        let previous = self.snapshot.replace(SnapshotFile {
            meta,
            path,
            size_bytes,
        });
        let matches = self.terms.term_at(meta.index) == Some(meta.term);
        // A fresh segment lets the old active one be deleted once a later
        // snapshot covers it, which bounds the WAL to about two snapshot
        // intervals however large segment_bytes is.
        self.roll_segment()?;
        self.write_segment_head(if matches { None } else { Some(meta) })?;
        self.sync()?;
        if matches {
            self.terms.compact_to(meta.index);
        } else {
            self.terms = TermRuns::new(meta.index);
            // The reset voids every entry in the older segments, so they can
            // all go (the new segment starts with the hard state).
            let active = self.segments.pop_back().expect("an active segment");
            void_entries_of(&mut self.segments);
            self.segments.push_back(active);
        }
        self.delete_covered_segments(meta.index)?;
        if let Some(previous) = previous {
            let result = self
                .fs
                .remove_file(&previous.path)
                .map_err(StorageError::io("delete", &previous.path));
            self.stop_on_error(result)?;
        }
        self.sync_dir()
    }

    /// The index of the first entry after the snapshot (1 without a snapshot).
    pub fn first_index(&self) -> u64 {
        self.snapshot.as_ref().map_or(0, |s| s.meta.index) + 1
    }

    /// The index of the last entry, or the snapshot's index if the WAL holds
    /// no entries after it (0 for an empty log).
    pub fn last_index(&self) -> u64 {
        self.terms.last_index()
    }

    /// The last hard state appended.
    pub fn hard_state(&self) -> HardState {
        self.hard_state
    }

    /// The stored snapshot's index and term.
    pub fn snapshot_meta(&self) -> Option<SnapshotMeta> {
        self.snapshot.as_ref().map(|s| s.meta)
    }

    /// The bytes the WAL segments and the snapshot file take on disk.
    pub fn size_bytes(&self) -> u64 {
        let wal_bytes: u64 = self.segments.iter().map(|s| s.size_bytes).sum();
        wal_bytes + self.snapshot.as_ref().map_or(0, |s| s.size_bytes)
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// What the testing hook asks of the next fsync (nothing without one).
    fn injected_fault(&self) -> std::io::Result<()> {
        match &self.options.fault_file {
            Some(faults) => faults.before_fsync(),
            None => Ok(()),
        }
    }

    /// Fsyncs the directory, so that file creations, renames and deletions
    /// are durable; a failure stops the storage.
    fn sync_dir(&mut self) -> Result<(), StorageError> {
        let result = self
            .fs
            .sync_dir(&self.dir)
            .map_err(StorageError::io("fsync directory", &self.dir));
        self.stop_on_error(result)
    }

    fn check_running(&self) -> Result<(), StorageError> {
        match &self.stopped {
            None => Ok(()),
            Some(cause) => Err(StorageError::Stopped {
                cause: cause.clone(),
            }),
        }
    }

    /// Passes `result` through, stopping the storage if it is an error.
    fn stop_on_error<T>(&mut self, result: Result<T, StorageError>) -> Result<T, StorageError> {
        if let Err(error) = &result {
            if self.stopped.is_none() {
                self.stopped = Some(error.to_string());
            }
        }
        result
    }

    /// Checks the caller's entries: these are internal invariants of Raft
    /// (asserted), except for an entry too large to log (an error).
    fn check_entries(&self, entries: &[Entry], current_term: u64) -> Result<(), StorageError> {
        let Some(first) = entries.first() else {
            return Ok(());
        };
        let snapshot_index = self.first_index() - 1;
        assert!(
            first.index > snapshot_index && first.index <= self.terms.last_index() + 1,
            "append at {} with a snapshot at {} and the last entry at {}",
            first.index,
            snapshot_index,
            self.terms.last_index()
        );
        let term_before = match &self.snapshot {
            Some(s) if s.meta.index == first.index - 1 => Some(s.meta.term),
            _ => self.terms.term_at(first.index - 1),
        };
        if let Some(term_before) = term_before {
            assert!(
                first.term >= term_before,
                "entry {} has term {} below the term {term_before} before it",
                first.index,
                first.term
            );
        }
        for (position, entry) in entries.iter().enumerate() {
            if position > 0 {
                let previous = &entries[position - 1];
                assert_eq!(
                    entry.index,
                    previous.index + 1,
                    "entries must be contiguous"
                );
                assert!(entry.term >= previous.term, "entry terms must not decrease");
            }
            assert!(
                entry.term <= current_term,
                "entry {} has term {} above the current term {current_term}",
                entry.index,
                entry.term
            );
            if entry.data.len() > record::MAX_ENTRY_DATA_BYTES {
                return Err(StorageError::EntryTooLarge {
                    index: entry.index,
                    data_bytes: entry.data.len(),
                    max_bytes: record::MAX_ENTRY_DATA_BYTES,
                });
            }
        }
        Ok(())
    }

    fn active_size_bytes(&self) -> u64 {
        self.segments.back().expect("an active segment").size_bytes
    }

    /// Writes the buffer to the active segment in one `write_all`, and preallocates more of
    /// the segment once the write went past what was preallocated.
    fn write_buffer(&mut self) -> Result<(), StorageError> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let active = self.segments.back_mut().expect("an active segment");
        let end_bytes = active.size_bytes + self.buffer.len() as u64;
        let zeroes_bytes = if end_bytes > active.file_bytes {
            let room_bytes = self.options.segment_bytes.saturating_sub(end_bytes);
            self.options.preallocate_bytes.min(room_bytes)
        } else {
            0
        };
        let result = self.active.write_all(&self.buffer).and_then(|()| {
            if zeroes_bytes > 0 && self.active.write_zeroes_at(end_bytes, zeroes_bytes)? {
                active.file_bytes = end_bytes + zeroes_bytes;
            }
            Ok(())
        });
        let result = result.map_err(StorageError::io("write", &active.path));
        self.active_unsynced = true;
        active.size_bytes = end_bytes;
        active.file_bytes = active.file_bytes.max(end_bytes);
        crate::metrics::WAL_WRITTEN_BYTES.inc_by(self.buffer.len() as u64);
        if self.buffer.capacity() > RETAINED_BUFFER_BYTES {
            self.buffer = Vec::new();
        }
        self.stop_on_error(result)
    }

    /// Writes the head of a fresh segment: the current hard state, and a
    /// reset record if the log was replaced by the snapshot `reset`.
    fn write_segment_head(&mut self, reset: Option<SnapshotMeta>) -> Result<(), StorageError> {
        assert_eq!(self.active_size_bytes(), 0, "a head starts a segment");
        self.buffer.clear();
        record::encode_hard_state(&mut self.buffer, &self.hard_state);
        if let Some(meta) = reset {
            record::encode_reset(&mut self.buffer, &meta);
        }
        self.write_buffer()
    }

    /// Closes the active segment and starts the next one. The old segment is
    /// made durable first, so that only the last segment can ever be torn.
    fn roll_segment(&mut self) -> Result<(), StorageError> {
        if self.active_unsynced {
            self.sync()?;
        }
        let closing = self.segments.back().expect("an active segment");
        if closing.file_bytes > closing.size_bytes {
            // Its preallocated zeroes go before the next segment exists: only the last
            // segment may end in zeroes (`scan_segment`).
            let size_bytes = closing.size_bytes;
            let result = self
                .fs
                .truncate_durably(&closing.path, size_bytes)
                .map_err(StorageError::io("truncate", &closing.path));
            self.stop_on_error(result)?;
            self.segments
                .back_mut()
                .expect("an active segment")
                .file_bytes = size_bytes;
        }
        let next_seq = self.segments.back().expect("an active segment").seq + 1;
        let result = create_segment(&*self.fs, &self.dir, next_seq);
        let (file, info) = self.stop_on_error(result)?;
        self.active = file;
        self.segments.push_back(info);
        self.dir_unsynced = true;
        Ok(())
    }

    /// Deletes the oldest segments while all their entries are `<= index`.
    /// Only a prefix is deleted, and the directory is fsynced after each
    /// deletion: recovery treats a hole in the sequence as a lost file, and
    /// without the fsync a crash could persist the deletions in any order.
    fn delete_covered_segments(&mut self, index: u64) -> Result<(), StorageError> {
        while self.segments.len() > 1 && self.segments[0].max_entry_index <= index {
            let oldest = self.segments.pop_front().expect("checked non-empty");
            let result = self
                .fs
                .remove_file(&oldest.path)
                .map_err(StorageError::io("delete", &oldest.path))
                .and_then(|()| {
                    self.fs
                        .sync_dir(&self.dir)
                        .map_err(StorageError::io("fsync directory", &self.dir))
                });
            self.stop_on_error(result)?;
        }
        Ok(())
    }

    /// Removes what a crash or an interrupted `save_snapshot` left behind:
    /// temporary snapshot files and snapshot files older than the newest.
    fn remove_stale_files(&mut self, listing: &Listing) -> Result<(), StorageError> {
        let newest = listing.snapshots.last();
        let older = listing.snapshots.iter().filter(|m| Some(*m) != newest);
        let mut paths: Vec<PathBuf> = older
            .map(|meta| self.dir.join(snapshot::snapshot_file_name(meta)))
            .collect();
        paths.extend(listing.temp_files.iter().map(|name| self.dir.join(name)));
        if paths.is_empty() {
            return Ok(());
        }
        for path in &paths {
            log::info!("removing stale file {}", path.display());
            let result = self
                .fs
                .remove_file(path)
                .map_err(StorageError::io("delete", path));
            self.stop_on_error(result)?;
        }
        self.sync_dir()
    }
}

/// Marks every entry in `segments` as void (after a reset record), so that
/// no entry of theirs keeps them from being deleted.
fn void_entries_of(segments: &mut VecDeque<SegmentInfo>) {
    for segment in segments {
        segment.max_entry_index = 0;
    }
}

/// Asserts that a hard state may follow another: terms never decrease, and a
/// vote once cast is not changed within its term.
fn check_hard_state_step(previous: &HardState, next: &HardState) {
    assert!(
        next.term >= previous.term,
        "hard state term goes back from {} to {}",
        previous.term,
        next.term
    );
    if next.term == previous.term && previous.vote != 0 {
        assert_eq!(
            next.vote, previous.vote,
            "vote changed within term {}",
            next.term
        );
    }
}

/// What the data directory holds, by kind, sorted.
#[derive(Debug, Default)]
struct Listing {
    segment_seqs: Vec<u64>,
    /// Sorted by index, then term; the last one is the newest.
    snapshots: Vec<SnapshotMeta>,
    temp_files: Vec<String>,
}

fn list_dir(fs: &dyn FileSystem, dir: &Path) -> Result<Listing, StorageError> {
    let mut listing = Listing::default();
    let names = fs
        .list_dir(dir)
        .map_err(StorageError::io("list directory", dir))?;
    for name in &names {
        let name = name.as_str();
        if let Some(seq) = parse_segment_file_name(name) {
            listing.segment_seqs.push(seq);
        } else if let Some(meta) = parse_snapshot_file_name(name) {
            listing.snapshots.push(meta);
        } else if name.starts_with("snap-") && name.ends_with(TEMP_SUFFIX) {
            listing.temp_files.push(name.to_string());
        } else if !DirLock::is_lock_file(name) {
            log::debug!("{}: ignoring unknown file {name}", dir.display());
        }
    }
    listing.segment_seqs.sort_unstable();
    listing
        .snapshots
        .sort_unstable_by_key(|m| (m.index, m.term));
    Ok(listing)
}

/// Fails if a segment is missing: a hole in the sequence numbers, or no WAL
/// at all next to a snapshot (the WAL holds the hard state, so it is never
/// deleted entirely).
fn check_segment_sequence(
    dir: &Path,
    seqs: &[u64],
    has_snapshot: bool,
) -> Result<(), StorageError> {
    if seqs.is_empty() && has_snapshot {
        return Err(StorageError::Missing {
            path: dir.join("wal-*.log"),
            reason: "the directory has a snapshot but no WAL segment".to_string(),
        });
    }
    for pair in seqs.windows(2) {
        if pair[1] != pair[0] + 1 {
            return Err(StorageError::Missing {
                path: dir.join(segment_file_name(pair[0] + 1)),
                reason: format!(
                    "WAL segments jump from {} to {}",
                    segment_file_name(pair[0]),
                    segment_file_name(pair[1])
                ),
            });
        }
    }
    Ok(())
}

/// Creates the empty segment `seq`. The caller fsyncs the directory.
fn create_segment(
    fs: &dyn FileSystem,
    dir: &Path,
    seq: u64,
) -> Result<(Box<dyn WriteFile>, SegmentInfo), StorageError> {
    let path = dir.join(segment_file_name(seq));
    let file = fs
        .create_new(&path)
        .map_err(StorageError::io("create", &path))?;
    let info = SegmentInfo {
        seq,
        path,
        size_bytes: 0,
        file_bytes: 0,
        max_entry_index: 0,
    };
    Ok((file, info))
}
