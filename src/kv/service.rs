//! The KVStore RPC handlers. A write becomes a command in the log and a read
//! becomes a ReadIndex barrier; either takes a slot of the LockQueue (it is
//! registered as a waiter, and holds the slot until it is answered) and is
//! put into the bounded channel to the event loop. When no slot frees up
//! within `queue_wait`, the request is answered BUSY: the clerk backs off and
//! retries, and nothing queues without bound. The handler returns at once;
//! the apply thread answers later through the waiter.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::SendTimeoutError;

use super::backup_source::BackupSource;
use super::redis_ops::{are_point_reads, execute_reads, RedisReply, RedisWrite};
use super::state_machine::{encode_command, make_command, make_session_command, KvOp, NO_CLIENT};
use super::waiters::{Waiter, Waiters, NOT_LEADER_NOTHING_PROPOSED};
use crate::node::{ClientRequest, NodeHandle};
use crate::proto::kvstore::*;
use crate::raft::{Role, Status};
use crate::rpc::handshake::{constant_time_eq, random_u64};
use crate::rpc::services::KvStoreService;
use crate::rpc::Responder;

/// Limits and timeouts of the client path.
#[derive(Clone, Debug)]
pub struct ServiceOptions {
    /// How long a request waits for a slot in the LockQueue before BUSY.
    pub queue_wait: Duration,
    /// How long a request may wait for the cluster before TIMEOUT.
    pub request_timeout: Duration,
    /// When set, every request must carry this token.
    pub client_token: Option<String>,
    pub max_key_bytes: usize,
    /// The most bytes of a value, and of a CAS's expected value.
    pub max_value_bytes: usize,
    /// The most bytes of an encoded command: a log entry must fit in one
    /// AppendEntries frame, or the leader could never replicate it and every
    /// later write would wait behind it (the cluster's `max_append_bytes`).
    pub max_command_bytes: usize,
    /// How many sessions one client connection may open (OpenSession); past it the
    /// connection is answered TOO_MANY_SESSIONS. Bounds how fast one connection can push
    /// other clients' sessions out of the table (`max_sessions`).
    pub max_sessions_per_connection: usize,
    /// The testing hook (`kvserver --fault-file`): `panic rpc` in it makes the next request
    /// panic on its connection thread. `None` in production.
    pub fault_file: Option<crate::storage::FaultFile>,
}

pub struct KvService {
    node: NodeHandle,
    /// Serves `SnapshotChunk` (backups); `None` without an engine (tests).
    backups: Option<BackupSource>,
    waiters: Arc<Waiters>,
    next_token: AtomicU64,
    options: ServiceOptions,
}

type Refusal = (ErrorCode, u64, String);

impl KvService {
    pub fn new(node: NodeHandle, waiters: Arc<Waiters>, options: ServiceOptions) -> KvService {
        KvService {
            node,
            backups: None,
            waiters,
            next_token: AtomicU64::new(1),
            options,
        }
    }

    /// Serves backups (`SnapshotChunk`) from `source`.
    pub fn with_backups(mut self, source: BackupSource) -> KvService {
        self.backups = Some(source);
        self
    }

    /// Checks the client token, when the cluster requires one. The
    /// comparison takes the same time however much of a wrong token is
    /// right, so timing does not help guess it.
    fn authenticate(&self, header: Option<&RequestHeader>) -> Result<(), Refusal> {
        let Some(expected) = &self.options.client_token else {
            return Ok(());
        };
        let presented = header.map_or("", |h| h.token.as_str());
        if constant_time_eq(presented.as_bytes(), expected.as_bytes()) {
            return Ok(());
        }
        let what = if presented.is_empty() {
            "no client token"
        } else {
            "a wrong client token"
        };
        Err((
            ErrorCode::UNAUTHENTICATED,
            0,
            format!("unauthenticated: the request carries {what} (client_token)"),
        ))
    }

    /// Checks what every request must satisfy before it costs the cluster
    /// anything: the token, the sizes, and that this node leads.
    fn admit(
        &self,
        header: Option<&RequestHeader>,
        key: &[u8],
        value: &[u8],
    ) -> Result<(), Refusal> {
        self.authenticate(header)?;
        if key.len() > self.options.max_key_bytes {
            let message = format!(
                "key of {} bytes exceeds {}",
                key.len(),
                self.options.max_key_bytes
            );
            return Err((ErrorCode::INVALID_ARGUMENT, 0, message));
        }
        if value.len() > self.options.max_value_bytes {
            let message = format!(
                "value of {} bytes exceeds {}",
                value.len(),
                self.options.max_value_bytes
            );
            return Err((ErrorCode::INVALID_ARGUMENT, 0, message));
        }
        if self.node.is_stopping() {
            return Err((
                ErrorCode::SHUTTING_DOWN,
                0,
                "the node is shutting down".into(),
            ));
        }
        let status = self.node.status();
        if status.role != Role::Leader {
            return Err((
                ErrorCode::NOT_LEADER,
                status.leader,
                NOT_LEADER_NOTHING_PROPOSED.into(),
            ));
        }
        Ok(())
    }

