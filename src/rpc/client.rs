//! The client side: the [`RpcChannel`] trait the generated stubs call
//! through, [`RpcClient`] (one blocking call at a time on one connection,
//! with connect and call timeouts, reconnecting on the next call after a
//! failure), and [`PipelinedConnection`] (many calls in flight on one
//! connection, replies delivered by call id to a channel), which the Raft
//! peer senders use to stream AppendEntries without waiting for each reply.
//! Both open every connection with the [`handshake`](super::handshake),
//! presenting their [`Credentials`].

use std::collections::HashSet;
use std::fmt;
use std::io::{self, BufReader, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{debug, warn};
use parking_lot::Mutex;
use protobuf::Message;

use super::frame::{
    finish_frame, read_frame, start_frame, Frame, FrameError, FrameHeader, FrameKind, RpcCode,
};
use super::handshake::{self, Credentials, HandshakeError};
use super::server::RETAINED_BUFFER_BYTES;

/// Read buffer of a client connection.
const READ_BUFFER_BYTES: usize = 16 * 1024;
/// A connection unused for this long is checked before reuse: the server may
/// have closed it for idleness, and a call sent into a closed connection
/// would fail although the server is up. Busy connections skip the check.
const STALE_CHECK_AFTER_MS: u64 = 100;
/// How often a pipeline reader blocked on a full reply channel checks
/// whether its connection is being closed.
const DELIVERY_POLL_MS: u64 = 50;

/// Why a call failed.
#[derive(Debug, Clone)]
pub enum RpcError {
    /// Connecting, sending or receiving failed at the socket level.
    Io {
        peer: SocketAddr,
        /// What the client was doing: "connecting", "sending", "receiving".
        during: &'static str,
        error: Arc<io::Error>,
    },
    /// No reply arrived in time. The call may or may not have run.
    Timeout { peer: SocketAddr, timeout_ms: u64 },
    /// A request or reply exceeds `max_frame_bytes`.
    FrameTooLarge {
        frame_bytes: u64,
        max_frame_bytes: usize,
    },
    /// The server answered with an RPC-level error.
    Remote { code: RpcCode, message: String },
    /// The reply frame or message could not be decoded.
    Decode(String),
    /// The request could not be encoded or sent as asked (nothing was sent).
    Encode(String),
    /// The connection was closed (by the peer, or by `close`).
    Closed { peer: SocketAddr },
    /// A pipelined connection already has `max_outstanding` calls in flight.
    Overloaded { max_outstanding: usize },
    /// The server refused our handshake (wrong cluster, secret, member);
    /// `reason` is worded from our side. Retrying cannot help.
    Refused { peer: SocketAddr, reason: String },
    /// The handshake broke down: the server does not speak it, or could not
    /// prove that it holds the cluster secret.
    Handshake { peer: SocketAddr, message: String },
}

impl fmt::Display for RpcError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RpcError::Io {
                peer,
                during,
                error,
            } => {
                write!(f, "rpc to {peer} failed while {during}: {error}")
            }
            RpcError::Timeout { peer, timeout_ms } => {
                write!(f, "rpc to {peer} got no reply within {timeout_ms} ms")
            }
            RpcError::FrameTooLarge {
                frame_bytes,
                max_frame_bytes,
            } => write!(
                f,
                "rpc frame of {frame_bytes} bytes exceeds max_frame_bytes ({max_frame_bytes})"
            ),
            RpcError::Remote { code, message } => {
                write!(f, "rpc failed on the server ({code}): {message}")
            }
            RpcError::Decode(what) => write!(f, "rpc reply cannot be decoded: {what}"),
            RpcError::Encode(what) => write!(f, "rpc request cannot be sent: {what}"),
            RpcError::Closed { peer } => write!(f, "rpc connection to {peer} is closed"),
            RpcError::Overloaded { max_outstanding } => write!(
                f,
                "rpc connection already has {max_outstanding} calls in flight (max_outstanding)"
            ),
            RpcError::Refused { peer, reason } => write!(f, "peer {peer} refused us: {reason}"),
            RpcError::Handshake { peer, message } => {
                write!(f, "handshake with {peer} failed: {message}")
            }
        }
    }
}

