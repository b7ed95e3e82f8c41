//! Disk faults on real `kvserver` processes, through the `--fault-file`
//! testing hook (src/storage/fault.rs): a failed fsync stops the node — it
//! exits non-zero with a line naming the fsync and serves nothing more —
//! without losing an acknowledged write, and the restarted node catches up;
//! a stalled fsync on a follower does not stop the majority from committing.
//! The storage-level crash and corruption tests are in tests/disk_faults.rs.

mod process;

use std::fs;
use std::time::{Duration, Instant};

use process::Cluster;

/// How long a fresh cluster, or one that lost its leader, may take to elect one.
const ELECTION_DEADLINE: Duration = Duration::from_secs(10);
/// How long a node with a failed fsync may take to exit.
const EXIT_DEADLINE: Duration = Duration::from_secs(10);
/// How long a restarted or unstalled node may take to catch up.
const CATCH_UP_DEADLINE: Duration = Duration::from_secs(15);
/// The clerk's deadline for one operation.
const CLERK_TIMEOUT_SECS: f64 = 10.0;
/// How long a follower's fsyncs stay stalled.
const STALL: Duration = Duration::from_secs(3);

fn stdout(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Runs a clerk put that must succeed.
fn put_ok(cluster: &Cluster, key: &str, value: &str) {
    let output = cluster.clerk(CLERK_TIMEOUT_SECS, &["put", key, value]);
    assert_eq!(
        output.status.code(),
        Some(0),
        "put {key}={value}: {}\n{}",
        stderr(&output),
        cluster.logs()
    );
}

/// Reads `key` (None when missing); any other outcome fails the test.
fn get(cluster: &Cluster, key: &str) -> Option<String> {
    let output = cluster.clerk(CLERK_TIMEOUT_SECS, &["get", key]);
    match output.status.code() {
        Some(0) => Some(stdout(&output).trim_end_matches('\n').to_string()),
        Some(1) => None,
        _ => panic!("get {key}: {}\n{}", stderr(&output), cluster.logs()),
    }
}

/// `fail` in the leader's fault file, then a write: the leader's fsync
/// fails, so it exits non-zero naming the fsync, and serves nothing more;
/// another leader takes over with every acknowledged write; the write that
/// met the failure took effect once or not at all; and the failed node,
/// restarted with a healthy disk, recovers and catches up.
#[test]
fn failed_fsync_stops_the_leader_and_loses_nothing() {
    let mut cluster = Cluster::start_with_fault_files("disk-fail", 3, "");
    let (leader, _) = cluster.wait_leader(ELECTION_DEADLINE);
    let keys: Vec<String> = (0..10).map(|i| format!("k{i}")).collect();
    for key in &keys {
        put_ok(&cluster, key, &format!("v-{key}"));
    }
    fs::write(cluster.fault_file(leader), "fail").unwrap();
    // An append, so that applying it twice would show.
    let faulted = cluster.clerk(CLERK_TIMEOUT_SECS, &["append", "x", "once"]);
    let status = cluster.wait_exit(leader, EXIT_DEADLINE);
    assert!(!status.success(), "node {leader} exited with {status}");
    let log = cluster.log(leader);
    let stop_lines: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("injected fsync failure"))
        .collect();
    // The line kvserver ends with says why it stopped, naming the fsync
    // and the file.
    let stopped = format!("kvserver: node {leader} stopped: fdatasync ");
    assert!(
        stop_lines
            .iter()
            .any(|line| line.starts_with(&stopped) && line.contains("wal-")),
        "no line names the failed fsync:\n{log}"
    );
    eprintln!("node {leader} exited ({status}); its lines about the failure: {stop_lines:#?}");

    let (new_leader, _) = cluster.wait_leader(ELECTION_DEADLINE);
    assert_ne!(new_leader, leader);
    for key in &keys {
        assert_eq!(get(&cluster, key), Some(format!("v-{key}")), "{key}");
    }
    let x = get(&cluster, "x");
    match faulted.status.code() {
        Some(0) => assert_eq!(x.as_deref(), Some("once"), "an acknowledged append"),
        Some(2) => assert!(
            matches!(x.as_deref(), None | Some("once")),
            "an append with an unknown outcome applied as {x:?}"
        ),
        other => panic!("append exited {other:?}: {}", stderr(&faulted)),
    }
    eprintln!(
        "the append met the failure: clerk exit {:?}, x = {x:?}",
        faulted.status.code()
    );

    fs::write(cluster.fault_file(leader), "").unwrap();
    cluster.start_node(leader);
    put_ok(&cluster, "after", "restart");
    cluster.wait_for(
        "the restarted node caught up",
        CATCH_UP_DEADLINE,
        |statuses| {
            let all_up = statuses.iter().all(|s| s.reachable());
            (all_up && process::converged(statuses).is_some()).then_some(())
        },
    );
    assert_eq!(get(&cluster, "after").as_deref(), Some("restart"));
}

