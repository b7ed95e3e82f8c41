//! What the event loop reports about itself, beside its real work: the
//! counters of `metrics` that only it can see (leader changes, elections,
//! AppendEntries sizes, ReadIndex rounds, snapshots sent), the leader's view
//! of its followers for the HTTP endpoint, and the follower-lag warning.
//! Everything here is O(1) per event or per Ready (the follower view is
//! refreshed at most every [`FOLLOWERS_REFRESH_MS`]), so watching costs the
//! event loop nothing that grows with the load or the data.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::metrics::{self, warnings};
use crate::raft::{
    FollowerStatus, Message, MessageBody, NodeId, RaftCore, ReadState, Role, Status,
};

/// How often the leader's view of its followers is published.
const FOLLOWERS_REFRESH_MS: u64 = 100;
/// ReadIndex batches remembered at most; older ones are dropped uncounted
/// (their rounds were lost to a leader change).
const MAX_READ_BATCHES: usize = 4096;

pub(crate) struct Probes {
    id: NodeId,
    role: Role,
    term: u64,
    leader: NodeId,
    /// Batches of reads handed to the core: (highest token, when).
    read_batches: VecDeque<(u64, Instant)>,
    /// When the first chunk of the snapshot being sent to a follower left.
    snapshot_sends: HashMap<NodeId, Instant>,
    followers: Arc<Mutex<Vec<FollowerStatus>>>,
    followers_published: Instant,
}

impl Probes {
    pub fn new(status: &Status, followers: Arc<Mutex<Vec<FollowerStatus>>>) -> Probes {
        Probes {
            id: status.id,
            role: status.role,
            term: status.term,
            leader: status.leader,
            read_batches: VecDeque::new(),
            snapshot_sends: HashMap::new(),
            followers,
            followers_published: Instant::now(),
        }
    }

    /// Reads up to token `last_token` were handed to the core.
    pub fn reads_submitted(&mut self, last_token: u64) {
        if self.read_batches.len() >= MAX_READ_BATCHES {
            self.read_batches.pop_front();
        }
        self.read_batches.push_back((last_token, Instant::now()));
    }

    /// Reads whose barrier passed: each batch they complete was one round.
    pub fn reads_ready(&mut self, read_states: &[ReadState]) {
        let Some(last) = read_states.iter().map(|r| r.context).max() else {
            return;
        };
        while let Some(&(token, submitted)) = self.read_batches.front() {
            if token > last {
                break;
            }
            self.read_batches.pop_front();
            let elapsed = submitted.elapsed();
            metrics::READ_INDEX_DURATION.observe_duration(elapsed);
            warnings::read_index_took(self.id, elapsed);
        }
    }

    /// A message leaves for a peer.
    pub fn sent(&mut self, message: &Message) {
        match &message.body {
            MessageBody::AppendEntries { entries, .. } => {
                metrics::APPEND_ENTRIES_BATCH.observe(entries.len() as u64)
            }
            MessageBody::InstallSnapshot {
                offset, data, done, ..
            } => {
                metrics::SNAPSHOT_SENT_BYTES.inc_by(data.len() as u64);
                let now = Instant::now();
                if *offset == 0 {
                    self.snapshot_sends.insert(message.to, now);
                }
                if *done {
                    metrics::SNAPSHOTS_SENT.inc();
                    if let Some(started) = self.snapshot_sends.remove(&message.to) {
                        metrics::SNAPSHOT_SEND_DURATION.observe_duration(now - started);
                    }
                }
            }
            _ => {}
        }
    }

    /// Called after every cycle with the core's new status.
    pub fn cycle_done(&mut self, core: &RaftCore, status: &Status) {
        if status.leader != self.leader && status.leader != 0 {
            metrics::LEADER_CHANGES.inc();
        }
        if status.role == Role::Candidate
            && (self.role != Role::Candidate || status.term != self.term)
        {
            metrics::ELECTIONS_STARTED.inc();
        }
        if status.role != Role::Leader && self.role == Role::Leader {
            self.read_batches.clear();
            self.snapshot_sends.clear();
        }
        self.role = status.role;
        self.term = status.term;
        self.leader = status.leader;
        if self.followers_published.elapsed() >= Duration::from_millis(FOLLOWERS_REFRESH_MS) {
            self.followers_published = Instant::now();
            let followers = core.followers();
            check_lag(status, &followers);
            *self.followers.lock() = followers;
        }
    }
}

/// Warns of followers so far behind that the entries they miss outweigh
/// the snapshot threshold (bytes estimated from the log's mean entry size).
fn check_lag(status: &Status, followers: &[FollowerStatus]) {
    let threshold_bytes = warnings::snapshot_threshold_bytes();
    let entries_in_log = status
        .last_index
        .saturating_sub(status.snapshot_index)
        .max(1);
    for follower in followers {
        let lag_entries = status.last_index.saturating_sub(follower.match_index);
        let lag_bytes = (lag_entries as u128 * status.log_bytes as u128 / entries_in_log as u128)
            .min(u64::MAX as u128) as u64;
        // A follower just probed has match 0 until it answers: unknown, not behind.
        if follower.match_index == 0 && follower.state == "probe" {
            continue;
        }
        let needs_snapshot = follower.state == "snapshot";
        if threshold_bytes > 0 && (lag_bytes > threshold_bytes || needs_snapshot) {
            warnings::follower_lagging(
                status.id,
                follower.id,
                lag_entries,
                lag_bytes,
                threshold_bytes,
            );
        }
    }
}