impl std::error::Error for RpcError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            RpcError::Io { error, .. } => Some(error.as_ref()),
            _ => None,
        }
    }
}

impl RpcError {
    fn io(peer: SocketAddr, during: &'static str, error: io::Error) -> RpcError {
        RpcError::Io {
            peer,
            during,
            error: Arc::new(error),
        }
    }

    /// Maps a failed handshake with `peer`.
    fn from_handshake(peer: SocketAddr, error: HandshakeError) -> RpcError {
        match error {
            HandshakeError::Refused { reason, .. } => RpcError::Refused { peer, reason },
            HandshakeError::Protocol(message) => RpcError::Handshake { peer, message },
            HandshakeError::Timeout { timeout_ms } => RpcError::Timeout { peer, timeout_ms },
            HandshakeError::Closed => RpcError::Closed { peer },
            HandshakeError::Io(e) => RpcError::io(peer, "handshaking", e),
        }
    }

    /// Maps a failure to read a reply frame; `timeout_ms` is what the read
    /// waited for.
    fn from_frame(peer: SocketAddr, error: FrameError, timeout_ms: u64) -> RpcError {
        match error {
            FrameError::Closed => RpcError::Closed { peer },
            FrameError::Idle => RpcError::Timeout { peer, timeout_ms },
            FrameError::TooLarge {
                frame_bytes,
                max_frame_bytes,
            } => RpcError::FrameTooLarge {
                frame_bytes,
                max_frame_bytes,
            },
            FrameError::Malformed(what) => {
                RpcError::Decode(format!("malformed frame from {peer}: {what}"))
            }
            truncated @ FrameError::Truncated { .. } => RpcError::io(
                peer,
                "receiving",
                io::Error::new(io::ErrorKind::UnexpectedEof, truncated.to_string()),
            ),
            FrameError::Io(e) => RpcError::io(peer, "receiving", e),
        }
    }
}

/// Anything that carries one call to a server and returns its reply bytes:
/// the transport under the generated stubs.
pub trait RpcChannel {
    /// Sends `request` to method `method_id` of service `service_id` and
    /// waits for the reply's message bytes.
    fn call_method(
        &self,
        service_id: u32,
        method_id: u32,
        request: &[u8],
    ) -> Result<Vec<u8>, RpcError>;
}

impl<T: RpcChannel + ?Sized> RpcChannel for &T {
    fn call_method(
        &self,
        service_id: u32,
        method_id: u32,
        request: &[u8],
    ) -> Result<Vec<u8>, RpcError> {
        (**self).call_method(service_id, method_id, request)
    }
}

impl<T: RpcChannel + ?Sized> RpcChannel for Arc<T> {
    fn call_method(
        &self,
        service_id: u32,
        method_id: u32,
        request: &[u8],
    ) -> Result<Vec<u8>, RpcError> {
        (**self).call_method(service_id, method_id, request)
    }
}

impl<T: RpcChannel + ?Sized> RpcChannel for Box<T> {
    fn call_method(
        &self,
        service_id: u32,
        method_id: u32,
        request: &[u8],
    ) -> Result<Vec<u8>, RpcError> {
        (**self).call_method(service_id, method_id, request)
    }
}

/// Encodes `request`, calls it through `channel` and decodes the reply. Used
/// by the generated stubs.
pub fn call_unary<C: RpcChannel + ?Sized, Req: Message, Rep: Message>(
    channel: &C,
    service_id: u32,
    method_id: u32,
    request: &Req,
) -> Result<Rep, RpcError> {
    let bytes = request
        .write_to_bytes()
        .map_err(|e| RpcError::Encode(format!("cannot encode {}: {e}", Req::NAME)))?;
    let reply = channel.call_method(service_id, method_id, &bytes)?;
    decode_message(&reply)
}

