//! The in-memory Raft log: the entries after the last snapshot, and the three
//! indexes that move along it. The driver keeps the durable copy (the WAL);
//! this one is what the core reasons about.
//!
//! Invariants (checked by `assert_invariants`):
//! - `entries[k].index == snapshot.index + 1 + k`: the log is contiguous.
//! - entry terms never decrease along the log, and none is below `snapshot.term`.
//! - `snapshot.index <= applied <= commit <= last_index()`.
//! - `stable <= last_index()`: entries above `stable` are not yet durable.

use std::collections::VecDeque;

use super::types::{Entry, SnapshotMeta};

pub struct RaftLog {
    /// The entry the log starts after: index and term of the last entry the
    /// snapshot covers (0, 0 before any snapshot).
    snapshot: SnapshotMeta,
    entries: VecDeque<Entry>,
    /// The highest index known to be committed. Never decreases.
    pub commit: u64,
    /// The highest index handed to the application.
    pub applied: u64,
    /// The highest index the driver has made durable.
    pub stable: u64,
    /// The sum of `Entry::size_bytes` over `entries`.
    bytes: u64,
    /// The same sum over the entries at or below `commit`, so the bytes a
    /// leader holds uncommitted are known without walking the log.
    committed_bytes: u64,
}

impl RaftLog {
    /// A log restored from durable state: `entries` must follow `snapshot` contiguously.
    pub fn restore(snapshot: SnapshotMeta, entries: Vec<Entry>, commit: u64) -> RaftLog {
        let mut log = RaftLog {
            snapshot,
            entries: VecDeque::with_capacity(entries.len()),
            commit: 0,
            applied: snapshot.index,
            stable: 0,
            bytes: 0,
            committed_bytes: 0,
        };
        for entry in entries {
            assert_eq!(
                entry.index,
                log.last_index() + 1,
                "restored log is not contiguous"
            );
            log.push(entry);
        }
        log.stable = log.last_index();
        // A commit index beyond the durable log can only come from a hard
        // state written before a crash cut the log; it is recomputed later.
        log.commit = snapshot.index;
        log.commit_to(commit);
        log.assert_invariants();
        log
    }

    pub fn snapshot_meta(&self) -> SnapshotMeta {
        self.snapshot
    }

    pub fn first_index(&self) -> u64 {
        self.snapshot.index + 1
    }

    pub fn last_index(&self) -> u64 {
        self.snapshot.index + self.entries.len() as u64
    }

    pub fn last_term(&self) -> u64 {
        self.entries.back().map_or(self.snapshot.term, |e| e.term)
    }

    pub fn size_bytes(&self) -> u64 {
        self.bytes
    }

    /// The bytes of the entries above the commit index.
    pub fn uncommitted_bytes(&self) -> u64 {
        self.bytes - self.committed_bytes
    }

    /// The term of the entry at `index`, if the log still knows it (the
    /// snapshot's own index counts).
    pub fn term(&self, index: u64) -> Option<u64> {
        if index == self.snapshot.index {
            return Some(self.snapshot.term);
        }
        self.entry(index).map(|e| e.term)
    }

    pub fn entry(&self, index: u64) -> Option<&Entry> {
        if index <= self.snapshot.index {
            return None;
        }
        self.entries.get((index - self.snapshot.index - 1) as usize)
    }

    pub fn match_term(&self, index: u64, term: u64) -> bool {
        self.term(index) == Some(term)
    }

    /// Raft §5.4.1: a candidate's log is at least as up to date as ours when
    /// its last term is higher, or equal with an index at least as high.
    pub fn is_up_to_date(&self, last_index: u64, last_term: u64) -> bool {
        last_term > self.last_term()
            || (last_term == self.last_term() && last_index >= self.last_index())
    }

    /// Entries in `[low, high]`, at most `max_bytes` of them but always at
    /// least one when the range is not empty (so progress is always possible).
    pub fn slice(&self, low: u64, high: u64, max_bytes: usize) -> Vec<Entry> {
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let mut index = low.max(self.first_index());
        while index <= high.min(self.last_index()) {
            let entry = self.entry(index).expect("index within the log");
            bytes += entry.size_bytes();
            if !out.is_empty() && bytes > max_bytes {
                break;
            }
            out.push(entry.clone());
            index += 1;
        }
        out
    }

    /// The entries the driver has not yet made durable.
    pub fn unstable_entries(&self) -> Vec<Entry> {
        self.slice(self.stable + 1, self.last_index(), usize::MAX)
    }

    pub fn append(&mut self, entry: Entry) {
        assert_eq!(entry.index, self.last_index() + 1, "append leaves a gap");
        assert!(entry.term >= self.last_term(), "append lowers the term");
        self.push(entry);
    }