    /// Takes a LockQueue slot for `waiter` (waiting up to `queue_wait` for
    /// one) and queues the request `make(token)` for it; answers BUSY when no
    /// slot frees up in time.
    fn submit(&self, waiter: Waiter, make: impl FnOnce(u64) -> ClientRequest) {
        const BUSY: &str = "the node holds as many requests as its LockQueue has slots \
                            (proposal_queue_capacity); back off and retry";
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        let deadline = Instant::now() + self.options.request_timeout;
        let wait = self.options.queue_wait;
        if let Err(waiter) = self.waiters.insert(token, waiter, deadline, wait) {
            return waiter.fail(ErrorCode::BUSY, 0, BUSY);
        }
        // The channel has as many places as there are slots, so this wait is
        // short: only while the event loop is between two drains.
        let refusal = match self.node.requests().send_timeout(make(token), wait) {
            Ok(()) => return,
            Err(SendTimeoutError::Timeout(_)) => (ErrorCode::BUSY, BUSY),
            Err(SendTimeoutError::Disconnected(_)) => {
                (ErrorCode::SHUTTING_DOWN, "the node is shutting down")
            }
        };
        // The applier may have expired it meanwhile; then it has answered.
        if let Some(waiter) = self.waiters.take(token) {
            self.waiters.notify_room();
            waiter.fail(refusal.0, 0, refusal.1);
        }
    }

    fn write(&self, header: Option<&RequestHeader>, op: KvOp, waiter: Waiter) {
        crate::metrics::PROPOSALS_RECEIVED.inc();
        let (key, value): (&[u8], &[u8]) = match &op {
            KvOp::Put { key, value } | KvOp::Append { key, value } => (key, value),
            KvOp::Cas { key, value, .. } => (key, value),
            KvOp::Delete { key } => (key, &[]),
            KvOp::Redis(ops) => (
                longest(ops.iter().flat_map(RedisWrite::keys)),
                longest(ops.iter().flat_map(RedisWrite::values)),
            ),
            KvOp::Noop | KvOp::OpenSession { .. } => {
                unreachable!("writes are puts, appends, deletes, cas and Redis batches")
            }
        };
        if let Err((error, hint, message)) = self.admit(header, key, value) {
            return waiter.fail(error, hint, &message);
        }
        if let KvOp::Cas { expected, .. } = &op {
            if expected.len() > self.options.max_value_bytes {
                let message = format!(
                    "expected value of {} bytes exceeds {}",
                    expected.len(),
                    self.options.max_value_bytes
                );
                return waiter.fail(ErrorCode::INVALID_ARGUMENT, 0, &message);
            }
        }
        let Some(header) = header.filter(|h| h.client_id != NO_CLIENT && h.seq != 0) else {
            return waiter.fail(
                ErrorCode::INVALID_ARGUMENT,
                0,
                "a write needs a session (client_id from OpenSession) and a seq from 1",
            );
        };
        let command = make_session_command(
            header.client_id,
            header.session_secret,
            header.seq,
            now_ms(),
            op,
        );
        let data = encode_command(&command);
        if data.len() > self.options.max_command_bytes {
            let message = format!(
                "the request makes a log entry of {} bytes, over the limit of {} \
                 (max_append_bytes), so it could not be replicated",
                data.len(),
                self.options.max_command_bytes
            );
            return waiter.fail(ErrorCode::INVALID_ARGUMENT, 0, &message);
        }
        self.submit(waiter, |token| ClientRequest::Propose { token, data });
    }
}

