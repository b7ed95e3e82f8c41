//! The operator's membership requests (`clerk member ...`,
//! `clerk transfer-leader`): each goes to the event loop as an
//! [`AdminRequest`]. A change is answered once its entry is committed, a
//! transfer once the target leads; both wait at most the request timeout,
//! after which the answer is TIMEOUT (the outcome is then unknown: `clerk
//! member list` tells). These calls are rare and operator-driven, so the
//! handler thread waits for them, polling the node's status every
//! `POLL_MS`.

use std::time::{Duration, Instant};

use crate::node::{AdminReply, AdminRequest, MembersView, NodeHandle};
use crate::proto::kvstore::*;
use crate::raft::{ConfChange, ConfChangeError, Role};

const POLL_MS: u64 = 10;

fn header(
    error: ErrorCode,
    leader_hint: u64,
    message: String,
) -> protobuf::MessageField<ReplyHeader> {
    protobuf::MessageField::some(ReplyHeader {
        error: error.into(),
        leader_hint,
        message,
        ..Default::default()
    })
}

fn no_answer() -> protobuf::MessageField<ReplyHeader> {
    header(
        ErrorCode::TIMEOUT,
        0,
        "the node did not answer in time".into(),
    )
}

/// The refusal of a change as a reply header: not the leader (with a hint),
/// "not yet" as BUSY (the clerk retries), anything else one clear line.
fn refusal(error: &ConfChangeError) -> protobuf::MessageField<ReplyHeader> {
    match error {
        ConfChangeError::NotLeader { hint } => {
            header(ErrorCode::NOT_LEADER, *hint, error.to_string())
        }
        ConfChangeError::LeaderNotReady
        | ConfChangeError::TransferInProgress { .. }
        | ConfChangeError::LearnerBehind { .. } => header(ErrorCode::BUSY, 0, error.to_string()),
        _ => header(ErrorCode::INVALID_ARGUMENT, 0, error.to_string()),
    }
}

pub fn members(node: &NodeHandle, timeout: Duration) -> MembersReply {
    let mut reply = MembersReply::default();
    let Some(AdminReply::Members(view)) = node.admin(AdminRequest::Members, timeout) else {
        reply.header = no_answer();
        return reply;
    };
    let MembersView {
        status,
        membership,
        committed,
        followers,
    } = view;
    reply.id = status.id;
    reply.leader = status.leader;
    reply.term = status.term;
    reply.commit = status.commit;
    reply.last_index = status.last_index;
    reply.conf_index = status.conf_index;
    reply.conf_committed = committed == membership;
    for (voter, group) in [(true, &membership.voters), (false, &membership.learners)] {
        for (&id, address) in group {
            let match_index = if id == status.id && status.role == Role::Leader {
                status.last_index
            } else {
                followers
                    .iter()
                    .find(|f| f.id == id)
                    .map_or(0, |f| f.match_index)
            };
            reply.members.push(MemberInfo {
                id,
                address: address.clone(),
                voter,
                match_index,
                ..Default::default()
            });
        }
    }
    reply
}

pub fn change(
    node: &NodeHandle,
    request: &MemberChangeRequest,
    timeout: Duration,
) -> MemberChangeReply {
    let mut reply = MemberChangeReply::default();
    let change = match request.op.as_str() {
        "add-learner" => ConfChange::AddLearner {
            id: request.id,
            address: request.address.clone(),
        },
        "promote" => ConfChange::Promote { id: request.id },
        "remove" => ConfChange::Remove { id: request.id },
        other => {
            reply.header = header(
                ErrorCode::INVALID_ARGUMENT,
                0,
                format!("unknown membership change {other:?} (add-learner, promote, remove)"),
            );
            return reply;
        }
    };
    if let ConfChange::AddLearner { address, .. } = &change {
        if address.parse::<std::net::SocketAddr>().is_err() {
            reply.header = header(
                ErrorCode::INVALID_ARGUMENT,
                0,
                format!("{address:?} is not an IP:PORT address"),
            );
            return reply;
        }
    }
    let deadline = Instant::now() + timeout;
    let (index, term) = match node.admin(AdminRequest::Change(change), timeout) {
        Some(AdminReply::Changed(Ok(at))) => at,
        Some(AdminReply::Changed(Err(error))) => {
            reply.header = refusal(&error);
            return reply;
        }
        _ => {
            reply.header = no_answer();
            return reply;
        }
    };
    reply.index = index;
    reply.term = term;
    // Commit past the entry in the same term: this node was that term's only
    // leader, so the entry there is ours and the change is committed (a
    // leader that removed itself has stepped down by then, in that term).
    while Instant::now() < deadline {
        let status = node.status();
        if status.term == term && status.commit >= index {
            return reply;
        }
        if status.term != term || status.role != Role::Leader {
            break;
        }
        std::thread::sleep(Duration::from_millis(POLL_MS));
    }
    reply.header = header(
        ErrorCode::TIMEOUT,
        node.status().leader,
        format!("the change (log index {index}) was not seen committed in time; see `member list`"),
    );
    reply
}

pub fn transfer(
    node: &NodeHandle,
    request: &TransferLeaderRequest,
    timeout: Duration,
) -> TransferLeaderReply {
    let mut reply = TransferLeaderReply::default();
    let deadline = Instant::now() + timeout;
    match node.admin(AdminRequest::TransferLeader(request.id), timeout) {
        Some(AdminReply::TransferStarted(Ok(()))) => {}
        Some(AdminReply::TransferStarted(Err(error))) => {
            reply.header = refusal(&error);
            return reply;
        }
        _ => {
            reply.header = no_answer();
            return reply;
        }
    }
    while Instant::now() < deadline {
        let status = node.status();
        if status.leader == request.id {
            return reply;
        }
        if status.role == Role::Leader && status.lead_transferee == 0 && status.id != request.id {
            reply.header = header(
                ErrorCode::TIMEOUT,
                status.id,
                format!(
                    "node {} did not take over in time; the transfer was abandoned",
                    request.id
                ),
            );
            return reply;
        }
        std::thread::sleep(Duration::from_millis(POLL_MS));
    }
    reply.header = no_answer();
    reply
}
