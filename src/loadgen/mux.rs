//! The multiplexed engine of the load generator: N logical clients, each
//! with its own session (`client_id`, `seq`) and exactly one request in
//! flight (a client's first write opens its session first: one extra log
//! round per client, none per write), share a few connections per node and one event-loop thread. The
//! thread waits in `ppoll(2)` on every connection, reads whatever replies
//! arrived, matches each to its client by call id (replies come in any
//! order), lets the client take its next step under the clerk's rules
//! ([`Attempts`]: follow `NOT_LEADER` hints, rotate on failures, back off on
//! `BUSY` with the same seq, give up at the deadline), and writes every
//! request this produced in one `write` per connection.
//!
//! [`Engine`] is the pure part: clients, call tables and output buffers,
//! driven by events ([`Engine::on_reply`], [`Engine::on_link_down`],
//! [`Engine::on_tick`]) and testable without sockets. [`Io`] owns the
//! non-blocking sockets and a connector thread, which connects and runs the
//! handshake, so a slow `connect` never stalls the loop. A connection that breaks, or that stays silent for an
//! attempt timeout while calls wait on it, fails every call on it: their
//! clients retry elsewhere with the same seq, as a clerk would.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::fmt::{self, Write as _};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use protobuf::Message;

use super::{check_stride, Finished, LoadOptions, Shared, Tally, Targets};
use super::{MAX_CLIENTS_PER_CONNECTION, MAX_RUN_SECS};
use crate::check::{KvInput, KvOutput, Operation};
use crate::clerk::{random_client_id, request_header, Attempts, ClerkError, NextStep, Route};
use crate::proto::kvstore::{
    GetReply, GetRequest, OpenSessionReply, OpenSessionRequest, PutReply, PutRequest, ReplyHeader,
    RequestHeader,
};
use crate::raft::SplitMix64;
use crate::rpc::frame::{
    decode_frame, finish_frame, FrameHeader, FrameKind, RpcCode, HEADER_BYTES, LENGTH_PREFIX_BYTES,
};
use crate::rpc::handshake::{self, Credentials, HandshakeError};
use crate::rpc::services::kv_store;

/// A connection with this many calls unanswered (its clients' live calls
/// plus calls abandoned after an attempt timeout) is broken and reopened,
/// well below the server's window of 1024 calls in flight per connection.
const MAX_CALLS_PER_CONNECTION: usize = 3 * MAX_CLIENTS_PER_CONNECTION;
/// How often attempts are checked against the attempt timeout.
const SWEEP_INTERVAL: Duration = Duration::from_millis(20);
/// After a failed connect, attempts on that connection fail at once for
/// this long (their clients try other nodes), then it is tried again.
const RECONNECT_DELAY: Duration = Duration::from_millis(50);
/// The shortest operation deadline: every operation gets one attempt.
const MIN_OP_TIMEOUT: Duration = Duration::from_millis(1);
/// Bytes asked of the kernel per `read`: many replies at once.
const READ_CHUNK_BYTES: usize = 64 * 1024;
/// How much longer than the connect timeout the first connects may take
/// before the clients start anyway (and queue on connections still opening).
const SETTLE_SLACK: Duration = Duration::from_secs(1);
/// An input buffer that grew past this for a large frame is given back
/// once empty.
const RETAINED_INPUT_BYTES: usize = 1024 * 1024;
/// Output bytes kept for a connection whose peer reads slowly; past this
/// the connection counts as broken (the server is not reading).
const MAX_OUTPUT_BYTES: usize = 64 * 1024 * 1024;

/// What the clients do in a phase of the run.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Phase {
    /// Write keys `i, i + N, ...` once each (client `i` of N), unmeasured,
    /// until every key is written, a write fails, or the phase's end
    /// (`Shared::end`: the preload's time limit) has come.
    Preload,
    /// Each client starts its next operation as soon as one ends, until
    /// the run's end.
    ClosedLoop,
    /// Operations are due at `rate` per second from the run's start; each
    /// goes to an idle client, at once if one is idle, else as soon as one
    /// becomes idle (latency still counts from when it was due).
    OpenLoop { rate: f64 },
}

/// One request on the wire, waiting for its reply.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Call {
    conn: usize,
    call_id: u64,
    sent_at: Instant,
}

/// The operation a client is running.
struct Op {
    /// Key number (the preload names the key that failed).
    key: u64,
    is_read: bool,
    /// The write waits for its client's session: this is the OpenSession call, after which
    /// the write itself starts.
    opening: bool,
    /// When the operation was due (closed loop: when it started).
    scheduled: Instant,
    attempts: Attempts,
    busy: u64,
    /// The attempt in flight; `None` while the client waits to retry.
    call: Option<Call>,
    /// With `check` on a sampled key: the history's view of the operation,
    /// and when it was invoked (µs since the history's origin).
    record: Option<(KvInput, u64)>,
}

/// A logical client: one session, one operation at a time.
struct Client {
    /// The client in the history (`--check`): random, so runs never share one.
    history_id: u64,
    /// The session's id and secret; `None` until the first write opens it.
    session: Option<(u64, u64)>,
    /// The seq of the last write started; every retry of it reuses it.
    last_seq: u64,
    route: Route,
    /// Key and read/write choices.
    rng: SplitMix64,
    /// Operations started, numbering the values.
    started: u64,
    /// Preload: the next key this client writes.
    preload_next: u64,
    op: Option<Op>,
    /// The encoded request message of `op`, sent unchanged on every attempt.
    request: Vec<u8>,
}

/// Whether a connection can carry calls.
#[derive(Debug)]
enum Link {
    /// Being opened: calls queue in its output buffer.
    Connecting,
    Up,
    /// The last connect failed: calls fail at once, with this error.
    Down(String),
    /// The node refused our handshake (another cluster): as for a clerk,
    /// retrying cannot help, so operations sent here are rejected.
    Refused(String),
}

/// What follows the failure of a connection.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Broken {
    /// It is opened again at once: calls queue on it meanwhile.
    Reopening,
    /// Opening it failed: calls on it fail at once until the next try.
    Down,
    /// The node refused the handshake.
    Refused,
}

/// The engine's side of a connection.
struct Conn {
    link: Link,
    /// Calls sent (or queued) and not answered: call id to client.
    /// Invariant: fewer than `MAX_CALLS_PER_CONNECTION` abandoned calls
    /// (only a sweep abandons, and a sweep breaks a connection at the
    /// limit) plus at most one live call per client of the connection
    /// (`MAX_CLIENTS_PER_CONNECTION`): always below the server's window.
    calls: HashMap<u64, usize>,
    /// Request frames not yet written.
    out: Vec<u8>,
    /// The last reply, or the first call after a quiet spell: a connection
    /// with calls waiting and nothing heard since `attempt_timeout` is dead.
    last_heard: Instant,
}

/// Reusable request messages: encoding one allocates nothing.
struct Scratch {
    get: GetRequest,
    put: PutRequest,
    key: String,
    value_prefix: String,
    /// Bytes of the value the last prefix overwrote.
    value_prefix_bytes: usize,
}

/// The clients, their connections and their timers. See the module
/// documentation.
pub(super) struct Engine {
    node_ids: Vec<u64>,
    conns_per_node: usize,
    keys: u64,
    read_threshold: u64,
    /// See `LoadOptions::random_values`.
    random_values: bool,
    check: bool,
    run_nonce: u64,
    op_timeout: Duration,
    attempt_timeout: Duration,
    max_frame_bytes: usize,
    clients: Vec<Client>,
    /// Connection `node * conns_per_node + slot`.
    conns: Vec<Conn>,
    /// Clients waiting to retry, by when.
    timers: BinaryHeap<Reverse<(Instant, usize)>>,
    /// Open loop: clients without an operation.
    idle: Vec<usize>,
    /// Open loop: the next request of the schedule.
    next_request: u64,
    next_call_id: u64,
    /// Operations started and not ended.
    active: usize,
    phase: Phase,
    next_sweep: Instant,
    /// Jitter of the back-offs.
    rng: SplitMix64,
    scratch: Scratch,
    tally: Tally,
    /// The first failed write of the preload: no new key starts after it.
    preload_error: Option<String>,
}

