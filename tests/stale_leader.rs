//! The stale-leader scenario, deterministically, every run: the bug Jepsen
//! found in etcd 0.4, RedisRaft and others. Real `kvserver` processes, peer
//! links through the chaos runner's proxies, clients straight to the nodes:
//!
//! 1. a write through the leader L;
//! 2. L is paused (SIGSTOP) and cut off from the other nodes (clients still
//!    reach it);
//! 3. the others elect a leader and commit new writes;
//! 4. L wakes, still cut off: it still believes it leads until its
//!    check-quorum runs out, and reads are sent to it directly.
//!
//! The history must be linearizable: a read answered by L from its local
//! state (no heartbeat round to a majority, a read state released after a
//! step-down, a lease held too long) returns the old value after the new
//! writes completed, and fails the check. The round is played twice, the
//! second time on the leader the first one produced.

use std::path::Path;
use std::time::{Duration, Instant};

use kvstore_raft::chaos::cluster::Cluster;
use kvstore_raft::chaos::{check_history, nemesis, report, workload};
use kvstore_raft::check::{KvInput, KvOutput, Operation};
use kvstore_raft::clerk::{Clerk, ClerkOptions};
use kvstore_raft::config::ClusterConfig;

const KVSERVER: &str = env!("CARGO_BIN_EXE_kvserver");
const ROUNDS: u64 = 2;
const READS_PER_ROUND: u64 = 6;

fn only(config: &ClusterConfig, ids: &[u64]) -> ClusterConfig {
    ClusterConfig {
        raft_nodes: config
            .raft_nodes
            .iter()
            .filter(|n| ids.contains(&n.id))
            .cloned()
            .collect(),
        ..config.clone()
    }
}

fn wait_leader(status: &Clerk, among: &[u64]) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(leader) = nemesis::current_leader(status).filter(|l| among.contains(l)) {
            return leader;
        }
        assert!(Instant::now() < deadline, "no leader among {among:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn put(key: &str, value: &str) -> KvInput {
    KvInput::Put {
        key: key.to_string(),
        value: value.to_string(),
    }
}

fn must_succeed(op: Operation, what: &str) -> Operation {
    assert!(op.output.is_some(), "{what} failed: {op:?}");
    op
}

fn play_round(
    cluster: &mut Cluster,
    round: u64,
    epoch: Instant,
    history: &mut Vec<Operation>,
) -> (u64, u64) {
    let config = cluster.client_config().clone();
    let ids: Vec<u64> = config.raft_nodes.iter().map(|n| n.id).collect();
    let status = Clerk::new(&config, workload::clerk_options(900 + round, 2_000));
    let key = format!("k{round}");
    let client = round * 10;

    let mut writer = Clerk::new(&config, workload::clerk_options(client + 1, 15_000));
    let old = format!("old-{round}");
    history.push(must_succeed(
        workload::record(&mut writer, put(&key, &old), client + 1, epoch),
        "the first write",
    ));
    let leader = wait_leader(&status, &ids);
    // The leader has applied the old value: a read through it sees it.
    let mut via_leader = Clerk::new(
        &only(&config, &[leader]),
        workload::clerk_options(client + 2, 5_000),
    );
    let get = KvInput::Get { key: key.clone() };
    history.push(must_succeed(
        workload::record(&mut via_leader, get.clone(), client + 2, epoch),
        "the read through the leader",
    ));

    cluster.set_paused(leader, true).expect("pause the leader");
    let others: Vec<u64> = ids.iter().copied().filter(|&id| id != leader).collect();
    cluster.partition(&[leader], &others);
    let majority = only(&config, &others);
    let mut new_writer = Clerk::new(&majority, workload::clerk_options(client + 3, 20_000));
    for k in 0..3 {
        let value = format!("new-{round}-{k}");
        history.push(must_succeed(
            workload::record(&mut new_writer, put(&key, &value), client + 3, epoch),
            "a write to the majority",
        ));
    }
    let majority_status = Clerk::new(&majority, workload::clerk_options(client + 4, 2_000));
    let new_leader = wait_leader(&majority_status, &others);

    // The old leader wakes behind the partition and is asked at once.
    cluster
        .set_paused(leader, false)
        .expect("wake the old leader");
    let mut reader = Clerk::new(
        &only(&config, &[leader]),
        ClerkOptions {
            attempt_timeout_ms: 300,
            ..workload::clerk_options(client + 5, 300)
        },
    );
    let mut answered = 0;
    for _ in 0..READS_PER_ROUND {
        let op = workload::record(&mut reader, get.clone(), client + 5, epoch);
        if let Some(KvOutput::Get { value }) = &op.output {
            answered += 1;
            assert_ne!(
                value.as_deref(),
                Some(old.as_str()),
                "round {round}: the deposed leader {leader}, woken behind a partition, \
                 answered a read with the value overwritten on the majority"
            );
        }
        history.push(op);
    }
    cluster.heal_network();
    (new_leader, answered)
}

#[test]
fn a_paused_leader_woken_behind_a_partition_serves_no_stale_read() {
    let work = tempfile::tempdir().expect("temp dir");
    let mut cluster = Cluster::start(work.path(), Path::new(KVSERVER), 3, 11)
        .unwrap_or_else(|e| panic!("cluster start: {e}"));
    let epoch = Instant::now();
    let mut history = Vec::new();
    for round in 1..=ROUNDS {
        let (new_leader, answered) = play_round(&mut cluster, round, epoch, &mut history);
        eprintln!("round {round}: new leader {new_leader}, {answered} direct reads answered");
    }
    let verdict = check_history(&history, Duration::from_secs(30));
    let ops: Vec<String> = history.iter().map(report::op_line).collect();
    assert!(
        verdict.passed(),
        "the history is not linearizable: {:?}\n{}",
        verdict.linearizability,
        ops.join("\n")
    );
}
