//! The key-value service on top of Raft: the replicated state machine (the
//! map plus the client sessions that make retries exactly-once) and the codec
//! of the commands that log entries carry.

pub mod applier;
pub mod backup;
pub mod backup_source;
pub mod engine;
pub mod membership;
pub mod redis_ops;
pub mod server;
pub mod service;
pub mod snapshot_stream;
pub mod snapshot_transfer;
pub mod state_machine;
pub mod store;
pub mod waiters;
