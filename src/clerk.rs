//! The client library: a [`Clerk`] sends each operation to the node it
//! believes leads, follows `NOT_LEADER` hints, rotates through the nodes when
//! one fails, backs off when the leader answers `BUSY`, and retries until a
//! whole-operation deadline. Before its first write a clerk opens a session
//! (`OpenSession`, one log round): the cluster assigns its `client_id` (the
//! index of the entry that opened it) and a secret. Every write carries them
//! and a fresh `seq`, and every retry of that write reuses the same triple, so
//! the servers' client sessions apply it at most once however often it is
//! sent. When the cluster answers SESSION_EXPIRED (the session expired or was
//! evicted), the clerk opens a new session and sends the write again under it
//! only if no earlier attempt of it can have been applied; otherwise the
//! write's outcome is reported unknown ([`ClerkError::Unknown`]).
//!
//! A clerk runs one operation at a time (`&mut self`); a program that wants
//! concurrency runs one clerk per thread. Each node's connection is opened on
//! first use and kept for the clerk's lifetime. The retry rules themselves
//! ([`Route`], [`Attempts`]) do no I/O, so the load generator's multiplexed
//! clients follow exactly the same ones without a thread each.

pub mod cli;
pub mod member;
mod status;

pub use self::status::json_object;

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use protobuf::MessageField;

use crate::config::ClusterConfig;
use crate::kv::backup::{BackupHeader, BackupInfo, BackupWriter};
use crate::kv::waiters::NOT_LEADER_NOTHING_PROPOSED;
use crate::proto::kvstore::{
    AppendReply, AppendRequest, CasReply, CasRequest, DeleteReply, DeleteRequest, ErrorCode,
    ExecReply, ExecRequest, GetReply, GetRequest, MemberChangeReply, MembersReply, OpReply,
    OpenSessionReply, OpenSessionRequest, PutReply, PutRequest, ReadOp, ReplyHeader, RequestHeader,
    SnapshotChunkReply, SnapshotChunkRequest, StatusReply, StatusRequest, TransferLeaderReply,
    WriteOp,
};
use crate::raft::SplitMix64;
use crate::rpc::services::KvStoreStub;
use crate::rpc::{ClientConfig, Credentials, RpcChannel, RpcClient, RpcError};

/// The transport to one node, as [`Clerk::with_channels`] takes it.
pub type NodeChannel = Box<dyn RpcChannel + Send + Sync>;

/// The first back-off after `BUSY`, or after a round in which no node could
/// serve the request.
const BACKOFF_MIN_MS: u64 = 1;
/// Back-off never waits longer than this between two attempts.
const BACKOFF_MAX_MS: u64 = 100;

/// How a [`Clerk`] behaves.
#[derive(Clone, Debug)]
pub struct ClerkOptions {
    /// Deadline for a whole operation, retries included. Default 10 s.
    pub timeout: Duration,
    /// Limit on one RPC (connect, and send to reply) to one node. Default
    /// 1000. An operation can overrun `timeout` by at most this much, since a
    /// call in flight is not interrupted.
    pub attempt_timeout_ms: u64,
    /// Presented to the nodes when the cluster requires a client token.
    /// When `None`, [`Clerk::new`] takes the cluster file's `client_token`.
    pub client_token: Option<String>,
}

impl Default for ClerkOptions {
    fn default() -> Self {
        ClerkOptions {
            timeout: Duration::from_secs(10),
            attempt_timeout_ms: 1_000,
            client_token: None,
        }
    }
}

/// How much longer than the servers' `request_timeout_ms` a clerk waits
/// for an answer, so that the server's own TIMEOUT (or the answer) reaches it.
const ATTEMPT_MARGIN_MS: u64 = 250;

/// How long one attempt against `config`'s nodes waits for its answer: at
/// least `wanted_ms`, and longer than the servers wait for the cluster. A
/// clerk that gave up first would retry while its first attempt still holds
/// a LockQueue slot and a place in the log: under overload, every retry
/// would add load, and the server's TIMEOUT would never be heard.
pub fn attempt_timeout_ms(config: &ClusterConfig, wanted_ms: u64) -> u64 {
    wanted_ms.max(config.request_timeout_ms.saturating_add(ATTEMPT_MARGIN_MS))
}

/// Why an operation failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClerkError {
    /// No node answered the operation before the deadline. A write may or
    /// may not have been applied; `last_error` is the last failure seen.
    Timeout { last_error: String },
    /// A node refused the request for good (`INVALID_ARGUMENT`,
    /// `UNAUTHENTICATED`): retrying it cannot help. Nothing was applied.
    Rejected(String),
    /// A write was refused for good, but an earlier attempt of it may have
    /// been applied (its answer was lost, or it timed out): the outcome is
    /// unknown, as after a `Timeout`.
    Unknown { reason: String },
}

impl fmt::Display for ClerkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClerkError::Timeout { last_error } => write!(
                f,
                "no answer from the cluster before the deadline, so the outcome is unknown \
                 (last error: {last_error})"
            ),
            ClerkError::Rejected(message) => write!(f, "request rejected: {message}"),
            ClerkError::Unknown { reason } => write!(f, "the outcome is unknown: {reason}"),
        }
    }
}

impl std::error::Error for ClerkError {}

/// The answer to a compare-and-swap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CasResult {
    /// Whether the value was replaced.
    pub swapped: bool,
    /// Whether the key existed before the operation.
    pub found: bool,
    /// The value before the operation: `None` when the key was missing, or
    /// when the value is not known (then `current_unknown` says why).
    pub current: Option<Vec<u8>>,
    /// Set when the server could not say what the value was: the answer is
    /// the saved reply of an earlier attempt of this Cas, which keeps the
    /// old value only when it is small. `swapped` and `found` are exact.
    pub current_unknown: Option<String>,
}

/// One node's answer to a status request, for `clerk status`.
#[derive(Clone, Debug)]
pub struct NodeStatusView {
    pub id: u64,
    /// The node's address, when the clerk was built from a cluster file.
    pub addr: Option<SocketAddr>,
    /// The node's status, or why it could not be had.
    pub status: Result<StatusReply, String>,
    /// The node refused this clerk (no or a wrong client token, another
    /// cluster's id): asking again cannot help.
    pub rejected: bool,
}

