//! A fault-injecting TCP proxy for one directed peer link: node `i` dials
//! node `j` through it, so whatever node `i` sends to `j` on its own
//! connections (requests, forward) and whatever comes back (replies,
//! backward) passes here. The proxy reads whole frames (the length prefix of
//! `rpc::frame`) and decides per frame, so a fault drops or delays a whole
//! message and never cuts one in the middle, as a lossy network would lose
//! packets but never hand a half message to the application.
//!
//! Faults are set per direction ([`DirectionFaults`]: drop a share of the
//! frames, black-hole all of them, delay each one) and per link (`refuse`:
//! close every connection and refuse new ones, a partition the nodes notice
//! at once). Every queue is bounded in frames and in bytes; a full queue
//! stops the reader, so a slow link pushes back on the sender as TCP would.

use std::io::{BufReader, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, SendTimeoutError, Sender};
use parking_lot::Mutex;

use crate::raft::SplitMix64;
use crate::rpc::frame::{read_frame, FrameError, LENGTH_PREFIX_BYTES};

/// Frames waiting in one direction of one connection.
const QUEUE_FRAMES: usize = 256;
/// Bytes waiting in one direction of one connection; a single larger frame
/// is still let through when the queue is empty.
const QUEUE_BYTES: usize = 8 << 20;
/// Connections open through one proxy at once; more are refused. A node
/// keeps one connection per peer, so this leaves room for reconnects.
const MAX_CONNECTIONS: usize = 16;
/// How often blocked threads look at the stop and close flags.
const POLL_MS: u64 = 20;
/// The proxy's own dial to the real node.
const CONNECT_TIMEOUT_MS: u64 = 500;
/// The longest delay a link accepts: a bound on how long a frame waits.
pub const MAX_DELAY_MS: u64 = 10_000;
/// Drop probabilities are in parts per million.
pub const PER_MILLION: u32 = 1_000_000;

/// What happens to the frames of one direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirectionFaults {
    /// Each frame is dropped with this probability, in parts per million.
    pub drop_per_million: u32,
    /// Every frame is dropped (a one-way partition).
    pub black_hole: bool,
    /// Every frame is held this long before it is passed on (order kept).
    pub delay_ms: u64,
}

impl DirectionFaults {
    pub fn is_healthy(&self) -> bool {
        *self == DirectionFaults::default()
    }
}

/// The faults of one link.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkFaults {
    /// From the dialing node to the dialed one (requests).
    pub forward: DirectionFaults,
    /// From the dialed node back (replies).
    pub backward: DirectionFaults,
    /// Close every connection and refuse new ones.
    pub refuse: bool,
}

impl LinkFaults {
    pub fn is_healthy(&self) -> bool {
        *self == LinkFaults::default()
    }
}

/// Which way a frame travels through the proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Forward,
    Backward,
}

/// Counters of what the proxy did, for reports and tests.
#[derive(Debug, Default)]
pub struct ProxyStats {
    /// Frames passed on (possibly after a delay).
    pub frames_passed: AtomicU64,
    pub frames_dropped: AtomicU64,
    /// Frames held for a delay above zero.
    pub frames_delayed: AtomicU64,
    pub connections_refused: AtomicU64,
}

/// One open connection through the proxy: both sockets, so that it can be
/// closed from outside, and the flag its pump threads watch.
struct Connection {
    closed: Arc<AtomicBool>,
    sockets: [TcpStream; 2],
}

impl Connection {
    fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        // A shutdown fails only on a socket that is already closed, which is
        // the state wanted; the same holds for the shutdowns below.
        for socket in &self.sockets {
            let _ = socket.shutdown(Shutdown::Both);
        }
    }
}

struct Shared {
    target: SocketAddr,
    max_frame_bytes: usize,
    faults: Mutex<LinkFaults>,
    connections: Mutex<Vec<Connection>>,
    rng: Mutex<SplitMix64>,
    stopping: AtomicBool,
    stats: ProxyStats,
}

impl Shared {
    fn faults(&self, direction: Direction) -> DirectionFaults {
        let faults = self.faults.lock();
        match direction {
            Direction::Forward => faults.forward,
            Direction::Backward => faults.backward,
        }
    }

    /// Whether a frame going `direction` is dropped, and if not, its delay.
    fn fate(&self, direction: Direction) -> Option<u64> {
        let faults = self.faults(direction);
        let dropped = faults.black_hole
            || (faults.drop_per_million > 0
                && self
                    .rng
                    .lock()
                    .chance(u64::from(faults.drop_per_million), u64::from(PER_MILLION)));
        (!dropped).then_some(faults.delay_ms.min(MAX_DELAY_MS))
    }