/// Decodes reply bytes as `T`, e.g. a pipelined reply.
pub fn decode_message<T: Message>(bytes: &[u8]) -> Result<T, RpcError> {
    T::parse_from_bytes(bytes)
        .map_err(|e| RpcError::Decode(format!("not a valid {}: {e}", T::NAME)))
}

/// Limits of an [`RpcClient`].
#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub connect_timeout_ms: u64,
    /// From sending a request to receiving its whole reply.
    pub call_timeout_ms: u64,
    /// Largest request or reply frame, header included.
    pub max_frame_bytes: usize,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            connect_timeout_ms: 1_000,
            call_timeout_ms: 5_000,
            max_frame_bytes: 16 * 1024 * 1024,
        }
    }
}

/// A blocking client: one call at a time on one connection (calls from
/// several threads take turns). Any failure other than an error answered by
/// the server drops the connection, and the next call connects again, so a
/// late reply to a timed-out call can never be taken for another call's.
pub struct RpcClient {
    peer: SocketAddr,
    config: ClientConfig,
    /// Presented in the handshake of every connection.
    credentials: Credentials,
    state: Mutex<ClientState>,
}

struct ClientState {
    connection: Option<ClientConnection>,
    next_call_id: u64,
    /// Reused for every request and reply frame.
    buf: Vec<u8>,
}

struct ClientConnection {
    writer: TcpStream,
    reader: BufReader<TcpStream>,
    last_used: Instant,
}

impl ClientConnection {
    /// Whether the server has closed this connection (or sent bytes nobody
    /// asked for). Only a non-blocking peek: no byte is consumed.
    fn is_stale(&self) -> bool {
        if !self.reader.buffer().is_empty() {
            return true;
        }
        let stream = self.reader.get_ref();
        if stream.set_nonblocking(true).is_err() {
            return true;
        }
        let peeked = stream.peek(&mut [0u8; 1]);
        if stream.set_nonblocking(false).is_err() {
            return true;
        }
        match peeked {
            Err(e) => e.kind() != io::ErrorKind::WouldBlock,
            // End of stream, or unexpected data.
            Ok(_) => true,
        }
    }
}

impl RpcClient {
    /// A client for `peer` that connects on its first call, as a clerk of
    /// the default cluster (see [`RpcClient::with_credentials`]).
    pub fn new(peer: SocketAddr, config: ClientConfig) -> RpcClient {
        RpcClient {
            peer,
            config,
            credentials: Credentials::default(),
            state: Mutex::new(ClientState {
                connection: None,
                next_call_id: 1,
                buf: Vec::new(),
            }),
        }
    }

    /// A client for `peer`, connected now so that an unreachable server is
    /// reported at once.
    pub fn connect(peer: SocketAddr, config: ClientConfig) -> Result<RpcClient, RpcError> {
        let client = RpcClient::new(peer, config);
        client.reconnect()?;
        Ok(client)
    }

    /// Presents `credentials` in the handshake of every later connection;
    /// the current one, if any, is closed.
    pub fn with_credentials(self, credentials: Credentials) -> RpcClient {
        self.disconnect();
        RpcClient {
            credentials,
            ..self
        }
    }

    /// Opens a new connection now, replacing the current one.
    pub fn reconnect(&self) -> Result<(), RpcError> {
        let connection = open_connection(self.peer, &self.config, &self.credentials)?;
        self.state.lock().connection = Some(connection);
        Ok(())
    }

    /// The server this client calls.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// Whether a connection is open now (it may still turn out broken).
    pub fn is_connected(&self) -> bool {
        self.state.lock().connection.is_some()
    }

    /// Closes the connection; the next call opens a new one.
    pub fn disconnect(&self) {
        if let Some(connection) = self.state.lock().connection.take() {
            let _ = connection.writer.shutdown(Shutdown::Both);
        }
    }
}