struct Node {
    id: u64,
    addr: Option<SocketAddr>,
    stub: KvStoreStub<NodeChannel>,
}

/// A client of the cluster. See the module documentation.
pub struct Clerk {
    /// Never empty.
    nodes: Vec<Node>,
    options: ClerkOptions,
    /// The session's id and secret, once opened (on the first write).
    session: Option<Session>,
    /// The ids of `nodes`, in the same order, for [`Route`].
    node_ids: Vec<u64>,
    /// The seq of the last write started in `session`; the next write takes `last_seq + 1`.
    last_seq: u64,
    /// Sessions this clerk opened (a second one after its first expired, ...).
    sessions_opened: u64,
    route: Route,
    busy_retries: u64,
    /// Jitter for the back-off.
    rng: SplitMix64,
    /// How to reach a member the cluster file does not list, learned from
    /// the membership (see `learn_members`); `None` for a clerk over given
    /// channels.
    connector: Option<(ClientConfig, Credentials)>,
}

/// The most nodes a clerk knows of, those of its file and those it learned.
const MAX_KNOWN_NODES: usize = 64;

impl Clerk {
    /// A clerk for every node of `config`, presenting its cluster id and
    /// (unless `options` names another) its client token. Connections open
    /// on first use.
    /// The attempt limit is raised, when needed, past the cluster's
    /// `request_timeout_ms` (see [`attempt_timeout_ms`]).
    pub fn new(config: &ClusterConfig, mut options: ClerkOptions) -> Clerk {
        if options.client_token.is_none() {
            options.client_token = config.client_token.clone();
        }
        let rpc_config = ClientConfig {
            connect_timeout_ms: options.attempt_timeout_ms,
            call_timeout_ms: attempt_timeout_ms(config, options.attempt_timeout_ms),
            max_frame_bytes: config.max_frame_bytes,
        };
        // A clerk presents the cluster id, so a clerk of another cluster is
        // refused at once; it needs no secret (its token is in each request).
        let credentials = Credentials::clerk(&config.cluster_id);
        let connector = Some((rpc_config.clone(), credentials.clone()));
        let nodes = config
            .raft_nodes
            .iter()
            .map(|node| {
                let channel: NodeChannel = Box::new(
                    RpcClient::new(node.addr(), rpc_config.clone())
                        .with_credentials(credentials.clone()),
                );
                Node {
                    id: node.id,
                    addr: Some(node.addr()),
                    stub: KvStoreStub::new(channel),
                }
            })
            .collect();
        let mut clerk = Clerk::build(nodes, options);
        clerk.connector = connector;
        clerk
    }

    /// A clerk over given transports, one per node id (e.g. a channel that
    /// drops replies, in tests). Panics when `nodes` is empty.
    pub fn with_channels(nodes: Vec<(u64, NodeChannel)>, options: ClerkOptions) -> Clerk {
        let nodes = nodes
            .into_iter()
            .map(|(id, channel)| Node {
                id,
                addr: None,
                stub: KvStoreStub::new(channel),
            })
            .collect();
        Clerk::build(nodes, options)
    }

    fn build(nodes: Vec<Node>, options: ClerkOptions) -> Clerk {
        assert!(!nodes.is_empty(), "a clerk needs at least one node");
        Clerk {
            node_ids: nodes.iter().map(|node| node.id).collect(),
            nodes,
            session: None,
            last_seq: 0,
            sessions_opened: 0,
            route: Route::default(),
            busy_retries: 0,
            rng: SplitMix64::new(random_client_id()),
            options,
            connector: None,
        }
    }

    /// The id of this clerk's session on the servers: 0 until its first write opens one.
    pub fn client_id(&self) -> u64 {
        self.session.map_or(0, |session| session.client_id)
    }

    /// How many sessions this clerk opened (more than one when one expired).
    pub fn sessions_opened(&self) -> u64 {
        self.sessions_opened
    }

    /// The node this clerk believes leads, once a node has answered as
    /// leader or named one.
    pub fn leader_hint(&self) -> Option<u64> {
        self.route.leader(&self.node_ids)
    }

    /// How many times a node answered `BUSY` to this clerk, over its lifetime.
    pub fn busy_retries(&self) -> u64 {
        self.busy_retries
    }

    /// The value of `key` (linearizable), or `None` when it is missing.
    pub fn get(&mut self, key: impl AsRef<[u8]>) -> Result<Option<Vec<u8>>, ClerkError> {
        let request = GetRequest {
            header: self.header(0),
            key: key.as_ref().to_vec(),
            ..Default::default()
        };
        let mut reply = self.call_without_session(|stub| stub.get(&request))?;
        Ok(reply.found.then(|| std::mem::take(&mut reply.value)))
    }

    /// Sets `key` to `value`.
    pub fn put(
        &mut self,
        key: impl AsRef<[u8]>,
        value: impl AsRef<[u8]>,
    ) -> Result<(), ClerkError> {
        let mut request = PutRequest {
            key: key.as_ref().to_vec(),
            value: value.as_ref().to_vec(),
            ..Default::default()
        };
        self.write(|stub, header| {
            request.header = header;
            stub.put(&request)
        })
        .map(drop)
    }

    /// Appends `value` to the value of `key` (a missing key counts as "").
    pub fn append(
        &mut self,
        key: impl AsRef<[u8]>,
        value: impl AsRef<[u8]>,
    ) -> Result<(), ClerkError> {
        let mut request = AppendRequest {
            key: key.as_ref().to_vec(),
            value: value.as_ref().to_vec(),
            ..Default::default()
        };
        self.write(|stub, header| {
            request.header = header;
            stub.append(&request)
        })
        .map(drop)
    }

    /// Removes `key`; answers whether it existed.
    pub fn delete(&mut self, key: impl AsRef<[u8]>) -> Result<bool, ClerkError> {
        let mut request = DeleteRequest {
            key: key.as_ref().to_vec(),
            ..Default::default()
        };
        self.write(|stub, header| {
            request.header = header;
            stub.delete(&request)
        })
        .map(|reply| reply.existed)
    }