impl Engine {
    pub(super) fn new(options: &LoadOptions, targets: &Targets, run_nonce: u64) -> Engine {
        let per_node = options
            .conns_per_node
            .max(1)
            .max(options.clients.div_ceil(MAX_CLIENTS_PER_CONNECTION));
        let now = Instant::now();
        let conns = (0..targets.nodes.len() * per_node)
            .map(|_| Conn {
                link: Link::Connecting,
                calls: HashMap::new(),
                out: Vec::new(),
                last_heard: now,
            })
            .collect();
        let clients = (0..options.clients)
            .map(|index| Client {
                history_id: random_client_id(),
                session: None,
                last_seq: 0,
                route: Route::default(),
                rng: client_rng(options.seed, index),
                started: 0,
                preload_next: index as u64,
                op: None,
                request: Vec::new(),
            })
            .collect();
        let header = request_header(0, 0, targets.client_token.as_deref());
        Engine {
            node_ids: targets.nodes.iter().map(|&(id, _)| id).collect(),
            conns_per_node: per_node,
            keys: options.keys.max(1),
            read_threshold: (options.read_ratio.clamp(0.0, 1.0) * 1_000_000.0) as u64,
            random_values: options.random_values,
            check: options.check,
            run_nonce,
            // A zero deadline would fail an operation on a down connection
            // before its first attempt, and start the next one at once.
            op_timeout: targets.op_timeout.max(MIN_OP_TIMEOUT),
            attempt_timeout: Duration::from_millis(targets.attempt_timeout_ms),
            max_frame_bytes: targets.max_frame_bytes,
            clients,
            conns,
            timers: BinaryHeap::new(),
            idle: Vec::new(),
            next_request: 0,
            next_call_id: 1,
            active: 0,
            phase: Phase::Preload,
            next_sweep: now,
            rng: SplitMix64::new(run_nonce),
            scratch: Scratch {
                get: GetRequest {
                    header: header.clone(),
                    ..Default::default()
                },
                put: PutRequest {
                    header,
                    value: vec![b'x'; options.value_size_bytes.max(1)],
                    ..Default::default()
                },
                key: String::with_capacity(32),
                value_prefix: String::with_capacity(48),
                value_prefix_bytes: 0,
            },
            tally: Tally::default(),
            preload_error: None,
        }
    }

    /// How many connections the engine uses, over all nodes.
    pub(super) fn conn_count(&self) -> usize {
        self.conns.len()
    }

    /// Connections to each node: `conns_per_node` of the options, or more
    /// when the clients would exceed [`MAX_CLIENTS_PER_CONNECTION`].
    pub(super) fn conns_per_node(&self) -> usize {
        self.conns_per_node
    }

    /// The first write of the preload that failed, if one did.
    pub(super) fn preload_error(&self) -> Option<&str> {
        self.preload_error.as_deref()
    }

    pub(super) fn into_tally(self) -> Tally {
        self.tally
    }

    /// Starts a phase: closed-loop and preload clients start their first
    /// operation; open-loop clients wait for the schedule.
    pub(super) fn begin(&mut self, shared: &Shared, phase: Phase, now: Instant) {
        assert_eq!(self.active, 0, "a phase begins with every client idle");
        self.phase = phase;
        self.next_request = 0;
        self.idle.clear();
        for client in 0..self.clients.len() {
            match phase {
                Phase::OpenLoop { .. } => self.idle.push(client),
                Phase::Preload | Phase::ClosedLoop => self.start_next(shared, client, now),
            }
        }
        // Clients pop from the end: the lowest numbers go first.
        self.idle.reverse();
        self.next_sweep = now + SWEEP_INTERVAL;
        self.start_scheduled(shared, now);
    }

    /// Whether the phase is over: no operation runs and none will start.
    pub(super) fn finished(&self, shared: &Shared, now: Instant) -> bool {
        if self.active > 0 {
            return false;
        }
        match self.phase {
            Phase::OpenLoop { rate } => {
                now >= shared.end || shared.scheduled_at(rate, self.next_request) >= shared.end
            }
            Phase::Preload | Phase::ClosedLoop => true,
        }
    }

    /// When the engine next has something to do without any reply
    /// arriving: a retry, a scheduled request, or the next sweep.
    pub(super) fn next_wake(&self, shared: &Shared, now: Instant) -> Instant {
        let mut wake = self.next_sweep;
        if let Some(Reverse((at, _))) = self.timers.peek() {
            wake = wake.min(*at);
        }
        if let Phase::OpenLoop { rate } = self.phase {
            // Past the end nothing more is sent: waking for the schedule
            // then would only spin while the last replies come in.
            let due = shared.scheduled_at(rate, self.next_request);
            if !self.idle.is_empty() && now < shared.end && due < shared.end {
                wake = wake.min(due);
            }
        }
        wake
    }

    /// Retries that are due, open-loop requests that are due, and (every
    /// [`SWEEP_INTERVAL`]) attempts past their timeout. Returns the
    /// connections to break: silent too long, or too many calls on them.
    pub(super) fn on_tick(&mut self, shared: &Shared, now: Instant) -> Vec<usize> {
        while let Some(&Reverse((at, client))) = self.timers.peek() {
            if at > now {
                break;
            }
            self.timers.pop();
            let waiting = matches!(&self.clients[client].op, Some(op) if op.call.is_none());
            if waiting {
                self.send(shared, client, now);
            }
        }
        self.start_scheduled(shared, now);
        self.tally.flush_if_past(shared, now);
        if now < self.next_sweep {
            return Vec::new();
        }
        self.next_sweep = now + SWEEP_INTERVAL;
        self.sweep(shared, now)
    }

    /// Abandons attempts older than the attempt timeout (a late reply to
    /// one is dropped) and names the connections that look dead.
    fn sweep(&mut self, shared: &Shared, now: Instant) -> Vec<usize> {
        for client in 0..self.clients.len() {
            let late = match &self.clients[client].op {
                Some(Op {
                    call: Some(call), ..
                }) => now.duration_since(call.sent_at) >= self.attempt_timeout,
                _ => false,
            };
            if late {
                let error = format!(
                    "no reply within {} ms (attempt timeout)",
                    self.attempt_timeout.as_millis()
                );
                self.fail_attempt(shared, client, &error, now);
            }
        }
        (0..self.conns.len())
            .filter(|&index| {
                let conn = &self.conns[index];
                // A connection still opening has its own (connect) timeout.
                matches!(conn.link, Link::Up)
                    && !conn.calls.is_empty()
                    && (conn.calls.len() >= MAX_CALLS_PER_CONNECTION
                        || now.duration_since(conn.last_heard) >= self.attempt_timeout)
            })
            .collect()
    }

    /// The connection is open: its queued calls can go out.
    pub(super) fn on_link_up(&mut self, conn: usize, now: Instant) {
        self.conns[conn].link = Link::Up;
        self.conns[conn].last_heard = now;
    }

    /// The connection is being (re)opened: calls queue on it.
    pub(super) fn on_link_connecting(&mut self, conn: usize) {
        self.conns[conn].link = Link::Connecting;
    }

    /// The connection broke, or could not be opened. Every call on it
    /// fails; each of their clients retries as the clerk's rules say (or,
    /// when the node refused us, ends with the operation rejected).
    pub(super) fn on_link_down(
        &mut self,
        shared: &Shared,
        conn: usize,
        error: &str,
        broken: Broken,
        now: Instant,
    ) {
        let state = &mut self.conns[conn];
        state.link = match broken {
            Broken::Reopening => Link::Connecting,
            Broken::Down => Link::Down(error.to_string()),
            Broken::Refused => Link::Refused(error.to_string()),
        };
        state.out.clear();
        let calls: Vec<(u64, usize)> = state.calls.drain().collect();
        for (call_id, client) in calls {
            let current = self.clients[client]
                .op
                .as_ref()
                .and_then(|op| op.call)
                .is_some_and(|call| call.conn == conn && call.call_id == call_id);
            if !current {
                continue;
            }
            if broken == Broken::Refused {
                self.refused(shared, client, error, now);
            } else {
                self.fail_attempt(shared, client, error, now);
            }
        }
    }

    /// The output buffer of a connection, for [`Io`] to write.
    fn output(&mut self, conn: usize) -> &mut Vec<u8> {
        &mut self.conns[conn].out
    }

