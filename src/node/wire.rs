//! Conversion between the core's messages and the Raft service's protobuf
//! messages. The core never sees the wire, and the wire never sees the core:
//! this is the one place where they meet. Requests carry `to` so a node can
//! drop traffic meant for another (a stale address after a restart).

use crate::proto::kvstore as pb;
use crate::raft::{Entry, EntryKind, Membership, Message, MessageBody, NodeId, SnapshotMeta};

/// The largest term, log index or snapshot offset a peer may send. Real
/// terms and indexes grow by one per election or entry and never come near
/// it; a larger one is nonsense (or hostile), and refusing it at the wire
/// keeps every `term + 1` and `index + k` in the core far from overflow.
pub const MAX_WIRE_NUMBER: u64 = 1 << 62;

/// Checks what no decoder checks: that every term, index and offset of
/// `message` (a request or a reply from a peer) is at most
/// [`MAX_WIRE_NUMBER`]. The error names the field and its value.
pub fn check_numbers(message: &Message) -> Result<(), String> {
    let mut fields: Vec<(&str, u64)> = vec![("term", message.term)];
    match &message.body {
        MessageBody::AppendEntries {
            prev_log_index,
            prev_log_term,
            entries,
            leader_commit,
        } => {
            fields.extend([
                ("prev_log_index", *prev_log_index),
                ("prev_log_term", *prev_log_term),
                ("leader_commit", *leader_commit),
            ]);
            for entry in entries {
                fields.extend([("entry index", entry.index), ("entry term", entry.term)]);
            }
        }
        MessageBody::AppendEntriesResponse {
            match_index,
            conflict_index,
            conflict_term,
            last_log_index,
            ..
        } => fields.extend([
            ("match_index", *match_index),
            ("conflict_index", *conflict_index),
            ("conflict_term", *conflict_term),
            ("last_log_index", *last_log_index),
        ]),
        MessageBody::Heartbeat { leader_commit, .. } => {
            fields.push(("leader_commit", *leader_commit))
        }
        MessageBody::RequestVote {
            last_log_index,
            last_log_term,
            ..
        } => fields.extend([
            ("last_log_index", *last_log_index),
            ("last_log_term", *last_log_term),
        ]),
        MessageBody::InstallSnapshot {
            meta,
            offset,
            total_bytes,
            ..
        } => fields.extend([
            ("last_included_index", meta.index),
            ("last_included_term", meta.term),
            ("offset", *offset),
            ("total_bytes", *total_bytes),
        ]),
        MessageBody::InstallSnapshotResponse {
            meta, next_offset, ..
        } => fields.extend([
            ("last_included_index", meta.index),
            ("last_included_term", meta.term),
            ("next_offset", *next_offset),
        ]),
        MessageBody::HeartbeatResponse { .. }
        | MessageBody::RequestVoteResponse { .. }
        | MessageBody::TimeoutNow => {}
    }
    match fields.iter().find(|(_, value)| *value > MAX_WIRE_NUMBER) {
        Some((name, value)) => Err(format!(
            "{name} {value} from node {} is above the limit of {MAX_WIRE_NUMBER}",
            message.from
        )),
        None => Ok(()),
    }
}

/// A core request as the RPC to send: which method, and its encoded bytes.
pub enum WireRequest {
    AppendEntries(pb::AppendEntriesRequest),
    Heartbeat(pb::HeartbeatRequest),
    RequestVote(pb::RequestVoteRequest),
    InstallSnapshot(pb::InstallSnapshotRequest),
    TimeoutNow(pb::TimeoutNowRequest),
}

fn entry_to_wire(entry: Entry) -> pb::Entry {
    pb::Entry {
        term: entry.term,
        index: entry.index,
        data: entry.data,
        conf_change: entry.kind == EntryKind::ConfChange,
        ..Default::default()
    }
}

fn entry_from_wire(entry: pb::Entry) -> Entry {
    Entry {
        term: entry.term,
        index: entry.index,
        kind: if entry.conf_change {
            EntryKind::ConfChange
        } else {
            EntryKind::Normal
        },
        data: entry.data,
    }
}

