//! The Raft state machine: roles, elections, replication, commit, ReadIndex
//! and snapshots. See the module documentation of `raft` for the Ready
//! contract.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use super::log::RaftLog;
use super::membership::{ConfChange, ConfChangeError, Membership};
use super::progress::{Progress, ProgressState, SnapshotSend};
use super::rng::SplitMix64;
use super::types::*;

/// Tuning of one core. Times are in ticks; the driver decides how long a tick is.
#[derive(Clone, Debug)]
pub struct Config {
    pub id: NodeId,
    /// The bootstrap configuration: the voters of a cluster that has never
    /// started. Once the log or a snapshot holds a configuration, that one
    /// decides and this is ignored. Empty for a node that joins an existing
    /// cluster: it waits to be added and never campaigns before.
    pub voters: Vec<NodeId>,
    /// The bootstrap voters' addresses (only reported; may be empty).
    pub addresses: BTreeMap<NodeId, String>,
    /// A learner is promoted only when its log is at most this many entries
    /// behind the leader's, so a new voter never stalls commit.
    pub promote_max_lag_entries: u64,
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
    /// How snapshots travel (see [`Ready::snapshot_sends`]). `false`: the core holds the
    /// snapshot's bytes (given to [`RaftCore::compact`]) and sends and reassembles them in
    /// InstallSnapshot chunks itself (the simulation). `true`: the driver streams them: a
    /// follower that needs a snapshot appears in `Ready::snapshot_sends`, the driver reports
    /// the follower's final answer as an InstallSnapshotResponse, and an InstallSnapshot
    /// stepped into a follower's core is a whole snapshot the driver has already received
    /// and installed in the application (the core only records its index, term and
    /// membership).
    pub streamed_snapshots: bool,
    /// The most entry bytes a leader holds beyond its commit index.
    pub max_uncommitted_bytes: usize,
    /// The most log a leader keeps in memory, past what the application asked to compact, for
    /// a follower continuing from a streamed snapshot: while it receives it (it continues from
    /// the entries after the snapshot) and until it has caught up after installing it. A
    /// follower that would need more is not waited for: it gets a snapshot again. Bounds the
    /// leader's memory during a long transfer (see [`RaftCore::compaction_floor`]).
    pub max_catch_up_log_bytes: u64,
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
    /// Only the leader takes proposals and reads; `hint` is the leader this
    /// node knows of (`NO_NODE` if none).
    NotLeader { hint: NodeId },
    /// The leader already holds `max_uncommitted_bytes` of entries that a
    /// majority has not yet stored (followers are down or slow): refusing
    /// more keeps memory bounded until they catch up.
    Overloaded,
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
    /// The index of the latest configuration in the log (0: the bootstrap one).
    pub conf_index: u64,
    /// A leadership transfer under way to this node (`NO_NODE`: none).
    pub lead_transferee: NodeId,
}

/// The leader's view of one follower, for monitoring.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FollowerStatus {
    pub id: NodeId,
    /// The highest index known to be in the follower's log.
    pub match_index: u64,
    /// It answered something since the last check-quorum round.
    pub recent_active: bool,
    /// `probe`, `replicate` or `snapshot`.
    pub state: &'static str,
}

/// What the driver must do now, in the order of the fields.
#[derive(Debug, Default)]
pub struct Ready {
    /// Persist if `Some`, before sending any message of `messages`.
    pub hard_state: Option<HardState>,
    /// A snapshot received from the leader: persist it, then load it into
    /// the application. It replaces the whole stored log: every stored entry
    /// is dropped (the in-memory log now starts right after it).
    pub snapshot: Option<Snapshot>,
    /// Persist, after the snapshot if any, before sending `messages`. The
    /// first entry may overwrite stored entries at the same or higher index:
    /// the stored log is truncated there first.
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
    /// With `Config::streamed_snapshots`: followers that need a snapshot now. For each, the
    /// driver streams a consistent view of the application's state (at any applied index
    /// at or past the core's snapshot index) and then steps the follower's answer, or a
    /// failed InstallSnapshotResponse, into the core; until then the follower gets no
    /// entries.
    pub snapshot_sends: Vec<NodeId>,
}

impl Config {
    /// A config with the defaults the server and the simulation share; the
    /// caller overrides what it tunes.
    pub fn new(id: NodeId, voters: Vec<NodeId>) -> Config {
        Config {
            id,
            voters,
            addresses: BTreeMap::new(),
            promote_max_lag_entries: 1000,
            election_timeout_min_ticks: 10,
            election_timeout_max_ticks: 20,
            heartbeat_interval_ticks: 2,
            max_inflight_appends: 64,
            max_append_bytes: 1 << 20,
            max_snapshot_chunk_bytes: 1 << 20,
            streamed_snapshots: false,
            max_uncommitted_bytes: 64 << 20,
            max_catch_up_log_bytes: 128 << 20,
            pre_vote: true,
            check_quorum: true,
            seed: id,
        }
    }

    fn validate(&self) {
        assert!(self.id != NO_NODE, "node id 0 is reserved");
        let mut sorted = self.voters.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), self.voters.len(), "duplicate voter ids");
        assert!(!sorted.contains(&NO_NODE), "voter id 0 is reserved");
        assert!(self.heartbeat_interval_ticks > 0);
        assert!(self.heartbeat_interval_ticks < self.election_timeout_min_ticks);
        assert!(self.election_timeout_min_ticks < self.election_timeout_max_ticks);
        assert!(self.max_inflight_appends > 0 && self.max_append_bytes > 0);
        assert!(self.max_snapshot_chunk_bytes > 0);
    }
}

/// A read waiting for its ReadIndex barrier. `round` is the heartbeat round
/// that confirms leadership for it (0: no round started yet).
#[derive(Clone, Copy, Debug)]
struct PendingRead {
    context: u64,
    index: u64,
    round: u64,
}

/// A snapshot being received from the leader, chunk by chunk.
/// One InstallSnapshot chunk, as the leader sent it.
struct SnapshotChunk {
    meta: SnapshotMeta,
    membership: Membership,
    offset: u64,
    data: Vec<u8>,
    done: bool,
    total_bytes: u64,
}

struct IncomingSnapshot {
    meta: SnapshotMeta,
    membership: Membership,
    data: Vec<u8>,
}

/// A configuration and the entry that introduced it.
#[derive(Clone, Debug)]
struct ConfRecord {
    index: u64,
    term: u64,
    membership: Membership,
}

/// The consensus state machine of one node.
pub struct RaftCore {
    config: Config,
    rng: SplitMix64,

    // The persistent state (Raft Figure 2).
    term: u64,
    vote: NodeId,
    log: RaftLog,
    /// The hard state last handed to the driver; a different current one
    /// goes into the next Ready.
    persisted_hard_state: HardState,

    role: Role,
    leader: NodeId,
    /// Ticks since the last valid contact with a leader (followers), since
    /// the election started (candidates) or since the last check-quorum
    /// round (leaders).
    election_elapsed: u32,
    heartbeat_elapsed: u32,
    randomized_election_timeout: u32,
    /// Votes received in the current (pre-)election: voter -> granted.
    votes: HashMap<NodeId, bool>,
    /// The leader's view of every other member, voter or learner.
    progress: HashMap<NodeId, Progress>,
    /// The configurations in the log, oldest first. The first is the base:
    /// the snapshot's (or the bootstrap one at index 0); each later one is a
    /// conf-change entry still in the log. The last is the one in force
    /// (effective when appended). Invariant: never empty, indexes increase,
    /// and every record after the first is a conf-change entry of the log.
    conf_history: Vec<ConfRecord>,
    /// The voter this leader is handing leadership to (`NO_NODE`: none), and
    /// the ticks since it started: the transfer is abandoned after an
    /// election timeout.
    lead_transferee: NodeId,
    transfer_elapsed_ticks: u32,

