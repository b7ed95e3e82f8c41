//! Requests waiting for the cluster: each holds the typed responder of one
//! client call. The service registers a request before queueing it and the
//! applier completes it, so an answer can never race ahead of its
//! registration. Every waiter has a deadline; none waits forever.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::backup_source::LeasedView;
use super::redis_ops::RedisReply;
use super::state_machine::CommandReply;
use crate::proto::kvstore::{
    AppendReply, CasReply, DeleteReply, ErrorCode, ExecReply, GetReply, OpenSessionReply, PutReply,
    ReadOp, ReplyHeader,
};
use crate::raft::NodeId;
use crate::rpc::Responder;

/// The message of a NOT_LEADER answer given before the request was
/// proposed: nothing of it can be applied. (Other NOT_LEADER answers come
/// after a leader change, when the request may still commit.)
pub const NOT_LEADER_NOTHING_PROPOSED: &str = "not the leader";

/// Why a Cas answer carries no old value.
pub const CURRENT_NOT_RETAINED: &str = "the value before the operation is not known: this is \
    the saved answer of an earlier attempt of the same request, and the server keeps an old \
    value in it only up to max_saved_current_bytes";

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
    /// A batch of Redis writes (one log entry).
    Exec(Responder<ExecReply>),
    /// A read barrier of a batch of Redis reads: once the read index is
    /// applied, the waiting thread gets a consistent view of the engine and
    /// reads it itself, so no read of any size runs on the apply thread. The view comes with
    /// a lease on the engine, so the engine is not swapped under the reader.
    Barrier(crossbeam_channel::Sender<Result<LeasedView, BarrierError>>),
    /// A batch of Redis point reads (GET, MGET, EXISTS, STRLEN, TYPE; at most
    /// `redis_ops::MAX_POINT_READ_KEYS` keys): answered by the apply thread from the applied
    /// state, its uncommitted overlay included, like a native Get, so that a read forces no
    /// engine commit.
    RedisReads {
        ops: Vec<ReadOp>,
        responder: Responder<ExecReply>,
    },
    OpenSession(Responder<OpenSessionReply>),
}

