//! The connection handshake: who may talk to whom. Before any call, the
//! client and the server exchange four small frames (service id 0):
//!
//! ```text
//! client -> server  Hello          { version, cluster_id, node_id, client nonce }
//! server -> client  HelloChallenge { cluster_id, node_id, server nonce }
//! client -> server  HelloProof     { proof = HMAC(secret, "C" | transcript) }
//! server -> client  HelloWelcome   { refusal, message, proof = HMAC(secret, "S" | transcript) }
//! ```
//!
//! The transcript is the cluster id, both node ids and both nonces (16
//! random bytes each, from /dev/urandom), so the secret never crosses the
//! wire, a recorded handshake cannot be replayed (the server's nonce is new
//! each time), and a proof cannot be reflected back (the role byte). A node
//! also checks the server's proof, so it does not stream Raft traffic to an
//! impostor. Without a secret the proofs are empty and only the cluster id is
//! checked.
//!
//! The server judges the connection once ([`judge`]): a wrong cluster id is
//! refused for everyone; node id 0 is a clerk and may call the client
//! services (each request still carries the client token); any other id must
//! prove the secret and be a member, and then may also call the peer
//! services (Raft). A refused connection gets a `HelloWelcome` that says why
//! and is closed. The whole exchange is bounded by a deadline and by
//! [`MAX_HANDSHAKE_FRAME_BYTES`], so a silent or hostile client cannot hold a
//! connection thread or make the server allocate. Nothing here runs per
//! request.

use std::collections::HashMap;
use std::fmt;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use protobuf::Message;
use sha2::Sha256;

use super::frame::{encode_frame, read_frame, FrameError, FrameHeader, FrameKind, RpcCode};
use crate::proto::kvstore::{Hello, HelloChallenge, HelloProof, HelloRefusal, HelloWelcome};

/// The frame service id of handshake frames; no service uses it.
pub const HANDSHAKE_SERVICE_ID: u32 = 0;
/// Frame method ids of the four handshake frames, in order.
const HELLO: u32 = 1;
const CHALLENGE: u32 = 2;
const PROOF: u32 = 3;
const WELCOME: u32 = 4;
/// The handshake version this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;
/// Bytes of each side's nonce.
pub const NONCE_BYTES: usize = 16;
/// The largest handshake frame, header included: room for a cluster id of
/// `config::MAX_SECRET_BYTES`, a refusal message and a proof, far below any
/// `max_frame_bytes`.
pub const MAX_HANDSHAKE_FRAME_BYTES: usize = 2048;
/// The longest refusal message sent (it is cut at a character boundary).
const MAX_MESSAGE_BYTES: usize = 1024;
/// How long a server waits for the whole handshake by default.
pub const DEFAULT_HANDSHAKE_TIMEOUT_MS: u64 = 3_000;
/// Domain separation: these MACs are for this handshake and nothing else.
const MAC_LABEL: &[u8] = b"kvstore-raft handshake v1";
const CLIENT_ROLE: u8 = b'C';
const SERVER_ROLE: u8 = b'S';

type HmacSha256 = Hmac<Sha256>;

/// Who this end of a connection is and what it can prove. `Debug` does not
/// print the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub cluster_id: String,
    /// This node's id; 0 for a clerk.
    pub node_id: u64,
    /// The cluster's shared secret, when it has one.
    pub secret: Option<String>,
}

impl Credentials {
    /// A clerk of the cluster `cluster_id`: node id 0, no secret (clerks are
    /// authorized by the client token in each request instead).
    pub fn clerk(cluster_id: &str) -> Credentials {
        Credentials {
            cluster_id: cluster_id.to_string(),
            node_id: 0,
            secret: None,
        }
    }
}

impl Default for Credentials {
    /// A clerk of a cluster whose file names no `cluster_id`.
    fn default() -> Self {
        Credentials::clerk(crate::config::DEFAULT_CLUSTER_ID)
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("cluster_id", &self.cluster_id)
            .field("node_id", &self.node_id)
            .field("secret", &self.secret.as_ref().map(|_| "<hidden>"))
            .finish()
    }
}