    /// The application's latest snapshot (sent to followers that need it).
    snapshot: Option<Snapshot>,
    /// A snapshot installed from the leader that the driver must persist
    /// and load into the application.
    pending_snapshot: Option<Snapshot>,
    incoming_snapshot: Option<IncomingSnapshot>,
    /// Followers whose snapshot the driver is to stream (`Config::streamed_snapshots`).
    snapshot_sends: Vec<NodeId>,

    /// Reads in the order they arrived; the leader releases them in order.
    pending_reads: VecDeque<PendingRead>,
    /// The last ReadIndex heartbeat round started.
    read_round: u64,
    read_states: Vec<ReadState>,

    messages_unpersisted: Vec<Message>,
    messages: Vec<Message>,
    /// Between `ready()` and `advance()`: what the Ready handed out.
    in_progress: Option<ReadyMark>,
}

/// What a Ready handed to the driver, to be recorded by `advance`.
#[derive(Clone, Copy, Debug)]
struct ReadyMark {
    stable_to: u64,
    applied_to: u64,
    hard_state: HardState,
}

impl RaftCore {
    pub fn new(config: Config, restored: RestoredState) -> RaftCore {
        config.validate();
        let snapshot_meta = restored
            .snapshot
            .as_ref()
            .map(|s| s.meta)
            .unwrap_or_default();
        let log = RaftLog::restore(snapshot_meta, restored.entries, restored.hard_state.commit);
        let hard_state = restored.hard_state;
        assert!(
            hard_state.term >= log.last_term(),
            "restored term {} is below the log's last term {}",
            hard_state.term,
            log.last_term()
        );
        let rng = SplitMix64::new(config.seed ^ config.id.wrapping_mul(0x9E37_79B9));
        // A snapshot written before membership was replicated carries an
        // empty configuration: the bootstrap one stands for it.
        let snapshot_membership = restored
            .snapshot
            .as_ref()
            .filter(|s| s.membership != Membership::default());
        let base = match snapshot_membership {
            Some(snapshot) => ConfRecord {
                index: snapshot.meta.index,
                term: snapshot.meta.term,
                membership: snapshot.membership.clone(),
            },
            None => {
                let mut membership = Membership::with_voters(config.voters.iter().copied());
                for (id, address) in membership.voters.iter_mut() {
                    if let Some(known) = config.addresses.get(id) {
                        address.clone_from(known);
                    }
                }
                ConfRecord {
                    index: 0,
                    term: 0,
                    membership,
                }
            }
        };
        let mut core = RaftCore {
            rng,
            term: hard_state.term,
            vote: hard_state.vote,
            persisted_hard_state: HardState {
                term: hard_state.term,
                vote: hard_state.vote,
                commit: log.commit,
            },
            log,
            role: Role::Follower,
            leader: NO_NODE,
            election_elapsed: 0,
            heartbeat_elapsed: 0,
            randomized_election_timeout: 0,
            votes: HashMap::new(),
            progress: HashMap::new(),
            conf_history: vec![base],
            lead_transferee: NO_NODE,
            transfer_elapsed_ticks: 0,
            snapshot: restored.snapshot,
            pending_snapshot: None,
            incoming_snapshot: None,
            snapshot_sends: Vec::new(),
            pending_reads: VecDeque::new(),
            read_round: 0,
            read_states: Vec::new(),
            messages_unpersisted: Vec::new(),
            messages: Vec::new(),
            in_progress: None,
            config,
        };
        core.refresh_conf_history(1);
        core.reset_election_timeout();
        core
    }

    // ------------------------------------------------------------ accessors

    pub fn id(&self) -> NodeId {
        self.config.id
    }
    pub fn role(&self) -> Role {
        self.role
    }
    pub fn leader(&self) -> NodeId {
        self.leader
    }
    pub fn term(&self) -> u64 {
        self.term
    }
    pub fn hard_state(&self) -> HardState {
        HardState {
            term: self.term,
            vote: self.vote,
            commit: self.log.commit,
        }
    }
    pub fn entry(&self, index: u64) -> Option<&Entry> {
        self.log.entry(index)
    }
    pub fn term_at(&self, index: u64) -> Option<u64> {
        self.log.term(index)
    }
    pub fn snapshot(&self) -> Option<&Snapshot> {
        self.snapshot.as_ref()
    }
    pub fn randomized_election_timeout_ticks(&self) -> u32 {
        self.randomized_election_timeout
    }

    /// The configuration in force: the latest in the log, committed or not.
    pub fn membership(&self) -> &Membership {
        &self.conf_history.last().expect("never empty").membership
    }

    /// The latest configuration whose entry is committed.
    pub fn committed_membership(&self) -> &Membership {
        self.membership_at(self.log.commit)
            .expect("the base configuration is at or below commit")
    }

    /// The configuration in force at `index` (`None` below the base one).
    pub fn membership_at(&self, index: u64) -> Option<&Membership> {
        self.conf_history
            .iter()
            .rev()
            .find(|record| record.index <= index)
            .map(|record| &record.membership)
    }

    /// The log index of the configuration in force (0: the bootstrap one).
    pub fn conf_index(&self) -> u64 {
        self.conf_history.last().expect("never empty").index
    }

    pub fn status(&self) -> Status {
        Status {
            id: self.config.id,
            role: self.role,
            term: self.term,
            vote: self.vote,
            leader: self.leader,
            commit: self.log.commit,
            applied: self.log.applied,
            first_index: self.log.first_index(),
            last_index: self.log.last_index(),
            snapshot_index: self.log.snapshot_meta().index,
            log_bytes: self.log.size_bytes(),
            conf_index: self.conf_index(),
            lead_transferee: self.lead_transferee,
        }
    }

    /// The leader's view of its followers, by id; empty on other roles.
    pub fn followers(&self) -> Vec<FollowerStatus> {
        let mut followers: Vec<FollowerStatus> = self
            .progress
            .iter()
            .map(|(&id, p)| FollowerStatus {
                id,
                match_index: p.match_index,
                recent_active: p.recent_active,
                state: match p.state {
                    ProgressState::Probe => "probe",
                    ProgressState::Replicate => "replicate",
                    ProgressState::Snapshot => "snapshot",
                },
            })
            .collect();
        followers.sort_by_key(|f| f.id);
        followers
    }

    fn quorum(&self) -> usize {
        self.membership().quorum()
    }

    fn is_voter(&self) -> bool {
        self.membership().is_voter(self.config.id)
    }

    /// Every other member, voters and learners: whom the leader replicates to.
    fn peers(&self) -> Vec<NodeId> {
        let id = self.config.id;
        self.membership().members().filter(|&m| m != id).collect()
    }

    /// Every other voter: whom a candidate asks for votes.
    fn voter_peers(&self) -> Vec<NodeId> {
        let id = self.config.id;
        self.membership()
            .voters
            .keys()
            .copied()
            .filter(|&v| v != id)
            .collect()
    }

    /// The highest value a majority of the voters has reached: `own` for
    /// this node (if it votes), `value` of each other voter's progress (0
    /// when unknown). Learners never count.
    fn quorum_value(&self, own: u64, value: impl Fn(&Progress) -> u64) -> u64 {
        let id = self.config.id;
        let mut values: Vec<u64> = self
            .membership()
            .voters
            .keys()
            .map(|&v| {
                if v == id {
                    own
                } else {
                    self.progress.get(&v).map_or(0, &value)
                }
            })
            .collect();
        if values.is_empty() {
            return 0;
        }
        values.sort_unstable_by(|a, b| b.cmp(a));
        values[self.quorum() - 1]
    }

    // ------------------------------------------------------- membership

