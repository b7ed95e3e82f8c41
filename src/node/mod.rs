//! The driver around the consensus core, in the style of LogCabin: a few
//! threads with one job each and one place for the core's state.
//!
//! - `ticker`: sends `Event::Tick` every `tick_ms`.
//! - `event-loop`: owns the `RaftCore` and the storage. It drains its event
//!   channel (ticks, peer messages) and the bounded client-request channel
//!   (the LockQueue), feeds the core, then carries out each `Ready`: send the
//!   leader's appends, persist with one fsync for the whole batch, send the
//!   rest, hand committed entries to the application, advance.
//! - `peer-N`: one per peer; streams requests on one pipelined connection
//!   and turns the replies into events.
//!
//! The application (the KV service in `kv/`) sees only [`NodeHandle`]: it
//! submits [`ClientRequest`]s into the LockQueue and consumes
//! [`ApplyTask`]s, in order, from one channel.

mod event_loop;
mod peer;
mod probes;
mod raft_service;
mod snapshot;
pub mod wire;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{bounded, Receiver, Sender};
use parking_lot::Mutex;

use crate::raft::{
    ConfChange, ConfChangeError, Entry, FollowerStatus, Membership, Message, NodeId, ProposeError,
    RestoredState, Snapshot, SnapshotMeta, Status,
};
use crate::storage::DiskStorage;

pub use self::raft_service::RaftServiceHandler;
pub use self::snapshot::{
    InstallReceived, ReceivedSnapshot, SnapshotChunks, SnapshotIntake, SnapshotStore,
};

/// Decides whether a message from one node to another may pass: tests use
/// it to cut links (partitions) without touching sockets.
pub type LinkFilter = Arc<dyn Fn(NodeId, NodeId) -> bool + Send + Sync>;

/// Everything a node needs to know to run; built from the cluster config.
#[derive(Clone)]
pub struct NodeOptions {
    pub id: NodeId,
    /// Every node of the cluster (this one included) and its address.
    pub peers: Vec<(NodeId, SocketAddr)>,
    pub tick_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    pub heartbeat_interval_ms: u64,
    pub max_inflight_appends: usize,
    pub max_append_bytes: usize,
    pub max_snapshot_chunk_bytes: usize,
    pub max_uncommitted_bytes: usize,
    /// Capacity of the LockQueue between the KV handlers and the event loop.
    pub proposal_queue_capacity: usize,
    /// The most client requests the event loop takes into one batch (one
    /// append, one fsync, one AppendEntries round).
    pub max_batch_requests: usize,
    pub max_frame_bytes: usize,
    /// Connection timeouts of the peer links.
    pub peer_connect_timeout_ms: u64,
    /// Presented in the handshake of every peer link.
    pub credentials: crate::rpc::Credentials,
    pub link_filter: Option<LinkFilter>,
    /// Started with `--join`: no bootstrap configuration; the node waits,
    /// without campaigning, until a leader adds it and sends it the log.
    pub join: bool,
    /// A learner is promoted only within this many entries of the leader.
    pub promote_max_lag_entries: u64,
    /// The application's state as a stream: with it, InstallSnapshot is streamed from a
    /// consistent view (`snapshot.rs`); without it (tests of the node alone), the core sends
    /// the bytes given to `compacted`.
    pub snapshot_store: Option<Arc<dyn SnapshotStore>>,
    /// The rate a leader sends one snapshot at; 0: no limit.
    pub snapshot_send_bytes_per_sec: u64,
    /// See `raft::Config::max_catch_up_log_bytes`.
    pub max_catch_up_log_bytes: u64,
}

impl NodeOptions {
    fn ticks(&self, ms: u64) -> u32 {
        (ms / self.tick_ms.max(1)).max(1) as u32
    }

    pub fn core_config(&self) -> crate::raft::Config {
        let voters = if self.join {
            Vec::new()
        } else {
            self.peers.iter().map(|(id, _)| *id).collect()
        };
        let mut config = crate::raft::Config::new(self.id, voters);
        config.addresses = self
            .peers
            .iter()
            .map(|(id, addr)| (*id, addr.to_string()))
            .collect();
        config.promote_max_lag_entries = self.promote_max_lag_entries;
        config.election_timeout_min_ticks = self.ticks(self.election_timeout_min_ms);
        config.election_timeout_max_ticks = self
            .ticks(self.election_timeout_max_ms)
            .max(config.election_timeout_min_ticks + 1);
        config.heartbeat_interval_ticks = self.ticks(self.heartbeat_interval_ms);
        config.max_inflight_appends = self.max_inflight_appends;
        config.max_append_bytes = self.max_append_bytes;
        config.max_snapshot_chunk_bytes = self.max_snapshot_chunk_bytes;
        config.max_uncommitted_bytes = self.max_uncommitted_bytes;
        config.max_catch_up_log_bytes = self.max_catch_up_log_bytes;
        config.streamed_snapshots = self.snapshot_store.is_some();
        // Distinct nodes, distinct timeouts; restarts draw new ones.
        config.seed = self.id ^ (std::process::id() as u64).rotate_left(17) ^ clock_seed();
        config
    }
}

