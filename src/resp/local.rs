//! The in-process transport from a Redis connection's clerk to its own node's KV service:
//! the same handler the RPC port dispatches to, called directly, so that a command sent to
//! the leader costs no loopback round trip. Only the methods the Redis connections use are
//! carried: Exec, and OpenSession (a connection's clerk opens its session through the log).
//! Anything else is refused as an unknown method. A local call has no connection, so the
//! per-connection session budget does not apply: a Redis connection holds one clerk, and
//! the number of Redis connections is bounded by `max_connections`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use protobuf::Message;

use crate::kv::service::KvService;
use crate::rpc::services::{kv_store, KvStoreService};
use crate::rpc::{Responder, RpcChannel, RpcCode, RpcError};

pub struct LocalChannel {
    pub service: Arc<KvService>,
    /// How long a call waits for the service's answer (as an RPC call would).
    pub call_timeout: Duration,
    /// The node's RPC address, named in a timeout.
    pub addr: SocketAddr,
}

impl RpcChannel for LocalChannel {
    fn call_method(
        &self,
        service_id: u32,
        method_id: u32,
        request: &[u8],
    ) -> Result<Vec<u8>, RpcError> {
        if service_id != kv_store::SERVICE_ID {
            return Err(unknown(method_id));
        }
        match method_id {
            kv_store::EXEC => self.call(request, "Exec", |request, responder| {
                self.service.exec(request, responder)
            }),
            kv_store::OPEN_SESSION => self.call(request, "OpenSession", |request, responder| {
                self.service.open_session(request, responder)
            }),
            _ => Err(unknown(method_id)),
        }
    }
}

impl LocalChannel {
    /// Decodes `request`, hands it to `handler` with a local responder, and waits (at most
    /// `call_timeout`) for the answer, encoded as the RPC port would send it.
    fn call<Req: Message, Rep: Message>(
        &self,
        request: &[u8],
        method: &str,
        handler: impl FnOnce(Req, Responder<Rep>),
    ) -> Result<Vec<u8>, RpcError> {
        let request = Req::parse_from_bytes(request)
            .map_err(|e| RpcError::Decode(format!("a {method} request: {e}")))?;
        let (responder, answer) = Responder::local();
        handler(request, responder);
        let reply = answer
            .recv_timeout(self.call_timeout)
            .map_err(|_| RpcError::Timeout {
                peer: self.addr,
                timeout_ms: self.call_timeout.as_millis() as u64,
            })??;
        reply
            .write_to_bytes()
            .map_err(|e| RpcError::Decode(format!("a {method} reply: {e}")))
    }
}

fn unknown(method_id: u32) -> RpcError {
    RpcError::Remote {
        code: RpcCode::UnknownMethod,
        message: format!(
            "the local channel carries only Exec and OpenSession, not method {method_id}"
        ),
    }
}