    /// Brings `conf_history` in line with the log after entries from
    /// `from_index` on were appended (and maybe entries above truncated):
    /// a configuration whose entry is gone is dropped, so the node falls back
    /// to the one before (thesis §4.1); new conf-change entries are taken.
    fn refresh_conf_history(&mut self, from_index: u64) {
        while self.conf_history.len() > 1 {
            let last = self.conf_history.last().expect("never empty");
            if self.log.term(last.index) == Some(last.term) {
                break;
            }
            self.conf_history.pop();
        }
        let start = from_index
            .max(self.conf_index() + 1)
            .max(self.log.first_index());
        let last_index = self.log.last_index();
        let mut found = Vec::new();
        for index in start..=last_index {
            let entry = self.log.entry(index).expect("within the log");
            if entry.kind == EntryKind::ConfChange {
                // `entries_follow` refused malformed ones before they were appended.
                let membership = entry.membership().expect("conf-change entries decode");
                found.push(ConfRecord {
                    index,
                    term: entry.term,
                    membership,
                });
            }
        }
        let changed = !found.is_empty();
        self.conf_history.extend(found);
        if changed || self.role == Role::Leader {
            self.sync_progress();
        }
    }

    /// The leader tracks exactly the other members of the configuration in
    /// force; a transfer to a node that left is abandoned.
    fn sync_progress(&mut self) {
        if self.role != Role::Leader {
            return;
        }
        let peers = self.peers();
        self.progress.retain(|id, _| peers.contains(id));
        let next_index = self.log.last_index() + 1;
        for peer in peers {
            let max_inflight = self.config.max_inflight_appends;
            self.progress.entry(peer).or_insert_with(|| {
                let mut progress = Progress::new(next_index, max_inflight);
                progress.recent_active = true;
                progress
            });
        }
        if self.lead_transferee != NO_NODE && !self.membership().is_voter(self.lead_transferee) {
            self.lead_transferee = NO_NODE;
        }
    }

    /// Proposes one single-server membership change (see `membership` for
    /// the protocol). Returns the index of its entry; the change is in
    /// force at once and done when that index commits.
    pub fn propose_conf_change(&mut self, change: ConfChange) -> Result<u64, ConfChangeError> {
        self.assert_not_in_ready();
        if self.role != Role::Leader {
            return Err(ConfChangeError::NotLeader { hint: self.leader });
        }
        if self.lead_transferee != NO_NODE {
            return Err(ConfChangeError::TransferInProgress {
                to: self.lead_transferee,
            });
        }
        // Ongaro's fix: until this leader commits an entry of its term, an
        // uncommitted change of an earlier leader may still be in someone's
        // log, and a second change could form a disjoint majority.
        if self.log.term(self.log.commit) != Some(self.term) {
            return Err(ConfChangeError::LeaderNotReady);
        }
        if self.conf_index() > self.log.commit {
            return Err(ConfChangeError::ChangeInFlight {
                index: self.conf_index(),
            });
        }
        let next = self.membership().apply(&change)?;
        if let ConfChange::Promote { id } = change {
            let matched = self.progress.get(&id).map_or(0, |p| p.match_index);
            let lag_entries = self.log.last_index().saturating_sub(matched);
            // A learner that has acknowledged nothing yet is not caught up,
            // however short the log: it may not even be running.
            if matched == 0 || lag_entries > self.config.promote_max_lag_entries {
                return Err(ConfChangeError::LearnerBehind { id, lag_entries });
            }
        }
        let index = self.log.last_index() + 1;
        let entry = Entry {
            term: self.term,
            index,
            kind: EntryKind::ConfChange,
            data: next.encode(),
        };
        self.log.append(entry);
        self.refresh_conf_history(index);
        self.broadcast_append();
        self.maybe_commit();
        Ok(index)
    }

    /// Starts a leadership transfer to voter `to` (thesis §3.10): proposals
    /// are refused (NotLeader, hinting at `to`) while the leader brings `to`
    /// up to date and then tells it to campaign at once (TimeoutNow). The
    /// transfer is abandoned after an election timeout.
    pub fn transfer_leader(&mut self, to: NodeId) -> Result<(), ConfChangeError> {
        self.assert_not_in_ready();
        if self.role != Role::Leader {
            return Err(ConfChangeError::NotLeader { hint: self.leader });
        }
        if to == self.config.id {
            return Ok(());
        }
        if !self.membership().is_voter(to) {
            return Err(if self.membership().is_learner(to) {
                ConfChangeError::NotVoter { id: to }
            } else {
                ConfChangeError::UnknownMember { id: to }
            });
        }
        if self.lead_transferee == to {
            return Ok(());
        }
        self.lead_transferee = to;
        self.transfer_elapsed_ticks = 0;
        self.maybe_send_timeout_now();
        Ok(())
    }

    /// Sends TimeoutNow to the transferee once its log matches ours; until
    /// then, keeps replicating to it.
    fn maybe_send_timeout_now(&mut self) {
        let to = self.lead_transferee;
        let Some(progress) = self.progress.get(&to) else {
            return;
        };
        if progress.match_index == self.log.last_index() {
            self.send_leader_message(to, MessageBody::TimeoutNow);
        } else {
            self.send_append_or_empty(to, true);
        }
    }

    /// A leader that the configuration in force no longer lists as a voter
    /// steps down once that configuration is committed (thesis §4.2.2): it
    /// managed the cluster until then without counting itself. It hands
    /// over at once to the most up-to-date voter if one has caught up.
    fn maybe_step_down_removed(&mut self) {
        if self.role != Role::Leader || self.is_voter() || self.conf_index() > self.log.commit {
            return;
        }
        let last_index = self.log.last_index();
        let successor = self
            .progress
            .iter()
            .filter(|(id, p)| self.membership().is_voter(**id) && p.match_index == last_index)
            .map(|(&id, _)| id)
            .min();
        if let Some(successor) = successor {
            self.send_leader_message(successor, MessageBody::TimeoutNow);
        }
        let term = self.term;
        self.become_follower(term, NO_NODE);
    }

    // ------------------------------------------------------- role changes

    fn reset(&mut self, term: u64) {
        if term != self.term {
            self.term = term;
            self.vote = NO_NODE;
        }
        self.leader = NO_NODE;
        self.election_elapsed = 0;
        self.heartbeat_elapsed = 0;
        self.votes.clear();
        self.progress.clear();
        self.lead_transferee = NO_NODE;
        self.transfer_elapsed_ticks = 0;
        self.incoming_snapshot = None;
        // Reads wait on this node being leader; whoever issued them learns
        // of the role change from `status()` and answers them NotLeader.
        self.pending_reads.clear();
        self.reset_election_timeout();
    }

    fn reset_election_timeout(&mut self) {
        let low = self.config.election_timeout_min_ticks as u64;
        let high = self.config.election_timeout_max_ticks as u64;
        self.randomized_election_timeout = self.rng.range(low, high) as u32;
    }

    fn become_follower(&mut self, term: u64, leader: NodeId) {
        self.reset(term);
        self.role = Role::Follower;
        self.leader = leader;
    }

    fn become_pre_candidate(&mut self) {
        assert_ne!(
            self.role,
            Role::Leader,
            "a leader cannot become a pre-candidate"
        );
        // The term does not change: a pre-vote disturbs no one.
        self.reset(self.term);
        self.role = Role::PreCandidate;
    }

    fn become_candidate(&mut self) {
        assert_ne!(
            self.role,
            Role::Leader,
            "a leader cannot become a candidate"
        );
        self.reset(self.term + 1);
        self.vote = self.config.id;
        self.role = Role::Candidate;
    }

    fn become_leader(&mut self) {
        assert_eq!(
            self.role,
            Role::Candidate,
            "only a candidate becomes leader"
        );
        let term = self.term;
        self.reset(term);
        self.role = Role::Leader;
        self.leader = self.config.id;
        let next_index = self.log.last_index() + 1;
        for peer in self.peers() {
            let mut progress = Progress::new(next_index, self.config.max_inflight_appends);
            progress.recent_active = true;
            self.progress.insert(peer, progress);
        }
        // A leader may commit only entries of its own term by counting
        // (Figure 8); the no-op lets it commit everything before it at once.
        let index = self.log.last_index() + 1;
        self.log.append(Entry::normal(term, index, Vec::new()));
        self.broadcast_append();
        self.maybe_commit();
    }

