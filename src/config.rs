//! The cluster file: which nodes exist and where, where their data lives, and
//! the tuning every node must agree on. It is loaded once at start-up and
//! checked completely before anything else happens, so a typo stops the node
//! with one line that names the file and the key, instead of a cluster that
//! half works.
//!
//! The shape is the seed's (`raft_nodes`, `data_dir`) plus optional tuning
//! keys; every key missing from the file takes the default documented on the
//! field of [`ClusterConfig`]. Unknown keys are errors (a misspelt key would
//! otherwise be silently ignored).
//!
//! Three keys say who may talk to whom (see `rpc::handshake`): `cluster_id`
//! names the cluster, and a node or clerk whose file names another is
//! refused; `secret`, when set, must be proven by every node that connects
//! to another (clerks do not need it); `client_token`, when set, must be
//! carried by every clerk request, and the clerk, CLI and loadgen read it
//! from this same file.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The most nodes a cluster file may list. Raft clusters are small; a bound
/// keeps quorum arithmetic and per-peer threads cheap.
pub const MAX_NODES: usize = 64;
/// The largest cluster file accepted (it is a few hundred bytes in practice).
pub const MAX_FILE_BYTES: u64 = 1 << 20;
/// The longest `cluster_id`, `secret` or `client_token`.
pub const MAX_SECRET_BYTES: usize = 256;
/// The cluster id of a file that names none. A fixed name rather than one
/// derived from the node list: existing files keep working, every node and
/// clerk of such a cluster agrees on it however the list is written or
/// edited (a derived id would split the cluster during a rolling config
/// change), and clients built without a config (tests, tools) can present
/// it. Name the cluster in the file to tell clusters apart.
pub const DEFAULT_CLUSTER_ID: &str = "default";

/// A configuration problem: one line naming the file and the key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    message: String,
}

impl ConfigError {
    fn new(file: &str, message: impl fmt::Display) -> ConfigError {
        ConfigError {
            message: format!("{file}: {message}"),
        }
    }

    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}

/// One member of the cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeConfig {
    /// Never 0 (0 means "no node" in Raft messages).
    pub id: u64,
    pub ip: IpAddr,
    pub port: u16,
    /// Where the node serves HTTP (`/metrics`, `/health`, `/status`, the
    /// dashboard): `http_ip` (default 127.0.0.1: it needs no token, so it
    /// stays on loopback unless asked) and `http_port`. `None` (no
    /// `http_port`): off.
    pub http: Option<SocketAddr>,
    /// Where the node speaks the Redis protocol (src/resp/): the node's `ip`
    /// and `resp_port`. `None` (no `resp_port`): off.
    pub resp: Option<SocketAddr>,
}

impl NodeConfig {
    /// The address the node listens on and its peers and clerks dial.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(self.ip, self.port)
    }
}

/// The validated cluster file. Times are in milliseconds, sizes in bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterConfig {
    /// The members, in file order. Ids and addresses are unique.
    pub raft_nodes: Vec<NodeConfig>,
    /// Absolute: a relative `data_dir` is resolved against the current
    /// directory at load time. Default `data`.
    pub data_dir: PathBuf,
    /// How often the node's consensus core ticks. Default 10.
    pub tick_ms: u64,
    /// Election timeouts are drawn from `[min, max)`. Defaults 300 and 600.
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Default 50; below the election timeout so followers hear in time.
    pub heartbeat_interval_ms: u64,
    /// Take a snapshot once the log holds this many bytes. Default 4 MiB.
    pub snapshot_threshold_bytes: u64,
    /// The storage engine's block cache. Default 64 MiB. With the engine's fixed memtable
    /// budget this bounds the memory the applied state takes, whatever its size.
    pub engine_cache_bytes: u64,
    /// The rate a leader streams one snapshot to a follower at; 0: no limit. Default 64 MiB/s:
    /// a million 256-byte keys (about 280 MB) in under 5 s, while the leader's reads and the
    /// follower's writes leave most of a 2-core machine's disk and CPU to clients.
    pub snapshot_send_bytes_per_sec: u64,
    /// How a leader encodes the chunks of a streamed snapshot: `lz4` (default; stream
    /// version 2, each chunk's records LZ4-compressed, the rate limit counting the compressed
    /// bytes) or `none` (version 1, what builds before version 2 read: for a rolling upgrade
    /// from them).
    pub snapshot_compression: String,
    /// The most log a leader keeps in memory, past what compaction would drop, for a follower
    /// continuing from a streamed snapshot (while it receives it, and until it has caught up
    /// after installing it); a follower that would need more gets a snapshot again. Default
    /// 256 MiB: bounds the leader's memory during a long transfer, and is enough for a
    /// follower given 10 M keys under 64 writing clients to catch up from the log (the
    /// transfer took 20 s, the clients wrote ~535,000 entries, ~170 MB, until it caught up; with
    /// 128 MiB it needed a second snapshot: bench/results/2026-12-08-scale-10m-stream/).
    pub max_catch_up_log_bytes: u64,
    /// Slots of the LockQueue: client requests inside the node at once, each
    /// holding its slot from admission until it is answered (also the
    /// capacity of the channel to the event loop). Default 1024.
    pub proposal_queue_capacity: usize,
    /// How long a request waits for a slot before the answer is BUSY. Default 100.
    pub proposal_queue_wait_ms: u64,
    /// Frames above this size are refused. Default 16 MiB.
    pub max_frame_bytes: usize,
    /// Connections served at once, peers and clerks together. Default 1024.
    pub max_connections: usize,
    /// AppendEntries in flight to one follower (pipelining). Default 64.
    pub max_inflight_appends: usize,
    /// Entry bytes in one AppendEntries; below `max_frame_bytes`. Default 1 MiB.
    pub max_append_bytes: usize,
    /// Client sessions idle longer than this are dropped. Default 1 hour.
    pub session_ttl_ms: u64,
    /// Client sessions kept at most. Default 10000.
    pub max_sessions: usize,
    /// Sessions one client connection may open. Default 1024.
    pub max_sessions_per_connection: usize,
    /// How long a node works on one client request. Default 2000.
    pub request_timeout_ms: u64,
    /// A connection that sends nothing for this long, with no call of its
    /// own in flight, is closed. Default 60000.
    pub idle_timeout_ms: u64,
    /// Once a frame's first byte has arrived, the rest must follow within
    /// this time or the connection is closed (slow writers). Default 30000.
    pub frame_timeout_ms: u64,
    /// Names the cluster: the connection handshake refuses a node or clerk
    /// whose file names another. Printable text. Default
    /// [`DEFAULT_CLUSTER_ID`].
    pub cluster_id: String,
    /// Shared by the nodes: a node must prove it (HMAC challenge-response,
    /// never sent) before its Raft messages are accepted. Optional.
    pub secret: Option<String>,
    /// When set, every clerk request must carry it (else UNAUTHENTICATED).
    /// Optional.
    pub client_token: Option<String>,
}

