//! Loopback tests of the RPC layer: generated stubs against a test service
//! that implements both services, deferred and out-of-order replies,
//! pipelining, dropped responders, hostile input, limits, idle timeout,
//! shutdown and reconnect.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use kvstore_raft::proto::kvstore::*;
use kvstore_raft::rpc::services::{
    kv_store, raft, KvStoreService, KvStoreStub, RaftService, RaftStub,
};
use kvstore_raft::rpc::{
    decode_message, ClientConfig, PipelinedConfig, PipelinedConnection, ReplyBatch, Responder,
    Router, RpcChannel, RpcClient, RpcCode, RpcError, RpcServer, ServerConfig,
};
use protobuf::Message;

/// Bounds every wait in these tests; generous so that a loaded machine does
/// not cause false failures.
const WAIT: Duration = Duration::from_secs(3);

/// A Get whose key starts with this is not answered by the handler: its
/// responder goes to the test, which answers later from another thread.
const DEFER: &[u8] = b"defer";
/// A Get with this key drops its responder unanswered.
const DROP: &[u8] = b"drop";
/// The per-connection budget the test service's OpenSession spends.
const SESSION_BUDGET: usize = 2;

struct TestService {
    deferred: Sender<(Vec<u8>, Responder<GetReply>)>,
}

impl KvStoreService for TestService {
    fn get(&self, request: GetRequest, responder: Responder<GetReply>) {
        if request.key.starts_with(DEFER) {
            self.deferred.send((request.key, responder)).unwrap();
        } else if request.key == DROP {
            drop(responder);
        } else {
            responder.send(echo_get(&request.key));
        }
    }
    fn put(&self, request: PutRequest, responder: Responder<PutReply>) {
        let mut reply = PutReply::new();
        reply.header.mut_or_insert_default().message =
            String::from_utf8_lossy(&request.value).into_owned();
        responder.send(reply);
    }
    fn append(&self, _request: AppendRequest, responder: Responder<AppendReply>) {
        responder.send(AppendReply::new());
    }
    fn exec(&self, _request: ExecRequest, responder: Responder<ExecReply>) {
        responder.send(ExecReply::new());
    }
    fn delete(&self, _request: DeleteRequest, responder: Responder<DeleteReply>) {
        let mut reply = DeleteReply::new();
        reply.existed = true;
        responder.send(reply);
    }
    fn cas(&self, request: CasRequest, responder: Responder<CasReply>) {
        let mut reply = CasReply::new();
        reply.current = request.expected;
        responder.send(reply);
    }
    /// Answers with how many units of its connection's budget (2) are left
    /// after this call took one; `u64::MAX` when none was left.
    fn open_session(&self, _: OpenSessionRequest, responder: Responder<OpenSessionReply>) {
        let mut reply = OpenSessionReply::new();
        reply.client_id = if responder.take_connection_budget(SESSION_BUDGET) {
            1
        } else {
            u64::MAX
        };
        responder.send(reply);
    }
    fn snapshot_chunk(
        &self,
        request: SnapshotChunkRequest,
        responder: Responder<SnapshotChunkReply>,
    ) {
        let mut reply = SnapshotChunkReply::new();
        reply.backup_id = request.backup_id;
        responder.send(reply);
    }
    fn status(&self, _request: StatusRequest, responder: Responder<StatusReply>) {
        let mut reply = StatusReply::new();
        reply.id = 7;
        reply.role = "leader".into();
        responder.send(reply);
    }
    fn members(&self, _: MembersRequest, responder: Responder<MembersReply>) {
        TestService::unsupported(responder);
    }
    fn change_member(&self, _: MemberChangeRequest, responder: Responder<MemberChangeReply>) {
        TestService::unsupported(responder);
    }
    fn transfer_leader(&self, _: TransferLeaderRequest, responder: Responder<TransferLeaderReply>) {
        TestService::unsupported(responder);
    }
}

impl TestService {
    fn unsupported<R: Message>(responder: Responder<R>) {
        responder.send_error(RpcCode::BadRequest, "not served by the test service");
    }
}

