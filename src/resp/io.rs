//! An I/O thread of the Redis listener: it serves many connections ([`Connection`]) from
//! one `epoll` set (mio), so no thread is blocked per connection or per command. One
//! wake-up reads whatever commands have arrived on every ready socket and hands their
//! batches to the KV service back to back, where the event loop drains them together into
//! few log entries. Answers come back through the thread's [`Inbox`]: the apply thread (or
//! a worker) pushes them and wakes the thread at most once per drain, and the thread
//! encodes and writes the replies without blocking. New connections arrive the same way
//! from the acceptor.
//!
//! Timeouts are swept every [`SWEEP_MS`]: a connection idle for `idle_timeout_ms`, one
//! trickling a command for longer than `frame_timeout_ms`, and one whose replies the
//! client has not read for `idle_timeout_ms` are closed. A connection with a batch out is
//! bounded by the batch's own deadline (the cluster's request timeout).

use std::collections::HashMap;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Token};
use parking_lot::Mutex;

use super::connection::{self, Connection, Next};
use super::workers::Job;
use super::{RespContext, Shared};
use crate::clerk::{Clerk, ClerkError};
use crate::proto::kvstore::{ExecReply, OpReply};
use crate::rpc::{BatchWake, ReplyBatch, RpcError};

/// The token of the thread's waker (connection ids start at 1).
const WAKE: Token = Token(0);
/// How often timeouts are checked, at most; also the longest `poll` wait.
const SWEEP_MS: u64 = 100;
/// Bytes read from a socket at a time (one buffer per I/O thread).
const READ_CHUNK_BYTES: usize = 64 * 1024;
/// Readiness events taken per `poll`.
const EVENTS_PER_POLL: usize = 1024;

/// How a batch of a connection was answered.
pub enum Done {
    /// The answer to its first attempt, made in-process.
    First(Result<ExecReply, RpcError>),
    /// A worker's result, with the connection's clerk handed back.
    Worker(Box<Clerk>, Result<Vec<OpReply>, ClerkError>),
}

enum Inbound {
    Accepted {
        id: u64,
        stream: TcpStream,
        peer: String,
    },
    Done(u64, Done),
}

/// What other threads hand an I/O thread. Holds at most one item per connection of the
/// thread (one batch out per connection) plus the connections accepted and not yet taken
/// (at most `max_connections`).
pub struct Inbox {
    queue: Mutex<Vec<Inbound>>,
    /// True while a wake-up is pending: pushes in between do not wake the thread again.
    woken: AtomicBool,
    waker: mio::Waker,
}

impl Inbox {
    /// Files a batch's answer. Called by the thread that answers (the apply thread, a
    /// worker); inside the apply thread's [`ReplyBatch`] the I/O thread is woken once,
    /// when the batch ends, with every answer of it waiting.
    pub fn push_done(self: &Arc<Self>, id: u64, done: Done) {
        self.queue.lock().push(Inbound::Done(id, done));
        let waker: Arc<dyn BatchWake> = Arc::clone(self) as Arc<dyn BatchWake>;
        ReplyBatch::wake_at_end(&waker);
    }

    pub fn push_accepted(&self, id: u64, stream: TcpStream, peer: String) {
        self.push(Inbound::Accepted { id, stream, peer });
    }

    fn push(&self, item: Inbound) {
        self.queue.lock().push(item);
        BatchWake::wake(self);
    }

    /// Wakes the thread to see that the server stops.
    pub fn stop(&self) {
        if let Err(e) = self.waker.wake() {
            log::error!("resp: cannot wake an I/O thread: {e}");
        }
    }

    fn take(&self) -> Vec<Inbound> {
        // Cleared before the queue is taken: a push after the take wakes the thread again.
        self.woken.store(false, Ordering::SeqCst);
        std::mem::take(&mut *self.queue.lock())
    }
}

impl BatchWake for Inbox {
    /// Wakes the thread to take its inbox, unless a wake-up is pending already.
    fn wake(&self) {
        if !self.woken.swap(true, Ordering::SeqCst) {
            if let Err(e) = self.waker.wake() {
                log::error!("resp: cannot wake an I/O thread: {e}");
            }
        }
    }
}

/// What a connection needs from its I/O thread.
pub struct IoThread {
    shared: Arc<Shared>,
    inbox: Arc<Inbox>,
}

impl IoThread {
    pub fn ctx(&self) -> &RespContext {
        &self.shared.context
    }

    pub fn inbox(&self) -> Arc<Inbox> {
        Arc::clone(&self.inbox)
    }

    /// Runs `job` with the connection's clerk on a worker; the result comes back to
    /// this thread's inbox.
    pub fn run_on_worker(&self, id: u64, clerk: Box<Clerk>, job: Job) {
        self.shared
            .workers
            .run(id, clerk, job, Arc::clone(&self.inbox));
    }
}