    // ------------------------------------------------------------- ticking

    /// One logical tick: elections for followers and candidates, heartbeats
    /// and check-quorum for the leader.
    pub fn tick(&mut self) {
        self.assert_not_in_ready();
        if self.role == Role::Leader {
            self.tick_leader();
        } else {
            self.election_elapsed += 1;
            // Learners, joining nodes and removed nodes never campaign: only
            // a voter of the configuration in force may lead.
            if self.election_elapsed >= self.randomized_election_timeout && self.is_voter() {
                self.campaign();
            }
        }
    }

    fn tick_leader(&mut self) {
        self.heartbeat_elapsed += 1;
        self.election_elapsed += 1;
        if self.lead_transferee != NO_NODE {
            self.transfer_elapsed_ticks += 1;
            if self.transfer_elapsed_ticks >= self.config.election_timeout_min_ticks {
                // The target did not win in time: lead on, take proposals again.
                self.lead_transferee = NO_NODE;
            }
        }
        if self.election_elapsed >= self.config.election_timeout_min_ticks {
            self.election_elapsed = 0;
            if self.config.check_quorum && !self.quorum_recently_active() {
                let term = self.term;
                self.become_follower(term, NO_NODE);
                return;
            }
        }
        if self.heartbeat_elapsed >= self.config.heartbeat_interval_ticks {
            self.heartbeat_elapsed = 0;
            self.broadcast_heartbeat();
        }
    }

    /// Check-quorum: a leader that has not heard from a majority within an
    /// election timeout may have been replaced, so it steps down rather than
    /// keep clients waiting on it. Resets the activity flags for the next round.
    fn quorum_recently_active(&mut self) -> bool {
        let active = self.quorum_value(1, |p| p.recent_active as u64) == 1;
        for progress in self.progress.values_mut() {
            progress.recent_active = false;
        }
        active
    }

    fn campaign(&mut self) {
        if self.config.pre_vote {
            self.become_pre_candidate();
        } else {
            self.become_candidate();
        }
        self.start_vote_round(false);
    }

    /// `transfer`: the leader asked us to campaign (TimeoutNow), so the
    /// pre-vote is skipped and voters set their leader lease aside.
    fn start_vote_round(&mut self, transfer: bool) {
        let pre_vote = self.role == Role::PreCandidate;
        let term = if pre_vote { self.term + 1 } else { self.term };
        let id = self.config.id;
        self.votes.insert(id, true);
        if self.tally_votes() {
            return;
        }
        let (last_log_index, last_log_term) = (self.log.last_index(), self.log.last_term());
        for peer in self.voter_peers() {
            let body = MessageBody::RequestVote {
                pre_vote,
                last_log_index,
                last_log_term,
                transfer,
            };
            // A real vote request depends on the durable term and self-vote.
            self.messages.push(Message {
                from: id,
                to: peer,
                term,
                body,
            });
        }
    }

    /// Counts the votes of the current round and acts on the outcome.
    /// Returns true when the round was decided.
    fn tally_votes(&mut self) -> bool {
        let membership = self.membership();
        let voters = self
            .votes
            .iter()
            .filter(|(id, _)| membership.is_voter(**id));
        let (granted, rejected) = voters.fold(
            (0, 0),
            |(g, r), (_, &yes)| {
                if yes {
                    (g + 1, r)
                } else {
                    (g, r + 1)
                }
            },
        );
        if granted >= self.quorum() {
            if self.role == Role::PreCandidate {
                self.become_candidate();
                self.start_vote_round(false);
            } else {
                self.become_leader();
            }
            return true;
        }
        if rejected >= self.quorum() {
            let term = self.term;
            self.become_follower(term, NO_NODE);
            return true;
        }
        false
    }

    // ------------------------------------------------------------ proposals

    /// Appends `data` to the log as a new entry. Leader only.
    pub fn propose(&mut self, data: Vec<u8>) -> Result<u64, ProposeError> {
        self.propose_batch(vec![data])
    }

    /// Appends every command of `batch`, in order, and replicates them in as
    /// few messages as the size limits allow. Returns the first one's index.
    pub fn propose_batch(&mut self, batch: Vec<Vec<u8>>) -> Result<u64, ProposeError> {
        self.assert_not_in_ready();
        if self.role != Role::Leader {
            return Err(ProposeError::NotLeader { hint: self.leader });
        }
        // During a transfer the leader takes nothing new (thesis §3.10):
        // clients retry at the node about to lead.
        if self.lead_transferee != NO_NODE {
            return Err(ProposeError::NotLeader {
                hint: self.lead_transferee,
            });
        }
        let batch_bytes: usize = batch.iter().map(|d| d.len() + 24).sum();
        let uncommitted_bytes = self.log.uncommitted_bytes() as usize;
        if uncommitted_bytes > 0
            && uncommitted_bytes + batch_bytes > self.config.max_uncommitted_bytes
        {
            return Err(ProposeError::Overloaded);
        }
        let first = self.log.last_index() + 1;
        for data in batch {
            let index = self.log.last_index() + 1;
            self.log.append(Entry::normal(self.term, index, data));
        }
        self.broadcast_append();
        self.maybe_commit();
        Ok(first)
    }

    /// Asks for a linearizable read barrier (ReadIndex, Raft thesis §6.4).
    /// When a majority has confirmed this node is still leader, and the
    /// leader has committed an entry of its term, a `ReadState` with
    /// `context` and the commit index at the time of the call appears in a
    /// Ready. Every read waiting at the same moment shares one heartbeat round.
    pub fn read_index(&mut self, context: u64) -> Result<(), ProposeError> {
        self.assert_not_in_ready();
        if self.role != Role::Leader {
            return Err(ProposeError::NotLeader { hint: self.leader });
        }
        self.pending_reads.push_back(PendingRead {
            context,
            index: self.log.commit,
            round: 0,
        });
        if self.is_sole_voter() {
            self.release_reads();
        }
        Ok(())
    }

    /// Starts one heartbeat round for every read that has none yet.
    fn start_read_round(&mut self) {
        if self.role != Role::Leader || !self.pending_reads.iter().any(|r| r.round == 0) {
            return;
        }
        self.read_round += 1;
        let round = self.read_round;
        for read in self.pending_reads.iter_mut().filter(|r| r.round == 0) {
            read.round = round;
        }
        self.heartbeat_elapsed = 0;
        self.broadcast_heartbeat();
    }

    /// Releases, in order, the reads whose round a majority has acknowledged,
    /// provided this leader has committed an entry of its own term: before
    /// that, its commit index may lag the cluster's (thesis §6.4, step 1).
    fn release_reads(&mut self) {
        if self.log.term(self.log.commit) != Some(self.term) {
            return;
        }
        // This node confirms itself (when it votes).
        let confirmed_round = self.quorum_value(u64::MAX, |p| p.read_ack);
        let sole_voter = self.is_sole_voter();
        let commit = self.log.commit;
        while let Some(read) = self.pending_reads.front() {
            let confirmed = sole_voter || (read.round != 0 && read.round <= confirmed_round);
            if !confirmed {
                break;
            }
            // The commit index now is at least the one when the read
            // arrived, and everything up to it is committed: reading there
            // sees every write that completed before the read began.
            let index = read.index.max(commit);
            self.read_states.push(ReadState {
                context: read.context,
                index,
            });
            self.pending_reads.pop_front();
        }
    }

    // ---------------------------------------------------------- replication

    fn broadcast_append(&mut self) {
        for peer in self.peers() {
            self.send_append(peer);
        }
    }