    /// Handles one reply frame read from `conn`. An error means the
    /// connection carries something other than replies to our calls.
    pub(super) fn on_reply(
        &mut self,
        shared: &Shared,
        conn: usize,
        frame_bytes: &[u8],
        now: Instant,
    ) -> Result<(), String> {
        let frame = decode_frame(frame_bytes).map_err(|e| e.to_string())?;
        if frame.header.kind != FrameKind::Response {
            return Err("the server sent a request frame".to_string());
        }
        let call_id = frame.header.call_id;
        let state = &mut self.conns[conn];
        let client = state
            .calls
            .remove(&call_id)
            .ok_or_else(|| format!("reply to call {call_id}, which is not in flight"))?;
        state.last_heard = now;
        let Some(op) = self.clients[client].op.as_mut() else {
            return Ok(());
        };
        if op.call.map(|call| call.call_id) != Some(call_id) {
            // A reply to an attempt abandoned after its timeout.
            return Ok(());
        }
        op.call = None;
        let (is_read, opening) = (op.is_read, op.opening);
        // The history's output, built only for recorded operations.
        let recorded = op.record.is_some();
        if frame.header.code != RpcCode::Ok {
            let error = format!(
                "rpc failed on the server ({}): {}",
                frame.header.code, frame.error_text
            );
            self.fail_attempt(shared, client, &error, now);
            return Ok(());
        }
        if opening {
            let decoded = OpenSessionReply::parse_from_bytes(frame.body);
            match decoded {
                Ok(mut reply) => {
                    let step = self.judge(client, Ok(reply.header.as_ref()), now);
                    if matches!(step, NextStep::Done) {
                        let session = (reply.client_id, reply.session_secret);
                        self.session_opened(shared, client, session, now);
                    } else {
                        reply.header.take();
                        self.take_step(shared, client, step, None, now);
                    }
                }
                Err(e) => {
                    let error = format!("reply cannot be decoded: {e}");
                    self.fail_attempt(shared, client, &error, now);
                }
            }
            return Ok(());
        }
        let decoded = if is_read {
            GetReply::parse_from_bytes(frame.body).map(|mut reply| {
                let output = recorded.then(|| KvOutput::Get {
                    value: reply
                        .found
                        .then(|| String::from_utf8_lossy(&reply.value).into_owned()),
                });
                (reply.header.take(), output)
            })
        } else {
            PutReply::parse_from_bytes(frame.body)
                .map(|mut reply| (reply.header.take(), recorded.then_some(KvOutput::Put)))
        };
        match decoded {
            Ok((header, output)) => {
                let step = self.judge(client, Ok(header.as_ref()), now);
                self.take_step(shared, client, step, output, now);
            }
            Err(e) => {
                let error = format!("reply cannot be decoded: {e}");
                self.fail_attempt(shared, client, &error, now);
            }
        }
        Ok(())
    }

    /// The clerk's verdict on the attempt of `client` that just ended.
    fn judge(
        &mut self,
        client: usize,
        answer: Result<Option<&ReplyHeader>, &dyn fmt::Display>,
        now: Instant,
    ) -> NextStep {
        let state = &mut self.clients[client];
        let op = state.op.as_mut().expect("judged clients run an operation");
        op.attempts
            .judge(&mut state.route, &self.node_ids, answer, now, &mut self.rng)
    }

    /// The client's session is open: its write starts now (as a new operation due when the
    /// write was).
    fn session_opened(
        &mut self,
        shared: &Shared,
        client: usize,
        session: (u64, u64),
        now: Instant,
    ) {
        let state = &mut self.clients[client];
        let op = state
            .op
            .take()
            .expect("an opening client runs an operation");
        self.active -= 1;
        if session.0 == 0 {
            let error = "the cluster opened a session without an id".to_string();
            state.op = Some(op);
            self.active += 1;
            return self.stop(shared, client, error, now);
        }
        state.session = Some(session);
        state.last_seq = 0;
        self.start_op(shared, client, op.key, false, op.scheduled, now);
    }

    /// The attempt in flight (or about to be sent) failed without a reply.
    fn fail_attempt(&mut self, shared: &Shared, client: usize, error: &str, now: Instant) {
        if let Some(op) = self.clients[client].op.as_mut() {
            op.call = None;
        }
        let step = self.judge(client, Err(&error), now);
        self.take_step(shared, client, step, None, now);
    }

    fn take_step(
        &mut self,
        shared: &Shared,
        client: usize,
        step: NextStep,
        output: Option<KvOutput>,
        now: Instant,
    ) {
        match step {
            NextStep::Done => self.finish(shared, client, Ok(output), now),
            NextStep::Fail(error) => self.finish(shared, client, Err(error), now),
            NextStep::SessionLost(unknown) => {
                // The next write opens a new session. This one ends: as unknown when an
                // earlier attempt may have applied it, else as failed (nothing applied).
                self.clients[client].session = None;
                let error = unknown.unwrap_or_else(|| {
                    ClerkError::Rejected("the session expired; nothing was applied".to_string())
                });
                self.finish(shared, client, Err(error), now)
            }
            NextStep::Retry { wait, busy } => {
                let op = self.clients[client]
                    .op
                    .as_mut()
                    .expect("retried clients run an operation");
                op.busy += u64::from(busy);
                if wait.is_zero() {
                    self.send(shared, client, now);
                } else {
                    self.timers.push(Reverse((now + wait, client)));
                }
            }
        }
    }

    /// Sends the client's request to the node its route names, on the
    /// client's connection to that node. A connection that is down fails
    /// the attempt at once (the clerk's connect failure).
    fn send(&mut self, shared: &Shared, client: usize, now: Instant) {
        let node = self.clients[client].route.current();
        let conn = node * self.conns_per_node + client % self.conns_per_node;
        match &self.conns[conn].link {
            Link::Down(error) => {
                let error = format!("not connected: {error}");
                return self.fail_attempt(shared, client, &error, now);
            }
            Link::Refused(error) => {
                let error = error.clone();
                return self.refused(shared, client, &error, now);
            }
            Link::Connecting | Link::Up => {}
        }
        let call_id = self.next_call_id;
        self.next_call_id += 1;
        let method_id = match self.clients[client].op.as_ref() {
            Some(op) if op.opening => kv_store::OPEN_SESSION,
            Some(op) if op.is_read => kv_store::GET,
            _ => kv_store::PUT,
        };
        let state = &mut self.conns[conn];
        let framed = push_frame(
            &mut state.out,
            method_id,
            call_id,
            &self.clients[client].request,
            self.max_frame_bytes,
        );
        if let Err(error) = framed {
            let error = format!("request cannot be sent: {error}");
            return self.stop(shared, client, error, now);
        }
        if state.calls.is_empty() {
            state.last_heard = now;
        }
        state.calls.insert(call_id, client);
        let op = self.clients[client]
            .op
            .as_mut()
            .expect("sent clients run an operation");
        op.call = Some(Call {
            conn,
            call_id,
            sent_at: now,
        });
    }

    /// Starts the client's next operation in a closed loop or a preload,
    /// unless the phase is over for it.
    fn start_next(&mut self, shared: &Shared, client: usize, now: Instant) {
        match self.phase {
            Phase::Preload => {
                let key = self.clients[client].preload_next;
                if key < self.keys && self.preload_error.is_none() && now < shared.end {
                    self.clients[client].preload_next += self.clients.len() as u64;
                    self.start_op(shared, client, key, false, now, now);
                }
            }
            Phase::ClosedLoop => {
                if now < shared.end {
                    self.start_chosen(shared, client, now, now);
                }
            }
            Phase::OpenLoop { .. } => {
                self.idle.push(client);
                self.start_scheduled(shared, now);
            }
        }
    }

    /// Hands every open-loop request that is due to an idle client.
    fn start_scheduled(&mut self, shared: &Shared, now: Instant) {
        let Phase::OpenLoop { rate } = self.phase else {
            return;
        };
        // A request due before the end that no client could start in time
        // is counted as unsent, not sent late.
        if now >= shared.end {
            return;
        }
        loop {
            let due = shared.scheduled_at(rate, self.next_request);
            if due > now || due >= shared.end {
                break;
            }
            let Some(client) = self.idle.pop() else {
                break;
            };
            self.next_request += 1;
            self.start_chosen(shared, client, due, now);
        }
    }

    /// Starts an operation on a key and kind chosen by the client's rng.
    fn start_chosen(&mut self, shared: &Shared, client: usize, scheduled: Instant, now: Instant) {
        let rng = &mut self.clients[client].rng;
        let key = rng.range(0, self.keys);
        let is_read = rng.range(0, 1_000_000) < self.read_threshold;
        self.start_op(shared, client, key, is_read, scheduled, now);
    }

