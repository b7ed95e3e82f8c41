//! Clients that are slow, greedy or unlucky (issue 16): a client that stops
//! reading its replies does not slow the leader down, and the answers the
//! clerk gives stay true whatever happened to earlier attempts.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::TestCluster;
use kvstore_raft::proto::kvstore::*;
use kvstore_raft::rpc::frame::{encode_frame, FrameHeader};
use kvstore_raft::rpc::services::kv_store;
use kvstore_raft::rpc::{handshake, Credentials};
use protobuf::Message;

/// A value near the largest one allowed (half of the 1 MiB `max_append_bytes`).
const BIG_VALUE_BYTES: usize = 400_000;

/// Opens a clerk connection to `addr` and pipelines `count` Gets of the keys
/// `big-0..keys` without reading a single reply: megabytes of replies are
/// due to a client that never takes them.
fn stalled_reader(
    cluster_id: &str,
    addr: std::net::SocketAddr,
    keys: usize,
    count: u64,
) -> TcpStream {
    let stream = TcpStream::connect(addr).expect("connect");
    handshake::connect(&stream, &Credentials::clerk(cluster_id), 3_000).expect("handshake");
    let mut frames = Vec::new();
    let mut frame = Vec::new();
    for call_id in 1..=count {
        let request = GetRequest {
            key: format!("big-{}", call_id as usize % keys).into_bytes(),
            ..Default::default()
        };
        let header = FrameHeader::request(kv_store::SERVICE_ID, kv_store::GET, call_id);
        let body = request.write_to_bytes().unwrap();
        encode_frame(&mut frame, &header, "", &body, 1 << 20).unwrap();
        frames.extend_from_slice(&frame);
    }
    (&stream).write_all(&frames).expect("send the reads");
    stream
}

/// Issue 16, item 1. Before the fix the apply thread wrote replies itself
/// with a blocking write: a client that stopped reading held it for up to
/// `write_timeout_ms` per write, and every other client's writes with it.
/// Now replies go to a bounded per-connection outbox written without
/// blocking; a connection whose outbox is not drained within
/// `write_timeout_ms` (5 s) is closed.
#[test]
fn a_client_that_stops_reading_does_not_slow_the_leader() {
    let cluster = TestCluster::start(3, "");
    let leader = cluster.wait_leader(Duration::from_secs(10));
    let mut clerk = cluster.clerk(10_000);
    let keys = 8;
    let value = vec![b'v'; BIG_VALUE_BYTES];
    for k in 0..keys {
        clerk.put(format!("big-{k}"), &value).unwrap();
    }
    let term = cluster.status(leader).unwrap().term;

    // 100 reads of 400 kB: 40 MB of replies, far beyond any socket buffer
    // and below the 64 MiB outbox bound, so the deadline is what closes it.
    let addr = cluster.config.addr(leader).unwrap();
    let mut stalled = stalled_reader(&cluster.config.cluster_id, addr, keys, 100);
    let stalled_at = Instant::now();

    // Meanwhile another client keeps writing; every write must be quick.
    let mut slowest = Duration::ZERO;
    let mut writes = 0;
    while stalled_at.elapsed() < Duration::from_secs(8) {
        let started = Instant::now();
        clerk.put("small", format!("{writes}")).unwrap();
        slowest = slowest.max(started.elapsed());
        writes += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        slowest < Duration::from_millis(2_500),
        "a write took {slowest:?} while a client was not reading its replies \
         ({writes} writes)"
    );
    let status = cluster.status(leader).unwrap();
    assert_eq!(
        (status.role, status.term),
        (kvstore_raft::raft::Role::Leader, term),
        "the stalled reader caused a leader change"
    );

    // By now (8 s > write_timeout_ms of 5 s plus slack) the server has given
    // up on the stalled connection: draining it ends in EOF (or a reset)
    // long before all 40 MB of replies arrive.
    stalled
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut received = 0usize;
    let mut buf = vec![0u8; 1 << 20];
    let closed = loop {
        match stalled.read(&mut buf) {
            Ok(0) => break true,
            Ok(n) => received += n,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break true,
            Err(e) => panic!("the stalled connection is still open after {received} bytes: {e}"),
        }
    };
    assert!(closed);
    assert!(
        received < 100 * BIG_VALUE_BYTES / 2,
        "the server sent {received} bytes: it did not close the stalled connection"
    );
}