fn clock_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// A request from the application, through the LockQueue. `token` is the
/// application's name for it; the answer comes back as an [`ApplyTask`].
#[derive(Debug)]
pub enum ClientRequest {
    /// Append `data` to the log.
    Propose { token: u64, data: Vec<u8> },
    /// A linearizable read barrier (ReadIndex).
    Read { token: u64 },
}

/// What the application must do, in the order given: every task refers only
/// to what came before it on the same channel.
#[derive(Debug)]
pub enum ApplyTask {
    /// The proposal `token` is in the log at `index` in `term`: the entry
    /// applied there answers it if its term is `term`; any other entry at
    /// that index means the proposal was lost.
    Proposed { token: u64, index: u64, term: u64 },
    /// The request `token` was refused (this node is not the leader, or it
    /// is overloaded). Nothing was appended.
    Refused { token: u64, error: ProposeError },
    /// Apply these entries, in order.
    Committed(Vec<Entry>),
    /// Replace the state machine with this snapshot (received from the leader). A streamed
    /// snapshot has no bytes: the application installed it already (`InstallReceived`).
    Restore(Snapshot),
    /// A snapshot streamed from the leader is complete and verified beside the live state:
    /// swap it in (unless the state is already at or past it), then give the message back
    /// to the core with [`NodeHandle::snapshot_installed`].
    InstallReceived(InstallReceived),
    /// The read `token` may be answered once `index` is applied.
    ReadReady { token: u64, index: u64 },
    /// This node is no longer the leader of `term`: requests still waiting
    /// will not be answered by it. `hint` is the new leader, if known.
    SteppedDown { term: u64, hint: NodeId },
}

/// Why the node stopped, when it stopped on its own.
pub type FatalError = String;

/// Events of the event loop other than client requests.
pub(crate) enum Event {
    Tick,
    /// A response from a peer (the reply to one of our requests).
    Step(Message),
    /// A request from a peer, answered by `reply` with the core's response.
    Request(Message, RaftReply),
    /// The application saved a snapshot covering up to `index`.
    Compact {
        index: u64,
        data: Vec<u8>,
    },
    /// An operator's request about the membership, answered on the channel.
    Admin(AdminRequest, Sender<AdminReply>),
    /// A streamed snapshot arrived whole (`snapshot.rs`): for the apply thread.
    SnapshotReceived(InstallReceived),
}

/// The operator's requests about who is in the cluster (`clerk member ...`).
#[derive(Clone, Debug)]
pub enum AdminRequest {
    Members,
    Change(ConfChange),
    TransferLeader(NodeId),
    /// The term and configuration at `index`, where a snapshot sender to `to` opened its view
    /// (`RaftCore::streamed_snapshot_at`), if the log knows them.
    SnapshotMetaAt {
        to: NodeId,
        index: u64,
    },
}

/// What the event loop answers to an [`AdminRequest`].
#[derive(Clone, Debug)]
pub enum AdminReply {
    Members(MembersView),
    /// The change's entry is at `index` in `term`; it is done once committed.
    Changed(Result<(u64, u64), ConfChangeError>),
    TransferStarted(Result<(), ConfChangeError>),
    SnapshotMeta(Option<(SnapshotMeta, Membership)>),
}

/// The configuration as this node sees it.
#[derive(Clone, Debug)]
pub struct MembersView {
    pub status: Status,
    /// The configuration in force (the latest in the log).
    pub membership: Membership,
    /// The latest committed configuration.
    pub committed: Membership,
    /// The leader's view of its followers (empty on other nodes).
    pub followers: Vec<FollowerStatus>,
}

/// Completes one incoming Raft RPC with the core's response message.
pub(crate) type RaftReply = Box<dyn FnOnce(Message) + Send>;

/// Stops the node when it can no longer keep its promises: a failed fsync,
/// a snapshot that does not load, a panic in one of its threads. Each
/// thread holds one, without holding the node's channels open.
#[derive(Clone)]
pub struct NodeStopper {
    id: NodeId,
    fatal: Arc<Mutex<Option<FatalError>>>,
    stopping: Arc<AtomicBool>,
}