    /// Sets `key` to `value` if its value equals `expected` (a missing key
    /// counts as "").
    pub fn cas(
        &mut self,
        key: impl AsRef<[u8]>,
        expected: impl AsRef<[u8]>,
        value: impl AsRef<[u8]>,
    ) -> Result<CasResult, ClerkError> {
        let mut request = CasRequest {
            key: key.as_ref().to_vec(),
            expected: expected.as_ref().to_vec(),
            value: value.as_ref().to_vec(),
            ..Default::default()
        };
        let mut reply = self.write(|stub, header| {
            request.header = header;
            stub.cas(&request)
        })?;
        let current_unknown = reply.current_not_retained.then(|| {
            let message = &reply.header.message;
            if message.is_empty() {
                "the value before the operation was not retained".to_string()
            } else {
                message.clone()
            }
        });
        let known = reply.found && current_unknown.is_none();
        Ok(CasResult {
            swapped: reply.swapped,
            found: reply.found,
            current: known.then(|| std::mem::take(&mut reply.current)),
            current_unknown,
        })
    }

    /// Runs a batch of Redis-protocol ops (src/kv/redis_ops.rs): `writes`,
    /// one log entry under one fresh seq (retried as one, so applied once),
    /// or else `reads`, all at one linearizable read point. One reply per op.
    pub fn exec(
        &mut self,
        writes: Vec<WriteOp>,
        reads: Vec<ReadOp>,
    ) -> Result<Vec<OpReply>, ClerkError> {
        if writes.is_empty() {
            let request = ExecRequest {
                header: self.header(0),
                reads,
                ..Default::default()
            };
            let reply = self.call_without_session(|stub| stub.exec(&request))?;
            return Ok(reply.replies);
        }
        let mut request = ExecRequest {
            writes,
            ..Default::default()
        };
        let reply = self.write(|stub, header| {
            request.header = header;
            stub.exec(&request)
        })?;
        Ok(reply.replies)
    }

    /// The header of this clerk's next write (its session, the next seq), or `None` while
    /// no session is open. For a caller that sends a write's first attempt itself (the
    /// Redis listener, in-process, without blocking a thread) and hands any answer other
    /// than success to [`Clerk::exec_after`].
    pub fn next_write_header(&mut self) -> Option<MessageField<RequestHeader>> {
        let session = self.session?;
        Some(self.write_header(session))
    }

    /// The header of the next write in `session`: its next seq, taken here.
    fn write_header(&mut self, session: Session) -> MessageField<RequestHeader> {
        self.last_seq += 1;
        let mut header = request_header(
            session.client_id,
            self.last_seq,
            self.options.client_token.as_deref(),
        );
        header.mut_or_insert_default().session_secret = session.secret;
        header
    }

    /// The header of a read (no session; the client token).
    pub fn read_header(&self) -> MessageField<RequestHeader> {
        self.header(0)
    }

    /// Finishes an Exec whose first attempt the caller sent to node `node` at `started`
    /// (with [`Clerk::next_write_header`] for writes, [`Clerk::read_header`] for reads) and
    /// that was answered `first`: judged and retried exactly as [`Clerk::exec`] retries
    /// (a write with the same seq, so it is applied once), within the clerk's timeout
    /// counted from `started`.
    pub fn exec_after(
        &mut self,
        node: u64,
        started: Instant,
        request: ExecRequest,
        first: Result<ExecReply, RpcError>,
    ) -> Result<Vec<OpReply>, ClerkError> {
        let deadline = started + self.options.timeout;
        let write = !request.writes.is_empty();
        let attempts = if write {
            Attempts::for_write(deadline)
        } else {
            Attempts::new(deadline)
        };
        if let Some(index) = self.node_ids.iter().position(|&id| id == node) {
            self.route.current = index;
        }
        match self.call_from(attempts, Some(first), |stub| stub.exec(&request)) {
            Ok(reply) => Ok(reply.replies),
            Err(CallError::Clerk(error)) | Err(CallError::SessionLost(Some(error))) => Err(error),
            Err(CallError::SessionLost(None)) if write => {
                self.session = None;
                self.exec(request.writes, Vec::new())
            }
            Err(lost) => Err(lost.into_clerk_error()),
        }
    }

    /// Saves a backup of node `node`'s state machine (the leader's when `None`) to `path`:
    /// a consistent view, streamed chunk by chunk into `path` (through `path.partial`,
    /// renamed once complete), with a header naming `cluster_id`. Each chunk call is retried
    /// within the clerk's timeout. Memory: one chunk.
    pub fn snapshot_save(
        &self,
        node: Option<u64>,
        cluster_id: &str,
        path: &std::path::Path,
    ) -> Result<BackupInfo, ClerkError> {
        let node =
            match node {
                Some(id) => self.nodes.iter().find(|n| n.id == id).ok_or_else(|| {
                    ClerkError::Rejected(format!("no node {id} in the cluster file"))
                })?,
                None => {
                    let leader = self
                        .status_all()
                        .into_iter()
                        .find(|view| view.status.as_ref().is_ok_and(|s| s.role == "leader"))
                        .ok_or_else(|| ClerkError::Timeout {
                            last_error: "no node says it leads".to_string(),
                        })?;
                    self.nodes
                        .iter()
                        .find(|n| n.id == leader.id)
                        .expect("status_all answers for the clerk's nodes")
                }
            };
        let mut request = SnapshotChunkRequest {
            header: self.header(0),
            ..Default::default()
        };
        let first = self.snapshot_chunk(node, &request)?;
        let header = BackupHeader {
            cluster_id: cluster_id.to_string(),
            node_id: first.node_id,
            index: first.index,
            term: first.term,
            created_at_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
        };
        let failed = |e: String| ClerkError::Rejected(e);
        let mut writer = BackupWriter::create(path, &header).map_err(failed)?;
        let mut reply = first;
        request.backup_id = reply.backup_id;
        let result = loop {
            if reply.done {
                break writer.finish(reply.keys, reply.sessions).map_err(failed);
            }
            if let Err(e) = writer.push_chunk(&reply.data) {
                writer.abandon();
                return Err(failed(e));
            }
            request.chunk += 1;
            reply = match self.snapshot_chunk(node, &request) {
                Ok(reply) => reply,
                Err(e) => {
                    writer.abandon();
                    return Err(e);
                }
            };
        };
        result?;
        crate::kv::backup::inspect(path).map_err(failed)
    }

