//! Multi-process tests with the real binaries (TEST-PLAN section C, M1-M8):
//! three `kvserver` processes on 127.0.0.1, crashed with `kill -9`, hung with
//! SIGSTOP, restarted on their data directories, while `clerk shell --json`
//! children record a history for the linearizability checker and the
//! append-order check. Bounds on time are generous (the machine may be
//! loaded): they catch a cluster that does not recover, not a slow one.

mod process;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{sleep, JoinHandle};
use std::time::{Duration, Instant};

use kvstore_raft::check::{KvInput, KvOutput};
use kvstore_raft::raft::SplitMix64;
use process::{append, element, get, put, Cluster, Recorded, Shell};

/// How long a fresh cluster may take to elect its first leader.
const FIRST_LEADER: Duration = Duration::from_secs(5);
/// How long after a crash or pause of the leader a new one must be elected.
const NEW_LEADER: Duration = Duration::from_secs(5);
/// How long a restarted or resumed node may take to catch up.
const CATCH_UP: Duration = Duration::from_secs(10);
/// The deadline each recording clerk shell gives one operation.
const SHELL_TIMEOUT_SECS: f64 = 5.0;
/// The chaos clients' deadline: short, so that some operations do time out
/// and the checker sees outcomes that are unknown.
const CHAOS_SHELL_TIMEOUT_SECS: f64 = 1.5;
/// A client id for the final reads, apart from the writers' ids.
const READER: u64 = 1_000;

/// A client loop on its own thread until `finish` (or drop) stops it;
/// `progress` counts its acknowledged operations.
struct Background {
    stop: Arc<AtomicBool>,
    progress: Arc<AtomicU64>,
    handle: Option<JoinHandle<Recorded>>,
}

impl Background {
    /// Runs `step(shell, recorded, j)` for j = 0, 1, ... until stopped.
    fn spawn(
        cluster: &Cluster,
        client: u64,
        timeout_secs: f64,
        epoch: Instant,
        mut step: impl FnMut(&mut Shell, &mut Recorded, u64) -> Option<KvOutput> + Send + 'static,
    ) -> Background {
        let stop = Arc::new(AtomicBool::new(false));
        let progress = Arc::new(AtomicU64::new(0));
        let config = cluster.config_path.clone();
        let handle = {
            let (stop, progress) = (Arc::clone(&stop), Arc::clone(&progress));
            std::thread::spawn(move || {
                let mut shell = Shell::start(&config, client, timeout_secs, epoch);
                let mut recorded = Recorded::default();
                let mut j = 0;
                while !stop.load(Ordering::SeqCst) {
                    if step(&mut shell, &mut recorded, j).is_some() {
                        progress.fetch_add(1, Ordering::SeqCst);
                    }
                    j += 1;
                }
                recorded
            })
        };
        Background {
            stop,
            progress,
            handle: Some(handle),
        }
    }

    /// A client appending its elements `x client j y` to `key`.
    fn appender(cluster: &Cluster, client: u64, key: &str, epoch: Instant) -> Background {
        let key = key.to_string();
        Background::spawn(
            cluster,
            client,
            SHELL_TIMEOUT_SECS,
            epoch,
            move |shell, recorded, j| recorded.run(shell, append(&key, &element(client, j))),
        )
    }

    /// A client reading `key` over and over.
    fn reader(cluster: &Cluster, client: u64, key: &str, epoch: Instant) -> Background {
        let key = key.to_string();
        Background::spawn(
            cluster,
            client,
            SHELL_TIMEOUT_SECS,
            epoch,
            move |shell, recorded, _| recorded.run(shell, get(&key)),
        )
    }

    fn acked(&self) -> u64 {
        self.progress.load(Ordering::SeqCst)
    }

    /// Waits until at least `count` more operations are acknowledged.
    fn wait_progress(&self, what: &str, count: u64, deadline: Duration) {
        let start = Instant::now();
        let target = self.acked() + count;
        while self.acked() < target {
            assert!(
                start.elapsed() < deadline,
                "{what}: fewer than {count} operations acknowledged within {deadline:?}"
            );
            assert!(
                !self.handle.as_ref().is_some_and(|h| h.is_finished()),
                "{what}: the client thread stopped"
            );
            sleep(Duration::from_millis(20));
        }
    }