/// What a server accepts, from whom.
#[derive(Clone, Debug)]
pub struct ServerAuth {
    /// The server's own identity (its node id, 0 for a plain RPC server).
    pub credentials: Credentials,
    /// The node ids that may open peer connections.
    pub members: Vec<u64>,
    /// Any node id that proves the cluster's secret may open a peer
    /// connection (not only `members`): membership is replicated in the log,
    /// so a node added later, or a joining node, is not in any file.
    pub open_membership: bool,
    /// Services that only peer connections may call (the Raft service).
    pub peer_services: Vec<u32>,
    /// The whole handshake must be done within this long.
    pub timeout_ms: u64,
}

impl Default for ServerAuth {
    /// Clerks of the default cluster may call every service; no peers.
    fn default() -> Self {
        ServerAuth {
            credentials: Credentials::default(),
            members: Vec::new(),
            open_membership: false,
            peer_services: Vec::new(),
            timeout_ms: DEFAULT_HANDSHAKE_TIMEOUT_MS,
        }
    }
}

impl ServerAuth {
    /// Whether a connection accepted as `access` may call `service_id`: a
    /// comparison of small integers, cheap enough for every frame.
    pub fn allows(&self, access: Access, service_id: u32) -> bool {
        matches!(access, Access::Peer(_)) || !self.peer_services.contains(&service_id)
    }
}

/// What an accepted connection may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// A clerk: the client services only.
    Client,
    /// A member node that proved the secret: every service.
    Peer(u64),
}

/// Why a handshake failed.
#[derive(Debug)]
pub enum HandshakeError {
    /// A refusal: on the server, ours; on the client, the server's. The
    /// reason is worded from this end's point of view. `node_id` is the
    /// other end's (as it claimed).
    Refused {
        node_id: u64,
        reason: String,
    },
    /// The other end broke the protocol, or could not prove the secret.
    Protocol(String),
    /// The handshake did not finish within `timeout_ms`.
    Timeout {
        timeout_ms: u64,
    },
    /// The other end closed the connection before the handshake finished.
    Closed,
    Io(io::Error),
}

impl fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HandshakeError::Refused { reason, .. } => f.write_str(reason),
            HandshakeError::Protocol(what) => write!(f, "handshake failed: {what}"),
            HandshakeError::Timeout { timeout_ms } => {
                write!(f, "handshake not done within {timeout_ms} ms")
            }
            HandshakeError::Closed => f.write_str("connection closed during the handshake"),
            HandshakeError::Io(e) => write!(f, "handshake I/O error: {e}"),
        }
    }
}

impl std::error::Error for HandshakeError {}

/// Runs the client side on a freshly connected `stream`. `Ok` means the
/// server accepted us (and, if we are a node with a secret, proved that it
/// holds the secret too).
pub fn connect(
    stream: &TcpStream,
    credentials: &Credentials,
    timeout_ms: u64,
) -> Result<(), HandshakeError> {
    let mut io = HandshakeIo::new(stream, timeout_ms);
    let client_nonce = random_nonce()?;
    let hello = Hello {
        version: PROTOCOL_VERSION,
        cluster_id: credentials.cluster_id.clone(),
        node_id: credentials.node_id,
        nonce: client_nonce.to_vec(),
        ..Default::default()
    };
    io.send(FrameKind::Request, HELLO, &hello)?;
    let challenge: HelloChallenge = io.receive(FrameKind::Response, CHALLENGE)?;
    let transcript = Transcript {
        cluster_id: &challenge.cluster_id,
        client_node_id: credentials.node_id,
        server_node_id: challenge.node_id,
        client_nonce: &client_nonce,
        server_nonce: &challenge.nonce,
    };
    let proof = HelloProof {
        proof: credentials
            .secret
            .as_deref()
            .map(|secret| transcript.proof(secret, CLIENT_ROLE).to_vec())
            .unwrap_or_default(),
        ..Default::default()
    };
    io.send(FrameKind::Request, PROOF, &proof)?;
    let welcome: HelloWelcome = io.receive(FrameKind::Response, WELCOME)?;
    match welcome.refusal.enum_value() {
        Ok(HelloRefusal::ACCEPTED) => {}
        Ok(HelloRefusal::CLUSTER_ID_MISMATCH) => {
            return Err(HandshakeError::Refused {
                node_id: challenge.node_id,
                reason: cluster_id_mismatch(&credentials.cluster_id, &challenge.cluster_id),
            })
        }
        _ => {
            return Err(HandshakeError::Refused {
                node_id: challenge.node_id,
                reason: printable(&welcome.message),
            })
        }
    }
    if let (Some(secret), true) = (&credentials.secret, credentials.node_id != 0) {
        let expected = transcript.proof(secret, SERVER_ROLE);
        if !constant_time_eq(&welcome.proof, &expected) {
            return Err(HandshakeError::Protocol(format!(
                "node {} accepted us but could not prove that it holds the cluster secret",
                challenge.node_id
            )));
        }
    }
    Ok(())
}