    /// One `SnapshotChunk` call to `node`, retried (same request) on failures until the
    /// clerk's timeout.
    fn snapshot_chunk(
        &self,
        node: &Node,
        request: &SnapshotChunkRequest,
    ) -> Result<SnapshotChunkReply, ClerkError> {
        let deadline = Instant::now() + self.options.timeout;
        loop {
            let last_error = match node.stub.snapshot_chunk(request) {
                Ok(reply) => {
                    let (code, _, message) = reply_status(reply.header.as_ref());
                    match code {
                        ErrorCode::OK => return Ok(reply),
                        ErrorCode::BUSY | ErrorCode::TIMEOUT => {
                            format!("node {}: {code:?} {message}", node.id)
                        }
                        _ => {
                            return Err(ClerkError::Rejected(format!(
                                "node {}: {code:?} {message}",
                                node.id
                            )))
                        }
                    }
                }
                Err(e) => format!("node {}: {e}", node.id),
            };
            if Instant::now() >= deadline {
                return Err(ClerkError::Timeout { last_error });
            }
            thread::sleep(Duration::from_millis(BACKOFF_MAX_MS));
        }
    }

    /// Asks every node for its status, all at once, each bounded by
    /// `attempt_timeout_ms`. In the clerk's node order.
    pub fn status_all(&self) -> Vec<NodeStatusView> {
        let request = StatusRequest {
            header: self.header(0),
            ..Default::default()
        };
        thread::scope(|scope| {
            let handles: Vec<_> = self
                .nodes
                .iter()
                .map(|node| {
                    let request = &request;
                    scope.spawn(move || {
                        let (status, rejected) = match node_status(node, request) {
                            Ok(status) => (Ok(status), false),
                            Err((error, rejected)) => (Err(error), rejected),
                        };
                        NodeStatusView {
                            id: node.id,
                            addr: node.addr,
                            status,
                            rejected,
                        }
                    })
                })
                .collect();
            handles
                .into_iter()
                .zip(&self.nodes)
                .map(|(handle, node)| {
                    handle.join().unwrap_or_else(|_| NodeStatusView {
                        id: node.id,
                        addr: node.addr,
                        status: Err("the status call panicked".to_string()),
                        rejected: false,
                    })
                })
                .collect()
        })
    }

    /// The header of a request without a session (reads, OpenSession).
    fn header(&self, seq: u64) -> MessageField<RequestHeader> {
        request_header(0, seq, self.options.client_token.as_deref())
    }

    /// Runs one write: opens a session first when the clerk has none, then sends the write
    /// (`send` with its header: the session, the next seq; the same on every retry) until
    /// it is answered, refused, or the deadline passes. When the session turns out to be
    /// gone (SESSION_EXPIRED), a new one is opened and the write is sent again under it,
    /// unless an earlier attempt may have been applied: then the outcome is unknown.
    fn write<Rep: HasReplyHeader>(
        &mut self,
        mut send: impl FnMut(
            &KvStoreStub<NodeChannel>,
            MessageField<RequestHeader>,
        ) -> Result<Rep, RpcError>,
    ) -> Result<Rep, ClerkError> {
        let deadline = Instant::now() + self.options.timeout;
        loop {
            let session = match self.session {
                Some(session) => session,
                None => self.open_session(deadline)?,
            };
            let header = self.write_header(session);
            let attempts = Attempts::for_write(deadline);
            match self.call(attempts, |stub| send(stub, header.clone())) {
                Ok(reply) => return Ok(reply),
                Err(CallError::Clerk(error)) => return Err(error),
                Err(CallError::SessionLost(unknown)) => {
                    log::info!(
                        "session {} is gone (expired or evicted); opening a new one",
                        session.client_id
                    );
                    self.session = None;
                    if let Some(error) = unknown {
                        return Err(error);
                    }
                }
            }
        }
    }

    /// Opens a session (one log round) and makes it this clerk's.
    fn open_session(&mut self, deadline: Instant) -> Result<Session, ClerkError> {
        let request = OpenSessionRequest {
            header: self.header(0),
            ..Default::default()
        };
        // Retried freely: an attempt whose answer is lost leaves at most an unused session,
        // which expires.
        let reply = self
            .call(Attempts::new(deadline), |stub| stub.open_session(&request))
            .map_err(CallError::into_clerk_error)?;
        if reply.client_id == 0 {
            return Err(ClerkError::Rejected(
                "the cluster opened a session without an id".to_string(),
            ));
        }
        let session = Session {
            client_id: reply.client_id,
            secret: reply.session_secret,
        };
        self.session = Some(session);
        self.last_seq = 0;
        self.sessions_opened += 1;
        Ok(session)
    }

    /// Sends a request that carries no session (reads, OpenSession, the operator's
    /// membership requests) until a node answers it, a node rejects it, or the clerk's
    /// timeout passes; retried freely, as such a request changes nothing when repeated.
    fn call_without_session<Rep: HasReplyHeader>(
        &mut self,
        attempt: impl FnMut(&KvStoreStub<NodeChannel>) -> Result<Rep, RpcError>,
    ) -> Result<Rep, ClerkError> {
        let deadline = Instant::now() + self.options.timeout;
        self.call(Attempts::new(deadline), attempt)
            .map_err(CallError::into_clerk_error)
    }

    /// Adds the members node `via` lists and this clerk does not know, at
    /// the addresses the replicated membership gives them (at most
    /// `MAX_KNOWN_NODES` in all). A cluster grown with `kvserver --join`
    /// stays reachable through a file that lists only its first members,
    /// as long as one of them answers.
    fn learn_members(&mut self, via: usize) {
        let Some((rpc_config, credentials)) = self.connector.clone() else {
            return;
        };
        let request = crate::proto::kvstore::MembersRequest {
            header: self.header(0),
            ..Default::default()
        };
        let Ok(reply) = self.nodes[via].stub.members(&request) else {
            return;
        };
        for member in reply.members {
            if self.node_ids.contains(&member.id) || self.nodes.len() >= MAX_KNOWN_NODES {
                continue;
            }
            let Ok(addr) = member.address.parse::<SocketAddr>() else {
                continue;
            };
            let channel: NodeChannel = Box::new(
                RpcClient::new(addr, rpc_config.clone()).with_credentials(credentials.clone()),
            );
            self.nodes.push(Node {
                id: member.id,
                addr: Some(addr),
                stub: KvStoreStub::new(channel),
            });
            self.node_ids.push(member.id);
        }
    }