    fn push(&mut self, entry: Entry) {
        self.bytes += entry.size_bytes() as u64;
        self.entries.push_back(entry);
    }

    /// Appends `entries` that follow `prev_index` (whose term already matched),
    /// skipping those we already hold and truncating at the first conflict.
    /// Returns false, changing nothing, when the conflict would remove a
    /// committed entry, or when the new entries' terms would be below the
    /// term of the entry they follow: either can only happen when some node
    /// broke Raft's rules, and the core refuses the message rather than lose
    /// data or break the log's invariants.
    pub fn append_after(&mut self, prev_index: u64, entries: &[Entry]) -> bool {
        let mut skip = 0;
        let mut conflict = None;
        for (k, entry) in entries.iter().enumerate() {
            let index = prev_index + 1 + k as u64;
            match self.term(index) {
                Some(term) if term == entry.term => skip = k + 1,
                Some(_) => {
                    conflict = Some(index);
                    break;
                }
                None => break,
            }
        }
        let Some(first_new) = entries.get(skip) else {
            return true;
        };
        if conflict.is_some_and(|index| index <= self.commit) {
            return false;
        }
        // The entry before the first new one stays; terms must not drop after it.
        match self.term(prev_index + skip as u64) {
            Some(term) if first_new.term >= term => {}
            _ => return false,
        }
        if let Some(index) = conflict {
            self.truncate_from(index);
        }
        for entry in &entries[skip..] {
            self.append(entry.clone());
        }
        true
    }

    /// Drops every entry at `index` and above. Never called below commit.
    fn truncate_from(&mut self, index: u64) {
        assert!(index > self.commit, "truncating committed entry {index}");
        assert!(index > self.snapshot.index);
        while self.last_index() >= index {
            let entry = self.entries.pop_back().expect("non-empty");
            self.bytes -= entry.size_bytes() as u64;
        }
        self.stable = self.stable.min(index - 1);
    }

    /// Forgets entries up to and including `index`, which the application's
    /// snapshot now covers.
    pub fn compact(&mut self, index: u64) {
        assert!(index <= self.applied, "compacting unapplied entry {index}");
        if index <= self.snapshot.index {
            return;
        }
        let term = self.term(index).expect("compact index within the log");
        while self.snapshot.index < index {
            let entry = self.entries.pop_front().expect("non-empty");
            self.bytes -= entry.size_bytes() as u64;
            self.committed_bytes -= entry.size_bytes() as u64;
            self.snapshot.index += 1;
        }
        self.snapshot.term = term;
        self.assert_invariants();
    }

    /// Replaces the whole log with a snapshot received from the leader:
    /// the caller has checked that the log does not hold the snapshot's last
    /// entry, so nothing after it can be trusted either.
    pub fn install_snapshot(&mut self, meta: SnapshotMeta) {
        assert!(meta.index > self.commit, "installing a stale snapshot");
        self.entries.clear();
        self.bytes = 0;
        self.committed_bytes = 0;
        self.snapshot = meta;
        self.commit = meta.index;
        self.applied = meta.index;
        self.stable = meta.index;
        self.assert_invariants();
    }

    /// Moves commit forward (never back) to at most the last index.
    pub fn commit_to(&mut self, index: u64) {
        let index = index.min(self.last_index());
        while self.commit < index {
            self.commit += 1;
            let bytes = self
                .entry(self.commit)
                .expect("committed entry in the log")
                .size_bytes();
            self.committed_bytes += bytes as u64;
        }
    }

    /// The largest index `i <= index` whose entry's term is at most `term`,
    /// with that term (etcd's `findConflictByTerm`). A follower answers a
    /// mismatched AppendEntries with this hint for the leader's
    /// `(prev_log_index, prev_log_term)`, and the leader looks up the hint in
    /// its own log the same way: together they skip whole runs of
    /// conflicting terms on both sides in one round trip. Below the log's
    /// first index the answer is the snapshot's index and term.
    pub fn find_conflict_by_term(&self, index: u64, term: u64) -> (u64, u64) {
        let mut i = index.min(self.last_index());
        while i > self.snapshot.index {
            let t = self.term(i).expect("index within the log");
            if t <= term {
                return (i, t);
            }
            i -= 1;
        }
        (self.snapshot.index, self.snapshot.term)
    }

    pub fn assert_invariants(&self) {
        let mut prev_term = self.snapshot.term;
        for (k, entry) in self.entries.iter().enumerate() {
            assert_eq!(
                entry.index,
                self.snapshot.index + 1 + k as u64,
                "log not contiguous"
            );
            assert!(
                entry.term >= prev_term,
                "log terms decrease at {}",
                entry.index
            );
            prev_term = entry.term;
        }
        assert!(
            self.snapshot.index <= self.applied,
            "applied below the snapshot"
        );
        assert!(self.applied <= self.commit, "applied beyond commit");
        assert!(self.commit <= self.last_index(), "commit beyond the log");
        assert!(self.stable <= self.last_index(), "stable beyond the log");
        assert!(
            self.committed_bytes <= self.bytes,
            "committed bytes beyond the log's"
        );
    }
}

