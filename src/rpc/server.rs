//! The blocking RPC server: one acceptor thread and a bounded pool of
//! connection threads. A connection occupies one pool thread while it is
//! open; when every thread is busy a new connection is closed at once, so the
//! bound holds under any load. A connection thread reads request frames in a
//! loop and dispatches each through the [`Router`]; replies go back through
//! the connection's outbox, in whatever order the [`Responder`]s complete,
//! matched to their calls by call id. A reply is written without blocking
//! (`send` with `MSG_DONTWAIT`): whoever answers (often the apply thread)
//! never waits for a client's socket. What the socket does not take stays in
//! the connection's bounded outbox, which the server's flusher thread writes
//! as the socket drains; a connection whose outbox is not drained within
//! `write_timeout_ms`, or grows past `max_outbox_bytes`, is closed, and one
//! whose outbox holds over a quarter of that reads no new requests until it
//! drains. A client that stops reading thus costs only itself. A malformed or
//! oversized frame, a connection idle past `idle_timeout_ms`, or a frame that
//! takes longer than `frame_timeout_ms` to arrive once begun (a slow writer
//! trickling bytes), closes that connection only. Before its first call a
//! connection must pass the [`handshake`](super::handshake); a call to a
//! service its handshake does not allow (Raft, from a clerk) closes it.

use std::collections::HashMap;
use std::io::Read;
use std::io::{self, BufReader};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};

use crate::threads::{spawn_watched, OnPanic};
use parking_lot::{Condvar, Mutex};
use protobuf::Message;

use super::client::RpcError;
use super::frame::{
    encode_frame, finish_frame, read_frame, start_frame, FrameError, FrameHeader, FrameKind,
    RpcCode, MIN_MAX_FRAME_BYTES,
};
use super::handshake::{self, Access, HandshakeError, RepeatFilter, ServerAuth};
use super::services::{describe_method, Router};

/// Read buffer of a connection: large enough that small pipelined frames
/// need one `read` call for many of them.
const READ_BUFFER_BYTES: usize = 64 * 1024;
/// A frame buffer that grew past this (a large snapshot chunk) is released
/// after use, so idle connections hold little memory.
pub(crate) const RETAINED_BUFFER_BYTES: usize = 1024 * 1024;
/// How often a reader blocked on a full in-flight window re-checks for
/// shutdown; a freed slot wakes it at once.
const SLOT_WAIT_POLL_MS: u64 = 100;
/// The same refusal (same address and reason) is logged at most this often.
const REFUSAL_LOG_INTERVAL_MS: u64 = 10_000;
/// Inside a [`ReplyBatch`], a connection's unsent replies are written at
/// once (without blocking) when they pass this, so a batch answering many
/// large reads does not pile them all up before the first byte goes out.
const EARLY_WRITE_BYTES: usize = 1024 * 1024;
/// How long the flusher waits on the sockets it watches before it checks
/// for new ones and for outboxes past their deadline.
const FLUSH_POLL_MS: i32 = 10;

/// Limits of an [`RpcServer`].
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Connections served at once; each occupies one pool thread.
    pub max_connections: usize,
    /// Largest frame accepted or sent, header included (not the prefix).
    pub max_frame_bytes: usize,
    /// A connection with no call in flight that sends nothing for this long is
    /// closed. Also bounds how long a half-received frame may stall.
    pub idle_timeout_ms: u64,
    /// Once the first byte of a frame has arrived, the whole frame must
    /// arrive within this time, or the connection is closed. Without it a
    /// writer sending one byte just inside every `idle_timeout_ms` would hold
    /// a connection thread for ever.
    pub frame_timeout_ms: u64,
    /// Replies queued on a connection must all be written within this long
    /// (at most twice this for a reply queued while older ones wait); a
    /// client that does not read them is disconnected. No thread ever
    /// blocks on a reply write.
    pub write_timeout_ms: u64,
    /// The most bytes of replies a connection may hold unsent; past it the
    /// connection is closed. Past a quarter of it the connection reads no
    /// new requests until its outbox drains. At least `max_frame_bytes`.
    pub max_outbox_bytes: usize,
    /// Calls of one connection dispatched but not yet answered. At the bound
    /// the connection stops reading, which pushes back on the client.
    pub max_in_flight_per_connection: usize,
    /// Who may connect and call what. The default lets clerks of the
    /// default cluster call every service.
    pub auth: ServerAuth,
    /// Told when one of the server's threads (acceptor, flusher, connection
    /// threads, and so the handlers they run) panics: a node stops itself.
    /// The default only logs it.
    pub on_panic: OnPanic,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_connections: 256,
            max_frame_bytes: 16 * 1024 * 1024,
            idle_timeout_ms: 60_000,
            frame_timeout_ms: 30_000,
            write_timeout_ms: 5_000,
            max_outbox_bytes: 64 * 1024 * 1024,
            max_in_flight_per_connection: 1024,
            auth: ServerAuth::default(),
            on_panic: OnPanic::default(),
        }
    }
}

impl ServerConfig {
    fn validate(&self) -> io::Result<()> {
        let invalid = |what: String| Err(io::Error::new(io::ErrorKind::InvalidInput, what));
        if self.max_connections == 0 {
            return invalid("rpc server: max_connections must be at least 1".into());
        }
        if self.max_frame_bytes < MIN_MAX_FRAME_BYTES || self.max_frame_bytes > u32::MAX as usize {
            return invalid(format!(
                "rpc server: max_frame_bytes must be in [{MIN_MAX_FRAME_BYTES}, {}], got {}",
                u32::MAX,
                self.max_frame_bytes
            ));
        }
        if self.idle_timeout_ms == 0 || self.write_timeout_ms == 0 || self.frame_timeout_ms == 0 {
            return invalid(
                "rpc server: idle_timeout_ms, frame_timeout_ms and write_timeout_ms must be > 0"
                    .into(),
            );
        }
        if self.max_outbox_bytes < self.max_frame_bytes {
            return invalid(format!(
                "rpc server: max_outbox_bytes ({}) must be at least max_frame_bytes ({})",
                self.max_outbox_bytes, self.max_frame_bytes
            ));
        }
        if self.max_in_flight_per_connection == 0 {
            return invalid("rpc server: max_in_flight_per_connection must be at least 1".into());
        }
        if self.auth.timeout_ms == 0 {
            return invalid("rpc server: auth.timeout_ms must be > 0".into());
        }
        Ok(())
    }
}