/// `stall` in a follower's fault file: its fsyncs wait, but the leader and
/// the other follower are a majority, so writes keep committing; once the
/// file is cleared the follower resumes (it did not stop) and catches up.
#[test]
fn stalled_follower_fsync_does_not_stop_commits() {
    let mut cluster = Cluster::start_with_fault_files("disk-stall", 3, "");
    let (leader, _) = cluster.wait_leader(ELECTION_DEADLINE);
    let follower = cluster.ids().into_iter().find(|&id| id != leader).unwrap();
    put_ok(&cluster, "before", "stall");
    fs::write(cluster.fault_file(follower), "stall").unwrap();
    let start = Instant::now();
    let mut written = 0;
    while start.elapsed() < STALL {
        put_ok(&cluster, &format!("s{written}"), "during");
        written += 1;
    }
    assert!(
        written >= 3,
        "only {written} writes committed during the stall"
    );
    let log = cluster.log(follower);
    assert!(
        log.contains("fsync stalled"),
        "node {follower} never reached a stalled fsync:\n{log}"
    );
    fs::write(cluster.fault_file(follower), "").unwrap();
    cluster.wait_for(
        "the stalled follower caught up",
        CATCH_UP_DEADLINE,
        |statuses| {
            let all_up = statuses.iter().all(|s| s.reachable());
            (all_up && process::converged(statuses).is_some()).then_some(())
        },
    );
    assert!(cluster.log(follower).contains("fsync resumed"));
    for i in 0..written {
        assert_eq!(get(&cluster, &format!("s{i}")).as_deref(), Some("during"));
    }
    eprintln!("{written} writes committed while node {follower}'s fsyncs stalled for {STALL:?}");
}

/// Issue 16, item 7: `panic rpc` in the leader's fault file makes its next
/// KVStore request panic on the RPC server's connection thread. The process
/// exits non-zero with one line naming the thread and the panic, and the
/// others elect a leader and take writes. Before, the panic ended only that
/// connection thread, and the node went on leading.
#[test]
fn a_panic_on_an_rpc_thread_stops_the_node_with_one_line() {
    let mut cluster = Cluster::start_with_fault_files("rpc-panic", 3, "");
    let (leader, _) = cluster.wait_leader(ELECTION_DEADLINE);
    put_ok(&cluster, "before", "panic");
    fs::write(cluster.fault_file(leader), "panic rpc").unwrap();
    let _ = cluster.clerk(CLERK_TIMEOUT_SECS, &["get", "before"]);
    let status = cluster.wait_exit(leader, EXIT_DEADLINE);
    assert!(!status.success(), "node {leader} exited with {status}");
    let log = cluster.log(leader);
    let stopped = format!("kvserver: node {leader} stopped: thread rpc-conn-");
    let lines: Vec<&str> = log
        .lines()
        .filter(|line| line.starts_with(&stopped))
        .collect();
    assert_eq!(lines.len(), 1, "one line names the thread:\n{log}");
    assert!(
        lines[0].contains(" panicked: injected panic (fault file "),
        "{}",
        lines[0]
    );
    fs::write(cluster.fault_file(leader), "").unwrap();
    let (new_leader, _) = cluster.wait_leader(ELECTION_DEADLINE);
    assert_ne!(new_leader, leader);
    put_ok(&cluster, "after", "panic");
    assert_eq!(get(&cluster, "after").as_deref(), Some("panic"));
    assert_eq!(get(&cluster, "before").as_deref(), Some("panic"));
}