impl RaftService for TestService {
    fn append_entries(
        &self,
        request: AppendEntriesRequest,
        responder: Responder<AppendEntriesReply>,
    ) {
        let mut reply = AppendEntriesReply::new();
        reply.from = request.to;
        reply.success = true;
        reply.match_index = request
            .entries
            .last()
            .map_or(request.prev_log_index, |e| e.index);
        responder.send(reply);
    }
    fn heartbeat(&self, request: HeartbeatRequest, responder: Responder<HeartbeatReply>) {
        let mut reply = HeartbeatReply::new();
        reply.term = request.term;
        reply.read_context = request.read_context;
        responder.send(reply);
    }
    fn request_vote(&self, request: RequestVoteRequest, responder: Responder<RequestVoteReply>) {
        let mut reply = RequestVoteReply::new();
        reply.term = request.term;
        reply.vote_granted = true;
        responder.send(reply);
    }
    fn install_snapshot(
        &self,
        request: InstallSnapshotRequest,
        responder: Responder<InstallSnapshotReply>,
    ) {
        let mut reply = InstallSnapshotReply::new();
        reply.next_offset = request.offset + request.data.len() as u64;
        reply.success = true;
        responder.send(reply);
    }
    fn timeout_now(
        &self,
        request: kvstore_raft::proto::kvstore::TimeoutNowRequest,
        responder: Responder<kvstore_raft::proto::kvstore::TimeoutNowReply>,
    ) {
        let mut reply = kvstore_raft::proto::kvstore::TimeoutNowReply::new();
        reply.term = request.term;
        responder.send(reply);
    }
}

fn echo_get(key: &[u8]) -> GetReply {
    let mut reply = GetReply::new();
    reply.found = true;
    reply.value = key.to_vec();
    reply
}

fn get_request(key: &[u8]) -> GetRequest {
    let mut request = GetRequest::new();
    request.key = key.to_vec();
    request
}

struct Harness {
    server: RpcServer,
    deferred: Receiver<(Vec<u8>, Responder<GetReply>)>,
}

fn start_on(addr: &str, config: ServerConfig) -> Harness {
    let (tx, rx) = crossbeam_channel::bounded(64);
    let service = Arc::new(TestService { deferred: tx });
    let router = Router::new()
        .with_kv_store(service.clone())
        .with_raft(service);
    let server = RpcServer::bind(addr, config, router).expect("bind a loopback port");
    Harness {
        server,
        deferred: rx,
    }
}

fn start(config: ServerConfig) -> Harness {
    start_on("127.0.0.1:0", config)
}

fn client_config() -> ClientConfig {
    ClientConfig {
        connect_timeout_ms: 1_000,
        call_timeout_ms: 3_000,
        max_frame_bytes: 1024 * 1024,
    }
}

fn kv_stub(addr: SocketAddr) -> KvStoreStub<RpcClient> {
    KvStoreStub::new(RpcClient::new(addr, client_config()))
}

/// Asserts that the server closes `stream`: a read returns end of stream or a
/// reset within `WAIT`.
fn assert_closed_by_server(stream: &mut TcpStream) {
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let mut byte = [0u8; 1];
    match stream.read(&mut byte) {
        Ok(0) => {}
        Ok(_) => panic!("the server sent data instead of closing"),
        Err(e) => assert!(
            !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "the server did not close the connection within {WAIT:?}"
        ),
    }
}

fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn generated_stubs_call_both_services() {
    let harness = start(ServerConfig::default());
    let addr = harness.server.local_addr();
    let kv = kv_stub(addr);
    assert_eq!(kv.get(&get_request(b"k1")).unwrap(), echo_get(b"k1"));
    let mut put = PutRequest::new();
    put.value = b"v".to_vec();
    assert_eq!(kv.put(&put).unwrap().header.message, "v");
    assert!(kv.delete(&DeleteRequest::new()).unwrap().existed);
    let mut cas = CasRequest::new();
    cas.expected = b"old".to_vec();
    assert_eq!(kv.cas(&cas).unwrap().current, b"old");
    assert_eq!(kv.status(&StatusRequest::new()).unwrap().id, 7);
    kv.append(&AppendRequest::new()).unwrap();

    let raft = RaftStub::new(RpcClient::connect(addr, client_config()).unwrap());
    let mut append = AppendEntriesRequest::new();
    append.to = 3;
    let mut entry = Entry::new();
    entry.index = 42;
    append.entries.push(entry);
    let reply = raft.append_entries(&append).unwrap();
    assert_eq!(
        (reply.from, reply.match_index, reply.success),
        (3, 42, true)
    );
    let mut heartbeat = HeartbeatRequest::new();
    heartbeat.read_context = 99;
    assert_eq!(raft.heartbeat(&heartbeat).unwrap().read_context, 99);
    assert!(
        raft.request_vote(&RequestVoteRequest::new())
            .unwrap()
            .vote_granted
    );
    let mut snapshot = InstallSnapshotRequest::new();
    snapshot.offset = 10;
    snapshot.data = vec![1; 5];
    assert_eq!(raft.install_snapshot(&snapshot).unwrap().next_offset, 15);
    harness.server.shutdown();
}

