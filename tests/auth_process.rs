//! Who may talk to whom, with the real binaries (issue 5, item 5): a
//! three-node cluster with a `cluster_id`, a `secret` and a `client_token`
//! works; a fourth `kvserver` started with another cluster's file, or with
//! the wrong secret, and pointed at the cluster is refused with one clear
//! line in both logs and moves neither the cluster's term nor its leader;
//! clerks without the right token get UNAUTHENTICATED and the CLI exits 3
//! with one line; a clerk of another cluster, or a clerk connection that
//! tries to speak Raft, is turned away at the connection.

mod process;

use std::fs::{self, File};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use kvstore_raft::proto::kvstore::{ErrorCode, GetRequest, RequestHeader, RequestVoteRequest};
use kvstore_raft::rpc::services::{KvStoreStub, RaftStub};
use kvstore_raft::rpc::{ClientConfig, Credentials, RpcClient, RpcError};
use process::{free_ports, Cluster, NodeStatus, KVSERVER};
use serde_json::Value;

const ACCESS_JSON: &str = r#""cluster_id":"alpha","secret":"s3cret","client_token":"tok","#;
/// How long a fresh cluster may take to elect its first leader.
const FIRST_LEADER: Duration = Duration::from_secs(10);
/// How long the refused nodes campaign against the cluster: many of their
/// election timeouts (150-300 ms), so a disruption would show.
const ROGUE_RUN: Duration = Duration::from_secs(3);
/// How long a log line may take to appear.
const LOG_WAIT: Duration = Duration::from_secs(10);
/// The clerk's deadline; a rejection must come long before it.
const CLERK_TIMEOUT_SECS: u64 = 20;
/// The same refusal is logged at most once per this long (peer.rs).
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// A `kvserver` outside the cluster, killed on drop.
struct Rogue {
    child: Child,
    log_path: PathBuf,
}

impl Rogue {
    /// Starts node 4 of a cluster file made from `cluster`'s with the
    /// changes in `overrides` and node 4 added on a port of its own.
    fn start(cluster: &Cluster, name: &str, overrides: &[(&str, &str)]) -> Rogue {
        let port = free_ports(1)[0];
        let mut config = cluster_file(cluster);
        for (key, value) in overrides {
            config[*key] = Value::from(*value);
        }
        config["raft_nodes"]
            .as_array_mut()
            .expect("raft_nodes is a list")
            .push(serde_json::json!({"id": 4, "ip": "127.0.0.1", "port": port}));
        let dir = cluster.dir.path();
        let config_path = dir.join(format!("{name}.json"));
        fs::write(&config_path, config.to_string()).expect("write the rogue's file");
        let log_path = dir.join(format!("{name}.log"));
        let mut command = Command::new(KVSERVER);
        command
            .arg("--config")
            .arg(&config_path)
            .arg("--id")
            .arg("4")
            .arg("--data-dir")
            .arg(dir.join(format!("{name}-data")))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log_path).expect("create the rogue's log"));
        // SAFETY: prctl is async-signal-safe and touches no memory of ours.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = command.spawn().expect("spawn the rogue kvserver");
        Rogue { child, log_path }
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}