/// Connects and runs the handshake, each within `connect_timeout_ms`.
fn open_connection(
    peer: SocketAddr,
    config: &ClientConfig,
    credentials: &Credentials,
) -> Result<ClientConnection, RpcError> {
    let connect = || -> io::Result<TcpStream> {
        let stream =
            TcpStream::connect_timeout(&peer, Duration::from_millis(config.connect_timeout_ms))?;
        stream.set_nodelay(true)?;
        stream.set_write_timeout(Some(Duration::from_millis(config.call_timeout_ms)))?;
        Ok(stream)
    };
    let stream = connect().map_err(|e| {
        if super::frame::is_timeout(&e) {
            RpcError::Timeout {
                peer,
                timeout_ms: config.connect_timeout_ms,
            }
        } else {
            RpcError::io(peer, "connecting", e)
        }
    })?;
    handshake::connect(&stream, credentials, config.connect_timeout_ms)
        .map_err(|e| RpcError::from_handshake(peer, e))?;
    let reader = stream
        .try_clone()
        .map_err(|e| RpcError::io(peer, "connecting", e))?;
    Ok(ClientConnection {
        writer: stream,
        reader: BufReader::with_capacity(READ_BUFFER_BYTES, reader),
        last_used: Instant::now(),
    })
}

impl RpcChannel for RpcClient {
    fn call_method(
        &self,
        service_id: u32,
        method_id: u32,
        request: &[u8],
    ) -> Result<Vec<u8>, RpcError> {
        let mut guard = self.state.lock();
        let state = &mut *guard;
        let call_id = state.next_call_id;
        state.next_call_id += 1;
        let header = FrameHeader::request(service_id, method_id, call_id);
        start_frame(&mut state.buf);
        state.buf.extend_from_slice(request);
        if let Err(e) = finish_frame(&mut state.buf, &header, self.config.max_frame_bytes) {
            return Err(RpcError::from_frame(self.peer, e, 0));
        }
        let stale = state.connection.as_ref().is_some_and(|connection| {
            connection.last_used.elapsed() >= Duration::from_millis(STALE_CHECK_AFTER_MS)
                && connection.is_stale()
        });
        if stale {
            debug!(
                "rpc client {}: the idle connection was closed; reconnecting",
                self.peer
            );
            state.connection = None;
        }
        if state.connection.is_none() {
            state.connection = Some(open_connection(self.peer, &self.config, &self.credentials)?);
        }
        let connection = state.connection.as_mut().expect("connected just above");
        let result = exchange(self.peer, &self.config, connection, &mut state.buf, call_id);
        connection.last_used = Instant::now();
        if state.buf.capacity() > RETAINED_BUFFER_BYTES {
            state.buf = Vec::new();
        }
        match result {
            Ok(reply) => Ok(reply),
            Err(e @ RpcError::Remote { .. }) => Err(e),
            Err(e) => {
                // The connection's state is unknown (a late reply may still
                // come): start afresh on the next call.
                debug!(
                    "rpc client {}: dropping the connection after: {e}",
                    self.peer
                );
                if let Some(connection) = state.connection.take() {
                    let _ = connection.writer.shutdown(Shutdown::Both);
                }
                Err(e)
            }
        }
    }
}

/// Writes the request frame in `buf` and reads the reply to `call_id`.
fn exchange(
    peer: SocketAddr,
    config: &ClientConfig,
    connection: &mut ClientConnection,
    buf: &mut Vec<u8>,
    call_id: u64,
) -> Result<Vec<u8>, RpcError> {
    let timeout_ms = config.call_timeout_ms;
    let timeout = Duration::from_millis(timeout_ms);
    let started = Instant::now();
    connection.writer.write_all(buf).map_err(|e| {
        if super::frame::is_timeout(&e) {
            RpcError::Timeout { peer, timeout_ms }
        } else {
            RpcError::io(peer, "sending", e)
        }
    })?;
    let remaining = timeout
        .checked_sub(started.elapsed())
        .filter(|d| !d.is_zero())
        .ok_or(RpcError::Timeout { peer, timeout_ms })?;
    connection
        .reader
        .get_ref()
        .set_read_timeout(Some(remaining))
        .map_err(|e| RpcError::io(peer, "receiving", e))?;
    let frame = read_frame(&mut connection.reader, buf, config.max_frame_bytes)
        .map_err(|e| RpcError::from_frame(peer, e, timeout_ms))?;
    if frame.header.call_id != call_id {
        return Err(RpcError::Decode(format!(
            "reply from {peer} is for call {} while call {call_id} is the only one in flight",
            frame.header.call_id
        )));
    }
    reply_result(peer, &frame)
}