    /// Sends one request until a node answers it, a node rejects it, or the
    /// deadline passes. `attempt` sends the same request bytes each time.
    fn call<Rep: HasReplyHeader>(
        &mut self,
        attempts: Attempts,
        attempt: impl FnMut(&KvStoreStub<NodeChannel>) -> Result<Rep, RpcError>,
    ) -> Result<Rep, CallError> {
        self.call_from(attempts, None, attempt)
    }

    /// [`Clerk::call`], whose first attempt, when `first` is given, was already sent (to
    /// the node of `self.route.current()`) and answered `first`.
    fn call_from<Rep: HasReplyHeader>(
        &mut self,
        mut attempts: Attempts,
        mut first: Option<Result<Rep, RpcError>>,
        mut attempt: impl FnMut(&KvStoreStub<NodeChannel>) -> Result<Rep, RpcError>,
    ) -> Result<Rep, CallError> {
        loop {
            let node = &self.nodes[self.route.current()];
            let answer = first.take().unwrap_or_else(|| attempt(&node.stub));
            // Refused at the handshake: this clerk's cluster file names
            // another cluster; no node of it will answer otherwise.
            if let Err(error @ RpcError::Refused { .. }) = &answer {
                let error = attempts.refused(format!("node {}: {error}", node.id));
                return Err(CallError::Clerk(error));
            }
            // Redirected to a leader this clerk has no address for (a member
            // added after its file was written): ask the node that answered
            // for the membership, so the hint can be followed.
            if let Ok(reply) = &answer {
                if let (ErrorCode::NOT_LEADER, hint, _) = reply_status(reply.reply_header()) {
                    if hint != 0 && !self.node_ids.contains(&hint) {
                        self.learn_members(self.route.current());
                    }
                }
            }
            let seen = match &answer {
                Ok(reply) => Ok(reply.reply_header()),
                Err(error) => Err(error as &dyn fmt::Display),
            };
            let step = attempts.judge(
                &mut self.route,
                &self.node_ids,
                seen,
                Instant::now(),
                &mut self.rng,
            );
            match (step, answer) {
                (NextStep::Done, Ok(reply)) => return Ok(reply),
                (NextStep::Done, Err(_)) => unreachable!("a failed attempt is never done"),
                (NextStep::Fail(error), _) => return Err(CallError::Clerk(error)),
                (NextStep::SessionLost(unknown), _) => return Err(CallError::SessionLost(unknown)),
                (NextStep::Retry { wait, busy }, _) => {
                    self.busy_retries += u64::from(busy);
                    if !wait.is_zero() {
                        thread::sleep(wait);
                    }
                }
            }
        }
    }
}

/// A clerk's session: what OpenSession answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Session {
    client_id: u64,
    secret: u64,
}

/// How [`Clerk::call`] ends without an answer.
enum CallError {
    Clerk(ClerkError),
    /// See [`NextStep::SessionLost`].
    SessionLost(Option<ClerkError>),
}

impl CallError {
    /// For requests without a session (reads, OpenSession), which never see
    /// SESSION_EXPIRED from a correct server: a rejection then.
    fn into_clerk_error(self) -> ClerkError {
        match self {
            CallError::Clerk(error) => error,
            CallError::SessionLost(unknown) => unknown.unwrap_or_else(|| {
                ClerkError::Rejected("SESSION_EXPIRED for a request without a session".into())
            }),
        }
    }
}

/// Which node a client tries next: the one it believes leads, moved by
/// `NOT_LEADER` hints and by failures. Indexes refer to the client's list of
/// node ids, which only grows (members learned later go at its end).
#[derive(Clone, Debug, Default)]
pub struct Route {
    /// Index of the node tried first.
    current: usize,
    /// Whether `current` answered as leader (or was named by a leader hint)
    /// rather than being a guess.
    known: bool,
}

impl Route {
    /// The index of the node to try next.
    pub fn current(&self) -> usize {
        self.current
    }

    /// The id of the node believed to lead, once one answered as leader or
    /// was named by a hint.
    pub fn leader(&self, node_ids: &[u64]) -> Option<u64> {
        self.known.then(|| node_ids[self.current])
    }

    /// Tries the node named by a `NOT_LEADER` hint next, or the next node
    /// when the hint names none, an unknown node, or the node that answered.
    fn follow_hint(&mut self, node_ids: &[u64], answered: u64, hint: u64) {
        let hinted = (hint != 0 && hint != answered)
            .then(|| node_ids.iter().position(|&id| id == hint))
            .flatten();
        match hinted {
            Some(index) => {
                self.current = index;
                self.known = true;
            }
            None => self.rotate(node_ids.len()),
        }
    }

    fn rotate(&mut self, node_count: usize) {
        self.current = (self.current + 1) % node_count;
        self.known = false;
    }
}

/// What a client does after an attempt, as [`Attempts::judge`] decides.
#[derive(Debug)]
pub enum NextStep {
    /// The node answered OK: the operation is done.
    Done,
    /// The operation is over without success: rejected for good, or the
    /// deadline passed (outcome unknown).
    Fail(ClerkError),
    /// Send the same request again, to [`Route::current`], after `wait`
    /// (zero: at once; never past the deadline). `busy` says the node
    /// answered `BUSY`.
    Retry { wait: Duration, busy: bool },
    /// The write's session is gone (SESSION_EXPIRED: expired, evicted, never
    /// opened): open a new one. `None`: no attempt of this write can have
    /// been applied, so it may be sent again under the new session. `Some`:
    /// an earlier attempt may have been applied, and the session that would
    /// have told is gone: the operation ends with this error (outcome
    /// unknown), never sent again.
    SessionLost(Option<ClerkError>),
}