impl NodeStopper {
    /// Records why (the first reason wins), says it in one line and stops
    /// every thread of the node.
    pub fn stop_with_error(&self, error: FatalError) {
        log::error!("node {} stops: {error}", self.id);
        self.fatal.lock().get_or_insert(error);
        self.stopping.store(true, Ordering::SeqCst);
    }

    /// Starts the thread `name` running `body`. If it panics, the node stops
    /// with one line naming the thread and the panic: a node missing its
    /// apply thread (or any other) would otherwise keep leading in Raft and
    /// answer nothing, and the cluster would never fail over.
    pub fn spawn<F>(&self, name: String, body: F) -> std::io::Result<JoinHandle<()>>
    where
        F: FnOnce() + Send + 'static,
    {
        crate::threads::spawn_watched(name, self.on_panic(), body)
    }

    /// The hook that stops this node when a thread panics, for threads not started by
    /// [`spawn`](Self::spawn) (the RPC and HTTP servers' own).
    pub fn on_panic(&self) -> crate::threads::OnPanic {
        let stopper = self.clone();
        crate::threads::OnPanic::new(move |line| stopper.stop_with_error(line))
    }
}

/// The application's side of a running node.
#[derive(Clone)]
pub struct NodeHandle {
    id: NodeId,
    requests: Sender<ClientRequest>,
    events: Sender<Event>,
    status: Arc<Mutex<Status>>,
    stopper: NodeStopper,
    /// The leader's view of its followers, refreshed every ~100 ms.
    followers: Arc<Mutex<Vec<FollowerStatus>>>,
}

impl NodeHandle {
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// The LockQueue: bounded, so a full queue pushes back on the caller.
    pub fn requests(&self) -> &Sender<ClientRequest> {
        &self.requests
    }

    /// The core's state as of the end of the last event-loop cycle.
    pub fn status(&self) -> Status {
        self.status.lock().clone()
    }

    /// The leader's view of its followers (empty unless this node leads),
    /// as of at most ~100 ms ago. For monitoring.
    pub fn followers(&self) -> Vec<FollowerStatus> {
        self.followers.lock().clone()
    }

    /// Why the node stopped by itself (a storage failure, a panicked
    /// thread), if it did.
    pub fn fatal_error(&self) -> Option<FatalError> {
        self.stopper.fatal.lock().clone()
    }

    /// Stops the node because it can no longer keep its promises.
    pub fn stop_with_error(&self, error: FatalError) {
        self.stopper.stop_with_error(error);
    }

    pub fn is_stopping(&self) -> bool {
        self.stopper.stopping.load(Ordering::SeqCst)
    }

    /// Starts a thread of this node: a panic in it stops the node.
    pub fn stopper(&self) -> &NodeStopper {
        &self.stopper
    }

    /// Asks the event loop about (or for a change of) the membership; `None`
    /// when it did not answer within `timeout` (it is busy or stopping).
    pub fn admin(&self, request: AdminRequest, timeout: Duration) -> Option<AdminReply> {
        let (tx, rx) = bounded(1);
        self.events
            .send_timeout(Event::Admin(request, tx), timeout)
            .ok()?;
        rx.recv_timeout(timeout).ok()
    }

    /// Hands the application's snapshot at `index` (which it has applied and
    /// made durable) to the event loop, which records the index durably and
    /// then trims the log. `data` is empty when the state stays in the
    /// application's engine (a streamed snapshot store); otherwise it is what
    /// followers that need a snapshot are sent.
    pub fn compacted(&self, index: u64, data: Vec<u8>) {
        // A full channel only delays compaction; the next snapshot retries.
        let _ = self.events.try_send(Event::Compact { index, data });
    }

    /// The application installed a streamed snapshot (or already held its state): the core
    /// records its index, term and membership, persists them, and answers the leader.
    pub fn snapshot_installed(&self, install: InstallReceived) {
        let (message, reply) = install.into_message();
        // The event loop may be full or stopping: the leader's call then fails, and it
        // sends the snapshot again (the state is already here, so that is quick).
        let _ = self.events.try_send(Event::Request(message, reply));
    }
}

/// A running node: its threads, and the channels to reach them.
pub struct Node {
    handle: NodeHandle,
    threads: Vec<JoinHandle<()>>,
    raft_service: Arc<RaftServiceHandler>,
}

/// How many events (ticks, peer messages) may wait for the event loop.
const EVENT_QUEUE_CAPACITY: usize = 4096;
/// How many apply tasks may wait for the application.
const APPLY_QUEUE_CAPACITY: usize = 1024;