    fn close_all(&self) {
        let mut connections = self.connections.lock();
        for connection in connections.iter() {
            connection.close();
        }
        connections.clear();
    }
}

/// The proxy of one directed link. Dropping it stops it and closes its
/// connections.
pub struct LinkProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl LinkProxy {
    /// Listens on a free port of 127.0.0.1 and forwards to `target`. `seed`
    /// seeds the drop decisions.
    pub fn start(
        target: SocketAddr,
        max_frame_bytes: usize,
        seed: u64,
    ) -> std::io::Result<LinkProxy> {
        let listener = TcpListener::bind(("127.0.0.1", 0))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            target,
            max_frame_bytes,
            faults: Mutex::new(LinkFaults::default()),
            connections: Mutex::new(Vec::new()),
            rng: Mutex::new(SplitMix64::new(seed)),
            stopping: AtomicBool::new(false),
            stats: ProxyStats::default(),
        });
        let acceptor = {
            let shared = Arc::clone(&shared);
            thread::Builder::new()
                .name(format!("proxy-{}", addr.port()))
                .spawn(move || accept_loop(listener, shared))?
        };
        Ok(LinkProxy {
            addr,
            shared,
            acceptor: Some(acceptor),
        })
    }

    /// The address the dialing node uses for its peer.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn faults(&self) -> LinkFaults {
        *self.shared.faults.lock()
    }

    /// Sets the link's faults; `refuse` closes the open connections at once.
    pub fn set_faults(&self, faults: LinkFaults) {
        *self.shared.faults.lock() = faults;
        if faults.refuse {
            self.shared.close_all();
        }
    }

    /// Clears every fault. A link that had one also has its connections
    /// closed: frames black-holed on a pipelined connection leave calls that
    /// will never be answered, and a fresh connection is what a node would
    /// get from a network that came back.
    pub fn heal(&self) {
        let had_faults = !self.faults().is_healthy();
        *self.shared.faults.lock() = LinkFaults::default();
        if had_faults {
            self.shared.close_all();
        }
    }

    pub fn stats(&self) -> &ProxyStats {
        &self.shared.stats
    }
}

impl Drop for LinkProxy {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.shared.close_all();
        if let Some(acceptor) = self.acceptor.take() {
            if acceptor.join().is_err() {
                log::warn!("proxy {}: the accept thread panicked", self.addr);
            }
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    while !shared.stopping.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((client, _)) => {
                if let Err(e) = open(client, &shared) {
                    log::debug!("proxy to {}: connection not opened: {e}", shared.target);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(POLL_MS));
            }
            Err(e) => {
                log::warn!("proxy to {}: accept failed: {e}", shared.target);
                thread::sleep(Duration::from_millis(POLL_MS));
            }
        }
    }
}

/// Connects an accepted client to the target and starts the two pumps, or
/// closes it when the link refuses or is full.
fn open(client: TcpStream, shared: &Arc<Shared>) -> std::io::Result<()> {
    let mut connections = shared.connections.lock();
    connections.retain(|c| !c.closed.load(Ordering::SeqCst));
    if shared.faults.lock().refuse || connections.len() >= MAX_CONNECTIONS {
        shared
            .stats
            .connections_refused
            .fetch_add(1, Ordering::Relaxed);
        let _ = client.shutdown(Shutdown::Both);
        return Ok(());
    }
    client.set_nonblocking(false)?;
    let server =
        TcpStream::connect_timeout(&shared.target, Duration::from_millis(CONNECT_TIMEOUT_MS))?;
    for socket in [&client, &server] {
        socket.set_nodelay(true)?;
        socket.set_read_timeout(Some(Duration::from_millis(POLL_MS * 5)))?;
    }
    let closed = Arc::new(AtomicBool::new(false));
    let pumps = [
        (Direction::Forward, client.try_clone()?, server.try_clone()?),
        (
            Direction::Backward,
            server.try_clone()?,
            client.try_clone()?,
        ),
    ];
    for (direction, from, to) in pumps {
        start_pump(direction, from, to, Arc::clone(shared), Arc::clone(&closed))?;
    }
    connections.push(Connection {
        closed,
        sockets: [client, server],
    });
    Ok(())
}

/// A frame on its way: its bytes (prefix included) and when it may go.
struct Held {
    release_at: Instant,
    bytes: Vec<u8>,
}

