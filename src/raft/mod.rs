//! The consensus core: Raft as a pure, deterministic state machine in the
//! style of etcd's raft. It has no threads, sockets, files or clocks. The
//! driver (`node/` in the server, a simulated network in the tests) feeds it
//! ticks and messages and carries out what each [`Ready`] asks, in order:
//!
//! 1. persist `hard_state` and `entries` (and `snapshot`) durably;
//! 2. send `messages` (`messages_unpersisted` may be sent before step 1);
//! 3. apply `committed` to the state machine, in order; answer `read_states`
//!    once the state machine has applied their index;
//! 4. call [`RaftCore::advance`] with the `Ready`.
//!
//! Same inputs, same outputs: a seeded simulation replays any run exactly.

mod core;
mod log;
mod membership;
mod progress;
mod rng;
mod types;

pub use self::core::{
    Config, FollowerStatus, ProposeError, RaftCore, Ready, RestoredState, Status,
};
pub use self::membership::{ConfChange, ConfChangeError, Membership};
pub use self::rng::SplitMix64;
pub use self::types::{
    Entry, EntryKind, HardState, Message, MessageBody, NodeId, ReadState, Role, Snapshot,
    SnapshotMeta, NO_NODE,
};
#[cfg(test)]
mod tests;