/// The outcome carried by a response frame.
fn reply_result(peer: SocketAddr, frame: &Frame<'_>) -> Result<Vec<u8>, RpcError> {
    if frame.header.kind != FrameKind::Response {
        return Err(RpcError::Decode(format!(
            "{peer} sent a request frame where a response was expected"
        )));
    }
    match frame.header.code {
        RpcCode::Ok => Ok(frame.body.to_vec()),
        code => Err(RpcError::Remote {
            code,
            message: frame.error_text.to_string(),
        }),
    }
}

/// One reply of a pipelined call: its call id and outcome.
pub type PipelinedReply = (u64, Result<Vec<u8>, RpcError>);

/// Limits of a [`PipelinedConnection`].
#[derive(Debug, Clone)]
pub struct PipelinedConfig {
    pub connect_timeout_ms: u64,
    /// A request write blocked this long breaks the connection.
    pub write_timeout_ms: u64,
    /// With calls in flight, no reply for this long breaks the connection.
    pub reply_timeout_ms: u64,
    pub max_frame_bytes: usize,
    /// Calls sent and not yet answered; `send` fails beyond this.
    pub max_outstanding: usize,
    /// Presented in the handshake.
    pub credentials: Credentials,
    /// The handshake must be done within this long after connecting.
    pub handshake_timeout_ms: u64,
}

impl Default for PipelinedConfig {
    fn default() -> Self {
        PipelinedConfig {
            connect_timeout_ms: 1_000,
            write_timeout_ms: 5_000,
            reply_timeout_ms: 5_000,
            max_frame_bytes: 16 * 1024 * 1024,
            max_outstanding: 256,
            credentials: Credentials::default(),
            handshake_timeout_ms: 1_000,
        }
    }
}

/// A connection carrying many calls at once: `send` writes a request without
/// waiting, and a reader thread delivers each reply, by call id, into the
/// channel given to `connect`. Every call accepted by `send` gets exactly one
/// entry in that channel: its reply, or an error when the connection breaks
/// or is closed. A broken connection stays broken; make a new one.
pub struct PipelinedConnection {
    peer: SocketAddr,
    shared: Arc<PipelineShared>,
    reader: Option<JoinHandle<()>>,
}

struct PipelineShared {
    peer: SocketAddr,
    config: PipelinedConfig,
    /// Requests are written whole under this lock; the buffer is reused.
    writer: Mutex<(TcpStream, Vec<u8>)>,
    calls: Mutex<CallTable>,
    /// Set by `close`: a reader blocked on a full reply channel gives up, so
    /// closing never waits for the consumer (who may be the closer).
    closing: AtomicBool,
}

struct CallTable {
    /// Calls sent and not yet answered.
    /// Invariant: `outstanding.len() <= config.max_outstanding`.
    outstanding: HashSet<u64>,
    /// Why the connection broke; set once, never cleared.
    failure: Option<RpcError>,
}