impl KvService {
    /// A batch of Redis reads. Point reads of a bounded number of keys are answered by the
    /// apply thread once their linearizable read point is applied (as a native Get is);
    /// any other batch waits (on this thread, at most the request timeout) for its read
    /// point, then reads a consistent view of the engine here, so that a SCAN or KEYS never
    /// runs on the apply thread.
    fn exec_reads(&self, request: ExecRequest, responder: Responder<ExecReply>) {
        let fail = |responder: Responder<ExecReply>, (error, hint, message): Refusal| {
            crate::metrics::request_failed(false, error);
            responder.send(ExecReply {
                header: protobuf::MessageField::some(ReplyHeader {
                    error: error.into(),
                    leader_hint: hint,
                    message,
                    ..Default::default()
                }),
                ..Default::default()
            })
        };
        let longest_key = request
            .reads
            .iter()
            .flat_map(|op| op.keys.iter())
            .max_by_key(|key| key.len())
            .map_or(&[][..], Vec::as_slice);
        if let Err(refusal) = self.admit(request.header.as_ref(), longest_key, &[]) {
            return fail(responder, refusal);
        }
        if are_point_reads(&request.reads) {
            // Answered by the apply thread at the read index, overlay included: no engine
            // commit per read batch, and no hop back to this thread.
            let waiter = Waiter::RedisReads {
                ops: request.reads,
                responder,
            };
            return self.submit(waiter, |token| ClientRequest::Read { token });
        }
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.submit(Waiter::Barrier(tx), |token| ClientRequest::Read { token });
        // The applier answers by the request's deadline (it sweeps expired
        // waiters); the margin covers the sweep's period.
        let patience =
            self.options.request_timeout + self.options.queue_wait + Duration::from_secs(1);
        let view = match rx.recv_timeout(patience) {
            Ok(Ok(view)) => view,
            Ok(Err(refusal)) => return fail(responder, refusal),
            Err(_) => {
                let why = "the read barrier was not answered in time".to_string();
                return fail(responder, (ErrorCode::TIMEOUT, 0, why));
            }
        };
        match execute_reads(&view, &request.reads) {
            Ok(replies) => responder.send(ExecReply {
                replies: replies.iter().map(RedisReply::to_proto).collect(),
                ..Default::default()
            }),
            Err(why) => {
                log::error!("a Redis read failed in the storage engine: {why}");
                let message = format!("the storage engine failed: {why}");
                fail(responder, (ErrorCode::SHUTTING_DOWN, 0, message))
            }
        }
    }
}

/// The longest of `all` (empty when there is none).
fn longest<'a>(all: impl Iterator<Item = &'a [u8]>) -> &'a [u8] {
    all.max_by_key(|b| b.len()).unwrap_or(&[])
}

