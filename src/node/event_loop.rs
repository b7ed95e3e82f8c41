//! The event loop: the one thread that owns the consensus core and the
//! storage. Each cycle it takes what is waiting (peer traffic first, so
//! heartbeats are never stuck behind client load; then up to
//! `max_batch_requests` client requests from the LockQueue), feeds the core,
//! and carries out the Ready in the order the core's contract demands:
//! leader appends out, then one fsync for the whole batch (group commit),
//! then the messages that depend on it, then the committed entries to the
//! application.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{select, Receiver, Sender};
use parking_lot::Mutex;

use super::peer::PeerSenders;
use super::probes::Probes;
use super::snapshot::SnapshotSenders;
use super::{
    AdminReply, AdminRequest, ApplyTask, ClientRequest, Event, FatalError, MembersView, RaftReply,
};
use crate::metrics;
use crate::raft::{Message, MessageBody, NodeId, RaftCore, Role, Snapshot, SnapshotMeta, Status};
use crate::storage::DiskStorage;

/// How long the loop sleeps when idle before re-checking for shutdown.
const IDLE_WAIT_MS: u64 = 50;
/// The most peer events taken in one cycle, so client requests still get
/// their turn under heavy peer traffic.
const MAX_EVENTS_PER_CYCLE: usize = 1024;

pub(crate) struct EventLoop {
    pub core: RaftCore,
    pub storage: DiskStorage,
    pub peers: PeerSenders,
    pub events: Receiver<Event>,
    pub requests: Receiver<ClientRequest>,
    pub apply: Sender<ApplyTask>,
    pub status: Arc<Mutex<Status>>,
    pub fatal: Arc<Mutex<Option<FatalError>>>,
    pub stopping: Arc<AtomicBool>,
    pub max_batch_requests: usize,
    pub probes: Probes,
    /// Streams snapshots to followers (`None`: the core sends the bytes itself).
    pub snapshot_senders: Option<SnapshotSenders>,
    /// The configuration index the peer links were last made to match.
    pub synced_conf_index: u64,
    /// A compaction the application asked for past the compaction floor (a streamed snapshot
    /// in flight, a follower catching up), done as far as the floor allowed; the rest is done
    /// as soon as the floor reaches it, so the log does not wait for the application's next
    /// request (a second later) to shrink.
    pub deferred_compaction: Option<u64>,
}

/// The four Raft RPCs; each incoming one waits in its own FIFO for the
/// core's response (the core answers every request exactly once, in order).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum RpcKind {
    AppendEntries,
    Heartbeat,
    RequestVote,
    InstallSnapshot,
}

fn request_kind(body: &MessageBody) -> Option<RpcKind> {
    match body {
        MessageBody::AppendEntries { .. } => Some(RpcKind::AppendEntries),
        MessageBody::Heartbeat { .. } => Some(RpcKind::Heartbeat),
        MessageBody::RequestVote { .. } => Some(RpcKind::RequestVote),
        MessageBody::InstallSnapshot { .. } => Some(RpcKind::InstallSnapshot),
        _ => None,
    }
}

fn response_kind(body: &MessageBody) -> Option<RpcKind> {
    match body {
        MessageBody::AppendEntriesResponse { .. } => Some(RpcKind::AppendEntries),
        MessageBody::HeartbeatResponse { .. } => Some(RpcKind::Heartbeat),
        MessageBody::RequestVoteResponse { .. } => Some(RpcKind::RequestVote),
        MessageBody::InstallSnapshotResponse { .. } => Some(RpcKind::InstallSnapshot),
        _ => None,
    }
}

/// Where the loop stands on leadership, to tell the application when it
/// stops being leader.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Leadership {
    leader: bool,
    term: u64,
}

