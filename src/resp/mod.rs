//! The Redis protocol (RESP2, and RESP3 for a connection that asks with `HELLO 3`): every node
//! can serve Redis clients on its `resp_port`. It parses RESP ([`parser`]), turns commands into
//! the Redis ops of the KV service ([`commands`]), and runs each connection as a state machine
//! ([`connection`]) on one of a few I/O threads ([`io`]) that poll many sockets at once: a
//! command costs no thread of its own and no blocked wait. Each connection has a
//! [`Clerk`](crate::clerk::Clerk) of its own: one client session per connection and one
//! sequence number per batch of writes, so a write retried inside the cluster after a leader
//! change is applied once. On the leader a batch goes straight to this node's KV service and
//! its answer comes back to the I/O thread; anything that must wait (forwarding from a
//! follower, opening the session, a retry, a SCAN) runs on a worker ([`workers`]) through the
//! clerk, which reaches this node's own KV service in-process ([`local`]) and the others over
//! the RPC port. The state machine never knows which wire a command came from.
//!
//! Bounds: at most `max_connections` Redis connections (one more is answered
//! `-ERR max number of clients reached` and closed) served by [`IO_THREADS`] threads, and
//! at most as many workers; per connection one request of at most `max_append_bytes` plus
//! a header line buffered, arguments of at most `max_value_bytes`, one batch out at a time,
//! and no new commands read while more than
//! [`OUTBOX_PAUSE_BYTES`](connection::OUTBOX_PAUSE_BYTES) of replies wait unread. A
//! connection idle for `idle_timeout_ms`, trickling one command for longer than
//! `frame_timeout_ms`, or not reading its replies for `idle_timeout_ms`, is closed; it
//! costs no other connection anything meanwhile.

pub mod commands;
pub mod connection;
pub mod io;
pub mod local;
pub mod parser;
pub mod workers;

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::config::ClusterConfig;
use crate::kv::service::KvService;
use crate::node::NodeHandle;

/// The I/O threads of a Redis listener. One: measured on the 2-core machine this was tuned
/// on, one thread serving all 50 connections of `redis-benchmark -c 50` did SET 14.7k/s and
/// GET 51k/s where two did 13.9k/s and 43.6k/s (bench/results/2026-12-07-resp-event-loop.md):
/// the more sockets one wake-up reads, the more commands gather into each log entry and
/// read round. The I/O thread only parses, encodes and moves bytes; the work of a command
/// is on the event loop and the apply thread.
pub const IO_THREADS: usize = 1;

/// What every connection of a node's Redis listener shares.
pub struct RespContext {
    pub config: ClusterConfig,
    /// This node's id.
    pub id: u64,
    /// This node's KV service, called in-process.
    pub service: Arc<KvService>,
    /// For INFO's replication section, and to know whether this node leads.
    pub node: NodeHandle,
    pub limits: parser::Limits,
    /// Where the listener serves (for INFO and CLIENT INFO).
    pub local_addr: SocketAddr,
}

/// A running Redis listener. Dropping it stops it.
pub struct RespServer {
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
    io_threads: Vec<JoinHandle<()>>,
    inboxes: Vec<Arc<io::Inbox>>,
}

pub struct Shared {
    context: RespContext,
    stopping: AtomicBool,
    /// Invariant: at most `max_connections`.
    active: AtomicUsize,
    workers: workers::Workers,
}

impl Shared {
    /// Connection `id` is closed (or was never opened): its place is free.
    fn closed(&self, _id: u64) {
        self.active.fetch_sub(1, Ordering::SeqCst);
    }
}

impl RespServer {
    /// Listens on `addr` (a node's `ip` and `resp_port`); the error names the address.
    pub fn start(
        addr: SocketAddr,
        config: &ClusterConfig,
        id: u64,
        service: Arc<KvService>,
        node: NodeHandle,
    ) -> std::io::Result<RespServer> {
        let listener = TcpListener::bind(addr).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("cannot listen for Redis clients on {addr}: {e}"),
            )
        })?;
        let local_addr = listener.local_addr()?;
        let max_value_bytes = config.max_append_bytes / 2;
        let shared = Arc::new(Shared {
            context: RespContext {
                config: config.clone(),
                id,
                service,
                node,
                limits: parser::Limits {
                    max_bulk_bytes: max_value_bytes,
                    max_args: 1024 * 1024,
                    max_inline_bytes: 64 * 1024,
                },
                local_addr,
            },
            stopping: AtomicBool::new(false),
            active: AtomicUsize::new(0),
            workers: workers::Workers::new(config.max_connections.max(1)),
        });
        let mut server = RespServer {
            local_addr,
            shared: Arc::clone(&shared),
            acceptor: None,
            io_threads: Vec::new(),
            inboxes: Vec::new(),
        };
        for n in 0..IO_THREADS {
            let (poll, inbox) = io::create()?;
            let thread_inbox = Arc::clone(&inbox);
            let thread_shared = Arc::clone(&shared);
            // On failure `server` is dropped, which stops the threads started so far.
            let thread = std::thread::Builder::new()
                .name(format!("resp-io-{n}"))
                .spawn(move || io::run(poll, thread_inbox, thread_shared))?;
            server.io_threads.push(thread);
            server.inboxes.push(inbox);
        }
        let inboxes = server.inboxes.clone();
        server.acceptor = Some(
            std::thread::Builder::new()
                .name(format!("resp-accept-{}", local_addr.port()))
                .spawn(move || accept_loop(&listener, &shared, &inboxes))?,
        );
        log::info!("serving Redis clients (RESP2, RESP3) on {local_addr}");
        Ok(server)
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting, closes every connection and joins every thread.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if self.shared.stopping.swap(true, Ordering::SeqCst) {
            return;
        }
        if let Some(acceptor) = self.acceptor.take() {
            // Wakes the acceptor's `accept`; it sees `stopping` and returns.
            let _ = TcpStream::connect_timeout(&self.local_addr, Duration::from_secs(1));
            let _ = acceptor.join();
        }
        for inbox in &self.inboxes {
            inbox.stop();
        }
        for thread in self.io_threads.drain(..) {
            let _ = thread.join();
        }
        self.shared.workers.stop();
    }
}

impl Drop for RespServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>, inboxes: &[Arc<io::Inbox>]) {
    let max_connections = shared.context.config.max_connections;
    let next_id = AtomicU64::new(1);
    for accepted in listener.incoming() {
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let mut stream = match accepted {
            Ok(stream) => stream,
            Err(e) => {
                // Out of file descriptors and the like: back off, do not spin.
                log::warn!("resp {}: accept failed: {e}", shared.context.local_addr);
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        if shared.active.load(Ordering::SeqCst) >= max_connections {
            crate::metrics::CONNECTIONS_REFUSED.inc();
            // Redis's own answer; the client sees why before the close.
            let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
            let _ = stream.write_all(b"-ERR max number of clients reached\r\n");
            continue;
        }
        let id = next_id.fetch_add(1, Ordering::Relaxed);
        let peer = stream
            .peer_addr()
            .map_or_else(|_| "?".to_string(), |a| a.to_string());
        shared.active.fetch_add(1, Ordering::SeqCst);
        inboxes[(id as usize) % inboxes.len()].push_accepted(id, stream, peer);
    }
}