    /// Encodes the get or put of key number `key` and sends it.
    fn start_op(
        &mut self,
        shared: &Shared,
        client: usize,
        key: u64,
        is_read: bool,
        scheduled: Instant,
        now: Instant,
    ) {
        let scratch = &mut self.scratch;
        let state = &mut self.clients[client];
        state.started += 1;
        scratch.key.clear();
        let _ = write!(scratch.key, "key{key:08}");
        if self.check {
            // A key of this run only: the history then starts from absent
            // keys whatever earlier runs left in the cluster.
            let _ = write!(scratch.key, "-{:08x}", self.run_nonce as u32);
        }
        let recorded = self.check && key.is_multiple_of(check_stride(self.keys));
        state.request.clear();
        let opening = !is_read && state.session.is_none();
        let (encoded, input) = if opening {
            // The write's session first; the write starts when it is open.
            let message = OpenSessionRequest {
                header: scratch.get.header.clone(),
                ..Default::default()
            };
            (message.write_to_vec(&mut state.request), None)
        } else if is_read {
            let message = &mut scratch.get;
            // Reads need no session; the id (when there is one) names the client in logs.
            let client_id = state.session.map_or(0, |(id, _)| id);
            set_header(&mut message.header, (client_id, 0), 0);
            message.key.clear();
            message.key.extend_from_slice(scratch.key.as_bytes());
            let input = recorded.then(|| KvInput::Get {
                key: scratch.key.clone(),
            });
            (message.write_to_vec(&mut state.request), input)
        } else {
            state.last_seq += 1;
            let message = &mut scratch.put;
            let session = state.session.expect("a write runs in a session");
            set_header(&mut message.header, session, state.last_seq);
            message.key.clear();
            message.key.extend_from_slice(scratch.key.as_bytes());
            // A value unique to (run, client, operation): a put is then
            // identifiable in the history by its value.
            let value = &mut message.value;
            let stale = scratch.value_prefix_bytes.min(value.len());
            value[..stale].fill(b'x');
            let prefix = &mut scratch.value_prefix;
            prefix.clear();
            let _ = write!(
                prefix,
                "v{:08x}-{client}-{}-",
                self.run_nonce as u32, state.started
            );
            let n = prefix.len().min(value.len());
            value[..n].copy_from_slice(&prefix.as_bytes()[..n]);
            scratch.value_prefix_bytes = n;
            if self.random_values {
                fill_random_alphanumeric(&mut value[n..], &mut state.rng);
            }
            let input = recorded.then(|| KvInput::Put {
                key: scratch.key.clone(),
                value: String::from_utf8_lossy(value).into_owned(),
            });
            (message.write_to_vec(&mut state.request), input)
        };
        let invoked_us = || shared.history_origin.elapsed().as_micros() as u64;
        state.op = Some(Op {
            key,
            is_read,
            opening,
            scheduled,
            // A write's refusal after an attempt that may have applied it is
            // an unknown outcome, not a rejection (the clerk's rule).
            attempts: if is_read || opening {
                Attempts::new(now + self.op_timeout)
            } else {
                Attempts::for_write(now + self.op_timeout)
            },
            busy: 0,
            call: None,
            record: input.map(|input| (input, invoked_us())),
        });
        self.active += 1;
        match encoded {
            Ok(()) => self.send(shared, client, now),
            Err(e) => self.stop(
                shared,
                client,
                format!("request cannot be encoded: {e}"),
                now,
            ),
        }
    }

    /// The client's node refused our handshake: as a clerk does, the
    /// operation ends rejected, and so does the client's part in the phase.
    fn refused(&mut self, shared: &Shared, client: usize, error: &str, now: Instant) {
        let node = self.node_ids[self.clients[client].route.current()];
        self.stop(shared, client, format!("node {node}: {error}"), now);
    }

    /// Ends the client's operation as rejected, and the client's part in
    /// this phase: a request that cannot be encoded or framed never can (nor
    /// one to a node that refused us), and retrying it at once would never
    /// end.
    fn stop(&mut self, shared: &Shared, client: usize, error: String, now: Instant) {
        self.end_op(shared, client, Err(ClerkError::Rejected(error)), now);
    }

    /// Ends the client's operation and starts its next one.
    fn finish(
        &mut self,
        shared: &Shared,
        client: usize,
        result: Result<Option<KvOutput>, ClerkError>,
        now: Instant,
    ) {
        self.end_op(shared, client, result, now);
        self.start_next(shared, client, now);
    }

    /// Counts the client's operation and records it for the check.
    fn end_op(
        &mut self,
        shared: &Shared,
        client: usize,
        result: Result<Option<KvOutput>, ClerkError>,
        now: Instant,
    ) {
        let state = &mut self.clients[client];
        let op = state.op.take().expect("finished clients ran an operation");
        self.active -= 1;
        if let Some((input, call_us)) = op.record {
            // The logical client is sequential: its next call must be
            // stamped after this return (several clients share a
            // connection, but each has one operation in flight).
            let return_us = result
                .is_ok()
                .then(|| crate::check::return_stamp_us(shared.history_origin));
            let output = result.as_ref().ok().cloned().flatten();
            let operation = Operation {
                client_id: state.history_id,
                input,
                call_us,
                output,
                return_us,
            };
            self.tally.record(shared, operation);
        }
        if self.phase == Phase::Preload {
            match &result {
                Ok(_) => {
                    shared.preload_written.fetch_add(1, Ordering::Relaxed);
                }
                Err(error) => {
                    shared.preload_failed.fetch_add(1, Ordering::Relaxed);
                    if self.preload_error.is_none() {
                        self.preload_error = Some(format!("writing key{:08}: {error}", op.key));
                    }
                }
            }
        } else {
            self.tally.finish(
                shared,
                Finished {
                    scheduled: op.scheduled,
                    finished: now,
                    is_read: op.is_read,
                    busy: op.busy,
                    result: result.map(drop),
                },
            );
        }
    }
}

/// Sets the session fields of a reused request header: `(client_id, secret)`, `seq`.
fn set_header(
    header: &mut protobuf::MessageField<RequestHeader>,
    (client_id, secret): (u64, u64),
    seq: u64,
) {
    let header = header.mut_or_insert_default();
    header.client_id = client_id;
    header.session_secret = secret;
    header.seq = seq;
}

/// Appends one request frame (KVStore method `method_id`, message `body`)
/// to `out`; leaves `out` as it was when the frame is too large.
fn push_frame(
    out: &mut Vec<u8>,
    method_id: u32,
    call_id: u64,
    body: &[u8],
    max_frame_bytes: usize,
) -> Result<(), crate::rpc::frame::FrameError> {
    let start = out.len();
    out.resize(start + LENGTH_PREFIX_BYTES + HEADER_BYTES, 0);
    out.extend_from_slice(body);
    let header = FrameHeader::request(kv_store::SERVICE_ID, method_id, call_id);
    finish_frame(&mut out[start..], &header, max_frame_bytes).inspect_err(|_| out.truncate(start))
}

/// What a connection looks like to the event loop.
enum Socket {
    /// A connect request is with the connector thread.
    Connecting,
    Open {
        stream: TcpStream,
        input: Input,
    },
    /// Waiting until `retry_at` to be opened again.
    Closed {
        retry_at: Instant,
    },
}

/// Reply bytes read from a connection and not yet handled as whole frames.
/// The buffer is zeroed once and reused, not zeroed again for every read.
struct Input {
    /// `bytes[..filled]` holds the bytes; the rest is room for the next read.
    bytes: Vec<u8>,
    filled: usize,
}

impl Input {
    fn new() -> Input {
        Input {
            bytes: vec![0; READ_CHUNK_BYTES],
            filled: 0,
        }
    }

    /// The room for the next read. A full buffer holds part of a frame
    /// larger than itself (whose length was checked against
    /// `max_frame_bytes` when its prefix arrived): it grows, up to one frame.
    fn spare(&mut self, max_frame_bytes: usize) -> &mut [u8] {
        if self.filled == self.bytes.len() {
            let grown = (self.bytes.len() * 2).min(LENGTH_PREFIX_BYTES + max_frame_bytes);
            self.bytes.resize(grown.max(self.filled + 1), 0);
        }
        &mut self.bytes[self.filled..]
    }

    /// Drops the first `used` bytes (whole frames, handled).
    fn consume(&mut self, used: usize) {
        self.bytes.copy_within(used..self.filled, 0);
        self.filled -= used;
        if self.filled == 0 && self.bytes.len() > RETAINED_INPUT_BYTES {
            self.bytes = vec![0; READ_CHUNK_BYTES];
        }
    }
}

