//! An in-process cluster of real servers on loopback TCP, for the KV
//! service tests: every node has its own data directory under one temporary
//! directory, and links can be cut in either direction (partitions) through
//! the node's link filter, without touching sockets.
#![allow(dead_code)]

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvstore_raft::config::ClusterConfig;
use kvstore_raft::kv::server::{KvServer, StartOptions};
use kvstore_raft::node::LinkFilter;
use kvstore_raft::raft::{NodeId, Role, Status};
use kvstore_raft::storage::FileSystem;
use parking_lot::Mutex;

// A binary with both `common` and `process` (tests/http.rs) loads this twice; the file
// locks keep the two copies from handing out the same port.
#[allow(clippy::duplicate_mod)]
#[path = "../ports/mod.rs"]
mod ports;
pub use ports::free_ports;

pub struct TestCluster {
    pub dir: tempfile::TempDir,
    pub config: ClusterConfig,
    pub config_path: std::path::PathBuf,
    servers: Mutex<Vec<Option<KvServer>>>,
    /// Directed links (from, to) that drop every message.
    cut: Arc<Mutex<HashSet<(NodeId, NodeId)>>>,
    /// Per node (index `id - 1`), the file system its storage runs on;
    /// empty: the real one.
    file_systems: Vec<Arc<dyn FileSystem>>,
}

impl TestCluster {
    /// Starts `size` nodes with test timings (election 150-300 ms, heartbeat
    /// 30 ms) and `extra` JSON keys merged into the config.
    pub fn start(size: usize, extra: &str) -> TestCluster {
        TestCluster::start_on(size, extra, Vec::new())
    }

    /// As `start`, after `seed(config, id)` has prepared each node's data
    /// directory (e.g. restored it from a backup).
    #[allow(dead_code)]
    pub fn start_seeded(
        size: usize,
        extra: &str,
        seed: impl Fn(&ClusterConfig, NodeId),
    ) -> TestCluster {
        TestCluster::build(size, extra, Vec::new(), seed)
    }

    /// As `start`, with node `id`'s storage on `file_systems[id - 1]`.
    pub fn start_on(
        size: usize,
        extra: &str,
        file_systems: Vec<Arc<dyn FileSystem>>,
    ) -> TestCluster {
        TestCluster::build(size, extra, file_systems, |_, _| {})
    }

    fn build(
        size: usize,
        extra: &str,
        file_systems: Vec<Arc<dyn FileSystem>>,
        seed: impl Fn(&ClusterConfig, NodeId),
    ) -> TestCluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let ports = free_ports(size);
        let nodes: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(k, port)| format!(r#"{{"id":{},"ip":"127.0.0.1","port":{port}}}"#, k + 1))
            .collect();
        let data_dir = dir.path().join("data");
        let mut text = format!(
            r#"{{"raft_nodes":[{}],"data_dir":{:?},"tick_ms":10,"election_timeout_min_ms":150,
            "election_timeout_max_ms":300,"heartbeat_interval_ms":30,"request_timeout_ms":1000"#,
            nodes.join(","),
            data_dir.to_str().unwrap()
        );
        if !extra.is_empty() {
            text.push(',');
            text.push_str(extra);
        }
        text.push('}');
        let config_path = dir.path().join("cluster.json");
        std::fs::write(&config_path, &text).unwrap();
        let config = ClusterConfig::parse(&text, "test").expect("valid test config");
        let cluster = TestCluster {
            dir,
            config,
            config_path,
            servers: Mutex::new((0..size).map(|_| None).collect()),
            cut: Arc::new(Mutex::new(HashSet::new())),
            file_systems,
        };
        for id in 1..=size as NodeId {
            seed(&cluster.config, id);
        }
        for id in 1..=size as NodeId {
            cluster.start_node(id);
        }
        cluster
    }

    pub fn size(&self) -> usize {
        self.config.raft_nodes.len()
    }

