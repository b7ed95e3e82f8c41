//! Streamed InstallSnapshot: the leader sends a consistent view of the application's state
//! in bounded chunks from a thread of its own, and the follower's RPC thread writes them
//! beside its live state, so neither side ever holds more than one chunk, and nothing on
//! the Raft threads (event loop, apply thread) does work proportional to the data set.
//!
//! The application provides the state through [`SnapshotStore`] (the KV layer implements it
//! over its storage engine); this module moves the chunks and keeps the protocol:
//!
//! - **Leader** ([`SnapshotSenders`]). The core asks for a snapshot to a follower
//!   (`Ready::snapshot_sends`); a `snapshot-send-N` thread opens a view (at the engine's
//!   applied index `Y`, at or past the core's snapshot index), asks the event loop for the
//!   term and membership at `Y` (still in the log: the log is compacted only up to durable
//!   checkpoints, which the view is at or past), and sends the chunks as InstallSnapshot
//!   calls on a connection of its own, one in flight, rate limited to
//!   `snapshot_send_bytes_per_sec`. Each chunk names the snapshot (index and term of `Y`),
//!   its byte `offset` and `done` on the last. A lost reply or a broken connection resends
//!   the same chunk (the thread keeps it until acknowledged); a follower that lost the
//!   transfer (it restarted, or another transfer replaced it) answers where it is, and the
//!   sender restarts from offset 0 with a new view. The follower's answer to the last chunk
//!   — its core's InstallSnapshotResponse, sent once the snapshot is installed and durable
//!   — goes to the core, which sets the follower's match index to `Y`; a transfer that
//!   gives up reports a failed response, and the core tries again later.
//! - **Follower** ([`SnapshotReceiver`], on the RPC thread that received the call). Chunk
//!   at offset 0 starts a new intake (removing a half-built one), the chunk at the expected
//!   offset is written, a repeat of the last one is acknowledged again, anything else is
//!   refused with the offset expected. When the stream's end record has checked out, the
//!   intake is made durable and handed (event loop → apply thread) to be swapped in; then
//!   the core records the snapshot's index, term and membership and persists them, and only
//!   then answers the leader. One transfer at a time; none starts while one is swapped in.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Sender};
use parking_lot::Mutex;

use super::wire::{self, WireReply};
use super::{AdminReply, AdminRequest, Event, LinkFilter, NodeStopper, RaftReply};
use crate::metrics;
use crate::proto::kvstore as pb;
use crate::raft::{Membership, Message, MessageBody, NodeId, SnapshotMeta};
use crate::rpc::services::raft as ids;
use crate::rpc::{call_unary, ClientConfig, Credentials, Responder, RpcClient};

/// The application's state, as chunks of a stream (see the module documentation).
pub trait SnapshotStore: Send + Sync {
    /// Opens a consistent view of the state, read in chunks of about `chunk_bytes`.
    fn read(&self, chunk_bytes: usize) -> Result<Box<dyn SnapshotChunks>, String>;
    /// Starts receiving a state beside the live one (replacing a half-received one).
    fn receive(&self) -> Result<Box<dyn SnapshotIntake>, String>;
}

/// A consistent view being read.
pub trait SnapshotChunks: Send {
    /// The index of the last entry the view has applied.
    fn applied_index(&self) -> u64;
    /// The next chunk; `None` after the last.
    fn next_chunk(&mut self) -> Result<Option<Vec<u8>>, String>;
    /// Whether the chunk returned last was the last one.
    fn is_finished(&self) -> bool;
}

/// A state being received, chunk by chunk, beside the live one.
pub trait SnapshotIntake: Send {
    /// Writes one chunk; an error when it is damaged or out of order (the intake is then
    /// dropped).
    fn push(&mut self, chunk: &[u8]) -> Result<(), String>;
    /// Whether the stream's end has arrived and checked out (checksum, counts).
    fn is_complete(&self) -> bool;
    /// Makes the received state durable, ready to be swapped in.
    fn finish(self: Box<Self>) -> Result<Box<dyn ReceivedSnapshot>, String>;
}

/// A complete, verified, durable state beside the live one.
pub trait ReceivedSnapshot: Send {
    fn applied_index(&self) -> u64;
    /// Replaces the live state (which the caller has closed) atomically.
    fn swap_in(self: Box<Self>) -> Result<(), String>;
}

/// A received snapshot on its way to the apply thread, with the message that tells the core
/// once it is installed and the call to answer with the core's response.
pub struct InstallReceived {
    /// Taken by `swap_in`.
    received: Option<Box<dyn ReceivedSnapshot>>,
    index: u64,
    /// An InstallSnapshot with `done` and no data: the snapshot's index, term and
    /// membership, for the core.
    message: Message,
    reply: RaftReply,
    /// Clears the receiver's "installing" mark when dropped (installed or not).
    _installing: InstallingMark,
}

