//! The Redis protocol (RESP2): every node can serve Redis clients on its `resp_port`.
//! It parses RESP ([`parser`]), turns commands into the Redis ops of the KV service
//! ([`commands`]), and runs them through a [`Clerk`](crate::clerk::Clerk) of its own per
//! connection ([`connection`]): one client session per connection and one sequence number
//! per batch of writes, so a write retried inside the cluster after a leader change is
//! applied once, and a command sent to a follower is carried to the leader. The clerk
//! reaches this node's own KV service in-process ([`local`]) and the others over the RPC
//! port. The state machine never knows which wire a command came from.
//!
//! Bounds: at most `max_connections` Redis connections (one thread each; one more is
//! answered `-ERR max number of clients reached` and closed); per connection one request
//! of at most `max_append_bytes` plus a header line buffered, arguments of at most
//! `max_value_bytes`, a connection idle for `idle_timeout_ms` or trickling one command for
//! longer than `frame_timeout_ms` is closed, and a client that does not read its replies
//! blocks only its own thread, for at most `idle_timeout_ms`.

pub mod commands;
pub mod connection;
pub mod local;
pub mod parser;

use std::collections::HashMap;
use std::io::{self, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::Mutex;

use crate::config::ClusterConfig;
use crate::kv::service::KvService;
use crate::node::NodeHandle;

/// What every connection of a node's Redis listener shares.
pub struct RespContext {
    pub config: ClusterConfig,
    /// This node's id.
    pub id: u64,
    /// This node's KV service, called in-process.
    pub service: Arc<KvService>,
    /// For INFO's replication section.
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
}

struct Shared {
    context: RespContext,
    stopping: AtomicBool,
    /// Invariant: at most `max_connections`.
    active: AtomicUsize,
    next_id: AtomicU64,
    /// A clone of every open socket, so that stopping unblocks their threads.
    open: Mutex<HashMap<u64, TcpStream>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl RespServer {
    /// Listens on `addr` (a node's `ip` and `resp_port`); the error names the address.
    pub fn start(
        addr: SocketAddr,
        config: &ClusterConfig,
        id: u64,
        service: Arc<KvService>,
        node: NodeHandle,
    ) -> io::Result<RespServer> {
        let listener = TcpListener::bind(addr).map_err(|e| {
            io::Error::new(
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
            next_id: AtomicU64::new(1),
            open: Mutex::new(HashMap::new()),
            threads: Mutex::new(Vec::new()),
        });
        let acceptor_shared = Arc::clone(&shared);
        let acceptor = std::thread::Builder::new()
            .name(format!("resp-accept-{}", local_addr.port()))
            .spawn(move || accept_loop(&listener, &acceptor_shared))?;
        log::info!("serving Redis clients (RESP2) on {local_addr}");
        Ok(RespServer {
            local_addr,
            shared,
            acceptor: Some(acceptor),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting, closes every connection and joins every thread.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let Some(acceptor) = self.acceptor.take() else {
            return;
        };
        self.shared.stopping.store(true, Ordering::SeqCst);
        // Wakes the acceptor's `accept`; it sees `stopping` and returns.
        let _ = TcpStream::connect_timeout(&self.local_addr, Duration::from_secs(1));
        let _ = acceptor.join();
        for stream in self.shared.open.lock().values() {
            let _ = stream.shutdown(Shutdown::Both);
        }
        let threads = std::mem::take(&mut *self.shared.threads.lock());
        for thread in threads {
            let _ = thread.join();
        }
    }
}

impl Drop for RespServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    let max_connections = shared.context.config.max_connections;
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
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        let Ok(clone) = stream.try_clone() else {
            continue;
        };
        shared.active.fetch_add(1, Ordering::SeqCst);
        shared.open.lock().insert(id, clone);
        let thread_shared = Arc::clone(shared);
        let spawned = std::thread::Builder::new()
            .name(format!("resp-conn-{id}"))
            .spawn(move || {
                connection::serve(&thread_shared.context, stream, id, &thread_shared.stopping);
                thread_shared.open.lock().remove(&id);
                thread_shared.active.fetch_sub(1, Ordering::SeqCst);
            });
        let mut threads = shared.threads.lock();
        // Finished threads are joined here, so the list stays as long as the open connections.
        let (done, running): (Vec<_>, Vec<_>) = std::mem::take(&mut *threads)
            .into_iter()
            .partition(JoinHandle::is_finished);
        *threads = running;
        for thread in done {
            let _ = thread.join();
        }
        match spawned {
            Ok(thread) => threads.push(thread),
            Err(e) => {
                log::error!("resp: cannot start a connection thread: {e}");
                shared.open.lock().remove(&id);
                shared.active.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }
}