    pub fn start_node(&self, id: NodeId) {
        let cut = Arc::clone(&self.cut);
        let filter: LinkFilter = Arc::new(move |from, to| !cut.lock().contains(&(from, to)));
        let options = StartOptions {
            id,
            data_dir: None,
            link_filter: Some(filter),
            fault_file: None,
            join: false,
            listen: None,
            fs: self.file_systems.get(id as usize - 1).cloned(),
        };
        // The port may linger for a moment after a stop: retry briefly.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match KvServer::start(&self.config, options_clone(&options)) {
                Ok(server) => {
                    self.servers.lock()[id as usize - 1] = Some(server);
                    return;
                }
                Err(e) if Instant::now() < deadline => {
                    eprintln!("start of node {id} failed, retrying: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("node {id} does not start: {e}"),
            }
        }
    }

    /// Stops node `id` (a clean shutdown: what it synced stays on disk).
    pub fn stop_node(&self, id: NodeId) {
        let server = self.servers.lock()[id as usize - 1].take();
        if let Some(server) = server {
            server.shutdown();
        }
    }

    pub fn restart_node(&self, id: NodeId) {
        self.stop_node(id);
        self.start_node(id);
    }

    pub fn is_running(&self, id: NodeId) -> bool {
        self.servers.lock()[id as usize - 1].is_some()
    }

    pub fn status(&self, id: NodeId) -> Option<Status> {
        self.servers.lock()[id as usize - 1]
            .as_ref()
            .map(|s| s.handle().status())
    }

    /// A Redis listener (src/resp/) for running node `id` on a free loopback port, as
    /// `kvserver` starts one for a node with a `resp_port`. Drop it before the node stops.
    pub fn resp_server(&self, id: NodeId) -> kvstore_raft::resp::RespServer {
        let servers = self.servers.lock();
        let server = servers[id as usize - 1].as_ref().expect("node running");
        kvstore_raft::resp::RespServer::start(
            "127.0.0.1:0".parse().unwrap(),
            &self.config,
            id,
            server.service(),
            server.handle().clone(),
        )
        .expect("a Redis listener")
    }

    /// The handle of running node `id`: its fatal error, its thread spawner.
    pub fn handle(&self, id: NodeId) -> Option<kvstore_raft::node::NodeHandle> {
        self.servers.lock()[id as usize - 1]
            .as_ref()
            .map(|s| s.handle().clone())
    }

    /// Cuts both directions between `a` and every node of `others`.
    pub fn cut(&self, a: NodeId, others: &[NodeId]) {
        let mut cut = self.cut.lock();
        for &b in others {
            cut.insert((a, b));
            cut.insert((b, a));
        }
    }

    /// Drops every message from `from` to `to`, and only that direction (e.g. a
    /// follower's acknowledgements to its leader, while the leader's entries still arrive).
    pub fn cut_one_way(&self, from: NodeId, to: NodeId) {
        self.cut.lock().insert((from, to));
    }

    /// Cuts `id` off from every other node.
    pub fn isolate(&self, id: NodeId) {
        let others: Vec<NodeId> = (1..=self.size() as NodeId).filter(|&o| o != id).collect();
        self.cut(id, &others);
    }

    /// Splits the cluster into `group` and the rest.
    pub fn partition(&self, group: &[NodeId]) {
        self.heal();
        let rest: Vec<NodeId> = (1..=self.size() as NodeId)
            .filter(|o| !group.contains(o))
            .collect();
        for &a in group {
            self.cut(a, &rest);
        }
    }

    pub fn heal(&self) {
        self.cut.lock().clear();
    }

    /// The leader of the highest term among running nodes, if any.
    pub fn leader(&self) -> Option<NodeId> {
        (1..=self.size() as NodeId)
            .filter_map(|id| self.status(id))
            .filter(|s| s.role == Role::Leader)
            .max_by_key(|s| s.term)
            .map(|s| s.id)
    }