    fn send_append(&mut self, to: NodeId) {
        self.send_append_or_empty(to, false)
    }

    /// Sends AppendEntries to `to` while its progress allows (pipelining in
    /// `Replicate`, one probe in `Probe`), or starts a snapshot when the
    /// entries it needs are compacted. With `send_if_empty`, a follower that
    /// is behind gets an AppendEntries even when everything was already
    /// sent: if those messages were lost, its rejection restarts the flow.
    fn send_append_or_empty(&mut self, to: NodeId, send_if_empty: bool) {
        loop {
            let progress = &self.progress[&to];
            if progress.is_paused() {
                return;
            }
            let next = progress.next_index;
            let probing = progress.state == ProgressState::Probe;
            let prev_log_index = next - 1;
            let prev_log_term = match self.log.term(prev_log_index) {
                Some(term) => term,
                None => return self.start_snapshot_send(to),
            };
            let entries = self
                .log
                .slice(next, self.log.last_index(), self.config.max_append_bytes);
            // An empty AppendEntries is only useful as a probe.
            if entries.is_empty() && !probing && !send_if_empty {
                return;
            }
            let sent_empty = entries.is_empty();
            let last = prev_log_index + entries.len() as u64;
            let leader_commit = self.log.commit;
            let body = MessageBody::AppendEntries {
                prev_log_index,
                prev_log_term,
                entries,
                leader_commit,
            };
            self.send_leader_message(to, body);
            let progress = self.progress.get_mut(&to).expect("peer progress");
            progress.sent_append(last);
            if probing || sent_empty || last >= self.log.last_index() {
                return;
            }
        }
    }

    /// A leader's own messages depend on nothing this Ready persists: its
    /// term and vote were durable before it could win, and its entries may
    /// be written in parallel with sending them (thesis §10.2.1).
    fn send_leader_message(&mut self, to: NodeId, body: MessageBody) {
        let message = Message {
            from: self.config.id,
            to,
            term: self.term,
            body,
        };
        self.messages_unpersisted.push(message);
    }

    fn broadcast_heartbeat(&mut self) {
        let read_context = self.read_round;
        for peer in self.peers() {
            let progress = self.progress.get_mut(&peer).expect("peer progress");
            // A follower may hold entries the leader does not know match,
            // so it is told to commit only what matches.
            let leader_commit = self.log.commit.min(progress.match_index);
            // Each heartbeat interval lets a waiting probe or snapshot
            // chunk go out again, in case the last one was lost.
            progress.paused = false;
            let body = MessageBody::Heartbeat {
                leader_commit,
                read_context,
            };
            self.send_leader_message(peer, body);
            if self.progress[&peer].state == ProgressState::Snapshot {
                self.send_snapshot_chunk(peer);
            }
        }
    }

    fn start_snapshot_send(&mut self, to: NodeId) {
        let snapshot = match &self.snapshot {
            Some(snapshot) => snapshot.clone(),
            // Entries are compacted only under a snapshot, so this cannot happen.
            None => unreachable!("log compacted without a snapshot"),
        };
        let streamed = self.config.streamed_snapshots;
        let send = SnapshotSend {
            meta: snapshot.meta,
            membership: snapshot.membership,
            data: (!streamed).then_some(snapshot.data),
            offset: 0,
        };
        self.progress
            .get_mut(&to)
            .expect("peer progress")
            .become_snapshot(send);
        if streamed {
            // The driver streams the application's state and reports the outcome.
            self.snapshot_sends.push(to);
            return;
        }
        self.send_snapshot_chunk(to);
    }

    fn send_snapshot_chunk(&mut self, to: NodeId) {
        let progress = self.progress.get_mut(&to).expect("peer progress");
        if progress.paused {
            return;
        }
        let send = progress
            .snapshot
            .as_ref()
            .expect("snapshot state has a snapshot");
        // A streamed snapshot's chunks are the driver's business.
        let Some(bytes) = &send.data else {
            return;
        };
        let total_bytes = bytes.len() as u64;
        let offset = send.offset.min(total_bytes);
        let end = (offset + self.config.max_snapshot_chunk_bytes as u64).min(total_bytes);
        let data = bytes[offset as usize..end as usize].to_vec();
        let body = MessageBody::InstallSnapshot {
            meta: send.meta,
            membership: send.membership.clone(),
            offset,
            data,
            done: end == total_bytes,
            total_bytes,
        };
        progress.paused = true;
        self.send_leader_message(to, body);
    }

    /// Commits the highest index a majority has stored, if it is of the
    /// current term (Raft §5.4.2: older entries commit only indirectly).
    fn maybe_commit(&mut self) {
        if self.role != Role::Leader {
            return;
        }
        let quorum_index = self.quorum_value(self.log.stable, |p| p.match_index);
        if quorum_index > self.log.commit && self.log.term(quorum_index) == Some(self.term) {
            self.log.commit_to(quorum_index);
            self.release_reads();
            self.maybe_step_down_removed();
        }
    }

    /// Whether this node is the only voter: its own word is a majority.
    fn is_sole_voter(&self) -> bool {
        let voters = &self.membership().voters;
        voters.len() == 1 && voters.contains_key(&self.config.id)
    }

    // ------------------------------------------------------------- stepping

    /// Handles one message from a peer. Messages addressed to another node
    /// or from a node outside the cluster are dropped.
    pub fn step(&mut self, message: Message) {
        self.assert_not_in_ready();
        if message.to != self.config.id || message.from == self.config.id || message.from == NO_NODE
        {
            return;
        }
        // A vote request is not refused for coming from a node outside our
        // configuration: we may be behind, and the candidate a voter of a
        // configuration we have not received yet (refusing it can leave a
        // cluster with no electable node). A removed node cannot win: its
        // removal committed on a majority of the new configuration, whose
        // logs are ahead of its own. It cannot disturb either: pre-vote keeps
        // its term still, and voters that hear from a leader ignore it
        // (the leader lease of check-quorum, thesis §4.2.3).
        if message.term > self.term {
            if !self.step_higher_term(&message) {
                return;
            }
        } else if message.term < self.term {
            self.step_lower_term(message);
            return;
        }
        match message.body {
            MessageBody::RequestVote {
                pre_vote,
                last_log_index,
                last_log_term,
                ..
            } => self.handle_vote_request(
                message.from,
                message.term,
                pre_vote,
                last_log_index,
                last_log_term,
            ),
            MessageBody::RequestVoteResponse { pre_vote, granted } => {
                self.handle_vote_response(message.from, pre_vote, granted)
            }
            _ => match self.role {
                Role::Leader => self.step_leader(message),
                _ => self.step_follower(message),
            },
        }
    }

    /// A message from a later term. Returns whether to go on handling it.
    fn step_higher_term(&mut self, message: &Message) -> bool {
        match message.body {
            MessageBody::RequestVote {
                pre_vote, transfer, ..
            } => {
                if self.in_leader_lease() && !transfer {
                    // A node that heard from a leader within the minimum
                    // election timeout ignores a (pre-)candidate: a
                    // partitioned node coming back cannot depose a healthy
                    // leader (etcd's leader lease with check-quorum).
                    self.reject_vote(message.from, pre_vote);
                    return false;
                }
                if pre_vote {
                    // A pre-vote changes no one's term.
                    return true;
                }
                self.become_follower(message.term, NO_NODE);
                true
            }
            MessageBody::RequestVoteResponse {
                pre_vote: true,
                granted: true,
            } => {
                // Granted pre-votes carry the term we would campaign at.
                true
            }
            MessageBody::AppendEntries { .. }
            | MessageBody::Heartbeat { .. }
            | MessageBody::InstallSnapshot { .. }
            | MessageBody::TimeoutNow => {
                self.become_follower(message.term, message.from);
                true
            }
            _ => {
                self.become_follower(message.term, NO_NODE);
                // A response from a later term has nothing more to tell us.
                false
            }
        }
    }