impl Drop for Rogue {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The cluster's own file, as JSON.
fn cluster_file(cluster: &Cluster) -> Value {
    let text = fs::read_to_string(&cluster.config_path).expect("read the cluster file");
    serde_json::from_str(&text).expect("the cluster file is JSON")
}

/// Writes a copy of the cluster's file with `key` set to `value` (or
/// removed when `None`), for clerks that are configured wrongly.
fn variant_file(cluster: &Cluster, name: &str, key: &str, value: Option<&str>) -> PathBuf {
    let mut config = cluster_file(cluster);
    let object = config.as_object_mut().expect("an object");
    match value {
        Some(value) => object.insert(key.to_string(), Value::from(value)),
        None => object.remove(key),
    };
    let path = cluster.dir.path().join(format!("{name}.json"));
    fs::write(&path, config.to_string()).expect("write the variant file");
    path
}

fn node_logs(cluster: &Cluster) -> String {
    cluster
        .ids()
        .iter()
        .map(|id| {
            fs::read_to_string(cluster.dir.path().join(format!("node{id}.log"))).unwrap_or_default()
        })
        .collect()
}

/// Waits until `read()` contains `needle`; fails with `what` and the text.
fn wait_for_line(what: &str, needle: &str, read: impl Fn() -> String) -> String {
    let started = Instant::now();
    loop {
        let text = read();
        if let Some(line) = text.lines().find(|line| line.contains(needle)) {
            return line.to_string();
        }
        if started.elapsed() > LOG_WAIT {
            panic!("{what}: no line with {needle:?} within {LOG_WAIT:?}; log:\n{text}");
        }
        sleep(Duration::from_millis(100));
    }
}

fn clerk(config: &Path, args: &[&str]) -> Output {
    Command::new(process::CLERK)
        .arg("--config")
        .arg(config)
        .arg("--timeout")
        .arg(CLERK_TIMEOUT_SECS.to_string())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run clerk")
}

/// Runs the clerk and checks it succeeded; returns its stdout.
fn clerk_ok(config: &Path, args: &[&str]) -> String {
    let output = clerk(config, args);
    assert!(
        output.status.success(),
        "clerk {args:?}: {:?}, stderr {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("UTF-8 output")
}

/// Runs the clerk and checks it was rejected: exit 3 and exactly one line
/// on stderr, which contains `needle`.
fn clerk_rejected(config: &Path, args: &[&str], needle: &str) -> String {
    let started = Instant::now();
    let output = clerk(config, args);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(3), "clerk {args:?}: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "clerk {args:?}: {stderr}");
    assert!(stderr.contains(needle), "clerk {args:?}: {stderr}");
    // Rejected at once, not after a deadline of retries.
    assert!(
        started.elapsed() < Duration::from_secs(CLERK_TIMEOUT_SECS / 2),
        "clerk {args:?} took {:?}",
        started.elapsed()
    );
    stderr
}

fn summary(statuses: &[NodeStatus]) -> Vec<(u64, String, u64, u64)> {
    statuses
        .iter()
        .map(|s| (s.id, s.role.clone(), s.term, s.leader))
        .collect()
}

#[test]
fn nodes_of_another_cluster_or_with_a_wrong_secret_are_refused_and_disrupt_nothing() {
    let mut cluster = Cluster::start("auth-rogue", 3, ACCESS_JSON);
    let (leader, term) = cluster.wait_leader(FIRST_LEADER);
    clerk_ok(&cluster.config_path, &["put", "k", "before"]);
    let before = summary(&cluster.status());

    let rogues_started = Instant::now();
    let other_cluster = Rogue::start(&cluster, "rogue-beta", &[("cluster_id", "beta")]);
    let wrong_secret = Rogue::start(&cluster, "rogue-secret", &[("secret", "guess")]);
    let line = wait_for_line("the node of cluster beta", "refused us", || {
        other_cluster.log()
    });
    assert!(
        line.contains(r#"refused us: cluster id mismatch (ours "beta", theirs "alpha")"#),
        "{line}"
    );
    assert!(line.contains("peer 127.0.0.1:"), "{line}");
    // (The rogue's own start first asks the file's nodes for their status
    // as a clerk, node 0, to see whether the cluster has started: that
    // refusal is logged too, so the peer connection's line is looked for.)
    let line = wait_for_line("a cluster node", r#"(node 4): cluster id mismatch"#, || {
        node_logs(&cluster)
    });
    assert!(
        line.contains(r#"(node 4): cluster id mismatch (ours "alpha", theirs "beta")"#),
        "{line}"
    );
    let line = wait_for_line("the node with the wrong secret", "refused us", || {
        wrong_secret.log()
    });
    assert!(line.contains("refused us: wrong secret"), "{line}");
    let line = wait_for_line("a cluster node", "(node 4): wrong secret", || {
        node_logs(&cluster)
    });
    assert!(line.contains("refused 127.0.0.1:"), "{line}");

    // The refused nodes keep campaigning; none of it reaches the cluster.
    sleep(ROGUE_RUN);
    cluster.assert_alive();
    let after = summary(&cluster.status());
    assert_eq!(
        after, before,
        "the cluster's roles, terms or leader moved (leader {leader}, term {term})"
    );
    assert!(after.iter().all(|(_, _, t, l)| *t == term && *l == leader));
    assert_eq!(clerk_ok(&cluster.config_path, &["get", "k"]), "before\n");
    // A refusal repeated every second is logged once per interval and peer,
    // not each time.
    let intervals = rogues_started.elapsed().as_secs() / REFUSAL_LOG_INTERVAL.as_secs() + 1;
    let refusals = other_cluster.log().matches("refused us").count() as u64;
    assert!(
        refusals <= 3 * intervals,
        "{refusals} refusal lines:\n{}",
        other_cluster.log()
    );
}

#[test]
fn clerks_need_the_token_and_the_cluster_id() {
    let mut cluster = Cluster::start("auth-clerk", 3, ACCESS_JSON);
    cluster.wait_leader(FIRST_LEADER);
    let config = cluster.config_path.clone();

    // With the token (read from the cluster file) every operation works.
    clerk_ok(&config, &["put", "k", "a"]);
    clerk_ok(&config, &["append", "k", "b"]);
    assert_eq!(clerk_ok(&config, &["get", "k"]), "ab\n");
    clerk_ok(&config, &["cas", "k", "ab", "c"]);
    assert_eq!(clerk_ok(&config, &["get", "k"]), "c\n");
    clerk_ok(&config, &["delete", "k"]);
    let status = clerk_ok(&config, &["status"]);
    assert!(status.contains("leader"), "{status}");

    // Without a token, or with a wrong one: UNAUTHENTICATED, one line, exit 3.
    let no_token = variant_file(&cluster, "no-token", "client_token", None);
    let line = clerk_rejected(&no_token, &["put", "k", "x"], "no client token");
    assert!(line.starts_with("clerk: request rejected: node "), "{line}");
    clerk_rejected(&no_token, &["get", "k"], "unauthenticated");
    clerk_rejected(&no_token, &["status"], "UNAUTHENTICATED");
    clerk_rejected(
        &config,
        &["--token", "wrong", "put", "k", "x"],
        "a wrong client token",
    );
    // A clerk of another cluster is refused at the connection.
    let beta = variant_file(&cluster, "beta", "cluster_id", Some("beta"));
    clerk_rejected(
        &beta,
        &["get", "k"],
        r#"refused us: cluster id mismatch (ours "beta", theirs "alpha")"#,
    );
    // Nothing the rejected clerks sent was applied.
    let output = clerk(&config, &["get", "k"]);
    assert_eq!(output.status.code(), Some(1), "{output:?}");

    // The library's view: the error code, and Raft refused to a clerk.
    let addr = format!("127.0.0.1:{}", cluster.ports[0]).parse().unwrap();
    let client = || {
        RpcClient::new(addr, ClientConfig::default()).with_credentials(Credentials::clerk("alpha"))
    };
    let kv = KvStoreStub::new(client());
    let request = |token: &str| GetRequest {
        header: protobuf::MessageField::some(RequestHeader {
            client_id: 7,
            token: token.to_string(),
            ..Default::default()
        }),
        key: b"k".to_vec(),
        ..Default::default()
    };
    let reply = kv.get(&request("")).unwrap();
    assert_eq!(
        reply.header.error.enum_value(),
        Ok(ErrorCode::UNAUTHENTICATED)
    );
    let reply = kv.get(&request("tok")).unwrap();
    assert_ne!(
        reply.header.error.enum_value(),
        Ok(ErrorCode::UNAUTHENTICATED)
    );
    // A clerk connection that calls the Raft service is closed.
    let raft = RaftStub::new(client());
    let vote = RequestVoteRequest {
        term: 1_000,
        candidate_id: 2,
        to: 1,
        ..Default::default()
    };
    let error = raft.request_vote(&vote).unwrap_err();
    assert!(
        matches!(error, RpcError::Closed { .. } | RpcError::Io { .. }),
        "{error:?}"
    );
    // A client of the default cluster is refused at the handshake.
    let default_clerk = KvStoreStub::new(RpcClient::new(addr, ClientConfig::default()));
    let error = default_clerk.get(&request("tok")).unwrap_err();
    assert!(
        error
            .to_string()
            .contains(r#"cluster id mismatch (ours "default", theirs "alpha")"#),
        "{error}"
    );
    cluster.assert_alive();
    let terms: Vec<u64> = cluster.status().iter().map(|s| s.term).collect();
    assert!(terms.iter().all(|t| *t < 1_000), "{terms:?}");
}
