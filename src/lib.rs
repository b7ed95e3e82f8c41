//! kvstore-raft: a Raft-replicated key-value store.

pub mod proto {
    //! Messages generated from proto/kvstore.proto.
    include!(concat!(env!("OUT_DIR"), "/proto/mod.rs"));
}
pub mod chaos;
pub mod check;
pub mod clerk;
pub mod config;
pub mod http;
pub mod kv;
pub mod loadgen;
pub mod metrics;
pub mod node;
pub mod raft;
pub mod resp;
pub mod rpc;
pub mod storage;
pub mod threads;