    /// A message from an earlier term: requests get a rejection carrying our
    /// term, so a stale leader or candidate learns it is behind; responses
    /// are stale and dropped.
    fn step_lower_term(&mut self, message: Message) {
        let to = message.from;
        match message.body {
            MessageBody::AppendEntries { .. } => {
                let body = MessageBody::AppendEntriesResponse {
                    success: false,
                    match_index: 0,
                    conflict_index: 0,
                    conflict_term: 0,
                    last_log_index: self.log.last_index(),
                };
                self.respond(to, body);
            }
            MessageBody::Heartbeat { .. } => {
                self.respond(to, MessageBody::HeartbeatResponse { read_context: 0 })
            }
            MessageBody::RequestVote { pre_vote, .. } => self.reject_vote(to, pre_vote),
            MessageBody::InstallSnapshot { meta, .. } => {
                let body = MessageBody::InstallSnapshotResponse {
                    meta,
                    next_offset: 0,
                    success: false,
                };
                self.respond(to, body);
            }
            _ => {}
        }
    }

    fn in_leader_lease(&self) -> bool {
        self.config.check_quorum
            && self.leader != NO_NODE
            && self.election_elapsed < self.config.election_timeout_min_ticks
    }

    /// Responses go out only after the Ready that produced them is durable:
    /// they may promise a vote, a term or stored entries.
    fn respond(&mut self, to: NodeId, body: MessageBody) {
        let message = Message {
            from: self.config.id,
            to,
            term: self.term,
            body,
        };
        self.messages.push(message);
    }

    fn reject_vote(&mut self, to: NodeId, pre_vote: bool) {
        self.respond(
            to,
            MessageBody::RequestVoteResponse {
                pre_vote,
                granted: false,
            },
        );
    }

    fn handle_vote_request(
        &mut self,
        from: NodeId,
        term: u64,
        pre_vote: bool,
        last_log_index: u64,
        last_log_term: u64,
    ) {
        let up_to_date = self.log.is_up_to_date(last_log_index, last_log_term);
        let granted = if pre_vote {
            // Would we vote at `term`? Only if it is later than ours and we
            // have no live leader (checked above for later terms).
            term > self.term && up_to_date
        } else {
            let can_vote = self.vote == from || (self.vote == NO_NODE && self.leader == NO_NODE);
            can_vote && up_to_date && self.role != Role::Leader
        };
        if granted && !pre_vote {
            self.vote = from;
            self.election_elapsed = 0;
        }
        // A granted pre-vote answers at the term asked about, so the
        // pre-candidate can tell it apart from stale answers.
        let reply_term = if granted && pre_vote { term } else { self.term };
        let message = Message {
            from: self.config.id,
            to: from,
            term: reply_term,
            body: MessageBody::RequestVoteResponse { pre_vote, granted },
        };
        self.messages.push(message);
    }

    fn handle_vote_response(&mut self, from: NodeId, pre_vote: bool, granted: bool) {
        let expected = match self.role {
            Role::PreCandidate => true,
            Role::Candidate => false,
            _ => return,
        };
        if pre_vote != expected {
            return;
        }
        self.votes.entry(from).or_insert(granted);
        self.tally_votes();
    }

    fn step_follower(&mut self, message: Message) {
        let from = message.from;
        match message.body {
            MessageBody::AppendEntries {
                prev_log_index,
                prev_log_term,
                entries,
                leader_commit,
            } => {
                self.accept_leader(from);
                self.handle_append(from, prev_log_index, prev_log_term, &entries, leader_commit);
            }
            MessageBody::Heartbeat {
                leader_commit,
                read_context,
            } => {
                self.accept_leader(from);
                self.log.commit_to(leader_commit);
                self.respond(from, MessageBody::HeartbeatResponse { read_context });
            }
            MessageBody::InstallSnapshot {
                meta,
                membership,
                offset,
                data,
                done,
                total_bytes,
            } => {
                self.accept_leader(from);
                let chunk = SnapshotChunk {
                    meta,
                    membership,
                    offset,
                    data,
                    done,
                    total_bytes,
                };
                self.handle_snapshot_chunk(from, chunk);
            }
            // Our leader hands over: campaign now, without pre-vote (the
            // leader vouches that we are up to date). A non-voter ignores it.
            MessageBody::TimeoutNow if self.is_voter() => {
                self.accept_leader(from);
                self.become_candidate();
                self.start_vote_round(true);
            }
            // Responses meant for a leader we no longer are.
            _ => {}
        }
    }

    /// A message from the leader of our term: a (pre-)candidate steps back.
    fn accept_leader(&mut self, leader: NodeId) {
        if self.role != Role::Follower {
            let term = self.term;
            self.become_follower(term, leader);
        }
        self.leader = leader;
        self.election_elapsed = 0;
    }

    fn handle_append(
        &mut self,
        from: NodeId,
        prev_log_index: u64,
        prev_log_term: u64,
        entries: &[Entry],
        leader_commit: u64,
    ) {
        let last_log_index = self.log.last_index();
        let reject = |conflict_index: u64, conflict_term: u64| MessageBody::AppendEntriesResponse {
            success: false,
            match_index: prev_log_index,
            conflict_index,
            conflict_term,
            last_log_index,
        };
        if !entries_follow(prev_log_index, prev_log_term, self.term, entries) {
            return self.respond(from, reject(last_log_index, 0));
        }
        // Entries at or below our commit are already ours (Leader
        // Completeness): skip them, and match from the commit index on.
        let commit = self.log.commit;
        let (prev_index, prev_term, entries) = if prev_log_index < commit {
            let skip = ((commit - prev_log_index) as usize).min(entries.len());
            let prev_index = prev_log_index + skip as u64;
            match self.log.term(prev_index) {
                Some(term) => (prev_index, term, &entries[skip..]),
                // Below our snapshot: everything the message carries is ours.
                None => (
                    commit,
                    self.log.term(commit).unwrap_or(0),
                    &entries[entries.len()..],
                ),
            }
        } else {
            (prev_log_index, prev_log_term, entries)
        };
        if !self.log.match_term(prev_index, prev_term) {
            let (hint_index, hint_term) = self.log.find_conflict_by_term(prev_index, prev_term);
            return self.respond(from, reject(hint_index, hint_term));
        }
        if !self.log.append_after(prev_index, entries) {
            return self.respond(from, reject(last_log_index, 0));
        }
        self.refresh_conf_history(prev_index + 1);
        let last_new_index = prev_index + entries.len() as u64;
        self.log.commit_to(leader_commit.min(last_new_index));
        let body = MessageBody::AppendEntriesResponse {
            success: true,
            match_index: last_new_index,
            conflict_index: 0,
            conflict_term: 0,
            last_log_index: self.log.last_index(),
        };
        self.respond(from, body);
    }