/// The file as written: every tuning key optional. `deny_unknown_fields`
/// backs up the explicit key check of `check_keys`, which gives the better
/// message; a unit test keeps the two key lists in step.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    raft_nodes: Vec<RawNode>,
    data_dir: Option<String>,
    tick_ms: Option<u64>,
    election_timeout_min_ms: Option<u64>,
    election_timeout_max_ms: Option<u64>,
    heartbeat_interval_ms: Option<u64>,
    snapshot_threshold_bytes: Option<u64>,
    engine_cache_bytes: Option<u64>,
    snapshot_send_bytes_per_sec: Option<u64>,
    snapshot_compression: Option<String>,
    max_catch_up_log_bytes: Option<u64>,
    proposal_queue_capacity: Option<u64>,
    proposal_queue_wait_ms: Option<u64>,
    max_frame_bytes: Option<u64>,
    max_connections: Option<u64>,
    max_inflight_appends: Option<u64>,
    max_append_bytes: Option<u64>,
    session_ttl_ms: Option<u64>,
    max_sessions: Option<u64>,
    max_sessions_per_connection: Option<u64>,
    request_timeout_ms: Option<u64>,
    idle_timeout_ms: Option<u64>,
    frame_timeout_ms: Option<u64>,
    cluster_id: Option<String>,
    secret: Option<String>,
    client_token: Option<String>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    id: u64,
    ip: String,
    port: u64,
    http_port: Option<u64>,
    http_ip: Option<String>,
    resp_port: Option<u64>,
}

/// The keys a cluster file may hold, and the JSON type each must have.
const TOP_LEVEL_KEYS: &[(&str, Kind)] = &[
    ("raft_nodes", Kind::Array),
    ("data_dir", Kind::Text),
    ("tick_ms", Kind::Unsigned),
    ("election_timeout_min_ms", Kind::Unsigned),
    ("election_timeout_max_ms", Kind::Unsigned),
    ("heartbeat_interval_ms", Kind::Unsigned),
    ("snapshot_threshold_bytes", Kind::Unsigned),
    ("engine_cache_bytes", Kind::Unsigned),
    ("snapshot_send_bytes_per_sec", Kind::Unsigned),
    ("snapshot_compression", Kind::Text),
    ("max_catch_up_log_bytes", Kind::Unsigned),
    ("proposal_queue_capacity", Kind::Unsigned),
    ("proposal_queue_wait_ms", Kind::Unsigned),
    ("max_frame_bytes", Kind::Unsigned),
    ("max_connections", Kind::Unsigned),
    ("max_inflight_appends", Kind::Unsigned),
    ("max_append_bytes", Kind::Unsigned),
    ("session_ttl_ms", Kind::Unsigned),
    ("max_sessions", Kind::Unsigned),
    ("max_sessions_per_connection", Kind::Unsigned),
    ("request_timeout_ms", Kind::Unsigned),
    ("idle_timeout_ms", Kind::Unsigned),
    ("frame_timeout_ms", Kind::Unsigned),
    ("cluster_id", Kind::Text),
    ("secret", Kind::Text),
    ("client_token", Kind::Text),
];
const NODE_KEYS: &[(&str, Kind)] = &[
    ("id", Kind::Unsigned),
    ("ip", Kind::Text),
    ("port", Kind::Unsigned),
    ("http_port", Kind::Unsigned),
    ("http_ip", Kind::Text),
    ("resp_port", Kind::Unsigned),
];
const REQUIRED_NODE_KEYS: &[&str] = &["id", "ip", "port"];
const REQUIRED_TOP_LEVEL_KEYS: &[&str] = &["raft_nodes"];

#[derive(Clone, Copy, Debug)]
enum Kind {
    Array,
    Text,
    Unsigned,
}

impl Kind {
    fn check(self, value: &Value) -> Result<(), String> {
        let fits = match self {
            Kind::Array => value.is_array(),
            Kind::Text => value.is_string(),
            Kind::Unsigned => value.is_u64(),
        };
        if fits {
            return Ok(());
        }
        let wanted = match self {
            Kind::Array => "a list",
            Kind::Text => "a string",
            Kind::Unsigned => "a whole number from 0 to 2^64-1",
        };
        Err(format!("{value} is not {wanted}"))
    }
}

