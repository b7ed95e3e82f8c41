//! The wire layer: length-prefixed frames over blocking TCP. A node serves the
//! KVStore and Raft services on one port with [`RpcServer`], a bounded pool
//! of connection threads that decode each request frame and hand it to the
//! generated dispatcher of its service; handlers answer through a
//! [`Responder`], at once or later from another thread, so one connection can
//! carry many pipelined calls answered out of order. Clients call through
//! the generated stubs over an [`RpcChannel`]: [`RpcClient`] makes one
//! blocking call at a time with timeouts and reconnects after a failure, and
//! [`PipelinedConnection`] streams Raft requests to a peer without waiting,
//! delivering replies by call id to a channel. Every connection opens with
//! a [`handshake`] (cluster id, node id, a proof of the cluster secret)
//! that decides which services it may call. Every frame, queue and wait is
//! bounded, and bad input from the network closes that connection only.

pub mod client;
pub mod frame;
pub mod handshake;
pub mod server;
pub mod services;

pub use client::{
    call_unary, decode_message, ClientConfig, PipelinedConfig, PipelinedConnection, PipelinedReply,
    ReplySink, RpcChannel, RpcClient, RpcError,
};
pub use frame::RpcCode;
pub use handshake::{Access, Credentials, ServerAuth};
pub use server::{
    decode_and_call, BatchWake, RawResponder, ReplyBatch, Responder, RpcServer, ServerConfig,
};
pub use services::Router;
