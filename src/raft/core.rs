//! The Raft state machine: roles, elections, replication, commit, ReadIndex
//! and snapshots. See the module documentation of `raft` for the Ready
//! contract.

use super::types::*;

/// Tuning of one core. Times are in ticks; the driver decides how long a tick is.
#[derive(Clone, Debug)]
pub struct Config {
    pub id: NodeId,
    /// Every voter of the cluster, this node included.
    pub voters: Vec<NodeId>,
    /// A follower or candidate that hears from no leader for a randomized
    /// timeout in `[election_timeout_min_ticks, election_timeout_max_ticks)`
    /// starts an election.
    pub election_timeout_min_ticks: u32,
    pub election_timeout_max_ticks: u32,
    pub heartbeat_interval_ticks: u32,
    /// How many AppendEntries may be outstanding to one follower (pipelining).
    pub max_inflight_appends: usize,
    /// The most entry bytes one AppendEntries carries.
    pub max_append_bytes: usize,
    /// The most snapshot bytes one InstallSnapshot chunk carries.
    pub max_snapshot_chunk_bytes: usize,
    pub pre_vote: bool,
    pub check_quorum: bool,
    /// Seeds the randomized election timeouts.
    pub seed: u64,
}

/// What a node had made durable before it stopped.
#[derive(Clone, Debug, Default)]
pub struct RestoredState {
    pub hard_state: HardState,
    pub snapshot: Option<Snapshot>,
    /// The entries after the snapshot, contiguous.
    pub entries: Vec<Entry>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProposeError {
    NotLeader { hint: NodeId },
}

/// A summary of the core's state for status displays and tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    pub id: NodeId,
    pub role: Role,
    pub term: u64,
    pub vote: NodeId,
    pub leader: NodeId,
    pub commit: u64,
    pub applied: u64,
    pub first_index: u64,
    pub last_index: u64,
    pub snapshot_index: u64,
    pub log_bytes: u64,
}

/// What the driver must do now, in the order of the fields.
#[derive(Debug, Default)]
pub struct Ready {
    /// Persist if `Some`, before sending any message of `messages`.
    pub hard_state: Option<HardState>,
    /// Persist, after the snapshot if any, before sending `messages`. The
    /// first entry may overwrite stored entries at the same or higher index:
    /// the stored log is truncated there first.
    pub snapshot: Option<Snapshot>,
    pub entries: Vec<Entry>,
    /// Messages that do not depend on this Ready's persistence (a leader's
    /// AppendEntries; Raft thesis §10.2.1): they may be sent at once.
    pub messages_unpersisted: Vec<Message>,
    /// Messages to send only after `hard_state`, `snapshot` and `entries` are durable.
    pub messages: Vec<Message>,
    /// Entries to apply in order; all of them are already durable locally.
    pub committed: Vec<Entry>,
    /// Reads whose barrier has passed.
    pub read_states: Vec<ReadState>,
}

/// The consensus state machine of one node.
pub struct RaftCore {
    config: Config,
}

impl RaftCore {
    pub fn new(config: Config, restored: RestoredState) -> RaftCore {
        let _ = restored;
        RaftCore { config }
    }
    pub fn id(&self) -> NodeId {
        self.config.id
    }
}