/// The sockets of the engine's connections and the connector thread that
/// opens them. See the module documentation.
pub(super) struct Io {
    addrs: Vec<SocketAddr>,
    max_frame_bytes: usize,
    connect_timeout: Duration,
    sockets: Vec<Socket>,
    /// The poll set, rebuilt (not reallocated) on every wait: the wake
    /// socket, then the open connections named in `polled`.
    fds: Vec<libc::pollfd>,
    polled: Vec<usize>,
    /// Connect requests: (connection, address). Bounded by the number of
    /// connections, since each has at most one request out.
    connect_tx: Option<crossbeam_channel::Sender<(usize, SocketAddr)>>,
    connected_rx: crossbeam_channel::Receiver<(usize, Result<TcpStream, ConnectError>)>,
    /// Readable when the connector has delivered a result.
    wake: UnixStream,
    connector: Option<JoinHandle<()>>,
}

impl Io {
    /// Starts the connector thread; connections open on the first phase.
    pub(super) fn connect(targets: &Targets, conn_count: usize) -> io::Result<Io> {
        let per_node = conn_count / targets.nodes.len();
        let addrs = (0..conn_count)
            .map(|conn| targets.nodes[conn / per_node].1)
            .collect();
        let (connect_tx, connect_rx) = crossbeam_channel::bounded(conn_count);
        let (connected_tx, connected_rx) = crossbeam_channel::bounded(conn_count);
        let (wake, wake_tx) = UnixStream::pair()?;
        wake.set_nonblocking(true)?;
        let timeout = Duration::from_millis(targets.attempt_timeout_ms.max(1));
        let credentials = targets.credentials.clone();
        let connector = std::thread::Builder::new()
            .name("loadgen-connect".to_string())
            .spawn(move || connector(connect_rx, connected_tx, wake_tx, &credentials, timeout))?;
        Ok(Io {
            addrs,
            max_frame_bytes: targets.max_frame_bytes,
            connect_timeout: timeout,
            fds: Vec::with_capacity(conn_count + 1),
            polled: Vec::with_capacity(conn_count),
            sockets: (0..conn_count)
                .map(|_| Socket::Closed {
                    retry_at: Instant::now(),
                })
                .collect(),
            connect_tx: Some(connect_tx),
            connected_rx,
            wake,
            connector: Some(connector),
        })
    }

    /// Asks the connector to open every closed connection whose retry time
    /// has come.
    fn open_due(&mut self, engine: &mut Engine, now: Instant) {
        for conn in 0..self.sockets.len() {
            if matches!(self.sockets[conn], Socket::Closed { retry_at } if retry_at <= now) {
                let sender = self.connect_tx.as_ref().expect("the connector runs");
                // Never full: each connection has at most one request out.
                if sender.try_send((conn, self.addrs[conn])).is_ok() {
                    self.sockets[conn] = Socket::Connecting;
                    engine.on_link_connecting(conn);
                }
            }
        }
    }

    /// Takes the connector's results.
    fn take_connected(&mut self, engine: &mut Engine, shared: &Shared, now: Instant) {
        let mut drained = [0u8; 64];
        while matches!(self.wake.read(&mut drained), Ok(n) if n > 0) {}
        while let Ok((conn, result)) = self.connected_rx.try_recv() {
            match result {
                Ok(stream) => {
                    self.sockets[conn] = Socket::Open {
                        stream,
                        input: Input::new(),
                    };
                    engine.on_link_up(conn, now);
                }
                Err(failure) => {
                    self.sockets[conn] = Socket::Closed {
                        retry_at: now + RECONNECT_DELAY,
                    };
                    let addr = self.addrs[conn];
                    let (error, broken) = if failure.refused {
                        let error = format!("peer {addr} refused us: {}", failure.message);
                        (error, Broken::Refused)
                    } else {
                        let error = format!("connecting to {addr}: {}", failure.message);
                        (error, Broken::Down)
                    };
                    engine.on_link_down(shared, conn, &error, broken, now);
                }
            }
        }
    }

    /// Closes a connection that broke; it is opened again at once, and its
    /// calls are failed (their clients retry).
    fn break_conn(&mut self, engine: &mut Engine, shared: &Shared, conn: usize, error: &str) {
        if !matches!(self.sockets[conn], Socket::Open { .. }) {
            return;
        }
        let now = Instant::now();
        let error = format!("connection to {} broke: {error}", self.addrs[conn]);
        self.sockets[conn] = Socket::Closed { retry_at: now };
        engine.on_link_down(shared, conn, &error, Broken::Reopening, now);
    }

    /// Writes what every open connection has to send, as far as the socket
    /// takes it now.
    fn write_all_ready(&mut self, engine: &mut Engine, shared: &Shared) {
        for conn in 0..self.sockets.len() {
            let Socket::Open { stream, .. } = &mut self.sockets[conn] else {
                continue;
            };
            let out = engine.output(conn);
            if out.is_empty() {
                continue;
            }
            match write_some(stream, out) {
                Ok(()) if out.len() > MAX_OUTPUT_BYTES => {
                    let error = format!("{} bytes wait to be written", out.len());
                    self.break_conn(engine, shared, conn, &error);
                }
                Ok(()) => {}
                Err(e) => self.break_conn(engine, shared, conn, &format!("writing: {e}")),
            }
        }
    }

    /// Reads every reply that has arrived on `conn` and hands each to the
    /// engine.
    fn read_ready(&mut self, engine: &mut Engine, shared: &Shared, conn: usize) {
        let Socket::Open { stream, input } = &mut self.sockets[conn] else {
            return;
        };
        let max_frame_bytes = self.max_frame_bytes;
        let failure = loop {
            let read = stream.read(input.spare(max_frame_bytes));
            let now = Instant::now();
            match read {
                Ok(0) => break Some("closed by the server".to_string()),
                Ok(n) => {
                    input.filled += n;
                    let taken = take_frames(
                        engine,
                        shared,
                        conn,
                        &input.bytes[..input.filled],
                        max_frame_bytes,
                        now,
                    );
                    match taken {
                        Ok(used) => input.consume(used),
                        Err(e) => break Some(e),
                    }
                }
                Err(e) => {
                    if e.kind() == io::ErrorKind::WouldBlock {
                        break None;
                    }
                    if e.kind() != io::ErrorKind::Interrupted {
                        break Some(format!("reading: {e}"));
                    }
                }
            }
        };
        if let Some(error) = failure {
            self.break_conn(engine, shared, conn, &error);
        }
    }

    /// Waits until a socket is ready or `until`, then handles whatever is
    /// ready.
    fn poll(&mut self, engine: &mut Engine, shared: &Shared, until: Instant) {
        let (fds, polled) = (&mut self.fds, &mut self.polled);
        fds.clear();
        polled.clear();
        fds.push(libc::pollfd {
            fd: self.wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        });
        for (conn, socket) in self.sockets.iter().enumerate() {
            if let Socket::Open { stream, .. } = socket {
                let mut events = libc::POLLIN;
                if !engine.conns[conn].out.is_empty() {
                    events |= libc::POLLOUT;
                }
                fds.push(libc::pollfd {
                    fd: stream.as_raw_fd(),
                    events,
                    revents: 0,
                });
                polled.push(conn);
            }
        }
        let wait = until.saturating_duration_since(Instant::now());
        let timeout = libc::timespec {
            tv_sec: wait.as_secs() as libc::time_t,
            tv_nsec: wait.subsec_nanos() as libc::c_long,
        };
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd structs that
        // outlives the call; the timeout is a valid timespec; no signal mask.
        let ready = unsafe {
            libc::ppoll(
                fds.as_mut_ptr(),
                fds.len() as libc::nfds_t,
                &timeout,
                std::ptr::null(),
            )
        };
        if ready < 0 {
            let error = io::Error::last_os_error();
            if error.kind() != io::ErrorKind::Interrupted {
                // Cannot happen with a valid poll set; wait rather than spin.
                log::warn!("loadgen: ppoll failed: {error}");
                std::thread::sleep(wait.min(SWEEP_INTERVAL));
            }
            return;
        }
        if ready == 0 {
            return;
        }
        for index in 1..self.fds.len() {
            if self.fds[index].revents != 0 {
                self.read_ready(engine, shared, self.polled[index - 1]);
            }
        }
        if self.fds[0].revents != 0 {
            self.take_connected(engine, shared, Instant::now());
        }
    }