/// A running server. Dropping it shuts it down.
pub struct RpcServer {
    local_addr: SocketAddr,
    shared: Arc<ServerShared>,
    acceptor: Option<JoinHandle<()>>,
    flusher: Option<JoinHandle<()>>,
}

/// State shared by the acceptor, the pool threads and `shutdown`.
struct ServerShared {
    config: ServerConfig,
    router: Router,
    local_addr: SocketAddr,
    stopping: AtomicBool,
    /// Connections accepted and not yet finished (queued or being served).
    /// Invariant: `active_connections <= config.max_connections`.
    active_connections: AtomicUsize,
    /// A clone of every open connection's socket, so that `shutdown` can
    /// unblock their readers.
    open: Mutex<HashMap<u64, TcpStream>>,
    /// Pool threads spawned so far. Invariant: at least as many as
    /// `active_connections`, so every accepted connection finds a thread.
    workers: Mutex<Vec<JoinHandle<()>>>,
    next_connection_id: AtomicU64,
    /// Keeps a refused node that retries from flooding the log.
    refusal_log: Mutex<RepeatFilter>,
    /// Connections whose replies the socket did not take at once, for the
    /// flusher. Each is listed at most once at a time (`Outbox::listed`),
    /// so `max_connections` places are enough and `send` never blocks.
    backlog_tx: crossbeam_channel::Sender<Arc<Connection>>,
}

impl RpcServer {
    /// Binds `addr` and starts serving `router`'s services. A bind failure
    /// (e.g. the port is in use) names the address in its message.
    pub fn bind<A: ToSocketAddrs + std::fmt::Display>(
        addr: A,
        config: ServerConfig,
        router: Router,
    ) -> io::Result<RpcServer> {
        config.validate()?;
        let listener = TcpListener::bind(&addr)
            .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))?;
        let local_addr = listener.local_addr()?;
        let (backlog_tx, backlog_rx) = crossbeam_channel::bounded(config.max_connections);
        let shared = Arc::new(ServerShared {
            config,
            router,
            local_addr,
            stopping: AtomicBool::new(false),
            active_connections: AtomicUsize::new(0),
            open: Mutex::new(HashMap::new()),
            workers: Mutex::new(Vec::new()),
            next_connection_id: AtomicU64::new(1),
            refusal_log: Mutex::new(RepeatFilter::new(Duration::from_millis(
                REFUSAL_LOG_INTERVAL_MS,
            ))),
            backlog_tx,
        });
        let flusher_shared = Arc::clone(&shared);
        let on_panic = shared.config.on_panic.clone();
        let flusher = spawn_watched(
            format!("rpc-flush-{}", local_addr.port()),
            on_panic.clone(),
            move || flush_loop(&flusher_shared, &backlog_rx),
        )?;
        let acceptor_shared = Arc::clone(&shared);
        let acceptor = spawn_watched(
            format!("rpc-accept-{}", local_addr.port()),
            on_panic,
            move || accept_loop(listener, acceptor_shared),
        )?;
        info!("rpc server listening on {local_addr}");
        Ok(RpcServer {
            local_addr,
            shared,
            acceptor: Some(acceptor),
            flusher: Some(flusher),
        })
    }

    /// The address the server listens on (with the real port when bound to 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Connections currently accepted and not yet closed.
    pub fn active_connections(&self) -> usize {
        self.shared.active_connections.load(Ordering::SeqCst)
    }

    /// Stops accepting, closes every connection and joins every thread. It
    /// returns once running handler calls have returned: handlers must not
    /// block without bound. Responders still held elsewhere fail quietly.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let Some(acceptor) = self.acceptor.take() else {
            return;
        };
        self.shared.stopping.store(true, Ordering::SeqCst);
        for stream in self.shared.open.lock().values() {
            // The peer may already be gone; there is nothing else to undo.
            let _ = stream.shutdown(Shutdown::Both);
        }
        wake_acceptor(self.local_addr);
        if acceptor.join().is_err() {
            error!(
                "rpc server {}: the acceptor thread panicked",
                self.local_addr
            );
        }
        // The acceptor has exited, so no worker is spawned any more.
        let workers = std::mem::take(&mut *self.shared.workers.lock());
        for worker in workers {
            if worker.join().is_err() {
                error!(
                    "rpc server {}: a connection thread panicked",
                    self.local_addr
                );
            }
        }
        if let Some(flusher) = self.flusher.take() {
            if flusher.join().is_err() {
                error!(
                    "rpc server {}: the flusher thread panicked",
                    self.local_addr
                );
            }
        }
        info!("rpc server {} shut down", self.local_addr);
    }
}