pub fn membership_to_wire(membership: &Membership) -> pb::Membership {
    let members = |group: &std::collections::BTreeMap<NodeId, String>| {
        group
            .iter()
            .map(|(&id, address)| pb::Member {
                id,
                address: address.clone(),
                ..Default::default()
            })
            .collect()
    };
    pb::Membership {
        voters: members(&membership.voters),
        learners: members(&membership.learners),
        ..Default::default()
    }
}

/// The configuration a peer sent. Id 0 is dropped and a node listed as
/// both voter and learner counts as a voter, so the core always gets a
/// well-formed configuration whatever the bytes said.
pub fn membership_from_wire(membership: &pb::Membership) -> Membership {
    let mut out = Membership::default();
    for member in membership.voters.iter().filter(|m| m.id != 0) {
        out.voters.insert(member.id, member.address.clone());
    }
    for member in membership.learners.iter().filter(|m| m.id != 0) {
        if !out.voters.contains_key(&member.id) {
            out.learners.insert(member.id, member.address.clone());
        }
    }
    out
}

/// The RPC request for a core request message; `None` for a response.
pub fn request_to_wire(message: Message) -> Option<WireRequest> {
    let (from, to, term) = (message.from, message.to, message.term);
    Some(match message.body {
        MessageBody::AppendEntries {
            prev_log_index,
            prev_log_term,
            entries,
            leader_commit,
        } => WireRequest::AppendEntries(pb::AppendEntriesRequest {
            term,
            leader_id: from,
            prev_log_index,
            prev_log_term,
            entries: entries.into_iter().map(entry_to_wire).collect(),
            leader_commit,
            to,
            ..Default::default()
        }),
        MessageBody::Heartbeat {
            leader_commit,
            read_context,
        } => WireRequest::Heartbeat(pb::HeartbeatRequest {
            term,
            leader_id: from,
            leader_commit,
            read_context,
            to,
            ..Default::default()
        }),
        MessageBody::RequestVote {
            pre_vote,
            last_log_index,
            last_log_term,
            transfer,
        } => WireRequest::RequestVote(pb::RequestVoteRequest {
            term,
            candidate_id: from,
            last_log_index,
            last_log_term,
            pre_vote,
            transfer,
            to,
            ..Default::default()
        }),
        MessageBody::InstallSnapshot {
            meta,
            membership,
            offset,
            data,
            done,
            total_bytes,
        } => WireRequest::InstallSnapshot(pb::InstallSnapshotRequest {
            term,
            leader_id: from,
            last_included_index: meta.index,
            last_included_term: meta.term,
            offset,
            data,
            done,
            total_bytes,
            to,
            membership: protobuf::MessageField::some(membership_to_wire(&membership)),
            ..Default::default()
        }),
        MessageBody::TimeoutNow => WireRequest::TimeoutNow(pb::TimeoutNowRequest {
            term,
            leader_id: from,
            to,
            ..Default::default()
        }),
        _ => return None,
    })
}

pub fn append_entries_from_wire(request: pb::AppendEntriesRequest) -> Message {
    Message {
        from: request.leader_id,
        to: request.to,
        term: request.term,
        body: MessageBody::AppendEntries {
            prev_log_index: request.prev_log_index,
            prev_log_term: request.prev_log_term,
            entries: request.entries.into_iter().map(entry_from_wire).collect(),
            leader_commit: request.leader_commit,
        },
    }
}

pub fn heartbeat_from_wire(request: pb::HeartbeatRequest) -> Message {
    Message {
        from: request.leader_id,
        to: request.to,
        term: request.term,
        body: MessageBody::Heartbeat {
            leader_commit: request.leader_commit,
            read_context: request.read_context,
        },
    }
}

pub fn request_vote_from_wire(request: pb::RequestVoteRequest) -> Message {
    Message {
        from: request.candidate_id,
        to: request.to,
        term: request.term,
        body: MessageBody::RequestVote {
            pre_vote: request.pre_vote,
            last_log_index: request.last_log_index,
            last_log_term: request.last_log_term,
            transfer: request.transfer,
        },
    }
}