/// One direction of one connection: a reader thread that judges each frame
/// and a writer thread that passes it on after its delay.
fn start_pump(
    direction: Direction,
    from: TcpStream,
    to: TcpStream,
    shared: Arc<Shared>,
    closed: Arc<AtomicBool>,
) -> std::io::Result<()> {
    let (sender, receiver) = bounded(QUEUE_FRAMES);
    let queued_bytes = Arc::new(AtomicUsize::new(0));
    let writer = Writer {
        to,
        closed: Arc::clone(&closed),
        queued_bytes: Arc::clone(&queued_bytes),
    };
    thread::Builder::new()
        .name("proxy-writer".into())
        .spawn(move || writer.run(receiver))?;
    let reader = Reader {
        direction,
        from,
        shared,
        closed,
        queued_bytes,
    };
    thread::Builder::new()
        .name("proxy-reader".into())
        .spawn(move || reader.run(sender))?;
    Ok(())
}

struct Reader {
    direction: Direction,
    from: TcpStream,
    shared: Arc<Shared>,
    closed: Arc<AtomicBool>,
    queued_bytes: Arc<AtomicUsize>,
}

impl Reader {
    fn run(self, queue: Sender<Held>) {
        let mut input = BufReader::new(&self.from);
        let mut buf = Vec::new();
        while self.is_open() {
            let frame_bytes = match read_frame(&mut input, &mut buf, self.shared.max_frame_bytes) {
                Ok(_) => buf.len(),
                Err(FrameError::Idle) => continue,
                Err(e) => {
                    log::debug!("proxy to {}: {e}", self.shared.target);
                    break;
                }
            };
            let Some(delay_ms) = self.shared.fate(self.direction) else {
                self.count(&self.shared.stats.frames_dropped);
                continue;
            };
            self.count(&self.shared.stats.frames_passed);
            if delay_ms > 0 {
                self.count(&self.shared.stats.frames_delayed);
            }
            let mut bytes = Vec::with_capacity(LENGTH_PREFIX_BYTES + frame_bytes);
            bytes.extend_from_slice(&(frame_bytes as u32).to_be_bytes());
            bytes.extend_from_slice(&buf);
            let held = Held {
                release_at: Instant::now() + Duration::from_millis(delay_ms),
                bytes,
            };
            if !self.enqueue(&queue, held) {
                break;
            }
        }
        self.closed.store(true, Ordering::SeqCst);
        let _ = self.from.shutdown(Shutdown::Both);
    }

    fn is_open(&self) -> bool {
        !self.closed.load(Ordering::SeqCst) && !self.shared.stopping.load(Ordering::SeqCst)
    }

    fn count(&self, counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Waits for room (frames and bytes) and queues the frame; false when
    /// the connection closed meanwhile.
    fn enqueue(&self, queue: &Sender<Held>, held: Held) -> bool {
        let size = held.bytes.len();
        while self.queued_bytes.load(Ordering::SeqCst) > 0
            && self.queued_bytes.load(Ordering::SeqCst) + size > QUEUE_BYTES
        {
            if !self.is_open() {
                return false;
            }
            thread::sleep(Duration::from_millis(1));
        }
        self.queued_bytes.fetch_add(size, Ordering::SeqCst);
        let mut held = held;
        loop {
            match queue.send_timeout(held, Duration::from_millis(POLL_MS)) {
                Ok(()) => return true,
                Err(SendTimeoutError::Timeout(unsent)) if self.is_open() => held = unsent,
                Err(_) => return false,
            }
        }
    }
}

struct Writer {
    to: TcpStream,
    closed: Arc<AtomicBool>,
    queued_bytes: Arc<AtomicUsize>,
}

impl Writer {
    fn run(mut self, queue: Receiver<Held>) {
        loop {
            let held = match queue.recv_timeout(Duration::from_millis(POLL_MS)) {
                Ok(held) => held,
                Err(RecvTimeoutError::Timeout) if !self.closed.load(Ordering::SeqCst) => continue,
                Err(_) => break,
            };
            if !self.wait_until(held.release_at) {
                break;
            }
            let written = self.to.write_all(&held.bytes);
            self.queued_bytes
                .fetch_sub(held.bytes.len(), Ordering::SeqCst);
            if written.is_err() {
                break;
            }
        }
        self.closed.store(true, Ordering::SeqCst);
        let _ = self.to.shutdown(Shutdown::Both);
    }