#[cfg(test)]
mod tests {
    //! The log's bookkeeping on its own, after etcd's `log_test.go`: the
    //! indexes around a snapshot, slicing within a byte budget, appending
    //! over a conflict, compaction and the byte counts that bound a leader's
    //! memory. The simulation exercises all of it, but through whole
    //! clusters, where an index off by one often only costs a round trip.
    use super::*;
    use crate::raft::types::EntryKind;

    /// An entry of `data_bytes` bytes (each entry costs `data_bytes + 24`).
    fn entry(index: u64, term: u64, data_bytes: usize) -> Entry {
        Entry {
            term,
            index,
            kind: EntryKind::Normal,
            data: vec![b'x'; data_bytes],
        }
    }

    /// A log after snapshot (5, 2) holding 6..=8 with terms 2, 3, 3, 10 bytes each.
    fn log_after_a_snapshot(commit: u64) -> RaftLog {
        let entries = vec![entry(6, 2, 10), entry(7, 3, 10), entry(8, 3, 10)];
        RaftLog::restore(SnapshotMeta { index: 5, term: 2 }, entries, commit)
    }

    #[test]
    fn the_indexes_start_after_the_snapshot() {
        let log = log_after_a_snapshot(7);
        assert_eq!(log.first_index(), 6);
        assert_eq!(log.last_index(), 8);
        assert_eq!(log.last_term(), 3);
        assert_eq!((log.commit, log.applied, log.stable), (7, 5, 8));
        assert_eq!(
            log.term(5),
            Some(2),
            "the snapshot's own index keeps its term"
        );
        assert_eq!(log.term(4), None, "below the snapshot nothing is known");
        assert_eq!(log.term(9), None);
        assert!(log.entry(5).is_none(), "the snapshot's entry is gone");
        assert_eq!(log.entry(6).map(|e| e.index), Some(6));
        assert_eq!(log.entry(8).map(|e| e.term), Some(3));
        assert!(log.match_term(7, 3) && !log.match_term(7, 2));
        assert_eq!(log.size_bytes(), 3 * 34);
        assert_eq!(
            log.uncommitted_bytes(),
            34,
            "only entry 8 is above commit 7"
        );
    }

    #[test]
    fn a_restored_commit_beyond_the_log_is_cut_to_its_end() {
        let log = log_after_a_snapshot(100);
        assert_eq!(log.commit, 8);
        assert_eq!(log.uncommitted_bytes(), 0);
        let empty = RaftLog::restore(SnapshotMeta { index: 5, term: 2 }, Vec::new(), 9);
        assert_eq!(
            (empty.first_index(), empty.last_index(), empty.commit),
            (6, 5, 5)
        );
        assert_eq!(
            empty.last_term(),
            2,
            "an empty log's last term is the snapshot's"
        );
    }

    #[test]
    fn a_slice_keeps_to_the_log_and_the_byte_budget_but_always_moves() {
        let log = log_after_a_snapshot(8);
        let indexes = |entries: Vec<Entry>| entries.iter().map(|e| e.index).collect::<Vec<_>>();
        assert_eq!(indexes(log.slice(1, 100, usize::MAX)), vec![6, 7, 8]);
        assert_eq!(indexes(log.slice(7, 7, usize::MAX)), vec![7]);
        assert_eq!(
            indexes(log.slice(6, 8, 68)),
            vec![6, 7],
            "two entries fit in 68 bytes"
        );
        assert_eq!(
            indexes(log.slice(6, 8, 67)),
            vec![6],
            "one byte short of two entries"
        );
        assert_eq!(indexes(log.slice(6, 8, 1)), vec![6], "at least one entry");
        assert!(log.slice(9, 20, usize::MAX).is_empty());
    }

    #[test]
    fn unstable_entries_are_those_above_stable() {
        let mut log = log_after_a_snapshot(8);
        assert!(log.unstable_entries().is_empty());
        log.append(entry(9, 3, 0));
        log.append(entry(10, 4, 0));
        let unstable: Vec<u64> = log.unstable_entries().iter().map(|e| e.index).collect();
        assert_eq!(unstable, vec![9, 10]);
    }