/// Runs the server side on a freshly accepted `stream` and says what the
/// connection may do. On a refusal the client has been told why; the caller
/// logs the error and closes the connection.
pub fn accept(stream: &TcpStream, auth: &ServerAuth) -> Result<Access, HandshakeError> {
    let mut io = HandshakeIo::new(stream, auth.timeout_ms);
    let hello: Hello = io.receive(FrameKind::Request, HELLO)?;
    let server_nonce = random_nonce()?;
    let ours = &auth.credentials;
    let challenge = HelloChallenge {
        cluster_id: ours.cluster_id.clone(),
        node_id: ours.node_id,
        nonce: server_nonce.to_vec(),
        ..Default::default()
    };
    io.send(FrameKind::Response, CHALLENGE, &challenge)?;
    let proof: HelloProof = io.receive(FrameKind::Request, PROOF)?;
    let transcript = Transcript {
        cluster_id: &ours.cluster_id,
        client_node_id: hello.node_id,
        server_node_id: ours.node_id,
        client_nonce: &hello.nonce,
        server_nonce: &server_nonce,
    };
    let mut welcome = HelloWelcome::new();
    let verdict = judge(auth, &hello, &transcript, &proof.proof);
    match &verdict {
        Ok(Access::Peer(_)) => {
            if let Some(secret) = &ours.secret {
                welcome.proof = transcript.proof(secret, SERVER_ROLE).to_vec();
            }
        }
        Ok(Access::Client) => {}
        Err((refusal, message)) => {
            welcome.refusal = (*refusal).into();
            welcome.message = truncate(message, MAX_MESSAGE_BYTES).to_string();
        }
    }
    io.send(FrameKind::Response, WELCOME, &welcome)?;
    verdict.map_err(|(_, reason)| HandshakeError::Refused {
        node_id: hello.node_id,
        reason,
    })
}

/// The server's decision on a hello and its proof: the access granted, or
/// the refusal and its reason (worded from the server's point of view).
/// Checked in order: the hello itself, the cluster id (for everyone), then,
/// for nodes, the secret before membership, so that an outsider learns
/// nothing about the members.
pub fn judge(
    auth: &ServerAuth,
    hello: &Hello,
    transcript: &Transcript<'_>,
    proof: &[u8],
) -> Result<Access, (HelloRefusal, String)> {
    let ours = &auth.credentials;
    if hello.version != PROTOCOL_VERSION {
        return Err((
            HelloRefusal::BAD_HELLO,
            format!(
                "handshake version {} is not the version {PROTOCOL_VERSION} this node speaks",
                hello.version
            ),
        ));
    }
    if hello.nonce.len() != NONCE_BYTES {
        return Err((
            HelloRefusal::BAD_HELLO,
            format!(
                "a nonce of {} bytes, where {NONCE_BYTES} are needed",
                hello.nonce.len()
            ),
        ));
    }
    if hello.cluster_id != ours.cluster_id {
        return Err((
            HelloRefusal::CLUSTER_ID_MISMATCH,
            cluster_id_mismatch(&ours.cluster_id, &hello.cluster_id),
        ));
    }
    if hello.node_id == 0 {
        // A clerk: the secret is for nodes; requests carry the client token.
        return Ok(Access::Client);
    }
    let secret_problem = match (&ours.secret, proof.is_empty()) {
        (None, true) => None,
        (None, false) => Some("it presents a secret, but this cluster has none"),
        (Some(_), true) => Some("no secret presented, but this cluster requires one"),
        (Some(secret), false) => (!constant_time_eq(proof, &transcript.proof(secret, CLIENT_ROLE)))
            .then_some("wrong secret (the proof does not match this cluster's secret)"),
    };
    if let Some(problem) = secret_problem {
        return Err((HelloRefusal::WRONG_SECRET, problem.to_string()));
    }
    let listed = auth.open_membership || auth.members.contains(&hello.node_id);
    if hello.node_id == ours.node_id || hello.node_id == 0 || !listed {
        let why = if hello.node_id == ours.node_id {
            "is this node's own id"
        } else {
            "is not a member of this cluster"
        };
        return Err((
            HelloRefusal::NOT_A_MEMBER,
            format!(
                "node id {} {why} (members {:?})",
                hello.node_id, auth.members
            ),
        ));
    }
    Ok(Access::Peer(hello.node_id))
}

