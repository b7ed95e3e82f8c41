//! An in-process cluster of real servers on loopback TCP, for the KV
//! service tests: every node has its own data directory under one temporary
//! directory, and links can be cut in either direction (partitions) through
//! the node's link filter, without touching sockets.
#![allow(dead_code)]

use std::collections::HashSet;
use std::net::TcpListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvstore_raft::config::ClusterConfig;
use kvstore_raft::kv::server::{KvServer, StartOptions};
use kvstore_raft::node::LinkFilter;
use kvstore_raft::raft::{NodeId, Role, Status};
use parking_lot::Mutex;

pub struct TestCluster {
    pub dir: tempfile::TempDir,
    pub config: ClusterConfig,
    pub config_path: std::path::PathBuf,
    servers: Vec<Option<KvServer>>,
    /// Directed links (from, to) that drop every message.
    cut: Arc<Mutex<HashSet<(NodeId, NodeId)>>>,
}

/// Free loopback ports: bound to port 0, then released for the servers.
pub fn free_ports(count: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..count)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind port 0"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

impl TestCluster {
    /// Starts `size` nodes with test timings (election 150-300 ms, heartbeat
    /// 30 ms) and `extra` JSON keys merged into the config.
    pub fn start(size: usize, extra: &str) -> TestCluster {
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
        let mut cluster = TestCluster {
            dir,
            config,
            config_path,
            servers: (0..size).map(|_| None).collect(),
            cut: Arc::new(Mutex::new(HashSet::new())),
        };
        for id in 1..=size as NodeId {
            cluster.start_node(id);
        }
        cluster
    }

    pub fn size(&self) -> usize {
        self.servers.len()
    }

    pub fn start_node(&mut self, id: NodeId) {
        let cut = Arc::clone(&self.cut);
        let filter: LinkFilter = Arc::new(move |from, to| !cut.lock().contains(&(from, to)));
        let options = StartOptions {
            id,
            data_dir: None,
            link_filter: Some(filter),
        };
        // The port may linger for a moment after a stop: retry briefly.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match KvServer::start(&self.config, options_clone(&options)) {
                Ok(server) => {
                    self.servers[id as usize - 1] = Some(server);
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
    pub fn stop_node(&mut self, id: NodeId) {
        if let Some(server) = self.servers[id as usize - 1].take() {
            server.shutdown();
        }
    }

    pub fn restart_node(&mut self, id: NodeId) {
        self.stop_node(id);
        self.start_node(id);
    }

    pub fn is_running(&self, id: NodeId) -> bool {
        self.servers[id as usize - 1].is_some()
    }

    pub fn status(&self, id: NodeId) -> Option<Status> {
        self.servers[id as usize - 1]
            .as_ref()
            .map(|s| s.handle().status())
    }

    /// Cuts both directions between `a` and every node of `others`.
    pub fn cut(&self, a: NodeId, others: &[NodeId]) {
        let mut cut = self.cut.lock();
        for &b in others {
            cut.insert((a, b));
            cut.insert((b, a));
        }
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
    }
}
