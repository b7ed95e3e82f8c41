//! The slow reader (issue 16): a client that pipelines reads of a large
//! value to the leader and then stops reading its socket, again and again
//! through the run. The servers must not let it slow anyone else: it costs
//! only its own connection, which the leader closes once its replies wait
//! past `write_timeout_ms`. Its reads are not part of the history (its key
//! is its own); what it records is whether the leader it stalled stayed
//! leader, so the runner can tell a leader change it caused from one the
//! nemesis caused.

use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use protobuf::Message;

use crate::clerk::Clerk;
use crate::config::ClusterConfig;
use crate::proto::kvstore::{GetRequest, RequestHeader};
use crate::rpc::frame::{encode_frame, FrameHeader};
use crate::rpc::services::kv_store;
use crate::rpc::{handshake, Credentials};

/// The key the slow reader reads; no other client uses it.
const KEY: &str = "slow-reader-big";
/// Large enough that a few replies fill a socket buffer, below the largest
/// value (half of `max_append_bytes`, 1 MiB by default).
const VALUE_BYTES: usize = 300_000;
/// Reads sent at once on each stalled connection: 19 MB of replies.
const PIPELINED_READS: u64 = 64;
/// How long each connection is left unread.
const STALL_MS: u64 = 3_000;
/// Between two stalls.
const PAUSE_MS: u64 = 1_000;

/// One stalled connection.
#[derive(Clone, Debug)]
pub struct Stall {
    pub start_ms: u64,
    pub end_ms: u64,
    pub leader: u64,
    pub term_before: u64,
    /// The leader's role and term when the stall ended (`None`: no answer).
    pub after: Option<(String, u64)>,
}

impl Stall {
    /// Whether the node it stalled was still leader of the same term.
    pub fn leader_kept(&self) -> bool {
        matches!(&self.after, Some((role, term)) if role == "leader" && *term == self.term_before)
    }
}

/// The leader and its term, as the nodes report them.
fn leader_status(clerk: &Clerk) -> Option<(u64, std::net::SocketAddr, u64)> {
    clerk.status_all().into_iter().find_map(|view| {
        let status = view.status.ok()?;
        (status.role == "leader").then_some((view.id, view.addr?, status.term))
    })
}

fn node_status(clerk: &Clerk, id: u64) -> Option<(String, u64)> {
    clerk.status_all().into_iter().find_map(|view| {
        let status = view.status.ok().filter(|_| view.id == id)?;
        Some((status.role, status.term))
    })
}

/// Opens a clerk connection to `addr` and sends the pipelined reads; the
/// replies are never read.
fn stall_connection(config: &ClusterConfig, addr: std::net::SocketAddr) -> Option<TcpStream> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    stream
        .set_write_timeout(Some(Duration::from_secs(1)))
        .ok()?;
    handshake::connect(&stream, &Credentials::clerk(&config.cluster_id), 1_000).ok()?;
    let request = GetRequest {
        header: protobuf::MessageField::some(RequestHeader {
            token: config.client_token.clone().unwrap_or_default(),
            ..Default::default()
        }),
        key: KEY.as_bytes().to_vec(),
        ..Default::default()
    };
    let body = request.write_to_bytes().ok()?;
    let (mut frames, mut frame) = (Vec::new(), Vec::new());
    for call_id in 1..=PIPELINED_READS {
        let header = FrameHeader::request(kv_store::SERVICE_ID, kv_store::GET, call_id);
        encode_frame(&mut frame, &header, "", &body, config.max_frame_bytes).ok()?;
        frames.extend_from_slice(&frame);
    }
    (&stream).write_all(&frames).ok()?;
    Some(stream)
}

/// Stalls one leader connection after another until `stop`; returns the
/// stalls that reached a leader.
pub fn run(config: &ClusterConfig, epoch: Instant, stop: &AtomicBool) -> Vec<Stall> {
    let options = super::workload::clerk_options(u64::MAX, 2_000);
    let mut clerk = Clerk::new(config, options);
    let sleep = |ms: u64| {
        let until = Instant::now() + Duration::from_millis(ms);
        while Instant::now() < until && !stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let mut stored = false;
    let mut stalls = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        if !stored {
            stored = clerk.put(KEY, vec![b's'; VALUE_BYTES]).is_ok();
        }
        let Some((leader, addr, term_before)) = leader_status(&clerk).filter(|_| stored) else {
            sleep(PAUSE_MS);
            continue;
        };
        let start_ms = epoch.elapsed().as_millis() as u64;
        let Some(stream) = stall_connection(config, addr) else {
            sleep(PAUSE_MS);
            continue;
        };
        sleep(STALL_MS);
        let after = node_status(&clerk, leader);
        let end_ms = epoch.elapsed().as_millis() as u64;
        drop(stream);
        stalls.push(Stall {
            start_ms,
            end_ms,
            leader,
            term_before,
            after,
        });
        sleep(PAUSE_MS);
    }
    stalls
}