impl EventLoop {
    pub fn run(mut self) {
        let mut waiting_replies: HashMap<(NodeId, RpcKind), VecDeque<RaftReply>> = HashMap::new();
        let mut leadership = self.leadership();
        while !self.stopping.load(Ordering::SeqCst) {
            let result = self.cycle(&mut waiting_replies);
            if let Err(error) = result {
                self.stop_fatally(error);
                return;
            }
            let now = self.leadership();
            if now != leadership {
                self.log_role_change();
            }
            if leadership.leader && now != leadership {
                if let Some(senders) = &mut self.snapshot_senders {
                    senders.cancel_all();
                }
                let hint = self.core.leader();
                if self
                    .apply
                    .send(ApplyTask::SteppedDown {
                        term: leadership.term,
                        hint,
                    })
                    .is_err()
                {
                    return;
                }
            }
            leadership = now;
            let status = self.core.status();
            self.probes.cycle_done(&self.core, &status);
            *self.status.lock() = status;
        }
    }

    fn log_role_change(&self) {
        let status = self.core.status();
        log::info!(
            "node {}: {} in term {} (leader {}, commit {}, last index {})",
            status.id,
            status.role.as_str(),
            status.term,
            status.leader,
            status.commit,
            status.last_index
        );
    }

    fn leadership(&self) -> Leadership {
        Leadership {
            leader: self.core.role() == Role::Leader,
            term: self.core.term(),
        }
    }

    /// A node whose storage failed can no longer keep its promises: it stops
    /// taking part at once, and says why.
    fn stop_fatally(&mut self, error: FatalError) {
        log::error!("node {} stops: {error}", self.core.id());
        *self.fatal.lock() = Some(error);
        self.stopping.store(true, Ordering::SeqCst);
    }

    fn cycle(
        &mut self,
        waiting_replies: &mut HashMap<(NodeId, RpcKind), VecDeque<RaftReply>>,
    ) -> Result<(), FatalError> {
        // Block until something arrives, then take what else is waiting.
        select! {
            recv(self.events) -> event => match event {
                Ok(event) => self.handle_event(event, waiting_replies)?,
                Err(_) => return Ok(()),
            },
            recv(self.requests) -> request => {
                if let Ok(request) = request {
                    self.handle_requests(Some(request));
                }
            }
            default(Duration::from_millis(IDLE_WAIT_MS)) => {}
        }
        for _ in 0..MAX_EVENTS_PER_CYCLE {
            match self.events.try_recv() {
                Ok(event) => self.handle_event(event, waiting_replies)?,
                Err(_) => break,
            }
        }
        self.handle_requests(None);
        self.resume_deferred_compaction()?;
        self.process_ready(waiting_replies)
    }

    /// Finishes a deferred compaction once the floor that held it back has risen past it (the
    /// transfer ended and the follower caught up, or it fell too far behind to be waited
    /// for). A floor that rose only part of the way is left to the application's next request
    /// (at most one a second), so a catching-up follower does not cost a snapshot file per
    /// cycle. Cheap when nothing waits: the floor is a minimum over the peers.
    fn resume_deferred_compaction(&mut self) -> Result<(), FatalError> {
        let Some(index) = self.deferred_compaction else {
            return Ok(());
        };
        if self.core.compaction_floor() >= index {
            self.deferred_compaction = None;
            self.compact(index, Vec::new())?;
        }
        Ok(())
    }

    fn handle_event(
        &mut self,
        event: Event,
        waiting_replies: &mut HashMap<(NodeId, RpcKind), VecDeque<RaftReply>>,
    ) -> Result<(), FatalError> {
        match event {
            Event::Tick => self.core.tick(),
            Event::Step(message) => self.core.step(message),
            Event::Request(message, reply) => {
                // Only requests the core will answer may wait for an
                // answer; anything else is dropped here, and its caller
                // gets an error from the RPC layer.
                let kind = match request_kind(&message.body) {
                    Some(kind) if self.is_for_us(&message) => kind,
                    _ => return Ok(()),
                };
                waiting_replies
                    .entry((message.from, kind))
                    .or_default()
                    .push_back(reply);
                self.core.step(message);
            }
            Event::Compact { index, data } => self.compact(index, data)?,
            Event::Admin(request, reply) => {
                let answer = match request {
                    AdminRequest::Members => AdminReply::Members(MembersView {
                        status: self.core.status(),
                        membership: self.core.membership().clone(),
                        committed: self.core.committed_membership().clone(),
                        followers: self.core.followers(),
                    }),
                    AdminRequest::Change(change) => {
                        let term = self.core.term();
                        AdminReply::Changed(
                            self.core
                                .propose_conf_change(change)
                                .map(|index| (index, term)),
                        )
                    }
                    AdminRequest::TransferLeader(to) => {
                        AdminReply::TransferStarted(self.core.transfer_leader(to))
                    }
                    AdminRequest::SnapshotMetaAt { to, index } => {
                        AdminReply::SnapshotMeta(self.core.streamed_snapshot_at(to, index))
                    }
                };
                // The asker may have given up waiting: nothing to do then.
                let _ = reply.try_send(answer);
            }
            Event::SnapshotReceived(install) => {
                self.send_apply(ApplyTask::InstallReceived(install))
            }
        }
        Ok(())
    }

