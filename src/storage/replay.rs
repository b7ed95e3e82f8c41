//! Rebuilding the durable state from the WAL at open time. Records are
//! applied in the order they were written:
//!
//! - the latest hard state wins (and terms never go backwards);
//! - an entry run starting at index `i` drops every entry at `>= i` first;
//! - a reset record voids every entry before it.
//!
//! At the end the entries covered by the snapshot are dropped, and what is
//! left must start right after the snapshot: a hole there means a segment is
//! missing, and opening stops rather than hand Raft a log with a gap.

use std::path::{Path, PathBuf};

use super::error::StorageError;
use super::record::Record;
use crate::raft::{Entry, HardState, SnapshotMeta};

/// Where a record was read from, for error messages.
#[derive(Clone, Debug)]
pub(crate) struct Origin {
    pub path: PathBuf,
    pub offset: u64,
}

/// The replay's state between records.
pub(crate) struct Replay {
    hard_state: HardState,
    /// Contiguous entries; may still include some the snapshot covers.
    entries: Vec<Entry>,
    /// Where the record that supplied `entries[0]` was read.
    first_origin: Option<Origin>,
    /// After a reset record: the index the next entry must follow.
    reset_base: Option<u64>,
    snapshot: Option<SnapshotMeta>,
}

/// The result of a replay.
pub(crate) struct Replayed {
    pub hard_state: HardState,
    /// Contiguous, starting right after the snapshot.
    pub entries: Vec<Entry>,
    /// True when the stored entries conflicted with the snapshot, or ended
    /// before it, and were dropped without a reset record in the WAL (a crash
    /// between writing the snapshot file and logging the reset): the caller
    /// must log one now, or entries appended later would be dropped again, or
    /// follow the dropped ones with a gap, at the next open.
    pub needs_reset: bool,
}

impl Replay {
    pub(crate) fn new(snapshot: Option<SnapshotMeta>) -> Replay {
        Replay {
            hard_state: HardState::default(),
            entries: Vec::new(),
            first_origin: None,
            reset_base: None,
            snapshot,
        }
    }

    pub(crate) fn apply(&mut self, record: Record, origin: Origin) -> Result<(), StorageError> {
        match record {
            Record::HardState(hard_state) => self.apply_hard_state(hard_state, &origin),
            Record::Entries(entries) => self.apply_entries(entries, origin),
            Record::Reset(meta) => self.apply_reset(meta, &origin),
        }
    }

    fn apply_hard_state(&mut self, next: HardState, origin: &Origin) -> Result<(), StorageError> {
        let previous = self.hard_state;
        if next.term < previous.term {
            return Err(corrupt(
                origin,
                format!(
                    "hard state term {} is below the earlier term {}",
                    next.term, previous.term
                ),
            ));
        }
        let vote_changed = previous.vote != 0 && next.vote != previous.vote;
        if next.term == previous.term && vote_changed {
            return Err(corrupt(
                origin,
                format!(
                    "vote changes from {} to {} within term {}",
                    previous.vote, next.vote, next.term
                ),
            ));
        }
        self.hard_state = next;
        Ok(())
    }

    fn apply_entries(&mut self, run: Vec<Entry>, origin: Origin) -> Result<(), StorageError> {
        let first = run[0].index;
        let Some(stored_first) = self.entries.first().map(|e| e.index) else {
            if let Some(base) = self.reset_base {
                if first != base + 1 {
                    return Err(corrupt(
                        &origin,
                        format!("entry {first} follows a reset to the snapshot at index {base}"),
                    ));
                }
            }
            self.entries = run;
            self.first_origin = Some(origin);
            return Ok(());
        };
        let stored_last = stored_first + self.entries.len() as u64 - 1;
        if first > stored_last + 1 {
            return Err(corrupt(
                &origin,
                format!("entry {first} follows entry {stored_last}: entries are missing"),
            ));
        }
        if first <= stored_first {
            // Overwrites everything replayed so far (possible only for
            // entries that the snapshot covers, or in a log that never had
            // a snapshot and is overwritten from its first entry).
            self.entries = run;
            self.first_origin = Some(origin);
            return Ok(());
        }
        self.entries.truncate((first - stored_first) as usize);
        let before = self.entries.last().expect("kept at least one entry");
        if run[0].term < before.term {
            return Err(corrupt(
                &origin,
                format!(
                    "entry {first} has term {}, below the term {} of entry {}",
                    run[0].term, before.term, before.index
                ),
            ));
        }
        self.entries.extend(run);
        Ok(())
    }

