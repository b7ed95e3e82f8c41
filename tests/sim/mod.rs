//! A deterministic simulated cluster for the pure Raft core, in the style of
//! etcd's `network` and raft-rs's `harness/network.rs`: N cores, a message
//! queue ordered by logical delivery tick, per-link drop / duplicate / delay
//! faults, partitions of any shape (isolation, splits, one-way links), and
//! crashes that keep only what the node had persisted. Every source of
//! randomness is one seeded `SplitMix64`, so a seed replays a run exactly.
//!
//! After every delivered message, tick and proposal the harness checks the
//! Raft safety properties (Election Safety, Log Matching, Leader
//! Completeness, State Machine Safety), that commit and the persisted term
//! never go back, that applied entries survive crashes, and that every
//! request gets exactly one response, in order. With membership changes it
//! also checks that no two majorities of different configurations commit in
//! one term, that a leader never has two changes in flight, and that a
//! leader removed by a committed change does not go on leading. A violation
//! panics with the seed and how to replay it.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use kvstore_raft::raft::{
    ConfChange, ConfChangeError, Config, Entry, HardState, Membership, Message, MessageBody,
    NodeId, ProposeError, RaftCore, RestoredState, Role, Snapshot, SnapshotMeta, SplitMix64,
    Status, NO_NODE,
};

/// The shortest randomized election timeout, in ticks ("ET" of the test plan).
pub const ET_MIN_TICKS: u64 = 10;
/// One past the longest randomized election timeout, in ticks.
pub const ET_MAX_TICKS: u64 = 20;
/// The leader's heartbeat interval, in ticks ("HB").
pub const HB_TICKS: u64 = 2;
/// A bound on message deliveries within one tick: more means the cores are
/// ping-ponging without ever waiting for time to pass (a livelock).
const MAX_DELIVERIES_PER_TICK: usize = 200_000;
/// A bound on Ready rounds after one input: a core that always has a Ready is broken.
const MAX_READY_ROUNDS_PER_STEP: usize = 10_000;
/// The fixed cost charged per message in the byte statistics (headers, terms, ids).
pub const MESSAGE_OVERHEAD_BYTES: u64 = 32;

/// Faults applied to one class of messages (requests or responses) on a link.
/// Probabilities are in parts per thousand.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkFaults {
    pub drop_per_mille: u64,
    pub duplicate_per_mille: u64,
    /// Every message is delayed by a uniform number of ticks in this range (inclusive).
    pub delay_min_ticks: u64,
    pub delay_max_ticks: u64,
    /// Some messages are instead delayed much longer: long reordering.
    pub long_delay_per_mille: u64,
    pub long_delay_min_ticks: u64,
    pub long_delay_max_ticks: u64,
}

impl LinkFaults {
    pub const NONE: LinkFaults = LinkFaults {
        drop_per_mille: 0,
        duplicate_per_mille: 0,
        delay_min_ticks: 0,
        delay_max_ticks: 0,
        long_delay_per_mille: 0,
        long_delay_min_ticks: 0,
        long_delay_max_ticks: 0,
    };
}

/// The faults of a link, split by message class, because the 6.824 unreliable
/// tests drop and delay requests and replies independently.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetFaults {
    pub requests: LinkFaults,
    pub responses: LinkFaults,
}

impl NetFaults {
    pub const RELIABLE: NetFaults = NetFaults {
        requests: LinkFaults::NONE,
        responses: LinkFaults::NONE,
    };

    /// The 6.824 unreliable network: 10% request and reply drops, 0–3 ticks of delay.
    pub fn unreliable() -> NetFaults {
        let faults = LinkFaults {
            drop_per_mille: 100,
            delay_max_ticks: 3,
            ..LinkFaults::NONE
        };
        NetFaults {
            requests: faults,
            responses: faults,
        }
    }
}

/// The tuning a simulated cluster is built with.
#[derive(Clone, Debug)]
pub struct SimOptions {
    /// Node slots: ids 1..=nodes. Those not in `voters` start with no
    /// configuration (a node started with `--join`) and wait to be added.
    pub nodes: u64,
    /// The bootstrap voters (all slots unless a test says otherwise).
    pub voters: Vec<NodeId>,
    pub seed: u64,
    /// The application compacts the core's log every this many applies (0: never).
    pub snapshot_every_applies: u64,
    /// Filler appended to every application snapshot, so that snapshots span
    /// several InstallSnapshot chunks.
    pub snapshot_pad_bytes: usize,
    pub pre_vote: bool,
    pub check_quorum: bool,
    pub max_inflight_appends: usize,
    pub max_append_bytes: usize,
    pub max_snapshot_chunk_bytes: usize,
    pub max_uncommitted_bytes: usize,
    /// The command used to replay a failure, printed with the seed.
    pub replay_hint: String,
}

impl SimOptions {
    pub fn new(nodes: u64, seed: u64) -> SimOptions {
        SimOptions {
            nodes,
            voters: (1..=nodes).collect(),
            seed,
            snapshot_every_applies: 0,
            snapshot_pad_bytes: 0,
            pre_vote: true,
            check_quorum: true,
            max_inflight_appends: 8,
            max_append_bytes: 64 * 1024,
            max_snapshot_chunk_bytes: 1024,
            max_uncommitted_bytes: 1 << 20,
            replay_hint: String::new(),
        }
    }
}

/// What survives a crash: the node's simulated durable storage.
#[derive(Clone, Debug, Default)]
pub struct Durable {
    pub hard_state: HardState,
    pub snapshot: Option<Snapshot>,
    /// Contiguous entries right after the snapshot (or after index 0).
    pub entries: Vec<Entry>,
}

impl Durable {
    pub fn snapshot_index(&self) -> u64 {
        self.snapshot.as_ref().map_or(0, |s| s.meta.index)
    }

    pub fn last_index(&self) -> u64 {
        self.entries
            .last()
            .map_or(self.snapshot_index(), |entry| entry.index)
    }

    pub fn term_at(&self, index: u64) -> Option<u64> {
        let snapshot = self.snapshot.as_ref().map(|s| s.meta).unwrap_or_default();
        if index == snapshot.index {
            return Some(snapshot.term);
        }
        if index < snapshot.index || index > self.last_index() {
            return None;
        }
        Some(self.entries[(index - snapshot.index - 1) as usize].term)
    }

    /// The persisted Raft state, without the snapshot: what 6.824 calls
    /// `RaftStateSize` and bounds in the snapshot tests.
    pub fn raft_state_bytes(&self) -> usize {
        24 + self.entries.iter().map(Entry::size_bytes).sum::<usize>()
    }
}

/// The toy application: it folds every applied command into a digest, so two
/// nodes at the same index with the same digest applied the same history.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct App {
    pub last_applied: u64,
    pub digest: u64,
    pub last_snapshot_index: u64,
}

impl App {
    /// The snapshot bytes: last applied index, digest, then `pad_bytes` of filler.
    pub fn encode(&self, pad_bytes: usize) -> Vec<u8> {
        let mut data = Vec::with_capacity(16 + pad_bytes);
        data.extend_from_slice(&self.last_applied.to_le_bytes());
        data.extend_from_slice(&self.digest.to_le_bytes());
        let filler = self.digest.to_le_bytes();
        data.extend((0..pad_bytes).map(|k| filler[k % 8]));
        data
    }

