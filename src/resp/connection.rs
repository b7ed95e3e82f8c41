//! One Redis connection, on a thread of its own: read what the client sent, parse every
//! complete command in it (a pipeline), run them in order — consecutive writes as ONE
//! batch (one log entry, one sequence number), consecutive reads as one batch at one read
//! point — and write all the replies at once, in order. The connection's [`Clerk`] is its
//! client session: it carries a batch to the leader from any node and retries it with the
//! same sequence number after a leader change, so it is applied once.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::commands::{classify, Action, ConnState, Shape};
use super::local::LocalChannel;
use super::parser::{parse, Parsed};
use super::RespContext;
use crate::clerk::{attempt_timeout_ms, Clerk, ClerkError, ClerkOptions, NodeChannel};
use crate::kv::redis_ops::{RedisReply, RedisWrite};
use crate::proto::kvstore::ReadOp;
use crate::rpc::{ClientConfig, Credentials, RpcClient};

/// Commands parsed and run per round, at most: a round's replies are written together.
const MAX_PIPELINE: usize = 1024;
/// Ops in one batch, at most (a batch is one log entry or one read point).
const MAX_BATCH_OPS: usize = 512;
/// How much later than asked a read may time out, to spare a syscall per read.
const TIMEOUT_SLACK: Duration = Duration::from_millis(100);
/// Bytes read from the socket at a time.
const READ_CHUNK_BYTES: usize = 64 * 1024;

/// Serves one connection until the client leaves, breaks the protocol, or the server stops.
pub fn serve(ctx: &RespContext, stream: TcpStream, id: u64, stopping: &AtomicBool) {
    let peer = stream
        .peer_addr()
        .map_or_else(|_| "?".to_string(), |a| a.to_string());
    let mut connection = Connection {
        ctx,
        state: ConnState::new(id, peer.clone(), ctx.config.client_token.is_some()),
        clerk: clerk(ctx),
        stream,
        buf: Vec::new(),
        chunk: vec![0; READ_CHUNK_BYTES],
        // A request must fit in one log entry, plus its header lines.
        max_buffered_bytes: ctx.config.max_append_bytes + 2 * ctx.limits.max_inline_bytes,
    };
    if let Err(e) = connection.run(stopping) {
        log::debug!("resp connection {id} from {peer}: {e}");
    }
}

/// The connection's clerk: this node in-process first, the others over their RPC ports.
fn clerk(ctx: &RespContext) -> Clerk {
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

struct Connection<'a> {
    ctx: &'a RespContext,
    state: ConnState,
    clerk: Clerk,
    stream: TcpStream,
    /// Received and not yet parsed.
    buf: Vec<u8>,
    /// Where the socket is read into ([`READ_CHUNK_BYTES`]).
    chunk: Vec<u8>,
    max_buffered_bytes: usize,
}

/// The commands of a round waiting to run as one batch.
#[derive(Default)]
struct Batch {
    writes: Vec<(usize, RedisWrite, Shape)>,
    reads: Vec<(usize, ReadOp, Shape)>,
    bytes: usize,
}