    /// When a closed connection is next due to be opened.
    fn next_reopen(&self) -> Option<Instant> {
        self.sockets
            .iter()
            .filter_map(|socket| match socket {
                Socket::Closed { retry_at } => Some(*retry_at),
                _ => None,
            })
            .min()
    }

    /// Waits until no connect request is out: every connection is open or
    /// failed to open. Bounded by the connect timeout (and some slack).
    fn settle(&mut self, engine: &mut Engine, shared: &Shared) {
        let give_up = Instant::now() + self.connect_timeout + SETTLE_SLACK;
        while Instant::now() < give_up
            && self
                .sockets
                .iter()
                .any(|socket| matches!(socket, Socket::Connecting))
        {
            self.poll(engine, shared, Instant::now() + SWEEP_INTERVAL);
        }
    }
}

impl Drop for Io {
    fn drop(&mut self) {
        // Closing the request channel ends the connector after its current
        // connect, which the connect timeout bounds.
        self.connect_tx = None;
        if let Some(connector) = self.connector.take() {
            let _ = connector.join();
        }
    }
}

/// Why a connection could not be opened.
struct ConnectError {
    message: String,
    /// The node refused our handshake (retrying cannot help).
    refused: bool,
}

/// Connects to `addr` and runs the handshake (each within `timeout`); the
/// stream comes back non-blocking, with no delay.
fn open(
    addr: SocketAddr,
    credentials: &Credentials,
    timeout: Duration,
) -> Result<TcpStream, ConnectError> {
    let failed = |message: String| ConnectError {
        message,
        refused: false,
    };
    let stream = TcpStream::connect_timeout(&addr, timeout).map_err(|e| failed(e.to_string()))?;
    stream
        .set_nodelay(true)
        .map_err(|e| failed(e.to_string()))?;
    let timeout_ms = timeout.as_millis() as u64;
    handshake::connect(&stream, credentials, timeout_ms).map_err(|e| ConnectError {
        refused: matches!(e, HandshakeError::Refused { .. }),
        message: e.to_string(),
    })?;
    stream
        .set_nonblocking(true)
        .map_err(|e| failed(e.to_string()))?;
    Ok(stream)
}

/// The connector thread: opens connections on request and wakes the event
/// loop with each result.
fn connector(
    requests: crossbeam_channel::Receiver<(usize, SocketAddr)>,
    results: crossbeam_channel::Sender<(usize, Result<TcpStream, ConnectError>)>,
    mut wake: UnixStream,
    credentials: &Credentials,
    timeout: Duration,
) {
    for (conn, addr) in requests {
        let result = open(addr, credentials, timeout);
        if results.send((conn, result)).is_err() {
            return;
        }
        // A full wake socket already has a wake-up pending.
        let _ = wake.write(&[1]);
    }
}

/// Writes as much of `out` as the socket takes without blocking and drops
/// what was written.
fn write_some(stream: &mut TcpStream, out: &mut Vec<u8>) -> io::Result<()> {
    let mut written = 0;
    while written < out.len() {
        match stream.write(&out[written..]) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "wrote 0 bytes")),
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    out.drain(..written);
    Ok(())
}

/// Hands every whole frame at the front of `input` to the engine; returns
/// how many bytes they took. Fails on a frame that breaks the protocol.
fn take_frames(
    engine: &mut Engine,
    shared: &Shared,
    conn: usize,
    input: &[u8],
    max_frame_bytes: usize,
    now: Instant,
) -> Result<usize, String> {
    let mut at = 0;
    while input.len() - at >= LENGTH_PREFIX_BYTES {
        let prefix: [u8; LENGTH_PREFIX_BYTES] = input[at..at + LENGTH_PREFIX_BYTES]
            .try_into()
            .expect("a 4-byte slice");
        let frame_bytes = u32::from_be_bytes(prefix) as usize;
        if frame_bytes > max_frame_bytes || frame_bytes < HEADER_BYTES {
            return Err(format!(
                "a reply frame announces {frame_bytes} bytes (must be {HEADER_BYTES} to \
                 {max_frame_bytes})"
            ));
        }
        let end = at + LENGTH_PREFIX_BYTES + frame_bytes;
        if input.len() < end {
            break;
        }
        engine.on_reply(shared, conn, &input[at + LENGTH_PREFIX_BYTES..end], now)?;
        at = end;
    }
    Ok(at)
}

/// Runs one phase to its end: every operation started in it has ended.
pub(super) fn run_phase(engine: &mut Engine, io: &mut Io, shared: &Shared, phase: Phase) {
    let now = Instant::now();
    io.open_due(engine, now);
    io.settle(engine, shared);
    engine.begin(shared, phase, Instant::now());
    // Bounded: every operation ends by its deadline, and no new one starts
    // after the end of the run (the preload has a fixed number of keys).
    let hard_stop = Instant::now() + Duration::from_secs(MAX_RUN_SECS);
    loop {
        io.write_all_ready(engine, shared);
        let now = Instant::now();
        if engine.finished(shared, now) || now >= hard_stop {
            break;
        }
        io.open_due(engine, now);
        let mut until = engine.next_wake(shared, now);
        if let Some(reopen) = io.next_reopen() {
            until = until.min(reopen);
        }
        io.poll(engine, shared, until);
        let now = Instant::now();
        for conn in engine.on_tick(shared, now) {
            io.break_conn(engine, shared, conn, "no reply within the attempt timeout");
        }
    }
}

/// Client `index`'s own random stream. SplitMix64 walks one fixed sequence
/// (its state only adds a constant per draw), so seeds that differ by
/// multiples of that constant give the same stream shifted: client `i` would
/// draw client 0's numbers `i` draws later, and random values of neighbouring
/// keys would share their tails. The seed is therefore one SplitMix64 output
/// (a mixed hash of the run's seed and the index), a point of the sequence
/// unrelated to the other clients'.
fn client_rng(seed: u64, index: usize) -> SplitMix64 {
    SplitMix64::new(SplitMix64::new(seed ^ (index as u64).rotate_left(32)).next_u64())
}