impl ClusterConfig {
    /// Reads and validates the cluster file at `path`.
    pub fn load(path: impl AsRef<Path>) -> Result<ClusterConfig, ConfigError> {
        let path = path.as_ref();
        let name = path.display().to_string();
        let size_bytes = std::fs::metadata(path)
            .map_err(|e| ConfigError::new(&name, format!("cannot read: {e}")))?
            .len();
        if size_bytes > MAX_FILE_BYTES {
            return Err(ConfigError::new(
                &name,
                format!(
                    "{size_bytes} bytes is too large for a cluster file (at most {MAX_FILE_BYTES})"
                ),
            ));
        }
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::new(&name, format!("cannot read: {e}")))?;
        ClusterConfig::parse(&text, &name)
    }

    /// Validates the text of a cluster file; `file` names it in messages.
    pub fn parse(text: &str, file: &str) -> Result<ClusterConfig, ConfigError> {
        let error = |message: String| ConfigError::new(file, message);
        let value: Value =
            serde_json::from_str(text).map_err(|e| error(format!("not valid JSON: {e}")))?;
        let object = value
            .as_object()
            .ok_or_else(|| error("the top level must be an object {...}".to_string()))?;
        check_keys(object, TOP_LEVEL_KEYS, "").map_err(error)?;
        for key in REQUIRED_TOP_LEVEL_KEYS {
            if !object.contains_key(*key) {
                return Err(error(format!("missing key \"{key}\"")));
            }
        }
        let nodes = object["raft_nodes"]
            .as_array()
            .expect("check_keys checked the type");
        for (i, node) in nodes.iter().enumerate() {
            let at = format!("raft_nodes[{i}]");
            let node = node
                .as_object()
                .ok_or_else(|| error(format!("{at}: {node} is not an object {{...}}")))?;
            check_keys(node, NODE_KEYS, &format!("{at}.")).map_err(error)?;
            if let Some(key) = REQUIRED_NODE_KEYS
                .iter()
                .find(|key| !node.contains_key(**key))
            {
                return Err(error(format!("{at}: missing key \"{key}\"")));
            }
        }
        let raw: RawConfig = from_value(value).map_err(error)?;
        let current_dir = std::env::current_dir().map_err(|e| {
            error(format!(
                "data_dir: cannot resolve against the current directory: {e}"
            ))
        })?;
        ClusterConfig::validate(raw, &current_dir).map_err(error)
    }

    /// Turns the well-typed file into a configuration, checking every value
    /// and every relation between values. Errors are "key: what is wrong".
    fn validate(raw: RawConfig, current_dir: &Path) -> Result<ClusterConfig, String> {
        let defaults = ClusterConfig::defaults();
        let raft_nodes = validate_nodes(&raw.raft_nodes)?;
        let data_dir = raw.data_dir.unwrap_or_else(|| "data".to_string());
        if data_dir.is_empty() {
            return Err("data_dir: must not be empty".to_string());
        }
        let config = ClusterConfig {
            raft_nodes,
            data_dir: current_dir.join(data_dir),
            tick_ms: raw.tick_ms.unwrap_or(defaults.tick_ms),
            election_timeout_min_ms: raw
                .election_timeout_min_ms
                .unwrap_or(defaults.election_timeout_min_ms),
            election_timeout_max_ms: raw
                .election_timeout_max_ms
                .unwrap_or(defaults.election_timeout_max_ms),
            heartbeat_interval_ms: raw
                .heartbeat_interval_ms
                .unwrap_or(defaults.heartbeat_interval_ms),
            snapshot_threshold_bytes: raw
                .snapshot_threshold_bytes
                .unwrap_or(defaults.snapshot_threshold_bytes),
            engine_cache_bytes: raw
                .engine_cache_bytes
                .unwrap_or(defaults.engine_cache_bytes),
            snapshot_send_bytes_per_sec: raw
                .snapshot_send_bytes_per_sec
                .unwrap_or(defaults.snapshot_send_bytes_per_sec),
            snapshot_compression: validate_compression(raw.snapshot_compression)?,
            max_catch_up_log_bytes: raw
                .max_catch_up_log_bytes
                .unwrap_or(defaults.max_catch_up_log_bytes),
            proposal_queue_capacity: size(
                raw.proposal_queue_capacity,
                defaults.proposal_queue_capacity,
            ),
            proposal_queue_wait_ms: raw
                .proposal_queue_wait_ms
                .unwrap_or(defaults.proposal_queue_wait_ms),
            max_frame_bytes: size(raw.max_frame_bytes, defaults.max_frame_bytes),
            max_connections: size(raw.max_connections, defaults.max_connections),
            max_inflight_appends: size(raw.max_inflight_appends, defaults.max_inflight_appends),
            max_append_bytes: size(raw.max_append_bytes, defaults.max_append_bytes),
            session_ttl_ms: raw.session_ttl_ms.unwrap_or(defaults.session_ttl_ms),
            max_sessions: size(raw.max_sessions, defaults.max_sessions),
            max_sessions_per_connection: size(
                raw.max_sessions_per_connection,
                defaults.max_sessions_per_connection,
            ),
            request_timeout_ms: raw
                .request_timeout_ms
                .unwrap_or(defaults.request_timeout_ms),
            idle_timeout_ms: raw.idle_timeout_ms.unwrap_or(defaults.idle_timeout_ms),
            frame_timeout_ms: raw.frame_timeout_ms.unwrap_or(defaults.frame_timeout_ms),
            cluster_id: validate_cluster_id(raw.cluster_id)?,
            secret: validate_text("secret", raw.secret)?,
            client_token: validate_text("client_token", raw.client_token)?,
        };
        config.validate_tuning()?;
        Ok(config)
    }

    /// The defaults of every tuning key, with no nodes.
    fn defaults() -> ClusterConfig {
        ClusterConfig {
            raft_nodes: Vec::new(),
            data_dir: PathBuf::from("data"),
            tick_ms: 10,
            election_timeout_min_ms: 300,
            election_timeout_max_ms: 600,
            heartbeat_interval_ms: 50,
            snapshot_threshold_bytes: 4 << 20,
            engine_cache_bytes: 64 << 20,
            snapshot_send_bytes_per_sec: 64 << 20,
            snapshot_compression: "lz4".to_string(),
            max_catch_up_log_bytes: 256 << 20,
            proposal_queue_capacity: 1024,
            proposal_queue_wait_ms: 100,
            max_frame_bytes: 16 << 20,
            max_connections: 1024,
            max_inflight_appends: 64,
            max_append_bytes: 1 << 20,
            session_ttl_ms: 3_600_000,
            max_sessions: 10_000,
            max_sessions_per_connection: 1024,
            request_timeout_ms: 2_000,
            idle_timeout_ms: 60_000,
            frame_timeout_ms: 30_000,
            cluster_id: DEFAULT_CLUSTER_ID.to_string(),
            secret: None,
            client_token: None,
        }
    }

    fn validate_tuning(&self) -> Result<(), String> {
        let ranges: [(&str, u64, u64, u64); 17] = [
            ("tick_ms", self.tick_ms, 1, 1_000),
            (
                "election_timeout_min_ms",
                self.election_timeout_min_ms,
                1,
                60_000,
            ),
            (
                "election_timeout_max_ms",
                self.election_timeout_max_ms,
                1,
                120_000,
            ),
            (
                "heartbeat_interval_ms",
                self.heartbeat_interval_ms,
                1,
                60_000,
            ),
            (
                "snapshot_threshold_bytes",
                self.snapshot_threshold_bytes,
                1,
                1 << 40,
            ),
            (
                "engine_cache_bytes",
                self.engine_cache_bytes,
                1 << 20,
                1 << 40,
            ),
            (
                "proposal_queue_capacity",
                self.proposal_queue_capacity as u64,
                1,
                1 << 20,
            ),
            (
                "proposal_queue_wait_ms",
                self.proposal_queue_wait_ms,
                0,
                60_000,
            ),
            (
                "max_frame_bytes",
                self.max_frame_bytes as u64,
                4096,
                1 << 30,
            ),
            ("max_connections", self.max_connections as u64, 1, 65_536),
            (
                "max_inflight_appends",
                self.max_inflight_appends as u64,
                1,
                4096,
            ),
            ("max_append_bytes", self.max_append_bytes as u64, 1, 1 << 30),
            ("max_sessions", self.max_sessions as u64, 1, 10_000_000),
            (
                "max_sessions_per_connection",
                self.max_sessions_per_connection as u64,
                1,
                10_000_000,
            ),
            ("request_timeout_ms", self.request_timeout_ms, 1, 3_600_000),
            ("idle_timeout_ms", self.idle_timeout_ms, 1, 86_400_000),
            ("frame_timeout_ms", self.frame_timeout_ms, 1, 3_600_000),
        ];
        for (key, value, low, high) in ranges {
            if value < low || value > high {
                return Err(format!(
                    "{key}: {value} is out of range (from {low} to {high})"
                ));
            }
        }
        let relations = [
            (
                self.election_timeout_min_ms < self.election_timeout_max_ms,
                format!(
                    "election_timeout_min_ms: {} must be below election_timeout_max_ms ({})",
                    self.election_timeout_min_ms, self.election_timeout_max_ms
                ),
            ),
            (
                self.heartbeat_interval_ms < self.election_timeout_min_ms,
                format!(
                    "heartbeat_interval_ms: {} must be below election_timeout_min_ms ({})",
                    self.heartbeat_interval_ms, self.election_timeout_min_ms
                ),
            ),
            (
                self.tick_ms <= self.heartbeat_interval_ms,
                format!(
                    "tick_ms: {} must not exceed heartbeat_interval_ms ({})",
                    self.tick_ms, self.heartbeat_interval_ms
                ),
            ),
            (
                // An AppendEntries must fit in a frame, with room for headers.
                self.max_append_bytes + 1024 <= self.max_frame_bytes,
                format!(
                    "max_append_bytes: {} must be at least 1024 below max_frame_bytes ({})",
                    self.max_append_bytes, self.max_frame_bytes
                ),
            ),
            (
                // A clerk retries within its request timeout; its session must
                // outlive that by far, or a retry could be applied twice.
                self.session_ttl_ms >= 10 * self.request_timeout_ms,
                format!(
                    "session_ttl_ms: {} must be at least 10 times request_timeout_ms ({})",
                    self.session_ttl_ms, self.request_timeout_ms
                ),
            ),
        ];
        match relations.into_iter().find(|(holds, _)| !holds) {
            Some((_, message)) => Err(message),
            None => Ok(()),
        }
    }

    /// The member with this id.
    pub fn node(&self, id: u64) -> Option<&NodeConfig> {
        self.raft_nodes.iter().find(|node| node.id == id)
    }

    /// The address of the member with this id.
    pub fn addr(&self, id: u64) -> Option<SocketAddr> {
        self.node(id).map(NodeConfig::addr)
    }

    /// Every member's id, in file order.
    pub fn node_ids(&self) -> Vec<u64> {
        self.raft_nodes.iter().map(|node| node.id).collect()
    }

    /// Where node `id` keeps its log, hard state and snapshots.
    pub fn node_data_dir(&self, id: u64) -> PathBuf {
        self.data_dir.join(format!("node{id}"))
    }

    /// Ticks in the election timeout range, rounded up, as the core counts them.
    pub fn election_timeout_ticks(&self) -> (u32, u32) {
        (
            self.ticks(self.election_timeout_min_ms),
            self.ticks(self.election_timeout_max_ms),
        )
    }

    /// Ticks between heartbeats, rounded up.
    pub fn heartbeat_interval_ticks(&self) -> u32 {
        self.ticks(self.heartbeat_interval_ms)
    }

    fn ticks(&self, ms: u64) -> u32 {
        // Both are bounded by validate_tuning, so this fits in a u32.
        u32::try_from(ms.div_ceil(self.tick_ms)).expect("validated times fit in u32 ticks")
    }
}

