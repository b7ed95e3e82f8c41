//! The leader's view of one follower's replication, after etcd's
//! `tracker/progress.go`. A follower is in one of three states:
//!
//! - `Probe`: the leader does not know where the logs match. It sends one
//!   AppendEntries and waits for the answer (or the next heartbeat).
//! - `Replicate`: the logs match up to `match_index`; the leader streams
//!   AppendEntries without waiting, at most `max_inflight` at a time.
//! - `Snapshot`: the follower needs entries the leader has compacted; the
//!   leader streams the snapshot in chunks, one in flight at a time.
//!
//! Invariant: `match_index < next_index`.

use std::collections::VecDeque;
use std::sync::Arc;

use super::membership::Membership;
use super::types::SnapshotMeta;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgressState {
    Probe,
    Replicate,
    Snapshot,
}

/// A snapshot being streamed to one follower.
#[derive(Clone, Debug)]
pub struct SnapshotSend {
    pub meta: SnapshotMeta,
    pub membership: Membership,
    /// The bytes the core sends itself; `None` when the driver streams the snapshot.
    pub data: Option<Arc<Vec<u8>>>,
    /// Where the next chunk starts: everything before it has been acknowledged.
    pub offset: u64,
}

#[derive(Clone, Debug)]
pub struct Progress {
    pub match_index: u64,
    pub next_index: u64,
    pub state: ProgressState,
    /// In `Probe` and `Snapshot`: a message is out and unanswered, so the
    /// leader waits. Cleared by any answer and by every heartbeat interval, so
    /// a lost message is sent again.
    pub paused: bool,
    /// In `Replicate`: the last index of each AppendEntries in flight, oldest first.
    inflight: VecDeque<u64>,
    max_inflight: usize,
    /// Whether the follower answered anything since the last check-quorum round.
    pub recent_active: bool,
    /// The highest read context (ReadIndex round) the follower acknowledged.
    pub read_ack: u64,
    pub snapshot: Option<SnapshotSend>,
    /// Set when a streamed snapshot was installed: the follower now catches up from the log
    /// after it, which the leader keeps for it (see `RaftCore::compaction_floor`) until the
    /// follower reaches the commit index or needs another snapshot.
    pub catching_up: bool,
}

impl Progress {
    pub fn new(next_index: u64, max_inflight: usize) -> Progress {
        assert!(max_inflight > 0);
        Progress {
            match_index: 0,
            next_index,
            state: ProgressState::Probe,
            paused: false,
            inflight: VecDeque::with_capacity(max_inflight),
            max_inflight,
            recent_active: false,
            read_ack: 0,
            snapshot: None,
            catching_up: false,
        }
    }

    /// Whether the leader must hold back AppendEntries to this follower now.
    pub fn is_paused(&self) -> bool {
        match self.state {
            ProgressState::Probe => self.paused,
            ProgressState::Replicate => self.inflight.len() >= self.max_inflight,
            ProgressState::Snapshot => true,
        }
    }

    pub fn become_probe(&mut self) {
        // After a snapshot, the follower holds at least the snapshot's index.
        if let Some(send) = self.snapshot.take() {
            self.next_index = self.next_index.max(send.meta.index + 1);
        }
        self.state = ProgressState::Probe;
        self.paused = false;
        self.inflight.clear();
        // `next_index` stays the leader's best guess: it is already past
        // `match_index` (the invariant), so the probe resumes where it was.
        self.assert_invariants();
    }

    pub fn become_replicate(&mut self) {
        self.snapshot = None;
        self.state = ProgressState::Replicate;
        self.next_index = self.match_index + 1;
        self.paused = false;
        self.inflight.clear();
    }

    pub fn become_snapshot(&mut self, send: SnapshotSend) {
        self.catching_up = false;
        self.state = ProgressState::Snapshot;
        self.snapshot = Some(send);
        self.paused = false;
        self.inflight.clear();
    }