/// Fills `bytes` with letters and digits drawn from `rng`: 62 symbols, about
/// 5.95 bits of entropy a byte, which LZ4 cannot shrink (it removes repeats of
/// four bytes or more and codes nothing else).
fn fill_random_alphanumeric(bytes: &mut [u8], rng: &mut SplitMix64) {
    const SYMBOLS: &[u8; 62] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    for chunk in bytes.chunks_mut(8) {
        let mut draw = rng.next_u64();
        for byte in chunk {
            // Eight symbols from one draw: 8 bits each, reduced mod 62 (a
            // slight bias toward the first symbols, irrelevant here).
            *byte = SYMBOLS[(draw & 0xff) as usize % SYMBOLS.len()];
            draw >>= 8;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::kvstore::ErrorCode;
    use crate::rpc::frame::encode_frame;
    use parking_lot::Mutex;
    use std::collections::HashSet;
    use std::sync::Arc;

    /// One request frame the engine wrote.
    struct Sent {
        call_id: u64,
        client_id: u64,
        seq: u64,
        key: String,
    }

    fn options(clients: usize, read_ratio: f64, check: bool) -> LoadOptions {
        LoadOptions {
            clients,
            conns_per_node: 1,
            duration: Duration::from_secs(3600),
            warmup: Duration::ZERO,
            value_size_bytes: 16,
            random_values: false,
            keys: 1,
            read_ratio,
            rate: None,
            preload: false,
            preload_clients: 1,
            preload_timeout: Duration::from_secs(60),
            preload_only: false,
            check,
            max_checked_ops: 1000,
            seed: 7,
        }
    }

    fn targets(nodes: u64, op_timeout: Duration) -> Targets {
        Targets {
            nodes: (1..=nodes)
                .map(|id| (id, SocketAddr::from(([127, 0, 0, 1], 1))))
                .collect(),
            credentials: Credentials::default(),
            client_token: None,
            max_frame_bytes: 1 << 20,
            op_timeout,
            attempt_timeout_ms: 60_000,
        }
    }

    /// Takes the request frames queued on `conn`.
    fn sent(engine: &mut Engine, conn: usize) -> Vec<Sent> {
        let out = std::mem::take(engine.output(conn));
        let mut frames = Vec::new();
        let mut at = 0;
        while at < out.len() {
            let len = u32::from_be_bytes(out[at..at + 4].try_into().unwrap()) as usize;
            let frame = decode_frame(&out[at + 4..at + 4 + len]).unwrap();
            let (header, key) = if frame.header.method_id == kv_store::GET {
                let request = GetRequest::parse_from_bytes(frame.body).unwrap();
                (request.header.unwrap(), request.key)
            } else {
                let request = PutRequest::parse_from_bytes(frame.body).unwrap();
                (request.header.unwrap(), request.key)
            };
            frames.push(Sent {
                call_id: frame.header.call_id,
                client_id: header.client_id,
                seq: header.seq,
                key: String::from_utf8(key).unwrap(),
            });
            at += 4 + len;
        }
        frames
    }

    /// The reply frame (without its length prefix) to a get, whose value
    /// names the call it answers.
    fn get_reply(call_id: u64, code: ErrorCode) -> Vec<u8> {
        let reply = GetReply {
            header: protobuf::MessageField::some(ReplyHeader {
                error: code.into(),
                ..Default::default()
            }),
            found: true,
            value: format!("for-call-{call_id}").into_bytes(),
            ..Default::default()
        };
        frame(call_id, &reply.write_to_bytes().unwrap())
    }

    fn frame(call_id: u64, body: &[u8]) -> Vec<u8> {
        let header = FrameHeader::response_to(
            &FrameHeader::request(kv_store::SERVICE_ID, kv_store::GET, call_id),
            RpcCode::Ok,
        );
        let mut out = Vec::new();
        encode_frame(&mut out, &header, "", body, 1 << 20).unwrap();
        out.split_off(LENGTH_PREFIX_BYTES)
    }

    fn shared(options: &LoadOptions) -> Shared<'_> {
        super::super::new_shared(options, Instant::now())
    }

    /// An engine with every connection up, its clients in a closed loop.
    /// Each client already has a session (`index + 1`, secret 0; the same
    /// id in the history): the opening of sessions has a test of its own.
    fn started(options: &LoadOptions, targets: &Targets, shared: &Shared) -> (Engine, Instant) {
        let mut engine = Engine::new(options, targets, 1);
        for (index, client) in engine.clients.iter_mut().enumerate() {
            client.session = Some((index as u64 + 1, 0));
            client.history_id = index as u64 + 1;
        }
        let now = Instant::now();
        for conn in 0..engine.conn_count() {
            engine.on_link_up(conn, now);
        }
        engine.begin(shared, Phase::ClosedLoop, now);
        (engine, now)
    }

    /// A client's first write opens its session first (one OpenSession call),
    /// then goes out under it; reads need no session.
    #[test]
    fn clients_draw_unrelated_random_streams() {
        // 64 clients' first 64 draws: with streams that are shifts of one
        // another, most draws would appear in several clients' streams.
        let mut seen = std::collections::HashSet::new();
        for index in 0..64 {
            let mut rng = client_rng(7, index);
            for _ in 0..64 {
                assert!(
                    seen.insert(rng.next_u64()),
                    "client {index} drew a number another client drew"
                );
            }
        }
    }

    #[test]
    fn random_values_are_letters_and_digits_that_lz4_cannot_shrink() {
        let mut rng = SplitMix64::new(11);
        let mut value = vec![b'x'; 64 << 10];
        fill_random_alphanumeric(&mut value[5..], &mut rng);
        assert!(value[..5].iter().all(|&b| b == b'x'), "the prefix is kept");
        assert!(value.iter().all(u8::is_ascii_alphanumeric));
        let distinct = value.iter().collect::<std::collections::HashSet<_>>().len();
        assert_eq!(distinct, 62, "every symbol is drawn");
        let packed = lz4_flex::block::compress(&value);
        assert!(
            packed.len() >= value.len() * 95 / 100,
            "random values shrank under LZ4 from {} to {} bytes",
            value.len(),
            packed.len()
        );
    }

    #[test]
    fn the_first_write_opens_a_session_and_then_carries_it() {
        let options = options(1, 0.0, false);
        let targets = targets(1, Duration::from_secs(60));
        let shared = shared(&options);
        let mut engine = Engine::new(&options, &targets, 1);
        let now = Instant::now();
        engine.on_link_up(0, now);
        engine.begin(&shared, Phase::ClosedLoop, now);
        let out = std::mem::take(engine.output(0));
        let len = u32::from_be_bytes(out[..4].try_into().unwrap()) as usize;
        let open = decode_frame(&out[4..4 + len]).unwrap();
        assert_eq!(open.header.method_id, kv_store::OPEN_SESSION);
        assert_eq!(out.len(), 4 + len, "nothing but the OpenSession call");
        let reply = OpenSessionReply {
            client_id: 77,
            session_secret: 99,
            ..Default::default()
        };
        let reply = frame(open.header.call_id, &reply.write_to_bytes().unwrap());
        engine.on_reply(&shared, 0, &reply, Instant::now()).unwrap();
        let out = std::mem::take(engine.output(0));
        let len = u32::from_be_bytes(out[..4].try_into().unwrap()) as usize;
        let put = decode_frame(&out[4..4 + len]).unwrap();
        assert_eq!(put.header.method_id, kv_store::PUT);
        let header = PutRequest::parse_from_bytes(put.body)
            .unwrap()
            .header
            .unwrap();
        assert_eq!(
            (header.client_id, header.session_secret, header.seq),
            (77, 99, 1)
        );
    }

    #[test]
    fn replies_in_any_order_reach_the_client_that_sent_the_call() {
        let options = options(4, 1.0, true);
        let targets = targets(1, Duration::from_secs(60));
        let shared = shared(&options);
        let (mut engine, _) = started(&options, &targets, &shared);
        let first = sent(&mut engine, 0);
        assert_eq!(first.len(), 4, "one request in flight per client");
        let ids: HashSet<u64> = first.iter().map(|s| s.client_id).collect();
        assert_eq!(ids.len(), 4, "every client has its own session");
        // Answer in reverse order; each reply's value names its call.
        for request in first.iter().rev() {
            let reply = get_reply(request.call_id, ErrorCode::OK);
            engine.on_reply(&shared, 0, &reply, Instant::now()).unwrap();
        }
        // Each client got the value of its own call, and sent its next get.
        let history = &engine.tally.history;
        assert_eq!(history.len(), 4);
        for request in &first {
            let operation = history
                .iter()
                .find(|op| op.client_id == request.client_id)
                .expect("every client finished its get");
            let expected = format!("for-call-{}", request.call_id);
            assert_eq!(
                operation.output,
                Some(KvOutput::Get {
                    value: Some(expected)
                })
            );
            assert!(matches!(&operation.input, KvInput::Get { key } if *key == request.key));
        }
        assert_eq!(engine.tally.reads, 4);
        let second = sent(&mut engine, 0);
        assert_eq!(second.len(), 4);
        let second_ids: HashSet<u64> = second.iter().map(|s| s.client_id).collect();
        assert_eq!(second_ids, ids);
        // A reply to a call that is not in flight breaks the connection.
        let stray = get_reply(first[0].call_id, ErrorCode::OK);
        assert!(engine.on_reply(&shared, 0, &stray, Instant::now()).is_err());
    }

    #[test]
    fn a_broken_connection_retries_its_writes_elsewhere_with_the_same_seq() {
        let options = options(3, 0.0, false);
        let targets = targets(2, Duration::from_secs(60));
        let shared = shared(&options);
        let (mut engine, now) = started(&options, &targets, &shared);
        let on_node_1 = sent(&mut engine, 0);
        assert_eq!(on_node_1.len(), 3);
        assert!(on_node_1.iter().all(|s| s.seq == 1));
        engine.on_link_down(&shared, 0, "reset by peer", Broken::Reopening, now);
        let on_node_2 = sent(&mut engine, 1);
        let before: HashSet<(u64, u64)> = on_node_1.iter().map(|s| (s.client_id, s.seq)).collect();
        let after: HashSet<(u64, u64)> = on_node_2.iter().map(|s| (s.client_id, s.seq)).collect();
        assert_eq!(before, after, "the same writes, to the other node");
        // Node 2 answers OK: the writes count once each, and the clients
        // move on to seq 2.
        for request in &on_node_2 {
            let reply = PutReply::default().write_to_bytes().unwrap();
            engine
                .on_reply(&shared, 1, &frame(request.call_id, &reply), Instant::now())
                .unwrap();
        }
        assert_eq!(engine.tally.writes, 3);
        assert!(engine.tally.errors.is_empty());
        let next = sent(&mut engine, 1);
        assert_eq!(next.len(), 3);
        assert!(next.iter().all(|s| s.seq == 2));
    }

    #[test]
    fn past_the_deadline_a_lost_write_counts_as_a_timeout_with_unknown_outcome() {
        let options = options(1, 0.0, true);
        let targets = targets(1, Duration::from_millis(5));
        let shared = shared(&options);
        let (mut engine, now) = started(&options, &targets, &shared);
        let first = sent(&mut engine, 0);
        assert_eq!(first.len(), 1);
        let past_deadline = now + Duration::from_millis(10);
        engine.on_link_down(&shared, 0, "reset by peer", Broken::Down, past_deadline);
        assert_eq!(engine.tally.errors.get("timeout"), Some(&1));
        let sample = &engine.tally.error_samples["timeout"];
        assert!(sample.contains("reset by peer"), "{sample}");
        // The history has the write with no return: it may have happened.
        let operation = &engine.tally.history[0];
        assert!(matches!(operation.input, KvInput::Put { .. }));
        assert_eq!(
            (operation.output.clone(), operation.return_us),
            (None, None)
        );
    }

    /// What the fake server saw on one connection: (client_id, seq) of
    /// every request, and of those it never answered.
    #[derive(Default, Debug)]
    struct ConnLog {
        requests: Vec<(u64, u64)>,
        unanswered: Vec<(u64, u64)>,
    }

    /// A KV node on 127.0.0.1 of cluster `cluster_id` that answers every
    /// put OK, two at a time in reverse order (or whatever is pending after
    /// a 20 ms lull). On its first connection it stops after `break_after`
    /// replies and closes the connection with a request unanswered.
    fn fake_node(break_after: usize, cluster_id: &str) -> (SocketAddr, Arc<Mutex<Vec<ConnLog>>>) {
        let auth = handshake::ServerAuth {
            credentials: Credentials::clerk(cluster_id),
            ..Default::default()
        };
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let logs = Arc::new(Mutex::new(Vec::<ConnLog>::new()));
        let server_logs = Arc::clone(&logs);
        std::thread::spawn(move || {
            for (index, stream) in listener.incoming().enumerate() {
                let Ok(stream) = stream else { return };
                let logs = Arc::clone(&server_logs);
                let limit = if index == 0 { break_after } else { usize::MAX };
                let auth = auth.clone();
                std::thread::spawn(move || serve_fake(stream, &auth, &logs, limit));
            }
        });
        (addr, logs)
    }

    fn serve_fake(
        stream: TcpStream,
        auth: &handshake::ServerAuth,
        logs: &Mutex<Vec<ConnLog>>,
        limit: usize,
    ) {
        if handshake::accept(&stream, auth).is_err() {
            return;
        }
        let me = {
            let mut logs = logs.lock();
            logs.push(ConnLog::default());
            logs.len() - 1
        };
        stream
            .set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let mut writer = stream.try_clone().unwrap();
        let mut reader = std::io::BufReader::new(stream);
        let (mut buf, mut out) = (Vec::new(), Vec::new());
        let mut pending: Vec<(FrameHeader, (u64, u64))> = Vec::new();
        let mut answered = 0;
        loop {
            let lull = match crate::rpc::frame::read_frame(&mut reader, &mut buf, 1 << 20) {
                Ok(frame) if frame.header.method_id == kv_store::OPEN_SESSION => {
                    // Sessions open at once, outside the script: one per call.
                    let reply = OpenSessionReply {
                        client_id: frame.header.call_id + 1000,
                        session_secret: 7,
                        ..Default::default()
                    };
                    let header = FrameHeader::response_to(&frame.header, RpcCode::Ok);
                    let body = reply.write_to_bytes().unwrap();
                    encode_frame(&mut out, &header, "", &body, 1 << 20).unwrap();
                    writer.write_all(&out).unwrap();
                    false
                }
                Ok(frame) => {
                    let request = PutRequest::parse_from_bytes(frame.body).unwrap();
                    let session = (request.header.client_id, request.header.seq);
                    logs.lock()[me].requests.push(session);
                    pending.push((frame.header, session));
                    false
                }
                Err(crate::rpc::frame::FrameError::Idle) => true,
                Err(_) => return,
            };
            if answered >= limit && !pending.is_empty() {
                let unanswered = pending.iter().map(|&(_, session)| session);
                logs.lock()[me].unanswered.extend(unanswered);
                return;
            }
            if pending.len() >= 2 || (lull && !pending.is_empty()) {
                for (header, _) in pending.drain(..).rev() {
                    let reply = FrameHeader::response_to(&header, RpcCode::Ok);
                    encode_frame(&mut out, &reply, "", &[], 1 << 20).unwrap();
                    writer.write_all(&out).unwrap();
                    answered += 1;
                }
            }
        }
    }

    #[test]
    fn over_real_sockets_replies_out_of_order_and_a_dropped_connection_lose_nothing() {
        let (addr, logs) = fake_node(40, crate::config::DEFAULT_CLUSTER_ID);
        let mut options = options(4, 0.0, false);
        options.duration = Duration::from_secs(1);
        let targets = Targets {
            nodes: vec![(1, addr)],
            ..targets(1, Duration::from_secs(10))
        };
        let report = super::super::run(&options, &targets, &|_| {}, &|_| {});
        assert!(report.errors.is_empty(), "{:?}", report.error_samples);
        assert!(report.writes > 40, "{} writes", report.writes);
        let logs = logs.lock();
        assert!(logs.len() >= 2, "the engine reconnected: {logs:?}");
        let lost = &logs[0].unanswered;
        assert!(!lost.is_empty(), "the first connection dropped a request");
        // Every write left unanswered by the dropped connection was sent
        // again, with the same client_id and seq, on a later connection.
        let resent: HashSet<(u64, u64)> = logs[1..]
            .iter()
            .flat_map(|log| log.requests.iter().copied())
            .collect();
        for session in lost {
            assert!(resent.contains(session), "{session:?} was not retried");
        }
    }

    #[test]
    fn a_node_of_another_cluster_rejects_every_client_at_once() {
        let (addr, logs) = fake_node(usize::MAX, "another-cluster");
        let mut options = options(3, 0.0, false);
        options.duration = Duration::from_secs(2);
        let targets = Targets {
            nodes: vec![(1, addr)],
            ..targets(1, Duration::from_secs(30))
        };
        let started = Instant::now();
        let report = super::super::run(&options, &targets, &|_| {}, &|_| {});
        // Each client ends with its one operation rejected, long before its
        // 30 s deadline (the run itself lasts its 2 s, for the progress).
        assert!(started.elapsed() < Duration::from_secs(20));
        assert_eq!(report.ops, 0);
        assert_eq!(
            report.errors.get("rejected"),
            Some(&3),
            "{:?}",
            report.errors
        );
        let sample = &report.error_samples["rejected"];
        assert!(sample.contains("refused us"), "{sample}");
        assert!(logs.lock().is_empty(), "no request passed the handshake");
    }

    #[test]
    fn busy_is_retried_with_the_same_seq_after_a_back_off() {
        let options = options(1, 0.0, false);
        let targets = targets(1, Duration::from_secs(60));
        let shared = shared(&options);
        let (mut engine, now) = started(&options, &targets, &shared);
        let first = sent(&mut engine, 0);
        let busy = PutReply {
            header: protobuf::MessageField::some(ReplyHeader {
                error: ErrorCode::BUSY.into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let reply = frame(first[0].call_id, &busy.write_to_bytes().unwrap());
        engine.on_reply(&shared, 0, &reply, now).unwrap();
        assert!(sent(&mut engine, 0).is_empty(), "it waits before retrying");
        let later = engine.next_wake(&shared, now);
        assert!(later > now && later <= now + Duration::from_millis(20));
        engine.on_tick(&shared, later);
        let retry = sent(&mut engine, 0);
        assert_eq!(retry.len(), 1);
        assert_eq!((retry[0].client_id, retry[0].seq), (first[0].client_id, 1));
        assert_ne!(retry[0].call_id, first[0].call_id);
        let ok = PutReply::default().write_to_bytes().unwrap();
        engine
            .on_reply(&shared, 0, &frame(retry[0].call_id, &ok), later)
            .unwrap();
        assert_eq!((engine.tally.writes, engine.tally.busy), (1, 1));
    }
}