    /// Requests from any other node are taken: a node learns who the
    /// members are from the log, so a joining node must hear from a leader
    /// it does not know yet (the handshake already checked the cluster).
    fn is_for_us(&self, message: &Message) -> bool {
        message.to == self.core.id() && message.from != self.core.id() && message.from != 0
    }

    /// Takes up to `max_batch_requests` client requests: proposals become one
    /// `propose_batch` (one append, one fsync, one AppendEntries round);
    /// reads join the next ReadIndex round.
    fn handle_requests(&mut self, first: Option<ClientRequest>) {
        let mut tokens = Vec::new();
        let mut batch = Vec::new();
        let mut next = first;
        let mut taken = 0;
        let mut last_read = None;
        loop {
            let request = match next.take() {
                Some(request) => request,
                None if taken < self.max_batch_requests => match self.requests.try_recv() {
                    Ok(request) => request,
                    Err(_) => break,
                },
                None => break,
            };
            taken += 1;
            match request {
                ClientRequest::Propose { token, data } => {
                    tokens.push(token);
                    batch.push(data);
                }
                ClientRequest::Read { token } => match self.core.read_index(token) {
                    Ok(()) => last_read = Some(last_read.unwrap_or(0).max(token)),
                    Err(error) => self.send_apply(ApplyTask::Refused { token, error }),
                },
            }
        }
        if let Some(token) = last_read {
            self.probes.reads_submitted(token);
        }
        if batch.is_empty() {
            return;
        }
        let term = self.core.term();
        match self.core.propose_batch(batch) {
            Ok(first_index) => {
                for (k, token) in tokens.into_iter().enumerate() {
                    let index = first_index + k as u64;
                    self.send_apply(ApplyTask::Proposed { token, index, term });
                }
            }
            Err(error) => {
                for token in tokens {
                    self.send_apply(ApplyTask::Refused { token, error });
                }
            }
        }
    }

    fn send_apply(&self, task: ApplyTask) {
        // The application is gone only when the node is shutting down.
        let _ = self.apply.send(task);
    }