pub fn timeout_now_from_wire(request: pb::TimeoutNowRequest) -> Message {
    Message {
        from: request.leader_id,
        to: request.to,
        term: request.term,
        body: MessageBody::TimeoutNow,
    }
}

pub fn install_snapshot_from_wire(request: pb::InstallSnapshotRequest) -> Message {
    Message {
        from: request.leader_id,
        to: request.to,
        term: request.term,
        body: MessageBody::InstallSnapshot {
            meta: SnapshotMeta {
                index: request.last_included_index,
                term: request.last_included_term,
            },
            membership: request
                .membership
                .as_ref()
                .map(membership_from_wire)
                .unwrap_or_default(),
            offset: request.offset,
            data: request.data,
            done: request.done,
            total_bytes: request.total_bytes,
        },
    }
}

/// The RPC reply for a core response message. Returns `None` when the body
/// is not the response kind `R` expects (a driver bug, logged by the caller).
pub fn append_entries_reply(message: Message) -> Option<pb::AppendEntriesReply> {
    match message.body {
        MessageBody::AppendEntriesResponse {
            success,
            match_index,
            conflict_index,
            conflict_term,
            last_log_index,
        } => Some(pb::AppendEntriesReply {
            term: message.term,
            from: message.from,
            success,
            match_index,
            conflict_index,
            conflict_term,
            last_log_index,
            ..Default::default()
        }),
        _ => None,
    }
}

pub fn heartbeat_reply(message: Message) -> Option<pb::HeartbeatReply> {
    match message.body {
        MessageBody::HeartbeatResponse { read_context } => Some(pb::HeartbeatReply {
            term: message.term,
            from: message.from,
            read_context,
            ..Default::default()
        }),
        _ => None,
    }
}

pub fn request_vote_reply(message: Message) -> Option<pb::RequestVoteReply> {
    match message.body {
        MessageBody::RequestVoteResponse { pre_vote, granted } => Some(pb::RequestVoteReply {
            term: message.term,
            from: message.from,
            vote_granted: granted,
            pre_vote,
            ..Default::default()
        }),
        _ => None,
    }
}

pub fn install_snapshot_reply(message: Message) -> Option<pb::InstallSnapshotReply> {
    match message.body {
        MessageBody::InstallSnapshotResponse {
            meta,
            next_offset,
            success,
        } => Some(pb::InstallSnapshotReply {
            term: message.term,
            from: message.from,
            last_included_index: meta.index,
            last_included_term: meta.term,
            next_offset,
            success,
            ..Default::default()
        }),
        _ => None,
    }
}

/// The core message for a reply from `peer` to our request. The reply's own
/// `from` is not trusted: the connection says who answered.
pub fn reply_from_wire(me: NodeId, peer: NodeId, reply: WireReply) -> Message {
    let (term, body) = match reply {
        WireReply::AppendEntries(r) => (
            r.term,
            MessageBody::AppendEntriesResponse {
                success: r.success,
                match_index: r.match_index,
                conflict_index: r.conflict_index,
                conflict_term: r.conflict_term,
                last_log_index: r.last_log_index,
            },
        ),
        WireReply::Heartbeat(r) => (
            r.term,
            MessageBody::HeartbeatResponse {
                read_context: r.read_context,
            },
        ),
        WireReply::RequestVote(r) => (
            r.term,
            MessageBody::RequestVoteResponse {
                pre_vote: r.pre_vote,
                granted: r.vote_granted,
            },
        ),
        WireReply::InstallSnapshot(r) => (
            r.term,
            MessageBody::InstallSnapshotResponse {
                meta: SnapshotMeta {
                    index: r.last_included_index,
                    term: r.last_included_term,
                },
                next_offset: r.next_offset,
                success: r.success,
            },
        ),
    };
    Message {
        from: peer,
        to: me,
        term,
        body,
    }
}

/// A decoded reply, by method.
pub enum WireReply {
    AppendEntries(pb::AppendEntriesReply),
    Heartbeat(pb::HeartbeatReply),
    RequestVote(pb::RequestVoteReply),
    InstallSnapshot(pb::InstallSnapshotReply),
}