impl Drop for RpcServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Unblocks the acceptor's `accept` by connecting to it; the acceptor sees
/// `stopping` and exits.
fn wake_acceptor(local_addr: SocketAddr) {
    let mut target = local_addr;
    if target.ip().is_unspecified() {
        let loopback: std::net::IpAddr = if target.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        };
        target.set_ip(loopback);
    }
    if let Err(e) = TcpStream::connect_timeout(&target, Duration::from_secs(1)) {
        warn!("rpc server {local_addr}: cannot wake the acceptor to shut down: {e}");
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<ServerShared>) {
    let max_connections = shared.config.max_connections;
    // Capacity max_connections: at most that many connections are active, so
    // `send` never blocks.
    let (queue_tx, queue_rx) =
        crossbeam_channel::bounded::<(TcpStream, SocketAddr)>(max_connections);
    loop {
        let (stream, peer) = match listener.accept() {
            Ok(accepted) => accepted,
            Err(e) => {
                if shared.stopping.load(Ordering::SeqCst) {
                    break;
                }
                // Out of file descriptors and similar: back off briefly
                // instead of spinning.
                warn!("rpc server {}: accept failed: {e}", shared.local_addr);
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        if shared.stopping.load(Ordering::SeqCst) {
            break;
        }
        let active = shared.active_connections.load(Ordering::SeqCst);
        if active >= max_connections {
            crate::metrics::CONNECTIONS_REFUSED.inc();
            warn!(
                "rpc server {}: refusing connection from {peer}: all {max_connections} \
                 connection threads are busy (max_connections)",
                shared.local_addr
            );
            continue;
        }
        shared.active_connections.fetch_add(1, Ordering::SeqCst);
        crate::metrics::CONNECTIONS_OPEN.inc();
        if !ensure_worker(&shared, active + 1, &queue_rx) {
            shared.active_connections.fetch_sub(1, Ordering::SeqCst);
            crate::metrics::CONNECTIONS_OPEN.dec();
            continue;
        }
        if queue_tx.send((stream, peer)).is_err() {
            // Workers hold receivers until the sender is dropped below.
            unreachable!("rpc connection queue closed while the acceptor runs");
        }
    }
    drop(queue_tx);
    debug!("rpc server {}: acceptor stopped", shared.local_addr);
}

/// Spawns pool threads until there are at least `needed`. Returns false when
/// a thread cannot be spawned (the connection is then refused).
fn ensure_worker(
    shared: &Arc<ServerShared>,
    needed: usize,
    queue_rx: &crossbeam_channel::Receiver<(TcpStream, SocketAddr)>,
) -> bool {
    let mut workers = shared.workers.lock();
    while workers.len() < needed {
        let worker_shared = Arc::clone(shared);
        let worker_rx = queue_rx.clone();
        let name = format!("rpc-conn-{}-{}", shared.local_addr.port(), workers.len());
        let on_panic = shared.config.on_panic.clone();
        let spawned = spawn_watched(name, on_panic, move || {
            worker_loop(worker_shared, worker_rx)
        });
        match spawned {
            Ok(handle) => workers.push(handle),
            Err(e) => {
                error!(
                    "rpc server {}: cannot spawn a connection thread: {e}",
                    shared.local_addr
                );
                return false;
            }
        }
    }
    true
}

fn worker_loop(
    shared: Arc<ServerShared>,
    queue_rx: crossbeam_channel::Receiver<(TcpStream, SocketAddr)>,
) {
    while let Ok((stream, peer)) = queue_rx.recv() {
        if let Err(e) = serve_connection(&shared, stream, peer) {
            warn!(
                "rpc server {}: connection from {peer}: {e}",
                shared.local_addr
            );
        }
        shared.active_connections.fetch_sub(1, Ordering::SeqCst);
        crate::metrics::CONNECTIONS_OPEN.dec();
    }
}

/// Serves one connection until it closes, fails or the server stops.
fn serve_connection(
    shared: &Arc<ServerShared>,
    stream: TcpStream,
    peer: SocketAddr,
) -> io::Result<()> {
    let config = &shared.config;
    stream.set_nodelay(true)?;
    stream.set_write_timeout(Some(Duration::from_millis(config.write_timeout_ms)))?;
    let connection_id = shared.next_connection_id.fetch_add(1, Ordering::Relaxed);
    {
        // Registering under the lock that `stop` holds while closing makes
        // sure no connection escapes shutdown.
        let mut open = shared.open.lock();
        if shared.stopping.load(Ordering::SeqCst) {
            return Ok(());
        }
        open.insert(connection_id, stream.try_clone()?);
    }
    let Some(access) = shake_hands(shared, &stream, peer) else {
        shared.open.lock().remove(&connection_id);
        return Ok(());
    };
    stream.set_read_timeout(Some(Duration::from_millis(config.idle_timeout_ms)))?;
    debug!(
        "rpc server {}: connection from {peer} ({access:?})",
        shared.local_addr
    );
    let writer = stream.try_clone()?;
    let connection = Arc::new(Connection {
        peer,
        access,
        max_frame_bytes: config.max_frame_bytes,
        max_in_flight: config.max_in_flight_per_connection,
        write_timeout: Duration::from_millis(config.write_timeout_ms),
        max_outbox_bytes: config.max_outbox_bytes,
        unsent_bytes: AtomicUsize::new(0),
        fd: writer.as_raw_fd(),
        backlog_tx: shared.backlog_tx.clone(),
        outbox: Mutex::new(Outbox {
            frame: Vec::new(),
            pending: Vec::new(),
            sent: 0,
            in_batch: false,
            listed: false,
            overdue_check: None,
            stream: writer,
            broken: false,
        }),
        in_flight: Mutex::new(0),
        slot_freed: Condvar::new(),
        budget_used: AtomicUsize::new(0),
    });
    let result = read_requests(shared, &connection, stream);
    connection.close();
    shared.open.lock().remove(&connection_id);
    result
}

/// Runs the server side of the handshake within the configured timeout (and
/// never longer than `idle_timeout_ms`); logs why a connection is turned
/// away and returns `None` then.
fn shake_hands(shared: &ServerShared, stream: &TcpStream, peer: SocketAddr) -> Option<Access> {
    let config = &shared.config;
    let auth = ServerAuth {
        timeout_ms: config.auth.timeout_ms.min(config.idle_timeout_ms),
        ..config.auth.clone()
    };
    let local = shared.local_addr;
    let error = match handshake::accept(stream, &auth) {
        Ok(access) => return Some(access),
        Err(error) => error,
    };
    if shared.stopping.load(Ordering::SeqCst) {
        return None;
    }
    match error {
        HandshakeError::Refused { node_id, reason } => {
            let key = format!("{} {node_id} {reason}", peer.ip());
            if shared.refusal_log.lock().admit(&key) {
                warn!("rpc server {local}: refused {peer} (node {node_id}): {reason}");
            }
        }
        // A port probe, or a client that gave up: nothing to report.
        HandshakeError::Closed => debug!("rpc server {local}: {peer} left during the handshake"),
        error @ HandshakeError::Timeout { .. } => {
            info!("rpc server {local}: closing connection from {peer}: {error}")
        }
        error => warn!("rpc server {local}: closing connection from {peer}: {error}"),
    }
    None
}

fn read_requests(
    shared: &ServerShared,
    connection: &Arc<Connection>,
    stream: TcpStream,
) -> io::Result<()> {
    let peer = connection.peer;
    let local = shared.local_addr;
    let stream = DeadlineStream::new(stream, &shared.config);
    let mut reader = BufReader::with_capacity(READ_BUFFER_BYTES, stream);
    let mut buf = Vec::new();
    loop {
        let frame = match read_frame(&mut reader, &mut buf, shared.config.max_frame_bytes) {
            Ok(frame) => frame,
            Err(FrameError::Closed) => {
                debug!("rpc server {local}: {peer} closed the connection");
                return Ok(());
            }
            Err(FrameError::Idle) if connection.in_flight() > 0 => {
                reader.get_mut().frame_done();
                continue;
            }
            Err(FrameError::Idle) => {
                info!(
                    "rpc server {local}: closing connection from {peer}: idle for {} ms \
                     (idle_timeout_ms)",
                    shared.config.idle_timeout_ms
                );
                return Ok(());
            }
            Err(_) if shared.stopping.load(Ordering::SeqCst) => return Ok(()),
            Err(e) => {
                warn!("rpc server {local}: closing connection from {peer}: {e}");
                return Ok(());
            }
        };
        reader.get_mut().frame_done();
        if frame.header.kind != FrameKind::Request {
            warn!(
                "rpc server {local}: closing connection from {peer}: it sent a response frame \
                 (call id {}) where a request was expected",
                frame.header.call_id
            );
            return Ok(());
        }
        if !shared
            .config
            .auth
            .allows(connection.access, frame.header.service_id)
        {
            warn!(
                "rpc server {local}: closing connection from {peer}: it called {} but its \
                 handshake did not prove it is a member node",
                method_label(&frame.header)
            );
            return Ok(());
        }
        if !connection.acquire_slot(&shared.stopping) {
            return Ok(());
        }
        let responder = RawResponder {
            connection: Some(Arc::clone(connection)),
            request: frame.header,
            timer: request_timer(&frame.header),
        };
        shared.router.dispatch(
            frame.header.service_id,
            frame.header.method_id,
            frame.body,
            responder,
        );
        if buf.capacity() > RETAINED_BUFFER_BYTES {
            buf = Vec::new();
        }
    }
}

/// How far past its deadline a frame's last read may block: the price of
/// not re-arming the socket's timeout on every read.
const FRAME_DEADLINE_SLACK: Duration = Duration::from_millis(100);

/// The socket under a connection's reader. Between frames a read waits up
/// to `idle_timeout_ms`; from the first byte that arrives, the frame it
/// begins has until `frame_timeout_ms` later to be complete, however the
/// bytes trickle in. The reader calls [`DeadlineStream::frame_done`] after
/// each frame. Bytes of the next frame that came with the end of the last
/// one are already buffered, so that frame's clock starts at its next read
/// from the socket: the bound is looser by one read (and by
/// [`FRAME_DEADLINE_SLACK`]), never absent.
struct DeadlineStream {
    stream: TcpStream,
    idle_timeout: Duration,
    frame_timeout: Duration,
    /// When the frame being received must be complete; `None` between frames.
    deadline: Option<Instant>,
    /// The read timeout now set on the socket, to skip needless syscalls.
    timeout_set: Duration,
}

impl DeadlineStream {
    fn new(stream: TcpStream, config: &ServerConfig) -> DeadlineStream {
        let idle_timeout = Duration::from_millis(config.idle_timeout_ms);
        DeadlineStream {
            stream,
            idle_timeout,
            frame_timeout: Duration::from_millis(config.frame_timeout_ms),
            deadline: None,
            // serve_connection set the idle timeout on the socket.
            timeout_set: idle_timeout,
        }
    }

    fn frame_done(&mut self) {
        self.deadline = None;
    }
}

impl Read for DeadlineStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let timeout = match self.deadline {
            None => self.idle_timeout,
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the frame did not arrive within frame_timeout_ms",
                    ));
                }
                // Shorten the socket's timeout only when the deadline is
                // nearer than it by more than the slack: re-arming it on
                // every read would cost a syscall per read.
                if left + FRAME_DEADLINE_SLACK < self.timeout_set {
                    left
                } else {
                    self.timeout_set
                }
            }
        };
        if timeout != self.timeout_set {
            self.stream.set_read_timeout(Some(timeout))?;
            self.timeout_set = timeout;
        }
        let got_bytes = self.stream.read(buf)?;
        if got_bytes > 0 && self.deadline.is_none() {
            self.deadline = Some(Instant::now() + self.frame_timeout);
        }
        Ok(got_bytes)
    }
}