/// What both proofs of one handshake cover.
pub struct Transcript<'a> {
    pub cluster_id: &'a str,
    pub client_node_id: u64,
    pub server_node_id: u64,
    pub client_nonce: &'a [u8],
    pub server_nonce: &'a [u8],
}

impl Transcript<'_> {
    /// HMAC-SHA256 keyed with `secret` over the role and the transcript;
    /// every variable-length part is length-prefixed, so no two transcripts
    /// encode alike.
    pub fn proof(&self, secret: &str, role: u8) -> [u8; 32] {
        let mut mac =
            HmacSha256::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any length");
        mac.update(MAC_LABEL);
        mac.update(&[role]);
        for part in [
            self.cluster_id.as_bytes(),
            self.client_nonce,
            self.server_nonce,
        ] {
            mac.update(&(part.len() as u64).to_be_bytes());
            mac.update(part);
        }
        mac.update(&self.client_node_id.to_be_bytes());
        mac.update(&self.server_node_id.to_be_bytes());
        mac.finalize().into_bytes().into()
    }
}

/// Compares two byte strings in time that depends only on their lengths, so
/// that a wrong token or proof does not reveal, by how fast it is refused,
/// how much of it was right.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let difference = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(difference) == 0
}

fn cluster_id_mismatch(ours: &str, theirs: &str) -> String {
    format!("cluster id mismatch (ours {ours:?}, theirs {theirs:?})")
}

/// Text from the network, made safe for one log line.
fn printable(text: &str) -> String {
    truncate(text, MAX_MESSAGE_BYTES)
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

fn truncate(text: &str, max_bytes: usize) -> &str {
    let mut end = text.len().min(max_bytes);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// A random number from the kernel's random source (e.g. a session's secret).
pub fn random_u64() -> io::Result<u64> {
    let mut bytes = [0u8; 8];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut file| file.read_exact(&mut bytes))
        .map_err(|e| io::Error::new(e.kind(), format!("/dev/urandom: {e}")))?;
    Ok(u64::from_le_bytes(bytes))
}

/// 16 bytes from the kernel's random source.
fn random_nonce() -> Result<[u8; NONCE_BYTES], HandshakeError> {
    let mut nonce = [0u8; NONCE_BYTES];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut file| file.read_exact(&mut nonce))
        .map_err(|e| HandshakeError::Io(io::Error::new(e.kind(), format!("/dev/urandom: {e}"))))?;
    Ok(nonce)
}

/// Frames in and out of one handshake, all before one deadline.
struct HandshakeIo<'a> {
    stream: &'a TcpStream,
    deadline: Instant,
    timeout_ms: u64,
    buf: Vec<u8>,
}