impl std::fmt::Debug for InstallReceived {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "InstallReceived(index {})", self.index)
    }
}

impl InstallReceived {
    /// The index the received state has applied.
    pub fn applied_index(&self) -> u64 {
        self.index
    }

    /// Replaces the live state (closed by the caller) with the received one.
    pub fn swap_in(&mut self) -> Result<(), String> {
        match self.received.take() {
            Some(received) => received.swap_in(),
            None => Err("swapped in already".into()),
        }
    }

    /// Splits off the message and the reply, for the event loop; the received state, swapped
    /// in or not, is released (a new transfer may start).
    pub fn into_message(self) -> (Message, RaftReply) {
        (self.message, self.reply)
    }
}

struct InstallingMark(Arc<AtomicBool>);

impl Drop for InstallingMark {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

// ------------------------------------------------------------------------ follower

/// The transfer a follower is receiving.
struct Transfer {
    from: NodeId,
    meta: SnapshotMeta,
    intake: Box<dyn SnapshotIntake>,
    /// Bytes received and written: the offset of the next chunk.
    expected: u64,
    /// The length of the last chunk written, to acknowledge a repeat of it.
    last_len: u64,
    started: Instant,
}

/// The follower's side: feeds the chunks of one transfer at a time into the store.
pub(crate) struct SnapshotReceiver {
    id: NodeId,
    store: Arc<dyn SnapshotStore>,
    events: Sender<Event>,
    transfer: Mutex<Option<Transfer>>,
    /// A received snapshot is on its way to be swapped in: its files must stay, so no new
    /// transfer starts.
    installing: Arc<AtomicBool>,
}

impl SnapshotReceiver {
    pub fn new(id: NodeId, store: Arc<dyn SnapshotStore>, events: Sender<Event>) -> Self {
        SnapshotReceiver {
            id,
            store,
            events,
            transfer: Mutex::new(None),
            installing: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Handles one InstallSnapshot chunk; answers `responder` now, or — for the last chunk
    /// — once the snapshot is installed and the core has recorded it.
    pub fn handle(&self, message: Message, responder: Responder<pb::InstallSnapshotReply>) {
        let answer = |next_offset: u64, success: bool| {
            let MessageBody::InstallSnapshot { meta, .. } = &message.body else {
                unreachable!("an InstallSnapshot")
            };
            pb::InstallSnapshotReply {
                term: message.term,
                from: self.id,
                last_included_index: meta.index,
                last_included_term: meta.term,
                next_offset,
                success,
                ..Default::default()
            }
        };
        match self.take_chunk(&message) {
            Ok(Step::Answer(next_offset, success)) => responder.send(answer(next_offset, success)),
            Ok(Step::Complete(received, bytes)) => {
                self.hand_over(message, received, bytes, responder)
            }
            Err(error) => {
                log::error!(
                    "node {}: snapshot from node {} refused: {error}",
                    self.id,
                    message.from
                );
                // The leader restarts the transfer from the beginning.
                responder.send(answer(0, false));
            }
        }
    }

    fn take_chunk(&self, message: &Message) -> Result<Step, String> {
        let MessageBody::InstallSnapshot {
            meta, offset, data, ..
        } = &message.body
        else {
            unreachable!("an InstallSnapshot")
        };
        let (offset, len) = (*offset, data.len() as u64);
        let mut slot = self.transfer.lock();
        // Checked under the transfer's lock, and set under it when a transfer completes (see
        // below): a first chunk of another leader's transfer that waited for the lock must
        // not start a new intake, which would replace the received files before they are
        // swapped in.
        if self.installing.load(Ordering::SeqCst) {
            // Busy swapping in the last one; the leader tries again.
            return Ok(Step::Answer(0, false));
        }
        let same = |t: &Transfer| t.from == message.from && t.meta == *meta;
        match slot.as_ref() {
            Some(t) if same(t) && offset + len == t.expected && len == t.last_len => {
                // A repeat of the last chunk (its answer was lost): acknowledged again.
                return Ok(Step::Answer(t.expected, true));
            }
            Some(t) if same(t) && offset == t.expected => {}
            _ if offset == 0 => {
                // A new transfer: whatever was half received goes.
                *slot = None;
                *slot = Some(Transfer {
                    from: message.from,
                    meta: *meta,
                    intake: self.store.receive()?,
                    expected: 0,
                    last_len: 0,
                    started: Instant::now(),
                });
            }
            Some(t) if same(t) => return Ok(Step::Answer(t.expected, false)),
            _ => return Ok(Step::Answer(0, false)),
        }
        let transfer = slot.as_mut().expect("a transfer");
        if let Err(error) = transfer.intake.push(data) {
            *slot = None;
            return Err(error);
        }
        transfer.expected += len;
        transfer.last_len = len;
        if !transfer.intake.is_complete() {
            return Ok(Step::Answer(transfer.expected, true));
        }
        let transfer = slot.take().expect("a transfer");
        let received = transfer.intake.finish()?;
        if received.applied_index() != meta.index {
            return Err(format!(
                "the stream holds index {}, the leader named {}",
                received.applied_index(),
                meta.index
            ));
        }
        metrics::SNAPSHOT_INSTALL_DURATION.observe_duration(transfer.started.elapsed());
        // Still under the lock: from here until the install ends (`InstallingMark`), no
        // transfer starts.
        self.installing.store(true, Ordering::SeqCst);
        Ok(Step::Complete(received, transfer.expected))
    }

    /// Sends a complete snapshot on to be swapped in; the core's answer completes the call.
    fn hand_over(
        &self,
        message: Message,
        received: Box<dyn ReceivedSnapshot>,
        bytes: u64,
        responder: Responder<pb::InstallSnapshotReply>,
    ) {
        let MessageBody::InstallSnapshot {
            meta, membership, ..
        } = message.body
        else {
            unreachable!("an InstallSnapshot")
        };
        metrics::SNAPSHOTS_RECEIVED.inc();
        metrics::SNAPSHOT_RECEIVED_BYTES.inc_by(bytes);
        debug_assert!(
            self.installing.load(Ordering::SeqCst),
            "set when the transfer completed"
        );
        let id = self.id;
        let install = InstallReceived {
            index: received.applied_index(),
            received: Some(received),
            message: Message {
                body: MessageBody::InstallSnapshot {
                    meta,
                    membership,
                    offset: bytes,
                    data: Vec::new(),
                    done: true,
                    total_bytes: bytes,
                },
                ..message
            },
            reply: Box::new(
                move |response| match wire::install_snapshot_reply(response) {
                    Some(reply) => responder.send(reply),
                    None => {
                        log::error!("node {id}: the core answered a snapshot with another kind")
                    }
                },
            ),
            _installing: InstallingMark(Arc::clone(&self.installing)),
        };
        log::info!(
            "node {}: received a snapshot at index {} ({bytes} bytes) from node {}",
            self.id,
            meta.index,
            message.from
        );
        // A full queue drops it (and the call fails): the leader sends it again.
        let _ = self.events.try_send(Event::SnapshotReceived(install));
    }
}

enum Step {
    Answer(u64, bool),
    Complete(Box<dyn ReceivedSnapshot>, u64),
}

// ------------------------------------------------------------------------ leader

/// How a sender reaches its follower and how fast it may send.
#[derive(Clone)]
pub(crate) struct SendOptions {
    pub me: NodeId,
    pub chunk_bytes: usize,
    /// 0: no limit.
    pub bytes_per_sec: u64,
    /// Every chunk but the last waits `client.call_timeout_ms` for its answer.
    pub client: ClientConfig,
    /// The last chunk is answered once the follower has swapped the state in and made it
    /// durable: it waits this long, in all its attempts together.
    pub install_timeout_ms: u64,
    pub credentials: Credentials,
    pub filter: Option<LinkFilter>,
}

/// Attempts to deliver one chunk (a lost reply, a broken connection) before the transfer
/// is given up and the core told.
const CHUNK_ATTEMPTS: u32 = 5;
/// Transfers restarted from offset 0 (the follower lost it, the view fell behind the log)
/// before the sender gives up.
const TRANSFER_ATTEMPTS: u32 = 3;
const RETRY_BACKOFF_MS: u64 = 200;
/// How long a chunk's answer may take (a chunk is at most `max_snapshot_chunk_bytes`, written
/// to the follower's disk). With `CHUNK_ATTEMPTS`, a follower that stopped answering (paused,
/// cut off) holds a sender, and with it the leader's compaction floor, for under a minute.
const CHUNK_TIMEOUT_MS: u64 = 10_000;
/// The last chunk is answered only once the follower has swapped the state in and made it
/// durable: allowed this long, all attempts together.
const INSTALL_TIMEOUT_MS: u64 = 120_000;

/// The leader's snapshot senders, one thread per follower being sent one.
pub(crate) struct SnapshotSenders {
    store: Arc<dyn SnapshotStore>,
    options: SendOptions,
    events: Sender<Event>,
    stopper: NodeStopper,
    running: std::collections::HashMap<NodeId, Arc<AtomicBool>>,
}

impl SnapshotSenders {
    pub fn new(
        store: Arc<dyn SnapshotStore>,
        options: SendOptions,
        events: Sender<Event>,
        stopper: NodeStopper,
    ) -> Self {
        SnapshotSenders {
            store,
            options,
            events,
            stopper,
            running: Default::default(),
        }
    }

    /// Starts sending a snapshot to `to` at `addr` in `term`, cancelling an earlier sender.
    pub fn start(&mut self, to: NodeId, addr: Option<SocketAddr>, term: u64) {
        self.cancel(to);
        let cancelled = Arc::new(AtomicBool::new(false));
        let sender = Sender_ {
            store: Arc::clone(&self.store),
            options: self.options.clone(),
            events: self.events.clone(),
            to,
            term,
            cancelled: Arc::clone(&cancelled),
            stopping: Arc::clone(&self.stopper.stopping),
        };
        let Some(addr) = addr else {
            return sender.report_failure(format!("no address for node {to}"));
        };
        let spawned = self
            .stopper
            .spawn(format!("snapshot-send-{to}"), move || sender.run(addr));
        match spawned {
            Ok(_) => {
                self.running.insert(to, cancelled);
            }
            Err(e) => log::error!("cannot start a snapshot sender: {e}"),
        }
    }

    fn cancel(&mut self, to: NodeId) {
        if let Some(flag) = self.running.remove(&to) {
            flag.store(true, Ordering::SeqCst);
        }
    }

    /// This node no longer leads: its transfers stop (their views are released).
    pub fn cancel_all(&mut self) {
        for (_, flag) in self.running.drain() {
            flag.store(true, Ordering::SeqCst);
        }
    }
}

/// One transfer's thread.
struct Sender_ {
    store: Arc<dyn SnapshotStore>,
    options: SendOptions,
    events: Sender<Event>,
    to: NodeId,
    term: u64,
    cancelled: Arc<AtomicBool>,
    stopping: Arc<AtomicBool>,
}

enum Outcome {
    /// The follower's answer to the last chunk.
    Done(Message),
    /// Start again from offset 0 with a new view.
    Restart(String),
}

impl Sender_ {
    fn stopped(&self) -> bool {
        self.cancelled.load(Ordering::SeqCst) || self.stopping.load(Ordering::SeqCst)
    }

    fn run(self, addr: SocketAddr) {
        crate::threads::yield_to_clients("snapshot sender");
        let connect = |call_timeout_ms| {
            let config = ClientConfig {
                call_timeout_ms,
                ..self.options.client.clone()
            };
            RpcClient::new(addr, config).with_credentials(self.options.credentials.clone())
        };
        // The last chunk waits longer than the others: its own connection and timeout.
        let client = Links {
            chunks: connect(self.options.client.call_timeout_ms),
            install: connect(self.options.install_timeout_ms),
        };
        let mut why = String::new();
        for _ in 0..TRANSFER_ATTEMPTS {
            match self.transfer(&client) {
                Ok(Outcome::Done(answer)) => {
                    if !self.stopped() {
                        let _ = self.events.try_send(Event::Step(answer));
                    }
                    return;
                }
                Ok(Outcome::Restart(reason)) => why = reason,
                Err(reason) => {
                    why = reason;
                    break;
                }
            }
            if self.stopped() {
                return;
            }
            std::thread::sleep(Duration::from_millis(RETRY_BACKOFF_MS));
        }
        client.chunks.disconnect();
        client.install.disconnect();
        if !self.stopped() {
            self.report_failure(why);
        }
    }

    /// Tells the core the transfer failed; it tries again later.
    fn report_failure(&self, why: String) {
        log::warn!(
            "node {}: snapshot to node {} failed: {why}",
            self.options.me,
            self.to
        );
        let answer = Message {
            from: self.to,
            to: self.options.me,
            term: self.term,
            body: MessageBody::InstallSnapshotResponse {
                meta: SnapshotMeta::default(),
                next_offset: 0,
                success: false,
            },
        };
        let _ = self.events.try_send(Event::Step(answer));
    }

    /// The term and membership at `index`, from the event loop's core.
    fn meta_at(&self, index: u64) -> Option<(SnapshotMeta, Membership)> {
        let (tx, rx) = bounded(1);
        let request = Event::Admin(AdminRequest::SnapshotMetaAt { to: self.to, index }, tx);
        self.events
            .send_timeout(request, Duration::from_secs(5))
            .ok()?;
        match rx.recv_timeout(Duration::from_secs(5)).ok()? {
            AdminReply::SnapshotMeta(meta) => meta,
            _ => None,
        }
    }

    /// One transfer from offset 0; `Err` when it cannot go on at all.
    fn transfer(&self, client: &Links) -> Result<Outcome, String> {
        let mut chunks = self.store.read(self.options.chunk_bytes)?;
        let index = chunks.applied_index();
        let Some((meta, membership)) = self.meta_at(index) else {
            return Ok(Outcome::Restart(format!(
                "the term at index {index} is no longer known (compacted meanwhile)"
            )));
        };
        let started = Instant::now();
        let mut offset = 0u64;
        log::info!(
            "node {}: sending a snapshot at index {index} to node {}",
            self.options.me,
            self.to
        );
        while let Some(chunk) = chunks.next_chunk()? {
            if self.stopped() {
                return Err("cancelled".into());
            }
            let done = chunks.is_finished();
            let request = pb::InstallSnapshotRequest {
                term: self.term,
                leader_id: self.options.me,
                last_included_index: meta.index,
                last_included_term: meta.term,
                offset,
                data: chunk,
                done,
                total_bytes: 0,
                to: self.to,
                membership: protobuf::MessageField::some(wire::membership_to_wire(&membership)),
                ..Default::default()
            };
            let len = request.data.len() as u64;
            let link = if done {
                &client.install
            } else {
                &client.chunks
            };
            let answer = match self.deliver(link, &request, done)? {
                Ok(answer) => answer,
                Err(reason) => return Ok(Outcome::Restart(reason)),
            };
            metrics::SNAPSHOT_SENT_BYTES.inc_by(len);
            if done {
                metrics::SNAPSHOTS_SENT.inc();
                metrics::SNAPSHOT_SEND_DURATION.observe_duration(started.elapsed());
                return Ok(Outcome::Done(answer));
            }
            offset += len;
            self.pace(started, offset);
        }
        Err("the stream ended without its last chunk".into())
    }

    /// Sends one chunk until the follower has it; the inner `Err` asks for a restart.
    fn deliver(
        &self,
        client: &RpcClient,
        request: &pb::InstallSnapshotRequest,
        done: bool,
    ) -> Result<Result<Message, String>, String> {
        let len = request.data.len() as u64;
        let mut last_error = String::new();
        // The install's timeout bounds all attempts of the last chunk together.
        let install_deadline =
            Instant::now() + Duration::from_millis(self.options.install_timeout_ms);
        for attempt in 0..CHUNK_ATTEMPTS {
            if self.stopped() {
                return Err("cancelled".into());
            }
            if done && attempt > 0 && Instant::now() >= install_deadline {
                break;
            }
            if attempt > 0 {
                std::thread::sleep(Duration::from_millis(RETRY_BACKOFF_MS));
            }
            let allowed = |from, to| self.options.filter.as_ref().is_none_or(|f| f(from, to));
            if !allowed(self.options.me, self.to) {
                last_error = "the link is cut".into();
                continue;
            }
            let reply: pb::InstallSnapshotReply =
                match call_unary(client, ids::SERVICE_ID, ids::INSTALL_SNAPSHOT, request) {
                    Ok(reply) if allowed(self.to, self.options.me) => reply,
                    Ok(_) => {
                        last_error = "the answer was cut".into();
                        continue;
                    }
                    Err(e) => {
                        // The same chunk again, on a new connection.
                        last_error = e.to_string();
                        client.disconnect();
                        continue;
                    }
                };
            let answer = wire::reply_from_wire(
                self.options.me,
                self.to,
                WireReply::InstallSnapshot(reply.clone()),
            );
            if done {
                // The core's own answer (success or not): the core decides.
                return Ok(Ok(answer));
            }
            let end = request.offset + len;
            if reply.success && reply.next_offset == end {
                return Ok(Ok(answer));
            }
            if !reply.success && reply.next_offset == request.offset && request.offset > 0 {
                last_error = "the follower did not take the chunk".into();
                continue;
            }
            return Ok(Err(format!(
                "node {} expects offset {} (sent {}): it lost the transfer",
                self.to, reply.next_offset, request.offset
            )));
        }
        Err(format!(
            "chunk at offset {} not delivered after {CHUNK_ATTEMPTS} attempts: {last_error}",
            request.offset
        ))
    }

    /// Sleeps so that `sent` bytes since `started` stay within the rate limit.
    fn pace(&self, started: Instant, sent: u64) {
        let rate = self.options.bytes_per_sec;
        if rate == 0 {
            return;
        }
        let due = Duration::from_secs_f64(sent as f64 / rate as f64);
        let elapsed = started.elapsed();
        if due > elapsed {
            std::thread::sleep(due - elapsed);
        }
    }
}

/// A sender's two connections to its follower.
struct Links {
    /// Every chunk but the last, each answered within `CHUNK_TIMEOUT_MS`.
    chunks: RpcClient,
    /// The last chunk, answered once the follower has installed the state.
    install: RpcClient,
}

/// The client settings of a sender's chunks, and the install's timeout (see `SendOptions`).
pub(crate) fn sender_timeouts(
    connect_timeout_ms: u64,
    max_frame_bytes: usize,
) -> (ClientConfig, u64) {
    let chunks = ClientConfig {
        connect_timeout_ms,
        call_timeout_ms: CHUNK_TIMEOUT_MS,
        max_frame_bytes,
    };
    (chunks, INSTALL_TIMEOUT_MS)
}

#[cfg(test)]
mod tests {
    //! The follower's protocol, over a store that records what reaches it: chunks are
    //! numbered (first byte), the last one is marked `E`, and a chunk holding `X` is
    //! "damaged".
    use super::*;
    use crossbeam_channel::Receiver;

    /// `received` plays the real store's `engine.incoming` directory: one place that every
    /// intake starts afresh and that a received snapshot's swap moves into `live`.
    #[derive(Default)]
    struct FakeStore {
        /// What the last intake received, in order.
        received: Arc<Mutex<Vec<u8>>>,
        live: Arc<Mutex<Vec<u8>>>,
        /// When set, `finish` says it has begun (first channel) and waits for the second.
        finish_gate: Option<(Sender<()>, Receiver<()>)>,
    }

    struct FakeIntake {
        next: u8,
        complete: bool,
        received: Arc<Mutex<Vec<u8>>>,
        live: Arc<Mutex<Vec<u8>>>,
        finish_gate: Option<(Sender<()>, Receiver<()>)>,
    }

    struct FakeReceived {
        received: Arc<Mutex<Vec<u8>>>,
        live: Arc<Mutex<Vec<u8>>>,
    }

    impl SnapshotStore for FakeStore {
        fn read(&self, _chunk_bytes: usize) -> Result<Box<dyn SnapshotChunks>, String> {
            unreachable!("not used by the receiver")
        }
        fn receive(&self) -> Result<Box<dyn SnapshotIntake>, String> {
            self.received.lock().clear();
            Ok(Box::new(FakeIntake {
                next: 0,
                complete: false,
                received: Arc::clone(&self.received),
                live: Arc::clone(&self.live),
                finish_gate: self.finish_gate.clone(),
            }))
        }
    }

    impl SnapshotIntake for FakeIntake {
        fn push(&mut self, chunk: &[u8]) -> Result<(), String> {
            if chunk.contains(&b'X') {
                return Err("checksum mismatch in chunk".into());
            }
            if chunk[0] != self.next {
                return Err(format!(
                    "chunk {} out of order (expected {})",
                    chunk[0], self.next
                ));
            }
            self.next += 1;
            self.complete = chunk.get(1) == Some(&b'E');
            self.received.lock().push(chunk[0]);
            Ok(())
        }
        fn is_complete(&self) -> bool {
            self.complete
        }
        fn finish(self: Box<Self>) -> Result<Box<dyn ReceivedSnapshot>, String> {
            if let Some((begun, go)) = &self.finish_gate {
                begun.send(()).unwrap();
                go.recv().unwrap();
            }
            Ok(Box::new(FakeReceived {
                received: self.received,
                live: self.live,
            }))
        }
    }

    impl ReceivedSnapshot for FakeReceived {
        fn applied_index(&self) -> u64 {
            50
        }
        fn swap_in(self: Box<Self>) -> Result<(), String> {
            *self.live.lock() = self.received.lock().clone();
            Ok(())
        }
    }

    const META: SnapshotMeta = SnapshotMeta { index: 50, term: 3 };

    fn chunk(from: NodeId, offset: u64, data: &[u8]) -> Message {
        Message {
            from,
            to: 2,
            term: 4,
            body: MessageBody::InstallSnapshot {
                meta: META,
                membership: Membership::default(),
                offset,
                data: data.to_vec(),
                done: data.get(1) == Some(&b'E'),
                total_bytes: 0,
            },
        }
    }

    struct Follower {
        receiver: SnapshotReceiver,
        events: Receiver<Event>,
        store: Arc<FakeStore>,
    }

    impl Follower {
        fn new() -> Follower {
            Follower::with_store(FakeStore::default())
        }

        fn with_store(store: FakeStore) -> Follower {
            let store = Arc::new(store);
            let (tx, events) = bounded(16);
            let receiver = SnapshotReceiver::new(2, Arc::clone(&store) as _, tx);
            Follower {
                receiver,
                events,
                store,
            }
        }

        /// Sends `message`; the immediate answer `(next_offset, success)`, or `None` when the
        /// answer waits for the install.
        fn send(&self, message: Message) -> Option<(u64, bool)> {
            let (responder, answer) = Responder::local();
            self.receiver.handle(message, responder);
            answer
                .try_recv()
                .ok()
                .map(|r| r.unwrap())
                .map(|r| (r.next_offset, r.success))
        }

        fn received(&self) -> Vec<u8> {
            self.store.received.lock().clone()
        }
    }

    #[test]
    fn chunks_in_order_with_a_repeat_complete_once_and_wait_for_the_install() {
        let f = Follower::new();
        assert_eq!(f.send(chunk(1, 0, b"\x00aaaa")), Some((5, true)));
        // The answer was lost: the same chunk again is acknowledged, not written twice.
        assert_eq!(f.send(chunk(1, 0, b"\x00aaaa")), Some((5, true)));
        assert_eq!(f.send(chunk(1, 5, b"\x01bbb")), Some((9, true)));
        assert_eq!(f.send(chunk(1, 5, b"\x01bbb")), Some((9, true)));
        assert_eq!(f.received(), vec![0, 1]);
        // The last chunk is answered by the core, after the install.
        let (responder, answer) = Responder::local();
        f.receiver.handle(chunk(1, 9, b"\x02E"), responder);
        assert!(answer.try_recv().is_err(), "answered before the install");
        let Ok(Event::SnapshotReceived(mut install)) = f.events.try_recv() else {
            panic!("no install handed over")
        };
        assert_eq!(install.applied_index(), 50);
        // While it is being installed, no new transfer may replace its files.
        assert_eq!(f.send(chunk(3, 0, b"\x00zz")), Some((0, false)));
        install.swap_in().unwrap();
        assert_eq!(*f.store.live.lock(), vec![0, 1, 2]);
        let (message, reply) = install.into_message();
        assert!(matches!(
            message.body,
            MessageBody::InstallSnapshot { done: true, offset: 11, ref data, meta, .. }
                if data.is_empty() && meta == META
        ));
        reply(Message {
            from: 2,
            to: 1,
            term: 4,
            body: MessageBody::InstallSnapshotResponse {
                meta: META,
                next_offset: 11,
                success: true,
            },
        });
        let reply = answer.try_recv().unwrap().unwrap();
        assert!(reply.success && reply.next_offset == 11 && reply.last_included_index == 50);
        // Installed: a new transfer may start.
        assert_eq!(f.send(chunk(3, 0, b"\x00zz")), Some((3, true)));
    }

    /// Two leaders of different terms may stream at once (the old one has not heard of the
    /// new term yet). The first chunk of one transfer, arriving while the other completes,
    /// once waited for the transfer lock past the "installing" check and then started a new
    /// intake, which emptied the received files before they were swapped in: the node
    /// installed an empty engine and stopped ("carries no data and the engine is at index
    /// 0", seen in process_cluster::m8_chaos).
    #[test]
    fn a_transfer_starting_while_another_completes_waits_for_its_install() {
        let (begun_tx, begun) = bounded(1);
        let (go, go_rx) = bounded(1);
        let f = Arc::new(Follower::with_store(FakeStore {
            finish_gate: Some((begun_tx, go_rx)),
            ..FakeStore::default()
        }));
        assert_eq!(f.send(chunk(1, 0, b"\x00aaaa")), Some((5, true)));
        let completing = {
            let f = Arc::clone(&f);
            std::thread::spawn(move || {
                let (responder, _answer) = Responder::local();
                f.receiver.handle(chunk(1, 5, b"\x01E"), responder);
            })
        };
        // The last chunk is in `finish`, holding the transfer lock; node 3's first chunk
        // comes now and waits for that lock.
        begun.recv_timeout(Duration::from_secs(10)).unwrap();
        let starting = {
            let f = Arc::clone(&f);
            std::thread::spawn(move || f.send(chunk(3, 0, b"\x00zz")))
        };
        // Give node 3's chunk time to reach the lock. (Should it come late instead, it
        // finds the install under way either way: the test can then only pass.)
        std::thread::sleep(Duration::from_millis(300));
        go.send(()).unwrap();
        completing.join().unwrap();
        assert_eq!(
            starting.join().unwrap(),
            Some((0, false)),
            "a transfer started while another one was being handed over to be installed"
        );
        let Ok(Event::SnapshotReceived(mut install)) = f.events.try_recv() else {
            panic!("no install handed over")
        };
        install.swap_in().unwrap();
        assert_eq!(
            *f.store.live.lock(),
            vec![0, 1],
            "the installed state is node 1's"
        );
    }

    #[test]
    fn a_chunk_out_of_order_is_refused_with_the_offset_to_resume_from() {
        let f = Follower::new();
        assert_eq!(f.send(chunk(1, 0, b"\x00aaaa")), Some((5, true)));
        // A lost chunk: the next one is refused, and the leader resumes at 5.
        assert_eq!(f.send(chunk(1, 9, b"\x02cc")), Some((5, false)));
        assert_eq!(f.send(chunk(1, 3, b"\x01bbb")), Some((5, false)));
        assert_eq!(f.send(chunk(1, 5, b"\x01bbb")), Some((9, true)));
        assert_eq!(f.received(), vec![0, 1]);
        // A chunk of another leader's transfer that never started here: start from 0.
        assert_eq!(f.send(chunk(3, 5, b"\x01bbb")), Some((0, false)));
        assert!(f.events.try_recv().is_err());
    }

    #[test]
    fn a_damaged_chunk_ends_the_transfer_and_nothing_is_installed() {
        let f = Follower::new();
        assert_eq!(f.send(chunk(1, 0, b"\x00aaaa")), Some((5, true)));
        assert_eq!(f.send(chunk(1, 5, b"\x01bXb")), Some((0, false)));
        // The transfer is gone: the leader must start again from 0.
        assert_eq!(f.send(chunk(1, 5, b"\x01bbb")), Some((0, false)));
        assert!(f.events.try_recv().is_err());
        assert!(f.store.live.lock().is_empty());
        assert_eq!(f.send(chunk(1, 0, b"\x00aaaa")), Some((5, true)));
        assert_eq!(f.received(), vec![0]);
    }
    /// A view of three chunks, for the sender.
    struct ThreeChunks {
        next: u8,
    }

    impl SnapshotChunks for ThreeChunks {
        fn applied_index(&self) -> u64 {
            META.index
        }
        fn next_chunk(&mut self) -> Result<Option<Vec<u8>>, String> {
            self.next += 1;
            Ok((self.next <= 3).then(|| vec![self.next; 100]))
        }
        fn is_finished(&self) -> bool {
            self.next >= 3
        }
    }

    struct ThreeChunkStore;

    impl SnapshotStore for ThreeChunkStore {
        fn read(&self, _chunk_bytes: usize) -> Result<Box<dyn SnapshotChunks>, String> {
            Ok(Box::new(ThreeChunks { next: 0 }))
        }
        fn receive(&self) -> Result<Box<dyn SnapshotIntake>, String> {
            unreachable!("not used by the sender")
        }
    }

    /// A follower that takes every chunk but never finishes installing: the last chunk's
    /// responders are kept, unanswered.
    struct NeverInstalls {
        held: Mutex<Vec<Responder<pb::InstallSnapshotReply>>>,
    }

    impl crate::rpc::services::RaftService for NeverInstalls {
        fn append_entries(
            &self,
            _: pb::AppendEntriesRequest,
            _: Responder<pb::AppendEntriesReply>,
        ) {
        }
        fn heartbeat(&self, _: pb::HeartbeatRequest, _: Responder<pb::HeartbeatReply>) {}
        fn request_vote(&self, _: pb::RequestVoteRequest, _: Responder<pb::RequestVoteReply>) {}
        fn timeout_now(&self, _: pb::TimeoutNowRequest, _: Responder<pb::TimeoutNowReply>) {}
        fn install_snapshot(
            &self,
            request: pb::InstallSnapshotRequest,
            responder: Responder<pb::InstallSnapshotReply>,
        ) {
            if request.done {
                self.held.lock().push(responder);
                return;
            }
            responder.send(pb::InstallSnapshotReply {
                term: request.term,
                success: true,
                next_offset: request.offset + request.data.len() as u64,
                ..Default::default()
            });
        }
    }

    /// A follower that never answers the last chunk (paused, or its disk hangs) holds the
    /// sender, and with it the leader's compaction floor, for the install timeout in all, not
    /// for one timeout per attempt; then the core hears of the failure.
    #[test]
    fn a_follower_that_never_installs_is_given_up_after_the_install_timeout() {
        let router = crate::rpc::Router::new().with_raft(Arc::new(NeverInstalls {
            held: Mutex::new(Vec::new()),
        }));
        let server =
            crate::rpc::RpcServer::bind("127.0.0.1:0", crate::rpc::ServerConfig::default(), router)
                .unwrap();
        let install_timeout = Duration::from_millis(1_000);
        let (events_tx, events) = bounded(16);
        let sender = Sender_ {
            store: Arc::new(ThreeChunkStore),
            options: SendOptions {
                me: 1,
                chunk_bytes: 100,
                bytes_per_sec: 0,
                client: ClientConfig {
                    connect_timeout_ms: 2_000,
                    call_timeout_ms: 5_000,
                    max_frame_bytes: 1 << 20,
                },
                install_timeout_ms: install_timeout.as_millis() as u64,
                credentials: Credentials::default(),
                filter: None,
            },
            events: events_tx,
            to: 2,
            term: 4,
            cancelled: Arc::new(AtomicBool::new(false)),
            stopping: Arc::new(AtomicBool::new(false)),
        };
        let addr = server.local_addr();
        let started = Instant::now();
        let running = std::thread::spawn(move || sender.run(addr));
        let bound = Duration::from_secs(30);
        let failure = loop {
            match events
                .recv_timeout(bound)
                .expect("the sender neither ends nor reports")
            {
                Event::Admin(AdminRequest::SnapshotMetaAt { .. }, reply) => {
                    let membership = Membership::with_voters([1, 2, 3]);
                    let _ = reply.try_send(AdminReply::SnapshotMeta(Some((META, membership))));
                }
                Event::Step(message) => break message,
                _ => panic!("an unexpected event"),
            }
        };
        let elapsed = started.elapsed();
        running.join().unwrap();
        assert!(
            matches!(
                failure.body,
                MessageBody::InstallSnapshotResponse { success: false, .. }
            ),
            "{failure:?}"
        );
        assert!(elapsed >= install_timeout, "gave up after {elapsed:?}");
        // One timeout per attempt would be 5 s and more.
        assert!(
            elapsed < install_timeout * 4,
            "held the sender for {elapsed:?}: longer than the install timeout allows"
        );
        server.shutdown();
    }
}