/// Checks that every key of `object` is known and has the right type.
/// `at` prefixes the key in messages ("raft_nodes[1]." or "").
fn check_keys(object: &Map<String, Value>, known: &[(&str, Kind)], at: &str) -> Result<(), String> {
    for (key, value) in object {
        match known.iter().find(|(name, _)| name == key) {
            Some((_, kind)) => kind
                .check(value)
                .map_err(|why| format!("{at}{key}: {why}"))?,
            None => {
                let names: Vec<&str> = known.iter().map(|(name, _)| *name).collect();
                return Err(format!(
                    "unknown key \"{at}{key}\" (known keys: {})",
                    names.join(", ")
                ));
            }
        }
    }
    Ok(())
}

fn from_value<T: DeserializeOwned>(value: Value) -> Result<T, String> {
    serde_json::from_value(value).map_err(|e| e.to_string())
}

/// A count or size: values beyond `usize` saturate and then fail the range check.
fn size(value: Option<u64>, default: usize) -> usize {
    value.map_or(default, |v| usize::try_from(v).unwrap_or(usize::MAX))
}

fn validate_nodes(raw: &[RawNode]) -> Result<Vec<NodeConfig>, String> {
    if raw.is_empty() {
        return Err("raft_nodes: the cluster needs at least one node".to_string());
    }
    if raw.len() > MAX_NODES {
        return Err(format!(
            "raft_nodes: {} nodes is more than the {MAX_NODES} supported",
            raw.len()
        ));
    }
    let mut nodes = Vec::with_capacity(raw.len());
    let mut seen_ids = HashMap::new();
    let mut seen_addrs = HashMap::new();
    for (i, node) in raw.iter().enumerate() {
        let at = format!("raft_nodes[{i}]");
        if node.id == 0 {
            return Err(format!(
                "{at}.id: 0 is not a valid node id (ids start at 1)"
            ));
        }
        let ip: IpAddr = node
            .ip
            .parse()
            .map_err(|_| format!("{at}.ip: \"{}\" is not an IP address", node.ip))?;
        if ip.is_unspecified() {
            return Err(format!(
                "{at}.ip: {ip} cannot be dialled; name the node's own address"
            ));
        }
        let port = u16::try_from(node.port)
            .ok()
            .filter(|&port| port != 0)
            .ok_or_else(|| format!("{at}.port: {} is not a valid port", node.port))?;
        if let Some(first) = seen_ids.insert(node.id, i) {
            return Err(format!(
                "{at}.id: {} is also the id of raft_nodes[{first}]",
                node.id
            ));
        }
        let config = NodeConfig {
            id: node.id,
            ip,
            port,
            http: validate_http(node, &at)?,
            resp: validate_resp(node, ip, &at)?,
        };
        if let Some(first) = seen_addrs.insert(config.addr(), i) {
            return Err(format!(
                "{at}: {} is also the address of raft_nodes[{first}]",
                config.addr()
            ));
        }
        nodes.push(config);
    }
    Ok(nodes)
}