impl<'a> HandshakeIo<'a> {
    fn new(stream: &'a TcpStream, timeout_ms: u64) -> HandshakeIo<'a> {
        HandshakeIo {
            stream,
            deadline: Instant::now() + Duration::from_millis(timeout_ms),
            timeout_ms,
            buf: Vec::new(),
        }
    }

    fn send<M: Message>(
        &mut self,
        kind: FrameKind,
        method_id: u32,
        message: &M,
    ) -> Result<(), HandshakeError> {
        let body = message
            .write_to_bytes()
            .map_err(|e| HandshakeError::Protocol(format!("cannot encode {}: {e}", M::NAME)))?;
        let header = FrameHeader {
            kind,
            ..FrameHeader::request(HANDSHAKE_SERVICE_ID, method_id, 0)
        };
        encode_frame(&mut self.buf, &header, "", &body, MAX_HANDSHAKE_FRAME_BYTES)
            .map_err(|e| HandshakeError::Protocol(format!("{} not sent: {e}", M::NAME)))?;
        let mut stream = self.stream;
        stream.write_all(&self.buf).map_err(|e| self.io_error(e))
    }

    fn receive<M: Message>(
        &mut self,
        kind: FrameKind,
        method_id: u32,
    ) -> Result<M, HandshakeError> {
        let mut reader = DeadlineReader {
            stream: self.stream,
            deadline: self.deadline,
        };
        let frame = match read_frame(&mut reader, &mut self.buf, MAX_HANDSHAKE_FRAME_BYTES) {
            Ok(frame) => frame,
            Err(FrameError::Closed) => return Err(HandshakeError::Closed),
            Err(FrameError::Idle | FrameError::Truncated { .. })
                if Instant::now() >= self.deadline =>
            {
                return Err(HandshakeError::Timeout {
                    timeout_ms: self.timeout_ms,
                })
            }
            Err(FrameError::Io(e)) => return Err(HandshakeError::Io(e)),
            Err(e) => {
                return Err(HandshakeError::Protocol(format!(
                    "expected {}: {e}",
                    M::NAME
                )))
            }
        };
        let header = frame.header;
        if header.code != RpcCode::Ok {
            // An older server answers a Hello with an error frame.
            return Err(HandshakeError::Protocol(format!(
                "expected {}, got an error ({}: {}); does the other end speak this handshake?",
                M::NAME,
                header.code,
                printable(frame.error_text)
            )));
        }
        if header.kind != kind
            || header.service_id != HANDSHAKE_SERVICE_ID
            || header.method_id != method_id
        {
            return Err(HandshakeError::Protocol(format!(
                "expected {}, got a {:?} frame for service {} method {}",
                M::NAME,
                header.kind,
                header.service_id,
                header.method_id
            )));
        }
        M::parse_from_bytes(frame.body)
            .map_err(|e| HandshakeError::Protocol(format!("not a valid {}: {e}", M::NAME)))
    }

    fn io_error(&self, error: io::Error) -> HandshakeError {
        if super::frame::is_timeout(&error) {
            HandshakeError::Timeout {
                timeout_ms: self.timeout_ms,
            }
        } else {
            HandshakeError::Io(error)
        }
    }
}

/// Reads from a socket until a deadline: each read waits at most for the
/// time left, so a client trickling one byte at a time cannot stretch the
/// handshake past the deadline.
struct DeadlineReader<'a> {
    stream: &'a TcpStream,
    deadline: Instant,
}

impl Read for DeadlineReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // The socket's timer may fire a little before the deadline (the kernel
        // rounds it): read again for what is left, so a timeout is reported
        // only once the deadline has passed, and so always as the handshake's
        // timeout. Each pass waits at most the time left, so this ends at the
        // deadline.
        loop {
            let left = self.deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "handshake deadline passed",
                ));
            }
            self.stream.set_read_timeout(Some(left))?;
            let mut stream = self.stream;
            match stream.read(buf) {
                Err(e) if super::frame::is_timeout(&e) => continue,
                other => return other,
            }
        }
    }
}

/// Lets a repeated log line through once per `interval` per key, so that a
/// misconfigured node retrying every second is reported, not flooding the
/// log. Holds at most `MAX_KEYS` keys (it forgets them all when full).
pub struct RepeatFilter {
    interval: Duration,
    last: HashMap<String, Instant>,
}

impl RepeatFilter {
    const MAX_KEYS: usize = 256;

    pub fn new(interval: Duration) -> RepeatFilter {
        RepeatFilter {
            interval,
            last: HashMap::new(),
        }
    }

    /// Whether a line with this key should be logged now.
    pub fn admit(&mut self, key: &str) -> bool {
        let now = Instant::now();
        if let Some(last) = self.last.get(key) {
            if now.duration_since(*last) < self.interval {
                return false;
            }
        }
        if self.last.len() >= Self::MAX_KEYS {
            self.last.clear();
        }
        self.last.insert(key.to_string(), now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn node(cluster_id: &str, node_id: u64, secret: Option<&str>) -> Credentials {
        Credentials {
            cluster_id: cluster_id.to_string(),
            node_id,
            secret: secret.map(str::to_string),
        }
    }

    fn server_auth(credentials: Credentials) -> ServerAuth {
        ServerAuth {
            credentials,
            members: vec![1, 2, 3],
            open_membership: false,
            peer_services: vec![2],
            timeout_ms: 2_000,
        }
    }

    /// Runs both sides over a loopback connection.
    fn run(
        client: &Credentials,
        auth: &ServerAuth,
    ) -> (Result<(), HandshakeError>, Result<Access, HandshakeError>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let auth = auth.clone();
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            accept(&stream, &auth)
        });
        let stream = TcpStream::connect(addr).unwrap();
        let client = connect(&stream, client, 2_000);
        (client, server.join().unwrap())
    }