/// One open connection as seen by its responders.
struct Connection {
    peer: SocketAddr,
    /// What the handshake allowed.
    access: Access,
    max_frame_bytes: usize,
    max_in_flight: usize,
    write_timeout: Duration,
    max_outbox_bytes: usize,
    /// `pending.len() - sent` of the outbox, readable without its lock: the
    /// reader stops taking requests while it is over a quarter of
    /// `max_outbox_bytes`.
    unsent_bytes: AtomicUsize,
    /// The outbox's socket, for the flusher's `poll`; valid while the
    /// connection lives, since the outbox owns the stream.
    fd: RawFd,
    backlog_tx: crossbeam_channel::Sender<Arc<Connection>>,
    /// Replies are queued whole under this lock, so frames never interleave.
    outbox: Mutex<Outbox>,
    /// Calls dispatched and not yet answered.
    /// Invariant: `in_flight <= max_in_flight`.
    in_flight: Mutex<usize>,
    slot_freed: Condvar,
    /// Units of the per-connection budget a handler counts against
    /// ([`Responder::take_connection_budget`]; the KV service: sessions opened).
    budget_used: AtomicUsize,
}

struct Outbox {
    stream: TcpStream,
    /// Reused for every reply: a frame is encoded here, then moved to
    /// `pending`.
    frame: Vec<u8>,
    /// Whole frames not yet (fully) written; `pending[..sent]` has gone out.
    /// Empty, except inside a [`ReplyBatch`] of some thread (which writes
    /// when it ends) or while the socket does not take everything (then the
    /// flusher writes as it drains).
    /// Invariant: `pending.len() - sent <= max_outbox_bytes` while not broken.
    pending: Vec<u8>,
    sent: usize,
    /// True while this connection is on some thread's batch list, so that
    /// it is listed (and flushed) once per batch however many replies it gets.
    in_batch: bool,
    /// True while the flusher watches this connection.
    listed: bool,
    /// While replies wait for the socket: by when the `.1` bytes at the head
    /// of the unsent ones must be written. Once they are, the bytes then
    /// unsent get a new deadline, so no reply waits more than twice
    /// `write_timeout_ms`.
    overdue_check: Option<(Instant, usize)>,
    /// Set after a failed write; later replies are dropped.
    broken: bool,
}