/// The retry rules of one operation, shared by [`Clerk`] and the load
/// generator's multiplexed clients: follow `NOT_LEADER` hints, rotate on
/// failures, back off (doubling, jittered) on `BUSY` and after a full round
/// of nodes without progress, and give up at the deadline.
#[derive(Debug)]
pub struct Attempts {
    deadline: Instant,
    backoff_ms: u64,
    /// Attempts since the last one that got anywhere; after a full round of
    /// nodes without progress (no leader, or hints pointing in a circle)
    /// the client waits before the next round instead of spinning.
    fruitless: usize,
    /// Whether the operation is a write, which an attempt may apply.
    write: bool,
    /// What an earlier attempt of this write that may have been applied
    /// ended with (no answer, TIMEOUT, a leader change after proposing):
    /// a later refusal then does not mean that nothing was applied.
    maybe_applied: Option<String>,
}

impl Attempts {
    /// The attempts of a read (or any operation without effects) that must
    /// end by `deadline`.
    pub fn new(deadline: Instant) -> Attempts {
        Attempts {
            deadline,
            backoff_ms: BACKOFF_MIN_MS,
            fruitless: 0,
            write: false,
            maybe_applied: None,
        }
    }

    /// The attempts of a write that must end by `deadline`.
    pub fn for_write(deadline: Instant) -> Attempts {
        Attempts {
            write: true,
            ..Attempts::new(deadline)
        }
    }

    /// The error for a refusal (`why`): the request was rejected, unless an
    /// earlier attempt of this write may have been applied; then the
    /// outcome is unknown.
    pub fn refused(&self, why: String) -> ClerkError {
        match &self.maybe_applied {
            None => ClerkError::Rejected(why),
            Some(earlier) => ClerkError::Unknown {
                reason: format!(
                    "an earlier attempt may have been applied ({earlier}), and then {why}"
                ),
            },
        }
    }

    /// Notes that the attempt that ended with `what` may have been applied.
    fn may_have_applied(&mut self, what: &str) {
        if self.write && self.maybe_applied.is_none() {
            self.maybe_applied = Some(what.to_string());
        }
    }

    /// Judges one attempt sent to node `node_ids[route.current()]`: its reply
    /// header (`Ok`), or why no reply came (`Err`). Moves `route` as the
    /// answer says; `rng` jitters the back-off.
    pub fn judge(
        &mut self,
        route: &mut Route,
        node_ids: &[u64],
        answer: Result<Option<&ReplyHeader>, &dyn fmt::Display>,
        now: Instant,
        rng: &mut SplitMix64,
    ) -> NextStep {
        let node = node_ids[route.current];
        let (wait, busy, last_error) = match answer {
            Err(error) => {
                route.rotate(node_ids.len());
                self.fruitless += 1;
                let what = format!("node {node}: {error}");
                // The request may have reached the node and the answer been lost.
                self.may_have_applied(&what);
                (false, false, what)
            }
            Ok(header) => {
                let (code, hint, message) = reply_status(header);
                match code {
                    ErrorCode::OK => {
                        route.known = true;
                        return NextStep::Done;
                    }
                    ErrorCode::INVALID_ARGUMENT
                    | ErrorCode::UNAUTHENTICATED
                    | ErrorCode::TOO_MANY_SESSIONS => {
                        return NextStep::Fail(self.refused(format!("node {node}: {message}")));
                    }
                    ErrorCode::SESSION_EXPIRED => {
                        route.known = true;
                        let unknown =
                            self.maybe_applied
                                .as_ref()
                                .map(|earlier| ClerkError::Unknown {
                                    reason: format!(
                                    "an earlier attempt may have been applied ({earlier}), and \
                                     then the session was gone (node {node}: {message})"
                                ),
                                });
                        return NextStep::SessionLost(unknown);
                    }
                    // Refused before anything was proposed.
                    ErrorCode::BUSY => (true, true, format!("node {node} is busy: {message}")),
                    ErrorCode::NOT_LEADER => {
                        route.follow_hint(node_ids, node, hint);
                        self.fruitless += 1;
                        let what = format!("node {node} is not the leader: {message}");
                        // A leader that lost its leadership after proposing
                        // the write cannot tell whether it commits.
                        if message != NOT_LEADER_NOTHING_PROPOSED {
                            self.may_have_applied(&what);
                        }
                        (false, false, what)
                    }
                    ErrorCode::TIMEOUT => {
                        // The node may still commit it: ask it again with the
                        // same seq; a deposed leader will say so.
                        self.fruitless += 1;
                        let what = format!("node {node} timed out: {message}");
                        self.may_have_applied(&what);
                        (false, false, what)
                    }
                    _ => {
                        route.rotate(node_ids.len());
                        self.fruitless += 1;
                        let what = format!("node {node}: {code:?} {message}");
                        self.may_have_applied(&what);
                        (false, false, what)
                    }
                }
            }
        };
        if now >= self.deadline {
            return NextStep::Fail(ClerkError::Timeout { last_error });
        }
        let mut pause = Duration::ZERO;
        if wait || self.fruitless >= node_ids.len() {
            self.fruitless = 0;
            let sleep_ms = jittered(rng, self.backoff_ms);
            self.backoff_ms = (self.backoff_ms * 2).min(BACKOFF_MAX_MS);
            pause = Duration::from_millis(sleep_ms).min(self.deadline - now);
        }
        NextStep::Retry { wait: pause, busy }
    }
}

/// A wait in `[ms/2, ms]`, so clients pushed back together do not return
/// together.
fn jittered(rng: &mut SplitMix64, ms: u64) -> u64 {
    let low = ms.div_ceil(2);
    rng.range(low, ms + 1)
}

/// The header of a request from session `client_id`: `seq` 0 for reads, the
/// write's own seq (the same on every retry) for writes.
pub fn request_header(
    client_id: u64,
    seq: u64,
    client_token: Option<&str>,
) -> MessageField<RequestHeader> {
    MessageField::some(RequestHeader {
        client_id,
        seq,
        token: client_token.unwrap_or_default().to_string(),
        ..Default::default()
    })
}

