//! One Redis connection, as a state machine driven by its I/O thread ([`super::io`]): it
//! reads what the client sent without blocking, parses every complete command in it (a
//! pipeline; a "round"), and runs the round in order — consecutive writes as ONE batch
//! (one log entry, one sequence number), consecutive reads as one batch at one read point.
//! At most one batch of a connection is out at a time, so replies keep the order of the
//! commands; they are encoded into the connection's outbox once the round is complete and
//! written as the socket takes them.
//!
//! A batch's first attempt is handed straight to this node's KV service when this node
//! leads (and, for writes, once the connection's session is open), with a responder that
//! completes on the I/O thread: no thread waits for it. Anything else — this node does not
//! lead, the session is not open yet, a SCAN/KEYS/DBSIZE (whose read waits for a view), or
//! a first attempt answered other than OK — goes to a worker ([`super::workers`]) running
//! the connection's [`Clerk`], its client session: it carries the batch to the leader from
//! any node and retries it with the same sequence number after a leader change, so it is
//! applied once.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

use super::commands::{classify, Action, ConnState, Shape};
use super::io::{Done, IoThread};
use super::local::LocalChannel;
use super::parser::{parse, Parsed};
use super::workers::Job;
use super::RespContext;
use crate::clerk::{attempt_timeout_ms, Clerk, ClerkError, ClerkOptions, NodeChannel};
use crate::kv::redis_ops::{are_point_reads, RedisReply};
use crate::proto::kvstore::{ErrorCode, ExecReply, ExecRequest, OpReply};
use crate::raft::Role;
use crate::rpc::services::KvStoreService;
use crate::rpc::{ClientConfig, Credentials, Responder, RpcClient, RpcError};

/// Commands parsed per round, at most: a round's replies are encoded together.
const MAX_PIPELINE: usize = 1024;
/// Ops in one batch, at most (a batch is one log entry or one read point).
const MAX_BATCH_OPS: usize = 512;
/// While a connection's outbox holds more than this, it reads no new commands: a client
/// that does not read its replies stops being served instead of growing the outbox.
pub const OUTBOX_PAUSE_BYTES: usize = 1024 * 1024;

/// What the I/O thread does with a connection after driving it.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Keep it: waiting for the socket or for a batch's answer.
    Keep,
    /// Close it (the client left, broke the protocol, quit, or a socket error).
    Close,
}

pub struct Connection {
    pub id: u64,
    pub stream: mio::net::TcpStream,
    state: ConnState,
    /// `None` while a worker runs a batch with it.
    clerk: Option<Box<Clerk>>,
    /// Received and not yet parsed.
    buf: Vec<u8>,
    max_buffered_bytes: usize,
    /// Encoded replies not yet written, from `out_pos` on.
    outbox: Vec<u8>,
    out_pos: usize,
    /// The round being run, if any.
    round: Option<Round>,
    /// Close once the outbox is written (after QUIT or a protocol error).
    closing: bool,
    /// When the first bytes of a command not yet complete arrived.
    pub partial_since: Option<Instant>,
    /// When the client last sent anything, or a round ended.
    pub last_activity: Instant,
    /// When the outbox last became non-empty or last drained a little.
    pub write_progress: Instant,
}

/// The commands of one round: their replies (filled as they come) and the batches left.
struct Round {
    replies: Vec<Option<RedisReply>>,
    batches: VecDeque<Batch>,
    /// The batch out, waiting for its answer.
    out: Option<Batch>,
    quit: bool,
    broken: Option<String>,
}

/// A batch: writes or reads, and where each op's reply goes.
struct Batch {
    slots: Vec<(usize, Shape)>,
    request: ExecRequest,
    /// When its first attempt was sent.
    started: Instant,
}

impl Batch {
    fn is_write(&self) -> bool {
        !self.request.writes.is_empty()
    }
}

impl Connection {
    pub fn new(
        ctx: &RespContext,
        id: u64,
        stream: mio::net::TcpStream,
        peer: String,
        clerk: Clerk,
    ) -> Connection {
        let now = Instant::now();
        Connection {
            id,
            stream,
            state: ConnState::new(id, peer, ctx.config.client_token.is_some()),
            clerk: Some(Box::new(clerk)),
            buf: Vec::new(),
            // A request must fit in one log entry, plus its header lines.
            max_buffered_bytes: ctx.config.max_append_bytes + 2 * ctx.limits.max_inline_bytes,
            outbox: Vec::new(),
            out_pos: 0,
            round: None,
            closing: false,
            partial_since: None,
            last_activity: now,
            write_progress: now,
        }
    }

    /// Whether a batch of this connection is out (its timeouts are the batch's).
    pub fn is_waiting(&self) -> bool {
        self.round.is_some()
    }