    fn apply_reset(&mut self, meta: SnapshotMeta, origin: &Origin) -> Result<(), StorageError> {
        let snapshot_index = self.snapshot.map_or(0, |s| s.index);
        if meta.index > snapshot_index {
            return Err(corrupt(
                origin,
                format!(
                    "the log was reset to a snapshot at index {}, but the newest snapshot \
                     file is at index {snapshot_index}",
                    meta.index
                ),
            ));
        }
        self.entries.clear();
        self.first_origin = None;
        self.reset_base = Some(meta.index);
        Ok(())
    }

    /// Ends the replay: applies the snapshot and checks what is left.
    pub(crate) fn finish(mut self, dir: &Path) -> Result<Replayed, StorageError> {
        let mut needs_reset = false;
        let snapshot_index = match self.snapshot {
            None => 0,
            Some(meta) => {
                // Where the WAL says the next entry follows: its last entry,
                // or the latest reset if none follows it.
                let log_end = self.entries.last().map(|e| e.index).or(self.reset_base);
                match self.term_at(meta.index) {
                    Some(term) if term != meta.term => {
                        log::info!(
                            "{}: stored entries conflict with the snapshot at index {} \
                             (term {} there, snapshot term {}); dropping them",
                            dir.display(),
                            meta.index,
                            term,
                            meta.term
                        );
                        self.entries.clear();
                        needs_reset = true;
                    }
                    None if log_end.is_some_and(|end| end < meta.index) => {
                        // The log ends before the snapshot (one from the
                        // leader, and a crash before its reset record was
                        // logged). Every stored entry is covered, but the WAL
                        // must say so: entries appended after the snapshot
                        // would otherwise follow these (or an older reset)
                        // with a gap, and the next open would refuse the log
                        // as corrupt.
                        log::info!(
                            "{}: the log ends at index {}, before the snapshot at index {}; \
                             logging the reset that a crash prevented",
                            dir.display(),
                            log_end.unwrap_or(0),
                            meta.index
                        );
                        self.entries.clear();
                        needs_reset = true;
                    }
                    _ => {}
                }
                meta.index
            }
        };
        if let Some(first) = self.entries.first().map(|e| e.index) {
            if first > snapshot_index + 1 {
                let origin = self.first_origin.clone().expect("entries have an origin");
                return Err(corrupt(
                    &origin,
                    format!(
                        "the log starts at entry {first}, but the snapshot covers only up to \
                         index {snapshot_index}: entries {}..{} are missing",
                        snapshot_index + 1,
                        first - 1
                    ),
                ));
            }
            let covered = (snapshot_index + 1 - first) as usize;
            self.entries.drain(..covered.min(self.entries.len()));
        }
        if let Some(last) = self.entries.last() {
            if last.term > self.hard_state.term {
                let origin = self.first_origin.clone().expect("entries have an origin");
                return Err(corrupt(
                    &origin,
                    format!(
                        "entry {} has term {}, above the stored current term {}",
                        last.index, last.term, self.hard_state.term
                    ),
                ));
            }
        }
        Ok(Replayed {
            hard_state: self.hard_state,
            entries: self.entries,
            needs_reset,
        })
    }

    fn term_at(&self, index: u64) -> Option<u64> {
        let first = self.entries.first()?.index;
        let position = index.checked_sub(first)?;
        self.entries.get(position as usize).map(|e| e.term)
    }
}

fn corrupt(origin: &Origin, reason: String) -> StorageError {
    StorageError::corrupt(&origin.path, origin.offset, reason)
}