/// A node's status, or why not and whether the node rejected the clerk.
fn node_status(node: &Node, request: &StatusRequest) -> Result<StatusReply, (String, bool)> {
    let reply = node.stub.status(request).map_err(|e| {
        let rejected = matches!(e, RpcError::Refused { .. });
        (e.to_string(), rejected)
    })?;
    let (code, _, message) = reply_status(reply.reply_header());
    match code {
        ErrorCode::OK => Ok(reply),
        ErrorCode::UNAUTHENTICATED => Err((format!("{code:?}: {message}"), true)),
        _ => Err((format!("{code:?}: {message}"), false)),
    }
}

/// The error code, leader hint and message of a reply. A reply without a
/// header has the default one (OK), as in proto3; a code this build does not
/// know counts as a failure of that node.
fn reply_status(header: Option<&ReplyHeader>) -> (ErrorCode, u64, &str) {
    match header {
        None => (ErrorCode::OK, 0, ""),
        Some(header) => match header.error.enum_value() {
            Ok(code) => (code, header.leader_hint, header.message.as_str()),
            Err(_) => (
                ErrorCode::SHUTTING_DOWN,
                0,
                "unknown error code in the reply",
            ),
        },
    }
}

/// The replies of the KV service, which all carry a [`ReplyHeader`].
trait HasReplyHeader {
    fn reply_header(&self) -> Option<&ReplyHeader>;
}

macro_rules! has_reply_header {
    ($($reply:ty),*) => {
        $(impl HasReplyHeader for $reply {
            fn reply_header(&self) -> Option<&ReplyHeader> {
                self.header.as_ref()
            }
        })*
    };
}

has_reply_header!(
    GetReply,
    PutReply,
    AppendReply,
    DeleteReply,
    CasReply,
    ExecReply,
    StatusReply,
    OpenSessionReply,
    MembersReply,
    MemberChangeReply,
    TransferLeaderReply
);

