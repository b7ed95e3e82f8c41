//! One kvstore-raft server: storage, node, apply thread and the RPC server
//! serving both services on one port, assembled from the cluster config.
//! The `kvserver` binary is a thin wrapper around [`KvServer::start`]; the
//! in-process tests start several in one process.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::applier::{rebuild_engine, Applier};
use super::backup_source::{BackupSource, EngineSlot};
use super::engine::{self, Engine, ENGINE_DIR_NAME};
use super::service::{KvService, ServiceOptions};
use super::snapshot_stream::ChunkCodec;
use super::snapshot_transfer::EngineSnapshots;
use super::state_machine::{KvOptions, KvStateMachine};
use super::waiters::Waiters;
use crate::config::ClusterConfig;
use crate::node::{LinkFilter, Node, NodeHandle, NodeOptions};
use crate::raft::NodeId;
use crate::rpc::services::raft as raft_ids;
use crate::rpc::{Credentials, Router, RpcServer, ServerAuth, ServerConfig};
use crate::storage::{DiskStorage, FaultFile, FileSystem, StorageOptions};

/// Why a server could not start. Display gives one line naming the cause.
#[derive(Debug)]
pub enum StartError {
    UnknownId {
        id: NodeId,
        known: Vec<NodeId>,
    },
    Storage(crate::storage::StorageError),
    Snapshot(String),
    /// The node's address cannot be bound (in use, or not an address of
    /// this machine); found before the data directory is opened.
    Bind {
        addr: std::net::SocketAddr,
        error: std::io::Error,
    },
    /// The RPC server did not start; its error names the address.
    Serve(std::io::Error),
    Io(std::io::Error),
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartError::UnknownId { id, known } => {
                write!(
                    f,
                    "node id {id} is not in the config (its ids are {known:?})"
                )
            }
            StartError::Storage(e) => write!(f, "{e}"),
            StartError::Snapshot(e) => write!(f, "{e}"),
            StartError::Bind { addr, error } => write!(f, "cannot listen on {addr}: {error}"),
            StartError::Serve(e) => write!(f, "{e}"),
            StartError::Io(e) => write!(f, "cannot start threads: {e}"),
        }
    }
}

impl std::error::Error for StartError {}

/// How to start one server; tests override the data directory and links.
pub struct StartOptions {
    pub id: NodeId,
    /// Overrides `<data_dir>/node<id>` from the config.
    pub data_dir: Option<PathBuf>,
    pub link_filter: Option<LinkFilter>,
    /// The testing hook that stalls or fails this node's fsyncs on request
    /// (`kvserver --fault-file`); `None` in production.
    pub fault_file: Option<PathBuf>,
    /// `kvserver --join`: start with no configuration and wait to be added
    /// (the id need not be in the cluster file; see `listen`).
    pub join: bool,
    /// The address to serve on, for a node the cluster file does not list.
    pub listen: Option<std::net::SocketAddr>,
    /// The file system under the storage; `None` is the real one (tests
    /// put nodes on a simulated disk that forgets at a power loss).
    pub fs: Option<Arc<dyn FileSystem>>,
}

pub struct KvServer {
    /// The LockQueue's slots, for monitoring.
    waiters: Arc<Waiters>,
    /// The KV service the RPC port serves, for other wires (src/resp/) to call in-process.
    service: Arc<KvService>,
    node: Option<Node>,
    rpc: Option<RpcServer>,
    applier: Option<JoinHandle<()>>,
}

/// The most bytes a key may have.
const MAX_KEY_BYTES: usize = super::engine::MAX_KEY_BYTES;