impl Outbox {
    fn unsent(&self) -> usize {
        self.pending.len() - self.sent
    }
}

/// Writes what the socket takes of `bytes` now, without waiting (`send`
/// with `MSG_DONTWAIT`, which leaves the socket itself blocking for the
/// connection's reader). `Ok(n)` with `n < bytes.len()` means the socket's
/// buffer is full.
fn send_without_blocking(fd: RawFd, bytes: &[u8]) -> io::Result<usize> {
    let mut written = 0;
    while written < bytes.len() {
        let rest = &bytes[written..];
        // SAFETY: `rest` is valid for `rest.len()` bytes, and `fd` is an
        // open socket owned by the caller's connection.
        let n = unsafe {
            libc::send(
                fd,
                rest.as_ptr().cast::<libc::c_void>(),
                rest.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n >= 0 {
            written += n as usize;
            continue;
        }
        let error = io::Error::last_os_error();
        match error.kind() {
            io::ErrorKind::Interrupted => continue,
            io::ErrorKind::WouldBlock => break,
            _ => return Err(error),
        }
    }
    Ok(written)
}

impl Connection {
    fn in_flight(&self) -> usize {
        *self.in_flight.lock()
    }

    /// Waits for a free in-flight slot and takes it. Returns false when the
    /// server stops or the connection breaks first. While the client leaves
    /// many replies unread, no slot is given: its requests wait in its
    /// socket, which pushes back on it through TCP.
    fn acquire_slot(&self, stopping: &AtomicBool) -> bool {
        let mut in_flight = self.in_flight.lock();
        while *in_flight >= self.max_in_flight
            || self.unsent_bytes.load(Ordering::Relaxed) > self.max_outbox_bytes / 4
        {
            if stopping.load(Ordering::SeqCst) || self.outbox.lock().broken {
                return false;
            }
            self.slot_freed
                .wait_for(&mut in_flight, Duration::from_millis(SLOT_WAIT_POLL_MS));
        }
        *in_flight += 1;
        true
    }

    fn release_slot(&self) {
        let mut in_flight = self.in_flight.lock();
        assert!(*in_flight > 0, "released an in-flight slot never taken");
        *in_flight -= 1;
        self.slot_freed.notify_one();
    }

    /// Writes the response to `request`, its body encoded by `encode_body`
    /// straight into the frame buffer. A body that cannot be encoded or is
    /// too large becomes a `ReplyFailed` error frame, so the caller always
    /// hears back while the connection lives.
    fn reply(
        self: &Arc<Self>,
        request: &FrameHeader,
        encode_body: impl FnOnce(&mut Vec<u8>) -> Result<(), String>,
    ) {
        let mut outbox = self.outbox.lock();
        if outbox.broken {
            return;
        }
        let header = FrameHeader::response_to(request, RpcCode::Ok);
        start_frame(&mut outbox.frame);
        let failure = match encode_body(&mut outbox.frame) {
            Ok(()) => match finish_frame(&mut outbox.frame, &header, self.max_frame_bytes) {
                Ok(()) => None,
                Err(e) => Some(format!("reply not sent: {e} (max_frame_bytes)")),
            },
            Err(e) => Some(format!("cannot encode reply: {e}")),
        };
        if let Some(text) = failure {
            warn!(
                "rpc reply to {} for {}: {text}",
                self.peer,
                method_label(request)
            );
            let header = FrameHeader::response_to(request, RpcCode::ReplyFailed);
            encode_error_frame(&mut outbox.frame, &header, &text, self.max_frame_bytes);
        }
        self.queue_locked(&mut outbox, request);
    }

    fn reply_error(self: &Arc<Self>, request: &FrameHeader, code: RpcCode, text: &str) {
        let mut outbox = self.outbox.lock();
        if outbox.broken {
            return;
        }
        let header = FrameHeader::response_to(request, code);
        encode_error_frame(&mut outbox.frame, &header, text, self.max_frame_bytes);
        self.queue_locked(&mut outbox, request);
    }

    /// Moves the encoded frame to `pending`, then writes at once unless this
    /// thread is inside a [`ReplyBatch`], which writes when it ends.
    fn queue_locked(self: &Arc<Self>, outbox: &mut Outbox, request: &FrameHeader) {
        let Outbox { frame, pending, .. } = outbox;
        pending.extend_from_slice(frame);
        if frame.capacity() > RETAINED_BUFFER_BYTES {
            *frame = Vec::new();
        }
        if !ReplyBatch::is_open() || outbox.unsent() > EARLY_WRITE_BYTES {
            return self.write_locked(outbox, request.call_id);
        }
        // Listed once per batch; a connection already listed by another
        // thread's batch is flushed when that batch ends.
        if !outbox.in_batch {
            outbox.in_batch = true;
            ReplyBatch::defer(self);
        }
    }

    /// Writes every pending frame; called when a batch ends.
    fn flush(self: &Arc<Self>) {
        let mut outbox = self.outbox.lock();
        outbox.in_batch = false;
        if !outbox.broken && outbox.unsent() > 0 {
            self.write_locked(&mut outbox, 0);
        }
    }

    /// Writes what the socket takes of the unsent replies, without waiting.
    /// The rest waits for the flusher, unless it is more than the outbox may
    /// hold: then the connection is closed. `call_id` names the reply that
    /// triggered the write (0 for a batch) in the log line of a failure.
    fn write_locked(self: &Arc<Self>, outbox: &mut Outbox, call_id: u64) {
        if outbox.listed {
            // The socket was full a moment ago: leave the write to the
            // flusher, which polls it, rather than try a full socket again.
            return self.check_outbox_size(outbox, call_id);
        }
        match self.push_out(outbox) {
            Ok(true) => {}
            Ok(false) => {
                outbox.listed = true;
                self.backlog_tx
                    .try_send(Arc::clone(self))
                    .expect("the flusher's list has a place for every connection");
                self.check_outbox_size(outbox, call_id);
            }
            Err(e) => {
                let what = e.to_string();
                self.break_locked(outbox, &format!("reply (call id {call_id}) failed: {what}"));
            }
        }
    }

    fn check_outbox_size(&self, outbox: &mut Outbox, call_id: u64) {
        if outbox.unsent() > self.max_outbox_bytes {
            let why = format!(
                "it leaves {} bytes of replies unread (call id {call_id}), over the limit of {} \
                 (max_outbox_bytes)",
                outbox.unsent(),
                self.max_outbox_bytes
            );
            self.break_locked(outbox, &why);
        }
    }

    /// Sends what the socket takes now; true when nothing is left unsent.
    fn push_out(&self, outbox: &mut Outbox) -> io::Result<bool> {
        let written = send_without_blocking(self.fd, &outbox.pending[outbox.sent..])?;
        outbox.sent += written;
        let unsent = outbox.unsent();
        if unsent == 0 {
            outbox.pending.clear();
            outbox.sent = 0;
            outbox.overdue_check = None;
            if outbox.pending.capacity() > RETAINED_BUFFER_BYTES {
                outbox.pending = Vec::new();
            }
        } else {
            if outbox.sent > outbox.pending.len() / 2 {
                // Keeps the buffer from growing while the head drains.
                outbox.pending.drain(..outbox.sent);
                outbox.sent = 0;
            }
            let now = Instant::now();
            outbox.overdue_check = match outbox.overdue_check {
                Some((at, head)) if head > written => Some((at, head - written)),
                _ => Some((now + self.write_timeout, unsent)),
            };
        }
        self.unsent_bytes.store(unsent, Ordering::Relaxed);
        Ok(unsent == 0)
    }

    /// Marks the connection broken and shuts its socket, which also
    /// unblocks its reader, so the connection closes as a whole.
    fn break_locked(&self, outbox: &mut Outbox, why: &str) {
        outbox.broken = true;
        let _ = outbox.stream.shutdown(Shutdown::Both);
        outbox.pending = Vec::new();
        outbox.sent = 0;
        self.unsent_bytes.store(0, Ordering::Relaxed);
        info!("rpc connection from {} closed: {why}", self.peer);
    }

    /// The flusher's turn on a listed connection whose socket may take more
    /// (`writable`). Returns whether it stays listed.
    fn flush_backlog(&self, writable: bool, now: Instant) -> bool {
        let mut outbox = self.outbox.lock();
        let keep = if outbox.broken {
            false
        } else if writable {
            match self.push_out(&mut outbox) {
                Ok(true) => false,
                Ok(false) => true,
                Err(e) => {
                    self.break_locked(&mut outbox, &format!("reply write failed: {e}"));
                    false
                }
            }
        } else {
            true
        };
        let keep = keep && !self.overdue(&mut outbox, now);
        if !keep {
            outbox.listed = false;
            drop(outbox);
            // A reader held back by a full outbox may go on.
            self.slot_freed.notify_one();
        }
        keep
    }

    /// Closes the connection when replies have waited past their deadline.
    fn overdue(&self, outbox: &mut Outbox, now: Instant) -> bool {
        match outbox.overdue_check {
            Some((deadline, _)) if now >= deadline => {
                let why = format!(
                    "the client has not read its replies within {} ms (write_timeout_ms); \
                     {} bytes unsent",
                    self.write_timeout.as_millis(),
                    outbox.unsent()
                );
                self.break_locked(outbox, &why);
                true
            }
            _ => false,
        }
    }

    /// Marks the connection closed so that late responders drop their
    /// replies instead of writing to a closed socket.
    fn close(&self) {
        let mut outbox = self.outbox.lock();
        outbox.broken = true;
        let _ = outbox.stream.shutdown(Shutdown::Both);
    }
}

/// The flusher: writes the replies that sockets did not take at once, as
/// they drain, and closes connections whose replies wait past
/// `write_timeout_ms`. It waits in `poll(2)` on the listed sockets only;
/// with none listed it sleeps on its channel.
fn flush_loop(shared: &ServerShared, backlog_rx: &crossbeam_channel::Receiver<Arc<Connection>>) {
    let mut listed: Vec<Arc<Connection>> = Vec::new();
    let mut fds: Vec<libc::pollfd> = Vec::new();
    while !shared.stopping.load(Ordering::SeqCst) {
        if listed.is_empty() {
            match backlog_rx.recv_timeout(Duration::from_millis(SLOT_WAIT_POLL_MS)) {
                Ok(connection) => listed.push(connection),
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => continue,
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
            }
        }
        listed.extend(backlog_rx.try_iter());
        fds.clear();
        fds.extend(listed.iter().map(|c| libc::pollfd {
            fd: c.fd,
            events: libc::POLLOUT,
            revents: 0,
        }));
        // SAFETY: `fds` holds `fds.len()` initialized pollfds; every fd is
        // owned by a connection in `listed`, which keeps it open.
        let ready =
            unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, FLUSH_POLL_MS) };
        if ready < 0 {
            let error = io::Error::last_os_error();
            if error.kind() != io::ErrorKind::Interrupted {
                error!("rpc server {}: poll failed: {error}", shared.local_addr);
                std::thread::sleep(Duration::from_millis(FLUSH_POLL_MS as u64));
            }
            continue;
        }
        let now = Instant::now();
        let mut k = 0;
        listed.retain(|connection| {
            let writable = fds[k].revents != 0;
            k += 1;
            connection.flush_backlog(writable, now)
        });
    }
}