/// The per-connection budget (the KV service's max_sessions_per_connection)
/// is counted per connection: spent on one, fresh on the next.
#[test]
fn a_connection_budget_is_spent_per_connection() {
    let harness = start(ServerConfig::default());
    let addr = harness.server.local_addr();
    let first = kv_stub(addr);
    let opened: Vec<u64> = (0..4)
        .map(|_| {
            first
                .open_session(&OpenSessionRequest::new())
                .unwrap()
                .client_id
        })
        .collect();
    assert_eq!(opened, vec![1, 1, u64::MAX, u64::MAX]);
    let second = kv_stub(addr);
    let reply = second.open_session(&OpenSessionRequest::new()).unwrap();
    assert_eq!(reply.client_id, 1, "a new connection has its own budget");
    harness.server.shutdown();
}

#[test]
fn rpc_level_errors_are_reported_and_keep_the_connection() {
    let (tx, _rx) = crossbeam_channel::bounded(1);
    let router = Router::new().with_kv_store(Arc::new(TestService { deferred: tx }));
    let server = RpcServer::bind("127.0.0.1:0", ServerConfig::default(), router).unwrap();
    let client = RpcClient::connect(server.local_addr(), client_config()).unwrap();
    let code_of = |result: Result<Vec<u8>, RpcError>| match result {
        Err(RpcError::Remote { code, message }) => {
            assert!(!message.is_empty());
            code
        }
        other => panic!("expected a remote error, got {other:?}"),
    };
    assert_eq!(
        code_of(client.call_method(kv_store::SERVICE_ID, 99, b"")),
        RpcCode::UnknownMethod
    );
    assert_eq!(
        code_of(client.call_method(77, 1, b"")),
        RpcCode::UnknownService
    );
    // Raft is not registered on this router.
    assert_eq!(
        code_of(client.call_method(raft::SERVICE_ID, raft::HEARTBEAT, b"")),
        RpcCode::UnknownService
    );
    // Bytes that are no GetRequest (field 2 announced as 1000 bytes long).
    assert_eq!(
        code_of(client.call_method(kv_store::SERVICE_ID, kv_store::GET, &[0x12, 0xe8, 0x07, 1])),
        RpcCode::BadRequest
    );
    // The connection survived all of that.
    let reply = KvStoreStub::new(&client)
        .get(&get_request(b"still"))
        .unwrap();
    assert_eq!(reply.value, b"still");
    assert!(client.is_connected());
}

#[test]
fn a_dropped_responder_answers_with_an_error() {
    let harness = start(ServerConfig::default());
    let kv = kv_stub(harness.server.local_addr());
    match kv.get(&get_request(DROP)) {
        Err(RpcError::Remote { code, message }) => {
            assert_eq!(code, RpcCode::NoReply);
            assert!(message.contains("kvstore.KVStore/Get"), "{message}");
        }
        other => panic!("expected NoReply, got {other:?}"),
    }
    assert_eq!(kv.get(&get_request(b"after")).unwrap().value, b"after");
}