    #[test]
    fn append_after_skips_what_it_holds_and_replaces_a_conflicting_tail() {
        let mut log = log_after_a_snapshot(6);
        // 7 and 8 match: nothing changes, and no bytes are counted twice.
        assert!(log.append_after(6, &[entry(7, 3, 10), entry(8, 3, 10)]));
        assert_eq!((log.last_index(), log.size_bytes()), (8, 3 * 34));
        // 8 conflicts (term 4 against 3): it is dropped and replaced, with 9 after it.
        assert!(log.append_after(7, &[entry(8, 4, 0), entry(9, 4, 0)]));
        assert_eq!((log.last_index(), log.last_term()), (9, 4));
        assert_eq!(log.term(8), Some(4));
        assert_eq!(log.size_bytes(), 2 * 34 + 2 * 24);
        assert_eq!(log.stable, 7, "the replaced entry is no longer durable");
        // Nothing new: accepted without change.
        assert!(log.append_after(7, &[entry(8, 4, 0)]));
        assert_eq!(log.last_index(), 9);
    }

    #[test]
    fn append_after_refuses_to_replace_a_committed_entry_or_lower_a_term() {
        let mut log = log_after_a_snapshot(7);
        assert!(!log.append_after(6, &[entry(7, 4, 0)]), "7 is committed");
        assert_eq!(log.term(7), Some(3), "a refusal changes nothing");
        assert!(
            !log.append_after(8, &[entry(9, 2, 0)]),
            "term 2 after term 3"
        );
        assert_eq!(log.last_index(), 8);
    }

    #[test]
    fn compaction_moves_the_start_and_keeps_the_term_of_the_last_entry_dropped() {
        let mut log = log_after_a_snapshot(8);
        log.applied = 7;
        log.compact(7);
        assert_eq!(log.snapshot_meta(), SnapshotMeta { index: 7, term: 3 });
        assert_eq!((log.first_index(), log.last_index()), (8, 8));
        assert_eq!(log.size_bytes(), 34);
        assert_eq!(log.uncommitted_bytes(), 0);
        log.compact(6);
        assert_eq!(
            log.first_index(),
            8,
            "compacting below the snapshot does nothing"
        );
    }

    #[test]
    #[should_panic(expected = "compacting unapplied entry 8")]
    fn compaction_never_drops_an_unapplied_entry() {
        let mut log = log_after_a_snapshot(8);
        log.applied = 7;
        log.compact(8);
    }

    #[test]
    fn an_installed_snapshot_replaces_the_whole_log() {
        let mut log = log_after_a_snapshot(6);
        log.install_snapshot(SnapshotMeta { index: 20, term: 5 });
        assert_eq!(
            (log.first_index(), log.last_index(), log.last_term()),
            (21, 20, 5)
        );
        assert_eq!((log.commit, log.applied, log.stable), (20, 20, 20));
        assert_eq!((log.size_bytes(), log.uncommitted_bytes()), (0, 0));
    }

    #[test]
    fn commit_never_moves_back_nor_past_the_log() {
        let mut log = log_after_a_snapshot(6);
        log.commit_to(5);
        assert_eq!(log.commit, 6);
        log.commit_to(7);
        assert_eq!((log.commit, log.uncommitted_bytes()), (7, 34));
        log.commit_to(50);
        assert_eq!((log.commit, log.uncommitted_bytes()), (8, 0));
    }

    #[test]
    fn the_conflict_hint_skips_a_whole_run_of_terms() {
        // Terms: snapshot (5, 2), then 6:2 7:3 8:3 9:5 10:5.
        let mut log = log_after_a_snapshot(8);
        log.append(entry(9, 5, 0));
        log.append(entry(10, 5, 0));
        assert_eq!(
            log.find_conflict_by_term(10, 4),
            (8, 3),
            "past the run of term 5"
        );
        assert_eq!(log.find_conflict_by_term(10, 5), (10, 5));
        assert_eq!(
            log.find_conflict_by_term(30, 5),
            (10, 5),
            "capped at the last index"
        );
        assert_eq!(log.find_conflict_by_term(8, 2), (6, 2));
        assert_eq!(
            log.find_conflict_by_term(8, 1),
            (5, 2),
            "below the log: the snapshot"
        );
    }

    #[test]
    fn a_candidate_is_up_to_date_by_last_term_then_last_index() {
        let log = log_after_a_snapshot(8); // last (8, 3)
        assert!(
            log.is_up_to_date(1, 4),
            "a higher last term wins at any index"
        );
        assert!(log.is_up_to_date(8, 3), "the same last entry is up to date");
        assert!(log.is_up_to_date(9, 3));
        assert!(
            !log.is_up_to_date(7, 3),
            "a shorter log of the same term is not"
        );
        assert!(
            !log.is_up_to_date(100, 2),
            "a lower last term loses at any index"
        );
    }

    #[test]
    #[should_panic(expected = "commit beyond the log")]
    fn the_invariant_check_catches_a_commit_beyond_the_log() {
        let mut log = log_after_a_snapshot(8);
        log.commit = 9;
        log.assert_invariants();
    }
}