impl Connection<'_> {
    fn run(&mut self, stopping: &AtomicBool) -> io::Result<()> {
        let idle = Duration::from_millis(self.ctx.config.idle_timeout_ms);
        let trickle = Duration::from_millis(self.ctx.config.frame_timeout_ms);
        self.stream.set_nodelay(true)?;
        self.stream.set_write_timeout(Some(idle))?;
        // When the first bytes of a command not yet complete arrived.
        let mut started: Option<Instant> = None;
        // The read timeout set on the socket, so it is changed only when it must be.
        let mut timeout_set = Duration::ZERO;
        loop {
            if stopping.load(Ordering::SeqCst) {
                return Ok(());
            }
            let (commands, consumed, broken) = self.parse_round();
            self.buf.drain(..consumed);
            if !commands.is_empty() || broken.is_some() {
                let mut out = Vec::new();
                let quit = self.run_round(commands, &mut out);
                if let Some(error) = &broken {
                    encode(&RedisReply::Error(error.clone()), &mut out);
                }
                self.stream.write_all(&out)?;
                if quit || broken.is_some() {
                    return Ok(());
                }
                started = None;
                continue;
            }
            if self.buf.len() >= self.max_buffered_bytes {
                let text = format!(
                    "ERR Protocol error: a request of more than {} bytes",
                    self.max_buffered_bytes
                );
                let mut out = Vec::new();
                encode(&RedisReply::Error(text), &mut out);
                return self.stream.write_all(&out);
            }
            let timeout = match started {
                None => idle,
                Some(at) => match trickle.checked_sub(at.elapsed()) {
                    Some(left) if !left.is_zero() => left,
                    _ => {
                        return Err(io::Error::other(
                            "a command took longer than frame_timeout_ms",
                        ))
                    }
                },
            };
            // Within a slack of the deadline, the one set stays: no syscall per read.
            if timeout < timeout_set.saturating_sub(TIMEOUT_SLACK) || timeout > timeout_set {
                self.stream.set_read_timeout(Some(timeout))?;
                timeout_set = timeout;
            }
            // Read into a buffer zeroed once, and copy what came: growing `buf` by a whole
            // chunk of zeros per read cost a 64 KiB memset per command.
            let room = READ_CHUNK_BYTES.min(self.max_buffered_bytes - self.buf.len());
            let got = self.stream.read(&mut self.chunk[..room])?;
            if got == 0 {
                return Ok(());
            }
            self.buf.extend_from_slice(&self.chunk[..got]);
            started.get_or_insert_with(Instant::now);
        }
    }

    /// Parses the complete commands buffered (at most [`MAX_PIPELINE`]): them, the bytes
    /// they took, and the protocol error that stopped the parse, if any.
    fn parse_round(&self) -> (Vec<Vec<Vec<u8>>>, usize, Option<String>) {
        let mut commands = Vec::new();
        let mut pos = 0;
        while commands.len() < MAX_PIPELINE {
            match parse(&self.buf[pos..], &self.ctx.limits) {
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

    /// Runs `commands` in order and encodes their replies into `out`; true after QUIT.
    fn run_round(&mut self, commands: Vec<Vec<Vec<u8>>>, out: &mut Vec<u8>) -> bool {
        let mut replies: Vec<Option<RedisReply>> = vec![None; commands.len()];
        let mut batch = Batch::default();
        let batch_bytes = self.ctx.config.max_append_bytes / 2;
        let mut quit = false;
        for (i, args) in commands.iter().enumerate() {
            let size: usize = args.iter().map(|a| a.len() + 16).sum();
            match classify(args, &mut self.state, self.ctx) {
                Action::Reply(reply) => replies[i] = Some(reply),
                Action::Quit => {
                    replies[i] = Some(RedisReply::Ok);
                    replies.truncate(i + 1);
                    quit = true;
                    break;
                }
                Action::Write(op, shape) => {
                    let full =
                        batch.writes.len() >= MAX_BATCH_OPS || batch.bytes + size > batch_bytes;
                    if !batch.reads.is_empty() || full {
                        self.run_batch(&mut batch, &mut replies);
                    }
                    batch.writes.push((i, op, shape));
                    batch.bytes += size;
                }
                Action::Read(op, shape) => {
                    if !batch.writes.is_empty() || batch.reads.len() >= MAX_BATCH_OPS {
                        self.run_batch(&mut batch, &mut replies);
                    }
                    batch.reads.push((i, op, shape));
                }
            }
        }
        self.run_batch(&mut batch, &mut replies);
        for reply in replies {
            let reply = reply.unwrap_or_else(|| RedisReply::Error("ERR no reply".into()));
            encode(&reply, out);
        }
        quit
    }

    /// Runs the batch (if any) through the clerk and files each op's reply at its command.
    fn run_batch(&mut self, batch: &mut Batch, replies: &mut [Option<RedisReply>]) {
        let batch = std::mem::take(batch);
        let write = !batch.writes.is_empty();
        let (slots, result): (Vec<(usize, Shape)>, _) = if write {
            let protos = batch
                .writes
                .iter()
                .map(|(_, op, _)| op.to_proto())
                .collect();
            let slots = batch.writes.iter().map(|(i, _, s)| (*i, *s)).collect();
            (slots, self.clerk.exec(protos, Vec::new()))
        } else if !batch.reads.is_empty() {
            let slots = batch.reads.iter().map(|(i, _, s)| (*i, *s)).collect();
            let ops = batch.reads.into_iter().map(|(_, op, _)| op).collect();
            (slots, self.clerk.exec(Vec::new(), ops))
        } else {
            return;
        };
        match result {
            Ok(answers) if answers.len() == slots.len() => {
                for ((i, shape), answer) in slots.into_iter().zip(answers) {
                    let reply = RedisReply::from_proto(&answer);
                    replies[i] = Some(match (shape, reply) {
                        (Shape::Flag, RedisReply::Ok) => RedisReply::Int(1),
                        (Shape::Flag, RedisReply::Nil) => RedisReply::Int(0),
                        (Shape::Scan, reply) => self.state.scan_reply(reply),
                        (_, reply) => reply,
                    });
                }
            }
            Ok(answers) => {
                let text = format!("ERR {} replies to {} commands", answers.len(), slots.len());
                for (i, _) in slots {
                    replies[i] = Some(RedisReply::Error(text.clone()));
                }
            }
            Err(error) => {
                let text = clerk_error(&error, write);
                for (i, _) in slots {
                    replies[i] = Some(RedisReply::Error(text.clone()));
                }
            }
        }
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

/// Appends the RESP2 encoding of `reply` to `out`.
pub fn encode(reply: &RedisReply, out: &mut Vec<u8>) {
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
                encode(item, out);
            }
        }
    }
}
