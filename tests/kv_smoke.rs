//! First light: a 3-node in-process cluster elects a leader, and a put
//! through the leader is readable through the leader.

mod common;

use std::time::Duration;

use common::TestCluster;
use kvstore_raft::proto::kvstore::*;
use kvstore_raft::rpc::services::KvStoreStub;
use kvstore_raft::rpc::{ClientConfig, RpcClient};

fn stub(cluster: &TestCluster, id: u64) -> KvStoreStub<RpcClient> {
    let addr = cluster.config.addr(id).unwrap();
    KvStoreStub::new(RpcClient::new(addr, ClientConfig::default()))
}

fn header(
    (client_id, session_secret): (u64, u64),
    seq: u64,
) -> protobuf::MessageField<RequestHeader> {
    protobuf::MessageField::some(RequestHeader {
        client_id,
        seq,
        session_secret,
        ..Default::default()
    })
}

#[test]
fn put_then_get_through_the_leader() {
    let cluster = TestCluster::start(3, "");
    let leader = cluster.wait_leader(Duration::from_secs(5));
    let client = stub(&cluster, leader);
    // Writes need a session: the cluster assigns its id (an index) and secret.
    let opened = client.open_session(&OpenSessionRequest::default()).unwrap();
    assert_eq!(opened.header.error.enum_value(), Ok(ErrorCode::OK));
    let session = (opened.client_id, opened.session_secret);
    assert_ne!(session.0, 0);
    let reply = client
        .put(&PutRequest {
            header: header(session, 1),
            key: b"a".to_vec(),
            value: b"1".to_vec(),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(
        reply.header.error.enum_value(),
        Ok(ErrorCode::OK),
        "{:?}",
        reply.header
    );
    let reply = client
        .get(&GetRequest {
            header: header((0, 0), 0),
            key: b"a".to_vec(),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(
        reply.header.error.enum_value(),
        Ok(ErrorCode::OK),
        "{:?}",
        reply.header
    );
    assert!(reply.found);
    assert_eq!(reply.value, b"1");
    let follower = (1..=3).find(|&id| id != leader).unwrap();
    let reply = stub(&cluster, follower)
        .get(&GetRequest {
            header: header((0, 0), 0),
            key: b"a".to_vec(),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(reply.header.error.enum_value(), Ok(ErrorCode::NOT_LEADER));
    assert_eq!(reply.header.leader_hint, leader);
}
