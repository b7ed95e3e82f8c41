//! Membership changes on real processes, under client load: a 3-node cluster
//! grows to 5 with `kvserver --join` and `clerk member add`; a killed node
//! whose data directory is gone is replaced by a new member. Every history
//! is checked for linearizability and for exactly-once appends.

mod process;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvstore_raft::check::KvOutput;
use process::{append, element, free_ports, get, Cluster, Recorded, KVSERVER};

const KEY: &str = "log";
/// How long one clerk call may take before it counts as unknown.
const SHELL_TIMEOUT_SECS: f64 = 10.0;
/// A bound on each client's operations, so the test ends on a slow machine.
const MAX_OPS_PER_CLIENT: u64 = 3_000;

/// `clients` threads appending their elements to `KEY` until `stop`.
fn start_appenders(
    cluster: &Cluster,
    clients: u64,
    epoch: Instant,
    stop: &Arc<AtomicBool>,
) -> Vec<JoinHandle<Recorded>> {
    (1..=clients)
        .map(|client| {
            let mut shell = cluster.shell(client, SHELL_TIMEOUT_SECS, epoch);
            let stop = Arc::clone(stop);
            std::thread::spawn(move || {
                let mut recorded = Recorded::default();
                for j in 0..MAX_OPS_PER_CLIENT {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    recorded.run(&mut shell, append(KEY, &element(client, j)));
                }
                recorded
            })
        })
        .collect()
}

/// Stops the appenders, reads the final value and checks the history; with
/// `no_timeouts`, a client call that timed out fails the test too.
fn finish(
    cluster: &Cluster,
    name: &str,
    handles: Vec<JoinHandle<Recorded>>,
    stop: &AtomicBool,
    epoch: Instant,
    no_timeouts: bool,
) {
    stop.store(true, Ordering::SeqCst);
    let mut recorded = Recorded::default();
    for handle in handles {
        recorded.merge(handle.join().expect("client thread"));
    }
    let unknown = recorded.ops.len() - recorded.known_ops();
    assert!(
        !no_timeouts || unknown == 0,
        "{name}: {unknown} client calls timed out"
    );
    let mut shell = cluster.shell(1_000, 10.0, epoch);
    let value = match recorded.run(&mut shell, get(KEY)) {
        Some(KvOutput::Get { value }) => value.unwrap_or_default(),
        other => panic!("{name}: final read {other:?}\n{}", cluster.logs()),
    };
    assert!(recorded.known_ops() > 20, "{name}: too little load ran");
    recorded.assert_appends(KEY, &value);
    recorded.assert_linearizable(name);
}