impl PipelinedConnection {
    /// Connects to `peer` and starts the reader thread that delivers replies
    /// into `replies`. A bounded `replies` channel that fills up stalls the
    /// reader (and so, through TCP, the server): drain it promptly.
    pub fn connect(
        peer: SocketAddr,
        config: PipelinedConfig,
        replies: crossbeam_channel::Sender<PipelinedReply>,
    ) -> Result<PipelinedConnection, RpcError> {
        let stream =
            TcpStream::connect_timeout(&peer, Duration::from_millis(config.connect_timeout_ms))
                .map_err(|e| RpcError::io(peer, "connecting", e))?;
        let setup = || -> io::Result<TcpStream> {
            stream.set_nodelay(true)?;
            stream.set_write_timeout(Some(Duration::from_millis(config.write_timeout_ms)))?;
            let reader = stream.try_clone()?;
            reader.set_read_timeout(Some(Duration::from_millis(config.reply_timeout_ms)))?;
            Ok(reader)
        };
        let reader_stream = setup().map_err(|e| RpcError::io(peer, "connecting", e))?;
        handshake::connect(&stream, &config.credentials, config.handshake_timeout_ms)
            .map_err(|e| RpcError::from_handshake(peer, e))?;
        // The handshake changed the read timeout; the reader's is restored.
        reader_stream
            .set_read_timeout(Some(Duration::from_millis(config.reply_timeout_ms)))
            .map_err(|e| RpcError::io(peer, "connecting", e))?;
        let shared = Arc::new(PipelineShared {
            peer,
            config,
            writer: Mutex::new((stream, Vec::new())),
            calls: Mutex::new(CallTable {
                outstanding: HashSet::new(),
                failure: None,
            }),
            closing: AtomicBool::new(false),
        });
        let reader_shared = Arc::clone(&shared);
        let reader = std::thread::Builder::new()
            .name(format!("rpc-pipeline-{peer}"))
            .spawn(move || pipeline_reader(reader_shared, reader_stream, replies))
            .map_err(|e| RpcError::io(peer, "starting the reply reader", e))?;
        Ok(PipelinedConnection {
            peer,
            shared,
            reader: Some(reader),
        })
    }

    /// The server this connection calls.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// Calls sent and not yet answered.
    pub fn outstanding(&self) -> usize {
        self.shared.calls.lock().outstanding.len()
    }

    /// Why the connection broke, if it did.
    pub fn failure(&self) -> Option<RpcError> {
        self.shared.calls.lock().failure.clone()
    }

    /// Writes a request without waiting for its reply. `call_id` must not be
    /// in flight already. On `Err` the call was not accepted and no entry for
    /// it will appear in the reply channel; on `Ok` exactly one will.
    pub fn send(
        &self,
        service_id: u32,
        method_id: u32,
        call_id: u64,
        request: &[u8],
    ) -> Result<(), RpcError> {
        {
            let mut calls = self.shared.calls.lock();
            if let Some(failure) = &calls.failure {
                return Err(failure.clone());
            }
            let max_outstanding = self.shared.config.max_outstanding;
            if calls.outstanding.len() >= max_outstanding {
                return Err(RpcError::Overloaded { max_outstanding });
            }
            if !calls.outstanding.insert(call_id) {
                return Err(RpcError::Encode(format!(
                    "call id {call_id} is already in flight"
                )));
            }
        }
        let written = self.write_request(
            &FrameHeader::request(service_id, method_id, call_id),
            request,
        );
        let Err(error) = written else {
            return Ok(());
        };
        // Report the failure once: here if the call is still ours, otherwise
        // the reader has already delivered an error for it.
        if self.shared.calls.lock().outstanding.remove(&call_id) {
            Err(error)
        } else {
            Ok(())
        }
    }

    fn write_request(&self, header: &FrameHeader, request: &[u8]) -> Result<(), RpcError> {
        let shared = &self.shared;
        let mut writer = shared.writer.lock();
        let (stream, buf) = &mut *writer;
        start_frame(buf);
        buf.extend_from_slice(request);
        if let Err(e) = finish_frame(buf, header, shared.config.max_frame_bytes) {
            return Err(RpcError::from_frame(shared.peer, e, 0));
        }
        let written = stream.write_all(buf);
        if buf.capacity() > RETAINED_BUFFER_BYTES {
            *buf = Vec::new();
        }
        if let Err(e) = written {
            let error = if super::frame::is_timeout(&e) {
                RpcError::Timeout {
                    peer: shared.peer,
                    timeout_ms: shared.config.write_timeout_ms,
                }
            } else {
                RpcError::io(shared.peer, "sending", e)
            };
            shared.fail(error.clone());
            // Unblocks the reader, which then fails every outstanding call.
            let _ = stream.shutdown(Shutdown::Both);
            return Err(error);
        }
        Ok(())
    }

