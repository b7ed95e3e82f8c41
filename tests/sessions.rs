//! Client sessions on a real cluster (issue 16, item 8): the cluster assigns
//! them through the log, a write must present its session's id and secret,
//! one connection opens a bounded number, and a client whose session is
//! gone is told so instead of having a write applied twice or answered as a
//! duplicate.

mod common;

use std::time::Duration;

use common::TestCluster;
use kvstore_raft::proto::kvstore::*;
use kvstore_raft::rpc::services::KvStoreStub;
use kvstore_raft::rpc::{ClientConfig, RpcClient};

/// A stub on one connection to the leader.
fn leader_stub(cluster: &TestCluster) -> KvStoreStub<RpcClient> {
    let leader = cluster.wait_leader(Duration::from_secs(10));
    let addr = cluster.config.addr(leader).unwrap();
    KvStoreStub::new(RpcClient::new(addr, ClientConfig::default()))
}

fn header(client_id: u64, secret: u64, seq: u64) -> protobuf::MessageField<RequestHeader> {
    protobuf::MessageField::some(RequestHeader {
        client_id,
        seq,
        session_secret: secret,
        ..Default::default()
    })
}

fn put(
    stub: &KvStoreStub<RpcClient>,
    (client_id, secret): (u64, u64),
    seq: u64,
    key: &str,
    value: &str,
) -> (ErrorCode, String) {
    let reply = stub
        .put(&PutRequest {
            header: header(client_id, secret, seq),
            key: key.into(),
            value: value.into(),
            ..Default::default()
        })
        .unwrap();
    let header = reply.header.unwrap_or_default();
    (header.error.enum_value().unwrap(), header.message)
}

fn open(stub: &KvStoreStub<RpcClient>) -> Result<(u64, u64), (ErrorCode, String)> {
    let reply = stub.open_session(&OpenSessionRequest::default()).unwrap();
    match reply.header.error.enum_value().unwrap() {
        ErrorCode::OK => Ok((reply.client_id, reply.session_secret)),
        code => Err((code, reply.header.message.clone())),
    }
}

fn value(cluster: &TestCluster, key: &str) -> Option<String> {
    let mut clerk = cluster.clerk(10_000);
    clerk
        .get(key)
        .unwrap()
        .map(|v| String::from_utf8(v).unwrap())
}

/// Before, a write with any client id made a session for it: ten thousand
/// invented ids evicted everyone else's. Now it is refused, applies nothing,
/// and says why.
#[test]
fn a_write_with_an_invented_client_id_is_refused_and_applies_nothing() {
    let cluster = TestCluster::start(3, "");
    let stub = leader_stub(&cluster);
    let (code, message) = put(&stub, (4242, 0), 1, "k", "invented");
    assert_eq!(code, ErrorCode::SESSION_EXPIRED, "{message}");
    assert!(message.contains("open a new session"), "{message}");
    assert_eq!(value(&cluster, "k"), None);
    // Session ids are log indexes, the same on every node: a second session
    // gets a later one.
    let first = open(&stub).unwrap();
    let second = open(&stub).unwrap();
    assert!(0 < first.0 && first.0 < second.0, "{first:?} {second:?}");
}

/// Before, sending a victim's (client_id, next seq) made the victim's own
/// write with that seq be answered OK as a duplicate, never applied. Without
/// the victim's secret the forged write is refused, and the victim's applies.
#[test]
fn a_forged_write_without_the_secret_cannot_fake_a_duplicate() {
    let cluster = TestCluster::start(3, "");
    let stub = leader_stub(&cluster);
    let victim = open(&stub).unwrap();
    assert_eq!(put(&stub, victim, 1, "k", "v1").0, ErrorCode::OK);
    let forged = (victim.0, victim.1 ^ 0xffff);
    assert_eq!(
        put(&stub, forged, 2, "k", "forged").0,
        ErrorCode::SESSION_EXPIRED
    );
    assert_eq!(put(&stub, victim, 2, "k", "v2").0, ErrorCode::OK);
    assert_eq!(value(&cluster, "k").as_deref(), Some("v2"));
}

/// One connection opens at most `max_sessions_per_connection` sessions; the
/// next attempt is refused with a line naming the limit.
#[test]
fn a_connection_opens_at_most_max_sessions_per_connection() {
    let cluster = TestCluster::start(3, r#""max_sessions_per_connection": 3"#);
    let stub = leader_stub(&cluster);
    for _ in 0..3 {
        open(&stub).unwrap();
    }
    let (code, message) = open(&stub).unwrap_err();
    assert_eq!(code, ErrorCode::TOO_MANY_SESSIONS, "{message}");
    assert!(message.contains("max_sessions_per_connection"), "{message}");
}

/// Sessions opened by others (past `max_sessions`) evict the least recently
/// active one. Its retry of a write already applied is then refused
/// (SESSION_EXPIRED), never applied a second time; and a clerk whose session
/// was evicted between two writes opens a new one and goes on.
#[test]
fn an_evicted_session_is_never_applied_twice_and_the_clerk_reopens() {
    let cluster = TestCluster::start(3, r#""max_sessions": 2"#);
    let stub = leader_stub(&cluster);
    let victim = open(&stub).unwrap();
    assert_eq!(put(&stub, victim, 1, "k", "once").0, ErrorCode::OK);
    let mut clerk = cluster.clerk(10_000);
    clerk.append("log", "a").unwrap();
    assert_eq!(clerk.sessions_opened(), 1);
    // Two more sessions: the victim's and the clerk's are pushed out.
    open(&stub).unwrap();
    open(&stub).unwrap();
    let (code, message) = put(&stub, victim, 1, "k", "once");
    assert_eq!(code, ErrorCode::SESSION_EXPIRED, "{message}");
    assert_eq!(value(&cluster, "k").as_deref(), Some("once"));
    clerk.append("log", "b").unwrap();
    assert_eq!(clerk.sessions_opened(), 2, "the clerk opened a new session");
    assert_eq!(value(&cluster, "log").as_deref(), Some("ab"));
}