/// Issue 16, item 7. A node thread that panics stops the node with one line
/// naming the thread and the panic, so the cluster fails over; before, a
/// leader whose apply thread had panicked kept leading in Raft and answered
/// BUSY for ever. Every node thread (ticker, event loop, peers, apply) is
/// started through the same `NodeStopper::spawn` this test uses.
#[test]
fn a_panicked_node_thread_stops_the_node_and_the_cluster_fails_over() {
    let cluster = TestCluster::start(3, "");
    let leader = cluster.wait_leader(Duration::from_secs(10));
    let handle = cluster.handle(leader).unwrap();
    let thread = handle
        .stopper()
        .spawn("apply-under-test".into(), || panic!("injected failure"))
        .unwrap();
    thread.join().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while handle.fatal_error().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        handle.fatal_error().as_deref(),
        Some("thread apply-under-test panicked: injected failure")
    );
    assert!(handle.is_stopping());
    // The others elect a new leader and take writes.
    let deadline = Instant::now() + Duration::from_secs(10);
    let new_leader = loop {
        let found = (1..=3).filter(|&id| id != leader).find(|&id| {
            cluster
                .status(id)
                .is_some_and(|s| s.role == kvstore_raft::raft::Role::Leader)
        });
        if let Some(id) = found {
            break id;
        }
        assert!(Instant::now() < deadline, "no new leader after the panic");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_ne!(new_leader, leader);
    let mut clerk = cluster.clerk(10_000);
    clerk.put("after", "panic").unwrap();
    assert_eq!(clerk.get("after").unwrap().as_deref(), Some(&b"panic"[..]));
}

/// What [`ScriptedChannel`] does with the next write call.
enum Action {
    /// The call reaches the node, and its answer is lost on the way back.
    LoseReply,
    /// The node answers with this error code instead (as a node with
    /// another client token, or another config, would).
    Refuse(ErrorCode),
}

/// A channel to one node that follows a script for write calls (reads and
/// status pass through): a deterministic way to lose one answer.
struct ScriptedChannel {
    inner: kvstore_raft::rpc::RpcClient,
    script: parking_lot::Mutex<std::collections::VecDeque<Action>>,
}