    /// Records an AppendEntries that carried entries up to `last_index`.
    pub fn sent_append(&mut self, last_index: u64) {
        match self.state {
            ProgressState::Replicate => {
                if last_index >= self.next_index {
                    self.next_index = last_index + 1;
                    self.inflight.push_back(last_index);
                }
            }
            ProgressState::Probe => self.paused = true,
            ProgressState::Snapshot => unreachable!("no appends while sending a snapshot"),
        }
    }

    /// A success answer: the follower's log matches up to `index`. Returns
    /// whether `match_index` moved.
    pub fn update_match(&mut self, index: u64) -> bool {
        let moved = index > self.match_index;
        if moved {
            self.match_index = index;
            self.paused = false;
        }
        self.next_index = self.next_index.max(index + 1);
        while self.inflight.front().is_some_and(|&last| last <= index) {
            self.inflight.pop_front();
        }
        moved
    }

    /// A rejection of the AppendEntries whose previous index was `rejected`,
    /// with the follower's hint of where to retry. Returns false when the
    /// rejection is stale (an answer to an older message than the last one
    /// that mattered) and was ignored.
    pub fn maybe_back_off(&mut self, rejected: u64, retry_at: u64) -> bool {
        match self.state {
            ProgressState::Replicate => {
                // A reject for an index we already know matches is stale.
                if rejected <= self.match_index {
                    return false;
                }
                self.become_probe();
                self.next_index = retry_at.clamp(self.match_index + 1, self.next_index);
                true
            }
            ProgressState::Probe => {
                // Only the answer to the probe we sent last counts.
                if self.next_index == 0 || rejected != self.next_index - 1 {
                    return false;
                }
                self.next_index = retry_at.clamp(self.match_index + 1, self.next_index.max(1));
                self.paused = false;
                true
            }
            ProgressState::Snapshot => false,
        }
    }

    /// A heartbeat answer frees one in-flight slot, so a window whose
    /// messages were all lost does not stall replication forever.
    pub fn free_one_inflight(&mut self) {
        if self.state == ProgressState::Replicate && self.inflight.len() >= self.max_inflight {
            self.inflight.pop_front();
        }
    }

    pub fn assert_invariants(&self) {
        assert!(
            self.match_index < self.next_index,
            "progress: match {} >= next {}",
            self.match_index,
            self.next_index
        );
        assert!(self.inflight.len() <= self.max_inflight);
    }
}

#[cfg(test)]
mod tests {
    //! The follower's flow control, step by step, after etcd's
    //! `tracker/progress_test.go`: each rule of this file changes how many
    //! AppendEntries a leader sends or when, which the simulation's safety
    //! checks cannot see (a follower checks every append against its log).
    use super::*;

    const WINDOW: usize = 3;

    fn replicating(match_index: u64) -> Progress {
        let mut progress = Progress::new(match_index + 1, WINDOW);
        progress.match_index = match_index;
        progress.become_replicate();
        progress
    }

    fn snapshot_send(index: u64) -> SnapshotSend {
        SnapshotSend {
            meta: SnapshotMeta { index, term: 1 },
            membership: Membership::default(),
            data: None,
            offset: 0,
        }
    }

    #[test]
    fn a_probe_waits_for_its_answer_after_one_append() {
        let mut progress = Progress::new(5, WINDOW);
        assert!(!progress.is_paused(), "a fresh probe may send");
        progress.sent_append(7);
        assert!(progress.is_paused(), "a probe sends one append and waits");
        assert_eq!(
            progress.next_index, 5,
            "a probe does not advance next on send"
        );
        assert!(progress.update_match(7));
        assert!(!progress.is_paused(), "an answer lets the probe send again");
    }

    #[test]
    fn replication_pauses_when_the_window_is_full_and_a_match_frees_it() {
        let mut progress = replicating(4);
        for last in [5, 10, 15] {
            assert!(!progress.is_paused(), "window not yet full before {last}");
            progress.sent_append(last);
            assert_eq!(progress.next_index, last + 1, "next follows what was sent");
        }
        assert!(
            progress.is_paused(),
            "{WINDOW} appends in flight fill the window"
        );
        // An acknowledgement up to 10 frees the two appends it covers, not the third.
        assert!(progress.update_match(10));
        assert_eq!(progress.inflight.len(), 1, "appends up to 10 are answered");
        assert!(!progress.is_paused());
        assert_eq!(progress.next_index, 16, "a match never moves next back");
    }