#[test]
fn a_blocking_call_is_answered_later_from_another_thread() {
    let harness = start(ServerConfig::default());
    let deferred = harness.deferred.clone();
    let answerer = std::thread::spawn(move || {
        let (key, responder) = deferred.recv_timeout(WAIT).expect("a deferred call");
        std::thread::sleep(Duration::from_millis(20));
        responder.send(echo_get(&key));
    });
    let kv = kv_stub(harness.server.local_addr());
    assert_eq!(kv.get(&get_request(b"defer-1")).unwrap().value, b"defer-1");
    answerer.join().unwrap();
}

fn pipelined_config(max_outstanding: usize) -> PipelinedConfig {
    PipelinedConfig {
        max_outstanding,
        max_frame_bytes: 1024 * 1024,
        ..PipelinedConfig::default()
    }
}

fn get_bytes(key: &[u8]) -> Vec<u8> {
    get_request(key).write_to_bytes().unwrap()
}

/// Sends a Get of key `defer-<call id>` for each call id: the test service
/// hands each one's responder to the test instead of answering.
fn send_deferred_gets(pipeline: &PipelinedConnection, call_ids: std::ops::RangeInclusive<u64>) {
    for call_id in call_ids {
        let request = get_bytes(format!("defer-{call_id}").as_bytes());
        pipeline
            .send(kv_store::SERVICE_ID, kv_store::GET, call_id, &request)
            .unwrap();
    }
}

/// The next `count` deferred calls the service received: key and responder.
fn take_deferred(harness: &Harness, count: usize) -> Vec<(Vec<u8>, Responder<GetReply>)> {
    (0..count)
        .map(|_| {
            harness
                .deferred
                .recv_timeout(WAIT)
                .expect("a deferred call")
        })
        .collect()
}

#[test]
fn pipelined_replies_come_back_out_of_order_by_call_id() {
    let harness = start(ServerConfig::default());
    let (replies_tx, replies) = crossbeam_channel::bounded(16);
    let pipeline =
        PipelinedConnection::connect(harness.server.local_addr(), pipelined_config(4), replies_tx)
            .unwrap();
    send_deferred_gets(&pipeline, 1..=4);
    // The window is full: a fifth call is refused, not queued.
    assert!(matches!(
        pipeline.send(kv_store::SERVICE_ID, kv_store::GET, 5, &get_bytes(b"x")),
        Err(RpcError::Overloaded { max_outstanding: 4 })
    ));
    let mut held = take_deferred(&harness, 4);
    // Answer in reverse order, from another thread.
    let answerer = std::thread::spawn(move || {
        while let Some((key, responder)) = held.pop() {
            responder.send(echo_get(&key));
        }
    });
    let mut order = Vec::new();
    for _ in 0..4 {
        let (call_id, reply) = replies.recv_timeout(WAIT).expect("a reply");
        let reply: GetReply = decode_message(&reply.unwrap()).unwrap();
        assert_eq!(reply.value, format!("defer-{call_id}").into_bytes());
        order.push(call_id);
    }
    answerer.join().unwrap();
    assert_eq!(order, vec![4, 3, 2, 1]);
    assert_eq!(pipeline.outstanding(), 0);

    // Pipelined calls answered at once, then a raft call on the same window.
    for call_id in 10..14u64 {
        pipeline
            .send(
                kv_store::SERVICE_ID,
                kv_store::GET,
                call_id,
                &get_bytes(b"now"),
            )
            .unwrap();
    }
    let mut ids: Vec<u64> = (0..4)
        .map(|_| replies.recv_timeout(WAIT).unwrap().0)
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, vec![10, 11, 12, 13]);
    let mut heartbeat = HeartbeatRequest::new();
    heartbeat.read_context = 5;
    pipeline
        .send(
            raft::SERVICE_ID,
            raft::HEARTBEAT,
            20,
            &heartbeat.write_to_bytes().unwrap(),
        )
        .unwrap();
    let (call_id, reply) = replies.recv_timeout(WAIT).unwrap();
    assert_eq!(call_id, 20);
    assert_eq!(
        decode_message::<HeartbeatReply>(&reply.unwrap())
            .unwrap()
            .read_context,
        5
    );
}

