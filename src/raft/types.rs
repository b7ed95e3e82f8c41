//! The values the consensus core consumes and produces. They mirror the Raft
//! messages of `proto/kvstore.proto`, but as plain Rust types: the core never
//! sees bytes from the network, only values the driver has already decoded,
//! and conversion to and from the wire lives outside `raft/`.

use std::sync::Arc;

use super::membership::Membership;

/// A node's id in the cluster. 0 is never a valid id: it means "none".
pub type NodeId = u64;

/// The id that stands for "no node" (no vote cast, no leader known).
pub const NO_NODE: NodeId = 0;

/// What an entry's `data` holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum EntryKind {
    /// A command for the application (empty: a leader's no-op).
    #[default]
    Normal,
    /// A new configuration ([`Membership::encode`]): the core reads it the
    /// moment it is appended; the application only records it.
    ConfChange,
}

/// One log entry. An entry with empty `data` is a no-op: a new leader appends
/// one so that it can commit the entries of earlier terms (Raft §5.4.2).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub term: u64,
    pub index: u64,
    pub kind: EntryKind,
    pub data: Vec<u8>,
}

impl Entry {
    /// An application command (or, with empty `data`, a no-op).
    pub fn normal(term: u64, index: u64, data: Vec<u8>) -> Entry {
        Entry {
            term,
            index,
            kind: EntryKind::Normal,
            data,
        }
    }

    /// The configuration a conf-change entry carries; `None` for other
    /// entries and for malformed bytes.
    pub fn membership(&self) -> Option<Membership> {
        match self.kind {
            EntryKind::ConfChange => Membership::decode(&self.data),
            EntryKind::Normal => None,
        }
    }

    /// The bytes this entry costs in a message or the log, for size limits.
    pub fn size_bytes(&self) -> usize {
        self.data.len() + 24
    }
}

/// The state that must be durable before any message that depends on it
/// leaves the node: the current term and the vote cast in it. `commit` is
/// carried along so a restarted node can apply without waiting for a leader;
/// losing it is safe (it is recomputed), losing term or vote is not.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HardState {
    pub term: u64,
    pub vote: NodeId,
    pub commit: u64,
}

/// Where a snapshot sits in the log: it replaces every entry up to and
/// including `index`, whose term was `term`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SnapshotMeta {
    pub index: u64,
    pub term: u64,
}

/// A snapshot of the application's state machine at `meta.index`. The bytes
/// are opaque to the core; they are shared, not copied, when sent in chunks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub meta: SnapshotMeta,
    /// The configuration at `meta.index`: kept with the snapshot because the
    /// conf-change entries it replaced are gone.
    pub membership: Membership,
    pub data: Arc<Vec<u8>>,
}

/// A message between two cores. `term` is the sender's current term.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub from: NodeId,
    pub to: NodeId,
    pub term: u64,
    pub body: MessageBody,
}

/// The Raft RPCs and their responses. Every request (`AppendEntries`,
/// `Heartbeat`, `RequestVote`, `InstallSnapshot`) addressed to a core that is
/// running gets exactly one response, in the order the requests were stepped:
/// the driver relies on this to answer each RPC on the connection it came in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MessageBody {
    AppendEntries {
        prev_log_index: u64,
        prev_log_term: u64,
        entries: Vec<Entry>,
        leader_commit: u64,
    },
    AppendEntriesResponse {
        success: bool,
        /// On success, the last index known to match the leader's log.
        match_index: u64,
        /// On rejection, where the leader should retry: see `RaftLog::find_conflict_by_term`.
        conflict_index: u64,
        conflict_term: u64,
        last_log_index: u64,
    },
    Heartbeat {
        leader_commit: u64,
        read_context: u64,
    },
    HeartbeatResponse {
        read_context: u64,
    },
    RequestVote {
        pre_vote: bool,
        last_log_index: u64,
        last_log_term: u64,
        /// The candidate campaigns because the leader told it to
        /// (TimeoutNow): voters grant it even within their leader lease.
        transfer: bool,
    },
    RequestVoteResponse {
        pre_vote: bool,
        granted: bool,
    },
    InstallSnapshot {
        meta: SnapshotMeta,
        /// The configuration at `meta.index` (see [`Snapshot::membership`]).
        membership: Membership,
        offset: u64,
        data: Vec<u8>,
        done: bool,
        total_bytes: u64,
    },
    InstallSnapshotResponse {
        meta: SnapshotMeta,
        next_offset: u64,
        success: bool,
    },
    /// Leadership transfer (thesis §3.10): the leader tells an up-to-date
    /// voter to start an election at once. One-way: no response.
    TimeoutNow,
}

impl MessageBody {
    /// True for the bodies that expect a response (the RPC requests).
    pub fn is_request(&self) -> bool {
        matches!(
            self,
            MessageBody::AppendEntries { .. }
                | MessageBody::Heartbeat { .. }
                | MessageBody::RequestVote { .. }
                | MessageBody::InstallSnapshot { .. }
        )
    }
}

/// A linearizable read whose barrier has passed: once the state machine has
/// applied `index`, the read identified by `context` may be answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadState {
    pub context: u64,
    pub index: u64,
}

/// A node's role. `PreCandidate` runs the pre-vote round before a real
/// election; it has not changed its term.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    Follower,
    PreCandidate,
    Candidate,
    Leader,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Follower => "follower",
            Role::PreCandidate => "pre-candidate",
            Role::Candidate => "candidate",
            Role::Leader => "leader",
        }
    }
}
