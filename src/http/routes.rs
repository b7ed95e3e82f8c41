//! What each path answers, from the node's status and the process-wide
//! counters: `/metrics`, `/health`, `/status`, `/` (the dashboard page) and
//! `/api/dashboard` (its JSON).

use std::fmt;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use serde_json::{json, Value};

use super::history::History;
use super::Response;
use crate::clerk::{Clerk, ClerkOptions, NodeStatusView};
use crate::config::ClusterConfig;
use crate::kv::server::KvServer;
use crate::kv::service::status_reply;
use crate::kv::waiters::Waiters;
use crate::metrics::{encode_counter, encode_gauge, encode_labelled_counters, Counter};
use crate::node::NodeHandle;
use crate::raft::{FollowerStatus, Role};

/// `/health` fails once the state machine is this many entries behind the
/// commit index: the node answers, but from far behind.
pub const HEALTH_MAX_APPLY_LAG: u64 = 10_000;
/// The members' status shown on the dashboard is asked again at most this
/// often, however many dashboards are open.
const MEMBERS_CACHE_MS: u64 = 900;
/// How long the dashboard waits for each member's status.
const MEMBER_STATUS_TIMEOUT_MS: u64 = 500;

/// Connections to the HTTP port closed at once because the queue was full.
pub static CONNECTIONS_REFUSED: Counter = Counter::new();
/// HTTP responses by class: 2xx, 4xx, 5xx.
static RESPONSES: [Counter; 3] = [const { Counter::new() }; 3];

pub fn count_response(status: u16) {
    let class = match status {
        200..=299 => 0,
        400..=499 => 1,
        _ => 2,
    };
    RESPONSES[class].inc();
}

/// What the endpoint reads: the node, its config and its LockQueue.
#[derive(Clone)]
pub struct Source {
    pub node: NodeHandle,
    pub config: ClusterConfig,
    pub waiters: Arc<Waiters>,
}

impl Source {
    pub fn of(server: &KvServer, config: &ClusterConfig) -> Source {
        Source {
            node: server.handle().clone(),
            config: config.clone(),
            waiters: server.waiters(),
        }
    }

    fn status_view(&self) -> NodeStatusView {
        let id = self.node.id();
        NodeStatusView {
            id,
            addr: self.config.node(id).map(|n| n.addr()),
            status: Ok(status_reply(&self.node.status())),
            rejected: false,
        }
    }

    /// Whether the node can serve: it knows a leader and its state machine
    /// is within [`HEALTH_MAX_APPLY_LAG`] of the commit index.
    pub fn health(&self) -> Health {
        let status = self.node.status();
        let lag = status.commit.saturating_sub(status.applied);
        let reason = if let Some(error) = self.node.fatal_error() {
            Some(format!("the node stopped: {error}"))
        } else if self.node.is_stopping() {
            Some("the node is shutting down".to_string())
        } else if status.leader == 0 {
            Some(format!(
                "no leader known (this node is {} in term {})",
                status.role.as_str(),
                status.term
            ))
        } else if lag > HEALTH_MAX_APPLY_LAG {
            Some(format!(
                "applied index {} is {lag} entries behind the commit index {} (bound {HEALTH_MAX_APPLY_LAG})",
                status.applied, status.commit
            ))
        } else {
            None
        };
        Health {
            healthy: reason.is_none(),
            reason,
            id: status.id,
            role: status.role.as_str(),
            term: status.term,
            leader: status.leader,
            apply_lag: lag,
        }
    }
}

/// The answer of `/health`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Health {
    pub healthy: bool,
    pub reason: Option<String>,
    pub id: u64,
    pub role: &'static str,
    pub term: u64,
    pub leader: u64,
    pub apply_lag: u64,
}

impl Health {
    fn to_json(&self) -> Value {
        json!({
            "healthy": self.healthy,
            "reason": self.reason,
            "id": self.id,
            "role": self.role,
            "term": self.term,
            "leader": self.leader,
            "apply_lag": self.apply_lag,
        })
    }
}