impl kvstore_raft::rpc::RpcChannel for ScriptedChannel {
    fn call_method(
        &self,
        service_id: u32,
        method_id: u32,
        request: &[u8],
    ) -> Result<Vec<u8>, kvstore_raft::rpc::RpcError> {
        let is_write = [
            kv_store::PUT,
            kv_store::APPEND,
            kv_store::DELETE,
            kv_store::CAS,
        ]
        .contains(&method_id);
        let action = if is_write {
            self.script.lock().pop_front()
        } else {
            None
        };
        match action {
            None => self.inner.call_method(service_id, method_id, request),
            Some(Action::LoseReply) => {
                let _ = self.inner.call_method(service_id, method_id, request)?;
                Err(kvstore_raft::rpc::RpcError::Timeout {
                    peer: self.inner.peer(),
                    timeout_ms: 0,
                })
            }
            Some(Action::Refuse(code)) => {
                // Every write reply has the header as field 1.
                let reply = PutReply {
                    header: protobuf::MessageField::some(ReplyHeader {
                        error: code.into(),
                        message: "refused by the script".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                };
                Ok(reply.write_to_bytes().unwrap())
            }
        }
    }
}

/// A clerk that talks to the leader only, through a scripted channel.
fn scripted_clerk(
    cluster: &TestCluster,
    leader: u64,
    script: Vec<Action>,
) -> kvstore_raft::clerk::Clerk {
    let channel = ScriptedChannel {
        inner: kvstore_raft::rpc::RpcClient::new(
            cluster.config.addr(leader).unwrap(),
            kvstore_raft::rpc::ClientConfig::default(),
        ),
        script: parking_lot::Mutex::new(script.into()),
    };
    let options = kvstore_raft::clerk::ClerkOptions {
        timeout: Duration::from_secs(10),
        ..Default::default()
    };
    kvstore_raft::clerk::Clerk::with_channels(vec![(leader, Box::new(channel))], options)
}

/// Issue 16, item 3. The answer to a retried Cas is the saved reply of the
/// first attempt, which keeps the old value only up to
/// `max_saved_current_bytes` (1024). Before, the clerk then reported the old
/// value as "" (`Some("")`); now it says it does not know it, and why.
#[test]
fn a_retried_cas_does_not_invent_the_old_value() {
    let cluster = TestCluster::start(3, "");
    let leader = cluster.wait_leader(Duration::from_secs(10));
    let old = vec![b'o'; 2_000];
    cluster.clerk(10_000).put("c", &old).unwrap();
    let mut clerk = scripted_clerk(&cluster, leader, vec![Action::LoseReply]);
    let result = clerk.cas("c", "something else", "new").unwrap();
    assert!(!result.swapped && result.found, "{result:?}");
    assert_eq!(result.current, None, "an old value was invented");
    let why = result
        .current_unknown
        .expect("the clerk says why it has no old value");
    assert!(why.contains("max_saved_current_bytes"), "{why}");
    // The first answer, when it arrives, carries the whole old value.
    let mut clerk = cluster.clerk(10_000);
    let first = clerk.cas("c", "something else", "new").unwrap();
    assert_eq!(first.current.as_deref(), Some(&old[..]));
    assert_eq!(first.current_unknown, None);
}

/// Issue 16, item 4. A write whose first answer was lost (it was applied)
/// and whose retry is refused (UNAUTHENTICATED, INVALID_ARGUMENT, as from a
/// node with another token or config) has an unknown outcome; before, the
/// clerk said "rejected", meaning nothing was applied, which was false.
#[test]
fn a_refusal_after_a_lost_answer_is_an_unknown_outcome() {
    use kvstore_raft::clerk::ClerkError;
    let cluster = TestCluster::start(3, "");
    let leader = cluster.wait_leader(Duration::from_secs(10));
    for (key, code) in [
        ("u1", ErrorCode::UNAUTHENTICATED),
        ("u2", ErrorCode::INVALID_ARGUMENT),
    ] {
        let script = vec![Action::LoseReply, Action::Refuse(code)];
        let mut clerk = scripted_clerk(&cluster, leader, script);
        match clerk.put(key, "applied") {
            Err(ClerkError::Unknown { reason }) => {
                assert!(reason.contains("may have been applied"), "{reason}")
            }
            other => panic!("{code:?} after a lost answer: {other:?}"),
        }
        // It was in fact applied: "rejected" would have been a lie.
        assert_eq!(clerk.get(key).unwrap().as_deref(), Some(&b"applied"[..]));
        // Without an earlier attempt, a refusal is a rejection.
        let mut clerk = scripted_clerk(&cluster, leader, vec![Action::Refuse(code)]);
        assert!(
            matches!(clerk.put(key, "not applied"), Err(ClerkError::Rejected(_))),
            "a first-attempt refusal is a rejection"
        );
        assert_eq!(clerk.get(key).unwrap().as_deref(), Some(&b"applied"[..]));
    }
}

/// Issue 16, item 8. A clerk restarted with a fixed client id used to
/// number its writes from 1 again (later: from the clock): the session still
/// held the old clerk's last seq, so new writes could be answered "stale"
/// or, worse, as a duplicate (OK, without being applied). Now the cluster
/// assigns every clerk its own session, so a restarted clerk never meets its
/// predecessor's.
#[test]
fn a_restarted_clerk_gets_its_own_session_and_its_writes_apply() {
    let cluster = TestCluster::start(3, "");
    cluster.wait_leader(Duration::from_secs(10));
    let options = || kvstore_raft::clerk::ClerkOptions {
        timeout: Duration::from_secs(10),
        ..Default::default()
    };
    let mut first = kvstore_raft::clerk::Clerk::new(&cluster.config, options());
    assert_eq!(first.client_id(), 0, "no session before the first write");
    for k in 0..3 {
        first.put("r", format!("old-{k}")).unwrap();
    }
    let old_session = first.client_id();
    assert_ne!(old_session, 0);
    drop(first);
    let mut restarted = kvstore_raft::clerk::Clerk::new(&cluster.config, options());
    restarted.put("r", "new").unwrap();
    restarted.append("r", "+1").unwrap();
    assert_ne!(restarted.client_id(), old_session);
    assert_eq!(restarted.sessions_opened(), 1);
    assert_eq!(restarted.get("r").unwrap().as_deref(), Some(&b"new+1"[..]));
}
