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
        self.next_index = self.next_index.max(self.match_index + 1);
        self.paused = false;
        self.inflight.clear();
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
