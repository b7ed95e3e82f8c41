//! Peer senders: one thread per peer streams the core's requests on one
//! pipelined connection without waiting for replies (AppendEntries
//! pipelining); the connection's reader thread turns the replies into events. A
//! broken connection loses what was in flight — Raft retries — and is
//! re-established, at most once per `RECONNECT_BACKOFF_MS`.
//!
//! The set of links follows the configuration in force (membership is
//! replicated in the log): a member gets a link to the address the log gives
//! it (or, for a bootstrap member the log has no address for, the one in the
//! cluster file); a node that left loses its link, whose thread ends when
//! its queue closes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender, TrySendError};

use super::wire::{self, WireReply, WireRequest};
use super::{Event, LinkFilter, NodeOptions};
use crate::proto::kvstore as pb;
use crate::raft::{Membership, Message, NodeId};
use crate::rpc::handshake::RepeatFilter;
use crate::rpc::services::raft as ids;
use crate::rpc::{
    decode_message, PipelinedConfig, PipelinedConnection, PipelinedReply, ReplySink, RpcError,
};

/// Messages waiting for one peer's sender; beyond this they are dropped
/// (the peer is slow or down, and Raft will send again).
const PEER_QUEUE_CAPACITY: usize = 4096;
/// After a failed connect, messages to that peer are dropped for this long.
const RECONNECT_BACKOFF_MS: u64 = 100;
/// After the peer refused our handshake (another cluster, a wrong secret):
/// longer, since only a config change can help. The refusal is logged once
/// per `REFUSAL_LOG_INTERVAL_MS`.
const REFUSED_BACKOFF_MS: u64 = 1_000;
const REFUSAL_LOG_INTERVAL_MS: u64 = 10_000;
/// How often blocked threads look at the stop flag.
const STOP_POLL_MS: u64 = 100;
/// The low bits of a call id name the method, so a reply decodes without a
/// table of calls in flight.
const METHOD_BITS: u32 = 3;

/// The event loop's side: a queue per peer, and what it takes to start a
/// link to a new member.
pub(crate) struct PeerSenders {
    queues: HashMap<NodeId, (SocketAddr, Sender<Message>)>,
    options: NodeOptions,
    events: Sender<Event>,
    stopper: super::NodeStopper,
}

impl PeerSenders {
    pub fn start(
        options: &NodeOptions,
        events: Sender<Event>,
        stopper: &super::NodeStopper,
        threads: &mut Vec<JoinHandle<()>>,
    ) -> std::io::Result<PeerSenders> {
        let mut senders = PeerSenders {
            queues: HashMap::new(),
            options: options.clone(),
            events,
            stopper: stopper.clone(),
        };
        for &(peer, addr) in options.peers.iter().filter(|(id, _)| *id != options.id) {
            if options.join {
                break; // a joining node learns its peers from the log
            }
            let thread = senders.start_link(peer, addr)?;
            threads.push(thread);
        }
        Ok(senders)
    }

    /// Makes the links match `membership`: new members get one, departed
    /// ones lose theirs, a member whose address changed is reconnected. A
    /// member without a usable address keeps the cluster file's, if any.
    pub fn sync(&mut self, membership: &Membership) {
        let me = self.options.id;
        let mut wanted: HashMap<NodeId, SocketAddr> = HashMap::new();
        for id in membership.members().filter(|&id| id != me) {
            let from_log = membership.address(id).and_then(|a| a.parse().ok());
            let from_file = self
                .options
                .peers
                .iter()
                .find(|(peer, _)| *peer == id)
                .map(|(_, addr)| *addr);
            match from_log.or(from_file) {
                Some(addr) => {
                    wanted.insert(id, addr);
                }
                None => log::warn!("node {me}: member {id} has no usable address"),
            }
        }
        self.queues
            .retain(|id, (addr, _)| wanted.get(id) == Some(addr));
        for (id, addr) in wanted {
            if self.queues.contains_key(&id) {
                continue;
            }
            log::info!("node {me}: link to member {id} at {addr}");
            // The thread is not joined: it ends when its queue is dropped
            // (the member left) or the node stops.
            if let Err(e) = self.start_link(id, addr) {
                log::error!("node {me}: cannot start a link to member {id}: {e}");
            }
        }
    }

