//! Short chaos runs in the normal test command (issue 5, item 6): real
//! `kvserver` processes on loopback, every peer link through the runner's
//! proxies, a seeded schedule of kills, pauses, partitions, one-way loss,
//! delay and drop. Each run must end linearizable, with every acknowledged
//! append present exactly once, and with the cluster taking a write after
//! the heal; its history must pass the offline check too. A slow reader
//! stalls leader connections meanwhile and must cause no leader change. Long runs are the
//! `chaos` binary's job (see the README's "Chaos testing").

use std::path::PathBuf;
use std::time::Duration;

use kvstore_raft::chaos::{self, report, ChaosOptions, FaultKind, Outcome};

const KVSERVER: &str = env!("CARGO_BIN_EXE_kvserver");

/// Runs `seconds` of chaos on `nodes` nodes with `seed` and asserts a pass.
fn short_run(seed: u64, nodes: u64, seconds: u64) -> chaos::RunReport {
    short_run_of(seed, nodes, seconds, chaos::default_faults())
}

/// `short_run` with only the fault kinds `faults`.
fn short_run_of(seed: u64, nodes: u64, seconds: u64, faults: Vec<FaultKind>) -> chaos::RunReport {
    let history = std::env::temp_dir().join(format!(
        "chaos-short-{seed}-{}-history.jsonl",
        std::process::id()
    ));
    let mut options = ChaosOptions::new(seed, PathBuf::from(KVSERVER));
    options.nodes = nodes;
    options.clients = 4;
    options.duration = Duration::from_secs(seconds);
    options.history = history.clone();
    options.faults = faults;
    options.check_timeout = Duration::from_secs(30);
    // Generous: the machine running the tests may be busy; the runner's
    // own default (10 election timeouts) is for dedicated runs.
    options.recovery_budget = Duration::from_secs(10);
    let run = chaos::run(&options).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
    let text = report::run_text(&run);
    assert_eq!(run.outcome(), Outcome::Passed, "seed {seed}:\n{text}");
    assert!(
        !run.faults.is_empty(),
        "seed {seed}: no fault injected:\n{text}"
    );
    assert!(run.counts.ok > 100, "seed {seed}: too little work:\n{text}");
    assert!(run.verdict.appends_checked > 0, "seed {seed}:\n{text}");
    assert!(run.recovery.is_ok(), "seed {seed}:\n{text}");
    // Issue 16: the slow reader stalled leaders, and caused no leader change
    // (the outcome counts one as a violation too).
    assert!(!run.stalls.is_empty(), "seed {seed}: no stall:\n{text}");
    assert_eq!(run.slow_reader_leader_changes, 0, "seed {seed}:\n{text}");
    let again = chaos::check_history_file(&history, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
    assert!(
        again.passed(),
        "seed {seed}: the offline check disagrees: {again:?}"
    );
    assert_eq!(again.appends_checked, run.verdict.appends_checked);
    let _ = std::fs::remove_file(&history);
    run
}

#[test]
fn chaos_seed_1_three_nodes() {
    short_run(1, 3, 15);
}

#[test]
fn chaos_seed_2_five_nodes() {
    short_run(2, 5, 15);
}

#[test]
fn chaos_seed_3_three_nodes() {
    short_run(3, 3, 15);
}

/// Issue 13: members removed (the leader too), wiped and added back under a
/// new id, among kills and pauses; the same checks as every run.
#[test]
fn chaos_seed_4_membership_three_nodes() {
    let kinds = vec![FaultKind::Membership, FaultKind::Kill, FaultKind::Pause];
    let run = short_run_of(4, 3, 15, kinds);
    let changes = run
        .faults
        .iter()
        .filter(|fault| fault.description.starts_with("membership:"))
        .count();
    assert!(
        changes >= 1,
        "seed 4: no membership fault:\n{}",
        report::run_text(&run)
    );
}