    /// Closes the connection and waits for the reader thread (bounded: it
    /// does not wait for a full reply channel to drain). Calls still in
    /// flight are answered with `Closed` as far as the channel has room.
    pub fn close(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let Some(reader) = self.reader.take() else {
            return;
        };
        self.shared.fail(RpcError::Closed { peer: self.peer });
        self.shared.closing.store(true, Ordering::SeqCst);
        let _ = self.shared.writer.lock().0.shutdown(Shutdown::Both);
        if reader.join().is_err() {
            warn!("rpc pipeline to {}: the reader thread panicked", self.peer);
        }
    }
}

impl Drop for PipelinedConnection {
    fn drop(&mut self) {
        self.stop();
    }
}

impl PipelineShared {
    /// Puts one reply into the channel, waiting while it is full unless the
    /// connection is being closed. Returns false when the reply cannot be
    /// delivered (nobody receives, or closing).
    fn deliver(
        &self,
        replies: &crossbeam_channel::Sender<PipelinedReply>,
        mut reply: PipelinedReply,
    ) -> bool {
        loop {
            match replies.send_timeout(reply, Duration::from_millis(DELIVERY_POLL_MS)) {
                Ok(()) => return true,
                Err(crossbeam_channel::SendTimeoutError::Disconnected(_)) => return false,
                Err(crossbeam_channel::SendTimeoutError::Timeout(unsent)) => {
                    if self.closing.load(Ordering::SeqCst) {
                        debug!(
                            "rpc pipeline to {}: dropping the reply to call {}: closing",
                            self.peer, unsent.0
                        );
                        return false;
                    }
                    reply = unsent;
                }
            }
        }
    }

    /// Records the first failure; later ones add nothing.
    fn fail(&self, error: RpcError) {
        let mut calls = self.calls.lock();
        if calls.failure.is_none() {
            calls.failure = Some(error);
        }
    }
}

fn pipeline_reader(
    shared: Arc<PipelineShared>,
    stream: TcpStream,
    replies: crossbeam_channel::Sender<PipelinedReply>,
) {
    let peer = shared.peer;
    let mut reader = BufReader::with_capacity(READ_BUFFER_BYTES, stream);
    let mut buf = Vec::new();
    let failure = loop {
        let frame = match read_frame(&mut reader, &mut buf, shared.config.max_frame_bytes) {
            Ok(frame) => frame,
            Err(FrameError::Idle) if shared.calls.lock().outstanding.is_empty() => continue,
            Err(e) => break RpcError::from_frame(peer, e, shared.config.reply_timeout_ms),
        };
        if frame.header.kind != FrameKind::Response {
            break RpcError::Decode(format!(
                "{peer} sent a request frame on a pipelined connection"
            ));
        }
        let call_id = frame.header.call_id;
        if !shared.calls.lock().outstanding.remove(&call_id) {
            break RpcError::Decode(format!(
                "{peer} replied to call {call_id}, which is not in flight"
            ));
        }
        if !shared.deliver(&replies, (call_id, reply_result(peer, &frame))) {
            break RpcError::Closed { peer };
        }
        if buf.capacity() > RETAINED_BUFFER_BYTES {
            buf = Vec::new();
        }
    };
    shared.fail(failure);
    let (failure, orphans) = {
        let mut calls = shared.calls.lock();
        let orphans: Vec<u64> = calls.outstanding.drain().collect();
        (calls.failure.clone().expect("set just above"), orphans)
    };
    debug!(
        "rpc pipeline to {peer} stopped ({failure}); failing {} calls",
        orphans.len()
    );
    let _ = reader.get_ref().shutdown(Shutdown::Both);
    for call_id in orphans {
        if !shared.deliver(&replies, (call_id, Err(failure.clone()))) {
            break;
        }
    }
}