    fn start_link(&mut self, peer: NodeId, addr: SocketAddr) -> std::io::Result<JoinHandle<()>> {
        let options = &self.options;
        let events = &self.events;
        let stopper = &self.stopper;
        {
            let (tx, rx) = bounded(PEER_QUEUE_CAPACITY);
            let link = Link {
                me: options.id,
                peer,
                addr,
                config: PipelinedConfig {
                    connect_timeout_ms: options.peer_connect_timeout_ms,
                    max_frame_bytes: options.max_frame_bytes,
                    max_outstanding: options.max_inflight_appends.max(16) * 4,
                    credentials: options.credentials.clone(),
                    ..PipelinedConfig::default()
                },
                filter: options.link_filter.clone(),
                stopping: Arc::clone(&stopper.stopping),
            };
            let replies = PeerReplies {
                me: options.id,
                peer,
                events: events.clone(),
                filter: options.link_filter.clone(),
            };
            let thread = stopper.spawn(format!("peer-{peer}"), move || link.run(rx, replies))?;
            self.queues.insert(peer, (addr, tx));
            Ok(thread)
        }
    }

    /// The address of `peer`'s link, if it has one.
    pub fn address(&self, peer: NodeId) -> Option<SocketAddr> {
        self.queues.get(&peer).map(|(addr, _)| *addr)
    }

    /// Queues a request for its peer; drops it when the queue is full.
    pub fn send(&self, message: Message) {
        if let Some((_, queue)) = self.queues.get(&message.to) {
            if queue.try_send(message).is_err() {
                log::debug!("peer queue full; dropping a message");
            }
        }
    }
}

struct Link {
    me: NodeId,
    peer: NodeId,
    addr: SocketAddr,
    config: PipelinedConfig,
    filter: Option<LinkFilter>,
    stopping: Arc<AtomicBool>,
}

impl Link {
    fn run(self, messages: Receiver<Message>, replies: PeerReplies) {
        let mut connection: Option<PipelinedConnection> = None;
        let mut retry_at = Instant::now();
        let mut next_call: u64 = 1;
        let mut buffer = Vec::new();
        let mut refusals = RepeatFilter::new(Duration::from_millis(REFUSAL_LOG_INTERVAL_MS));
        while !self.stopping.load(Ordering::SeqCst) {
            let message = match messages.recv_timeout(Duration::from_millis(STOP_POLL_MS)) {
                Ok(message) => message,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => break,
            };
            if self
                .filter
                .as_ref()
                .is_some_and(|allow| !allow(self.me, self.peer))
            {
                continue;
            }
            if connection.as_ref().is_some_and(|c| c.failure().is_some()) {
                connection = None;
            }
            if connection.is_none() {
                if Instant::now() < retry_at {
                    continue;
                }
                match PipelinedConnection::connect(self.addr, self.config.clone(), replies.clone())
                {
                    Ok(c) => connection = Some(c),
                    Err(e) => {
                        let backoff_ms = self.connect_failed(&e, &mut refusals);
                        retry_at = Instant::now() + Duration::from_millis(backoff_ms);
                        continue;
                    }
                }
            }
            let Some(request) = wire::request_to_wire(message) else {
                continue;
            };
            let (method, result) = encode(&request, &mut buffer);
            if let Err(e) = result {
                log::error!("node {}: cannot encode a Raft request: {e}", self.me);
                continue;
            }
            let call_id = (next_call << METHOD_BITS) | method as u64;
            next_call += 1;
            let conn = connection.as_ref().expect("connected");
            match conn.send(ids::SERVICE_ID, method, call_id, &buffer) {
                Ok(()) => {}
                Err(RpcError::Overloaded { .. }) => {}
                Err(e) => {
                    log::debug!("node {}: link to peer {} broke: {e}", self.me, self.peer);
                    connection = None;
                }
            }
        }
        if let Some(connection) = connection {
            connection.close();
        }
    }
}