/// The node's HTTP address: off without `http_port`; `http_ip` defaults to
/// loopback.
fn validate_http(node: &RawNode, at: &str) -> Result<Option<SocketAddr>, String> {
    let Some(port) = node.http_port else {
        if node.http_ip.is_some() {
            return Err(format!(
                "{at}.http_ip: set without http_port (the HTTP endpoint is off without a port)"
            ));
        }
        return Ok(None);
    };
    let port = u16::try_from(port)
        .ok()
        .filter(|&port| port != 0)
        .ok_or_else(|| format!("{at}.http_port: {port} is not a valid port"))?;
    let ip: IpAddr = match &node.http_ip {
        Some(ip) => ip
            .parse()
            .map_err(|_| format!("{at}.http_ip: \"{ip}\" is not an IP address"))?,
        None => IpAddr::from([127, 0, 0, 1]),
    };
    if port == node.port as u16
        && (ip == node.ip.parse::<IpAddr>().unwrap_or(ip) || ip.is_unspecified())
    {
        return Err(format!(
            "{at}.http_port: {port} is also the node's RPC port"
        ));
    }
    Ok(Some(SocketAddr::new(ip, port)))
}

/// The node's Redis-protocol address: off without `resp_port`; on the node's
/// own `ip`, on a port of its own.
fn validate_resp(node: &RawNode, ip: IpAddr, at: &str) -> Result<Option<SocketAddr>, String> {
    let Some(port) = node.resp_port else {
        return Ok(None);
    };
    let port = u16::try_from(port)
        .ok()
        .filter(|&port| port != 0)
        .ok_or_else(|| format!("{at}.resp_port: {port} is not a valid port"))?;
    if u64::from(port) == node.port || Some(u64::from(port)) == node.http_port {
        return Err(format!(
            "{at}.resp_port: {port} is also the node's RPC or HTTP port"
        ));
    }
    Ok(Some(SocketAddr::new(ip, port)))
}