    pub fn decode(data: &[u8]) -> Option<App> {
        if data.len() < 16 {
            return None;
        }
        let last_applied = u64::from_le_bytes(data[0..8].try_into().ok()?);
        let digest = u64::from_le_bytes(data[8..16].try_into().ok()?);
        let filler = digest.to_le_bytes();
        if data[16..]
            .iter()
            .enumerate()
            .any(|(k, &b)| b != filler[k % 8])
        {
            return None;
        }
        Some(App {
            last_applied,
            digest,
            last_snapshot_index: last_applied,
        })
    }
}

/// One running node: the core and its (volatile) application.
pub struct Node {
    pub core: RaftCore,
    pub app: App,
    /// The highest commit index this incarnation has shown: it must never go back.
    commit_seen: u64,
    /// The highest term this incarnation has shown.
    term_seen: u64,
}

/// An applied entry as the whole cluster has seen it (State Machine Safety).
#[derive(Clone, Debug)]
pub struct AppliedRecord {
    pub term: u64,
    pub data: Vec<u8>,
    /// The application digest right after applying this entry.
    pub digest: u64,
}

/// Counters of what the network carried.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub messages_sent: u64,
    pub bytes_sent: u64,
    pub append_entries_sent: u64,
    pub heartbeats_sent: u64,
    pub vote_requests_sent: u64,
    pub snapshot_chunks_sent: u64,
    pub requests_sent: u64,
    pub delivered: u64,
    pub dropped: u64,
}

/// Audit of the fast back-off (R8): rejections a follower sends one leader in
/// one term before its first success, against distinct conflicting terms + 2.
#[derive(Clone, Debug, Default)]
struct BackoffEpisode {
    rejections: u64,
    bound: u64,
    done: bool,
}

/// A request kind, to pair each response with the request it answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RpcKind {
    Append,
    Heartbeat,
    Vote,
    Snapshot,
}

fn request_kind(body: &MessageBody) -> Option<RpcKind> {
    match body {
        MessageBody::AppendEntries { .. } => Some(RpcKind::Append),
        MessageBody::Heartbeat { .. } => Some(RpcKind::Heartbeat),
        MessageBody::RequestVote { .. } => Some(RpcKind::Vote),
        MessageBody::InstallSnapshot { .. } => Some(RpcKind::Snapshot),
        _ => None,
    }
}

fn response_kind(body: &MessageBody) -> Option<RpcKind> {
    match body {
        MessageBody::AppendEntriesResponse { .. } => Some(RpcKind::Append),
        MessageBody::HeartbeatResponse { .. } => Some(RpcKind::Heartbeat),
        MessageBody::RequestVoteResponse { .. } => Some(RpcKind::Vote),
        MessageBody::InstallSnapshotResponse { .. } => Some(RpcKind::Snapshot),
        _ => None,
    }
}

/// The bytes a message costs on the wire, for the byte budget (R10).
pub fn message_bytes(message: &Message) -> u64 {
    let payload = match &message.body {
        MessageBody::AppendEntries { entries, .. } => {
            entries.iter().map(|e| e.size_bytes() as u64).sum()
        }
        MessageBody::InstallSnapshot { data, .. } => data.len() as u64,
        _ => 0,
    };
    MESSAGE_OVERHEAD_BYTES + payload
}