    fn refusal(result: Result<(), HandshakeError>) -> String {
        match result {
            Err(HandshakeError::Refused { reason, .. }) => reason,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    fn server_refusal(result: Result<Access, HandshakeError>) -> String {
        match result {
            Err(HandshakeError::Refused { reason, .. }) => reason,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn a_member_with_the_secret_is_a_peer() {
        let auth = server_auth(node("a", 1, Some("s")));
        let (client, server) = run(&node("a", 2, Some("s")), &auth);
        client.unwrap();
        assert_eq!(server.unwrap(), Access::Peer(2));
        assert!(auth.allows(Access::Peer(2), 2));
    }

    #[test]
    fn without_secrets_the_cluster_id_decides() {
        let (client, server) = run(&node("a", 3, None), &server_auth(node("a", 1, None)));
        client.unwrap();
        assert_eq!(server.unwrap(), Access::Peer(3));
    }

    #[test]
    fn a_clerk_needs_no_secret_and_may_not_call_peer_services() {
        let auth = server_auth(node("a", 1, Some("s")));
        let (client, server) = run(&Credentials::clerk("a"), &auth);
        client.unwrap();
        assert_eq!(server.unwrap(), Access::Client);
        assert!(auth.allows(Access::Client, 1));
        assert!(!auth.allows(Access::Client, 2));
    }

    #[test]
    fn another_cluster_is_refused_and_both_sides_say_why() {
        let (client, server) = run(&node("b", 4, None), &server_auth(node("a", 1, None)));
        assert_eq!(
            refusal(client),
            r#"cluster id mismatch (ours "b", theirs "a")"#
        );
        assert_eq!(
            server_refusal(server),
            r#"cluster id mismatch (ours "a", theirs "b")"#
        );
        // Clerks of another cluster are refused too.
        let (client, _) = run(&Credentials::clerk("b"), &server_auth(node("a", 1, None)));
        assert!(refusal(client).starts_with("cluster id mismatch"));
    }

    #[test]
    fn a_wrong_or_missing_secret_is_refused() {
        let auth = server_auth(node("a", 1, Some("right")));
        let (client, server) = run(&node("a", 2, Some("wrong")), &auth);
        assert_eq!(
            refusal(client),
            "wrong secret (the proof does not match this cluster's secret)"
        );
        assert!(server_refusal(server).starts_with("wrong secret"));
        let (client, _) = run(&node("a", 2, None), &auth);
        assert_eq!(
            refusal(client),
            "no secret presented, but this cluster requires one"
        );
        let (client, _) = run(&node("a", 2, Some("x")), &server_auth(node("a", 1, None)));
        assert_eq!(
            refusal(client),
            "it presents a secret, but this cluster has none"
        );
    }

    #[test]
    fn a_node_that_is_not_a_member_is_refused() {
        let auth = server_auth(node("a", 1, Some("s")));
        let (client, _) = run(&node("a", 4, Some("s")), &auth);
        assert_eq!(
            refusal(client),
            "node id 4 is not a member of this cluster (members [1, 2, 3])"
        );
        let (client, _) = run(&node("a", 1, Some("s")), &auth);
        assert!(refusal(client).contains("is this node's own id"));
    }

    /// A server that accepts everyone without knowing the secret (an
    /// impostor) is caught by the client's check of the server's proof.
    #[test]
    fn the_client_checks_the_servers_proof() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let impostor = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut io = HandshakeIo::new(&stream, 2_000);
            let _: Hello = io.receive(FrameKind::Request, HELLO).unwrap();
            let challenge = HelloChallenge {
                cluster_id: "a".into(),
                node_id: 1,
                nonce: vec![7; NONCE_BYTES],
                ..Default::default()
            };
            io.send(FrameKind::Response, CHALLENGE, &challenge).unwrap();
            let _: HelloProof = io.receive(FrameKind::Request, PROOF).unwrap();
            let welcome = HelloWelcome {
                proof: vec![0; 32],
                ..Default::default()
            };
            io.send(FrameKind::Response, WELCOME, &welcome).unwrap();
        });
        let stream = TcpStream::connect(addr).unwrap();
        let error = connect(&stream, &node("a", 2, Some("s")), 2_000).unwrap_err();
        assert!(
            error.to_string().contains("could not prove"),
            "unexpected {error}"
        );
        impostor.join().unwrap();
    }

    #[test]
    fn a_silent_client_times_out_and_an_oversized_hello_is_refused() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let auth = ServerAuth {
            timeout_ms: 200,
            ..server_auth(node("a", 1, None))
        };
        let server = std::thread::spawn(move || {
            let results: Vec<_> = (0..3)
                .map(|_| {
                    let (stream, _) = listener.accept().unwrap();
                    let started = Instant::now();
                    (accept(&stream, &auth), started.elapsed())
                })
                .collect();
            results
        });
        // Silent.
        let silent = TcpStream::connect(addr).unwrap();
        // A trickle: one byte of a plausible prefix, then nothing.
        let mut trickle = TcpStream::connect(addr).unwrap();
        // A 1 MiB hello.
        let mut huge = TcpStream::connect(addr).unwrap();
        trickle.write_all(&[0]).unwrap();
        huge.write_all(&(1u32 << 20).to_be_bytes()).unwrap();
        let results = server.join().unwrap();
        drop(silent);
        for (result, elapsed) in &results[..2] {
            assert!(
                matches!(result, Err(HandshakeError::Timeout { timeout_ms: 200 })),
                "{result:?}"
            );
            assert!(elapsed < &Duration::from_secs(2), "{elapsed:?}");
        }
        let error = results[2].0.as_ref().unwrap_err().to_string();
        assert!(error.contains("exceeds the limit of 2048"), "{error}");
    }