/// The leader's wall clock, stamped into commands so that every replica
/// expires idle sessions at the same log index.
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl KvStoreService for KvService {
    fn get(&self, request: GetRequest, responder: Responder<GetReply>) {
        if let Some(fault_file) = &self.options.fault_file {
            fault_file.panic_if_requested("rpc");
        }
        let waiter = Waiter::Get {
            key: request.key,
            responder,
        };
        let Waiter::Get { key, .. } = &waiter else {
            unreachable!()
        };
        if let Err((error, hint, message)) = self.admit(request.header.as_ref(), key, &[]) {
            return waiter.fail(error, hint, &message);
        }
        self.submit(waiter, |token| ClientRequest::Read { token });
    }

    fn put(&self, request: PutRequest, responder: Responder<PutReply>) {
        let op = KvOp::Put {
            key: request.key,
            value: request.value,
        };
        self.write(request.header.as_ref(), op, Waiter::Put(responder));
    }

    fn append(&self, request: AppendRequest, responder: Responder<AppendReply>) {
        let op = KvOp::Append {
            key: request.key,
            value: request.value,
        };
        self.write(request.header.as_ref(), op, Waiter::Append(responder));
    }

    fn delete(&self, request: DeleteRequest, responder: Responder<DeleteReply>) {
        let op = KvOp::Delete { key: request.key };
        self.write(request.header.as_ref(), op, Waiter::Delete(responder));
    }

    fn cas(&self, request: CasRequest, responder: Responder<CasReply>) {
        let op = KvOp::Cas {
            key: request.key,
            expected: request.expected,
            value: request.value,
        };
        self.write(request.header.as_ref(), op, Waiter::Cas(responder));
    }

    fn exec(&self, request: ExecRequest, responder: Responder<ExecReply>) {
        if request.writes.is_empty() {
            return self.exec_reads(request, responder);
        }
        let ops: Result<Vec<RedisWrite>, String> = if request.reads.is_empty() {
            request.writes.iter().map(RedisWrite::from_proto).collect()
        } else {
            Err("an Exec request holds writes or reads, not both".into())
        };
        match ops {
            Ok(ops) => self.write(
                request.header.as_ref(),
                KvOp::Redis(ops),
                Waiter::Exec(responder),
            ),
            Err(why) => Waiter::Exec(responder).fail(ErrorCode::INVALID_ARGUMENT, 0, &why),
        }
    }

    /// Proposes an `OPEN_SESSION` command with a fresh random secret; the reply (when the
    /// entry applies) carries the session's id, the entry's index. At most
    /// `max_sessions_per_connection` per connection.
    fn open_session(&self, request: OpenSessionRequest, responder: Responder<OpenSessionReply>) {
        let waiter = Waiter::OpenSession(responder);
        if let Err((error, hint, message)) = self.admit(request.header.as_ref(), &[], &[]) {
            return waiter.fail(error, hint, &message);
        }
        let limit = self.options.max_sessions_per_connection;
        let Waiter::OpenSession(responder) = &waiter else {
            unreachable!()
        };
        if !responder.take_connection_budget(limit) {
            let message = format!(
                "this connection already opened {limit} sessions \
                 (max_sessions_per_connection); reuse a session or reconnect"
            );
            return waiter.fail(ErrorCode::TOO_MANY_SESSIONS, 0, &message);
        }
        let secret = match random_u64() {
            Ok(secret) => secret,
            Err(e) => {
                log::error!("cannot draw a session secret: {e}");
                let message = "the node cannot draw a random session secret";
                return waiter.fail(ErrorCode::SHUTTING_DOWN, 0, message);
            }
        };
        let command = make_command(NO_CLIENT, 0, now_ms(), KvOp::OpenSession { secret });
        let data = encode_command(&command);
        self.submit(waiter, |token| ClientRequest::Propose { token, data });
    }

    /// One chunk of a backup; needs the token, not leadership (a named node may be backed up).
    fn snapshot_chunk(
        &self,
        request: SnapshotChunkRequest,
        responder: Responder<SnapshotChunkReply>,
    ) {
        let refused = |code: ErrorCode, message: String| SnapshotChunkReply {
            header: protobuf::MessageField::some(ReplyHeader {
                error: code.into(),
                message,
                ..Default::default()
            }),
            ..Default::default()
        };
        if let Err((error, _, message)) = self.authenticate(request.header.as_ref()) {
            return responder.send(refused(error, message));
        }
        let Some(backups) = &self.backups else {
            let message = "this node has no storage engine to back up".to_string();
            return responder.send(refused(ErrorCode::INVALID_ARGUMENT, message));
        };
        match backups.chunk(&request) {
            Ok(reply) => responder.send(reply),
            Err((code, message)) => responder.send(refused(code, message)),
        }
    }

    fn status(&self, request: StatusRequest, responder: Responder<StatusReply>) {
        let mut reply = StatusReply::default();
        // Status needs the token too: it tells who leads and how far the log
        // is, which is for the cluster's users only.
        if let Err((error, _, message)) = self.authenticate(request.header.as_ref()) {
            reply.header = protobuf::MessageField::some(ReplyHeader {
                error: error.into(),
                message,
                ..Default::default()
            });
            return responder.send(reply);
        }
        responder.send(status_reply(&self.node.status()));
    }

    fn members(&self, request: MembersRequest, responder: Responder<MembersReply>) {
        if let Err((error, _, message)) = self.authenticate(request.header.as_ref()) {
            return responder.send(MembersReply {
                header: refused(error, message),
                ..Default::default()
            });
        }
        responder.send(super::membership::members(
            &self.node,
            self.options.request_timeout,
        ));
    }

    fn change_member(&self, request: MemberChangeRequest, responder: Responder<MemberChangeReply>) {
        if let Err((error, _, message)) = self.authenticate(request.header.as_ref()) {
            return responder.send(MemberChangeReply {
                header: refused(error, message),
                ..Default::default()
            });
        }
        let timeout = self.options.request_timeout;
        responder.send(super::membership::change(&self.node, &request, timeout));
    }

    fn transfer_leader(
        &self,
        request: TransferLeaderRequest,
        responder: Responder<TransferLeaderReply>,
    ) {
        if let Err((error, _, message)) = self.authenticate(request.header.as_ref()) {
            return responder.send(TransferLeaderReply {
                header: refused(error, message),
                ..Default::default()
            });
        }
        let timeout = self.options.request_timeout;
        responder.send(super::membership::transfer(&self.node, &request, timeout));
    }
}

fn refused(error: ErrorCode, message: String) -> protobuf::MessageField<ReplyHeader> {
    protobuf::MessageField::some(ReplyHeader {
        error: error.into(),
        message,
        ..Default::default()
    })
}

/// The answer to a status request: what `clerk status` shows, and what the
/// node's HTTP `/status` serves.
pub fn status_reply(status: &Status) -> StatusReply {
    StatusReply {
        id: status.id,
        role: status.role.as_str().to_string(),
        term: status.term,
        leader: status.leader,
        commit: status.commit,
        applied: status.applied,
        last_index: status.last_index,
        snapshot_index: status.snapshot_index,
        log_bytes: status.log_bytes,
        ..Default::default()
    }
}