/// A node the cluster file does not list, started with `--join`.
struct Joiner {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Joiner {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_joiner(cluster: &Cluster, id: u64) -> Joiner {
    let port = free_ports(1)[0];
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("address");
    let log = std::fs::File::create(cluster.dir.path().join(format!("node{id}.log")))
        .expect("joiner log");
    let mut command = Command::new(KVSERVER);
    command
        .arg("--config")
        .arg(&cluster.config_path)
        .args([
            "--id",
            &id.to_string(),
            "--join",
            "--listen",
            &addr.to_string(),
        ])
        .arg("--data-dir")
        .arg(cluster.dir.path().join("data").join(format!("node{id}")))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    process::die_with_parent(&mut command);
    Joiner {
        child: command.spawn().expect("spawn kvserver --join"),
        addr,
    }
}

/// Runs `clerk ARGS` and expects exit 0; returns stdout.
fn clerk_ok(cluster: &Cluster, args: &[&str]) -> String {
    let output = cluster.clerk(30.0, args);
    assert!(
        output.status.success(),
        "clerk {args:?}: {}\n{}",
        String::from_utf8_lossy(&output.stderr),
        cluster.logs()
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The voter ids of `clerk member list --json`.
fn voters(cluster: &Cluster) -> Vec<u64> {
    let json: serde_json::Value =
        serde_json::from_str(&clerk_ok(cluster, &["member", "list", "--json"])).expect("json");
    let mut ids: Vec<u64> = json["members"]
        .as_array()
        .expect("members")
        .iter()
        .filter(|m| m["role"] == "voter")
        .map(|m| m["id"].as_u64().expect("id"))
        .collect();
    ids.sort_unstable();
    ids
}

#[test]
fn grow_three_to_five_under_load() {
    let mut cluster = Cluster::start("grow", 3, "");
    cluster.wait_leader(Duration::from_secs(20));
    let epoch = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let handles = start_appenders(&cluster, 3, epoch, &stop);
    let mut joiners = Vec::new();
    for id in [4, 5] {
        let joiner = start_joiner(&cluster, id);
        let out = clerk_ok(
            &cluster,
            &["member", "add", &id.to_string(), &joiner.addr.to_string()],
        );
        assert!(out.contains(&format!("promoted node {id}")), "{out}");
        joiners.push(joiner);
    }
    assert_eq!(voters(&cluster), vec![1, 2, 3, 4, 5]);
    // Five voters: two of the original three may now be down.
    std::thread::sleep(Duration::from_millis(500));
    finish(
        &cluster,
        "grow_three_to_five_under_load",
        handles,
        &stop,
        epoch,
        false,
    );
    // Node 4 leads, and two of the three nodes the cluster file lists are
    // gone: a clerk with that file reaches node 3, which redirects it to
    // node 4; it learns node 4's address from the membership.
    clerk_ok(&cluster, &["transfer-leader", "4"]);
    cluster.kill(1);
    cluster.kill(2);
    clerk_ok(&cluster, &["put", "after", "two-down"]);
    let got = clerk_ok(&cluster, &["get", "after"]);
    assert!(got.contains("two-down"), "{got}");
    drop(joiners);
}

#[test]
fn replace_a_killed_node_under_load() {
    let mut cluster = Cluster::start("replace", 3, "");
    cluster.wait_leader(Duration::from_secs(20));
    let epoch = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let handles = start_appenders(&cluster, 3, epoch, &stop);
    std::thread::sleep(Duration::from_millis(300));
    // Node 3 dies with its disk: remove it, then add a new node in its place.
    cluster.kill(3);
    std::fs::remove_dir_all(cluster.data_dir(3)).expect("wipe node 3");
    // Back under its old id with an empty disk: refused, loudly.
    cluster.start_node(3);
    let status = cluster.wait_exit(3, Duration::from_secs(20));
    assert_eq!(status.code(), Some(1), "{}", cluster.log(3));
    assert!(
        cluster
            .log(3)
            .contains("may not come back under its old id"),
        "{}",
        cluster.log(3)
    );
    // Nor with --join: id 3 is still a voter, and the leader would go on
    // replicating to it as one (its empty disk would vote again).
    cluster.start_node_with(3, &["--join"]);
    let status = cluster.wait_exit(3, Duration::from_secs(20));
    assert_eq!(status.code(), Some(1), "{}", cluster.log(3));
    let refusal = "--join with an empty data directory";
    let log = cluster.log(3);
    let line = log.lines().find(|line| line.contains(refusal));
    assert!(
        line.is_some_and(|line| line.contains("under the id of a current voter")),
        "{log}"
    );
    let out = clerk_ok(&cluster, &["member", "remove", "3"]);
    assert!(out.contains("removed node 3"), "{out}");
    let joiner = start_joiner(&cluster, 4);
    clerk_ok(&cluster, &["member", "add", "4", &joiner.addr.to_string()]);
    assert_eq!(voters(&cluster), vec![1, 2, 4]);
    std::thread::sleep(Duration::from_millis(300));
    finish(
        &cluster,
        "replace_a_killed_node_under_load",
        handles,
        &stop,
        epoch,
        false,
    );
    // Bad requests are refused with one line and exit 3.
    for args in [
        &["member", "remove", "3"][..],
        &["member", "promote", "1"][..],
        &["transfer-leader", "9"][..],
    ] {
        let output = cluster.clerk(10.0, args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(3), "clerk {args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "clerk {args:?}: {stderr}");
    }
    // Removing the leader succeeds (exit 0) although it steps down at once.
    let json: serde_json::Value =
        serde_json::from_str(&clerk_ok(&cluster, &["member", "list", "--json"])).expect("json");
    let leader = json["leader"].as_u64().expect("a leader");
    clerk_ok(&cluster, &["member", "remove", &leader.to_string()]);
    let left: Vec<u64> = [1, 2, 4].into_iter().filter(|&id| id != leader).collect();
    assert_eq!(voters(&cluster), left);
    drop(joiner);
}

/// Removes `logs/<name>/` (where `bin/stop_nodes.sh` looks for pid files)
/// when the test ends, however it ends.
struct PidDir(std::path::PathBuf);

impl Drop for PidDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A rolling restart as an operator runs it: each node in turn is stopped
/// with `bin/stop_nodes.sh --id N` (which hands leadership away first when N
/// leads) and started again on its data directory, while clients append.
/// No client call may fail or time out, and the history must be
/// linearizable with every acknowledged append exactly once.
#[test]
fn rolling_restart_with_stop_nodes_under_load() {
    let name = "rolling_restart_with_stop_nodes_under_load";
    let mut cluster = Cluster::start("rolling", 3, "");
    cluster.wait_leader(Duration::from_secs(20));
    // stop_nodes.sh keys its pid files by the config file's name: a name of
    // this run's own, so parallel tests and conf/cluster.json are untouched.
    let config_name = format!("rolling-test-{}", std::process::id());
    let config = cluster.dir.path().join(format!("{config_name}.json"));
    std::fs::copy(&cluster.config_path, &config).expect("copy the cluster file");
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let pid_dir = PidDir(root.join("logs").join(&config_name));
    std::fs::create_dir_all(&pid_dir.0).expect("create the pid directory");
    let epoch = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let handles = start_appenders(&cluster, 3, epoch, &stop);
    std::thread::sleep(Duration::from_millis(300));
    let mut transfers = 0;
    for id in cluster.ids() {
        std::fs::write(
            pid_dir.0.join(format!("node{id}.pid")),
            cluster.pid(id).to_string(),
        )
        .expect("write the pid file");
        let output = Command::new(root.join("bin/stop_nodes.sh"))
            .arg("--config")
            .arg(&config)
            .args(["--id", &id.to_string()])
            .env("KVSTORE_CLERK", process::CLERK)
            .stdin(Stdio::null())
            .output()
            .expect("run stop_nodes.sh");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "stop_nodes.sh --id {id}: {stderr}");
        // A transfer that failed would be an election gap: stop_nodes.sh says so.
        assert!(!stderr.contains("transfer"), "stop node {id}: {stderr}");
        if stdout.contains(&format!("node{id}: handed leadership to node")) {
            transfers += 1;
        }
        // SIGTERM is a clean stop: exit 0, not the SIGKILL fallback.
        let status = cluster.wait_exit(id, Duration::from_secs(20));
        assert!(
            status.success(),
            "node {id} stopped with {status}: {stdout}"
        );
        cluster.wait_leader(Duration::from_secs(20));
        let target = cluster.status().iter().map(|s| s.commit).max().unwrap_or(0);
        cluster.start_node(id);
        // Back, and caught up past what was committed while it was down,
        // before the next node goes.
        cluster.wait_for("restarted node caught up", Duration::from_secs(30), |s| {
            s.iter()
                .find(|s| s.id == id && s.role == "follower" && s.applied >= target)
                .map(|_| ())
        });
    }
    // Every node was stopped once, so whoever led was stopped at least once.
    assert!(transfers >= 1, "no stop handed leadership over");
    std::thread::sleep(Duration::from_millis(300));
    finish(&cluster, name, handles, &stop, epoch, true);
}