    fn handle_snapshot_chunk(&mut self, from: NodeId, chunk: SnapshotChunk) {
        let SnapshotChunk {
            meta,
            membership,
            offset,
            data,
            done,
            total_bytes,
        } = chunk;
        let respond = |core: &mut RaftCore, next_offset: u64, success: bool| {
            let body = MessageBody::InstallSnapshotResponse {
                meta,
                next_offset,
                success,
            };
            core.respond(from, body);
        };
        // A leader's snapshot holds only entries of its term or earlier: one
        // claiming a later term is malformed, and installing it would leave
        // the log's last term above the node's (every later append refused,
        // and the restored state rejected at the next start).
        if meta.term > self.term {
            self.incoming_snapshot = None;
            return respond(self, 0, false);
        }
        // A snapshot we already cover would roll state back: ignore it,
        // and tell the leader we hold everything it carries.
        if meta.index <= self.log.commit {
            self.incoming_snapshot = None;
            return respond(self, total_bytes, true);
        }
        if self.config.streamed_snapshots {
            // The driver received the whole snapshot and installed it in the application
            // before stepping it here (see `Config::streamed_snapshots`).
            assert!(done, "a streamed snapshot reaches the core only when whole");
            return self.install_snapshot_meta(meta, membership, Arc::default(), |core| {
                respond(core, total_bytes, true)
            });
        }
        if offset == 0 {
            self.incoming_snapshot = Some(IncomingSnapshot {
                meta,
                membership,
                data: Vec::new(),
            });
        }
        let incoming = match &mut self.incoming_snapshot {
            Some(incoming) if incoming.meta == meta && incoming.data.len() as u64 == offset => {
                incoming
            }
            other => {
                // Out of order or of another snapshot: ask for our next offset.
                let held = other
                    .as_ref()
                    .filter(|s| s.meta == meta)
                    .map_or(0, |s| s.data.len() as u64);
                return respond(self, held, false);
            }
        };
        incoming.data.extend_from_slice(&data);
        let held = incoming.data.len() as u64;
        if !done || held != total_bytes {
            return respond(self, held, true);
        }
        let incoming = self.incoming_snapshot.take().expect("present");
        let data = Arc::new(incoming.data);
        self.install_snapshot_meta(meta, incoming.membership, data, |core| {
            respond(core, held, true)
        });
    }

    /// A whole snapshot at `meta` has arrived (`data`: its bytes on the data-carrying path,
    /// empty when the driver installed it): adopt it, then `respond`.
    fn install_snapshot_meta(
        &mut self,
        meta: SnapshotMeta,
        membership: Membership,
        data: Arc<Vec<u8>>,
        respond: impl FnOnce(&mut RaftCore),
    ) {
        if self.log.match_term(meta.index, meta.term) {
            // We already hold the snapshot's last entry, hence everything
            // before it: committing there is enough, the log stays.
            self.log.commit_to(meta.index);
            return respond(self);
        }
        let snapshot = Snapshot {
            meta,
            membership: membership.clone(),
            data,
        };
        self.log.install_snapshot(meta);
        // Every configuration we held was past our commit, hence above the
        // snapshot's index or replaced by it: the snapshot's is the base.
        self.conf_history = vec![ConfRecord {
            index: meta.index,
            term: meta.term,
            membership,
        }];
        self.snapshot = Some(snapshot.clone());
        self.pending_snapshot = Some(snapshot);
        respond(self);
    }

    fn step_leader(&mut self, message: Message) {
        let from = message.from;
        match self.progress.get_mut(&from) {
            Some(progress) => progress.recent_active = true,
            // A response from a node that is no longer a member (or never
            // was): nothing to update.
            None if !message.body.is_request() => return,
            None => {}
        }
        match message.body {
            MessageBody::AppendEntriesResponse {
                success,
                match_index,
                conflict_index,
                conflict_term,
                last_log_index,
            } => {
                if success {
                    self.handle_append_success(from, match_index);
                } else {
                    self.handle_append_reject(
                        from,
                        match_index,
                        conflict_index,
                        conflict_term,
                        last_log_index,
                    );
                }
            }
            MessageBody::HeartbeatResponse { read_context } => {
                let progress = self.progress.get_mut(&from).expect("peer progress");
                progress.read_ack = progress.read_ack.max(read_context.min(self.read_round));
                progress.free_one_inflight();
                progress.paused = false;
                if progress.match_index < self.log.last_index() {
                    self.send_append_or_empty(from, true);
                }
                self.release_reads();
            }
            MessageBody::InstallSnapshotResponse {
                meta,
                next_offset,
                success,
            } => {
                self.handle_snapshot_response(from, meta, next_offset, success);
            }
            // Requests of our own term from another node claiming to lead
            // cannot happen while Election Safety holds; answer so the
            // sender is not left waiting, and change nothing.
            MessageBody::AppendEntries { prev_log_index, .. } => {
                let body = MessageBody::AppendEntriesResponse {
                    success: false,
                    match_index: prev_log_index,
                    conflict_index: 0,
                    conflict_term: 0,
                    last_log_index: self.log.last_index(),
                };
                self.respond(from, body);
            }
            MessageBody::Heartbeat { .. } => {
                self.respond(from, MessageBody::HeartbeatResponse { read_context: 0 })
            }
            MessageBody::InstallSnapshot { meta, .. } => {
                let body = MessageBody::InstallSnapshotResponse {
                    meta,
                    next_offset: 0,
                    success: false,
                };
                self.respond(from, body);
            }
            MessageBody::RequestVote { .. }
            | MessageBody::RequestVoteResponse { .. }
            | MessageBody::TimeoutNow => {}
        }
    }

    fn handle_append_success(&mut self, from: NodeId, match_index: u64) {
        // A follower cannot match entries this leader never had.
        if match_index > self.log.last_index() {
            return;
        }
        let progress = self.progress.get_mut(&from).expect("peer progress");
        let moved = progress.update_match(match_index);
        if progress.catching_up && match_index >= self.log.commit {
            progress.catching_up = false;
        }
        match progress.state {
            ProgressState::Probe => progress.become_replicate(),
            ProgressState::Snapshot => {
                // R18: an AppendEntries success at or past the snapshot
                // index means the follower no longer needs it.
                let covered = progress
                    .snapshot
                    .as_ref()
                    .is_some_and(|s| match_index >= s.meta.index);
                if covered {
                    progress.become_replicate();
                }
            }
            ProgressState::Replicate => {}
        }
        if moved {
            self.maybe_commit();
        }
        if self.role != Role::Leader {
            return;
        }
        if from == self.lead_transferee {
            self.maybe_send_timeout_now();
        }
        self.send_append(from);
    }

    fn handle_append_reject(
        &mut self,
        from: NodeId,
        rejected: u64,
        conflict_index: u64,
        conflict_term: u64,
        last_log_index: u64,
    ) {
        // The follower's hint is the last index where its term is at most
        // the term we sent; where our log has a term at most the hint's at
        // or below it, the logs may match. A hint of (0, 0) means no entry
        // of the follower can match but the empty prefix: probe from index
        // 1 at once (as etcd does), not one index per round trip. A reject
        // without a hint (a malformed message on our side) carries the
        // follower's length as its index.
        let probe = if conflict_term > 0 {
            self.log
                .find_conflict_by_term(conflict_index, conflict_term)
                .0
        } else {
            conflict_index.min(last_log_index)
        };
        let retry_at = rejected.min(probe + 1);
        let progress = self.progress.get_mut(&from).expect("peer progress");
        if progress.maybe_back_off(rejected, retry_at.max(1)) {
            self.send_append(from);
        }
    }

    fn handle_snapshot_response(
        &mut self,
        from: NodeId,
        meta: SnapshotMeta,
        next_offset: u64,
        success: bool,
    ) {
        let progress = self.progress.get_mut(&from).expect("peer progress");
        let send = match progress.snapshot.as_mut() {
            Some(send) if progress.state == ProgressState::Snapshot => send,
            _ => return,
        };
        let Some(bytes) = &send.data else {
            // Streamed by the driver: this is the outcome of the whole transfer. The view
            // it sent may be newer than our snapshot (any applied index at or past it, within
            // our log), never older.
            let installed = success && meta.index >= send.meta.index;
            if installed && meta.index <= self.log.last_index() {
                progress.update_match(meta.index);
                progress.become_probe();
                progress.catching_up = true;
                self.maybe_commit();
                self.send_append(from);
            } else {
                // Failed (or a stale answer): probe again at the next heartbeat answer,
                // which starts a new snapshot if one is still needed.
                progress.become_probe();
                progress.paused = true;
            }
            return;
        };
        if send.meta != meta {
            return;
        }
        let total_bytes = bytes.len() as u64;
        if success && next_offset >= total_bytes {
            // The follower holds the whole snapshot: its log matches up to it.
            progress.update_match(meta.index);
            progress.become_probe();
            self.maybe_commit();
            self.send_append(from);
            return;
        }
        send.offset = next_offset.min(total_bytes);
        progress.paused = false;
        self.send_snapshot_chunk(from);
    }