impl KvServer {
    pub fn start(config: &ClusterConfig, start: StartOptions) -> Result<KvServer, StartError> {
        let listed = config.node(start.id).map(|me| me.addr());
        let addr = match (start.listen, listed) {
            (Some(addr), _) if start.join => addr,
            (_, Some(addr)) => addr,
            _ => {
                return Err(StartError::UnknownId {
                    id: start.id,
                    known: config.node_ids(),
                })
            }
        };
        // Opening the storage takes the directory lock and starts a new WAL
        // segment, and the node writes to it, so try the port first: a port
        // in use then stops the server before it touches the data directory.
        // The listener is dropped at once (std sets SO_REUSEADDR, so the real
        // bind below can take the port again); that bind still reports a
        // port taken in between.
        drop(std::net::TcpListener::bind(addr).map_err(|error| StartError::Bind { addr, error })?);
        let data_dir = start
            .data_dir
            .clone()
            .unwrap_or_else(|| config.node_data_dir(start.id));
        let (storage, restored) =
            DiskStorage::open(&data_dir, storage_options(&start)).map_err(StartError::Storage)?;
        let kv_options = KvOptions {
            session_ttl_ms: config.session_ttl_ms,
            max_sessions: config.max_sessions,
            max_value_bytes: config.max_append_bytes / 2,
            ..KvOptions::default()
        };
        let machine = open_machine(
            &data_dir,
            restored.snapshot.as_ref(),
            kv_options,
            config.engine_cache_bytes,
        )?;
        let mut listener_config = ServerConfig {
            max_connections: config.max_connections,
            max_frame_bytes: config.max_frame_bytes,
            // Room for a few of the largest replies, never less than the
            // default: replies wait here for slow clients, not on the
            // apply thread.
            max_outbox_bytes: config
                .max_frame_bytes
                .saturating_mul(4)
                .max(ServerConfig::default().max_outbox_bytes),
            auth: ServerAuth {
                credentials: node_credentials(config, start.id),
                members: config.node_ids(),
                open_membership: true,
                // Only members that proved the secret may speak Raft.
                peer_services: vec![raft_ids::SERVICE_ID],
                ..ServerAuth::default()
            },
            idle_timeout_ms: config.idle_timeout_ms,
            frame_timeout_ms: config.frame_timeout_ms,
            ..ServerConfig::default()
        };
        let engine_slot = Arc::new(EngineSlot::default());
        let mut node_options = node_options(config, start.id, start.link_filter);
        node_options.join = start.join;
        node_options.snapshot_store = Some(Arc::new(EngineSnapshots::new(
            Arc::clone(&engine_slot),
            data_dir.join(ENGINE_DIR_NAME),
            config.engine_cache_bytes,
            ChunkCodec::from_name(&config.snapshot_compression)
                .expect("the configuration names a known codec"),
        )));
        let (node, tasks) = Node::start(node_options, storage, restored).map_err(StartError::Io)?;
        // A panic on an RPC thread (or in a handler it runs) stops the node, as one on a Raft
        // thread does.
        listener_config.on_panic = node.handle().stopper().on_panic();
        let waiters = Arc::new(Waiters::new(config.proposal_queue_capacity.max(1)));
        crate::metrics::warnings::set_thresholds(
            config.election_timeout_max_ms,
            config.snapshot_threshold_bytes,
        );
        let service = Arc::new(
            KvService::new(
                node.handle().clone(),
                Arc::clone(&waiters),
                ServiceOptions {
                    queue_wait: Duration::from_millis(config.proposal_queue_wait_ms),
                    request_timeout: Duration::from_millis(config.request_timeout_ms),
                    client_token: config.client_token.clone(),
                    max_key_bytes: MAX_KEY_BYTES,
                    max_value_bytes: config.max_append_bytes / 2,
                    max_command_bytes: config.max_append_bytes,
                    max_sessions_per_connection: config.max_sessions_per_connection,
                    fault_file: start.fault_file.as_deref().map(FaultFile::new),
                },
            )
            .with_backups(BackupSource::new(
                node.handle().clone(),
                Arc::clone(&engine_slot),
                config.max_frame_bytes,
                Duration::from_millis(config.request_timeout_ms),
            )),
        );
        let router = Router::new()
            .with_kv_store(Arc::clone(&service) as Arc<dyn crate::rpc::services::KvStoreService>)
            .with_raft(node.raft_service());
        let rpc = match RpcServer::bind(addr, listener_config, router) {
            Ok(rpc) => rpc,
            Err(error) => {
                node.shutdown();
                return Err(StartError::Serve(error));
            }
        };
        let applier = Applier::new(
            node.handle().clone(),
            tasks,
            Arc::clone(&waiters),
            machine,
            config.snapshot_threshold_bytes,
            config.engine_cache_bytes,
        )
        .with_engine_slot(engine_slot);
        let applier = node
            .handle()
            .stopper()
            .spawn(format!("apply-{}", start.id), move || applier.run())
            .map_err(StartError::Io)?;
        Ok(KvServer {
            waiters,
            service,
            node: Some(node),
            rpc: Some(rpc),
            applier: Some(applier),
        })
    }

    pub fn handle(&self) -> &NodeHandle {
        self.node.as_ref().expect("running").handle()
    }

    /// The KV service, as the RPC port serves it.
    pub fn service(&self) -> Arc<KvService> {
        Arc::clone(&self.service)
    }

    /// The LockQueue: how many of its slots are in use is a gauge of load.
    pub fn waiters(&self) -> Arc<Waiters> {
        Arc::clone(&self.waiters)
    }

    pub fn local_addr(&self) -> std::net::SocketAddr {
        self.rpc.as_ref().expect("running").local_addr()
    }