/// An error frame always fits: `max_frame_bytes >= MIN_MAX_FRAME_BYTES`.
fn encode_error_frame(buf: &mut Vec<u8>, header: &FrameHeader, text: &str, max_frame_bytes: usize) {
    let encoded = encode_frame(buf, header, text, &[], max_frame_bytes);
    assert!(encoded.is_ok(), "an error frame exceeds max_frame_bytes");
}

fn method_label(header: &FrameHeader) -> String {
    match describe_method(header.service_id, header.method_id) {
        Some((service, method)) => format!("{service}/{method}"),
        None => format!("service {} method {}", header.service_id, header.method_id),
    }
}

thread_local! {
    /// The connections with replies deferred by this thread's open
    /// [`ReplyBatch`]; `None` outside a batch.
    static BATCH: std::cell::RefCell<Option<Vec<Arc<Connection>>>> =
        const { std::cell::RefCell::new(None) };
    /// The wake-ups deferred by this thread's open [`ReplyBatch`] (each listed once).
    static WAKES: std::cell::RefCell<Vec<Arc<dyn BatchWake>>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// Whoever is told that answers are ready (the Redis listener's I/O threads): told once
/// when the answering thread's [`ReplyBatch`] ends rather than once per answer.
pub trait BatchWake: Send + Sync {
    fn wake(&self);
}

/// Coalesces the replies one thread sends while it lives: each connection's
/// replies are written with one `write_all` when the batch ends, instead of
/// one system call (and one wake-up of the client) per reply. The apply
/// thread opens one around each group of tasks it handles, so a commit of
/// many entries answers a pipelining client in a single write.
///
/// Invariant: a reply deferred by a batch is written when the batch ends, or
/// earlier by any immediate reply on the same connection; it is never lost
/// while the connection lives. Batches do not nest.
pub struct ReplyBatch {
    /// A batch belongs to the thread that opened it.
    _not_send: std::marker::PhantomData<*const ()>,
}

impl ReplyBatch {
    pub fn begin() -> ReplyBatch {
        BATCH.with(|batch| {
            let mut batch = batch.borrow_mut();
            assert!(batch.is_none(), "ReplyBatch::begin inside a batch");
            *batch = Some(Vec::new());
        });
        ReplyBatch {
            _not_send: std::marker::PhantomData,
        }
    }

    fn is_open() -> bool {
        BATCH.with(|batch| batch.borrow().is_some())
    }

    /// Calls `waker.wake()` when this thread's batch ends (once, however often asked), or
    /// at once outside a batch.
    pub fn wake_at_end(waker: &Arc<dyn BatchWake>) {
        if !ReplyBatch::is_open() {
            return waker.wake();
        }
        WAKES.with(|wakes| {
            let mut wakes = wakes.borrow_mut();
            if !wakes.iter().any(|w| Arc::ptr_eq(w, waker)) {
                wakes.push(Arc::clone(waker));
            }
        });
    }

    /// Lists `connection` for the flush at the end of this thread's batch.
    fn defer(connection: &Arc<Connection>) {
        BATCH.with(|batch| {
            if let Some(list) = batch.borrow_mut().as_mut() {
                list.push(Arc::clone(connection));
            }
        });
    }
}

impl Drop for ReplyBatch {
    fn drop(&mut self) {
        let connections = BATCH
            .with(|batch| batch.borrow_mut().take())
            .unwrap_or_default();
        for connection in connections {
            connection.flush();
        }
        for waker in WAKES.with(|wakes| std::mem::take(&mut *wakes.borrow_mut())) {
            waker.wake();
        }
    }
}

/// The untyped answer channel of one call. It answers exactly once: with a
/// message, an error, or, when dropped unanswered, a `NoReply` error so the
/// caller never hangs.
pub struct RawResponder {
    /// `None` once answered.
    connection: Option<Arc<Connection>>,
    request: FrameHeader,
    /// A client request's arrival and its latency histogram (`/metrics`).
    timer: Option<(Instant, &'static crate::metrics::Histogram)>,
}

/// Starts timing a KVStore call, for its latency histogram.
fn request_timer(header: &FrameHeader) -> Option<(Instant, &'static crate::metrics::Histogram)> {
    use crate::rpc::services::kv_store;
    if header.service_id != kv_store::SERVICE_ID {
        return None;
    }
    let histogram =
        crate::metrics::client_request_histogram(kv_store::method_name(header.method_id)?)?;
    Some((Instant::now(), histogram))
}

impl RawResponder {
    /// The caller's call id.
    pub fn call_id(&self) -> u64 {
        self.request.call_id
    }

    /// The peer that made the call.
    pub fn peer(&self) -> Option<SocketAddr> {
        self.connection.as_ref().map(|c| c.peer)
    }

    /// Takes one unit of the connection's budget when fewer than `limit` were taken before
    /// on this connection; false (nothing taken) when the budget is spent.
    pub fn take_connection_budget(&self, limit: usize) -> bool {
        let Some(connection) = &self.connection else {
            return true;
        };
        connection
            .budget_used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                (used < limit).then_some(used + 1)
            })
            .is_ok()
    }

    /// Answers with `reply`, encoded straight into the connection's frame
    /// buffer.
    pub fn send_message<T: Message>(mut self, reply: &T) {
        if let Some(connection) = self.connection.take() {
            connection.reply(&self.request, |buf| {
                reply.write_to_vec(buf).map_err(|e| e.to_string())
            });
            connection.release_slot();
        }
    }

    /// Answers with an RPC-level error.
    pub fn send_error(mut self, code: RpcCode, text: &str) {
        if let Some(connection) = self.connection.take() {
            connection.reply_error(&self.request, code, text);
            connection.release_slot();
        }
    }
}