impl Link {
    /// Logs a failed connect and says how long to wait before the next. A
    /// refusal (or a peer that cannot prove the secret) is a configuration
    /// error worth a warning; anything else is a peer that is down.
    fn connect_failed(&self, error: &RpcError, refusals: &mut RepeatFilter) -> u64 {
        match error {
            RpcError::Refused { .. } | RpcError::Handshake { .. } => {
                if refusals.admit(&error.to_string()) {
                    log::warn!("node {}: link to node {}: {error}", self.me, self.peer);
                }
                REFUSED_BACKOFF_MS
            }
            _ => {
                log::debug!("node {}: cannot reach peer {}: {error}", self.me, self.peer);
                RECONNECT_BACKOFF_MS
            }
        }
    }
}

fn encode(request: &WireRequest, buffer: &mut Vec<u8>) -> (u32, protobuf::Result<()>) {
    use protobuf::Message as _;
    buffer.clear();
    match request {
        WireRequest::AppendEntries(r) => (ids::APPEND_ENTRIES, r.write_to_vec(buffer)),
        WireRequest::Heartbeat(r) => (ids::HEARTBEAT, r.write_to_vec(buffer)),
        WireRequest::RequestVote(r) => (ids::REQUEST_VOTE, r.write_to_vec(buffer)),
        WireRequest::InstallSnapshot(r) => (ids::INSTALL_SNAPSHOT, r.write_to_vec(buffer)),
        WireRequest::TimeoutNow(r) => (ids::TIMEOUT_NOW, r.write_to_vec(buffer)),
    }
}

/// Turns one peer's replies into events for the event loop, on the
/// connection's reader thread (no thread of its own, no extra hop). It never
/// blocks: when the event queue is full the reply is dropped, and Raft sends
/// again when it matters.
#[derive(Clone)]
struct PeerReplies {
    me: NodeId,
    peer: NodeId,
    events: Sender<Event>,
    filter: Option<LinkFilter>,
}

impl ReplySink for PeerReplies {
    fn deliver(&mut self, (call_id, result): PipelinedReply, _closing: &AtomicBool) -> bool {
        if self
            .filter
            .as_ref()
            .is_some_and(|allow| !allow(self.peer, self.me))
        {
            return true;
        }
        let bytes = match result {
            Ok(bytes) => bytes,
            // A lost call: Raft sends again when it matters.
            Err(_) => return true,
        };
        let method = (call_id & ((1 << METHOD_BITS) - 1)) as u32;
        // TimeoutNow's reply only acknowledges receipt: nothing for the core.
        if method == ids::TIMEOUT_NOW {
            return true;
        }
        match decode_reply(method, &bytes) {
            Ok(reply) => {
                let message = wire::reply_from_wire(self.me, self.peer, reply);
                if let Err(what) = wire::check_numbers(&message) {
                    log::warn!(
                        "node {}: bad reply from peer {}: {what}",
                        self.me,
                        self.peer
                    );
                    return true;
                }
                match self.events.try_send(Event::Step(message)) {
                    Ok(()) => true,
                    Err(TrySendError::Full(_)) => {
                        log::debug!("node {}: event queue full, dropping a reply", self.me);
                        true
                    }
                    // The event loop is gone: the node is stopping.
                    Err(TrySendError::Disconnected(_)) => false,
                }
            }
            Err(e) => {
                log::warn!("node {}: bad reply from peer {}: {e}", self.me, self.peer);
                true
            }
        }
    }
}

fn decode_reply(method: u32, bytes: &[u8]) -> Result<WireReply, RpcError> {
    Ok(match method {
        ids::APPEND_ENTRIES => {
            WireReply::AppendEntries(decode_message::<pb::AppendEntriesReply>(bytes)?)
        }
        ids::HEARTBEAT => WireReply::Heartbeat(decode_message::<pb::HeartbeatReply>(bytes)?),
        ids::REQUEST_VOTE => WireReply::RequestVote(decode_message::<pb::RequestVoteReply>(bytes)?),
        ids::INSTALL_SNAPSHOT => {
            WireReply::InstallSnapshot(decode_message::<pb::InstallSnapshotReply>(bytes)?)
        }
        other => return Err(RpcError::Decode(format!("reply to unknown method {other}"))),
    })
}
