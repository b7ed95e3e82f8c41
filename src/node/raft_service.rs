//! The Raft service's handlers: each incoming RPC becomes an event for the
//! event loop, carrying a closure that answers the call with the core's
//! response once it is durable. The handler itself never blocks, so one
//! connection carries a whole pipeline of AppendEntries. The exception is a
//! streamed snapshot chunk, written into the incoming state on the connection
//! thread (the leader's snapshot sender has a connection of its own).

use crossbeam_channel::Sender;

use super::snapshot::SnapshotReceiver;
use super::{wire, Event, LinkFilter};
use crate::proto::kvstore as pb;
use crate::raft::{Message, NodeId};
use crate::rpc::services::RaftService;
use crate::rpc::{Responder, RpcCode};

pub struct RaftServiceHandler {
    id: NodeId,
    events: Sender<Event>,
    link_filter: Option<LinkFilter>,
    /// Streamed snapshots are taken here, on the RPC thread, not by the core.
    snapshots: Option<SnapshotReceiver>,
}

impl RaftServiceHandler {
    pub(crate) fn new(
        id: NodeId,
        events: Sender<Event>,
        link_filter: Option<LinkFilter>,
        snapshots: Option<SnapshotReceiver>,
    ) -> Self {
        RaftServiceHandler {
            id,
            events,
            link_filter,
            snapshots,
        }
    }

    /// Queues `message` with its reply. A cut link or a full event queue
    /// drops the request: the responder, dropped unanswered, fails the call,
    /// and Raft treats it as a lost message. A message with an impossible
    /// term or index is answered `BadRequest` and never reaches the core.
    fn deliver<R: protobuf::Message>(
        &self,
        message: Message,
        responder: Responder<R>,
        to_reply: fn(Message) -> Option<R>,
    ) {
        let Some(responder) = self.admit(&message, responder) else {
            return;
        };
        let id = self.id;
        let reply = Box::new(move |response: Message| match to_reply(response) {
            Some(reply) => responder.send(reply),
            None => {
                log::error!("node {id}: the core answered an RPC with the wrong kind of message")
            }
        });
        if self
            .events
            .try_send(Event::Request(message, reply))
            .is_err()
        {
            log::debug!(
                "node {}: event queue full, dropping a Raft request",
                self.id
            );
        }
    }
}

impl RaftServiceHandler {
    /// A message with an impossible term or index is answered `BadRequest`;
    /// one over a cut link is dropped (its responder fails the call). Returns
    /// the responder when the message may go on.
    fn admit<R: protobuf::Message>(
        &self,
        message: &Message,
        responder: Responder<R>,
    ) -> Option<Responder<R>> {
        if let Err(what) = wire::check_numbers(message) {
            log::warn!("node {}: refusing a Raft request: {what}", self.id);
            responder.send_error(RpcCode::BadRequest, &what);
            return None;
        }
        if let Some(filter) = &self.link_filter {
            if !filter(message.from, self.id) {
                return None;
            }
        }
        Some(responder)
    }
}

impl RaftService for RaftServiceHandler {
    fn append_entries(
        &self,
        request: pb::AppendEntriesRequest,
        responder: Responder<pb::AppendEntriesReply>,
    ) {
        self.deliver(
            wire::append_entries_from_wire(request),
            responder,
            wire::append_entries_reply,
        );
    }

    fn heartbeat(&self, request: pb::HeartbeatRequest, responder: Responder<pb::HeartbeatReply>) {
        self.deliver(
            wire::heartbeat_from_wire(request),
            responder,
            wire::heartbeat_reply,
        );
    }

    fn request_vote(
        &self,
        request: pb::RequestVoteRequest,
        responder: Responder<pb::RequestVoteReply>,
    ) {
        self.deliver(
            wire::request_vote_from_wire(request),
            responder,
            wire::request_vote_reply,
        );
    }

    fn install_snapshot(
        &self,
        request: pb::InstallSnapshotRequest,
        responder: Responder<pb::InstallSnapshotReply>,
    ) {
        let message = wire::install_snapshot_from_wire(request);
        let Some(receiver) = &self.snapshots else {
            return self.deliver(message, responder, wire::install_snapshot_reply);
        };
        let Some(responder) = self.admit(&message, responder) else {
            return;
        };
        if message.to != self.id || message.from == self.id || message.from == 0 {
            responder.send_error(
                crate::rpc::RpcCode::BadRequest,
                "a snapshot not for this node",
            );
            return;
        }
        receiver.handle(message, responder);
    }

    /// TimeoutNow needs no answer from the core: the call is acknowledged at
    /// once and the message goes to the event loop like a reply would.
    fn timeout_now(
        &self,
        request: pb::TimeoutNowRequest,
        responder: Responder<pb::TimeoutNowReply>,
    ) {
        let message = wire::timeout_now_from_wire(request);
        let Some(responder) = self.admit(&message, responder) else {
            return;
        };
        responder.send(pb::TimeoutNowReply {
            term: message.term,
            from: self.id,
            ..Default::default()
        });
        if self.events.try_send(Event::Step(message)).is_err() {
            log::debug!("node {}: event queue full, dropping TimeoutNow", self.id);
        }
    }
}