impl Drop for RawResponder {
    fn drop(&mut self) {
        // Answered or not, the call is over: time it.
        if let Some((received, histogram)) = self.timer.take() {
            histogram.observe_duration(received.elapsed());
        }
        if let Some(connection) = self.connection.take() {
            let text = format!(
                "the handler of {} dropped its responder without replying",
                method_label(&self.request)
            );
            debug!(
                "rpc call {} from {}: {text}",
                self.request.call_id, connection.peer
            );
            connection.reply_error(&self.request, RpcCode::NoReply, &text);
            connection.release_slot();
        }
    }
}

/// The typed answer channel a handler receives. Call [`Responder::send`] once,
/// from any thread; dropping it unanswered replies with a `NoReply` error.
pub struct Responder<T> {
    inner: ResponderInner<T>,
}

enum ResponderInner<T> {
    Remote(RawResponder),
    /// In-process delivery, for tests and local transports.
    Local(crossbeam_channel::Sender<Result<T, RpcError>>),
    /// In-process delivery to a function (the Redis listener's I/O threads).
    Callback(CallbackResponder<T>),
}

type AnswerFn<T> = Box<dyn FnOnce(Result<T, RpcError>) + Send>;

/// The answer function of [`Responder::callback`]. It is called exactly once: with the
/// answer, or with a `NoReply` error when the responder is dropped unanswered, so whoever
/// waits on it is never left waiting.
struct CallbackResponder<T> {
    /// `None` once called.
    answer: Option<AnswerFn<T>>,
}

impl<T> CallbackResponder<T> {
    fn call(&mut self, result: Result<T, RpcError>) {
        if let Some(answer) = self.answer.take() {
            answer(result);
        }
    }
}