/// The node's own families: read from its status at each scrape.
struct NodeCollector {
    source: Source,
}

impl fmt::Debug for NodeCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeCollector(node {})", self.source.node.id())
    }
}

impl Collector for NodeCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let e = &mut encoder;
        let status = self.source.node.status();
        let gauge = |v: u64| v.min(i64::MAX as u64) as i64;
        let mut roles = e.encode_descriptor(
            "kvstore_role",
            "This node's Raft role: 1 for the current one.",
            None,
            MetricType::Gauge,
        )?;
        for role in [
            Role::Follower,
            Role::PreCandidate,
            Role::Candidate,
            Role::Leader,
        ] {
            let labels = [("role", role.as_str())];
            ConstGauge::new((status.role == role) as i64).encode(roles.encode_family(&labels)?)?;
        }
        let gauges = [
            ("kvstore_term", "The current Raft term.", status.term),
            (
                "kvstore_leader_id",
                "The leader this node knows (0: none).",
                status.leader,
            ),
            (
                "kvstore_commit_index",
                "The highest log index known committed.",
                status.commit,
            ),
            (
                "kvstore_applied_index",
                "The highest log index applied to the state machine.",
                status.applied,
            ),
            (
                "kvstore_last_log_index",
                "The last index in this node's log.",
                status.last_index,
            ),
            (
                "kvstore_snapshot_index",
                "The last index covered by this node's snapshot.",
                status.snapshot_index,
            ),
            (
                "kvstore_log_bytes",
                "Bytes of the log held in memory since the snapshot.",
                status.log_bytes,
            ),
            (
                "kvstore_apply_lag_entries",
                "Entries committed but not yet applied (commit - applied).",
                status.commit.saturating_sub(status.applied),
            ),
            (
                "kvstore_lockqueue_slots_in_use",
                "Client requests inside the node now, each holding a LockQueue slot.",
                self.source.waiters.len() as u64,
            ),
            (
                "kvstore_lockqueue_slots",
                "Slots of the LockQueue (proposal_queue_capacity).",
                self.source.config.proposal_queue_capacity as u64,
            ),
        ];
        for (name, help, value) in gauges {
            encode_gauge(e, name, help, gauge(value))?;
        }
        let followers = self.source.node.followers();
        let per_follower = [
            (
                "kvstore_follower_match_index",
                "On the leader: the highest index known in each follower's log.",
                &(|f: &FollowerStatus| f.match_index) as &dyn Fn(&FollowerStatus) -> u64,
            ),
            (
                "kvstore_follower_lag_entries",
                "On the leader: entries each follower is behind the leader's last index.",
                &|f: &FollowerStatus| status.last_index.saturating_sub(f.match_index),
            ),
        ];
        for (name, help, value) in per_follower {
            let mut family = e.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for f in &followers {
                let labels = [("follower", f.id.to_string())];
                ConstGauge::new(gauge(value(f))).encode(family.encode_family(&labels)?)?;
            }
        }
        encode_counter(
            e,
            "kvstore_http_connections_refused",
            "Connections to the HTTP port closed at once: every worker busy and the queue full.",
            CONNECTIONS_REFUSED.get(),
        )?;
        let classes = ["2xx", "4xx", "5xx"];
        let responses: Vec<(&str, u64)> = classes
            .iter()
            .zip(&RESPONSES)
            .map(|(c, n)| (*c, n.get()))
            .collect();
        encode_labelled_counters(
            e,
            "kvstore_http_responses",
            "HTTP responses sent, by status class.",
            "code",
            &responses,
        )
    }
}

pub(crate) struct Routes {
    source: Source,
    registry: Registry,
    clerk: Clerk,
    members: Mutex<Option<(Instant, Vec<NodeStatusView>)>>,
    history: Mutex<History>,
    stopping: Arc<AtomicBool>,
}

/// The dashboard: one page, its script and styles inline, no other asset.
const DASHBOARD_HTML: &str = include_str!("dashboard.html");