    /// Sleeps until `release_at`; false when the connection closed first.
    fn wait_until(&self, release_at: Instant) -> bool {
        loop {
            if self.closed.load(Ordering::SeqCst) {
                return false;
            }
            let now = Instant::now();
            if now >= release_at {
                return true;
            }
            thread::sleep((release_at - now).min(Duration::from_millis(POLL_MS)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rpc::frame::{encode_frame, FrameHeader};
    use std::io::Read;

    const MAX_FRAME_BYTES: usize = 1 << 20;

    /// An echo server: every frame it reads is written back unchanged.
    fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let addr = listener.local_addr().unwrap();
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = stream.read(&mut buf) {
                        if n == 0 || stream.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    fn frame(call_id: u64) -> Vec<u8> {
        let mut out = Vec::new();
        let header = FrameHeader::request(1, 2, call_id);
        encode_frame(&mut out, &header, "", b"payload", MAX_FRAME_BYTES).unwrap();
        out
    }

    fn connect(proxy: &LinkProxy) -> BufReader<TcpStream> {
        let stream = TcpStream::connect(proxy.addr()).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_millis(1_500)))
            .unwrap();
        BufReader::new(stream)
    }

    /// The call id of the next echoed frame, or None when none came in time
    /// or the connection ended.
    fn echoed(stream: &mut BufReader<TcpStream>) -> Option<u64> {
        let mut buf = Vec::new();
        read_frame(stream, &mut buf, MAX_FRAME_BYTES)
            .ok()
            .map(|frame| frame.header.call_id)
    }

    fn send(stream: &mut BufReader<TcpStream>, call_id: u64) {
        stream.get_mut().write_all(&frame(call_id)).unwrap();
    }

    #[test]
    fn healthy_link_passes_whole_frames_in_order() {
        let proxy = LinkProxy::start(echo_server(), MAX_FRAME_BYTES, 1).unwrap();
        let mut stream = connect(&proxy);
        for call_id in 1..=20 {
            send(&mut stream, call_id);
        }
        let got: Vec<Option<u64>> = (0..20).map(|_| echoed(&mut stream)).collect();
        assert_eq!(got, (1..=20).map(Some).collect::<Vec<_>>());
        // Each frame crosses the proxy twice (there and back).
        assert_eq!(proxy.stats().frames_passed.load(Ordering::Relaxed), 40);
        assert_eq!(proxy.stats().frames_dropped.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn drop_loses_whole_frames_and_the_rest_arrive_intact() {
        let proxy = LinkProxy::start(echo_server(), MAX_FRAME_BYTES, 7).unwrap();
        proxy.set_faults(LinkFaults {
            forward: DirectionFaults {
                drop_per_million: PER_MILLION / 2,
                ..Default::default()
            },
            ..Default::default()
        });
        let mut stream = connect(&proxy);
        for call_id in 1..=200 {
            send(&mut stream, call_id);
        }
        let dropped = proxy.stats().frames_dropped.load(Ordering::Relaxed);
        let mut got = Vec::new();
        while let Some(call_id) = echoed(&mut stream) {
            got.push(call_id);
            if got.len() as u64 + dropped == 200 {
                break;
            }
        }
        let dropped = proxy.stats().frames_dropped.load(Ordering::Relaxed);
        assert!((40..=160).contains(&dropped), "dropped {dropped} of 200");
        assert_eq!(got.len() as u64 + dropped, 200);
        assert!(got.windows(2).all(|w| w[0] < w[1]), "order kept: {got:?}");
    }

    #[test]
    fn delay_holds_each_frame() {
        let proxy = LinkProxy::start(echo_server(), MAX_FRAME_BYTES, 1).unwrap();
        proxy.set_faults(LinkFaults {
            backward: DirectionFaults {
                delay_ms: 300,
                ..Default::default()
            },
            ..Default::default()
        });
        let mut stream = connect(&proxy);
        let start = Instant::now();
        send(&mut stream, 5);
        assert_eq!(echoed(&mut stream), Some(5));
        assert!(start.elapsed() >= Duration::from_millis(300));
        assert_eq!(proxy.stats().frames_delayed.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn black_hole_and_refuse_block_the_link_and_heal_restores_it() {
        let proxy = LinkProxy::start(echo_server(), MAX_FRAME_BYTES, 1).unwrap();
        let mut stream = connect(&proxy);
        proxy.set_faults(LinkFaults {
            backward: DirectionFaults {
                black_hole: true,
                ..Default::default()
            },
            ..Default::default()
        });
        send(&mut stream, 1);
        assert_eq!(echoed(&mut stream), None, "the reply was black-holed");
        proxy.set_faults(LinkFaults {
            refuse: true,
            ..Default::default()
        });
        // The open connection is closed and a new one is closed at once.
        assert_eq!(echoed(&mut stream), None);
        let mut refused = connect(&proxy);
        let _ = refused.get_mut().write_all(&frame(2));
        assert_eq!(echoed(&mut refused), None);
        assert!(proxy.stats().connections_refused.load(Ordering::Relaxed) >= 1);
        proxy.heal();
        let mut healed = connect(&proxy);
        send(&mut healed, 3);
        assert_eq!(echoed(&mut healed), Some(3));
    }
}