/// FNV-1a: a stable 64-bit hash of a command.
pub fn hash_bytes(data: &[u8]) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    for &b in data {
        hash ^= b as u64;
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

fn fold_digest(digest: u64, index: u64, data: &[u8]) -> u64 {
    let mut z = digest ^ hash_bytes(data) ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z ^ (z >> 31)
}

/// A filter that decides to drop a message regardless of links (etcd's `ignore`).
pub type DropFilter = Box<dyn FnMut(&Message) -> bool + Send>;

/// The simulated cluster. Node ids are 1..=N; slot `id - 1` of each vector.
pub struct Sim {
    pub options: SimOptions,
    pub rng: SplitMix64,
    pub now_ticks: u64,
    nodes: Vec<Option<Node>>,
    durable: Vec<Durable>,
    /// In-flight messages keyed by (delivery tick, send sequence).
    queue: BTreeMap<(u64, u64), Message>,
    next_seq: u64,

    /// `false`: the node is cut off from everyone (6.824's `disconnect`).
    connected: Vec<bool>,
    /// Partition groups: messages cross only between nodes of one group.
    group: Vec<u32>,
    /// One-way blocked links (from, to).
    blocked: BTreeMap<(NodeId, NodeId), ()>,
    /// Network faults applied to links without an override.
    pub faults: NetFaults,
    pub link_faults: BTreeMap<(NodeId, NodeId), NetFaults>,
    pub drop_filter: Option<DropFilter>,
    /// When set, every message sent is recorded here.
    pub trace: Option<Vec<Message>>,
    /// When set, a node crashes in the middle of its next Ready: after
    /// sending `messages_unpersisted`, before persisting anything.
    crash_in_ready: Vec<bool>,

    pub stats: Stats,

    // ---- the invariant checker's memory
    leaders_by_term: BTreeMap<u64, NodeId>,
    /// (index, term) -> (data hash, term of the entry before): an entry is
    /// created once, by one leader, so this never changes (Log Matching).
    entry_ids: HashMap<(u64, u64), (u64, u64)>,
    /// index -> (term, term of the node that saw it committed).
    committed: BTreeMap<u64, (u64, u64)>,
    /// Applied entries, index i at slot i - 1, as the first node applied them.
    applied: Vec<AppliedRecord>,
    /// Responses each node owes each requester: (responder, requester) -> kinds in order.
    owed: BTreeMap<(NodeId, NodeId), VecDeque<RpcKind>>,
    /// Outstanding ReadIndex requests: context -> (node, lowest acceptable index).
    pending_reads: BTreeMap<u64, (NodeId, u64)>,
    next_read_context: u64,
    /// R8's fast back-off audit, when enabled.
    pub audit_backoff: bool,
    backoff: BTreeMap<(NodeId, u64, NodeId), BackoffEpisode>,
    pub max_backoff_rejections: u64,
    /// `SIM_TRACE=1` prints every delivered message (for replaying a seed).
    print_trace: bool,
    crashes: u64,
    reads_answered: u64,
    /// term -> the voter sets under which that term's leader committed.
    commit_configs: BTreeMap<u64, Vec<BTreeSet<NodeId>>>,
    pub commit_configs_recorded: u64,
}

impl Sim {
    pub fn new(options: SimOptions) -> Sim {
        assert!(options.nodes >= 1);
        let n = options.nodes as usize;
        let mut sim = Sim {
            rng: SplitMix64::new(options.seed),
            now_ticks: 0,
            nodes: (0..n).map(|_| None).collect(),
            durable: vec![Durable::default(); n],
            queue: BTreeMap::new(),
            next_seq: 0,
            connected: vec![true; n],
            group: vec![0; n],
            blocked: BTreeMap::new(),
            faults: NetFaults::RELIABLE,
            link_faults: BTreeMap::new(),
            drop_filter: None,
            trace: None,
            crash_in_ready: vec![false; n],
            stats: Stats::default(),
            leaders_by_term: BTreeMap::new(),
            entry_ids: HashMap::new(),
            committed: BTreeMap::new(),
            applied: Vec::new(),
            owed: BTreeMap::new(),
            pending_reads: BTreeMap::new(),
            next_read_context: 1,
            audit_backoff: false,
            backoff: BTreeMap::new(),
            max_backoff_rejections: 0,
            print_trace: std::env::var_os("SIM_TRACE").is_some(),
            crashes: 0,
            reads_answered: 0,
            commit_configs: BTreeMap::new(),
            commit_configs_recorded: 0,
            options,
        };
        for id in sim.ids() {
            sim.start_node(id);
        }
        sim
    }

    /// A cluster of `nodes` with default options.
    pub fn with_nodes(nodes: u64, seed: u64) -> Sim {
        Sim::new(SimOptions::new(nodes, seed))
    }

    // ------------------------------------------------------------ failure

    /// Panics with the seed, the tick and how to replay the run.
    #[track_caller]
    pub fn fail(&self, what: &str) -> ! {
        let hint = if self.options.replay_hint.is_empty() {
            "cargo test --release --test raft_sim (same test)".to_string()
        } else {
            self.options.replay_hint.clone()
        };
        panic!(
            "simulation failure (seed {}, tick {}): {what}\n  replay: {hint}",
            self.options.seed, self.now_ticks
        );
    }

    /// `assert!` for scenarios: a failure carries the seed.
    #[track_caller]
    pub fn ensure(&self, condition: bool, what: impl FnOnce() -> String) {
        if !condition {
            self.fail(&what());
        }
    }

    // ------------------------------------------------------------ access

    pub fn ids(&self) -> Vec<NodeId> {
        (1..=self.options.nodes).collect()
    }

    fn slot(id: NodeId) -> usize {
        (id - 1) as usize
    }

    pub fn is_up(&self, id: NodeId) -> bool {
        self.nodes[Sim::slot(id)].is_some()
    }

    pub fn up_ids(&self) -> Vec<NodeId> {
        self.ids()
            .into_iter()
            .filter(|&id| self.is_up(id))
            .collect()
    }

    pub fn node(&self, id: NodeId) -> &Node {
        match &self.nodes[Sim::slot(id)] {
            Some(node) => node,
            None => self.fail(&format!("node {id} is down")),
        }
    }

    pub fn core(&self, id: NodeId) -> &RaftCore {
        &self.node(id).core
    }

    pub fn status(&self, id: NodeId) -> Status {
        self.core(id).status()
    }

    pub fn durable(&self, id: NodeId) -> &Durable {
        &self.durable[Sim::slot(id)]
    }

    pub fn app(&self, id: NodeId) -> App {
        self.node(id).app
    }

    /// Every live node that believes it leads, with its term.
    pub fn leaders(&self) -> Vec<(NodeId, u64)> {
        self.up_ids()
            .into_iter()
            .filter(|&id| self.core(id).role() == Role::Leader)
            .map(|id| (id, self.core(id).term()))
            .collect()
    }

    /// The leader of the highest term among live nodes, if any.
    pub fn leader(&self) -> Option<NodeId> {
        self.leaders()
            .into_iter()
            .max_by_key(|&(_, term)| term)
            .map(|(id, _)| id)
    }

    /// The applied command at `index`, as the cluster applied it.
    pub fn applied_record(&self, index: u64) -> Option<&AppliedRecord> {
        if index == 0 {
            return None;
        }
        self.applied.get((index - 1) as usize)
    }

    pub fn applied_len(&self) -> u64 {
        self.applied.len() as u64
    }

    /// The highest index known committed anywhere.
    pub fn max_committed(&self) -> u64 {
        self.committed.keys().next_back().copied().unwrap_or(0)
    }

    /// How many live nodes have applied `index`, and the command there.
    pub fn n_committed(&self, index: u64) -> (usize, Option<Vec<u8>>) {
        let count = self
            .up_ids()
            .into_iter()
            .filter(|&id| self.app(id).last_applied >= index)
            .count();
        let data = self.applied_record(index).map(|r| r.data.clone());
        (count, data)
    }

    // ------------------------------------------------------------ topology

    pub fn is_connected(&self, id: NodeId) -> bool {
        self.connected[Sim::slot(id)]
    }

    /// Cuts the node off from everyone, both ways (6.824's `disconnect`).
    pub fn disconnect(&mut self, id: NodeId) {
        self.connected[Sim::slot(id)] = false;
    }

    pub fn connect(&mut self, id: NodeId) {
        self.connected[Sim::slot(id)] = true;
    }

    /// Splits the cluster into groups; nodes not listed form one more group.
    pub fn partition(&mut self, groups: &[&[NodeId]]) {
        let rest = groups.len() as u32 + 1;
        self.group = vec![rest; self.options.nodes as usize];
        for (g, members) in groups.iter().enumerate() {
            for &id in members.iter() {
                self.group[Sim::slot(id)] = g as u32 + 1;
            }
        }
    }

    /// Isolates one node from all others (a partition, as opposed to `disconnect`).
    pub fn isolate(&mut self, id: NodeId) {
        self.partition(&[&[id]]);
    }

    /// Blocks the link from `from` to `to` only.
    pub fn block_one_way(&mut self, from: NodeId, to: NodeId) {
        self.blocked.insert((from, to), ());
    }

    pub fn unblock_one_way(&mut self, from: NodeId, to: NodeId) {
        self.blocked.remove(&(from, to));
    }

    /// Removes partitions and one-way blocks and reconnects everyone.
    pub fn heal_partitions(&mut self) {
        self.group.iter_mut().for_each(|g| *g = 0);
        self.blocked.clear();
        self.connected.iter_mut().for_each(|c| *c = true);
    }

    /// Heals the network completely: partitions, faults and the drop filter.
    pub fn heal_network(&mut self) {
        self.heal_partitions();
        self.faults = NetFaults::RELIABLE;
        self.link_faults.clear();
        self.drop_filter = None;
    }

    /// Whether a message from `from` can reach `to` right now.
    pub fn link_up(&self, from: NodeId, to: NodeId) -> bool {
        self.connected[Sim::slot(from)]
            && self.connected[Sim::slot(to)]
            && self.group[Sim::slot(from)] == self.group[Sim::slot(to)]
            && !self.blocked.contains_key(&(from, to))
    }

    pub fn in_flight(&self) -> usize {
        self.queue.len()
    }

    // ------------------------------------------------------------ crashes

    fn node_config(&mut self, id: NodeId) -> Config {
        let o = &self.options;
        let voters: Vec<NodeId> = if o.voters.contains(&id) {
            o.voters.clone()
        } else {
            Vec::new()
        };
        let mut config = Config::new(id, voters);
        config.promote_max_lag_entries = 20;
        config.election_timeout_min_ticks = ET_MIN_TICKS as u32;
        config.election_timeout_max_ticks = ET_MAX_TICKS as u32;
        config.heartbeat_interval_ticks = HB_TICKS as u32;
        config.max_inflight_appends = o.max_inflight_appends;
        config.max_append_bytes = o.max_append_bytes;
        config.max_snapshot_chunk_bytes = o.max_snapshot_chunk_bytes;
        config.max_uncommitted_bytes = o.max_uncommitted_bytes;
        config.pre_vote = o.pre_vote;
        config.check_quorum = o.check_quorum;
        config.seed = self.rng.next_u64();
        config
    }

    fn start_node(&mut self, id: NodeId) {
        let config = self.node_config(id);
        let d = self.durable[Sim::slot(id)].clone();
        let app = match &d.snapshot {
            Some(snapshot) => match App::decode(&snapshot.data) {
                Some(app) => app,
                None => self.fail(&format!("node {id}: stored snapshot does not decode")),
            },
            None => App::default(),
        };
        let core = RaftCore::new(
            config,
            RestoredState {
                hard_state: d.hard_state,
                snapshot: d.snapshot.clone(),
                entries: d.entries.clone(),
            },
        );
        self.nodes[Sim::slot(id)] = Some(Node {
            core,
            app,
            commit_seen: 0,
            term_seen: 0,
        });
        self.after_input(id);
    }

    /// Crashes the node: everything not persisted is lost. Messages it sent
    /// that are in flight may still arrive.
    pub fn crash(&mut self, id: NodeId) {
        let node = match self.nodes[Sim::slot(id)].take() {
            Some(node) => node,
            None => return,
        };
        // Applied entries are committed and were durable before they were
        // applied: the storage must still hold them (or a snapshot past them).
        let d = &self.durable[Sim::slot(id)];
        let applied = node.app.last_applied;
        if applied > d.snapshot_index() {
            let expected = self.applied_record(applied).map(|r| r.term);
            if d.term_at(applied) != expected {
                self.fail(&format!(
                    "node {id} crashed having applied {applied} (term {expected:?}) but its \
                     storage holds term {:?} there: an applied entry would be lost",
                    d.term_at(applied)
                ));
            }
        }
        self.owed.retain(|&(responder, _), _| responder != id);
        self.crash_in_ready[Sim::slot(id)] = false;
        self.crashes += 1;
    }

    /// Restarts the node from its durable storage only (6.824's `start1`:
    /// a running node is crashed first).
    pub fn restart(&mut self, id: NodeId) {
        self.crash(id);
        self.start_node(id);
    }

    /// Arms a crash in the middle of the node's next Ready.
    pub fn crash_during_next_ready(&mut self, id: NodeId) {
        if self.is_up(id) {
            self.crash_in_ready[Sim::slot(id)] = true;
        }
    }

    // ------------------------------------------------------------ inputs

    /// Proposes a command on `id` (which must be up).
    pub fn propose(&mut self, id: NodeId, data: Vec<u8>) -> Result<u64, ProposeError> {
        assert!(
            !data.is_empty(),
            "proposals must not be empty (no-ops are the core's)"
        );
        let result = self.with_core(id, |core| core.propose(data));
        self.after_input(id);
        result
    }

    pub fn propose_batch(&mut self, id: NodeId, batch: Vec<Vec<u8>>) -> Result<u64, ProposeError> {
        let result = self.with_core(id, |core| core.propose_batch(batch));
        self.after_input(id);
        result
    }

    /// Asks `id` for a ReadIndex barrier. Any ReadState it later yields must
    /// be at or past every index committed anywhere now (linearizability).
    pub fn read_index(&mut self, id: NodeId) -> Result<u64, ProposeError> {
        let context = self.next_read_context;
        self.next_read_context += 1;
        let result = self.with_core(id, |core| core.read_index(context));
        if result.is_ok() {
            let floor = self.max_committed();
            self.pending_reads.insert(context, (id, floor));
        }
        self.after_input(id);
        result.map(|()| context)
    }

    /// Compacts `id`'s log at its applied index, as the application would.
    pub fn compact(&mut self, id: NodeId) {
        let slot = Sim::slot(id);
        let pad = self.options.snapshot_pad_bytes;
        let node = self.nodes[slot].as_mut().expect("node up");
        let app = node.app;
        if app.last_applied <= self.durable[slot].snapshot_index() {
            return;
        }
        let data = app.encode(pad);
        let term = match node.core.term_at(app.last_applied) {
            Some(term) => term,
            None => self.fail(&format!(
                "node {id}: no term at its applied index {}",
                app.last_applied
            )),
        };
        let membership = match node.core.membership_at(app.last_applied) {
            Some(membership) => membership.clone(),
            None => self.fail(&format!(
                "node {id}: no configuration at {}",
                app.last_applied
            )),
        };
        // The application stores the snapshot durably before handing it over.
        let d = &mut self.durable[slot];
        d.snapshot = Some(Snapshot {
            meta: SnapshotMeta {
                index: app.last_applied,
                term,
            },
            membership,
            data: Arc::new(data.clone()),
        });
        d.entries.retain(|e| e.index > app.last_applied);
        let node = self.nodes[slot].as_mut().expect("node up");
        node.app.last_snapshot_index = app.last_applied;
        node.core.compact(app.last_applied, data);
        self.after_input(id);
    }

    /// Proposes a membership change on `id` (which must be up).
    pub fn conf_change(&mut self, id: NodeId, change: ConfChange) -> Result<u64, ConfChangeError> {
        let result = self.with_core(id, |core| core.propose_conf_change(change));
        self.after_input(id);
        result
    }

    /// Asks leader `id` to hand leadership to `to`.
    pub fn transfer_leader(&mut self, id: NodeId, to: NodeId) -> Result<(), ConfChangeError> {
        let result = self.with_core(id, |core| core.transfer_leader(to));
        self.after_input(id);
        result
    }

    /// The configuration in force on `id`.
    pub fn membership(&self, id: NodeId) -> Membership {
        self.core(id).membership().clone()
    }

    /// Crashes `id` and loses its disk: it may only come back as a new,
    /// empty node (a `--join` node with no configuration).
    pub fn wipe(&mut self, id: NodeId) {
        self.crash(id);
        self.durable[Sim::slot(id)] = Durable::default();
        self.options.voters.retain(|&v| v != id);
    }

    /// Queues a hand-built message for delivery at the current tick.
    pub fn inject(&mut self, message: Message) {
        let at = self.now_ticks;
        self.enqueue(at, message);
    }

    /// Delivers one message right now, bypassing the queue and the links.
    pub fn deliver_now(&mut self, message: Message) {
        self.deliver(message);
    }

    fn with_core<T>(&mut self, id: NodeId, f: impl FnOnce(&mut RaftCore) -> T) -> T {
        match self.nodes[Sim::slot(id)].as_mut() {
            Some(node) => f(&mut node.core),
            None => self.fail(&format!("node {id} is down")),
        }
    }

    // ------------------------------------------------------------ time

    /// One tick: every live core ticks, then every message due is delivered.
    pub fn tick(&mut self) {
        self.now_ticks += 1;
        for id in self.ids() {
            if self.is_up(id) {
                self.with_core(id, RaftCore::tick);
                self.after_input(id);
            }
        }
        self.deliver_due();
    }

    pub fn run(&mut self, ticks: u64) {
        for _ in 0..ticks {
            self.tick();
        }
    }

    /// Ticks until `done` holds (checked before each tick), at most `max_ticks`.
    /// Returns the ticks it took, or None.
    pub fn run_until(&mut self, max_ticks: u64, mut done: impl FnMut(&Sim) -> bool) -> Option<u64> {
        for waited in 0..=max_ticks {
            if done(self) {
                return Some(waited);
            }
            if waited < max_ticks {
                self.tick();
            }
        }
        None
    }

    /// Delivers every message due at the current tick, including ones sent
    /// while doing so with no delay.
    pub fn deliver_due(&mut self) {
        let mut deliveries = 0;
        while let Some((&(at, seq), _)) = self.queue.first_key_value() {
            if at > self.now_ticks {
                break;
            }
            let message = self.queue.remove(&(at, seq)).expect("present");
            self.deliver(message);
            deliveries += 1;
            if deliveries > MAX_DELIVERIES_PER_TICK {
                self.fail("more than MAX_DELIVERIES_PER_TICK deliveries in one tick: livelock");
            }
        }
    }

    // ------------------------------------------------------------ network

    fn enqueue(&mut self, at: u64, message: Message) {
        self.queue.insert((at, self.next_seq), message);
        self.next_seq += 1;
    }

    fn faults_for(&self, message: &Message) -> LinkFaults {
        let faults = self
            .link_faults
            .get(&(message.from, message.to))
            .copied()
            .unwrap_or(self.faults);
        if message.body.is_request() {
            faults.requests
        } else {
            faults.responses
        }
    }

    fn draw_delay(&mut self, f: &LinkFaults) -> u64 {
        if f.long_delay_per_mille > 0 && self.rng.chance(f.long_delay_per_mille, 1000) {
            return self
                .rng
                .range(f.long_delay_min_ticks, f.long_delay_max_ticks + 1);
        }
        self.rng.range(f.delay_min_ticks, f.delay_max_ticks + 1)
    }

    fn send(&mut self, from: NodeId, message: Message) {
        if message.from != from || message.to == from || message.to == NO_NODE {
            self.fail(&format!(
                "node {from} sent a misaddressed message {message:?}"
            ));
        }
        if message.to > self.options.nodes {
            self.fail(&format!("node {from} sent to unknown node {}", message.to));
        }
        self.account_response(&message);
        self.audit_rejection(&message);
        self.count(&message);
        if let Some(trace) = &mut self.trace {
            trace.push(message.clone());
        }
        if let Some(filter) = &mut self.drop_filter {
            if filter(&message) {
                self.stats.dropped += 1;
                return;
            }
        }
        let f = self.faults_for(&message);
        if f.drop_per_mille > 0 && self.rng.chance(f.drop_per_mille, 1000) {
            self.stats.dropped += 1;
            return;
        }
        if f.duplicate_per_mille > 0 && self.rng.chance(f.duplicate_per_mille, 1000) {
            let delay = self.draw_delay(&f);
            self.enqueue(self.now_ticks + delay, message.clone());
        }
        let delay = self.draw_delay(&f);
        self.enqueue(self.now_ticks + delay, message);
    }

    fn count(&mut self, message: &Message) {
        let s = &mut self.stats;
        s.messages_sent += 1;
        s.bytes_sent += message_bytes(message);
        if message.body.is_request() {
            s.requests_sent += 1;
        }
        match message.body {
            MessageBody::AppendEntries { .. } => s.append_entries_sent += 1,
            MessageBody::Heartbeat { .. } => s.heartbeats_sent += 1,
            MessageBody::RequestVote { .. } => s.vote_requests_sent += 1,
            MessageBody::InstallSnapshot { .. } => s.snapshot_chunks_sent += 1,
            _ => {}
        }
    }

    fn deliver(&mut self, message: Message) {
        let to = message.to;
        if !self.link_up(message.from, to) || !self.is_up(to) {
            self.stats.dropped += 1;
            return;
        }
        self.stats.delivered += 1;
        if self.print_trace {
            eprintln!("tick {} deliver {message:?}", self.now_ticks);
        }
        let from = message.from;
        if let Some(kind) = request_kind(&message.body) {
            self.owed.entry((to, from)).or_default().push_back(kind);
        }
        self.with_core(to, |core| core.step(message));
        self.after_input(to);
        if self.is_up(to) {
            if let Some(left) = self.owed.get(&(to, from)).filter(|q| !q.is_empty()) {
                self.fail(&format!(
                    "node {to} did not answer {left:?} from node {from} in the Ready after the request"
                ));
            }
        }
    }

    /// Every request gets exactly one response, in order received.
    fn account_response(&mut self, message: &Message) {
        let kind = match response_kind(&message.body) {
            Some(kind) => kind,
            None => return,
        };
        let queue = self.owed.entry((message.from, message.to)).or_default();
        match queue.pop_front() {
            Some(expected) if expected == kind => {}
            Some(expected) => self.fail(&format!(
                "node {} answered a {expected:?} request of node {} with {kind:?}: responses out of order",
                message.from, message.to
            )),
            None => self.fail(&format!(
                "node {} sent an unsolicited {kind:?} response to node {}: {message:?}",
                message.from, message.to
            )),
        }
    }

    // ------------------------------------------------------------ Ready

    /// Runs the node's Ready loop to completion, then checks the invariants.
    fn after_input(&mut self, id: NodeId) {
        let slot = Sim::slot(id);
        let mut rounds = 0;
        loop {
            let mut node = match self.nodes[slot].take() {
                Some(node) => node,
                None => return,
            };
            if !node.core.has_ready() {
                self.nodes[slot] = Some(node);
                break;
            }
            rounds += 1;
            if rounds > MAX_READY_ROUNDS_PER_STEP {
                self.nodes[slot] = Some(node);
                self.fail(&format!("node {id} always has a Ready"));
            }
            let rd = node.core.ready();
            if self.crash_in_ready[slot] {
                // Messages that do not depend on persistence may have left
                // before the crash; nothing of this Ready reached the disk.
                for message in rd.messages_unpersisted {
                    self.send(id, message);
                }
                self.owed.retain(|&(responder, _), _| responder != id);
                self.crash_in_ready[slot] = false;
                self.nodes[slot] = Some(node);
                self.crash(id);
                return;
            }
            self.persist(id, &node, &rd);
            for message in rd.messages_unpersisted {
                self.send(id, message);
            }
            for message in rd.messages {
                self.send(id, message);
            }
            self.apply(id, &mut node, rd.snapshot.as_ref(), &rd.committed);
            for read in &rd.read_states {
                self.check_read(id, &node, read.context, read.index);
            }
            node.core.advance();
            self.nodes[slot] = Some(node);
        }
        self.check_node(id);
        self.maybe_auto_compact(id);
    }

    fn maybe_auto_compact(&mut self, id: NodeId) {
        let every = self.options.snapshot_every_applies;
        if every == 0 {
            return;
        }
        let app = self.app(id);
        if app.last_applied >= app.last_snapshot_index + every {
            self.compact(id);
        }
    }

    fn persist(&mut self, id: NodeId, node: &Node, rd: &kvstore_raft::raft::Ready) {
        let slot = Sim::slot(id);
        if let Some(hs) = rd.hard_state {
            let old = self.durable[slot].hard_state;
            if hs.term < old.term {
                self.fail(&format!(
                    "node {id}: persisted term goes back {} -> {}",
                    old.term, hs.term
                ));
            }
            if hs.term == old.term && old.vote != NO_NODE && hs.vote != old.vote {
                self.fail(&format!(
                    "node {id}: vote changed within term {}: {} -> {}",
                    hs.term, old.vote, hs.vote
                ));
            }
            if hs.commit < old.commit {
                self.fail(&format!(
                    "node {id}: persisted commit goes back {} -> {}",
                    old.commit, hs.commit
                ));
            }
            self.durable[slot].hard_state = hs;
        }
        if let Some(snapshot) = &rd.snapshot {
            let dropped: Vec<(u64, u64)> = self.durable[slot]
                .entries
                .iter()
                .filter(|e| e.index > snapshot.meta.index)
                .map(|e| (e.index, e.term))
                .collect();
            for (index, term) in dropped {
                self.check_not_committed(id, index, term, "installing a snapshot");
            }
            if snapshot.meta.index < self.durable[slot].snapshot_index() {
                self.fail(&format!(
                    "node {id}: snapshot at {} replaces a newer stored one at {}",
                    snapshot.meta.index,
                    self.durable[slot].snapshot_index()
                ));
            }
            let d = &mut self.durable[slot];
            d.snapshot = Some(snapshot.clone());
            d.entries.clear();
        }
        if let Some(first) = rd.entries.first() {
            let first_index = first.index;
            let d = &self.durable[slot];
            if first_index <= d.snapshot_index() || first_index > d.last_index() + 1 {
                self.fail(&format!(
                    "node {id}: Ready entries start at {first_index}, stored log is ({}, {}]",
                    d.snapshot_index(),
                    d.last_index()
                ));
            }
            let overwritten: Vec<(u64, u64)> = d
                .entries
                .iter()
                .filter(|e| e.index >= first_index)
                .map(|e| (e.index, e.term))
                .collect();
            for (index, term) in overwritten {
                self.check_not_committed(id, index, term, "truncating its log");
            }
            let d = &mut self.durable[slot];
            d.entries.retain(|e| e.index < first_index);
            for entry in &rd.entries {
                let d = &self.durable[slot];
                if entry.index != d.last_index() + 1 {
                    self.fail(&format!(
                        "node {id}: Ready entries are not contiguous at {}",
                        entry.index
                    ));
                }
                let prev_term = d.term_at(entry.index - 1).unwrap_or(0);
                self.check_entry_identity(id, entry, prev_term);
                self.durable[slot].entries.push(entry.clone());
            }
        }
        let hs = self.durable[slot].hard_state;
        let last_term = self.durable[slot]
            .term_at(self.durable[slot].last_index())
            .unwrap_or(0);
        if hs.term < last_term {
            self.fail(&format!(
                "node {id}: stored term {} is below its stored log's last term {last_term}",
                hs.term
            ));
        }
        let _ = node;
    }

    /// An entry (index, term) is created once, by the leader of that term:
    /// every copy has the same command and follows the same previous term.
    /// Checked for every entry that reaches any log, this is Log Matching.
    fn check_entry_identity(&mut self, id: NodeId, entry: &Entry, prev_term: u64) {
        let key = (entry.index, entry.term);
        let value = (hash_bytes(&entry.data), prev_term);
        match self.entry_ids.get(&key) {
            Some(&seen) if seen != value => self.fail(&format!(
                "Log Matching: node {id} stores entry (index {}, term {}) with (hash, prev term) {value:?}, \
                 another log has {seen:?}",
                entry.index, entry.term
            )),
            Some(_) => {}
            None => {
                self.entry_ids.insert(key, value);
            }
        }
    }

    fn check_not_committed(&self, id: NodeId, index: u64, term: u64, doing: &str) {
        if let Some(&(committed_term, _)) = self.committed.get(&index) {
            if committed_term == term {
                self.fail(&format!(
                    "node {id} drops committed entry (index {index}, term {term}) by {doing}"
                ));
            }
        }
    }

    fn apply(
        &mut self,
        id: NodeId,
        node: &mut Node,
        snapshot: Option<&Snapshot>,
        committed: &[Entry],
    ) {
        if let Some(snapshot) = snapshot {
            let index = snapshot.meta.index;
            if index < node.app.last_applied {
                self.fail(&format!(
                    "node {id}: snapshot at {index} would roll back applied state at {}",
                    node.app.last_applied
                ));
            }
            let app = match App::decode(&snapshot.data) {
                Some(app) => app,
                None => self.fail(&format!("node {id}: snapshot at {index} is corrupt")),
            };
            let expected = self.applied_record(index).map(|r| (r.term, r.digest));
            if app.last_applied != index || expected != Some((snapshot.meta.term, app.digest)) {
                self.fail(&format!(
                    "node {id}: snapshot (index {index}, term {}) holds state {app:?}, the cluster \
                     applied {expected:?} there",
                    snapshot.meta.term
                ));
            }
            node.app = app;
        }
        let commit = node.core.status().commit;
        for entry in committed {
            if entry.index != node.app.last_applied + 1 {
                self.fail(&format!(
                    "node {id} applies index {} after {}",
                    entry.index, node.app.last_applied
                ));
            }
            if entry.index > commit {
                self.fail(&format!(
                    "node {id} applies {} beyond its commit {commit}",
                    entry.index
                ));
            }
            let d = &self.durable[Sim::slot(id)];
            if d.term_at(entry.index) != Some(entry.term) {
                self.fail(&format!(
                    "node {id} applies (index {}, term {}) that its storage does not hold (term {:?})",
                    entry.index,
                    entry.term,
                    d.term_at(entry.index)
                ));
            }
            let digest = fold_digest(node.app.digest, entry.index, &entry.data);
            match self.applied_record(entry.index) {
                Some(record) => {
                    if record.term != entry.term
                        || record.data != entry.data
                        || record.digest != digest
                    {
                        self.fail(&format!(
                            "State Machine Safety: node {id} applies (index {}, term {}, {} bytes) where \
                             the cluster applied (term {}, {} bytes)",
                            entry.index,
                            entry.term,
                            entry.data.len(),
                            record.term,
                            record.data.len()
                        ));
                    }
                }
                None => {
                    if entry.index != self.applied_len() + 1 {
                        self.fail(&format!(
                            "node {id} applies {} but the cluster applied only up to {}",
                            entry.index,
                            self.applied_len()
                        ));
                    }
                    self.applied.push(AppliedRecord {
                        term: entry.term,
                        data: entry.data.clone(),
                        digest,
                    });
                }
            }
            node.app.last_applied = entry.index;
            node.app.digest = digest;
        }
    }

    fn check_read(&mut self, id: NodeId, node: &Node, context: u64, index: u64) {
        match self.pending_reads.remove(&context) {
            Some((asked, floor)) => {
                self.reads_answered += 1;
                if asked != id {
                    self.fail(&format!(
                        "node {id} released read {context} asked of node {asked}"
                    ));
                }
                if index < floor {
                    self.fail(&format!(
                        "linearizability: read {context} on node {id} got index {index}, but {floor} \
                         was committed when it was asked"
                    ));
                }
                let commit = node.core.status().commit;
                if index > commit {
                    self.fail(&format!(
                        "node {id}: read index {index} beyond its commit {commit}"
                    ));
                }
            }
            None => self.fail(&format!(
                "node {id} released unknown or repeated read {context}"
            )),
        }
    }

    // ------------------------------------------------------------ invariants

    /// The per-node checks after each input: the harness contract, commit and
    /// term monotonicity, committed entries, Election Safety and Leader
    /// Completeness.
    fn check_node(&mut self, id: NodeId) {
        let slot = Sim::slot(id);
        let status = match &self.nodes[slot] {
            Some(node) => node.core.status(),
            None => return,
        };
        let d = &self.durable[slot];
        if status.last_index != d.last_index() {
            self.fail(&format!(
                "node {id}: core's last index {} differs from the stored log's {} after a full Ready",
                status.last_index,
                d.last_index()
            ));
        }
        let node = self.nodes[slot].as_ref().expect("up");
        let (commit_seen, term_seen) = (node.commit_seen, node.term_seen);
        if status.commit < commit_seen {
            self.fail(&format!(
                "node {id}: commit goes back {commit_seen} -> {}",
                status.commit
            ));
        }
        if status.term < term_seen {
            self.fail(&format!(
                "node {id}: term goes back {term_seen} -> {}",
                status.term
            ));
        }
        if status.commit > commit_seen {
            let newly: Vec<(u64, u64)> = (commit_seen + 1..=status.commit)
                .filter_map(|i| node.core.term_at(i).map(|t| (i, t)))
                .collect();
            for (index, term) in newly {
                self.record_committed(id, index, term, status.term);
            }
        }
        if status.role == Role::Leader {
            self.check_leader_membership(id, status.commit > commit_seen);
        }
        let node = self.nodes[slot].as_mut().expect("up");
        node.commit_seen = status.commit;
        node.term_seen = status.term;
        if status.role == Role::Leader {
            match self.leaders_by_term.get(&status.term) {
                Some(&other) if other != id => self.fail(&format!(
                    "Election Safety: nodes {other} and {id} both lead term {}",
                    status.term
                )),
                Some(_) => {}
                None => {
                    self.leaders_by_term.insert(status.term, id);
                    self.check_leader_completeness(id);
                }
            }
        }
    }

    /// The membership invariants, on a leader after each input:
    /// - its latest configuration and its committed one differ by at most one
    ///   voter (one single-server change in flight);
    /// - a leader the committed configuration removed does not lead on;
    /// - when its commit moves, the voter set it counts with must have
    ///   majorities that overlap those of the set the cluster last committed
    ///   with (earlier in this term, else in the latest earlier term): two
    ///   configurations one after the other can never both commit without a
    ///   shared voter (the single-server change bug of Ongaro's 2015 post
    ///   breaks exactly this).
    fn check_leader_membership(&mut self, id: NodeId, committed_now: bool) {
        let core = self.core(id);
        let term = core.term();
        let latest: BTreeSet<NodeId> = core.membership().voters.keys().copied().collect();
        let committed: BTreeSet<NodeId> =
            core.committed_membership().voters.keys().copied().collect();
        let changed = latest.symmetric_difference(&committed).count();
        if changed > 1 {
            self.fail(&format!(
                "leader {id} (term {term}) has {changed} voter changes in flight: committed \
                 {committed:?}, in force {latest:?}"
            ));
        }
        if !core.committed_membership().is_voter(id) && core.conf_index() <= core.status().commit {
            self.fail(&format!(
                "leader {id} (term {term}) leads on after the committed configuration \
                 {committed:?} removed it"
            ));
        }
        if !committed_now {
            return;
        }
        let previous = self
            .commit_configs
            .range(..=term)
            .next_back()
            .and_then(|(&t, sets)| sets.last().map(|set| (t, set.clone())));
        match previous {
            Some((_, set)) if set == latest => return,
            Some((t, set)) if !majorities_overlap(&latest, &set) => self.fail(&format!(
                "two majorities that need not overlap committed: {set:?} (term {t}) then \
                 {latest:?} (term {term}, leader {id})"
            )),
            _ => {}
        }
        self.commit_configs.entry(term).or_default().push(latest);
        self.commit_configs_recorded += 1;
    }

    fn record_committed(&mut self, id: NodeId, index: u64, term: u64, seen_in_term: u64) {
        match self.committed.get(&index) {
            Some(&(t, _)) if t != term => self.fail(&format!(
                "node {id} commits (index {index}, term {term}) where (index {index}, term {t}) was committed"
            )),
            Some(_) => return,
            None => {
                self.committed.insert(index, (term, seen_in_term));
            }
        }
        // Every leader of a later term must already hold it.
        for (leader, leader_term) in self.leaders() {
            if leader_term >= seen_in_term {
                self.check_leader_has(leader, index, term);
            }
        }
    }

    fn check_leader_completeness(&self, id: NodeId) {
        let term = self.core(id).term();
        for (&index, &(entry_term, seen_in_term)) in &self.committed {
            if seen_in_term <= term {
                self.check_leader_has(id, index, entry_term);
            }
        }
    }

    fn check_leader_has(&self, leader: NodeId, index: u64, term: u64) {
        let core = self.core(leader);
        let status = core.status();
        if index < status.snapshot_index {
            return;
        }
        if core.term_at(index) != Some(term) {
            self.fail(&format!(
                "Leader Completeness: leader {leader} of term {} lacks committed (index {index}, term {term}); \
                 it has term {:?} there",
                status.term,
                core.term_at(index)
            ));
        }
    }

    /// A full pairwise Log Matching check of all live logs, plus agreement
    /// of applied state (use at the end of a scenario).
    pub fn check_full(&self) {
        let ids = self.up_ids();
        for (k, &a) in ids.iter().enumerate() {
            for &b in &ids[k + 1..] {
                self.check_logs_match(a, b);
            }
        }
        for id in ids {
            let app = self.app(id);
            if app.last_applied > 0 {
                let expected = self.applied_record(app.last_applied).map(|r| r.digest);
                if expected != Some(app.digest) {
                    self.fail(&format!(
                        "node {id}: applied state diverges at {}",
                        app.last_applied
                    ));
                }
            }
        }
    }

    fn check_logs_match(&self, a: NodeId, b: NodeId) {
        let (ca, cb) = (self.core(a), self.core(b));
        let (sa, sb) = (ca.status(), cb.status());
        let low = sa.snapshot_index.max(sb.snapshot_index);
        let high = sa.last_index.min(sb.last_index);
        let mut shared = None;
        let mut index = high;
        while index > low {
            if ca.term_at(index).is_some() && ca.term_at(index) == cb.term_at(index) {
                shared = Some(index);
                break;
            }
            index -= 1;
        }
        if let Some(top) = shared {
            for i in low + 1..=top {
                if ca.entry(i) != cb.entry(i) {
                    self.fail(&format!(
                        "Log Matching: nodes {a} and {b} share (index {top}) but differ at {i}: {:?} vs {:?}",
                        ca.entry(i),
                        cb.entry(i)
                    ));
                }
            }
        }
    }

    // ------------------------------------------------------------ R8 audit

    /// Counts the rejections a follower sends one leader in one term until
    /// its first success, and checks them against distinct conflicting terms + 2.
    fn audit_rejection(&mut self, message: &Message) {
        if !self.audit_backoff {
            return;
        }
        let success = match message.body {
            MessageBody::AppendEntriesResponse { success, .. } => success,
            _ => return,
        };
        let (follower, leader, term) = (message.from, message.to, message.term);
        let key = (leader, term, follower);
        let bound = if !success && !self.backoff.contains_key(&key) {
            self.conflicting_terms(follower, leader) + 2
        } else {
            0
        };
        let episode = self.backoff.entry(key).or_insert(BackoffEpisode {
            bound,
            ..BackoffEpisode::default()
        });
        if episode.done {
            return;
        }
        if success {
            episode.done = true;
            return;
        }
        episode.rejections += 1;
        let (rejections, bound) = (episode.rejections, episode.bound);
        self.max_backoff_rejections = self.max_backoff_rejections.max(rejections);
        if rejections > bound {
            self.fail(&format!(
                "fast back-off: follower {follower} sent leader {leader} (term {term}) {rejections} \
                 rejections, more than distinct conflicting terms + 2 = {bound}"
            ));
        }
    }

    /// Distinct terms in the two logs past their longest common prefix.
    fn conflicting_terms(&self, follower: NodeId, leader: NodeId) -> u64 {
        if !self.is_up(follower) || !self.is_up(leader) {
            return 0;
        }
        let (f, l) = (self.durable(follower), self.durable(leader));
        let low = f.snapshot_index().max(l.snapshot_index());
        let mut common = f.last_index().min(l.last_index());
        while common > low && f.term_at(common) != l.term_at(common) {
            common -= 1;
        }
        let mut terms: Vec<u64> = f
            .entries
            .iter()
            .chain(l.entries.iter())
            .filter(|e| e.index > common)
            .map(|e| e.term)
            .collect();
        terms.sort_unstable();
        terms.dedup();
        terms.len() as u64
    }

    // ------------------------------------------------------------ helpers

    /// 6.824's `cfg.one`: proposes `data` on whichever connected live node
    /// accepts it and waits until `expected` live nodes have applied it at
    /// the returned index. With `retry`, a lost proposal is proposed again.
    /// Returns the index; fails after 30 × ET_MAX ticks.
    pub fn one(&mut self, data: Vec<u8>, expected: usize, retry: bool) -> u64 {
        match self.try_one(data, expected, retry, 30 * ET_MAX_TICKS) {
            Ok(index) => index,
            Err(what) => self.fail(&what),
        }
    }

    /// `one` with an explicit overall bound in ticks, returning an error.
    pub fn try_one(
        &mut self,
        data: Vec<u8>,
        expected: usize,
        retry: bool,
        max_ticks: u64,
    ) -> Result<u64, String> {
        let deadline = self.now_ticks + max_ticks;
        let mut start = 0;
        while self.now_ticks < deadline {
            let mut proposed = None;
            let n = self.options.nodes;
            for k in 0..n {
                let id = (start + k) % n + 1;
                if self.is_up(id) && self.is_connected(id) {
                    if let Ok(index) = self.propose(id, data.clone()) {
                        proposed = Some(index);
                        break;
                    }
                }
            }
            start += 1;
            let index = match proposed {
                Some(index) => index,
                None => {
                    self.tick();
                    continue;
                }
            };
            let wait_until = (self.now_ticks + 4 * ET_MAX_TICKS).min(deadline);
            while self.now_ticks < wait_until {
                let (count, applied) = self.n_committed(index);
                if count >= expected && applied.as_deref() == Some(&data[..]) {
                    return Ok(index);
                }
                if applied.is_some() && applied.as_deref() != Some(&data[..]) {
                    break; // another command took the index: propose again
                }
                self.tick();
            }
            if !retry {
                return Err(format!(
                    "one({:?}) proposed at {index} did not reach {expected} nodes",
                    String::from_utf8_lossy(&data)
                ));
            }
        }
        Err(format!(
            "one({:?}) failed to reach agreement on {expected} nodes within {max_ticks} ticks",
            String::from_utf8_lossy(&data)
        ))
    }

    /// Exactly one leader among the live connected nodes within `max_ticks`
    /// (6.824's checkOneLeader, with time in ticks). Returns it.
    pub fn check_one_leader(&mut self, max_ticks: u64) -> NodeId {
        let found = self.run_until(max_ticks, |sim| sim.connected_leader().is_some());
        match found.and(self.connected_leader()) {
            Some(id) => id,
            None => self.fail(&format!(
                "no leader among connected nodes within {max_ticks} ticks"
            )),
        }
    }

    /// The unique leader of the highest term among connected live nodes.
    fn connected_leader(&self) -> Option<NodeId> {
        let leaders: Vec<(NodeId, u64)> = self
            .leaders()
            .into_iter()
            .filter(|&(id, _)| self.is_connected(id))
            .collect();
        let top = leaders.iter().map(|&(_, t)| t).max()?;
        let at_top: Vec<NodeId> = leaders
            .iter()
            .filter(|&&(_, t)| t == top)
            .map(|&(id, _)| id)
            .collect();
        if at_top.len() > 1 {
            self.fail(&format!("term {top} has leaders {at_top:?}"));
        }
        Some(at_top[0])
    }

    /// Every connected live node is at the same term; returns it.
    pub fn check_terms(&self) -> u64 {
        let terms: Vec<u64> = self
            .up_ids()
            .into_iter()
            .filter(|&id| self.is_connected(id))
            .map(|id| self.core(id).term())
            .collect();
        if terms.windows(2).any(|w| w[0] != w[1]) {
            self.fail(&format!("servers disagree on term: {terms:?}"));
        }
        terms.first().copied().unwrap_or(0)
    }

    /// One line per node: up or down, and its core's status.
    pub fn describe_nodes(&self) -> String {
        let mut out = String::new();
        for id in self.ids() {
            match &self.nodes[Sim::slot(id)] {
                Some(node) => out.push_str(&format!(
                    "  node {id}: {:?}, app applied {}, stored last {}\n",
                    node.core.status(),
                    node.app.last_applied,
                    self.durable(id).last_index()
                )),
                None => out.push_str(&format!("  node {id}: down\n")),
            }
        }
        out
    }

    /// One line on what the run went through, for replays and tuning.
    pub fn summary(&self) -> String {
        format!(
            "{} ticks, {} terms with a leader (last term {}), {} applied, {} crashes, {} messages \
             ({} dropped), {} snapshot chunks, {} reads answered, {} voter sets committed with",
            self.now_ticks,
            self.leaders_by_term.len(),
            self.leaders_by_term
                .keys()
                .next_back()
                .copied()
                .unwrap_or(0),
            self.applied.len(),
            self.crashes,
            self.stats.messages_sent,
            self.stats.dropped,
            self.stats.snapshot_chunks_sent,
            self.reads_answered,
            self.commit_configs_recorded,
        )
    }

    /// Restarts every crashed node and disarms pending mid-Ready crashes,
    /// so that everyone is up from now on.
    pub fn restart_down(&mut self) {
        self.crash_in_ready
            .iter_mut()
            .for_each(|armed| *armed = false);
        for id in self.ids() {
            if !self.is_up(id) {
                self.start_node(id);
            }
        }
    }
}

/// Whether every majority of `a` shares a voter with every majority of `b`:
/// the worst case takes one majority from `a`'s own voters first and the
/// other from `b`'s own, leaving the shared voters to make up the rest.
pub fn majorities_overlap(a: &BTreeSet<NodeId>, b: &BTreeSet<NodeId>) -> bool {
    let shared = a.intersection(b).count();
    let need_a = (a.len() / 2 + 1).saturating_sub(a.len() - shared);
    let need_b = (b.len() / 2 + 1).saturating_sub(b.len() - shared);
    need_a + need_b > shared
}