impl Routes {
    pub fn new(source: Source, stopping: Arc<AtomicBool>) -> io::Result<Routes> {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(crate::metrics::ProcessCollector));
        registry.register_collector(Box::new(NodeCollector {
            source: source.clone(),
        }));
        let clerk = Clerk::new(
            &source.config,
            ClerkOptions {
                attempt_timeout_ms: MEMBER_STATUS_TIMEOUT_MS,
                ..ClerkOptions::default()
            },
        );
        Ok(Routes {
            source,
            registry,
            clerk,
            members: Mutex::new(None),
            history: Mutex::new(History::new()),
            stopping,
        })
    }

    pub fn route(&self, target: &str) -> Response {
        let path = target.split('?').next().unwrap_or(target);
        match path {
            "/" => Response::new(200, "text/html; charset=utf-8", DASHBOARD_HTML),
            "/metrics" => self.metrics(),
            "/health" => {
                let health = self.source.health();
                let status = if health.healthy { 200 } else { 503 };
                Response::json(status, health.to_json().to_string())
            }
            "/status" => Response::json(200, self.source.status_view().to_json()),
            "/api/dashboard" => Response::json(200, self.dashboard().to_string()),
            _ => Response::text(404, &format!("no such page: {path}")),
        }
    }

    fn metrics(&self) -> Response {
        let mut text = String::new();
        match prometheus_client::encoding::prometheus_text::encode(&mut text, &self.registry) {
            Ok(()) => Response::new(
                200,
                prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
                text,
            ),
            Err(e) => Response::text(500, &format!("cannot encode the metrics: {e}")),
        }
    }

    /// Every member as this node sees it (asked at most every
    /// [`MEMBERS_CACHE_MS`]); this node's own entry comes from its status.
    fn members(&self) -> Vec<NodeStatusView> {
        let mut cache = self.members.lock();
        if let Some((at, views)) = cache.as_ref() {
            if at.elapsed() < Duration::from_millis(MEMBERS_CACHE_MS) {
                return views.clone();
            }
        }
        let me = self.source.node.id();
        let views: Vec<NodeStatusView> = self
            .clerk
            .status_all()
            .into_iter()
            .map(|view| {
                if view.id == me {
                    self.source.status_view()
                } else {
                    view
                }
            })
            .collect();
        *cache = Some((Instant::now(), views.clone()));
        views
    }

    fn dashboard(&self) -> Value {
        let members = self.members();
        let status = self.source.node.status();
        let followers = self.source.node.followers();
        let commit = members
            .iter()
            .filter_map(|m| m.status.as_ref().ok().map(|s| s.commit))
            .max()
            .unwrap_or(status.commit);
        let rows: Vec<Value> = members
            .iter()
            .map(|view| {
                let mut row: Value = serde_json::from_str(&view.to_json()).unwrap_or(Value::Null);
                let reply = view.status.as_ref().ok();
                let follower = followers.iter().find(|f| f.id == view.id);
                row["reachable"] = reply.is_some().into();
                row["lag"] = reply.map(|s| commit.saturating_sub(s.applied)).into();
                row["match_index"] = follower.map(|f| f.match_index).into();
                row["replication"] = follower.map(|f| f.state).into();
                row
            })
            .collect();
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        json!({
            "node": status.id,
            "cluster_id": self.source.config.cluster_id,
            "unix_ms": now_ms,
            "health": self.source.health().to_json(),
            "members": rows,
            "history": self.history.lock().to_json(),
        })
    }

    /// The history thread: one sample per second until the server stops.
    pub fn sample_every_second(&self, stopping: &AtomicBool) {
        let mut next = Instant::now();
        while !stopping.load(Ordering::SeqCst) && !self.stopping.load(Ordering::SeqCst) {
            let now = Instant::now();
            if now >= next {
                self.history.lock().sample();
                next += Duration::from_secs(1);
                if next < now {
                    next = now + Duration::from_secs(1);
                }
            }
            std::thread::sleep(Duration::from_millis(100).min(next.saturating_duration_since(now)));
        }
    }
}