/// Creates an I/O thread's poll set and inbox; [`run`] serves them.
pub fn create() -> std::io::Result<(Poll, Arc<Inbox>)> {
    let poll = Poll::new()?;
    let waker = mio::Waker::new(poll.registry(), WAKE)?;
    let inbox = Arc::new(Inbox {
        queue: Mutex::new(Vec::new()),
        woken: AtomicBool::new(false),
        waker,
    });
    Ok((poll, inbox))
}

/// Serves the connections handed to `inbox` until the server stops.
pub fn run(mut poll: Poll, inbox: Arc<Inbox>, shared: Arc<Shared>) {
    let io = IoThread { shared, inbox };
    let mut events = Events::with_capacity(EVENTS_PER_POLL);
    let mut connections: HashMap<u64, Connection> = HashMap::new();
    let mut scratch = vec![0u8; READ_CHUNK_BYTES];
    let mut last_sweep = Instant::now();
    while !io.shared.stopping.load(Ordering::SeqCst) {
        if let Err(e) = poll.poll(&mut events, Some(Duration::from_millis(SWEEP_MS))) {
            if e.kind() != std::io::ErrorKind::Interrupted {
                // Not expected of epoll_wait; do not spin on it.
                log::error!("resp: poll failed: {e}");
                std::thread::sleep(Duration::from_millis(SWEEP_MS));
            }
            continue;
        }
        for event in events.iter() {
            if event.token() == WAKE {
                continue;
            }
            let id = event.token().0 as u64;
            if let Some(connection) = connections.get_mut(&id) {
                if connection.drive(&io, &mut scratch) == Next::Close {
                    close(&io, &poll, &mut connections, id);
                }
            }
        }
        for item in io.inbox.take() {
            match item {
                Inbound::Accepted { id, stream, peer } => {
                    match open(&io, &poll, id, stream, peer) {
                        Some(mut connection) => {
                            let next = connection.drive(&io, &mut scratch);
                            connections.insert(id, connection);
                            if next == Next::Close {
                                close(&io, &poll, &mut connections, id);
                            }
                        }
                        None => io.shared.closed(id),
                    }
                }
                Inbound::Done(id, done) => {
                    // A connection closed meanwhile drops its answer (and its clerk).
                    if let Some(connection) = connections.get_mut(&id) {
                        connection.complete(&io, done);
                        if connection.drive(&io, &mut scratch) == Next::Close {
                            close(&io, &poll, &mut connections, id);
                        }
                    }
                }
            }
        }
        if last_sweep.elapsed() >= Duration::from_millis(SWEEP_MS) {
            last_sweep = Instant::now();
            let expired: Vec<u64> = connections
                .values()
                .filter_map(|c| timed_out(&io, c).map(|why| (c.id, why)))
                .map(|(id, why)| {
                    log::debug!("resp connection {id}: {why}");
                    id
                })
                .collect();
            for id in expired {
                close(&io, &poll, &mut connections, id);
            }
        }
    }
    for id in connections.keys().copied().collect::<Vec<_>>() {
        close(&io, &poll, &mut connections, id);
    }
}

/// Registers an accepted socket; `None` (the socket is dropped) when it cannot be.
fn open(
    io: &IoThread,
    poll: &Poll,
    id: u64,
    stream: TcpStream,
    peer: String,
) -> Option<Connection> {
    let prepared = stream
        .set_nodelay(true)
        .and_then(|()| stream.set_nonblocking(true));
    if let Err(e) = prepared {
        log::debug!("resp connection {id} from {peer}: {e}");
        return None;
    }
    let mut stream = mio::net::TcpStream::from_std(stream);
    let token = Token(usize::try_from(id).ok()?);
    if let Err(e) =
        poll.registry()
            .register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)
    {
        log::warn!("resp connection {id} from {peer}: cannot poll its socket: {e}");
        return None;
    }
    let clerk = connection::clerk(io.ctx());
    Some(Connection::new(io.ctx(), id, stream, peer, clerk))
}

fn close(io: &IoThread, poll: &Poll, connections: &mut HashMap<u64, Connection>, id: u64) {
    if let Some(mut connection) = connections.remove(&id) {
        let _ = poll.registry().deregister(&mut connection.stream);
        io.shared.closed(id);
    }
}

/// Why `connection` is to be closed for a timeout, if it is.
fn timed_out(io: &IoThread, connection: &Connection) -> Option<&'static str> {
    let config = &io.ctx().config;
    let idle = Duration::from_millis(config.idle_timeout_ms);
    let trickle = Duration::from_millis(config.frame_timeout_ms);
    if connection.unsent_bytes() > 0 && connection.write_progress.elapsed() > idle {
        return Some("the client read none of its replies for idle_timeout_ms");
    }
    // Commands buffered behind unsent replies wait for the client to read: not a trickle.
    if connection.is_waiting() || connection.unsent_bytes() > 0 {
        return None;
    }
    if connection
        .partial_since
        .is_some_and(|since| since.elapsed() > trickle)
    {
        return Some("a command took longer than frame_timeout_ms");
    }
    if connection.last_activity.elapsed() > idle {
        return Some("idle for idle_timeout_ms");
    }
    None
}