    fn process_ready(
        &mut self,
        waiting_replies: &mut HashMap<(NodeId, RpcKind), VecDeque<RaftReply>>,
    ) -> Result<(), FatalError> {
        while self.core.has_ready() {
            let ready = self.core.ready();
            for message in ready.messages_unpersisted {
                self.send_message(message, waiting_replies);
            }
            if let Some(snapshot) = &ready.snapshot {
                let started = Instant::now();
                self.storage
                    .save_snapshot(snapshot)
                    .map_err(|e| e.to_string())?;
                if self.snapshot_senders.is_none() {
                    // Streamed snapshots are counted by their receiver (`snapshot.rs`).
                    metrics::SNAPSHOT_INSTALL_DURATION.observe_duration(started.elapsed());
                    metrics::SNAPSHOTS_RECEIVED.inc();
                    metrics::SNAPSHOT_RECEIVED_BYTES.inc_by(snapshot.data.len() as u64);
                }
            }
            // Term and vote must be durable before any message that
            // depends on them, and entries before they are acknowledged; the
            // commit index need not be (a restarted node learns it again),
            // so a Ready that only moves commit costs no write and no fsync.
            // It rides along with the next write instead.
            let stored = self.storage.hard_state();
            let vote_changed = ready
                .hard_state
                .is_some_and(|h| h.term != stored.term || h.vote != stored.vote);
            if vote_changed || !ready.entries.is_empty() {
                self.storage
                    .append(ready.hard_state, &ready.entries)
                    .map_err(|e| e.to_string())?;
                let started = Instant::now();
                self.storage.sync().map_err(|e| e.to_string())?;
                metrics::fsync_done(self.core.id(), started.elapsed());
            }
            for message in ready.messages {
                self.send_message(message, waiting_replies);
            }
            if let Some(snapshot) = ready.snapshot {
                self.send_apply(ApplyTask::Restore(snapshot));
            }
            if !ready.committed.is_empty() {
                metrics::PROPOSALS_COMMITTED.inc_by(ready.committed.len() as u64);
                self.send_apply(ApplyTask::Committed(ready.committed));
            }
            for to in ready.snapshot_sends {
                let term = self.core.term();
                match &mut self.snapshot_senders {
                    Some(senders) => senders.start(to, self.peers.address(to), term),
                    None => unreachable!("streamed snapshots without a snapshot store"),
                }
            }
            self.probes.reads_ready(&ready.read_states);
            for read in ready.read_states {
                self.send_apply(ApplyTask::ReadReady {
                    token: read.context,
                    index: read.index,
                });
            }
            self.core.advance();
        }
        if self.core.conf_index() != self.synced_conf_index {
            self.synced_conf_index = self.core.conf_index();
            self.peers.sync(self.core.membership());
        }
        Ok(())
    }

    fn send_message(
        &mut self,
        message: Message,
        waiting_replies: &mut HashMap<(NodeId, RpcKind), VecDeque<RaftReply>>,
    ) {
        let kind = match response_kind(&message.body) {
            Some(kind) => kind,
            None => {
                self.probes.sent(&message);
                return self.peers.send(message);
            }
        };
        let reply = waiting_replies
            .get_mut(&(message.to, kind))
            .and_then(VecDeque::pop_front);
        match reply {
            Some(reply) => reply(message),
            None => log::warn!("node {}: no caller waits for {:?}", self.core.id(), message),
        }
    }

    /// Records the compaction point durably, then lets the core drop the log
    /// entries it covers. The application's state at `index` is already
    /// durable in its engine, so the snapshot file holds only the index,
    /// term and membership (no bytes of the data set are written here, on
    /// the event loop); `data`, when given (no snapshot store), is kept in
    /// memory for followers that need it.
    fn compact(&mut self, index: u64, data: Vec<u8>) -> Result<(), FatalError> {
        // A follower receiving a streamed snapshot, or catching up, continues from the log.
        let floor = self.core.compaction_floor();
        if index > floor && !data.is_empty() {
            return Ok(()); // bytes of a later state than the floor: the next one will do
        }
        if index > floor {
            // The state is the engine's (no bytes): any index up to `index` will do later.
            self.deferred_compaction = self.deferred_compaction.max(Some(index));
        }
        let index = index.min(floor);
        let status = self.core.status();
        if index <= status.snapshot_index || index > status.applied {
            return Ok(());
        }
        let term = match self.core.term_at(index) {
            Some(term) => term,
            None => return Ok(()),
        };
        let meta = SnapshotMeta { index, term };
        let membership = match self.core.membership_at(index) {
            Some(membership) => membership.clone(),
            None => return Ok(()),
        };
        let started = Instant::now();
        self.storage
            .save_snapshot(&Snapshot {
                meta,
                membership,
                data: Arc::new(Vec::new()),
            })
            .map_err(|e| e.to_string())?;
        metrics::SNAPSHOT_SAVE_DURATION.observe_duration(started.elapsed());
        metrics::SNAPSHOTS_TAKEN.inc();
        metrics::SNAPSHOT_TAKEN_BYTES.inc_by(data.len() as u64);
        self.core.compact(index, data);
        Ok(())
    }
}