    #[test]
    fn an_unknown_version_is_refused() {
        let auth = server_auth(node("a", 1, None));
        let hello = Hello {
            version: 9,
            cluster_id: "a".into(),
            node_id: 2,
            nonce: vec![0; NONCE_BYTES],
            ..Default::default()
        };
        let transcript = Transcript {
            cluster_id: "a",
            client_node_id: 2,
            server_node_id: 1,
            client_nonce: &[],
            server_nonce: &[],
        };
        let (refusal, message) = judge(&auth, &hello, &transcript, &[]).unwrap_err();
        assert_eq!(refusal, HelloRefusal::BAD_HELLO);
        assert!(message.contains("version 9"), "{message}");
    }

    #[test]
    fn proofs_depend_on_every_part_of_the_transcript() {
        let base = Transcript {
            cluster_id: "a",
            client_node_id: 2,
            server_node_id: 1,
            client_nonce: &[1; NONCE_BYTES],
            server_nonce: &[2; NONCE_BYTES],
        };
        let proof = base.proof("s", CLIENT_ROLE);
        assert_eq!(proof, base.proof("s", CLIENT_ROLE));
        assert_ne!(proof, base.proof("t", CLIENT_ROLE));
        assert_ne!(proof, base.proof("s", SERVER_ROLE));
        let variants = [
            Transcript {
                cluster_id: "b",
                ..base
            },
            Transcript {
                client_node_id: 3,
                ..base
            },
            Transcript {
                server_node_id: 3,
                ..base
            },
            Transcript {
                client_nonce: &[3; NONCE_BYTES],
                ..base
            },
            Transcript {
                server_nonce: &[3; NONCE_BYTES],
                ..base
            },
        ];
        for variant in variants {
            assert_ne!(proof, variant.proof("s", CLIENT_ROLE));
        }
    }

    #[test]
    fn constant_time_eq_compares_bytes() {
        assert!(constant_time_eq(b"token", b"token"));
        assert!(!constant_time_eq(b"token", b"tokem"));
        assert!(!constant_time_eq(b"token", b"toke"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn the_repeat_filter_admits_a_key_once_per_interval() {
        let mut filter = RepeatFilter::new(Duration::from_secs(60));
        assert!(filter.admit("a"));
        assert!(!filter.admit("a"));
        assert!(filter.admit("b"));
        let mut quick = RepeatFilter::new(Duration::ZERO);
        assert!(quick.admit("a"));
        assert!(quick.admit("a"));
    }

    #[test]
    fn debug_hides_the_secret() {
        let text = format!("{:?}", node("a", 1, Some("hunter2")));
        assert!(!text.contains("hunter2"), "{text}");
    }
}