    /// Stops serving, then stops the node and the apply thread. Every
    /// request still waiting is answered SHUTTING_DOWN.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(rpc) = self.rpc.take() {
            rpc.shutdown();
        }
        if let Some(node) = self.node.take() {
            node.shutdown();
        }
        if let Some(applier) = self.applier.take() {
            if applier.join().is_err() {
                log::error!("the apply thread panicked");
            }
        }
    }
}

impl Drop for KvServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What node `id` presents to its peers and checks on its own connections.
pub fn node_credentials(config: &ClusterConfig, id: NodeId) -> Credentials {
    Credentials {
        cluster_id: config.cluster_id.clone(),
        node_id: id,
        secret: config.secret.clone(),
    }
}

/// The node's tuning, from the cluster config.
/// Opens the node's storage engine (`<data dir>/engine`) and the state machine in it, reading
/// only its metadata and sessions: the node then replays the WAL after the engine's applied
/// index (entries at or below it are skipped). When the log's snapshot is ahead of the engine
/// — a crash while a snapshot from the leader was being swapped in, or a data directory of a
/// build without the engine — the engine is rebuilt from that snapshot file's bytes.
pub fn open_machine(
    data_dir: &std::path::Path,
    snapshot: Option<&crate::raft::Snapshot>,
    options: KvOptions,
    cache_bytes: u64,
) -> Result<KvStateMachine, StartError> {
    let live = data_dir.join(ENGINE_DIR_NAME);
    engine::recover_dirs(&live)
        .map_err(|e| StartError::Snapshot(format!("engine {}: {e}", live.display())))?;
    let engine =
        Engine::open(&live, cache_bytes).map_err(|e| StartError::Snapshot(e.to_string()))?;
    let machine =
        KvStateMachine::open(engine, options).map_err(|e| StartError::Snapshot(e.to_string()))?;
    log::info!(
        "engine {}: applied index {}, {} sessions; the WAL is replayed after the log's snapshot at {}",
        live.display(),
        machine.applied_index(),
        machine.session_count(),
        snapshot.map_or(0, |s| s.meta.index)
    );
    let Some(snapshot) = snapshot else {
        return Ok(machine);
    };
    if snapshot.meta.index <= machine.applied_index() {
        return Ok(machine);
    }
    let behind = format!(
        "{}: the engine's applied index {} is behind the log's snapshot at index {}",
        data_dir.display(),
        machine.applied_index(),
        snapshot.meta.index
    );
    if snapshot.data.is_empty() {
        // The log was compacted only after a durable checkpoint at or past its index.
        return Err(StartError::Snapshot(format!(
            "{behind}, and that snapshot holds no data: the engine lost durable writes"
        )));
    }
    log::warn!("{behind}: rebuilding the engine from the snapshot file");
    drop(machine);
    rebuild_engine(&live, &snapshot.data, options, cache_bytes)
        .map_err(|e| StartError::Snapshot(format!("{behind}; rebuilding it failed: {e}")))
}

/// A learner is promoted to voter only when its log is at most this many
/// entries behind the leader's: close enough that it catches up within a
/// few AppendEntries, so the new majority does not wait on it.
pub const PROMOTE_MAX_LAG_ENTRIES: u64 = 1000;

pub fn node_options(
    config: &ClusterConfig,
    id: NodeId,
    link_filter: Option<LinkFilter>,
) -> NodeOptions {
    NodeOptions {
        id,
        peers: config.raft_nodes.iter().map(|n| (n.id, n.addr())).collect(),
        tick_ms: config.tick_ms,
        election_timeout_min_ms: config.election_timeout_min_ms,
        election_timeout_max_ms: config.election_timeout_max_ms,
        heartbeat_interval_ms: config.heartbeat_interval_ms,
        max_inflight_appends: config.max_inflight_appends,
        max_append_bytes: config.max_append_bytes,
        max_snapshot_chunk_bytes: config.max_append_bytes,
        max_uncommitted_bytes: 64 << 20,
        proposal_queue_capacity: config.proposal_queue_capacity,
        max_batch_requests: 1024,
        max_frame_bytes: config.max_frame_bytes,
        peer_connect_timeout_ms: config.heartbeat_interval_ms.max(100),
        credentials: node_credentials(config, id),
        link_filter,
        join: false,
        promote_max_lag_entries: PROMOTE_MAX_LAG_ENTRIES,
        // The server sets its engine's (`KvServer::start`).
        snapshot_store: None,
        snapshot_send_bytes_per_sec: config.snapshot_send_bytes_per_sec,
        max_catch_up_log_bytes: config.max_catch_up_log_bytes,
    }
}

fn storage_options(start: &StartOptions) -> StorageOptions {
    let defaults = StorageOptions::default();
    StorageOptions {
        fault_file: start.fault_file.as_deref().map(FaultFile::new),
        fs: start.fs.clone().unwrap_or(defaults.fs.clone()),
        ..defaults
    }
}