    fn finish(mut self) -> Recorded {
        self.stop.store(true, Ordering::SeqCst);
        let handle = self.handle.take().expect("finished once");
        handle
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Reads `key` through a fresh shell, recording the read; the value must
/// be known (the cluster is healthy when this is called).
fn final_read(cluster: &Cluster, recorded: &mut Recorded, key: &str, epoch: Instant) -> String {
    let mut shell = cluster.shell(READER, 10.0, epoch);
    match recorded.run(&mut shell, get(key)) {
        Some(KvOutput::Get { value }) => value.unwrap_or_default(),
        other => panic!("final read of {key:?}: {other:?}\n{}", cluster.logs()),
    }
}

fn stdout(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Runs a one-shot clerk command and asserts its exit code and stdout.
fn expect_clerk(cluster: &Cluster, args: &[&str], code: i32, out: &str) {
    let output = cluster.clerk(10.0, args);
    assert_eq!(
        (output.status.code(), stdout(&output).as_str()),
        (Some(code), out),
        "clerk {args:?}; stderr: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// M1: one leader and one term within 5 s; every operation per the CLI
/// contract, a missing key exiting 1.
#[test]
fn m1_smoke() {
    let mut cluster = Cluster::start("m1", 3, "");
    let start = Instant::now();
    let statuses = cluster.wait_for("3 reachable nodes, one leader", FIRST_LEADER, |s| {
        (s.iter().all(|n| n.reachable()) && process::single_leader(s).is_some()).then(|| s.to_vec())
    });
    eprintln!("m1: leader after {:?}: {statuses:?}", start.elapsed());
    let leader = process::single_leader(&statuses).unwrap().id;
    cluster.wait_for("every node names the leader", FIRST_LEADER, |s| {
        s.iter().all(|n| n.leader == leader).then_some(())
    });
    expect_clerk(&cluster, &["put", "a", "1"], 0, "");
    expect_clerk(&cluster, &["get", "a"], 0, "1\n");
    expect_clerk(&cluster, &["append", "a", "2"], 0, "");
    expect_clerk(&cluster, &["append", "fresh", "x"], 0, "");
    expect_clerk(&cluster, &["get", "fresh"], 0, "x\n");
    expect_clerk(&cluster, &["get", "a"], 0, "12\n");
    expect_clerk(&cluster, &["cas", "a", "12", "3"], 0, "");
    expect_clerk(&cluster, &["cas", "a", "12", "4"], 1, "3\n");
    expect_clerk(&cluster, &["get", "a"], 0, "3\n");
    expect_clerk(&cluster, &["delete", "a"], 0, "");
    let missing = cluster.clerk(10.0, &["get", "a"]);
    assert_eq!(missing.status.code(), Some(1), "get of a deleted key");
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("not found"),
        "stderr: {}",
        String::from_utf8_lossy(&missing.stderr)
    );
    expect_clerk(&cluster, &["get", "never-written"], 1, "");
    // The shell answers in the documented JSON shapes.
    let mut shell = cluster.shell(1, 10.0, Instant::now());
    let mut recorded = Recorded::default();
    let cas = |expected: &str, value: &str| KvInput::Cas {
        key: "s".into(),
        expected: expected.into(),
        value: value.into(),
    };
    let cases = [
        (get("s"), KvOutput::Get { value: None }),
        (
            cas("", "v"),
            KvOutput::Cas {
                swapped: true,
                found: false,
                current: Some(String::new()),
            },
        ),
        (
            cas("", "w"),
            KvOutput::Cas {
                swapped: false,
                found: true,
                current: Some("v".into()),
            },
        ),
        (append("s", "+"), KvOutput::Append),
        (
            get("s"),
            KvOutput::Get {
                value: Some("v+".into()),
            },
        ),
        (
            KvInput::Delete { key: "s".into() },
            KvOutput::Delete { existed: true },
        ),
        (
            KvInput::Delete { key: "s".into() },
            KvOutput::Delete { existed: false },
        ),
        (put("s", "p"), KvOutput::Put),
    ];
    for (input, expected) in cases {
        let what = format!("{input:?}");
        assert_eq!(recorded.run(&mut shell, input), Some(expected), "{what}");
    }
    recorded.assert_linearizable("m1");
}

/// M2: kill -9 the leader while a writer appends and a reader reads; a new
/// leader, writes resume, the killed node catches up after its restart,
/// every acknowledged append is there once and in order, and the history
/// is linearizable.
#[test]
fn m2_kill_leader_under_load() {
    let mut cluster = Cluster::start("m2", 3, "");
    let (leader, _) = cluster.wait_leader(FIRST_LEADER);
    let epoch = Instant::now();
    let writer = Background::appender(&cluster, 1, "m2", epoch);
    let reader = Background::reader(&cluster, 2, "m2", epoch);
    writer.wait_progress("before the crash", 20, Duration::from_secs(10));
    cluster.kill(leader);
    let crashed = Instant::now();
    let (new_leader, _) = cluster.wait_for("a new leader", NEW_LEADER, |s| {
        process::single_leader(s)
            .filter(|l| l.id != leader)
            .map(|l| (l.id, l.term))
    });
    eprintln!(
        "m2: node {new_leader} leads {:?} after the crash of {leader}",
        crashed.elapsed()
    );
    writer.wait_progress("after the crash", 20, Duration::from_secs(10));
    cluster.start_node(leader);
    writer.wait_progress("after the restart", 20, Duration::from_secs(10));
    let mut recorded = writer.finish();
    recorded.merge(reader.finish());
    let restarted = Instant::now();
    let applied = cluster.wait_converged(CATCH_UP);
    eprintln!(
        "m2: all at applied {applied} {:?} after the writes stopped",
        restarted.elapsed()
    );
    let value = final_read(&cluster, &mut recorded, "m2", epoch);
    recorded.assert_appends("m2", &value);
    recorded.assert_linearizable("m2");
}

/// M3: kill -9 every node and restart all from the same data directories,
/// twice, with a write in between; a small snapshot threshold makes both
/// restarts begin from a snapshot. Nothing acknowledged is lost.
#[test]
fn m3_kill_all_and_restart_twice() {
    let mut cluster = Cluster::start("m3", 3, r#""snapshot_threshold_bytes":4096,"#);
    cluster.wait_leader(FIRST_LEADER);
    let epoch = Instant::now();
    let mut recorded = Recorded::default();
    let mut shell = cluster.shell(1, 10.0, epoch);
    let filler = "f".repeat(100);
    for i in 0..100u64 {
        let key = format!("k{}", i % 20);
        let output = recorded.run(&mut shell, put(&key, &format!("{i}-{filler}")));
        assert!(output.is_some(), "put {i} timed out on a healthy cluster");
        recorded.run(&mut shell, append("m3", &element(1, i)));
    }
    drop(shell);
    for round in 0..2u64 {
        // 100 puts, then one between each pair of crashes.
        let expected_puts = 100 + round;
        for id in cluster.ids() {
            cluster.kill(id);
        }
        for id in cluster.ids() {
            cluster.start_node(id);
        }
        cluster.wait_leader(FIRST_LEADER);
        let mut shell = cluster.shell(1 + round + 1, 10.0, epoch);
        for i in expected_puts - 20..expected_puts {
            let key = format!("k{}", i % 20);
            let value = recorded.run(&mut shell, get(&key));
            let wanted = if i < 100 {
                format!("{i}-{filler}")
            } else {
                format!("between-{i}")
            };
            assert_eq!(
                value,
                Some(KvOutput::Get {
                    value: Some(wanted)
                }),
                "round {round}: {key} after the restart"
            );
        }
        // One write between the two crashes.
        let key = format!("k{}", expected_puts % 20);
        let output = recorded.run(&mut shell, put(&key, &format!("between-{expected_puts}")));
        assert!(
            output.is_some(),
            "round {round}: the write after the restart timed out"
        );
        let value = final_read(&cluster, &mut recorded, "m3", epoch);
        recorded.assert_appends("m3", &value);
    }
    let statuses = cluster.status();
    assert!(
        statuses.iter().any(|s| s.snapshot_index > 0),
        "no node took a snapshot: {statuses:?}"
    );
    recorded.assert_linearizable("m3");
}

/// M4: with two of three nodes down a write never succeeds (exit 2 after
/// `--timeout 2`); once one node is back the next write succeeds within
/// 5 s, and the timed-out writes took effect once or not at all.
#[test]
fn m4_no_quorum_no_false_success() {
    let mut cluster = Cluster::start("m4", 3, "");
    let (leader, _) = cluster.wait_leader(FIRST_LEADER);
    expect_clerk(&cluster, &["put", "m4p", "before"], 0, "");
    expect_clerk(&cluster, &["put", "m4a", "before"], 0, "");
    // Kill both followers: the leader stays up and takes the writes into its
    // log, where they can neither commit nor be forgotten until a peer is back.
    let followers: Vec<u64> = cluster
        .ids()
        .into_iter()
        .filter(|&id| id != leader)
        .collect();
    for &id in &followers {
        cluster.kill(id);
    }
    for args in [["put", "m4p", "lost"], ["append", "m4a", "-lost"]] {
        let start = Instant::now();
        let output = cluster.clerk(2.0, &args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(
            output.status.code(),
            Some(2),
            "clerk {args:?} without a quorum; stderr: {stderr}"
        );
        assert!(
            stderr.contains("unknown"),
            "stderr should say the outcome is unknown: {stderr}"
        );
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "clerk --timeout 2 took {:?}",
            start.elapsed()
        );
    }
    cluster.start_node(followers[0]);
    let restarted = Instant::now();
    // The clerk's own deadline is the bound: exit 0 means it took under 5 s.
    let output = cluster.clerk(5.0, &["put", "m4-after", "ok"]);
    assert_eq!(
        output.status.code(),
        Some(0),
        "the put after restarting node {}; stderr: {}\n{}",
        followers[0],
        String::from_utf8_lossy(&output.stderr),
        cluster.logs()
    );
    let took = restarted.elapsed();
    eprintln!(
        "m4: the first put after restarting node {} took {took:?}",
        followers[0]
    );
    let put_value = stdout(&cluster.clerk(10.0, &["get", "m4p"]));
    assert!(
        put_value == "before\n" || put_value == "lost\n",
        "m4p is {put_value:?}"
    );
    let append_value = stdout(&cluster.clerk(10.0, &["get", "m4a"]));
    assert!(
        append_value == "before\n" || append_value == "before-lost\n",
        "m4a is {append_value:?}: the timed-out append was applied more than once?"
    );
    eprintln!("m4: after recovery m4p={put_value:?} m4a={append_value:?}");
}

/// M5: a paused follower misses more than ten snapshot thresholds of
/// writes; after SIGCONT it converges within 10 s (by InstallSnapshot), and
/// its WAL stays bounded.
#[test]
fn m5_lagging_node_catches_up_by_snapshot() {
    const THRESHOLD: u64 = 4096;
    let mut cluster = Cluster::start(
        "m5",
        3,
        &format!(r#""snapshot_threshold_bytes":{THRESHOLD},"#),
    );
    let (leader, _) = cluster.wait_leader(FIRST_LEADER);
    let lagging = cluster.ids().into_iter().find(|&id| id != leader).unwrap();
    let epoch = Instant::now();
    let mut recorded = Recorded::default();
    let mut shell = cluster.shell(1, 10.0, epoch);
    recorded.run(&mut shell, put("m5-first", "1"));
    let paused_at = cluster.wait_converged(CATCH_UP);
    cluster.pause(lagging);
    let value = "v".repeat(400);
    let mut written = 0;
    let mut i = 0u64;
    while written <= 12 * THRESHOLD {
        let output = recorded.run(
            &mut shell,
            put(&format!("k{}", i % 8), &format!("{i}{value}")),
        );
        assert!(output.is_some(), "put {i} timed out with two nodes up");
        recorded.run(&mut shell, append("m5", &element(1, i)));
        written += value.len() as u64 + 20;
        i += 1;
    }
    // Both other nodes have compacted past everything the lagging node has,
    // so no node can send it the missing entries: it needs a snapshot.
    let statuses = cluster.status();
    for status in statuses.iter().filter(|s| s.id != lagging) {
        assert!(
            status.snapshot_index > paused_at,
            "node {} has not compacted past {paused_at}: {statuses:?}",
            status.id
        );
    }
    cluster.resume(lagging);
    let resumed = Instant::now();
    cluster.wait_converged(CATCH_UP);
    eprintln!(
        "m5: node {lagging} caught up {:?} after SIGCONT ({i} puts)",
        resumed.elapsed()
    );
    let statuses = cluster.status();
    let lagging_status = &statuses[(lagging - 1) as usize];
    assert!(
        lagging_status.snapshot_index > paused_at,
        "node {lagging} has no snapshot past {paused_at}: {statuses:?}"
    );
    let value = final_read(&cluster, &mut recorded, "m5", epoch);
    recorded.assert_appends("m5", &value);
    // A few KiB for segment heads and the records of one batch in flight.
    let bound = 8 * THRESHOLD + 8 * 1024;
    for id in cluster.ids() {
        let wal_bytes = cluster.wal_bytes(id);
        eprintln!("m5: node {id} WAL {wal_bytes} bytes (bound {bound})");
        assert!(
            wal_bytes <= bound,
            "node {id}: WAL {wal_bytes} bytes > {bound}"
        );
    }
    recorded.assert_linearizable("m5");
}

/// M6: the leader hangs (SIGSTOP) longer than an election timeout: a new
/// leader within 5 s; after SIGCONT the old leader steps down; clients
/// retried, nothing is duplicated.
#[test]
fn m6_paused_leader_steps_down() {
    let mut cluster = Cluster::start("m6", 3, "");
    let (old_leader, _) = cluster.wait_leader(FIRST_LEADER);
    let epoch = Instant::now();
    let writer = Background::appender(&cluster, 1, "m6", epoch);
    let reader = Background::reader(&cluster, 2, "m6", epoch);
    writer.wait_progress("before the pause", 20, Duration::from_secs(10));
    cluster.pause(old_leader);
    let paused = Instant::now();
    let (new_leader, new_term) = cluster.wait_for("a new leader", NEW_LEADER, |s| {
        process::single_leader(s)
            .filter(|l| l.id != old_leader)
            .map(|l| (l.id, l.term))
    });
    eprintln!(
        "m6: node {new_leader} leads (term {new_term}) {:?} after pausing {old_leader}",
        paused.elapsed()
    );
    writer.wait_progress("during the pause", 20, Duration::from_secs(10));
    cluster.resume(old_leader);
    cluster.wait_for("the old leader steps down", Duration::from_secs(5), |s| {
        let old = &s[(old_leader - 1) as usize];
        (old.role == "follower" && old.term >= new_term).then_some(())
    });
    writer.wait_progress("after the resume", 20, Duration::from_secs(10));
    let mut recorded = writer.finish();
    recorded.merge(reader.finish());
    cluster.wait_converged(CATCH_UP);
    let value = final_read(&cluster, &mut recorded, "m6", epoch);
    recorded.assert_appends("m6", &value);
    recorded.assert_linearizable("m6");
}

/// M7: 1000 sequential appends through one shell within 30 s (1000 × HB/3
/// = 10 s plus an fsync allowance), then a short loadgen run whose p99 is
/// reported, not gated on.
#[test]
fn m7_sequential_throughput_and_loadgen() {
    const APPENDS: u64 = 1000;
    const BOUND: Duration = Duration::from_secs(30);
    let mut cluster = Cluster::start("m7", 3, "");
    cluster.wait_leader(FIRST_LEADER);
    let epoch = Instant::now();
    let mut recorded = Recorded::default();
    let mut shell = cluster.shell(1, 10.0, epoch);
    recorded.run(&mut shell, put("m7-warm", "1"));
    let start = Instant::now();
    for j in 0..APPENDS {
        recorded.run(&mut shell, append("m7", &element(1, j)));
    }
    let took = start.elapsed();
    eprintln!(
        "m7: {APPENDS} sequential appends in {took:?} ({:.2} ms each)",
        took.as_secs_f64() * 1000.0 / APPENDS as f64
    );
    assert!(
        took <= BOUND,
        "{APPENDS} sequential appends took {took:?} > {BOUND:?}"
    );
    assert_eq!(
        recorded.known_ops() as u64,
        APPENDS + 1,
        "some appends timed out"
    );
    let value = final_read(&cluster, &mut recorded, "m7", epoch);
    recorded.assert_appends("m7", &value);

    let output = std::process::Command::new(process::LOADGEN)
        .arg("--config")
        .arg(&cluster.config_path)
        .args(["--clients", "4", "--duration", "2", "--value-size", "64"])
        .args(["--keys", "100", "--read-ratio", "0.5", "--json"])
        .output()
        .expect("run loadgen");
    let text = stdout(&output);
    assert!(
        output.status.success(),
        "loadgen failed: {text}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(text.trim())
        .unwrap_or_else(|e| panic!("loadgen --json printed bad JSON ({e}): {text}"));
    assert!(
        report["ops"].as_u64().unwrap_or(0) > 0,
        "loadgen did nothing: {text}"
    );
    eprintln!(
        "m7: loadgen 4 clients: {:.0} ops/s, p50 {} ms, p99 {} ms, errors {}",
        report["ops_per_sec"].as_f64().unwrap_or(0.0),
        report["p50_ms"],
        report["p99_ms"],
        report["errors"]
    );
}

/// What the chaos nemesis may do next.
enum Fault {
    Kill(u64),
    Pause(u64),
}

/// M8: ~20 s of random kill -9/restart and SIGSTOP/SIGCONT, never more than
/// one node down, while 5 clients append to their own keys and operate on
/// shared keys. At the end: heal, convergence within 15 s, the append-order
/// check per client, and a linearizable history. `CHAOS_SEED` replays.
#[test]
fn m8_chaos() {
    const CLIENTS: u64 = 5;
    const SHARED_KEYS: u64 = 3;
    const CHAOS: Duration = Duration::from_secs(20);
    let seed = std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    eprintln!("m8: CHAOS_SEED={seed}");
    let mut rng = SplitMix64::new(seed);
    let mut cluster = Cluster::start("m8", 3, r#""snapshot_threshold_bytes":16384,"#);
    cluster.wait_leader(FIRST_LEADER);
    let epoch = Instant::now();
    let clients: Vec<Background> = (1..=CLIENTS)
        .map(|client| {
            let mut client_rng = SplitMix64::new(seed ^ client.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let mut own_j = 0;
            Background::spawn(
                &cluster,
                client,
                CHAOS_SHELL_TIMEOUT_SECS,
                epoch,
                move |shell, recorded, _| {
                    let shared = format!("r{}", client_rng.range(0, SHARED_KEYS));
                    let input = match client_rng.range(0, 100) {
                        0..=49 => {
                            own_j += 1;
                            append(&format!("c{client}"), &element(client, own_j - 1))
                        }
                        50..=69 => append(
                            &shared,
                            &format!("[{client}.{}]", client_rng.next_u64() % 1000),
                        ),
                        70..=89 => get(&shared),
                        90..=94 => put(&shared, &format!("p{client}")),
                        _ => KvInput::Cas {
                            key: shared,
                            expected: format!("p{}", client_rng.range(1, CLIENTS + 1)),
                            value: format!("c{client}"),
                        },
                    };
                    recorded.run(shell, input)
                },
            )
        })
        .collect();
    let start = Instant::now();
    let mut faults = 0;
    while start.elapsed() < CHAOS {
        // Half the faults hit the leader, where they do the most harm.
        let leader = process::single_leader(&cluster.status()).map(|l| l.id);
        let victim = match leader {
            Some(leader) if rng.chance(1, 2) => leader,
            _ => rng.range(1, 4),
        };
        let fault = if rng.chance(1, 2) {
            Fault::Kill(victim)
        } else {
            Fault::Pause(victim)
        };
        match fault {
            Fault::Kill(id) => cluster.kill(id),
            Fault::Pause(id) => cluster.pause(id),
        }
        faults += 1;
        sleep(Duration::from_millis(rng.range(100, 1200)));
        match fault {
            Fault::Kill(id) => cluster.start_node(id),
            Fault::Pause(id) => cluster.resume(id),
        }
        cluster.assert_alive();
        sleep(Duration::from_millis(rng.range(50, 700)));
    }
    eprintln!("m8: {faults} faults in {:?}", start.elapsed());
    // Healed: every node runs. The clients must make progress again.
    for client in &clients {
        client.wait_progress("after the heal", 5, Duration::from_secs(15));
    }
    let mut recorded = Recorded::default();
    for client in clients {
        recorded.merge(client.finish());
    }
    let applied = cluster.wait_converged(Duration::from_secs(15));
    let unknown = recorded.ops.len() - recorded.known_ops();
    eprintln!(
        "m8: all nodes at applied {applied}; {} operations, {unknown} with unknown outcome",
        recorded.ops.len()
    );
    for client in 1..=CLIENTS {
        let key = format!("c{client}");
        let value = final_read(&cluster, &mut recorded, &key, epoch);
        recorded.assert_appends(&key, &value);
    }
    for key in 0..SHARED_KEYS {
        final_read(&cluster, &mut recorded, &format!("r{key}"), epoch);
    }
    recorded.assert_linearizable(&format!("m8-seed-{seed}"));
}