impl Node {
    /// Starts the node's threads over `storage` (already opened, with what it
    /// restored). Returns the node and the channel of tasks the application
    /// must consume.
    pub fn start(
        options: NodeOptions,
        storage: DiskStorage,
        restored: RestoredState,
    ) -> std::io::Result<(Node, Receiver<ApplyTask>)> {
        let (request_tx, request_rx) = bounded(options.proposal_queue_capacity.max(1));
        let (event_tx, event_rx) = bounded(EVENT_QUEUE_CAPACITY);
        let (apply_tx, apply_rx) = bounded(APPLY_QUEUE_CAPACITY);
        let stopping = Arc::new(AtomicBool::new(false));
        let core = crate::raft::RaftCore::new(options.core_config(), restored);
        let status = Arc::new(Mutex::new(core.status()));
        let followers = Arc::new(Mutex::new(Vec::new()));
        let probes = probes::Probes::new(&core.status(), Arc::clone(&followers));
        let fatal = Arc::new(Mutex::new(None));
        let stopper = NodeStopper {
            id: options.id,
            fatal: Arc::clone(&fatal),
            stopping: Arc::clone(&stopping),
        };
        let handle = NodeHandle {
            id: options.id,
            requests: request_tx,
            events: event_tx.clone(),
            status: Arc::clone(&status),
            stopper: stopper.clone(),
            followers,
        };
        let mut threads = Vec::new();
        let peers = peer::PeerSenders::start(&options, event_tx.clone(), &stopper, &mut threads)?;
        let snapshot_senders = options.snapshot_store.as_ref().map(|store| {
            let (client, install_timeout_ms) =
                snapshot::sender_timeouts(options.peer_connect_timeout_ms, options.max_frame_bytes);
            let send = snapshot::SendOptions {
                me: options.id,
                chunk_bytes: options.max_snapshot_chunk_bytes,
                bytes_per_sec: options.snapshot_send_bytes_per_sec,
                client,
                install_timeout_ms,
                credentials: options.credentials.clone(),
                filter: options.link_filter.clone(),
            };
            snapshot::SnapshotSenders::new(
                Arc::clone(store),
                send,
                event_tx.clone(),
                stopper.clone(),
            )
        });
        let ticker_stopping = Arc::clone(&stopping);
        let tick = Duration::from_millis(options.tick_ms.max(1));
        let ticker_events = event_tx.clone();
        threads.push(stopper.spawn(format!("ticker-{}", options.id), move || {
            run_ticker(tick, ticker_events, ticker_stopping)
        })?);
        let event_loop = event_loop::EventLoop {
            core,
            storage,
            peers,
            events: event_rx,
            requests: request_rx,
            apply: apply_tx,
            status,
            fatal,
            stopping: Arc::clone(&stopping),
            max_batch_requests: options.max_batch_requests.max(1),
            probes,
            snapshot_senders,
            // Not a real index: the first cycle matches the links to the
            // configuration restored from storage.
            synced_conf_index: u64::MAX,
            deferred_compaction: None,
        };
        threads.push(
            stopper.spawn(format!("event-loop-{}", options.id), move || {
                event_loop.run()
            })?,
        );
        let receiver = options.snapshot_store.as_ref().map(|store| {
            snapshot::SnapshotReceiver::new(options.id, Arc::clone(store), event_tx.clone())
        });
        let raft_service = Arc::new(RaftServiceHandler::new(
            options.id,
            event_tx,
            options.link_filter.clone(),
            receiver,
        ));
        Ok((
            Node {
                handle,
                threads,
                raft_service,
            },
            apply_rx,
        ))
    }

    pub fn handle(&self) -> &NodeHandle {
        &self.handle
    }

    /// The handler of the Raft service, to register with the RPC server.
    pub fn raft_service(&self) -> Arc<RaftServiceHandler> {
        Arc::clone(&self.raft_service)
    }

    /// Stops every thread of the node and waits for them.
    pub fn shutdown(self) {
        self.handle.stopper.stopping.store(true, Ordering::SeqCst);
        drop(self.handle);
        for thread in self.threads {
            if thread.join().is_err() {
                log::error!("a node thread panicked");
            }
        }
    }
}

/// Sends a tick every `tick`. A full event channel drops the tick: the event
/// loop is behind, and it will get the next one.
fn run_ticker(tick: Duration, events: Sender<Event>, stopping: Arc<AtomicBool>) {
    while !stopping.load(Ordering::SeqCst) {
        std::thread::sleep(tick);
        if let Err(crossbeam_channel::TrySendError::Disconnected(_)) = events.try_send(Event::Tick)
        {
            return;
        }
    }
}