impl<T> Drop for CallbackResponder<T> {
    fn drop(&mut self) {
        self.call(Err(RpcError::Remote {
            code: RpcCode::NoReply,
            message: "the handler dropped its responder without replying".into(),
        }));
    }
}

impl<T: Message> Responder<T> {
    /// A responder for a call that arrived on a connection.
    pub fn new(raw: RawResponder) -> Responder<T> {
        Responder {
            inner: ResponderInner::Remote(raw),
        }
    }

    /// A responder whose answer arrives on the returned receiver, without any
    /// connection: lets tests and in-process transports call a handler
    /// directly. A responder dropped unanswered disconnects the receiver.
    pub fn local() -> (
        Responder<T>,
        crossbeam_channel::Receiver<Result<T, RpcError>>,
    ) {
        let (tx, rx) = crossbeam_channel::bounded(1);
        (
            Responder {
                inner: ResponderInner::Local(tx),
            },
            rx,
        )
    }

    /// A responder whose answer is handed to `answer`, on the thread that answers (often
    /// the apply thread, so `answer` must be short and never block). A responder dropped
    /// unanswered calls `answer` with a `NoReply` error.
    pub fn callback(answer: impl FnOnce(Result<T, RpcError>) + Send + 'static) -> Responder<T> {
        Responder {
            inner: ResponderInner::Callback(CallbackResponder {
                answer: Some(Box::new(answer)),
            }),
        }
    }

    /// See [`RawResponder::take_connection_budget`]; a local responder has no connection
    /// and no budget to spend (always true).
    pub fn take_connection_budget(&self, limit: usize) -> bool {
        match &self.inner {
            ResponderInner::Remote(raw) => raw.take_connection_budget(limit),
            ResponderInner::Local(_) | ResponderInner::Callback(_) => true,
        }
    }

    /// The caller's call id (0 for a local responder).
    pub fn call_id(&self) -> u64 {
        match &self.inner {
            ResponderInner::Remote(raw) => raw.call_id(),
            ResponderInner::Local(_) | ResponderInner::Callback(_) => 0,
        }
    }

    /// Answers the call. When the connection has closed meanwhile the reply
    /// is dropped: nobody waits for it any more.
    pub fn send(self, reply: T) {
        match self.inner {
            ResponderInner::Remote(raw) => raw.send_message(&reply),
            ResponderInner::Local(tx) => {
                // A dropped receiver means nobody waits for the answer.
                let _ = tx.send(Ok(reply));
            }
            ResponderInner::Callback(mut answer) => answer.call(Ok(reply)),
        }
    }

    /// Fails the call at the RPC layer (e.g. `ShuttingDown`). Application
    /// errors belong in the reply's own header instead.
    pub fn send_error(self, code: RpcCode, text: &str) {
        match self.inner {
            ResponderInner::Remote(raw) => raw.send_error(code, text),
            ResponderInner::Local(tx) => {
                let _ = tx.send(Err(RpcError::Remote {
                    code,
                    message: text.to_string(),
                }));
            }
            ResponderInner::Callback(mut answer) => answer.call(Err(RpcError::Remote {
                code,
                message: text.to_string(),
            })),
        }
    }
}

/// Decodes `request` as `Req` and calls `handler` with a typed responder; an
/// undecodable request is answered with a `BadRequest` error. Used by the
/// generated dispatchers.
pub fn decode_and_call<Req: Message, Rep: Message>(
    request: &[u8],
    responder: RawResponder,
    handler: impl FnOnce(Req, Responder<Rep>),
) {
    match Req::parse_from_bytes(request) {
        Ok(request) => handler(request, Responder::new(responder)),
        Err(e) => {
            let text = format!(
                "cannot decode the request of {} as {}: {e}",
                method_label(&responder.request),
                Req::NAME
            );
            debug!("rpc call {}: {text}", responder.call_id());
            responder.send_error(RpcCode::BadRequest, &text);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_validation_names_the_bad_setting() {
        let bad = ServerConfig {
            max_connections: 0,
            ..ServerConfig::default()
        };
        let error = bad.validate().unwrap_err();
        assert!(error.to_string().contains("max_connections"), "{error}");
        let bad = ServerConfig {
            max_frame_bytes: 10,
            ..ServerConfig::default()
        };
        let error = bad.validate().unwrap_err();
        assert!(error.to_string().contains("max_frame_bytes"), "{error}");
        assert!(ServerConfig::default().validate().is_ok());
    }

    /// Regression: a writer sending one byte well inside every idle timeout
    /// held its connection (and a pool thread) for as long as it liked.
    #[test]
    fn a_slow_writer_is_closed_by_the_frame_timeout() {
        use std::io::{Read as _, Write as _};
        let config = ServerConfig {
            idle_timeout_ms: 5_000,
            frame_timeout_ms: 300,
            ..ServerConfig::default()
        };
        let server = RpcServer::bind("127.0.0.1:0", config, Router::new()).unwrap();
        let mut stream = TcpStream::connect(server.local_addr()).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        // A frame of 1000 bytes, one byte every 50 ms: 50 s if let run.
        let mut frame = 1000u32.to_be_bytes().to_vec();
        frame.resize(4 + 1000, 1);
        let started = Instant::now();
        let mut closed = false;
        for byte in frame.iter().take(200) {
            if stream.write_all(&[*byte]).is_err() {
                closed = true;
                break;
            }
            let mut sink = [0u8; 16];
            match stream.read(&mut sink) {
                Ok(0) => {
                    closed = true;
                    break;
                }
                Err(e) if !crate::rpc::frame::is_timeout(&e) => {
                    closed = true;
                    break;
                }
                _ => {}
            }
        }
        assert!(closed, "still open after {:?}", started.elapsed());
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "closed only after {:?}, by the idle timeout at best",
            started.elapsed()
        );
    }

    #[test]
    fn local_responder_delivers_and_disconnects_when_dropped() {
        use crate::proto::kvstore::GetReply;
        let (responder, rx) = Responder::<GetReply>::local();
        let mut reply = GetReply::new();
        reply.found = true;
        responder.send(reply.clone());
        assert_eq!(rx.recv().unwrap().unwrap(), reply);

        let (responder, rx) = Responder::<GetReply>::local();
        drop(responder);
        assert!(rx.recv().is_err());
    }
}