    #[test]
    fn an_empty_append_takes_no_slot_of_the_window() {
        let mut progress = replicating(4);
        progress.sent_append(4);
        assert_eq!(
            progress.inflight.len(),
            0,
            "a heartbeat-like append carries nothing new"
        );
        assert_eq!(progress.next_index, 5);
    }

    #[test]
    fn a_snapshot_in_flight_pauses_appends() {
        let mut progress = replicating(4);
        progress.become_snapshot(snapshot_send(100));
        assert!(progress.is_paused(), "no appends while a snapshot is sent");
    }

    #[test]
    fn after_a_snapshot_the_probe_starts_past_it() {
        let mut progress = Progress::new(5, WINDOW);
        progress.become_snapshot(snapshot_send(10));
        progress.become_probe();
        assert_eq!(
            progress.next_index, 11,
            "the follower holds the snapshot's index"
        );
        assert!(progress.snapshot.is_none());
        assert!(!progress.is_paused());
    }

    #[test]
    fn a_repeated_match_is_not_progress_and_does_not_unpause_a_probe() {
        let mut progress = Progress::new(8, WINDOW);
        assert!(progress.update_match(7));
        progress.sent_append(9);
        assert!(progress.is_paused());
        assert!(
            !progress.update_match(7),
            "the same match again is not news"
        );
        assert!(
            progress.is_paused(),
            "a duplicate answer does not release the probe"
        );
    }

    #[test]
    fn a_match_past_next_moves_next_after_it() {
        let mut progress = Progress::new(3, WINDOW);
        assert!(progress.update_match(10));
        assert_eq!(progress.match_index, 10);
        assert_eq!(progress.next_index, 11);
    }

    #[test]
    fn a_probe_ignores_a_rejection_of_an_older_probe() {
        let mut progress = Progress::new(10, WINDOW);
        progress.sent_append(12);
        assert!(
            !progress.maybe_back_off(5, 3),
            "only the answer to prev 9 counts"
        );
        assert_eq!(progress.next_index, 10);
        assert!(
            progress.is_paused(),
            "a stale rejection does not release the probe"
        );
        assert!(progress.maybe_back_off(9, 7));
        assert_eq!(progress.next_index, 7);
        assert!(!progress.is_paused());
    }

    #[test]
    fn a_backed_off_probe_never_goes_below_the_match() {
        let mut progress = Progress::new(10, WINDOW);
        progress.match_index = 5;
        assert!(
            progress.maybe_back_off(9, 2),
            "the hint points below what matches"
        );
        assert_eq!(progress.next_index, 6, "retry right after the match");
        progress.assert_invariants();
    }

    #[test]
    fn a_rejection_in_replicate_falls_back_to_a_probe_at_the_hint() {
        let mut progress = replicating(4);
        progress.sent_append(10);
        assert!(
            !progress.maybe_back_off(3, 2),
            "a reject below the match is stale"
        );
        assert_eq!(progress.state, ProgressState::Replicate);
        assert!(progress.maybe_back_off(7, 6));
        assert_eq!(progress.state, ProgressState::Probe);
        assert_eq!(progress.next_index, 6);
    }

    #[test]
    fn a_heartbeat_answer_frees_a_slot_only_of_a_full_window() {
        let mut progress = replicating(4);
        progress.sent_append(5);
        progress.sent_append(6);
        progress.free_one_inflight();
        assert_eq!(
            progress.inflight.len(),
            2,
            "a window with room keeps its bookkeeping"
        );
        progress.sent_append(7);
        assert!(progress.is_paused());
        progress.free_one_inflight();
        assert_eq!(
            progress.inflight.len(),
            2,
            "a full window gives one slot back"
        );
        assert!(!progress.is_paused());
    }

    #[test]
    #[should_panic(expected = "progress: match 5 >= next 5")]
    fn the_invariant_check_catches_next_at_or_below_the_match() {
        let mut progress = Progress::new(5, WINDOW);
        progress.match_index = 5;
        progress.assert_invariants();
    }
}