/// A random non-zero client id. Wall-clock nanoseconds, the process id and a
/// per-process counter are mixed by SplitMix64, so clerks started in the same
/// nanosecond, in one process or in several, still get different ids.
pub fn random_client_id() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    let seed =
        nanos ^ (u64::from(std::process::id()) << 32) ^ count.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut rng = SplitMix64::new(seed);
    loop {
        let id = rng.next_u64();
        if id != 0 {
            return id;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rpc::services::kv_store;
    use parking_lot::Mutex;
    use protobuf::Message;
    use std::sync::Arc;

    /// Issue 16, item 5: a clerk (and loadgen) waits longer for an attempt
    /// than the servers wait for the cluster, so the server's TIMEOUT
    /// reaches it and a retry never races its own first attempt. Before,
    /// the clerk gave up after 1 s while the server held the request for 2.
    #[test]
    fn an_attempt_outlasts_the_servers_request_timeout() {
        let text = r#"{"raft_nodes":[{"id":1,"ip":"127.0.0.1","port":7001}]}"#;
        let config = ClusterConfig::parse(text, "test.json").unwrap();
        let attempt = attempt_timeout_ms(&config, ClerkOptions::default().attempt_timeout_ms);
        assert!(
            attempt > config.request_timeout_ms,
            "attempt {attempt} ms <= request_timeout_ms {}",
            config.request_timeout_ms
        );
        let targets = crate::loadgen::Targets::from_config(&config, Duration::from_secs(5));
        assert!(targets.attempt_timeout_ms > config.request_timeout_ms);
        // A longer wish is kept.
        assert_eq!(attempt_timeout_ms(&config, 60_000), 60_000);
    }

    /// What a scripted node saw: (method id, client_id, seq) per call.
    type Log = Arc<Mutex<Vec<(u32, u64, u64)>>>;

    /// A fake node that answers from a script: each call pops the next
    /// `(code, hint)`; when the script is empty it answers OK.
    struct Scripted {
        id: u64,
        script: Mutex<std::collections::VecDeque<Result<(ErrorCode, u64), ()>>>,
        log: Log,
    }

    impl RpcChannel for Scripted {
        fn call_method(&self, _: u32, method_id: u32, request: &[u8]) -> Result<Vec<u8>, RpcError> {
            if method_id == kv_store::OPEN_SESSION {
                // Sessions open at once (not scripted): session 42, secret 7.
                return Ok(OpenSessionReply {
                    client_id: 42,
                    session_secret: 7,
                    ..Default::default()
                }
                .write_to_bytes()
                .unwrap());
            }
            let header = match method_id {
                kv_store::PUT => PutRequest::parse_from_bytes(request).unwrap().header,
                kv_store::GET => GetRequest::parse_from_bytes(request).unwrap().header,
                _ => panic!("unexpected method {method_id}"),
            };
            self.log
                .lock()
                .push((method_id, header.client_id, header.seq));
            let step = {
                let mut script = self.script.lock();
                script.pop_front().unwrap_or(Ok((ErrorCode::OK, 0)))
            };
            let (code, hint) =
                step.map_err(|()| RpcError::Decode(format!("node {} dropped", self.id)))?;
            let header = MessageField::some(ReplyHeader {
                error: code.into(),
                leader_hint: hint,
                message: format!("from {}", self.id),
                ..Default::default()
            });
            let bytes = if method_id == kv_store::GET {
                GetReply {
                    header,
                    found: true,
                    value: format!("v{}", self.id).into_bytes(),
                    ..Default::default()
                }
                .write_to_bytes()
            } else {
                PutReply {
                    header,
                    ..Default::default()
                }
                .write_to_bytes()
            };
            Ok(bytes.unwrap())
        }
    }

    fn clerk(scripts: Vec<Vec<Result<(ErrorCode, u64), ()>>>, timeout_ms: u64) -> (Clerk, Log) {
        let log = Log::default();
        let nodes = scripts
            .into_iter()
            .enumerate()
            .map(|(i, script)| {
                let id = i as u64 + 1;
                let channel: NodeChannel = Box::new(Scripted {
                    id,
                    script: Mutex::new(script.into()),
                    log: log.clone(),
                });
                (id, channel)
            })
            .collect();
        let options = ClerkOptions {
            timeout: Duration::from_millis(timeout_ms),
            ..Default::default()
        };
        (Clerk::with_channels(nodes, options), log)
    }

    /// (method, seq) per call.
    fn relative_seqs(log: &Log) -> Vec<(u32, u64)> {
        log.lock().iter().map(|&(m, _, s)| (m, s)).collect()
    }

    fn client_ids(log: &Log) -> Vec<u64> {
        log.lock()
            .iter()
            .map(|&(_, client_id, _)| client_id)
            .collect()
    }

    #[test]
    fn follows_the_hint_and_caches_the_leader() {
        let (mut clerk, log) = clerk(
            vec![vec![Ok((ErrorCode::NOT_LEADER, 3))], vec![], vec![]],
            5_000,
        );
        assert_eq!(clerk.leader_hint(), None);
        clerk.put("k", "v").unwrap();
        assert_eq!(clerk.leader_hint(), Some(3));
        assert_eq!(clerk.get("k").unwrap(), Some(b"v3".to_vec()));
        // Both attempts of the put carried seq 1; the get went straight to 3.
        let seqs = relative_seqs(&log);
        assert_eq!(
            seqs,
            vec![(kv_store::PUT, 1), (kv_store::PUT, 1), (kv_store::GET, 0)]
        );
        // Writes carry the session the cluster assigned; reads none.
        assert_eq!(client_ids(&log), vec![42, 42, 0]);
    }

    #[test]
    fn retries_reuse_the_seq_and_the_next_write_takes_a_new_one() {
        let (mut clerk, log) = clerk(
            vec![
                vec![Err(()), Ok((ErrorCode::TIMEOUT, 0))],
                vec![Ok((ErrorCode::NOT_LEADER, 0))],
                vec![Ok((ErrorCode::SHUTTING_DOWN, 0))],
            ],
            5_000,
        );
        clerk.put("k", "1").unwrap();
        clerk.put("k", "2").unwrap();
        let seqs: Vec<u64> = relative_seqs(&log).into_iter().map(|(_, s)| s).collect();
        // node1 drop, node2 not leader, node3 shutting down, node1 timeout,
        // node1 OK; then the next put: node 1 OK.
        assert_eq!(seqs, vec![1, 1, 1, 1, 1, 2]);
        assert_eq!(clerk.busy_retries(), 0);
        assert_eq!(clerk.leader_hint(), Some(1));
    }

    /// Issue 16, item 8: SESSION_EXPIRED makes the clerk open a new session
    /// and send the write again under it, unless an earlier attempt of the
    /// write may have been applied: then the outcome is unknown, and the
    /// write is not sent again (it could be applied twice).
    #[test]
    fn an_expired_session_is_reopened_but_a_maybe_applied_write_is_not_resent() {
        let expired = Ok((ErrorCode::SESSION_EXPIRED, 0));
        let (mut first, log) = clerk(vec![vec![expired]], 5_000);
        first.put("k", "v").unwrap();
        assert_eq!(first.sessions_opened(), 2);
        assert_eq!(
            relative_seqs(&log),
            vec![(kv_store::PUT, 1), (kv_store::PUT, 1)]
        );

        let (mut clerk, log) = clerk(vec![vec![Err(()), expired]], 5_000);
        match clerk.put("k", "v") {
            Err(ClerkError::Unknown { reason }) => {
                assert!(reason.contains("may have been applied"), "{reason}")
            }
            other => panic!("expected an unknown outcome, got {other:?}"),
        }
        assert_eq!(log.lock().len(), 2, "the write was not sent a third time");
        // The next write opens a new session.
        clerk.put("k", "w").unwrap();
        assert_eq!(clerk.sessions_opened(), 2);
    }

    #[test]
    fn busy_backs_off_and_is_counted() {
        let busy = Ok((ErrorCode::BUSY, 0));
        let (mut clerk, log) = clerk(vec![vec![busy; 5]], 5_000);
        clerk.put("k", "v").unwrap();
        assert_eq!(clerk.busy_retries(), 5);
        assert_eq!(log.lock().len(), 6);
    }

    #[test]
    fn rejection_is_final() {
        let (mut clerk, log) = clerk(
            vec![vec![Ok((ErrorCode::UNAUTHENTICATED, 0))], vec![]],
            5_000,
        );
        let error = clerk.put("k", "v").unwrap_err();
        assert_eq!(error, ClerkError::Rejected("node 1: from 1".to_string()));
        assert_eq!(log.lock().len(), 1);
    }

    #[test]
    fn the_deadline_ends_retries_with_outcome_unknown() {
        let (mut clerk, _) = clerk(vec![vec![Err(()); 100_000], vec![Err(()); 100_000]], 200);
        let start = Instant::now();
        let error = clerk.put("k", "v").unwrap_err();
        assert!(start.elapsed() >= Duration::from_millis(200));
        assert!(start.elapsed() < Duration::from_secs(5));
        match &error {
            ClerkError::Timeout { last_error } => assert!(last_error.contains("dropped")),
            other => panic!("expected a timeout, got {other:?}"),
        }
        assert!(error.to_string().contains("outcome is unknown"), "{error}");
    }

    #[test]
    fn a_reply_without_a_header_is_ok_and_an_unknown_code_is_a_failure() {
        assert_eq!(reply_status(None).0, ErrorCode::OK);
        let mut header = ReplyHeader::new();
        header.error = protobuf::EnumOrUnknown::from_i32(99);
        assert_eq!(reply_status(Some(&header)).0, ErrorCode::SHUTTING_DOWN);
    }

    #[test]
    fn random_client_ids_differ_and_are_not_zero() {
        let ids: std::collections::HashSet<u64> = (0..1000).map(|_| random_client_id()).collect();
        assert_eq!(ids.len(), 1000);
        assert!(!ids.contains(&0));
    }

    #[test]
    fn jitter_stays_in_range() {
        let (mut clerk, _) = clerk(vec![vec![]], 1_000);
        for ms in [1, 2, 7, 100] {
            for _ in 0..100 {
                let wait = jittered(&mut clerk.rng, ms);
                assert!(wait >= ms.div_ceil(2) && wait <= ms, "{wait} for {ms}");
            }
        }
    }
}