    /// Waits (bounded) until exactly one running node leads and every
    /// connected node agrees on its term.
    pub fn wait_leader(&self, timeout: Duration) -> NodeId {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(leader) = self.leader() {
                return leader;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("no leader within {timeout:?}");
    }

    /// Waits until every running node has applied at least `index`.
    pub fn wait_applied(&self, index: u64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let behind: Vec<Status> = (1..=self.size() as NodeId)
                .filter_map(|id| self.status(id))
                .filter(|s| s.applied < index)
                .collect();
            if behind.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "nodes still behind index {index}: {behind:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn options_clone(options: &StartOptions) -> StartOptions {
    StartOptions {
        id: options.id,
        data_dir: options.data_dir.clone(),
        link_filter: options.link_filter.clone(),
        fault_file: options.fault_file.clone(),
        join: false,
        listen: None,
        fs: options.fs.clone(),
    }
}

pub mod workload;

use kvstore_raft::clerk::{Clerk, ClerkOptions};

impl TestCluster {
    /// A clerk for the whole cluster with a `timeout_ms` deadline per operation.
    pub fn clerk(&self, timeout_ms: u64) -> Clerk {
        let options = ClerkOptions {
            timeout: Duration::from_millis(timeout_ms),
            ..ClerkOptions::default()
        };
        Clerk::new(&self.config, options)
    }

    /// A clerk that knows only the nodes `ids` (a client on one side of a
    /// partition).
    pub fn clerk_for(&self, ids: &[NodeId], timeout_ms: u64) -> Clerk {
        use kvstore_raft::rpc::{ClientConfig, RpcChannel, RpcClient};
        let nodes: Vec<(u64, Box<dyn RpcChannel + Send + Sync>)> = ids
            .iter()
            .map(|&id| {
                let config = ClientConfig {
                    call_timeout_ms: 500,
                    ..ClientConfig::default()
                };
                let channel = RpcClient::new(self.config.addr(id).unwrap(), config);
                (id, Box::new(channel) as Box<dyn RpcChannel + Send + Sync>)
            })
            .collect();
        let options = ClerkOptions {
            timeout: Duration::from_millis(timeout_ms),
            ..ClerkOptions::default()
        };
        Clerk::with_channels(nodes, options)
    }

    /// Opens a session straight through the stubs, trying every node until
    /// the leader answers (bounded): `(client_id, session_secret)`.
    pub fn raw_session(&self) -> Result<(u64, u64), String> {
        use kvstore_raft::proto::kvstore::{ErrorCode, OpenSessionRequest};
        let request = OpenSessionRequest::default();
        let reply = self.raw_call(|stub| {
            stub.open_session(&request).map(|reply| {
                let ok = reply.header.error.enum_value() == Ok(ErrorCode::OK);
                (ok, format!("{:?}", reply.header), reply)
            })
        })?;
        Ok((reply.client_id, reply.session_secret))
    }

    /// Sends one append with a fixed `(client_id, secret, seq)` straight
    /// through the stub, trying every node until one leader answers OK (bounded).
    pub fn raw_append(
        &self,
        (client_id, session_secret): (u64, u64),
        seq: u64,
        key: &[u8],
        value: &[u8],
    ) -> Result<(), String> {
        use kvstore_raft::proto::kvstore::{AppendRequest, ErrorCode, RequestHeader};
        let request = AppendRequest {
            header: protobuf::MessageField::some(RequestHeader {
                client_id,
                seq,
                session_secret,
                ..Default::default()
            }),
            key: key.to_vec(),
            value: value.to_vec(),
            ..Default::default()
        };
        self.raw_call(|stub| {
            stub.append(&request).map(|reply| {
                let ok = reply.header.error.enum_value() == Ok(ErrorCode::OK);
                (ok, format!("{:?}", reply.header), ())
            })
        })
    }

    /// Calls every node in turn until `call` answers `(true, _, reply)`, for
    /// at most 10 s; the last failure otherwise.
    fn raw_call<T>(
        &self,
        mut call: impl FnMut(
            &kvstore_raft::rpc::services::KvStoreStub<kvstore_raft::rpc::RpcClient>,
        ) -> Result<(bool, String, T), kvstore_raft::rpc::RpcError>,
    ) -> Result<T, String> {
        use kvstore_raft::rpc::services::KvStoreStub;
        use kvstore_raft::rpc::{ClientConfig, RpcClient};
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut last = String::new();
        while Instant::now() < deadline {
            for node in &self.config.raft_nodes {
                let stub = KvStoreStub::new(RpcClient::new(node.addr(), ClientConfig::default()));
                match call(&stub) {
                    Ok((true, _, reply)) => return Ok(reply),
                    Ok((false, error, _)) => last = error,
                    Err(e) => last = e.to_string(),
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(last)
    }

    /// A clerk whose connections lose `drop_percent` of requests and of
    /// replies and delay calls by up to `max_delay_ms`.
    pub fn lossy_clerk(
        &self,
        timeout_ms: u64,
        drop_percent: u64,
        max_delay_ms: u64,
        seed: u64,
    ) -> Clerk {
        use kvstore_raft::raft::SplitMix64;
        use kvstore_raft::rpc::{ClientConfig, RpcChannel, RpcClient};
        use std::sync::atomic::AtomicBool;
        let nodes: Vec<(u64, Box<dyn RpcChannel + Send + Sync>)> = self
            .config
            .raft_nodes
            .iter()
            .map(|n| {
                let config = ClientConfig {
                    call_timeout_ms: 500,
                    ..ClientConfig::default()
                };
                let channel = workload::LossyChannel {
                    inner: RpcClient::new(n.addr(), config),
                    drop_percent,
                    max_delay_ms,
                    rng: Mutex::new(SplitMix64::new(seed ^ n.id)),
                    enabled: Arc::new(AtomicBool::new(true)),
                };
                (n.id, Box::new(channel) as Box<dyn RpcChannel + Send + Sync>)
            })
            .collect();
        let options = ClerkOptions {
            timeout: Duration::from_millis(timeout_ms),
            ..ClerkOptions::default()
        };
        Clerk::with_channels(nodes, options)
    }

    /// The bytes of the WAL segments in node `id`'s data directory: the
    /// persisted Raft state, snapshots excluded. The zeroes preallocated after
    /// the records of the active segment (at most 1 MiB, see `StorageOptions`)
    /// are not counted: these are the bytes the log holds.
    pub fn wal_bytes(&self, id: NodeId) -> u64 {
        let dir = self.config.node_data_dir(id);
        std::fs::read_dir(&dir)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .filter(|e| e.file_name().to_string_lossy().starts_with("wal-"))
                    .filter_map(|e| std::fs::read(e.path()).ok())
                    .map(|bytes| bytes_before_trailing_zeroes(&bytes))
                    .sum()
            })
            .unwrap_or(0)
    }

    /// The size of node `id`'s newest snapshot file (0 without one).
    pub fn snapshot_bytes(&self, id: NodeId) -> u64 {
        let dir = self.config.node_data_dir(id);
        std::fs::read_dir(&dir)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .filter(|e| {
                        let name = e.file_name().to_string_lossy().to_string();
                        name.starts_with("snap") && !name.ends_with(".tmp")
                    })
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.len())
                    .max()
                    .unwrap_or(0)
            })
            .unwrap_or(0)
    }
}

impl TestCluster {
    /// What node `id`'s HTTP endpoint reads, while it runs.
    pub fn http_source(&self, id: NodeId) -> Option<kvstore_raft::http::Source> {
        self.servers.lock()[id as usize - 1]
            .as_ref()
            .map(|server| kvstore_raft::http::Source::of(server, &self.config))
    }
}

/// The length of `bytes` without its trailing zero bytes (a WAL segment's preallocation).
fn bytes_before_trailing_zeroes(bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .rposition(|&b| b != 0)
        .map_or(0, |last| last as u64 + 1)
}