/// Replies sent inside a `ReplyBatch` wait for the batch to end and then all
/// arrive; a reply from another thread outside any batch goes out at once
/// (carrying the deferred ones with it).
#[test]
fn a_reply_batch_defers_writes_until_it_ends() {
    let harness = start(ServerConfig::default());
    let (replies_tx, replies) = crossbeam_channel::bounded(16);
    let pipeline =
        PipelinedConnection::connect(harness.server.local_addr(), pipelined_config(8), replies_tx)
            .unwrap();
    send_deferred_gets(&pipeline, 1..=4);
    let mut held = take_deferred(&harness, 4);
    let last = held.pop().unwrap();
    let batch = ReplyBatch::begin();
    for (key, responder) in held {
        responder.send(echo_get(&key));
    }
    // Nothing may arrive while the batch is open (a slow machine can only
    // make this pass, never fail falsely).
    assert!(replies.recv_timeout(Duration::from_millis(200)).is_err());
    drop(batch);
    let mut ids: Vec<u64> = (0..3)
        .map(|_| replies.recv_timeout(WAIT).expect("a batched reply").0)
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, vec![1, 2, 3]);
    // Outside a batch a reply is written at once.
    let (key, responder) = last;
    responder.send(echo_get(&key));
    let (call_id, reply) = replies.recv_timeout(WAIT).expect("an immediate reply");
    assert_eq!(call_id, 4);
    let reply: GetReply = decode_message(&reply.unwrap()).unwrap();
    assert_eq!(reply.value, b"defer-4".to_vec());
}

#[test]
fn a_broken_pipeline_fails_every_outstanding_call() {
    let harness = start(ServerConfig::default());
    let (replies_tx, replies) = crossbeam_channel::bounded(16);
    let pipeline =
        PipelinedConnection::connect(harness.server.local_addr(), pipelined_config(8), replies_tx)
            .unwrap();
    for call_id in 1..=3u64 {
        pipeline
            .send(
                kv_store::SERVICE_ID,
                kv_store::GET,
                call_id,
                &get_bytes(b"defer"),
            )
            .unwrap();
    }
    let held: Vec<_> = (0..3)
        .map(|_| harness.deferred.recv_timeout(WAIT).unwrap())
        .collect();
    harness.server.shutdown();
    let mut failed: Vec<u64> = (0..3)
        .map(|_| {
            let (call_id, result) = replies.recv_timeout(WAIT).expect("an error per call");
            assert!(result.is_err(), "call {call_id} must fail");
            call_id
        })
        .collect();
    failed.sort_unstable();
    assert_eq!(failed, vec![1, 2, 3]);
    assert!(pipeline.failure().is_some());
    assert!(pipeline
        .send(kv_store::SERVICE_ID, kv_store::GET, 4, &get_bytes(b"x"))
        .is_err());
    // Answering on a closed connection is harmless.
    for (key, responder) in held {
        responder.send(echo_get(&key));
    }
    pipeline.close();
}

#[test]
fn closing_a_pipeline_does_not_wait_for_a_full_reply_channel() {
    let harness = start(ServerConfig::default());
    let (replies_tx, replies) = crossbeam_channel::bounded(1);
    let pipeline =
        PipelinedConnection::connect(harness.server.local_addr(), pipelined_config(8), replies_tx)
            .unwrap();
    for call_id in 1..=4u64 {
        pipeline
            .send(
                kv_store::SERVICE_ID,
                kv_store::GET,
                call_id,
                &get_bytes(b"now"),
            )
            .unwrap();
    }
    // The channel holds one reply; the reader is stuck on the second.
    wait_until("the reply channel is full", || replies.is_full());
    let started = Instant::now();
    pipeline.close();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "close took {:?}",
        started.elapsed()
    );
    assert_eq!(replies.recv().unwrap().0, 1);
}

