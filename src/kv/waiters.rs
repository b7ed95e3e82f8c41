//! Requests waiting for the cluster: each holds the typed responder of one
//! client call. The service registers a request before queueing it and the
//! applier completes it, so an answer can never race ahead of its
//! registration. Every waiter has a deadline; none waits forever.

use std::collections::HashMap;
use std::time::Instant;

use parking_lot::Mutex;

use super::state_machine::CommandReply;
use crate::proto::kvstore::{
    AppendReply, CasReply, DeleteReply, ErrorCode, GetReply, PutReply, ReplyHeader,
};
use crate::raft::NodeId;
use crate::rpc::Responder;

/// The responder of one client call, by kind.
pub enum Waiter {
    Get {
        key: Vec<u8>,
        responder: Responder<GetReply>,
    },
    Put(Responder<PutReply>),
    Append(Responder<AppendReply>),
    Delete(Responder<DeleteReply>),
    Cas(Responder<CasReply>),
}

fn header(
    error: ErrorCode,
    leader_hint: NodeId,
    message: &str,
) -> protobuf::MessageField<ReplyHeader> {
    protobuf::MessageField::some(ReplyHeader {
        error: error.into(),
        leader_hint,
        message: message.to_string(),
        ..ReplyHeader::default()
    })
}

impl Waiter {
    /// Answers with an error and no result.
    pub fn fail(self, error: ErrorCode, leader_hint: NodeId, message: &str) {
        let header = header(error, leader_hint, message);
        match self {
            Waiter::Get { responder, .. } => responder.send(GetReply {
                header,
                ..Default::default()
            }),
            Waiter::Put(responder) => responder.send(PutReply {
                header,
                ..Default::default()
            }),
            Waiter::Append(responder) => responder.send(AppendReply {
                header,
                ..Default::default()
            }),
            Waiter::Delete(responder) => responder.send(DeleteReply {
                header,
                ..Default::default()
            }),
            Waiter::Cas(responder) => responder.send(CasReply {
                header,
                ..Default::default()
            }),
        }
    }

    /// Answers a read with the value found (or not) at the read's index.
    pub fn answer_get(self, value: Option<&[u8]>) {
        let Waiter::Get { responder, .. } = self else {
            unreachable!("answer_get on a write waiter");
        };
        responder.send(GetReply {
            header: header(ErrorCode::OK, 0, ""),
            found: value.is_some(),
            value: value.map(<[u8]>::to_vec).unwrap_or_default(),
            ..Default::default()
        });
    }

    /// Answers a write with the state machine's reply. A reply of another
    /// kind than the request means the log holds a different command for
    /// this (client, seq): the client reused a sequence number.
    pub fn answer_write(self, reply: CommandReply) {
        let ok = || header(ErrorCode::OK, 0, "");
        match (self, reply) {
            (Waiter::Put(r), CommandReply::Put) => r.send(PutReply {
                header: ok(),
                ..Default::default()
            }),
            (Waiter::Append(r), CommandReply::Append) => r.send(AppendReply {
                header: ok(),
                ..Default::default()
            }),
            (Waiter::Delete(r), CommandReply::Delete { existed }) => r.send(DeleteReply {
                header: ok(),
                existed,
                ..Default::default()
            }),
            (
                Waiter::Cas(r),
                CommandReply::Cas {
                    swapped,
                    found,
                    current,
                },
            ) => {
                // A replayed reply may have dropped a large `current`: the
                // outcome is exact, the old value is no longer known.
                let message = if current.is_none() {
                    "current value not retained"
                } else {
                    ""
                };
                r.send(CasReply {
                    header: header(ErrorCode::OK, 0, message),
                    swapped,
                    found,
                    current: current.unwrap_or_default(),
                    ..Default::default()
                })
            }
            (waiter, _) => waiter.fail(
                ErrorCode::INVALID_ARGUMENT,
                0,
                "this (client_id, seq) was already used for another command",
            ),
        }
    }
}

struct Pending {
    waiter: Waiter,
    deadline: Instant,
}

/// The waiters by token, shared by the service (which adds) and the applier
/// (which completes). Bounded by the number of connections times their
/// in-flight calls, and by every waiter's deadline.
#[derive(Default)]
pub struct Waiters {
    pending: Mutex<HashMap<u64, Pending>>,
}

impl Waiters {
    pub fn insert(&self, token: u64, waiter: Waiter, deadline: Instant) {
        self.pending
            .lock()
            .insert(token, Pending { waiter, deadline });
    }

    pub fn take(&self, token: u64) -> Option<Waiter> {
        self.pending.lock().remove(&token).map(|p| p.waiter)
    }

    pub fn len(&self) -> usize {
        self.pending.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Removes and returns every waiter whose deadline has passed.
    pub fn take_expired(&self, now: Instant) -> Vec<(u64, Waiter)> {
        let mut pending = self.pending.lock();
        let expired: Vec<u64> = pending
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(&t, _)| t)
            .collect();
        expired
            .into_iter()
            .filter_map(|t| pending.remove(&t).map(|p| (t, p.waiter)))
            .collect()
    }

    /// Removes and returns every waiter.
    pub fn take_all(&self) -> Vec<(u64, Waiter)> {
        self.pending
            .lock()
            .drain()
            .map(|(t, p)| (t, p.waiter))
            .collect()
    }
}
