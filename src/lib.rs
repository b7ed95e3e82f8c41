//! kvstore-raft: a Raft-replicated key-value store.

pub mod proto {
    //! Messages generated from proto/kvstore.proto.
    include!(concat!(env!("OUT_DIR"), "/proto/mod.rs"));
}
pub mod raft;
pub mod storage;