#[test]
fn hostile_input_closes_only_that_connection() {
    let harness = start(ServerConfig {
        max_frame_bytes: 64 * 1024,
        ..ServerConfig::default()
    });
    let addr = harness.server.local_addr();
    let kv = kv_stub(addr);
    assert_eq!(kv.get(&get_request(b"a")).unwrap().value, b"a");

    // A 4 GiB length prefix.
    let mut huge = TcpStream::connect(addr).unwrap();
    huge.write_all(&[0xff, 0xff, 0xff, 0xff, 0, 0]).unwrap();
    assert_closed_by_server(&mut huge);
    assert_eq!(kv.get(&get_request(b"b")).unwrap().value, b"b");

    // Garbage: a plausible length, then an unknown frame kind.
    let mut garbage = TcpStream::connect(addr).unwrap();
    let mut bytes = vec![0, 0, 0, 30];
    bytes.extend(std::iter::repeat_n(0xab, 30));
    garbage.write_all(&bytes).unwrap();
    assert_closed_by_server(&mut garbage);

    // A response frame sent to the server.
    let mut wrong_kind = TcpStream::connect(addr).unwrap();
    let mut frame = Vec::new();
    let header = kvstore_raft::rpc::frame::FrameHeader {
        kind: kvstore_raft::rpc::frame::FrameKind::Response,
        ..kvstore_raft::rpc::frame::FrameHeader::request(1, 1, 1)
    };
    kvstore_raft::rpc::frame::encode_frame(&mut frame, &header, "", b"", 1024).unwrap();
    wrong_kind.write_all(&frame).unwrap();
    assert_closed_by_server(&mut wrong_kind);

    // The well-behaved client was never disturbed.
    assert_eq!(kv.get(&get_request(b"c")).unwrap().value, b"c");
    assert!(kv.channel().is_connected());
}

#[test]
fn frames_over_the_limit_are_refused_on_both_sides() {
    let harness = start(ServerConfig {
        max_frame_bytes: 4 * 1024,
        ..ServerConfig::default()
    });
    let addr = harness.server.local_addr();
    // The client's own limit refuses before sending and keeps the connection.
    let small = KvStoreStub::new(RpcClient::new(
        addr,
        ClientConfig {
            max_frame_bytes: 2 * 1024,
            ..client_config()
        },
    ));
    assert!(matches!(
        small.get(&get_request(&[7; 3000])),
        Err(RpcError::FrameTooLarge {
            max_frame_bytes: 2048,
            ..
        })
    ));
    assert_eq!(small.get(&get_request(b"fits")).unwrap().value, b"fits");
    // A request over the server's limit closes that connection; the client
    // reconnects on its next call.
    let kv = kv_stub(addr);
    let error = kv.get(&get_request(&[7; 8000])).unwrap_err();
    assert!(
        matches!(error, RpcError::Closed { .. } | RpcError::Io { .. }),
        "unexpected {error:?}"
    );
    assert_eq!(kv.get(&get_request(b"again")).unwrap().value, b"again");
}

#[test]
fn the_connection_limit_refuses_the_extra_connection() {
    let harness = start(ServerConfig {
        max_connections: 2,
        ..ServerConfig::default()
    });
    let addr = harness.server.local_addr();
    let first = kv_stub(addr);
    let second = kv_stub(addr);
    first.get(&get_request(b"1")).unwrap();
    second.get(&get_request(b"2")).unwrap();
    assert_eq!(harness.server.active_connections(), 2);

    let mut third = TcpStream::connect(addr).unwrap();
    assert_closed_by_server(&mut third);
    let refused = kv_stub(addr);
    assert!(refused.get(&get_request(b"3")).is_err());

    // The served connections are unaffected; once one closes, a slot frees.
    assert_eq!(first.get(&get_request(b"1b")).unwrap().value, b"1b");
    second.channel().disconnect();
    wait_until("a connection slot is free", || {
        harness.server.active_connections() < 2
    });
    assert_eq!(refused.get(&get_request(b"3b")).unwrap().value, b"3b");
}

#[test]
fn an_idle_connection_is_closed() {
    let harness = start(ServerConfig {
        idle_timeout_ms: 200,
        ..ServerConfig::default()
    });
    let addr = harness.server.local_addr();
    let mut idle = TcpStream::connect(addr).unwrap();
    let started = Instant::now();
    assert_closed_by_server(&mut idle);
    assert!(started.elapsed() >= Duration::from_millis(150));
    // A client whose connection was closed for idleness just reconnects.
    let kv = kv_stub(addr);
    kv.get(&get_request(b"x")).unwrap();
    wait_until("the idle client is disconnected", || {
        harness.server.active_connections() == 0
    });
    assert_eq!(kv.get(&get_request(b"y")).unwrap().value, b"y");
}