/// The cluster id appears in log lines and refusal messages, so it must be
/// printable.
fn validate_cluster_id(value: Option<String>) -> Result<String, String> {
    let Some(id) = validate_text("cluster_id", value)? else {
        return Ok(DEFAULT_CLUSTER_ID.to_string());
    };
    if id.chars().any(char::is_control) {
        return Err(format!(
            "cluster_id: {id:?} holds a control character; use printable text"
        ));
    }
    Ok(id)
}

/// The codecs of streamed snapshots (`kv::snapshot_stream::ChunkCodec`).
const SNAPSHOT_COMPRESSIONS: &[&str] = &["lz4", "none"];

fn validate_compression(value: Option<String>) -> Result<String, String> {
    match value {
        None => Ok(SNAPSHOT_COMPRESSIONS[0].to_string()),
        Some(name) if SNAPSHOT_COMPRESSIONS.contains(&name.as_str()) => Ok(name),
        Some(name) => Err(format!(
            "snapshot_compression: {name:?} is not one of {}",
            SNAPSHOT_COMPRESSIONS.join(", ")
        )),
    }
}

fn validate_text(key: &str, value: Option<String>) -> Result<Option<String>, String> {
    match &value {
        Some(text) if text.is_empty() => Err(format!(
            "{key}: must not be empty (leave the key out instead)"
        )),
        Some(text) if text.len() > MAX_SECRET_BYTES => Err(format!(
            "{key}: {} bytes is longer than {MAX_SECRET_BYTES}",
            text.len()
        )),
        _ => Ok(value),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "conf/x.json";
    const NODES: &str = r#""raft_nodes": [
        {"id": 1, "ip": "127.0.0.1", "port": 5001},
        {"id": 2, "ip": "127.0.0.1", "port": 5002},
        {"id": 3, "ip": "127.0.0.1", "port": 5003}]"#;

    fn parse_with(extra: &str) -> Result<ClusterConfig, ConfigError> {
        ClusterConfig::parse(&format!("{{{NODES}, \"data_dir\": \"data\"{extra}}}"), FILE)
    }

    fn error_of(text: &str) -> String {
        ClusterConfig::parse(text, FILE).unwrap_err().to_string()
    }

    fn error_with(extra: &str) -> String {
        parse_with(extra).unwrap_err().to_string()
    }

    #[test]
    fn the_seed_shape_loads_with_defaults() {
        let config = parse_with("").unwrap();
        assert_eq!(config.node_ids(), vec![1, 2, 3]);
        assert_eq!(config.addr(2), Some("127.0.0.1:5002".parse().unwrap()));
        assert_eq!(config.node(4), None);
        assert!(config.data_dir.is_absolute());
        assert_eq!(
            config.data_dir,
            std::env::current_dir().unwrap().join("data")
        );
        assert!(config.node_data_dir(3).ends_with("data/node3"));
        assert_eq!(config.tick_ms, 10);
        assert_eq!(config.election_timeout_ticks(), (30, 60));
        assert_eq!(config.heartbeat_interval_ticks(), 5);
        assert_eq!(config.cluster_id, "default");
        assert_eq!(config.secret, None);
        assert_eq!(config.client_token, None);
    }

    #[test]
    fn the_shipped_cluster_file_loads() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/conf/cluster.json");
        let config = ClusterConfig::load(path).unwrap();
        assert_eq!(config.raft_nodes.len(), 3);
        assert_eq!(config.cluster_id, "local");
    }

    #[test]
    fn tuning_keys_override_defaults() {
        let config = parse_with(
            r#", "tick_ms": 5, "election_timeout_min_ms": 150, "election_timeout_max_ms": 300,
               "heartbeat_interval_ms": 50, "snapshot_threshold_bytes": 1000, "max_sessions": 7,
               "cluster_id": "test", "secret": "s", "client_token": "t""#,
        )
        .unwrap();
        assert_eq!(config.election_timeout_ticks(), (30, 60));
        assert_eq!(config.snapshot_threshold_bytes, 1000);
        assert_eq!(config.max_sessions, 7);
        assert_eq!(config.client_token.as_deref(), Some("t"));
        assert_eq!(config.cluster_id, "test");
        assert_eq!(config.secret.as_deref(), Some("s"));
    }

    #[test]
    fn bad_access_keys_name_the_key() {
        let long = "x".repeat(MAX_SECRET_BYTES + 1);
        let cases = [
            (
                r#", "cluster_id": """#.to_string(),
                "cluster_id: must not be empty (leave the key out instead)".to_string(),
            ),
            (
                r#", "cluster_id": "a\nb""#.to_string(),
                r#"cluster_id: "a\nb" holds a control character; use printable text"#.to_string(),
            ),
            (
                r#", "cluster_id": 7"#.to_string(),
                "cluster_id: 7 is not a string".to_string(),
            ),
            (
                format!(r#", "secret": "{long}""#),
                "secret: 257 bytes is longer than 256".to_string(),
            ),
            (
                r#", "secret": true"#.to_string(),
                "secret: true is not a string".to_string(),
            ),
            (
                r#", "client_token": """#.to_string(),
                "client_token: must not be empty (leave the key out instead)".to_string(),
            ),
            (
                r#", "client_token": ["t"]"#.to_string(),
                r#"client_token: ["t"] is not a string"#.to_string(),
            ),
            (
                r#", "secret_file": "s""#.to_string(),
                r#"unknown key "secret_file""#.to_string(),
            ),
        ];
        for (extra, expected) in cases {
            let error = error_with(&extra);
            assert!(
                error.starts_with(&format!("{FILE}: {expected}")),
                "{extra}: {error}"
            );
        }
    }

    #[test]
    fn snapshot_compression_is_lz4_unless_set_to_none() {
        assert_eq!(parse_with("").unwrap().snapshot_compression, "lz4");
        let none = parse_with(r#", "snapshot_compression": "none""#).unwrap();
        assert_eq!(none.snapshot_compression, "none");
        assert_eq!(
            error_with(r#", "snapshot_compression": "zstd""#),
            r#"conf/x.json: snapshot_compression: "zstd" is not one of lz4, none"#
        );
    }

    #[test]
    fn an_absolute_data_dir_is_kept() {
        let config =
            ClusterConfig::parse(&format!("{{{NODES}, \"data_dir\": \"/var/kv\"}}"), FILE).unwrap();
        assert_eq!(config.data_dir, PathBuf::from("/var/kv"));
    }

    #[test]
    fn unknown_keys_name_the_key_and_the_known_ones() {
        let error = error_with(r#", "tick": 5"#);
        assert!(
            error.starts_with(
                r#"conf/x.json: unknown key "tick" (known keys: raft_nodes, data_dir, tick_ms,"#
            ),
            "{error}"
        );
        let error =
            error_of(r#"{"raft_nodes": [{"id": 1, "ip": "127.0.0.1", "port": 1, "host": "a"}]}"#);
        assert_eq!(
            error,
            r#"conf/x.json: unknown key "raft_nodes[0].host" (known keys: id, ip, port, http_port, http_ip, resp_port)"#
        );
    }

    #[test]
    fn bad_json_and_bad_types() {
        assert!(
            error_of("{").starts_with("conf/x.json: not valid JSON: EOF while parsing"),
            "{}",
            error_of("{")
        );
        assert_eq!(
            error_of("[]"),
            "conf/x.json: the top level must be an object {...}"
        );
        assert_eq!(
            error_with(r#", "tick_ms": "5""#),
            r#"conf/x.json: tick_ms: "5" is not a whole number from 0 to 2^64-1"#
        );
        assert_eq!(
            error_with(r#", "tick_ms": -1"#),
            "conf/x.json: tick_ms: -1 is not a whole number from 0 to 2^64-1"
        );
        assert_eq!(
            error_of(r#"{"raft_nodes": 3}"#),
            "conf/x.json: raft_nodes: 3 is not a list"
        );
        assert_eq!(
            error_of(r#"{"raft_nodes": [7]}"#),
            "conf/x.json: raft_nodes[0]: 7 is not an object {...}"
        );
        assert_eq!(
            error_of(r#"{"raft_nodes": [{"id": 1, "ip": 127, "port": 1}]}"#),
            "conf/x.json: raft_nodes[0].ip: 127 is not a string"
        );
    }

    #[test]
    fn missing_keys() {
        assert_eq!(
            error_of(r#"{"data_dir": "d"}"#),
            r#"conf/x.json: missing key "raft_nodes""#
        );
        assert_eq!(
            error_of(r#"{"raft_nodes": [{"id": 1, "ip": "127.0.0.1"}]}"#),
            r#"conf/x.json: raft_nodes[0]: missing key "port""#
        );
        assert_eq!(
            error_of(r#"{"raft_nodes": []}"#),
            "conf/x.json: raft_nodes: the cluster needs at least one node"
        );
    }

    fn node_error(nodes: &str) -> String {
        error_of(&format!("{{\"raft_nodes\": [{nodes}]}}"))
    }

    #[test]
    fn resp_endpoint_is_off_without_a_port_and_on_the_node_ip() {
        let off = parse(r#"{"id": 1, "ip": "127.0.0.1", "port": 5001}"#);
        assert_eq!(off.raft_nodes[0].resp, None);
        let on = parse(r#"{"id": 1, "ip": "127.0.0.2", "port": 5001, "resp_port": 6379}"#);
        assert_eq!(
            on.raft_nodes[0].resp,
            Some("127.0.0.2:6379".parse().unwrap())
        );
        assert_eq!(
            node_error(r#"{"id": 1, "ip": "127.0.0.1", "port": 1, "resp_port": 70000}"#),
            "conf/x.json: raft_nodes[0].resp_port: 70000 is not a valid port"
        );
        assert_eq!(
            node_error(r#"{"id": 1, "ip": "127.0.0.1", "port": 1, "resp_port": 1}"#),
            "conf/x.json: raft_nodes[0].resp_port: 1 is also the node's RPC or HTTP port"
        );
    }

    /// A valid config of the given `raft_nodes` entries.
    fn parse(nodes: &str) -> ClusterConfig {
        ClusterConfig::parse(&format!("{{\"raft_nodes\": [{nodes}]}}"), "x").unwrap()
    }

    #[test]
    fn http_endpoint_is_off_without_a_port_and_loopback_by_default() {
        let off = parse(r#"{"id": 1, "ip": "127.0.0.1", "port": 5001}"#);
        assert_eq!(off.raft_nodes[0].http, None);
        let on = parse(r#"{"id": 1, "ip": "127.0.0.1", "port": 5001, "http_port": 8001}"#);
        assert_eq!(
            on.raft_nodes[0].http,
            Some("127.0.0.1:8001".parse().unwrap())
        );
        let wide = parse(
            r#"{"id": 1, "ip": "127.0.0.1", "port": 5001, "http_port": 8001, "http_ip": "0.0.0.0"}"#,
        );
        assert_eq!(
            wide.raft_nodes[0].http,
            Some("0.0.0.0:8001".parse().unwrap())
        );
        assert_eq!(
            node_error(r#"{"id": 1, "ip": "127.0.0.1", "port": 1, "http_port": 70000}"#),
            "conf/x.json: raft_nodes[0].http_port: 70000 is not a valid port"
        );
        assert_eq!(
            node_error(r#"{"id": 1, "ip": "127.0.0.1", "port": 1, "http_ip": "127.0.0.1"}"#),
            "conf/x.json: raft_nodes[0].http_ip: set without http_port (the HTTP endpoint is off without a port)"
        );
        assert_eq!(
            node_error(
                r#"{"id": 1, "ip": "127.0.0.1", "port": 1, "http_port": 2, "http_ip": "x"}"#
            ),
            r#"conf/x.json: raft_nodes[0].http_ip: "x" is not an IP address"#
        );
        assert_eq!(
            node_error(r#"{"id": 1, "ip": "127.0.0.1", "port": 1, "http_port": 1}"#),
            "conf/x.json: raft_nodes[0].http_port: 1 is also the node's RPC port"
        );
    }

    #[test]
    fn bad_nodes() {
        let ok = r#"{"id": 1, "ip": "127.0.0.1", "port": 5001}"#;
        assert_eq!(
            node_error(&format!(
                r#"{ok}, {{"id": 2, "ip": "127.0.0.1", "port": 70000}}"#
            )),
            "conf/x.json: raft_nodes[1].port: 70000 is not a valid port"
        );
        assert_eq!(
            node_error(r#"{"id": 1, "ip": "127.0.0.1", "port": 0}"#),
            "conf/x.json: raft_nodes[0].port: 0 is not a valid port"
        );
        assert_eq!(
            node_error(r#"{"id": 0, "ip": "127.0.0.1", "port": 1}"#),
            "conf/x.json: raft_nodes[0].id: 0 is not a valid node id (ids start at 1)"
        );
        assert_eq!(
            node_error(r#"{"id": 1, "ip": "localhost", "port": 1}"#),
            r#"conf/x.json: raft_nodes[0].ip: "localhost" is not an IP address"#
        );
        assert_eq!(
            node_error(r#"{"id": 1, "ip": "0.0.0.0", "port": 1}"#),
            "conf/x.json: raft_nodes[0].ip: 0.0.0.0 cannot be dialled; name the node's own address"
        );
        assert_eq!(
            node_error(&format!(
                r#"{ok}, {{"id": 1, "ip": "127.0.0.2", "port": 5001}}"#
            )),
            "conf/x.json: raft_nodes[1].id: 1 is also the id of raft_nodes[0]"
        );
        assert_eq!(
            node_error(&format!(
                r#"{ok}, {{"id": 2, "ip": "127.0.0.1", "port": 5001}}"#
            )),
            "conf/x.json: raft_nodes[1]: 127.0.0.1:5001 is also the address of raft_nodes[0]"
        );
        let many: Vec<String> = (1..=65)
            .map(|id| {
                format!(
                    r#"{{"id": {id}, "ip": "127.0.0.1", "port": {}}}"#,
                    5000 + id
                )
            })
            .collect();
        assert_eq!(
            node_error(&many.join(",")),
            "conf/x.json: raft_nodes: 65 nodes is more than the 64 supported"
        );
    }

    #[test]
    fn bad_tuning() {
        let cases = [
            (
                r#", "tick_ms": 0"#,
                "tick_ms: 0 is out of range (from 1 to 1000)",
            ),
            (r#", "data_dir": """#, "data_dir: must not be empty"),
            (
                r#", "election_timeout_min_ms": 600, "election_timeout_max_ms": 600"#,
                "election_timeout_min_ms: 600 must be below election_timeout_max_ms (600)",
            ),
            (
                r#", "heartbeat_interval_ms": 300"#,
                "heartbeat_interval_ms: 300 must be below election_timeout_min_ms (300)",
            ),
            (
                r#", "tick_ms": 60"#,
                "tick_ms: 60 must not exceed heartbeat_interval_ms (50)",
            ),
            (
                r#", "max_frame_bytes": 100"#,
                "max_frame_bytes: 100 is out of range (from 4096 to 1073741824)",
            ),
            (
                r#", "max_append_bytes": 16777216"#,
                "max_append_bytes: 16777216 must be at least 1024 below max_frame_bytes (16777216)",
            ),
            (
                r#", "session_ttl_ms": 1000"#,
                "session_ttl_ms: 1000 must be at least 10 times request_timeout_ms (2000)",
            ),
            (
                r#", "proposal_queue_capacity": 0"#,
                "proposal_queue_capacity: 0 is out of range (from 1 to 1048576)",
            ),
            (
                r#", "secret": """#,
                "secret: must not be empty (leave the key out instead)",
            ),
        ];
        for (extra, expected) in cases {
            assert_eq!(error_with(extra), format!("{FILE}: {expected}"));
        }
    }

    #[test]
    fn load_names_the_file_when_it_cannot_be_read() {
        let error = ClusterConfig::load("/nonexistent/cluster.json")
            .unwrap_err()
            .to_string();
        assert!(
            error.starts_with("/nonexistent/cluster.json: cannot read: "),
            "{error}"
        );
    }

    #[test]
    fn key_lists_match_the_serde_structs() {
        let top = serde_json::to_value(RawConfig::default()).unwrap();
        let top_keys: Vec<&String> = top.as_object().unwrap().keys().collect();
        let listed: Vec<&str> = TOP_LEVEL_KEYS.iter().map(|(key, _)| *key).collect();
        assert_eq!(sorted(top_keys), sorted(listed));
        let node = serde_json::to_value(RawNode::default()).unwrap();
        let node_keys: Vec<&String> = node.as_object().unwrap().keys().collect();
        assert_eq!(
            sorted(node_keys),
            sorted(NODE_KEYS.iter().map(|(key, _)| *key).collect())
        );
    }

    fn sorted<T: AsRef<str>>(keys: Vec<T>) -> Vec<String> {
        let mut keys: Vec<String> = keys.iter().map(|key| key.as_ref().to_string()).collect();
        keys.sort();
        keys
    }
}