    /// A streamed snapshot to `to` reads a view at `index` (the application's applied index,
    /// at or past our snapshot's): returns the term and configuration there, if the log still
    /// knows them, and records `index` as the snapshot being sent, so the log after it is kept
    /// (see [`Self::compaction_floor`]) for the follower to continue from.
    pub fn streamed_snapshot_at(
        &mut self,
        to: NodeId,
        index: u64,
    ) -> Option<(SnapshotMeta, Membership)> {
        let term = self.log.term(index)?;
        let membership = self.membership_at(index)?.clone();
        let meta = SnapshotMeta { index, term };
        if let Some(progress) = self.progress.get_mut(&to) {
            if let Some(send) = progress.snapshot.as_mut().filter(|s| s.data.is_none()) {
                if index < send.meta.index {
                    // An older view than the one being sent (a sender that was replaced).
                    return None;
                }
                send.meta = meta;
                send.membership = membership.clone();
            }
        }
        Some((meta, membership))
    }

    /// The highest index the log may be compacted to now (`u64::MAX`: any). The log after it
    /// is kept for the followers that continue from a streamed snapshot: one receiving it
    /// needs the entries right after the snapshot (without this, a leader under writes could
    /// compact past the view before the transfer ends, and the follower would need another
    /// snapshot, forever), and one that has installed it needs the entries after its match
    /// index until it has caught up with the commit index. A follower is waited for only
    /// while the log kept for it stays within `max_catch_up_log_bytes` (estimated from the
    /// log's average entry size, so this costs O(followers), not O(log)); past that it gets a
    /// snapshot again. A follower that is merely slow or down is not waited for (it gets a
    /// snapshot once the log has moved past it). Only with streamed snapshots: otherwise the
    /// application's snapshot bytes are of the index it asked for, and the log cannot stop
    /// short of it.
    pub fn compaction_floor(&self) -> u64 {
        if self.role != Role::Leader || !self.config.streamed_snapshots {
            return u64::MAX;
        }
        let snapshot_index = self.log.snapshot_meta().index;
        let last_index = self.log.last_index();
        let entries = last_index - snapshot_index;
        let entry_bytes = self.log.size_bytes() / entries.max(1);
        let within_bound = |index: u64| {
            last_index.saturating_sub(index).saturating_mul(entry_bytes)
                <= self.config.max_catch_up_log_bytes
        };
        self.progress
            .iter()
            .filter(|(&id, _)| id != self.config.id)
            .filter_map(|(_, p)| match (&p.state, &p.snapshot) {
                (ProgressState::Snapshot, Some(send)) if send.data.is_none() => {
                    Some(send.meta.index)
                }
                (ProgressState::Snapshot, _) => None,
                _ if p.catching_up => Some(p.match_index),
                _ => None,
            })
            .filter(|&index| index >= snapshot_index && within_bound(index))
            .min()
            .unwrap_or(u64::MAX)
    }

    // -------------------------------------------------------------- ready

    /// The application's snapshot covers everything up to `index` (which it
    /// has applied): entries up to there are dropped from memory, and the
    /// snapshot is what lagging followers will be sent. The driver stores
    /// the snapshot durably itself before calling this.
    ///
    /// With `Config::streamed_snapshots`, `data` is empty: the application keeps its state
    /// durable itself and streams it to a follower that needs it (`Ready::snapshot_sends`).
    pub fn compact(&mut self, index: u64, data: impl Into<Arc<Vec<u8>>>) {
        self.assert_not_in_ready();
        assert!(
            index <= self.log.applied,
            "snapshot at {index} beyond applied {}",
            self.log.applied
        );
        let data = data.into();
        if index <= self.log.snapshot_meta().index {
            return;
        }
        let term = self.log.term(index).expect("snapshot index within the log");
        let membership = self
            .membership_at(index)
            .expect("the base configuration is below the applied index")
            .clone();
        self.log.compact(index);
        // Configurations before the one in force at `index` are gone with
        // their entries; that one becomes the base.
        let keep_from = self
            .conf_history
            .iter()
            .rposition(|record| record.index <= index)
            .expect("base below index");
        self.conf_history.drain(..keep_from);
        self.snapshot = Some(Snapshot {
            meta: SnapshotMeta { index, term },
            membership,
            data,
        });
    }

    pub fn has_ready(&self) -> bool {
        self.hard_state() != self.persisted_hard_state
            || self.log.stable < self.log.last_index()
            || self.pending_snapshot.is_some()
            || !self.messages_unpersisted.is_empty()
            || !self.messages.is_empty()
            || !self.snapshot_sends.is_empty()
            || self.log.applied < self.log.commit
            || !self.read_states.is_empty()
            || self.pending_reads.iter().any(|r| r.round == 0)
    }

    /// Everything the driver must do now (see the module documentation for
    /// the order). Call `advance` once it is done; no other method may be
    /// called in between.
    pub fn ready(&mut self) -> Ready {
        self.assert_not_in_ready();
        self.start_read_round();
        let hard_state = self.hard_state();
        let entries = self.log.unstable_entries();
        let stable_to = self.log.last_index();
        let committed_to = self
            .log
            .commit
            .min(self.log.applied + MAX_COMMITTED_PER_READY);
        let committed = self
            .log
            .slice(self.log.applied + 1, committed_to, usize::MAX);
        let applied_to = self.log.applied + committed.len() as u64;
        self.in_progress = Some(ReadyMark {
            stable_to,
            applied_to,
            hard_state,
        });
        Ready {
            hard_state: (hard_state != self.persisted_hard_state).then_some(hard_state),
            snapshot: self.pending_snapshot.take(),
            entries,
            messages_unpersisted: std::mem::take(&mut self.messages_unpersisted),
            messages: std::mem::take(&mut self.messages),
            committed,
            read_states: std::mem::take(&mut self.read_states),
            snapshot_sends: std::mem::take(&mut self.snapshot_sends),
        }
    }

    /// Records that the last Ready was carried out: its entries are durable
    /// and its committed entries applied.
    pub fn advance(&mut self) {
        let mark = self.in_progress.take().expect("advance without ready");
        self.persisted_hard_state = mark.hard_state;
        self.log.stable = mark.stable_to.min(self.log.last_index());
        self.log.applied = mark.applied_to.max(self.log.applied);
        if self.role == Role::Leader {
            // The leader's own copy counts toward commit once it is durable.
            self.maybe_commit();
        }
        debug_assert!({
            self.log.assert_invariants();
            self.progress.values().for_each(Progress::assert_invariants);
            true
        });
    }

    fn assert_not_in_ready(&self) {
        assert!(
            self.in_progress.is_none(),
            "core used between ready() and advance()"
        );
    }
}

/// The most committed entries one Ready hands out, so that a node catching
/// up on a long log applies it in bounded batches.
const MAX_COMMITTED_PER_READY: u64 = 4096;

/// Whether `entries` are numbered consecutively right after `prev_log_index`,
/// with terms that never decrease from `prev_log_term` on and never exceed
/// the leader's `term`, and conf-change entries that decode: a leader's log
/// has that shape, so a message that does not is malformed (appending it would break the log's invariants).
fn entries_follow(prev_log_index: u64, prev_log_term: u64, term: u64, entries: &[Entry]) -> bool {
    if prev_log_term > term {
        return false;
    }
    let mut prev_term = prev_log_term;
    entries.iter().enumerate().all(|(k, e)| {
        let index = prev_log_index.checked_add(1 + k as u64);
        let decodes = e.kind == EntryKind::Normal || e.membership().is_some();
        let ok = index == Some(e.index) && e.term >= prev_term && e.term <= term && decodes;
        prev_term = e.term;
        ok
    })
}