    /// Bytes of replies not yet written.
    pub fn unsent_bytes(&self) -> usize {
        self.outbox.len() - self.out_pos
    }

    /// Does all the connection can do now without blocking: write what the outbox holds,
    /// read and parse what arrived, start the next round. `scratch` is the I/O thread's
    /// read buffer.
    pub fn drive(&mut self, io: &IoThread, scratch: &mut [u8]) -> Next {
        loop {
            if self.flush().is_err() {
                return Next::Close;
            }
            if self.round.is_some() {
                return Next::Keep;
            }
            if self.closing {
                return if self.unsent_bytes() == 0 {
                    Next::Close
                } else {
                    Next::Keep
                };
            }
            if self.unsent_bytes() > OUTBOX_PAUSE_BYTES {
                return Next::Keep;
            }
            let (commands, consumed, broken) = self.parse_round(io.ctx());
            self.buf.drain(..consumed);
            if !commands.is_empty() || broken.is_some() {
                self.partial_since = (!self.buf.is_empty()).then(Instant::now);
                self.start_round(io, commands, broken);
                continue;
            }
            if self.buf.len() >= self.max_buffered_bytes {
                let text = format!(
                    "ERR Protocol error: a request of more than {} bytes",
                    self.max_buffered_bytes
                );
                encode(&RedisReply::Error(text), self.state.proto, &mut self.outbox);
                self.closing = true;
                continue;
            }
            let room = scratch.len().min(self.max_buffered_bytes - self.buf.len());
            match self.stream.read(&mut scratch[..room]) {
                // The client is done sending: what it sent is answered, then closed.
                Ok(0) => self.closing = true,
                Ok(got) => {
                    self.buf.extend_from_slice(&scratch[..got]);
                    self.last_activity = Instant::now();
                    self.partial_since.get_or_insert(self.last_activity);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Next::Keep,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::debug!("resp connection {}: {e}", self.id);
                    return Next::Close;
                }
            }
        }
    }