#[test]
fn an_idle_connection_with_a_call_in_flight_stays_open() {
    let harness = start(ServerConfig {
        idle_timeout_ms: 100,
        ..ServerConfig::default()
    });
    let deferred = harness.deferred.clone();
    let answerer = std::thread::spawn(move || {
        let (key, responder) = deferred.recv_timeout(WAIT).unwrap();
        // Several idle timeouts pass while the call is in flight.
        std::thread::sleep(Duration::from_millis(400));
        responder.send(echo_get(&key));
    });
    let kv = kv_stub(harness.server.local_addr());
    assert_eq!(
        kv.get(&get_request(b"defer-slow")).unwrap().value,
        b"defer-slow"
    );
    answerer.join().unwrap();
}

#[test]
fn shutdown_closes_connections_and_joins_quickly() {
    let harness = start(ServerConfig::default());
    let addr = harness.server.local_addr();
    let kv = kv_stub(addr);
    kv.get(&get_request(b"x")).unwrap();
    let mut raw = TcpStream::connect(addr).unwrap();
    // A call whose responder is held outside the server across shutdown.
    let waiting = std::thread::spawn(move || kv.get(&get_request(b"defer-held")));
    let (key, responder) = harness.deferred.recv_timeout(WAIT).unwrap();

    let started = Instant::now();
    harness.server.shutdown();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "shutdown took {:?}",
        started.elapsed()
    );
    assert_closed_by_server(&mut raw);
    assert!(
        waiting.join().unwrap().is_err(),
        "the held call must fail, not hang"
    );
    responder.send(echo_get(&key));
    assert!(TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_err());
}

#[test]
fn the_client_reconnects_after_a_server_restart_on_the_same_port() {
    let harness = start(ServerConfig::default());
    let addr = harness.server.local_addr();
    let kv = kv_stub(addr);
    kv.get(&get_request(b"before")).unwrap();
    harness.server.shutdown();
    assert!(kv.get(&get_request(b"down")).is_err());

    let restarted = start_on(&addr.to_string(), ServerConfig::default());
    // The first call may still meet the old, dead connection; the next one
    // must reconnect.
    let reply = kv
        .get(&get_request(b"after"))
        .or_else(|_| kv.get(&get_request(b"after")));
    assert_eq!(reply.unwrap().value, b"after");
    restarted.server.shutdown();
}

#[test]
fn a_call_without_a_reply_times_out_and_the_next_call_works() {
    let harness = start(ServerConfig::default());
    let kv = KvStoreStub::new(RpcClient::new(
        harness.server.local_addr(),
        ClientConfig {
            call_timeout_ms: 200,
            ..client_config()
        },
    ));
    let started = Instant::now();
    assert!(matches!(
        kv.get(&get_request(b"defer-never")),
        Err(RpcError::Timeout {
            timeout_ms: 200,
            ..
        })
    ));
    assert!(started.elapsed() < WAIT);
    // The late answer goes to the old, dropped connection.
    let (key, responder) = harness.deferred.recv_timeout(WAIT).unwrap();
    responder.send(echo_get(&key));
    assert_eq!(kv.get(&get_request(b"next")).unwrap().value, b"next");
}

#[test]
fn errors_read_well() {
    let error = RpcError::FrameTooLarge {
        frame_bytes: 5000,
        max_frame_bytes: 4096,
    };
    assert_eq!(
        error.to_string(),
        "rpc frame of 5000 bytes exceeds max_frame_bytes (4096)"
    );
    let harness = start(ServerConfig::default());
    let taken = harness.server.local_addr();
    let (tx, _rx) = crossbeam_channel::bounded(1);
    let router = Router::new().with_kv_store(Arc::new(TestService { deferred: tx }));
    let error = RpcServer::bind(taken, ServerConfig::default(), router)
        .err()
        .expect("the port is taken");
    assert!(error.to_string().contains(&taken.to_string()), "{error}");

    let unreachable = RpcClient::connect("127.0.0.1:1".parse().unwrap(), client_config());
    let message = unreachable
        .err()
        .expect("nothing listens on port 1")
        .to_string();
    assert!(
        message.contains("127.0.0.1:1") && message.contains("connecting"),
        "{message}"
    );
}
