//! The in-process transport from a Redis connection's clerk to its own node's KV service:
//! the same handler the RPC port dispatches to, called directly, so that a command sent to
//! the leader costs no loopback round trip. Only the Exec method is carried (the only one
//! the Redis connections use); anything else is refused as an unknown method.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use protobuf::Message;

use crate::kv::service::KvService;
use crate::proto::kvstore::ExecRequest;
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
        if service_id != kv_store::SERVICE_ID || method_id != kv_store::EXEC {
            return Err(RpcError::Remote {
                code: RpcCode::UnknownMethod,
                message: format!("the local channel carries only Exec, not method {method_id}"),
            });
        }
        let request = ExecRequest::parse_from_bytes(request)
            .map_err(|e| RpcError::Decode(format!("an Exec request: {e}")))?;
        let (responder, answer) = Responder::local();
        self.service.exec(request, responder);
        let reply = answer
            .recv_timeout(self.call_timeout)
            .map_err(|_| RpcError::Timeout {
                peer: self.addr,
                timeout_ms: self.call_timeout.as_millis() as u64,
            })??;
        reply
            .write_to_bytes()
            .map_err(|e| RpcError::Decode(format!("an Exec reply: {e}")))
    }
}