    /// Writes what the socket takes of the outbox.
    fn flush(&mut self) -> io::Result<()> {
        while self.out_pos < self.outbox.len() {
            match self.stream.write(&self.outbox[self.out_pos..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.out_pos += n;
                    self.write_progress = Instant::now();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.outbox.clear();
        self.out_pos = 0;
        Ok(())
    }

    /// Parses the complete commands buffered (at most [`MAX_PIPELINE`]): them, the bytes
    /// they took, and the protocol error that stopped the parse, if any.
    fn parse_round(&self, ctx: &RespContext) -> (Vec<Vec<Vec<u8>>>, usize, Option<String>) {
        let mut commands = Vec::new();
        let mut pos = 0;
        while commands.len() < MAX_PIPELINE {
            match parse(&self.buf[pos..], &ctx.limits) {
                Parsed::Command(args, used) => {
                    commands.push(args);
                    pos += used;
                }
                Parsed::Nothing(used) => pos += used,
                Parsed::Incomplete => break,
                Parsed::Error(error) => return (commands, pos, Some(error)),
            }
        }
        (commands, pos, None)
    }

    /// Classifies the round's commands in order (answering those the connection answers
    /// itself), groups the others into batches, and sends the first batch.
    fn start_round(&mut self, io: &IoThread, commands: Vec<Vec<Vec<u8>>>, broken: Option<String>) {
        let ctx = io.ctx();
        let mut round = Round {
            replies: vec![None; commands.len()],
            batches: VecDeque::new(),
            out: None,
            quit: false,
            broken,
        };
        let batch_bytes = ctx.config.max_append_bytes / 2;
        let mut current: Option<Batch> = None;
        let mut bytes = 0;
        let close = |current: &mut Option<Batch>, batches: &mut VecDeque<Batch>| {
            if let Some(batch) = current.take() {
                batches.push_back(batch);
            }
        };
        for (i, args) in commands.iter().enumerate() {
            let size: usize = args.iter().map(|a| a.len() + 16).sum();
            match classify(args, &mut self.state, ctx) {
                Action::Reply(reply) => round.replies[i] = Some(reply),
                Action::Quit => {
                    round.replies[i] = Some(RedisReply::Ok);
                    round.replies.truncate(i + 1);
                    round.quit = true;
                    break;
                }
                Action::Write(op, shape) => {
                    let fits = current.as_ref().is_some_and(|b| {
                        b.is_write() && b.slots.len() < MAX_BATCH_OPS && bytes + size <= batch_bytes
                    });
                    if !fits {
                        close(&mut current, &mut round.batches);
                        bytes = 0;
                    }
                    let batch = current.get_or_insert_with(Batch::empty);
                    batch.request.writes.push(op.to_proto());
                    batch.slots.push((i, shape));
                    bytes += size;
                }
                Action::Read(op, shape) => {
                    let fits = current
                        .as_ref()
                        .is_some_and(|b| !b.is_write() && b.slots.len() < MAX_BATCH_OPS);
                    if !fits {
                        close(&mut current, &mut round.batches);
                    }
                    let batch = current.get_or_insert_with(Batch::empty);
                    batch.request.reads.push(op);
                    batch.slots.push((i, shape));
                }
            }
        }
        close(&mut current, &mut round.batches);
        self.round = Some(round);
        self.advance(io);
    }

    /// Sends the round's next batch, or, when none is left, encodes the round's replies.
    fn advance(&mut self, io: &IoThread) {
        let Some(round) = self.round.as_mut() else {
            return;
        };
        if round.out.is_some() {
            return;
        }
        let Some(mut batch) = round.batches.pop_front() else {
            let round = self.round.take().expect("a round");
            if self.unsent_bytes() == 0 {
                // The client's time to read these replies starts now.
                self.write_progress = Instant::now();
            }
            for reply in round.replies {
                let reply = reply.unwrap_or_else(|| RedisReply::Error("ERR no reply".into()));
                encode(&reply, self.state.proto, &mut self.outbox);
            }
            if let Some(error) = &round.broken {
                encode(
                    &RedisReply::Error(error.clone()),
                    self.state.proto,
                    &mut self.outbox,
                );
            }
            if round.quit || round.broken.is_some() {
                self.closing = true;
            }
            self.last_activity = Instant::now();
            return;
        };
        batch.started = Instant::now();
        let ctx = io.ctx();
        let write = batch.is_write();
        let clerk = self
            .clerk
            .as_mut()
            .expect("no worker holds the clerk between batches");
        let leads = ctx.node.status().role == Role::Leader;
        // The first attempt in-process, when it can be answered without a thread waiting.
        let header = if !leads {
            None
        } else if write {
            clerk.next_write_header()
        } else if are_point_reads(&batch.request.reads) {
            Some(clerk.read_header())
        } else {
            None
        };
        match header {
            Some(header) => {
                batch.request.header = header;
                let request = batch.request.clone();
                round.out = Some(batch);
                let inbox = io.inbox();
                let id = self.id;
                let responder = Responder::callback(move |answer| {
                    inbox.push_done(id, Done::First(answer));
                });
                ctx.service.exec(request, responder);
            }
            None => {
                let (writes, reads) = if write {
                    (batch.request.writes.clone(), Vec::new())
                } else {
                    (Vec::new(), batch.request.reads.clone())
                };
                round.out = Some(batch);
                let clerk = self.clerk.take().expect("the clerk");
                io.run_on_worker(self.id, clerk, Job::Exec { writes, reads });
            }
        }
    }

    /// Takes the answer of the batch out, and moves the round on.
    pub fn complete(&mut self, io: &IoThread, done: Done) {
        let Some(round) = self.round.as_mut() else {
            return;
        };
        let Some(batch) = round.out.take() else {
            return;
        };
        let result = match done {
            Done::First(answer) => match first_success(answer, batch.slots.len()) {
                Ok(replies) => Ok(replies),
                Err(answer) => {
                    // Judged and retried by the clerk, on a worker.
                    let job = Job::After {
                        node: io.ctx().id,
                        started: batch.started,
                        request: batch.request.clone(),
                        first: answer,
                    };
                    round.out = Some(batch);
                    let clerk = self.clerk.take().expect("the clerk");
                    io.run_on_worker(self.id, clerk, job);
                    return;
                }
            },
            Done::Worker(clerk, result) => {
                self.clerk = Some(clerk);
                result
            }
        };
        let write = batch.is_write();
        match result {
            Ok(answers) if answers.len() == batch.slots.len() => {
                for ((i, shape), answer) in batch.slots.into_iter().zip(answers) {
                    let reply = RedisReply::from_proto(&answer);
                    round.replies[i] = Some(match (shape, reply) {
                        (Shape::Flag, RedisReply::Ok) => RedisReply::Int(1),
                        (Shape::Flag, RedisReply::Nil) => RedisReply::Int(0),
                        (Shape::Scan, reply) => self.state.scan_reply(reply),
                        (_, reply) => reply,
                    });
                }
            }
            Ok(answers) => {
                let text = format!(
                    "ERR {} replies to {} commands",
                    answers.len(),
                    batch.slots.len()
                );
                for (i, _) in batch.slots {
                    round.replies[i] = Some(RedisReply::Error(text.clone()));
                }
            }
            Err(error) => {
                let text = clerk_error(&error, write);
                for (i, _) in batch.slots {
                    round.replies[i] = Some(RedisReply::Error(text.clone()));
                }
            }
        }
        self.advance(io);
    }
}

/// A connection's clerk: this node in-process first, the others over their RPC ports.
pub fn clerk(ctx: &RespContext) -> Clerk {
    let config = &ctx.config;
    let call_timeout_ms = attempt_timeout_ms(config, ClerkOptions::default().attempt_timeout_ms);
    let me = config.node(ctx.id).map(|n| n.addr());
    let mut nodes: Vec<(u64, NodeChannel)> = Vec::new();
    if let Some(addr) = me {
        nodes.push((
            ctx.id,
            Box::new(LocalChannel {
                service: std::sync::Arc::clone(&ctx.service),
                call_timeout: Duration::from_millis(call_timeout_ms),
                addr,
            }),
        ));
    }
    let rpc = ClientConfig {
        connect_timeout_ms: ClerkOptions::default().attempt_timeout_ms,
        call_timeout_ms,
        max_frame_bytes: config.max_frame_bytes,
    };
    for node in config.raft_nodes.iter().filter(|n| n.id != ctx.id) {
        let client = RpcClient::new(node.addr(), rpc.clone())
            .with_credentials(Credentials::clerk(&config.cluster_id));
        nodes.push((node.id, Box::new(client)));
    }
    Clerk::with_channels(
        nodes,
        ClerkOptions {
            client_token: config.client_token.clone(),
            ..ClerkOptions::default()
        },
    )
}

impl Batch {
    fn empty() -> Batch {
        Batch {
            slots: Vec::new(),
            request: ExecRequest::default(),
            started: Instant::now(),
        }
    }
}

/// The replies of a first attempt that succeeded, or the answer for the clerk to judge.
#[allow(clippy::result_large_err)]
fn first_success(
    answer: Result<ExecReply, RpcError>,
    ops: usize,
) -> Result<Vec<OpReply>, Result<ExecReply, RpcError>> {
    match answer {
        Ok(reply) => {
            let ok = reply
                .header
                .as_ref()
                .is_none_or(|h| h.error.enum_value() == Ok(ErrorCode::OK));
            if ok && reply.replies.len() == ops {
                Ok(reply.replies)
            } else {
                Err(Ok(reply))
            }
        }
        Err(error) => Err(Err(error)),
    }
}

/// The Redis error line for a failed batch.
fn clerk_error(error: &ClerkError, write: bool) -> String {
    match error {
        ClerkError::Timeout { .. } | ClerkError::Unknown { .. } if write => format!(
            "TIMEOUT the outcome of this write is unknown: it may or may not have been \
             applied ({error}); retrying it yourself may apply it twice"
        ),
        ClerkError::Timeout { .. } | ClerkError::Unknown { .. } => format!("TIMEOUT {error}"),
        ClerkError::Rejected(_) => format!("ERR {error}"),
    }
}

/// Appends the encoding of `reply` in RESP version `proto` (2 or 3) to `out`. RESP3 differs
/// here only in its null (`_`) and its maps (`%`); RESP2 has a null bulk string and
/// flattens a map into an array of keys and values.
pub fn encode(reply: &RedisReply, proto: u8, out: &mut Vec<u8>) {
    // A simple string or error is one line: a CR or LF inside it would end it early.
    let line = |prefix: u8, text: &str, out: &mut Vec<u8>| {
        out.push(prefix);
        out.extend(
            text.bytes()
                .map(|b| if b == b'\r' || b == b'\n' { b' ' } else { b }),
        );
        out.extend_from_slice(b"\r\n");
    };
    match reply {
        RedisReply::Ok => out.extend_from_slice(b"+OK\r\n"),
        RedisReply::Nil if proto >= 3 => out.extend_from_slice(b"_\r\n"),
        RedisReply::Nil => out.extend_from_slice(b"$-1\r\n"),
        RedisReply::Int(n) => out.extend_from_slice(format!(":{n}\r\n").as_bytes()),
        RedisReply::Status(text) => line(b'+', text, out),
        RedisReply::Error(text) => line(b'-', text, out),
        RedisReply::Bulk(bytes) => {
            out.extend_from_slice(format!("${}\r\n", bytes.len()).as_bytes());
            out.extend_from_slice(bytes);
            out.extend_from_slice(b"\r\n");
        }
        RedisReply::Array(items) => {
            out.extend_from_slice(format!("*{}\r\n", items.len()).as_bytes());
            for item in items {
                encode(item, proto, out);
            }
        }
        RedisReply::Map(pairs) => {
            let header = if proto >= 3 {
                format!("%{}\r\n", pairs.len())
            } else {
                format!("*{}\r\n", pairs.len() * 2)
            };
            out.extend_from_slice(header.as_bytes());
            for (key, value) in pairs {
                encode(key, proto, out);
                encode(value, proto, out);
            }
        }
    }
}