/// Why a read barrier failed: the code, leader hint and message of the answer.
pub type BarrierError = (ErrorCode, NodeId, String);

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
        crate::metrics::request_failed(!self.is_read(), error);
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
            Waiter::Exec(responder) | Waiter::RedisReads { responder, .. } => {
                responder.send(ExecReply {
                    header,
                    ..Default::default()
                })
            }
            Waiter::Barrier(tx) => {
                // A dropped receiver: the reader gave up waiting.
                let _ = tx.send(Err((error, leader_hint, message.to_string())));
            }
            Waiter::OpenSession(responder) => responder.send(OpenSessionReply {
                header,
                ..Default::default()
            }),
        }
    }

    /// A read (answered at a read index), not a write (answered when applied).
    pub fn is_read(&self) -> bool {
        matches!(
            self,
            Waiter::Get { .. } | Waiter::Barrier(_) | Waiter::RedisReads { .. }
        )
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

    /// Answers a batch of Redis point reads with their replies, in order.
    pub fn answer_reads(self, replies: &[RedisReply]) {
        let Waiter::RedisReads { responder, .. } = self else {
            unreachable!("answer_reads on another waiter");
        };
        responder.send(ExecReply {
            header: header(ErrorCode::OK, 0, ""),
            replies: replies.iter().map(RedisReply::to_proto).collect(),
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
                let not_retained = current.is_none();
                let message = if not_retained {
                    CURRENT_NOT_RETAINED
                } else {
                    ""
                };
                r.send(CasReply {
                    header: header(ErrorCode::OK, 0, message),
                    swapped,
                    found,
                    current: current.unwrap_or_default(),
                    current_not_retained: not_retained,
                    ..Default::default()
                })
            }
            (Waiter::Exec(r), CommandReply::Redis(replies)) => r.send(ExecReply {
                header: ok(),
                replies: replies.iter().map(RedisReply::to_proto).collect(),
                ..Default::default()
            }),
            (Waiter::OpenSession(r), CommandReply::SessionOpened { client_id, secret }) => {
                r.send(OpenSessionReply {
                    header: ok(),
                    client_id,
                    session_secret: secret,
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
/// (which completes): the LockQueue's slots. A request holds its slot from
/// the moment the service admits it until it is answered, so at most
/// `capacity` client requests are inside the node at once, whatever the
/// number of connections; a request that finds no free slot within the
/// service's wait is answered BUSY. Every waiter also has a deadline; none
/// waits forever.
pub struct Waiters {
    pending: Mutex<HashMap<u64, Pending>>,
    /// Signalled when slots free up.
    room: Condvar,
    capacity: usize,
}

impl Waiters {
    pub fn new(capacity: usize) -> Waiters {
        assert!(capacity > 0, "a LockQueue needs at least one slot");
        Waiters {
            pending: Mutex::new(HashMap::new()),
            room: Condvar::new(),
            capacity,
        }
    }

    /// Registers `waiter` once a slot is free, waiting up to `wait` for one.
    /// Gives the waiter back when every slot stayed taken.
    pub fn insert(
        &self,
        token: u64,
        waiter: Waiter,
        deadline: Instant,
        wait: Duration,
    ) -> Result<(), Waiter> {
        let give_up = Instant::now() + wait;
        let mut pending = self.pending.lock();
        while pending.len() >= self.capacity {
            if self.room.wait_until(&mut pending, give_up).timed_out()
                && pending.len() >= self.capacity
            {
                return Err(waiter);
            }
        }
        pending.insert(token, Pending { waiter, deadline });
        Ok(())
    }

    /// Removes the waiter of `token`. Its slot is free at once, but a
    /// request waiting for a slot hears of it only at the next
    /// [`Waiters::notify_room`]: the apply thread frees slots by the hundred
    /// per batch, and one wake-up per batch costs far less than one per slot.
    pub fn take(&self, token: u64) -> Option<Waiter> {
        self.pending.lock().remove(&token).map(|p| p.waiter)
    }

    /// Wakes every request waiting for a slot, to look again.
    pub fn notify_room(&self) {
        self.room.notify_all();
    }

    pub fn len(&self) -> usize {
        self.pending.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Removes and returns every waiter whose deadline has passed.
    pub fn take_expired(&self, now: Instant) -> Vec<(u64, Waiter)> {
        self.take_where(|p| p.deadline <= now)
    }

    /// Removes and returns every read (Get) waiter.
    pub fn take_reads(&self) -> Vec<(u64, Waiter)> {
        self.take_where(|p| p.waiter.is_read())
    }

    /// Removes and returns the waiters `which` picks, and announces the
    /// freed slots.
    fn take_where(&self, which: impl Fn(&Pending) -> bool) -> Vec<(u64, Waiter)> {
        let mut pending = self.pending.lock();
        let picked: Vec<u64> = pending
            .iter()
            .filter(|(_, p)| which(p))
            .map(|(&t, _)| t)
            .collect();
        let taken: Vec<(u64, Waiter)> = picked
            .into_iter()
            .filter_map(|t| pending.remove(&t).map(|p| (t, p.waiter)))
            .collect();
        if !taken.is_empty() {
            self.room.notify_all();
        }
        taken
    }

    /// Removes and returns every waiter.
    pub fn take_all(&self) -> Vec<(u64, Waiter)> {
        let taken = self
            .pending
            .lock()
            .drain()
            .map(|(t, p)| (t, p.waiter))
            .collect();
        self.room.notify_all();
        taken
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn put_waiter() -> Waiter {
        Waiter::Put(Responder::local().0)
    }

    /// A full LockQueue refuses after the wait, and a freed slot is taken by
    /// the next request; a request blocked on a full queue gets in once a
    /// slot is freed and announced.
    #[test]
    fn slots_bound_the_requests_in_the_node() {
        let waiters = Arc::new(Waiters::new(2));
        let deadline = Instant::now() + Duration::from_secs(60);
        let no_wait = Duration::ZERO;
        assert!(waiters.insert(1, put_waiter(), deadline, no_wait).is_ok());
        assert!(waiters.insert(2, put_waiter(), deadline, no_wait).is_ok());
        let short = Duration::from_millis(20);
        assert!(waiters.insert(3, put_waiter(), deadline, short).is_err());
        assert_eq!(waiters.len(), 2);
        let blocked = {
            let waiters = Arc::clone(&waiters);
            std::thread::spawn(move || {
                let long = Duration::from_secs(30);
                waiters.insert(4, put_waiter(), deadline, long).is_ok()
            })
        };
        assert!(waiters.take(1).is_some());
        waiters.notify_room();
        assert!(
            blocked.join().unwrap(),
            "the blocked request never got the freed slot"
        );
        assert_eq!(waiters.len(), 2);
        assert!(waiters.take(4).is_some());
        assert_eq!(waiters.take_all().len(), 1);
    }
}
